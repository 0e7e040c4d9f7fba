import os
import sys
from pathlib import Path

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


# Fixtures that train (a demo record, a study, a model zoo): every test that uses one, directly or through another
# fixture, is an end-to-end test and runs in CI's slow stage (pytest -m slow -n auto --dist loadfile), after the fast
# stage.
HEAVY_FIXTURES = {"demo_record", "clean_record", "demo_work", "fst_after_ra", "zoo_records", "tiny_study", "audited",
                  "audited_bb"}


def pytest_collection_modifyitems(config, items):
    for item in items:
        if HEAVY_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(autouse=True, scope="session")
def _threads():
    import torch

    # CI runs the slow stage on 2 xdist workers (README): one thread each, so that the workers do not oversubscribe
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    torch.set_num_threads(max(1, min(2, (os.cpu_count() or 1) // workers)))
    yield


@pytest.fixture
def one_thread():
    """One intra-op thread for the test, restored after it (tiny batches: as fast, and immune to an oversubscribed
    machine). Modules opt in with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _build_record(root, name: str, extra: list[str]) -> str:
    """Run the demo BadNets attack (config/attack/badnet/demo.yaml) into ``root``; returns the record folder."""
    from bdsafety.registry import get

    cfg = os.path.join(ROOT, "config", "attack", "badnet", "demo.yaml")
    get("attack", "badnet").main(["--yaml_path", cfg, "--record_root", str(root), "--save_folder_name", name,
                                  "--no_progress", *extra])
    return os.path.join(str(root), name)


def _cached_or_build(tmp_path_factory, name: str, extra: list[str]) -> str:
    """Build a demo record once per test session, and once for all the workers of a ``pytest -n N`` run.

    Under pytest-xdist the record is built by whichever worker asks first, under a file lock, in a folder the workers of
    this run share (the parent of each worker's base temp folder); the others wait for it and read it. Tests copy
    the record before writing defense folders, so sharing it is safe.
    For development only: if BDSAFETY_TEST_RECORDS points at a folder, records are built there once and reused
    across sessions (delete the folder after changing the attack code or the demo config). CI never sets it.
    """
    from filelock import FileLock

    cache = os.environ.get("BDSAFETY_TEST_RECORDS")
    if cache:
        root = Path(cache)
    elif os.environ.get("PYTEST_XDIST_WORKER"):
        root = tmp_path_factory.getbasetemp().parent / "shared_records"
    else:
        return _build_record(tmp_path_factory.mktemp("records"), name, extra)
    root.mkdir(parents=True, exist_ok=True)
    with FileLock(str(root / f"{name}.lock")):
        if (root / name / "attack_result.pt").is_file():
            return str(root / name)
        return _build_record(root, name, extra + ["--overwrite"])


@pytest.fixture(scope="session")
def demo_record(tmp_path_factory) -> str:
    """The demo BadNets record (synthetic data, demo config): the backdoored model every defense test starts from."""
    return _cached_or_build(tmp_path_factory, "badnet_demo", [])


@pytest.fixture(scope="session")
def clean_record(tmp_path_factory) -> str:
    """The clean reference record: the demo pipeline with pratio 0 (10 epochs instead of 30 to keep CI short: the
    clean task is learned within 10; the README's demo trains it for the full 30)."""
    return _cached_or_build(tmp_path_factory, "clean_demo", ["--pratio", "0", "--epochs", "10"])


@pytest.fixture(scope="session")
def demo_work(tmp_path_factory, demo_record, clean_record):
    """Private copies of the demo and clean records (no defense folders), shared by the end-to-end tests of RA/QRA
    and PAM so that FST and its retuning attack run once per session (see ``fst_after_ra``)."""
    import shutil
    from types import SimpleNamespace

    root = tmp_path_factory.mktemp("work") / "record"
    root.mkdir()
    copies = {}
    for src in (demo_record, clean_record):
        copies[Path(src).name] = dst = root / Path(src).name
        shutil.copytree(src, dst, ignore=shutil.ignore_patterns("defense", "ra", "bti_inversion"))
    return SimpleNamespace(root=root, demo=copies["badnet_demo"], clean=copies["clean_demo"])


@pytest.fixture(scope="session")
def fst_after_ra(demo_work):
    """FST on the shared demo copy (its demo config), then the demo retuning attack on it: the RA output folder.

    python defense/fst.py --result_file R --yaml_path config/defense/fst/demo.yaml
    python retune_attack/ra.py --result_file R --defense fst --yaml_path config/retune_attack/ra/demo.yaml
    """
    from bdsafety.registry import get
    from bdsafety.retune.ra import main as ra_main

    cfg = os.path.join(ROOT, "config")
    get("defense", "fst").main(["--result_file", str(demo_work.demo), "--yaml_path",
                                os.path.join(cfg, "defense", "fst", "demo.yaml"), "--no_progress"])
    (out,) = ra_main(["--result_file", str(demo_work.demo), "--defense", "fst", "--no_progress",
                      "--yaml_path", os.path.join(cfg, "retune_attack", "ra", "demo.yaml")])
    return out
