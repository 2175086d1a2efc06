"""A site's label is unique and bound to its key: the rounds never merge two sites or let
one report under another's name."""

from __future__ import annotations

import json
import re

import pytest
from federation_helpers import BIN, TINY, Started, join, make_site_files, wait_for

from rwft.federation.processes import free_port
from rwft.federation.site_keys import create_site_key


@pytest.mark.timeout(300)
def test_two_sites_with_one_label_are_not_merged(tmp_path, pneumoniamnist_npz, capsys):
    from rwft.clients.app import app as client_app
    from rwft.core.config import load_config
    from rwft.federation.inprocess import InProcessGrid
    from rwft.server.app import run_federation
    from rwft.server.launch import prepare_federation

    cfg, run_config = prepare_federation(load_config(None, [
        *TINY, "data.max_train_images=300", "train.max_steps_per_epoch=2", f"data.root={pneumoniamnist_npz}",
        "federation.rounds=1", "federation.server_eval=false", f"output_dir={tmp_path / 'run'}"]), resume=False)
    files = make_site_files(pneumoniamnist_npz, 2, tmp_path / "data")
    nodes = {10 + i: {"site": "hospitalA", "data-dir": str(path), "work-dir": str(tmp_path / f"site{i}")}
             for i, path in enumerate(files)}
    run_federation(InProcessGrid(client_app, nodes, run_config), run_config)
    captured = capsys.readouterr()
    out = captured.out
    assert re.search(r"node 1[01] calls itself 'hospitalA', a label node 1[01] already uses: every site needs its own "
                     r"--site label", out), out[-3000:]
    # The refused site itself is told, on its own console, with the next message it gets.
    assert re.search(r"rwft site hospitalA: the server left this site's reply of round 1 out of the aggregate: node "
                     r"1[01] calls itself 'hospitalA', a label node 1[01] already uses", captured.err), captured.err[-3000:]
    sites = json.loads((tmp_path / "run" / "metrics.json").read_text())["rounds"][1]["sites"]
    trained = {label for label, record in sites.items() if "already uses" not in json.dumps(record)}
    assert trained == {"hospitalA"} and len(sites) == 2, sites  # one hospitalA; the other refused, not merged


@pytest.mark.integration
@pytest.mark.timeout(1200)
def test_a_key_cannot_claim_another_sites_label(tmp_path, pneumoniamnist_npz):
    keys = tmp_path / "keys"
    key_a, _ = create_site_key(keys, "hospitalA")
    key_b, _ = create_site_key(keys, "hospitalB")
    data = make_site_files(pneumoniamnist_npz, 2, tmp_path / "data")
    address = f"127.0.0.1:{free_port()}"
    run = tmp_path / "run"
    server = Started([str(BIN / "rwft-server"), "start", *TINY, f"data.root={pneumoniamnist_npz}",
                      "federation.rounds=1", "federation.min_sites=2", f"federation.address={address}",
                      f"federation.site_keys={keys}", "federation.wait_timeout_s=300", "federation.server_eval=false",
                      f"output_dir={run}"], tmp_path / "server.log")
    clients = []
    try:
        wait_for(lambda: (run / "certs" / "ca.crt").is_file() and "admitting only" in server.text(), 180,
                 "the server")
        ca = str(run / "certs" / "ca.crt")
        clients.append(join("hospitalA", address, data[0], tmp_path / "a",
                            extra=["--root-certificates", ca, "--auth-key", str(key_a)]))
        # hospitalB's key, claiming hospitalA's label.
        clients.append(join("hospitalA", address, data[1], tmp_path / "b",
                            extra=["--root-certificates", ca, "--auth-key", str(key_b)]))
        code = server.wait(timeout=900)
    finally:
        server.stop()
        for client in clients:
            client.stop()
    log = server.text()
    assert "holds the key of site 'hospitalB' but calls itself 'hospitalA'" in log, log[-3000:]
    # The impostor is told on its own console, not only in the coordinator's log.
    assert "out of the aggregate: node" in clients[1].text() and "holds the key of site 'hospitalB' but calls itself " \
        "'hospitalA': a site's label is its key's file name; that site joins with --site hospitalB" in clients[1].text()
    assert code == 0, log[-3000:]
    sites = json.loads((run / "metrics.json").read_text())["rounds"][1]["sites"]
    trained = {label for label, record in sites.items() if "calls itself" not in json.dumps(record)}
    assert trained == {"hospitalA"}, sites  # the impostor's reply was refused, not merged into hospitalA
