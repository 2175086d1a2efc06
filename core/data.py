"""Decoded X-ray splits: where they come from and how they become tensors for training.

Datasets (plugins) decode their source once into ``uint8`` arrays at
``data.image_size`` (cached by ``rwft.core.cache``); everything downstream, the
training engine, the Flower client and Ray trials, works from these arrays.
``load_splits`` is the one entry point that finds the data, calls the dataset's
factory and applies the run-level options; ``iterate_batches`` turns a split into
training batches without a ``DataLoader`` (the arrays are already in memory, so
worker processes would only add start-up time to every federated round).
"""

from __future__ import annotations

import dataclasses
import math
import os
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import OmegaConf
from PIL import Image

from rwft.core.augment import augment_batch
from rwft.core.config import AugmentConfig, DataConfig, RwftConfig
from rwft.core.errors import ConfigError, DataError, PluginError
from rwft.core.plugins import Registries, call_factory, describe_registration, get_registries

DATA_DIR_ENV = "RWFT_DATA_DIR"


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

    def subset(self, index: np.ndarray) -> ImageSplit:
        return ImageSplit(self.images[index], self.labels[index])

    @staticmethod
    def empty(image_size: int) -> ImageSplit:
        return ImageSplit(np.zeros((0, image_size, image_size), np.uint8), np.zeros(0, np.int64))


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


def resize_square(image: Image.Image, size: int) -> np.ndarray:
    """An 8-bit grayscale PIL image as a ``(size, size)`` uint8 array.

    The aspect ratio is not kept: the whole frame (both lungs, to the edges) stays in
    view, which is how the reference images in ``../shared/data`` were made. Pillow's
    bicubic resize is antialiased when it shrinks (its filter widens with the scale),
    so small training sizes do not alias rib edges into noise.
    """
    if image.size != (size, size):
        image = image.resize((size, size), Image.Resampling.BICUBIC)
    return np.asarray(image, dtype=np.uint8)


def resolve_data_root(data: DataConfig) -> Path | None:
    """The data path to use: ``data.root``, else ``$RWFT_DATA_DIR``, else ``None``.

    ``~`` is expanded and the path made absolute. A path that is given but does not
    exist raises ``DataError`` naming it and where it came from; ``None`` means the
    user gave none (the dataset may then download, or explain how to point at data).
    """
    if data.root:
        raw, origin = data.root, "data.root"
    elif os.environ.get(DATA_DIR_ENV):
        raw, origin = os.environ[DATA_DIR_ENV], f"${DATA_DIR_ENV}"
    else:
        return None
    path = Path(raw).expanduser().absolute()
    if not path.exists():
        raise DataError(f"{origin}={raw} does not exist ({path}). Point it at the dataset's file or "
                        "folder, e.g. data.root=/data/chest_xray or data.root=/data/pneumoniamnist.npz.")
    return path


def dataset_for_path(path: str | os.PathLike[str], default: str) -> str:
    """The built-in dataset that reads ``path``: ``medmnist`` for an ``.npz`` file or a folder
    holding ``pneumoniamnist.npz``, ``chest_xray`` for any other folder, else ``default``."""
    path = Path(path).expanduser()
    if path.suffix.lower() == ".npz" or (path.is_dir() and (path / "pneumoniamnist.npz").is_file()):
        return "medmnist"
    if path.is_dir():
        return "chest_xray" if default == "medmnist" else default
    return default


def stratified_split(labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Split ``range(len(labels))`` into ``(keep_idx, holdout_idx)``, stratified and seeded.

    ``holdout_idx`` holds ``round(fraction * len(labels))`` indices, shared out over
    the classes in proportion to their sizes (largest remainder), so class ratios
    match on both sides. A class with at least two examples has at least one on each
    side; a class with one example stays in ``keep_idx``. The same labels, fraction
    and seed always give the same split. Both index arrays are sorted (sequential
    reads from a memory-mapped cache).
    """
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"fraction must be in (0, 1), got {fraction}")
    labels = np.asarray(labels)
    classes, sizes = np.unique(labels, return_counts=True)
    holdout_sizes = apportion(math.floor(fraction * len(labels) + 0.5), sizes) if len(labels) else sizes
    holdout_sizes = np.where(sizes >= 2, np.clip(holdout_sizes, 1, sizes - 1), 0)

    rng = np.random.default_rng(seed)
    keep, holdout = [np.zeros(0, np.int64)], [np.zeros(0, np.int64)]
    for cls, n_holdout in zip(classes, holdout_sizes):
        members = rng.permutation(np.flatnonzero(labels == cls))
        holdout.append(members[:n_holdout])
        keep.append(members[n_holdout:])
    return np.sort(np.concatenate(keep)), np.sort(np.concatenate(holdout))


def apportion(total: int, weights: Sequence[float] | np.ndarray) -> np.ndarray:
    """``total`` shared out in proportion to ``weights``: integers summing exactly to ``total``.

    Each part is the floor of its exact share, and the units left over go to the
    largest remainders (Hamilton's method), ties to the earlier part.
    """
    weights = np.asarray(weights, dtype=float)
    exact = total * weights / weights.sum()
    parts = np.floor(exact).astype(np.int64)
    parts[np.argsort(-(exact - parts), kind="stable")[:total - parts.sum()]] += 1
    return parts


def class_count_table(first_column: str, rows: Sequence[tuple[str, Sequence[int]]],
                      class_names: Sequence[str]) -> str:
    """Per-class counts as a plain-text table, with a total column and an ``all`` row."""
    header = [first_column, *class_names, "total"]
    sums = np.sum([counts for _, counts in rows], axis=0, dtype=np.int64) if rows else np.zeros(len(class_names), int)
    body = [[name, *map(str, counts), str(sum(counts))] for name, counts in [*rows, ("all", sums.tolist())]]
    widths = [max(len(line[col]) for line in [header, *body]) for col in range(len(header))]
    return "\n".join("  ".join(cell.rjust(width) for cell, width in zip(line, widths)) for line in [header, *body])


def load_data(data: DataConfig, *, seed: int, registries: Registries | None = None) -> DatasetSplits:
    """Resolve ``data.root`` and call the factory registered as ``data.dataset``.

    The factory receives a copy of ``data`` whose ``root`` is the resolved path (or
    ``None``), as the ``register_datasets`` contract promises. Raises ``PluginError``
    if the factory breaks the contract (image size, dtype).
    """
    registration = (registries or get_registries()).datasets.get(data.dataset)
    root = resolve_data_root(data)
    resolved = dataclasses.replace(data, root=None if root is None else str(root))
    splits: DatasetSplits = call_factory(registration, "a rwft.core.data.DatasetSplits",
                                         lambda value: isinstance(value, DatasetSplits), resolved, seed=seed)
    expected = (data.image_size, data.image_size)
    for name in ("train", "val", "test"):
        split: ImageSplit = getattr(splits, name)
        if split.images.shape[1:] != expected:
            raise PluginError(f"{describe_registration(registration)} returned {name} images of size "
                              f"{split.images.shape[1:]}, not data.image_size {expected}.")
        if len(split) and not 0 <= split.labels.min() <= split.labels.max() < splits.num_classes:
            raise PluginError(f"{describe_registration(registration)} returned {name} labels outside 0.."
                              f"{splits.num_classes - 1} for its {splits.num_classes} class names.")
    return splits


def load_splits(cfg: RwftConfig, registries: Registries | None = None, *,
                class_order: Sequence[str] | None = None, site: bool = False) -> DatasetSplits:
    """The train/val/test splits a run trains on, per ``cfg.data`` and ``cfg.seed``.

    Calls the dataset factory (``load_data``), renames classes per ``data.class_map``,
    then puts them in order: the order of ``class_order`` (a checkpoint's class names,
    matched by name; ``rwft.core.classes.aligned``) when given, else negative first and
    positive second (``rwft.core.classes.positive_last``). ``check_splits`` then
    refuses splits training cannot use (``site=True``: a federated site's splits, where
    a missing class is a warning). Last, a seeded, stratified subsample of
    ``data.max_train_images`` training images is kept if set (val and test are never
    subsampled: scores stay comparable). Files left out because of
    ``data.on_bad_file=skip`` are printed to stderr.
    """
    from rwft.core import classes

    data = as_data_config(cfg.data)
    splits = load_data(data, seed=cfg.seed, registries=registries)
    splits = classes.renamed(splits, data.class_map)
    if class_order is not None:
        splits = classes.aligned(splits, class_order)
    else:
        splits = classes.positive_last(splits, data.positive_class)
        check_splits(splits, data.dataset, site=site)
    if data.max_train_images is not None:
        if data.max_train_images < 1:
            raise ConfigError(f"data.max_train_images must be at least 1, got {data.max_train_images}.")
        if data.max_train_images < len(splits.train):
            _, chosen = stratified_split(splits.train.labels, data.max_train_images / len(splits.train), cfg.seed)
            splits = dataclasses.replace(splits, train=splits.train.subset(chosen))
    if splits.skipped:
        print(skipped_report(splits.skipped), file=sys.stderr)
    return splits


def check_splits(splits: DatasetSplits, dataset: str, *, site: bool = False) -> None:
    """Refuse splits a run cannot train and score on, whatever dataset plugin made them.

    Every split must hold images of every class: training needs both classes, the
    threshold is chosen on val and AUROC is undefined on a one-class test. Raises
    ``DataError`` naming the split, the classes and the source. For a federated site
    (``site=True``) a missing class in val or test only warns (the federation scores
    across sites), while an empty train split is still an error.
    """
    for name in ("train", "val", "test"):
        split: ImageSplit = getattr(splits, name)
        counts = split.class_counts(splits.num_classes)
        missing = [cls for cls, count in zip(splits.class_names, counts) if count == 0]
        if not missing:
            continue
        what = "no images" if not len(split) else f"no images of class {', '.join(missing)}"
        message = (f"the {name} split of {splits.source} (dataset {dataset}) has {what} "
                   f"(counts: {', '.join(f'{c} {n}' for c, n in zip(splits.class_names, counts))}). "
                   "Every class needs images in train, val and test: add images, or fix data.class_map / "
                   "the files left out as unreadable.")
        if site and (name != "train" or len(split)):
            print(f"rwft: warning: {message}", file=sys.stderr)
            continue
        raise DataError(message)


def skipped_report(skipped: tuple[str, ...], limit: int | None = 20) -> str:
    """Text listing files left out with ``data.on_bad_file=skip`` (at most ``limit``)."""
    shown = skipped if limit is None else skipped[:limit]
    lines = [f"rwft: left out {len(skipped)} unreadable file(s) (data.on_bad_file=skip):"]
    lines += [f"  {entry}" for entry in shown]
    if len(shown) < len(skipped):
        lines.append(f"  ... and {len(skipped) - len(shown)} more (DatasetSplits.skipped lists them all)")
    return "\n".join(lines)


def as_data_config(data: Any) -> DataConfig:
    """``data`` (a ``DataConfig``, an OmegaConf view of one, or a mapping) as a plain, checked ``DataConfig``."""
    if isinstance(data, DataConfig):
        return data
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(DataConfig), data))


def num_batches(split: ImageSplit, batch_size: int) -> int:
    """How many batches ``iterate_batches`` yields (the last, partial batch included)."""
    return math.ceil(len(split) / batch_size)


def iterate_batches(
    split: ImageSplit,
    batch_size: int,
    *,
    shuffle: bool,
    augment: bool,
    generator: torch.Generator | None,
    device: torch.device,
    augmentation: AugmentConfig | None = None,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Batches ``(x, y)``: x float32 ``(B, 1, H, W)`` in [0, 1] on ``device``, y int64 ``(B,)``.

    Every image appears once per pass; the last batch may be smaller. ``shuffle``
    draws the order from ``generator`` (a CPU generator; ``None`` uses torch's global
    one), and ``augment`` applies ``augment_batch`` (with ``augmentation``'s settings,
    default ``data.augmentation``'s defaults) with the same generator, so a
    seeded generator makes a pass reproducible. The uint8 pixels are moved to the
    device before conversion: a quarter of the transfer, and on a GPU the conversion
    and the augmentation run there.
    """
    order = torch.randperm(len(split), generator=generator) if shuffle else torch.arange(len(split))
    for start in range(0, len(split), batch_size):
        index = order[start:start + batch_size].numpy()
        pixels = torch.from_numpy(split.images[index])
        labels = torch.from_numpy(split.labels[index])
        if device.type == "cuda":
            # Pinned + non_blocking: a blocking copy would wait for the GPU to finish the
            # previous step, so gathering the next batch could not overlap with it.
            pixels, labels = pixels.pin_memory(), labels.pin_memory()
        pixels = pixels.to(device, non_blocking=True)
        labels = labels.to(device, non_blocking=True)
        x = pixels.unsqueeze(1).float().div_(255.0)
        if augment:
            x = augment_batch(x, generator, augmentation)
        yield x, labels
