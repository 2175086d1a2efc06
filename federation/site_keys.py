"""Site keys: which hospitals may join a federation (Flower's SuperNode authentication).

TLS (``rwft.federation.tls``) proves the server to the sites. Site keys prove the sites to the
server: each hospital makes a key pair once with ``rwft-client keygen --site NAME``,
keeps ``NAME.key`` and sends ``NAME.pub`` (public) to the coordinator, who puts the
``.pub`` files of every admitted hospital in one folder and serves with
``federation.site_keys=FOLDER``. The SuperLink then admits only SuperNodes that sign
their requests with a registered key; any other is turned away before it receives a
model. Keys are ECDSA P-384 in OpenSSH format, what Flower's ``flwr supernode register``
and ``flower-supernode --auth-supernode-private-key`` read; made with ``cryptography``.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path
from typing import BinaryIO

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from rwft.core.errors import RwftError
from rwft.federation.protocol import check_site_label


def create_site_key(folder: str | os.PathLike[str], site: str) -> tuple[Path, Path]:
    """Write ``SITE.key`` (private, mode 0600) and ``SITE.pub`` into ``folder``; returns both paths."""
    label = check_site_label(site)
    root = Path(folder).expanduser().resolve()
    private, public = root / f"{label}.key", root / f"{label}.pub"
    if private.exists() or public.exists():
        raise RwftError(f"{private if private.exists() else public} exists already: the coordinator may have "
                        "registered its public key. Keep it, or choose another folder.")
    root.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP384R1())
    descriptor = os.open(private, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "wb") as handle:
        handle.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                       serialization.NoEncryption()))
    comment = f" rwft-site-{label}".encode()
    public.write_bytes(key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                                     serialization.PublicFormat.OpenSSH) + comment + b"\n")
    return private, public


def check_site_private_key(path: str | os.PathLike[str]) -> Path:
    """``path`` as a site's private key Flower can sign with (what ``--auth-key`` takes)."""
    file = Path(path).expanduser().resolve()
    try:
        key = serialization.load_ssh_private_key(file.read_bytes(), password=None)
    except OSError as exc:
        raise RwftError(f"--auth-key {path}: cannot read it ({exc.strerror}). Make a key pair with "
                        "`rwft-client keygen --site NAME`.") from None
    except (ValueError, TypeError, UnsupportedAlgorithm):
        key = None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise RwftError(f"--auth-key {path}: not an unencrypted OpenSSH EC private key. Pass the NAME.key that "
                        "`rwft-client keygen` wrote (not the .pub file).")
    return file


def hold_site_key(path: Path) -> BinaryIO:
    """An exclusive lock on the private key ``path`` for as long as the returned handle is open.

    A SuperLink refuses a key that another SuperNode holds with the same answer as a key it
    never registered; a site started twice on one machine is the usual cause, and this says so
    instead, before anything connects.
    """
    handle = open(path, "rb")  # noqa: SIM115 - held open by the caller: the lock lives as long as the handle
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        raise RwftError(f"--auth-key {path} is in use by another rwft-client on this machine (this site started "
                        "twice?). Stop that one first; every site joins with its own key.") from None
    return handle


def site_public_keys(folder: str | os.PathLike[str]) -> dict[str, Path]:
    """The admitted sites' public keys in ``folder`` (``NAME.pub``), each checked; by file stem."""
    root = Path(folder).expanduser().resolve()
    if not root.is_dir():
        raise RwftError(f"federation.site_keys={folder}: no such folder. Put each admitted hospital's NAME.pub "
                        "(from `rwft-client keygen --site NAME`) in one folder and point site_keys at it.")
    keys = {path.stem: path for path in sorted(root.glob("*.pub"))}
    if not keys:
        raise RwftError(f"federation.site_keys={folder}: no .pub files in {root}, so no site could join. Ask each "
                        "hospital for the NAME.pub that `rwft-client keygen --site NAME` wrote.")
    for path in keys.values():
        try:
            key = serialization.load_ssh_public_key(path.read_bytes())
        except (ValueError, UnsupportedAlgorithm):
            key = None
        if not isinstance(key, ec.EllipticCurvePublicKey):
            raise RwftError(f"{path}: not an OpenSSH EC public key (one line starting with ecdsa-sha2-). Ask that "
                            "hospital for the .pub file `rwft-client keygen` wrote, or remove it from the folder.")
    return keys
