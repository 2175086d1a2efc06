"""``rwft train`` end to end on real PneumoniaMNIST with the default ImageNet backbone."""

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from rwft.core.checkpoint import load_checkpoint
from rwft.core.config import load_config
from rwft.core.errors import DataError, RwftError
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


@pytest.mark.timeout(2400)  # includes the module's training run; the shared 2-core machine can be very slow
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


def _rwft(*args: str, timeout: int = 400) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "rwft.core.cli", *args], capture_output=True, text=True,
                          timeout=timeout)


@pytest.mark.timeout(2400)
def test_killed_and_resumed_run_is_bit_identical_to_the_uninterrupted_run(tmp_path, pneumoniamnist_npz):
    args = [*QUICK, f"data.root={pneumoniamnist_npz}", "data.max_train_images=300", "train.epochs=3",
            "train.max_steps_per_epoch=4", "train.num_threads=1"]
    straight = _rwft("train", *args, f"output_dir={tmp_path / 'straight'}")
    assert straight.returncode == 0, straight.stderr[-3000:]

    run_dir = tmp_path / "killed"
    command = [sys.executable, "-m", "rwft.core.cli", "train", *args, f"output_dir={run_dir}"]
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
    assert 1 <= killed_at < 3 and not (run_dir / "metrics.json").exists()

    extended = _rwft("train", "--resume", str(run_dir), "train.epochs=5")
    assert extended.returncode == 2 and "Start a new run with train.epochs=5" in extended.stderr
    assert "Traceback" not in extended.stderr

    resumed = _rwft("train", "--resume", str(run_dir))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resuming from epoch {killed_at} of 3" in resumed.stderr
    assert load_checkpoint(run_dir / "last.pt")["epoch"] == 3
    expected = json.loads((tmp_path / "straight" / "metrics.json").read_text())
    assert json.loads((run_dir / "metrics.json").read_text()) == expected  # every number, bit for bit
    assert torch.equal(load_checkpoint(run_dir / "best.pt")["model"]["head.weight"],
                       load_checkpoint(tmp_path / "straight" / "best.pt")["model"]["head.weight"])


def _snapshot(run_dir: Path) -> dict[str, tuple[bytes, int]]:
    return {str(p.relative_to(run_dir)): (p.read_bytes(), p.stat().st_mtime_ns)
            for p in sorted(run_dir.rglob("*")) if p.is_file()}


def test_a_run_directory_is_never_replaced_by_accident(trained_run, tmp_path):
    run_dir = trained_run.run_dir
    before = _snapshot(run_dir)
    saved = load_config(run_dir / "config.yaml")
    again = load_config(overrides=[*QUICK, f"data.root={saved.data.root}", f"output_dir={run_dir}"])
    with pytest.raises(RwftError, match="already holds a run .* --resume .* --overwrite"):
        train(again, progress=False)
    # A start that fails (here: no data) changes nothing, even with --overwrite or --resume.
    broken = load_config(overrides=[*QUICK, f"data.root={tmp_path / 'missing.npz'}", "train.epochs=2",
                                    f"output_dir={run_dir}"])
    with pytest.raises(RwftError, match="does not exist"):
        train(broken, overwrite=True, progress=False)
    with pytest.raises(RwftError, match="does not exist"):
        train(broken, resume=True, progress=False)
    assert _snapshot(run_dir) == before


def test_a_medmnist_checkpoint_scores_every_image_of_an_external_folder(trained_run, tmp_path,
                                                                         pneumoniamnist_npz):
    """A site exports its test images as ABNORMAL/NORMAL folders: rwft evaluate CKPT FOLDER scores
    all of them, as the dataset they are (no data.dataset), with ABNORMAL mapped to PNEUMONIA."""
    site = tmp_path / "site"
    with np.load(pneumoniamnist_npz) as npz:
        images, labels = npz["test_images"], npz["test_labels"].ravel()
    for i, (image, label) in enumerate(zip(images, labels)):
        folder = site / ("ABNORMAL" if label == 1 else "NORMAL")
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(folder / f"{i}.png")
    best = str(trained_run.run_dir / "best.pt")
    with pytest.raises(DataError, match="data.class_map.ABNORMAL=PNEUMONIA"):
        evaluate(best, ["train.bootstrap=0"], data=str(site))
    scored = evaluate(best, ["train.bootstrap=200", "data.class_map.ABNORMAL=PNEUMONIA"], data=str(site))
    assert scored["split"] == "all" and scored["num_examples"] == len(labels) == 624
    assert scored["positives"] == int(labels.sum()) and scored["classes"]["positive"] == "PNEUMONIA"
    # The same pixels as the training run's test split: the same numbers.
    assert scored["auroc"]["value"] == pytest.approx(trained_run.metrics["test"]["auroc"]["value"], abs=1e-6)
    assert scored["sensitivity"]["value"] == trained_run.metrics["test"]["sensitivity"]["value"]
    # The README's older form, data.root=, means the same.
    same = evaluate(best, [f"data.root={site}", "data.class_map.ABNORMAL=PNEUMONIA", "train.bootstrap=0"])
    assert same["num_examples"] == 624 and same["auroc"]["value"] == scored["auroc"]["value"]


def test_evaluate_refuses_numbers_that_would_not_describe_the_checkpoint(trained_run):
    best = str(trained_run.run_dir / "best.pt")
    with pytest.raises(RwftError, match="data.image_size=64 differs from the checkpoint's data.image_size=32"):
        evaluate(best, ["data.image_size=64"])
    with pytest.raises(RwftError, match="model.backbone=resnet18 differs"):
        evaluate(best, ["model.backbone=resnet18"])


def test_checkpoints_and_metrics_name_the_classes(trained_run):
    best = load_checkpoint(trained_run.run_dir / "best.pt")
    assert best["class_names"] == ["NORMAL", "PNEUMONIA"] and best["positive_class"] == "PNEUMONIA"
    assert trained_run.metrics["classes"] == {"names": ["NORMAL", "PNEUMONIA"], "positive": "PNEUMONIA"}
    assert json.loads((trained_run.run_dir / "skipped.json").read_text()) == []
