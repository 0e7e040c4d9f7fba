"""A deferred (dormant) backdoor, after "Deferred Backdoor Functionality Attacks on Deep Learning Models" (Shin and
Park, arXiv 2411.14449, "DeferBad"): the attacker's own version of superficial safety.

Two stages:
  1. inject: train on the base attack's poisoned training set (BadNets or Blended) exactly as that attack does
     (the common options: epochs, lr, schedule, ...);
  2. conceal: a SHORT phase of plain SGD on a small clean subset S of the training set plus triggered copies of some of
     its non-target images under their TRUE labels, stopped at the first epoch where the backdoor looks gone to the
     attacker: the ASR on a check set of triggered training images (outside S and the poisoned samples, never test
     data) is at most ``deferred_stop_asr``.
The model is delivered with a low ASR; the suppression is shallow, so ordinary clean fine-tuning undoes it and the
backdoor returns (the study's benign-retune control, RA with 0 poisoned samples, is the check that must expose it).

No official code exists; the paper's text gives the two stages and the concealment data (clean samples and triggered
samples with their correct labels). OUR choices (config values, listed in the yamls): the size of S (5% of the
training set), the triggered share (half of S's non-target images, added as triggered copies), the optimizer (SGD lr
0.01, momentum 0.9, wd 5e-4, constant, the training batch size), and the stopping rule (attacker-side ASR <= 0.1 on
500 triggered training images, at most 20 epochs). The record's bd_train holds the injection stage's real poisoned
samples; S is drawn from the other training images and its indices are kept in info.pickle
(``deferred_conceal_indices``), with the concealment epochs run and the attacker-side ASR at the stop.
"""
from __future__ import annotations

import numpy as np

from bdsafety import engine
from bdsafety.attacks.base import AttackOutcome, register_attack
from bdsafety.attacks.poison import backdoor_labels
from bdsafety.attacks.staged import BaseTriggerAttack, draw_indices, staged_rows
from bdsafety.config import AMOUNT, FRACTION, NONNEG, POS_INT, POSITIVE, Option
from bdsafety.data.device import DeviceDataset


@register_attack
class Deferred(BaseTriggerAttack):
    name = "deferred"
    description = ("deferred (dormant) backdoor after DeferBad (arXiv 2411.14449): inject a BadNets or Blended "
                   "backdoor, then conceal it with a short phase on triggered samples under their true labels (low ASR "
                   "that returns under clean fine-tuning)")
    options = {
        **BaseTriggerAttack.options,
        "deferred_conceal_ratio": Option(0.05, "concealment clean subset S: fraction (<1) or count (>=1) of the "
                                               "training set, drawn from the unpoisoned images (our choice: 0.05)",
                                         check=AMOUNT),
        "deferred_trigger_frac": Option(0.5, "share of S's non-target images added again as triggered copies under "
                                             "their true labels (our choice: 0.5)", check=FRACTION),
        "deferred_conceal_lr": Option(0.01, "concealment SGD learning rate, constant (our choice)", check=POSITIVE),
        "deferred_conceal_wd": Option(5e-4, "concealment weight decay (our choice)", check=NONNEG),
        "deferred_conceal_epochs": Option(20, "most concealment epochs (our choice)", check=POS_INT),
        "deferred_stop_asr": Option(0.1, "stop concealing at the first epoch whose attacker-side ASR (on the check "
                                         "set) is at most this (our choice: 0.1; 0 runs every epoch)", check=FRACTION),
        "deferred_check_size": Option(500, "triggered training images (outside S and the poisoned samples, non-target) "
                                           "on which the attacker measures the ASR (our choice: 500)", check=POS_INT),
    }

    def run(self) -> AttackOutcome:
        c = self.cfg
        self.prepare()
        bd_train, bd_test, train_x, train_y = self.poisoned_training_set()
        engine.seed_everything(c.random_seed)
        model = self.new_model()
        rows0 = self.train(model, train_x, train_y, bd_test)
        conceal_idx, x, y, check = self.concealment_set(bd_train.indices)
        self.ctx.log(f"injected ({c.base_attack}, {len(bd_train)} poisoned): {engine.format_metrics(rows0[-1])}; "
                     f"concealing on {len(conceal_idx)} clean + {len(y) - len(conceal_idx)} "
                     f"triggered (true-label) images")
        rows1, check_asr = self.conceal(model, x, y, check, bd_test)
        self.ctx.log(f"concealed in {len(rows1)} epochs: attacker-side ASR {check_asr:.3f}")
        info = {**self.info(), "deferred_conceal_indices": conceal_idx.tolist(),
                "deferred_conceal_epochs_run": len(rows1), "deferred_check_asr": float(check_asr)}
        return AttackOutcome(model, staged_rows([("inject", rows0), ("conceal", rows1)]), bd_train, bd_test, info,
                             self.artifacts())

    def concealment_set(self, poisoned: np.ndarray):
        """(S, images, labels, check): S's clean images, then triggered copies of a ``deferred_trigger_frac`` share of
        its non-target images, all under their true labels; ``check`` = (triggered images, backdoor labels) of other
        training images for the attacker's ASR."""
        c, d = self.cfg, self.ctx.data
        n = len(d.train_y)
        rng = np.random.default_rng(c.random_seed + 2)
        free = np.setdiff1d(np.arange(n), poisoned)
        s = draw_indices(free, c.deferred_conceal_ratio, n, c.random_seed + 1, "deferred_conceal_ratio")
        nontarget = s[self.backdoor_label(d.train_y[s]) != d.train_y[s]]
        k = int(round(c.deferred_trigger_frac * len(nontarget)))
        trig = np.sort(rng.choice(nontarget, size=k, replace=False)) if k else nontarget[:0]
        x = np.concatenate([d.train_x[s], self.apply(d.train_x[trig], split="train", indices=trig)])
        y = np.concatenate([d.train_y[s], d.train_y[trig]])
        rest = np.setdiff1d(free, s)
        rest = rest[self.backdoor_label(d.train_y[rest]) != d.train_y[rest]]
        chk = np.sort(rng.choice(rest, size=min(c.deferred_check_size, len(rest)), replace=False))
        check = (self.apply(d.train_x[chk], split="train", indices=chk), self.backdoor_label(d.train_y[chk]))
        return s, x, y, check

    def backdoor_label(self, labels: np.ndarray) -> np.ndarray:

        c = self.cfg
        return backdoor_labels(labels, c.attack_label_trans, c.attack_target, self.ctx.num_classes)

    def conceal(self, model, x: np.ndarray, y: np.ndarray, check, bd_test) -> tuple[list[dict], float]:
        """Epochs of plain SGD on (x, y) until the attacker-side ASR on ``check`` is at most deferred_stop_asr."""
        c = self.cfg
        gen = engine.seed_everything(c.random_seed + 1)
        opt = engine.make_optimizer(model.parameters(), "sgd", c.deferred_conceal_lr, c.sgd_momentum,
                                    c.deferred_conceal_wd)
        step = engine.sgd_step(opt)
        check_ds = DeviceDataset(check[0], check[1], self.ctx.device)
        rows: list[dict] = []
        asr = float("nan")
        for epoch in range(1, c.deferred_conceal_epochs + 1):
            row = self.fit(model, x, y, bd_test, epochs=1, batch_size=c.batch_size, step_fn=step, optimizer=opt,
                           generator=gen, desc=f"deferred conceal {c.dataset}")[0]
            _, asr = engine.evaluate_loss_acc(model, check_ds, self.normalizer(), c.eval_batch_size)
            rows.append({**row, "epoch": epoch, "check_asr": asr})
            if asr <= c.deferred_stop_asr:
                break
        return rows, asr
