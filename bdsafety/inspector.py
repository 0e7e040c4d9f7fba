"""The record inspector: ``python -m bdsafety.inspector RECORD`` (also ``python -m bdsafety.records RECORD``).

Prints what a record holds (model, data, attack, poisoned counts, metrics of the attack and of every defense,
retuning attack and analysis under it) and exits non-zero when no tool could use the record.
"""
from __future__ import annotations

import argparse
import math
import sys
import warnings
from pathlib import Path
from typing import Any

from bdsafety import models
from bdsafety.cli import run_cli
from bdsafety.models import MODEL_NAMES, identify_model, load_state_dict_compat
from bdsafety.models.registry import describe_match
from bdsafety.records import list_defenses, load_attack_record, read_metrics_summary, resolve_record_dir, summary_name
from bdsafety.safeio import RecordError


def check_model(rec) -> None:
    """Build the record's model and load its weights strictly: a RecordError when no tool could use them."""

    size = (rec.info or {}).get("model_input_size")
    try:
        model = models.build_model(rec.model_name, rec.num_classes, tuple(rec.img_size),
                            input_size=None if size is None else int(size))
        load_state_dict_compat(model, rec.state_dict)
    except (ValueError, KeyError, TypeError, RuntimeError) as e:
        raise RecordError(f"{rec.record_dir}: the model in attack_result.pt cannot be loaded as a {rec.model_name} "
                          f"with {rec.num_classes} classes ({str(e).splitlines()[0] if str(e) else type(e).__name__}); "
                          f"the record is damaged or was written by other code: re-run the attack") from None


def _metrics_line(folder: Path, name: str | None = None) -> str:
    name = name or summary_name(folder)
    path = folder / f"{name}_df_summary.csv"
    try:
        last = read_metrics_summary(folder, name) if name and path.is_file() else {}
    except RecordError as e:  # one damaged csv does not make the record unusable: say so on its line
        return f"unreadable metrics ({str(e).split(';')[0]})"

    def fmt(key: str) -> str:
        v = last.get(key)
        return "-" if v is None or math.isnan(v) else f"{v:.4f}"

    return "  ".join(f"{k} {fmt(k)}" for k in ("test_acc", "test_asr", "test_ra"))


def _architecture_line(rec) -> str:
    """Whether the weights are the architecture the record names (strict key/shape check), else what they look like."""

    try:
        size = (rec.info or {}).get("model_input_size")
        found = identify_model(rec.state_dict, None if size is None else int(size))
    except (TypeError, ValueError) as e:
        return f"unreadable weights ({e})"
    n = sum(int(v.numel()) for v in rec.state_dict.values() if v.is_floating_point())
    if rec.model_name in found:
        return f"weights fit {rec.model_name} ({len(rec.state_dict)} tensors, {n:,} values)"
    if rec.model_name not in MODEL_NAMES:
        return f"{rec.model_name!r} is not a registered model. {describe_match(rec.state_dict)}"
    return f"weights do NOT fit {rec.model_name}. {describe_match(rec.state_dict)}"


def _inspect(argv: list[str] | None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bdsafety.records", description="Summarize a BackdoorBench record.")
    parser.add_argument("record", help="record folder (or a bare name under ./record)")
    parser.add_argument("--trust_record", action="store_true",
                        help="allow full unpickling (can run code: only for records you trust)")
    args = parser.parse_args(argv)
    record_dir = resolve_record_dir(args.record)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        rec = load_attack_record(record_dir, trust_record=args.trust_record)
    for w in caught:
        print(f"warning: {w.message}", file=sys.stderr)
    try:
        check_model(rec)
        unusable = None
        if len(rec.bd_test) == 0:
            unusable = RecordError(f"{record_dir}: bd_test holds no poisoned test sample, so no tool can measure an "
                                   f"ASR on this record; re-run the attack")
    except RecordError as e:  # print what the record holds (the architecture line says what the weights look like),
        unusable = e          # then exit non-zero

    def show(v: Any) -> str:
        return "-" if v is None else str(v)

    h, w, c = rec.img_size
    train = "-" if rec.bd_train is None else f"{len(rec.bd_train)} of {rec.bd_train.length}"
    lines = [
        f"record        {record_dir}",
        f"model         {rec.model_name}",
        f"dataset       {rec.clean_data} ({rec.data_path})",
        f"architecture  {_architecture_line(rec)}",
        f"classes       {rec.num_classes}",
        f"img_size      {h}x{w}x{c}",
        f"attack        {show(rec.attack)}",
        f"target        {show(rec.attack_target)}",
        f"pratio        {show(rec.pratio)}",
        f"label trans   {show(rec.attack_label_trans)}",
        f"poisoned      train {train}, test {len(rec.bd_test)} of {rec.bd_test.length}",
        f"attack result {_metrics_line(record_dir, 'attack')}",
    ]
    defenses = list_defenses(record_dir)
    lines.append(f"defenses      {len(defenses) or 'none'}")
    for name in defenses:
        folder = record_dir / "defense" / name
        lines.append(f"  {name:<12}{_metrics_line(folder)}")
        for sub in sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".") and summary_name(p)):
            label = sub.name.upper() if sub.name in ("ra", "qra") else sub.name
            lines.append(f"  {name + ' +' + label:<12}{_metrics_line(sub)}")
    print("\n".join(lines))
    if unusable is not None:
        raise unusable


def main(argv: list[str] | None = None) -> int:
    """CLI: print a record's summary; expected errors become one line on stderr and a non-zero exit code."""

    try:
        return run_cli(_inspect, argv)
    except SystemExit as e:  # argparse: --help or a usage error
        return e.code if isinstance(e.code, int) else 1


if __name__ == "__main__":
    raise SystemExit(main())

