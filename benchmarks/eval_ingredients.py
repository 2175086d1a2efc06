"""The recipe's evaluation-only ingredients, measured on a finished ablation's checkpoints.

    PYTHONPATH=.pyroot python benchmarks/eval_ingredients.py runs/paper/recipe_ablation_cpu \
        --data ../shared/data/chest_xray
    PYTHONPATH=.pyroot python benchmarks/eval_ingredients.py runs/paper/recipe_ablation_cpu_fedbn \
        --data ../shared/data/chest_xray --variants default,class_weights --rules youden,adabn,sites

Test-time augmentation, temperature scaling, the threshold policies, BatchNorm statistics
re-estimated on the test images (AdaBN, transductive) and an ensemble of the seeds change
nothing in training, so they need no trials of their own: each is applied to the checkpoint
a trial saved (``best.pt`` centrally, ``model.pt`` federated) and compared with the default
decision rule (Youden's J on validation, no TTA) on the same checkpoint, paired by seed,
with the sweep's own statistics (``rwft.experiments.stats.compare_arms``: mean difference,
t-interval, paired t, Wilcoxon). Every rule is fitted on the validation split the trial
itself used (the seed's stratified carve); the test split is never seen before it is scored.

Rules: ``youden`` (the reference), ``tta`` (``--tta`` augmented views), ``temperature``,
``sensitivity:0.95``, ``specificity:0.90``, ``adabn`` (transductive: BatchNorm statistics
re-estimated on validation and on the test images, unlabelled) and, for a FedBN sweep
(``federation.local_bn``), ``sites``: each site's own model (the shared weights with the
BatchNorm layers that stayed at the site, ``sites/*/local-weights``) scored, the sites'
metrics averaged. A FedBN trial's own numbers score the shared weights with the backbone's
initial BatchNorm (``rwft.server.holdout``), which understates every site's model; ``sites``
and ``adabn`` are the numbers to read there. With ``--variants all`` (or a list) more variants
than ``default`` are scored (the variants compared with ``default`` under each rule, the rules
with ``youden`` within each variant).

The ensemble (softmax outputs of the setting's default seeds averaged) is one model, not one
per seed, so it is compared with each member on the same test images by DeLong's test. Its
threshold is fitted on the first seed's validation split, on which the other members may
have trained: that can only bias its threshold-dependent numbers, never its AUROC.

Writes ``OUT/results.csv`` (one row per trial and rule), ``OUT/comparisons.csv`` and
``OUT/ensemble.csv``, and prints the Markdown tables.
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from rwft.core.config import with_overrides
from rwft.core.data import load_splits
from rwft.core.metrics import METRIC_NAMES
from rwft.core.predict import TrainedModel, load_trained_model
from rwft.core.testtime import predict_ensemble, score
from rwft.core.thresholds import calibration_report
from rwft.experiments.results import collect, sweep_keys
from rwft.experiments.stats import compare_arms, delong_test
from rwft.experiments.trials import REFERENCE_VARIANT, SETTING_KEY, VARIANT_KEY

# The rules made by eval.* overrides alone; the first is the reference.
OVERRIDE_RULES = {
    "youden": [],
    "tta": ["eval.tta={tta}"],
    "temperature": ["eval.calibration=temperature"],
    "sensitivity:0.95": ["eval.threshold=sensitivity:0.95"],
    "specificity:0.90": ["eval.threshold=specificity:0.90"],
}
RULES = (*OVERRIDE_RULES, "adabn", "sites")
REFERENCE_RULE = "youden"
CHECKPOINTS = ("best.pt", "model.pt")  # a centralised run's best epoch; a federation's final global model
SHOWN_METRICS = ("auroc", "accuracy", "sensitivity", "specificity", "test_ece")
CALIBRATION_COLUMNS = ("test_nll", "test_brier", "test_ece")


def checkpoint_of(run_dir: Path) -> Path:
    for name in CHECKPOINTS:
        if (run_dir / name).is_file():
            return run_dir / name
    sys.exit(f"{run_dir} holds none of {', '.join(CHECKPOINTS)}: is the trial complete?")


def test_values(test: dict) -> dict[str, float]:
    return {name: float(test[name]["value"]) for name in METRIC_NAMES}


def scored(models: list[torch.nn.Module], splits, cfg) -> dict[str, float]:
    """Test metrics at the rule's threshold, and how well calibrated its test probabilities are."""
    scores = score(models, splits, cfg)
    calibration = calibration_report(splits.test.labels, scores.test_probs)
    return test_values(scores.metrics["test"]) | {f"test_{name}": value for name, value in calibration.items()}


def site_models(trained: TrainedModel, run_dir: Path) -> list[torch.nn.Module]:
    """Each site's model of a FedBN federation: the shared weights with the site's own BatchNorm."""
    files = sorted(run_dir.glob("sites/*/local-weights/*.pt"))
    if not files:
        sys.exit(f"{run_dir}: no sites/*/local-weights/*.pt (the sites' BatchNorm): not a FedBN trial?")
    models = []
    for file in files:
        model = copy.deepcopy(trained.model)
        local = torch.load(file, map_location="cpu", weights_only=True)
        # strict=False because only the BatchNorm layers are in the file; a name that fits no layer
        # would leave the global BatchNorm in place and score the wrong model.
        unexpected = model.load_state_dict(local, strict=False).unexpected_keys
        if not local or unexpected:
            sys.exit(f"{file} does not hold this model's BatchNorm layers ({len(local)} tensors, "
                     f"{len(unexpected)} that fit no layer, e.g. {unexpected[:2]}).")
        models.append(model.eval())
    return models


def score_rule(rule: str, trained: TrainedModel, base, splits, run_dir: Path, tta: int) -> dict[str, float]:
    if rule in OVERRIDE_RULES:
        cfg = with_overrides(base, [o.format(tta=tta) for o in OVERRIDE_RULES[rule]])
        return scored([trained.model], splits, cfg)
    if rule == "adabn":  # its test probabilities stay inside the transductive report: no calibration columns
        metrics = score([trained.model], splits, with_overrides(base, ["eval.adabn=true"])).metrics
        return test_values(metrics["test_transductive"]["test"])
    per_site = [scored([model], splits, base) for model in site_models(trained, run_dir)]
    return {name: float(np.mean([values[name] for values in per_site])) for name in per_site[0]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("sweep_dir", type=Path)
    parser.add_argument("--data", help="data.root of the trials (default: the one in their config)")
    parser.add_argument("--variants", default=REFERENCE_VARIANT,
                        help="comma-separated variants whose trials are scored (default: default), or all")
    parser.add_argument("--rules", default=",".join(RULES[:-1]),
                        help=f"comma-separated, from {', '.join(RULES)} (default: all but sites)")
    parser.add_argument("--tta", type=int, default=4, help="augmented views for the tta rule")
    parser.add_argument("--bootstrap", type=int, default=200, help="bootstrap resamples per score")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--out", type=Path, default=None, help="default: SWEEP_DIR/eval_ingredients")
    args = parser.parse_args()
    rules = [rule.strip() for rule in args.rules.split(",") if rule.strip()]
    unknown = [rule for rule in rules if rule not in RULES]
    if unknown or REFERENCE_RULE not in rules:
        sys.exit(f"--rules {args.rules}: choose from {', '.join(RULES)}, {REFERENCE_RULE} included (the reference).")
    if args.threads:
        torch.set_num_threads(args.threads)
    if not (args.sweep_dir / "sweep.yaml").is_file():
        sys.exit(f"{args.sweep_dir} is not a sweep directory (no sweep.yaml): pass the output_dir of an rwft sweep.")
    trials = collect(args.sweep_dir, sweep_keys(args.sweep_dir))
    if VARIANT_KEY not in trials:
        trials[VARIANT_KEY] = REFERENCE_VARIANT
    trials = trials[trials["status"] == "complete"]
    if args.variants != "all":
        wanted = [v.strip() for v in args.variants.split(",")]
        unknown = sorted(set(wanted) - set(trials[VARIANT_KEY]))
        if unknown:
            sys.exit(f"--variants {args.variants}: {', '.join(unknown)} has no complete trial in {args.sweep_dir} "
                     f"(it has {', '.join(sorted(set(trials[VARIANT_KEY]))) or 'none'}).")
        trials = trials[trials[VARIANT_KEY].isin(wanted)]
    if trials.empty:
        sys.exit(f"{args.sweep_dir} has no complete trials to score.")
    out = args.out or args.sweep_dir / "eval_ingredients"
    out.mkdir(parents=True, exist_ok=True)

    rows, ensemble_members = [], {}
    for trial in trials.itertuples():
        run_dir = Path(trial.run_dir)
        trained = load_trained_model(checkpoint_of(run_dir))
        # Validation and test exactly as the trial had them (the seed's carve), all of them.
        base = with_overrides(trained.cfg, [*([f"data.root={args.data}"] if args.data else []),
                                            "data.max_train_images=null", f"train.bootstrap={args.bootstrap}"])
        splits = load_splits(base, class_order=list(trained.class_names))
        arm = {SETTING_KEY: getattr(trial, SETTING_KEY), VARIANT_KEY: getattr(trial, VARIANT_KEY),
               "seed": int(trial.seed)}
        for rule in rules:
            if rule == "sites" and not (arm[SETTING_KEY] == "federated" and base.federation.local_bn):
                continue  # no site keeps BatchNorm of its own
            rows.append(arm | {"rule": rule} | score_rule(rule, trained, base, splits, run_dir, args.tta))
            print(f"{' '.join(map(str, arm.values()))} {rule}: AUROC {rows[-1]['auroc']:.3f} "
                  f"accuracy {rows[-1]['accuracy']:.3f}", flush=True)
        if arm[VARIANT_KEY] == REFERENCE_VARIANT:
            ensemble_members.setdefault(arm[SETTING_KEY], []).append((arm["seed"], trained.model, base, splits))

    results = pd.DataFrame(rows)
    results.to_csv(out / "results.csv", index=False)
    keys = [SETTING_KEY, VARIANT_KEY, "rule", "seed"]
    comparisons = compare_arms(results, keys, [*METRIC_NAMES, *CALIBRATION_COLUMNS],
                               references={"rule": REFERENCE_RULE, VARIANT_KEY: REFERENCE_VARIANT})
    pd.DataFrame([c.row() for c in comparisons]).to_csv(out / "comparisons.csv", index=False)
    ensemble_rows = ensemble_table(ensemble_members)
    pd.DataFrame(ensemble_rows).to_csv(out / "ensemble.csv", index=False)

    means = results.groupby(keys[:-1]).mean(numeric_only=True)
    print("\n| compared | within | metric | reference | other | difference [95% CI] | paired t p |")
    print("|---|---|---|---|---|---|---|")
    for c in comparisons:
        if c.metric not in SHOWN_METRICS or c.key == SETTING_KEY or not c.test.n:
            continue  # centralised vs federated is the sweep's own report
        within = dict(item.split("=", 1) for item in c.context.split(", "))
        arm_a, arm_b = within | {c.key: c.a}, within | {c.key: c.b}
        mean_a = means.loc[tuple(str(arm_a[k]) for k in keys[:-1]), c.metric]
        mean_b = means.loc[tuple(str(arm_b[k]) for k in keys[:-1]), c.metric]
        t = c.test
        print(f"| {c.key}: {c.b} vs {c.a} | {c.context} | {c.metric} | {mean_a:.3f} | {mean_b:.3f} "
              f"| {t.mean_diff:+.3f} [{t.ci_low:+.3f}, {t.ci_high:+.3f}] | {t.t_p:.3f} |")
    if ensemble_rows:
        print("\n| setting | member seed | member AUROC | ensemble AUROC | difference [95% CI] | DeLong p |")
        print("|---|---|---|---|---|---|")
        for row in ensemble_rows:
            print(f"| {row[SETTING_KEY]} | {row['member_seed']} | {row['member_auroc']:.3f} | "
                  f"{row['ensemble_auroc']:.3f} | {row['diff']:+.3f} [{row['ci_low']:+.3f}, {row['ci_high']:+.3f}] "
                  f"| {row['p']:.3f} |")
    print(f"\nwrote {out}/results.csv, comparisons.csv, ensemble.csv")
    return 0


def ensemble_table(members: dict[str, list]) -> list[dict]:
    """Per setting: the ensemble of its default seeds vs each member, DeLong on the same test images."""
    rows = []
    for setting, group in members.items():
        if len(group) < 2:
            continue
        group.sort(key=lambda member: member[0])
        _, _, cfg, splits = group[0]
        ensemble = score([model for _, model, _, _ in group], splits, cfg)
        values = test_values(ensemble.metrics["test"])
        for seed, model, _, _ in group:
            # The member's own test outputs: no threshold or bootstrap needed for DeLong.
            single = predict_ensemble([model], splits.test, cfg)[:, 1]
            test = delong_test(splits.test.labels, single, ensemble.test_probs)
            rows.append({SETTING_KEY: setting, "members": len(group), "member_seed": seed,
                         "member_auroc": test.auroc_a, "ensemble_auroc": test.auroc_b, "diff": test.diff,
                         "ci_low": test.ci_low, "ci_high": test.ci_high, "p": test.p}
                        | {f"ensemble_{name}": value for name, value in values.items()})
    return rows


if __name__ == "__main__":
    sys.exit(main())
