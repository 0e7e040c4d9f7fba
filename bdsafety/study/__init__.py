"""The study runner: a grid of attacks x defenses x retuning attacks x analyses x seeds as a DAG of resumable jobs.

    python analysis/run_study.py --yaml_path config/study/demo.yaml [--executor ray] [--dry_run]

spec (the study yaml) -> plan (jobs, ids, dependencies) -> execute (one job, done markers) -> executors (local, ray)
-> results (results.csv) -> report (report.md, report.html). See docs/studies.md.
"""
