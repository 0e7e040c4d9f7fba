"""Adap-Blend (Qi et al., ICLR 2023, "Revisiting the assumption of latent separability for backdoor defenses"):
a blend trigger built to keep the poisoned samples' latent representations close to the clean ones.

Three departures from plain Blended, all from the official code (github.com/Unispac/Circumventing-Backdoor-Defenses,
poison_tool_box/adaptive_blend.py and create_poisoned_set.py; the alphas from the README of its successor
vtu81/backdoor-toolbox: ``-alpha 0.15 -test_alpha 0.2``):

- a low poisoning rate: round(pratio * N) dirty-label samples (official: 0.003), drawn from all classes;
- conservatism ("cover") samples: round(cover_rate * N) OTHER training images (official: cover_rate = 0.003, the
  poison rate) that get the same piece-dropped trigger but keep their TRUE label;
- trigger-piece dropping at training time: the key image is cut into ``trigger_pieces`` cells of a square grid
  (official 16 = 4 x 4) and each poisoned or cover image gets a blend in which round(mask_rate * pieces) random cells
  (official mask_rate 0.5: 8 of 16) are left out, at ``blend_alpha`` (official train alpha 0.15):
  ``x + alpha * mask * (key - x)``. A fresh random mask per image, drawn once (the official code writes the
  poisoned set to disk once).

At test time the FULL trigger at ``blend_test_alpha`` (official 0.2) on every non-target test image (target label).

Choices of this project: the key image is the generated one of Blended (``blend_seed``; the official code blends
Hello Kitty); target 0 (BackdoorBench's convention; the official code uses 0 on CIFAR-10, 2 on GTSRB); counts are
round(rate * N) as every attack here (official: int(rate * N)); the cover samples are drawn from the non-poisoned
images with a seeded stream of ``random_seed``, the pieces of image i from a stream seeded by (random_seed, i), so
the masks do not depend on the order in which images are poisoned. Outputs are truncated to uint8 as Blended
(the official code saves PNGs through torchvision, which rounds).

The record: ``bd_train`` holds the poisoned AND the cover samples as they were trained on (BackdoorBench's layout
for WaNet's cross samples: a cover sample's bd_label is its true label); the cover samples' training indices go into
info.pickle under ``bdsafety.pools.CROSS_KEY``, so RA, QRA, EP and PAM's real samples skip them
(``bdsafety.pools.real_poisoned``).
"""
from __future__ import annotations

import numpy as np

from bdsafety.attacks.base import Attack, register_attack
from bdsafety.attacks.controlled import merged_split
from bdsafety.attacks.triggers import apply_blended, make_blend_key, piece_masks
from bdsafety.config import FRACTION, POS_INT, SEED, Option
from bdsafety.data.poisoned import PoisonedSplit
from bdsafety.errors import ConfigError
from bdsafety.pools import CROSS_KEY

COVER_STREAM = 25_0201  # seed stream of the cover-sample draw (apart from the poison draw's)
PIECE_STREAM = 25_0202  # seed stream of the per-image piece masks


@register_attack
class AdaptiveBlend(Attack):
    name = "adaptive_blend"
    description = ("Adap-Blend attack (ICLR 2023): low-rate blend poisoning with conservatism samples (true label) and "
                   "trigger pieces dropped at training time, full trigger at test time "
                   "(BackdoorBench-compatible record)")
    options = {
        "blend_alpha": Option(0.15, "TRAINING blend ratio of the key image (official: -alpha 0.15)", check=FRACTION),
        "blend_test_alpha": Option(0.2, "TEST blend ratio of the full key image (official: -test_alpha 0.2)",
                                   check=FRACTION),
        "blend_seed": Option(0, "seed of the generated key image (as Blended's)", check=SEED),
        "cover_rate": Option(0.003, "fraction of training samples that get the piece-dropped trigger but keep their "
                                    "TRUE label (conservatism samples; official: -cover_rate 0.003, the poison rate)",
                             check=FRACTION),
        "trigger_pieces": Option(16, "cells of the square grid the trigger is cut into (a square number; official 16)",
                                 check=POS_INT),
        "mask_rate": Option(0.5, "fraction of the cells left out of each training trigger (official 0.5: 8 of 16)",
                            check=FRACTION),
    }

    def prepare(self) -> None:
        c = self.cfg
        k = int(round(np.sqrt(c.trigger_pieces)))
        if k * k != c.trigger_pieces:
            raise ConfigError(f"trigger_pieces must be a square number (official 16 = 4 x 4), got {c.trigger_pieces}")
        h, w, ch = self.stamp_shape
        if h < k or w < k:
            raise ConfigError(f"trigger_pieces {c.trigger_pieces} cuts a {h}x{w} image into cells of no pixels")
        self.key = make_blend_key(h, w, ch, seed=c.blend_seed)
        self.cover_idx = np.zeros(0, np.int64)

    @property
    def dropped_pieces(self) -> int:
        return int(round(self.cfg.mask_rate * self.cfg.trigger_pieces))

    def train_masks(self, indices: np.ndarray) -> np.ndarray:
        """float32 (n, H, W) piece masks of the training images at ``indices`` (one seeded draw per index)."""
        h, w, _ = self.stamp_shape
        c = self.cfg
        if len(indices) == 0:
            return np.zeros((0, h, w), np.float32)
        return np.concatenate([piece_masks(1, h, w, c.trigger_pieces, self.dropped_pieces,
                                           np.random.default_rng([int(c.random_seed), PIECE_STREAM, int(i)]))
                               for i in indices])

    def apply(self, images: np.ndarray, *, split: str, indices: np.ndarray) -> np.ndarray:
        if split == "train":
            alpha = self.cfg.blend_alpha * self.train_masks(indices)[..., None]
        else:
            alpha = self.cfg.blend_test_alpha
        return apply_blended(images, self.key, alpha=alpha)

    def select_cover(self, poison_idx: np.ndarray) -> np.ndarray:
        """round(cover_rate * N) training indices outside ``poison_idx`` (sorted); none for the clean reference."""
        c, n = self.cfg, len(self.ctx.data.train_y)
        n_cover = int(round(c.cover_rate * n))
        if c.pratio == 0 or n_cover == 0:
            return np.zeros(0, np.int64)
        pool = np.setdiff1d(np.arange(n), poison_idx)
        if n_cover > len(pool):
            raise ConfigError(f"cover_rate {c.cover_rate} asks for {n_cover} conservatism samples but only {len(pool)} "
                              f"training images are not poisoned; lower cover_rate or pratio")
        rng = np.random.default_rng([int(c.random_seed), COVER_STREAM])
        return np.sort(rng.choice(pool, size=n_cover, replace=False)).astype(np.int64)

    def make_split(self, split: str, idx: np.ndarray, images: np.ndarray | None = None) -> PoisonedSplit:
        """The test split as every attack's; the TRAINING split is the poisoned samples at ``idx`` merged with the
        conservatism samples (piece-dropped trigger, true label), both as trained on."""
        bd = super().make_split(split, idx, images)
        if split != "train" or images is not None:
            return bd
        d = self.ctx.data
        self.cover_idx = self.select_cover(idx)
        y = d.train_y[self.cover_idx]
        cover_images = (self.apply(self.stamp_input(d.train_x[self.cover_idx]), split="train", indices=self.cover_idx)
                        if len(self.cover_idx) else np.zeros((0, *self.stamp_shape), np.uint8))
        cover = PoisonedSplit(indices=self.cover_idx, images=cover_images, bd_labels=y.copy(), orig_labels=y,
                              length=len(d.train_y))
        return merged_split(bd, cover)

    def info(self) -> dict:
        c = self.cfg
        path = f"{self.ctx.record_root / self.ctx.record_name / 'blend_key.png'}"
        return {"blend_alpha": c.blend_alpha, "blend_test_alpha": c.blend_test_alpha, "blend_seed": c.blend_seed,
                "cover_rate": c.cover_rate, "trigger_pieces": c.trigger_pieces, "mask_rate": c.mask_rate,
                "attack_trigger_img_path": path, CROSS_KEY: [int(i) for i in self.cover_idx]}

    def artifacts(self) -> dict:
        return {"blend_key.png": self.key}

    @classmethod
    def record_trigger(cls, info: dict):
        """The full key image at the record's blend_test_alpha (the key regenerated from blend_seed)."""
        if info.get("blend_test_alpha") is None or info.get("blend_seed") is None or info.get("img_size") is None:
            return None
        h, w, ch = (int(v) for v in info["img_size"])
        key = make_blend_key(h, w, ch, seed=int(info["blend_seed"]))
        alpha = float(info["blend_test_alpha"])
        return lambda images: apply_blended(images, key, alpha=alpha)
