"""A sweep's statistics against scipy and hand-computed values on known inputs, DeLong against its definition
and against a paired bootstrap on synthetic scores."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats
from sklearn.metrics import roc_auc_score

from rwft.experiments.stats import (
    compare_arms,
    delong_covariance,
    delong_test,
    paired_bootstrap_auroc,
    paired_test,
    summarise,
    t_interval,
    verdict,
)


def test_t_interval_of_known_values():
    # mean 3, sd sqrt(2.5); t(0.975, 4) = 2.776445: 3 +- 2.776445 * sqrt(2.5 / 5)
    mean, sd, low, high = t_interval([1, 2, 3, 4, 5])
    assert mean == 3 and sd == pytest.approx(math.sqrt(2.5))
    assert (low, high) == pytest.approx((3 - 1.963243, 3 + 1.963243), abs=1e-6)
    assert t_interval([0.9])[1:] == pytest.approx((math.nan,) * 3, nan_ok=True)
    assert t_interval([0.9, math.nan, 0.7])[0] == pytest.approx(0.8)


def test_paired_test_matches_scipy():
    a = np.array([0.91, 0.88, 0.93, 0.90, 0.89, 0.92])
    b = np.array([0.94, 0.90, 0.93, 0.95, 0.91, 0.96])
    result = paired_test(a, b)
    assert result.n == 6 and result.mean_diff == pytest.approx(np.mean(b - a))
    assert result.t_p == pytest.approx(stats.ttest_rel(b, a).pvalue)
    assert result.wilcoxon_p == pytest.approx(stats.wilcoxon(b, a).pvalue)
    half = stats.t.ppf(0.975, 5) * np.std(b - a, ddof=1) / math.sqrt(6)
    assert (result.ci_low, result.ci_high) == pytest.approx((np.mean(b - a) - half, np.mean(b - a) + half))
    assert verdict(result, "scratch", "ImageNet") == "ImageNet better"
    assert verdict(paired_test(b, a), "ImageNet", "scratch") == "ImageNet better"
    assert verdict(paired_test(a, a + np.array([0.01, -0.01, 0.0, 0.02, -0.02, 0.0])), "x", "y") \
        == "no significant difference"
    assert verdict(paired_test(a, a + 0.25), "x", "y").startswith("not testable")  # no spread: no t-test


def test_summary_groups_over_seeds_and_comparisons_pair_them():
    rng = np.random.default_rng(0)
    rows = []
    for pretrained in (True, False):
        for setting in ("centralised", "federated"):
            for seed in range(5):
                rows.append({"model.pretrained": pretrained, "setting": setting, "seed": seed, "image_size": 28,
                             "auroc": 0.9 + 0.03 * pretrained + 0.01 * seed + rng.normal(0, 0.002)})
    results = pd.DataFrame(rows)
    summary = summarise(results, ["model.pretrained", "setting", "seed"], ["auroc"], extra=["image_size"])
    assert len(summary) == 4 and set(summary["n_seeds"]) == {5} and set(summary["image_size"]) == {28}
    row = summary[(summary["model.pretrained"]) & (summary["setting"] == "federated")].iloc[0]
    values = results[(results["model.pretrained"]) & (results["setting"] == "federated")]["auroc"]
    low, high = stats.t.interval(0.95, 4, loc=values.mean(), scale=stats.sem(values))
    assert (row["auroc_mean"], row["auroc_sd"], row["auroc_ci_low"], row["auroc_ci_high"]) == pytest.approx(
        (values.mean(), values.std(ddof=1), low, high))

    comparisons = compare_arms(results, ["model.pretrained", "setting", "seed"], ["auroc"])
    by_key = {(c.key, c.context): c for c in comparisons}
    pretrained = by_key[("model.pretrained", "setting=centralised")]
    assert (pretrained.a, pretrained.b, pretrained.test.n) == ("False", "True", 5)
    assert pretrained.test.mean_diff == pytest.approx(0.03, abs=0.005) and pretrained.test.t_p < 0.001
    assert ("setting", "model.pretrained=True") in by_key


def _slow_delong(labels: np.ndarray, a: np.ndarray, b: np.ndarray) -> tuple[float, float, float]:
    """DeLong's structural components straight from the definition (O(m n)): var a, var b, cov."""
    def components(scores):
        pos, neg = scores[labels == 1], scores[labels == 0]
        psi = (pos[:, None] > neg[None, :]) + 0.5 * (pos[:, None] == neg[None, :])
        return psi.mean(axis=1), psi.mean(axis=0)
    (a10, a01), (b10, b01) = components(a), components(b)
    m, n = len(a10), len(a01)
    cov = np.cov(np.vstack([a10, b10])) / m + np.cov(np.vstack([a01, b01])) / n
    return cov[0, 0], cov[1, 1], cov[0, 1]


def _synthetic(n: int, shift_b: float, seed: int):
    rng = np.random.default_rng(seed)
    labels = (rng.random(n) < 0.6).astype(int)
    shared = rng.normal(0, 1, n)  # the two models see the same hard and easy images: correlated scores
    a = labels * 1.0 + shared + rng.normal(0, 0.7, n)
    b = labels * (1.0 + shift_b) + shared + rng.normal(0, 0.7, n)
    return labels, np.round(a, 1), np.round(b, 1)  # rounded: ties, which the midranks must handle


def test_fast_delong_equals_the_definition_with_ties():
    labels, a, b = _synthetic(300, 0.3, seed=1)
    aucs, cov = delong_covariance(labels, np.vstack([a, b]))
    assert aucs == pytest.approx([roc_auc_score(labels, a), roc_auc_score(labels, b)])
    assert (cov[0, 0], cov[1, 1], cov[0, 1]) == pytest.approx(_slow_delong(labels, a, b), rel=1e-9)


@pytest.mark.parametrize("shift, significant", [(0.0, False), (0.6, True)])
def test_delong_agrees_with_a_paired_bootstrap(shift, significant):
    labels, a, b = _synthetic(600, shift, seed=2)
    delong = delong_test(labels, a, b)
    boot = paired_bootstrap_auroc(labels, a, b, resamples=2000, seed=0)
    assert delong.diff == pytest.approx(boot.diff)
    # Same standard error (the bootstrap's from its interval width), same decision.
    assert (delong.ci_high - delong.ci_low) == pytest.approx(boot.ci_high - boot.ci_low, rel=0.15)
    assert (delong.p < 0.05) == (boot.p < 0.05) == significant
    if significant:
        assert delong.p < 0.001 and delong.ci_low > 0


def test_an_ablation_compares_each_variant_with_the_default_only():
    rng = np.random.default_rng(1)
    effect = {"default": 0.0, "ema": 0.02, "lpft": 0.04}
    results = pd.DataFrame([{"variant": name, "seed": seed, "auroc": 0.85 + shift + 0.01 * seed + rng.normal(0, 0.001)}
                            for name, shift in effect.items() for seed in range(5)])
    comparisons = compare_arms(results, ["variant", "seed"], ["auroc"], references={"variant": "default"})
    assert [(c.a, c.b) for c in comparisons] == [("default", "ema"), ("default", "lpft")]  # not ema vs lpft
    for c in comparisons:
        assert c.test.mean_diff == pytest.approx(effect[c.b], abs=0.003)
    # Without a reference every pair is compared (as for any other key).
    assert len(compare_arms(results, ["variant", "seed"], ["auroc"])) == 3
