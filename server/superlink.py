"""A SuperLink for one federation, and the ``flwr`` commands that talk to it.

Everything about it lives in the run directory: ``superlink/state.db`` (Flower's
persistent state), ``superlink/superlink.log``, ``flower-home/config.toml`` (the
``FLWR_HOME`` with the one connection, ``rwft``, that the ``flwr`` commands use) and
``flower-app/pyproject.toml`` (the Flower app: rwft's installed ServerApp and ClientApp,
and this run's config). Talking to it goes through the public ``flwr`` CLI with
``--format json``.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import tomli_w

from rwft.core.errors import RwftError
from rwft.federation.processes import ChildProcess, flower_env, split_address
from rwft.federation.tls import FederationCertificates

CONNECTION = "rwft"
STARTUP_TIMEOUT_S = 120.0  # the SuperLink imports Flower and opens its database


def write_flower_app(app_dir: Path, run_config: dict[str, Any]) -> Path:
    """A Flower app directory whose components are rwft's installed apps, configured by ``run_config``."""
    app_dir.mkdir(parents=True, exist_ok=True)
    pyproject = {
        "build-system": {"requires": ["setuptools"], "build-backend": "setuptools.build_meta"},
        "project": {"name": "rwft-federation", "version": "1.0.0", "license": "Apache-2.0",
                    "description": "rwft: federated fine-tuning on chest X-rays (apps from the installed rwft)",
                    "dependencies": ["rwft"]},
        "tool": {"flwr": {"app": {"publisher": "rwft",
                                  "components": {"serverapp": "rwft.server.app:app",
                                                 "clientapp": "rwft.clients.app:app"},
                                  "config": run_config}}},
    }
    (app_dir / "pyproject.toml").write_bytes(tomli_w.dumps(pyproject).encode())
    return app_dir


def start_superlink(run_dir: Path, address: str, *, simulation: bool = False,
                    certificates: FederationCertificates | None = None, site_auth: bool = False) -> ChildProcess:
    """Start ``flower-superlink`` for ``run_dir`` serving ``address``; returns once it accepts connections.

    With ``certificates`` it serves TLS only (``rwft.federation.tls``); without, plain HTTP. With
    ``site_auth`` it admits only SuperNodes whose keys were registered
    (``FlowerCli.register_site``, ``rwft.federation.site_keys``).
    """
    host, port = split_address(address)
    (run_dir / "superlink").mkdir(parents=True, exist_ok=True)
    if certificates is None:
        transport = ["--insecure"]
    else:
        transport = ["--ssl-ca-certfile", str(certificates.ca), "--ssl-certfile", str(certificates.certificate),
                     "--ssl-keyfile", str(certificates.key)]
    if site_auth:
        transport.append("--enable-supernode-auth")
    command = [str(Path(sys.executable).parent / "flower-superlink"), *transport,
               "--database", str(run_dir / "superlink" / "state.db"),
               "--disable-runtime-dependency-installation", "--host", host, "--port", str(port)]
    if simulation:
        command.append("--simulation")
    env = FlowerCli(run_dir, address, certificates).env
    if simulation:  # every simulated site's output line, and no Ray warning about GPUs it will not use
        env |= {"RAY_DEDUP_LOGS": "0", "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0"}
    process = ChildProcess("the SuperLink", command, env=env,
                           log_file=run_dir / "superlink" / "superlink.log", cwd=run_dir)
    try:
        process.wait_for_port(host, port, STARTUP_TIMEOUT_S)
    except RuntimeError as exc:
        process.stop()
        raise RwftError(f"{exc}\nIs port {port} in use? Choose another with federation.address=HOST:PORT.") from None
    return process


class FlowerCli:
    """The ``flwr`` commands, against the SuperLink of ``run_dir`` at ``address``."""

    def __init__(self, run_dir: Path, address: str, certificates: FederationCertificates | None = None) -> None:
        self.run_dir = run_dir
        host, port = split_address(address)
        flwr_home = run_dir / "flower-home"
        flwr_home.mkdir(parents=True, exist_ok=True)
        # The CLI connects locally even when the SuperLink serves every interface.
        local = "127.0.0.1" if host in ("0.0.0.0", "") else host
        connection: dict[str, Any] = {"address": f"{local}:{port}"}
        if certificates is None:
            connection["insecure"] = True
        else:
            connection["root-certificates"] = str(certificates.ca)
        config = {"superlink": {"default": CONNECTION, CONNECTION: connection}}
        (flwr_home / "config.toml").write_bytes(tomli_w.dumps(config).encode())
        self.env = flower_env(flwr_home)

    def nodes(self) -> list[dict[str, Any]]:
        """Every SuperNode the SuperLink knows: ``node-id``, ``status`` (online, offline, registered, ...)."""
        return list(self._json(["supernode", "list", CONNECTION, "--format", "json"])["nodes"])

    def node_ids(self) -> list[int]:
        """The SuperNodes (sites) currently online."""
        return [int(node["node-id"]) for node in self.nodes() if node.get("status") == "online"]

    def register_site(self, public_key: Path, name: str) -> int:
        """Admit the SuperNode holding the private half of ``public_key``; returns its node id."""
        return int(self._json(["supernode", "register", str(public_key), CONNECTION, "--name", name,
                               "--format", "json"])["node-id"])

    def unregister_site(self, node_id: int) -> None:
        """Revoke a registered SuperNode: it can no longer connect."""
        self._json(["supernode", "unregister", str(node_id), CONNECTION, "--format", "json"])

    def submit(self, app_dir: Path, federation_config: Sequence[str] = ()) -> int:
        """Start a run of the app in ``app_dir``; returns its run id."""
        args = ["run", str(app_dir), CONNECTION, "--format", "json"]
        for item in federation_config:
            args += ["--federation-config", item]
        return int(self._json(args)["run-id"])

    def stream_logs(self, run_id: int) -> None:
        """Print the run's logs on this terminal until the run finishes."""
        subprocess.call([self._flwr, "log", str(run_id), CONNECTION, "--stream"], env=self.env, cwd=self.run_dir)

    def run_status(self, run_id: int) -> str:
        """``"running"``, ``"finished:completed"``, ``"finished:failed"``, ..."""
        return str(self._json(["ls", "--run-id", str(run_id), CONNECTION, "--format", "json"])["runs"][0]["status"])

    @property
    def _flwr(self) -> str:
        return str(Path(sys.executable).parent / "flwr")

    def _json(self, args: list[str]) -> dict[str, Any]:
        done = subprocess.run([self._flwr, *args], env=self.env, cwd=self.run_dir, capture_output=True, text=True)
        try:
            answer = json.loads(done.stdout[done.stdout.index("{"):])
        except ValueError:
            answer = {}
        if done.returncode != 0 or not answer.get("success", False):
            detail = answer.get("error-message") or done.stderr.strip() or done.stdout.strip()
            raise RwftError(f"`flwr {' '.join(args)}` failed: {detail}")
        return answer
