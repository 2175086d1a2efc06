"""``rwft-server``: run the coordinating side of a federation.

``rwft-server start --config EXP.yaml [key=value ...]`` starts a SuperLink for the
federation (its state in the run directory, serving ``federation.address``), shows
the sites as they join, waits for ``federation.min_sites`` (at most
``federation.wait_timeout_s``), submits the run, streams its progress and says where
the model, the metrics and the TensorBoard logs are. ``--resume RUN_DIR`` continues a
federation after its last completed round, for example after a crash.

``rwft-server status [RUN_DIR]`` shows the rounds completed and the sites online.

``rwft-server certs --out DIR --host NAME`` makes the federation's TLS certificates
(``rwft.federation.tls``); ``start ... federation.certificates=DIR`` then serves TLS only, and
``federation.site_keys=KEYS`` admits only the hospitals whose public key is in KEYS
(``rwft.federation.site_keys``, ``rwft.server.admission``).

Ctrl-C stops the run and the SuperLink; continue later with ``--resume``.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from rwft.core.config import RwftConfig, load_config
from rwft.core.errors import RwftError
from rwft.federation.processes import port_open, run_command, split_address
from rwft.federation.site_keys import site_public_keys
from rwft.federation.tls import FederationCertificates, create_certificates
from rwft.server.admission import admit_sites
from rwft.server.superlink import FlowerCli, start_superlink, write_flower_app


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
    start.set_defaults(handler=_start)
    status = sub.add_parser("status", help="rounds completed and sites online")
    status.add_argument("run_dir", nargs="?", default="runs/latest", help="the federation's run directory")
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

    cfg = load_federation_config(args.config, args.overrides, args.resume)
    # TLS files and site keys are checked before anything is written.
    certificates = _certificates(cfg)
    site_keys = site_public_keys(cfg.federation.site_keys) if cfg.federation.site_keys else None
    cfg, run_config = prepare_federation(cfg, resume=args.resume is not None)
    run_dir = Path(cfg.output_dir)
    superlink = start_superlink(run_dir, cfg.federation.address, certificates=certificates,
                                site_auth=site_keys is not None)
    flwr = FlowerCli(run_dir, cfg.federation.address, certificates)
    try:
        print(f"rwft-server: SuperLink serving {cfg.federation.address} "
              f"({'TLS, sites join with --root-certificates ' + str(certificates.ca) if certificates else 'no TLS'}; "
              f"its state: {run_dir / 'superlink'})", flush=True)
        if certificates is None:
            print("rwft-server: warning: without TLS, models and metrics cross the network unencrypted and sites "
                  "cannot tell this server from another. Fine on one machine or inside a VPN; otherwise make "
                  "certificates with `rwft-server certs --out DIR --host THIS_HOST` and pass "
                  "federation.certificates=DIR.", file=sys.stderr, flush=True)
        if site_keys is not None:
            admitted = admit_sites(flwr, site_keys, run_dir)
            print(f"rwft-server: admitting only the sites with a key in {cfg.federation.site_keys}: "
                  f"{', '.join(admitted)}", flush=True)
        _wait_for_sites(flwr, cfg)
        run_id = flwr.submit(write_flower_app(run_dir / "flower-app", run_config))
        print(f"rwft-server: run {run_id}: {cfg.federation.rounds} rounds of {cfg.federation.strategy}", flush=True)
        flwr.stream_logs(run_id)
        status = flwr.run_status(run_id)
    except KeyboardInterrupt:
        print(f"\nrwft-server: stopped. Continue with: rwft-server start --resume {run_dir}", file=sys.stderr)
        raise
    finally:
        superlink.stop()
    if status != "finished:completed":
        print(f"rwft-server: the run ended as {status} (its log is above). Continue it with: "
              f"rwft-server start --resume {run_dir}", file=sys.stderr)
        return 1
    print(f"rwft-server: done.\n  global model: {run_dir / 'model.pt'}  (rwft evaluate {run_dir / 'model.pt'})\n"
          f"  metrics:      {run_dir / 'metrics.json'}\n"
          f"  TensorBoard:  tensorboard --logdir {run_dir / 'tb'}")
    return 0


def _certificates(cfg: RwftConfig) -> FederationCertificates | None:
    folder = cfg.federation.certificates
    if cfg.federation.site_keys and not folder:
        # Flower signs site requests only over TLS; a key sent in the clear proves nothing.
        raise RwftError("federation.site_keys needs TLS: make certificates with `rwft-server certs --out DIR "
                        "--host THIS_HOST` and pass federation.certificates=DIR as well.")
    return FederationCertificates.in_folder(folder) if folder else None


def _certs(args: argparse.Namespace) -> int:
    folder = create_certificates(args.out, args.host, overwrite=args.overwrite)
    names = ", ".join([*args.host, "localhost", "127.0.0.1"])
    print(f"rwft-server: TLS certificates for {names} in {folder}\n"
          f"  give every hospital:  {folder / 'ca.crt'}  (public; they join with --root-certificates ca.crt)\n"
          f"  keep on this server:  {folder / 'ca.key'}, {folder / 'server.key'}  (private, mode 0600)\n"
          f"  serve with:           rwft-server start ... federation.certificates={folder}")
    return 0


def _wait_for_sites(flwr: FlowerCli, cfg: RwftConfig) -> None:
    """Show sites as they join; return at ``min_sites``, ``RwftError`` after ``wait_timeout_s``."""
    federation = cfg.federation
    host, port = split_address(federation.address)
    reachable_as = f"{'SERVER_HOST' if host in ('0.0.0.0', '') else host}:{port}"
    tls = " --root-certificates ca.crt" if federation.certificates else ""
    tls += " --auth-key NAME.key" if federation.site_keys else ""
    print(f"rwft-server: waiting for {federation.min_sites} site(s), at most {federation.wait_timeout_s:.0f} s. "
          f"Each hospital runs:\n  rwft-client join --site NAME --server {reachable_as} --data PATH{tls}", flush=True)
    deadline = time.monotonic() + federation.wait_timeout_s
    seen: set[int] = set()
    while True:
        online = flwr.node_ids()
        for node_id in sorted(set(online) - seen):
            seen.add(node_id)
            print(f"rwft-server: site joined (node {node_id}); {len(online)} of {federation.min_sites} online",
                  flush=True)
        if len(online) >= federation.min_sites:
            return
        if time.monotonic() > deadline:
            raise RwftError(f"only {len(online)} of federation.min_sites={federation.min_sites} site(s) joined "
                            f"within federation.wait_timeout_s={federation.wait_timeout_s:.0f} s. Check that the "
                            f"sites reach {reachable_as}, or lower federation.min_sites.")
        time.sleep(1.0)


def _status(args: argparse.Namespace) -> int:
    from rwft.server.central_view import round_summary
    from rwft.server.state import federation_id, load_state

    run_dir = Path(args.run_dir).resolve()
    fid = federation_id(run_dir)
    cfg = load_config(run_dir / "config.yaml")
    state = load_state(run_dir)
    done = state.round if state else 0
    print(f"federation {fid} ({cfg.federation.strategy}) in {run_dir}: "
          f"{done} of {cfg.federation.rounds} rounds completed")
    for record in state.history if state else []:
        print("  " + round_summary(record, cfg.federation.rounds))
    host, port = split_address(cfg.federation.address)
    if port_open(host, port):
        online = FlowerCli(run_dir, cfg.federation.address, _certificates(cfg)).node_ids()
        print(f"SuperLink at {cfg.federation.address} is up; {len(online)} site(s) online"
              + (f": nodes {', '.join(map(str, online))}" if online else ""))
    else:
        print(f"SuperLink at {cfg.federation.address} is not running"
              + (f"; continue with: rwft-server start --resume {run_dir}" if done < cfg.federation.rounds else ""))
    return 0
