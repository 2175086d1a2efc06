"""A SuperLink for one federation, and the ``flwr`` commands that talk to it.

Everything about it lives in the run directory, private to this user: ``superlink/state.db``
(Flower's persistent state), ``superlink/superlink.log``, ``superlink/gateway.log``,
``superlink/control-address`` (where its Control API listens, on loopback only),
``flower-home/config.toml`` (the ``FLWR_HOME`` with the one connection, ``rwft``, that the
``flwr`` commands use) and ``flower-app/pyproject.toml`` (the Flower app: rwft's installed
ServerApp and ClientApp, and this run's config without the coordinator's paths). The sites
reach it only through ``rwft.server.gateway`` (Fleet API only). Talking to it goes through
the public ``flwr`` CLI with ``--format json``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import tomli_w

from rwft.core.config import RwftConfig
from rwft.core.errors import RwftError
from rwft.federation.processes import PRIVATE_UMASK, ChildProcess, flower_env, free_port, private_dir, split_address
from rwft.federation.tls import FederationCertificates

CONNECTION = "rwft"
STARTUP_TIMEOUT_S = 120.0  # the SuperLink imports Flower and opens its database
LOOPBACK = "127.0.0.1"
CONTROL_ADDRESS_FILE = "control-address"  # where rwft-server status finds the running SuperLink
SERVER_CONFIG_ENV = "RWFT_SERVER_RUN_CONFIG"
SERVER_CONFIG_FILE = "server-run-config.yaml"
COORDINATOR_PATHS = ("data.root", "data.cache_dir", "federation.certificates", "federation.site_keys")


def run_to_the_end(prog: str, superlink: SuperLink, flwr: FlowerCli, run_config: dict[str, Any], cfg: RwftConfig,
                   *, resume_command: str, federation_config: Sequence[str] = ()) -> int:
    """Submit the federation's run, stream its log here, stop ``superlink``, and say how it ended.

    What ``rwft-server start`` and ``rwft simulate`` share once their SuperLink is up; 0 when
    the run completed, 1 otherwise (the log above says why; ``resume_command`` continues it).
    With real sites (not simulated), the app they receive carries no coordinator paths
    (``sites_run_config``).
    """
    run_dir = Path(cfg.output_dir)
    try:
        from rwft.federation.protocol import RUN_CONFIG_KEY

        (run_dir / "superlink" / SERVER_CONFIG_FILE).write_text(str(run_config[RUN_CONFIG_KEY]))
        shipped = run_config if superlink.gateway is None else sites_run_config(run_config)
        run_id = flwr.submit(write_flower_app(run_dir / "flower-app", shipped), federation_config)
        print(f"{prog}: run {run_id}: {cfg.federation.rounds} rounds of {cfg.federation.strategy}", flush=True)
        flwr.stream_logs(run_id)
        status = flwr.run_status(run_id)
    except KeyboardInterrupt:
        print(f"\n{prog}: stopped. Continue with: {resume_command}", file=sys.stderr)
        raise
    finally:
        superlink.stop()
    if status != "finished:completed":
        print(f"{prog}: the run ended as {status}; its log is above and in {run_dir / 'superlink'}. "
              f"Continue it with: {resume_command}", file=sys.stderr)
        return 1
    print(f"{prog}: done.\n  global model: {run_dir / 'model.pt'}  (rwft evaluate {run_dir / 'model.pt'})\n"
          f"  metrics:      {run_dir / 'metrics.json'}\n"
          f"  TensorBoard:  tensorboard --logdir {run_dir}")
    return 0


def sites_run_config(run_config: dict[str, Any]) -> dict[str, Any]:
    """``run_config`` without the coordinator's file paths: what the Flower app sent to every site carries.

    The sites read their own data (``data.root``, ``data.cache_dir`` are theirs); the ServerApp
    reads the full config from ``RUN_DIR/superlink/server-run-config.yaml`` instead
    (``server_run_config``; ``start_superlink`` tells it where through ``SERVER_CONFIG_ENV``).
    """
    from omegaconf import OmegaConf

    from rwft.federation.protocol import RUN_CONFIG_KEY

    raw = OmegaConf.create(str(run_config[RUN_CONFIG_KEY]))
    for key in COORDINATOR_PATHS:
        OmegaConf.update(raw, key, None, merge=False)
    OmegaConf.update(raw, "output_dir", "coordinator", merge=False)
    return {**run_config, RUN_CONFIG_KEY: OmegaConf.to_yaml(raw)}


def server_run_config(run_config: Mapping[str, Any]) -> Mapping[str, Any]:
    """The ServerApp's run config: the coordinator's full one when it was started by ``rwft-server``."""
    from rwft.federation.protocol import RUN_CONFIG_KEY

    file = os.environ.get(SERVER_CONFIG_ENV)
    if not file or not Path(file).is_file():
        return run_config
    return {**run_config, RUN_CONFIG_KEY: Path(file).read_text()}


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


class SuperLink:
    """A running SuperLink: ``control_address`` (loopback, for the coordinator's ``flwr``
    commands) and, for real sites, the gateway serving ``federation.address``."""

    def __init__(self, process: ChildProcess, control_address: str, gateway: ChildProcess | None) -> None:
        self.process = process
        self.control_address = control_address
        self.gateway = gateway

    def stop(self) -> None:
        if self.gateway is not None:
            self.gateway.stop()
        self.process.stop()


def start_superlink(run_dir: Path, address: str, *, simulation: bool = False,
                    certificates: FederationCertificates | None = None, site_auth: bool = False) -> SuperLink:
    """Start ``flower-superlink`` for ``run_dir``; returns once the sites can connect to ``address``.

    The SuperLink itself listens on a loopback port only (``SuperLink.control_address``): its
    Control API must never be reachable by the sites (``rwft.server.gateway``). Unless
    ``simulation`` (no sites connect), the gateway serves ``address`` with the Fleet API alone.
    With ``certificates`` both serve TLS only (``rwft.federation.tls``); without, plain HTTP. With
    ``site_auth`` the SuperLink admits only SuperNodes whose keys were registered
    (``FlowerCli.register_site``, ``rwft.federation.site_keys``). Everything they write is
    private to this user (``PRIVATE_UMASK``).
    """
    host, port = split_address(address)
    control_port = port if simulation else free_port(LOOPBACK)
    control_address = f"{LOOPBACK}:{control_port}"
    superlink_dir = run_dir / "superlink"
    private_dir(superlink_dir)
    if certificates is None:
        transport = ["--insecure"]
    else:
        transport = ["--ssl-ca-certfile", str(certificates.ca), "--ssl-certfile", str(certificates.certificate),
                     "--ssl-keyfile", str(certificates.key)]
    if site_auth:
        transport.append("--enable-supernode-auth")
    command = [str(Path(sys.executable).parent / "flower-superlink"), *transport,
               "--database", str(superlink_dir / "state.db"),
               "--disable-runtime-dependency-installation", "--host", LOOPBACK, "--port", str(control_port)]
    if simulation:
        command.append("--simulation")
    env = flower_env(run_dir / "flower-home")
    env[SERVER_CONFIG_ENV] = str(superlink_dir / SERVER_CONFIG_FILE)  # the ServerApp's own config (server_run_config)
    if simulation:  # every simulated site's output line, and no Ray warning about GPUs it will not use
        env |= {"RAY_DEDUP_LOGS": "0", "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0"}
    process = ChildProcess("the SuperLink", command, env=env, log_file=superlink_dir / "superlink.log",
                           cwd=run_dir, umask=PRIVATE_UMASK)
    gateway = None
    try:
        process.wait_for_port(LOOPBACK, control_port, STARTUP_TIMEOUT_S)
        (superlink_dir / CONTROL_ADDRESS_FILE).write_text(json.dumps(
            {"address": control_address, "ca": str(certificates.ca) if certificates else None}) + "\n")
        if not simulation:
            scheme = "http" if certificates is None else "https"
            gateway_command = [sys.executable, "-m", "rwft.server.gateway", "--listen", address,
                               "--upstream", f"{scheme}://{control_address}"]
            if certificates is not None:
                gateway_command += ["--certfile", str(certificates.certificate), "--keyfile", str(certificates.key),
                                    "--upstream-ca", str(certificates.ca)]
            gateway = ChildProcess("the sites' gateway", gateway_command, env=env,
                                   log_file=superlink_dir / "gateway.log", cwd=run_dir, umask=PRIVATE_UMASK)
            gateway.wait_for_port(host, port, STARTUP_TIMEOUT_S)
    except RuntimeError as exc:
        if gateway is not None:
            gateway.stop()
        process.stop()
        raise RwftError(f"{exc}\nIs port {port} in use? Choose another with federation.address=HOST:PORT.") from None
    return SuperLink(process, control_address, gateway)


def control_address_of(run_dir: Path) -> tuple[str, Path | None] | None:
    """The loopback address of the SuperLink ``run_dir``'s federation last started, and the CA
    its TLS certificate is checked with (None: plain HTTP); None if it never started."""
    file = run_dir / "superlink" / CONTROL_ADDRESS_FILE
    if not file.is_file():
        return None
    entry = json.loads(file.read_text())
    return str(entry["address"]), Path(entry["ca"]) if entry.get("ca") else None


class FlowerCli:
    """The ``flwr`` commands, against the SuperLink's Control API at ``control_address`` (loopback).

    Constructing one writes nothing: the ``FLWR_HOME`` (``home``, default ``RUN_DIR/flower-home``)
    with its one connection is written before the first command.
    """

    def __init__(self, run_dir: Path, control_address: str, ca: Path | None = None,
                 *, home: Path | None = None) -> None:
        self.run_dir = run_dir
        self.home = home or run_dir / "flower-home"
        host, port = split_address(control_address)
        # The CLI connects locally even when the SuperLink serves every interface.
        local = LOOPBACK if host in ("0.0.0.0", "") else host
        self._connection: dict[str, Any] = {"address": f"{local}:{port}"}
        if ca is None:
            self._connection["insecure"] = True
        else:
            self._connection["root-certificates"] = str(ca)
        self.env = flower_env(self.home)

    def _write_home(self) -> None:
        config = {"superlink": {"default": CONNECTION, CONNECTION: self._connection}}
        private_dir(self.home)
        (self.home / "config.toml").write_bytes(tomli_w.dumps(config).encode())
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
        self._write_home()
        subprocess.call([self._flwr, "log", str(run_id), CONNECTION, "--stream"], env=self.env, cwd=self.run_dir)

    def run_status(self, run_id: int) -> str:
        """``"running"``, ``"finished:completed"``, ``"finished:failed"``, ..."""
        return str(self._json(["ls", "--run-id", str(run_id), CONNECTION, "--format", "json"])["runs"][0]["status"])

    @property
    def _flwr(self) -> str:
        return str(Path(sys.executable).parent / "flwr")

    def _json(self, args: list[str]) -> dict[str, Any]:
        self._write_home()
        done = subprocess.run([self._flwr, *args], env=self.env, cwd=self.run_dir, capture_output=True, text=True)
        try:
            answer = json.loads(done.stdout[done.stdout.index("{"):])
        except ValueError:
            answer = {}
        if done.returncode != 0 or not answer.get("success", False):
            detail = answer.get("error-message") or done.stderr.strip() or done.stdout.strip()
            raise RwftError(f"`flwr {' '.join(args)}` failed: {detail}")
        return answer
