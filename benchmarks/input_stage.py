"""The input stage alone: images/s of turning stored training images into a normalised, augmented batch, side by side
in one run (issue 26's target: 10x or more BackdoorBench's per-sample PIL pipeline).

    python benchmarks/input_stage.py                      # CPU, 32x32, batch 128, 1 thread and all threads
    python benchmarks/input_stage.py --device cuda --n 50000

Pipelines, each producing the same thing (a float batch: RandomCrop(32, padding=4) + RandomHorizontalFlip + to [0, 1]
+ per-channel normalisation, from uint8 images):
  pil           BackdoorBench's: per sample a PIL image through torchvision's RandomCrop, RandomHorizontalFlip,
                ToTensor and Normalize, stacked into the batch (what one DataLoader worker does; the DataLoader's own
                process overhead is not counted, so this is the PIL pipeline's best case)
  engine-gather this engine's batched stage (DeviceDataset.augmented + Normalizer) with the crop as one gather
                (the implementation before the window crop; still the one used off the CPU)
  engine        the same with the crop copying whole windows out of an unfolded view of the padded batch
                (bdsafety.data.device._crop_unfold: the CPU default)
The two engine variants give identical batches for the same seed (tests/test_augment.py). The model is not run: this
measures the input stage only (benchmarks/train_throughput.py measures whole training steps).
"""
from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from bdsafety.data import device as dev_mod  # noqa: E402
from bdsafety.data.device import DeviceDataset, Normalizer  # noqa: E402
from bdsafety.data.info import dataset_info  # noqa: E402


def _time(fn, batches: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    t = time.perf_counter()
    for _ in range(batches):
        fn()
    return time.perf_counter() - t


def pil_stage(images: np.ndarray, batch: int, mean, std):
    import torchvision.transforms as T  # lazy: torchvision's transforms only for this baseline
    from PIL import Image

    tf = T.Compose([T.RandomCrop(32, padding=4), T.RandomHorizontalFlip(), T.ToTensor(), T.Normalize(mean, std)])
    pil = [Image.fromarray(a) for a in images]  # BackdoorBench keeps PIL images (or decodes them) per sample
    rng = np.random.default_rng(0)

    def run():
        idx = rng.integers(0, len(pil), batch)
        return torch.stack([tf(pil[i]) for i in idx])

    return run


def engine_stage(images: np.ndarray, batch: int, device: str, gather: bool):
    info = dataset_info("cifar10")
    ds = DeviceDataset(images, np.zeros(len(images), dtype=np.int64), device)
    norm = Normalizer(info, device)
    gen = torch.Generator().manual_seed(0)
    rng = np.random.default_rng(0)

    def run():
        idx = torch.as_tensor(rng.integers(0, len(ds), batch))
        if gather:  # force the gather crop (the pre-grouping implementation) on any device
            real = dev_mod._crop_unfold
            dev_mod._crop_unfold = dev_mod._crop_gather
            try:
                xb = ds.augmented(idx, generator=gen)
            finally:
                dev_mod._crop_unfold = real
        else:
            xb = ds.augmented(idx, generator=gen)
        out = norm.from_uint8(xb)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        return out

    return run


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=10000, help="stored training images (32x32x3 uint8)")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--batches", type=int, default=60, help="timed batches per pipeline")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, nargs="*", default=None, help="torch thread counts (default: 1 and all)")
    a = p.parse_args(argv)
    images = np.random.default_rng(0).integers(0, 256, (a.n, 32, 32, 3), dtype=np.uint8)
    info = dataset_info("cifar10")
    threads = a.threads or sorted({1, torch.get_num_threads()})
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"input stage, {a.n} stored images, batch {a.batch}, {a.batches} timed batches, device {a.device}, "
          f"load average at start {load:.2f}")
    print(f"{'threads':>7} {'pipeline':>14} {'images/s':>10} {'x pil':>7}")
    for t in threads:
        torch.set_num_threads(t)
        rates = {}
        for name, fn in (("pil", pil_stage(images, a.batch, info.mean, info.std)),
                         ("engine-gather", engine_stage(images, a.batch, a.device, gather=True)),
                         ("engine", engine_stage(images, a.batch, a.device, gather=False))):
            rates[name] = a.batch * a.batches / _time(fn, a.batches)
        for name, r in rates.items():
            print(f"{t:>7} {name:>14} {r:>10.0f} {r / rates['pil']:>6.1f}x")


if __name__ == "__main__":
    main()
