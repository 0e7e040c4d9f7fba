"""The study yaml: a grid of datasets x attacks x poison ratios x models x defenses x retuning attacks x analyses x
seeds.

    name: demo                    # the study folder: <record_root>/study_<name>/ (records, results.csv, report)
    datasets: [synthetic]
    models: [cnn_small]
    attacks: [badnet]             # registered attack names ('all' = every registered attack)
    pratios: [0.1]                # or [attack]: each attack's own pratio (its yaml's value)
    seeds: [0]
    clean_reference: true         # a clean record (the attack's own settings, pratio 0) per attack/dataset/model/seed
    defenses: [fst, pam]          # registered defense names, or 'all'
    external_defenses: []         # defense folders made elsewhere (e.g. by BackdoorBench) to retune/analyse as found
    records: []                   # records made elsewhere (folder names under the study folder), read as found: no
                                  # attack job, dataset / model / attack / pratio read from each record; the grid keys
                                  # (datasets, models, attacks, pratios) may then be left out; at most one seed
    report_dir: audit             # the study's own files (results.csv, report.*, study.json, logs/, figures/);
                                  # relative to the study folder; default: the study folder itself
    retune: [ra, qra]             # registered retuning attacks
    ra_poison_nums: [1, 10]       # optional RA budget: one more RA per model and number of poisoned samples
    ra_control: true              # optional benign-retune control: the same RA with 0 poisoned samples on every model
    ra_draws: 5                   # RA draws per model (other poisoned samples, clean subset and batch order); default 1
    ra_budget_draws: 1            # draws of each budget RA (default 1)
    verdict: {purified_asr: 0.2}  # thresholds of the report's verdicts (bdsafety/study/stats.py VERDICT_DEFAULTS)
    qra_defenses: all             # which defenses QRA attacks (default: all of them)
    analyses: [lmc]               # registered analyses (one run per defense)
    configs: {synthetic: demo}    # yaml of each method: config/<kind>/<method>/<name>.yaml; keys: a method, a kind,
                                  # 'clean' or a dataset ('{dataset}' is replaced); default: the dataset's name
    set:                          # key: value overrides of those yamls; keys: a kind, 'clean' or a method name
      attack: {epochs: 20}        # (method beats 'clean' beats kind)
    resources:                    # per job (Ray executor): 'default', a kind, 'clean' or a method name
      default: {num_cpus: 1, num_gpus: 0}
      defense: {num_cpus: 1, num_gpus: 0.25}

Unknown keys are errors listing the valid ones. A method name that is not registered is an error of a real run (a
typo must not pass as a smaller study) unless the yaml lists it under ``expected_later: [name, ...]`` (a method being
added by another branch): then it is a note, and its jobs appear once it is merged. A dry run lists every such name as
a note either way. Keys the study sets itself (folder names, the record a job reads, the grid's dataset / model /
pratio / seed, where and how jobs run) cannot be given in ``set:``; ``trust_record`` is never a yaml value (it lets
a record's pickles run code): it is the command-line flag ``--trust_record`` of analysis/run_study.py.
"""
from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass, field
from pathlib import Path

from bdsafety import registry
from bdsafety.config import check_folder_name, read_yaml
from bdsafety.errors import ConfigError
from bdsafety.study.stats import verdict_thresholds

KINDS = ("attack", "defense", "retune", "analysis")
RESOURCE_KEYS = ("num_cpus", "num_gpus")
DEFAULT_RESOURCES = {"num_cpus": 1, "num_gpus": 0}

_KEYS = {
    "name": "study name: the study folder is <record_root>/study_<name>/",
    "description": "free text",
    "record_root": "folder holding the study folder (default ./record)",
    "study_dir": "the study folder itself (default <record_root>/study_<name>)",
    "dataset_path": "folder holding <dataset>/ (default: ./data for the study's attacks; a record found in place "
                    "reads its own data_path, BackdoorBench's rule)",
    "device": "device of every job: auto, cpu, cuda, cuda:N (default auto; on Ray each job sees the GPUs it was given)",
    "datasets": "list of datasets",
    "models": "list of model names",
    "attacks": "list of registered attacks, or 'all'",
    "pratios": "list of poison ratios; 'attack': each attack's own value (its yaml's)",
    "seeds": "list of seeds (every job of a grid point gets --random_seed <seed>)",
    "clean_reference": "train a clean reference record per attack/dataset/model/seed (true/false)",
    "defenses": "list of registered defenses, or 'all'",
    "external_defenses": "defense folders already in the records (e.g. BackdoorBench's) to retune and analyse",
    "records": "records made elsewhere (folder names under the study folder) to defend, retune and analyse as found",
    "report_dir": "folder of the study's own files (results.csv, report, study.json, logs/, figures/); "
                  "default the study folder",
    "retune": "list of retuning attacks (ra, qra)",
    "ra_poison_nums": "RA budget: extra RA runs per model with these numbers of poisoned samples (P-ASR vs budget)",
    "ra_control": "benign-retune control: the same RA with 0 poisoned samples on every model "
                  "(true/false, default false)",
    "ra_draws": "RA draws per model: draw k retunes with random_seed = seed + 1000 k (default 1: the seed itself)",
    "ra_budget_draws": "draws of each RA budget run (default 1)",
    "expected_later": "method names that are not registered yet but will be (another branch): notes instead of errors",
    "verdict": "thresholds of the report's verdicts and claims (mapping; bdsafety/study/stats.py VERDICT_DEFAULTS)",
    "qra_defenses": "defenses QRA attacks: a list or 'all' (default all); <method>_defenses does the same for any "
                    "retuning attack or analysis",
    "analyses": "list of analyses (lmc)",
    "configs": "which yaml each method reads (mapping; see bdsafety/study/spec.py)",
    "set": "overrides of the method yamls (mapping of mappings)",
    "resources": "num_cpus / num_gpus per job (mapping of mappings)",
}


@dataclass
class Study:
    name: str
    path: Path  # the yaml
    study_dir: Path
    dataset_path: Path | None  # None: not given (attacks: ./data; records found in place: their own data_path)
    device: str
    datasets: list
    models: list
    attacks: list
    pratios: list
    seeds: list
    clean_reference: bool
    defenses: list
    external_defenses: list
    records: list  # found records: folder names under study_dir (no attack job)
    report_dir: Path  # results.csv, report.md/html, study.json, logs/, figures/
    retune: list
    ra_poison_nums: list
    ra_control: bool
    ra_draws: int
    ra_budget_draws: int
    verdict: dict
    only_defenses: dict  # retuning attack / analysis -> the defenses it runs on (<method>_defenses; absent: all)
    analyses: list
    configs: dict
    set: dict
    resources: dict
    notes: list = field(default_factory=list)  # unregistered names and what they would have made
    unknown: list = field(default_factory=list)  # unregistered names NOT listed in expected_later: errors of a real run
    trust_record: bool = False  # --trust_record of analysis/run_study.py (never from the yaml)

    def config_name(self, kind: str, method: str, dataset: str, clean: bool = False) -> str:
        """Name of the yaml under config/<kind dir>/<method>/ for this job."""
        for key in (method, "clean" if clean else None, kind, dataset):
            if key is not None and key in self.configs:
                return str(self.configs[key]).format(dataset=dataset)
        return "demo" if dataset == "synthetic" else dataset

    def overrides(self, kind: str, method: str, clean: bool = False, schema=None) -> dict:
        """The set: values of one job. Keys given for a whole kind (``set.defense``) or for ``set.clean`` apply to the
        methods whose schema has them (ANP has no ``epochs``); keys given for the method itself must all exist."""
        out = dict(self.set.get(kind, {}))
        if clean:
            out.update(self.set.get("clean", {}))
        if schema is not None:
            out = {k: v for k, v in out.items() if k in schema}
        out.update(self.set.get(method, {}))
        return out

    def own_key(self, name: str) -> str:
        """Output key of a folder the study makes for its found records (their clean reference): under report_dir when
        that lies inside the study folder, so a study of records made elsewhere adds nothing beside them."""
        try:
            rel = self.report_dir.relative_to(self.study_dir).as_posix()
        except ValueError:
            rel = "."
        return name if rel == "." else f"{rel}/{name}"

    def job_resources(self, kind: str, method: str, clean: bool = False) -> dict:
        out = dict(DEFAULT_RESOURCES)
        for key in ("default", kind, "clean" if clean else None, method):
            if key is not None:
                out.update(self.resources.get(key, {}))
        return out


def _list(v, key: str) -> list:
    if v is None:
        return []
    if isinstance(v, (list, tuple)):
        return list(v)
    if isinstance(v, str):
        return [s.strip() for s in v.split(",") if s.strip()]
    return [v]


def _mapping(v, key: str, nested: bool) -> dict:
    if v is None:
        return {}
    if not isinstance(v, dict):
        raise ConfigError(f"study key '{key}' must be a mapping, got {v!r}")
    if nested:
        for k, sub in v.items():
            if not isinstance(sub, dict):
                raise ConfigError(f"study key '{key}.{k}' must be a mapping of key: value, got {sub!r}")
    return dict(v)


def _resolve_names(kind: str, given: list, notes: list, what: str, unknown: list | None = None,
                   expected: tuple = ()) -> list:
    """Registered names of ``kind`` from ``given`` ('all' expands); unregistered ones become notes, and those not in
    ``expected`` are also appended to ``unknown`` (errors of a real run)."""

    available = registry.names(kind)
    out = []
    for n in registry.name_list(given, available, what=kind, strict=False) if given else []:
        try:
            m = registry.get(kind, n)
        except ConfigError:
            close = difflib.get_close_matches(n, available, n=1)
            hint = (f" (did you mean '{close[0]}'?)" if close
                    else " (not registered yet: its jobs appear once it is merged)")
            notes.append(f"{what} '{n}' is not a registered {kind}{hint}; registered: {', '.join(available)}")
            if unknown is not None and n not in expected:
                unknown.append(notes[-1])
            continue
        if m.name not in out:
            out.append(m.name)
    return out


def load_study(path: str | Path, record_root: str | None = None, study_dir: str | None = None) -> Study:
    """Read and validate a study yaml; paths become absolute (jobs may run on other machines of a cluster)."""
    return study_from_dict(read_yaml(Path(path)), Path(path), record_root, study_dir)


GRID_KEYS = ("datasets", "models", "attacks", "pratios")


def _on_defenses_method(key: str) -> str | None:
    """The retuning attack or analysis a ``<method>_defenses`` key names (qra_defenses: qra), else None."""
    m = key[:-len("_defenses")] if key.endswith("_defenses") else None
    return m if m is not None and m in registry.names("retune") + registry.names("analysis") else None
OWN_PRATIO = "attack"  # pratios: [attack] = each attack's pratio as its yaml gives it


def study_from_dict(data: dict, path: Path, record_root: str | None = None, study_dir: str | None = None) -> Study:
    """Validate a study given as a mapping (``path``: where it comes from, for messages and the report)."""
    unknown = [k for k in data if k not in _KEYS and _on_defenses_method(k) is None]
    if unknown:
        k = unknown[0]
        close = difflib.get_close_matches(k, list(_KEYS), n=1)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        raise ConfigError(f"{path}: unknown key '{k}'.{hint} Valid keys: {', '.join(_KEYS)}")
    name = check_folder_name(str(data.get("name") or path.stem), "name")
    root = Path(record_root or data.get("record_root") or "./record")
    sdir = Path(study_dir or data.get("study_dir") or root / f"study_{name}").resolve()
    if sdir.exists() and not sdir.is_dir():
        raise ConfigError(f"the study folder {sdir} is a file; pass --study_dir a folder (it is created if missing)")
    notes: list[str] = []
    found = [check_folder_name(str(r), "records") for r in _list(data.get("records"), "records")]
    grid = [k for k in GRID_KEYS if _list(data.get(k), k)]
    for key in GRID_KEYS + ("seeds",):
        if not _list(data.get(key), key) and (grid or not found):
            raise ConfigError(f"{path}: '{key}' is required: a non-empty list"
                              + (" (the grid keys go together)" if found else " (or list records: made elsewhere)"))
    if found and not grid and len(_list(data.get("seeds"), "seeds")) > 1:
        raise ConfigError(f"{path}: records: a found record is one trained model: give at most one seed (its RA draws "
                          f"use random_seed = seed + 1000 k; for more draws set ra_draws)")
    rdir = Path(data.get("report_dir") or ".")
    report_dir = (rdir if rdir.is_absolute() else sdir / rdir).resolve()
    pratios = []
    for p in _list(data.get("pratios"), "pratios"):
        if p == OWN_PRATIO:  # each attack's own value (its yaml's): attacks whose poisoning rates differ by design
            pratios.append(p)
            continue
        try:
            p = float(p)
        except (TypeError, ValueError):
            raise ConfigError(f"{path}: pratios must be numbers in (0, 1), or '{OWN_PRATIO}' (each attack's own value "
                              f"from its yaml), got {p!r}") from None
        if not 0 < p < 1:
            raise ConfigError(f"{path}: pratios must be in (0, 1) (the clean reference is clean_reference: "
                              f"true), got {p}")
        pratios.append(p)
    seeds = []
    for s in _list(data.get("seeds"), "seeds") or [0]:
        if isinstance(s, bool) or not isinstance(s, int) or s < 0:
            raise ConfigError(f"{path}: seeds must be integers >= 0, got {s!r}")
        seeds.append(s)
    resources = _mapping(data.get("resources"), "resources", nested=True)
    for k, r in resources.items():
        for rk, rv in r.items():
            if rk not in RESOURCE_KEYS:
                raise ConfigError(f"{path}: resources.{k}: unknown key '{rk}'; valid: {', '.join(RESOURCE_KEYS)}")
            if isinstance(rv, bool) or not isinstance(rv, (int, float)) or rv < 0:
                raise ConfigError(f"{path}: resources.{k}.{rk} must be a number >= 0, got {rv!r}")
    unregistered: list[str] = []
    expected = tuple(str(n) for n in _list(data.get("expected_later"), "expected_later"))
    for key in ("datasets", "models", "attacks", "pratios", "seeds", "defenses", "external_defenses", "records",
                "retune", "analyses"):
        vals = [str(v) for v in _list(data.get(key), key)]
        dup = sorted({v for v in vals if vals.count(v) > 1})
        if dup:
            raise ConfigError(f"{path}: {key} lists {', '.join(dup)} more than once; list each value once")

    def names(kind, key, what):
        return _resolve_names(kind, _list(data.get(key), key), notes, what, unregistered, expected)

    retune = names("retune", "retune", "retuning attack")
    only = {_on_defenses_method(k): v for k, v in data.items() if _on_defenses_method(k) is not None and v != "all"}
    nums = _list(data.get("ra_poison_nums"), "ra_poison_nums")
    if any(isinstance(n, bool) or not isinstance(n, int) or n < 0 for n in nums):
        raise ConfigError(f"{path}: ra_poison_nums must be integers >= 0, got {nums}")
    if nums and "ra" not in retune:
        raise ConfigError(f"{path}: ra_poison_nums needs ra in retune")
    draws = {}
    for key in ("ra_draws", "ra_budget_draws"):
        v = data.get(key, 1)
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ConfigError(f"{path}: {key} must be an integer >= 1, got {v!r}")
        draws[key] = v
    control = data.get("ra_control", False)
    if not isinstance(control, bool):
        raise ConfigError(f"{path}: ra_control must be true or false, got {control!r}")
    for k, v in _mapping(data.get("configs"), "configs", nested=False).items():
        try:
            str(v).format(dataset="x")
        except (KeyError, IndexError, ValueError) as e:
            raise ConfigError(f"{path}: configs.{k} = {v!r} is not a config name pattern ({type(e).__name__}: {e}); "
                              f"the only placeholder is {{dataset}}, e.g. {{dataset}}_paper") from None
    if (control or draws["ra_draws"] > 1) and "ra" not in retune:
        raise ConfigError(f"{path}: ra_control / ra_draws need ra in retune")
    verdict = verdict_thresholds(_mapping(data.get("verdict"), "verdict", nested=False), path)
    st = Study(
        name=name, path=path, study_dir=sdir,
        dataset_path=Path(data["dataset_path"]).resolve() if data.get("dataset_path") else None,
        device=str(data.get("device") or "auto"), datasets=[str(d) for d in _list(data.get("datasets"), "datasets")],
        models=[str(m) for m in _list(data.get("models"), "models")],
        attacks=names("attack", "attacks", "attack"), pratios=pratios, seeds=seeds,
        clean_reference=bool(data.get("clean_reference", True)),
        defenses=names("defense", "defenses", "defense"),
        external_defenses=[check_folder_name(str(d), "external_defenses")
                           for d in _list(data.get("external_defenses"), "")],
        records=found, report_dir=report_dir,
        retune=retune, ra_poison_nums=nums, ra_control=control, ra_draws=draws["ra_draws"],
        ra_budget_draws=draws["ra_budget_draws"], verdict=verdict,
        only_defenses={m: [str(d) for d in _list(v, f"{m}_defenses")] for m, v in only.items()},
        analyses=names("analysis", "analyses", "analysis"),
        configs={str(k): v for k, v in _mapping(data.get("configs"), "configs", nested=False).items()},
        set=_mapping(data.get("set"), "set", nested=True), resources=resources, notes=notes, unknown=unregistered)
    if report_dir.exists() and not report_dir.is_dir():
        raise ConfigError(f"{path}: report_dir {report_dir} is a file; give a folder (it is created if missing)")
    if st.external_defenses:

        ours = {registry.get("defense", d).folder: d for d in st.defenses}
        both = [f for f in st.external_defenses if f in ours]
        if both:
            raise ConfigError(f"{path}: external_defenses {both} are also the folders of defenses this study runs "
                              f"({', '.join(ours[f] for f in both)}); a folder is either made elsewhere or made here")
    for m in [registry.get("retune", r) for r in st.retune] + [registry.get("analysis", a) for a in st.analyses]:
        if "ra_model" in m.needs and "ra" not in st.retune:
            raise ConfigError(f"{path}: retune lists {m.name} without ra: {m.name} needs each model's RA model; add ra")
    known = set(st.defenses) | {registry.get("defense", d).folder for d in st.defenses} | set(st.external_defenses)
    for m, only in st.only_defenses.items():
        for d in only:
            if d not in known:
                close = difflib.get_close_matches(d, sorted(known), n=1)
                msg = (f"{m}_defenses names '{d}', which is not a defense of this study"
                       f"{f' (did you mean {close[0]!r}?)' if close else ''}; its defenses: "
                       f"{', '.join(sorted(known)) or 'none'}")
                notes.append(msg)
                if d not in expected:
                    st.unknown.append(msg)
    _check_set(st, path)
    return st


# keys every job gets from the study itself: never from set:
STUDY_SET_KEYS = {
    "save_folder_name": "the study names every output folder", "save_name": "the study names every output folder",
    "result_file": "the study chooses the record each job reads",
    "defense": "the study chooses the model each job reads", "clean_record": "the study chooses the clean reference",
    "poison_source": "the study chooses the poison source", "ra_name": "the study chooses the RA model QRA reads",
    "dataset": "use the study key datasets", "model": "use the study key models", "pratio": "use the study key pratios",
    "random_seed": "use the study key seeds", "record_root": "use the study key record_root (or --record_root)",
    "dataset_path": "use the study key dataset_path", "device": "use the study key device",
    "overwrite": "the study decides what it may replace", "dependents": "the study decides what it may replace",
    "no_progress": "the study prints its own progress",
    "trust_record": "trusting a record's pickles is the command-line decision --trust_record of analysis/run_study.py",
}


def _check_set(st: Study, path) -> None:
    for scope, over in st.set.items():
        for k in over:
            if k in STUDY_SET_KEYS:
                raise ConfigError(f"{path}: set.{scope}.{k}: '{k}' is set by the study itself ({STUDY_SET_KEYS[k]}); "
                                  f"remove it from set:")


def narrow(study: Study, attacks: list | None = None, seeds: list | None = None) -> Study:
    """The same study on part of its grid (a chunk): only ``attacks`` / ``seeds``, each a subset of the yaml's lists.
    The jobs keep their ids, so chunks run one after the other in one study folder make up the whole grid; the
    results of chunks run on different machines are merged by bdsafety.study.merge."""

    change = {}
    for key, given, have in (("attacks", attacks, study.attacks), ("seeds", seeds, study.seeds)):
        if not given:
            continue
        bad = [v for v in given if v not in have]
        if bad:
            raise ConfigError(f"--{key} {','.join(map(str, bad))}: not in {study.path}'s {key} "
                              f"({', '.join(map(str, have))}); a chunk is part of the yaml's grid")
        change[key] = [v for v in have if v in given]
    return dataclasses.replace(study, **change) if change else study

