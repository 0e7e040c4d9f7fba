"""The one train/evaluate loop used by attacks, defenses and retuning attacks.

``fit`` owns the epoch/batch loop, augmentation, progress bar, per-epoch evaluation and NaN checks. What
differs between algorithms is plugged in:
  * ``batch_fn(x_uint8, y, idx) -> (x, y)`` turns an augmented uint8 batch into model input (normalised
    floats); defenses that mix in triggered or inverted samples replace it;
  * ``step_fn(model, x, y) -> (loss, logits)`` does forward, backward and the parameter update; SAM, PAM
    and FST replace it. ``sgd_step`` is the plain one.

Precision: every forward pass runs inside ``autocast(device)``, which follows the run's ``precision`` option
(``precision(name)``, entered once per run by bdsafety.registry.Method.run_config): fp32 by default (the official code's
numerics), bf16 autocast as the named speed option; ``fp32(device)`` switches autocast off inside it where bf16
would swamp the signal (PAM's displaced pass, black-box QRA's finite differences).
"""
from __future__ import annotations

import contextlib
import contextvars
import math
import random
import sys
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from bdsafety.config import PRECISIONS
from bdsafety.data.device import DeviceDataset, Normalizer, iterate_batches
from bdsafety.errors import ConfigError, TrainingDiverged
from bdsafety.outputs import fault_point

# A mean training loss above this is divergence, not learning: cross-entropy at chance is ln(classes) (5.3 for 200
# classes), and no bundled objective adds terms of this size. fit(max_loss=...) overrides it.
MAX_LOSS = 1e4


@torch.no_grad()
def check_finite_model(model: torch.nn.Module, what: str = "model") -> None:
    """Raise TrainingDiverged if any parameter or floating buffer of ``model`` is NaN/inf (checked on the final
    weights of every run before anything is saved)."""
    bad = [n for n, t in list(model.named_parameters()) + list(model.named_buffers())
           if t.is_floating_point() and not bool(torch.isfinite(t).all())]
    if bad:
        raise TrainingDiverged(f"{what}: {len(bad)} weight tensors hold NaN/inf after training (first: {bad[0]}); the "
                               f"run diverged. Lower the learning rate (lr) or check the data; "
                               f"nothing from this run was saved.")


def seed_everything(seed: int) -> torch.Generator:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
    g = torch.Generator()
    g.manual_seed(seed)
    return g


_PRECISION: contextvars.ContextVar[str] = contextvars.ContextVar("bdsafety_precision", default="fp32")


@contextlib.contextmanager
def precision(name: str):
    """Run the enclosed code (one run of a method) at precision ``name``: 'fp32' (the official code's numerics, the
    default) or 'bf16' (bf16 autocast: the named speed option). The run scaffold enters it once per run with the
    run's ``precision`` option; it is restored on exit (also on errors), so nothing leaks into the next run of the
    same process. Code outside any ``precision`` block runs in fp32."""
    if name not in PRECISIONS:
        raise ConfigError(f"precision {name!r} is not one of {', '.join(PRECISIONS)}")
    token = _PRECISION.set(name)
    try:
        yield
    finally:
        _PRECISION.reset(token)


_EVAL_SUBSET: contextvars.ContextVar[int] = contextvars.ContextVar("bdsafety_eval_subset", default=0)


@contextlib.contextmanager
def eval_subset(n: int):
    """Within the block, ``fit`` evaluates its intermediate epochs on a fixed, seeded subset of ``n`` samples of each
    test set (the run option ``eval_subset``, a speed option; 0: the full sets). The evaluation before training and
    the final one always use the full sets. Entered once per run by the run scaffold, restored on exit."""
    token = _EVAL_SUBSET.set(int(n or 0))
    try:
        yield
    finally:
        _EVAL_SUBSET.reset(token)


def current_precision() -> str:
    """The precision of the enclosing ``precision`` block ('fp32' outside any)."""
    return _PRECISION.get()


def autocast(device) -> contextlib.AbstractContextManager:
    """The run's precision for the forward passes of training and evaluation: nothing (fp32) under 'fp32'; bf16
    autocast on ``device``'s type under 'bf16' (on the CPU this is torch's CPU autocast: the same bf16 numerics,
    usually slower than fp32 unless the CPU has native bf16 instructions)."""
    if _PRECISION.get() == "bf16":
        return torch.autocast(torch.device(device).type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def fp32(device) -> contextlib.AbstractContextManager:
    """Autocast OFF (full fp32) inside an autocast region: for finite differences (black-box QRA) and PAM's small
    weight displacement, which bf16's 8-bit mantissa would swamp (METHODS.md, precision rules). Under 'fp32' it
    changes nothing."""
    return torch.autocast(torch.device(device).type, enabled=False)


def prepare_model(model: torch.nn.Module, device) -> torch.nn.Module:
    """The model on ``device`` with its convolution weights in channels-last memory format, on the CPU as on CUDA: the
    convolutions then take and return channels-last activations: on this project's CPU 1.15-1.5x per training step and
    1.4-1.9x per evaluation for the demo and benchmark models (benchmarks/compute_modes.py); only the floating-point
    order of the sums changes. Saved
    state dicts are written contiguous (bdsafety.records)."""
    return model.to(device).to(memory_format=torch.channels_last)


def make_optimizer(params, name: str = "sgd", lr: float = 0.01, momentum: float = 0.9, weight_decay: float = 0.0):
    name = name.lower()
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    raise ConfigError(f"unknown optimizer {name!r}; valid: sgd, adam")


def make_scheduler(optimizer, name: str, epochs: int, milestones=(), gamma: float = 0.1):
    """Per-epoch learning-rate schedule: 'cosine' (CosineAnnealingLR, T_max=epochs), 'multistep', or 'none'."""
    name = (name or "none").lower()
    if name == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, epochs))
    if name == "multistep":
        return torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=list(milestones), gamma=gamma)
    if name in ("none", "constant"):
        return None
    raise ConfigError(f"unknown lr scheduler {name!r}; valid: cosine, multistep, none")


@dataclass
class EvalSets:
    """The three test views behind C-Acc, ASR and RA.

    clean: the full clean test set. bd: the poisoned test images with their backdoor labels;
    bd_orig_y: the original labels of those images (for RA, robust accuracy).
    """

    clean: DeviceDataset
    bd: DeviceDataset | None = None
    bd_orig_y: torch.Tensor | None = None

    def subset(self, n: int, seed: int = 0) -> "EvalSets":
        """At most ``n`` samples of each set, the same ones every call (a seeded permutation per set)."""
        def pick(ds):
            if ds is None or len(ds) <= n:
                return None
            return torch.randperm(len(ds), generator=torch.Generator().manual_seed(seed))[:n].sort().values

        ci, bi = pick(self.clean), pick(self.bd)
        clean = self.clean if ci is None else self.clean.subset(ci)
        if bi is None:
            return EvalSets(clean, self.bd, self.bd_orig_y)
        orig = None if self.bd_orig_y is None else self.bd_orig_y[bi.to(self.bd_orig_y.device)]
        return EvalSets(clean, self.bd.subset(bi), orig)


@torch.no_grad()
def recompute_bn_stats(model, ds: DeviceDataset, norm: Normalizer, batch_size: int = 256, *, augment: bool = False,
                       hflip: bool = True, generator: torch.Generator | None = None) -> None:
    """Reset every BatchNorm's running statistics and re-estimate them as a cumulative average over one pass of ``ds``
    in train mode: in order, or shuffled through the train augmentation (``augment``, drawn from ``generator``). The
    model's train / eval mode is restored. Used where weights were moved without their statistics (LMC's
    interpolated models, TSC's curve points: the official update_bn)."""
    bns = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    saved = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None
    was = model.training
    model.train()
    for xb, _, _ in iterate_batches(ds, batch_size, shuffle=augment, augment=augment, hflip=hflip, generator=generator):
        model(norm.from_uint8(xb))
    model.train(was)
    for m, mom in zip(bns, saved):
        m.momentum = mom


@torch.no_grad()
def predict(model, ds: DeviceDataset, norm: Normalizer, batch_size: int = 1024,
            transform: Callable | None = None) -> torch.Tensor:
    """Predicted labels for every image of ``ds``; ``transform`` maps a [0,1] batch before normalising."""
    was_training = model.training
    model.eval()
    out = []
    for xb, _, _ in iterate_batches(ds, batch_size):
        x01 = xb.float().div_(255.0)
        if transform is not None:
            x01 = transform(x01)
        with autocast(ds.device):
            out.append(model(norm(x01)).argmax(1))
    model.train(was_training)
    return torch.cat(out) if out else torch.empty(0, dtype=torch.long, device=ds.device)


@torch.no_grad()
def evaluate_loss_acc(model, ds: DeviceDataset, norm: Normalizer, batch_size: int = 1024,
                      labels: torch.Tensor | None = None):
    """(mean cross-entropy, accuracy) of ``model`` on ``ds`` (against ``labels`` if given)."""
    return evaluate_label_sets(model, ds, norm, batch_size, [labels])[0]


def evaluate_label_sets(model, ds: DeviceDataset, norm: Normalizer, batch_size: int, label_sets: list) -> list:
    """[(mean cross-entropy, accuracy)] of ``model`` on ``ds`` against each of ``label_sets`` (None: the dataset's own
    labels), from ONE forward pass over the data (inference mode, eval mode, the training mode restored after)."""
    was_training = model.training
    model.eval()
    ys = [ds.y if labels is None else labels.to(ds.device) for labels in label_sets]
    tot_loss, correct = [0.0] * len(ys), [0] * len(ys)
    with torch.inference_mode():
        for xb, _, idx in iterate_batches(ds, batch_size):
            with autocast(ds.device):
                logits = model(norm.from_uint8(xb))
            logits, pred = logits.float(), logits.argmax(1)
            for k, y_all in enumerate(ys):
                y = y_all[idx]
                tot_loss[k] += F.cross_entropy(logits, y, reduction="sum").item()
                correct[k] += (pred == y).sum().item()
    model.train(was_training)
    n = max(1, len(ds))
    return [(t / n, c / n) for t, c in zip(tot_loss, correct)]


def backdoor_metrics(model, sets: EvalSets, norm: Normalizer, batch_size: int = 1024) -> dict:
    """test_acc (C-Acc), test_asr (ASR), test_ra (RA), as fractions in [0, 1]; one forward pass per test set (ASR and
    RA are the poisoned test set's predictions against its backdoor and its original labels)."""
    loss, acc = evaluate_loss_acc(model, sets.clean, norm, batch_size)
    m = {"test_loss": loss, "test_acc": acc}
    if sets.bd is not None and len(sets.bd):
        (bd_loss, asr), (_, ra) = evaluate_label_sets(model, sets.bd, norm, batch_size, [None, sets.bd_orig_y])
        m.update(bd_test_loss=bd_loss, test_asr=asr, test_ra=ra)
    return m


def sgd_step(optimizer, loss_fn: Callable = F.cross_entropy, after_step: Callable | None = None) -> Callable:
    """The plain step: forward, loss, backward, optimizer step (then ``after_step(model)``, e.g. a projection)."""

    def step(model, x, y):
        optimizer.zero_grad(set_to_none=True)
        with autocast(x.device):
            logits = model(x)
            loss = loss_fn(logits.float(), y)
        loss.backward()
        optimizer.step()
        if after_step is not None:
            after_step(model)
        return loss.detach(), logits.detach()

    return step


def use_progress(progress: bool | None) -> bool:
    if progress is None:
        return sys.stderr.isatty()
    return bool(progress) and sys.stderr.isatty()


def fit(
    model: torch.nn.Module,
    train: DeviceDataset,
    *,
    norm: Normalizer,
    epochs: int,
    batch_size: int,
    step_fn: Callable,
    scheduler=None,
    optimizer=None,
    batch_fn: Callable | None = None,
    augment: bool = True,
    hflip: bool = True,
    evalsets: EvalSets | None = None,
    eval_every: int = 1,
    eval_at_start: bool = False,
    eval_batch_size: int = 1024,
    generator: torch.Generator | None = None,
    desc: str = "train",
    progress: bool | None = None,
    on_epoch_end: Callable | None = None,
    max_loss: float = MAX_LOSS,
) -> list[dict]:
    """Train ``model`` for ``epochs`` on ``train``; return one metrics row per epoch (epoch 0 = before training
    when ``eval_at_start``). Test metrics are computed every ``eval_every`` epochs and at the last epoch
    (NaN elsewhere). Raises TrainingDiverged when an epoch's mean loss is not finite or exceeds ``max_loss``.
    """

    if batch_fn is None:
        batch_fn = lambda xb, y, idx: (norm.from_uint8(xb), y)  # noqa: E731
    rows: list[dict] = []
    if eval_at_start and evalsets is not None:
        rows.append({"epoch": 0, "train_loss": math.nan, "train_acc": math.nan,
                     **_test_metrics(model, evalsets, norm, eval_batch_size)})
    if epochs < 1 or batch_size < 1:
        raise TrainingDiverged(f"{desc}: {epochs} epochs of batch size {batch_size} make no optimizer step; "
                               f"both must be >= 1")
    if len(train) == 0:
        raise TrainingDiverged(f"{desc}: the training data is empty, so no optimizer step would be made")
    steps_per_epoch = math.ceil(len(train) / batch_size)
    start_norm = weight_norm(model)
    n_sub = _EVAL_SUBSET.get()
    curve_sets = evalsets.subset(n_sub) if evalsets is not None and n_sub > 0 else evalsets
    bar = tqdm(total=epochs * steps_per_epoch, desc=desc, disable=not use_progress(progress), dynamic_ncols=True,
               leave=False)
    try:
        for epoch in range(1, epochs + 1):
            model.train()
            tot_loss = torch.zeros((), device=train.device)
            tot_correct = torch.zeros((), device=train.device)
            seen = 0
            for xb, y, idx in iterate_batches(train, batch_size, shuffle=True, augment=augment, hflip=hflip,
                                              generator=generator):
                x, y = batch_fn(xb, y, idx)
                loss, logits = step_fn(model, x, y)
                tot_loss += loss * len(y)
                tot_correct += (logits.argmax(1) == y).sum()
                seen += len(y)
                bar.update(1)
            if seen == 0:
                raise TrainingDiverged(f"{desc}: epoch {epoch} made no optimizer step (no training batch); check the "
                                       f"training data and batch size; nothing from this run was saved")
            train_loss = tot_loss.item() / seen
            last_loss = float(loss)
            if not math.isfinite(last_loss) and math.isfinite(train_loss):
                train_loss = last_loss  # the last step diverged: report it as the epoch's loss
            if not math.isfinite(train_loss) or train_loss > max_loss:
                raise TrainingDiverged(
                    f"{desc}: the training loss became {train_loss:.4g} in epoch {epoch}"
                    + ("" if not math.isfinite(train_loss) else f" (above {max_loss:g}: diverged)")
                    + ". Lower the learning rate (lr) or check the data; nothing from this run was saved."
                )
            lr = optimizer.param_groups[0]["lr"] if optimizer is not None else math.nan
            if scheduler is not None:
                scheduler.step()
            row = {"epoch": epoch, "train_loss": train_loss, "train_acc": tot_correct.item() / max(1, seen), "lr": lr}
            if evalsets is not None:
                if epoch == epochs:
                    row.update(_test_metrics(model, evalsets, norm, eval_batch_size))
                elif epoch % max(1, eval_every) == 0:  # the curve: the full sets, or the eval_subset option's
                    row.update(_test_metrics(model, curve_sets, norm, eval_batch_size))
                else:
                    row.update({k: math.nan for k in ("test_loss", "test_acc", "test_asr", "test_ra")})
            if on_epoch_end is not None:
                on_epoch_end(epoch, row)
            rows.append(row)
            if epoch == 1:
                fault_point("train")
            bar.set_postfix({k: f"{row[k]:.3f}" for k in ("train_loss", "test_acc", "test_asr")
                             if k in row and not math.isnan(row[k])})
    finally:
        bar.close()
    check_finite_model(model, desc)
    check_health(model, rows, desc, start_norm, max_loss)
    return rows


# the weights' global L2 norm may grow this many times over one training run before it counts as a divergence
MAX_WEIGHT_GROWTH = 100.0


def weight_norm(model: torch.nn.Module) -> float:
    """Global L2 norm of the floating-point parameters."""
    with torch.no_grad():
        norms = [p.detach().float().norm() for p in model.parameters() if p.is_floating_point()]
        return float(torch.linalg.vector_norm(torch.stack(norms))) if norms else 0.0


def check_health(model: torch.nn.Module, rows: list[dict], desc: str, start_norm: float,
                 max_loss: float = MAX_LOSS) -> None:
    """The state after the last step, not only the training losses: a non-finite or exploding loss on the final
    evaluation, or weights whose norm grew by orders of magnitude (``MAX_WEIGHT_GROWTH``), are a divergence."""
    last = next((r for r in reversed(rows) if not math.isnan(r.get("test_loss", math.nan))), None)
    if last is not None:
        for key in ("test_loss", "bd_test_loss"):
            v = last.get(key)
            if v is not None and (not math.isfinite(v) or (key == "test_loss" and v > max_loss)):
                raise TrainingDiverged(f"{desc}: the final evaluation's {key} is {v:.4g}: the model diverged. Lower "
                                       f"the learning rate (lr); nothing from this run was saved.")
    end = weight_norm(model)
    if start_norm > 0 and end > MAX_WEIGHT_GROWTH * start_norm:
        raise TrainingDiverged(f"{desc}: the weights' norm grew from {start_norm:.4g} to {end:.4g} (over "
                               f"{MAX_WEIGHT_GROWTH:g}x): the run diverged. Lower the learning rate (lr); nothing from "
                               f"this run was saved.")


def _test_metrics(model, evalsets, norm, batch_size):
    m = backdoor_metrics(model, evalsets, norm, batch_size)
    m.setdefault("test_asr", math.nan)
    m.setdefault("test_ra", math.nan)
    return m


def format_metrics(m: dict) -> str:
    """'C-Acc 93.10%  ASR 97.20%  RA 2.10%' for the terminal (files keep fractions)."""
    parts = []
    for key, label in (("test_acc", "C-Acc"), ("test_asr", "ASR"), ("test_ra", "RA")):
        v = m.get(key)
        if v is not None and not (isinstance(v, float) and math.isnan(v)):
            parts.append(f"{label} {100 * v:.2f}%")
    return "  ".join(parts)
