"""A small real checkpoint: EfficientNet-Lite0 (ImageNet) fine-tuned for a few steps on real chest X-rays."""

from __future__ import annotations

from pathlib import Path

from rwft.core.config import load_config
from rwft.core.run import train


def small_site(shared_data: Path, folder: Path, per_class: int = 20) -> Path:
    """``folder/{NORMAL,PNEUMONIA}/`` linking ``per_class`` real training JPEGs of each class."""
    for label in ("NORMAL", "PNEUMONIA"):
        (folder / label).mkdir(parents=True, exist_ok=True)
        for jpeg in sorted((shared_data / "chest_xray" / "train" / label).glob("*.jpeg"))[:per_class]:
            (folder / label / jpeg.name).symlink_to(jpeg)
    return folder


def train_tiny_checkpoint(shared_data: Path, run_dir: Path, image_size: int = 64) -> Path:
    """Train for seconds on 2 CPU cores and return ``RUN_DIR/best.pt`` (threshold chosen on validation)."""
    site = small_site(shared_data, run_dir / "site")
    cfg = load_config(overrides=[
        "data.dataset=chest_xray", f"data.root={site}", f"data.image_size={image_size}", "data.val_fraction=0.2",
        f"data.cache_dir={run_dir / 'cache'}", "train.epochs=1", "train.batch_size=16", "train.bootstrap=10",
        "train.max_steps_per_epoch=2", f"output_dir={run_dir}"])
    train(cfg, progress=False)
    return run_dir / "best.pt"
