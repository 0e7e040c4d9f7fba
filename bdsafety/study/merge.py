"""One report from several runs of parts of one study grid (chunks).

A grid too long for one sitting runs in chunks (``analysis/run_study.py --attacks A --seeds S``): chunks run one after
the other in one study folder simply make up the grid (the jobs keep their ids). Chunks run where their records do not
survive (a machine whose sessions end, several machines) keep only their report folders' tables; this merges them:

    python analysis/merge_studies.py --inputs record/study_bench_cifar10size --out benchmarks/results/bench/badnet_s0 \
        --chunk badnet_s0
    python analysis/merge_studies.py --inputs benchmarks/results/bench/*_s* --out benchmarks/results/bench \
        --yaml_path config/study/bench_cifar10size.yaml

Each input is a study's report folder (results.csv, and ra_runs.csv etc. when the study wrote them) or an earlier
output of this command. The tables are concatenated (a row of the same grid point and defense in two inputs is an
error: the chunks overlap), copied to ``--out`` with a ``chunk`` column, and report.md is rendered from them: the
verdict tables, the paper's claims and the per-stage tables, as the study's own report, plus where each chunk came
from (its command and code, from its study.json). Figures stay in the chunks' own reports.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import pandas as pd

from bdsafety.errors import ConfigError
from bdsafety.safeio import atomic_write_text
from bdsafety.study.history import header_facts
from bdsafety.study.report import VERDICT_TEXT, _sections, legend, sections_md, verdict_tables
from bdsafety.study.results import POINT
from bdsafety.study.spec import load_study
from bdsafety.study.stats import verdict_thresholds

TABLES = {  # table -> the columns that identify a row
    "results.csv": POINT,
    "ra_runs.csv": POINT + ("role", "poison_num", "draw"),
    "ra_curves.csv": POINT + ("draw", "epoch"),
    "ra_budget.csv": POINT + ("poison_num", "epoch"),
    "lmc_curves.csv": POINT + ("alpha",),
}
SOURCES = "chunks.json"


def _chunk_sources(folder: Path, label: str) -> list[dict]:
    """Where the rows of ``folder`` come from: its chunks.json (an earlier merge), else its study.json's header."""
    merged = folder / SOURCES
    if merged.is_file():
        return json.loads(merged.read_text())
    facts = {"folder": label}
    try:
        summary = json.loads((folder / "study.json").read_text())
    except (OSError, ValueError):
        summary = {}
    if summary.get("history"):

        f = header_facts(summary["history"])
        facts.update(jobs=f["jobs"], command=f["produced_by"], code=f["code"])  # not a later run that only re-read them
    else:
        facts.update(jobs=summary.get("line", "?"), command="?", code="?")
    return [facts]


def read_chunks(inputs: list, label: str | None = None) -> tuple[dict, list]:
    """({table: concatenated frame}, [source facts]) of the input folders; overlapping rows are an error. Rows read from
    a study's own report folder are labelled (column ``chunk``) ``label`` or the folder's name."""
    frames: dict[str, list] = {t: [] for t in TABLES}
    sources: list[dict] = []
    for d in map(Path, inputs):
        if not (d / "results.csv").is_file():
            raise ConfigError(f"{d}: no results.csv; give a study's report folder (the study folder, or its "
                              f"report_dir) or an earlier output of analysis/merge_studies.py")
        for t in TABLES:
            if (d / t).is_file():
                f = pd.read_csv(d / t)
                if "chunk" not in f.columns:
                    f.insert(0, "chunk", label or d.name)
                frames[t].append(f)
        sources += _chunk_sources(d, label or d.name)
    out = {t: pd.concat(fs, ignore_index=True) for t, fs in frames.items() if fs}
    res = out["results.csv"]
    dup = res[res.duplicated(list(POINT), keep=False)]
    if not dup.empty:
        first = dup.iloc[0]
        where = ", ".join(sorted(set(dup[(dup[list(POINT)] == first[list(POINT)]).all(axis=1)]["chunk"].astype(str))))
        raise ConfigError(f"the inputs overlap: {dict(first[list(POINT)])} is in {where}; merge each chunk once")
    return out, sources


def merge(inputs: list, out: Path, verdict: dict | None = None, title: str | None = None,
          chunk: str | None = None) -> Path:
    """Write the merged tables, chunks.json and report.md to ``out``; returns report.md. ``chunk``: the label of one
    study's report folder exported as a chunk (default its folder's name)."""

    th = verdict_thresholds(verdict or {})
    if chunk and len(inputs) != 1:
        raise ConfigError("--chunk labels ONE study's report folder (an export); merged inputs keep their own labels")
    frames, sources = read_chunks(inputs, chunk)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for t, f in frames.items():
        atomic_write_text(out / t, f.to_csv(index=False))
    atomic_write_text(out / SOURCES, json.dumps(sources, indent=1) + "\n")
    df = frames["results.csv"]
    runs = frames.get("ra_runs.csv", pd.DataFrame())
    md = [f"# {title or 'Merged study'}", "",
          f"{len(sources)} chunk(s), {len(df)} result rows; P-ASR: ASR after the retuning attack (RA). Each grid "
          f"point: the verdict table (mean [95% interval] over seeds and RA draws), the paper's claims (paired "
          f"differences) and the per-stage table. Figures: in each chunk's own report.", "", "## Chunks", ""]
    md += [f"- `{s.get('folder')}`: {s.get('jobs')}; command {s.get('command')}; code {s.get('code')}" for s in sources]
    verdicts = verdict_tables(df, runs, th) if not runs.empty else []
    md += ["", "## Verdicts", "", VERDICT_TEXT.format(**{k: 100 * v for k, v in th.items()}), "", legend(th), ""]
    md += sections_md(_sections(df, verdicts, []), out)  # figures: in the chunks' own reports
    return atomic_write_text(out / "report.md", "\n".join(md).rstrip("\n") + "\n")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="analysis/merge_studies.py", description=__doc__.split("\n")[0])
    p.add_argument("--inputs", nargs="+", required=True, help="report folders of the chunks (or earlier merges)")
    p.add_argument("--out", required=True, help="folder of the merged tables and report.md (created if missing)")
    p.add_argument("--chunk", default=None, help="with one input: the label of its rows (default: the folder's name), "
                                                 "e.g. badnet_s0 for the chunk --attacks badnet --seeds 0")
    p.add_argument("--yaml_path", default=None, help="the study yaml: its verdict thresholds and name (default: the "
                                                     "defaults of bdsafety/study/stats.py)")
    a = p.parse_args(argv)
    verdict, title = None, None
    if a.yaml_path:

        st = load_study(a.yaml_path)
        verdict, title = st.verdict, f"Study {st.name} (merged chunks)"
    print(merge(a.inputs, Path(a.out), verdict, title, a.chunk))
    return 0
