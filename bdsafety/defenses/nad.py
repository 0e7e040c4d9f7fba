"""NAD: Neural Attention Distillation (Li et al., ICLR 2021), as BackdoorBench v2.2 runs it (``defense/nad.py``).

1. Teacher: a copy of the backdoored model fine-tuned with cross-entropy on the defender's reserved clean data for
   ``te_epochs`` (10) epochs: SGD lr 0.01, momentum 0.9, weight decay 5e-4, batch 256, CosineAnnealingLR with
   T_max = ``cos_t_max`` (BackdoorBench's fixed 100, so over 10 epochs the rate barely decays).
2. Student: the backdoored model trained on the same data with

       CE(f_s(x), y) + sum_i beta_i * MSE(A(F_s^i(x)), A(F_t^i(x)))

   where F^i is the output of layer i, A the attention map A(F) = s / (||s||_2 + 1e-6), s = sum_c |F_c|^p over
   channels (p = 2), normalised over the spatial positions of each sample, the MSE averaged over its elements, the
   teacher in eval mode and its maps detached. BackdoorBench trains the student for ``te_epochs`` too (its yaml's
   ``epochs: 100`` is never read): ``epochs`` here defaults to 10 for that reason. Learning rate: NAD's step schedule
   (``student_lr_schedule: nad``): ``lr`` for epochs 1-2, 0.01 for epochs 3-20, 1e-4 after (BackdoorBench's
   adjust_learning_rate; its cosine scheduler for the student is built but never stepped). SGD momentum 0.9, weight
   decay 5e-4, BackdoorBench's train augmentation for both stages.

Layers (``nad_layers``: three module names for beta1, beta2, beta3, an empty entry for an unused beta; ``auto``
picks BackdoorBench's choice for the model). BackdoorBench takes the outputs of the model's top-level children
truncated at -3, -2 and -1 for preactresnet18 (its children: conv1, layer1-4, avgpool, linear), so beta1 (500) acts
on the output of ``layer3``, beta2 (1000) on ``layer4`` and beta3 (1000) on ``avgpool``; for resnet18 and every
other torchvision model only beta3, on the output of the child before the classifier. ``auto`` here:

  ============================== ============================== =============================================
  model                          beta1 / beta2 / beta3 layers   why
  ============================== ============================== =============================================
  preactresnet18(_narrow)        layer3, layer4, avgpool        BackdoorBench's
  cnn_small                      features.9, features.13,       the same stages by feature-map size (8x8 after
                                 avgpool                        the third conv block, 4x4 after the fourth)
  any other model                -, -, <child before the        BackdoorBench's rule for resnet18 and the
                                 classifier>                    torchvision models
  ============================== ============================== =============================================

A 1x1 map (the ``avgpool`` outputs) has the attention map 1 - 1e-6/s for every sample, so its term and gradient are
negligible: BackdoorBench's beta3 does nothing on preactresnet18, and on resnet18 (torchvision, only beta3 on the
avgpool output) its NAD is plain fine-tuning of the backdoored model with CE. This is reproduced, not repaired;
name other layers in ``nad_layers`` to change it. A layer whose output is not a 4-D map is refused.

The teacher's per-epoch metrics go to nad_teacher_df.csv; the layers and betas used to config.yaml. fp32 by default
(BackdoorBench's yaml turns on amp).
"""
from __future__ import annotations

import copy

import pandas as pd
import torch
import torch.nn as nn
import torch.nn.functional as F

from bdsafety import engine
from bdsafety.config import NONNEG, POS_INT, POSITIVE, Check, Option
from bdsafety.defenses.base import DefenseResult, defense_schema
from bdsafety.defenses.finetune import check_common, make_sgd
from bdsafety.errors import ConfigError
from bdsafety.registry import register

NAME = "nad"
AUTO_LAYERS = {"preactresnet18": ("layer3", "layer4", "avgpool"),
               "preactresnet18_narrow": ("layer3", "layer4", "avgpool"),
               "cnn_small": ("features.9", "features.13", "avgpool")}
AT_EPS = 1e-6
# NAD's step schedule (epoch index from 0 -> learning rate; None: the configured lr)
NAD_SCHEDULE = ((2, None), (20, 0.01), (None, 1e-4))


def schema() -> dict:
    return defense_schema(
        te_epochs=Option(10, "epochs of the teacher's fine-tuning on the reserved data", check=POS_INT),
        epochs=Option(10, "epochs of the student's attention distillation (BackdoorBench uses te_epochs for both)",
                      check=POS_INT),
        batch_size=Option(256, "batch size", check=POS_INT),
        lr=Option(0.01, "SGD learning rate (teacher; the student's first epochs)", check=POSITIVE),
        sgd_momentum=Option(0.9, "SGD momentum", check=NONNEG),
        wd=Option(5e-4, "weight decay", check=NONNEG),
        cos_t_max=Option(100, "T_max of the teacher's cosine schedule (BackdoorBench's is fixed at 100)",
                         check=POS_INT),
        student_lr_schedule=Option("nad", "the student's learning rate: 'nad' (lr for epochs 1-2, 0.01 for 3-20, 1e-4 "
                                          "after: NAD's and BackdoorBench's) or 'none' (constant lr)",
                                   choices=("nad", "none")),
        beta1=Option(500.0, "weight of the attention loss at the first nad_layers entry", check=NONNEG),
        beta2=Option(1000.0, "weight of the attention loss at the second nad_layers entry", check=NONNEG),
        beta3=Option(1000.0, "weight of the attention loss at the third nad_layers entry", check=NONNEG),
        p=Option(2.0, "power of the attention map: sum over channels of |F|^p", check=Check(lo=0, lo_open=True,
                                                                                          text="a number > 0")),
        nad_layers=Option("auto", "module names whose outputs are distilled, for beta1,beta2,beta3 (comma list, an "
                                  "empty entry for an unused beta), or 'auto': BackdoorBench's choice for the model "
                                  "(see the module docstring)"),
    )


# ------------------------------------------------------------------------------------------- the loss
def attention_map(fm: torch.Tensor, p: float = 2.0, eps: float = AT_EPS) -> torch.Tensor:
    """(N, C, H, W) -> (N, 1, H, W): sum_c |F_c|^p, divided by its L2 norm over (H, W) + eps."""
    if fm.ndim != 4:
        raise ConfigError(f"NAD's attention map needs a 4-D feature map (N, C, H, W), got shape {tuple(fm.shape)}: "
                          "name convolutional layers in nad_layers")
    am = fm.abs().pow(p).sum(1, keepdim=True)
    return am / (torch.linalg.vector_norm(am, dim=(2, 3), keepdim=True) + eps)


def at_loss(fm_s: torch.Tensor, fm_t: torch.Tensor, p: float = 2.0) -> torch.Tensor:
    return F.mse_loss(attention_map(fm_s, p), attention_map(fm_t, p))


def resolve_layers(spec: str, model_name: str, model: nn.Module) -> list[str | None]:
    """Three module names (None: beta unused) for beta1..beta3 from ``spec`` ('auto' or 'a,b,c')."""
    if str(spec).strip() == "auto":
        if model_name in AUTO_LAYERS:
            names = list(AUTO_LAYERS[model_name])
        else:
            children = [n for n, _ in model.named_children()]
            if len(children) < 2:
                raise ConfigError(f"NAD: {model_name} has fewer than two top-level modules; set nad_layers")
            names = [None, None, children[-2]]
    else:
        parts = [s.strip() for s in str(spec).split(",")]
        if len(parts) != 3:
            raise ConfigError(f"nad_layers takes three comma-separated module names (one per beta, empty for unused), "
                              f"got {spec!r}")
        names = [s or None for s in parts]
    known = dict(model.named_modules())
    bad = [n for n in names if n is not None and n not in known]
    if bad:
        raise ConfigError(f"nad_layers: {model_name} has no module {bad}; e.g. " + ", ".join(list(known)[1:12]))
    if all(n is None for n in names):
        raise ConfigError("nad_layers names no layer")
    return names


class Taps:
    """Forward hooks keeping the outputs of the named modules of ``model`` from its latest forward pass."""

    def __init__(self, model: nn.Module, names: list[str]):
        self.out: dict[str, torch.Tensor] = {}
        mods = dict(model.named_modules())
        self.hooks = [mods[n].register_forward_hook(self._keep(n)) for n in names]

    def _keep(self, name):
        def hook(m, inp, out):
            self.out[name] = out
        return hook

    def remove(self):
        for h in self.hooks:
            h.remove()


def nad_step(optimizer, teacher: nn.Module, s_taps: Taps, t_taps: Taps, layers, betas, p: float):
    """engine.fit step: CE + sum_i beta_i * AT(student layer i, teacher layer i), the teacher frozen in eval mode."""
    pairs = [(n, b) for n, b in zip(layers, betas) if n is not None]

    def step(model, x, y):
        with torch.no_grad():
            teacher(x)
        optimizer.zero_grad(set_to_none=True)
        with engine.autocast(x.device):
            logits = model(x)
            loss = F.cross_entropy(logits.float(), y)
            for n, b in pairs:
                if b:
                    loss = loss + b * at_loss(s_taps.out[n].float(), t_taps.out[n].detach().float(), p)
        loss.backward()
        optimizer.step()
        return loss.detach(), logits.detach()

    return step


def nad_lr_lambda(lr: float):
    """LambdaLR factor of NAD's step schedule (absolute rates 0.01 / 1e-4 after epochs 2 / 20)."""
    def factor(epoch: int) -> float:
        for until, rate in NAD_SCHEDULE:
            if until is None or epoch < until:
                return 1.0 if rate is None else rate / lr
        return 1.0
    return factor


# ------------------------------------------------------------------------------------------- the defense
def nad(ctx) -> DefenseResult:
    """Fine-tune a teacher on the reserved data, then distil its attention maps into the backdoored model."""
    exp, model, reserved, cfg, log = ctx.exp, ctx.model, ctx.reserved, ctx.cfg, ctx.log
    check_common(cfg)
    gen = engine.seed_everything(cfg.random_seed)
    layers = resolve_layers(cfg.nad_layers, exp.model_name, model)
    betas = [float(cfg.beta1), float(cfg.beta2), float(cfg.beta3)]
    fit = dict(norm=exp.norm, batch_size=cfg.batch_size, hflip=exp.info.hflip, evalsets=exp.evalsets,
               eval_every=cfg.eval_every, eval_batch_size=cfg.eval_batch_size, generator=gen, progress=exp.progress)
    teacher = copy.deepcopy(model)
    t_opt = make_sgd(list(teacher.parameters()), cfg)
    t_rows = engine.fit(teacher, reserved, epochs=cfg.te_epochs, step_fn=engine.sgd_step(t_opt), optimizer=t_opt,
                        scheduler=engine.make_scheduler(t_opt, "cosine", cfg.cos_t_max), desc="nad teacher", **fit)
    teacher.eval()
    for prm in teacher.parameters():
        prm.requires_grad_(False)
    log(f"teacher: {cfg.te_epochs} epochs of fine-tuning -> {engine.format_metrics(t_rows[-1])}")
    log("attention distillation at "
        + ", ".join(f"beta{i + 1} {b:g}: {n}" for i, (n, b) in enumerate(zip(layers, betas))
                    if n is not None) + f", p {cfg.p:g}")
    used = [n for n in layers if n is not None]
    s_taps, t_taps = Taps(model, used), Taps(teacher, used)
    opt = make_sgd(list(model.parameters()), cfg)
    sched = (torch.optim.lr_scheduler.LambdaLR(opt, nad_lr_lambda(cfg.lr))
             if cfg.student_lr_schedule == "nad" else None)
    try:
        rows = engine.fit(model, reserved, epochs=cfg.epochs, step_fn=nad_step(opt, teacher, s_taps, t_taps, layers,
                                                                               betas, cfg.p),
                          optimizer=opt, scheduler=sched, desc="nad student", **fit)
    finally:
        s_taps.remove()
        t_taps.remove()
    model.eval()
    for r in rows:
        log(f"epoch {r['epoch']}: train_loss {r['train_loss']:.4f} {engine.format_metrics(r)}")
    info = {"nad": {"layers": {f"beta{i + 1}": n for i, n in enumerate(layers)}, "betas": betas, "p": float(cfg.p),
                    "teacher_after": {k: t_rows[-1][k] for k in ("test_acc", "test_asr", "test_ra")
                                      if k in t_rows[-1]}}}
    return DefenseResult(model, rows, artifacts={"nad_teacher_df.csv": pd.DataFrame(t_rows)}, info=info)


register("defense", NAME, schema=schema, description="NAD (Neural Attention Distillation): a fine-tuned teacher's "
                                                     "attention maps distilled into the backdoored model")(nad)
