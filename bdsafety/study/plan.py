"""Grid -> DAG of jobs. Each job is one registered method run with a fully resolved config, writing one ordinary
output folder (a record, defense/<folder>/, .../ra/, .../qra/, <record>/lmc_<folder>/), and is identified by the
hash of that config plus the ids of the jobs it reads from.

Per grid point (dataset, attack, pratio, model, seed), and per record found in the study folder (``records:``: no attack
job, its point read from the record, its clean reference clean-badnet_<dataset>_<model>_s<seed> under report_dir):
    attack                     -> <study>/<attack>_<dataset>_<model>_p<pratio>_s<seed>/
    clean reference            -> <study>/clean-<attack>_<dataset>_<model>_s<seed>/   (shared by the pratios)
    defense d                  -> <record>/defense/<folder>/                          (after attack)
    ra on none / clean / d     -> <record>/ra/, <clean>/ra_<record>/, <record>/defense/<folder>/ra/
    ra budget (poison_num n)   -> the same with _budget_p<n> appended (ra_budget_p<n>, ...)
    ra control (0 poisoned)    -> the same with _control appended (ra_control, ...)
    ra draw k >= 1             -> any of the RA names above with _d<k> appended; random_seed = seed + 1000 k
    qra on d                   -> <record>/defense/<folder>/qra/                      (after d, its RA, clean; left out,
                                  with a note, for a clean-label attack whose trigger its record cannot rebuild)
    analysis (lmc) on d        -> <record>/lmc_<folder>/                              (after attack, d)

Only the attack, clean reference and defense jobs are planned here by kind; every retuning attack and analysis is
planned from its registration alone (``on``, ``needs``, ``variants``, ``skip``: bdsafety.registry), by
``_Planner.plan_model``: the RA, QRA and LMC rows above are what ra, qra and lmc declare.
"""
from __future__ import annotations

import copy
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

from bdsafety import registry
from bdsafety.config import config_dict, resolve
from bdsafety.errors import ConfigError
from bdsafety.records import record_identity
from bdsafety.study.spec import OWN_PRATIO

# resolved-config keys that say where / how a job runs, not what it computes: not part of the job id
RUNTIME_KEYS = ("record_root", "dataset_path", "device", "no_progress", "overwrite", "dependents", "trust_record",
                "eval_batch_size", "yaml_path")
# file whose presence means an output of this kind is complete (besides the study's marker)
DONE_FILE = {"attack": "attack_result.pt", "defense": "defense_result.pt", "ra": "ra_result.pt",
             "qra": "qra_compare.csv", "lmc": "lmc.csv"}
ROOT = Path(__file__).resolve().parent.parent.parent
# RA draw k of a grid point retunes with random_seed = seed + RA_DRAW_STRIDE * k: the draws of one seed never meet the
# seeds of the grid's other points as long as the grid's seeds stay below the stride
RA_DRAW_STRIDE = 1000


@dataclass
class Job:
    key: str  # output folder relative to the study folder: unique, human-readable
    kind: str
    method: str
    yaml_path: str | None
    overrides: dict  # values set by the study (on top of the yaml)
    deps: list  # keys of the jobs this one reads from
    resources: dict
    # grid coordinates: dataset, attack, pratio, model, seed, role ('attack', 'clean', 'defense', ...), target
    point: dict
    id: str = ""
    config: dict = field(default_factory=dict)  # the resolved config, runtime keys removed

    @property
    def done_file(self) -> str:
        return DONE_FILE.get(self.method, DONE_FILE.get(self.kind, ""))

    def to_dict(self) -> dict:
        return {k: getattr(self, k) for k in ("key", "kind", "method", "yaml_path", "overrides", "deps", "resources",
                                              "point", "id", "config")}

    @staticmethod
    def from_dict(d: dict) -> "Job":
        return Job(**d)


@dataclass
class Plan:
    jobs: list  # topological order
    notes: list  # things left out, and why
    study: object
    # every record of the plan (the grid's and the found ones): key, point, clean (key or None), found, defenses
    # (the defense folders planned on it)
    records: list = field(default_factory=list)
    # (record key, model label) -> {retuning attack / analysis: key of its main run on that model}
    mains: dict = field(default_factory=dict)

    def by_key(self) -> dict:
        return {j.key: j for j in self.jobs}


def record_name(attack: str, dataset: str, model: str, pratio: float, seed: int) -> str:
    return f"{attack}_{dataset}_{model}_p{pratio:g}_s{seed}"


def clean_name(attack: str, dataset: str, model: str, seed: int) -> str:
    return f"clean-{attack}_{dataset}_{model}_s{seed}"


def id_config(cfg, schema: dict) -> dict:
    """The part of a job's resolved config that identifies it: every key but RUNTIME_KEYS and the neutral options at
    their default (``Option.neutral``: added later, with the earlier behaviour as default)."""

    return {k: v for k, v in config_dict(cfg).items()
            if k not in RUNTIME_KEYS and not (k in schema and schema[k].neutral and v == schema[k].default)}


def job_id(kind: str, method: str, config: dict, upstream_ids: list) -> str:
    blob = json.dumps({"kind": kind, "method": method, "config": config, "upstream": sorted(upstream_ids)},
                      sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _runtime(study) -> dict:
    """Keys of every job that say where and how it runs (RUNTIME_KEYS: not part of the job id). The jobs may replace
    their outputs and delete what lies inside them; bdsafety.study.execute.check_replaceable refuses that unless this
    study made every output concerned."""
    run = {"record_root": str(study.study_dir), "device": study.device, "no_progress": True, "overwrite": True,
           "dependents": "delete", "trust_record": bool(study.trust_record)}
    if study.dataset_path is not None:  # else: the attacks' ./data (made absolute in add), a found record's data_path
        run["dataset_path"] = str(study.dataset_path)
    return run


def build_plan(study) -> Plan:
    """Expand ``study`` (bdsafety.study.spec.Study) into jobs with resolved configs and ids (topological order): the
    grid's records (each made by an attack job) and the records found in the study folder (``records:``), each planned
    by the same ``_Planner.plan_record``."""

    pl = _Planner(study)
    for dataset in study.datasets:
        for model in study.models:
            for attack in study.attacks:
                for m, note in pl.skipped(attack).items():
                    pl.notes.append(f"{m} on {attack} records: every job left out: {note}")
                for seed in study.seeds:
                    base = {"dataset": dataset, "attack": attack, "model": model, "seed": seed}
                    cname = clean_name(attack, dataset, model, seed)
                    have_clean = study.clean_reference and pl.add(
                        cname, "attack", attack, {**base, "pratio": 0.0, "role": "clean", "target": "clean"},
                        {"dataset": dataset, "model": model, "pratio": 0.0, "save_folder_name": cname}, [], clean=True)
                    for pratio in study.pratios:
                        if pratio == OWN_PRATIO:
                            pratio = pl.own_pratio(attack, dataset)
                            if pratio is None:
                                continue
                        rname = record_name(attack, dataset, model, pratio, seed)
                        pt = {**base, "pratio": pratio, "record": rname}
                        if pl.add(rname, "attack", attack, {**pt, "role": "attack", "target": "none"},
                                  {"dataset": dataset, "model": model, "pratio": pratio, "save_folder_name": rname}, [],
                                  clean_ref=cname if have_clean else None):
                            pl.plan_record(rname, pt, cname if have_clean else None, found=False)
    for rname in study.records:
        pl.plan_found(rname)
    if not study.clean_reference:
        for m in pl.downstream:
            if "clean_reference" in m.needs:
                pl.notes.append(f"{m.name} needs the clean reference: set clean_reference: true to run it")
    pl.check_kind_keys()
    return Plan(_topological(pl.jobs), pl.notes, study, pl.records, pl.mains)


@dataclass(frozen=True)
class Model:
    """One model of a record that retuning attacks and analyses run on: ``which`` (registry.ON), the key of its folder,
    the jobs that make it (and the record), the grid point of its jobs and the config values naming it."""
    which: str  # 'record' (the backdoored model), 'clean' (the clean reference), 'defense'
    key: str  # its folder: <record>, <clean>, <record>/defense/<folder>
    label: str  # 'none', 'clean' or the defense folder (results' `defense` column)
    deps: tuple
    point: dict
    values: dict  # result_file / defense naming it for a retuning attack


# a need on another method's output of the same model: the method that makes it
NEED_METHOD = {"ra_model": "ra"}


# pratio of a found record without info.pickle (a number, so that its rows group like every other)
UNKNOWN_PRATIO = -1.0
# the attack that trains the clean reference of a found record (pratio 0: its own settings do not matter)
CLEAN_ATTACK = "badnet"


class _Planner:
    """The jobs of one plan while it is built: ``add`` one job, ``plan_record`` everything downstream of one record."""

    def __init__(self, study):
        self.study = study
        self.notes = list(study.notes)
        self.jobs: dict[str, Job] = {}
        self.records: list[dict] = []  # every record of the plan: key, point, clean key, defense folders, found
        self.failed_keys: set = set()
        self.mains: dict = {}  # (record key, model label) -> {method: key of its main run}
        self.used_scope_keys: dict[str, set] = {}  # kind -> the keys some planned method of that kind accepts
        self.runtime = _runtime(study)
        # the retuning attacks and analyses of the study, those that need another's output of the same model after it
        down = [registry.get("retune", r) for r in study.retune] + [registry.get("analysis", a) for a in study.analyses]
        self.downstream = sorted(down, key=lambda m: any(n in m.needs for n in NEED_METHOD))
        self.variants = {m.name: m.variants(study) if m.variants is not None else [registry.Variant()] for m in down}

    def own_pratio(self, attack: str, dataset: str) -> float | None:
        """``pratios: [attack]``: the pratio the attack's yaml for ``dataset`` gives (None, with a note, when the yaml
        is missing: the attack's jobs are then left out as for any missing config)."""
        m = registry.get("attack", attack)
        yaml_path = m.config_path(self.study.config_name("attack", attack, dataset, False))
        if not yaml_path.is_file():
            self.notes.append(f"{attack} on {dataset}: no config {yaml_path.name} to read its own "
                              f"pratio from; left out")
            return None
        return float(resolve(m.schema(), str(yaml_path), {}).pratio)

    def add(self, key, kind, method, point, fixed, deps, clean=False, record_root=None, clean_ref=None) -> bool:
        """Plan one job; False when it is left out (no config, an upstream left out, or a need the study cannot meet).
        ``record_root``: where the job's record_root points when not the study folder (an attack writing a record below
        it). ``clean_ref``: the key of the grid point's clean reference (None: the study has none), handed to a job
        whose config needs it (registry: ``needs_of``, ``need_key``) and made one of its deps."""

        study, jobs = self.study, self.jobs
        deps = list(dict.fromkeys(deps))
        if key in jobs and jobs[key].point != point:
            a, b = jobs[key].point, point
            diff = ", ".join(f"{k} {a.get(k)!r} / {b.get(k)!r}" for k in sorted(set(a) | set(b))
                             if a.get(k) != b.get(k))
            raise ConfigError(f"{study.path}: two grid points give the same output folder {key} ({diff}); make the "
                              f"grid's values distinct (e.g. pratios that differ in their first 6 significant digits)")
        if key in jobs or key in self.failed_keys:
            return key in jobs
        if any(d in self.failed_keys for d in deps):
            self.failed_keys.add(key)
            return False
        m = registry.get(kind, method)
        cname = study.config_name(kind, method, point["dataset"], clean)
        yaml_path = m.config_path(cname)
        if not yaml_path.is_file():
            shown = yaml_path.relative_to(ROOT) if yaml_path.is_relative_to(ROOT) else yaml_path
            have = ", ".join(sorted(p.stem for p in m.config_dir.glob("*.yaml"))) or "nothing"
            self.notes.append(f"{key}: no config {shown} (config/{registry.KIND_DIRS[kind]}/{method}/ has: {have}); "
                              f"job and dependents left out")
            self.failed_keys.add(key)
            return False
        schema = m.schema()
        self.used_scope_keys.setdefault(kind, set()).update(schema)
        if clean:
            self.used_scope_keys.setdefault("clean", set()).update(schema)
        over = {**study.overrides(kind, method, clean, schema), **fixed}
        over.update({k: v for k, v in self.runtime.items() if k in schema})
        if kind == "attack" and "dataset_path" in schema and "dataset_path" not in over:
            over["dataset_path"] = str(Path("./data").resolve())  # the same folder from any worker's working directory
        if record_root is not None:
            over["record_root"] = str(record_root)
        if "random_seed" in schema:
            over["random_seed"] = point["seed"] + RA_DRAW_STRIDE * point.get("draw", 0)
        bad = [k for k in over if k not in schema]
        if bad:
            raise ConfigError(f"{study.path}: set: {kind} {method} has no key(s) {bad}; valid: "
                              f"{', '.join(sorted(schema))}")
        cfg = resolve(schema, str(yaml_path), over)
        if "clean_reference" in m.needs_of(cfg) and not clean:
            if clean_ref is None:
                self.notes.append(f"{key}: {method} (as configured) needs the clean reference: set clean_reference: "
                                  f"true; job and dependents left out")
                self.failed_keys.add(key)
                return False
            over[m.need_key("clean_reference")] = clean_ref
            deps = list(dict.fromkeys([*deps, clean_ref]))
            cfg = resolve(schema, str(yaml_path), over)
        if m.resolve is not None:  # values that depend on others (ANP's variant): a bad mix fails here, not mid-study
            m.resolve(copy.copy(cfg))
        conf = id_config(cfg, schema)
        j = Job(key=key, kind=kind, method=method, yaml_path=str(yaml_path), overrides=over, deps=list(deps),
                resources=study.job_resources(kind, method, clean), point=dict(point), config=conf)
        j.id = job_id(kind, method, conf, [jobs[d].id for d in deps])
        jobs[key] = j
        return True

    def skipped(self, attack: str) -> dict:
        """The study's retuning attacks and analyses that cannot use ``attack``'s records: name -> why (their
        ``skip``)."""
        if attack not in registry.names("attack"):
            return {}
        out = {m.name: m.skip(attack) for m in self.downstream if m.skip is not None}
        return {k: v for k, v in out.items() if v is not None}

    def add_runs(self, m, folder: str, name: str, point: dict, fixed: dict, deps: list, clean_ref=None) -> str | None:
        """Every run of retuning attack / analysis ``m`` on one model (its variants, each with its draws, e.g. RA's
        control and budgets); the key of its main run (first variant, draw 0), None when that is left out."""
        main = None
        for i, v in enumerate(self.variants[m.name]):
            for k in range(v.draws):
                sname = name + v.suffix + (f"_d{k}" if k else "")
                jkey = f"{folder}/{sname}"
                added = self.add(jkey, m.kind, m.name, {**point, "role": v.role or m.name, "draw": k, **v.values},
                                 {**fixed, "save_name": sname, **v.values}, deps, clean_ref=clean_ref)
                if i == 0 and k == 0:
                    if not added:
                        return None
                    main = jkey
        return main

    def plan_model(self, mod: Model, rname: str, cname: str | None, skipped: dict) -> None:
        """Every retuning attack and analysis of the study that runs on model ``mod`` of record ``rname``, as it
        declares (registry: ``on``, ``needs``, ``variants``; each kind's rule for where its output goes)."""
        mains: dict[str, str] = {}  # method -> key of its main run on this model
        for m in self.downstream:
            if mod.which not in m.on or m.name in skipped:
                continue
            only = self.study.only_defenses.get(m.name)
            if (mod.which == "defense" and only is not None and mod.label not in only
                    and mod.point["defense"] not in only):
                continue
            deps, fixed = list(mod.deps), {}
            if m.kind == "retune":  # written inside the model's folder, named after the method (BackdoorBench's way)
                folder, name = mod.key, m.name if mod.which != "clean" else f"{m.name}_{rname}"
                fixed.update(mod.values)
            else:  # an analysis: beside the defense folders of the record, one per model
                folder, name = rname, f"{m.name}_{mod.label}"
                fixed.update(result_file=rname, defense=[mod.label])
            if "poisoned_pool" in m.needs and mod.which == "clean":
                fixed["poison_source"] = rname  # the clean model has none: the record's
            if "clean_reference" in m.needs and cname is None:
                continue  # one note for the study (build_plan), not one per model
            missing = False
            for need, method in NEED_METHOD.items():
                if need in m.needs:
                    if method not in mains:
                        missing = True
                        break
                    fixed[f"{method}_name"] = mains[method].rsplit("/", 1)[1]
                    deps.append(mains[method])
            if missing:
                continue
            main = self.add_runs(m, folder, name, mod.point, fixed, deps, cname)
            if main is not None:
                mains[m.name] = main
        self.mains[(rname, mod.label)] = mains

    def plan_record(self, rname: str, pt: dict, cname: str | None, found: bool) -> None:
        """Everything downstream of record ``rname`` (made by the grid's attack job, or ``found`` in the study folder:
        then no job lists it as a dep): each defense (run here or a folder made elsewhere), and the retuning attacks
        and analyses on the record's model, on its clean reference ``cname`` and on each defense's model."""

        study = self.study
        rdeps = [] if found else [rname]
        skipped = self.skipped(pt["attack"])
        rec = {"result_file": rname}
        self.plan_model(Model("record", rname, "none", tuple(rdeps), {**pt, "target": "none"},
                              {**rec, "defense": "none"}), rname, cname, skipped)
        if cname is not None:
            self.plan_model(Model("clean", cname, "clean", tuple([cname] + rdeps),
                                  {**pt, "target": "clean", "clean": cname}, {"result_file": cname, "defense": "none"}),
                            rname, cname, skipped)
        targets = [(d, registry.get("defense", d).folder, True) for d in study.defenses]
        targets += [(d, d, False) for d in study.external_defenses]
        if found:  # a folder made elsewhere must be there now; the grid's records are made by this study
            rdir = study.study_dir / rname
            gone = [f for d, f, ours in targets
                    if not ours and not (rdir / "defense" / f / "defense_result.pt").is_file()]
            if gone:
                self.notes.append(f"{rname}: no defense folder {', '.join(gone)} (no "
                                  f"defense/<folder>/defense_result.pt); left out")
            targets = [t for t in targets if t[2] or t[1] not in gone]
        planned: list = []  # the defense folders whose model is in the plan (made here, or found)
        self.records.append({"key": rname, "point": dict(pt), "clean": cname, "found": found, "defenses": planned})
        for d, folder, ours in targets:
            dkey = f"{rname}/defense/{folder}"
            dpt = {**pt, "target": folder, "defense": d}
            if ours:
                if not self.add(dkey, "defense", d, {**dpt, "role": "defense"}, dict(rec), rdeps, clean_ref=cname):
                    continue
                ddeps = [dkey]
            else:
                ddeps = []  # a folder made elsewhere: read as found
            planned.append(folder)
            self.plan_model(Model("defense", dkey, folder, tuple(dict.fromkeys(ddeps + rdeps)), dpt,
                                  {**rec, "defense": folder}), rname, cname, skipped)

    def plan_found(self, rname: str) -> None:
        """A record made elsewhere (``records:``): dataset, model, attack and pratio read from it; its clean reference
        (clean_reference: true) is the badnet attack at pratio 0 on that dataset and model, under the study's own
        folder (``Study.own_key``)."""

        study = self.study
        ident = record_identity(study.study_dir / rname, bool(study.trust_record))
        dataset, model, seed = ident["dataset"], ident["model"], study.seeds[0]
        attack = str(ident["attack"] or "unknown")
        pratio = float(ident["pratio"]) if isinstance(ident["pratio"], (int, float)) else UNKNOWN_PRATIO
        if pratio == UNKNOWN_PRATIO:
            self.notes.append(f"{rname}: no info.pickle (or no pratio in it): its attack and pratio read as unknown / "
                              f"{UNKNOWN_PRATIO:g} in the results")
        pt = {"dataset": dataset, "attack": attack, "model": model, "seed": seed, "pratio": pratio, "record": rname}
        for m, note in self.skipped(attack).items():
            self.notes.append(f"{m} on {rname}: left out: {note}")
        cname = None
        if study.clean_reference:
            leaf = clean_name(CLEAN_ATTACK, dataset, model, seed)
            key = study.own_key(leaf)
            cpt = {**pt, "attack": CLEAN_ATTACK, "pratio": 0.0, "role": "clean", "target": "clean"}
            cpt.pop("record")
            if self.add(key, "attack", CLEAN_ATTACK, cpt, {"dataset": dataset, "model": model, "pratio": 0.0,
                                                          "save_folder_name": leaf}, [], clean=True,
                        record_root=(study.study_dir / key).parent):
                cname = key
        self.plan_record(rname, pt, cname, found=True)

    def check_kind_keys(self) -> None:
        """Keys given for a whole kind (set.defense) that none of its planned jobs accepts: a typo, or a note."""

        study = self.study
        for scope, keys in self.used_scope_keys.items():
            unused = sorted(k for k in study.set.get(scope, {}) if k not in keys)
            if not unused:
                continue
            kind = "attack" if scope == "clean" else scope
            known = set().union(*(m.schema() for m in registry.methods(kind)))
            typos = [k for k in unused if k not in known]
            if typos:  # no method of that kind has them: a typo
                raise ConfigError(f"{study.path}: set.{scope} has key(s) {typos} that no {kind} method accepts; valid "
                                  f"for this study's {scope} jobs: {', '.join(sorted(keys))}")
            self.notes.append(f"set.{scope}: {', '.join(unused)} not used (no {scope} method of this study has them)")


def _topological(jobs: dict) -> list:
    out, seen = [], set()

    def visit(k):
        if k in seen:
            return
        seen.add(k)
        for d in jobs[k].deps:
            visit(d)
        out.append(jobs[k])

    for k in jobs:
        visit(k)
    return out

