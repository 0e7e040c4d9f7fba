"""PAM: Path-Aware Minimization (Min et al., NeurIPS 2024), the paper's defense against superficial safety.

Two stages, both on the defender's reserved clean data D_r (one seeded subset for every stage):
  1. trigger inversion with BTI-DBF (bdsafety.defenses.bti): a generator G whose outputs G(x) carry the
     approximate backdoor feature, and the detected target class (cached in the record; the same bti_ settings
     as BTI-DBF(U), so one inversion serves both);
  2. PAM tuning: every batch, int(p_rev * B + 1) of the images x_i are replaced by G(x_i) (normalised space, as
     they come out of G) with their TRUE label (unlearning), and each step takes its gradient at a point displaced
     from theta_t TOWARD the backdoored weights theta_bd (``PathAwareStep``), then applies it at theta_t.
     ``n_rounds`` x ``epochs``.

Two registered defenses share this module (one algorithm, two defaults of ``retrain_generator``):
  * ``pam`` (retrain_generator false): the official code (btidbfu.py --use_pam). Its unlearning loop sets
    requires_grad=False on G and never resets it, so G is frozen after round 1 and the later rounds' ``reverse``
    calls change nothing (they re-learn a mask that no longer reaches G); ``pam`` skips them (same result) and
    tunes every round with the round-1 generator.
  * ``pam_reinvert`` (retrain_generator true, defense/pam_reinvert/): every round after the first re-learns the
    mask and retrains G against the CURRENT model (with CE to the detected target and the one generator Adam kept
    from round 1), as the loop's structure intends and BTI-DBF(U) does.
Both write detected_target, true_target, target_match, target_votes and the generator digest of every round
(``generator_digest_per_round``: all equal for pam) to config.yaml.

BatchNorm: PAM's only forward pass is the displaced one, so ``pam_bn`` changes the kept running statistics, not
the weights. The default 'update' is the official code (the displaced pass updates them); 'clean' refreshes them
with an extra no-grad pass at theta_t (the weights that are kept), 'freeze' never updates them.

Entry points: ``python defense/pam.py --result_file <rf> --yaml_path config/defense/pam/<dataset>.yaml`` (and
defense/pam_reinvert.py with config/defense/pam_reinvert/); ``--rho_sweep 0.3,0.5,0.7`` runs one defense per
value into defense/<pam or pam_reinvert>_rho<value>/ reusing one inversion.
"""
from __future__ import annotations

import functools
import math
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Callable, Mapping

import torch
import torch.nn as nn
import torch.nn.functional as F
import yaml

from bdsafety import engine
from bdsafety.config import FRACTION, NONNEG, POS_INT, POSITIVE, Option, float_list
from bdsafety.defenses import bti
from bdsafety.defenses.base import DefenseResult
from bdsafety.defenses.mixing import generator_replacer, mixing_batch_fn, pool_replacer, true_label_pool
from bdsafety.errors import ConfigError
from bdsafety.outputs import OutputFolder
from bdsafety.records import resolve_record_dir
from bdsafety.registry import register
from bdsafety.selection import select, write_selection

NAME = "pam"
# registered name -> retrain_generator default (the only difference between the two defenses)
VARIANTS = {"pam": False, "pam_reinvert": True}
FORMS = ("normalized", "interpolation")
BN_MODES = ("update", "freeze", "clean")
SOURCES = ("inverted", "real")

PAM_SCHEMA = {
    "rho": Option(0.5, "PAM displacement toward theta_bd: its L2 length (normalized form) or the path fraction in "
                       "[0,1] (interpolation form)", check=NONNEG),
    "pam_form": Option("normalized", "displacement: 'normalized' e = rho*d/||d|| or 'interpolation' e = rho*d, "
                                     "d = theta_bd - theta",
                       choices=FORMS),
    "pam_bn": Option("update", "BatchNorm running statistics: 'update' (the official code: the displaced pass updates "
                               "them), 'clean' (an extra no-grad forward at theta_t updates them, the displaced pass "
                               "does not: they describe the weights that are kept), 'freeze' (never updated: they stay "
                               "the backdoored model's)",
                     choices=BN_MODES),
    "p_rev": Option(0.2, "fraction of every batch replaced by backdoor-like samples with their TRUE labels",
                    check=FRACTION),
    "pam_source": Option("inverted", "backdoor-like samples: 'inverted' = G(x) from BTI-DBF; 'real' = the attack's "
                                     "real poisoned training samples (oracle ablation: a defender does not have them)",
                         choices=SOURCES),
    "n_rounds": Option(3, "PAM rounds of --epochs each (pam_reinvert: every round after the first retrains G first)",
                       check=POS_INT),
    "epochs": Option(30, "PAM tuning epochs per round", check=POS_INT),
    "lr": Option(0.01, "PAM base optimizer (SGD) learning rate", check=POSITIVE),
    "sgd_momentum": Option(0.1, "PAM base optimizer (SGD) momentum", check=NONNEG),
    "wd": Option(0.0, "PAM base optimizer (SGD) weight decay", check=NONNEG),
    "augment": Option(True, "random crop + horizontal flip of the reserved data during PAM tuning"),
    "augment_poison": Option(False, "pam_source real only, ablation: give the real poisoned samples the "
                                    "random crop / flip too"),
    "rho_sweep": Option(None, "comma-separated rho values: one run per value into "
                              "defense/<save_name or the defense>_rho<value>/, "
                              "all reusing one trigger inversion", type=float_list, check=NONNEG),
    "rho_select": Option("none", "after a rho sweep: 'val' picks one rho on the validation split (needs val_ratio > 0; "
                                 "criterion: the largest rho whose validation C-Acc is within rho_select_tol of the "
                                 "best candidate's) and writes defense/<base>_rho_selection.yaml; "
                                 "'none' selects nothing",
                         choices=("none", "val")),
    "rho_select_tol": Option(0.02, "rho_select val: tolerated validation C-Acc loss against the best "
                                   "candidate (a fraction)",
                             check=FRACTION),
}


# ---------------------------------------------------------------------------------------------- the step
def trainable_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """(name, parameter) of every parameter that requires grad: the coordinates PAM displaces (no BN buffers)."""
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def parameter_snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    """A detached copy of the trainable parameters, e.g. theta_bd before tuning starts."""
    return {n: p.detach().clone() for n, p in trainable_parameters(model)}


def _bn_modules(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]


def check_rho(rho: float, form: str) -> float:
    rho = float(rho)
    if not math.isfinite(rho) or rho < 0:
        raise ConfigError(f"PAM rho must be a finite number >= 0, got {rho}")
    if form == "interpolation" and rho > 1:
        raise ConfigError(f"with pam_form interpolation rho is a fraction of the path to theta_bd and must "
                          f"be in [0, 1], got {rho}")
    return rho


class PathAwareStep:
    """One PAM step, usable as ``engine.fit``'s ``step_fn`` on any model.

    Per call, with d = theta_bd - theta_t over the trainable parameters (BN running buffers are not parameters):
      e = rho * d / ||d||_2 (global L2 over all parameters; e = 0 when ||d|| = 0)    [form 'normalized']
      e = rho * d, rho in [0, 1]                                                      [form 'interpolation']
    the gradient of ``loss_fn(model(x), y)`` is taken at theta_t + e, theta_t is restored EXACTLY (saved and
    copied back, not subtracted), and ``optimizer`` steps with that gradient. ``bn_mode`` decides what the
    displaced forward pass does to BatchNorm running statistics (see PAM_SCHEMA['pam_bn']).

    Returns (loss, logits) of the displaced pass. ``last_distance`` / ``last_shift`` hold ||d|| and ||e||
    of the latest step (tensors, no host sync).
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, theta_bd: Mapping[str, torch.Tensor],
                 rho: float, form: str = "normalized", bn_mode: str = "clean", loss_fn: Callable = F.cross_entropy):
        if form not in FORMS:
            raise ConfigError(f"PAM form {form!r} is not one of {list(FORMS)}; use pam_form: "
                              f"normalized (default) or interpolation")
        if bn_mode not in BN_MODES:
            raise ConfigError(f"PAM BatchNorm mode {bn_mode!r} is not one of {list(BN_MODES)}; "
                              f"set pam_bn to one of them")
        rho = check_rho(rho, form)
        named = trainable_parameters(model)
        missing = [n for n, _ in named if n not in theta_bd]
        if missing:
            raise ValueError(f"theta_bd lacks {len(missing)} trainable parameters of the model (e.g. {missing[:3]}): "
                             f"pass the backdoored model's parameters, e.g. parameter_snapshot(backdoored_model)")
        bad = [n for n, p in named if tuple(theta_bd[n].shape) != tuple(p.shape)]
        if bad:
            raise ValueError(f"theta_bd has other shapes than the model for {bad[:3]}: "
                             f"it belongs to another architecture")
        self.model = model
        self.optimizer = optimizer
        self.rho = rho
        self.form = form
        self.bn_mode = bn_mode
        self.loss_fn = loss_fn
        self.names = [n for n, _ in named]
        self.params = [p for _, p in named]
        self.theta_bd = [theta_bd[n].detach().to(device=p.device, dtype=p.dtype) for n, p in named]
        self.bns = _bn_modules(model)
        self.last_distance = torch.zeros(())
        self.last_shift = torch.zeros(())

    @torch.no_grad()
    def distance(self) -> float:
        """||theta_bd - theta|| now (global L2 over the trainable parameters)."""
        d = [torch.linalg.vector_norm((bd - p).float()) for bd, p in zip(self.theta_bd, self.params)]
        return float(torch.linalg.vector_norm(torch.stack(d))) if d else 0.0

    @torch.no_grad()
    def displacement(self) -> list[torch.Tensor]:
        """e for the current parameters (one tensor per trainable parameter)."""
        d = [bd - p for bd, p in zip(self.theta_bd, self.params)]
        dist = (torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(t.float()) for t in d])) if d
                else torch.zeros(()))
        if self.form == "normalized":
            # where() instead of a Python branch: no host sync; rho/0 is never used (d is all zeros then anyway)
            scale = torch.where(dist > 0, self.rho / dist, torch.zeros_like(dist))
        else:
            scale = torch.full_like(dist, self.rho)
        for t in d:
            t.mul_(scale.to(t.dtype))
        self.last_distance = dist
        self.last_shift = scale * dist
        return d

    def _bn_state(self) -> list[tuple]:
        return [(m.running_mean.clone() if m.running_mean is not None else None,
                 m.running_var.clone() if m.running_var is not None else None,
                 m.num_batches_tracked.clone() if m.num_batches_tracked is not None else None) for m in self.bns]

    @torch.no_grad()
    def _restore_bn(self, state: list[tuple]) -> None:
        for m, (mean, var, nbt) in zip(self.bns, state):
            if mean is not None:
                m.running_mean.copy_(mean)
            if var is not None:
                m.running_var.copy_(var)
            if nbt is not None:
                m.num_batches_tracked.copy_(nbt)

    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor):
        if model is not self.model:
            raise ValueError("this PathAwareStep was built for another model; build one PathAwareStep per model")
        self.optimizer.zero_grad(set_to_none=True)
        if self.bn_mode == "clean" and self.bns and model.training:
            with torch.no_grad(), engine.autocast(x.device):
                model(x)  # running statistics from the undisplaced weights theta_t
        bn_saved = self._bn_state() if self.bn_mode in ("freeze", "clean") and self.bns else None
        saved = [p.detach().clone() for p in self.params]
        e = self.displacement()
        with torch.no_grad():
            for p, ei in zip(self.params, e):
                p.add_(ei)
        del e
        try:
            with engine.fp32(x.device):  # the displacement is small: bf16 rounding would swamp it (precision rules)
                logits = model(x.float())
                loss = self.loss_fn(logits.float(), y)
            loss.backward()
        finally:
            with torch.no_grad():
                for p, s in zip(self.params, saved):
                    p.copy_(s)  # exact restore of theta_t
            if bn_saved is not None:
                self._restore_bn(bn_saved)
        self.optimizer.step()
        return loss.detach(), logits.detach()


# ---------------------------------------------------------------------------------------------- the batches
# ---------------------------------------------------------------------------------------------- the defense
def _generator_batch_fn(exp, cfg, G):
    return mixing_batch_fn(exp.norm, cfg.p_rev, generator_replacer(G, bti.apply_generator), count="bti",
                           space="normalized")


def pam(ctx) -> DefenseResult:
    """The PAM defense (``pam`` and ``pam_reinvert``): BTI-DBF inversion, then path-aware unlearning on the reserved
    data; ``cfg.retrain_generator`` re-inverts in every round after the first."""
    exp, model, reserved, cfg, log = ctx.exp, ctx.model, ctx.reserved, ctx.cfg, ctx.log
    theta_bd = parameter_snapshot(model)
    g = engine.seed_everything(cfg.random_seed)
    indices: dict = {}
    extra: dict = {"pam": {"form": cfg.pam_form, "rho": cfg.rho, "bn_mode": cfg.pam_bn, "source": cfg.pam_source,
                           "p_rev": cfg.p_rev, "rounds": cfg.n_rounds, "epochs_per_round": cfg.epochs,
                           "retrain_generator": bool(cfg.retrain_generator)}}
    artifacts: dict = {}
    inv = None
    G = None
    opt_g = None
    digests: list[str] = []
    if cfg.pam_source == "inverted":
        idx = ctx.reserved_idx  # the inversion cache is keyed on the reserved subset
        # --bti_refresh recomputes the inversion (a rho sweep only for its first value); --overwrite does not: the cache
        # key holds everything the inversion depends on, and PAM, pam_reinvert and BTI-DBF(U) share the entry
        refresh = bool(cfg.bti_refresh)
        inv = bti.load_or_invert(exp, model, idx, reserved, cfg, log, refresh=refresh)
        G, mask = inv.generator, inv.mask
        extra.update(bti.target_info(inv.target, inv.votes, exp.target))
        if cfg.retrain_generator:
            opt_g = bti.round_optimizer(G, cfg, inv.optimizer_state)  # the official opt_bd, continued from round 1
        batch_fn = _generator_batch_fn(exp, cfg, G)
    else:
        pool, bd = true_label_pool(exp, "PAM (pam_source real)")
        replace = pool_replacer(pool, g, augment=cfg.augment_poison, hflip=exp.info.hflip, what="PAM (pam_source real)")
        indices["defender_poison_index"] = bd.indices
        log(f"pam_source real: mixing in {len(pool)} real poisoned training samples (the defender's part of the pool) "
            f"with their true labels (oracle)")
        batch_fn = mixing_batch_fn(exp.norm, cfg.p_rev, replace, count="bti")

    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.sgd_momentum, weight_decay=cfg.wd)
    step = PathAwareStep(model, opt, theta_bd, cfg.rho, form=cfg.pam_form, bn_mode=cfg.pam_bn)
    rows: list[dict] = []
    for r in range(cfg.n_rounds):
        if r > 0 and inv is not None:
            if cfg.retrain_generator:
                t0 = time.time()
                mask, G = bti.reinvert(exp, model, G, reserved, cfg, log, int(inv.target), optimizer=opt_g)
                batch_fn = _generator_batch_fn(exp, cfg, G)
                log(f"round {r + 1}: benign mask re-learned and generator retrained against the current model "
                    f"({time.time() - t0:.0f}s)")
            else:
                log(f"round {r + 1}: generator kept as after round 1 (the official code froze G there; its mask "
                    f"re-learning in this round could not reach G and is skipped)")
        if G is not None:
            digests.append(bti.generator_digest(G))
        base = r * cfg.epochs

        def tag(epoch, row, base=base, r=r):
            row["epoch"] = base + epoch
            row["round"] = r + 1
            row["path_distance"] = step.distance()  # after the epoch's last step

        rr = engine.fit(model, reserved, norm=exp.norm, epochs=cfg.epochs, batch_size=cfg.batch_size, step_fn=step,
                        optimizer=opt, batch_fn=batch_fn, augment=cfg.augment, hflip=exp.info.hflip,
                        evalsets=exp.evalsets, eval_every=cfg.eval_every, eval_batch_size=cfg.eval_batch_size,
                        generator=g, desc=f"pam round {r + 1}/{cfg.n_rounds}", progress=exp.progress, on_epoch_end=tag)
        rows.extend(rr)
        log(f"round {r + 1}/{cfg.n_rounds} ({cfg.epochs} epochs): {engine.format_metrics(rr[-1])}  "
            f"||theta - theta_bd|| = {step.distance():.4f}")
    if G is not None:
        extra["generator_digest_per_round"] = digests
        artifacts["bti_generator.pt"] = bti.generator_artifact(G, mask, inv.target)
    return DefenseResult(model, rows, artifacts=artifacts, info=extra, indices=indices)


def schema(variant: str = NAME) -> dict:
    """Config keys of ``pam`` or ``pam_reinvert``: the same keys; the variant sets retrain_generator's default."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown PAM variant {variant!r}; valid: {', '.join(VARIANTS)}")
    retrain = Option(VARIANTS[variant], "in rounds after the first, re-learn the benign mask and retrain G against the "
                                        "current model (with CE to the detected target and the one generator Adam of "
                                        "round 1): pam_reinvert's default; false = the official code (pam's default), "
                                        "whose G stays frozen after round 1")
    return bti.with_bti_schema({**PAM_SCHEMA, "retrain_generator": retrain}, "PAM_SCHEMA")


def sweep_configs(cfg: SimpleNamespace, name: str = NAME) -> list[SimpleNamespace]:
    """One config per value of cfg.rho_sweep (each into defense/<save_name or name>_rho<value>/), or [cfg].

    Every value reuses one cached inversion; --bti_refresh recomputes it for the first value only. All destinations
    are checked before any training."""
    if cfg.rho_select == "val":
        if not cfg.rho_sweep or len(cfg.rho_sweep) < 2:
            raise ConfigError("rho_select val picks one of several rho values: "
                              "give them with --rho_sweep (at least two)")
        if not cfg.val_ratio:
            raise ConfigError("rho_select val selects on a validation split of the reserved data: "
                              "set --val_ratio (e.g. 0.2)")
    if not cfg.rho_sweep:
        return [cfg]

    base = cfg.save_name or name
    for rho in cfg.rho_sweep:  # fail before any training
        check_rho(rho, cfg.pam_form)
        if cfg.result_file:
            OutputFolder(resolve_record_dir(cfg.result_file, cfg.record_root) / "defense" / f"{base}_rho{rho:g}",
                         overwrite=cfg.overwrite, dependents=cfg.dependents, what="defense output")
    out = []
    for i, rho in enumerate(cfg.rho_sweep):  # --bti_refresh recomputes the shared inversion once, in the first run
        out.append(cfg.replace(_sources=dict(cfg._sources, rho="rho_sweep", save_name="rho_sweep"), rho=float(rho),
                               save_name=f"{base}_rho{rho:g}", bti_refresh=bool(cfg.bti_refresh) and i == 0))
    return out


def select_rho(cfg: SimpleNamespace, runs: list, name: str = NAME) -> Path | None:
    """After a rho sweep with rho_select val: choose one rho from the runs' VALIDATION C-Acc (bdsafety.selection)
    and write defense/<base>_rho_selection.yaml."""
    if cfg.rho_select != "val":
        return None

    cands = []
    for run_cfg, out in runs:  # rho from the run's own config; its validation accuracy from what the run wrote
        meta = yaml.safe_load((Path(out) / "config.yaml").read_text())
        cands.append({"rho": float(run_cfg.rho), "val_acc": meta.get("val_acc"), "output": Path(out).name})
    chosen, criterion = select(cands, key="rho", criterion="largest_within_tol", tol=cfg.rho_select_tol)
    path = Path(runs[0][1]).parent / f"{cfg.save_name or name}_rho_selection.yaml"
    write_selection(path, what="PAM rho", key="rho", chosen=chosen, criterion=criterion, candidates=cands)
    print(f"[pam] rho selected on validation data: {chosen['rho']:g} ({criterion}) -> {path}", flush=True)
    return path


DESCRIPTIONS = {
    "pam": "PAM (Path-Aware Minimization) defense, the official code: BTI-DBF trigger inversion (G frozen after "
           "round 1), then path-aware unlearning toward safety along the backdoor-connected path",
    "pam_reinvert": "PAM with re-inversion: as pam, but every round after the first re-learns the benign mask and "
                    "retrains the generator G against the current model",
}


def _needs_for(cfg) -> tuple:
    """PAM shares the BTI-DBF inversion only when it uses it (pam_source inverted, not the real-sample oracle)."""
    return ("inversion_cache",) if cfg.pam_source == "inverted" else ()


def _register_variants() -> None:
    for variant in VARIANTS:
        register("defense", variant, schema=functools.partial(schema, variant), needs=("inversion_cache",),
                 needs_for=_needs_for, expand=functools.partial(sweep_configs, name=variant),
                 select=functools.partial(select_rho, name=variant), description=DESCRIPTIONS[variant])(pam)


_register_variants()
