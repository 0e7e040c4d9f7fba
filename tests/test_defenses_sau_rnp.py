"""SAU and RNP: their core steps against hand-computed cases, one end-to-end run each on the demo record."""
import copy
import math
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn as nn

from bdsafety.data.device import DeviceDataset, Normalizer
from bdsafety.data.info import DatasetInfo
from bdsafety.defenses import rnp as rnp_mod
from bdsafety.defenses import sau as sau_mod
from bdsafety.models import build_model, load_state_dict_compat
from tests.tiny_models import ConvBN

ROOT = Path(__file__).resolve().parent.parent


def sau_cfg(**over):
    cfg = SimpleNamespace(**{k: o.default for k, o in sau_mod.SAU_SCHEMA.items()})
    for k, v in over.items():
        setattr(cfg, k, v)
    return cfg


def logits_of(*probs):
    """Logits whose softmax is exactly the given probability rows."""
    return torch.tensor(probs, dtype=torch.float64).log()


class Linear(nn.Module):
    """f(x) = W x.flatten() (no bias): a model whose outputs are easy to write by hand."""

    def __init__(self, w):
        super().__init__()
        self.w = nn.Parameter(torch.tensor(w, dtype=torch.float32))

    def forward(self, x):
        return x.flatten(1) @ self.w.t()


def identity(x):
    return x


# ------------------------------------------------------------------------------------------- SAU
def test_sau_shared_adversarial_risk_by_hand():
    # sample 0: h_0's perturbed label 1 differs from y (0) and from h_0's clean prediction (0): covered, q = 0.5
    # sample 1: h_0's perturbed label equals y: not covered; sample 2: equals h_0's clean prediction: not covered
    # sample 3: covered, q = 0.9995 (1 - q = 0.0005 below the 0.999 clamp, q above the 0.001 clamp)
    per = logits_of([0.2, 0.5, 0.3], [0.1, 0.1, 0.8], [0.3, 0.3, 0.4], [0.9995, 0.0004, 0.0001])
    per_ref = logits_of([0.1, 0.8, 0.1], [0.1, 0.8, 0.1], [0.1, 0.1, 0.8], [0.7, 0.2, 0.1])
    y = torch.tensor([0, 1, 0, 1])
    clean_pred_ref = torch.tensor([0, 1, 2, 1])
    loss, fooled = sau_mod.shared_adversarial_risk(per, per_ref, clean_pred_ref, y)
    assert fooled.tolist() == [True, False, False, True]
    # each covered sample: -(log(1e-6 + (1 - q)) + log(1 + 1e-6 - q)) / 2 = -log(1 + 1e-6 - q); mean over all 4
    expected = (-math.log(0.5 + 1e-6) - math.log(0.0005 + 1e-6)) / 4
    assert float(loss) == pytest.approx(expected, rel=1e-9)
    # q near 1: neither clamp binds ...
    per2 = logits_of([0.00001, 0.99999, 0.0])
    per2 = torch.nan_to_num(per2, neginf=-50.0)
    loss2, _ = sau_mod.shared_adversarial_risk(per2, logits_of([0.1, 0.8, 0.1]), torch.tensor([0]), torch.tensor([0]))
    q = torch.softmax(per2, 1)[0, 1].item()
    assert float(loss2) == pytest.approx(-(math.log(1e-6 + (1 - q)) + math.log(1 + 1e-6 - q)) / 2, rel=1e-6)
    # ... and a q below 0.001 is clamped up to 0.001 on the log(1 - q) side, 1 - q down to 0.999 on the other
    per3 = logits_of([0.9999, 0.0001, 0.0])
    per3 = torch.nan_to_num(per3, neginf=-50.0)
    loss3, _ = sau_mod.shared_adversarial_risk(per3, logits_of([0.1, 0.8, 0.1]), torch.tensor([0]), torch.tensor([0]))
    assert float(loss3) == pytest.approx(-(math.log(1e-6 + 0.999) + math.log(1 + 1e-6 - 0.001)) / 2, rel=1e-6)
    # nothing covered: exactly 0, still differentiable
    z, f = sau_mod.shared_adversarial_risk(per.requires_grad_(True), per_ref, clean_pred_ref, per_ref.argmax(1))
    assert z.item() == 0.0 and not f.any() and z.requires_grad


def test_sau_js_and_pgd_objective_by_hand():
    p, q = [0.5, 0.5], [0.9, 0.1]
    m = [0.7, 0.3]
    js = 0.5 * sum(a * math.log(a / b) for a, b in zip(p, m)) + 0.5 * sum(a * math.log(a / b) for a, b in zip(q, m))
    assert float(sau_mod.js_divergence(logits_of(p), logits_of(q))[0]) == pytest.approx(js, rel=1e-9)
    assert float(sau_mod.js_divergence(logits_of(p), logits_of(p))[0]) == pytest.approx(0.0, abs=1e-12)
    # two samples, clean predictions 0 for both models; sample 0 attacked by both to class 1 (shared), sample 1
    # attacked by neither: L_adv = -(CE_h(s1) + CE_h0(s1)) / 4, L_share = JS(s1) / 2
    per = logits_of([0.2, 0.8], [0.6, 0.4])
    per_ref = logits_of([0.3, 0.7], [0.9, 0.1])
    y = torch.tensor([0, 1])
    cfg = sau_cfg(beta_1=0.01, beta_2=1.0)
    loss, shared = sau_mod.pgd_objective(per, per_ref, torch.tensor([0, 0]), torch.tensor([0, 0]), y, cfg)
    assert shared.tolist() == [True, False]
    l_adv = -(-math.log(0.4) - math.log(0.1)) / 4
    l_share = sau_mod.js_divergence(per[1:], per_ref[1:]).item() / 2
    assert float(loss) == pytest.approx(0.01 * l_adv + l_share, rel=1e-9)


def test_sau_projection_and_init():
    p = torch.tensor([[[[3.0, -4.0]]], [[[0.3, 0.4]]]])  # per-sample L2 norms 5 and 0.5
    out = sau_mod.project(p.clone(), "L2", 1.0)
    assert (out[0].flatten().tolist() == pytest.approx([0.6, -0.8])
            and out[1].flatten().tolist() == pytest.approx([0.3, 0.4]))
    out = sau_mod.project(p.clone(), "L1", 1.4)  # L1 norms 7 and 0.7
    assert (out[0].flatten().tolist() == pytest.approx([0.6, -0.8])
            and out[1].flatten().tolist() == pytest.approx([0.3, 0.4]))
    assert sau_mod.project(p.clone(), "L_inf", 0.35).flatten().tolist() == pytest.approx([0.35, -0.35, 0.3, 0.35])
    assert torch.equal(sau_mod.project(p.clone(), "Reg", 0.1), p)
    x = torch.zeros(2, 1, 1, 2)
    assert (sau_mod.init_perturbation(x, sau_cfg(pgd_init="max", trigger_norm=0.2)).flatten().tolist()
            == pytest.approx([0.2] * 4))
    assert sau_mod.init_perturbation(x, sau_cfg(pgd_init="min", norm_type="L2", trigger_norm=0.2))[0].norm().item() == \
        pytest.approx(0.2)


def test_sau_pgd_step_on_a_linear_model_by_hand():
    """One signed step from zero on a 2-pixel linear model (h = h_0, so nothing is shared before the step): the
    gradient of beta_1 * L_adv alone (beta_2 0) is -beta_1 * dCE/dp, so p moves by +adv_lr * sign(dCE/dp)."""
    model = Linear([[1.0, 0.0], [0.0, 2.0]]).eval()
    ref = Linear([[1.0, 0.0], [0.0, 2.0]]).eval()
    x = torch.tensor([[[[0.5, 0.1]]]])  # logits (0.5, 0.2): clean prediction 0 = y
    y = torch.tensor([0])
    cfg = sau_cfg(beta_2=0.0, pgd_init="zero", adv_steps=1, adv_lr=0.1, trigger_norm=0.05)
    pert, steps = sau_mod.shared_pgd(model, ref, x, y, identity, cfg)
    # dCE/dlogits = softmax - onehot = (s0 - 1, s1): dCE/dp = W^T (s0 - 1, s1) = (s0 - 1, 2 s1) -> signs (-, +);
    # step 0.1, then clamped to the L_inf radius 0.05
    assert steps == 1 and pert.flatten().tolist() == pytest.approx([-0.05, 0.05])
    # h_0 differs from h: a sample already shared before the step still moves once, then PGD stops (reference)
    ref2 = Linear([[0.0, 0.0], [0.0, 10.0]]).eval()
    model2 = Linear([[0.0, 0.0], [0.0, 10.0]]).eval()
    x2 = torch.tensor([[[[0.0, 0.0]]]])  # clean logits (0, 0): prediction 0
    cfg2 = sau_cfg(pgd_init="max", trigger_norm=0.2, adv_steps=5, adv_lr=0.2)
    pert2, steps2 = sau_mod.shared_pgd(model2, ref2, x2, torch.tensor([0]), identity, cfg2)
    assert steps2 == 1  # at p = +0.2 both predict 1: shared after the first step's forward pass


def test_sau_unlearning_loss_on_a_linear_model_by_hand():
    """lmd_1 * CE(h(x), y) + lmd_2 * CE(h(x + p), y) + lmd_3 * L_sar with every value written out."""
    model = Linear([[1.0, 0.0], [0.0, 1.0]])
    ref = Linear([[0.0, 0.0], [0.0, 3.0]])
    x = torch.tensor([[[[0.2, 0.0]]], [[[0.0, 0.3]]]])
    pert = torch.tensor([[[[0.0, 0.5]]], [[[0.0, 0.0]]]])
    y = torch.tensor([0, 1])
    cfg = sau_cfg(lmd_1=1.0, lmd_2=0.5, lmd_3=2.0)
    loss, parts = sau_mod.unlearning_loss(model, ref, x, pert, y, identity, cfg)

    def ce(logits, t):
        return -math.log(math.exp(logits[t]) / sum(math.exp(v) for v in logits))

    # h: clean logits (0.2, 0), (0, 0.3); perturbed (0.2, 0.5), (0, 0.3). h_0: clean (0, 0), (0, 0.9) -> predictions
    # 0, 1; perturbed (0, 1.5), (0, 0.9) -> labels 1, 1. Sample 0 is covered (1 != y 0, 1 != clean 0); sample 1 not.
    l_cl = (ce([0.2, 0.0], 0) + ce([0.0, 0.3], 1)) / 2
    l_at = (ce([0.2, 0.5], 0) + ce([0.0, 0.3], 1)) / 2
    q = math.exp(0.5) / (math.exp(0.2) + math.exp(0.5))
    l_sar = -(math.log(1e-6 + (1 - q)) + math.log(1 + 1e-6 - q)) / 2 / 2
    assert parts["fooled_ref"] == 1 and parts["shared"] == 1
    assert loss.item() == pytest.approx(l_cl + 0.5 * l_at + 2.0 * l_sar, rel=1e-5)
    loss.backward()  # the loss reaches h's weights only
    assert model.w.grad is not None and ref.w.grad is None


# ------------------------------------------------------------------------------------------- RNP
def rnp_cfg(**over):
    cfg = SimpleNamespace(**{k: o.default for k, o in rnp_mod.RNP_SCHEMA.items()})
    cfg.eval_batch_size = 64
    for k, v in over.items():
        setattr(cfg, k, v)
    return cfg


def tiny_data(n=12, size=8, classes=3, seed=0):
    info = DatasetInfo("synthetic", classes, (size, size, 3), (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), False)
    rng = np.random.default_rng(seed)
    ds = DeviceDataset(rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8), np.arange(n) % classes)
    return ds, Normalizer(info)


def test_rnp_pruning_by_threshold_and_number_folds_into_bn_weights():
    torch.manual_seed(0)
    model = ConvBN().eval()
    with torch.no_grad():
        model.bn.weight.copy_(torch.tensor([1.0, 2.0, 3.0, 4.0]))
        model.bn.bias.copy_(torch.tensor([0.1, 0.2, 0.3, 0.4]))
    # masks as mask_values.txt has them; 0.70004 reads back as 0.7000 (pruned at 0.7), 0.70006 as 0.7001 (kept)
    mv = [("bn", 0, 0.70004), ("bn", 1, 0.70006), ("bn", 2, 0.05), ("bn", 3, 0.9)]
    out, pruned = rnp_mod.pruned_copy(model, mv, "threshold", 0.7)
    assert sorted(pruned) == [("bn", 0), ("bn", 2)]
    assert (out.bn.weight.tolist() == [0.0, 2.0, 0.0, 4.0]
            and out.bn.bias.tolist() == pytest.approx([0.1, 0.2, 0.3, 0.4]))
    assert model.bn.weight.tolist() == [1.0, 2.0, 3.0, 4.0]  # the original is untouched
    # a pruned channel outputs exactly its BN bias
    x = torch.randn(2, 3, 8, 8)
    feats = out.bn(out.conv(x))
    assert (torch.allclose(feats[:, 0], torch.full_like(feats[:, 0], 0.1))
            and torch.allclose(feats[:, 2], torch.full_like(feats[:, 2], 0.3)))
    # the folded model is the plain architecture: its state dict loads strictly
    ConvBN().load_state_dict(out.state_dict(), strict=True)
    # by number: the k smallest masks
    _, pruned_n = rnp_mod.pruned_copy(model, mv, "number", 3)
    assert sorted(pruned_n) == [("bn", 0), ("bn", 1), ("bn", 2)]


def test_rnp_unlearning_step_is_an_ascent_with_weight_decay():
    """One epoch of one full batch: SGD's first momentum step is the plain step, so w1 = w0 + lr * (dCE/dw - wd *
    w0)."""
    ds, norm = tiny_data()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 3))
    w0 = model[1].weight.detach().clone()
    x = norm.from_uint8(ds.x)
    loss = nn.functional.cross_entropy(model(x), ds.y)
    (grad,) = torch.autograd.grad(loss, model[1].weight)
    cfg = rnp_cfg(batch_size=len(ds), augment=False, unlearning_epochs=1, unlearning_lr=0.5, unlearning_wd=0.01)
    rows = rnp_mod.unlearn(model, ds, norm, cfg, False, torch.Generator().manual_seed(0), lambda m: None)
    expected = w0 + 0.5 * (grad - 0.01 * w0)
    assert torch.allclose(model[1].weight.detach(), expected, atol=1e-6)
    assert len(rows) == 1 and rows[0]["train_loss"] == pytest.approx(loss.item(), rel=1e-6)


def test_rnp_unlearning_stops_at_the_clean_threshold():
    ds, norm = tiny_data()
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 3))
    stop_now = rnp_mod.unlearn(model, ds, norm, rnp_cfg(clean_threshold=1.0, unlearning_epochs=5), False, g,
                               lambda m: None)
    assert len(stop_now) == 1  # accuracy <= 1 always: one epoch, as the reference checks after each epoch
    never = rnp_mod.unlearn(model, ds, norm, rnp_cfg(clean_threshold=0.0, unlearning_epochs=4, batch_size=4,
                                                   unlearning_lr=1e-4), False, g, lambda m: None)
    assert len(never) == 4 or never[-1]["train_acc"] == 0.0
    assert [r["lr"] for r in rnp_mod.unlearn(model, ds, norm, rnp_cfg(clean_threshold=0.0, unlearning_epochs=3,
                                                                       schedule=[1, 2]), False, g, lambda m: None)] == \
        pytest.approx([0.01, 0.001, 0.0001])


def test_rnp_masks_scale_bn_weights_only_and_stay_in_unit_interval():
    ds, norm = tiny_data()
    torch.manual_seed(0)
    model = ConvBN().eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cfg = rnp_cfg(recovering_epochs=3, batch_size=4, recovering_lr=5.0, augment=False)
    values, rows = rnp_mod.recover_masks(model, ds, norm, cfg, False, torch.Generator().manual_seed(0), progress=False)
    assert len(rows) == 3 and [(n, i) for n, i, _ in values] == [("bn", i) for i in range(4)]
    assert all(0.0 <= v <= 1.0 for _, _, v in values)
    assert any(v < 1.0 for _, _, v in values)  # a large mask lr moves some mask
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # the unlearned model is untouched
    # the masked network with every mask 1 is the model itself
    net = copy.deepcopy(model)
    rnp_mod.wrap_batchnorms(net)
    x = norm.from_uint8(ds.x)
    assert torch.allclose(net.eval()(x), model(x), atol=1e-6)


def test_rnp_validation_selection_keeps_the_largest_threshold_within_the_budget():
    """pruning_select val: each threshold of the sweep prunes a copy, scored on validation data only; the largest
    whose relative C-Acc drop is below acc_ratio wins (None, nothing pruned, when none qualifies)."""
    from bdsafety.selection import val_accuracy

    ds, norm = tiny_data(n=30)
    torch.manual_seed(1)
    model = ConvBN().eval()
    mv = [("bn", 0, 0.1), ("bn", 1, 0.3), ("bn", 2, 0.5), ("bn", 3, 0.95)]
    cfg = rnp_cfg(pruning_max=0.6, pruning_step=0.2, acc_ratio=0.1)
    thr, doc = rnp_mod.select_threshold(model, mv, ds, norm, cfg)
    ref = val_accuracy(model, ds, norm)
    cands = doc["candidates"]
    assert ([c["threshold"] for c in cands] == pytest.approx([0.0, 0.2, 0.4, 0.6])
            and [c["n_pruned"] for c in cands] == [0, 1, 2, 3])
    for c in cands:
        pm, _ = rnp_mod.pruned_copy(model, mv, "threshold", c["threshold"])
        assert c["val_acc"] == val_accuracy(pm, ds, norm)
    ok = [c["threshold"] for c in cands if (ref - c["val_acc"]) / ref < 0.1]
    assert thr == max(ok)  # threshold 0 prunes nothing, so it always qualifies when ref > 0


# ------------------------------------------------------------------------------------------- end to end
def isolated_record(demo_record, tmp_path) -> Path:
    """A private copy of the demo record without defense outputs, so runs here cannot interfere."""
    dst = Path(tmp_path) / "rec" / "badnet_demo"
    shutil.copytree(demo_record, dst, ignore=shutil.ignore_patterns("defense", "ra", "bti_inversion"))
    return dst


def run_demo(name: str, rec: Path, extra=()) -> Path:
    from bdsafety.registry import get

    argv = ["--result_file", rec.name, "--record_root", str(rec.parent), "--device", "cpu", "--no_progress",
            "--yaml_path", str(ROOT / "config" / "defense" / name / "demo.yaml"), *extra]
    return Path(get("defense", name).main(argv))


def check_folder(folder: Path, name: str, files=()) -> tuple[nn.Module, dict]:
    """The BackdoorBench files are there, the weights load strictly into the plain model; returns (model, config)."""
    import yaml

    from bdsafety.records import load_model_result

    for f in ("defense_result.pt", f"{name}_df.csv", f"{name}_df_summary.csv", "config.yaml", "log/index.txt", *files):
        assert (folder / f).is_file(), f
    res = load_model_result(folder / "defense_result.pt")
    model = build_model(res["model_name"], res["num_classes"])
    load_state_dict_compat(model, res["model"])  # strict
    return model, yaml.safe_load((folder / "config.yaml").read_text())


@pytest.mark.slow
def test_sau_end_to_end_on_the_demo_record(demo_record, tmp_path):
    """The demo config for 5 of its 20 rounds (the test's CPU budget; the study runs all 20)."""
    rec = isolated_record(demo_record, tmp_path)
    out = run_demo("sau", rec, extra=("--n_rounds", "5"))
    assert out == rec / "defense" / "sau"  # BackdoorBench's folder name
    _, meta = check_folder(out, "sau")
    before, after = meta["before"], meta["after"]
    df = pd.read_csv(out / "sau_df.csv").apply(pd.to_numeric, errors="coerce")  # 'nan_value' -> NaN
    rounds = df[df["epoch"] > 0]
    assert list(rounds["epoch"]) == [1, 2, 3, 4, 5]
    assert rounds["pgd_steps"].between(1, 5).all() and rounds["fooled_ref_share"].between(0, 1).all()
    assert rounds["test_asr"].iloc[:-1].isna().all()  # eval_every 5: only the last round is evaluated
    assert abs(rounds["test_asr"].iloc[-1] - after["test_asr"]) < 1e-9
    # measured (seed 0, 2 CPU threads): C-Acc 100.0 -> 100.0, ASR 97.1 -> 77.6 after 5 rounds (58.4 after the demo's
    # 20); asserted with margins: the clean accuracy is kept and the ASR falls
    assert before["test_acc"] - after["test_acc"] <= 0.05
    assert after["test_asr"] < before["test_asr"] - 0.05


@pytest.mark.slow
def test_rnp_end_to_end_on_the_demo_record(demo_record, tmp_path):
    rec = isolated_record(demo_record, tmp_path)
    out = run_demo("rnp", rec)
    assert out == rec / "defense" / "rnp"  # BackdoorBench's folder name
    model, meta = check_folder(out, "rnp", files=("mask_values.txt", "rnp_threshold_sweep.csv"))
    before, after = meta["before"], meta["after"]
    n_pruned, info = meta["n_pruned"], meta["rnp"]
    assert meta["pruning_threshold"] == 0.7 and info["pruning_select"] == "fixed"
    masks = pd.read_csv(out / "mask_values.txt", sep=r"\s+", skiprows=1, header=None)
    assert len(masks) == info["n_neurons"] and masks[3].between(0, 1).all()
    assert n_pruned == int((masks[3] <= 0.7).sum())  # the file's 4-decimal values, as the reference reads them back
    zero_w = sum(int((m.weight == 0).sum()) for m in model.modules() if isinstance(m, nn.BatchNorm2d))
    assert zero_w >= n_pruned
    df = pd.read_csv(out / "rnp_df.csv").replace("nan_value", np.nan)
    stages = list(df["stage"].dropna())
    assert stages[0] == "unlearn" and stages[-1] == "prune" and stages.count("recover") == 20
    unlearned = df[df["stage"] == "unlearn"]
    assert 1 <= len(unlearned) <= 20 and (unlearned["train_acc"].iloc[-1] <= 0.2 or len(unlearned) == 20)
    assert abs(df["test_asr"].iloc[-1] - after["test_asr"]) < 1e-9 and df["n_pruned"].iloc[-1] == n_pruned
    sweep = pd.read_csv(out / "rnp_threshold_sweep.csv")
    assert sweep["n_pruned"].is_monotonic_increasing
    assert sweep.set_index("threshold").loc[0.7, "n_pruned"] == n_pruned
    # measured (demo config, seed 0): the ascent stops at its 20-epoch limit with training accuracy 0.74 (the 0.2
    # floor is not reached: 50 images, one step per epoch, lr 0.001 after epoch 10); 7 of 480 neurons pruned at 0.7;
    # C-Acc 100.0 -> 88.9, ASR 97.1 -> 92.6: RNP at BackdoorBench's values does not purify the demo
    # how many masks fall below 0.7 depends on the record's draw (7 on one demo record, 0 on another built with other
    # thread counts): the fixed threshold prunes few or none here, never everything
    assert 0 <= n_pruned < info["n_neurons"]
    assert after["test_asr"] <= before["test_asr"] + 1e-9
