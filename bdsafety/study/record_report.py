"""The paper's comparison table and RA curves of one record, read from its folders (``analysis/report.py``).

For one attack record: the backdoored model (O-Backdoor), every defense under defense/ (O-Robustness: after
the defense) and, where a retuning attack was run, the model after RA (P-Robustness; its ASR is the P-ASR).
A clean reference record can be added as the 'Clean' row. Works on records written by this project or by
BackdoorBench (whose defense folders have <name>_df_summary.csv but no ra/ until you run ra.py). The metrics are
read by the study's own reader (bdsafety.study.results): this module only lays one record's folders out as the
paper's table.
"""
from __future__ import annotations

import argparse
import math
import re
from pathlib import Path

import pandas as pd

from bdsafety import registry
from bdsafety.records import resolve_record_dir
from bdsafety.safeio import atomic_savefig, atomic_write_text
from bdsafety.study.results import model_metrics

METRICS = ("test_acc", "test_asr", "test_ra")


def _row(label: str, model_folder: Path, name: str | None, ra_folder: Path, defended: bool = True) -> dict:
    """One model's row: its metrics (bdsafety.study.results.model_metrics, the study's reader: a defense folder without
    a summary of its own reads RA's epoch-0 evaluation, ``source``) and RA's columns (RA's registered summary)."""
    after, source = model_metrics(model_folder, name, ra_folder, defended)
    p = registry.get("retune", "ra").summary(ra_folder)
    return {"model": label, **{k: after.get(k, math.nan) for k in METRICS},
            **{f"p_{k}": p[f"p_robustness_{k[len('test_'):]}"] for k in METRICS}, "source": source}


def collect(result_file: str, record_root: str = "./record", clean_record: str | None = None) -> pd.DataFrame:
    """One row per model: C-Acc/ASR/RA after the attack or defense, and p_* after the retuning attack."""
    rd = resolve_record_dir(result_file, record_root)
    rows = [_row("No defense", rd, "attack", rd / "ra", defended=False)]
    if clean_record:
        cd = resolve_record_dir(clean_record, record_root)
        rows.append(_row("Clean", cd, "attack", cd / "ra", defended=False))
    ddir = rd / "defense"
    if ddir.is_dir():
        for d in sorted(p for p in ddir.iterdir() if p.is_dir() and not p.name.startswith(".")):
            rows.append(_row(d.name, d, None, d / "ra"))
    return pd.DataFrame(rows).set_index("model")


def ra_curves(result_file: str, record_root: str = "./record",
              clean_record: str | None = None) -> dict[str, pd.DataFrame]:
    """{model: ra_df} for every model that has a retuning-attack run."""
    rd = resolve_record_dir(result_file, record_root)
    found = {"No defense": rd / "ra"}
    if clean_record:
        found["Clean"] = resolve_record_dir(clean_record, record_root) / "ra"
    if (rd / "defense").is_dir():
        for d in sorted((rd / "defense").iterdir()):
            if not d.name.startswith("."):
                found[d.name] = d / "ra"
    return {k: pd.read_csv(v / "ra_df.csv") for k, v in found.items() if (v / "ra_df.csv").is_file()}


def rho_sweep(result_file: str, record_root: str = "./record") -> pd.DataFrame:
    """PAM's rho sweep (folders defense/<save_name or pam / pam_reinvert>_rho<value>/ from --rho_sweep): one row per
    rho with C-Acc/ASR/RA after PAM and p_* after the retuning attack where one was run; empty when there is no sweep.
    With sweeps under several save names, the row's ``sweep`` column tells them apart."""

    rd = resolve_record_dir(result_file, record_root)
    rows = []
    ddir = rd / "defense"
    for d in sorted(ddir.iterdir()) if ddir.is_dir() else []:
        m = re.match(r"^([^.].*)_rho([-+0-9.eE]+)$", d.name)
        if not m or not d.is_dir():
            continue
        try:
            rho = float(m.group(2))
        except ValueError:
            continue
        row = _row(d.name, d, None, d / "ra")
        rows.append({"rho": rho, "sweep": m.group(1), **{k: row[k] for k in (*METRICS, *(f"p_{k}" for k in METRICS))}})
    cols = ["rho", "sweep", *METRICS, *(f"p_{k}" for k in METRICS)]
    return pd.DataFrame(rows, columns=cols).set_index("rho").sort_index()


def to_markdown(df: pd.DataFrame) -> str:
    """Percent table in the paper's layout."""
    head = "| model | C-Acc | ASR | RA | P-C-Acc | P-ASR | P-RA |\n|---|---|---|---|---|---|---|\n"

    def pct(v):
        return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{100 * v:.1f}"

    lines = [f"| {m} | " + " | ".join(pct(r[k]) for k in (*METRICS, *(f"p_{k}" for k in METRICS))) + " |"
             for m, r in df.iterrows()]
    return head + "\n".join(lines) + "\n"


def plot_ra_curves(curves: dict[str, pd.DataFrame], path: Path, title: str = "") -> Path:
    import matplotlib  # lazy: matplotlib is heavy and only needed for figures

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # lazy: matplotlib is heavy and only needed for figures

    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for name, df in curves.items():
        ax.plot(df["epoch"], 100 * df["test_asr"], marker="o", label=name)
    ax.set_xlabel("retuning-attack epoch (0 = before RA)")
    ax.set_ylabel("ASR (%)")
    ax.set_ylim(-2, 102)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, ncol=2)
    ax.set_title(title or "ASR under the retuning attack")
    fig.tight_layout()
    atomic_savefig(fig, path, dpi=130)
    return Path(path)


def main(argv=None) -> None:

    p = argparse.ArgumentParser(prog="analysis/report.py",
                                description="Paper-style table (+ RA curves plot) of one record")
    p.add_argument("--result_file", required=True)
    p.add_argument("--record_root", default="./record")
    p.add_argument("--clean_record", default=None, help="clean reference record (pratio 0) to add as the 'Clean' row")
    p.add_argument("--out", default=None, help="output folder (default: <record>/report)")
    a = p.parse_args(argv)
    df = collect(a.result_file, a.record_root, a.clean_record)
    out = Path(a.out) if a.out else resolve_record_dir(a.result_file, a.record_root) / "report"
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "report.csv", df.to_csv())
    md = to_markdown(df)
    atomic_write_text(out / "report.md", md)
    print(md)
    curves = ra_curves(a.result_file, a.record_root, a.clean_record)
    if curves:
        print(f"RA curves: {plot_ra_curves(curves, out / 'ra_curves.png', Path(a.result_file).name)}")
    print(f"written to {out}")
