"""``rwft train`` end to end on real PneumoniaMNIST with the default ImageNet backbone."""

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from rwft.core.checkpoint import load_checkpoint
from rwft.core.config import load_config
from rwft.core.run import evaluate, train

pytestmark = pytest.mark.integration

# Small enough for seconds per epoch on 2 CPU cores, real enough that a broken pipeline
# (labels shuffled, weights random, threshold on test...) cannot reach the AUROC floor.
QUICK = ["data.image_size=32", "train.batch_size=64", "train.lr=0.002", "train.bootstrap=200",
         "train.device=cpu"]


def _events(path: Path) -> EventAccumulator:
    accumulator = EventAccumulator(str(path), size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    accumulator.Reload()
    return accumulator


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, pneumoniamnist_npz):
    run_dir = tmp_path_factory.mktemp("run")
    cfg = load_config(overrides=[*QUICK, f"data.root={pneumoniamnist_npz}", "train.epochs=2",
                                 "data.max_train_images=1500",
                                 f"output_dir={run_dir}"])
    return train(cfg, progress=False)


@pytest.mark.timeout(600)
def test_default_imagenet_backbone_learns_pneumonia(trained_run):
    test = trained_run.metrics["test"]
    assert test["num_examples"] == 624
    assert test["auroc"]["value"] >= 0.90, test
    for name in ("auroc", "auprc", "accuracy", "sensitivity", "specificity", "precision", "f1"):
        low, high = test[name]["ci95"]
        assert low <= test[name]["value"] <= high
    on_disk = json.loads((trained_run.run_dir / "metrics.json").read_text())
    assert on_disk["test"]["auroc"]["value"] == test["auroc"]["value"]
    assert 0.0 < trained_run.metrics["threshold"] < 1.0


def test_run_directory_holds_config_checkpoints_and_tensorboard(trained_run):
    run_dir = trained_run.run_dir
    assert load_config(run_dir / "config.yaml").train.epochs == 2
    best = load_checkpoint(run_dir / "best.pt")
    assert best["epoch"] == trained_run.metrics["best_epoch"]
    assert best["threshold"] == trained_run.metrics["threshold"]
    assert load_checkpoint(run_dir / "last.pt")["epoch"] == 2

    events = _events(run_dir / "tb")
    tags = events.Tags()
    steps = [s.step for s in events.Scalars("train/loss")]
    assert steps == list(range(1, len(steps) + 1)) and len(steps) > 10  # step = optimizer steps taken
    assert len(events.Scalars("train/lr")) == len(steps)
    assert [s.step for s in events.Scalars("val/auroc")] == [1, 2]
    assert events.Scalars("test/auroc")[0].value == pytest.approx(trained_run.metrics["test"]["auroc"]["value"],
                                                                  abs=1e-6)
    assert {"test/roc_curve", "test/confusion_matrix"} <= set(tags["images"])
    assert "test/pr_curve" in tags["tensors"]
    hparams = _events(run_dir / "tb" / "hparams")
    assert "hparam/test/auroc" in hparams.Tags()["scalars"]


def test_evaluate_reproduces_the_test_metrics_from_the_checkpoint(trained_run):
    again = evaluate(str(trained_run.run_dir / "best.pt"), ["train.bootstrap=200"])
    assert again["auroc"]["value"] == pytest.approx(trained_run.metrics["test"]["auroc"]["value"], abs=1e-6)
    assert again["threshold"] == trained_run.metrics["threshold"]


@pytest.mark.timeout(600)
def test_killed_run_resumes_from_the_last_finished_epoch(tmp_path, pneumoniamnist_npz):
    run_dir = tmp_path / "run"
    args = [*QUICK, f"data.root={pneumoniamnist_npz}", "data.max_train_images=600", "train.epochs=3",
            f"output_dir={run_dir}"]
    command = [sys.executable, "-m", "rwft.core.cli", "train", *args]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 300
        while not (run_dir / "last.pt").exists():
            assert process.poll() is None, "training ended before its first checkpoint"
            assert time.monotonic() < deadline, "no checkpoint within 300 s"
            time.sleep(0.2)
        process.send_signal(signal.SIGKILL)  # a crash: no cleanup, no final write
        process.wait(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
    killed_at = load_checkpoint(run_dir / "last.pt")["epoch"]
    assert 1 <= killed_at < 3
    steps_done = load_checkpoint(run_dir / "last.pt")["trainer"]["global_step"]

    resumed = subprocess.run([sys.executable, "-m", "rwft.core.cli", "train", "--resume", str(run_dir)],
                             capture_output=True, text=True, timeout=400)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    final = load_checkpoint(run_dir / "last.pt")
    assert final["epoch"] == 3
    steps_per_epoch = steps_done // killed_at
    assert final["trainer"]["global_step"] == 3 * steps_per_epoch  # no epoch lost or repeated
    assert (run_dir / "metrics.json").is_file()
