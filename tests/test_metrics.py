import math

import numpy as np
import pytest

from rwft.core.metrics import binary_metrics, bootstrap_ci, pick_threshold, report


def test_binary_metrics_on_a_hand_counted_case():
    labels = np.array([0, 0, 1, 1])
    probs = np.array([0.1, 0.6, 0.4, 0.9])  # at 0.5: tn=1 fp=1 fn=1 tp=1
    metrics = binary_metrics(labels, probs, threshold=0.5)
    assert metrics["sensitivity"] == pytest.approx(0.5)
    assert metrics["specificity"] == pytest.approx(0.5)
    assert metrics["precision"] == pytest.approx(0.5)
    assert metrics["accuracy"] == pytest.approx(0.5)
    # 3 of the 4 (positive, negative) pairs are ranked correctly.
    assert metrics["auroc"] == pytest.approx(0.75)


def test_single_class_leaves_rank_metrics_undefined_and_threshold_at_half():
    labels = np.ones(5, dtype=int)
    probs = np.linspace(0.1, 0.9, 5)
    metrics = binary_metrics(labels, probs)
    assert math.isnan(metrics["auroc"]) and math.isnan(metrics["specificity"])
    assert metrics["sensitivity"] == pytest.approx(0.6)
    assert pick_threshold(labels, probs) == 0.5


def test_threshold_from_validation_separates_separable_classes():
    labels = np.array([0, 0, 0, 1, 1, 1])
    probs = np.array([0.05, 0.1, 0.2, 0.3, 0.35, 0.4])  # separable, but not at 0.5
    threshold = pick_threshold(labels, probs)
    assert 0.2 < threshold <= 0.3
    assert binary_metrics(labels, probs, threshold)["accuracy"] == 1.0
    assert binary_metrics(labels, probs, 0.5)["accuracy"] == 0.5


def test_bootstrap_interval_brackets_the_estimate_and_shrinks_with_more_data():
    rng = np.random.default_rng(0)

    def noisy(n):
        labels = rng.integers(0, 2, n)
        return labels, np.clip(0.35 * labels + 0.65 * rng.random(n), 0, 1)

    small_labels, small_probs = noisy(80)
    big_labels, big_probs = noisy(2000)
    small = bootstrap_ci(small_labels, small_probs, 0.5, resamples=200, seed=1)
    big = bootstrap_ci(big_labels, big_probs, 0.5, resamples=200, seed=1)
    point = binary_metrics(small_labels, small_probs, 0.5)
    for name in ("auroc", "accuracy", "sensitivity"):
        low, high = small[name]
        assert low <= point[name] <= high
        assert (big[name][1] - big[name][0]) < (high - low)


def test_report_is_reproducible_with_a_seed():
    labels = np.array([0, 1] * 30)
    probs = np.linspace(0, 1, 60)
    assert report(labels, probs, 0.5, resamples=50, seed=3) == report(labels, probs, 0.5, resamples=50, seed=3)
