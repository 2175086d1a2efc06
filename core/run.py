"""A centralised experiment: ``rwft train`` and ``rwft evaluate``.

A run directory holds everything about one run: ``config.yaml`` (resolved),
``last.pt`` (after every epoch, for ``--resume``), ``best.pt`` (best validation
AUROC), ``metrics.json`` (test metrics with 95% bootstrap intervals) and ``tb/``
(TensorBoard event files).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import OmegaConf

from rwft.core.checkpoint import load_checkpoint, save_checkpoint, write_json
from rwft.core.config import RwftConfig, save_config, to_container, with_overrides
from rwft.core.data import DatasetSplits, load_splits
from rwft.core.engine import Trainer, fit, predict, seed_everything, select_device
from rwft.core.errors import RwftError
from rwft.core.metrics import report
from rwft.core.model import build_model
from rwft.core.model_file import model_payload
from rwft.core.scoring import final_score
from rwft.core.tblog import RunLogger


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
            save_checkpoint(run_dir / "best.pt", payload)
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
    best["threshold"] = metrics["threshold"]
    save_checkpoint(best_file, best)
    write_json(run_dir / "metrics.json", metrics)
    return RunResult(run_dir, metrics)


def _payload(cfg: RwftConfig, splits: DatasetSplits, model: Any, *, epoch: int, val: dict[str, float]) -> dict:
    return model_payload(cfg, model, splits.class_names, epoch=epoch, val=val)


def _score(model: Any, splits: DatasetSplits, cfg: RwftConfig, device: Any, logger: RunLogger, step: int) -> dict:
    """Threshold from validation, then test metrics with bootstrap intervals."""
    final = final_score(model, splits, cfg, device)
    logger.scalars(final.test_values(), step, prefix="test")
    logger.curves("test", splits.test.labels, final.test_probs, final.threshold, step)
    return final.report


def _require_binary(splits: DatasetSplits) -> None:
    if splits.num_classes != 2:
        raise RwftError(f"rwft's clinical metrics need exactly two classes (normal, pneumonia); the data at "
                        f"{splits.source} has {splits.num_classes}: {', '.join(splits.class_names)}.")


def evaluate(checkpoint_path: str, overrides: list[str], *, split: str = "test") -> dict[str, Any]:
    """Score a saved checkpoint on a split of the data named in its config (or overrides)."""
    payload = load_checkpoint(checkpoint_path)
    cfg = with_overrides(OmegaConf.create(payload["config"]), overrides)  # type: ignore[arg-type]
    splits = load_splits(cfg)
    model = build_model(cfg.model, len(payload["class_names"]))
    model.load_state_dict(payload["model"])
    chosen = getattr(splits, split)
    probs = predict(model, chosen, cfg)[:, 1]
    return report(chosen.labels, probs, float(payload.get("threshold", 0.5)),
                  resamples=cfg.train.bootstrap, seed=cfg.seed) | {"split": split, "checkpoint": str(checkpoint_path)}


def summary_table(metrics: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(metric, value, 95% CI) rows for the terminal."""
    rows = []
    for name, entry in metrics.items():
        if isinstance(entry, dict) and "value" in entry:
            ci = entry.get("ci95")
            rows.append((name, f"{entry['value']:.3f}",
                         f"[{ci[0]:.3f}, {ci[1]:.3f}]" if ci and not any(np.isnan(ci)) else "-"))
    return rows
