"""The README's main command chains entry points: every command it runs must parse against its entry point."""
import pytest

import bdsafety.demo as demo
from bdsafety.config import parse_config


def _schema(script: str):
    from bdsafety.cli import method_for_script

    if script == "analysis/report.py":  # a plain script, not a registered method
        return None
    return method_for_script(script).schema()


@pytest.mark.parametrize("defenses", [None, "all"])
def test_every_demo_command_parses(monkeypatch, tmp_path, defenses):
    calls = []
    monkeypatch.setattr(demo, "_run", lambda args, log: calls.append(args))
    assert demo.main(["--record_root", str(tmp_path), "--fresh", *(["--defenses", defenses] if defenses else [])]) == 0
    scripts = [c[0] for c in calls]
    assert scripts[0] == "attack/badnet.py" and "analysis/report.py" in scripts and "analysis/lmc.py" in scripts
    run_defenses = [s.split("/")[1][:-3] for s in scripts if s.startswith("defense/")]
    assert run_defenses == list(demo.ALL_DEFENSES if defenses == "all" else demo.DEFAULT_DEFENSES)
    for args in calls:
        if args[0] == "retune_attack/ra.py" or args[0] == "analysis/lmc.py":  # folder names, e.g. i_bau -> i-bau
            names = args[args.index("--defense") + 1].split(",")
            assert "i_bau" not in names
    checked = 0
    for args in calls:
        schema = _schema(args[0])
        if schema is not None:
            parse_config(schema, args[1:])  # raises on any unknown flag, bad value or broken yaml
            checked += 1
    assert checked == len(calls) - 1  # everything but report.py


def test_dry_run_prints_and_runs_nothing(capsys, tmp_path):
    assert demo.main(["--record_root", str(tmp_path), "--dry_run"]) == 0
    out = capsys.readouterr().out
    assert "$ python attack/badnet.py" in out and "retune_attack/ra.py" in out
    assert not any(tmp_path.iterdir())
