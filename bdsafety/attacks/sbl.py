"""SBL: flatness-aware Sequential Backdoor Learning (Pham et al., ECCV 2024, "Flatness-aware Sequential Learning
Generates Resilient Backdoors"; official code github.com/mail-research/SBL-resilient-backdoors).

The backdoor is learned as a continual-learning sequence of two tasks, so that the model ends in a backdoor region
that later clean fine-tuning (a defense) cannot leave:

  task 0 (backdoor): train on the poisoned training set (the base attack's: BadNets or Blended) with
      sharpness-aware minimisation (SAM), which seeks a FLAT backdoor minimum;
      SAM: e = rho * g / ||g||, gradient at w + e (BN running statistics frozen in that pass), step at w;
  task 1 (clean):    continue on a disjoint clean split with plain SGD at a small learning rate, under the
      continual-learning rule ``sbl_cl``: 'ewc' adds lambda * sum_i F_i (w_i - w0_i)^2 to the cross-entropy, with
      w0 the weights after task 0 and F the diagonal Fisher information E[p(y|x) (d log p(y|x) / dw)^2] over the
      task-0 training set (model in eval mode, as the official end_task runs after its last evaluation);
      'naive' is plain fine-tuning.

Where each choice comes from (official code, commit 7716c18):
- stages and data split: main.py (``--mixed_first``: the poisoned "mixed" task first), models/training.py
  (``train``: task loop, then ``end_task`` = the EWC Fisher), data/dataset.py (``get_dataloader``: task 0 on the
  poisoned part, task 1 on a disjoint 10% clean part, ``--task_portion 0.05 0.1 0.85``; 5% is left to the defender);
- SAM in TASK 0 only: main.py wraps the first optimizer in SAM (sam.py; rho 0.05, not adaptive, SGD lr 0.01,
  momentum 0.9, no weight decay) when ``--opt_mode sam``; models/training.py swaps in the second optimizer after
  task 0 and sets ``opt_mode = 'normal'``, so task 1 takes plain SGD steps (models/naive.py, models/ewc.py
  ``observe``). ``sbl_sam`` offers 'clean' and 'both' (SAM in task 1 too) and 'none' (the paper's ablation);
- task 1 optimizer: SGD lr 0.001 (``--sec_lr``), momentum 0.9, weight decay 5e-4, 100 epochs (``--sec_epochs``),
  batch 256; task 0: 150 epochs, batch 128 (``batch_size / 2``); EWC lambda 1 (README and run_cifar.sh);
- learning rates are constant in both tasks: the official cosine scheduler is bound to the optimizer SAM replaces and
  is only stepped when ``opt_mode == 'none'`` (models/training.py ``train_epoch``), so the shipped yamls set
  ``lr_scheduler: none``.

Departures (named): the poisoned samples are a fixed set of indices (BackdoorBench's poisoning, round(pratio * N)
drawn over the whole training set as every attack here), so the record's bd_train holds the real poisoned samples
of task 0; the official README runs ``--is_dat``, which stamps the trigger on random batch samples each step. The
defender's 5% is not held out: defenses here draw their reserved data from the whole training set, as for every
other attack. The Fisher is computed on un-augmented task-0 images (the official loader augments them).
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch.func import functional_call, grad_and_value, vmap

from bdsafety import engine
from bdsafety.attacks.base import AttackOutcome, register_attack
from bdsafety.attacks.staged import BaseTriggerAttack, draw_indices, staged_rows
from bdsafety.config import AMOUNT, NONNEG, POS_INT, POSITIVE, Option
from bdsafety.defenses.ft_sam import sam_step

SAM_STAGES = ("backdoor", "clean", "both", "none")


def ewc_fisher(model, images: torch.Tensor, labels: torch.Tensor, norm, chunk: int = 64) -> list[torch.Tensor]:
    """Diagonal Fisher E[p(y|x) * (grad_w log p(y|x))^2] over uint8 (N, C, H, W) ``images`` with true ``labels``, one
    tensor per trainable parameter (model in eval mode; per-sample gradients with torch.func)."""

    was_training = model.training
    model.eval()
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    params = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    frozen = {n: p.detach() for n, p in model.named_parameters() if not p.requires_grad}
    buffers = dict(model.named_buffers())

    def log_prob(p, x, onehot):
        out = functional_call(model, ({**p, **frozen}, buffers), (x.unsqueeze(0),))
        return (F.log_softmax(out.float(), dim=1)[0] * onehot).sum()

    per_sample = vmap(grad_and_value(log_prob), in_dims=(None, 0, 0))
    fisher = {n: torch.zeros_like(params[n]) for n in names}
    for s in range(0, len(images), chunk):
        x = norm.from_uint8(images[s:s + chunk])
        with torch.no_grad():
            n_classes = model(x[:1]).shape[1]
        grads, logp = per_sample(params, x, F.one_hot(labels[s:s + chunk], n_classes).float())
        w = logp.exp()
        for n in names:
            fisher[n] += (w.view(-1, *([1] * params[n].dim())) * grads[n].pow(2)).sum(0)
    model.train(was_training)
    return [fisher[n] / max(1, len(images)) for n in names]


def ewc_loss(params: list[torch.Tensor], fisher: list[torch.Tensor], lam: float, loss_fn=F.cross_entropy):
    """loss(logits, y) = loss_fn + lam * sum F * (w - w0)^2, w0 the current values of ``params`` (the anchor)."""
    anchor = [p.detach().clone() for p in params]

    def loss(logits, y):
        penalty = sum((f * (p - a).pow(2)).sum() for p, f, a in zip(params, fisher, anchor))
        return loss_fn(logits, y) + lam * penalty

    return loss


@register_attack
class SBL(BaseTriggerAttack):
    name = "sbl"
    description = ("SBL (ECCV 2024): flatness-aware sequential backdoor learning, a backdoor stage with SAM then a "
                   "clean continual-learning stage (EWC), on a BadNets or Blended trigger")
    options = {
        **BaseTriggerAttack.options,
        "sbl_sam": Option("backdoor", "which stage takes SAM steps (official: the backdoor stage only; 'none' is plain "
                                      "sequential learning)", choices=SAM_STAGES),
        "sbl_sam_rho": Option(0.05, "SAM radius (official: sam.py's default 0.05)", check=NONNEG),
        "sbl_sam_adaptive": Option(False, "adaptive SAM (official: off)"),
        "sbl_cl": Option("ewc", "continual-learning rule of the clean stage: ewc or naive (plain fine-tuning)",
                         choices=("ewc", "naive")),
        "sbl_ewc_lambda": Option(1.0, "EWC penalty weight (official: --lambd 1)", check=NONNEG),
        "sbl_clean_ratio": Option(0.1, "clean-stage data: fraction (<1) or count (>=1) of the training set, disjoint "
                                       "from the poisoned samples; the backdoor stage trains on "
                                       "the rest (official: 0.1)",
                                  check=AMOUNT),
        "sbl_clean_epochs": Option(100, "clean-stage epochs (official --sec_epochs 100)", check=POS_INT),
        "sbl_clean_lr": Option(0.001, "clean-stage SGD learning rate, constant (official --sec_lr 0.001)",
                               check=POSITIVE),
        "sbl_clean_batch_size": Option(256, "clean-stage batch size (official: 256)", check=POS_INT),
        "sbl_clean_wd": Option(5e-4, "clean-stage weight decay (official: 5e-4)", check=NONNEG),
    }

    def run(self) -> AttackOutcome:
        c, d = self.cfg, self.ctx.data
        self.prepare()
        bd_train, bd_test, train_x, train_y = self.poisoned_training_set()
        n = len(d.train_y)
        clean_idx = draw_indices(np.setdiff1d(np.arange(n), bd_train.indices), c.sbl_clean_ratio, n, c.random_seed + 1,
                                 "sbl_clean_ratio")
        backdoor_idx = np.setdiff1d(np.arange(n), clean_idx)
        self.ctx.log(f"backdoor stage: {len(backdoor_idx)} samples ({len(bd_train)} poisoned, {c.base_attack}); clean "
                     f"stage: {len(clean_idx)} clean samples; SAM in: {c.sbl_sam}; rule: {c.sbl_cl}")
        engine.seed_everything(c.random_seed)
        model = self.new_model()
        rows0 = self.backdoor_stage(model, train_x[backdoor_idx], train_y[backdoor_idx], bd_test)
        rows1 = self.clean_stage(model, train_x[backdoor_idx], train_y[backdoor_idx], d.train_x[clean_idx],
                                 d.train_y[clean_idx], bd_test)
        info = {**self.info(), "sbl_clean_indices": clean_idx.tolist()}
        return AttackOutcome(model, staged_rows([("backdoor", rows0), ("clean", rows1)]), bd_train, bd_test, info,
                             self.artifacts())

    def step(self, opt, params, stage: str, loss_fn=F.cross_entropy):
        """The SAM step in the stages ``sbl_sam`` names, else the plain one."""
        if self.cfg.sbl_sam in (stage, "both"):
            return sam_step(opt, params, self.cfg.sbl_sam_rho, self.cfg.sbl_sam_adaptive, loss_fn, freeze_bn=True)
        return engine.sgd_step(opt, loss_fn)

    def backdoor_stage(self, model, x: np.ndarray, y: np.ndarray, bd_test) -> list[dict]:
        c = self.cfg
        gen = engine.seed_everything(c.random_seed)
        params = list(model.parameters())
        opt = engine.make_optimizer(params, c.client_optimizer, c.lr, c.sgd_momentum, c.wd)
        sched = engine.make_scheduler(opt, c.lr_scheduler, c.epochs, c.steplr_milestones)
        return self.fit(model, x, y, bd_test, epochs=c.epochs, batch_size=c.batch_size,
                        step_fn=self.step(opt, params, "backdoor"), optimizer=opt, scheduler=sched, generator=gen,
                        desc=f"sbl backdoor stage {c.dataset}")

    def clean_stage(self, model, x0: np.ndarray, y0: np.ndarray, x1: np.ndarray, y1: np.ndarray, bd_test) -> list[dict]:
        """Task 1 on the clean (x1, y1); with EWC the Fisher comes from the task-0 data (x0, y0)."""
        c = self.cfg
        params = [p for p in model.parameters() if p.requires_grad]
        loss_fn = F.cross_entropy
        if c.sbl_cl == "ewc":
            dev = self.ctx.device
            fisher = ewc_fisher(model, torch.from_numpy(np.ascontiguousarray(x0)).permute(0, 3, 1, 2).to(dev),
                                torch.as_tensor(y0, dtype=torch.long, device=dev), self.normalizer())
            loss_fn = ewc_loss(params, fisher, c.sbl_ewc_lambda)
        gen = engine.seed_everything(c.random_seed + 1)
        opt = engine.make_optimizer(params, "sgd", c.sbl_clean_lr, c.sgd_momentum, c.sbl_clean_wd)
        return self.fit(model, x1, y1, bd_test, epochs=c.sbl_clean_epochs, batch_size=c.sbl_clean_batch_size,
                        step_fn=self.step(opt, params, "clean", loss_fn), optimizer=opt, generator=gen,
                        desc=f"sbl clean stage {c.dataset}")
