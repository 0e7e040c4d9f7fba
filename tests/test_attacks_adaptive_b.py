"""Adap-Blend and Narcissus (issue 25, items 2 and 3): each poisoning rule pinned (pieces dropped at training time and
the full trigger at test time, conservatism samples with their true labels, counts; the Narcissus trigger's L_inf
bound, target-class-only poisoning, unchanged labels, the record-rebuilt trigger), then one tiny end-to-end run of
each whose record loads through the inspector, holds real poisoned samples in bd_train and feeds RA."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from bdsafety.attacks.base import AttackContext, load_data_for, record_trigger
from bdsafety.attacks.narcissus import generate_trigger
from bdsafety.attacks.triggers import apply_additive, apply_blended, make_blend_key, piece_masks
from bdsafety.config import resolve
from bdsafety.errors import ConfigError
from bdsafety.pools import CROSS_KEY, real_poisoned
from bdsafety.registry import get

N_TRAIN, N_TEST = 1000, 100
TINY = ["--dataset", "synthetic", "--model", "cnn_small", "--synthetic_n_train", "300", "--synthetic_n_test", "60",
        "--epochs", "1", "--no_progress", "--device", "cpu", "--eval_batch_size", "256"]


def _attack(name: str, tmp_path, **overrides):
    """An attack instance on a small synthetic set (no training), its config from the schema's defaults."""
    method = get("attack", name)
    cfg = resolve(method.schema(), None, {"dataset": "synthetic", "model": "cnn_small", "synthetic_n_train": N_TRAIN,
                                          "synthetic_n_test": N_TEST, "device": "cpu", **overrides})
    ctx = AttackContext(cfg=cfg, data=load_data_for(cfg), device="cpu", record_root=tmp_path, record_name="r",
                        log=lambda msg: None, progress=False)
    return method.run.attack_class(ctx)


# ------------------------------------------------------------------------------------------- Adap-Blend
def test_piece_masks_drop_whole_cells():
    masks = piece_masks(50, 32, 32, pieces=16, drop=8, rng=np.random.default_rng(0))
    assert masks.shape == (50, 32, 32) and set(np.unique(masks)) == {0.0, 1.0}
    cells = masks.reshape(50, 4, 8, 4, 8).mean(axis=(2, 4))  # each 8x8 cell is all 0 or all 1
    assert set(np.unique(cells)) == {0.0, 1.0} and (cells.sum(axis=(1, 2)) == 8).all()
    assert len({m.tobytes() for m in masks}) > 40  # a fresh draw per mask
    with pytest.raises(ValueError, match="square number"):
        piece_masks(1, 32, 32, pieces=15, drop=2)


def test_adaptive_blend_drops_pieces_at_training_and_uses_the_full_trigger_at_test(tmp_path):
    atk = _attack("adaptive_blend", tmp_path)
    atk.prepare()
    x = np.full((6, 32, 32, 3), 100, np.uint8)
    idx = np.arange(10, 16)
    train = atk.apply(x, split="train", indices=idx)
    full_15 = apply_blended(x[:1], atk.key, alpha=0.15)[0]
    for img, mask in zip(train, atk.train_masks(idx)):
        kept = mask.astype(bool)
        assert kept.sum() == 8 * 64  # 8 of the 16 8x8 pieces carry the trigger
        assert (img[~kept] == 100).all()  # dropped pieces: the clean image
        assert np.array_equal(img[kept], full_15[kept])  # kept pieces: the training alpha 0.15
    assert np.array_equal(atk.apply(x[:2], split="train", indices=idx[:2]), train[:2])  # per-index draw: order-free
    test = atk.apply(x, split="test", indices=idx)
    assert (test == apply_blended(x, atk.key, alpha=0.2)).all()  # every piece, the test alpha 0.2
    assert not np.array_equal(test[0], full_15)


def test_adaptive_blend_conservatism_samples_keep_true_labels_and_counts(tmp_path):
    atk = _attack("adaptive_blend", tmp_path, pratio=0.01, cover_rate=0.02)
    atk.prepare()
    split = atk.make_split("train", atk.select_poison())
    cover = atk.cover_idx
    assert len(split) == 10 + 20 and len(cover) == 20  # round(rate * N) of each
    is_cover = np.isin(split.indices, cover)
    poison = split.indices[~is_cover]
    assert len(poison) == 10 and not np.intersect1d(poison, cover).size
    assert (split.bd_labels[~is_cover] == 0).all()  # dirty label, target 0
    d = atk.ctx.data
    assert np.array_equal(split.bd_labels[is_cover], d.train_y[cover])  # conservatism: the TRUE label
    assert (d.train_y[cover] != 0).any()
    assert np.array_equal(split.images[is_cover], atk.apply(d.train_x[cover], split="train", indices=cover))
    info = atk.info()
    assert info[CROSS_KEY] == cover.tolist()
    assert real_poisoned(split, info).indices.tolist() == poison.tolist()  # RA / QRA / EP never get a cover sample
    clean = _attack("adaptive_blend", tmp_path, pratio=0.0)
    clean.prepare()
    assert len(clean.make_split("train", clean.select_poison())) == 0  # the clean reference has no cover samples
    rebuilt = record_trigger({"attack": "adaptive_blend", **info, "img_size": (32, 32, 3)})
    assert np.array_equal(rebuilt(d.test_x[:5]), atk.apply(d.test_x[:5], split="test", indices=np.arange(5)))


# ------------------------------------------------------------------------------------------- Narcissus
def test_additive_trigger_respects_the_linf_bound():
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (8, 32, 32, 3), dtype=np.uint8)
    pattern = rng.uniform(-16, 16, (32, 32, 3)).astype(np.float32)
    pattern[0, 0] = [16, -16, 16]
    for scale, bound in ((1.0, 16), (3.0, 48)):
        out = apply_additive(x, pattern, scale)
        assert out.dtype == np.uint8 and np.abs(out.astype(int) - x.astype(int)).max() <= bound
    mid = np.full((1, 32, 32, 3), 128, np.uint8)
    assert apply_additive(mid, pattern, 1.0)[0, 0, 0].tolist() == [144, 112, 144]  # reaches the bound exactly


def test_trigger_generation_stays_in_the_ball_and_pulls_towards_the_target():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 3))
    images = torch.randint(0, 256, (40, 3, 8, 8), dtype=torch.uint8)
    norm = lambda x: x * 2 - 1  # noqa: E731
    eps = 16 / 255
    with torch.no_grad():
        before = torch.nn.functional.cross_entropy(model(norm(images.float() / 255)), torch.full((40,), 2)).item()
    delta, losses = generate_trigger(model, norm, images, 2, eps=eps, rounds=30, lr=0.05, batch_size=16, hflip=True,
                                     generator=torch.Generator().manual_seed(0))
    assert delta.shape == (1, 3, 8, 8) and float(delta.abs().max()) <= eps + 1e-7
    assert float(delta.abs().max()) == pytest.approx(eps)  # the budget is used
    assert losses[-1] < before and all(p.requires_grad for p in model.parameters())


def test_narcissus_poisons_target_class_images_only_with_labels_unchanged(tmp_path):
    atk = _attack("narcissus", tmp_path, pratio=0.005)
    atk.pattern = np.random.default_rng(1).uniform(-16, 16, (32, 32, 3)).astype(np.float32)
    split = atk.make_split("train", atk.select_poison())
    d = atk.ctx.data
    assert len(split) == 5 and (d.train_y[split.indices] == 0).all()
    assert np.array_equal(split.bd_labels, split.orig_labels)  # clean label
    assert np.abs(split.images.astype(int) - d.train_x[split.indices].astype(int)).max() <= 16
    test = atk.make_split("test", atk.test_poison_indices())
    assert (test.orig_labels != 0).all() and (test.bd_labels == 0).all()
    assert np.array_equal(test.images, apply_additive(d.test_x[test.indices], atk.pattern, 3.0))  # magnified x3
    atk.surrogate_cache = atk.trigger_cache = "x"
    atk.gen_losses = [1.0]
    rebuilt = record_trigger({"attack": "narcissus", **atk.info()})  # QRA's retrigger source
    assert np.array_equal(rebuilt(d.test_x[test.indices]), test.images)
    from bdsafety.retune.qra import triggered_source_note

    assert triggered_source_note("narcissus") is None  # the study plan keeps QRA on narcissus records


def test_narcissus_refuses_the_victims_own_data_as_pood(tmp_path):
    atk = _attack("narcissus", tmp_path)
    atk.cfg.dataset, atk.cfg.narcissus_pood = "cifar10", "cifar10"
    with pytest.raises(ConfigError, match="not public"):
        atk.pood_data()


def test_synthetic_pood_drops_the_target_class(tmp_path):
    atk = _attack("narcissus", tmp_path, narcissus_pood="synthetic", narcissus_pood_n=200)
    x, y = atk.pood_data()
    assert x.shape == (200, 32, 32, 3) and set(np.unique(y)) == set(range(9))  # 9 other classes, relabelled 0..8


# ------------------------------------------------------------------------------------------- end to end
def _check_record(tmp_path, name: str, capsys):
    from bdsafety.inspector import main as inspect
    from bdsafety.records import load_attack_record

    assert inspect([str(tmp_path / name)]) == 0
    assert "poisoned      train" in capsys.readouterr().out
    rec = load_attack_record(tmp_path / name)
    data = load_data_for(resolve(get("attack", "badnet").schema(), None,
                                 {"dataset": "synthetic", "synthetic_n_train": 300, "synthetic_n_test": 60}))
    assert rec.bd_train.length == 300 and len(rec.bd_train) > 0
    differs = (rec.bd_train.images != data.train_x[rec.bd_train.indices]).reshape(len(rec.bd_train), -1).any(1)
    assert differs.all()  # real poisoned images, not clean copies
    return rec, data


def _ra_poison_index(tmp_path, name: str) -> np.ndarray:
    get("retune", "ra").main(["--result_file", str(tmp_path / name), "--defense", "none", "--epochs", "1",
                              "--ratio", "0.2", "--poison_num", "2", "--device", "cpu", "--no_progress",
                              "--record_root", str(tmp_path)])
    (f,) = (tmp_path / name).glob("ra/log/poison_index.txt")
    return np.loadtxt(f, dtype=np.int64, ndmin=1)


@pytest.mark.slow
def test_adaptive_blend_end_to_end(tmp_path, capsys):
    get("attack", "adaptive_blend").main(TINY + ["--record_root", str(tmp_path), "--save_folder_name", "ab",
                                                 "--pratio", "0.03", "--cover_rate", "0.03"])
    rec, data = _check_record(tmp_path, "ab", capsys)
    cover = np.asarray(rec.info[CROSS_KEY])
    assert len(rec.bd_train) == 18 and len(cover) == 9
    is_cover = np.isin(rec.bd_train.indices, cover)
    assert np.array_equal(rec.bd_train.bd_labels[is_cover], rec.bd_train.orig_labels[is_cover])
    assert (rec.bd_train.bd_labels[~is_cover] == 0).all()
    full = apply_blended(data.test_x[rec.bd_test.indices], make_blend_key(32, 32, 3, 0), alpha=0.2)
    assert np.array_equal(rec.bd_test.images, full)
    used = _ra_poison_index(tmp_path, "ab")
    assert len(used) == 2 and np.isin(used, rec.bd_train.indices[~is_cover]).all()  # RA: real poisoned, no cover


@pytest.mark.slow
def test_narcissus_end_to_end(tmp_path, capsys):
    get("attack", "narcissus").main(TINY + ["--record_root", str(tmp_path), "--save_folder_name", "nc",
                                            "--pratio", "0.02", "--narcissus_pood", "synthetic",
                                            "--narcissus_pood_n", "300", "--narcissus_surrogate_epochs", "1",
                                            "--narcissus_warmup_epochs", "1", "--narcissus_gen_rounds", "10",
                                            "--narcissus_gen_lr", "0.05"])
    rec, data = _check_record(tmp_path, "nc", capsys)
    assert len(rec.bd_train) == 6 and (rec.bd_train.orig_labels == 0).all()
    assert np.array_equal(rec.bd_train.bd_labels, rec.bd_train.orig_labels)
    assert np.abs(rec.bd_train.images.astype(int) - data.train_x[rec.bd_train.indices].astype(int)).max() <= 16
    assert np.array_equal(record_trigger(rec.info)(data.test_x[rec.bd_test.indices]), rec.bd_test.images)
    assert len(list((tmp_path / ".cache" / "narcissus").glob("*.pt"))) == 2  # surrogate + trigger, cached
    used = _ra_poison_index(tmp_path, "nc")
    assert len(used) == 2 and np.isin(used, rec.bd_train.indices).all()
