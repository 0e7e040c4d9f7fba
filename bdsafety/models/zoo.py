"""BackdoorBench's torchvision architectures with the features()/head() split.

BackdoorBench v2.2 (``utils/aggregate_block/model_trainer_generate.py``) builds these names with
``torchvision.models.<name>(num_classes=n)`` (ViTs: the ImageNet model with a new ``heads.head`` wrapped in
``nn.Sequential(Resize((224, 224)), vit)``, so every key starts with ``1.``). :class:`TorchvisionNet` adopts the
torchvision model's children as its own, so the state_dict keys, shapes and order are torchvision's, and defines
``features``/``head`` per family (``_FAMILIES``). ``forward(x) == head(features(x))`` always returns the main
logits (also in train mode: the auxiliary heads of inception_v3/googlenet keep their keys but are not used).

What ``features`` is, per family (the input of the pooling that precedes the classifier):
  * CNNs: the last feature map (N, C, H, W) before global pooling (densenet: after ``features.norm5``, before the
    final ReLU; squeezenet: the output of ``features``, before the classifier's dropout + 1x1 conv + ReLU + pool).
  * ViT: the class token after the encoder (and its final LayerNorm) as an (N, hidden_dim, 1, 1) map; ``head``
    flattens it and applies ``1.heads``.
The classifier (``classifier_path``) is the final ``nn.Linear``, except squeezenet's 1x1 ``nn.Conv2d``
``classifier.1``, which is what FST re-initialises there (the classifier's other layers hold no parameters).
For the multi-layer classifiers (alexnet, vgg, mobilenet_v3, convnext) FST's head is the final linear layer only;
the hidden classifier layers count as backbone (BackdoorBench's fine-pruning, in contrast, prunes the classifier's
FIRST linear layer there: the fixture's ``fp_defense_pruned_linear``).

Input size: ``input_size`` (an int, or None for the data's own size) upsamples every batch on its device with
bilinear interpolation (align_corners=False, no antialias: torchvision's tensor ``Resize`` as BackdoorBench's ViT
wrapper runs it) at the start of ``features``, so triggers, augmentation and trigger inversion stay at the data's
resolution. ViTs always resize to their ``image_size`` (224), as BackdoorBench's wrapper does.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from torch import Tensor

from bdsafety.errors import ConfigError

from .base import FeatureHeadMixin


def fit_input(x: Tensor, size: int | None) -> Tensor:
    """Bilinear resize of an (N, C, H, W) batch to size x size on its device (no-op when already that size)."""
    if size is None or (x.shape[-2] == size and x.shape[-1] == size):
        return x
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=False)


class Resize(nn.Module):
    """Parameter-free stand-in for BackdoorBench's ``transforms.Resize((s, s))`` at index ``0`` of its ViT wrapper."""

    def __init__(self, size: int):
        super().__init__()
        self.size = size

    def forward(self, x: Tensor) -> Tensor:
        return fit_input(x, self.size)


def _flatten(z: Tensor) -> Tensor:
    return torch.flatten(z, 1)


def _gap(z: Tensor) -> Tensor:
    return F.adaptive_avg_pool2d(z, (1, 1))


def _mean_hw(z: Tensor) -> Tensor:
    return z.mean([2, 3])


def _relu(z: Tensor) -> Tensor:
    return F.relu(z)


_RESNET = ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4")
_INCEPTION = ("Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3", "maxpool1", "Conv2d_3b_1x1", "Conv2d_4a_3x3",
              "maxpool2", "Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6a", "Mixed_6b", "Mixed_6c", "Mixed_6d",
              "Mixed_6e", "Mixed_7a", "Mixed_7b", "Mixed_7c")
_GOOGLENET = ("conv1", "maxpool1", "conv2", "conv3", "maxpool2", "inception3a", "inception3b", "maxpool3",
              "inception4a", "inception4b", "inception4c", "inception4d", "inception4e", "maxpool4", "inception5a",
              "inception5b")


def _in(path: str, attr: str = "in_features") -> Callable[[nn.Module], int]:
    return lambda net: getattr(net.get_submodule(path), attr)


# family -> (feature steps, head steps, classifier path, feature channels(net), extra head paths)
# A step is a child name or a parameter-free function; "extra head paths" are other layers sized by the class count
# (auxiliary classifiers), which --pretrained also leaves freshly initialised.
_FAMILIES: dict[str, tuple] = {
    "resnet": (_RESNET, ("avgpool", _flatten, "fc"), "fc", _in("fc"), ()),
    "alexnet": (("features",), ("avgpool", _flatten, "classifier"), "classifier.6", lambda net: 256, ()),
    "vgg": (("features",), ("avgpool", _flatten, "classifier"), "classifier.6", lambda net: 512, ()),
    "squeezenet": (("features",), ("classifier", _flatten), "classifier.1", _in("classifier.1", "in_channels"), ()),
    "densenet": (("features",), (_relu, _gap, _flatten, "classifier"), "classifier", _in("classifier"), ()),
    "inception": (_INCEPTION, ("avgpool", "dropout", _flatten, "fc"), "fc", _in("fc"), ("AuxLogits.fc",)),
    "googlenet": (_GOOGLENET, ("avgpool", _flatten, "dropout", "fc"), "fc", _in("fc"), ("aux1.fc2", "aux2.fc2")),
    "shufflenet": (("conv1", "maxpool", "stage2", "stage3", "stage4", "conv5"), (_mean_hw, "fc"), "fc", _in("fc"), ()),
    "mobilenet_v2": (("features",), (_gap, _flatten, "classifier"), "classifier.1", _in("classifier.1"), ()),
    "mobilenet_v3": (("features",), ("avgpool", _flatten, "classifier"), "classifier.3", _in("classifier.0"), ()),
    "mnasnet": (("layers",), (_mean_hw, "classifier"), "classifier.1", _in("classifier.1"), ()),
    "efficientnet": (("features",), ("avgpool", _flatten, "classifier"), "classifier.1", _in("classifier.1"), ()),
    "convnext": (("features",), ("avgpool", "classifier"), "classifier.2", _in("classifier.2"), ()),
}

# BackdoorBench name -> (torchvision builder name, family, keyword arguments BackdoorBench's call implies)
ZOO: dict[str, tuple[str, str, dict]] = {
    "resnet18": ("resnet18", "resnet", {}),
    "resnet34": ("resnet34", "resnet", {}),
    "resnet50": ("resnet50", "resnet", {}),
    "resnext50_32x4d": ("resnext50_32x4d", "resnet", {}),
    "wide_resnet50_2": ("wide_resnet50_2", "resnet", {}),
    "alexnet": ("alexnet", "alexnet", {}),
    "vgg11": ("vgg11", "vgg", {}),
    "vgg16": ("vgg16", "vgg", {}),
    "vgg19": ("vgg19", "vgg", {}),
    "vgg19_bn": ("vgg19_bn", "vgg", {}),
    "squeezenet1_0": ("squeezenet1_0", "squeezenet", {}),
    "densenet121": ("densenet121", "densenet", {}),
    "densenet161": ("densenet161", "densenet", {}),
    # torchvision's defaults without weights: aux_logits=True (so the AuxLogits/aux1/aux2 keys), transform_input=False
    "inception_v3": ("inception_v3", "inception", {"aux_logits": True, "init_weights": True}),
    "googlenet": ("googlenet", "googlenet", {"aux_logits": True, "init_weights": True}),
    "shufflenet_v2_x1_0": ("shufflenet_v2_x1_0", "shufflenet", {}),
    "mobilenet_v2": ("mobilenet_v2", "mobilenet_v2", {}),
    "mobilenet_v3_large": ("mobilenet_v3_large", "mobilenet_v3", {}),
    "mnasnet1_0": ("mnasnet1_0", "mnasnet", {}),
    "efficientnet_b0": ("efficientnet_b0", "efficientnet", {}),
    "efficientnet_b3": ("efficientnet_b3", "efficientnet", {}),
    "convnext_tiny": ("convnext_tiny", "convnext", {}),
    "vit_b_16": ("vit_b_16", "vit", {}),
    "vit_b_32": ("vit_b_32", "vit", {}),
    "vit_l_16": ("vit_l_16", "vit", {}),
    "vit_l_32": ("vit_l_32", "vit", {}),
}

# names BackdoorBench lists but cannot build (generate_cls_model passes num_classes to factories without parameters)
UNBUILDABLE = {
    "resnext29": "BackdoorBench's generate_cls_model calls ResNeXt29_2x64d(num_classes=...), a factory without "
                 "parameters (TypeError), so no BackdoorBench record can hold it",
    "senet18": "BackdoorBench's generate_cls_model calls SENet18(num_classes=...), a factory without parameters "
               "(TypeError), so no BackdoorBench record can hold it",
}


def min_input_size(name: str) -> tuple[int, int] | None:
    """Smallest (H, W) ``name`` can classify, from torchvision's weights metadata (``meta['min_size']``: e.g. alexnet
    63, inception_v3 75, vgg and convnext 32); None for the ViTs, which resize every input to 224, and for names
    outside the zoo."""
    if name not in ZOO or ZOO[name][1] == "vit":
        return None
    h, w = torchvision.models.get_model_weights(ZOO[name][0]).DEFAULT.meta["min_size"]
    return int(h), int(w)


def _replace_first_conv(net: nn.Module, in_channels: int) -> None:
    """Give the stem conv ``in_channels`` inputs (same kernel, stride, padding, bias; kaiming init)."""
    name, conv = next((n, m) for n, m in net.named_modules() if isinstance(m, nn.Conv2d))
    new = nn.Conv2d(in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, conv.dilation,
                    conv.groups, conv.bias is not None)
    nn.init.kaiming_normal_(new.weight, mode="fan_out", nonlinearity="relu")
    if new.bias is not None:
        nn.init.zeros_(new.bias)
    net.set_submodule(name, new)


class TorchvisionNet(FeatureHeadMixin, nn.Module):
    """A torchvision CNN whose children are this module's children (same state_dict), with features()/head()."""

    def __init__(self, arch: str, net: nn.Module, family: str, input_size: int | None = None):
        super().__init__()
        steps, head, self.classifier_path, channels, self.extra_head_paths = _FAMILIES[family]
        self.arch, self.family, self.input_size = arch, family, input_size
        self.feature_channels = int(channels(net))
        self._feature_steps, self._head_steps = steps, head
        for name, child in net.named_children():
            # _modules directly: add_module refuses a child named like the features() method (alexnet, vgg, ...);
            # attribute lookup finds the method, state_dict()/get_submodule() the child
            self._modules[name] = child

    def _run(self, steps, x: Tensor) -> Tensor:
        for step in steps:
            x = self._modules[step](x) if isinstance(step, str) else step(x)
        return x

    def features(self, x: Tensor) -> Tensor:
        return self._run(self._feature_steps, fit_input(x, self.input_size))

    def head(self, z: Tensor) -> Tensor:
        return self._run(self._head_steps, z)


class BackdoorBenchViT(FeatureHeadMixin, nn.Module):
    """BackdoorBench's ``nn.Sequential(Resize((224, 224)), vit)``: children ``0`` (resize) and ``1`` (the ViT)."""

    family = "vit"
    classifier_path = "1.heads.head"
    extra_head_paths = ()

    def __init__(self, arch: str, vit: torchvision.models.VisionTransformer):
        super().__init__()
        self.arch = arch
        self.input_size = vit.image_size
        self.feature_channels = vit.hidden_dim
        self.add_module("0", Resize(vit.image_size))
        self.add_module("1", vit)

    def features(self, x: Tensor) -> Tensor:
        vit = self._modules["1"]
        tokens = vit._process_input(self._modules["0"](x))
        tokens = torch.cat([vit.class_token.expand(tokens.shape[0], -1, -1), tokens], dim=1)
        return vit.encoder(tokens)[:, 0][:, :, None, None]

    def head(self, z: Tensor) -> Tensor:
        return self._modules["1"].heads(torch.flatten(z, 1))


def build_zoo_model(name: str, num_classes: int, in_channels: int = 3, input_size: int | None = None) -> nn.Module:
    """One of ``ZOO`` with ``num_classes`` outputs, as BackdoorBench builds it (random weights)."""
    tv_name, family, kwargs = ZOO[name]
    builder = getattr(torchvision.models, tv_name)
    if family == "vit":
        size, patch = 224 if input_size is None else input_size, int(name.rsplit("_", 1)[1])
        if size % patch:
            raise ConfigError(f"{name} cuts its input into {patch}x{patch} patches: model_input_size must be a "
                              f"multiple of {patch} (BackdoorBench: 224, the default), got {size}")
        # BackdoorBench: the ImageNet model at 224, then heads.head = Linear(hidden_dim, n). Another size changes only
        # the positional embedding's length ((size / patch)^2 + 1 tokens), e.g. 32 for fast tests of the family.
        vit = builder(weights=None, image_size=size)
        vit.heads.head = nn.Linear(vit.hidden_dim, num_classes)
        if in_channels != 3:
            _replace_first_conv(vit, in_channels)
        return BackdoorBenchViT(name, vit)
    net = builder(weights=None, num_classes=num_classes, **kwargs)
    if in_channels != 3:
        _replace_first_conv(net, in_channels)
    return TorchvisionNet(name, net, family, input_size)
