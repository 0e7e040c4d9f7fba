"""What every defense shares: its config keys, its inputs (``DefenseContext``), its typed result
(``DefenseResult``) and the run scaffold that writes ``record/<rf>/defense/<folder>/`` in BackdoorBench's format.

A defense is one registered function ``run(ctx: DefenseContext) -> DefenseResult``::

    @register("defense", "my_defense", schema=lambda: defense_schema(my_option=Option(...)), description="...")
    def my_defense(ctx):
        rows = engine.fit(ctx.model, ctx.reserved, ...)
        return DefenseResult(ctx.model, rows, artifacts={"my_mask.pt": {...}}, info={"my_value": 3})

The scaffold (``run_defense``) does everything else: opens the record, draws the defender's reserved clean subset
(and its validation part), evaluates before and after, checks the final weights are finite, and writes the
folder through the one safe output path (bdsafety.outputs.OutputFolder): defense_result.pt, <name>_df.csv,
<name>_df_summary.csv, config.yaml, log/<time>.log, log/index.txt (the reserved subset), log/val_index.txt,
every artifact, and every extra index file the defense reports (``indices``).
"""
from __future__ import annotations

import contextlib
import contextvars
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable

import numpy as np
import torch

from bdsafety.config import AMOUNT, POS_INT, Check, Option, read_index
from bdsafety.data.device import DeviceDataset
from bdsafety.engine import check_finite_model, format_metrics
from bdsafety.errors import ConfigError
from bdsafety.experiment import RECORD_SCHEMA, Output, open_experiment, reserved_indices, write_output
from bdsafety.outputs import OutputFolder
from bdsafety.registry import kind_runner
from bdsafety.selection import val_accuracy

DEFENSE_SCHEMA = {
    **RECORD_SCHEMA,
    "ratio": Option(0.05, "defender's reserved clean data: ratio (<1) or count (>=1) of the training set",
                    check=AMOUNT),
    "val_ratio": Option(0.0, "fraction of the reserved data held out as a clean validation split (never trained on; "
                             "used by methods that select something, e.g. a pruning threshold)",
                        check=Check(lo=0, hi=0.5, hi_open=True, text="a fraction in [0, 0.5)")),
    "balanced": Option(False, "draw the reserved data class-balanced"),
    "index": Option(None, "index.txt of a previous run: reuse that reserved subset (BackdoorBench's --index)",
                    kind="index_file"),
    "save_name": Option(None, "output folder name under defense/ (default: the defense's folder name)",
                        kind="folder_name"),
    "epochs": Option(10, "training epochs", check=POS_INT),
    "batch_size": Option(128, "batch size", check=POS_INT),
    "lr": Option(0.01, "learning rate", check=Check(lo=0, lo_open=True, text="a finite number > 0")),
    "eval_every": Option(1, "evaluate C-Acc/ASR/RA every N epochs (and at the last)", check=POS_INT),
}


class Prepared(Exception):
    """Raised in prepare mode (``prepare_only``) once a run's shared cache exists: the rest of the run is not done."""


_PREPARE_ONLY = contextvars.ContextVar("bdsafety_prepare_only", default=False)


@contextlib.contextmanager
def prepare_only():
    """Inside this block a defense run stops with ``Prepared`` as soon as the cache it shares with other runs exists
    (``shared_cache_ready``, e.g. the BTI-DBF trigger inversion of PAM, pam_reinvert and BTI-DBF(U)), and never writes
    its output: the study's Ray executor computes a shared inversion once this way, through the first run's own code
    path, so that the runs sharing it never hold a worker while they wait for it."""
    token = _PREPARE_ONLY.set(True)
    try:
        yield
    finally:
        _PREPARE_ONLY.reset(token)


def shared_cache_ready(what: str) -> None:
    """Called by a method once its shared cache (``what``) is in place: in prepare mode the run stops here."""
    if _PREPARE_ONLY.get():
        raise Prepared(what)


def defense_schema(**extra: Option) -> dict:
    return {**DEFENSE_SCHEMA, **extra}


@dataclass
class DefenseContext:
    """Everything a defense works with; built by ``run_defense``."""

    exp: Any  # bdsafety.experiment.Experiment
    model: torch.nn.Module  # a fresh copy of the backdoored model, on the device
    reserved: DeviceDataset  # the defender's clean training data (the validation part excluded)
    reserved_idx: np.ndarray  # its training-set indices
    val: DeviceDataset | None  # clean validation split carved from the reserved data (None when val_ratio is 0)
    val_idx: np.ndarray
    cfg: SimpleNamespace
    log: Callable[[str], None]
    name: str  # the registered defense name

    @property
    def device(self) -> str:
        return self.exp.device


@dataclass
class DefenseResult:
    """What a defense returns: the defended model, one metrics row per (evaluated) epoch, files to write beside
    defense_result.pt (name -> value, format chosen by type: bytes, str, DataFrame -> csv, uint8 image -> png,
    figure -> png, anything else torch.save), values for config.yaml, and extra index files for log/."""

    model: torch.nn.Module
    rows: list[dict]
    artifacts: dict[str, Any] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)
    indices: dict[str, np.ndarray] = field(default_factory=dict)


def reserved_subset(exp, cfg) -> tuple[np.ndarray, np.ndarray]:
    """(reserved training indices, validation indices) of the defender's clean data.

    From ``--index`` (a previous run's log/index.txt) or drawn with the seed; then ``val_ratio`` of it is held out
    (a seeded, separate draw) as the clean validation split. The same config always gives the same subsets."""
    n = len(exp.data.train_y)
    if cfg.index:
        idx = read_index(cfg.index, n, flag="--index")
    else:
        idx = reserved_indices(exp.data.train_y, cfg.ratio, balanced=cfg.balanced, seed=cfg.random_seed,
                               num_classes=exp.num_classes)
        if len(idx) < exp.num_classes and cfg.ratio < 1:
            raise ConfigError(f"ratio {cfg.ratio} reserves {len(idx)} samples for {exp.num_classes} classes: fewer "
                              f"than one per class; raise --ratio")
    val_ratio = float(getattr(cfg, "val_ratio", 0.0) or 0.0)
    if val_ratio <= 0:
        return idx, np.zeros(0, dtype=np.int64)
    n_val = int(round(val_ratio * len(idx)))
    if n_val < 1 or n_val >= len(idx):
        raise ConfigError(f"val_ratio {val_ratio} of {len(idx)} reserved samples gives {n_val} validation samples; "
                          f"choose a val_ratio that leaves at least one sample on each side")
    rng = np.random.default_rng([int(cfg.random_seed), 0x56414C])  # "VAL": a stream separate from the reserved draw
    val = np.sort(rng.choice(idx, size=n_val, replace=False)).astype(np.int64)
    return np.setdiff1d(idx, val).astype(np.int64), val


@kind_runner("defense")
def run_defense_method(method, cfg: SimpleNamespace):
    """The runner of every defense: one run (``run_defense``), or one per config of its ``expand`` hook (PAM's
    --rho_sweep) followed by its ``select`` hook, which picks one on validation data."""
    if method.expand is None:
        return run_defense(method, cfg)
    cfgs = method.expand(cfg)
    outs = [run_defense(method, c) for c in cfgs]
    if method.select is not None and len(cfgs) > 1:
        method.select(cfg, list(zip(cfgs, outs)))  # each run's own config with its output folder
    return outs


def run_defense(method, cfg: SimpleNamespace) -> Path:
    """Open the record, run the registered defense ``method``, write record/<rf>/defense/<save_name or folder>/."""
    t0 = time.time()
    exp = open_experiment(cfg)
    dest = exp.record_dir / "defense" / (cfg.save_name or method.folder)
    out = OutputFolder(dest, overwrite=cfg.overwrite, dependents=cfg.dependents, what="defense output")  # refuse early
    lines: list[str] = []

    def log(msg: str):
        lines.append(msg)
        print(f"[{method.name}] {msg}", flush=True)

    idx, val_idx = reserved_subset(exp, cfg)
    ctx = DefenseContext(exp=exp, model=exp.backdoored_model(), reserved=exp.train.subset(idx), reserved_idx=idx,
                         val=exp.train.subset(val_idx) if len(val_idx) else None, val_idx=val_idx, cfg=cfg, log=log,
                         name=method.name)
    before = exp.metrics(ctx.model)
    val_before = val_accuracy(ctx.model, ctx.val, exp.norm, cfg.eval_batch_size) if ctx.val is not None else None
    log(f"record {exp.record_dir.name}: {exp.model_name}, {exp.record.clean_data}, target {exp.target}; "
        f"{len(idx)} reserved clean samples" + (f" + {len(val_idx)} for validation" if len(val_idx) else "")
        + f"; before: {format_metrics(before)}")
    result = method.run(ctx)
    if _PREPARE_ONLY.get():  # the method shares no cache: nothing to prepare, and a prepare run never writes
        raise Prepared("")
    if not isinstance(result, DefenseResult):
        raise TypeError(f"defense {method.name} returned {type(result).__name__}, expected a DefenseResult")
    model = result.model
    check_finite_model(model, f"defense {method.name}")
    after = exp.metrics(model)
    rows = ([{"epoch": 0, **{k: before[k] for k in ("test_acc", "test_asr", "test_ra") if k in before}}]
            + list(result.rows))
    if any(math.isnan(rows[-1].get(k, math.nan)) for k in ("test_acc", "test_asr")):
        rows.append({"epoch": rows[-1].get("epoch", 0) + 1 if len(rows) > 1 else 1, **after})
    log(f"after: {format_metrics(after)}")
    validation = {}
    if ctx.val is not None:
        validation = {"val_acc_before": val_before,
                      "val_acc": val_accuracy(model, ctx.val, exp.norm, cfg.eval_batch_size),
                      "val_size": int(len(ctx.val))}
        log(f"validation C-Acc (held-out reserved data): {100 * val_before:.2f}% -> {100 * validation['val_acc']:.2f}%")
    indices = {"index": idx, **({"val_index": val_idx} if len(val_idx) else {}), **result.indices}
    with out:
        write_output(out.path, Output(
            name=method.folder, rows=rows, model_state={k: v.detach().cpu() for k, v in model.state_dict().items()},
            model_file="defense_result.pt", artifacts=result.artifacts, indices=indices, log_lines=lines,
            info=dict(defense=method.name, output_folder=dest.name, record=str(exp.record_dir), before=before,
                      after=after, **validation, **result.info)), exp, cfg, t0)
    log(f"written to {dest} ({time.time() - t0:.0f}s)")
    return dest
