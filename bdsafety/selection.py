"""The one place where anything is selected: on the defender's clean VALIDATION split, never on test data.

Anything a method or a demo config selects (the best rho of a PAM sweep, a pruning threshold, a BN mode) is chosen
from candidates scored on the validation split that ``bdsafety.defenses.base.reserved_subset`` carves from the
defender's reserved clean data (``val_ratio``; those images are never trained on). The functions here receive
only validation scores: the test sets are not in their reach. The choice and its criterion are written next to
the candidates' outputs (``write_selection``) and into config.yaml.
"""
from __future__ import annotations

import math
from pathlib import Path

import torch

from bdsafety.config import dump_yaml
from bdsafety.data.device import iterate_batches
from bdsafety.errors import ConfigError
from bdsafety.safeio import atomic_write_text

CRITERIA = ("largest_within_tol", "best_val_acc", "largest_within_drop")
# margin of the tolerance comparisons: accuracies are ratios of counts (45/50), so a drop can sit exactly on a tolerance
# (0.1); the comparison must then give its exact-arithmetic answer, not the rounding's (1.0 - 0.9 = 0.0999...98 < 0.1)
EXACT = 1e-9


@torch.no_grad()
def val_accuracy(model, val, norm, batch_size: int = 1024) -> float:
    """Clean accuracy of ``model`` on the validation DeviceDataset ``val``."""

    was = model.training
    model.eval()
    correct = 0
    for xb, y, _ in iterate_batches(val, batch_size):
        correct += int((model(norm.from_uint8(xb)).argmax(1) == y).sum())
    model.train(was)
    return correct / max(1, len(val))


def select(candidates: list[dict], *, key: str, criterion: str = "largest_within_tol", tol: float = 0.02,
           reference: float | None = None) -> tuple[dict | None, str]:
    """Pick one of ``candidates`` (dicts with ``key`` = the candidate value and ``val_acc``).

    'largest_within_tol': the largest ``key`` whose val_acc is within ``tol`` of the best val_acc (for knobs where
    larger means more robustness at some clean-accuracy cost, e.g. PAM's rho); 'best_val_acc': the highest val_acc
    (ties: the smaller ``key``); 'largest_within_drop': the largest ``key`` whose RELATIVE validation C-Acc drop
    against ``reference`` (the validation C-Acc of the model the candidates modify) is below ``tol``,
    (reference - val_acc) / reference < tol, or None when no candidate qualifies (the caller keeps the unmodified
    model). Returns (the chosen candidate, the criterion in words)."""
    if not candidates:
        raise ConfigError("nothing to select from")
    for c in candidates:
        v = c.get("val_acc")
        if v is None or (isinstance(v, float) and math.isnan(v)):
            raise ConfigError(f"candidate {key}={c.get(key)} has no validation accuracy: selection needs val_ratio > 0")
    best = max(c["val_acc"] for c in candidates)
    if criterion == "best_val_acc":
        chosen = sorted(candidates, key=lambda c: (-c["val_acc"], c[key]))[0]
        return chosen, "highest validation C-Acc (ties: smaller value)"
    if criterion == "largest_within_tol":
        ok = [c for c in candidates if c["val_acc"] >= best - tol - EXACT]
        chosen = max(ok, key=lambda c: c[key])
        return chosen, f"largest {key} whose validation C-Acc is within {tol:g} of the best candidate's ({best:.4f})"
    if criterion == "largest_within_drop":
        if reference is None or not reference > 0:
            raise ConfigError(f"criterion largest_within_drop needs the reference model's validation C-Acc > 0, got "
                              f"{reference}")
        ok = [c for c in candidates if (reference - c["val_acc"]) / reference < tol - EXACT]
        words = (f"largest {key} whose validation C-Acc drop relative to the unmodified model's ({reference:.4f}) is "
                 f"below {tol:g}")
        if not ok:
            return None, words + ": none qualifies, the unmodified model is kept"
        return max(ok, key=lambda c: c[key]), words
    raise ConfigError(f"unknown selection criterion {criterion!r}; valid: {', '.join(CRITERIA)}")


def selection_doc(*, what: str, key: str, chosen: dict | None, criterion: str, candidates: list[dict], **extra) -> dict:
    """The record of a selection: what was selected, the choice (None: nothing qualified), its criterion, the data it
    was made on, every candidate's validation score and any ``extra`` values (e.g. the reference accuracy)."""
    return {"selected": what, key: None if chosen is None else chosen[key], "criterion": criterion,
            "data": "validation split of the defender's reserved clean data (val_ratio); test data is never used",
            **({"chosen_output": chosen.get("output")} if chosen is not None and "output" in chosen else {}),
            **{k: (float(v) if isinstance(v, float) else v) for k, v in extra.items()},
            "candidates": [{k: (float(v) if isinstance(v, float) else v) for k, v in c.items()} for c in candidates]}


def write_selection(path: Path, *, what: str, key: str, chosen: dict, criterion: str, candidates: list[dict]) -> Path:
    """Write the choice, its criterion and every candidate's validation score as yaml (atomically)."""

    doc = selection_doc(what=what, key=key, chosen=chosen, criterion=criterion, candidates=candidates)
    doc.setdefault("chosen_output", chosen.get("output"))
    atomic_write_text(path, dump_yaml(doc))
    return Path(path)
