"""Where the shipped configs are: the checkout's ``config/`` (the BackdoorBench-style layout every command shows), or,
for an installed package used outside a checkout, the copy installed with it (``bdsafety/configs``, built from
``config/`` by pyproject.toml's package data).

A ``--yaml_path`` written as the docs show it (``config/defense/pam/cifar10.yaml``) that does not exist relative to
the working folder is looked up under :data:`CONFIG_ROOT`, so the same commands work from a BackdoorBench checkout
used as the working folder.
"""
from __future__ import annotations

from pathlib import Path

PACKAGE = Path(__file__).resolve().parent
CHECKOUT = PACKAGE.parent


def _config_root() -> Path:
    here = CHECKOUT / "config"
    if (here / "study").is_dir():
        return here
    return PACKAGE / "configs"


CONFIG_ROOT = _config_root()


def shipped_config(path) -> Path:
    """``path`` as given if it exists; else, for a path under ``config/``, the shipped copy of that file (or the
    path as given when there is none, so the error names what the user wrote)."""
    p = Path(path)
    if p.exists() or p.is_absolute():
        return p
    parts = p.parts
    if parts and parts[0] == "config":
        alt = CONFIG_ROOT.joinpath(*parts[1:])
        if alt.exists():
            return alt
    return p
