"""BTI-DBF trigger inversion (Xu et al., "Towards Reliable and Efficient Backdoor Trigger Inversion via
Decoupling Benign Features", ICLR 2024), shared by PAM and the BTI-DBF(U) baseline.

A small UNet ``G`` maps a clean image to a "poisoned-looking" one of the same size. All stages run on the
defender's reserved clean data D_r with the classifier FROZEN (eval mode, no gradient to its parameters):

1. ``pretrain_generator``: G ~ identity that preserves the classifier's behaviour,
   loss = KL(f(x) || f(G(x))) + MSE(phi(x), phi(G(x))) + w * MSE(x, G(x)), w = 100 while MSE(x, G(x)) > 0.1
   else 0.01. (The official code feeds softmax outputs into CrossEntropyLoss, i.e. applies softmax twice;
   here the prediction term is a proper KL divergence between the two predictive distributions.)
2. ``learn_benign_mask``: a feature mask m = tanh(a)/2 + 0.5 with the shape of phi(x) for one sample,
   minimising CE(h(m * phi(x)), y) - CE(h((1 - m) * phi(x)), y) over ``a`` only.
3. ``train_generator``: with L_ben = MSE(m*phi(x), m*phi(G(x))), L_bd = MSE((1-m)*phi(x), (1-m)*phi(G(x)))
   and L_norm = MSE(x, G(x)): minimise L_norm when L_norm > bti_norm_bound or L_ben > bti_feat_bound, else
   -L_bd + 0.01 * L_ben; given a target t (later rounds of PAM / BTI-DBF(U)) add CE(f(G(x)), t). Every call
   really trains G (the official PAM code set requires_grad=False on G after round 0, so its later inversion
   rounds changed nothing).
4. ``detect_target``: the majority class of f(G(x)) over D_r.

Conventions: G takes and returns images in pixel space [0, 1] (N, C, H, W); the classifier sees
``exp.norm(G(x))``. Image distances (L_norm, the pretraining switch at 0.1 and the norm bound 0.3) are measured
in the model's NORMALISED input space, as in the official code, whose generator worked on normalised tensors;
so the bounds keep their meaning across datasets.

``load_or_invert`` caches the result in the record (record/<rf>/bti_inversion/<key>.pt), keyed on the bti_
settings, the reserved indices, the seed and a digest of the model's weights, so PAM's rho sweep and the
BTI-DBF(U) baseline reuse one inversion. The cache holds only tensors and plain values (the generator as a
state_dict) and is read with safe loading.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from bdsafety.errors import ConfigError
from bdsafety.config import NONNEG, POSITIVE, POS_INT, Option
from bdsafety.data.device import DeviceDataset, iterate_batches
from bdsafety.engine import autocast

CACHE_DIR = "bti_inversion"
CACHE_FORMAT = 1

BTI_SCHEMA: dict[str, Option] = {
    "bti_pretrain_epochs": Option(50, "BTI-DBF: generator pretraining epochs on D_r (G ~ identity)", check=POS_INT),
    "bti_mask_epochs": Option(20, "BTI-DBF: benign-feature mask epochs", check=POS_INT),
    "bti_gen_epochs": Option(30, "BTI-DBF: generator (trigger inversion) epochs per call", check=POS_INT),
    "bti_lr": Option(1e-3, "BTI-DBF: Adam learning rate of the generator (pretraining and inversion)", check=POSITIVE),
    "bti_mask_lr": Option(0.01, "BTI-DBF: Adam learning rate of the feature mask", check=POSITIVE),
    "bti_batch_size": Option(128, "BTI-DBF: batch size of every inversion stage", check=POS_INT),
    "bti_norm_bound": Option(0.3, "BTI-DBF: minimise MSE(x, G(x)) (normalised space) while it exceeds this bound", check=NONNEG),
    "bti_feat_bound": Option(3.0, "BTI-DBF: ... or while the benign-feature distance L_ben exceeds this bound", check=NONNEG),
    "bti_ben_weight": Option(0.01, "BTI-DBF: weight of L_ben in -L_bd + w * L_ben", check=NONNEG),
    "bti_target_weight": Option(1.0, "BTI-DBF: weight of CE(f(G(x)), detected target) in rounds after the first", check=NONNEG),
    "bti_pretrain_switch": Option(0.1, "BTI-DBF pretraining: MSE(x, G(x)) above which its weight is bti_pretrain_w_high", check=NONNEG),
    "bti_pretrain_w_high": Option(100.0, "BTI-DBF pretraining: weight of MSE(x, G(x)) above the switch", check=NONNEG),
    "bti_pretrain_w_low": Option(0.01, "BTI-DBF pretraining: weight of MSE(x, G(x)) below the switch", check=NONNEG),
    "bti_unet_base": Option(32, "BTI-DBF UNet: channels of the first block, doubled per block (official 32)", check=POS_INT),
    "bti_unet_depth": Option(4, "BTI-DBF UNet: encoder/decoder blocks (official 4); images need H, W >= 2**depth", check=POS_INT),
    "bti_unet_residual": Option(True, "BTI-DBF UNet: predict a residual in logit space, G(x) = sigmoid(logit(x) + r(x)), "
                                      "with r initialised to 0 (G starts as the identity); false: G(x) = sigmoid(UNet(x))"),
    "bti_detect_noise": Option(0.03, "BTI-DBF target detection: std of Gaussian noise (normalised space) added to x before G, "
                                     "as the official code", check=NONNEG),
    "bti_augment": Option(True, "BTI-DBF: random crop (+ the dataset's flip) of D_r batches, like the official train loader"),
    "bti_refresh": Option(False, "BTI-DBF: recompute the trigger inversion even when a cached one matches"),
}

# settings that do not change the inversion result, so they stay out of the cache key
_NOT_IN_KEY = ("bti_refresh",)


@dataclass
class InversionResult:
    generator: "UNetGenerator"
    mask: torch.Tensor  # (C, H, W) feature mask in [0, 1]
    target: int  # detected target class
    votes: np.ndarray  # (num_classes,) counts of f(G(x)) over D_r


# ------------------------------------------------------------------------------------------- the generator
def _norm(c: int) -> nn.GroupNorm:
    return nn.GroupNorm(math.gcd(8, c), c)


class _DoubleConv(nn.Sequential):
    def __init__(self, cin: int, cout: int):
        super().__init__(
            nn.Conv2d(cin, cout, 3, padding=1), _norm(cout), nn.LeakyReLU(0.2),
            nn.Conv2d(cout, cout, 3, padding=1), _norm(cout), nn.LeakyReLU(0.2),
        )


class UNetGenerator(nn.Module):
    """A small UNet: image in [0, 1] (N, C, H, W) -> image in [0, 1] of the same size.

    ``depth`` encoder blocks (3x3 conv - GroupNorm - LeakyReLU, twice; widths base * 2**i, capped at 512) with
    2x2 max-pooling, a bottleneck block, and ``depth`` decoder blocks (2x2 transposed conv, concatenation with
    the encoder output, double conv). GroupNorm keeps G the same function in train and eval mode (no running
    statistics). With ``residual`` the output is sigmoid(logit(x) + r(x)) and the last conv starts at zero, so
    G starts as the identity (up to clamping x to [1e-3, 1 - 1e-3]).
    """

    EPS = 1e-3

    def __init__(self, channels: int = 3, base: int = 32, depth: int = 4, residual: bool = True):
        super().__init__()
        if depth < 1 or base < 1:
            raise ValueError(f"UNetGenerator needs depth >= 1 and base >= 1, got depth={depth}, base={base}")
        self.config = {"channels": int(channels), "base": int(base), "depth": int(depth), "residual": bool(residual)}
        widths = [min(base * 2**i, 512) for i in range(depth)]
        self.down = nn.ModuleList()
        cin = channels
        for w in widths:
            self.down.append(_DoubleConv(cin, w))
            cin = w
        self.bottleneck = _DoubleConv(widths[-1], min(widths[-1] * 2, 1024))
        cin = min(widths[-1] * 2, 1024)
        self.upsample = nn.ModuleList()
        self.up = nn.ModuleList()
        for w in reversed(widths):
            self.upsample.append(nn.ConvTranspose2d(cin, w, 2, stride=2))
            self.up.append(_DoubleConv(2 * w, w))
            cin = w
        self.out = nn.Conv2d(widths[0], channels, 1)
        self.residual = bool(residual)
        if self.residual:
            nn.init.zeros_(self.out.weight)
            nn.init.zeros_(self.out.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        depth = self.config["depth"]
        if x.dim() != 4 or x.shape[1] != self.config["channels"]:
            raise ValueError(f"UNetGenerator expects (N, {self.config['channels']}, H, W) images, got shape {tuple(x.shape)}")
        if min(x.shape[-2:]) < 2**depth:
            raise ConfigError(f"images of {tuple(x.shape[-2:])} px are too small for a UNet of depth {depth}: "
                             f"lower bti_unet_depth to at most {int(math.log2(min(x.shape[-2:])))}")
        h = x
        skips = []
        for block in self.down:
            h = block(h)
            skips.append(h)
            h = F.max_pool2d(h, 2)
        h = self.bottleneck(h)
        for upsample, block, skip in zip(self.upsample, self.up, reversed(skips)):
            h = upsample(h)
            if h.shape[-2:] != skip.shape[-2:]:  # odd sizes: pooling floored, so match the skip's size
                h = F.interpolate(h, size=skip.shape[-2:], mode="nearest")
            h = block(torch.cat([h, skip], 1))
        r = self.out(h)
        if self.residual:
            xc = x.clamp(self.EPS, 1 - self.EPS)
            return torch.sigmoid(torch.log(xc) - torch.log1p(-xc) + r)
        return torch.sigmoid(r)


def new_generator(exp, cfg) -> UNetGenerator:
    c = int(exp.record.img_size[2])
    return UNetGenerator(c, cfg.bti_unet_base, cfg.bti_unet_depth, cfg.bti_unet_residual).to(exp.device)


# ------------------------------------------------------------------------------------------- helpers
@contextlib.contextmanager
def frozen(model: nn.Module):
    """Eval mode and no gradient to the parameters inside the block; both restored afterwards."""
    was_training = model.training
    flags = [p.requires_grad for p in model.parameters()]
    model.eval()
    model.requires_grad_(False)
    try:
        yield model
    finally:
        model.train(was_training)
        for p, f in zip(model.parameters(), flags):
            p.requires_grad_(f)


def _generator(cfg, offset: int) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed(int(cfg.random_seed) * 1000 + offset)
    return g


def _batches(exp, reserved: DeviceDataset, cfg, gen: torch.Generator):
    hflip = bool(getattr(exp.info, "hflip", True))
    for xb, y, _ in iterate_batches(reserved, cfg.bti_batch_size, shuffle=True, augment=cfg.bti_augment, hflip=hflip,
                                    generator=gen):
        yield xb.float().div_(255.0), y


def _check_reserved(reserved: DeviceDataset, what: str):
    if len(reserved) == 0:
        raise ConfigError(f"{what} needs the defender's reserved clean data, but it is empty; raise --ratio")


class _Means:
    """Running means of named losses over an epoch, for the log."""

    def __init__(self):
        self.sums: dict[str, float] = {}
        self.n = 0

    def add(self, **vals):
        for k, v in vals.items():
            self.sums[k] = self.sums.get(k, 0.0) + float(v)
        self.n += 1

    def text(self) -> str:
        return " ".join(f"{k} {v / max(1, self.n):.4f}" for k, v in self.sums.items())


def _log_epoch(log, stage: str, epoch: int, epochs: int, means: _Means):
    if epoch == 1 or epoch == epochs or epoch % 10 == 0:
        log(f"bti {stage} epoch {epoch}/{epochs}: {means.text()}")


# ------------------------------------------------------------------------------------------- the stages
def pretrain_generator(exp, model: nn.Module, reserved: DeviceDataset, cfg, log: Callable) -> UNetGenerator:
    """A fresh G trained to be ~ the identity while preserving the classifier's predictions and features."""
    _check_reserved(reserved, "BTI-DBF pretraining")
    torch.manual_seed(int(cfg.random_seed))
    G = new_generator(exp, cfg)
    opt = torch.optim.Adam(G.parameters(), lr=cfg.bti_lr)
    gen = _generator(cfg, 1)
    norm = exp.norm
    with frozen(model):
        G.train()
        for epoch in range(1, cfg.bti_pretrain_epochs + 1):
            m = _Means()
            for x01, _ in _batches(exp, reserved, cfg, gen):
                xn = norm(x01)
                with torch.no_grad(), autocast(exp.device):
                    feat_x = model.features(xn)
                    logit_x = model.head(feat_x)
                with autocast(exp.device):
                    gn = norm(G(x01))
                    feat_g = model.features(gn)
                    logit_g = model.head(feat_g)
                l_pred = F.kl_div(F.log_softmax(logit_g.float(), 1), F.log_softmax(logit_x.float(), 1), log_target=True,
                                  reduction="batchmean")
                l_feat = F.mse_loss(feat_g.float(), feat_x.float())
                l_norm = F.mse_loss(gn.float(), xn)
                w = cfg.bti_pretrain_w_high if l_norm.item() > cfg.bti_pretrain_switch else cfg.bti_pretrain_w_low
                loss = l_pred + l_feat + w * l_norm
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                m.add(loss=loss.item(), kl=l_pred.item(), feat=l_feat.item(), norm=l_norm.item())
            _check_finite(m, "pretraining")
            _log_epoch(log, "pretrain", epoch, cfg.bti_pretrain_epochs, m)
    G.eval()
    G.requires_grad_(False)
    return G


def learn_benign_mask(exp, model: nn.Module, reserved: DeviceDataset, cfg, log: Callable) -> torch.Tensor:
    """The benign-feature mask m (shape of features(x)[0], values in [0, 1])."""
    _check_reserved(reserved, "BTI-DBF mask learning")
    norm = exp.norm
    gen = _generator(cfg, 3)
    with frozen(model):
        with torch.no_grad():
            shape = model.features(norm(reserved.view([0]).float().div(255.0))).shape[1:]
        init = torch.randn(tuple(shape), generator=_generator(cfg, 2)).to(exp.device)
        a = nn.Parameter(init)
        opt = torch.optim.Adam([a], lr=cfg.bti_mask_lr)
        for epoch in range(1, cfg.bti_mask_epochs + 1):
            m = _Means()
            for x01, y in _batches(exp, reserved, cfg, gen):
                with torch.no_grad(), autocast(exp.device):
                    feat = model.features(norm(x01))
                feat = feat.float()
                mask = torch.tanh(a) / 2 + 0.5
                with autocast(exp.device):
                    pos = model.head(mask * feat)
                    neg = model.head((1 - mask) * feat)
                l_pos = F.cross_entropy(pos.float(), y)
                l_neg = F.cross_entropy(neg.float(), y)
                loss = l_pos - l_neg
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                m.add(loss=loss.item(), ce_benign=l_pos.item(), ce_rest=l_neg.item(), mask_mean=mask.mean().item())
            _check_finite(m, "mask learning")
            _log_epoch(log, "mask", epoch, cfg.bti_mask_epochs, m)
    return (torch.tanh(a) / 2 + 0.5).detach()


def train_generator(exp, model: nn.Module, G: UNetGenerator, mask: torch.Tensor, reserved: DeviceDataset, cfg, log: Callable,
                    target: int | None = None) -> UNetGenerator:
    """Train G (in place, and returned) to keep the benign features and move the rest (the backdoor features).

    Always trains: G's parameters are re-enabled for gradients first (the official PAM code had switched them
    off during unlearning, which silently froze G from round 1 on). ``target`` adds CE(f(G(x)), target).
    """
    _check_reserved(reserved, "BTI-DBF generator training")
    norm = exp.norm
    mask = mask.to(exp.device)
    G.requires_grad_(True)
    G.train()
    opt = torch.optim.Adam(G.parameters(), lr=cfg.bti_lr)
    gen = _generator(cfg, 4 if target is None else 5)
    with frozen(model):
        for epoch in range(1, cfg.bti_gen_epochs + 1):
            m = _Means()
            for x01, y in _batches(exp, reserved, cfg, gen):
                xn = norm(x01)
                with torch.no_grad(), autocast(exp.device):
                    feat_x = model.features(xn)
                feat_x = feat_x.float()
                with autocast(exp.device):
                    gn = norm(G(x01))
                    feat_g = model.features(gn)
                feat_g = feat_g.float()
                l_ben = F.mse_loss(mask * feat_g, mask * feat_x)
                l_bd = F.mse_loss((1 - mask) * feat_g, (1 - mask) * feat_x)
                l_norm = F.mse_loss(gn.float(), xn)
                bounded = l_norm.item() > cfg.bti_norm_bound or l_ben.item() > cfg.bti_feat_bound
                loss = l_norm if bounded else -l_bd + cfg.bti_ben_weight * l_ben
                vals = dict(l_bd=l_bd.item(), l_ben=l_ben.item(), l_norm=l_norm.item(), bounded=float(bounded))
                if target is not None:
                    with autocast(exp.device):
                        logits = model.head(feat_g)
                    l_t = F.cross_entropy(logits.float(), torch.full_like(y, int(target)))
                    loss = loss + cfg.bti_target_weight * l_t
                    vals["ce_target"] = l_t.item()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                m.add(loss=loss.item(), **vals)
            _check_finite(m, "generator training")
            _log_epoch(log, "generator" + ("" if target is None else f" (target {target})"), epoch, cfg.bti_gen_epochs, m)
    G.eval()
    G.requires_grad_(False)
    return G


def reinvert(exp, model: nn.Module, G: UNetGenerator, reserved: DeviceDataset, cfg, log: Callable, target: int):
    """The one re-inversion of a round after the first (BTI-DBF(U) and PAM): re-learn the benign-feature mask
    against the CURRENT model, then retrain G with it (and the CE to the detected ``target``). Returns (mask, G)."""
    mask = learn_benign_mask(exp, model, reserved, cfg, log)
    G = train_generator(exp, model, G, mask, reserved, cfg, log, target=target)
    return mask, G


def detect_target(exp, model: nn.Module, G: UNetGenerator, reserved: DeviceDataset, noise_std: float = 0.0,
                  batch_size: int = 1024, seed: int = 0) -> tuple[int, np.ndarray]:
    """(majority class of f(G(x)) over ``reserved``, votes per class). ``noise_std``: Gaussian noise in the model's
    normalised space added to x before G (the official code uses 0.03)."""
    _check_reserved(reserved, "BTI-DBF target detection")
    norm = exp.norm
    gen = torch.Generator()
    gen.manual_seed(int(seed))
    votes = torch.zeros(exp.num_classes, dtype=torch.long)
    was_g = G.training
    G.eval()
    with frozen(model):
        for xb, _, _ in iterate_batches(reserved, batch_size):
            x01 = xb.float().div_(255.0)
            if noise_std > 0:
                noise = torch.randn(x01.shape, generator=gen).to(x01.device)
                x01 = (x01 + noise_std * noise * norm.std).clamp(0, 1)
            with autocast(exp.device):
                pred = model(norm(G(x01))).argmax(1)
            votes += torch.bincount(pred.cpu(), minlength=exp.num_classes)
    G.train(was_g)
    v = votes.numpy()
    return int(v.argmax()), v


def invert_trigger(exp, model: nn.Module, reserved: DeviceDataset, cfg, log: Callable) -> InversionResult:
    """The three BTI-DBF stages plus target detection, on the frozen ``model``."""
    t0 = time.time()
    G = pretrain_generator(exp, model, reserved, cfg, log)
    t1 = time.time()
    mask = learn_benign_mask(exp, model, reserved, cfg, log)
    t2 = time.time()
    G = train_generator(exp, model, G, mask, reserved, cfg, log)
    t3 = time.time()
    target, votes = detect_target(exp, model, G, reserved, noise_std=cfg.bti_detect_noise, seed=cfg.random_seed)
    log(f"bti inversion: pretrain {t1 - t0:.0f}s, mask {t2 - t1:.0f}s, generator {t3 - t2:.0f}s; "
        f"mean benign-mask value {mask.mean().item():.3f}")
    log(target_report(target, votes, exp.target))
    return InversionResult(G, mask, target, votes)


def target_report(target: int, votes, true_target) -> str:
    v = np.asarray(votes)
    share = v[target] / max(1, v.sum())
    if true_target is None:
        verdict = "true target unknown (no attack_target in info.pickle)"
    else:
        verdict = f"true target {int(true_target)}: {'MATCH' if int(true_target) == int(target) else 'MISMATCH'}"
    return f"bti detected target {target} ({share:.1%} of f(G(x)) votes; votes {v.tolist()}); {verdict}"


def _check_finite(m: _Means, stage: str):
    if not all(math.isfinite(v) for v in m.sums.values()):
        from bdsafety.engine import TrainingDiverged

        raise TrainingDiverged(f"BTI-DBF {stage}: a loss became non-finite ({m.text()}); lower bti_lr / bti_mask_lr")


# ------------------------------------------------------------------------------------------- caching
def model_digest(model: nn.Module) -> str:
    """sha256 over the model's state_dict (names, dtypes, shapes and bytes), parameters and buffers."""
    h = hashlib.sha256()
    for k, v in model.state_dict().items():
        t = v.detach().cpu().contiguous()
        h.update(f"{k}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.numpy().tobytes() if t.dtype != torch.bfloat16 else t.float().numpy().tobytes())
    return h.hexdigest()


def bti_settings(cfg) -> dict:
    return {k: getattr(cfg, k) for k in BTI_SCHEMA if k not in _NOT_IN_KEY}


def cache_key(cfg, reserved_idx, model: nn.Module, reserved: DeviceDataset | None = None) -> str:
    """Hash of (bti_ settings, reserved indices, seed, model weights). Without indices, the reserved data's bytes."""
    if reserved_idx is not None:
        data_id = hashlib.sha256(np.asarray(reserved_idx, dtype=np.int64).tobytes()).hexdigest()
    elif reserved is not None:
        h = hashlib.sha256(reserved.x.cpu().numpy().tobytes())
        h.update(reserved.y.cpu().numpy().tobytes())
        if reserved.geometry is not None:
            h.update(repr(reserved.geometry).encode())
        data_id = "data:" + h.hexdigest()
    else:
        raise ValueError("cache_key needs the reserved indices or the reserved data")
    payload = {"format": CACHE_FORMAT, "settings": bti_settings(cfg), "reserved": data_id, "seed": int(cfg.random_seed),
               "model": model_digest(model)}
    if getattr(cfg, "input_resize", None) is not None or getattr(cfg, "input_crop", None) is not None:
        payload["input"] = [cfg.input_resize, cfg.input_crop]  # a run's own input geometry (the record's is in its weights)
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:20]


def cache_path(exp, key: str) -> Path:
    return Path(exp.record_dir) / CACHE_DIR / f"{key}.pt"


def save_inversion(path, inv: InversionResult, key: str, cfg, true_target) -> Path:
    from bdsafety.records import atomic_torch_save

    obj = {
        "format": CACHE_FORMAT,
        "key": key,
        "generator": {k: v.detach().cpu() for k, v in inv.generator.state_dict().items()},
        "generator_config": dict(inv.generator.config),
        "mask": inv.mask.detach().cpu(),
        "target": int(inv.target),
        "votes": torch.as_tensor(np.asarray(inv.votes), dtype=torch.long),
        "true_target": None if true_target is None else int(true_target),
        "settings": {k: (v if isinstance(v, (int, float, bool, str)) or v is None else str(v))
                     for k, v in bti_settings(cfg).items()},
        "seed": int(cfg.random_seed),
    }
    return atomic_torch_save(obj, path)


def load_inversion(path, device) -> InversionResult:
    from bdsafety.records import RecordError, safe_torch_load

    obj = safe_torch_load(path)
    need = ("format", "generator", "generator_config", "mask", "target", "votes")
    if not isinstance(obj, dict) or any(k not in obj for k in need) or obj["format"] != CACHE_FORMAT:
        raise RecordError(f"{path} is not a BTI-DBF inversion cache of format {CACHE_FORMAT}; delete it or pass --bti_refresh")
    G = UNetGenerator(**obj["generator_config"])
    G.load_state_dict(obj["generator"], strict=True)
    G = G.to(device).eval()
    G.requires_grad_(False)
    return InversionResult(G, obj["mask"].to(device), int(obj["target"]), obj["votes"].numpy().astype(np.int64))


@contextlib.contextmanager
def _cache_lock(path: Path, log: Callable):
    """Hold an exclusive lock on this cache entry (a hidden ``.<key>.lock`` beside it): runs on the same record that
    need the same inversion at the same time (PAM and BTI-DBF(U) as concurrent study jobs, on Ray or not) compute it
    once; the later one waits, then loads it. Without fcntl (Windows) there is no lock: both compute it."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(f".{path.stem}.lock"), "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log(f"another run is computing this trigger inversion ({path.name}); waiting to reuse it")
            fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def load_or_invert(exp, model: nn.Module, reserved_idx, reserved: DeviceDataset, cfg, log: Callable,
                   refresh: bool = False) -> InversionResult:
    """The cached inversion for these settings / data / seed / model if present (and not ``refresh``), else
    ``invert_trigger`` and store it atomically under record/<rf>/bti_inversion/<key>.pt. Concurrent runs needing the
    same entry compute it once (a file lock)."""
    refresh = bool(refresh or getattr(cfg, "bti_refresh", False))
    key = cache_key(cfg, reserved_idx, model, reserved if reserved_idx is None else None)
    path = cache_path(exp, key)
    with _cache_lock(path, log):
        return _load_or_invert(exp, model, reserved, cfg, log, refresh, key, path)


def _load_or_invert(exp, model, reserved, cfg, log, refresh, key, path) -> InversionResult:
    from bdsafety.records import RecordError

    if path.is_file() and not refresh:
        try:
            inv = load_inversion(path, exp.device)
        except (RecordError, RuntimeError, KeyError, TypeError, ValueError) as e:
            log(f"bti cache {path} unusable ({str(e).splitlines()[0]}); inverting again")
        else:
            log(f"bti inversion loaded from cache {path}")
            log(target_report(inv.target, inv.votes, exp.target))
            return inv
    inv = invert_trigger(exp, model, reserved, cfg, log)
    save_inversion(path, inv, key, cfg, exp.target)
    log(f"bti inversion cached at {path}")
    return inv


__all__ = [
    "BTI_SCHEMA", "InversionResult", "UNetGenerator", "pretrain_generator", "learn_benign_mask", "train_generator",
    "detect_target", "invert_trigger", "load_or_invert", "cache_key", "model_digest", "frozen", "target_report",
]
