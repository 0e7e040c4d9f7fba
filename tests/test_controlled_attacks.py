"""WaNet and Input-Aware: the warping field, the generators, the batch hook, the records and where RA's poisoned
samples come from (issue 14)."""
import math
import os
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from bdsafety.attacks.controlled import final_pass_layout, num_poison_in_batch
from bdsafety.attacks.inputaware import InputAwareTrigger, TriggerNet, threshold
from bdsafety.attacks.wanet import WaNetBatch, WarpingField, identity_grid, noise_grid
from bdsafety.data.device import Normalizer, random_rotate
from bdsafety.data.info import dataset_info
from bdsafety.data.poisoned import PoisonedSplit
from bdsafety.outputs import write_artifact
from bdsafety.pools import CROSS_KEY, real_poisoned


def _images(n=6, h=32, w=32, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, h, w, 3), dtype=np.uint8)


# ------------------------------------------------------------------------------------------- warping field
def test_identity_grid_axes_and_zero_strength_is_identity():
    g = identity_grid(4, 6)
    assert g.shape == (1, 4, 6, 2)
    assert g[0, 0, 0].tolist() == [-1, -1] and g[0, 0, -1].tolist() == [1, -1] and g[0, -1, 0].tolist() == [-1, 1]
    x = _images()
    field = WarpingField.make(32, 32, k=4, s=0.0, grid_rescale=1.0, seed=3)
    assert np.array_equal(field.apply(x), x)  # s = 0, no rescale: every pixel sampled at itself
    assert not np.array_equal(WarpingField.make(32, 32, s=0.5, seed=3).apply(x), x)


def test_grid_semantics_shift_strength_and_rescale():
    h = w = 8
    x = torch.arange(h * w, dtype=torch.float32).view(1, 1, h, w).repeat(1, 3, 1, 1) / 64
    field = WarpingField.make(h, w, k=4, s=1.0, seed=0)
    # a constant x-displacement of one pixel (2 / (w - 1) in grid units) = s * noise / H
    field.noise = torch.zeros(1, h, w, 2)
    field.noise[..., 0] = (2 / (w - 1)) * h / field.s
    out = field.warp(x)
    assert torch.allclose(out[..., :-1], x[..., 1:], atol=1e-5)  # positive x samples from the right neighbour
    assert torch.allclose(out[..., -1], x[..., -1], atol=1e-5)  # clamped to the border
    # grid = clamp((identity + s * noise / H) * grid_rescale, -1, 1)
    f2 = WarpingField.make(32, 32, k=4, s=0.5, grid_rescale=0.9, seed=1)
    expect = ((f2.identity + 0.5 * f2.noise / 32) * 0.9).clamp(-1, 1)
    assert torch.equal(f2.grid(), expect)
    assert float(f2.grid().abs().max()) <= 1.0


def test_noise_grid_scale_determinism_and_cross_grids():
    gen = lambda s: torch.Generator().manual_seed(s)  # noqa: E731
    a, b, c = (noise_grid(4, 32, generator=gen(0)), noise_grid(4, 32, generator=gen(0)),
               noise_grid(4, 32, generator=gen(1)))
    assert a.shape == (1, 32, 32, 2) and torch.equal(a, b) and not torch.equal(a, c)
    # align_corners upsampling keeps the control values at the corners: the (2, k, k) field has mean |value| 1
    ins = torch.rand(1, 2, 4, 4, generator=gen(0)) * 2 - 1
    ins = ins / ins.abs().mean()
    assert (torch.allclose(a[0, 0, 0], ins[0, :, 0, 0], atol=1e-5)
            and torch.allclose(a[0, -1, -1], ins[0, :, -1, -1], atol=1e-5))
    f = WarpingField.make(32, 32, seed=0)
    g1, g2 = f.cross_grids(5, gen(7)), f.cross_grids(5, gen(7))
    assert torch.equal(g1, g2) and g1.shape == (5, 32, 32, 2)
    d = (g1 - f.grid()).abs()
    assert float(d.max()) <= 1 / 32 + 1e-6 and float(d.mean()) > 0.2 / 32  # uniform noise in [-1/H, 1/H]
    assert float(g1.abs().max()) <= 1.0


def test_warping_field_saved_and_reloaded(tmp_path):
    f = WarpingField.make(32, 32, k=4, s=0.5, grid_rescale=1.0, seed=5)
    write_artifact(tmp_path / "wanet_grids.pt", f.state())
    g = WarpingField.load(tmp_path)
    x = _images()
    assert np.array_equal(f.apply(x), g.apply(x)) and (g.s, g.k, g.grid_rescale) == (0.5, 4, 1.0)


def test_wanet_batch_hook_layout_labels_and_images():
    info = dataset_info("synthetic")
    norm = Normalizer(info)
    field = WarpingField.make(32, 32, s=1.0, seed=0)
    hook = WaNetBatch(field, norm, pratio=0.25, cross_ratio=2, label_trans="all2one", target=0, num_classes=10,
                      random_crop=0, random_rotation=0, hflip=False, device="cpu", seed=0)
    xb = torch.from_numpy(_images(8)).permute(0, 3, 1, 2).contiguous()
    y = torch.arange(1, 9)
    x, yy = hook(xb, y)
    assert yy.tolist() == [0, 0, 3, 4, 5, 6, 7, 8]  # 2 backdoor (target 0), 4 cross + 2 clean keep their labels
    x01 = norm.denormalize(x)
    clean = xb.float() / 255
    assert torch.allclose(x01[:2], field.warp(clean[:2]), atol=1e-5)
    assert torch.allclose(x01[6:], clean[6:], atol=1e-5)
    cross_err = (x01[2:6] - field.warp(clean[2:6])).abs().amax(dim=(1, 2, 3))
    assert bool((cross_err > 1e-3).all())  # cross samples: a different (noisy) warp
    assert num_poison_in_batch(0.1, 128) == 12 and num_poison_in_batch(0.0, 128) == 0
    # below 1 / bs (BackdoorBench's generalize_to_lower_pratio): one sample with probability pratio * bs
    g = torch.Generator().manual_seed(0)
    draws = [num_poison_in_batch(0.001, 128, g) for _ in range(2000)]
    assert set(draws) == {0, 1} and abs(np.mean(draws) - 0.128) < 0.03


def test_wanet_post_transform_fills_with_the_dataset_mean():
    """BackdoorBench crops and rotates normalised images with zero fill: the mean colour in pixel space, not black."""
    info = dataset_info("cifar10")
    norm = Normalizer(info)

    def hook():
        return WaNetBatch(WarpingField.make(32, 32, seed=0), norm, pratio=0.0, cross_ratio=2, label_trans="all2one",
                          target=0, num_classes=10, random_crop=5, random_rotation=30, hflip=True, device="cpu", seed=0)

    out = hook().post_transform(torch.ones(64, 3, 32, 32))  # white images: a pixel that is not white was filled in
    mean = torch.tensor(info.mean).view(1, 3, 1, 1).expand_as(out)
    filled = ((out - 1).abs().amax(1, keepdim=True) > 1e-6).expand_as(out)
    assert 0.02 < float(filled.float().mean()) < 0.5  # crops (p 0.8) and rotations (p 0.5) moved pixels in
    assert torch.allclose(out[filled], mean[filled], atol=1e-6)  # every filled pixel has the mean colour
    assert float(out.min()) > 0.4  # no black pixel
    # the hook's output (normalised): the same draws give exactly 0 where the mean was filled in
    xn, _ = hook()(torch.full((64, 3, 32, 32), 255, dtype=torch.uint8), torch.zeros(64, dtype=torch.long))
    assert torch.allclose(xn[filled], torch.zeros(()), atol=1e-5)


def test_random_rotate_zero_and_range():
    x = torch.rand(4, 3, 16, 16)
    assert torch.equal(random_rotate(x, 0.0, torch.Generator().manual_seed(0)), x)
    r = random_rotate(x, 10.0, torch.Generator().manual_seed(0))
    assert r.shape == x.shape and float(r.min()) >= 0 and float(r.max()) <= 1 and not torch.equal(r, x)


def test_final_pass_layout_is_backdoorbench_batches():
    bd, cross = final_pass_layout(300, 128, 0.1, 2.0)
    assert bd.tolist() == list(range(0, 12)) + list(range(128, 140)) + list(range(256, 260))
    assert cross.tolist() == list(range(12, 36)) + list(range(140, 164)) + list(range(260, 268))
    bd1, cross1 = final_pass_layout(300, 128, 0.1, 1.0)
    assert len(cross1) == len(bd1) == 28


# ------------------------------------------------------------------------------------------- generators
def _trigger(seed=0, width=4):
    torch.manual_seed(seed)
    G, M = TriggerNet(3, 3, width).eval(), TriggerNet(3, 1, width).eval()  # eval: BN statistics stay as built
    return InputAwareTrigger(G, M, Normalizer(dataset_info("synthetic")))


def test_generators_shapes_ranges_and_determinism():
    trig = _trigger()
    x = torch.rand(5, 3, 32, 32)
    with torch.no_grad():
        p, m = trig.pattern_mask(x)
    assert p.shape == (5, 3, 32, 32) and m.shape == (5, 1, 32, 32)
    assert float(p.min()) >= 0 and float(p.max()) <= 1 and float(m.min()) >= 0 and float(m.max()) <= 1
    t = threshold(torch.tensor([0.0, 0.5, 1.0]))
    assert float(t[0]) < 1e-4 and abs(float(t[1]) - 0.5) < 1e-6 and float(t[2]) > 1 - 1e-4
    imgs = _images(5)
    a, b = trig.apply(imgs), trig.apply(imgs)
    assert a.dtype == np.uint8 and a.shape == imgs.shape and np.array_equal(a, b)
    assert np.array_equal(_trigger().apply(imgs), a) and not np.array_equal(_trigger(seed=1).apply(imgs), a)
    # a poisoned image lies between the image and the pattern: x + (p - x) * m, m in [0, 1]
    with torch.no_grad():
        bd, p2, m2 = trig.poison(x)
    assert torch.allclose(bd, x + (p2 - x) * m2) and float(bd.min()) >= 0 and float(bd.max()) <= 1
    cross = trig.apply(imgs, sources=imgs[::-1].copy())
    assert not np.array_equal(cross, a)


def test_generators_saved_and_reloaded(tmp_path):
    trig = _trigger(width=4)
    settings = {"dataset": "synthetic", "img_size": [32, 32, 3], "num_classes": 10, "gen_width": 4,
                "mask_density": 0.032}
    write_artifact(tmp_path / "inputaware_generators.pt", trig.state(settings))
    again = InputAwareTrigger.load(tmp_path)
    imgs = _images(4)
    assert np.array_equal(trig.apply(imgs), again.apply(imgs))


# ------------------------------------------------------------------------------------------- real poisoned samples
def test_real_poisoned_skips_cross_samples():
    idx = np.array([0, 1, 2, 3, 4])
    split = PoisonedSplit(idx, np.zeros((5, 2, 2, 3), np.uint8), np.array([0, 0, 3, 4, 0]),
                          np.array([5, 6, 3, 4, 0]), 10)
    assert real_poisoned(split, {CROSS_KEY: [2, 3]}).indices.tolist() == [0, 1, 4]
    # a BackdoorBench-made WaNet record (no key): bd_label != true label only (drops target-class backdoor samples too)
    assert real_poisoned(split, {"attack": "wanet"}).indices.tolist() == [0, 1]
    assert real_poisoned(split, {"attack": "badnet"}) is split


# ------------------------------------------------------------------------------------------- records end to end
@pytest.mark.slow
def test_tiny_records_rebuild_poisoned_samples_and_feed_ra(tmp_path):
    """Both attacks on a tiny synthetic set: BackdoorBench layout, cross samples out of RA's pool, and the saved
    warping field / generators reproduce the stored poisoned images."""
    from bdsafety.pools import poisoned_pool
    from bdsafety.records import load_attack_record
    from bdsafety.registry import get

    common = ["--dataset", "synthetic", "--model", "cnn_small", "--synthetic_n_train", "300",
              "--synthetic_n_test", "60", "--epochs", "1", "--batch_size", "128", "--record_root", str(tmp_path),
              "--no_progress", "--device", "cpu", "--eval_batch_size", "256"]
    get("attack", "wanet").main(common + ["--save_folder_name", "w"])
    get("attack", "inputaware").main(common + ["--save_folder_name", "ia", "--clean_train_epochs", "1",
                                               "--gen_width", "4"])
    for name, cross_ratio in (("w", 2.0), ("ia", 1.0)):
        rec = load_attack_record(tmp_path / name)
        bd_idx, cross_idx = final_pass_layout(300, 128, 0.1, cross_ratio, seed=0)
        assert sorted(rec.bd_train.indices.tolist()) == sorted(bd_idx.tolist() + cross_idx.tolist())
        assert rec.info[CROSS_KEY] == cross_idx.tolist()
        rows = rec.bd_train.indices
        cross_rows = np.isin(rows, cross_idx)
        assert np.array_equal(rec.bd_train.bd_labels[cross_rows], rec.bd_train.orig_labels[cross_rows])
        assert bool((rec.bd_train.bd_labels[~cross_rows] == 0).all())
        assert len(os.listdir(tmp_path / name / "cross_test_dataset")) >= 1
        exp = SimpleNamespace(record_dir=tmp_path / name, record=rec, cfg=SimpleNamespace(record_root=str(tmp_path),
                                                                                         trust_record=False))
        split, _, _ = poisoned_pool(exp, None, "RA", part=None)
        assert split.indices.tolist() == bd_idx.tolist()  # RA / EP / PAM-real draw backdoor samples only
        from bdsafety.attacks.base import load_data_for

        data = load_data_for(SimpleNamespace(dataset="synthetic", dataset_path="./data", synthetic_n_train=300,
                                             synthetic_n_test=60, synthetic_seed=0, img_size=None))
        rebuild = (WarpingField.load(tmp_path / name).apply if name == "w"
                   else InputAwareTrigger.load(tmp_path / name).apply)
        assert np.array_equal(rebuild(data.train_x[bd_idx]), split.images)
        assert np.array_equal(rebuild(data.test_x[rec.bd_test.indices]), rec.bd_test.images)
        df = __import__("pandas").read_csv(tmp_path / name / "attack_df.csv")
        assert "test_cross_acc" in df.columns and not math.isnan(df["test_cross_acc"].iloc[-1])
