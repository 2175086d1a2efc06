"""The statistics of a sweep: summaries over seeds, paired comparisons, and AUROC tests on shared test images.

- **Over seeds** (``t_interval``, ``summarise``): each configuration's mean, standard
  deviation and Student-t 95% interval over its seeds (``scipy.stats.t``). Seeds are the
  replicates: they vary initialisation of the head, data order, augmentation and, for
  federations, the partition into sites.
- **Paired over seeds** (``paired_test``, ``compare_arms``): two arms that differ in one key
  (``model.pretrained`` true vs false) and share every other key are paired seed by seed.
  The mean difference gets a t-interval, with the paired t-test (``scipy.stats.ttest_rel``)
  and the Wilcoxon signed-rank test (``scipy.stats.wilcoxon``, no normality assumption).
- **Within a seed, on the same test images** (``delong_test``, ``paired_bootstrap_auroc``):
  two models scored on the same images have correlated AUROCs. DeLong, DeLong &
  Clarke-Pearson (Biometrics 1988) estimate the covariance from the structural
  components; ``delong_covariance`` is the fast O(n log n) algorithm of Sun & Xu,
  "Fast Implementation of DeLong's Algorithm for Comparing the Areas Under Correlated
  Receiver Operating Characteristic Curves", IEEE Signal Processing Letters 21(11), 2014.
  scipy has no DeLong test; the paired bootstrap is the assumption-light cross-check.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass

import numpy as np
import pandas as pd
from scipy import stats

LEVEL = 0.95  # every interval in a sweep's tables and report
SEED_KEY = "seed"


def t_interval(values: Sequence[float], level: float = LEVEL) -> tuple[float, float, float, float]:
    """``(mean, sd, ci_low, ci_high)`` of ``values``: sample sd (n-1) and the Student-t interval of the mean.

    NaN values are dropped. With fewer than two values sd and interval are NaN (a single
    seed says nothing about the spread).
    """
    array = np.asarray(values, dtype=np.float64)
    array = array[np.isfinite(array)]
    if len(array) == 0:
        return (math.nan,) * 4
    mean = float(np.mean(array))
    if len(array) < 2:
        return mean, math.nan, math.nan, math.nan
    sd = float(np.std(array, ddof=1))
    if sd == 0.0:
        return mean, 0.0, mean, mean
    low, high = stats.t.interval(level, len(array) - 1, loc=mean, scale=sd / math.sqrt(len(array)))
    return mean, sd, float(low), float(high)


def summarise(results: pd.DataFrame, keys: Sequence[str], metrics: Sequence[str],
              extra: Sequence[str] = ()) -> pd.DataFrame:
    """One row per configuration (``keys`` without the seed): ``n_seeds`` and ``<metric>_mean/_sd/_ci_low/_ci_high``.

    ``extra`` columns (image size, centralised/federated) are carried along: they are the
    same within a configuration, or listed with ``;`` where they are not.
    """
    group_keys = [key for key in keys if key != SEED_KEY]
    rows = []
    grouped = results.groupby(group_keys, dropna=False, sort=True) if group_keys else [((), results)]
    for values, group in grouped:
        values = values if isinstance(values, tuple) else (values,)
        row: dict[str, object] = dict(zip(group_keys, values))
        for column in extra:
            if column not in group_keys and column in group:
                distinct = sorted({str(v) for v in group[column]})
                row[column] = group[column].iloc[0] if len(distinct) == 1 else ";".join(distinct)
        row["n_seeds"] = int(group[SEED_KEY].nunique()) if SEED_KEY in group else len(group)
        for metric in metrics:
            mean, sd, low, high = t_interval(group[metric]) if metric in group else (math.nan,) * 4
            row |= {f"{metric}_mean": mean, f"{metric}_sd": sd, f"{metric}_ci_low": low, f"{metric}_ci_high": high}
        rows.append(row)
    return pd.DataFrame(rows)


@dataclass(frozen=True)
class PairedTest:
    """Arm ``b`` minus arm ``a`` over ``n`` paired seeds."""

    n: int
    mean_diff: float
    ci_low: float
    ci_high: float
    t_p: float  # paired t-test, two-sided
    wilcoxon_p: float  # Wilcoxon signed-rank, two-sided (exact for small n without ties)


def paired_test(a: Sequence[float], b: Sequence[float], level: float = LEVEL) -> PairedTest:
    """Paired comparison of ``b - a``; pairs with a NaN on either side are dropped.

    p-values are NaN where the test is undefined (fewer than two pairs; every difference zero;
    for the t-test also every difference equal).
    """
    a_arr, b_arr = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    keep = np.isfinite(a_arr) & np.isfinite(b_arr)
    a_arr, b_arr = a_arr[keep], b_arr[keep]
    diff = b_arr - a_arr
    mean, _, low, high = t_interval(diff, level)
    t_p = w_p = math.nan
    if len(diff) >= 2 and np.any(diff != 0):
        with warnings.catch_warnings():  # scipy warns about small samples; the n is in the table
            warnings.simplefilter("ignore")
            # Every difference equal: no spread to test against (t would be infinite): left NaN.
            if np.ptp(diff) > 1e-12:
                t_p = float(stats.ttest_rel(b_arr, a_arr).pvalue)
            w_p = float(stats.wilcoxon(b_arr, a_arr).pvalue)
    return PairedTest(len(diff), mean, low, high, t_p, w_p)


def _midranks(x: np.ndarray) -> np.ndarray:
    """Midranks (ties share the average rank), 1-based, along the last axis."""
    return stats.rankdata(x, method="average", axis=-1)


def delong_covariance(labels: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """AUROCs and their DeLong covariance matrix for ``k`` score vectors on the same images.

    ``labels``: ``(n,)`` 0/1. ``scores``: ``(k, n)`` (or ``(n,)`` for one model), higher =
    more likely positive. Returns ``(aucs (k,), covariance (k, k))``. The midrank
    formulation of Sun & Xu (2014): O(k n log n) instead of DeLong's O(k m n).
    """
    labels = np.asarray(labels).astype(int)
    scores = np.atleast_2d(np.asarray(scores, dtype=np.float64))
    positives, negatives = scores[:, labels == 1], scores[:, labels == 0]
    m, n = positives.shape[1], negatives.shape[1]
    if m < 2 or n < 2:
        raise ValueError(f"DeLong's test needs at least two images of each class, got {m} positive and {n} negative")
    tx, ty = _midranks(positives), _midranks(negatives)
    tz = _midranks(np.concatenate([positives, negatives], axis=1))
    aucs = tz[:, :m].sum(axis=1) / (m * n) - (m + 1.0) / (2.0 * n)
    v10 = (tz[:, :m] - tx) / n  # per positive: the share of negatives it outranks
    v01 = 1.0 - (tz[:, m:] - ty) / m  # per negative: the share of positives that outrank it
    covariance = np.atleast_2d(np.cov(v10)) / m + np.atleast_2d(np.cov(v01)) / n
    return aucs, covariance


@dataclass(frozen=True)
class AurocTest:
    """AUROC of model ``b`` minus model ``a`` on the same test images."""

    auroc_a: float
    auroc_b: float
    diff: float
    ci_low: float
    ci_high: float
    p: float
    method: str


def delong_test(labels: np.ndarray, scores_a: np.ndarray, scores_b: np.ndarray, level: float = LEVEL) -> AurocTest:
    """DeLong's two-sided test of equal AUROC for two models scored on the same images."""
    aucs, cov = delong_covariance(labels, np.vstack([scores_a, scores_b]))
    diff = float(aucs[1] - aucs[0])
    variance = float(cov[0, 0] + cov[1, 1] - 2.0 * cov[0, 1])
    if variance <= 0.0:  # identical rankings: no difference and no uncertainty about it
        return AurocTest(float(aucs[0]), float(aucs[1]), diff, diff, diff, 1.0 if diff == 0 else 0.0, "DeLong")
    se = math.sqrt(variance)
    z = stats.norm.ppf(0.5 + level / 2)
    p = float(2.0 * stats.norm.sf(abs(diff) / se))
    return AurocTest(float(aucs[0]), float(aucs[1]), diff, diff - z * se, diff + z * se, p, "DeLong")


def paired_bootstrap_auroc(labels: np.ndarray, scores_a: np.ndarray, scores_b: np.ndarray, *,
                           resamples: int = 2000, seed: int = 0, level: float = LEVEL) -> AurocTest:
    """The AUROC difference resampled over images (the same resample for both models).

    Percentile interval; the two-sided p-value is twice the smaller share of resampled
    differences on either side of zero. Resamples with a single class are drawn again.
    """
    from sklearn.metrics import roc_auc_score

    labels = np.asarray(labels).astype(int)
    a, b = np.asarray(scores_a, np.float64), np.asarray(scores_b, np.float64)
    rng = np.random.default_rng(seed)
    diffs = []
    while len(diffs) < resamples:
        index = rng.integers(0, len(labels), len(labels))
        if labels[index].min() == labels[index].max():
            continue
        diffs.append(roc_auc_score(labels[index], b[index]) - roc_auc_score(labels[index], a[index]))
    array = np.asarray(diffs)
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(array, [tail, 100 - tail])
    p = min(1.0, 2.0 * min(np.mean(array <= 0), np.mean(array >= 0)))
    auc_a, auc_b = roc_auc_score(labels, a), roc_auc_score(labels, b)
    return AurocTest(float(auc_a), float(auc_b), float(auc_b - auc_a), float(low), float(high), float(p),
                     f"paired bootstrap ({resamples})")


@dataclass(frozen=True)
class Comparison:
    """Arms that differ only in ``key`` (``a`` vs ``b``), every other key as in ``context``, paired by seed."""

    key: str
    a: str
    b: str
    context: str  # "k=v, ..." of the keys the two arms share
    metric: str
    test: PairedTest
    pairs: tuple[tuple[object, object, object], ...] = ()  # (seed, row label in arm a, row label in arm b)

    def row(self) -> dict[str, object]:
        return {"key": self.key, "a": self.a, "b": self.b, "context": self.context, "metric": self.metric} \
            | asdict(self.test)


def compare_arms(results: pd.DataFrame, keys: Sequence[str], metrics: Sequence[str],
                 references: Mapping[str, str] | None = None) -> list[Comparison]:
    """Every paired comparison the results allow (see the module docstring).

    For each key with two or more values, each pair of its values and each combination of
    the other keys: the seeds both arms have are paired. A key in ``references`` whose
    reference value is present is compared reference vs each other value only (an ablation:
    every ingredient against the default, not against one another). Pairs with under two
    seeds are left out (nothing to test).
    """
    varied = [key for key in keys if key != SEED_KEY and results[key].nunique(dropna=False) > 1]
    comparisons = []
    for key in varied:
        others = [k for k in keys if k not in (key, SEED_KEY)]
        values = sorted(results[key].dropna().unique(), key=str)
        reference = (references or {}).get(key)
        if reference is not None and reference in {str(v) for v in values}:
            pairs_of_values = [(reference, v) for v in values if str(v) != reference]
        else:
            pairs_of_values = [(a, b) for i, a in enumerate(values) for b in values[i + 1:]]
        groups = results.groupby(others, dropna=False, sort=True) if others else [((), results)]
        for context_values, group in groups:
            context_values = context_values if isinstance(context_values, tuple) else (context_values,)
            context = ", ".join(f"{k}={v}" for k, v in zip(others, context_values))
            for value_a, value_b in pairs_of_values:
                arm_a = group[group[key] == value_a].reset_index().set_index(SEED_KEY)
                arm_b = group[group[key] == value_b].reset_index().set_index(SEED_KEY)
                seeds = sorted(set(arm_a.index) & set(arm_b.index))
                if len(seeds) < 2:
                    continue
                pairs = tuple((seed, arm_a.loc[seed, "index"], arm_b.loc[seed, "index"]) for seed in seeds)
                for metric in metrics:
                    test = paired_test(arm_a.loc[seeds, metric], arm_b.loc[seeds, metric])
                    comparisons.append(Comparison(key, str(value_a), str(value_b), context, metric, test, pairs))
    return comparisons


def verdict(test: PairedTest, a: str, b: str, alpha: float = 0.05) -> str:
    """A plain reading of a paired test: "``b`` better", "``a`` better" or "no significant difference"."""
    if not math.isfinite(test.t_p):
        return "not testable (fewer than two paired seeds, or no spread in the differences)"
    if test.t_p >= alpha:
        return "no significant difference"
    return f"{b} better" if test.mean_diff > 0 else f"{a} better"
