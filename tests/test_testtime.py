"""Evaluation-time ingredients (rwft.core.testtime) and what rwft train/evaluate record with them.

Real PneumoniaMNIST at 28 px, a few hundred training images, one epoch.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch.nn.modules.batchnorm import _BatchNorm

from rwft.core.cli import main
from rwft.core.config import load_config
from rwft.core.data import load_splits
from rwft.core.engine import predict
from rwft.core.model import build_model
from rwft.core.run import evaluate, train
from rwft.core.testtime import TTA_SEED_OFFSET, adapt_batchnorm, augmented_copy, predict_ensemble, predict_tta

pytestmark = pytest.mark.integration

QUICK = ["train.device=cpu", "data.image_size=28", "train.batch_size=64", "data.max_train_images=256",
         "train.lr=0.002", "train.bootstrap=50", "train.epochs=1"]


@pytest.fixture(scope="module")
def setup(pneumoniamnist_npz):
    cfg = load_config(overrides=[*QUICK, f"data.root={pneumoniamnist_npz}"])
    torch.manual_seed(0)
    return cfg, load_splits(cfg), build_model(cfg.model, 2)


def test_tta_averages_the_plain_and_the_augmented_predictions(setup):
    cfg, splits, model = setup
    tta_cfg = load_config(overrides=[*QUICK, "eval.tta=2", f"data.root={cfg.data.root}"])
    split = splits.val.subset(np.arange(64))
    views = [augmented_copy(split, tta_cfg, tta_cfg.seed + TTA_SEED_OFFSET + v) for v in range(2)]
    assert all(not np.array_equal(view.images, split.images) for view in views)
    assert np.array_equal(augmented_copy(split, tta_cfg, 5).images, augmented_copy(split, tta_cfg, 5).images)
    expected = (predict(model, split, cfg) + sum(predict(model, view, cfg) for view in views)) / 3
    averaged = predict_tta(model, split, tta_cfg)
    np.testing.assert_allclose(averaged, expected, rtol=1e-6)
    assert not np.allclose(averaged, predict(model, split, cfg))
    np.testing.assert_array_equal(predict_tta(model, split, cfg), predict(model, split, cfg))  # tta=0: plain


def test_an_ensemble_averages_its_members(setup):
    cfg, splits, model = setup
    torch.manual_seed(1)
    other = build_model(cfg.model, 2)
    split = splits.val.subset(np.arange(64))
    np.testing.assert_allclose(predict_ensemble([model, other], split, cfg),
                               (predict(model, split, cfg) + predict(other, split, cfg)) / 2, rtol=1e-6)


def test_adabn_changes_batchnorm_statistics_only_and_to_the_target_images(setup):
    cfg, splits, model = setup
    big_batch = load_config(overrides=[*QUICK, "train.batch_size=512", f"data.root={cfg.data.root}"])
    target = splits.test.subset(np.arange(300))  # one batch of 300 (batch_size * 2 = 1024)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    adapted = adapt_batchnorm(model, target, big_batch)
    for key, value in model.state_dict().items():  # the original model is untouched
        assert torch.equal(value, before[key])
    for name, param in adapted.named_parameters():
        assert torch.equal(param, dict(model.named_parameters())[name])
    norms = [(n, m) for n, m in adapted.named_modules() if isinstance(m, _BatchNorm)]
    assert all(not torch.equal(m.running_mean, before[f"{n}.running_mean"]) for n, m in norms)
    # The first BatchNorm's statistics are exactly those of its input over the target images.
    name, first = norms[0]
    captured = {}
    conv = dict(adapted.named_modules())[name.replace("bn1", "conv_stem")]
    handle = conv.register_forward_hook(lambda _m, _i, out: captured.setdefault("x", out))
    adapted.eval()
    predict(adapted, target, big_batch)
    handle.remove()
    features = captured["x"].transpose(0, 1).flatten(1)
    torch.testing.assert_close(first.running_mean, features.mean(dim=1), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(first.running_var, features.var(dim=1, unbiased=True), rtol=1e-4, atol=1e-5)
    assert first.momentum == dict(model.named_modules())[name].momentum


@pytest.mark.timeout(1800)
def test_train_records_the_policy_and_evaluate_scores_an_ensemble(tmp_path, pneumoniamnist_npz, capsys):
    runs = []
    for seed, evaluation in ((0, ["eval.calibration=temperature", "eval.adabn=true", "eval.tta=1"]), (1, [])):
        cfg = load_config(overrides=[*QUICK, f"data.root={pneumoniamnist_npz}", f"seed={seed}",
                                     "eval.threshold=sensitivity:0.95", *evaluation,
                                     f"output_dir={tmp_path / str(seed)}"])
        runs.append(train(cfg, progress=False))
    metrics = json.loads((runs[0].run_dir / "metrics.json").read_text())
    assert metrics["threshold_policy"] == "sensitivity:0.95" and metrics["calibration"] == "temperature"
    assert metrics["tta"] == 1 and metrics["temperature"] > 0
    assert metrics["val"]["sensitivity"] >= 0.95
    before, after = metrics["calibration_metrics"]["val_before"], metrics["calibration_metrics"]["val_after"]
    assert after["nll"] <= before["nll"]
    transductive = metrics["test_transductive"]
    assert transductive["note"].startswith("transductive") and transductive["threshold_policy"] == "sensitivity:0.95"
    assert transductive["test"]["auroc"]["value"] != metrics["test"]["auroc"]["value"]

    # One checkpoint: the stored threshold and temperature reproduce the run's test numbers.
    again = evaluate(str(runs[0].run_dir / "best.pt"), ["train.bootstrap=50"])
    assert again["auroc"]["value"] == pytest.approx(metrics["test"]["auroc"]["value"], abs=1e-6)
    assert again["accuracy"]["value"] == pytest.approx(metrics["test"]["accuracy"]["value"], abs=1e-6)
    assert again["threshold_policy"] == "sensitivity:0.95"

    # Two checkpoints through the command line: their ensemble, decision refitted on validation.
    out = tmp_path / "ensemble.json"
    code = main(["evaluate", str(runs[0].run_dir / "best.pt"), str(runs[1].run_dir / "best.pt"),
                 "train.bootstrap=50", "eval.adabn=false", "eval.tta=0", "--output", str(out)])
    assert code == 0
    ensemble = json.loads(out.read_text())
    assert ensemble["ensemble_size"] == 2 and ensemble["threshold_policy"] == "sensitivity:0.95"
    members = [json.loads((r.run_dir / "metrics.json").read_text())["test"]["auroc"]["value"] for r in runs]
    assert ensemble["auroc"]["value"] not in members
