"""What a federation costs per round on top of its training: real processes on loopback vs one process.

- **Federated**: one ``rwft-server start`` (SuperLink + ServerApp) and ``--sites`` real
  ``rwft-client join`` processes on 127.0.0.1, each site holding its own iid part of
  PneumoniaMNIST (``../shared/data``), ``--rounds`` rounds of FedAvg.
- **Local**: exactly the same work in one process: the same ServerApp code
  (``rwft.server.app.run_federation``) and ClientApp code (``rwft.clients.app``), with the
  messages handed from one to the other in memory (``federation/inprocess.py``): no
  SuperLink, no SuperNodes, no serialisation, sites trained one after the other.

A round's time is the gap between two rounds' commits (``finished_at`` in
``metrics.json``): sending the weights, local training, replies, aggregation, the sites'
evaluation of the model they receive, checkpointing. Round 1 also pays for each site's
first data load and model build and is reported apart; the steady state is the median of
rounds 2..R.
``overhead = federated - local`` per round, ``ratio = federated / local``.

    .venv/bin/python benchmarks/federated_overhead.py --sites 3 --rounds 5
    .venv/bin/python benchmarks/federated_overhead.py --sites 3 --rounds 4 --isolation subprocess
    .venv/bin/python benchmarks/federated_overhead.py --sites 2 --rounds 3 --skip-local --flower-adjustments-off off

``--flower-adjustments-off KEYS`` runs the federation with those of rwft's adjustments to
Flower left off (``off``: all; keys as in ``rwft.federation.flower_compat``), to measure
what each buys; ``--skip-local`` leaves out the in-process run.

Prints one JSON object (also written to ``--output``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from rwft.core.partition import write_site_files

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sites", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=5, help="train.max_steps_per_epoch (local work per round)")
    parser.add_argument("--isolation", choices=("warm", "subprocess"), default="warm")
    parser.add_argument("--threads-per-site", type=int, default=1)
    parser.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "pneumoniamnist.npz"))
    parser.add_argument("--port", type=int, default=19092)
    parser.add_argument("--output", help="also write the JSON here")
    parser.add_argument("--skip-local", action="store_true", help="only the federated run")
    parser.add_argument("--flower-adjustments-off", default="", metavar="KEYS",
                        help="RWFT_FLOWER_ADJUSTMENTS for the federation's processes (off = all)")
    args = parser.parse_args()
    if args.flower_adjustments_off:
        os.environ["RWFT_FLOWER_ADJUSTMENTS"] = args.flower_adjustments_off

    with tempfile.TemporaryDirectory(prefix="rwft-fed-bench-") as tmp:
        work = Path(tmp)
        os.environ.setdefault("RWFT_CACHE_DIR", str(work / "cache"))
        sites = write_site_files(Path(args.data), args.sites, work / "data")
        overrides = [f"data.root={args.data}", f"data.image_size={args.image_size}",
                     f"train.batch_size={args.batch_size}", f"train.max_steps_per_epoch={args.steps}",
                     f"federation.rounds={args.rounds}", f"federation.min_sites={args.sites}",
                     "federation.server_eval=false", "train.device=cpu"]
        local = None if args.skip_local else round_times(run_local(overrides, sites, work / "local"))
        federated = round_times(run_federated(overrides, sites, work / "federated", args))

    result = {
        "benchmark": "federated_overhead",
        "sites": args.sites, "rounds": args.rounds, "isolation": args.isolation,
        "flower_adjustments_off": args.flower_adjustments_off or None,
        "image_size": args.image_size, "batch_size": args.batch_size, "steps_per_round": args.steps,
        "threads_per_site": args.threads_per_site, "cpus": os.cpu_count(), "machine": platform.platform(),
        "load_average": os.getloadavg()[0], "local_round_s": local, "federated_round_s": federated,
    }
    if local is not None:
        result |= {"overhead_per_round_s": round(federated["steady"] - local["steady"], 2),
                   "ratio": round(federated["steady"] / local["steady"], 2),
                   "first_round_overhead_s": round(federated["first"] - local["first"], 2)}
    text = json.dumps(result, indent=2)
    print(text)
    if args.output:
        Path(args.output).write_text(text + "\n")


def run_local(overrides: list[str], sites: list[Path], run_dir: Path) -> list[dict]:
    """The ServerApp and the ClientApps in this process, messages passed in memory."""
    import torch

    sys.path.insert(0, str(REPO / "tests"))
    from rwft.clients.app import app as client_app
    from rwft.core.config import load_config
    from rwft.federation.inprocess import InProcessGrid
    from rwft.server.app import run_federation
    from rwft.server.launch import prepare_federation

    torch.set_num_threads(os.cpu_count() or 1)
    cfg, run_config = prepare_federation(load_config(None, [*overrides, f"output_dir={run_dir}"]), resume=False)
    nodes = {node_id + 1: {"site": f"site{node_id}", "data-dir": str(path), "work-dir": str(run_dir / f"site{node_id}")}
             for node_id, path in enumerate(sites)}
    run_federation(InProcessGrid(client_app, nodes, run_config), run_config)
    return json.loads((Path(cfg.output_dir) / "metrics.json").read_text())["rounds"]


def run_federated(overrides: list[str], sites: list[Path], run_dir: Path, args: argparse.Namespace) -> list[dict]:
    """``rwft-server start`` and one ``rwft-client join`` per site, all on 127.0.0.1."""
    address = f"127.0.0.1:{args.port}"
    clients = [subprocess.Popen([str(BIN / "rwft-client"), "join", "--site", f"site{i}", "--server", address,
                                 "--data", str(path), "--workdir", str(run_dir / f"site{i}"),
                                 "--image-size", str(args.image_size), "--isolation", args.isolation,
                                 "--threads", str(args.threads_per_site)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
               for i, path in enumerate(sites)]
    try:
        started = time.time()
        subprocess.run([str(BIN / "rwft-server"), "start", *overrides, f"output_dir={run_dir / 'server'}",
                        f"federation.address={address}"], check=True, stdout=subprocess.DEVNULL)
        rounds = json.loads((run_dir / "server" / "metrics.json").read_text())["rounds"]
        rounds[0]["startup_s"] = rounds[0]["finished_at"] - started
        return rounds
    finally:
        for client in clients:
            client.terminate()
        for client in clients:
            client.wait(60)


def round_times(rounds: list[dict]) -> dict:
    """Seconds per round from consecutive commits: round 1 apart, then the median of 2..R
    (the median, because the machines are shared and one slow round says nothing)."""
    gaps = [later["finished_at"] - earlier["finished_at"] for earlier, later in zip(rounds, rounds[1:], strict=False)]
    return {"first": round(gaps[0], 2), "steady": round(statistics.median(gaps[1:]), 2),
            "all": [round(g, 2) for g in gaps],
            # the part inside rwft.server.rounds: model out, evaluation and training at the sites, replies
            "exchange": [round(r["seconds"], 2) for r in rounds[1:]]}


if __name__ == "__main__":
    main()
