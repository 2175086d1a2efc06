"""Dataset ``chest_xray``: folders of X-ray images, one subfolder per class.

Two layouts are read (``data.root`` is the folder):

- **Split folders**, as in the Kaggle/Mendeley release:
  ``ROOT/{train,val,test}/{NORMAL,PNEUMONIA}/*.jpeg``. ``train`` is required; every
  split present must have the same class folders. An official val with fewer than
  ``MIN_OFFICIAL_VAL`` images (the public release has 16) is too small to choose
  checkpoints and thresholds on: it is folded into train and ``data.val_fraction``
  of the pooled images is carved out as val instead. A missing ``test`` folder is
  carved out the same way.
- **Class folders of one site**: ``SITE/{NORMAL,PNEUMONIA}/*``, what a hospital
  exports. All images are pooled; test and then val are carved out, each
  ``data.val_fraction`` of the whole site.

Carving is stratified and seeded (``rwft.core.data.stratified_split`` with the run
seed). Labels are the class folders' positions in case-insensitive sorted order, so
``NORMAL`` is 0 and ``PNEUMONIA`` 1.

Files: ``.jpeg``/``.jpg``/``.png``/``.tif`` images, decoded with Pillow to 8-bit grayscale
(16-bit PNG/TIFF scaled from their full 0-65535 range, never clipped) and resized to ``data.image_size`` (aspect ratio not kept, see
``rwft.core.data.resize_square``), once per site: the result is cached
(``rwft.core.cache``). Hidden files (``.DS_Store``, macOS ``._*`` companions),
``Thumbs.db``, ``desktop.ini`` and ``__MACOSX`` are ignored. DICOM files (``.dcm``, or
any name with the ``DICM`` preamble, as PACS exports are often named) are read with
``rwft.core.dicom`` (modality LUT, ``data.dicom.windowing``, MONOCHROME1 inverted); anything else in a
class folder that is not a usable image (damaged or truncated file, wrong
extension, alpha channel, floating-point pixels, dangling symlink, subfolder) is a bad file: an error naming
every one with its fix, or with ``data.on_bad_file=skip`` left out and listed in
``DatasetSplits.skipped``.
"""

from __future__ import annotations

import dataclasses
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from rwft.core.cache import cache_root, cached_splits, fingerprint_files
from rwft.core.config import DataConfig
from rwft.core.data import DatasetSplits, ImageSplit, resize_square, stratified_split
from rwft.core.dicom import DicomError, is_dicom, read_dicom
from rwft.core.errors import DataError
from rwft.core.hookspecs import Register, hookimpl

NAME = "chest_xray"
SPLIT_NAMES = ("train", "val", "test")
IMAGE_SUFFIXES = (".jpeg", ".jpg", ".png", ".tif", ".tiff")
MIN_OFFICIAL_VAL = 100
# Operating-system bookkeeping, never data (dot-files are ignored as well).
OS_ENTRIES = frozenset({"Thumbs.db", "desktop.ini", "__MACOSX"})
_LAYOUT_HELP = ("chest_xray expects ROOT/{train,val,test}/{NORMAL,PNEUMONIA}/*.jpeg or one site's "
                "SITE/{NORMAL,PNEUMONIA}/*.jpeg")


class BadImageFile(Exception):
    """A file that cannot be used as an 8-bit grayscale image; the message says why and how to fix it."""


@dataclass(frozen=True)
class FolderScan:
    """What is on disk before decoding: every candidate file, by split, with its label.

    ``files`` has a key only for split folders that exist (``train`` always; for a
    site's class folders, everything is ``train``).
    """

    root: Path
    has_split_folders: bool
    class_names: tuple[str, ...]
    files: dict[str, list[tuple[Path, int]]]

    def all_files(self) -> list[Path]:
        return [path for entries in self.files.values() for path, _ in entries]


def load_chest_xray(data: DataConfig, *, seed: int) -> DatasetSplits:
    """The ``chest_xray`` dataset factory (contract: ``hookspecs.register_datasets``)."""
    if data.root is None:
        raise DataError(f"{NAME} needs the folder of X-ray images: pass data.root=/path/to/chest_xray or set "
                        f"RWFT_DATA_DIR. {_LAYOUT_HELP}.")
    scan = scan_folder(Path(data.root))
    key_parts = {"dataset": NAME, "root": str(scan.root), "files": fingerprint_files(scan.all_files()),
                 "image_size": data.image_size, "dicom_windowing": data.dicom.windowing}
    found = cached_splits(key_parts, lambda: decode_scan(scan, data.image_size, data.dicom.windowing),
                          cache_root(data))
    if found.skipped and data.on_bad_file == "error":
        raise DataError(
            f"{len(found.skipped)} of {len(scan.all_files())} files under {scan.root} cannot be used as "
            "8-bit grayscale X-ray images:\n" + "\n".join(f"  {entry}" for entry in found.skipped)
            + "\nFix or remove these files, or set data.on_bad_file=skip to leave them out (they are then listed)."
        )
    _require_every_class(found, present=tuple(scan.files))
    splits = _with_val_and_test(found, scan, data.val_fraction, seed)
    _require_every_class(splits, present=SPLIT_NAMES)
    return splits


def scan_folder(root: Path) -> FolderScan:
    """Find the layout, the classes and every candidate file under ``root``.

    Raises ``DataError`` for problems of structure (missing path, a file instead of a
    folder, no class folders, a single class, class folders differing between
    splits, empty class folders), each naming the folder and the fix. Reads no pixels.
    """
    root = root.expanduser().absolute()
    if not root.exists():
        raise DataError(f"{root} does not exist. Point data.root at the X-ray folder. {_LAYOUT_HELP}.")
    if not root.is_dir():
        raise DataError(f"{NAME} reads a folder, but {root} is a file. {_LAYOUT_HELP}.")
    split_dirs = {split: root / split for split in SPLIT_NAMES if (root / split).is_dir()}
    has_split_folders = "train" in split_dirs
    if split_dirs and not has_split_folders:
        raise DataError(f"{root} has {' and '.join(split_dirs)} folders but no train folder: add "
                        f"{root / 'train'} with its class folders. {_LAYOUT_HELP}.")
    if not has_split_folders:
        split_dirs = {"train": root}
    classes = {split: _class_folders(folder) for split, folder in split_dirs.items()}
    class_names = classes["train"]
    _require_two_classes(split_dirs["train"], class_names)
    for split, names in classes.items():
        if names != class_names:
            raise DataError(f"{split_dirs[split]} has class folders {', '.join(names)} but {split_dirs['train']} "
                            f"has {', '.join(class_names)}: every split needs the same class folders.")

    files: dict[str, list[tuple[Path, int]]] = {}
    empty: list[Path] = []
    for split, folder in split_dirs.items():
        files[split] = []
        for label, name in enumerate(class_names):
            members = _entries(folder / name)
            if not members:
                empty.append(folder / name)
            files[split] += [(path, label) for path in members]
    if empty:
        raise DataError("empty class folder(s): " + ", ".join(map(str, empty)) + ". Put the images of that "
                        "class in it: every class needs images in every split folder.")
    return FolderScan(root, has_split_folders, class_names, files)


def decode_image(path: Path, size: int, windowing: str = "auto") -> np.ndarray:
    """``path`` as a ``(size, size)`` uint8 grayscale array; ``BadImageFile`` if it is not usable.

    ``windowing`` applies to DICOM files (``rwft.core.dicom.read_dicom``).
    """
    if path.is_symlink() and not path.exists():
        raise BadImageFile(f"is a symbolic link to {os.readlink(path)}, which does not exist (or loops): copy "
                           "the real image here, or remove the link")
    if path.is_dir():
        raise BadImageFile("is a folder: rwft reads the images directly inside a class folder; move its images up")
    if is_dicom(path):
        try:
            return resize_square(Image.fromarray(read_dicom(path, windowing)), size)
        except DicomError as bad:
            raise BadImageFile(str(bad)) from None
    if path.suffix.lower() not in IMAGE_SUFFIXES:
        raise BadImageFile(f"unsupported file type {path.suffix or '(no extension)'!r}: rwft reads "
                           f"{', '.join(IMAGE_SUFFIXES)}; convert it, or move it out of the class folder")
    try:
        with Image.open(path) as image:
            _require_8bit_without_alpha(image)
            # A JPEG decodes directly at 1/2, 1/4 or 1/8 scale (DCT scaling): full-resolution
            # films (2,000+ px) decode ~4x faster. Staying at least twice the target size
            # leaves the quality to the final antialiased resize.
            if image.mode.startswith("I;16") or image.mode == "I":
                return _resize_high_depth(image, size)
            image.draft("L", (2 * size, 2 * size))
            return resize_square(image.convert("L"), size)
    except BadImageFile:
        raise
    except PermissionError:
        raise BadImageFile("cannot be read (permission denied): give the account running rwft read access") from None
    except UnidentifiedImageError:
        raise BadImageFile("not an image Pillow can read (wrong content for its extension, or a damaged "
                           "header): replace it with the real image or remove it") from None
    except Exception as exc:  # Pillow reports damaged data as OSError, SyntaxError, ValueError, EOFError, ...
        raise BadImageFile(f"damaged or truncated image ({type(exc).__name__}: {exc}): copy it again from "
                           "the source, or remove it") from None


def decode_scan(scan: FolderScan, size: int, windowing: str = "auto") -> DatasetSplits:
    """Decode every file of ``scan`` into splits as found on disk; bad files go to ``skipped``.

    Splits without a folder come back empty. Files are decoded by a thread pool of
    Python's default size (Pillow releases the GIL while decoding). Measured on
    2,000 px films resized to 224: 2x faster on 2 cores, 11x on 16; on the 224 px
    JPEGs of ../shared/data about 1.2x on 2 cores. A progress bar shows on a terminal.
    """
    jobs = [(split, path, label) for split, entries in scan.files.items() for path, label in entries]
    with ThreadPoolExecutor() as pool:
        results = list(tqdm(pool.map(lambda job: _decode_or_reason(job[1], size, windowing), jobs), total=len(jobs),
                            desc=f"decoding {scan.root.name} at {size}px", unit="img", disable=None))
    images: dict[str, list[np.ndarray]] = {split: [] for split in SPLIT_NAMES}
    labels: dict[str, list[int]] = {split: [] for split in SPLIT_NAMES}
    skipped = []
    for (split, path, label), result in zip(jobs, results):
        if isinstance(result, str):
            skipped.append(f"{path}: {result}")
        else:
            images[split].append(result)
            labels[split].append(label)

    def as_split(split: str) -> ImageSplit:
        if not images[split]:
            return ImageSplit.empty(size)
        return ImageSplit(np.stack(images[split]), np.asarray(labels[split], dtype=np.int64))

    return DatasetSplits(as_split("train"), as_split("val"), as_split("test"), scan.class_names,
                         source=str(scan.root), skipped=tuple(skipped))


def _decode_or_reason(path: Path, size: int, windowing: str) -> np.ndarray | str:
    try:
        return decode_image(path, size, windowing)
    except BadImageFile as bad:
        return str(bad)


def _resize_high_depth(image: Image.Image, size: int) -> np.ndarray:
    """A 16-bit grayscale image at its real depth: 0..65535 scaled linearly to 0..255 after resizing.

    Pillow's own conversion to 8 bits clips at 255 (a 16-bit film turns white), so the
    scaling is done here, and in float so that no level is lost before the resize.
    """
    pixels = np.asarray(image, dtype=np.float32)
    if pixels.max(initial=0) > 65535 or pixels.min(initial=0) < 0:
        raise BadImageFile(f"{image.mode} image with values outside 0-65535 (not a 16-bit grayscale image): save it "
                           "as 8- or 16-bit grayscale")
    resized = Image.fromarray(pixels * (255.0 / 65535.0), mode="F")
    if resized.size != (size, size):
        resized = resized.resize((size, size), Image.Resampling.BICUBIC)
    return np.clip(np.rint(np.asarray(resized)), 0, 255).astype(np.uint8)


def _require_8bit_without_alpha(image: Image.Image) -> None:
    mode = image.mode
    if mode == "F" or (mode.startswith("I") and not (mode.startswith("I;16") or mode == "I")):
        raise BadImageFile(
            f"image of mode {mode} (floating point or unusual depth); rwft reads 8- and 16-bit grayscale: save it as "
            "one of those, e.g. `magick IN.tif -auto-level -depth 16 OUT.png`")
    if "A" in mode or "a" in mode or "transparency" in image.info:
        raise BadImageFile(
            f"has an alpha channel (mode {mode}); X-rays are read as 8-bit grayscale without transparency: "
            "flatten it, e.g. `magick IN.png -background black -alpha remove -colorspace Gray OUT.png`")


def _entries(folder: Path) -> list[Path]:
    """The entries of ``folder`` that are data (not operating-system bookkeeping), sorted."""
    try:
        return sorted(p for p in folder.iterdir() if not (p.name.startswith(".") or p.name in OS_ENTRIES))
    except OSError as exc:
        raise DataError(f"cannot list {folder} ({exc}): check that rwft may read it.") from None


def _class_folders(folder: Path) -> tuple[str, ...]:
    entries = _entries(folder)
    names = [p.name for p in entries if p.is_dir()]
    if not names:
        loose = sum(1 for p in entries if p.suffix.lower() in IMAGE_SUFFIXES)
        hint = f" It holds {loose} images directly: sort them into class folders." if loose else ""
        raise DataError(f"{folder} has no class subfolders.{hint} {_LAYOUT_HELP}.")
    # Case-insensitive, so that NORMAL/normal is label 0 and PNEUMONIA/pneumonia label 1 however spelled.
    return tuple(sorted(names, key=str.casefold))


def _require_two_classes(folder: Path, class_names: tuple[str, ...]) -> None:
    if len(class_names) >= 2:
        return
    only = folder / class_names[0]
    hint = f" If {only} holds the train/val/test folders, set data.root={only}." if (only / "train").is_dir() else ""
    raise DataError(f"{folder} has only one class folder ({class_names[0]}); a classifier needs at least two, "
                    f"e.g. NORMAL/ and PNEUMONIA/.{hint}")


def _with_val_and_test(found: DatasetSplits, scan: FolderScan, val_fraction: float, seed: int) -> DatasetSplits:
    """Carve the splits the source lacks out of train (see the module docstring)."""
    train, val, test = found.train, found.val, found.test
    notes = []
    pool_size = len(train) + (len(val) if len(val) < MIN_OFFICIAL_VAL else 0)
    if "test" not in scan.files:
        if val_fraction >= 0.5:
            raise DataError(f"data.val_fraction={val_fraction} leaves no training data when val and test are "
                            f"both carved out of {scan.root}: use a value below 0.5 (e.g. 0.1).")
        train, test = _hold_out(train, val_fraction, seed)
        notes.append(f"test = {val_fraction:.0%} carved out")
    if len(val) < MIN_OFFICIAL_VAL:
        if len(val):
            notes.append(f"the official val ({len(val)} images) folded into train")
            train = ImageSplit(np.concatenate([train.images, val.images]), np.concatenate([train.labels, val.labels]))
        # Carve val as val_fraction of the pool, not of what is left after carving test.
        train, val = _hold_out(train, val_fraction * pool_size / len(train), seed)
        notes.append(f"val = {val_fraction:.0%} carved out")
    layout = "train/val/test folders" if scan.has_split_folders else "class folders of one site"
    source = f"{scan.root} ({layout}; {', '.join(notes) or 'official splits'}; stratified, seed {seed})"
    return dataclasses.replace(found, train=train, val=val, test=test, source=source)


def _hold_out(split: ImageSplit, fraction: float, seed: int) -> tuple[ImageSplit, ImageSplit]:
    keep, held = stratified_split(split.labels, fraction, seed)
    return split.subset(keep), split.subset(held)


def _require_every_class(splits: DatasetSplits, present: tuple[str, ...]) -> None:
    for name in present:
        counts = getattr(splits, name).class_counts(splits.num_classes)
        missing = [cls for cls, count in zip(splits.class_names, counts) if count == 0]
        if missing:
            raise DataError(f"the {name} split of {splits.source} has no images of class {', '.join(missing)} "
                            "(too few images of that class, or all of them left out as unreadable). Every class "
                            "needs images in train, val and test: add images of it.")


@hookimpl
def register_datasets(register: Register) -> None:
    register(NAME, load_chest_xray, "folders of X-ray images: ROOT/{train,val,test}/{NORMAL,PNEUMONIA} "
             "or one site's SITE/{NORMAL,PNEUMONIA}")
