"""Study statistics: intervals over seeds with RA draws nested, paired differences, DER / P-DER, verdicts."""
import math

import pandas as pd
import pytest

from bdsafety.errors import ConfigError
from bdsafety.study.stats import (
    VERDICT_DEFAULTS,
    Estimate,
    clustered,
    der,
    interval,
    paired,
    verdict,
    verdict_thresholds,
)


def test_interval_is_student_t_over_independent_values():
    e = interval([0.1, 0.2, 0.3])
    half = 4.303 * 0.1 / math.sqrt(3)  # t(0.975, 2) * sd / sqrt(n)
    assert e.mean == pytest.approx(0.2) and e.low == pytest.approx(0.2 - half, abs=1e-4)
    assert e.high == pytest.approx(0.2 + half, abs=1e-4) and e.n == 3
    one = interval([0.5])
    assert one.mean == 0.5 and math.isnan(one.low) and one.fmt() == "50.0"
    assert math.isnan(interval([]).mean) and interval([]).fmt() == "-"


def test_draws_are_averaged_within_a_seed_before_the_interval():
    # seed 0: draws 0.0 and 1.0 (mean 0.5); seed 1: 0.5, 0.5; seed 2: 0.2, 0.8: every seed mean is 0.5
    df = pd.DataFrame({"seed": [0, 0, 1, 1, 2, 2], "draw": [0, 1] * 3, "v": [0.0, 1.0, 0.5, 0.5, 0.2, 0.8]})
    e = clustered(df, "v")
    assert e.mean == pytest.approx(0.5) and e.low == pytest.approx(0.5) and e.high == pytest.approx(0.5)
    assert e.n == 3 and e.n_obs == 6 and e.unit == "seed"
    single = clustered(df[df["seed"] == 0], "v")  # one seed: the interval covers the draws only, and says so
    assert single.unit == "draw" and single.n == 2 and single.low < 0.5 < single.high


def test_paired_difference_matches_seed_and_draw():
    rows = []
    for seed in range(3):
        for draw in range(2):
            base = 0.1 * seed + 0.05 * draw  # shared by both models of a (seed, draw): cancels in the pairing
            rows += [{"defense": "fst", "seed": seed, "draw": draw, "p": base + 0.30},
                     {"defense": "clean", "seed": seed, "draw": draw, "p": base}]
    df = pd.DataFrame(rows)
    e = paired(df, "p", "fst", "clean")
    assert e.mean == pytest.approx(0.30) and e.low == pytest.approx(0.30) and e.above_zero
    assert not paired(df, "p", "clean", "fst").above_zero and paired(df, "p", "clean", "fst").below_zero
    # unmatched rows are dropped, not compared with another draw
    assert paired(df[(df["defense"] == "clean") | (df["draw"] == 0)], "p", "fst", "clean").n_obs == 3


def test_der_and_p_der():
    # backdoored 0.9 / 1.0; defense 0.85 / 0.0: dASR 1.0, dACC 0.05 -> DER 0.975
    assert float(der(0.9, 1.0, 0.85, 0.0)) == pytest.approx(0.975)
    # the backdoor returns under RA (P-ASR 0.8): P-DER 0.575; gains in accuracy are not rewarded
    assert float(der(0.9, 1.0, 0.85, 0.8)) == pytest.approx(0.575)
    assert float(der(0.9, 1.0, 0.95, 1.0)) == pytest.approx(0.5)


def test_verdicts_follow_the_stated_thresholds():
    th = dict(VERDICT_DEFAULTS)
    low, high = Estimate(0.05, 0.0, 0.1, 3, 3), Estimate(0.5, 0.3, 0.7, 3, 3)
    assert verdict(high, None, None, th) == "not purified"
    assert verdict(low, Estimate(0.4, 0.2, 0.6, 3, 15), None, th) == "purified, backdoor returns under RA"
    # a large mean whose interval reaches 0 is not enough
    assert verdict(low, Estimate(0.4, -0.1, 0.9, 3, 15), None, th) == "purified, stays purified under RA"
    v = verdict(low, Estimate(0.02, -0.01, 0.05, 3, 15), Estimate(0.4, 0.2, 0.6, 3, 15), th)
    assert v == "purified, stays purified under RA; dormant: returns under benign retuning"
    with pytest.raises(ConfigError, match="unknown key 'purify'"):
        verdict_thresholds({"purify": 0.1})
    with pytest.raises(ConfigError, match="fraction"):
        verdict_thresholds({"purified_asr": 20})
    assert verdict_thresholds({"purified_asr": 0.1})["purified_asr"] == 0.1


def test_study_progress_estimates_time_left_from_finished_jobs(tmp_path):
    """ETA = the unfinished jobs' method means (overall mean for a method not yet seen) over the measured concurrency;
    running jobs are the start markers present; study.json says 'running' with done / total."""
    import json
    from types import SimpleNamespace as NS

    from bdsafety.study.progress import StudyProgress, format_eta

    todo = [NS(key="a", method="badnet"), NS(key="a/defense/fst", method="fst"),
            NS(key="a/defense/fst/ra", method="ra"), NS(key="b/ra", method="ra")]
    p = StudyProgress(todo, tmp_path, t0=0.0)
    assert p.eta_s(now=10.0) is None and format_eta(None) == "eta ?"
    p.record({"key": "a", "status": "ran", "wall_s": 100.0})
    p.record({"key": "a/defense/fst/ra", "status": "ran", "wall_s": 20.0})
    # left: fst (no fst finished: overall mean 60) + ra (mean 20) = 80 s of work; 120 s of work done in 60 s: 2 at a
    # time
    assert p.eta_s(now=60.0) == 40.0
    assert p.eta_s(now=240.0) == 80.0  # slower than one at a time: concurrency floored at 1
    (tmp_path / "logs").mkdir()
    (tmp_path / "logs" / "a__defense__fst.started").write_text("id")
    p.write()
    st = json.loads((tmp_path / "study.json").read_text())
    assert st["state"] == "running" and (st["done"], st["total"]) == (2, 4) and st["running"] == ["a/defense/fst"]
    assert format_eta(40) == "eta 40s" and format_eta(600) == "eta 10m" and format_eta(7200) == "eta 2.0h"
