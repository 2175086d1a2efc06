import numpy as np
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from rwft.core.tblog import RunLogger


def _load(path):
    accumulator = EventAccumulator(str(path), size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    accumulator.Reload()
    return accumulator


def test_scalars_curves_and_hparams_are_readable_by_tensorboard(tmp_path):
    labels = np.array([0, 0, 1, 1, 1, 0])
    probs = np.array([0.2, 0.4, 0.7, 0.9, 0.3, 0.1])
    with RunLogger(tmp_path) as logger:
        logger.scalars({"auroc": 0.8, "loss": 0.5, "name": "skipped", "nan": float("nan")}, step=1, prefix="val")
        logger.scalars({"auroc": 0.9}, step=2, prefix="val")
        logger.curves("test", labels, probs, threshold=0.5, step=2)
        logger.hparams({"model": {"backbone": "efficientnet_lite0", "weights": None}, "seed": 1}, {"test/auroc": 0.9})

    events = _load(tmp_path)
    tags = events.Tags()
    assert [s.value for s in events.Scalars("val/auroc")] == [0.800000011920929, 0.8999999761581421]
    assert "val/nan" not in tags["scalars"] and "val/name" not in tags["scalars"]
    assert {"test/roc_curve", "test/confusion_matrix"} <= set(tags["images"])
    assert "test/pr_curve" in tags["tensors"]
    hparams = _load(tmp_path / "hparams")
    assert {"_hparams_/experiment", "_hparams_/session_start_info"} <= set(hparams.PluginTagToContent("hparams"))
    assert [s.value for s in hparams.Scalars("hparam/test/auroc")] == [0.8999999761581421]


def test_a_resumed_run_replaces_the_steps_the_crashed_one_logged(tmp_path):
    crashed = RunLogger(tmp_path / "tb")
    for step in range(1, 11):  # checkpointed after step 6, crashed after step 10
        crashed.scalar("train/loss", 1.0, step)
    crashed.close()
    with RunLogger(tmp_path / "tb", purge_step=7) as resumed:
        for step in range(7, 13):
            resumed.scalar("train/loss", 0.5, step)
    events = EventAccumulator(str(tmp_path / "tb"), size_guidance={"scalars": 0})
    events.Reload()
    points = [(e.step, e.value) for e in events.Scalars("train/loss")]
    assert points == [(step, 1.0) for step in range(1, 7)] + [(step, 0.5) for step in range(7, 13)]
