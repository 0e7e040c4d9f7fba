"""I-BAU: Implicit Backdoor Adversarial Unlearning (Zeng et al., ICLR 2022).

Minimax unlearning on the defender's clean data:  min_theta  L_outer(delta*(theta), theta),
delta*(theta) = argmax_delta  CE(f_theta(x + delta), y) - reg * ||delta||^2, a universal (one per round)
additive perturbation. Each round:

1. perturbation: delta starts at 0; one pass over the reserved data of SGD (lr ``ibau_pert_lr``) on
   -CE(f(x + delta), f's own prediction) + reg * ||delta||^2 (projected onto the L2 ball of radius
   ``ibau_pert_norm`` after every step only when asked: 0, the default, is no projection, as in both references,
   where the projection is commented out).
2. unlearning: for every batch, the implicit hypergradient of the outer loss
   L_outer = CE(f(x with a fraction ``ibau_outer_portion`` of the batch perturbed by delta), y)
   through the fixed point delta = Phi(delta, theta) = delta - ``ibau_inner_lr`` * d L_inner / d delta,
   L_inner = mean(-CE(f(x + delta), y)) + reg * ||delta||^2, computed with ``K`` fixed-point iterations
   v <- (dPhi/d delta)^T v + dL_outer/d delta (Grazzi et al.), then
   g = dL_outer/d theta + (dPhi/d theta)^T v, and one outer optimiser step with g.

Where delta lives, ``ibau_space`` (never mixed):
  * ``normalized`` (default; BackdoorBench v2.2's i-bau, what the paper ran): delta is added to the NORMALISED
    images, f(norm(x) + delta); outer Adam lr 1e-4;
  * ``pixel`` (the original I-BAU code): delta is added in [0, 1] pixel space, f(norm(x + delta)); outer Adam lr 1e-3.
``lr`` left unset takes the space's value. Other defaults: batch 256, 5 rounds, K 5, 5% reserved data; perturbation
SGD lr 10, regulariser 0.001, fixed-point step 0.1, outer portion 0.01, the model kept in eval mode so BatchNorm
statistics stay fixed (both references). Difference: the fixed-point map uses the current batch (the official
code always uses the first batch of the loader).
"""
from __future__ import annotations

import math
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

from bdsafety import engine
from bdsafety.config import NONNEG, POS_INT, POSITIVE, PROB, Option
from bdsafety.data.device import iterate_batches
from bdsafety.defenses.base import DefenseResult, defense_schema
from bdsafety.errors import ConfigError, TrainingDiverged
from bdsafety.registry import register

NAME = "i-bau"

IBAU_SCHEMA = {
    "n_rounds": Option(5, "unlearning rounds (a new universal perturbation each round)", check=POS_INT),
    "K": Option(5, "fixed-point iterations of the implicit hypergradient", check=POS_INT),
    "optim": Option("adam", "outer (model) optimiser", choices=("adam", "sgd")),
    "ibau_space": Option("normalized", "where delta is added: 'normalized' (BackdoorBench / the paper: to the "
                                       "normalised images) or 'pixel' (the original I-BAU: to [0,1] images)",
                         choices=("normalized", "pixel")),
    "lr": Option(None, "outer optimiser learning rate (default: the space's, normalized 1e-4, pixel 1e-3)", type=float,
                 check=POSITIVE),
    "batch_size": Option(256, "batch size", check=POS_INT),
    "ibau_pert_lr": Option(10.0, "SGD learning rate of the universal perturbation (one pass per round)",
                           check=POSITIVE),
    "ibau_pert_reg": Option(0.001, "weight of ||delta||_2^2 in the perturbation objectives", check=NONNEG),
    "ibau_pert_norm": Option(0.0, "L2 radius of the perturbation, in its space (0: no projection, as both references)",
                             check=NONNEG),
    "ibau_inner_lr": Option(0.1, "step size of the fixed-point map Phi(delta) = delta - lr * dL_inner/d delta",
                            check=POSITIVE),
    "ibau_outer_portion": Option(0.01, "fraction of each batch perturbed by delta in the outer "
                                       "loss (at least one image)", check=PROB),
    "ibau_clamp": Option(False, "pixel space only: clamp x + delta to [0, 1] (the original code does not)"),
    "ibau_bn_train": Option(False, "train-mode BatchNorm during unlearning (official and BackdoorBench: eval mode)"),
    "augment": Option(True, "random crop (+ the dataset's flip) of the reserved data, like BackdoorBench's loader"),
}


def project_l2(delta: torch.Tensor, radius: float) -> torch.Tensor:
    """delta scaled onto the L2 ball of ``radius`` (no-op when inside or radius <= 0), in place."""
    if radius > 0:
        with torch.no_grad():
            n = delta.norm()
            if n > radius:
                delta.mul_(radius / n)
    return delta


SPACE_LR = {"normalized": 1e-4, "pixel": 1e-3}


def model_input(x01, delta, norm, cfg):
    """The model's input for [0,1] images ``x01`` carrying ``delta`` in ``cfg.ibau_space``."""
    if cfg.ibau_space == "normalized":
        return norm(x01) + delta
    x = x01 + delta
    return norm(x.clamp(0, 1) if cfg.ibau_clamp else x)


def find_perturbation(model, batches, norm, cfg, shape, device) -> torch.Tensor:
    """One pass of SGD ascent on the universal perturbation (in cfg.ibau_space), L2-projected when asked."""
    delta = torch.zeros(shape, device=device, requires_grad=True)
    opt = torch.optim.SGD([delta], lr=cfg.ibau_pert_lr)
    for x01, _ in batches:
        with torch.no_grad():
            pred = model(norm(x01)).argmax(1)
        loss = (-F.cross_entropy(model(model_input(x01, delta, norm, cfg)), pred)
                + cfg.ibau_pert_reg * delta.pow(2).sum())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        project_l2(delta.data, cfg.ibau_pert_norm)
    return delta.detach()


@torch.no_grad()
def perturbation_majority(model, reserved, norm, delta, cfg) -> tuple[int, float]:
    """(majority class of f(x + delta) over the reserved data, its share): where the perturbation points."""
    preds = []
    for xb, _, _ in iterate_batches(reserved, 1024):
        preds.append(model(model_input(xb.float().div_(255.0), delta, norm, cfg)).argmax(1))
    counts = torch.bincount(torch.cat(preds))
    return int(counts.argmax()), float(counts.max()) / max(1, len(reserved))


def _grads(out, inputs, **kw):
    gs = torch.autograd.grad(out, inputs, allow_unused=True, **kw)
    return [torch.zeros_like(i) if g is None else g for g, i in zip(gs, inputs)]


def hypergradient(model: nn.Module, params: list[torch.Tensor], delta: torch.Tensor, x01, y, norm, cfg,
                  generator: torch.Generator | None = None) -> list[torch.Tensor]:
    """The implicit hypergradient d L_outer(delta*(theta), theta) / d theta at the fixed point ``delta``."""
    delta = delta.detach().requires_grad_(True)
    n = len(y)
    k = max(1, int(n * cfg.ibau_outer_portion))
    pick = torch.randperm(n, generator=generator)[:k].to(x01.device)
    sel = torch.zeros(n, 1, 1, 1, device=x01.device)
    sel[pick] = 1.0
    # outer loss: a few images of the batch carry the perturbation, all keep their true labels
    outer = F.cross_entropy(model(model_input(x01, sel * delta, norm, cfg)), y)
    g_delta, *g_theta = _grads(outer, [delta] + params)
    # fixed-point map Phi(delta, theta) = delta - lr * d L_inner / d delta   (differentiable in delta and theta)
    inner = -F.cross_entropy(model(model_input(x01, delta, norm, cfg)), y) + cfg.ibau_pert_reg * delta.pow(2).sum()
    (d_inner,) = torch.autograd.grad(inner, delta, create_graph=True)
    phi = delta - cfg.ibau_inner_lr * d_inner
    v = torch.zeros_like(delta)
    for _ in range(int(cfg.K)):
        (jv,) = torch.autograd.grad(phi, delta, grad_outputs=v, retain_graph=True)
        v_new = jv + g_delta
        if torch.norm(v_new - v) < 1e-10:
            v = v_new
            break
        v = v_new
    indirect = _grads(phi, params, grad_outputs=v)
    return [a + b for a, b in zip(g_theta, indirect)]


def i_bau(ctx) -> DefenseResult:
    """I-BAU: minimax unlearning of a universal adversarial perturbation with the implicit hypergradient."""
    exp, model, reserved, cfg, log = ctx.exp, ctx.model, ctx.reserved, ctx.cfg, ctx.log
    if len(reserved) == 0:
        raise ConfigError("I-BAU needs the defender's reserved clean data, but it is empty; raise --ratio")
    lr = cfg.lr if cfg.lr is not None else SPACE_LR[cfg.ibau_space]  # the space's default (also filled by resolve)
    if cfg.ibau_clamp and cfg.ibau_space != "pixel":
        raise ConfigError("ibau_clamp clamps x + delta to [0, 1], which only exists with ibau_space pixel")
    g = engine.seed_everything(cfg.random_seed)
    norm = exp.norm
    hflip = bool(getattr(exp.info, "hflip", True))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = engine.make_optimizer(params, cfg.optim, lr=lr, momentum=0.0)
    shape = (1,) + tuple(reserved.view_shape)

    def batches():
        for xb, y, _ in iterate_batches(reserved, cfg.batch_size, shuffle=True, augment=cfg.augment, hflip=hflip,
                                        generator=g):
            yield xb.float().div_(255.0), y

    rows = []
    t0 = time.time()
    for r in range(1, cfg.n_rounds + 1):
        model.train(cfg.ibau_bn_train)
        delta = find_perturbation(model, batches(), norm, cfg, shape, exp.device)
        cls, share = perturbation_majority(model, reserved, norm, delta, cfg)
        tot, seen = 0.0, 0
        for x01, y in batches():
            grads = hypergradient(model, params, delta, x01, y, norm, cfg, generator=g)
            opt.zero_grad(set_to_none=True)
            for p, gr in zip(params, grads):
                p.grad = gr.detach()
            opt.step()
            with torch.no_grad():
                tot += F.cross_entropy(model(norm(x01)), y).item() * len(y)
            seen += len(y)
        if seen == 0:
            raise TrainingDiverged(f"I-BAU: round {r} made no optimizer step (no batch of reserved data); nothing "
                                          f"from this run was saved")
        train_loss = tot / seen
        if not math.isfinite(train_loss):
            raise TrainingDiverged(f"I-BAU: the loss became {train_loss} in round {r}; lower --lr")
        m = exp.metrics(model)
        rows.append({"epoch": r, "train_loss": train_loss, "pert_norm": float(delta.norm()), "pert_class": cls,
                     "pert_share": share,
                     **{k: m[k] for k in ("test_loss", "test_acc", "test_asr", "test_ra") if k in m}})
        log(f"round {r}/{cfg.n_rounds} ({time.time() - t0:.0f}s): ||delta||_2 {float(delta.norm()):.3f} sends "
            f"{share:.1%} of the reserved data to class {cls} (true target {exp.target}); clean loss after "
            f"{train_loss:.4f}; {engine.format_metrics(m)}")
    model.eval()
    return DefenseResult(model, rows, info={"i_bau": {"n_rounds": cfg.n_rounds, "K": cfg.K, "space": cfg.ibau_space,
                                                      "lr": lr, "projection_radius": cfg.ibau_pert_norm}})


def schema() -> dict:
    s = defense_schema(**IBAU_SCHEMA)
    for unused in ("epochs", "eval_every"):  # rounds replace epochs; metrics are computed every round
        s.pop(unused, None)
    return s


# entry name i_bau (defense/i_bau.py, config/defense/i_bau/), output folder i-bau as BackdoorBench names it
def resolve(cfg):
    """The derived default before the run: lr left unset is the ibau_space's (config.yaml then shows the value used)."""
    if cfg.lr is None:
        cfg.lr = SPACE_LR[cfg.ibau_space]
    return cfg


register("defense", "i_bau", folder=NAME, schema=schema, resolve=resolve,
         description="I-BAU (implicit backdoor adversarial unlearning) defense")(i_bau)
