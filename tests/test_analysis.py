"""LMC analysis and the report table."""
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from bdsafety.analysis.lmc import interpolate_state
from bdsafety.analysis.lmc import main as lmc_main
from bdsafety.data.device import DeviceDataset, Normalizer
from bdsafety.data.info import DATASETS
from bdsafety.engine import recompute_bn_stats
from bdsafety.models import build_model
from bdsafety.records import save_model_result
from bdsafety.study.record_report import collect, to_markdown


def test_interpolation_endpoints_and_buffers():
    torch.manual_seed(0)
    a, b = build_model("cnn_small", 10), build_model("cnn_small", 10)
    for p in b.parameters():
        p.data.add_(1.0)
    b.features[1].running_mean.fill_(5.0)
    names = {n for n, _ in a.named_parameters()}
    sa, sb = a.state_dict(), b.state_dict()
    s0 = interpolate_state(sa, sb, 0.0, False, names)
    s1 = interpolate_state(sa, sb, 1.0, False, names)
    half = interpolate_state(sa, sb, 0.5, True, names)
    assert all(torch.equal(s0[k], sa[k]) for k in sa)
    assert torch.equal(s1["linear.weight"], sb["linear.weight"])
    assert torch.equal(s1["features.1.running_mean"], sa["features.1.running_mean"])  # buffers kept unless asked
    assert torch.allclose(half["features.1.running_mean"], (sa["features.1.running_mean"] + 5.0) / 2)
    assert torch.equal(half["features.1.num_batches_tracked"], sa["features.1.num_batches_tracked"])


def test_bn_recompute_matches_data_statistics():
    x = np.random.default_rng(0).integers(0, 256, (64, 32, 32, 3), dtype=np.uint8)
    ds = DeviceDataset(x, np.zeros(64))
    norm = Normalizer(DATASETS["synthetic"])
    model = build_model("cnn_small", 10)
    model.features[1].running_mean.fill_(123.0)
    recompute_bn_stats(model, ds, norm, batch_size=64)
    with torch.no_grad():
        conv_out = model.features[0](norm.from_uint8(ds.x))
    assert torch.allclose(model.features[1].running_mean, conv_out.mean((0, 2, 3)), atol=1e-4)
    assert model.features[1].momentum == 0.1  # restored


def test_lmc_cli_endpoints_on_demo_record(demo_record, tmp_path):
    """alpha = 1 is the backdoored model (high ASR); alpha = 0 is the 'defended' model (here: the clean reference)."""
    import os
    import shutil

    from bdsafety.records import load_attack_record

    rec_dir = tmp_path / "badnet_demo"
    shutil.copytree(demo_record, rec_dir)
    clean = load_attack_record(os.path.join(os.path.dirname(demo_record), "clean_demo")) if os.path.isdir(
        os.path.join(os.path.dirname(demo_record), "clean_demo")) else None
    model = build_model("cnn_small", 10)
    state = clean.state_dict if clean is not None else model.state_dict()
    (rec_dir / "defense" / "ref").mkdir(parents=True)
    save_model_result(rec_dir / "defense" / "ref" / "defense_result.pt", state, "cnn_small", 10)
    out = lmc_main(["--result_file", str(rec_dir), "--defense", "ref", "--alphas", "0,1", "--bn", "interpolate",
                    "--no_progress"])
    import pandas as pd

    df = pd.read_csv(out / "lmc.csv")
    assert df["asr"].iloc[-1] > 0.9 and (out / "lmc.png").stat().st_size > 1000
    with pytest.raises(ValueError, match="unknown defense folder.*Available: ref"):
        lmc_main(["--result_file", str(rec_dir), "--defense", "nope"])


def test_report_table(tmp_path):
    from bdsafety.records import write_metrics_csv

    rd = tmp_path / "rec"
    rd.mkdir()
    write_metrics_csv([{"epoch": 1, "test_acc": 0.9, "test_asr": 0.95, "test_ra": 0.05}], rd, "attack")
    (rd / "defense" / "fst" / "ra").mkdir(parents=True)
    write_metrics_csv([{"epoch": 1, "test_acc": 0.88, "test_asr": 0.05, "test_ra": 0.8}], rd / "defense" / "fst", "fst")
    write_metrics_csv([{"epoch": 0, "test_acc": 0.88, "test_asr": 0.05, "test_ra": 0.8},
                       {"epoch": 5, "test_acc": 0.87, "test_asr": 0.7, "test_ra": 0.2}],
                      rd / "defense" / "fst" / "ra", "ra")
    df = collect(str(rd))
    assert df.loc["fst", "test_asr"] == pytest.approx(0.05) and df.loc["fst", "p_test_asr"] == pytest.approx(0.7)
    assert math.isnan(df.loc["No defense", "p_test_asr"])
    md = to_markdown(df)
    assert "| fst | 88.0 | 5.0 | 80.0 | 87.0 | 70.0 | 20.0 |" in md
    assert df.loc["fst", "source"] == "summary"
    # a BackdoorBench defense folder with no summary of its own, retuned here: read as the study reads it (results.csv's
    # o_robustness_source), from RA's evaluation before its first step; a corrupt summary warns and reads as missing
    bb = rd / "defense" / "bb_ft"
    (bb / "ra").mkdir(parents=True)
    write_metrics_csv([{"epoch": 0, "test_acc": 0.8, "test_asr": 0.1, "test_ra": 0.7},
                       {"epoch": 5, "test_acc": 0.81, "test_asr": 0.6, "test_ra": 0.3}], bb / "ra", "ra")
    (rd / "defense" / "fst" / "fst_df_summary.csv").write_text("garbage\n")
    with pytest.warns(UserWarning, match="fst_df_summary.csv has no 'last' row"):
        df = collect(str(rd))
    assert df.loc["bb_ft", "test_asr"] == pytest.approx(0.1) and df.loc["bb_ft", "source"] == "ra_epoch0"
    assert df.loc["bb_ft", "p_test_asr"] == pytest.approx(0.6)
    assert df.loc["fst", "test_asr"] == pytest.approx(0.05) and df.loc["fst", "source"] == "ra_epoch0"
    assert math.isnan(df.loc["No defense", "p_test_asr"]) and df.loc["No defense", "source"] == "summary"


def _fake_record_tree(root):
    """A record tree with only the csv files the report and the notebook read (as the entry points write them)."""
    from bdsafety.records import write_metrics_csv

    rd = root / "badnet_demo"
    (rd / "ra").mkdir(parents=True)
    (rd / "attack_result.pt").write_bytes(b"")
    write_metrics_csv([{"epoch": 1, "test_acc": 0.99, "test_asr": 0.97, "test_ra": 0.03}], rd, "attack")
    for name, asr, p_asr in (("fst", 0.01, 0.3), ("pam", 0.0, 0.02), ("pam_rho0.3", 0.002, 0.03),
                             ("pam_rho0.5", 0.0, 0.02)):
        d = rd / "defense" / name
        (d / "ra").mkdir(parents=True)
        write_metrics_csv([{"epoch": 1, "test_acc": 0.97, "test_asr": asr, "test_ra": 0.9}], d, name)
        write_metrics_csv([{"epoch": e, "test_acc": 0.98, "test_asr": asr + (p_asr - asr) * e / 4, "test_ra": 0.8}
                           for e in range(5)], d / "ra", "ra")
    (rd / "defense" / "pam_rho0.7").mkdir()  # a sweep folder without results: NaN row, not a crash
    (rd / "lmc").mkdir()
    rows = [{"alpha": a / 4, "clean_loss": 0.1, "clean_acc": 0.98, "backdoor_loss": 1.0, "asr": a / 4,
             "backdoor_error": 1 - a / 4, "defense": d} for d in ("fst", "pam") for a in range(5)]
    pd.DataFrame(rows).to_csv(rd / "lmc" / "lmc.csv", index=False)
    return rd


def test_rho_sweep_table(tmp_path):
    from bdsafety.study.record_report import rho_sweep

    rd = _fake_record_tree(tmp_path)
    sweep = rho_sweep(str(rd))
    assert list(sweep.index) == [0.3, 0.5, 0.7]
    assert sweep.loc[0.3, "p_test_asr"] == pytest.approx(0.03) and math.isnan(sweep.loc[0.7, "test_acc"])
    assert rho_sweep(str(rd / "defense" / "fst")).empty  # no sweep folders: an empty table


def test_analysis_notebook_runs(tmp_path, monkeypatch):
    """Every code cell of analysis/superficial_safety.ipynb runs on a record tree (first cell's paths overridden)."""
    import json

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    monkeypatch.setattr(plt, "show", lambda *a, **k: plt.close("all"))
    _fake_record_tree(tmp_path)
    (tmp_path / "clean_demo" / "ra").mkdir(parents=True)
    from bdsafety.records import write_metrics_csv

    write_metrics_csv([{"epoch": 1, "test_acc": 1.0, "test_asr": 0.0, "test_ra": 1.0}],
                      tmp_path / "clean_demo", "attack")
    nb = json.loads((Path(__file__).resolve().parents[1] / "analysis" / "superficial_safety.ipynb").read_text())
    cells = ["".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "code"]
    assert len(cells) >= 5
    study = tmp_path / "study_x"
    study.mkdir()
    pt = {"dataset": "synthetic", "attack": "badnet", "pratio": 0.1, "model": "cnn_small"}
    pd.DataFrame([{**pt, "defense": d, "seed": s, "o_robustness_acc": 0.99, "o_robustness_asr": 0.01,
                   "p_robustness_asr": p + 0.1 * s} for d, p in (("fst", 0.3), ("pam", 0.0)) for s in (0, 1)]
                 ).to_csv(study / "results.csv", index=False)
    pd.DataFrame([{**pt, "defense": "fst", "seed": 0, "epoch": e, "test_asr": e / 4, "test_acc": 0.9} for e in range(5)]
                 ).to_csv(study / "ra_curves.csv", index=False)
    pd.DataFrame([{**pt, "defense": "fst", "seed": 0, "alpha": a / 4, "asr": a / 4, "clean_acc": 0.9} for a in range(5)]
                 ).to_csv(study / "lmc_curves.csv", index=False)
    ns: dict = {}
    exec(cells[0], ns)
    ns.update(STUDY_DIR=study, RECORD_ROOT=tmp_path, RESULT_FILE="badnet_demo", CLEAN_RECORD="clean_demo")
    for src in cells[1:]:
        exec(src, ns)
    assert ns["table"].loc["fst", "p_test_asr"] == pytest.approx(0.3) and "Clean" in ns["table"].index
    assert set(ns["curves"]) >= {"fst", "pam", "pam_rho0.3"}
    assert ns["lmc_table"].loc["pam", 0.0] == pytest.approx(100.0)
    assert list(ns["sweep"].index) == [0.3, 0.5, 0.7]
    (title, t), = ns["study"]
    assert title == "synthetic / badnet / pratio 0.1 / cnn_small"
    assert t.set_index("defense").loc["fst", "P-ASR (after RA)"] == "35.0 ± 7.1 [30.0, 40.0]"


def test_study_lmc_folders_feed_the_notebook_lmc_cell(tmp_path, monkeypatch):
    """A study writes lmc_<defense>/lmc.csv per defense: the notebook's LMC cell reads them all."""
    import json

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    monkeypatch.setattr(plt, "show", lambda *a, **k: plt.close("all"))
    rd = _fake_record_tree(tmp_path)
    lmc = pd.read_csv(rd / "lmc" / "lmc.csv")
    for d, g in lmc.groupby("defense"):
        (rd / f"lmc_{d}").mkdir()
        g.to_csv(rd / f"lmc_{d}" / "lmc.csv", index=False)
    (rd / "lmc" / "lmc.csv").unlink()
    nb = json.loads((Path(__file__).resolve().parents[1] / "analysis" / "superficial_safety.ipynb").read_text())
    cell = next("".join(c["source"]) for c in nb["cells"]
                if c["cell_type"] == "code" and "lmc_csvs" in "".join(c["source"]))
    ns = {"record": rd, "pd": pd, "plt": plt, "RESULT_FILE": "badnet_demo"}
    exec(cell, ns)
    assert list(ns["lmc_table"].index) == ["fst", "pam"] and ns["lmc_table"].loc["fst", 1.0] == pytest.approx(0.0)
