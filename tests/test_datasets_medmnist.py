"""The medmnist dataset: the real PneumoniaMNIST file, wrong files, and the downloader path."""

from __future__ import annotations

import re
import sys
import types
from pathlib import Path

import numpy as np
import pytest

from rwft.core.config import DataConfig, load_config
from rwft.core.data import load_splits
from rwft.core.errors import DataError
from rwft.plugins.datasets_medmnist import load_medmnist, packaged_npz


def write_npz(path: Path, sizes: tuple[int, int, int] = (20, 6, 8), **replace: np.ndarray) -> Path:
    """A small npz in MedMNIST's layout; ``replace`` overrides (or with None drops) single keys."""
    rng = np.random.default_rng(0)
    arrays = {}
    for split, n in zip(("train", "val", "test"), sizes):
        arrays[f"{split}_images"] = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        arrays[f"{split}_labels"] = (np.arange(n) % 2).astype(np.uint8).reshape(n, 1)
    arrays.update(replace)
    np.savez(path, **{key: value for key, value in arrays.items() if value is not None})
    return path


def test_real_pneumoniamnist_official_split_at_32px(pneumoniamnist_npz: Path) -> None:
    cfg = load_config(overrides=["data.dataset=medmnist", f"data.root={pneumoniamnist_npz}", "data.image_size=32"])
    splits = load_splits(cfg)
    assert splits.class_names == ("NORMAL", "PNEUMONIA")
    assert splits.train.class_counts(2) == [1214, 3494]
    assert splits.val.class_counts(2) == [135, 389]
    assert splits.test.class_counts(2) == [234, 390]
    assert splits.train.images.shape == (4708, 32, 32) and splits.train.images.dtype == np.uint8
    assert splits.train.labels.dtype == np.int64


def test_root_may_be_the_folder_holding_the_file(tmp_path: Path) -> None:
    write_npz(tmp_path / "pneumoniamnist.npz")
    splits = load_medmnist(DataConfig(root=str(tmp_path), image_size=28), seed=0)
    assert (len(splits.train), len(splits.val), len(splits.test)) == (20, 6, 8)


def test_resize_is_antialiased_not_nearest(tmp_path: Path) -> None:
    # A one-pixel checkerboard shrunk to half size must become mid-grey, not stay black/white.
    board = (np.indices((28, 28)).sum(axis=0) % 2 * 255).astype(np.uint8)
    npz = write_npz(tmp_path / "board.npz", train_images=np.stack([board] * 20))
    splits = load_medmnist(DataConfig(root=str(npz), image_size=14), seed=0)
    assert np.all(np.abs(splits.train.images[0].astype(int)[2:-2, 2:-2] - 128) < 20)


@pytest.mark.parametrize(
    ("replace", "expected"),
    [
        ({"val_labels": None}, r"lacks the key\(s\) val_labels"),
        ({"train_images": np.zeros((20, 28, 28), np.float32)}, "train_images is float32"),
        ({"test_images": np.zeros((8, 28, 28, 3), np.uint8)}, r"test_images is uint8 \(8, 28, 28, 3\)"),
        ({"train_labels": np.zeros((19, 1), np.uint8)}, r"train_labels has shape \(19, 1\); train_images has 20"),
        ({"val_labels": np.zeros((6, 14), np.uint8)}, r"val_labels has shape \(6, 14\)"),
        ({"test_labels": np.full((8, 1), -1)}, "test_labels must be non-negative integers"),
    ],
    ids=["missing-key", "float-images", "rgb-images", "label-count", "multi-label", "negative-labels"],
)
def test_wrong_npz_names_file_key_and_fix(tmp_path: Path, replace: dict, expected: str) -> None:
    npz = write_npz(tmp_path / "pneumoniamnist.npz", **replace)
    with pytest.raises(DataError, match=expected) as raised:
        load_medmnist(DataConfig(root=str(npz)), seed=0)
    assert str(npz) in str(raised.value) and "train_images (N, H, W)" in str(raised.value)


@pytest.mark.parametrize("content", [b"not a zip at all", b""], ids=["text", "empty"])
def test_not_an_npz(tmp_path: Path, content: bytes) -> None:
    npz = tmp_path / "pneumoniamnist.npz"
    npz.write_bytes(content)
    with pytest.raises(DataError, match=re.escape(f"{npz} is not a readable npz archive")):
        load_medmnist(DataConfig(root=str(npz)), seed=0)


def test_single_array_npy_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "images.npy"
    np.save(path, np.zeros((3, 28, 28), np.uint8))
    with pytest.raises(DataError, match="holds a single array, not an npz archive"):
        load_medmnist(DataConfig(root=str(path)), seed=0)


def test_folder_without_the_file(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="is a folder without pneumoniamnist.npz"):
        load_medmnist(DataConfig(root=str(tmp_path)), seed=0)


def test_no_root_reads_the_pneumoniamnist_shipped_with_rwft(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setitem(sys.modules, "medmnist", None)  # offline, no downloader: the packaged copy is enough
    splits = load_medmnist(DataConfig(cache_dir=str(tmp_path), image_size=28), seed=0)
    assert Path(splits.source) == packaged_npz() and packaged_npz().parent.name == "data"
    assert (len(splits.train), len(splits.val), len(splits.test)) == (4708, 524, 624)
    assert splits.class_names == ("NORMAL", "PNEUMONIA")
    assert (packaged_npz().parent / "CC-BY-4.0.txt").is_file() and (packaged_npz().parent / "README.txt").is_file()


def test_larger_size_without_medmnist_package_says_exactly_what_to_do(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "medmnist", None)  # makes `import medmnist` fail
    with pytest.raises(DataError) as raised:
        load_medmnist(DataConfig(medmnist_size=64), seed=0)
    assert ("pass data.root=/path/to/pneumoniamnist.npz or set RWFT_DATA_DIR, or `pip install 'rwft[medmnist]'` "
            "to download it") in str(raised.value)


def test_no_root_downloads_with_the_medmnist_package(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    calls = []

    class PneumoniaMNIST:  # stands in for medmnist's class: download=True writes ROOT/pneumoniamnist_SIZE.npz
        def __init__(self, split: str, download: bool, root: str, size: int) -> None:
            calls.append((split, download, root, size))
            write_npz(Path(root) / f"pneumoniamnist_{size}.npz")

    monkeypatch.setitem(sys.modules, "medmnist", types.SimpleNamespace(PneumoniaMNIST=PneumoniaMNIST))
    splits = load_medmnist(DataConfig(cache_dir=str(tmp_path), image_size=28, medmnist_size=64), seed=0)
    assert calls == [("train", True, str(tmp_path / "medmnist"), 64)]
    assert splits.class_names == ("NORMAL", "PNEUMONIA") and len(splits.train) == 20


def test_failed_download_is_a_data_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    def offline(**_: object) -> None:
        raise RuntimeError("Automatic download failed!")

    monkeypatch.setitem(sys.modules, "medmnist", types.SimpleNamespace(PneumoniaMNIST=offline))
    with pytest.raises(DataError, match=r"(?s)Automatic download failed!.*data.root=/path/to/pneumoniamnist.npz"):
        load_medmnist(DataConfig(cache_dir=str(tmp_path), medmnist_size=128), seed=0)
