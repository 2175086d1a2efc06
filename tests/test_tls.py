"""TLS for a federation: ``rwft-server certs`` makes a private CA and the server's certificate,
``federation.certificates`` makes the SuperLink serve TLS only, and a site joins only with
the federation's ``ca.crt``: a site holding another CA's certificate never connects."""

from __future__ import annotations

import ipaddress
import json
import stat
import subprocess

import pytest
from cryptography import x509
from federation_helpers import BIN, TINY, Started, join, make_site_files
from rwft.core.errors import RwftError
from rwft.core.processes import free_port
from rwft.core.tls import (
    FederationCertificates,
    check_root_certificate,
    create_certificates,
)


def test_the_server_certificate_is_signed_by_the_federation_ca_for_the_hosts_asked(tmp_path):
    folder = create_certificates(tmp_path / "certs", ["coordinator.example.org", "10.1.2.3"])
    ca = x509.load_pem_x509_certificate((folder / "ca.crt").read_bytes())
    server = x509.load_pem_x509_certificate((folder / "server.crt").read_bytes())
    server.verify_directly_issued_by(ca)  # raises if the signature does not check out
    names = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert set(names.get_values_for_type(x509.DNSName)) == {"coordinator.example.org", "localhost"}
    assert set(names.get_values_for_type(x509.IPAddress)) == {ipaddress.ip_address("10.1.2.3"),
                                                              ipaddress.ip_address("127.0.0.1")}
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert not server.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    for key in ("ca.key", "server.key"):
        assert stat.S_IMODE((folder / key).stat().st_mode) == 0o600, key
    assert FederationCertificates.in_folder(folder).key == folder / "server.key"


def test_existing_certificates_are_not_replaced_by_accident(tmp_path):
    folder = create_certificates(tmp_path / "certs", [])
    before = (folder / "ca.crt").read_bytes()
    with pytest.raises(RwftError, match="--overwrite"):
        create_certificates(folder, [])
    assert (folder / "ca.crt").read_bytes() == before
    create_certificates(folder, [], overwrite=True)
    assert (folder / "ca.crt").read_bytes() != before


def test_wrong_or_missing_files_say_what_to_do(tmp_path):
    with pytest.raises(RwftError, match="server.key missing .* rwft-server certs"):
        (tmp_path / "half").mkdir()
        (tmp_path / "half" / "ca.crt").write_text("x")
        (tmp_path / "half" / "server.crt").write_text("x")
        FederationCertificates.in_folder(tmp_path / "half")
    folder = create_certificates(tmp_path / "certs", [])
    with pytest.raises(RwftError, match="not a PEM certificate. Pass the federation.s ca.crt"):
        check_root_certificate(folder / "ca.key")  # the private key by mistake
    with pytest.raises(RwftError, match="cannot read it"):
        check_root_certificate(tmp_path / "nowhere.crt")


@pytest.mark.integration
@pytest.mark.timeout(360)
def test_a_tls_federation_admits_only_sites_that_trust_its_ca(tmp_path, pneumoniamnist_npz):
    made = subprocess.run([str(BIN / "rwft-server"), "certs", "--out", str(tmp_path / "certs")],
                          capture_output=True, text=True, timeout=120)
    assert made.returncode == 0, made.stderr
    assert "give every hospital" in made.stdout
    create_certificates(tmp_path / "rogue-certs", [])  # a CA that did not sign this server's certificate
    site, rogue_data = make_site_files(pneumoniamnist_npz, 2, tmp_path / "data")
    address = f"127.0.0.1:{free_port()}"
    server = Started([str(BIN / "rwft-server"), "start", *TINY, f"data.root={pneumoniamnist_npz}",
                      "federation.rounds=1", "federation.min_sites=1", f"federation.address={address}",
                      f"federation.certificates={tmp_path / 'certs'}", "federation.wait_timeout_s=120",
                      f"output_dir={tmp_path / 'run'}"], tmp_path / "server.log")
    rogue = trusted = None
    try:
        rogue = join("rogue", address, rogue_data, tmp_path / "rogue",
                     extra=["--root-certificates", str(tmp_path / "rogue-certs" / "ca.crt")])
        # The rogue site tries first: the handshake fails and it stops, saying why.
        assert rogue.wait(timeout=120) == 2, rogue.text()[-3000:]
        assert "did not sign. Ask the federation's coordinator for its ca.crt" in rogue.text()
        assert "CERTIFICATE_VERIFY_FAILED" in _text(tmp_path / "rogue" / "supernode.log")
        trusted = join("hospitalA", address, site, tmp_path / "hospitalA",
                       extra=["--root-certificates", str(tmp_path / "certs" / "ca.crt")])
        code = server.wait(timeout=240)
    finally:
        server.stop()
        for client in (rogue, trusted):
            if client is not None:
                client.stop()
    assert code == 0, server.text()[-3000:]
    log = server.text()
    assert "TLS, sites join with --root-certificates" in log and "warning: without TLS" not in log
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["complete"] and [set(r["sites"]) for r in metrics["rounds"][1:]] == [{"hospitalA"}]
    assert "SuperNode ID:" not in _text(tmp_path / "rogue" / "supernode.log")


def _text(path):
    return path.read_text(errors="replace") if path.exists() else ""
