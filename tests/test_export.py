"""rwft export: ONNX Runtime and TorchScript give PyTorch's probabilities on real X-rays."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime
import pytest
import torch
from checkpoint_helpers import train_tiny_checkpoint
from dicom_helpers import chest_jpegs

from rwft.core.cli import main
from rwft.core.export import read_torchscript_metadata
from rwft.core.predict import load_trained_model
from rwft.plugins.datasets_chest_xray import decode_image


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory, shared_data: Path) -> Path:
    return train_tiny_checkpoint(shared_data, tmp_path_factory.mktemp("run"), image_size=32)


@pytest.fixture(scope="module")
def images(checkpoint: Path, shared_data: Path) -> np.ndarray:
    size = load_trained_model(checkpoint).image_size
    paths = chest_jpegs(shared_data, "NORMAL", 3, "test") + chest_jpegs(shared_data, "PNEUMONIA", 3, "test")
    return np.stack([decode_image(path, size) for path in paths])[:, None].astype(np.float32) / 255.0


@pytest.mark.integration
def test_onnx_export_matches_pytorch(checkpoint: Path, images: np.ndarray, tmp_path: Path) -> None:
    target = tmp_path / "model.onnx"
    assert main(["export", str(checkpoint), "--format", "onnx", "--out", str(target)]) == 0
    trained = load_trained_model(checkpoint)
    expected = trained.probabilities(torch.from_numpy(images))
    session = onnxruntime.InferenceSession(str(target), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["image"]
    (got,) = session.run(["probability"], {"image": images})
    assert got.shape == (6,) and np.allclose(got, expected, atol=1e-4)
    (single,) = session.run(["probability"], {"image": images[:1]})  # the batch dimension is free
    assert np.allclose(single, expected[:1], atol=1e-4)
    metadata = {p.key: p.value for p in onnx.load(str(target)).metadata_props}
    assert float(metadata["rwft.threshold"]) == pytest.approx(trained.threshold)
    assert json.loads(metadata["rwft.class_names"]) == ["NORMAL", "PNEUMONIA"]
    assert int(metadata["rwft.image_size"]) == images.shape[-1]


@pytest.mark.integration
def test_torchscript_export_matches_pytorch(checkpoint: Path, images: np.ndarray) -> None:
    assert main(["export", str(checkpoint), "--format", "torchscript"]) == 0
    target = checkpoint.with_suffix(".torchscript.pt")
    trained = load_trained_model(checkpoint)
    expected = trained.probabilities(torch.from_numpy(images))
    loaded = torch.jit.load(str(target), map_location="cpu")
    with torch.no_grad():
        got = loaded(torch.from_numpy(images)).numpy()
        single = loaded(torch.from_numpy(images[:1])).numpy()
    assert got.shape == (6,) and np.allclose(got, expected, atol=1e-4)
    assert np.allclose(single, expected[:1], atol=1e-4)
    assert read_torchscript_metadata(target)["rwft.class_names"] == json.dumps(["NORMAL", "PNEUMONIA"])


def test_unknown_format_is_a_one_line_error(tmp_path: Path) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["export", str(tmp_path / "x.pt"), "--format", "tflite"])
    assert exited.value.code == 2
