"""Trigger functions: pure functions on uint8 (N, H, W, C) images, applied before normalisation."""
from __future__ import annotations

import numpy as np
import torch

from bdsafety.data.device import pil_resize


def badnet_trigger_mask(h: int, w: int, patch: int = 3) -> np.ndarray:
    """BackdoorBench's BadNets trigger: a ``patch`` x ``patch`` white square at the bottom-right corner."""
    m = np.zeros((h, w), dtype=bool)
    m[h - patch :, w - patch :] = True
    return m


def apply_badnet(images: np.ndarray, patch: int = 3, value: int = 255, native: tuple | None = None) -> np.ndarray:
    """Stamp the BadNets patch on every image (returns a copy).

    ``native`` = (H, W) of the data when ``images`` were resized before stamping (the official fork's 224-px
    protocol): BackdoorBench then resizes its trigger IMAGE (the patch drawn at the data's size) to the images' size
    with PIL's bilinear filter and stamps it as ``img * (t == 0) + t * (t > 0)`` (AddMaskPatchTrigger), so the patch
    keeps its relative size and gets a soft edge whose pixels replace the image with the interpolated values."""
    _check(images)
    _, h, w, c = images.shape
    if native is None or tuple(native) == (h, w):
        out = images.copy()
        out[:, badnet_trigger_mask(h, w, patch)] = value
        return out
    if h != w:
        raise ValueError(f"a resized BadNets trigger needs square images, got {h}x{w}")

    t = np.zeros((*native, c), dtype=np.uint8)
    t[badnet_trigger_mask(native[0], native[1], patch)] = value
    t = pil_resize(torch.from_numpy(t).permute(2, 0, 1)[None], h)[0].permute(1, 2, 0).numpy()
    return np.where(t[None] > 0, t[None], images)


def make_blend_key(h: int, w: int, c: int = 3, seed: int = 0) -> np.ndarray:
    """The Blended attack's key image, made deterministically from ``seed``.

    BackdoorBench blends a photo (Hello Kitty); we cannot ship that, so the key is a smooth random colour field
    plus fine noise: image-like (low and high frequencies), full-frame, reproducible, stored with the record.
    """
    rng = np.random.default_rng(seed)
    coarse = rng.uniform(0, 255, (4, 4, c)).astype(np.float32)
    import cv2  # lazy: opencv only to write/read image files here

    smooth = cv2.resize(coarse, (w, h), interpolation=cv2.INTER_CUBIC).reshape(h, w, c)
    key = 0.7 * smooth + 0.3 * rng.uniform(0, 255, (h, w, c))
    return np.clip(key, 0, 255).astype(np.uint8)


def apply_blended(images: np.ndarray, key: np.ndarray, alpha: float | np.ndarray = 0.2) -> np.ndarray:
    """(1 - alpha) * image + alpha * key, truncated to uint8 as BackdoorBench does. ``alpha``: a number, or a float
    array broadcastable to (N, H, W, 1) (a per-pixel blend, e.g. Adap-Blend's pieces: alpha * mask)."""
    _check(images)
    if key.shape != images.shape[1:]:
        raise ValueError(f"blend key shape {key.shape} does not match image shape {images.shape[1:]}")
    if isinstance(alpha, np.ndarray):  # a number stays a Python float: the scalar path is bit-identical to before
        alpha = alpha.astype(np.float32)
    out = (1.0 - alpha) * images.astype(np.float32) + alpha * key.astype(np.float32)[None]
    return np.clip(out, 0, 255).astype(np.uint8)


def piece_masks(n_masks: int, h: int, w: int, pieces: int = 16, drop: int = 8,
                rng: np.random.Generator | None = None) -> np.ndarray:
    """Adap-Blend's trigger pieces (Qi et al., ICLR 2023): float32 (n_masks, H, W) maps, each 1 on the image except on
    ``drop`` of the ``pieces`` cells of a sqrt(pieces) x sqrt(pieces) grid, chosen at random (without replacement)
    for each map. Cell edges are round(i * H / k); for H divisible by k they are the official i * H // k."""
    k = int(round(np.sqrt(pieces)))
    if k * k != pieces or not 0 <= drop <= pieces:
        raise ValueError(f"pieces must be a square number and 0 <= drop <= pieces, got pieces {pieces}, drop {drop}")
    rng = np.random.default_rng() if rng is None else rng
    ys = np.round(np.arange(k + 1) * h / k).astype(int)
    xs = np.round(np.arange(k + 1) * w / k).astype(int)
    out = np.ones((n_masks, h, w), dtype=np.float32)
    for m in range(n_masks):
        for cell in rng.choice(pieces, size=drop, replace=False):
            r, c = divmod(int(cell), k)
            out[m, ys[r]:ys[r + 1], xs[c]:xs[c + 1]] = 0.0
    return out


def apply_additive(images: np.ndarray, pattern: np.ndarray, scale: float = 1.0) -> np.ndarray:
    """image + scale * pattern (float, pixel units 0-255, shape (H, W, C)), clipped to [0, 255] and ROUNDED to uint8
    (rounding keeps |out - image| <= scale * max|pattern| for integer images)."""
    _check(images)
    if pattern.shape != images.shape[1:]:
        raise ValueError(f"pattern shape {pattern.shape} does not match image shape {images.shape[1:]}")
    out = images.astype(np.float32) + np.float32(scale) * pattern.astype(np.float32)[None]
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def sig_pattern(h: int, w: int, c: int = 3, delta: float = 40, f: float = 6) -> np.ndarray:
    """SIG's horizontal sinusoid (Barni et al., 2019; BackdoorBench's sigTriggerAttack): float32 (H, W, C) with
    value delta * sin(2 pi j f / W) at column j, the same in every row and channel."""
    col = delta * np.sin(2 * np.pi * np.arange(w) * f / w)
    return np.broadcast_to(col[None, :, None], (h, w, c)).astype(np.float32)


def apply_sig(images: np.ndarray, delta: float = 40, f: float = 6) -> np.ndarray:
    """image + the SIG sinusoid, clipped to [0, 255] and truncated to uint8 as BackdoorBench does."""
    _check(images)
    n, h, w, c = images.shape
    # float32 pattern, float64 sum: as BackdoorBench
    out = images.astype(np.float64) + sig_pattern(h, w, c, delta, f)[None]
    return np.clip(out, 0, 255).astype(np.uint8)


# The label-consistent attack's "all-corners" trigger (Turner et al., 2019; BackdoorBench's
# labelConsistentAttack): a 3x3 +/-1 checkerboard in each corner, defined on a 32x32 grid. Top-left block; the
# bottom-left block is the same, both right-hand blocks are its left-right mirror.
_LC_BLOCK = np.array([[1, -1, -1], [-1, 1, -1], [1, -1, 1]], dtype=np.float32)


def lc_corner_mask(h: int = 32, w: int = 32) -> np.ndarray:
    """float32 (H, W) map in {-1, 0, +1} of the four-corner trigger. Other sizes: the 32x32 map resized with
    nearest neighbours (BackdoorBench does the same)."""
    m = np.zeros((32, 32), dtype=np.float32)
    m[:3, :3] = _LC_BLOCK
    m[-3:, :3] = _LC_BLOCK
    m[:3, -3:] = _LC_BLOCK[:, ::-1]
    m[-3:, -3:] = _LC_BLOCK[:, ::-1]
    if (h, w) == (32, 32):
        return m
    rows = np.floor(np.arange(h) * 32 / h).astype(int)
    cols = np.floor(np.arange(w) * 32 / w).astype(int)
    return m[rows][:, cols]


def apply_lc_corners(images: np.ndarray, amplitude: float = 1.0) -> np.ndarray:
    """image + 255 * amplitude * corner map, clipped (amplitude 1: the +1 pixels turn white, the -1 pixels black,
    in every channel; BackdoorBench's reduced_amplitude)."""
    _check(images)
    n, h, w, c = images.shape
    add = 255.0 * amplitude * lc_corner_mask(h, w)
    out = images.astype(np.float32) + add[None, :, :, None]
    return np.clip(out, 0, 255).astype(np.uint8)


def _check(images: np.ndarray):
    if images.dtype != np.uint8 or images.ndim != 4:
        raise ValueError("triggers take uint8 images of shape (N, H, W, C)")
