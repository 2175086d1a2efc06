"""How much a model trained without a second hospital's scanner loses there, and how much federating wins back.

    PYTHONPATH=.pyroot python benchmarks/shift_gap.py --shift scanner-b --image-size 28 \
        --train-images 1200 --epochs 3 --rounds 3 --out runs/shift_gap

On the PneumoniaMNIST shipped with rwft (or ``--data FILE.npz``), three models with the
same budget (``epochs`` passes over the training images), all EfficientNet-Lite0 from
ImageNet:

- **central**: trained centrally on the unshifted training images (hospital A's scanner);
- **federated, no shift**: FedAvg of two sites that share the training images
  (``--rounds`` rounds of one local epoch), both with hospital A's scanner;
- **federated with B**: the same two sites, but site 1 is hospital B: its images pass
  through ``--shift`` (``federation.site_shifts``, ``rwft.core.shift``).

Each model is scored (AUROC on the official test split, threshold-free) on the test
images as hospital A sees them and as hospital B's scanner shows them (the same
``--shift``, another seed). The federation runs rwft's real ServerApp and ClientApps
in one process (``rwft.federation.inprocess``), so nothing but CPU time is needed.
Prints a Markdown table and writes ``OUT/results.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from sklearn.metrics import roc_auc_score

from rwft.core.config import load_config
from rwft.core.data import load_splits
from rwft.core.predict import load_trained_model
from rwft.core.run import train
from rwft.core.shift import describe, parse_shift, shift_images

TEST_SEED = 10_000  # the shifted test set's noise differs from any training site's


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shift", default="scanner-b")
    parser.add_argument("--image-size", type=int, default=28)
    parser.add_argument("--train-images", type=int, default=1200)
    parser.add_argument("--epochs", type=int, default=3, help="central epochs = federated rounds x 1 local epoch")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--data", default=None, help="a MedMNIST npz (default: the copy shipped with rwft)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="runs/shift_gap")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    out = Path(args.out).absolute()
    shift = parse_shift(args.shift)
    common = [f"data.image_size={args.image_size}", f"data.max_train_images={args.train_images}",
              "train.batch_size=32", "train.lr=0.002", "train.bootstrap=0", "train.device=cpu",
              f"train.num_threads={args.threads}", f"seed={args.seed}", f"data.cache_dir={out / 'cache'}",
              *([f"data.root={args.data}"] if args.data else [])]
    timings = {}

    start = time.perf_counter()
    central_cfg = load_config(None, [*common, f"train.epochs={args.epochs}", f"output_dir={out / 'central'}"])
    train(central_cfg, progress=False)
    timings["central (A's scanner only)"] = time.perf_counter() - start
    models = {"central (A's scanner only)": out / "central" / "best.pt"}
    for name, shifts in (("federated, no shift (A + A)", '[""]'), ("federated with B (A + B)", f'["", "{args.shift}"]')):
        start = time.perf_counter()
        run = out / ("fed_plain" if shifts == '[""]' else "fed_shifted")
        _federate([*common, f"federation.rounds={args.rounds}", "federation.local_epochs=1", "federation.sites=2",
                   "federation.min_sites=2", f"federation.site_shifts={shifts}", f"output_dir={run}"])
        timings[name] = time.perf_counter() - start
        models[name] = run / "model.pt"

    test = load_splits(central_cfg).test
    shifted_test = shift_images(np.asarray(test.images), shift, TEST_SEED)
    rows = []
    for name, checkpoint in models.items():
        trained = load_trained_model(checkpoint)
        at_a = roc_auc_score(test.labels, _probabilities(trained, test.images))
        at_b = roc_auc_score(test.labels, _probabilities(trained, shifted_test))
        rows.append({"model": name, "auroc_A": at_a, "auroc_B": at_b, "seconds": timings.get(name, 0.0)})
    results = {"shift": describe(shift), "args": vars(args), "rows": rows}
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=2))
    print(f"\nshift {describe(shift)}; test split ({len(test)} images) at {args.image_size}px\n")
    print("| model | AUROC at A (test as is) | AUROC at B (test through B's scanner) | loss at B | train s |")
    print("|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['model']} | {row['auroc_A']:.3f} | {row['auroc_B']:.3f} | "
              f"{row['auroc_A'] - row['auroc_B']:+.3f} | {row['seconds']:.0f} |")
    return 0


def _federate(overrides: list[str]) -> None:
    from rwft.clients.app import app as client_app
    from rwft.federation.inprocess import InProcessGrid
    from rwft.server.app import run_federation
    from rwft.server.launch import prepare_federation

    cfg, run_config = prepare_federation(load_config(None, overrides), resume=False)
    nodes = {10 + i: {"partition-id": i, "num-partitions": cfg.federation.sites} for i in range(cfg.federation.sites)}
    run_federation(InProcessGrid(client_app, nodes, run_config), run_config)


def _probabilities(trained, images: np.ndarray) -> np.ndarray:
    x = torch.from_numpy(np.array(images)).unsqueeze(1).float().div_(255.0)
    return np.concatenate([trained.probabilities(batch) for batch in torch.split(x, 256)])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
