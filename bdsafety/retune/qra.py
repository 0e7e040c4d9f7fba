"""Query-based reactivation attack (QRA): reactivate a purified model's backdoor with an input perturbation only.

A generator gives a sample-specific perturbation delta(x) = eps * tanh(MLP(x)) (MLP 3HW -> 1024 -> 1024 -> 1024 ->
3HW with ReLU, fed the normalised image), added in [0, 1] pixel space and clipped before normalisation. It is
trained, with every classifier frozen, to minimise

    alpha * KL( softmax f_ra(x) || softmax f_pur(x + delta(x)) ) + CE( f_clean(x + delta(x)), y_true )

on clean + triggered (non-target-class) TRAINING samples: the purified model f_pur must behave on x + delta(x) like
the RA-retuned model f_ra on x (backdoor reactivated on triggered inputs, normal on clean ones), while a clean
reference model f_clean keeps predicting the true label (so delta is not a plain adversarial example).

The triggered samples (``triggered_source``, written to config.yaml; their training indices to log/poison_index.txt):
- bd_train: the record's real poisoned training samples of NON-target classes, from the attacker's part of the
  poisoned pool (bdsafety.pools), as the official QRA does for dirty-label attacks (bd_train_dataset without the
  target-class folder).
- retrigger: the record's test-time trigger (rebuilt from info.pickle, ``Attack.record_trigger``) applied to clean
  non-target-class TRAINING images outside the poisoned pool (so never the defender's part). For clean-label records
  (SIG, LC), whose poisoned training samples are all of the target class. A departure: the official QRA takes the
  LC record's poisoned TEST images (bd_test_dataset), which this tool never trains on, and has no SIG source.
- auto (default): bd_train when the record has non-target poisoned training samples, else retrigger.

Access (``--access``, written in every output: config.yaml, qra_compare.csv):
- white_box (default, as the paper's official code): gradients are back-propagated through f_pur.
- black_box: f_pur is only QUERIED for its output probabilities (score-based). The gradient of the KL term with
  respect to the perturbed image is estimated from queries with Gaussian finite differences,
      g ~ 1/q * sum_j [KL(x_a + mu * u_j) - KL(x_a)] / mu * u_j,   u_j ~ N(0, I)   (q = zo_queries, mu = zo_mu),
  and chained into the generator; each step costs q + 1 batched queries (counted and reported).
In both, f_ra is only queried (its predictions on the unperturbed images) and f_clean is the attacker's own model.

Report (test set): f_pur C-Acc / ASR / RA and f_clean C-Acc / ASR with and without delta, and the
target-prediction rate (fraction of NON-target-class clean test images predicted as the record's target label).
Outputs in record/<rf>/defense/<name>/qra/: generator.pt, qra_df.csv (+ summary; epoch 0 = no perturbation),
qra_compare.csv, qra_examples.png, config.yaml, log/.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn as nn
import torch.nn.functional as F

from bdsafety import engine
from bdsafety.attacks.base import attack_class, record_trigger
from bdsafety.config import NONNEG, NONNEG_INT, POS_INT, POSITIVE, Option, int_list
from bdsafety.data.device import DeviceDataset, iterate_batches
from bdsafety.errors import ConfigError, DataError
from bdsafety.experiment import RECORD_SCHEMA, Output, RecordRun
from bdsafety.records import load_attack_record, resolve_record_dir
from bdsafety.registry import get, register
from bdsafety.retune.ra import poison_source_split, resolve_targets
from bdsafety.safeio import RecordError, figure_bytes, safe_torch_load

__all__ = [
    "QRA_SCHEMA", "QRA_SEED_STREAM", "fraction", "PerturbationGenerator", "perturb", "qra_loss", "qra_data",
    "qra_metrics", "train_generator", "teacher_logits", "load_generator", "run_qra", "main",
]

QRA_SEED_STREAM = 0x515241  # "QRA": its own random stream, independent of the RA and defense subsets
TRIGGERED_SOURCES = ("auto", "bd_train", "retrigger")


def fraction(v) -> float:
    """A float, also written as 'a/b' (e.g. eps: 16/255)."""
    if isinstance(v, str) and "/" in v:
        a, b = v.split("/", 1)
        return float(a) / float(b)
    return float(v)


QRA_SCHEMA = {
    **RECORD_SCHEMA,
    "defense": Option(None, "defense whose purified model is attacked (record/<rf>/defense/<name>/); 'none': "
                            "the record's own model",
                      none_is_name=True),
    "ra_name": Option("ra", "folder of that defense's RA model (retune_attack/ra.py --save_name)", kind="folder_name"),
    "clean_record": Option(None, "record (name under record_root, or path) whose attack_result.pt holds a clean "
                                 "reference model (made with --pratio 0)"),
    "clean_model": Option(None, "or: a model file (attack_result.pt / defense_result.pt format) of "
                                "a clean reference model"),
    "poison_source": Option(None, "record whose bd_train supplies the poisoned samples (default: the same record)"),
    "access": Option("white_box", "threat model: white_box = back-propagate through the purified model; black_box = "
                                  "only query its output probabilities (zeroth-order gradient estimate)",
                     choices=("white_box", "black_box")),
    "zo_queries": Option(20, "black_box: random directions (queries to the purified model beyond the base one) per "
                             "step", check=POS_INT),
    "zo_mu": Option(0.005, "black_box: finite-difference step in [0,1] pixel space", check=POSITIVE),
    "eps": Option(16 / 255, "L_inf bound of the perturbation in [0,1] pixel space (a float or 'a/b')", type=fraction,
                  check=POSITIVE),
    "alpha": Option(0.2, "weight of the KL(f_ra || f_pur) reactivation term (the CE on the clean model has weight 1)",
                    check=NONNEG),
    "hidden": Option([1024, 1024, 1024], "hidden widths of the generator MLP", type=int_list, check=POS_INT),
    "clean_num": Option(500, "clean training samples to train the generator on", check=NONNEG_INT),
    "poison_num": Option(500, "triggered non-target-class training samples to train the generator on",
                         check=NONNEG_INT),
    "triggered_source": Option("auto", "where the triggered samples come from: 'bd_train' (the record's poisoned "
                                       "training samples of non-target classes, attacker part; the official QRA's for "
                                       "dirty-label attacks), 'retrigger' (the record's trigger applied to clean "
                                       "non-target-class training images outside the poisoned pool; for clean-label "
                                       "records, where the official QRA used the LC TEST set instead), 'auto' "
                                       "(bd_train when it has non-target samples, else retrigger)",
                               choices=TRIGGERED_SOURCES),
    "epochs": Option(50, "generator training epochs", check=POS_INT),
    "batch_size": Option(128, "batch size", check=POS_INT),
    "lr": Option(0.1, "SGD learning rate of the generator", check=POSITIVE),
    "sgd_momentum": Option(0.9, "SGD momentum", check=NONNEG),
    "eval_every": Option(10, "evaluate on the test set every N epochs (and at the last)", check=POS_INT),
    "grid_n": Option(8, "examples per row in qra_examples.png", check=POS_INT),
    "save_name": Option("qra", "output folder name inside the defense folder", kind="folder_name"),
}


# ------------------------------------------------------------------------------------------------ generator

class PerturbationGenerator(nn.Module):
    """delta(x) = eps * tanh(MLP(x)): (N, C, H, W) normalised images -> (N, C, H, W) pixel-space perturbations."""

    def __init__(self, img_shape: tuple, eps: float, hidden: tuple = (1024, 1024, 1024)):
        super().__init__()
        self.img_shape = tuple(int(s) for s in img_shape)  # (C, H, W)
        self.eps = float(eps)
        self.hidden = [int(h) for h in hidden]
        d = int(np.prod(self.img_shape))
        widths = [d, *self.hidden, d]
        layers: list[nn.Module] = []
        for i in range(len(widths) - 1):
            layers.append(nn.Linear(widths[i], widths[i + 1]))
            if i < len(widths) - 2:
                layers.append(nn.ReLU())
        self.mlp = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.eps * torch.tanh(self.mlp(x.flatten(1)).float()).view(-1, *self.img_shape)

    def spec(self) -> dict:
        return {"img_shape": list(self.img_shape), "eps": self.eps, "hidden": self.hidden, "input": "normalised image"}


def perturb(gen: PerturbationGenerator, x01: torch.Tensor, norm) -> torch.Tensor:
    """x + delta(x) clipped to [0, 1] (pixel space); the generator sees the normalised image."""
    return (x01 + gen(norm(x01))).clamp(0.0, 1.0)


def qra_loss(logits_pur_adv, logits_ra, logits_clean_adv, y_true, alpha: float):
    """alpha * KL(softmax f_ra(x) || softmax f_pur(x+d)) + CE(f_clean(x+d), y_true); returns (loss, kl, ce).

    KL(p || q) = sum p (log p - log q) with p the RA model's prediction on the unperturbed image (the target
    distribution, no gradient) and q the purified model's on the perturbed image; batch mean.
    """
    log_p = F.log_softmax(logits_ra.float().detach(), 1)
    log_q = F.log_softmax(logits_pur_adv.float(), 1)
    kl = F.kl_div(log_q, log_p, log_target=True, reduction="batchmean")
    ce = F.cross_entropy(logits_clean_adv.float(), y_true)
    return alpha * kl + ce, kl, ce


def load_generator(path, device="cpu") -> PerturbationGenerator:
    """A generator saved by QRA (generator.pt)."""

    obj = safe_torch_load(path)
    gen = PerturbationGenerator(tuple(obj["img_shape"]), obj["eps"], tuple(obj["hidden"]))
    gen.load_state_dict(obj["state_dict"])
    return gen.to(device).eval()


# ------------------------------------------------------------------------------------------------ data / models

def triggered_source_note(attack: str) -> str | None:
    """Why QRA has no triggered training images for records of the registered attack ``attack`` (a clean-label
    attack whose trigger cannot be rebuilt from its record), or None when it has them (the study plan's check)."""

    cls = attack_class(attack)
    if cls is None or not cls.clean_label or cls.rebuilds_trigger():
        return None
    return (f"{attack} is a clean-label attack (its poisoned training samples are all of the target class) whose "
            f"trigger cannot be rebuilt from its record: QRA has no triggered non-target-class training images")


def _retriggered(exp, split, rec, src_dir, n: int, rng) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(training indices, triggered images, true labels) of ``n`` clean non-target-class TRAINING images outside the
    whole poisoned pool of ``rec`` (attacker and defender parts), with the record's test-time trigger applied."""

    trigger = record_trigger(rec.info)
    if trigger is None:
        raise DataError(f"QRA needs triggered non-target-class training images, but record {src_dir.name} "
                        f"({rec.info.get('trigger') or rec.attack}) neither holds any (a clean-label attack) nor says "
                        f"how to apply its trigger; pass --poison_source with a record that holds them, "
                        f"or --poison_num 0")
    target = rec.attack_target if rec.attack_target is not None else _record_target(exp)
    labels = np.asarray(exp.data.train_y)
    pool = np.asarray(rec.bd_train.indices if rec.bd_train is not None else [], dtype=np.int64)
    eligible = np.setdiff1d(np.flatnonzero(labels != int(target)), pool)
    if n > len(eligible):
        raise ConfigError(f"poison_num {n} is larger than the {len(eligible)} non-target-class training images outside "
                          f"the poisoned pool of {src_dir.name}; lower --poison_num to at most {len(eligible)}")
    idx = np.sort(rng.choice(eligible, size=n, replace=False)).astype(np.int64)
    images = trigger(np.asarray(exp.data.train_x[idx]))
    return idx, images, labels[idx]


def qra_data(exp, cfg) -> tuple[DeviceDataset, dict]:
    """clean_num clean + poison_num triggered non-target-class TRAINING samples, all labelled with their TRUE label
    (the triggered ones from ``cfg.triggered_source``, see the module docstring)."""
    split, src_dir, rec = poison_source_split(exp, cfg.poison_source, "QRA")
    eligible = np.flatnonzero(split.orig_labels != split.bd_labels)  # non-target-class (the label was flipped)
    if cfg.poison_num < 0 or cfg.clean_num < 0 or cfg.poison_num + cfg.clean_num == 0:
        raise ConfigError(f"clean_num ({cfg.clean_num}) and poison_num ({cfg.poison_num}) must be >= 0 and not both 0")
    source = getattr(cfg, "triggered_source", "auto")
    if source not in TRIGGERED_SOURCES:
        raise ConfigError(f"triggered_source must be one of {', '.join(TRIGGERED_SOURCES)}, not {source!r}")
    if source == "auto":
        source = "bd_train" if len(eligible) else "retrigger"
    if source == "bd_train" and cfg.poison_num > 0 and len(eligible) == 0:
        raise DataError(f"the {len(split)} poisoned training samples of {src_dir.name} all keep their label (a "
                        f"clean-label attack such as SIG or LC): QRA needs triggered NON-target-class training images; "
                        f"use --triggered_source retrigger (the record's trigger on clean non-target-class training "
                        f"images), pass --poison_source with a record that applies the same trigger to other classes, "
                        f"or --poison_num 0")
    n_train = len(exp.data.train_y)
    rng = np.random.default_rng([int(cfg.random_seed), QRA_SEED_STREAM])
    if source == "bd_train":
        if cfg.poison_num > len(eligible):
            raise ConfigError(f"poison_num {cfg.poison_num} is larger than the {len(eligible)} poisoned "
                              f"non-target-class training samples of {src_dir.name} (of {len(split)} poisoned in all); "
                              f"lower --poison_num to at most {len(eligible)}")
        sel = np.sort(rng.choice(eligible, size=cfg.poison_num, replace=False))
        p_idx, p_images, p_labels = split.indices[sel], split.images[sel], split.orig_labels[sel]
    else:
        p_idx, p_images, p_labels = _retriggered(exp, split, rec, src_dir, cfg.poison_num, rng)
    candidates = np.setdiff1d(np.arange(n_train), p_idx)
    if cfg.clean_num > len(candidates):
        raise ConfigError(f"clean_num {cfg.clean_num} is larger than the {len(candidates)} training samples "
                          f"available; lower --clean_num")
    clean_idx = np.sort(rng.choice(candidates, size=cfg.clean_num, replace=False))
    ds = DeviceDataset.concat([
        exp.train.subset(clean_idx),
        exp.dataset(p_images, p_labels),
    ])
    return ds, {"clean_index": clean_idx, "poison_index": np.asarray(p_idx, dtype=np.int64),
                "poison_source": str(src_dir), "triggered_source": source}


def _attack_yaml_hint(exp) -> str:
    ds = exp.record.clean_data
    attack = exp.record.info.get("trigger") or exp.record.attack or "badnet"
    yaml = "demo" if ds == "synthetic" else ds
    return (f"python attack/{attack}.py --yaml_path config/attack/{attack}/{yaml}.yaml --pratio 0 "
            f"--save_folder_name clean_{yaml}")


def load_clean_reference(exp, cfg) -> tuple[torch.nn.Module, str]:
    """The clean reference model from cfg.clean_record or cfg.clean_model (errors say how to make one)."""

    if cfg.clean_record and cfg.clean_model:
        raise ConfigError("give either clean_record or clean_model, not both")
    if not cfg.clean_record and not cfg.clean_model:
        raise ConfigError(
            "QRA needs a clean reference model (trained without poison): set clean_record to a record made with "
            f"--pratio 0, e.g. create one with `{_attack_yaml_hint(exp)}` and pass --clean_record clean_"
            f"{'demo' if exp.record.clean_data == 'synthetic' else exp.record.clean_data}, "
            f"or set clean_model to a model file")
    if cfg.clean_model:
        p = Path(cfg.clean_model)
        if not p.is_file():
            raise ConfigError(f"clean_model {p} not found; create a clean reference record with "
                              f"`{_attack_yaml_hint(exp)}` and pass --clean_record instead, or fix the path")
        return exp.model_from_file(p), str(p)
    try:
        d = resolve_record_dir(cfg.clean_record, cfg.record_root)
    except RecordError:
        root = Path(cfg.record_root)
        have = sorted(p.name for p in root.iterdir() if (p / "attack_result.pt").is_file()) if root.is_dir() else []
        raise ConfigError(f"clean_record {cfg.clean_record!r} is neither a folder nor a record under {root} (records "
                          f"there: {', '.join(have) or 'none'}); create it with `{_attack_yaml_hint(exp)}`") from None
    rec = load_attack_record(d, trust_record=cfg.trust_record)
    if rec.bd_train is not None and len(rec.bd_train) > 0:
        raise DataError(f"clean_record {d.name} holds a backdoored model ({len(rec.bd_train)} poisoned training "
                        f"samples): a clean reference is made with --pratio 0, e.g. `{_attack_yaml_hint(exp)}`")
    if rec.clean_data != exp.record.clean_data:
        raise DataError(f"clean_record {d.name} was trained on {rec.clean_data}, record {exp.record_dir.name} on "
                         f"{exp.record.clean_data}: use a clean model of the same dataset")
    return exp.model_from_file(d / "attack_result.pt"), str(d / "attack_result.pt")


@torch.no_grad()
def teacher_logits(model, ds: DeviceDataset, norm, batch_size: int = 1024) -> torch.Tensor:
    """float32 logits of ``model`` on every (unperturbed) image of ``ds``, in order."""

    out = []
    for xb, _, _ in iterate_batches(ds, batch_size):
        with engine.autocast(ds.device):
            out.append(model(norm.from_uint8(xb)).float())
    return torch.cat(out)


def _frozen(model: torch.nn.Module) -> torch.nn.Module:
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


# ------------------------------------------------------------------------------------------------ metrics

@torch.no_grad()
def qra_metrics(exp, models: dict, gen: PerturbationGenerator | None, target: int) -> dict:
    """For each named model: C-Acc, ASR, RA and target rate on the test set (with delta when ``gen`` is given).

    Keys '<prefix>acc', '<prefix>asr', '<prefix>ra', '<prefix>target_rate' where the prefix is 'test_' for the
    model named 'pur' and '<name>_test_' otherwise. target_rate = fraction of non-target-class clean test images
    predicted as ``target``.
    """
    ev = exp.evalsets
    tf = None if gen is None else (lambda x01: perturb(gen, x01, exp.norm))
    if gen is not None:
        gen.eval()
    non_target = ev.clean.y != target
    out = {}
    for name, model in models.items():
        pre = "test_" if name == "pur" else f"{name}_test_"
        pc = engine.predict(model, ev.clean, exp.norm, exp.cfg.eval_batch_size, transform=tf)
        pb = engine.predict(model, ev.bd, exp.norm, exp.cfg.eval_batch_size, transform=tf)
        out[pre + "acc"] = (pc == ev.clean.y).float().mean().item()
        out[pre + "asr"] = (pb == ev.bd.y).float().mean().item() if len(pb) else math.nan
        out[pre + "ra"] = (pb == ev.bd_orig_y).float().mean().item() if len(pb) else math.nan
        out[pre + "target_rate"] = (pc[non_target] == target).float().mean().item() if non_target.any() else math.nan
    return out


def _record_target(exp) -> int:
    if exp.target is not None:
        return int(exp.target)
    vals, counts = np.unique(exp.record.bd_test.bd_labels, return_counts=True)
    return int(vals[np.argmax(counts)])


# ------------------------------------------------------------------------------------------------ training

def train_generator(gen: PerturbationGenerator, data: DeviceDataset, f_pur, f_ra, f_clean, norm, *, epochs: int,
                    batch_size: int, lr: float, momentum: float, alpha: float, seed: int = 0, on_epoch_end=None,
                    eval_batch_size: int = 1024, desc: str = "QRA", progress: bool | None = False,
                    access: str = "white_box", zo_queries: int = 20, zo_mu: float = 0.005) -> list[dict]:
    """Train ``gen`` with engine.fit; one row per epoch. white_box: gradients through the frozen f_pur and f_clean;
    black_box: f_pur only queried (zeroth-order estimate of the KL term's gradient, see the module docstring).

    ``data`` holds uint8 images with their TRUE labels; the RA model's predictions on the unperturbed images are the
    KL targets (computed once: no augmentation here). ``on_epoch_end(epoch, row)`` may add test metrics to the row.
    """
    if access not in ("white_box", "black_box"):
        raise ConfigError(f"access must be white_box or black_box, not {access!r}")
    if access == "black_box" and (int(zo_queries) < 1 or not zo_mu > 0):
        raise ConfigError(f"black_box QRA needs zo_queries >= 1 and zo_mu > 0 (got {zo_queries}, {zo_mu})")
    for m in (f_pur, f_ra, f_clean):
        _frozen(m)
    opt = engine.make_optimizer(gen.parameters(), "sgd", lr, momentum, 0.0)
    teacher = teacher_logits(f_ra, data, norm, eval_batch_size)
    stats = {"kl": 0.0, "ce": 0.0, "agree": 0, "n": 0, "queries": 0}
    zo_rng = torch.Generator(device=data.device).manual_seed(int(seed) + 1)
    batch = {}

    def batch_fn(xb, y, idx):
        batch["idx"] = idx
        return xb.float() / 255.0, y

    def query_kl(xq, log_p):
        """Per-sample KL(f_ra(x) || f_pur(xq)) from f_pur's output probabilities only (one batched query), in fp32:
        the finite differences of the zeroth-order estimate vanish in bf16's rounding."""
        with torch.no_grad(), engine.fp32(xq.device):
            logits = f_pur(norm(xq.float().clamp(0.0, 1.0)))
        stats["queries"] += len(xq)
        return (log_p.exp() * (log_p - F.log_softmax(logits.float(), 1))).sum(1), logits

    def step(g, x01, y):
        opt.zero_grad(set_to_none=True)
        logits_ra = teacher[batch["idx"]]
        if access == "white_box":
            with engine.autocast(x01.device):
                xa = perturb(g, x01, norm)
                logits_pur = f_pur(norm(xa))
                logits_clean = f_clean(norm(xa))
            loss, kl, ce = qra_loss(logits_pur, logits_ra, logits_clean, y, alpha)
            loss.backward()
        else:
            with engine.autocast(x01.device):
                xa = perturb(g, x01, norm)
                logits_clean = f_clean(norm(xa))
            ce = F.cross_entropy(logits_clean.float(), y)
            log_p = F.log_softmax(logits_ra.float(), 1)
            xa0 = xa.detach().float()
            kl_i, logits_pur = query_kl(xa0, log_p)
            grad = torch.zeros_like(xa0)
            for _ in range(int(zo_queries)):
                u = torch.randn(xa0.shape, generator=zo_rng, device=xa0.device)
                grad += ((query_kl(xa0 + zo_mu * u, log_p)[0] - kl_i) / zo_mu).view(-1, 1, 1, 1) * u
            grad /= int(zo_queries) * len(y)  # d(batch-mean KL)/d(x_a), estimated
            kl = kl_i.mean()
            # the surrogate's gradient w.r.t. x_a is alpha * grad; its value is not the loss, so report the true one
            (ce + alpha * (grad * xa.float()).sum()).backward()
            loss = alpha * kl + ce
        opt.step()
        stats["kl"] += kl.item() * len(y)
        stats["ce"] += ce.item() * len(y)
        stats["agree"] += (logits_pur.argmax(1) == logits_ra.argmax(1)).sum().item()
        stats["n"] += len(y)
        return loss.detach(), logits_clean.detach()

    def end(epoch, row):
        n = max(1, stats["n"])
        row["train_clean_model_acc"] = row.pop("train_acc")  # fit's accuracy is of the logits step() returns
        row.update(train_kl=stats["kl"] / n, train_ce=stats["ce"] / n, train_pur_ra_agreement=stats["agree"] / n)
        if access == "black_box":
            row["queries_to_purified"] = stats["queries"]  # cumulative, images sent to f_pur
        stats.update(kl=0.0, ce=0.0, agree=0, n=0)
        if on_epoch_end is not None:
            on_epoch_end(epoch, row)
        gen.train()

    rng = torch.Generator().manual_seed(int(seed))
    return engine.fit(gen, data, norm=norm, epochs=epochs, batch_size=batch_size, step_fn=step, optimizer=opt,
                      batch_fn=batch_fn, augment=False, generator=rng, desc=desc, progress=progress, on_epoch_end=end)


# ------------------------------------------------------------------------------------------------ outputs

def example_grid(exp, gen, n: int, title: str = ""):
    """The figure of qra_examples.png: rows = poisoned test image / + delta / delta stretched to full contrast (its
    largest value and the stretch factor in the row label), then the same for clean test images."""
    import matplotlib  # lazy: matplotlib is heavy and only needed for figures

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # lazy: matplotlib is heavy and only needed for figures

    ev = exp.evalsets
    n = max(1, min(n, len(ev.clean), len(ev.bd) if ev.bd is not None and len(ev.bd) else n))
    groups = []
    if ev.bd is not None and len(ev.bd):
        groups.append(("poisoned", ev.bd.view(torch.arange(n))))
    groups.append(("clean", ev.clean.view(torch.arange(n))))
    rows = []
    gen.eval()
    with torch.no_grad():
        for name, xb in groups:
            x01 = xb.float() / 255.0
            xa = perturb(gen, x01, exp.norm)
            d = xa - x01
            scale = 0.5 / max(float(d.abs().max()), 1e-8)  # stretch the largest |delta| shown to full contrast
            amp = (d * scale + 0.5).clamp(0, 1)
            rows += [(name, x01), (f"{name} + delta", xa),
                     (f"delta x{scale:.0f}\n(max {255 * float(d.abs().max()):.1f}/255)", amp)]
    fig, axes = plt.subplots(len(rows), n, figsize=(1.3 * n, 1.4 * len(rows)), squeeze=False)
    for r, (label, imgs) in enumerate(rows):
        arr = imgs.permute(0, 2, 3, 1).cpu().numpy()
        for c in range(n):
            ax = axes[r][c]
            ax.imshow(arr[c].squeeze(), cmap="gray" if arr.shape[-1] == 1 else None, vmin=0, vmax=1)
            ax.set_xticks([])
            ax.set_yticks([])
            if c == 0:
                ax.set_ylabel(label, fontsize=7)
    if title:
        fig.suptitle(title, fontsize=8)
    fig.tight_layout()
    return fig


# ------------------------------------------------------------------------------------------------ run

def check_config(cfg):
    """QRA's resolve hook: settings that only make sense together, checked before anything loads (and when a study is
    planned)."""
    if cfg.access == "black_box" and (int(cfg.zo_queries) < 1 or not cfg.zo_mu > 0):
        raise ConfigError(f"--access black_box needs --zo_queries >= 1 and --zo_mu > 0 (got "
                          f"{cfg.zo_queries}, {cfg.zo_mu})")
    if not cfg.defense or "," in str(cfg.defense) or cfg.defense == "all":
        raise ConfigError("--defense must name ONE defense folder (or 'none'): QRA attacks one purified model per run")
    return cfg


def qra_outputs(exp, cfg) -> dict[str, Path]:
    """QRA's one output folder, <model folder>/<save_name>/, for the ONE model --defense names."""
    t = resolve_targets(exp.record_dir, cfg.defense)[0]
    return {t.name: t.out_dir(cfg.save_name)}


def run_qra(ctx: RecordRun):
    """Train the QRA generator against one defense; yields (its name, the Output)."""

    exp, cfg = ctx.exp, ctx.cfg
    target_info = resolve_targets(exp.record_dir, cfg.defense)[0]
    f_clean, clean_src = load_clean_reference(exp, cfg)
    ra_file = target_info.folder / cfg.ra_name / "ra_result.pt"
    if not ra_file.is_file():
        raise ConfigError(f"QRA needs the RA model of '{cfg.defense}', but {ra_file} does not exist; create it with "
                                f"`python retune_attack/ra.py --result_file {cfg.result_file} --defense {cfg.defense}"
                                + (f" --save_name {cfg.ra_name}" if cfg.ra_name != "ra" else "") + "`")
    f_pur = _frozen(exp.backdoored_model() if target_info.name == "none"
                    else exp.model_from_file(target_info.model_file))
    f_ra = _frozen(exp.model_from_file(ra_file))
    f_clean = _frozen(f_clean)
    target = _record_target(exp)
    lines: list[str] = []

    def log(msg: str):
        lines.append(msg)
        print(f"[qra:{target_info.name}] {msg}", flush=True)

    data, meta = qra_data(exp, cfg)
    how = ("gradients through the purified model" if cfg.access == "white_box" else
           f"purified model only queried: {cfg.zo_queries} + 1 queries per image per step, mu {cfg.zo_mu}")
    log(f"record {exp.record_dir.name}: {exp.model_name}, target {target}; access {cfg.access} ({how})")
    log(f"purified {target_info.model_file}; RA model {ra_file}; clean reference {clean_src}")
    how_trig = ("the record's poisoned training samples" if meta["triggered_source"] == "bd_train" else
                "the record's trigger applied to clean training images outside the poisoned pool")
    log(f"generator data: {cfg.clean_num} clean + {cfg.poison_num} triggered non-target-class training samples "
        f"({how_trig}: triggered_source {meta['triggered_source']}; from {meta['poison_source']}); eps {cfg.eps:.5f}, "
        f"alpha {cfg.alpha}, SGD lr {cfg.lr} momentum {cfg.sgd_momentum}, "
        f"{cfg.epochs} epochs, seed {cfg.random_seed}")

    models = {"pur": f_pur, "clean_model": f_clean, "ra_model": f_ra}
    base = qra_metrics(exp, models, None, target)
    log("without delta: purified " + _fmt(base, "test_") + " | clean model " + _fmt(base, "clean_model_test_")
        + " | RA model " + _fmt(base, "ra_model_test_"))

    engine.seed_everything(cfg.random_seed)
    c, h, w = exp.train.view_shape
    gen = PerturbationGenerator((c, h, w), cfg.eps, tuple(cfg.hidden)).to(exp.device)

    def evaluate(epoch, row):
        if epoch % max(1, cfg.eval_every) == 0 or epoch == cfg.epochs:
            m = qra_metrics(exp, {"pur": f_pur, "clean_model": f_clean}, gen, target)
            row.update(m)
            log(f"epoch {epoch}: loss {row['train_loss']:.4f} (KL {row['train_kl']:.4f}, CE {row['train_ce']:.4f}); "
                f"with delta: purified {_fmt(m, 'test_')} | clean model {_fmt(m, 'clean_model_test_')}")

    rows = train_generator(gen, data, f_pur, f_ra, f_clean, exp.norm, epochs=cfg.epochs, batch_size=cfg.batch_size,
                           lr=cfg.lr, momentum=cfg.sgd_momentum, alpha=cfg.alpha, seed=cfg.random_seed,
                           on_epoch_end=evaluate, eval_batch_size=cfg.eval_batch_size, desc=f"QRA {target_info.name}",
                           progress=exp.progress, access=cfg.access, zo_queries=cfg.zo_queries, zo_mu=cfg.zo_mu)
    after = qra_metrics(exp, {"pur": f_pur, "clean_model": f_clean}, gen, target)
    row0 = {"epoch": 0, **{k: v for k, v in base.items() if not k.startswith("ra_model_")}}
    rows = [row0] + rows

    compare = pd.DataFrame([
        _compare_row("purified", False, base, "test_"), _compare_row("purified", True, after, "test_"),
        _compare_row("clean_model", False, base, "clean_model_test_"),
        _compare_row("clean_model", True, after, "clean_model_test_"),
        _compare_row("ra_model", False, base, "ra_model_test_"),
    ])
    compare.insert(0, "access", cfg.access)
    log("comparison (test set):\n" + compare.to_string(index=False))

    state = {k: v.detach().cpu() for k, v in gen.state_dict().items()}
    grid = example_grid(exp, gen, cfg.grid_n,
                        title=f"QRA ({cfg.access}) on {target_info.name}: ASR {100 * base['test_asr']:.1f}% -> "
                              f"{100 * after['test_asr']:.1f}% (clean model "
                              f"{100 * after['clean_model_test_asr']:.1f}%), eps {cfg.eps:.4f}")
    info = dict(retune_attack="qra", access=cfg.access, target_label=target, defense=target_info.name,
                purified_model=str(target_info.model_file), ra_model=str(ra_file), clean_model=clean_src,
                poison_source=meta["poison_source"], triggered_source_used=meta["triggered_source"],
                generator=gen.spec(), without_delta=base, with_delta=after)
    yield target_info.name, Output(
        "qra", rows, artifacts={"generator.pt": {"state_dict": state, **gen.spec()}, "qra_compare.csv": compare,
                                "qra_examples.png": figure_bytes(grid, dpi=100)},
        indices={"index": meta["clean_index"], "poison_index": meta["poison_index"]}, info=info, log_lines=lines)


def _fmt(m: dict, pre: str) -> str:
    keys = (("acc", "C-Acc"), ("asr", "ASR"), ("ra", "RA"), ("target_rate", "target rate"))
    return "  ".join(f"{lab} {100 * m[pre + k]:.2f}%" for k, lab in keys if pre + k in m and not math.isnan(m[pre + k]))


def _compare_row(model: str, delta: bool, m: dict, pre: str) -> dict:
    return {"model": model, "delta": delta,
            **{f"test_{k}": m.get(pre + k) for k in ("acc", "asr", "ra", "target_rate")}}


def study_summary(folder: Path) -> dict:
    """QRA's columns of a study's results.csv (NaN when not run): the purified model's ASR without / with the learned
    perturbation, its C-Acc with it, and the clean model's ASR with it (transfer; low = backdoor-specific)."""
    out = dict(qra_asr_before=math.nan, qra_asr=math.nan, qra_acc=math.nan, qra_clean_asr=math.nan)
    f = folder / "qra_compare.csv"
    if not f.is_file():
        return out
    df = pd.read_csv(f)
    df["delta"] = df["delta"].astype(str).str.lower() == "true"

    def pick(model, delta, col):
        v = df[(df["model"] == model) & (df["delta"] == delta)][col]
        return float(v.iloc[0]) if len(v) else math.nan

    return dict(qra_asr_before=pick("purified", False, "test_asr"), qra_asr=pick("purified", True, "test_asr"),
                qra_acc=pick("purified", True, "test_acc"), qra_clean_asr=pick("clean_model", True, "test_asr"))


register("retune", "qra", schema=lambda: dict(QRA_SCHEMA),
         needs=("defense", "ra_model", "clean_reference", "poisoned_pool"),
         on=("defense",), skip=triggered_source_note, summary=study_summary, outputs=qra_outputs, resolve=check_config,
         description="query-based reactivation attack (QRA): learn a sample-specific input perturbation that "
                     "reactivates a purified model's backdoor but not a clean model's")(run_qra)


def main(argv=None) -> Path:
    """``python retune_attack/qra.py ...`` without the CLI error handling (tests, notebooks)."""

    (out,) = get("retune", "qra").main(argv)
    return out
