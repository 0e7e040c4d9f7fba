"""results.csv: one tidy row per dataset / attack / pratio / model / defense / seed, read from the records.

Rows: ``defense`` is 'none' (the backdoored model itself), 'clean' (the clean reference model, pratio 0) or a
defense folder. Columns (fractions in [0, 1]; NaN where a stage was not run or failed):
  o_backdoor_{acc,asr,ra}     the backdoored model (after the attack)
  o_robustness_{acc,asr,ra}   after the defense (for 'none': the backdoored model; for 'clean': the clean model)
  o_robustness_source         where those come from: 'summary' (the folder's <name>_df_summary.csv) or 'ra_epoch0'
                              (a defense folder without one, e.g. a BackdoorBench run that wrote only
                              defense_result.pt: the retuning attack's evaluation of the model before its first step)
  then the columns of each retuning attack and analysis of the study, from its main run on that model (its registered
  ``summary``; NaN where it does not run on that model):
  p_robustness_{acc,asr,ra}   RA: after the retuning attack on that model (P-ASR = p_robustness_asr)
  qra_asr_before, qra_asr, qra_acc, qra_clean_asr
                              QRA: purified model's ASR without / with the learned perturbation (reactivation), its
                              C-Acc with it, and the clean model's ASR with it (transfer; low = backdoor-specific)
  lmc_asr_mid, lmc_acc_mid    LMC: ASR / C-Acc halfway (alpha 0.5) along the path defended -> backdoored model
  n_pruned, pruning_threshold neurons a pruning defense (ANP) removed from the model and the mask threshold it
                              pruned at (selected on validation data or fixed, as its config says); NaN otherwise
  p_robustness_asr_draws, p_robustness_asr_draws_n
                              P-ASR averaged over the RA draws of this model and seed (study key ra_draws), and how many
  ra_control_asr              P-ASR of the benign-retune control (0 poisoned samples), averaged over its draws
  der, p_der                  BackdoorBench's defense effectiveness rating from the ASR after the defense, and the same
                              from the P-ASR (draw average): bdsafety.study.stats
  detected_target, true_target, target_match, target_votes
                              defenses with a trigger inversion (PAM, pam_reinvert, BTI-DBF(U)): the target class the
                              inversion detected, the attack's true target, whether they agree (empty when either is
                              unknown) and the votes per class (a JSON list), from the defense's config.yaml; empty
                              for other rows
  <stage>_wall_s              wall time of each job (attack, defense, then each retuning attack / analysis: its main
                              run), from the study's markers
  status                      ok, or the stages missing
"""
from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import pandas as pd
import yaml

from bdsafety import registry
from bdsafety.records import read_metrics_summary, summary_name
from bdsafety.safeio import RecordError
from bdsafety.study.execute import MARKER, output_dir
from bdsafety.study.stats import der

METRICS = (("acc", "test_acc"), ("asr", "test_asr"), ("ra", "test_ra"))
POINT = ("dataset", "attack", "pratio", "model", "defense", "seed")


def _summary(folder: Path, name: str | None) -> dict:
    """Last metrics of ``folder``; ``name`` None: the summary the folder holds (a defense's csv keeps the method's
    name under --save_name and in sweep folders, bdsafety.records.summary_name)."""

    name = name or summary_name(folder)
    if name is None:
        return {}
    try:
        return read_metrics_summary(folder, name)
    except RecordError as e:
        if (Path(folder) / f"{name}_df_summary.csv").is_file():  # there but unreadable: say so, read it as missing
            warnings.warn(str(e), stacklevel=2)
        return {}


def model_metrics(folder: Path, name: str | None, ra_dir: Path | None = None,
                  defended: bool = True) -> tuple[dict, str | None]:
    """(last C-Acc/ASR/RA of the model in ``folder``, where they come from): its metrics summary ('summary'), or, for a
    ``defended`` model's folder without one (a BackdoorBench run that wrote only defense_result.pt), the evaluation
    its retuning attack ``ra_dir`` made before the first step ('ra_epoch0'); ({}, None) when neither exists.
    The one reader of a model's metrics: the study's results.csv and analysis/report.py's table both use it."""
    after = _summary(folder, name)
    if after:
        return after, "summary"
    if defended and ra_dir is not None:
        after = _ra_epoch0(ra_dir)
        if after:
            return after, "ra_epoch0"
    return {}, None


def _wall(folder: Path) -> float:
    try:
        return float(json.loads((folder / "log" / MARKER).read_text())["wall_s"])
    except (OSError, ValueError, KeyError, TypeError):
        return math.nan


def _stage(row: dict, prefix: str, summary: dict) -> None:
    for short, key in METRICS:
        row[f"{prefix}_{short}"] = summary.get(key, math.nan)


def _ra_epoch0(ra_dir: Path) -> dict:
    """The RA run's evaluation of its input model before retuning (ra_df.csv, epoch 0), or {}."""
    try:
        df = pd.read_csv(ra_dir / "ra_df.csv")
        first = df[df["epoch"] == 0].iloc[0]
        return {key: float(first[key]) for _, key in METRICS if key in first}
    except (OSError, KeyError, IndexError, ValueError, pd.errors.ParserError):
        return {}


def _pruning(row: dict, folder: Path) -> None:
    """n_pruned / pruning_threshold from a defense's config.yaml (top-level keys a pruning defense writes)."""

    row["n_pruned"] = row["pruning_threshold"] = math.nan
    try:
        meta = yaml.safe_load((folder / "config.yaml").read_text()) or {}
    except (OSError, yaml.YAMLError):
        return
    for k in ("n_pruned", "pruning_threshold"):
        v = meta.get(k) if isinstance(meta, dict) else None
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            row[k] = float(v)


TARGET_COLUMNS = ("detected_target", "true_target", "target_match", "target_votes")


def _target_detection(row: dict, folder: Path) -> None:
    """The trigger-inversion target detection a defense wrote to its config.yaml (bdsafety.defenses.bti.target_info)."""
    row.update(detected_target=None, true_target=None, target_match=None, target_votes=None)
    f = folder / "config.yaml"
    if not f.is_file():
        return

    try:
        meta = yaml.safe_load(f.read_text()) or {}
    except (OSError, yaml.YAMLError):
        return
    if not isinstance(meta, dict) or meta.get("detected_target") is None:
        return
    row["detected_target"] = int(meta["detected_target"])
    if meta.get("true_target") is not None:
        row["true_target"] = int(meta["true_target"])
        row["target_match"] = bool(meta.get("target_match", row["true_target"] == row["detected_target"]))
    if meta.get("target_votes") is not None:
        row["target_votes"] = json.dumps([int(v) for v in meta["target_votes"]])


def collect(plan, study_dir: Path, valid: set | None = None) -> pd.DataFrame:
    """The results table of a plan's grid from what is on disk now. ``valid``: keys of the jobs whose outputs are
    current (finished or up to date); outputs of other jobs (e.g. left from before a rerun that failed) read as NaN."""
    study_dir = Path(study_dir)
    if valid is not None:  # what the study reads as found (records and defense folders made elsewhere) is current
        valid = set(valid) | {r["key"] for r in plan.records if r["found"]}
        valid |= {f"{r['key']}/defense/{f}" for r in plan.records for f in r["defenses"]
                  if f in plan.study.external_defenses}

    def ok(folder: Path) -> Path:
        if valid is None or folder.relative_to(study_dir).as_posix() in valid:
            return folder
        return study_dir / ".missing"
    study = plan.study
    down = [registry.get("retune", r) for r in study.retune] + [registry.get("analysis", a) for a in study.analyses]
    runs = ra_runs(plan, study_dir, valid)
    rows = []
    for r in plan.records:
        p, rname, clean = r["point"], r["key"], r["clean"]
        rdir = output_dir(study_dir, rname)
        bd = _summary(ok(rdir), "attack")
        targets = [("none", rdir, "attack")]
        if clean:
            targets.append(("clean", output_dir(study_dir, clean), "attack"))
        targets += [(f, rdir / "defense" / f, None) for f in r["defenses"]]
        for name, folder, sname in targets:
            mains = {m: output_dir(study_dir, k) for m, k in plan.mains.get((rname, name), {}).items()}
            ra_dir = mains.get("ra", study_dir / ".missing")
            row = {"dataset": p["dataset"], "attack": p["attack"], "pratio": p["pratio"], "model": p["model"],
                   "defense": name, "seed": p["seed"], "record": rname}
            _stage(row, "o_backdoor", bd)
            after, row["o_robustness_source"] = model_metrics(ok(folder), sname, ok(ra_dir),
                                                              name not in ("none", "clean"))
            _stage(row, "o_robustness", after)
            for m in down:  # each retuning attack's and analysis's own columns (registry: summary)
                if m.summary is not None:
                    row.update(m.summary(ok(mains.get(m.name, study_dir / ".missing"))))
            _pruning(row, ok(folder) if name not in ("none", "clean") else study_dir / ".missing")
            _target_detection(row, ok(folder) if name not in ("none", "clean") else study_dir / ".missing")
            _draws(row, runs, name, p)
            row["attack_wall_s"] = _wall(ok(folder if name == "clean" else rdir))
            row["defense_wall_s"] = _wall(ok(folder)) if name not in ("none", "clean") else math.nan
            for m in down:
                row[f"{m.name}_wall_s"] = _wall(ok(mains.get(m.name, study_dir / ".missing")))
            missing = [s for s, k in (("attack", "o_backdoor_asr"), ("model", "o_robustness_asr"))
                       if math.isnan(row[k])]
            if "ra" in study.retune and math.isnan(row["p_robustness_asr"]):
                missing.append("ra")
            row["status"] = "ok" if not missing else "missing " + ",".join(missing)
            rows.append(row)
    df = pd.DataFrame(rows)
    for c in ("detected_target", "true_target"):  # integers with gaps: not floats like 0.0
        if c in df.columns:
            df[c] = df[c].astype("Int64")
    if "target_match" in df.columns:
        df["target_match"] = df["target_match"].astype("boolean")
    return df


def _draws(row: dict, runs: pd.DataFrame, defense: str, p: dict) -> None:
    """The draw-averaged P-ASR, the control's P-ASR, DER and P-DER of one results row."""
    row.update(p_robustness_asr_draws=math.nan, p_robustness_asr_draws_n=0, ra_control_asr=math.nan)
    if not runs.empty:
        mine = runs[(runs["record"] == p["record"]) & (runs["defense"] == defense)]
        main, control = (mine[mine["role"] == "ra"]["p_asr"].dropna(),
                         mine[mine["role"] == "ra_control"]["p_asr"].dropna())
        row.update(p_robustness_asr_draws=float(main.mean()) if len(main) else math.nan,
                   p_robustness_asr_draws_n=len(main),
                   ra_control_asr=float(control.mean()) if len(control) else math.nan)
    bd = (row["o_backdoor_acc"], row["o_backdoor_asr"])
    row["der"] = float(der(*bd, row["o_robustness_acc"], row["o_robustness_asr"]))
    row["p_der"] = float(der(*bd, row["o_robustness_acc"], row["p_robustness_asr_draws"]))


RA_ROLES = ("ra", "ra_control", "ra_budget")


def ra_runs(plan, study_dir: Path, valid: set | None = None) -> pd.DataFrame:
    """One row per RA run of the grid (the main RA and its draws, the benign control, the budgets): POINT keys, record,
    role ('ra', 'ra_control', 'ra_budget'), poison_num, draw, random_seed, and the model's C-Acc / ASR before RA
    (before_acc, before_asr) and after it (p_acc, p_asr). Runs whose output is missing or stale are left out."""
    study_dir = Path(study_dir)
    out = []
    for j in plan.jobs:
        p = j.point
        if j.kind != "retune" or j.method != "ra" or p.get("role") not in RA_ROLES:
            continue
        if valid is not None and j.key not in valid:
            continue
        f = output_dir(study_dir, j.key) / "ra_df.csv"
        if not f.is_file():
            continue
        c = pd.read_csv(f).sort_values("epoch")
        out.append({**{k: p.get(k) for k in ("dataset", "attack", "pratio", "model")}, "defense": p["target"],
                    "seed": p["seed"], "record": p["record"], "role": p["role"],
                    "poison_num": int(j.config["poison_num"]), "draw": int(p.get("draw", 0)),
                    "random_seed": int(j.config["random_seed"]), "before_acc": float(c["test_acc"].iloc[0]),
                    "before_asr": float(c["test_asr"].iloc[0]), "p_acc": float(c["test_acc"].iloc[-1]),
                    "p_asr": float(c["test_asr"].iloc[-1])})
    return pd.DataFrame(out)


def timing_columns(df: pd.DataFrame) -> list:
    return [c for c in df.columns if c.endswith("_wall_s")]


def ra_curves(plan, study_dir: Path, valid: set | None = None) -> pd.DataFrame:
    """Long table of ASR / C-Acc per RA epoch of the main RA runs (every draw): dataset, attack, pratio, model, defense,
    seed, draw, epoch, test_asr, test_acc."""
    out = []
    for j in plan.jobs:
        p = j.point
        if (j.kind != "retune" or j.method != "ra" or p.get("role") != "ra"
                or (valid is not None and j.key not in valid)):
            continue
        f = output_dir(study_dir, j.key) / "ra_df.csv"
        if f.is_file():
            c = pd.read_csv(f)
            for _, r in c.iterrows():
                out.append({**{k: p.get(k) for k in ("dataset", "attack", "pratio", "model", "seed")},
                            "defense": p["target"], "draw": int(p.get("draw", 0)), "epoch": int(r["epoch"]),
                            "test_asr": r.get("test_asr"), "test_acc": r.get("test_acc")})
    return pd.DataFrame(out)


def lmc_curves(plan, study_dir: Path, analysis: str = "lmc", valid: set | None = None) -> pd.DataFrame:
    out = []
    for t in collect_targets(plan, study_dir):
        key = f"{t['record_dir'].name}/{analysis}_{t['defense']}"
        f = t["record_dir"] / f"{analysis}_{t['defense']}" / f"{analysis}.csv"
        if f.is_file() and (valid is None or key in valid):
            c = pd.read_csv(f)
            for _, r in c.iterrows():
                out.append({**{k: t[k] for k in POINT}, "alpha": float(r["alpha"]), "asr": r["asr"],
                            "clean_acc": r["clean_acc"]})
    return pd.DataFrame(out)


def collect_targets(plan, study_dir: Path) -> list:
    """Every model of the grid whose robustness is measured: dict with the POINT keys, record_dir, folder, ra_dir."""
    study_dir = Path(study_dir)
    out = []
    for j in plan.jobs:
        p = j.point
        base = {k: p.get(k) for k in ("dataset", "attack", "pratio", "model", "seed")}
        if j.kind == "retune" and j.method == "ra" and p.get("role") == "ra" and not p.get("draw", 0):
            rdir = output_dir(study_dir, p["record"])
            out.append({**base, "defense": p["target"], "record_dir": rdir, "ra_dir": output_dir(study_dir, j.key),
                        "ra_key": j.key, "folder": output_dir(study_dir, j.key).parent})
    return out


def ra_budget_curves(plan, study_dir: Path, valid: set | None = None) -> pd.DataFrame:
    """P-ASR per RA epoch for every RA run of the grid (the main one, the benign control and the ra_poison_nums budgets,
    every draw): POINT keys, poison_num, draw, epoch, test_asr, test_acc. Empty when the study has no ra_poison_nums."""
    if not plan.study.ra_poison_nums:
        return pd.DataFrame()
    out = []
    for j in plan.jobs:
        p = j.point
        if j.kind != "retune" or j.method != "ra" or p.get("role") not in RA_ROLES:
            continue
        f = output_dir(study_dir, j.key) / "ra_df.csv"
        if f.is_file() and (valid is None or j.key in valid):
            for _, r in pd.read_csv(f).iterrows():
                out.append({**{k: p.get(k) for k in ("dataset", "attack", "pratio", "model", "seed")},
                            "defense": p["target"], "poison_num": int(j.config["poison_num"]),
                            "draw": int(p.get("draw", 0)), "epoch": int(r["epoch"]), "test_asr": r.get("test_asr"),
                            "test_acc": r.get("test_acc")})
    return pd.DataFrame(out)


def job_times(plan, study_dir: Path, valid: set | None = None) -> pd.DataFrame:
    """One row per job of the plan (topological order): key, kind, method, wall_s (from its marker; NaN when its output
    is missing or not current, or it was found rather than made), and on_critical_path: whether it lies on the chain of
    dependent jobs with the largest summed wall time, the part of the study no number of workers can shorten."""
    study_dir = Path(study_dir)
    wall = {j.key: (_wall(output_dir(study_dir, j.key)) if valid is None or j.key in valid else math.nan)
            for j in plan.jobs}
    longest: dict[str, float] = {}  # key -> summed wall time of the longest chain ending with it
    via: dict[str, str | None] = {}
    for j in plan.jobs:  # topological: every dep is done before
        before = [(longest[d], d) for d in j.deps if d in longest]
        best = max(before, default=(0.0, None))
        longest[j.key] = best[0] + (0.0 if math.isnan(wall[j.key]) else wall[j.key])
        via[j.key] = best[1]
    chain: list[str] = []
    k = max(longest, key=longest.get) if longest else None
    while k is not None:
        chain.append(k)
        k = via[k]
    on = set(chain)
    return pd.DataFrame([{"key": j.key, "kind": j.kind, "method": j.method, "wall_s": wall[j.key],
                          "on_critical_path": j.key in on} for j in plan.jobs],
                        columns=["key", "kind", "method", "wall_s", "on_critical_path"])
