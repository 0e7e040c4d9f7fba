"""Device-resident datasets and batched augmentation.

Small-image datasets (CIFAR, GTSRB, Tiny) fit in accelerator memory as uint8, so the whole split lives on the
device as an (N, C, H, W) uint8 tensor. Each batch is cropped, flipped and normalised there in a few tensor
ops: no per-sample PIL work and no DataLoader workers in the hot loop.
"""
from __future__ import annotations

import math
from typing import Iterator

import numpy as np
import torch

from bdsafety.data.info import DatasetInfo


class DeviceDataset:
    """uint8 images (N, C, H, W) and int64 labels on one device.

    ``frozen`` (bool per sample, default none): samples that training augmentation must leave untouched. The
    retuning attack's real poisoned samples are frozen: the official RA loads them with the test transform, and a
    random crop would cut a corner trigger away in a large fraction of draws (``augment_poison`` unfreezes them).
    """

    def __init__(self, images, labels, device="cpu", frozen=None):
        if isinstance(images, np.ndarray):
            if images.dtype != np.uint8 or images.ndim != 4:
                raise ValueError("DeviceDataset expects uint8 images of shape (N, H, W, C)")
            images = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2)
        if images.dtype != torch.uint8:
            raise ValueError("DeviceDataset expects uint8 images")
        self.x = images.to(device).contiguous()
        self.y = torch.as_tensor(np.asarray(labels) if not torch.is_tensor(labels) else labels, dtype=torch.long).to(device)
        if len(self.x) != len(self.y):
            raise ValueError(f"{len(self.x)} images but {len(self.y)} labels")
        self.frozen = None
        if frozen is not None:
            f = torch.as_tensor(np.asarray(frozen) if not torch.is_tensor(frozen) else frozen, dtype=torch.bool)
            if f.ndim == 0:
                f = f.expand(len(self.y))
            if len(f) != len(self.y):
                raise ValueError(f"{len(f)} frozen flags for {len(self.y)} samples")
            self.frozen = f.to(self.x.device).clone() if bool(f.any()) else None

    @property
    def device(self) -> torch.device:
        return self.x.device

    def __len__(self) -> int:
        return len(self.y)

    def subset(self, index) -> "DeviceDataset":
        index = torch.as_tensor(np.asarray(index), dtype=torch.long, device=self.x.device)
        frozen = None if self.frozen is None else self.frozen[index]
        return DeviceDataset(self.x[index], self.y[index], self.x.device, frozen=frozen)

    def with_labels(self, labels) -> "DeviceDataset":
        return DeviceDataset(self.x, labels, self.x.device, frozen=self.frozen)

    def frozen_mask(self) -> torch.Tensor:
        """Per-sample bool: True where augmentation must not touch the sample."""
        if self.frozen is None:
            return torch.zeros(len(self), dtype=torch.bool, device=self.x.device)
        return self.frozen

    @staticmethod
    def concat(parts: list["DeviceDataset"]) -> "DeviceDataset":
        frozen = None
        if any(p.frozen is not None for p in parts):
            frozen = torch.cat([p.frozen_mask() for p in parts])
        return DeviceDataset(torch.cat([p.x for p in parts]), torch.cat([p.y for p in parts]), parts[0].device, frozen=frozen)

    def augmented_once(self, *, pad: int = 4, flip: bool = True, generator: torch.Generator | None = None,
                       chunk: int = 8192) -> "DeviceDataset":
        """A copy in which every non-frozen sample is replaced by ONE draw of the train augmentation
        (``random_crop_flip``, batched on the device, ``chunk`` samples at a time, seeded by ``generator``); frozen
        samples keep their stored image. Training on the copy with ``augment=False`` shows each sample's same
        augmented image in every epoch, like a data set built once through a random train transform (the official
        RA's); ``iterate_batches(augment=True)`` on the original redraws it every pass instead."""
        if len(self) == 0:
            return DeviceDataset(self.x.clone(), self.y, self.x.device, frozen=self.frozen)
        xa = torch.cat([random_crop_flip(self.x[s : s + chunk], pad=pad, flip=flip, generator=generator)
                        for s in range(0, len(self), chunk)])
        if self.frozen is not None:
            xa = torch.where(self.frozen[:, None, None, None], self.x, xa)
        return DeviceDataset(xa, self.y, self.x.device, frozen=self.frozen)

    def numpy_images(self) -> np.ndarray:
        """Back to uint8 (N, H, W, C) on the CPU."""
        return self.x.permute(0, 2, 3, 1).cpu().numpy()


class Normalizer:
    """Pixel space [0, 1] <-> the model's normalised input space, for one dataset."""

    def __init__(self, info: DatasetInfo, device="cpu"):
        self.mean = torch.tensor(info.mean, dtype=torch.float32, device=device).view(1, -1, 1, 1)
        self.std = torch.tensor(info.std, dtype=torch.float32, device=device).view(1, -1, 1, 1)

    def __call__(self, x01: torch.Tensor) -> torch.Tensor:
        return (x01 - self.mean) / self.std

    def denormalize(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.std + self.mean

    def from_uint8(self, x: torch.Tensor) -> torch.Tensor:
        return self(x.float().div_(255.0))


def random_crop_flip(x: torch.Tensor, pad: int = 4, flip: bool = True, generator: torch.Generator | None = None) -> torch.Tensor:
    """Per-sample RandomCrop(size, padding=pad) with zero padding + RandomHorizontalFlip(0.5), on a batch.

    Same distribution as torchvision's transforms applied image by image: crop offsets uniform in
    [0, 2*pad] for each axis independently, flip with probability 1/2.
    """
    n, c, h, w = x.shape
    dev = x.device
    if pad > 0:
        xp = torch.nn.functional.pad(x, (pad, pad, pad, pad))
        oy = torch.randint(0, 2 * pad + 1, (n,), device="cpu", generator=generator).to(dev)
        ox = torch.randint(0, 2 * pad + 1, (n,), device="cpu", generator=generator).to(dev)
        rows = (oy[:, None] + torch.arange(h, device=dev)[None, :])[:, None, :, None]  # n,1,h,1
        cols = (ox[:, None] + torch.arange(w, device=dev)[None, :])[:, None, None, :]  # n,1,1,w
        bi = torch.arange(n, device=dev)[:, None, None, None]
        ci = torch.arange(c, device=dev)[None, :, None, None]
        x = xp[bi, ci, rows, cols]
    if flip:
        f = (torch.rand(n, device="cpu", generator=generator) < 0.5).to(dev)
        x = torch.where(f[:, None, None, None], x.flip(3), x)
    return x


def random_rotate(x: torch.Tensor, degrees: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Per-sample RandomRotation(degrees) about the image centre (angle uniform in [-degrees, degrees], nearest
    neighbour, zero fill, like torchvision's defaults), on a float batch (N, C, H, W)."""
    n = len(x)
    ang = (torch.rand(n, generator=generator) * 2 - 1) * math.radians(degrees)
    cos, sin = torch.cos(ang), torch.sin(ang)
    zero = torch.zeros(n)
    theta = torch.stack([torch.stack([cos, -sin, zero], 1), torch.stack([sin, cos, zero], 1)], 1).to(x.device, x.dtype)
    grid = torch.nn.functional.affine_grid(theta, list(x.shape), align_corners=False)
    return torch.nn.functional.grid_sample(x, grid, mode="nearest", padding_mode="zeros", align_corners=False)


def iterate_batches(
    ds: DeviceDataset,
    batch_size: int,
    *,
    shuffle: bool = False,
    augment: bool = False,
    hflip: bool = True,
    pad: int = 4,
    generator: torch.Generator | None = None,
    drop_last: bool = False,
) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Yield (uint8 images, labels, indices) batches; augmentation is redrawn on every pass and never touches the
    dataset's frozen samples (they come out bit-identical to the stored images)."""
    n = len(ds)
    order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
    order = order.to(ds.device)
    stop = n - n % batch_size if (drop_last and n >= batch_size) else n
    for s in range(0, stop, batch_size):
        idx = order[s : s + batch_size]
        xb = ds.x[idx]
        if augment:
            xa = random_crop_flip(xb, pad=pad, flip=hflip, generator=generator)
            xb = xa if ds.frozen is None else torch.where(ds.frozen[idx][:, None, None, None], xb, xa)
        yield xb, ds.y[idx], idx
