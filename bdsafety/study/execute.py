"""Running one job, and knowing whether it has to run.

A finished job leaves a marker ``<output>/log/study_job.json`` (written atomically, after the output folder was
moved into place by the method's own safe output path) holding the job id, a fresh run id, the run ids of
the upstream outputs it read, its wall time, when it finished and the study run that ran it (bdsafety.study.history:
its id, start, command and code version). A job is up to date when its marker has its id, its output file is there, and
the upstream run ids it recorded are the current ones. So:
  * a rerun skips finished jobs;
  * a changed config changes the job id (and, through the upstream ids, the ids of everything downstream);
  * a deleted (or externally replaced) output lost its marker, so it reruns, and its dependents see a new upstream
    run id and rerun too;
  * a kill leaves either no marker (the job reruns; the output path cleans the killed run's leftovers) or a complete
    output with its marker.

A study replaces only what it made (``check_replaceable``): before a job runs, its output folder, if it exists, and
every result folder inside it (what the job's ``--overwrite --dependents delete`` would delete: defenses inside a
record, RA / QRA inside a defense, ...) must carry this study's marker for that very path, or be the output of a run
of this job that was killed between writing its output and its marker (``logs/<job>.started``). Anything else (a
hand-made record with a job's name, a BackdoorBench defense folder declared in ``external_defenses``, an RA run by
hand inside a study's defense) fails the job with the list of what would be lost, and is left untouched. Two studies
sharing a study folder (an audit of a record of another study) tell their outputs apart by the marker's ``owner``:
the study's report_dir relative to its study folder ('.' for the default, and for markers written before it existed).
"""
from __future__ import annotations

import contextlib
import json
import os
import time
import traceback
import uuid
from pathlib import Path

import torch

from bdsafety import registry
from bdsafety.config import resolve
from bdsafety.defenses.base import Prepared, prepare_only
from bdsafety.errors import ConfigError, OutputError
from bdsafety.outputs import INVERSION_DIR
from bdsafety.safeio import atomic_write_text
from bdsafety.study.plan import Job, id_config

MARKER = "study_job.json"


def output_dir(study_dir, key: str) -> Path:
    return Path(study_dir) / key


def log_path(report_dir, key: str) -> Path:
    """The log of job ``key``: under the study's own files (``report_dir``, by default the study folder)."""
    return Path(report_dir) / "logs" / (key.replace("/", "__") + ".log")


def owner(study_dir, report_dir=None) -> str:
    """Who made an output, as its marker says: ``report_dir`` relative to ``study_dir`` ('.' when they are one), so a
    moved study folder keeps its outputs; a report_dir outside the study folder: its absolute path."""
    if report_dir is None:
        return "."
    try:
        return Path(report_dir).resolve().relative_to(Path(study_dir).resolve()).as_posix()
    except ValueError:
        return str(Path(report_dir).resolve())


def other_owner(study_dir, key: str, report_dir=None) -> str | None:
    """The owner named by the marker of output ``key`` when another study made it, else None."""
    try:
        marker = json.loads((output_dir(study_dir, key) / "log" / MARKER).read_text())
    except (OSError, ValueError):
        return None
    who = marker.get("owner", ".") if isinstance(marker, dict) else None
    return who if who is not None and who != owner(study_dir, report_dir) else None


def read_marker(study_dir, job, report_dir=None, any_owner: bool = False) -> dict | None:
    """The marker of ``job``'s output when that output is complete and was made by this study (``any_owner``: by any
    study), else None."""
    out = output_dir(study_dir, job.key)
    p = out / "log" / MARKER
    if not p.is_file() or (job.done_file and not (out / job.done_file).is_file()):
        return None
    try:
        marker = json.loads(p.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(marker, dict):
        return None
    return marker if any_owner or marker.get("owner", ".") == owner(study_dir, report_dir) else None


def up_to_date(marker: dict | None, job, upstream_runs: dict) -> bool:
    """``upstream_runs``: key -> current run id of each upstream job."""
    if not marker or marker.get("id") != job.id:
        return False
    rec = marker.get("upstream") or {}
    return all(rec.get(k) == upstream_runs.get(k) for k in job.deps) and all(upstream_runs.get(k) for k in job.deps)


def started_path(report_dir, key: str) -> Path:
    """Written before a job runs, removed after its marker: a kill in between leaves it, so the rerun knows the output
    without a marker is this study's own."""
    return log_path(report_dir, key).with_suffix(".started")


# files whose presence makes a folder a result of its own (an attack record, a defense, an RA, QRA or LMC output)
RESULT_FILES = ("attack_result.pt", "defense_result.pt", "ra_result.pt", "qra_compare.csv", "lmc.csv")
# sub-folders of outputs that hold data, never results: not searched
_DATA_DIRS = {"log", "bd_train_dataset", "bd_test_dataset", "cross_test_dataset", INVERSION_DIR}


def _made_here(study_dir: Path, folder: Path, who: str = ".") -> bool:
    try:
        marker = json.loads((folder / "log" / MARKER).read_text())
    except (OSError, ValueError):
        return False
    return (isinstance(marker, dict) and marker.get("key") == folder.relative_to(study_dir).as_posix()
            and marker.get("owner", ".") == who)


def foreign_outputs(study_dir, key: str, report_dir=None) -> list:
    """Result folders at or inside the output of job ``key`` that this study did not make (see the module doc)."""
    study_dir = Path(study_dir).resolve()
    report_dir = study_dir if report_dir is None else Path(report_dir)
    who = owner(study_dir, report_dir)
    out = output_dir(study_dir, key).resolve()
    if not out.exists():
        return []
    found = []
    if not (_made_here(study_dir, out, who) or started_path(report_dir, key).is_file()):
        found.append(out)
    for root, dirs, files in os.walk(out):
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and d not in _DATA_DIRS)
        here = Path(root)
        if here != out and any(f in RESULT_FILES for f in files) and not _made_here(study_dir, here, who):
            found.append(here)
    return found


def check_replaceable(study_dir, job, report_dir=None) -> None:
    """Raise OutputError naming what a run of ``job`` would replace or delete that this study did not make."""
    found = foreign_outputs(study_dir, job.key, report_dir)
    if found:

        listing = ", ".join(str(p) for p in found)
        raise OutputError(f"{job.key} would replace or delete {len(found)} output(s) this study did not make: "
                          f"{listing}. Nothing was changed. Move them out of {study_dir} (or run the study in another "
                          f"--study_dir) and run it again; a defense folder made elsewhere belongs to the record it "
                          f"was made from and is stale once that record is retrained")


def _external_run(study_dir, key: str) -> str | None:
    """Run id of an output not made by the study (a defense folder made elsewhere): its file's size and mtime."""
    p = output_dir(study_dir, key) / "defense_result.pt"
    if not p.is_file():
        return None
    st = p.stat()
    return f"external-{st.st_size}-{st.st_mtime_ns}"


class _Tee:
    def __init__(self, f):
        self.f = f

    def write(self, s):
        self.f.write(s)
        return len(s)

    def flush(self):
        self.f.flush()

    def isatty(self):
        return False


def run_job(job_dict: dict, study_dir: str, upstream: dict, threads: int | None = None, report_dir: str | None = None,
            study_run: dict | None = None) -> dict:
    """Run one job (in this process) unless an upstream failed. ``upstream``: key -> result dict of each upstream
    job ({'status': 'done'|'ran'|..., 'run': run id}). ``threads``: torch threads of the job (default: the job's
    num_cpus). ``report_dir``: the folder holding the study's logs/ (default the study folder). ``study_run``: the study
    run that runs it (bdsafety.study.history.new_run), recorded in the marker. Returns this job's
    result dict; never raises for a job's own error (the traceback goes to its log), only for Ctrl-C."""

    job = Job.from_dict(job_dict)
    report_dir = study_dir if report_dir is None else report_dir
    log = log_path(report_dir, job.key)
    res = {"key": job.key, "id": job.id, "log": str(log), "wall_s": 0.0}
    bad = [k for k in job.deps if (upstream.get(k) or {}).get("status") not in ("done", "ran")]
    if bad:
        u = upstream.get(bad[0]) or {}
        return {**res, "status": "skipped", "error": f"upstream {bad[0]} {u.get('status', 'missing')}"}
    runs = {k: upstream[k]["run"] for k in job.deps}
    log.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    threads = max(1, int(threads or round(float(job.resources.get("num_cpus", 1)) or 1)))

    old_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with open(log, "a") as f, contextlib.redirect_stdout(_Tee(f)), contextlib.redirect_stderr(_Tee(f)):
            print(f"=== {time.strftime('%Y-%m-%d %H:%M:%S')} {job.kind} {job.method} -> {job.key} (id {job.id}, pid "
                  f"{os.getpid()}, host {os.uname().nodename}, torch threads {threads})", flush=True)
            try:
                check_replaceable(study_dir, job, report_dir)
                started = started_path(report_dir, job.key)
                atomic_write_text(started, job.id)
                _run_method(job, study_dir)
                out = output_dir(study_dir, job.key)
                if job.done_file and not (out / job.done_file).is_file():
                    raise RuntimeError(f"the job finished but {out / job.done_file} is missing")
                run = uuid.uuid4().hex
                wall = time.time() - t0
                finished = time.strftime("%Y-%m-%d %H:%M:%S")
                atomic_write_text(out / "log" / MARKER, json.dumps(
                    {"id": job.id, "run": run, "key": job.key, "owner": owner(study_dir, report_dir), "kind": job.kind,
                     "method": job.method, "upstream": runs, "wall_s": round(wall, 2), "finished": finished,
                     "study_run": study_run, "config": job.config}, indent=1, default=str))
                started.unlink(missing_ok=True)
                print(f"=== done in {wall:.1f}s", flush=True)
                return {**res, "status": "ran", "run": run, "wall_s": wall, "finished": finished,
                        "study_run": study_run}
            except KeyboardInterrupt:
                raise
            except BaseException as e:  # noqa: BLE001  (a job's failure must not stop the study)
                traceback.print_exc()
                msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                return {**res, "status": "failed", "error": f"{type(e).__name__}: {msg}", "wall_s": time.time() - t0}
    finally:
        torch.set_num_threads(old_threads)


def shares_inversion(job) -> bool:
    """Whether ``job`` reads a trigger inversion it may share with other runs on its record (its method's
    ``inversion_cache`` need, for its config) without recomputing it (``bti_refresh``)."""
    if job.kind != "defense" or job.config.get("bti_refresh"):
        return False
    m = registry.get(job.kind, job.method)
    return "inversion_cache" in m.needs_of(resolve(m.schema(), job.yaml_path, job.overrides))


def prepare_job(job_dict: dict, study_dir: str, upstream: dict, threads: int | None = None,
                report_dir: str | None = None) -> dict:
    """Compute the cache ``job`` shares with other jobs (its trigger inversion) through the job's own code path, and
    stop there (bdsafety.defenses.base.prepare_only): no output, no marker. The Ray executor runs this before the
    jobs sharing the cache, so that none of them holds a worker while another computes it. Never raises for the job's
    own error: the job itself runs afterwards and reports it."""
    job = Job.from_dict(job_dict)
    report_dir = study_dir if report_dir is None else report_dir
    res = {"key": job.key, "id": job.id}
    if any((upstream.get(k) or {}).get("status") not in ("done", "ran") for k in job.deps):
        return {**res, "status": "skipped"}
    log = log_path(report_dir, job.key)
    log.parent.mkdir(parents=True, exist_ok=True)
    old_threads = torch.get_num_threads()
    torch.set_num_threads(max(1, int(threads or round(float(job.resources.get("num_cpus", 1)) or 1))))
    t0 = time.time()
    try:
        with open(log, "a") as f, contextlib.redirect_stdout(_Tee(f)), contextlib.redirect_stderr(_Tee(f)):
            print(f"=== {time.strftime('%Y-%m-%d %H:%M:%S')} prepare {job.method} -> {job.key}: its shared trigger "
                  f"inversion only (pid {os.getpid()})", flush=True)
            try:
                with prepare_only():
                    _run_method(job, study_dir)
            except Prepared as e:
                what = str(e)  # '': the method ran to its end without a shared cache (nothing written)
                print(f"=== {'prepared ' + what if what else 'nothing to prepare'} in {time.time() - t0:.1f}s",
                      flush=True)
                return {**res, "status": "prepared" if what else "nothing to prepare", "wall_s": time.time() - t0}
            except KeyboardInterrupt:
                raise
            except BaseException as e:  # noqa: BLE001  (the job itself runs next and reports its error)
                print(f"=== prepare failed ({type(e).__name__}: {e}); the job computes what it needs itself",
                      flush=True)
                return {**res, "status": "failed", "wall_s": time.time() - t0}
            return {**res, "status": "nothing to prepare", "wall_s": time.time() - t0}  # not a defense: never here
    finally:
        torch.set_num_threads(old_threads)


def _run_method(job, study_dir) -> None:

    m = registry.get(job.kind, job.method)
    schema = m.schema()
    cfg = resolve(schema, job.yaml_path, job.overrides)
    conf = id_config(cfg, schema)
    if json.dumps(conf, sort_keys=True, default=str) != json.dumps(job.config, sort_keys=True, default=str):
        raise ConfigError(f"{job.yaml_path} changed after the study was planned; run the study again")
    m.run_config(cfg)

