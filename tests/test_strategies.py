"""The strategy plugins: every built-in runs a federated round, config keys reach the Flower
strategies, FedAdam/FedYogi average BatchNorm statistics, and a third-party strategy
registered by a plugin runs a round."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from federation_helpers import in_process_federation
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAdam, FedAvg, FedProx, Krum

from rwft.core.config import load_config, with_overrides
from rwft.core.hookspecs import hookimpl
from rwft.core.plugins import collect_registries, get_registries, make_plugin_manager
from rwft.federation.protocol import STATISTICS_KEY, WEIGHTS_KEY
from rwft.federation.server_optimisers import RwftFedAdam
from rwft.server.app import make_strategy

BUILT_IN = ("fedavg", "fedprox", "fedadam", "fedyogi", "fedmedian", "fedtrimmedavg", "krum")


def test_every_built_in_strategy_is_registered_by_the_strategies_plugin():
    strategies = get_registries().strategies
    assert set(BUILT_IN) <= set(strategies.names())
    for name in BUILT_IN:
        assert strategies.get(name).plugin == "rwft.plugins.strategies" and strategies.get(name).description


def test_config_keys_reach_the_flower_strategies():
    cfg = load_config(None, ["federation.min_sites=3", "federation.fraction=0.5", "federation.proximal_mu=0.3",
                             "federation.trimmed_beta=0.1", "federation.krum_byzantine=1",
                             "federation.server_lr=0.004", "federation.strategy=fedprox"])
    fedprox = make_strategy(cfg)
    assert isinstance(fedprox, FedProx) and fedprox.proximal_mu == 0.3
    assert (fedprox.fraction_train, fedprox.min_train_nodes, fedprox.min_available_nodes) == (0.5, 2, 3)
    assert fedprox.fraction_evaluate == 1.0 and fedprox.min_evaluate_nodes == 3
    assert make_strategy(with_overrides(cfg, ["federation.strategy=fedtrimmedavg"])).beta == 0.1
    krum = make_strategy(with_overrides(cfg, ["federation.strategy=krum"]))
    assert isinstance(krum, Krum) and krum.num_malicious_nodes == 1
    fedadam = make_strategy(with_overrides(cfg, ["federation.strategy=fedadam"]))
    assert isinstance(fedadam, FedAdam) and fedadam.eta == 0.004


@pytest.mark.timeout(120)
@pytest.mark.parametrize("strategy", BUILT_IN)
def test_each_built_in_strategy_runs_a_round(strategy, tmp_path, pneumoniamnist_npz):
    grid, _, _ = in_process_federation(tmp_path, pneumoniamnist_npz, [f"federation.strategy={strategy}",
                                                                      "federation.rounds=1",
                                                                      "federation.server_eval=false"])
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert [r["round"] for r in metrics["rounds"]] == [0, 1]
    final = metrics["rounds"][1]
    assert set(final["sites"]) == {"site-0", "site-1"}
    # The aggregated model is usable: every site scored it with a finite loss.
    assert all(math.isfinite(site["global_val"]["loss"]) for site in final["sites"].values())
    if strategy == "fedprox":  # mu reached the sites in the round's config (the client hands it to fit)
        sent = [m.content["config"] for m in grid.instructions if m.metadata.message_type == "train"]
        assert sent and all(config["proximal-mu"] == 0.01 for config in sent)


def _reply(weights: np.ndarray, statistics: np.ndarray, examples: int) -> Message:
    """A train reply as a site sends it (without the transport around it)."""
    content = RecordDict({"arrays": ArrayRecord({WEIGHTS_KEY: Array(weights), STATISTICS_KEY: Array(statistics)}),
                          "metrics": MetricRecord({"num-examples": examples})})
    instruction = Message(RecordDict({"config": ConfigRecord()}), dst_node_id=examples, message_type="train")
    instruction.metadata.__dict__["_message_id"] = instruction.object_id
    return Message(content, reply_to=instruction)


def test_server_optimisers_average_batchnorm_statistics_instead_of_stepping_them():
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    strategy = RwftFedAdam(eta=0.1, min_train_nodes=2, min_available_nodes=2)
    start = ArrayRecord({WEIGHTS_KEY: Array(np.zeros(4, np.float32)),
                         STATISTICS_KEY: Array(np.full(3, 1e-4, np.float32))})
    strategy.current_arrays = {key: array.numpy() for key, array in start.items()}  # what configure_train sets
    replies = [_reply(np.full(4, 0.001, np.float32), np.full(3, 2e-4, np.float32), 10),
               _reply(np.full(4, 0.003, np.float32), np.full(3, 4e-4, np.float32), 30)]
    arrays, _ = strategy.aggregate_train(1, replies)
    assert arrays is not None
    np.testing.assert_allclose(arrays[STATISTICS_KEY].numpy(), 3.5e-4, rtol=1e-5)  # the weighted mean
    # The weights took Adam's step, several times the mean update: what pushes a variance below zero.
    assert (arrays[WEIGHTS_KEY].numpy() > 5 * 0.0025).all()
    assert arrays[WEIGHTS_KEY].numpy().dtype == np.float32  # Flower's float64 would double every message


class HalfwayStrategies:
    """A third-party plugin: FedAvg that moves the global model only half way to the sites' mean."""

    calls: list[int] = []

    @staticmethod
    @hookimpl
    def register_strategies(register):
        class Halfway(FedAvg):
            def configure_train(self, server_round, arrays, config, grid):
                self.before = {key: array.numpy().copy() for key, array in arrays.items()}
                return super().configure_train(server_round, arrays, config, grid)

            def aggregate_train(self, server_round, replies):
                HalfwayStrategies.calls.append(server_round)
                mean, metrics = super().aggregate_train(server_round, replies)
                return ArrayRecord({key: Array((self.before[key] + mean[key].numpy()) / 2)
                                    for key in mean.keys()}), metrics

        register("halfway", lambda config, **common: Halfway(**common), "FedAvg, half a step")


@pytest.mark.timeout(120)
def test_a_strategy_from_a_plugin_runs_a_round(tmp_path, pneumoniamnist_npz):
    registries = collect_registries(make_plugin_manager(extra_plugins=(HalfwayStrategies,)))
    assert registries.strategies.get("halfway").plugin != "rwft.plugins.strategies"
    in_process_federation(tmp_path, pneumoniamnist_npz, ["federation.strategy=halfway", "federation.rounds=1",
                                                         "federation.server_eval=false"], registries=registries)
    assert HalfwayStrategies.calls == [1]
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["complete"] and len(metrics["rounds"][1]["sites"]) == 2
