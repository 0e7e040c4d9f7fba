"""Attack resources generated in-project and cached under <record_root>/.cache/ (LC's adversarial images, SSBA's
encoder, Narcissus's surrogate and trigger): one loader that reuses a cache file only when it was made from exactly
the same inputs, and otherwise rebuilds it and says why (missing, unreadable/corrupt, or made for other weights / data
/ settings). Runs that need the same entry at once (an attack and its clean reference as concurrent study jobs) make
it once: the later one waits on a file lock, then reuses it."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Callable

import numpy as np

from bdsafety.safeio import atomic_torch_save, file_lock, safe_torch_load


def array_digest(*arrays: np.ndarray) -> str:
    """sha256 (first 16 hex digits) over the shapes, dtypes and bytes of ``arrays`` (a data set's identity)."""
    h = hashlib.sha256()
    for a in arrays:
        a = np.ascontiguousarray(a)
        h.update(f"{a.dtype}|{a.shape}|".encode())
        h.update(a.tobytes())
    return h.hexdigest()[:16]


def cache_key(meta: dict) -> str:
    """Short stable hash of a plain dict (the cache file's name)."""
    return hashlib.sha256(json.dumps(meta, sort_keys=True, default=str).encode()).hexdigest()[:20]


def load_or_build(path: str | Path, meta: dict, build: Callable[[], dict], log: Callable[[str], None], what: str,
                  check: Callable[[dict], None] | None = None) -> dict:
    """The dict cached at ``path`` if its ``meta`` equals ``meta`` (and ``check`` accepts it), else ``build()``,
    stored atomically with ``meta`` and returned. ``meta`` holds plain values: everything the resource depends on.
    Under a file lock on ``path``: concurrent calls for the same entry build it once."""

    path = Path(path)
    with file_lock(path, log, what):
        return _load_or_build(path, meta, build, log, what, check)


def _load_or_build(path: Path, meta: dict, build: Callable[[], dict], log: Callable[[str], None], what: str,
                   check: Callable[[dict], None] | None) -> dict:

    if path.is_file():
        reason = None
        try:
            obj = safe_torch_load(path)
            if not isinstance(obj, dict) or "meta" not in obj:
                raise ValueError("not a cache file of this project")
            if obj["meta"] != meta:
                diff = sorted(k for k in set(meta) | set(obj["meta"]) if meta.get(k) != obj["meta"].get(k))
                reason = f"was made for other inputs (differs in: {', '.join(diff)})"
            elif check is not None:
                check(obj)
        except Exception as e:  # unreadable or malformed: rebuilt below
            reason = f"is unreadable or corrupt ({str(e).splitlines()[0] if str(e) else type(e).__name__})"
        if reason is None:
            log(f"{what}: reusing the cache {path}")
            return obj
        log(f"{what}: the cache {path} {reason}; rebuilding it")
    obj = dict(build())
    obj["meta"] = meta
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_torch_save(obj, path)
    log(f"{what}: cached at {path}")
    return obj
