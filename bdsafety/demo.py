"""The whole pipeline on the embedded synthetic data, one command: python -m bdsafety.demo

attack (BadNets) -> clean reference (pratio 0) -> defenses -> retuning attack on each -> QRA on FST -> LMC -> table + plots.
Every step runs the same command a user would type (printed before it runs), so the demo doubles as a
walk-through. Steps whose output already exists are skipped (--fresh redoes everything).
"""
from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
import time
from pathlib import Path

from bdsafety.defenses.i_bau import NAME as IBAU_FOLDER  # BackdoorBench's folder name, "i-bau"

ROOT = Path(__file__).resolve().parent.parent
# FST and BTI-DBF(U): the paper's superficial baselines that purify the demo model; EP: the oracle reference; PAM.
DEFAULT_DEFENSES = ("fst", "bti_dbf", "exact_purification", "pam")
FOLDER = {"i_bau": IBAU_FOLDER}  # entry point name -> its folder under defense/ where they differ
ALL_DEFENSES = ("ft", "fst", "lp", "fe_tuning", "ft_init", "exact_purification", "ft_sam", "anp", "i_bau", "bti_dbf", "pam")


def _run(args: list[str], log) -> None:
    cmd = [sys.executable, *args]
    log(f"$ python {' '.join(shlex.quote(a) for a in args)}")
    t0 = time.time()
    r = subprocess.run(cmd, cwd=ROOT)
    if r.returncode != 0:
        raise SystemExit(f"demo: step failed (exit {r.returncode}): python {' '.join(args)}")
    log(f"  done in {time.time() - t0:.0f}s")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bdsafety.demo", description=__doc__.split("\n")[0])
    p.add_argument("--record_root", default="./record")
    p.add_argument("--defenses", default=",".join(DEFAULT_DEFENSES),
                   help=f"comma list, or 'all' ({', '.join(ALL_DEFENSES)})")
    p.add_argument("--attack_only", action="store_true", help="only train and report the backdoored model")
    p.add_argument("--fresh", action="store_true", help="redo every step (overwrite existing outputs)")
    p.add_argument("--device", default="auto")
    p.add_argument("--dry_run", action="store_true", help="print the commands without running them")
    p.add_argument("--seeds", default="0", help="comma list of seeds: the whole chain runs once per seed (every step's "
                                                "--random_seed), into <record_root>/seed<N>/ when more than one is given, "
                                                "then <record_root>/demo_seeds.md gives mean and range per cell")
    a = p.parse_args(argv)
    try:
        seeds = [int(s) for s in a.seeds.split(",") if s.strip()]
    except ValueError:
        p.error(f"--seeds takes a comma list of integers, got {a.seeds!r}")
    if not seeds or any(s < 0 for s in seeds) or len(set(seeds)) != len(seeds):
        p.error(f"--seeds takes distinct non-negative integers, got {a.seeds!r}")
    if len(seeds) > 1:
        roots = []
        for seed in seeds:
            sub = [x for x in (argv if argv is not None else sys.argv[1:])]
            sub = _replace_flag(_replace_flag(sub, "--seeds", str(seed)), "--record_root", str(Path(a.record_root) / f"seed{seed}"))
            rc = main(sub)
            if rc:
                return rc
            roots.append(Path(a.record_root) / f"seed{seed}")
        if not a.dry_run and not a.attack_only:
            print(summarize_seeds(roots, seeds, Path(a.record_root) / "demo_seeds.md"))
        return 0
    seed = seeds[0]
    defenses = list(ALL_DEFENSES) if a.defenses == "all" else [d for d in a.defenses.split(",") if d]
    unknown = [d for d in defenses if d not in ALL_DEFENSES]
    if unknown:
        p.error(f"unknown defenses {unknown}; valid: {', '.join(ALL_DEFENSES)}")
    folders = [FOLDER.get(d, d) for d in defenses]
    root = Path(a.record_root)
    common = (["--record_root", str(root), "--device", a.device] + (["--random_seed", str(seed)] if seed else [])
              + (["--overwrite"] if a.fresh else []))
    t0 = time.time()

    def log(msg):
        print(f"[demo {time.time() - t0:5.0f}s] {msg}", flush=True)

    def need(path: Path) -> bool:
        return a.fresh or a.dry_run or not path.exists()

    run = (lambda args, log: log(f"$ python {' '.join(shlex.quote(x) for x in args)}")) if a.dry_run else _run

    bd, clean = root / "badnet_demo", root / "clean_demo"
    if need(bd / "attack_result.pt"):
        run(["attack/badnet.py", "--yaml_path", "config/attack/badnet/demo.yaml", "--save_folder_name", "badnet_demo", *common], log)
    if a.attack_only:
        run(["-m", "bdsafety.records", str(bd)], log)
        return 0
    if need(clean / "attack_result.pt"):
        run(["attack/badnet.py", "--yaml_path", "config/attack/badnet/demo.yaml", "--save_folder_name", "clean_demo",
              "--pratio", "0", *common], log)
    for d, f in zip(defenses, folders):
        if need(bd / "defense" / f / "defense_result.pt"):
            run([f"defense/{d}.py", "--result_file", "badnet_demo", "--yaml_path", f"config/defense/{d}/demo.yaml", *common], log)
    ra = ["retune_attack/ra.py", "--yaml_path", "config/retune_attack/ra/demo.yaml", *common]
    if need(bd / "ra" / "ra_result.pt"):
        run([*ra, "--result_file", "badnet_demo", "--defense", "none"], log)
    if need(clean / "ra" / "ra_result.pt"):
        run([*ra, "--result_file", "clean_demo", "--defense", "none", "--poison_source", "badnet_demo"], log)
    todo = [f for f in folders if need(bd / "defense" / f / "ra" / "ra_result.pt")]
    if todo:
        run([*ra, "--result_file", "badnet_demo", "--defense", ",".join(todo)], log)
    if "fst" in folders and need(bd / "defense" / "fst" / "qra" / "qra_compare.csv"):
        run(["retune_attack/qra.py", "--result_file", "badnet_demo", "--defense", "fst", "--clean_record", "clean_demo",
             "--yaml_path", "config/retune_attack/qra/demo.yaml", *common], log)
    if need(bd / "lmc" / "lmc.csv"):
        run(["analysis/lmc.py", "--result_file", "badnet_demo", "--defense", ",".join(folders), *common], log)
    run(["analysis/report.py", "--result_file", "badnet_demo", "--clean_record", "clean_demo", "--record_root", str(root)], log)
    log(f"finished: table in {bd / 'report' / 'report.md'}, plots {bd / 'report' / 'ra_curves.png'} and {bd / 'lmc' / 'lmc.png'}")
    return 0


def _replace_flag(argv: list[str], flag: str, value: str) -> list[str]:
    out, i = [], 0
    while i < len(argv):
        if argv[i] == flag:
            i += 2
            continue
        if argv[i].startswith(flag + "="):
            i += 1
            continue
        out.append(argv[i])
        i += 1
    return out + [flag, value]


def summarize_seeds(roots: list[Path], seeds: list[int], path: Path) -> str:
    """Mean and [min, max] over seeds of every cell of the per-seed report tables (report/report.csv)."""
    import pandas as pd

    from bdsafety.safeio import atomic_write_text

    tables = [pd.read_csv(r / "badnet_demo" / "report" / "report.csv", index_col=0) for r in roots]
    cat = pd.concat(tables, keys=seeds, names=["seed"])
    g = cat.groupby(level="model", sort=False)
    mean, lo, hi = g.mean(), g.min(), g.max()

    def cell(m, a, b):
        return "-" if pd.isna(m) else f"{100 * m:.1f} [{100 * a:.1f}, {100 * b:.1f}]"

    cols = list(mean.columns)
    lines = [f"Demo over seeds {', '.join(map(str, seeds))}: mean [min, max] in percent "
             f"(p_* = after the retuning attack)", "", "| model | " + " | ".join(cols) + " |",
             "|---" * (len(cols) + 1) + "|"]
    for model in mean.index:
        lines.append(f"| {model} | " + " | ".join(cell(mean.at[model, c], lo.at[model, c], hi.at[model, c]) for c in cols) + " |")
    md = "\n".join(lines) + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, md)
    atomic_write_text(path.with_suffix(".csv"), cat.to_csv())
    return md


if __name__ == "__main__":
    sys.exit(main())
