"""Wall time of one small study run sequentially (local executor) and on Ray with N workers, side by side.

    python benchmarks/study_executors.py                       # 2 Ray workers, synthetic data, cnn_small, CPU
    python benchmarks/study_executors.py --workers 4 --seeds 0,1 --defenses ft,fst,exact_purification
    python benchmarks/study_executors.py --yaml_path config/study/demo.yaml   # the README's demo study, as shipped

Both runs start from nothing (fresh temporary study folders); the script prints the speed-up and the largest
difference between the two results.csv (timing columns aside). Local jobs use --threads torch threads each (default: all
cores); Ray jobs one thread each (num_cpus 1), so the comparison is "one job using the whole machine at a time"
against "one job per core".
"""
from __future__ import annotations

import argparse
import io
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def study_yaml(path: Path, seeds, defenses, n_train: int, epochs: int) -> Path:
    import yaml

    spec = {"name": "bench", "datasets": ["synthetic"], "models": ["cnn_small"], "attacks": ["badnet"],
            "pratios": [0.1], "seeds": seeds, "clean_reference": True, "defenses": defenses, "retune": ["ra", "qra"],
            "analyses": ["lmc"],
            "set": {"attack": {"synthetic_n_train": n_train, "synthetic_n_test": max(100, n_train // 5),
                               "epochs": epochs},
                    "defense": {"epochs": epochs, "ratio": 0.1},
                    "ra": {"epochs": epochs, "ratio": 0.1, "poison_num": 5},
                    "qra": {"epochs": epochs, "clean_num": 50, "poison_num": 20, "hidden": [64], "eval_every": epochs},
                    "lmc": {"points": 5, "ratio": 0.1}},
            "resources": {"default": {"num_cpus": 1, "num_gpus": 0}}}
    path.write_text(yaml.safe_dump(spec))
    return path


def main(argv=None) -> int:
    import pandas as pd
    import torch

    from bdsafety.study.results import timing_columns
    from bdsafety.study.runner import run_study

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--workers", type=int, default=2, help="CPUs of the local Ray instance (= concurrent 1-CPU jobs)")
    p.add_argument("--threads", type=int, default=None, help="torch threads per local job (default: all)")
    p.add_argument("--seeds", default="0")
    p.add_argument("--defenses", default="ft,fst,exact_purification")
    p.add_argument("--n_train", type=int, default=1000)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--yaml_path", default=None, help="time this study yaml as it is instead (--seeds, --defenses, "
                                                     "--n_train, --epochs are then ignored)")
    a = p.parse_args(argv)
    seeds = [int(s) for s in a.seeds.split(",")]
    threads = a.threads or torch.get_num_threads()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        y = Path(a.yaml_path) if a.yaml_path else study_yaml(tmp / "bench.yaml", seeds, a.defenses.split(","),
                                                             a.n_train, a.epochs)
        times, csvs, jobs = {}, {}, 0
        for name, kw in (("local", {"executor": "local", "threads": threads}),
                         ("ray", {"executor": "ray", "ray_num_cpus": a.workers})):
            t0 = time.time()
            oc = run_study(str(y), study_dir=str(tmp / name), progress=False, out=io.StringIO(), **kw)
            times[name] = time.time() - t0
            if oc.failed:
                print(f"{name}: failed jobs {[r['key'] for r in oc.failed]}", file=sys.stderr)
                return 1
            jobs = len(oc.keys("ran"))
            csvs[name] = pd.read_csv(tmp / name / "results.csv")
        la, ra = (csvs[k].drop(columns=timing_columns(csvs[k])).select_dtypes("number") for k in ("local", "ray"))
        diff = float((la - ra).abs().max().max()) if la.shape == ra.shape else float("inf")
    what = (a.yaml_path if a.yaml_path else f"synthetic {a.n_train} images, cnn_small, {a.epochs} epochs, defenses "
            f"{a.defenses}, seeds {a.seeds}")
    print(f"study: {jobs} jobs ({what}); {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}")
    print(f"| executor | wall time (s) |\n|---|---|\n| local, sequential ({threads} torch threads per job) | "
          f"{times['local']:.1f} |\n| ray, {a.workers} workers (1 thread per job, Ray start included) | "
          f"{times['ray']:.1f} |")
    print(f"speed-up: {times['local'] / times['ray']:.2f}x; largest difference between the two results.csv (timing "
          f"columns aside): {diff:.2g} (0 with --threads 1; other thread counts change float summation order)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
