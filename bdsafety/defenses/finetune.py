"""Fine-tuning defenses: plain FT and the Feature Shift Tuning family (FST, LP, FE-tuning, FT-init).

All five are one algorithm, :func:`finetune`, with four switches (each a config value):

=========== =========== ============== ======= =====================
variant     reinit_head train_layers   alpha   head_norm_constraint
=========== =========== ============== ======= =====================
ft          no          all            0       no
lp          no          head           0       no
fe_tuning   yes         features       0       no
ft_init     yes         all            0       no
fst         yes         all            0.2     yes
=========== =========== ============== ======= =====================

Definitions follow "Towards Stable Backdoor Purification through Feature Shift Tuning" (Min et al., NeurIPS
2023) and its official code (``fine_tune/ft.py``, ``--ft_mode``):
  * FT: fine-tune every layer on the defender's clean data.
  * LP (linear probing): only the final linear layer trains; the feature extractor is frozen (with
    ``frozen_bn_eval`` its BatchNorm layers also stop updating running statistics, so the features are a
    fixed function; the official code leaves them in train mode).
  * FE-tuning (feature-extractor tuning): re-initialise the linear head, FREEZE it, train the feature
    extractor only.
  * FT-init: re-initialise the linear head, then fine-tune every layer.
  * FST: re-initialise the head, train every layer with CE + alpha * <W, W0>_F (W0 the ORIGINAL, backdoored
    head weight, saved before the re-initialisation) and after every step rescale W to ||W0||_F.
Re-initialisation draws weight and bias from U(-1/sqrt(fan_in), 1/sqrt(fan_in)) like the official code.
The official code applies the norm rescale to every mode; here only where the method defines it (FST).

Optimisation (official FST code): SGD lr 0.01, momentum 0.9, no weight decay, cosine schedule over 10
epochs, batch 128, on a 2% reserved split, BackdoorBench's train augmentation.
"""
from __future__ import annotations

import functools
import math
from types import SimpleNamespace
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from bdsafety import engine
from bdsafety.config import AMOUNT, NONNEG, POS_INT, POSITIVE, Option
from bdsafety.defenses.base import DefenseResult, defense_schema
from bdsafety.errors import ConfigError
from bdsafety.models import classifier_layer
from bdsafety.registry import register

# ------------------------------------------------------------------------------------------- configuration
OPTIM_SCHEMA = {
    "sgd_momentum": Option(0.9, "SGD momentum", check=NONNEG),
    "wd": Option(0.0, "weight decay", check=NONNEG),
    "lr_scheduler": Option("cosine", "per-epoch learning-rate schedule (cosine: CosineAnnealingLR, T_max=epochs)",
                           choices=("cosine", "none")),
}

TRAIN_LAYERS = ("all", "head", "features")

# variant -> (reinit_head, train_layers, alpha, head_norm_constraint)
VARIANTS: dict[str, dict] = {
    "ft": dict(reinit_head=False, train_layers="all", alpha=0.0, head_norm_constraint=False),
    "lp": dict(reinit_head=False, train_layers="head", alpha=0.0, head_norm_constraint=False),
    "fe_tuning": dict(reinit_head=True, train_layers="features", alpha=0.0, head_norm_constraint=False),
    "ft_init": dict(reinit_head=True, train_layers="all", alpha=0.0, head_norm_constraint=False),
    "fst": dict(reinit_head=True, train_layers="all", alpha=0.2, head_norm_constraint=True),
}

DESCRIPTIONS = {
    "ft": "FT: fine-tune all layers on the defender's clean data",
    "lp": "LP (linear probing): train only the final linear layer on the defender's clean data",
    "fe_tuning": "FE-tuning: re-initialise and freeze the linear head, train the feature extractor",
    "ft_init": "FT-init: re-initialise the linear head, fine-tune all layers",
    "fst": "FST (Feature Shift Tuning, NeurIPS 2023): re-initialised head, CE + alpha*<W, W0>_F, "
           "||W||_F fixed to ||W0||_F",
}


def finetune_schema(variant: str) -> dict:
    """Config keys of one fine-tuning variant; the variant only changes the defaults."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown fine-tuning variant {variant!r}; valid: {', '.join(VARIANTS)}")
    v = VARIANTS[variant]
    return defense_schema(
        ratio=Option(0.02, "defender's reserved clean data: ratio (<1) or count (>=1) of the training set (official "
                           "FST code: 0.02)", check=AMOUNT),
        epochs=Option(10, "training epochs", check=POS_INT),
        batch_size=Option(128, "batch size", check=POS_INT),
        lr=Option(0.01, "SGD learning rate", check=POSITIVE),
        **OPTIM_SCHEMA,
        reinit_head=Option(v["reinit_head"], "re-initialise the final linear layer before tuning"),
        train_layers=Option(v["train_layers"], "which parameters train: all, head (final linear layer) or features "
                                               "(everything but the head)", choices=TRAIN_LAYERS),
        alpha=Option(v["alpha"], "weight of the FST term <W, W0>_F (W0 = original head weight); 0 disables it",
                     check=NONNEG),
        head_norm_constraint=Option(v["head_norm_constraint"], "after every step rescale the head "
                                                               "weight to ||W0||_F (FST)"),
        frozen_bn_eval=Option(True, "BatchNorm layers whose parameters are all frozen run in eval mode (no "
                                    "running-stat updates)"),
    )


def check_common(cfg: SimpleNamespace) -> None:
    """Reject settings that cannot train, naming the fix."""
    if cfg.epochs < 1:
        raise ConfigError(f"epochs must be >= 1, got {cfg.epochs}")
    if cfg.batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1, got {cfg.batch_size}")
    if not (cfg.lr > 0 and math.isfinite(cfg.lr)):
        raise ConfigError(f"lr must be a positive number, got {cfg.lr}")
    if cfg.wd < 0 or cfg.sgd_momentum < 0:
        raise ConfigError(f"wd and sgd_momentum must be >= 0, got wd={cfg.wd}, sgd_momentum={cfg.sgd_momentum}")


# ------------------------------------------------------------------------------------------- building blocks
@torch.no_grad()
def reinit_linear_(layer: nn.Linear, generator: torch.Generator | None = None) -> nn.Linear:
    """Draw weight and bias from U(-1/sqrt(fan_in), 1/sqrt(fan_in)) in place (the FST code's re-initialisation)."""
    bound = 1.0 / math.sqrt(layer.weight.shape[1])
    for p in (layer.weight, layer.bias):
        if p is None:
            continue
        fresh = torch.empty(p.shape, dtype=p.dtype).uniform_(-bound, bound, generator=generator)
        p.copy_(fresh.to(p.device))
    return layer


def set_trainable(model: nn.Module, train_layers: str) -> list[nn.Parameter]:
    """Set requires_grad for 'all', 'head' (final linear layer only) or 'features' (all but the head);
    returns the trainable parameters."""
    if train_layers not in TRAIN_LAYERS:
        raise ConfigError(f"train_layers must be one of {TRAIN_LAYERS}, got {train_layers!r}")
    head_ids = {id(p) for p in classifier_layer(model).parameters()}
    out = []
    for p in model.parameters():
        is_head = id(p) in head_ids
        p.requires_grad_(train_layers == "all" or (train_layers == "head") == is_head)
        if p.requires_grad:
            out.append(p)
    if not out:
        raise ConfigError(f"train_layers={train_layers!r} leaves no parameter to train")
    return out


def frozen_batchnorms(model: nn.Module) -> list[nn.Module]:
    """BatchNorm layers with affine parameters that are all frozen (part of a frozen feature extractor)."""
    out = []
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            ps = list(m.parameters(recurse=False))
            if ps and not any(p.requires_grad for p in ps):
                out.append(m)
    return out


def keep_eval(modules: list[nn.Module], step_fn: Callable) -> Callable:
    """Wrap a step_fn so ``modules`` stay in eval mode (engine.fit puts the whole model in train mode each epoch)."""
    if not modules:
        return step_fn

    def step(model, x, y):
        for m in modules:
            m.eval()
        return step_fn(model, x, y)

    return step


def fst_loss(head: nn.Linear, w0: torch.Tensor, alpha: float, base: Callable = F.cross_entropy) -> Callable:
    """loss(logits, y) = base(logits, y) + alpha * <W, W0>_F with W the CURRENT head weight."""
    w0 = w0.detach()

    def loss_fn(logits, y):
        loss = base(logits, y)
        if alpha:
            loss = loss + alpha * (head.weight.float() * w0.float()).sum()
        return loss

    return loss_fn


def head_norm_projection(head: nn.Linear, target_norm: float) -> Callable:
    """after_step(model): rescale the head weight in place so that ||W||_F == target_norm."""

    def project(model):
        with torch.no_grad():
            n = head.weight.norm()
            if n > 0:
                head.weight.mul_(target_norm / n)

    return project


def make_sgd(params, cfg: SimpleNamespace):
    return engine.make_optimizer(params, "sgd", cfg.lr, cfg.sgd_momentum, cfg.wd)


def fit_reserved(exp, model, reserved, cfg, *, step_fn, optimizer, generator, batch_fn=None, desc: str) -> list[dict]:
    """engine.fit on the reserved data with the defense's schedule; rows carry test_acc/test_asr/test_ra."""
    sched = engine.make_scheduler(optimizer, cfg.lr_scheduler, cfg.epochs)
    return engine.fit(
        model, reserved, norm=exp.norm, epochs=cfg.epochs, batch_size=cfg.batch_size, step_fn=step_fn,
        scheduler=sched, optimizer=optimizer, batch_fn=batch_fn, hflip=exp.info.hflip, evalsets=exp.evalsets,
        eval_every=cfg.eval_every, eval_batch_size=cfg.eval_batch_size, generator=generator, desc=desc,
        progress=exp.progress,
    )


# ------------------------------------------------------------------------------------------- the algorithm
def finetune_step(model: nn.Module, cfg: SimpleNamespace, generator: torch.Generator | None = None):
    """Prepare ``model`` for one fine-tuning variant and build its step.

    Saves W0 (the original head weight), re-initialises the head if cfg.reinit_head, sets which parameters
    train, and returns (step_fn, optimizer, info) where step_fn is engine.sgd_step with the FST loss term and
    the head-norm projection when the config asks for them; info holds W0's norm, the trainable parameter
    count and the frozen BatchNorm layers kept in eval mode.
    """
    if cfg.alpha < 0 or not math.isfinite(cfg.alpha):
        raise ConfigError(f"alpha must be a finite number >= 0, got {cfg.alpha}")
    head = classifier_layer(model)
    w0 = head.weight.detach().clone()
    w0_norm = float(w0.norm())
    if cfg.reinit_head:
        reinit_linear_(head, generator)
    params = set_trainable(model, cfg.train_layers)
    if (cfg.alpha or cfg.head_norm_constraint) and not head.weight.requires_grad:
        raise ConfigError(f"alpha / head_norm_constraint act on the head, but train_layers={cfg.train_layers!r} "
                          f"freezes it: use train_layers all or head, or set alpha 0 and head_norm_constraint false")
    after = head_norm_projection(head, w0_norm) if cfg.head_norm_constraint else None
    opt = make_sgd(params, cfg)
    step = engine.sgd_step(opt, loss_fn=fst_loss(head, w0, cfg.alpha), after_step=after)
    frozen_bn = frozen_batchnorms(model) if cfg.frozen_bn_eval else []
    step = keep_eval(frozen_bn, step)
    info = {"head_weight_norm_original": w0_norm, "trainable_parameters": sum(p.numel() for p in params),
            "frozen_batchnorms": len(frozen_bn)}
    return step, opt, info


def finetune(ctx, name: str = "finetune") -> DefenseResult:
    """FT / LP / FE-tuning / FT-init / FST, selected by cfg.reinit_head, train_layers, alpha, head_norm_constraint."""
    exp, model, reserved, cfg, log = ctx.exp, ctx.model, ctx.reserved, ctx.cfg, ctx.log
    check_common(cfg)
    gen = engine.seed_everything(cfg.random_seed)
    step, opt, info = finetune_step(model, cfg, gen)
    log(f"reinit_head={cfg.reinit_head} train_layers={cfg.train_layers} ({info['trainable_parameters']} trainable "
        f"parameters) alpha={cfg.alpha} head_norm_constraint={cfg.head_norm_constraint} "
        f"||W0||_F={info['head_weight_norm_original']:.4f}; {info['frozen_batchnorms']} frozen "
        f"BatchNorm layers in eval mode")
    rows = fit_reserved(exp, model, reserved, cfg, step_fn=step, optimizer=opt, generator=gen, desc=name)
    for p in model.parameters():
        p.requires_grad_(True)
    model.eval()
    for r in rows:
        log(f"epoch {r['epoch']}: train_loss {r['train_loss']:.4f} {engine.format_metrics(r)}")
    info["head_weight_norm_final"] = float(classifier_layer(model).weight.detach().norm())
    return DefenseResult(model, rows, info=info)


def _register_variants() -> None:

    for variant in VARIANTS:
        def run(ctx, variant=variant):
            return finetune(ctx, name=variant)

        register("defense", variant, schema=functools.partial(finetune_schema, variant),
                 description=DESCRIPTIONS[variant])(run)


_register_variants()
