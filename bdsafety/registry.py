"""The one list of methods: every attack, defense, retuning attack and analysis registers itself here once.

    from bdsafety.registry import register

    @register("defense", "my_defense", schema=my_schema, description="...")
    def my_defense(ctx):            # the run function; its contract depends on the kind (see below)
        ...

The registry drives the entry points (``defense/my_defense.py`` is a 3-line shim that looks its method up by its
own file name), ``--defense all``, the study runner, the demo and the tests (every registered method must have
its entry script, a yaml per supported dataset plus ``demo.yaml``, and every shipped yaml must parse against
its schema). Adding a method is therefore one registered module plus its yamls (and the copied shim).

Kinds and their run contracts:
  attack    ``run(ctx: AttackContext) -> AttackOutcome``   (bdsafety.attacks.base's runner writes the record)
  defense   ``run(ctx: DefenseContext) -> DefenseResult``  (bdsafety.defenses.base's runner writes defense/<folder>/)
  retune    ``run(ctx: RecordRun) -> iter of (key, Output)``  (RA, QRA; bdsafety.experiment's runner writes
  analysis  ``run(ctx: RecordRun) -> iter of (key, Output)``   each Output into the folder its ``outputs`` hook named)

``registry.get(kind, name).main(argv)`` parses the flags and yaml against the method's schema and runs it through its
kind's runner (``kind_runner``) at the config's precision.

``needs`` says what a method requires besides its record, so the study runner can order jobs:
``clean_reference`` (a clean record of the same data), ``ra_model`` (the RA output of the same defense),
``defense`` (a defense folder to work on), ``poisoned_pool`` (real poisoned training samples). ``needs_for`` narrows
them per config (LC needs the clean reference only with ``lc_reference: standard``) and ``need_keys`` names the config
key that receives a need when it is not the project-wide one (``clean_record``); the study planner honours the needs of
every kind the same way (bdsafety.study.plan).

A retuning attack or analysis also says where a study applies it (bdsafety.study.plan expands the grid from this alone):
``on`` the models of each record it runs on ('record': the backdoored model, 'clean': the clean reference, 'defense':
each defense's model), ``variants`` the runs per model (RA: its draws, benign control and budgets; default one run) and
``skip`` the attacks whose records it cannot use (with the reason, a note of the plan); ``summary`` gives its columns of
the study's results.csv from its main run's output folder (bdsafety.study.results).
"""
from __future__ import annotations

import copy
import difflib
import importlib
import pkgutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

from bdsafety.config import parse_config
from bdsafety.engine import eval_subset, precision
from bdsafety.errors import ConfigError
from bdsafety.paths import CONFIG_ROOT

# kind -> folder of its entry scripts and of its configs (BackdoorBench's layout)
KIND_DIRS = {"attack": "attack", "defense": "defense", "retune": "retune_attack", "analysis": "analysis"}
# packages whose modules register methods (imported by discover())
_PACKAGES = ("bdsafety.attacks", "bdsafety.defenses", "bdsafety.retune", "bdsafety.analysis")
# datasets every method ships a yaml for, besides demo.yaml
DATASET_CONFIGS = ("cifar10", "cifar100", "gtsrb", "tiny")
NEEDS = ("clean_reference", "ra_model", "defense", "poisoned_pool", "inversion_cache")
# the config key through which the study hands a method what it needs (a method may name its own: ``need_keys``)
NEED_KEYS = {"clean_reference": "clean_record"}
ON = ("record", "clean", "defense")  # the models of a record a retuning attack or analysis can run on
ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Variant:
    """One run of a retuning attack or analysis per model in a study: ``role`` (results' name for it), ``suffix`` of
    its output folder name, ``values`` set in its config (and grid point), ``draws`` (draw k >= 1: another seed)."""
    role: str = ""  # '' : the method's own name
    suffix: str = ""
    values: dict = field(default_factory=dict)
    draws: int = 1


@dataclass(frozen=True)
class Method:
    kind: str
    name: str
    run: Callable
    schema: Callable[[], dict]
    description: str
    folder: str  # output folder name (defense/<folder>/; BackdoorBench's where it has one, e.g. 'i-bau')
    needs: frozenset = field(default_factory=frozenset)
    configs: tuple = DATASET_CONFIGS + ("demo",)  # config/<kind dir>/<name>/<config>.yaml that must exist
    module: str = ""
    expand: Callable | None = None  # cfg -> list of cfgs: one run per element (e.g. PAM's --rho_sweep); None: one run
    select: Callable | None = None  # (cfg, [(run cfg, its output folder)]) -> None: picks one on validation data
    resolve: Callable | None = None  # cfg -> cfg before the run: fills values that depend on others (ANP's variant)
    on: tuple = ()  # retune / analysis: the models of each record a study runs it on (ON)
    variants: Callable | None = None  # study -> [Variant]: the runs per model (None: one, Variant())
    skip: Callable | None = None  # attack name -> why the method cannot use that attack's records, or None
    summary: Callable | None = None  # results.csv: its main run's output folder -> {column: value} (NaN when missing)
    outputs: Callable | None = None  # retune / analysis: (exp, cfg) -> {key: output folder} (bdsafety.experiment)
    needs_for: Callable | None = None  # cfg -> the needs of one run (a subset of ``needs``); None: always ``needs``
    need_keys: dict = field(default_factory=dict)  # need -> its config key, where not NEED_KEYS' (LC: lc_clean_record)

    def needs_of(self, cfg=None) -> frozenset:
        """What a run with ``cfg`` needs (``needs`` when the method declares no ``needs_for``, or no cfg is given)."""
        if cfg is None or self.needs_for is None:
            return self.needs
        return frozenset(self.needs_for(cfg)) & self.needs

    def need_key(self, need: str) -> str:
        """The config key that receives ``need`` (e.g. the clean reference's record folder)."""
        return self.need_keys.get(need, NEED_KEYS.get(need, need))

    @property
    def entry(self) -> str:
        """The entry script, relative to the repository root: 'defense/pam.py'."""
        return f"{KIND_DIRS[self.kind]}/{self.name}.py"

    @property
    def config_dir(self) -> Path:

        return CONFIG_ROOT / KIND_DIRS[self.kind] / self.name

    def config_path(self, dataset: str) -> Path:
        return self.config_dir / f"{dataset}.yaml"

    def parse(self, argv=None):
        """Resolve defaults < --yaml_path < flags against this method's schema (validated)."""

        return parse_config(self.schema(), argv, description=self.description, prog=self.entry)

    def main(self, argv=None):
        return self.run_config(self.parse(argv))

    def run_config(self, cfg):
        """Run with an already-resolved config (the study runner's path): the ``resolve`` hook fills dependent values,
        then the kind's runner (``kind_runner``; none: ``run(cfg)``) runs at the config's precision and eval_subset,
        set once here for the whole run and restored afterwards (bdsafety.engine.precision / eval_subset)."""

        if self.resolve is not None:
            cfg = self.resolve(copy.copy(cfg))
        if hasattr(cfg, "freeze"):  # a RunConfig (bdsafety.config.resolve): nothing changes it from here on
            cfg = copy.copy(cfg).freeze()
        runner = _RUNNERS.get(self.kind)
        with precision(getattr(cfg, "precision", "fp32")), eval_subset(getattr(cfg, "eval_subset", 0)):
            return runner(self, cfg) if runner is not None else self.run(cfg)


_REGISTRY: dict[tuple[str, str], Method] = {}
# kind -> its runner (method, cfg) -> outputs, registered by the kind's base module (bdsafety.attacks.base writes a
# record, bdsafety.defenses.base a defense folder): a method's module imports its base, so its kind's runner is
# registered whenever the method is
_RUNNERS: dict[str, Callable] = {}


def kind_runner(kind: str) -> Callable:
    """Decorator registering the runner of every method of ``kind``; returns it unchanged."""
    if kind not in KIND_DIRS:
        raise ValueError(f"unknown method kind {kind!r}; valid: {', '.join(KIND_DIRS)}")

    def deco(fn: Callable) -> Callable:
        _RUNNERS[kind] = fn
        return fn

    return deco
_discovered = False


def register(kind: str, name: str, *, schema: Callable[[], dict], description: str, folder: str | None = None,
             needs: Iterable[str] = (), configs: Iterable[str] | None = None, expand: Callable | None = None,
             select: Callable | None = None, resolve: Callable | None = None, on: Iterable[str] = (),
             variants: Callable | None = None, skip: Callable | None = None, summary: Callable | None = None,
             needs_for: Callable | None = None, need_keys: dict | None = None,
             outputs: Callable | None = None) -> Callable:
    """Decorator registering ``run`` as method ``name`` of ``kind``; returns ``run`` unchanged."""
    if kind not in KIND_DIRS:
        raise ValueError(f"unknown method kind {kind!r}; valid: {', '.join(KIND_DIRS)}")
    bad = set(needs) - set(NEEDS)
    if bad:
        raise ValueError(f"{kind} {name}: unknown needs {sorted(bad)}; valid: {', '.join(NEEDS)}")
    if (kind in ("retune", "analysis")) != (outputs is not None):
        raise ValueError(f"{kind} {name}: a retuning attack or analysis declares its output folders (outputs=), other "
                         f"kinds do not (their runner knows them)")
    need_keys = dict(need_keys or {})
    if set(need_keys) - set(needs):
        raise ValueError(f"{kind} {name}: need_keys {sorted(set(need_keys) - set(needs))} are not among its needs")
    on = tuple(on)
    if set(on) - set(ON) or (kind in ("retune", "analysis")) != bool(on):
        raise ValueError(f"{kind} {name}: on={on!r}; a retuning attack or analysis names the models it runs on, "
                         f"some of {', '.join(ON)} (other kinds none)")

    def deco(run: Callable) -> Callable:
        key = (kind, name)
        m = Method(kind=kind, name=name, run=run, schema=schema, description=description, folder=folder or name,
                   needs=frozenset(needs),
                   configs=tuple(configs) if configs is not None else DATASET_CONFIGS + ("demo",),
                   module=getattr(run, "__module__", ""), expand=expand, select=select, resolve=resolve, on=on,
                   variants=variants, skip=skip, summary=summary, needs_for=needs_for, need_keys=need_keys,
                   outputs=outputs)
        old = _REGISTRY.get(key)
        if old is not None and old.module != m.module:
            raise ValueError(f"{kind} {name!r} is registered twice: by {old.module} and by {m.module}")
        _REGISTRY[key] = m
        return run

    return deco


def discover() -> None:
    """Import every module of the method packages once, so that their ``register`` calls run."""
    global _discovered
    if _discovered:
        return
    for pkg_name in _PACKAGES:
        pkg = importlib.import_module(pkg_name)
        for info in pkgutil.iter_modules(pkg.__path__):
            if not info.name.startswith("_"):
                importlib.import_module(f"{pkg_name}.{info.name}")
    _discovered = True


def methods(kind: str | None = None) -> list[Method]:
    """Registered methods (of one kind), sorted by kind then name."""
    discover()
    return sorted((m for m in _REGISTRY.values() if kind is None or m.kind == kind), key=lambda m: (m.kind, m.name))


def names(kind: str) -> list[str]:
    return [m.name for m in methods(kind)]


def get(kind: str, name: str) -> Method:
    """The method ``name`` of ``kind``; also found by its output folder name (BackdoorBench's 'i-bau')."""
    discover()
    if (kind, name) in _REGISTRY:
        return _REGISTRY[(kind, name)]
    for m in methods(kind):
        if m.folder == name:
            return m
    valid = names(kind)
    close = difflib.get_close_matches(name, valid, n=1)
    hint = f" Did you mean '{close[0]}'?" if close else ""
    raise ConfigError(f"unknown {kind} {name!r}.{hint} Registered {kind}s: {', '.join(valid)}")


def by_folder(kind: str, folder: str) -> Method | None:
    """The registered method writing output folder ``folder`` (None for folders of unknown origin)."""
    discover()
    return next((m for m in methods(kind) if m.folder == folder), None)


def name_list(spec, available: Iterable[str], what: str = "defense", allow_none: bool = False, strict: bool = True,
           hint: str = "") -> list[str]:
    """The one 'all | a,b' selector (entry points, RA's and LMC's --defense, the audit, the study's name lists):
    ``spec`` is 'all', a comma list or a list of names; 'all' expands to ``available`` (in its order) and may be
    combined with names; duplicates are dropped. ``allow_none`` accepts the name 'none' (the record's own model).
    ``strict``: a name not in ``available`` is an error listing them (with the closest one); otherwise it is returned
    for the caller's own check. ``hint`` ends the messages (what to do)."""
    available = list(available)
    tail = f"; {hint}" if hint else ""
    if spec is None or spec == "" or spec == []:
        raise ConfigError(f"no {what} given: name one, a comma list, or 'all' (available: "
                          f"{', '.join(available) or 'none yet'}){tail}")
    items = spec if isinstance(spec, (list, tuple)) else str(spec).split(",")
    items = [str(s).strip() for s in items if str(s).strip()]
    out: list[str] = []
    for s in items:
        if s == "all" and not available:
            raise ConfigError(f"'all' {what}s requested, but there are none yet{tail}")
        for n in available if s == "all" else [s]:
            if strict and n not in available and not (n == "none" and allow_none):
                close = difflib.get_close_matches(n, available, n=1)
                hint_ = f" Did you mean '{close[0]}'?" if close else ""
                raise ConfigError(f"unknown {what} {n!r}.{hint_} Available: {', '.join(available) or 'none'}{tail}")
            if n not in out:
                out.append(n)
    return out
