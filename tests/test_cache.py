"""The decoded-image cache: hits, keys, damage and atomic writes."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from rwft.core.cache import cache_key, cache_root, cached_splits, fingerprint_files
from rwft.core.config import DataConfig
from rwft.core.data import DatasetSplits, ImageSplit

KEY = {"dataset": "toy", "files": "abc", "image_size": 8}


def toy_splits() -> DatasetSplits:
    rng = np.random.default_rng(0)

    def split(n: int) -> ImageSplit:
        return ImageSplit(rng.integers(0, 256, (n, 8, 8), dtype=np.uint8), np.arange(n, dtype=np.int64) % 2)

    return DatasetSplits(split(12), split(0), split(5), ("NORMAL", "PNEUMONIA"), source="toy",
                         skipped=("a.jpeg: broken",))


class CountingBuild:
    def __init__(self) -> None:
        self.calls = 0

    def __call__(self) -> DatasetSplits:
        self.calls += 1
        return toy_splits()


def assert_same(a: DatasetSplits, b: DatasetSplits) -> None:
    for name in ("train", "val", "test"):
        np.testing.assert_array_equal(getattr(a, name).images, getattr(b, name).images)
        np.testing.assert_array_equal(getattr(a, name).labels, getattr(b, name).labels)
    assert (a.class_names, a.source, a.skipped) == (b.class_names, b.source, b.skipped)


def test_second_load_is_a_hit_with_identical_memory_mapped_arrays(tmp_path: Path) -> None:
    build = CountingBuild()
    first = cached_splits(KEY, build, tmp_path)
    second = cached_splits(KEY, build, tmp_path)
    assert build.calls == 1
    assert_same(first, toy_splits())
    assert_same(second, toy_splits())
    assert isinstance(second.train.images, np.memmap)
    entries = [p.name for p in tmp_path.iterdir()]
    assert entries == [f"toy-8px-{cache_key(KEY)[:16]}"]  # no temporary folder left behind


def test_a_different_key_is_a_miss(tmp_path: Path) -> None:
    build = CountingBuild()
    cached_splits(KEY, build, tmp_path)
    cached_splits(KEY | {"image_size": 16}, build, tmp_path)
    cached_splits(KEY | {"files": "abd"}, build, tmp_path)
    assert build.calls == 3


@pytest.mark.parametrize(
    "damage",
    [
        lambda entry: (entry / "train_images.npy").write_bytes((entry / "train_images.npy").read_bytes()[:300]),
        lambda entry: (entry / "test_labels.npy").unlink(),
        lambda entry: (entry / "manifest.json").write_text("{not json"),
        lambda entry: np.save(entry / "val_images.npy", np.zeros((3, 8, 8), np.uint8)),
        lambda entry: np.save(entry / "train_labels.npy", np.full(12, 7, np.int64)),
    ],
    ids=["truncated-images", "missing-labels", "bad-manifest", "wrong-shape", "labels-out-of-range"],
)
def test_a_damaged_entry_is_rebuilt(tmp_path: Path, damage, capsys: pytest.CaptureFixture[str]) -> None:
    build = CountingBuild()
    cached_splits(KEY, build, tmp_path)
    (entry,) = tmp_path.iterdir()
    damage(entry)
    rebuilt = cached_splits(KEY, build, tmp_path)
    assert build.calls == 2
    assert_same(rebuilt, toy_splits())
    assert "is damaged" in capsys.readouterr().err
    assert cached_splits(KEY, build, tmp_path) is not None and build.calls == 2  # and cached again


def test_an_entry_published_meanwhile_by_another_site_is_used(tmp_path: Path) -> None:
    def racing_build() -> DatasetSplits:
        cached_splits(KEY, toy_splits, tmp_path)  # another process finishes writing first
        return toy_splits()

    assert_same(cached_splits(KEY, racing_build, tmp_path), toy_splits())
    assert len(list(tmp_path.iterdir())) == 1  # the loser's temporary folder is gone


def test_an_unwritable_cache_still_returns_the_data(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the cache folder should be")
    splits = cached_splits(KEY, CountingBuild(), blocker / "cache")
    assert_same(splits, toy_splits())
    assert "could not write the decoded-image cache" in capsys.readouterr().err


def test_fingerprint_changes_when_a_file_changes_appears_or_goes(tmp_path: Path) -> None:
    a, b, c = tmp_path / "a.jpeg", tmp_path / "b.jpeg", tmp_path / "c.jpeg"
    for path in (a, b, c):
        path.write_bytes(b"1")
    before = fingerprint_files([a, b])
    assert fingerprint_files([b, a]) == before  # order does not matter
    assert fingerprint_files([a]) != before
    assert fingerprint_files([a, b, c]) != before
    a.write_bytes(b"2")  # same size: the modification time tells
    stat = a.stat()
    os.utime(a, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    assert fingerprint_files([a, b]) != before


def test_cache_root_prefers_config_then_environment_then_home(monkeypatch: pytest.MonkeyPatch,
                                                              tmp_path: Path) -> None:
    monkeypatch.setenv("RWFT_CACHE_DIR", str(tmp_path / "env"))
    assert cache_root(DataConfig(cache_dir=str(tmp_path / "cfg"))) == tmp_path / "cfg"
    assert cache_root(DataConfig()) == tmp_path / "env"
    monkeypatch.delenv("RWFT_CACHE_DIR")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert cache_root(DataConfig()) == tmp_path / ".cache" / "rwft"
    assert cache_root(DataConfig(cache_dir="~/x")) == tmp_path / "x"
