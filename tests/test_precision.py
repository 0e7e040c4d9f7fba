"""The ``precision`` option: fp32 by default (the official code's numerics), bf16 autocast as the named speed option,
set once per run by the scaffold and never leaking into the next run of the same process."""
from pathlib import Path

import pytest
import torch
import yaml
from torch import nn

from bdsafety import engine
from bdsafety.data.device import DeviceDataset, Normalizer
from bdsafety.data.info import dataset_info
from bdsafety.errors import ConfigError
from bdsafety.registry import get, methods


class _Probe(nn.Module):
    """Flatten + Linear recording the dtype its matmul produced (bf16 under autocast, fp32 otherwise)."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3 * 8 * 8, 10)
        self.dtypes = []

    def forward(self, x):
        out = self.fc(x.flatten(1))
        self.dtypes.append(out.dtype)
        return out


def _data():
    torch.manual_seed(0)
    return DeviceDataset(torch.randint(0, 256, (32, 3, 8, 8), dtype=torch.uint8), torch.randint(0, 10, (32,)))


def _train_and_eval(model):
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    ds = _data()
    norm = Normalizer(dataset_info("synthetic"))
    engine.fit(model, ds, norm=norm, epochs=1, batch_size=16, step_fn=engine.sgd_step(opt), augment=False,
               evalsets=engine.EvalSets(clean=ds))


def test_default_is_fp32_and_bf16_autocasts_training_and_evaluation():
    assert engine.current_precision() == "fp32"
    model = _Probe()
    _train_and_eval(model)
    assert model.dtypes and set(model.dtypes) == {torch.float32}  # no bf16 region anywhere by default

    model = _Probe()
    with engine.precision("bf16"):
        assert engine.current_precision() == "bf16"
        _train_and_eval(model)
    assert model.dtypes and set(model.dtypes) == {torch.bfloat16}  # train steps and evaluation alike
    assert engine.current_precision() == "fp32"


def test_fp32_region_inside_bf16_and_no_leak_after_an_error():
    x = torch.randn(4, 8)
    w = torch.randn(8, 3)
    with engine.precision("bf16"), engine.autocast("cpu"):
        assert (x @ w).dtype == torch.bfloat16
        with engine.fp32("cpu"):
            assert (x @ w).dtype == torch.float32
    with pytest.raises(RuntimeError, match="boom"), engine.precision("bf16"):
        raise RuntimeError("boom")
    assert engine.current_precision() == "fp32"
    with engine.autocast("cpu"):
        assert (x @ w).dtype == torch.float32
    with pytest.raises(ConfigError, match="fp32, bf16"), engine.precision("fp16"):
        pass


def test_every_registered_method_has_the_precision_option():
    for m in methods():
        opt = m.schema().get("precision")
        assert opt is not None, f"{m.kind} {m.name} has no precision option"
        assert opt.default == "fp32" and tuple(opt.choices) == ("fp32", "bf16"), (m.kind, m.name)


def test_precision_is_validated_by_the_parser():
    with pytest.raises(ConfigError, match="'precision' must be one of"):
        get("defense", "ft").parse(["--result_file", "x", "--precision", "fp16"])
    assert get("retune", "ra").parse(["--result_file", "x", "--precision", "bf16"]).precision == "bf16"


def test_runs_set_their_precision_record_it_and_restore_it(tmp_path, monkeypatch):
    """An attack and a defense run through the scaffold under --precision bf16: their training runs inside bf16 (seen
    from inside engine.fit), config.yaml and the record's info say so, and the process is back at fp32 afterwards; a
    following run without the flag trains in fp32."""
    seen = []
    real_fit = engine.fit

    def spy_fit(*a, **k):
        seen.append(engine.current_precision())
        return real_fit(*a, **k)

    monkeypatch.setattr(engine, "fit", spy_fit)
    common = ["--record_root", str(tmp_path), "--no_progress", "--device", "cpu"]
    rec = get("attack", "badnet").main(["--dataset", "synthetic", "--model", "cnn_small", "--synthetic_n_train", "96",
                                         "--synthetic_n_test", "40", "--epochs", "1", "--batch_size", "32",
                                         "--save_folder_name", "rec", "--precision", "bf16", *common])
    assert seen == ["bf16"] and engine.current_precision() == "fp32"
    meta = yaml.safe_load((Path(rec) / "config.yaml").read_text())
    assert meta["config"]["precision"] == "bf16"
    from bdsafety.records import load_attack_record

    assert load_attack_record(rec).info["precision"] == "bf16"

    out = get("defense", "ft").main(["--result_file", "rec", "--epochs", "1", "--ratio", "0.5", *common])
    assert seen == ["bf16", "fp32"] and engine.current_precision() == "fp32"
    assert yaml.safe_load((Path(out) / "config.yaml").read_text())["config"]["precision"] == "fp32"


@pytest.mark.slow
def test_precision_benchmark_runs_on_cpu_at_tiny_size(tmp_path):
    """benchmarks/precision.py: defense + RA once per precision on one record; both RA curves and wall times."""
    import csv
    import importlib.util

    common = ["--record_root", str(tmp_path), "--no_progress", "--device", "cpu"]
    get("attack", "badnet").main(["--dataset", "synthetic", "--model", "cnn_small", "--synthetic_n_train", "96",
                                  "--synthetic_n_test", "40", "--epochs", "1", "--batch_size", "32",
                                  "--save_folder_name", "rec", *common])
    root = Path(__file__).resolve().parent.parent
    spec = importlib.util.spec_from_file_location("precision_benchmark", root / "benchmarks" / "precision.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    rows = bench.main(["--result_file", "rec", "--record_root", str(tmp_path), "--defense", "ft",
                       "--defense_args", "--epochs 1 --ratio 0.5", "--ra_args", "--epochs 2 --ratio 0.5 --poison_num 2",
                       "--out", str(tmp_path / "bench.csv")])
    assert [r["precision"] for r in rows].count("fp32") == [r["precision"] for r in rows].count("bf16") >= 2
    assert all(0 <= r["test_ra"] <= 1 and r["defense_s"] > 0 and r["ra_s"] > 0 for r in rows)
    assert (tmp_path / "rec" / "defense" / "ft_bf16" / "ra_bf16" / "ra_df.csv").is_file()
    meta = yaml.safe_load((tmp_path / "rec" / "defense" / "ft_bf16" / "config.yaml").read_text())
    assert meta["config"]["precision"] == "bf16"
    with open(tmp_path / "bench.csv") as f:
        assert len(list(csv.DictReader(f))) == len(rows)
    assert engine.current_precision() == "fp32"
