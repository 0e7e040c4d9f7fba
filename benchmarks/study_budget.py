"""Seconds per epoch per 1,000 images of candidate architectures on this CPU, and from them the wall time of a study.

Measured (``--threads`` torch threads, 1 = what one Ray worker with num_cpus 1 uses):
  train  engine.fit on synthetic images (the attacks' augmentation), seconds per epoch per 1,000 images
  eval   engine.evaluate_loss_acc, seconds per 1,000 images
  bti    one step of BTI-DBF's official U-Net generator through the classifier (forward + backward of both), per
         1,000 images (the inversion stages of BTI-DBF / PAM)
  ssba   one step of SSBA's StegaStamp encoder + decoder, per 1,000 images
  job    a fresh Python process importing bdsafety and torch (each Ray task reuses its worker process, so this is
         an upper bound of the per-job start cost)

The estimate walks the study's planned jobs (``build_plan``: every job's resolved config) and prices each with the
figures above (bdsafety.study.cost: what is priced and what is not), then divides the sum by the number of parallel
workers (the grid's independent chains keep 2 workers busy except at its start and end). It is an estimate, stated
as one.

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
from bdsafety.study.cost import job_data, job_seconds


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


def simulate(nodes: list, workers: int, order: str) -> float:
    """Estimated wall time of ``nodes`` on ``workers`` one-CPU workers, through the Ray executor's own scheduler
    (bdsafety.study.executors.schedule) on a simulated clock: ``order`` 'chain' = its longest-chain-first order,
    'plan' = first ready, first started in the plan's order (roughly what Ray does when it is given every task)."""
    from bdsafety.study.executors import schedule

    if order == "plan":
        for i, n in enumerate(nodes):
            n.rank = -i
    clock, ends = [0.0], {}

    def submit(n):
        ends[n.key] = clock[0] + n.cost
        return n.key

    def wait(handles):
        k = min(handles, key=ends.get)
        clock[0] = ends.pop(k)
        return k

    schedule(nodes, {"cpus": workers, "gpus": 0}, submit, wait, lambda n, h: None, clock=lambda: clock[0])
    return clock[0]


def estimate(yaml_path: str, figs: dict, workers: int, attacks=None, seeds=None) -> None:
    from bdsafety.study.executors import build_nodes
    from bdsafety.study.plan import build_plan
    from bdsafety.study.runner import narrow
    from bdsafety.study.spec import load_study

    plan = build_plan(narrow(load_study(yaml_path), attacks, seeds))
    by_kind: dict[str, list] = {}
    data = job_data(plan.jobs)
    seen_bti: set = set()
    seen_shared: set = set()
    for job in plan.jobs:
        model = job.point.get("model")
        if model not in figs:
            continue
        s = job_seconds(job, figs[model], data[job.key], seen_bti, seen_shared)
        by_kind.setdefault(f"{job.kind}:{job.method}", []).append(s)
    total = sum(sum(v) for v in by_kind.values())
    print(f"\nestimate for {yaml_path} ({sum(len(v) for v in by_kind.values())} jobs):")
    print(f"{'kind:method':28s} {'jobs':>5s} {'CPU-h':>7s}")
    for k, v in sorted(by_kind.items(), key=lambda kv: -sum(kv[1])):
        print(f"{k:28s} {len(v):5d} {sum(v) / 3600:7.2f}")
    print(f"total {total / 3600:.2f} worker-hours; with {workers} workers about {total / workers / 3600:.1f} h wall")
    model = next(iter(figs))
    walls = {o: simulate(build_nodes(plan.jobs, figures=figs[model]), workers, o) / 3600
             for o in ("chain", "plan")}
    path = max(n.rank for n in build_nodes(plan.jobs, figures=figs[model])) / 3600
    print(f"simulated on {workers} one-CPU workers (the Ray executor's scheduler, estimated job times, {model}): "
          f"longest chain first {walls['chain']:.2f} h, plan order {walls['plan']:.2f} h; lower bound "
          f"max(work / workers {total / workers / 3600:.2f} h, longest chain {path:.2f} h)")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["cnn_tiny", "cnn_small"])
    p.add_argument("--threads", type=int, default=1, help="torch threads (a one-CPU Ray worker uses 1)")
    p.add_argument("--yaml_path", default=None, help="a study yaml to estimate (its models must be among --models)")
    p.add_argument("--workers", type=int, default=2, help="parallel jobs of the study (Ray workers)")
    p.add_argument("--attacks", default=None, help="estimate only these attacks (comma-separated), as run_study's")
    p.add_argument("--seeds", default=None, help="estimate only these seeds (comma-separated), as run_study's")
    p.add_argument("--ssba_width", type=int, default=32)
    p.add_argument("--bti_unet_base", type=int, default=32, help="width of the BTI-DBF generator (official: 32)")
    p.add_argument("--figures", default=None, metavar="K=V,...",
                   help="skip the measurements: price the study with these figures of every --models entry, e.g. "
                        "train=0.38,eval=0.21,bti=16.5,ssba=5.8,job=3.4 (the table's units)")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    chunk = ([v.strip() for v in a.attacks.split(",")] if a.attacks else None,
             [int(v) for v in a.seeds.split(",")] if a.seeds else None)
    if a.figures:
        given = {k: float(v) for k, v in (kv.split("=") for kv in a.figures.split(","))}
        estimate(a.yaml_path, {name: given for name in a.models}, a.workers, *chunk)
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
        estimate(a.yaml_path, figs, a.workers, *chunk)


if __name__ == "__main__":
    main()
