"""retuning attack:

    python retune_attack/ra.py --result_file R --defense fst [--yaml_path config/retune_attack/ra/demo.yaml]
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bdsafety.cli import entry_point  # noqa: E402

if __name__ == "__main__":
    sys.exit(entry_point(__file__))
