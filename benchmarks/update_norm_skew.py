"""How far an honest site's update moves with its number of images (quantity skew).

Each site trains one local epoch from the same global model on its own slice of
PneumoniaMNIST's train split (28 px, batch 32, the default EfficientNet-Lite0, CPU), and
the L2 norm of its update is printed with its local steps, the update-check limit of
``rwft.federation.update_checks`` on the raw norms, and the norms per step and per
sqrt(step). Usage: ``python benchmarks/update_norm_skew.py NPZ SIZE SIZE ...``.
"""

from __future__ import annotations

import copy
import dataclasses
import sys
import time

import numpy as np

from rwft.core.config import UpdateChecksConfig, load_config
from rwft.core.data import load_splits
from rwft.core.engine import fit, seed_everything
from rwft.core.model import build_model
from rwft.federation.protocol import shared_arrays, update_norm
from rwft.federation.update_checks import norm_limit


def main(npz: str, sizes: list[int]) -> None:
    cfg = load_config(None, ["data.image_size=28", "train.batch_size=32", "train.lr=0.002", "train.device=cpu",
                             "train.num_threads=1", f"data.root={npz}"])
    splits = load_splits(cfg)
    seed_everything(0)
    model = build_model(cfg.model, splits.num_classes)
    sent = shared_arrays(model, False)
    order = np.random.default_rng(0).permutation(len(splits.train))
    norms, steps, start = [], [], 0
    for size in sizes:
        site = dataclasses.replace(splits, train=splits.train.subset(order[start:start + size]))
        start += size
        local = copy.deepcopy(model)
        began = time.time()
        result = fit(local, site, cfg, epochs=1)
        norms.append(update_norm(sent, shared_arrays(local, False)))
        steps.append(result.steps)
        print(f"{size} images, {result.steps} steps: update norm {norms[-1]:.4f} ({time.time() - began:.1f} s)")
    print(f"raw-norm limit (median + 6 MAD, >= 3 x median): {norm_limit(norms, UpdateChecksConfig()):.4f}")
    print("per step:", [round(n / s, 4) for n, s in zip(norms, steps, strict=True)])
    print("per sqrt(step):", [round(n / s ** 0.5, 4) for n, s in zip(norms, steps, strict=True)])


if __name__ == "__main__":
    main(sys.argv[1], [int(size) for size in sys.argv[2:]])
