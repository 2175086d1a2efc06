"""A server crash (``kill -9`` of rwft-server, its SuperLink and ServerApp) after round 1, then
``rwft-server start --resume``: the federation ends at the round asked for, no round lost
or repeated, FedAdam's moments carry on, and the sites reconnect by themselves, over TLS
and with their registered keys (sites not reconnecting to a restarted TLS server is a
known pain of Flower deployments)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from federation_helpers import BIN, TINY, Started, join, make_site_files, wait_for

from rwft.federation.processes import free_port
from rwft.federation.site_keys import create_site_key
from rwft.federation.tls import create_certificates
from rwft.server.state import load_state

pytestmark = pytest.mark.integration


@pytest.mark.timeout(900)
def test_killed_server_resumes_after_its_last_completed_round(tmp_path, pneumoniamnist_npz):
    sites = make_site_files(pneumoniamnist_npz, 2, tmp_path / "data")
    address = f"127.0.0.1:{free_port()}"
    run_dir = tmp_path / "run"
    certificates = create_certificates(tmp_path / "certs", [])
    names = ("hospitalA", "hospitalB")
    keys = [create_site_key(tmp_path / "keys", name)[0] for name in names]
    for key in keys:  # the coordinator holds the public halves only
        key.rename(tmp_path / key.name)
    clients = [join(name, address, data, tmp_path / name,
                    extra=["--root-certificates", str(certificates / "ca.crt"), "--auth-key", str(tmp_path / key.name)])
               for name, data, key in zip(names, sites, keys, strict=True)]
    start = [str(BIN / "rwft-server"), "start", *TINY, f"data.root={pneumoniamnist_npz}", "federation.rounds=3",
             "federation.strategy=fedadam", "federation.server_lr=0.001", f"federation.address={address}",
             f"federation.certificates={certificates}", f"federation.site_keys={tmp_path / 'keys'}",
             "federation.wait_timeout_s=120", f"output_dir={run_dir}"]
    server = Started(start, tmp_path / "server.log")
    resumed = None
    try:
        wait_for(lambda: (state := load_state(run_dir)) is not None and state.round >= 1, 300, "round 1's commit",
                 interval=0.2)
        server.kill9()
        crashed_at = load_state(run_dir)
        assert crashed_at is not None and crashed_at.round in (1, 2)
        moments = crashed_at.strategy
        assert {"m_t", "v_t"} <= set(moments)

        resumed = Started([str(BIN / "rwft-server"), "start", "--resume", str(run_dir)], tmp_path / "resumed.log")
        assert resumed.wait(timeout=480) == 0, resumed.text()[-3000:]  # 2 rounds took 4 min on 2 loaded cores
    finally:
        server.stop()
        if resumed is not None:
            resumed.stop()
        for client in clients:
            client.stop()

    log = resumed.text()
    assert f"resuming after round {crashed_at.round} of 3" in log
    assert "(TLS)" in log and "--root-certificates ca.crt" in log and "admitting only the sites with a key in" in log
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert [r["round"] for r in metrics["rounds"]] == [0, 1, 2, 3] and metrics["complete"]
    assert all(set(r["sites"]) == set(names) for r in metrics["rounds"][1:])  # both came back after the crash
    final = load_state(run_dir)
    assert final is not None and final.round == 3
    # The resumed rounds started from the checkpoint: the committed rounds' records are untouched.
    for before, after in zip(crashed_at.history, metrics["rounds"], strict=False):
        assert before["finished_at"] == after["finished_at"]
    assert all(np.isfinite(v).all() for v in final.strategy["v_t"].values())
