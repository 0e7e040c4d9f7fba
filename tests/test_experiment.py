import numpy as np
import pytest

from bdsafety.config import read_index
from bdsafety.experiment import reserved_indices
from bdsafety.outputs import OutputFolder


def test_reserved_ratio_count_seeded():
    y = np.arange(1000) % 10
    a = reserved_indices(y, 0.05, seed=1)
    assert len(a) == 50 and np.array_equal(a, reserved_indices(y, 0.05, seed=1))
    assert not np.array_equal(a, reserved_indices(y, 0.05, seed=2))
    assert len(reserved_indices(y, 37, seed=0)) == 37


def test_reserved_balanced_has_equal_class_counts():
    y = np.arange(1000) % 10
    a = reserved_indices(y, 0.05, balanced=True, seed=0, num_classes=10)
    assert np.bincount(y[a], minlength=10).tolist() == [5] * 10


def test_reserved_errors_name_the_fix():
    y = np.arange(1000) % 10
    with pytest.raises(ValueError, match="cannot cover 10 classes"):
        reserved_indices(y, 5, balanced=True, num_classes=10)
    with pytest.raises(ValueError, match="ratio in"):
        reserved_indices(y, 0.0)


def test_output_folder_is_atomic(tmp_path):
    dest = tmp_path / "defense" / "ft"
    dest.parent.mkdir()
    with pytest.raises(RuntimeError):
        with OutputFolder(dest) as out:
            (out.path / "defense_result.pt").write_text("partial")
            raise RuntimeError("crash mid-run")
    assert not dest.exists() and list(dest.parent.iterdir()) == []
    with OutputFolder(dest) as out:
        (out.path / "a.txt").write_text("1")
    assert (dest / "a.txt").read_text() == "1"
    with pytest.raises(FileExistsError, match="--overwrite"):
        OutputFolder(dest)
    with OutputFolder(dest, overwrite=True) as out:
        (out.path / "b.txt").write_text("2")
    assert (dest / "b.txt").exists() and not (dest / "a.txt").exists()
    assert sorted(p.name for p in dest.parent.iterdir()) == ["ft"]


def test_read_index_roundtrip(tmp_path):
    p = tmp_path / "index.txt"
    p.write_text("3\n1\n2\n")
    assert read_index(p).tolist() == [3, 1, 2]
    from bdsafety.errors import ConfigError

    with pytest.raises(ConfigError, match="--index .*nope.txt: file not found"):
        read_index(tmp_path / "nope.txt")
