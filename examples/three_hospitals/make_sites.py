"""Give three hospitals and the coordinating server their own folders of X-rays.

    python examples/three_hospitals/make_sites.py ../shared/data/chest_xray WORK/data

Reads the Kaggle/Mendeley layout (``chest_xray/{train,val,test}/{NORMAL,PNEUMONIA}``) and
writes, as symbolic links (nothing is copied, the source stays untouched):

- ``hospitalA/``, ``hospitalB/``, ``hospitalC/``: the official train images shared out
  50% / 30% / 20% (hospitals differ in size), each as one site's export: ``NORMAL/`` and
  ``PNEUMONIA/`` folders. Each site carves its own validation and test images from these.
- ``server/``: what the coordinating server holds out, which no hospital trains on: half
  the official test images as ``val/`` (scored after every round), the other half as
  ``test/`` (reported once at the end), and the 16 official val images as ``train/``
  (the folder layout needs one; the server never trains).
"""

from __future__ import annotations

import random
import sys
from pathlib import Path

SHARES = {"hospitalA": 0.5, "hospitalB": 0.3, "hospitalC": 0.2}
CLASSES = ("NORMAL", "PNEUMONIA")


def link(files: list[Path], folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for file in files:
        (folder / file.name).symlink_to(file.resolve())


def main(source: Path, out: Path) -> None:
    if not (source / "train" / "NORMAL").is_dir():
        sys.exit(f"{source} is not the chest_xray folder (it needs train/NORMAL, train/PNEUMONIA, test/, val/)")
    if out.exists():
        sys.exit(f"{out} exists already; pass a new folder")
    rng = random.Random(0)
    for cls in CLASSES:
        train = sorted((source / "train" / cls).iterdir())
        rng.shuffle(train)
        start = 0
        for site, share in SHARES.items():
            count = round(share * len(train)) if site != "hospitalC" else len(train) - start
            link(train[start:start + count], out / site / cls)
            start += count
        test = sorted((source / "test" / cls).iterdir())
        rng.shuffle(test)
        link(test[: len(test) // 2], out / "server" / "val" / cls)
        link(test[len(test) // 2:], out / "server" / "test" / cls)
        link(sorted((source / "val" / cls).iterdir()), out / "server" / "train" / cls)
    for folder in sorted(out.iterdir()):
        counts = {cls: sum(1 for _ in folder.rglob(f"{cls}/*")) for cls in CLASSES}
        print(f"{folder.name:10s} " + "  ".join(f"{cls} {n:5d}" for cls, n in counts.items()))


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    main(Path(sys.argv[1]), Path(sys.argv[2]))
