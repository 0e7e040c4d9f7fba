"""The one batch-mixing helper: replace part of every training batch by backdoor-like samples.

EP, PAM and BTI-DBF(U) all train on batches in which a fraction ``p_rev`` of the (already shuffled) reserved
clean images is replaced by triggered images carrying their TRUE labels. They differ only in where the
triggered images come from, which is a *replacer* ``replace(x, y) -> (x', y')``:

  * ``generator_replacer(G, apply)``: G(x), the BTI-DBF inverted-trigger generator (PAM, BTI-DBF(U)); it works on
    NORMALISED images (``space='normalized'``) and its outputs are used as they are, neither clamped nor quantised
    (the official unlearning loops feed G's output to the classifier directly);
  * ``pool_replacer(pool)``: random REAL poisoned training samples of the attack with their true labels (EP,
    PAM ``pam_source: real``), drawn from the DEFENDER's part of the record's poisoned pool (bdsafety.pools), in
    [0, 1] pixel space (``space='pixel'``, normalised afterwards). Pool samples are not augmented (as the retuning
    attack's poisoned samples are not) unless ``augment``.

and in how many they replace (``count``): 'bti' = min(B, int(p_rev * B + 1)) (the official unlearning loops of
BTI-DBF(U) and PAM, both in fine_tune/BTIDBF/btidbfu.py: ``int(0.2 * B + 1)``), 'round' = round(p_rev * B) (EP,
whose code the paper's repository does not contain; at B = 128 both give 26).
"""
from __future__ import annotations

from typing import Callable

import torch

from bdsafety.data.device import DeviceDataset
from bdsafety.errors import ConfigError, DataError
from bdsafety.pools import poisoned_pool

COUNTS = ("round", "bti")


def mix_count(p_rev: float, n: int, count: str = "round") -> int:
    """How many of a batch of ``n`` are replaced; none when ``p_rev`` is 0 (the official loops hard-code 0.2, so their
    "+ 1" is not meant to mix one image into a clean-only ablation)."""
    if p_rev == 0:
        return 0
    if count == "round":
        return int(round(p_rev * n))
    if count == "bti":
        return min(n, int(p_rev * n + 1))
    raise ValueError(f"unknown mix count rule {count!r}; valid: {', '.join(COUNTS)}")


SPACES = ("pixel", "normalized")


def mixing_batch_fn(norm, p_rev: float, replace: Callable, *, count: str = "round", keep_clean: bool = False,
                    space: str = "pixel") -> Callable:
    """``engine.fit`` batch_fn: the first ``mix_count`` images of each (already shuffled) batch go through
    ``replace``, which works in ``space``: 'pixel' ([0, 1] images in, [0, 1] images out, normalised afterwards) or
    'normalized' (normalised images in and out, used as they are). ``keep_clean`` returns
    ``((norm(clean), norm(mixed)), y)`` (the feature-alignment loss of BTI-DBF(U) needs both views)."""
    if not 0.0 <= p_rev <= 1.0:
        raise ConfigError(f"p_rev is the fraction of each batch replaced by backdoor-like samples and must be "
                          f"in [0, 1], got {p_rev}")
    if space not in SPACES:
        raise ValueError(f"unknown replacer space {space!r}; valid: {', '.join(SPACES)}")

    def fn(xb, y, idx):
        x01 = xb.float().div_(255.0)
        k = mix_count(p_rev, len(y), count)
        xn = norm(x01)
        x_mix = xn.clone() if keep_clean else xn
        if k > 0:
            y = y.clone()
            if space == "pixel":
                xr, yr = replace(x01[:k], y[:k])
                xr = norm(xr.to(x01.dtype))
            else:
                xr, yr = replace(xn[:k], y[:k])
            x_mix[:k] = xr.to(xn.dtype)
            y[:k] = yr
        if keep_clean:
            return (xn, x_mix), y
        return x_mix, y

    return fn


def generator_replacer(G: torch.nn.Module, apply: Callable) -> Callable:
    """xn -> G(xn) with the TRUE labels kept, in NORMALISED space (use with ``space='normalized'``); ``apply(G, xn)``
    runs G on a normalised batch. G's outputs are not clamped (the official code uses them as they are)."""

    def replace(xn, y):
        was = G.training
        G.eval()
        with torch.no_grad():
            out = apply(G, xn)
        G.train(was)
        return out, y

    return replace


def pool_replacer(pool: DeviceDataset, generator: torch.Generator | None = None, *, augment: bool = False,
                  hflip: bool = True, what: str = "the defense") -> Callable:
    """Replace samples by random ``pool`` samples with the pool's labels: drawn without replacement within a
    batch when the pool is large enough (with replacement otherwise), fresh every batch."""
    n = len(pool)
    if n == 0:
        raise DataError(f"{what} needs real poisoned training samples, but the pool is empty")

    def replace(x01, y):
        k = len(y)
        j = torch.randperm(n, generator=generator)[:k] if k <= n else torch.randint(n, (k,), generator=generator)
        j = j.to(pool.device)
        xp = pool.augmented(j, hflip=hflip, generator=generator) if augment else pool.view(j)
        return xp.float().div_(255.0), pool.y[j]

    return replace


def true_label_pool(exp, purpose: str) -> tuple[DeviceDataset, "object"]:
    """The defender's part of the record's real poisoned training samples, labelled with their TRUE labels, and
    that PoisonedSplit (its ``indices`` are written to the run's log)."""

    split, _, _ = poisoned_pool(exp, None, purpose, "defender")
    return exp.dataset(split.images, split.orig_labels), split
