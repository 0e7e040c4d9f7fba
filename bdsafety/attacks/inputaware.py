"""Input-Aware dynamic backdoor (Nguyen & Tran, NeurIPS 2020) as BackdoorBench v2.2 runs it (attack/inputaware.py).

Two encoder-decoder generators (``TriggerNet``; BackdoorBench's layout: 3 x [conv-BN-ReLU, conv-BN-ReLU, max-pool],
a middle block, 3 x [bilinear x2, conv-BN-ReLU, conv-BN(-ReLU)], output tanh / (2 + 1e-7) + 0.5 in [0, 1]; 32 base
channels) read the normalised image: G gives a pattern p(x) in [0, 1], M a mask m(x) = threshold(M(x)) =
tanh(20 M(x) - 10) / (2 + 1e-7) + 0.5. The poisoned image is x + (p(x) - x) * m(x).

Schedule (BackdoorBench's):
  1. mask pretraining, ``clean_train_epochs`` epochs: M alone (Adam lr_M, betas (0.5, 0.9), MultiStepLR
     schedulerM_milestones), loss lambda_norm * mean(relu(m(x1) - mask_density)) + lambda_div * diversity, with
     diversity = mean(||x1 - x2|| / (||m(x1) - m(x2)|| + EPSILON)) (root-mean-square distances, x2 a second random
     batch). Then M is frozen.
  2. joint training, ``epochs`` epochs: in each (augmented) batch the first int(pratio * bs) samples get their own
     trigger and the backdoor label, the next as many become cross samples x1 + (p(x2) - x1) * m(x2) with their true
     label; loss CE + lambda_div * mean(||x1 - x2|| / (||p(x1) - p(x2)|| + EPSILON)); SGD on the classifier (the
     common lr / momentum / wd / scheduler) and Adam on G (lr_G, betas (0.5, 0.9), schedulerG_milestones).
Distances are taken on normalised images and patterns, as BackdoorBench does. The second batch x2 is drawn here from
the training set with its own seeded generator (BackdoorBench: a second shuffled loader).

Record: bd_test = every non-target test image with its trigger (made by the final G, M); ``cross_test_dataset/`` =
every test image with the trigger of another (a seeded permutation), true labels (``test_cross_acc``); bd_train =
BackdoorBench's final unshuffled pass (backdoor + cross samples; cross indices in info.pickle, skipped by RA/EP/PAM);
``inputaware_generators.pt`` = both generators' state_dicts and their settings, so a defense can rebuild poisoned
samples: ``InputAwareTrigger.load(record_dir).apply(images)``. bd_test is regenerated at every evaluation, as
BackdoorBench does, because G keeps changing.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from bdsafety import engine
from bdsafety.attacks.base import Attack, AttackOutcome, register_attack
from bdsafety.attacks.controlled import (
    cross_test_artifacts,
    final_pass_layout,
    merged_split,
    num_poison_in_batch,
    to_uint8,
)
from bdsafety.attacks.poison import backdoor_labels
from bdsafety.config import NONNEG, NONNEG_INT, POS_INT, POSITIVE, Option, int_list
from bdsafety.data.device import DeviceDataset, Normalizer, random_crop_flip
from bdsafety.data.info import dataset_info
from bdsafety.engine import autocast
from bdsafety.errors import ConfigError
from bdsafety.pools import CROSS_KEY
from bdsafety.safeio import safe_torch_load

GENERATORS_FILE = "inputaware_generators.pt"
EPS_OUT = 1e-7  # BackdoorBench's _EPSILON in the generator output and the threshold


def _block(cin: int, cout: int, relu: bool = True) -> nn.Sequential:
    layers = [nn.Conv2d(cin, cout, 3, 1, 1), nn.BatchNorm2d(cout, eps=1e-5, momentum=0.05)]
    if relu:
        layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


class TriggerNet(nn.Module):
    """BackdoorBench's InputAwareGenerator: (N, C, H, W) normalised images -> (N, out_channels, H, W) in [0, 1]."""

    def __init__(self, in_channels: int = 3, out_channels: int | None = None, width: int = 32, steps: int = 3):
        super().__init__()
        out_channels = in_channels if out_channels is None else out_channels
        layers: list[nn.Module] = []
        cur, nxt = in_channels, width
        for step in range(steps):
            layers += [_block(cur, nxt), _block(nxt, nxt), nn.MaxPool2d(2, 2)]
            if step < steps - 1:
                cur, nxt = nxt, nxt * 2
        layers.append(_block(nxt, nxt))
        cur, nxt = nxt, nxt // 2
        for step in range(steps):
            last = step == steps - 1
            layers += [nn.Upsample(scale_factor=2, mode="bilinear"), _block(cur, cur), _block(cur, nxt, relu=not last)]
            cur, nxt = nxt, nxt // 2
            if step == steps - 2:
                nxt = out_channels
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.net(x)) / (2 + EPS_OUT) + 0.5


def threshold(m: torch.Tensor) -> torch.Tensor:
    """BackdoorBench's mask sharpening: tanh(20 m - 10) / (2 + 1e-7) + 0.5."""
    return torch.tanh(m * 20 - 10) / (2 + EPS_OUT) + 0.5


def rms_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-sample root-mean-square distance (BackdoorBench's sqrt(mean(MSE, dims 1..3)))."""
    return (a - b).pow(2).mean(dim=(1, 2, 3)).sqrt()


@dataclass
class InputAwareTrigger:
    """The trained trigger: pattern generator G, mask generator M, and the normaliser they read through."""

    G: TriggerNet
    M: TriggerNet
    norm: object  # bdsafety.data.device.Normalizer

    def pattern_mask(self, x01: torch.Tensor):
        """(pattern in [0, 1], thresholded mask) of pixel-space images x01."""
        xn = self.norm(x01)
        return self.G(xn), threshold(self.M(xn))

    def poison(self, x01: torch.Tensor, source01: torch.Tensor | None = None):
        """x + (p(s) - x) * m(s) with s = ``source01`` (cross) or x itself; returns (images, pattern, mask)."""
        p, m = self.pattern_mask(x01 if source01 is None else source01)
        return x01 + (p - x01) * m, p, m

    @torch.no_grad()
    def apply(self, images: np.ndarray, *, sources: np.ndarray | None = None, batch_size: int = 512) -> np.ndarray:
        """uint8 (N, H, W, C) -> triggered uint8 images (rounded); ``sources``: cross samples with their triggers."""
        was = self.G.training, self.M.training
        self.G.eval(), self.M.eval()
        dev = next(self.G.parameters()).device
        out = []
        try:
            for s in range(0, len(images), batch_size):
                x = _to01(images[s:s + batch_size], dev)
                src = None if sources is None else _to01(sources[s:s + batch_size], dev)
                out.append(to_uint8(self.poison(x, src)[0]))
        finally:
            self.G.train(was[0]), self.M.train(was[1])
        return np.concatenate(out) if out else np.zeros((0, *images.shape[1:]), np.uint8)

    def state(self, settings: dict) -> dict:
        return {"netG": {k: v.detach().cpu() for k, v in self.G.state_dict().items()},
                "netM": {k: v.detach().cpu() for k, v in self.M.state_dict().items()}, **settings}

    @classmethod
    def load(cls, record_dir, trust_record: bool = False, device="cpu") -> "InputAwareTrigger":
        """Rebuild the generators saved in a record (``inputaware_generators.pt``) with the record's dataset
        normaliser."""

        d = safe_torch_load(Path(record_dir) / GENERATORS_FILE, trust_record)
        info = dataset_info(d["dataset"], d.get("num_classes"), tuple(d["img_size"]))
        c = int(d["img_size"][2])
        G, M = TriggerNet(c, c, d["gen_width"]), TriggerNet(c, 1, d["gen_width"])
        G.load_state_dict(d["netG"]), M.load_state_dict(d["netM"])
        return cls(G.to(device).eval(), M.to(device).eval(), Normalizer(info, device))


def _to01(images: np.ndarray, device) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).to(device).float().div(255.0)


class MaskPretrainStep:
    """engine.fit ``step_fn`` for stage 1 (M alone: mask-norm + diversity loss)."""

    def __init__(self, trig: InputAwareTrigger, opt, second, *, lambda_norm: float, lambda_div: float,
                 mask_density: float, eps: float):
        self.trig, self.opt, self.second = trig, opt, second
        self.lambda_norm, self.lambda_div, self.density, self.eps = lambda_norm, lambda_div, mask_density, eps

    def __call__(self, M, x, y):
        norm = self.trig.norm
        self.opt.zero_grad(set_to_none=True)
        x2 = norm(self.second(len(x)))
        m1, m2 = threshold(M(x)), threshold(M(x2))
        loss_norm = F.relu(m1 - self.density).mean()
        loss_div = (rms_distance(x, x2) / (rms_distance(m1, m2) + self.eps)).mean()
        loss = self.lambda_norm * loss_norm + self.lambda_div * loss_div
        loss.backward()
        self.opt.step()
        return loss.detach(), torch.zeros(len(y), 1, device=x.device)  # no classes: train_acc is not meaningful here


class JointStep:
    """engine.fit hooks for stage 2: ``batch_fn`` relabels the first num_bd samples, ``step_fn`` builds backdoor and
    cross images with G (gradients flow into G), CE + diversity, then steps the classifier and G."""

    def __init__(self, trig: InputAwareTrigger, opt_c, opt_g, second, *, pratio: float, label_trans: str, target: int,
                 num_classes: int, lambda_div: float, eps: float, seed: int):
        self.trig, self.opt_c, self.opt_g, self.second = trig, opt_c, opt_g, second
        self.pratio, self.label_trans, self.target, self.num_classes = pratio, label_trans, target, num_classes
        self.lambda_div, self.eps = lambda_div, eps
        self.gen = torch.Generator().manual_seed(int(seed))
        self.nb = 0

    def batch_fn(self, xb, y, idx=None):
        self.nb = num_poison_in_batch(self.pratio, len(y), self.gen)
        self.nb = min(self.nb, len(y) // 2)
        y = y.clone()
        if self.nb:
            y[:self.nb] = torch.as_tensor(backdoor_labels(y[:self.nb].cpu().numpy(), self.label_trans, self.target,
                                                          self.num_classes), device=y.device)
        return xb.float().div(255.0), y  # pixel space; normalised in step_fn

    def step_fn(self, model, x01, y):

        nb, trig, n = self.nb, self.trig, self.trig.norm
        self.opt_c.zero_grad(set_to_none=True)
        self.opt_g.zero_grad(set_to_none=True)
        loss_div = torch.zeros((), device=x01.device)
        if nb:
            x1, x2 = x01[:nb], self.second(nb)
            bd, p1, _ = trig.poison(x1)
            cross, p2, _ = trig.poison(x01[nb:2 * nb], source01=x2)
            loss_div = (rms_distance(n(x1), n(x2)) / (rms_distance(n(p1), n(p2)) + self.eps)).mean()
            x01 = torch.cat([bd, cross, x01[2 * nb:]])
        with autocast(x01.device):
            logits = model(n(x01))
        loss = F.cross_entropy(logits.float(), y) + self.lambda_div * loss_div
        loss.backward()
        self.opt_c.step()
        if nb:
            self.opt_g.step()
        return loss.detach(), logits.detach()


@register_attack
class InputAware(Attack):
    name = "inputaware"
    description = ("Input-Aware dynamic backdoor: trigger and mask generators trained with the classifier, cross "
                   "samples (BackdoorBench-compatible record, generators saved)")
    options = {
        "lr_G": Option(0.01, "Adam lr of the pattern generator G (betas 0.5, 0.9)", check=POSITIVE),
        "lr_M": Option(0.01, "Adam lr of the mask generator M (betas 0.5, 0.9)", check=POSITIVE),
        "schedulerG_milestones": Option([200, 300, 400, 500], "G's MultiStepLR milestones (epochs, gamma 0.1)",
                                        type=int_list, check=POS_INT),
        "schedulerM_milestones": Option([10, 20], "M's MultiStepLR milestones (epochs, gamma 0.1)", type=int_list,
                                        check=POS_INT),
        "lambda_div": Option(1.0, "weight of the diversity (cross) loss", check=NONNEG),
        "lambda_norm": Option(100.0, "weight of the mask-norm loss in mask pretraining", check=NONNEG),
        "mask_density": Option(0.032, "mask density the norm loss allows for free", check=NONNEG),
        "EPSILON": Option(1e-7, "added to the denominator of the diversity loss", check=POSITIVE),
        "clean_train_epochs": Option(25, "mask pretraining epochs (M alone) before the joint training",
                                     check=NONNEG_INT),
        "gen_width": Option(32, "base channels of both generators (BackdoorBench: 32)", check=POS_INT),
        "cross_test": Option(True, "also save the cross test set, cross_test_dataset/, and report test_cross_acc"),
    }

    def run(self):

        d, c, dev, info = self.ctx.data, self.cfg, self.ctx.device, self.ctx.info
        h, w, ch = info.img_size
        if h % 8 or w % 8:
            raise ConfigError(f"inputaware's generators halve the image 3 times: "
                              f"{h}x{w} is not a multiple of 8 (--img_size)")
        norm = self.normalizer()
        gen = engine.seed_everything(c.random_seed)
        model = self.new_model()
        G = engine.prepare_model(TriggerNet(ch, ch, c.gen_width), dev)
        M = engine.prepare_model(TriggerNet(ch, 1, c.gen_width), dev)
        trig = InputAwareTrigger(G, M, norm)
        train = DeviceDataset(d.train_x, d.train_y, dev)
        gen2 = torch.Generator().manual_seed(c.random_seed + 1)

        def second(n: int) -> torch.Tensor:  # a second random, augmented batch (BackdoorBench's second loader)
            idx = torch.randint(len(train), (n,), generator=gen2).to(dev)
            return random_crop_flip(train.x[idx], pad=4, flip=info.hflip, generator=gen2).float().div(255.0)

        common = dict(batch_size=c.batch_size, hflip=info.hflip, generator=gen, progress=self.ctx.progress)
        if c.clean_train_epochs:
            opt_m = torch.optim.Adam(M.parameters(), c.lr_M, betas=(0.5, 0.9))
            sched_m = torch.optim.lr_scheduler.MultiStepLR(opt_m, c.schedulerM_milestones, 0.1)
            step_m = MaskPretrainStep(trig, opt_m, second, lambda_norm=c.lambda_norm, lambda_div=c.lambda_div,
                                      mask_density=c.mask_density, eps=c.EPSILON)
            mrows = engine.fit(M, train, norm=norm, epochs=c.clean_train_epochs, step_fn=step_m, scheduler=sched_m,
                               optimizer=opt_m, desc=f"{self.name} masks", max_loss=math.inf, **common)
            # (max_loss: the diversity ratio is unbounded while two masks nearly coincide; only NaN/inf is divergence)
            self.ctx.log(f"mask pretraining: {c.clean_train_epochs} epochs, last loss {mrows[-1]['train_loss']:.4f}")
        M.eval()
        M.requires_grad_(False)
        G.train()

        opt_c = engine.make_optimizer(model.parameters(), c.client_optimizer, c.lr, c.sgd_momentum, c.wd)
        sched_c = engine.make_scheduler(opt_c, c.lr_scheduler, c.epochs, c.steplr_milestones)
        opt_g = torch.optim.Adam(G.parameters(), c.lr_G, betas=(0.5, 0.9))
        sched_g = torch.optim.lr_scheduler.MultiStepLR(opt_g, c.schedulerG_milestones, 0.1)
        joint = JointStep(trig, opt_c, opt_g, second, pratio=c.pratio, label_trans=c.attack_label_trans,
                          target=c.attack_target, num_classes=self.ctx.num_classes, lambda_div=c.lambda_div,
                          eps=c.EPSILON, seed=c.random_seed + 2)
        test_idx = self.test_poison_indices()
        cross_src = np.random.default_rng(c.random_seed + 3).permutation(len(d.test_y))
        made: dict = {}

        def evaluate() -> dict:
            made["bd_test"] = self.make_split("test", test_idx, images=trig.apply(d.test_x[test_idx]))
            m = engine.backdoor_metrics(model, self.evalsets(made["bd_test"]), norm, c.eval_batch_size)
            if c.cross_test:
                made["cross"] = trig.apply(d.test_x, sources=d.test_x[cross_src])
                m["test_cross_acc"] = engine.evaluate_loss_acc(model, DeviceDataset(made["cross"], d.test_y, dev), norm,
                                                               c.eval_batch_size)[1]
            return m

        def on_epoch_end(epoch: int, row: dict):
            sched_g.step()
            if epoch % c.eval_every == 0 or epoch == c.epochs:
                row.update(evaluate())
            else:
                row.update({k: math.nan for k in ("test_loss", "test_acc", "test_asr", "test_ra", "test_cross_acc")})

        rows = engine.fit(model, train, norm=norm, epochs=c.epochs, step_fn=joint.step_fn, scheduler=sched_c,
                          optimizer=opt_c, batch_fn=joint.batch_fn, eval_batch_size=c.eval_batch_size,
                          desc=f"{self.name} {c.dataset}", on_epoch_end=on_epoch_end, **common)
        engine.check_finite_model(G, "inputaware pattern generator")
        G.eval()

        bd_idx, cross_idx = final_pass_layout(len(d.train_y), c.batch_size, c.pratio, 1.0, seed=c.random_seed + 4)
        src = np.random.default_rng(c.random_seed + 5).integers(0, len(d.train_y), len(cross_idx))
        bd = self.make_split("train", bd_idx, images=trig.apply(d.train_x[bd_idx]))
        cross = self.make_split("train", cross_idx, images=trig.apply(d.train_x[cross_idx], sources=d.train_x[src]))
        cross.bd_labels = cross.orig_labels.copy()  # cross samples keep their true label
        bd_train = merged_split(bd, cross)
        settings = {"dataset": c.dataset, "img_size": [int(v) for v in info.img_size],
                    "num_classes": self.ctx.num_classes, "gen_width": c.gen_width, "mask_density": c.mask_density}
        extra = {k: getattr(c, k) for k in ("lr_G", "lr_M", "lambda_div", "lambda_norm", "mask_density", "EPSILON",
                                           "clean_train_epochs", "gen_width")}
        extra[CROSS_KEY] = [int(i) for i in cross_idx]
        artifacts = {GENERATORS_FILE: trig.state(settings)}
        if c.cross_test:
            artifacts.update(cross_test_artifacts(made["cross"], d.test_y))
        return AttackOutcome(model, rows, bd_train, made["bd_test"], extra, artifacts)
