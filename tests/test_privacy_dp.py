"""Differential privacy on real PneumoniaMNIST (28 px, a few steps): DP-SGD's noise really changes what
is trained, epsilon grows and equals Opacus' accountant run by hand, a resumed run or federation keeps
counting, a spent budget stops training (and the server says which site), LP-FT's optimiser switch
stays private, and user-level DP at the server noises only the shared weights and logs its epsilon."""

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
from rwft.core.errors import ConfigError, PrivacyBudgetExhausted
from rwft.core.model import build_model
from rwft.core.privacy import epsilon_after
from rwft.federation.privacy import server_epsilon
from rwft.federation.protocol import STATISTICS_KEY, WEIGHTS_KEY

SMALL = ["data.image_size=28", "train.batch_size=32", "train.max_steps_per_epoch=3", "data.max_train_images=300",
         "train.device=cpu", "model.dropout=0", "train.bootstrap=20"]
SITE_DP = ["model.batchnorm=frozen", "federation.dp.enabled=true", "federation.dp.noise_multiplier=1.0",
           "federation.dp.accountant=rdp"]


def _central(npz, *extra):
    return load_config(None, [*SMALL, f"data.root={npz}", *extra])


def _flat(model) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def _trained(cfg, splits, torch_seed: int, epochs: int = 1):
    torch.manual_seed(0)
    model = build_model(cfg.model, 2)
    torch.manual_seed(torch_seed)  # with dropout 0 only DP's noise draws from torch's global generator
    result = fit(model, splits, cfg, epochs=epochs)
    return model, result


@pytest.mark.timeout(900)
def test_dp_noise_really_changes_the_update(pneumoniamnist_npz):
    plain = _central(pneumoniamnist_npz, "model.batchnorm=frozen", "train.max_steps_per_epoch=2")
    splits = load_splits(plain)
    torch.manual_seed(0)
    start = _flat(build_model(plain.model, 2))
    same = [_flat(_trained(plain, splits, seed)[0]) for seed in (1, 2)]
    update = (same[0] - start).norm()
    assert update > 0 and (same[0] - same[1]).norm() < 1e-4 * update  # without DP the torch seed changes nothing
    private = with_overrides(plain, ["train.dp.enabled=true", "train.dp.noise_multiplier=1.0"])
    noisy = [_flat(_trained(private, splits, seed)[0]) for seed in (1, 2)]
    assert (noisy[0] - noisy[1]).norm() > 0.1 * update  # the noise, drawn anew, moves the weights
    assert (noisy[0] - same[0]).norm() > 0.1 * update  # and DP-SGD's update is not the plain one


def test_dp_settings_that_cannot_work_are_refused_by_key(pneumoniamnist_npz):
    with pytest.raises(ConfigError, match="model.batchnorm=frozen"):
        _central(pneumoniamnist_npz, "train.dp.enabled=true", "train.dp.noise_multiplier=1")
    with pytest.raises(ConfigError, match="federation.dp.noise_multiplier .* or federation.dp.target_epsilon"):
        _central(pneumoniamnist_npz, "federation.dp.enabled=true", "model.batchnorm=frozen")
    with pytest.raises(ConfigError, match="train.class_balance=none"):
        _central(pneumoniamnist_npz, *SITE_DP, "train.class_balance=sampler")
    from rwft.server.app import make_strategy

    with pytest.raises(ConfigError, match="federation.strategy=fedprox"):
        make_strategy(_central(pneumoniamnist_npz, *SITE_DP, "federation.strategy=fedprox"))
    with pytest.raises(ConfigError, match=r"local_bn=true .* or model.batchnorm=frozen"):
        make_strategy(load_config(None, ["federation.strategy=dp-fedavg"]))


@pytest.mark.timeout(900)
def test_a_spent_budget_stops_training_and_lp_ft_stays_private(pneumoniamnist_npz):
    cfg = _central(pneumoniamnist_npz, "model.batchnorm=frozen", "train.dp.enabled=true",
                   "train.dp.target_epsilon=2", "train.dp.accountant=rdp", "train.lp_epochs=1")
    splits = load_splits(cfg)
    torch.manual_seed(0)
    model = build_model(cfg.model, 2)
    backbone_before = torch.cat([p.detach().flatten() for p in model.backbone.parameters()])
    # LP-FT: epoch 1 trains the head (probe), epoch 2 everything with a rebuilt optimiser, still DP-SGD.
    first = fit(model, splits, cfg, epochs=2)
    backbone_after = torch.cat([p.detach().flatten() for p in model.backbone.parameters()])
    assert not torch.equal(backbone_before, backbone_after)  # the second stage trained the backbone
    assert first.privacy["steps"] == 6  # both stages' steps were counted (3 a epoch)
    # The noise was chosen so that the 2 planned epochs spend the budget, and they did.
    assert first.privacy["epsilon"] == pytest.approx(epsilon_after(
        "rdp", noise_multiplier=first.privacy["noise_multiplier"], sample_rate=first.privacy["sample_rate"],
        steps=6, delta=1e-5), rel=1e-9)
    assert 1.5 < first.privacy["epsilon"] <= 2.0 * 1.001
    with pytest.raises(PrivacyBudgetExhausted, match="privacy budget exhausted"):
        fit(model, splits, cfg, epochs=1, privacy_state=first.privacy)
    assert not any(module._forward_hooks or module._backward_hooks for module in model.modules())  # Opacus is gone


@pytest.mark.timeout(900)
def test_a_resumed_rwft_train_keeps_counting(tmp_path, pneumoniamnist_npz):
    from rwft.core.run import train

    base = [*SMALL, f"data.root={pneumoniamnist_npz}", f"output_dir={tmp_path / 'run'}", "model.batchnorm=frozen",
            "train.dp.enabled=true", "train.dp.noise_multiplier=1.2", "train.dp.accountant=prv",
            "train.schedule=constant"]  # a one-cycle run cannot be extended by an epoch
    train(load_config(None, [*base, "train.epochs=1"]), progress=False)
    once = torch.load(tmp_path / "run" / "last.pt", weights_only=True)["trainer"]["privacy"]
    assert sum(entry[2] for entry in once["accountant"]["history"]) == 3
    result = train(load_config(None, [*base, "train.epochs=2"]), resume=True, progress=False)
    spent = result.metrics["privacy"]
    assert spent["steps"] == 6  # 3 steps before the interruption, 3 after
    assert spent["epsilon"] == pytest.approx(epsilon_after("prv", noise_multiplier=1.2, sample_rate=spent["sample_rate"],
                                                           steps=6, delta=1e-5), rel=1e-6)
    events = EventAccumulator(str(tmp_path / "run" / "tb"), size_guidance={"scalars": 0})
    events.Reload()
    logged = [event.value for event in events.Scalars("privacy/epsilon")]
    assert len(logged) == 2 and logged[0] < logged[1] == pytest.approx(spent["epsilon"], rel=1e-6)


def _site_epsilons(run_dir, site):
    metrics = json.loads((run_dir / "metrics.json").read_text())
    return [record["sites"][site]["train"]["dp-epsilon"] for record in metrics["rounds"][1:]]


def _by_hand(run_dir, site, rounds):
    """Opacus' accountant run by hand from what the site used: its noise, its sample rate, 3 steps a round."""
    from rwft.server.state import federation_id

    state = torch.load(run_dir / "sites" / site / "privacy" / f"{federation_id(run_dir)}.pt", weights_only=True)
    assert state["noise_multiplier"] == 1.0
    return [epsilon_after("rdp", noise_multiplier=1.0, sample_rate=state["sample_rate"], steps=3 * r,
                          delta=state["delta"]) for r in range(1, rounds + 1)]


@pytest.mark.timeout(1800)
def test_site_epsilon_grows_matches_the_accountant_survives_resume_and_the_budget_stops_a_site(
        tmp_path, pneumoniamnist_npz):
    from rwft.clients.app import app as client_app
    from rwft.federation.inprocess import InProcessGrid
    from rwft.server.app import run_federation
    from rwft.server.launch import prepare_federation
    from rwft.server.rounds import FederationError

    base = [*SMALL, f"data.root={pneumoniamnist_npz}", f"output_dir={tmp_path / 'run'}", *SITE_DP,
            "federation.server_eval=false"]
    nodes = {10 + i: {"partition-id": i, "num-partitions": 2} for i in range(2)}
    _, run_config = prepare_federation(load_config(None, [*base, "federation.rounds=2"]), resume=False)
    run_federation(InProcessGrid(client_app, nodes, run_config), run_config)
    run_dir = tmp_path / "run"
    two = _site_epsilons(run_dir, "site-0")
    assert two[0] < two[1]
    np.testing.assert_allclose(two, _by_hand(run_dir, "site-0", 2), rtol=1e-9)

    # A resumed federation (a new Flower run, new ClientApp contexts and sites) keeps counting from round 2.
    _, resumed = prepare_federation(load_config(None, [*base, "federation.rounds=3"]), resume=True)
    run_federation(InProcessGrid(client_app, nodes, resumed), resumed)
    three = _site_epsilons(run_dir, "site-0")
    assert three[:2] == two and three[2] > two[1]
    np.testing.assert_allclose(three, _by_hand(run_dir, "site-0", 3), rtol=1e-9)

    central = EventAccumulator(str(run_dir / "tb"), size_guidance={"scalars": 0})
    central.Reload()
    site1 = _site_epsilons(run_dir, "site-1")
    assert [e.value for e in central.Scalars("site/site-1/train/dp-epsilon")] == pytest.approx(site1, rel=1e-6)
    assert [e.value for e in central.Scalars("federation/train/dp-epsilon")] == pytest.approx(
        [max(a, b) for a, b in zip(three, site1, strict=True)], rel=1e-6)  # the worst site's, not a mean
    site_log = EventAccumulator(str(run_dir / "sites" / "site-0" / "tb"), size_guidance={"scalars": 0})
    site_log.Reload()
    assert [(e.step, round(e.value, 6)) for e in site_log.Scalars("privacy/epsilon")] == \
        [(r, round(v, 6)) for r, v in enumerate(three, start=1)]

    # A budget between what 3 and 4 rounds spend: round 4 would exceed it, so the sites stop and say so.
    budget = (max(three[2], site1[2]) + min(_by_hand(run_dir, "site-0", 4)[3], _by_hand(run_dir, "site-1", 4)[3])) / 2
    _, capped = prepare_federation(load_config(None, [*base, "federation.rounds=4",
                                                      f"federation.dp.target_epsilon={budget}"]), resume=True)
    with pytest.raises(FederationError, match=r"site site-0 stopped training: privacy budget exhausted"):
        run_federation(InProcessGrid(client_app, nodes, capped, errors_as_replies=True), capped)
    np.testing.assert_allclose(_by_hand(run_dir, "site-0", 3)[2], three[2])  # nothing more was spent or counted
    from rwft.server.state import federation_id

    state = torch.load(run_dir / "sites" / "site-0" / "privacy" / f"{federation_id(run_dir)}.pt", weights_only=True)
    assert sum(entry[2] for entry in state["accountant"]["history"]) == 9


@pytest.mark.timeout(900)
def test_server_dp_noises_only_the_weights_and_logs_its_epsilon(tmp_path, pneumoniamnist_npz):
    from rwft.server.state import load_state

    grid, cfg, _ = in_process_federation(tmp_path, pneumoniamnist_npz, [
        "federation.strategy=dp-fedavg", "model.batchnorm=frozen", "federation.rounds=2",
        "federation.server_dp.noise_multiplier=0.5", "federation.server_dp.clipping_norm=0.05",
        "federation.server_eval=false"], sites=3)
    run_dir = tmp_path / "run"
    metrics = json.loads((run_dir / "metrics.json").read_text())
    epsilons = [record["train"]["dp-server-epsilon"] for record in metrics["rounds"][1:]]
    assert epsilons == pytest.approx([server_epsilon(0.5, r, 1e-5) for r in (1, 2)]) and epsilons[0] < epsilons[1]
    central = EventAccumulator(str(run_dir / "tb"), size_guidance={"scalars": 0})
    central.Reload()
    assert [e.value for e in central.Scalars("federation/train/dp-server-epsilon")] == pytest.approx(epsilons)

    sent = [m.content["arrays"] for m in grid.instructions if m.metadata.message_type == "train"]
    round1, round2 = sent[0], sent[-1]
    # Frozen BatchNorm: statistics and fixed affine weights travel apart from the trained weights,
    # and no noise touched them: they are exactly the ImageNet ones every round.
    torch.manual_seed(0)
    frozen = build_model(cfg.model, 2)
    buffers = {name for name, _ in frozen.named_buffers() if name.endswith(("running_mean", "running_var"))}
    assert buffers and STATISTICS_KEY in round2
    np.testing.assert_array_equal(round2[STATISTICS_KEY].numpy(), round1[STATISTICS_KEY].numpy())
    final = load_state(run_dir)
    np.testing.assert_array_equal(final.arrays[STATISTICS_KEY], round1[STATISTICS_KEY].numpy())
    assert round2[WEIGHTS_KEY].numpy().size == sum(p.numel() for p in frozen.parameters())
    # The weights moved by far more than the clipped mean allows (0.05): the noise, std 0.5 * 0.05 / 3 per weight.
    moved = np.linalg.norm(round2[WEIGHTS_KEY].numpy() - round1[WEIGHTS_KEY].numpy())
    assert moved > 10 * 0.05
    assert np.isfinite(final.arrays[WEIGHTS_KEY]).all()


@pytest.mark.timeout(900)
def test_server_dp_with_fedbn_never_sees_the_statistics(tmp_path, pneumoniamnist_npz):
    """FedBN (BatchNorm trained and kept at each site) with user-level DP: only weights travel and are noised."""
    grid, _, _ = in_process_federation(tmp_path, pneumoniamnist_npz, [
        "federation.strategy=dp-fedavg", "federation.local_bn=true", "federation.rounds=1",
        "federation.server_eval=false"], sites=2)
    for message in grid.instructions + [reply for reply in grid.replies if reply.has_content()]:
        if "arrays" in message.content.array_records:
            assert list(message.content["arrays"].keys()) == [WEIGHTS_KEY]
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["rounds"][1]["train"]["dp-server-epsilon"] == pytest.approx(server_epsilon(1.0, 1, 1e-5))
