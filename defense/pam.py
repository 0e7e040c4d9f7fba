"""PAM defense:

    python defense/pam.py --result_file <rf> --yaml_path config/defense/pam/<dataset>.yaml [--rho_sweep 0.3,0.5] [flags]
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bdsafety.cli import entry_point  # noqa: E402

if __name__ == "__main__":
    sys.exit(entry_point(__file__))
