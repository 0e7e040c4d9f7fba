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


def test_seeds_run_the_chain_per_seed_with_that_seed(monkeypatch, tmp_path):
    calls = []
    monkeypatch.setattr(demo, "_run", lambda args, log: calls.append(args))
    monkeypatch.setattr(demo, "summarize_seeds", lambda roots, seeds, path: "")
    assert demo.main(["--record_root", str(tmp_path), "--fresh", "--seeds", "0,2"]) == 0
    roots = {a[a.index("--record_root") + 1] for a in calls}
    assert roots == {str(tmp_path / "seed0"), str(tmp_path / "seed2")}
    for args in calls:
        if args[0] == "analysis/report.py":
            continue
        seeded = "--random_seed" in args and args[args.index("--random_seed") + 1] == "2"
        assert seeded == args[args.index("--record_root") + 1].endswith("seed2"), args
        parse_config(_schema(args[0]), args[1:])


def test_summarize_seeds_gives_mean_and_range(tmp_path):
    import pandas as pd

    roots = []
    for s, asr in ((0, 0.1), (1, 0.3)):
        r = tmp_path / f"seed{s}" / "badnet_demo" / "report"
        r.mkdir(parents=True)
        pd.DataFrame({"model": ["fst"], "test_asr": [asr]}).set_index("model").to_csv(r / "report.csv")
        roots.append(tmp_path / f"seed{s}")
    md = demo.summarize_seeds(roots, [0, 1], tmp_path / "demo_seeds.md")
    assert "| fst | 20.0 [10.0, 30.0] |" in md and (tmp_path / "demo_seeds.csv").is_file()
