"""rwft shift: seeded, recorded scanner shifts of real X-rays (folders, npz, MONOCHROME1 DICOM) and per-site shifts."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
from dicom_helpers import chest_jpegs, jpeg_pixels
from PIL import Image

from rwft.core.cli import main
from rwft.core.config import DataConfig
from rwft.core.data import load_data
from rwft.core.dicom import read_dicom
from rwft.core.errors import ConfigError
from rwft.core.shift import PRESETS, Shift, parse_shift, shift_image, shift_images, shift_path


@pytest.fixture()
def site(tmp_path: Path, shared_data: Path) -> Path:
    folder = tmp_path / "site"
    for label in ("NORMAL", "PNEUMONIA"):
        (folder / label).mkdir(parents=True)
        for jpeg in chest_jpegs(shared_data, label, 4, "test"):
            shutil.copy(jpeg, folder / label / jpeg.name)
    return folder


def test_each_step_does_what_it_says_on_a_real_image(shared_data: Path) -> None:
    source = jpeg_pixels(chest_jpegs(shared_data, "NORMAL", 1)[0])
    rng = np.random.default_rng(0)
    gamma = shift_image(source, Shift(gamma=1.5), rng)
    assert np.array_equal(gamma, np.rint((source / 255.0) ** 1.5 * 255).astype(np.uint8))
    flat = shift_image(source, Shift(contrast=0.5), rng)
    assert flat.std() == pytest.approx(source.std() * 0.5, rel=0.02)
    noisy = shift_image(source, Shift(noise=0.05), rng).astype(float) - source
    assert 0.04 * 255 < noisy[(source > 30) & (source < 220)].std() < 0.06 * 255
    small = shift_image(source, Shift(resolution=96), rng)
    assert small.shape == (96, 96)
    assert shift_image(source, Shift(resolution=96), rng, keep_size=True).shape == source.shape
    blurred = shift_image(source, Shift(blur=2.0), rng).astype(float)
    assert np.abs(np.diff(blurred, axis=1)).mean() < 0.75 * np.abs(np.diff(source.astype(float), axis=1)).mean()
    assert shift_image(source, Shift(), rng) is source


def test_specs_presets_and_mistakes() -> None:
    assert parse_shift("") == Shift()
    assert parse_shift("scanner-b,noise=0") == Shift(**{**PRESETS["scanner-b"].__dict__, "noise": 0.0})
    assert parse_shift("gamma=1.4,jpeg=30,res=64") == Shift(gamma=1.4, jpeg_quality=30, resolution=64)
    for bad, message in (("gamma=abc", "not a number"), ("exposure=2", "unknown shift key"),
                         ("scanner-z", "unknown shift preset"), ("gamma=-1", "must be > 0")):
        with pytest.raises(ConfigError, match=message):
            parse_shift(bad)


def test_folder_copy_is_seeded_recorded_and_readable_by_rwft(site: Path, tmp_path: Path) -> None:
    assert main(["shift", str(site), str(tmp_path / "b"), "--preset", "scanner-b", "--resolution", "128",
                 "--seed", "7"]) == 0
    record = json.loads((tmp_path / "b" / "shift.json").read_text())
    assert record["seed"] == 7 and record["images"] == 8 and record["shift"]["resolution"] == 128
    assert record["shift"]["gamma"] == PRESETS["scanner-b"].gamma
    shifted = sorted((tmp_path / "b").rglob("*.jpeg"))
    assert [p.relative_to(tmp_path / "b") for p in shifted] == [p.relative_to(site) for p in sorted(site.rglob("*.jpeg"))]
    assert all(Image.open(p).size == (128, 128) for p in shifted)
    # Same seed, same bytes; another seed, other noise.
    assert main(["shift", str(site), str(tmp_path / "b2"), "--preset", "scanner-b", "--resolution", "128",
                 "--seed", "7"]) == 0
    assert all(p.read_bytes() == (tmp_path / "b2" / p.relative_to(tmp_path / "b")).read_bytes() for p in shifted)
    shift_path(site, tmp_path / "b3", parse_shift("scanner-b,resolution=128"), seed=8)
    assert shifted[0].read_bytes() != (tmp_path / "b3" / shifted[0].relative_to(tmp_path / "b")).read_bytes()
    splits = load_data(DataConfig(dataset="chest_xray", root=str(tmp_path / "b"), image_size=32, val_fraction=0.25,
                                  cache_dir=str(tmp_path / "cache")), seed=0)
    assert sum(map(len, (splits.train, splits.val, splits.test))) == 8


def test_monochrome1_dicom_export_shows_the_shifted_image(site: Path, tmp_path: Path) -> None:
    shift = Shift(gamma=1.3, noise=0.02)
    shift_path(site, tmp_path / "png", shift, seed=3)
    shift_path(site, tmp_path / "dcm", shift, seed=3, dicom=True)
    for dicom_file in sorted((tmp_path / "dcm").rglob("*.dcm")):
        ds = pydicom.dcmread(dicom_file)
        assert ds.PhotometricInterpretation == "MONOCHROME1"
        same = (tmp_path / "png" / dicom_file.relative_to(tmp_path / "dcm")).with_suffix(".jpeg")
        stored = np.asarray(ds.pixel_array)
        displayed = read_dicom(dicom_file)
        assert np.array_equal(displayed, 255 - stored)  # inverted once
        # The JPEG copy went through lossy compression; the DICOM did not.
        assert np.abs(displayed.astype(int) - jpeg_pixels(same)).mean() < 3


def test_npz_copy_shifts_every_split_and_keeps_labels(tmp_path: Path, pneumoniamnist_npz: Path) -> None:
    record = shift_path(pneumoniamnist_npz, tmp_path / "b.npz", PRESETS["overexposed"], seed=1)
    assert Path(record["record"]).name == "b.shift.json" and record["images"] == 4708 + 524 + 624
    with np.load(pneumoniamnist_npz) as before, np.load(tmp_path / "b.npz") as after:
        for split in ("train", "val", "test"):
            assert np.array_equal(before[f"{split}_labels"], after[f"{split}_labels"])
            assert after[f"{split}_images"].shape == before[f"{split}_images"].shape
            assert after[f"{split}_images"].mean() > before[f"{split}_images"].mean() + 10  # overexposed


def test_simulated_sites_get_their_own_scanner(tmp_path: Path, pneumoniamnist_npz: Path) -> None:
    from flwr.app import Context, RecordDict
    from flwr.supercore.task_identity import TaskIdentity

    from rwft.clients.site import site_for
    from rwft.core.config import load_config
    from rwft.federation.protocol import run_config_for

    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1

    def sites(*overrides: str) -> list:
        cfg = load_config(None, ["data.image_size=28", "data.max_train_images=200", f"data.root={pneumoniamnist_npz}",
                                 "model.backbone=timm/resnet10t", "model.pretrained=false",
                                 f"data.cache_dir={tmp_path / 'cache'}", f"output_dir={tmp_path / 'run'}", *overrides])
        rc = run_config_for(cfg, num_classes=2, federation_id="f", resume=False)
        return [site_for(Context(1, 9, {"partition-id": i, "num-partitions": 2}, RecordDict(), rc)) for i in range(2)]

    plain = sites()
    shifted = sites('federation.site_shifts=["", "scanner-b"]')
    assert np.array_equal(plain[0].splits.train.images, shifted[0].splits.train.images)
    assert np.array_equal(plain[1].splits.train.labels, shifted[1].splits.train.labels)
    expected = shift_images(np.concatenate([plain[1].splits.train.images]), PRESETS["scanner-b"], 0)
    assert not np.array_equal(plain[1].splits.train.images, shifted[1].splits.train.images)
    assert expected.shape == shifted[1].splits.train.images.shape
    with pytest.raises(ConfigError, match="3 entries but the federation has 2 sites"):
        sites('federation.site_shifts=["", "", "low-dose"]')
