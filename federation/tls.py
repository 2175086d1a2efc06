"""TLS for a federation: a private certificate authority and the SuperLink's certificate.

A federation's traffic (global models out, site updates back) crosses hospital networks,
so it should be encrypted and each site should know it talks to the real server. The
coordinator makes, once, with ``rwft-server certs --out DIR --host NAME``:

- ``ca.crt``: the federation's own certificate authority. Every hospital gets this file
  (it is public) and joins with ``rwft-client join --root-certificates ca.crt``.
- ``ca.key``: the authority's private key; it signs the server certificate and never
  leaves the coordinator.
- ``server.crt`` / ``server.key``: the SuperLink's certificate, valid for the host names
  and IP addresses the sites dial (plus ``localhost`` and ``127.0.0.1``, which the
  server's own ServerApp and ``flwr`` commands use), and its private key.

``rwft-server start ... federation.certificates=DIR`` then serves TLS only. Keys are
written with mode 0600. The keys are ECDSA P-256 (what browsers and gRPC/HTTP stacks
accept everywhere); made with ``cryptography``, not by hand.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import socket
import ssl
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from rwft.core.checkpoint import atomic_write_bytes
from rwft.core.errors import RwftError

LOCAL_NAMES = ("localhost", "127.0.0.1")  # the ServerApp and flwr reach the SuperLink locally
VALID_DAYS = 825  # the longest validity common TLS clients accept for a server certificate


@dataclass(frozen=True)
class FederationCertificates:
    """The files ``rwft-server start`` needs from a certificates folder."""

    ca: Path
    certificate: Path
    key: Path

    @classmethod
    def in_folder(cls, folder: str | os.PathLike[str]) -> FederationCertificates:
        """The three files in ``folder``; ``RwftError`` naming what is missing and how to make it."""
        root = Path(folder).expanduser().resolve()
        found = cls(root / "ca.crt", root / "server.crt", root / "server.key")
        missing = [path.name for path in (found.ca, found.certificate, found.key) if not path.is_file()]
        if missing:
            raise RwftError(f"federation.certificates={folder}: {', '.join(missing)} missing in {root}. "
                            "Make them with: rwft-server certs --out DIR --host SERVER_NAME")
        return found


def create_certificates(folder: str | os.PathLike[str], hosts: list[str], *, overwrite: bool = False) -> Path:
    """Write a new CA and a server certificate for ``hosts`` into ``folder``; returns the folder."""
    root = Path(folder).expanduser().resolve()
    existing = [name for name in ("ca.crt", "ca.key", "server.crt", "server.key") if (root / name).exists()]
    if existing and not overwrite:
        raise RwftError(f"{root} already holds {', '.join(existing)}: sites trusting that ca.crt would be locked "
                        "out by a new one. Use another folder, or pass --overwrite to replace them.")
    root.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "rwft federation CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name).issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))  # tolerate clocks a little behind
        .not_valid_after(now + datetime.timedelta(days=VALID_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                     content_commitment=False, key_encipherment=False, data_encipherment=False,
                                     key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    server_key = ec.generate_private_key(ec.SECP256R1())
    names = list(dict.fromkeys([*hosts, *LOCAL_NAMES]))
    server = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])]))
        .issuer_name(ca_name)
        .public_key(server_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=VALID_DAYS))
        .add_extension(x509.SubjectAlternativeName([_general_name(name) for name in names]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    _write(root / "ca.key", _private_pem(ca_key), secret=True)
    _write(root / "server.key", _private_pem(server_key), secret=True)
    _write(root / "ca.crt", ca.public_bytes(serialization.Encoding.PEM))
    _write(root / "server.crt", server.public_bytes(serialization.Encoding.PEM))
    return root


def check_root_certificate(path: str | os.PathLike[str]) -> Path:
    """``path`` as a readable PEM certificate (what a site passes as ``--root-certificates``)."""
    file = Path(path).expanduser().resolve()
    try:
        x509.load_pem_x509_certificate(file.read_bytes())
    except OSError as exc:
        raise RwftError(f"--root-certificates {path}: cannot read it ({exc.strerror}). Ask the federation's "
                        "coordinator for its ca.crt.") from None
    except ValueError:
        raise RwftError(f"--root-certificates {path}: not a PEM certificate. Pass the federation's ca.crt "
                        "(the file starting with -----BEGIN CERTIFICATE-----), not a key.") from None
    return file


def fingerprint(certificate: str | os.PathLike[str]) -> str:
    """The SHA-256 fingerprint of a PEM certificate, as ``AB:CD:...``: what a site compares,
    over the phone or a second channel, before it trusts a ``ca.crt`` it received."""
    cert = x509.load_pem_x509_certificate(Path(certificate).read_bytes())
    return cert.fingerprint(hashes.SHA256()).hex(":").upper()


def diagnose_connection(host: str, port: int, ca: Path | None, *, timeout_s: float = 10.0) -> str | None:
    """Why a site cannot talk to the server at ``host:port`` with ``ca`` (None: plain HTTP), in
    one sentence for its operator; None when TCP and TLS both work as configured.

    It opens a connection of its own, so each cause is told apart: nothing listening (wrong
    port, server down), a TLS server dialled in plain text or the reverse, a certificate for
    other host names, a certificate another CA signed.
    """
    where = f"{host}:{port}"
    try:
        sock = socket.create_connection((host, port), timeout=timeout_s)
    except OSError as exc:
        return (f"nothing accepts connections at {where} ({exc.strerror or exc}): check the address and port, "
                "and that the federation's server is running")
    with sock:
        context = ssl.create_default_context(cafile=str(ca)) if ca else ssl._create_unverified_context()
        try:
            context.wrap_socket(sock, server_hostname=host).close()
        except ssl.SSLCertVerificationError as exc:
            if exc.verify_code in (62, 64):  # X509_V_ERR_HOSTNAME_MISMATCH, X509_V_ERR_IP_ADDRESS_MISMATCH
                names = ", ".join(_certificate_names(host, port, timeout_s)) or "other names"
                return (f"the server's certificate is valid for {names}, not for {host}: dial one of those names, or "
                        f"ask the coordinator to make the certificate for {host} (rwft-server start --host {host})")
            return (f"the server at {where} presented a certificate that {ca} did not sign ({exc.verify_message}): "
                    "ask the federation's coordinator for its current ca.crt")
        except (TimeoutError, ssl.SSLError, ConnectionError):
            return (f"the server at {where} does not speak TLS: leave out --root-certificates (only on one machine "
                    "or inside a VPN), or ask its coordinator to serve TLS") if ca else None
    if ca is None:
        return (f"the server at {where} speaks TLS and this site dialled it without: join with "
                "--root-certificates ca.crt (the coordinator's rwft-server start printed where it is)")
    return None


def _certificate_names(host: str, port: int, timeout_s: float) -> list[str]:
    """The host names and addresses in the certificate the server at ``host:port`` presents."""
    try:
        with socket.create_connection((host, port), timeout=timeout_s) as sock, \
                ssl._create_unverified_context().wrap_socket(sock, server_hostname=host) as tls:
            der = tls.getpeercert(binary_form=True)
        names = x509.load_der_x509_certificate(der).extensions.get_extension_for_class(x509.SubjectAlternativeName)
    except (OSError, ValueError, x509.ExtensionNotFound):
        return []
    return [str(name) for name in names.value.get_values_for_type(x509.DNSName)] + \
        [str(address) for address in names.value.get_values_for_type(x509.IPAddress)]


def is_loopback(host: str) -> bool:
    """Whether ``host`` can be reached only from this machine (127.0.0.0/8, ::1, localhost)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _general_name(name: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(name))
    except ValueError:
        return x509.DNSName(name)


def _private_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _write(path: Path, content: bytes, *, secret: bool = False) -> None:
    """Write ``content`` atomically; the temporary file is created 0600, so a secret is never
    readable by others, even briefly, and a public file is opened up once complete."""
    atomic_write_bytes(path, lambda handle: handle.write(content))
    if not secret:
        os.chmod(path, 0o644)
