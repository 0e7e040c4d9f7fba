"""What the in-process record cache saves a study's jobs: load_attack_record of one record decoded (cache cleared)
against served from memory, and the cost of the stat that decides whether it may be served, in one run.

    python benchmarks/record_cache.py --record record/study_bench_cifar10size/badnet_synthetic_cnn_tiny_p0.05_s0
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bdsafety.records import _record_stamp, clear_record_cache, load_attack_record  # noqa: E402


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--record", required=True, help="a record folder (attack_result.pt and its bd_* folders)")
    p.add_argument("--repeats", type=int, default=3)
    a = p.parse_args(argv)
    d = Path(a.record)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    cold, warm, stamp = [], [], []
    for _ in range(a.repeats):
        clear_record_cache()
        t = time.perf_counter()
        rec = load_attack_record(d)
        cold.append(time.perf_counter() - t)
        t = time.perf_counter()
        load_attack_record(d)
        warm.append(time.perf_counter() - t)
        t = time.perf_counter()
        n = len(_record_stamp(d))
        stamp.append(time.perf_counter() - t)
    clear_record_cache()
    n_img = len(rec.bd_test.indices) + (len(rec.bd_train.indices) if rec.bd_train is not None else 0)
    out = {"decoded_s": min(cold), "from_memory_s": min(warm), "stamp_s": min(stamp), "files": n, "images": n_img}
    print(f"record {d.name}: {n_img} poisoned images, {n} files; load average at start {load:.2f}; best of "
          f"{a.repeats}: decoded {out['decoded_s']:.2f} s, from memory {out['from_memory_s']:.3f} s (of which the "
          f"stat of every file {out['stamp_s']:.3f} s)")
    return out


if __name__ == "__main__":
    main()
