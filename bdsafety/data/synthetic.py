"""The embedded ``synthetic`` dataset: CIFAR-shaped (32x32x3, 10 classes), generated deterministically in seconds.

Each class is a shape (filled circle, square, triangle, plus, ring, horizontal stripes, vertical stripes,
hollow square, two dots, X) drawn with a random colour, size and position over a random two-colour textured
background, plus pixel noise. Every class is invariant under horizontal flips, so the standard train
augmentation (random crop + flip) keeps labels valid. Pixel values stay within [0, 235]: a pure-white
trigger patch (BadNets) never occurs naturally, as in real photos it rarely does at one corner.
"""
from __future__ import annotations

import numpy as np

from bdsafety.data.info import DATASETS
from bdsafety.errors import DataError

CLASSES = ["circle", "square", "triangle", "plus", "ring", "hstripes", "vstripes", "frame", "dots", "cross"]
_MAX_VALUE = 235


def _shape_mask(cls: int, yy: np.ndarray, xx: np.ndarray, cy: float, cx: float, r: float) -> np.ndarray:
    dy, dx = yy - cy, xx - cx
    ady, adx = np.abs(dy), np.abs(dx)
    w = max(1.5, r / 3.5)  # stroke width
    if cls == 0:
        return dy**2 + dx**2 <= r**2
    if cls == 1:
        return (ady <= r * 0.85) & (adx <= r * 0.85)
    if cls == 2:  # isosceles triangle pointing up
        return (dy <= r * 0.8) & (dy >= -r) & (adx <= (dy + r) * 0.6)
    if cls == 3:
        return ((ady <= w / 2) & (adx <= r)) | ((adx <= w / 2) & (ady <= r))
    if cls == 4:
        d = np.sqrt(dy**2 + dx**2)
        return (d <= r) & (d >= r - w)
    if cls == 5:
        return (ady <= r) & (adx <= r) & (np.floor((dy + r) / w).astype(int) % 2 == 0)
    if cls == 6:
        return (ady <= r) & (adx <= r) & (np.floor((dx + r) / w).astype(int) % 2 == 0)
    if cls == 7:
        outer = (ady <= r) & (adx <= r)
        return outer & ~((ady <= r - w) & (adx <= r - w))
    if cls == 8:
        rr = r * 0.4
        return ((dy**2 + (dx - r * 0.6) ** 2) <= rr**2) | ((dy**2 + (dx + r * 0.6) ** 2) <= rr**2)
    if cls == 9:
        return ((np.abs(dy - dx) <= w * 0.75) | (np.abs(dy + dx) <= w * 0.75)) & (ady <= r) & (adx <= r)
    raise ValueError(cls)


def _render(labels: np.ndarray, rng: np.random.Generator, size: int) -> np.ndarray:
    n = len(labels)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    out = np.empty((n, size, size, 3), dtype=np.uint8)
    for i, cls in enumerate(labels):
        bg1 = rng.uniform(20, 215, 3)
        bg2 = np.clip(bg1 + rng.normal(0, 30, 3), 0, 235)
        # low-frequency background texture: a random plane wave blends two background colours
        theta, freq, phase = rng.uniform(0, np.pi), rng.uniform(0.05, 0.35), rng.uniform(0, 2 * np.pi)
        t = 0.5 + 0.5 * np.sin(freq * (np.cos(theta) * xx + np.sin(theta) * yy) + phase)
        img = bg1 * (1 - t[..., None]) + bg2 * t[..., None]
        # shape colour: far enough from the mean background to stay visible
        while True:
            fg = rng.uniform(0, 235, 3)
            if np.abs(fg - (bg1 + bg2) / 2).sum() > 150:
                break
        r = rng.uniform(size * 0.22, size * 0.36)
        cy, cx = rng.uniform(size * 0.35, size * 0.65, 2)
        mask = _shape_mask(int(cls), yy, xx, cy, cx, r)
        img[mask] = fg
        img += rng.normal(0, 10, img.shape)
        out[i] = np.clip(img, 0, _MAX_VALUE).astype(np.uint8)
    return out


def make_synthetic(n_train: int = 5000, n_test: int = 1000, seed: int = 0, size: int = 32):
    """Build the synthetic dataset; the same (n_train, n_test, seed) always gives the same arrays.

    Classes are balanced (labels cycle 0..9, then are shuffled with the seed).
    """
    from bdsafety.data.datasets import CleanData  # local import: datasets imports this module lazily too

    if n_train < 10 or n_test < 10:
        raise DataError("synthetic dataset needs at least 10 train and 10 test images (one per class)")
    rng = np.random.default_rng(seed)
    splits = []
    for n in (n_train, n_test):
        labels = rng.permutation(np.arange(n) % 10).astype(np.int64)
        splits.append((_render(labels, rng, size), labels))
    info = DATASETS["synthetic"]
    if size != 32:
        from bdsafety.data.info import DatasetInfo

        info = DatasetInfo("synthetic", 10, (size, size, 3), info.mean, info.std, info.hflip)
    (tx, ty), (vx, vy) = splits
    return CleanData(train_x=tx, train_y=ty, test_x=vx, test_y=vy, info=info, classes=list(CLASSES))
