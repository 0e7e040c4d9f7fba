"""Tiny models shared by the unit tests (one place, so that tests of different defenses use the same one)."""
import torch
from torch import nn


class ConvBN(nn.Module):
    """conv(3 -> 4) -> BN -> ReLU -> global mean -> linear(4 -> 3): the smallest model with a BN layer."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        return self.fc(torch.relu(self.bn(self.conv(x))).mean((2, 3)))
