"""Hand-made BackdoorBench records for tests, written the way BackdoorBench v2.0 / v2.2 write them.

Nothing here uses ``bdsafety.records``'s writer: the PNGs are written with PIL (as BackdoorBench's
``poisonedCLSDataContainer`` does), attack_result.pt and info.pickle with a plain ``torch.save``, the summary
csv as literal text. The structure follows fixtures/backdoorbench_attack_result_schema.json, which
:func:`assert_matches_schema` checks recursively.
"""
from __future__ import annotations

import io
import json
import zipfile
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from bdsafety.data.poisoned import PoisonedSplit

SCHEMA_NAME = "backdoorbench_attack_result_schema.json"
_SCHEMA_DIRS = [str(Path(__file__).parent / "fixtures")]  # copied from BackdoorBench v2.2 (the repository's own copy)

# a BackdoorBench-style attack_df_summary.csv (values as fractions)
ATTACK_SUMMARY_CSV = (
    ",epoch,train_epoch_loss_avg_over_batch,test_acc,test_asr,test_ra\n"
    "last,1,0.53125,0.875,0.96875,0.03125\n"
    "valid_max,1.0,0.6875,0.875,0.96875,0.0625\n"
    "exist_nan_value,False,False,False,False,False\n"
)


def load_schema() -> dict:
    """The fixture describing a real v2.2 attack_result.pt (tests/fixtures/)."""
    for d in _SCHEMA_DIRS:
        if d and (Path(d) / SCHEMA_NAME).is_file():
            return json.loads((Path(d) / SCHEMA_NAME).read_text())["attack_result.pt"]
    raise FileNotFoundError(f"{SCHEMA_NAME} not found in {_SCHEMA_DIRS}: "
                            f"the repository's tests/fixtures/ is incomplete")


def assert_matches_schema(obj, schema: dict, where: str = "attack_result") -> None:
    """Assert ``obj`` has the fixture's structure: same key sets, same python/numpy types, same array dtypes."""
    if isinstance(schema.get("type"), str):
        kind = schema["type"]
        if kind in ("str", "int", "bool", "tuple", "list", "dict"):
            expected = {"str": str, "int": int, "bool": bool, "tuple": tuple, "list": list, "dict": dict}[kind]
            assert type(obj) is expected, f"{where}: {type(obj).__name__}, expected {kind}"
        elif kind == "OrderedDict state_dict":
            assert isinstance(obj, OrderedDict), f"{where}: {type(obj).__name__}, expected OrderedDict"
            assert obj and all(isinstance(v, torch.Tensor) for v in obj.values()), f"{where}: not a state_dict"
        elif kind == "numpy.ndarray":
            assert type(obj) is np.ndarray, f"{where}: {type(obj).__name__}, expected numpy.ndarray"
            assert obj.dtype == np.dtype(schema["dtype"]), f"{where}: dtype {obj.dtype}, expected {schema['dtype']}"
            assert obj.ndim == len(schema["shape"]), f"{where}: shape {obj.shape}"
        else:
            raise AssertionError(f"{where}: schema type {kind!r} unknown to this checker")
        if kind in ("list", "tuple") and "value" in schema:
            assert [type(v) for v in obj] == [type(v) for v in schema["value"]], f"{where}: element types of {obj!r}"
        if kind == "dict" and "first_items" in schema:
            key_spec, item_schema = next(iter(schema["first_items"].items()))
            key_type = key_spec.split("(")[1].rstrip(")")
            for k, v in obj.items():
                assert type(k) is np.dtype(key_type).type, (f"{where}: key {k!r} is {type(k).__name__}, "
                                                            f"expected {key_type}")
                assert_matches_schema(v, item_schema, f"{where}[{k}]")
        return
    assert type(obj) is dict, f"{where}: {type(obj).__name__}, expected dict"
    keys = {k for k in schema if not k.startswith("_")}
    assert set(obj) == keys, f"{where}: keys {sorted(obj)} != fixture keys {sorted(keys)}"
    for k in keys:
        assert_matches_schema(obj[k], schema[k], f"{where}.{k}")


def tiny_state_dict(num_classes: int = 10, seed: int = 0, prefix: str = "") -> OrderedDict:
    """A few preactresnet18-named tensors: enough to check that weights survive save/load."""
    g = torch.Generator().manual_seed(seed)
    return OrderedDict((prefix + k, v) for k, v in [
        ("conv1.weight", torch.randn(4, 3, 3, 3, generator=g)),
        ("layer1.0.bn1.running_mean", torch.randn(4, generator=g)),
        ("layer1.0.bn1.num_batches_tracked", torch.tensor(7)),
        ("linear.weight", torch.randn(num_classes, 4, generator=g)),
        ("linear.bias", torch.randn(num_classes, generator=g)),
    ])


@dataclass
class BBRecord:
    """What a builder wrote, for comparing with what a loader reads."""

    root: Path          # the BackdoorBench root (holds record/)
    record_dir: Path    # root/record/<name>
    state_dict: OrderedDict
    bd_train: PoisonedSplit | None
    bd_test: PoisonedSplit
    info: dict
    img_size: tuple


def _info_dict(name: str, *, attack: str, target: int, pratio: float, label_trans: str, num_classes: int,
               img_size: tuple, model_name: str, save_root: str) -> dict:
    """An info.pickle dict with the keys of the fixture (BackdoorBench's merged attack args)."""
    h, w, c = img_size
    return {
        "amp": False, "attack": attack, "attack_label_trans": label_trans, "attack_target": target,
        "batch_size": 128, "bd_yaml_path": f"../config/attack/{attack}/default.yaml", "client_optimizer": "sgd",
        "dataset": "cifar10", "dataset_path": "../data/cifar10", "device": "cuda:0", "epochs": 1,
        "frequency_save": 0, "img_size": (h, w, c), "input_channel": c, "input_height": h, "input_width": w,
        "lr": 0.01, "lr_scheduler": "CosineAnnealingLR", "model": model_name, "non_blocking": True,
        "num_classes": num_classes, "num_workers": 4, "patch_mask_path": "../resource/badnet/trigger_image.png",
        "pin_memory": True, "pratio": pratio, "prefetch": False, "random_seed": 0, "save_folder_name": name,
        "save_path": f"{save_root}/record/{name}", "sgd_momentum": 0.9,
        "terminal_info": ["./attack/badnet.py", "--save_folder_name", name], "wd": 0.0005,
        "yaml_path": "../config/attack/prototype/cifar10.yaml",
    }


def _split(rng: np.random.Generator, labels: np.ndarray, indices: np.ndarray, img_size: tuple,
           bd_labels) -> PoisonedSplit:
    indices = np.sort(np.asarray(indices, dtype=np.int64))
    return PoisonedSplit(indices=indices, images=rng.integers(0, 256, (len(indices), *img_size), dtype=np.uint8),
                         bd_labels=bd_labels(labels[indices]), orig_labels=labels[indices], length=len(labels))


def _bb_write_split(split: PoisonedSplit, disk_folder: Path, stored_folder: str, subset: bool) -> dict:
    """What BackdoorBench's prepro_cls_DatasetBD_v2 writes: PIL PNGs and its retrieve_state() dict."""
    data_dict = {}
    for i, img, b, o in zip(split.indices, split.images, split.bd_labels, split.orig_labels):
        (disk_folder / str(int(o))).mkdir(parents=True, exist_ok=True)
        Image.fromarray(img.squeeze(-1) if img.shape[-1] == 1 else img).save(
            disk_folder / str(int(o)) / f"{int(i)}.png")
        data_dict[np.int64(i)] = {"path": f"{stored_folder}/{int(o)}/{int(i)}.png", "other_info": [int(b), int(o)]}
    indicator = np.zeros(split.length)  # float64, like BackdoorBench's generate_poison_index_from_label_transform
    indicator[split.indices] = 1
    index_array = np.arange(split.length)
    if subset:  # bd_test keeps only the poisoned samples
        index_array = index_array[np.where(indicator == 1)[0]]
    return {
        "bd_data_container": {"save_folder_path": stored_folder, "data_dict": data_dict, "save_file_format": ".png"},
        "getitem_all": True,
        "getitem_all_switch": False,
        "original_index_array": index_array,
        "poison_indicator": indicator,
        "save_folder_path": stored_folder,
    }


def _to_numpy1_spelling(path: Path) -> None:
    """Rewrite a torch zip so its pickle names numpy.core.multiarray, as files written with numpy 1.x do."""
    with zipfile.ZipFile(path) as z:
        entries = [(i.filename, z.read(i.filename)) for i in z.infolist()]
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as z:
        for name, data in entries:
            if name.endswith("/data.pkl"):
                data = data.replace(b"numpy._core.multiarray\n", b"numpy.core.multiarray\n")
            z.writestr(name, data)
    path.write_bytes(out.getvalue())


def _make_bb_record(root, name, *, stored_root: str, numpy1: bool, n_train: int, n_test: int, num_classes: int,
                    img_size: tuple, pratio: float, target: int, label_trans: str, model_name: str,
                    with_bd_train: bool, with_info: bool, module_prefix: bool, seed: int,
                    state_dict: OrderedDict | None = None, labels: tuple | None = None) -> BBRecord:
    rng = np.random.default_rng(seed)
    root = Path(root)
    record_dir = root / "record" / name
    record_dir.mkdir(parents=True)
    if labels is None:
        train_y = rng.integers(0, num_classes, n_train)
        test_y = rng.integers(0, num_classes, n_test)
    else:  # the labels of a dataset written beside the record (tests/fake_datasets.py), so the two agree
        train_y, test_y = (np.asarray(v, dtype=np.int64) for v in labels)
        assert (len(train_y), len(test_y)) == (n_train, n_test)
    if label_trans == "all2one":
        bd_labels = lambda y: np.full(len(y), target, dtype=np.int64)  # noqa: E731
        test_idx = np.where(test_y != target)[0]
    else:
        bd_labels = lambda y: (y + 1) % num_classes  # noqa: E731
        test_idx = np.arange(n_test)
    bd_train = None
    if with_bd_train:
        train_idx = rng.choice(n_train, max(1, round(pratio * n_train)), replace=False)
        bd_train = _split(rng, train_y, train_idx, img_size, bd_labels)
    bd_test = _split(rng, test_y, test_idx, img_size, bd_labels)
    state = tiny_state_dict(num_classes, seed, "module." if module_prefix else "") if state_dict is None else state_dict
    stored = f"{stored_root}/record/{name}"
    result = {
        "model_name": model_name,
        "num_classes": num_classes,
        "model": state,
        "data_path": "./data/cifar10",
        "img_size": tuple(img_size),
        "clean_data": "cifar10",
        "bd_train": None if bd_train is None else _bb_write_split(
            bd_train, record_dir / "bd_train_dataset", f"{stored}/bd_train_dataset", subset=False),
        "bd_test": _bb_write_split(bd_test, record_dir / "bd_test_dataset", f"{stored}/bd_test_dataset", subset=True),
    }
    torch.save(result, record_dir / "attack_result.pt")
    info = _info_dict(name, attack="badnet", target=target, pratio=pratio, label_trans=label_trans,
                      num_classes=num_classes, img_size=img_size, model_name=model_name, save_root=stored_root)
    if with_info:
        torch.save(info, record_dir / "info.pickle")
    if numpy1:
        _to_numpy1_spelling(record_dir / "attack_result.pt")
    (record_dir / "attack_df_summary.csv").write_text(ATTACK_SUMMARY_CSV)
    return BBRecord(root=root, record_dir=record_dir, state_dict=state, bd_train=bd_train, bd_test=bd_test,
                    info=info if with_info else {}, img_size=tuple(img_size))


def make_bb_v22_record(root, name: str = "badnet_demo", *, n_train: int = 40, n_test: int = 20, num_classes: int = 10,
                       img_size: tuple = (8, 8, 3), pratio: float = 0.1, target: int = 0, label_trans: str = "all2one",
                       model_name: str = "preactresnet18", with_bd_train: bool = True, with_info: bool = True,
                       module_prefix: bool = False, seed: int = 0, state_dict: OrderedDict | None = None,
                       labels: tuple | None = None) -> BBRecord:
    """A v2.2 record at ``root/record/<name>``: paths relative to the BackdoorBench root ('./record/<name>/...').
    ``state_dict``: the model's weights (default: a few preactresnet18-named tensors, enough for loaders but not to
    run); ``labels``: (train labels, test labels) of the clean dataset the record is made from."""
    return _make_bb_record(root, name, stored_root=".", numpy1=False, n_train=n_train, n_test=n_test,
                           num_classes=num_classes, img_size=img_size, pratio=pratio, target=target,
                           label_trans=label_trans, model_name=model_name, with_bd_train=with_bd_train,
                           with_info=with_info, module_prefix=module_prefix, seed=seed, state_dict=state_dict,
                           labels=labels)


def make_bb_v20_record(root, name: str = "badnet_demo", *, foreign_root: str = "/home/alice/BackdoorBench",
                       n_train: int = 40, n_test: int = 20, num_classes: int = 10, img_size: tuple = (8, 8, 3),
                       pratio: float = 0.1, target: int = 0, label_trans: str = "all2one",
                       model_name: str = "preactresnet18", with_bd_train: bool = True, with_info: bool = True,
                       module_prefix: bool = False, seed: int = 0) -> BBRecord:
    """A v2.0 record at ``root/record/<name>``: ABSOLUTE paths of another machine (``foreign_root``) and a
    pickle written with numpy 1.x (``numpy.core.multiarray`` globals)."""
    return _make_bb_record(root, name, stored_root=foreign_root, numpy1=True, n_train=n_train, n_test=n_test,
                           num_classes=num_classes, img_size=img_size, pratio=pratio, target=target,
                           label_trans=label_trans, model_name=model_name, with_bd_train=with_bd_train,
                           with_info=with_info, module_prefix=module_prefix, seed=seed)
