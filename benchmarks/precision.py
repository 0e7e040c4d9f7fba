"""fp32 vs bf16 on one record: the same defense and retuning attack (RA) run once per precision, side by side.

For each precision the script runs the defense (``--defense``, written to defense/<folder>_<precision>/) and RA on
its output (or on the record's own model with ``--defense none``), both with ``--precision``, and prints the RA
curve (C-Acc / ASR / RA after each RA epoch) and the wall time of each run, then writes them to ``--out`` (csv).
Everything else (seeds, reserved data, RA set) is identical, so the curves differ only by the numerics.

    python benchmarks/precision.py --result_file badnet_demo --defense fst          # CPU: bf16 = torch's CPU autocast
    python benchmarks/precision.py --result_file badnet_cifar100_resnet18_paper --device cuda \\
        --defense_yaml config/defense/fst/cifar100_paper.yaml --ra_yaml config/retune_attack/ra/cifar100_paper.yaml

The default yamls are the defense's and RA's demo.yaml; ``--defense_args`` / ``--ra_args`` pass extra flags
(e.g. ``--ra_args "--epochs 1"``).
"""
from __future__ import annotations

import argparse
import csv
import os
import shlex
import sys
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

ROOT = Path(__file__).resolve().parent.parent
CURVE = ("test_acc", "test_asr", "test_ra")


def _sync(device: str) -> None:
    import torch

    if device.startswith("cuda") and torch.cuda.is_available():
        torch.cuda.synchronize()


def _timed(fn, device: str) -> tuple[object, float]:
    _sync(device)
    t0 = time.perf_counter()
    out = fn()
    _sync(device)
    return out, time.perf_counter() - t0


def run_one(a, precision: str) -> dict:
    """Defense + RA at ``precision``: {'precision', 'defense_s', 'ra_s', 'rows': RA metrics per epoch}."""
    import pandas as pd

    from bdsafety.registry import get

    common = ["--result_file", a.result_file, "--record_root", a.record_root, "--device", a.device, "--precision",
              precision, "--no_progress", "--overwrite", "--dependents", "delete"]
    defense_s, target = 0.0, "none"
    if a.defense != "none":
        method = get("defense", a.defense)
        target = f"{method.folder}_{precision}"
        yaml_path = a.defense_yaml or str(method.config_path("demo"))
        _, defense_s = _timed(lambda: method.main(common + ["--yaml_path", yaml_path, "--save_name", target]
                                                  + shlex.split(a.defense_args)), a.device)
    ra = get("retune", "ra")
    ra_yaml = a.ra_yaml or str(ra.config_path("demo"))
    outs, ra_s = _timed(lambda: ra.main(common + ["--yaml_path", ra_yaml, "--defense", target, "--save_name",
                                                  f"ra_{precision}"] + shlex.split(a.ra_args)), a.device)
    (out,) = outs
    df = pd.read_csv(Path(out) / "ra_df.csv")
    rows = [{"epoch": int(r["epoch"]), **{k: float(r[k]) for k in CURVE if k in r}} for _, r in df.iterrows()]
    return {"precision": precision, "defense_s": defense_s, "ra_s": ra_s, "rows": rows, "ra_folder": str(out)}


def table(results: list[dict]) -> list[dict]:
    """One row per (precision, RA epoch) with both wall times."""
    out = []
    for res in results:
        for r in res["rows"]:
            out.append({"precision": res["precision"], **r, "defense_s": round(res["defense_s"], 2),
                        "ra_s": round(res["ra_s"], 2)})
    return out


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--result_file", required=True, help="record folder (a name under --record_root, or a path)")
    p.add_argument("--record_root", default="./record")
    p.add_argument("--defense", default="fst", help="registered defense to run before RA, or 'none' (RA on the record)")
    p.add_argument("--defense_yaml", default=None, help="the defense's yaml (default: its demo.yaml)")
    p.add_argument("--ra_yaml", default=None, help="RA's yaml (default: config/retune_attack/ra/demo.yaml)")
    p.add_argument("--defense_args", default="", help="extra flags for the defense, one string")
    p.add_argument("--ra_args", default="", help="extra flags for RA, one string")
    p.add_argument("--device", default="cpu")
    p.add_argument("--precisions", default="fp32,bf16")
    p.add_argument("--out", default=None, help="csv of the table (default: <record>/precision_benchmark.csv)")
    a = p.parse_args(argv)
    from bdsafety.records import resolve_record_dir

    record_dir = resolve_record_dir(a.result_file, a.record_root)
    results = [run_one(a, prec.strip()) for prec in a.precisions.split(",") if prec.strip()]
    rows = table(results)
    print(f"record {record_dir.name}, defense {a.defense}, device {a.device}")
    print("precision  epoch  C-Acc    ASR      RA       defense_s  ra_s")
    for r in rows:
        print(f"{r['precision']:<9}  {r['epoch']:>5}  "
              + "  ".join(f"{100 * r.get(k, float('nan')):6.2f}%" for k in CURVE)
              + f"  {r['defense_s']:9.1f}  {r['ra_s']:6.1f}")
    out = Path(a.out) if a.out else record_dir / "precision_benchmark.csv"
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["precision", "epoch", *CURVE, "defense_s", "ra_s"])
        w.writeheader()
        w.writerows(rows)
    print(f"written to {out}")
    return rows


if __name__ == "__main__":
    main()
