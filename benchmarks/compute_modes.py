"""Do channels_last, torch.compile or BatchNorm folding pay here? Training-step and evaluation images/s of the demo and
benchmark models under each mode, side by side in one run, with how far each mode's numbers move from eager's.

    python benchmarks/compute_modes.py                               # CPU: cnn_small, cnn_tiny
    python benchmarks/compute_modes.py --models cnn_small resnet18_cifar --device cuda

Training step (what engine.fit runs per batch: forward, cross-entropy, backward, SGD with momentum; batch 128, fp32):
  eager            the engine's path on the CPU today
  channels_last    the model's weights in channels-last memory format, the batch as it comes (the engine's CUDA
                   path: the convolutions then compute and return channels-last activations)
  compile          torch.compile(model) (inductor; its first steps, the compilation, are not timed)
  compile+cl       both
Evaluation (inference mode, the evaluation batch):
  eager, channels_last, compile as above, and
  bn_folded        each Conv2d + BatchNorm2d pair folded into one convolution (torch.fx's fuse, evaluation only)
"max diff" is the largest absolute difference from eager of the logits (evaluation) or of the loss after the timed
steps from the same initial weights and batches (training): floating-point order only when small; the engine keeps
a mode only where it pays and stays within that (benchmarks/README.md records the decision).
"""
from __future__ import annotations

import argparse
import copy
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from bdsafety.models import build_model  # noqa: E402


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def train_rate(model, xs, ys, device: str, cl: bool, do_compile: bool, warmup: int) -> tuple[float, float]:
    """(images/s over the timed steps, loss of the last step) of SGD steps over the batches ``xs`` / ``ys``."""
    model = copy.deepcopy(model).train()
    if cl:
        model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    fwd = torch.compile(model) if do_compile else model

    def step(x, y):
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(fwd(x), y)
        loss.backward()
        opt.step()
        return loss

    for i in range(warmup):  # compilation / allocator warm-up, on copies so the timed steps start from the same weights
        step(xs[i % len(xs)], ys[i % len(ys)])
    _sync(device)
    t = time.perf_counter()
    for x, y in zip(xs, ys):
        loss = step(x, y)
    _sync(device)
    return len(xs) * len(xs[0]) / (time.perf_counter() - t), float(loss.detach())


def eval_rate(model, x, device: str, mode: str, reps: int) -> tuple[float, torch.Tensor]:
    """(images/s, logits) of inference-mode forward passes over the batch ``x``."""
    m = copy.deepcopy(model).eval()
    if mode == "bn_folded":
        from torch.fx.experimental.optimization import fuse  # lazy: torch.fx only for this mode

        m = fuse(m)
    if mode == "channels_last":
        m = m.to(memory_format=torch.channels_last)
    if mode == "compile":
        m = torch.compile(m)
    with torch.inference_mode():
        out = m(x)  # warm-up (and compilation)
        _sync(device)
        t = time.perf_counter()
        for _ in range(reps):
            out = m(x)
        _sync(device)
    return reps * len(x) / (time.perf_counter() - t), out.float()


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=["cnn_small", "cnn_tiny"])
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--batch_size", type=int, default=128)
    p.add_argument("--eval_batch_size", type=int, default=1024)
    p.add_argument("--steps", type=int, default=20, help="timed training steps")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--eval_reps", type=int, default=5)
    p.add_argument("--no_compile", action="store_true", help="leave out the torch.compile modes")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"torch {torch.__version__}, device {a.device}, threads {torch.get_num_threads()}, batch {a.batch_size}, "
          f"eval batch {a.eval_batch_size}, load average at start {load:.2f}")
    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(a.batch_size, 3, 32, 32, generator=g).to(a.device) for _ in range(a.steps)]
    ys = [torch.randint(0, 10, (a.batch_size,), generator=g).to(a.device) for _ in range(a.steps)]
    xe = torch.randn(a.eval_batch_size, 3, 32, 32, generator=g).to(a.device)
    train_modes = [("eager", False, False), ("channels_last", True, False)]
    if not a.no_compile:
        train_modes += [("compile", False, True), ("compile+cl", True, True)]
    eval_modes = ["eager", "channels_last", "bn_folded"] + ([] if a.no_compile else ["compile"])
    print(f"{'model':<16}{'stage':<7}{'mode':<15}{'images/s':>10}{'x eager':>9}{'max diff':>11}")
    for name in a.models:
        torch.manual_seed(0)
        model = build_model(name, 10).to(a.device)
        base = None
        for mode, cl, comp in train_modes:
            rate, loss = train_rate(model, xs, ys, a.device, cl, comp, a.warmup)
            base = base or (rate, loss)
            print(f"{name:<16}{'train':<7}{mode:<15}{rate:>10.0f}{rate / base[0]:>8.2f}x{abs(loss - base[1]):>11.2e}",
                  flush=True)
        base = None
        for mode in eval_modes:
            rate, out = eval_rate(model, xe, a.device, mode, a.eval_reps)
            base = base or (rate, out)
            diff = float((out - base[1]).abs().max())
            print(f"{name:<16}{'eval':<7}{mode:<15}{rate:>10.0f}{rate / base[0]:>8.2f}x{diff:>11.2e}", flush=True)


if __name__ == "__main__":
    main()
