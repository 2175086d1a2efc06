"""The site check before joining: counts, unreadable files, clear refusals."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from rwft.core.config import DataConfig, load_config
from rwft.core.errors import DataError
from rwft.core.sitecheck import check_site


def write_site(root: Path, counts: dict[str, int]) -> Path:
    rng = np.random.default_rng(0)
    for cls, count in counts.items():
        (root / cls).mkdir(parents=True)
        for i in range(count):
            Image.fromarray(rng.integers(0, 256, (24, 24), dtype=np.uint8)).save(root / cls / f"{i}.png")
    return root


def test_report_counts_each_class_per_split_and_lists_unreadable_files(tmp_path: Path) -> None:
    site = write_site(tmp_path / "hospital_a", {"NORMAL": 20, "PNEUMONIA": 40})
    broken = site / "PNEUMONIA" / "scan.jpeg"
    broken.write_text("not an image")
    report = check_site(site, image_size=16)
    assert report.class_names == ("NORMAL", "PNEUMONIA")
    assert report.counts == {"train": [16, 32], "val": [2, 4], "test": [2, 4]}
    assert report.num_images == 60
    assert len(report.unreadable) == 1 and report.unreadable[0].startswith(f"{broken}: not an image")
    text = report.format()
    assert "nothing is sent" in text and str(site) in text and str(broken) in text
    rows = [line.split() for line in text.splitlines()]
    assert ["split", "NORMAL", "PNEUMONIA", "total"] in rows and ["train", "16", "32", "48"] in rows


def test_accepts_a_data_config_and_uses_its_settings(tmp_path: Path) -> None:
    site = write_site(tmp_path / "site", {"NORMAL": 10, "PNEUMONIA": 10})
    cfg = load_config(overrides=["data.dataset=chest_xray", f"data.root={site}", "data.image_size=8"])
    report = check_site(cfg.data)
    assert report.image_size == 8 and report.dataset == "chest_xray"
    assert "every file is readable" in report.format()


@pytest.mark.parametrize(
    ("build", "expected"),
    [
        (lambda root: root.mkdir(), "has no class subfolders"),
        (lambda root: write_site(root, {"NORMAL": 0, "PNEUMONIA": 0}), "empty class folder"),
        (lambda root: write_site(root, {"NORMAL": 5}), "only one class folder"),
    ],
    ids=["empty-site", "empty-classes", "one-class"],
)
def test_a_site_without_usable_structure_is_refused(tmp_path: Path, build, expected: str) -> None:
    build(tmp_path / "site")
    with pytest.raises(DataError, match=expected):
        check_site(tmp_path / "site")


def test_all_files_unreadable_is_refused(tmp_path: Path) -> None:
    site = tmp_path / "site"
    for cls in ("NORMAL", "PNEUMONIA"):
        (site / cls).mkdir(parents=True)
        (site / cls / "a.png").write_bytes(b"\x89PNG broken")
    with pytest.raises(DataError, match="has no images of class"):
        check_site(site)


def test_needs_a_local_path_and_never_downloads(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("RWFT_DATA_DIR", raising=False)
    with pytest.raises(DataError, match="never downloads"):
        check_site(DataConfig(dataset="medmnist"))


def test_real_chest_xray_folder(shared_data: Path) -> None:
    report = check_site(shared_data / "chest_xray", image_size=32)
    assert report.counts["test"] == [231, 387]
    assert sum(map(sum, (report.counts["train"], report.counts["val"]))) == 5206
    assert not report.unreadable


def one_class_npz(source: Path, folder: Path, per_split: int = 40) -> Path:
    """A MedMNIST-layout site holding only class 0 (NORMAL) in every split, from real images (named
    like ``source``, whose name tells the dataset its class names)."""
    data = np.load(source)
    arrays = {}
    for split in ("train", "val", "test"):
        keep = np.flatnonzero(data[f"{split}_labels"].ravel() == 0)[:per_split]
        arrays[f"{split}_images"], arrays[f"{split}_labels"] = data[f"{split}_images"][keep], data[f"{split}_labels"][keep]
    folder.mkdir(parents=True, exist_ok=True)
    np.savez(folder / source.name, **arrays)
    return folder / source.name


def test_a_one_class_site_is_warned_not_refused(tmp_path: Path, pneumoniamnist_npz: Path) -> None:
    site = one_class_npz(pneumoniamnist_npz, tmp_path / "one_class")
    report = check_site(site, "medmnist", 28)
    assert report.counts["train"] == [40, 0] and len(report.warnings) == 3
    text = report.format()  # what `rwft-client join` prints before it connects
    assert "warning: the train split has no PNEUMONIA images: this site trains on one class only" in text
    assert "warning: the val split has no PNEUMONIA images: AUROC is undefined on it" in text


def test_a_site_with_every_class_gets_no_warning(tmp_path: Path) -> None:
    assert check_site(write_site(tmp_path / "site", {"NORMAL": 20, "PNEUMONIA": 20}), image_size=8).warnings == []
