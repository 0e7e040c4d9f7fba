"""D3 and TSC as native defenses (issue 24, items 6 and 7).

Unit tests pin each core step against a hand-computed case (D3's objective, distance, projection and warm-up on a tiny
linear model; TSC's assignment against brute force, its permutation specs recovering a known permutation exactly with
the function unchanged, the Bezier curve's endpoints); one end-to-end run per defense on the demo record checks the
written folder (strict load, the method's own fields) and what can be asserted of its behaviour.
"""
import itertools
import math
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn as nn
import yaml

from bdsafety.data.device import DeviceDataset
from bdsafety.defenses import d3 as d3_mod
from bdsafety.defenses import tsc as tsc_mod
from bdsafety.errors import ConfigError
from bdsafety.models import build_model
from bdsafety.registry import get

ROOT = Path(__file__).resolve().parent.parent


# ------------------------------------------------------------------------------------------- D3
def test_d3_objective_by_hand():
    w = torch.tensor([[3.0, 4.0]], requires_grad=True)  # ||W - W0||_2 with W0 = 0: 5
    w0 = torch.zeros(1, 2)
    dist = d3_mod.weight_distance([w], [w0], 2.0)
    assert float(dist.detach()) == pytest.approx(5.0)
    assert float(d3_mod.weight_distance([w], [w0], 1.0)) == pytest.approx(7.0)
    # logits giving per-sample CE log(2) (two equal logits) and ~0 (a confident correct one)
    logits = torch.tensor([[0.0, 0.0], [20.0, 0.0]])
    y = torch.tensor([0, 0])
    ce = torch.tensor([math.log(2), math.log1p(math.exp(-20))])
    clean = torch.relu(ce - 0.1).mean()  # the second sample is below the hinge and contributes 0
    assert float(clean) == pytest.approx((math.log(2) - 0.1) / 2)
    dist = dist.detach()
    assert float(d3_mod.d3_loss(logits, y, dist, lmd=0.5, eps=0.1)) == pytest.approx(0.5 * float(clean) - 5.0, rel=1e-6)
    assert (float(d3_mod.d3_loss(logits, y, dist, lmd=3.0, eps=0.1))
            == pytest.approx((3 * float(clean) - 5.0) / 4, rel=1e-6))
    # the gradient of -distance w.r.t. W points away from W0: -(W - W0)/||W - W0||
    d3_mod.d3_loss(logits, y, d3_mod.weight_distance([w], [w0], 2.0), 0.5, 0.1).backward()
    assert torch.allclose(w.grad, -torch.tensor([[0.6, 0.8]]))


def test_d3_projection_and_warm_up_keep_the_initial_norm():
    w = torch.tensor([[6.0, 8.0]])
    d3_mod.project_norms_([w], [torch.tensor(5.0)], 2.0)
    assert torch.allclose(w, torch.tensor([[3.0, 4.0]]))
    w0 = torch.tensor([[1.0, -2.0], [2.0, 4.0]])
    n0 = torch.linalg.vector_norm(w0.flatten())
    for method, want in (("far", -w0), ("middle", torch.zeros(2, 2)), ("near", w0)):
        w = w0.clone()
        d3_mod.warm_up_([w], [n0], method, 2.0)
        assert torch.allclose(w, want), method
    w = w0.clone()
    d3_mod.warm_up_([w], [n0], "random", 2.0, generator=torch.Generator().manual_seed(0))
    assert float(torch.linalg.vector_norm(w.flatten())) == pytest.approx(float(n0)) and not torch.allclose(w, w0)


def test_d3_selects_the_head_and_refuses_unknown_layers():
    m = build_model("cnn_small", 10, (32, 32, 3))
    assert [n for n, _ in d3_mod.selected_layers(m, "auto")] == ["linear"]
    assert [n for n, _ in d3_mod.selected_layers(m, "features")] == ["features.0", "features.3", "features.7",
                                                                      "features.11"]
    with pytest.raises(ConfigError, match="no module"):
        d3_mod.selected_layers(m, "head")


# ------------------------------------------------------------------------------------------- TSC
def test_linear_assignment_matches_brute_force():
    rng = np.random.default_rng(0)
    for n in range(1, 7):
        for _ in range(10):
            a = rng.normal(size=(n, n)).round(1)
            for maximize in (False, True):
                col = tsc_mod.linear_assignment(a, maximize)
                sums = [sum(a[i, p[i]] for i in range(n)) for p in itertools.permutations(range(n))]
                assert sorted(col) == list(range(n))
                assert a[np.arange(n), col].sum() == pytest.approx(max(sums) if maximize else min(sums))
    assert list(tsc_mod.linear_assignment(np.array([[1.0, 0.0], [0.0, 1.0]]), maximize=True)) == [0, 1]
    assert list(tsc_mod.linear_assignment(np.array([[1.0, 0.0], [0.0, 1.0]]), maximize=False)) == [1, 0]


def _randomise_bn(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g))
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.randn(m.num_features, generator=g))
            m.bias.data.copy_(torch.randn(m.num_features, generator=g))


@pytest.mark.parametrize("name", tsc_mod.SUPPORTED)
def test_permutation_specs_leave_the_function_unchanged(name):
    torch.manual_seed(0)
    m = build_model(name, 10, (32, 32, 3))
    with torch.no_grad():
        _randomise_bn(m)
        m.eval()
        x = torch.randn(3, 3, 32, 32)
        before = m(x)
        g = torch.Generator().manual_seed(1)
        spec = tsc_mod.permutation_spec(name, m)
        for grp in spec:
            tsc_mod.permute_(m, grp, torch.randperm(m.get_submodule(grp.out[0]).weight.shape[0], generator=g))
        assert torch.allclose(m(x), before, atol=1e-4)
    covered = {n for grp in spec for n in grp.out}  # every conv's outputs belong to exactly one group
    convs = [n for n, mod in m.named_modules() if isinstance(mod, nn.Conv2d)]
    assert sorted(covered) == sorted(convs) and sum(len(grp.out) for grp in spec) == len(convs)


def test_permutation_spec_refuses_other_models():
    with pytest.raises(ConfigError, match="supported models: cnn_small, preactresnet18"):
        tsc_mod.permutation_spec("vgg19_bn", nn.Linear(2, 2))


def _tiny_reserved(n=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=g)
    return DeviceDataset(x, torch.zeros(n, dtype=torch.long), device="cpu")


class _Norm:
    def from_uint8(self, xb):
        return xb.float() / 255 - 0.5


def test_alignment_recovers_a_known_permutation_exactly():
    torch.manual_seed(0)
    a = build_model("cnn_small", 10, (32, 32, 3))
    _randomise_bn(a)
    a.eval()
    b = build_model("cnn_small", 10, (32, 32, 3))
    b.load_state_dict(a.state_dict())
    spec = tsc_mod.permutation_spec("cnn_small", a)
    g = torch.Generator().manual_seed(3)
    for grp in spec:
        tsc_mod.permute_(b, grp, torch.randperm(b.get_submodule(grp.out[0]).weight.shape[0], generator=g))
    assert not torch.equal(b.features[0].weight, a.features[0].weight)
    ds = _tiny_reserved()
    aligned, corr = tsc_mod.align(a, b, spec, ds, _Norm(), maximize=True, batch_size=32, hflip=True,
                                  generator=torch.Generator().manual_seed(0))
    assert corr > 0.99
    for k, v in a.state_dict().items():
        assert torch.equal(aligned.state_dict()[k], v), k  # the exact inverse permutation, bit for bit
    # the un-aligning assignment (stage 1) moves the weights, not the function
    c = build_model("cnn_small", 10, (32, 32, 3))
    c.load_state_dict(a.state_dict())
    c.eval()
    far, corr_far = tsc_mod.align(a, c, spec, ds, _Norm(), maximize=False, batch_size=32, hflip=True,
                                  generator=torch.Generator().manual_seed(0))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(far(x), a(x), atol=1e-4)
    assert corr_far < 0.2 and not torch.equal(far.features[0].weight, a.features[0].weight)


def test_bezier_curve_endpoints_and_midpoint():
    assert tsc_mod.bezier_coeffs(0.0) == (1.0, 0.0, 0.0) and tsc_mod.bezier_coeffs(1.0) == (0.0, 0.0, 1.0)
    assert tsc_mod.bezier_coeffs(0.4) == pytest.approx((0.36, 0.48, 0.16))
    base = nn.Linear(2, 1)
    start = {"weight": torch.tensor([[1.0, 2.0]]), "bias": torch.tensor([0.0])}
    end = {"weight": torch.tensor([[3.0, -2.0]]), "bias": torch.tensor([4.0])}
    curve = tsc_mod.BezierCurve(base, start, end)
    for t, want in ((0.0, start), (1.0, end)):
        w = curve.weights(t)
        assert all(torch.equal(w[k], want[k]) for k in want)
    # linear initialisation: M = (A + B) / 2, so the untrained curve is the straight line
    assert torch.allclose(curve.weights(0.5)["weight"], torch.tensor([[2.0, 0.0]]))
    curve.fixed_t = 1.0
    assert torch.allclose(curve(torch.tensor([[1.0, 1.0]])), torch.tensor([[5.0]]))
    assert float(curve.l2) == pytest.approx(9 + 4 + 16)
    point = tsc_mod.point_on_curve(curve, base, 0.0)
    assert torch.equal(point.weight, start["weight"]) and torch.equal(point.bias, start["bias"])
    # only the midpoint trains
    assert [p for p in curve.parameters() if p.requires_grad] == list(curve.middle)


# ------------------------------------------------------------------------------------------- end to end (demo record)
def _record(demo_record, tmp_path) -> Path:
    dst = Path(tmp_path) / "rec" / "badnet_demo"
    shutil.copytree(demo_record, dst, ignore=shutil.ignore_patterns("defense", "ra", "bti_inversion"))
    return dst


def _run(name, rec: Path, *extra):
    argv = ["--result_file", rec.name, "--record_root", str(rec.parent), "--device", "cpu", "--no_progress",
            "--yaml_path", str(ROOT / "config" / "defense" / name / "demo.yaml"), *extra]
    out = Path(get("defense", name).main(argv))
    assert out == rec / "defense" / name  # BackdoorBench's folder layout
    for f in ("defense_result.pt", f"{name}_df.csv", f"{name}_df_summary.csv", "config.yaml", "log/index.txt"):
        assert (out / f).is_file(), f
    from bdsafety.records import load_model_result

    res = load_model_result(out / "defense_result.pt")
    model = build_model(res["model_name"], res["num_classes"], (32, 32, 3))
    model.load_state_dict(res["model"], strict=True)
    bd = load_model_result(rec / "attack_result.pt")["model"]
    return out, yaml.safe_load((out / "config.yaml").read_text()), model, bd


@pytest.mark.slow
def test_d3_end_to_end_on_the_demo_record(demo_record, tmp_path):
    out, meta, model, bd = _run("d3", _record(demo_record, tmp_path), "--epochs", "30", "--eval_every", "30")
    info = meta["d3"]
    assert info["layers"] == ["linear"] and info["warm_up_method"] == "random"
    n0 = info["initial_norms"][0]
    assert float(model.linear.weight.norm()) == pytest.approx(n0, rel=1e-4)  # the norm constraint holds
    dist = float((model.linear.weight - bd["linear.weight"]).norm())
    assert dist == pytest.approx(info["weight_distance"], rel=1e-4) and dist > 0.5 * n0  # pushed far from W0
    df = pd.read_csv(out / "d3_df.csv")
    assert df["epoch"].tolist()[0] == 0 and df["epoch"].tolist()[-1] == 30
    # measured (demo record, seed 0, the demo's 100 epochs): C-Acc 1.00 -> 0.90, ASR 0.97 -> 0.001
    assert meta["after"]["test_acc"] > 0.5


@pytest.mark.slow
def test_tsc_end_to_end_on_the_demo_record(demo_record, tmp_path):
    out, meta, model, bd = _run("tsc", _record(demo_record, tmp_path), "--rounds", "2", "--epochs", "6",
                                "--cos_t_max", "3", "--ft_epochs", "2")
    info = meta["tsc"]
    assert info["rounds"] == 2 and info["permutation_groups"] == 4 and len(info["stages"]) == 4
    stages = info["stages"]
    assert all(s["matched_corr"] < 0 for s in stages if s["stage"] == 1)  # stage 1 un-aligns
    assert all(s["matched_corr"] > 0.5 for s in stages if s["stage"] == 2)  # stage 2 aligns
    df = pd.read_csv(out / "tsc_df.csv")
    assert df["epoch"].tolist() == [0, 1, 2, 3, 4] and set(df["stage"].dropna()) == {1, 2}
    moved = sum(float((v - bd[k]).norm()) for k, v in model.state_dict().items() if k.endswith("weight"))
    assert moved > 1.0  # left the backdoored point
    # measured with the demo config (seed 0, 3 rounds of 40 curve epochs): C-Acc 1.00 -> 0.999, ASR 0.97 -> 0.65
    assert meta["after"]["test_acc"] > 0.5
