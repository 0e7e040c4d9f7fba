"""engine.fit: divergence is an error, not a saved model."""
import math

import pytest
import torch
import torch.nn as nn

from bdsafety import engine
from bdsafety.data.device import DeviceDataset, Normalizer
from bdsafety.data.info import dataset_info


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
    with pytest.raises(engine.TrainingDiverged, match="Lower the learning rate") as e:
        engine.fit(model, data, norm=norm, epochs=5, batch_size=16, step_fn=engine.sgd_step(opt), augment=False)
    assert what in str(e.value)


def test_max_loss_is_configurable():
    data, model, norm = _setup()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    with pytest.raises(engine.TrainingDiverged, match="above 0.1"):
        engine.fit(model, data, norm=norm, epochs=2, batch_size=16, step_fn=engine.sgd_step(opt), augment=False, max_loss=0.1)
    assert engine.MAX_LOSS >= 1e3 > math.log(200)  # far above chance-level cross-entropy of any bundled dataset
