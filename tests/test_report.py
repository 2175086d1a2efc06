"""``rwft report`` on a sweep directory of known trials: tables, verdicts, DeLong and figures from real files
(trial records, predictions, TensorBoard event files written by rwft's own logger), without training anything."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from rwft.core.checkpoint import write_json
from rwft.core.errors import RwftError
from rwft.core.metrics import binary_metrics
from rwft.core.tblog import RunLogger
from rwft.experiments.report import write_report
from rwft.experiments.results import write_tables
from rwft.experiments.sweep import trial_name


def _write_trial(sweep_dir, params, labels, probs, val_curve):
    name = trial_name(params)
    run_dir = sweep_dir / "trials" / name
    run_dir.mkdir(parents=True)
    test = binary_metrics(labels, probs, 0.5)
    write_json(run_dir / "trial.json", {"name": name, "params": params, "setting": "centralised",
                                        "status": "complete", "image_size": 28, "test": test,
                                        "val_auroc": val_curve[-1], "threshold": 0.5, "seconds": 1.0})
    write_json(run_dir / "metrics.json", {"test": {k: {"value": v, "ci95": None} for k, v in test.items()},
                                          "threshold": 0.5, "val": {}})
    np.savez(run_dir / "predictions.npz", test_labels=labels, test_probs=probs)
    with RunLogger(run_dir / "tb") as logger:
        for epoch, value in enumerate(val_curve, start=1):
            logger.scalar("val/auroc", value, epoch)
    return run_dir


@pytest.fixture
def sweep_dir(tmp_path):
    """ImageNet clearly better than scratch on every one of 5 seeds (same 400 test images)."""
    rng = np.random.default_rng(0)
    labels = (rng.random(400) < 0.6).astype(int)
    (tmp_path / "sweep.yaml").write_text("grid:\n  model.pretrained: [true, false]\n  seed: [0, 1, 2, 3, 4]\n"
                                         "output_dir: x\n")
    for seed in range(5):
        noise = rng.normal(0, 1, 400)
        for pretrained, signal in ((True, 2.0), (False, 0.8)):
            probs = 1 / (1 + np.exp(-(signal * (labels - 0.5) * 2 + noise + rng.normal(0, 0.3, 400))))
            _write_trial(tmp_path, {"model.pretrained": pretrained, "seed": seed}, labels, probs,
                         [0.7, 0.8, 0.85] if pretrained else [0.6, 0.65, 0.7])
    return tmp_path


def test_tables_and_report_of_a_sweep(sweep_dir):
    tables = write_tables(sweep_dir)
    summary = pd.read_csv(sweep_dir / "summary.csv")
    assert list(summary["n_seeds"]) == [5, 5]
    imagenet = tables.results[tables.results["model.pretrained"]]["auroc"]
    row = summary[summary["model.pretrained"]].iloc[0]
    assert (row["auroc_ci_low"], row["auroc_ci_high"]) == pytest.approx(
        stats.t.interval(0.95, 4, loc=imagenet.mean(), scale=stats.sem(imagenet)))
    delong = pd.read_csv(sweep_dir / "auroc_tests.csv")
    assert len(delong) == 5 and (delong["p"] < 0.001).all() and (delong["diff"] > 0).all()

    report = write_report(sweep_dir, tables).read_text()
    verdicts = [line for line in report.splitlines() if line.startswith("| ImageNet vs scratch")]
    auroc = next(line for line in verdicts if "| auroc |" in line)
    assert auroc.rstrip(" |").endswith("ImageNet better"), auroc
    for figure in ("roc.png", "val_auroc.png", "forest.png"):
        assert (sweep_dir / "figures" / figure).stat().st_size > 5000
    html = (sweep_dir / "report.html").read_text()
    assert "<table>" in html and 'src="figures/forest.png"' in html


def test_no_difference_reads_as_no_significant_difference(sweep_dir):
    # Swap which arm is which on half the seeds: the paired difference averages out.
    for path in (sweep_dir / "trials").glob("*/trial.json"):
        record = json.loads(path.read_text())
        if record["params"]["seed"] in (1, 3):
            record["params"]["model.pretrained"] = not record["params"]["model.pretrained"]
            path.write_text(json.dumps(record))
    text = write_report(sweep_dir).read_text()
    auroc = next(line for line in text.splitlines() if line.startswith("| ImageNet vs scratch") and "| auroc |" in line)
    assert "no significant difference" in auroc


def test_report_refuses_a_directory_that_is_neither(tmp_path):
    with pytest.raises(RwftError, match="neither a sweep directory"):
        write_report(tmp_path)
