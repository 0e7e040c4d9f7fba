from pathlib import Path

import pytest

from bdsafety.config import Option, parse_config, resolve
from bdsafety.errors import ConfigError

SCHEMA = {
    "lr": Option(0.01, "learning rate"),
    "epochs": Option(10),
    "overwrite": Option(False),
    "model": Option("preactresnet18", choices=("preactresnet18", "cnn_small")),
    "rhos": Option([0.5], type=None),
    "name": Option(None),
}


def test_precedence_cli_over_yaml_over_default(tmp_path):
    y = tmp_path / "c.yaml"
    y.write_text("lr: 0.1\nepochs: 3\n")
    cfg = parse_config(SCHEMA, ["--yaml_path", str(y), "--epochs", "7"])
    assert cfg.lr == 0.1 and cfg.epochs == 7 and cfg.overwrite is False
    assert cfg._sources["lr"] == str(y) and cfg._sources["epochs"] == "cli" and cfg._sources["model"] == "default"


def test_types_are_cast_from_yaml_strings(tmp_path):
    y = tmp_path / "c.yaml"
    y.write_text("lr: '1e-3'\noverwrite: 'true'\nrhos: [0.3, 0.9]\n")
    cfg = parse_config(SCHEMA, ["--yaml_path", str(y)])
    assert cfg.lr == pytest.approx(1e-3) and cfg.overwrite is True and cfg.rhos == [0.3, 0.9]
    assert parse_config(SCHEMA, ["--rhos", "0.3,0.5"]).rhos == [0.3, 0.5]


def test_bool_flag_without_value():
    assert parse_config(SCHEMA, ["--overwrite"]).overwrite is True
    assert parse_config(SCHEMA, ["--overwrite", "false"]).overwrite is False


def test_unknown_yaml_key_lists_valid_keys_and_suggests(tmp_path):
    y = tmp_path / "c.yaml"
    y.write_text("epoch: 3\n")
    with pytest.raises(ConfigError) as e:
        parse_config(SCHEMA, ["--yaml_path", str(y)])
    msg = str(e.value)
    assert "unknown key 'epoch'" in msg and "Did you mean 'epochs'" in msg and "lr" in msg


def test_unknown_cli_flag_exits_with_hint(capsys):
    with pytest.raises(SystemExit) as e:
        parse_config(SCHEMA, ["--epoch", "3"])
    assert e.value.code == 2
    assert "--epochs" in capsys.readouterr().err


def test_bad_value_and_choice_errors(tmp_path):
    with pytest.raises(ConfigError, match="bad value 'abc' for 'lr'"):
        parse_config(SCHEMA, ["--lr", "abc"])
    with pytest.raises(ConfigError, match="must be one of"):
        parse_config(SCHEMA, ["--model", "resnet"])
    with pytest.raises(ConfigError, match="not found"):
        parse_config(SCHEMA, ["--yaml_path", str(tmp_path / "missing.yaml")])


def test_resolve_from_python_dict():
    cfg = resolve(SCHEMA, None, {"epochs": 2})
    assert cfg.epochs == 2
    with pytest.raises(ConfigError):
        resolve(SCHEMA, None, {"nope": 1})


def test_help_lists_flags_even_with_percent_in_help(capsys):
    schema = {"ratio": Option(0.05, "5% of the data")}
    with pytest.raises(SystemExit) as e:
        parse_config(schema, ["--help"])
    assert e.value.code == 0 and "5% of the data" in capsys.readouterr().out


def test_numbers_beyond_float32_are_refused_before_any_work():
    from bdsafety.registry import get

    with pytest.raises(ConfigError, match="float32: at most 3.4e38"):
        get("defense", "ft").parse(["--result_file", "x", "--lr", "1e308"])


ROOT = Path(__file__).resolve().parent.parent


def test_run_config_is_frozen_for_the_run_and_copies_with_replace(monkeypatch, tmp_path):
    """The config a run receives cannot change (an AttributeError names the key and the way out); replace() makes
    a copy with other values, frozen like the original; the caller's own config object stays unfrozen; the method's
    resolve hook (I-BAU's space-dependent lr) runs before the freeze."""
    from bdsafety import registry
    from bdsafety.config import RunConfig

    seen = {}

    def capture(method, cfg):
        seen["cfg"] = cfg
        with pytest.raises(AttributeError, match="frozen: 'lr' cannot change.*cfg.replace"):
            cfg.lr = 1.0
        other = cfg.replace(lr=0.5)
        assert other.lr == 0.5 and cfg.lr != 0.5
        with pytest.raises(AttributeError, match="frozen"):
            other.lr = 2.0
        with pytest.raises(AttributeError, match=r"no key\(s\) \['lrr'\]"):
            cfg.replace(lrr=1)
        return "ran"

    monkeypatch.setitem(registry._RUNNERS, "defense", capture)
    m = registry.get("defense", "i_bau")
    cfg = m.parse(["--result_file", str(tmp_path / "r"), "--yaml_path", str(ROOT / "config/defense/i_bau/demo.yaml")])
    assert isinstance(cfg, RunConfig) and cfg.lr is None
    assert m.run_config(cfg) == "ran"
    assert seen["cfg"].lr == 1e-4 and cfg.lr is None  # filled by the resolve hook, on the run's own copy
    cfg.lr = 3.0  # the caller's config is not frozen
