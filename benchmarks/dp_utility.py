"""Utility vs privacy: held-out AUROC and training time of DP-SGD at several epsilons, beside no DP.

Every row trains the same model the same way through ``rwft.core.run.train`` (the engine
``rwft train`` and every federated site use) on PneumoniaMNIST (``../shared/data``) and
reports the official test split's AUROC (624 images, threshold chosen on validation). DP
rows set ``train.dp.target_epsilon`` (delta 1e-5, PRV accountant, clipping norm
``--clip``): Opacus chooses the noise so that the run spends exactly that budget. All rows,
the no-DP one included, freeze BatchNorm (``model.batchnorm=frozen``), so the table
isolates the cost of DP-SGD itself.

    .venv/bin/python benchmarks/dp_utility.py --epsilons 1,3,8 --epochs 3

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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--epsilons", default="1,3,8")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--image-size", type=int, default=28)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=0.002)
    parser.add_argument("--clip", type=float, default=1.0, help="train.dp.max_grad_norm")
    parser.add_argument("--max-train-images", type=int, default=2000)
    parser.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "pneumoniamnist.npz"))
    parser.add_argument("--output", help="also write the JSON here")
    args = parser.parse_args()

    from rwft.core.config import load_config
    from rwft.core.run import train

    common = [f"data.root={args.data}", f"data.image_size={args.image_size}", f"train.batch_size={args.batch_size}",
              f"train.epochs={args.epochs}", f"train.lr={args.lr}", "train.device=cpu", "train.bootstrap=200",
              f"data.max_train_images={args.max_train_images}", "model.batchnorm=frozen"]
    rows = [("no DP", [])] + [(f"epsilon {eps}", ["train.dp.enabled=true", f"train.dp.target_epsilon={eps}",
                                                  f"train.dp.max_grad_norm={args.clip}"])
                              for eps in args.epsilons.split(",")]
    results = []
    with tempfile.TemporaryDirectory(prefix="rwft-dp-utility-") as tmp:
        os.environ.setdefault("RWFT_CACHE_DIR", str(Path(tmp) / "cache"))
        for index, (name, overrides) in enumerate(rows):
            cfg = load_config(None, [*common, *overrides, f"output_dir={Path(tmp) / f'run{index}'}"])
            started = time.monotonic()
            result = train(cfg, progress=False)
            seconds = time.monotonic() - started
            last = json.loads(json.dumps(result.metrics))
            epsilon = _spent_epsilon(Path(tmp) / f"run{index}")
            results.append({"row": name, "auroc": last["test"]["auroc"]["value"], "ci95": last["test"]["auroc"]["ci95"],
                            "epsilon_spent": epsilon, "seconds": seconds})
            print(json.dumps(results[-1]), flush=True)
    base = results[0]["seconds"]
    print(f"\nPneumoniaMNIST {args.image_size} px, {args.max_train_images} training images, {args.epochs} epochs, "
          f"batch {args.batch_size}, delta 1e-5, clip {args.clip}\n")
    print("| setting | epsilon spent | test AUROC [95% CI] | time (s) | time vs no DP |")
    print("|---|---|---|---|---|")
    for r in results:
        eps = f"{r['epsilon_spent']:.2f}" if r["epsilon_spent"] is not None else "∞ (no DP)"
        ci = r["ci95"]
        print(f"| {r['row']} | {eps} | {r['auroc']:.3f} [{ci[0]:.3f}, {ci[1]:.3f}] | {r['seconds']:.0f} | "
              f"{r['seconds'] / base:.2f}x |")
    if args.output:
        Path(args.output).write_text(json.dumps({"args": vars(args), "results": results}, indent=2))


def _spent_epsilon(run_dir: Path) -> float | None:
    """The epsilon spent, from the accountant state in the run's last checkpoint."""
    import torch

    from rwft.core.config import load_config
    from rwft.core.privacy import epsilon_after

    state = torch.load(run_dir / "last.pt", map_location="cpu", weights_only=False).get("trainer", {}).get("privacy")
    if state is None:
        return None
    steps = sum(entry[2] for entry in state["accountant"]["history"])
    dp = load_config(None, [f"train.dp.accountant={state['accountant']['mechanism']}"]).train.dp
    return epsilon_after(dp, noise_multiplier=state["noise_multiplier"], sample_rate=state["sample_rate"],
                         steps=steps, delta=state["delta"])


if __name__ == "__main__":
    main()
