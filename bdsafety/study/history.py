"""Where a study's results come from: which run of the study produced each job's output, with which command and code.

Each invocation of the study runner is a *study run* (``new_run``): an id, its start time, its command, its working
folder and the code it ran (``code_version``: the git commit of the checkout bdsafety is imported from and whether the
working tree differs from it; 'unknown' for an installed package). Every job it runs writes that run into its marker
(``<output>/log/study_job.json``, key ``study_run``), beside the job's own ``finished`` time and ``wall_s``. A rerun
reads the markers of the jobs that are up to date, so the report's header (``summarize``) describes the outputs as they
are: how many jobs were produced by how many runs, when, at what summed compute time, with which commits, and what the
last run did. A marker written before study runs were recorded counts as one "earlier run" without details.
"""
from __future__ import annotations

import os
import shlex
import subprocess
import sys
import time
import uuid
from pathlib import Path

import bdsafety

PRODUCED = ("done", "ran")


def code_version() -> dict:
    """{'commit': git HEAD of the checkout bdsafety is imported from, or 'unknown'; 'dirty': True when its working tree
    differs from that commit (untracked files that git does not ignore included), None when unknown; 'source'}."""
    root = Path(bdsafety.__file__).resolve().parent.parent
    unknown = {"commit": "unknown", "dirty": None,
               "source": f"installed package bdsafety {getattr(bdsafety, '__version__', '?')} (no git checkout)"}
    if not (root / ".git").exists():
        return unknown

    def git(*args) -> str:
        return subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, timeout=30,
                              check=True).stdout.strip()

    try:
        commit = git("rev-parse", "HEAD")
        dirty = bool(git("status", "--porcelain"))
    except (OSError, subprocess.SubprocessError):
        return {**unknown, "source": f"git checkout {root} (git could not be run)"}
    return {"commit": commit, "dirty": dirty, "source": f"git checkout {root}"}


def cli_command(script: str, argv: list | None) -> str:
    """The command line of an entry point's run as a user retypes it: ``python <script> <argv>`` (argv: sys.argv[1:]
    when None), the same whether it was started as the script, the console script or from Python with an argv."""
    return shlex.join(["python", script, *(sys.argv[1:] if argv is None else argv)])


def new_run(command: str, executor: str) -> dict:
    """A study run: what its jobs record in their markers."""
    now = time.time()
    return {"id": time.strftime("%Y%m%d-%H%M%S", time.localtime(now)) + "-" + uuid.uuid4().hex[:6],
            "started": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(now)), "command": command, "cwd": os.getcwd(),
            "executor": executor, "code": code_version()}


def summarize(results: dict, run: dict, wall_s: float) -> dict:
    """The history of the outputs a study has now. ``results``: key -> result of every job (this run's, and the markers'
    of those up to date); ``run``: this study run; ``wall_s``: its wall time."""
    produced = [r for r in results.values() if r.get("status") in PRODUCED]
    runs: dict = {}
    for r in produced:
        sr = r.get("study_run") if isinstance(r.get("study_run"), dict) else {}
        e = runs.setdefault(sr.get("id"), {**sr, "id": sr.get("id"), "jobs": 0, "compute_s": 0.0, "first": None,
                                           "last": None})
        e["jobs"] += 1
        e["compute_s"] += float(r.get("wall_s") or 0.0)
        fin = r.get("finished")
        if fin:
            e["first"] = min(e["first"] or fin, fin)
            e["last"] = max(e["last"] or fin, fin)
    count = {s: sum(r.get("status") == s for r in results.values()) for s in ("ran", "done", "failed", "skipped")}
    ordered = sorted(runs.values(), key=lambda e: (e["id"] is not None, e.get("started") or "", e["id"] or ""))
    return {"jobs": len(results), "produced": len(produced),
            "compute_s": round(sum(e["compute_s"] for e in ordered), 1), "runs": ordered,
            "last_run": {**run, **count, "wall_s": round(wall_s, 1)}}


def fmt_duration(s: float) -> str:
    s = float(s)
    if s < 90:
        return f"{s:.0f}s"
    if s < 5400:
        return f"{int(s // 60)}m {int(s % 60):02d}s"
    return f"{int(s // 3600)}h {int(s % 3600 // 60):02d}m"


def fmt_code(code: dict | None) -> str:
    if not code:
        return "unknown (not recorded)"
    if code.get("commit", "unknown") == "unknown":
        return f"unknown: {code.get('source', '')}"
    return (f"git {code['commit'][:12]}{' (dirty: uncommitted changes)' if code.get('dirty') else ''}, "
            f"{code.get('source', '')}")


def header_facts(hist: dict) -> dict:
    """The header of a report as plain text: {'jobs', 'last_run', 'command' (the last run's), 'code', 'runs': [line per
    run], 'produced_by' (the commands of the runs that produced the outputs)}."""
    last = hist["last_run"]
    runs = hist["runs"]
    n, p = hist["jobs"], hist["produced"]
    span = [e[k] for e in runs for k in ("first", "last") if e.get(k)]
    when = f", finished between {min(span)} and {max(span)}" if len(span) > 1 and min(span) != max(span) else (
        f", finished {span[0]}" if span else "")
    missing = f"; {n - p} not produced (failed, or skipped after a failure)" if n > p else ""
    jobs = (f"{n} jobs: {p} produced over {len(runs)} run{'s' if len(runs) != 1 else ''}{when}{missing}; compute "
            f"{fmt_duration(hist['compute_s'])} (the produced jobs' wall times summed)")
    last_line = (f"{last['id']} (started {last['started']}, {last['executor']} executor, "
                 f"{fmt_duration(last['wall_s'])}): {last['ran']} ran, {last['done']} up to date, {last['failed']} "
                 f"failed, {last['skipped']} skipped")
    lines = []
    for e in runs:
        if e["id"] is None:
            lines.append(f"earlier run(s) that did not record their run: {e['jobs']} jobs, compute "
                         f"{fmt_duration(e['compute_s'])}")
            continue
        lines.append(f"{e['id']} (started {e.get('started')}): {e['jobs']} jobs, compute "
                     f"{fmt_duration(e['compute_s'])}, code {fmt_code(e.get('code'))}, command `{e.get('command')}`")
    codes: dict = {}
    for e in runs:
        c = fmt_code(e.get("code")) if e["id"] is not None else "unknown (not recorded)"
        codes[c] = codes.get(c, 0) + e["jobs"]
    code = "; ".join(f"{c} ({k} jobs)" if len(codes) > 1 else c for c, k in codes.items()) or "-"
    if fmt_code(last.get("code")) not in codes:
        last_line += f"; its code: {fmt_code(last.get('code'))}"
    made = [f"`{e['command']}`" + (f" in {e['cwd']}" if e.get("cwd") else "") for e in runs
            if e["id"] is not None and e.get("command")]
    return {"jobs": jobs, "last_run": last_line, "command": f"`{last['command']}` in {last['cwd']}", "code": code,
            "runs": lines, "produced_by": "; ".join(dict.fromkeys(made)) or f"`{last['command']}` in {last['cwd']}"}
