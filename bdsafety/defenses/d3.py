"""D3: Distance-Driven Detoxification (Wei, Liu and Zha, ICCV 2025; arXiv 2411.09585), as its official code runs it
(shawkui/Distance_Driven_Detoxification, ``defense/d3.py`` and ``config/defense/d3/config.yaml``).

Purification as constrained optimisation: move the selected layers' weights W_l as FAR as possible from their
initial (backdoored) values W0_l while the clean loss on the defender's reserved data stays small:

    minimise  lmd * mean_i relu(CE(f(x_i), y_i) - eps)  -  sum_l ||W_l - W0_l||_p      (lmd <= 1)
              (lmd * clean - distance) / (lmd + 1)                                      (lmd > 1, the official rescale)
    subject to ||W_l||_p = ||W0_l||_p   (after every step each W_l is rescaled back to its initial norm)

The hinge ``relu(CE - eps)`` stops rewarding samples whose loss is already below eps, so the distance term dominates
once the clean loss is bounded. The selected layers are every nn.Linear / nn.Conv2d inside the module named by
``select_layer_name`` (official: ``linear``, the head of preactresnet18; ``auto`` here: the model's classifier layer,
which is ``linear`` on every native model); only their ``weight`` enters the distance and the projection (not the
bias, as in the official code). SGD updates EVERY parameter of the model (the official optimiser is built on
``model.parameters()``).

Warm-up of the selected weights before training (``warm_up_method``; official default ``random``): ``random`` draws
W ~ U(-0.5, 0.5) and rescales it to ||W0||_p; ``far`` W = -W0; ``middle`` W = 0; ``noise`` W0 + N(0, std(W0)^2);
``near`` leaves W0 (the official comment: very slow to converge).

Optimisation (official): SGD lr 0.01, momentum 0.9, NO weight decay (the official yaml's ``wd: 5e-4`` is never passed
to the optimiser), CosineAnnealingLR with T_max = epochs (100), batch 256, 5% reserved clean data, BackdoorBench's
train augmentation, the model in train mode (``train_mode``; False keeps BatchNorm in eval mode, which the official
help says gives higher C-Acc and higher ASR). The official code reads ``lmd``, ``eps``, ``Lp`` from one config.yaml for
every dataset; the per-dataset yamls here repeat it. fp32 (the official yaml turns on amp).

The last metrics row and config.yaml record the final ``weight_distance`` (sum_l ||W_l - W0_l||_p); config.yaml also
gets the selected layers and their initial norms.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from bdsafety import engine
from bdsafety.config import NONNEG, POS_INT, POSITIVE, Check, Option
from bdsafety.defenses.base import DefenseResult, defense_schema
from bdsafety.defenses.finetune import OPTIM_SCHEMA, check_common, fit_reserved, keep_eval, make_sgd
from bdsafety.errors import ConfigError
from bdsafety.models import classifier_layer
from bdsafety.registry import register

NAME = "d3"
WARM_UP = ("random", "far", "middle", "noise", "near")


def schema() -> dict:
    return defense_schema(
        epochs=Option(100, "training epochs", check=POS_INT),
        batch_size=Option(256, "batch size", check=POS_INT),
        lr=Option(0.01, "SGD learning rate", check=POSITIVE),
        **{**OPTIM_SCHEMA,
           "wd": Option(0.0, "weight decay (official: none; its yaml's wd is never used)", check=NONNEG)},
        lmd=Option(0.5, "weight of the hinged clean loss against the weight distance", check=POSITIVE),
        eps=Option(0.1, "hinge of the clean loss: per-sample losses below eps are not penalised", check=NONNEG),
        Lp=Option(2.0, "order p of the weight distance ||W - W0||_p and of the norm constraint",
                  check=Check(lo=1, text="a number >= 1")),
        select_layer_name=Option("auto", "module whose nn.Linear / nn.Conv2d weights are pushed away and "
                                         "norm-constrained ('auto': the model's classifier layer; official: linear)"),
        warm_up_method=Option("random", "initialisation of the selected weights: random (U(-0.5,0.5) at the initial "
                                        "norm), far (-W0), middle (0), noise (W0 + Gaussian), near (W0)",
                              choices=WARM_UP),
        train_mode=Option(True, "train with BatchNorm in train mode (official default); false keeps it in eval mode"),
    )


# ------------------------------------------------------------------------------------------- the objective
def selected_layers(model: nn.Module, select_layer_name: str) -> list[tuple[str, nn.Module]]:
    """(name, module) of every nn.Linear / nn.Conv2d inside ``select_layer_name`` ('auto': the classifier layer)."""
    if select_layer_name == "auto":
        head = classifier_layer(model)
        select_layer_name = next(n for n, m in model.named_modules() if m is head)
    mods = dict(model.named_modules())
    if select_layer_name not in mods:
        raise ConfigError(f"select_layer_name: the model has no module {select_layer_name!r}; e.g. "
                          + ", ".join(list(mods)[1:12]))
    root = mods[select_layer_name]
    out = [(f"{select_layer_name}.{n}" if n else select_layer_name, m) for n, m in root.named_modules()
           if isinstance(m, (nn.Linear, nn.Conv2d))]
    if not out:
        raise ConfigError(f"select_layer_name {select_layer_name!r} holds no nn.Linear or nn.Conv2d layer")
    return out


def weight_distance(weights: list[torch.Tensor], initial: list[torch.Tensor], p: float) -> torch.Tensor:
    """sum_l ||W_l - W0_l||_p over the flattened weights (the official per-layer torch.norm, summed)."""
    return sum(torch.linalg.vector_norm((w - w0).flatten(), ord=p) for w, w0 in zip(weights, initial))


def d3_loss(logits: torch.Tensor, y: torch.Tensor, distance: torch.Tensor, lmd: float, eps: float) -> torch.Tensor:
    """lmd * mean relu(CE - eps) - distance, divided by (lmd + 1) when lmd > 1 (the official code's rescale)."""
    clean = F.relu(F.cross_entropy(logits, y, reduction="none") - eps).mean()
    loss = lmd * clean - distance
    return loss / (lmd + 1) if lmd > 1 else loss


@torch.no_grad()
def project_norms_(weights: list[torch.Tensor], norms: list[torch.Tensor], p: float) -> None:
    """Rescale each W_l in place to its initial norm ||W0_l||_p (the official projection after every step)."""
    for w, n0 in zip(weights, norms):
        w.mul_(n0 / torch.linalg.vector_norm(w.flatten(), ord=p))


@torch.no_grad()
def warm_up_(weights: list[torch.Tensor], norms: list[torch.Tensor], method: str, p: float,
             generator: torch.Generator | None = None) -> None:
    """The official warm-up of the selected weights (in place)."""
    for w, n0 in zip(weights, norms):
        if method == "random":
            fresh = torch.empty(w.shape, dtype=w.dtype).uniform_(-0.5, 0.5, generator=generator).to(w.device)
            w.copy_(fresh * n0 / torch.linalg.vector_norm(fresh.flatten(), ord=p))
        elif method == "far":
            w.neg_()
        elif method == "middle":
            w.zero_()
        elif method == "noise":
            w.add_(torch.randn(w.shape, dtype=w.dtype, generator=generator).to(w.device) * w.std())
        elif method != "near":
            raise ConfigError(f"warm_up_method must be one of {', '.join(WARM_UP)}, got {method!r}")


def d3_step(optimizer, weights, initial, norms, cfg):
    """engine.fit step: the D3 objective, an SGD step, then the norm projection."""
    p = float(cfg.Lp)

    def step(model, x, y):
        optimizer.zero_grad(set_to_none=True)
        with engine.autocast(x.device):
            logits = model(x)
        with engine.fp32(x.device):
            loss = d3_loss(logits.float(), y, weight_distance(weights, initial, p), cfg.lmd, cfg.eps)
        loss.backward()
        optimizer.step()
        project_norms_(weights, norms, p)
        return loss.detach(), logits.detach()

    return step


# ------------------------------------------------------------------------------------------- the defense
def d3(ctx) -> DefenseResult:
    """Push the selected layers away from the backdoored weights under a bounded clean loss and a norm constraint."""
    exp, model, cfg, log = ctx.exp, ctx.model, ctx.cfg, ctx.log
    check_common(cfg)
    gen = engine.seed_everything(cfg.random_seed)
    p = float(cfg.Lp)
    layers = selected_layers(model, cfg.select_layer_name)
    weights = [m.weight for _, m in layers]
    initial = [w.detach().clone() for w in weights]
    norms = [torch.linalg.vector_norm(w0.flatten(), ord=p) for w0 in initial]
    warm_up_(weights, norms, cfg.warm_up_method, p, generator=gen)
    log(f"D3 on {', '.join(n for n, _ in layers)} (L{p:g}, lmd {cfg.lmd:g}, eps {cfg.eps:g}, warm-up "
        f"{cfg.warm_up_method}): distance after warm-up {float(weight_distance(weights, initial, p).detach()):.4f}")
    opt = make_sgd(list(model.parameters()), cfg)
    step = d3_step(opt, weights, initial, norms, cfg)
    if not cfg.train_mode:
        step = keep_eval([m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)], step)
    rows = fit_reserved(exp, model, ctx.reserved, cfg, step_fn=step, optimizer=opt, generator=gen, desc="d3")
    model.eval()
    # the distance is constant within the epoch's last step; record the final value on the last row
    final = float(weight_distance(weights, initial, p).detach())
    rows[-1]["weight_distance"] = final
    for r in rows:
        log(f"epoch {r['epoch']}: train_loss {r['train_loss']:.4f} {engine.format_metrics(r)}")
    log(f"final weight distance sum_l ||W_l - W0_l||_{p:g} = {final:.4f}")
    info = {"d3": {"layers": [n for n, _ in layers], "initial_norms": [float(n) for n in norms],
                   "weight_distance": final, "warm_up_method": cfg.warm_up_method}}
    return DefenseResult(model, rows, info=info)


register("defense", NAME, schema=schema, description="D3 (Distance-Driven Detoxification): push the head's weights "
                                                     "away from the backdoored ones under a hinged clean loss and a "
                                                     "norm constraint")(d3)
