"""Run a study (grid of attacks, defenses, retuning attacks, analyses, seeds):

    python analysis/run_study.py --yaml_path config/study/demo.yaml
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bdsafety.cli import run_cli  # noqa: E402
from bdsafety.study.runner import main  # noqa: E402


def _main(argv=None):
    rc = main(argv)
    if rc:
        raise SystemExit(rc)


if __name__ == "__main__":
    sys.exit(run_cli(_main))
