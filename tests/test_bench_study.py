"""The CIFAR-10-size benchmark study: its dry run lists every job the issue asks for (both PAM rows, the benign
control, the RA budget and the RA draws) at the paper's unscaled protocol."""
from __future__ import annotations

import re
from pathlib import Path

from bdsafety.study.runner import main

ROOT = Path(__file__).resolve().parent.parent
CORE = ROOT / "config" / "study" / "bench_cifar10size.yaml"


def test_core_benchmark_dry_run_lists_every_job(tmp_path, capsys):
    main(["--yaml_path", str(CORE), "--dry_run", "--study_dir", str(tmp_path / "study")])
    out = capsys.readouterr().out
    keys = set(re.findall(r"^\s+\[\w+\]\s+\w+\s+\w+\s+(\S+)", out, flags=re.M))
    assert not (tmp_path / "study").exists() or not any((tmp_path / "study").iterdir())  # a dry run runs nothing
    for attack in ("badnet", "blended", "ssba", "wanet"):
        for seed in (0, 1, 2):
            rec = f"{attack}_synthetic_cnn_tiny_p0.05_s{seed}"
            assert rec in keys and f"clean-{attack}_synthetic_cnn_tiny_s{seed}" in keys
            for d in ("exact_purification", "fst", "bti_dbf", "pam", "pam_reinvert"):
                base = f"{rec}/defense/{d}"
                assert base in keys, base
                want = [f"{base}/ra", f"{base}/ra_d4", f"{base}/ra_control", f"{base}/ra_control_d4",
                        f"{base}/ra_budget_p1", f"{base}/ra_budget_p10"]
                assert not [k for k in want if k not in keys], [k for k in want if k not in keys]
            assert f"{rec}/defense/fst/qra" in keys
            assert {f"{rec}/lmc_{d}" for d in ("exact_purification", "fst", "bti_dbf", "pam", "pam_reinvert")} <= keys
            assert f"{rec}/ra_control" in keys and f"{rec}/ra_budget_p1" in keys
    assert f"{rec}/ra_d5" not in keys and f"{rec}/defense/fst/ra_budget_p5" not in keys  # 5 draws; 5 is the main RA


def test_core_benchmark_runs_the_unscaled_protocol():
    from bdsafety.study.plan import build_plan
    from bdsafety.study.spec import load_study

    jobs = build_plan(load_study(CORE)).jobs
    attacks = [j for j in jobs if j.kind == "attack"]
    assert {(j.config["synthetic_n_train"], j.config["synthetic_n_test"]) for j in attacks} == {(50000, 10000)}
    assert (len({j.config["synthetic_difficulty"] for j in attacks}) == 1
            and attacks[0].config["synthetic_difficulty"] > 0)
    assert {j.config["pratio"] for j in attacks if j.point["role"] == "attack"} == {0.05}
    ra = [j.config for j in jobs if j.method == "ra" and j.point["role"] == "ra"]
    assert {(c["ratio"], c["poison_num"], c["epochs"], c["lr"], c["sgd_momentum"], c["batch_size"]) for c in ra} == {
        (0.02, 5, 5, 0.01, 0.9, 128)}
    assert {j.config["poison_num"] for j in jobs if j.point.get("role") == "ra_control"} == {0}
    pam = [j.config for j in jobs if j.method in ("pam", "pam_reinvert")]
    assert {(c["n_rounds"], c["epochs"], c["rho"], c["ratio"]) for c in pam} == {(3, 30, 0.5, 0.05)}
    assert {c["retrain_generator"] for c in pam} == {False, True}


def test_adaptive_benchmark_plans_both_attacks_at_their_official_rates_on_the_benchmark_data():
    """config/study/bench_cifar10size_adaptive.yaml (issue 25: the two adaptive rows the demo cannot carry)."""
    from bdsafety.study.plan import build_plan
    from bdsafety.study.spec import load_study

    jobs = build_plan(load_study(ROOT / "config" / "study" / "bench_cifar10size_adaptive.yaml")).jobs
    attacks = {j.method: j.config for j in jobs if j.kind == "attack" and j.point["role"] == "attack"}
    assert set(attacks) == {"adaptive_blend", "narcissus"}
    assert attacks["adaptive_blend"]["pratio"] == attacks["adaptive_blend"]["cover_rate"] == 0.003
    assert attacks["narcissus"]["pratio"] == 0.0005
    sizes = {(c["synthetic_n_train"], c["synthetic_n_test"], c["epochs"]) for c in attacks.values()}
    assert sizes == {(50000, 10000, 30)}
    keys = {j.key for j in jobs}
    for rec in ("adaptive_blend_synthetic_cnn_tiny_p0.003_s2", "narcissus_synthetic_cnn_tiny_p0.0005_s2"):
        for d in ("exact_purification", "fst", "pam", "pam_reinvert"):
            base = f"{rec}/defense/{d}"
            assert {f"{base}/ra_d4", f"{base}/ra_control", f"{base}/ra_budget_p10"} <= keys
