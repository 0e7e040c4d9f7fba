"""Parameter-space-limited injection: an option of the attack scaffold (``--param_limit``), not one more attack.

After Grond's Adversarial Backdoor Injection (ABI; Xu et al., "Towards Backdoor Stealthiness in Model Parameter
Space", arXiv 2501.05928), as its text describes the mechanism: ordinary poisoning makes a few neurons carry the
backdoor, and those neurons stand out in parameter space (their trigger-activated change, TAC, is an outlier of
their layer), which is what pruning defenses look for. ABI keeps the backdoor from concentrating: after every
training epoch but the last it finds those outlier neurons and resets them, so the next epochs must spread the
backdoor over many neurons with small changes each (after the last epoch it only measures, so the record's metrics
are those of the model it saves). This is this project's reading of the paper's text, not its code:

  TAC of output channel k of a conv layer = the mean over the poisoned training samples x' (and their clean
  originals x) of || a_k(x') - a_k(x) ||_2 over the channel's feature map (Zheng et al., NeurIPS 2022)
  flagged in a layer: TAC_k > mean + u * std of that layer's TACs (the outlier rule CLP-style defenses use; u =
  ``abi_u``)
  reset: a flagged channel's filter (and bias) is set to the mean filter of its layer

``param_limit: none`` (the default) trains as the attack always does. ``tac_outliers`` is the same statistic as a
measurement (the largest z-score of any channel's TAC within its layer): how prominent the backdoor's neurons are.
"""
from __future__ import annotations

import numpy as np
import torch

from bdsafety.config import POS_INT, POSITIVE, Option
from bdsafety.data.device import DeviceDataset, iterate_batches

PARAM_LIMITS = ("none", "abi")

PARAM_LIMIT_SCHEMA = {
    "param_limit": Option("none", "parameter-space-limited injection: 'none' (train as the attack does) or 'abi' "
                                  "(after Grond's adversarial backdoor injection: after every epoch but the last, "
                                  "reset the conv channels whose trigger-activated change is an outlier of their "
                                  "layer; bdsafety/attacks/param_limit.py)",
                          choices=PARAM_LIMITS, neutral=True),
    "abi_u": Option(3.0, "param_limit abi: a channel is reset when its TAC exceeds its layer's mean + abi_u std",
                    check=POSITIVE, neutral=True),
    "abi_samples": Option(256, "param_limit abi: poisoned training samples (with their clean originals) the TAC is "
                               "measured on", check=POS_INT, neutral=True),
}


def _convs(model: torch.nn.Module) -> list[tuple[str, torch.nn.Conv2d]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, torch.nn.Conv2d) and m.groups == 1]


@torch.no_grad()
def channel_tac(model: torch.nn.Module, clean, poisoned, norm, batch_size: int = 256) -> dict[str, torch.Tensor]:
    """{conv layer name: TAC per output channel} of ``model`` (eval mode) over paired DeviceDatasets ``clean`` and
    ``poisoned`` (the same samples without and with the trigger, same order)."""

    convs = _convs(model)
    acts: dict[str, torch.Tensor] = {}
    hooks = [m.register_forward_hook(lambda _m, _i, out, n=n: acts.__setitem__(n, out.float())) for n, m in convs]
    was_training = model.training
    model.eval()
    total = {n: torch.zeros(m.out_channels, device=clean.device) for n, m in convs}
    try:
        for (xc, _, _), (xp, _, _) in zip(iterate_batches(clean, batch_size), iterate_batches(poisoned, batch_size)):
            model(norm.from_uint8(xc))
            a_clean = dict(acts)
            model(norm.from_uint8(xp))
            for n in total:  # || a_k(x') - a_k(x) ||_2 over the feature map, summed over the batch
                total[n] += (acts[n] - a_clean[n]).flatten(2).norm(dim=2).sum(0)
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    return {n: t / max(1, len(clean)) for n, t in total.items()}


def tac_zscores(tac: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Per layer: each channel's TAC as a z-score within its layer (0 where the layer's TACs do not vary)."""
    out = {}
    for n, t in tac.items():
        sd = t.std() if len(t) > 1 else None
        out[n] = (t - t.mean()) / sd if sd is not None and float(sd) > 0 else torch.zeros_like(t)
    return out


def _largest(z: dict[str, torch.Tensor]) -> float:
    return max((float(v.max()) for v in z.values() if len(v)), default=0.0)


def tac_outliers(tac: dict[str, torch.Tensor]) -> float:
    """The largest within-layer z-score of any channel's TAC: how far the backdoor's most prominent neuron stands
    out."""
    return _largest(tac_zscores(tac))


@torch.no_grad()
def reset_channels(model: torch.nn.Module, flagged: dict[str, torch.Tensor]) -> int:
    """Set each flagged output channel's filter (and bias) to the mean filter of its layer; the number reset."""
    mods = dict(_convs(model))
    n = 0
    for name, mask in flagged.items():
        if not bool(mask.any()):
            continue
        conv = mods[name]
        conv.weight[mask] = conv.weight.mean(0, keepdim=True).expand_as(conv.weight)[mask]
        if conv.bias is not None:
            conv.bias[mask] = conv.bias.mean()
        n += int(mask.sum())
    return n


class ABI:
    """The epoch hook of ``param_limit: abi``: after every epoch but the last, measure the TAC on the paired samples
    and reset the outlier channels; after the last, measure only (the epoch's test metrics, computed before the hook,
    are then those of the model the record saves). ``history``: per epoch, channels reset and the TAC outlier score
    before the reset."""

    def __init__(self, model, clean, poisoned, norm, u: float, epochs: int, log=None):
        self.model, self.clean, self.poisoned, self.norm, self.u, self.log = model, clean, poisoned, norm, u, log
        self.epochs = epochs
        self.history: list[dict] = []

    def __call__(self, epoch: int, row: dict) -> None:
        tac = channel_tac(self.model, self.clean, self.poisoned, self.norm)
        z = tac_zscores(tac)
        before = _largest(z)
        last = epoch >= self.epochs
        n = 0 if last else reset_channels(self.model, {k: v > self.u for k, v in z.items()})
        self.history.append({"epoch": int(epoch), "reset": n, "tac_outlier": round(before, 4)})
        if self.log is not None:
            self.log(f"abi epoch {epoch}: {n} channel(s) reset (largest TAC z-score {before:.2f} > {self.u:g})")


def abi_pairs(attack, bd_train, n: int, seed: int):
    """(clean, poisoned) DeviceDatasets of up to ``n`` poisoned training samples and their clean originals."""

    rng = np.random.default_rng(seed)
    take = np.sort(rng.choice(len(bd_train.indices), min(n, len(bd_train.indices)), replace=False))
    d, dev, g = attack.ctx.data, attack.ctx.device, attack.geometry
    idx = bd_train.indices[take]
    clean = DeviceDataset(d.train_x[idx], d.train_y[idx], dev, geometry=g)
    poisoned = DeviceDataset(bd_train.images[take], bd_train.bd_labels[take], dev, geometry=g)
    return clean, poisoned
