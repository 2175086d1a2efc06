"""``rwft-client join``: take part in a federation as one hospital.

``rwft-client keygen --site hospitalA`` makes the site's key pair for federations that
admit only registered sites (``rwft.federation.site_keys``).

``rwft-client join --site hospitalA --server HOST:PORT --data PATH`` first checks the
site's data locally (images per class and split, unreadable files listed; an empty site
is refused), then starts a Flower SuperNode that connects to the federation's SuperLink
and serves rounds until Ctrl-C. The images never leave this machine; what does is
listed in ``rwft.clients.app``. This site's own files go to ``--workdir`` (default
``./rwft-site-NAME``): its TensorBoard log (``tb/``), the SuperNode's log and, with
FedBN, its local layers.

By default rounds run in this process, which keeps imports, decoded images and the model
warm between rounds (``rwft.clients.worker``); ``--isolation subprocess`` uses Flower's
default instead, a fresh process per message. Several sites can join from one machine:
each picks a free local port for its SuperNode (``--port`` to choose).

When the federation's server goes away once this site has joined (a crash, a restart,
``rwft-server start --resume``), the site waits for it to come back and then restarts its
SuperNode and warm worker (``_watch``): a fresh SuperNode holds nothing of the interrupted
round, so no task or reply of the old server's messages can answer the resumed one's.
"""

from __future__ import annotations

import argparse
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import tomli_w

from rwft.core.errors import RwftError
from rwft.federation.processes import ChildProcess, flower_env, free_port, port_open, run_command, split_address
from rwft.federation.protocol import check_site_label
from rwft.federation.site_keys import check_site_private_key, create_site_key, hold_site_key
from rwft.federation.tls import check_root_certificate, diagnose_connection, is_loopback

RUNTIME_HOST = "127.0.0.1"  # the SuperNode's runtime API serves only this machine's ClientApp
ADMISSION_RETRY_S = 10.0  # how often a site whose key is not registered yet asks again
REJOIN_S = 5.0  # pause before joining the new federation that replaced this site's
DIAGNOSE_AFTER_TRIES = 4  # failed connection attempts (about 20 s of Flower's backoff) before saying why
WATCH_S = 0.5  # how often the SuperNode's log and, once the server went away, the server's port are looked at
# Flower's log lines rwft reacts to; tests/test_client_cli.py pins each against the installed Flower.
JOINED = "SuperNode ID:"
RETRYING = "Connection attempt failed, retrying in"
KEY_REFUSED = "Failed to activate SuperNode"
NO_KEY = "All SuperNodes must be registered"
NEW_FEDERATION = "401 Unauthorized"  # a heartbeat or pull from a node the SuperLink does not know


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    return run_command("rwft-client", lambda: _keygen(args) if args.command == "keygen" else _join(args),
                       interrupted="left the federation")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rwft-client", description=__doc__.split("\n")[0].replace("``", ""))
    sub = parser.add_subparsers(dest="command", required=True)
    join = sub.add_parser("join", help="check this site's data, then serve a federation's rounds")
    join.add_argument("--site", required=True, help="this site's label as the federation sees it: a pseudonym "
                                                    "(letters, digits, . _ -), never a path")
    join.add_argument("--server", required=True, metavar="HOST:PORT", help="the federation's SuperLink")
    join.add_argument("--data", required=True, metavar="PATH", help="this site's X-rays: a folder "
                      "(NORMAL/ and PNEUMONIA/, or train/val/test/ holding them) or a MedMNIST .npz")
    join.add_argument("--dataset", help="dataset plugin reading --data (default: medmnist for .npz, else chest_xray)")
    join.add_argument("--workdir", help="this site's own files (default ./rwft-site-SITE)")
    join.add_argument("--image-size", type=int, default=64,
                      help="size the data check decodes and caches at; use the federation's data.image_size")
    join.add_argument("--port", type=int, help="local port of the SuperNode's runtime API (default: a free one)")
    join.add_argument("--threads", type=int, help="torch CPU threads for training at this site")
    join.add_argument("--root-certificates", metavar="CA.crt",
                      help="the federation's ca.crt from its coordinator: connect over TLS and accept only the "
                           "server it certifies (required unless the server is on this machine, or --insecure)")
    join.add_argument("--insecure", action="store_true",
                      help="connect without TLS to a server on another machine (only inside a VPN you trust)")
    join.add_argument("--auth-key", metavar="NAME.key",
                      help="this site's private key (rwft-client keygen), for federations that admit only "
                           "registered sites; its NAME.pub must be with the coordinator")
    join.add_argument("--isolation", choices=("warm", "subprocess"), default="warm",
                      help="warm: rounds run in this process (default); subprocess: Flower's fresh process per message")
    keygen = sub.add_parser("keygen", help="make this site's key pair, for federations that admit only "
                                           "registered sites")
    keygen.add_argument("--site", required=True, help="this site's label (the key files are named after it)")
    keygen.add_argument("--out", default=".", metavar="DIR", help="folder for SITE.key and SITE.pub (default: here)")
    return parser


def _keygen(args: argparse.Namespace) -> int:
    private, public = create_site_key(args.out, args.site)
    print(f"rwft-client: keys for site {args.site}\n"
          f"  send to the coordinator:  {public}  (public)\n"
          f"  keep at this site:        {private}  (private, mode 0600)\n"
          f"  join with:                rwft-client join --site {args.site} ... --auth-key {private}")
    return 0


def _join(args: argparse.Namespace) -> int:
    from rwft.clients.site import dataset_for_path
    from rwft.core.sitecheck import check_site

    label = check_site_label(args.site)
    server_host, _ = split_address(args.server)  # a malformed address fails here, not in the SuperNode's log
    if not args.root_certificates and not args.insecure and not is_loopback(server_host):
        raise RwftError(f"{args.server} is another machine: join it over TLS with --root-certificates ca.crt. The "
                        "coordinator's `rwft-server start` printed where its ca.crt is (RUN_DIR/certs/ca.crt unless "
                        "it set federation.certificates) and its SHA-256 fingerprint: get the file from the "
                        "coordinator and compare the fingerprint (`openssl x509 -noout -fingerprint -sha256 -in "
                        "ca.crt`). Only inside a VPN you trust: --insecure.")
    if args.auth_key and not args.root_certificates:
        raise RwftError("--auth-key needs a TLS connection (Flower signs a site's requests only over TLS): add "
                        "--root-certificates ca.crt, the federation's CA from the coordinator.")
    # Checked and held first: a site started twice learns it at once, not after its data check.
    key = hold_site_key(check_site_private_key(args.auth_key)) if args.auth_key else None
    data = str(Path(args.data).expanduser().resolve())
    dataset = args.dataset or dataset_for_path(data)
    print(check_site(data, dataset, args.image_size).format(), flush=True)

    work_dir = Path(args.workdir or f"rwft-site-{label}").resolve()
    work_dir.mkdir(parents=True, exist_ok=True)
    node_config = work_dir / "node-config.toml"  # a file: any path survives Flower's parsing
    node_config.write_bytes(tomli_w.dumps({"site": label, "data-dir": data, "dataset": dataset,
                                           "work-dir": str(work_dir)}).encode())
    if args.root_certificates:
        transport = ["--root-certificates", str(check_root_certificate(args.root_certificates))]
    else:
        transport = ["--insecure"]
        if not args.insecure:
            print("rwft-client: warning: without --root-certificates the connection is not encrypted. Fine only "
                  "when the server runs on this machine.", file=sys.stderr, flush=True)
    if key is not None:
        transport += ["--auth-supernode-private-key", key.name]
    port = args.port or free_port(RUNTIME_HOST)
    command = [sys.executable, "-m", "rwft.clients.supernode", *transport, "--superlink", args.server,
               "--host", RUNTIME_HOST, "--port", str(port), "--node-config", str(node_config)]
    extra_env = {"OMP_NUM_THREADS": str(args.threads)} if args.threads else {}
    if args.isolation == "warm":
        command += ["--isolation", "process"]
    env = flower_env(work_dir / "flower-home", **extra_env)
    ca = Path(args.root_certificates).resolve() if args.root_certificates else None
    while True:
        supernode = ChildProcess(f"site {label}'s SuperNode", command, env=env,
                                 log_file=work_dir / "supernode.log", cwd=work_dir)
        print(f"rwft-client: site {label} connecting to {args.server} (SuperNode log: {supernode.log_file}); "
              "Ctrl-C to leave", flush=True)
        restart = threading.Event()
        try:
            supernode.wait_for_port(RUNTIME_HOST, port, timeout_s=120)
            stop = threading.Event()
            threading.Thread(target=_watch, args=(supernode, stop, args.server, ca, restart), daemon=True).start()
            if args.isolation == "warm":
                _serve_warm(f"{RUNTIME_HOST}:{port}", args.threads, stop)
            else:
                stop.wait()
        finally:
            supernode.stop()
        if restart.is_set():
            continue  # _watch said why; the next SuperNode's node id follows
        log = supernode.own_output()
        joined = _node_id(log)
        if joined and (NEW_FEDERATION in log or supernode.process.returncode == 0):
            # A joined SuperNode ends by itself when the SuperLink answers 401 (Flower then interrupts
            # itself and exits 0): the SuperLink no longer knows this node, because a new federation (a new
            # state database) took the address, or the coordinator revoked this site. Rejoining registers
            # this site with the new federation under a new node id; a revoked key is refused, and said so.
            print(f"rwft-client: the federation at {args.server} no longer knows this site (node {joined}): its "
                  f"server started a new federation, or revoked this site. Rejoining in {REJOIN_S:.0f} s.",
                  file=sys.stderr, flush=True)
            time.sleep(REJOIN_S)
            continue
        # Flower's code 2004: the SuperLink refused this key. The coordinator may not have registered it
        # yet (sites often start first), or the same key is connected already; wait instead of giving up.
        if args.auth_key and KEY_REFUSED in log:
            print(f"rwft-client: the federation at {args.server} has not admitted the key {args.auth_key}: either "
                  f"its NAME.pub is not (yet) in the coordinator's federation.site_keys folder, or a site on "
                  f"another machine is connected with this key right now (one key per site). Trying again in "
                  f"{ADMISSION_RETRY_S:.0f} s; Ctrl-C to stop.", file=sys.stderr, flush=True)
            time.sleep(ADMISSION_RETRY_S)
            continue
        raise RwftError(_why_the_supernode_stopped(args, supernode, log[-5000:], ca))


def _node_id(log: str) -> str | None:
    """The node id the SuperLink gave this SuperNode, from its own log (None before it joined)."""
    return log.split(JOINED)[-1].split()[0] if JOINED in log else None


def _why_the_supernode_stopped(args: argparse.Namespace, supernode: ChildProcess, log: str,
                               ca: Path | None) -> str:
    """What the site's operator should know and do, from the end of the SuperNode's log."""
    if "CERTIFICATE_VERIFY_FAILED" in log or "WRONG_VERSION_NUMBER" in log:
        host, port = split_address(args.server)
        why = diagnose_connection(host, port, ca)
        if why:
            return f"{why} (details in {supernode.log_file})."
    if NO_KEY in log:  # Flower's code 2001: a key is required and none was given
        return (f"the federation at {args.server} admits only registered sites, and this site gave no key. Make "
                "a key pair with `rwft-client keygen --site NAME`, send NAME.pub to the coordinator, and join "
                "with --auth-key NAME.key.")
    return (f"the SuperNode stopped (exit code {supernode.process.returncode}); its log "
            f"{supernode.log_file} ends with:\n{supernode.log_tail()}")


def _serve_warm(runtime_address: str, threads: int | None, stop: threading.Event) -> None:
    import torch

    from rwft.clients.app import app
    from rwft.clients.worker import serve

    if threads:
        torch.set_num_threads(threads)
    serve(runtime_address, app, stop)


def _watch(supernode: ChildProcess, stop: threading.Event, server: str, ca: Path | None,
           restart: threading.Event) -> None:
    """Report the node id once connected, and what is wrong if connecting keeps failing; set
    ``stop`` if the SuperNode exits, ``restart`` and ``stop`` once the server came back after going away.

    A joined SuperNode retries a server that went away for ever, and keeps what it held: a
    task whose message never fully arrived, a reply its server will never read. Flower 1.42
    then pushes that stale reply in place of the resumed federation's next one, and the
    resumed round waits for ever (README, "Known limits"). So once the server's address
    refuses connections, this site waits until it accepts them again and then stops the
    SuperNode with SIGTERM: it leaves gracefully (the server marks its node offline, or
    forgets a node without a site key), and the next one starts with an empty state. The
    old SuperNode is not stopped while the server is away: it could not say goodbye, and a
    site key's node would then look connected to the resumed server for up to a minute.
    """
    announced = diagnosed = False
    host, port = split_address(server)
    retries_seen = 0
    while supernode.alive():
        text = supernode.own_output()  # only this SuperNode's: an older one's id in the same log would be stale
        if not announced and (node_id := _node_id(text)):
            print(f"rwft-client: joined the federation as node {node_id}; serving rounds", flush=True)
            announced = True
            retries_seen = text.count(RETRYING)
        if announced and text.count(RETRYING) > retries_seen:
            retries_seen = text.count(RETRYING)
            # A retry while the server still listens is a passing failure that Flower's retry covers.
            if not port_open(host, port):
                _restart_when_back(supernode, stop, restart, server, host, port)
                return
        if not announced and not diagnosed and text.count(RETRYING) >= DIAGNOSE_AFTER_TRIES:
            why = diagnose_connection(host, port, ca)
            print(f"rwft-client: cannot join yet after {DIAGNOSE_AFTER_TRIES} tries: "
                  f"{why or 'the server accepts the connection but does not answer as a SuperLink'}. "
                  "Still trying; Ctrl-C to stop.", file=sys.stderr, flush=True)
            diagnosed = True
        stop.wait(WATCH_S)
    stop.set()


def _restart_when_back(supernode: ChildProcess, stop: threading.Event, restart: threading.Event, server: str,
                       host: str, port: int) -> None:
    """Wait until ``host:port`` accepts connections again, then stop ``supernode`` and have ``_join`` start a new one."""
    print(f"rwft-client: the server at {server} went away (it stopped, crashed or is restarting); this site "
          "restarts its SuperNode once the server is back. Still waiting; Ctrl-C to stop.", file=sys.stderr, flush=True)
    while supernode.alive() and not port_open(host, port):
        stop.wait(WATCH_S)
    if supernode.alive():
        print(f"rwft-client: the server at {server} is back: restarting this site's SuperNode, so that nothing of "
              "the interrupted round outlives it", file=sys.stderr, flush=True)
        restart.set()
        supernode.stop()
    stop.set()
