"""rwft predict on real X-rays (JPEG and DICOM) with a real checkpoint, and Grad-CAM overlays."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from checkpoint_helpers import train_tiny_checkpoint
from dicom_helpers import chest_jpegs, jpeg_pixels, write_dicom
from PIL import Image

from rwft.core.cli import main
from rwft.core.predict import load_trained_model
from rwft.core.saliency import CAPTION, default_saliency_layer, gradcam
from rwft.plugins.datasets_chest_xray import decode_image


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory, shared_data: Path) -> Path:
    return train_tiny_checkpoint(shared_data, tmp_path_factory.mktemp("run"))


@pytest.fixture()
def inbox(tmp_path: Path, shared_data: Path) -> Path:
    """A folder as a clinician would point at: JPEGs, a MONOCHROME1 DICOM without extension, a broken file."""
    folder = tmp_path / "inbox"
    (folder / "more").mkdir(parents=True)
    for jpeg in chest_jpegs(shared_data, "NORMAL", 2, "test") + chest_jpegs(shared_data, "PNEUMONIA", 2, "test"):
        shutil.copy(jpeg, folder / jpeg.name)
    source = jpeg_pixels(chest_jpegs(shared_data, "PNEUMONIA", 3, "test")[2])
    write_dicom(folder / "more" / "IM0001", 255 - source, photometric="MONOCHROME1")
    (folder / "more" / "broken.jpeg").write_bytes(b"\xff\xd8 not really a jpeg")
    (folder / ".DS_Store").write_bytes(b"\0")
    return folder


@pytest.mark.integration
def test_predict_scores_jpeg_and_dicom_at_the_checkpoint_threshold(checkpoint: Path, inbox: Path,
                                                                   tmp_path: Path) -> None:
    out = tmp_path / "out"
    assert main(["predict", str(checkpoint), str(inbox), "--saliency", "--out", str(out), "--batch-size", "2"]) == 0
    with open(out / "predictions.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 6  # 4 JPEGs, 1 DICOM, 1 broken file; .DS_Store is not an image
    trained = load_trained_model(checkpoint)
    assert trained.threshold == pytest.approx(torch.load(checkpoint, weights_only=False)["threshold"])
    broken = next(row for row in rows if row["file"].endswith("broken.jpeg"))
    assert broken["error"] and not broken["p_PNEUMONIA"] and not broken["image"]
    for row in rows:
        if row["error"]:
            continue
        path = Path(row["file"])
        # The same decoding and model as training: the score matches a direct forward pass.
        image = torch.from_numpy(np.array(decode_image(path, trained.image_size))).float().div(255)[None, None]
        expected = float(trained.probabilities(image)[0])
        assert float(row["p_PNEUMONIA"]) == pytest.approx(expected, abs=1e-5)
        assert row["decision"] == ("PNEUMONIA" if expected >= trained.threshold else "NORMAL")
        picture = Image.open(out / row["image"])
        assert picture.mode == "L" and picture.size == (256, 256)
        overlay = np.asarray(Image.open(out / row["saliency"]))
        assert overlay.shape == (256 + 16, 256, 3)
        assert np.abs(overlay[:256, :, 0].astype(int) - overlay[:256, :, 2]).max() > 0  # a coloured heat map
    page = (out / "index.html").read_text()
    assert CAPTION in page and page.count("<tr>") == 7 and "saliency.png" in page


@pytest.mark.integration
def test_gradcam_needs_gradients_and_follows_the_image(checkpoint: Path, shared_data: Path) -> None:
    trained = load_trained_model(checkpoint)
    assert trained.model.saliency_layer == "bn2"  # named by the efficientnet_lite plugin
    images = torch.stack([torch.from_numpy(np.array(decode_image(path, 64))).float().div(255)[None]
                          for path in chest_jpegs(shared_data, "PNEUMONIA", 2, "test")])
    with torch.no_grad(), pytest.raises(RuntimeError, match="needs gradients"):
        gradcam(trained.model, images)
    maps = gradcam(trained.model, images)  # evidence for PNEUMONIA (class 1)
    assert maps.shape == (2, 64, 64) and maps.min() >= 0 and maps.max() <= 1
    # A model that barely trained may see no evidence for pneumonia anywhere (an all-zero map, as
    # Grad-CAM's ReLU keeps only positive evidence); the class it does predict has a map that varies
    # across the image and between images.
    predicted = int(trained.probabilities(images)[0] >= 0.5)
    maps = gradcam(trained.model, images, class_index=predicted)
    assert maps.std() > 0 and not np.allclose(maps[0], maps[1])
    assert all(p.grad is None for p in trained.model.parameters())  # explaining does not train


def test_default_saliency_layer_of_a_torchvision_resnet_is_layer4() -> None:
    from rwft.core.config import ModelConfig
    from rwft.core.model import build_model

    model = build_model(ModelConfig(backbone="torchvision/resnet18", pretrained=False), 2)
    assert model.saliency_layer is None and default_saliency_layer(model) == "layer4"
