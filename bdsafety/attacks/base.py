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

from bdsafety import engine, models
from bdsafety.attacks.param_limit import ABI, PARAM_LIMIT_SCHEMA, abi_pairs
from bdsafety.attacks.poison import LABEL_TRANS, backdoor_labels, select_test_poison, select_train_poison
from bdsafety.config import (
    FRACTION,
    NONNEG,
    NONNEG_INT,
    POS_INT,
    POSITIVE,
    RUN_SCHEMA,
    SEED,
    Option,
    dump_yaml,
    int_list,
    resolve_device,
    run_metadata,
)
from bdsafety.data import datasets
from bdsafety.data.device import DeviceDataset, Normalizer, input_geometry, pil_resize
from bdsafety.data.info import NORMALIZATIONS
from bdsafety.data.poisoned import PoisonedSplit
from bdsafety.errors import ConfigError
from bdsafety.models.pretrained import resolve_pretrained
from bdsafety.outputs import DEPENDENTS, OutputFolder, write_artifact
from bdsafety.records import save_attack_record, write_metrics_csv
from bdsafety.registry import DATASET_CONFIGS, get, kind_runner, methods, register
from bdsafety.safeio import atomic_write_text

DATASET_CHOICES = ("cifar10", "cifar100", "gtsrb", "tiny", "imagefolder", "synthetic")

COMMON_ATTACK_SCHEMA = {
    "dataset": Option("cifar10", "clean dataset", choices=DATASET_CHOICES),
    "dataset_path": Option("./data", "folder holding <dataset>/ (BackdoorBench convention: --dataset_path ./data)"),
    "model": Option("preactresnet18", "model registry name", kind="model"),
    "pretrained": Option(None, "backbone weights: a local file, or a torchvision weights name (DEFAULT, IMAGENET1K_V1) "
                               "read from the local torch cache; the classifier is re-initialised for the classes",
                         type=str),
    "model_input_size": Option(None, "upsample every batch on the device to this square size inside the model (e.g. "
                                     "224 for ImageNet backbones; torchvision architectures only)", type=int,
                               check=POS_INT),
    "input_resize": Option(None, "resize every image to this square size BEFORE the trigger and the augmentation "
                                 "(Pillow's bilinear, bit-exact), as the official fork runs CIFAR-100/Tiny-ImageNet "
                                 "(224): poisoned images are stamped at this size and stored so in the record; clean "
                                 "images stay at their own size and are resized per batch on the device. None: the "
                                 "data's own size (BackdoorBench's CIFAR-10 pipeline). badnet, blended and sig only",
                           type=int, check=POS_INT),
    "input_crop": Option(None, "with input_resize: training random crop (after zero padding 4) and evaluation centre "
                               "crop (default: input_resize, i.e. Resize(224) -> RandomCrop(224, padding=4) as the "
                               "fork's attacks)", type=int, check=POS_INT),
    "normalization": Option("dataset", "mean/std of the input normalisation: 'dataset' (the dataset's own statistics, "
                                       "BackdoorBench's) or 'imagenet' (the official fork's CIFAR-100/Tiny pipeline "
                                       "for ImageNet-pretrained backbones)", choices=NORMALIZATIONS),
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
    "save_folder_name": Option(None, "record folder name under record_root (default: "
                                     "<attack>_<dataset>_<model>_p<pratio>)",
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
    "synthetic_difficulty": Option(0.0, "synthetic only: 0 (the easy demo task) to 1: clutter, distractor shapes, "
                                        "occlusion, lower contrast, noise (bdsafety/data/synthetic.py)",
                                   check=FRACTION),
    **PARAM_LIMIT_SCHEMA,
    **RUN_SCHEMA,
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
    needs_for = None  # staticmethod cfg -> the needs of one run (registry.Method.needs_for); None: always ``needs``
    need_keys: dict = {}  # need -> the option that receives it, where not the project-wide key (registry.NEED_KEYS)
    # supports input_resize: its trigger is defined at any image size (stamped after the resize)
    resizable: bool = False

    def __init__(self, ctx: AttackContext):
        self.ctx = ctx
        self.cfg = ctx.cfg

    @property
    def geometry(self):
        """The input geometry of ``input_resize`` / ``input_crop`` (None: the data's own size)."""
        return attack_geometry(self.cfg)

    @property
    def stamp_shape(self) -> tuple:
        """(H, W, C) of the images triggers are stamped on: the data's, or input_resize's (BackdoorBench resizes every
        image to img_size before its trigger transform)."""
        h, w, c = self.ctx.info.img_size
        g = self.geometry
        return (h, w, c) if g is None else (g.resize, g.resize, c)

    @property
    def model_img_size(self) -> tuple:
        """(H, W, C) of the batches the model is trained on (after the geometry's crop)."""
        h, w, c = self.ctx.info.img_size
        g = self.geometry
        return (h, w, c) if g is None else (g.crop, g.crop, c)

    def stamp_input(self, images: np.ndarray) -> np.ndarray:
        """``images`` (n, H, W, C) at the size triggers are stamped at: unchanged, or resized to input_resize on the
        device (Pillow's bilinear, bit-exact) in chunks."""
        g = self.geometry
        if g is None or images.shape[1:3] == (g.resize, g.resize):
            return images

        out = np.empty((len(images), g.resize, g.resize, images.shape[3]), dtype=np.uint8)
        for s in range(0, len(images), 512):
            t = torch.from_numpy(np.ascontiguousarray(images[s:s + 512])).to(self.ctx.device).permute(0, 3, 1, 2)
            out[s:s + 512] = pil_resize(t, g.resize).permute(0, 2, 3, 1).cpu().numpy()
        return out

    # ---- what an attack defines
    def prepare(self) -> None:
        """Build or load the attack's resources before poisoning (default: nothing)."""

    def apply(self, images: np.ndarray, *, split: str, indices: np.ndarray) -> np.ndarray:
        """Triggered copies of uint8 (n, H, W, C) ``images`` of ``split`` ('train' or 'test') at ``indices``."""
        raise NotImplementedError(f"attack {self.name} defines no apply(); "
                                  f"a training-controlled attack overrides run()")

    def info(self) -> dict:
        """Extra keys for info.pickle (plain values: str, int, float, bool, lists, dicts)."""
        return {}

    def artifacts(self) -> dict:
        """Extra files for the record folder: name -> value (bdsafety.outputs.write_artifact)."""
        return {}

    @classmethod
    def record_trigger(cls, info: dict) -> Callable[[np.ndarray], np.ndarray] | None:
        """The trigger this attack puts on its poisoned TEST images, rebuilt from a record's info.pickle ``info``: a
        function of uint8 (n, H, W, C) images; None (the default) when the record does not say how. QRA uses it to
        make triggered non-target-class TRAINING images for clean-label records (their bd_train holds target-class
        images only)."""
        return None

    @classmethod
    def rebuilds_trigger(cls) -> bool:
        """Whether this attack defines ``record_trigger``."""
        return cls.record_trigger.__func__ is not Attack.record_trigger.__func__

    # ---- building blocks
    def select_poison(self) -> np.ndarray:
        d, c = self.ctx.data, self.cfg
        if self.clean_label and c.attack_label_trans != "all2one":
            raise ConfigError(f"{self.name} is a clean-label attack: only attack_label_trans all2one is defined")
        return select_train_poison(d.train_y, c.pratio, label_trans=c.attack_label_trans, target=c.attack_target,
                                   clean_label=self.clean_label, seed=c.random_seed)

    def test_poison_indices(self) -> np.ndarray:
        return select_test_poison(self.ctx.data.test_y, label_trans=self.cfg.attack_label_trans,
                                  target=self.cfg.attack_target)

    def make_split(self, split: str, idx: np.ndarray, images: np.ndarray | None = None) -> PoisonedSplit:
        """The PoisonedSplit of ``split`` at ``idx`` (images from ``apply`` unless given)."""
        d, c = self.ctx.data, self.cfg
        x, y = (d.train_x, d.train_y) if split == "train" else (d.test_x, d.test_y)
        if images is None:
            images = (self.apply(self.stamp_input(x[idx]), split=split, indices=idx) if len(idx)
                      else np.zeros((0, *self.stamp_shape), np.uint8))
        labels = y[idx]
        bd = (labels.copy() if (self.clean_label and split == "train")
              else backdoor_labels(labels, c.attack_label_trans, c.attack_target, self.ctx.num_classes))
        return PoisonedSplit(indices=idx, images=images, bd_labels=bd, orig_labels=labels, length=len(y))

    def new_model(self) -> torch.nn.Module:

        c = self.cfg
        model = models.build_model(c.model, self.ctx.num_classes, self.model_img_size, input_size=c.model_input_size,
                            pretrained=c.pretrained)
        return engine.prepare_model(model, self.ctx.device)

    def normalizer(self):

        return Normalizer(self.ctx.info, self.ctx.device, self.cfg.normalization)

    def evalsets(self, bd_test: PoisonedSplit):

        d, dev, g = self.ctx.data, self.ctx.device, self.geometry
        return engine.EvalSets(clean=DeviceDataset(d.test_x, d.test_y, dev, geometry=g),
                               bd=DeviceDataset(bd_test.images, bd_test.bd_labels, dev, geometry=g),
                               bd_orig_y=torch.as_tensor(bd_test.orig_labels, device=dev))

    def train(self, model, train_x: np.ndarray, train_y: np.ndarray, bd_test: PoisonedSplit, *, batch_fn=None,
              on_epoch_end=None, augment: bool = True, alt=None) -> list[dict]:
        """Train ``model`` on (train_x, train_y) with the config's optimizer and schedule; rows per epoch.
        ``augment=False``: no crop/flip before ``batch_fn`` (an attack that augments after poisoning, e.g. WaNet).
        ``alt`` = (images, rows): samples stored at the resized size (the poisoned ones under input_resize)."""

        c = self.cfg
        gen = engine.seed_everything(c.random_seed)
        opt = engine.make_optimizer(model.parameters(), c.client_optimizer, c.lr, c.sgd_momentum, c.wd)
        sched = engine.make_scheduler(opt, c.lr_scheduler, c.epochs, c.steplr_milestones)
        return self.fit(model, train_x, train_y, bd_test, epochs=c.epochs, batch_size=c.batch_size,
                        step_fn=engine.sgd_step(opt), optimizer=opt, scheduler=sched, generator=gen, batch_fn=batch_fn,
                        augment=augment, alt=alt, on_epoch_end=on_epoch_end)

    def fit(self, model, train_x: np.ndarray, train_y: np.ndarray, bd_test: PoisonedSplit, *, epochs: int,
            batch_size: int, step_fn, optimizer=None, scheduler=None, generator=None, batch_fn=None,
            augment: bool = True, alt=None, on_epoch_end=None, desc: str | None = None) -> list[dict]:
        """engine.fit on (train_x, train_y) with this attack's device, normalisation, geometry and test sets: one
        training stage with a given step (``train`` is the config's one-stage SGD run; multi-stage attacks call this
        once per stage with their own optimizer and step, e.g. SAM)."""

        c = self.cfg
        return engine.fit(
            model, DeviceDataset(train_x, train_y, self.ctx.device, geometry=self.geometry, alt=alt),
            norm=self.normalizer(), epochs=epochs, batch_size=batch_size, step_fn=step_fn, scheduler=scheduler,
            optimizer=optimizer, batch_fn=batch_fn, augment=augment, hflip=self.ctx.info.hflip,
            evalsets=self.evalsets(bd_test), eval_every=c.eval_every, eval_batch_size=c.eval_batch_size,
            generator=generator, desc=desc or f"{self.name} {c.dataset}", progress=self.ctx.progress,
            on_epoch_end=on_epoch_end)

    # ---- the data-poisoning pipeline
    def run(self) -> AttackOutcome:
        self.prepare()
        d = self.ctx.data
        bd_train = self.make_split("train", self.select_poison())
        bd_test = self.make_split("test", self.test_poison_indices())
        train_y = d.train_y.copy()
        train_y[bd_train.indices] = bd_train.bd_labels
        if self.geometry is None:
            train_x, alt = d.train_x.copy(), None
            train_x[bd_train.indices] = bd_train.images
        else:  # poisoned images at the resized size beside the clean ones at their own size
            train_x, alt = d.train_x, (bd_train.images, bd_train.indices)

        engine.seed_everything(self.cfg.random_seed)
        model = self.new_model()
        hook = self.param_limit_hook(model, bd_train)
        rows = self.train(model, train_x, train_y, bd_test, alt=alt, on_epoch_end=hook)
        info = self.info()
        if hook is not None:
            info = {**info, "abi_history": hook.history}
        return AttackOutcome(model, rows, bd_train, bd_test, info, self.artifacts())

    def param_limit_hook(self, model, bd_train: PoisonedSplit):
        """The epoch hook of ``--param_limit`` (bdsafety/attacks/param_limit.py), or None ('none', or nothing
        poisoned)."""
        c = self.cfg
        if getattr(c, "param_limit", "none") == "none" or not len(bd_train.indices):
            return None

        clean, poisoned = abi_pairs(self, bd_train, c.abi_samples, c.random_seed)
        return ABI(model, clean, poisoned, self.normalizer(), c.abi_u, c.epochs, self.ctx.log)


# attack names BackdoorBench writes into info.pickle that this project registers under another name
ATTACK_ALIASES = {"label_consistent": "lc"}


def attack_class(name: str | None) -> type[Attack] | None:
    """The registered Attack subclass of ``name`` (an info.pickle 'attack' / 'trigger' value; BackdoorBench's names
    too), or None when it is not a registered data-poisoning attack."""
    if not name:
        return None
    try:
        m = get("attack", ATTACK_ALIASES.get(str(name), str(name)))
    except ConfigError:
        return None
    return getattr(m.run, "attack_class", None)


def record_trigger(info: dict) -> Callable[[np.ndarray], np.ndarray] | None:
    """The test-time trigger of the record whose info.pickle is ``info`` (see ``Attack.record_trigger``), or None."""
    cls = attack_class(info.get("trigger") or info.get("attack"))
    return None if cls is None else cls.record_trigger(info)


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
             needs=cls.needs, needs_for=cls.needs_for, need_keys=cls.need_keys)(run)
    return cls


# ------------------------------------------------------------------------------------------- the scaffold
def attack_geometry(cfg: SimpleNamespace):

    return input_geometry(getattr(cfg, "input_resize", None), getattr(cfg, "input_crop", None))


def check_param_limit(method, cfg: SimpleNamespace) -> None:
    """--param_limit reshapes the scaffold's one training run: an attack that trains its own way cannot take it."""
    if getattr(cfg, "param_limit", "none") == "none":
        return
    cls = attack_class(method.name)
    if cls is None or cls.run is not Attack.run:
        own = ", ".join(sorted(m.name for m in _attack_methods() if m.run.attack_class.run is Attack.run))
        raise ConfigError(f"--param_limit {cfg.param_limit}: {method.name} trains its own way (it overrides the "
                          f"scaffold's training run), so the option cannot shape it; "
                          f"it applies to the data-poisoning attacks: {own}")


def check_input_pipeline(method, cfg: SimpleNamespace) -> None:
    """input_resize only for attacks whose trigger is defined at any size; model_input_size must agree with it."""
    g = attack_geometry(cfg)
    if g is None:
        return
    cls = getattr(method.run, "attack_class", None)
    if cls is not None and not cls.resizable:
        ok = sorted(m.name for m in _attack_methods() if getattr(m.run.attack_class, "resizable", False))
        raise ConfigError(f"input_resize is not implemented for {method.name}: its trigger is built at the data's own "
                          f"size (attacks with input_resize: {', '.join(ok)}); drop input_resize (and input_crop)")
    if cfg.model_input_size is not None and cfg.model_input_size != g.crop:
        raise ConfigError(f"model_input_size {cfg.model_input_size} and input_resize {g.resize} / input_crop {g.crop} "
                          f"disagree: with input_resize the batches already reach the model at {g.crop} px; drop "
                          f"model_input_size")


def _attack_methods():

    return [m for m in methods("attack") if hasattr(m.run, "attack_class")]


def dataset_root(dataset_path: str, dataset: str) -> str:
    return os.path.join(dataset_path, dataset)


def load_data_for(cfg: SimpleNamespace):
    """Clean data for an attack config (synthetic is generated from its seed/sizes)."""

    kw = {}
    if cfg.dataset == "synthetic":
        kw = dict(n_train=cfg.synthetic_n_train, n_test=cfg.synthetic_n_test, seed=cfg.synthetic_seed)
        kw["difficulty"] = getattr(cfg, "synthetic_difficulty", 0.0)  # absent: a config made before the key
    if cfg.dataset == "imagefolder" and cfg.img_size:
        kw["img_size"] = tuple(cfg.img_size)
    return datasets.load_clean_dataset(cfg.dataset, dataset_root(cfg.dataset_path, cfg.dataset), **kw)


def default_folder_name(attack: str, cfg) -> str:
    kind = "clean" if cfg.pratio == 0 else attack
    return f"{kind}_{cfg.dataset}_{cfg.model}_p{cfg.pratio:g}"


def check_model_config(cfg: SimpleNamespace, num_classes: int, img_size: tuple) -> None:
    """Fail before poisoning and training: unknown model, an image size it cannot take, a --pretrained that is not
    there (the model is built on the meta device: no memory, no weights)."""

    with torch.device("meta"):
        models.build_model(cfg.model, num_classes, img_size, input_size=cfg.model_input_size)
    if cfg.pretrained:
        resolve_pretrained(cfg.model, cfg.pretrained)


@kind_runner("attack")
def run_attack(method, cfg: SimpleNamespace) -> Path:
    """Run the registered attack ``method`` with ``cfg``; write and return the record folder."""

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
    check_input_pipeline(method, cfg)
    check_param_limit(method, cfg)
    geometry = attack_geometry(cfg)
    h, w, ch = data.info.img_size
    stamp = tuple(data.info.img_size) if geometry is None else (geometry.resize, geometry.resize, ch)
    check_model_config(cfg, nc, (h, w, ch) if geometry is None else (geometry.crop, geometry.crop, ch))

    def log(msg: str):
        print(f"[{method.name}] {msg}", flush=True)

    ctx = AttackContext(cfg=cfg, data=data, device=device, record_root=record_root, record_name=name, log=log,
                        progress=not cfg.no_progress)
    outcome = method.run(ctx)
    engine.check_finite_model(outcome.model, f"attack {method.name}")

    args = {k: v for k, v in vars(cfg).items() if not k.startswith("_")}
    args.update(
        attack="clean" if cfg.pratio == 0 else method.name, trigger=method.name, num_classes=nc,
        img_size=stamp, input_height=stamp[0], input_width=stamp[1], input_channel=stamp[2],
        dataset_path=cfg.dataset_path, save_path=str(record_dir), **outcome.info)
    with out:
        for fname, value in outcome.artifacts.items():
            write_artifact(out.path / fname, value)
        write_metrics_csv(outcome.rows, out.path, "attack")
        atomic_write_text(out.path / "config.yaml",
                          dump_yaml(run_metadata(cfg, device, time.time() - t0, attack=method.name,
                                                 record=str(record_dir))))
        save_attack_record(
            out.path, name=name, model_state={k: v.detach().cpu() for k, v in outcome.model.state_dict().items()},
            model_name=cfg.model, num_classes=nc, clean_data=cfg.dataset,
            data_path=dataset_root(cfg.dataset_path, cfg.dataset), img_size=stamp, bd_train=outcome.bd_train,
            bd_test=outcome.bd_test, info=args,
        )
    log(f"record written to {record_dir}")
    log(f"{engine.format_metrics(outcome.rows[-1])}  ({time.time() - t0:.0f}s on {device})")
    return record_dir
