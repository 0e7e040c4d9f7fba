"""The registry is the one list of methods: every registered method has its entry script, a yaml per supported
dataset plus demo.yaml, and every shipped yaml parses against its method's schema (litgpt-style config tests)."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

from bdsafety import registry
from bdsafety.config import resolve
from bdsafety.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent
METHODS = registry.methods()
IDS = [f"{m.kind}:{m.name}" for m in METHODS]


def test_every_kind_has_methods():
    kinds = {m.kind for m in METHODS}
    assert kinds == set(registry.KIND_DIRS), f"registered kinds {kinds}"
    assert {"badnet", "blended"} <= set(registry.names("attack"))
    assert ({"ft", "fst", "pam", "exact_purification", "anp", "i_bau", "ft_sam", "bti_dbf"}
            <= set(registry.names("defense")))
    assert {"ra", "qra"} <= set(registry.names("retune"))


@pytest.mark.parametrize("method", METHODS, ids=IDS)
def test_entry_script_is_the_standard_shim(method):
    """defense/<name>.py exists and is the 3-line shim (it finds its method from its own file name)."""
    path = ROOT / method.entry
    assert path.is_file(), (f"{method.kind} {method.name} has no entry script {method.entry}: "
                            f"copy any other entry script")
    tree = ast.parse(path.read_text())
    calls = [n for n in ast.walk(tree) if isinstance(n, ast.Call) and getattr(n.func, "id", "") == "entry_point"]
    assert calls, f"{method.entry} must call bdsafety.cli.entry_point(__file__)"


@pytest.mark.parametrize("method", METHODS, ids=IDS)
def test_configs_exist_and_parse(method):
    """config/<kind>/<name>/<dataset>.yaml for every supported dataset and demo.yaml; each parses (no typo'd key)."""
    missing = [c for c in method.configs if not method.config_path(c).is_file()]
    assert not missing, (f"{method.kind} {method.name} lacks "
                         f"{[str(method.config_path(c).relative_to(ROOT)) for c in missing]}")
    for f in sorted(method.config_dir.glob("*.yaml")):
        resolve(method.schema(), str(f))


def test_every_entry_script_is_registered():
    """No orphan scripts: each entry script belongs to a registered method."""
    for kind, d in registry.KIND_DIRS.items():
        for path in sorted((ROOT / d).glob("*.py")):
            if kind == "analysis" and path.stem in ("report", "run_study", "ra_budget", "audit", "merge_studies"):
                continue  # reports read finished records; the study runner, the audit and ra_budget drive registered
                # methods; merge_studies merges study reports
            registry.get(kind, path.stem)


def test_every_config_folder_is_registered():
    for kind, d in registry.KIND_DIRS.items():
        base = ROOT / "config" / d
        for folder in sorted(p for p in base.glob("*") if p.is_dir()) if base.is_dir() else []:
            registry.get(kind, folder.name)


def test_folder_names_are_unique_per_kind():
    for kind in registry.KIND_DIRS:
        folders = [m.folder for m in registry.methods(kind)]
        assert len(folders) == len(set(folders)), f"two {kind}s write the same folder: {folders}"


def test_lookup_by_folder_and_typo_suggestion():
    assert registry.get("defense", "i-bau").name == "i_bau"  # BackdoorBench's folder name
    with pytest.raises(ConfigError, match="Did you mean 'fst'"):
        registry.get("defense", "fsst")


def test_select_all_and_lists():
    avail = ["fst", "pam", "i-bau"]
    assert registry.name_list("all", avail) == avail
    assert registry.name_list("pam,all", avail) == ["pam", "fst", "i-bau"]
    assert registry.name_list(["fst", "fst"], avail) == ["fst"]
    assert registry.name_list("none,fst", avail, allow_none=True) == ["none", "fst"]
    with pytest.raises(ConfigError, match="Did you mean 'pam'"):
        registry.name_list("pan", avail)
    with pytest.raises(ConfigError, match="none yet"):
        registry.name_list("all", [])


def test_registering_twice_from_another_module_fails():
    m = registry.get("defense", "fst")
    with pytest.raises(ValueError, match="registered twice"):
        def run(ctx):
            return None
        run.__module__ = "somewhere.else"
        registry.register("defense", "fst", schema=m.schema, description="dup")(run)


def test_numeric_options_declare_their_valid_values():
    """Every numeric option of every method says which values are valid (so 0, -1, nan, inf are checked)."""
    unchecked = []
    for m in METHODS:
        for k, opt in m.schema().items():
            if opt.is_numeric() and opt.check is None:
                unchecked.append(f"{m.kind}:{m.name}:{k}")
    assert not unchecked, f"numeric options without a check= : {unchecked}"
