"""Decode once per site: decoded splits cached on disk as memory-mappable ``.npy`` files.

A federated client process starts for every round; decoding thousands of JPEGs each
time would dominate the round. A dataset factory therefore wraps its decoding in
``cached_splits``: the first call decodes and writes the arrays, later calls map
them from disk in milliseconds (``np.load(mmap_mode="r")``: the OS shares the pages
between processes and only reads what a batch touches).

The key is a hash of what determines the decoded pixels: the dataset name, the
identity of its source files (path, size, modification time; see
``fingerprint_files``), the image size and ``FORMAT_VERSION``. Changing, adding or
removing a file therefore decodes again. Entries are never evicted; deleting the
cache folder is always safe.

Layout: ``CACHE_ROOT/<dataset>-<size>px-<key>/`` holding ``{train,val,test}_images.npy``
(uint8), ``{train,val,test}_labels.npy`` (int64) and ``manifest.json``. An entry is
written in a temporary folder and renamed into place, so a crash never leaves a
half-written entry; an entry that fails its checks when read (missing or truncated
file, shapes not matching the manifest) is discarded and rebuilt.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import tempfile
import uuid
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np

from rwft.core.config import DataConfig
from rwft.core.data import DatasetSplits, ImageSplit

# Bump when the same source would decode to different arrays (resampling, layout, ...).
FORMAT_VERSION = 2  # 2: 16-bit PNG/TIFF decoded instead of left out
CACHE_DIR_ENV = "RWFT_CACHE_DIR"
_SPLITS = ("train", "val", "test")
_MANIFEST = "manifest.json"


def cache_root(data: DataConfig) -> Path:
    """Where decoded images are cached: ``data.cache_dir``, else ``$RWFT_CACHE_DIR``, else ``~/.cache/rwft``."""
    configured = data.cache_dir or os.environ.get(CACHE_DIR_ENV)
    return Path(configured).expanduser() if configured else Path.home() / ".cache" / "rwft"


def fingerprint_files(paths: Iterable[Path]) -> str:
    """A hash of every file's absolute path, size and modification time (order does not matter).

    Cheap (one ``stat`` per file) and it changes whenever a file is replaced, edited,
    added or removed, without reading any pixels.
    """
    digest = hashlib.sha256()
    for path in sorted(Path(p).absolute() for p in paths):
        try:
            stat = path.stat()
        except OSError:
            # A dangling or looping symlink, or a file gone meanwhile: a bad file the dataset
            # reports (or skips) when it decodes; the link itself still identifies it.
            try:
                stat = path.lstat()
            except OSError:
                digest.update(f"{path}\0missing\n".encode())
                continue
        digest.update(f"{path}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def cache_key(key_parts: dict[str, Any]) -> str:
    """The hex digest that names a cache entry (``key_parts`` must be JSON-serialisable)."""
    payload = json.dumps({"format": FORMAT_VERSION, **key_parts}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()


def cached_splits(
    key_parts: dict[str, Any],
    build: Callable[[], DatasetSplits],
    cache_dir: str | os.PathLike[str],
) -> DatasetSplits:
    """The splits cached under ``key_parts``, calling ``build()`` only on a miss.

    ``key_parts`` must name everything the decoded arrays depend on and include
    ``dataset`` and ``image_size`` (they name the entry's folder). On a hit the
    images come back as read-only memory maps. A cache that cannot be written (full
    disk, read-only folder) is reported on stderr and the freshly built splits are
    returned: caching is an optimisation, never a reason to stop a site.
    """
    key = cache_key(key_parts)
    entry = Path(cache_dir) / f"{key_parts['dataset']}-{key_parts['image_size']}px-{key[:16]}"
    if entry.exists():
        try:
            return _read(entry, key)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            print(f"rwft: decoded-image cache {entry} is damaged ({exc}); decoding again.", file=sys.stderr)
            _discard(entry)
    splits = build()
    try:
        _write(entry, key, key_parts, splits)
    except OSError as exc:
        print(f"rwft: could not write the decoded-image cache {entry} ({exc}); continuing without it. "
              "Set data.cache_dir or $RWFT_CACHE_DIR to a writable folder.", file=sys.stderr)
        return splits
    return _read(entry, key)


def _read(entry: Path, key: str) -> DatasetSplits:
    manifest = json.loads((entry / _MANIFEST).read_text())
    if manifest["format"] != FORMAT_VERSION or manifest["key"] != key:
        raise ValueError("manifest belongs to another key or format")
    class_names = tuple(manifest["class_names"])
    splits = {}
    for name in _SPLITS:
        count = manifest["counts"][name]
        images = np.load(entry / f"{name}_images.npy", mmap_mode="r")
        labels = np.load(entry / f"{name}_labels.npy")
        if images.dtype != np.uint8 or images.shape != (count, *manifest["image_shape"]):
            raise ValueError(f"{name}_images.npy is {images.dtype} {images.shape}, the manifest says "
                             f"uint8 ({count}, {manifest['image_shape']})")
        labels_in_range = count == 0 or 0 <= labels.min() <= labels.max() < len(class_names)
        if labels.dtype != np.int64 or labels.shape != (count,) or not labels_in_range:
            raise ValueError(f"{name}_labels.npy does not match the manifest")
        splits[name] = ImageSplit(images, labels)
    return DatasetSplits(**splits, class_names=class_names, source=manifest["source"],
                         skipped=tuple(manifest["skipped"]))


def _write(entry: Path, key: str, key_parts: dict[str, Any], splits: DatasetSplits) -> None:
    entry.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{entry.name}.", suffix=".tmp", dir=entry.parent))
    try:
        for name in _SPLITS:
            split: ImageSplit = getattr(splits, name)
            _durable_write(staging / f"{name}_images.npy", lambda f, a=split.images: np.save(f, a))
            _durable_write(staging / f"{name}_labels.npy", lambda f, a=split.labels: np.save(f, a))
        manifest = {
            "format": FORMAT_VERSION, "key": key, "key_parts": key_parts,
            "class_names": list(splits.class_names), "source": splits.source, "skipped": list(splits.skipped),
            "image_shape": list(splits.train.images.shape[1:]),
            "counts": {name: len(getattr(splits, name)) for name in _SPLITS},
        }
        # The manifest goes last: an entry without one is never mistaken for a complete one.
        _durable_write(staging / _MANIFEST, lambda f: f.write(json.dumps(manifest, indent=1).encode()))
        os.replace(staging, entry)
    except OSError:
        # Another process (a second simulated site) may have published the same entry
        # first; its content is identical, so use it.
        if not (entry / _MANIFEST).is_file():
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)  # gone already after a successful rename


def _durable_write(path: Path, write: Callable[[Any], object]) -> None:
    # fsync before the rename: after a power cut the entry is either absent or complete.
    with open(path, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())


def _discard(entry: Path) -> None:
    # Rename first so that no reader ever sees a half-deleted entry under the real name.
    doomed = entry.with_name(f".{entry.name}.{uuid.uuid4().hex}.discarded")
    try:
        os.replace(entry, doomed)
    except OSError:
        return  # another process discarded it already
    shutil.rmtree(doomed, ignore_errors=True)
