"""The GPU run: the paper's chain at CIFAR-10 size on one CUDA device, stage by stage, in one command.

    bash benchmarks/gpu.sh                     # = python benchmarks/gpu_run.py --device cuda
    python benchmarks/gpu_run.py --tiny --device cpu --record_root /tmp/gpu_run   # the same code path in seconds

No internet is needed: the data is the embedded ``synthetic`` generator at CIFAR-10 size (50,000 / 10,000 images,
32x32, 10 classes; `--synthetic_difficulty` when the generator has it). Stages, each timed (CUDA synchronised) with
its peak GPU memory:

  1. data     generate the synthetic set;
  2. attack   BadNets, config/attack/badnet/cifar10.yaml (BackdoorBench's settings) on ``--model`` (resnet18_cifar);
  3. fst      FST, config/defense/fst/cifar10.yaml;
  4. pam      PAM (official: G frozen after round 0), config/defense/pam/cifar10.yaml;
  5. ra       the retuning attack on FST's and PAM's models, config/retune_attack/ra/cifar10.yaml;
  6. input    training images/s of the engine against BackdoorBench's DataLoader + PIL pipeline (same model, batch);
  7. precision  FST + RA under fp32 and bf16 on the record (wall time and the RA curve of each).

``--attack_epochs`` shortens the attack (the stage that dominates) when the run must fit a time budget; the printed
summary says what ran. ``--tiny`` shrinks every size to a smoke test (used by the test suite on the CPU so the script
cannot rot). The summary is also written as json (``--out``).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import torch  # noqa: E402

CFG = ROOT / "config"


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


class Stage:
    """Times a block and records its peak GPU memory (0 on the CPU)."""

    def __init__(self, name: str, device: str, rows: list):
        self.name, self.device, self.rows = name, device, rows

    def __enter__(self):
        if self.device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
        _sync(self.device)
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        _sync(self.device)
        wall = time.perf_counter() - self.t0
        mem = torch.cuda.max_memory_allocated() / 2**30 if self.device.startswith("cuda") else 0.0
        self.rows.append({"stage": self.name, "wall_s": round(wall, 2), "peak_gpu_gib": round(mem, 2),
                          "failed": exc[0] is not None})
        print(f"[gpu_run] {self.name}: {wall:.1f}s, peak GPU memory {mem:.2f} GiB", flush=True)
        return False


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--model", default="resnet18_cifar")
    p.add_argument("--n_train", type=int, default=50000)
    p.add_argument("--n_test", type=int, default=10000)
    p.add_argument("--synthetic_difficulty", type=float, default=None, help="passed to the attack when given")
    p.add_argument("--attack_epochs", type=int, default=None, help="default: the cifar10 yaml's (100)")
    p.add_argument("--record_root", default=str(ROOT / "record" / "gpu_run"))
    p.add_argument("--precisions", default="fp32,bf16")
    p.add_argument("--throughput_steps", type=int, default=50)
    p.add_argument("--tiny", action="store_true", help="smoke-test sizes (200 / 100 images, one epoch everywhere)")
    p.add_argument("--out", default=None, help="json summary (default <record_root>/gpu_run.json)")
    a = p.parse_args(argv)

    from bdsafety.data.datasets import load_clean_dataset
    from bdsafety.registry import get

    if a.tiny:
        a.n_train, a.n_test, a.attack_epochs, a.throughput_steps = 200, 100, 1, 2
    root = Path(a.record_root)
    common = ["--record_root", str(root), "--device", a.device, "--no_progress"]
    tiny_def = ["--epochs", "1", "--ratio", "40"] if a.tiny else []
    tiny_pam = (["--n_rounds", "1", "--bti_pretrain_epochs", "1", "--bti_mask_epochs", "1", "--bti_gen_epochs", "1",
                 "--bti_batch_size", "20"] if a.tiny else [])
    tiny_ra = ["--epochs", "1", "--ratio", "40", "--poison_num", "2"] if a.tiny else []
    rec = f"badnet_synthetic_{a.model}_gpu_run"
    rows: list = []
    dev = a.device
    print(f"[gpu_run] device {dev}"
          + (f" ({torch.cuda.get_device_name(dev)})" if dev.startswith("cuda") else "")
          + f", model {a.model}, synthetic {a.n_train} / {a.n_test}, torch {torch.__version__}", flush=True)
    t_all = time.perf_counter()

    with Stage("data", dev, rows):
        data = load_clean_dataset("synthetic", str(root / "data"), n_train=a.n_train, n_test=a.n_test, seed=0)
    attack_args = ["--yaml_path", str(CFG / "attack" / "badnet" / "cifar10.yaml"), "--dataset", "synthetic",
                   "--synthetic_n_train", str(a.n_train), "--synthetic_n_test", str(a.n_test), "--model", a.model,
                   "--save_folder_name", rec, "--overwrite", "--dependents", "delete", *common]
    if a.attack_epochs is not None:
        attack_args += ["--epochs", str(a.attack_epochs)]
    if a.synthetic_difficulty is not None:
        attack_args += ["--synthetic_difficulty", str(a.synthetic_difficulty)]
    with Stage("attack", dev, rows):
        get("attack", "badnet").main(attack_args)
    for name, extra in (("fst", tiny_def), ("pam", tiny_def + tiny_pam)):
        with Stage(name, dev, rows):
            get("defense", name).main(["--yaml_path", str(CFG / "defense" / name / "cifar10.yaml"),
                                       "--result_file", rec, "--overwrite", "--dependents", "delete", *extra, *common])
    with Stage("ra", dev, rows):
        get("retune", "ra").main(["--yaml_path", str(CFG / "retune_attack" / "ra" / "cifar10.yaml"),
                                  "--result_file", rec, "--defense", "fst,pam", "--overwrite", *tiny_ra, *common])

    import train_throughput

    throughput = {}
    with Stage("input", dev, rows):
        for prec in a.precisions.split(","):
            throughput[prec] = train_throughput.main(
                ["--model", a.model, "--device", dev, "--steps", str(a.throughput_steps), "--warmup", "2",
                 "--n_train", str(min(a.n_train, 5000)), "--precision", prec] + (["--workers", "0"] if a.tiny else []))

    import precision as precision_bench

    with Stage("precision", dev, rows):
        prec_rows = precision_bench.main(
            ["--result_file", rec, "--record_root", str(root), "--device", dev, "--precisions", a.precisions,
             "--defense_yaml", str(CFG / "defense" / "fst" / "cifar10.yaml"),
             "--ra_yaml", str(CFG / "retune_attack" / "ra" / "cifar10.yaml"),
             "--defense_args", " ".join(tiny_def), "--ra_args", " ".join(tiny_ra)])

    total = time.perf_counter() - t_all
    summary = {"device": dev, "model": a.model, "n_train": a.n_train, "n_test": a.n_test, "tiny": a.tiny,
               "attack_epochs": a.attack_epochs, "stages": rows, "total_s": round(total, 1),
               "throughput": throughput, "precision": prec_rows, "train_images": len(data.train_y)}
    out = Path(a.out) if a.out else root / "gpu_run.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(summary, indent=1, default=str))
    print("\n| stage | wall (s) | peak GPU memory (GiB) |\n|---|---|---|")
    for r in rows:
        print(f"| {r['stage']} | {r['wall_s']:.1f} | {r['peak_gpu_gib']:.2f} |")
    print(f"| total | {total:.1f} | |")
    for prec, t in throughput.items():
        print(f"input stage ({prec}): engine {t['engine_images_per_s']:.0f} images/s, DataLoader + PIL "
              f"{t['dataloader_images_per_s']:.0f} images/s "
              f"({t['engine_images_per_s'] / t['dataloader_images_per_s']:.2f}x)")
    print(f"[gpu_run] summary written to {out}", flush=True)
    return summary


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
