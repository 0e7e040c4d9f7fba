"""BackdoorBench's classic defenses as native ones: NAD, Fine-Pruning (FP) and Neural Cleanse (NC).

Unit tests pin each core step against a hand-computed case; one end-to-end run per defense on the demo record
checks the written folder (strict load, the method's own fields) and what can be asserted of its behaviour.
"""
import math
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import yaml

from bdsafety.config import resolve
from bdsafety.defenses import fp as fp_mod
from bdsafety.defenses import nad as nad_mod
from bdsafety.defenses import nc as nc_mod
from bdsafety.errors import ConfigError
from bdsafety.models import build_model, load_state_dict_compat
from bdsafety.registry import get

ROOT = Path(__file__).resolve().parent.parent


def cfg_of(module, **over):
    return resolve(module.schema(), None, over)


# ------------------------------------------------------------------------------------------- NAD
def test_attention_map_and_loss_by_hand():
    fm = torch.tensor([[[[1.0, 2.0]], [[3.0, 0.0]]]])  # (1, 2, 1, 2): channel sums of squares 1+9=10, 4+0=4
    am = nad_mod.attention_map(fm, p=2.0)
    want = torch.tensor([10.0, 4.0]) / (math.sqrt(116.0) + 1e-6)
    assert am.shape == (1, 1, 1, 2) and torch.allclose(am.flatten(), want)
    other = torch.tensor([[[[0.0, 1.0]], [[0.0, 0.0]]]])  # map (0, 1) / (1 + 1e-6)
    want_loss = ((want[0] - 0.0) ** 2 + (want[1] - 1 / (1 + 1e-6)) ** 2) / 2
    assert torch.allclose(nad_mod.at_loss(fm, other), want_loss)
    # p = 1: sums of absolute values
    assert torch.allclose(nad_mod.attention_map(-fm, p=1.0).flatten(),
                          torch.tensor([4.0, 2.0]) / (math.sqrt(20) + 1e-6))
    # a 1x1 map (an avgpool output) is ~1 for every input: BackdoorBench's beta3 term is negligible
    pooled = torch.rand(3, 8, 1, 1) + 0.5
    assert torch.allclose(nad_mod.attention_map(pooled), torch.ones(3, 1, 1, 1), atol=1e-5)
    with pytest.raises(ConfigError, match="4-D"):
        nad_mod.attention_map(torch.ones(2, 3))


def test_nad_layers_auto_follow_backdoorbench():
    pre = build_model("preactresnet18_narrow", 10, (32, 32, 3))
    assert nad_mod.resolve_layers("auto", "preactresnet18_narrow", pre) == ["layer3", "layer4", "avgpool"]
    small = build_model("cnn_small", 10, (32, 32, 3))
    names = nad_mod.resolve_layers("auto", "cnn_small", small)
    assert names == ["features.9", "features.13", "avgpool"]
    taps = nad_mod.Taps(small, names)
    small.eval()
    small(torch.zeros(2, 3, 32, 32))
    taps.remove()
    assert [tuple(taps.out[n].shape[2:]) for n in names] == [(8, 8), (4, 4), (1, 1)]  # preactresnet18's sizes
    tv = build_model("resnet18", 10, (32, 32, 3))  # torchvision: BackdoorBench's children[:-1] -> avgpool, beta3 only
    assert nad_mod.resolve_layers("auto", "resnet18", tv) == [None, None, "avgpool"]
    assert nad_mod.resolve_layers(",layer4,", "preactresnet18_narrow", pre) == [None, "layer4", None]
    with pytest.raises(ConfigError, match="no module"):
        nad_mod.resolve_layers("layer3,layer9,avgpool", "preactresnet18_narrow", pre)


def test_nad_student_schedule_and_step():
    f = nad_mod.nad_lr_lambda(0.02)
    assert [f(e) for e in (0, 1)] == [1.0, 1.0]
    assert f(2) == pytest.approx(0.5) and f(19) == pytest.approx(0.5) and f(20) == pytest.approx(1e-4 / 0.02)
    # teacher == student: the attention terms vanish, the step's loss is the cross-entropy
    torch.manual_seed(0)
    student = build_model("cnn_small", 3, (8, 8, 3))
    teacher = build_model("cnn_small", 3, (8, 8, 3))
    teacher.load_state_dict(student.state_dict())
    student.eval()
    teacher.eval()
    names = nad_mod.resolve_layers("auto", "cnn_small", student)
    s_taps, t_taps = nad_mod.Taps(student, names), nad_mod.Taps(teacher, names)
    opt = torch.optim.SGD(student.parameters(), lr=0.0)
    x, y = torch.randn(4, 3, 8, 8), torch.tensor([0, 1, 2, 0])
    loss, logits = nad_mod.nad_step(opt, teacher, s_taps, t_taps, names, [500.0, 1000.0, 1000.0], 2.0)(student, x, y)
    assert torch.allclose(loss, F.cross_entropy(logits, y), atol=1e-6)
    with torch.no_grad():  # a different teacher: the loss is CE + sum beta_i * AT_i
        for prm in teacher.parameters():
            prm.add_(0.1)
    loss2, logits2 = nad_mod.nad_step(opt, teacher, s_taps, t_taps, names, [500.0, 1000.0, 1000.0], 2.0)(student, x, y)
    with torch.no_grad():
        at = sum(b * nad_mod.at_loss(s_taps.out[n], t_taps.out[n]) for n, b in zip(names, [500.0, 1000.0, 1000.0]))
    assert torch.allclose(loss2, F.cross_entropy(logits2, y) + at, rtol=1e-5)
    assert float(at) > 0


# ------------------------------------------------------------------------------------------- FP
def test_fp_ranking_counts_and_folding_by_hand():
    acts = torch.tensor([[3.0, 0.0, 1.0, 2.0], [5.0, 0.0, 1.0, 0.0]])  # channel means 4, 0, 1, 1
    assert fp_mod.channel_order(acts).tolist() == [1, 2, 3, 0]  # ascending, ties by index
    assert fp_mod.prune_counts(256, 0.01) == list(range(0, 256, 3))  # ceil(2.56) = 3, BackdoorBench's range
    assert fp_mod.prune_counts(10, 0.01) == list(range(10))
    head = nn.Linear(4, 2)
    with torch.no_grad():
        head.weight.copy_(torch.tensor([[1.0, 2.0, 3.0, 4.0], [4.0, 3.0, 2.0, 1.0]]))
        head.bias.copy_(torch.tensor([0.0, 0.5]))
    feats = torch.tensor([[0.0, 0.0, 0.0, 1.0], [1.0, 0.0, 0.0, 0.0]])  # logits (4, 1.5) -> 0; (1, 4.5) -> 1
    y = torch.tensor([0, 1])
    order = torch.tensor([3, 2, 1, 0])
    assert fp_mod.pruned_accuracy(feats, y, head, order, 0) == 1.0
    assert fp_mod.pruned_accuracy(feats, y, head, order, 1) == 0.5  # channel 3 gone: sample 0 -> (0, 0.5) -> class 1
    fp_mod.fold_pruning_(head, torch.tensor([3, 1]))
    assert head.weight[:, 3].abs().sum() == 0 and head.weight[:, 1].abs().sum() == 0
    assert head.weight[0, 0] == 1.0 and head.weight[1, 2] == 2.0


def test_fp_selection_stops_at_the_first_count_beyond_the_tolerance():
    head = nn.Linear(3, 2, bias=False)
    with torch.no_grad():
        head.weight.copy_(torch.tensor([[0.0, 0.0, 0.0], [1.0, 1.0, 1.0]]))
    # sample i is class 1 through channel i alone: pruned, its logits tie (0, 0) and argmax says class 0
    feats = torch.eye(3)
    y = torch.ones(3, dtype=torch.long)
    order = torch.tensor([0, 1, 2])
    cfg = cfg_of(fp_mod, once_prune_ratio=0.34, acc_ratio=0.5)  # steps of ceil(3 * 0.34) = 2: counts 0, 2
    n, doc = fp_mod.select_count(feats, y, head, order, cfg)
    # n=2 leaves only sample 2 correct (acc 1/3, a 67% drop >= 50%): the sweep stops there and keeps 0
    assert [c["n_pruned"] for c in doc["candidates"]] == [0, 2] and n == 0
    cfg = cfg_of(fp_mod, once_prune_ratio=0.34, acc_ratio=0.7)
    n, _ = fp_mod.select_count(feats, y, head, order, cfg)
    assert n == 2


def test_fp_folded_model_loads_strictly_into_the_plain_architecture():
    m = build_model("cnn_small", 10, (32, 32, 3))
    fp_mod.fold_pruning_(fp_mod.linear_head(m), torch.tensor([0, 5, 7]))
    sd = m.state_dict()
    assert not any(k.endswith(("_orig", "_mask")) for k in sd)
    fresh = build_model("cnn_small", 10, (32, 32, 3))
    load_state_dict_compat(fresh, sd)
    assert fresh.linear.weight[:, [0, 5, 7]].abs().sum() == 0


# ------------------------------------------------------------------------------------------- NC
def test_nc_mad_anomaly_index_by_hand():
    norms = [1.0, 10.0, 11.0, 12.0, 13.0, 14.0]
    idx, med, mad = nc_mod.anomaly_indices(norms)
    assert med == 11.0  # torch.median: the LOWER middle value of an even count (BackdoorBench)
    assert mad == pytest.approx(1.4826 * 1.0)  # deviations 10, 1, 0, 1, 2, 3 -> lower median 1
    assert idx[0] == pytest.approx(10 / 1.4826) and idx[5] == pytest.approx(3 / 1.4826)
    flagged, *_ = nc_mod.flagged_classes(norms, 2.0)
    assert flagged == [0]  # class 5's index is 2.02 > 2 too, but its norm is above the median
    assert nc_mod.flagged_classes([5.0, 5.0, 5.0], 2.0)[0] == []  # MAD 0, nothing deviates
    assert nc_mod.flagged_classes([1.0, 5.0, 5.0], 2.0)[0] == [0]  # MAD 0: any deviation is infinitely anomalous


def test_nc_stamp_and_cost_schedule():
    x = torch.rand(2, 3, 4, 4)
    m = torch.zeros(2, 1, 4, 4)
    m[1, :, 0, 0] = 1.0
    p = torch.ones(2, 3, 4, 4)
    out = nc_mod.stamp(x, m, p)
    assert out.shape == (4, 3, 4, 4)
    assert torch.equal(out[:2], x) and (out[2:, :, 0, 0] == 1).all() and torch.equal(out[2:, :, 1:], x[:, :, 1:])
    u = nc_mod.stamp_uint8(torch.full((1, 1, 1, 2), 100, dtype=torch.uint8), torch.tensor([[[[0.5, 1.0]]]]),
                           torch.tensor([[[[0.5, 0.2]]]]))
    assert u.flatten().tolist() == [114, 51]  # round(50 + 63.75) and round(51.0)
    cfg = cfg_of(nc_mod)
    s = nc_mod.ClassState(cfg)
    one = torch.ones(1)
    for _ in range(5):  # 5 successful epochs: cost x2, best mask kept
        s.end_epoch(0.99, 10.0, one, one)
    assert s.cost == pytest.approx(2e-3) and s.up_flag and s.reg_best == 10.0
    for _ in range(5):  # 5 failing epochs: cost / 2**1.5
        s.end_epoch(0.5, 1.0, one * 2, one)
    assert s.cost == pytest.approx(2e-3 / 2 ** 1.5) and s.down_flag and s.reg_best == 10.0


def test_nc_reverse_engineering_finds_a_planted_trigger():
    """A model that predicts class 0 by default, class 1 when the whole image is bright and class 2 whenever pixel
    (0, 0) is bright: class 2's mask must shrink to (about) that pixel, far below class 1's whole-image mask."""
    from bdsafety.data.device import DeviceDataset, Normalizer
    from bdsafety.data.info import DatasetInfo

    class Planted(nn.Module):
        def forward(self, x):
            corner = x[:, :, 0, 0].mean(1)
            mean = x.mean((1, 2, 3))
            return torch.stack([torch.zeros_like(mean), 20 * (mean - 0.9), 40 * (corner - 0.9)], 1)

    g = torch.Generator().manual_seed(0)
    imgs = (torch.rand(64, 3, 6, 6, generator=g) * 200).to(torch.uint8)
    ds = DeviceDataset(imgs, torch.zeros(64, dtype=torch.long))
    norm = Normalizer(DatasetInfo("t", 3, (6, 6, 3), (0.0, 0.0, 0.0), (1.0, 1.0, 1.0), False))
    cfg = cfg_of(nc_mod, nc_epoch=30, batch_size=32, nc_augment=False)
    masks, patterns, states = nc_mod.reverse_engineer(Planted(), ds, norm, 3, cfg, generator=g, log=lambda s: None)
    norms = masks.flatten(1).sum(1)
    assert masks.shape == (3, 1, 6, 6) and patterns.shape == (3, 3, 6, 6)
    assert norms[2] < 0.2 * norms[1] and norms[0] < norms[2], norms  # class 0 needs no trigger at all
    assert masks[2, 0, 0, 0] == masks[2].max()
    assert all(s.reg_best < math.inf for s in states)  # every class reached the success threshold


# ------------------------------------------------------------------------------------------- end to end (demo record)
def _record(demo_record, tmp_path) -> Path:
    dst = Path(tmp_path) / "rec" / "badnet_demo"
    shutil.copytree(demo_record, dst, ignore=shutil.ignore_patterns("defense", "ra", "bti_inversion"))
    return dst


def _run(name, rec: Path, *extra) -> tuple[Path, dict, nn.Module]:
    argv = ["--result_file", rec.name, "--record_root", str(rec.parent), "--device", "cpu", "--no_progress",
            "--yaml_path", str(ROOT / "config" / "defense" / name / "demo.yaml"), *extra]
    out = Path(get("defense", name).main(argv))
    assert out == rec / "defense" / name  # BackdoorBench's folder name
    for f in ("defense_result.pt", f"{name}_df.csv", f"{name}_df_summary.csv", "config.yaml", "log/index.txt"):
        assert (out / f).is_file(), f
    from bdsafety.records import load_model_result

    res = load_model_result(out / "defense_result.pt")
    assert not any(k.endswith(("_orig", "_mask")) for k in res["model"])
    model = build_model(res["model_name"], res["num_classes"], (32, 32, 3))
    model.load_state_dict(res["model"], strict=True)  # the plain registered architecture
    return out, yaml.safe_load((out / "config.yaml").read_text()), model


@pytest.mark.slow
def test_fp_end_to_end_on_the_demo_record(demo_record, tmp_path):
    out, meta, model = _run("fp", _record(demo_record, tmp_path), "--epochs", "5")
    n = meta["n_pruned"]
    assert n > 0 and meta["fp"]["n_pruned"] == n and len(meta["fp"]["pruned_channels"]) == n
    assert int((model.linear.weight.abs().sum(0) == 0).sum()) >= n  # still pruned after fine-tuning (folded)
    sel = yaml.safe_load((out / "fp_prune_selection.yaml").read_text())
    assert "validation" in sel["data"] and sel["n_pruned"] == n
    ref = sel["val_acc_unpruned"]
    kept = next(c for c in sel["candidates"] if c["n_pruned"] == n)
    assert (ref - kept["val_acc"]) / ref < 0.1
    assert (out / "log" / "val_index.txt").is_file()
    # measured (demo record, seed 0, 5 epochs): 96 of 256 channels pruned, ASR 0.97 -> 0.22 after pruning, 0.23 after
    # fine-tuning, C-Acc 0.999 -> 0.964
    assert meta["before"]["test_asr"] > 0.9 and meta["after"]["test_asr"] < meta["before"]["test_asr"] - 0.3
    assert meta["before"]["test_acc"] - meta["after"]["test_acc"] <= 0.1


@pytest.mark.slow
def test_nad_end_to_end_on_the_demo_record(demo_record, tmp_path):
    out, meta, _ = _run("nad", _record(demo_record, tmp_path), "--eval_every", "10")
    assert meta["nad"]["layers"] == {"beta1": "features.9", "beta2": "features.13", "beta3": "avgpool"}
    assert meta["nad"]["betas"] == [500.0, 1000.0, 1000.0]
    teacher = pd.read_csv(out / "nad_teacher_df.csv")
    assert len(teacher) == 10 and np.isfinite(teacher["train_loss"]).all()
    df = pd.read_csv(out / "nad_df.csv")
    assert df["epoch"].tolist()[0] == 0 and df["epoch"].tolist()[-1] == 10
    # measured with the demo config (seed 0): C-Acc 0.999 -> 0.999, ASR 0.969 -> 0.958: 20 SGD steps of BackdoorBench's
    # NAD do not purify the demo model (reported, not tuned away)
    assert meta["before"]["test_acc"] - meta["after"]["test_acc"] <= 0.2


@pytest.mark.slow
def test_nc_end_to_end_on_the_demo_record(demo_record, tmp_path):
    out, meta, _ = _run("nc", _record(demo_record, tmp_path), "--nc_epoch", "6", "--epochs", "5")
    det = meta["nc"]
    assert len(det["l1_norms"]) == 10 and len(det["anomaly_indices"]) == 10
    assert det["backdoor_detected"] == bool(det["flagged_classes"])
    table = pd.read_csv(out / "nc_detection.csv")
    assert table["flagged"].sum() == len(det["flagged_classes"])
    idx, med, mad = nc_mod.anomaly_indices(det["l1_norms"])
    assert np.allclose(idx.numpy(), det["anomaly_indices"]) and det["median_norm"] == pytest.approx(med)
    assert meta["true_target"] == 0
    # measured (6 of the demo's 20 reverse-engineering epochs, 5 unlearning epochs, seed 0): class 0, the true target,
    # has the smallest norm (736 vs a median 812) and is flagged at anomaly index 2.12; ASR 0.97 -> 0.71
    if det["flagged_classes"]:
        assert meta["detected_target"] == det["flagged_classes"][0] and det["unlearned"]
        assert (out / "log" / "unlearning_index.txt").is_file()
    else:
        assert meta["detected_target"] is None and not det["unlearned"]
        assert meta["after"]["test_asr"] == pytest.approx(meta["before"]["test_asr"])
