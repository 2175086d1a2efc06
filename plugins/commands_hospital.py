"""``rwft predict``, ``rwft export`` and ``rwft shift``: rwft at the hospital (``hookspecs.register_commands``).

Thin command lines over ``rwft.core.predict``, ``rwft.core.export`` and ``rwft.core.shift``;
they live in a plugin because reading image files (JPEG, PNG, DICOM) is the
``chest_xray`` dataset plugin's, and ``rwft.core`` imports no plugin.
"""

from __future__ import annotations

import argparse
import sys

from rwft.core.hookspecs import Register, hookimpl


def predict(argv: list[str]) -> int:
    from rwft.core.predict import image_files, load_trained_model, predict_files
    from rwft.plugins.datasets_chest_xray import decode_image

    parser = argparse.ArgumentParser(prog="rwft predict", description="Score X-rays with a trained rwft model: "
                                     "probability of the positive class and the decision at the model's threshold.")
    parser.add_argument("checkpoint", help="RUN_DIR/best.pt (rwft train) or a federation's model.pt")
    parser.add_argument("images", nargs="+", help="image files (JPEG, PNG, DICOM) and/or folders of them")
    parser.add_argument("--saliency", action="store_true",
                        help="also write a Grad-CAM overlay per image (model attention, not a finding)")
    parser.add_argument("--out", default="predictions", help="output folder (default: ./predictions)")
    parser.add_argument("--batch-size", type=int, default=32, help="images per batch (memory stays constant)")
    args = parser.parse_args(argv)
    trained = load_trained_model(args.checkpoint)
    files = image_files(args.images)
    print(f"rwft predict: {len(files)} file(s) with {trained.cfg.model.backbone} at {trained.image_size}px, "
          f"threshold {trained.threshold:.3f} (chosen on validation)", file=sys.stderr)
    summary = predict_files(trained, files, lambda path, size, windowing: decode_image(path, size, windowing),
                            args.out, saliency=args.saliency, batch_size=args.batch_size)
    print(f"rwft predict: {summary.scored} scored, {summary.unreadable} unreadable\n"
          f"  {summary.csv}\n  {summary.html}", file=sys.stderr)
    return 0


def export(argv: list[str]) -> int:
    from rwft.core.export import FORMATS, export_checkpoint

    parser = argparse.ArgumentParser(prog="rwft export", description="Write a checkpoint as one self-contained model "
                                     "(adapter and normalisation inside): input (N, 1, H, W) grayscale in [0, 1], "
                                     "output (N,) probability of the positive class.")
    parser.add_argument("checkpoint", help="RUN_DIR/best.pt (rwft train) or a federation's model.pt")
    parser.add_argument("--format", choices=FORMATS, required=True)
    parser.add_argument("--out", help="output file (default: beside the checkpoint, .onnx or .torchscript.pt)")
    args = parser.parse_args(argv)
    target = export_checkpoint(args.checkpoint, args.format, args.out)
    print(f"rwft export: {target}", file=sys.stderr)
    return 0


def shift(argv: list[str]) -> int:
    import dataclasses
    import json

    from rwft.core.shift import PRESETS, Shift, parse_shift, shift_path

    parser = argparse.ArgumentParser(prog="rwft shift", description="Make a shifted copy of an image folder or a "
                                     "MedMNIST npz, as a second hospital's scanner would differ (seeded; recorded "
                                     "in shift.json).")
    parser.add_argument("src", help="image folder (JPEG, PNG, DICOM; any layout) or .npz file")
    parser.add_argument("dst", help="new folder (or .npz file) for the shifted copy")
    parser.add_argument("--preset", default="", help=f"start from a named shift: {', '.join(PRESETS)}")
    parser.add_argument("--shift", default="", metavar="K=V,...", help="e.g. gamma=1.4,contrast=0.7,noise=0.02")
    for field in dataclasses.fields(Shift):
        parser.add_argument(f"--{field.name.replace('_', '-')}", type=int if "int" in str(field.type) else float,
                            dest=field.name, help=f"{field.name} (default {field.default})")
    parser.add_argument("--dicom", action="store_true", help="write MONOCHROME1 DICOM files (folders only)")
    parser.add_argument("--seed", type=int, default=0, help="seeds the noise (default 0)")
    args = parser.parse_args(argv)
    flags = [f"{f.name}={getattr(args, f.name)}" for f in dataclasses.fields(Shift) if getattr(args, f.name) is not None]
    chosen = parse_shift(",".join(part for part in (args.preset, args.shift, *flags) if part))
    record = shift_path(args.src, args.dst, chosen, args.seed, dicom=args.dicom)
    print(json.dumps(record, indent=2))
    return 0


@hookimpl
def register_commands(register: Register) -> None:
    register("predict", predict, "score X-rays (files, folders, DICOM) with a checkpoint; --saliency for Grad-CAM")
    register("export", export, "write a checkpoint as ONNX or TorchScript (adapter and normalisation inside)")
    register("shift", shift, "copy images (folder or npz) as a second hospital's scanner would differ (seeded)")

