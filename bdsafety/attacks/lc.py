"""Label-consistent backdoor (LC; Turner et al., 2019) as BackdoorBench v2.2 runs it, with every resource made here.

1. The reference model the PGD attacks (``lc_reference``):
   - ``adversarial`` (default; BackdoorBench's resource/label-consistent and the paper): a PGD adversarially trained
     model of the same data and architecture (Madry et al.: every batch replaced by its PGD examples, eps 8/255, step
     2/255, 10 steps, random start: BackdoorBench's model name cifar_resnet_e8_a2_s10; crop/flip augmentation; the
     training schedule of this config, which for BackdoorBench's yamls equals its resource yaml: SGD 0.01, momentum
     0.9, wd 5e-4, cosine, 100 epochs, batch 128). Cached in <record_root>/.cache/lc/adv_*.pt keyed on the data,
     the architecture and every training setting; one model per dataset and settings (``lc_adv_seed``), not per
     attack seed, as BackdoorBench ships one file per dataset. Departures: BackdoorBench downloads ResNet-18 files
     (PreAct-ResNet-18 for Tiny) trained elsewhere; here the attack's own architecture is trained in-project, and its
     final weights are used (BackdoorBench's file is a "best" checkpoint, selected on data we do not use).
   - ``standard`` (the ablation): this project's clean reference record of the same dataset and model
     (``--lc_clean_record``; default ``clean_<dataset>_<model>_p0``, else any clean record of the same data and
     model under record_root), trained on demand when missing (``lc_train_clean``), the same as
     ``python attack/lc.py --yaml_path <yaml> --pratio 0 --save_folder_name <name>``. Its perturbations are
     non-robust features: the poisoned images stay learnable from their content, without the trigger.
   The reference's clean accuracy and its accuracy under the training PGD (random start) on the first
   ``lc_adv_heldout`` test images are logged and stored (info.pickle, lc_reference.yaml); with the adversarial
   reference, the same figures of a clean record, when one exists, are stored next to them for comparison.
2. Untargeted L_inf PGD on every target-class training image against the reference (BackdoorBench's
   resource/label-consistent/craft_adv_dataset.py: eps 8/255, step 1.5/255, 100 steps, no random start), rounded
   to uint8 within the budget. Cached in <record_root>/.cache/lc/ keyed on the reference's weights hash, the
   data, eps, step, steps and seed; a corrupt cache or one made for other inputs is rebuilt with a message.
3. Poisoned training samples = round(pratio * N) target-class images (clean label: labels unchanged), each the
   adversarial image plus the four-corner trigger at ``reduced_amplitude`` (BackdoorBench's default 1.0).
   Poisoned test samples = every non-target test image with the trigger only.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import yaml

from bdsafety import engine, models
from bdsafety.attacks.base import Attack, default_folder_name, register_attack, run_attack
from bdsafety.attacks.resources import array_digest, cache_key, load_or_build
from bdsafety.attacks.triggers import apply_lc_corners
from bdsafety.config import FRACTION, NONNEG_INT, POS_INT, POSITIVE, SEED, Option
from bdsafety.data.device import DeviceDataset
from bdsafety.defenses.bti import model_digest
from bdsafety.errors import ConfigError
from bdsafety.models.registry import load_state_dict_compat
from bdsafety.registry import get
from bdsafety.safeio import safe_torch_load

# what must agree for a clean record to stand for "the same data" (besides dataset and model)
_DATA_KEYS = {"synthetic": ("synthetic_n_train", "synthetic_n_test", "synthetic_seed", "synthetic_difficulty"),
              "imagefolder": ("img_size",)}
_DATA_KEY_DEFAULTS = {"synthetic_difficulty": 0.0}  # what a record written before the key was made with


def pgd_perturb(model, norm, x01: torch.Tensor, y: torch.Tensor, *, eps: float, step: float, steps: int,
                random_start: bool = False, generator: torch.Generator | None = None) -> torch.Tensor:
    """Untargeted L_inf PGD on a float batch in [0, 1] (eps, step in the same [0, 1] units): x_{t+1} =
    clip_[0,1](x0 + clip_eps(x_t + step * sign(grad_x CE(model(norm(x_t)), y)) - x0)), from x0 or, with
    ``random_start``, from x0 + U(-eps, eps) (Madry et al.). The model is attacked in eval mode and in fp32; its
    train/eval mode and requires_grad flags are restored. Returns the perturbed batch (float, not rounded)."""

    was_training = model.training
    model.eval()
    req = [p.requires_grad for p in model.parameters()]
    model.requires_grad_(False)
    try:
        x0 = x01.detach()
        x = x0.clone()
        if random_start:
            noise = torch.rand(x0.shape, generator=generator).to(x0.device, x0.dtype)
            x = (x0 + (noise * 2 - 1) * eps).clamp(0, 1)
        for _ in range(steps):
            x.requires_grad_(True)
            with engine.fp32(x.device):
                loss = F.cross_entropy(model(norm(x)), y)
            (g,) = torch.autograd.grad(loss, x)
            x = x.detach() + step * g.sign()
            x = (x0 + (x - x0).clamp(-eps, eps)).clamp(0, 1)
    finally:
        for p, r in zip(model.parameters(), req):
            p.requires_grad_(r)
        model.train(was_training)
    return x.detach()


def pgd_linf(model, norm, images: np.ndarray, labels: np.ndarray, *, eps: float, step: float, steps: int,
             device, batch_size: int = 256, random_start: bool = False, seed: int = 0) -> np.ndarray:
    """``pgd_perturb`` on uint8 (n, H, W, C) images; eps and step in pixel units (0-255). Returns uint8 images with
    |adv - x| <= eps (after rounding) and values in [0, 255]."""
    out = np.empty_like(images)
    gen = torch.Generator().manual_seed(int(seed))
    for s in range(0, len(images), batch_size):
        x0 = torch.as_tensor(images[s:s + batch_size], device=device).permute(0, 3, 1, 2).float() / 255.0
        y = torch.as_tensor(labels[s:s + batch_size], device=device, dtype=torch.long)
        x = pgd_perturb(model, norm, x0, y, eps=eps / 255.0, step=step / 255.0, steps=steps,
                        random_start=random_start, generator=gen)
        q = torch.round(x * 255.0)
        base = x0 * 255.0
        q = torch.minimum(torch.maximum(q, base - eps), base + eps).clamp(0, 255)
        out[s:s + batch_size] = q.round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return out


def clean_and_pgd_accuracy(model, norm, images: np.ndarray, labels: np.ndarray, *, eps: float, step: float,
                           steps: int, device, seed: int = 0, batch_size: int = 256) -> tuple[float, float]:
    """(clean accuracy, accuracy under PGD with a random start) of ``model`` on uint8 images; eps, step in pixels."""

    if len(images) == 0:
        return float("nan"), float("nan")
    adv = pgd_linf(model, norm, images, labels, eps=eps, step=step, steps=steps, device=device, batch_size=batch_size,
                   random_start=True, seed=seed)
    clean = engine.evaluate_loss_acc(model, DeviceDataset(images, labels, device), norm)[1]
    robust = engine.evaluate_loss_acc(model, DeviceDataset(adv, labels, device), norm)[1]
    return float(clean), float(robust)


class AdversarialStep:
    """engine.fit hooks for PGD adversarial training (Madry et al., 2018): ``batch_fn`` keeps the augmented batch in
    pixel space; ``step_fn`` replaces it by its PGD examples (random start, model in eval mode while they are made)
    and takes one optimizer step on CE(model(norm(x_adv)), y) alone."""

    def __init__(self, optimizer, norm, *, eps: float, step: float, steps: int, seed: int):
        self.opt, self.norm = optimizer, norm
        self.eps, self.step, self.steps = eps / 255.0, step / 255.0, steps
        self.gen = torch.Generator().manual_seed(int(seed))

    def batch_fn(self, xb, y, idx=None):
        return xb.float().div(255.0), y

    def step_fn(self, model, x01, y):

        adv = pgd_perturb(model, self.norm, x01, y, eps=self.eps, step=self.step, steps=self.steps, random_start=True,
                          generator=self.gen)
        self.opt.zero_grad(set_to_none=True)
        with engine.autocast(adv.device):
            logits = model(self.norm(adv))
            loss = F.cross_entropy(logits.float(), y)
        loss.backward()
        self.opt.step()
        return loss.detach(), logits.detach()


def adversarial_train(model, train_x: np.ndarray, train_y: np.ndarray, norm, *, epochs: int, batch_size: int,
                      lr: float, optimizer: str, momentum: float, wd: float, scheduler: str, milestones, eps: float,
                      step: float, steps: int, hflip: bool, seed: int, device, progress: bool = False,
                      desc: str = "adversarial training") -> list[dict]:
    """PGD adversarial training of ``model`` on uint8 images with the usual crop/flip augmentation (``AdversarialStep``;
    eps and step in pixel units). Rows per epoch; ``train_acc`` is the accuracy on the PGD examples."""

    gen = engine.seed_everything(seed)
    opt = engine.make_optimizer(model.parameters(), optimizer, lr, momentum, wd)
    sched = engine.make_scheduler(opt, scheduler, epochs, milestones)
    hook = AdversarialStep(opt, norm, eps=eps, step=step, steps=steps, seed=seed + 1)
    return engine.fit(model, DeviceDataset(train_x, train_y, device), norm=norm, epochs=epochs, batch_size=batch_size,
                      step_fn=hook.step_fn, batch_fn=hook.batch_fn, scheduler=sched, optimizer=opt, augment=True,
                      hflip=hflip, generator=gen, desc=desc, progress=progress)


REFERENCES = ("adversarial", "standard")


@register_attack
class LabelConsistent(Attack):
    name = "lc"
    description = ("Label-consistent attack: target-class images perturbed by PGD on an adversarially trained "
                   "reference model + four-corner trigger, clean label (BackdoorBench-compatible record; reference "
                   "model and adversarial images made and cached here)")
    options = {
        "reduced_amplitude": Option(1.0, "amplitude of the four-corner trigger (BackdoorBench's reduced_amplitude; "
                                         "1: full black/white corners)", check=FRACTION),
        "lc_eps": Option(8.0, "PGD L_inf budget in pixel units (0-255)", check=POSITIVE),
        "lc_step": Option(1.5, "PGD step size in pixel units (0-255)", check=POSITIVE),
        "lc_steps": Option(100, "PGD steps", check=POS_INT),
        "lc_batch_size": Option(256, "PGD batch size", check=POS_INT),
        "lc_reference": Option("adversarial", "the model the PGD attacks: 'adversarial' (a PGD adversarially trained "
                                              "model of the same data and architecture, made and cached here; "
                                              "BackdoorBench and the paper) or 'standard' (the clean reference record; "
                                              "an ablation: its perturbations are non-robust features)",
                               choices=REFERENCES),
        "lc_adv_epochs": Option(None, "adversarial training epochs of the reference (default: this config's epochs; "
                                      "BackdoorBench's resource yaml: 100)", type=int, check=POS_INT),
        "lc_adv_lr": Option(None, "adversarial training learning rate (default: this config's lr; BackdoorBench's "
                                  "resource yaml: 0.01, SGD momentum 0.9, wd 5e-4, cosine, batch 128 as its attacks)",
                            type=float, check=POSITIVE),
        "lc_adv_eps": Option(8.0, "adversarial training PGD budget, pixel units (Madry et al.'s CIFAR-10 model: 8)",
                             check=POSITIVE),
        "lc_adv_step": Option(2.0, "adversarial training PGD step, pixel units (Madry et al.: 2)", check=POSITIVE),
        "lc_adv_steps": Option(10, "adversarial training PGD steps, random start (BackdoorBench's model name "
                                   "cifar_resnet_e8_a2_s10: eps 8, step 2, 10 steps)", check=POS_INT),
        "lc_adv_seed": Option(0, "seed of the adversarial training (the reference is cached per dataset, model and "
                                 "settings, not per attack seed: BackdoorBench uses one model per dataset)",
                              check=SEED),
        "lc_adv_heldout": Option(500, "first test images on which the reference's clean and PGD accuracy are measured "
                                      "(reported only)", check=NONNEG_INT),
        "lc_clean_record": Option(None, "clean reference record (name under record_root or path): the model the PGD "
                                        "attacks with lc_reference standard; with adversarial, its clean and PGD "
                                        "accuracy are reported next to the reference's when it exists. Default: "
                                        "clean_<dataset>_<model>_p0, else any clean record of the same dataset and "
                                        "model under record_root"),
        "lc_train_clean": Option(True, "lc_reference standard: train the clean reference record when it is missing "
                                       "(else: an error naming the command that makes it)"),
    }
    clean_label = True
    # the adversarial reference is made here; the standard ablation attacks the clean reference record: a study plans
    # it before this attack and passes it as lc_clean_record (run alone, the attack finds or trains it itself)
    needs = ("clean_reference",)
    need_keys = {"clean_reference": "lc_clean_record"}

    @staticmethod
    def needs_for(cfg) -> tuple:
        return ("clean_reference",) if cfg.lc_reference == "standard" and cfg.pratio > 0 else ()

    # ---- the clean model
    def _clean_info_matches(self, info: dict) -> str | None:
        """None when ``info`` (a record's info.pickle) is a clean record of this config's data and model."""
        c = self.cfg
        if info.get("attack") != "clean":
            return f"its attack is {info.get('attack')!r}, not a clean reference (pratio 0)"
        for k in ("dataset", "model") + _DATA_KEYS.get(c.dataset, ()):
            mine = getattr(c, k)
            theirs = info.get(k, _DATA_KEY_DEFAULTS.get(k))
            if k == "img_size" and mine is not None and theirs is not None:
                theirs = list(theirs)[:2]
            if theirs != mine:
                return f"its {k} is {theirs!r}, this attack's is {mine!r}"
        return None

    def _find_clean_record(self) -> tuple[Path | None, Path]:
        """(an existing matching clean record or None, the folder to train one into)."""

        c, root = self.cfg, self.ctx.record_root
        wanted = c.lc_clean_record or default_folder_name(self.name, c.replace(pratio=0.0))
        target = Path(wanted) if (Path(wanted).is_dir() or "/" in str(wanted)) else root / wanted
        if (target / "attack_result.pt").is_file():
            why = self._clean_info_matches(dict(safe_torch_load(target / "info.pickle")))
            if why:
                raise ConfigError(f"lc_clean_record {target} cannot be the clean model of this attack: {why}")
            return target, target
        if c.lc_clean_record is None and root.is_dir():
            for p in sorted(root.iterdir()):
                if (p / "attack_result.pt").is_file() and (p / "info.pickle").is_file():
                    try:
                        info = dict(safe_torch_load(p / "info.pickle"))
                    except Exception:
                        continue
                    if self._clean_info_matches(info) is None:
                        return p, target
        return None, target

    def _load_record_model(self, found: Path):

        res = safe_torch_load(found / "attack_result.pt")
        model = models.build_model(str(res["model_name"]), int(res["num_classes"]), tuple(self.ctx.info.img_size))
        load_state_dict_compat(model, res["model"])
        return engine.prepare_model(model, self.ctx.device)

    def _clean_model(self):

        c = self.cfg
        found, target = self._find_clean_record()
        if found is None:
            cmd = (f"python attack/lc.py --dataset {c.dataset} --model {c.model} ... --pratio 0 "
                   f"--save_folder_name {target.name} --record_root {self.ctx.record_root} (the same yaml as this run)")
            if not c.lc_train_clean:
                raise ConfigError(f"LC needs a clean model of {c.dataset}/{c.model} and found no clean reference "
                                  f"record ({target} is missing); make it with: {cmd}, or pass --lc_clean_record")
            self.ctx.log(f"no clean reference record of {c.dataset}/{c.model} under {self.ctx.record_root}: training "
                         f"it now into {target} (same as: {cmd})")
            cfg0 = c.replace(pratio=0.0, save_folder_name=target.name, record_root=str(target.parent),
                             overwrite=False)
            found = run_attack(get("attack", self.name), cfg0)
        self.ctx.log(f"clean model from {found}")
        self.clean_record = str(found)
        return self._load_record_model(found)

    # ---- the adversarially trained reference
    def adversarial_settings(self) -> dict:
        """Everything the adversarially trained reference depends on besides the data (its cache key)."""
        c = self.cfg
        return {"model": c.model, "epochs": int(c.lc_adv_epochs or c.epochs), "lr": float(c.lc_adv_lr or c.lr),
                "batch_size": int(c.batch_size), "optimizer": c.client_optimizer, "momentum": float(c.sgd_momentum),
                "wd": float(c.wd), "scheduler": c.lr_scheduler, "milestones": [int(m) for m in c.steplr_milestones],
                "eps": float(c.lc_adv_eps), "step": float(c.lc_adv_step), "steps": int(c.lc_adv_steps),
                "seed": int(c.lc_adv_seed), "hflip": bool(self.ctx.info.hflip), "pretrained": c.pretrained,
                "model_input_size": c.model_input_size}

    def _adversarial_model(self):

        c, d = self.cfg, self.ctx.data
        st = self.adversarial_settings()
        meta = {"format": 1, "kind": "lc adversarially trained reference", "dataset": c.dataset,
                "data": array_digest(d.train_x, d.train_y), "num_classes": self.ctx.num_classes,
                "img_size": [int(v) for v in self.ctx.info.img_size], **st}
        path = self.ctx.cache_dir / "lc" / f"adv_{c.dataset}_{c.model}_{cache_key(meta)}.pt"

        def fresh():
            engine.seed_everything(st["seed"])
            return self.new_model()

        def build():
            self.ctx.log(f"adversarial training of the reference {c.model} on {len(d.train_x)} training images: "
                         f"{st['epochs']} epochs, PGD eps {st['eps']:g}/255, step {st['step']:g}/255, {st['steps']} "
                         f"steps, random start ({st['steps'] + 1} forward/backward passes per batch)")
            model = fresh()
            rows = adversarial_train(model, d.train_x, d.train_y, self.normalizer(), epochs=st["epochs"],
                                     batch_size=st["batch_size"], lr=st["lr"], optimizer=st["optimizer"],
                                     momentum=st["momentum"], wd=st["wd"], scheduler=st["scheduler"],
                                     milestones=st["milestones"], eps=st["eps"], step=st["step"], steps=st["steps"],
                                     hflip=st["hflip"], seed=st["seed"], device=self.ctx.device,
                                     progress=self.ctx.progress, desc=f"lc adversarial reference {c.dataset}")
            return {"model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
                    "train_adv_acc": [float(r["train_acc"]) for r in rows]}

        def load(obj):
            model = fresh()
            model.load_state_dict(obj["model"], strict=True)
            return model

        obj = load_or_build(path, meta, build, self.ctx.log, "lc adversarial reference", check=load)
        self.adv_cache = str(path)
        return load(obj).eval()

    def _robustness(self, model) -> tuple[float, float]:
        """(clean, PGD) accuracy on the first lc_adv_heldout test images, under the adversarial training's PGD."""
        c, d = self.cfg, self.ctx.data
        n = min(int(c.lc_adv_heldout), len(d.test_y))
        return clean_and_pgd_accuracy(model, self.normalizer(), d.test_x[:n], d.test_y[:n], eps=c.lc_adv_eps,
                                      step=c.lc_adv_step, steps=c.lc_adv_steps, device=self.ctx.device,
                                      seed=c.lc_adv_seed, batch_size=c.lc_batch_size)

    def reference_model(self):
        """The model the PGD attacks (lc_reference), with its robustness measured and logged."""
        c = self.cfg
        if c.lc_reference == "standard":
            model = self._clean_model()
        else:
            model = self._adversarial_model()
            found, _ = self._find_clean_record()  # the standard model, for comparison only (never trained here)
            if found is not None:
                self.clean_record = str(found)
                self.standard_acc = self._robustness(self._load_record_model(found))
        self.reference_acc = self._robustness(model)
        n = min(int(c.lc_adv_heldout), len(self.ctx.data.test_y))
        msg = (f"{c.lc_reference} reference on {n} test images: clean accuracy {self.reference_acc[0]:.3f}, PGD "
               f"(eps {c.lc_adv_eps:g}/255, {c.lc_adv_steps} steps) accuracy {self.reference_acc[1]:.3f}")
        if hasattr(self, "standard_acc"):
            msg += f"; the standard clean model: {self.standard_acc[0]:.3f}, {self.standard_acc[1]:.3f}"
        self.ctx.log(msg)
        return model

    # ---- resources
    def prepare(self) -> None:
        self.adv_idx = np.zeros(0, np.int64)
        self.adv_images = None
        if self.cfg.pratio == 0:  # the clean reference: no poisoned training samples, no adversarial images
            return

        c, d = self.cfg, self.ctx.data
        if c.attack_label_trans != "all2one":
            raise ConfigError(f"{self.name} is a clean-label attack: only attack_label_trans all2one is defined")
        model = self.reference_model()
        self.reference_digest = model_digest(model)
        idx = np.flatnonzero(d.train_y == c.attack_target).astype(np.int64)
        meta = {"format": 1, "reference": c.lc_reference, "weights": self.reference_digest, "dataset": c.dataset,
                "data": array_digest(d.train_x[idx], d.train_y[idx]), "eps": float(c.lc_eps), "step": float(c.lc_step),
                "steps": int(c.lc_steps), "seed": int(c.random_seed)}
        path = self.ctx.cache_dir / "lc" / f"{c.dataset}_{c.model}_{cache_key(meta)}.pt"

        def build():
            self.ctx.log(f"PGD (eps {c.lc_eps}/255, step {c.lc_step}/255, {c.lc_steps} steps) on {len(idx)} "
                         f"target-class training images against the {c.lc_reference} reference")
            engine.seed_everything(c.random_seed)
            adv = pgd_linf(model, self.normalizer(), d.train_x[idx], d.train_y[idx], eps=c.lc_eps, step=c.lc_step,
                           steps=c.lc_steps, device=self.ctx.device, batch_size=c.lc_batch_size)
            return {"indices": torch.as_tensor(idx), "images": torch.as_tensor(adv)}

        def check(obj):
            if not np.array_equal(obj["indices"].numpy(), idx) or tuple(obj["images"].shape) != d.train_x[idx].shape:
                raise ValueError("indices or image shape do not match the data")

        obj = load_or_build(path, meta, build, self.ctx.log, "lc adversarial images", check=check)
        self.adv_idx, self.adv_images = idx, obj["images"].numpy().astype(np.uint8)
        with torch.no_grad():

            acc = engine.evaluate_loss_acc(model, DeviceDataset(self.adv_images, d.train_y[idx], self.ctx.device),
                                           self.normalizer())[1]
        self.reference_acc_on_adv = float(acc)
        self.ctx.log(f"the reference's accuracy on the adversarial target-class images: {acc:.3f}")
        self.cache_file = str(path)

    def apply(self, images: np.ndarray, *, split: str, indices: np.ndarray) -> np.ndarray:
        if split == "train":
            pos = np.searchsorted(self.adv_idx, indices)
            if len(indices) and (pos.max() >= len(self.adv_idx) or not np.array_equal(self.adv_idx[pos], indices)):
                raise ValueError("lc poisons target-class training images only")
            images = self.adv_images[pos]
        return apply_lc_corners(images, amplitude=self.cfg.reduced_amplitude)

    def info(self) -> dict:
        c = self.cfg
        out = {"reduced_amplitude": c.reduced_amplitude, "lc_eps": c.lc_eps, "lc_step": c.lc_step,
               "lc_steps": c.lc_steps, "lc_reference": c.lc_reference}
        if c.lc_reference == "adversarial":
            out["lc_adv_settings"] = self.adversarial_settings()
        for k in ("clean_record", "adv_cache", "reference_digest", "cache_file", "reference_acc_on_adv"):
            if hasattr(self, k):
                out[f"lc_{k}"] = getattr(self, k)
        for k in ("reference", "standard"):  # (clean, PGD) accuracy on the held-out test images
            if hasattr(self, f"{k}_acc"):
                out[f"lc_{k}_clean_acc"], out[f"lc_{k}_pgd_acc"] = getattr(self, f"{k}_acc")
        return out

    def artifacts(self) -> dict:

        if not hasattr(self, "reference_acc"):
            return {}
        i, c = self.info(), self.cfg
        doc = {"reference": c.lc_reference, "weights_sha256": i.get("lc_reference_digest"),
               "cache": i.get("lc_adv_cache", i.get("lc_clean_record")),
               "heldout_test_images": min(int(c.lc_adv_heldout), len(self.ctx.data.test_y)),
               "pgd": {"eps": c.lc_adv_eps, "step": c.lc_adv_step, "steps": c.lc_adv_steps, "random_start": True},
               "clean_acc": round(self.reference_acc[0], 5), "pgd_acc": round(self.reference_acc[1], 5),
               "acc_on_poisoned_target_images": round(self.reference_acc_on_adv, 5)}
        if c.lc_reference == "adversarial":
            doc["adversarial_training"] = self.adversarial_settings()
        if hasattr(self, "standard_acc"):
            doc["standard_clean_model"] = {"record": self.clean_record, "clean_acc": round(self.standard_acc[0], 5),
                                           "pgd_acc": round(self.standard_acc[1], 5)}
        return {"lc_reference.yaml": yaml.safe_dump(doc, sort_keys=False)}


    @classmethod
    def record_trigger(cls, info: dict):
        """The four-corner trigger at the record's reduced_amplitude: what the poisoned TEST images get (no adversarial
        perturbation; BackdoorBench's label_consistent records carry reduced_amplitude too)."""
        if info.get("reduced_amplitude") is None:
            return None
        amplitude = float(info["reduced_amplitude"])
        return lambda images: apply_lc_corners(images, amplitude=amplitude)


