"""Clinical metrics for binary X-ray classification (positive class = label 1).

All metric arithmetic comes from scikit-learn; this module only decides which ones a
clinician reads (AUROC, AUPRC, accuracy, sensitivity, specificity, precision, F1),
how the decision threshold is chosen (on validation only, never on test), and how
uncertain each number is (percentile bootstrap over test images).
"""

from __future__ import annotations

import numpy as np
from sklearn import metrics as skm

METRIC_NAMES = ("auroc", "auprc", "accuracy", "sensitivity", "specificity", "precision", "f1")


def binary_metrics(labels: np.ndarray, probs: np.ndarray, threshold: float = 0.5) -> dict[str, float]:
    """Metrics of positive-class probabilities ``probs`` against 0/1 ``labels``.

    Rank metrics (AUROC, AUPRC) are NaN when only one class is present, since they are
    undefined there; threshold metrics are always defined.
    """
    labels = np.asarray(labels).astype(int)
    probs = np.asarray(probs, dtype=np.float64)
    predicted = (probs >= threshold).astype(int)
    both_classes = len(np.unique(labels)) == 2
    tn, fp, fn, tp = skm.confusion_matrix(labels, predicted, labels=[0, 1]).ravel()
    return {
        "auroc": float(skm.roc_auc_score(labels, probs)) if both_classes else float("nan"),
        "auprc": float(skm.average_precision_score(labels, probs)) if both_classes else float("nan"),
        "accuracy": float(skm.accuracy_score(labels, predicted)),
        "sensitivity": float(skm.recall_score(labels, predicted, zero_division=0)),
        "specificity": float(tn / (tn + fp)) if tn + fp else float("nan"),
        "precision": float(skm.precision_score(labels, predicted, zero_division=0)),
        "f1": float(skm.f1_score(labels, predicted, zero_division=0)),
    }


def pick_threshold(labels: np.ndarray, probs: np.ndarray) -> float:
    """The validation threshold maximising Youden's J (sensitivity + specificity - 1).

    Falls back to 0.5 when validation holds a single class (no ROC curve exists).
    """
    labels = np.asarray(labels).astype(int)
    if len(np.unique(labels)) < 2:
        return 0.5
    fpr, tpr, thresholds = skm.roc_curve(labels, probs)
    best = int(np.argmax(tpr - fpr))
    # roc_curve's first threshold is +inf (predict nothing positive): never useful.
    return float(min(thresholds[best], 1.0))


def bootstrap_ci(
    labels: np.ndarray,
    probs: np.ndarray,
    threshold: float,
    *,
    resamples: int = 1000,
    seed: int = 0,
    level: float = 0.95,
) -> dict[str, tuple[float, float]]:
    """Percentile bootstrap confidence intervals for every metric in ``METRIC_NAMES``."""
    labels = np.asarray(labels).astype(int)
    probs = np.asarray(probs, dtype=np.float64)
    rng = np.random.default_rng(seed)
    samples: dict[str, list[float]] = {name: [] for name in METRIC_NAMES}
    n = len(labels)
    for _ in range(resamples):
        index = rng.integers(0, n, n)
        for name, value in binary_metrics(labels[index], probs[index], threshold).items():
            samples[name].append(value)
    tail = (1.0 - level) / 2 * 100
    intervals = {}
    for name, values in samples.items():
        finite = np.asarray(values)[np.isfinite(values)]
        if len(finite) == 0:
            intervals[name] = (float("nan"), float("nan"))
        else:
            low, high = np.percentile(finite, [tail, 100 - tail])
            intervals[name] = (float(low), float(high))
    return intervals


def report(labels: np.ndarray, probs: np.ndarray, threshold: float, *, resamples: int, seed: int) -> dict:
    """Point estimates with 95% intervals, as written to ``metrics.json``."""
    point = binary_metrics(labels, probs, threshold)
    intervals = bootstrap_ci(labels, probs, threshold, resamples=resamples, seed=seed) if resamples else {}
    return {
        name: {"value": point[name], "ci95": list(intervals[name]) if name in intervals else None}
        for name in METRIC_NAMES
    } | {"threshold": threshold, "num_examples": int(len(labels)),
         "positives": int(np.sum(labels)), "negatives": int(len(labels) - np.sum(labels))}
