"""``rwft report DIR``: a Markdown and HTML report with matplotlib figures, of a sweep or of one run.

For a sweep directory (``rwft sweep``): the metric table with 95% t-intervals over seeds,
a plain verdict per compared key and metric ("ImageNet better", "no significant
difference", ...) with its paired test and p-value, DeLong's test per seed on the shared
test images, and figures: overlaid test ROC curves per configuration (mean over seeds),
validation AUROC per epoch or round (does ImageNet initialisation converge faster?), and
a forest plot of the paired differences.

For a run directory (``rwft train`` or ``rwft simulate``): its test metrics with bootstrap
intervals, its ROC curve and its validation AUROC per epoch or round.
"""

from __future__ import annotations

import html
import json
import math
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # headless
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from markdown_it import MarkdownIt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402
from sklearn import metrics as skm  # noqa: E402

from rwft.core.errors import RwftError  # noqa: E402
from rwft.experiments.results import Tables, build_tables, sweep_variants, trial_history  # noqa: E402
from rwft.experiments.stats import LEVEL, SEED_KEY, verdict  # noqa: E402
from rwft.experiments.trials import PREDICTIONS_FILE, SETTING_KEY  # noqa: E402

REPORT_FILE = "report.md"
FIGURES = "figures"
TABLE_METRICS = ("auroc", "accuracy", "sensitivity", "specificity", "f1")
FOREST_METRICS = ("auroc", "accuracy", "sensitivity", "specificity")
ATTRIBUTION = ("Data: Kermany, Zhang & Goldbaum (2018), Mendeley Data v2, doi:10.17632/rscbjbr9sj.2 "
               "(CC BY 4.0); PneumoniaMNIST from MedMNIST v2 (Yang et al., Scientific Data 2023, CC BY 4.0).")


def write_report(directory: Path, tables: Tables | None = None) -> Path:
    """Write ``report.md``, ``report.html`` and ``figures/*.png`` into ``directory``; returns the Markdown path."""
    directory = Path(directory).resolve()
    if (directory / "sweep.yaml").is_file():
        text = _sweep_report(directory, tables or build_tables(directory))
    elif (directory / "metrics.json").is_file() and (directory / "config.yaml").is_file():
        text = _run_report(directory)
    else:
        raise RwftError(f"{directory} is neither a sweep directory (sweep.yaml) nor a finished run directory "
                        "(config.yaml and metrics.json): pass the output_dir of `rwft sweep`, `rwft train` or "
                        "`rwft simulate`.")
    out = directory / REPORT_FILE
    out.write_text(text)
    out.with_suffix(".html").write_text(_html(text, directory.name))
    return out


# ---------------------------------------------------------------- labels


def arm_label(key: str, value: Any) -> str:
    """How a value reads in a verdict: ``model.pretrained`` true/false -> ImageNet/scratch, else ``key=value``."""
    if key == "model.pretrained":
        return "ImageNet" if str(value).lower() == "true" else "scratch"
    return f"{key.split('.')[-1]}={value}"


def config_label(row: pd.Series, keys: list[str]) -> str:
    """A configuration's name in a figure drawn per setting (so the setting is left out)."""
    return ", ".join(arm_label(k, row[k]) for k in keys if k not in (SEED_KEY, SETTING_KEY)) or "all trials"


def _cell(mean: float, low: float, high: float) -> str:
    if not math.isfinite(mean):
        return "-"
    return f"{mean:.3f} [{low:.3f}, {high:.3f}]" if math.isfinite(low) else f"{mean:.3f}"


def _p(value: float) -> str:
    return "-" if not math.isfinite(value) else ("<0.001" if value < 0.001 else f"{value:.3f}")


def _markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c).replace("|", "/") for c in row) + " |" for row in rows]
    return "\n".join(lines)


# ---------------------------------------------------------------- sweep report


def _sweep_report(directory: Path, tables: Tables) -> str:
    figures = directory / FIGURES
    figures.mkdir(exist_ok=True)
    results, summary, keys = tables.results, tables.summary, tables.keys
    complete = results[results["status"] == "complete"]
    config_keys = [k for k in keys if k != SEED_KEY]
    parts = [f"# Sweep report: {directory.name}", "",
             f"{len(complete)} of {len(results)} trials complete"
             + (f"; not complete: {', '.join(results[results['status'] != 'complete']['trial'])}"
                if len(complete) < len(results) else "") + ".",
             f"Swept keys: {', '.join(f'`{k}`' for k in keys)}. Image size(s): "
             f"{', '.join(str(s) for s in sorted(complete['image_size'].dropna().unique()))} px. Settings: "
             f"{', '.join(sorted(complete[SETTING_KEY].unique()))}.",
             "Every number is on the held-out **test** split; thresholds and the kept epoch were chosen on "
             "validation only.", ""]
    variants = sweep_variants(directory)
    if variants:
        parts += ["Variants (`variant`, each compared with `default` only):", "",
                  *[f"- `{name}`: {', '.join(f'`{o}`' for o in overrides) or 'the sweep as it is'}"
                    for name, overrides in variants.items()], ""]
    if summary.empty:
        parts.append("No trial completed yet: nothing to report.")
        return "\n".join(parts) + "\n"

    parts += [f"## Test metrics per configuration (mean [{LEVEL:.0%} t-interval] over seeds)", ""]
    header = [*[k.split(".")[-1] for k in config_keys], *([SETTING_KEY] if SETTING_KEY not in keys else []),
              "n seeds", *TABLE_METRICS]
    rows = []
    for _, row in summary.iterrows():
        rows.append([*[str(row[k]) for k in config_keys], *([str(row[SETTING_KEY])] if SETTING_KEY not in keys else []),
                     str(row["n_seeds"]),
                     *[_cell(row[f"{m}_mean"], row[f"{m}_ci_low"], row[f"{m}_ci_high"]) for m in TABLE_METRICS]])
    parts += [_markdown_table(header, rows), "", "Per trial: `results.csv`; over seeds: `summary.csv`.", ""]

    parts += ["## Verdicts (paired over matching seeds)", ""]
    if tables.comparisons:
        rows = []
        for c in tables.comparisons:
            a, b = arm_label(c.key, c.a), arm_label(c.key, c.b)
            rows.append([f"{b} vs {a}", c.context or "-", c.metric, str(c.test.n),
                         _cell(c.test.mean_diff, c.test.ci_low, c.test.ci_high), _p(c.test.t_p),
                         _p(c.test.wilcoxon_p), verdict(c.test, a, b)])
        parts += [_markdown_table(["comparison", "other keys", "metric", "n", "difference [95% CI]",
                                   "paired t p", "Wilcoxon p", "verdict"], rows), "",
                  "The verdict reads the paired t-test at alpha = 0.05 (no correction for the number of "
                  "comparisons); the Wilcoxon signed-rank test drops the normality assumption but cannot reach "
                  "p < 0.05 with fewer than 6 seeds. `comparisons.csv` has every number.", "",
                  "![paired differences](figures/forest.png)", ""]
        _forest_figure(tables, figures / "forest.png")
    else:
        parts += ["No two configurations differ in one key over at least two matching seeds.", ""]

    if not tables.auroc_tests.empty:
        parts += ["## AUROC on the same test images, seed by seed (DeLong's test)", ""]
        rows = [[f"{arm_label(r['key'], r['b'])} vs {arm_label(r['key'], r['a'])}", r["context"] or "-",
                 str(r["seed"]), f"{r['auroc_b']:.3f}", f"{r['auroc_a']:.3f}",
                 _cell(r["diff"], r["ci_low"], r["ci_high"]), _p(r["p"])]
                for _, r in tables.auroc_tests.iterrows()]
        parts += [_markdown_table(["comparison", "other keys", "seed", "AUROC b", "AUROC a", "difference [95% CI]",
                                   "DeLong p"], rows), "",
                  "DeLong, DeLong & Clarke-Pearson (1988), fast algorithm of Sun & Xu (2014): two models scored "
                  "on the same images have correlated AUROCs; this test accounts for it. Seeds vary training "
                  "noise, which this within-seed test does not see: read it beside the paired test over seeds.",
                  ""]

    _roc_figure(complete, summary, config_keys, figures / "roc.png")
    _history_figure(complete, config_keys, figures / "val_auroc.png")
    parts += ["## Test ROC curves (mean over seeds)", "", "![ROC curves](figures/roc.png)", "",
              "## Validation AUROC per epoch / round (mean over seeds)", "",
              "![validation AUROC](figures/val_auroc.png)", "",
              f"TensorBoard (HParams compares every trial): `tensorboard --logdir {directory / 'trials'}`", "",
              ATTRIBUTION, ""]
    return "\n".join(parts)


def _settings(frame: pd.DataFrame) -> list[str]:
    return sorted(frame[SETTING_KEY].unique())


def _roc_figure(complete: pd.DataFrame, summary: pd.DataFrame, keys: list[str], out: Path) -> None:
    settings = _settings(complete)
    figure, axes = plt.subplots(1, len(settings), figsize=(5.2 * len(settings), 5), dpi=110, squeeze=False)
    grid = np.linspace(0, 1, 201)
    for ax, setting in zip(axes[0], settings):
        for _, group in _configurations(complete[complete[SETTING_KEY] == setting], keys):
            curves, aurocs = [], []
            for run_dir in group["run_dir"]:
                file = Path(run_dir) / PREDICTIONS_FILE
                if not file.is_file():
                    continue
                data = np.load(file)
                fpr, tpr, _ = skm.roc_curve(data["test_labels"], data["test_probs"])
                curves.append(np.interp(grid, fpr, tpr))
                aurocs.append(skm.roc_auc_score(data["test_labels"], data["test_probs"]))
            if curves:
                ax.plot(grid, np.mean(curves, axis=0), linewidth=1.4,
                        label=f"{config_label(group.iloc[0], keys)} ({np.mean(aurocs):.3f}, n={len(curves)})")
        ax.plot([0, 1], [0, 1], linestyle="--", color="grey", linewidth=0.8)
        ax.set(title=f"{setting}: test ROC", xlabel="1 - specificity", ylabel="sensitivity")
        ax.legend(loc="lower right", fontsize=7, title="configuration (mean AUROC)", title_fontsize=7)
    figure.tight_layout()
    figure.savefig(out)
    plt.close(figure)


def _configurations(frame: pd.DataFrame, keys: list[str]):
    config_keys = [k for k in keys if k != SETTING_KEY]
    if not config_keys:
        return [((), frame)]
    return frame.groupby(config_keys, dropna=False, sort=True)


def _history_figure(complete: pd.DataFrame, keys: list[str], out: Path) -> None:
    settings = _settings(complete)
    figure, axes = plt.subplots(1, len(settings), figsize=(5.2 * len(settings), 4), dpi=110, squeeze=False)
    for ax, setting in zip(axes[0], settings):
        for _, group in _configurations(complete[complete[SETTING_KEY] == setting], keys):
            histories = [dict(trial_history(Path(run_dir))) for run_dir in group["run_dir"]]
            steps = sorted(set().union(*histories)) if histories else []
            if not steps:
                continue
            mean = [np.nanmean([h.get(s, np.nan) for h in histories]) for s in steps]
            ax.plot(steps, mean, marker="o", markersize=3, label=config_label(group.iloc[0], keys))
        ax.set(title=f"{setting}: validation AUROC", xlabel="round" if setting == "federated" else "epoch",
               ylabel="AUROC")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(out)
    plt.close(figure)


def _forest_figure(tables: Tables, out: Path) -> None:
    chosen = [c for c in tables.comparisons if c.metric in FOREST_METRICS]
    figure, ax = plt.subplots(figsize=(8, 0.32 * len(chosen) + 1.2), dpi=110)
    for i, c in enumerate(chosen):
        y = len(chosen) - 1 - i
        low, high = c.test.ci_low, c.test.ci_high
        if math.isfinite(low):
            ax.plot([low, high], [y, y], color="black", linewidth=1)
        colour = "tab:red" if math.isfinite(c.test.t_p) and c.test.t_p < 0.05 else "tab:blue"
        ax.plot([c.test.mean_diff], [y], "s", color=colour, markersize=5)
    ax.axvline(0, color="grey", linestyle="--", linewidth=0.8)
    ax.set_yticks(range(len(chosen)))
    ax.set_yticklabels([f"{c.metric}: {arm_label(c.key, c.b)} - {arm_label(c.key, c.a)}"
                        + (f" [{c.context}]" if c.context else "") for c in reversed(chosen)], fontsize=7)
    ax.set_xlabel(f"paired difference, mean over seeds with {LEVEL:.0%} t-interval (red: p < 0.05)")
    figure.tight_layout()
    figure.savefig(out)
    plt.close(figure)


# ---------------------------------------------------------------- single run


def _run_report(directory: Path) -> str:
    metrics = json.loads((directory / "metrics.json").read_text())
    federated = "rounds" in metrics
    final = metrics.get("final") if federated else metrics
    if final is None:
        raise RwftError(f"{directory} holds a federation without a held-out test report "
                        "(federation.server_eval=false, or it has not finished): nothing to report.")
    figures = directory / FIGURES
    figures.mkdir(exist_ok=True)
    test = final["test"]
    rows = [[name, f"{entry['value']:.3f}",
             f"[{entry['ci95'][0]:.3f}, {entry['ci95'][1]:.3f}]" if entry.get("ci95") else "-"]
            for name, entry in test.items() if isinstance(entry, dict)]
    parts = [f"# Run report: {directory.name}", "",
             f"{'Federated' if federated else 'Centralised'} run; data: {final.get('source', '?')}.",
             f"Test split: {test['num_examples']} images ({test['positives']} positive); threshold "
             f"{final['threshold']:.3f} chosen on validation.", "",
             "## Test metrics (95% bootstrap intervals over test images)", "",
             _markdown_table(["metric", "value", "95% CI"], rows), ""]
    labels, probs = _run_predictions(directory, federated)
    figure, ax = plt.subplots(figsize=(4.6, 4.4), dpi=110)
    fpr, tpr, _ = skm.roc_curve(labels, probs)
    ax.plot(fpr, tpr, label=f"AUROC {skm.roc_auc_score(labels, probs):.3f}")
    ax.plot([0, 1], [0, 1], linestyle="--", color="grey", linewidth=0.8)
    ax.set(xlabel="1 - specificity", ylabel="sensitivity", title="test ROC")
    ax.legend(loc="lower right")
    figure.tight_layout()
    figure.savefig(figures / "roc.png")
    plt.close(figure)
    history = trial_history(directory)
    figure, ax = plt.subplots(figsize=(4.6, 3.6), dpi=110)
    if history:
        ax.plot(*zip(*history), marker="o")
    ax.set(xlabel="round" if federated else "epoch", ylabel="validation AUROC")
    figure.tight_layout()
    figure.savefig(figures / "val_auroc.png")
    plt.close(figure)
    parts += ["## Test ROC curve", "", "![ROC](figures/roc.png)", "",
              "## Validation AUROC per " + ("round" if federated else "epoch"), "",
              "![validation AUROC](figures/val_auroc.png)", "", ATTRIBUTION, ""]
    return "\n".join(parts)


def _run_predictions(directory: Path, federated: bool) -> tuple[np.ndarray, np.ndarray]:
    """Test labels and probabilities: the run's ``predictions.npz``, else its checkpoint scored again."""
    file = directory / PREDICTIONS_FILE
    if file.is_file():
        data = np.load(file)
        return data["test_labels"], data["test_probs"]
    from rwft.core.checkpoint import load_checkpoint
    from rwft.core.config import load_config
    from rwft.core.data import load_splits
    from rwft.core.engine import predict
    from rwft.core.model import build_model

    payload = load_checkpoint(directory / ("model.pt" if federated else "best.pt"))
    cfg = load_config(directory / "config.yaml")
    splits = load_splits(cfg)
    model = build_model(cfg.model, len(payload["class_names"]))
    model.load_state_dict(payload["model"])
    return splits.test.labels, predict(model, splits.test, cfg)[:, 1]


def _html(markdown_text: str, title: str) -> str:
    body = MarkdownIt("commonmark").enable("table").render(markdown_text)
    return (f"<!doctype html>\n<html><head><meta charset='utf-8'><title>{html.escape(title)}</title>\n"
            "<style>body{font-family:sans-serif;max-width:72em;margin:2em auto;padding:0 1em}"
            "table{border-collapse:collapse;font-size:90%}td,th{border:1px solid #ccc;padding:3px 6px}"
            "img{max-width:100%}</style></head><body>\n" + body + "</body></html>\n")
