"""Label-consistent backdoor (LC; Turner et al., 2019) as BackdoorBench v2.2 runs it, with every resource made here.

1. A clean model: this project's clean reference record of the same dataset and model (``--lc_clean_record``;
   default ``clean_<dataset>_<model>_p0``, else any clean record of the same data and model under record_root).
   When none exists it is trained on demand (``lc_train_clean``) and written as an ordinary record, the same as
   ``python attack/lc.py --yaml_path <yaml> --pratio 0 --save_folder_name <name>``.
2. Untargeted L_inf PGD on every target-class training image against the clean model (BackdoorBench's
   resource/label-consistent/craft_adv_dataset.py: eps 8/255, step 1.5/255, 100 steps, no random start), rounded
   to uint8 within the budget. Cached in <record_root>/.cache/lc/ keyed on the clean model's weights hash, the
   data, eps, step, steps and seed; a corrupt cache or one made for other inputs is rebuilt with a message.
   (BackdoorBench and the paper attack an adversarially trained model; this project uses its clean reference.)
3. Poisoned training samples = round(pratio * N) target-class images (clean label: labels unchanged), each the
   adversarial image plus the four-corner trigger at ``reduced_amplitude`` (BackdoorBench's default 1.0).
   Poisoned test samples = every non-target test image with the trigger only.
"""
from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from bdsafety.attacks.base import Attack, default_folder_name, register_attack
from bdsafety.attacks.resources import array_digest, cache_key, load_or_build
from bdsafety.attacks.triggers import apply_lc_corners
from bdsafety.config import FRACTION, POS_INT, POSITIVE, ConfigError, Option

# what must agree for a clean record to stand for "the same data" (besides dataset and model)
_DATA_KEYS = {"synthetic": ("synthetic_n_train", "synthetic_n_test", "synthetic_seed"), "imagefolder": ("img_size",)}


def pgd_linf(model, norm, images: np.ndarray, labels: np.ndarray, *, eps: float, step: float, steps: int,
             device, batch_size: int = 256) -> np.ndarray:
    """Untargeted L_inf PGD (no random start) on uint8 (n, H, W, C) images; eps and step in pixel units (0-255).
    Returns uint8 images with |adv - x| <= eps (after rounding) and values in [0, 255]."""
    from bdsafety import engine

    was_training = model.training
    model.eval()
    req = [p.requires_grad for p in model.parameters()]
    model.requires_grad_(False)
    out = np.empty_like(images)
    e, a = eps / 255.0, step / 255.0
    try:
        for s in range(0, len(images), batch_size):
            x0 = torch.as_tensor(images[s:s + batch_size], device=device).permute(0, 3, 1, 2).float() / 255.0
            y = torch.as_tensor(labels[s:s + batch_size], device=device, dtype=torch.long)
            x = x0.clone()
            for _ in range(steps):
                x.requires_grad_(True)
                with engine.fp32(device):
                    loss = F.cross_entropy(model(norm(x)), y)
                (g,) = torch.autograd.grad(loss, x)
                x = x.detach() + a * g.sign()
                x = (x0 + (x - x0).clamp(-e, e)).clamp(0, 1)
            q = torch.round(x * 255.0)
            base = x0 * 255.0
            q = torch.minimum(torch.maximum(q, base - eps), base + eps).clamp(0, 255)
            out[s:s + batch_size] = q.round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    finally:
        for p, r in zip(model.parameters(), req):
            p.requires_grad_(r)
        model.train(was_training)
    return out


@register_attack
class LabelConsistent(Attack):
    name = "lc"
    description = ("Label-consistent attack: PGD-perturbed target-class images + four-corner trigger, clean label "
                   "(BackdoorBench-compatible record; clean model and adversarial images made and cached here)")
    options = {
        "reduced_amplitude": Option(1.0, "amplitude of the four-corner trigger (BackdoorBench's reduced_amplitude; "
                                         "1: full black/white corners)", check=FRACTION),
        "lc_eps": Option(8.0, "PGD L_inf budget in pixel units (0-255)", check=POSITIVE),
        "lc_step": Option(1.5, "PGD step size in pixel units (0-255)", check=POSITIVE),
        "lc_steps": Option(100, "PGD steps", check=POS_INT),
        "lc_batch_size": Option(256, "PGD batch size", check=POS_INT),
        "lc_clean_record": Option(None, "clean reference record (name under record_root or path) whose model the PGD "
                                        "attacks; default: clean_<dataset>_<model>_p0, else any clean record of the "
                                        "same dataset and model under record_root"),
        "lc_train_clean": Option(True, "train the clean reference record when it is missing (else: an error naming "
                                       "the command that makes it)"),
    }
    clean_label = True
    needs = ("clean_reference",)

    # ---- the clean model
    def _clean_info_matches(self, info: dict) -> str | None:
        """None when ``info`` (a record's info.pickle) is a clean record of this config's data and model."""
        c = self.cfg
        if info.get("attack") != "clean":
            return f"its attack is {info.get('attack')!r}, not a clean reference (pratio 0)"
        for k in ("dataset", "model") + _DATA_KEYS.get(c.dataset, ()):
            mine = getattr(c, k)
            theirs = info.get(k)
            if k == "img_size" and mine is not None and theirs is not None:
                theirs = list(theirs)[:2]
            if theirs != mine:
                return f"its {k} is {theirs!r}, this attack's is {mine!r}"
        return None

    def _find_clean_record(self) -> tuple[Path | None, Path]:
        """(an existing matching clean record or None, the folder to train one into)."""
        from bdsafety.safeio import safe_torch_load

        c, root = self.cfg, self.ctx.record_root
        wanted = c.lc_clean_record or default_folder_name(self.name, SimpleCfg(c, pratio=0.0))
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

    def _clean_model(self):
        from bdsafety.attacks.base import run_attack
        from bdsafety.models import build_model
        from bdsafety.models.registry import load_state_dict_compat
        from bdsafety.registry import get
        from bdsafety.safeio import safe_torch_load

        c = self.cfg
        found, target = self._find_clean_record()
        if found is None:
            cmd = (f"python attack/lc.py --dataset {c.dataset} --model {c.model} ... --pratio 0 "
                   f"--save_folder_name {target.name} --record_root {self.ctx.record_root} (the same yaml as this run)")
            if not c.lc_train_clean:
                raise ConfigError(f"LC needs a clean model of {c.dataset}/{c.model} and found no clean reference record "
                                  f"({target} is missing); make it with: {cmd}, or pass --lc_clean_record")
            self.ctx.log(f"no clean reference record of {c.dataset}/{c.model} under {self.ctx.record_root}: training it "
                         f"now into {target} (same as: {cmd})")
            cfg0 = SimpleCfg(c, pratio=0.0, save_folder_name=target.name, record_root=str(target.parent),
                             overwrite=False)
            found = run_attack(get("attack", self.name), cfg0)
        self.ctx.log(f"clean model from {found}")
        res = safe_torch_load(found / "attack_result.pt")
        model = build_model(str(res["model_name"]), int(res["num_classes"]), tuple(self.ctx.info.img_size))
        load_state_dict_compat(model, res["model"])
        from bdsafety import engine

        self.clean_record = str(found)
        return engine.prepare_model(model, self.ctx.device)

    # ---- resources
    def prepare(self) -> None:
        self.adv_idx = np.zeros(0, np.int64)
        self.adv_images = None
        if self.cfg.pratio == 0:  # the clean reference: no poisoned training samples, no adversarial images
            return
        from bdsafety.defenses.bti import model_digest

        c, d = self.cfg, self.ctx.data
        if c.attack_label_trans != "all2one":
            raise ConfigError(f"{self.name} is a clean-label attack: only attack_label_trans all2one is defined")
        model = self._clean_model()
        idx = np.flatnonzero(d.train_y == c.attack_target).astype(np.int64)
        meta = {"format": 1, "weights": model_digest(model), "dataset": c.dataset,
                "data": array_digest(d.train_x[idx], d.train_y[idx]), "eps": float(c.lc_eps), "step": float(c.lc_step),
                "steps": int(c.lc_steps), "seed": int(c.random_seed)}
        path = self.ctx.cache_dir / "lc" / f"{c.dataset}_{c.model}_{cache_key(meta)}.pt"

        def build():
            from bdsafety import engine

            self.ctx.log(f"PGD (eps {c.lc_eps}/255, step {c.lc_step}/255, {c.lc_steps} steps) on {len(idx)} "
                         f"target-class training images")
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
            from bdsafety import engine
            from bdsafety.data.device import DeviceDataset

            acc = engine.evaluate_loss_acc(model, DeviceDataset(self.adv_images, d.train_y[idx], self.ctx.device),
                                           self.normalizer())[1]
        self.clean_acc_on_adv = float(acc)
        self.ctx.log(f"clean model's accuracy on the adversarial target-class images: {acc:.3f}")
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
        out = {"reduced_amplitude": c.reduced_amplitude, "lc_eps": c.lc_eps, "lc_step": c.lc_step, "lc_steps": c.lc_steps}
        for k in ("clean_record", "cache_file", "clean_acc_on_adv"):
            if hasattr(self, k):
                out[f"lc_{k}"] = getattr(self, k)
        return out


    @classmethod
    def record_trigger(cls, info: dict):
        """The four-corner trigger at the record's reduced_amplitude: what the poisoned TEST images get (no adversarial
        perturbation; BackdoorBench's label_consistent records carry reduced_amplitude too)."""
        if info.get("reduced_amplitude") is None:
            return None
        amplitude = float(info["reduced_amplitude"])
        return lambda images: apply_lc_corners(images, amplitude=amplitude)


def SimpleCfg(cfg, **changes):
    """A copy of a resolved config namespace with ``changes``."""
    new = copy.copy(cfg)
    for k, v in changes.items():
        setattr(new, k, v)
    return new
