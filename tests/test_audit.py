"""The audit command (bdsafety/study/audit.py) and the study mechanism under it: records found in place (``records:``,
no attack job) and the study's own files in another folder (``report_dir``)."""
import io
import shutil
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml
from bb_records import make_bb_v22_record

from bdsafety.errors import ConfigError
from bdsafety.study.audit import main, parser, run_audit
from bdsafety.study.plan import build_plan
from bdsafety.study.spec import study_from_dict

ROOT = Path(__file__).resolve().parent.parent
VERDICTS = ("not purified", "purified, backdoor returns under RA", "purified, stays purified under RA")


def _bb_record_with_defenses(root: Path, folders=("ft", "i-bau")):
    """A BackdoorBench v2.2 record with BackdoorBench's own defense folders (defense/<name>/defense_result.pt)."""
    r = make_bb_v22_record(root)
    for f in folders:
        d = r.record_dir / "defense" / f
        d.mkdir(parents=True)
        torch.save({"model_name": "preactresnet18", "num_classes": 10, "model": r.state_dict}, d / "defense_result.pt")
    return r


def _audit(argv, out=None):
    out = out or io.StringIO()
    oc, md = run_audit(parser().parse_args(argv), out=out)
    return oc, md, out.getvalue()


def test_dry_run_of_a_backdoorbench_record_plans_ra_control_budget_lmc_per_defense_folder(tmp_path):
    r = _bb_record_with_defenses(tmp_path)
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    oc, md, text = _audit(["--result_file", "badnet_demo", "--record_root", str(tmp_path / "record"), "--dry_run",
                           "--ra_draws", "2", "--poison_nums", "1,10"])
    assert md is None and sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before  # nothing written
    jobs = oc.plan.by_key()
    assert not [j for j in jobs.values() if j.kind == "attack"]  # the record is read as found
    for target in ("badnet_demo", "badnet_demo/defense/ft", "badnet_demo/defense/i-bau"):
        for name in ("ra", "ra_d1", "ra_control", "ra_control_d1", "ra_budget_p1", "ra_budget_p10"):
            j = jobs[f"{target}/{name}"]
            assert j.method == "ra" and "badnet_demo" not in j.deps  # found outputs are no deps
            assert j.overrides["result_file"] == "badnet_demo"
    for f in ("ft", "i-bau"):
        assert (jobs[f"badnet_demo/lmc_{f}"].method == "lmc"
                and jobs[f"badnet_demo/defense/{f}/ra"].overrides["defense"] == f)
    assert len(jobs) == 3 * 6 + 2  # no QRA without a clean reference: a note says so
    assert any("qra needs the clean reference" in n for n in oc.plan.notes)
    st = oc.plan.study
    assert st.study_dir == r.record_dir.parent.resolve() and st.report_dir == r.record_dir.resolve() / "audit"
    assert (oc.plan.records[0]["point"]["dataset"] == "cifar10"
            and oc.plan.records[0]["point"]["model"] == "preactresnet18")
    assert "its report in" in text and text.strip().endswith("20 jobs, 20 to run")


def test_audit_selects_and_runs_defenses_and_trains_the_clean_reference_under_its_own_folder(tmp_path):
    _bb_record_with_defenses(tmp_path)
    rr = str(tmp_path / "record")
    oc, _, _ = _audit(["--result_file", "badnet_demo", "--record_root", rr, "--dry_run", "--defense", "ft",
                       "--run", "fst", "--clean_reference", "--ra_draws", "1", "--poison_nums", ""])
    jobs = oc.plan.by_key()
    clean = "badnet_demo/audit/clean-badnet_cifar10_preactresnet18_s0"
    assert jobs[clean].kind == "attack" and jobs[clean].overrides["record_root"].endswith("badnet_demo/audit")
    assert jobs["badnet_demo/defense/fst"].kind == "defense" and "badnet_demo/defense/i-bau/ra" not in jobs
    assert set(jobs["badnet_demo/defense/ft/qra"].deps) == {"badnet_demo/defense/ft/ra", clean}
    assert [r["defenses"] for r in oc.plan.records] == [["fst", "ft"]]
    with pytest.raises(ConfigError, match="no defense folder bdr"):
        _audit(["--result_file", "badnet_demo", "--record_root", rr, "--dry_run", "--defense", "bdr"])
    with pytest.raises(ConfigError, match="either made elsewhere or made here"):
        _audit(["--result_file", "badnet_demo", "--record_root", rr, "--dry_run", "--defense", "ft", "--run", "ft"])
    bare = tmp_path / "bare"
    make_bb_v22_record(bare)
    with pytest.raises(ConfigError, match="no defense folder to audit.*--run"):
        _audit(["--result_file", "badnet_demo", "--record_root", str(bare / "record"), "--dry_run"])


def test_records_key_needs_no_grid_but_a_partial_grid_or_many_seeds_is_an_error(tmp_path):
    make_bb_v22_record(tmp_path)
    base = {"name": "s", "records": ["badnet_demo"], "retune": ["ra"], "configs": {"cifar10": "cifar10"}}
    st = study_from_dict(base, tmp_path / "s.yaml", study_dir=str(tmp_path / "record"))
    assert st.seeds == [0] and st.report_dir == st.study_dir  # the clean reference beside the record
    assert [j.key for j in build_plan(st).jobs] == ["clean-badnet_cifar10_preactresnet18_s0", "badnet_demo/ra",
                                                    "clean-badnet_cifar10_preactresnet18_s0/ra_badnet_demo"]
    st = study_from_dict({**base, "clean_reference": False}, tmp_path / "s.yaml", study_dir=str(tmp_path / "record"))
    assert [j.key for j in build_plan(st).jobs] == ["badnet_demo/ra"]
    with pytest.raises(ConfigError, match="'models' is required.*grid keys go together"):
        study_from_dict({**base, "datasets": ["cifar10"]}, tmp_path / "s.yaml", study_dir=str(tmp_path / "record"))
    with pytest.raises(ConfigError, match="at most one seed"):
        study_from_dict({**base, "seeds": [0, 1]}, tmp_path / "s.yaml", study_dir=str(tmp_path / "record"))
    with pytest.raises(ConfigError, match="'datasets' is required.*records"):
        study_from_dict({"name": "s"}, tmp_path / "s.yaml")


# ------------------------------------------------------------------------------------------------ a real audit

TINY_SET = {"ra": {"epochs": 1, "ratio": 0.1, "poison_num": 5}, "lmc": {"points": 3, "ratio": 0.2}}


@pytest.fixture(scope="module")
def audited(tmp_path_factory):
    """A tiny synthetic record (300 / 100 images, one attack epoch) with one defense folder made by hand (ft, one
    epoch), audited once: (record root, yaml, outcome, audit.md, printed text)."""
    from bdsafety.registry import get

    root = tmp_path_factory.mktemp("audit") / "record"
    cfg = ROOT / "config"
    get("attack", "badnet").main(["--yaml_path", str(cfg / "attack" / "badnet" / "demo.yaml"),
                                  "--record_root", str(root), "--save_folder_name", "rec", "--synthetic_n_train", "300",
                                  "--synthetic_n_test", "100", "--epochs", "1", "--no_progress"])
    get("defense", "ft").main(["--yaml_path", str(cfg / "defense" / "ft" / "demo.yaml"), "--record_root", str(root),
                               "--result_file", "rec", "--epochs", "1", "--ratio", "0.2", "--no_progress"])
    y = root.parent / "audit.yaml"
    spec = yaml.safe_load((cfg / "study" / "audit.yaml").read_text())
    y.write_text(yaml.safe_dump({**spec, "set": TINY_SET}))
    argv = ["--result_file", "rec", "--record_root", str(root), "--yaml_path", str(y), "--ra_draws", "2",
            "--poison_nums", "1", "--threads", "1", "--no_progress"]
    oc, md, text = _audit(argv)
    return root, argv, oc, md, text


@pytest.mark.slow
def test_audit_of_a_record_with_one_defense_folder_ranks_it_with_a_verdict(audited):
    root, _, oc, md, text = audited
    assert not oc.failed and len(oc.keys("ran")) == 2 * (2 + 2 + 1) + 1  # none, ft: 2 RA, 2 controls, 1 budget; LMC
    assert sorted(p.name for p in root.iterdir()) == ["rec"]  # nothing beside the record
    rd = root / "rec" / "audit"
    assert md == rd / "audit.md" and {"audit.html", "report.md", "results.csv", "study.yaml", "study.json"} <= {
        p.name for p in rd.iterdir()}
    assert (rd / "logs").is_dir() and not (root / "logs").exists()
    report = md.read_text()
    assert "| rank | defense |" in report and "purified when ASR <= 20%" in report
    rows = [ln for ln in report.splitlines() if ln.startswith("| 1 | ft |")]
    assert len(rows) == 1 and any(v in rows[0] for v in VERDICTS)
    assert "| - | none |" in report  # the backdoored model: a reference, not ranked
    df = pd.read_csv(rd / "results.csv")
    ft = df[df["defense"] == "ft"].iloc[0]
    assert ft["status"] == "ok" and ft["p_robustness_asr_draws_n"] == 2 and 0 <= ft["ra_control_asr"] <= 1
    assert "ranking (" in text and text.strip().endswith("audit.md")
    again = yaml.safe_load((rd / "study.yaml").read_text())
    assert again["records"] == ["rec"] and again["external_defenses"] == ["ft"]


@pytest.mark.slow
def test_audit_rerun_resumes_with_nothing_to_run(audited, tmp_path):
    root, argv, first, _, _ = audited
    copy = tmp_path / "record"
    shutil.copytree(root, copy)
    argv = [copy.as_posix() if a == str(root) else a for a in argv]
    assert main(argv + ["--dry_run"]) == 0
    oc, md, text = _audit(argv)
    assert oc.keys("ran") == [] and set(oc.keys("done")) == set(first.keys("ran")) and md.is_file()
    assert "0 to run" in text


@pytest.mark.slow
def test_another_study_reads_the_audits_outputs_but_refuses_to_replace_them(audited, tmp_path):
    """A second study in the same folder (its own report_dir): the audit's finished jobs with the same ids are read
    as up to date (nothing reruns); with another config they would have to be replaced: refused, nothing changed."""
    from bdsafety.study.runner import run_study

    root, _, first, _, _ = audited
    copy = tmp_path / "record"
    shutil.copytree(root, copy)
    spec = {**yaml.safe_load((copy / "rec" / "audit" / "study.yaml").read_text()), "report_dir": "other"}
    spec.pop("study_dir")
    same = study_from_dict(spec, tmp_path / "other.yaml", study_dir=str(copy))
    oc = run_study(None, study=same, progress=False, out=io.StringIO(), threads=1)
    assert oc.keys("ran") == [] and not oc.failed and set(oc.keys("done")) == set(first.keys("ran"))
    assert all(oc.results[k].get("shared_from") == "rec/audit" for k in first.keys("ran"))
    assert (copy / "other" / "results.csv").is_file()
    other_ra = {**spec, "set": {**spec["set"], "ra": {**spec["set"]["ra"], "epochs": 2}}, "report_dir": "third"}
    changed = study_from_dict(other_ra, tmp_path / "third.yaml", study_dir=str(copy))
    out = io.StringIO()
    run_study(None, study=changed, dry_run=True, out=out)
    assert "output of another study (report folder rec/audit)" in out.getvalue()
    before = {p: p.stat().st_mtime_ns for p in (copy / "rec").rglob("ra_result.pt")}
    oc = run_study(None, study=changed, progress=False, out=io.StringIO(), threads=1)
    ra_keys = {k for k in first.keys("ran") if "/ra" in k or k.startswith("rec/ra")}
    assert ra_keys and {r["key"] for r in oc.failed} == ra_keys and oc.keys("ran") == []
    assert all("this study did not make" in r["error"] for r in oc.failed)
    assert {p: p.stat().st_mtime_ns for p in (copy / "rec").rglob("ra_result.pt")} == before
    oc = run_study(None, study=study_from_dict({**spec, "report_dir": "rec/audit"}, tmp_path / "a.yaml",
                                               study_dir=str(copy)), progress=False, out=io.StringIO(), threads=1)
    assert oc.keys("ran") == [] and not oc.failed  # the audit's own study: up to date


# ------------------------------------------------------------------ a real audit of BackdoorBench's own folders

def _calibrated_preactresnet18(images: torch.Tensor) -> dict:
    """Random preactresnet18 weights (BackdoorBench's keys) whose BatchNorm statistics are those of ``images``, so the
    eval-mode losses are a random model's (about ln 10), not the 1e4+ of initial statistics."""
    from bdsafety.models import build_model

    torch.manual_seed(0)
    model = build_model("preactresnet18", 10)
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.momentum = None  # a cumulative average over the batches below
    model.train()
    with torch.no_grad():
        for batch in images.split(50):
            model(batch)
    return model.state_dict()


@pytest.fixture(scope="module")
def audited_bb(tmp_path_factory):
    """A BackdoorBench v2.2 record as BackdoorBench writes it (tests/bb_records.py: PNG folders, its attack_result.pt
    and info.pickle; a preactresnet18, the clean CIFAR-10 beside it at ./data/cifar10 in the dataset's own format),
    with two defense folders named and written as BackdoorBench's defenses write them (defense/ft,
    defense/i-bau: defense_result.pt), audited for real: (BackdoorBench root, outcome, audit.md)."""
    from fake_datasets import make_fake_cifar10

    bb = tmp_path_factory.mktemp("bb")
    fake = make_fake_cifar10(str(bb / "data" / "cifar10"), n_train=200, n_test=60, seed=1)
    x = torch.from_numpy(fake.train_x).permute(0, 3, 1, 2).float() / 255
    state = _calibrated_preactresnet18(x)
    r = make_bb_v22_record(bb, n_train=200, n_test=60, img_size=(32, 32, 3), state_dict=state,
                           labels=(fake.train_y, fake.test_y))
    for k, f in enumerate(("ft", "i-bau")):  # two different "defended" models: the weights moved a little
        g = torch.Generator().manual_seed(k)
        moved = {n: (v + 0.01 * torch.randn(v.shape, generator=g) if v.is_floating_point() else v)
                 for n, v in state.items()}
        d = r.record_dir / "defense" / f
        d.mkdir(parents=True)
        torch.save({"model_name": "preactresnet18", "num_classes": 10, "model": moved}, d / "defense_result.pt")
    y = bb / "audit.yaml"
    spec = yaml.safe_load((ROOT / "config" / "study" / "audit.yaml").read_text())
    y.write_text(yaml.safe_dump({**spec, "set": TINY_SET}))
    oc, md, text = _audit(["--result_file", "badnet_demo", "--record_root", str(bb / "record"), "--yaml_path", str(y),
                           "--ra_draws", "2", "--poison_nums", "1", "--threads", "1", "--no_progress"])
    return bb, oc, md, text


@pytest.mark.slow
def test_audit_of_a_backdoorbench_record_ranks_backdoorbenchs_own_defense_folders(audited_bb):
    bb, oc, md, text = audited_bb
    # none, ft, i-bau: 2 RA, 2 controls, 1 budget; 2 LMC
    assert not oc.failed and len(oc.keys("ran")) == 3 * (2 + 2 + 1) + 2
    rec = bb / "record" / "badnet_demo"
    assert sorted(p.name for p in (bb / "record").iterdir()) == ["badnet_demo"]  # nothing beside the record
    assert sorted(p.name for p in (rec / "defense").iterdir()) == ["ft", "i-bau"]  # BackdoorBench's folders, untouched
    assert md == rec / "audit" / "audit.md" and (rec / "audit" / "audit.html").is_file()
    report = md.read_text()
    ranked = [ln for ln in report.splitlines() if ln.startswith(("| 1 |", "| 2 |"))]
    assert sorted(ln.split("|")[2].strip() for ln in ranked) == ["ft", "i-bau"]
    # a defense that did not purify ranks below one that did, whatever its P-ASR
    verdicts = [ln.split("|")[-2].strip() for ln in sorted(ranked)]
    assert not (verdicts[0].startswith("not purified") and not verdicts[1].startswith("not purified"))
    assert all(any(v in ln for v in VERDICTS) for ln in ranked)
    assert "| - | none |" in report
    df = pd.read_csv(rec / "audit" / "results.csv")
    rows = df[df["defense"].isin(["ft", "i-bau"])]
    assert len(rows) == 2 and (rows["status"] == "ok").all() and (rows["p_robustness_asr_draws_n"] == 2).all()
    assert (rows["o_robustness_source"] == "ra_epoch0").all()  # no summary csv in the folders: RA's own measurement
    assert rows["o_robustness_acc"].between(0, 1).all() and rows["lmc_asr_mid"].notna().all()
    assert "C-Acc and ASR of ft, i-bau: measured by RA before its first step" in report
    assert text.strip().endswith("audit.md")


AUDIT_PAGE = """(() => ({
  tables: [...document.querySelectorAll('table')].map(t => ({cls: t.className,
    head: [...t.tHead.rows[0].cells].map(c => c.textContent),
    rows: [...t.tBodies[0].rows].map(r => [...r.cells].map(c => [c.textContent, c.className]))})),
  legend: document.querySelector('p.legend') ? document.querySelector('p.legend').innerText : null,
  title: document.title,
}))()"""


@pytest.mark.slow
def test_audit_html_in_a_headless_browser(audited_bb, tmp_path):
    """audit.html of the BackdoorBench-record audit in a real headless Chromium: no console error, one ranked table
    whose rows are the two defense folders (ranks 1, 2) and the backdoored model, each with a verdict cell coloured
    by its class; the screenshot is kept (BDSAFETY_TEST_ARTIFACTS)."""
    import browser

    if browser.find_chromium() is None:
        pytest.skip("no chromium binary on PATH (apt-get install chromium, or set BDSAFETY_CHROMIUM); "
                    ".ci/run installs it")
    bb, _, md, _ = audited_bb
    page = browser.load(md.with_suffix(".html"), AUDIT_PAGE)
    shot = browser.keep_screenshot(page, tmp_path / "audit_bb.png")
    assert page.errors == [], page.console
    v = page.value
    assert v["title"] == "Audit badnet_demo" and v["legend"] and "Colours" in v["legend"]
    (t,) = v["tables"]
    col = {c: i for i, c in enumerate(t["head"])}
    assert t["cls"] == "verdicts" and {"rank", "defense", "P-ASR", "P-DER", "verdict"} <= set(col)
    assert sorted(r[col["rank"]][0] for r in t["rows"]) == ["-", "1", "2"]
    assert sorted(r[col["defense"]][0] for r in t["rows"]) == ["ft", "i-bau", "none"]
    ranked = [r for r in t["rows"] if r[col["rank"]][0] != "-"]
    assert all(any(v in r[col["verdict"]][0] for v in VERDICTS) and r[col["verdict"]][1] in ("ok", "bad", "warn")
               for r in ranked), ranked
    assert len(shot.read_bytes()) > 1000 and shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_backdoorbench_folders_of_the_registered_rivals_are_read_as_found_not_rerun(tmp_path):
    """BackdoorBench's own sau/, nad/, fp/, nc/ and rnp/ folders (defense_result.pt only) are retuned as found, like any
    external folder, now that those names are registered defenses too: RA, its control and LMC per folder, and no
    defense job that would replace them."""
    folders = ("sau", "nad", "fp", "nc", "rnp")
    _bb_record_with_defenses(tmp_path, folders)
    oc, md, _ = _audit(["--result_file", "badnet_demo", "--record_root", str(tmp_path / "record"), "--dry_run",
                        "--ra_draws", "1", "--poison_nums", "1"])
    jobs = oc.plan.by_key()
    assert not [j for j in jobs.values() if j.kind == "defense"]
    for f in folders:
        assert jobs[f"badnet_demo/defense/{f}/ra"].overrides["defense"] == f
        assert f"badnet_demo/defense/{f}/ra_control" in jobs and jobs[f"badnet_demo/lmc_{f}"].method == "lmc"
    assert sorted(oc.plan.study.external_defenses) == sorted(folders)
