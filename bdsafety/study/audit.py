"""The audit: which defenses of a record are only superficially safe?

    python analysis/audit.py --result_file badnet_demo                   # every defense folder of record/badnet_demo
    python analysis/audit.py --result_file badnet_demo --defense fst,anp --run pam --clean_reference --ra_draws 5
    python analysis/audit.py --result_file /path/to/BackdoorBench/record/badnet_0_1 --dry_run

It takes any record (BackdoorBench's or this tool's) and audits each model in it: the defense folders found in
``<record>/defense/`` (``--defense all``, the default, or the named ones) and the defenses it runs here (``--run``,
registered names; a record without any defense folder needs them). On every model it runs, through the study runner
(bdsafety/study/: so it resumes, runs on Ray with ``--executor ray``, and never replaces an output it did not make):

  * RA, the retuning attack (``--ra_draws`` draws), with its benign control (the same RA with 0 poisoned samples) and
    its budget sweep (``--poison_nums``: P-ASR with that many poisoned samples);
  * LMC along the path defended model -> backdoored model;
  * QRA when a clean reference is available: ``--clean_reference`` trains one, the badnet attack at pratio 0 on the
    record's dataset and model with config/attack/badnet/<dataset>.yaml (demo.yaml for synthetic).

The audit is an ordinary study (config/study/audit.yaml plus the flags): the record is found in place (``records:``,
no attack job), the defense folders are ``external_defenses``, the study folder is the record's parent folder and
the study's own files go to ``<record>/audit/`` (``report_dir``): audit.md / audit.html (the ranking), the study's
report.md / report.html / results.csv, study.yaml (the study it ran: ``python analysis/run_study.py --yaml_path
<record>/audit/study.yaml`` reruns it), study.json, logs/ and the clean reference. RA, QRA and LMC write their usual
folders inside the record (defense/<folder>/ra*, defense/<folder>/qra, lmc_<folder>). A rerun runs only what is not
up to date.

The ranking orders the defenses by post-retuning robustness: P-ASR (the ASR after RA, mean over the RA draws with
its 95% interval, bdsafety.study.stats), lowest first, with a plain verdict per defense from the study report's
verdict table: "not purified" (ASR after the defense above purified_asr), "purified, backdoor returns under RA",
"purified, stays purified under RA", plus "dormant: returns under benign retuning" when the 0-poison control brings
it back. Without a clean reference "returns" is judged on the P-ASR itself (above purified_asr); with one, on the
paired excess over the clean model's P-ASR (returns_margin). The thresholds (stats.VERDICT_DEFAULTS, or the yaml's
``verdict:``) are stated in the report.
"""
from __future__ import annotations

import argparse
import html
import sys
from pathlib import Path

import pandas as pd
import yaml

from bdsafety import registry
from bdsafety.config import read_yaml
from bdsafety.errors import ConfigError
from bdsafety.paths import CONFIG_ROOT
from bdsafety.records import list_defenses, resolve_record_dir
from bdsafety.safeio import atomic_write_text
from bdsafety.study.executors import EXECUTORS
from bdsafety.study.history import cli_command
from bdsafety.study.report import STYLE, VERDICT_TEXT, html_table, legend_html, verdict_tables
from bdsafety.study.results import ra_runs
from bdsafety.study.runner import run_study
from bdsafety.study.spec import Study, study_from_dict

DEFAULT_YAML = CONFIG_ROOT / "study" / "audit.yaml"
REPORT_FOLDER = "audit"  # <record>/audit/: the audit's own files


def _names(spec: str | None) -> list:
    return [s.strip() for s in (spec or "").split(",") if s.strip()]


def audit_study(result_file: str, record_root: str = "./record", defense: str = "all", run: str | None = None,
                ra_draws: int | None = None, poison_nums: str | None = None, clean_reference: bool = False,
                yaml_path: str | None = None) -> tuple[Study, dict]:
    """The study of an audit of ``result_file`` and its mapping (what study.yaml holds)."""

    rec = resolve_record_dir(result_file, record_root).resolve()
    if not (rec / "attack_result.pt").is_file():
        raise ConfigError(f"{rec} has no attack_result.pt: not a record (pass the record folder, not a defense folder)")
    yaml_path = Path(yaml_path or DEFAULT_YAML)
    data = dict(read_yaml(yaml_path))
    for k in ("records", "external_defenses", "defenses", "study_dir", "report_dir", "record_root"):
        if data.get(k):
            raise ConfigError(f"{yaml_path}: '{k}' is set by the audit (from --result_file, --defense, "
                              f"--run); remove it")
    ours = _names(run)
    own_folders = {registry.get("defense", d).folder for d in ours if d in registry.names("defense")}
    found = list_defenses(rec)
    # 'all': the folders found, less those this audit makes (--run)
    avail = [f for f in found if f not in own_folders]
    chosen = (registry.name_list(defense, avail, what="defense folder", strict=False)
              if avail or defense.strip() != "all" else [])
    if defense.strip() != "all":
        missing = [f for f in chosen if f not in found]
        if missing:
            raise ConfigError(f"--defense {defense}: {rec} has no defense folder {', '.join(missing)} (no "
                              f"defense/<folder>/defense_result.pt); its defense folders: {', '.join(found) or 'none'}")
    if not chosen and not ours:
        raise ConfigError(f"{rec} has no defense folder to audit; name defenses to run on it with --run (registered: "
                          f"{', '.join(registry.names('defense'))})")
    data.update(records=[rec.name], external_defenses=chosen, defenses=ours, report_dir=str(rec / REPORT_FOLDER))
    data["clean_reference"] = bool(clean_reference or data.get("clean_reference", False))
    if ra_draws is not None:
        data["ra_draws"] = ra_draws
    if poison_nums is not None:
        try:
            data["ra_poison_nums"] = [int(n) for n in _names(poison_nums)]
        except ValueError:
            raise ConfigError(f"--poison_nums must be a comma list of integers >= 0, got {poison_nums!r}") from None
    study = study_from_dict(data, rec / REPORT_FOLDER / "study.yaml", study_dir=str(rec.parent))
    return study, data


def ranking(oc) -> list:
    """[(title, ranked verdict table)] of a finished audit (bdsafety.study.report.verdict_tables with rank)."""

    valid = {k for k, r in oc.results.items() if r.get("status") in ("done", "ran")}
    df = pd.read_csv(oc.results_csv) if oc.results_csv and Path(oc.results_csv).is_file() else pd.DataFrame()
    runs = ra_runs(oc.plan, oc.study_dir, valid)
    return [(title, t) for title, t, _ in verdict_tables(df, runs, oc.plan.study.verdict, rank=True)]


def _md_table(t: pd.DataFrame) -> str:
    cols = list(t.columns)
    return "\n".join(["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
                     + ["| " + " | ".join(str(r[c]) for c in cols) + " |" for _, r in t.iterrows()])


def _measured_by_ra(oc) -> list:
    """Defense folders whose C-Acc / ASR come from RA's epoch-0 evaluation (results.csv's o_robustness_source)."""
    f = oc.results_csv
    if not f or not Path(f).is_file():
        return []
    df = pd.read_csv(f)
    if "o_robustness_source" not in df:
        return []
    return sorted(set(df.loc[df["o_robustness_source"] == "ra_epoch0", "defense"].astype(str)))


def write_audit_report(oc, ranked: list) -> tuple[Path, Path]:
    """audit.md and audit.html in the study's report_dir: the ranking, the verdicts' thresholds, what ran."""

    st = oc.plan.study
    rec = st.study_dir / st.records[0]
    clean = ("yes (badnet at pratio 0 on its dataset and model)" if st.clean_reference
             else "no (QRA left out; --clean_reference)")
    intro = [f"Record `{rec}`. Defense folders found: {', '.join(st.external_defenses) or 'none'}; run here: "
             f"{', '.join(st.defenses) or 'none'}. Clean reference: {clean}.",
             f"Each model was retuned by RA ({st.ra_draws} draw(s)), by its benign control (0 poisoned samples), and "
             f"with {', '.join(map(str, st.ra_poison_nums)) or 'no'} poisoned samples (budget sweep); "
             f"{', '.join(st.analyses) or 'no analyses'}"
             f"{', QRA' if 'qra' in st.retune and st.clean_reference else ''}.",
             "Ranked by post-retuning robustness: the defenses that purified (ASR at or below the threshold below) by "
             "P-ASR (ASR after RA), lowest first, then those that did not purify, by P-ASR; none (the backdoored "
             "model) and clean (the clean reference) are references, not ranked.",
             VERDICT_TEXT.format(**{k: 100 * v for k, v in st.verdict.items()})]
    measured = _measured_by_ra(oc)
    if measured:
        intro.append(f"C-Acc and ASR of {', '.join(measured)}: measured by RA before its first step (the defense "
                     f"folder holds no <name>_df_summary.csv of its own), on the record's test sets.")
    n_failed = len(oc.failed)
    tail = [f"{n_failed} job(s) failed: see report.md and logs/." if n_failed else "Every job finished.",
            "Every table, figure and note: report.md / report.html; one row per model: results.csv."]
    md = ["# Audit: which defenses are only superficially safe?", ""] + [p + "\n" for p in intro]
    for title, t in ranked:
        md += [f"## {title}", "", _md_table(t), ""]
    if not ranked:
        md += ["No verdicts: no RA run finished.", ""]
    md += [p + "\n" for p in tail]
    md_path = atomic_write_text(st.report_dir / "audit.md", "\n".join(md))
    parts = (["<h1>Audit: which defenses are only superficially safe?</h1>"]
             + [f"<p>{html.escape(p)}</p>" for p in intro])
    parts.append(legend_html(st.verdict))
    for title, t in ranked:
        parts += [f"<h2>{html.escape(title)}</h2>", html_table(t, st.verdict, "verdicts")]
    parts += [f"<p>{html.escape(p)}</p>" for p in tail]
    doc = ("<!doctype html><html><head><meta charset='utf-8'><title>Audit " + html.escape(rec.name) + "</title><style>"
           + STYLE + "</style></head><body>" + "\n".join(parts) + "</body></html>\n")
    return md_path, atomic_write_text(st.report_dir / "audit.html", doc)


def run_audit(a: argparse.Namespace, out=None, command: str | None = None) -> tuple:
    """Plan and run the audit of ``a`` (main's arguments): (the study's Outcome, audit.md or None for a dry run).
    ``command``: the command line that started it (for the report's header)."""

    out = out or sys.stdout
    study, data = audit_study(a.result_file, a.record_root, a.defense, a.run, a.ra_draws, a.poison_nums,
                              a.clean_reference, a.yaml_path)
    if not a.dry_run:
        study.report_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(study.path, "# the study of this audit (python analysis/audit.py); rerun it with "
                                      "analysis/run_study.py --yaml_path <this file>\n"
                          + yaml.safe_dump({**data, "study_dir": str(study.study_dir)}, sort_keys=False))
    oc = run_study(None, a.executor, a.ray_address, a.ray_num_cpus, a.dry_run, a.fresh, not a.no_progress, out=out,
                   threads=a.threads, trust_record=a.trust_record, study=study, command=command)
    if a.dry_run:
        return oc, None
    ranked = ranking(oc)
    md, _ = write_audit_report(oc, ranked)
    for title, t in ranked:
        print(f"\nranking ({title}): most robust first", file=out)
        for _, r in t.iterrows():
            print(f"  {str(r['rank']):>2}  {r['defense']:24s} P-ASR {r['P-ASR']:22s} {r['verdict']}", file=out)
    print(f"audit: {md}", file=out, flush=True)
    return oc, md


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="analysis/audit.py", description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Defaults: config/study/audit.yaml. "
                                       "Output: <record>/audit/audit.md (and .html).")
    p.add_argument("--result_file", required=True, help="the record: a folder name under --record_root, or a path")
    p.add_argument("--record_root", default="./record", help="folder holding the record (default ./record)")
    p.add_argument("--defense", default="all", help="defense folders of the record to audit: 'all' (default: every "
                                                    "defense/<folder>/ with a defense_result.pt) or a comma list")
    p.add_argument("--run", default=None, help="registered defenses to run on the record first, then audit (comma "
                                               "list, e.g. fst,pam); needed for a record without defense folders")
    p.add_argument("--clean_reference", action="store_true",
                   help="train a clean reference through the study (the badnet attack at pratio 0 with the record's "
                        "dataset and model and config/attack/badnet/<dataset>.yaml): enables QRA and the paired "
                        "'returns under RA' test against the clean model")
    p.add_argument("--ra_draws", type=int, default=None, help="RA draws per model (default: the yaml's, 3)")
    p.add_argument("--poison_nums", default=None, help="RA budget sweep: comma list of poisoned-sample counts "
                                                       "(default: the yaml's, 1,10); '' for none")
    p.add_argument("--yaml_path", default=None, help="the audit's study defaults (default config/study/audit.yaml): "
                                                     "set:, configs:, resources:, verdict:")
    p.add_argument("--executor", default="local", choices=EXECUTORS, help="local (default) or ray")
    p.add_argument("--ray_address", default=None, help="join this Ray cluster (default: start a local Ray instance)")
    p.add_argument("--ray_num_cpus", type=int, default=None, help="CPUs of the local Ray instance (default: all)")
    p.add_argument("--threads", type=int, default=None, help="local executor: torch threads per job")
    p.add_argument("--dry_run", action="store_true", help="print the jobs (what would run and why) and their count")
    p.add_argument("--fresh", action="store_true", help="rerun every job of the audit")
    p.add_argument("--no_progress", action="store_true")
    p.add_argument("--trust_record", action="store_true", help="load the record's pickles without the safe-loading "
                                                               "allow-list (code in them may run)")
    return p


def main(argv=None) -> int:
    p = parser()
    a = p.parse_args(argv)
    if a.ray_address and a.executor != "ray":
        p.error("--ray_address needs --executor ray")
    oc, _ = run_audit(a, command=cli_command("analysis/audit.py", argv))
    return 1 if oc.failed else 0
