"""Differential privacy on real PneumoniaMNIST: DP-SGD noise really changes what is trained, the
epsilon each site reports grows with the rounds and equals Opacus' accountant run by hand, a
resumed federation keeps counting, a spent budget stops training, and user-level DP at the
server noises only the shared weights and logs its epsilon."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from federation_helpers import in_process_federation
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from rwft.core.config import load_config, with_overrides
from rwft.core.data import load_splits
from rwft.core.engine import fit
from rwft.core.errors import ConfigError
from rwft.core.model import build_model
from rwft.core.privacy import PrivacyBudgetExhausted, epsilon_after
from rwft.federation.privacy import server_epsilon
from rwft.federation.protocol import STATISTICS_KEY, WEIGHTS_KEY
from rwft.server.app import make_strategy
from rwft.server.state import federation_id, load_state

SMALL = ["data.image_size=28", "train.batch_size=32", "train.max_steps_per_epoch=3", "data.max_train_images=300",
         "train.device=cpu", "model.dropout=0", "train.bootstrap=20"]
DP = ["model.batchnorm=frozen", "federation.dp.enabled=true", "federation.dp.noise_multiplier=1.0",
      "federation.dp.accountant=rdp"]


def _central(npz, *extra):
    return load_config(None, [*SMALL, f"data.root={npz}", *extra])


def _trained_weights(cfg, splits, torch_seed: int) -> torch.Tensor:
    torch.manual_seed(0)
    model = build_model(cfg.model, 2)
    torch.manual_seed(torch_seed)  # only DP's noise draws from torch's global generator (dropout is 0)
    fit(model, splits, cfg, epochs=1)
    return torch.cat([p.detach().flatten() for p in model.parameters()])


@pytest.mark.timeout(600)
def test_dp_noise_really_changes_the_update(pneumoniamnist_npz):
    plain = _central(pneumoniamnist_npz, "model.batchnorm=frozen", "train.max_steps_per_epoch=2")
    splits = load_splits(plain)
    torch.manual_seed(0)
    start = torch.cat([p.detach().flatten() for p in build_model(plain.model, 2).parameters()])
    same = [_trained_weights(plain, splits, seed) for seed in (1, 2)]
    update = (same[0] - start).norm()
    assert (same[0] - same[1]).norm() < 1e-3 * update  # without DP the torch seed changes nothing
    private = with_overrides(plain, ["train.dp.enabled=true", "train.dp.noise_multiplier=1.0"])
    noisy = [_trained_weights(private, splits, seed) for seed in (1, 2)]
    assert (noisy[0] - noisy[1]).norm() > 0.1 * update  # the noise, drawn anew, moves the weights


def test_dp_needs_frozen_batchnorm_and_a_noise_or_budget(pneumoniamnist_npz):
    splits = load_splits(_central(pneumoniamnist_npz))
    with pytest.raises(ConfigError, match="model.batchnorm=frozen"):
        cfg = _central(pneumoniamnist_npz, "train.dp.enabled=true", "train.dp.noise_multiplier=1")
        fit(build_model(cfg.model, 2), splits, cfg, epochs=1)
    with pytest.raises(ConfigError, match="noise_multiplier .* or train.dp.target_epsilon"):
        cfg = _central(pneumoniamnist_npz, "train.dp.enabled=true", "model.batchnorm=frozen")
        fit(build_model(cfg.model, 2), splits, cfg, epochs=1)


@pytest.mark.timeout(600)
def test_a_spent_budget_stops_training(pneumoniamnist_npz):
    cfg = _central(pneumoniamnist_npz, "model.batchnorm=frozen", "train.dp.enabled=true", "train.dp.target_epsilon=2",
                   "train.dp.accountant=rdp")
    splits = load_splits(cfg)
    model = build_model(cfg.model, 2)
    first = fit(model, splits, cfg, epochs=2)  # the noise is chosen so that the 2 planned epochs spend the budget
    assert 1.5 < first.privacy["epsilon"] <= 2.0 * 1.001
    with pytest.raises(PrivacyBudgetExhausted, match="privacy budget exhausted"):
        fit(model, splits, cfg, epochs=1, privacy_state=first.privacy)
    assert not any(module._forward_hooks for module in model.modules())  # Opacus' hooks are gone


def _site_epsilons(run_dir, site):
    metrics = json.loads((run_dir / "metrics.json").read_text())
    return [record["sites"][site]["train"]["dp-epsilon"] for record in metrics["rounds"][1:]]


def _by_hand(run_dir, site, rounds):
    """Opacus' accountant run by hand from what the site used: its noise, its sample rate, 3 steps a round."""
    state = torch.load(run_dir / "sites" / site / "privacy" / f"{federation_id(run_dir)}.pt", weights_only=True)
    cfg = load_config(None, ["federation.dp.accountant=rdp"]).federation.dp
    return [epsilon_after(cfg, noise_multiplier=state["noise_multiplier"], sample_rate=state["sample_rate"],
                          steps=3 * r, delta=state["delta"]) for r in range(1, rounds + 1)]


@pytest.mark.timeout(900)
def test_epsilon_per_site_grows_matches_the_accountant_and_survives_resume(tmp_path, pneumoniamnist_npz):
    from rwft.clients.app import app as client_app
    from rwft.federation.inprocess import InProcessGrid
    from rwft.server.app import run_federation
    from rwft.server.launch import prepare_federation

    base = [*SMALL, f"data.root={pneumoniamnist_npz}", f"output_dir={tmp_path / 'run'}", *DP,
            "federation.server_eval=false"]
    nodes = {10 + i: {"partition-id": i, "num-partitions": 2} for i in range(2)}
    _, run_config = prepare_federation(load_config(None, [*base, "federation.rounds=2"]), resume=False)
    run_federation(InProcessGrid(client_app, nodes, run_config), run_config)
    run_dir = tmp_path / "run"
    two = _site_epsilons(run_dir, "site-0")
    assert two[0] < two[1]
    np.testing.assert_allclose(two, _by_hand(run_dir, "site-0", 2), rtol=1e-6)

    # A resumed federation (a new Flower run, new ClientApp contexts) keeps counting from round 2.
    _, resumed = prepare_federation(load_config(None, [*base, "federation.rounds=3"]), resume=True)
    run_federation(InProcessGrid(client_app, nodes, resumed), resumed)
    three = _site_epsilons(run_dir, "site-0")
    assert three[:2] == two and three[2] > two[1]
    np.testing.assert_allclose(three, _by_hand(run_dir, "site-0", 3), rtol=1e-6)

    central = EventAccumulator(str(run_dir / "tb"), size_guidance={"scalars": 0})
    central.Reload()
    assert [round(e.value, 6) for e in central.Scalars("site/site-1/train/dp-epsilon")] == \
        [round(v, 6) for v in _site_epsilons(run_dir, "site-1")]
    site_log = EventAccumulator(str(run_dir / "sites" / "site-0" / "tb"), size_guidance={"scalars": 0})
    site_log.Reload()
    assert [e.step for e in site_log.Scalars("privacy/epsilon")] == [1, 2, 3]


def test_server_dp_needs_statistics_that_carry_no_site_data():
    with pytest.raises(ConfigError, match="local_bn=true .* or model.batchnorm=frozen"):
        make_strategy(load_config(None, ["federation.strategy=dp-fedavg"]))


@pytest.mark.timeout(900)
def test_server_dp_noises_only_the_weights_and_logs_its_epsilon(tmp_path, pneumoniamnist_npz):
    grid, cfg, _ = in_process_federation(tmp_path, pneumoniamnist_npz, [
        "federation.strategy=dp-fedavg", "model.batchnorm=frozen", "federation.rounds=2",
        "federation.server_dp.noise_multiplier=0.5", "federation.server_dp.clipping_norm=0.5",
        "federation.server_eval=false"], sites=3)
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    epsilons = [record["train"]["dp-server-epsilon"] for record in metrics["rounds"][1:]]
    assert epsilons == pytest.approx([server_epsilon(0.5, r, 1e-5) for r in (1, 2)]) and epsilons[0] < epsilons[1]
    sent = [m.content["arrays"] for m in grid.instructions if m.metadata.message_type == "train"]
    round1, round2 = sent[0], sent[-1]
    # Frozen BatchNorm: the statistics the sites return are the ImageNet ones, and no noise touched them.
    np.testing.assert_array_equal(round2[STATISTICS_KEY].numpy(), round1[STATISTICS_KEY].numpy())
    # The weights moved by far more than the clipped mean allows: the noise (std 0.5 * 0.5 / 3 per weight).
    moved = np.linalg.norm(round2[WEIGHTS_KEY].numpy() - round1[WEIGHTS_KEY].numpy())
    assert moved > 10 * 0.5
    state = load_state(tmp_path / "run")
    assert np.isfinite(state.arrays[WEIGHTS_KEY]).all()
