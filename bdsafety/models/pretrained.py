"""Pretrained backbones: ``--pretrained FILE`` or ``--pretrained <torchvision weights name>``.

The backbone comes from the weights; the classifier (and the auxiliary classifiers of inception_v3/googlenet)
keeps the fresh initialisation of a ``num_classes`` model, as BackdoorBench (``heads.head = nn.Linear(...)``
after loading ImageNet weights; convnext's ``partially_load_state_dict``) and the paper (ImageNet ResNets with a
new ``fc``) do. Nothing is downloaded: a weights name is looked up in the local torch cache
(``torch.hub.get_dir()/checkpoints/``, where torchvision itself stores downloads), and the error says where to
put the file when it is not there.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

from bdsafety.errors import ConfigError, DataError
from bdsafety.models.zoo import ZOO
from bdsafety.safeio import RecordError, safe_torch_load


def _torchvision_weights(arch: str, source: str):
    """The torchvision ``Weights`` entry named by ``source`` ('DEFAULT', 'IMAGENET1K_V1' or 'ResNet18_Weights.X')
    for architecture ``arch``; None when ``source`` is not a weights name."""
    import torchvision  # lazy: torchvision only for pretrained weights

    if arch not in ZOO:
        return None
    try:
        enum = torchvision.models.get_model_weights(ZOO[arch][0])
    except (ValueError, KeyError):
        return None
    name = source.split(".", 1)[1] if source.startswith(enum.__name__ + ".") else source
    if name in ("DEFAULT", "default"):
        return enum.DEFAULT
    return enum.__members__.get(name)


def weights_cache_path(weights) -> Path:
    """Where torchvision keeps a downloaded weights file: <torch hub dir>/checkpoints/<file name of its url>."""
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(weights.url)


def read_state_dict(path: Path) -> dict:
    """A state_dict from a weights file: a plain state_dict, a checkpoint's ['state_dict'], or a BackdoorBench
    result's ['model'] (safe loading: tensors and numpy values only)."""

    try:
        obj = safe_torch_load(path)
    except RecordError as e:
        raise DataError(f"--pretrained: {e}") from None
    if isinstance(obj, dict) and not any(isinstance(v, torch.Tensor) for v in obj.values()):
        for key in ("state_dict", "model"):
            if isinstance(obj.get(key), dict):
                return obj[key]
    if not isinstance(obj, dict):
        raise DataError(f"--pretrained {path} holds a {type(obj).__name__}, not a state_dict")
    return obj


def resolve_pretrained(arch: str, source: str) -> Path:
    """The local file ``source`` names: an existing path, or a torchvision weights name found in the torch cache."""
    path = Path(os.path.expanduser(str(source)))
    if path.is_file():
        return path
    weights = _torchvision_weights(arch, str(source))
    if weights is None:

        if arch in ZOO:
            import torchvision  # lazy: torchvision only for pretrained weights

            names = ", ".join(["DEFAULT"] + list(torchvision.models.get_model_weights(ZOO[arch][0]).__members__))
            hint = f"a torchvision weights name of {arch} ({names})"
        else:
            hint = f"no torchvision weights exist for {arch}"
        raise ConfigError(f"--pretrained {source}: no such file, and not a weights name ({hint}); give a local "
                          f"weights file (a state_dict saved with torch.save)")
    cached = weights_cache_path(weights)
    if not cached.is_file():
        raise ConfigError(
            f"--pretrained {source}: torchvision weights {type(weights).__name__}.{weights.name} are not in the local "
            f"torch cache and nothing is downloaded here. Download {weights.url} on a machine with internet and place "
            f"it at {cached} (the torch hub dir is set by $TORCH_HOME), or pass the file's path: "
            f"--pretrained /path/to/file.pth"
        )
    return cached
