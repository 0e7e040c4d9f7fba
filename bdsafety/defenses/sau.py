"""SAU: Shared Adversarial Unlearning (Wei, Zhang, Zha & Wu, NeurIPS 2023), as BackdoorBench v2.2 runs it.

A backdoor's poisoned inputs are, for the backdoored model h, adversarial examples that h and the original model
h_0 classify to the SAME wrong label. SAU searches the defender's clean data for such shared adversarial examples
and unlearns them. Every batch (x, y) of the reserved data, every round:

1. shared PGD (the maximisation). A per-sample perturbation p in pixel space, the model input norm(x + p) (no clamp
   to [0, 1], as the reference), starts at ``pgd_init`` and takes ``adv_steps`` signed steps of size ``adv_lr``
   DOWN the loss  beta_1 * L_adv + beta_2 * L_share,  each followed by the projection onto the ``norm_type`` ball of
   radius ``trigger_norm`` (L_inf: clamp; L1 / L2: per-sample rescaling; Reg: none), where, with N the batch size,
   a sample "attacked" for a model when its perturbed prediction differs from its clean prediction, and "shared"
   when attacked for both models with the same perturbed label:
     L_adv   = -(sum over samples not attacked for h of CE(h(x+p), y) + the same for h_0) / (2 N)
     L_share = sum over samples not shared of JS(softmax h(x+p) || softmax h_0(x+p)) / N
   (probabilities clamped to >= 1e-8). PGD stops early, after the step in which every sample was shared.
2. unlearning (the minimisation), ``outer_steps`` optimiser steps on
     lmd_1 * CE(h(x), y) + lmd_2 * CE(h(x+p), y) + lmd_3 * L_sar,
   L_sar = -(1 / 2N) * sum over i in S of [log(1e-6 + min(1 - q_i, 0.999)) + log(1 + 1e-6 - max(q_i, 0.001))],
   q_i = softmax(h(x_i + p_i))[y'_i], y'_i = argmax h_0(x_i + p_i), S = the samples where y'_i differs from both
   y_i and h_0's clean prediction (the "potential poison": h_0 is fooled); both halves are -log(1 - q_i) up to the
   clamps (the reference writes it twice for numerical reasons). Minimising it teaches h not to follow h_0 to y'.

h_0 is a frozen copy of the backdoored model. Both models stay in eval mode (BatchNorm statistics fixed) during the
PGD and the loss; with ``train_mode`` the clean + perturbed forward pass of h runs in train mode (the reference's
--train_mode). Defaults (BackdoorBench v2.2 config/defense/sau/<dataset>.yaml): Adam lr 1e-4 (wd 0), batch 256,
100 rounds (Tiny-ImageNet 20), 5% reserved data, L_inf bound 0.2, PGD step 0.2, 5 steps, init 'max' (p = +0.2
everywhere), beta_1 0.01, beta_2 1, lmd_1 1, lmd_2 0, lmd_3 1, one outer step; the reserved data without
augmentation (the reference loads them with the test transform). The reference's yaml names a cosine schedule
that its loop never steps: the learning rate is constant here too. Differences: PGD takes gradients with respect
to p only (the reference's backward also fills the models' .grad, cleared before the model step); h_0's clean
predictions are computed once per batch instead of at every PGD step (the same values); metrics every
``eval_every`` rounds and at the last (the reference: every round).
"""
from __future__ import annotations

import copy
import math
import time

import torch
import torch.nn.functional as F

from bdsafety import engine
from bdsafety.config import NONNEG, POS_INT, POSITIVE, Option
from bdsafety.data.device import iterate_batches
from bdsafety.defenses.base import DefenseResult, defense_schema
from bdsafety.errors import ConfigError, TrainingDiverged
from bdsafety.registry import register

NAME = "sau"
NORM_TYPES = ("L_inf", "L2", "L1", "Reg")
PGD_INITS = ("zero", "random", "max", "min")

SAU_SCHEMA = {
    "n_rounds": Option(100, "unlearning rounds (passes over the reserved data; BackdoorBench: 100, Tiny 20)",
                       check=POS_INT),
    "optim": Option("adam", "model optimiser (BackdoorBench: Adam, weight decay 0)", choices=("adam", "sgd")),
    "lr": Option(1e-4, "model learning rate (constant, as in the reference's loop)", check=POSITIVE),
    "batch_size": Option(256, "batch size", check=POS_INT),
    "norm_type": Option("L_inf", "norm of the perturbation ball: L_inf, L2, L1, or Reg (no projection)",
                        choices=NORM_TYPES),
    "trigger_norm": Option(0.2, "radius of the perturbation ball, in [0, 1] pixel units", check=NONNEG),
    "adv_lr": Option(0.2, "PGD step size (signed steps)", check=NONNEG),
    "adv_steps": Option(5, "PGD steps per batch (fewer when every sample is shared earlier)", check=POS_INT),
    "pgd_init": Option("max", "PGD start: zero, random (uniform [0, 1]), max (+trigger_norm), min (-trigger_norm), "
                              "then projected", choices=PGD_INITS),
    "beta_1": Option(0.01, "PGD: weight of the adversarial loss L_adv", check=NONNEG),
    "beta_2": Option(1.0, "PGD: weight of the sharing loss L_share (Jensen-Shannon between the two models)",
                     check=NONNEG),
    "lmd_1": Option(1.0, "unlearning: weight of the clean CE", check=NONNEG),
    "lmd_2": Option(0.0, "unlearning: weight of the adversarial-training CE on the perturbed inputs", check=NONNEG),
    "lmd_3": Option(1.0, "unlearning: weight of the shared adversarial risk L_sar", check=NONNEG),
    "outer_steps": Option(1, "model optimiser steps per batch and perturbation", check=POS_INT),
    "train_mode": Option(False, "train-mode BatchNorm for the model's unlearning forward pass (reference: eval mode)"),
    "augment": Option(False, "random crop (+ the dataset's flip) of the reserved data (the reference: none, it loads "
                             "them with the test transform)"),
    "eval_every": Option(1, "evaluate C-Acc/ASR/RA every N rounds (and at the last)", check=POS_INT),
}


# ------------------------------------------------------------------------------------------- the perturbation
def project(pert: torch.Tensor, norm_type: str, bound: float) -> torch.Tensor:
    """``pert`` (N, C, H, W) onto the ``norm_type`` ball of radius ``bound``, per sample, in place."""
    with torch.no_grad():
        if norm_type == "L_inf":
            pert.clamp_(-bound, bound)
        elif norm_type in ("L1", "L2"):
            flat = pert.flatten(1)
            n = flat.abs().sum(1) if norm_type == "L1" else flat.pow(2).sum(1).sqrt()
            scale = torch.where(n > bound, bound / n.clamp_min(1e-30), torch.ones_like(n))
            pert.mul_(scale.view(-1, *([1] * (pert.dim() - 1))))
        elif norm_type != "Reg":
            raise ConfigError(f"unknown norm_type {norm_type!r}; valid: {', '.join(NORM_TYPES)}")
    return pert


def init_perturbation(x01: torch.Tensor, cfg, generator: torch.Generator | None = None) -> torch.Tensor:
    b = float(cfg.trigger_norm)
    if cfg.pgd_init == "zero":
        p = torch.zeros_like(x01)
    elif cfg.pgd_init == "random":
        p = torch.rand(x01.shape, generator=generator).to(x01.device)
    elif cfg.pgd_init == "max":
        p = torch.full_like(x01, b)
    elif cfg.pgd_init == "min":
        p = torch.full_like(x01, -b)
    else:
        raise ConfigError(f"unknown pgd_init {cfg.pgd_init!r}; valid: {', '.join(PGD_INITS)}")
    return project(p, cfg.norm_type, b)


def js_divergence(logits_a: torch.Tensor, logits_b: torch.Tensor) -> torch.Tensor:
    """Per-sample Jensen-Shannon divergence of the two softmax distributions (probabilities clamped to >= 1e-8)."""
    p = F.softmax(logits_a, 1).clamp(min=1e-8)
    q = F.softmax(logits_b, 1).clamp(min=1e-8)
    m = 0.5 * (p + q)
    return (0.5 * (p * (p.log() - m.log())) + 0.5 * (q * (q.log() - m.log()))).sum(1)


def pgd_objective(per_logits, per_logits_ref, clean_pred, clean_pred_ref, y, cfg) -> tuple[torch.Tensor, torch.Tensor]:
    """beta_1 * L_adv + beta_2 * L_share (the PGD descends it), and the per-sample 'shared' flags."""
    n = len(y)
    pert_pred, pert_pred_ref = per_logits.argmax(1), per_logits_ref.argmax(1)
    attacked, attacked_ref = pert_pred != clean_pred, pert_pred_ref != clean_pred_ref
    shared = attacked & attacked_ref & (pert_pred == pert_pred_ref)
    ce = F.cross_entropy(per_logits, y, reduction="none")
    ce_ref = F.cross_entropy(per_logits_ref, y, reduction="none")
    loss_adv = -((ce * (~attacked)).sum() + (ce_ref * (~attacked_ref)).sum()) / (2 * n)
    loss_share = (js_divergence(per_logits, per_logits_ref) * (~shared)).sum() / n
    return cfg.beta_1 * loss_adv + cfg.beta_2 * loss_share, shared


def shared_pgd(model, model_ref, x01, y, norm, cfg,
               generator: torch.Generator | None = None) -> tuple[torch.Tensor, int]:
    """Shared adversarial perturbations of the batch ``x01`` (pixel space) for ``model`` and the frozen ``model_ref``,
    both in eval mode. Returns (the perturbation, the PGD steps taken)."""
    with torch.no_grad(), engine.autocast(x01.device):
        clean_pred = model(norm(x01)).argmax(1)
        clean_pred_ref = model_ref(norm(x01)).argmax(1)
    pert = init_perturbation(x01, cfg, generator)
    steps = 0
    for _ in range(int(cfg.adv_steps)):
        pert.requires_grad_(True)
        xin = norm(x01 + pert)
        with engine.autocast(x01.device):
            per_logits, per_logits_ref = model(xin).float(), model_ref(xin).float()
        loss, shared = pgd_objective(per_logits, per_logits_ref, clean_pred, clean_pred_ref, y, cfg)
        (grad,) = torch.autograd.grad(loss, pert)
        pert = project(pert.detach() - cfg.adv_lr * grad.sign(), cfg.norm_type, float(cfg.trigger_norm))
        steps += 1
        if bool(shared.all()):  # as the reference: stop after the step in which every sample was shared
            break
    return pert.detach(), steps


# ------------------------------------------------------------------------------------------- the unlearning loss
def shared_adversarial_risk(per_logits: torch.Tensor, per_logits_ref: torch.Tensor, clean_pred_ref: torch.Tensor,
                            y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """L_sar (module docstring) and the mask of the samples it covers (the reference model fooled)."""
    n = len(y)
    label_ref = per_logits_ref.argmax(1)
    fooled = (label_ref != y) & (label_ref != clean_pred_ref)
    if not bool(fooled.any()):
        return per_logits.sum() * 0.0, fooled
    p = F.softmax(per_logits[fooled], 1)
    pos = p.gather(1, label_ref[fooled][:, None]).squeeze(1)
    neg = p.sum(1) - pos
    loss = -(torch.log(1e-6 + neg.clamp(max=0.999)).sum() + torch.log(1 + 1e-6 - pos.clamp(min=0.001)).sum()) / 2
    return loss / n, fooled


def unlearning_loss(model, model_ref, x01, pert, y, norm, cfg) -> tuple[torch.Tensor, dict]:
    """lmd_1 * clean CE + lmd_2 * perturbed CE + lmd_3 * L_sar for one batch and its perturbation."""
    xc, xp = norm(x01), norm(x01 + pert)
    with engine.autocast(x01.device):
        if cfg.train_mode:
            model.train()
        logits, per_logits = model(torch.cat([xc, xp])).float().split(len(y))
        model.eval()
        with torch.no_grad():
            logits_ref, per_logits_ref = model_ref(torch.cat([xc, xp])).float().split(len(y))
    loss_cl = F.cross_entropy(logits, y)
    loss_at = F.cross_entropy(per_logits, y)
    loss_sar, fooled = shared_adversarial_risk(per_logits, per_logits_ref, logits_ref.argmax(1), y)
    loss = cfg.lmd_1 * loss_cl + cfg.lmd_2 * loss_at + cfg.lmd_3 * loss_sar
    pert_pred, pert_pred_ref = per_logits.argmax(1), per_logits_ref.argmax(1)
    shared = (pert_pred != y) & fooled & (pert_pred == pert_pred_ref)
    return loss, {"loss_clean": loss_cl.item(), "loss_adv": loss_at.item(), "loss_shared": loss_sar.item(),
                  "fooled_ref": int(fooled.sum()), "shared": int(shared.sum()),
                  "correct": int((logits.argmax(1) == y).sum())}


# ------------------------------------------------------------------------------------------- the defense
def sau(ctx) -> DefenseResult:
    """SAU: unlearn shared adversarial examples of the model and its frozen original on the reserved data."""
    exp, model, reserved, cfg, log = ctx.exp, ctx.model, ctx.reserved, ctx.cfg, ctx.log
    if len(reserved) == 0:
        raise ConfigError("SAU needs the defender's reserved clean data, but it is empty; raise --ratio")
    g = engine.seed_everything(cfg.random_seed)
    norm = exp.norm
    hflip = bool(getattr(exp.info, "hflip", True))
    model_ref = copy.deepcopy(model).eval()
    for p in model_ref.parameters():
        p.requires_grad_(False)
    model.eval()
    opt = engine.make_optimizer([p for p in model.parameters() if p.requires_grad], cfg.optim, lr=cfg.lr, momentum=0.9)
    log(f"SAU: {cfg.n_rounds} rounds of batch {cfg.batch_size}, {cfg.optim} lr {cfg.lr}; PGD {cfg.norm_type} "
        f"{cfg.trigger_norm}, step {cfg.adv_lr} x {cfg.adv_steps}, init {cfg.pgd_init}, beta "
        f"{cfg.beta_1}/{cfg.beta_2}; loss weights {cfg.lmd_1}/{cfg.lmd_2}/{cfg.lmd_3}")
    rows, t0 = [], time.time()
    for r in range(1, cfg.n_rounds + 1):
        tot = {"train_loss": 0.0, "loss_clean": 0.0, "loss_adv": 0.0, "loss_shared": 0.0}
        counts = {"fooled_ref": 0, "shared": 0, "correct": 0, "pgd_steps": 0}
        seen = batches = 0
        for xb, y, _ in iterate_batches(reserved, cfg.batch_size, shuffle=True, augment=cfg.augment, hflip=hflip,
                                        generator=g):
            x01 = xb.float().div_(255.0)
            pert, steps = shared_pgd(model, model_ref, x01, y, norm, cfg, generator=g)
            counts["pgd_steps"] += steps
            for _ in range(int(cfg.outer_steps)):
                loss, parts = unlearning_loss(model, model_ref, x01, pert, y, norm, cfg)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
            tot["train_loss"] += loss.item() * len(y)
            for k in ("loss_clean", "loss_adv", "loss_shared"):
                tot[k] += parts[k] * len(y)
            for k in ("fooled_ref", "shared", "correct"):
                counts[k] += parts[k]
            seen += len(y)
            batches += 1
        if not math.isfinite(tot["train_loss"]):
            raise TrainingDiverged(f"SAU: the loss became {tot['train_loss']} in round {r}; lower --lr")
        row = {"epoch": r, **{k: v / seen for k, v in tot.items()}, "train_acc": counts["correct"] / seen,
               "fooled_ref_share": counts["fooled_ref"] / seen, "shared_share": counts["shared"] / seen,
               "pgd_steps": counts["pgd_steps"] / batches}
        if r % cfg.eval_every == 0 or r == cfg.n_rounds:
            m = exp.metrics(model)
            row.update({k: m[k] for k in ("test_loss", "test_acc", "test_asr", "test_ra") if k in m})
            log(f"round {r}/{cfg.n_rounds} ({time.time() - t0:.0f}s): loss {row['train_loss']:.4f} (clean "
                f"{row['loss_clean']:.4f}, shared {row['loss_shared']:.4f}); h_0 fooled on "
                f"{row['fooled_ref_share']:.1%}, shared {row['shared_share']:.1%}; {engine.format_metrics(m)}")
        else:
            row.update({k: math.nan for k in ("test_loss", "test_acc", "test_asr", "test_ra")})
        rows.append(row)
    model.eval()
    return DefenseResult(model, rows, info={"sau": {"n_rounds": cfg.n_rounds, "norm_type": cfg.norm_type,
                                                    "trigger_norm": cfg.trigger_norm, "adv_steps": cfg.adv_steps,
                                                    "optim": cfg.optim, "lr": cfg.lr}})


def schema() -> dict:
    s = defense_schema(**SAU_SCHEMA)
    s.pop("epochs", None)  # rounds replace epochs
    return s


register("defense", NAME, schema=schema, description="SAU (shared adversarial unlearning) defense")(sau)
