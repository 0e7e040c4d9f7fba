"""Input-Aware's generator width on the CPU: seconds per training step of the demo schedule's two stages at
BackdoorBench's width (32) and the demo's (8), measured side by side in one run, and what the demo's 25 + 100 epochs
would take at each width.

    python benchmarks/inputaware_width.py [--widths 8,32] [--model cnn_small] [--batch_size 128] [--steps 10]

Stage 1 (mask pretraining) trains M on every image of the batch; stage 2 (joint) runs G and M on the backdoor and
cross samples (2 x pratio of the batch), the classifier on the whole batch, and steps both. The classifier step alone
is printed for scale.
"""
from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from bdsafety.attacks.inputaware import TriggerNet
from bdsafety.models import build_model


def _time(fn, steps: int) -> float:
    fn()  # warm-up
    t = time.perf_counter()
    for _ in range(steps):
        fn()
    return (time.perf_counter() - t) / steps


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--widths", default="8,32")
    ap.add_argument("--model", default="cnn_small")
    ap.add_argument("--batch_size", type=int, default=128)
    ap.add_argument("--pratio", type=float, default=0.1)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--n_train", type=int, default=5000, help="images per epoch (the demo's 5,000)")
    ap.add_argument("--mask_epochs", type=int, default=25)
    ap.add_argument("--joint_epochs", type=int, default=100)
    a = ap.parse_args(argv)
    torch.manual_seed(0)
    b, nb = a.batch_size, max(1, int(a.batch_size * a.pratio))
    x = torch.rand(b, 3, 32, 32)
    y = torch.randint(0, 10, (b,))
    clf = build_model(a.model, 10)
    opt_c = torch.optim.SGD(clf.parameters(), lr=0.01, momentum=0.9)

    def clf_step():
        opt_c.zero_grad(set_to_none=True)
        F.cross_entropy(clf(x), y).backward()
        opt_c.step()

    t_clf = _time(clf_step, a.steps)
    steps_per_epoch = -(-a.n_train // b)
    print(f"threads {torch.get_num_threads()}, batch {b}, {nb} backdoor + {nb} cross samples per batch; classifier "
          f"{a.model} step {1000 * t_clf:.1f} ms")
    print("width | mask step ms | joint step ms | joint / classifier | demo schedule (s, estimated)")
    for w in [int(v) for v in a.widths.split(",")]:
        G, M = TriggerNet(3, 3, w), TriggerNet(3, 1, w)
        opt_g = torch.optim.Adam(list(G.parameters()) + list(M.parameters()), lr=0.01, betas=(0.5, 0.9))

        def mask_step(M=M, opt_g=opt_g):
            opt_g.zero_grad(set_to_none=True)
            M(x).mean().backward()
            opt_g.step()

        def joint_step(G=G, M=M, opt_g=opt_g):
            opt_c.zero_grad(set_to_none=True)
            opt_g.zero_grad(set_to_none=True)
            src = x[: 2 * nb]
            pattern, mask = G(src), M(src)
            poisoned = src + mask * (pattern - src)
            xb = torch.cat([poisoned, x[2 * nb:]])
            F.cross_entropy(clf(xb), y).backward()
            opt_c.step()
            opt_g.step()

        t_mask, t_joint = _time(mask_step, a.steps), _time(joint_step, a.steps)
        total = steps_per_epoch * (a.mask_epochs * t_mask + a.joint_epochs * t_joint)
        print(f"{w:5d} | {1000 * t_mask:12.1f} | {1000 * t_joint:13.1f} | {t_joint / t_clf:18.2f} | {total:.0f}")


if __name__ == "__main__":
    main()
