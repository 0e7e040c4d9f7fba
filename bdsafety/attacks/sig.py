"""SIG (Barni et al., 2019): a horizontal sinusoid added to target-class training images, CLEAN label.

As in BackdoorBench v2.2 (attack/sig.py, config/attack/sig/default.yaml: sig_delta 40, sig_f 6): round(pratio * N)
poisoned samples drawn from the target class only (pratio over the WHOLE training set; a target class with too few
images is an error naming the largest possible pratio), their labels unchanged; the poisoned test set is every
non-target test image with the signal, labelled with the target.
"""
from __future__ import annotations

import numpy as np

from bdsafety.attacks.base import Attack, register_attack
from bdsafety.attacks.triggers import apply_sig
from bdsafety.config import POSITIVE, Option


@register_attack
class SIG(Attack):
    name = "sig"
    description = ("SIG attack: sinusoidal signal on target-class training images, clean label "
                   "(BackdoorBench-compatible record)")
    options = {
        "sig_delta": Option(40.0, "amplitude of the sinusoid in pixel units (0-255)", check=POSITIVE),
        "sig_f": Option(6.0, "frequency: periods across the image width", check=POSITIVE),
    }
    clean_label = True
    resizable = True  # the sinusoid is defined by the width of the image it is added to, as BackdoorBench's

    def apply(self, images: np.ndarray, *, split: str, indices: np.ndarray) -> np.ndarray:
        return apply_sig(images, delta=self.cfg.sig_delta, f=self.cfg.sig_f)

    def info(self) -> dict:
        return {"sig_delta": self.cfg.sig_delta, "sig_f": self.cfg.sig_f}

    @classmethod
    def record_trigger(cls, info: dict):
        """The sinusoid with the record's sig_delta / sig_f (BackdoorBench's records carry both keys too)."""
        if info.get("sig_delta") is None or info.get("sig_f") is None:
            return None
        delta, f = float(info["sig_delta"]), float(info["sig_f"])
        return lambda images: apply_sig(images, delta=delta, f=f)
