"""BTI-DBF(U): unlearning with the BTI-DBF inverted trigger (Xu et al., ICLR 2024), the paper's baseline.

Rounds as in the official ``btidbfu.py`` without ``--use_pam`` (``--nround``, ``--ul_round``):
  round 1: trigger inversion (bdsafety.defenses.bti: pretrain G, benign-feature mask, train G, detect the
           target t^; cached in the record and shared with PAM / pam_reinvert: the same bti_ settings), then
           ``epochs`` of unlearning;
  round r > 1: re-learn the mask on (a copy of) the CURRENT, partly unlearned model, retrain G against it with the
           extra term CE(f(G(x)), t^) and the one generator Adam kept from round 1 (bti_optimizer shared), then
           ``epochs`` more of unlearning. Unlike PAM's loop, the official BTI-DBF(U) loop never freezes G.
Unlearning (one Adam optimiser, lr 1e-4, across all rounds): in every batch int(p_rev * n + 1) images x_i are
replaced by G(x_i) (normalised space, unclamped) and keep their TRUE labels; with x_mix the mixed batch,
    loss = CE(f(x_mix), y) + feat_weight * MSE(phi(x), phi(x_mix))
(phi = features before pooling; both passes in train mode, as the official code).
Defaults: the paper's fork of the official code (p_rev 0.2, Adam 1e-4, 30 epochs per round, 5 rounds; the
original BTI-DBF repository uses p_rev 0.1). All stages use one seeded reserved subset. Official-code pitfall not
reproduced: the committed btidbfu.py calls ``unlearn(classifier, bd_gen, folder_path)`` on a two-argument
``unlearn``, so its BTI-DBF(U) path stops with a TypeError before the first unlearning epoch.
Writes detected_target, true_target, target_match, target_votes and the generator digest of every round to
config.yaml.
"""
from __future__ import annotations

import time
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from bdsafety import engine
from bdsafety.config import FRACTION, NONNEG, POS_INT, POSITIVE, Option
from bdsafety.defenses import bti
from bdsafety.defenses.base import DefenseResult
from bdsafety.defenses.mixing import generator_replacer, mixing_batch_fn
from bdsafety.registry import register

NAME = "bti_dbf"

BTIDBF_SCHEMA = {
    "n_rounds": Option(5, "rounds of (re-)inversion + unlearning (official --nround)", check=POS_INT),
    "epochs": Option(30, "unlearning epochs per round (official --ul_round)", check=POS_INT),
    "lr": Option(1e-4, "Adam learning rate of the unlearning", check=POSITIVE),
    "wd": Option(0.0, "Adam weight decay of the unlearning", check=NONNEG),
    "p_rev": Option(0.2, "fraction of every batch replaced by G(x) with TRUE labels (count int(p_rev * n + 1), as the "
                         "official code)", check=FRACTION),
    "feat_weight": Option(1.0, "weight of MSE(phi(x), phi(x_mix)) in the unlearning loss", check=NONNEG),
    "augment": Option(True, "random crop (+ the dataset's flip) of the reserved data during unlearning"),
    "retrain_generator": Option(True, "in rounds after the first, re-learn the mask and retrain G (with CE to the "
                                      "detected target) against the current model (the official BTI-DBF(U) loop); "
                                      "false: ablation, G fixed after round 1"),
    "earlystop": Option(False, "stop before a round whose re-detected target differs from the first "
                               "(official --earlystop)"),
}


def unlearning_batch_fn(G: nn.Module, norm, p_rev: float) -> Callable:
    """batch_fn for engine.fit: ((normalised clean x, normalised mixed x), y), the official loop's count of
    min(B, int(p_rev * B + 1)) images replaced by G(x) (bdsafety.defenses.mixing)."""
    return mixing_batch_fn(norm, p_rev, generator_replacer(G, bti.apply_generator), count="bti", keep_clean=True,
                           space="normalized")


def unlearn_step(optimizer, feat_weight: float) -> Callable:
    """step_fn: CE(f(x_mix), y) + feat_weight * MSE(phi(x), phi(x_mix))."""

    def step(model, x, y):
        x_clean, x_mix = x
        optimizer.zero_grad(set_to_none=True)
        with engine.autocast(x_mix.device):
            feat_clean = model.features(x_clean)
            feat_mix = model.features(x_mix)
            logits = model.head(feat_mix)
        loss = F.cross_entropy(logits.float(), y) + feat_weight * F.mse_loss(feat_mix.float(), feat_clean.float())
        loss.backward()
        optimizer.step()
        return loss.detach(), logits.detach()

    return step


def bti_dbf(ctx) -> DefenseResult:
    """BTI-DBF(U): trigger inversion, then unlearning with inverted samples under their true labels."""
    exp, model, reserved, cfg, log = ctx.exp, ctx.model, ctx.reserved, ctx.cfg, ctx.log
    g = engine.seed_everything(cfg.random_seed)
    idx = ctx.reserved_idx  # the inversion cache is keyed on the reserved subset
    inv = bti.load_or_invert(exp, model, idx, reserved, cfg, log)
    G, mask, target = inv.generator, inv.mask, int(inv.target)
    extra = {**bti.target_info(target, inv.votes, exp.target),
             "bti_dbf": {"rounds": cfg.n_rounds, "epochs_per_round": cfg.epochs, "p_rev": cfg.p_rev}}
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.wd)
    opt_g = bti.round_optimizer(G, cfg, inv.optimizer_state)  # the official opt_bd, continued from round 1
    step = unlearn_step(opt, cfg.feat_weight)
    hflip = bool(getattr(exp.info, "hflip", True))
    rows: list[dict] = []
    digests: list[str] = []
    for r in range(cfg.n_rounds):
        if r > 0 and cfg.retrain_generator:
            t0 = time.time()
            mask, G = bti.reinvert(exp, model, G, reserved, cfg, log, target, optimizer=opt_g)
            log(f"round {r + 1}: mask re-learned and generator retrained against the current model "
                f"({time.time() - t0:.0f}s)")
            if cfg.earlystop:
                t_now, votes = bti.detect(exp, model, G, reserved, cfg)
                if t_now != target:
                    log(f"round {r + 1}: re-detected target {t_now} != {target} (votes {votes.tolist()}): early stop")
                    break
        digests.append(bti.generator_digest(G))
        base = r * cfg.epochs

        def tag(epoch, row, base=base, r=r):
            row["epoch"] = base + epoch
            row["round"] = r + 1

        rr = engine.fit(model, reserved, norm=exp.norm, epochs=cfg.epochs, batch_size=cfg.batch_size, step_fn=step,
                        optimizer=opt, batch_fn=unlearning_batch_fn(G, exp.norm, cfg.p_rev), augment=cfg.augment,
                        hflip=hflip, evalsets=exp.evalsets, eval_every=cfg.eval_every,
                        eval_batch_size=cfg.eval_batch_size, generator=g, desc=f"bti_dbf round {r + 1}/{cfg.n_rounds}",
                        progress=exp.progress, on_epoch_end=tag)
        rows.extend(rr)
        log(f"round {r + 1}/{cfg.n_rounds} ({cfg.epochs} epochs of unlearning): {engine.format_metrics(rr[-1])}")

    extra["generator_digest_per_round"] = digests
    return DefenseResult(model, rows,
                         artifacts={"bti_generator.pt": bti.generator_artifact(G, mask, target)}, info=extra)


def schema() -> dict:
    return bti.with_bti_schema(BTIDBF_SCHEMA, "BTIDBF_SCHEMA")


register("defense", NAME, schema=schema, needs=("inversion_cache",),
         description="BTI-DBF(U) defense: BTI-DBF trigger inversion, then unlearning with inverted samples")(bti_dbf)
