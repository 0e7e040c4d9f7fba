"""report.md and a self-contained report.html (PNG figures embedded) of a study, from results.csv and the records.

Tables: per dataset / attack / pratio / model, one row per defense, mean ± std [min, max] over seeds in percent of C-Acc and ASR
at the paper's three stages (O-Backdoor, O-Robustness, P-Robustness) and QRA. Figures: ASR vs RA epoch, LMC paths,
QRA examples (first seed).
"""
from __future__ import annotations

import base64
import html
import math
import shutil
from pathlib import Path

import pandas as pd

from bdsafety.safeio import atomic_savefig, atomic_write_text
from bdsafety.study.results import lmc_curves, ra_budget_curves, ra_curves, ra_runs
from bdsafety.study.stats import NAN, clustered, der, paired, verdict

COLUMNS = (("O-Backdoor C-Acc", "o_backdoor_acc"), ("O-Backdoor ASR", "o_backdoor_asr"),
           ("O-Robustness C-Acc", "o_robustness_acc"), ("O-Robustness ASR", "o_robustness_asr"),
           ("P-Robustness C-Acc", "p_robustness_acc"), ("P-ASR (after RA)", "p_robustness_asr"),
           ("QRA ASR", "qra_asr"), ("QRA ASR on clean model", "qra_clean_asr"))
GROUP = ("dataset", "attack", "pratio", "model")


def _cell(vals: pd.Series) -> str:
    v = vals.dropna().astype(float)
    if not len(v):
        return "-"
    if len(v) == 1:
        return f"{100 * v.iloc[0]:.1f}"
    return f"{100 * v.mean():.1f} ± {100 * v.std(ddof=1):.1f} [{100 * v.min():.1f}, {100 * v.max():.1f}]"


VERDICT_TEXT = (
    "Cells: percent, mean [95% interval]: RA draws are averaged within each seed, the interval is Student's t over the "
    "seeds (one seed: over the RA draws, which then shows only the retuning draw's spread). P-ASR: ASR after the "
    "retuning attack; benign-retune P-ASR: the same RA with 0 poisoned samples; P-ASR - clean: paired difference to the "
    "clean reference model under the same RA draws. DER / P-DER: BackdoorBench's defense effectiveness rating from "
    "the ASR after the defense / after RA (1 best, 0.5 no change). Thresholds, fixed before any result: purified when "
    "ASR <= {purified_asr:g}%; the backdoor returns under RA when P-ASR - clean > {returns_margin:g} points with the "
    "interval above 0 (dormant: the same under benign retuning); claim (c)'s C-Acc cost is close to FST's when the "
    "interval of C-Acc(PAM) - C-Acc(FST) stays above -{acc_margin:g} points.")


def tables(df: pd.DataFrame) -> list:
    """[(title, DataFrame of formatted cells)] per grid point."""
    out = []
    if df.empty:
        return out
    cols = [(lab, c) for lab, c in COLUMNS if c in df.columns and df[c].notna().any()]
    for key, g in df.groupby(list(GROUP), sort=False):
        title = " / ".join(f"{k} {v:g}" if isinstance(v, float) else f"{v}" for k, v in zip(GROUP, key))
        rows = []
        for d, gd in g.groupby("defense", sort=False):
            rows.append({"defense": d, "seeds": len(gd), **{lab: _cell(gd[c]) for lab, c in cols}})
        out.append((title, pd.DataFrame(rows)))
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
    ``rank``: the defenses ordered by P-ASR (most robust first; no P-ASR last), then the references (none, clean), with a
    rank column."""
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
        rows, order = [], []
        for d, gd in g.groupby("defense", sort=False):
            asr = clustered(gd, "o_robustness_asr")
            returns = paired(gm, "p_asr", d, "clean") if has_clean and d != "clean" else None
            dormant = paired(gc, "p_asr", d, "clean") if has_clean and d != "clean" and not gc.empty else None
            p_asr = clustered(gm[gm["defense"] == d], "p_asr")
            if d == "none":
                v = "no defense"
            elif d == "clean":
                v = "reference (never backdoored)"
            else:
                v = verdict(asr, returns, dormant, th)
                if returns is None and asr.mean <= th["purified_asr"] and p_asr.mean > th["purified_asr"]:
                    v = "purified, backdoor returns under RA (no clean reference: judged on P-ASR alone)"
                control = clustered(gc[gc["defense"] == d], "p_asr") if not gc.empty else None
                if dormant is None and control is not None and asr.mean <= th["purified_asr"] < control.mean:
                    v += "; dormant: returns under benign retuning (no clean reference: judged on its P-ASR alone)"
            row = {"defense": d, "seeds": gd["seed"].nunique(), "draws": int(gm[gm["defense"] == d]["draw"].nunique()),
                   "C-Acc": clustered(gd, "o_robustness_acc").fmt(), "ASR": asr.fmt(), "P-ASR": p_asr.fmt(),
                   "benign-retune P-ASR": clustered(gc[gc["defense"] == d], "p_asr").fmt() if not gc.empty else "-",
                   "P-ASR - clean": returns.fmt() if returns is not None else "-",
                   "DER": clustered(gd, "der").fmt(scale=1, digits=3) if "der" in gd else "-",
                   "P-DER": clustered(gm[gm["defense"] == d], "p_der").fmt(scale=1, digits=3)}
            if "target_match" in gd.columns and gd["target_match"].notna().any():
                tm = gd["target_match"].dropna().astype(str).str.lower().isin(("true", "1", "1.0"))
                row["inverted target right"] = f"{int(tm.sum())}/{len(tm)}"
            row["verdict"] = v
            rows.append(row)
            order.append((d in ("none", "clean"), math.isnan(p_asr.mean), 0.0 if math.isnan(p_asr.mean) else p_asr.mean))
        if rank:
            rows = [r for _, r in sorted(zip(order, rows), key=lambda t: t[0])]
            n = sum(not o[0] for o in order)
            rows = [{"rank": i + 1 if i < n else "-", **r} for i, r in enumerate(rows)]
        out.append((" / ".join(f"{k} {v:g}" if isinstance(v, float) else f"{v}" for k, v in zip(GROUP, key)),
                    pd.DataFrame(rows), claims_table(g, gm, th)))
    return out


def claims_table(g: pd.DataFrame, gm: pd.DataFrame, th: dict) -> pd.DataFrame:
    """The paper's three claims on one grid point, each as paired differences with 95% intervals."""
    present = set(g["defense"])
    rows = []
    for label, names, kind in CLAIMS:
        for d in [n for n in names if n in present]:
            if kind == "regain":
                e = paired(gm, "p_asr", d, "clean") if "clean" in present else NAN
                holds = e.mean > th["returns_margin"] and e.above_zero
                rows.append({"claim": label, "defense": d, "comparison": f"P-ASR({d}) - P-ASR(clean)", "difference": e.fmt(),
                             "holds": _yes(e, holds)})
            elif kind == "no_regain":
                if d == "clean":
                    e = clustered(gm[gm["defense"] == "clean"], "p_asr")
                    holds = e.mean <= th["purified_asr"]
                    rows.append({"claim": label, "defense": d, "comparison": "P-ASR(clean)", "difference": e.fmt(),
                                 "holds": _yes(e, holds)})
                else:
                    e = paired(gm, "p_asr", d, "clean") if "clean" in present else NAN
                    holds = e.mean <= th["returns_margin"]
                    rows.append({"claim": label, "defense": d, "comparison": f"P-ASR({d}) - P-ASR(clean)", "difference": e.fmt(),
                                 "holds": _yes(e, holds)})
            elif "fst" in present:
                e1 = paired(gm, "p_asr", d, "fst")
                e2 = paired(g, "o_robustness_acc", d, "fst", match=("seed",))
                ok1 = e1.below_zero
                ok2 = (e2.low if e2.n > 1 else e2.mean) >= -th["acc_margin"]
                rows.append({"claim": label, "defense": d, "comparison": f"P-ASR({d}) - P-ASR(fst)", "difference": e1.fmt(),
                             "holds": _yes(e1, ok1)})
                rows.append({"claim": label, "defense": d, "comparison": f"C-Acc({d}) - C-Acc(fst)", "difference": e2.fmt(),
                             "holds": _yes(e2, ok2)})
    return pd.DataFrame(rows)


def _yes(e, holds: bool) -> str:
    if e.n == 0:
        return "-"
    note = "" if e.unit == "seed" and e.n > 1 else " (one seed: interval over RA draws only)"
    return ("yes" if holds else "no") + note


def _md_table(t: pd.DataFrame) -> str:
    cols = list(t.columns)
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(str(r[c]) for c in cols) + " |" for _, r in t.iterrows()]
    return "\n".join(lines)


def _slug(key) -> str:
    return "_".join(f"{v:g}" if isinstance(v, float) else str(v) for v in key)


def _plot(curves: pd.DataFrame, x: str, y: str, xlabel: str, ylabel: str, path: Path, title: str) -> Path | None:
    if curves.empty:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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
    """[(caption, png path)] under ``report_dir`` (default the study folder)/figures, from the outputs in ``study_dir``."""
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
                out.append((f"{what}: {_slug(key)}", p))
    budget = ra_budget_curves(plan, study_dir, valid)
    if not budget.empty:
        from bdsafety.analysis.ra_budget import plot as plot_budget

        atomic_write_text(report_dir / "ra_budget.csv", budget.to_csv(index=False))
        for key, g in budget.groupby(list(GROUP), sort=False):
            mean = g.groupby(["defense", "poison_num", "epoch"], sort=False)["test_asr"].mean().reset_index()
            path = fig_dir / f"ra_budget_{_slug(key)}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            out.append((f"P-ASR vs RA budget (poisoned samples): {_slug(key)}", Path(plot_budget(mean, path, _slug(key)))))
    for j in plan.jobs:
        if j.kind == "retune" and j.method == "qra" and j.point["seed"] == min(plan.study.seeds):
            src = Path(study_dir) / j.key / "qra_examples.png"
            if src.is_file() and (valid is None or j.key in valid):
                dst = fig_dir / f"qra_{j.key.replace('/', '__')}.png"
                dst.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(src, dst)
                out.append((f"QRA examples: {j.key}", dst))
    return out


def write_report(plan, study_dir: Path, df: pd.DataFrame, summary: dict, valid: set | None = None,
                 report_dir: Path | None = None) -> tuple[Path, Path]:
    """report.md and report.html in ``report_dir`` (default the study folder) from the outputs in ``study_dir``."""
    study_dir = Path(study_dir)
    report_dir = Path(report_dir or study_dir)
    figs = figures(plan, study_dir, valid, report_dir)
    head = [f"# Study {plan.study.name}", "", f"From `{plan.study.path}`. Jobs: {summary.get('line', '')}. "
            "Cells: percent, mean ± std [min, max] over seeds (one value when one seed). P-ASR: ASR after the retuning attack.", ""]
    body = []
    runs = ra_runs(plan, study_dir, valid)
    if not runs.empty:
        atomic_write_text(report_dir / "ra_runs.csv", runs.to_csv(index=False))
    verdicts = verdict_tables(df, runs, plan.study.verdict)
    if verdicts:
        th = plan.study.verdict
        body += ["## Verdicts", "", VERDICT_TEXT.format(**{k: 100 * v for k, v in th.items()}), ""]
        for title, t, c in verdicts:
            body += [f"### {title}", "", _md_table(t), ""]
            if not c.empty:
                body += ["Claims (paired differences, percent points, mean [95% interval]):", "", _md_table(c), ""]
    for title, t in tables(df):
        body += [f"## {title}", "", _md_table(t), ""]
    fails = summary.get("failed", [])
    if fails:
        body += ["## Failed jobs", ""] + [f"- `{r['key']}`: {r.get('error', '')} (log: `{r.get('log', '')}`)" for r in fails] + [""]
    if plan.notes:
        body += ["## Notes", ""] + [f"- {n}" for n in plan.notes] + [""]
    md = "\n".join(head + body + ["## Figures", ""] + [f"![{c}]({p.relative_to(report_dir)})" for c, p in figs]) + "\n"
    md_path = atomic_write_text(report_dir / "report.md", md)
    parts = [f"<h1>Study {html.escape(plan.study.name)}</h1>", f"<p>{html.escape(' '.join(head[2:]))}</p>"]
    if verdicts:
        parts += ["<h2>Verdicts</h2>", f"<p>{html.escape(VERDICT_TEXT.format(**{k: 100 * v for k, v in th.items()}))}</p>"]
        for title, t, c in verdicts:
            parts += [f"<h3>{html.escape(title)}</h3>", t.to_html(index=False, escape=True, border=0)]
            if not c.empty:
                parts += ["<p>Claims (paired differences, percent points, mean [95% interval]):</p>",
                          c.to_html(index=False, escape=True, border=0)]
    for title, t in tables(df):
        parts += [f"<h2>{html.escape(title)}</h2>", t.to_html(index=False, escape=True, border=0)]
    if fails:
        parts += ["<h2>Failed jobs</h2><ul>"] + [f"<li><code>{html.escape(r['key'])}</code>: {html.escape(str(r.get('error', '')))} "
                                                 f"(log <code>{html.escape(str(r.get('log', '')))}</code>)</li>" for r in fails] + ["</ul>"]
    if plan.notes:
        parts += ["<h2>Notes</h2><ul>"] + [f"<li>{html.escape(n)}</li>" for n in plan.notes] + ["</ul>"]
    parts.append("<h2>Figures</h2>")
    for c, p in figs:
        b64 = base64.b64encode(p.read_bytes()).decode()
        parts.append(f"<figure><img alt='{html.escape(c)}' src='data:image/png;base64,{b64}'><figcaption>{html.escape(c)}"
                     f"</figcaption></figure>")
    doc = ("<!doctype html><html><head><meta charset='utf-8'><title>Study " + html.escape(plan.study.name) + "</title><style>"
           "body{font-family:sans-serif;max-width:1100px;margin:auto}table{border-collapse:collapse}"
           "td,th{padding:3px 8px;border-bottom:1px solid #ddd;text-align:right}figure{display:inline-block}</style></head><body>"
           + "\n".join(parts) + "</body></html>\n")
    html_path = atomic_write_text(report_dir / "report.html", doc)
    return md_path, html_path
