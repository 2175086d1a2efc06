"""``rwft simulate``: a federation of simulated hospitals on one machine, on Flower's simulation engine.

``rwft simulate --config EXP.yaml --sites 3 --partition dirichlet:0.5 [key=value ...]``
splits one dataset's train split into sites (``federation.sites``, ``federation.partition``,
seeded by ``seed``; the class counts per site are printed first), keeps its validation
and test splits for the server's held-out evaluation, and runs the same ServerApp and
ClientApp as a real federation (``rwft.server.app``, ``rwft.clients.app``) on Flower's
simulation engine: a SuperLink in simulation mode, the sites as Ray actors that stay
warm from round to round. Ray stays small: ``--cpus`` cores (default: all), each site
with an equal share and, on a GPU machine, one whole GPU, so that simulated sites never
share a GPU's memory (out-of-memory is the classic failure of Ray simulations).
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from pathlib import Path

from rwft.core.config import RwftConfig, with_overrides
from rwft.core.data import load_splits
from rwft.core.partition import describe_partition, partition_indices
from rwft.core.shift import describe, site_shifts
from rwft.federation.processes import PRIVATE_UMASK, free_port, private_dir, run_command


def main(argv: Sequence[str]) -> int:
    """Entry point of ``rwft simulate`` (``rwft.core.cli`` hands it the arguments)."""
    args = _parser().parse_args(list(argv))
    return run_command("rwft simulate", lambda: simulate(_config(args), cpus=args.cpus, resume=args.resume is not None))


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rwft simulate", description=__doc__.split("\n")[0].replace("``", ""))
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. federation.rounds=5")
    parser.add_argument("--config", metavar="EXP.yaml", help="experiment file (only what differs from the defaults)")
    parser.add_argument("--sites", type=int, help="simulated hospitals (federation.sites)")
    parser.add_argument("--partition", help="iid, dirichlet:ALPHA or quantity:ALPHA (federation.partition)")
    parser.add_argument("--cpus", type=int, default=os.cpu_count() or 1, help="CPU cores Ray may use")
    parser.add_argument("--resume", metavar="RUN_DIR", help="continue the simulated federation in RUN_DIR after "
                                                          "its last completed round (federation.rounds=N to go on)")
    return parser


def _config(args: argparse.Namespace) -> RwftConfig:
    from rwft.server.launch import load_federation_config

    overrides = list(args.overrides)
    if args.sites is not None:
        overrides.append(f"federation.sites={args.sites}")
    if args.partition is not None:
        overrides.append(f"federation.partition={args.partition}")
    cfg = load_federation_config(args.config, overrides, args.resume)
    # Simulated sites are always online: the federation waits for all of them.
    return with_overrides(cfg, [f"federation.min_sites={cfg.federation.sites}"])


def simulate(cfg: RwftConfig, *, cpus: int, resume: bool = False) -> int:
    """Run (or with ``resume``, continue) the simulated federation ``cfg`` describes; 0 when it completed.

    The sites are the same on resuming: the partition is drawn again from the same seed, and
    FedBN's local layers carry on from each site's folder (``RUN_DIR/sites/NAME``).
    """
    import torch

    from rwft.server.launch import prepare_federation
    from rwft.server.superlink import FlowerCli, run_to_the_end, start_superlink

    sites = cfg.federation.sites
    shifts = site_shifts(cfg.federation.site_shifts, sites)  # a bad spec stops here, before anything starts
    splits = load_splits(cfg)
    parts = partition_indices(splits.train.labels, sites, cfg.federation.partition, cfg.seed)
    print(f"rwft simulate: {sites} sites from {splits.source} ({cfg.federation.partition}, seed {cfg.seed}); "
          f"training images per site and class (each site keeps {cfg.data.val_fraction:.0%} for validation):\n"
          + describe_partition(parts, splits.train.labels, splits.class_names), flush=True)
    if cfg.federation.site_shifts:
        print("rwft simulate: scanner shifts per site: "
              + "; ".join(f"site-{i}: {describe(shift)}" for i, shift in enumerate(shifts)), flush=True)

    os.umask(PRIVATE_UMASK)  # the run directory is this user's only
    cfg, run_config = prepare_federation(cfg, resume=resume)
    run_dir = private_dir(Path(cfg.output_dir))
    address = f"127.0.0.1:{free_port()}"
    gpus = 1.0 if torch.cuda.is_available() else 0.0
    federation_config = [f"num-supernodes={sites}", f"client-resources-num-cpus={max(1, cpus // sites)}",
                         f"client-resources-num-gpus={gpus}", f"init-args-num-cpus={cpus}",
                         f"init-args-num-gpus={torch.cuda.device_count() if gpus else 0}"]
    superlink = start_superlink(run_dir, address, simulation=True)
    return run_to_the_end("rwft simulate", superlink, FlowerCli(run_dir, superlink.control_address), run_config, cfg,
                          resume_command=f"rwft simulate --resume {run_dir}", federation_config=federation_config)
