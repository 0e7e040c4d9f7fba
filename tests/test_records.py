"""Record I/O: BackdoorBench compatibility (v2.0 / v2.2), safe loading, atomic writes, csv summaries, inspector."""
from __future__ import annotations

import os
import pickle
import shutil
from collections import OrderedDict
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from bb_records import (
    ATTACK_SUMMARY_CSV,
    assert_matches_schema,
    load_schema,
    make_bb_v20_record,
    make_bb_v22_record,
    tiny_state_dict,
)

from bdsafety.data.poisoned import PoisonedSplit
from bdsafety.inspector import main
from bdsafety.records import (
    list_defenses,
    load_attack_record,
    load_model_result,
    read_metrics_summary,
    resolve_record_dir,
    save_attack_record,
    save_model_result,
    write_metrics_csv,
)
from bdsafety.safeio import RecordError, atomic_torch_save, atomic_write_text, safe_torch_load

pytestmark = pytest.mark.usefixtures("one_thread")


class Benign:
    """A custom class: not on the allow-list, harmless to unpickle."""

    def __init__(self, value):
        self.value = value


class RunsCommand:
    """Unpickling this calls os.system: the classic malicious pickle."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def assert_split_equal(got: PoisonedSplit | None, want: PoisonedSplit | None) -> None:
    if want is None:
        assert got is None
        return
    np.testing.assert_array_equal(got.indices, want.indices)
    np.testing.assert_array_equal(got.images, want.images)
    np.testing.assert_array_equal(got.bd_labels, want.bd_labels)
    np.testing.assert_array_equal(got.orig_labels, want.orig_labels)
    assert got.length == want.length
    assert got.images.dtype == np.uint8


def assert_state_equal(got, want) -> None:
    assert list(got) == list(want)
    for k in want:
        assert torch.equal(got[k], want[k]), k


def random_split(rng, length, n, img_size=(8, 8, 3), num_classes=10, target=0) -> PoisonedSplit:
    idx = np.sort(rng.choice(length, n, replace=False))
    orig = rng.integers(0, num_classes, n)
    return PoisonedSplit(indices=idx, images=rng.integers(0, 256, (n, *img_size), dtype=np.uint8),
                         bd_labels=np.full(n, target), orig_labels=orig, length=length)


def save_demo_record(record_dir: Path, seed: int = 0, with_train: bool = True):
    rng = np.random.default_rng(seed)
    bd_train = random_split(rng, 50, 6) if with_train else None
    bd_test = random_split(rng, 20, 12)
    state = tiny_state_dict(10, seed)
    info = {"attack": "badnet", "attack_target": 0, "pratio": 0.12, "attack_label_trans": "all2one",
            "img_size": (8, 8, 3), "terminal_info": ["attack/badnet.py"], "lr": 0.01}
    save_attack_record(record_dir, model_state=state, model_name="preactresnet18", num_classes=10,
                       clean_data="cifar10", data_path="./data/cifar10", img_size=(8, 8, 3),
                       bd_train=bd_train, bd_test=bd_test, info=info)
    return state, bd_train, bd_test, info


# ----------------------------------------------------------------------------------------------- fixture structure

@pytest.mark.parametrize("make", [make_bb_v22_record, make_bb_v20_record])
def test_hand_made_records_match_the_fixture(tmp_path, make):
    schema = load_schema()
    rec = make(tmp_path)
    result = torch.load(rec.record_dir / "attack_result.pt", weights_only=False)
    assert_matches_schema(result, schema)
    info = torch.load(rec.record_dir / "info.pickle", weights_only=False)
    assert sorted(info) == sorted(schema["_info.pickle_keys"])


def test_schema_checker_catches_wrong_types(tmp_path):
    schema = load_schema()
    rec = make_bb_v22_record(tmp_path)
    result = torch.load(rec.record_dir / "attack_result.pt", weights_only=False)
    bad_keys = dict(result)
    bad_keys["bd_test"] = dict(result["bd_test"])
    bad_keys["bd_test"]["data_dict"] = bad_keys["bd_test"]["bd_data_container"]["data_dict"]
    with pytest.raises(AssertionError, match="keys"):
        assert_matches_schema(bad_keys, schema)
    bad_dtype = dict(result, bd_train=dict(result["bd_train"], poison_indicator=np.zeros(40, dtype=np.int64)))
    with pytest.raises(AssertionError, match="dtype"):
        assert_matches_schema(bad_dtype, schema)
    container = result["bd_test"]["bd_data_container"]
    python_keys = {int(k): v for k, v in container["data_dict"].items()}
    bad_key_type = dict(result,
                        bd_test=dict(result["bd_test"], bd_data_container=dict(container, data_dict=python_keys)))
    with pytest.raises(AssertionError, match="int64"):
        assert_matches_schema(bad_key_type, schema)


def test_v20_builder_writes_numpy1_globals(tmp_path):
    rec = make_bb_v20_record(tmp_path)
    found = torch.serialization.get_unsafe_globals_in_checkpoint(str(rec.record_dir / "attack_result.pt"))
    assert "numpy.core.multiarray._reconstruct" in found
    assert not any(g.startswith("numpy._core") for g in found)


# ----------------------------------------------------------------------------------------------- round trip

def test_save_then_load_round_trip(tmp_path):
    record_dir = tmp_path / "record" / "my_attack"
    state, bd_train, bd_test, info = save_demo_record(record_dir)
    rec = load_attack_record(record_dir)
    assert ((rec.model_name, rec.num_classes, rec.clean_data, rec.data_path)
            == ("preactresnet18", 10, "cifar10", "./data/cifar10"))
    assert rec.img_size == (8, 8, 3)
    assert_state_equal(rec.state_dict, state)
    assert_split_equal(rec.bd_train, bd_train)
    assert_split_equal(rec.bd_test, bd_test)
    assert rec.info == info
    assert (rec.attack, rec.attack_target, rec.pratio, rec.attack_label_trans) == ("badnet", 0, 0.12, "all2one")


def test_saved_record_has_backdoorbench_structure(tmp_path):
    schema = load_schema()
    record_dir = tmp_path / "record" / "my_attack"
    _, bd_train, bd_test, _ = save_demo_record(record_dir)
    result = torch.load(record_dir / "attack_result.pt", weights_only=False)
    assert_matches_schema(result, schema)
    tr, te = result["bd_train"], result["bd_test"]
    assert tr["save_folder_path"] == "./record/my_attack/bd_train_dataset"
    assert tr["bd_data_container"]["save_folder_path"] == tr["save_folder_path"]
    i, o, b = int(bd_train.indices[0]), int(bd_train.orig_labels[0]), int(bd_train.bd_labels[0])
    entry = tr["bd_data_container"]["data_dict"][np.int64(i)]
    assert entry == {"path": f"./record/my_attack/bd_train_dataset/{o}/{i}.png", "other_info": [b, o]}
    np.testing.assert_array_equal(tr["original_index_array"], np.arange(50))
    np.testing.assert_array_equal(te["original_index_array"], bd_test.indices)  # bd_test: poisoned indices only
    assert te["poison_indicator"].shape == (20,) and te["poison_indicator"].sum() == 12
    np.testing.assert_array_equal(np.flatnonzero(tr["poison_indicator"]), bd_train.indices)
    # PNGs are RGB on disk (BackdoorBench writes them with PIL): read back with cv2 as BGR
    png = cv2.imread(str(record_dir / "bd_train_dataset" / str(o) / f"{i}.png"))
    np.testing.assert_array_equal(png[:, :, ::-1], bd_train.images[0])
    assert result["model"]["linear.weight"].device.type == "cpu"


def test_values_safe_loading_would_refuse_are_not_written(tmp_path):
    record_dir = tmp_path / "record" / "r"
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="info.*PosixPath"):
        save_attack_record(record_dir, model_state=tiny_state_dict(), model_name="preactresnet18", num_classes=10,
                           clean_data="cifar10", data_path="./data/cifar10", img_size=(8, 8, 3), bd_train=None,
                           bd_test=random_split(rng, 20, 5), info={"save_path": tmp_path})
    assert not record_dir.exists()
    with pytest.raises(ValueError, match="defense_result.pt.*Benign"):
        save_model_result(tmp_path / "defense_result.pt", tiny_state_dict(), "preactresnet18", 10, extra=Benign(1))
    assert not (tmp_path / "defense_result.pt").exists()


def test_record_without_bd_train(tmp_path):
    record_dir = tmp_path / "record" / "lira_like"
    save_demo_record(record_dir, with_train=False)
    assert torch.load(record_dir / "attack_result.pt", weights_only=False)["bd_train"] is None
    assert not (record_dir / "bd_train_dataset").exists()
    assert load_attack_record(record_dir).bd_train is None


def test_resave_replaces_old_pngs(tmp_path):
    record_dir = tmp_path / "record" / "r"
    save_demo_record(record_dir, seed=0)
    _, bd_train, bd_test, _ = save_demo_record(record_dir, seed=1)
    pngs = sorted(p.relative_to(record_dir / "bd_train_dataset")
                  for p in (record_dir / "bd_train_dataset").rglob("*.png"))
    assert pngs == sorted(Path(str(o)) / f"{i}.png" for i, o in zip(bd_train.indices, bd_train.orig_labels))
    assert [p.name for p in record_dir.iterdir() if p.name.startswith(".")] == []
    assert_split_equal(load_attack_record(record_dir).bd_test, bd_test)


# ----------------------------------------------------------------------------------------------- BackdoorBench records

@pytest.mark.parametrize("make", [make_bb_v22_record, make_bb_v20_record])
def test_backdoorbench_records_load_after_moving(tmp_path, make):
    rec = make(tmp_path / "bb", "badnet_demo")
    moved = tmp_path / "somewhere" / "else" / "renamed"
    moved.parent.mkdir(parents=True)
    shutil.move(str(rec.record_dir), str(moved))
    got = load_attack_record(moved)
    assert_split_equal(got.bd_train, rec.bd_train)
    assert_split_equal(got.bd_test, rec.bd_test)
    assert_state_equal(got.state_dict, rec.state_dict)
    assert got.info == rec.info and got.attack_target == 0 and got.pratio == 0.1


def test_all2all_record(tmp_path):
    rec = make_bb_v22_record(tmp_path, label_trans="all2all", n_test=15)
    got = load_attack_record(rec.record_dir)
    assert len(got.bd_test) == 15
    np.testing.assert_array_equal(got.bd_test.bd_labels, (got.bd_test.orig_labels + 1) % 10)
    assert got.attack_label_trans == "all2all"


def test_images_of_another_record_are_refused_with_how_to_reroot(tmp_path):
    """A record folder copied without its PNGs whose stored paths ('./record/<orig>/...') point at another record's
    images is refused (never trained or evaluated on silently); copying the image folders in, as the message says,
    makes it load."""
    rec = make_bb_v22_record(tmp_path, "orig")
    copy = tmp_path / "record" / "copy"
    copy.mkdir()
    for f in ("attack_result.pt", "info.pickle"):
        shutil.copy(rec.record_dir / f, copy / f)
    with pytest.raises(RecordError, match=r"not inside it.*Re-root.*cp -r") as e:
        load_attack_record(copy)
    assert str(rec.record_dir / "bd_train_dataset") in str(e.value)
    for sub in ("bd_train_dataset", "bd_test_dataset"):
        shutil.copytree(rec.record_dir / sub, copy / sub)
    assert_split_equal(load_attack_record(copy).bd_test, rec.bd_test)


def test_a_copy_whose_image_folders_are_symlinks_into_another_record_is_refused(tmp_path):
    """However the copy was made: image folders symlinked (``cp -rs``, ``ln -s``) into the original record are that
    record's images, not the copy's."""
    rec = make_bb_v22_record(tmp_path, "orig")
    copy = tmp_path / "record" / "copy"
    copy.mkdir()
    for f in ("attack_result.pt", "info.pickle"):
        shutil.copy(rec.record_dir / f, copy / f)
    for sub in ("bd_train_dataset", "bd_test_dataset"):
        (copy / sub).symlink_to(rec.record_dir / sub, target_is_directory=True)
    with pytest.raises(RecordError, match=r"not inside it.*Re-root"):
        load_attack_record(copy)


def test_module_prefix_is_stripped(tmp_path):
    rec = make_bb_v22_record(tmp_path, module_prefix=True)
    assert next(iter(rec.state_dict)).startswith("module.")
    assert list(load_attack_record(rec.record_dir).state_dict) == list(tiny_state_dict())


def test_missing_info_pickle_warns(tmp_path):
    rec = make_bb_v22_record(tmp_path, with_info=False)
    with pytest.warns(UserWarning, match="info.pickle is missing"):
        got = load_attack_record(rec.record_dir)
    assert got.info == {} and got.attack_target is None and got.pratio is None


def test_png_of_another_size_is_resized(tmp_path):
    rec = make_bb_v22_record(tmp_path)
    i, o = int(rec.bd_test.indices[0]), int(rec.bd_test.orig_labels[0])
    cv2.imwrite(str(rec.record_dir / "bd_test_dataset" / str(o) / f"{i}.png"), np.full((16, 16, 3), 200, np.uint8))
    got = load_attack_record(rec.record_dir)
    assert got.bd_test.images.shape[1:] == (8, 8, 3)
    assert (got.bd_test.images[0] == 200).all()


# ----------------------------------------------------------------------------------------------- safe loading

def test_plain_weights_only_refuses_but_safe_load_accepts(tmp_path):
    for rec in (make_bb_v22_record(tmp_path / "a"), make_bb_v20_record(tmp_path / "b")):
        path = rec.record_dir / "attack_result.pt"
        with pytest.raises(pickle.UnpicklingError):
            torch.load(path, weights_only=True)
        result = safe_torch_load(path)
        assert result["bd_test"]["poison_indicator"].dtype == np.float64
        assert all(type(k) is np.int64 for k in result["bd_test"]["bd_data_container"]["data_dict"])


def test_custom_class_is_refused_unless_trusted(tmp_path):
    path = tmp_path / "custom.pt"
    torch.save({"obj": Benign(3)}, path)
    with pytest.raises(RecordError) as e:
        safe_torch_load(path)
    msg = str(e.value)
    assert str(path) in msg and "Benign" in msg and "trust_record" in msg
    assert safe_torch_load(path, trust_record=True)["obj"].value == 3


def test_code_execution_pickle_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"x": RunsCommand(marker)}, path)
    with pytest.raises(RecordError, match="trust_record") as e:
        safe_torch_load(path)
    assert "system" in str(e.value)
    assert not marker.exists()


@pytest.mark.parametrize("damage, expect", [
    (lambda p: p.write_bytes(p.read_bytes()[: len(p.read_bytes()) // 2]), "truncated or corrupt"),
    (lambda p: p.write_bytes(b""), "empty"),
    (lambda p: p.write_text("model weights, honest\n"), "not a file written by torch.save"),
    (lambda p: p.unlink(), "no attack_result.pt"),
])
def test_damaged_attack_result_is_a_record_error(tmp_path, damage, expect):
    rec = make_bb_v22_record(tmp_path)
    damage(rec.record_dir / "attack_result.pt")
    with pytest.raises(RecordError, match=expect) as e:
        load_attack_record(rec.record_dir)
    assert "attack_result.pt" in str(e.value)


def test_safe_torch_load_missing_file(tmp_path):
    with pytest.raises(RecordError, match="does not exist"):
        safe_torch_load(tmp_path / "nope.pt")


def test_missing_record_folder_names_the_command(tmp_path):
    with pytest.raises(RecordError, match="python attack/badnet.py .*--save_folder_name ghost"):
        load_attack_record(tmp_path / "record" / "ghost")
    (tmp_path / "record" / "half").mkdir(parents=True)
    with pytest.raises(RecordError, match="no attack_result.pt.*--save_folder_name half"):
        load_attack_record(tmp_path / "record" / "half")


def test_missing_png_is_reported_with_count(tmp_path):
    rec = make_bb_v22_record(tmp_path)
    pngs = sorted((rec.record_dir / "bd_test_dataset").rglob("*.png"))
    for p in pngs[:2]:
        p.unlink()
    with pytest.raises(RecordError, match=rf"2 of {len(rec.bd_test)} poisoned bd_test images are missing") as e:
        load_attack_record(rec.record_dir)
    assert any(str(p.name) in str(e.value) for p in pngs[:2])


def test_missing_keys_are_listed(tmp_path):
    rec = make_bb_v22_record(tmp_path)
    path = rec.record_dir / "attack_result.pt"
    result = torch.load(path, weights_only=False)
    del result["img_size"], result["bd_test"]
    torch.save(result, path)
    with pytest.raises(RecordError, match="img_size, bd_test"):
        load_attack_record(rec.record_dir)
    result = torch.load(path, weights_only=False)
    result.update(img_size=(8, 8, 3), bd_test={"getitem_all": True})
    torch.save(result, path)
    with pytest.raises(RecordError, match="bd_test lacks the keys bd_data_container, "
                                          "original_index_array, poison_indicator"):
        load_attack_record(rec.record_dir)


# ----------------------------------------------------------------------------------------------- atomic writes

def _partial_then_fail(obj, f):
    f.write(b"PK\x03\x04 half of a checkpoint")
    raise OSError("disk full")


def test_atomic_save_crash_keeps_previous_content(tmp_path, monkeypatch):
    target = tmp_path / "defense_result.pt"
    atomic_torch_save({"v": 1}, target)
    monkeypatch.setattr(torch, "save", _partial_then_fail)
    with pytest.raises(OSError, match="disk full"):
        atomic_torch_save({"v": 2}, target)
    monkeypatch.undo()
    assert torch.load(target) == {"v": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["defense_result.pt"]


def test_atomic_save_crash_leaves_no_file(tmp_path, monkeypatch):
    monkeypatch.setattr(torch, "save", _partial_then_fail)
    with pytest.raises(OSError):
        atomic_torch_save({"v": 2}, tmp_path / "sub" / "x.pt")
    assert list((tmp_path / "sub").iterdir()) == []


def test_atomic_write_text_replaces_and_keeps_permissions(tmp_path):
    p = tmp_path / "a.txt"
    atomic_write_text(p, "one")
    atomic_write_text(p, "two")
    assert p.read_text() == "two"
    umask = os.umask(0)
    os.umask(umask)
    assert p.stat().st_mode & 0o777 == 0o666 & ~umask


def test_interrupted_attack_record_never_looks_complete(tmp_path, monkeypatch):
    record_dir = tmp_path / "record" / "r"
    save_demo_record(record_dir)
    calls = {"n": 0}
    real_imwrite = cv2.imwrite

    def flaky_imwrite(path, img):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real_imwrite(path, img)

    monkeypatch.setattr(cv2, "imwrite", flaky_imwrite)
    with pytest.raises(KeyboardInterrupt):
        save_demo_record(record_dir, seed=1)
    assert not (record_dir / "attack_result.pt").exists()
    assert [p.name for p in record_dir.iterdir() if p.name.startswith(".")] == []
    with pytest.raises(RecordError, match="no attack_result.pt"):
        load_attack_record(record_dir)


# ----------------------------------------------------------------------------------------------- metrics csv

def test_metrics_csv_in_backdoorbench_format(tmp_path):
    rows = [
        {"epoch": 0, "train_loss": 2.5, "test_acc": 0.5, "test_asr": float("nan"), "lr": None},
        {"epoch": 1, "train_loss": np.float64(1.25), "test_acc": torch.tensor(0.75), "test_asr": 0.25},
        {"epoch": 2, "train_loss": 1.0, "test_acc": 0.625, "test_asr": float("nan")},
    ]
    df_path, summary_path = write_metrics_csv(rows, tmp_path, "pam")
    assert df_path.name == "pam_df.csv" and summary_path.name == "pam_df_summary.csv"
    assert df_path.read_text() == (
        ",epoch,train_loss,test_acc,test_asr\n"
        "0,0,2.5,0.5,nan_value\n"
        "1,1,1.25,0.75,0.25\n"
        "2,2,1.0,0.625,nan_value\n"
    )
    assert summary_path.read_text() == (
        ",epoch,train_loss,test_acc,test_asr\n"
        "last,2,1.0,0.625,nan_value\n"
        "valid_max,2,2.5,0.75,0.25\n"
        "exist_nan_value,False,False,False,True\n"
    )
    last = read_metrics_summary(tmp_path, "pam")
    assert last["epoch"] == 2.0 and last["test_acc"] == 0.625 and np.isnan(last["test_asr"])
    assert all(type(v) is float for v in last.values())


def test_read_metrics_summary_of_backdoorbench_csv(tmp_path):
    (tmp_path / "attack_df_summary.csv").write_text(ATTACK_SUMMARY_CSV)
    assert read_metrics_summary(tmp_path, "attack") == {
        "epoch": 1.0, "train_epoch_loss_avg_over_batch": 0.53125, "test_acc": 0.875, "test_asr": 0.96875,
        "test_ra": 0.03125}
    with pytest.raises(RecordError, match="ft_df_summary.csv not found"):
        read_metrics_summary(tmp_path, "ft")


def test_write_metrics_csv_needs_rows(tmp_path):
    with pytest.raises(ValueError, match="no rows"):
        write_metrics_csv([], tmp_path, "x")


# ----------------------------------------------------------------------------------------------- defense outputs

def test_model_results_and_defense_listing(tmp_path):
    record_dir = tmp_path / "record" / "r"
    state = OrderedDict((k, v.requires_grad_(False)) for k, v in tiny_state_dict().items())
    save_model_result(record_dir / "defense" / "pam" / "defense_result.pt", state, "preactresnet18", 10, rho=0.5)
    (record_dir / "defense" / "half_done").mkdir()
    save_model_result(record_dir / "defense" / "ft" / "defense_result.pt", state, "preactresnet18", 10)
    assert list_defenses(record_dir) == ["ft", "pam"]
    assert list_defenses(tmp_path / "none") == []
    got = load_model_result(record_dir / "defense" / "pam" / "defense_result.pt")
    assert got["model_name"] == "preactresnet18" and got["num_classes"] == 10 and got["rho"] == 0.5
    assert_state_equal(got["model"], state)
    torch.save({"model_name": "x", "model": state}, tmp_path / "bad.pt")
    with pytest.raises(RecordError, match="lacks the keys num_classes"):
        load_model_result(tmp_path / "bad.pt")


def test_resolve_record_dir(tmp_path, monkeypatch):
    (tmp_path / "record" / "a").mkdir(parents=True)
    (tmp_path / "record" / "b").mkdir()
    monkeypatch.chdir(tmp_path)
    assert resolve_record_dir("a") == Path("record/a")
    assert resolve_record_dir(str(tmp_path / "record" / "b")) == tmp_path / "record" / "b"
    with pytest.raises(RecordError, match="records under record: a, b"):
        resolve_record_dir("c")
    with pytest.raises(RecordError, match="no records under"):
        resolve_record_dir("c", record_root=tmp_path / "empty")


# ----------------------------------------------------------------------------------------------- inspector

def _with_real_model(rec, model_name: str = "cnn_small"):
    """Give a hand-made record the full weights of a registered model (the builders store a few tensors only, which
    the inspector's strict load rightly refuses); returns the new state_dict."""
    from bdsafety.models import build_model

    path = rec.record_dir / "attack_result.pt"
    result = torch.load(path, weights_only=False)
    state = build_model(model_name, int(result["num_classes"]), tuple(result["img_size"])).state_dict()
    result.update(model_name=model_name, model=state)
    torch.save(result, path)
    return state


def test_inspector_prints_record_and_defenses(tmp_path, monkeypatch, capsys):
    rec = make_bb_v20_record(tmp_path)
    _with_real_model(rec)
    defense = rec.record_dir / "defense"
    save_model_result(defense / "ft" / "defense_result.pt", rec.state_dict, "preactresnet18", 10)
    write_metrics_csv([{"epoch": 0, "test_acc": 0.8125, "test_asr": 0.0625, "test_ra": 0.75}], defense / "ft", "ft")
    write_metrics_csv([{"epoch": 0, "test_acc": 0.75, "test_asr": 0.875, "test_ra": 0.125}],
                      defense / "ft" / "ra", "ra")
    save_model_result(defense / "pam" / "defense_result.pt", rec.state_dict, "preactresnet18", 10)
    monkeypatch.chdir(tmp_path)
    assert main(["badnet_demo"]) == 0
    out = capsys.readouterr().out
    lines = {line.split()[0]: line for line in out.splitlines() if line.strip() and "+RA" not in line}
    assert "cnn_small" in lines["model"] and "cifar10" in lines["dataset"]
    assert lines["classes"].split()[-1] == "10" and lines["img_size"].split()[-1] == "8x8x3"
    assert lines["target"].split()[-1] == "0" and lines["pratio"].split()[-1] == "0.1"
    assert "all2one" in out
    assert f"train {len(rec.bd_train)} of 40, test {len(rec.bd_test)} of 20" in lines["poisoned"]
    assert "test_acc 0.8750  test_asr 0.9688  test_ra 0.0312" in out  # from attack_df_summary.csv
    assert "ft" in lines and "test_acc 0.8125  test_asr 0.0625  test_ra 0.7500" in lines["ft"]
    ra = next(line for line in out.splitlines() if "ft +RA" in line)
    assert "test_acc 0.7500  test_asr 0.8750  test_ra 0.1250" in ra
    assert "test_acc -  test_asr -  test_ra -" in lines["pam"]


def test_inspector_on_broken_record(tmp_path, monkeypatch, capsys):
    rec = make_bb_v22_record(tmp_path)
    next((rec.record_dir / "bd_train_dataset").rglob("*.png")).unlink()
    assert main([str(rec.record_dir)]) != 0
    err = capsys.readouterr().err
    assert "error:" in err and "1 of 4 poisoned bd_train images are missing" in err and "Traceback" not in err
    monkeypatch.chdir(tmp_path)
    assert main(["ghost"]) != 0
    assert "records under record: badnet_demo" in capsys.readouterr().err


def test_inspector_refuses_untrusted_record_until_trusted(tmp_path, capsys):
    rec = make_bb_v22_record(tmp_path)
    _with_real_model(rec)
    info = torch.load(rec.record_dir / "info.pickle", weights_only=False)
    info["extra"] = Benign(1)
    torch.save(info, rec.record_dir / "info.pickle")
    assert main([str(rec.record_dir)]) != 0
    assert "--trust_record" in capsys.readouterr().err
    assert main([str(rec.record_dir), "--trust_record"]) == 0


def test_python_m_bdsafety_records_is_the_inspector(tmp_path):
    """The README's `python -m bdsafety.records RECORD` runs the inspector (records.py's __main__ guard)."""
    import subprocess
    import sys

    rec = make_bb_v22_record(tmp_path)
    _with_real_model(rec)
    done = subprocess.run([sys.executable, "-m", "bdsafety.records", str(rec.record_dir)], capture_output=True,
                          text=True, cwd=str(tmp_path))
    assert done.returncode == 0 and "architecture" in done.stdout, done.stderr
    bad = subprocess.run([sys.executable, "-m", "bdsafety.records", str(tmp_path / "nope")], capture_output=True,
                         text=True, cwd=str(tmp_path))
    assert bad.returncode != 0 and "not found" in bad.stderr and "Traceback" not in bad.stderr


@pytest.mark.parametrize("field,value,match", [
    ("num_classes", "ten", "num_classes is 'ten', not an integer"),
    ("num_classes", 1, "num_classes is 1, expected an integer >= 2"),
    ("img_size", (100000, 100000, 3), r"img_size is 100000, expected an integer in \[1, 4096\]"),
    ("img_size", (32, 32), "expected \\(H, W, C\\)"),
])
def test_damaged_stored_values_are_one_line_errors(tmp_path, field, value, match):
    rec = make_bb_v22_record(tmp_path)
    pt = rec.record_dir / "attack_result.pt"
    d = torch.load(pt, weights_only=False)
    d[field] = value
    torch.save(d, pt)
    with pytest.raises(RecordError, match=match):
        load_attack_record(rec.record_dir)


@pytest.mark.parametrize("field,value,match", [
    ("attack_target", 12, r"attack_target is 12, expected an integer in \[0, 9\]"),
    ("pratio", 5, "pratio is 5, expected a fraction"),
    ("attack_label_trans", "one2one", "attack_label_trans is 'one2one'"),
])
def test_info_values_are_validated_when_read(tmp_path, field, value, match):
    rec = make_bb_v22_record(tmp_path)
    info = torch.load(rec.record_dir / "info.pickle", weights_only=False)
    info[field] = value
    torch.save(info, rec.record_dir / "info.pickle")
    with pytest.raises(RecordError, match=match):
        load_attack_record(rec.record_dir)


# ----------------------------------------------------------------------------------------------- in-process cache

def test_a_record_decoded_before_comes_from_memory_until_one_of_its_files_changes(tmp_path):
    """The jobs of a study in one process (local executor, a reused Ray worker) load the same record again and again:
    the second load reuses the decoded images (read-only) and the unpickled state; rewriting any file the loader
    reads (a PNG in place, attack_result.pt) makes the next load decode again, so a changed or damaged record is
    never hidden."""
    from bdsafety.records import _RECORD_CACHE, clear_record_cache

    clear_record_cache()
    record_dir = tmp_path / "record" / "my_attack"
    state, bd_train, bd_test, info = save_demo_record(record_dir)
    a = load_attack_record(record_dir)
    b = load_attack_record(record_dir)
    assert b.bd_test.images is a.bd_test.images and not b.bd_test.images.flags.writeable  # served from memory
    assert b.state_dict is not a.state_dict and b.info is not a.info  # the containers are each caller's own
    b.info["attack"] = "changed"
    assert load_attack_record(record_dir).info == info
    assert_split_equal(b.bd_test, bd_test)
    assert_state_equal(b.state_dict, state)
    # a PNG rewritten in place (same folder entries, same size): decoded again, and the new pixels are read
    png = sorted((record_dir / "bd_test_dataset").rglob("*.png"))[0]
    img = cv2.imread(str(png), cv2.IMREAD_UNCHANGED)
    cv2.imwrite(str(png), 255 - img)
    st = png.stat()
    os.utime(png, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    c = load_attack_record(record_dir)
    assert c.bd_test.images is not a.bd_test.images and not np.array_equal(c.bd_test.images, a.bd_test.images)
    # a damaged record is reported even after a clean load of it
    png.write_bytes(b"not a png")
    with pytest.raises(RecordError, match="not a readable image"):
        load_attack_record(record_dir)
    assert len(_RECORD_CACHE) <= 2
    clear_record_cache()
