"""``rwft predict``: what a trained model says about new X-rays, and (optionally) where it looked.

Everything the model needs is read from the checkpoint (``rwft train``'s ``best.pt`` or a
federation's ``model.pt``): the resolved config (backbone, adapter, mode, image size,
DICOM windowing), the class names and the decision threshold chosen on validation. The
model is rebuilt with ``pretrained=False`` (its weights come from the checkpoint, so
nothing is downloaded) and its normalisation lives inside it (``RwftModel``).

Images stream through in batches: a batch is decoded, scored, (with saliency) explained,
written out and dropped, so memory stays constant for folders of any size. Outputs in
``out_dir``:

- ``predictions.csv``: one row per file: ``file``, ``p_<positive class>``, ``decision``
  (the positive class when the probability is at least the threshold), ``threshold``,
  ``image`` and ``saliency`` (the PNGs below, relative to ``out_dir``), ``error`` (why a
  file could not be read; such files have no score and do not stop the run).
- ``images/NNNNNN.png``: the image as the model read it (DICOM through its display
  pipeline), at ``display_size``; with saliency also ``images/NNNNNN.saliency.png``, the
  Grad-CAM overlay (``rwft.core.saliency``), captioned "model attention, not a finding".
- ``index.html``: every image beside its overlay, with its score and decision.

Reading files is the dataset plugins' job (``rwft.core`` imports no plugin): the caller
passes ``decode(path, size, windowing) -> uint8 (size, size)``, which raises on a file
it cannot read (the message becomes the row's ``error``).
"""

from __future__ import annotations

import csv
import html
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import OmegaConf
from PIL import Image
from tqdm import tqdm

from rwft.core.checkpoint import load_checkpoint
from rwft.core.config import RwftConfig, with_overrides
from rwft.core.dicom import is_dicom
from rwft.core.errors import RwftError
from rwft.core.model import RwftModel, build_model

IMAGE_SUFFIXES = (".jpeg", ".jpg", ".png")
POSITIVE_INDEX = 1  # rwft's binary convention: class 1 (PNEUMONIA) is the positive class
Decode = Callable[[Path, int, str], np.ndarray]


@dataclass(frozen=True)
class TrainedModel:
    """A checkpoint's model, ready for inference, with what it was trained to expect."""

    model: RwftModel
    cfg: RwftConfig
    class_names: tuple[str, ...]
    threshold: float
    source: str

    @property
    def image_size(self) -> int:
        return int(self.cfg.data.image_size)

    @property
    def positive_class(self) -> str:
        return self.class_names[POSITIVE_INDEX]

    def probabilities(self, images: torch.Tensor) -> np.ndarray:
        """Probability of the positive class for ``(N, 1, H, W)`` images in ``[0, 1]``."""
        with torch.no_grad():
            return torch.softmax(self.model(images).float(), dim=1)[:, POSITIVE_INDEX].numpy()


def load_trained_model(checkpoint: str | os.PathLike[str]) -> TrainedModel:
    """The model in ``checkpoint``, in eval mode on the CPU, rebuilt from the config it holds.

    Raises ``RwftError`` for a file that is not an rwft checkpoint or holds a model
    that is not a two-class classifier.
    """
    payload = load_checkpoint(checkpoint)
    # The checkpoint's weights replace the pretrained ones: never download or read weight files here.
    cfg = with_overrides(OmegaConf.create(payload["config"]),  # type: ignore[arg-type]
                         ["model.pretrained=false", "model.weights=null"])
    class_names = tuple(payload.get("class_names") or ())
    if len(class_names) != 2:
        raise RwftError(f"checkpoint {checkpoint} holds a {len(class_names)}-class model ({', '.join(class_names)}); "
                        "rwft predict scores two-class (normal vs. pneumonia) models.")
    model = build_model(cfg.model, len(class_names))
    model.load_state_dict(payload["model"])
    model.eval()
    return TrainedModel(model, cfg, class_names, float(payload.get("threshold", 0.5)), str(checkpoint))


def image_files(inputs: Sequence[str | os.PathLike[str]]) -> list[Path]:
    """Files named directly (always kept, so that a bad one is reported), and inside folders
    (recursively, sorted) every ``.jpeg``/``.jpg``/``.png`` and every DICOM file, hidden files skipped."""
    files: list[Path] = []
    for item in inputs:
        path = Path(item).expanduser()
        if path.is_dir():
            files += [p for p in sorted(path.rglob("*")) if p.is_file() and _is_candidate(p, path)]
        elif path.exists():
            files.append(path)
        else:
            raise RwftError(f"{path} does not exist: pass image files (JPEG, PNG, DICOM) or folders of them.")
    if not files:
        raise RwftError(f"no images found in {', '.join(map(str, inputs))}: rwft predict reads JPEG, PNG and DICOM.")
    return files


@dataclass(frozen=True)
class PredictSummary:
    out_dir: Path
    csv: Path
    html: Path
    scored: int
    unreadable: int


def predict_files(
    trained: TrainedModel,
    files: Sequence[Path],
    decode: Decode,
    out_dir: str | os.PathLike[str],
    *,
    saliency: bool = False,
    batch_size: int = 32,
    display_size: int = 256,
    progress: bool | None = None,
) -> PredictSummary:
    """Score ``files`` batch by batch and write the CSV, images and HTML (module docstring)."""
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    windowing = str(trained.cfg.data.dicom.windowing)
    layer = None
    if saliency:
        from rwft.core.saliency import target_layer

        layer = target_layer(trained.model)  # resolved once, not per batch
    probability_column = f"p_{trained.positive_class}"
    scored = unreadable = 0
    with open(out / "predictions.csv", "w", newline="") as csv_handle, open(out / "index.html", "w") as page:
        writer = csv.DictWriter(csv_handle, ["file", probability_column, "decision", "threshold", "image",
                                             "saliency", "error"])
        writer.writeheader()
        page.write(_html_head(trained, saliency))
        bar = tqdm(total=len(files), desc="rwft predict", unit="img", disable=None if progress is None else not progress)
        for start in range(0, len(files), batch_size):
            rows = _predict_batch(trained, files, start, start + batch_size, decode, windowing, out,
                                  layer=layer, saliency=saliency, display_size=display_size)
            for row in rows:
                row[probability_column] = row.pop("probability")
                writer.writerow(row)
                page.write(_html_row(row, probability_column))
                unreadable += bool(row["error"])
                scored += not row["error"]
            csv_handle.flush()
            bar.update(len(rows))
        bar.close()
        page.write("</table></body></html>\n")
    return PredictSummary(out, out / "predictions.csv", out / "index.html", scored, unreadable)


def _predict_batch(trained: TrainedModel, files: Sequence[Path], start: int, stop: int, decode: Decode,
                   windowing: str, out: Path, *, layer: Any, saliency: bool, display_size: int) -> list[dict]:
    rows, pixels, decoded = [], [], []
    for index in range(start, min(stop, len(files))):
        path = files[index]
        row = {"file": str(path), "probability": "", "decision": "", "threshold": f"{trained.threshold:.6f}",
               "image": "", "saliency": "", "error": ""}
        try:
            model_input = decode(path, trained.image_size, windowing)
            display = decode(path, display_size, windowing)
        except Exception as exc:  # any reader failure is this file's problem, not the run's
            row["error"] = str(exc) or type(exc).__name__
        else:
            row["image"] = f"images/{index:06d}.png"
            Image.fromarray(display).save(out / row["image"])
            pixels.append(model_input)
            decoded.append((row, display, index))
        rows.append(row)
    if not decoded:
        return rows
    images = torch.from_numpy(np.stack(pixels)).unsqueeze(1).float().div_(255.0)
    probabilities = trained.probabilities(images)
    maps = None
    if saliency:
        from rwft.core.saliency import gradcam

        maps = gradcam(trained.model, images, POSITIVE_INDEX, layer=layer)
    for position, ((row, display, index), probability) in enumerate(zip(decoded, probabilities)):
        row["probability"] = f"{float(probability):.6f}"
        row["decision"] = trained.class_names[int(probability >= trained.threshold)]
        if maps is not None:
            from rwft.core.saliency import overlay

            row["saliency"] = f"images/{index:06d}.saliency.png"
            overlay(display, maps[position]).save(out / row["saliency"])
    return rows


def _is_candidate(path: Path, top: Path) -> bool:
    if any(part.startswith(".") for part in path.relative_to(top).parts):
        return False
    return path.suffix.lower() in IMAGE_SUFFIXES or is_dicom(path)


def _html_head(trained: TrainedModel, saliency: bool) -> str:
    title = f"rwft predict: {html.escape(trained.source)}"
    note = ("<p>Overlays show <b>model attention, not a finding</b>: the regions that raised the model's "
            "score (Grad-CAM). They are not a diagnosis and localise disease less reliably than a "
            "radiologist.</p>") if saliency else ""
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{title}</title>"
            "<style>body{font-family:sans-serif} td{vertical-align:top;padding:4px} img{width:256px}</style>"
            f"</head><body><h1>{title}</h1><p>Probability of {html.escape(trained.positive_class)}; decision at the "
            f"threshold chosen on validation ({trained.threshold:.3f}); backbone "
            f"{html.escape(str(trained.cfg.model.backbone))} at {trained.image_size}px.</p>{note}"
            "<table><tr><th>file</th><th>image</th><th>attention</th><th>score</th></tr>\n")


def _html_row(row: dict, probability_column: str) -> str:
    def cell_image(key: str) -> str:
        return f"<img src='{html.escape(row[key])}' alt='{key}'>" if row[key] else ""

    score = (f"<b>{html.escape(row['decision'])}</b><br>p = {float(row[probability_column]):.3f}"
             if not row["error"] else f"unreadable: {html.escape(row['error'])}")
    return (f"<tr><td>{html.escape(row['file'])}</td><td>{cell_image('image')}</td>"
            f"<td>{cell_image('saliency')}</td><td>{score}</td></tr>\n")

