"""Which samples get poisoned, and which label they get (BackdoorBench's conventions)."""
from __future__ import annotations

import numpy as np

from bdsafety.errors import ConfigError

LABEL_TRANS = ("all2one", "all2all")


def backdoor_labels(y: np.ndarray, label_trans: str, target: int, num_classes: int) -> np.ndarray:
    """all2one: every poisoned sample -> ``target``; all2all: y -> (y + 1) % num_classes."""
    y = np.asarray(y, dtype=np.int64)
    if label_trans == "all2one":
        return np.full_like(y, target)
    if label_trans == "all2all":
        return (y + 1) % num_classes
    raise ConfigError(f"unknown attack_label_trans {label_trans!r}; valid: {', '.join(LABEL_TRANS)}")


def select_train_poison(y: np.ndarray, pratio: float, *, label_trans: str = "all2one", target: int = 0,
                        clean_label: bool = False, seed: int = 0) -> np.ndarray:
    """Sorted indices of the training samples to poison.

    Dirty-label: round(pratio * N) indices drawn from all classes (target class included).
    Clean-label (SIG, LC): drawn from the target class only, pratio still defined over the whole train set.
    pratio 0 gives an empty array (the clean reference model); a positive pratio that rounds to zero
    samples is an error rather than a silent clean run.
    """
    y = np.asarray(y)
    if not 0.0 <= pratio <= 1.0:
        raise ConfigError(f"pratio must lie in [0, 1], got {pratio}")
    n_poison = int(round(pratio * len(y)))
    if pratio == 0:
        return np.zeros(0, dtype=np.int64)
    pool = np.flatnonzero(y == target) if clean_label else np.arange(len(y))
    if n_poison == 0:
        raise ConfigError(f"pratio {pratio} poisons 0 of {len(y)} training samples; raise pratio to at least "
                         f"{1 / len(y):.2g} (or use pratio 0 on purpose for a clean reference model)")
    if n_poison > len(pool):
        raise ConfigError(f"pratio {pratio} asks for {n_poison} poisoned samples but only {len(pool)} are eligible "
                          f"({'target-class samples, clean-label attack' if clean_label else 'training samples'}); the "
                          f"largest pratio possible here is {len(pool) / len(y):.4g}"
                          f"{' (or choose a larger target class)' if clean_label else ''}")
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(pool, size=n_poison, replace=False)).astype(np.int64)


def select_test_poison(y: np.ndarray, *, label_trans: str = "all2one", target: int = 0) -> np.ndarray:
    """all2one: every non-target test sample; all2all: every test sample."""
    y = np.asarray(y)
    if label_trans == "all2one":
        return np.flatnonzero(y != target).astype(np.int64)
    return np.arange(len(y), dtype=np.int64)
