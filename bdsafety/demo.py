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
    a = p.parse_args(argv)
    defenses = list(ALL_DEFENSES) if a.defenses == "all" else [d for d in a.defenses.split(",") if d]
    unknown = [d for d in defenses if d not in ALL_DEFENSES]
    if unknown:
        p.error(f"unknown defenses {unknown}; valid: {', '.join(ALL_DEFENSES)}")
    folders = [FOLDER.get(d, d) for d in defenses]
    root = Path(a.record_root)
    common = ["--record_root", str(root), "--device", a.device] + (["--overwrite"] if a.fresh else [])
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


if __name__ == "__main__":
    sys.exit(main())
