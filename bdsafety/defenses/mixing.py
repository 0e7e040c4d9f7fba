"""The one batch-mixing helper: replace part of every training batch by backdoor-like samples.

EP, PAM and BTI-DBF(U) all train on batches in which a fraction ``p_rev`` of the (already shuffled) reserved
clean images is replaced by triggered images carrying their TRUE labels. They differ only in where the
triggered images come from, which is a *replacer* ``replace(x01, y) -> (x01', y')`` working in [0, 1] pixel space:

  * ``generator_replacer(G, apply)``: G(x), the BTI-DBF inverted-trigger generator (PAM, BTI-DBF(U));
  * ``pool_replacer(pool)``: random REAL poisoned training samples of the attack with their true labels (EP,
    PAM ``pam_source: real``), drawn from the DEFENDER's part of the record's poisoned pool (bdsafety.pools).
    Pool samples are not augmented (as the retuning attack's poisoned samples are not) unless ``augment``.

and in how many they replace (``count``): 'round' = round(p_rev * B) (PAM's and EP's official code),
'bti' = min(B, int(p_rev * B + 1)) (BTI-DBF's official unlearning loop).
"""
from __future__ import annotations

from typing import Callable

import torch

from bdsafety.data.device import DeviceDataset
from bdsafety.errors import ConfigError, DataError

COUNTS = ("round", "bti")


def mix_count(p_rev: float, n: int, count: str = "round") -> int:
    """How many of a batch of ``n`` are replaced."""
    if count == "round":
        return int(round(p_rev * n))
    if count == "bti":
        return min(n, int(p_rev * n + 1))
    raise ValueError(f"unknown mix count rule {count!r}; valid: {', '.join(COUNTS)}")


def mixing_batch_fn(norm, p_rev: float, replace: Callable, *, count: str = "round", keep_clean: bool = False) -> Callable:
    """``engine.fit`` batch_fn: the first ``mix_count`` images of each (already shuffled) batch go through
    ``replace``; everything is then normalised. ``keep_clean`` returns ``((norm(clean), norm(mixed)), y)`` (the
    feature-alignment loss of BTI-DBF(U) needs both views)."""
    if not 0.0 <= p_rev <= 1.0:
        raise ConfigError(f"p_rev is the fraction of each batch replaced by backdoor-like samples and must be in [0, 1], got {p_rev}")

    def fn(xb, y, idx):
        x01 = xb.float().div_(255.0)
        k = mix_count(p_rev, len(y), count)
        x_mix = x01.clone() if keep_clean else x01
        if k > 0:
            y = y.clone()
            xr, yr = replace(x01[:k], y[:k])
            x_mix[:k] = xr.to(x01.dtype)
            y[:k] = yr
        if keep_clean:
            return (norm(x01), norm(x_mix)), y
        return norm(x_mix), y

    return fn


def generator_replacer(G: torch.nn.Module, apply: Callable) -> Callable:
    """x -> G(x) with the TRUE labels kept; ``apply(G, x01)`` runs G on a [0,1] batch and returns [0,1] images."""

    def replace(x01, y):
        was = G.training
        G.eval()
        with torch.no_grad():
            out = apply(G, x01).clamp(0.0, 1.0)
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
    from bdsafety.pools import poisoned_pool

    split, _, _ = poisoned_pool(exp, None, purpose, "defender")
    return exp.dataset(split.images, split.orig_labels), split
