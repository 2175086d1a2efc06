"""A centralised experiment: ``rwft train`` and ``rwft evaluate``.

A run directory holds everything about one run: ``config.yaml`` (resolved),
``last.pt`` (after every epoch, for ``--resume``), ``best.pt`` (best validation
AUROC), ``metrics.json`` (test metrics with 95% bootstrap intervals) and ``tb/``
(TensorBoard event files).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import OmegaConf

from rwft.core import testtime
from rwft.core.checkpoint import load_checkpoint, save_checkpoint, write_json
from rwft.core.config import RwftConfig, save_config, to_container, with_overrides
from rwft.core.data import DatasetSplits, load_splits
from rwft.core.engine import Trainer, fit, seed_everything, select_device
from rwft.core.errors import RwftError
from rwft.core.metrics import report
from rwft.core.model import build_model
from rwft.core.tblog import RunLogger
from rwft.core.testtime import predict_ensemble, predict_tta, transductive_scores
from rwft.core.thresholds import Temperature, fit_decision


@dataclass
class RunResult:
    run_dir: Path
    metrics: dict[str, Any]  # the contents of metrics.json


def train(cfg: RwftConfig, *, resume: bool = False, progress: bool = True) -> RunResult:
    """Train per ``cfg``, keep the best-validation-AUROC weights, report on test."""
    run_dir = Path(cfg.output_dir)
    last = run_dir / "last.pt"
    resumed = load_checkpoint(last) if resume and last.is_file() else None
    if resume and resumed is None:
        raise RwftError(f"cannot resume: {last} does not exist. Start the run without --resume.")
    seed_everything(cfg.seed)
    save_config(cfg, run_dir)
    splits = load_splits(cfg)
    _require_binary(splits)
    model = build_model(cfg.model, splits.num_classes)
    if resumed is not None:
        model.load_state_dict(resumed["model"])
    device = select_device(cfg.train)

    best_so_far = {"auroc": resumed.get("best_auroc", -math.inf) if resumed else -math.inf}

    def checkpoint(epoch: int, trainer: Trainer, val: dict[str, float], is_best: bool) -> None:
        payload = _payload(cfg, splits, trainer.model, epoch=epoch, val=val)
        if is_best:
            best_so_far["auroc"] = val["auroc"]
            # best.pt holds the weights validation scored: the EMA when train.ema_decay > 0.
            save_checkpoint(run_dir / "best.pt", _payload(cfg, splits, trainer.eval_model, epoch=epoch, val=val))
        # last.pt is written after best.pt: a crash in between resumes with best.pt current.
        save_checkpoint(last, payload | {"trainer": trainer.state_dict(), "best_auroc": best_so_far["auroc"]})

    # Steps are logged as they train, checkpoints written per epoch: a crash leaves steps the
    # resumed run trains again. Per-epoch validation points sit at steps <= the epoch count.
    purge_step = resumed["trainer"]["global_step"] + 1 if resumed else None
    with RunLogger(run_dir / "tb", purge_step=purge_step) as logger:
        result = fit(
            model, splits, cfg, epochs=cfg.train.epochs, device=device, logger=logger,
            select_best=False, progress=progress, on_epoch_end=checkpoint,
            start_epoch=resumed["epoch"] if resumed else 0,
            trainer_state=resumed["trainer"] if resumed else None,
            best_auroc=best_so_far["auroc"],
        )
        best_file = run_dir / "best.pt"
        if not best_file.is_file():  # validation AUROC never defined: keep the last epoch
            save_checkpoint(best_file, _payload(cfg, splits, model, epoch=cfg.train.epochs, val=result.val))
        best = load_checkpoint(best_file)
        model.load_state_dict(best["model"])
        metrics = _score(model, splits, cfg, device, logger, step=cfg.train.epochs)
        metrics["best_epoch"] = best["epoch"]
        logger.hparams(to_container(cfg), {f"test/{k}": v["value"] for k, v in metrics["test"].items()
                                           if isinstance(v, dict)})
    best |= {key: metrics[key] for key in ("threshold", "threshold_policy", "temperature")}
    save_checkpoint(best_file, best)
    write_json(run_dir / "metrics.json", metrics)
    return RunResult(run_dir, metrics)


def _payload(cfg: RwftConfig, splits: DatasetSplits, model: Any, *, epoch: int, val: dict[str, float]) -> dict:
    return {"model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
            "config": to_container(cfg), "class_names": list(splits.class_names),
            "epoch": epoch, "val": val, "threshold": 0.5}


def _score(model: Any, splits: DatasetSplits, cfg: RwftConfig, device: Any, logger: RunLogger, step: int) -> dict:
    """Decision rule fitted on validation (``eval.*`` policy), then test metrics with bootstrap intervals."""
    scored = testtime.score([model], splits, cfg, device)
    test, threshold = scored.metrics["test"], scored.decision.threshold
    logger.scalars({k: v["value"] for k, v in test.items() if isinstance(v, dict)}, step, prefix="test")
    logger.curves("test", splits.test.labels, scored.test_probs, threshold, step)
    return scored.metrics | {"source": splits.source}


def _require_binary(splits: DatasetSplits) -> None:
    if splits.num_classes != 2:
        raise RwftError(f"rwft's clinical metrics need exactly two classes (normal, pneumonia); the data at "
                        f"{splits.source} has {splits.num_classes}: {', '.join(splits.class_names)}.")


def evaluate(checkpoint_path: str | Sequence[str], overrides: list[str], *, split: str = "test") -> dict[str, Any]:
    """Score a saved checkpoint, or an ensemble of several, on a split of the data named in
    the (first) checkpoint's config (or overrides).

    One checkpoint keeps the threshold (and temperature) chosen on validation when it was
    trained, unless the overrides change ``eval.*`` (policy, calibration, TTA): then, as for
    several checkpoints (their softmax outputs averaged), the decision rule is fitted anew
    on the validation split of the first checkpoint's data config. Members trained with
    other seeds may have trained on some of those validation images (the carve depends on
    the seed), which can only bias the threshold, never the test images. ``eval.adabn``
    adds ``test_transductive`` when the split is test.
    """
    paths = [checkpoint_path] if isinstance(checkpoint_path, str) else list(checkpoint_path)
    payloads = [load_checkpoint(path) for path in paths]
    stored = with_overrides(OmegaConf.create(payloads[0]["config"]), [])  # type: ignore[arg-type]
    cfg = with_overrides(stored, overrides)
    splits = load_splits(cfg)
    models = []
    for path, payload in zip(paths, payloads):
        if payload["class_names"] != payloads[0]["class_names"]:
            raise RwftError(f"{path} was trained on classes {payload['class_names']}, {paths[0]} on "
                            f"{payloads[0]['class_names']}: an ensemble needs the same classes in the same order.")
        member_cfg = with_overrides(OmegaConf.create(payload["config"]), overrides)  # type: ignore[arg-type]
        model = build_model(member_cfg.model, len(payload["class_names"]))
        model.load_state_dict(payload["model"])
        models.append(model)
    chosen = getattr(splits, split)
    if len(models) == 1 and cfg.eval == stored.eval:
        payload = payloads[0]
        temperature = payload.get("temperature")
        probs = predict_tta(models[0], chosen, cfg)[:, 1]
        probs = Temperature(temperature).apply(probs) if temperature else probs
        return report(chosen.labels, probs, float(payload.get("threshold", 0.5)),
                      resamples=cfg.train.bootstrap, seed=cfg.seed) | {
            "split": split, "checkpoint": str(checkpoint_path),
            "threshold_policy": payload.get("threshold_policy", "youden"), "temperature": temperature}
    val_probs = predict_ensemble(models, splits.val, cfg)[:, 1]
    decision = fit_decision(cfg.eval.threshold, cfg.eval.calibration, splits.val.labels, val_probs)
    probs = decision.calibrate(predict_ensemble(models, chosen, cfg)[:, 1])
    result = report(chosen.labels, probs, decision.threshold, resamples=cfg.train.bootstrap, seed=cfg.seed) | \
        decision.describe() | {"split": split, "checkpoints": [str(p) for p in paths], "ensemble_size": len(models),
                               "tta": int(cfg.eval.tta)}
    if cfg.eval.adabn and split == "test":
        result["test_transductive"] = transductive_scores(models, splits, cfg)
    return result


def summary_table(metrics: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(metric, value, 95% CI) rows for the terminal."""
    rows = []
    for name, entry in metrics.items():
        if isinstance(entry, dict) and "value" in entry:
            ci = entry.get("ci95")
            rows.append((name, f"{entry['value']:.3f}",
                         f"[{ci[0]:.3f}, {ci[1]:.3f}]" if ci and not any(np.isnan(ci)) else "-"))
    return rows
