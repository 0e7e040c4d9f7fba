"""End-to-end attack runs and their bad-input errors."""
import os

import numpy as np
import pytest

from bdsafety.records import load_attack_record, read_metrics_summary
from bdsafety.registry import get


def main(attack, argv):
    return get("attack", attack).main(argv)

TINY = ["--dataset", "synthetic", "--model", "cnn_small", "--synthetic_n_train", "200", "--synthetic_n_test", "100",
        "--epochs", "1", "--no_progress"]


def test_demo_badnet_meets_the_targets(demo_record):
    """The README's demo: BadNets on synthetic, C-Acc >= 0.85 and ASR >= 0.95 (issue 2's acceptance)."""
    m = read_metrics_summary(demo_record, "attack")
    assert m["test_acc"] >= 0.85, m
    assert m["test_asr"] >= 0.95, m
    rec = load_attack_record(demo_record)
    assert rec.model_name == "cnn_small" and rec.num_classes == 10 and rec.attack_target == 0
    assert len(rec.bd_train) == 500 and rec.bd_train.length == 5000
    assert (rec.bd_train.bd_labels == 0).all()
    assert len(rec.bd_test) == 900 and (rec.bd_test.orig_labels != 0).all()
    # the stored poisoned images carry the BadNets patch
    assert (rec.bd_train.images[:, 29:, 29:] == 255).all()


def test_clean_reference_has_low_asr(clean_record):
    m = read_metrics_summary(clean_record, "attack")
    assert m["test_acc"] >= 0.85 and m["test_asr"] < 0.2, m
    rec = load_attack_record(clean_record)
    assert rec.info["attack"] == "clean" and len(rec.bd_train) == 0 and len(rec.bd_test) == 900


def test_blended_all2all_record(tmp_path):
    rd = main("blended",
              TINY + ["--record_root", str(tmp_path), "--save_folder_name", "b", "--attack_label_trans", "all2all"])
    rec = load_attack_record(rd)
    assert len(rec.bd_test) == 100  # all2all: every test sample is poisoned
    assert np.array_equal(rec.bd_test.bd_labels, (rec.bd_test.orig_labels + 1) % 10)
    assert os.path.isfile(os.path.join(rd, "blend_key.png")) and rec.info["blend_alpha"] == 0.2
    assert os.path.isfile(os.path.join(rd, "config.yaml"))


def test_existing_record_is_refused_then_overwritten(tmp_path):
    args = TINY + ["--record_root", str(tmp_path), "--save_folder_name", "r"]
    main("badnet", args)
    with pytest.raises(FileExistsError, match="--overwrite"):
        main("badnet", args)
    main("badnet", args + ["--overwrite"])


def test_bad_inputs_have_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="poisons 0 of 200"):
        main("badnet", TINY + ["--record_root", str(tmp_path), "--pratio", "0.001"])
    with pytest.raises(ValueError, match="attack_target 12"):
        main("badnet", TINY + ["--record_root", str(tmp_path), "--attack_target", "12"])
    with pytest.raises(ValueError, match="unknown model"):
        main("badnet", TINY + ["--record_root", str(tmp_path), "--model", "resnet9000"])
    with pytest.raises(FileNotFoundError, match="cifar-10-batches-py"):
        main("badnet",
             ["--dataset", "cifar10", "--dataset_path", str(tmp_path / "nodata"), "--record_root", str(tmp_path)])
    assert not any(p.name != "nodata" for p in tmp_path.iterdir() if p.is_dir() and (p / "attack_result.pt").exists())


@pytest.mark.slow
def test_cli_prints_one_line_errors(tmp_path):
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    r = subprocess.run([sys.executable, os.path.join(root, "attack", "badnet.py"),
                        "--yaml_path", str(tmp_path / "x.yaml")],
                       capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 2 and r.stderr.startswith("error: yaml config not found") and "Traceback" not in r.stderr
    (tmp_path / "typo.yaml").write_text("pratoi: 0.1\n")
    r = subprocess.run([sys.executable, os.path.join(root, "attack", "badnet.py"),
                        "--yaml_path", str(tmp_path / "typo.yaml")],
                       capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 2 and "Did you mean 'pratio'" in r.stderr
