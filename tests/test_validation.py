"""One validation layer: bad inputs, unhealthy training, unusable records and unusable data are one clear error
(naming the problem and the fix) before anything is built or written.

  item 2  options checked when the config is resolved (numbers, devices, yaml files, --index files)
  item 3  training health (no optimizer step, divergence on the final weights: nothing saved)
  item 4  records (images outside the record, strict inspector, metrics under --save_name / rho-sweep folders,
          safe loading's allow-list and refusals, --trust_record's warning)
  item 5  data (one class, empty test split, corrupt image, images too large for memory)
"""
from __future__ import annotations

import math
import os
import re
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from bdsafety import engine, registry
from bdsafety.cli import run_cli
from bdsafety.config import POS_INT, Option, parse_config, resolve
from bdsafety.errors import ConfigError, DataError, TrainingDiverged
from bdsafety.safeio import RecordError

COMMON = ["--device", "cpu", "--no_progress"]
ATTACK = ["--dataset", "synthetic", "--model", "cnn_small", "--synthetic_n_train", "200", "--synthetic_n_test", "50",
          "--epochs", "1", "--batch_size", "64", "--lr", "0.05", "--eval_batch_size", "256", *COMMON]
DEFENSE = ["--result_file", "tiny", "--epochs", "1", "--ratio", "0.2", "--batch_size", "32", *COMMON]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    """record/tiny (synthetic, 200 images, cnn_small, 1 epoch) with defense/my_ft/ (FT written with --save_name) and
    defense/ft_rho0.5/ (a sweep folder, named like PAM's --rho_sweep ones): their csv files keep the method's name."""
    root = tmp_path_factory.mktemp("val") / "record"
    registry.get("attack", "badnet").main([*ATTACK, "--record_root", str(root), "--save_folder_name", "tiny"])
    for name in ("my_ft", "ft_rho0.5"):
        registry.get("defense", "ft").main([*DEFENSE, "--record_root", str(root), "--save_name", name])
    return root


def cli(kind: str, name: str, argv: list[str], capsys) -> tuple[int, str]:
    """An entry point as the shell runs it: (exit code, stderr)."""
    code = run_cli(lambda a: registry.get(kind, name).main(a), argv)
    return code, capsys.readouterr().err


# =============================================================================== item 2: options, at resolve time
NUMERIC = [(m.kind, m.name, k) for m in registry.methods() for k, o in m.schema().items() if o.is_numeric()]
# counts for which 0 means nothing happens (an optional phase, e.g. input-aware's clean_train_epochs, may be 0: skipped)
COUNT = re.compile(r"(^epochs|batch_size|rounds|every|queries)$")


def test_every_numeric_option_declares_its_valid_values():
    assert len(NUMERIC) > 50
    unchecked = [f"{k}/{n}.{o}" for k, n, o in NUMERIC if registry.get(k, n).schema()[o].check is None]
    assert unchecked == []


@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "-1", "0"])
def test_every_numeric_option_of_every_entry_point_refuses_bad_numbers(value, tmp_path, monkeypatch):
    """0, -1, nan and inf for every numeric option of every entry point: a ConfigError naming the option, raised by
    the entry point before anything is written (0 is valid only where it means something: pratio 0, wd 0, an optional
    phase of 0 epochs ...; never for a run's epochs, batch sizes, rounds and evaluation intervals)."""
    monkeypatch.chdir(tmp_path)
    accepted = []
    for kind, name, opt in NUMERIC:
        m = registry.get(kind, name)
        argv = [f"--{opt}={value}", "--record_root", str(tmp_path / "record")]
        if "result_file" in m.schema():
            argv += ["--result_file", "tiny"]
        try:
            m.parse(argv)
        except ConfigError as e:
            assert f"'{opt}'" in str(e) and "command line" in str(e), str(e)
            continue
        accepted.append(opt)
    if value in ("nan", "inf", "-inf", "-1"):
        assert accepted == []
    else:
        assert [o for o in accepted if COUNT.search(o)] == []
        assert "epochs" not in accepted and "batch_size" not in accepted and "eval_batch_size" not in accepted
    assert list(tmp_path.iterdir()) == []


def test_bad_number_stops_the_entry_point_with_one_line(tmp_path, capsys):
    code, err = cli("attack", "badnet", [*ATTACK, "--batch_size", "-1", "--record_root", str(tmp_path)], capsys)
    assert code == 2 and err.count("\n") == 1 and "'batch_size' must be an integer >= 1, got -1" in err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("device, ok", [("cpu", True), ("cuda", True), ("cuda:1", True), ("auto", True),
                                        ("gpu", False), ("cuda:x", False), ("cuda:-1", False), ("CPU", False),
                                        ("tpu:0", False), ("", False)])
def test_device_names(device, ok):
    schema = {"device": Option("auto", kind="device")}
    if ok:
        assert resolve(schema, overrides={"device": device}).device == device
    else:
        with pytest.raises(ConfigError, match="not a device name: use auto, cpu, cuda or cuda:N"):
            resolve(schema, overrides={"device": device})


SCHEMA = {"epochs": Option(10, check=POS_INT), "lr": Option(0.01), "name": Option("x")}


@pytest.mark.parametrize("text, match", [
    ("epochs:\nlr: 0.1\n", r"'epochs' has no value; give one .* or delete the line"),
    ("", r"is empty \(or holds only comments\)"),
    ("# only a comment\n  # another\n", r"is empty \(or holds only comments\)"),
    ("lr: 0.1\nepochs: 3\nlr: 0.2\n", r"duplicate key 'lr' \(lines 1 and 3\)"),
    ("epochs: 0\n", r"'epochs' must be an integer >= 1"),
    ("lr: .nan\n", r"'lr' must be a finite number"),
    ("- a\n- b\n", "mapping"),
])
def test_bad_yaml_files_are_named_with_the_problem(tmp_path, text, match):
    p = tmp_path / "c.yaml"
    p.write_text(text)
    with pytest.raises(ConfigError, match=match) as e:
        resolve(SCHEMA, str(p))
    assert str(p) in str(e.value)


INDEX = {"index": Option(None, kind="index_file")}


@pytest.mark.parametrize("content, match", [
    (None, "file not found"),
    ("", "is empty"),
    ("1\nx\n", "not a list of integers"),
    ("1\n2.5\n", "not integers"),
    ("1\n-2\n", "negative index"),
    ("1\n2\n1\n", "repeated"),
    ("1 2\n3 4\n", "columns"),
])
def test_bad_index_files_name_the_flag_and_the_file(tmp_path, content, match):
    p = tmp_path / "index.txt"
    if content is not None:
        p.write_text(content)
    with pytest.raises(ConfigError, match=match) as e:
        parse_config(INDEX, ["--index", str(p)])  # at resolve time: before any record or data is read
    assert "--index" in str(e.value) and str(p) in str(e.value)


def test_index_beyond_the_training_set_is_refused_by_the_defense(tiny, tmp_path, capsys):
    p = tmp_path / "index.txt"
    p.write_text("3\n199\n200\n")
    code, err = cli("defense", "ft",
                    [*DEFENSE, "--record_root", str(tiny), "--index", str(p), "--save_name", "x"], capsys)
    assert code == 2 and "--index" in err and str(p) in err and "beyond the 200 training samples" in err
    assert not (tiny / "tiny" / "defense" / "x").exists()


# =============================================================================== item 3: training health
def _data_model(n=64):
    from bdsafety.data.device import DeviceDataset, Normalizer
    from bdsafety.data.info import dataset_info

    torch.manual_seed(0)
    data = DeviceDataset(torch.randint(0, 256, (n, 3, 8, 8), dtype=torch.uint8), torch.randint(0, 10, (n,)))
    return (data, torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 10)),
            Normalizer(dataset_info("synthetic")))


@pytest.mark.parametrize("epochs, batch_size, n", [(0, 16, 64), (2, 0, 64), (-1, 16, 64), (2, -4, 64), (2, 16, 0)])
def test_a_run_without_optimizer_steps_is_an_error(epochs, batch_size, n):
    data, model, norm = _data_model(n)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with pytest.raises(TrainingDiverged, match="no optimizer step"):
        engine.fit(model, data, norm=norm, epochs=epochs, batch_size=batch_size, step_fn=engine.sgd_step(opt))


def test_divergence_in_the_last_step_is_caught_on_the_final_weights():
    """The loss of every step is finite (it is computed before the update), but the last update makes the weights
    NaN: the epoch's mean loss looks fine, the final-weights check does not."""
    data, model, norm = _data_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    plain = engine.sgd_step(opt)
    calls = []

    def step(m, x, y):
        calls.append(1)
        loss, logits = plain(m, x, y)
        if len(calls) == 8:  # the last step of the last epoch (2 epochs x 4 batches)
            with torch.no_grad():
                m[1].weight[0, 0] = float("nan")
        return loss, logits

    with pytest.raises(TrainingDiverged, match=r"NaN/inf after training \(first: 1.weight\).*nothing .* saved"):
        engine.fit(model, data, norm=norm, epochs=2, batch_size=16, step_fn=step, augment=False)


def test_weights_that_grew_by_orders_of_magnitude_are_a_divergence():
    data, model, norm = _data_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    plain = engine.sgd_step(opt)

    def step(m, x, y):  # every loss finite, then one update blows the weights up (an absurd learning rate's last step)
        loss, logits = plain(m, x, y)
        with torch.no_grad():
            for p in m.parameters():
                p.mul_(1e3)
        return loss, logits

    with pytest.raises(TrainingDiverged, match=r"weights' norm grew .*Lower the learning rate"):
        engine.fit(model, data, norm=norm, epochs=1, batch_size=64, step_fn=step, augment=False)


@pytest.mark.parametrize("kind,name,extra",
                         [("defense", "ft", []), ("retune", "ra", ["--defense", "none", "--poison_num", "2"])])
def test_a_single_step_at_an_absurd_learning_rate_saves_nothing(tiny, capsys, kind, name, extra):
    argv = [*DEFENSE, "--record_root", str(tiny), "--lr", "1e6", "--batch_size", "512", *extra]
    if kind == "retune":
        argv = [a for a in argv if a not in ("--save_name",)] + ["--save_name", "ra_absurd"]
    def listing():  # pool_split.json: the record's attacker/defender split, made on first use (not an output)
        return sorted(p.name for p in (tiny / "tiny").rglob("*") if p.name != "pool_split.json")
    before = listing()
    code, err = cli(kind, name, argv, capsys)
    assert code == 2 and "diverged" in err and "lower the learning rate" in err.lower()
    assert listing() == before


def test_a_diverged_defense_saves_nothing(tiny):
    from bdsafety.defenses.base import DefenseResult, run_defense

    def diverge(ctx):
        with torch.no_grad():
            next(ctx.model.parameters()).fill_(float("nan"))
        return DefenseResult(ctx.model, [{"epoch": 1, "test_acc": 0.5, "test_asr": 0.0}])

    method = SimpleNamespace(name="ft", folder="diverged", run=diverge)
    cfg = registry.get("defense", "ft").parse([*DEFENSE, "--record_root", str(tiny)])
    before = sorted(os.listdir(tiny / "tiny" / "defense"))
    with pytest.raises(TrainingDiverged, match="NaN/inf"):
        run_defense(method, cfg)
    assert sorted(os.listdir(tiny / "tiny" / "defense")) == before  # no folder, no leftover


# =============================================================================== item 4: records
def test_record_using_another_records_images_is_refused_with_how_to_reroot(tiny, tmp_path, capsys):
    root = tmp_path / "record"
    shutil.copytree(tiny / "tiny", root / "tiny", ignore=shutil.ignore_patterns("defense"))
    copy = root / "copy"
    copy.mkdir()
    for f in ("attack_result.pt", "info.pickle"):
        shutil.copy(root / "tiny" / f, copy / f)
    code, err = cli("defense", "ft", [*DEFENSE[2:], "--result_file", "copy", "--record_root", str(root)], capsys)
    assert code == 2 and "Traceback" not in err
    assert "not inside it" in err and "Re-root" in err and f"cp -r {root / 'tiny' / 'bd_train_dataset'}" in err
    assert not (copy / "defense").exists()


def test_inspector_loads_strictly_and_lists_every_defense_folder(tiny, tmp_path, capsys):
    from bdsafety.inspector import main

    assert main([str(tiny / "tiny")]) == 0
    out = capsys.readouterr().out
    for name in ("my_ft", "ft_rho0.5"):  # metrics found although the csv files are named ft_df_summary.csv
        line = next(ln for ln in out.splitlines() if ln.strip().startswith(name))
        assert "test_acc -" not in line and re.search(r"test_acc \d\.\d{4}", line)
    # a model that no tool could load: non-zero exit, one line
    bad = tmp_path / "record" / "bad"
    shutil.copytree(tiny / "tiny", bad)
    result = torch.load(bad / "attack_result.pt", weights_only=False)
    result["model"].popitem()
    torch.save(result, bad / "attack_result.pt")
    assert main([str(bad)]) != 0
    err = capsys.readouterr().err
    assert "cannot be loaded as a cnn_small" in err and "missing" in err and "Traceback" not in err


def test_report_finds_save_name_and_rho_sweep_folders(tiny):
    from bdsafety.study.record_report import collect, rho_sweep

    df = collect(str(tiny / "tiny"))
    assert {"my_ft", "ft_rho0.5"} <= set(df.index)
    assert not math.isnan(df.loc["my_ft", "test_acc"]) and not math.isnan(df.loc["ft_rho0.5", "test_asr"])
    sweep = rho_sweep(str(tiny / "tiny"))
    assert list(sweep.index) == [0.5] and not math.isnan(sweep.loc[0.5, "test_acc"])


class _Unknown:
    pass


class _Runs:
    def __reduce__(self):
        return (os.system, ("echo CODE-RAN 1>&2",))


@pytest.mark.parametrize("value", [np.array([]), np.zeros(0, np.int64), np.zeros((0, 3), np.float32),
                                   np.zeros(3, bool), np.arange(4, dtype=np.uint8), np.float32(1.5), np.bool_(True)])
def test_safe_loading_accepts_every_numpy_value_the_project_writes(tmp_path, value):
    from bdsafety.outputs import write_artifact
    from bdsafety.safeio import safe_torch_load

    write_artifact(tmp_path / "x.pt", {"v": value})  # refuses what safe loading could not read back
    got = safe_torch_load(tmp_path / "x.pt")["v"]
    np.testing.assert_array_equal(got, value)


def test_refusals_tell_unknown_content_from_code_and_trust_record_warns_first(tmp_path, capfd):
    from bdsafety.safeio import safe_torch_load

    torch.save({"x": _Unknown()}, tmp_path / "unknown.pt")
    torch.save({"x": _Runs()}, tmp_path / "evil.pt")
    with pytest.raises(RecordError) as e:
        safe_torch_load(tmp_path / "unknown.pt")
    assert "unknown type" in str(e.value) and "_Unknown" in str(e.value) and "CAN EXECUTE CODE" not in str(e.value)
    with pytest.raises(RecordError) as e:
        safe_torch_load(tmp_path / "evil.pt")
    assert "CAN EXECUTE CODE" in str(e.value) and "system" in str(e.value) and "Nothing was run" in str(e.value)
    assert "CODE-RAN" not in capfd.readouterr().err
    safe_torch_load(tmp_path / "evil.pt", trust_record=True)  # the user's explicit choice: it runs, after a warning
    err = capfd.readouterr().err
    assert "--trust_record" in err and "code" in err and err.index("--trust_record") < err.index("CODE-RAN")


# =============================================================================== item 5: data
def _folder(tmp_path, **kw):
    from tests.fake_datasets import make_fake_imagefolder

    root = str(tmp_path / "mine")
    make_fake_imagefolder(root, **kw)
    return root


def test_one_class_is_refused_before_training(tmp_path, capsys):
    root = _folder(tmp_path, classes=("only",), n_train_per_class=2, n_test_per_class=1)
    argv = ["--dataset", "imagefolder", "--dataset_path", str(tmp_path), "--model", "cnn_small", "--epochs", "1",
            "--record_root", str(tmp_path / "record"), *COMMON]
    os.rename(root, tmp_path / "imagefolder")
    code, err = cli("attack", "badnet", argv, capsys)
    assert code == 2 and "1 class(es)" in err and "at least two classes" in err and "Traceback" not in err
    assert not (tmp_path / "record").exists()


def test_empty_test_split_is_refused(tmp_path):
    from bdsafety.data.datasets import load_clean_dataset

    root = _folder(tmp_path, classes=("a", "b"), n_train_per_class=1, n_test_per_class=1)
    for f in Path(root, "test").rglob("*"):
        if f.is_file():
            f.unlink()
    with pytest.raises(DataError, match="test split is empty"):
        load_clean_dataset("imagefolder", root)


def test_corrupt_first_image_is_named(tmp_path):
    from bdsafety.data.datasets import load_clean_dataset

    root = _folder(tmp_path, classes=("a", "b"), n_train_per_class=1, n_test_per_class=1)
    first = sorted(p for p in Path(root, "train", "a").iterdir() if p.suffix in (".png", ".bmp"))[0]
    first.write_bytes(b"not an image")
    with pytest.raises(DataError, match=re.escape(str(first))):
        load_clean_dataset("imagefolder", root)


def test_image_size_too_large_for_memory_is_refused_before_decoding(tmp_path):
    from bdsafety.data.datasets import load_clean_dataset

    root = _folder(tmp_path, classes=("a", "b"), n_train_per_class=1, n_test_per_class=1)
    with pytest.raises(DataError, match=r"GiB of memory.*smaller img_size"):
        load_clean_dataset("imagefolder", root, img_size=(1_000_000, 1_000_000))
    assert not Path(root, ".bdsafety_cache").exists()
    with pytest.raises(DataError, match="synthetic_n_train"):
        load_clean_dataset("synthetic", "unused", n_train=10**9, n_test=10)


def test_unknown_model_name_is_refused_at_resolve_time(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown model 'presnet18'.*did you mean .*'resnet18'.*cnn_small"):
        registry.get("attack", "badnet").parse(["--model", "presnet18", "--record_root", str(tmp_path)])
    with pytest.raises(ConfigError, match="unknown model 'x/y'"):
        registry.get("defense", "ft").parse(["--model", "x/y", "--result_file", "tiny"])
    assert list(tmp_path.iterdir()) == []


def _damaged_copy(tiny, tmp_path, name: str, change) -> Path:
    root = tmp_path / "record"
    shutil.copytree(tiny / "tiny", root / name, ignore=shutil.ignore_patterns("defense"))
    change(root / name)
    return root


def test_user_mistakes_with_records_are_one_line_errors_that_say_what_to_do(tiny, tmp_path, capsys):
    ra = ["--defense", "none", "--epochs", "1", "--ratio", "0.2", "--no_progress"]
    # a defense folder given as the record
    code, err = cli("retune", "ra", [*ra, "--result_file", str(tiny / "tiny" / "defense" / "my_ft")], capsys)
    assert code == 2 and f"--result_file {tiny / 'tiny'} --defense my_ft" in err
    # a model name the record holds and no tool builds: say it comes from the record

    def rename(d):
        r = torch.load(d / "attack_result.pt", weights_only=False)
        r["model_name"] = "resnet_999"
        torch.save(r, d / "attack_result.pt")
    root = _damaged_copy(tiny, tmp_path, "renamed", rename)
    code, err = cli("retune", "ra", [*ra, "--result_file", "renamed", "--record_root", str(root)], capsys)
    assert code == 2 and "its attack_result.pt names model 'resnet_999'" in err and "Traceback" not in err
    # a state_dict holding a non-tensor

    def non_tensor(d):
        r = torch.load(d / "attack_result.pt", weights_only=False)
        r["model"][next(iter(r["model"]))] = "text"
        torch.save(r, d / "attack_result.pt")
    root = _damaged_copy(tiny, tmp_path, "nontensor", non_tensor)
    code, err = cli("retune", "ra", [*ra, "--result_file", "nontensor", "--record_root", str(root)], capsys)
    assert code == 2 and "not tensors" in err and "Traceback" not in err
    # synthetic data without its info.pickle: the settings are lost, not the folder
    root = _damaged_copy(tiny, tmp_path, "noinfo", lambda d: (d / "info.pickle").unlink())
    code, err = cli("retune", "ra", [*ra, "--result_file", "noinfo", "--record_root", str(root)], capsys)
    assert code == 2 and "info.pickle" in err and "--dataset_path" not in err


def test_inspector_exits_non_zero_for_a_record_without_poisoned_test_samples(tiny, tmp_path, capsys):
    from bdsafety.inspector import main

    def empty_bd_test(d):
        r = torch.load(d / "attack_result.pt", weights_only=False)
        r["bd_test"]["original_index_array"] = np.zeros(0, dtype=np.int64)
        torch.save(r, d / "attack_result.pt")
    root = _damaged_copy(tiny, tmp_path, "nobd", empty_bd_test)
    assert main([str(root / "nobd")]) != 0 and "no poisoned test sample" in capsys.readouterr().err


def test_a_full_disk_names_the_path_and_keeps_nothing_half_written(tmp_path, monkeypatch):
    import errno

    from bdsafety import safeio

    def full(obj, f):
        f.write(b"x" * 1000)
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(safeio.torch, "save", full)
    with pytest.raises(safeio.DiskFull, match=r"while writing model.pt \(at least 1,000 bytes were needed"):
        safeio.atomic_torch_save({"a": 1}, tmp_path / "model.pt")
    assert list(tmp_path.iterdir()) == []


def test_a_vit_opened_at_another_input_size_says_which_it_was_trained_at():
    from bdsafety.experiment import _input_size_hint

    sd = {"encoder.pos_embedding": torch.zeros(1, 5, 8), "conv_proj.weight": torch.zeros(8, 3, 16, 16)}  # (32/16)^2 + 1
    assert "trained at 32 px" in _input_size_hint(sd, None) and "--model_input_size 32" in _input_size_hint(sd, 224)
    assert _input_size_hint(sd, 32) == "" and _input_size_hint({"w": torch.zeros(1)}, None) == ""


@pytest.mark.slow
def test_the_inspector_piped_into_head_stops_quietly(tiny):
    import subprocess
    import sys

    p = subprocess.run(f"{sys.executable} -m bdsafety.records {tiny / 'tiny'} | head -1", shell=True,
                       capture_output=True, text=True, timeout=120, cwd=Path(__file__).resolve().parent.parent)
    assert p.stdout.startswith("record") and "Traceback" not in p.stderr and "BrokenPipe" not in p.stderr
