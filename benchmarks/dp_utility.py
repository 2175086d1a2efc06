"""Utility vs privacy: held-out AUROC and training time of DP-SGD at several epsilons, beside no DP.

Every row trains the same model the same way through ``rwft.core.run.train`` (the engine
``rwft train`` and every federated site use) on PneumoniaMNIST (``../shared/data``) and
reports the official test split's AUROC (624 images; 95% bootstrap CI). DP rows set
``train.dp.target_epsilon`` (delta 1e-5, ``--accountant``, clipping norm ``--clip``): Opacus
chooses the noise so that the run spends exactly that budget, and the row reports the
epsilon the run's accountant says was spent. All rows, the no-DP one included, freeze
BatchNorm (``model.batchnorm=frozen``), so the table isolates the cost of DP-SGD itself.
Time per epoch is the time between consecutive epoch ends (training plus the same
validation scoring in every row), as wall-clock seconds and as this process's CPU seconds
(less sensitive to other load on a shared machine); the first epoch, which also loads the
data and builds the model, is left out.

    python benchmarks/dp_utility.py --epsilons 1,3,8 --epochs 3 --max-train-images 1000 [--seed 1]

Prints one JSON line per row and a Markdown table (``--output`` also writes the JSON).
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
    parser.add_argument("--accountant", default="prv", choices=("prv", "rdp"))
    parser.add_argument("--max-train-images", type=int, default=1000)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0, help="run again with other seeds: one seed is not a curve")
    parser.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "pneumoniamnist.npz"))
    parser.add_argument("--skip-baseline", action="store_true",
                        help="only the DP rows (run the rows as parallel processes on a shared machine)")
    parser.add_argument("--output", help="also write the JSON here")
    args = parser.parse_args()

    from rwft.core.config import load_config
    from rwft.core.run import train

    common = [f"data.root={args.data}", f"data.image_size={args.image_size}", f"train.batch_size={args.batch_size}",
              f"train.epochs={args.epochs}", f"train.lr={args.lr}", "train.device=cpu", "train.bootstrap=200",
              f"train.num_threads={args.threads}", f"data.max_train_images={args.max_train_images}",
              "model.batchnorm=frozen", f"seed={args.seed}"]
    rows = [] if args.skip_baseline else [("no DP", [])]
    rows += [(f"target epsilon {eps}", [
        "train.dp.enabled=true", f"train.dp.target_epsilon={eps}", f"train.dp.max_grad_norm={args.clip}",
        f"train.dp.accountant={args.accountant}"]) for eps in args.epsilons.split(",") if eps]
    results = []
    with tempfile.TemporaryDirectory(prefix="rwft-dp-utility-") as tmp:
        os.environ.setdefault("RWFT_CACHE_DIR", str(Path(tmp) / "cache"))
        for index, (name, overrides) in enumerate(rows):
            cfg = load_config(None, [*common, *overrides, f"output_dir={Path(tmp) / f'run{index}'}"])
            epoch_ends: list[tuple[float, float]] = []  # (wall, this process's CPU) seconds at each epoch's end
            started = time.monotonic()
            result = train(cfg, progress=False, on_epoch=lambda epoch, val, ends=epoch_ends: ends.append(
                (time.monotonic(), time.process_time())))
            total = time.monotonic() - started
            test = result.metrics["test"]["auroc"]
            privacy = result.metrics.get("privacy")
            # From the end of epoch k-1 (its checkpoint written) to the end of epoch k: the first epoch also
            # pays for loading data and building the model, so it is left out when there are more.
            spans = [b[0] - a[0] for a, b in zip(epoch_ends, epoch_ends[1:], strict=False)]
            cpu = [b[1] - a[1] for a, b in zip(epoch_ends, epoch_ends[1:], strict=False)]
            results.append({"row": name, "seed": args.seed, "auroc": test["value"], "ci95": test["ci95"],
                            "epsilon_spent": privacy["epsilon"] if privacy else None,
                            "noise_multiplier": privacy["noise_multiplier"] if privacy else None,
                            "seconds_per_epoch": sum(spans) / len(spans) if spans else total / args.epochs,
                            "cpu_seconds_per_epoch": sum(cpu) / len(cpu) if cpu else None,
                            "seconds_total": total})
            print(json.dumps(results[-1]), flush=True)
    base_cpu = None if args.skip_baseline else results[0]["cpu_seconds_per_epoch"]
    print(f"\nPneumoniaMNIST {args.image_size} px, {args.max_train_images} training images, {args.epochs} epochs, "
          f"batch {args.batch_size}, lr {args.lr}, delta 1e-5, clip {args.clip}, {args.accountant} accountant, "
          f"{args.threads} threads\n")
    print("| setting | noise multiplier | epsilon spent | test AUROC [95% CI] | wall s/epoch | CPU s/epoch | "
          "CPU vs no DP |")
    print("|---|---|---|---|---|---|---|")
    for r in results:
        eps = f"{r['epsilon_spent']:.2f}" if r["epsilon_spent"] is not None else "∞ (no DP)"
        noise = f"{r['noise_multiplier']:.3f}" if r["noise_multiplier"] is not None else "-"
        ci = r["ci95"] or [float("nan"), float("nan")]
        cpu = r["cpu_seconds_per_epoch"]
        ratio = f"{cpu / base_cpu:.2f}x" if cpu and base_cpu else "-"
        print(f"| {r['row']} | {noise} | {eps} | {r['auroc']:.3f} [{ci[0]:.3f}, {ci[1]:.3f}] | "
              f"{r['seconds_per_epoch']:.1f} | {cpu or float('nan'):.1f} | {ratio} |")
    if args.output:
        Path(args.output).write_text(json.dumps({"args": vars(args), "results": results}, indent=2))


if __name__ == "__main__":
    main()
