"""What the multi-stage attacks built to survive purification (SBL, the deferred backdoor) share.

Both poison the training set with a base data-poisoning trigger chosen by ``base_attack`` (BadNets or Blended, with
those attacks' own options and trigger code) and then train in stages, each stage a call of ``Attack.fit`` with its
own data, optimizer and step. The record is written as for the base attack: bd_train holds the real poisoned training
samples of the backdoor stage, bd_test the triggered test images; ``info.pickle`` names the base trigger.
"""
from __future__ import annotations

import numpy as np

from bdsafety.attacks.badnet import BadNets
from bdsafety.attacks.base import Attack
from bdsafety.attacks.blended import Blended
from bdsafety.config import Option

BASE_ATTACKS = {"badnet": BadNets, "blended": Blended}

BASE_OPTIONS = {
    "base_attack": Option("badnet", "the trigger and poisoning of the backdoor stage (that attack's own options below)",
                          choices=tuple(BASE_ATTACKS)),
    **BadNets.options,
    **Blended.options,
}


class BaseTriggerAttack(Attack):
    """An attack whose trigger is the one of ``base_attack`` (BadNets or Blended); subclasses define ``run``."""

    options = BASE_OPTIONS

    def prepare(self) -> None:
        self.base = BASE_ATTACKS[self.cfg.base_attack](self.ctx)
        self.base.prepare()

    def apply(self, images: np.ndarray, *, split: str, indices: np.ndarray) -> np.ndarray:
        return self.base.apply(images, split=split, indices=indices)

    def info(self) -> dict:
        return {"base_attack": self.cfg.base_attack, **self.base.info()}

    def artifacts(self) -> dict:
        return self.base.artifacts()

    def poisoned_training_set(self):
        """(bd_train, bd_test, train_x, train_y): the base attack's poisoned training set (as ``Attack.run`` builds
        it)."""
        d = self.ctx.data
        bd_train = self.make_split("train", self.select_poison())
        bd_test = self.make_split("test", self.test_poison_indices())
        train_x, train_y = d.train_x.copy(), d.train_y.copy()
        train_x[bd_train.indices] = bd_train.images
        train_y[bd_train.indices] = bd_train.bd_labels
        return bd_train, bd_test, train_x, train_y


def draw_indices(pool: np.ndarray, amount: float, n_total: int, seed: int, what: str) -> np.ndarray:
    """A seeded random subset of ``pool`` (sorted): ``amount`` < 1 is a fraction of ``n_total``, >= 1 a count."""
    k = int(round(amount * n_total)) if amount < 1 else int(amount)
    if not 0 < k <= len(pool):
        raise ValueError(f"{what}: {amount:g} gives {k} samples, but {len(pool)} are available (of {n_total})")
    return np.sort(np.random.default_rng(seed).choice(pool, size=k, replace=False)).astype(np.int64)


def staged_rows(stages: list[tuple[str, list[dict]]]) -> list[dict]:
    """The rows of consecutive training stages as one per-epoch table: epochs numbered on, a ``stage`` column."""
    out, offset = [], 0
    for name, rows in stages:
        for r in rows:
            out.append({**r, "epoch": offset + r["epoch"], "stage": name})
        offset += len(rows)
    return out
