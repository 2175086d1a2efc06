"""``rwft-server``: a clear wait for sites that ends, and ``status`` of a run directory."""

from __future__ import annotations

import json

import pytest
from federation_helpers import BIN, Started, in_process_federation

from rwft.federation.processes import free_port, port_open
from rwft.server.cli import main


@pytest.mark.integration
@pytest.mark.timeout(180)
def test_start_waits_for_sites_with_a_clear_message_then_gives_up(tmp_path, pneumoniamnist_npz):
    port = free_port()
    server = Started([str(BIN / "rwft-server"), "start", f"data.root={pneumoniamnist_npz}", "data.image_size=28",
                      "federation.min_sites=2", "federation.wait_timeout_s=5", f"federation.address=127.0.0.1:{port}",
                      f"output_dir={tmp_path / 'run'}"], tmp_path / "server.log")
    try:
        assert server.wait(timeout=150) == 2
    finally:
        server.stop()
    log = server.text()
    assert "waiting for 2 site(s), at most 5 s" in log
    assert f"rwft-client join --site NAME --server 127.0.0.1:{port} --data PATH" in log
    assert "only 0 of federation.min_sites=2 site(s) joined within federation.wait_timeout_s=5 s" in log
    assert not port_open("127.0.0.1", port)  # the SuperLink was stopped
    assert (tmp_path / "run" / "superlink" / "state.db").is_file()  # Flower's state lives in the run directory


@pytest.mark.timeout(300)
def test_status_shows_rounds_and_whether_the_superlink_runs(tmp_path, pneumoniamnist_npz, capsys):
    in_process_federation(tmp_path, pneumoniamnist_npz, ["federation.rounds=1", "federation.server_eval=false",
                                                         f"federation.address=127.0.0.1:{free_port()}"])
    assert main(["status", str(tmp_path / "run")]) == 0
    out = capsys.readouterr().out
    assert "(fedavg) in" in out and "1 of 1 rounds completed" in out
    assert "round 1/1 | 2 site(s) trained (site-0, site-1)" in out
    assert "is not running" in out


def test_start_refuses_a_run_directory_that_holds_a_federation(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "state.pt").write_bytes(b"")
    (run / "federation.json").write_text(json.dumps({"id": "x"}))
    assert main(["start", "federation.server_eval=false", f"output_dir={run}"]) == 2
    assert f"Continue it with `--resume {run}`" in capsys.readouterr().err


def test_bad_security_settings_are_refused_before_anything_is_written(tmp_path, capsys):
    run = tmp_path / "run"
    (tmp_path / "keys").mkdir()
    assert main(["start", "federation.server_eval=false", f"federation.site_keys={tmp_path / 'keys'}",
                 f"output_dir={run}"]) == 2
    assert "federation.site_keys needs TLS" in capsys.readouterr().err
    assert main(["start", "federation.server_eval=false", f"federation.certificates={tmp_path / 'nowhere'}",
                 f"output_dir={run}"]) == 2
    assert "ca.crt, server.crt, server.key missing" in capsys.readouterr().err
    assert not run.exists()
