import numpy as np
import pytest

from bdsafety.attacks.poison import backdoor_labels, select_test_poison, select_train_poison
from bdsafety.attacks.triggers import apply_badnet, apply_blended, badnet_trigger_mask, make_blend_key


def test_badnet_patch_is_3x3_bottom_right_white():
    x = np.zeros((2, 32, 32, 3), np.uint8)
    y = apply_badnet(x)
    assert (y[:, 29:, 29:] == 255).all() and y[:, :29].sum() == 0 and y[:, :, :29].sum() == 0
    assert x.sum() == 0  # input untouched
    assert badnet_trigger_mask(32, 32).sum() == 9


def test_blended_is_alpha_mix_and_key_deterministic():
    key = make_blend_key(32, 32, seed=3)
    assert (np.array_equal(key, make_blend_key(32, 32, seed=3))
            and not np.array_equal(key, make_blend_key(32, 32, seed=4)))
    x = np.full((1, 32, 32, 3), 100, np.uint8)
    y = apply_blended(x, key, alpha=0.2)
    expect = np.clip(0.8 * 100 + 0.2 * key.astype(np.float32), 0, 255).astype(np.uint8)
    assert np.array_equal(y[0], expect)
    with pytest.raises(ValueError, match="does not match"):
        apply_blended(x, key[:16], 0.2)


def test_dirty_label_indices_count_seeded_all_classes():
    y = np.arange(1000) % 10
    a = select_train_poison(y, 0.1, seed=1)
    assert len(a) == 100 and len(set(a)) == 100 and np.all(np.diff(a) > 0)
    assert np.array_equal(a, select_train_poison(y, 0.1, seed=1))
    assert not np.array_equal(a, select_train_poison(y, 0.1, seed=2))
    assert (y[a] == 0).any()  # target class included, as in BackdoorBench


def test_clean_label_draws_from_target_only():
    y = np.arange(1000) % 10
    a = select_train_poison(y, 0.05, clean_label=True, target=3)
    assert len(a) == 50 and (y[a] == 3).all()
    with pytest.raises(ValueError, match="only 100 are eligible"):
        select_train_poison(y, 0.2, clean_label=True, target=3)


def test_zero_poison_is_an_error_but_pratio_zero_is_clean():
    y = np.arange(100) % 10
    with pytest.raises(ValueError, match="poisons 0 of 100"):
        select_train_poison(y, 0.001)
    assert len(select_train_poison(y, 0.0)) == 0


def test_label_transforms_and_test_poison():
    y = np.array([0, 1, 2, 9])
    assert backdoor_labels(y, "all2one", 0, 10).tolist() == [0, 0, 0, 0]
    assert backdoor_labels(y, "all2all", 0, 10).tolist() == [1, 2, 3, 0]
    assert select_test_poison(y, label_trans="all2one", target=0).tolist() == [1, 2, 3]
    assert select_test_poison(y, label_trans="all2all").tolist() == [0, 1, 2, 3]
    with pytest.raises(ValueError):
        backdoor_labels(y, "one2one", 0, 10)
