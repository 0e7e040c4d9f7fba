"""The retune-aware purifier (this project's own method, issue 24 item 8): its first-order meta step against a
hand-computed case, the labels of its two kinds of inverted samples, the inversion cache shared with PAM, and one run
end to end on the demo record followed by the retuning attack."""
import shutil
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn as nn
import yaml

from bdsafety.defenses import retune_aware as RA_DEF
from bdsafety.defenses.retune_aware import RetuneAwareStep, attack_batches, purifier_batch_fn
from bdsafety.registry import get

ROOT = Path(__file__).resolve().parent.parent


# ------------------------------------------------------------------------------------------- the meta step by hand
def _ce_grad(W, b, x, y):
    """Gradient of mean cross-entropy of the linear model x -> W x + b, by hand: (softmax(z) - onehot(y)) / B."""
    z = x @ W.T + b
    p = torch.exp(z - z.max(1, keepdim=True).values)
    p = p / p.sum(1, keepdim=True)
    d = (p - torch.eye(W.shape[0])[y]) / len(y)
    return d.T @ x, d.sum(0)


def _linear_case():
    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    xs = [torch.randn(6, 4) for _ in range(3)]
    ys = [torch.randint(0, 3, (6,)) for _ in range(3)]
    return model, xs, ys


@pytest.mark.parametrize("meta_weight", [0.5, 1.0])
def test_meta_step_matches_hand_computed_first_order_gradient(meta_weight):
    """Two inner SGD steps (lr 0.1, momentum 0.9) on the attack batches A1, A2 from theta_0 give theta_2; the purifier
    steps theta_0 with (1 - w) grad L_B(theta_0) + w grad L_B(theta_2). The original weights are never touched by the
    copy's steps."""
    model, (xb, xa1, xa2), (yb, ya1, ya2) = _linear_case()
    W0, b0 = model.weight.detach().clone(), model.bias.detach().clone()
    lr_in, mom, lr_out = 0.1, 0.9, 0.5
    # by hand: SGD with momentum (torch's form: buf = mom * buf + g, theta -= lr * buf), then the outer gradient
    gW1, gb1 = _ce_grad(W0, b0, xa1, ya1)
    W1, b1 = W0 - lr_in * gW1, b0 - lr_in * gb1
    gW2, gb2 = _ce_grad(W1, b1, xa2, ya2)
    W2, b2 = W1 - lr_in * (mom * gW1 + gW2), b1 - lr_in * (mom * gb1 + gb2)
    hW0, hb0 = _ce_grad(W0, b0, xb, yb)
    hW2, hb2 = _ce_grad(W2, b2, xb, yb)
    want_gW = (1 - meta_weight) * hW0 + meta_weight * hW2
    want_gb = (1 - meta_weight) * hb0 + meta_weight * hb2

    batches = iter([(xa1, ya1), (xa2, ya2)])
    seen_during_attack = []

    def attack_batch():
        seen_during_attack.append((model.weight.detach().clone(), model.bias.detach().clone()))
        return next(batches)

    class Capture(torch.optim.SGD):
        def step(self, closure=None):
            self.seen = [(p.detach().clone(), p.grad.clone()) for p in self.param_groups[0]["params"]]
            return super().step(closure)

    opt = Capture(model.parameters(), lr=lr_out)
    step = RetuneAwareStep(model, opt, attack_batch, meta_every=1, meta_weight=meta_weight, inner_steps=2,
                           inner_lr=lr_in, inner_momentum=mom)
    loss, logits = step(model, xb, yb)
    assert len(seen_during_attack) == 2
    for W, b in seen_during_attack:  # the inner steps ran on the copy: theta_0 unchanged meanwhile
        assert torch.equal(W, W0) and torch.equal(b, b0)
    (pW, gW), (pb, gb) = opt.seen
    assert torch.equal(pW, W0) and torch.equal(pb, b0)  # the purifier's step starts from theta_0 exactly
    assert torch.allclose(gW, want_gW, atol=1e-6) and torch.allclose(gb, want_gb, atol=1e-6)
    assert torch.allclose(model.weight.detach(), W0 - lr_out * want_gW, atol=1e-6)
    assert torch.allclose(model.bias.detach(), b0 - lr_out * want_gb, atol=1e-6)
    # the copy ended at theta_2 (the simulated attack's weights), the loss returned is the one at theta_0
    assert torch.allclose(step.shadow.weight.detach(), W2, atol=1e-6)
    assert torch.allclose(step.last_meta[0], torch.nn.functional.cross_entropy(xb @ W2.T + b2, yb), atol=1e-6)
    assert torch.allclose(loss, torch.nn.functional.cross_entropy(xb @ W0.T + b0, yb), atol=1e-6)
    # and the hand case can tell the meta step from plain SGD
    assert not torch.allclose(hW0, want_gW, atol=1e-6)


def test_meta_step_runs_every_k_steps_and_plain_sgd_otherwise():
    model, (xb, xa, _), (yb, ya, _) = _linear_case()
    W0, b0 = model.weight.detach().clone(), model.bias.detach().clone()
    calls = []

    def attack_batch():
        calls.append(1)
        return xa, ya

    step = RetuneAwareStep(model, torch.optim.SGD(model.parameters(), lr=0.5), attack_batch, meta_every=3,
                           meta_weight=0.5, inner_steps=4, inner_lr=0.1, inner_momentum=0.9)
    step(model, xb, yb)  # call 1: plain SGD
    gW, gb = _ce_grad(W0, b0, xb, yb)
    assert calls == [] and step.last_meta is None
    assert torch.allclose(model.weight.detach(), W0 - 0.5 * gW, atol=1e-6)
    step(model, xb, yb)
    assert calls == []
    step(model, xb, yb)  # call 3: a meta step of 4 inner steps
    assert len(calls) == 4 and step.last_meta is not None
    with pytest.raises(ValueError, match="meta_weight"):
        RetuneAwareStep(model, torch.optim.SGD(model.parameters(), lr=0.1), attack_batch, meta_every=1,
                        meta_weight=1.5, inner_steps=1, inner_lr=0.1, inner_momentum=0.9)


# ------------------------------------------------------------------------------------------- the two label rules
class _Const(nn.Module):
    """A stand-in generator: every output pixel 7.0 (normalised space)."""

    def forward(self, xn):
        return torch.full_like(xn, 7.0)


def test_inverted_samples_true_labels_for_the_purifier_detected_target_for_the_attack():
    from bdsafety.data.device import DeviceDataset, Normalizer
    from bdsafety.data.info import DatasetInfo

    info = DatasetInfo("synthetic", 4, (8, 8, 3), (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), False)
    norm = Normalizer(info)
    labels = np.arange(40) % 4
    reserved = DeviceDataset(np.zeros((40, 8, 8, 3), dtype=np.uint8), labels)
    # the purifier's batches (PAM's): int(0.2 * B + 1) = 5 of 20 replaced by G(x), TRUE labels kept
    y = torch.as_tensor(labels[:20])
    x, y_out = purifier_batch_fn(norm, _Const(), 0.2)(reserved.x[:20], y, None)
    inverted = (x == 7.0).flatten(1).all(1)
    assert int(inverted.sum()) == 5 and torch.equal(y_out, y)
    # the simulated attack's batches: the same count of G(x), labelled with the DETECTED target (here 3, which is not
    # the true target 0: the attack follows the detection), the clean rest keeps its labels
    draw = attack_batches(reserved, norm, _Const(), 3, 0.2, 20, augment=False, hflip=False,
                          generator=torch.Generator().manual_seed(0))
    xa, ya = draw()
    inv = (xa == 7.0).flatten(1).all(1)
    assert int(inv.sum()) == 5 and (ya[inv] == 3).all()
    assert len(ya) == 20 and not (ya[~inv] == 3).all()  # clean samples of other classes keep their own labels
    # inner_p_poison 0: benign retuning, no inverted sample at all
    xa0, _ = attack_batches(reserved, norm, _Const(), 3, 0.0, 20, augment=False, hflip=False, generator=None)()
    assert not (xa0 == 7.0).flatten(1).all(1).any()


# ------------------------------------------------------------------------------------------- one inversion with PAM
TINY_BTI = dict(bti_pretrain_epochs=1, bti_mask_epochs=1, bti_gen_epochs=2, bti_batch_size=8, bti_unet_base=4,
                bti_unet_depth=2)


def _fake_ctx(record_dir, name: str, n=24, classes=4, **over):
    """A DefenseContext on random images and a random cnn_small (no record)."""
    from bdsafety.config import resolve
    from bdsafety.data.device import DeviceDataset, Normalizer
    from bdsafety.data.info import DatasetInfo
    from bdsafety.defenses.base import DefenseContext
    from bdsafety.models import build_model

    info = DatasetInfo("synthetic", classes, (32, 32, 3), (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), False)
    rng = np.random.default_rng(0)
    ds = DeviceDataset(rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8), np.arange(n) % classes)
    exp = SimpleNamespace(device="cpu", norm=Normalizer(info), num_classes=classes, info=info, evalsets=None,
                          progress=False, record=SimpleNamespace(img_size=(32, 32, 3)), record_dir=Path(record_dir),
                          target=0)
    cfg = resolve(get("defense", name).schema(), None,
                  {"n_rounds": 1, "epochs": 1, "batch_size": 8, **TINY_BTI, **over})
    torch.manual_seed(0)
    model = build_model("cnn_small", classes)
    lines: list[str] = []
    return DefenseContext(exp=exp, model=model, reserved=ds, reserved_idx=np.arange(n), val=None,
                          val_idx=np.zeros(0, int), cfg=cfg, log=lines.append, name=name), lines


def test_inversion_cache_is_shared_with_pam(tmp_path):
    """PAM writes the round-1 inversion; retune_aware on the same record and bti settings loads that entry (the same
    key) instead of inverting again, and reports the detection fields as PAM does."""
    from bdsafety.defenses import bti
    from bdsafety.defenses.pam import pam

    calls = []
    real = bti.invert_trigger

    def spy(*a, **k):
        calls.append(1)
        return real(*a, **k)

    ctx, lines = _fake_ctx(tmp_path, "pam")
    ctx2, lines2 = _fake_ctx(tmp_path, "retune_aware", meta_every=1, inner_steps=2, inner_batch_size=8)
    key = bti.cache_key(ctx.cfg, ctx.reserved_idx, ctx.model)
    assert bti.cache_key(ctx2.cfg, ctx2.reserved_idx, ctx2.model) == key  # before either run changes its model
    bti.invert_trigger = spy
    try:
        pam(ctx)
        res = RA_DEF.retune_aware(ctx2)
    finally:
        bti.invert_trigger = real
    assert len(calls) == 1
    assert any("cached at" in s for s in lines) and any("loaded from cache" in s for s in lines2)
    assert [p.stem for p in (tmp_path / bti.CACHE_DIR).glob("*.pt")] == [key]
    info = res.info
    assert {"detected_target", "true_target", "target_match", "target_votes"} <= set(info)
    assert info["true_target"] == 0 and info["target_match"] == (info["detected_target"] == 0)
    row = res.rows[-1]
    assert np.isfinite(row["meta_loss"]) and 0.0 <= row["meta_target_rate"] <= 1.0


@pytest.mark.parametrize("config", ("cifar10", "cifar100", "gtsrb", "tiny", "demo", "cifar100_paper", "tiny_paper"))
def test_yamls_give_pams_inversion_and_schedule(config):
    """Every retune_aware yaml resolves PAM's bti_ settings (one cache key per record) and PAM's schedule."""
    from bdsafety.defenses import bti

    pam_cfg = get("defense", "pam").parse(["--yaml_path", str(get("defense", "pam").config_path(config))])
    cfg = get("defense", "retune_aware").parse(["--yaml_path", str(get("defense", "retune_aware").config_path(config))])
    assert bti.bti_settings(cfg) == bti.bti_settings(pam_cfg)
    shared = ("ratio", "random_seed", "p_rev", "n_rounds", "epochs", "batch_size", "lr", "sgd_momentum", "wd",
              "input_resize", "input_crop")
    assert {k: getattr(cfg, k) for k in shared} == {k: getattr(pam_cfg, k) for k in shared}
    ra = yaml.safe_load((ROOT / "config" / "retune_attack" / "ra" / f"{config.replace('_paper', '')}.yaml").read_text())
    assert (cfg.inner_lr, cfg.inner_momentum, cfg.inner_wd, cfg.inner_batch_size) == \
        (ra["lr"], ra["sgd_momentum"], ra["wd"], ra["batch_size"])


# ------------------------------------------------------------------------------------------- end to end (demo record)
@pytest.mark.slow
def test_retune_aware_end_to_end_then_ra(demo_record, tmp_path):
    """A short run on the demo record (1 round of 3 epochs, a short inversion: the CPU budget) writes a folder in
    BackdoorBench's layout whose weights load strictly into the plain architecture, with the detection fields; the
    retuning attack then runs on it."""
    from bdsafety.models import build_model
    from bdsafety.records import load_model_result
    from bdsafety.retune.ra import main as ra_main

    rec = Path(tmp_path) / "rec" / "badnet_demo"
    shutil.copytree(demo_record, rec, ignore=shutil.ignore_patterns("defense", "ra", "bti_inversion"))
    t0 = time.time()
    out = Path(get("defense", "retune_aware").main([
        "--result_file", rec.name, "--record_root", str(rec.parent), "--device", "cpu", "--no_progress",
        "--yaml_path", str(ROOT / "config" / "defense" / "retune_aware" / "demo.yaml"),
        "--n_rounds", "1", "--epochs", "3", "--eval_every", "3", "--meta_every", "1",
        "--bti_pretrain_epochs", "1", "--bti_mask_epochs", "2", "--bti_gen_epochs", "2"]))
    assert out == rec / "defense" / "retune_aware"
    for f in ("defense_result.pt", "retune_aware_df.csv", "retune_aware_df_summary.csv", "config.yaml", "log/index.txt",
              "bti_generator.pt"):
        assert (out / f).is_file(), f
    res = load_model_result(out / "defense_result.pt")
    build_model(res["model_name"], res["num_classes"], (32, 32, 3)).load_state_dict(res["model"], strict=True)
    meta = yaml.safe_load((out / "config.yaml").read_text())
    assert meta["true_target"] == 0 and meta["target_match"] == (meta["detected_target"] == 0)
    assert meta["retune_aware"]["meta_every"] == 1
    df = pd.read_csv(out / "retune_aware_df.csv", index_col=0, na_values=["nan_value"])
    assert df["epoch"].tolist() == [0, 1, 2, 3] and np.isfinite(df["meta_loss"].iloc[1:]).all()
    assert len(list((rec / "bti_inversion").glob("*.pt"))) == 1
    t_def = time.time() - t0
    (ra_out,) = ra_main(["--result_file", rec.name, "--record_root", str(rec.parent), "--defense", "retune_aware",
                         "--device", "cpu", "--no_progress", "--epochs", "2",
                         "--yaml_path", str(ROOT / "config" / "retune_attack" / "ra" / "demo.yaml")])
    ra_df = pd.read_csv(Path(ra_out) / "ra_df.csv", index_col=0, na_values=["nan_value"])
    assert ra_df["epoch"].tolist() == [0, 1, 2] and ra_df["test_asr"].notna().all()
    assert ra_df["test_asr"].iloc[0] == pytest.approx(meta["after"]["test_asr"], abs=1e-6)
    print(f"retune_aware demo (short): {t_def:.0f}s; RA 2 epochs: {time.time() - t0 - t_def:.0f}s")
