"""The ClientApp and its sites: where a site's data comes from, what it keeps between rounds
(FedBN), that nothing else carries over, and that FedProx's mu reaches the engine."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from federation_helpers import TINY, make_site_files
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.supercore.task_identity import TaskIdentity

import rwft.clients.app as client_module
from rwft.clients.site import LOCAL_WEIGHTS_KEY, dataset_for_path, site_for
from rwft.core.config import load_config
from rwft.core.data import load_splits
from rwft.core.errors import ConfigError
from rwft.core.partition import partition_indices
from rwft.federation.protocol import (
    STATISTICS_KEY,
    WEIGHTS_KEY,
    check_site_label,
    local_keys,
    run_config_for,
    shared_arrays,
)


@pytest.fixture
def run_config(tmp_path, pneumoniamnist_npz):
    def make(*overrides: str) -> dict:
        cfg = load_config(None, [*TINY, "data.max_train_images=300", "train.max_steps_per_epoch=2",
                                 f"data.root={pneumoniamnist_npz}", f"output_dir={tmp_path / 'run'}", *overrides])
        return run_config_for(cfg, num_classes=2, federation_id="fed1", resume=False)
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    return make


def _message(arrays, message_type: str = "train", **config) -> Message:
    message = Message(RecordDict({"arrays": arrays, "config": ConfigRecord({"server-round": 1, **config})}),
                      dst_node_id=3, message_type=message_type)
    message.metadata.__dict__["_message_id"] = message.object_id
    return message


def test_site_labels_are_pseudonyms_never_paths():
    assert check_site_label("hospital-A_2.b") == "hospital-A_2.b"
    for bad in ("/data/site", "../x", "St Mary's", "", "a" * 33, "-lead"):
        with pytest.raises(ConfigError, match="pseudonym"):
            check_site_label(bad)
    assert dataset_for_path("/x/site.npz") == "medmnist" and dataset_for_path("/x/site") == "chest_xray"


def test_simulated_sites_split_the_train_split_and_carve_their_own_validation(run_config, pneumoniamnist_npz):
    rc = run_config("federation.partition=dirichlet:0.5")
    sites = [site_for(Context(1, 9, {"partition-id": i, "num-partitions": 3}, RecordDict(), rc)) for i in range(3)]
    assert [s.label for s in sites] == ["site-0", "site-1", "site-2"]
    sizes = [len(s.splits.train) + len(s.splits.val) for s in sites]
    labels = np.concatenate([np.concatenate([s.splits.train.labels, s.splits.val.labels]) for s in sites])
    assert sum(sizes) == 300  # every sampled training image at exactly one site
    whole = load_splits(sites[0].cfg)
    assert np.bincount(labels).tolist() == np.bincount(whole.train.labels).tolist()
    expected = [len(part) for part in partition_indices(whole.train.labels, 3, "dirichlet:0.5", sites[0].cfg.seed)]
    assert sizes == expected
    for site in sites:
        assert len(site.splits.test) == 0 and 0 < len(site.splits.val) < len(site.splits.train)


def test_a_deployed_site_reads_its_own_data_not_the_servers(tmp_path, run_config, pneumoniamnist_npz):
    site_file = make_site_files(pneumoniamnist_npz, 2, tmp_path / "data")[1]
    site = site_for(Context(1, 9, {"site": "hospitalB", "data-dir": str(site_file), "work-dir": str(tmp_path / "b")},
                            RecordDict(), run_config()))
    assert site.label == "hospitalB" and site.cfg.data.root == str(site_file)
    assert site.cfg.data.dataset == "medmnist" and site.work_dir == tmp_path / "b"
    assert len(site.splits.train) == 300  # the run's data.max_train_images, drawn from this site's own file
    assert site.splits.source == str(site_file)


def test_nothing_carries_over_between_rounds_without_fedbn(run_config):
    rc = run_config()
    context = Context(1, 9, {"partition-id": 0, "num-partitions": 2}, RecordDict(), rc)
    site = site_for(context)
    arrays = shared_arrays(site.model, local_bn=False)
    client_module.app(_message(arrays), context)
    trained_stats = site.model.state_dict()["backbone.bn1.running_mean"].clone()
    model = site.model_for_round(context, arrays)
    assert not torch.equal(model.state_dict()["backbone.bn1.running_mean"], trained_stats)
    for name, value in site.initial_state.items():
        if name.endswith("num_batches_tracked"):
            assert torch.equal(model.state_dict()[name], value)
    assert LOCAL_WEIGHTS_KEY not in context.state


def test_fedbn_keeps_batchnorm_layers_at_the_site_across_rounds_and_resumed_runs(run_config):
    rc = run_config("federation.local_bn=true")
    context = Context(1, 9, {"partition-id": 0, "num-partitions": 2}, RecordDict(), rc)
    site = site_for(context)
    arrays = shared_arrays(site.model, local_bn=True)
    assert set(arrays.keys()) == {WEIGHTS_KEY}  # no STATISTICS_KEY: BatchNorm stays home
    reply = client_module.app(_message(arrays), context)
    assert set(reply.content["arrays"].keys()) == {WEIGHTS_KEY}
    kept = context.state[LOCAL_WEIGHTS_KEY].to_torch_state_dict()
    assert set(kept) == set(local_keys(site.model, local_bn=True))
    assert not torch.equal(kept["backbone.bn1.running_var"], site.initial_state["backbone.bn1.running_var"])
    # Next round: the server's weights replace the shared part, the site's BatchNorm stays its own.
    model = site.model_for_round(context, arrays)
    assert torch.equal(model.state_dict()["backbone.bn1.running_var"], kept["backbone.bn1.running_var"])
    # A resumed federation is a new Flower run (empty node state): the site's own copy is found.
    fresh = Context(2, 9, {"partition-id": 0, "num-partitions": 2}, RecordDict(), rc)
    model = site.model_for_round(fresh, arrays)
    assert torch.equal(model.state_dict()["backbone.bn1.running_var"], kept["backbone.bn1.running_var"])
    assert (site.work_dir / "local-weights" / "fed1.pt").is_file()


def test_fedprox_site_half_adds_the_proximal_term_with_the_mu_the_server_sent(run_config, monkeypatch):
    seen = {}
    real_fit = client_module.fit

    def spy(*args, **kwargs):
        seen.update(kwargs)
        seen["terms"] = [float(term().detach()) for term in kwargs["loss_terms"]]  # at the received weights: zero
        return real_fit(*args, **kwargs)

    monkeypatch.setattr(client_module, "fit", spy)
    context = Context(1, 9, {"partition-id": 1, "num-partitions": 2}, RecordDict(),
                      run_config("federation.strategy=fedprox"))
    arrays = shared_arrays(site_for(context).model, local_bn=False)
    reply = client_module.app(_message(arrays, **{"proximal-mu": 0.25}), context)
    assert seen["epochs"] == 1 and seen["terms"] == [0.0]
    term = seen["loss_terms"][0]
    assert term.__self__.mu == 0.25 and float(term().detach()) > 0  # trained away from the anchor: the term pulls back
    metrics = reply.content["metrics"]
    assert {"num-examples", "val-num-examples", "train/loss", "train/steps", "local_val/auroc",
            "global_val/auroc", "global_val/loss"} <= set(metrics)
    assert not [key for key in metrics if key.startswith(("received-", "val-auroc"))]  # the old names are gone
    assert STATISTICS_KEY in reply.content["arrays"]
    # FedAvg's sites train plainly, whatever the server sends.
    monkeypatch.setattr(client_module, "fit", spy)
    client_module.app(_message(arrays, **{"proximal-mu": 0.25}),
                      Context(1, 9, {"partition-id": 1, "num-partitions": 2}, RecordDict(), run_config()))
    assert seen["loss_terms"] == []


def test_evaluate_scores_the_global_model_on_the_sites_validation_split(run_config):
    context = Context(1, 9, {"partition-id": 0, "num-partitions": 2}, RecordDict(), run_config())
    site = site_for(context)
    reply = client_module.app(_message(shared_arrays(site.model, local_bn=False), "evaluate"), context)
    metrics = reply.content["metrics"]
    assert metrics["num-examples"] == metrics["val-num-examples"] == len(site.splits.val)
    assert 0.0 <= metrics["global_val/auroc"] <= 1.0
    assert "arrays" not in reply.content


def test_a_site_evicted_from_the_cache_closes_its_tensorboard_writer(run_config, monkeypatch):
    import rwft.clients.site as site_module

    monkeypatch.setattr(site_module, "CACHED_SITES", 1)
    rc = run_config()
    first = site_for(Context(1, 9, {"partition-id": 0, "num-partitions": 2}, RecordDict(), rc))
    writer = first.logger().writer
    assert writer.file_writer is not None
    site_for(Context(1, 9, {"partition-id": 1, "num-partitions": 2}, RecordDict(), rc))  # evicts the first
    assert writer.file_writer is None  # SummaryWriter.close() ran: its event file is flushed and closed
