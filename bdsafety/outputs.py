"""The one output path: every output folder (attack record, defense, RA, QRA, LMC, study) is built in a
temporary folder beside its destination and moved into place only when complete.

Guarantees (tested by killing runs at several points, tests/test_outputs.py):
  * a killed run leaves either the old complete output or the new complete one, never a partial one and never
    nothing: the finished folder replaces the old one with one atomic exchange (Linux renameat2 RENAME_EXCHANGE;
    elsewhere two renames, and ``recover`` puts back whichever complete folder a kill between them left aside);
  * leftovers of killed runs (hidden ``.<name>.tmp-*`` / ``.<name>.new-*`` / ``.<name>.old-*`` folders) are
    cleaned up by the next run on the same destination and are never listed as results (hidden names);
  * user-given names are plain folder names (``check_folder_name``);
  * an output's name is checked against what lives beside it before any work: a file of the parent
    (``attack_result.pt``), a folder the parent owns (a record's ``defense/``, ``log/``, ``bd_train_dataset/``...)
    or a name too long for the file system once the temporary prefix is added is refused (``check_output_name``);
  * one run at a time per destination: a run holds a lock on its destination (``.<name>.lock`` beside it) from its
    start to its commit, so a second run on the same output fails at once with the first one's pid, and the
    existence and dependents checks are made again at the commit; results that appeared inside the old output
    while the run worked are never deleted: the run's finished folder is kept beside it as ``<name>.unsaved-<time>``
    and the error says so;
  * ``overwrite`` replaces only the named output. Results computed from it and stored inside it (a defense's
    ra/ and qra/, a record's defense/ folder) are never deleted silently: ``dependents='ask'`` (the default)
    refuses and lists them; 'delete' deletes them with the old output; 'archive' moves the old output, with
    them, to ``<parent>/.archive/<name>-<time>/``.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import fcntl
import os
import shutil
import time
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from bdsafety.config import check_folder_name
from bdsafety.errors import OutputError
from bdsafety.safeio import (
    atomic_savefig,
    atomic_torch_save,
    atomic_write_bytes,
    atomic_write_text,
    ensure_safe_loadable,
)

DEPENDENTS = ("ask", "delete", "archive")
# the folder of a record that caches its trigger inversions (bdsafety.defenses.bti): data, never a result
INVERSION_DIR = "bti_inversion"
# names an output may never take: folders and files that records, defense folders and studies hold themselves
RESERVED_NAMES = frozenset({
    "log", "logs", "defense", "bd_train_dataset", "bd_test_dataset", "cross_test_dataset", INVERSION_DIR, "figures",
    "attack_result.pt", "defense_result.pt", "ra_result.pt", "info.pickle", "config.yaml", "pool_split.json",
    "results.csv", "study.json", "report.md", "report.html",
})
# bytes a file name may have (Linux NAME_MAX), and the longest temporary suffix OutputFolder adds: ".<name>.unsaved-..."
NAME_MAX = 255
_WORK_SUFFIX = len(".") + len(".unsaved-") + 40
_TAGS = (".tmp-", ".new-", ".old-")
FAULT_ENV = "BDSAFETY_FAULT"


def fault_point(name: str) -> None:
    """Test hook: when the environment variable BDSAFETY_FAULT names this point, the process dies here at once
    (``os._exit(99)``, no cleanup, like ``kill -9``). Points: 'train' (engine.fit, after the first epoch),
    'write' (an output's temporary folder is being written), 'renamed' (the finished folder has its ``.new-``
    name), 'exchanged' (it replaced the old output, which now has the ``.new-`` name), 'moved_old' (the old
    output was set aside, the new one is not yet in place; the path taken where atomic exchange is unavailable,
    or always with BDSAFETY_NO_EXCHANGE=1)."""
    if os.environ.get(FAULT_ENV) == name:
        os._exit(99)


# ------------------------------------------------------------------------------------------- atomic exchange
def _renameat2():
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


_RENAMEAT2 = _renameat2()
_AT_FDCWD = -100
_RENAME_EXCHANGE = 2


def exchange(a: Path, b: Path) -> bool:
    """Atomically swap two existing paths (True), or return False where the OS cannot."""
    if _RENAMEAT2 is None or os.environ.get("BDSAFETY_NO_EXCHANGE"):
        return False
    rc = _RENAMEAT2(_AT_FDCWD, os.fsencode(str(a)), _AT_FDCWD, os.fsencode(str(b)), _RENAME_EXCHANGE)
    return rc == 0


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _leftovers(dest: Path) -> list[tuple[str, int, Path]]:
    """(tag, pid, path) of the hidden work folders of ``dest`` left by earlier runs."""
    out = []
    if not dest.parent.is_dir():
        return out
    prefix = f".{dest.name}"
    for p in dest.parent.iterdir():
        if not p.name.startswith(prefix):
            continue
        rest = p.name[len(prefix):]
        for tag in _TAGS:
            if rest.startswith(tag):
                try:
                    pid = int(rest[len(tag):].split("-")[0])
                except ValueError:
                    continue
                out.append((tag, pid, p))
    return out


def recover(dest: str | os.PathLike) -> None:
    """Repair what a killed run left around ``dest``: if ``dest`` is missing, put back the newest complete folder
    (a finished ``.new-`` one, else the ``.old-`` one set aside); then delete the work folders of dead runs."""
    dest = Path(dest)
    found = [x for x in _leftovers(dest) if not _pid_alive(x[1])]
    if not dest.exists():
        for tag in (".new-", ".old-"):
            cands = sorted((p for t, _, p in found if t == tag), key=lambda p: p.stat().st_mtime, reverse=True)
            if cands:
                os.replace(cands[0], dest)
                found = [x for x in found if x[2] != cands[0]]
                break
    for _, _, p in found:
        shutil.rmtree(p, ignore_errors=True)


def dependents_of(dest: Path, own: Iterable[str] = ("log",)) -> list[str]:
    """Sub-folders of an existing output that are results of their own (everything but ``own`` and hidden ones)."""
    if not dest.is_dir():
        return []
    own = set(own)
    return sorted(p.name for p in dest.iterdir() if p.is_dir() and p.name not in own and not p.name.startswith("."))


def check_output_name(dest: Path) -> None:
    """Refuse an output name that would replace something its parent holds, or that is too long (see module doc)."""
    name = dest.name
    check_folder_name(name, "save_name")
    if name in RESERVED_NAMES or name.endswith((".pt", ".pickle", ".csv", ".yaml", ".json", ".txt", ".log")):
        raise OutputError(f"output name {name!r} is reserved: records, defense folders and studies hold a file or "
                          f"folder of that name (or kind). Choose another name, e.g. --save_name "
                          f"{name.split('.')[0]}_run")
    if dest.exists() and not dest.is_dir():
        raise OutputError(f"{dest} is a file, not an output folder; choose another --save_name")
    if len(os.fsencode(name)) + _WORK_SUFFIX > NAME_MAX:
        raise OutputError(f"output name {name[:40]}... has {len(os.fsencode(name))} bytes; with the temporary prefix "
                          f"the file system's limit of {NAME_MAX} would be exceeded: use at most "
                          f"{NAME_MAX - _WORK_SUFFIX} bytes")


class _DestLock:
    """An exclusive, non-blocking flock on ``.<name>.lock`` beside ``dest``, removed on release (a killed run's lock
    file is left behind, unlocked: the next run takes it)."""

    def __init__(self, dest: Path, what: str):
        self.path = dest.parent / f".{dest.name}.lock"
        self.f = None
        try:
            import fcntl  # lazy and guarded: POSIX only
        except ImportError:  # pragma: no cover - no flock (Windows): no lock
            return
        # the folders made only to hold the lock: removed again (when still empty) if the run writes nothing
        self.made = [p for p in (dest.parent, *dest.parent.parents) if not p.exists()]
        dest.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(5):
            f = open(self.path, "a+")
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                f.seek(0)
                holder = f.read().strip() or "?"
                f.close()
                raise OutputError(f"another run (pid {holder}) is writing the {what} {dest} now; wait for it to "
                                  f"finish, or choose another --save_name") from None
            try:
                same = os.stat(self.path).st_ino == os.fstat(f.fileno()).st_ino
            except FileNotFoundError:
                same = False
            if same:  # not a file another run unlinked while we opened it
                break
            f.close()
        else:  # pragma: no cover - five lost races in a row
            raise OutputError(f"could not lock {self.path}: other runs keep replacing it")
        f.seek(0)
        f.truncate()
        f.write(str(os.getpid()))
        f.flush()
        self.f = f

    def release(self) -> None:
        if self.f is not None:

            self.path.unlink(missing_ok=True)
            fcntl.flock(self.f, fcntl.LOCK_UN)
            self.f.close()
            self.f = None
            for d in self.made:  # deepest first; a folder the run (or another) wrote into stays
                try:
                    d.rmdir()
                except OSError:
                    break


class OutputFolder:
    """Build an output folder under a temporary name and move it into place only when complete.

        with OutputFolder(dest, overwrite=cfg.overwrite, dependents=cfg.dependents) as out:
            ... write into out.path ...

    An error (or Ctrl-C) inside the block removes the temporary folder and keeps the old output. ``own`` lists the
    sub-folders the output itself writes (never dependents); ``carry`` sub-folders of the old output that are moved
    into the new one (caches that stay valid, e.g. nothing by default).
    """

    def __init__(self, dest: str | os.PathLike, *, overwrite: bool = False, dependents: str = "ask",
                 own: Iterable[str] = ("log",), carry: Iterable[str] = (), what: str = "output"):
        self.dest = Path(dest)
        check_output_name(self.dest)
        if dependents not in DEPENDENTS:
            raise OutputError(f"dependents must be one of {', '.join(DEPENDENTS)}, got {dependents!r}")
        self.overwrite, self.dependents, self.own, self.carry, self.what = (overwrite, dependents, tuple(own),
                                                                            tuple(carry), what)
        self.lock = _DestLock(self.dest, what)
        try:
            recover(self.dest)
            self.replaced = self._check()
        except BaseException:
            self.lock.release()
            raise
        self.path = self.dest.parent / f".{self.dest.name}.tmp-{os.getpid()}-{time.time_ns() % 10**9}"

    def _check(self) -> list:
        """The dependents a replacement deletes (raises when the destination may not be replaced)."""
        replaced: list[str] = []
        if self.dest.exists():
            if not self.overwrite:
                beside = (", or --save_name to write beside it" if self.what != "record"
                          else ", or choose another --save_folder_name")
                raise OutputError(f"{self.dest} already exists; pass --overwrite to replace it{beside}")
            deps = [d for d in dependents_of(self.dest, self.own) if d not in self.carry]
            if deps and self.dependents == "ask":
                listing = ", ".join(f"{d}/" for d in deps)
                raise OutputError(
                    f"{self.dest} holds results computed from it ({listing}); replacing it would delete them or leave "
                    f"them stale. Pass --dependents delete to delete them with the old {self.what}, or --dependents "
                    f"archive to move the old {self.what} with them to {self.dest.parent / '.archive'}/")
            replaced = deps
        return replaced

    def release(self) -> None:
        """Give up the destination without writing (a run that failed before its output was written)."""
        self.lock.release()

    def __del__(self):
        lock = getattr(self, "lock", None)
        if lock is not None:
            lock.release()

    def __enter__(self) -> "OutputFolder":
        self.dest.parent.mkdir(parents=True, exist_ok=True)
        self.path.mkdir()
        (self.path / "log").mkdir()
        return self

    def __exit__(self, exc_type, exc, tb):
        try:
            if exc_type is not None:
                shutil.rmtree(self.path, ignore_errors=True)
                return False
            fault_point("write")
            self.commit()
            return False
        finally:
            self.lock.release()

    def commit(self) -> Path:
        """Move the finished folder into place (atomically replacing an existing one), after checking again that it
        may: nothing new appeared at or inside the destination while this run worked."""
        pid = os.getpid()
        try:
            now = self._check()
            late = sorted(set(now) - set(self.replaced))
            if late:
                raise OutputError(f"{', '.join(d + '/' for d in late)} appeared inside {self.dest} while this run "
                                  f"worked (another run wrote it); replacing {self.dest} now would delete it")
        except OutputError as e:
            keep = self.dest.parent / f"{self.dest.name}.unsaved-{time.strftime('%Y%m%d-%H%M%S')}-{pid}"
            os.replace(self.path, keep)
            raise OutputError(f"{e}. Nothing was replaced; this run's finished output is kept at {keep}") from None
        if self.dest.exists():
            for name in self.carry:
                if (self.dest / name).exists() and not (self.path / name).exists():
                    os.replace(self.dest / name, self.path / name)
        new = self.dest.parent / f".{self.dest.name}.new-{pid}-{time.time_ns() % 10**9}"
        os.replace(self.path, new)  # complete from here on: recover() may promote it
        fault_point("renamed")
        if self.dest.exists():
            old = self.dest.parent / f".{self.dest.name}.old-{pid}-{time.time_ns() % 10**9}"
            if exchange(new, self.dest):
                fault_point("exchanged")
                os.replace(new, old)  # `new` now holds the previous output
            else:
                os.replace(self.dest, old)
                fault_point("moved_old")
                os.replace(new, self.dest)
            if self.dependents == "archive":
                archive = self.dest.parent / ".archive"
                archive.mkdir(exist_ok=True)
                os.replace(old, archive / f"{self.dest.name}-{time.strftime('%Y%m%d-%H%M%S')}-{pid}")
            else:
                shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(new, self.dest)
        return self.dest


def write_artifact(path: str | os.PathLike, value: Any) -> Path:
    """Write one named output file, choosing the format from the value's type (atomically):
    bytes -> as is; str -> utf-8 text; pandas DataFrame -> csv; uint8 (H, W[, C]) numpy image -> png (RGB);
    a matplotlib Figure -> png; anything else -> torch.save, checked to be readable by safe loading."""

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(value, (bytes, bytearray)):
        return atomic_write_bytes(path, bytes(value))
    if isinstance(value, str):
        return atomic_write_text(path, value)
    try:
        import pandas as pd  # lazy: pandas only for csv outputs; this low-level module stays light

        if isinstance(value, pd.DataFrame):
            return atomic_write_text(path, value.to_csv(index=value.index.name is not None))
    except ImportError:  # pragma: no cover
        pass

    if isinstance(value, np.ndarray) and path.suffix == ".png":
        import cv2  # lazy: opencv only to write/read image files here

        img = value[..., ::-1] if value.ndim == 3 and value.shape[2] == 3 else value
        ok, buf = cv2.imencode(".png", np.ascontiguousarray(img))
        if not ok:
            raise OutputError(f"could not encode {path.name} as png")
        return atomic_write_bytes(path, buf.tobytes())
    if type(value).__name__ == "Figure" and hasattr(value, "savefig"):
        return atomic_savefig(value, path, dpi=130)
    ensure_safe_loadable(value, path.name)
    return atomic_torch_save(value, path)
