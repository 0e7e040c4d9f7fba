"""Paper-style table of a record: python analysis/report.py --result_file badnet_demo --clean_record clean_demo"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bdsafety.cli import run_cli  # noqa: E402
from bdsafety.study.record_report import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(run_cli(main))
