"""Robustness to one adversarial site: held-out AUROC per aggregation rule, beside the clean run.

Each row is a whole federation run in one process (rwft's ServerApp and ClientApp code,
messages handed over in memory: ``rwft.federation.inprocess``), ``--sites`` simulated
hospitals splitting PneumoniaMNIST's train split (``../shared/data``), the server scoring
the global model on PneumoniaMNIST's validation split and, after the last round, on its
official test split (624 images). One site (``site-0``) attacks with
``federation.attack.kind``/``factor`` (``rwft.federation.attacks``). Rows:

- ``clean``: FedAvg, nobody attacks (the reference);
- ``fedavg``, ``fedmedian``, ``fedtrimmedavg``, ``krum``: the attack, update checks off
  except what is never optional (NaN, shapes), so the strategy alone must cope;
- ``fedavg + update checks``: the attack, FedAvg with ``federation.update_checks`` on.

A run the attack breaks (the server cannot score a model whose outputs are NaN) is reported
as such. Every row is the same command line as ``rwft simulate`` takes:

    .venv/bin/python benchmarks/robustness.py --kind scale --factor 1000
    .venv/bin/python benchmarks/robustness.py --kind signflip --factor 5 --rounds 4

Prints a Markdown table (and writes JSON to ``--output``).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

ROWS = [
    ("clean (fedavg, no attacker)", ["federation.strategy=fedavg"], False),
    ("fedavg", ["federation.strategy=fedavg", "federation.update_checks.enabled=false"], True),
    ("fedmedian", ["federation.strategy=fedmedian", "federation.update_checks.enabled=false"], True),
    ("fedtrimmedavg (beta 0.2)", ["federation.strategy=fedtrimmedavg", "federation.update_checks.enabled=false"], True),
    ("krum (1 byzantine)", ["federation.strategy=krum", "federation.krum_byzantine=1",
                            "federation.update_checks.enabled=false"], True),
    ("fedavg + update checks", ["federation.strategy=fedavg"], True),
]


def run_one(overrides: list[str], run_dir: Path, sites: int) -> dict:
    from rwft.clients.app import app as client_app
    from rwft.core.config import load_config
    from rwft.federation.inprocess import InProcessGrid
    from rwft.server.app import run_federation
    from rwft.server.launch import prepare_federation

    _, run_config = prepare_federation(load_config(None, [*overrides, f"output_dir={run_dir}"]), resume=False)
    nodes = {10 + i: {"partition-id": i, "num-partitions": sites} for i in range(sites)}
    started = time.monotonic()
    try:
        run_federation(InProcessGrid(client_app, nodes, run_config), run_config)
    except Exception as exc:  # the attack broke the run: that is the result of this row
        return {"auroc": None, "error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:120]}",
                "seconds": time.monotonic() - started}
    metrics = json.loads((run_dir / "metrics.json").read_text())
    rejected = sum(len(record.get("rejected", [])) for record in metrics["rounds"])
    return {"auroc": metrics["final"]["test"]["auroc"]["value"], "rejected": rejected,
            "seconds": time.monotonic() - started}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--kind", default="scale", choices=("nan", "scale", "signflip", "noise", "labelflip"))
    parser.add_argument("--factor", type=float, default=1000.0)
    parser.add_argument("--sites", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--image-size", type=int, default=28)
    parser.add_argument("--steps", type=int, default=6, help="train.max_steps_per_epoch (local work per round)")
    parser.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "pneumoniamnist.npz"))
    parser.add_argument("--only", help="comma-separated row numbers to run (0 = clean)")
    parser.add_argument("--output", help="also write the JSON here")
    args = parser.parse_args()
    common = [f"data.root={args.data}", f"data.image_size={args.image_size}", "train.batch_size=32",
              f"train.max_steps_per_epoch={args.steps}", "train.lr=0.002", "train.device=cpu", "train.bootstrap=200",
              "train.num_threads=1",
              f"federation.rounds={args.rounds}", f"federation.sites={args.sites}", f"federation.min_sites={args.sites}",
              "federation.trimmed_beta=0.2"]
    attack = ["federation.attack.sites=[site-0]", f"federation.attack.kind={args.kind}",
              f"federation.attack.factor={args.factor}"]
    chosen = [int(i) for i in args.only.split(",")] if args.only else range(len(ROWS))
    results = []
    with tempfile.TemporaryDirectory(prefix="rwft-robustness-") as tmp:
        os.environ.setdefault("RWFT_CACHE_DIR", str(Path(tmp) / "cache"))
        for index in chosen:
            name, overrides, attacked = ROWS[index]
            result = run_one([*common, *overrides, *(attack if attacked else [])], Path(tmp) / f"run{index}",
                             args.sites)
            results.append({"row": name, **result})
            print(json.dumps(results[-1]), flush=True)
    clean = next((r["auroc"] for r in results if r["row"].startswith("clean")), None)
    print(f"\n{args.sites} sites, site-0 attacks: kind={args.kind} factor={args.factor:g}, {args.rounds} rounds, "
          f"{args.image_size} px\n")
    print("| aggregation | held-out test AUROC | vs clean | replies rejected | time (s) |")
    print("|---|---|---|---|---|")
    for r in results:
        auroc = f"{r['auroc']:.3f}" if r["auroc"] is not None else f"run broken ({r['error']})"
        delta = f"{r['auroc'] - clean:+.3f}" if r["auroc"] is not None and clean is not None else "-"
        print(f"| {r['row']} | {auroc} | {delta} | {r.get('rejected', '-')} | {r['seconds']:.0f} |")
    if args.output:
        Path(args.output).write_text(json.dumps({"args": vars(args), "results": results}, indent=2))


if __name__ == "__main__":
    main()
