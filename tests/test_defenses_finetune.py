"""FT, the FST family (FST, LP, FE-tuning, FT-init), EP (exact purification) and FT-SAM.

Unit tests pin the math on a tiny model; one end-to-end run per defense on the demo record checks the written
folder and the measured behaviour; bad input must fail clearly and write nothing.
"""
import copy
import math
import os
import shutil
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from bdsafety.config import resolve
from bdsafety.data.device import DeviceDataset, Normalizer
from bdsafety.defenses import finetune as ftm
from bdsafety.defenses import ft_sam as sam
from bdsafety.defenses.mixing import mixing_batch_fn, pool_replacer, true_label_pool
from bdsafety.errors import ConfigError
from bdsafety.registry import get

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ------------------------------------------------------------------------------------------- a tiny model
class TinyNet(nn.Module):
    """conv-BN-ReLU -> avgpool -> linear, with the registry's features()/head() contract."""

    classifier_path = "linear"

    def __init__(self, num_classes=3):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.ReLU())
        self.linear = nn.Linear(4, num_classes)
        self.feature_channels = 4

    def head(self, z):
        return self.linear(F.adaptive_avg_pool2d(z, 1).flatten(1))

    def forward(self, x):
        return self.head(self.features(x))


def tiny(seed=0):
    torch.manual_seed(seed)
    m = TinyNet()
    with torch.no_grad():  # a "trained" head with a norm unlike a fresh one
        m.linear.weight.mul_(5.0)
    return m


def batch(seed=1, n=8):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 6, 6, generator=g), torch.randint(0, 3, (n,), generator=g)


def variant_cfg(variant, **kw):
    return resolve(ftm.finetune_schema(variant), None, kw)


def state(m):
    return {k: v.detach().clone() for k, v in m.state_dict().items()}


# ------------------------------------------------------------------------------------------- FST family
def test_variant_defaults_match_the_fst_paper_definitions():
    want = {  # (reinit_head, train_layers, alpha, head_norm_constraint)
        "ft": (False, "all", 0.0, False), "lp": (False, "head", 0.0, False),
        "fe_tuning": (True, "features", 0.0, False), "ft_init": (True, "all", 0.0, False),
        "fst": (True, "all", 0.2, True),
    }
    for v, w in want.items():
        c = variant_cfg(v)
        assert (c.reinit_head, c.train_layers, c.alpha, c.head_norm_constraint) == w, v
        assert (c.lr, c.sgd_momentum, c.wd, c.lr_scheduler, c.epochs, c.ratio) == (0.01, 0.9, 0.0, "cosine", 10, 0.02)


def test_fst_objective_is_ce_plus_alpha_inner_product_with_original_head():
    m = tiny()
    head = m.linear
    w0 = head.weight.detach().clone()
    ftm.reinit_linear_(head, torch.Generator().manual_seed(3))
    assert not torch.allclose(head.weight, w0)
    bound = 1 / math.sqrt(head.weight.shape[1])
    assert head.weight.abs().max() <= bound and head.bias.abs().max() <= bound
    x, y = batch()
    loss_fn = ftm.fst_loss(head, w0, alpha=0.3)
    logits = m(x)
    loss = loss_fn(logits, y)
    expected = F.cross_entropy(logits, y) + 0.3 * (head.weight * w0).sum()
    assert torch.allclose(loss, expected, atol=1e-6)
    # gradient w.r.t. W = dCE/dW + alpha * W0
    loss.backward()
    g_fst = head.weight.grad.clone()
    head.weight.grad = None
    F.cross_entropy(m(x), y).backward()
    assert torch.allclose(g_fst - head.weight.grad, 0.3 * w0, atol=1e-5)


def test_fst_step_keeps_head_norm_at_original_norm_after_every_step():
    m = tiny()
    w0 = m.linear.weight.detach().clone()
    step, opt, info = ftm.finetune_step(m, variant_cfg("fst", lr=0.5), torch.Generator().manual_seed(0))
    assert info["head_weight_norm_original"] == pytest.approx(float(w0.norm()))
    prev = m.linear.weight.detach().clone()
    for s in range(4):
        x, y = batch(seed=10 + s)
        step(m, x, y)
        assert float(m.linear.weight.detach().norm()) == pytest.approx(float(w0.norm()), rel=1e-5)
        assert not torch.allclose(m.linear.weight, prev)  # it trains
        prev = m.linear.weight.detach().clone()
    # the conv layer trains too (FST tunes all layers)
    assert not torch.allclose(m.features[0].weight, tiny().features[0].weight)


def test_ft_is_plain_sgd_without_rescale():
    m = tiny()
    ref = copy.deepcopy(m)
    step, _, _ = ftm.finetune_step(m, variant_cfg("ft", lr=0.5), None)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.5, momentum=0.9)
    for s in range(3):
        x, y = batch(seed=20 + s)
        step(m, x, y)
        ref_opt.zero_grad()
        F.cross_entropy(ref(x), y).backward()
        ref_opt.step()
    for (k, a), b in zip(m.state_dict().items(), ref.state_dict().values()):
        assert torch.allclose(a.float(), b.float(), atol=1e-6), k
    # and the head norm is free to move (no projection back to ||W0||)
    assert abs(float(m.linear.weight.detach().norm()) - float(tiny().linear.weight.detach().norm())) > 1e-3


def test_lp_changes_only_the_head_fe_tuning_only_the_features():
    m = tiny()
    before = state(m)
    step, _, info = ftm.finetune_step(m, variant_cfg("lp", lr=0.5), None)
    assert info["frozen_batchnorms"] == 1
    m.train()
    for s in range(3):
        step(m, *batch(seed=30 + s))
    after = state(m)
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == {"linear.weight", "linear.bias"}  # BN buffers included: the frozen extractor stays fixed

    m = tiny()
    orig_head = m.linear.weight.detach().clone()
    step, _, _ = ftm.finetune_step(m, variant_cfg("fe_tuning", lr=0.5), torch.Generator().manual_seed(0))
    reinit = state(m)
    assert not torch.allclose(reinit["linear.weight"], orig_head)
    for s in range(3):
        step(m, *batch(seed=40 + s))
    after = state(m)
    changed = {k for k in reinit if not torch.equal(reinit[k], after[k])}
    assert "linear.weight" not in changed and "linear.bias" not in changed
    assert {"features.0.weight", "features.1.weight", "features.1.running_mean"} <= changed


def test_alpha_on_a_frozen_head_is_refused():
    with pytest.raises(ConfigError, match="freezes it"):
        ftm.finetune_step(tiny(), variant_cfg("fe_tuning", alpha=0.2), None)


# ------------------------------------------------------------------------------------------- SAM
def test_frozen_bn_stats_restores_buffers_exactly():
    m = tiny().train()
    before = state(m)
    with sam.frozen_bn_stats(m):
        m(batch()[0])
        assert not torch.equal(m.features[1].running_mean, before["features.1.running_mean"])
    assert all(torch.equal(v, before[k]) for k, v in state(m).items())
    m(batch()[0])
    assert not torch.equal(m.features[1].running_mean, before["features.1.running_mean"])


def test_adaptive_sam_perturbation_formula():
    m = tiny()
    x, y = batch()
    F.cross_entropy(m(x), y).backward()
    params = list(m.parameters())
    grads = [p.grad.clone() for p in params]
    rho = 0.7
    e = sam.sam_perturbation(rho, adaptive=True)(params, grads)
    denom = math.sqrt(sum(float(((p.detach().abs() * g) ** 2).sum()) for p, g in zip(params, grads)))
    for p, g, ei in zip(params, grads, e):
        assert torch.allclose(ei, rho * p.detach() ** 2 * g / denom, rtol=1e-5, atol=1e-8)
    # plain SAM: e = rho * g / ||g||, of length rho
    e = sam.sam_perturbation(rho, adaptive=False)(params, grads)
    assert math.sqrt(sum(float((ei ** 2).sum()) for ei in e)) == pytest.approx(rho, rel=1e-5)


def test_sam_step_uses_gradient_at_perturbed_point_and_keeps_bn_buffers():
    m = tiny().train()
    ref = copy.deepcopy(m)
    x, y = batch()
    rho, lr = 0.5, 0.1
    opt = torch.optim.SGD(m.parameters(), lr=lr, momentum=0.0)
    step = sam.sam_step(opt, list(m.parameters()), rho, adaptive=True)
    step(m, x, y)
    # reference by hand: gradient at w (this pass updates BN stats), e, gradient at w + e, update at w
    params = list(ref.parameters())
    w = [p.detach().clone() for p in params]
    F.cross_entropy(ref(x), y).backward()
    buffers_after_first_pass = {k: v.clone() for k, v in ref.state_dict().items()
                                if "running" in k or "num_batches" in k}
    g = [p.grad.clone() for p in params]
    denom = math.sqrt(sum(float(((wi.abs() * gi) ** 2).sum()) for wi, gi in zip(w, g)))
    with torch.no_grad():
        for p, wi, gi in zip(params, w, g):
            p.copy_(wi + rho * wi ** 2 * gi / denom)
    ref.zero_grad()
    with sam.frozen_bn_stats(ref):
        F.cross_entropy(ref(x), y).backward()
    for p, wi, q in zip(params, w, m.parameters()):
        assert torch.allclose(q, wi - lr * p.grad, atol=1e-6)
    for k, v in buffers_after_first_pass.items():
        assert torch.equal(m.state_dict()[k], v), k  # the perturbed pass left the BN running stats alone


def test_smooth_cross_entropy():
    logits, y = torch.randn(5, 4), torch.tensor([0, 1, 2, 3, 0])
    assert sam.smooth_cross_entropy(0.0) is F.cross_entropy
    t = torch.full((5, 4), 0.1 / 3)
    t[torch.arange(5), y] = 0.9
    expected = -(t * F.log_softmax(logits, 1)).sum(1).mean()
    assert torch.allclose(sam.smooth_cross_entropy(0.1)(logits, y), expected)
    with pytest.raises(ConfigError):
        sam.smooth_cross_entropy(1.0)


# ------------------------------------------------------------------------------------------- EP
class _Info:
    mean = (0.0, 0.0, 0.0)
    std = (1.0, 1.0, 1.0)


def test_ep_batches_carry_true_labels_of_real_poisoned_samples():
    g = torch.Generator().manual_seed(0)
    pool_x = torch.randint(0, 256, (20, 3, 4, 4), dtype=torch.uint8, generator=g)
    pool = DeviceDataset(pool_x, torch.arange(20) % 5 + 5)  # "true labels" 5..9, distinct from the clean batch's
    fn = mixing_batch_fn(Normalizer(_Info()), 0.25, pool_replacer(pool, g, augment=False))
    xb = torch.zeros(8, 3, 4, 4, dtype=torch.uint8)
    y = torch.zeros(8, dtype=torch.long)
    x, y2 = fn(xb, y, torch.arange(8))
    assert (y2 != 0).sum() == 2 and torch.equal(y, torch.zeros(8, dtype=torch.long))  # input untouched
    for i in range(2):
        j = [k for k in range(20) if torch.equal((pool_x[k].float() / 255), x[i])]
        assert len(j) == 1 and y2[i] == pool.y[j[0]]  # a real pool image with that image's label
    assert torch.equal(x[2:], torch.zeros(6, 3, 4, 4)) and torch.equal(y2[2:], torch.zeros(6, dtype=torch.long))


def test_ep_pool_is_the_defenders_part_with_original_labels(tmp_path):
    from bdsafety.data.poisoned import PoisonedSplit
    from bdsafety.pools import pool_split

    n = 10
    bd = PoisonedSplit(np.arange(0, 20, 2), np.zeros((n, 2, 2, 3), np.uint8), np.zeros(n), np.arange(n) % 5 + 1, 20)
    exp = SimpleNamespace(record=SimpleNamespace(bd_train=bd, info={}), record_dir=tmp_path, device="cpu",
                          dataset=lambda images, labels: DeviceDataset(images, labels, "cpu"))
    pool, split = true_label_pool(exp, "EP")
    ps = pool_split(tmp_path, bd)
    assert split.indices.tolist() == ps.defender.tolist() and len(ps.attacker) == 5
    assert pool.y.tolist() == [int(v) for v in bd.orig_labels[np.isin(bd.indices, ps.defender)]]
    with pytest.raises(ConfigError, match="p_rev"):
        mixing_batch_fn(Normalizer(_Info()), 1.5, pool_replacer(pool))


# ------------------------------------------------------------------------------------------- end to end
DEFENSES = {name: (lambda argv, name=name: get("defense", name).main(argv))  # what defense/<name>.py runs
            for name in ("ft", "fst", "lp", "fe_tuning", "ft_init", "exact_purification", "ft_sam")}


@pytest.fixture(scope="module")
def record(demo_record, tmp_path_factory):
    """A private copy of the demo record (defense folders written here do not leak into other tests)."""
    dst = tmp_path_factory.mktemp("ftrec") / "badnet_demo"
    shutil.copytree(demo_record, dst, ignore=shutil.ignore_patterns("defense"))
    return str(dst)


def run(name, record, *extra):
    cfg = os.path.join(ROOT, "config", "defense", name, "demo.yaml")
    return DEFENSES[name](["--result_file", record, "--yaml_path", cfg, "--no_progress", *extra])


def check_folder(folder, name, record):
    from bdsafety.models import build_model, load_state_dict_compat
    from bdsafety.records import load_attack_record, load_model_result, read_metrics_summary

    rec = load_attack_record(record)
    res = load_model_result(os.path.join(folder, "defense_result.pt"))
    assert res["model_name"] == rec.model_name and res["num_classes"] == rec.num_classes
    load_state_dict_compat(build_model(rec.model_name, rec.num_classes, tuple(rec.img_size)), res["model"])  # strict
    for f in (f"{name}_df.csv", f"{name}_df_summary.csv", "config.yaml", "log/index.txt"):
        assert os.path.isfile(os.path.join(folder, f)), f
    assert any(p.endswith(".log") for p in os.listdir(os.path.join(folder, "log")))
    import pandas as pd

    df = pd.read_csv(os.path.join(folder, f"{name}_df.csv"), index_col=0)
    assert {"test_acc", "test_asr", "test_ra"} <= set(df.columns) and df["epoch"].iloc[0] == 0
    before = {k: float(df[k].iloc[0]) for k in ("test_acc", "test_asr", "test_ra")}
    return before, read_metrics_summary(folder, name)


# Behaviour on the demo, as measured with the demo configs and seed 0 (docs/measurements.md: what was re-measured with
# the final protocol): after-defense C-Acc / ASR: ft 0.999 / 0.918, lp 0.999 / 0.929, ft_sam 1.000 / 0.961 (the backdoor
# survives), exact_purification 0.999 / 0.004, fst 0.783 / 0.001 (the official alpha 0.2 of
# config/defense/fst/demo.yaml: FST purifies the demo model but costs ~22 points of C-Acc at this data size; alpha 0.1,
# formerly chosen by looking at test results, kept 0.974 / 0.006),
# fe_tuning 0.599 / 0.000 (backdoor gone, but a re-initialised head is not re-learned to full accuracy in 80 steps),
# ft_init 0.997 / 0.329 (partly purified).
EXPECT = {
    "ft": dict(asr_min=0.5, max_drop=0.10),
    "lp": dict(asr_min=0.5, max_drop=0.10),
    "ft_sam": dict(asr_min=0.5, max_drop=0.10),
    "exact_purification": dict(asr_max=0.2, max_drop=0.10),
    "fst": dict(asr_max=0.2, max_drop=0.30),
    "fe_tuning": dict(asr_max=0.2, acc_min=0.4),
    "ft_init": dict(asr_max=0.6, max_drop=0.10),
}


@pytest.mark.parametrize("name", list(DEFENSES))
def test_end_to_end_demo(name, record, request):
    if name == "fst":  # FST on the demo already runs once per session for the RA/PAM tests (conftest.fst_after_ra)
        request.getfixturevalue("fst_after_ra")
        record = str(request.getfixturevalue("demo_work").demo)
        folder = os.path.join(record, "defense", name)
    else:
        folder = run(name, record)
    assert str(folder) == os.path.join(record, "defense", name)
    before, after = check_folder(folder, name, record)
    assert before["test_asr"] > 0.9 and before["test_acc"] > 0.95  # the demo backdoor is there to begin with
    e = EXPECT[name]
    assert after["test_asr"] <= e.get("asr_max", 1.0), after
    assert after["test_asr"] >= e.get("asr_min", 0.0), after
    assert before["test_acc"] - after["test_acc"] <= e.get("max_drop", 1.0), (before["test_acc"], after)
    assert after["test_acc"] >= e.get("acc_min", 0.0), after


def test_existing_folder_refused_then_overwritten(record):
    dest = os.path.join(record, "defense", "ft")
    if not os.path.isdir(dest):
        run("ft", record, "--epochs", "1")
    with pytest.raises(FileExistsError, match="--overwrite"):
        run("ft", record, "--epochs", "1")
    run("ft", record, "--epochs", "2", "--overwrite")
    import pandas as pd

    df = pd.read_csv(os.path.join(dest, "ft_df.csv"), index_col=0)
    assert df["epoch"].tolist() == [0, 1, 2]


def test_bad_input_is_refused_and_nothing_is_written(record):
    from bdsafety.cli import run_cli
    from bdsafety.errors import TrainingDiverged

    with pytest.raises(ValueError, match="does not match record"):
        run("fst", record, "--model", "preactresnet18", "--save_name", "bad_model")
    with pytest.raises(ValueError, match="raise --ratio"):
        run("fst", record, "--ratio", "0.001", "--save_name", "bad_ratio")
    with pytest.raises(ValueError, match="cannot cover"):
        run("ft_sam", record, "--ratio", "5", "--save_name", "bad_ratio_balanced")
    with pytest.raises(TrainingDiverged, match="Lower the learning rate"):
        run("ft", record, "--lr", "1e30", "--epochs", "1", "--save_name", "nan_run")
    with pytest.raises(ConfigError, match="p_rev"):
        run("exact_purification", record, "--p_rev", "0", "--save_name", "bad_fraction")
    # through the CLI wrapper: one clear line and exit code 2
    demo_ft = os.path.join(ROOT, "config", "defense", "ft", "demo.yaml")
    argv = ["--result_file", record, "--yaml_path", demo_ft, "--lr", "1e30", "--epochs", "1", "--save_name", "nan_cli",
            "--no_progress"]
    assert run_cli(DEFENSES["ft"], argv) == 2
    left = os.listdir(os.path.join(record, "defense")) if os.path.isdir(os.path.join(record, "defense")) else []
    assert not [d for d in left if d.startswith(("bad_", "nan_", ".bad_", ".nan_"))], left
