"""Read and write BackdoorBench records (v2.0 and v2.2) and their csv summaries (safe loading and atomic writes
live in bdsafety.safeio, the inspector in bdsafety.inspector).

The format is described in docs/records.md. In short, ``record/<name>/`` holds ``attack_result.pt``
(written last, so its presence means the record is complete), ``info.pickle`` (the attack's args),
``bd_train_dataset/<orig_label>/<idx>.png`` and ``bd_test_dataset/...`` (poisoned images), csv metrics and one
``defense/<defense_name>/`` folder per defense run.

Inspect a record from the shell::

    python -m bdsafety.records record/badnet_demo
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import re
import shutil
import tempfile
import warnings
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pandas as pd
import torch
import yaml

from bdsafety import registry
from bdsafety.data.poisoned import PoisonedSplit
from bdsafety.outputs import recover
from bdsafety.safeio import (
    RecordError,
    _current_umask,
    _ensure_safe_loadable,
    atomic_torch_save,
    atomic_write_text,
    safe_torch_load,
)

__all__ = [
    "write_metrics_csv", "read_metrics_summary", "save_attack_record", "AttackRecord", "load_attack_record",
    "save_model_result", "load_model_result", "list_defenses", "summary_name", "resolve_record_dir",
]

ATTACK_COMMAND = "python attack/badnet.py --yaml_path config/attack/badnet/demo.yaml --save_folder_name {name}"
ATTACK_RESULT_KEYS = ("model_name", "num_classes", "model", "data_path", "img_size", "clean_data",
                      "bd_train", "bd_test")
MODEL_RESULT_KEYS = ("model_name", "num_classes", "model")
NAN_VALUE = "nan_value"  # how BackdoorBench's Metric_Aggregator stores NaN in csv files
SUMMARY_INDEX = ("last", "valid_max", "exist_nan_value")

# ----------------------------------------------------------------------------------------------- metrics csv

def _csv_value(v: Any) -> Any:
    """Plain python value for a metric: tensors/numpy scalars unwrapped, NaN -> 'nan_value' (BackdoorBench)."""
    if isinstance(v, torch.Tensor):
        v = v.item()
    elif isinstance(v, np.generic):
        v = v.item()
    if isinstance(v, float) and math.isnan(v):
        return NAN_VALUE
    return v


def _summarize_column(col: pd.Series) -> pd.Series:
    present = col[~col.isna()]
    return pd.Series(index=list(SUMMARY_INDEX), data=[
        present.iloc[-1] if len(present) else np.nan,
        pd.to_numeric(col, errors="coerce").max(),
        any(isinstance(v, str) and v == NAN_VALUE for v in col),
    ], dtype=object)


def write_metrics_csv(rows: list[dict], folder: str | os.PathLike, name: str) -> tuple[Path, Path]:
    """Write ``<name>_df.csv`` (one row per epoch) and ``<name>_df_summary.csv`` the way BackdoorBench does.

    Like BackdoorBench's Metric_Aggregator: None values are dropped, NaN becomes the string ``nan_value``, the
    csv has pandas' unnamed integer index column, columns in first-seen order. The summary has index rows
    ``last`` (last non-missing value), ``valid_max`` (max over numeric values) and ``exist_nan_value``.
    """
    if not rows:
        raise ValueError(f"write_metrics_csv({name!r}): no rows to write")
    clean = [{k: _csv_value(v) for k, v in row.items() if v is not None} for row in rows]
    df = pd.DataFrame(clean, dtype=object)
    summary = df.apply(_summarize_column)
    folder = Path(folder)
    df_path = atomic_write_text(folder / f"{name}_df.csv", df.to_csv())
    summary_path = atomic_write_text(folder / f"{name}_df_summary.csv", summary.to_csv())
    return df_path, summary_path


def read_metrics_summary(folder: str | os.PathLike, name: str) -> dict[str, float]:
    """The ``last`` row of ``<folder>/<name>_df_summary.csv`` as floats (``nan_value``/empty -> NaN).

    Columns whose last value is not a number are left out.
    """
    path = Path(folder) / f"{name}_df_summary.csv"
    if not path.is_file():
        raise RecordError(f"{path} not found: it is written at the end of the run that produces "
                          f"{name!r} results; re-run it")
    try:
        df = pd.read_csv(path, index_col=0, dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as e:
        raise RecordError(f"{path} is not a readable csv ({e}); re-run the run that writes it") from None
    if "last" not in df.index:
        raise RecordError(f"{path} has no 'last' row (rows: {', '.join(map(str, df.index))}); it is not a "
                          f"BackdoorBench summary csv")
    out: dict[str, float] = {}
    for col, v in df.loc["last"].items():
        if v in ("", NAN_VALUE):
            out[col] = float("nan")
            continue
        with contextlib.suppress(ValueError):
            out[col] = float(v)
    return out


# ----------------------------------------------------------------------------------------------- attack records

def _split_state(split: PoisonedSplit, save_folder_path: str, full_index: bool) -> dict:
    """BackdoorBench's ``prepro_cls_DatasetBD_v2.retrieve_state()`` for a split whose images lie on disk."""
    data_dict = {
        np.int64(i): {"path": f"{save_folder_path}/{int(o)}/{int(i)}.png", "other_info": [int(b), int(o)]}
        for i, b, o in zip(split.indices, split.bd_labels, split.orig_labels)
    }
    index_array = np.arange(split.length, dtype=np.int64) if full_index else split.indices.astype(np.int64)
    return {
        "bd_data_container": {"save_folder_path": save_folder_path, "data_dict": data_dict, "save_file_format": ".png"},
        "getitem_all": True,
        "getitem_all_switch": False,
        "original_index_array": index_array,
        "poison_indicator": split.poison_indicator.astype(np.float64),
        "save_folder_path": save_folder_path,
    }


def _replace_dir(src: Path, dst: Path) -> None:
    """Move the finished folder ``src`` to ``dst``, replacing whatever was there."""
    if dst.exists():
        trash = Path(tempfile.mkdtemp(dir=dst.parent, prefix=f".{dst.name}.old."))
        os.replace(dst, trash / dst.name)
        os.replace(src, dst)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.replace(src, dst)


def _write_png_dir(split: PoisonedSplit, dst: Path) -> None:
    """Write ``dst/<orig_label>/<idx>.png`` for every sample, via a temp folder renamed at the end."""
    tmp = Path(tempfile.mkdtemp(dir=dst.parent, prefix=f".{dst.name}."))
    os.chmod(tmp, 0o777 & ~_current_umask())  # mkdtemp creates 0700; give the usual permissions
    try:
        for idx, img, orig in zip(split.indices, split.images, split.orig_labels):
            sub = tmp / str(int(orig))
            sub.mkdir(exist_ok=True)
            bgr = img[..., ::-1] if img.ndim == 3 and img.shape[2] == 3 else img
            if not cv2.imwrite(str(sub / f"{int(idx)}.png"), np.ascontiguousarray(bgr)):
                raise OSError(f"cv2.imwrite could not write {sub / f'{int(idx)}.png'} (disk full "
                              f"or unwritable folder?)")
        _replace_dir(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def save_attack_record(record_dir: str | os.PathLike, *, model_state: Mapping[str, torch.Tensor], model_name: str,
                       num_classes: int, clean_data: str, data_path: str, img_size: tuple,
                       bd_train: PoisonedSplit | None, bd_test: PoisonedSplit, info: dict,
                       name: str | None = None) -> Path:
    """Write a BackdoorBench v2.2 attack record into ``record_dir`` (normally ``record/<name>``).

    Writes the PNG folders, ``info.pickle`` and, last, ``attack_result.pt`` with BackdoorBench's structure
    (paths relative to the BackdoorBench root: ``./record/<name>/bd_train_dataset/<label>/<idx>.png``). A stale
    attack_result.pt is removed first, so an interrupted rewrite never looks complete. Returns the .pt path.
    """
    if bd_test is None:
        raise ValueError("bd_test is required (BackdoorBench records always hold a poisoned test set)")
    record_dir = Path(record_dir)
    img_size = tuple(int(s) for s in img_size)
    for split_name, split in (("bd_train", bd_train), ("bd_test", bd_test)):
        if split is not None and len(split) and tuple(split.images.shape[1:]) != img_size:
            raise ValueError(f"{split_name} images have shape {tuple(split.images.shape[1:])}, "
                             f"but img_size is {img_size}")
    info = dict(info)
    _ensure_safe_loadable(info, "info (info.pickle)")
    record_dir.mkdir(parents=True, exist_ok=True)
    result_path = record_dir / "attack_result.pt"
    result_path.unlink(missing_ok=True)

    name = name or record_dir.resolve().name  # the record's final name (it may be written in a temporary folder)
    states: dict[str, dict | None] = {}
    for key, split, full_index in (("bd_train", bd_train, True), ("bd_test", bd_test, False)):
        sub = f"{key}_dataset"
        if split is None:
            shutil.rmtree(record_dir / sub, ignore_errors=True)
            states[key] = None
            continue
        _write_png_dir(split, record_dir / sub)
        states[key] = _split_state(split, f"./record/{name}/{sub}", full_index)

    atomic_torch_save(info, record_dir / "info.pickle")
    state = OrderedDict((k, v.detach().cpu().contiguous()) for k, v in model_state.items())  # plain layout on disk
    atomic_torch_save({
        "model_name": model_name,
        "num_classes": int(num_classes),
        "model": state,
        "data_path": data_path,
        "img_size": img_size,
        "clean_data": clean_data,
        "bd_train": states["bd_train"],
        "bd_test": states["bd_test"],
    }, result_path)
    return result_path


@dataclass
class AttackRecord:
    """An attack record loaded into memory (images decoded, 'module.' prefix stripped from the state_dict)."""

    record_dir: Path
    model_name: str
    num_classes: int
    state_dict: OrderedDict
    clean_data: str
    data_path: str
    img_size: tuple
    bd_train: PoisonedSplit | None
    bd_test: PoisonedSplit
    info: dict

    @property
    def attack(self) -> str | None:
        return self.info.get("attack")

    @property
    def attack_target(self) -> int | None:
        return self.info.get("attack_target")

    @property
    def pratio(self) -> float | None:
        return self.info.get("pratio")

    @property
    def attack_label_trans(self) -> str | None:
        return self.info.get("attack_label_trans")


def _missing_record_hint(record_dir: Path) -> str:
    return f"create it with: {ATTACK_COMMAND.format(name=record_dir.name)}"


def _check_keys(obj: Any, keys: tuple, where: str, path: Path) -> None:
    if not isinstance(obj, Mapping):
        raise RecordError(f"{path}: {where} is a {type(obj).__name__}, expected a dict with keys {', '.join(keys)}")
    missing = [k for k in keys if k not in obj]
    if missing:
        raise RecordError(f"{path}: {where} lacks the keys {', '.join(missing)} (has: {', '.join(map(str, obj))}); "
                          "it is not a BackdoorBench v2.x record, or it is damaged")


def _strip_module_prefix(state: Mapping) -> OrderedDict:
    return OrderedDict((k[len("module."):] if k.startswith("module.") else k, v) for k, v in state.items())


def _split_parts(p: str) -> list[str]:
    return [s for s in re.split(r"[\\/]+", p) if s]


def _stored_location(stored: str, root: Path) -> Path:
    """Where a path stored in the record points: absolute as is, relative from the BackdoorBench root."""
    if os.path.isabs(stored) or re.match(r"^[A-Za-z]:[\\/]", stored):
        return Path(stored)
    return root.joinpath(*[s for s in _split_parts(stored) if s != "."])


def _read_image(path: Path, channels: int) -> np.ndarray:
    img = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if img is None:
        raise RecordError(f"{path} is not a readable image (corrupt PNG?); re-run the attack that wrote the record")
    if img.dtype != np.uint8:
        raise RecordError(f"{path} is a {img.dtype} image; BackdoorBench records hold 8-bit PNGs")
    if img.ndim == 2:
        img = img[:, :, None]
    if img.shape[2] == 4:
        img = img[:, :, :3]
    if img.shape[2] == 3:
        img = img[:, :, ::-1]
    if channels == 3 and img.shape[2] == 1:
        img = np.repeat(img, 3, axis=2)
    elif channels == 1 and img.shape[2] == 3:
        img = cv2.cvtColor(np.ascontiguousarray(img), cv2.COLOR_RGB2GRAY)[:, :, None]
    return np.ascontiguousarray(img)


def _load_split(state: Any, key: str, record_dir: Path, img_size: tuple, pt_path: Path) -> PoisonedSplit:
    _check_keys(state, ("bd_data_container", "original_index_array", "poison_indicator"), key, pt_path)
    container = state["bd_data_container"]
    _check_keys(container, ("save_folder_path", "data_dict"), f"{key}.bd_data_container", pt_path)
    data_dict = container["data_dict"]
    indicator = np.asarray(state["poison_indicator"])
    index_array = np.asarray(state["original_index_array"], dtype=np.int64)
    if indicator.ndim != 1 or (len(index_array) and (index_array.min() < 0 or index_array.max() >= len(indicator))):
        raise RecordError(f"{pt_path}: {key}.original_index_array points outside poison_indicator "
                          f"(length {len(indicator)}); the record is damaged, re-run the attack")
    # BackdoorBench's semantics: the split is original_index_array; a sample is poisoned where the indicator is 1
    poisoned = np.unique(index_array[indicator[index_array] == 1])
    lookup = {int(k): v for k, v in data_dict.items()}
    absent = [int(i) for i in poisoned if int(i) not in lookup]
    if absent:
        raise RecordError(f"{pt_path}: {len(absent)} poisoned {key} samples have no entry in data_dict "
                          f"(first: index {absent[0]}); the record is damaged, re-run the attack")
    folder = _split_parts(container["save_folder_path"] or "")[-1:] or [f"{key}_dataset"]
    fmt = container.get("save_file_format", ".png")
    root = record_dir.parent.parent  # record_dir is <root>/record/<name>
    h, w, c = img_size
    inside = record_dir.resolve()
    paths, bd_labels, orig_labels, missing, foreign = [], [], [], [], []
    for i in poisoned:
        entry = lookup[int(i)]
        bd_label, orig_label = (int(x) for x in entry["other_info"][:2])
        candidate = record_dir / folder[0] / str(orig_label) / f"{int(i)}{fmt}"
        if candidate.is_file() and not candidate.resolve().is_relative_to(inside):
            foreign.append(candidate.resolve())  # a symlinked copy: the image lives in another folder
        elif not candidate.is_file():
            stored = _stored_location(str(entry["path"]), root)
            if stored.is_file() and stored.resolve().is_relative_to(inside):
                candidate = stored
            elif stored.is_file():  # another record's image: never train or evaluate on it silently
                foreign.append(stored)
            else:
                missing.append(candidate)
        paths.append(candidate)
        bd_labels.append(bd_label)
        orig_labels.append(orig_label)
    if foreign:
        src = foreign[0].parent.parent
        raise RecordError(
            f"{len(foreign)} of {len(poisoned)} poisoned {key} images of record {record_dir} are not inside it: their "
            f"stored paths point into another folder ({src}, first: {foreign[0]}), which may belong to another record. "
            f"Re-root the record: copy its own image folder into it (cp -r {src} {record_dir / folder[0]}) if that "
            f"folder really is this record's, or re-run the attack")
    if missing:
        raise RecordError(f"{len(missing)} of {len(poisoned)} poisoned {key} images are missing, first: {missing[0]}; "
                          "copy the whole record folder (with its bd_*_dataset folders) or re-run the attack")
    images = np.zeros((len(paths), h, w, c), dtype=np.uint8)
    for n, p in enumerate(paths):
        img = _read_image(p, c)
        if img.shape[:2] != (h, w):
            img = cv2.resize(img, (w, h), interpolation=cv2.INTER_LINEAR).reshape(h, w, c)
        images[n] = img
    return PoisonedSplit(indices=poisoned, images=images, bd_labels=np.asarray(bd_labels, dtype=np.int64),
                         orig_labels=np.asarray(orig_labels, dtype=np.int64), length=len(indicator))


def _read_attack_result(record_dir: Path, trust_record: bool) -> dict:
    if not record_dir.is_dir():
        raise RecordError(f"record folder {record_dir} does not exist; {_missing_record_hint(record_dir)}")
    pt_path = record_dir / "attack_result.pt"
    if not pt_path.is_file() and (record_dir / "defense_result.pt").is_file() and record_dir.parent.name == "defense":
        rec = record_dir.parent.parent
        raise RecordError(f"{record_dir} is a defense folder, not a record: pass the record and the defense "
                          f"separately, --result_file {rec} --defense {record_dir.name}")
    if not pt_path.is_file():
        raise RecordError(f"{record_dir} has no attack_result.pt: the attack did not finish (the file is written last) "
                          f"or this is not a record folder; {_missing_record_hint(record_dir)}")
    result = safe_torch_load(pt_path, trust_record)
    _check_keys(result, ATTACK_RESULT_KEYS, "attack_result", pt_path)
    if not isinstance(result["model"], Mapping):
        raise RecordError(f"{pt_path}: 'model' is a {type(result['model']).__name__}, expected a state_dict")
    return result


MAX_IMG_SIDE = 4096  # larger stored image sizes are damage, not data (they would only end in a memory error)


def _checked_int(v: Any, what: str, path: Path, low: int = 0, high: int | None = None) -> int:
    """``v`` as an int (numpy / torch scalars included) within [low, high], or a one-line RecordError."""
    if isinstance(v, torch.Tensor) and v.numel() == 1:
        v = v.item()
    if isinstance(v, np.generic):
        v = v.item()
    if isinstance(v, bool) or not isinstance(v, (int, float)) or isinstance(v, float) and not float(v).is_integer():
        raise RecordError(f"{path}: {what} is {v!r}, not an integer; "
                          f"the record is damaged or not a BackdoorBench record")
    v = int(v)
    if v < low or (high is not None and v > high):
        rng = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise RecordError(f"{path}: {what} is {v}, expected an integer {rng}; the record is damaged")
    return v


def _checked_img_size(v: Any, path: Path) -> tuple:
    try:
        items = list(v)
    except TypeError:
        raise RecordError(f"{path}: img_size is {v!r}, expected (H, W, C)") from None
    if len(items) != 3:
        raise RecordError(f"{path}: img_size is {tuple(items)}, expected (H, W, C)")
    h, w = (_checked_int(x, "img_size", path, low=1, high=MAX_IMG_SIDE) for x in items[:2])
    c = _checked_int(items[2], "img_size channels", path, low=1, high=4)
    return (h, w, c)


def _check_info(info: dict, num_classes: int, path: Path) -> None:
    """The info.pickle values tools rely on, checked when read: target class, poison ratio, label transform."""
    if info.get("attack_target") is not None:
        info["attack_target"] = _checked_int(info["attack_target"], "attack_target", path, 0, num_classes - 1)
    p = info.get("pratio")
    if p is not None:
        if isinstance(p, bool) or not isinstance(p, (int, float, np.number)) or not 0 <= float(p) <= 1:
            raise RecordError(f"{path}: pratio is {p!r}, expected a fraction in [0, 1]; the record is damaged")
    lt = info.get("attack_label_trans")
    if lt is not None and lt not in ("all2one", "all2all"):
        raise RecordError(f"{path}: attack_label_trans is {lt!r}, expected all2one or all2all")


# Decoded records kept in this process: the jobs of a study run in one process (the local executor) or in Ray workers
# that are reused from job to job, and a model's retuning jobs (RA draws, its control, the budget) load the same record
# one after the other; decoding its poisoned PNGs and unpickling its attack_result.pt is 15-20% of such a job. A
# record is served from here only while every one of its files has the size, modification time and inode it had when
# it was decoded (``_record_stamp``); its image arrays are read-only.
_RECORD_CACHE: OrderedDict = OrderedDict()
RECORD_CACHE_SIZE = 2


def _record_stamp(record_dir: Path) -> tuple:
    """(name, inode, mtime_ns, size) of attack_result.pt, info.pickle and every file under the record's bd_*
    folders: any rewrite, replacement or corruption of a file the loader reads changes it."""
    out = []
    paths = [record_dir / "attack_result.pt", record_dir / "info.pickle"]
    for sub in sorted(record_dir.glob("bd_*")):
        if sub.is_dir():
            for top, dirs, files in os.walk(sub):
                dirs.sort()
                paths += [Path(top) / f for f in sorted(files)]
    for p in paths:
        try:
            st = p.stat()
        except OSError:
            out.append((str(p), None))
            continue
        out.append((str(p), st.st_ino, st.st_mtime_ns, st.st_size))
    return tuple(out)


def clear_record_cache() -> None:
    """Forget every decoded record of this process."""
    _RECORD_CACHE.clear()


def load_attack_record(record_dir: str | os.PathLike, trust_record: bool = False) -> AttackRecord:
    """Load a BackdoorBench v2.0/v2.2 record, wherever its folder lives now (images decoded to RGB uint8). A record
    this process decoded before and whose files are unchanged comes from memory (``_RECORD_CACHE``)."""
    record_dir = Path(record_dir)
    if not record_dir.is_dir():
        _read_attack_result(record_dir, trust_record)  # raises the missing-record error
    key = (str(record_dir.resolve()), bool(trust_record))
    stamp = _record_stamp(record_dir)
    hit = _RECORD_CACHE.get(key)
    if hit is not None and hit[0] == stamp:
        _RECORD_CACHE.move_to_end(key)
        rec = hit[1]
        return dataclasses.replace(rec, record_dir=record_dir, state_dict=OrderedDict(rec.state_dict),
                                   info=dict(rec.info))
    rec = _decode_attack_record(record_dir, trust_record)
    for split in (rec.bd_train, rec.bd_test):
        if split is not None:
            for a in (split.images, split.indices, split.bd_labels, split.orig_labels):
                a.setflags(write=False)
    _RECORD_CACHE[key] = (stamp, rec)
    _RECORD_CACHE.move_to_end(key)
    while len(_RECORD_CACHE) > RECORD_CACHE_SIZE:
        _RECORD_CACHE.popitem(last=False)
    return dataclasses.replace(rec, state_dict=OrderedDict(rec.state_dict), info=dict(rec.info))


def _decode_attack_record(record_dir: Path, trust_record: bool) -> AttackRecord:
    result = _read_attack_result(record_dir, trust_record)
    pt_path = record_dir / "attack_result.pt"
    img_size = _checked_img_size(result["img_size"], pt_path)
    num_classes = _checked_int(result["num_classes"], "num_classes", pt_path, low=2)
    bd_train = (None if result["bd_train"] is None
                else _load_split(result["bd_train"], "bd_train", record_dir, img_size, pt_path))
    if result["bd_test"] is None:
        raise RecordError(f"{pt_path}: bd_test is None; the record has no poisoned test set, re-run the attack")
    bd_test = _load_split(result["bd_test"], "bd_test", record_dir, img_size, pt_path)
    info_path = record_dir / "info.pickle"
    if info_path.is_file():
        info = safe_torch_load(info_path, trust_record)
        if not isinstance(info, Mapping):
            raise RecordError(f"{info_path} holds a {type(info).__name__}, expected the attack's args dict")
        info = dict(info)
        _check_info(info, num_classes, info_path)
    else:
        warnings.warn(f"{info_path} is missing: the attack's target label, "
                      f"poison ratio and label transform are unknown",
                      stacklevel=2)
        info = {}
    return AttackRecord(
        record_dir=record_dir, model_name=str(result["model_name"]), num_classes=num_classes,
        state_dict=_strip_module_prefix(result["model"]), clean_data=str(result["clean_data"]),
        data_path=str(result["data_path"]), img_size=img_size, bd_train=bd_train, bd_test=bd_test, info=info,
    )


def record_identity(record_dir: str | os.PathLike, trust_record: bool = False) -> dict:
    """What a study plans a record made elsewhere from, without decoding its images: dataset (clean_data), model
    (model_name), and the attack, pratio and attack_target of its info.pickle (None when it has none)."""
    record_dir = Path(record_dir)
    result = _read_attack_result(record_dir, trust_record)
    info = safe_torch_load(record_dir / "info.pickle", trust_record) if (record_dir / "info.pickle").is_file() else {}
    info = info if isinstance(info, Mapping) else {}
    return {"dataset": str(result["clean_data"]), "model": str(result["model_name"]), "attack": info.get("attack"),
            "pratio": info.get("pratio"), "attack_target": info.get("attack_target")}


# ----------------------------------------------------------------------------------------------- defense outputs

def save_model_result(path: str | os.PathLike, model_state: Mapping[str, torch.Tensor], model_name: str,
                      num_classes: int, **extra: Any) -> Path:
    """Atomically write ``{'model_name', 'num_classes', 'model', **extra}`` (defense_result.pt, ra_result.pt)."""
    _ensure_safe_loadable(extra, f"the extra values of {Path(path).name}")
    state = OrderedDict((k, v.detach().cpu().contiguous()) for k, v in model_state.items())  # plain layout on disk
    return atomic_torch_save({"model_name": model_name, "num_classes": int(num_classes), "model": state, **extra}, path)


def load_model_result(path: str | os.PathLike, trust_record: bool = False) -> dict:
    """Load a defense_result.pt / ra_result.pt and check it has model_name, num_classes and model."""
    path = Path(path)
    result = safe_torch_load(path, trust_record)
    _check_keys(result, MODEL_RESULT_KEYS, "model result", path)
    result = dict(result)
    result["model"] = _strip_module_prefix(result["model"])
    return result


def list_defenses(record_dir: str | os.PathLike) -> list[str]:
    """Sorted names of the ``defense/<name>/`` folders of a record that hold a defense_result.pt."""
    folder = Path(record_dir) / "defense"
    if not folder.is_dir():
        return []
    return sorted(p.name for p in folder.iterdir()
                  if not p.name.startswith(".") and (p / "defense_result.pt").is_file())


def summary_name(folder: str | os.PathLike) -> str | None:
    """The ``<name>`` of the metrics summary ``<name>_df_summary.csv`` of an output folder, or None when it has none.

    A defense writes its summary under its own folder name (``pam``) even when the folder is named otherwise
    (``--save_name my_pam``, PAM's rho sweep ``pam_rho0.5``): the folder's own name first, else the summary of the
    method named in its config.yaml, else the only summary in the folder."""
    folder = Path(folder)
    if (folder / f"{folder.name}_df_summary.csv").is_file():
        return folder.name
    found = sorted(p.name[: -len("_df_summary.csv")] for p in folder.glob("*_df_summary.csv")
                   if not p.name.startswith("."))
    if len(found) == 1:
        return found[0]
    cfg = folder / "config.yaml"
    if found and cfg.is_file():

        with contextlib.suppress(yaml.YAMLError, OSError, UnicodeDecodeError):
            meta = yaml.safe_load(cfg.read_text()) or {}
            for key in ("defense", "retune_attack", "analysis"):
                name = meta.get(key) if isinstance(meta, dict) else None
                if name is not None:

                    method = registry.by_folder("defense", str(name)) or next(
                        (m for m in registry.methods() if m.name == str(name)), None)
                    for cand in (str(name), getattr(method, "folder", None)):
                        if cand in found:
                            return cand
    return None


def resolve_record_dir(result_file: str | os.PathLike, record_root: str | os.PathLike = "./record") -> Path:
    """A record folder from a bare name (``<record_root>/<name>``) or a path to an existing folder."""

    given = Path(result_file)
    root = Path(record_root)
    for cand in (given, root / given):  # a run killed while replacing the record may have left it aside
        if not cand.exists() and cand.name not in ("", ".", ".."):
            recover(cand)
    if given.is_dir():
        return given
    if (root / given).is_dir():
        return root / given
    existing = (sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")) if root.is_dir()
                else [])
    listing = f"records under {root}: {', '.join(existing)}" if existing else f"there are no records under {root}"
    raise RecordError(f"record {str(result_file)!r} not found (neither {given} nor {root / given} is a folder); "
                      f"{listing}; {_missing_record_hint(given)}")


if __name__ == "__main__":  # python -m bdsafety.records RECORD: the record inspector (bdsafety.inspector)
    from bdsafety.inspector import main

    raise SystemExit(main())
