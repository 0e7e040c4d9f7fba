"""Open a record as an experiment: the shared plumbing of every defense, retuning attack and analysis.

``open_experiment(cfg)`` reads record/<result_file>/ (this project's or BackdoorBench's), rebuilds the
clean data it was made from, and gives models, device-resident datasets, the three test views (C-Acc / ASR /
RA), the defender's reserved clean subset, and an atomic writer for an output folder.
"""
from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch

from bdsafety import engine, models
from bdsafety.config import POS_INT, RUN_SCHEMA, SEED, Option, dump_yaml, resolve_device, run_metadata
from bdsafety.data import datasets
from bdsafety.data.device import DeviceDataset, InputGeometry, Normalizer, input_geometry
from bdsafety.data.info import NORMALIZATIONS
from bdsafety.errors import ConfigError, DataError
from bdsafety.models import load_state_dict_compat
from bdsafety.outputs import DEPENDENTS, OutputFolder, write_artifact
from bdsafety.pools import real_poisoned
from bdsafety.records import (
    load_attack_record,
    load_model_result,
    resolve_record_dir,
    save_model_result,
    write_metrics_csv,
)
from bdsafety.registry import kind_runner
from bdsafety.safeio import RecordError, atomic_write_text

RECORD_SCHEMA = {
    "result_file": Option(None, "record folder: a name under record_root, or a path"),
    "record_root": Option("./record", "folder holding record folders (e.g. a BackdoorBench checkout's record/)"),
    "dataset_path": Option(None, "folder holding <dataset>/ (default: from the record's data_path)"),
    "model": Option(None, "expected model name; must match the record's (the record decides)", kind="model"),
    "device": Option("auto", "cpu, cuda, cuda:N or auto", kind="device"),
    "model_input_size": Option(None, "size the model upsamples every batch to (default: the record's model_input_size, "
                                     "as the attack trained it)", type=int, check=POS_INT),
    "input_resize": Option(None, "resize of the TRAINING images of this run before the crop (default: the record's "
                                 "input_resize, i.e. the attack's pipeline; e.g. 256 with input_crop 224 for "
                                 "PAM/BTI-DBF as the official BTIDBF loader). "
                                 "Evaluation always uses the record's own view", type=int, check=POS_INT),
    "input_crop": Option(None, "with input_resize: random crop (training, after zero padding 4) and centre crop size "
                               "(default: the record's, else input_resize)", type=int, check=POS_INT),
    "normalization": Option(None, "input normalisation: default the record's (records without it: dataset); 'imagenet' "
                                  "for records of the official fork's CIFAR-100/Tiny pipeline, which normalises with "
                                  "ImageNet statistics", choices=NORMALIZATIONS),
    "random_seed": Option(0, "seed for data subsets, init and batch order", check=SEED),
    "trust_record": Option(False, "allow full unpickling of record files (only for files you trust: "
                                  "a pickle can run code)"),
    "overwrite": Option(False, "replace an existing output folder"),
    "dependents": Option("ask", "with --overwrite, results stored inside the output being replaced (a defense's ra/, "
                                "qra/): 'ask' refuses and lists them, 'delete' deletes them, 'archive' moves the old "
                                "output with them to .archive/", choices=DEPENDENTS),
    "no_progress": Option(False, "disable progress bars"),
    "eval_batch_size": Option(1024, "evaluation batch size", check=POS_INT),
    **RUN_SCHEMA,
}


@dataclass
class Experiment:
    record: "object"  # bdsafety.records.AttackRecord
    record_dir: Path
    data: "object"  # bdsafety.data.datasets.CleanData
    device: str
    norm: Normalizer
    evalsets: engine.EvalSets
    cfg: SimpleNamespace
    geometry: InputGeometry | None = None  # this run's training input pipeline
    eval_geometry: InputGeometry | None = None  # the record's (the attack's evaluation view): evalsets use it
    _train: DeviceDataset | None = field(default=None, repr=False)

    @property
    def info(self):
        return self.data.info

    @property
    def num_classes(self) -> int:
        return int(self.record.num_classes)

    @property
    def model_name(self) -> str:
        return self.record.model_name

    @property
    def target(self) -> int | None:
        return self.record.attack_target

    @property
    def progress(self) -> bool:
        return not getattr(self.cfg, "no_progress", False)

    def new_model(self) -> torch.nn.Module:

        h, w, c = (int(v) for v in self.record.img_size)
        g = self.eval_geometry
        img_size = (h, w, c) if g is None else (g.crop, g.crop, c)  # with a geometry the model sees crop-size batches
        try:
            model = models.build_model(self.model_name, self.num_classes, img_size, input_size=self.model_input_size)
        except ConfigError as e:
            raise ConfigError(f"record {self.record_dir}: its attack_result.pt names model {self.model_name!r}, which "
                              f"cannot be built here: {e}") from None
        return engine.prepare_model(model, self.device)

    @property
    def model_input_size(self) -> int | None:
        """The size the model upsamples inputs to: --model_input_size, else what the attack trained with (the
        record's info), else None (the data's own size)."""
        return _model_input_size(self.record, self.cfg)

    def dataset(self, images, labels, frozen=None) -> DeviceDataset:
        """A training dataset of this run (its input geometry) from uint8 (N, H, W, C) images."""
        return DeviceDataset(images, labels, self.device, frozen=frozen, geometry=self.geometry)

    def load_model(self, state_dict) -> torch.nn.Module:

        model = self.new_model()
        try:
            load_state_dict_compat(model, state_dict)
        except (ValueError, TypeError) as e:  # a damaged or foreign model file: the user's to fix, not a bug

            raise RecordError(f"record {self.record_dir}: "
                              f"{e}{_input_size_hint(state_dict, self.model_input_size)}") from None
        return model

    def backdoored_model(self) -> torch.nn.Module:
        return self.load_model(self.record.state_dict)

    def model_from_file(self, path) -> torch.nn.Module:
        """A model from defense_result.pt / ra_result.pt, checked against the record's architecture."""

        res = load_model_result(path, trust_record=self.cfg.trust_record)
        if res["model_name"] != self.model_name or int(res["num_classes"]) != self.num_classes:
            raise DataError(
                f"{path} holds a {res['model_name']} with {res['num_classes']} classes, but record "
                f"{self.record_dir.name} is a {self.model_name} with {self.num_classes} classes: "
                f"it belongs to another record"
            )
        return self.load_model(res["model"])

    @property
    def train(self) -> DeviceDataset:
        """The clean training set on the device."""
        if self._train is None:
            self._train = self.dataset(self.data.train_x, self.data.train_y)
        return self._train

    def bd_train(self) -> DeviceDataset:
        """The attack's real poisoned training samples, with their backdoor labels (cross samples skipped)."""

        bd = real_poisoned(self.record.bd_train, self.record.info)
        if bd is None or len(bd) == 0:
            raise DataError(
                f"record {self.record_dir.name} has no poisoned training samples (bd_train is "
                f"{'None' if bd is None else 'empty'}: e.g. a clean reference model or a "
                f"training-controlled attack such as LIRA)"
            )
        return self.dataset(bd.images, bd.bd_labels)

    def metrics(self, model) -> dict:
        return engine.backdoor_metrics(model, self.evalsets, self.norm, self.cfg.eval_batch_size)


def _input_size_hint(state_dict, input_size: int | None) -> str:
    """For a ViT whose positional embedding was made for another input size: which size it was trained at."""
    pos = state_dict.get("encoder.pos_embedding") if hasattr(state_dict, "get") else None
    conv = state_dict.get("conv_proj.weight") if hasattr(state_dict, "get") else None
    if not (torch.is_tensor(pos) and torch.is_tensor(conv) and pos.dim() == 3):
        return ""
    side = math.isqrt(int(pos.shape[1]) - 1) * int(conv.shape[-1])
    if input_size == side:
        return ""
    return (f". This ViT was trained at {side} px input (its positional embedding has {int(pos.shape[1])} tokens) but "
            f"is opened at {input_size or 224} px: pass --model_input_size {side}")


def data_location(record, record_dir: Path, dataset_path: str | None) -> str:
    """Where the clean data of a record lives.

    With --dataset_path: <dataset_path>/<clean_data>. Otherwise BackdoorBench's rule: the record's data_path
    ('./data/cifar10') resolved against the folder that holds record/ (parent of the record root).
    """
    if dataset_path:
        return os.path.join(dataset_path, record.clean_data)
    dp = str(record.data_path)
    if os.path.isabs(dp):
        return dp if os.path.exists(dp) else os.path.join(".", "data", record.clean_data)
    root = record_dir.resolve().parent.parent
    cand = root / dp
    return str(cand) if cand.exists() or not Path(dp).exists() else dp


def _model_input_size(record, cfg) -> int | None:
    size = getattr(cfg, "model_input_size", None)
    if size is None:
        size = (record.info or {}).get("model_input_size")
    return None if size is None else int(size)


def record_geometry(record, data_info) -> InputGeometry | None:
    """The input geometry the attack evaluated (and trained) with: the record's input_resize / input_crop; for a
    record without them whose img_size differs from the clean data's (the official fork's CIFAR-100/Tiny records:
    poisoned images stored at img_size 224, every image resized to img_size by the transform), Resize(img_size)
    + crop img_size; otherwise None (the data's own size)."""
    info = record.info or {}
    resize = info.get("input_resize")
    if resize is None:
        rh, rw = (int(v) for v in record.img_size[:2])
        if (rh, rw) == tuple(int(v) for v in data_info.img_size[:2]) or rh != rw:
            return None
        resize = rh
    return input_geometry(int(resize), info.get("input_crop"))


def run_geometry(record, data_info, cfg) -> tuple[InputGeometry | None, InputGeometry | None]:
    """(record's geometry for evaluation, this run's training geometry: --input_resize/--input_crop over the
    record's)."""
    rec = record_geometry(record, data_info)
    resize, crop = getattr(cfg, "input_resize", None), getattr(cfg, "input_crop", None)
    if resize is None and crop is None:
        train = rec
    else:  # what is not given comes from the record's geometry (crop: else the resize)
        resize = resize if resize is not None else (rec.resize if rec is not None else None)
        crop = crop if crop is not None else (rec.crop if rec is not None else None)
        train = input_geometry(resize, crop)
    size = _model_input_size(record, cfg)
    for g in (rec, train):
        if g is not None and size is not None and size != g.crop:
            raise ConfigError(f"model_input_size {size} and the input crop {g.crop} ({g.describe()}) disagree: the "
                              f"batches already reach the model at {g.crop} px; "
                              f"drop --model_input_size or --input_crop")
    return rec, train


def load_record_data(record, record_dir: Path, dataset_path: str | None = None):

    kw = {}
    info = record.info or {}
    if record.clean_data == "synthetic":
        kw = dict(n_train=int(info.get("synthetic_n_train", 5000)), n_test=int(info.get("synthetic_n_test", 1000)),
                  seed=int(info.get("synthetic_seed", 0)), difficulty=float(info.get("synthetic_difficulty", 0.0)))
    elif record.clean_data == "imagefolder":
        kw = dict(img_size=tuple(record.img_size[:2]))
    data = datasets.load_clean_dataset(record.clean_data, data_location(record, record_dir, dataset_path), **kw)
    if (len(data.train_y) != record.bd_test.length and record.bd_train is not None
            and len(data.train_y) != record.bd_train.length):
        if record.clean_data == "synthetic" and not record.info:
            fix = (f"its info.pickle, which holds the synthetic data's settings, is missing: copy it back into "
                   f"{record_dir} (or re-run the attack)")
        else:
            fix = "point --dataset_path at the data the record was made from"
        raise DataError(
            f"the clean {record.clean_data} data found has {len(data.train_y)} training images but record "
            f"{record_dir.name} was made on {record.bd_train.length}: {fix}"
        )
    return data


def open_experiment(cfg: SimpleNamespace) -> Experiment:

    if not cfg.result_file:
        raise ConfigError("--result_file is required: the record folder to work on (a name under "
                          "--record_root, or a path)")
    record_dir = resolve_record_dir(cfg.result_file, cfg.record_root)
    record = load_attack_record(record_dir, trust_record=cfg.trust_record)
    if getattr(cfg, "model", None) and cfg.model != record.model_name:
        raise ConfigError(
            f"--model {cfg.model} does not match record {record_dir.name}, which holds a {record.model_name}: the "
            f"model comes from the record; drop --model or pick the record made with {cfg.model}"
        )
    device = resolve_device(cfg.device)
    engine.seed_everything(cfg.random_seed)
    data = load_record_data(record, record_dir, cfg.dataset_path)
    bd = record.bd_test
    rec_geometry, geometry = run_geometry(record, data.info, cfg)
    evalsets = engine.EvalSets(
        clean=DeviceDataset(data.test_x, data.test_y, device, geometry=rec_geometry),
        bd=DeviceDataset(bd.images, bd.bd_labels, device, geometry=rec_geometry),
        bd_orig_y=torch.as_tensor(bd.orig_labels, device=device),
    )
    normalization = getattr(cfg, "normalization", None) or (record.info or {}).get("normalization") or "dataset"
    return Experiment(record, record_dir, data, device, Normalizer(data.info, device, normalization), evalsets, cfg,
                      geometry=geometry, eval_geometry=rec_geometry)


# ---------------------------------------------------------------- defender's reserved clean subset
def reserved_indices(labels: np.ndarray, amount: float, *, balanced: bool = False, seed: int = 0,
                     num_classes: int | None = None) -> np.ndarray:
    """Indices of the defender's clean subset: ``amount`` < 1 is a ratio of the split, >= 1 a count.

    balanced=True takes the same number from every class (like BackdoorBench's class-balanced sampling);
    the same seed always gives the same subset.
    """
    labels = np.asarray(labels)
    n = len(labels)
    count = int(round(amount * n)) if amount < 1 else int(amount)
    if count <= 0 or count > n:
        raise ConfigError(f"reserved amount {amount} gives {count} samples out of {n}: "
                          f"use a ratio in (0, 1) or a count in [1, {n}]")
    rng = np.random.default_rng(seed)
    if not balanced:
        return np.sort(rng.choice(n, size=count, replace=False)).astype(np.int64)
    classes = np.arange(num_classes) if num_classes else np.unique(labels)
    per = count // len(classes)
    if per < 1:
        raise ConfigError(
            f"a class-balanced reserved subset of {count} samples cannot cover {len(classes)} classes; "
            f"raise the ratio to at least {len(classes) / n:.3g} (or {len(classes)} samples)"
        )
    out = []
    for c in classes:
        pool = np.flatnonzero(labels == c)
        if len(pool) < per:
            raise DataError(f"class {c} has only {len(pool)} samples, fewer than the {per} per class the "
                            f"reserved subset needs")
        out.append(rng.choice(pool, size=per, replace=False))
    return np.sort(np.concatenate(out)).astype(np.int64)


def write_run_files(folder: Path, name: str, cfg: SimpleNamespace, device: str, t0: float, rows: list[dict] | None,
                    index: np.ndarray | None = None, log_lines: list[str] = (), **meta) -> None:
    """The standard files of a run: <name>_df.csv, <name>_df_summary.csv (when rows is not None), config.yaml,
    log/<time>.log, log/index.txt."""

    folder = Path(folder)
    (folder / "log").mkdir(exist_ok=True)
    if rows is not None:
        write_metrics_csv(rows, folder, name)
    atomic_write_text(folder / "config.yaml", dump_yaml(run_metadata(cfg, device, time.time() - t0, **meta)))
    if index is not None:
        atomic_write_text(folder / "log" / "index.txt", "\n".join(str(int(i)) for i in index) + "\n")
    stamp = time.strftime("%Y_%m_%d_%H_%M_%S")
    atomic_write_text(folder / "log" / f"{stamp}.log", "\n".join(log_lines) + ("\n" if log_lines else ""))


@dataclass
class Output:
    """One output folder's content: written by ``write_output`` into an OutputFolder."""

    name: str  # run name: <name>_df.csv, <name>_df_summary.csv
    rows: list[dict] | None = None  # metrics per epoch (None: no csv)
    model_state: dict | None = None  # state_dict saved as ``model_file`` with model_name / num_classes
    model_file: str | None = None  # 'defense_result.pt', 'ra_result.pt'
    artifacts: dict[str, Any] = field(default_factory=dict)  # file name -> value (bdsafety.outputs.write_artifact)
    indices: dict[str, np.ndarray] = field(default_factory=dict)  # log/<key>.txt ('index' is BackdoorBench's index.txt)
    info: dict[str, Any] = field(default_factory=dict)  # extra values for config.yaml
    log_lines: list[str] = field(default_factory=list)
    started: float | None = None  # time.time() when the work of this output began (config.yaml's wall time)


def write_output(folder: Path, out: Output, exp, cfg: SimpleNamespace, t0: float) -> None:
    """Write ``out`` into the (temporary) folder ``folder`` of an OutputFolder."""
    folder = Path(folder)
    if out.model_state is not None:
        save_model_result(folder / (out.model_file or "model_result.pt"), out.model_state, exp.model_name,
                          exp.num_classes)
    for fname, value in out.artifacts.items():
        write_artifact(folder / fname, value)
    for key, arr in out.indices.items():
        if key != "index":
            write_artifact(folder / "log" / f"{key}.txt", "".join(f"{int(i)}\n" for i in np.asarray(arr).ravel()))
    write_run_files(folder, out.name, cfg, exp.device, t0, out.rows, index=out.indices.get("index"),
                    log_lines=out.log_lines, **out.info)


# ---------------------------------------------------------------- the runner of retuning attacks and analyses
@dataclass
class RecordRun:
    """What a retuning attack or analysis works with (built by ``run_on_record``): the opened record, its frozen config
    and the output folders it writes, key -> folder (from its ``outputs`` hook; every one checked before any work)."""

    exp: Experiment
    cfg: Any
    dests: dict[str, Path]


def run_on_record(method, cfg) -> list[Path]:
    """The runner of every retuning attack and analysis (registry kinds ``retune`` and ``analysis``).

    Opens the record, asks the method where it writes (``outputs(exp, cfg) -> {key: folder}``), refuses before any
    work when one of those cannot be written (an existing output without --overwrite, results inside it without
    --dependents), then runs the method, ``run(RecordRun) -> iterable of (key, Output)``, and writes each Output through
    the one output path (OutputFolder + ``write_output``) as soon as it is yielded. Returns the folders written."""
    t0 = time.time()
    exp = open_experiment(cfg)
    dests = {k: Path(d) for k, d in method.outputs(exp, cfg).items()}
    what = f"{method.name.upper()} output"
    folders = {k: OutputFolder(d, overwrite=cfg.overwrite, dependents=cfg.dependents, what=what)
               for k, d in dests.items()}
    written = []
    for key, out in method.run(RecordRun(exp, cfg, dests)):
        started = out.started if out.started is not None else t0
        with folders[key] as f:
            write_output(f.path, out, exp, cfg, started)
        print(f"[{method.name}:{key}] written to {dests[key]} ({time.time() - started:.0f}s)", flush=True)
        written.append(dests[key])
    if len(written) > 1:
        print(f"[{method.name}] {len(written)} outputs in {time.time() - t0:.0f}s", flush=True)
    return written


kind_runner("retune")(run_on_record)
kind_runner("analysis")(run_on_record)
