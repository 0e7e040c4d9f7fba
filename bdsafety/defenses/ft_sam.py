"""FT-SAM (Zhu et al., ICCV 2023, "Enhancing Fine-Tuning Based Backdoor Defense with Sharpness-Aware
Minimization"), plus the reusable pieces of any "gradient at a perturbed point" step (SAM, PAM).

One step of (adaptive) SAM on trainable weights w with loss L:
  g = grad L(w)                                   (BN running statistics update normally)
  e = rho * w^2 * g / || |w| * g ||_2             (adaptive; plain SAM: e = rho * g / ||g||_2; global norms)
  g' = grad L(w + e)                              (BN running statistics FROZEN in this pass)
  w <- w (restored exactly), then the base optimizer steps with g'.

Defaults are BackdoorBench's ft-sam config: rho 2.0, adaptive, label smoothing 0.1, SGD lr 0.01 momentum 0.9
wd 5e-4, batch 256, 100 epochs, cosine schedule, class-balanced 5% of the training set. Differences from
BackdoorBench's implementation: the cosine schedule steps once per epoch (BackdoorBench steps its
CosineAnnealingLR(T_max=epochs) once per BATCH, so its lr cycles every `epochs` batches), and rho is one
constant (BackdoorBench's rho_max = rho_min makes its rho scheduler constant too).
"""
from __future__ import annotations

import contextlib
import math
from typing import Callable, Iterable, Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F

from bdsafety import engine
from bdsafety.config import AMOUNT, NONNEG, POS_INT, POSITIVE, Check, Option
from bdsafety.defenses.base import DefenseResult, defense_schema
from bdsafety.defenses.finetune import OPTIM_SCHEMA, check_common, fit_reserved, make_sgd
from bdsafety.errors import ConfigError
from bdsafety.registry import register

EPS = 1e-12


# ------------------------------------------------------------------------------------------- reusable pieces
@contextlib.contextmanager
def frozen_bn_stats(model: nn.Module) -> Iterator[None]:
    """Inside the block, forward passes in train mode still normalise with batch statistics, but every
    BatchNorm's running_mean / running_var / num_batches_tracked is restored on exit (exactly)."""
    saved = []
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats and m.running_mean is not None:
            saved.append((m, m.running_mean.clone(), m.running_var.clone(),
                          None if m.num_batches_tracked is None else m.num_batches_tracked.clone()))
    try:
        yield
    finally:
        with torch.no_grad():
            for m, mean, var, nbt in saved:
                m.running_mean.copy_(mean)
                m.running_var.copy_(var)
                if nbt is not None:
                    m.num_batches_tracked.copy_(nbt)


def smooth_cross_entropy(smoothing: float = 0.0) -> Callable:
    """loss(logits, y): cross-entropy against a smoothed target: 1 - smoothing on the true class and
    smoothing / (C - 1) on each other class (BackdoorBench's / the FST code's convention; PyTorch's
    ``label_smoothing`` spreads smoothing / C over all classes instead). smoothing 0 is plain CE."""
    if not 0.0 <= smoothing < 1.0:
        raise ConfigError(f"label_smoothing must be in [0, 1), got {smoothing}")
    if smoothing == 0:
        return F.cross_entropy

    def loss_fn(logits, y):
        c = logits.shape[1]
        logp = F.log_softmax(logits, dim=1)
        target = torch.full_like(logp, smoothing / max(1, c - 1))
        target.scatter_(1, y.unsqueeze(1), 1.0 - smoothing)
        return -(target * logp).sum(1).mean()

    return loss_fn


def sam_perturbation(rho: float, adaptive: bool = True, eps: float = EPS) -> Callable:
    """perturb(params, grads) -> [e_i]: SAM's ascent step (see module doc); None where a grad is None."""

    @torch.no_grad()
    def perturb(params: list[torch.Tensor], grads: list[torch.Tensor | None]) -> list[torch.Tensor | None]:
        scaled = [None if g is None else (p.abs() * g if adaptive else g) for p, g in zip(params, grads)]
        norms = [s.float().norm() for s in scaled if s is not None]
        if not norms:
            return [None] * len(params)
        scale = rho / (torch.stack(norms).norm() + eps)
        return [None if g is None else ((p * p * g) if adaptive else g) * scale.to(g.dtype)
                for p, g in zip(params, grads)]

    return perturb


def perturbed_step(optimizer: torch.optim.Optimizer, params: Iterable[torch.Tensor], perturbation: Callable,
                   loss_fn: Callable = F.cross_entropy, *, needs_grad: bool = True, freeze_bn: bool = True,
                   after_step: Callable | None = None) -> Callable:
    """A step_fn for engine.fit that takes the gradient at a perturbed point w + e and applies it at w.

    perturbation(params, grads) -> list of e (None: leave that tensor alone). grads are the gradients at w
    when ``needs_grad`` (SAM), else None and the first pass is skipped (e.g. PAM, whose e depends only on w).
    The pass at w + e runs inside :func:`frozen_bn_stats` when ``freeze_bn``. Returns (loss, logits) of the
    first pass (of the perturbed pass when needs_grad is False).
    """
    params = [p for p in params if p.requires_grad]

    def forward_backward(model, x, y):
        with engine.autocast(x.device):
            logits = model(x)
            loss = loss_fn(logits.float(), y)
        loss.backward()
        return loss.detach(), logits.detach()

    def step(model, x, y):
        optimizer.zero_grad(set_to_none=True)
        first = None
        grads = None
        if needs_grad:
            first = forward_backward(model, x, y)
            grads = [p.grad for p in params]
        with torch.no_grad():
            e = perturbation(params, grads)
            saved = [None if ei is None else p.detach().clone() for p, ei in zip(params, e)]
            for p, ei in zip(params, e):
                if ei is not None:
                    p.add_(ei)
        optimizer.zero_grad(set_to_none=True)
        try:
            with frozen_bn_stats(model) if freeze_bn else contextlib.nullcontext():
                second = forward_backward(model, x, y)
        finally:
            with torch.no_grad():
                for p, old in zip(params, saved):
                    if old is not None:
                        p.copy_(old)
        optimizer.step()
        if after_step is not None:
            after_step(model)
        return first if first is not None else second

    return step


def sam_step(optimizer, params, rho: float, adaptive: bool = True, loss_fn: Callable = F.cross_entropy,
             freeze_bn: bool = True) -> Callable:
    """The (adaptive) SAM step_fn: :func:`perturbed_step` with :func:`sam_perturbation`."""
    return perturbed_step(optimizer, params, sam_perturbation(rho, adaptive), loss_fn, needs_grad=True,
                          freeze_bn=freeze_bn)


# ------------------------------------------------------------------------------------------- the defense
def ft_sam_schema() -> dict:
    return defense_schema(
        ratio=Option(0.05, "defender's reserved clean data: ratio (<1) or count (>=1) of the training set "
                           "(BackdoorBench: 0.05)", check=AMOUNT),
        balanced=Option(True, "draw the reserved data class-balanced (BackdoorBench's choose_by_class)"),
        epochs=Option(100, "training epochs (BackdoorBench ft-sam: 100 on cifar10/cifar100/tiny, 50 on gtsrb)",
                      check=POS_INT),
        batch_size=Option(256, "batch size", check=POS_INT),
        lr=Option(0.01, "SGD learning rate of the base optimizer", check=POSITIVE),
        **{**OPTIM_SCHEMA, "wd": Option(5e-4, "weight decay", check=NONNEG)},
        rho=Option(2.0, "SAM neighbourhood radius (BackdoorBench: 2.0; 8.0 for gtsrb and tiny)", check=NONNEG),
        adaptive=Option(True, "adaptive SAM: e = rho * w^2 g / || |w| g ||, else e = rho * g / ||g||"),
        label_smoothing=Option(0.1, "label smoothing of the training loss (BackdoorBench: 0.1; 0.0 for gtsrb and tiny)",
                               check=Check(lo=0, hi=1, hi_open=True, text="a number in [0, 1)")),
        freeze_bn=Option(True, "keep BatchNorm running statistics unchanged by the perturbed forward pass"),
    )


@register("defense", "ft_sam", schema=lambda: ft_sam_schema(),
          description="FT-SAM (ICCV 2023): fine-tuning with adaptive sharpness-aware minimization")
def ft_sam(ctx) -> DefenseResult:
    """Fine-tune all layers with (adaptive) SAM on the reserved data."""
    exp, model, reserved, cfg, log = ctx.exp, ctx.model, ctx.reserved, ctx.cfg, ctx.log
    check_common(cfg)
    if cfg.rho < 0 or not math.isfinite(cfg.rho):
        raise ConfigError(f"rho must be a finite number >= 0, got {cfg.rho}")
    gen = engine.seed_everything(cfg.random_seed)
    params = list(model.parameters())
    opt = make_sgd(params, cfg)
    step = sam_step(opt, params, cfg.rho, cfg.adaptive, smooth_cross_entropy(cfg.label_smoothing), cfg.freeze_bn)
    log(f"SAM rho={cfg.rho} adaptive={cfg.adaptive} label_smoothing={cfg.label_smoothing} freeze_bn={cfg.freeze_bn}; "
        f"SGD lr {cfg.lr} momentum {cfg.sgd_momentum} wd {cfg.wd}, {cfg.lr_scheduler} schedule, {cfg.epochs} epochs")
    rows = fit_reserved(exp, model, reserved, cfg, step_fn=step, optimizer=opt, generator=gen, desc="ft_sam")
    model.eval()
    for r in rows:
        log(f"epoch {r['epoch']}: train_loss {r['train_loss']:.4f} {engine.format_metrics(r)}")
    return DefenseResult(model, rows)
