"""Only the coordinator controls a federation: from the sites' address, Flower's own ``flwr``
commands cannot register a key, revoke a hospital, stop the run or list runs, while the
coordinator's ``rwft-server`` commands work and the run completes with the admitted site."""

from __future__ import annotations

import json
import os
import re
import stat
import subprocess

import pytest
import tomli_w
from federation_helpers import BIN, TINY, Started, join, make_site_files, wait_for

from rwft.federation.processes import free_port
from rwft.federation.site_keys import create_site_key


def _flwr(home, *args):
    return subprocess.run([str(BIN / "flwr"), *args], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "FLWR_HOME": str(home), "FLWR_TELEMETRY_ENABLED": "0",
                               "FLWR_DISABLE_UPDATE_CHECK": "1"})


@pytest.mark.integration
@pytest.mark.timeout(1200)
def test_an_outsider_with_the_ca_cannot_control_the_federation(tmp_path, pneumoniamnist_npz):
    keys = tmp_path / "keys"
    hospital_key, _ = create_site_key(keys, "hospitalA")
    _, outsider_pub = create_site_key(tmp_path / "outsider-keys", "siteZ")
    site = make_site_files(pneumoniamnist_npz, 2, tmp_path / "data")[0]
    address = f"127.0.0.1:{free_port()}"
    run = tmp_path / "run"
    # No federation.certificates: rwft-server makes the federation's CA (site keys need TLS).
    server = Started([str(BIN / "rwft-server"), "start", *TINY, f"data.root={pneumoniamnist_npz}",
                      "federation.rounds=1", "federation.min_sites=1", f"federation.address={address}",
                      f"federation.site_keys={keys}", "federation.wait_timeout_s=300", f"output_dir={run}"],
                     tmp_path / "server.log")
    client = None
    try:
        wait_for(lambda: re.search(r"run (\d+):", server.text()), 180, "the run to be submitted")
        run_id = re.search(r"run (\d+):", server.text()).group(1)
        ca = run / "certs" / "ca.crt"
        assert "CA fingerprint (SHA-256)" in server.text() and str(ca) in server.text()
        hospital_node = str(json.loads((run / "superlink" / "site_keys.json").read_text())["hospitalA"]["node_id"])
        # The outsider: the public ca.crt and the sites' address, with the stock flwr command.
        home = tmp_path / "outsider-home"
        home.mkdir()
        (home / "config.toml").write_bytes(tomli_w.dumps({"superlink": {"default": "fed", "fed": {
            "address": address, "root-certificates": str(ca)}}}).encode())
        attempts = {"register": _flwr(home, "supernode", "register", str(outsider_pub), "fed"),
                    "unregister": _flwr(home, "supernode", "unregister", hospital_node, "fed"),
                    "stop": _flwr(home, "stop", run_id, "fed"),
                    "ls": _flwr(home, "ls", "fed")}
        for name, done in attempts.items():
            assert done.returncode != 0, (name, done.stdout, done.stderr)
        # The coordinator's own commands work, and `status` writes nothing into the run directory
        # (compared once round 0 is committed: state.pt is written last, so the server is idle then).
        wait_for(lambda: (run / "state.pt").is_file(), 300, "round 0 to be committed")
        before = sorted(str(path) for path in run.rglob("*") if "superlink" not in path.parts and "tb" not in path.parts)
        status = subprocess.run([str(BIN / "rwft-server"), "status", str(run), "--json"], capture_output=True,
                                text=True, timeout=120)
        assert status.returncode == 0, status.stderr
        assert json.loads(status.stdout)["running"] is True
        after = sorted(str(path) for path in run.rglob("*") if "superlink" not in path.parts and "tb" not in path.parts)
        assert after == before
        # The admitted hospital still trains, and the run completes (it was not stopped).
        client = join("hospitalA", address, site, tmp_path / "hospitalA",
                      extra=["--root-certificates", str(ca), "--auth-key", str(hospital_key)])
        code = server.wait(timeout=900)
    finally:
        server.stop()
        if client is not None:
            client.stop()
    assert code == 0, server.text()[-3000:]
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["complete"] and [set(r["sites"]) for r in metrics["rounds"][1:]] == [{"hospitalA"}]
    registered = json.loads((run / "superlink" / "site_keys.json").read_text())
    assert set(registered) == {"hospitalA"}
    # The Flower app every site receives carries none of the coordinator's paths.
    shipped = (run / "flower-app" / "pyproject.toml").read_text()
    assert str(tmp_path) not in shipped and "rwft-config" in shipped
    # Run files are private to the coordinator.
    assert stat.S_IMODE(run.stat().st_mode) == 0o700
    for private in (run / "superlink" / "state.db", run / "metrics.json", run / "model.pt"):
        assert stat.S_IMODE(private.stat().st_mode) == 0o600, private
    for path in (run / "tb").rglob("*"):
        assert stat.S_IMODE(path.stat().st_mode) & 0o077 == 0, path
