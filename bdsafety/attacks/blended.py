"""Blended (Chen et al., 2017): alpha-blend a fixed key image over the whole picture, dirty label.

BackdoorBench blends a photo (Hello Kitty) that cannot be shipped here; the key is a deterministic image-like
pattern made from ``blend_seed`` (bdsafety.attacks.triggers.make_blend_key), saved in the record as blend_key.png.
"""
from __future__ import annotations

import numpy as np

from bdsafety.attacks.base import Attack, register_attack
from bdsafety.attacks.triggers import apply_blended, make_blend_key
from bdsafety.config import FRACTION, SEED, Option


@register_attack
class Blended(Attack):
    name = "blended"
    description = "Blended attack: alpha-blend of a fixed key image, dirty label (BackdoorBench-compatible record)"
    options = {
        "blend_alpha": Option(0.2, "blend ratio of the key image", check=FRACTION),
        "blend_seed": Option(0, "seed of the generated key image", check=SEED),
    }

    resizable = True

    def prepare(self) -> None:
        # with input_resize the key is made at the resized size (BackdoorBench resizes its photo)
        h, w, c = self.stamp_shape
        self.key = make_blend_key(h, w, c, seed=self.cfg.blend_seed)

    def apply(self, images: np.ndarray, *, split: str, indices: np.ndarray) -> np.ndarray:
        return apply_blended(images, self.key, alpha=self.cfg.blend_alpha)

    def info(self) -> dict:
        path = f"{self.ctx.record_root / self.ctx.record_name / 'blend_key.png'}"
        return {"blend_alpha": self.cfg.blend_alpha, "blend_seed": self.cfg.blend_seed, "attack_trigger_img_path": path}

    def artifacts(self) -> dict:
        return {"blend_key.png": self.key}
