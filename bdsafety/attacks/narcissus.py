"""Narcissus (Zeng et al., ACM CCS 2023): a clean-label backdoor whose trigger is optimised to point INTO the target
class, so that a handful of poisoned target-class images suffice.

The official code (github.com/reds-lab/Narcissus, Narcissus.ipynb and narcissus_function.py; defaults below) in
four steps, each made here and cached under <record_root>/.cache/narcissus/:

1. Surrogate: a model of the attack's architecture (official: ResNet-18 with 201 outputs) trained from scratch on
   the attacker's data: a public out-of-distribution (POOD) data set (official: Tiny-ImageNet for CIFAR-10, resized to
   32 px) plus every target-class training image as one extra class. SGD lr 0.1, momentum 0.9, wd 5e-4, cosine, 200
   epochs, batch 350, crop + flip.
2. Poison warm-up: a copy fine-tuned on the target-class images alone, RAdam lr 0.1, 5 epochs (crop + flip).
3. Trigger generation: the warmed-up model frozen (left in train mode, as the official loop does), an additive
   full-image pattern delta (zeros at the start) minimises CE(f(clip(x + clip(delta, -eps, eps))), target) over the
   augmented target-class images: RAdam lr 0.01, 1000 rounds (stopping early when the gradient vanishes), eps 16/255.
4. Poisoning: round(pratio * N) target-class training images (official: 25 of 50,000 CIFAR-10 images, pratio 0.0005)
   get x + delta, labels unchanged. Test: every non-target test image gets x + 3 * delta (``narcissus_test_magnify``,
   the official multi_test 3), labelled with the target.

Choices of this project (each a config value):
- POOD (``narcissus_pood``): any dataset this project loads, resized to the attack's image size with Pillow's
  bilinear filter (torchvision's Resize, as the official transform); ``narcissus_pood_n`` caps it (a seeded subset).
  The synthetic demo has no out-of-distribution counterpart here: ``narcissus_pood: synthetic`` on synthetic data
  generates FRESH synthetic images (``narcissus_pood_seed``) and drops their target class, i.e. in-distribution images
  of the other classes -- a better-informed attacker than the official POOD one (say so with its figures). The
  victim's own training set as POOD is refused (it is not public data).
- Label of the target class in the surrogate: one index after the POOD classes, in all three steps. The official
  code trains the surrogate with the target images as class 200 but warms up and optimises towards the target's
  CIFAR index (2), a POOD class of the 201-way surrogate; here the three steps agree.
- Normalisation: the data set's own (official: mean 0.5 / std 0.5); delta lives in [0, 1] pixel space either way.
  Flip augmentation follows the data set's rule (BackdoorBench: CIFAR-10 only); the official code always flips.
- Poisoned images are stored as uint8 PNGs, rounded: |poisoned - clean| <= eps on every pixel (eps in whole pixel
  units). The target is 0 (BackdoorBench's convention; official: 2).

The trigger (float, pixel units) is stored in info.pickle (``narcissus_trigger``) with the magnification, so QRA's
retrigger source rebuilds the test-time trigger from the record (``record_trigger``), as for SIG and LC.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from bdsafety import engine, models
from bdsafety.attacks.base import DATASET_CHOICES, Attack, dataset_root, load_data_for, register_attack
from bdsafety.attacks.resources import array_digest, cache_key, load_or_build
from bdsafety.attacks.triggers import apply_additive
from bdsafety.config import POS_INT, POSITIVE, SEED, Option
from bdsafety.data import synthetic
from bdsafety.data.device import DeviceDataset, pil_resize, random_crop_flip
from bdsafety.defenses.bti import model_digest
from bdsafety.errors import ConfigError

SUBSET_STREAM = 25_0301  # seed stream of the POOD subset draw


def generate_trigger(model, norm, images: torch.Tensor, label: int, *, eps: float, rounds: int, lr: float,
                     batch_size: int, hflip: bool, generator: torch.Generator, progress: bool = False) -> tuple:
    """Narcissus's trigger generation: an additive pattern delta (1, C, H, W) in [0, 1] units minimising
    CE(model(norm(clip(x + clip(delta, -eps, eps), 0, 1))), label) over crop/flip-augmented uint8 ``images``
    (N, C, H, W) with RAdam, ``rounds`` passes, stopping when a pass's gradient is exactly zero. ``model`` is frozen
    (its parameters) and left in its mode. Returns (clip(delta, -eps, eps), per-round mean losses)."""

    req = [p.requires_grad for p in model.parameters()]
    model.requires_grad_(False)
    delta = torch.zeros((1, *images.shape[1:]), device=images.device, requires_grad=True)
    opt = torch.optim.RAdam([delta], lr=lr)
    target = torch.full((len(images),), int(label), dtype=torch.long, device=images.device)
    losses = []
    try:
        for _ in tqdm(range(rounds), desc="narcissus trigger", disable=not engine.use_progress(progress), leave=False):
            order = torch.randperm(len(images), generator=generator).to(images.device)
            tot, grad_sum = 0.0, 0.0
            for s in range(0, len(images), batch_size):
                idx = order[s:s + batch_size]
                x = random_crop_flip(images[idx], flip=hflip, generator=generator).float() / 255.0
                with engine.fp32(x.device):
                    xp = (x + delta.clamp(-eps, eps)).clamp(0, 1)
                    loss = F.cross_entropy(model(norm(xp)), target[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                grad_sum += float(delta.grad.abs().sum())
                opt.step()
                tot += float(loss.detach()) * len(idx)
            losses.append(tot / len(images))
            if grad_sum == 0:
                break
    finally:
        for p, r in zip(model.parameters(), req):
            p.requires_grad_(r)
    return delta.detach().clamp(-eps, eps), losses


@register_attack
class Narcissus(Attack):
    name = "narcissus"
    description = ("Narcissus attack (CCS 2023): clean label, an L_inf-bounded additive trigger optimised on a "
                   "surrogate (POOD + target class) so that a few target-class images suffice, magnified at test time "
                   "(BackdoorBench-compatible record; surrogate and trigger made and cached here)")
    options = {
        "narcissus_eps": Option(16.0, "L_inf bound of the trigger in pixel units, 0-255 (official l_inf_r 16/255)",
                                check=POSITIVE),
        "narcissus_test_magnify": Option(3.0, "test-time magnification of the trigger (official multi_test 3); the "
                                              "poisoned TRAINING images get it at 1", check=POSITIVE),
        "narcissus_pood": Option("tiny", "public out-of-distribution data set the surrogate learns besides the target "
                                         "class (official for CIFAR-10: Tiny-ImageNet); 'synthetic' on synthetic data: "
                                         "fresh images of the other classes (in-distribution, "
                                         "see the module docstring)",
                                 choices=DATASET_CHOICES),
        "narcissus_pood_path": Option(None, "folder holding <narcissus_pood>/ (default: dataset_path)"),
        "narcissus_pood_n": Option(None, "at most this many POOD training images, a seeded subset (default: all; the "
                                         "official code uses all 100,000 Tiny-ImageNet images)", type=int,
                                   check=POS_INT),
        "narcissus_pood_seed": Option(1, "generator seed of a synthetic POOD (not the data's own seed: other images)",
                                      check=SEED),
        "narcissus_surrogate_epochs": Option(200, "surrogate training epochs (official 200; SGD momentum 0.9, wd 5e-4, "
                                                  "cosine)", check=POS_INT),
        "narcissus_surrogate_lr": Option(0.1, "surrogate SGD learning rate (official 0.1)", check=POSITIVE),
        "narcissus_warmup_epochs": Option(5, "poison warm-up epochs on the target class alone (official 5)",
                                          check=POS_INT),
        "narcissus_warmup_lr": Option(0.1, "poison warm-up RAdam learning rate (official 0.1)", check=POSITIVE),
        "narcissus_gen_rounds": Option(1000, "trigger generation passes over the target-class images (official 1000)",
                                       check=POS_INT),
        "narcissus_gen_lr": Option(0.01, "trigger generation RAdam learning rate (official 0.01)", check=POSITIVE),
        "narcissus_batch_size": Option(350, "batch size of the three steps (official 350)", check=POS_INT),
        "narcissus_seed": Option(0, "seed of the surrogate, warm-up and trigger (cached per data and settings, not per "
                                    "attack seed)", check=SEED),
    }
    clean_label = True

    # ---- the attacker's data
    def pood_data(self) -> tuple[np.ndarray, np.ndarray]:
        """(uint8 POOD images at the attack's image size, labels 0..K-1)."""
        c = self.cfg
        if c.narcissus_pood == c.dataset and c.dataset != "synthetic":
            raise ConfigError(f"narcissus_pood {c.narcissus_pood} is the victim's own training set, not public "
                              f"out-of-distribution data: pick another data set (official for CIFAR-10: tiny)")
        if c.narcissus_pood == "synthetic":

            d = synthetic.make_synthetic(n_train=c.synthetic_n_train, n_test=10, seed=c.narcissus_pood_seed)
        else:
            pood_cfg = c.replace(dataset=c.narcissus_pood, dataset_path=c.narcissus_pood_path or c.dataset_path)
            self.ctx.log(f"POOD: {c.narcissus_pood} from {dataset_root(pood_cfg.dataset_path, pood_cfg.dataset)}")
            d = load_data_for(pood_cfg)
        x, y = d.train_x, d.train_y.astype(np.int64)
        if c.narcissus_pood == c.dataset:  # fresh synthetic images: their target class is the attacker's own class
            keep = y != c.attack_target
            x, y = x[keep], y[keep]
        if c.narcissus_pood_n is not None and c.narcissus_pood_n < len(y):
            rng = np.random.default_rng([int(c.narcissus_seed), SUBSET_STREAM])
            pick = np.sort(rng.choice(len(y), size=c.narcissus_pood_n, replace=False))
            x, y = x[pick], y[pick]
        classes, y = np.unique(y, return_inverse=True)
        h, w, ch = self.stamp_shape
        if x.shape[1:] != (h, w, ch):
            if x.shape[3] != ch or h != w:
                raise ConfigError(f"POOD images {x.shape[1:]} cannot be resized to the attack's {h}x{w}x{ch}")

            x = np.concatenate([pil_resize(torch.from_numpy(np.ascontiguousarray(x[s:s + 2048])).permute(0, 3, 1, 2), h)
                                .permute(0, 2, 3, 1).numpy() for s in range(0, len(x), 2048)])
        return np.ascontiguousarray(x), y.astype(np.int64)

    def target_images(self) -> np.ndarray:
        d = self.ctx.data
        return self.stamp_input(d.train_x[d.train_y == self.cfg.attack_target])

    # ---- the three steps
    def _fit(self, model, x, y, *, epochs, lr, optimizer, desc):

        c = self.cfg
        gen = engine.seed_everything(c.narcissus_seed)
        if optimizer == "radam":
            opt, sched = torch.optim.RAdam(model.parameters(), lr=lr), None
        else:
            opt = engine.make_optimizer(model.parameters(), "sgd", lr, 0.9, 5e-4)
            sched = engine.make_scheduler(opt, "cosine", epochs)
        return engine.fit(model, DeviceDataset(x, y, self.ctx.device), norm=self.normalizer(), epochs=epochs,
                          batch_size=c.narcissus_batch_size, step_fn=engine.sgd_step(opt), scheduler=sched,
                          optimizer=opt, augment=True, hflip=self.ctx.info.hflip, generator=gen, desc=desc,
                          progress=self.ctx.progress)

    def surrogate_settings(self) -> dict:
        c = self.cfg
        return {"model": c.model, "pood": c.narcissus_pood, "pood_n": c.narcissus_pood_n,
                "pood_seed": c.narcissus_pood_seed if c.narcissus_pood == "synthetic" else None,
                "epochs": int(c.narcissus_surrogate_epochs), "lr": float(c.narcissus_surrogate_lr),
                "batch_size": int(c.narcissus_batch_size), "seed": int(c.narcissus_seed),
                "hflip": bool(self.ctx.info.hflip), "normalization": c.normalization}

    def _new_surrogate(self, num_classes: int):

        engine.seed_everything(self.cfg.narcissus_seed)
        return engine.prepare_model(models.build_model(self.cfg.model, num_classes, self.stamp_shape), self.ctx.device)

    def surrogate(self, target_x: np.ndarray):
        """(the trained surrogate, the surrogate's index of the target class, its cache file)."""
        c = self.cfg
        px, py = self.pood_data()
        label = int(py.max()) + 1
        meta = {"format": 1, "kind": "narcissus surrogate", "target": array_digest(target_x),
                "pood": array_digest(px, py), "img_size": [int(v) for v in self.stamp_shape],
                **self.surrogate_settings()}
        path = self.ctx.cache_dir / "narcissus" / f"surrogate_{c.dataset}_{c.model}_{cache_key(meta)}.pt"

        def build():
            x = np.concatenate([px, target_x])
            y = np.concatenate([py, np.full(len(target_x), label, np.int64)])
            self.ctx.log(f"surrogate {c.model}: {len(px)} POOD images ({label} classes) + {len(target_x)} target-class "
                         f"images, {c.narcissus_surrogate_epochs} epochs")
            model = self._new_surrogate(label + 1)
            rows = self._fit(model, x, y, epochs=c.narcissus_surrogate_epochs, lr=c.narcissus_surrogate_lr,
                             optimizer="sgd", desc="narcissus surrogate")
            return {"model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
                    "train_acc": [float(r["train_acc"]) for r in rows], "num_classes": label + 1}

        def load(obj):
            model = self._new_surrogate(int(obj["num_classes"]))
            model.load_state_dict(obj["model"], strict=True)
            return model

        obj = load_or_build(path, meta, build, self.ctx.log, "narcissus surrogate", check=load)
        return load(obj), label, str(path)

    def trigger_settings(self) -> dict:
        c = self.cfg
        return {"eps": float(c.narcissus_eps), "warmup_epochs": int(c.narcissus_warmup_epochs),
                "warmup_lr": float(c.narcissus_warmup_lr), "gen_rounds": int(c.narcissus_gen_rounds),
                "gen_lr": float(c.narcissus_gen_lr), "batch_size": int(c.narcissus_batch_size),
                "seed": int(c.narcissus_seed), "hflip": bool(self.ctx.info.hflip)}

    def prepare(self) -> None:
        """The trigger (float (H, W, C), pixel units): cached, else surrogate -> warm-up -> generation."""

        c = self.cfg
        if c.attack_label_trans != "all2one":
            raise ConfigError(f"{self.name} is a clean-label attack: only attack_label_trans all2one is defined")
        target_x = self.target_images()
        if len(target_x) == 0:
            raise ConfigError(f"the training set has no image of the target class {c.attack_target}")
        model, label, self.surrogate_cache = self.surrogate(target_x)
        meta = {"format": 1, "kind": "narcissus trigger", "surrogate": model_digest(model),
                "target": array_digest(target_x), "label": label, **self.trigger_settings()}
        path = self.ctx.cache_dir / "narcissus" / f"trigger_{c.dataset}_{c.model}_{cache_key(meta)}.pt"

        def build():
            self.ctx.log(f"poison warm-up: {c.narcissus_warmup_epochs} epochs on {len(target_x)} target-class images")
            self._fit(model, target_x, np.full(len(target_x), label, np.int64), epochs=c.narcissus_warmup_epochs,
                      lr=c.narcissus_warmup_lr, optimizer="radam", desc="narcissus warm-up")
            self.ctx.log(f"trigger generation: {c.narcissus_gen_rounds} rounds, eps {c.narcissus_eps:g}/255")
            gen = engine.seed_everything(c.narcissus_seed + 1)
            images = torch.as_tensor(target_x, device=self.ctx.device).permute(0, 3, 1, 2).contiguous()
            model.train()  # the official generation runs the warmed-up model in train mode (batch statistics)
            delta, losses = generate_trigger(model, self.normalizer(), images, label, eps=c.narcissus_eps / 255.0,
                                             rounds=c.narcissus_gen_rounds, lr=c.narcissus_gen_lr,
                                             batch_size=c.narcissus_batch_size, hflip=self.ctx.info.hflip,
                                             generator=gen, progress=self.ctx.progress)
            pattern = (delta[0].permute(1, 2, 0) * 255.0).clamp(-c.narcissus_eps, c.narcissus_eps).cpu()
            return {"pattern": pattern, "losses": losses}

        def check(obj):
            if tuple(obj["pattern"].shape) != tuple(self.stamp_shape):
                raise ValueError("the cached trigger's shape does not match the images")

        obj = load_or_build(path, meta, build, self.ctx.log, "narcissus trigger", check=check)
        self.pattern = obj["pattern"].numpy().astype(np.float32)
        self.gen_losses = list(obj["losses"])
        self.trigger_cache = str(path)

    def apply(self, images: np.ndarray, *, split: str, indices: np.ndarray) -> np.ndarray:
        scale = 1.0 if split == "train" else float(self.cfg.narcissus_test_magnify)
        return apply_additive(images, self.pattern, scale)

    def info(self) -> dict:
        c = self.cfg
        return {"narcissus_eps": c.narcissus_eps, "narcissus_test_magnify": c.narcissus_test_magnify,
                "narcissus_pood": c.narcissus_pood, "narcissus_trigger": self.pattern.tolist(),
                "narcissus_surrogate_cache": self.surrogate_cache, "narcissus_trigger_cache": self.trigger_cache,
                "narcissus_gen_final_loss": float(self.gen_losses[-1]) if self.gen_losses else float("nan"),
                "narcissus_gen_rounds_run": len(self.gen_losses)}

    def artifacts(self) -> dict:
        vis = np.clip(128 + self.pattern * (127.0 / max(1e-6, float(self.cfg.narcissus_eps))), 0, 255).astype(np.uint8)
        return {"narcissus_trigger.png": vis}

    @classmethod
    def record_trigger(cls, info: dict):
        """The stored pattern times the record's test magnification (what the poisoned TEST images get)."""
        if info.get("narcissus_trigger") is None or info.get("narcissus_test_magnify") is None:
            return None
        pattern = np.asarray(info["narcissus_trigger"], dtype=np.float32)
        scale = float(info["narcissus_test_magnify"])
        return lambda images: apply_additive(images, pattern, scale)
