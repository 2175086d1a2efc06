"""What a sweep hands Ray Tune: the trainable, the search space, the scheduler and a progress callback.

Facts about Ray 2.55 this module is built around (checked on the project's machines):

- Ray keeps a trial that asks for a GPU pending for ever where there is none
  (``rwft.experiments.sweep.run_ray`` drops the GPU request then), and sets
  ``CUDA_VISIBLE_DEVICES=""`` in trials without one: the device is chosen from the
  GPUs Ray assigned to the trial (``ray.get_gpu_ids``), never from what torch sees.
- A fractional GPU is a scheduling promise, not a memory limit: the trial caps itself
  (``torch.cuda.set_per_process_memory_fraction``).
- Trials run in worker processes, maybe in another working directory: every path a
  trial uses is absolute (``rwft.experiments.sweep``).
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ray import tune

from rwft.experiments.sweep import ProgressLog, Sweep, describe, trial_name
from rwft.experiments.trials import STEP_METRIC, VAL_METRIC, run_trial


def make_trainable(sweep: Sweep) -> Callable[[dict[str, Any]], None]:
    """Tune's function trainable: one ``rwft.experiments.trials.run_trial`` per Tune trial."""
    keys, gpu, threads = sweep.param_keys(), sweep.gpu, max(1, int(sweep.cpu))

    def rwft_trial(config: dict[str, Any]) -> None:
        params = {key: config[key] for key in keys}
        trial = sweep.trial(params)
        device = _trial_device(gpu)

        def report(step: int, metrics: dict[str, float]) -> None:
            # The trial's run directory holds the real checkpoint (last.pt / state.pt); Tune's
            # checkpoint records which step it is, so that Tune retries the trial from it.
            with tempfile.TemporaryDirectory() as folder:
                Path(folder, "rwft_checkpoint.json").write_text(json.dumps({"step": step, "run_dir": trial.run_dir}))
                tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(folder))

        record = run_trial(trial, report=report, device=device, num_threads=threads)
        final = {STEP_METRIC: record.get("steps", 0), VAL_METRIC: record.get("val_auroc", float("nan")),
                 "done": True} | {f"test_{name}": value for name, value in record["test"].items()}
        tune.report(final)

    return rwft_trial


def _trial_device(gpu_fraction: float) -> str:
    """``cuda`` when Ray gave this trial a GPU (memory capped to its fraction), else ``cpu``."""
    import ray

    if not ray.get_gpu_ids():
        return "cpu"
    if 0 < gpu_fraction < 1:
        import torch

        torch.cuda.set_per_process_memory_fraction(gpu_fraction, 0)
    return "cuda"


def param_space(sweep: Sweep) -> dict[str, Any]:
    space: dict[str, Any] = {key: tune.grid_search(values) for key, values in sweep.grid.items()}
    for key, dist in sweep.sample.items():
        (kind, args), = dist.items()
        space[key] = tune.choice(args) if kind == "choice" else getattr(tune, kind)(*args)
    return space


def scheduler(sweep: Sweep) -> Any:
    """ASHA on validation AUROC per epoch/round, or ``None`` (every trial runs to the end)."""
    if sweep.asha is None:
        return None
    from ray.tune.schedulers import ASHAScheduler

    configs = [sweep.trial(point).config() for point in sweep.grid_points()]
    longest = max(cfg.federation.rounds if sweep.trial(p).setting == "federated" else cfg.train.epochs
                  for cfg, p in zip(configs, sweep.grid_points()))
    options = {"max_t": longest, "grace_period": 1, "reduction_factor": 2} | sweep.asha
    return ASHAScheduler(time_attr=STEP_METRIC, **options)


class ProgressCallback(tune.Callback):
    """Tune's trial events as ``ProgressLog`` lines (Tune's own console output is turned off)."""

    def __init__(self, total: int, keys: list[str]) -> None:
        self.total = total
        self.keys = keys  # the sweep's keys in order: trial names as the run directories have them
        self._log: ProgressLog | None = None

    def __getstate__(self) -> dict[str, Any]:  # Tune pickles callbacks (not sys.stderr) into its state
        return {"total": self.total, "keys": self.keys, "_log": None}

    @property
    def log(self) -> ProgressLog:
        if self._log is None:
            self._log = ProgressLog(self.total)
        return self._log

    def _say(self, trials: list, trial: Any, state: str, detail: str = "", finished: bool = False) -> None:
        done = {str(t.trial_id) for t in trials if t.status in ("TERMINATED", "ERROR")}
        self.log.finished = done | ({str(trial.trial_id)} if finished else set())
        self.log.change(trial_name({key: trial.config[key] for key in self.keys}), state, detail)

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._say(trials, trial, "running")

    def on_trial_recover(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._say(trials, trial, "crashed; retrying from its checkpoint", str(trial.error_file or ""))

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._say(trials, trial, "failed", f"see {trial.error_file}" if trial.error_file else "", finished=True)

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        result = trial.last_result or {}
        if result.get("done") and "test_auroc" in result:
            detail = describe({"test": {"auroc": result["test_auroc"]}, "val_auroc": result.get(VAL_METRIC)})
            self._say(trials, trial, "finished", detail, finished=True)
        else:
            self._say(trials, trial, "stopped early by the scheduler",
                      f"val AUROC {result.get(VAL_METRIC, float('nan')):.3f} at step {result.get(STEP_METRIC)}",
                      finished=True)
