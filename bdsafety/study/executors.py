"""Executors: run the jobs that are not up to date, in dependency order.

``local`` runs them one after the other in this process (nothing to start), each with all of this machine's
torch threads (``threads``; the study's num_cpus only matter on Ray). ``ray`` makes each job a Ray task with
the resources the study yaml gives its kind (fractional GPUs let several small jobs share one device); a job's
upstream results are passed to it as Ray object refs, so Ray starts it when they are ready and independent jobs
run concurrently. Jobs of one record that share a trigger inversion (BTI-DBF(U), pam, pam_reinvert) wait, in Ray's
queue rather than on a worker, for a prepare task that computes it once through the first job's own code path
(``bdsafety.study.execute.prepare_job``). Both executors call ``bdsafety.study.execute.run_job``, so they write the
same outputs.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

from bdsafety.errors import ConfigError
from bdsafety.study.execute import log_path, prepare_job, run_job, shares_inversion

EXECUTORS = ("local", "ray")
ROOT = Path(__file__).resolve().parent.parent.parent


def run_local(todo: list, current: dict, study_dir: Path, on_result: Callable[[dict], None], threads: int | None = None,
              report_dir: Path | None = None, study_run: dict | None = None) -> dict:
    import torch  # lazy: keeps this module importable without loading torch (CLI --help, study planning)

    threads = threads or torch.get_num_threads()
    results = dict(current)
    for j in todo:
        r = run_job(j.to_dict(), str(study_dir), {d: results[d] for d in j.deps if d in results}, threads=threads,
                    report_dir=str(report_dir or study_dir), study_run=study_run)
        results[j.key] = r
        on_result(r)
    return results


def _ray_task(job: dict, study_dir: str, report_dir: str, study_run: dict | None, static_up: dict, dyn_keys: list,
              *dyn_results):

    return run_job(job, study_dir, {**static_up, **dict(zip(dyn_keys, dyn_results))}, report_dir=report_dir,
                   study_run=study_run)


def _ray_prepare(job: dict, study_dir: str, report_dir: str, static_up: dict, dyn_keys: list, *dyn_results):

    return prepare_job(job, study_dir, {**static_up, **dict(zip(dyn_keys, dyn_results))}, report_dir=report_dir)


def inversion_groups(todo: list) -> dict:
    """record -> the jobs of ``todo`` on it that share a trigger inversion (execute.shares_inversion), where two or more
    do: the Ray executor computes the inversion once, in a prepare task, before any of them starts."""
    groups: dict = {}
    for j in todo:
        if shares_inversion(j):
            groups.setdefault(j.point.get("record"), []).append(j)
    return {r: js for r, js in groups.items() if len(js) > 1}


def start_ray(address: str | None = None, num_cpus: int | None = None):
    """Join the cluster at ``address`` (``ray start --head`` printed it; 'auto' finds a local one), or start a local
    Ray instance. Workers import this checkout's bdsafety (PYTHONPATH), so every node needs it at the same path."""
    try:
        import ray  # lazy: ray is needed only by the ray executor
    except ImportError:
        raise ConfigError("--executor ray needs the ray package: pip install 'ray>=2.9' (it is in "
                          "requirements.txt)") from None
    if ray.is_initialized():
        return ray, False
    path = os.pathsep.join([str(ROOT)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])
    env = {"PYTHONPATH": path, "BDSAFETY_STUDY_WORKER": "1"}
    kw = dict(runtime_env={"env_vars": env}, include_dashboard=False, log_to_driver=False, configure_logging=False)
    if num_cpus is not None and num_cpus < 1:
        raise ConfigError(f"--ray_num_cpus must be an integer >= 1, got {num_cpus}")
    try:
        if address:
            ray.init(address=address, **kw)
        else:
            ray.init(num_cpus=num_cpus, **kw)
    except ConnectionError as e:
        raise ConfigError(f"could not join the Ray cluster at {address}: {str(e).splitlines()[0]}. Start it first (ray "
                          f"start --head prints the address), check the address, or leave out --ray_address to start a "
                          f"local Ray instance") from None
    return ray, True


def check_resources(ray, todo: list) -> None:
    """Refuse jobs no node can ever hold (Ray would wait for them forever)."""
    total = ray.cluster_resources()
    for res, name in (("num_cpus", "CPU"), ("num_gpus", "GPU")):
        need = max((float(j.resources.get(res, 0)) for j in todo), default=0)
        have = float(total.get(name, 0))
        if need > have:
            worst = max(todo, key=lambda j: float(j.resources.get(res, 0)))
            raise ConfigError(f"job {worst.key} asks for {res} {need:g} but the Ray cluster has {have:g} {name} in "
                              f"all; lower resources.{worst.kind}.{res} in the study yaml (or "
                              f"resources.default) or add nodes")


def run_ray(todo: list, current: dict, study_dir: Path, on_result: Callable[[dict], None], address: str | None = None,
            num_cpus: int | None = None, report_dir: Path | None = None, study_run: dict | None = None) -> dict:
    report_dir = report_dir or study_dir
    ray, started = start_ray(address, num_cpus)
    try:
        check_resources(ray, todo)
        task, prepare = ray.remote(_ray_task), ray.remote(_ray_prepare)
        refs, key_of = {}, {}
        # jobs sharing a trigger inversion (BTI-DBF(U), pam, pam_reinvert on one record): a prepare task computes it
        # first, through the first job's own code path; the jobs wait for it in Ray's queue, not on a worker
        group_of = {j.key: r for r, js in inversion_groups(todo).items() for j in js}
        prepared: dict = {}
        for j in todo:
            static_up = {d: current[d] for d in j.deps if d in current}
            dyn = [d for d in j.deps if d in refs]
            opts = dict(num_cpus=float(j.resources.get("num_cpus", 1)), num_gpus=float(j.resources.get("num_gpus", 0)))
            extra = []
            if j.key in group_of:
                g = group_of[j.key]
                if g not in prepared:
                    prepared[g] = prepare.options(**opts, name=f"{j.key} (prepare)", max_retries=0).remote(
                        j.to_dict(), str(study_dir), str(report_dir), static_up, dyn, *[refs[d] for d in dyn])
                extra = [prepared[g]]
            ref = task.options(**opts, name=j.key, max_retries=1).remote(
                j.to_dict(), str(study_dir), str(report_dir), study_run, static_up, dyn + ["(prepare)"] * len(extra),
                *[refs[d] for d in dyn], *extra)
            refs[j.key] = ref
            key_of[ref] = j
        results = dict(current)
        pending = list(refs.values())
        while pending:
            ready, pending = ray.wait(pending, num_returns=1)
            j = key_of[ready[0]]
            try:
                r = ray.get(ready[0])
            except Exception as e:  # the worker died (killed, out of memory, node lost): the job failed

                bad = [d for d in j.deps if results.get(d, {}).get("status") not in ("done", "ran")]
                r = ({"key": j.key, "id": j.id, "status": "skipped", "error": f"upstream {bad[0]} failed",
                      "wall_s": 0.0, "log": str(log_path(report_dir, j.key))} if bad else
                     {"key": j.key, "id": j.id, "status": "failed", "error": f"Ray task failed: {type(e).__name__}: "
                      f"{str(e).strip().splitlines()[0] if str(e).strip() else ''}", "wall_s": 0.0,
                      "log": str(log_path(report_dir, j.key))})
            results[j.key] = r
            on_result(r)
        return results
    finally:
        if started:
            ray.shutdown()
