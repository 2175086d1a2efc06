"""A real federation on loopback: ``rwft-server start`` (SuperLink + ServerApp) and two
``rwft-client join`` sites (SuperNode + warm ClientApp), each with its own part of real
PneumoniaMNIST, three rounds."""

from __future__ import annotations

import json

import pytest
import torch
from federation_helpers import BIN, TINY, Started, join, make_site_files
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from rwft.core.checkpoint import load_checkpoint
from rwft.federation.processes import free_port
from rwft.server.state import load_state

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def federation(tmp_path_factory, pneumoniamnist_npz):
    """Run the whole federation once; the tests below read what it left behind."""
    work = tmp_path_factory.mktemp("federation")
    sites = make_site_files(pneumoniamnist_npz, 2, work / "data")
    address = f"127.0.0.1:{free_port()}"
    clients = [join(name, address, data, work / name)
               for name, data in zip(("hospitalA", "hospitalB"), sites, strict=True)]
    server = Started([str(BIN / "rwft-server"), "start", *TINY, f"data.root={pneumoniamnist_npz}",
                      "federation.rounds=3", f"federation.address={address}", "federation.wait_timeout_s=120",
                      f"output_dir={work / 'run'}"], work / "server.log")
    try:
        code = server.wait(timeout=420)
    finally:
        server.stop()
        for client in clients:
            client.stop()
    assert code == 0, server.text()[-3000:]
    return work, server.text(), [client.text() for client in clients]


@pytest.mark.timeout(480)
def test_three_rounds_improve_the_global_model(federation):
    work, log, _ = federation
    metrics = json.loads((work / "run" / "metrics.json").read_text())
    rounds = metrics["rounds"]
    assert [r["round"] for r in rounds] == [0, 1, 2, 3] and metrics["complete"]
    assert rounds[-1]["global"]["auroc"] > rounds[0]["global"]["auroc"], [r["global"]["auroc"] for r in rounds]
    for record in rounds[1:]:
        assert set(record["sites"]) == {"hospitalA", "hospitalB"}
        for site in record["sites"].values():
            assert site["update_l2"] > 0 and site["train"]["num-examples"] > 0
            assert 0.0 <= site["global_val"]["auroc"] <= 1.0  # the round's global model on the site's validation split
    assert "final" in metrics and 0.5 < metrics["final"]["test"]["auroc"]["value"] <= 1.0
    assert "rwft-server: done." in log and str(work / "run" / "model.pt") in log


def test_checkpoints_are_complete_and_loadable(federation):
    work, _, _ = federation
    state = load_state(work / "run")
    assert state is not None and state.round == 3
    checkpoint = load_checkpoint(work / "run" / "model.pt")
    assert checkpoint["round"] == 3 and 0.0 < checkpoint["threshold"] < 1.0
    assert all(torch.isfinite(value.float()).all() for value in checkpoint["model"].values())


def test_central_tensorboard_shows_the_whole_federation(federation):
    work, _, _ = federation
    events = EventAccumulator(str(work / "run" / "tb"), size_guidance={"scalars": 0})
    events.Reload()
    tags = set(events.Tags()["scalars"])
    for tag in ("global/auroc", "global/accuracy", "global/sensitivity", "global/specificity",
                "federation/participating_sites", "site/hospitalA/train/loss", "site/hospitalB/global_val/auroc",
                "site/hospitalA/local_val/auroc", "site/hospitalB/update_l2"):
        assert tag in tags, sorted(tags)
    assert [e.step for e in events.Scalars("global/auroc")] == [0, 1, 2, 3]
    assert [e.value for e in events.Scalars("federation/participating_sites")] == [2, 2, 2]


def test_sites_keep_their_own_logs_and_report_their_data_first(federation):
    work, _, client_logs = federation
    for name, log in zip(("hospitalA", "hospitalB"), client_logs, strict=True):
        assert "every file is readable" in log and "joined the federation as node" in log
        assert f"rwft site {name}: round 3" in log
        events = EventAccumulator(str(work / name / "tb"), size_guidance={"scalars": 0})
        events.Reload()
        assert "local_val/auroc" in events.Tags()["scalars"]
