"""The features/head split every registered model follows."""
from __future__ import annotations

from torch import Tensor


class FeatureHeadMixin:
    """``forward(x) == head(features(x))``.

    Subclasses provide ``features`` (method or submodule: a 4-D (N, C, H, W) map, the input of the pooling before
    the classifier; ViTs: the class token as (N, C, 1, 1)), ``head(z)`` (pool -> flatten -> classifier),
    ``classifier_path`` (dotted name of the final classification layer: an ``nn.Linear``, or squeezenet's 1x1
    ``nn.Conv2d``) and ``feature_channels`` (C of the feature map).
    """

    classifier_path: str
    feature_channels: int

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))
