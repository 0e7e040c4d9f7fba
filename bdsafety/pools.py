"""Attacker and defender never share poisoned images: the one split of a record's poisoned training pool.

A record's ``bd_train`` holds the attack's real poisoned training samples. Two kinds of tools draw from it:
  * the **defender** (EP, PAM with ``pam_source: real``): the oracle defenses that are taught triggered images
    with their true labels;
  * the **attacker** (RA, QRA): the retuning / reactivation attacks that re-teach the backdoor.
If both drew from the whole pool, the EP reference would be attacked with the very images it was taught to
unlearn. ``pool_split`` therefore splits the pool once, deterministically (a seeded permutation of the
poisoned samples' training indices, ``ATTACKER_FRACTION`` of them to the attacker), and saves the split in the
record as ``pool_split.json``, so every tool and every later run uses the same one. Records made by
BackdoorBench get the file on first use. Each run also writes the training indices it used (log/*.txt).
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bdsafety.data.poisoned import PoisonedSplit
from bdsafety.errors import DataError
from bdsafety.records import load_attack_record, resolve_record_dir
from bdsafety.safeio import atomic_write_text

POOL_FILE = "pool_split.json"
ATTACKER_FRACTION = 0.5  # share of the poisoned pool reserved for the attacker (RA, QRA); the rest is the defender's
POOL_SEED = 20240917  # fixed: the split is a property of the record, not of a run
PARTS = ("attacker", "defender")
# info.pickle key: training indices of bd_train samples that are NOT poisoned (WaNet / Input-Aware cross samples,
# stored in bd_train with their true label as BackdoorBench does; bdsafety.attacks.controlled)
CROSS_KEY = "cross_train_index"
CROSS_ATTACKS = ("wanet", "inputaware")  # attacks whose BackdoorBench records mix cross samples into bd_train


def _digest(indices: np.ndarray) -> str:
    return hashlib.sha256(np.asarray(indices, dtype=np.int64).tobytes()).hexdigest()[:16]


@dataclass(frozen=True)
class PoolSplit:
    """Training indices (sorted) of the poisoned samples in each part."""

    attacker: np.ndarray
    defender: np.ndarray

    def part(self, name: str) -> np.ndarray:
        if name not in PARTS:
            raise ValueError(f"unknown pool part {name!r}; valid: {', '.join(PARTS)}")
        return self.attacker if name == "attacker" else self.defender


def make_split(indices: np.ndarray, fraction: float = ATTACKER_FRACTION, seed: int = POOL_SEED) -> PoolSplit:
    """Deterministic split of the poisoned training indices; each part gets at least one sample when n >= 2."""
    idx = np.sort(np.asarray(indices, dtype=np.int64))
    n = len(idx)
    k = int(round(fraction * n))
    if n >= 2:
        k = min(max(k, 1), n - 1)
    perm = np.random.default_rng(seed).permutation(n)
    return PoolSplit(attacker=np.sort(idx[perm[:k]]), defender=np.sort(idx[perm[k:]]))


def _check_split(ps: PoolSplit, indices: np.ndarray, path: Path) -> None:
    """A saved split is used only if it still is one: disjoint parts that together are exactly ``indices``."""
    a, d, idx = ps.attacker, ps.defender, np.unique(np.asarray(indices, dtype=np.int64))
    problems = []
    if np.intersect1d(a, d).size:
        problems.append(f"{np.intersect1d(a, d).size} samples are in both parts (attacker and "
                        f"defender would share them)")
    if len(np.unique(a)) != len(a) or len(np.unique(d)) != len(d):
        problems.append("a part lists a sample twice")
    if not np.array_equal(np.union1d(a, d), idx):
        problems.append("its parts are not the record's poisoned training samples")
    if problems:
        raise DataError(f"{path} is not a valid attacker/defender split: {'; '.join(problems)} (edited by hand?). "
                        f"Delete it and it is rebuilt from the record on the next run; "
                        f"results made with it are not trustworthy")


def pool_split(record_dir: Path, split: PoisonedSplit) -> PoolSplit:
    """The record's saved split of ``split`` (its bd_train), created on first use."""

    path = Path(record_dir) / POOL_FILE
    digest = _digest(split.indices)
    if path.is_file():
        try:
            d = json.loads(path.read_text())
            saved = PoolSplit(np.asarray(d["attacker"], dtype=np.int64), np.asarray(d["defender"], dtype=np.int64))
            ok = d["bd_train_digest"] == digest
        except (ValueError, KeyError, TypeError) as e:
            raise DataError(f"{path} is unreadable ({e}); delete it and it is rebuilt from the "
                            f"record on the next run") from None
        if not ok:
            raise DataError(f"{path} was made for other poisoned training samples than the record's bd_train now holds "
                            f"(the record was replaced?): delete {path.name} and rerun; results made with the old "
                            f"split no longer match this record")
        _check_split(saved, split.indices, path)
        return saved
    ps = make_split(split.indices)
    atomic_write_text(path, json.dumps({
        "about": "attacker/defender split of bd_train's poisoned training samples (bdsafety.pools); attacker: RA, QRA; "
                 "defender: EP, PAM pam_source real",
        "bd_train_digest": digest, "seed": POOL_SEED, "attacker_fraction": ATTACKER_FRACTION,
        "attacker": ps.attacker.tolist(), "defender": ps.defender.tolist()}, indent=1) + "\n")
    return ps


def restrict(split: PoisonedSplit, keep_indices: np.ndarray) -> PoisonedSplit:
    """The samples of ``split`` whose training index is in ``keep_indices``."""
    m = np.isin(split.indices, keep_indices)
    return PoisonedSplit(split.indices[m], split.images[m], split.bd_labels[m], split.orig_labels[m], split.length)


def part_of(record_dir: Path, split: PoisonedSplit, part: str) -> PoisonedSplit:
    """``split`` restricted to its ``part`` ('attacker' or 'defender') of the record's saved pool split."""
    if part not in PARTS:
        raise ValueError(f"unknown pool part {part!r}; valid: {', '.join(PARTS)}")
    if len(split) == 0:
        return split
    sub = restrict(split, pool_split(record_dir, split).part(part))
    if len(sub) == 0:
        raise DataError(f"record {Path(record_dir).name} holds only {len(split)} poisoned training sample(s): too few "
                        f"to give the attacker and the defender disjoint ones (see {POOL_FILE})")
    return sub


def real_poisoned(split: PoisonedSplit | None, info: dict) -> PoisonedSplit | None:
    """``split`` (a record's bd_train) without its cross samples: the indices under ``CROSS_KEY`` in info.pickle;
    for a WaNet / Input-Aware record BackdoorBench wrote (no such key), every sample whose backdoor label equals its
    true label (this drops the cross samples and, under all2one, the target-class backdoor samples too)."""
    if split is None or len(split) == 0:
        return split
    if CROSS_KEY in info:
        keep = np.setdiff1d(split.indices, np.asarray(info[CROSS_KEY], dtype=np.int64))
    elif info.get("attack") in CROSS_ATTACKS:
        keep = split.indices[split.bd_labels != split.orig_labels]
    else:
        return split
    return restrict(split, keep)


def poisoned_pool(exp, source: str | None = None, purpose: str = "RA", part: str | None = "attacker"):
    """(bd_train PoisonedSplit, source record folder) supplying real poisoned training samples.

    ``source`` None: the record's own bd_train. Otherwise another record on the same data (e.g. the attack
    record when ``exp`` is a clean reference made with --pratio 0). ``part``: 'attacker' (RA, QRA) or 'defender'
    (EP, PAM real) restricts the pool to that part of the source record's saved split; None: the whole pool.
    Errors name the problem and the fix.
    """

    if source:
        src_dir = resolve_record_dir(source, exp.cfg.record_root)
        same = src_dir.resolve() == exp.record_dir.resolve()
        rec = exp.record if same else load_attack_record(src_dir, trust_record=exp.cfg.trust_record)
    else:
        src_dir, rec, same = exp.record_dir, exp.record, True
    split = real_poisoned(rec.bd_train, rec.info)
    if split is None or len(split) == 0:
        why = ("bd_train is None: the attack stores no poisoned training samples (e.g. LIRA, Blind)" if split is None
               else "bd_train is empty: it was made with --pratio 0 (a clean reference record)")
        if purpose in ("RA", "QRA"):
            hint = ("pass --poison_source <attack record> (a record of the attack on the same data whose bd_train "
                    "holds its poisoned samples, e.g. --poison_source badnet_demo)"
                    + (" or --poison_num 0 (clean-only retuning control)" if purpose == "RA" else ""))
        else:
            hint = "run it on the attack's record, or use a defense that needs no real poisoned samples"
        raise DataError(f"{purpose} needs real poisoned training samples, "
                        f"but record {src_dir.name} has none ({why}); {hint}")
    if not same:
        if (rec.clean_data != exp.record.clean_data or split.length != len(exp.data.train_y)
                or tuple(rec.img_size) != tuple(exp.record.img_size)):
            raise DataError(f"poison_source {src_dir.name} was made on {rec.clean_data} ({split.length} training "
                            f"images, {tuple(rec.img_size)}), but record {exp.record_dir.name} on "
                            f"{exp.record.clean_data} ({len(exp.data.train_y)} training images, "
                            f"{tuple(exp.record.img_size)}): pick a record on the same data")
    if part is not None:
        split = part_of(src_dir, split, part)
    return split, src_dir, rec
