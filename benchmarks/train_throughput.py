"""Training throughput: bdsafety's engine vs BackdoorBench's input pipeline, same model and data, one run.

BackdoorBench feeds training through a torchvision DataLoader whose dataset applies per-sample PIL
transforms (RandomCrop(pad 4) -> RandomHorizontalFlip -> ToTensor -> Normalize). bdsafety keeps the uint8
dataset on the device and augments whole batches there. Both sides run the same model, batch size, optimizer
and number of steps; the script prints images/s for each and the ratio.

    python benchmarks/train_throughput.py                       # cnn_small, synthetic data, CPU
    python benchmarks/train_throughput.py --model preactresnet18 --device cuda --steps 200
"""
from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402


def engine_images_per_s(model, x, y, info, device, batch_size, steps, warmup):
    from bdsafety import engine
    from bdsafety.data.device import DeviceDataset, Normalizer, iterate_batches

    ds = DeviceDataset(x, y, device)
    norm = Normalizer(info, device)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    step = engine.sgd_step(opt)
    gen = torch.Generator().manual_seed(0)
    done, t0 = 0, None
    while True:
        for xb, yb, _ in iterate_batches(ds, batch_size, shuffle=True, augment=True, hflip=True, generator=gen,
                                         drop_last=True):
            if done == warmup:
                _sync(device)
                t0 = time.perf_counter()
            step(model, norm.from_uint8(xb), yb)
            done += 1
            if done == warmup + steps:
                _sync(device)
                return steps * batch_size / (time.perf_counter() - t0)


def dataloader_images_per_s(model, x, y, info, device, batch_size, steps, warmup, workers):
    import torchvision.transforms as T
    from PIL import Image

    tf = T.Compose([T.RandomCrop(x.shape[1], padding=4), T.RandomHorizontalFlip(), T.ToTensor(),
                    T.Normalize(info.mean, info.std)])

    class PILDataset(torch.utils.data.Dataset):  # BackdoorBench's way: a PIL image per sample, transformed on access
        def __len__(self):
            return len(y)

        def __getitem__(self, i):
            return tf(Image.fromarray(x[i])), int(y[i])

    loader = torch.utils.data.DataLoader(PILDataset(), batch_size=batch_size, shuffle=True, num_workers=workers,
                                         drop_last=True, pin_memory=device.startswith("cuda"),
                                         persistent_workers=workers > 0)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    done, t0 = 0, None
    while True:
        for xb, yb in loader:
            if done == warmup:
                _sync(device)
                t0 = time.perf_counter()
            xb, yb = xb.to(device, non_blocking=True), yb.to(device, non_blocking=True)
            opt.zero_grad(set_to_none=True)
            with _autocast(device):
                loss = F.cross_entropy(model(xb).float(), yb)
            loss.backward()
            opt.step()
            done += 1
            if done == warmup + steps:
                _sync(device)
                return steps * batch_size / (time.perf_counter() - t0)


def _autocast(device):
    from bdsafety.engine import autocast

    return autocast(device)  # the precision of the enclosing engine.precision block (main: --precision)


def _sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def main(argv=None) -> dict:
    from bdsafety.data.synthetic import make_synthetic
    from bdsafety.engine import precision, prepare_model
    from bdsafety.models import build_model

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="cnn_small")
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch_size", type=int, default=128)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--n_train", type=int, default=5000)
    p.add_argument("--workers", type=int, default=None, help="DataLoader workers (default: number of CPU cores)")
    p.add_argument("--precision", default="fp32", choices=("fp32", "bf16"), help="both sides' numerics (default fp32)")
    a = p.parse_args(argv)
    workers = a.workers if a.workers is not None else (os.cpu_count() or 1)
    data = make_synthetic(n_train=a.n_train, n_test=10)
    x, y = data.train_x, data.train_y
    print(f"model {a.model}, device {a.device}, {a.precision}, batch {a.batch_size}, {a.steps} timed steps after "
          f"{a.warmup} warm-up, torch threads {torch.get_num_threads()}, DataLoader workers {workers}")
    torch.manual_seed(0)
    m1 = prepare_model(build_model(a.model, 10), a.device)
    torch.manual_seed(0)
    m2 = prepare_model(build_model(a.model, 10), a.device)
    with precision(a.precision):
        ours = engine_images_per_s(m1, x, y, data.info, a.device, a.batch_size, a.steps, a.warmup)
        base = dataloader_images_per_s(m2, x, y, data.info, a.device, a.batch_size, a.steps, a.warmup, workers)
    print(f"bdsafety engine (device-resident uint8, batched augmentation): {ours:9.1f} images/s")
    print(f"DataLoader + per-sample PIL transforms (BackdoorBench)        : {base:9.1f} images/s")
    print(f"speed-up: {ours / base:.2f}x")
    return {"engine_images_per_s": ours, "dataloader_images_per_s": base}


if __name__ == "__main__":
    main()
