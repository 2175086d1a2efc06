"""Training throughput: rwft's engine vs a bare timm + torch loop, in one process.

Both train the same architecture (timm ``tf_efficientnet_lite0``, the default backbone),
with the same batch size, resolution, optimiser and precision policy. The bare loop
feeds pre-made 3-channel tensors that already sit on the device, so it is an upper
bound: the ratio shows what rwft's data path (uint8 -> float, augmentation), channel
adapter and normalisation cost. Runs alternate (bare, rwft, bare, rwft, ...) so that
noise from a shared machine hits both; the median of the repeats is reported.

    python benchmarks/train_throughput.py --image-size 64 --batch-size 32          # CPU
    python benchmarks/train_throughput.py --image-size 224 --batch-size 256        # GPU

Prints one JSON object (also written to --output).
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import time

import numpy as np
import timm
import torch

from rwft.core.config import load_config
from rwft.core.data import ImageSplit
from rwft.core.engine import Trainer, autocast, prepare_model, select_device
from rwft.core.model import build_model


def bare_loop(device: torch.device, image_size: int, batch_size: int, steps: int, precision: str) -> float:
    """Images per second of a plain timm + torch training loop."""
    model = prepare_model(timm.create_model("tf_efficientnet_lite0", num_classes=2), device)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=1e-4)
    loss_fn = torch.nn.CrossEntropyLoss()
    images = torch.randn(batch_size, 3, image_size, image_size, device=device)
    if device.type == "cuda":
        images = images.contiguous(memory_format=torch.channels_last)
    labels = torch.randint(0, 2, (batch_size,), device=device)

    def step() -> None:
        with autocast(device, precision):
            loss = loss_fn(model(images).float(), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return _timed(step, device, batch_size, steps)


def rwft_engine(device: torch.device, image_size: int, batch_size: int, steps: int, precision: str,
                augment: bool, overrides: tuple[str, ...] = ()) -> float:
    """Images per second of rwft's Trainer on uint8 grayscale images (adapter replicate).

    ``overrides`` (``--set``) switch on recipe ingredients, e.g. ``train.ema_decay=0.999``.
    """
    cfg = load_config(overrides=[
        f"data.image_size={image_size}", f"train.batch_size={batch_size}", f"data.augment={augment}",
        f"train.precision={precision}", f"train.max_steps_per_epoch={steps}", "train.schedule=constant",
        "model.pretrained=false",  # same architecture; weights do not change the arithmetic
        *overrides,
    ])
    model = build_model(cfg.model, num_classes=2)
    rng = np.random.default_rng(0)
    split = ImageSplit(rng.integers(0, 256, (batch_size * steps, image_size, image_size), dtype=np.uint8),
                       rng.integers(0, 2, batch_size * steps).astype(np.int64))
    trainer = Trainer(model, cfg, steps_per_epoch=steps, epochs=1_000, device=device, train_labels=split.labels)
    trainer.train_epoch(split, epoch_seed=0)  # warm-up pass (allocator, cudnn autotune)
    _sync(device)
    start = time.perf_counter()
    trainer.train_epoch(split, epoch_seed=1)
    _sync(device)
    return batch_size * steps / (time.perf_counter() - start)


def write_profile(path: str, device: torch.device, image_size: int, batch_size: int, steps: int,
                  precision: str) -> None:
    """Where a rwft step spends its time: torch.profiler's op table, by self CPU and by device time."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as profiler:
        rwft_engine(device, image_size, batch_size, steps, precision, augment=False)
    table = profiler.key_averages()
    with open(path, "w") as handle:
        handle.write(table.table(sort_by="self_cpu_time_total", row_limit=30) + "\n")
        if device.type == "cuda":
            handle.write(table.table(sort_by="self_device_time_total", row_limit=30) + "\n")


def _timed(step, device: torch.device, batch_size: int, steps: int) -> float:
    for _ in range(max(2, steps // 5)):  # warm-up
        step()
    _sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    _sync(device)
    return batch_size * steps / (time.perf_counter() - start)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak_gpu_mib(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    peak = torch.cuda.max_memory_allocated(device) / 2**20
    torch.cuda.reset_peak_memory_stats(device)
    return round(peak, 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=10, help="timed steps per repeat")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16"))
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="recipe setting for both rwft loops (repeatable), e.g. train.ema_decay=0.999")
    parser.add_argument("--output")
    parser.add_argument("--profile", metavar="PATH",
                        help="also profile one rwft epoch with torch.profiler and write its op table to PATH")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = select_device(load_config(overrides=[f"train.device={args.device}"]).train)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True

    results: dict[str, list[float]] = {"bare": [], "rwft": [], "rwft_augment": []}
    peaks: dict[str, float | None] = {}
    for _ in range(args.repeats):
        results["bare"].append(bare_loop(device, args.image_size, args.batch_size, args.steps, args.precision))
        peaks["bare"] = _peak_gpu_mib(device)
        results["rwft"].append(rwft_engine(device, args.image_size, args.batch_size, args.steps,
                                           args.precision, augment=False, overrides=tuple(args.overrides)))
        peaks["rwft"] = _peak_gpu_mib(device)
        results["rwft_augment"].append(rwft_engine(device, args.image_size, args.batch_size, args.steps,
                                                   args.precision, augment=True, overrides=tuple(args.overrides)))
        peaks["rwft_augment"] = _peak_gpu_mib(device)
    median = {name: statistics.median(values) for name, values in results.items()}
    summary = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "torch_threads": torch.get_num_threads(),
        "image_size": args.image_size, "batch_size": args.batch_size, "steps": args.steps,
        "repeats": args.repeats, "precision": args.precision, "overrides": args.overrides,
        "images_per_s_median": {k: round(v, 1) for k, v in median.items()},
        "images_per_s_all": {k: [round(x, 1) for x in v] for k, v in results.items()},
        "ratio_rwft_vs_bare": round(median["rwft"] / median["bare"], 3),
        "ratio_rwft_augment_vs_bare": round(median["rwft_augment"] / median["bare"], 3),
        "peak_gpu_mib": peaks if device.type == "cuda" else None,
        "peak_process_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }
    if args.profile:
        write_profile(args.profile, device, args.image_size, args.batch_size, args.steps, args.precision)
    text = json.dumps(summary, indent=2)
    print(text)
    if args.output:
        with open(args.output, "w") as handle:
            handle.write(text + "\n")


if __name__ == "__main__":
    main()
