"""``rwft sweep`` end to end on a local Ray runtime with real PneumoniaMNIST: a centralised and a federated arm,
ImageNet vs scratch, two seeds (examples/sweep_smoke.yaml). One trial crashes once and is retried from its
checkpoint; the sweep is killed half-way and resumed without redoing finished trials; then the tables, their
statistics and the report are checked. ``--backend local`` runs the same trial function without Ray."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from federation_helpers import Started, wait_for
from omegaconf import OmegaConf
from scipy import stats
from sklearn.metrics import roc_auc_score
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from rwft.core.errors import ConfigError
from rwft.experiments.sweep import load_sweep, resolve_resume, save_resolved
from rwft.experiments.trials import CRASH_ONCE_ENV

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "examples" / "sweep_smoke.yaml"
RWFT = str(Path(sys.executable).parent / "rwft")


def _statuses(sweep_dir: Path) -> dict[str, dict]:
    return {p.parent.name: json.loads(p.read_text()) for p in (sweep_dir / "trials").glob("*/trial.json")}


def _attempts(sweep_dir: Path) -> dict[str, list[dict]]:
    return {p.parent.name: [json.loads(line) for line in p.read_text().splitlines()]
            for p in (sweep_dir / "trials").glob("*/attempts.jsonl")}


@pytest.fixture(scope="module")
def resumed_sweep(tmp_path_factory, pneumoniamnist_npz):
    """The smoke sweep on Ray, killed (SIGKILL) once three trials finished, then resumed to the end."""
    tmp = tmp_path_factory.mktemp("sweep")
    sweep_dir = tmp / "sweep"
    env = os.environ | {CRASH_ONCE_ENV: str(tmp / "crashed-once"), "RWFT_CACHE_DIR": str(tmp / "cache")}
    command = [RWFT, "sweep", str(SMOKE), f"output_dir={sweep_dir}", f"data.root={pneumoniamnist_npz}"]
    first = Started(command, tmp / "first.log", env=env)
    try:
        wait_for(lambda: first.process.poll() is not None
                 or sum(r["status"] == "complete" for r in _statuses(sweep_dir).values()) >= 3, 1200,
                 "three finished trials")
        assert first.process.poll() is None, first.text()[-5000:]
    finally:
        first.kill9()
        first.stop()
    before = {name: r for name, r in _statuses(sweep_dir).items() if r["status"] == "complete"}
    attempts_before = _attempts(sweep_dir)
    resumed = subprocess.run([RWFT, "sweep", "--resume", str(sweep_dir)], capture_output=True, text=True,
                             timeout=1200, env=env)
    return {"dir": sweep_dir, "first_log": first.text(), "resumed": resumed, "before": before,
            "attempts_before": attempts_before}


@pytest.mark.timeout(2400)
def test_resumed_sweep_finishes_without_redoing_finished_trials(resumed_sweep):
    resumed = resumed_sweep["resumed"]
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    after = _statuses(resumed_sweep["dir"])
    assert len(after) == 8 and all(r["status"] == "complete" for r in after.values())
    attempts = _attempts(resumed_sweep["dir"])
    for name, record in resumed_sweep["before"].items():  # finished before the kill: never started again
        assert after[name]["seconds"] == record["seconds"]
        assert attempts[name] == resumed_sweep["attempts_before"][name]
    # One line per trial state change, with a progress bar of trials done.
    lines = [line for line in resumed.stderr.splitlines() if line.startswith("rwft sweep [")]
    assert any("] 8/8 " in line for line in lines), resumed.stderr
    assert any(": running" in line for line in lines) and any(": finished" in line for line in lines)


@pytest.mark.timeout(2400)
def test_a_crashed_trial_is_retried_from_its_checkpoint(resumed_sweep):
    attempts = _attempts(resumed_sweep["dir"])
    retried = {name: runs for name, runs in attempts.items() if len(runs) > 1 and runs[0]["resumed_after"] == 0
               and runs[1]["resumed_after"] >= 1}
    assert len(retried) >= 1, attempts  # the injected crash came after the first epoch/round's checkpoint
    assert "crashed; retrying from its checkpoint" in resumed_sweep["first_log"]
    # Only the injected crash: a trial that crashes by itself (every federated trial did, once per
    # round, when the round records became typed) is a bug that retries must not hide.
    logs = resumed_sweep["first_log"] + resumed_sweep["resumed"].stderr
    assert logs.count("crashed; retrying from its checkpoint") == 1, logs[-5000:]


@pytest.mark.timeout(2400)
def test_each_trial_is_a_run_directory_with_predictions(resumed_sweep):
    for run_dir in (resumed_sweep["dir"] / "trials").iterdir():
        record = json.loads((run_dir / "trial.json").read_text())
        assert (run_dir / "config.yaml").is_file() and (run_dir / "metrics.json").is_file()
        predictions = np.load(run_dir / "predictions.npz")
        assert len(predictions["test_labels"]) == 624  # PneumoniaMNIST's official test split
        assert roc_auc_score(predictions["test_labels"], predictions["test_probs"]) == pytest.approx(
            record["test"]["auroc"], abs=1e-6)
        events = EventAccumulator(str(run_dir / "tb"), size_guidance={"scalars": 0})
        events.Reload()
        tag = "global/auroc" if record["setting"] == "federated" else "val/auroc"
        assert len(events.Scalars(tag)) >= 2, (run_dir, events.Tags()["scalars"])
        assert "hparams" in {p.name for p in (run_dir / "tb").iterdir()}  # TensorBoard's HParams view


@pytest.mark.timeout(2400)
def test_results_summary_and_paired_statistics(resumed_sweep):
    sweep_dir = resumed_sweep["dir"]
    results = pd.read_csv(sweep_dir / "results.csv")
    assert len(results) == 8 and set(results["status"]) == {"complete"}
    assert {"setting", "model.pretrained", "seed", "image_size", "auroc", "sensitivity", "specificity"} \
        <= set(results.columns)
    summary = pd.read_csv(sweep_dir / "summary.csv")
    assert len(summary) == 4 and set(summary["n_seeds"]) == {2} and set(summary["image_size"]) == {28}
    for _, row in summary.iterrows():
        arm = results[(results["setting"] == row["setting"]) & (results["model.pretrained"] == row["model.pretrained"])]
        low, high = stats.t.interval(0.95, 1, loc=arm["auroc"].mean(), scale=stats.sem(arm["auroc"]))
        assert (row["auroc_mean"], row["auroc_ci_low"], row["auroc_ci_high"]) == pytest.approx(
            (arm["auroc"].mean(), low, high))
        assert {f"{m}_{s}" for m in ("accuracy", "specificity") for s in ("mean", "sd", "ci_low", "ci_high")} \
            <= set(summary.columns)
    comparisons = pd.read_csv(sweep_dir / "comparisons.csv")
    imagenet = comparisons[(comparisons["key"] == "model.pretrained") & (comparisons["metric"] == "auroc")]
    assert set(imagenet["context"]) == {"setting=centralised", "setting=federated"}
    row = imagenet[imagenet["context"] == "setting=centralised"].iloc[0]
    arm = results[results["setting"] == "centralised"].sort_values("seed")
    a, b = (arm[arm["model.pretrained"] == v]["auroc"].to_numpy() for v in (False, True))
    assert row["t_p"] == pytest.approx(stats.ttest_rel(b, a).pvalue)
    delong = pd.read_csv(sweep_dir / "auroc_tests.csv")
    assert len(delong[delong["key"] == "model.pretrained"]) == 4 and delong["p"].between(0, 1).all()


@pytest.mark.timeout(2400)
def test_the_report_has_its_figures_and_verdicts(resumed_sweep):
    sweep_dir = resumed_sweep["dir"]
    text = (sweep_dir / "report.md").read_text()
    assert "ImageNet vs scratch" in text or "scratch vs ImageNet" in text
    assert "paired t p" in text and "DeLong p" in text
    for figure in ("roc.png", "val_auroc.png", "forest.png"):
        assert (sweep_dir / "figures" / figure).stat().st_size > 5000
        assert f"figures/{figure}" in text
    assert "<table>" in (sweep_dir / "report.html").read_text()
    # A single run's report, from one trial's run directory.
    run_dir = next((sweep_dir / "trials").iterdir())
    single = subprocess.run([RWFT, "report", str(run_dir)], capture_output=True, text=True, timeout=600)
    assert single.returncode == 0, single.stderr
    assert "Test metrics" in (run_dir / "report.md").read_text() and (run_dir / "figures" / "roc.png").is_file()


@pytest.mark.timeout(900)
def test_local_backend_runs_the_same_trials_without_ray(tmp_path, pneumoniamnist_npz):
    # A machine without Ray: importing it fails in the sweep's process.
    (tmp_path / "no-ray" / "ray").mkdir(parents=True)
    (tmp_path / "no-ray" / "ray" / "__init__.py").write_text("raise ImportError('Ray is not installed here')\n")
    env = os.environ | {"RWFT_CACHE_DIR": str(tmp_path / "cache"),
                        "PYTHONPATH": os.pathsep.join([str(tmp_path / "no-ray"), os.environ.get("PYTHONPATH", "")])}
    sweep_dir = tmp_path / "local"
    result = subprocess.run([RWFT, "sweep", str(SMOKE), f"output_dir={sweep_dir}", f"data.root={pneumoniamnist_npz}",
                             "grid.setting=[centralised]", "grid.seed=[3]", "--backend", "local"],
                            capture_output=True, text=True, timeout=900, env=env)
    assert result.returncode == 0, result.stderr
    results = pd.read_csv(sweep_dir / "results.csv")
    assert sorted(results["model.pretrained"]) == [False, True] and set(results["status"]) == {"complete"}
    again = subprocess.run([RWFT, "sweep", "--resume", str(sweep_dir), "--backend", "local"], capture_output=True,
                           text=True, timeout=600, env=env)
    assert again.returncode == 0 and again.stderr.count("finished earlier, skipped") == 2, again.stderr


def test_sweep_file_mistakes_are_one_clear_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("grid:\n  model.backbonee: [a]\noutput_dir: x\n")
    with pytest.raises(ConfigError, match="model.backbonee"):
        load_sweep(bad)
    bad.write_text("grid:\n  seed: [0, 1]\nscheduler: asha\noutput_dir: x\n")
    with pytest.raises(ConfigError, match="seeds"):
        load_sweep(bad)
    result = subprocess.run([RWFT, "sweep", str(bad), "scheduler=none", "grid.setting=[both]"],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 2 and "centralised or federated" in result.stderr
    assert "Traceback" not in result.stderr


def test_variants_are_named_sets_of_overrides_checked_before_anything_runs(tmp_path):
    sweep_file = tmp_path / "ablation.yaml"
    sweep_file.write_text("variants:\n  default: []\n  lpft: [train.lp_epochs=1, train.ft_lr_scale=0.2]\n"
                          "grid:\n  variant: [default, lpft]\n  seed: [0, 1]\noutput_dir: out\n")
    sweep = load_sweep(sweep_file)
    configs = {(p["variant"], p["seed"]): sweep.trial(p).config() for p in sweep.grid_points()}
    assert len(configs) == 4
    assert configs[("lpft", 1)].train.lp_epochs == 1 and configs[("lpft", 1)].train.ft_lr_scale == 0.2
    assert configs[("default", 1)].train.lp_epochs == 0 and configs[("default", 1)].seed == 1
    sweep_file.write_text("variants:\n  default: []\ngrid:\n  variant: [default, emaa]\noutput_dir: out\n")
    with pytest.raises(ConfigError, match="emaa"):
        load_sweep(sweep_file)
    sweep_file.write_text("variants:\n  default: []\n  ema: [train.ema_decay=0.99]\ngrid:\n  seed: [0]\n"
                          "output_dir: out\n")
    with pytest.raises(ConfigError, match=r"grid.variant: \[default, ema\]"):
        load_sweep(sweep_file)
    sweep_file.write_text("variants:\n  ema: [train.ema_decayy=0.99]\ngrid:\n  variant: [ema]\noutput_dir: out\n")
    with pytest.raises(ConfigError, match="ema_decayy"):
        load_sweep(sweep_file)


def test_every_committed_sweep_file_resolves_every_trial(tmp_path):
    """A typo in a committed sweep (a key, a variant, a value), or a config key renamed under it, would
    surface hours into a run: every sweep file under examples/ and benchmarks/ loads, which builds every
    one of its trials' configs (``load_sweep`` checks them all before anything runs)."""
    sweep_files = [path for path in sorted([*ROOT.glob("examples/**/*.yaml"), *ROOT.glob("benchmarks/**/*.yaml")])
                   if "\ngrid:" in "\n" + path.read_text()]
    assert len(sweep_files) >= 10, sweep_files  # the paper profiles, the recipe ablations, the smoke sweep
    for path in sweep_files:
        assert load_sweep(path, [f"output_dir={tmp_path / path.stem}"]).total >= 2, path


def test_command_line_overrides_win_over_the_files_blocks_but_not_over_the_arms(tmp_path, monkeypatch):
    """`rwft sweep FILE federation.rounds=1` must mean one round even where the file's federated block sets
    three (it used to be silently overridden by the block); variants and grid parameters still win, and a
    resumed sweep builds the same configs."""
    monkeypatch.chdir(tmp_path)
    sweep_file = tmp_path / "profile.yaml"
    sweep_file.write_text("overrides: [train.epochs=3]\nfederated: [federation.rounds=3, federation.sites=3]\n"
                          "variants:\n  default: []\n  long: [train.epochs=6]\n"
                          "grid:\n  setting: [centralised, federated]\n  variant: [default, long]\n  seed: [0, 1]\n"
                          "output_dir: out\n")
    sweep = load_sweep(sweep_file, ["federation.rounds=1", "train.epochs=2", "data.root=data/xrays.npz"])

    def configs(of):
        return {(p["setting"], p["variant"], p["seed"]): of.trial(p).config() for p in of.grid_points()}

    built = configs(sweep)
    assert built[("federated", "default", 0)].federation.rounds == 1  # the command line beats the block
    assert built[("federated", "default", 0)].federation.sites == 3  # the rest of the block stays
    assert built[("centralised", "default", 1)].train.epochs == 2  # and beats the file's overrides
    assert built[("federated", "long", 0)].train.epochs == 6  # a variant defines an arm: it wins
    assert built[("centralised", "long", 1)].seed == 1
    assert built[("centralised", "default", 0)].data.root == str(tmp_path / "data" / "xrays.npz")  # made absolute
    quoted = load_sweep(sweep_file, ['data.root="my scans/xrays.npz"'])
    assert quoted.trial(quoted.grid_points()[0]).config().data.root == str(tmp_path / "my scans" / "xrays.npz")
    save_resolved(sweep)
    resumed = configs(resolve_resume(str(sweep.sweep_dir), []))
    assert {key: OmegaConf.to_yaml(cfg) for key, cfg in resumed.items()} == \
        {key: OmegaConf.to_yaml(cfg) for key, cfg in built.items()}
