"""``rwft-server``: a clear wait for sites that ends, and ``status`` of a run directory."""

from __future__ import annotations

import ipaddress
import json

import pytest
from cryptography import x509
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
        assert server.wait(timeout=150) == 1
    finally:
        server.stop()
    log = server.text()
    assert "waiting for 2 site(s), at most 5 s" in log
    assert f"rwft-client join --site NAME --server 127.0.0.1:{port} --data PATH" in log
    # One wait for sites, in the ServerApp (through its grid, rwft.server.rounds): no flwr process per second.
    assert "only 0 of federation.min_sites=2 sites are connected after 5 s (federation.wait_timeout_s)" in log
    assert "the run ended as finished:failed" in log
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
    assert main(["start", "--insecure", "federation.server_eval=false", f"federation.site_keys={tmp_path / 'keys'}",
                 f"output_dir={run}"]) == 2
    assert "federation.site_keys needs TLS" in capsys.readouterr().err
    assert main(["start", "federation.server_eval=false", f"federation.certificates={tmp_path / 'nowhere'}",
                 f"output_dir={run}"]) == 2
    assert "ca.crt, server.crt, server.key missing" in capsys.readouterr().err
    assert not run.exists()


def test_secure_by_default_plain_http_only_on_loopback_or_when_asked(tmp_path):
    from rwft.core.config import load_config
    from rwft.core.errors import RwftError
    from rwft.server.cli import _generated_certificates, _transport

    def transport(address, insecure=False, keys=None):
        overrides = [f"federation.address={address}"] + ([f"federation.site_keys={keys}"] if keys else [])
        return _transport(load_config(None, overrides), insecure=insecure)

    assert transport("0.0.0.0:9092") == "generate" and transport("10.1.2.3:9092") == "generate"
    assert transport("127.0.0.1:9092") is None and transport("localhost:9092") is None
    assert transport("0.0.0.0:9092", insecure=True) is None  # asked for explicitly
    assert transport("127.0.0.1:9092", keys=tmp_path) == "generate"  # site keys need TLS
    with pytest.raises(RwftError, match="site_keys needs TLS: leave out --insecure"):
        transport("127.0.0.1:9092", insecure=True, keys=tmp_path)
    cfg = load_config(None, ["federation.address=10.1.2.3:9092", f"output_dir={tmp_path / 'run'}"])
    made = _generated_certificates(tmp_path / "run", cfg, ["coordinator.example.org"])
    names = x509.load_pem_x509_certificate(made.certificate.read_bytes()).extensions.get_extension_for_class(
        x509.SubjectAlternativeName).value
    assert "coordinator.example.org" in names.get_values_for_type(x509.DNSName)
    assert ipaddress.ip_address("10.1.2.3") in names.get_values_for_type(x509.IPAddress)
    before = made.ca.read_bytes()
    assert _generated_certificates(tmp_path / "run", cfg, []).ca.read_bytes() == before  # reused on --resume
