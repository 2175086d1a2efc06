"""Decoded X-ray splits, and how they become tensors for training.

Datasets (plugins) decode their source once into ``uint8`` arrays at
``data.image_size`` (cached by ``rwft.core.cache``); everything downstream, the
training engine, the Flower client and Ray trials, works from these arrays.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True)
class ImageSplit:
    """One split: ``images`` uint8 ``(N, H, W)`` grayscale, ``labels`` int64 ``(N,)``."""

    images: np.ndarray
    labels: np.ndarray

    def __post_init__(self) -> None:
        if self.images.ndim != 3 or self.images.dtype != np.uint8:
            raise ValueError(f"images must be uint8 (N, H, W), got {self.images.dtype} {self.images.shape}")
        if self.labels.shape != (len(self.images),):
            raise ValueError(f"labels shape {self.labels.shape} does not match {len(self.images)} images")

    def __len__(self) -> int:
        return len(self.labels)

    def class_counts(self, num_classes: int) -> list[int]:
        return np.bincount(self.labels, minlength=num_classes).tolist()

    def subset(self, index: np.ndarray) -> "ImageSplit":
        return ImageSplit(self.images[index], self.labels[index])


@dataclass(frozen=True)
class DatasetSplits:
    """What a dataset factory returns (see ``hookspecs.register_datasets``)."""

    train: ImageSplit
    val: ImageSplit
    test: ImageSplit
    class_names: tuple[str, ...]
    source: str  # where the data came from, for logs (never sent off-site)
    skipped: tuple[str, ...] = field(default=())  # files left out with data.on_bad_file=skip, with reasons

    @property
    def num_classes(self) -> int:
        return len(self.class_names)
