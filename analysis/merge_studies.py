"""Merge the report folders of chunks of one study grid into one report (bdsafety/study/merge.py):

    python analysis/merge_studies.py --inputs <chunk report folders> --out <folder> [--yaml_path <study yaml>]
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bdsafety.cli import run_cli  # noqa: E402
from bdsafety.study.merge import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(run_cli(main))
