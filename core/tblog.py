"""TensorBoard logging for one run directory (a thin layer over ``SummaryWriter``).

Every entry point logs through this, so that one ``tensorboard --logdir`` shows
training runs, Ray trials and whole federations with the same tag names.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from typing import Any

import matplotlib

matplotlib.use("Agg")  # headless: servers and CI have no display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from sklearn import metrics as skm  # noqa: E402
from torch.utils.tensorboard import SummaryWriter  # noqa: E402


class RunLogger:
    """Writes event files under ``log_dir``; safe to use as a context manager."""

    def __init__(self, log_dir: str | os.PathLike[str], *, purge_step: int | None = None) -> None:
        """``purge_step``: a resumed run's first step. TensorBoard then drops what the crashed
        run logged from that step on (it is logged again), instead of drawing both."""
        self.log_dir = str(log_dir)
        self.writer = SummaryWriter(log_dir=self.log_dir, purge_step=purge_step)

    def scalar(self, tag: str, value: float, step: int) -> None:
        if value is not None and math.isfinite(float(value)):
            self.writer.add_scalar(tag, float(value), step)

    def scalars(self, values: Mapping[str, float], step: int, prefix: str = "") -> None:
        """One scalar per key, tagged ``prefix/key`` (non-numbers and NaN are skipped)."""
        for key, value in values.items():
            if isinstance(value, (int, float, np.floating, np.integer)) and not isinstance(value, bool):
                self.scalar(f"{prefix}/{key}" if prefix else key, float(value), step)

    def text(self, tag: str, text: str, step: int = 0) -> None:
        self.writer.add_text(tag, text, step)

    def curves(self, prefix: str, labels: np.ndarray, probs: np.ndarray, threshold: float, step: int,
               class_names: tuple[str, ...] | list[str] = ("negative", "positive")) -> None:
        """PR curve (interactive), ROC curve and confusion matrix (images); ``class_names[1]`` is positive."""
        labels = np.asarray(labels).astype(int)
        probs = np.asarray(probs, dtype=np.float64)
        self.writer.add_pr_curve(f"{prefix}/pr_curve", labels, probs, step)
        if len(np.unique(labels)) == 2:
            self.writer.add_figure(f"{prefix}/roc_curve", _roc_figure(labels, probs), step)
        self.writer.add_figure(
            f"{prefix}/confusion_matrix", _confusion_figure(labels, probs >= threshold, threshold, class_names), step
        )

    def hparams(self, config: Mapping[str, Any], final_metrics: Mapping[str, float]) -> None:
        """Config (flattened ``a.b`` keys) -> final metrics, for TensorBoard's HPARAMS tab."""
        flat = {key: _hparam_value(value) for key, value in _flatten(config).items()}
        metrics = {f"hparam/{k}": float(v) for k, v in final_metrics.items() if _finite(v)}
        self.writer.add_hparams(flat, metrics, run_name="hparams")

    def flush(self) -> None:
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()

    def __enter__(self) -> RunLogger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, Mapping):
            flat.update(_flatten(value, name))
        else:
            flat[name] = value
    return flat


def _hparam_value(value: Any) -> Any:
    # TensorBoard's hparams accept only bool, int, float and str.
    return value if isinstance(value, (bool, int, float, str)) else str(value)


def _roc_figure(labels: np.ndarray, probs: np.ndarray) -> plt.Figure:
    fpr, tpr, _ = skm.roc_curve(labels, probs)
    figure, axes = plt.subplots(figsize=(4, 4), dpi=100)
    axes.plot(fpr, tpr, label=f"AUROC {skm.roc_auc_score(labels, probs):.3f}")
    axes.plot([0, 1], [0, 1], linestyle="--", color="grey", linewidth=0.8)
    axes.set_xlabel("1 - specificity (false positive rate)")
    axes.set_ylabel("sensitivity (true positive rate)")
    axes.legend(loc="lower right")
    figure.tight_layout()
    return figure


def _confusion_figure(labels: np.ndarray, predicted: np.ndarray, threshold: float,
                      class_names: tuple[str, ...] | list[str]) -> plt.Figure:
    matrix = skm.confusion_matrix(labels, predicted.astype(int), labels=[0, 1])
    figure, axes = plt.subplots(figsize=(3.6, 3.2), dpi=100)
    skm.ConfusionMatrixDisplay(matrix, display_labels=list(class_names)).plot(
        ax=axes, colorbar=False, values_format="d"
    )
    axes.set_title(f"threshold {threshold:.3f}")
    figure.tight_layout()
    return figure
