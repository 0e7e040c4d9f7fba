"""NC: Neural Cleanse (Wang et al., IEEE S&P 2019), as BackdoorBench v2.2 runs it (``defense/nc.py``).

1. Reverse engineering, for every class k: a mask m_k (1 x H x W) and a pattern p_k (C x H x W), both
   ``tanh(a) / (2 + 1e-7) + 0.5`` of free parameters initialised to 1, stamp x' = (1 - m_k) * x + m_k * p_k (in [0, 1]
   pixel space, then normalised: the same as BackdoorBench's blend of normalised images with the normalised
   pattern). They minimise CE(f(x'), k) + cost_k * ||m_k||_1 over the reserved clean data (train augmentation, the
   classifier frozen in eval mode), Adam lr 0.1, betas (0.5, 0.9), ``nc_epoch`` 80 epochs. The cost schedule per class,
   after every epoch (attack success = the epoch's mean minibatch rate of x' classified as k):
     * the best mask so far is the one of the smallest mean L1 norm among epochs with success >= 0.98;
     * success >= 0.98 for ``patience`` (5) epochs in a row: cost *= 2; below for 5 epochs: cost /= 2 ** 1.5;
     * early stop once the cost went both up and down and the best norm improved by less than 1% (0.99) for
       ``early_stop_patience`` (25) epochs; cost 0 with success for 5 epochs resets the cost to ``init_cost`` (1e-3);
     * no epoch reached the threshold: the mask after the first epoch is kept (BackdoorBench's fallback).
   All classes are optimised in ONE batched pass per minibatch (``nc_class_chunk`` classes at a time, each its own
   parameters and Adam state, so the updates equal separate runs); a class that stopped early is left out.
2. Detection: L1 norms l_k of the best masks; median and MAD = 1.4826 * median(|l - median|) (torch.median: the
   lower middle value for an even count, as BackdoorBench); anomaly index a_k = |l_k - median| / MAD. Flagged:
   a_k > ``nc_anomaly_threshold`` (2) and l_k <= median (a small trigger). The model's anomaly index is that of the
   smallest norm. Flagged classes, every norm and index go to config.yaml (and nc_detection.csv); the flagged class
   of smallest norm is written as ``detected_target`` (results.csv's column, with the true target and whether they
   match).
3. Nothing flagged: the backdoored model is returned unchanged (BackdoorBench). Flagged: unlearning. The reserved
   data is split (seeded) into a clean part (1 - ``unlearning_ratio``) and an unlearning part (``unlearning_ratio``
   0.2); for each flagged class, the unlearning part stamped with that class's reversed trigger, keeping its TRUE
   labels, is added to the clean part (BackdoorBench's set), and the model is fine-tuned on it: SGD lr 0.01,
   momentum 0.9, weight decay 5e-4, cosine, 100 epochs, batch 256, train augmentation after stamping.

Departures from BackdoorBench v2.2: all classes in one batched optimisation (BackdoorBench runs them one after the
other, each on its own shuffles of the data); the reversed trigger is stamped as (1 - m) * x + m * p on the uint8
images (rounded), not read back from PNGs that torchvision min-max normalised; attack success is a fraction
(``atk_succ_threshold`` 0.98, BackdoorBench's 98.0 percent). Not reproduced: after unlearning, BackdoorBench saves a
freshly loaded copy of the BACKDOORED model (defense/nc.py rebinds ``model`` after building its trainer, which
keeps training the first copy), so its nc folders hold the undefended weights while nc_df.csv reports the unlearned
model; here the unlearned model is saved. With an input geometry (the 224 pipeline) masks live at the model's input
size and the unlearning set is built from the evaluation view. fp32 (BackdoorBench's yaml turns on amp).
"""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
import torch
import torch.nn as nn
import torch.nn.functional as F

from bdsafety import engine
from bdsafety.config import FRACTION, NONNEG, OPEN_FRACTION, POS_INT, POSITIVE, Check, Option
from bdsafety.data.device import DeviceDataset, iterate_batches
from bdsafety.defenses.base import DefenseResult, defense_schema
from bdsafety.defenses.finetune import OPTIM_SCHEMA, check_common, fit_reserved, make_sgd
from bdsafety.errors import ConfigError
from bdsafety.registry import register

NAME = "nc"
MAD_CONSISTENCY = 1.4826  # MAD -> standard deviation of a normal distribution


def schema() -> dict:
    return defense_schema(
        epochs=Option(100, "unlearning epochs (when a class is flagged)", check=POS_INT),
        batch_size=Option(256, "batch size of reverse engineering and unlearning", check=POS_INT),
        lr=Option(0.01, "SGD learning rate of the unlearning", check=POSITIVE),
        **{**OPTIM_SCHEMA, "wd": Option(5e-4, "weight decay", check=NONNEG)},
        nc_epoch=Option(80, "reverse-engineering epochs per class", check=POS_INT),
        mask_lr=Option(0.1, "Adam learning rate of mask and pattern (betas 0.5, 0.9)", check=POSITIVE),
        init_cost=Option(1e-3, "initial weight of the mask's L1 norm", check=NONNEG),
        atk_succ_threshold=Option(0.98, "attack success (fraction of stamped images classified as the class) a mask "
                                        "must reach to count", check=FRACTION),
        early_stop=Option(True, "stop a class early (see early_stop_threshold / early_stop_patience)"),
        early_stop_threshold=Option(0.99, "early stop counts epochs whose best norm is >= this times the best before",
                                    check=FRACTION),
        early_stop_patience=Option(25, "epochs without improvement before an early stop", check=POS_INT),
        patience=Option(5, "epochs above / below the success threshold before the cost goes up / down", check=POS_INT),
        cost_multiplier=Option(2.0, "cost up: * multiplier; down: / multiplier ** 1.5",
                               check=Check(lo=1, lo_open=True, text="a number > 1")),
        nc_epsilon=Option(1e-7, "tanh squashing: tanh(a) / (2 + epsilon) + 0.5 (BackdoorBench's EPSILON)",
                          check=NONNEG),
        use_norm=Option(1, "norm of the mask (1: L1)", check=POS_INT),
        nc_anomaly_threshold=Option(2.0, "a class is flagged when its anomaly index exceeds this (and its norm is at "
                                         "most the median)", check=NONNEG),
        unlearning_ratio=Option(0.2, "fraction of the reserved data stamped with each flagged class's reversed "
                                     "trigger (true labels kept)", check=OPEN_FRACTION),
        nc_augment=Option(True, "train augmentation of the reserved data during reverse engineering (BackdoorBench's "
                                "loader)"),
        nc_class_chunk=Option(10, "classes optimised in one forward pass (memory: chunk x batch_size images)",
                              check=POS_INT),
    )


# ------------------------------------------------------------------------------------------- detection (MAD)
def anomaly_indices(norms) -> tuple[torch.Tensor, float, float]:
    """(|l - median| / MAD per class, median, MAD) with MAD = 1.4826 * median(|l - median|), torch.median's lower
    middle value for an even count (BackdoorBench). MAD 0: index 0 where l equals the median, inf elsewhere."""
    l_ = torch.as_tensor(norms, dtype=torch.float64)
    med = torch.median(l_)
    dev = (l_ - med).abs()
    mad = MAD_CONSISTENCY * torch.median(dev)
    if mad > 0:
        idx = dev / mad
    else:
        idx = torch.where(dev > 0, torch.full_like(dev, math.inf), torch.zeros_like(dev))
    return idx, float(med), float(mad)


def flagged_classes(norms, threshold: float = 2.0) -> tuple[list[int], torch.Tensor, float, float]:
    """Classes whose anomaly index exceeds ``threshold`` with a norm at most the median, smallest norm first."""
    idx, med, mad = anomaly_indices(norms)
    l_ = torch.as_tensor(norms, dtype=torch.float64)
    flags = [k for k in range(len(l_)) if l_[k] <= med and idx[k] > threshold]
    return sorted(flags, key=lambda k: (float(l_[k]), k)), idx, med, mad


# ------------------------------------------------------------------------------------------- reverse engineering
def squash(a: torch.Tensor, eps: float) -> torch.Tensor:
    return torch.tanh(a) / (2 + eps) + 0.5


def stamp(x01: torch.Tensor, mask: torch.Tensor, pattern: torch.Tensor) -> torch.Tensor:
    """(1 - m) * x + m * p: x (B, C, H, W), mask (K, 1, H, W), pattern (K, C, H, W) -> (K * B, C, H, W), class-major."""
    out = (1 - mask[:, None]) * x01[None] + mask[:, None] * pattern[:, None]
    return out.reshape(-1, *x01.shape[1:])


class ClassState:
    """BackdoorBench's per-class Recorder: cost schedule, best mask, early stop."""

    def __init__(self, cfg):
        self.cfg = cfg
        self.cost = float(cfg.init_cost)
        self.reg_best = math.inf
        self.mask_best = self.pattern_best = None
        self.set_counter = self.up_counter = self.down_counter = self.es_counter = 0
        self.up_flag = self.down_flag = False
        self.es_reg_best = math.inf
        self.stopped = False
        self.epochs = 0

    def end_epoch(self, success: float, reg: float, mask: torch.Tensor, pattern: torch.Tensor) -> None:
        c = self.cfg
        self.epochs += 1
        if success >= c.atk_succ_threshold and reg < self.reg_best:
            self.mask_best, self.pattern_best, self.reg_best = mask.clone(), pattern.clone(), reg
        if c.early_stop:
            if self.reg_best < math.inf:
                self.es_counter = (self.es_counter + 1 if self.reg_best >= c.early_stop_threshold * self.es_reg_best
                                   else 0)
            self.es_reg_best = min(self.es_reg_best, self.reg_best)
            if self.down_flag and self.up_flag and self.es_counter >= c.early_stop_patience:
                self.stopped = True
                return
        if self.cost == 0 and success >= c.atk_succ_threshold:
            self.set_counter += 1
            if self.set_counter >= c.patience:
                self.cost, self.up_counter, self.down_counter = float(c.init_cost), 0, 0
                self.up_flag = self.down_flag = False
        else:
            self.set_counter = 0
        if success >= c.atk_succ_threshold:
            self.up_counter, self.down_counter = self.up_counter + 1, 0
        else:
            self.up_counter, self.down_counter = 0, self.down_counter + 1
        if self.up_counter >= c.patience:
            self.up_counter, self.cost, self.up_flag = 0, self.cost * c.cost_multiplier, True
        elif self.down_counter >= c.patience:
            self.down_counter, self.cost, self.down_flag = 0, self.cost / c.cost_multiplier ** 1.5, True
        if self.mask_best is None:
            self.mask_best, self.pattern_best = mask.clone(), pattern.clone()


def reverse_engineer(model: nn.Module, data: DeviceDataset, norm, num_classes: int, cfg, *, hflip: bool = True,
                     generator=None, log=print) -> tuple[torch.Tensor, torch.Tensor, list[ClassState]]:
    """Every class's (mask, pattern) by Neural Cleanse's optimisation, all classes batched. Returns the best masks
    (K, 1, H, W), patterns (K, C, H, W) and the per-class states."""
    c, h, w = data.view_shape
    dev = data.device
    model.eval()
    for prm in model.parameters():
        prm.requires_grad_(False)
    masks = [nn.Parameter(torch.ones(1, h, w, device=dev)) for _ in range(num_classes)]
    patterns = [nn.Parameter(torch.ones(c, h, w, device=dev)) for _ in range(num_classes)]
    opt = torch.optim.Adam([*masks, *patterns], lr=cfg.mask_lr, betas=(0.5, 0.9))
    states = [ClassState(cfg) for _ in range(num_classes)]
    eps, chunk = float(cfg.nc_epsilon), max(1, int(cfg.nc_class_chunk))
    for epoch in range(cfg.nc_epoch):
        active = [k for k in range(num_classes) if not states[k].stopped]
        if not active:
            break
        succ = torch.zeros(num_classes, device=dev)
        regs = torch.zeros(num_classes, device=dev)
        nb = 0
        for xb, _, _ in iterate_batches(data, cfg.batch_size, shuffle=True, augment=cfg.nc_augment, hflip=hflip,
                                        generator=generator):
            x01 = xb.float() / 255.0
            opt.zero_grad(set_to_none=True)
            for s in range(0, len(active), chunk):
                ks = active[s : s + chunk]
                m = torch.stack([squash(masks[k], eps) for k in ks])
                p = torch.stack([squash(patterns[k], eps) for k in ks])
                target = torch.as_tensor(ks, device=dev).repeat_interleave(len(x01))
                with engine.autocast(dev):
                    logits = model(norm(stamp(x01, m, p))).float()
                ce = F.cross_entropy(logits, target, reduction="none").view(len(ks), -1).mean(1)
                reg = torch.linalg.vector_norm(m.flatten(1), ord=cfg.use_norm, dim=1)
                cost = torch.as_tensor([states[k].cost for k in ks], device=dev)
                (ce + cost * reg).sum().backward()
                hit = (logits.argmax(1) == target).float().view(len(ks), -1).mean(1)
                kt = torch.as_tensor(ks, device=dev)
                succ[kt] += hit.detach()
                regs[kt] += reg.detach()
            opt.step()
            nb += 1
        succ, regs = (succ / max(1, nb)).tolist(), (regs / max(1, nb)).tolist()
        for k in active:
            with torch.no_grad():
                states[k].end_epoch(succ[k], regs[k], squash(masks[k], eps), squash(patterns[k], eps))
        if epoch == 0 or (epoch + 1) % 10 == 0 or epoch + 1 == cfg.nc_epoch:
            log(f"reverse engineering epoch {epoch + 1}/{cfg.nc_epoch}: {len(active)} classes active; best L1 norms "
                + " ".join(f"{k}:{s.reg_best:.1f}" for k, s in enumerate(states)))
    mask_best = torch.stack([s.mask_best for s in states])
    pattern_best = torch.stack([s.pattern_best for s in states])
    return mask_best, pattern_best, states


# ------------------------------------------------------------------------------------------- unlearning
def stamp_uint8(images: torch.Tensor, mask: torch.Tensor, pattern: torch.Tensor) -> torch.Tensor:
    """The reversed trigger on uint8 images (N, C, H, W): round((1 - m) * x + m * 255 p), clipped to [0, 255]."""
    x = images.float()
    out = (1 - mask) * x + mask * pattern * 255.0
    return out.round().clamp_(0, 255).to(torch.uint8)


def unlearning_set(reserved: DeviceDataset, masks, patterns, flagged: list[int], ratio: float,
                   seed: int) -> tuple[DeviceDataset, np.ndarray]:
    """The clean part of the reserved data plus, per flagged class, the unlearning part stamped with its reversed
    trigger, TRUE labels kept. Returns (the set, positions of the unlearning part within ``reserved``)."""
    n = len(reserved)
    n_unlearn = int(n * ratio)
    if n_unlearn < 1:
        raise ConfigError(f"unlearning_ratio {ratio} of {n} reserved samples stamps no image; raise it or --ratio")
    rng = np.random.default_rng([int(seed), 0x4E43])  # "NC": a stream of its own
    pos = np.sort(rng.choice(n, size=n_unlearn, replace=False))
    keep = np.setdiff1d(np.arange(n), pos)
    images = reserved.view()
    dev = reserved.device
    ti = torch.as_tensor(pos, device=dev)
    parts = [DeviceDataset(images[torch.as_tensor(keep, device=dev)],
                           reserved.y[torch.as_tensor(keep, device=dev)], dev)]
    for k in flagged:
        parts.append(DeviceDataset(stamp_uint8(images[ti], masks[k].to(dev), patterns[k].to(dev)), reserved.y[ti], dev))
    return DeviceDataset.concat(parts), pos


# ------------------------------------------------------------------------------------------- the defense
def neural_cleanse(ctx) -> DefenseResult:
    """Reverse-engineer a trigger per class, flag outliers by MAD, unlearn the flagged triggers (or return the
    model)."""
    exp, model, reserved, cfg, log = ctx.exp, ctx.model, ctx.reserved, ctx.cfg, ctx.log
    check_common(cfg)
    gen = engine.seed_everything(cfg.random_seed)
    k_ = exp.num_classes
    log(f"reverse engineering {k_} classes x {cfg.nc_epoch} epochs on {len(reserved)} clean samples")
    masks, patterns, states = reverse_engineer(model, reserved, exp.norm, k_, cfg, hflip=exp.info.hflip, generator=gen,
                                               log=log)
    for prm in model.parameters():
        prm.requires_grad_(True)
    norms = torch.linalg.vector_norm(masks.flatten(1), ord=cfg.use_norm, dim=1).cpu()
    flagged, idx, med, mad = flagged_classes(norms, cfg.nc_anomaly_threshold)
    model_index = float(idx[int(torch.argmin(norms))])
    log(f"L1 norms: median {med:.2f}, MAD {mad:.2f}; anomaly index {model_index:.2f}; flagged: "
        + (", ".join(f"{k} (norm {float(norms[k]):.1f}, index {float(idx[k]):.2f})" for k in flagged) or "none"))
    table = pd.DataFrame({"class": range(k_), "l1_norm": norms.tolist(), "anomaly_index": idx.tolist(),
                          "flagged": [k in flagged for k in range(k_)],
                          "success_threshold_reached": [s.reg_best < math.inf for s in states],
                          "epochs": [s.epochs for s in states]})
    true = exp.target
    detection = {"flagged_classes": flagged, "anomaly_index": model_index, "median_norm": med, "mad": mad,
                 "l1_norms": [float(v) for v in norms], "anomaly_indices": [float(v) for v in idx],
                 "backdoor_detected": bool(flagged)}
    target = {"detected_target": flagged[0] if flagged else None, "true_target": None if true is None else int(true),
              "target_match": None if (true is None or not flagged) else flagged[0] == int(true)}
    artifacts = {"nc_detection.csv": table, "nc_triggers.pt": {"mask": masks.cpu(), "pattern": patterns.cpu()}}
    if not flagged:
        log("no class flagged: the model is returned unchanged (as BackdoorBench)")
        model.eval()
        return DefenseResult(model, [], artifacts=artifacts, info={**target, "nc": {**detection, "unlearned": False}})
    data, pos = unlearning_set(reserved, masks, patterns, flagged, cfg.unlearning_ratio, cfg.random_seed)
    log(f"unlearning: {len(reserved) - len(pos)} clean + {len(pos)} x {len(flagged)} stamped samples (true labels)")
    opt = make_sgd(list(model.parameters()), cfg)
    rows = fit_reserved(exp, model, data, cfg, step_fn=engine.sgd_step(opt), optimizer=opt, generator=gen, desc=NAME)
    model.eval()
    for r in rows:
        log(f"epoch {r['epoch']}: train_loss {r['train_loss']:.4f} {engine.format_metrics(r)}")
    return DefenseResult(model, rows, artifacts=artifacts, info={**target, "nc": {**detection, "unlearned": True}},
                         indices={"unlearning_index": ctx.reserved_idx[pos]})


register("defense", NAME, schema=schema, description="NC (Neural Cleanse): per-class trigger reverse engineering, MAD "
                                                     "outlier detection, unlearning of the flagged "
                                                     "triggers")(neural_cleanse)
