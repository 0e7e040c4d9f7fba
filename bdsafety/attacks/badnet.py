"""BadNets (Gu et al., 2017) as BackdoorBench runs it: a white square at the bottom-right corner, dirty label."""
from __future__ import annotations

import numpy as np

from bdsafety.attacks.base import Attack, register_attack
from bdsafety.attacks.triggers import apply_badnet
from bdsafety.config import POS_INT, Option


@register_attack
class BadNets(Attack):
    name = "badnet"
    description = ("BadNets attack: a white patch at the bottom-right corner, "
                   "dirty label (BackdoorBench-compatible record)")
    options = {"patch_size": Option(3, "side of the white square at the bottom-right corner (in pixels of the data's "
                                       "own size; with input_resize the square is resized with the image)",
                                    check=POS_INT)}
    resizable = True

    def apply(self, images: np.ndarray, *, split: str, indices: np.ndarray) -> np.ndarray:
        return apply_badnet(images, patch=self.cfg.patch_size, native=tuple(self.ctx.info.img_size[:2]))

    def info(self) -> dict:
        return {"patch_size": self.cfg.patch_size}
