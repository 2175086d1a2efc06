"""``rwft-client join``: the local data check comes first, leaving stops the SuperNode, and a server
that went away and came back is served from a fresh SuperNode."""

from __future__ import annotations

import os
import re
import signal
import sys
import time
from pathlib import Path

import pytest
from federation_helpers import Started, join, make_site_files, wait_for

from rwft.clients.cli import main
from rwft.federation.processes import free_port
from rwft.server.superlink import FlowerCli, start_superlink


def test_an_empty_site_is_refused_before_anything_starts(tmp_path, capsys):
    site = tmp_path / "empty"
    (site / "NORMAL").mkdir(parents=True)
    (site / "PNEUMONIA").mkdir()
    work = tmp_path / "work"
    code = main(["join", "--site", "hospitalA", "--server", "127.0.0.1:9", "--data", str(site),
                 "--workdir", str(work)])
    assert code == 2
    assert "rwft-client: error:" in capsys.readouterr().err
    assert not work.exists()  # no SuperNode, no files


def test_a_path_is_refused_as_a_site_label(tmp_path, capsys):
    assert main(["join", "--site", "/home/alice/site", "--server", "127.0.0.1:9", "--data", str(tmp_path)]) == 2
    assert "pseudonym" in capsys.readouterr().err


def _children(pid: int) -> list[int]:
    return [int(child) for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


@pytest.mark.integration
@pytest.mark.timeout(180)
def test_sigterm_leaves_the_federation_and_stops_the_supernode(tmp_path, pneumoniamnist_npz):
    data = make_site_files(pneumoniamnist_npz, 2, tmp_path / "data")[0]
    # No SuperLink at this address: the SuperNode keeps trying to connect, as it would while
    # the server restarts.
    client = Started([str(Path(sys.executable).parent / "rwft-client"), "join", "--site", "hospitalA",
                      "--server", f"127.0.0.1:{free_port()}", "--data", str(data), "--workdir",
                      str(tmp_path / "work"), "--image-size", "28"], tmp_path / "client.log")
    try:
        wait_for(lambda: "connecting to" in client.text() and _children(client.process.pid), 120, "the SuperNode")
        supernode = _children(client.process.pid)[0]
        time.sleep(2)
        os.kill(client.process.pid, signal.SIGTERM)  # to rwft-client alone, as `kill PID` does
        assert client.wait(timeout=60) == 130
        wait_for(lambda: not Path(f"/proc/{supernode}").exists(), 30, "the SuperNode to exit")
    finally:
        client.stop()
    assert "every file is readable" in client.text() and "left the federation" in client.text()


@pytest.mark.integration
@pytest.mark.timeout(180)
def test_a_key_already_held_on_this_machine_is_named_in_use(tmp_path, pneumoniamnist_npz):
    """Flower answers a key another SuperNode holds as it answers one never registered; the usual
    cause, a site started twice on one machine, is caught here and said in one line."""
    from rwft.federation.site_keys import create_site_key
    from rwft.federation.tls import create_certificates

    key, _ = create_site_key(tmp_path / "keys", "hospitalA")
    site = ["--auth-key", str(key), "--root-certificates", str(create_certificates(tmp_path / "certs", []) / "ca.crt")]
    data = make_site_files(pneumoniamnist_npz, 2, tmp_path / "data")[0]
    server = f"127.0.0.1:{free_port()}"  # nobody listens: the first site keeps trying to connect
    for name in ("first", "second", "plain"):
        (tmp_path / name).mkdir()
    first = join("hospitalA", server, data, tmp_path / "first" / "work", extra=site)
    second = None
    try:
        wait_for(lambda: "connecting to" in first.text(), 120, "the first site's SuperNode")
        second = join("hospitalA", server, data, tmp_path / "second" / "work", extra=site)
        assert second.wait(timeout=60) == 2, second.text()[-3000:]
        assert f"--auth-key {key} is in use by another rwft-client on this machine" in second.text()
        assert "Traceback" not in second.text() and not (tmp_path / "second" / "work").exists()
        assert first.process.poll() is None, first.text()[-3000:]  # the site that holds the key is untouched
        # A key without TLS: said before anything starts (Flower would stop with its exit code 303).
        plain = join("hospitalB", server, data, tmp_path / "plain" / "work", extra=["--auth-key", str(key)])
        assert plain.wait(timeout=60) == 2 and "--auth-key needs a TLS connection" in plain.text(), plain.text()
    finally:
        first.stop()
        if second is not None:
            second.stop()


def _node_ids(client) -> list[str]:
    return re.findall(r"joined the federation as node (\d+)", client.text())


@pytest.mark.integration
@pytest.mark.timeout(400)
def test_a_site_follows_its_federation_and_its_supernode_never_outlives_it(tmp_path, pneumoniamnist_npz):
    """A new federation on the same address: the site rejoins it with its real new node id.
    A kill -9 of rwft-client alone (the OOM killer): its SuperNode exits too."""
    data = make_site_files(pneumoniamnist_npz, 2, tmp_path / "data")[0]
    address = f"127.0.0.1:{free_port()}"
    first = start_superlink(tmp_path / "run1", address)
    second = None
    client = join("hospitalA", address, data, tmp_path / "work")
    try:
        wait_for(lambda: _node_ids(client), 180, "the site to join the first federation")
        first.stop()
        second = start_superlink(tmp_path / "run2", address)
        wait_for(lambda: len(_node_ids(client)) >= 2, 240, "the site to rejoin the new federation")
        # Either the site restarted its SuperNode once the address answered again, or the old SuperNode
        # heard first that the new federation does not know it: both rejoin under a new node id.
        assert "no longer knows this site" in client.text() or "is back: restarting" in client.text(), \
            client.text()[-3000:]
        old_id, new_id = _node_ids(client)[:2]
        online = FlowerCli(tmp_path / "run2", second.control_address).node_ids()
        assert int(new_id) in online and new_id != old_id
        supernode = _children(client.process.pid)[0]
        os.kill(client.process.pid, signal.SIGKILL)  # only rwft-client, not its group
        client.process.wait(30)
        wait_for(lambda: not _running(supernode), 60, "the orphaned SuperNode to exit")
        wait_for(lambda: not FlowerCli(tmp_path / "run2", second.control_address).node_ids(), 120,
                 "the SuperLink to see the site gone")
    finally:
        client.stop()
        first.stop()
        if second is not None:
            second.stop()


@pytest.mark.integration
@pytest.mark.timeout(400)
def test_a_site_whose_server_restarts_serves_it_from_a_fresh_supernode(tmp_path, pneumoniamnist_npz):
    """The server goes away and comes back with its state (a crash, then --resume): once it is back
    the site stops its SuperNode, which leaves gracefully, and serves from a new one, whose state
    holds nothing of the old connection (README "Known limits": the stray reply)."""
    data = make_site_files(pneumoniamnist_npz, 2, tmp_path / "data")[0]
    address = f"127.0.0.1:{free_port()}"
    superlink = start_superlink(tmp_path / "run", address)
    client = join("hospitalA", address, data, tmp_path / "work")
    try:
        wait_for(lambda: _node_ids(client), 180, "the site to join")
        old_supernode = _children(client.process.pid)[0]
        superlink.stop()
        wait_for(lambda: "went away" in client.text(), 120, "the site to see its server gone")
        assert _children(client.process.pid) == [old_supernode]  # kept while the server is away
        superlink = start_superlink(tmp_path / "run", address)  # the same state database, as --resume
        wait_for(lambda: len(_node_ids(client)) >= 2, 240, "the site to serve from a new SuperNode")
        assert "is back: restarting this site's SuperNode" in client.text()
        assert not _running(old_supernode)
        old_id, new_id = (int(node) for node in _node_ids(client)[:2])
        # The old node left gracefully: without a site key the SuperLink forgets it; the new one is online.
        nodes = {int(node["node-id"]): node["status"] for node in
                 FlowerCli(tmp_path / "run", superlink.control_address).nodes()}
        assert nodes.get(new_id) == "online" and nodes.get(old_id) != "online", nodes
    finally:
        client.stop()
        superlink.stop()


def _running(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


def test_the_flower_log_lines_rwft_client_reacts_to_are_those_the_installed_flower_writes():
    """An upgrade of Flower that rewords one of these fails here, not in a hospital's night."""
    import flwr
    import httpx

    from rwft.clients import cli

    flower_source = "\n".join(path.read_text(errors="replace") for path in Path(flwr.__file__).parent.rglob("*.py"))
    for text in (cli.JOINED, cli.RETRYING, cli.KEY_REFUSED, cli.NO_KEY):
        assert text.replace("%s", "") in flower_source.replace("%.2f seconds", "").replace("%s", ""), text
    assert "SuperNode ID: %s" in flower_source and "Connection attempt failed, retrying in %.2f" in flower_source
    # A node the SuperLink does not know is answered 401, which httpx reports in these words.
    response = httpx.Response(401, request=httpx.Request("POST", "http://x/v1/fleet/send-node-heartbeat"))
    with pytest.raises(httpx.HTTPStatusError, match=cli.NEW_FEDERATION):
        response.raise_for_status()
    assert "UNAUTHORIZED" in (Path(flwr.__file__).parent / "supernode" / "fleet_http_connection.py").read_text()


@pytest.mark.integration
@pytest.mark.timeout(480)
def test_flowers_stock_launcher_runs_rounds_from_a_venv_that_is_not_activated(tmp_path, pneumoniamnist_npz):
    """Without the warm worker (an adjustment off, or Flower drifted) rwft-client runs Flower's own
    launcher, which starts each ClientApp as `flwr-clientapp` by name. From a virtual environment
    that is not on PATH (a service unit, `.venv/bin/rwft-client ...`) that name was not found: the
    site joined, then every round's message failed and the federation ended `finished:failed`."""
    from federation_helpers import BIN, TINY

    data = make_site_files(pneumoniamnist_npz, 2, tmp_path / "data")[0]
    address = f"127.0.0.1:{free_port()}"
    env = dict(os.environ, RWFT_FLOWER_ADJUSTMENTS="warm-worker",
               PATH=os.pathsep.join(p for p in os.environ.get("PATH", "").split(os.pathsep) if Path(p) != BIN))
    client = Started([str(BIN / "rwft-client"), "join", "--site", "hospitalA", "--server", address, "--data",
                      str(data), "--workdir", str(tmp_path / "work"), "--image-size", "28"], tmp_path / "client.log",
                     env=env)
    server = Started([str(BIN / "rwft-server"), "start", *TINY, f"data.root={pneumoniamnist_npz}",
                      "federation.rounds=1", "federation.min_sites=1", "federation.server_eval=false",
                      f"federation.address={address}", "federation.wait_timeout_s=120",
                      f"output_dir={tmp_path / 'run'}"], tmp_path / "server.log")
    try:
        code = server.wait(timeout=420)
    finally:
        server.stop()
        client.stop()
    assert "the warm ClientApp worker is off" in client.text()
    assert code == 0, server.text()[-3000:] + client.text()[-3000:]
    assert "No such file or directory: 'flwr-clientapp'" not in client.text()
