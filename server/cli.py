"""``rwft-server``: run the coordinating side of a federation.

``rwft-server start --config EXP.yaml [key=value ...]`` starts a SuperLink for the
federation (its state in the run directory, its Control API on a loopback port only, the
sites served on ``federation.address`` through ``rwft.server.gateway``), submits the run,
whose ServerApp waits for ``federation.min_sites`` (at most ``federation.wait_timeout_s``),
streams its progress and says where the model, the metrics and the TensorBoard logs
are. ``--resume RUN_DIR`` continues a federation after its last completed round, for
example after a crash.

Secure by default: the sites are served TLS only, with ``federation.certificates`` or,
without it, with a CA and server certificate made on first start in ``RUN_DIR/certs``
(for the host of ``federation.address`` and every ``--host``; reused on ``--resume``;
its fingerprint is printed for the sites to check). Plain HTTP is served only on a
loopback address, or anywhere with an explicit ``--insecure``.
``federation.site_keys=KEYS`` admits only the hospitals whose public key is in KEYS
(``rwft.federation.site_keys``, ``rwft.server.admission``).

``rwft-server status [RUN_DIR] [--json]`` shows the rounds completed and the sites online;
it writes nothing.

``rwft-server certs --out DIR --host NAME`` makes the federation's TLS certificates
(``rwft.federation.tls``) ahead of time, for ``federation.certificates=DIR``.

Ctrl-C stops the run and the SuperLink; continue later with ``--resume``.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from rwft.core.config import RwftConfig, load_config
from rwft.core.errors import RwftError
from rwft.federation.processes import PRIVATE_UMASK, port_open, private_dir, run_command, split_address
from rwft.federation.site_keys import site_public_keys
from rwft.federation.tls import FederationCertificates, create_certificates, fingerprint, is_loopback
from rwft.server.admission import admit_sites
from rwft.server.superlink import FlowerCli, control_address_of, run_to_the_end, start_superlink

GENERATED_CERTIFICATES = "certs"  # RUN_DIR/certs: the federation's own CA when none was given


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    return run_command("rwft-server", lambda: args.handler(args))


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rwft-server", description=__doc__.split("\n")[0].replace("``", ""))
    sub = parser.add_subparsers(dest="command", required=True)
    start = sub.add_parser("start", help="start (or resume) a federation and run it to the end")
    start.add_argument("overrides", nargs="*", help="key=value overrides, e.g. federation.rounds=10")
    start.add_argument("--config", metavar="EXP.yaml", help="experiment file (only what differs from the defaults)")
    start.add_argument("--resume", metavar="RUN_DIR", help="continue the federation in RUN_DIR after its last "
                                                          "completed round (its config.yaml, then the overrides)")
    start.add_argument("--host", action="append", default=[], metavar="NAME",
                       help="a host name or IP address the sites dial, for the certificate made when "
                            "federation.certificates is not set (repeat for several)")
    start.add_argument("--insecure", action="store_true",
                       help="serve plain HTTP, even beyond this machine (only inside a VPN you trust)")
    start.set_defaults(handler=_start)
    status = sub.add_parser("status", help="rounds completed and sites online (writes nothing)")
    status.add_argument("run_dir", nargs="?", default="runs/latest", help="the federation's run directory")
    status.add_argument("--json", action="store_true", help="one JSON object, for scripts")
    status.set_defaults(handler=_status)
    certs = sub.add_parser("certs", help="make the federation's TLS certificates (a private CA and the server's)")
    certs.add_argument("--out", required=True, metavar="DIR", help="folder for ca.crt, ca.key, server.crt, server.key")
    certs.add_argument("--host", action="append", default=[], metavar="NAME",
                       help="a host name or IP address the sites dial (repeat for several); localhost is always in")
    certs.add_argument("--overwrite", action="store_true", help="replace certificates already in --out")
    certs.set_defaults(handler=_certs)
    return parser


def _start(args: argparse.Namespace) -> int:
    from rwft.server.launch import load_federation_config, prepare_federation

    os.umask(PRIVATE_UMASK)  # the run directory (models, metrics, state.db, logs) is this user's only
    cfg = load_federation_config(args.config, args.overrides, args.resume)
    # TLS files and site keys are checked before anything is written.
    tls = _transport(cfg, insecure=args.insecure)
    site_keys = site_public_keys(cfg.federation.site_keys) if cfg.federation.site_keys else None
    cfg, run_config = prepare_federation(cfg, resume=args.resume is not None)
    run_dir = private_dir(Path(cfg.output_dir))
    certificates = _generated_certificates(run_dir, cfg, args.host) if tls == "generate" else tls
    superlink = start_superlink(run_dir, cfg.federation.address, certificates=certificates,
                                site_auth=site_keys is not None)
    flwr = FlowerCli(run_dir, superlink.control_address, certificates.ca if certificates else None)
    try:
        print(f"rwft-server: serving the sites on {cfg.federation.address} "
              f"({'TLS' if certificates else 'no TLS'}); the federation is controlled from this machine only "
              f"(SuperLink at {superlink.control_address}, its state in {run_dir / 'superlink'})", flush=True)
        if certificates is not None:
            print(f"rwft-server: every hospital needs {certificates.ca} (public; it joins with "
                  f"--root-certificates ca.crt); CA fingerprint (SHA-256), to check on receipt:\n  "
                  f"{fingerprint(certificates.ca)}", flush=True)
        else:
            print("rwft-server: warning: without TLS, models and metrics cross the network unencrypted and sites "
                  "cannot tell this server from another. Leave out --insecure (rwft-server makes a federation "
                  "CA) or pass federation.certificates=DIR.", file=sys.stderr, flush=True)
        if site_keys is not None:
            admitted = admit_sites(flwr, site_keys, run_dir)
            print(f"rwft-server: admitting only the sites with a key in {cfg.federation.site_keys}: "
                  f"{', '.join(admitted)}", flush=True)
        _how_to_join(cfg, certificates is not None)
    except BaseException:
        superlink.stop()
        raise
    return run_to_the_end("rwft-server", superlink, flwr, run_config, cfg,
                          resume_command=f"rwft-server start --resume {run_dir}")


def _transport(cfg: RwftConfig, *, insecure: bool) -> FederationCertificates | str | None:
    """The certificates to serve with, ``"generate"`` for the federation's own, or None for plain HTTP."""
    federation = cfg.federation
    if federation.certificates:
        return FederationCertificates.in_folder(federation.certificates)
    host, _ = split_address(federation.address)
    if federation.site_keys:
        if insecure:
            # Flower signs site requests only over TLS; a key sent in the clear proves nothing.
            raise RwftError("federation.site_keys needs TLS: leave out --insecure (rwft-server then makes the "
                            "federation's certificates) or pass federation.certificates=DIR.")
        return "generate"
    if insecure or is_loopback(host):
        return None  # only this machine can reach a loopback address
    return "generate"


def _generated_certificates(run_dir: Path, cfg: RwftConfig, hosts: list[str]) -> FederationCertificates:
    """The federation's own CA and server certificate in ``RUN_DIR/certs``, made on first start."""
    folder = run_dir / GENERATED_CERTIFICATES
    if not (folder / "ca.crt").is_file():
        host, _ = split_address(cfg.federation.address)
        names = [*hosts, *([] if host in ("0.0.0.0", "", "::") else [host]), socket.gethostname(), socket.getfqdn()]
        create_certificates(folder, list(dict.fromkeys(names)))
        print(f"rwft-server: made the federation's CA and a server certificate for "
              f"{', '.join(dict.fromkeys([*names, 'localhost', '127.0.0.1']))} in {folder} "
              "(sites must dial one of these names; add others with --host)", flush=True)
    return FederationCertificates.in_folder(folder)


def _certs(args: argparse.Namespace) -> int:
    folder = create_certificates(args.out, args.host, overwrite=args.overwrite)
    names = ", ".join([*args.host, "localhost", "127.0.0.1"])
    print(f"rwft-server: TLS certificates for {names} in {folder}\n"
          f"  give every hospital:  {folder / 'ca.crt'}  (public; they join with --root-certificates ca.crt)\n"
          f"  CA fingerprint:       {fingerprint(folder / 'ca.crt')}\n"
          f"  keep on this server:  {folder / 'ca.key'}, {folder / 'server.key'}  (private, mode 0600)\n"
          f"  serve with:           rwft-server start ... federation.certificates={folder}")
    return 0


def _how_to_join(cfg: RwftConfig, tls: bool) -> None:
    """Tell the coordinator what each hospital runs; the ServerApp then waits for them (``rwft.server.rounds``)."""
    federation = cfg.federation
    host, port = split_address(federation.address)
    reachable_as = f"{'SERVER_HOST' if host in ('0.0.0.0', '') else host}:{port}"
    flags = " --root-certificates ca.crt" if tls else ""
    flags += " --auth-key NAME.key" if federation.site_keys else ""
    print(f"rwft-server: waiting for {federation.min_sites} site(s), at most {federation.wait_timeout_s:.0f} s. "
          f"Each hospital runs:\n  rwft-client join --site NAME --server {reachable_as} --data PATH{flags}",
          flush=True)


def _status(args: argparse.Namespace) -> int:
    from rwft.server.central_view import round_summary
    from rwft.server.state import federation_id, load_state

    run_dir = Path(args.run_dir).resolve()
    fid = federation_id(run_dir)
    cfg = load_config(run_dir / "config.yaml")
    state = load_state(run_dir)
    done = state.round if state else 0
    control = control_address_of(run_dir)
    running = control is not None and port_open(*split_address(control[0]))
    online: list[int] = []
    if control is not None and running:
        with tempfile.TemporaryDirectory(prefix="rwft-status-") as home:  # status writes nothing in RUN_DIR
            online = FlowerCli(run_dir, control[0], control[1], home=Path(home)).node_ids()
    if args.json:
        print(json.dumps({"federation": fid, "run_dir": str(run_dir), "strategy": cfg.federation.strategy,
                          "rounds_completed": done, "rounds": cfg.federation.rounds,
                          "history": [round_summary(r, cfg.federation.rounds) for r in (state.history if state else [])],
                          "address": cfg.federation.address, "running": running, "nodes_online": online}))
        return 0
    print(f"federation {fid} ({cfg.federation.strategy}) in {run_dir}: "
          f"{done} of {cfg.federation.rounds} rounds completed")
    for record in state.history if state else []:
        print("  " + round_summary(record, cfg.federation.rounds))
    if running:
        print(f"SuperLink for {cfg.federation.address} is up; {len(online)} site(s) online"
              + (f": nodes {', '.join(map(str, online))}" if online else ""))
    else:
        print(f"SuperLink at {cfg.federation.address} is not running"
              + (f"; continue with: rwft-server start --resume {run_dir}" if done < cfg.federation.rounds else ""))
    return 0

