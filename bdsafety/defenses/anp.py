"""ANP: Adversarial Neuron Pruning (Wu & Wang, NeurIPS 2021).

Every BatchNorm2d channel k ("neuron") gets a mask m_k in [0, 1] and multiplicative perturbations
(delta_k, xi_k) in [-eps, eps]: the channel computes  gamma_k * (m_k + delta_k) * x_hat + beta_k * (1 + xi_k).
On the defender's clean data the masks minimise

    alpha * CE(f_m(x), y) + (1 - alpha) * max_{delta, xi} CE(f_{m, delta, xi}(x), y)

(the inner max by ``anp_steps`` signed-gradient ascent steps of size eps / steps from a uniform random start,
projected onto [-eps, eps]; masks by SGD with momentum 0.9, clipped to [0, 1] after every step). Neurons whose
mask falls below the threshold are then pruned from the ORIGINAL backdoored model.

Implementation: the BatchNorm2d modules of a copy of the model are wrapped (``NoisyBN``), not the model
classes, so any registered model with BatchNorm works. The pruned model is the plain architecture: pruning
sets the BN weight of a pruned channel to 0 (ANP's own pruning, which makes it exactly the masked network the
optimisation evaluated), and with ``anp_prune_bias`` also its bias (the channel then outputs exactly 0). No
mask parameters remain, so defense_result.pt loads strictly into the registered model.

Two versions, named by ``anp_variant`` (the values each reference ships; an explicit option overrides them):
  * ``backdoorbench`` (default; what the paper ran, through BackdoorBench v2.2's defense/anp.py): mask SGD lr 0.01,
    batch 256, and the pruning threshold SELECTED (``pruning_select: val``, below);
  * ``original`` (Wu & Wang's released code, csdongxian/ANP_backdoor): mask SGD lr 0.2, batch 128, and the
    paper's fixed pruning threshold 0.2 (``pruning_select: fixed``).
Both: eps 0.4, 1 ascent step, alpha 0.2, mask momentum 0.9, 2000 iterations, masks clipped to [0, 1]. Noise
handling as both references do it: uniform random start in [-eps, eps] each iteration, then ``anp_steps`` SGD
steps of size eps / steps on the SIGN of the gradient, with no projection (so a perturbation can reach 2 eps);
``anp_noise_projection: true`` projects onto [-eps, eps] after each step (the paper's constraint set; an option).

Pruning, as both references: a neuron is pruned at threshold t when its mask, rounded to 4 decimals (the references
read the masks back from mask_values.txt, written with 4), is <= t. ``pruning_select``:
  * ``fixed``: prune by ``pruning_by`` / ``pruning_number`` (threshold 0.2, or a neuron count);
  * ``val``: the non-oracle analogue of BackdoorBench's sweep. BackdoorBench evaluates thresholds 0, 0.05, ...,
    0.9 and keeps the pruned model with the lowest TEST ASR among those whose TEST C-Acc satisfies
    |acc - acc_unpruned| / acc_unpruned < acc_ratio (0.1), the unpruned model when none lowers the ASR: an oracle
    (test labels, poisoned test data) no defender has. Here the same thresholds are scored on the clean
    VALIDATION split (``val_ratio`` of the reserved data, held out from mask learning), and the LARGEST threshold
    whose relative validation C-Acc drop against the unpruned model, (acc_unpruned - acc) / acc_unpruned, is below
    ``acc_ratio`` is kept (the most pruning the clean-accuracy budget allows: without poisoned data the ASR cannot
    be measured; a rise in C-Acc is not penalised); none qualifies: nothing is pruned. Selected threshold, candidates
    and reference go to config.yaml and anp_threshold_selection.yaml; bdsafety.selection makes the choice.
The threshold sweep's TEST metrics (anp_threshold_sweep.csv) are written for reporting only. BN running statistics
changed while learning masks (train-mode passes, as in both references) are discarded, because pruning is applied
to the original model. n_pruned and pruning_threshold of the output model are written to config.yaml (top level).
"""
from __future__ import annotations

import copy
import math
import time

import numpy as np
import pandas as pd
import torch
import torch.nn as nn
import torch.nn.functional as F

from bdsafety import engine
from bdsafety.config import FRACTION, NONNEG, POS_INT, POSITIVE, Check, Option, dump_yaml
from bdsafety.defenses.base import DefenseResult, defense_schema
from bdsafety.errors import ConfigError, TrainingDiverged
from bdsafety.registry import register
from bdsafety.selection import select, selection_doc, val_accuracy

NAME = "anp"

VARIANTS = {"backdoorbench": {"anp_mask_lr": 0.01, "batch_size": 256, "pruning_select": "val"},
            "original": {"anp_mask_lr": 0.2, "batch_size": 128, "pruning_select": "fixed"}}
VAL_RATIO = 0.2  # validation share of the reserved data when the threshold is selected and val_ratio is not given

ANP_SCHEMA = {
    "anp_variant": Option("backdoorbench", "whose values fill anp_mask_lr, batch_size and pruning_select when not "
                                           "given: 'backdoorbench' (v2.2, what the paper ran: 0.01, 256, threshold "
                                           "selected on validation data) or 'original' (ANP's code: 0.2, 128, fixed "
                                           "threshold 0.2)", choices=tuple(VARIANTS)),
    "anp_eps": Option(0.4, "bound of the multiplicative neuron perturbations delta, xi in [-eps, eps]", check=POSITIVE),
    "anp_steps": Option(1, "signed-gradient ascent steps for the perturbations (step size eps / steps)", check=POS_INT),
    "anp_alpha": Option(0.2, "trade-off: alpha * natural loss + (1 - alpha) * perturbed loss", check=FRACTION),
    "anp_mask_lr": Option(None, "SGD learning rate of the neuron masks (default: the variant's)", type=float,
                          check=POSITIVE),
    "anp_noise_projection": Option(False, "project the perturbations onto [-eps, eps] after each ascent step (neither "
                                          "reference does)"),
    "anp_mask_momentum": Option(0.9, "SGD momentum of the neuron masks", check=NONNEG),
    "nb_iter": Option(2000, "mask optimisation iterations (batches)", check=POS_INT),
    "print_every": Option(500, "evaluate and log every N iterations (one csv row each)", check=POS_INT),
    "anp_augment": Option(True, "random crop (+ the dataset's flip) of the reserved data, "
                                "like the official train loader"),
    "pruning_by": Option("threshold", "pruning_select fixed: prune neurons with mask <= pruning_number ('threshold') "
                                      "or the pruning_number smallest masks ('number')",
                         choices=("threshold", "number")),
    "pruning_number": Option(0.2, "pruning_select fixed: the threshold (pruning_by threshold; 0.2, the ANP paper's) or "
                                  "the neuron count (pruning_by number); also the threshold of the progress rows",
                             check=NONNEG),
    "anp_prune_bias": Option(False, "also zero the BN bias of pruned channels (false: weight only, ANP's pruning, "
                                    "which equals the masked network the masks were optimised in)"),
    "pruning_select": Option(None, "'val': the largest threshold of the sweep 0, pruning_step, ..., pruning_max whose "
                                   "validation C-Acc drop relative to the unpruned model is below acc_ratio (the "
                                   "non-oracle analogue of BackdoorBench's test-ASR sweep; needs val_ratio > 0); "
                                   "'fixed': pruning_by / pruning_number (default: the variant's)",
                             choices=("fixed", "val")),
    "acc_ratio": Option(0.1, "pruning_select val: tolerated RELATIVE validation C-Acc drop against the unpruned model "
                             "(BackdoorBench's acc_ratio 0.1, which it applies to test C-Acc)", check=FRACTION),
    "val_ratio": Option(None, f"fraction of the reserved data held out as the clean validation split (never used to "
                              f"learn masks); default {VAL_RATIO} with pruning_select val, else 0", type=float,
                        check=Check(lo=0, hi=0.5, hi_open=True, text="a fraction in [0, 0.5)")),
    "pruning_sweep": Option(True, "also evaluate thresholds 0, step, ..., pruning_max on the TEST sets and write "
                                  "anp_threshold_sweep.csv (for reporting only: nothing is selected with test data)"),
    "pruning_max": Option(0.9, "largest threshold of the sweeps (validation selection and the reporting sweep)",
                          check=NONNEG),
    "pruning_step": Option(0.05, "threshold step of the sweeps", check=POSITIVE),
    "batch_size": Option(None, "batch size of the mask optimisation (default: the variant's)", type=int, check=POS_INT),
}


def resolve_variant(cfg) -> dict:
    """Fill anp_mask_lr / batch_size / pruning_select left unset (None) with the variant's values, and val_ratio
    (VAL_RATIO when the threshold is selected, else 0); check they agree. Returns the effective values."""
    for k, v in VARIANTS[cfg.anp_variant].items():
        if getattr(cfg, k, None) is None:
            setattr(cfg, k, v)
    if getattr(cfg, "val_ratio", None) is None:
        cfg.val_ratio = VAL_RATIO if cfg.pruning_select == "val" else 0.0
    if cfg.pruning_select == "val":
        if not cfg.val_ratio > 0:
            raise ConfigError(f"ANP's pruning_select val (anp_variant {cfg.anp_variant}) chooses the threshold on a "
                              f"validation split of the reserved data, but val_ratio is 0: set --val_ratio (default "
                              f"{VAL_RATIO}), or prune at a fixed threshold with --pruning_select fixed "
                              f"--pruning_number 0.2")
        if cfg.pruning_by != "threshold":
            raise ConfigError("pruning_select val sweeps thresholds: use --pruning_by threshold, or --pruning_select "
                              "fixed to prune a fixed neuron count")
    return {"variant": cfg.anp_variant, **{k: getattr(cfg, k) for k in VARIANTS[cfg.anp_variant]}}


def resolve(cfg):
    """The registry's resolve hook: the variant's values are filled in before the reserved data are drawn."""
    resolve_variant(cfg)
    return cfg


# ------------------------------------------------------------------------------------------- the wrapper
class NoisyBN(nn.Module):
    """Wraps one BatchNorm2d: weight * (mask + noise) and bias * (1 + noise_bias), the BN's own buffers.

    ``perturbed`` switches the noise on; ``bias_mask`` multiplies the bias by the mask too (used to express
    the 'weight and bias' pruning as a masked network).
    """

    def __init__(self, bn: nn.BatchNorm2d):
        super().__init__()
        self.bn = bn
        c = bn.num_features
        dev = bn.weight.device if bn.weight is not None else bn.running_mean.device
        self.neuron_mask = nn.Parameter(torch.ones(c, device=dev))
        self.neuron_noise = nn.Parameter(torch.zeros(c, device=dev))
        self.neuron_noise_bias = nn.Parameter(torch.zeros(c, device=dev))
        self.perturbed = False
        self.bias_mask = False

    def reset_noise(self, eps: float, rand_init: bool, generator: torch.Generator | None = None):
        with torch.no_grad():
            for p in (self.neuron_noise, self.neuron_noise_bias):
                if rand_init:
                    p.copy_((torch.rand(p.shape, generator=generator) * 2 - 1).mul_(eps).to(p.device))
                else:
                    p.zero_()

    def forward(self, x):
        bn = self.bn
        w = bn.weight if bn.weight is not None else torch.ones_like(self.neuron_mask)
        b = bn.bias if bn.bias is not None else torch.zeros_like(self.neuron_mask)
        if self.perturbed:
            w = w * (self.neuron_mask + self.neuron_noise)
            b = b * (1 + self.neuron_noise_bias)
        else:
            w = w * self.neuron_mask
            if self.bias_mask:
                b = b * self.neuron_mask
        # the same statistics logic as nn.BatchNorm2d.forward
        if bn.training and bn.track_running_stats and bn.num_batches_tracked is not None:
            bn.num_batches_tracked.add_(1)
            factor = 1.0 / float(bn.num_batches_tracked) if bn.momentum is None else bn.momentum
        else:
            factor = 0.0 if bn.momentum is None else bn.momentum
        use_batch = bn.training or (bn.running_mean is None and bn.running_var is None)
        rm = bn.running_mean if not bn.training or bn.track_running_stats else None
        rv = bn.running_var if not bn.training or bn.track_running_stats else None
        return F.batch_norm(x, rm, rv, w, b, use_batch, factor, bn.eps)


def wrap_batchnorms(model: nn.Module) -> list[tuple[str, NoisyBN]]:
    """Replace every BatchNorm2d of ``model`` (in place) by a NoisyBN wrapper; returns [(name, wrapper)]."""
    targets = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)]
    if not targets:
        raise ConfigError(f"ANP perturbs BatchNorm2d channels, but {type(model).__name__} has no BatchNorm2d layer; "
                         "use another defense for this model")
    out = []
    for name, bn in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        wrapper = NoisyBN(bn)
        setattr(parent, child, wrapper)
        out.append((name, wrapper))
    return out


def _set(wrappers, **attrs):
    for _, w in wrappers:
        for k, v in attrs.items():
            setattr(w, k, v)


def clip_masks(wrappers):
    with torch.no_grad():
        for _, w in wrappers:
            w.neuron_mask.clamp_(0.0, 1.0)


def project_noise(wrappers, eps: float):
    with torch.no_grad():
        for _, w in wrappers:
            w.neuron_noise.clamp_(-eps, eps)
            w.neuron_noise_bias.clamp_(-eps, eps)


class MaskTrainer:
    """ANP's mask optimisation on a wrapped copy of ``model``: one ``step(x, y)`` per batch."""

    def __init__(self, model: nn.Module, cfg, generator: torch.Generator | None = None):
        self.net = copy.deepcopy(model)
        for p in self.net.parameters():
            p.requires_grad_(False)
        self.wrappers = wrap_batchnorms(self.net)
        self.cfg = cfg
        self.eps = float(cfg.anp_eps)
        self.generator = generator
        self.masks = [w.neuron_mask for _, w in self.wrappers]
        self.noises = [p for _, w in self.wrappers for p in (w.neuron_noise, w.neuron_noise_bias)]
        self.mask_opt = torch.optim.SGD(self.masks, lr=cfg.anp_mask_lr, momentum=cfg.anp_mask_momentum)
        steps = max(1, int(cfg.anp_steps))
        self.noise_opt = torch.optim.SGD(self.noises, lr=self.eps / steps)

    def step(self, x, y) -> tuple[float, torch.Tensor]:
        cfg = self.cfg
        self.net.train()
        if self.eps > 0:
            for _, w in self.wrappers:
                w.reset_noise(self.eps, rand_init=True, generator=self.generator)
            for _ in range(int(cfg.anp_steps)):
                self.noise_opt.zero_grad(set_to_none=True)
                _set(self.wrappers, perturbed=True)
                loss_noise = -F.cross_entropy(self.net(x), y)
                loss_noise.backward()
                for p in self.noises:
                    if p.grad is not None:
                        p.grad = torch.sign(p.grad)
                self.noise_opt.step()
                if getattr(cfg, "anp_noise_projection", False):
                    project_noise(self.wrappers, self.eps)
        self.mask_opt.zero_grad(set_to_none=True)
        if self.eps > 0:
            _set(self.wrappers, perturbed=True)
            loss_rob = F.cross_entropy(self.net(x), y)
        else:
            loss_rob = torch.zeros((), device=x.device)
        _set(self.wrappers, perturbed=False)
        logits = self.net(x)
        loss_nat = F.cross_entropy(logits, y)
        loss = cfg.anp_alpha * loss_nat + (1 - cfg.anp_alpha) * loss_rob
        loss.backward()
        self.mask_opt.step()
        clip_masks(self.wrappers)
        return float(loss.item()), logits.detach()

    def mask_values(self) -> list[tuple[str, int, float]]:
        """[(BN layer name, channel, mask)] in model order."""
        out = []
        for name, w in self.wrappers:
            vals = w.neuron_mask.detach().cpu().tolist()
            out.extend((name, i, float(v)) for i, v in enumerate(vals))
        return out


# ------------------------------------------------------------------------------------------- pruning
def mask_key(v: float) -> float:
    """A mask value as both references compare it: rounded to 4 decimals (they read mask_values.txt back)."""
    return round(float(v), 4)


def select_pruned(mask_values, by: str, number: float) -> list[tuple[str, int]]:
    """The (layer, channel) pairs to prune: mask <= number ('threshold', masks rounded to 4 decimals as both
    references compare them) or the int(number) smallest ('number')."""
    if by == "threshold":
        return [(n, i) for n, i, v in mask_values if mask_key(v) <= number]
    if by == "number":
        k = int(number)
        if k < 0:
            raise ConfigError(f"pruning_number must be >= 0 for pruning_by number, got {number}")
        order = sorted(mask_values, key=lambda t: t[2])
        return [(n, i) for n, i, _ in order[:k]]
    raise ConfigError(f"unknown pruning_by {by!r}; valid: threshold, number")


def prune_model(model: nn.Module, pruned: list[tuple[str, int]], prune_bias: bool = False) -> nn.Module:
    """Fold pruning into the BN parameters of ``model`` (in place): weight (and bias) of pruned channels = 0."""
    by_layer: dict[str, list[int]] = {}
    for name, i in pruned:
        by_layer.setdefault(name, []).append(int(i))
    with torch.no_grad():
        for name, idx in by_layer.items():
            bn = model.get_submodule(name)
            if not isinstance(bn, nn.BatchNorm2d):
                raise ValueError(f"{name} is a {type(bn).__name__}, not a BatchNorm2d: "
                                 f"the mask values belong to another model")
            ix = torch.as_tensor(idx, dtype=torch.long, device=bn.weight.device)
            bn.weight[ix] = 0.0
            if prune_bias and bn.bias is not None:
                bn.bias[ix] = 0.0
    return model


def pruned_copy(model, mask_values, by: str, number: float, prune_bias: bool = False):
    """A copy of ``model`` with the selected neurons' BN weights (and biases, ``prune_bias``) set to 0, and the
    pruned (layer, channel)s."""
    pruned = select_pruned(mask_values, by, number)
    return prune_model(copy.deepcopy(model), pruned, prune_bias), pruned


def _pruned_copy(model, mask_values, cfg, by=None, number=None):
    return pruned_copy(model, mask_values, by or cfg.pruning_by, cfg.pruning_number if number is None else number,
                       cfg.anp_prune_bias)


def thresholds(cfg) -> list[float]:
    """The sweep 0, pruning_step, ..., pruning_max (BackdoorBench's np.arange(0, max + step, step) for its values)."""
    return [round(float(t), 6) for t in np.arange(0.0, cfg.pruning_max + cfg.pruning_step / 2, cfg.pruning_step)]


def select_threshold(model, mask_values, val, norm, cfg, prune_bias: bool = False,
                     method: str = "ANP") -> tuple[float | None, dict]:
    """pruning_select val (ANP and RNP): score every threshold of the sweep on the VALIDATION DeviceDataset ``val``
    (the only data this function sees) and keep the largest whose relative C-Acc drop against the unpruned model is
    below cfg.acc_ratio (bdsafety.selection, criterion largest_within_drop). Returns (the threshold, or None when none
    qualifies and nothing is pruned; the selection record: criterion, reference, candidates)."""

    ref = val_accuracy(model, val, norm, cfg.eval_batch_size)
    cands = []
    for thr in thresholds(cfg):
        pm, pr = pruned_copy(model, mask_values, "threshold", thr, prune_bias)
        cands.append({"threshold": thr, "n_pruned": len(pr),
                      "val_acc": val_accuracy(pm, val, norm, cfg.eval_batch_size)})
    chosen, criterion = select(cands, key="threshold", criterion="largest_within_drop", tol=cfg.acc_ratio,
                               reference=ref)
    doc = selection_doc(what=f"{method} pruning threshold", key="threshold", chosen=chosen, criterion=criterion,
                        candidates=cands, val_acc_unpruned=ref, acc_ratio=float(cfg.acc_ratio), val_size=int(len(val)))
    return (None if chosen is None else chosen["threshold"]), doc


# ------------------------------------------------------------------------------------------- the defense
def anp(ctx) -> DefenseResult:
    """ANP: learn neuron masks on the reserved data, prune the backdoored model."""
    exp, model, reserved, cfg, log = ctx.exp, ctx.model, ctx.reserved, ctx.cfg, ctx.log
    variant = resolve_variant(cfg)  # normally done already (the resolve hook); idempotent
    if len(reserved) == 0:
        raise ConfigError("ANP needs the defender's reserved clean data, but it is empty; raise --ratio")
    if cfg.nb_iter < 1:
        raise ConfigError(f"nb_iter must be >= 1, got {cfg.nb_iter}")
    if cfg.pruning_select == "val" and ctx.val is None:
        raise ConfigError("pruning_select val chooses the threshold on a validation split of the reserved data: set "
                          f"--val_ratio (default {VAL_RATIO})")
    g = engine.seed_everything(cfg.random_seed)
    trainer = MaskTrainer(model, cfg, generator=g)
    n_neurons = sum(w.neuron_mask.numel() for _, w in trainer.wrappers)
    log(f"ANP ({cfg.anp_variant}): {len(trainer.wrappers)} BatchNorm2d layers, {n_neurons} neurons; {cfg.nb_iter} "
        f"iterations of batch {cfg.batch_size}, eps {cfg.anp_eps}, steps {cfg.anp_steps}, alpha {cfg.anp_alpha}, "
        f"mask lr {cfg.anp_mask_lr}; pruning "
        f"{'selected on validation data' if cfg.pruning_select == 'val' else 'fixed'}")
    norm = exp.norm
    hflip = bool(getattr(exp.info, "hflip", True))
    rows = []
    t0 = time.time()
    tot_loss, tot_correct, seen = 0.0, 0, 0
    every = max(1, int(cfg.print_every))
    # progress rows: the model pruned by pruning_by / pruning_number (with pruning_select val: a fixed monitoring
    # threshold; the last row is replaced by the output model below)
    for it in range(1, cfg.nb_iter + 1):
        # sampling with replacement, like the official RandomSampler(replacement=True)
        pick = torch.randint(0, len(reserved), (min(cfg.batch_size, max(1, len(reserved))),),
                             generator=g).to(reserved.device)
        if cfg.anp_augment:
            xb = reserved.augmented(pick, hflip=hflip, generator=g)
        else:
            xb = reserved.view(pick)
        x, y = norm.from_uint8(xb), reserved.y[pick]
        loss, logits = trainer.step(x, y)
        if not math.isfinite(loss):
            raise TrainingDiverged(f"ANP: the mask loss became {loss} at iteration {it}; lower anp_mask_lr")
        tot_loss += loss * len(y)
        tot_correct += int((logits.argmax(1) == y).sum())
        seen += len(y)
        if it % every == 0 or it == cfg.nb_iter:
            mv = trainer.mask_values()
            pruned_model, pruned = _pruned_copy(model, mv, cfg)
            m = exp.metrics(pruned_model)
            row = {"epoch": it, "train_loss": tot_loss / seen, "train_acc": tot_correct / seen,
                   "n_pruned": len(pruned),
                   "pruning_threshold": cfg.pruning_number if cfg.pruning_by == "threshold" else math.nan,
                   **{k: m[k] for k in ("test_loss", "test_acc", "test_asr", "test_ra") if k in m}}
            rows.append(row)
            log(f"iter {it}/{cfg.nb_iter} ({time.time() - t0:.0f}s): mask loss {row['train_loss']:.4f}, "
                f"{len(pruned)} neurons at {cfg.pruning_by} {cfg.pruning_number} -> pruned model "
                f"{engine.format_metrics(m)}")
            tot_loss, tot_correct, seen = 0.0, 0, 0
    mask_values = trainer.mask_values()
    files = {"mask_values.txt": mask_file_text(mask_values)}
    selection = None
    if cfg.pruning_select == "val":
        threshold, selection = select_threshold(model, mask_values, ctx.val, norm, cfg, cfg.anp_prune_bias)
        files["anp_threshold_selection.yaml"] = dump_yaml(selection)
        log(f"threshold selected on validation data: {'none (nothing pruned)' if threshold is None else threshold} "
            f"({selection['criterion']}); candidates " + ", ".join(
                f"{c['threshold']:g}: {c['n_pruned']} pruned, val C-Acc {c['val_acc']:.4f}"
                for c in selection["candidates"]))
        if threshold is None:
            pruned_model, pruned = copy.deepcopy(model), []
        else:
            pruned_model, pruned = _pruned_copy(model, mask_values, cfg, by="threshold", number=threshold)
    else:
        pruned_model, pruned = _pruned_copy(model, mask_values, cfg)
        threshold = float(cfg.pruning_number) if cfg.pruning_by == "threshold" else None
    how = (f"threshold {threshold:g}" if threshold is not None else
           "no threshold qualified" if cfg.pruning_select == "val" else f"the {int(cfg.pruning_number)} smallest masks")
    zeroed = "weight and bias" if cfg.anp_prune_bias else "BN weight"
    log(f"pruned {len(pruned)}/{n_neurons} neurons ({how}, {zeroed} set to 0)")
    if cfg.pruning_select == "val":  # the last row is the output model (the results read the last row)
        m = exp.metrics(pruned_model)
        rows[-1].update({"n_pruned": len(pruned), "pruning_threshold": math.nan if threshold is None else threshold,
                         **{k: m[k] for k in ("test_loss", "test_acc", "test_asr", "test_ra") if k in m}})

    info = {"n_pruned": len(pruned), "pruning_threshold": threshold,
            "anp": {"n_neurons": n_neurons, "n_pruned": len(pruned), "pruning_select": cfg.pruning_select,
                    "pruning_threshold": threshold, "pruning_by": cfg.pruning_by, "pruning_number": cfg.pruning_number,
                    "prune_bias": bool(cfg.anp_prune_bias), **variant,
                    "noise_projection": bool(cfg.anp_noise_projection), "pruning_selection": selection}}
    if cfg.pruning_sweep:
        sweep = []
        for thr in thresholds(cfg):
            pm, pr = _pruned_copy(model, mask_values, cfg, by="threshold", number=thr)
            m = exp.metrics(pm)
            sweep.append({"threshold": thr, "n_pruned": len(pr),
                          **{k: m[k] for k in ("test_acc", "test_asr", "test_ra") if k in m}})

        files["anp_threshold_sweep.csv"] = pd.DataFrame(sweep)
        log("threshold sweep (TEST data, reporting only): " + "; ".join(
            f"{s['threshold']:.2f}: {s['n_pruned']} pruned, C-Acc {s['test_acc']:.3f} "
            f"ASR {s.get('test_asr', float('nan')):.3f}"
            for s in sweep))
    return DefenseResult(pruned_model, rows, artifacts=files, info=info)


def mask_file_text(mask_values) -> str:
    """mask_values.txt in the official ANP layout."""
    lines = ["No \t Layer Name \t Neuron Idx \t Mask Score"]
    lines += [f"{i} \t {n} \t {c} \t {v:.4f}" for i, (n, c, v) in enumerate(mask_values)]
    return "\n".join(lines) + "\n"


def schema() -> dict:
    s = defense_schema(**ANP_SCHEMA)
    for unused in ("epochs", "lr", "eval_every"):  # iterations, the mask lr and print_every replace them
        s.pop(unused, None)
    return s


register("defense", NAME, schema=schema, description="ANP (Adversarial Neuron Pruning) defense", resolve=resolve)(anp)
