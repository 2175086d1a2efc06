"""Dataset ``medmnist``: a MedMNIST ``.npz`` file, PneumoniaMNIST by default.

MedMNIST's layout: ``{train,val,test}_images`` uint8 ``(N, H, W)`` and
``{train,val,test}_labels`` ``(N, 1)``. ``data.root`` is the npz file itself or a
folder holding ``pneumoniamnist.npz``. Without a root, the ``medmnist`` package (if
installed) downloads PneumoniaMNIST (28 px, the file in ``../shared/data``) into the
cache folder. Images are resized to ``data.image_size`` (Pillow bicubic, see
``rwft.core.data.resize_square``) once and cached (``rwft.core.cache``). The
official val split (524 images for PneumoniaMNIST) is large enough and kept as is.
Other single-label grayscale MedMNIST files (BreastMNIST, ...) load the same way.
"""

from __future__ import annotations

import zipfile
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

from rwft.core.cache import cache_root, cached_splits, fingerprint_files
from rwft.core.config import DataConfig
from rwft.core.data import DatasetSplits, ImageSplit, resize_square
from rwft.core.errors import DataError
from rwft.core.hookspecs import Register, hookimpl

NAME = "medmnist"
DEFAULT_FILE = "pneumoniamnist.npz"
SPLIT_NAMES = ("train", "val", "test")
REQUIRED_KEYS = tuple(f"{split}_{part}" for split in SPLIT_NAMES for part in ("images", "labels"))
# MedMNIST's own label names, spelled like the chest_xray class folders.
CLASS_NAMES = {"pneumoniamnist": ("NORMAL", "PNEUMONIA")}
_NO_DATA = ("medmnist has no data: pass data.root=/path/to/pneumoniamnist.npz or set RWFT_DATA_DIR, "
            "or `pip install medmnist` to download.")
_LAYOUT = ("A MedMNIST npz holds uint8 train_images (N, H, W) with train_labels (N, 1), and the same for "
           "val and test; get pneumoniamnist.npz again from https://zenodo.org/records/10519652 or with "
           "`pip install medmnist`.")


def load_medmnist(data: DataConfig, *, seed: int) -> DatasetSplits:
    """The ``medmnist`` dataset factory (contract: ``hookspecs.register_datasets``).

    ``seed`` is unused: the official splits are kept.
    """
    npz = _locate_npz(data)
    key_parts = {"dataset": NAME, "files": fingerprint_files([npz]), "image_size": data.image_size}
    return cached_splits(key_parts, lambda: read_npz(npz, data.image_size), cache_root(data))


def read_npz(path: Path, image_size: int) -> DatasetSplits:
    """The splits stored in a MedMNIST npz, resized to ``image_size``.

    Raises ``DataError`` naming the file, the missing or malformed key and the fix
    when ``path`` is not an npz archive or not in MedMNIST's layout.
    """
    try:
        archive = np.load(path, allow_pickle=False)
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
        raise DataError(f"{path} is not a readable npz archive ({type(exc).__name__}: {exc}). {_LAYOUT}") from None
    if not isinstance(archive, np.lib.npyio.NpzFile):
        raise DataError(f"{path} holds a single array, not an npz archive. {_LAYOUT}")
    with archive:
        missing = [key for key in REQUIRED_KEYS if key not in archive.files]
        if missing:
            raise DataError(f"{path} lacks the key(s) {', '.join(missing)} "
                            f"(it has {', '.join(archive.files) or 'none'}). {_LAYOUT}")
        splits = {split: _read_split(archive, path, split, image_size) for split in SPLIT_NAMES}
    num_classes = max(int(split.labels.max(initial=0)) for split in splits.values()) + 1
    stem = path.stem.split("_")[0]  # MedMNIST+ files are named e.g. pneumoniamnist_64.npz
    class_names = CLASS_NAMES.get(stem, tuple(f"class {i}" for i in range(num_classes)))
    if num_classes > len(class_names):
        raise DataError(f"{path} has labels up to {num_classes - 1}, but {stem} has only {len(class_names)} "
                        f"classes ({', '.join(class_names)}). {_LAYOUT}")
    return DatasetSplits(**splits, class_names=class_names, source=str(path))


def _read_split(archive: np.lib.npyio.NpzFile, path: Path, split: str, image_size: int) -> ImageSplit:
    images, labels = _array(archive, path, f"{split}_images"), _array(archive, path, f"{split}_labels")
    if images.dtype != np.uint8 or images.ndim != 3:
        raise DataError(f"{path}: {split}_images is {images.dtype} {images.shape}, not uint8 (N, H, W) grayscale "
                        f"(color MedMNIST sets are not supported). {_LAYOUT}")
    if labels.shape not in ((len(images),), (len(images), 1)):
        raise DataError(f"{path}: {split}_labels has shape {labels.shape}; {split}_images has {len(images)} "
                        f"images, so it must be ({len(images)}, 1): one class per image. {_LAYOUT}")
    if not np.issubdtype(labels.dtype, np.integer) or (labels.size and labels.min() < 0):
        raise DataError(f"{path}: {split}_labels must be non-negative integers, got {labels.dtype}. {_LAYOUT}")
    if not len(images):
        return ImageSplit.empty(image_size)
    resized = np.stack([resize_square(Image.fromarray(image), image_size) for image in images])
    return ImageSplit(resized, labels.reshape(-1).astype(np.int64))


def _array(archive: np.lib.npyio.NpzFile, path: Path, key: str) -> np.ndarray:
    try:
        return archive[key]
    except (OSError, ValueError, zipfile.BadZipFile, zlib.error) as exc:  # damaged member, pickled objects
        raise DataError(f"{path}: key {key} cannot be read ({type(exc).__name__}: {exc}). {_LAYOUT}") from None


def _locate_npz(data: DataConfig) -> Path:
    if data.root is None:
        return _download(cache_root(data) / NAME)
    root = Path(data.root)
    if not root.exists():
        raise DataError(f"{root} does not exist: pass data.root=/path/to/{DEFAULT_FILE}.")
    if root.is_dir():
        if not (root / DEFAULT_FILE).is_file():
            raise DataError(f"{root} is a folder without {DEFAULT_FILE}: pass data.root=/path/to/{DEFAULT_FILE} "
                            "(the file itself, or the folder holding it).")
        return root / DEFAULT_FILE
    return root


def _download(folder: Path) -> Path:
    try:
        import medmnist
    except ImportError:
        raise DataError(_NO_DATA) from None
    folder.mkdir(parents=True, exist_ok=True)
    try:
        # Fetches pneumoniamnist.npz into the folder (checking its MD5) unless it is there already.
        medmnist.PneumoniaMNIST(split="train", download=True, root=str(folder))
    except Exception as exc:  # medmnist reports every download failure as RuntimeError with instructions
        raise DataError(f"downloading PneumoniaMNIST with the medmnist package into {folder} failed: {exc}\n"
                        f"Or pass data.root=/path/to/{DEFAULT_FILE}.") from None
    return folder / DEFAULT_FILE


@hookimpl
def register_datasets(register: Register) -> None:
    register(NAME, load_medmnist, "MedMNIST npz (PneumoniaMNIST): data.root=FILE.npz or a folder holding "
             "pneumoniamnist.npz; downloads with the medmnist package when no root is given")
