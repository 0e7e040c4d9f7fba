"""Shared plumbing of the thin entry points.

Every entry script (attack/<name>.py, defense/<name>.py, retune_attack/<name>.py, analysis/<name>.py) is the same
three lines: it calls ``entry_point(__file__)``, which finds its registered method from the script's own folder
and file name. Errors a user can cause (bdsafety.errors.UserError) become one line on stderr and exit code 2;
every other exception is a bug and keeps its traceback. BDSAFETY_DEBUG=1 shows tracebacks for user errors too.
"""
from __future__ import annotations

import errno
import os
import sys
from pathlib import Path
from typing import Callable

from bdsafety import registry
from bdsafety.errors import UserError


def run_cli(fn: Callable[[list[str] | None], object], argv: list[str] | None = None) -> int:
    """Run ``fn(argv)``; print user errors as one line (exit 2), Ctrl-C as one line (exit 130)."""

    try:
        fn(argv)
    except UserError as e:
        if os.environ.get("BDSAFETY_DEBUG"):
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: nothing half-written was kept", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader went away (| head): stop quietly, as Python's docs advise
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except OSError as e:
        if e.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        print(f"error: no space left on the device while writing {e.filename or 'an output'}; nothing half-written was "
              f"kept. Free some space or write elsewhere (--record_root)", file=sys.stderr)
        return 2
    return 0


def method_for_script(path: str | os.PathLike):
    """The registered method of an entry script: defense/pam.py -> registry.get('defense', 'pam')."""

    p = Path(path)
    kinds = {d: k for k, d in registry.KIND_DIRS.items()}
    kind = kinds.get(p.parent.name)
    if kind is None:
        raise RuntimeError(f"{p}: entry scripts live in one of {', '.join(kinds)}/")
    return registry.get(kind, p.stem)


def entry_point(script: str, argv: list[str] | None = None) -> int:
    """main() of every entry script."""
    return run_cli(lambda a: method_for_script(script).main(a), argv)
