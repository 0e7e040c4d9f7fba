"""Configuration: built-in defaults < yaml (--yaml_path) < command line, with validation.

Every entry point declares a schema (name -> Option). Unknown yaml keys and unknown flags are errors that
list the valid keys (BackdoorBench silently ignores typos; a mistyped hyper-parameter silently falls back to
its default, which is how wrong numbers get published).
"""
from __future__ import annotations

import argparse
import difflib
import json
import math
import os
import platform
import re
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable, Sequence

import numpy
import numpy as np
import yaml

from bdsafety.errors import ConfigError
from bdsafety.models.registry import _check_name
from bdsafety.paths import shipped_config


# ------------------------------------------------------------------------------------------- value checks
@dataclass(frozen=True)
class Check:
    """The valid values of a numeric option: an interval, optionally integers only. ``describe`` is shown in errors
    and in --help. Non-finite floats (nan, inf) are always refused."""

    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = False
    integer: bool = False
    text: str = ""

    def ok(self, v) -> bool:
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            return False
        if isinstance(v, float) and (not math.isfinite(v) or abs(v) > FLOAT32_MAX):
            return False  # tensors are float32: a larger value overflows in the optimizer, not here
        if self.integer and float(v) != int(v):
            return False
        if self.lo is not None and (v < self.lo or (self.lo_open and v == self.lo)):
            return False
        if self.hi is not None and (v > self.hi or (self.hi_open and v == self.hi)):
            return False
        return True

    def describe(self) -> str:
        if self.text:
            return self.text
        lo = "-inf" if self.lo is None else f"{self.lo:g}"
        hi = "inf" if self.hi is None else f"{self.hi:g}"
        kind = "an integer" if self.integer else "a finite number"
        return (f"{kind} in {'(' if self.lo_open or self.lo is None else '['}{lo}, "
                f"{hi}{')' if self.hi_open or self.hi is None else ']'}")


class AmountCheck(Check):
    """A ratio in (0, 1) of a split, or a count >= 1 (an integer)."""

    def ok(self, v) -> bool:
        if not Check(lo=0, lo_open=True).ok(v):
            return False
        return v < 1 or float(v) == int(v)

    def describe(self) -> str:
        return "a ratio in (0, 1) or a whole count >= 1"


FLOAT32_MAX = 3.4028234663852886e38

POS_INT = Check(lo=1, integer=True, text="an integer >= 1")
NONNEG_INT = Check(lo=0, integer=True, text="an integer >= 0")
SEED = Check(lo=0, hi=2**32 - 1, integer=True, text="an integer in [0, 2**32 - 1]")
POSITIVE = Check(lo=0, lo_open=True, text="a finite number > 0 (float32: at most 3.4e38)")
NONNEG = Check(lo=0, text="a finite number >= 0 (float32: at most 3.4e38)")
FRACTION = Check(lo=0, hi=1, text="a number in [0, 1]")
OPEN_FRACTION = Check(lo=0, hi=1, lo_open=True, hi_open=True, text="a number strictly between 0 and 1")
PROB = Check(lo=0, hi=1, lo_open=True, text="a number in (0, 1]")
FINITE = Check(text="a finite number (float32: |x| <= 3.4e38)")
AMOUNT = AmountCheck()

_DEVICE = re.compile(r"^(auto|cpu|cuda|cuda:\d+|mps)$")
_FOLDER_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.+=-]*$")


def check_device_name(name: str) -> str:
    if name is None or not _DEVICE.match(str(name)):
        raise ConfigError(f"device {name!r} is not a device name: use auto, cpu, cuda or cuda:N (N = GPU index)")
    return str(name)


def check_folder_name(name: str, flag: str = "save_name") -> str:
    """A plain folder name: no path separator, not '.', '..' or hidden, no spaces or shell characters."""
    s = str(name)
    if s in (".", "..") or not _FOLDER_NAME.match(s) or s.startswith(".") or "/" in s or "\\" in s:
        raise ConfigError(f"--{flag} {s!r} is not a plain folder name: use letters, digits and _ . + = - only, no path "
                          f"separator, not '.' or '..', not starting with '.' (e.g. --{flag} my_run)")
    return s


@dataclass
class Option:
    default: Any
    help: str = ""
    type: Callable | None = None  # inferred from the default when None
    choices: Sequence | None = None
    check: Check | None = None  # valid values of a number (or of each element of a list of numbers)
    nullable: bool | None = None  # may be None (default: only when the default is None)
    kind: str | None = None  # 'device', 'folder_name', 'index_file', 'model': validated by name
    none_is_name: bool = False  # the string 'none' is a value (e.g. RA's --defense none), not a null
    # the default is the behaviour from before the option existed: at that value the key is left out of study job ids
    # (bdsafety.study.plan.id_config), so adding the option does not make finished study outputs stale
    neutral: bool = False

    def is_nullable(self) -> bool:
        return self.default is None if self.nullable is None else self.nullable

    def is_numeric(self) -> bool:
        d = self.default
        if isinstance(d, bool) or self.choices is not None:
            return False
        if self.check is not None:
            return True
        return isinstance(d, (int, float)) or self.type in (int, float, float_list, int_list)


# ------------------------------------------------------------------------------------------- options of every run
PRECISIONS = ("fp32", "bf16")

# Options every registered method has (attacks, defenses, retuning attacks, analyses): merged into
# bdsafety.attacks.base.COMMON_ATTACK_SCHEMA and bdsafety.experiment.RECORD_SCHEMA, the two schemas every method's
# schema is built from (tests/test_registry.py checks each registered schema carries them).
RUN_SCHEMA = {
    "precision": Option("fp32", "numerics of every forward/backward pass: fp32 (the official code's, default) or bf16 "
                                "(bf16 autocast, the named speed option; PAM's displaced pass and black-box QRA's "
                                "finite differences stay fp32). On the CPU bf16 runs under torch's CPU autocast "
                                "(correct, usually slower)", choices=PRECISIONS),
    "eval_subset": Option(0, "speed option: the per-epoch test curve of a training loop is evaluated on a fixed, "
                             "seeded subset of this many samples of each test set (clean and poisoned); the evaluation "
                             "before training and the final one always use the full sets, so every reported final "
                             "figure is unchanged. 0 (default): every evaluation on the full sets",
                          check=Check(lo=0, integer=True, text="an integer >= 0")),
}


def _str2bool(v) -> bool:
    if isinstance(v, bool):
        return v
    s = str(v).strip().lower()
    if s in ("1", "true", "yes", "y", "on"):
        return True
    if s in ("0", "false", "no", "n", "off"):
        return False
    raise ValueError(f"not a boolean: {v!r}")


def _int(v) -> int:
    """int from an int, an integral float (1e3) or a string; refuses 2.5 instead of truncating it."""
    if isinstance(v, bool):
        raise ValueError("a boolean is not an integer")
    if isinstance(v, int):
        return v
    f = float(v)
    if not math.isfinite(f) or f != int(f):
        raise ValueError(f"not an integer: {v!r}")
    return int(f)


def float_list(v) -> list:
    if isinstance(v, (list, tuple)):
        return [float(a) for a in v]
    return [float(a) for a in str(v).split(",") if a.strip()]


def int_list(v) -> list:
    if isinstance(v, (list, tuple)):
        return [_int(a) for a in v]
    return [_int(a) for a in str(v).split(",") if a.strip()]


def str_list(v) -> list:
    if isinstance(v, (list, tuple)):
        return [str(a) for a in v]
    return [a.strip() for a in str(v).split(",") if a.strip()]


def _caster(opt: Option) -> Callable:
    if opt.type is not None:
        return opt.type
    d = opt.default
    if isinstance(d, bool):
        return _str2bool
    if isinstance(d, int):
        return _int
    if isinstance(d, float):
        return float
    if isinstance(d, (list, tuple)):
        return float_list if d and isinstance(d[0], float) else int_list if d and isinstance(d[0], int) else str_list
    return lambda v: v if v is None else str(v)


def _cast(name: str, opt: Option, value, source: str):
    if value is None or (isinstance(value, str) and value.strip().lower() in ("none", "null", "~")
                          and opt.is_nullable() and not (opt.none_is_name and value.strip() == "none")):
        if not opt.is_nullable():
            raise ConfigError(f"{source}: '{name}' has no value; give one (default {opt.default!r}) or delete the line")
        return None
    try:
        v = _caster(opt)(value)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{source}: bad value {value!r} for '{name}' ({e}); default is {opt.default!r}") from None
    if opt.choices is not None and v not in opt.choices:
        raise ConfigError(f"{source}: '{name}' must be one of {list(opt.choices)}, got {v!r}")
    if isinstance(v, float) and not math.isfinite(v) and opt.check is None:
        raise ConfigError(f"{source}: '{name}' must be a finite number, got {value!r}")
    if opt.check is not None:
        for item in (v if isinstance(v, (list, tuple)) else [v]):
            if not opt.check.ok(item):
                raise ConfigError(f"{source}: '{name}' must be {opt.check.describe()}, got {item!r}")
    if opt.kind == "device":
        check_device_name(v)
    elif opt.kind == "folder_name":
        check_folder_name(v, name)
    elif opt.kind == "model" and v is not None:

        try:
            _check_name(v)
        except ConfigError as e:
            raise ConfigError(f"{source}: '{name}': {e}") from None
    elif opt.kind == "index_file" and v is not None:
        read_index(v, None, flag=f"--{name}")  # parseable, non-empty, non-negative, unique (range: at use)
    return v


def _unknown_key_message(key: str, valid: Sequence[str], source: str) -> str:
    close = difflib.get_close_matches(key, valid, n=1)
    hint = f" Did you mean '{close[0]}'?" if close else ""
    return f"{source}: unknown key '{key}'.{hint} Valid keys: {', '.join(sorted(valid))}"


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate keys (PyYAML silently keeps the last one)."""


def _no_duplicates(loader, node, deep=False):
    seen = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise ConfigError(f"duplicate key '{key}' (lines {seen[key] + 1} and "
                              f"{key_node.start_mark.line + 1}): keep one")
        seen[key] = key_node.start_mark.line
    return yaml.SafeLoader.construct_mapping(loader, node, deep)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _no_duplicates)


def read_yaml(path: str | os.PathLike) -> dict:

    p = shipped_config(path)
    if not p.is_file():
        raise ConfigError(f"yaml config not found: {p}. Configs live under "
                          f"config/<attack|defense|retune_attack|study>/<name>/<dataset>.yaml")
    try:
        text = p.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{p}: cannot be read as text ({e})") from None
    try:
        data = yaml.load(text, Loader=_StrictLoader)
    except ConfigError as e:
        raise ConfigError(f"{p}: {e}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{p}: not valid yaml: {e}") from None
    if data is None:
        raise ConfigError(f"{p} is empty (or holds only comments): put key: value settings in it, or drop --yaml_path")
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: expected a mapping of key: value at the top level")
    return data


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # list valid flags on a typo
        if "unrecognized arguments" in message:
            bad = message.split(":", 1)[1].split()
            flags = [a.option_strings[0] for a in self._actions if a.option_strings]
            hints = []
            for b in bad:
                if b.startswith("--"):
                    c = difflib.get_close_matches(b.split("=")[0], flags, n=1)
                    if c:
                        hints.append(f"{b} -> did you mean {c[0]}?")
            msg = f"unknown command-line arguments: {' '.join(bad)}." + (" " + "; ".join(hints) if hints else "")
            self.exit(2, f"{self.prog}: error: {msg}\nRun with --help to list the valid flags.\n")
        super().error(message)


def parse_config(schema: dict[str, Option], argv: Sequence[str] | None = None, description: str = "",
                 prog: str | None = None) -> SimpleNamespace:
    """Parse ``argv`` against ``schema``: defaults < yaml file (--yaml_path) < flags. Returns a namespace.

    ``cfg._sources`` maps each key to where its value came from ('default', the yaml path, or 'cli').
    """
    parser = _Parser(description=description, prog=prog, allow_abbrev=False)
    parser.add_argument("--yaml_path", default=None, help="yaml file of settings (keys as the flags below)")
    for name, opt in schema.items():
        # argparse %-formats help strings: escape any % in ours
        if isinstance(opt.default, bool) and opt.type is None:
            text = f"{opt.help} (default {opt.default})".replace("%", "%%")
            parser.add_argument(f"--{name}", nargs="?", const=True, default=argparse.SUPPRESS, help=text)
        else:
            valid = f"; {opt.check.describe()}" if opt.check is not None else ""
            text = f"{opt.help} (default {opt.default!r}{valid})".replace("%", "%%")
            parser.add_argument(f"--{name}", default=argparse.SUPPRESS, help=text)
    ns = vars(parser.parse_args(argv))
    return resolve(schema, ns.pop("yaml_path", None), ns)


class RunConfig(SimpleNamespace):
    """A method's resolved config. Frozen when its run starts (bdsafety.registry.Method.run_config, after the method's
    ``resolve`` hook filled the values that depend on others): a step never changes the config it was given, and a
    step that needs other values works on a copy, ``cfg.replace(key=value)`` (PAM's rho sweep, LC's clean reference)."""

    def __setattr__(self, key, value):
        if self.__dict__.get("_frozen"):
            raise AttributeError(f"the run's config is frozen: '{key}' cannot change once the run started; pass the "
                                 f"value as an argument, or work on cfg.replace({key}=...)")
        super().__setattr__(key, value)

    def freeze(self) -> RunConfig:
        object.__setattr__(self, "_frozen", True)
        return self

    def replace(self, **changes) -> RunConfig:
        """A copy with ``changes``, frozen if this one is (keys must exist: a typo is an error, not a new key)."""
        bad = [k for k in changes if k not in self.__dict__]
        if bad:
            raise AttributeError(f"cfg.replace: no key(s) {bad} in this config")
        new = RunConfig(**{k: v for k, v in self.__dict__.items() if k != "_frozen"})
        for k, v in changes.items():
            setattr(new, k, v)
        return new.freeze() if self.__dict__.get("_frozen") else new

    def __copy__(self) -> RunConfig:  # copy.copy: an unfrozen copy (for the planner's checks of resolve hooks)
        return RunConfig(**{k: v for k, v in self.__dict__.items() if k != "_frozen"})


def resolve(schema: dict[str, Option], yaml_path: str | None = None, overrides: dict | None = None) -> RunConfig:
    """Merge defaults, an optional yaml file and overrides (already-parsed flags or a dict from Python code)."""
    values = {k: o.default for k, o in schema.items()}
    sources = {k: "default" for k in schema}
    if yaml_path:
        for k, v in read_yaml(yaml_path).items():
            if k not in schema:
                raise ConfigError(_unknown_key_message(k, list(schema), str(yaml_path)))
            values[k] = _cast(k, schema[k], v, str(yaml_path))
            sources[k] = str(yaml_path)
    for k, v in (overrides or {}).items():
        if k not in schema:
            raise ConfigError(_unknown_key_message(k, list(schema), "command line"))
        values[k] = _cast(k, schema[k], v, "command line")
        sources[k] = "cli"
    cfg = RunConfig(**values)
    cfg._sources = sources
    cfg.yaml_path = yaml_path
    return cfg


def config_dict(cfg: SimpleNamespace) -> dict:
    return {k: v for k, v in vars(cfg).items() if not k.startswith("_")}


def run_metadata(cfg: SimpleNamespace, device: str, wall_time_s: float | None = None, **extra) -> dict:
    """Resolved config plus what is needed to reproduce the run: seed, versions, device, command, time."""
    import torch  # lazy: keeps this module importable without loading torch (CLI --help, study planning)

    meta = {
        "config": config_dict(cfg),
        "sources": dict(getattr(cfg, "_sources", {})),
        "command": " ".join([os.path.basename(sys.executable)] + sys.argv),
        "time": time.strftime("%Y-%m-%d %H:%M:%S"),
        "device": device,
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "numpy": numpy.__version__,
            "bdsafety": __import__("bdsafety").__version__,
        },
    }
    if device.startswith("cuda") and torch.cuda.is_available():
        meta["gpu"] = torch.cuda.get_device_name(0)
    if wall_time_s is not None:
        meta["wall_time_s"] = round(float(wall_time_s), 2)
    meta.update(extra)
    return meta


def dump_yaml(obj) -> str:
    return yaml.safe_dump(json.loads(json.dumps(obj, default=str)), sort_keys=False)


def resolve_device(name: str) -> str:
    """'auto' -> cuda when available, else cpu; checks that a named device exists."""
    import torch  # lazy: keeps this module importable without loading torch (CLI --help, study planning)

    if name in (None, "", "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    name = check_device_name(name)
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError(f"device '{name}' requested but CUDA is not available here; use --device cpu (or auto)")
        if ":" in name and int(name.split(":")[1]) >= torch.cuda.device_count():
            raise ConfigError(f"device '{name}' does not exist: this machine has {torch.cuda.device_count()} GPU(s) "
                              f"(cuda:0..cuda:{torch.cuda.device_count() - 1})")
    if name == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ConfigError("device 'mps' requested but it is not available here; use --device cpu (or auto)")
    return name


def read_index(path, n: int | None = None, flag: str = "--index") -> np.ndarray:
    """Indices (in file order) from an index file (one integer per line, like log/index.txt), validated: parseable,
    non-empty, non-negative, unique and, with ``n``, below ``n``. Errors name the flag and the file."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{flag} {p}: file not found (give the index.txt of a previous run's log/ folder)")
    try:
        with warnings.catch_warnings():  # an empty file: numpy warns, we raise the error below
            warnings.simplefilter("ignore", UserWarning)
            raw = np.loadtxt(p, dtype=np.float64, ndmin=1)
    except (ValueError, OSError) as e:
        raise ConfigError(f"{flag} {p}: not a list of integers, one per line ({str(e).splitlines()[0]})") from None
    if raw.size == 0:
        raise ConfigError(f"{flag} {p} is empty: it must list at least one sample index")
    if raw.ndim != 1:
        raise ConfigError(f"{flag} {p}: expected one integer per line, found {raw.shape[1]} columns")
    if not np.all(np.isfinite(raw)) or np.any(raw != np.round(raw)):
        raise ConfigError(f"{flag} {p}: holds values that are not integers")
    idx = raw.astype(np.int64)
    if idx.min() < 0:
        raise ConfigError(f"{flag} {p}: holds a negative index ({idx.min()})")
    if len(np.unique(idx)) != len(idx):
        raise ConfigError(f"{flag} {p}: holds {len(idx) - len(np.unique(idx))} repeated indices; "
                          f"each sample may appear once")
    if n is not None and idx.max() >= n:
        raise ConfigError(f"{flag} {p}: index {idx.max()} is beyond the {n} training samples; "
                          f"the file belongs to other data")
    return idx  # file order kept (BackdoorBench writes index.txt in draw order)
