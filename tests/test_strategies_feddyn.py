"""FedDyn, the strategy plugin with a site half (``rwft.plugins.strategies_feddyn``), on real
PneumoniaMNIST sites in one process: it trains, each site's correction g_i and the server's
h carry from round to round, across a resumed federation too, and the model it makes is sane."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from federation_helpers import TINY

from rwft.clients.app import app as client_app
from rwft.clients.site import STRATEGY_STATE_KEY
from rwft.core.config import load_config
from rwft.core.model import build_model
from rwft.core.plugins import get_registries
from rwft.core.site_algorithm import StrategyPlugin
from rwft.federation.inprocess import InProcessGrid
from rwft.federation.protocol import WEIGHTS_KEY, layout
from rwft.server.app import run_federation
from rwft.server.launch import prepare_federation
from rwft.server.state import load_state

ALPHA = 0.01


def _run(tmp_path, npz, rounds: int, resume: bool) -> InProcessGrid:
    cfg = load_config(None, [*TINY, "data.max_train_images=600", "train.max_steps_per_epoch=4",
                             f"data.root={npz}", f"output_dir={tmp_path / 'run'}", "federation.strategy=feddyn",
                             f"federation.feddyn_alpha={ALPHA}", f"federation.rounds={rounds}",
                             "federation.server_eval=false"])
    _, run_config = prepare_federation(cfg, resume=resume)
    grid = InProcessGrid(client_app, {10 + i: {"partition-id": i, "num-partitions": 2} for i in range(2)}, run_config)
    run_federation(grid, run_config)
    return grid


def _weights_of(flat: np.ndarray, cfg_model, name: str) -> np.ndarray:
    """Parameter ``name``'s values inside a flat ``weights`` vector (``rwft.federation.protocol.layout``)."""
    model = build_model(cfg_model, 2)
    offset = 0
    for key in layout(model, local_bn=False)[WEIGHTS_KEY]:
        size = model.state_dict()[key].numel()
        if key == name:
            return flat[offset:offset + size]
        offset += size
    raise KeyError(name)


def test_feddyn_is_a_strategy_with_a_site_half():
    registration = get_registries().strategies.get("feddyn")
    assert isinstance(registration.factory, StrategyPlugin)
    assert registration.plugin == "rwft.plugins.strategies_feddyn"


@pytest.mark.timeout(900)
def test_feddyn_keeps_its_state_across_rounds_and_a_resumed_federation(tmp_path, pneumoniamnist_npz):
    first = _run(tmp_path, pneumoniamnist_npz, rounds=1, resume=False)
    after_one = load_state(tmp_path / "run")
    assert after_one.strategy["num_sites"] == 2  # a learned number, not an array, saved with the round
    h1 = after_one.strategy["h"][WEIGHTS_KEY]
    assert np.abs(h1).max() > 0
    sent = [m for m in first.instructions if m.metadata.message_type == "train"]
    assert {m.content["config"]["feddyn-alpha"] for m in sent} == {ALPHA}  # alpha reached the sites

    # Each site kept g_1 = -alpha·(w_site - w_global) in its node state and work directory.
    site_dir = tmp_path / "run" / "sites" / "site-0" / "strategy-state"
    g1 = torch.load(next(site_dir.glob("*.pt")), weights_only=True)
    in_node_state = first.contexts[10].state[STRATEGY_STATE_KEY].to_torch_state_dict()
    name = "head.weight" if "head.weight" in g1 else next(iter(g1))
    torch.testing.assert_close(in_node_state[name], g1[name])
    assert g1[name].abs().max() > 0

    # Resumed: a new Flower run, fresh node states. The sites find g_1 in their work
    # directories, the server its h and num_sites in state.pt.
    grid = _run(tmp_path, pneumoniamnist_npz, rounds=2, resume=True)
    g2 = torch.load(next(site_dir.glob("*.pt")), weights_only=True)
    cfg_model = load_config(None, []).model
    instruction = next(m for m in grid.instructions if m.metadata.message_type == "train" and m.metadata.dst_node_id == 10)
    reply = next(r for r in grid.replies if r.metadata.src_node_id == 10 and "arrays" in r.content)
    w_global = _weights_of(instruction.content["arrays"][WEIGHTS_KEY].numpy(), cfg_model, name)
    w_site = _weights_of(reply.content["arrays"][WEIGHTS_KEY].numpy(), cfg_model, name)
    # g_2 = g_1 - alpha·(w_site - w_global): had the site started again from zero, g_1 would be missing.
    np.testing.assert_allclose(g2[name].numpy().ravel(), g1[name].numpy().ravel() - ALPHA * (w_site - w_global),
                               rtol=1e-4, atol=1e-7)

    # The server went on with h_1: w_2 = mean(w_i) - h_2/alpha with h_2 = h_1 - alpha·(mean - w_1).
    after_two = load_state(tmp_path / "run")
    replies = [r for r in grid.replies if "arrays" in r.content]
    counts = np.array([r.content["metrics"]["num-examples"] for r in replies], dtype=np.float64)
    mean = sum(c * r.content["arrays"][WEIGHTS_KEY].numpy().astype(np.float64) for c, r in zip(counts, replies)) \
        / counts.sum()
    w1 = after_one.arrays[WEIGHTS_KEY].astype(np.float64)
    expected = mean - (h1.astype(np.float64) - ALPHA * (mean - w1)) / ALPHA
    np.testing.assert_allclose(after_two.arrays[WEIGHTS_KEY], expected, rtol=1e-3, atol=1e-4)

    # And the model it made is sane on the sites' validation splits.
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["complete"] and [r["round"] for r in metrics["rounds"]] == [0, 1, 2]
    assert metrics["rounds"][-1]["global_val"]["auroc"] > 0.7, metrics["rounds"][-1]["global_val"]
