"""Safe loading of third-party pickles and atomic writes: the two I/O rules every file of this project follows.

- ``safe_torch_load``: record files (attack_result.pt, info.pickle, defense_result.pt) come from third parties and a
  pickle can run code. They load with ``weights_only=True`` plus an allow-list of the numpy types this project and
  BackdoorBench write (arrays, empty ones included, and scalars of every numeric and boolean dtype); anything else
  is refused with an error saying whether the content is merely of an unknown type or would call something that
  executes code, and naming ``--trust_record``, the explicit opt-in for files you trust (which warns before loading).
- ``atomic_*``: a file is written to a temp file in the same folder, fsynced, then renamed into place, so no reader
  ever sees half a file.
"""
from __future__ import annotations

import contextlib
import errno
import io
import os
import re
import shutil
import tempfile
import zipfile
from pathlib import Path
from pickle import UnpicklingError
from typing import Any, BinaryIO, Callable

import numpy as np
import torch

from bdsafety.errors import OutputError, UserError

__all__ = ["RecordError", "safe_torch_load", "atomic_torch_save", "atomic_write_text", "atomic_write_bytes",
           "ensure_safe_loadable", "file_lock"]


class RecordError(UserError):
    """A record (or one of its files) is missing, broken, or refused by safe loading. The message says how to fix it."""


# ----------------------------------------------------------------------------------------------- safe loading

def _numpy_safe_globals() -> list:
    """Exactly the numpy globals a BackdoorBench record pickles: int64/float64 arrays, numpy scalars, their dtypes.

    Pickles written with numpy 2 name ``numpy._core.multiarray``, those written with numpy 1.x (BackdoorBench
    v2.0 records) ``numpy.core.multiarray``: both spellings map to the same function. int32 is included because
    ``np.arange`` gives int32 indices on Windows with numpy 1.x.
    """
    try:
        from numpy._core import multiarray as ma  # numpy 2 / numpy 1 spellings (try/except)
    except ImportError:  # numpy < 1.26 has no numpy._core
        from numpy.core import multiarray as ma  # numpy 1 spelling
    entries: list = [np.ndarray, np.dtype]
    for fn in (ma._reconstruct, ma.scalar):
        for module in ("numpy._core.multiarray", "numpy.core.multiarray"):
            entries.append((fn, f"{module}.{fn.__name__}"))
    # unpickling a dtype ends with a BUILD on the dtype instance, which torch only allows for listed types: every
    # numeric and boolean dtype (not object, whose elements could be anything)
    entries += [type(np.dtype(t)) for t in SAFE_DTYPES]
    # an EMPTY array pickles its (empty) buffer as the builtin ``bytes``: a type, harmless to call
    entries.append(bytes)
    return entries


SAFE_DTYPES = (np.bool_, np.uint8, np.int8, np.uint16, np.int16, np.uint32, np.int32, np.uint64, np.int64,
               np.float16, np.float32, np.float64, np.complex64, np.complex128)

# Globals whose call runs code or commands, touches files, processes or the network, or imports modules: a pickle
# naming one is an attack (or a very unusual file), not merely of an unknown type.
_CODE_MODULES = ("os", "posix", "nt", "subprocess", "sys", "runpy", "importlib", "code", "codeop", "pty", "shutil",
                 "socket", "ctypes", "pickle", "_pickle", "marshal", "types", "webbrowser", "commands", "platform",
                 "multiprocessing", "asyncio", "urllib", "http", "ftplib", "smtplib", "pdb", "timeit", "torch.hub",
                 "_posixsubprocess", "pydoc", "cProfile", "profile", "trace", "doctest", "bdb", "numpy.testing",
                 "numpy.f2py", "numpy.distutils", "setuptools", "pip", "zipimport", "imp")
_CODE_BUILTINS = ("eval", "exec", "compile", "__import__", "getattr", "setattr", "delattr", "open", "breakpoint",
                  "input", "execfile", "apply", "globals", "locals", "vars")


def can_execute_code(global_name: str) -> bool:
    """Whether a refused pickle global (``posix.system``, ``builtins.eval``) executes code or commands when called."""
    name = global_name.strip().strip("'\"<>").removeprefix("class ").strip("'\"")
    module, _, attr = name.rpartition(".")
    if module in ("builtins", "__builtin__", "__builtins__"):
        return attr in _CODE_BUILTINS
    return any(module == m or module.startswith(m + ".") for m in _CODE_MODULES) or (
        module == "operator" and attr in ("attrgetter", "methodcaller"))


_REFUSED_PATTERNS = (
    re.compile(r"GLOBAL (\S+) was not an allowed global"),
    re.compile(r"unsupported GLOBAL (\S+) whose module"),
    re.compile(r"reduce for unrecognized function (.+?)(?: which belongs|$)", re.M),
    re.compile(r"Can only (?:build|create new object for) .*?(?:got|but got) (.+)$", re.M),
)


def _weights_only_detail(msg: str) -> str:
    """The informative line of torch's long weights_only error message."""
    m = re.search(r"WeightsUnpickler error:\s*(.+?)(?:\n\s*\n|$)", msg, re.S)
    return (m.group(1) if m else msg.splitlines()[0] if msg else "unknown error").strip()


def _weights_only_load(f: str | os.PathLike | BinaryIO, name: str) -> Any:
    if not hasattr(torch.serialization, "safe_globals"):
        raise RecordError(f"reading {name} safely needs torch>=2.5 (torch.serialization.safe_globals); "
                          f"this is torch {torch.__version__}: upgrade torch, "
                          f"or pass --trust_record for files you trust")
    with torch.serialization.safe_globals(_numpy_safe_globals()):
        return torch.load(f, map_location="cpu", weights_only=True)


def ensure_safe_loadable(obj: Any, what: str) -> None:
    """Refuse to write ``obj`` if safe_torch_load could not read it back (e.g. a Path or a custom object)."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    try:
        _weights_only_load(buf, what)
    except UnpicklingError as e:
        raise ValueError(f"{what} holds a value that safe loading refuses ({_weights_only_detail(str(e))}); "
                         "store plain python values (str, int, float, bool, None, lists, dicts) or tensors") from None


def safe_torch_load(path: str | os.PathLike, trust_record: bool = False) -> Any:
    """``torch.load`` a record file with ``weights_only=True`` plus the numpy allow-list, onto the CPU.

    ``trust_record=True`` (``--trust_record`` on the CLI) allows full unpickling: only for files you trust,
    since a pickle can run arbitrary code. Every failure is a :class:`RecordError` naming the file.
    """
    path = Path(path)
    if not path.exists():
        raise RecordError(f"{path} does not exist; re-run the command that writes it")
    if not path.is_file():
        raise RecordError(f"{path} is not a file (expected a file written by torch.save)")
    with open(path, "rb") as f:
        head = f.read(4)
    if not head:
        raise RecordError(f"{path} is empty (an interrupted write?); re-run the command that writes it")
    is_zip = head == b"PK\x03\x04"
    if not is_zip and head[:1] != b"\x80":
        raise RecordError(f"{path} is not a file written by torch.save (neither a torch zip archive nor a pickle)")
    if is_zip and not zipfile.is_zipfile(path):
        raise RecordError(f"{path} is truncated or corrupt (its zip directory is missing); "
                          "re-run the command that writes it, or copy the file again")
    try:
        if trust_record:
            import sys  # lazy: only on this error path

            print(f"warning: --trust_record: loading {path} with full unpickling; any code it contains may run now",
                  file=sys.stderr, flush=True)
            return torch.load(path, map_location="cpu", weights_only=False)
        return _weights_only_load(path, str(path))
    except UnpicklingError as e:
        msg = str(e)
        if trust_record:
            raise RecordError(f"{path} could not be unpickled: {_weights_only_detail(msg)}") from None
        refused = next((m.group(1).strip() for p in _REFUSED_PATTERNS if (m := p.search(msg))), None)
        if refused is not None and can_execute_code(refused):
            raise RecordError(
                f"{path} was refused by safe loading: it CAN EXECUTE CODE - unpickling it would call {refused}. "
                f"Nothing was run. Do not load it unless you made it yourself (then --trust_record, trust_record=True, "
                "allows full unpickling); ask its author for a record of tensors and numpy arrays."
            ) from None
        if refused is not None:
            raise RecordError(
                f"{path} was refused by safe loading: it holds a value of an unknown type ({refused}), which is not on "
                "the allow-list (tensors, numpy arrays/scalars, plain python values); nothing was run. Unpickling it "
                "fully would import and run that type's code: if you trust this file, load it with --trust_record "
                "(trust_record=True)."
            ) from None
        raise RecordError(
            f"{path} could not be read with safe loading ({_weights_only_detail(msg)}); it may be corrupt "
            "(re-run the command that writes it), or, if you trust it, load it with --trust_record (trust_record=True)."
        ) from None
    except (RuntimeError, EOFError, KeyError, ValueError, zipfile.BadZipFile, OSError) as e:
        raise RecordError(f"{path} is truncated or corrupt ({type(e).__name__}: "
                          f"{str(e).splitlines()[0] if str(e) else '-'}); re-run the command that writes it, or copy "
                          "the file again") from None


# ----------------------------------------------------------------------------------------------- atomic writes

def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


class DiskFull(OutputError):
    """The file system ran out of space (or quota) while writing an output: which path, and how much was needed."""

    def __init__(self, path: Path, written: int = 0):
        free = "?"
        with contextlib.suppress(OSError):
            free = f"{shutil.disk_usage(path.parent).free:,}"
        need = f"at least {written:,} bytes were needed for it" if written else "it could not be started"
        super().__init__(f"no space left on the device of {path.parent} while writing {path.name} ({need}; {free} "
                         f"bytes free there). Nothing half-written was kept: free some space, "
                         f"or write elsewhere (--record_root)")


def _atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], None]) -> Path:
    """Write ``path`` through a temp file in the same folder, fsync it, then rename it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    written = 0
    try:
        with os.fdopen(fd, "wb") as f:
            try:
                write(f)
                f.flush()
                os.fsync(f.fileno())
            finally:
                written = f.tell()
        os.chmod(tmp, 0o666 & ~_current_umask())  # mkstemp creates 0600; give the usual permissions
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise DiskFull(path, written) from None
        raise
    with contextlib.suppress(OSError):  # persist the rename; not possible on every platform
        dfd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    return path


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> Path:
    """``torch.save(obj, path)`` that never leaves a half-written file at ``path``."""
    return _atomic_write(path, lambda f: torch.save(obj, f))


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically."""
    return _atomic_write(path, lambda f: f.write(data))


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` (utf-8) to ``path`` atomically."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def figure_bytes(fig, fmt: str = "png", dpi: int = 120) -> bytes:
    """A matplotlib figure rendered to bytes (``fmt``: png, pdf, svg, ...); the figure is closed."""

    import matplotlib.pyplot as plt  # lazy: matplotlib is heavy and only needed for figures

    buf = io.BytesIO()
    fig.savefig(buf, format=fmt, dpi=dpi)
    plt.close(fig)
    return buf.getvalue()


def atomic_savefig(fig, path: str | os.PathLike, dpi: int = 120) -> Path:
    """Save a matplotlib figure to ``path`` atomically (format from the suffix) and close it."""
    return atomic_write_bytes(path, figure_bytes(fig, Path(path).suffix.lstrip(".") or "png", dpi))




_ensure_safe_loadable = ensure_safe_loadable  # old private name


# ----------------------------------------------------------------------------------------------- cache locks

@contextlib.contextmanager
def file_lock(path: str | Path, log: Callable[[str], None], what: str):
    """Hold an exclusive lock on the cache file ``path`` (a hidden ``.<stem>.lock`` beside it) while it is checked and,
    if need be, made: processes that need the same cache entry at the same time (study jobs on Ray or not, or two
    commands) make it once; the later one logs that it waits, then reuses it. Without fcntl (Windows) there is no
    lock: both make it."""
    try:
        import fcntl  # lazy and guarded: POSIX only
    except ImportError:
        yield
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(f".{path.stem}.lock"), "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log(f"another run is making this {what} ({path.name}); waiting to reuse it")
            fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
