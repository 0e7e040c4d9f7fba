"""Executors: run the jobs that are not up to date, in dependency order.

``local`` runs them one after the other in this process (nothing to start), each with all of this machine's
torch threads (``threads``; the study's num_cpus only matter on Ray). ``ray`` makes each job a Ray task with
the resources the study yaml gives its kind (fractional GPUs let several small jobs share one device) and runs
independent jobs concurrently. It schedules them itself (``schedule``): a job starts when its upstream jobs are done
and the cluster has its resources free, and among the ready jobs the one with the longest estimated chain of work
after it starts first (list scheduling on bdsafety.study.cost's estimates), so a two-hour defense does not wait behind
a queue of one-minute jobs and finish alone at the end. Jobs of one record that share a trigger inversion (BTI-DBF(U),
pam, pam_reinvert) wait for a prepare task that computes it once through the first job's own code path
(``bdsafety.study.execute.prepare_job``), so none of them holds a worker while another computes it. Both executors
call ``bdsafety.study.execute.run_job``, so they write the same outputs.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from bdsafety.errors import ConfigError
from bdsafety.outputs import INVERSION_DIR
from bdsafety.study.cost import (
    DEFAULT_FIGURES,
    SHARED_RESOURCE_FILES,
    inversion_point,
    inversion_seconds,
    job_data,
    job_seconds,
    shared_resource,
)
from bdsafety.study.execute import log_path, prepare_job, run_job, shares_inversion

EXECUTORS = ("local", "ray")
ROOT = Path(__file__).resolve().parent.parent.parent


def run_local(todo: list, current: dict, study_dir: Path, on_result: Callable[[dict], None], threads: int | None = None,
              report_dir: Path | None = None, study_run: dict | None = None,
              time_budget_s: float | None = None) -> dict:
    import torch  # lazy: keeps this module importable without loading torch (CLI --help, study planning)

    threads = threads or torch.get_num_threads()
    results = dict(current)
    data = job_data(todo)
    t0 = time.monotonic()
    for j in todo:
        if time_budget_s is not None and (
                any(results.get(d, {}).get("status") == "deferred" for d in j.deps)
                or time.monotonic() - t0 + local_cost(j, study_dir, data[j.key]) > time_budget_s):
            r = deferred_result(j)
            results[j.key] = r
            on_result(r)
            continue
        r = run_job(j.to_dict(), str(study_dir), {d: results[d] for d in j.deps if d in results}, threads=threads,
                    report_dir=str(report_dir or study_dir), study_run=study_run)
        results[j.key] = r
        on_result(r)
    return results


def local_cost(job, study_dir: Path, data: dict, fig: dict | None = None) -> float:
    """Estimated seconds of ``job`` run now, one job after the other: with the trigger inversion or the attack's
    cached resource it needs unless that is on disk already. Decided when the job comes up, not in advance: an
    earlier job that would have made it may have been deferred (the first sitting of a chunk deferred BTI-DBF(U),
    priced with the inversion, then started PAM, priced without it, which then computed the 55-minute inversion
    itself past the budget)."""
    fig = fig or DEFAULT_FIGURES
    seen_bti = {inversion_point(job)} if inversion_on_disk(job, study_dir) else set()
    shared = _priced_shared(job, fig, data, {}, lambda j: resource_on_disk(j, study_dir))
    try:
        return float(job_seconds(job, fig, data, seen_bti, shared))
    except (KeyError, TypeError, ValueError):
        return fig["job"]


def _ray_task(job: dict, study_dir: str, report_dir: str, study_run: dict | None, upstream: dict):

    return run_job(job, study_dir, upstream, report_dir=report_dir, study_run=study_run)


def _ray_prepare(job: dict, study_dir: str, report_dir: str, upstream: dict):

    return prepare_job(job, study_dir, upstream, report_dir=report_dir)


def inversion_on_disk(job, study_dir: Path) -> bool:
    """Whether the record of ``job`` (a folder of the study) already holds a cached trigger inversion."""
    record = job.point.get("record")
    return bool(record) and any((Path(study_dir) / record / INVERSION_DIR).glob("*.pt"))


def resource_on_disk(job, study_dir: Path) -> bool:
    """Whether the attack resource ``job`` would make (SSBA's encoder, Narcissus's trigger) is already cached under its
    record root (a heuristic, as ``inversion_on_disk``: any cache file of that attack counts)."""
    pattern = SHARED_RESOURCE_FILES.get(job.method)
    root = Path(job.config.get("record_root") or study_dir) / ".cache"
    return job.kind == "attack" and pattern is not None and any(root.glob(pattern))


def resource_builders(todo: list, fig: dict, resource_ready: Callable | None = None) -> dict:
    """job key -> the key of the job it waits for: of the attack jobs of ``todo`` that need the same cached resource
    (``bdsafety.study.cost.shared_resource``: an SSBA encoder, a Narcissus trigger) not yet on disk, one makes it (the
    first attack job, else the first clean reference) and the others start after it, so two workers never make the
    same resource side by side, nor does one sit waiting on the other's file lock."""
    data = job_data(todo)
    groups: dict = {}
    for j in todo:
        if j.kind != "attack" or (resource_ready is not None and resource_ready(j)):
            continue
        try:
            shared = shared_resource(j.method, j.config, fig, data[j.key])
        except (KeyError, TypeError, ValueError):
            shared = None
        if shared is not None:
            groups.setdefault(shared[0], []).append(j)
    out = {}
    for js in groups.values():
        builder = next((j for j in js if j.point.get("role") != "clean"), js[0])
        out.update({j.key: builder.key for j in js if j is not builder})
    return out


def inversion_groups(todo: list) -> dict:
    """record -> the jobs of ``todo`` on it that share a trigger inversion (execute.shares_inversion), where two or more
    do: the Ray executor computes the inversion once, in a prepare task, before any of them starts."""
    groups: dict = {}
    for j in todo:
        if shares_inversion(j):
            groups.setdefault(j.point.get("record"), []).append(j)
    return {r: js for r, js in groups.items() if len(js) > 1}


@dataclass
class Node:
    """One task of the schedule: a job, or the prepare task of an inversion group (``prepare``: its first job)."""

    key: str
    job: object
    deps: list  # keys of the nodes (or already finished jobs) it waits for
    cost: float  # estimated seconds (bdsafety.study.cost)
    cpus: float = 1.0
    gpus: float = 0.0
    prepare: bool = False
    rank: float = field(default=0.0)  # its cost plus the longest chain of costs after it


def build_nodes(todo: list, prepare: bool = True, figures: dict | None = None,
                inversion_ready: Callable | None = None, resource_ready: Callable | None = None) -> list:
    """The schedule's nodes in topological order: every job of ``todo``, and before the first job of each inversion
    group a prepare node that its members wait for (``prepare`` False: no prepare nodes; the first job of a group
    carries the inversion's cost; the local executor prices its jobs with ``local_cost`` instead). Costs from
    bdsafety.study.cost with its default figures (a job the estimate cannot price costs one job start: the order then
    falls back to the plan's), or ``figures``.
    ``inversion_ready(job)``: True where the job's record already holds a cached inversion, which then costs nothing
    (a heuristic: a cache of other settings would still be computed, past the estimate). A resource an attack caches
    across records (SSBA's encoder, Narcissus's surrogate and trigger) is made by one of the jobs needing it, priced
    with it; the others wait for it (``resource_builders``) and are priced without it; where ``resource_ready(job)``
    finds it on disk, nobody waits and nobody pays for it."""
    fig = figures or DEFAULT_FIGURES
    data = job_data(todo)
    builders = resource_builders(todo, fig, resource_ready)
    group_of = {j.key: r for r, js in inversion_groups(todo).items() for j in js} if prepare else {}
    prepared: dict = {}
    seen_inv: set = set()
    nodes = []

    def cost(fn, *args) -> float:
        try:
            return float(fn(*args))
        except (KeyError, TypeError, ValueError):
            return fig["job"]

    for j in todo:
        res = dict(cpus=float(j.resources.get("num_cpus", 1)), gpus=float(j.resources.get("num_gpus", 0)))
        deps = list(j.deps)
        seen_bti: set = seen_inv  # without prepare nodes: the first job needing an inversion pays for it
        if inversion_ready is not None and inversion_ready(j):
            seen_bti = {inversion_point(j)}
        if j.key in group_of:
            g = group_of[j.key]
            if g not in prepared:
                prepared[g] = f"{j.key} (prepare)"
                inv = fig["job"] if inversion_ready is not None and inversion_ready(j) else cost(
                    inversion_seconds, j, fig, data[j.key])
                nodes.append(Node(prepared[g], j, list(j.deps), inv, prepare=True, **res))
            deps.append(prepared[g])
            seen_bti = {inversion_point(j)}  # the inversion is the prepare node's: not in the job's own cost
        shared = _priced_shared(j, fig, data[j.key], builders, resource_ready)
        if j.key in builders:
            deps.append(builders[j.key])
        nodes.append(Node(j.key, j, deps, cost(job_seconds, j, fig, data[j.key], seen_bti, shared), **res))
    nodes = topological(nodes)  # a job waiting for a later job's resource moves after it
    chain_ranks(nodes)
    return nodes


def topological(nodes: list) -> list:
    """``nodes`` reordered so each comes after the nodes it waits for, otherwise in the given order (stable)."""
    keys = {n.key for n in nodes}
    left = list(nodes)
    done: set = set()
    out = []
    while left:
        n = next((n for n in left if all(d in done or d not in keys for d in n.deps)), None)
        if n is None:
            raise ValueError(f"the jobs wait for each other in a cycle: {', '.join(m.key for m in left)}")
        left.remove(n)
        done.add(n.key)
        out.append(n)
    return out


def _priced_shared(job, fig: dict, data: dict, builders: dict, resource_ready: Callable | None) -> set:
    """The resources to leave out of ``job``'s price: its attack's cached resource where the job waits for another to
    make it, or where it is on disk."""
    if job.key not in builders and not (resource_ready is not None and resource_ready(job)):
        return set()
    try:
        shared = shared_resource(job.method, job.config, fig, data)
    except (KeyError, TypeError, ValueError):
        return set()
    return {shared[0]} if shared is not None else set()


def chain_ranks(nodes: list) -> None:
    """Set every node's ``rank``: its cost plus the largest rank among the nodes that wait for it (``nodes`` in
    topological order)."""
    after: dict = {n.key: [] for n in nodes}
    for n in nodes:
        for d in n.deps:
            if d in after:
                after[d].append(n)
    for n in reversed(nodes):
        n.rank = n.cost + max((c.rank for c in after[n.key]), default=0.0)


def schedule(nodes: list, capacity: dict, submit: Callable, wait: Callable, on_done: Callable,
             time_budget_s: float | None = None, clock: Callable[[], float] = time.monotonic) -> list:
    """Run ``nodes`` (topological order, ranks set): start every ready node that fits the free ``capacity``
    ({'cpus', 'gpus'}), the highest rank first (a node that does not fit yet is passed over for a smaller one), then
    wait for one to finish. ``submit(node) -> handle``, ``wait(handles) -> the handle that finished``,
    ``on_done(node, handle)``. ``time_budget_s``: start no node whose estimated cost would end past this many seconds
    from the start (shorter ones still fill the time left). Returns the nodes never started, in plan order."""
    t0 = clock()
    started: set = set()
    keys = {n.key for n in nodes}
    waiting = {n.key: {d for d in n.deps if d in keys} for n in nodes}
    after: dict = {n.key: [] for n in nodes}
    for n in nodes:
        for d in waiting[n.key]:
            after[d].append(n)
    ready = [n for n in nodes if not waiting[n.key]]
    running: dict = {}
    free = {"cpus": float(capacity.get("cpus", 0)), "gpus": float(capacity.get("gpus", 0))}
    while ready or running:
        ready.sort(key=lambda n: -n.rank)  # stable: equal ranks keep the plan's order
        for n in list(ready):
            if time_budget_s is not None and clock() - t0 + n.cost > time_budget_s:
                continue  # held: it would not end within the budget
            if n.cpus <= free["cpus"] + 1e-9 and n.gpus <= free["gpus"] + 1e-9:
                ready.remove(n)
                free["cpus"] -= n.cpus
                free["gpus"] -= n.gpus
                started.add(n.key)
                running[submit(n)] = n
        if not running and time_budget_s is not None:
            break  # what is ready would pass the budget, and nothing running can make more ready
        if not running:
            worst = ready[0]
            raise ConfigError(f"job {worst.key} asks for num_cpus {worst.cpus:g}, num_gpus {worst.gpus:g}, more "
                              f"than the cluster has in all ({capacity}); lower its resources in the study yaml")
        handle = wait(list(running))
        n = running.pop(handle)
        free["cpus"] += n.cpus
        free["gpus"] += n.gpus
        on_done(n, handle)
        for c in after[n.key]:
            waiting[c.key].discard(n.key)
            if not waiting[c.key]:
                ready.append(c)
    return [n for n in nodes if n.key not in started]


def deferred_result(job) -> dict:
    """The result of a job left for the next sitting by the time budget (nothing ran, nothing written)."""
    return {"key": job.key, "id": job.id, "status": "deferred", "wall_s": 0.0,
            "error": "left for the next sitting: it, or a job it waits for, would not end within --time_budget_s "
                     "(bdsafety.study.cost's estimate)"}


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
            num_cpus: int | None = None, report_dir: Path | None = None, study_run: dict | None = None,
            time_budget_s: float | None = None) -> dict:
    report_dir = report_dir or study_dir
    ray, started = start_ray(address, num_cpus)
    try:
        check_resources(ray, todo)
        task, prepare = ray.remote(_ray_task), ray.remote(_ray_prepare)
        total = ray.cluster_resources()
        results = dict(current)

        def submit(n: Node):
            up = {d: results[d] for d in n.deps if d in results}
            opts = dict(num_cpus=n.cpus, num_gpus=n.gpus, name=n.key)
            if n.prepare:  # the console is otherwise silent until the first job after it ends (up to an hour)
                print(f"[study] {n.key}: computing the shared trigger inversion; its jobs wait for it", flush=True)
                return prepare.options(**opts, max_retries=0).remote(n.job.to_dict(), str(study_dir), str(report_dir),
                                                                      up)
            return task.options(**opts, max_retries=1).remote(n.job.to_dict(), str(study_dir), str(report_dir),
                                                               study_run, up)

        def wait(refs: list):
            return ray.wait(refs, num_returns=1)[0][0]

        def on_done(n: Node, ref) -> None:
            j = n.job
            try:
                r = ray.get(ref)
            except Exception as e:  # the worker died (killed, out of memory, node lost): the job failed
                if n.prepare:  # its jobs compute the inversion themselves
                    results[n.key] = {"key": n.key, "status": "failed", "wall_s": 0.0}
                    print(f"[study] {n.key}: the shared trigger inversion failed ({type(e).__name__}); each of its "
                          f"jobs computes it itself", flush=True)
                    return
                bad = [d for d in j.deps if results.get(d, {}).get("status") not in ("done", "ran")]
                r = ({"key": j.key, "id": j.id, "status": "skipped", "error": f"upstream {bad[0]} failed",
                      "wall_s": 0.0, "log": str(log_path(report_dir, j.key))} if bad else
                     {"key": j.key, "id": j.id, "status": "failed", "error": f"Ray task failed: {type(e).__name__}: "
                      f"{str(e).strip().splitlines()[0] if str(e).strip() else ''}", "wall_s": 0.0,
                      "log": str(log_path(report_dir, j.key))})
            results[n.key] = r
            if n.prepare:
                print(f"[study] {n.key}: shared trigger inversion {r.get('status')} in {r.get('wall_s') or 0:.0f}s",
                      flush=True)
            else:
                on_result(r)

        nodes = build_nodes(todo, inversion_ready=lambda j: inversion_on_disk(j, study_dir),
                            resource_ready=lambda j: resource_on_disk(j, study_dir))
        left = schedule(nodes, {"cpus": total.get("CPU", 0), "gpus": total.get("GPU", 0)}, submit, wait, on_done,
                        time_budget_s=time_budget_s)
        for n in left:
            if not n.prepare:
                results[n.key] = deferred_result(n.job)
                on_result(results[n.key])
        return {k: v for k, v in results.items() if not k.endswith(" (prepare)")}
    finally:
        if started:
            ray.shutdown()
