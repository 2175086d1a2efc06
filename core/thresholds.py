"""Decision policies: how validation turns probabilities into a threshold (and calibration).

Everything here is fitted on validation only, never on test. ``eval.threshold`` names the
policy that picks the operating point:

- ``youden``: maximise sensitivity + specificity - 1 (``metrics.pick_threshold``, rwft's original).
- ``sensitivity:T``: the highest threshold whose validation sensitivity is at least T
  (screening: miss at most 1 - T of the pneumonias, as specific as that allows).
- ``specificity:T``: the lowest threshold whose validation specificity is at least T.

``eval.calibration=temperature`` fits one temperature on validation (Guo et al., ICML
2017) by minimising the negative log-likelihood; reported probabilities are then
calibrated. It never changes the ranking (AUROC) and is fitted before the threshold, so
the threshold is expressed on the calibrated scale.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.optimize import minimize_scalar
from scipy.special import expit
from sklearn import metrics as skm

from rwft.core.errors import ConfigError
from rwft.core.metrics import pick_threshold

EPS = 1e-7
TARGET_POLICIES = ("sensitivity", "specificity")


def parse_policy(policy: str) -> tuple[str, float | None]:
    """``"youden"`` -> ``("youden", None)``; ``"sensitivity:0.95"`` -> ``("sensitivity", 0.95)``.

    Raises ``ConfigError`` naming ``eval.threshold`` for anything else.
    """
    name, _, target = str(policy).partition(":")
    if name == "youden" and not target:
        return name, None
    if name in TARGET_POLICIES:
        try:
            value = float(target)
        except ValueError:
            value = float("nan")
        if 0.0 < value <= 1.0:
            return name, value
    raise ConfigError(f"eval.threshold={policy!r} is not a policy: use youden, sensitivity:T or "
                      "specificity:T with T in (0, 1], e.g. eval.threshold=sensitivity:0.95.")


def choose_threshold(policy: str, labels: np.ndarray, probs: np.ndarray) -> float:
    """The threshold ``policy`` picks on validation ``labels``/positive-class ``probs``.

    A case is predicted positive when ``prob >= threshold``. Falls back to 0.5 when
    validation holds a single class (no ROC curve exists), as ``pick_threshold`` does.
    """
    name, target = parse_policy(policy)
    labels = np.asarray(labels).astype(int)
    probs = np.asarray(probs, dtype=np.float64)
    if name == "youden" or len(np.unique(labels)) < 2:
        return pick_threshold(labels, probs)
    fpr, tpr, thresholds = skm.roc_curve(labels, probs, drop_intermediate=False)
    # roc_curve's thresholds fall as tpr and fpr rise; thresholds[0] is +inf (nothing positive).
    if name == "sensitivity":
        index = int(np.argmax(tpr >= target - 1e-12))  # the first (highest) threshold reaching it
    else:
        index = int(np.flatnonzero(1.0 - fpr >= target - 1e-12)[-1])  # the last (lowest) one keeping it
    return float(min(thresholds[index], 1.0))


@dataclass(frozen=True)
class Temperature:
    """Temperature scaling of a binary classifier's probabilities: ``sigmoid(logit(p) / T)``."""

    value: float = 1.0

    def apply(self, probs: np.ndarray) -> np.ndarray:
        return expit(logit(probs) / self.value)


def logit(probs: np.ndarray) -> np.ndarray:
    """log(p / (1 - p)): the difference of the two logits a softmax head produced."""
    p = np.clip(np.asarray(probs, dtype=np.float64), EPS, 1.0 - EPS)
    return np.log(p) - np.log1p(-p)


def negative_log_likelihood(labels: np.ndarray, probs: np.ndarray) -> float:
    p = np.clip(np.asarray(probs, dtype=np.float64), EPS, 1.0 - EPS)
    labels = np.asarray(labels).astype(int)
    return float(-np.mean(labels * np.log(p) + (1 - labels) * np.log1p(-p)))


def fit_temperature(labels: np.ndarray, probs: np.ndarray) -> Temperature:
    """The temperature minimising validation NLL (bounded 1-D search over log T in [-4, 4])."""
    z = logit(probs)
    labels = np.asarray(labels).astype(int)

    def nll(log_t: float) -> float:
        return negative_log_likelihood(labels, expit(z / np.exp(log_t)))

    best = minimize_scalar(nll, bounds=(-4.0, 4.0), method="bounded")
    return Temperature(float(np.exp(best.x))) if best.fun <= nll(0.0) else Temperature()


def expected_calibration_error(labels: np.ndarray, probs: np.ndarray, bins: int = 10) -> float:
    """ECE of the positive-class probability: mean |observed rate - mean prob| over equal-width bins."""
    labels = np.asarray(labels).astype(int)
    probs = np.asarray(probs, dtype=np.float64)
    which = np.minimum((probs * bins).astype(int), bins - 1)
    total = 0.0
    for b in range(bins):
        members = which == b
        if members.any():
            total += members.sum() * abs(labels[members].mean() - probs[members].mean())
    return float(total / max(len(labels), 1))


def calibration_report(labels: np.ndarray, probs: np.ndarray) -> dict[str, float]:
    """NLL, Brier score and ECE of positive-class probabilities (lower is better)."""
    return {"nll": negative_log_likelihood(labels, probs),
            "brier": float(skm.brier_score_loss(np.asarray(labels).astype(int), probs)),
            "ece": expected_calibration_error(labels, probs)}


@dataclass(frozen=True)
class Decision:
    """A fitted decision rule: calibration, then threshold. What ``metrics.json`` records."""

    policy: str  # eval.threshold as given
    threshold: float  # on the calibrated scale
    temperature: Temperature | None  # None: eval.calibration=none

    def calibrate(self, probs: np.ndarray) -> np.ndarray:
        return self.temperature.apply(probs) if self.temperature is not None else np.asarray(probs)

    def describe(self) -> dict:
        return {"threshold_policy": self.policy, "threshold": self.threshold,
                "calibration": "temperature" if self.temperature is not None else "none",
                "temperature": self.temperature.value if self.temperature is not None else None}


def fit_decision(policy: str, calibration: str, labels: np.ndarray, probs: np.ndarray) -> Decision:
    """Fit ``calibration`` (none | temperature), then pick the threshold by ``policy``, on validation."""
    if calibration not in ("none", "temperature"):
        raise ConfigError(f"eval.calibration={calibration!r} is not one of none, temperature.")
    temperature = fit_temperature(labels, probs) if calibration == "temperature" else None
    calibrated = temperature.apply(probs) if temperature is not None else np.asarray(probs)
    return Decision(policy, choose_threshold(policy, labels, calibrated), temperature)
