"""What WaNet and Input-Aware share: BackdoorBench's per-batch poisoning layout and their records' extra parts.

Both attacks poison on the fly in the training loop: in every batch of ``bs`` samples the first
``num_bd = int(pratio * bs)`` become backdoor samples (backdoor label) and the next ``num_cross`` become "cross"
(noise) samples that keep their TRUE label (WaNet: a randomly perturbed warp; Input-Aware: the trigger of another
image). Batches are shuffled, so these are random samples each epoch. Below 1 / bs, BackdoorBench's
``generalize_to_lower_pratio`` poisons one sample in a batch with probability pratio * bs.

After training, BackdoorBench writes ``bd_train`` from one UNSHUFFLED pass over the training set with the same
layout, so bd_train holds the backdoor samples AND the cross samples (the latter with bd_label == their true label);
``final_pass_layout`` reproduces which indices are which. The cross samples are not poisoned samples: their training
indices go into info.pickle under ``bdsafety.pools.CROSS_KEY`` and every consumer of real poisoned samples (RA, QRA,
EP, PAM ``pam_source: real``) skips them (bdsafety.pools.real_poisoned).
"""
from __future__ import annotations

import numpy as np
import torch

from bdsafety.data.poisoned import PoisonedSplit


def num_poison_in_batch(pratio: float, bs: int, generator: torch.Generator | None = None) -> int:
    """BackdoorBench's ``int(generalize_to_lower_pratio(pratio, bs))``."""
    if pratio * bs >= 1:
        return int(pratio * bs)
    if pratio <= 0:
        return 0
    return int(float(torch.rand((), generator=generator)) < pratio * bs)


def final_pass_layout(n: int, batch_size: int, pratio: float, cross_ratio: float, seed: int = 0):
    """(backdoor indices, cross indices) of BackdoorBench's unshuffled bd_train pass over ``n`` training samples:
    in each batch the first num_bd positions are backdoor samples, the next int(num_bd * cross_ratio) cross samples."""
    gen = torch.Generator().manual_seed(int(seed))
    bd, cross = [], []
    for start in range(0, n, batch_size):
        bs = min(batch_size, n - start)
        nb = num_poison_in_batch(pratio, bs, gen)
        nc = min(int(nb * cross_ratio), bs - nb)
        bd.append(np.arange(start, start + nb))
        cross.append(np.arange(start + nb, start + nb + nc))
    return np.concatenate(bd).astype(np.int64), np.concatenate(cross).astype(np.int64)


def to_uint8(x01: torch.Tensor) -> np.ndarray:
    """[0, 1] float (N, C, H, W) -> uint8 (N, H, W, C), rounded (BackdoorBench stores these images as PNG)."""
    return (x01.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def merged_split(bd: PoisonedSplit, cross: PoisonedSplit) -> PoisonedSplit:
    """One bd_train holding the backdoor and the cross samples, sorted by training index (BackdoorBench's layout)."""
    idx = np.concatenate([bd.indices, cross.indices])
    order = np.argsort(idx, kind="stable")
    return PoisonedSplit(idx[order], np.concatenate([bd.images, cross.images])[order],
                         np.concatenate([bd.bd_labels, cross.bd_labels])[order],
                         np.concatenate([bd.orig_labels, cross.orig_labels])[order], bd.length)


def cross_test_artifacts(images: np.ndarray, labels: np.ndarray) -> dict:
    """BackdoorBench's cross_test_dataset/<label>/<idx>.png (every test image, cross-triggered, true label)."""
    return {f"cross_test_dataset/{int(y)}/{i}.png": img for i, (img, y) in enumerate(zip(images, labels))}
