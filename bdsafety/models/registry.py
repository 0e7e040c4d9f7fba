"""Model registry: name -> constructor, and BackdoorBench-compatible state_dict loading."""
from __future__ import annotations

import difflib
from collections.abc import Mapping, Sequence
from functools import lru_cache
from typing import Callable

import torch
import torch.nn as nn

from bdsafety.errors import ConfigError, DataError

from .preact import PreActResNet18
from .pretrained import read_state_dict, resolve_pretrained
from .resnet import CifarResNet18
from .small import CNNSmall
from .zoo import UNBUILDABLE, ZOO, build_zoo_model, min_input_size


def _native(cls: Callable[..., nn.Module], **kw) -> Callable[[int, int, int | None], nn.Module]:
    """Builder of a model made for its data's own input size (no model_input_size)."""

    def build(n: int, c: int, input_size: int | None) -> nn.Module:
        if input_size is not None:
            raise ConfigError(
                f"model_input_size works with BackdoorBench's torchvision architectures ({', '.join(ZOO)}); "
                f"{cls.__name__} is built for the data's own size: drop model_input_size"
            )
        return cls(n, in_channels=c, **kw)

    return build


def _zoo(name: str) -> Callable[[int, int, int | None], nn.Module]:
    return lambda n, c, input_size: build_zoo_model(name, n, c, input_size)


# name -> builder(num_classes, in_channels, input_size): BackdoorBench's names first (torchvision ones in zoo.py)
_BUILDERS: dict[str, Callable[[int, int, int | None], nn.Module]] = {
    "preactresnet18": _native(PreActResNet18, width=64),
    **{name: _zoo(name) for name in ZOO},
    "resnet18_cifar": _native(CifarResNet18),
    "preactresnet18_narrow": _native(PreActResNet18, width=16),
    "cnn_small": _native(CNNSmall),
    "cnn_tiny": _native(CNNSmall, widths=(16, 32, 64, 128)),  # cnn_small at half width: the 2-core benchmark's model
}

MODEL_NAMES: tuple[str, ...] = tuple(_BUILDERS)


def _check_name(name: str) -> None:
    if name in UNBUILDABLE:
        raise ConfigError(f"model {name!r} cannot be used: {UNBUILDABLE[name]}")
    if name not in _BUILDERS:
        close = difflib.get_close_matches(str(name), MODEL_NAMES, n=3)
        hint = f" (did you mean {' or '.join(map(repr, close))}?)" if close else ""
        raise ConfigError(f"unknown model {name!r}{hint}; valid model names: {', '.join(MODEL_NAMES)}")


def build_model(name: str, num_classes: int, img_size: Sequence[int] = (32, 32, 3), *, input_size: int | None = None,
                pretrained: str | None = None) -> nn.Module:
    """Build a registered model. ``img_size`` is BackdoorBench's (H, W, C) of the data; C sets the input channels.

    ``input_size`` (torchvision architectures only) upsamples every batch on its device to input_size x input_size
    inside ``features``; an image size the architecture cannot take (BackdoorBench's alexnet at 32 px, inception_v3
    below 75 px) is rejected here, before any training, with the smallest size that works. ``pretrained`` loads a
    backbone (local file or torchvision weights name, see :func:`load_pretrained`) and
    keeps the freshly initialised head for ``num_classes``.

    Every model has ``features(x)`` (feature map before pooling), ``head(z)`` and
    ``forward(x) == head(features(x))``; see :func:`classifier_layer` for the final layer.
    """
    _check_name(name)
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
    if (
        len(img_size) != 3
        or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in img_size)
    ):
        raise ValueError(f"img_size must be (H, W, C) with positive ints, e.g. (32, 32, 3); got {img_size!r}")
    if input_size is not None and (isinstance(input_size, bool) or not isinstance(input_size, int) or input_size < 1):
        raise ConfigError(f"model_input_size must be a positive int (e.g. 224), got {input_size!r}")
    if name in ZOO:
        check_input_size(name, tuple(img_size[:2]) if input_size is None else (input_size, input_size))
    model = _BUILDERS[name](num_classes, img_size[2], input_size)
    if pretrained:
        load_pretrained(model, name, pretrained)
    return model


def check_input_size(name: str, hw: tuple[int, int]) -> None:
    """ConfigError if registered model ``name`` cannot take hw-sized inputs (the smallest size torchvision documents
    for the architecture, its weights' ``meta['min_size']``), naming model_input_size as the fix."""
    need = min_input_size(name)
    if need is None or (hw[0] >= need[0] and hw[1] >= need[1]):
        return
    raise ConfigError(
        f"model {name} cannot take {hw[0]}x{hw[1]} inputs: its feature maps shrink to nothing before the classifier "
        f"(torchvision's smallest input for {name} is {need[0]}x{need[1]}). Set model_input_size to {max(need)} or "
        f"more (e.g. 224) to upsample every batch on the device, or use data of that size"
    )


def classifier_layer(model: nn.Module) -> nn.Module:
    """The final classification layer of a registered model (FST re-initialises it in place): an ``nn.Linear``, or
    squeezenet1_0's 1x1 ``nn.Conv2d`` (``weight.shape[1]`` is the fan-in in both cases)."""
    path = getattr(model, "classifier_path", None)
    if path is None:
        raise TypeError(
            f"{type(model).__name__} has no 'classifier_path'; build the model with bdsafety.models.build_model"
        )
    layer = model.get_submodule(path)
    if not (isinstance(layer, nn.Linear) or (isinstance(layer, nn.Conv2d) and layer.kernel_size == (1, 1))):
        raise TypeError(f"{type(model).__name__}.{path} is {type(layer).__name__}, "
                        f"expected nn.Linear or a 1x1 nn.Conv2d")
    return layer


# torchvision >= 0.13 renamed the ViT MLP layers (same shapes, same order); records keep the name they were saved with
VIT_MLP_RENAMES = {".mlp.linear_1.": ".mlp.0.", ".mlp.linear_2.": ".mlp.3."}


def normalize_state_dict(state_dict: Mapping) -> dict[str, torch.Tensor]:
    """A record's state_dict in this registry's key layout. Accepts the variants real BackdoorBench records hold:

    * ``module.`` prefix (saved from ``nn.DataParallel`` by multi-GPU runs): stripped;
    * fine-pruning's ``X.weight_orig`` + ``X.weight_mask`` (``torch.nn.utils.prune``): folded into
      ``X.weight = weight_orig * weight_mask``;
    * ViT MLP names of torchvision < 0.13 (``mlp.linear_1``/``mlp.linear_2``): renamed to ``mlp.0``/``mlp.3``;
    * a ViT saved without BackdoorBench's ``Sequential(Resize, vit)`` wrapper (keys without ``1.``, e.g.
      torchvision's own weights): the ``1.`` prefix is added.
    """
    if not isinstance(state_dict, Mapping):
        raise TypeError(f"expected a state_dict (mapping str -> Tensor), got {type(state_dict).__name__}")
    bad = [k for k, v in state_dict.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise TypeError(
            f"expected a state_dict (mapping str -> Tensor), but {len(bad)} values are not tensors "
            f"(keys {sorted(map(str, bad))[:5]}); for an attack_result.pt / defense_result.pt dict pass its ['model']"
        )
    sd = dict(state_dict)
    prefix = "module."
    if sd and all(k.startswith(prefix) for k in sd):
        sd = {k[len(prefix):]: v for k, v in sd.items()}
    folded: dict[str, torch.Tensor] = {}  # X.weight from X.weight_orig * X.weight_mask
    for k, v in sd.items():
        if k.endswith("_orig") and k[: -len("_orig")] + "_mask" in sd:
            base, mask = k[: -len("_orig")], sd[k[: -len("_orig")] + "_mask"]
            if mask.shape != v.shape:
                raise DataError(f"state_dict: pruning mask {base}_mask has shape {tuple(mask.shape)}, "
                                f"but {k} has {tuple(v.shape)}")
            folded[base] = v * mask.to(v.dtype)
    out: dict[str, torch.Tensor] = {}

    def put(k: str, v: torch.Tensor) -> None:
        for old, new in VIT_MLP_RENAMES.items():
            k = k.replace(old, new)
        out[k] = v

    for k, v in sd.items():
        base = k.rsplit(".", 1)[0] + ".weight"
        if k.endswith(".bias") and base in folded and base not in out:
            put(base, folded[base])  # torch's order: weight before bias (prune appends weight_orig after it)
        if k.endswith("_mask") and k[: -len("_mask")] in folded:
            continue
        if k.endswith("_orig") and k[: -len("_orig")] in folded:
            if k[: -len("_orig")] not in out:
                put(k[: -len("_orig")], folded[k[: -len("_orig")]])
            continue
        put(k, v)
    if "class_token" in out and "encoder.pos_embedding" in out:  # an unwrapped torchvision ViT
        out = {"1." + k: v for k, v in out.items()}
    return out



def infer_num_classes(state_dict: Mapping) -> int:
    """Class count from the final classification layer: the last 2-D ``*.weight`` (or 1x1-conv weight, squeezenet)."""
    sd = normalize_state_dict(state_dict)
    for key in reversed(list(sd)):
        v = sd[key]
        if key.endswith("weight") and (v.ndim == 2 or (v.ndim == 4 and tuple(v.shape[2:]) == (1, 1))):
            return int(v.shape[0])
    raise ValueError("state_dict has no 2-D '*.weight' tensor, so no final linear layer to read num_classes from")


@lru_cache(maxsize=None)
def _signature(name: str, num_classes: int, in_channels: int, input_size: int | None = None) -> tuple:
    """(key, shape) pairs of a registered model, built on the meta device (no memory, no init cost)."""
    with torch.device("meta"):
        model = _BUILDERS[name](num_classes, in_channels, input_size)
    return tuple((k, tuple(v.shape)) for k, v in model.state_dict().items())


def _in_channels(sd: dict) -> int:
    first_conv = next((v for v in sd.values() if v.ndim == 4), None)
    return int(first_conv.shape[1]) if first_conv is not None else 3


def identify_model(state_dict: Mapping, input_size: int | None = None) -> list[str]:
    """Registered names whose keys AND shapes equal this state_dict's (at its own class count; ``input_size``: the
    record's model_input_size, which sets the length of a ViT's positional embedding).

    A record's ``model_name`` can be ambiguous (the paper's fork calls its CIFAR ResNet-18 'resnet18');
    this tells which architecture the weights really are.
    """
    sd = normalize_state_dict(state_dict)
    try:
        num_classes = infer_num_classes(sd)
    except ValueError:
        return []
    in_channels = _in_channels(sd)
    sig = {(k, tuple(v.shape)) for k, v in sd.items()}
    return [n for n in _same_keys(sd) if set(_signature(n, num_classes, in_channels, _size_for(n, input_size))) == sig]


def _size_for(name: str, input_size: int | None) -> int | None:
    """``input_size`` where it changes the weights' shapes (ViT), else None (the shapes do not depend on it)."""

    return input_size if name in ZOO and ZOO[name][1] == "vit" else None


def _same_keys(state_dict: dict) -> list[str]:
    """Registered names with the same key names (shapes ignored; key names do not depend on class count)."""
    return [n for n in MODEL_NAMES if {k for k, _ in _signature(n, 10, 3)} == set(state_dict)]


def closest_models(state_dict: Mapping, n: int = 2) -> list[tuple[str, int, list[str], list[str]]]:
    """The ``n`` registered names whose key sets overlap this state_dict's most (Jaccard):
    (name, shared key count, keys the state_dict lacks, keys it has that the model does not)."""
    sd = normalize_state_dict(state_dict)
    keys = set(sd)
    scored = []
    for name in MODEL_NAMES:
        sig = dict(_signature(name, 10, 3))  # shapes of all but the classifier do not depend on the class count
        shared = keys.intersection(sig)
        same_shape = sum(tuple(sd[k].shape) == sig[k] for k in shared)
        score = (len(shared) / len(keys.union(sig)), same_shape)  # ties (resnet50 / resnext50 keys) broken by shapes
        scored.append((score, name, len(shared), [k for k in sig if k not in keys], [k for k in sd if k not in sig]))
    scored.sort(key=lambda t: (-t[0][0], -t[0][1]))
    return [(name, shared, missing, extra) for _, name, shared, missing, extra in scored[:n]]


def _examples(items: Sequence, n: int = 3) -> str:
    shown = ", ".join(map(str, items[:n]))
    return shown + (", ..." if len(items) > n else "")


def describe_match(state_dict: Mapping) -> str:
    """One sentence on which registered architecture a state_dict is (or is closest to) and what differs."""
    sd = normalize_state_dict(state_dict)
    exact = identify_model(sd)
    if exact:
        n = infer_num_classes(sd)
        names = " or ".join(repr(x) for x in exact)
        return f"This state_dict looks like {names} with {n} classes: build it with build_model({exact[0]!r}, {n})."
    similar = _same_keys(sd)
    if similar:
        names = " or ".join(repr(x) for x in similar)
        return f"Its keys match {names} but some shapes differ (other width or input channels?)."
    parts = []
    for name, shared, missing, extra in closest_models(sd):
        parts.append(f"{name!r} ({shared} of {len(sd)} keys shared; it lacks {len(missing)} of the model's keys"
                     + (f", e.g. {_examples(missing, 2)}" if missing else "")
                     + f"; {len(extra)} keys are not the model's"
                     + (f", e.g. {_examples(extra, 2)}" if extra else "") + ")")
    return "It matches no registered model; closest: " + "; ".join(parts) + "."


def key_mismatch(own: Mapping, sd: Mapping, skip: set | frozenset = frozenset()) -> str:
    """How ``sd`` differs from the model's state_dict ``own`` (keys in ``skip`` ignored on both sides): missing keys,
    unexpected keys and shape mismatches, a few of each named; "" when they fit."""
    missing = [k for k in own if k not in skip and k not in sd]
    unexpected = [k for k in sd if k not in skip and k not in own]
    wrong = [f"{k}: model {tuple(own[k].shape)} vs state_dict {tuple(sd[k].shape)}"
             for k in own if k not in skip and k in sd and own[k].shape != sd[k].shape]
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing keys (e.g. {_examples(missing)})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected keys (e.g. {_examples(unexpected)})")
    if wrong:
        parts.append(f"{len(wrong)} shape mismatches (e.g. {_examples(wrong, 2)})")
    return "; ".join(parts)


def load_state_dict_compat(model: nn.Module, state_dict: Mapping) -> nn.Module:
    """Load strictly after :func:`normalize_state_dict`; on mismatch raise DataError naming the problem and the
    registered model the state_dict looks like (or the closest ones and what differs). Returns ``model``."""
    sd = normalize_state_dict(state_dict)
    problems = key_mismatch(model.state_dict(), sd)
    if problems:
        msg = f"state_dict does not fit {getattr(model, 'arch', type(model).__name__)}: {problems}."
        raise DataError(msg + " " + describe_match(sd))
    model.load_state_dict(sd, strict=True)
    return model


def load_pretrained(model: nn.Module, arch: str, source: str) -> nn.Module:
    """Load a backbone into ``model`` (a freshly built ``arch``) from ``source``; the classifier layers keep their
    fresh initialisation. Raises ConfigError/DataError naming the file and, when the weights belong to another
    architecture, the architecture they look like."""
    path = resolve_pretrained(arch, source)
    sd = normalize_state_dict(read_state_dict(path))
    own = model.state_dict()
    heads = (model.classifier_path, *getattr(model, "extra_head_paths", ()))
    classifier_layer(model)  # a registered model
    head_keys = {k for k in own if any(k.startswith(h + ".") for h in heads)}
    backbone = {k: v for k, v in sd.items() if k not in head_keys}
    problems = key_mismatch(own, backbone, skip=head_keys)
    if problems:
        raise DataError(f"--pretrained {path} does not fit {arch}'s backbone (classifier head aside): {problems}. "
                        f"{describe_match(sd)}")
    with torch.no_grad():
        for k, v in backbone.items():
            own[k].copy_(v)
    return model
