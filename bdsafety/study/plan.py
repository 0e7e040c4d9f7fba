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
from bdsafety.retune.qra import triggered_source_note
from bdsafety.study.spec import OWN_PRATIO

# resolved-config keys that say where / how a job runs, not what it computes: not part of the job id
RUNTIME_KEYS = ("record_root", "dataset_path", "device", "no_progress", "overwrite", "dependents", "trust_record",
                "eval_batch_size", "yaml_path")
# file whose presence means an output of this kind is complete (besides the study's marker)
DONE_FILE = {"attack": "attack_result.pt", "defense": "defense_result.pt", "ra": "ra_result.pt", "qra": "qra_compare.csv",
             "lmc": "lmc.csv"}
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
    point: dict  # grid coordinates: dataset, attack, pratio, model, seed, role ('attack', 'clean', 'defense', ...), target
    id: str = ""
    config: dict = field(default_factory=dict)  # the resolved config, runtime keys removed

    @property
    def done_file(self) -> str:
        return DONE_FILE.get(self.method, DONE_FILE.get(self.kind, ""))

    def to_dict(self) -> dict:
        return {k: getattr(self, k) for k in ("key", "kind", "method", "yaml_path", "overrides", "deps", "resources", "point",
                                               "id", "config")}

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
    qra = "qra" in study.retune
    for dataset in study.datasets:
        for model in study.models:
            for attack in study.attacks:
                qra_note = triggered_source_note(attack) if qra else None  # clean-label without a rebuildable trigger
                if qra_note is not None:
                    pl.notes.append(f"qra on {attack} records: every job left out: {qra_note}")
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
                                  {"dataset": dataset, "model": model, "pratio": pratio, "save_folder_name": rname}, []):
                            pl.plan_record(rname, pt, cname if have_clean else None, qra_note, found=False)
    for rname in study.records:
        pl.plan_found(rname)
    if qra and not study.clean_reference:
        pl.notes.append("qra needs the clean reference: set clean_reference: true to run it")
    pl.check_kind_keys()
    return Plan(_topological(pl.jobs), pl.notes, study, pl.records)


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
        self.used_scope_keys: dict[str, set] = {}  # kind -> the keys some planned method of that kind accepts
        self.runtime = _runtime(study)

    def own_pratio(self, attack: str, dataset: str) -> float | None:
        """``pratios: [attack]``: the pratio the attack's yaml for ``dataset`` gives (None, with a note, when the yaml
        is missing: the attack's jobs are then left out as for any missing config)."""
        m = registry.get("attack", attack)
        yaml_path = m.config_path(self.study.config_name("attack", attack, dataset, False))
        if not yaml_path.is_file():
            self.notes.append(f"{attack} on {dataset}: no config {yaml_path.name} to read its own pratio from; left out")
            return None
        return float(resolve(m.schema(), str(yaml_path), {}).pratio)

    def add(self, key, kind, method, point, fixed, deps, clean=False, record_root=None) -> bool:
        """Plan one job; False when it is left out (no config, or an upstream left out). ``record_root``: where the
        job's record_root points when not the study folder (an attack writing a record below it)."""

        study, jobs = self.study, self.jobs
        deps = list(dict.fromkeys(deps))
        if key in jobs and jobs[key].point != point:
            a, b = jobs[key].point, point
            diff = ", ".join(f"{k} {a.get(k)!r} / {b.get(k)!r}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k))
            raise ConfigError(f"{study.path}: two grid points give the same output folder {key} ({diff}); make the grid's "
                              f"values distinct (e.g. pratios that differ in their first 6 significant digits)")
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
            self.notes.append(f"{key}: no config {shown} (config/{registry.KIND_DIRS[kind]}/{method}/ has: {have}); job and "
                              f"dependents left out")
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
            raise ConfigError(f"{study.path}: set: {kind} {method} has no key(s) {bad}; valid: {', '.join(sorted(schema))}")
        cfg = resolve(schema, str(yaml_path), over)
        if m.resolve is not None:  # values that depend on others (ANP's variant): a bad mix fails here, not mid-study
            m.resolve(copy.copy(cfg))
        conf = id_config(cfg, schema)
        j = Job(key=key, kind=kind, method=method, yaml_path=str(yaml_path), overrides=over, deps=list(deps),
                resources=study.job_resources(kind, method, clean), point=dict(point), config=conf)
        j.id = job_id(kind, method, conf, [jobs[d].id for d in deps])
        jobs[key] = j
        return True

    def add_ra(self, key, ppt, fixed, deps) -> bool:
        """The RA job (its draws), the benign control and one per RA budget (poison_num) of the grid; True when the main
        RA job (draw 0) is in the plan."""
        study = self.study
        folder, name = key.rsplit("/", 1)[0] if "/" in key else "", fixed["save_name"]
        runs = [("ra", None, name, study.ra_draws)]
        if study.ra_control:
            runs.append(("ra_control", 0, f"{name}_control", study.ra_draws))
        runs += [("ra_budget", n, f"{name}_budget_p{n}", study.ra_budget_draws) for n in study.ra_poison_nums]
        ok = False
        for role, n, rname_, draws in runs:
            for k in range(draws):
                sname = rname_ + (f"_d{k}" if k else "")
                jkey = f"{folder}/{sname}" if folder else sname
                extra = {} if n is None else {"poison_num": n}
                added = self.add(jkey, "retune", "ra", {**ppt, "role": role, "draw": k, **extra},
                                 {**fixed, "save_name": sname, **extra}, deps)
                if role == "ra" and k == 0:
                    ok = added
                    if not ok:
                        return False
        return ok

    def plan_record(self, rname: str, pt: dict, cname: str | None, qra_note: str | None, found: bool) -> None:
        """Everything downstream of record ``rname`` (made by the grid's attack job, or ``found`` in the study folder:
        then no job lists it as a dep): RA on it and on the clean reference ``cname``, each defense (run here or a folder
        made elsewhere) with its RA, QRA and analyses."""

        study, add, add_ra = self.study, self.add, self.add_ra
        ra, qra = "ra" in study.retune, "qra" in study.retune
        rec, rdeps = {"result_file": rname}, ([] if found else [rname])
        if ra:
            add_ra(f"{rname}/ra", {**pt, "target": "none"}, {**rec, "defense": "none", "save_name": "ra"}, rdeps)
            if cname is not None:
                add_ra(f"{cname}/ra_{rname}", {**pt, "target": "clean", "clean": cname},
                       {"result_file": cname, "defense": "none", "poison_source": rname, "save_name": f"ra_{rname}"},
                       [cname] + rdeps)
        targets = [(d, registry.get("defense", d).folder, True) for d in study.defenses]
        targets += [(d, d, False) for d in study.external_defenses]
        if found:  # a folder made elsewhere must be there now; the grid's records are made by this study
            rdir = study.study_dir / rname
            gone = [f for d, f, ours in targets if not ours and not (rdir / "defense" / f / "defense_result.pt").is_file()]
            if gone:
                self.notes.append(f"{rname}: no defense folder {', '.join(gone)} (no defense/<folder>/defense_result.pt); "
                                  f"left out")
            targets = [t for t in targets if t[2] or t[1] not in gone]
        planned: list = []  # the defense folders whose model is in the plan (made here, or found)
        self.records.append({"key": rname, "point": dict(pt), "clean": cname, "found": found, "defenses": planned})
        for d, folder, ours in targets:
            dkey = f"{rname}/defense/{folder}"
            dpt = {**pt, "target": folder, "defense": d}
            if ours:
                need = registry.get("defense", d).needs
                deps = rdeps + ([cname] if "clean_reference" in need and cname is not None else [])
                if not add(dkey, "defense", d, {**dpt, "role": "defense"}, dict(rec), deps):
                    continue
                ddeps = [dkey]
            else:
                ddeps = list(rdeps)  # a folder made elsewhere: read as found
            planned.append(folder)
            if ra and add_ra(f"{dkey}/ra", dpt, {**rec, "defense": folder, "save_name": "ra"}, ddeps + rdeps):
                # qra_note: left out, with the attack's note
                chosen = study.qra_defenses is None or d in study.qra_defenses or folder in study.qra_defenses
                if qra and qra_note is None and cname is not None and chosen:
                    add(f"{dkey}/qra", "retune", "qra", {**dpt, "role": "qra"},
                        {**rec, "defense": folder, "clean_record": cname, "ra_name": "ra", "save_name": "qra"},
                        ddeps + [f"{dkey}/ra", cname])
            for an in study.analyses:
                add(f"{rname}/{an}_{folder}", "analysis", an, {**dpt, "role": an},
                    {**rec, "defense": [folder], "save_name": f"{an}_{folder}"}, ddeps + rdeps)

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
        qra_note = None
        if "qra" in study.retune and attack != "unknown":

            if attack in registry.names("attack"):
                qra_note = triggered_source_note(attack)
        if qra_note is not None:
            self.notes.append(f"qra on {rname}: left out: {qra_note}")
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
        self.plan_record(rname, pt, cname, qra_note, found=True)

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
                raise ConfigError(f"{study.path}: set.{scope} has key(s) {typos} that no {kind} method accepts; valid for "
                                  f"this study's {scope} jobs: {', '.join(sorted(keys))}")
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

