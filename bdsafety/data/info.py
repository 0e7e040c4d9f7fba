"""Static facts about each supported dataset: class count, image size, normalization, train flip."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from bdsafety.errors import DataError


@dataclass(frozen=True)
class DatasetInfo:
    name: str
    num_classes: int
    img_size: tuple  # (H, W, C), BackdoorBench's order
    mean: tuple
    std: tuple
    hflip: bool  # random horizontal flip in the train transform (BackdoorBench: cifar10 only)


DATASETS = {
    "cifar10": DatasetInfo("cifar10", 10, (32, 32, 3), (0.4914, 0.4822, 0.4465), (0.247, 0.243, 0.261), True),
    "cifar100": DatasetInfo("cifar100", 100, (32, 32, 3), (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762), False),
    "gtsrb": DatasetInfo("gtsrb", 43, (32, 32, 3), (0.0, 0.0, 0.0), (1.0, 1.0, 1.0), False),
    "tiny": DatasetInfo("tiny", 200, (64, 64, 3), (0.4802, 0.4481, 0.3975), (0.2302, 0.2265, 0.2262), False),
    # synthetic classes are flip-invariant shapes, so a flip adds nothing but moves a corner trigger to the other corner
    "synthetic": DatasetInfo("synthetic", 10, (32, 32, 3), (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), False),
}


# ImageNet statistics: what torchvision's ImageNet-pretrained backbones were trained with, and what the official fork
# normalises CIFAR-100 and Tiny-ImageNet with (utils/aggregate_block/dataset_and_transform_generate.py,
# BTIDBF/loader.py)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
NORMALIZATIONS = ("dataset", "imagenet")


def normalization_stats(info: DatasetInfo, normalization: str = "dataset") -> tuple[tuple, tuple]:
    """(mean, std) of ``normalization``: 'dataset' = the dataset's own statistics (BackdoorBench's), 'imagenet' =
    ImageNet's (3-channel data only)."""
    if normalization in (None, "dataset"):
        return tuple(info.mean), tuple(info.std)
    if normalization == "imagenet":
        if len(info.mean) != 3:
            raise DataError(f"normalization imagenet needs 3-channel images; {info.name} has {len(info.mean)}")
        return IMAGENET_MEAN, IMAGENET_STD
    raise DataError(f"unknown normalization {normalization!r}; valid: {', '.join(NORMALIZATIONS)}")


def dataset_info(name: str, num_classes: int | None = None, img_size: tuple | None = None) -> DatasetInfo:
    """Info for a named dataset. ``imagefolder`` is user data: its class count and size come from the data."""
    if name in DATASETS:
        return DATASETS[name]
    if name == "imagefolder":
        if num_classes is None or img_size is None:
            raise DataError("imagefolder needs num_classes and img_size (read from the folder)")
        return DatasetInfo("imagefolder", int(num_classes), tuple(img_size), (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), True)
    valid = ", ".join(sorted(list(DATASETS) + ["imagefolder"]))
    raise DataError(f"unknown dataset {name!r}; valid datasets: {valid}")


@dataclass
class CleanData:
    """A clean dataset: uint8 RGB images (N, H, W, 3) before normalization and int64 labels."""

    train_x: np.ndarray
    train_y: np.ndarray
    test_x: np.ndarray
    test_y: np.ndarray
    info: DatasetInfo
    classes: list[str] | None = None
