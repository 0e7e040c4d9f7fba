"""P-ASR vs retuning-attack budget:

    python analysis/ra_budget.py --result_file <rf> [--defense fst,exact_purification,pam]
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bdsafety.analysis.ra_budget import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
