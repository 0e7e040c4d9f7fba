"""P-ASR against the retuning attack's budget: how many poisoned samples (poison_num) and epochs does it take to
bring a purified model's backdoor back?

    python analysis/ra_budget.py --result_file badnet_demo --defense fst,exact_purification,pam \\
        --yaml_path config/retune_attack/ra/demo.yaml --poison_nums 1,5,10,25

For every defense and every poison_num it runs the retuning attack (bdsafety.retune.ra, the same code as
retune_attack/ra.py, its yaml for everything else) into defense/<d>/ra_budget_p<n>/ (existing runs are reused),
then writes record/<rf>/ra_budget/ra_budget.csv (defense, poison_num, epoch, test_asr, test_acc) and
ra_budget.png (one panel per defense: P-ASR per RA epoch, one line per poison_num). The poisoned samples come from
the attacker's part of the record's pool (bdsafety.pools) and are never augmented, as in every RA run.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd

from bdsafety.cli import run_cli
from bdsafety.errors import ConfigError
from bdsafety.outputs import OutputFolder
from bdsafety.records import resolve_record_dir
from bdsafety.retune.ra import main as ra_main
from bdsafety.safeio import atomic_savefig, atomic_write_text


def _ints(s: str) -> list[int]:
    try:
        out = [int(v) for v in s.split(",") if v.strip()]
    except ValueError:
        raise ConfigError(f"--poison_nums takes a comma list of integers, got {s!r}") from None
    if not out or any(v < 1 for v in out):
        raise ConfigError(f"--poison_nums takes integers >= 1, got {s!r}")
    return out


def run(argv=None) -> Path:

    p = argparse.ArgumentParser(prog="analysis/ra_budget.py", description=__doc__.split("\n")[0])
    p.add_argument("--result_file", required=True)
    p.add_argument("--record_root", default="./record")
    p.add_argument("--defense", default="fst,exact_purification,pam", help="comma list of defense folders")
    p.add_argument("--yaml_path", default="config/retune_attack/ra/demo.yaml", help="the RA config (epochs, lr, ...)")
    p.add_argument("--poison_nums", default="1,5,10,25")
    p.add_argument("--epochs", type=int, default=None, help="RA epochs (default: the yaml's)")
    p.add_argument("--device", default="auto")
    p.add_argument("--no_progress", action="store_true")
    a = p.parse_args(argv)
    nums = _ints(a.poison_nums)
    rd = resolve_record_dir(a.result_file, a.record_root)
    defenses = [d.strip() for d in a.defense.split(",") if d.strip()]
    rows = []
    for d in defenses:
        for n in nums:
            out = rd / "defense" / d / f"ra_budget_p{n}"
            if not (out / "ra_df.csv").is_file():
                ra_main(["--result_file", str(rd), "--defense", d, "--yaml_path", a.yaml_path, "--poison_num", str(n),
                         "--save_name", out.name, "--device", a.device] + (["--no_progress"] if a.no_progress else [])
                        + ([] if a.epochs is None else ["--epochs", str(a.epochs)]))
            df = pd.read_csv(out / "ra_df.csv")
            for _, r in df.iterrows():
                rows.append({"defense": d, "poison_num": n, "epoch": int(r["epoch"]), "test_asr": r.get("test_asr"),
                             "test_acc": r.get("test_acc")})
    table = pd.DataFrame(rows)

    dest = rd / "ra_budget"
    with OutputFolder(dest, overwrite=True, what="RA-budget table") as folder:  # a table of the RA runs: replaced whole
        atomic_write_text(folder.path / "ra_budget.csv", table.to_csv(index=False))
        plot(table, folder.path / "ra_budget.png", rd.name)
    png = dest / "ra_budget.png"
    print("P-ASR after the last RA epoch (rows: defense, columns: poison_num):")
    last = table[table["epoch"] == table["epoch"].max()].pivot(index="defense", columns="poison_num", values="test_asr")
    print((100 * last).round(1).to_string())
    print(f"written to {dest / 'ra_budget.csv'} and {png}")
    return dest


def plot(table: pd.DataFrame, path: Path, title: str = "") -> Path:
    import matplotlib  # lazy: matplotlib is heavy and only needed for figures

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # lazy: matplotlib is heavy and only needed for figures

    ds = list(dict.fromkeys(table["defense"]))
    fig, axes = plt.subplots(1, len(ds), figsize=(4 * len(ds), 3.2), sharey=True, squeeze=False)
    for ax, d in zip(axes[0], ds):
        sub = table[table["defense"] == d]
        for n, g in sub.groupby("poison_num"):
            ax.plot(g["epoch"], 100 * g["test_asr"], marker="o", ms=3, label=f"{n} poisoned")
        ax.set_title(d)
        ax.set_xlabel("RA epoch")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("P-ASR (%)")
    axes[0][-1].legend(fontsize=8)
    fig.suptitle(f"P-ASR vs retuning budget {title}".strip())
    fig.tight_layout()
    atomic_savefig(fig, path, dpi=120)
    return path


def main(argv=None) -> int:
    return run_cli(run, argv)
