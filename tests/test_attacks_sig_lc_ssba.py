"""SIG, LC and SSBA (issue 12): each trigger pinned (shape, range, determinism, budget, clean labels), the resource
cache's rebuild rules, the bad inputs, and one tiny end-to-end LC run (clean model trained on demand, PGD, cache)."""

import numpy as np
import pytest
import torch

from bdsafety.attacks.poison import select_train_poison
from bdsafety.attacks.resources import load_or_build
from bdsafety.attacks.triggers import apply_lc_corners, apply_sig, lc_corner_mask, sig_pattern
from bdsafety.errors import ConfigError
from bdsafety.registry import get

TINY = ["--dataset", "synthetic", "--model", "cnn_small", "--synthetic_n_train", "200", "--synthetic_n_test", "100",
        "--epochs", "1", "--no_progress"]


def _images(n=4, h=32, w=32, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, h, w, 3), dtype=np.uint8)


# ------------------------------------------------------------------------------------------- SIG
def test_sig_is_backdoorbench_sinusoid_clipped():
    x = np.full((2, 32, 32, 3), 100, np.uint8)
    y = apply_sig(x, delta=40, f=6)
    assert y.shape == x.shape and y.dtype == np.uint8 and x.max() == 100  # copy, input untouched
    col = (40 * np.sin(2 * np.pi * np.arange(32) * 6 / 32)).astype(np.float32).astype(np.float64)
    expect = np.clip(100 + col, 0, 255).astype(np.uint8)  # truncation as BackdoorBench
    assert (y == expect[None, None, :, None]).all()  # same in every row and channel
    assert np.abs(y.astype(int) - 100).max() == 40  # the amplitude (j = 4: sin(3 pi / 2) = -1)
    assert np.array_equal(y, apply_sig(x, 40, 6))
    white = apply_sig(np.full((1, 32, 32, 3), 250, np.uint8))
    assert white.max() == 255 and white.min() == 210  # clipped at 255
    assert sig_pattern(64, 64, 3).shape == (64, 64, 3)


def test_clean_label_too_small_target_class_is_a_clear_error():
    y = np.arange(1000) % 10  # 100 per class
    with pytest.raises(ConfigError, match=r"only 100 are eligible.*largest pratio possible here is 0.1"):
        select_train_poison(y, 0.2, clean_label=True, target=0)


def test_sig_run_refuses_a_too_small_target_class(tmp_path):
    # 200 synthetic images, 20 per class: pratio 0.2 asks for 40 target-class images, before any training
    with pytest.raises(ConfigError, match="largest pratio possible here is 0.1"):
        get("attack", "sig").main(TINY + ["--record_root", str(tmp_path), "--pratio", "0.2"])
    assert not any(tmp_path.iterdir())


# ------------------------------------------------------------------------------------------- LC
def test_lc_four_corner_trigger():
    m = lc_corner_mask()
    assert m.shape == (32, 32) and set(np.unique(m)) == {-1.0, 0.0, 1.0} and (m != 0).sum() == 36
    assert m[0, 0] == 1 and m[0, 1] == -1 and m[2, 2] == 1 and m[31, 31] == 1 and m[31, 29] == 1 and m[29, 31] == 1
    assert m[29, 29] == -1 and m[31, 0] == 1 and m[29, 2] == -1
    assert (m[3:29] == 0).all() and (m[:, 3:29] == 0).all()
    x = np.full((3, 32, 32, 3), 128, np.uint8)
    y = apply_lc_corners(x, amplitude=1.0)
    assert (y.dtype == np.uint8 and (y[:, m == 1] == 255).all() and (y[:, m == -1] == 0).all()
            and (y[:, m == 0] == 128).all())
    half = apply_lc_corners(x, amplitude=0.5)
    assert (half[:, m == 1] == 255).all() and (half[:, m == -1] == 0).all()  # 128 +- 127.5, clipped/truncated
    assert np.array_equal(y, apply_lc_corners(x, 1.0))
    assert (lc_corner_mask(64, 64) != 0).sum() == 144  # nearest resize of the 32x32 map


def test_pgd_stays_in_budget_and_hurts_the_model():
    from bdsafety.attacks.lc import pgd_linf
    from bdsafety.data.device import Normalizer
    from bdsafety.data.info import DatasetInfo

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 4))
    norm = Normalizer(DatasetInfo("t", 4, (8, 8, 3), (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), False))
    x = _images(64, 8, 8, seed=1)
    y = np.arange(64) % 4

    def loss(imgs):
        with torch.no_grad():
            t = torch.as_tensor(imgs).permute(0, 3, 1, 2).float() / 255
            return torch.nn.functional.cross_entropy(model(norm(t)), torch.as_tensor(y)).item()

    adv = pgd_linf(model, norm, x, y, eps=8, step=1.5, steps=10, device="cpu")
    assert adv.dtype == np.uint8 and adv.shape == x.shape
    d = np.abs(adv.astype(int) - x.astype(int))
    assert d.max() == 8 and (d > 0).mean() > 0.5  # uses the budget, never exceeds it
    assert loss(adv) > loss(x) + 0.5
    assert np.array_equal(adv, pgd_linf(model, norm, x, y, eps=8, step=1.5, steps=10, device="cpu"))
    assert all(p.requires_grad for p in model.parameters())  # restored


def test_resource_cache_reuses_rebuilds_and_says_why(tmp_path):
    path, logs, calls = tmp_path / "c.pt", [], []

    def build():
        calls.append(1)
        return {"x": torch.arange(3)}

    meta = {"weights": "aa", "steps": 100}
    load_or_build(path, meta, build, logs.append, "res")
    assert len(calls) == 1 and "cached at" in logs[-1]
    assert torch.equal(load_or_build(path, meta, build, logs.append, "res")["x"], torch.arange(3)) and len(calls) == 1
    assert "reusing" in logs[-1]
    load_or_build(path, {"weights": "bb", "steps": 100}, build, logs.append, "res")
    assert len(calls) == 2 and any("other inputs (differs in: weights)" in m for m in logs)
    path.write_bytes(b"not a torch file")
    load_or_build(path, {"weights": "bb", "steps": 100}, build, logs.append, "res")
    assert len(calls) == 3 and any("unreadable or corrupt" in m for m in logs)
    load_or_build(path, {"weights": "bb", "steps": 100}, build, logs.append, "res")
    assert len(calls) == 3 and "reusing" in logs[-1]  # the rebuilt file is valid again



def test_concurrent_runs_build_one_resource(tmp_path):
    """An attack and its clean reference, run at once by a study, both need SSBA's encoder: one builds it, the other
    waits on the cache's lock and reuses it (before the lock both trained the 1.6-hour encoder side by side)."""
    import threading
    import time

    path, logs, calls = tmp_path / "ssba" / "enc.pt", [[], []], []

    def build():
        calls.append(1)
        time.sleep(1.0)  # long enough for the second run to arrive while the first holds the entry
        return {"x": torch.arange(3)}

    out = [None, None]

    def run(i):
        out[i] = load_or_build(path, {"steps": 1}, build, logs[i].append, "SSBA encoder")

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
        time.sleep(0.2)
    for t in threads:
        t.join()
    assert len(calls) == 1 and all(torch.equal(o["x"], torch.arange(3)) for o in out)
    assert any("another run is making this SSBA encoder" in m for m in logs[1]) and "reusing" in logs[1][-1]

def _robust_toy(n: int, seed: int):
    """Two classes, 16x16: a robust feature (green brightness +-32 grey levels, per-image noise sd 64: about 70%
    predictive) and a non-robust one (R - B of +-8 grey levels, below the PGD budget of 8 per channel, but averaged over
    every pixel nearly 100% predictive), plus pixel noise. A standard model leans on the non-robust feature, which PGD
    flips; an adversarially trained one must use the robust feature (Tsipras et al., 2019)."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    s = (2 * y - 1).astype(np.float64)[:, None, None]
    x = np.full((n, 16, 16, 3), 128.0)
    x[..., 1] += 32 * s + rng.normal(0, 64, (n, 1, 1))
    x[..., 0] += 4 * s
    x[..., 2] -= 4 * s
    x += rng.normal(0, 20, x.shape)
    return np.clip(np.round(x), 0, 255).astype(np.uint8), y


def test_adversarial_training_gives_pgd_accuracy_standard_training_lacks():
    from bdsafety.attacks.lc import adversarial_train, clean_and_pgd_accuracy
    from bdsafety.data.device import Normalizer
    from bdsafety.data.info import DatasetInfo

    norm = Normalizer(DatasetInfo("toy", 2, (16, 16, 3), (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), False))
    xtr, ytr = _robust_toy(512, 0)
    xte, yte = _robust_toy(256, 1)
    kw = dict(epochs=3, batch_size=64, lr=0.05, optimizer="sgd", momentum=0.9, wd=0.0, scheduler="none", milestones=[],
              hflip=False, seed=0, device="cpu")
    acc = {}
    for name, eps in (("standard", 1e-9), ("adversarial", 8.0)):  # the same loop; eps ~0: PGD leaves the batch as is
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 16 * 16, 2))
        adversarial_train(model, xtr, ytr, norm, eps=eps, step=eps / 4, steps=5, **kw)
        acc[name] = clean_and_pgd_accuracy(model, norm, xte, yte, eps=8, step=2, steps=10, device="cpu")
    (std_clean, std_pgd), (adv_clean, adv_pgd) = acc["standard"], acc["adversarial"]
    assert std_clean > 0.9 and std_pgd < 0.2, acc  # accurate, and PGD at 8/255 breaks it
    assert adv_clean > 0.6 and adv_pgd > std_pgd + 0.3, acc  # robust: most of its accuracy survives the same PGD


def test_lc_without_clean_model_names_the_command(tmp_path):
    with pytest.raises(ConfigError, match=r"--pratio 0 --save_folder_name clean_synthetic_cnn_small_p0"):
        get("attack", "lc").main(TINY + ["--record_root", str(tmp_path), "--lc_reference", "standard",
                                        "--lc_train_clean", "false"])


@pytest.mark.slow
def test_lc_adversarial_reference_end_to_end_tiny(tmp_path, capsys):
    """The default reference: adversarially trained here, cached and reused, its robustness in the record; no clean
    record is needed or trained."""
    import yaml

    from bdsafety.records import load_attack_record

    args = TINY + ["--record_root", str(tmp_path), "--lc_steps", "3", "--lc_adv_epochs", "1", "--lc_adv_steps", "2",
                   "--lc_adv_heldout", "20", "--save_folder_name", "lc"]
    rd = get("attack", "lc").main(args)
    out = capsys.readouterr().out
    assert "adversarial training of the reference" in out and "training it now" not in out
    assert sorted(p.name for p in tmp_path.iterdir()) == [".cache", "lc"]  # no clean record made
    rec = load_attack_record(rd)
    i = rec.info
    assert i["lc_reference"] == "adversarial" and i["lc_clean_record"] is None
    assert (i["lc_adv_settings"]["epochs"] == 1 and i["lc_adv_settings"]["steps"] == 2
            and i["lc_adv_settings"]["eps"] == 8)
    adv_cache = tmp_path / ".cache" / "lc" / i["lc_adv_cache"].rsplit("/", 1)[-1]
    assert adv_cache.is_file() and adv_cache.name.startswith("adv_synthetic_cnn_small_")
    assert 0 <= i["lc_reference_pgd_acc"] <= i["lc_reference_clean_acc"] + 0.2 and 0 <= i["lc_reference_clean_acc"] <= 1
    doc = yaml.safe_load((rd / "lc_reference.yaml").read_text())
    assert doc["reference"] == "adversarial" and doc["weights_sha256"] == i["lc_reference_digest"]
    assert doc["pgd_acc"] == round(i["lc_reference_pgd_acc"], 5) and doc["heldout_test_images"] == 20
    bt = rec.bd_train
    assert len(bt) == 20 and np.array_equal(bt.bd_labels, bt.orig_labels) and (bt.orig_labels == 0).all()
    # rerun: the reference and the adversarial images come from the caches, the same record
    get("attack", "lc").main(args + ["--overwrite"])
    out = capsys.readouterr().out
    assert "lc adversarial reference: reusing the cache" in out and "lc adversarial images: reusing" in out
    assert np.array_equal(load_attack_record(rd).bd_train.images, bt.images)
    # a clean record of the same data, when there is one, is measured next to it (never trained in this mode)
    get("attack", "lc").main(args[:-2] + ["--pratio", "0", "--save_folder_name", "clean_synthetic_cnn_small_p0"])
    rd2 = get("attack", "lc").main(args[:-2] + ["--save_folder_name", "lc2"])
    i2 = load_attack_record(rd2).info
    assert i2["lc_clean_record"].endswith("clean_synthetic_cnn_small_p0") and 0 <= i2["lc_standard_pgd_acc"] <= 1
    assert i2["lc_reference_digest"] == i["lc_reference_digest"]


@pytest.mark.slow
def test_lc_end_to_end_tiny(tmp_path, capsys):
    """The standard-reference ablation: clean reference trained on demand, PGD cached and reused, clean labels,
    trigger only on test images."""
    from bdsafety.records import load_attack_record

    args = TINY + ["--record_root", str(tmp_path), "--lc_steps", "3", "--lc_reference", "standard",
                   "--save_folder_name", "lc"]
    rd = get("attack", "lc").main(args)
    out = capsys.readouterr().out
    assert "training it now" in out and "cached at" in out
    clean = load_attack_record(tmp_path / "clean_synthetic_cnn_small_p0")
    assert clean.info["attack"] == "clean" and len(clean.bd_train) == 0
    rec = load_attack_record(rd)
    assert rec.info["attack"] == "lc" and rec.info["lc_clean_record"].endswith("clean_synthetic_cnn_small_p0")
    bt = rec.bd_train
    assert len(bt) == 20 and (bt.orig_labels == 0).all() and np.array_equal(bt.bd_labels, bt.orig_labels)  # clean label
    from bdsafety.attacks.base import load_data_for
    from bdsafety.registry import get as _get

    cfg = _get("attack", "lc").parse(args)
    data = load_data_for(cfg)
    m = lc_corner_mask() != 0
    x0 = data.train_x[bt.indices]
    inner = np.abs(bt.images[:, ~m].astype(int) - x0[:, ~m].astype(int))
    assert inner.max() <= 8 and inner.max() > 0  # adversarial perturbation within eps = 8 away from the corners
    assert np.array_equal(bt.images[:, m], apply_lc_corners(x0, 1.0)[:, m])  # full-amplitude corners
    te = rec.bd_test
    assert np.array_equal(te.images, apply_lc_corners(data.test_x[te.indices], 1.0))  # trigger only
    assert (te.bd_labels == 0).all() and (te.orig_labels != 0).all()
    # rerun on a corrupted cache: rebuilt with a message, identical images (the clean record is reused, not retrained)
    cache = next((tmp_path / ".cache" / "lc").glob("*.pt"))
    cache.write_bytes(b"garbage")
    get("attack", "lc").main(args + ["--overwrite"])
    out = capsys.readouterr().out
    assert "unreadable or corrupt" in out and "training it now" not in out
    assert np.array_equal(load_attack_record(rd).bd_train.images, bt.images)


# ------------------------------------------------------------------------------------------- SSBA
def _smooth_images(n: int, size: int = 16, seed: int = 2) -> np.ndarray:
    """Smooth, image-like pictures (bilinear upsampling of random 4x4 colour grids)."""
    import cv2

    rng = np.random.default_rng(seed)
    x = np.stack([cv2.resize(rng.uniform(0, 255, (4, 4, 3)).astype(np.float32), (size, size)) for _ in range(n)])
    return np.clip(x, 0, 255).astype(np.uint8)


def test_residual_cosine_tells_one_pattern_from_image_specific_residuals():
    from bdsafety.attacks.ssba import mean_pairwise_cosine

    rng = np.random.default_rng(0)
    pattern = rng.normal(0, 1, (1, 3, 16, 16))
    assert mean_pairwise_cosine(pattern + 0.2 * rng.normal(0, 1, (20, 3, 16, 16))) > 0.9  # one additive pattern
    assert abs(mean_pairwise_cosine(rng.normal(0, 1, (20, 3, 16, 16)))) < 0.05  # unrelated residuals
    assert mean_pairwise_cosine(np.abs(rng.normal(0, 1, (20, 3, 16, 16)))) > 0.5  # same sign everywhere: collinear-ish


def test_ssba_encoder_reads_the_image_untrained():
    """The image enters the U-Net with the secret map: residuals differ from image to image even before training (an
    additive code with an image-dependent gain gives cosine near 1 here), and the secret changes them too."""
    from bdsafety.attacks.ssba import SSBAEncoder, encode_uint8, fixed_secret, mean_pairwise_cosine

    torch.manual_seed(0)
    enc = SSBAEncoder((16, 16, 3), bits=16, width=8)
    x = _smooth_images(24)
    secret = fixed_secret(16, 0)
    res = encode_uint8(enc, x, secret, "cpu").astype(float) - x
    assert mean_pairwise_cosine(res) < 0.5
    assert not np.array_equal(encode_uint8(enc, x, 1 - secret, "cpu"), encode_uint8(enc, x, secret, "cpu"))
    with pytest.raises(ConfigError, match="not a multiple of 16"):
        SSBAEncoder((24, 24, 3), bits=16, width=8)


@pytest.mark.slow
def test_ssba_encoder_trained_is_sample_specific_and_decodes():
    from bdsafety.attacks.ssba import (
        decode_bits,
        encode_uint8,
        fixed_secret,
        mean_pairwise_cosine,
        psnr_uint8,
        train_encoder,
    )

    x = _smooth_images(96)
    enc, dec = train_encoder(x[:64], bits=16, width=8, steps=150, batch_size=32, lr=3e-3, image_weight=10.0, seed=0,
                             device="cpu", log=lambda m: None)
    secret = fixed_secret(16, 0)
    held = x[64:]
    e = encode_uint8(enc, held, secret, "cpu")
    assert e.dtype == np.uint8 and e.shape == held.shape
    assert np.array_equal(e, encode_uint8(enc, held, secret, "cpu"))
    assert not np.array_equal(e, encode_uint8(enc, held, 1 - secret, "cpu"))  # secret-specific
    acc = (decode_bits(dec, e, "cpu") == secret).mean()
    assert acc >= 0.9, acc  # the decoder reads the fixed secret from held-out images
    cos = mean_pairwise_cosine(e.astype(float) - held)
    assert cos < 0.5, cos  # sample-specific: the residuals of different images are not near-collinear
    assert psnr_uint8(held, e).mean() > 14  # 150 steps: the image term has only begun to pull the residual down
    assert abs(psnr_uint8(np.zeros((1, 2, 2, 3), np.uint8), np.full((1, 2, 2, 3), 255, np.uint8))[0]) < 1e-9


def test_ssba_min_psnr_check(tmp_path):
    args = TINY + ["--record_root", str(tmp_path), "--ssba_steps", "2", "--ssba_width", "4", "--ssba_heldout", "20"]
    with pytest.raises(ConfigError, match="mean pairwise cosine .* > ssba_max_cosine 0"):
        get("attack", "ssba").main(args + ["--ssba_max_cosine", "0", "--ssba_min_psnr", "1"])
    with pytest.raises(ConfigError, match="below ssba_min_psnr"):
        get("attack", "ssba").main(args + ["--ssba_min_psnr", "99"])
    assert not any(p.name != ".cache" for p in tmp_path.iterdir())
    assert len(list((tmp_path / ".cache" / "ssba").glob("*.pt"))) == 1  # the encoder is cached even so
