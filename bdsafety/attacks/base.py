"""The attack contract and the scaffold that turns an attack into a BackdoorBench record.

An attack is a registered subclass of :class:`Attack`::

    @register_attack
    class MyAttack(Attack):
        name = "my_attack"                       # attack/my_attack.py, config/attack/my_attack/<dataset>.yaml
        description = "..."
        options = {"my_strength": Option(0.1, "...", check=POSITIVE)}   # merged with COMMON_ATTACK_SCHEMA
        clean_label = False                      # poison indices from the target class only (SIG, LC)

        def prepare(self):                       # build resources (may cache under self.ctx.cache_dir)
            ...
        def apply(self, images, *, split, indices):   # uint8 (n, H, W, C) -> triggered uint8 images
            ...

Data-poisoning attacks only implement ``apply`` (and optionally ``prepare``, ``info``, ``artifacts``):
``Attack.run`` poisons round(pratio * N) training samples, trains the model with the engine and returns an
:class:`AttackOutcome`. Training-controlled attacks (WaNet, Input-Aware) override ``run`` and use the same
building blocks (``select_poison``, ``make_split``, ``new_model``, ``train``, ``evalsets``). ``run_attack`` writes
the outcome as a record folder through the one safe output path. ``--pratio 0`` on any attack trains the clean
reference model (its record's ``attack`` is 'clean'; its bd_test still carries this attack's trigger).
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable

import numpy as np
import torch

from bdsafety.attacks.poison import LABEL_TRANS, backdoor_labels, select_test_poison, select_train_poison
from bdsafety.config import (FRACTION, NONNEG, NONNEG_INT, POS_INT, POSITIVE, SEED, ConfigError, Option, dump_yaml,
                             int_list, resolve_device, run_metadata)
from bdsafety.data.poisoned import PoisonedSplit
from bdsafety.outputs import DEPENDENTS
from bdsafety.registry import DATASET_CONFIGS, register

DATASET_CHOICES = ("cifar10", "cifar100", "gtsrb", "tiny", "imagefolder", "synthetic")

COMMON_ATTACK_SCHEMA = {
    "dataset": Option("cifar10", "clean dataset", choices=DATASET_CHOICES),
    "dataset_path": Option("./data", "folder holding <dataset>/ (BackdoorBench convention: --dataset_path ./data)"),
    "model": Option("preactresnet18", "model registry name", kind="model"),
    "pretrained": Option(None, "backbone weights: a local file, or a torchvision weights name (DEFAULT, IMAGENET1K_V1) "
                               "read from the local torch cache; the classifier is re-initialised for the classes",
                         type=str),
    "model_input_size": Option(None, "upsample every batch on the device to this square size inside the model (e.g. 224 "
                                     "for ImageNet backbones; torchvision architectures only)", type=int, check=POS_INT),
    "pratio": Option(0.1, "fraction of training samples poisoned (0: clean reference model)", check=FRACTION),
    "attack_target": Option(0, "target label (all2one)", check=NONNEG_INT),
    "attack_label_trans": Option("all2one", "label transform", choices=LABEL_TRANS),
    "epochs": Option(100, "training epochs", check=POS_INT),
    "batch_size": Option(128, "batch size", check=POS_INT),
    "lr": Option(0.01, "learning rate", check=POSITIVE),
    "client_optimizer": Option("sgd", "optimizer", choices=("sgd", "adam")),
    "sgd_momentum": Option(0.9, "SGD momentum", check=NONNEG),
    "wd": Option(5e-4, "weight decay", check=NONNEG),
    "lr_scheduler": Option("cosine", "per-epoch schedule", choices=("cosine", "multistep", "none")),
    "steplr_milestones": Option([], "milestones (epochs) for multistep", type=int_list, check=POS_INT),
    "device": Option("auto", "cpu, cuda, cuda:N or auto", kind="device"),
    "random_seed": Option(0, "seed for poison indices, init and batches", check=SEED),
    "save_folder_name": Option(None, "record folder name under record_root (default: <attack>_<dataset>_<model>_p<pratio>)",
                               kind="folder_name"),
    "record_root": Option("./record", "where record folders live (e.g. a BackdoorBench checkout's record/)"),
    "overwrite": Option(False, "replace an existing record folder"),
    "dependents": Option("ask", "with --overwrite, what to do with results computed from the old record (its defense/, "
                                "ra/, lmc/ folders): 'ask' refuses and lists them, 'delete', or 'archive' (moved to "
                                "<record_root>/.archive/)", choices=DEPENDENTS),
    "eval_every": Option(1, "evaluate the test sets every N epochs (and at the last)", check=POS_INT),
    "eval_batch_size": Option(1024, "evaluation batch size", check=POS_INT),
    "no_progress": Option(False, "disable the progress bar"),
    "img_size": Option(None, "imagefolder only: H,W to resize to (default: size of the first image)", type=int_list,
                       check=POS_INT),
    "synthetic_n_train": Option(5000, "synthetic only: training images", check=POS_INT),
    "synthetic_n_test": Option(1000, "synthetic only: test images", check=POS_INT),
    "synthetic_seed": Option(0, "synthetic only: generator seed", check=SEED),
}

# sub-folders a record writes itself; anything else in an existing record is a result computed from it
RECORD_OWN = ("bd_train_dataset", "bd_test_dataset", "cross_test_dataset", "log")


@dataclass
class AttackContext:
    """What an attack works with: the resolved config, the clean data, the device and where to cache resources."""

    cfg: SimpleNamespace
    data: Any  # bdsafety.data.datasets.CleanData
    device: str
    record_root: Path
    record_name: str
    log: Callable[[str], None]
    progress: bool = True

    @property
    def cache_dir(self) -> Path:
        """Shared resource cache (<record_root>/.cache/): encoders, adversarial images, keyed by what made them."""
        return self.record_root / ".cache"

    @property
    def info(self):
        return self.data.info

    @property
    def num_classes(self) -> int:
        return int(self.data.info.num_classes)


@dataclass
class AttackOutcome:
    """A trained (backdoored or clean reference) model and everything its record holds."""

    model: torch.nn.Module
    rows: list[dict]
    bd_train: PoisonedSplit | None  # None: the attack stores no poisoned training samples
    bd_test: PoisonedSplit
    info: dict = field(default_factory=dict)  # extra info.pickle keys (plain values)
    artifacts: dict = field(default_factory=dict)  # extra files in the record folder (bdsafety.outputs.write_artifact)


class Attack:
    """Base of every registered attack; see the module docstring."""

    name: str = ""
    description: str = ""
    options: dict[str, Option] = {}
    clean_label: bool = False
    configs: tuple = DATASET_CONFIGS + ("demo",)
    needs: tuple = ()  # registry NEEDS besides the data, e.g. ("clean_reference",) (the study runner orders jobs by it)

    def __init__(self, ctx: AttackContext):
        self.ctx = ctx
        self.cfg = ctx.cfg

    # ---- what an attack defines
    def prepare(self) -> None:
        """Build or load the attack's resources before poisoning (default: nothing)."""

    def apply(self, images: np.ndarray, *, split: str, indices: np.ndarray) -> np.ndarray:
        """Triggered copies of uint8 (n, H, W, C) ``images`` of ``split`` ('train' or 'test') at ``indices``."""
        raise NotImplementedError(f"attack {self.name} defines no apply(); a training-controlled attack overrides run()")

    def info(self) -> dict:
        """Extra keys for info.pickle (plain values: str, int, float, bool, lists, dicts)."""
        return {}

    def artifacts(self) -> dict:
        """Extra files for the record folder: name -> value (bdsafety.outputs.write_artifact)."""
        return {}

    # ---- building blocks
    def select_poison(self) -> np.ndarray:
        d, c = self.ctx.data, self.cfg
        if self.clean_label and c.attack_label_trans != "all2one":
            raise ConfigError(f"{self.name} is a clean-label attack: only attack_label_trans all2one is defined")
        return select_train_poison(d.train_y, c.pratio, label_trans=c.attack_label_trans, target=c.attack_target,
                                   clean_label=self.clean_label, seed=c.random_seed)

    def test_poison_indices(self) -> np.ndarray:
        return select_test_poison(self.ctx.data.test_y, label_trans=self.cfg.attack_label_trans, target=self.cfg.attack_target)

    def make_split(self, split: str, idx: np.ndarray, images: np.ndarray | None = None) -> PoisonedSplit:
        """The PoisonedSplit of ``split`` at ``idx`` (images from ``apply`` unless given)."""
        d, c = self.ctx.data, self.cfg
        x, y = (d.train_x, d.train_y) if split == "train" else (d.test_x, d.test_y)
        if images is None:
            images = self.apply(x[idx], split=split, indices=idx) if len(idx) else np.zeros((0, *x.shape[1:]), np.uint8)
        labels = y[idx]
        bd = labels.copy() if (self.clean_label and split == "train") else backdoor_labels(labels, c.attack_label_trans,
                                                                                           c.attack_target, self.ctx.num_classes)
        return PoisonedSplit(indices=idx, images=images, bd_labels=bd, orig_labels=labels, length=len(y))

    def new_model(self) -> torch.nn.Module:
        from bdsafety import engine
        from bdsafety.models import build_model

        c = self.cfg
        model = build_model(c.model, self.ctx.num_classes, tuple(self.ctx.info.img_size), input_size=c.model_input_size,
                            pretrained=c.pretrained)
        return engine.prepare_model(model, self.ctx.device)

    def normalizer(self):
        from bdsafety.data.device import Normalizer

        return Normalizer(self.ctx.info, self.ctx.device)

    def evalsets(self, bd_test: PoisonedSplit):
        from bdsafety import engine
        from bdsafety.data.device import DeviceDataset

        d, dev = self.ctx.data, self.ctx.device
        return engine.EvalSets(clean=DeviceDataset(d.test_x, d.test_y, dev), bd=DeviceDataset(bd_test.images, bd_test.bd_labels, dev),
                               bd_orig_y=torch.as_tensor(bd_test.orig_labels, device=dev))

    def train(self, model, train_x: np.ndarray, train_y: np.ndarray, bd_test: PoisonedSplit, *, batch_fn=None,
              on_epoch_end=None, augment: bool = True) -> list[dict]:
        """Train ``model`` on (train_x, train_y) with the config's optimizer and schedule; rows per epoch.
        ``augment=False``: no crop/flip before ``batch_fn`` (an attack that augments after poisoning, e.g. WaNet)."""
        from bdsafety import engine
        from bdsafety.data.device import DeviceDataset

        c = self.cfg
        gen = engine.seed_everything(c.random_seed)
        opt = engine.make_optimizer(model.parameters(), c.client_optimizer, c.lr, c.sgd_momentum, c.wd)
        sched = engine.make_scheduler(opt, c.lr_scheduler, c.epochs, c.steplr_milestones)
        return engine.fit(
            model, DeviceDataset(train_x, train_y, self.ctx.device), norm=self.normalizer(), epochs=c.epochs,
            batch_size=c.batch_size, step_fn=engine.sgd_step(opt), scheduler=sched, optimizer=opt, batch_fn=batch_fn,
            augment=augment, hflip=self.ctx.info.hflip, evalsets=self.evalsets(bd_test), eval_every=c.eval_every,
            eval_batch_size=c.eval_batch_size, generator=gen, desc=f"{self.name} {c.dataset}", progress=self.ctx.progress,
            on_epoch_end=on_epoch_end)

    # ---- the data-poisoning pipeline
    def run(self) -> AttackOutcome:
        self.prepare()
        d = self.ctx.data
        bd_train = self.make_split("train", self.select_poison())
        bd_test = self.make_split("test", self.test_poison_indices())
        train_x, train_y = d.train_x.copy(), d.train_y.copy()
        train_x[bd_train.indices] = bd_train.images
        train_y[bd_train.indices] = bd_train.bd_labels
        from bdsafety import engine

        engine.seed_everything(self.cfg.random_seed)
        model = self.new_model()
        rows = self.train(model, train_x, train_y, bd_test)
        return AttackOutcome(model, rows, bd_train, bd_test, self.info(), self.artifacts())


def register_attack(cls: type[Attack]) -> type[Attack]:
    """Class decorator: register an Attack subclass under ``cls.name``."""
    if not cls.name:
        raise ValueError(f"{cls.__name__} has no name")
    clash = sorted(set(cls.options) & set(COMMON_ATTACK_SCHEMA))
    if clash:
        raise ValueError(f"attack {cls.name}: options {clash} clash with the common attack options")

    def run(ctx: AttackContext) -> AttackOutcome:
        return cls(ctx).run()

    run.__module__ = cls.__module__
    run.attack_class = cls
    register("attack", cls.name, schema=lambda: {**COMMON_ATTACK_SCHEMA, **cls.options},
             description=cls.description or f"{cls.name} attack (BackdoorBench-compatible record)", configs=cls.configs,
             needs=cls.needs)(run)
    return cls


# ------------------------------------------------------------------------------------------- the scaffold
def dataset_root(dataset_path: str, dataset: str) -> str:
    return os.path.join(dataset_path, dataset)


def load_data_for(cfg: SimpleNamespace):
    """Clean data for an attack config (synthetic is generated from its seed/sizes)."""
    from bdsafety.data.datasets import load_clean_dataset

    kw = {}
    if cfg.dataset == "synthetic":
        kw = dict(n_train=cfg.synthetic_n_train, n_test=cfg.synthetic_n_test, seed=cfg.synthetic_seed)
    if cfg.dataset == "imagefolder" and cfg.img_size:
        kw["img_size"] = tuple(cfg.img_size)
    return load_clean_dataset(cfg.dataset, dataset_root(cfg.dataset_path, cfg.dataset), **kw)


def default_folder_name(attack: str, cfg) -> str:
    kind = "clean" if cfg.pratio == 0 else attack
    return f"{kind}_{cfg.dataset}_{cfg.model}_p{cfg.pratio:g}"


def check_model_config(cfg: SimpleNamespace, num_classes: int, img_size: tuple) -> None:
    """Fail before poisoning and training: unknown model, an image size it cannot take, a --pretrained that is not
    there (the model is built on the meta device: no memory, no weights)."""
    from bdsafety.models import build_model
    from bdsafety.models.pretrained import resolve_pretrained

    with torch.device("meta"):
        build_model(cfg.model, num_classes, img_size, input_size=cfg.model_input_size)
    if cfg.pretrained:
        resolve_pretrained(cfg.model, cfg.pretrained)


def run_attack(method, cfg: SimpleNamespace) -> Path:
    """Run the registered attack ``method`` with ``cfg``; write and return the record folder."""
    from bdsafety import engine
    from bdsafety.outputs import OutputFolder, write_artifact
    from bdsafety.records import save_attack_record, write_metrics_csv
    from bdsafety.safeio import atomic_write_text

    t0 = time.time()
    name = cfg.save_folder_name or default_folder_name(method.name, cfg)
    record_root = Path(cfg.record_root)
    record_dir = record_root / name
    out = OutputFolder(record_dir, overwrite=cfg.overwrite, dependents=cfg.dependents, own=RECORD_OWN, what="record")
    device = resolve_device(cfg.device)
    data = load_data_for(cfg)
    nc = data.info.num_classes
    if not 0 <= cfg.attack_target < nc:
        raise ConfigError(f"attack_target {cfg.attack_target} is not a class of {cfg.dataset} (0..{nc - 1})")
    check_model_config(cfg, nc, tuple(data.info.img_size))

    def log(msg: str):
        print(f"[{method.name}] {msg}", flush=True)

    ctx = AttackContext(cfg=cfg, data=data, device=device, record_root=record_root, record_name=name, log=log,
                        progress=not cfg.no_progress)
    outcome = method.run(ctx)
    engine.check_finite_model(outcome.model, f"attack {method.name}")

    args = {k: v for k, v in vars(cfg).items() if not k.startswith("_")}
    args.update(
        attack="clean" if cfg.pratio == 0 else method.name, trigger=method.name, num_classes=nc,
        img_size=tuple(data.info.img_size), input_height=data.info.img_size[0], input_width=data.info.img_size[1],
        input_channel=data.info.img_size[2], dataset_path=cfg.dataset_path, save_path=str(record_dir), **outcome.info)
    with out:
        for fname, value in outcome.artifacts.items():
            write_artifact(out.path / fname, value)
        write_metrics_csv(outcome.rows, out.path, "attack")
        atomic_write_text(out.path / "config.yaml", dump_yaml(run_metadata(cfg, device, time.time() - t0, attack=method.name,
                                                                           record=str(record_dir))))
        save_attack_record(
            out.path, name=name, model_state={k: v.detach().cpu() for k, v in outcome.model.state_dict().items()},
            model_name=cfg.model, num_classes=nc, clean_data=cfg.dataset, data_path=dataset_root(cfg.dataset_path, cfg.dataset),
            img_size=tuple(data.info.img_size), bd_train=outcome.bd_train, bd_test=outcome.bd_test, info=args,
        )
    log(f"record written to {record_dir}")
    log(f"{engine.format_metrics(outcome.rows[-1])}  ({time.time() - t0:.0f}s on {device})")
    return record_dir
