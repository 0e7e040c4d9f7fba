"""fp defense (Fine-Pruning):

    python defense/fp.py --result_file <record> [--yaml_path config/defense/fp/cifar10.yaml] [flags]
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bdsafety.cli import entry_point  # noqa: E402

if __name__ == "__main__":
    sys.exit(entry_point(__file__))
