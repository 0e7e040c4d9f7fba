"""Retune-aware purification: THIS PROJECT'S OWN METHOD (issue 24, item 8), not a published defense.

A purifier trained against the retuning attack it will face, with first-order meta-learning (as first-order MAML and
tamper-resistant training of language models do). It uses only what a defender has: the reserved clean data D_r and
the BTI-DBF inverted trigger G with its detected target t^ (bdsafety.defenses.bti, the SAME cached inversion as PAM:
the yamls give PAM's bti_ settings, so one inversion on a record serves pam, pam_reinvert, bti_dbf and this one). It
never sees the attack's real poisoned samples (the record's bd_train) nor test data.

Training (PAM's data and schedule, SGD lr / momentum / rounds x epochs of config/defense/pam/<dataset>.yaml; no
path-aware displacement): every batch of D_r has int(p_rev * B + 1) images x_i replaced by G(x_i) under their TRUE
labels (PAM's batches, ``mixing_batch_fn`` count 'bti'); call that batch (x_mix, y) and the purifier's loss L(theta) =
CE(f_theta(x_mix), y).
  * an ordinary step: g = grad L(theta_t);
  * every ``meta_every``-th step, a simulated retuning attack on a COPY of theta_t: ``inner_steps`` SGD steps (RA's
    optimizer: lr ``inner_lr``, momentum ``inner_momentum``, a fresh momentum buffer every time, as RA starts one) on
    fresh random batches of D_r (``inner_batch_size``, the train augmentation) in which int(inner_p_poison * B + 1)
    images are replaced by G(x) labelled with the DETECTED target t^ (the defender's stand-in for the attacker's
    poisoned samples), giving theta'; then
        g = (1 - meta_weight) * grad L(theta_t) + meta_weight * grad L(theta')
    (first-order: grad L(theta') is used as the gradient with respect to theta_t, the Jacobian d theta'/d theta_t
    taken as the identity). The copy's steps never touch theta_t; its BatchNorm running statistics are the copy's own.
Then the purifier's optimizer steps theta_t with g. BatchNorm running statistics of theta_t are updated by its own
forward pass (train mode), as in plain fine-tuning.

Each epoch's row carries ``meta_loss`` (mean L(theta') over the epoch's meta steps) and ``meta_target_rate`` (the
fraction of the purifier batch's inverted samples of classes other than t^ that the attacked copy classifies as t^:
the simulated attack's success on the defender's own data, not a test metric). config.yaml carries detected_target,
true_target, target_match and target_votes (as PAM's).

Defaults: PAM's values for everything PAM has; the inner attack takes RA's optimizer and batch (config/retune_attack/ra/
<dataset>.yaml: SGD lr 0.01, momentum 0.9, no weight decay, batch 128) for 5 steps (RA on CIFAR-10 makes 40: 1,000
images / 128 x 5 epochs), and a poisoned fraction of 0.2 (PAM's p_rev; RA's 5 of 1,000 would put one inverted sample in
each of 5 batches, too weak a stand-in for 40 steps); meta_every 2 and meta_weight 0.5. All fixed before any run;
none was chosen by a test metric.
"""
from __future__ import annotations

import copy
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from bdsafety import engine
from bdsafety.config import FRACTION, NONNEG, POS_INT, POSITIVE, Option
from bdsafety.defenses import bti
from bdsafety.defenses.base import DefenseResult
from bdsafety.defenses.mixing import generator_replacer, mix_count, mixing_batch_fn
from bdsafety.registry import register

NAME = "retune_aware"

RETUNE_AWARE_SCHEMA = {
    # the purifier: PAM's data and schedule (config/defense/pam/<dataset>.yaml)
    "p_rev": Option(0.2, "fraction of every purifier batch replaced by G(x) with their TRUE labels (PAM's p_rev, "
                         "count int(p_rev * B + 1))", check=FRACTION),
    "n_rounds": Option(3, "rounds of --epochs each (PAM's schedule; the generator is the round-1 inversion in every "
                          "round, as pam's)", check=POS_INT),
    "epochs": Option(30, "purifier epochs per round", check=POS_INT),
    "lr": Option(0.01, "purifier optimizer (SGD) learning rate", check=POSITIVE),
    "sgd_momentum": Option(0.1, "purifier optimizer (SGD) momentum", check=NONNEG),
    "wd": Option(0.0, "purifier optimizer (SGD) weight decay", check=NONNEG),
    "augment": Option(True,
                      "random crop + horizontal flip of the reserved data (purifier and simulated attack batches)"),
    # the simulated retuning attack and the meta-gradient
    "meta_every": Option(2, "run the simulated retuning attack and take the meta-gradient every this many purifier "
                            "steps (1 = every step)", check=POS_INT),
    "meta_weight": Option(0.5, "g = (1 - w) * grad L(theta) + w * grad L(theta_attacked) on meta steps (1 = the "
                               "attacked weights' gradient only)", check=FRACTION),
    "inner_steps": Option(5, "SGD steps of the simulated retuning attack per meta step (RA on CIFAR-10 makes 40)",
                          check=POS_INT),
    "inner_lr": Option(0.01, "simulated retuning attack: SGD learning rate (RA's)", check=POSITIVE),
    "inner_momentum": Option(0.9, "simulated retuning attack: SGD momentum (RA's; a fresh buffer every meta step)",
                             check=NONNEG),
    "inner_wd": Option(0.0, "simulated retuning attack: SGD weight decay (RA's)", check=NONNEG),
    "inner_batch_size": Option(128, "simulated retuning attack: batch size (RA's)", check=POS_INT),
    "inner_p_poison": Option(0.2, "simulated retuning attack: fraction of each batch replaced by G(x) labelled with "
                                  "the DETECTED target (count int(p * B + 1); 0 = benign retuning)", check=FRACTION),
}


# ---------------------------------------------------------------------------------------------- the step
class RetuneAwareStep:
    """One purifier step, usable as ``engine.fit``'s ``step_fn``; see the module docstring.

    ``attack_batch()`` returns one (normalised x, labels) batch of the simulated retuning attack. Every
    ``meta_every``-th call (the first at call ``meta_every``) runs ``inner_steps`` SGD steps of it on a copy of the
    model and adds ``meta_weight`` times the purifier loss's gradient at the copy's final weights to
    ``(1 - meta_weight)`` times its gradient at the current weights; other calls use the latter alone (weight 1).
    Returns (loss, logits) at the current weights. ``last_meta`` holds (meta loss, logits of the attacked copy) of the
    latest meta step, or None.
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, attack_batch: Callable[[], tuple], *,
                 meta_every: int, meta_weight: float, inner_steps: int, inner_lr: float, inner_momentum: float,
                 inner_wd: float = 0.0, loss_fn: Callable = F.cross_entropy):
        if meta_every < 1 or inner_steps < 1:
            raise ValueError(f"meta_every ({meta_every}) and inner_steps ({inner_steps}) must be >= 1")
        if not 0.0 <= meta_weight <= 1.0:
            raise ValueError(f"meta_weight mixes two gradients and must be in [0, 1], got {meta_weight}")
        self.model = model
        self.optimizer = optimizer
        self.attack_batch = attack_batch
        self.meta_every = int(meta_every)
        self.meta_weight = float(meta_weight)
        self.inner_steps = int(inner_steps)
        self.inner_lr, self.inner_momentum, self.inner_wd = float(inner_lr), float(inner_momentum), float(inner_wd)
        self.loss_fn = loss_fn
        self.shadow = copy.deepcopy(model)  # the attacker's copy, overwritten with theta_t at every meta step
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.shadow_params = [p for p in self.shadow.parameters() if p.requires_grad]
        self.calls = 0
        self.last_meta: tuple[torch.Tensor, torch.Tensor] | None = None

    @torch.no_grad()
    def _load_shadow(self) -> None:
        for s, p in zip(self.shadow.parameters(), self.model.parameters()):
            s.copy_(p)
        for s, b in zip(self.shadow.buffers(), self.model.buffers()):
            s.copy_(b)
        self.shadow.train(self.model.training)

    def attacked_copy(self) -> nn.Module:
        """The simulated retuning attack: the copy loaded with theta_t, then ``inner_steps`` SGD steps on
        ``attack_batch()``; theta_t is not touched."""
        self._load_shadow()
        opt = torch.optim.SGD(self.shadow_params, lr=self.inner_lr, momentum=self.inner_momentum,
                              weight_decay=self.inner_wd)
        for _ in range(self.inner_steps):
            xa, ya = self.attack_batch()
            opt.zero_grad(set_to_none=True)
            with engine.autocast(xa.device):
                logits = self.shadow(xa)
            self.loss_fn(logits.float(), ya).backward()
            opt.step()
        opt.zero_grad(set_to_none=True)
        return self.shadow

    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor):
        if model is not self.model:
            raise ValueError("this RetuneAwareStep was built for another model; build one per model")
        self.calls += 1
        meta = self.calls % self.meta_every == 0
        w_here = 1.0 - self.meta_weight if meta else 1.0
        self.optimizer.zero_grad(set_to_none=True)
        with engine.autocast(x.device):
            logits = model(x)
        loss = self.loss_fn(logits.float(), y)
        (w_here * loss).backward()
        if meta:
            shadow = self.attacked_copy()
            with engine.autocast(x.device):
                s_logits = shadow(x)
            s_loss = self.loss_fn(s_logits.float(), y)
            s_loss.backward()
            with torch.no_grad():
                for p, s in zip(self.params, self.shadow_params):
                    if s.grad is None:
                        continue
                    if p.grad is None:
                        p.grad = s.grad.mul(self.meta_weight)
                    else:
                        p.grad.add_(s.grad, alpha=self.meta_weight)
            self.shadow.zero_grad(set_to_none=True)
            self.last_meta = (s_loss.detach(), s_logits.detach())
        self.optimizer.step()
        return loss.detach(), logits.detach()


# ---------------------------------------------------------------------------------------------- the batches
def target_replacer(G: nn.Module, target: int) -> Callable:
    """xn -> G(xn) labelled with ``target`` (normalised space): the simulated attacker's poisoned samples."""
    inverted = generator_replacer(G, bti.apply_generator)

    def replace(xn, y):
        out, _ = inverted(xn, y)
        return out, torch.full_like(y, int(target))

    return replace


def purifier_batch_fn(norm, G: nn.Module, p_rev: float) -> Callable:
    """engine.fit batch_fn: PAM's batches, int(p_rev * B + 1) images replaced by G(x) under their TRUE labels."""
    return mixing_batch_fn(norm, p_rev, generator_replacer(G, bti.apply_generator), count="bti", space="normalized")


def attack_batches(reserved, norm, G: nn.Module, target: int, p_poison: float, batch_size: int, *, augment: bool,
                   hflip: bool, generator: torch.Generator | None) -> Callable[[], tuple]:
    """A callable drawing one simulated-attack batch: ``batch_size`` random reserved images (without replacement
    within the batch; all of them when fewer), train augmentation when ``augment``, the first
    int(p_poison * B + 1) replaced by G(x) labelled ``target``."""
    mix = mixing_batch_fn(norm, p_poison, target_replacer(G, target), count="bti", space="normalized")
    n = len(reserved)

    def draw():
        j = torch.randperm(n, generator=generator)[: min(batch_size, n)].to(reserved.device)
        xb = reserved.augmented(j, hflip=hflip, generator=generator) if augment else reserved.view(j)
        return mix(xb, reserved.y[j], j)

    return draw


# ---------------------------------------------------------------------------------------------- the defense
class _EpochMeter:
    """Per-epoch means of the meta steps' loss at the attacked weights and of the rate at which the attacked copy
    sends the purifier batch's inverted samples of other classes to the detected target."""

    def __init__(self, step: RetuneAwareStep, n_inverted: Callable[[int], int], target: int):
        self.step, self.n_inverted, self.target = step, n_inverted, int(target)
        self.loss, self.hits, self.seen, self.steps = 0.0, 0, 0, 0

    def __call__(self, model, x, y):
        out = self.step(model, x, y)
        if self.step.calls % self.step.meta_every == 0:  # this call was a meta step
            s_loss, s_logits = self.step.last_meta
            k = self.n_inverted(len(y))
            other = y[:k] != self.target  # inverted samples of the target class itself would count as clean hits
            self.loss += float(s_loss)
            self.steps += 1
            self.hits += int(((s_logits[:k].argmax(1) == self.target) & other).sum())
            self.seen += int(other.sum())
        return out

    def flush(self) -> dict:
        row = {"meta_loss": self.loss / self.steps if self.steps else float("nan"),
               "meta_target_rate": self.hits / self.seen if self.seen else float("nan")}
        self.loss, self.hits, self.seen, self.steps = 0.0, 0, 0, 0
        return row


def retune_aware(ctx) -> DefenseResult:
    """The retune-aware purifier (this project's method): PAM's data and schedule, with a first-order meta-gradient
    through a simulated retuning attack every ``meta_every`` steps."""
    exp, model, reserved, cfg, log = ctx.exp, ctx.model, ctx.reserved, ctx.cfg, ctx.log
    g = engine.seed_everything(cfg.random_seed)
    # the inversion cache is keyed on the reserved subset and the bti_ settings: PAM's entry on the same record
    inv = bti.load_or_invert(exp, model, ctx.reserved_idx, reserved, cfg, log)
    G, target = inv.generator, int(inv.target)
    hflip = bool(getattr(exp.info, "hflip", True))
    info = {**bti.target_info(target, inv.votes, exp.target),
            NAME: {"method": "this project's own (issue 24 item 8), not a published defense",
                   "p_rev": cfg.p_rev, "rounds": cfg.n_rounds, "epochs_per_round": cfg.epochs,
                   "meta_every": cfg.meta_every, "meta_weight": cfg.meta_weight, "inner_steps": cfg.inner_steps,
                   "inner_lr": cfg.inner_lr, "inner_momentum": cfg.inner_momentum,
                   "inner_batch_size": cfg.inner_batch_size, "inner_p_poison": cfg.inner_p_poison,
                   "attack_label": "detected_target"}}
    log(f"simulated retuning attack: {cfg.inner_steps} SGD steps (lr {cfg.inner_lr}, momentum {cfg.inner_momentum}) "
        f"every {cfg.meta_every} steps, inverted samples labelled {target} (detected target), "
        f"meta_weight {cfg.meta_weight}")
    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.sgd_momentum, weight_decay=cfg.wd)
    step = RetuneAwareStep(model, opt, attack_batches(reserved, exp.norm, G, target, cfg.inner_p_poison,
                                                      cfg.inner_batch_size, augment=cfg.augment, hflip=hflip,
                                                      generator=g),
                           meta_every=cfg.meta_every, meta_weight=cfg.meta_weight, inner_steps=cfg.inner_steps,
                           inner_lr=cfg.inner_lr, inner_momentum=cfg.inner_momentum, inner_wd=cfg.inner_wd)
    meter = _EpochMeter(step, lambda b: mix_count(cfg.p_rev, b, "bti"), target)
    batch_fn = purifier_batch_fn(exp.norm, G, cfg.p_rev)
    rows: list[dict] = []
    for r in range(cfg.n_rounds):
        base = r * cfg.epochs

        def tag(epoch, row, base=base, r=r):
            row["epoch"] = base + epoch
            row["round"] = r + 1
            row.update(meter.flush())

        rr = engine.fit(model, reserved, norm=exp.norm, epochs=cfg.epochs, batch_size=cfg.batch_size, step_fn=meter,
                        optimizer=opt, batch_fn=batch_fn, augment=cfg.augment, hflip=hflip, evalsets=exp.evalsets,
                        eval_every=cfg.eval_every, eval_batch_size=cfg.eval_batch_size, generator=g,
                        desc=f"{NAME} round {r + 1}/{cfg.n_rounds}", progress=exp.progress, on_epoch_end=tag)
        rows.extend(rr)
        log(f"round {r + 1}/{cfg.n_rounds} ({cfg.epochs} epochs): {engine.format_metrics(rr[-1])}  simulated attack: "
            f"loss {rr[-1]['meta_loss']:.3f}, inverted samples -> {target}: {rr[-1]['meta_target_rate']:.1%}")
    return DefenseResult(model, rows, artifacts={"bti_generator.pt": bti.generator_artifact(G, inv.mask, target)},
                         info=info)


def schema() -> dict:
    return bti.with_bti_schema(RETUNE_AWARE_SCHEMA, "RETUNE_AWARE_SCHEMA")


register("defense", NAME, schema=schema, needs=("inversion_cache",),
         description="retune-aware purifier (THIS PROJECT'S OWN method, not a published defense): PAM's data (BTI-DBF "
                     "inverted samples under true labels) with a first-order meta-gradient through a simulated "
                     "retuning attack (inverted samples under the detected target)")(retune_aware)
