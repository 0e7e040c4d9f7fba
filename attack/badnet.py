"""badnet attack:

    python attack/badnet.py --yaml_path config/attack/badnet/<dataset>.yaml [--save_folder_name NAME] [flags]
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bdsafety.cli import entry_point  # noqa: E402

if __name__ == "__main__":
    sys.exit(entry_point(__file__))
