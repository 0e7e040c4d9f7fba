"""Grid -> DAG of jobs. Each job is one registered method run with a fully resolved config, writing one ordinary
output folder (a record, defense/<folder>/, .../ra/, .../qra/, <record>/lmc_<folder>/), and is identified by the
hash of that config plus the ids of the jobs it reads from.

Per grid point (dataset, attack, pratio, model, seed):
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

from bdsafety.config import config_dict, resolve
from bdsafety.errors import ConfigError

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

    def by_key(self) -> dict:
        return {j.key: j for j in self.jobs}


def record_name(attack: str, dataset: str, model: str, pratio: float, seed: int) -> str:
    return f"{attack}_{dataset}_{model}_p{pratio:g}_s{seed}"


def clean_name(attack: str, dataset: str, model: str, seed: int) -> str:
    return f"clean-{attack}_{dataset}_{model}_s{seed}"


def job_id(kind: str, method: str, config: dict, upstream_ids: list) -> str:
    blob = json.dumps({"kind": kind, "method": method, "config": config, "upstream": sorted(upstream_ids)},
                      sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _runtime(study) -> dict:
    """Keys of every job that say where and how it runs (RUNTIME_KEYS: not part of the job id). The jobs may replace
    their outputs and delete what lies inside them; bdsafety.study.execute.check_replaceable refuses that unless this
    study made every output concerned."""
    return {"record_root": str(study.study_dir), "dataset_path": str(study.dataset_path), "device": study.device,
            "no_progress": True, "overwrite": True, "dependents": "delete", "trust_record": bool(study.trust_record)}


def build_plan(study) -> Plan:
    """Expand ``study`` (bdsafety.study.spec.Study) into jobs with resolved configs and ids (topological order)."""
    from bdsafety import registry
    from bdsafety.retune.qra import triggered_source_note

    notes = list(study.notes)
    jobs: dict[str, Job] = {}
    failed_keys: set = set()
    used_scope_keys: dict[str, set] = {}  # kind -> the keys some planned method of that kind accepts
    runtime = _runtime(study)

    def add(key, kind, method, point, fixed, deps, clean=False):
        deps = list(dict.fromkeys(deps))
        if key in jobs and jobs[key].point != point:
            a, b = jobs[key].point, point
            diff = ", ".join(f"{k} {a.get(k)!r} / {b.get(k)!r}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k))
            raise ConfigError(f"{study.path}: two grid points give the same output folder {key} ({diff}); make the grid's "
                              f"values distinct (e.g. pratios that differ in their first 6 significant digits)")
        if key in jobs or key in failed_keys:
            return key in jobs
        if any(d in failed_keys for d in deps):
            failed_keys.add(key)
            return False
        m = registry.get(kind, method)
        cname = study.config_name(kind, method, point["dataset"], clean)
        yaml_path = m.config_path(cname)
        if not yaml_path.is_file():
            notes.append(f"{key}: no config {yaml_path.relative_to(ROOT) if yaml_path.is_relative_to(ROOT) else yaml_path} "
                         f"(config/{registry.KIND_DIRS[kind]}/{method}/ has: "
                         f"{', '.join(sorted(p.stem for p in m.config_dir.glob('*.yaml'))) or 'nothing'}); job and dependents left out")
            failed_keys.add(key)
            return False
        schema = m.schema()
        used_scope_keys.setdefault(kind, set()).update(schema)
        if clean:
            used_scope_keys.setdefault("clean", set()).update(schema)
        over = {**study.overrides(kind, method, clean, schema), **fixed}
        over.update({k: v for k, v in runtime.items() if k in schema})
        if "random_seed" in schema:
            over["random_seed"] = point["seed"] + RA_DRAW_STRIDE * point.get("draw", 0)
        bad = [k for k in over if k not in schema]
        if bad:
            raise ConfigError(f"{study.path}: set: {kind} {method} has no key(s) {bad}; valid: {', '.join(sorted(schema))}")
        cfg = resolve(schema, str(yaml_path), over)
        if m.resolve is not None:  # values that depend on others (ANP's variant): a bad mix fails here, not mid-study
            m.resolve(copy.copy(cfg))
        conf = {k: v for k, v in config_dict(cfg).items() if k not in RUNTIME_KEYS}
        j = Job(key=key, kind=kind, method=method, yaml_path=str(yaml_path), overrides=over, deps=list(deps),
                resources=study.job_resources(kind, method, clean), point=dict(point), config=conf)
        j.id = job_id(kind, method, conf, [jobs[d].id for d in deps])
        jobs[key] = j
        return True

    ra = "ra" in study.retune
    qra = "qra" in study.retune
    for dataset in study.datasets:
        for model in study.models:
            for attack in study.attacks:
                qra_note = triggered_source_note(attack) if qra else None  # clean-label without a rebuildable trigger
                if qra_note is not None:
                    notes.append(f"qra on {attack} records: every job left out: {qra_note}")
                for seed in study.seeds:
                    base = {"dataset": dataset, "attack": attack, "model": model, "seed": seed}
                    cname = clean_name(attack, dataset, model, seed)
                    have_clean = False
                    if study.clean_reference:
                        have_clean = add(cname, "attack", attack, {**base, "pratio": 0.0, "role": "clean", "target": "clean"},
                                         {"dataset": dataset, "model": model, "pratio": 0.0, "save_folder_name": cname},
                                         [], clean=True)
                    for pratio in study.pratios:
                        rname = record_name(attack, dataset, model, pratio, seed)
                        pt = {**base, "pratio": pratio, "record": rname}
                        if not add(rname, "attack", attack, {**pt, "role": "attack", "target": "none"},
                                   {"dataset": dataset, "model": model, "pratio": pratio, "save_folder_name": rname}, []):
                            continue
                        rec = {"result_file": rname}

                        def add_ra(key, ppt, fixed, deps):
                            """The RA job (its draws), the benign control and one per RA budget (poison_num) of the grid;
                            True when the main RA job (draw 0) is in the plan."""
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
                                    added = add(jkey, "retune", "ra", {**ppt, "role": role, "draw": k, **extra},
                                                {**fixed, "save_name": sname, **extra}, deps)
                                    if role == "ra" and k == 0:
                                        ok = added
                                        if not ok:
                                            return False
                            return ok

                        if ra:
                            add_ra(f"{rname}/ra", {**pt, "target": "none"}, {**rec, "defense": "none", "save_name": "ra"}, [rname])
                            if have_clean:
                                add_ra(f"{cname}/ra_{rname}", {**pt, "target": "clean", "clean": cname},
                                       {"result_file": cname, "defense": "none", "poison_source": rname, "save_name": f"ra_{rname}"},
                                       [cname, rname])
                        targets = [(d, registry.get("defense", d).folder, True) for d in study.defenses]
                        targets += [(d, d, False) for d in study.external_defenses]
                        for d, folder, ours in targets:
                            dkey = f"{rname}/defense/{folder}"
                            dpt = {**pt, "target": folder, "defense": d}
                            if ours:
                                need = registry.get("defense", d).needs
                                deps = [rname] + ([cname] if "clean_reference" in need and have_clean else [])
                                if not add(dkey, "defense", d, {**dpt, "role": "defense"}, dict(rec), deps):
                                    continue
                                ddeps = [dkey]
                            else:
                                ddeps = [rname]  # a folder made elsewhere: read as found
                            if ra and add_ra(f"{dkey}/ra", dpt, {**rec, "defense": folder, "save_name": "ra"}, ddeps + [rname]):
                                # qra_note: left out, with the attack's note
                                chosen = study.qra_defenses is None or d in study.qra_defenses or folder in study.qra_defenses
                                if qra and qra_note is None and have_clean and chosen:
                                    add(f"{dkey}/qra", "retune", "qra", {**dpt, "role": "qra"},
                                        {**rec, "defense": folder, "clean_record": cname, "ra_name": "ra", "save_name": "qra"},
                                        ddeps + [f"{dkey}/ra", cname])
                            for an in study.analyses:
                                add(f"{rname}/{an}_{folder}", "analysis", an, {**dpt, "role": an},
                                    {**rec, "defense": [folder], "save_name": f"{an}_{folder}"}, ddeps + [rname])
    if qra and not study.clean_reference:
        notes.append("qra needs the clean reference: set clean_reference: true to run it")
    for scope, keys in used_scope_keys.items():  # keys given for a whole kind that none of its planned jobs accepts
        unused = sorted(k for k in study.set.get(scope, {}) if k not in keys)
        if not unused:
            continue
        kind = "attack" if scope == "clean" else scope
        known = set().union(*(m.schema() for m in registry.methods(kind)))
        typos = [k for k in unused if k not in known]
        if typos:  # no method of that kind has them: a typo
            raise ConfigError(f"{study.path}: set.{scope} has key(s) {typos} that no {kind} method accepts; valid for this "
                              f"study's {scope} jobs: {', '.join(sorted(keys))}")
        notes.append(f"set.{scope}: {', '.join(unused)} not used (no {scope} method of this study has them)")
    order = _topological(jobs)
    return Plan(order, notes, study)


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

