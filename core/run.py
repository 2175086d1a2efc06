"""A centralised experiment: ``rwft train`` and ``rwft evaluate``.

A run directory holds everything about one run: ``config.yaml`` (resolved),
``last.pt`` (after every epoch, for ``--resume``), ``best.pt`` (best validation
AUROC), ``metrics.json`` (test metrics with 95% bootstrap intervals),
``skipped.json`` (files left out with ``data.on_bad_file=skip``) and ``tb/``
(TensorBoard event files). Checkpoints name the classes in label order and the
positive one (``rwft.core.classes``).
"""

from __future__ import annotations

import copy
import math
import shutil
import sys
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import OmegaConf

from rwft.core.checkpoint import load_checkpoint, save_checkpoint, write_json
from rwft.core.classes import describe as describe_classes
from rwft.core.config import RwftConfig, save_config, to_container, with_overrides
from rwft.core.data import DatasetSplits, ImageSplit, dataset_for_path, load_splits, skipped_report
from rwft.core.engine import ResumeState, Trainer, fit, seed_everything, select_device
from rwft.core.errors import ConfigError, DataError, RwftError, WeightsError
from rwft.core.metrics import report
from rwft.core.model import build_model, check_model_names
from rwft.core.model_file import model_payload
from rwft.core.scoring import final_score
from rwft.core.tblog import RunLogger
from rwft.core.testtime import predict_ensemble, predict_tta, transductive_scores
from rwft.core.thresholds import Temperature, fit_decision

# What makes a folder a run directory: any of these means it holds a run.
RUN_FILES = ("config.yaml", "last.pt", "best.pt", "metrics.json", "skipped.json", "tb")


@dataclass
class RunResult:
    run_dir: Path
    metrics: dict[str, Any]  # the contents of metrics.json


def say(message: str) -> None:
    """A line for the person running the command (stderr: stdout stays for data)."""
    print(f"rwft: {message}", file=sys.stderr, flush=True)


def train(cfg: RwftConfig, *, resume: bool = False, overwrite: bool = False, progress: bool = True,
          on_epoch: Callable[[int, dict[str, float]], None] | None = None) -> RunResult:
    """Train per ``cfg``, keep the best-validation-AUROC weights, report on test.

    ``resume`` continues the run in ``cfg.output_dir`` from its ``last.pt`` (the same
    run, bit for bit on the CPU). Otherwise a folder that already holds a run is
    refused unless ``overwrite``. Nothing in the run directory changes until the data,
    the model and the resume state are all known to be usable.

    ``on_epoch(epoch, val_metrics)`` is called once an epoch is checkpointed (``last.pt``):
    a sweep reports it to its scheduler from there (``rwft.experiments.trials``).
    """
    run_dir = Path(cfg.output_dir)
    if resume and overwrite:
        raise RwftError("--resume continues the run in output_dir and --overwrite replaces it: give only one.")
    resumed, resumed_weights = _resume_state(run_dir, cfg) if resume else (None, None)
    if not resume:
        _require_no_run(run_dir, overwrite)
    _require_writable(run_dir)
    check_model_names(cfg.model)  # a misspelt backbone fails before minutes of decoding
    splits = load_splits(cfg)
    _require_binary(splits)
    seed_everything(cfg.seed)
    model = build_model(cfg.model, splits.num_classes, image_size=cfg.data.image_size)
    if resumed_weights is not None:
        model.load_state_dict(resumed_weights)
    device = select_device(cfg.train)

    # Everything is known to start: only now does the run directory change.
    if overwrite:
        _remove_run(run_dir)
    save_config(cfg, run_dir)
    write_json(run_dir / "skipped.json", list(splits.skipped))
    say(describe_classes(splits.class_names))
    if resumed is not None:
        say(f"resuming from epoch {resumed.epoch} of {cfg.train.epochs} ({run_dir})")
    best_so_far = {"auroc": resumed.best_auroc if resumed else -math.inf}

    def checkpoint(epoch: int, trainer: Trainer, val: dict[str, float], is_best: bool) -> None:
        payload = _payload(cfg, splits, trainer.model, epoch=epoch, val=val)
        if is_best:
            best_so_far["auroc"] = val["auroc"]
            # best.pt holds the weights validation scored: the EMA when train.ema_decay > 0.
            save_checkpoint(run_dir / "best.pt", _payload(cfg, splits, trainer.eval_model, epoch=epoch, val=val))
        # last.pt is written after best.pt: a crash in between resumes with best.pt current.
        save_checkpoint(run_dir / "last.pt", payload | {"trainer": trainer.state_dict(),
                                                        "best_auroc": best_so_far["auroc"]})
        if on_epoch is not None:
            on_epoch(epoch, val)

    # Steps are logged as they train, checkpoints written per epoch: a crash leaves steps the
    # resumed run trains again. Per-epoch validation points sit at steps <= the epoch count.
    purge_step = (resumed.trainer["global_step"] if resumed.trainer else 0) + 1 if resumed else None
    with RunLogger(run_dir / "tb", purge_step=purge_step) as logger:
        if splits.skipped:
            logger.text("data/skipped", skipped_report(splits.skipped, limit=None).replace("\n", "  \n"))
        result = fit(model, splits, cfg, epochs=cfg.train.epochs, device=device, logger=logger,
                     select_best=False, progress=progress, on_epoch_end=checkpoint, resume=resumed)
        best_file = run_dir / "best.pt"
        if not best_file.is_file():  # validation AUROC never defined: keep the last epoch
            save_checkpoint(best_file, _payload(cfg, splits, model, epoch=cfg.train.epochs, val=result.val))
        best = load_checkpoint(best_file)
        model.load_state_dict(best["model"])
        metrics = _score(model, splits, cfg, device, logger, step=cfg.train.epochs)
        metrics["best_epoch"] = best["epoch"]
        if result.privacy is not None:  # train.dp: what the whole run spent (rwft.core.privacy)
            metrics["privacy"] = {key: result.privacy[key] for key in
                                  ("epsilon", "delta", "noise_multiplier", "sample_rate", "steps")}
        logger.hparams(to_container(cfg), {f"test/{k}": v["value"] for k, v in metrics["test"].items()
                                           if isinstance(v, dict)})
    best |= {key: metrics[key] for key in ("threshold", "threshold_policy", "temperature")}
    save_checkpoint(best_file, best)
    write_json(run_dir / "metrics.json", metrics)
    return RunResult(run_dir, metrics)


def _require_no_run(run_dir: Path, overwrite: bool) -> None:
    found = [name for name in RUN_FILES if (run_dir / name).exists()]
    if found and not overwrite:
        raise RwftError(f"output_dir {run_dir} already holds a run ({', '.join(found)}). Continue it with "
                        f"`rwft train --resume {run_dir}`, replace it with --overwrite, or choose another "
                        "output_dir=...")


def _remove_run(run_dir: Path) -> None:
    for name in RUN_FILES:
        path = run_dir / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.exists() or path.is_symlink():
            path.unlink()


def _require_writable(run_dir: Path) -> None:
    """A one-line error now rather than a traceback after training when ``output_dir`` cannot be written."""
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=run_dir):
            pass
    except OSError as exc:
        raise RwftError(f"output_dir {run_dir} cannot be written ({exc.strerror or exc}): choose a folder "
                        "you may write to, e.g. output_dir=runs/NAME.") from None


def _resume_state(run_dir: Path, cfg: RwftConfig) -> tuple[ResumeState, dict | None]:
    """Where the run in ``run_dir`` stopped and its weights; refuses a resume that would not be the same run.

    A run killed before its first epoch ended has a ``config.yaml`` but no ``last.pt``:
    it resumes from epoch 0. Changing ``train.epochs`` of a one-cycle run is refused:
    its learning rate has decayed to about zero by the planned end, so more epochs
    would train at that rate.
    """
    last = run_dir / "last.pt"
    if not last.is_file():
        if (run_dir / "config.yaml").is_file():
            return ResumeState(epoch=0), None
        raise RwftError(f"cannot resume: {run_dir} holds no run (no last.pt, no config.yaml). "
                        "Start the run without --resume.")
    payload = load_checkpoint(last)
    done, planned = int(payload["epoch"]), int(payload["config"]["train"]["epochs"])
    if cfg.train.epochs < done:
        raise RwftError(f"cannot resume {run_dir} with train.epochs={cfg.train.epochs}: it has already trained "
                        f"{done} epochs. Resume without changing train.epochs.")
    if cfg.train.epochs != planned and cfg.train.schedule == "onecycle":
        raise RwftError(
            f"cannot extend {run_dir} from {planned} to {cfg.train.epochs} epochs: its one-cycle learning rate "
            f"has decayed to about 0 by epoch {planned}, so more epochs would barely train. Start a new run with "
            f"train.epochs={cfg.train.epochs} (another output_dir, or --overwrite), or resume without changing "
            "train.epochs.")
    if "trainer" not in payload:
        raise RwftError(f"{last} holds no training state (optimiser, schedule): it cannot be resumed.")
    state = ResumeState(epoch=done, trainer=payload["trainer"], best_auroc=float(payload.get("best_auroc", -math.inf)))
    return state, payload["model"]


def _payload(cfg: RwftConfig, splits: DatasetSplits, model: Any, *, epoch: int, val: dict[str, float]) -> dict:
    return model_payload(cfg, model, splits.class_names, epoch=epoch, val={k: float(v) for k, v in val.items()})


def _classes(class_names: tuple[str, ...] | list[str]) -> dict[str, Any]:
    return {"names": list(class_names), "positive": class_names[1]}


def _score(model: Any, splits: DatasetSplits, cfg: RwftConfig, device: Any, logger: RunLogger, step: int) -> dict:
    """Decision rule fitted on validation (``eval.*`` policy), then test metrics with bootstrap intervals."""
    final = final_score(model, splits, cfg, device)
    logger.scalars(final.test_values(), step, prefix="test")
    logger.curves("test", splits.test.labels, final.test_probs, final.threshold, step, class_names=splits.class_names)
    return final.report | {"classes": _classes(splits.class_names)}


def _require_binary(splits: DatasetSplits) -> None:
    if splits.num_classes != 2:
        raise RwftError(f"rwft's clinical metrics need exactly two classes (normal, pneumonia); the data at "
                        f"{splits.source} has {splits.num_classes}: {', '.join(splits.class_names)}.")


SPLITS = ("all", "train", "val", "test")


def evaluate(checkpoint_path: str | Sequence[str], overrides: list[str], *, data: str | None = None,
             split: str | None = None) -> dict[str, Any]:
    """Score a saved checkpoint, or an ensemble of several, on data: ``data`` (a folder or
    file), else the data in the (first) checkpoint's config.

    The model, its image size and normalisation, and its classes come from the
    checkpoint. The dataset type follows the data (an ``.npz`` is ``medmnist``, a folder
    ``chest_xray``) unless ``data.dataset`` is overridden. The data's classes are matched
    to the checkpoint's by name (``data.class_map`` renames them). ``split`` defaults to
    ``all`` for a folder without train/val/test folders (an external site: every
    image), else ``test``. Overrides that would change the model or the image size are
    refused: the numbers would not describe this checkpoint.

    One checkpoint keeps the threshold (and temperature) chosen on validation when it was
    trained, unless the overrides change ``eval.*`` (policy, calibration, TTA): then, as for
    several checkpoints (their softmax outputs averaged), the decision rule is fitted anew
    on the validation split of the data scored, which therefore cannot be ``--split all``.
    Members trained with other seeds may have trained on some of those validation images
    (the carve depends on the seed), which can only bias the threshold, never the test
    images. ``eval.adabn`` adds ``test_transductive`` when the split is test.
    """
    paths = [checkpoint_path] if isinstance(checkpoint_path, str) else list(checkpoint_path)
    payloads = [load_checkpoint(path) for path in paths]
    payload = payloads[0]
    config = copy.deepcopy(payload["config"])
    # The classes come from the checkpoint; how the training data's folders were named or
    # subsampled says nothing about the data scored now.
    config["data"].update(class_map={}, positive_class=None, max_train_images=None)
    saved = with_overrides(OmegaConf.create(config), [])  # type: ignore[arg-type]
    given = _override_keys(overrides)
    root = data if data is not None else _override_value(overrides, "data.root")
    implied = []
    if data is not None:
        implied.append(f"data.root={data}")
    if root is not None and "data.dataset" not in given:
        implied.append(f"data.dataset={dataset_for_path(Path(root), saved.data.dataset)}")
    cfg = with_overrides(saved, [*implied, *overrides])
    for key in ("model.backbone", "model.adapter", "model.mode", "model.pretrained", "data.image_size"):
        if OmegaConf.select(cfg, key) != OmegaConf.select(saved, key):
            raise ConfigError(f"{key}={OmegaConf.select(cfg, key)} differs from the checkpoint's "
                              f"{key}={OmegaConf.select(saved, key)}: a checkpoint is scored as it was trained. "
                              f"Drop the {key} override.")
    class_names = list(payload["class_names"])
    for path, member in zip(paths[1:], payloads[1:], strict=True):
        if list(member["class_names"]) != class_names:
            raise RwftError(f"{path} was trained on classes {member['class_names']}, {paths[0]} on "
                            f"{class_names}: an ensemble needs the same classes in the same order.")
        if member["config"]["data"]["image_size"] != cfg.data.image_size:
            raise RwftError(f"{path} was trained at {member['config']['data']['image_size']} px, {paths[0]} at "
                            f"{cfg.data.image_size} px: an ensemble scores one image size; use members trained "
                            "at the same data.image_size.")
    refit = len(paths) > 1 or cfg.eval != saved.eval
    if split is None:
        split = "all" if root is not None and _is_single_site_folder(Path(root)) else "test"
    if split not in SPLITS:
        raise ConfigError(f"--split {split} is not one of {', '.join(SPLITS)}.")
    if refit and split == "all":
        raise ConfigError("an ensemble, or changed eval.* settings, fit the decision threshold on validation "
                          "images, and --split all scores those too: score data with a validation split "
                          "(--split test), or one checkpoint with its stored threshold.")
    splits = load_splits(cfg, class_order=class_names)
    chosen = _concatenated(splits) if split == "all" else getattr(splits, split)
    if not len(chosen):
        raise DataError(f"the {split} split of {splits.source} holds no images: choose another --split.")
    say(f"scoring {len(chosen)} images ({split}) of {splits.source} with {', '.join(map(str, paths))}; "
        + describe_classes(class_names))
    missing = [name for name, count in zip(class_names, chosen.class_counts(len(class_names))) if not count]
    if missing:
        say(f"warning: no images of class {', '.join(missing)}: AUROC is undefined; sensitivity or specificity "
            "alone are reported.")
    models = [_load_member(path, member, cfg) for path, member in zip(paths, payloads, strict=True)]
    identity = {"split": split, "data": splits.source, "classes": _classes(class_names)}
    if not refit:
        temperature = payload.get("temperature")
        probs = predict_tta(models[0], chosen, cfg)[:, 1]
        probs = Temperature(temperature).apply(probs) if temperature else probs
        return report(chosen.labels, probs, float(payload.get("threshold", 0.5)),
                      resamples=cfg.train.bootstrap, seed=cfg.seed) | identity | {
            "checkpoint": str(paths[0]), "threshold_policy": payload.get("threshold_policy", "youden"),
            "temperature": temperature}
    val_probs = predict_ensemble(models, splits.val, cfg)[:, 1]
    decision = fit_decision(cfg.eval.threshold, cfg.eval.calibration, splits.val.labels, val_probs)
    probs = decision.calibrate(predict_ensemble(models, chosen, cfg)[:, 1])
    result = report(chosen.labels, probs, decision.threshold, resamples=cfg.train.bootstrap, seed=cfg.seed) | \
        decision.describe() | identity | {"checkpoints": [str(p) for p in paths], "ensemble_size": len(models),
                                          "tta": int(cfg.eval.tta)}
    if cfg.eval.adabn and split == "test":
        result["test_transductive"] = transductive_scores(models, splits, cfg)
    return result


def _load_member(path: str, payload: dict[str, Any], cfg: RwftConfig) -> Any:
    """The model a checkpoint describes (its own ``model.*`` config), with its weights."""
    member_cfg = with_overrides(OmegaConf.create(payload["config"]), [])  # type: ignore[arg-type]
    model = build_model(member_cfg.model, len(payload["class_names"]), image_size=cfg.data.image_size)
    try:
        model.load_state_dict(payload["model"])
    except RuntimeError as exc:
        raise WeightsError(f"{path} does not fit the model its config describes: "
                           f"{str(exc).splitlines()[0]}") from None
    return model


def _override_keys(overrides: list[str]) -> set[str]:
    return {item.split("=", 1)[0].strip() for item in overrides}


def _override_value(overrides: list[str], key: str) -> str | None:
    values = [item.split("=", 1)[1] for item in overrides if item.split("=", 1)[0].strip() == key]
    return values[-1] if values else None


def _is_single_site_folder(path: Path) -> bool:
    """A folder of class folders (one site's export), not ``{train,val,test}`` folders or an npz."""
    path = path.expanduser()
    return path.is_dir() and not (path / "train").is_dir() and dataset_for_path(path, "chest_xray") != "medmnist"


def _concatenated(splits: DatasetSplits) -> ImageSplit:
    parts = [splits.train, splits.val, splits.test]
    return ImageSplit(np.concatenate([p.images for p in parts]), np.concatenate([p.labels for p in parts]))


def summary_table(metrics: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(metric, value, 95% CI) rows for the terminal."""
    rows = []
    for name, entry in metrics.items():
        if isinstance(entry, dict) and "value" in entry:
            ci = entry.get("ci95")
            rows.append((name, f"{entry['value']:.3f}",
                         f"[{ci[0]:.3f}, {ci[1]:.3f}]" if ci and not any(np.isnan(ci)) else "-"))
    return rows
