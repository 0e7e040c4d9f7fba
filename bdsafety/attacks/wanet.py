"""WaNet (Nguyen & Tran, ICLR 2021) as BackdoorBench v2.2 runs it (attack/wanet.py): an image warp is the trigger.

Warping field (BackdoorBench's semantics, ``WarpingField``): a random (2, k, k) field in [-1, 1], rescaled so its
mean absolute value is 1, bicubically upsampled (align_corners) to (H, W) = ``noise_grid``; the sampling grid is
``clamp((identity_grid + s * noise_grid / H) * grid_rescale, -1, 1)`` and an image is warped with
``grid_sample(bilinear, align_corners=True)``. s = 0 with grid_rescale = 1 is the identity. Cross ("noise") samples
use that grid plus uniform noise in [-1/H, 1/H] per pixel, clamped, and keep their true label.

Training is attack-controlled: the clean training set is loaded WITHOUT the usual augmentation; in every batch the
first int(pratio * bs) samples are warped (backdoor label), the next int(that * cross_ratio) noise-warped (true label)
— ``bdsafety.attacks.controlled`` — then BackdoorBench's post-transform runs on the whole batch: random crop with
padding ``random_crop`` (probability 0.8), random rotation up to ``random_rotation`` degrees (probability 0.5) and,
where the dataset flips (cifar10), a horizontal flip; padding and rotated-in corners take the dataset's mean colour
(BackdoorBench transforms normalised images and fills with 0). Difference: these are drawn per sample here
(BackdoorBench's tensor transforms draw one crop/angle for the whole batch). Everything runs batched on the device
(``WaNetBatch``).

Record: bd_test = every non-target test image warped; ``cross_test_dataset/`` = every test image noise-warped (true
labels; its accuracy is ``test_cross_acc`` in attack_df.csv); bd_train = BackdoorBench's final unshuffled pass
(backdoor + cross samples; cross indices in info.pickle, skipped by RA/EP/PAM); ``wanet_grids.pt`` = the warping
field (identity_grid, noise_grid, s, k, grid_rescale, as BackdoorBench's state_dict.pt) so anyone can re-warp images:
``WarpingField.load(record_dir).apply(images)``. Images are stored as uint8, rounded.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from bdsafety import engine
from bdsafety.attacks.base import Attack, AttackOutcome, register_attack
from bdsafety.attacks.controlled import (
    cross_test_artifacts,
    final_pass_layout,
    merged_split,
    num_poison_in_batch,
    to_uint8,
)
from bdsafety.attacks.poison import backdoor_labels
from bdsafety.config import NONNEG, NONNEG_INT, POS_INT, POSITIVE, Option
from bdsafety.data.device import DeviceDataset, random_crop_flip, random_rotate
from bdsafety.pools import CROSS_KEY
from bdsafety.safeio import safe_torch_load

GRIDS_FILE = "wanet_grids.pt"


def identity_grid(h: int, w: int | None = None, device="cpu") -> torch.Tensor:
    """(1, H, W, 2) grid_sample grid that samples every pixel at itself: [..., 0] = x (column), [..., 1] = y (row)."""
    w = h if w is None else w
    ys, xs = torch.meshgrid(torch.linspace(-1, 1, h), torch.linspace(-1, 1, w), indexing="ij")
    return torch.stack((xs, ys), 2)[None].to(device)


def noise_grid(k: int, h: int, w: int | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """(1, H, W, 2): a uniform (2, k, k) field in [-1, 1], divided by its mean |value|, bicubic-upsampled."""
    w = h if w is None else w
    ins = torch.rand(1, 2, k, k, generator=generator) * 2 - 1
    ins = ins / ins.abs().mean()
    return F.interpolate(ins, size=(h, w), mode="bicubic", align_corners=True).permute(0, 2, 3, 1)


@dataclass
class WarpingField:
    identity: torch.Tensor  # (1, H, W, 2)
    noise: torch.Tensor  # (1, H, W, 2)
    s: float
    k: int
    grid_rescale: float

    @classmethod
    def make(cls, h: int, w: int, *, k: int = 4, s: float = 0.5, grid_rescale: float = 1.0,
             seed: int = 0) -> "WarpingField":
        gen = torch.Generator().manual_seed(int(seed))
        return cls(identity_grid(h, w), noise_grid(k, h, w, gen), float(s), int(k), float(grid_rescale))

    @property
    def height(self) -> int:
        return int(self.identity.shape[1])

    def grid(self, device=None) -> torch.Tensor:
        """The backdoor sampling grid (1, H, W, 2), in [-1, 1]."""
        g = ((self.identity + self.s * self.noise / self.height) * self.grid_rescale).clamp(-1, 1)
        return g if device is None else g.to(device)

    def cross_grids(self, n: int, generator: torch.Generator | None = None, device=None) -> torch.Tensor:
        """(n, H, W, 2): the backdoor grid plus per-pixel uniform noise in [-1/H, 1/H], clamped (cross samples)."""
        _, h, w, _ = self.identity.shape
        ins = torch.rand(n, h, w, 2, generator=generator) * 2 - 1
        g = (self.grid() + ins / self.height).clamp(-1, 1)
        return g if device is None else g.to(device)

    def warp(self, x: torch.Tensor, grid: torch.Tensor | None = None) -> torch.Tensor:
        """Warp float images (N, C, H, W) with ``grid`` (default: the backdoor grid), bilinear, align_corners."""
        grid = self.grid(x.device) if grid is None else grid.to(x.device)
        if grid.shape[0] == 1:
            grid = grid.expand(len(x), -1, -1, -1)
        return F.grid_sample(x, grid.to(x.dtype), mode="bilinear", align_corners=True)

    def apply(self, images: np.ndarray, *, cross: bool = False, generator: torch.Generator | None = None,
              batch_size: int = 1024) -> np.ndarray:
        """Warped copies of uint8 (N, H, W, C) images (``cross``: noise-warped), uint8, rounded."""
        out = []
        for s in range(0, len(images), batch_size):
            x = torch.from_numpy(np.ascontiguousarray(images[s:s + batch_size])).permute(0, 3, 1, 2).float() / 255
            grid = self.cross_grids(len(x), generator) if cross else None
            out.append(to_uint8(self.warp(x, grid)))
        return np.concatenate(out) if out else np.zeros((0, *images.shape[1:]), np.uint8)

    def state(self) -> dict:
        return {"identity_grid": self.identity.cpu(), "noise_grid": self.noise.cpu(), "s": self.s, "k": self.k,
                "grid_rescale": self.grid_rescale}

    @classmethod
    def from_state(cls, d: dict) -> "WarpingField":
        return cls(d["identity_grid"].float(), d["noise_grid"].float(), float(d["s"]), int(d["k"]),
                   float(d["grid_rescale"]))

    @classmethod
    def load(cls, record_dir, trust_record: bool = False) -> "WarpingField":

        return cls.from_state(safe_torch_load(Path(record_dir) / GRIDS_FILE, trust_record))


class WaNetBatch:
    """The training batch hook (engine.fit's ``batch_fn``): warp, noise-warp, post-transform, normalise."""

    def __init__(self, field: WarpingField, norm, *, pratio: float, cross_ratio: float, label_trans: str, target: int,
                 num_classes: int, random_crop: int, random_rotation: float, hflip: bool, device, seed: int = 0):
        self.field, self.norm = field, norm
        self.grid = field.grid(device)
        self.pratio, self.cross_ratio = pratio, cross_ratio
        self.label_trans, self.target, self.num_classes = label_trans, target, num_classes
        self.random_crop, self.random_rotation, self.hflip = random_crop, random_rotation, hflip
        self.gen = torch.Generator().manual_seed(int(seed))

    def __call__(self, xb: torch.Tensor, y: torch.Tensor, idx=None):
        x = xb.float().div(255.0)
        n = len(x)
        nb = num_poison_in_batch(self.pratio, n, self.gen)
        nc = min(int(nb * self.cross_ratio), n - nb)
        y = y.clone()
        if nb:
            x[:nb] = self.field.warp(x[:nb], self.grid)
            y[:nb] = torch.as_tensor(backdoor_labels(y[:nb].cpu().numpy(), self.label_trans, self.target,
                                                     self.num_classes),
                                     device=y.device)
        if nc:
            x[nb:nb + nc] = self.field.warp(x[nb:nb + nc], self.field.cross_grids(nc, self.gen, x.device))
        x = self.post_transform(x)
        return self.norm(x), y

    def post_transform(self, x: torch.Tensor) -> torch.Tensor:
        """BackdoorBench's PostTensorTransform, per sample: crop (p 0.8), rotation (p 0.5), flip (cifar10).

        BackdoorBench runs it on NORMALISED images, so the crop's padding and the rotation's corners are filled with
        0 there, i.e. with the dataset's mean colour in pixel space. Here the batch is in pixel space [0, 1]: it is
        shifted by the mean, transformed with zero fill, and shifted back (the same images)."""
        n = len(x)
        mean = self.norm.mean.to(x.device, x.dtype)
        x = x - mean
        if self.random_crop > 0:
            cropped = random_crop_flip(x, pad=self.random_crop, flip=False, generator=self.gen)
            keep = (torch.rand(n, generator=self.gen) < 0.8).to(x.device)[:, None, None, None]
            x = torch.where(keep, cropped, x)
        if self.random_rotation > 0:
            rotated = random_rotate(x, self.random_rotation, generator=self.gen)
            keep = (torch.rand(n, generator=self.gen) < 0.5).to(x.device)[:, None, None, None]
            x = torch.where(keep, rotated, x)
        if self.hflip:
            x = random_crop_flip(x, pad=0, flip=True, generator=self.gen)
        return x + mean


@register_attack
class WaNet(Attack):
    name = "wanet"
    description = ("WaNet attack: warping-based trigger, noise (cross) samples, poisoned in the training loop "
                   "(BackdoorBench-compatible record)")
    options = {
        "cross_ratio": Option(2.0, "noise (cross) samples per backdoor sample in a batch (rho_n = pratio * "
                                   "cross_ratio)", check=NONNEG),
        "k": Option(4, "side of the random control grid of the warping field", check=POS_INT),
        "s": Option(0.5, "warping strength", check=NONNEG),
        "grid_rescale": Option(1.0, "rescale of the sampling grid (1: none)", check=POSITIVE),
        "random_crop": Option(5, "post-transform random-crop padding (probability 0.8)", check=NONNEG_INT),
        "random_rotation": Option(10.0, "post-transform random rotation, degrees (probability 0.5)", check=NONNEG),
        "cross_test": Option(True, "also save the cross (noise) test set, cross_test_dataset/, "
                                   "and report test_cross_acc"),
    }

    def prepare(self) -> None:
        h, w, _ = self.ctx.info.img_size
        c = self.cfg
        self.field = WarpingField.make(h, w, k=c.k, s=c.s, grid_rescale=c.grid_rescale, seed=c.random_seed)

    def apply(self, images: np.ndarray, *, split: str, indices: np.ndarray) -> np.ndarray:
        return self.field.apply(images)

    def run(self):

        self.prepare()
        d, c, dev = self.ctx.data, self.cfg, self.ctx.device
        bd_test = self.make_split("test", self.test_poison_indices())
        norm = self.normalizer()
        hook = WaNetBatch(self.field, norm, pratio=c.pratio, cross_ratio=c.cross_ratio,
                          label_trans=c.attack_label_trans, target=c.attack_target, num_classes=self.ctx.num_classes,
                          random_crop=c.random_crop, random_rotation=c.random_rotation, hflip=self.ctx.info.hflip,
                          device=dev, seed=c.random_seed + 1)
        cross_gen = torch.Generator().manual_seed(c.random_seed + 2)
        cross_x = self.field.apply(d.test_x, cross=True, generator=cross_gen) if c.cross_test else None
        cross_ds = DeviceDataset(cross_x, d.test_y, dev) if c.cross_test else None

        def on_epoch_end(epoch, row):
            if cross_ds is not None:
                row["test_cross_acc"] = (engine.evaluate_loss_acc(model, cross_ds, norm, c.eval_batch_size)[1]
                                         if not math.isnan(row.get("test_acc", math.nan)) else math.nan)

        engine.seed_everything(c.random_seed)
        model = self.new_model()
        rows = self.train(model, d.train_x, d.train_y, bd_test, batch_fn=hook, augment=False, on_epoch_end=on_epoch_end)

        bd_idx, cross_idx = final_pass_layout(len(d.train_y), c.batch_size, c.pratio, c.cross_ratio,
                                              seed=c.random_seed + 3)
        bd = self.make_split("train", bd_idx)
        cross = self.make_split("train", cross_idx,
                                images=self.field.apply(d.train_x[cross_idx], cross=True, generator=cross_gen))
        cross.bd_labels = cross.orig_labels.copy()  # cross samples keep their true label
        bd_train = merged_split(bd, cross) if c.pratio > 0 else bd
        info = {"cross_ratio": c.cross_ratio, "k": c.k, "s": c.s, "grid_rescale": c.grid_rescale,
                "random_crop": c.random_crop, "random_rotation": c.random_rotation,
                CROSS_KEY: [int(i) for i in cross_idx] if c.pratio > 0 else []}
        artifacts = {GRIDS_FILE: self.field.state()}
        if cross_x is not None:
            artifacts.update(cross_test_artifacts(cross_x, d.test_y))
        return AttackOutcome(model, rows, bd_train, bd_test, info, artifacts)
