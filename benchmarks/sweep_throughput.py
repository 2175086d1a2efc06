"""Sweep throughput: K trials on Ray Tune with fractional resources vs the same K trials one after another.

    python benchmarks/sweep_throughput.py --trials 4 --cpu-per-trial 1 --data ../shared/data/pneumoniamnist.npz

Both runs execute the same trial function (``rwft.experiments.trials.run_trial``) on the same
K centralised PneumoniaMNIST trials (seeds 0..K-1, the smoke sweep's tiny budget). The
sequential run is ``rwft sweep --backend local`` (no Ray, one trial at a time, torch using
every core); the Ray run is ``rwft sweep`` with ``resources.cpu`` per trial, so that
cores / cpu-per-trial trials run at once. Wall time includes process start-up, and for Ray
the runtime's start. Prints a Markdown row and writes JSON with ``--output``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "examples" / "sweep_smoke.yaml"
RWFT = str(Path(sys.executable).parent / "rwft")


def timed_sweep(out: Path, data: str, trials: int, extra: list[str]) -> float:
    command = [RWFT, "sweep", str(SMOKE), f"output_dir={out}", f"data.root={data}", "grid.setting=[centralised]",
               "grid.model.pretrained=[true]", f"grid.seed=[{','.join(str(s) for s in range(trials))}]", *extra]
    started = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if result.returncode != 0:
        sys.exit(f"sweep failed ({' '.join(command)}):\n{result.stderr[-3000:]}")
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--trials", type=int, default=4)
    parser.add_argument("--cpu-per-trial", type=float, default=1.0)
    parser.add_argument("--data", required=True, help="pneumoniamnist.npz")
    parser.add_argument("--output", help="write the numbers as JSON here")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["RWFT_CACHE_DIR"] = str(Path(tmp) / "cache")  # both runs decode into the same fresh cache
        warm = timed_sweep(Path(tmp) / "warm", args.data, 1, ["--backend", "local"])  # imports + decode cache
        sequential = timed_sweep(Path(tmp) / "sequential", args.data, args.trials, ["--backend", "local"])
        ray = timed_sweep(Path(tmp) / "ray", args.data, args.trials, [f"resources.cpu={args.cpu_per_trial}"])
    cores = os.cpu_count() or 1
    numbers = {"trials": args.trials, "cpu_per_trial": args.cpu_per_trial, "cores": cores,
               "concurrent": int(cores // args.cpu_per_trial), "warm_up_s": warm, "sequential_s": sequential,
               "ray_s": ray, "speedup": sequential / ray, "load_average": os.getloadavg()}
    print(f"| {args.trials} | {args.cpu_per_trial:g} | {numbers['concurrent']} | {sequential:.0f} | {ray:.0f} | "
          f"{numbers['speedup']:.2f} | {numbers['load_average'][0]:.1f} |")
    if args.output:
        Path(args.output).write_text(json.dumps(numbers, indent=2))


if __name__ == "__main__":
    main()
