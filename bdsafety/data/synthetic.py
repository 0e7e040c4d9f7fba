"""The embedded ``synthetic`` dataset: CIFAR-shaped (32x32x3, 10 classes), generated deterministically in seconds.

Each class is a shape (filled circle, square, triangle, plus, ring, horizontal stripes, vertical stripes,
hollow square, two dots, X) drawn with a random colour, size and position over a random two-colour textured
background, plus pixel noise. Every class is invariant under horizontal flips, so the standard train
augmentation (random crop + flip) keeps labels valid. Pixel values stay within [0, 235]: a pure-white
trigger patch (BadNets) never occurs naturally, as in real photos it rarely does at one corner.

``difficulty`` (0 to 1) makes the task harder without changing any label: 0 is the original generator, image for
image (the per-image loop below, kept as it was); above 0 a vectorised renderer draws, scaled by the difficulty,
smaller objects anywhere nearer the border, a lower shape/background contrast, stronger noise, smaller
half-transparent distractor shapes of other classes, thin half-transparent clutter lines and an opaque bar across
the image that may hide part of the object. The class is always the one opaque shape, larger than every distractor
(at most 0.6 of its radius); every added element is drawn from a flip-symmetric distribution, so a horizontally
flipped image is still a valid image of its class.
"""
from __future__ import annotations

import numpy as np

from bdsafety.data.info import DATASETS, CleanData, DatasetInfo
from bdsafety.errors import DataError

CLASSES = ["circle", "square", "triangle", "plus", "ring", "hstripes", "vstripes", "frame", "dots", "cross"]
_MAX_VALUE = 235
GENERATOR_VERSION = 1  # bump when any image changes, so on-disk caches of generated data are rebuilt


def _shape_mask(cls: int, yy: np.ndarray, xx: np.ndarray, cy, cx, r) -> np.ndarray:
    """Pixels of shape ``cls`` centred at (cy, cx) with radius r; cy, cx, r are floats or (m, 1, 1) arrays (one
    shape per image, the result is then (m, H, W))."""
    dy, dx = yy - cy, xx - cx
    ady, adx = np.abs(dy), np.abs(dx)
    w = np.maximum(1.5, r / 3.5)  # stroke width
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


_CHUNK = 2048  # images rendered at once by the vectorised renderer (fixed: the random stream depends on it)
_N_DISTRACTORS = 3  # distractor slots per image, each filled with probability = difficulty
_N_LINES = 3  # clutter-line slots per image, likewise


def _masks_by_class(classes: np.ndarray, yy, xx, cy, cx, r) -> np.ndarray:
    """(m, H, W) masks, image i showing shape classes[i]; cy, cx, r: (m,) arrays."""
    masks = np.zeros((len(classes),) + yy.shape, dtype=bool)
    for c in np.unique(classes):
        sel = classes == c
        masks[sel] = _shape_mask(int(c), yy, xx, cy[sel, None, None], cx[sel, None, None], r[sel, None, None])
    return masks


def _blend(img: np.ndarray, mask: np.ndarray, colour: np.ndarray, alpha) -> None:
    """img[mask] <- (1 - alpha) img + alpha colour, per image (colour (m, 3), alpha (m,) or a float), in place."""
    i, y, x = np.nonzero(mask)
    a = np.broadcast_to(np.asarray(alpha, dtype=np.float32), (len(img),))[i, None]
    img[i, y, x] = (1 - a) * img[i, y, x] + a * colour[i]


def _render_hard_chunk(labels: np.ndarray, rng: np.random.Generator, size: int, d: float) -> np.ndarray:
    m = len(labels)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    # textured background as in _render; the texture's contrast and frequency grow with d
    bg1 = rng.uniform(20, 215, (m, 3))
    bg2 = np.clip(bg1 + rng.normal(0, 30 + 30 * d, (m, 3)), 0, _MAX_VALUE)
    theta, phase = rng.uniform(0, np.pi, (m, 1, 1)), rng.uniform(0, 2 * np.pi, (m, 1, 1))
    freq = rng.uniform(0.05, 0.35 + 0.5 * d, (m, 1, 1))
    theta, phase, freq = (a.astype(np.float32) for a in (theta, phase, freq))  # float32 from here: speed
    t = (0.5 + 0.5 * np.sin(freq * (np.cos(theta) * xx + np.sin(theta) * yy) + phase))[..., None]
    img = bg1.astype(np.float32)[:, None, None, :] * (1 - t) + bg2.astype(np.float32)[:, None, None, :] * t
    # the object: smaller, nearer the border and closer in colour to the background as d grows
    r = rng.uniform(size * (0.22 - 0.08 * d), size * (0.36 - 0.06 * d), m)
    cy, cx = (rng.uniform(size * (0.35 - 0.15 * d), size * (0.65 + 0.15 * d), (2, m)))
    # clutter: thin lines at a uniform angle (a flip-symmetric distribution), half transparent
    for _ in range(_N_LINES):
        on = rng.random(m) < d
        ang, off = (rng.uniform(lo, hi, (m, 1, 1)).astype(np.float32) for lo, hi in ((0, np.pi), (-size / 2, size / 2)))
        dist = np.abs(np.cos(ang) * (xx - size / 2) + np.sin(ang) * (yy - size / 2) - off)
        _blend(img, (dist <= 0.6) & on[:, None, None], rng.uniform(0, _MAX_VALUE, (m, 3)), rng.uniform(0.3, 0.7, m))
    # distractors: shapes of other classes, at most 0.6 of the object's radius, half transparent, anywhere
    for _ in range(_N_DISTRACTORS):
        on = rng.random(m) < d
        cls = (labels + rng.integers(1, 10, m)) % 10
        rd = r * rng.uniform(0.3, 0.6, m)
        dy, dx = rng.uniform(0.1 * size, 0.9 * size, (2, m))
        mask = _masks_by_class(cls, yy, xx, dy, dx, rd) & on[:, None, None]
        _blend(img, mask, rng.uniform(0, _MAX_VALUE, (m, 3)), rng.uniform(0.3, 0.6, m))
    # the object's colour: an L1 distance c from the mean background, in a random direction
    v = rng.uniform(-1, 1, (m, 3))
    v /= np.abs(v).sum(1, keepdims=True)
    c = rng.uniform(150 - 100 * d, 240 - 100 * d, m)
    fg = np.clip((bg1 + bg2) / 2 + v * c[:, None], 0, _MAX_VALUE)
    _blend(img, _masks_by_class(labels, yy, xx, cy, cx, r), fg, 1.0)
    # occlusion: a horizontal or vertical bar across the image, over the object, with probability 0.6 d
    on = rng.random(m) < 0.6 * d
    vertical = rng.random(m) < 0.5
    pos = rng.uniform(0.2 * size, 0.8 * size, m)[:, None, None]
    half = (rng.uniform(0.5, 0.5 + 0.2 * r))[:, None, None]
    bar = np.where(vertical[:, None, None], np.abs(xx - pos) <= half, np.abs(yy - pos) <= half) & on[:, None, None]
    _blend(img, bar, rng.uniform(0, _MAX_VALUE, (m, 3)), 1.0)
    img += rng.standard_normal(img.shape, dtype=np.float32) * np.float32(10 + 15 * d)
    return np.clip(img, 0, _MAX_VALUE).astype(np.uint8)


def _render_hard(labels: np.ndarray, rng: np.random.Generator, size: int, d: float) -> np.ndarray:
    return np.concatenate([_render_hard_chunk(labels[i:i + _CHUNK], rng, size, d)
                           for i in range(0, len(labels), _CHUNK)])


def make_synthetic(n_train: int = 5000, n_test: int = 1000, seed: int = 0, size: int = 32, difficulty: float = 0.0):
    """Build the synthetic dataset; the same (n_train, n_test, seed, size, difficulty) always gives the same arrays.

    Classes are balanced (labels cycle 0..9, then are shuffled with the seed). ``difficulty`` in [0, 1]: 0 is the
    original easy task (bit for bit); see the module docstring for what grows with it.
    """
    if n_train < 10 or n_test < 10:
        raise DataError("synthetic dataset needs at least 10 train and 10 test images (one per class)")
    difficulty = float(difficulty)
    if not 0.0 <= difficulty <= 1.0:
        raise DataError(f"synthetic difficulty must be in [0, 1], got {difficulty}")
    rng = np.random.default_rng(seed)
    splits = []
    for n in (n_train, n_test):
        labels = rng.permutation(np.arange(n) % 10).astype(np.int64)
        images = _render(labels, rng, size) if difficulty == 0 else _render_hard(labels, rng, size, difficulty)
        splits.append((images, labels))
    (tx, ty), (vx, vy) = splits
    return synthetic_data(tx, ty, vx, vy)


def synthetic_data(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray):
    """The CleanData of generated (or cached) synthetic arrays."""

    size = train_x.shape[1]
    info = DATASETS["synthetic"]
    if size != 32:

        info = DatasetInfo("synthetic", 10, (size, size, 3), info.mean, info.std, info.hflip)
    return CleanData(train_x=train_x, train_y=train_y, test_x=test_x, test_y=test_y, info=info, classes=list(CLASSES))
