"""What a planned job costs, estimated from its resolved config: the images it trains on and evaluates, priced with
seconds-per-1,000-images figures. One place for the estimate that ``benchmarks/study_budget.py`` prints (with figures
it measures) and the Ray executor uses to start the longest chains first (with the defaults below; only the order of
the estimates matters there).

Priced, per job (``job_seconds``):
  attack     epochs x n_train training + (epochs / eval_every) x 2 test sets evaluated; the resources an attack
             caches across records, once each (``shared_resource``): SSBA's encoder (per ssba_* settings, shared by
             the seeds), Narcissus's surrogate, warm-up and trigger (per narcissus_* settings and data size)
  clean      the same with pratio 0
  defense    epochs (x n_rounds) x ratio x n_train training + its evaluations; BTI-DBF / PAM: the inversion
             (bti_pretrain + bti_mask + bti_gen epochs x reserved images x the bti figure) once per seed and model
             (cached and shared), pam_reinvert / BTI-DBF(U): mask + generator again every round after the first
  ra / qra   epochs x its training set + evaluations
  lmc        points x (a BN recompute pass over the reserved data + 2 test sets)
plus a job's start. Not priced: the attack's poisoning and the defenses' extra passes (EP's unlearning, FST's feature
term). Data sizes come from the attack's synthetic_n_train / synthetic_n_test, else CIFAR-10's 50,000 / 10,000.
"""
from __future__ import annotations

import math

# seconds per 1,000 images (train: per epoch) of cnn_tiny on one thread of the project's 2-core CPU, load 2.5
# (benchmarks/README.md, "The CIFAR-10-size benchmark"); job: a fresh process's start
DEFAULT_FIGURES = {"train": 0.38, "eval": 0.21, "bti": 16.5, "ssba": 5.8, "job": 3.4}
DEFAULT_DATA = {"n_train": 50000, "n_test": 10000}


def _evals(cfg: dict, epochs: int, n_test: int) -> float:
    """Images evaluated by a training run that evaluates the clean and the backdoor test set every eval_every epochs."""
    every = int(cfg.get("eval_every") or 1)
    return math.ceil(epochs / every) * 2 * n_test


def inversion_point(job) -> tuple:
    """The grid point whose model one inversion serves (bti_dbf, pam and pam_reinvert on it share it)."""
    p = job.point
    return p.get("attack"), p.get("model"), p.get("seed"), p.get("pratio"), p.get("dataset")


def inversion_seconds(job, fig: dict, data: dict) -> float:
    """The shared round-1 trigger inversion of a BTI-DBF / PAM job (0 for any other job)."""
    c = job.config
    if job.kind != "defense" or "bti_pretrain_epochs" not in c:
        return 0.0
    reserved = float(c.get("ratio", 0.05)) * data["n_train"]
    mask = int(c["bti_mask_epochs"]) * reserved * fig["train"] / 1000
    gen = int(c["bti_gen_epochs"]) * reserved * fig["bti"] / 1000
    return int(c["bti_pretrain_epochs"]) * reserved * fig["bti"] / 1000 + mask + gen


# where an attack's cached resource lies once made, under <record_root>/.cache/ (the last file each one writes)
SHARED_RESOURCE_FILES = {"ssba": "ssba/*.pt", "narcissus": "narcissus/trigger_*.pt"}
# images of a public out-of-distribution set Narcissus's surrogate may learn (its train split; others: n_train)
POOD_SIZES = {"tiny": 100000}
NUM_CLASSES = 10  # the estimate's class count (CIFAR-10-like data) where a job's config does not give one


def shared_resource(method: str, c: dict, fig: dict, data: dict) -> tuple[tuple, float] | None:
    """(cache key, seconds) of what an attack job makes once and caches for every record of the same settings: SSBA's
    encoder (ssba_steps x ssba_batch_size images at the ssba figure); Narcissus's surrogate (surrogate epochs over
    the POOD images plus the target class), warm-up and trigger generation (each round a pass over the target class
    with an input gradient, priced as a training pass; the early stop is not priced). None for other attacks."""
    if method == "ssba":
        key = tuple(sorted((k, v) for k, v in c.items() if k.startswith("ssba_")))
        return ("ssba", *key), int(c.get("ssba_steps", 0)) * int(c.get("ssba_batch_size", 0)) * fig["ssba"] / 1000
    if method == "narcissus":
        n_target = data["n_train"] / NUM_CLASSES
        pood = c.get("narcissus_pood_n") or POOD_SIZES.get(c.get("narcissus_pood"), data["n_train"] - n_target)
        images = (int(c.get("narcissus_surrogate_epochs", 200)) * (float(pood) + n_target)
                  + (int(c.get("narcissus_warmup_epochs", 5)) + int(c.get("narcissus_gen_rounds", 1000))) * n_target)
        key = tuple(sorted((k, str(v)) for k, v in c.items() if k.startswith("narcissus_")))
        return ("narcissus", data["n_train"], *key), images * fig["train"] / 1000
    return None


def job_seconds(job, fig: dict, data: dict, seen_bti: set, seen_shared: set) -> float:
    """Estimated seconds of one planned job. ``seen_bti`` / ``seen_shared``: the shared caches already priced (an
    inversion, or an attack's cached resource such as SSBA's encoder, is counted for the first job that needs it;
    pass a set holding the job's point to leave its inversion out)."""
    c, kind, m = job.config, job.kind, job.method
    n_train, n_test = data["n_train"], data["n_test"]
    tr, ev = fig["train"] / 1000, fig["eval"] / 1000
    sec = fig["job"]
    if kind == "attack":
        e = int(c.get("epochs", 100))
        sec += e * n_train * tr + _evals(c, e, n_test) * ev
        shared = shared_resource(m, c, fig, data)
        if shared is not None and shared[0] not in seen_shared:
            seen_shared.add(shared[0])
            sec += shared[1]
        return sec
    if kind == "defense":
        reserved = float(c.get("ratio", 0.05)) * n_train
        rounds, e = int(c.get("n_rounds", 1)), int(c.get("epochs", 10))
        sec += rounds * e * reserved * tr + rounds * _evals(c, e, n_test) * ev
        if "bti_pretrain_epochs" in c:
            point = inversion_point(job)
            if point not in seen_bti:  # one inversion per model, shared by bti_dbf, pam, pam_reinvert
                seen_bti.add(point)
                sec += inversion_seconds(job, fig, data)
            if c.get("retrain_generator"):  # every round after the first re-learns the mask and retrains G
                mask = int(c["bti_mask_epochs"]) * reserved * tr
                gen = int(c["bti_gen_epochs"]) * reserved * fig["bti"] / 1000
                sec += (rounds - 1) * (mask + gen)
        return sec
    if kind == "retune":
        if m == "qra":
            n = int(c.get("clean_num", 0)) + int(c.get("poison_num", 0))
        else:
            n = float(c.get("ratio", 0.02)) * n_train
        e = int(c.get("epochs", 5))
        return sec + e * n * tr + _evals(c, e, n_test) * ev
    if kind == "analysis":
        reserved = float(c.get("ratio", 0.05)) * n_train
        return sec + int(c.get("points", 21)) * (reserved + 2 * n_test) * ev
    return sec


def job_data(jobs: list) -> dict:
    """key -> {'n_train', 'n_test'} of every job: the sizes its attack (or clean) record was made with, passed down
    the dependencies; CIFAR-10's where a job has no such upstream in ``jobs`` (a found record, a real dataset)."""
    out: dict = {}
    for job in jobs:  # topological order
        c = job.config
        if job.kind == "attack":
            data = {"n_train": int(c.get("synthetic_n_train") or DEFAULT_DATA["n_train"]),
                    "n_test": int(c.get("synthetic_n_test") or DEFAULT_DATA["n_test"])}
        else:
            data = next((out[d] for d in job.deps if d in out), DEFAULT_DATA)
        out[job.key] = data
    return out
