"""TSC: Two-stage Symmetry Connectivity (Peng et al., "Circumventing Backdoor Space via Weight Symmetry", ICML 2025),
as its official code runs it (JiePeng104/TSC, ``BackdoorBench-main2/defense/repair_mc.py`` with
``utils/permutation_utils/permutation.py``, ``utils/mc/curve_models/curves.py`` and ``utils/curve/curve_opt.py``).

Each of ``rounds`` rounds (official ``TSPC_epoch`` 3) starts from the current model theta (round 1: the backdoored one):

1. Stage 1. theta' = a copy of theta whose hidden units are permuted to be as UNLIKE theta as possible (the channel
   assignment that MINIMISES the summed correlation of matched activations, ``maximize=False`` in the official
   code): the same function at a distant point of weight space. Train a quadratic Bezier curve
   theta(t) = (1-t)^2 A + 2t(1-t) M + t^2 B from A = theta to B = theta' (both ends fixed, M initialised at (A+B)/2)
   on the reserved clean data, and take the point p1 = theta(curve_t).
2. Stage 2. theta'' = theta permuted to MATCH p1 (the assignment that maximises the correlation). Train a curve from
   A = theta'' to B = p1 and take p2 = theta(curve_t).
3. Unless it is the last round, fine-tune p2 on the reserved data (``ft_epochs`` 10, SGD ``ft_lr`` 1e-4, momentum
   0.9, weight decay 5e-4, cosine over ft_epochs). p2 is the next round's theta; the last round's p2 is the output.

Permutation alignment (official: activation matching, not weight matching): for each permutation group (a set of
channels that must move together: a conv's outputs, the BatchNorm over them and the next layers' inputs; in a
ResNet the whole residual stream of a stage) the output of the group's probe layer (a conv, before its BatchNorm) is
recorded on the reserved data (train augmentation, batch 128, both models in eval mode), the Pearson correlation
between every channel of model 0 and every channel of model 1 is computed over all samples and positions
(cov / (std0 * std1 + 1e-4)), and the linear assignment problem on it is solved exactly (a numpy Hungarian
algorithm here, scipy's ``linear_sum_assignment`` in the official code). Model 1's channels are then reordered; the
function does not change. The official code computes the statistics as means of per-batch values; here they are
accumulated exactly over the data (a numerical difference only). Specs exist for this tool's native models
(``SUPPORTED``); any other architecture is refused.

Curve training (official ``CurveNet`` with ``Bezier``, ``num_bends`` 3, ``--fix_start --fix_end``, linear
initialisation): each batch draws one t ~ U(0, 1), runs the network at theta(t) (BatchNorm with batch statistics)
and minimises CE + 0.5 * ``curve_l2`` * ||theta(t)||^2 (the official ``l2_regularizer(wd)``, wd 1e-4 from its yaml)
over M only, with SGD (lr, momentum 0.9, weight decay 5e-4 on M, all hard-coded but lr) and CosineAnnealingLR with
T_max = ``cos_t_max`` = 100 stepped per epoch (hard-coded; with 200 epochs the rate falls to 0 at epoch 100 and
climbs back). A point theta(t) gets fresh BatchNorm statistics: reset, then one pass over the reserved data (train
augmentation) with a cumulative average (official ``update_bn``).

Defaults: the authors' README command for CIFAR-10 (``--curve_t 0.4 --ratio 0.05 --lr 0.02 --epochs 200
--batch_size 256 --fix_start --fix_end``) over the yaml's (lr 1e-4, 100 epochs, batch 100), and the argparse defaults
for the rest (TSPC_epoch 3, ft_epochs 10, ft_lr 1e-4). ``curve_t`` is the authors' value; nothing is selected on test
metrics. The official script saves no model (its save_defense_result is commented out); here the last p2 is written
as defense_result.pt. Rows: one per stage (``round``, ``stage``, the point's test metrics, the last curve epoch's loss,
the mean matched correlation of the alignment before it).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call

from bdsafety import engine
from bdsafety.config import NONNEG, POS_INT, POSITIVE, Check, Option
from bdsafety.data.device import iterate_batches
from bdsafety.defenses.base import DefenseResult, defense_schema
from bdsafety.errors import ConfigError
from bdsafety.registry import register

NAME = "tsc"
SUPPORTED = ("cnn_small", "preactresnet18", "preactresnet18_narrow", "resnet18_cifar")
CORR_EPS = 1e-4


def schema() -> dict:
    return defense_schema(
        rounds=Option(3, "rounds of the two stages (official TSPC_epoch)", check=POS_INT),
        epochs=Option(200, "curve-training epochs of each stage", check=POS_INT),
        batch_size=Option(256, "batch size of curve training, fine-tuning and BatchNorm re-estimation", check=POS_INT),
        lr=Option(0.02, "SGD learning rate of curve training", check=POSITIVE),
        sgd_momentum=Option(0.9, "SGD momentum (curve training and fine-tuning)", check=NONNEG),
        wd=Option(5e-4, "SGD weight decay (curve training: on the midpoint; and fine-tuning)", check=NONNEG),
        cos_t_max=Option(100, "T_max of the curve training's cosine schedule (official: fixed at 100)", check=POS_INT),
        curve_l2=Option(1e-4, "weight of the curve regulariser 0.5 * curve_l2 * ||theta(t)||^2 (official wd)",
                        check=NONNEG),
        curve_t=Option(0.4, "position on each trained curve of the point taken (0 = start, 1 = end)",
                       check=Check(lo=0, hi=1, lo_open=True, hi_open=True, text="a number in (0, 1)")),
        ft_epochs=Option(10, "fine-tuning epochs after every round but the last (0: none)", check=NONNEG),
        ft_lr=Option(1e-4, "SGD learning rate of that fine-tuning", check=POSITIVE),
        match_batch_size=Option(128, "batch size of the activation statistics for the permutation alignment",
                                check=POS_INT),
    )


# ------------------------------------------------------------------------------------------- permutation specs
@dataclass
class PermGroup:
    """Channels that are permuted together: ``out`` modules' output channels (weight dim 0, bias), the BatchNorms
    ``bn`` over them, and the input channels (weight dim 1) of ``inp``; matched on the output of ``probe``."""

    probe: str
    out: list[str]
    bn: list[str] = field(default_factory=list)
    inp: list[str] = field(default_factory=list)


def chain_spec(model: nn.Module) -> list[PermGroup]:
    """A plain chain (cnn_small): each conv's outputs, the BatchNorm after it, the next conv's or linear's inputs."""
    groups: list[PermGroup] = []
    cur = None
    for name, m in model.named_modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            if cur is not None:
                cur.inp.append(name)
                groups.append(cur)
            cur = PermGroup(probe=name, out=[name]) if isinstance(m, nn.Conv2d) else None
        elif isinstance(m, nn.BatchNorm2d) and cur is not None:
            cur.bn.append(name)
    return groups


def resnet_spec(model: nn.Module, preact: bool) -> list[PermGroup]:
    """PreAct-ResNet-18 / CIFAR ResNet-18: one group inside every block (conv1's outputs) and one per residual stream
    (the stem and every block writing into it; a projection shortcut starts a new stream)."""
    groups: list[PermGroup] = []
    stream = PermGroup(probe="conv1", out=["conv1"], bn=[] if preact else ["bn1"])
    for s in range(1, 5):
        for b, block in enumerate(model.get_submodule(f"layer{s}")):
            p = f"layer{s}.{b}"
            projection = block.shortcut is not None and len(block.shortcut) > 0
            stream.inp.append(f"{p}.conv1")
            if preact:
                stream.bn.append(f"{p}.bn1")
            groups.append(PermGroup(probe=f"{p}.conv1", out=[f"{p}.conv1"], bn=[f"{p}.bn2" if preact else f"{p}.bn1"],
                                    inp=[f"{p}.conv2"]))
            block_bns = [] if preact else [f"{p}.bn2"]
            if projection:
                stream.inp.append(f"{p}.shortcut.0")
                groups.append(stream)
                stream = PermGroup(probe=f"{p}.conv2", out=[f"{p}.conv2", f"{p}.shortcut.0"],
                                   bn=block_bns + ([] if preact else [f"{p}.shortcut.1"]))
            else:
                stream.out.append(f"{p}.conv2")
                stream.bn.extend(block_bns)
    stream.inp.append("linear")
    groups.append(stream)
    return groups


def permutation_spec(model_name: str, model: nn.Module) -> list[PermGroup]:
    if model_name == "cnn_small":
        return chain_spec(model)
    if model_name in ("preactresnet18", "preactresnet18_narrow"):
        return resnet_spec(model, preact=True)
    if model_name == "resnet18_cifar":
        return resnet_spec(model, preact=False)
    raise ConfigError(f"TSC's permutation alignment has no permutation spec for {model_name}; supported models: "
                      f"{', '.join(SUPPORTED)}")


@torch.no_grad()
def permute_(model: nn.Module, group: PermGroup, perm: torch.Tensor) -> None:
    """Reorder the group's channels in place: new channel k is old channel perm[k]; the function is unchanged."""
    mods = dict(model.named_modules())
    for n in group.out:
        m = mods[n]
        m.weight.copy_(m.weight[perm.to(m.weight.device)])
        if m.bias is not None:
            m.bias.copy_(m.bias[perm.to(m.bias.device)])
    for n in group.bn:
        m = mods[n]
        for t in (m.weight, m.bias, m.running_mean, m.running_var):
            if t is not None:
                t.copy_(t[perm.to(t.device)])
    for n in group.inp:
        w = mods[n].weight
        w.copy_(w[:, perm.to(w.device)])


# ------------------------------------------------------------------------------------------- the assignment
def linear_assignment(score: np.ndarray, maximize: bool = False) -> np.ndarray:
    """col[i] for every row i of a square matrix so that sum_i score[i, col[i]] is minimal (or maximal): the Hungarian
    algorithm with potentials (shortest augmenting paths), O(n^3), the inner loop vectorised."""
    a = np.asarray(score, dtype=np.float64)
    if a.ndim != 2 or a.shape[0] != a.shape[1]:
        raise ValueError(f"linear_assignment takes a square matrix, got shape {a.shape}")
    if maximize:
        a = -a
    n = a.shape[0]
    u = np.zeros(n + 1)
    v = np.zeros(n + 1)
    p = np.zeros(n + 1, dtype=np.int64)  # p[j]: the row (1-based) matched to column j; p[0] the row being added
    way = np.zeros(n + 1, dtype=np.int64)
    for i in range(1, n + 1):
        p[0] = i
        j0 = 0
        minv = np.full(n + 1, np.inf)
        used = np.zeros(n + 1, dtype=bool)
        while True:
            used[j0] = True
            i0 = p[j0]
            free = ~used[1:]
            cur = a[i0 - 1] - u[i0] - v[1:]
            better = free & (cur < minv[1:])
            minv[1:][better] = cur[better]
            way[1:][better] = j0
            cand = np.where(free, minv[1:], np.inf)
            j1 = int(np.argmin(cand)) + 1
            delta = cand[j1 - 1]
            u[p[used]] += delta
            v[used] -= delta
            minv[1:][free] -= delta
            j0 = j1
            if p[j0] == 0:
                break
        while j0:
            j1 = way[j0]
            p[j0] = p[j1]
            j0 = j1
    col = np.empty(n, dtype=np.int64)
    col[p[1:] - 1] = np.arange(n)
    return col


@torch.no_grad()
def activation_correlations(model0: nn.Module, model1: nn.Module, probes: list[str], ds, norm, batch_size: int,
                            hflip: bool, generator) -> list[torch.Tensor]:
    """Per probe, the (C, C) Pearson correlation of model 0's channel i with model 1's channel j over all samples
    and positions of ``ds`` (train augmentation; both models in eval mode)."""
    stats = [None] * len(probes)
    acts: dict[tuple[int, int], torch.Tensor] = {}
    hooks = []
    for k, model in enumerate((model0, model1)):
        mods = dict(model.named_modules())
        for i, n in enumerate(probes):
            hooks.append(mods[n].register_forward_hook(lambda m, inp, out, key=(k, i): acts.__setitem__(key, out)))
    was = (model0.training, model1.training)
    model0.eval()
    model1.eval()
    try:
        for xb, _, _ in iterate_batches(ds, batch_size, shuffle=True, augment=True, hflip=hflip, generator=generator):
            x = norm.from_uint8(xb)
            model0(x)
            model1(x)
            for i in range(len(probes)):
                o0, o1 = (acts[(k, i)].double() for k in (0, 1))
                c = o0.shape[1]
                r0 = o0.reshape(o0.shape[0], c, -1).transpose(1, 2).reshape(-1, c)
                r1 = o1.reshape(o1.shape[0], c, -1).transpose(1, 2).reshape(-1, c)
                s = (r0.shape[0], r0.sum(0), r1.sum(0), (r0 * r0).sum(0), (r1 * r1).sum(0), r0.T @ r1)
                stats[i] = s if stats[i] is None else tuple(a + b for a, b in zip(stats[i], s))
    finally:
        for h in hooks:
            h.remove()
        model0.train(was[0])
        model1.train(was[1])
    out = []
    for n, s0, s1, q0, q1, s01 in stats:
        m0, m1 = s0 / n, s1 / n
        cov = s01 / n - torch.outer(m0, m1)
        std0 = (q0 / n - m0 * m0).clamp_min(0).sqrt()
        std1 = (q1 / n - m1 * m1).clamp_min(0).sqrt()
        out.append((cov / (torch.outer(std0, std1) + CORR_EPS)).float().cpu())
    return out


def align(model0: nn.Module, model1: nn.Module, spec: list[PermGroup], ds, norm, *, maximize: bool, batch_size: int,
          hflip: bool, generator) -> tuple[nn.Module, float]:
    """model1 permuted (in place) so that its channels match model0's as well (maximize) or as badly as possible;
    returns it and the mean correlation of the matched channels."""
    corrs = activation_correlations(model0, model1, [g.probe for g in spec], ds, norm, batch_size, hflip, generator)
    matched = []
    for g, corr in zip(spec, corrs):
        col = linear_assignment(corr.numpy(), maximize=maximize)
        matched.append(float(corr.numpy()[np.arange(len(col)), col].mean()))
        permute_(model1, g, torch.as_tensor(col))
    return model1, float(np.mean(matched))


# ------------------------------------------------------------------------------------------- the curve
def bezier_coeffs(t: float) -> tuple[float, float, float]:
    """Quadratic Bezier (num_bends 3): theta(t) = c0 * start + c1 * middle + c2 * end."""
    return (1 - t) ** 2, 2 * t * (1 - t), t ** 2


class BezierCurve(nn.Module):
    """theta(t) over the parameters of ``base`` between fixed ``start`` and ``end``; only the midpoint M trains.
    Each forward draws one t ~ U(0, 1) (or uses ``fixed_t``) and runs ``base`` at theta(t)."""

    def __init__(self, base: nn.Module, start: dict, end: dict, generator: torch.Generator | None = None):
        super().__init__()
        self.base = base
        self.names = [n for n, _ in base.named_parameters()]
        for prm in base.parameters():
            prm.requires_grad_(False)
        self.start = {n: start[n].detach().clone() for n in self.names}
        self.end = {n: end[n].detach().clone() for n in self.names}
        self.middle = nn.ParameterList([nn.Parameter((self.start[n] + self.end[n]) / 2) for n in self.names])
        self.generator = generator
        self.fixed_t: float | None = None
        self.l2 = torch.zeros(())

    def weights(self, t: float) -> dict[str, torch.Tensor]:
        c0, c1, c2 = bezier_coeffs(t)
        return {n: c0 * self.start[n] + c1 * m + c2 * self.end[n] for n, m in zip(self.names, self.middle)}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.fixed_t if self.fixed_t is not None else float(torch.rand((), generator=self.generator))
        w = self.weights(t)
        self.l2 = sum((v * v).sum() for v in w.values())
        return functional_call(self.base, w, (x,))


def curve_loss(curve: BezierCurve, l2_weight: float):
    def loss_fn(logits, y):
        return F.cross_entropy(logits, y) + 0.5 * l2_weight * curve.l2
    return loss_fn


def point_on_curve(curve: BezierCurve, template: nn.Module, t: float) -> nn.Module:
    """A plain model with the curve's weights at t (buffers from ``template``; re-estimate BN afterwards)."""
    model = copy.deepcopy(template)
    sd = model.state_dict()
    sd.update({n: w.detach() for n, w in curve.weights(t).items()})
    model.load_state_dict(sd)
    return model


# ------------------------------------------------------------------------------------------- the defense
def tsc(ctx) -> DefenseResult:
    """Two-stage symmetry connectivity: rounds of (un-aligned curve, aligned curve, fine-tuning)."""
    exp, cfg, log = ctx.exp, ctx.cfg, ctx.log
    spec = permutation_spec(exp.model_name, ctx.model)
    gen = engine.seed_everything(cfg.random_seed)
    ds, norm, hflip = ctx.reserved, exp.norm, exp.info.hflip
    match = dict(batch_size=cfg.match_batch_size, hflip=hflip, generator=gen)
    log(f"TSC: {len(spec)} permutation groups on {exp.model_name}; {cfg.rounds} rounds, curve_t {cfg.curve_t:g}, "
        f"{cfg.epochs} curve epochs per stage")

    def curve_point(start, end, desc):
        base = copy.deepcopy(start)
        curve = BezierCurve(base, dict(start.named_parameters()), dict(end.named_parameters()), generator=gen)
        opt = engine.make_optimizer(list(curve.middle), "sgd", cfg.lr, cfg.sgd_momentum, cfg.wd)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=cfg.cos_t_max)
        fit_rows = engine.fit(curve, ds, norm=norm, epochs=cfg.epochs, batch_size=cfg.batch_size,
                              step_fn=engine.sgd_step(opt, loss_fn=curve_loss(curve, cfg.curve_l2)), scheduler=sched,
                              optimizer=opt, hflip=hflip, generator=gen, desc=desc, progress=exp.progress)
        point = point_on_curve(curve, start, cfg.curve_t)
        engine.recompute_bn_stats(point, ds, norm, cfg.batch_size, augment=True, hflip=hflip, generator=gen)
        point.eval()
        return point, fit_rows[-1]["train_loss"]

    current = ctx.model
    rows = []
    for r in range(1, cfg.rounds + 1):
        far, corr1 = align(current, copy.deepcopy(current), spec, ds, norm, maximize=False, **match)
        p1, loss1 = curve_point(current, far, f"tsc round {r} stage 1")
        near, corr2 = align(p1, copy.deepcopy(current), spec, ds, norm, maximize=True, **match)
        p2, loss2 = curve_point(near, p1, f"tsc round {r} stage 2")
        for stage, (pt, loss, corr) in enumerate(((p1, loss1, corr1), (p2, loss2, corr2)), start=1):
            row = {"epoch": 2 * (r - 1) + stage, "round": r, "stage": stage, "curve_loss": loss,
                   "matched_corr": corr, **exp.metrics(pt)}
            rows.append(row)
            log(f"round {r} stage {stage}: alignment mean matched correlation {corr:.3f}, curve loss {loss:.4f}, "
                f"point t={cfg.curve_t:g}: {engine.format_metrics(row)}")
        if r < cfg.rounds and cfg.ft_epochs > 0:
            opt = engine.make_optimizer(list(p2.parameters()), "sgd", cfg.ft_lr, cfg.sgd_momentum, cfg.wd)
            engine.fit(p2, ds, norm=norm, epochs=cfg.ft_epochs, batch_size=cfg.batch_size,
                       step_fn=engine.sgd_step(opt), optimizer=opt,
                       scheduler=engine.make_scheduler(opt, "cosine", cfg.ft_epochs), hflip=hflip, generator=gen,
                       desc=f"tsc round {r} fine-tuning", progress=exp.progress)
            p2.eval()
            log(f"round {r}: fine-tuned {cfg.ft_epochs} epochs (lr {cfg.ft_lr:g})")
        current = p2
    current.eval()
    info = {"tsc": {"permutation_groups": len(spec), "rounds": cfg.rounds, "curve_t": cfg.curve_t,
                    "stages": [{k: r[k] for k in ("round", "stage", "matched_corr", "curve_loss",
                                                  "test_acc", "test_asr")
                                if k in r} for r in rows]}}
    return DefenseResult(current, rows, info=info)


register("defense", NAME, schema=schema, description="TSC (Two-stage Symmetry Connectivity): permutation alignment and "
                                                     "quadratic mode connectivity to leave the backdoor basin")(tsc)
