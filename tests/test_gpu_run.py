"""benchmarks/gpu_run.py (the GPU run of benchmarks/gpu.sh) on the CPU at smoke-test sizes, so the script cannot rot
while no GPU is lent: every stage runs through the real entry points and the summary has each stage's figures."""
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_gpu_run_script_runs_every_stage_at_tiny_sizes(tmp_path):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import gpu_run

    summary = gpu_run.main(["--tiny", "--device", "cpu", "--model", "cnn_small", "--precisions", "fp32",
                            "--record_root", str(tmp_path / "record")])
    stages = [r["stage"] for r in summary["stages"]]
    assert stages == ["data", "attack", "fst", "pam", "ra", "input", "precision"]
    assert all(r["wall_s"] > 0 and not r["failed"] for r in summary["stages"])
    assert summary["throughput"]["fp32"]["engine_images_per_s"] > 0
    assert {r["precision"] for r in summary["precision"]} == {"fp32"}
    rec = tmp_path / "record" / "badnet_synthetic_cnn_small_gpu_run"
    for sub in ("defense/fst/ra", "defense/pam/ra"):
        assert (rec / sub / "ra_df.csv").is_file()
    assert json.loads((tmp_path / "record" / "gpu_run.json").read_text())["tiny"] is True
