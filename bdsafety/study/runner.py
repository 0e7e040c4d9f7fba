"""python analysis/run_study.py --yaml_path config/study/demo.yaml [--executor ray] [--dry_run]

Expands the study's grid into jobs, runs those that are not up to date (new, config changed, output deleted, or
downstream of one of those), skips the dependents of a failed job, then writes results.csv, report.md and
report.html to the study's report_dir (default: the study folder), whose path it prints last. Exit status 1 when a job
failed.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from tqdm.auto import tqdm

from bdsafety import engine
from bdsafety.errors import ConfigError
from bdsafety.safeio import atomic_write_text
from bdsafety.study.execute import other_owner, owner, read_marker, up_to_date
from bdsafety.study.executors import EXECUTORS, run_local, run_ray
from bdsafety.study.history import cli_command, new_run, summarize
from bdsafety.study.plan import Plan, build_plan
from bdsafety.study.progress import StudyProgress, format_eta
from bdsafety.study.report import write_report
from bdsafety.study.results import collect
from bdsafety.study.spec import Study, load_study, narrow


@dataclass
class Outcome:
    study_dir: Path
    plan: Plan
    results: dict  # key -> result dict (status done | ran | failed | skipped)
    wall_s: float = 0.0
    run: dict | None = None  # this study run (bdsafety.study.history.new_run)
    results_csv: Path | None = None
    report: Path | None = None

    @property
    def report_dir(self) -> Path:
        return self.plan.study.report_dir

    def keys(self, status: str) -> list:
        return [k for k, r in self.results.items() if r.get("status") == status]

    @property
    def failed(self) -> list:
        return [r for r in self.results.values() if r.get("status") == "failed"]


def assess(plan: Plan, force: bool = False) -> tuple[dict, list, dict]:
    """(results of up-to-date jobs, jobs to run in order, key -> why it runs)."""
    sd = plan.study.study_dir
    current, todo, why = {}, [], {}
    for j in plan.jobs:
        marker = None if force else read_marker(sd, j, plan.study.report_dir)
        runs = {d: current[d]["run"] for d in j.deps if d in current}
        if marker is None and not force:  # the same job, finished by another study in this folder: read, never replaced
            theirs = read_marker(sd, j, any_owner=True)
            marker = theirs if up_to_date(theirs, j, runs) and all(d in current for d in j.deps) else None
        if not force and all(d in current for d in j.deps) and up_to_date(marker, j, runs):
            current[j.key] = {"key": j.key, "id": j.id, "status": "done", "run": marker["run"],
                              "wall_s": marker.get("wall_s", 0.0), "finished": marker.get("finished"),
                              "study_run": marker.get("study_run")}
            if marker.get("owner", ".") != owner(sd, plan.study.report_dir):
                current[j.key]["shared_from"] = marker.get("owner", ".")
            continue
        todo.append(j)
        if force:
            why[j.key] = "forced (--fresh)"
        elif marker is None:
            other = other_owner(sd, j.key, plan.study.report_dir)
            why[j.key] = ("new" if not (sd / j.key).exists() else "output without a finished marker" if other is None
                          else f"output of another study (report folder {other}): it will be refused, not replaced")
        elif marker.get("id") != j.id:
            same = (json.dumps(marker.get("config"), sort_keys=True, default=str)
                    == json.dumps(j.config, sort_keys=True, default=str))
            why[j.key] = "upstream config changed" if same else "config changed"
        else:
            why[j.key] = "upstream reran"
    return current, todo, why


def print_plan(plan: Plan, todo: list, why: dict, out=None) -> None:
    out = out or sys.stdout
    todo_keys = {j.key for j in todo}
    kinds: dict = {}
    st = plan.study
    where = f"in {st.study_dir}" + ("" if st.report_dir == st.study_dir else f", its report in {st.report_dir}")
    print(f"study {st.name}: {len(plan.jobs)} jobs ({len(plan.jobs) - len(todo)} up to date, "
          f"{len(todo)} to run) {where}",
          file=out)
    for j in plan.jobs:
        kinds[f"{j.kind} {j.method}"] = kinds.get(f"{j.kind} {j.method}", 0) + 1
        state = f"RUN ({why[j.key]})" if j.key in todo_keys else "up to date"
        res = ", ".join(f"{k}={v:g}" for k, v in j.resources.items())
        deps = f" <- {', '.join(j.deps)}" if j.deps else ""
        print(f"  [{j.id[:8]}] {j.kind:8s} {j.method:18s} {j.key}  ({res}) {state}{deps}", file=out)
    print("jobs per method: " + ", ".join(f"{k} {v}" for k, v in kinds.items()), file=out)
    for n in plan.notes:
        print(f"note: {n}", file=out)
    print(f"{len(plan.jobs)} jobs, {len(todo)} to run", file=out)


def run_study(yaml_path: str | None, executor: str = "local", ray_address: str | None = None,
              ray_num_cpus: int | None = None, dry_run: bool = False, fresh: bool = False, progress: bool = True,
              record_root: str | None = None, study_dir: str | None = None, out=None, threads: int | None = None,
              trust_record: bool = False, study: Study | None = None, command: str | None = None,
              attacks: list | None = None, seeds: list | None = None, time_budget_s: float | None = None) -> Outcome:
    """Run the study of ``yaml_path`` (or the ``study`` given, e.g. built in memory by bdsafety.study.audit).
    ``command``: the command line that started it, for the report's header (default: the equivalent
    analysis/run_study.py command)."""
    out = out or sys.stdout
    if executor not in EXECUTORS:

        raise ConfigError(f"--executor must be one of {', '.join(EXECUTORS)}, got {executor!r}")
    t0 = time.time()
    if study is None:
        study = load_study(yaml_path, record_root=record_root, study_dir=study_dir)
    study = narrow(study, attacks, seeds)
    yaml_path = study.path
    study.trust_record = bool(trust_record)
    if study.unknown and not dry_run:

        raise ConfigError(f"{yaml_path}: {'; '.join(study.unknown)}. Fix the name, or list it under expected_later: in "
                          f"the study yaml if it is a method still to be merged (it is then left out with a note)")
    if trust_record and not dry_run:
        print("WARNING: --trust_record: every job of this study loads its records' pickles without the safe-loading "
              "allow-list; code inside a record file may run. Use it only for records you made or trust.",
              file=out, flush=True)
    plan = build_plan(study)
    current, todo, why = assess(plan, force=fresh)
    sd, rd = study.study_dir, study.report_dir
    if dry_run:
        print_plan(plan, todo, why, out)
        for u in study.unknown:
            print(f"error (a real run stops here): {u}; fix it or list the name under expected_later:", file=out)
        return Outcome(sd, plan, current, 0.0)
    sd.mkdir(parents=True, exist_ok=True)
    rd.mkdir(parents=True, exist_ok=True)
    run = new_run(command or cli_command("analysis/run_study.py",
                                         ["--yaml_path", str(yaml_path), "--study_dir", str(sd)]
                                         + (["--executor", executor] if executor != "local" else [])), executor)
    for n in plan.notes:
        print(f"note: {n}", file=out)
    print(f"study {study.name}: {len(plan.jobs)} jobs, {len(plan.jobs) - len(todo)} up to date, {len(todo)} to run "
          f"({executor} executor) in {sd}" + ("" if rd == sd else f", its report in {rd}"), file=out, flush=True)
    bar = None
    if progress and todo:

        bar = tqdm(total=len(todo), desc=f"study {study.name}", unit="job", disable=not engine.use_progress(True))
    count = [0]
    prog = StudyProgress(todo, rd, t0=time.time())

    def on_result(r):
        count[0] += 1
        prog.record(r)
        prog.write()
        what = {"ran": f"done in {r.get('wall_s', 0):.0f}s",
                "failed": f"FAILED: {r.get('error', '')} (log {r.get('log')})",
                "skipped": f"skipped: {r.get('error', '')}", "deferred": "deferred to the next sitting (time budget)"
                }.get(r["status"], r["status"])
        eta = "" if count[0] == len(todo) else f", {format_eta(prog.eta_s())}"
        line = f"[study {count[0]}/{len(todo)} {time.time() - t0:5.0f}s{eta}] {r['key']}: {what}"
        if bar is not None and not bar.disable:
            bar.update(1)
            bar.write(line, file=out)
        else:
            print(line, file=out, flush=True)

    try:
        if executor == "ray" and todo:
            results = run_ray(todo, current, sd, on_result, address=ray_address, num_cpus=ray_num_cpus, report_dir=rd,
                              study_run=run, time_budget_s=time_budget_s)
        else:
            results = run_local(todo, current, sd, on_result, threads=threads, report_dir=rd, study_run=run,
                                time_budget_s=time_budget_s)
    finally:
        if bar is not None:
            bar.close()
    oc = Outcome(sd, plan, results, time.time() - t0, run=run)
    finish(oc, executor, out)
    return oc


def finish(oc: Outcome, executor: str, out=None) -> None:
    out = out or sys.stdout

    sd, plan, rd = oc.study_dir, oc.plan, oc.report_dir
    n = {s: len(oc.keys(s)) for s in ("ran", "done", "failed", "skipped", "deferred")}
    line = f"{n['ran']} ran, {n['done']} up to date, {n['failed']} failed, {n['skipped']} skipped"
    if n["deferred"]:
        line += f", {n['deferred']} deferred to the next sitting (--time_budget_s): run the same command again"
    valid = {k for k, r in oc.results.items() if r.get("status") in ("done", "ran")}
    df = collect(plan, sd, valid=valid)
    oc.results_csv = atomic_write_text(rd / "results.csv", df.to_csv(index=False))
    summary = {"state": "finished", "line": line, "executor": executor, "wall_s": round(oc.wall_s, 1),
               "failed": oc.failed, "skipped": [r for r in oc.results.values() if r.get("status") == "skipped"],
               "jobs": {k: {kk: r.get(kk) for kk in ("status", "wall_s", "id", "log", "error", "finished")}
                        | {"study_run": (r.get("study_run") or {}).get("id")} for k, r in oc.results.items()},
               "notes": plan.notes, "history": summarize(oc.results, oc.run or new_run("-", executor), oc.wall_s)}
    md, html = write_report(plan, sd, df, summary, valid, report_dir=rd)
    oc.report = md
    atomic_write_text(rd / "study.json", json.dumps(summary, indent=1, default=str))
    print(f"study {plan.study.name}: {line} in {oc.wall_s:.0f}s", file=out)
    for r in oc.failed:
        print(f"  FAILED {r['key']}: {r.get('error', '')}\n    log: {r.get('log')}", file=out)
    skipped = [r for r in oc.results.values() if r.get("status") == "skipped"]
    if skipped:
        print(f"  skipped because an upstream job failed: {', '.join(r['key'] for r in skipped)}", file=out)
    for note in plan.notes:
        print(f"  note: {note}", file=out)
    print(f"results: {oc.results_csv}\nreport: {md} ({html.name})", file=out)
    if rd != sd:
        print(f"report folder: {rd}", file=out)
    print(f"study folder: {sd}", file=out, flush=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="analysis/run_study.py", description=__doc__.split("\n")[0])
    p.add_argument("--yaml_path", required=True, help="the study yaml, e.g. config/study/demo.yaml")
    p.add_argument("--executor", default="local", choices=EXECUTORS,
                   help="local (default: one job after the other, in this process) or ray (jobs as Ray tasks)")
    p.add_argument("--ray_address", default=None, help="join this Ray cluster (e.g. auto, or the head's ip:6379); "
                                                       "default: start a local Ray instance")
    p.add_argument("--ray_num_cpus", type=int, default=None, help="CPUs of the local Ray instance (default: all)")
    p.add_argument("--record_root", default=None, help="folder holding the study folder (default: the yaml's, "
                                                       "else ./record)")
    p.add_argument("--study_dir", default=None, help="the study folder (default <record_root>/study_<name>)")
    p.add_argument("--dry_run", action="store_true",
                   help="print the jobs (DAG, what would run and why) and their count")
    p.add_argument("--fresh", action="store_true", help="rerun every job")
    p.add_argument("--threads", type=int, default=None, help="local executor: torch threads per job (default: all of "
                                                             "this machine's); on Ray each job gets its num_cpus")
    p.add_argument("--attacks", default=None, help="run only these of the yaml's attacks (comma-separated): a chunk of "
                                                   "the grid, e.g. one attack and seed per sitting (merge: "
                                                   "analysis/merge_studies.py)")
    p.add_argument("--seeds", default=None, help="run only these of the yaml's seeds (comma-separated)")
    p.add_argument("--time_budget_s", type=float, default=None,
                   help="start no job whose estimated time (bdsafety.study.cost) would end past this many seconds from "
                        "now; shorter jobs fill the time left and the rest is deferred to the next run of the same "
                        "command (a sitting of limited length: a lent machine, a session)")
    p.add_argument("--no_progress", action="store_true")
    p.add_argument("--trust_record", action="store_true", help="let every job load its records' pickles without the "
                                                               "safe-loading allow-list (code in them may run); "
                                                               "never a yaml value")
    a = p.parse_args(argv)
    if a.ray_address and a.executor != "ray":
        p.error("--ray_address needs --executor ray")
    if a.time_budget_s is not None and a.time_budget_s <= 0:
        p.error(f"--time_budget_s must be a positive number of seconds, got {a.time_budget_s}")
    if a.ray_num_cpus is not None and a.ray_num_cpus < 1:
        p.error(f"--ray_num_cpus must be an integer >= 1, got {a.ray_num_cpus}")
    try:
        seeds = [int(v) for v in a.seeds.split(",")] if a.seeds else None
    except ValueError:
        p.error(f"--seeds takes comma-separated integers, got {a.seeds!r}")
    oc = run_study(a.yaml_path, a.executor, a.ray_address, a.ray_num_cpus, a.dry_run, a.fresh, not a.no_progress,
                   a.record_root, a.study_dir, threads=a.threads, trust_record=a.trust_record,
                   command=cli_command("analysis/run_study.py", argv),
                   attacks=[v.strip() for v in a.attacks.split(",")] if a.attacks else None, seeds=seeds,
                   time_budget_s=a.time_budget_s)
    return 1 if oc.failed else 0
