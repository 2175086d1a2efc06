"""The chest_xray dataset: layouts, labels, carving, bad files, and the real Kaggle folder."""

from __future__ import annotations

import re
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from rwft.core.config import DataConfig, load_config
from rwft.core.data import load_splits
from rwft.core.errors import DataError
from rwft.plugins.datasets_chest_xray import decode_image, load_chest_xray, scan_folder

SIZE = 16


def write_xray(path: Path, value: int = 128, size: int = 40, mode: str = "L", fmt: str | None = None) -> Path:
    """A small synthetic X-ray: a gradient plus noise, so JPEG has something to encode."""
    rng = np.random.default_rng(value)
    pixels = np.clip(np.linspace(0, 255, size)[None, :] * 0.5 + value * 0.5
                     + rng.normal(0, 10, (size, size)), 0, 255).astype(np.uint8)
    image = Image.fromarray(pixels).convert(mode)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, format=fmt)
    return path


def make_site(root: Path, counts: dict[str, int]) -> Path:
    """``root/CLASS/img_i.jpeg`` with ``counts[CLASS]`` images each."""
    for cls, count in counts.items():
        for i in range(count):
            write_xray(root / cls / f"img_{i}.jpeg", value=40 + 20 * i % 200)
    return root


def data(root: Path, **overrides) -> DataConfig:
    return DataConfig(dataset="chest_xray", root=str(root), image_size=SIZE, **overrides)


@pytest.fixture
def site(tmp_path: Path) -> Path:
    return make_site(tmp_path / "site", {"NORMAL": 20, "PNEUMONIA": 30})


def test_site_folder_carves_val_and_test_stratified_and_seeded(site: Path) -> None:
    splits = load_chest_xray(data(site), seed=3)
    assert splits.class_names == ("NORMAL", "PNEUMONIA")
    assert (len(splits.train), len(splits.val), len(splits.test)) == (40, 5, 5)
    assert splits.test.class_counts(2) == [2, 3] and splits.val.class_counts(2) == [2, 3]
    assert splits.train.images.dtype == np.uint8 and splits.train.images.shape[1:] == (SIZE, SIZE)
    again = load_chest_xray(data(site), seed=3)
    np.testing.assert_array_equal(again.test.images, splits.test.images)
    other_seed = load_chest_xray(data(site), seed=4)
    assert not np.array_equal(other_seed.test.images, splits.test.images)
    assert "class folders of one site" in splits.source


def test_labels_follow_sorted_class_folders_whatever_the_case(tmp_path: Path) -> None:
    root = tmp_path / "site"
    for i in range(10):
        write_xray(root / "pneumonia" / f"p{i}.png", value=250)
        write_xray(root / "NORMAL" / f"n{i}.jpg", value=10)
    splits = load_chest_xray(data(root), seed=0)
    assert splits.class_names == ("NORMAL", "pneumonia")
    dark = splits.train.images.reshape(len(splits.train), -1).mean(axis=1) < 128
    np.testing.assert_array_equal(splits.train.labels, np.where(dark, 0, 1))


def test_split_folders_fold_tiny_val_into_train_and_keep_test(tmp_path: Path) -> None:
    root = tmp_path / "chest_xray"
    make_site(root / "train", {"NORMAL": 30, "PNEUMONIA": 60})
    make_site(root / "val", {"NORMAL": 2, "PNEUMONIA": 2})
    make_site(root / "test", {"NORMAL": 7, "PNEUMONIA": 9})
    splits = load_chest_xray(data(root, val_fraction=0.2), seed=0)
    assert splits.test.class_counts(2) == [7, 9]
    assert len(splits.train) + len(splits.val) == 94  # the 4 official val images are pooled with train
    assert splits.val.class_counts(2) == [6, 13]  # 20% of the pool, per class
    assert "official val (4 images) folded into train" in splits.source


def test_ignores_os_files_but_not_unknown_files(site: Path) -> None:
    (site / "NORMAL" / ".DS_Store").write_bytes(b"\0\1junk")
    (site / "NORMAL" / "._img_0.jpeg").write_bytes(b"AppleDouble")
    (site / "NORMAL" / "Thumbs.db").write_bytes(b"junk")
    (site / ".hidden_dir").mkdir()
    assert len(scan_folder(site).all_files()) == 50
    (site / "NORMAL" / "notes.txt").write_text("not an image")
    with pytest.raises(DataError, match=r"notes\.txt: unsupported file type '\.txt'"):
        load_chest_xray(data(site), seed=0)


@pytest.fixture
def site_with_bad_files(site: Path) -> dict[str, Path]:
    jpeg = (site / "NORMAL" / "img_0.jpeg").read_bytes()
    truncated = site / "NORMAL" / "truncated.jpeg"
    truncated.write_bytes(jpeg[: len(jpeg) // 2])
    text = site / "PNEUMONIA" / "x.jpeg"
    text.write_text("this is a radiology report, not an image")
    rgba = write_xray(site / "PNEUMONIA" / "rgba.png", mode="RGBA")
    dangling = site / "NORMAL" / "moved.jpeg"
    dangling.symlink_to(site / "gone" / "moved.jpeg")  # a link whose target was moved away
    return {"truncated": truncated, "text": text, "rgba": rgba, "dangling": dangling}


def test_bad_files_raise_one_error_naming_every_file_and_the_fix(site_with_bad_files: dict[str, Path],
                                                                site: Path) -> None:
    with pytest.raises(DataError) as raised:
        load_chest_xray(data(site), seed=0)
    message = str(raised.value)
    assert "4 of 54 files" in message
    bad = site_with_bad_files
    assert f"{bad['truncated']}: damaged or truncated image" in message
    assert f"{bad['text']}: not an image Pillow can read" in message
    assert f"{bad['rgba']}: has an alpha channel (mode RGBA)" in message
    assert f"{bad['dangling']}: is a symbolic link to {site / 'gone' / 'moved.jpeg'}, which does not exist" in message
    assert "data.on_bad_file=skip" in message


def test_skip_mode_leaves_bad_files_out_lists_and_prints_them(site_with_bad_files: dict[str, Path], site: Path,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    cfg = load_config(overrides=["data.dataset=chest_xray", f"data.root={site}", f"data.image_size={SIZE}",
                                 "data.on_bad_file=skip"])
    splits = load_splits(cfg)
    assert len(splits.train) + len(splits.val) + len(splits.test) == 50
    assert sorted(entry.split(": ")[0] for entry in splits.skipped) == sorted(map(str, site_with_bad_files.values()))
    printed = capsys.readouterr().err
    assert "left out 4 unreadable file(s)" in printed and str(site_with_bad_files["rgba"]) in printed


@pytest.mark.parametrize(
    ("build", "expected"),
    [
        (lambda root: None, "does not exist"),
        (lambda root: root.mkdir(), "has no class subfolders"),
        (lambda root: write_xray(root / "a.jpeg"), "has no class subfolders. It holds 1 images directly"),
        (lambda root: make_site(root, {"NORMAL": 3}), r"only one class folder \(NORMAL\)"),
        (lambda root: (make_site(root, {"NORMAL": 3}), (root / "PNEUMONIA").mkdir()), "empty class folder"),
        (lambda root: make_site(root / "test", {"NORMAL": 3, "PNEUMONIA": 3}), "no train folder"),
        (lambda root: (make_site(root / "train", {"NORMAL": 3, "PNEUMONIA": 3}),
                       make_site(root / "test", {"NORMAL": 3, "COVID": 3})), "the same class folders"),
    ],
    ids=["missing", "no-classes", "loose-images", "one-class", "empty-class", "no-train", "class-mismatch"],
)
def test_structural_problems_raise_data_error_naming_the_folder(tmp_path: Path, build, expected: str) -> None:
    root = tmp_path / "site"
    build(root)
    with pytest.raises(DataError, match=expected) as raised:
        load_chest_xray(data(root), seed=0)
    assert str(root) in str(raised.value)


def test_nested_download_folder_gets_a_hint(tmp_path: Path) -> None:
    make_site(tmp_path / "chest_xray" / "train", {"NORMAL": 2, "PNEUMONIA": 2})
    with pytest.raises(DataError, match=re.escape(f"set data.root={tmp_path / 'chest_xray'}")):
        load_chest_xray(data(tmp_path), seed=0)


def test_too_few_images_of_a_class_to_carve_is_an_error(tmp_path: Path) -> None:
    root = make_site(tmp_path / "site", {"NORMAL": 1, "PNEUMONIA": 20})
    with pytest.raises(DataError, match="has no images of class NORMAL"):
        load_chest_xray(data(root), seed=0)


def test_no_root_says_how_to_point_at_the_data() -> None:
    with pytest.raises(DataError, match="data.root=/path/to/chest_xray or set RWFT_DATA_DIR"):
        load_chest_xray(DataConfig(dataset="chest_xray"), seed=0)


def test_real_chest_xray_at_32px(shared_data: Path) -> None:
    cfg = load_config(overrides=["data.dataset=chest_xray", f"data.root={shared_data / 'chest_xray'}",
                                 "data.image_size=32"])
    start = time.perf_counter()
    splits = load_splits(cfg)
    elapsed = time.perf_counter() - start
    assert len(splits.train) + len(splits.val) == 5206  # 5,190 train + the 16 official val images
    assert len(splits.val) == 521 and splits.val.class_counts(2) == [135, 386]
    assert splits.test.class_counts(2) == [231, 387]
    assert splits.class_names == ("NORMAL", "PNEUMONIA") and not splits.skipped
    assert splits.train.images.shape[1:] == (32, 32)
    # Decoding all 5,824 JPEGs takes a few seconds on two cores; a cache hit far less.
    assert elapsed < 60


@pytest.mark.parametrize("suffix", [".png", ".tif"])
def test_16_bit_images_are_read_at_their_real_depth(tmp_path: Path, suffix: str) -> None:
    site = make_site(tmp_path / "site", {"NORMAL": 10, "PNEUMONIA": 10})
    sixteen = site / "NORMAL" / f"sixteen{suffix}"
    ramp = np.tile(np.linspace(0, 65535, SIZE).astype(np.uint16), (SIZE, 1))  # dark left, white right
    Image.fromarray(ramp).save(sixteen)
    assert Image.open(sixteen).mode.startswith("I;16")
    decoded = decode_image(sixteen, SIZE)
    expected = np.rint(ramp.astype(np.float64) * 255 / 65535).astype(np.uint8)
    np.testing.assert_allclose(decoded, expected, atol=1)  # scaled over 0-255, neither clipped nor refused
    assert decoded.min() == 0 and decoded.max() == 255
    splits = load_chest_xray(data(site), seed=0)
    assert len(splits.train) + len(splits.val) + len(splits.test) == 21 and not splits.skipped


def test_a_dangling_symlink_is_skipped_like_any_bad_file(site: Path) -> None:
    (site / "PNEUMONIA" / "link.jpeg").symlink_to(site / "nowhere.jpeg")
    splits = load_chest_xray(data(site, on_bad_file="skip"), seed=0)
    assert len(splits.train) + len(splits.val) + len(splits.test) == 50
    assert [entry.split(": ")[0] for entry in splits.skipped] == [str(site / "PNEUMONIA" / "link.jpeg")]
