"""The demo, one command: python -m bdsafety.demo  (an alias of the demo study)

    python -m bdsafety.demo                 == python analysis/run_study.py --yaml_path config/study/demo.yaml
    python -m bdsafety.demo --seeds         == ... --yaml_path config/study/demo_seeds.yaml  (README table, 3 seeds)
    python -m bdsafety.demo --dry_run       (any other flag of analysis/run_study.py is passed on)

BadNets on the embedded synthetic data -> clean reference -> defenses -> RA on every model -> QRA on FST -> LMC ->
results.csv, report.md and report.html in record/study_<name>/. Finished jobs are skipped on a rerun.
"""
from __future__ import annotations

import sys
from pathlib import Path

from bdsafety.paths import CONFIG_ROOT
from bdsafety.study.runner import main as run_study

ROOT = Path(__file__).resolve().parent.parent
DEMO = CONFIG_ROOT / "study" / "demo.yaml"
DEMO_SEEDS = CONFIG_ROOT / "study" / "demo_seeds.yaml"


def study_argv(argv: list[str]) -> list[str]:
    """The analysis/run_study.py arguments the alias stands for."""
    argv = list(argv)
    has_yaml = any(a == "--yaml_path" or a.startswith("--yaml_path=") for a in argv)
    if "--seeds" in argv:
        if has_yaml:
            raise SystemExit("python -m bdsafety.demo: --seeds picks config/study/demo_seeds.yaml; drop --yaml_path "
                             "or --seeds")
        argv.remove("--seeds")
        return ["--yaml_path", str(DEMO_SEEDS), *argv]
    return argv if has_yaml else ["--yaml_path", str(DEMO), *argv]


def main(argv=None) -> int:
    if argv is None:
        argv = sys.argv[1:]
    if argv and argv[0] in ("-h", "--help"):
        print(__doc__)
    return run_study(study_argv(argv))


if __name__ == "__main__":
    from bdsafety.cli import run_cli

    def _main(argv=None):
        rc = main(argv)
        if rc:
            raise SystemExit(rc)

    sys.exit(run_cli(_main))
