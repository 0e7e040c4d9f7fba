"""Device-resident datasets and batched augmentation.

Small-image datasets (CIFAR, GTSRB, Tiny) fit in accelerator memory as uint8, so the whole split lives on the
device as an (N, C, H, W) uint8 tensor. Each batch is cropped, flipped and normalised there in a few tensor
ops: no per-sample PIL work and no DataLoader workers in the hot loop.

An :class:`InputGeometry` (a dataset's ``geometry``; None: the data's own size, BackdoorBench's CIFAR pipeline)
reproduces the official fork's ImageNet-size pipeline for CIFAR-100 / Tiny-ImageNet on such batches: every image is
resized (PIL's bilinear filter, bit-exact) to ``resize`` x ``resize``, then randomly cropped to ``crop`` x ``crop``
after zero padding (training) or centre-cropped (evaluation). The stored images keep their own size (50,000 CIFAR
images at 224 px would take 7.5 GB); each batch is resized on the device when it is drawn. A dataset may hold
samples of two sizes (``alt``): the attack's poisoned images, stamped after the resize as the official code stamps
them, beside the clean images at their native size.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch

from bdsafety.data.info import DatasetInfo, normalization_stats
from bdsafety.errors import ConfigError


@dataclass(frozen=True)
class InputGeometry:
    """Resize-then-crop input pipeline (torchvision order: Resize((resize, resize)) -> RandomCrop(crop, padding=pad)
    for training, Resize((resize, resize)) -> CenterCrop(crop) for evaluation).

    The official fork runs CIFAR-100 and Tiny-ImageNet this way: attacks, FST and RA with resize 224 / crop 224
    (BackdoorBench's get_transform at img_size 224), BTI-DBF and PAM with resize 256 / crop 224 (BTIDBF/loader.py).
    """

    resize: int
    crop: int
    pad: int = 4

    def __post_init__(self):

        if min(self.resize, self.crop) < 1 or self.pad < 0:
            raise ConfigError(f"input geometry resize {self.resize} / crop {self.crop} / pad {self.pad}: "
                              f"sizes must be >= 1")
        if self.crop > self.resize:
            raise ConfigError(f"input_crop {self.crop} is larger than input_resize {self.resize}: the crop is taken "
                              f"from the resized image; use input_crop <= input_resize")

    def describe(self) -> str:
        return f"resize {self.resize} -> crop {self.crop} (pad {self.pad})"


def input_geometry(resize: int | None, crop: int | None = None, pad: int = 4) -> InputGeometry | None:
    """The geometry of the ``input_resize`` / ``input_crop`` options (None: the data's own size)."""

    if resize is None:
        if crop is not None:
            raise ConfigError(f"input_crop {crop} without input_resize: the crop is taken from the resized image; set "
                              f"input_resize (e.g. input_resize 256 with input_crop 224) or drop input_crop")
        return None
    return InputGeometry(int(resize), int(resize if crop is None else crop), pad)


PIL_PRECISION_BITS = 22  # Pillow's fixed-point precision for 8-bit images (libImaging/Resample.c: 32 - 8 - 2)


@functools.lru_cache(maxsize=64)
def _pil_bilinear_weights(n_in: int, n_out: int) -> np.ndarray:
    """(n_out, n_in) fixed-point weights of Pillow's bilinear resample along one axis, as integers in float64:
    Pillow's coefficient computation (support 1 widened by the scale when shrinking, taps normalised to sum 1) and its
    rounding of each coefficient to 22 fractional bits."""
    scale = n_in / n_out
    filterscale = max(scale, 1.0)
    support = 1.0 * filterscale
    w = np.zeros((n_out, n_in), dtype=np.float64)
    for xx in range(n_out):
        center = (xx + 0.5) * scale
        xmin = max(math.trunc(center - support + 0.5), 0)
        xmax = min(math.trunc(center + support + 0.5), n_in)
        k = np.array([max(0.0, 1.0 - abs((x + xmin - center + 0.5) / filterscale)) for x in range(xmax - xmin)])
        if k.sum() != 0:
            k = k / k.sum()
        w[xx, xmin:xmax] = k
    one = float(1 << PIL_PRECISION_BITS)
    return np.where(w < 0, np.trunc(-0.5 + w * one), np.trunc(0.5 + w * one))


def pil_resize(x: torch.Tensor, size: int) -> torch.Tensor:
    """Resize a uint8 batch (N, C, H, W) to (N, C, size, size) exactly as torchvision's ``Resize((size, size))`` does
    on a PIL image (Pillow's bilinear filter with its antialiasing, horizontal pass then vertical pass, each rounded
    to uint8 in Pillow's fixed-point arithmetic), on the batch's device. The integer arithmetic runs in float64,
    which holds every intermediate exactly (< 2**40). No-op when the batch already has that size."""
    h, w = x.shape[-2:]
    if (h, w) == (size, size):
        return x
    dev = x.device
    calc = torch.device("cpu") if dev.type == "mps" else dev  # MPS has no float64
    one, half = float(1 << PIL_PRECISION_BITS), float(1 << (PIL_PRECISION_BITS - 1))

    def rounded(t):
        return torch.floor((t + half) / one).clamp_(0, 255)

    y = x.to(calc, torch.float64)
    if w != size:
        wx = torch.from_numpy(_pil_bilinear_weights(w, size)).to(calc)
        y = rounded(torch.matmul(y, wx.T))
    if h != size:
        wy = torch.from_numpy(_pil_bilinear_weights(h, size)).to(calc)
        y = rounded(torch.matmul(wy, y))
    return y.to(dev, torch.uint8).contiguous()


def center_crop(x: torch.Tensor, size: int) -> torch.Tensor:
    """torchvision's CenterCrop(size) on a batch (top/left offset int(round((H - size) / 2)))."""
    h, w = x.shape[-2:]
    if (h, w) == (size, size):
        return x
    top, left = round((h - size) / 2.0), round((w - size) / 2.0)
    return x[..., top:top + size, left:left + size]


def _nchw_uint8(images, device) -> torch.Tensor:
    if isinstance(images, np.ndarray):
        if images.dtype != np.uint8 or images.ndim != 4:
            raise ValueError("DeviceDataset expects uint8 images of shape (N, H, W, C)")
        images = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2)
    if images.dtype != torch.uint8:
        raise ValueError("DeviceDataset expects uint8 images")
    return images.to(device).contiguous()


class DeviceDataset:
    """uint8 images (N, C, H, W) and int64 labels on one device.

    ``frozen`` (bool per sample, default none): samples that training augmentation must leave untouched. The
    retuning attack's real poisoned samples are frozen: the official RA loads them with the test transform, and a
    random crop would cut a corner trigger away in a large fraction of draws (``augment_poison`` unfreezes them).

    ``geometry`` (an :class:`InputGeometry`, default none): every image drawn is resized and cropped by it (the
    evaluation view: resize + centre crop; training: resize + padded random crop); frozen samples get the evaluation
    view. ``alt`` = (images, rows): the samples at ``rows`` are stored at another size in ``images`` (their rows of
    ``images`` are placeholders); only with a geometry, which brings every sample to one size.
    """

    def __init__(self, images, labels, device="cpu", frozen=None, geometry: InputGeometry | None = None, alt=None):
        self.x = _nchw_uint8(images, device)
        self.y = torch.as_tensor(np.asarray(labels) if not torch.is_tensor(labels) else labels,
                                 dtype=torch.long).to(device)
        if len(self.x) != len(self.y):
            raise ValueError(f"{len(self.x)} images but {len(self.y)} labels")
        self.geometry = geometry
        self.frozen = None
        if frozen is not None:
            f = torch.as_tensor(np.asarray(frozen) if not torch.is_tensor(frozen) else frozen, dtype=torch.bool)
            if f.ndim == 0:
                f = f.expand(len(self.y))
            if len(f) != len(self.y):
                raise ValueError(f"{len(f)} frozen flags for {len(self.y)} samples")
            self.frozen = f.to(self.x.device).clone() if bool(f.any()) else None
        self.alt_x, self.slot = None, None
        if alt is not None and len(alt[1]):
            if geometry is None:
                raise ValueError("samples stored at two image sizes need an input geometry "
                                 "(resize) to bring them to one")
            ax = _nchw_uint8(alt[0], self.x.device)
            rows = torch.as_tensor(np.asarray(alt[1]) if not torch.is_tensor(alt[1]) else alt[1], dtype=torch.long)
            if len(ax) != len(rows) or ax.shape[1] != self.x.shape[1]:
                raise ValueError(f"{len(ax)} alternative-size images ({ax.shape[1]} channels) for {len(rows)} rows "
                                 f"({self.x.shape[1]} channels)")
            slot = torch.full((len(self.y),), -1, dtype=torch.long)
            slot[rows] = torch.arange(len(rows))
            self.alt_x, self.slot = ax, slot.to(self.x.device)

    @property
    def device(self) -> torch.device:
        return self.x.device

    def __len__(self) -> int:
        return len(self.y)

    @property
    def view_shape(self) -> tuple:
        """(C, H, W) of the images the dataset hands out (after its geometry)."""
        if self.geometry is None:
            return tuple(self.x.shape[1:])
        return (self.x.shape[1], self.geometry.crop, self.geometry.crop)

    def _alt(self, index: torch.Tensor):
        """(alt images, rows within ``index``) of the alternative-size samples among ``index``; None if none."""
        if self.slot is None:
            return None
        s = self.slot[index]
        m = s >= 0
        return self.alt_x[s[m]], torch.nonzero(m).squeeze(1)

    def subset(self, index) -> DeviceDataset:
        index = torch.as_tensor(np.asarray(index), dtype=torch.long, device=self.x.device)
        frozen = None if self.frozen is None else self.frozen[index]
        return DeviceDataset(self.x[index], self.y[index], self.x.device, frozen=frozen, geometry=self.geometry,
                             alt=self._alt(index))

    def with_labels(self, labels) -> DeviceDataset:
        return self._like(labels, self.geometry)

    def with_geometry(self, geometry: InputGeometry | None) -> DeviceDataset:
        """The same samples handed out through ``geometry``."""
        return self._like(self.y, geometry)

    def _like(self, labels, geometry: InputGeometry | None) -> DeviceDataset:
        alt = None if self.slot is None else self._alt(torch.arange(len(self), device=self.x.device))
        return DeviceDataset(self.x, labels, self.x.device, frozen=self.frozen, geometry=geometry, alt=alt)

    def frozen_mask(self) -> torch.Tensor:
        """Per-sample bool: True where augmentation must not touch the sample."""
        if self.frozen is None:
            return torch.zeros(len(self), dtype=torch.bool, device=self.x.device)
        return self.frozen

    @staticmethod
    def concat(parts: list[DeviceDataset]) -> DeviceDataset:
        """One dataset of ``parts`` (same geometry). With a geometry the parts may hold two image sizes: the first
        part's size is the main store, the other size goes to ``alt``."""
        frozen = None
        if any(p.frozen is not None for p in parts):
            frozen = torch.cat([p.frozen_mask() for p in parts])
        geometry = parts[0].geometry
        if any(p.geometry != geometry for p in parts):
            raise ValueError(f"cannot concatenate datasets with different input geometries: "
                             f"{[p.geometry for p in parts]}")
        y = torch.cat([p.y for p in parts])
        base = tuple(parts[0].x.shape[1:])
        if all(tuple(p.x.shape[1:]) == base and p.slot is None for p in parts):
            return DeviceDataset(torch.cat([p.x for p in parts]), y, parts[0].device, frozen=frozen, geometry=geometry)
        xs, alts, rows, off = [], [], [], 0
        for p in parts:
            if tuple(p.x.shape[1:]) == base:
                xs.append(p.x)
                a = p._alt(torch.arange(len(p), device=p.device))
                if a is not None:
                    alts.append(a[0])
                    rows.append(a[1] + off)
            elif p.slot is None:
                xs.append(torch.zeros((len(p), *base), dtype=torch.uint8, device=p.device))
                alts.append(p.x)
                rows.append(torch.arange(len(p), device=p.device) + off)
            else:
                raise ValueError("cannot concatenate datasets holding more than two image sizes")
            off += len(p)
        if len({tuple(a.shape[1:]) for a in alts}) > 1:
            raise ValueError(f"cannot concatenate datasets of three image sizes: {base} and "
                             f"{[tuple(a.shape[1:]) for a in alts]}")
        if geometry is None:
            raise ValueError(f"cannot concatenate datasets of image sizes {base} and {tuple(alts[0].shape[1:])} "
                             f"without an input geometry (resize) that brings them to one size")
        return DeviceDataset(torch.cat(xs), y, parts[0].device, frozen=frozen, geometry=geometry,
                             alt=(torch.cat(alts), torch.cat(rows).cpu()))

    def gather(self, index, size: int) -> torch.Tensor:
        """uint8 images at ``index`` resized to ``size`` x ``size`` (Pillow's bilinear filter, bit-exact), each from
        the size it is stored at."""
        index = torch.as_tensor(index, dtype=torch.long, device=self.x.device)
        xb = pil_resize(self.x[index], size)
        a = self._alt(index)
        if a is not None and len(a[1]):
            xb[a[1]] = pil_resize(a[0], size)
        return xb

    def view(self, index=None) -> torch.Tensor:
        """uint8 images at ``index`` (all when None) as the model sees them at evaluation: the stored images, or with a
        geometry resized and centre-cropped."""
        if index is None:
            index = torch.arange(len(self), device=self.x.device)
        if self.geometry is None:
            return self.x[torch.as_tensor(index, dtype=torch.long, device=self.x.device)]
        return center_crop(self.gather(index, self.geometry.resize), self.geometry.crop)

    def augmented(self, index, *, hflip: bool = True, pad: int = 4,
                  generator: torch.Generator | None = None) -> torch.Tensor:
        """Training view of the images at ``index``: random crop (after zero padding by ``pad``, or the geometry's)
        + horizontal flip when ``hflip``; with a geometry, taken from the resized images. Frozen samples are NOT
        spared here (``iterate_batches`` does that)."""
        index = torch.as_tensor(index, dtype=torch.long, device=self.x.device)
        if self.geometry is None:
            return random_crop_flip(self.x[index], pad=pad, flip=hflip, generator=generator)
        g = self.geometry
        return random_crop_flip(self.gather(index, g.resize), pad=g.pad, flip=hflip, generator=generator, size=g.crop)

    def augmented_once(self, *, pad: int = 4, flip: bool = True, generator: torch.Generator | None = None,
                       chunk: int = 8192) -> "DeviceDataset":
        """A copy in which every non-frozen sample is replaced by ONE draw of the train augmentation
        (``random_crop_flip``, batched on the device, ``chunk`` samples at a time, seeded by ``generator``); frozen
        samples keep their stored image. Training on the copy with ``augment=False`` shows each sample's same
        augmented image in every epoch, like a data set built once through a random train transform (the official
        RA's); ``iterate_batches(augment=True)`` on the original redraws it every pass instead."""
        if len(self) == 0:
            return DeviceDataset(self.x.clone(), self.y, self.x.device, frozen=self.frozen, geometry=self.geometry)
        if self.geometry is not None:  # drawn from the resized images; frozen ones get the evaluation view. The copy
            # holds images at the model's input size already: no geometry
            idx = torch.arange(len(self), device=self.x.device)
            xa = torch.cat([self.augmented(idx[s : s + chunk], hflip=flip, generator=generator)
                            for s in range(0, len(self), chunk)])
            if self.frozen is not None:
                xa = torch.where(self.frozen[:, None, None, None], self.view(), xa)
            return DeviceDataset(xa, self.y, self.x.device, frozen=self.frozen)
        xa = torch.cat([random_crop_flip(self.x[s : s + chunk], pad=pad, flip=flip, generator=generator)
                        for s in range(0, len(self), chunk)])
        if self.frozen is not None:
            xa = torch.where(self.frozen[:, None, None, None], self.x, xa)
        return DeviceDataset(xa, self.y, self.x.device, frozen=self.frozen)

    def numpy_images(self) -> np.ndarray:
        """Back to uint8 (N, H, W, C) on the CPU (the stored images; with a geometry, its evaluation view)."""
        x = self.x if self.geometry is None else self.view()
        return x.permute(0, 2, 3, 1).cpu().numpy()


class Normalizer:
    """Pixel space [0, 1] <-> the model's normalised input space, for one dataset: its own statistics
    (``normalization='dataset'``, BackdoorBench's) or ImageNet's ('imagenet', the official fork's CIFAR-100/Tiny
    pipeline for ImageNet-pretrained backbones)."""

    def __init__(self, info: DatasetInfo, device="cpu", normalization: str = "dataset"):

        self.normalization = normalization
        mean, std = normalization_stats(info, normalization)
        self.mean = torch.tensor(mean, dtype=torch.float32, device=device).view(1, -1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32, device=device).view(1, -1, 1, 1)

    def __call__(self, x01: torch.Tensor) -> torch.Tensor:
        return (x01 - self.mean) / self.std

    def denormalize(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.std + self.mean

    def from_uint8(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 images -> the model's input: the same operations as ``self(x / 255)``, in place on one new tensor."""
        return x.float().div_(255.0).sub_(self.mean).div_(self.std)


def random_crop_flip(x: torch.Tensor, pad: int = 4, flip: bool = True, generator: torch.Generator | None = None,
                     size: int | None = None) -> torch.Tensor:
    """Per-sample RandomCrop(size, padding=pad) with zero padding + RandomHorizontalFlip(0.5), on a batch.

    Same distribution as torchvision's transforms applied image by image: crop offsets uniform in
    [0, H + 2*pad - size] for each axis independently, flip with probability 1/2. ``size`` defaults to the batch's
    own size (offsets in [0, 2*pad]). The random draws (offsets, then flips, on the CPU generator) and the result are
    the same on every device; how the crop is cut differs: on the CPU whole windows are copied out of an unfolded view
    of the padded batch (``_crop_unfold``), elsewhere pixel by pixel in one gather (``_crop_gather``, not yet measured
    against the other on a GPU); tests/test_augment.py checks they agree exactly, benchmarks/input_stage.py times them.
    """
    n, c, h, w = x.shape
    oh, ow = (h, w) if size is None else (size, size)
    crop = pad > 0 or (oh, ow) != (h, w)
    oy = ox = f = None
    if crop:
        oy = torch.randint(0, h + 2 * pad - oh + 1, (n,), device="cpu", generator=generator)
        ox = torch.randint(0, w + 2 * pad - ow + 1, (n,), device="cpu", generator=generator)
    if flip:
        f = torch.rand(n, device="cpu", generator=generator) < 0.5
    if not crop and f is None:
        return x
    xp = torch.nn.functional.pad(x, (pad, pad, pad, pad)) if pad > 0 else x
    if not crop:
        oy = ox = torch.zeros(n, dtype=torch.long)
    cut = _crop_unfold if x.device.type == "cpu" else _crop_gather
    return cut(xp, oy, ox, f, oh, ow)


def _crop_gather(xp: torch.Tensor, oy: torch.Tensor, ox: torch.Tensor, f: torch.Tensor | None, oh: int,
                 ow: int) -> torch.Tensor:
    """Crop sample i of the padded batch at (oy[i], ox[i]) to oh x ow, flipped where f[i]: one advanced-index gather."""
    n, c = xp.shape[:2]
    dev = xp.device
    rows = (oy.to(dev)[:, None] + torch.arange(oh, device=dev)[None, :])[:, None, :, None]  # n,1,oh,1
    cols = (ox.to(dev)[:, None] + torch.arange(ow, device=dev)[None, :])[:, None, None, :]  # n,1,1,ow
    x = xp[torch.arange(n, device=dev)[:, None, None, None],
           torch.arange(c, device=dev)[None, :, None, None], rows, cols]
    if f is not None:
        x = torch.where(f.to(dev)[:, None, None, None], x.flip(3), x)
    return x


def _crop_unfold(xp: torch.Tensor, oy: torch.Tensor, ox: torch.Tensor, f: torch.Tensor | None, oh: int,
                 ow: int) -> torch.Tensor:
    """The same as ``_crop_gather``, from the view of every oh x ow window of the padded batch (``unfold``, no copy):
    one index over (sample, offset y, offset x) copies whole windows, then the flipped samples are mirrored in place."""
    n = xp.shape[0]
    windows = xp.unfold(2, oh, 1).unfold(3, ow, 1).permute(0, 2, 3, 1, 4, 5)  # n, offsets y, offsets x, c, oh, ow
    out = windows[torch.arange(n, device=xp.device), oy.to(xp.device), ox.to(xp.device)]
    if f is not None:
        fi = f.nonzero().squeeze(1).to(xp.device)
        out[fi] = out[fi].flip(3)
    return out


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
    dataset's frozen samples (they come out bit-identical to the stored images, or to the geometry's evaluation view).
    With a geometry every batch comes out resized and cropped by it (its own ``pad``)."""
    n = len(ds)
    order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
    order = order.to(ds.device)
    stop = n - n % batch_size if (drop_last and n >= batch_size) else n
    for s in range(0, stop, batch_size):
        idx = order[s : s + batch_size]
        if ds.geometry is None:
            xb = ds.x[idx]
            if augment:
                xa = random_crop_flip(xb, pad=pad, flip=hflip, generator=generator)
                xb = xa if ds.frozen is None else torch.where(ds.frozen[idx][:, None, None, None], xb, xa)
        elif augment:
            xb = ds.augmented(idx, hflip=hflip, generator=generator)
            if ds.frozen is not None:
                keep = ds.frozen[idx]
                if bool(keep.any()):
                    xb = torch.where(keep[:, None, None, None], ds.view(idx), xb)
        else:
            xb = ds.view(idx)
        yield xb, ds.y[idx], idx
