"""RNP: Reconstructive Neuron Pruning (Li, Lyu, Ma, Koren, Lyu, Li & Jiang, ICML 2023), as BackdoorBench v2.2 runs it.

Unlearning the clean task exposes the backdoor neurons: after gradient ASCENT on clean data the network has lost
its clean accuracy but its backdoor path survives; learning masks that RECOVER clean accuracy on the unlearned
network leaves the neurons that only serve the backdoor with small masks. Three stages on the reserved data:

1. unlearn: maximise CE(f(x), y) on a copy of the backdoored model (all weights; SGD lr ``unlearning_lr``,
   momentum 0.9, weight decay ``unlearning_wd``, lr x0.1 at the epochs of ``schedule``; train-mode BatchNorm,
   augmented batches) for up to ``unlearning_epochs``, stopping after the first epoch whose running training
   accuracy is <= ``clean_threshold``.
2. recover: every BatchNorm2d channel ("neuron") k of the UNLEARNED model gets a mask m_k (init 1) that scales its
   BN weight (gamma_k * m_k; the bias is not masked); only the masks are trained, to minimise
   ``rnp_alpha`` * CE(f_m(x), y) (SGD lr ``recovering_lr``, momentum 0.9, masks clipped to [0, 1] after every step,
   train-mode BatchNorm) for ``recovering_epochs``.
3. prune: the neurons of the ORIGINAL backdoored model whose mask (rounded to 4 decimals, as the reference reads
   mask_values.txt back) is <= ``pruning_number`` (``pruning_by: threshold``), or the ``pruning_number`` smallest
   (``pruning_by: number``), get BN weight 0 (the reference's pruning; the channel then outputs its BN bias).

The output is the plain architecture with the pruning folded into the BN weights: defense_result.pt loads strictly
into the registered model (no mask parameters). mask_values.txt (the reference's layout), n_pruned and the threshold
go beside it (config.yaml, top level).

Threshold: BackdoorBench evaluates the thresholds 0, 0.05, ..., 0.9 on TEST data and tracks the lowest test ASR
within a 10% relative test C-Acc drop, but that model is not what it saves: it saves the original model pruned at
the fixed ``pruning_number`` (0.7). That is the default here (``pruning_select: fixed``); the test sweep is written
to rnp_threshold_sweep.csv for reporting only. ``pruning_select: val`` is this tool's option: the largest threshold
of the sweep whose relative C-Acc drop on the clean VALIDATION split (``val_ratio`` of the reserved data, never
trained on) is below ``acc_ratio`` (bdsafety.selection), nothing pruned when none qualifies.

Defaults (BackdoorBench v2.2 defense/rnp.py and config/defense/rnp/config.yaml, one yaml for every dataset): 1%
reserved data (its ``ratio: 0.01 #for fair``), batch 256, unlearning lr 0.01, wd 5e-4, 20 epochs, schedule [10, 20],
clean_threshold 0.2; recovering lr 0.2, 20 epochs, alpha 0.2; pruning_by threshold, pruning_number 0.7, sweep up to
0.9 in steps of 0.05, acc_ratio 0.1. Departures: masks wrap any registered model's BatchNorm2d layers (the
reference ships masked copies of four architectures); the reference calls clip_grad_norm_(max_norm=20) BEFORE the
ascent's backward, where it has no effect: ``unlearning_clip`` 0 (default) reproduces that, a value > 0 clips after
backward; ``pruning_by: number`` prunes exactly ``pruning_number`` neurons (the reference's final call prunes twice
that many, its sweep loop running from 0 to the number in steps of the number).
"""
from __future__ import annotations

import copy
import math
import time

import pandas as pd
import torch
import torch.nn.functional as F

from bdsafety import engine
from bdsafety.config import AMOUNT, FRACTION, NONNEG, POS_INT, POSITIVE, Option, dump_yaml, int_list
from bdsafety.data.device import iterate_batches
from bdsafety.defenses.anp import clip_masks, mask_file_text, pruned_copy, thresholds, wrap_batchnorms
from bdsafety.defenses.anp import select_threshold as anp_select_threshold
from bdsafety.defenses.base import DefenseResult, defense_schema
from bdsafety.errors import ConfigError, TrainingDiverged
from bdsafety.registry import register

NAME = "rnp"
METRICS = ("test_loss", "test_acc", "test_asr", "test_ra")

RNP_SCHEMA = {
    "ratio": Option(0.01, "defender's reserved clean data: ratio (<1) or count (>=1) of the training set "
                          "(BackdoorBench's RNP: 0.01)", check=AMOUNT),
    "batch_size": Option(256, "batch size of unlearning and recovering", check=POS_INT),
    "unlearning_lr": Option(0.01, "SGD learning rate of the clean-loss ascent", check=POSITIVE),
    "unlearning_wd": Option(5e-4, "SGD weight decay of the ascent", check=NONNEG),
    "unlearning_epochs": Option(20, "most epochs of the ascent", check=POS_INT),
    "schedule": Option([10, 20], "epochs at which the ascent's learning rate is multiplied by 0.1", type=int_list,
                       check=POS_INT),
    "clean_threshold": Option(0.2, "stop the ascent after the first epoch whose training accuracy is <= this",
                              check=FRACTION),
    "unlearning_clip": Option(0.0, "clip the ascent's gradient to this L2 norm after backward (0: none; the "
                                   "reference's max_norm 20 call comes before backward and has no effect)",
                              check=NONNEG),
    "recovering_lr": Option(0.2, "SGD learning rate of the neuron masks", check=POSITIVE),
    "recovering_epochs": Option(20, "epochs of mask learning on the unlearned model", check=POS_INT),
    "rnp_alpha": Option(0.2, "weight of the CE in the mask loss (BackdoorBench's --alpha)", check=POSITIVE),
    "augment": Option(True,
                      "random crop (+ the dataset's flip) of the reserved data (the reference's train transform)"),
    "pruning_select": Option("fixed", "'fixed': prune by pruning_by / pruning_number (BackdoorBench's saved model); "
                                      "'val': the largest threshold of the sweep whose relative validation C-Acc drop "
                                      "is below acc_ratio (needs val_ratio > 0)", choices=("fixed", "val")),
    "pruning_by": Option("threshold", "prune neurons with mask <= pruning_number ('threshold') or the pruning_number "
                                      "smallest masks ('number')", choices=("threshold", "number")),
    "pruning_number": Option(0.7, "the threshold (pruning_by threshold; BackdoorBench 0.7) or the neuron count",
                             check=NONNEG),
    "pruning_max": Option(0.9, "largest threshold of the sweeps (validation selection, reporting sweep)", check=NONNEG),
    "pruning_step": Option(0.05, "threshold step of the sweeps", check=POSITIVE),
    "acc_ratio": Option(0.1, "pruning_select val: tolerated RELATIVE validation C-Acc drop (BackdoorBench's acc_ratio, "
                             "which it applies to test C-Acc)", check=FRACTION),
    "pruning_sweep": Option(True, "evaluate every threshold of the sweep on the TEST sets and write "
                                  "rnp_threshold_sweep.csv (reporting only: nothing is selected with test data)"),
}


# ------------------------------------------------------------------------------------------- the three stages
def unlearn(model, reserved, norm, cfg, hflip: bool, generator, log) -> list[dict]:
    """Stage 1, in place on ``model``: gradient ascent on the clean CE until the training accuracy is <=
    clean_threshold (checked after each epoch) or unlearning_epochs. Returns one row per epoch."""
    opt = torch.optim.SGD(model.parameters(), lr=cfg.unlearning_lr, momentum=0.9, weight_decay=cfg.unlearning_wd)
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=list(cfg.schedule), gamma=0.1)
    rows = []
    for epoch in range(1, cfg.unlearning_epochs + 1):
        model.train()
        tot_loss, correct, seen = 0.0, 0, 0
        lr = opt.param_groups[0]["lr"]
        for xb, y, _ in iterate_batches(reserved, cfg.batch_size, shuffle=True, augment=cfg.augment, hflip=hflip,
                                        generator=generator):
            with engine.autocast(xb.device):
                logits = model(norm.from_uint8(xb)).float()
            loss = F.cross_entropy(logits, y)
            opt.zero_grad(set_to_none=True)
            (-loss).backward()
            if cfg.unlearning_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=cfg.unlearning_clip)
            opt.step()
            tot_loss += loss.item() * len(y)
            correct += int((logits.argmax(1) == y).sum())
            seen += len(y)
        sched.step()
        if not math.isfinite(tot_loss):
            raise TrainingDiverged(f"RNP unlearning: the clean loss became {tot_loss} in epoch {epoch}; lower "
                                          f"--unlearning_lr")
        rows.append({"stage": "unlearn", "train_loss": tot_loss / seen, "train_acc": correct / seen, "lr": lr})
        log(f"unlearn epoch {epoch}: clean CE {tot_loss / seen:.4f}, training accuracy {correct / seen:.4f}")
        if correct / seen <= cfg.clean_threshold:
            break
    model.eval()
    return rows


def recover_masks(unlearned, reserved, norm, cfg, hflip: bool, generator, progress=None) -> tuple[list, list[dict]]:
    """Stage 2: learn BN-weight masks on a masked copy of ``unlearned`` (its weights frozen). Returns
    ([(BN layer name, channel, mask)] in model order, one row per epoch)."""
    net = copy.deepcopy(unlearned)
    for p in net.parameters():
        p.requires_grad_(False)
    wrappers = wrap_batchnorms(net)  # weight * mask, bias unmasked (NoisyBN with its noise off)
    opt = torch.optim.SGD([w.neuron_mask for _, w in wrappers], lr=cfg.recovering_lr, momentum=0.9)
    step = engine.sgd_step(opt, loss_fn=lambda logits, y: cfg.rnp_alpha * F.cross_entropy(logits, y),
                           after_step=lambda _: clip_masks(wrappers))
    fit_rows = engine.fit(net, reserved, norm=norm, epochs=cfg.recovering_epochs, batch_size=cfg.batch_size,
                          step_fn=step, augment=cfg.augment, hflip=hflip, generator=generator, desc="rnp masks",
                          progress=progress)
    rows = [{"stage": "recover", "train_loss": r["train_loss"], "train_acc": r["train_acc"], "lr": cfg.recovering_lr}
            for r in fit_rows]
    values = [(name, i, float(v)) for name, w in wrappers for i, v in enumerate(w.neuron_mask.detach().cpu().tolist())]
    return values, rows


def select_threshold(model, mask_values, val, norm, cfg) -> tuple[float | None, dict]:
    """pruning_select val: the largest threshold of the sweep within the relative validation C-Acc budget (ANP's
    rule, BN weights only)."""
    return anp_select_threshold(model, mask_values, val, norm, cfg, prune_bias=False, method="RNP")


# ------------------------------------------------------------------------------------------- the defense
def rnp(ctx) -> DefenseResult:
    """RNP: unlearn, recover masks on the unlearned model, prune the backdoored model by the masks."""
    exp, model, reserved, cfg, log = ctx.exp, ctx.model, ctx.reserved, ctx.cfg, ctx.log
    if len(reserved) == 0:
        raise ConfigError("RNP needs the defender's reserved clean data, but it is empty; raise --ratio")
    if cfg.pruning_select == "val":
        if ctx.val is None:
            raise ConfigError("RNP's pruning_select val chooses the threshold on a validation split of the reserved "
                              "data: set --val_ratio (e.g. 0.2)")
        if cfg.pruning_by != "threshold":
            raise ConfigError("pruning_select val sweeps thresholds: use --pruning_by threshold")
    g = engine.seed_everything(cfg.random_seed)
    norm, hflip = exp.norm, bool(getattr(exp.info, "hflip", True))
    model.eval()
    t0 = time.time()
    unlearned = copy.deepcopy(model)
    rows = unlearn(unlearned, reserved, norm, cfg, hflip, g, log)
    m = exp.metrics(unlearned)
    rows[-1].update({k: m[k] for k in METRICS if k in m})
    log(f"unlearned in {len(rows)} epochs ({time.time() - t0:.0f}s): {engine.format_metrics(m)}")
    mask_values, rec_rows = recover_masks(unlearned, reserved, norm, cfg, hflip, g, progress=exp.progress)
    rows += rec_rows
    n_neurons = len(mask_values)
    log(f"masks recovered on {n_neurons} neurons ({time.time() - t0:.0f}s): mask loss "
        f"{rec_rows[-1]['train_loss']:.4f}, training accuracy {rec_rows[-1]['train_acc']:.4f}")
    files, selection = {"mask_values.txt": mask_file_text(mask_values)}, None
    if cfg.pruning_select == "val":
        threshold, selection = select_threshold(model, mask_values, ctx.val, norm, cfg)
        files["rnp_threshold_selection.yaml"] = dump_yaml(selection)
        out, pruned = (copy.deepcopy(model), []) if threshold is None else pruned_copy(model, mask_values, "threshold",
                                                                                      threshold)
    else:
        threshold = float(cfg.pruning_number) if cfg.pruning_by == "threshold" else None
        out, pruned = pruned_copy(model, mask_values, cfg.pruning_by, cfg.pruning_number)
    m = exp.metrics(out)
    rows.append({"stage": "prune", "n_pruned": len(pruned),
                 "pruning_threshold": math.nan if threshold is None else threshold,
                 **{k: m[k] for k in METRICS if k in m}})
    how = (f"threshold {threshold:g}" if threshold is not None else "no threshold qualified"
           if cfg.pruning_select == "val" else f"the {int(cfg.pruning_number)} smallest masks")
    log(f"pruned {len(pruned)}/{n_neurons} neurons of the backdoored model ({how}, BN weight set to 0): "
        f"{engine.format_metrics(m)}")
    for i, row in enumerate(rows, start=1):
        row["epoch"] = i
    if cfg.pruning_sweep:

        sweep = []
        for thr in thresholds(cfg):
            pm, pr = pruned_copy(model, mask_values, "threshold", thr)
            ms = exp.metrics(pm)
            sweep.append({"threshold": thr, "n_pruned": len(pr), **{k: ms[k] for k in METRICS if k in ms}})
        files["rnp_threshold_sweep.csv"] = pd.DataFrame(sweep)
    info = {"n_pruned": len(pruned), "pruning_threshold": threshold,
            "rnp": {"n_neurons": n_neurons, "n_pruned": len(pruned),
                    "unlearning_epochs_run": len(rows) - len(rec_rows) - 1, "pruning_select": cfg.pruning_select,
                    "pruning_by": cfg.pruning_by, "pruning_number": cfg.pruning_number, "pruning_threshold": threshold,
                    "pruning_selection": selection}}
    return DefenseResult(out, rows, artifacts=files, info=info)


def schema() -> dict:
    s = defense_schema(**RNP_SCHEMA)
    for unused in ("epochs", "lr", "eval_every"):  # unlearning_/recovering_ epochs and lrs replace them
        s.pop(unused, None)
    return s


register("defense", NAME, schema=schema, description="RNP (reconstructive neuron pruning) defense")(rnp)
