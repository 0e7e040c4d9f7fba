"""The CIFAR ResNet-18 of the paper's official code (``resnet18_cifar``); BackdoorBench's ``resnet18`` is
torchvision's (bdsafety.models.zoo)."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from .base import FeatureHeadMixin


class CifarBasicBlock(nn.Module):
    """Post-activation basic block; projection shortcut ``shortcut.{0,1}`` = 1x1 conv + BN."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, kernel_size=1, stride=stride, bias=False), nn.BatchNorm2d(planes)
            )
        else:
            self.shortcut = nn.Sequential()

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet18(FeatureHeadMixin, nn.Module):
    """CIFAR ResNet-18 (3x3 stem, no maxpool, head ``linear``), the key layout of the paper's official code.

    The official code pools with a fixed 4x4 window, which equals global average pooling at 32x32;
    adaptive pooling is used here so 64x64 inputs work too (no parameters, same keys).
    """

    classifier_path = "linear"

    def __init__(self, num_classes: int = 10, in_channels: int = 3):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 64, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        in_planes = 64
        for i, (planes, stride) in enumerate(zip((64, 128, 256, 512), (1, 2, 2, 2)), start=1):
            blocks = [CifarBasicBlock(in_planes, planes, stride), CifarBasicBlock(planes, planes, 1)]
            setattr(self, f"layer{i}", nn.Sequential(*blocks))
            in_planes = planes
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.linear = nn.Linear(512, num_classes)
        self.feature_channels = 512

    def features(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        return self.layer4(self.layer3(self.layer2(self.layer1(out))))

    def head(self, z: Tensor) -> Tensor:
        return self.linear(torch.flatten(self.avgpool(z), 1))
