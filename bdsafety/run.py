"""Every entry point of the BackdoorBench-style scripts, for an installed package (no checkout needed):

    bdsafety <kind> <method> [flags]          # console script; = python -m bdsafety.run <kind> <method> [flags]
    bdsafety attack badnet --yaml_path config/attack/badnet/demo.yaml --save_folder_name badnet_demo
    bdsafety defense pam --result_file badnet_demo --yaml_path config/defense/pam/demo.yaml
    bdsafety retune ra --result_file badnet_demo --defense pam --yaml_path config/retune_attack/ra/demo.yaml
    bdsafety analysis lmc --result_file badnet_demo --defense pam
    bdsafety study --yaml_path config/study/demo.yaml      # analysis/run_study.py
    bdsafety audit --result_file badnet_demo               # analysis/audit.py
    bdsafety inspect record/badnet_demo                    # the record inspector

The kinds are the script folders' (``attack``, ``defense``, ``retune_attack`` or ``retune``, ``analysis``); the flags
are the scripts' own. ``--yaml_path config/...`` as the docs write it finds the configs installed with the package
when the working folder has none (bdsafety.paths), so a BackdoorBench checkout can be the working folder with
``--record_root`` pointing at its ``record/``.
"""
from __future__ import annotations

import sys

from bdsafety import registry
from bdsafety.cli import run_cli
from bdsafety.inspector import main as inspect_main
from bdsafety.study.audit import main as audit_main
from bdsafety.study.runner import main as study_main

KIND_ALIASES = {"attack": "attack", "defense": "defense", "retune": "retune", "retune_attack": "retune",
                "analysis": "analysis"}
TOOLS = ("study", "audit", "inspect")


def _usage() -> str:

    registry.discover()
    lines = ["usage: bdsafety <kind> <method> [flags]  |  bdsafety study|audit|inspect [flags]", "", "methods:"]
    for kind in ("attack", "defense", "retune", "analysis"):
        lines.append(f"  {kind:9s} {', '.join(registry.names(kind))}")
    lines.append("")
    lines.append("Each method's flags: bdsafety <kind> <method> --help")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0 if argv else 2
    head, rest = argv[0], argv[1:]
    if head == "study":

        return run_cli(lambda a: _rc(study_main(a)), rest)
    if head == "audit":

        return run_cli(lambda a: _rc(audit_main(a)), rest)
    if head == "inspect":

        return inspect_main(rest)
    kind = KIND_ALIASES.get(head)
    if kind is None:
        print(f"bdsafety: unknown kind {head!r}; valid: {', '.join(sorted(KIND_ALIASES))} or {', '.join(TOOLS)}\n\n"
              + _usage(), file=sys.stderr)
        return 2
    if not rest or rest[0].startswith("-"):
        print(f"bdsafety {head}: name the method first, e.g. bdsafety {head} <method> --help\n\n" + _usage(),
              file=sys.stderr)
        return 2

    name, flags = rest[0], rest[1:]
    return run_cli(lambda a: _rc(registry.get(kind, name).main(a)), flags)


def _rc(result) -> None:
    """Method mains return their outputs; study / audit mains return an exit status (non-zero: raise it)."""
    if isinstance(result, int) and not isinstance(result, bool) and result:
        raise SystemExit(result)


if __name__ == "__main__":
    sys.exit(main())
