"""Which defenses of a record are only superficially safe? (bdsafety/study/audit.py)

    python analysis/audit.py --result_file badnet_demo [--defense all|a,b] [--run fst,pam] [--clean_reference]
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bdsafety.cli import run_cli  # noqa: E402
from bdsafety.study.audit import main  # noqa: E402


def _main(argv=None):
    rc = main(argv)
    if rc:
        raise SystemExit(rc)


if __name__ == "__main__":
    sys.exit(run_cli(_main))
