"""ft_sam defense:

    python defense/ft_sam.py --result_file <record> [--yaml_path config/defense/ft_sam/cifar10.yaml] [flags]
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bdsafety.cli import entry_point  # noqa: E402

if __name__ == "__main__":
    sys.exit(entry_point(__file__))
