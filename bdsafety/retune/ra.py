"""Retuning attack (RA): does a purified model re-learn its backdoor from a handful of poisoned samples?

The attacker fine-tunes the model under test (a defense's output, the undefended backdoored model, or a clean
reference model) on a small clean subset of the training set in which ``poison_num`` samples are replaced by
real poisoned training samples of the attack (bd_train images with their backdoor labels); the set size is
constant. All parameters are trained with plain SGD (lr 0.01, momentum 0.9, no weight decay, batch 128,
5 epochs). The clean samples get the standard train augmentation (random crop, flip where the dataset uses it)
drawn ONCE (``augment_draw: once``, the official RA: fine_tune/ft_poison.py builds its data list by iterating the
clean subset through the train transform a single time, so each clean image keeps the same crop / flip in every
epoch); ``augment_draw: redraw`` draws a new crop / flip every epoch (a departure: a standard train loader). The
poisoned samples are NOT augmented (the official RA loads them with the test transform): they enter every batch
bit-identical to the record's poisoned images (``augment_poison: true`` is the augmented ablation). The poisoned
samples come from the attacker's part of the record's poisoned pool (bdsafety.pools), never from the defender's.
C-Acc / ASR / RA are measured before RA (epoch 0) and after every epoch: the ASR-vs-epoch curve is the
"post-purification robustness" of the paper.

    python retune_attack/ra.py --result_file badnet_demo --defense fst --yaml_path config/retune_attack/ra/demo.yaml

Outputs go to ``record/<rf>/defense/<name>/ra/`` (``record/<rf>/ra/`` for ``--defense none``): ra_result.pt
(same keys as defense_result.pt), ra_df.csv, ra_df_summary.csv, config.yaml, log/ (index.txt = clean indices,
poison_index.txt = training indices of the poisoned samples used, <time>.log).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

from bdsafety import engine
from bdsafety.config import AMOUNT, NONNEG, NONNEG_INT, POS_INT, POSITIVE, Option, check_folder_name
from bdsafety.data.device import DeviceDataset
from bdsafety.errors import ConfigError
from bdsafety.experiment import RECORD_SCHEMA, Output, RecordRun
from bdsafety.pools import poisoned_pool
from bdsafety.records import list_defenses, read_metrics_summary
from bdsafety.registry import Variant, get, name_list, register
from bdsafety.safeio import RecordError

__all__ = [
    "RA_SCHEMA", "RA_SEED_STREAM", "RATarget", "RASet", "ra_set_size", "ra_subset_indices", "assemble_ra_set",
    "poison_source_split", "resolve_targets", "build_ra_set", "training_data", "retune", "run_ra", "main",
]

# The RA subset is drawn from its own random stream, so that with the same --random_seed it is NOT the
# defender's reserved subset (bdsafety.experiment.reserved_indices draws from default_rng(seed)).
RA_SEED_STREAM = 0x5241  # "RA"
RA_AUGMENT_STREAM = 0x524141  # "RAA": the once-drawn augmentation of the RA set
AUGMENT_DRAWS = ("once", "redraw")

RA_SCHEMA = {
    **RECORD_SCHEMA,
    "defense": Option(None, "model(s) to retune: a defense folder name under record/<rf>/defense/, a comma list "
                            "(ft,fst,pam), 'all' (every defense of the record) or 'none' (the record's own model)",
                     none_is_name=True),
    "poison_source": Option(None, "record (name under record_root, or path) whose bd_train supplies the poisoned "
                                  "samples (default: the same record; needed for a clean reference "
                                  "record made with --pratio 0)"),
    "ratio": Option(0.02, "size of the RA set: ratio (<1) or count (>=1) of the training set, poisoned samples "
                          "included", check=AMOUNT),
    "poison_num": Option(5, "real poisoned training samples (with their backdoor labels) that replace clean ones",
                         check=NONNEG_INT),
    "epochs": Option(5, "retuning epochs", check=POS_INT),
    "batch_size": Option(128, "batch size", check=POS_INT),
    "lr": Option(0.01, "SGD learning rate (constant)", check=POSITIVE),
    "sgd_momentum": Option(0.9, "SGD momentum", check=NONNEG),
    "wd": Option(0.0, "weight decay", check=NONNEG),
    "augment": Option(True, "standard train augmentation (random crop, flip where the dataset uses it) of the CLEAN "
                            "samples"),
    "augment_draw": Option("once", "'once': each clean sample's crop / flip is drawn once and kept for every epoch "
                                   "(the official RA builds its set once through the train transform); 'redraw': drawn "
                                   "anew every epoch (a departure: a standard train loader)", choices=AUGMENT_DRAWS),
    "augment_poison": Option(False, "ablation: augment the poisoned samples too (the official RA does not: they keep "
                                    "the test transform, so a random crop never cuts the trigger away)"),
    "save_name": Option("ra",
                        "output folder name, created inside the defense folder (or the record for --defense none)",
                        kind="folder_name"),
}


# ------------------------------------------------------------------------------------------------ the RA set

def ra_set_size(amount: float, n_train: int) -> int:
    """Number of samples of the RA set: ``amount`` < 1 is a ratio of the training set, >= 1 a count."""
    count = int(round(amount * n_train)) if amount < 1 else int(amount)
    if count <= 0 or count > n_train:
        raise ConfigError(f"ratio {amount} gives an RA set of {count} samples out of {n_train} training samples: "
                         f"use a ratio in (0, 1) or a count in [1, {n_train}]")
    return count


def ra_subset_indices(n_train: int, poison_pool: np.ndarray, amount: float, poison_num: int, seed: int):
    """Seeded choice of the RA set.

    ``poison_pool`` holds the original training indices of the available poisoned samples (bd_train.indices).
    Returns ``(clean_idx, poison_sel)``: sorted training indices of the clean part, and sorted positions into
    ``poison_pool`` of the ``poison_num`` poisoned samples. ``len(clean_idx) + poison_num`` is the RA set size
    for every ``poison_num``; a poisoned sample's clean original is never also in the clean part.
    """
    poison_pool = np.asarray(poison_pool, dtype=np.int64)
    total = ra_set_size(amount, n_train)
    if poison_num < 0:
        raise ConfigError(f"poison_num must be >= 0, got {poison_num}")
    if poison_num > total:
        raise ConfigError(f"poison_num {poison_num} is larger than the whole RA set ({total} samples from ratio "
                          f"{amount}); lower --poison_num or raise --ratio")
    if poison_num > len(poison_pool):
        raise ConfigError(f"poison_num {poison_num} is larger than the {len(poison_pool)} poisoned training samples "
                          f"available; lower --poison_num to at most {len(poison_pool)}")
    rng = np.random.default_rng([int(seed), RA_SEED_STREAM])
    poison_sel = np.sort(rng.choice(len(poison_pool), size=poison_num, replace=False)).astype(np.int64)
    candidates = np.setdiff1d(np.arange(n_train, dtype=np.int64), poison_pool[poison_sel])
    clean_idx = np.sort(rng.choice(candidates, size=total - poison_num, replace=False)).astype(np.int64)
    return clean_idx, poison_sel


@dataclass
class RASet:
    """The retuning data: ``data`` = clean part followed by the poisoned part (backdoor labels)."""

    data: DeviceDataset
    clean_idx: np.ndarray  # training indices of the clean samples
    poison_idx: np.ndarray  # training indices (in the poison source) of the poisoned samples
    poison_labels: np.ndarray  # their backdoor labels
    poison_orig_labels: np.ndarray  # their clean labels
    poison_source: str

    @property
    def n_poison(self) -> int:
        return len(self.poison_idx)


def assemble_ra_set(train: DeviceDataset, split, clean_idx: np.ndarray, poison_sel: np.ndarray, source: str = "",
                    augment_poison: bool = False) -> RASet:
    """Clean samples ``train[clean_idx]`` (true labels) + poisoned samples ``split[poison_sel]`` (backdoor labels);
    the poisoned ones are frozen (never augmented) unless ``augment_poison``."""
    parts = [train.subset(clean_idx)]
    if len(poison_sel):
        parts.append(DeviceDataset(split.images[poison_sel], split.bd_labels[poison_sel], train.device,
                                   frozen=not augment_poison, geometry=train.geometry))
        pidx, plab, porig = split.indices[poison_sel], split.bd_labels[poison_sel], split.orig_labels[poison_sel]
    else:
        pidx = plab = porig = np.zeros(0, dtype=np.int64)
    return RASet(DeviceDataset.concat(parts), np.asarray(clean_idx), pidx, plab, porig, source)


def poison_source_split(exp, source: str | None, purpose: str = "RA", part: str = "attacker"):
    """(the attacker's part of bd_train, source record folder, source record): see bdsafety.pools.poisoned_pool."""

    return poisoned_pool(exp, source, purpose, part)


def _source_warnings(exp, rec) -> list[str]:
    """Mismatches between the poison source and the record whose ASR is measured (target, trigger)."""
    out = []
    t_rec, t_src = exp.record.attack_target, rec.attack_target
    if t_rec is not None and t_src is not None and int(t_rec) != int(t_src):
        out.append(f"warning: poison source target {t_src} differs from record target {t_rec}: "
                   f"ASR measures target {t_rec}")
    trig = lambda r: r.info.get("trigger") or r.attack  # noqa: E731
    if trig(exp.record) and trig(rec) and trig(rec) != trig(exp.record) and trig(exp.record) != "clean":
        out.append(f"warning: poison source trigger {trig(rec)!r} differs from the record's {trig(exp.record)!r}")
    return out


def build_ra_set(exp, cfg: SimpleNamespace) -> tuple[RASet, list[str]]:
    """The RA set of ``exp`` drawn with ``cfg`` (ratio, poison_num, poison_source, random_seed); + warnings."""
    n_train = len(exp.data.train_y)
    if cfg.poison_num == 0:
        clean_idx, sel = ra_subset_indices(n_train, np.zeros(0, np.int64), cfg.ratio, 0, cfg.random_seed)
        return assemble_ra_set(exp.train, None, clean_idx, sel, "-"), []
    split, src_dir, rec = poison_source_split(exp, cfg.poison_source, "RA")
    clean_idx, sel = ra_subset_indices(n_train, split.indices, cfg.ratio, cfg.poison_num, cfg.random_seed)
    return (assemble_ra_set(exp.train, split, clean_idx, sel, str(src_dir), augment_poison=cfg.augment_poison),
            _source_warnings(exp, rec))


# ------------------------------------------------------------------------------------------------ targets

@dataclass
class RATarget:
    name: str  # defense name, or 'none'
    model_file: Path  # defense_result.pt or attack_result.pt
    folder: Path  # where the model lives (defense folder, or the record folder for 'none')

    def out_dir(self, save_name: str) -> Path:
        return self.folder / save_name


def resolve_targets(record_dir: Path, defense: str | None) -> list[RATarget]:
    """The models named by --defense: 'none', a name, a comma list, or 'all' (records.list_defenses)."""

    record_dir = Path(record_dir)
    existing = list_defenses(record_dir)
    listing = (f"defenses of record {record_dir.name}: {', '.join(existing)}" if existing else
               f"record {record_dir.name} has no defense folders yet")
    if not defense:
        raise ConfigError(f"--defense is required: a defense folder name, a comma list, 'all', or 'none' (the record's "
                          f"own model); {listing}")
    names = name_list(defense, existing, what=f"defense folder of record {record_dir.name}", allow_none=True,
                      strict=False, hint=f"run a defense first (e.g. python defense/fst.py --result_file "
                                         f"{record_dir.name}) or use --defense none")
    out = []
    for n in names:
        if n == "none":
            out.append(RATarget("none", record_dir / "attack_result.pt", record_dir))
            continue

        check_folder_name(n, "defense")  # a folder under defense/, never a path out of the record
        folder = record_dir / "defense" / n
        if not (folder / "defense_result.pt").is_file():
            what = "has no defense_result.pt (unfinished run?)" if folder.is_dir() else "does not exist"
            raise ConfigError(f"{folder} {what}; {listing}. Run the defense first (python defense/{n}.py --result_file "
                             f"{record_dir.name}) or pick one of those")
        out.append(RATarget(n, folder / "defense_result.pt", folder))
    return out


def load_target_model(exp, target: RATarget) -> torch.nn.Module:
    return exp.backdoored_model() if target.name == "none" else exp.model_from_file(target.model_file)


# ------------------------------------------------------------------------------------------------ training

def training_data(ra: RASet, cfg: SimpleNamespace, hflip: bool) -> tuple[DeviceDataset, bool]:
    """(the data RA trains on, whether the training loop augments it). ``augment_draw: once``: the RA set with each
    non-frozen sample's crop / flip drawn once (its own seeded stream, so the same for every model retuned with
    the same seed), the loop then leaves it alone; ``redraw``: the RA set as it is, augmented every epoch."""
    if not cfg.augment:
        return ra.data, False
    draw = getattr(cfg, "augment_draw", "once")
    if draw == "redraw":
        return ra.data, True
    if draw != "once":
        raise ConfigError(f"augment_draw must be one of {', '.join(AUGMENT_DRAWS)}, not {draw!r}")
    seed = int(np.random.default_rng([int(cfg.random_seed), RA_AUGMENT_STREAM]).integers(2**62))
    return ra.data.augmented_once(flip=hflip, generator=torch.Generator().manual_seed(seed)), False


def retune(exp, model: torch.nn.Module, ra: RASet, cfg: SimpleNamespace, desc: str = "RA") -> list[dict]:
    """Fine-tune ``model`` in place on the RA set; rows for epoch 0 (before) and every epoch after."""
    data, augment = training_data(ra, cfg, exp.info.hflip)
    engine.seed_everything(cfg.random_seed)
    gen = torch.Generator().manual_seed(int(cfg.random_seed))
    opt = engine.make_optimizer(model.parameters(), "sgd", cfg.lr, cfg.sgd_momentum, cfg.wd)
    return engine.fit(
        model, data, norm=exp.norm, epochs=cfg.epochs, batch_size=cfg.batch_size, step_fn=engine.sgd_step(opt),
        optimizer=opt, augment=augment, hflip=exp.info.hflip, evalsets=exp.evalsets, eval_every=1,
        eval_at_start=True, eval_batch_size=cfg.eval_batch_size, generator=gen, desc=desc, progress=exp.progress,
    )


def _asr_line(rows: list[dict]) -> str:
    def f(v):
        return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{100 * v:.1f}%"

    return " -> ".join(f(r.get("test_asr")) for r in rows)


def ra_outputs(exp, cfg) -> dict[str, Path]:
    """RA's output folders: <model folder>/<save_name>/ for every model --defense names."""
    return {t.name: t.out_dir(cfg.save_name) for t in resolve_targets(exp.record_dir, cfg.defense)}


def run_ra(ctx: RecordRun):
    """Retune every model named by cfg.defense (one RA set for all); yields (model name, its Output)."""

    exp, cfg = ctx.exp, ctx.cfg
    targets = {t.name: t for t in resolve_targets(exp.record_dir, cfg.defense)}
    ra, warnings_ = build_ra_set(exp, cfg)
    header = [
        f"record {exp.record_dir.name}: {exp.model_name}, {exp.record.clean_data}, target {exp.target}",
        f"RA set: {len(ra.data)} samples = {len(ra.clean_idx)} clean + {ra.n_poison} poisoned (from "
        f"{ra.poison_source}); poisoned training indices {ra.poison_idx.tolist()}, backdoor labels "
        f"{ra.poison_labels.tolist()}, original labels {ra.poison_orig_labels.tolist()}",
        f"SGD lr {cfg.lr} momentum {cfg.sgd_momentum} wd {cfg.wd}, batch {cfg.batch_size}, {cfg.epochs} epochs, "
        f"augment {cfg.augment}" + (f" (augment_draw {cfg.augment_draw})" if cfg.augment else "")
        + f" (poisoned samples: {'augmented' if cfg.augment and cfg.augment_poison else 'never augmented'}), "
          f"seed {cfg.random_seed}",
        *warnings_,
    ]
    for line in header:
        print(f"[ra] {line}", flush=True)
    for name in ctx.dests:
        t, t0 = targets[name], time.time()
        lines = list(header)

        def log(msg: str, lines=lines, name=t.name):
            lines.append(msg)
            print(f"[ra:{name}] {msg}", flush=True)

        model = load_target_model(exp, t)
        log(f"model {t.model_file}")
        rows = retune(exp, model, ra, cfg, desc=f"RA {t.name}")
        for r in rows:
            log(f"epoch {r['epoch']}: {engine.format_metrics(r)}")
        log(f"ASR per epoch: {_asr_line(rows)}")
        info = dict(retune_attack="ra", target=t.name, model_file=str(t.model_file), record=str(exp.record_dir),
                    poison_source=ra.poison_source, ra_set_size=len(ra.data), clean_num=len(ra.clean_idx),
                    poison_index=ra.poison_idx.tolist(), poison_labels=ra.poison_labels.tolist(),
                    poison_orig_labels=ra.poison_orig_labels.tolist(),
                    before={k: rows[0].get(k) for k in ("test_acc", "test_asr", "test_ra")},
                    after={k: rows[-1].get(k) for k in ("test_acc", "test_asr", "test_ra")})
        yield name, Output("ra", rows, {k: v.detach().cpu() for k, v in model.state_dict().items()}, "ra_result.pt",
                           indices={"index": ra.clean_idx, "poison_index": ra.poison_idx}, info=info, log_lines=lines,
                           started=t0)


def study_variants(study) -> list[Variant]:
    """RA's runs per model in a study: the RA itself (``ra_draws`` draws), the benign-retune control (``ra_control``:
    the same RA with 0 poisoned samples) and one per RA budget (``ra_poison_nums``, ``ra_budget_draws`` draws each)."""
    out = [Variant("ra", "", {}, study.ra_draws)]
    if study.ra_control:
        out.append(Variant("ra_control", "_control", {"poison_num": 0}, study.ra_draws))
    return out + [Variant("ra_budget", f"_budget_p{n}", {"poison_num": n}, study.ra_budget_draws)
                  for n in study.ra_poison_nums]


def study_summary(folder: Path) -> dict:
    """RA's columns of a study's results.csv: the model after retuning (P-ASR = p_robustness_asr); NaN when not run."""
    try:
        s = read_metrics_summary(folder, "ra")
    except RecordError:
        s = {}
    return {f"p_robustness_{k}": s.get(f"test_{k}", math.nan) for k in ("acc", "asr", "ra")}


register("retune", "ra", schema=lambda: dict(RA_SCHEMA), needs=("defense", "poisoned_pool"),
         on=("record", "clean", "defense"), variants=study_variants, summary=study_summary, outputs=ra_outputs,
         description="retuning attack (RA): fine-tune a (purified) model on a small set with a few real poisoned "
                     "samples and track C-Acc/ASR/RA per epoch")(run_ra)


def main(argv=None) -> list[Path]:
    """``python retune_attack/ra.py ...`` without the CLI error handling (tests, notebooks)."""

    return get("retune", "ra").main(argv)
