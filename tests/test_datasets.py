"""Real dataset loaders on tiny fake copies in each dataset's exact on-disk format."""
from __future__ import annotations

import os
import pickle
import urllib.error
import warnings

import numpy as np
import pytest

from bdsafety.data import datasets as ds
from bdsafety.data.datasets import load_clean_dataset
from bdsafety.data.info import DATASETS, CleanData
from bdsafety.errors import DataError
from tests.fake_datasets import (
    make_fake_cifar10,
    make_fake_cifar100,
    make_fake_gtsrb,
    make_fake_imagefolder,
    make_fake_tiny,
)


def assert_matches(data: CleanData, fake, hw: tuple[int, int]) -> None:
    for x, y, ex, ey in ((data.train_x, data.train_y, fake.train_x, fake.train_y),
                         (data.test_x, data.test_y, fake.test_x, fake.test_y)):
        assert x.dtype == np.uint8 and x.shape == (len(ey), hw[0], hw[1], 3)
        assert y.dtype == np.int64
        np.testing.assert_array_equal(y, ey)
        diff = np.abs(x.astype(np.int16) - ex.astype(np.int16)).max()
        assert diff <= fake.tolerance, f"pixel error {diff} > {fake.tolerance}"
    assert data.classes == fake.classes


def no_decoding(monkeypatch):
    def fail(path, hw):
        raise AssertionError(f"decoded {path} although the cache is valid")

    monkeypatch.setattr(ds, "_decode", fail)


def count_decoding(monkeypatch) -> list:
    calls, real = [], ds._decode

    def counted(path, hw):
        calls.append(path)
        return real(path, hw)

    monkeypatch.setattr(ds, "_decode", counted)
    return calls


# ---------------------------------------------------------------- cifar


def test_cifar10_fake_files_are_read_directly_with_a_warning(tmp_path):
    root = str(tmp_path / "cifar10")
    fake = make_fake_cifar10(root, n_train=23, n_test=7)
    with pytest.warns(UserWarning, match="differ from the official release"):
        data = load_clean_dataset("cifar10", root, download=False)
    assert_matches(data, fake, (32, 32))
    assert data.info == DATASETS["cifar10"]
    assert data.train_x.flags["C_CONTIGUOUS"]


def test_cifar10_official_files_go_through_torchvision(tmp_path, monkeypatch):
    import torchvision.datasets.cifar as tv_cifar

    root = str(tmp_path / "cifar10")
    fake = make_fake_cifar10(root, n_train=12, n_test=5)
    monkeypatch.setattr(tv_cifar, "check_integrity", lambda *a, **k: True)  # pretend md5s match
    def direct_reader(*args):
        raise AssertionError("torchvision accepted the files: the direct reader must not run")

    monkeypatch.setattr(ds, "_read_cifar_batches", direct_reader)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        data = load_clean_dataset("cifar10", root, download=True)  # files present: no download attempted
    assert_matches(data, fake, (32, 32))


def test_cifar100_uses_fine_labels(tmp_path):
    root = str(tmp_path / "cifar100")
    fake = make_fake_cifar100(root, n_train=9, n_test=4)
    with pytest.warns(UserWarning):
        data = load_clean_dataset("cifar100", root, download=False)
    assert_matches(data, fake, (32, 32))
    assert data.info.num_classes == 100 and len(data.classes) == 100


def test_cifar_missing_without_download_shows_layout(tmp_path):
    with pytest.raises(FileNotFoundError) as e:
        load_clean_dataset("cifar10", str(tmp_path / "cifar10"), download=False)
    msg = str(e.value)
    for part in ("cifar10", "cifar-10-batches-py", "data_batch_1", "data_batch_5", "test_batch",
                 "batches.meta", "download=True", str(tmp_path / "cifar10")):
        assert part in msg


def test_cifar_failed_download_is_file_not_found(tmp_path, monkeypatch):
    import torchvision.datasets as tvd

    attempts = []

    def offline(self):
        attempts.append(self.root)
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(tvd.CIFAR100, "download", offline)
    with pytest.raises(FileNotFoundError, match="download failed") as e:
        load_clean_dataset("cifar100", str(tmp_path / "cifar100"), download=True)
    assert attempts and "cifar-100-python" in str(e.value) and "meta" in str(e.value)


def test_cifar_direct_reader_refuses_arbitrary_objects(tmp_path):
    import datetime

    root = str(tmp_path / "cifar10")
    make_fake_cifar10(root, n_train=5, n_test=2)
    with open(os.path.join(root, "cifar-10-batches-py", "test_batch"), "wb") as f:
        pickle.dump({"data": datetime.date(2020, 1, 1), "labels": [0]}, f, protocol=2)
    with pytest.warns(UserWarning), pytest.raises(pickle.UnpicklingError, match="datetime.date"):
        load_clean_dataset("cifar10", root, download=False)


# ---------------------------------------------------------------- gtsrb


def test_gtsrb_loads_ppm_rgb_resized_and_caches(tmp_path, monkeypatch):
    root = str(tmp_path / "gtsrb")
    fake = make_fake_gtsrb(root, n_train_per_class=2, n_test=6)
    data = load_clean_dataset("gtsrb", root, progress=False)
    assert_matches(data, fake, (32, 32))
    assert data.info == DATASETS["gtsrb"]
    cache = os.path.join(root, ".bdsafety_cache")
    assert sorted(os.listdir(cache)) == ["test_32x32.npz", "train_32x32.npz"]  # no temp files left

    no_decoding(monkeypatch)
    again = load_clean_dataset("gtsrb", root)
    np.testing.assert_array_equal(again.train_x, data.train_x)
    np.testing.assert_array_equal(again.test_y, data.test_y)


def test_gtsrb_resize_matches_backdoorbench_transform(tmp_path):
    """BackdoorBench resizes GTSRB with torchvision's Resize on the PIL image; pixels must agree."""
    from PIL import Image
    from torchvision import transforms

    from tests.fake_datasets import write_ppm

    root = str(tmp_path / "gtsrb")
    make_fake_gtsrb(root, n_test=2)
    path = os.path.join(root, "Train", "00000", "00000_00000.ppm")
    write_ppm(path, np.random.default_rng(5).integers(0, 256, (45, 37, 3), dtype=np.uint8))
    data = load_clean_dataset("gtsrb", root)
    with Image.open(path) as im:
        expected = np.asarray(transforms.Resize((32, 32))(im))
    np.testing.assert_array_equal(data.train_x[0], expected)


def test_gtsrb_cache_invalidated_when_a_label_changes(tmp_path, monkeypatch):
    root = str(tmp_path / "gtsrb")
    fake = make_fake_gtsrb(root, n_test=4)
    load_clean_dataset("gtsrb", root)
    csv_path = os.path.join(root, "Test", "GT-final_test.csv")
    with open(csv_path, newline="") as f:
        lines = f.read().split("\r\n")
    fields = lines[1].split(";")
    new_label = (int(fields[-1]) + 1) % 43
    lines[1] = ";".join(fields[:-1] + [str(new_label)])
    with open(csv_path, "w", newline="") as f:
        f.write("\r\n".join(lines))

    calls = count_decoding(monkeypatch)
    data = load_clean_dataset("gtsrb", root)
    assert len(calls) == 4  # test split decoded again, train split still cached
    assert data.test_y[0] == new_label and list(data.test_y[1:]) == list(fake.test_y[1:])


def test_gtsrb_missing_folder_and_missing_class(tmp_path):
    root = str(tmp_path / "gtsrb")
    with pytest.raises(FileNotFoundError) as e:
        load_clean_dataset("gtsrb", root)
    msg = str(e.value)
    for part in ("gtsrb", "Train", "GT-00000.csv", "Test", "GT-final_test.csv", "ClassId", "GTSRB_Final_Test_GT.zip"):
        assert part in msg

    make_fake_gtsrb(root, n_test=2)
    os.remove(os.path.join(root, "Train", "00042", "GT-00042.csv"))
    with pytest.raises(FileNotFoundError, match="GT-00042.csv"):
        load_clean_dataset("gtsrb", root)


def test_gtsrb_unlabelled_test_csv_is_explained(tmp_path):
    root = str(tmp_path / "gtsrb")
    make_fake_gtsrb(root, n_test=2)
    test_dir = os.path.join(root, "Test")
    os.replace(os.path.join(test_dir, "GT-final_test.test.csv"), os.path.join(test_dir, "GT-final_test.csv"))
    with pytest.raises(ValueError, match="GTSRB_Final_Test_GT.zip"):
        load_clean_dataset("gtsrb", root)


def test_gtsrb_image_listed_but_missing(tmp_path):
    root = str(tmp_path / "gtsrb")
    make_fake_gtsrb(root, n_test=2)
    os.remove(os.path.join(root, "Test", "00001.ppm"))
    with pytest.raises(FileNotFoundError, match="00001.ppm"):
        load_clean_dataset("gtsrb", root)


# ---------------------------------------------------------------- tiny


def test_tiny_nested_original_layout(tmp_path):
    root = str(tmp_path / "tiny")
    fake = make_fake_tiny(root, n_classes=3, n_train_per_class=2, n_val_per_class=2)
    data = load_clean_dataset("tiny", root, download=False)
    assert_matches(data, fake, (64, 64))
    assert data.classes == sorted(data.classes)  # sorted folders, not wnids.txt order
    gray = data.train_x[0].astype(int)
    assert (gray[..., 0] == gray[..., 1]).all() and (gray[..., 1] == gray[..., 2]).all()
    assert os.path.isfile(os.path.join(root, ".bdsafety_cache", "train_64x64.npz"))


def test_tiny_flat_backdoorbench_val_layout_gives_same_data(tmp_path):
    make_fake_tiny(str(tmp_path / "a"), seed=3)
    a = load_clean_dataset("tiny", str(tmp_path / "a"), download=False)
    fake = make_fake_tiny(str(tmp_path / "b"), nested=False, val_layout="backdoorbench", seed=3)
    b = load_clean_dataset("tiny", str(tmp_path / "b"), download=False)
    assert_matches(b, fake, (64, 64))
    for name in ("train_x", "train_y", "test_x", "test_y"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name))


def test_tiny_cache_invalidated_when_files_added(tmp_path, monkeypatch):
    import shutil

    root = str(tmp_path / "tiny")
    fake = make_fake_tiny(root, n_classes=2, n_train_per_class=2, n_val_per_class=1)
    load_clean_dataset("tiny", root, download=False)
    train = os.path.join(root, "tiny-imagenet-200", "train", fake.classes[1], "images")
    first = sorted(os.listdir(train))[0]
    shutil.copy(os.path.join(train, first), os.path.join(train, "zz_extra.JPEG"))
    calls = count_decoding(monkeypatch)
    data = load_clean_dataset("tiny", root, download=False)
    assert len(calls) == 5 and len(data.train_y) == 5 and data.train_y[-1] == 1


def test_tiny_missing_shows_both_locations(tmp_path, monkeypatch):
    import torchvision.datasets.utils as tv_utils

    root = str(tmp_path / "tiny")
    with pytest.raises(FileNotFoundError) as e:
        load_clean_dataset("tiny", root, download=False)
    msg = str(e.value)
    for part in ("tiny-imagenet-200", "wnids.txt", "val_annotations.txt", "train/<wnid>/images", root):
        assert part in msg

    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(tv_utils, "download_and_extract_archive", offline)
    with pytest.raises(FileNotFoundError, match="download failed"):
        load_clean_dataset("tiny", root, download=True)


# ---------------------------------------------------------------- imagefolder


def test_imagefolder_loads_user_images(tmp_path):
    root = str(tmp_path / "mine")
    fake = make_fake_imagefolder(root, size=(24, 20))
    os.makedirs(os.path.join(root, "train", ".ipynb_checkpoints"))  # hidden folders are not classes
    data = load_clean_dataset("imagefolder", root)
    # the solid off-size image must come back resized to the first image's size, still solid
    assert_matches(data, fake, (24, 20))
    assert data.info.name == "imagefolder" and data.info.num_classes == 3 and data.info.img_size == (24, 20, 3)


def test_imagefolder_explicit_size_and_new_file_invalidates_cache(tmp_path, monkeypatch):
    root = str(tmp_path / "mine")
    make_fake_imagefolder(root, classes=("a", "b"), n_train_per_class=1, n_test_per_class=1)
    data = load_clean_dataset("imagefolder", root, img_size=(16, 12, 3))
    assert data.train_x.shape == (4, 16, 12, 3)
    assert os.path.isfile(os.path.join(root, ".bdsafety_cache", "train_16x12.npz"))

    no_decoding(monkeypatch)
    assert len(load_clean_dataset("imagefolder", root, img_size=(16, 12)).train_y) == 4
    monkeypatch.undo()

    from PIL import Image

    Image.new("RGB", (5, 5), (1, 2, 3)).save(os.path.join(root, "train", "b", "new.png"))
    data = load_clean_dataset("imagefolder", root, img_size=(16, 12))
    assert list(data.train_y) == [0, 0, 1, 1, 1]
    assert (data.train_x[3] == np.array([1, 2, 3], np.uint8)).all()  # new.png sorts before z_odd_size.png


def test_cache_survives_moving_the_dataset_folder(tmp_path, monkeypatch):
    import shutil

    fake = make_fake_imagefolder(str(tmp_path / "old"), classes=("a", "b"), n_train_per_class=2, n_test_per_class=1)
    load_clean_dataset("imagefolder", str(tmp_path / "old"))
    shutil.move(str(tmp_path / "old"), str(tmp_path / "new"))
    no_decoding(monkeypatch)
    assert_matches(load_clean_dataset("imagefolder", str(tmp_path / "new")), fake, (24, 20))


def test_imagefolder_corrupt_cache_is_rebuilt(tmp_path):
    root = str(tmp_path / "mine")
    fake = make_fake_imagefolder(root, classes=("a", "b"), n_train_per_class=2, n_test_per_class=1)
    load_clean_dataset("imagefolder", root)
    cache = os.path.join(root, ".bdsafety_cache", "train_24x20.npz")
    with open(cache, "wb") as f:
        f.write(b"not a zip file")
    data = load_clean_dataset("imagefolder", root)
    assert_matches(data, fake, (24, 20))
    with np.load(cache) as z:
        np.testing.assert_array_equal(z["x"], data.train_x)


def test_imagefolder_class_mismatch_and_missing(tmp_path):
    root = str(tmp_path / "mine")
    with pytest.raises(FileNotFoundError) as e:
        load_clean_dataset("imagefolder", root)
    assert "train/<class>" in str(e.value) and "test/<class>" in str(e.value)

    make_fake_imagefolder(root, classes=("a", "b"), n_train_per_class=1, n_test_per_class=1)
    os.rename(os.path.join(root, "test", "b"), os.path.join(root, "test", "c"))
    with pytest.raises(ValueError, match=r"only in train: \['b'\], only in test: \['c'\]"):
        load_clean_dataset("imagefolder", root)


def test_imagefolder_unreadable_image_is_named(tmp_path):
    root = str(tmp_path / "mine")
    make_fake_imagefolder(root, classes=("a", "b"), n_train_per_class=1, n_test_per_class=1)
    bad = os.path.join(root, "test", "b", "broken.png")
    with open(bad, "wb") as f:
        f.write(b"this is not a png")
    with pytest.raises(DataError, match="broken.png"):
        load_clean_dataset("imagefolder", root)
    assert not os.path.exists(os.path.join(root, ".bdsafety_cache", "test_24x20.npz"))


def test_imagefolder_empty_train_class(tmp_path):
    root = str(tmp_path / "mine")
    make_fake_imagefolder(root, classes=("a", "b"), n_train_per_class=1, n_test_per_class=1)
    os.makedirs(os.path.join(root, "train", "c"))
    os.makedirs(os.path.join(root, "test", "c"))
    with pytest.raises(ValueError, match="has no images"):
        load_clean_dataset("imagefolder", root)


# ---------------------------------------------------------------- names, sizes, synthetic


def test_unknown_and_unsupported_names(tmp_path):
    with pytest.raises(ValueError, match="unknown dataset 'cifar11'.*cifar10.*gtsrb.*tiny.*imagefolder.*synthetic"):
        load_clean_dataset("cifar11", str(tmp_path))
    for name in ("mnist", "celeba", "imagenet"):
        with pytest.raises(ValueError, match="does not support"):
            load_clean_dataset(name, str(tmp_path))


def test_fixed_size_datasets_reject_other_sizes_and_extra_arguments(tmp_path):
    with pytest.raises(ValueError, match="gtsrb images are 32x32"):
        load_clean_dataset("gtsrb", str(tmp_path), img_size=(64, 64))
    with pytest.raises(TypeError, match="n_train"):
        load_clean_dataset("cifar10", str(tmp_path), n_train=10)


def test_synthetic_is_delegated(monkeypatch):
    seen = {}
    monkeypatch.setattr("bdsafety.data.synthetic.make_synthetic", lambda **kw: seen.update(kw) or "made")
    assert load_clean_dataset("synthetic", "unused", n_train=20, seed=3, img_size=(16, 16)) == "made"
    assert seen == {"n_train": 20, "seed": 3, "size": 16}


def test_synthetic_end_to_end():
    data = load_clean_dataset("synthetic", "unused", n_train=10, n_test=10, img_size=16)
    assert isinstance(data, CleanData)
    assert data.train_x.shape == (10, 16, 16, 3) and data.train_x.dtype == np.uint8
    assert data.test_y.dtype == np.int64 and data.info.img_size == (16, 16, 3)


def test_a_missing_dataset_is_a_user_error_one_line_at_the_cli(tmp_path, capsys):
    from bdsafety.cli import run_cli
    from bdsafety.errors import UserError
    from bdsafety.registry import get

    rc = run_cli(lambda a: get("attack", "badnet").main(a),
                 ["--dataset", "cifar10", "--dataset_path", str(tmp_path / "none"),
                  "--record_root", str(tmp_path / "rec")])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error: cifar10 dataset not found") and "Traceback" not in err
    assert issubclass(__import__("bdsafety.errors", fromlist=["DatasetNotFound"]).DatasetNotFound, UserError)
