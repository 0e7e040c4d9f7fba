"""The benchmark scripts that print the figures of benchmarks/README.md run at smoke-test sizes, so they cannot rot."""
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_bti_modes_prints_every_mode_against_eager(capsys):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import bti_modes

    bti_modes.main(["--threads", "1", "--bti_unet_base", "4", "--batch_size", "4", "--steps", "1", "--warmup", "1",
                    "--modes", "eager", "channels_last", "bf16"])
    rows = {line.split()[0]: line.split() for line in capsys.readouterr().out.splitlines()[3:]}
    assert set(rows) == {"eager", "channels_last", "bf16"}
    assert rows["eager"][4] == "1.00x" and float(rows["eager"][5]) == 0.0
    # channels-last changes only the order of the sums; bf16 may move the loss further, but not wildly
    assert float(rows["channels_last"][5]) < 1e-3 and float(rows["bf16"][5]) < 0.1


def test_study_budget_prices_a_plan_and_simulates_its_schedule(capsys):
    """benchmarks/study_budget.py with given figures (nothing measured): the per-kind table and the simulated wall
    time of the Ray executor's longest-chain-first order, never below the lower bound it prints."""
    import re

    sys.path.insert(0, str(ROOT / "benchmarks"))
    import study_budget

    study_budget.main(["--yaml_path", str(ROOT / "config" / "study" / "demo.yaml"), "--models", "cnn_small",
                       "--figures", "train=1,eval=0.5,bti=20,ssba=5,job=3", "--workers", "2"])
    out = capsys.readouterr().out
    assert "defense:pam" in out and "total" in out
    m = re.search(r"longest chain first ([\d.]+) h, plan order ([\d.]+) h; lower bound max\(work / workers "
                  r"([\d.]+) h, longest chain ([\d.]+) h\)", out)
    assert m, out
    chain, plan, work, path = map(float, m.groups())
    assert chain >= max(work, path) - 0.01 and plan >= max(work, path) - 0.01


def test_record_cache_benchmark_times_a_decoded_and_a_remembered_load(tmp_path):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    sys.path.insert(0, str(ROOT / "tests"))
    import record_cache
    from test_records import save_demo_record

    save_demo_record(tmp_path / "record" / "r")
    out = record_cache.main(["--record", str(tmp_path / "record" / "r"), "--repeats", "1"])
    assert out["images"] == 18 and out["decoded_s"] > 0 and out["from_memory_s"] > 0
