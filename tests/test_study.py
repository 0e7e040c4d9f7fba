"""The study runner on a tiny grid (synthetic 300/100 images, cnn_small, 1 epoch everywhere): resume, reruns after a
deleted output or a changed config, failure isolation, local vs Ray executors, and the paper grid's dry run."""
import io
import math
import os
import shutil
import time
from pathlib import Path

import browser
import pandas as pd
import pytest
import yaml

from bdsafety import registry
from bdsafety.study.results import timing_columns
from bdsafety.study.runner import main, run_study

ROOT = Path(__file__).resolve().parent.parent
REC = "badnet_synthetic_cnn_small_p0.1_s0"
CLEAN = "clean-badnet_synthetic_cnn_small_s0"
TINY = {
    "name": "tiny", "datasets": ["synthetic"], "models": ["cnn_small"], "attacks": ["badnet"], "pratios": [0.1],
    "seeds": [0], "clean_reference": True, "defenses": ["ft"], "retune": ["ra", "qra"], "analyses": ["lmc"],
    "set": {"attack": {"synthetic_n_train": 300, "synthetic_n_test": 100, "epochs": 1, "eval_every": 1},
            "defense": {"epochs": 1, "ratio": 0.2},
            "ra": {"epochs": 1, "ratio": 0.1, "poison_num": 5},
            "qra": {"epochs": 1, "clean_num": 20, "poison_num": 10, "hidden": [16], "eval_every": 1, "grid_n": 2},
            "lmc": {"points": 3, "ratio": 0.2}},
}
BUDGET = {f"{REC}/ra_budget_p1", f"{CLEAN}/ra_{REC}_budget_p1", f"{REC}/defense/ft/ra_budget_p1"}
ALL_KEYS = {REC, CLEAN, f"{REC}/ra", f"{CLEAN}/ra_{REC}", f"{REC}/defense/ft", f"{REC}/defense/ft/ra",
            f"{REC}/defense/ft/qra", f"{REC}/lmc_ft"}


def _yaml(path: Path, top: dict | None = None, **changes) -> Path:
    spec = {**yaml.safe_load(yaml.safe_dump(TINY)), **(top or {})}
    for k, v in changes.items():
        spec["set"][k] = {**spec["set"].get(k, {}), **v}
    path.write_text(yaml.safe_dump(spec))
    return path


def _run(yaml_path, study_dir, **kw):
    out = io.StringIO()
    kw.setdefault("threads", 1)  # = num_cpus of the tiny study's jobs on Ray: the same arithmetic on both executors
    oc = run_study(str(yaml_path), study_dir=str(study_dir), progress=False, out=out, **kw)
    return oc, out.getvalue()


@pytest.fixture(scope="module")
def tiny_study(tmp_path_factory):
    """The tiny study run once with the local executor: (yaml, study folder, outcome)."""
    base = tmp_path_factory.mktemp("study")
    y = _yaml(base / "tiny.yaml")
    oc, text = _run(y, base / "study_tiny")
    return y, base / "study_tiny", oc, text


def _copy(tiny_study, tmp_path) -> Path:
    dst = tmp_path / "study_tiny"
    shutil.copytree(tiny_study[1], dst)
    return dst


def test_first_run_runs_every_job_and_writes_results(tiny_study):
    _, sd, oc, text = tiny_study
    assert set(oc.keys("ran")) == ALL_KEYS and not oc.failed
    df = pd.read_csv(sd / "results.csv")
    assert sorted(df["defense"]) == ["clean", "ft", "none"]
    assert (df["status"] == "ok").all()
    for col in ("o_backdoor_asr", "o_robustness_asr", "p_robustness_asr", "attack_wall_s", "ra_wall_s"):
        assert df[col].notna().all(), col
    for col in ("detected_target", "true_target", "target_match", "target_votes"):  # no trigger inversion in this grid
        assert col in df.columns and df[col].isna().all(), col
    ft = df[df["defense"] == "ft"].iloc[0]
    assert not math.isnan(ft["qra_asr"]) and not math.isnan(ft["lmc_asr_mid"]) and ft["defense_wall_s"] > 0
    assert df["n_pruned"].isna().all() and df["pruning_threshold"].isna().all()  # no pruning defense in this grid
    # the backdoored model's own row: O-Robustness is the attacked model
    none = df[df["defense"] == "none"].iloc[0]
    assert none["o_robustness_asr"] == none["o_backdoor_asr"]
    assert "data:image/png;base64," in (sd / "report.html").read_text()
    assert "| ft | 1 |" in (sd / "report.md").read_text()
    assert text.strip().splitlines()[-1] == f"study folder: {sd}"
    # ordinary record folders that every entry point reads
    assert (sd / REC / "defense" / "ft" / "defense_result.pt").is_file() and (sd / REC / "attack_result.pt").is_file()


def test_second_run_runs_nothing(tiny_study, tmp_path):
    y, _, _, _ = tiny_study
    oc, _ = _run(y, _copy(tiny_study, tmp_path))
    assert oc.keys("ran") == [] and set(oc.keys("done")) == ALL_KEYS


def _header(sd: Path) -> dict:
    """report.md's header facts: label -> text (the '- **label**: text' lines)."""
    lines = [ln for ln in (sd / "report.md").read_text().splitlines() if ln.startswith("- **")]
    return dict(ln[4:].split("**: ", 1) for ln in lines)


def test_report_header_after_a_rerun_describes_the_outputs_not_the_rerun(tiny_study, tmp_path):
    """A rerun that runs nothing re-renders the report with the history of the outputs (the job markers): every job
    produced by the first run, its command and code; the rerun is the last run (0 ran)."""
    import json

    y, _, first, _ = tiny_study
    sd = _copy(tiny_study, tmp_path)
    oc, _ = _run(y, sd)
    n = len(ALL_KEYS)
    h = _header(sd)
    assert h["Jobs"].startswith(f"{n} jobs: {n} produced over 1 run, ") and "compute " in h["Jobs"]
    assert f"0 ran, {n} up to date, 0 failed, 0 skipped" in h["Last run"] and oc.run["id"] in h["Last run"]
    assert h["Command"].startswith("`python analysis/run_study.py --yaml_path ")
    assert h["Code"].startswith(("git ", "unknown")) and "Runs that produced the outputs" not in h  # one run
    hist = json.loads((sd / "study.json").read_text())["history"]
    assert [r["id"] for r in hist["runs"]] == [first.run["id"]] and hist["produced"] == n
    assert hist["compute_s"] == pytest.approx(sum(r["wall_s"] for r in first.results.values()), abs=0.1 * n)
    marker = json.loads((sd / REC / "log" / "study_job.json").read_text())
    assert marker["study_run"]["id"] == first.run["id"] and marker["study_run"]["code"]["commit"]
    html = (sd / "report.html").read_text()
    assert "produced over 1 run" in html and "class='legend'" in html and "<td class='ok'>" in html


def test_deleted_defense_reruns_only_it_and_its_dependents(tiny_study, tmp_path):
    y, _, first, _ = tiny_study
    sd = _copy(tiny_study, tmp_path)
    shutil.rmtree(sd / REC / "defense" / "ft")
    oc, _ = _run(y, sd)
    assert (set(oc.keys("ran"))
            == {f"{REC}/defense/ft", f"{REC}/defense/ft/ra", f"{REC}/defense/ft/qra", f"{REC}/lmc_ft"})
    assert set(oc.keys("done")) == ALL_KEYS - set(oc.keys("ran"))
    assert oc.results[f"{REC}/defense/ft"]["id"] == first.results[f"{REC}/defense/ft"]["id"]  # same config, same id
    h = _header(sd)  # the outputs now come from two runs
    assert h["Jobs"].startswith(f"{len(ALL_KEYS)} jobs: {len(ALL_KEYS)} produced over 2 runs")
    assert f"4 ran, {len(ALL_KEYS) - 4} up to date" in h["Last run"]
    runs = h["Runs that produced the outputs"]
    assert f"{first.run['id']} " in runs and f"{oc.run['id']} " in runs and "4 jobs" in runs


def test_changed_config_reruns_it_and_downstream(tiny_study, tmp_path):
    sd = _copy(tiny_study, tmp_path)
    y = _yaml(tmp_path / "tiny.yaml", ra={"lr": 0.02})
    dry = io.StringIO()
    run_study(str(y), study_dir=str(sd), dry_run=True, out=dry)
    lines = dry.getvalue().splitlines()
    assert any(f" {REC}/defense/ft/ra " in ln and "RUN (config changed)" in ln for ln in lines)
    assert any(f" {REC}/defense/ft/qra " in ln and "RUN (upstream config changed)" in ln for ln in lines)
    oc, _ = _run(y, sd)
    assert set(oc.keys("ran")) == {f"{REC}/ra", f"{CLEAN}/ra_{REC}", f"{REC}/defense/ft/ra", f"{REC}/defense/ft/qra"}


def test_growing_the_grid_runs_only_the_new_jobs(tiny_study, tmp_path):
    sd = _copy(tiny_study, tmp_path)
    y = _yaml(tmp_path / "tiny.yaml", top={"ra_poison_nums": [1]})  # P-ASR vs RA budget: one more RA per model
    oc, _ = _run(y, sd)
    assert set(oc.keys("ran")) == BUDGET and set(oc.keys("done")) == ALL_KEYS
    budget = pd.read_csv(sd / "ra_budget.csv")  # the main RA (5 poisoned samples) and the new one
    assert set(budget["poison_num"]) == {1, 5} and set(budget["defense"]) == {"none", "clean", "ft"}
    assert (sd / "figures" / "ra_budget_synthetic_badnet_0.1_cnn_small.png").is_file()


def test_failing_job_skips_its_dependents_and_is_listed(tiny_study, tmp_path, capsys):
    sd = _copy(tiny_study, tmp_path)
    y = _yaml(tmp_path / "tiny.yaml", ra={"poison_num": 500})  # more poisoned samples than exist: fails at run time
    assert main(["--yaml_path", str(y), "--study_dir", str(sd), "--no_progress"]) == 1
    out = capsys.readouterr().out
    ras = {f"{REC}/ra", f"{CLEAN}/ra_{REC}", f"{REC}/defense/ft/ra"}
    import json

    summary = json.loads((sd / "study.json").read_text())
    assert summary["state"] == "finished"
    assert {r["key"] for r in summary["failed"]} == ras
    assert {r["key"] for r in summary["skipped"]} == {f"{REC}/defense/ft/qra"}
    for r in summary["failed"]:
        assert f"FAILED {r['key']}" in out and r["log"] in out
        assert "Traceback" in Path(r["log"]).read_text() and "poison_num" in Path(r["log"]).read_text()
    df = pd.read_csv(sd / "results.csv")
    assert df["p_robustness_asr"].isna().all() and df["o_robustness_asr"].notna().all()


def test_results_read_the_target_detection_of_inversion_defenses(tmp_path):
    """detected_target, true_target, target_match and target_votes come from the defense's config.yaml."""
    from bdsafety.study.results import _target_detection

    (tmp_path / "config.yaml").write_text(yaml.safe_dump({"detected_target": 3, "true_target": 0, "target_match": False,
                                                          "target_votes": [1, 0, 0, 9]}))
    row = {}
    _target_detection(row, tmp_path)
    assert row == {"detected_target": 3, "true_target": 0, "target_match": False, "target_votes": "[1, 0, 0, 9]"}
    (tmp_path / "config.yaml").write_text(yaml.safe_dump({"detected_target": 3, "true_target": None,
                                                          "target_match": None, "target_votes": [1, 0, 0, 9]}))
    _target_detection(row, tmp_path)
    assert row["detected_target"] == 3 and row["true_target"] is None and row["target_match"] is None
    _target_detection(row, tmp_path / "nothing")  # a defense without inversion (or not run): empty
    assert set(row.values()) == {None}


def test_local_and_ray_give_the_same_results(tiny_study, tmp_path):
    pytest.importorskip("ray")
    y, sd_local, _, _ = tiny_study
    oc, _ = _run(y, tmp_path / "study_tiny", executor="ray", ray_num_cpus=2)
    assert set(oc.keys("ran")) == ALL_KEYS and not oc.failed
    a, b = pd.read_csv(sd_local / "results.csv"), pd.read_csv(tmp_path / "study_tiny" / "results.csv")
    assert timing_columns(a) and list(a.columns) == list(b.columns)
    pd.testing.assert_frame_equal(a.drop(columns=timing_columns(a)), b.drop(columns=timing_columns(b)))


@pytest.mark.slow
def test_ray_prepares_a_shared_inversion_once_and_gives_the_local_results(tmp_path, capsys):
    """On Ray, BTI-DBF(U) and pam on one record wait for a prepare task that computes their shared
    trigger inversion once (bdsafety.study.execute.prepare_job), instead of one of them holding a worker while the
    other computes it; the results are those of the local executor."""
    pytest.importorskip("ray")
    bti = {"n_rounds": 1, "epochs": 1, "ratio": 0.2, "bti_pretrain_epochs": 1, "bti_mask_epochs": 1,
           "bti_gen_epochs": 1}
    y = _yaml(tmp_path / "inv.yaml", top={"name": "inv", "defenses": ["bti_dbf", "pam"], "retune": [], "analyses": [],
                                         "clean_reference": False}, bti_dbf=bti, pam=bti)
    local, _ = _run(y, tmp_path / "local")
    capsys.readouterr()
    oc, _ = _run(y, tmp_path / "ray", executor="ray", ray_num_cpus=2)
    out = capsys.readouterr().out
    assert not oc.failed and not local.failed
    # the console says when the shared inversion starts and ends (jobs are silent while it runs)
    assert out.count("computing the shared trigger inversion") == 1, out
    assert out.count("shared trigger inversion prepared in") == 1, out
    rec = tmp_path / "ray" / REC
    assert len(list((rec / "bti_inversion").glob("*.pt"))) == 1
    logs = [(tmp_path / "ray" / "logs" / f"{REC}__defense__{d}.log").read_text() for d in ("bti_dbf", "pam")]
    assert sum("prepare" in log.splitlines()[0] for log in logs) == 1  # one prepare run, logged first by its job
    a, b = pd.read_csv(tmp_path / "local" / "results.csv"), pd.read_csv(tmp_path / "ray" / "results.csv")
    pd.testing.assert_frame_equal(a.drop(columns=timing_columns(a)), b.drop(columns=timing_columns(b)))


def test_paper_grid_dry_run_lists_its_jobs(capsys):
    attacks = [a for a in ("badnet", "blended", "ssba", "lc") if a in registry.names("attack")]
    defenses = [d for d in ("exact_purification", "anp", "i_bau", "ft_sam", "fst", "bti_dbf", "pam", "pam_reinvert")
                if d in registry.names("defense")]
    assert main(["--yaml_path", str(ROOT / "config" / "study" / "paper_cifar10.yaml"), "--dry_run",
                 "--record_root", "/nonexistent/record"]) == 0
    out = capsys.readouterr().out
    # per attack and seed: clean reference; per pratio (2): attack, RA on it and on the clean model, and per defense
    # the defense, its RA, QRA and LMC
    n = len(attacks) * 3 * (1 + 2 * (3 + 4 * len(defenses)))
    assert out.strip().splitlines()[-1] == f"{n} jobs, {n} to run"
    for a in {"ssba", "lc"} - set(attacks):
        assert f"attack '{a}' is not a registered attack" in out
    assert not Path("/nonexistent/record").exists()


SIG_REC = "sig_synthetic_cnn_small_p0.05_s0"


def test_clean_label_qra_jobs_planned_or_left_out_with_a_note(tmp_path, monkeypatch):
    """QRA on a clean-label attack (SIG) is planned when its record can rebuild the trigger (QRA then retriggers
    non-target-class training images); without that, every QRA job of the attack is left out and the dry run says
    why."""
    from bdsafety.attacks.base import Attack
    from bdsafety.attacks.sig import SIG
    from bdsafety.study.plan import build_plan
    from bdsafety.study.spec import load_study

    y = _yaml(tmp_path / "tiny_sig.yaml", top={"attacks": ["sig"], "pratios": [0.05]})
    plan = build_plan(load_study(y))
    assert f"{SIG_REC}/defense/ft/qra" in plan.by_key() and not any("qra" in n for n in plan.notes)
    monkeypatch.setattr(SIG, "record_trigger", Attack.record_trigger)  # a clean-label attack that cannot rebuild it
    plan = build_plan(load_study(y))
    assert not [k for k in plan.by_key() if k.endswith("/qra")]
    assert f"{SIG_REC}/defense/ft/ra" in plan.by_key()  # the rest of the grid stays
    out = io.StringIO()
    run_study(str(y), dry_run=True, study_dir=str(tmp_path / "sd"), out=out, progress=False)
    assert "note: qra on sig records: every job left out: sig is a clean-label attack" in out.getvalue()


@pytest.mark.slow
def test_sig_grid_with_anp_writes_pruning_and_retriggered_qra(tmp_path):
    """A tiny SIG grid with ANP: results.csv carries ANP's n_pruned and selected threshold, and QRA on the clean-label
    record runs from retriggered attacker-side training images (never test images, never the defender's pool part)."""
    import json
    from types import SimpleNamespace

    import numpy as np

    from bdsafety.attacks.base import load_data_for

    y = _yaml(tmp_path / "sig_anp.yaml", top={"attacks": ["sig"], "pratios": [0.05], "defenses": ["anp"]},
              anp={"nb_iter": 4, "print_every": 4, "ratio": 0.5, "pruning_sweep": False})
    oc, _ = _run(y, tmp_path / "sd")
    assert not oc.failed, oc.failed
    sd = tmp_path / "sd"
    df = pd.read_csv(sd / "results.csv").set_index("defense")
    meta = yaml.safe_load((sd / SIG_REC / "defense" / "anp" / "config.yaml").read_text())
    assert df.loc["anp", "n_pruned"] == meta["n_pruned"] == meta["anp"]["n_pruned"]
    thr = meta["pruning_threshold"]
    assert (math.isnan(df.loc["anp", "pruning_threshold"]) if thr is None
            else df.loc["anp", "pruning_threshold"] == thr)
    assert math.isnan(df.loc["none", "n_pruned"])
    q = sd / SIG_REC / "defense" / "anp" / "qra"
    qmeta = yaml.safe_load((q / "config.yaml").read_text())
    assert qmeta["triggered_source_used"] == "retrigger" and not math.isnan(df.loc["anp", "qra_asr"])
    idx = np.loadtxt(q / "log" / "poison_index.txt", dtype=np.int64, ndmin=1)
    rec_cfg = yaml.safe_load((sd / SIG_REC / "config.yaml").read_text())["config"]
    data = load_data_for(SimpleNamespace(**rec_cfg))  # the record's training labels
    assert len(idx) == 10 and (data.train_y[idx] != rec_cfg["attack_target"]).all()  # non-target training images
    pool = json.loads((sd / SIG_REC / "pool_split.json").read_text())
    assert not set(idx.tolist()) & set(pool["defender"] + pool["attacker"])  # outside the poisoned pool


def test_kind_wide_set_keys_apply_where_they_exist_and_typos_fail(tmp_path):
    """set.defense.epochs reaches FT but not ANP (which has no epochs; a note says so); set.defense.epoch is no
    defense's key: an error before any job runs."""
    from bdsafety.errors import ConfigError
    from bdsafety.study.plan import build_plan
    from bdsafety.study.spec import load_study

    plan = build_plan(load_study(_yaml(tmp_path / "ok.yaml", top={"defenses": ["ft", "anp"]})))
    by_key = {j.key: j for j in plan.jobs}
    assert by_key[f"{REC}/defense/ft"].config["epochs"] == 1 and "epochs" not in by_key[f"{REC}/defense/anp"].config
    plan = build_plan(load_study(_yaml(tmp_path / "anp.yaml", top={"defenses": ["anp"]})))
    assert any("set.defense: epochs not used" in n for n in plan.notes)
    with pytest.raises(ConfigError, match=r"set.defense has key\(s\) \['epoch'\]"):
        build_plan(load_study(_yaml(tmp_path / "typo.yaml", defense={"epoch": 1})))


def test_neutral_options_at_their_default_stay_out_of_job_ids(tmp_path):
    """An option added later with the earlier behaviour as default (Option.neutral: --param_limit) does not change
    the ids of finished jobs at that default; set to another value it is part of the id."""
    from bdsafety.study.plan import build_plan, job_id
    from bdsafety.study.spec import load_study

    plain = {j.key: j for j in build_plan(load_study(_yaml(tmp_path / "a.yaml"))).jobs}
    attack = plain[REC]
    assert "param_limit" not in attack.config and "abi_u" not in attack.config and "epochs" in attack.config
    assert attack.id == job_id("attack", "badnet", attack.config, [])
    abi = {j.key: j for j in build_plan(load_study(_yaml(tmp_path / "b.yaml", attack={"param_limit": "abi"}))).jobs}
    assert abi[REC].config["param_limit"] == "abi" and abi[REC].id != attack.id
    assert abi[f"{REC}/defense/ft"].id != plain[f"{REC}/defense/ft"].id  # downstream of another record


def test_pratios_attack_takes_each_attacks_own_pratio(tmp_path):
    """pratios: [attack]: every attack's record at the pratio its yaml gives (Adap-Blend's demo 0.01, BadNets' 0.1);
    anything else that is not a number in (0, 1) is an error naming the choice."""
    from bdsafety.errors import ConfigError
    from bdsafety.study.plan import build_plan
    from bdsafety.study.spec import load_study

    y = _yaml(tmp_path / "own.yaml", top={"attacks": ["badnet", "adaptive_blend"], "pratios": ["attack"],
                                          "defenses": [], "retune": [], "analyses": []})
    jobs = {j.key: j for j in build_plan(load_study(y)).jobs if j.kind == "attack" and j.point["role"] == "attack"}
    assert {k: j.config["pratio"] for k, j in jobs.items()} == {
        "badnet_synthetic_cnn_small_p0.1_s0": 0.1, "adaptive_blend_synthetic_cnn_small_p0.01_s0": 0.01}
    with pytest.raises(ConfigError, match="pratios must be numbers in \\(0, 1\\), or 'attack'"):
        load_study(_yaml(tmp_path / "bad.yaml", top={"pratios": ["own"]}))


def test_study_yaml_typos_are_errors_naming_the_valid_keys(tmp_path):
    from bdsafety.errors import ConfigError
    from bdsafety.study.plan import build_plan
    from bdsafety.study.spec import load_study

    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({**TINY, "defences": ["ft"]}))
    with pytest.raises(ConfigError, match="Did you mean 'defenses'"):
        load_study(bad)
    y = _yaml(tmp_path / "tiny.yaml", ft={"epoch": 2})
    with pytest.raises(ConfigError, match="ft has no key.*epoch.*valid: .*epochs"):
        build_plan(load_study(y))


def test_draws_and_control_add_only_their_jobs_and_the_verdicts(tiny_study, tmp_path):
    sd = _copy(tiny_study, tmp_path)
    y = _yaml(tmp_path / "tiny.yaml", top={"ra_draws": 2, "ra_control": True})
    oc, _ = _run(y, sd)
    new = {f"{REC}/ra_d1", f"{REC}/ra_control", f"{REC}/ra_control_d1", f"{CLEAN}/ra_{REC}_d1",
           f"{CLEAN}/ra_{REC}_control", f"{CLEAN}/ra_{REC}_control_d1", f"{REC}/defense/ft/ra_d1",
           f"{REC}/defense/ft/ra_control", f"{REC}/defense/ft/ra_control_d1"}
    assert set(oc.keys("ran")) == new and set(oc.keys("done")) == ALL_KEYS and not oc.failed
    runs = pd.read_csv(sd / "ra_runs.csv")
    assert len(runs) == 12 and set(runs["role"]) == {"ra", "ra_control"}
    assert (set(runs[runs["draw"] == 1]["random_seed"]) == {1000}
            and set(runs[runs["role"] == "ra_control"]["poison_num"]) == {0})
    # draw k of every model of a seed retunes on the same poisoned samples: the paired comparisons rely on it
    idx = {m: (sd / k / "log" / "poison_index.txt").read_text() for m, k in
           (("ft", f"{REC}/defense/ft/ra_d1"), ("clean", f"{CLEAN}/ra_{REC}_d1"), ("none", f"{REC}/ra_d1"))}
    assert idx["ft"] == idx["clean"] == idx["none"] != (sd / REC / "ra" / "log" / "poison_index.txt").read_text()
    df = pd.read_csv(sd / "results.csv")
    assert (df["p_robustness_asr_draws_n"] == 2).all() and df["ra_control_asr"].notna().all()
    ft = df[df["defense"] == "ft"].iloc[0]
    mine = runs[(runs["defense"] == "ft") & (runs["role"] == "ra")]
    assert ft["p_robustness_asr_draws"] == pytest.approx(mine["p_asr"].mean())
    assert 0 <= ft["p_der"] <= 1 and 0 <= ft["der"] <= 1
    report = (sd / "report.md").read_text()
    assert "## Verdicts" in report and "P-ASR - clean" in report and "| ft | 1 | 2 |" in report


def test_a_study_never_replaces_a_hand_made_record_with_a_jobs_name(tmp_path):
    sd = tmp_path / "study_tiny"
    mine = sd / REC / "defense" / "mine"
    mine.mkdir(parents=True)
    (sd / REC / "attack_result.pt").write_bytes(b"a record made by hand")
    (mine / "defense_result.pt").write_bytes(b"a defense made by hand")
    y = _yaml(tmp_path / "tiny.yaml", top={"retune": [], "analyses": [], "defenses": []})
    assert main(["--yaml_path", str(y), "--study_dir", str(sd), "--no_progress"]) == 1
    import json

    failed = json.loads((sd / "study.json").read_text())["failed"]
    assert [r["key"] for r in failed] == [REC] and "this study did not make" in failed[0]["error"]
    assert (sd / REC / "attack_result.pt").read_bytes() == b"a record made by hand"
    assert (mine / "defense_result.pt").read_bytes() == b"a defense made by hand"


def test_an_attack_rerun_refuses_to_delete_an_external_defense_folder(tiny_study, tmp_path):
    sd = _copy(tiny_study, tmp_path)
    ext = sd / REC / "defense" / "bb_ft"
    ext.mkdir()
    shutil.copyfile(sd / REC / "defense" / "ft" / "defense_result.pt", ext / "defense_result.pt")  # no study marker
    # the attack must rerun
    y = _yaml(tmp_path / "tiny.yaml", top={"external_defenses": ["bb_ft"]}, attack={"lr": 0.02})
    oc, _ = _run(y, sd)
    assert REC in {r["key"] for r in oc.failed} and "bb_ft" in oc.results[REC]["error"]
    assert (ext / "defense_result.pt").is_file() and (sd / REC / "defense" / "ft" / "defense_result.pt").is_file()


def test_an_output_killed_before_its_marker_is_rerun_only_when_the_study_started_it(tiny_study, tmp_path):
    from bdsafety.study.execute import MARKER, started_path

    sd = _copy(tiny_study, tmp_path)
    key = f"{REC}/defense/ft/ra"
    (sd / key / "log" / MARKER).unlink()  # complete output, no marker: a hand-made folder ...
    oc, _ = _run(_yaml(tmp_path / "tiny.yaml"), sd)
    assert key in {r["key"] for r in oc.failed}
    started_path(sd, key).write_text("id")  # ... or this study's job killed between its output and its marker
    oc, _ = _run(_yaml(tmp_path / "tiny.yaml"), sd)
    assert key in oc.keys("ran") and not oc.failed and not started_path(sd, key).exists()


def test_typos_and_study_owned_keys_stop_a_real_run(tmp_path, capsys):
    from bdsafety.errors import ConfigError
    from bdsafety.study.plan import build_plan
    from bdsafety.study.spec import load_study

    y = _yaml(tmp_path / "a.yaml", top={"attacks": ["badnet", "badnett"]})
    with pytest.raises(ConfigError, match="badnett.*did you mean 'badnet'.*expected_later"):
        run_study(str(y), study_dir=str(tmp_path / "s"), out=io.StringIO())
    dry = io.StringIO()
    run_study(str(y), study_dir=str(tmp_path / "s"), dry_run=True, out=dry)
    assert "error (a real run stops here)" in dry.getvalue()
    ok = _yaml(tmp_path / "b.yaml", top={"defenses": ["ft", "not_merged_yet"], "expected_later": ["not_merged_yet"]})
    assert not load_study(ok).unknown and any("not_merged_yet" in n for n in load_study(ok).notes)
    with pytest.raises(ConfigError, match="qra_defenses names 'fts'"):
        run_study(str(_yaml(tmp_path / "c.yaml", top={"qra_defenses": ["fts"]})), study_dir=str(tmp_path / "s"),
                  out=io.StringIO())
    for scope, key in (("defense", "save_name"), ("ra", "result_file"), ("attack", "random_seed")):
        with pytest.raises(ConfigError, match=f"set.{scope}.{key}: '{key}' is set by the study itself"):
            load_study(_yaml(tmp_path / "d.yaml", **{scope: {key: "x"}}))
    with pytest.raises(ConfigError, match="trust_record.*command-line decision --trust_record"):
        load_study(_yaml(tmp_path / "e.yaml", defense={"trust_record": True}))
    with pytest.raises(ConfigError, match="same output folder"):
        build_plan(load_study(_yaml(tmp_path / "f.yaml", top={"pratios": [0.1, 0.1000000001]})))
    with pytest.raises(ConfigError, match="lists badnet more than once"):
        load_study(_yaml(tmp_path / "g.yaml", top={"attacks": ["badnet", "badnet"]}))


def test_trust_record_is_a_command_line_flag_of_the_study(tmp_path):
    from bdsafety.study.plan import build_plan
    from bdsafety.study.spec import load_study

    st = load_study(_yaml(tmp_path / "t.yaml"))
    st.trust_record = True
    jobs = build_plan(st).jobs
    assert all(j.overrides.get("trust_record") is True for j in jobs if j.kind in ("defense", "retune"))
    out = io.StringIO()
    run_study(str(tmp_path / "t.yaml"), study_dir=str(tmp_path / "s"), dry_run=True, out=out, trust_record=True)
    assert main(["--yaml_path", str(tmp_path / "t.yaml"), "--dry_run", "--trust_record",
                 "--study_dir", str(tmp_path / "s")]) == 0


def test_study_mistakes_are_one_line_errors(tmp_path):
    from bdsafety.errors import ConfigError
    from bdsafety.study.executors import start_ray
    from bdsafety.study.spec import load_study

    (tmp_path / "afile").write_text("x")
    with pytest.raises(ConfigError, match="is a file"):
        load_study(_yaml(tmp_path / "a.yaml"), study_dir=str(tmp_path / "afile"))
    with pytest.raises(ConfigError, match="configs.attack = '{datset}_paper' is not a config name pattern"):
        load_study(_yaml(tmp_path / "b.yaml", top={"configs": {"attack": "{datset}_paper"}}))
    with pytest.raises(SystemExit):
        main(["--yaml_path", str(tmp_path / "a.yaml"), "--executor", "ray", "--ray_num_cpus", "-1"])
    with pytest.raises(ConfigError, match="ray_num_cpus must be an integer >= 1"):
        start_ray(None, num_cpus=0)


@pytest.mark.parametrize("point", ["train", "write", "exchanged"])
def test_a_study_killed_during_a_job_keeps_complete_outputs_and_resumes(tiny_study, tmp_path, point):
    import subprocess
    import sys

    y = tiny_study[0]
    sd = _copy(tiny_study, tmp_path)
    shutil.rmtree(sd / REC / "defense" / "ft")  # the ft job and its dependents rerun; the kill hits the ft job first
    if point == "exchanged":  # a rerun that replaces an existing output: killed right after the atomic exchange
        shutil.copytree(tiny_study[1] / REC / "defense" / "ft", sd / REC / "defense" / "ft")
        y = _yaml(tmp_path / "tiny.yaml", ft={"lr": 0.02})
    env = dict(os.environ, BDSAFETY_FAULT=point, PYTHONPATH=str(ROOT))
    p = subprocess.run([sys.executable, str(ROOT / "analysis" / "run_study.py"), "--yaml_path", str(y),
                        "--study_dir", str(sd), "--no_progress", "--threads", "1"], env=env, capture_output=True,
                       text=True, timeout=600)
    assert p.returncode == 99, p.stderr[-2000:]  # died like kill -9 (os._exit at the fault point)
    ft = sd / REC / "defense" / "ft"
    # the old complete output or none: never a partial one
    assert not ft.exists() or (ft / "defense_result.pt").is_file()
    oc, _ = _run(y, sd)
    assert not oc.failed and {f"{REC}/defense/ft", f"{REC}/defense/ft/ra"} <= set(oc.keys("ran"))
    assert set(oc.keys("ran")) | set(oc.keys("done")) == ALL_KEYS
    assert ((ft / "defense_result.pt").is_file()
            and not [q for q in (sd / REC / "defense").iterdir() if q.name.startswith(".")])


def test_report_colours_follow_the_verdict_thresholds():
    from bdsafety.study.report import tone
    from bdsafety.study.stats import VERDICT_DEFAULTS as th

    assert tone("P-ASR", "12.0 [8.0, 16.0]", th)[0] == "ok" and tone("P-ASR", "85.3", th)[0] == "bad"
    assert tone("O-Robustness ASR", "20.0 ± 1.0 [19.0, 21.0]", th)[0] == "ok"  # at the threshold: purified
    assert tone("P-ASR - clean", "30.0 [12.0, 48.0]", th)[0] == "bad"  # returns: above the margin, interval above 0
    assert tone("P-ASR - clean", "30.0 [-2.0, 62.0]", th)[0] == "warn" and tone("P-ASR - clean", "3.0", th)[0] == "ok"
    assert tone("verdict", "purified, backdoor returns under RA", th)[0] == "bad"
    assert tone("verdict", "purified, stays purified under RA; dormant: returns under benign retuning", th)[0] == "warn"
    assert tone("verdict", "reference (never backdoored)", th) == ("", "") and tone("C-Acc", "91.0", th) == ("", "")
    assert tone("P-DER", "1.000", th)[1] == "background:hsl(120,70%,85%)" and "hsl(0," in tone("DER", "0.450", th)[1]
    assert tone("P-ASR", "-", th) == ("", "")


# what report.html's check reads from the page: every image's decoded size, the rows of each table (first cell,
# class of each cell), each grid point's tables and figures boxes (for "beside"), the header
PAGE_CHECK = """(() => {
  const box = e => { const r = e.getBoundingClientRect(); return {left: r.left, right: r.right, \
top: r.top, bottom: r.bottom}; };
  return {
    images: [...document.images].map(i => ({alt: i.alt, complete: i.complete, w: i.naturalWidth, h: i.naturalHeight})),
    tables: [...document.querySelectorAll('table')].map(t => ({cls: t.className,
      head: [...t.tHead.rows[0].cells].map(c => c.textContent),
      rows: [...t.tBodies[0].rows].map(r => [...r.cells].map(c => [c.textContent, c.className]))})),
    points: [...document.querySelectorAll('.point')].map(p => ({tables: box(p.querySelector('.tables')),
      figs: [...p.querySelectorAll('.figs img')].map(box)})),
    head: document.querySelector('dl.head').innerText,
  };
})()"""


@pytest.mark.slow
def test_report_html_in_a_headless_browser(tiny_study, tmp_path):
    """report.html of the tiny study in a real headless Chromium: no console error, every image decodes, the tables
    hold the expected rows with coloured cells, the figures sit beside their tables; the screenshot is kept."""
    import matplotlib.image  # heavy: only for this test

    if browser.find_chromium() is None:
        pytest.skip("no chromium binary on PATH (apt-get install chromium, or set BDSAFETY_CHROMIUM); "
                    ".ci/run installs it")
    _, sd, oc, _ = tiny_study
    t0 = time.time()
    page = browser.load(sd / "report.html", PAGE_CHECK)
    took = time.time() - t0
    shot = browser.keep_screenshot(page, tmp_path / "report_tiny.png")
    print(f"report screenshot: {shot} (browser {took:.1f}s)")
    assert page.errors == [], page.console
    v = page.value
    # RA curves, LMC path and QRA examples of the one grid point
    assert len(v["images"]) == 3 and all(i["complete"] and i["w"] > 0 and i["h"] > 0 for i in v["images"]), v["images"]
    tables = {t["cls"]: t for t in v["tables"]}
    assert set(tables) == {"verdicts", "claims", "stages"}
    verdicts = tables["verdicts"]
    assert [r[0][0] for r in verdicts["rows"]] == ["none", "clean", "ft"]
    assert {"P-DER", "verdict"} <= set(verdicts["head"])
    col = {c: i for i, c in enumerate(verdicts["head"])}
    classes = {r[0][0]: r[col["ASR"]][1] for r in verdicts["rows"]}
    assert classes["none"] == "bad" and classes["clean"] == "ok"  # the backdoored model's ASR, the clean model's
    assert ([r[0][0] for r in tables["stages"]["rows"]] == ["none", "clean", "ft"]
            and "P-DER" in tables["stages"]["head"])
    (point,) = v["points"]
    assert point["figs"] and all(f["left"] >= point["tables"]["right"] and f["top"] < point["tables"]["bottom"]
                                 for f in point["figs"][:1]), point  # the first figure beside the tables
    assert "produced over 1 run" in v["head"] and oc.run["id"] in v["head"]
    img = matplotlib.image.imread(shot)
    assert img.shape[1] >= 1200 and img.shape[0] > 600  # the page at 1600 px, less a scrollbar


def test_report_header_facts_from_the_markers_history():
    """summarize + header_facts on hand-made results: outputs of two recorded runs and one marker from before study runs
    were recorded, a failed and a skipped job, two commits."""
    from bdsafety.study.history import header_facts, summarize

    code_a, code_b = ({"commit": "a" * 40, "dirty": False, "source": "git checkout x"},
                      {"commit": "b" * 40, "dirty": True, "source": "git checkout x"})
    r1 = {"id": "20250101-000000-aaaaaa", "started": "2025-01-01 00:00:00",
          "command": "python analysis/run_study.py -a", "cwd": "/w", "executor": "local", "code": code_a}
    r2 = {**r1, "id": "20250102-000000-bbbbbb", "started": "2025-01-02 00:00:00",
          "command": "python analysis/run_study.py -b", "code": code_b}
    results = {"j1": {"status": "done", "wall_s": 60.0, "finished": "2025-01-01 00:01:00", "study_run": r1},
               "j2": {"status": "done", "wall_s": 30.0, "finished": "2024-12-31 00:00:00", "study_run": None},
               "j3": {"status": "ran", "wall_s": 90.0, "finished": "2025-01-02 00:02:00", "study_run": r2},
               "j4": {"status": "failed", "wall_s": 5.0}, "j5": {"status": "skipped"}}
    hist = summarize(results, r2, wall_s=100.0)
    assert (hist["produced"] == 3 and hist["compute_s"] == 180.0
            and [r["id"] for r in hist["runs"]] == [None, r1["id"], r2["id"]])
    f = header_facts(hist)
    assert f["jobs"].startswith("5 jobs: 3 produced over 3 runs, finished between 2024-12-31 00:00:00 "
                                "and 2025-01-02 00:02:00;")
    assert "2 not produced" in f["jobs"] and "compute 3m 00s" in f["jobs"]
    assert f["last_run"] == (f"{r2['id']} (started 2025-01-02 00:00:00, local executor, 1m 40s): 1 ran, "
                             "2 up to date, 1 failed, 1 skipped")
    assert f["command"] == "`python analysis/run_study.py -b` in /w"
    assert "git aaaaaaaaaaaa, git checkout x (1 jobs)" in f["code"] and "git bbbbbbbbbbbb (dirty" in f["code"]
    assert f["runs"][0].startswith("earlier run(s) that did not record their run: 1 jobs")


def test_chunks_of_a_grid_merge_into_one_report(tiny_study, tmp_path):
    """Two chunks' report folders (the tiny study as seed 0, and its tables relabelled as seed 1) merge into one report
    whose verdict table counts both seeds; giving a chunk twice is an error naming it."""
    from bdsafety.errors import ConfigError
    from bdsafety.study.merge import main as merge_main

    _, sd, _, _ = tiny_study
    a = tmp_path / "badnet_s0"
    assert merge_main(["--inputs", str(sd), "--out", str(a), "--chunk", "badnet_s0"]) == 0  # exported for committing
    assert {"results.csv", "ra_runs.csv", "chunks.json", "report.md"} <= {p.name for p in a.iterdir()}
    b = tmp_path / "badnet_s1"
    b.mkdir()
    for t in ("results.csv", "ra_runs.csv", "ra_curves.csv"):
        if (a / t).is_file():
            f = pd.read_csv(a / t).drop(columns="chunk")
            f["seed"] = 1
            if "record" in f:
                f["record"] = f["record"].str.replace("_s0", "_s1")
            f["chunk"] = "badnet_s1"
            f.to_csv(b / t, index=False)
    (b / "chunks.json").write_text((a / "chunks.json").read_text().replace("badnet_s0", "badnet_s1"))
    out = tmp_path / "merged"
    assert merge_main(["--inputs", str(a), str(b), "--out", str(out)]) == 0
    md = (out / "report.md").read_text()
    assert "## Chunks" in md and "- `badnet_s0`" in md and "- `badnet_s1`" in md and "analysis/run_study.py" in md
    df = pd.read_csv(out / "results.csv")
    assert sorted(df["seed"].unique()) == [0, 1] and set(df["chunk"]) == {"badnet_s0", "badnet_s1"}
    row = [ln for ln in md.splitlines() if ln.startswith("| ft |")][0]
    assert row.split("|")[2].strip() == "2"  # seeds
    with pytest.raises(ConfigError, match="the inputs overlap.*badnet_s0"):
        merge_main(["--inputs", str(a), str(a), "--out", str(tmp_path / "twice")])


def _register_probe(tmp_path, monkeypatch, base, **fields):
    """Register a new method ``fields['name']`` in the test only, with ``base``'s demo.yaml as its only config."""
    cdir = tmp_path / fields["name"]
    cdir.mkdir()
    shutil.copy(base.config_path("demo"), cdir / "demo.yaml")

    class _Probe(registry.Method):
        @property
        def config_dir(self):
            return cdir

    probe = _Probe(kind=base.kind, run=base.run, description="probe", folder=fields["name"], **fields)
    monkeypatch.setitem(registry._REGISTRY, (base.kind, fields["name"]), probe)
    return probe


def test_a_new_retuning_attack_is_planned_from_its_declarations_alone(tmp_path, monkeypatch):
    """The planner has no case for any retuning attack: a new one (here 'probe', registered in the test with RA's run
    and schema plus QRA's ra_name) is planned from what it declares -- the models it runs on, its needs (ra_model: after
    the same model's RA, reading its folder name), its variants and draws, and <method>_defenses -- with no change to
    the planner."""
    from bdsafety.errors import ConfigError
    from bdsafety.study.plan import build_plan
    from bdsafety.study.spec import load_study

    ra = registry.get("retune", "ra")
    ra_name = registry.get("retune", "qra").schema()["ra_name"]
    _register_probe(tmp_path, monkeypatch, ra, name="probe", schema=lambda: {**ra.schema(), "ra_name": ra_name},
                    needs=frozenset({"defense", "ra_model", "poisoned_pool"}), on=("clean", "defense"),
                    variants=lambda st: [registry.Variant(), registry.Variant("probe_p2", "_p2", {"poison_num": 2}, 2)])
    y = _yaml(tmp_path / "p.yaml", top={"retune": ["probe", "ra"], "analyses": [], "defenses": ["ft", "fst"],
                                        "probe_defenses": ["fst"]})
    jobs = build_plan(load_study(y)).by_key()
    fst = f"{REC}/defense/fst"
    want = {f"{fst}/probe", f"{fst}/probe_p2", f"{fst}/probe_p2_d1", f"{CLEAN}/probe_{REC}", f"{CLEAN}/probe_{REC}_p2",
            f"{CLEAN}/probe_{REC}_p2_d1"}
    assert {k for k in jobs if "probe" in k} == want  # not on ft (probe_defenses), not on the record's own model
    j = jobs[f"{fst}/probe_p2_d1"]
    assert set(j.deps) == {fst, REC, f"{fst}/ra"} and j.overrides["ra_name"] == "ra"  # after (and reading) fst's RA
    assert j.point["role"] == "probe_p2" and j.point["draw"] == 1 and j.overrides["poison_num"] == 2
    assert j.config["random_seed"] == 1000  # draw 1 of seed 0
    c = jobs[f"{CLEAN}/probe_{REC}"]
    assert c.overrides["poison_source"] == REC and c.overrides["ra_name"] == f"ra_{REC}"
    assert set(c.deps) == {CLEAN, REC, f"{CLEAN}/ra_{REC}"}
    with pytest.raises(ConfigError, match="retune lists probe without ra"):
        load_study(_yaml(tmp_path / "q.yaml", top={"retune": ["probe"], "analyses": []}))


def test_a_new_analysis_is_planned_from_its_declarations_alone(tmp_path, monkeypatch):
    """A new analysis (here 'probe_an', registered in the test with LMC's run, schema and outputs) is planned from
    what it declares -- on each defense's model, one folder per model beside the defense folders -- with no change to
    the planner; its registered summary gives its results.csv columns (tests/test_outputs.py runs such a method)."""
    from bdsafety.study.plan import build_plan
    from bdsafety.study.spec import load_study

    lmc = registry.get("analysis", "lmc")
    _register_probe(tmp_path, monkeypatch, lmc, name="probe_an", schema=lmc.schema, needs=frozenset({"defense"}),
                    on=("defense",), outputs=lmc.outputs, summary=lambda folder: {"probe_an_x": 1.0})
    y = _yaml(tmp_path / "p.yaml", top={"retune": ["ra"], "analyses": ["probe_an"], "defenses": ["ft", "fst"]})
    plan = build_plan(load_study(y))
    jobs = plan.by_key()
    assert {k for k in jobs if "probe_an" in k} == {f"{REC}/probe_an_ft", f"{REC}/probe_an_fst"}
    j = jobs[f"{REC}/probe_an_fst"]
    assert set(j.deps) == {f"{REC}/defense/fst", REC} and j.overrides["defense"] == ["fst"]
    assert plan.mains[(REC, "fst")]["probe_an"] == f"{REC}/probe_an_fst"


def test_an_attacks_declared_needs_are_planned(tmp_path):
    """Every kind's needs are honoured the same way: LC with lc_reference standard attacks the clean reference record,
    so the planner runs the grid point's clean reference first and hands it over under LC's own key, lc_clean_record
    (registry: needs_for, need_keys); without a clean reference in the study that job is left out with a note; the
    default LC (adversarial reference, made inside the attack) needs nothing and waits for nothing."""
    from bdsafety.study.plan import build_plan
    from bdsafety.study.spec import load_study

    top = {"attacks": ["lc"], "defenses": ["ft"], "retune": ["ra"], "analyses": []}
    rec, clean = "lc_synthetic_cnn_small_p0.1_s0", "clean-lc_synthetic_cnn_small_s0"
    jobs = build_plan(load_study(_yaml(tmp_path / "s.yaml", top=top, lc={"lc_reference": "standard"}))).by_key()
    assert jobs[rec].deps == [clean] and jobs[rec].overrides["lc_clean_record"] == clean
    assert jobs[clean].deps == [] and "lc_clean_record" not in jobs[clean].overrides  # pratio 0 needs none
    assert f"{rec}/defense/ft/ra" in jobs
    plan = build_plan(load_study(_yaml(tmp_path / "n.yaml", top={**top, "clean_reference": False},
                                       lc={"lc_reference": "standard"})))
    assert not plan.jobs and any(f"{rec}: lc (as configured) needs the clean reference" in n for n in plan.notes)
    jobs = build_plan(load_study(_yaml(tmp_path / "a.yaml", top=top))).by_key()
    assert jobs[rec].deps == [] and "lc_clean_record" not in jobs[rec].overrides


def test_job_times_find_the_critical_path(tmp_path):
    """jobs.csv / the report's Time section: each job's wall time from its marker and the chain of dependent jobs with
    the largest summed time (a -> c here, 30 s, not a -> b or the lone d); a job without a current output counts 0."""
    import json
    from types import SimpleNamespace

    from bdsafety.study.execute import MARKER
    from bdsafety.study.plan import Job
    from bdsafety.study.report import time_lines
    from bdsafety.study.results import job_times

    walls = {"a": 10.0, "a/b": 5.0, "a/c": 20.0, "d": 3.0, "a/c/e": None}
    deps = {"a": [], "a/b": ["a"], "a/c": ["a"], "d": [], "a/c/e": ["a/c"]}
    jobs = [Job(key=k, kind="defense", method=k[-1], yaml_path=None, overrides={}, deps=deps[k], resources={}, point={})
            for k in walls]
    for k, w in walls.items():
        if w is not None:
            (tmp_path / k / "log").mkdir(parents=True)
            (tmp_path / k / "log" / MARKER).write_text(json.dumps({"wall_s": w}))
    t = job_times(SimpleNamespace(jobs=jobs), tmp_path).set_index("key")
    assert t.loc["a/c", "wall_s"] == 20.0 and math.isnan(t.loc["a/c/e", "wall_s"])
    assert set(t.index[t["on_critical_path"]]) == {"a", "a/c"}  # e (no time) adds nothing
    lines = time_lines(t.reset_index())
    assert "Compute: 38 s summed over 4 jobs" in lines[0] and "Critical path: 30 s" in lines[0]
    assert lines[1].startswith("Longest jobs: `a/c` (c, 20 s)")
    # only the current outputs count
    t = job_times(SimpleNamespace(jobs=jobs), tmp_path, valid={"d"}).set_index("key")
    assert t["wall_s"].notna().sum() == 1


def test_verdict_tables_over_several_grid_points_without_a_clean_reference():
    """Two grid points (attacks a and b), benign-retune controls and no clean reference (verdicts judged on P-ASR
    alone): one verdict table per point, the dormant note where the control brings the backdoor back (regression: the
    control table of the next point was overwritten by a per-defense value)."""
    from bdsafety.study.report import verdict_tables
    from bdsafety.study.stats import VERDICT_DEFAULTS

    rows, runs = [], []
    for attack in ("a", "b"):
        for seed in (0, 1):
            rec = f"{attack}_s{seed}"
            for d, asr, p_asr, ctrl in (("none", 0.95, 0.95, 0.95), ("fst", 0.01, 0.40, 0.01),
                                        ("pam", 0.01, 0.02, 0.60)):
                rows.append({"dataset": "synthetic", "attack": attack, "pratio": 0.1, "model": "m", "defense": d,
                             "seed": seed, "record": rec, "o_backdoor_acc": 0.99, "o_backdoor_asr": 0.95,
                             "o_robustness_acc": 0.95, "o_robustness_asr": asr, "der": 0.9})
                for role, v in (("ra", p_asr), ("ra_control", ctrl)):
                    runs.append({"dataset": "synthetic", "attack": attack, "pratio": 0.1, "model": "m", "defense": d,
                                 "seed": seed, "record": rec, "role": role, "draw": 0, "p_asr": v})
    df = pd.DataFrame(rows)
    df["target_match"] = [True if r["defense"] == "pam" else None for r in rows]  # only PAM inverts a trigger
    out = verdict_tables(df, pd.DataFrame(runs), dict(VERDICT_DEFAULTS))
    assert len(out) == 2
    assert out[0][1].set_index("defense")["inverted target right"].to_dict() == {"none": "-", "fst": "-", "pam": "2/2"}
    for _title, table, _claims in out:
        v = table.set_index("defense")["verdict"]
        assert "returns under RA" in v["fst"] and "dormant" in v["pam"] and "dormant" not in v["fst"]


def test_claim_a_needs_a_purified_model():
    """Claim (a), 'superficial defenses regain the backdoor under RA', is about purified models: a defense that left the
    backdoor in place (ASR above purified_asr) is 'n/a: not purified', not a 'yes' from its high P-ASR (the first
    CIFAR-10-size chunk: BTI-DBF(U) with a wrongly inverted target kept ASR 72.6 and was counted as regaining)."""
    from bdsafety.study.report import claims_table
    from bdsafety.study.stats import VERDICT_DEFAULTS

    rows, runs = [], []
    for seed in (0, 1, 2):
        for d, asr, p_asr in (("clean", 0.01, 0.03), ("fst", 0.01, 0.40), ("bti_dbf", 0.75, 0.80)):
            rows.append({"defense": d, "seed": seed, "o_robustness_asr": asr, "o_robustness_acc": 0.9})
            for draw in range(2):
                runs.append({"defense": d, "seed": seed, "draw": draw, "p_asr": p_asr + 0.01 * (seed + draw)})
    t = claims_table(pd.DataFrame(rows), pd.DataFrame(runs), dict(VERDICT_DEFAULTS)).set_index("defense")
    assert t.loc["fst", "holds"] == "yes"
    assert t.loc["bti_dbf", "holds"] == "n/a: not purified (ASR 75.0% > 20%)"


def test_claim_c_says_where_pam_did_not_purify_and_whether_its_inversion_was_right():
    """Claim (c) fails plainly where PAM left the backdoor in place, and the table says why where it can: on how many
    seeds it did not purify and on how many its trigger inversion found the wrong target (the first CIFAR-10-size
    chunk: PAM kept ASR 80.1 after an inversion that found class 6 instead of 0; the report said only 'no')."""
    from bdsafety.study.report import claims_table
    from bdsafety.study.stats import VERDICT_DEFAULTS

    rows, runs = [], []
    for seed in (0, 1, 2):
        for d, asr, p_asr, match in (("clean", 0.01, 0.03, None), ("fst", 0.01, 0.40, None),
                                     ("pam", 0.80 if seed == 0 else 0.01, 0.85 if seed == 0 else 0.05, seed != 0),
                                     ("pam_reinvert", 0.01, 0.04, True)):
            rows.append({"defense": d, "seed": seed, "o_robustness_asr": asr, "o_robustness_acc": 0.9,
                         "target_match": match})
            for draw in range(2):
                runs.append({"defense": d, "seed": seed, "draw": draw, "p_asr": p_asr + 0.01 * (seed + draw)})
    t = claims_table(pd.DataFrame(rows), pd.DataFrame(runs), dict(VERDICT_DEFAULTS))
    t = t[t["comparison"].str.startswith("P-ASR")].set_index("defense")
    assert t.loc["pam", "holds"].endswith("; not purified on 1/3 seeds (ASR > 20%), inverted target wrong on 1/3")
    assert t.loc["pam_reinvert", "holds"] == "yes"


def test_a_one_seed_claim_says_which_interval_it_has():
    """One seed: a P-ASR difference has an interval over the RA draws, a C-Acc difference (one value per seed) has
    none, and the claims table says which (regression: the C-Acc row read 'interval over RA draws only')."""
    from bdsafety.study.report import claims_table
    from bdsafety.study.stats import VERDICT_DEFAULTS

    rows, runs = [], []
    for d, acc, p_asr in (("clean", 0.92, 0.03), ("fst", 0.72, 0.10), ("pam", 0.89, 0.05)):
        rows.append({"defense": d, "seed": 0, "o_robustness_asr": 0.01, "o_robustness_acc": acc})
        for draw in range(3):
            runs.append({"defense": d, "seed": 0, "draw": draw, "p_asr": p_asr + 0.01 * draw})
    t = claims_table(pd.DataFrame(rows), pd.DataFrame(runs), dict(VERDICT_DEFAULTS)).set_index("comparison")
    assert t.loc["P-ASR(pam) - P-ASR(fst)", "holds"] == "yes (one seed: interval over RA draws only)"
    assert t.loc["C-Acc(pam) - C-Acc(fst)", "holds"] == "yes (one value: no interval)"


def test_a_chunk_export_names_the_command_that_produced_its_outputs():
    """A later run that only re-read the outputs (0 ran) is the report's last run, but the chunk export (merge's
    chunks.json) names the run that produced them."""
    from bdsafety.study.history import header_facts

    made = {"id": "r1", "first": "2026-12-07 04:35:10", "last": "2026-12-07 05:51:00", "jobs": 108, "compute_s": 9000,
            "code": None, "command": "python analysis/run_study.py --executor ray", "cwd": "/w", "started": "x"}
    last = {"id": "r2", "started": "y", "executor": "local", "wall_s": 0, "ran": 0, "done": 108, "failed": 0,
            "skipped": 0, "command": "python analysis/run_study.py --executor local", "cwd": "/w", "code": None}
    f = header_facts({"last_run": last, "runs": [made], "jobs": 108, "produced": 108, "compute_s": 9000})
    assert ("--executor local" in f["command"]
            and f["produced_by"] == "`python analysis/run_study.py --executor ray` in /w")


def test_a_grid_point_without_a_backdoor_gets_no_verdicts_and_the_attack_bar_is_counted():
    """A backdoor that was never implanted (undefended ASR and benign-retune P-ASR at or below purified_asr) gets no
    verdicts and no claims: every defense would 'purify' it. A dormant one (low ASR, back under benign retuning) keeps
    them. The 'no defense' row counts the seeds meeting the attack bar (ASR >= 90%, C-Acc within 5 points of clean):
    ASR 0.899 misses it, and so does a C-Acc drop of 6 points. A backdoor on some seeds only is said so everywhere."""
    from bdsafety.study.report import verdict_tables
    from bdsafety.study.stats import VERDICT_DEFAULTS

    def frames(none_asr, none_ctrl, none_acc):
        rows, runs = [], []
        for seed in (0, 1, 2):
            for d, asr, acc, p_asr, ctrl in (("none", none_asr[seed], none_acc[seed], 0.9, none_ctrl),
                                             ("clean", 0.01, 0.92, 0.03, 0.02), ("fst", 0.01, 0.80, 0.40, 0.02)):
                rows.append({"dataset": "synthetic", "attack": "a", "pratio": 0.05, "model": "m", "defense": d,
                             "seed": seed, "record": f"a_s{seed}", "o_backdoor_acc": 0.9, "o_backdoor_asr": 0.9,
                             "o_robustness_acc": acc, "o_robustness_asr": asr, "der": 0.9})
                for role, v in (("ra", p_asr + 0.01 * seed), ("ra_control", ctrl + 0.01 * seed)):
                    runs.append({"dataset": "synthetic", "attack": "a", "pratio": 0.05, "model": "m", "defense": d,
                                 "seed": seed, "record": f"a_s{seed}", "role": role, "draw": 0, "p_asr": v})
        (_, table, claims), = verdict_tables(pd.DataFrame(rows), pd.DataFrame(runs), dict(VERDICT_DEFAULTS))
        return table.set_index("defense")["verdict"], claims

    v, claims = frames((0.95, 0.899, 0.95), 0.9, (0.91, 0.91, 0.86))
    assert v["none"].endswith("attack bar (ASR >= 90%, C-Acc within 5 points of clean) met on 1/3 seeds")
    assert v["fst"].startswith("purified, backdoor returns under RA")
    assert (claims["holds"] == "yes").any()
    v, claims = frames((0.05, 0.04, 0.06), 0.6, (0.91, 0.91, 0.91))  # dormant by design: still a backdoor
    assert v["fst"].startswith("purified") and "met on 0/3 seeds" in v["none"]
    v, claims = frames((0.05, 0.04, 0.06), 0.05, (0.91, 0.91, 0.91))  # never implanted
    assert v["fst"].startswith("n/a: no backdoor to remove")
    assert set(claims["holds"]) == {"n/a: no backdoor to remove"}
    v, claims = frames((0.95, 0.04, 0.06), 0.05, (0.91, 0.91, 0.91))  # implanted on one seed of three (Narcissus)
    assert v["none"].startswith("no defense; backdoor present on 1/3 seeds; attack bar")
    assert v["fst"].endswith("; backdoor present on 1/3 seeds only")
    assert claims["holds"].str.endswith("; backdoor present on 1/3 seeds only").all()
