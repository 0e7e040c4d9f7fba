"""The one output path (bdsafety.outputs): runs killed at every point of writing leave the old complete output or
the new one (never a partial one, never nothing), leftovers are cleaned up and never listed, --overwrite never
deletes results computed from the output silently, and user-given names are plain folder names.

Kills are real (``os._exit`` at a named point, BDSAFETY_FAULT=<point>, no cleanup runs: like ``kill -9``) and runs
are tiny (synthetic data, 200 images, cnn_small, 1 epoch), so the whole file takes seconds, not minutes.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from bdsafety.errors import ConfigError, OutputError
from bdsafety.records import list_defenses, load_attack_record, resolve_record_dir
from bdsafety.registry import get

ROOT = Path(__file__).resolve().parent.parent
COMMON = ["--device", "cpu", "--no_progress"]
ATTACK = ["--dataset", "synthetic", "--model", "cnn_small", "--synthetic_n_train", "200", "--synthetic_n_test", "50",
          "--epochs", "1", "--batch_size", "64", "--lr", "0.05", "--eval_batch_size", "256",
          "--save_folder_name", "tiny", *COMMON]
DEFENSE = ["--result_file", "tiny", "--epochs", "1", "--ratio", "0.2", "--batch_size", "32", *COMMON]
RA = ["--result_file", "tiny", "--defense", "ft", "--epochs", "1", "--ratio", "0.2", "--poison_num", "2", *COMMON]
ARGS = {("attack", "badnet"): ATTACK, ("defense", "ft"): DEFENSE, ("retune", "ra"): RA}


def run(kind: str, name: str, root: Path, *extra: str):
    """The entry point, in this process."""
    return get(kind, name).main([*ARGS[(kind, name)], "--record_root", str(root), *extra])


def killed(kind: str, name: str, root: Path, point: str, *extra: str, no_exchange: bool = False) -> None:
    """The entry point in a subprocess that dies at ``point`` (os._exit(99): no cleanup, like kill -9)."""
    argv = [*ARGS[(kind, name)], "--record_root", str(root), *extra]
    code = f"from bdsafety.registry import get; get({kind!r}, {name!r}).main({argv!r})"
    env = dict(os.environ, BDSAFETY_FAULT=point, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    if no_exchange:
        env["BDSAFETY_NO_EXCHANGE"] = "1"
    p = subprocess.run([sys.executable, "-c", code], env=env, cwd=root, capture_output=True, text=True, timeout=300)
    assert p.returncode == 99, f"not killed at {point!r} (rc {p.returncode}):\n{p.stdout[-2000:]}\n{p.stderr[-3000:]}"


def digest(folder: Path) -> str:
    """Content hash of an output folder (every file but the logs, whose names hold the time)."""
    h = hashlib.sha256()
    for f in sorted(p for p in folder.rglob("*") if p.is_file() and "log" not in p.relative_to(folder).parts):
        h.update(str(f.relative_to(folder)).encode() + b"\0" + f.read_bytes())
    return h.hexdigest()


def hidden(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(".") and p.name != ".cache")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    """record/tiny with defense/ft/ and defense/ft/ra/ (the tree every test copies)."""
    root = tmp_path_factory.mktemp("tiny") / "record"
    run("attack", "badnet", root)
    run("defense", "ft", root)
    run("retune", "ra", root)
    return root


@pytest.fixture
def root(tiny, tmp_path) -> Path:
    dst = tmp_path / "record"
    shutil.copytree(tiny, dst)
    return dst


# ------------------------------------------------------------------------------- the folder swap, point by point
SWAP = textwrap.dedent("""
    import sys
    from pathlib import Path
    from bdsafety.outputs import OutputFolder
    dest = Path(sys.argv[1])
    with OutputFolder(dest, overwrite=True, dependents="delete") as out:
        for i in range(20):
            (out.path / f"part{i}.txt").write_text("new")
        (out.path / "done").write_text("new")
""")


@pytest.mark.parametrize("point, had_old, expect", [
    ("write", True, "old"), ("write", False, None),
    ("renamed", True, "old"), ("renamed", False, None),
    ("exchanged", True, "new"),
    ("moved_old", True, "new"),  # the two-rename path (no atomic exchange): put back by recover
])
def test_output_folder_killed_at_each_point(tmp_path, point, had_old, expect):
    dest = tmp_path / "out"
    if had_old:
        dest.mkdir()
        (dest / "done").write_text("old")
        (dest / "part0.txt").write_text("old")
    env = dict(os.environ, BDSAFETY_FAULT=point, PYTHONPATH=str(ROOT))
    if point == "moved_old":
        env["BDSAFETY_NO_EXCHANGE"] = "1"
    p = subprocess.run([sys.executable, "-c", SWAP, str(dest)], env=env, capture_output=True, text=True, timeout=60)
    assert p.returncode == 99, p.stderr
    assert hidden(tmp_path), "a killed run leaves its work folder behind (cleaned by the next run)"
    # readers see the old or the new complete folder (resolve_record_dir repairs a swap cut in half)
    if expect is None:
        assert not dest.exists() or (dest / "done").read_text() == "new"
    else:
        resolve_record_dir(dest)
        assert (dest / "done").read_text() == expect
        assert len(list(dest.glob("part*.txt"))) == (1 if expect == "old" else 20)
    # the next run on the same destination cleans the leftovers and completes
    p = subprocess.run([sys.executable, "-c", SWAP, str(dest)], env=dict(env, BDSAFETY_FAULT=""), capture_output=True,
                       text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    assert (dest / "done").read_text() == "new" and len(list(dest.glob("part*.txt"))) == 20
    assert hidden(tmp_path) == []


# ------------------------------------------------------------------------------- real runs killed, then rerun
@pytest.mark.parametrize("kind, name, point, survivor", [
    # every point on the unit level above; here each entry point once during training or writing, once mid-swap
    ("attack", "badnet", "write", "old"),
    ("attack", "badnet", "exchanged", "new"),
    ("defense", "ft", "train", "old"),
    ("retune", "ra", "write", "old"),
])
@pytest.mark.slow
def test_killed_run_keeps_old_or_new_output_and_rerun_works(root, kind, name, point, survivor):
    dest = {"attack": root / "tiny", "defense": root / "tiny" / "defense" / "ft",
            "retune": root / "tiny" / "defense" / "ft" / "ra"}[kind]
    before = digest(dest)
    extra = ["--overwrite", "--dependents", "delete", "--random_seed", "1"]  # seed 1: the new output differs
    killed(kind, name, root, point, *extra)
    assert dest.is_dir(), "a killed run must never leave nothing"
    if survivor == "old":
        assert digest(dest) == before
    else:
        assert digest(dest) != before
    # the survivor is complete and usable
    if kind == "attack":
        load_attack_record(dest)
    else:
        assert (dest / f"{'ra' if kind == 'retune' else 'defense'}_result.pt").is_file()
        assert list(dest.glob("*_df_summary.csv"))
    # leftovers are hidden, never listed as results
    assert hidden(dest.parent) or point == "train"
    assert all(not n.startswith(".") for n in list_defenses(root / "tiny"))
    if kind == "defense":
        assert list_defenses(root / "tiny") == ["ft"]
    # a rerun works and removes the dead run's leftovers
    run(kind, name, root, *extra)
    assert hidden(dest.parent) == []
    assert (dest / "config.yaml").is_file()


# ------------------------------------------------------------------------------- --overwrite and dependents
def test_overwrite_attack_record_with_defense_folder(root):
    rec = root / "tiny"
    ft = digest(rec / "defense" / "ft")
    with pytest.raises(OutputError, match=r"defense/.*--dependents delete.*--dependents archive"):
        run("attack", "badnet", root, "--overwrite")
    assert digest(rec / "defense" / "ft") == ft  # nothing touched
    run("attack", "badnet", root, "--overwrite", "--dependents", "archive", "--random_seed", "1")
    (old,) = (root / ".archive").iterdir()
    assert old.name.startswith("tiny-") and digest(old / "defense" / "ft") == ft
    assert not (rec / "defense").exists()
    from bdsafety.safeio import RecordError

    with pytest.raises(RecordError, match="records under") as e:  # the archive is not listed as a record
        resolve_record_dir("ghost", root)
    assert "tiny" in str(e.value) and ".archive" not in str(e.value)
    (rec / "ra").mkdir()  # a dependent of the new record (RA of its own model, --defense none)
    (rec / "ra" / "ra_df.csv").write_text("epoch\n0\n")
    with pytest.raises(OutputError, match=r"\(ra/\)"):
        run("attack", "badnet", root, "--overwrite")
    run("attack", "badnet", root, "--overwrite", "--dependents", "delete")
    assert not (rec / "ra").exists() and len(list((root / ".archive").iterdir())) == 1


def test_overwrite_defense_with_ra_and_qra(root):
    ft = root / "tiny" / "defense" / "ft"
    (ft / "qra").mkdir()
    (ft / "qra" / "qra_df.csv").write_text("epoch\n0\n")
    ra = digest(ft / "ra")
    with pytest.raises(OutputError, match=r"qra/, ra/.*--dependents"):
        run("defense", "ft", root, "--overwrite")
    assert digest(ft / "ra") == ra
    run("defense", "ft", root, "--overwrite", "--dependents", "archive")
    (old,) = (ft.parent / ".archive").iterdir()
    assert digest(old / "ra") == ra and (old / "qra" / "qra_df.csv").is_file()
    assert not (ft / "ra").exists() and list_defenses(root / "tiny") == ["ft"]
    (ft / "ra").mkdir()
    (ft / "ra" / "ra_df.csv").write_text("epoch\n0\n")
    run("defense", "ft", root, "--overwrite", "--dependents", "delete")
    assert not (ft / "ra").exists() and len(list((ft.parent / ".archive").iterdir())) == 1


def test_existing_output_without_overwrite_is_refused_before_training(root):
    rec = digest(root / "tiny")
    for kind, name in ARGS:
        with pytest.raises(OutputError, match="already exists.*--overwrite"):
            run(kind, name, root)
    assert digest(root / "tiny") == rec


# ------------------------------------------------------------------------------- user-given names
@pytest.mark.parametrize("bad", ["..", ".", "a/b", ".hidden", "../x", "/tmp/x", ""])
@pytest.mark.parametrize("kind, name, flag",
                         [("attack", "badnet", "--save_folder_name"), ("defense", "ft", "--save_name"),
                          ("retune", "ra", "--save_name")])
def test_unsafe_names_are_refused_before_anything_is_written(tmp_path, bad, kind, name, flag):
    root = tmp_path / "record"
    argv = ([a for a in ARGS[(kind, name)] if a not in ("--save_folder_name", "tiny")] if kind == "attack"
            else ARGS[(kind, name)])
    with pytest.raises(ConfigError, match=rf"--{flag[2:]} .*not a plain folder name"):
        get(kind, name).main([*argv, "--record_root", str(root), "--overwrite", flag, bad])
    assert list(tmp_path.iterdir()) == []


def test_output_folder_refuses_unsafe_names_itself(tmp_path):
    from bdsafety.outputs import OutputFolder

    for bad in ("..", ".x", ".x.tmp-1-2"):  # ('.' never reaches a name: pathlib drops it)
        with pytest.raises(ConfigError, match="not a plain folder name"):
            OutputFolder(tmp_path / "a" / bad, overwrite=True)
    assert (tmp_path).is_dir() and list(tmp_path.iterdir()) == []


def test_output_names_that_would_replace_what_their_parent_holds_are_refused(tmp_path):
    from bdsafety.errors import OutputError
    from bdsafety.outputs import OutputFolder

    rec = tmp_path / "rec"
    rec.mkdir()
    (rec / "attack_result.pt").write_bytes(b"model")
    for name in ("attack_result.pt", "defense", "log", "bd_train_dataset", "info.pickle", "notes.csv"):
        with pytest.raises(OutputError, match="reserved"):
            OutputFolder(rec / name, overwrite=True, dependents="delete")
    (rec / "afile").write_text("x")
    with pytest.raises(OutputError, match="is a file"):
        OutputFolder(rec / "afile", overwrite=True)
    with pytest.raises(OutputError, match="file system's limit"):
        OutputFolder(rec / ("r" * 230), overwrite=True)
    assert ((rec / "attack_result.pt").read_bytes() == b"model"
            and sorted(p.name for p in rec.iterdir()) == ["afile", "attack_result.pt"])


def test_two_runs_on_one_output_the_second_fails_at_once(tmp_path):
    from bdsafety.errors import OutputError
    from bdsafety.outputs import OutputFolder

    first = OutputFolder(tmp_path / "run")
    with pytest.raises(OutputError, match=f"another run \\(pid {os.getpid()}\\) is writing"):
        OutputFolder(tmp_path / "run")
    with first as out:
        (out.path / "x").write_text("first")
    second = OutputFolder(tmp_path / "run", overwrite=True)  # the lock is free again once the first committed
    with second as out:
        (out.path / "x").write_text("second")
    assert (tmp_path / "run" / "x").read_text() == "second" and not list(tmp_path.glob(".*"))


def test_a_dependent_written_while_the_output_is_replaced_is_never_deleted(tmp_path):
    from bdsafety.errors import OutputError
    from bdsafety.outputs import OutputFolder

    dest = tmp_path / "defense_x"
    dest.mkdir()
    (dest / "defense_result.pt").write_text("old")
    folder = OutputFolder(dest, overwrite=True, dependents="delete")  # nothing inside yet: nothing to delete
    (dest / "ra").mkdir()  # another run writes an RA into the old output meanwhile
    (dest / "ra" / "ra_result.pt").write_text("ra")
    with pytest.raises(OutputError, match="ra/ appeared inside .* kept at .*unsaved"):
        with folder as out:
            (out.path / "defense_result.pt").write_text("new")
    assert (dest / "defense_result.pt").read_text() == "old" and (dest / "ra" / "ra_result.pt").read_text() == "ra"
    kept = list(tmp_path.glob("defense_x.unsaved-*"))
    assert len(kept) == 1 and (kept[0] / "defense_result.pt").read_text() == "new"


# ------------------------------------------------------------------------------- the runner of retune / analysis
def test_a_new_analysis_is_one_function_the_kind_runner_writes(root):
    """The one contract of retuning attacks and analyses: a method names its output folders (``outputs``) and yields
    Outputs; the kind's runner (bdsafety.experiment.run_on_record) opens the record, refuses an existing output
    before any work, and writes every Output through the one output path (OutputFolder + write_output)."""
    import numpy as np
    import pandas as pd

    from bdsafety.config import Option, resolve
    from bdsafety.experiment import RECORD_SCHEMA, Output
    from bdsafety.registry import Method

    calls = []

    def outputs(exp, cfg):
        return {"m": exp.record_dir / cfg.save_name}

    def run(ctx):
        calls.append(ctx.dests)
        yield "m", Output("probe", rows=[{"epoch": 0, "test_acc": 0.5}],
                          artifacts={"probe.csv": pd.DataFrame({"a": [1, 2]})},
                          indices={"index": np.arange(3), "extra": np.array([7])},
                          info={"n_train": len(ctx.exp.data.train_y)})

    schema = {**RECORD_SCHEMA, "save_name": Option("probe_out", "output folder")}
    m = Method(kind="analysis", name="probe", run=run, schema=lambda: dict(schema), description="probe", folder="probe",
               on=("defense",), outputs=outputs)
    cfg = resolve(schema, None, {"result_file": "tiny", "record_root": str(root), "device": "cpu", "no_progress": True})
    (out,) = m.run_config(cfg)
    assert out == root / "tiny" / "probe_out" and calls == [{"m": out}]
    assert (out / "probe.csv").read_text() == "a\n1\n2\n" and (out / "log" / "index.txt").read_text() == "0\n1\n2\n"
    assert (out / "log" / "extra.txt").read_text() == "7\n" and (out / "probe_df_summary.csv").is_file()
    import yaml

    meta = yaml.safe_load((out / "config.yaml").read_text())
    assert meta["n_train"] == 200 and meta["config"]["save_name"] == "probe_out"
    with pytest.raises(OutputError, match="exists"):
        m.run_config(cfg)
    assert len(calls) == 1  # refused before the method ran
    (again,) = m.run_config(cfg.replace(overwrite=True))
    assert again == out and len(calls) == 2


# ------------------------------------------------------------------------------- a shared inversion, prepared once
def _defense_job(root: Path, method: str, **over):
    from bdsafety.config import resolve
    from bdsafety.study.plan import Job, id_config

    m = get("defense", method)
    yaml_path = str(m.config_path("demo"))
    over = {"result_file": "tiny", "record_root": str(root), "device": "cpu", "no_progress": True, "overwrite": True,
            "dependents": "delete", "ratio": 0.2, "n_rounds": 1, "epochs": 1, "bti_pretrain_epochs": 1,
            "bti_mask_epochs": 1, "bti_gen_epochs": 1, **over}
    over = {k: v for k, v in over.items() if k in m.schema()}
    cfg = resolve(m.schema(), yaml_path, over)
    return Job(key=f"tiny/defense/{method}", kind="defense", method=method, yaml_path=yaml_path, overrides=over,
               deps=[], resources={"num_cpus": 1}, point={"record": "tiny"}, config=id_config(cfg, m.schema()))


def test_a_shared_inversion_is_prepared_once_without_writing_the_defense(root):
    """The Ray executor's prepare task (bdsafety.study.execute.prepare_job) runs a job's own code path up to its shared
    trigger inversion and stops there: the inversion is cached in the record, no defense folder is written; the job
    then reads it from the cache. Only the jobs that read an inversion (not PAM's real-sample oracle, not a
    bti_refresh) share one, and the executor groups them by record."""
    from bdsafety.study.execute import prepare_job, run_job, shares_inversion
    from bdsafety.study.executors import inversion_groups

    job = _defense_job(root, "pam")
    r = prepare_job(job.to_dict(), str(root), {})
    assert r["status"] == "prepared", r
    cached = list((root / "tiny" / "bti_inversion").glob("*.pt"))
    assert len(cached) == 1 and not (root / "tiny" / "defense" / "pam").exists()
    stamp = cached[0].stat().st_mtime_ns
    r = run_job(job.to_dict(), str(root), {})
    assert r["status"] == "ran", r
    assert (root / "tiny" / "defense" / "pam" / "defense_result.pt").is_file()
    assert cached[0].stat().st_mtime_ns == stamp  # read from the cache, not computed again
    bti_dbf, real = _defense_job(root, "bti_dbf"), _defense_job(root, "pam_reinvert", pam_source="real")
    assert shares_inversion(job) and shares_inversion(bti_dbf) and not shares_inversion(real)
    assert not shares_inversion(_defense_job(root, "pam", bti_refresh=True))
    ft = _defense_job(root, "ft")
    assert inversion_groups([job, ft, bti_dbf, real]) == {"tiny": [job, bti_dbf]}
    assert inversion_groups([job, ft]) == {}
    before = digest(root / "tiny" / "defense" / "ft")
    r = prepare_job(ft.to_dict(), str(root), {})  # a method that shares no cache: nothing prepared, nothing written
    assert r["status"] == "nothing to prepare" and digest(root / "tiny" / "defense" / "ft") == before
