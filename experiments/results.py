"""A sweep's tables, built from its trials' run directories (whichever backend ran them).

- ``results.csv``: one row per trial: its parameters, ``setting`` (centralised or federated),
  ``image_size``, status, every test metric, validation AUROC, attempts, seconds, run directory.
- ``summary.csv``: one row per configuration (parameters without the seed): ``n_seeds`` and
  ``<metric>_mean``, ``_sd``, ``_ci_low``, ``_ci_high`` (t-interval over seeds) for every test
  metric, with ``setting`` and ``image_size``.
- ``comparisons.csv``: each pair of arms that differ in one key, paired over matching seeds
  (mean difference with its t-interval, paired t-test, Wilcoxon signed-rank).
- ``auroc_tests.csv``: the same pairs seed by seed on the same test images: DeLong's test of
  the two AUROCs (``rwft.experiments.stats``).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from omegaconf import OmegaConf

from rwft.core.metrics import METRIC_NAMES
from rwft.experiments.stats import Comparison, compare_arms, delong_test, summarise
from rwft.experiments.trials import (
    ATTEMPTS_FILE,
    PREDICTIONS_FILE,
    REFERENCE_VARIANT,
    SETTING_KEY,
    VARIANT_KEY,
    read_trial,
)

RESULTS_FILE, SUMMARY_FILE, COMPARISONS_FILE, AUROC_TESTS_FILE = (
    "results.csv", "summary.csv", "comparisons.csv", "auroc_tests.csv")
EXTRA_COLUMNS = (SETTING_KEY, "image_size")  # carried into summary.csv even when not swept


@dataclass
class Tables:
    keys: list[str]  # the sweep's parameters, seed included
    results: pd.DataFrame
    summary: pd.DataFrame
    comparisons: list[Comparison]
    auroc_tests: pd.DataFrame


def _saved_sweep(sweep_dir: Path) -> dict[str, Any]:
    """The resolved sweep file a sweep directory keeps (``sweep.yaml``)."""
    return OmegaConf.to_container(OmegaConf.load(sweep_dir / "sweep.yaml"), resolve=True)  # type: ignore[return-value]


def sweep_keys(sweep_dir: Path) -> list[str]:
    """The swept keys, in the sweep file's order (``sweep.yaml`` in the sweep directory)."""
    saved = _saved_sweep(sweep_dir)
    return [*((saved.get("grid") or {}).keys()), *((saved.get("sample") or {}).keys())]


def sweep_variants(sweep_dir: Path) -> dict[str, list[str]]:
    """The sweep's named variants (name -> its overrides), in the sweep file's order; empty if it has none."""
    variants = _saved_sweep(sweep_dir).get("variants") or {}
    return {str(name): list(overrides or []) for name, overrides in variants.items()}


def collect(sweep_dir: Path, keys: Sequence[str]) -> pd.DataFrame:
    """One row per trial run directory under ``sweep_dir/trials`` (empty if none started)."""
    rows = []
    for run_dir in sorted((sweep_dir / "trials").glob("*/")):
        record = read_trial(run_dir)
        if record is None:
            continue
        attempts = run_dir / ATTEMPTS_FILE
        row = {"trial": record["name"], "status": record["status"]} | {k: record["params"].get(k) for k in keys}
        row |= {SETTING_KEY: record["setting"], "image_size": record.get("image_size")}
        row |= {metric: record.get("test", {}).get(metric, np.nan) for metric in METRIC_NAMES}
        row |= {"val_auroc": record.get("val_auroc", np.nan), "threshold": record.get("threshold", np.nan),
                "attempts": len(attempts.read_text().splitlines()) if attempts.is_file() else 0,
                "seconds": record.get("seconds", np.nan), "run_dir": str(run_dir)}
        rows.append(row)
    columns = ["trial", "status", *keys, *[c for c in EXTRA_COLUMNS if c not in keys], *METRIC_NAMES,
               "val_auroc", "threshold", "attempts", "seconds", "run_dir"]
    return pd.DataFrame(rows, columns=list(dict.fromkeys(columns)))


def build_tables(sweep_dir: Path, keys: Sequence[str] | None = None) -> Tables:
    keys = list(keys if keys is not None else sweep_keys(sweep_dir))
    results = collect(sweep_dir, keys)
    complete = results[results["status"] == "complete"].reset_index(drop=True)
    summary = summarise(complete, keys, METRIC_NAMES, extra=EXTRA_COLUMNS) if len(complete) else pd.DataFrame()
    comparisons = compare_arms(complete, keys, METRIC_NAMES, {VARIANT_KEY: REFERENCE_VARIANT}) if len(complete) else []
    return Tables(keys, results, summary, comparisons, _auroc_tests(complete, comparisons))


def _auroc_tests(complete: pd.DataFrame, comparisons: list[Comparison]) -> pd.DataFrame:
    rows = []
    for comparison in comparisons:
        if comparison.metric != "auroc":
            continue
        for seed, index_a, index_b in comparison.pairs:
            a, b = (np.load(Path(complete.loc[i, "run_dir"]) / PREDICTIONS_FILE) for i in (index_a, index_b))
            if not np.array_equal(a["test_labels"], b["test_labels"]):
                continue  # different test images (a different dataset): no paired test exists
            test = delong_test(a["test_labels"], a["test_probs"], b["test_probs"])
            rows.append({"key": comparison.key, "a": comparison.a, "b": comparison.b, "context": comparison.context,
                         "seed": seed} | asdict(test))
    return pd.DataFrame(rows)


def write_tables(sweep_dir: Path, keys: Sequence[str] | None = None) -> Tables:
    """Build the tables and write the four CSV files into ``sweep_dir``."""
    tables = build_tables(sweep_dir, keys)
    tables.results.to_csv(sweep_dir / RESULTS_FILE, index=False)
    tables.summary.to_csv(sweep_dir / SUMMARY_FILE, index=False)
    pd.DataFrame([c.row() for c in tables.comparisons]).to_csv(sweep_dir / COMPARISONS_FILE, index=False)
    tables.auroc_tests.to_csv(sweep_dir / AUROC_TESTS_FILE, index=False)
    return tables


def trial_history(run_dir: Path) -> list[tuple[int, float]]:
    """Validation AUROC per epoch (centralised) or round (federated, the server's held-out val) of a trial."""
    metrics_file = run_dir / "metrics.json"
    if metrics_file.is_file():
        metrics = json.loads(metrics_file.read_text())
        if "rounds" in metrics:
            return [(r["round"], r["global"]["auroc"]) for r in metrics["rounds"] if "auroc" in r.get("global", {})]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tb"), size_guidance={"scalars": 0})
    events.Reload()
    tag = "val/auroc" if "val/auroc" in events.Tags()["scalars"] else "global/auroc"
    if tag not in events.Tags()["scalars"]:
        return []
    return [(int(e.step), float(e.value)) for e in events.Scalars(tag)]
