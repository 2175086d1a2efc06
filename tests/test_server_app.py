"""The ServerApp's federation, in one process: what it writes after each round, how it resumes,
and that its model is an ordinary rwft checkpoint."""

from __future__ import annotations

import json

import numpy as np
import pytest
from federation_helpers import TINY, in_process_federation
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from rwft.clients.app import app as client_app
from rwft.core.config import load_config
from rwft.core.errors import RwftError
from rwft.core.run import evaluate
from rwft.federation.inprocess import InProcessGrid
from rwft.server.app import run_federation
from rwft.server.launch import prepare_federation
from rwft.server.state import load_state


@pytest.fixture(scope="module")
def finished(tmp_path_factory, pneumoniamnist_npz):
    tmp = tmp_path_factory.mktemp("server-app")
    in_process_federation(tmp, pneumoniamnist_npz, ["federation.rounds=2"])
    return tmp / "run"


@pytest.mark.timeout(300)
def test_every_round_is_committed_with_the_sites_scores_of_its_model(finished):
    metrics = json.loads((finished / "metrics.json").read_text())
    assert metrics["complete"] and [r["round"] for r in metrics["rounds"]] == [0, 1, 2]
    for record in metrics["rounds"]:  # round 0 included: the sites scored the starting model too
        assert set(record["global"]) == {"auroc", "accuracy", "sensitivity", "specificity", "loss"}
        assert {name: set(site["global_val"]) >= {"auroc", "loss"} for name, site in record["sites"].items()} \
            == {"site-0": True, "site-1": True}
        assert set(record["global_val"]) >= {"auroc", "accuracy"}
    assert metrics["final"]["test"]["num_examples"] == 624  # PneumoniaMNIST's official test split
    assert load_state(finished).round == 2


def test_the_central_tensorboard_log_reads_back(finished):
    events = EventAccumulator(str(finished / "tb"), size_guidance={"scalars": 0, "tensors": 0})
    events.Reload()
    scalars = set(events.Tags()["scalars"])
    assert {"global/auroc", "federation/participating_sites", "federation/global_val/auroc",
            "site/site-0/global_val/auroc", "site/site-1/update_l2", "site/site-0/train/loss", "test/auroc"} <= scalars
    assert [e.step for e in events.Scalars("site/site-0/global_val/auroc")] == [0, 1, 2]
    assert all(e.value > 0 for e in events.Scalars("site/site-1/update_l2"))


def test_the_central_tensorboard_shows_each_quantity_once_correctly_weighted(finished):
    """A site's score of the global model is one curve per site and one federation curve, averaged
    by validation images; the training numbers are averaged by training images."""
    events = EventAccumulator(str(finished / "tb"), size_guidance={"scalars": 0})
    events.Reload()
    scalars = set(events.Tags()["scalars"])
    # Each quantity under one tag: no score averaged into the training aggregate, no old names.
    assert not [tag for tag in scalars if tag.startswith("federation/train/") and
                tag.removeprefix("federation/train/") not in ("loss", "steps", "num-examples")], sorted(scalars)
    assert not [tag for tag in scalars if any(old in tag for old in ("received", "/val/", "evaluate", "val-"))]
    metrics = json.loads((finished / "metrics.json").read_text())
    for record in metrics["rounds"][1:]:
        step, sites = record["round"], record["sites"]
        shown = {e.step: e.value for e in events.Scalars("federation/global_val/loss")}
        val_images = {name: site["val-num-examples"] for name, site in sites.items()}
        expected = sum(site["global_val"]["loss"] * val_images[name] for name, site in sites.items()) \
            / sum(val_images.values())
        assert shown[step] == pytest.approx(expected, rel=1e-5)
        train_images = {name: site["train"]["num-examples"] for name, site in sites.items()}
        expected_loss = sum(site["train"]["loss"] * train_images[name] for name, site in sites.items()) \
            / sum(train_images.values())
        assert {e.step: e.value for e in events.Scalars("federation/train/loss")}[step] == \
            pytest.approx(expected_loss, rel=1e-5)
    assert metrics["complete"]


def test_the_global_model_is_an_rwft_checkpoint(finished):
    report = evaluate(str(finished / "model.pt"), [], split="test")
    assert report["num_examples"] == 624 and 0.0 <= report["auroc"]["value"] <= 1.0


@pytest.mark.timeout(300)
def test_a_resumed_federation_continues_after_its_last_round(tmp_path, pneumoniamnist_npz):
    base = [*TINY, "data.max_train_images=300", "train.max_steps_per_epoch=2", f"data.root={pneumoniamnist_npz}",
            f"output_dir={tmp_path / 'run'}", "federation.strategy=fedadam", "federation.server_lr=0.001",
            "federation.server_eval=false"]
    nodes = {10 + i: {"partition-id": i, "num-partitions": 2} for i in range(2)}
    _, run_config = prepare_federation(load_config(None, [*base, "federation.rounds=1"]), resume=False)
    run_federation(InProcessGrid(client_app, nodes, run_config), run_config)
    after_one = load_state(tmp_path / "run")

    with pytest.raises(RwftError, match="already holds a federation"):
        run_federation(InProcessGrid(client_app, nodes, run_config), run_config)

    _, resumed = prepare_federation(load_config(None, [*base, "federation.rounds=3"]), resume=True)
    grid = InProcessGrid(client_app, nodes, resumed)
    run_federation(grid, resumed)
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert [r["round"] for r in metrics["rounds"]] == [0, 1, 2, 3]
    assert metrics["rounds"][1]["finished_at"] == after_one.history[1]["finished_at"]  # not run again
    assert {m.content["config"]["server-round"] for m in grid.instructions if m.metadata.message_type == "train"} \
        == {2, 3}
    # Round 2 started from round 1's committed global weights.
    sent = next(m for m in grid.instructions if m.metadata.message_type == "train")
    np.testing.assert_array_equal(sent.content["arrays"]["weights"].numpy(), after_one.arrays["weights"])


def test_building_a_federation_has_no_side_effects(tmp_path, pneumoniamnist_npz):
    import torch

    from rwft.server.app import Federation, make_strategy

    cfg = load_config(None, [*TINY, f"data.root={pneumoniamnist_npz}", f"output_dir={tmp_path / 'run'}"])
    rng = torch.random.get_rng_state()
    federation = Federation(cfg, 2, make_strategy(cfg))
    assert not (tmp_path / "run").exists()  # no TensorBoard writer, no file
    assert torch.equal(torch.random.get_rng_state(), rng)  # no global seeding
    assert federation.holdout is None  # no data loaded
    with federation.open():
        assert (tmp_path / "run" / "tb").is_dir() and federation.holdout is not None
