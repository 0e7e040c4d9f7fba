"""EP, Exact Purification: the oracle reference defense of "Uncovering, Explaining, and Mitigating the
Superficial Safety of Backdoor Defense" (Min et al., NeurIPS 2024). Not BackdoorBench's "ep" (entropy-based
pruning): hence the folder name ``exact_purification``.

EP assumes the defender knows the real trigger. It fine-tunes the backdoored model on the reserved clean data
where, in every batch, a fraction ``p_rev`` of the images is replaced by REAL poisoned samples of
the attack that carry their TRUE (original) labels, so the model unlearns trigger -> target.

Where the triggered images come from: the record's bd_train images (the attack's own poisoned training
images, the PNGs of bd_train_dataset/) with ``record.bd_train.orig_labels``. A record made by BackdoorBench has
no triggered version of reserved images outside bd_train, so the triggered part of each batch is drawn
uniformly (without replacement within a batch, fresh every batch) from ALL of bd_train, excluding nothing:
poisoned samples whose clean original is also in the reserved set are used too, and for a dirty-label
all2one attack the poisoned samples whose true class IS the target keep that label (the paper's oracle
applies the trigger to every class as well). Triggered images get the same random crop / flip as the clean
ones. For clean-label attacks (SIG, LC) every bd_train sample's true label is the target, so EP built from
bd_train cannot unlearn anything: this is logged as a warning.

Defaults: fine-tuning as FT (SGD lr 0.01, momentum 0.9, no weight decay, cosine, 10 epochs, batch 128) on a
5% reserved split, p_rev 0.2 (the fraction PAM and BTI-DBF(U) replace by inverted samples; the
paper gives no separate EP value).
"""
from __future__ import annotations

import math
from typing import Callable

import numpy as np
import torch

from bdsafety import engine
from bdsafety.config import AMOUNT, OPEN_FRACTION, POSITIVE, POS_INT, ConfigError, Option
from bdsafety.data.device import DeviceDataset, Normalizer, random_crop_flip
from bdsafety.defenses.base import DefenseResult, defense_schema
from bdsafety.registry import register
from bdsafety.defenses.finetune import OPTIM_SCHEMA, check_common, fit_reserved, make_sgd


def ep_schema() -> dict:
    return defense_schema(
        ratio=Option(0.05, "defender's reserved clean data: ratio (<1) or count (>=1) of the training set", check=AMOUNT),
        epochs=Option(10, "training epochs", check=POS_INT),
        batch_size=Option(128, "batch size", check=POS_INT),
        lr=Option(0.01, "SGD learning rate", check=POSITIVE),
        **OPTIM_SCHEMA,
        p_rev=Option(0.2, "fraction of each batch replaced by real poisoned training samples with their true labels", check=OPEN_FRACTION),
    )


def true_label_pool(exp) -> DeviceDataset:
    """The attack's real poisoned training images (record bd_train) labelled with their TRUE labels."""
    bd = exp.bd_train()  # raises a clear error for records without poisoned training samples
    return bd.with_labels(torch.as_tensor(np.asarray(exp.record.bd_train.orig_labels), dtype=torch.long))


def mix_batch_fn(pool: DeviceDataset, fraction: float, norm: Normalizer, *, generator: torch.Generator | None = None,
                 augment: bool = True, hflip: bool = True) -> Callable:
    """batch_fn for engine.fit: replace round(fraction * n) images of each batch (the first positions of an
    already shuffled batch) by random ``pool`` samples with the pool's labels, then normalise."""
    if not 0.0 <= fraction <= 1.0:
        raise ConfigError(f"p_rev must be in [0, 1], got {fraction}")

    def batch_fn(xb, y, idx):
        n = len(y)
        k = int(round(fraction * n))
        if k > 0 and len(pool):
            if k <= len(pool):
                j = torch.randperm(len(pool), generator=generator)[:k]
            else:
                j = torch.randint(len(pool), (k,), generator=generator)
            j = j.to(pool.device)
            xp = pool.x[j]
            if augment:
                xp = random_crop_flip(xp, flip=hflip, generator=generator)
            xb = xb.clone()
            y = y.clone()
            xb[:k] = xp
            y[:k] = pool.y[j]
        return norm.from_uint8(xb), y

    return batch_fn


@register("defense", "exact_purification", schema=lambda: ep_schema(), needs=("poisoned_pool",),
          description="EP (Exact Purification): fine-tuning with real triggered samples carrying their true labels")
def exact_purification(ctx) -> DefenseResult:
    """Fine-tune all layers on reserved clean data mixed with real poisoned samples carrying their true labels."""
    exp, model, reserved, cfg, log = ctx.exp, ctx.model, ctx.reserved, ctx.cfg, ctx.log
    check_common(cfg)
    if not (0.0 < cfg.p_rev < 1.0) or math.isnan(cfg.p_rev):
        raise ConfigError(f"p_rev must be in (0, 1) (a fraction of each batch), got {cfg.p_rev}")
    gen = engine.seed_everything(cfg.random_seed)
    pool = true_label_pool(exp)
    bd = exp.record.bd_train
    differs = int((np.asarray(bd.orig_labels) != np.asarray(bd.bd_labels)).sum())
    log(f"{len(pool)} real poisoned training samples with their true labels ({differs} of them relabelled by the attack); "
        f"{cfg.p_rev:.0%} of every batch replaced by them")
    if differs == 0:
        log("WARNING: every poisoned training sample already carries its true label (a clean-label attack such as SIG or LC): "
            "EP built from bd_train only repeats the attack's own samples and cannot unlearn the trigger")
    params = list(model.parameters())
    opt = make_sgd(params, cfg)
    step = engine.sgd_step(opt)
    batch_fn = mix_batch_fn(pool, cfg.p_rev, exp.norm, generator=gen, augment=True, hflip=exp.info.hflip)
    rows = fit_reserved(exp, model, reserved, cfg, step_fn=step, optimizer=opt, generator=gen, batch_fn=batch_fn,
                        desc="exact_purification")
    model.eval()
    for r in rows:
        log(f"epoch {r['epoch']}: train_loss {r['train_loss']:.4f} {engine.format_metrics(r)}")
    return DefenseResult(model, rows, info={"poison_pool_size": len(pool), "poison_pool_relabelled": differs})
