"""Dataset ``dicom``: a hospital's PACS export of DICOM X-rays (``data.dataset=dicom``).

Two ways to say which class each file is:

- **Class folders**, exactly as ``chest_xray`` reads them (``ROOT/{NORMAL,PNEUMONIA}/*``
  or ``ROOT/{train,val,test}/{NORMAL,PNEUMONIA}/*``); files may have any name, the
  ``DICM`` preamble marks them as DICOM.
- **A labels CSV** (``data.labels_csv=labels.csv``) for a flat export: one row per file,
  ``file,label`` (a header row ``file,label`` is optional), ``file`` relative to
  ``data.root`` (or absolute), ``label`` the class name. Classes are the distinct labels
  in case-insensitive sorted order, so ``NORMAL`` is 0 and ``PNEUMONIA`` 1 as with
  folders. Test and validation splits are carved out as for one site's class folders.

Pixels are read by ``rwft.core.dicom`` (modality LUT, ``data.dicom.windowing``,
MONOCHROME1 inverted once); decoding, caching, carving and bad-file handling are
``chest_xray``'s, so both datasets treat the same file the same way.
"""

from __future__ import annotations

import csv
from pathlib import Path

from rwft.core.cache import cache_root, cached_splits, fingerprint_files
from rwft.core.config import DataConfig
from rwft.core.data import DatasetSplits
from rwft.core.errors import DataError
from rwft.core.hookspecs import Register, hookimpl
from rwft.plugins.datasets_chest_xray import (
    SPLIT_NAMES,
    FolderScan,
    _require_every_class,
    _with_val_and_test,
    decode_scan,
    scan_folder,
)

NAME = "dicom"
_CSV_HELP = ("data.labels_csv is a CSV with one row per image: file,label (file relative to data.root, "
             "label a class name such as NORMAL or PNEUMONIA)")


def load_dicom(data: DataConfig, *, seed: int) -> DatasetSplits:
    """The ``dicom`` dataset factory (contract: ``hookspecs.register_datasets``)."""
    if data.root is None:
        raise DataError(f"{NAME} needs the folder of the PACS export: pass data.root=/path/to/export (class "
                        f"folders, or flat with data.labels_csv=labels.csv) or set RWFT_DATA_DIR.")
    root = Path(data.root)
    scan = scan_labels_csv(root, Path(data.labels_csv)) if data.labels_csv else scan_folder(root)
    listed = scan.all_files() + ([Path(data.labels_csv).expanduser().absolute()] if data.labels_csv else [])
    key_parts = {"dataset": NAME, "root": str(scan.root), "files": fingerprint_files(listed),
                 "image_size": data.image_size, "dicom_windowing": data.dicom.windowing,
                 "class_names": list(scan.class_names)}
    found = cached_splits(key_parts, lambda: decode_scan(scan, data.image_size, data.dicom.windowing),
                          cache_root(data))
    if found.skipped and data.on_bad_file == "error":
        raise DataError(
            f"{len(found.skipped)} of {len(scan.all_files())} files under {scan.root} cannot be used as "
            "grayscale X-ray images:\n" + "\n".join(f"  {entry}" for entry in found.skipped)
            + "\nFix or remove these files, or set data.on_bad_file=skip to leave them out (they are then listed)."
        )
    _require_every_class(found, present=tuple(scan.files))
    splits = _with_val_and_test(found, scan, data.val_fraction, seed)
    _require_every_class(splits, present=SPLIT_NAMES)
    return splits


def scan_labels_csv(root: Path, labels_csv: Path) -> FolderScan:
    """Every file listed in ``labels_csv`` with its label, as one site's (train-only) scan.

    Raises ``DataError`` naming the CSV and the row for a missing file, a malformed
    row, a duplicate file or fewer than two classes.
    """
    root, labels_csv = root.expanduser().absolute(), labels_csv.expanduser().absolute()
    if not root.is_dir():
        raise DataError(f"data.root={root} is not a folder: point it at the folder the CSV's file names are in.")
    if not labels_csv.is_file():
        raise DataError(f"data.labels_csv={labels_csv} does not exist. {_CSV_HELP}.")
    rows: list[tuple[Path, str]] = []
    missing: list[str] = []
    seen: set[Path] = set()
    with open(labels_csv, newline="", encoding="utf-8-sig") as handle:
        for line, row in enumerate(csv.reader(handle), start=1):
            if not row or not "".join(row).strip():
                continue
            if line == 1 and [cell.strip().lower() for cell in row[:2]] == ["file", "label"]:
                continue
            if len(row) < 2 or not row[0].strip() or not row[1].strip():
                raise DataError(f"{labels_csv} line {line} is {row!r}, not file,label. {_CSV_HELP}.")
            path = (root / row[0].strip()).absolute()
            if path in seen:
                raise DataError(f"{labels_csv} line {line} lists {row[0].strip()} a second time: give each file "
                                "one label.")
            seen.add(path)
            if not path.is_file():
                missing.append(f"line {line}: {path}")
            rows.append((path, row[1].strip()))
    if missing:
        raise DataError(f"{len(missing)} file(s) listed in {labels_csv} do not exist under {root}:\n"
                        + "\n".join(f"  {entry}" for entry in missing[:20])
                        + "\nFix the paths (relative to data.root) or remove those rows.")
    class_names = tuple(sorted({label for _, label in rows}, key=str.casefold))
    if len(class_names) < 2:
        raise DataError(f"{labels_csv} has {len(class_names)} class(es) ({', '.join(class_names) or 'none'}); a "
                        "classifier needs at least two, e.g. NORMAL and PNEUMONIA.")
    index = {name: i for i, name in enumerate(class_names)}
    return FolderScan(root, False, class_names, {"train": [(path, index[label]) for path, label in rows]})


@hookimpl
def register_datasets(register: Register) -> None:
    register(NAME, load_dicom, "a PACS export of DICOM X-rays (any file name): class folders as chest_xray, or "
             "flat with data.labels_csv=file,label; data.dicom.windowing=auto|none")
