"""``rwft export``: a trained model as one self-contained file for ONNX Runtime or TorchScript.

The exported graph is the whole ``RwftModel`` (channel adapter, the backbone's input
normalisation, backbone, head) followed by a softmax, so a deployment needs nothing from
rwft: input ``image`` float32 ``(N, 1, H, W)``, one grayscale X-ray per row with values
in ``[0, 1]`` and ``H = W = data.image_size`` of the checkpoint; output ``probability``
float32 ``(N,)``, the probability of the positive class (``class_names[1]``). ``N`` is
free. The threshold chosen on validation, the class names and the input size travel
inside the file as metadata (ONNX ``metadata_props`` / a TorchScript extra file
``rwft.json``), under the keys of ``export_metadata``.

Images must be prepared as rwft prepares them (``rwft.plugins.datasets_chest_xray``:
8-bit grayscale, resized to H x W with Pillow's bicubic filter, divided by 255).
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from rwft.core.errors import RwftError
from rwft.core.predict import POSITIVE_INDEX, TrainedModel, load_trained_model

FORMATS = ("onnx", "torchscript")
SUFFIXES = {"onnx": ".onnx", "torchscript": ".pt"}
ONNX_OPSET = 17
METADATA_FILE = "rwft.json"  # the TorchScript extra file holding export_metadata()


class ProbabilityModel(nn.Module):
    """``RwftModel`` + softmax: ``(N, 1, H, W)`` in [0, 1] -> ``(N,)`` probability of the positive class."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.model(image), dim=1)[:, POSITIVE_INDEX]


def export_metadata(trained: TrainedModel) -> dict[str, str]:
    """What a deployment needs besides the graph, as strings (ONNX metadata is string-valued)."""
    return {"rwft.threshold": repr(trained.threshold), "rwft.class_names": json.dumps(list(trained.class_names)),
            "rwft.image_size": str(trained.image_size), "rwft.input": "image: float32 (N, 1, H, W) in [0, 1]",
            "rwft.output": f"probability: float32 (N,) of {trained.positive_class}",
            "rwft.backbone": str(trained.cfg.model.backbone), "rwft.source": trained.source}


def export_checkpoint(checkpoint: str | os.PathLike[str], fmt: str, out: str | os.PathLike[str] | None = None) -> Path:
    """Write the model in ``checkpoint`` as ``fmt`` (``onnx`` or ``torchscript``); return the file.

    ``out`` defaults to the checkpoint's path with ``.onnx`` / ``.torchscript.pt``.
    """
    if fmt not in FORMATS:
        raise RwftError(f"unknown export format {fmt!r}: use one of {', '.join(FORMATS)}.")
    trained = load_trained_model(checkpoint)
    source = Path(checkpoint)
    default = source.with_suffix(".onnx") if fmt == "onnx" else source.with_suffix(".torchscript.pt")
    target = Path(out) if out else default
    target.parent.mkdir(parents=True, exist_ok=True)
    wrapper = ProbabilityModel(trained.model).eval()
    example = torch.rand(2, 1, trained.image_size, trained.image_size, generator=torch.Generator().manual_seed(0))
    metadata = export_metadata(trained)
    with warnings.catch_warnings():
        # Both exporters warn that they are legacy (see below); the files they write are current.
        warnings.simplefilter("ignore", category=DeprecationWarning)
        warnings.simplefilter("ignore", category=FutureWarning)
        if fmt == "onnx":
            _export_onnx(wrapper, example, target, metadata)
        else:
            _export_torchscript(wrapper, example, target, metadata)
    return target


def _export_onnx(wrapper: nn.Module, example: torch.Tensor, target: Path, metadata: dict[str, str]) -> None:
    import onnx

    # The TorchScript-based exporter (dynamo=False): the torch.export-based one needs the
    # onnxscript package and gains nothing for a static CNN graph.
    with torch.no_grad():
        torch.onnx.export(wrapper, (example,), str(target), dynamo=False, opset_version=ONNX_OPSET,
                          input_names=["image"], output_names=["probability"],
                          dynamic_axes={"image": {0: "batch"}, "probability": {0: "batch"}})
    model = onnx.load(str(target))
    for key, value in metadata.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.checker.check_model(model)
    onnx.save(model, str(target))


def _export_torchscript(wrapper: nn.Module, example: torch.Tensor, target: Path, metadata: dict[str, str]) -> None:
    # Tracing records the graph for this input size; the batch dimension stays free because
    # the model has no batch-dependent control flow.
    with torch.no_grad():
        traced = torch.jit.trace(wrapper, example)
    torch.jit.save(traced, str(target), _extra_files={METADATA_FILE: json.dumps(metadata)})


def read_torchscript_metadata(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The ``export_metadata`` stored in a TorchScript file written by ``export_checkpoint``."""
    extra = {METADATA_FILE: ""}
    torch.jit.load(str(path), map_location="cpu", _extra_files=extra)
    return json.loads(extra[METADATA_FILE])
