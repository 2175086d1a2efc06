"""A second hospital's scanner, simulated: seeded, recorded image shifts (``rwft shift``, ``federation.site_shifts``).

No second chest X-ray dataset is available offline, so a "different hospital" is made
from real images by changing what differs between scanners and sites: detector
resolution, sharpness, exposure, contrast, noise, the compression of the archive, and
the DICOM photometric convention. A ``Shift`` is applied in that physical order:

1. ``resolution``: resampled to ``resolution`` x ``resolution`` (Pillow bicubic,
   antialiased); for arrays that must keep their size (``keep_size``) resampled back,
   so that the detail is lost but the shape stays.
2. ``blur``: Gaussian blur, sigma in pixels of the (resampled) image (softer detector).
3. ``gamma`` and ``brightness``: exposure, ``x ** gamma + brightness`` on ``[0, 1]``.
4. ``contrast``: scaled around the image's mean (a different processing curve).
5. ``noise``: additive Gaussian noise, standard deviation in ``[0, 1]`` units (quantum noise).
6. Quantised to 8 bits; ``jpeg_quality``: JPEG re-compression at that quality (archive).

Noise comes from ``numpy.random.default_rng([seed, index])`` per image, so a shift is
reproducible image by image, whatever the batch. Every shifted copy is recorded in a
``shift.json`` (the shift, the seed, the source).

Shifts are written as ``key=value`` lists, ``gamma=1.4,contrast=0.7,noise=0.02``, or
named presets (``PRESETS``), optionally followed by overrides: ``scanner-b,noise=0``.
"""

from __future__ import annotations

import dataclasses
import io
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from scipy.ndimage import gaussian_filter

from rwft.core.checkpoint import write_json
from rwft.core.errors import ConfigError, DataError


@dataclass(frozen=True)
class Shift:
    gamma: float = 1.0  # exposure curve: x ** gamma (> 1 darker mid-tones, < 1 brighter)
    brightness: float = 0.0  # exposure offset, in [0, 1] units
    contrast: float = 1.0  # around the image mean (< 1 flatter)
    noise: float = 0.0  # Gaussian noise standard deviation, [0, 1] units
    blur: float = 0.0  # Gaussian blur sigma, pixels
    jpeg_quality: int | None = None  # JPEG re-compression quality (1-95); None: none
    resolution: int | None = None  # detector resolution in pixels (square); None: unchanged

    def __post_init__(self) -> None:
        problems = []
        if self.gamma <= 0:
            problems.append(f"gamma={self.gamma} must be > 0")
        if self.contrast < 0:
            problems.append(f"contrast={self.contrast} must be >= 0")
        if self.noise < 0 or self.blur < 0:
            problems.append("noise and blur must be >= 0")
        if self.jpeg_quality is not None and not 1 <= self.jpeg_quality <= 95:
            problems.append(f"jpeg_quality={self.jpeg_quality} must be in 1..95")
        if self.resolution is not None and self.resolution < 4:
            problems.append(f"resolution={self.resolution} must be at least 4")
        if problems:
            raise ConfigError(f"invalid shift: {'; '.join(problems)}.")

    @property
    def is_identity(self) -> bool:
        return self == Shift()


# Named second hospitals. "scanner-b": an older, softer, noisier CR unit with a flatter
# processing curve, archived as low-quality JPEG.
PRESETS: dict[str, Shift] = {
    "none": Shift(),
    "scanner-b": Shift(gamma=1.5, brightness=0.05, contrast=0.7, noise=0.03, blur=0.8, jpeg_quality=40),
    "low-dose": Shift(noise=0.06, contrast=0.85),
    "overexposed": Shift(gamma=0.6, brightness=0.08, contrast=0.8),
}
_ALIASES = {"jpeg": "jpeg_quality", "res": "resolution"}


def parse_shift(text: str) -> Shift:
    """``"scanner-b"``, ``"gamma=1.4,noise=0.02"``, ``"scanner-b,noise=0"`` or ``""`` (no shift) as a ``Shift``."""
    shift = Shift()
    fields = {f.name: f for f in dataclasses.fields(Shift)}
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        if "=" not in part:
            if part not in PRESETS:
                raise ConfigError(f"unknown shift preset {part!r} in {text!r}: presets are {', '.join(PRESETS)}; "
                                  f"or write key=value with keys {', '.join(fields)}.")
            shift = PRESETS[part]  # later key=value entries override the preset's values
            continue
        key, _, value = part.partition("=")
        key = _ALIASES.get(key.strip(), key.strip())
        if key not in fields:
            raise ConfigError(f"unknown shift key {key!r} in {text!r}: use {', '.join(fields)}.")
        try:
            parsed: Any = None if value.strip().lower() in ("none", "null", "") else (
                int(value) if key in ("jpeg_quality", "resolution") else float(value))
        except ValueError:
            raise ConfigError(f"shift {key}={value!r} in {text!r} is not a number.") from None
        shift = dataclasses.replace(shift, **{key: parsed})
    return shift


def site_shifts(specs: Sequence[str], sites: int) -> list[Shift]:
    """``federation.site_shifts`` as one ``Shift`` per site (missing entries: no shift)."""
    if len(specs) > sites:
        raise ConfigError(f"federation.site_shifts has {len(specs)} entries but the federation has {sites} sites: "
                          "give at most one shift per site (\"\" for none).")
    return [parse_shift(spec) for spec in specs] + [Shift()] * (sites - len(specs))


def shift_image(pixels: np.ndarray, shift: Shift, rng: np.random.Generator, *, keep_size: bool = False) -> np.ndarray:
    """One uint8 grayscale image ``(H, W)`` shifted (module docstring); uint8, at ``shift.resolution``
    unless ``keep_size``."""
    if shift.is_identity:
        return pixels
    height, width = pixels.shape
    image = Image.fromarray(pixels)
    if shift.resolution is not None:
        image = image.resize((shift.resolution, shift.resolution), Image.Resampling.BICUBIC)
    x = np.asarray(image, dtype=np.float64) / 255.0
    if shift.blur > 0:
        x = gaussian_filter(x, sigma=shift.blur, mode="reflect")
    x = np.clip(x, 0.0, 1.0) ** shift.gamma + shift.brightness
    x = (x - x.mean()) * shift.contrast + x.mean()
    if shift.noise > 0:
        x = x + rng.normal(0.0, shift.noise, size=x.shape)
    out = np.rint(np.clip(x, 0.0, 1.0) * 255.0).astype(np.uint8)
    if shift.jpeg_quality is not None:
        buffer = io.BytesIO()
        Image.fromarray(out).save(buffer, format="JPEG", quality=shift.jpeg_quality)
        out = np.asarray(Image.open(io.BytesIO(buffer.getvalue())).convert("L"), dtype=np.uint8)
    if keep_size and out.shape != (height, width):
        out = np.asarray(Image.fromarray(out).resize((width, height), Image.Resampling.BICUBIC), dtype=np.uint8)
    return out


def shift_images(images: np.ndarray, shift: Shift, seed: int, *, keep_size: bool = True) -> np.ndarray:
    """A stack of uint8 images ``(N, H, W)`` shifted, image ``i`` with the generator ``[seed, i]``."""
    if shift.is_identity:
        return images
    shifted = [shift_image(np.asarray(image), shift, np.random.default_rng([seed, i]), keep_size=keep_size)
               for i, image in enumerate(images)]
    size = shift.resolution if shift.resolution and not keep_size else images.shape[1]
    return np.stack(shifted) if shifted else np.zeros((0, size, size), np.uint8)


def shift_npz(src: Path, dst: Path, shift: Shift, seed: int) -> dict[str, Any]:
    """A MedMNIST-layout npz with every ``*_images`` array shifted (other arrays copied); returns the record."""
    with np.load(src, allow_pickle=False) as archive:
        arrays = {key: archive[key] for key in archive.files}
    for offset, key in enumerate(sorted(k for k in arrays if k.endswith("_images"))):
        if arrays[key].dtype != np.uint8 or arrays[key].ndim != 3:
            raise DataError(f"{src}: {key} is {arrays[key].dtype} {arrays[key].shape}, not uint8 (N, H, W) grayscale.")
        # A distinct seed per split, so that train and test images never share a noise pattern.
        arrays[key] = shift_images(arrays[key], shift, seed * 1000 + offset, keep_size=False)
    dst.parent.mkdir(parents=True, exist_ok=True)
    with open(dst, "wb") as handle:
        np.savez_compressed(handle, **arrays)
    images = sum(len(v) for k, v in arrays.items() if k.endswith("_images"))
    return _record(src, dst, shift, seed, images=images, dicom=False, record=dst.with_name(dst.stem + ".shift.json"))


def shift_folder(src: Path, dst: Path, shift: Shift, seed: int, *, dicom: bool = False) -> dict[str, Any]:
    """A copy of the image folder ``src`` (any layout) in ``dst`` with every image shifted.

    JPEG, PNG and DICOM files are read (DICOM through ``rwft.core.dicom``) and written
    with their relative path: as JPEG at ``shift.jpeg_quality`` (or 95) when the source
    is a JPEG, PNG otherwise, or with ``dicom`` as MONOCHROME1 DICOM (``.dcm``), the
    convention many CR/DX units export. Other files are copied unchanged. Image ``i`` in
    sorted order uses the generator ``[seed, i]``.
    """
    from rwft.core.dicom import DicomError, is_dicom, read_dicom

    if not src.is_dir():
        raise DataError(f"{src} is not a folder or an .npz file: rwft shift copies one of those.")
    if dst.exists() and any(dst.iterdir()):
        raise DataError(f"{dst} exists and is not empty: choose a new folder for the shifted copy.")
    files = sorted(p for p in src.rglob("*") if p.is_file() and not p.name.startswith("."))
    count = 0
    for index, path in enumerate(files):
        relative = path.relative_to(src)
        try:
            if path.suffix.lower() in (".jpeg", ".jpg", ".png"):
                with Image.open(path) as image:
                    pixels = np.asarray(image.convert("L"), dtype=np.uint8)
            elif is_dicom(path):
                pixels = read_dicom(path)
            else:
                (dst / relative).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(path, dst / relative)
                continue
        except (OSError, DicomError) as exc:
            raise DataError(f"{path} cannot be read ({exc}): fix or remove it before shifting the folder.") from None
        shifted = shift_image(pixels, shift, np.random.default_rng([seed, index]))
        _write_image(dst / relative, shifted, shift, dicom=dicom, was_jpeg=path.suffix.lower() in (".jpeg", ".jpg"))
        count += 1
    return _record(src, dst, shift, seed, images=count, dicom=dicom, record=dst / "shift.json")


def _write_image(target: Path, pixels: np.ndarray, shift: Shift, *, dicom: bool, was_jpeg: bool) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    if dicom:
        write_monochrome1_dicom(target.with_suffix(".dcm"), pixels)
    elif was_jpeg:
        Image.fromarray(pixels).save(target, format="JPEG", quality=shift.jpeg_quality or 95)
    else:
        Image.fromarray(pixels).save(target.with_suffix(".png"), format="PNG")


def write_monochrome1_dicom(path: Path, pixels: np.ndarray) -> Path:
    """An 8-bit MONOCHROME1 DX image whose displayed pixels are ``pixels`` (stored inverted)."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import DigitalXRayImageStorageForPresentation, ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = DigitalXRayImageStorageForPresentation
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Modality = "DX"
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME1"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.PresentationLUTShape = "INVERSE"  # what a DX MONOCHROME1 image carries (read as one inversion)
    ds.PixelData = (255 - pixels.astype(np.uint8)).tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path


def shift_path(src: str | os.PathLike[str], dst: str | os.PathLike[str], shift: Shift, seed: int,
               *, dicom: bool = False) -> dict[str, Any]:
    """``rwft shift``: an npz file or an image folder, shifted into ``dst``; returns what ``shift.json`` records."""
    source, target = Path(src).expanduser(), Path(dst).expanduser()
    if not source.exists():
        raise DataError(f"{source} does not exist: pass an image folder or a MedMNIST .npz file.")
    if source.is_file():
        if source.suffix != ".npz":
            raise DataError(f"{source} is a file but not an .npz: rwft shift copies a folder or an .npz file.")
        if dicom:
            raise DataError("--dicom writes a folder of DICOM files: shift an image folder, not an .npz.")
        if target.suffix != ".npz":
            target = target / source.name
        return shift_npz(source, target, shift, seed)
    return shift_folder(source, target, shift, seed, dicom=dicom)


def _record(src: Path, dst: Path, shift: Shift, seed: int, *, images: int, dicom: bool, record: Path) -> dict[str, Any]:
    content = {"source": str(src.absolute()), "output": str(dst.absolute()), "seed": seed,
               "shift": dataclasses.asdict(shift), "images": images, "monochrome1_dicom": dicom,
               "order": "resolution, blur, gamma+brightness, contrast, noise, 8-bit, jpeg (rwft.core.shift)"}
    write_json(record, content)
    return content | {"record": str(record)}


def describe(shift: Shift) -> str:
    """``key=value`` of every field that differs from no shift (``"none"`` for the identity)."""
    changed = {k: v for k, v in dataclasses.asdict(shift).items() if v != getattr(Shift(), k)}
    return ",".join(f"{k}={v}" for k, v in changed.items()) or "none"

