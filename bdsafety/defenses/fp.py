"""FP: Fine-Pruning (Liu, Dolan-Gavitt & Garg, RAID 2018), as BackdoorBench v2.2 runs it (``defense/fp.py``).

1. Activation: forward the defender's reserved clean data (the training part, evaluation view, model in eval mode)
   and average, per channel, the input of the final linear layer: for the CNNs here that is the globally pooled
   last feature map, so a "channel" is a channel of the last convolutional stage (BackdoorBench hooks the same
   tensor, the input of the model's last child).
2. Pruning: channels are ranked by ascending mean activation (dormant on clean data first) and pruned in steps of
   ``ceil(C * once_prune_ratio)`` channels: n = 0, s, 2s, ... A pruned channel's column of the final linear weight
   is zero, so the channel no longer reaches the logits (BackdoorBench's ``prune.custom_from_mask`` on that weight).
3. Selection: BackdoorBench keeps adding channels while the TEST C-Acc stays within a relative ``acc_ratio`` (0.1)
   of the unpruned model's, |acc - acc0| / acc0 < acc_ratio, and stops at the first count that breaks it (an oracle
   no defender has). Here each count is scored on the clean VALIDATION split (``val_ratio`` of the reserved data,
   held out from the activation ranking and the fine-tuning) and the sweep stops at the first count whose relative
   validation C-Acc drop, (acc0 - acc) / acc0, reaches ``acc_ratio``; the largest count before it is kept
   (bdsafety.selection, criterion largest_within_drop; every candidate in fp_prune_selection.yaml). A rise in C-Acc
   is not penalised (BackdoorBench's absolute value would stop on it).
4. Fine-tuning of the whole pruned model on the reserved training part (SGD lr 0.01, momentum 0.9, weight decay
   5e-4, cosine schedule, 100 epochs, batch 256: BackdoorBench's yaml), the pruned columns held at zero after every
   step (the same forward and gradients as BackdoorBench's mask, which multiplies them by 0).

Output: defense_result.pt holds the FOLDED weights: the final layer's ``weight`` with the pruned columns zero, no
``weight_orig`` / ``weight_mask`` pair. It loads strictly into the plain registered architecture (BackdoorBench's
own fp folders hold the pair; bdsafety.models.normalize_state_dict folds it when reading them). n_pruned (top level
of config.yaml, and results.csv), the pruned channels and the selection record go to config.yaml.

Departures from BackdoorBench v2.2, each a bug or an oracle there: the count is chosen on validation data, not
test data; a candidate n prunes exactly n channels (BackdoorBench prunes ``seq_sort[0:n-1]``, one fewer); the model
kept is the last one within the tolerance (BackdoorBench's loop prunes the shared model in place, so the model it
fine-tunes also carries the mask of the count that broke the tolerance); the activation pass uses the evaluation
view of the reserved images (BackdoorBench's loader applies the train augmentation to it). fp32 by default
(BackdoorBench's yaml turns on amp).
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from bdsafety import engine
from bdsafety.config import FRACTION, NONNEG, POS_INT, POSITIVE, Check, Option, dump_yaml
from bdsafety.data.device import iterate_batches
from bdsafety.defenses.base import DefenseResult, defense_schema
from bdsafety.defenses.finetune import OPTIM_SCHEMA, check_common, fit_reserved, make_sgd
from bdsafety.errors import ConfigError
from bdsafety.models import classifier_layer
from bdsafety.registry import register
from bdsafety.selection import select, selection_doc

NAME = "fp"


def schema() -> dict:
    return defense_schema(
        val_ratio=Option(0.2, "fraction of the reserved data held out as the clean validation split that chooses the "
                              "number of pruned channels (never ranked on or trained on)",
                         check=Check(lo=0, hi=0.5, lo_open=True, hi_open=True, text="a fraction in (0, 0.5)")),
        epochs=Option(100, "fine-tuning epochs after pruning", check=POS_INT),
        batch_size=Option(256, "batch size of the activation pass and of fine-tuning", check=POS_INT),
        lr=Option(0.01, "SGD learning rate of the fine-tuning", check=POSITIVE),
        **{**OPTIM_SCHEMA, "wd": Option(5e-4, "weight decay", check=NONNEG)},
        acc_ratio=Option(0.1, "tolerated RELATIVE validation C-Acc drop against the unpruned model (BackdoorBench's "
                              "acc_ratio, which it applies to test C-Acc)", check=FRACTION),
        once_prune_ratio=Option(0.01, "channels added per pruning step, as a fraction of the channel count (rounded "
                                      "up)", check=Check(lo=0, hi=1, lo_open=True, text="a number in (0, 1]")),
    )


# ------------------------------------------------------------------------------------------- building blocks
def linear_head(model: nn.Module) -> nn.Linear:
    head = classifier_layer(model)
    if not isinstance(head, nn.Linear):
        raise ConfigError(f"Fine-Pruning masks the input channels of the final linear layer, but "
                          f"{type(model).__name__}'s classifier is a {type(head).__name__}; "
                          f"use another defense for this model")
    return head


@torch.no_grad()
def head_inputs(model: nn.Module, ds, norm, batch_size: int) -> torch.Tensor:
    """The input of the final linear layer for every image of ``ds`` (evaluation view, eval mode): (N, C)."""
    head = linear_head(model)
    seen: list[torch.Tensor] = []
    hook = head.register_forward_hook(lambda m, inp, out: seen.append(inp[0].detach().float().flatten(1)))
    was = model.training
    model.eval()
    try:
        for xb, _, _ in iterate_batches(ds, batch_size):
            model(norm.from_uint8(xb))
    finally:
        hook.remove()
        model.train(was)
    return torch.cat(seen)


def channel_order(activations: torch.Tensor) -> torch.Tensor:
    """Channels by ascending mean activation over the samples (ties: lower index first)."""
    return torch.sort(activations.mean(0), stable=True).indices


def prune_counts(n_channels: int, once_prune_ratio: float) -> list[int]:
    """The candidate counts 0, s, 2s, ... < C with s = ceil(C * once_prune_ratio) (BackdoorBench's range)."""
    step = max(1, math.ceil(n_channels * once_prune_ratio))
    return list(range(0, n_channels, step))


def column_mask(n_channels: int, pruned: torch.Tensor, device=None) -> torch.Tensor:
    mask = torch.ones(n_channels, device=device)
    mask[pruned] = 0.0
    return mask


@torch.no_grad()
def fold_pruning_(head: nn.Linear, pruned: torch.Tensor) -> nn.Linear:
    """Zero the weight columns of the pruned channels in place: the folded form of weight_orig * weight_mask."""
    head.weight[:, pruned.to(head.weight.device)] = 0.0
    return head


@torch.no_grad()
def pruned_accuracy(feats: torch.Tensor, y: torch.Tensor, head: nn.Linear, order: torch.Tensor, n: int) -> float:
    """Accuracy of the model with the ``n`` first channels of ``order`` pruned, from its final-layer inputs
    ``feats``."""
    w = head.weight.float() * column_mask(head.in_features, order[:n], feats.device)
    logits = F.linear(feats, w, None if head.bias is None else head.bias.float())
    return float((logits.argmax(1) == y).float().mean()) if len(y) else math.nan


def select_count(feats_val, y_val, head, order, cfg) -> tuple[int, dict]:
    """Score n = 0, s, 2s, ... on the validation inputs, stopping at the first count whose relative C-Acc drop reaches
    acc_ratio; the largest count before it (bdsafety.selection). Returns (n, the selection record)."""
    ref = pruned_accuracy(feats_val, y_val, head, order, 0)
    if not ref > 0:  # nothing to keep within a relative tolerance of: prune nothing
        return 0, selection_doc(what="Fine-Pruning channel count", key="n_pruned", chosen={"n_pruned": 0},
                                criterion="the unpruned model has validation C-Acc 0: nothing is pruned",
                                candidates=[{"n_pruned": 0, "val_acc": ref}], val_acc_unpruned=ref,
                                acc_ratio=float(cfg.acc_ratio), val_size=int(len(y_val)))
    cands = []
    for n in prune_counts(head.in_features, cfg.once_prune_ratio):
        acc = pruned_accuracy(feats_val, y_val, head, order, n)
        cands.append({"n_pruned": n, "val_acc": acc})
        if (ref - acc) / ref >= cfg.acc_ratio:
            break
    chosen, criterion = select(cands, key="n_pruned", criterion="largest_within_drop", tol=cfg.acc_ratio, reference=ref)
    n = 0 if chosen is None else int(chosen["n_pruned"])
    doc = selection_doc(what="Fine-Pruning channel count", key="n_pruned", chosen=chosen or {"n_pruned": 0},
                        criterion=criterion + " (the sweep stops at the first count that breaks it)", candidates=cands,
                        val_acc_unpruned=ref, acc_ratio=float(cfg.acc_ratio), val_size=int(len(y_val)))
    return n, doc


def keep_pruned(head: nn.Linear, pruned: torch.Tensor):
    """after_step: hold the pruned columns at zero (the forward and gradients of BackdoorBench's mask)."""
    def after(model):
        fold_pruning_(head, pruned)
    return after


# ------------------------------------------------------------------------------------------- the defense
def fine_pruning(ctx) -> DefenseResult:
    """Rank last-layer channels on clean data, prune as many as the validation C-Acc allows, fine-tune."""
    exp, model, reserved, cfg, log = ctx.exp, ctx.model, ctx.reserved, ctx.cfg, ctx.log
    check_common(cfg)
    if ctx.val is None:
        raise ConfigError("Fine-Pruning chooses the number of pruned channels on a validation split: "
                          "set --val_ratio > 0")
    gen = engine.seed_everything(cfg.random_seed)
    head = linear_head(model)
    order = channel_order(head_inputs(model, reserved, exp.norm, cfg.eval_batch_size))
    feats_val = head_inputs(model, ctx.val, exp.norm, cfg.eval_batch_size)
    n, selection = select_count(feats_val, ctx.val.y, head, order, cfg)
    pruned = order[:n].clone()
    fold_pruning_(head, pruned)
    after_prune = exp.metrics(model)
    log(f"{head.in_features} channels ranked by mean activation on {len(reserved)} clean samples; pruned {n} "
        f"({selection['criterion']}); candidates (n: validation C-Acc) " + ", ".join(
            f"{c['n_pruned']}: {c['val_acc']:.4f}" for c in selection["candidates"])
        + f"; pruned model before fine-tuning: {engine.format_metrics(after_prune)}")
    opt = make_sgd(list(model.parameters()), cfg)
    step = engine.sgd_step(opt, after_step=keep_pruned(head, pruned))
    rows = fit_reserved(exp, model, reserved, cfg, step_fn=step, optimizer=opt, generator=gen, desc=NAME)
    model.eval()
    for r in rows:
        log(f"epoch {r['epoch']}: train_loss {r['train_loss']:.4f} {engine.format_metrics(r)}")
    zero_cols = int((head.weight.detach().abs().sum(0) == 0).sum())
    info = {"n_pruned": n, "fp": {"n_channels": head.in_features, "n_pruned": n, "pruned_channels": pruned.tolist(),
                                  "zero_columns_final": zero_cols, "weights": "folded (plain architecture)",
                                  "after_pruning": {k: after_prune[k] for k in ("test_acc", "test_asr", "test_ra")
                                                    if k in after_prune},
                                  "selection": selection}}
    return DefenseResult(model, rows, artifacts={"fp_prune_selection.yaml": dump_yaml(selection)}, info=info)


register("defense", NAME, schema=schema, description="FP (Fine-Pruning): prune dormant last-layer channels, fine-tune")(
    fine_pruning)
