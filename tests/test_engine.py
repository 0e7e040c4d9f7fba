"""engine.fit: divergence is an error, not a saved model."""
import math

import pytest
import torch
import torch.nn as nn

from bdsafety import engine
from bdsafety.data.device import DeviceDataset, Normalizer
from bdsafety.data.info import dataset_info
from bdsafety.errors import TrainingDiverged


def _setup(seed=0):
    torch.manual_seed(seed)
    data = DeviceDataset(torch.randint(0, 256, (64, 3, 8, 8), dtype=torch.uint8), torch.randint(0, 10, (64,)))
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 10))
    return data, model, Normalizer(dataset_info("synthetic"))


def test_fit_learns_with_a_sane_lr():
    data, model, norm = _setup()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    rows = engine.fit(model, data, norm=norm, epochs=20, batch_size=16, step_fn=engine.sgd_step(opt), augment=False)
    assert len(rows) == 20 and rows[-1]["train_loss"] < rows[0]["train_loss"]


@pytest.mark.parametrize("lr, what", [(1e6, "diverged"), (1e30, "")])
def test_fit_stops_on_exploding_or_non_finite_loss(lr, what):
    data, model, norm = _setup()
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    with pytest.raises(TrainingDiverged, match="Lower the learning rate") as e:
        engine.fit(model, data, norm=norm, epochs=5, batch_size=16, step_fn=engine.sgd_step(opt), augment=False)
    assert what in str(e.value)


def test_max_loss_is_configurable():
    data, model, norm = _setup()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    with pytest.raises(TrainingDiverged, match="above 0.1"):
        engine.fit(model, data, norm=norm, epochs=2, batch_size=16, step_fn=engine.sgd_step(opt), augment=False,
                   max_loss=0.1)
    assert engine.MAX_LOSS >= 1e3 > math.log(200)  # far above chance-level cross-entropy of any bundled dataset


def test_eval_subset_evaluates_the_curve_on_a_fixed_subset_and_the_ends_on_the_full_sets(monkeypatch):
    """Under eval_subset(n): epoch 0 and the last epoch on the full test sets, the epochs between on the same n
    samples of each set (ASR and RA on the same poisoned subset); outside the block, every evaluation is full."""
    data, model, norm = _setup()
    bd = DeviceDataset(torch.randint(0, 256, (30, 3, 8, 8), dtype=torch.uint8), torch.zeros(30, dtype=torch.long))
    sets = engine.EvalSets(data, bd, torch.arange(30) % 10)
    seen = []
    real = engine._test_metrics

    def spy(model, s, norm, batch_size):
        seen.append((len(s.clean), len(s.bd), len(s.bd_orig_y), s.bd_orig_y.tolist()))
        return real(model, s, norm, batch_size)

    monkeypatch.setattr(engine, "_test_metrics", spy)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    kw = dict(norm=norm, batch_size=16, step_fn=engine.sgd_step(opt), augment=False, evalsets=sets, eval_at_start=True)
    with engine.eval_subset(8):
        engine.fit(model, data, epochs=3, **kw)
    assert [v[:3] for v in seen] == [(64, 30, 30), (8, 8, 8), (8, 8, 8), (64, 30, 30)]
    assert seen[1][3] == seen[2][3]  # the same samples every epoch
    sub = sets.subset(8)
    assert torch.equal(sub.bd.y, bd.y[:0].new_zeros(8)) and sub.bd_orig_y.tolist() == seen[1][3]
    seen.clear()
    engine.fit(model, data, epochs=2, **kw)
    assert [v[:3] for v in seen] == [(64, 30, 30)] * 3
