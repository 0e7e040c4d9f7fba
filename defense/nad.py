"""nad defense (Neural Attention Distillation):

    python defense/nad.py --result_file <record> [--yaml_path ...] [flags]
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bdsafety.cli import entry_point  # noqa: E402

if __name__ == "__main__":
    sys.exit(entry_point(__file__))
