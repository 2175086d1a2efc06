"""One trial of a sweep: a centralised run or a whole federation, in its own run directory.

``run_trial`` is the trial function both backends call (Ray Tune's trainable in
``rwft.experiments.sweep``, and ``--backend local`` one trial after another). It writes the
same run directory ``rwft train`` or ``rwft simulate`` writes (``config.yaml``,
``metrics.json`` with bootstrap intervals, ``tb/``, checkpoints), plus:

- ``predictions.npz``: the kept model's probabilities of the positive class on the test
  (and validation) images, with their labels, so that two trials can be compared image by
  image (DeLong's test, ``rwft.experiments.stats``);
- ``trial.json``: the sweep's parameters of this trial, its status and its test metrics;
- ``attempts.jsonl``: one line per start, with the epoch or round it resumed after;
- ``trial.log``: what the trial printed.

A **centralised** trial is ``rwft.core.run.train``. A **federated** trial runs rwft's real
ServerApp round loop (``rwft.server.app.run_federation``) and ClientApp
(``rwft.clients.app``) in this process, the messages handed over in memory
(``rwft.federation.inprocess.InProcessGrid``): ``federation.sites`` simulated hospitals
cut from the train split with ``federation.partition`` (as ``rwft simulate`` does), the
server scoring the global model on the validation and test splits. Flower's own Ray
simulation cannot run inside a Ray trial (it reuses the trial's Ray connection).

A trial resumes from its run directory: after its last checkpointed epoch (``last.pt``)
or committed round (``state.pt``). ``report(step, metrics)`` is called after each one,
which is where a sweep tells its scheduler (and Ray keeps a checkpoint).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from rwft.core.checkpoint import load_checkpoint, write_json
from rwft.core.config import RwftConfig, load_config, with_overrides
from rwft.core.errors import ConfigError

SETTING_KEY = "setting"  # the sweep key choosing centralised or federated trials
SETTINGS = ("centralised", "federated")
VARIANT_KEY = "variant"  # the sweep key choosing one of the sweep file's named sets of overrides (``variants``)
REFERENCE_VARIANT = "default"  # the variant every other one is compared with, when the sweep has it
CRASH_ONCE_ENV = "RWFT_TEST_CRASH_ONCE"  # tests: the first trial to checkpoint creates this file and crashes
TRIAL_FILE = "trial.json"
PREDICTIONS_FILE = "predictions.npz"
ATTEMPTS_FILE = "attempts.jsonl"
STEP_METRIC = "step"  # epoch (centralised) or round (federated): the scheduler's time axis
VAL_METRIC = "val_auroc"  # what a scheduler compares trials on: validation, never test

Reporter = Callable[[int, dict[str, float]], None]


@dataclass(frozen=True)
class Trial:
    """One point of a sweep: its parameters and the config they give, and where it runs."""

    name: str
    params: dict[str, Any]  # sweep key -> value (config keys, ``setting`` and ``variant``)
    config_file: str | None  # the sweep's base experiment file (absolute)
    overrides: tuple[str, ...]  # the sweep's overrides for every trial, then per setting
    run_dir: str  # absolute
    setting_overrides: dict[str, tuple[str, ...]] = field(default_factory=dict)
    variants: dict[str, tuple[str, ...]] = field(default_factory=dict)  # variant name -> its overrides

    @property
    def setting(self) -> str:
        return str(self.params.get(SETTING_KEY, "centralised"))

    def config(self) -> RwftConfig:
        """The trial's config: base file, sweep overrides, the setting's overrides, the variant's overrides,
        the trial's parameters."""
        if self.setting not in SETTINGS:
            raise ConfigError(f"{SETTING_KEY}={self.setting!r} is not one of {', '.join(SETTINGS)}.")
        variant: tuple[str, ...] = ()
        if VARIANT_KEY in self.params:
            name = str(self.params[VARIANT_KEY])
            if name not in self.variants:
                raise ConfigError(f"{VARIANT_KEY}={name!r} is not one of the sweep's variants "
                                  f"({', '.join(self.variants) or 'none defined'}).")
            variant = self.variants[name]
        params = [f"{key}={_as_override(value)}" for key, value in self.params.items()
                  if key not in (SETTING_KEY, VARIANT_KEY)]
        return load_config(self.config_file, [*self.overrides, *self.setting_overrides.get(self.setting, ()),
                                              *variant, *params, f"output_dir={self.run_dir}"])


def _as_override(value: Any) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if value is None:
        return "null"
    return str(value)


def read_trial(run_dir: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The ``trial.json`` of a trial's run directory, or ``None`` if it never started."""
    file = Path(run_dir) / TRIAL_FILE
    return json.loads(file.read_text()) if file.is_file() else None


def is_complete(run_dir: str | os.PathLike[str]) -> bool:
    record = read_trial(run_dir)
    return record is not None and record.get("status") == "complete"


def run_trial(trial: Trial, *, report: Reporter | None = None, device: str | None = None,
              num_threads: int | None = None) -> dict[str, Any]:
    """Run (or resume, or just return a finished) ``trial``; returns its ``trial.json`` record.

    ``device``/``num_threads`` replace ``train.device``/``train.num_threads`` (the resources a
    scheduler gave the trial). Exceptions propagate after ``trial.json`` records the failure.
    """
    run_dir = Path(trial.run_dir)
    if is_complete(run_dir):
        return read_trial(run_dir)  # type: ignore[return-value]
    cfg = trial.config()
    extra = [f"train.device={device}"] if device else []
    extra += [f"train.num_threads={num_threads}"] if num_threads else []
    if trial.setting == "federated":
        # The server's held-out val/test splits are where a federated trial's numbers come from.
        extra += ["federation.server_eval=true", f"federation.min_sites={cfg.federation.sites}"]
    cfg = with_overrides(cfg, extra)
    resume_from = _resume_point(run_dir, trial.setting)
    if resume_from is None and run_dir.exists():
        shutil.rmtree(run_dir)  # a start that crashed before its first checkpoint: nothing to keep
    run_dir.mkdir(parents=True, exist_ok=True)
    started = time.time()
    record: dict[str, Any] = {"name": trial.name, "params": trial.params, "setting": trial.setting,
                              "status": "running", "run_dir": str(run_dir), "image_size": cfg.data.image_size}
    write_json(run_dir / TRIAL_FILE, record)
    with open(run_dir / ATTEMPTS_FILE, "a") as attempts:
        attempts.write(json.dumps({"started_at": started, "resumed_after": resume_from or 0,
                                   "device": cfg.train.device}) + "\n")
    progress = _Progress(report)
    try:
        with open(run_dir / "trial.log", "a") as log, contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
            if trial.setting == "federated":
                metrics, checkpoint = _federated(cfg, resume_from is not None, progress), run_dir / "model.pt"
                test = metrics["final"]
            else:
                metrics, checkpoint = _centralised(cfg, resume_from is not None, progress), run_dir / "best.pt"
                test = metrics
            _save_predictions(cfg, checkpoint, run_dir / PREDICTIONS_FILE)
    except BaseException as exc:
        record |= {"status": "failed", "error": f"{type(exc).__name__}: {exc}"}
        write_json(run_dir / TRIAL_FILE, record)
        raise
    record |= {"status": "complete", "seconds": time.time() - started, "threshold": test["threshold"],
               "test": {name: entry["value"] for name, entry in test["test"].items() if isinstance(entry, dict)},
               "test_ci95": {name: entry["ci95"] for name, entry in test["test"].items() if isinstance(entry, dict)},
               "val_auroc": test["val"].get("auroc", math.nan), "steps": progress.last_step}
    write_json(run_dir / TRIAL_FILE, record)
    return record


class _Progress:
    """Hands each checkpointed epoch/round to the reporter; the test crash is injected here."""

    def __init__(self, report: Reporter | None) -> None:
        self.report = report
        self.last_step = 0

    def __call__(self, step: int, val: Mapping[str, float]) -> None:
        self.last_step = step
        metrics = {f"val_{k}": float(v) for k, v in val.items() if isinstance(v, (int, float))}
        if self.report is not None:
            self.report(step, {STEP_METRIC: step} | metrics)
        _maybe_crash_once()


def _maybe_crash_once() -> None:
    """With ``RWFT_TEST_CRASH_ONCE=PATH``, the first trial to get here creates PATH and crashes (tests only)."""
    marker = os.environ.get(CRASH_ONCE_ENV)
    if not marker:
        return
    try:
        os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        return
    raise RuntimeError(f"crash injected by {CRASH_ONCE_ENV} (tests only)")


def _resume_point(run_dir: Path, setting: str) -> int | None:
    """The epoch or round a trial's run directory was checkpointed after, or ``None`` for none."""
    if setting == "federated":
        if not (run_dir / "state.pt").is_file():
            return None
        from rwft.server.state import load_state

        state = load_state(run_dir)
        return state.round if state is not None else None
    last = run_dir / "last.pt"
    return int(load_checkpoint(last)["epoch"]) if last.is_file() else None


def _centralised(cfg: RwftConfig, resume: bool, progress: _Progress) -> dict[str, Any]:
    from rwft.core.run import train

    # The trial's folder belongs to the sweep: an attempt that crashed before its first
    # checkpoint left no last.pt to resume, and its partial files are replaced.
    return train(cfg, resume=resume, overwrite=not resume, progress=False, on_epoch=progress).metrics


def _federated(cfg: RwftConfig, resume: bool, progress: _Progress) -> dict[str, Any]:
    from rwft.clients.app import app as client_app
    from rwft.core.config import to_container
    from rwft.core.tblog import RunLogger
    from rwft.federation.inprocess import InProcessGrid
    from rwft.server.app import run_federation
    from rwft.server.central_view import RoundRecord
    from rwft.server.launch import prepare_federation

    cfg, run_config = prepare_federation(cfg, resume=resume)
    sites = cfg.federation.sites
    nodes = {10 + i: {"partition-id": i, "num-partitions": sites} for i in range(sites)}

    def on_round(record: RoundRecord) -> None:
        progress(record.round, record.heldout)

    run_federation(InProcessGrid(client_app, nodes, run_config), run_config, on_round=on_round)
    metrics = json.loads((Path(cfg.output_dir) / "metrics.json").read_text())
    # TensorBoard's HParams view compares every trial of a sweep, federations included.
    with RunLogger(Path(cfg.output_dir) / "tb") as logger:
        logger.hparams(to_container(cfg) | {SETTING_KEY: "federated"},
                       {f"test/{k}": v["value"] for k, v in metrics["final"]["test"].items() if isinstance(v, dict)})
    return metrics


def _save_predictions(cfg: RwftConfig, checkpoint: Path, out: Path) -> None:
    """The kept model's positive-class probabilities on validation and test, with labels (for DeLong)."""
    from rwft.core.data import load_splits
    from rwft.core.engine import predict
    from rwft.core.model import build_model

    payload = load_checkpoint(checkpoint)
    splits = load_splits(cfg)
    model = build_model(cfg.model, len(payload["class_names"]))
    model.load_state_dict(payload["model"])
    np.savez_compressed(
        out, test_labels=splits.test.labels, test_probs=predict(model, splits.test, cfg)[:, 1],
        val_labels=splits.val.labels, val_probs=predict(model, splits.val, cfg)[:, 1],
        threshold=np.float64(payload.get("threshold", 0.5)))
    print(f"rwft trial: predictions on {len(splits.test)} test images -> {out}", file=sys.stderr)
