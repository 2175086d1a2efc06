"""Finding the data, splitting it, and batching it for the training engine."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from rwft.core.config import DataConfig, RwftConfig, load_config
from rwft.core.data import (
    DatasetSplits,
    ImageSplit,
    apportion,
    class_count_table,
    iterate_batches,
    load_splits,
    num_batches,
    resolve_data_root,
    stratified_split,
)
from rwft.core.errors import ConfigError, DataError, PluginError
from rwft.core.plugins import KINDS, Registration, Registries, Registry

CPU = torch.device("cpu")


def toy_split(n: int, size: int = 8) -> ImageSplit:
    images = (np.arange(n * size * size) % 256).astype(np.uint8).reshape(n, size, size)
    return ImageSplit(images, (np.arange(n) % 3 == 0).astype(np.int64))


# --- where the data is -----------------------------------------------------------------

def test_resolve_prefers_data_root_then_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("RWFT_DATA_DIR", str(tmp_path))
    given = tmp_path / "site"
    given.mkdir()
    assert resolve_data_root(DataConfig(root=str(given))) == given
    assert resolve_data_root(DataConfig()) == tmp_path
    monkeypatch.delenv("RWFT_DATA_DIR")
    assert resolve_data_root(DataConfig()) is None


def test_resolve_expands_home(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "xrays").mkdir()
    assert resolve_data_root(DataConfig(root="~/xrays")) == tmp_path / "xrays"


def test_resolve_missing_path_names_it_and_its_origin(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    with pytest.raises(DataError, match=re.escape(f"data.root={tmp_path / 'nope'} does not exist")):
        resolve_data_root(DataConfig(root=str(tmp_path / "nope")))
    monkeypatch.setenv("RWFT_DATA_DIR", str(tmp_path / "gone"))
    with pytest.raises(DataError, match=r"\$RWFT_DATA_DIR=.*gone does not exist"):
        resolve_data_root(DataConfig())


# --- splitting -------------------------------------------------------------------------

def test_stratified_split_is_stratified_exact_disjoint_and_seeded() -> None:
    labels = np.array([0] * 300 + [1] * 700)
    keep, holdout = stratified_split(labels, 0.2, seed=0)
    assert len(holdout) == 200 and np.bincount(labels[holdout]).tolist() == [60, 140]
    assert np.array_equal(np.sort(np.concatenate([keep, holdout])), np.arange(1000))
    again_keep, again_holdout = stratified_split(labels, 0.2, seed=0)
    assert np.array_equal(again_holdout, holdout) and np.array_equal(again_keep, keep)
    assert not np.array_equal(stratified_split(labels, 0.2, seed=1)[1], holdout)


def test_stratified_split_keeps_every_splittable_class_on_both_sides() -> None:
    labels = np.array([0] * 2 + [1] * 100 + [2])
    keep, holdout = stratified_split(labels, 0.05, seed=0)
    assert set(labels[holdout]) == {0, 1}  # the class of 2 gives one each side; the singleton stays in keep
    assert set(labels[keep]) == {0, 1, 2}
    with pytest.raises(ValueError, match="fraction"):
        stratified_split(labels, 1.0, seed=0)


def test_apportion_sums_exactly_and_follows_weights() -> None:
    parts = apportion(10, [1, 1, 1])
    assert parts.sum() == 10 and sorted(parts.tolist()) == [3, 3, 4]
    assert apportion(100, [0.5, 0.3, 0.2]).tolist() == [50, 30, 20]


def test_class_count_table_has_totals() -> None:
    table = class_count_table("split", [("train", [3, 7]), ("test", [1, 2])], ("NORMAL", "PNEUMONIA"))
    lines = table.splitlines()
    assert lines[0].split() == ["split", "NORMAL", "PNEUMONIA", "total"]
    assert lines[-1].split() == ["all", "4", "9", "13"]


# --- load_splits -----------------------------------------------------------------------

def registries_with(factory) -> Registries:
    registries = Registries(*(Registry(kind) for kind in KINDS))
    registries.datasets.add(Registration("fake", factory, "test_plugin", "a test dataset"))
    return registries


def fake_factory(calls: list, size: int = 8, skipped: tuple[str, ...] = ()):
    def factory(data: DataConfig, *, seed: int) -> DatasetSplits:
        calls.append((data, seed))
        return DatasetSplits(toy_split(300, size), toy_split(30, size), toy_split(40, size),
                             ("NORMAL", "PNEUMONIA"), source="fake", skipped=skipped)
    return factory


def test_load_splits_hands_the_factory_the_resolved_root_and_seed(monkeypatch: pytest.MonkeyPatch,
                                                                 tmp_path: Path) -> None:
    monkeypatch.setenv("RWFT_DATA_DIR", str(tmp_path))
    calls: list = []
    cfg = load_config(overrides=["data.dataset=fake", "data.image_size=8", "seed=5"])
    splits = load_splits(cfg, registries_with(fake_factory(calls)))
    (data, seed), = calls
    assert isinstance(data, DataConfig) and data.root == str(tmp_path) and seed == 5
    assert len(splits.train) == 300


def test_max_train_images_is_a_stratified_subsample_of_train_only() -> None:
    cfg = load_config(overrides=["data.dataset=fake", "data.image_size=8", "data.max_train_images=60"])
    splits = load_splits(cfg, registries_with(fake_factory([])))
    assert len(splits.train) == 60 and splits.train.class_counts(2) == [40, 20]  # 2:1, as in the 300
    assert (len(splits.val), len(splits.test)) == (30, 40)
    with pytest.raises(ConfigError, match="max_train_images"):
        load_splits(load_config(overrides=["data.dataset=fake", "data.max_train_images=0", "data.image_size=8"]),
                    registries_with(fake_factory([])))


def test_load_splits_prints_skipped_files(capsys: pytest.CaptureFixture[str]) -> None:
    cfg = dataclasses.replace(RwftConfig(), data=DataConfig(dataset="fake", image_size=8))
    load_splits(cfg, registries_with(fake_factory([], skipped=("/site/a.jpeg: not an image",))))
    assert "/site/a.jpeg: not an image" in capsys.readouterr().err


def test_factory_breaking_the_contract_is_named() -> None:
    cfg = load_config(overrides=["data.dataset=fake", "data.image_size=16"])
    with pytest.raises(PluginError, match="dataset 'fake' of plugin 'test_plugin' \\(distribution rwft\\) "
                                          "returned train images of size"):
        load_splits(cfg, registries_with(fake_factory([], size=8)))
    with pytest.raises(PluginError, match="unknown dataset 'nope'"):
        load_splits(load_config(overrides=["data.dataset=nope"]), registries_with(fake_factory([])))


def test_factory_results_are_checked_at_the_plugin_border() -> None:
    cfg = load_config(overrides=["data.dataset=fake", "data.image_size=8"])

    def raising(data, *, seed):
        raise KeyError("train_images")

    with pytest.raises(PluginError, match=r"dataset 'fake' of plugin 'test_plugin' \(distribution rwft\) failed: "
                                          "KeyError"):
        load_splits(cfg, registries_with(raising))
    with pytest.raises(PluginError, match="returned a dict, not a rwft.core.data.DatasetSplits"):
        load_splits(cfg, registries_with(lambda data, *, seed: {"train": None}))


@pytest.mark.parametrize("broken, expected", [
    ("train", "the train split of fake (dataset fake) has no images of class NORMAL"),
    ("test", "the test split of fake (dataset fake) has no images (counts: NORMAL 0, PNEUMONIA 0)"),
])
def test_one_class_or_empty_splits_are_refused_whatever_the_dataset(broken: str, expected: str) -> None:
    def factory(data: DataConfig, *, seed: int) -> DatasetSplits:
        splits = fake_factory([])(data, seed=seed)
        split = splits.train.subset(splits.train.labels == 1) if broken == "train" else ImageSplit.empty(8)
        return dataclasses.replace(splits, **{broken: split})

    cfg = load_config(overrides=["data.dataset=fake", "data.image_size=8"])
    with pytest.raises(DataError) as raised:
        load_splits(cfg, registries_with(factory))
    assert expected in str(raised.value)


# --- batches ---------------------------------------------------------------------------

def test_batches_shapes_dtypes_range_and_partial_last_batch() -> None:
    split = toy_split(70)
    batches = list(iterate_batches(split, 32, shuffle=False, augment=False, generator=None, device=CPU))
    assert num_batches(split, 32) == len(batches) == 3
    assert [len(y) for _, y in batches] == [32, 32, 6]
    x, y = batches[0]
    assert x.shape == (32, 1, 8, 8) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert x.min() >= 0 and x.max() <= 1 and x.max() > 0.9
    np.testing.assert_allclose(x[:, 0].numpy(), split.images[:32] / 255.0, rtol=1e-6)
    np.testing.assert_array_equal(torch.cat([y for _, y in batches]).numpy(), split.labels)


def test_shuffled_pass_visits_every_image_once_reproducibly() -> None:
    split = ImageSplit(np.arange(50, dtype=np.uint8).repeat(4).reshape(50, 2, 2), np.arange(50, dtype=np.int64))

    def order(seed: int) -> list[int]:
        batches = iterate_batches(split, 16, shuffle=True, augment=False,
                                  generator=torch.Generator().manual_seed(seed), device=CPU)
        return torch.cat([y for _, y in batches]).tolist()

    assert sorted(order(0)) == list(range(50))
    assert order(0) == order(0) and order(0) != order(1) and order(0) != list(range(50))


def test_augmented_batches_keep_shape_and_range_and_are_reproducible() -> None:
    split = toy_split(20, size=16)

    def first_batch(seed: int) -> torch.Tensor:
        batches = iterate_batches(split, 20, shuffle=False, augment=True,
                                  generator=torch.Generator().manual_seed(seed), device=CPU)
        return next(batches)[0]

    x = first_batch(0)
    assert x.shape == (20, 1, 16, 16) and x.min() >= 0 and x.max() <= 1
    assert torch.equal(x, first_batch(0))
    assert not torch.allclose(x[:, 0], torch.from_numpy(split.images / 255.0).float(), atol=1e-3)
