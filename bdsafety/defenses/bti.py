"""BTI-DBF trigger inversion (Xu et al., "Towards Reliable and Efficient Backdoor Trigger Inversion via
Decoupling Benign Features", ICLR 2024), shared by PAM, pam_reinvert and the BTI-DBF(U) baseline, following the
paper's fork of the official code (fine_tune/BTIDBF: pretrain.py, btidbfu.py ``reverse``, evaluate.py).

A UNet ``G`` maps a NORMALISED image to a normalised image of the same size (the official generator works on the
loader's normalised tensors and its output goes to the classifier as is). Stages, on the defender's reserved
clean data D_r (the official ``cln_trainloader``: random crop + the dataset's flip, ``bti_augment``):

1. ``pretrain_generator`` (official pretrain.py): G ~ identity that preserves the classifier's behaviour,
   loss = L_pred + MSE(phi(x), phi(G(x))) + w * MSE(x, G(x)), w = 100 while MSE(x, G(x)) > 0.1 else 0.01,
   classifier in eval mode. L_pred: ``bti_pretrain_pred`` kl = KL(f(x) || f(G(x))) (METHODS.md: a correct
   divergence; DEPARTURE) or official = CrossEntropyLoss(softmax(f(x)), softmax(f(G(x)))) (softmax applied twice).
2. ``learn_benign_mask``: a feature mask m = tanh(a)/2 + 0.5 with the shape of phi(x) for one sample, minimising
   CE(h(m * phi(x)), y) - CE(h((1 - m) * phi(x)), y) over ``a`` only (Adam). ``bti_mask_mode`` train_copy (official):
   on a deep copy of the classifier in TRAIN mode (BatchNorm uses batch statistics and updates the copy's running
   statistics); eval (DEPARTURE): on the classifier itself in eval mode.
3. ``train_generator``: against the same classifier (the copy, in eval mode, with the running statistics step 2
   left in it), with L_ben = MSE(m*phi(x), m*phi(G(x))), L_bd = MSE((1-m)*phi(x), (1-m)*phi(G(x))) and
   L_norm = MSE(x, G(x)): minimise L_norm when L_norm > bti_norm_bound or L_ben > bti_feat_bound, else
   -L_bd + 0.01 * L_ben; in rounds after the first add CE(f(G(x)), t^). ``bti_optimizer`` shared (official): ONE
   Adam for G, created before round 1 and kept across rounds; fresh (DEPARTURE): a new Adam every round.
4. ``detect_target`` (official evaluate.get_target_label, after round 1 only): the majority class of f(G(x + n)),
   n ~ N(0, 0.03^2) in normalised space, over D_r. ``bti_detect_data`` augmented (official: the augmented training
   loader) or plain (DEPARTURE: the reserved images as stored).

Generators (``bti_generator``): official = the official UNet (models/unet_model.py: 3x3 conv - InstanceNorm(affine)
- leaky ReLU twice per block, max-pool, a bottleneck block, 3x3 stride-2 transposed conv + leaky ReLU, skip
concatenation, a 1x1 output conv and NO output nonlinearity; pretraining makes it ~ the identity); residual
(DEPARTURE, this project's earlier generator): a GroupNorm UNet in pixel space [0, 1] whose output is
sigmoid(logit(x) + r(x)) with r initialised to 0 (G starts as the identity and stays in [0, 1]).

Round structure (the callers): round 1 = pretrain, mask + G, detect (``invert_trigger``, cached); every later
round of BTI-DBF(U) and pam_reinvert = ``reinvert`` (a new mask on a copy of the CURRENT model, then G with the CE
to t^ and the shared optimizer). The official PAM loop froze G after round 1 (unlearn_pam sets requires_grad=False
on G and never resets it), so its later ``reverse`` calls change nothing: ``pam`` skips them.

``load_or_invert`` caches round 1 in the record (record/<rf>/bti_inversion/<key>.pt), keyed on every bti_ setting
that changes it, the reserved indices, the seed and a digest of the model's weights, so PAM, pam_reinvert,
BTI-DBF(U) and PAM's rho sweep on one record compute ONE inversion (their yamls give the same bti_ settings). The
cache holds only tensors and plain values (G as a state_dict, G's Adam state for the shared optimizer) and is read
with safe loading.
"""
from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from bdsafety.config import NONNEG, POS_INT, POSITIVE, Option
from bdsafety.data.device import DeviceDataset, iterate_batches
from bdsafety.defenses.base import defense_schema, shared_cache_ready
from bdsafety.engine import autocast
from bdsafety.errors import ConfigError, TrainingDiverged
from bdsafety.outputs import INVERSION_DIR
from bdsafety.safeio import RecordError, atomic_torch_save, file_lock, safe_torch_load

CACHE_DIR = INVERSION_DIR
CACHE_FORMAT = 2

GENERATORS = ("official", "residual")
MASK_MODES = ("train_copy", "eval")
OPTIMIZERS = ("shared", "fresh")
DETECT_DATA = ("augmented", "plain")
PRETRAIN_PRED = ("kl", "official")

BTI_SCHEMA: dict[str, Option] = {
    "bti_pretrain_epochs": Option(50, "BTI-DBF: generator pretraining epochs on D_r (G ~ identity; official 50)",
                                  check=POS_INT),
    "bti_mask_epochs": Option(20, "BTI-DBF: benign-feature mask epochs per round (official mround 20)", check=POS_INT),
    "bti_gen_epochs": Option(30, "BTI-DBF: generator (trigger inversion) epochs per round (official uround 30)",
                             check=POS_INT),
    "bti_lr": Option(1e-3, "BTI-DBF: Adam learning rate of the generator (pretraining and inversion; official 1e-3)",
                     check=POSITIVE),
    "bti_mask_lr": Option(0.01, "BTI-DBF: Adam learning rate of the feature mask (official 0.01)", check=POSITIVE),
    "bti_batch_size": Option(128, "BTI-DBF: batch size of every inversion stage (official 128)", check=POS_INT),
    "bti_norm_bound": Option(0.3, "BTI-DBF: minimise MSE(x, G(x)) (normalised space) while it exceeds this bound",
                             check=NONNEG),
    "bti_feat_bound": Option(3.0, "BTI-DBF: ... or while the benign-feature distance L_ben exceeds this bound",
                             check=NONNEG),
    "bti_ben_weight": Option(0.01, "BTI-DBF: weight of L_ben in -L_bd + w * L_ben", check=NONNEG),
    "bti_target_weight": Option(1.0, "BTI-DBF: weight of CE(f(G(x)), detected target) in rounds after the first",
                                check=NONNEG),
    "bti_pretrain_switch": Option(0.1, "BTI-DBF pretraining: MSE(x, G(x)) above which its weight is "
                                       "bti_pretrain_w_high", check=NONNEG),
    "bti_pretrain_w_high": Option(100.0, "BTI-DBF pretraining: weight of MSE(x, G(x)) above the switch", check=NONNEG),
    "bti_pretrain_w_low": Option(0.01, "BTI-DBF pretraining: weight of MSE(x, G(x)) below the switch", check=NONNEG),
    "bti_pretrain_pred": Option("kl", "BTI-DBF pretraining prediction term: 'kl' = KL(f(x) || f(G(x))) (DEPARTURE, "
                                      "METHODS.md: a correct divergence); 'official' = the official "
                                      "CrossEntropyLoss(softmax(f(x)), softmax(f(G(x)))), softmax applied twice",
                                choices=PRETRAIN_PRED),
    "bti_generator": Option("official", "BTI-DBF generator: 'official' = the official UNet on normalised images "
                                        "(InstanceNorm, no output nonlinearity, ~identity only after pretraining); "
                                        "'residual' (DEPARTURE) = this project's pixel-space GroupNorm UNet, "
                                        "sigmoid(logit(x) + r(x)), the identity at the start", choices=GENERATORS),
    "bti_unet_base": Option(32, "BTI-DBF UNet: channels of the first block, doubled per block, capped at 512 "
                                "(official 32)", check=POS_INT),
    "bti_unet_depth": Option(4, "BTI-DBF UNet: encoder/decoder blocks (official 4); images need H, W >= 2**depth",
                             check=POS_INT),
    "bti_mask_mode": Option("train_copy", "BTI-DBF mask learning: 'train_copy' = the official: a deep copy of the "
                                          "classifier in TRAIN mode (BatchNorm batch statistics; the copy's running "
                                          "statistics move and the generator is then trained against that copy in eval "
                                          "mode); 'eval' (DEPARTURE) = the classifier itself, frozen in eval mode",
                            choices=MASK_MODES),
    "bti_optimizer": Option("shared", "BTI-DBF generator optimizer across rounds: 'shared' = the official: ONE Adam "
                                      "created before round 1 and kept (its moments continue) in every later round; "
                                      "'fresh' (DEPARTURE) = a new Adam every round", choices=OPTIMIZERS),
    "bti_detect_data": Option("augmented", "BTI-DBF target detection data: 'augmented' = the official: D_r through "
                                           "the training augmentation (the official cln_trainloader); 'plain' "
                                           "(DEPARTURE) = D_r as stored", choices=DETECT_DATA),
    "bti_detect_noise": Option(0.03, "BTI-DBF target detection: std of Gaussian noise added to the NORMALISED x "
                                     "before G (official 0.03)", check=NONNEG),
    "bti_augment": Option(True, "BTI-DBF: random crop (+ the dataset's flip) of D_r batches, "
                                "like the official train loader"),
    "bti_refresh": Option(False, "BTI-DBF: recompute the trigger inversion even when a cached one matches"),
}

# settings that do not change the cached (round-1) inversion, so they stay out of the cache key: the refresh flag,
# the target CE weight (used from round 2 on) and the optimizer mode (round 1 starts a new Adam either way; the
# cache keeps its state for 'shared')
_NOT_IN_KEY = ("bti_refresh", "bti_target_weight", "bti_optimizer")


@dataclass
class InversionResult:
    generator: nn.Module  # OfficialUNet or ResidualUNet: normalised image -> normalised image
    mask: torch.Tensor  # (C, H, W) feature mask in [0, 1]
    target: int  # detected target class
    votes: np.ndarray  # (num_classes,) counts of f(G(x)) over D_r
    optimizer_state: dict | None = field(default=None)  # G's Adam after round 1 (the official optimizer is kept)


# ------------------------------------------------------------------------------------------- the generators
class _Block(nn.Sequential):
    """3x3 conv - norm - leaky ReLU, twice."""

    def __init__(self, cin: int, cout: int, norm: Callable[[int], nn.Module], slope: float):
        super().__init__(
            nn.Conv2d(cin, cout, 3, padding=1), norm(cout), nn.LeakyReLU(slope),
            nn.Conv2d(cout, cout, 3, padding=1), norm(cout), nn.LeakyReLU(slope),
        )


def _widths(base: int, depth: int) -> list[int]:
    if depth < 1 or base < 1:
        raise ValueError(f"a BTI-DBF UNet needs depth >= 1 and base >= 1, got depth={depth}, base={base}")
    return [min(base * 2**i, 512) for i in range(depth)]


class _UNet(nn.Module):
    """The encoder-decoder skeleton of both generators; ``_body`` maps (N, C, H, W) to (N, C, H, W)."""

    config: dict

    def _check(self, x: torch.Tensor):
        depth = self.config["depth"]
        if x.dim() != 4 or x.shape[1] != self.config["channels"]:
            raise ValueError(f"the BTI-DBF generator expects (N, {self.config['channels']}, H, W) images, "
                             f"got shape {tuple(x.shape)}")
        if min(x.shape[-2:]) < 2**depth:
            raise ConfigError(f"images of {tuple(x.shape[-2:])} px are too small for a UNet of depth {depth}: "
                              f"lower bti_unet_depth to at most {int(math.log2(min(x.shape[-2:])))}")

    def _body(self, h: torch.Tensor) -> torch.Tensor:
        skips = []
        for block in self.down:
            h = block(h)
            skips.append(h)
            h = F.max_pool2d(h, 2)
        h = self.bottleneck(h)
        for upsample, block, skip in zip(self.upsample, self.up, reversed(skips)):
            h = upsample(h)
            if h.shape[-2:] != skip.shape[-2:]:  # sizes not divisible by 2**depth (the official UNet would fail)
                h = F.interpolate(h, size=skip.shape[-2:], mode="nearest")
            h = block(torch.cat([h, skip], 1))
        return self.out(h)


class _Upsample(nn.Sequential):
    """The official decoder's upsampling: 3x3 stride-2 transposed conv (channels kept), leaky ReLU."""

    def __init__(self, c: int):
        super().__init__(nn.ConvTranspose2d(c, c, 3, stride=2, padding=1, output_padding=1), nn.LeakyReLU(0.01))


class OfficialUNet(_UNet):
    """The official BTI-DBF generator (UNet(n_channels=3, num_classes=3, base_filter_num=32, num_blocks=4)):
    normalised image -> normalised image, no output nonlinearity.

    ``depth`` encoder blocks (3x3 conv - InstanceNorm2d(affine) - leaky ReLU(0.01), twice; widths base * 2**i capped
    at 512) each followed by 2x2 max-pooling, a bottleneck block of twice the last width, ``depth`` decoder blocks
    (3x3 stride-2 transposed conv keeping the channels + leaky ReLU, concatenation with the encoder output, an
    encoder block) and a 1x1 output conv. PyTorch's default initialisation: G is NOT the identity before pretraining.
    """

    def __init__(self, channels: int = 3, base: int = 32, depth: int = 4):
        super().__init__()
        widths = _widths(base, depth)
        self.config = {"kind": "official", "channels": int(channels), "base": int(base), "depth": int(depth)}

        def norm(c):
            return nn.InstanceNorm2d(c, affine=True)

        self.down = nn.ModuleList()
        cin = channels
        for w in widths:
            self.down.append(_Block(cin, w, norm, 0.01))
            cin = w
        cin = widths[-1] * 2
        self.bottleneck = _Block(widths[-1], cin, norm, 0.01)
        self.upsample = nn.ModuleList()
        self.up = nn.ModuleList()
        for w in reversed(widths):
            self.upsample.append(_Upsample(cin))
            self.up.append(_Block(cin + w, w, norm, 0.01))
            cin = w
        self.out = nn.Conv2d(widths[0], channels, 1)

    def forward(self, xn: torch.Tensor) -> torch.Tensor:
        self._check(xn)
        return self._body(xn)


class ResidualUNet(_UNet):
    """DEPARTURE (``bti_generator: residual``): this project's generator. In pixel space: x = denorm(xn),
    G01(x) = sigmoid(logit(x) + r(x)) with r a UNet (GroupNorm, leaky ReLU 0.2, 2x2 transposed-conv upsampling)
    whose last conv starts at zero, so G starts as the identity (up to clamping x to [1e-3, 1 - 1e-3]) and its
    images stay in [0, 1]; returns norm(G01(x)). ``mean`` / ``std``: the dataset's normalisation."""

    EPS = 1e-3

    def __init__(self, channels: int = 3, base: int = 32, depth: int = 4, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0)):
        super().__init__()
        widths = _widths(base, depth)
        mean, std = [float(v) for v in mean], [float(v) for v in std]
        if len(mean) != channels or len(std) != channels:
            raise ValueError(f"ResidualUNet: mean and std need {channels} values, got {mean}, {std}")
        self.config = {"kind": "residual", "channels": int(channels), "base": int(base), "depth": int(depth),
                       "mean": mean, "std": std}

        def norm(c):
            return nn.GroupNorm(math.gcd(8, c), c)

        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1), persistent=False)
        self.down = nn.ModuleList()
        cin = channels
        for w in widths:
            self.down.append(_Block(cin, w, norm, 0.2))
            cin = w
        cin = min(widths[-1] * 2, 1024)
        self.bottleneck = _Block(widths[-1], cin, norm, 0.2)
        self.upsample = nn.ModuleList()
        self.up = nn.ModuleList()
        for w in reversed(widths):
            self.upsample.append(nn.ConvTranspose2d(cin, w, 2, stride=2))
            self.up.append(_Block(2 * w, w, norm, 0.2))
            cin = w
        self.out = nn.Conv2d(widths[0], channels, 1)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, xn: torch.Tensor) -> torch.Tensor:
        self._check(xn)
        x = (xn * self.std + self.mean).clamp(self.EPS, 1 - self.EPS)
        out01 = torch.sigmoid(torch.log(x) - torch.log1p(-x) + self._body(x))
        return (out01 - self.mean) / self.std


def build_generator(config: dict) -> _UNet:
    """A generator from its ``config`` (as saved in the cache and in bti_generator.pt)."""
    config = dict(config)
    kind = config.pop("kind", None)
    if kind == "official":
        return OfficialUNet(**config)
    if kind == "residual":
        return ResidualUNet(**config)
    raise ValueError(f"unknown BTI-DBF generator kind {kind!r}; valid: {', '.join(GENERATORS)}")


def new_generator(exp, cfg) -> _UNet:
    c = int(exp.record.img_size[2])
    if cfg.bti_generator == "official":
        G = OfficialUNet(c, cfg.bti_unet_base, cfg.bti_unet_depth)
    elif cfg.bti_generator == "residual":
        G = ResidualUNet(c, cfg.bti_unet_base, cfg.bti_unet_depth, mean=exp.norm.mean.flatten().tolist(),
                         std=exp.norm.std.flatten().tolist())
    else:
        raise ConfigError(f"bti_generator {cfg.bti_generator!r} is not one of {list(GENERATORS)}")
    return G.to(exp.device)


def generator_digest(G: nn.Module) -> str:
    """A short digest of G's weights: equal digests = the same generator."""
    return model_digest(G)[:16]


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


def _batches(exp, reserved: DeviceDataset, cfg, gen: torch.Generator, augment: bool | None = None):
    """Shuffled batches of D_r as (normalised images, labels), augmented like the official training loader."""
    hflip = bool(getattr(exp.info, "hflip", True))
    augment = cfg.bti_augment if augment is None else augment
    for xb, y, _ in iterate_batches(reserved, cfg.bti_batch_size, shuffle=True, augment=augment, hflip=hflip,
                                    generator=gen):
        yield exp.norm(xb.float().div_(255.0)), y


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

    def mean(self, k: str) -> float:
        return self.sums.get(k, math.nan) / max(1, self.n)

    def text(self) -> str:
        return " ".join(f"{k} {v / max(1, self.n):.4f}" for k, v in self.sums.items())


def _log_epoch(log, stage: str, epoch: int, epochs: int, means: _Means):
    if epoch == 1 or epoch == epochs or epoch % 10 == 0:
        log(f"bti {stage} epoch {epoch}/{epochs}: {means.text()}")


def _pred_loss(mode: str, logit_x: torch.Tensor, logit_g: torch.Tensor) -> torch.Tensor:
    if mode == "kl":
        return F.kl_div(F.log_softmax(logit_g, 1), F.log_softmax(logit_x, 1), log_target=True, reduction="batchmean")
    if mode == "official":  # CrossEntropyLoss(input=softmax(f(x)), target=softmax(f(G(x)))): softmax twice
        return F.cross_entropy(F.softmax(logit_x, 1), F.softmax(logit_g, 1))
    raise ConfigError(f"bti_pretrain_pred {mode!r} is not one of {list(PRETRAIN_PRED)}")


# ------------------------------------------------------------------------------------------- the stages
def pretrain_generator(exp, model: nn.Module, reserved: DeviceDataset, cfg, log: Callable) -> nn.Module:
    """A fresh G trained to be ~ the identity while preserving the classifier's predictions and features
    (official pretrain.py). Logs the last epoch's mean MSE(x, G(x)) (normalised space) and stores it on G as
    ``pretrain_mse``."""
    _check_reserved(reserved, "BTI-DBF pretraining")
    torch.manual_seed(int(cfg.random_seed))
    G = new_generator(exp, cfg)
    opt = torch.optim.Adam(G.parameters(), lr=cfg.bti_lr)
    gen = _generator(cfg, 1)
    m = _Means()
    with frozen(model):
        G.train()
        for epoch in range(1, cfg.bti_pretrain_epochs + 1):
            m = _Means()
            for xn, _ in _batches(exp, reserved, cfg, gen):
                with torch.no_grad(), autocast(exp.device):
                    feat_x = model.features(xn)
                    logit_x = model.head(feat_x)
                with autocast(exp.device):
                    gn = G(xn)
                    feat_g = model.features(gn)
                    logit_g = model.head(feat_g)
                l_pred = _pred_loss(cfg.bti_pretrain_pred, logit_x.float(), logit_g.float())
                l_feat = F.mse_loss(feat_g.float(), feat_x.float())
                l_norm = F.mse_loss(gn.float(), xn)
                w = cfg.bti_pretrain_w_high if l_norm.item() > cfg.bti_pretrain_switch else cfg.bti_pretrain_w_low
                loss = l_pred + l_feat + w * l_norm
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                m.add(loss=loss.item(), pred=l_pred.item(), feat=l_feat.item(), norm=l_norm.item())
            _check_finite(m, "pretraining")
            _log_epoch(log, "pretrain", epoch, cfg.bti_pretrain_epochs, m)
    G.eval()
    G.requires_grad_(False)
    G.pretrain_mse = m.mean("norm")
    log(f"bti pretraining done: MSE(x, G(x)) {G.pretrain_mse:.4f} (normalised space, last epoch's mean)")
    return G


def inversion_classifier(model: nn.Module, cfg) -> nn.Module:
    """The classifier one round's mask learning and generator training work on: a deep copy for
    bti_mask_mode train_copy (its BatchNorm running statistics move in the train-mode mask passes, as the official
    ``reverse`` does to its ``inv_classifier``), the model itself for eval (it stays untouched: frozen, eval mode)."""
    if cfg.bti_mask_mode == "train_copy":
        clf = copy.deepcopy(model)
        clf.requires_grad_(False)  # only the mask learns (the official copy accumulated unused gradients)
        return clf
    if cfg.bti_mask_mode == "eval":
        return model
    raise ConfigError(f"bti_mask_mode {cfg.bti_mask_mode!r} is not one of {list(MASK_MODES)}")


@contextlib.contextmanager
def _mask_mode(clf: nn.Module, cfg):
    if cfg.bti_mask_mode == "train_copy":
        was = clf.training
        clf.train()  # BatchNorm: batch statistics, and the copy's running statistics are updated
        try:
            yield clf
        finally:
            clf.train(was)
    else:
        with frozen(clf):
            yield clf


def learn_benign_mask(exp, clf: nn.Module, reserved: DeviceDataset, cfg, log: Callable) -> torch.Tensor:
    """The benign-feature mask m (shape of features(x)[0], values in [0, 1]), learned on ``clf`` (from
    ``inversion_classifier``: in train_copy mode a copy whose running statistics this changes)."""
    _check_reserved(reserved, "BTI-DBF mask learning")
    gen = _generator(cfg, 3)
    with frozen(clf), torch.no_grad():
        shape = clf.features(exp.norm(reserved.view([0]).float().div(255.0))).shape[1:]
    a = nn.Parameter(torch.randn(tuple(shape), generator=_generator(cfg, 2)).to(exp.device))
    opt = torch.optim.Adam([a], lr=cfg.bti_mask_lr)
    flags = [p.requires_grad for p in clf.parameters()]
    clf.requires_grad_(False)
    try:
        with _mask_mode(clf, cfg):
            for epoch in range(1, cfg.bti_mask_epochs + 1):
                m = _Means()
                for xn, y in _batches(exp, reserved, cfg, gen):
                    with torch.no_grad(), autocast(exp.device):
                        feat = clf.features(xn)
                    feat = feat.float()
                    mask = torch.tanh(a) / 2 + 0.5
                    with autocast(exp.device):
                        pos = clf.head(mask * feat)
                        neg = clf.head((1 - mask) * feat)
                    l_pos = F.cross_entropy(pos.float(), y)
                    l_neg = F.cross_entropy(neg.float(), y)
                    loss = l_pos - l_neg
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    m.add(loss=loss.item(), ce_benign=l_pos.item(), ce_rest=l_neg.item(), mask_mean=mask.mean().item())
                _check_finite(m, "mask learning")
                _log_epoch(log, "mask", epoch, cfg.bti_mask_epochs, m)
    finally:
        for p, f in zip(clf.parameters(), flags):
            p.requires_grad_(f)
    return (torch.tanh(a) / 2 + 0.5).detach()


def new_generator_optimizer(G: nn.Module, cfg, state: dict | None = None) -> torch.optim.Optimizer:
    """G's Adam (lr bti_lr), optionally with a saved state (the official optimizer kept across rounds)."""
    opt = torch.optim.Adam(G.parameters(), lr=cfg.bti_lr)
    if state is not None:
        opt.load_state_dict(state)
    return opt


def round_optimizer(G: nn.Module, cfg, state: dict | None) -> torch.optim.Optimizer | None:
    """The generator optimizer of the rounds after the first: for bti_optimizer shared the one Adam of round 1
    (from ``state``), continued; for fresh None (``train_generator`` then builds a new one each call)."""
    if cfg.bti_optimizer == "shared":
        return new_generator_optimizer(G, cfg, state)
    if cfg.bti_optimizer == "fresh":
        return None
    raise ConfigError(f"bti_optimizer {cfg.bti_optimizer!r} is not one of {list(OPTIMIZERS)}")


def train_generator(exp, clf: nn.Module, G: nn.Module, mask: torch.Tensor, reserved: DeviceDataset, cfg, log: Callable,
                    target: int | None = None, optimizer: torch.optim.Optimizer | None = None) -> nn.Module:
    """Train G (in place, and returned) to keep the benign features and move the rest (the backdoor features),
    against ``clf`` in eval mode. ``target`` adds CE(f(G(x)), target); ``optimizer`` (None: a new Adam) steps G."""
    _check_reserved(reserved, "BTI-DBF generator training")
    mask = mask.to(exp.device)
    G.requires_grad_(True)
    G.train()
    opt = optimizer if optimizer is not None else new_generator_optimizer(G, cfg)
    gen = _generator(cfg, 4 if target is None else 5)
    with frozen(clf):
        for epoch in range(1, cfg.bti_gen_epochs + 1):
            m = _Means()
            for xn, y in _batches(exp, reserved, cfg, gen):
                with torch.no_grad(), autocast(exp.device):
                    feat_x = clf.features(xn)
                feat_x = feat_x.float()
                with autocast(exp.device):
                    gn = G(xn)
                    feat_g = clf.features(gn)
                feat_g = feat_g.float()
                l_ben = F.mse_loss(mask * feat_g, mask * feat_x)
                l_bd = F.mse_loss((1 - mask) * feat_g, (1 - mask) * feat_x)
                l_norm = F.mse_loss(gn.float(), xn)
                bounded = l_norm.item() > cfg.bti_norm_bound or l_ben.item() > cfg.bti_feat_bound
                loss = l_norm if bounded else -l_bd + cfg.bti_ben_weight * l_ben
                vals = dict(l_bd=l_bd.item(), l_ben=l_ben.item(), l_norm=l_norm.item(), bounded=float(bounded))
                if target is not None:
                    with autocast(exp.device):
                        logits = clf.head(feat_g)
                    l_t = F.cross_entropy(logits.float(), torch.full_like(y, int(target)))
                    loss = loss + cfg.bti_target_weight * l_t
                    vals["ce_target"] = l_t.item()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                m.add(loss=loss.item(), **vals)
            _check_finite(m, "generator training")
            _log_epoch(log, "generator" + ("" if target is None else f" (target {target})"), epoch,
                       cfg.bti_gen_epochs, m)
    G.eval()
    G.requires_grad_(False)
    return G


def decouple_and_train(exp, model: nn.Module, G: nn.Module, reserved: DeviceDataset, cfg, log: Callable,
                       target: int | None = None, optimizer: torch.optim.Optimizer | None = None):
    """One official ``reverse()``: learn the benign-feature mask on the inversion classifier of ``model``, then train
    G against that classifier. Returns (mask, G). ``model`` itself is never changed."""
    clf = inversion_classifier(model, cfg)
    mask = learn_benign_mask(exp, clf, reserved, cfg, log)
    G = train_generator(exp, clf, G, mask, reserved, cfg, log, target=target, optimizer=optimizer)
    return mask, G


def reinvert(exp, model: nn.Module, G: nn.Module, reserved: DeviceDataset, cfg, log: Callable, target: int,
             optimizer: torch.optim.Optimizer | None = None):
    """The re-inversion of a round after the first (BTI-DBF(U), pam_reinvert): a new mask against the CURRENT model,
    then G retrained with it and CE(f(G(x)), ``target``), stepped by ``optimizer`` (``round_optimizer``: the one
    official Adam for bti_optimizer shared; None = a new Adam). Returns (mask, G)."""
    return decouple_and_train(exp, model, G, reserved, cfg, log, target=target, optimizer=optimizer)


def detect_target(exp, model: nn.Module, G: nn.Module, reserved: DeviceDataset, *, noise_std: float = 0.0,
                  augment: bool = False, batch_size: int = 1024, seed: int = 0) -> tuple[int, np.ndarray]:
    """(majority class of f(G(xn + noise)) over ``reserved``, votes per class); ``noise_std``: std of Gaussian
    noise added to the NORMALISED images; ``augment``: through the training augmentation (one seeded pass)."""
    _check_reserved(reserved, "BTI-DBF target detection")
    gen = torch.Generator()
    gen.manual_seed(int(seed))
    votes = torch.zeros(exp.num_classes, dtype=torch.long)
    hflip = bool(getattr(exp.info, "hflip", True))
    was_g = G.training
    G.eval()
    with frozen(model), torch.no_grad():
        for xb, _, _ in iterate_batches(reserved, batch_size, shuffle=augment, augment=augment, hflip=hflip,
                                        generator=gen):
            xn = exp.norm(xb.float().div_(255.0))
            if noise_std > 0:
                xn = xn + noise_std * torch.randn(xn.shape, generator=gen).to(xn.device)
            with autocast(exp.device):
                pred = model(G(xn)).argmax(1)
            votes += torch.bincount(pred.cpu(), minlength=exp.num_classes)
    G.train(was_g)
    v = votes.numpy()
    return int(v.argmax()), v


def detect(exp, model: nn.Module, G: nn.Module, reserved: DeviceDataset, cfg) -> tuple[int, np.ndarray]:
    """``detect_target`` with the configured data (bti_detect_data), noise and seed."""
    if cfg.bti_detect_data not in DETECT_DATA:
        raise ConfigError(f"bti_detect_data {cfg.bti_detect_data!r} is not one of {list(DETECT_DATA)}")
    augment = cfg.bti_detect_data == "augmented"
    return detect_target(exp, model, G, reserved, noise_std=cfg.bti_detect_noise, augment=augment,
                         batch_size=cfg.bti_batch_size, seed=cfg.random_seed)


def invert_trigger(exp, model: nn.Module, reserved: DeviceDataset, cfg, log: Callable) -> InversionResult:
    """Round 1 of the inversion on the frozen ``model``: pretrain G, mask + G (the official ``reverse``), detect the
    target. The generator's Adam (created here, as the official ``opt_bd`` before the round loop) is returned with
    it."""
    t0 = time.time()
    G = pretrain_generator(exp, model, reserved, cfg, log)
    t1 = time.time()
    opt = new_generator_optimizer(G, cfg)
    mask, G = decouple_and_train(exp, model, G, reserved, cfg, log, optimizer=opt)
    t2 = time.time()
    target, votes = detect(exp, model, G, reserved, cfg)
    log(f"bti inversion: pretrain {t1 - t0:.0f}s, mask + generator {t2 - t1:.0f}s; "
        f"mean benign-mask value {mask.mean().item():.3f}")
    log(target_report(target, votes, exp.target))
    return InversionResult(G, mask, target, votes, optimizer_state=opt.state_dict())


def target_report(target: int, votes, true_target) -> str:
    v = np.asarray(votes)
    share = v[target] / max(1, v.sum())
    if true_target is None:
        verdict = "true target unknown (no attack_target in info.pickle)"
    else:
        verdict = f"true target {int(true_target)}: {'MATCH' if int(true_target) == int(target) else 'MISMATCH'}"
    return f"bti detected target {target} ({share:.1%} of f(G(x)) votes; votes {v.tolist()}); {verdict}"


def target_info(target: int, votes, true_target) -> dict:
    """What every inversion-based defense writes to config.yaml (and the study to results.csv): detected_target,
    true_target (None when unknown), target_match (None when the true target is unknown) and target_votes."""
    true = None if true_target is None else int(true_target)
    match = None if true is None else true == int(target)
    return {"detected_target": int(target), "true_target": true, "target_match": match,
            "target_votes": [int(v) for v in np.asarray(votes).tolist()]}


def _check_finite(m: _Means, stage: str):
    if not all(math.isfinite(v) for v in m.sums.values()):

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


def apply_generator(G: nn.Module, xn: torch.Tensor) -> torch.Tensor:
    """The inverted-trigger generator on a normalised batch (mixed precision where the run's precision asks for it),
    back in fp32: the one way PAM, pam_reinvert, BTI-DBF(U) and retune_aware apply G."""
    with autocast(xn.device):
        return G(xn).float()


def generator_artifact(G: nn.Module, mask, target: int) -> dict:
    """``bti_generator.pt`` of a defense that used the inversion (PAM, pam_reinvert, BTI-DBF(U), retune_aware): the
    generator's weights and config, the benign mask and the detected target."""
    return {"generator": {k: v.detach().cpu() for k, v in G.state_dict().items()},
            "generator_config": dict(getattr(G, "config", {})),
            "mask": mask.detach().cpu() if torch.is_tensor(mask) else mask, "target": int(target)}


def with_bti_schema(own: dict, name: str) -> dict:
    """The schema of a defense that runs the inversion: BTI_SCHEMA plus its own keys (a key in both is a programming
    error between the two modules)."""

    clash = sorted(set(BTI_SCHEMA) & set(own))
    if clash:  # pragma: no cover - a programming error between the two modules
        raise RuntimeError(f"BTI_SCHEMA and {name} both define {clash}")
    return defense_schema(**BTI_SCHEMA, **own)


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
        # a run's own input geometry (the record's is in its weights)
        payload["input"] = [cfg.input_resize, cfg.input_crop]
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:20]


def cache_path(exp, key: str) -> Path:
    return Path(exp.record_dir) / CACHE_DIR / f"{key}.pt"


def save_inversion(path, inv: InversionResult, key: str, cfg, true_target) -> Path:

    obj = {
        "format": CACHE_FORMAT,
        "key": key,
        "generator": {k: v.detach().cpu() for k, v in inv.generator.state_dict().items()},
        "generator_config": dict(inv.generator.config),
        "mask": inv.mask.detach().cpu(),
        "target": int(inv.target),
        "votes": torch.as_tensor(np.asarray(inv.votes), dtype=torch.long),
        "true_target": None if true_target is None else int(true_target),
        "optimizer_state": _to_cpu(inv.optimizer_state),
        "pretrain_mse": float(getattr(inv.generator, "pretrain_mse", math.nan)),
        "settings": {k: (v if isinstance(v, (int, float, bool, str)) or v is None else str(v))
                     for k, v in bti_settings(cfg).items()},
        "seed": int(cfg.random_seed),
    }
    return atomic_torch_save(obj, path)


def _to_cpu(obj):
    if torch.is_tensor(obj):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_to_cpu(v) for v in obj]
    return obj


def load_inversion(path, device) -> InversionResult:

    obj = safe_torch_load(path)
    need = ("format", "generator", "generator_config", "mask", "target", "votes", "optimizer_state")
    if not isinstance(obj, dict) or obj.get("format") != CACHE_FORMAT or any(k not in obj for k in need):
        raise RecordError(f"{path} is not a BTI-DBF inversion cache of format {CACHE_FORMAT}; "
                          f"delete it or pass --bti_refresh")
    G = build_generator(obj["generator_config"])
    G.load_state_dict(obj["generator"], strict=True)
    G = G.to(device).eval()
    G.requires_grad_(False)
    G.pretrain_mse = float(obj.get("pretrain_mse", math.nan))
    return InversionResult(G, obj["mask"].to(device), int(obj["target"]), obj["votes"].numpy().astype(np.int64),
                           optimizer_state=obj["optimizer_state"])


def load_or_invert(exp, model: nn.Module, reserved_idx, reserved: DeviceDataset, cfg, log: Callable,
                   refresh: bool = False) -> InversionResult:
    """The cached inversion for these settings / data / seed / model if present (and not ``refresh``), else
    ``invert_trigger`` and store it atomically under record/<rf>/bti_inversion/<key>.pt. Concurrent runs needing the
    same entry compute it once (a file lock)."""
    refresh = bool(refresh or getattr(cfg, "bti_refresh", False))
    key = cache_key(cfg, reserved_idx, model, reserved if reserved_idx is None else None)
    path = cache_path(exp, key)
    with file_lock(path, log, "trigger inversion"):
        inv = _load_or_invert(exp, model, reserved, cfg, log, refresh, key, path)
    shared_cache_ready(str(path))  # a prepare run (bdsafety.defenses.base.prepare_only) stops here
    return inv


def _load_or_invert(exp, model, reserved, cfg, log, refresh, key, path) -> InversionResult:

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
    "BTI_SCHEMA", "InversionResult", "OfficialUNet", "ResidualUNet", "build_generator", "pretrain_generator",
    "inversion_classifier", "learn_benign_mask", "train_generator", "decouple_and_train", "reinvert", "round_optimizer",
    "detect_target", "detect", "invert_trigger", "load_or_invert", "cache_key", "model_digest", "generator_digest",
    "frozen", "target_report", "target_info",
]
