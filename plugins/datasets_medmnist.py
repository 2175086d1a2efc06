"""Dataset ``medmnist``: a MedMNIST ``.npz`` file, PneumoniaMNIST by default.

MedMNIST's layout: ``{train,val,test}_images`` uint8 ``(N, H, W)`` and
``{train,val,test}_labels`` ``(N, 1)``. ``data.root`` is the npz file itself or a
folder holding ``pneumoniamnist.npz``. Without a root (and no ``$RWFT_DATA_DIR``),
PneumoniaMNIST at 28 px is read from the copy shipped inside this package
(``plugins/data/pneumoniamnist_28.npz``, CC BY 4.0, attribution and licence beside it),
so that rwft runs on a fresh machine with no data and no internet; a larger
``data.medmnist_size`` (64, 128, 224) is downloaded by the ``medmnist`` package
(``pip install 'rwft[medmnist]'``) into the cache folder. Images are resized to ``data.image_size`` (Pillow bicubic, see
``rwft.core.data.resize_square``) once and cached (``rwft.core.cache``). The
official val split (524 images for PneumoniaMNIST) is large enough and kept as is.
Other single-label grayscale MedMNIST files (BreastMNIST, ...) load the same way.
"""

from __future__ import annotations

import zipfile
import zlib
from importlib import resources
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
# The 28 px PneumoniaMNIST shipped as package data (see plugins/data/README.txt).
PACKAGED_SIZE = 28
PACKAGED_FILE = "pneumoniamnist_28.npz"
MEDMNIST_SIZES = (28, 64, 128, 224)
SPLIT_NAMES = ("train", "val", "test")
REQUIRED_KEYS = tuple(f"{split}_{part}" for split in SPLIT_NAMES for part in ("images", "labels"))
# MedMNIST's own label names, spelled like the chest_xray class folders.
CLASS_NAMES = {"pneumoniamnist": ("NORMAL", "PNEUMONIA")}
_NO_DATA = ("medmnist has no data at data.medmnist_size={size}: pass data.root=/path/to/pneumoniamnist.npz or "
            "set RWFT_DATA_DIR, or `pip install 'rwft[medmnist]'` to download it, or data.medmnist_size=28 for "
            "the copy shipped with rwft.")
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


def packaged_npz() -> Path:
    """The PneumoniaMNIST 28 px file shipped inside the package (a real file on disk, also from a wheel)."""
    return Path(str(resources.files("rwft.plugins").joinpath("data", PACKAGED_FILE)))


def _locate_npz(data: DataConfig) -> Path:
    if data.root is None:
        if data.medmnist_size == PACKAGED_SIZE:
            return packaged_npz()
        return _download(cache_root(data) / NAME, data.medmnist_size)
    root = Path(data.root)
    if not root.exists():
        raise DataError(f"{root} does not exist: pass data.root=/path/to/{DEFAULT_FILE}.")
    if root.is_dir():
        if not (root / DEFAULT_FILE).is_file():
            raise DataError(f"{root} is a folder without {DEFAULT_FILE}: pass data.root=/path/to/{DEFAULT_FILE} "
                            "(the file itself, or the folder holding it).")
        return root / DEFAULT_FILE
    return root


def _download(folder: Path, size: int) -> Path:
    if size not in MEDMNIST_SIZES:
        raise DataError(f"data.medmnist_size={size} is not a MedMNIST size: use one of "
                        f"{', '.join(map(str, MEDMNIST_SIZES))} (28 is shipped with rwft, the others download).")
    try:
        import medmnist
    except ImportError:
        raise DataError(_NO_DATA.format(size=size)) from None
    folder.mkdir(parents=True, exist_ok=True)
    try:
        # Fetches pneumoniamnist_SIZE.npz into the folder (checking its MD5) unless it is there already.
        medmnist.PneumoniaMNIST(split="train", download=True, root=str(folder), size=size)
    except Exception as exc:  # medmnist reports every download failure as RuntimeError with instructions
        raise DataError(f"downloading PneumoniaMNIST at {size} px with the medmnist package into {folder} failed: "
                        f"{exc}\nOr pass data.root=/path/to/{DEFAULT_FILE}, or data.medmnist_size=28 for the copy "
                        "shipped with rwft.") from None
    return folder / f"pneumoniamnist_{size}.npz"


@hookimpl
def register_datasets(register: Register) -> None:
    register(NAME, load_medmnist, "MedMNIST npz (PneumoniaMNIST): data.root=FILE.npz or a folder holding "
             "pneumoniamnist.npz; with no root, the 28 px PneumoniaMNIST shipped with rwft (MedMNIST v2, "
             "Yang et al. 2023, CC BY 4.0; plugins/data/README.txt); larger data.medmnist_size downloads "
             "with the medmnist package")
