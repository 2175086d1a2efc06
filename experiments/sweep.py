"""``rwft sweep SWEEP.yaml [key=value ...]``: many trials over a search space, on Ray Tune or one by one.

A sweep file (see ``examples/sweep_smoke.yaml`` and ``examples/paper/``)::

    base: pneumoniamnist_cpu.yaml      # experiment file, relative to the sweep file (optional)
    overrides: [data.image_size=28]    # for every trial
    federated: [federation.sites=3]    # for federated trials only (likewise ``centralised``)
    grid:                              # every combination (tune.grid_search)
      setting: [centralised, federated]
      model.pretrained: [true, false]
      seed: [0, 1, 2, 3, 4]
    variants:                          # named sets of overrides, chosen by grid.variant: one
      default: []                      # ingredient at a time (an ablation), each compared with
      ema: [train.ema_decay=0.99]      # ``default`` only, not with one another
    sample:                            # drawn num_samples times per grid point
      train.lr: {loguniform: [1.0e-4, 1.0e-2]}
    num_samples: 1
    resources: {cpu: 1, gpu: 0.5}      # per trial; a fractional GPU also caps its memory
    max_failures: 2                    # retries of a crashed trial, from its checkpoint
    scheduler: none                    # or {asha: {grace_period: 1}}: stops bad trials on val AUROC
    output_dir: runs/sweep

Command-line ``key=value`` items whose first part is a sweep-file key (``output_dir=``,
``resources.cpu=``, ``max_failures=``...) change the sweep; any other is a config override for
every trial (``data.root=...``), applied after the file's ``overrides`` and setting blocks (it
wins over them: ``federation.rounds=1`` for a quick look at a federated profile) and before the
variant and the grid's parameters, which define the arms. The sweep directory holds
``sweep.yaml`` (resolved), ``trials/<name>/`` (one run directory per trial,
``rwft.experiments.trials``), ``tune/`` (Ray Tune's experiment state, for ``--resume``),
``results.csv``, ``summary.csv`` and ``comparisons.csv`` (``rwft.experiments.results``).
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import math
import os
import re
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

from rwft.core.config import load_config
from rwft.core.errors import ConfigError, RwftError
from rwft.experiments.trials import (
    SETTING_KEY,
    SETTINGS,
    STEP_METRIC,
    VAL_METRIC,
    VARIANT_KEY,
    Trial,
    is_complete,
    run_trial,
)

SWEEP_FILE = "sweep.yaml"  # the resolved sweep, saved in the sweep directory
TUNE_NAME = "tune"  # Ray Tune's experiment folder inside the sweep directory
SWEEP_KEYS = ("base", "overrides", "centralised", "federated", "variants", "grid", "sample", "num_samples",
              "resources", "max_failures", "scheduler", "output_dir")
SAMPLERS = ("uniform", "loguniform", "choice", "randint")
# Paths in a trial's config must be absolute: Ray runs trials in other working directories.
PATH_KEYS = ("data.root", "data.cache_dir", "model.weights")


@dataclass
class Sweep:
    """A parsed, checked sweep file (see the module docstring)."""

    sweep_dir: Path
    config_file: str | None
    overrides: tuple[str, ...]
    setting_overrides: dict[str, tuple[str, ...]]
    grid: dict[str, list[Any]]
    sample: dict[str, dict[str, list[Any]]] = field(default_factory=dict)
    num_samples: int = 1
    cpu: float = 1.0
    gpu: float = 0.0
    max_failures: int = 1
    asha: dict[str, Any] | None = None
    raw: dict[str, Any] = field(default_factory=dict)
    variants: dict[str, tuple[str, ...]] = field(default_factory=dict)

    @property
    def total(self) -> int:
        return math.prod(len(values) for values in self.grid.values()) * self.num_samples

    def grid_points(self) -> list[dict[str, Any]]:
        keys = list(self.grid)
        return [dict(zip(keys, values)) for values in itertools.product(*(self.grid[k] for k in keys))]

    def trial(self, params: dict[str, Any]) -> Trial:
        name = trial_name(params)
        return Trial(name, params, self.config_file, self.overrides, str(self.sweep_dir / "trials" / name),
                     self.setting_overrides, self.variants)

    def param_keys(self) -> list[str]:
        return [*self.grid, *self.sample]


def trial_name(params: dict[str, Any]) -> str:
    """A readable, stable folder name for a trial: its parameters and a short hash of them."""
    def short(value: Any) -> str:
        return f"{value:.3g}" if isinstance(value, float) else str(value).lower() if isinstance(value, bool) \
            else str(value)
    text = ",".join(f"{key.split('.')[-1]}={short(value)}" for key, value in params.items())
    digest = hashlib.sha1(repr(sorted((k, repr(v)) for k, v in params.items())).encode()).hexdigest()[:6]
    return re.sub(r"[^A-Za-z0-9_.=,+-]", "_", text)[:120] + "-" + digest


def load_sweep(path: str | os.PathLike[str], overrides: Sequence[str] = ()) -> Sweep:
    """Parse ``path`` with ``overrides``; every trial's config is built once here, so a mistake stops the sweep
    before anything runs (``ConfigError`` naming the key)."""
    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"sweep file {file} does not exist. See examples/sweep_smoke.yaml for the format.")
    try:
        raw = OmegaConf.load(file)
    except Exception as exc:
        raise ConfigError(f"sweep file {file} is not valid YAML: {exc}") from exc
    if not isinstance(raw, DictConfig):
        raise ConfigError(f"sweep file {file} must be a mapping of {', '.join(SWEEP_KEYS)}.")
    sweep_items, config_items = [], []
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value (e.g. output_dir=runs/s1).")
        (sweep_items if item.split("=", 1)[0].split(".")[0] in SWEEP_KEYS else config_items).append(item)
    if sweep_items:
        raw = OmegaConf.merge(raw, OmegaConf.from_dotlist(sweep_items))
    spec: dict[str, Any] = OmegaConf.to_container(raw, resolve=True)  # type: ignore[assignment]
    unknown = sorted(set(spec) - set(SWEEP_KEYS))
    if unknown:
        raise ConfigError(f"sweep file {file}: unknown key(s) {', '.join(unknown)}; a sweep file has "
                          f"{', '.join(SWEEP_KEYS)} (config keys go under overrides, grid or sample).")
    base = spec.get("base")
    config_file = str((file.parent / base).resolve()) if base else None
    if "output_dir" not in spec:
        raise ConfigError(f"sweep file {file} names no output_dir: add output_dir: runs/NAME, or pass output_dir=DIR.")
    common = _string_list(spec, "overrides", file)
    # The command line's config overrides come after the setting's block, so that they win over
    # everything in the file except what defines the arms (variants and grid parameters).
    given = _absolute_paths_given(config_items)
    setting_overrides = {s: (*_string_list(spec, s, file), *given) for s in SETTINGS}
    grid = {k: (list(v) if isinstance(v, (list, ListConfig)) else [v])
            for k, v in _dotted(spec.get("grid") or {}, is_leaf=lambda v: not isinstance(v, dict)).items()}
    sample = _samplers(_dotted(spec.get("sample") or {}, is_leaf=lambda v: not isinstance(v, dict)
                               or bool(set(v) & set(SAMPLERS))), file)
    resources = spec.get("resources") or {}
    scheduler = spec.get("scheduler") or "none"
    sweep = Sweep(
        sweep_dir=Path(str(spec["output_dir"])).expanduser().resolve(), config_file=config_file,
        overrides=tuple(_absolute_paths(config_file, common)), setting_overrides=setting_overrides,
        grid=grid, sample=sample, num_samples=int(spec.get("num_samples", 1)),
        cpu=float(resources.get("cpu", 1)), gpu=float(resources.get("gpu", 0)),
        max_failures=int(spec.get("max_failures", 1)),
        asha=_asha(scheduler, file), raw=spec, variants=_variants(spec, file),
    )
    _check(sweep, file)
    return sweep


def _dotted(tree: dict[str, Any], is_leaf: Any, prefix: str = "") -> dict[str, Any]:
    """``{"model": {"pretrained": [...]}}`` (how ``grid.model.pretrained=[...]`` arrives from the command line)
    as ``{"model.pretrained": [...]}``, the sweep file's spelling; a later spelling of a key wins."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if is_leaf(value):
            flat[name] = value  # a key given again keeps its place: trial names keep their order
        else:
            flat |= _dotted(value, is_leaf, f"{name}.")
    return flat


def _string_list(spec: dict[str, Any], key: str, file: Path) -> list[str]:
    value = spec.get(key) or []
    if not isinstance(value, list) or not all(isinstance(v, str) and "=" in v for v in value):
        raise ConfigError(f"sweep file {file}: {key} must be a list of key=value strings, e.g. "
                          f"[data.image_size=28].")
    return list(value)


def _variants(spec: dict[str, Any], file: Path) -> dict[str, tuple[str, ...]]:
    variants = spec.get("variants") or {}
    if not isinstance(variants, dict):
        raise ConfigError(f"sweep file {file}: variants must map a name to a list of key=value strings, e.g. "
                          "{default: [], ema: [train.ema_decay=0.99]}.")
    return {str(name): tuple(_string_list({f"variants.{name}": value}, f"variants.{name}", file))
            for name, value in variants.items()}


def _samplers(sample: dict[str, Any], file: Path) -> dict[str, dict[str, list[Any]]]:
    parsed = {}
    for key, dist in sample.items():
        if not (isinstance(dist, dict) and len(dist) == 1 and next(iter(dist)) in SAMPLERS):
            raise ConfigError(f"sweep file {file}: sample.{key} must be one of {', '.join(SAMPLERS)} with its "
                              f"arguments, e.g. {{loguniform: [1.0e-4, 1.0e-2]}}.")
        parsed[str(key)] = {str(k): list(v) for k, v in dist.items()}
    return parsed


def _asha(scheduler: Any, file: Path) -> dict[str, Any] | None:
    if scheduler in ("none", None):
        return None
    if isinstance(scheduler, str) and scheduler == "asha":
        return {}
    if isinstance(scheduler, dict) and set(scheduler) == {"asha"}:
        return dict(scheduler["asha"] or {})
    raise ConfigError(f"sweep file {file}: scheduler must be none, asha or {{asha: {{grace_period: 1, "
                      f"reduction_factor: 2}}}}, got {scheduler!r}.")


def _absolute_paths_given(overrides: list[str]) -> list[str]:
    """``overrides`` with the paths they set (``PATH_KEYS``) made absolute (relative to the current directory);
    values are parsed as OmegaConf parses overrides (``data.root="my scans"``)."""
    absolute = []
    for item in overrides:
        key = item.split("=", 1)[0].strip()
        value = OmegaConf.select(OmegaConf.from_dotlist([item]), key) if key in PATH_KEYS else None
        absolute.append(f"{key}={Path(str(value)).expanduser().resolve()}" if value else item)
    return absolute


def _absolute_paths(config_file: str | None, overrides: list[str]) -> list[str]:
    """Overrides with the config's paths made absolute (relative to the current directory)."""
    cfg = load_config(config_file, overrides)
    absolute = []
    for key in PATH_KEYS:
        value = OmegaConf.select(cfg, key)
        if value:
            absolute.append(f"{key}={Path(value).expanduser().resolve()}")
    return [*overrides, *absolute]


def _check(sweep: Sweep, file: Path) -> None:
    if sweep.total < 1:
        raise ConfigError(f"sweep file {file}: the grid is empty (a key with no values?).")
    for key, values in sweep.grid.items():
        if key == SETTING_KEY:
            bad = [v for v in values if v not in SETTINGS]
            if bad:
                raise ConfigError(f"sweep file {file}: grid.{SETTING_KEY} values must be {' or '.join(SETTINGS)}, "
                                  f"got {bad}.")
        if key == VARIANT_KEY:
            unknown = [v for v in values if str(v) not in sweep.variants]
            if unknown:
                raise ConfigError(f"sweep file {file}: grid.{VARIANT_KEY} names {unknown}, which variants does not "
                                  f"define (it has {', '.join(sweep.variants) or 'none'}).")
    if sweep.variants and VARIANT_KEY not in sweep.grid:
        raise ConfigError(f"sweep file {file}: variants are defined but grid.{VARIANT_KEY} picks none of them: add "
                          f"grid.{VARIANT_KEY}: [{', '.join(sweep.variants)}].")
    defaults = OmegaConf.structured(load_config(None, []))
    for key in sweep.sample:
        if OmegaConf.select(defaults, key, default="__missing__") == "__missing__":
            raise ConfigError(f"sweep file {file}: sample.{key} is not a config key (see `rwft config`).")
    if sweep.asha is not None and len(sweep.grid.get("seed", [])) > 1:
        raise ConfigError(f"sweep file {file}: the ASHA scheduler would stop some seeds of a configuration "
                          "early and bias its mean over seeds. Use scheduler: none for seed replicates, or "
                          "search with ASHA first and run the seeds of the chosen configurations afterwards.")
    if sweep.cpu <= 0 or sweep.gpu < 0 or (sweep.gpu > 1 and sweep.gpu != int(sweep.gpu)):
        raise ConfigError(f"sweep file {file}: resources need cpu > 0 and gpu a fraction in [0, 1] or a whole "
                          f"number, got cpu={sweep.cpu}, gpu={sweep.gpu}.")
    # Build every grid trial's config now: a wrong key or value fails here, not in trial 37.
    for point in sweep.grid_points():
        sweep.trial(point).config()


class ProgressLog:
    """One line per trial state change, with a text progress bar of trials finished (readable in a log)."""

    def __init__(self, total: int, out: Any = None) -> None:
        self.total = total
        self.finished: set[str] = set()
        self.out = out or sys.stderr
        self.started = time.monotonic()

    def change(self, name: str, state: str, detail: str = "", finished: bool = False) -> None:
        if finished:
            self.finished.add(name)
        done = len(self.finished)
        width = 20
        filled = round(width * done / max(self.total, 1))
        elapsed = time.monotonic() - self.started
        bar = "#" * filled + "-" * (width - filled)
        print(f"rwft sweep [{bar}] {done}/{self.total} {elapsed:7.0f}s  {name}: {state}"
              + (f" ({detail})" if detail else ""), file=self.out, flush=True)


def describe(record: dict[str, Any] | None) -> str:
    if not record or "test" not in record:
        return ""
    return f"test AUROC {record['test'].get('auroc', math.nan):.3f}, val AUROC {record.get('val_auroc', math.nan):.3f}"


def run_local(sweep: Sweep) -> None:
    """``--backend local``: every grid point's trial here, one after another, retried ``max_failures`` times.

    Finished trials are skipped (a resumed sweep). Sampled keys are drawn from a generator
    seeded by the sweep's ``seed`` values, so a resumed local sweep draws the same points.
    """
    if sweep.sample:
        raise RwftError("--backend local runs grid sweeps only; sampled keys (sample:) need Ray Tune "
                        "(--backend ray).")
    points = sweep.grid_points()
    progress = ProgressLog(len(points))
    for params in points:
        trial = sweep.trial(params)
        if is_complete(trial.run_dir):
            progress.change(trial.name, "finished earlier, skipped", finished=True)
            continue
        for attempt in range(sweep.max_failures + 1):
            progress.change(trial.name, "running" if attempt == 0 else f"retrying from its checkpoint "
                            f"(attempt {attempt + 1} of {sweep.max_failures + 1})")
            try:
                record = run_trial(trial)
            except Exception as exc:
                last = attempt == sweep.max_failures
                progress.change(trial.name, "failed" if last else "crashed", f"{type(exc).__name__}: {exc}",
                                finished=last)
                continue
            progress.change(trial.name, "finished", describe(record), finished=True)
            break


def run_ray(sweep: Sweep, *, resume: bool, address: str | None) -> None:
    """Run the sweep's trials on Ray Tune (a local Ray runtime, or the cluster at ``address``)."""
    # Tune's console tables would drown the one-line-per-change progress (ProgressCallback);
    # with the classic output engine, verbose=0 silences them.
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    if not address:
        # Ray's memory monitor kills a trial's worker once the whole machine passes 95% memory, whoever
        # uses it, and Tune 2.55 then aborts the sweep ("Caught unexpected exception"): on a shared
        # workstation that ends sweeps that fit. The kernel's OOM killer still guards the machine.
        os.environ.setdefault("RAY_memory_monitor_refresh_ms", "0")
    import ray
    from ray import tune

    from rwft.experiments.ray_backend import ProgressCallback, make_trainable, param_space, scheduler

    if not ray.is_initialized():
        if address:
            ray.init(address=address, include_dashboard=False, configure_logging=False, log_to_driver=False)
        else:  # small and local: no dashboard, only this machine's cores
            ray.init(num_cpus=os.cpu_count() or 1, include_dashboard=False, configure_logging=False,
                     log_to_driver=False)
    gpus_available = float(ray.cluster_resources().get("GPU", 0))
    gpu = sweep.gpu
    if gpu > 0 and gpus_available == 0:
        # Ray would keep a trial that asks for a GPU pending for ever on a machine without one.
        print(f"rwft sweep: resources.gpu={gpu} but the Ray cluster has no GPU: the trials run on CPU.",
              file=sys.stderr, flush=True)
        gpu = 0.0
    trainable = tune.with_resources(make_trainable(sweep), {"cpu": sweep.cpu, "gpu": gpu})
    experiment = sweep.sweep_dir / TUNE_NAME
    if resume and tune.Tuner.can_restore(str(experiment)):
        tuner = tune.Tuner.restore(str(experiment), trainable=trainable, resume_errored=True)
    else:
        if resume:
            print(f"rwft sweep: {experiment} holds no Ray Tune experiment to restore; finished trials in "
                  f"{sweep.sweep_dir / 'trials'} are kept and the rest run.", file=sys.stderr, flush=True)
        tuner = tune.Tuner(
            trainable, param_space=param_space(sweep),
            tune_config=tune.TuneConfig(metric=VAL_METRIC, mode="max", num_samples=sweep.num_samples,
                                        scheduler=scheduler(sweep)),
            run_config=tune.RunConfig(
                name=TUNE_NAME, storage_path=str(sweep.sweep_dir), verbose=0,
                failure_config=tune.FailureConfig(max_failures=sweep.max_failures),
                checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
                callbacks=[ProgressCallback(sweep.total, sweep.param_keys())]),
        )
    # After an interruption Ray lists every trial that had not started as "Failed to fetch
    # metrics" (dozens of lines); rwft reads results from its own trial folders and names the
    # trials that are not complete, with the --resume command, itself.
    logging.getLogger("ray.tune.analysis.experiment_analysis").setLevel(logging.ERROR)
    tuner.fit()


def save_resolved(sweep: Sweep) -> None:
    sweep.sweep_dir.mkdir(parents=True, exist_ok=True)
    (sweep.sweep_dir / SWEEP_FILE).write_text(OmegaConf.to_yaml(OmegaConf.create(
        sweep.raw | {"output_dir": str(sweep.sweep_dir), "base": sweep.config_file,
                     "overrides": list(sweep.overrides)}
        | {setting: list(items) for setting, items in sweep.setting_overrides.items()})))


def resolve_resume(path: str, overrides: Sequence[str]) -> Sweep:
    """The sweep saved in a sweep directory, for ``--resume DIR``."""
    saved = Path(path) / SWEEP_FILE
    if not saved.is_file():
        raise RwftError(f"{path} is not a sweep directory (no {SWEEP_FILE}): pass the output_dir of a sweep.")
    return load_sweep(saved, [*overrides, f"output_dir={Path(path).resolve()}"])


__all__ = ["STEP_METRIC", "Sweep", "load_sweep", "run_local", "run_ray", "trial_name"]
