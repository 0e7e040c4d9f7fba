"""Seconds per epoch per 1,000 images of candidate architectures on this CPU, and from them the wall time of a study.

Measured (``--threads`` torch threads, 1 = what one Ray worker with num_cpus 1 uses):
  train  engine.fit on synthetic images (the attacks' augmentation), seconds per epoch per 1,000 images
  eval   engine.evaluate_loss_acc, seconds per 1,000 images
  bti    one step of BTI-DBF's official U-Net generator through the classifier (forward + backward of both), per
         1,000 images (the inversion stages of BTI-DBF / PAM)
  ssba   one step of SSBA's StegaStamp encoder + decoder, per 1,000 images
  job    a fresh Python process importing bdsafety and torch (each Ray task reuses its worker process, so this is
         an upper bound of the per-job start cost)

The estimate walks the study's planned jobs (``build_plan``: every job's resolved config) and adds, per job, the
images it trains on and evaluates, priced with the figures above:
  attack     epochs x n_train training + (epochs / eval_every) x 2 test sets evaluated; SSBA: its encoder once
             (cached per ssba_* settings, shared by the seeds)
  clean      the same with pratio 0
  defense    epochs (x n_rounds) x ratio x n_train training + its evaluations; BTI-DBF / PAM: the inversion
             (bti_pretrain + bti_mask + bti_gen epochs x reserved images x the bti figure) once per seed and model
             (cached and shared), pam_reinvert: mask + generator again every round after the first
  ra / qra   epochs x its training set + evaluations
  lmc        points x (a BN recompute pass over the reserved data + 2 test sets)
and divides the sum by the number of parallel workers (the grid's independent chains keep 2 workers busy except at
its start and end). It is an estimate, stated as one: the attack's poisoning and the defenses' extra passes (EP's
unlearning, FST's feature term) are not priced.

    python benchmarks/study_budget.py --models cnn_tiny cnn_small --threads 1 \
        --yaml_path config/study/bench_cifar10size.yaml --workers 2
"""
from __future__ import annotations

import argparse
import math
import os
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

from bdsafety import engine
from bdsafety.data.device import DeviceDataset, Normalizer
from bdsafety.data.synthetic import make_synthetic
from bdsafety.models import build_model


def _timed(fn, repeats: int) -> float:
    """Best wall time of ``repeats`` calls (the best is the least disturbed by other load on a shared machine)."""
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def classifier_figures(model_name: str, n: int = 3000, repeats: int = 2) -> dict:
    """Seconds per epoch per 1,000 images (train) and seconds per 1,000 images (eval) of ``model_name``."""
    data = make_synthetic(n_train=n, n_test=10, seed=0, difficulty=0.5)
    model = build_model(model_name, 10)
    norm = Normalizer(data.info)
    ds = DeviceDataset(data.train_x, data.train_y)
    opt = engine.make_optimizer(model.parameters(), "sgd", 0.01, 0.9, 5e-4)
    gen = engine.seed_everything(0)

    def train():
        engine.fit(model, ds, norm=norm, epochs=1, batch_size=128, step_fn=engine.sgd_step(opt), optimizer=opt,
                   hflip=False, generator=gen, progress=False)

    train()  # warm-up
    return {"train": _timed(train, repeats) / n * 1000,
            "eval": _timed(lambda: engine.evaluate_loss_acc(model, ds, norm), repeats) / n * 1000}


def bti_figure(model_name: str, base: int = 32, depth: int = 4, batch: int = 128, steps: int = 3) -> float:
    """Seconds per 1,000 images of one BTI-DBF generator step (the official U-Net) through ``model_name``."""
    from bdsafety.defenses.bti import OfficialUNet

    G = OfficialUNet(3, base, depth)
    clf = build_model(model_name, 10).eval().requires_grad_(False)
    opt = torch.optim.Adam(G.parameters(), 1e-3)
    x = torch.rand(batch, 3, 32, 32)

    def step():
        opt.zero_grad(set_to_none=True)
        g = G(x)
        loss = (g - x).pow(2).mean() + F.kl_div(F.log_softmax(clf(g), 1), F.softmax(clf(x), 1), reduction="batchmean")
        loss.backward()
        opt.step()

    step()
    return _timed(lambda: [step() for _ in range(steps)], 1) / (steps * batch) * 1000


def ssba_figure(width: int, bits: int = 100, batch: int = 64, steps: int = 3) -> float:
    """Seconds per 1,000 images of one SSBA encoder + decoder training step."""
    from bdsafety.attacks.ssba import SSBADecoder, SSBAEncoder

    enc, dec = SSBAEncoder((32, 32, 3), bits, width), SSBADecoder((32, 32, 3), bits, width)
    opt = torch.optim.Adam(list(enc.parameters()) + list(dec.parameters()), 1e-3)
    x, secret = torch.rand(batch, 3, 32, 32), torch.randint(0, 2, (batch, bits)).float()

    def step():
        opt.zero_grad(set_to_none=True)
        res = enc(x, secret)
        (F.binary_cross_entropy_with_logits(dec((x + res).clamp(0, 1)), secret) + res.pow(2).mean()).backward()
        opt.step()

    step()
    return _timed(lambda: [step() for _ in range(steps)], 1) / (steps * batch) * 1000


def job_start_seconds() -> float:
    code = "import torch, bdsafety.study.execute, bdsafety.registry as r; r.names('defense')"
    return _timed(lambda: subprocess.run([sys.executable, "-c", code], check=True), 2)


def _evals(cfg: dict, epochs: int, n_test: int) -> float:
    """Images evaluated by a training run that evaluates the clean and the backdoor test set every eval_every epochs."""
    every = int(cfg.get("eval_every") or 1)
    return math.ceil(epochs / every) * 2 * n_test


def job_seconds(job, fig: dict, data: dict, seen_bti: set, seen_ssba: set) -> float:
    """Estimated seconds of one planned job (see the module docstring for what is priced)."""
    c, kind, m = job.config, job.kind, job.method
    n_train, n_test = data["n_train"], data["n_test"]
    tr, ev = fig["train"] / 1000, fig["eval"] / 1000
    sec = fig["job"]
    if kind == "attack":
        e = int(c["epochs"])
        sec += e * n_train * tr + _evals(c, e, n_test) * ev
        key = tuple(sorted((k, v) for k, v in c.items() if k.startswith("ssba_")))
        if m == "ssba" and key not in seen_ssba:
            seen_ssba.add(key)
            sec += int(c["ssba_steps"]) * int(c["ssba_batch_size"]) * fig["ssba"] / 1000
        return sec
    if kind == "defense":
        reserved = float(c.get("ratio", 0.05)) * n_train
        rounds, e = int(c.get("n_rounds", 1)), int(c.get("epochs", 10))
        sec += rounds * e * reserved * tr + rounds * _evals(c, e, n_test) * ev
        if "bti_pretrain_epochs" in c:
            # generator epochs run G and the classifier (the bti figure); the mask epochs only the classifier
            mask = int(c["bti_mask_epochs"]) * reserved * tr
            gen = int(c["bti_gen_epochs"]) * reserved * fig["bti"] / 1000
            point = (job.point.get("attack"), job.point.get("model"), job.point.get("seed"), job.point.get("pratio"))
            if point not in seen_bti:  # one inversion per model, shared by bti_dbf, pam, pam_reinvert
                seen_bti.add(point)
                sec += int(c["bti_pretrain_epochs"]) * reserved * fig["bti"] / 1000 + mask + gen
            if c.get("retrain_generator"):  # every round after the first re-learns the mask and retrains G
                sec += (rounds - 1) * (mask + gen)
        return sec
    if kind == "retune":
        n = int(c.get("clean_num", 0)) + int(c.get("poison_num", 0)) if m == "qra" else float(c["ratio"]) * n_train
        e = int(c["epochs"])
        return sec + e * n * tr + _evals(c, e, n_test) * ev
    if kind == "analysis":
        reserved = float(c.get("ratio", 0.05)) * n_train
        return sec + int(c.get("points", 21)) * (reserved + 2 * n_test) * ev
    return sec


def estimate(yaml_path: str, figs: dict, workers: int) -> None:
    from bdsafety.study.plan import build_plan
    from bdsafety.study.spec import load_study

    plan = build_plan(load_study(yaml_path))
    by_kind: dict[str, list] = {}
    by_model: dict[str, float] = {}
    seen_bti: set = set()
    seen_ssba: set = set()
    for job in plan.jobs:
        c = job.config
        data = {"n_train": int(c.get("synthetic_n_train") or 50000), "n_test": int(c.get("synthetic_n_test") or 10000)}
        if job.kind == "attack":
            by_model[job.key] = data  # the data of every job downstream of this record
        model = job.point.get("model")
        if model not in figs:
            continue
        for dep in job.deps:
            data = by_model.get(dep, data)
        s = job_seconds(job, figs[model], data, seen_bti, seen_ssba)
        by_kind.setdefault(f"{job.kind}:{job.method}", []).append(s)
    total = sum(sum(v) for v in by_kind.values())
    print(f"\nestimate for {yaml_path} ({sum(len(v) for v in by_kind.values())} jobs):")
    print(f"{'kind:method':28s} {'jobs':>5s} {'CPU-h':>7s}")
    for k, v in sorted(by_kind.items(), key=lambda kv: -sum(kv[1])):
        print(f"{k:28s} {len(v):5d} {sum(v) / 3600:7.2f}")
    print(f"total {total / 3600:.2f} worker-hours; with {workers} workers about {total / workers / 3600:.1f} h wall")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["cnn_tiny", "cnn_small"])
    p.add_argument("--threads", type=int, default=1, help="torch threads (a one-CPU Ray worker uses 1)")
    p.add_argument("--yaml_path", default=None, help="a study yaml to estimate (its models must be among --models)")
    p.add_argument("--workers", type=int, default=2, help="parallel jobs of the study (Ray workers)")
    p.add_argument("--ssba_width", type=int, default=32)
    p.add_argument("--bti_unet_base", type=int, default=32, help="width of the BTI-DBF generator (official: 32)")
    p.add_argument("--figures", default=None, metavar="K=V,...",
                   help="skip the measurements: price the study with these figures of every --models entry, e.g. "
                        "train=0.38,eval=0.21,bti=16.5,ssba=5.8,job=3.4 (the table's units)")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    if a.figures:
        given = {k: float(v) for k, v in (kv.split("=") for kv in a.figures.split(","))}
        estimate(a.yaml_path, {name: given for name in a.models}, a.workers)
        return
    print(f"torch threads {a.threads}, load average at start {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    start = job_start_seconds()
    ssba = ssba_figure(a.ssba_width)
    print(f"job start (fresh process, imports): {start:.1f} s; SSBA encoder step (width {a.ssba_width}): "
          f"{ssba:.2f} s per 1,000 images")
    print(f"{'model':14s} {'train s/epoch/1k':>17s} {'eval s/1k':>10s} {'bti s/1k':>9s} {'50k epoch s':>12s}")
    figs = {}
    for name in a.models:
        f = classifier_figures(name)
        f.update(bti=bti_figure(name, a.bti_unet_base), ssba=ssba, job=start)
        figs[name] = f
        print(f"{name:14s} {f['train']:17.2f} {f['eval']:10.3f} {f['bti']:9.2f} {f['train'] * 50:12.0f}", flush=True)
    if a.yaml_path:
        estimate(a.yaml_path, figs, a.workers)


if __name__ == "__main__":
    main()
