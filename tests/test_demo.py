"""`python -m bdsafety.demo` is an alias of the demo studies; every shipped study yaml resolves to jobs whose
configs parse against their methods' schemas (a dry run, so nothing is trained or written)."""
from pathlib import Path

import pytest

import bdsafety.demo as demo

ROOT = Path(__file__).resolve().parents[1]
# audit.yaml holds the audit's defaults (no records of its own): tests/test_audit.py resolves it on a record
STUDIES = sorted(p for p in (ROOT / "config" / "study").glob("*.yaml") if p.stem != "audit")


def test_alias_stands_for_the_demo_studies():
    assert demo.study_argv([]) == ["--yaml_path", str(demo.DEMO)]
    assert (demo.study_argv(["--seeds", "--executor", "ray"])
            == ["--yaml_path", str(demo.DEMO_SEEDS), "--executor", "ray"])
    assert demo.study_argv(["--yaml_path", "x.yaml", "--fresh"]) == ["--yaml_path", "x.yaml", "--fresh"]
    with pytest.raises(SystemExit, match="drop --yaml_path or --seeds"):
        demo.study_argv(["--seeds", "--yaml_path", "x.yaml"])


def test_demo_dry_run_lists_the_chain_and_writes_nothing(capsys, tmp_path):
    assert demo.main(["--dry_run", "--record_root", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    for job in ("attack   badnet", "defense  fst", "defense  exact_purification", "defense  pam",
                "defense  pam_reinvert", "retune   ra", "retune   qra", "analysis lmc"):
        assert job in out, job
    assert not any(tmp_path.iterdir())


def test_seeds_study_runs_the_readme_chain_per_seed(capsys, tmp_path):
    assert demo.main(["--seeds", "--dry_run", "--record_root", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    for s in (0, 1, 2):
        for d in ("fst", "bti_dbf", "exact_purification", "pam", "pam_reinvert"):
            assert f"badnet_synthetic_cnn_small_p0.1_s{s}/defense/{d}/ra " in out, (s, d)
    # per seed: attack, clean, RA on both, 5 x (defense, RA, LMC), QRA on FST, and the benign-retune control on the
    # 7 models (27 jobs)
    assert out.strip().splitlines()[-1] == "81 jobs, 81 to run"


@pytest.mark.parametrize("path", STUDIES, ids=[p.stem for p in STUDIES])
def test_every_shipped_study_resolves(path):
    """Every job of every shipped study gets a config that parses against its method's schema."""
    from bdsafety.study.plan import build_plan
    from bdsafety.study.spec import load_study

    plan = build_plan(load_study(path))
    assert plan.jobs
    assert not [n for n in plan.notes if "not a registered" in n], plan.notes
