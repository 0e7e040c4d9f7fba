"""report.md and a self-contained report.html (PNG figures embedded) of a study, from results.csv and the records.

Header: the study's jobs and the study runs that produced their outputs (bdsafety.study.history, from the job markers:
so a rerun that ran nothing still describes the outputs' history), the last run, its command and the code (git commit,
dirty flag). Then, per dataset / attack / pratio / model: the verdict table (mean [95% interval] of C-Acc, ASR, P-ASR,
DER, P-DER and a plain verdict per defense), the paper's claims, the per-stage table (mean ± std [min, max] over seeds
in percent of C-Acc and ASR at the paper's three stages and QRA, DER / P-DER), and beside them that grid point's figures
(ASR vs RA epoch, LMC path, P-ASR vs RA budget, QRA examples). In report.html the cells are coloured by robustness with
the study's verdict thresholds (``tone``, stated in the legend).
"""
from __future__ import annotations

import base64
import html
import math
import re
import shutil
from pathlib import Path

import pandas as pd

from bdsafety.analysis.ra_budget import plot as plot_budget
from bdsafety.safeio import atomic_savefig, atomic_write_text
from bdsafety.study.history import header_facts
from bdsafety.study.results import job_times, lmc_curves, ra_budget_curves, ra_curves, ra_runs
from bdsafety.study.stats import NAN, clustered, der, paired, verdict

COLUMNS = (("O-Backdoor C-Acc", "o_backdoor_acc"), ("O-Backdoor ASR", "o_backdoor_asr"),
           ("O-Robustness C-Acc", "o_robustness_acc"), ("O-Robustness ASR", "o_robustness_asr"),
           ("P-Robustness C-Acc", "p_robustness_acc"), ("P-ASR (after RA)", "p_robustness_asr"),
           ("QRA ASR", "qra_asr"), ("QRA ASR on clean model", "qra_clean_asr"), ("DER", "der"), ("P-DER", "p_der"))
UNIT_COLUMNS = {"der", "p_der"}  # fractions shown as they are (DER: 1 best, 0.5 no change), not in percent
GROUP = ("dataset", "attack", "pratio", "model")


def _cell(vals: pd.Series, scale: float = 100.0, digits: int = 1) -> str:
    v = scale * vals.dropna().astype(float)
    if not len(v):
        return "-"
    if len(v) == 1:
        return f"{v.iloc[0]:.{digits}f}"
    return f"{v.mean():.{digits}f} ± {v.std(ddof=1):.{digits}f} [{v.min():.{digits}f}, {v.max():.{digits}f}]"


VERDICT_TEXT = (
    "Cells: percent, mean [95% interval]: RA draws are averaged within each seed, the interval is Student's t over the "
    "seeds (one seed: over the RA draws, which then shows only the retuning draw's spread). P-ASR: ASR after the "
    "retuning attack; benign-retune P-ASR: the same RA with 0 poisoned samples; P-ASR - clean: paired difference to "
    "the clean reference model under the same RA draws. DER / P-DER: BackdoorBench's defense effectiveness rating from "
    "the ASR after the defense / after RA (1 best, 0.5 no change). Thresholds, fixed before any result: purified when "
    "ASR <= {purified_asr:g}%; the backdoor returns under RA when P-ASR - clean > {returns_margin:g} points with the "
    "interval above 0 (dormant: the same under benign retuning); claim (c)'s C-Acc cost is close to FST's when the "
    "interval of C-Acc(PAM) - C-Acc(FST) stays above -{acc_margin:g} points. A grid point whose undefended model "
    "stays at or below {purified_asr:g}% ASR, also under benign retuning, has no backdoor to remove and gets no "
    "verdicts; the 'no defense' row says on how many seeds the attack met the project's bar (ASR >= {attack_asr:g}%, "
    "C-Acc within {attack_acc_margin:g} points of the clean reference).")


def tables(df: pd.DataFrame) -> list:
    """[(title, DataFrame of formatted cells)] per grid point."""
    out = []
    if df.empty:
        return out
    cols = [(lab, c) for lab, c in COLUMNS if c in df.columns and df[c].notna().any()]
    for key, g in df.groupby(list(GROUP), sort=False):
        rows = []
        for d, gd in g.groupby("defense", sort=False):
            rows.append({"defense": d, "seeds": len(gd), **{lab: _cell(gd[c], *((1, 3) if c in UNIT_COLUMNS else ()))
                                                            for lab, c in cols}})
        out.append((_title(key), pd.DataFrame(rows)))
    return out


# the paper's claims: (label, defenses it is about, kind)
CLAIMS = (
    ("(a) superficial defenses regain the backdoor under RA", ("fst", "bti_dbf"), "regain"),
    ("(b) the clean model and EP do not regain it", ("clean", "exact_purification"), "no_regain"),
    ("(c) PAM keeps P-ASR below FST's at a C-Acc cost close to FST's", ("pam", "pam_reinvert"), "pam"),
)


def _runs_with_der(runs: pd.DataFrame, df: pd.DataFrame) -> pd.DataFrame:
    """The main RA runs joined with their model's stage metrics; p_der per (seed, draw)."""
    main = runs[runs["role"] == "ra"]
    cols = ["record", "defense", "o_backdoor_acc", "o_backdoor_asr", "o_robustness_acc", "o_robustness_asr"]
    m = main.merge(df[cols], on=["record", "defense"], how="left")
    m["p_der"] = der(m["o_backdoor_acc"], m["o_backdoor_asr"], m["o_robustness_acc"], m["p_asr"])
    return m


def verdict_tables(df: pd.DataFrame, runs: pd.DataFrame, th: dict, rank: bool = False) -> list:
    """[(title, verdict table, claims table)] per grid point: means with 95% intervals (bdsafety.study.stats).
    ``rank``: the defenses that purified (ASR <= purified_asr) ordered by P-ASR (most robust first), then those that did
    not (by P-ASR), then those without a P-ASR, then the references (none, clean), with a rank column."""
    out = []
    if df.empty or runs.empty:
        return out
    main = _runs_with_der(runs, df)
    control = runs[runs["role"] == "ra_control"]
    for key, g in df.groupby(list(GROUP), sort=False):
        sel = dict(zip(GROUP, key))
        gm = main.loc[(main[list(GROUP)] == pd.Series(sel)).all(axis=1)]
        gc = control.loc[(control[list(GROUP)] == pd.Series(sel)).all(axis=1)] if not control.empty else control
        has_clean = "clean" in set(gm["defense"])
        with_bd, n_seeds, bar = implant(g, gc, th)
        rows, order = [], []
        for d, gd in g.groupby("defense", sort=False):
            asr = clustered(gd, "o_robustness_asr")
            returns = paired(gm, "p_asr", d, "clean") if has_clean and d != "clean" else None
            dormant = paired(gc, "p_asr", d, "clean") if has_clean and d != "clean" and not gc.empty else None
            p_asr = clustered(gm[gm["defense"] == d], "p_asr")
            if d == "none":
                v = "no defense" + (f"; {bar}" if bar else "")
            elif d == "clean":
                v = "reference (never backdoored)"
            elif n_seeds and not with_bd:
                v = NOT_IMPLANTED
            else:
                v = verdict(asr, returns, dormant, th)
                if returns is None and asr.mean <= th["purified_asr"] and p_asr.mean > th["purified_asr"]:
                    v = "purified, backdoor returns under RA (no clean reference: judged on P-ASR alone)"
                benign = clustered(gc[gc["defense"] == d], "p_asr") if not gc.empty else None
                if dormant is None and benign is not None and asr.mean <= th["purified_asr"] < benign.mean:
                    v += "; dormant: returns under benign retuning (no clean reference: judged on its P-ASR alone)"
            row = {"defense": d, "seeds": gd["seed"].nunique(), "draws": int(gm[gm["defense"] == d]["draw"].nunique()),
                   "C-Acc": clustered(gd, "o_robustness_acc").fmt(), "ASR": asr.fmt(), "P-ASR": p_asr.fmt(),
                   "benign-retune P-ASR": clustered(gc[gc["defense"] == d], "p_asr").fmt() if not gc.empty else "-",
                   "P-ASR - clean": returns.fmt() if returns is not None else "-",
                   "DER": clustered(gd, "der").fmt(scale=1, digits=3) if "der" in gd else "-",
                   "P-DER": clustered(gm[gm["defense"] == d], "p_der").fmt(scale=1, digits=3)}
            if "target_match" in gd.columns and gd["target_match"].notna().any():
                tm = _target_right(gd)
                row["inverted target right"] = f"{int(tm.sum())}/{len(tm)}"
            row["verdict"] = v + (_partial(with_bd, n_seeds) if d not in ("none", "clean") else "")
            rows.append(row)
            purified = not math.isnan(asr.mean) and asr.mean <= th["purified_asr"]
            order.append((d in ("none", "clean"), math.isnan(p_asr.mean), not purified,
                          0.0 if math.isnan(p_asr.mean) else p_asr.mean))
        if rank:
            rows = [r for _, r in sorted(zip(order, rows), key=lambda t: t[0])]
            n = sum(not o[0] for o in order)
            rows = [{"rank": i + 1 if i < n else "-", **r} for i, r in enumerate(rows)]
        table = pd.DataFrame(rows)
        if "inverted target right" in table:  # the defenses without a trigger inversion have nothing to show there
            table["inverted target right"] = table["inverted target right"].fillna("-")
        out.append((_title(key), table, claims_table(g, gm, th, gc)))
    return out


NO_BACKDOOR = "n/a: no backdoor to remove"  # the claims' wording; the verdicts add why
NOT_IMPLANTED = f"{NO_BACKDOOR} (undefended model at or below purified_asr, also under benign retuning)"


def implant(g: pd.DataFrame, gc: pd.DataFrame | None, th: dict) -> tuple[int, int, str]:
    """(seeds with a backdoor, seeds, note) at one grid point, read from the undefended model (defense 'none').

    A seed has a backdoor when its undefended model's ASR, or for a backdoor kept dormant by design its benign-retune
    P-ASR (RA with 0 poisoned samples), lies above purified_asr, the report's own line between a backdoor and none (no
    new threshold). (0, 0, '') without an undefended row. Where no seed has one the grid point gets no verdicts (every
    defense would 'purify' it); where only some have one, the verdicts say so. The note also counts the seeds that met
    the project's attack bar (attack_asr, attack_acc_margin), so a weak backdoor's verdicts are read as such rather
    than silently kept or dropped."""
    none = g[g["defense"] == "none"]
    asr = none.groupby("seed")["o_robustness_asr"].mean().dropna()
    if asr.empty:
        return 0, 0, ""
    has = asr > th["purified_asr"]
    if gc is not None and not gc.empty:
        ctrl = gc[gc["defense"] == "none"].groupby("seed")["p_asr"].mean().reindex(asr.index)
        has |= (ctrl > th["purified_asr"]).fillna(False)
    acc = none.groupby("seed")["o_robustness_acc"].mean()
    clean = g[g["defense"] == "clean"].groupby("seed")["o_robustness_acc"].mean()
    met = asr >= th["attack_asr"] - 1e-9
    if not clean.empty:
        met &= (clean.reindex(asr.index) - acc.reindex(asr.index)).fillna(math.inf) <= th["attack_acc_margin"] + 1e-9
    cond = f"ASR >= {100 * th['attack_asr']:g}%" + (
        f", C-Acc within {100 * th['attack_acc_margin']:g} points of clean" if not clean.empty else
        " (no clean reference: C-Acc not checked)")
    k, n = int(has.sum()), len(asr)
    note = f"attack bar ({cond}) met on {int(met.sum())}/{n} seeds"
    return k, n, (note if k == n else f"backdoor present on {k}/{n} seeds; {note}")


def _partial(k: int, n: int) -> str:
    """The suffix of a verdict or claim where only some seeds carry a backdoor."""
    return f"; backdoor present on {k}/{n} seeds only" if 0 < k < n else ""


def claims_table(g: pd.DataFrame, gm: pd.DataFrame, th: dict, gc: pd.DataFrame | None = None) -> pd.DataFrame:
    """The paper's three claims on one grid point, each as paired differences with 95% intervals. ``gc``: the
    benign-retune control runs (they show a dormant backdoor); a grid point whose attack left no backdoor on any seed
    (``implant``) has every claim 'n/a', one with a backdoor on some seeds only says so."""
    present = set(g["defense"])
    with_bd, n_seeds, _ = implant(g, gc, th)
    rows = []
    for label, names, kind in CLAIMS:
        for d in [n for n in names if n in present]:
            if kind == "regain":
                e = paired(gm, "p_asr", d, "clean") if "clean" in present else NAN
                holds = e.mean > th["returns_margin"] and e.above_zero
                asr = clustered(g[g["defense"] == d], "o_robustness_asr")
                # regaining presupposes a purified model: a defense that left the backdoor in place says nothing here
                said = (f"n/a: not purified (ASR {100 * asr.mean:.1f}% > {100 * th['purified_asr']:g}%)"
                        if asr.n and asr.mean > th["purified_asr"] else _yes(e, holds))
                rows.append({"claim": label, "defense": d, "comparison": f"P-ASR({d}) - P-ASR(clean)",
                             "difference": e.fmt(), "holds": said})
            elif kind == "no_regain":
                if d == "clean":
                    e = clustered(gm[gm["defense"] == "clean"], "p_asr")
                    holds = e.mean <= th["purified_asr"]
                    rows.append({"claim": label, "defense": d, "comparison": "P-ASR(clean)", "difference": e.fmt(),
                                 "holds": _yes(e, holds)})
                else:
                    e = paired(gm, "p_asr", d, "clean") if "clean" in present else NAN
                    holds = e.mean <= th["returns_margin"]
                    rows.append({"claim": label, "defense": d, "comparison": f"P-ASR({d}) - P-ASR(clean)",
                                 "difference": e.fmt(), "holds": _yes(e, holds)})
            elif "fst" in present:
                e1 = paired(gm, "p_asr", d, "fst")
                e2 = paired(g, "o_robustness_acc", d, "fst", match=("seed",))
                ok1 = e1.below_zero
                ok2 = (e2.low if e2.n > 1 else e2.mean) >= -th["acc_margin"]
                rows.append({"claim": label, "defense": d, "comparison": f"P-ASR({d}) - P-ASR(fst)",
                             "difference": e1.fmt(), "holds": _yes(e1, ok1) + _unpurified(g, d, th)})
                rows.append({"claim": label, "defense": d, "comparison": f"C-Acc({d}) - C-Acc(fst)",
                             "difference": e2.fmt(), "holds": _yes(e2, ok2)})
    out = pd.DataFrame(rows)
    if n_seeds and not with_bd and not out.empty:
        out["holds"] = NO_BACKDOOR
    elif not out.empty:
        out["holds"] += _partial(with_bd, n_seeds)
    return out


def _target_right(gd: pd.DataFrame) -> pd.Series:
    """Per run with a trigger inversion: whether it found the true target (the results' target_match column)."""
    return gd["target_match"].dropna().astype(str).str.lower().isin(("true", "1", "1.0"))


def _unpurified(g: pd.DataFrame, d: str, th: dict) -> str:
    """Why claim (c) may fail for reasons other than path-aware minimization: on how many seeds ``d`` did not purify
    (ASR above purified_asr), and on how many its trigger inversion found the wrong target ('' when it purified on
    every seed)."""
    gd = g[g["defense"] == d]
    asr = gd.groupby("seed")["o_robustness_asr"].mean().dropna()
    bad = int((asr > th["purified_asr"]).sum())
    if not bad:
        return ""
    out = f"; not purified on {bad}/{len(asr)} seeds (ASR > {100 * th['purified_asr']:g}%)"
    if "target_match" in gd.columns and gd["target_match"].notna().any():
        tm = _target_right(gd)
        out += f", inverted target wrong on {int((~tm).sum())}/{len(tm)}"
    return out


def _yes(e, holds: bool) -> str:
    if e.n == 0:
        return "-"
    if e.n > 1:
        note = "" if e.unit == "seed" else " (one seed: interval over RA draws only)"
    else:  # one value (a per-seed quantity such as C-Acc on one seed): no interval at all
        note = " (one value: no interval)"
    return ("yes" if holds else "no") + note


def _md_table(t: pd.DataFrame) -> str:
    cols = list(t.columns)
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(str(r[c]) for c in cols) + " |" for _, r in t.iterrows()]
    return "\n".join(lines)


def _slug(key) -> str:
    return "_".join(f"{v:g}" if isinstance(v, float) else str(v) for v in key)


def _title(key) -> str:
    """The heading of one grid point (dataset / attack / pratio / model)."""
    return " / ".join(f"{k} {v:g}" if isinstance(v, float) else f"{v}" for k, v in zip(GROUP, key))


# Cell colours of report.html. Columns of an ASR (percent): low is robust. DER / P-DER: a shade from red at 0.5 (no
# change) to green at 1 (the whole backdoor removed at no C-Acc cost).
ASR_COLUMNS = {"ASR", "P-ASR", "benign-retune P-ASR", "O-Backdoor ASR", "O-Robustness ASR", "P-ASR (after RA)",
               "QRA ASR", "QRA ASR on clean model"}
DER_COLUMNS = {"DER", "P-DER"}
_NUM = re.compile(r"^(-?\d+(?:\.\d+)?)(?: ± \d+(?:\.\d+)?)?(?: \[(-?\d+(?:\.\d+)?), (-?\d+(?:\.\d+)?)\])?$")


def _numbers(text) -> tuple:
    """(mean, low, high) of a formatted cell ('12.3', '12.3 [10.1, 14.5]', '12.3 ± 1.0 [min, max]'); NaN where
    absent."""
    m = _NUM.match(str(text).strip())
    if not m:
        return math.nan, math.nan, math.nan
    return tuple(float(g) if g is not None else math.nan for g in m.groups())


def tone(column: str, text, th: dict) -> tuple[str, str]:
    """(css class, inline style) of one cell: 'ok' (robust), 'warn', 'bad' (the backdoor is there or returns), ''."""
    mean, low, _ = _numbers(text)
    if column == "verdict":
        v = str(text)
        if "returns under RA" in v or v.startswith("not purified"):
            return "bad", ""
        if "dormant" in v:
            return "warn", ""
        return ("ok", "") if v.startswith("purified") else ("", "")
    if math.isnan(mean):
        return "", ""
    if column in ASR_COLUMNS:
        return ("ok" if mean <= 100 * th["purified_asr"] else "bad"), ""
    if column == "P-ASR - clean":
        if mean <= 100 * th["returns_margin"]:
            return "ok", ""
        return ("bad" if low > 0 else "warn"), ""
    if column in DER_COLUMNS:
        hue = 120 * min(1.0, max(0.0, (mean - 0.5) / 0.5))
        return "der", f"background:hsl({hue:.0f},70%,85%)"
    return "", ""


def html_table(t: pd.DataFrame, th: dict, cls: str = "results") -> str:
    """A table of formatted cells with each cell coloured by ``tone``."""
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in t.columns)
    rows = []
    for _, r in t.iterrows():
        cells = []
        for c in t.columns:
            k, style = tone(c, r[c], th)
            attrs = (f" class='{k}'" if k else "") + (f" style='{style}'" if style else "")
            cells.append(f"<td{attrs}>{html.escape(str(r[c]))}</td>")
        rows.append("<tr>" + "".join(cells) + "</tr>")
    return f"<table class='{cls}'><thead><tr>{head}</tr></thead><tbody>" + "".join(rows) + "</tbody></table>"


def legend(th: dict) -> str:
    """The colours of report.html and their thresholds (the study's ``verdict``), as one sentence."""
    return (f"Colours (report.html): ASR, P-ASR and QRA ASR cells green when <= {100 * th['purified_asr']:g}% "
            f"(purified_asr), red above; P-ASR - clean green when <= {100 * th['returns_margin']:g} points "
            f"(returns_margin), red above with its interval above 0, amber above with an interval reaching 0; DER / "
            f"P-DER shaded from red at 0.5 (no change) to green at 1 (all of the backdoor removed at no C-Acc cost); "
            f"verdicts green (stays purified), amber (dormant), red (not purified, or returns under RA).")


def legend_html(th: dict) -> str:
    items = [("ok", f"ASR / P-ASR <= {100 * th['purified_asr']:g}%; P-ASR - clean <= {100 * th['returns_margin']:g} "
                    f"points; stays purified"),
             ("warn", f"P-ASR - clean > {100 * th['returns_margin']:g} points, interval reaching 0; dormant"),
             ("bad", f"ASR / P-ASR > {100 * th['purified_asr']:g}%; P-ASR - clean > {100 * th['returns_margin']:g} "
                     f"points, interval above 0; not purified, or returns under RA")]
    spans = "".join(f"<span class='key {k}'>{html.escape(text)}</span>" for k, text in items)
    der = ("<span class='key' style='background:linear-gradient(90deg,hsl(0,70%,85%),hsl(120,70%,85%))'>DER / P-DER: "
           "0.5 (no change) to 1 (all of the backdoor removed at no C-Acc cost)</span>")
    return f"<p class='legend'>Colours: {spans}{der}</p>"


def _plot(curves: pd.DataFrame, x: str, y: str, xlabel: str, ylabel: str, path: Path, title: str) -> Path | None:
    if curves.empty:
        return None
    import matplotlib  # lazy: matplotlib is heavy and only needed for figures

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # lazy: matplotlib is heavy and only needed for figures

    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for d, g in curves.groupby("defense", sort=False):
        m = g.groupby(x)[y].mean()
        ax.plot(m.index, 100 * m.values, marker="o", ms=3, label=str(d))
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_ylim(-2, 102)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_savefig(fig, path, dpi=110)
    return path


def figures(plan, study_dir: Path, valid: set | None = None, report_dir: Path | None = None) -> list:
    """[(grid point title, caption, png path)] under ``report_dir`` (default the study folder)/figures, from the outputs
    in ``study_dir``; the title is the heading of the grid point's tables (``_title``)."""
    report_dir = Path(report_dir or study_dir)
    fig_dir = report_dir / "figures"
    out = []
    ra = ra_curves(plan, study_dir, valid)
    lmc = lmc_curves(plan, study_dir, valid=valid) if "lmc" in plan.study.analyses else pd.DataFrame()
    for name, curves in (("ra_curves.csv", ra), ("lmc_curves.csv", lmc)):  # tidy tables for notebooks / plotting
        if not curves.empty:
            atomic_write_text(report_dir / name, curves.to_csv(index=False))
    for name, curves, x, y, xl, yl in (("ra", ra, "epoch", "test_asr", "RA epoch (0 = before)", "ASR (%)"),
                                       ("lmc", lmc, "alpha", "asr", "alpha (0 = defended, 1 = backdoored)", "ASR (%)")):
        if curves.empty:
            continue
        for key, g in curves.groupby(list(GROUP), sort=False):
            what = "ASR under the retuning attack" if name == "ra" else "LMC: ASR along the defended -> backdoored path"
            p = _plot(g, x, y, xl, yl, fig_dir / f"{name}_{_slug(key)}.png", f"{what}\n{_slug(key)} (mean over seeds)")
            if p:
                out.append((_title(key), f"{what}: {_slug(key)}", p))
    budget = ra_budget_curves(plan, study_dir, valid)
    if not budget.empty:

        atomic_write_text(report_dir / "ra_budget.csv", budget.to_csv(index=False))
        for key, g in budget.groupby(list(GROUP), sort=False):
            mean = g.groupby(["defense", "poison_num", "epoch"], sort=False)["test_asr"].mean().reset_index()
            path = fig_dir / f"ra_budget_{_slug(key)}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            out.append((_title(key), f"P-ASR vs RA budget (poisoned samples): {_slug(key)}",
                        Path(plot_budget(mean, path, _slug(key)))))
    for j in plan.jobs:
        if j.kind == "retune" and j.method == "qra" and j.point["seed"] == min(plan.study.seeds):
            src = Path(study_dir) / j.key / "qra_examples.png"
            if src.is_file() and (valid is None or j.key in valid):
                dst = fig_dir / f"qra_{j.key.replace('/', '__')}.png"
                dst.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(src, dst)
                out.append((_title(tuple(j.point.get(g) for g in GROUP)), f"QRA examples: {j.key}", dst))
    return out


def header(summary: dict) -> list:
    """[(label, text)] of the report's header: the study's jobs and runs, the last run, its command, the code."""
    hist = summary.get("history")
    if not hist:  # a summary without a history (written by hand or by an older runner): what it says
        return [("Jobs", summary.get("line", "-"))]
    f = header_facts(hist)
    out = [("Jobs", f["jobs"]), ("Last run", f["last_run"]), ("Command", f["command"]), ("Code", f["code"])]
    if len(f["runs"]) > 1:  # one run: the lines above say it all
        out.append(("Runs that produced the outputs", "; ".join(f["runs"])))
    return out


def _sections(df: pd.DataFrame, verdicts: list, figs: list) -> list:
    """[(title, verdict table or None, claims table or None, detail table or None, [(caption, path)])] per grid point,
    in the order of the tables; figures of no table's grid point come last under 'Other figures'."""
    by_title: dict = {}
    for title, t, c in verdicts:
        by_title.setdefault(title, [title, None, None, None, []])[1:3] = [t, c]
    for title, t in tables(df):
        by_title.setdefault(title, [title, None, None, None, []])[3] = t
    for title, cap, path in figs:
        by_title.setdefault(title if title in by_title else "Other figures",
                            ["Other figures", None, None, None, []])[4].append(
            (cap, path))
    return [tuple(v) for v in by_title.values()]


def sections_md(sections: list, report_dir: Path) -> list:
    """Markdown lines of ``_sections``' grid points: heading, verdict table, claims, per-stage table, figures."""
    md = []
    for title, vt, ct, dt, fg in sections:
        md += [f"## {title}", ""]
        if vt is not None:
            md += [_md_table(vt), ""]
        if ct is not None and not ct.empty:
            md += [CLAIMS_LINE, "", _md_table(ct), ""]
        if dt is not None:
            md += [DETAIL_LINE, "", _md_table(dt), ""]
        md += [f"![{c}]({p.relative_to(report_dir)})" for c, p in fg] + ([""] if fg else [])
    return md


def time_lines(times: pd.DataFrame, top: int = 5) -> list:
    """The report's 'Time' section (plain lines, `backquoted` keys): compute summed over the jobs, the critical path
    (its jobs and seconds) and the longest jobs; [] when no job has a wall time."""
    done = times.dropna(subset=["wall_s"])
    if done.empty:
        return []
    path = done[done["on_critical_path"]]
    total, crit = float(done["wall_s"].sum()), float(path["wall_s"].sum())
    out = [f"Compute: {total:,.0f} s summed over {len(done)} jobs (their wall times; jobs.csv lists each). Critical "
           f"path: {crit:,.0f} s, the chain of dependent jobs no number of workers can shorten: "
           + " -> ".join(f"`{r.key}` ({r.wall_s:.0f} s)" for r in path.itertuples()) + "."]
    longest = done.sort_values("wall_s", ascending=False).head(top)
    out.append("Longest jobs: "
               + ", ".join(f"`{r.key}` ({r.method}, {r.wall_s:.0f} s)" for r in longest.itertuples()) + ".")
    return out


CLAIMS_LINE = "Claims (paired differences, percent points, mean [95% interval]):"
DETAIL_LINE = ("Per stage: percent, mean ± std [min, max] over seeds (one value when one seed); "
               "DER / P-DER as fractions.")


def write_report(plan, study_dir: Path, df: pd.DataFrame, summary: dict, valid: set | None = None,
                 report_dir: Path | None = None) -> tuple[Path, Path]:
    """report.md and report.html in ``report_dir`` (default the study folder) from the outputs in ``study_dir``.
    ``summary``: what the runner writes to study.json (its ``history`` gives the header)."""
    study_dir = Path(study_dir)
    report_dir = Path(report_dir or study_dir)
    th = plan.study.verdict
    figs = figures(plan, study_dir, valid, report_dir)
    runs = ra_runs(plan, study_dir, valid)
    if not runs.empty:
        atomic_write_text(report_dir / "ra_runs.csv", runs.to_csv(index=False))
    verdicts = verdict_tables(df, runs, th)
    sections = _sections(df, verdicts, figs)
    facts = header(summary)
    intro = (f"From `{plan.study.path}`. P-ASR: ASR after the retuning attack (RA). Each grid point: the verdict table "
             f"(mean [95% interval]), the paper's claims, the per-stage table and the figures of that grid point.")
    verdict_text = VERDICT_TEXT.format(**{k: 100 * v for k, v in th.items()})
    fails = summary.get("failed", [])
    times = job_times(plan, study_dir, valid)
    atomic_write_text(report_dir / "jobs.csv", times.to_csv(index=False))
    timing = time_lines(times)
    md = [f"# Study {plan.study.name}", ""] + [f"- **{k}**: {v}" for k, v in facts] + ["", intro, ""]
    if verdicts:
        md += ["## Verdicts", "", verdict_text, ""]
    md += [legend(th), ""]
    md += sections_md(sections, report_dir)
    if timing:
        md += ["## Time", ""] + timing + [""]
    if fails:
        md += (["## Failed jobs", ""]
               + [f"- `{r['key']}`: {r.get('error', '')} (log: `{r.get('log', '')}`)" for r in fails] + [""])
    if plan.notes:
        md += ["## Notes", ""] + [f"- {n}" for n in plan.notes] + [""]
    md_path = atomic_write_text(report_dir / "report.md", "\n".join(md).rstrip("\n") + "\n")
    html_path = atomic_write_text(report_dir / "report.html",
                                  _html(plan, facts, intro, verdict_text if verdicts else None,
                                        sections, fails, th, timing))
    return md_path, html_path


def _code(text: str) -> str:
    """Escaped text with `backquoted` parts as <code>."""
    parts = str(text).split("`")
    return "".join(f"<code>{html.escape(p)}</code>" if i % 2 else html.escape(p) for i, p in enumerate(parts))


STYLE = ("body{font-family:sans-serif;max-width:1700px;margin:auto;padding:0 12px}table{border-collapse:collapse;"
         "margin:6px 0}td,th{padding:3px 8px;border-bottom:1px solid #ddd;text-align:right}"
         "td:first-child,th:first-child{text-align:left}"
         "dl.head{display:grid;grid-template-columns:max-content auto;gap:2px 12px}dl.head dt{font-weight:bold}"
         "dl.head dd{margin:0}.ok{background:#c8efc8}.warn{background:#ffe3a6}.bad{background:#f7c1c1}"
         ".key{padding:1px 6px;margin:0 4px;border-radius:3px;display:inline-block}"
         ".point{display:flex;flex-wrap:wrap;gap:16px;align-items:flex-start}.tables{flex:1 1 760px;overflow-x:auto}"
         ".figs{flex:0 1 480px}.figs figure{margin:0 0 10px 0}.figs img{max-width:100%;max-height:520px}"
         "figcaption{font-size:small;color:#444}")


def _html(plan, facts: list, intro: str, verdict_text: str | None, sections: list, fails: list, th: dict,
          timing: list = ()) -> str:
    parts = [f"<h1>Study {html.escape(plan.study.name)}</h1>", "<dl class='head'>"]
    parts += [f"<dt>{html.escape(k)}</dt><dd>{_code(v)}</dd>" for k, v in facts] + ["</dl>", f"<p>{_code(intro)}</p>"]
    if verdict_text:
        parts += ["<h2>Verdicts</h2>", f"<p>{html.escape(verdict_text)}</p>"]
    parts.append(legend_html(th))
    for title, vt, ct, dt, fg in sections:
        parts += [f"<h2>{html.escape(title)}</h2>", "<div class='point'><div class='tables'>"]
        if vt is not None:
            parts.append(html_table(vt, th, "verdicts"))
        if ct is not None and not ct.empty:
            parts += [f"<p>{html.escape(CLAIMS_LINE)}</p>", html_table(ct, th, "claims")]
        if dt is not None:
            parts += [f"<p>{html.escape(DETAIL_LINE)}</p>", html_table(dt, th, "stages")]
        parts.append("</div><div class='figs'>")
        for c, p in fg:
            b64 = base64.b64encode(p.read_bytes()).decode()
            parts.append(f"<figure><img alt='{html.escape(c)}' src='data:image/png;base64,{b64}'><figcaption>"
                         f"{html.escape(c)}</figcaption></figure>")
        parts.append("</div></div>")
    if timing:
        parts += ["<h2>Time</h2>"] + [f"<p>{_code(t)}</p>" for t in timing]
    if fails:
        parts += ["<h2>Failed jobs</h2><ul>"] + [f"<li><code>{html.escape(r['key'])}</code>: "
                                                 f"{html.escape(str(r.get('error', '')))} (log "
                                                 f"<code>{html.escape(str(r.get('log', '')))}</code>)</li>"
                                                 for r in fails] + ["</ul>"]
    if plan.notes:
        parts += ["<h2>Notes</h2><ul>"] + [f"<li>{html.escape(n)}</li>" for n in plan.notes] + ["</ul>"]
    return ("<!doctype html><html><head><meta charset='utf-8'><title>Study " + html.escape(plan.study.name)
            + "</title><style>"
            + STYLE + "</style></head><body>\n" + "\n".join(parts) + "\n</body></html>\n")
