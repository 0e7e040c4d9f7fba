"""How far is training from what this machine can do? Achieved FLOP/s of the engine's training step and of evaluation,
against the machine's measured peak for the same kind of work, in one run.

    python benchmarks/compute_peak.py                                   # CPU, the demo and benchmark models
    python benchmarks/compute_peak.py --models cnn_small resnet18_cifar --device cuda --steps 50

Peak: the best of a large fp32 matmul (n x n @ n x n, 2 n^3 FLOPs) and a large 3x3 convolution (the shape of a
ResNet stage: batch 256, 64 -> 64 channels, 32 x 32; contiguous and channels-last), forward only, timed in this process
with the same torch threads. Work: FLOPs per image counted by torch.utils.flop_counter.FlopCounterMode (matmuls and
convolutions, forward and backward; elementwise work is not counted, so the achieved fraction is a slight underestimate
of the hardware's real use), times images/s of (a) the engine's training step (the batch's on-device crop + flip +
normalise, forward, backward, SGD step: what engine.fit runs) and (b) evaluation under inference mode at the evaluation
batch size. Nothing here runs in CI; the figures and the machine's load average at the start go to benchmarks/README.md.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _timed(fn, device: str, reps: int, warmup: int = 2) -> float:
    """Median seconds of ``fn()`` over ``reps`` runs after ``warmup``."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


@torch.inference_mode()
def peak(device: str, n: int, reps: int) -> dict:
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    mm = 2 * n**3 / _timed(lambda: a @ b, device, reps)
    conv = torch.nn.Conv2d(64, 64, 3, padding=1, bias=False).to(device)
    x = torch.randn(256, 64, 32, 32, device=device)
    conv_flops = 2 * 256 * 64 * 64 * 9 * 32 * 32
    cv = conv_flops / _timed(lambda: conv(x), device, reps)
    conv_cl, x_cl = conv.to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)
    cl = conv_flops / _timed(lambda: conv_cl(x_cl), device, reps)  # the engine's layout (bdsafety.engine.prepare_model)
    return {"matmul": mm, "conv3x3": cv, "conv3x3_cl": cl, "peak": max(mm, cv, cl)}


def flops_per_image(model, size: int, device: str, train: bool) -> float:
    x = torch.randn(8, 3, size, size, device=device)
    model.train(train)
    with FlopCounterMode(display=False) as fc:
        out = model(x)
        if train:
            out.float().sum().backward()
    model.zero_grad(set_to_none=True)
    return fc.get_total_flops() / len(x)


def measure(name: str, device: str, batch: int, eval_batch: int, steps: int, size: int) -> dict:
    from bdsafety import engine
    from bdsafety.data.device import DeviceDataset, Normalizer, iterate_batches
    from bdsafety.data.info import DATASETS
    from bdsafety.models import build_model

    info = DATASETS["cifar10"]
    model = engine.prepare_model(build_model(name, 10, (size, size, 3)), device)
    f_train, f_eval = flops_per_image(model, size, device, True), flops_per_image(model, size, device, False)
    rng = np.random.default_rng(0)
    n = batch * (steps + 3)
    ds = DeviceDataset(rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8), rng.integers(0, 10, n), device)
    norm = Normalizer(info, device)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    step = engine.sgd_step(opt)
    model.train()
    gen = torch.Generator().manual_seed(0)
    batches = iterate_batches(ds, batch, shuffle=True, augment=True, hflip=True, generator=gen, drop_last=True)
    for _ in range(3):  # warm-up
        xb, yb, _ = next(batches)
        step(model, norm.from_uint8(xb), yb)
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        xb, yb, _ = next(batches)
        step(model, norm.from_uint8(xb), yb)
    _sync(device)
    train_ips = steps * batch / (time.perf_counter() - t0)
    model.eval()
    xe = norm.from_uint8(ds.x[:eval_batch])

    @torch.inference_mode()
    def fwd():
        model(xe)
    eval_ips = eval_batch / _timed(fwd, device, max(3, steps // 5))
    return {"model": name, "params": sum(p.numel() for p in model.parameters()), "train_flops_img": f_train,
            "eval_flops_img": f_eval, "train_img_s": train_ips, "eval_img_s": eval_ips,
            "train_flops_s": f_train * train_ips, "eval_flops_s": f_eval * eval_ips}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", nargs="+", default=["cnn_small", "preactresnet18_narrow", "resnet18_cifar"])
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's, i.e. all cores)")
    p.add_argument("--batch_size", type=int, default=128)
    p.add_argument("--eval_batch_size", type=int, default=1024)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--matmul_n", type=int, default=2048)
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"device {a.device}, torch {torch.__version__}, threads {torch.get_num_threads()}, "
          f"load average at start {load:.2f}")
    pk = peak(a.device, a.matmul_n, max(3, a.steps // 4))
    print(f"peak (fp32, forward): matmul {pk['matmul'] / 1e9:.1f} GFLOP/s, conv3x3 {pk['conv3x3'] / 1e9:.1f} GFLOP/s, "
          f"conv3x3 channels-last {pk['conv3x3_cl'] / 1e9:.1f} GFLOP/s")
    print("| model | params | train GFLOP/img | train img/s | train GFLOP/s | % of peak | eval GFLOP/img | eval img/s "
          "| eval GFLOP/s | % of peak |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name in a.models:
        r = measure(name, a.device, a.batch_size, a.eval_batch_size, a.steps, a.size)
        print(f"| {r['model']} | {r['params'] / 1e6:.2f}M | {r['train_flops_img'] / 1e9:.3f} | {r['train_img_s']:.0f} "
              f"| {r['train_flops_s'] / 1e9:.1f} | {100 * r['train_flops_s'] / pk['peak']:.0f}% | "
              f"{r['eval_flops_img'] / 1e9:.3f} | {r['eval_img_s']:.0f} | {r['eval_flops_s'] / 1e9:.1f} | "
              f"{100 * r['eval_flops_s'] / pk['peak']:.0f}% |", flush=True)


if __name__ == "__main__":
    main()
