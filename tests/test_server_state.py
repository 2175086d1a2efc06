"""The federation's record on disk: commits are atomic, strategy state survives, run
directories are never overwritten by accident."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.serverapp.strategy import FedAdam, FedAvg

from rwft.core.errors import RwftError
from rwft.server.state import (
    FederationState,
    commit,
    create_federation,
    federation_id,
    load_state,
    restore_strategy,
    strategy_state,
)


def _state(server_round: int) -> FederationState:
    return FederationState(server_round, {"weights": np.full(5, server_round, np.float32)},
                           {"m_t": {"weights": np.ones(5)}}, [{"round": r} for r in range(server_round + 1)])


def test_commit_and_load_round_trip(tmp_path):
    assert load_state(tmp_path) is None
    commit(tmp_path, _state(2), {"model": {}, "config": {}})
    loaded = load_state(tmp_path)
    assert loaded.round == 2 and [h["round"] for h in loaded.history] == [0, 1, 2]
    np.testing.assert_array_equal(loaded.array_record()["weights"].numpy(), np.full(5, 2, np.float32))
    assert (tmp_path / "model.pt").is_file() and (tmp_path / "metrics.json").is_file()


def test_a_crash_while_committing_leaves_the_previous_round_intact(tmp_path, monkeypatch):
    commit(tmp_path, _state(1), {"model": {}, "config": {}})
    real_save = torch.save

    def crash_on_state(payload, handle):
        if "history" in payload:
            handle.write(b"half a checkpoint")
            raise KeyboardInterrupt  # the process dies here
        real_save(payload, handle)

    monkeypatch.setattr(torch, "save", crash_on_state)
    with pytest.raises(KeyboardInterrupt):
        commit(tmp_path, _state(2), {"model": {}, "config": {}})
    monkeypatch.setattr(torch, "save", real_save)
    assert load_state(tmp_path).round == 1  # round 2 is run again on resume, never half-counted
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".state.pt")]  # no temp file left


def test_fedadam_moments_are_saved_and_restored_configuration_is_not():
    strategy = FedAdam()
    strategy.m_t = {"weights": np.arange(3.0)}
    strategy.v_t = {"weights": np.arange(3.0) ** 2}
    saved = strategy_state(strategy)
    assert set(saved) >= {"m_t", "v_t"} and "eta" not in saved
    fresh = FedAdam()
    restore_strategy(fresh, saved)
    np.testing.assert_array_equal(fresh.v_t["weights"], [0.0, 1.0, 4.0])
    assert strategy_state(FedAvg()) == {}


def test_learned_numbers_and_wrapped_strategies_survive_resume():
    """Non-array state: FedDyn's site count, Flower's adaptive DP clipping norm and the FedAdam it wraps."""
    from flwr.serverapp.strategy import DifferentialPrivacyServerSideAdaptiveClipping

    from rwft.core.config import load_config
    from rwft.server.app import make_strategy

    cfg = load_config(None, ["federation.strategy=feddyn"])
    feddyn = make_strategy(cfg)
    feddyn.num_sites, feddyn.h = 3, {"weights": np.ones(4, np.float32)}
    feddyn._sent = np.zeros(4)  # working memory of a round: not state
    saved = strategy_state(feddyn)
    assert set(saved) == {"num_sites", "h"}
    fresh = make_strategy(cfg)
    restore_strategy(fresh, saved)
    assert fresh.num_sites == 3 and fresh.h["weights"].sum() == 4

    def dp() -> DifferentialPrivacyServerSideAdaptiveClipping:
        return DifferentialPrivacyServerSideAdaptiveClipping(FedAdam(), noise_multiplier=0.1,
                                                              num_sampled_clients=2, initial_clipping_norm=0.1)

    wrapper = dp()
    wrapper.clipping_norm = 0.37  # adapted over some rounds
    wrapper.strategy.m_t = {"weights": np.arange(3.0)}
    resumed = dp()
    restore_strategy(resumed, strategy_state(wrapper))
    assert resumed.clipping_norm == 0.37 and "noise_multiplier" not in strategy_state(wrapper)
    np.testing.assert_array_equal(resumed.strategy.m_t["weights"], [0.0, 1.0, 2.0])


def test_a_run_directory_holds_one_federation(tmp_path):
    first = create_federation(tmp_path)
    assert create_federation(tmp_path) == first == federation_id(tmp_path)  # nothing completed yet: reuse
    commit(tmp_path, _state(0), {"model": {}, "config": {}})
    with pytest.raises(RwftError, match="--resume"):
        create_federation(tmp_path)
    with pytest.raises(RwftError, match="holds no federation"):
        federation_id(tmp_path / "elsewhere")
