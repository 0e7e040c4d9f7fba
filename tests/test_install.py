"""Installed use: the package built and installed into a fresh virtual environment outside the checkout (its
dependencies reached through a .pth to this environment's site-packages, so nothing is downloaded), then used from
a working folder with no checkout: the console script lists the methods, finds the configs installed with the
package from the docs' ``config/...`` paths, trains a tiny record and inspects it."""
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_installed_package_runs_outside_the_checkout(tmp_path):
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    py = venv / "bin" / "python"
    site = Path(subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               check=True, capture_output=True, text=True).stdout.strip())
    (site / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")  # torch & co. from this environment
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    build = tmp_path / "build"
    build.mkdir()
    subprocess.run([str(py), "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--ignore-installed",
                    str(ROOT)], check=True, env={**env, "TMPDIR": str(build)}, cwd=tmp_path)
    work = tmp_path / "work"  # a working folder with no checkout (no config/, no bdsafety/)
    work.mkdir()

    def run(*args):
        return subprocess.run([str(venv / "bin" / "bdsafety"), *args], capture_output=True, text=True,
                              env=env, cwd=work)

    where = subprocess.run([str(py), "-c", "import bdsafety; print(bdsafety.__file__)"], check=True,
                           capture_output=True, text=True, env=env, cwd=work).stdout.strip()
    assert where.startswith(str(venv)), where  # the installed copy, not this checkout
    out = run("--help")
    assert out.returncode == 0 and "pam" in out.stdout and "badnet" in out.stdout
    rec = run("attack", "badnet", "--yaml_path", "config/attack/badnet/demo.yaml", "--synthetic_n_train", "100",
              "--synthetic_n_test", "20", "--epochs", "1", "--record_root", "rec", "--save_folder_name", "t",
              "--no_progress")
    assert rec.returncode == 0, rec.stderr
    assert (work / "rec" / "t" / "attack_result.pt").is_file()
    assert run("inspect", "rec/t").returncode == 0
    bad = run("defense", "pma", "--result_file", "t")
    assert bad.returncode == 2 and "Did you mean 'pam'" in bad.stderr and "Traceback" not in bad.stderr
