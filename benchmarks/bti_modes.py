"""Does any compute mode make BTI-DBF's trigger inversion cheaper? One generator step (the official U-Net through the
classifier: forward, a loss on G(x) and f(G(x)), backward, Adam) under each mode, side by side in one run.

    python benchmarks/bti_modes.py --threads 1              # what a one-CPU Ray worker of a study runs
    python benchmarks/bti_modes.py --model resnet18_cifar --device cuda

The inversion (50 pretraining + 30 generator epochs on the defender's 2,500 images, then 30 more in every later
round of BTI-DBF(U) and pam_reinvert) is two thirds of the CIFAR-10-size benchmark's CPU time (benchmarks/README.md),
and its step is dominated by the U-Net's convolutions, not by the classifier. Modes:
  eager          the path the defenses run today (contiguous U-Net, channels-last classifier as prepare_model makes it)
  channels_last  the U-Net's weights and input in channels-last memory format too
  compile        torch.compile(G) (its compilation, the first steps, not timed)
  bf16           torch.autocast bf16 around the forwards: the run option ``--precision bf16``, a NAMED speed option
                 that changes the numbers (METHODS.md, precision rules); on a CPU with AMX/AVX-512-bf16 it uses them
"loss diff" is the absolute difference from eager of the loss after the timed steps (same weights, same batches);
"GFLOP/s" is the step's work (counted once by torch.utils.flop_counter: convolutions and matmuls, forward and
backward) over its time, to set against benchmarks/compute_peak.py's measured peak.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

from bdsafety.defenses.bti import OfficialUNet  # noqa: E402
from bdsafety.models import build_model  # noqa: E402

MODES = ("eager", "channels_last", "compile", "bf16")


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _step_fn(G, clf, opt, amp):
    def step(x):
        opt.zero_grad(set_to_none=True)
        with amp:
            g = G(x)
            logit_g, logit_x = clf(g), clf(x)
        loss = F.mse_loss(g.float(), x) + F.kl_div(F.log_softmax(logit_g.float(), 1), F.log_softmax(logit_x.float(), 1),
                                                   log_target=True, reduction="batchmean")
        loss.backward()
        opt.step()
        return loss

    return step


def flops_per_image(G0, clf, x) -> float:
    """FLOPs of one generator step per image (forward and backward of G and the classifier)."""
    G = copy.deepcopy(G0).train()
    step = _step_fn(G, clf, torch.optim.Adam(G.parameters(), 1e-3), contextlib.nullcontext())
    with FlopCounterMode(display=False) as fc:
        step(x)
    return fc.get_total_flops() / len(x)


def step_rate(G0, clf, xs, device: str, mode: str, warmup: int) -> tuple[float, float]:
    """(images/s over the timed generator steps, loss of the last one) under ``mode``."""
    G = copy.deepcopy(G0).train()
    if mode == "channels_last":
        G = G.to(memory_format=torch.channels_last)
        xs = [x.contiguous(memory_format=torch.channels_last) for x in xs]
    opt = torch.optim.Adam(G.parameters(), 1e-3)
    amp = (torch.autocast(torch.device(device).type, dtype=torch.bfloat16) if mode == "bf16"
           else contextlib.nullcontext())
    step = _step_fn(torch.compile(G) if mode == "compile" else G, clf, opt, amp)

    for i in range(warmup):  # compilation / allocator warm-up on the same copy; every mode does the same steps
        step(xs[i % len(xs)])
    _sync(device)
    t = time.perf_counter()
    for x in xs:
        loss = step(x)
    _sync(device)
    return len(xs) * len(xs[0]) / (time.perf_counter() - t), float(loss.detach())


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="cnn_tiny", help="the classifier the generator is inverted through")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--bti_unet_base", type=int, default=32, help="U-Net width (official 32)")
    p.add_argument("--batch_size", type=int, default=128, help="official 128")
    p.add_argument("--steps", type=int, default=6, help="timed generator steps per mode")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"torch {torch.__version__}, device {a.device}, threads {torch.get_num_threads()}, batch {a.batch_size}, "
          f"U-Net base {a.bti_unet_base}, classifier {a.model}, load average at start {load:.2f}")
    torch.manual_seed(0)
    G0 = OfficialUNet(3, a.bti_unet_base, 4).to(a.device)
    clf = build_model(a.model, 10).to(a.device).to(memory_format=torch.channels_last).eval().requires_grad_(False)
    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(a.batch_size, 3, 32, 32, generator=g).to(a.device) for _ in range(a.steps)]
    flops = flops_per_image(G0, clf, xs[0])
    print(f"one step: {flops / 1e9:.3f} GFLOP per image")
    print(f"{'mode':<15}{'images/s':>10}{'s / 1k img':>12}{'GFLOP/s':>9}{'x eager':>9}{'loss diff':>11}")
    base = None
    for mode in a.modes:
        rate, loss = step_rate(G0, clf, xs, a.device, mode, a.warmup)
        base = base or (rate, loss)
        print(f"{mode:<15}{rate:>10.1f}{1000 / rate:>12.2f}{rate * flops / 1e9:>9.1f}{rate / base[0]:>8.2f}x"
              f"{abs(loss - base[1]):>11.2e}", flush=True)


if __name__ == "__main__":
    main()
