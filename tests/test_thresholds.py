"""Decision policies (rwft.core.thresholds): fitted on validation, each does what it names."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from rwft.core.config import load_config
from rwft.core.data import load_splits
from rwft.core.engine import fit, predict
from rwft.core.errors import ConfigError
from rwft.core.metrics import binary_metrics, pick_threshold
from rwft.core.model import build_model
from rwft.core.thresholds import (
    choose_threshold,
    fit_decision,
    fit_temperature,
    negative_log_likelihood,
    parse_policy,
)


@pytest.fixture(scope="module")
def val_scores(pneumoniamnist_npz):
    """Validation labels and probabilities of a model trained briefly on real PneumoniaMNIST."""
    cfg = load_config(overrides=["train.device=cpu", "data.image_size=28", "train.batch_size=64",
                                 "data.max_train_images=320", "train.lr=0.002", f"data.root={pneumoniamnist_npz}"])
    splits = load_splits(cfg)
    torch.manual_seed(0)
    model = build_model(cfg.model, 2)
    fit(model, splits, cfg, epochs=1)
    return splits.val.labels, predict(model, splits.val, cfg)[:, 1]


@pytest.mark.parametrize("target", [0.8, 0.95, 0.99])
def test_sensitivity_policy_reaches_the_target_on_validation_as_specifically_as_possible(val_scores, target):
    labels, probs = val_scores
    threshold = choose_threshold(f"sensitivity:{target}", labels, probs)
    assert binary_metrics(labels, probs, threshold)["sensitivity"] >= target
    # Any higher threshold among the scores would miss the target: this one is the most specific.
    higher = np.unique(probs[probs > threshold])
    if len(higher):
        assert binary_metrics(labels, probs, higher[0])["sensitivity"] < target


@pytest.mark.parametrize("target", [0.7, 0.9])
def test_specificity_policy_reaches_the_target_on_validation_as_sensitively_as_possible(val_scores, target):
    labels, probs = val_scores
    threshold = choose_threshold(f"specificity:{target}", labels, probs)
    assert binary_metrics(labels, probs, threshold)["specificity"] >= target
    lower = np.unique(probs[probs < threshold])
    if len(lower):
        assert binary_metrics(labels, probs, lower[-1])["specificity"] < target


def test_youden_policy_is_rwfts_original_threshold(val_scores):
    labels, probs = val_scores
    assert choose_threshold("youden", labels, probs) == pick_threshold(labels, probs)
    a_target = choose_threshold("sensitivity:0.99", labels, probs)
    assert a_target != pick_threshold(labels, probs)  # the policies really differ on this data


@pytest.mark.parametrize("policy", ["youden:0.5", "sensitivity", "sensitivity:1.5", "specificity:x", "f1"])
def test_a_policy_that_does_not_parse_is_a_config_error_naming_the_key(policy):
    with pytest.raises(ConfigError, match="eval.threshold"):
        parse_policy(policy)
    with pytest.raises(ConfigError, match="eval.threshold"):
        load_config(overrides=[f"eval.threshold={policy}"])


def test_temperature_scaling_lowers_validation_nll_and_keeps_the_ranking(val_scores):
    labels, probs = val_scores
    temperature = fit_temperature(labels, probs)
    calibrated = temperature.apply(probs)
    assert temperature.value != pytest.approx(1.0, abs=0.02)
    assert negative_log_likelihood(labels, calibrated) < negative_log_likelihood(labels, probs) - 1e-3
    assert np.array_equal(np.argsort(calibrated, kind="stable"), np.argsort(probs, kind="stable"))
    # An overconfident model (logits doubled) is cooled down by about that factor.
    rng = np.random.default_rng(0)
    truth = rng.random(4000)
    sharp_labels = (rng.random(4000) < truth).astype(int)
    sharp = 1 / (1 + np.exp(-2 * np.log(truth / (1 - truth))))
    assert fit_temperature(sharp_labels, sharp).value == pytest.approx(2.0, rel=0.1)


def test_a_decision_records_its_policy_and_applies_the_threshold_on_the_calibrated_scale(val_scores):
    labels, probs = val_scores
    decision = fit_decision("sensitivity:0.95", "temperature", labels, probs)
    described = decision.describe()
    assert described["threshold_policy"] == "sensitivity:0.95" and described["calibration"] == "temperature"
    assert binary_metrics(labels, decision.calibrate(probs), decision.threshold)["sensitivity"] >= 0.95
    plain = fit_decision("youden", "none", labels, probs)
    assert plain.temperature is None and plain.describe()["temperature"] is None
