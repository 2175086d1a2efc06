"""Evaluation-time ingredients: test-time augmentation, checkpoint ensembles, AdaBN, and the
one function that turns trained models into the numbers of ``metrics.json``.

- ``eval.tta=K``: each image is scored as itself and as K augmented views (the training
  augmentation, ``data.augmentation``, drawn from a fixed seed); the softmax outputs are
  averaged.
- Ensembles (``rwft evaluate A.pt B.pt ...``): the members' (TTA-averaged) softmax
  outputs are averaged.
- ``eval.adabn=true``: BatchNorm statistics re-estimated on the unlabelled images of the
  split being scored (Li et al., "Revisiting batch normalization for practical domain
  adaptation", 2016). This looks at the test images (not their labels), so it is
  *transductive*: reported separately, under ``test_transductive``, never mixed with the
  inductive numbers.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from rwft.core.augment import augment_batch
from rwft.core.config import RwftConfig
from rwft.core.data import DatasetSplits, ImageSplit, iterate_batches
from rwft.core.engine import autocast, predict, prepare_model, select_device
from rwft.core.metrics import binary_metrics, report
from rwft.core.thresholds import Decision, calibration_report, fit_decision

TTA_SEED_OFFSET = 7_919  # TTA views never reuse a training epoch's augmentation stream
AUGMENT_CHUNK = 256


def augmented_copy(split: ImageSplit, cfg: RwftConfig, seed: int) -> ImageSplit:
    """``split`` with every image replaced by one augmented view (``data.augmentation``), as uint8.

    Deterministic for a given ``seed``. The images are 8-bit already, so storing the view
    as uint8 loses nothing a model could use.
    """
    generator = torch.Generator().manual_seed(seed)
    views = []
    for start in range(0, len(split), AUGMENT_CHUNK):
        x = torch.tensor(split.images[start:start + AUGMENT_CHUNK]).unsqueeze(1).float().div_(255.0)
        view = augment_batch(x, generator, cfg.data.augmentation)
        views.append(view.mul_(255.0).round_().squeeze(1).to(torch.uint8).numpy())
    images = np.concatenate(views) if views else split.images
    return ImageSplit(images, split.labels)


def predict_tta(model: nn.Module, split: ImageSplit, cfg: RwftConfig, device: torch.device | None = None) -> np.ndarray:
    """Softmax outputs ``(N, C)`` averaged over the plain image and ``eval.tta`` augmented views."""
    probs = predict(model, split, cfg, device)
    for view in range(cfg.eval.tta):
        probs = probs + predict(model, augmented_copy(split, cfg, cfg.seed + TTA_SEED_OFFSET + view), cfg, device)
    return probs / (cfg.eval.tta + 1)


def predict_ensemble(models: Sequence[nn.Module], split: ImageSplit, cfg: RwftConfig,
                     device: torch.device | None = None) -> np.ndarray:
    """The mean of the members' (TTA-averaged) softmax outputs, ``(N, C)``."""
    return np.mean([predict_tta(model, split, cfg, device) for model in models], axis=0)


@torch.no_grad()
def adapt_batchnorm(model: nn.Module, split: ImageSplit, cfg: RwftConfig,
                    device: torch.device | None = None) -> nn.Module:
    """A copy of ``model`` whose BatchNorm running statistics are re-estimated on ``split``'s images.

    Only the BatchNorm buffers change (parameters, other buffers and ``model`` itself stay
    as they are); labels are never read. The statistics are the plain average over the
    batches (``momentum=None``), not an exponential average, so every image counts the same.
    """
    device = device or select_device(cfg.train)
    adapted = prepare_model(copy.deepcopy(model), device)
    adapted.eval()
    norms = [m for m in adapted.modules() if isinstance(m, _BatchNorm) and m.track_running_stats]
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None
        norm.train()
    for images, _ in iterate_batches(split, cfg.train.batch_size * 2, shuffle=False, augment=False,
                                     generator=None, device=device):
        if device.type == "cuda":
            images = images.contiguous(memory_format=torch.channels_last)
        with autocast(device, cfg.train.precision):
            adapted(images)
    for norm, original in zip(norms, [m for m in model.modules() if isinstance(m, _BatchNorm)
                                      and m.track_running_stats]):
        norm.momentum = original.momentum
        norm.eval()
    return adapted


@dataclass
class Scores:
    metrics: dict  # what metrics.json holds (threshold policy, val, test, optional transductive)
    test_probs: np.ndarray  # positive-class probabilities on test, calibrated when calibration is on
    decision: Decision


def score(models: Sequence[nn.Module], splits: DatasetSplits, cfg: RwftConfig,
          device: torch.device | None = None) -> Scores:
    """Fit the decision rule on validation, then score test; each number says how it was made.

    ``metrics`` holds ``threshold_policy``, ``threshold``, ``calibration``, ``temperature``,
    ``tta``, ``ensemble_size``, ``val`` (point metrics at the threshold) and ``test``
    (``metrics.report``: point estimates with bootstrap CIs). With calibration on it also
    holds ``calibration_metrics`` (validation NLL/Brier/ECE before and after, test after).
    With ``eval.adabn`` it holds ``test_transductive``: the same policy refitted on
    validation and test scored after each split's own BatchNorm re-estimation.
    """
    val_raw = predict_ensemble(models, splits.val, cfg, device)[:, 1]
    test_raw = predict_ensemble(models, splits.test, cfg, device)[:, 1]
    decision = fit_decision(cfg.eval.threshold, cfg.eval.calibration, splits.val.labels, val_raw)
    val_probs, test_probs = decision.calibrate(val_raw), decision.calibrate(test_raw)
    metrics = decision.describe() | {
        "tta": int(cfg.eval.tta), "ensemble_size": len(models),
        "val": binary_metrics(splits.val.labels, val_probs, decision.threshold),
        "test": report(splits.test.labels, test_probs, decision.threshold,
                       resamples=cfg.train.bootstrap, seed=cfg.seed),
    }
    if decision.temperature is not None:
        metrics["calibration_metrics"] = {"val_before": calibration_report(splits.val.labels, val_raw),
                                          "val_after": calibration_report(splits.val.labels, val_probs),
                                          "test": calibration_report(splits.test.labels, test_probs)}
    if cfg.eval.adabn:
        metrics["test_transductive"] = transductive_scores(models, splits, cfg, device)
    return Scores(metrics, test_probs, decision)


def transductive_scores(models: Sequence[nn.Module], splits: DatasetSplits, cfg: RwftConfig,
                        device: torch.device | None = None) -> dict:
    """AdaBN: each split scored with BatchNorm statistics re-estimated on its own unlabelled images.

    The threshold policy is refitted on validation scored the same way (validation adapted
    to validation), so each domain is normalised by its own statistics before the decision.
    """
    val_models = [adapt_batchnorm(m, splits.val, cfg, device) for m in models]
    test_models = [adapt_batchnorm(m, splits.test, cfg, device) for m in models]
    val_raw = predict_ensemble(val_models, splits.val, cfg, device)[:, 1]
    test_raw = predict_ensemble(test_models, splits.test, cfg, device)[:, 1]
    decision = fit_decision(cfg.eval.threshold, cfg.eval.calibration, splits.val.labels, val_raw)
    return decision.describe() | {
        "method": "adabn",
        "note": "transductive: BatchNorm statistics re-estimated on the unlabelled test images",
        "test": report(splits.test.labels, decision.calibrate(test_raw), decision.threshold,
                       resamples=cfg.train.bootstrap, seed=cfg.seed),
    }
