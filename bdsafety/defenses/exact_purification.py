"""EP, Exact Purification: the oracle reference defense of "Uncovering, Explaining, and Mitigating the
Superficial Safety of Backdoor Defense" (Min et al., NeurIPS 2024). Not BackdoorBench's "ep" (entropy-based
pruning): hence the folder name ``exact_purification``.

EP assumes the defender knows the real trigger. It fine-tunes the backdoored model on the reserved clean data
where, in every batch, a fraction ``p_rev`` of the images is replaced by REAL poisoned samples of
the attack that carry their TRUE (original) labels, so the model unlearns trigger -> target.

Where the triggered images come from: the record's bd_train images (the attack's own poisoned training
images, the PNGs of bd_train_dataset/) with ``record.bd_train.orig_labels``, restricted to the DEFENDER's part
of the record's poisoned pool (bdsafety.pools: the retuning attacks draw from the other, attacker part, so EP is
never attacked with an image it was taught). The triggered part of each batch is drawn uniformly (without
replacement within a batch, fresh every batch) from that part; for a dirty-label all2one attack the poisoned
samples whose true class IS the target keep that label (the paper's oracle applies the trigger to every class
as well). Triggered images are not augmented (``augment_poison: true`` gives them the clean images' random
crop / flip, an ablation); the training indices used are written to log/defender_poison_index.txt. For clean-label
attacks (SIG, LC) every bd_train sample's true label is the target, so EP built from
bd_train cannot unlearn anything: this is logged as a warning.

Defaults: fine-tuning as FT (SGD lr 0.01, momentum 0.9, no weight decay, cosine, 10 epochs, batch 128) on a
5% reserved split, p_rev 0.2 (the fraction PAM and BTI-DBF(U) replace by inverted samples; the
paper gives no separate EP value).
"""
from __future__ import annotations

import math

import numpy as np

from bdsafety import engine
from bdsafety.config import OPEN_FRACTION, POS_INT, POSITIVE, Option
from bdsafety.defenses.base import DefenseResult, defense_schema
from bdsafety.defenses.finetune import OPTIM_SCHEMA, check_common, fit_reserved, make_sgd
from bdsafety.defenses.mixing import mixing_batch_fn, pool_replacer, true_label_pool
from bdsafety.errors import ConfigError
from bdsafety.registry import register


def ep_schema() -> dict:
    return defense_schema(
        epochs=Option(10, "training epochs", check=POS_INT),
        batch_size=Option(128, "batch size", check=POS_INT),
        lr=Option(0.01, "SGD learning rate", check=POSITIVE),
        **OPTIM_SCHEMA,
        p_rev=Option(0.2, "fraction of each batch replaced by real poisoned training samples with their true labels",
                     check=OPEN_FRACTION),
        augment_poison=Option(False, "ablation: give the real poisoned samples the clean images' random crop / flip"),
    )


@register("defense", "exact_purification", schema=lambda: ep_schema(), needs=("poisoned_pool",),
          description="EP (Exact Purification): fine-tuning with real triggered samples carrying their true labels")
def exact_purification(ctx) -> DefenseResult:
    """Fine-tune all layers on reserved clean data mixed with real poisoned samples carrying their true labels."""
    exp, model, reserved, cfg, log = ctx.exp, ctx.model, ctx.reserved, ctx.cfg, ctx.log
    check_common(cfg)
    if not (0.0 < cfg.p_rev < 1.0) or math.isnan(cfg.p_rev):
        raise ConfigError(f"p_rev must be in (0, 1) (a fraction of each batch), got {cfg.p_rev}")
    gen = engine.seed_everything(cfg.random_seed)
    pool, bd = true_label_pool(exp, "EP")
    differs = int((np.asarray(bd.orig_labels) != np.asarray(bd.bd_labels)).sum())
    log(f"{len(pool)} real poisoned training samples (the defender's part of the pool) with their true labels "
        f"({differs} of them relabelled by the attack); {cfg.p_rev:.0%} of every batch replaced by them")
    if differs == 0:
        log("WARNING: every poisoned training sample already carries its true label (a clean-label attack such as SIG "
            "or LC): EP built from bd_train only repeats the attack's own samples and cannot unlearn the trigger")
    params = list(model.parameters())
    opt = make_sgd(params, cfg)
    step = engine.sgd_step(opt)
    batch_fn = mixing_batch_fn(exp.norm, cfg.p_rev,
                               pool_replacer(pool, gen, augment=cfg.augment_poison, hflip=exp.info.hflip, what="EP"))
    rows = fit_reserved(exp, model, reserved, cfg, step_fn=step, optimizer=opt, generator=gen, batch_fn=batch_fn,
                        desc="exact_purification")
    model.eval()
    for r in rows:
        log(f"epoch {r['epoch']}: train_loss {r['train_loss']:.4f} {engine.format_metrics(r)}")
    return DefenseResult(model, rows, info={"poison_pool_size": len(pool), "poison_pool_relabelled": differs},
                         indices={"defender_poison_index": bd.indices})
