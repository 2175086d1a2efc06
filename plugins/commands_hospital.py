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


@hookimpl
def register_commands(register: Register) -> None:
    register("predict", predict, "score X-rays (files, folders, DICOM) with a checkpoint; --saliency for Grad-CAM")
    register("export", export, "write a checkpoint as ONNX or TorchScript (adapter and normalisation inside)")

