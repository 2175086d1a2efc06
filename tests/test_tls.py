"""Who may talk to a federation. TLS: ``rwft-server certs`` makes a private CA and the
server's certificate, ``federation.certificates`` makes the SuperLink serve TLS only, and a
site connects only with the federation's ``ca.crt``. Site keys: ``rwft-client keygen``
makes a site's key pair, ``federation.site_keys`` admits only the sites whose public key
the coordinator holds."""

from __future__ import annotations

import ipaddress
import json
import stat
import subprocess

import pytest
from cryptography import x509
from federation_helpers import BIN, TINY, Started, join, make_site_files, wait_for

from rwft.core.errors import RwftError
from rwft.federation.processes import free_port
from rwft.federation.site_keys import (
    check_site_private_key,
    create_site_key,
    site_public_keys,
)
from rwft.federation.tls import (
    FederationCertificates,
    check_root_certificate,
    create_certificates,
)
from rwft.server.admission import admit_sites
from rwft.server.superlink import FlowerCli, start_superlink


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
@pytest.mark.timeout(1200)
def test_a_federation_admits_only_sites_that_trust_its_ca_and_hold_a_registered_key(tmp_path, pneumoniamnist_npz):
    for command in (["rwft-server", "certs", "--out", str(tmp_path / "certs")],
                    ["rwft-client", "keygen", "--site", "hospitalA", "--out", str(tmp_path / "keys")]):
        made = subprocess.run([str(BIN / command[0]), *command[1:]], capture_output=True, text=True, timeout=120)
        assert made.returncode == 0, made.stderr
    (tmp_path / "site-only").mkdir()
    (tmp_path / "keys" / "hospitalA.key").rename(tmp_path / "site-only" / "hospitalA.key")  # the server has the .pub
    create_certificates(tmp_path / "rogue-certs", [])  # a CA that did not sign this server's certificate
    intruder_key, _ = create_site_key(tmp_path / "intruder-keys", "intruder")  # a key nobody registered
    site, other_data = make_site_files(pneumoniamnist_npz, 2, tmp_path / "data")
    address = f"127.0.0.1:{free_port()}"
    ca = str(tmp_path / "certs" / "ca.crt")
    server = Started([str(BIN / "rwft-server"), "start", *TINY, f"data.root={pneumoniamnist_npz}",
                      "federation.rounds=1", "federation.min_sites=1", f"federation.address={address}",
                      f"federation.certificates={tmp_path / 'certs'}", f"federation.site_keys={tmp_path / 'keys'}",
                      "federation.wait_timeout_s=120", f"output_dir={tmp_path / 'run'}"], tmp_path / "server.log")
    clients = []
    try:
        wait_for(lambda: "admitting only the sites" in server.text(), 120, "the server to register the site keys")
        # A site with another CA's certificate: the handshake fails and it stops, saying why.
        clients.append(rogue := join("rogue", address, other_data, tmp_path / "rogue",
                                     extra=["--root-certificates", str(tmp_path / "rogue-certs" / "ca.crt")]))
        assert rogue.wait(timeout=120) == 2, rogue.text()[-3000:]
        assert "presented a certificate that" in rogue.text() and "did not sign (" in rogue.text()
        assert "CERTIFICATE_VERIFY_FAILED" in _text(tmp_path / "rogue" / "supernode.log")
        # A site that trusts the server but holds an unregistered key: turned away, told why, and
        # it asks again from time to time (the coordinator may not have registered it yet).
        clients.append(intruder := join("intruder", address, other_data, tmp_path / "intruder",
                                        extra=["--root-certificates", ca, "--auth-key", str(intruder_key)]))
        wait_for(lambda: intruder.text().count(f"has not admitted the key {intruder_key}: either") >= 2, 120,
                 "the intruder to be refused twice")
        # A site with no key at all: told to make one, and it stops.
        clients.append(keyless := join("keyless", address, other_data, tmp_path / "keyless",
                                       extra=["--root-certificates", ca]))
        assert keyless.wait(timeout=120) == 2, keyless.text()[-3000:]
        assert "admits only registered sites, and this site gave no key" in keyless.text()
        # The admitted hospital.
        clients.append(join("hospitalA", address, site, tmp_path / "hospitalA",
                            extra=["--root-certificates", ca, "--auth-key",
                                   str(tmp_path / "site-only" / "hospitalA.key")]))
        code = server.wait(timeout=900)
    finally:
        server.stop()
        for client in clients:
            client.stop()
    assert code == 0, server.text()[-3000:]
    log = server.text()
    assert "serving the sites on" in log and "(TLS)" in log and "warning: without TLS" not in log
    assert "admitting only the sites with a key in" in log
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["complete"] and [set(r["sites"]) for r in metrics["rounds"][1:]] == [{"hospitalA"}]
    for turned_away in ("rogue", "intruder", "keyless"):
        assert "SuperNode ID:" not in _text(tmp_path / turned_away / "supernode.log")


def _text(path):
    return path.read_text(errors="replace") if path.exists() else ""


def test_site_keys_are_made_once_and_checked(tmp_path):
    private, public = create_site_key(tmp_path / "keys", "hospitalA")
    assert stat.S_IMODE(private.stat().st_mode) == 0o600
    assert public.read_text().startswith("ecdsa-sha2-nistp384 ")
    assert check_site_private_key(private) == private
    assert site_public_keys(tmp_path / "keys") == {"hospitalA": public}
    with pytest.raises(RwftError, match="exists already"):
        create_site_key(tmp_path / "keys", "hospitalA")  # the registered key must not change under the server
    with pytest.raises(RwftError, match=r"not an unencrypted OpenSSH EC private key. Pass the NAME.key .* \(not the .pub file\)"):
        check_site_private_key(public)
    with pytest.raises(RwftError, match="never a path|letters"):
        create_site_key(tmp_path / "keys", "../escape")


def test_a_bad_site_keys_folder_says_what_to_do(tmp_path):
    with pytest.raises(RwftError, match="no such folder"):
        site_public_keys(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(RwftError, match="no .pub files"):
        site_public_keys(tmp_path / "empty")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "hospitalB.pub").write_text("ssh-rsa AAAA not-ec\n")
    with pytest.raises(RwftError, match="hospitalB.pub: not an OpenSSH EC public key"):
        site_public_keys(tmp_path / "bad")


@pytest.mark.integration
@pytest.mark.timeout(180)
def test_the_registered_sites_follow_the_key_folder_across_restarts(tmp_path):
    """Keys added are registered, keys removed are revoked, and a restart (--resume) registers nothing twice."""
    certificates = FederationCertificates.in_folder(create_certificates(tmp_path / "certs", []))
    keys = tmp_path / "keys"
    for site in ("hospitalA", "hospitalB"):
        create_site_key(keys, site)
    address = f"127.0.0.1:{free_port()}"
    run_dir = tmp_path / "run"

    def admitted_after_start() -> tuple[list[str], dict[str, str]]:
        superlink = start_superlink(run_dir, address, certificates=certificates, site_auth=True)
        try:
            flwr = FlowerCli(run_dir, superlink.control_address, certificates.ca)
            names = admit_sites(flwr, site_public_keys(keys), run_dir)
            return names, {node["node-id"]: node["status"] for node in flwr.nodes()}
        finally:
            superlink.stop()

    names, nodes = admitted_after_start()
    assert names == ["hospitalA", "hospitalB"] and sorted(nodes.values()) == ["registered", "registered"]
    node_of = {name: str(entry["node_id"])
               for name, entry in json.loads((run_dir / "superlink" / "site_keys.json").read_text()).items()}
    assert set(node_of.values()) == set(nodes)
    names, again = admitted_after_start()  # a restart: the SuperLink's database already has both
    assert names == ["hospitalA", "hospitalB"] and again == nodes
    (keys / "hospitalB.pub").unlink()  # the coordinator revokes hospitalB
    names, after = admitted_after_start()
    assert names == ["hospitalA"] and after[node_of["hospitalA"]] == "registered"
    assert after.get(node_of["hospitalB"]) in (None, "unregistered"), after


@pytest.mark.integration
@pytest.mark.timeout(400)
def test_connection_problems_are_told_apart(tmp_path, pneumoniamnist_npz):
    """Host name, CA, TLS or not, wrong port: each says what is wrong, and a site that keeps
    retrying says why after a few tries instead of waiting in silence."""
    from rwft.federation.tls import diagnose_connection

    folder = create_certificates(tmp_path / "certs", [])  # valid for localhost and 127.0.0.1 only
    other_ca = create_certificates(tmp_path / "other", []) / "ca.crt"
    ca = folder / "ca.crt"
    tls_port, plain_port = free_port("127.0.0.2"), free_port()
    secure = start_superlink(tmp_path / "run1", f"127.0.0.2:{tls_port}",
                             certificates=FederationCertificates.in_folder(folder))
    plain = start_superlink(tmp_path / "run2", f"127.0.0.1:{plain_port}")
    clients = []
    try:
        assert "valid for localhost, 127.0.0.1, not for 127.0.0.2" in diagnose_connection("127.0.0.2", tls_port, ca)
        assert "did not sign" in diagnose_connection("127.0.0.2", tls_port, other_ca)
        assert "speaks TLS and this site dialled it without" in diagnose_connection("127.0.0.2", tls_port, None)
        assert "does not speak TLS" in diagnose_connection("127.0.0.1", plain_port, ca)
        assert f"nothing accepts connections at 127.0.0.1:{tls_port}" in diagnose_connection("127.0.0.1", tls_port, ca)
        assert diagnose_connection("127.0.0.1", plain_port, None) is None
        data = make_site_files(pneumoniamnist_npz, 2, tmp_path / "data")[0]
        # The certificate is not for the name dialled: not "did not sign".
        clients.append(misnamed := join("misnamed", f"127.0.0.2:{tls_port}", data, tmp_path / "misnamed",
                                        extra=["--root-certificates", str(ca)]))
        assert misnamed.wait(timeout=180) == 2, misnamed.text()[-3000:]
        assert "certificate is valid for localhost, 127.0.0.1, not for 127.0.0.2" in misnamed.text()
        assert "did not sign" not in misnamed.text()
        # A plain-text site against a TLS server: it is told after a few tries.
        clients.append(plaintext := join("plaintext", f"127.0.0.2:{tls_port}", data, tmp_path / "plaintext",
                                         extra=["--insecure"]))
        wait_for(lambda: "speaks TLS and this site dialled it without" in plaintext.text(), 180,
                 "the plain-text site to be told")
        # A wrong port: told, too.
        clients.append(lost := join("lost", f"127.0.0.1:{free_port()}", data, tmp_path / "lost"))
        wait_for(lambda: "cannot join yet after" in lost.text(), 180, "the site on a wrong port to be told")
        assert "nothing accepts connections" in lost.text()
    finally:
        for client in clients:
            client.stop()
        secure.stop()
        plain.stop()


def test_a_site_needs_the_ca_to_join_another_machine(tmp_path, capsys):
    from rwft.clients.cli import main as client_main

    (tmp_path / "NORMAL").mkdir()
    code = client_main(["join", "--site", "hospitalA", "--server", "coordinator.example.org:9092",
                        "--data", str(tmp_path), "--workdir", str(tmp_path / "work")])
    assert code == 2
    err = capsys.readouterr().err
    assert "join it over TLS with --root-certificates ca.crt" in err and "RUN_DIR/certs/ca.crt" in err
    assert not (tmp_path / "work").exists()
