"""Reading an X-ray out of a DICOM file, the way a DICOM viewer would display it.

``read_dicom(path)`` returns the displayed image as 8-bit grayscale at the file's own
resolution. The order is the DICOM grayscale pipeline (PS3.3 C.11, PS3.4 N.2), done
with pydicom's own functions, not re-implemented:

1. ``pixel_array``: stored values, decompressed by pydicom's decoder plugins (RLE
   natively; JPEG 2000 with ``pip install 'rwft[dicom]'``; JPEG lossless and JPEG-LS
   with ``python-gdcm``). A missing decoder is an error naming what to install.
2. Modality LUT (``RescaleSlope``/``RescaleIntercept`` or a Modality LUT Sequence).
3. VOI: the file's VOI LUT, else its window (``WindowCenter``/``WindowWidth``), when
   ``windowing="auto"`` and the file has one; ``"none"`` skips it.
4. Scaling to ``[0, 1]`` by the *output range* of the last step: the range of the VOI
   LUT's entries, the windowing's output range, or without VOI the modality-transformed
   range of the stored values (``BitsStored``, ``PixelRepresentation``). 12- and 16-bit
   data are therefore scaled as a whole, never clipped or wrapped to 8 bits.
5. ``MONOCHROME1`` (bright = low values) is inverted, last and exactly once;
   ``PresentationLUTShape == "INVERSE"`` means the same single inversion (PS3.3
   C.8.11.6.1.2: a MONOCHROME1 image carries INVERSE), never a second one. pydicom
   itself never inverts.

Refused with a ``DicomError`` that says why and what to do: files without pixel data
(structured reports, presentation states, key-object notes), multi-frame objects
(tomosynthesis, cine), colour images, damaged or truncated files.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

DICOM_SUFFIXES = (".dcm", ".dicom")
_PREAMBLE_LENGTH = 128
_MAGIC = b"DICM"
_GRAYSCALE = ("MONOCHROME1", "MONOCHROME2")
# Objects that carry no image, by Modality: say what they are instead of "no pixel data".
_NON_IMAGE_MODALITIES = {"SR": "a structured report", "PR": "a presentation state", "KO": "a key object selection",
                         "DOC": "an encapsulated document", "REG": "a registration", "SEG": "a segmentation"}
WINDOWINGS = ("auto", "none")


class DicomError(Exception):
    """A DICOM file rwft cannot use as one grayscale X-ray; the message says why and how to fix it."""


def has_dicom_preamble(path: str | os.PathLike[str]) -> bool:
    """Whether the file carries the ``DICM`` magic after its 128-byte preamble (PS3.10 7.1).

    This recognises DICOM files whatever their name: PACS exports often have no
    extension, or a misleading one.
    """
    try:
        with open(path, "rb") as handle:
            head = handle.read(_PREAMBLE_LENGTH + len(_MAGIC))
    except OSError:
        return False
    return head[_PREAMBLE_LENGTH:] == _MAGIC


def is_dicom(path: str | os.PathLike[str]) -> bool:
    """A ``.dcm``/``.dicom`` file, or any file with the DICOM preamble."""
    return Path(path).suffix.lower() in DICOM_SUFFIXES or has_dicom_preamble(path)


def read_dicom(path: str | os.PathLike[str], windowing: str = "auto") -> np.ndarray:
    """The X-ray in the DICOM file ``path`` as displayed: uint8 ``(rows, columns)``, 0 black, 255 white.

    ``windowing``: ``"auto"`` applies the file's VOI LUT or window when it has one,
    ``"none"`` shows the full modality range. Raises ``DicomError`` (see the module
    docstring) for anything that is not one readable grayscale image.
    """
    return np.rint(read_dicom_float(path, windowing) * 255.0).astype(np.uint8)


def read_dicom_float(path: str | os.PathLike[str], windowing: str = "auto") -> np.ndarray:
    """Like ``read_dicom`` but float64 in ``[0, 1]``, before quantisation to 8 bits."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    if windowing not in WINDOWINGS:
        raise ValueError(f"windowing must be one of {WINDOWINGS}, got {windowing!r}")
    try:
        ds = pydicom.dcmread(path, force=not has_dicom_preamble(path))
    except PermissionError:
        raise DicomError("cannot be read (permission denied): give the account running rwft read access") from None
    except (InvalidDicomError, EOFError, OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise DicomError(f"not a readable DICOM file ({type(exc).__name__}: {exc}): export it again from the "
                         "PACS, or remove it") from None
    _require_single_grayscale_image(ds)
    stored = _pixels(ds)
    modality = _modality_lut(stored, ds)
    low, high = _modality_range(ds)
    if windowing == "auto":
        modality, low, high = _voi(modality, ds, (low, high))
    scaled = np.clip((modality.astype(np.float64) - low) / (high - low), 0.0, 1.0) if high > low \
        else np.zeros(modality.shape)
    inverted = ds.get("PhotometricInterpretation") == "MONOCHROME1" or ds.get("PresentationLUTShape") == "INVERSE"
    return 1.0 - scaled if inverted else scaled


def _require_single_grayscale_image(ds: object) -> None:
    if "PixelData" not in ds and "FloatPixelData" not in ds and "DoubleFloatPixelData" not in ds:  # type: ignore[operator]
        modality = str(getattr(ds, "Modality", "") or "")
        what = _NON_IMAGE_MODALITIES.get(modality, f"a DICOM object without pixel data (Modality {modality or '?'})")
        sop = getattr(getattr(ds, "SOPClassUID", None), "name", None)
        raise DicomError(f"is {what}{f' ({sop})' if sop else ''}, not an image: rwft reads X-ray images only; "
                         "move it out of the image folders")
    frames = int(getattr(ds, "NumberOfFrames", 1) or 1)
    if frames > 1:
        raise DicomError(f"is a multi-frame object ({frames} frames, e.g. tomosynthesis or cine): rwft reads one "
                         "projection X-ray per file; export the frame to use as a single-frame DICOM")
    photometric = getattr(ds, "PhotometricInterpretation", None)
    if photometric not in _GRAYSCALE or int(getattr(ds, "SamplesPerPixel", 1) or 1) != 1:
        raise DicomError(f"has PhotometricInterpretation {photometric} with {getattr(ds, 'SamplesPerPixel', '?')} "
                         "samples per pixel; X-rays are grayscale (MONOCHROME1 or MONOCHROME2): export the "
                         "original grayscale image, not a secondary capture in colour")


def _pixels(ds: object) -> np.ndarray:
    from pydicom.pixels import get_decoder

    syntax = ds.file_meta.get("TransferSyntaxUID") if hasattr(ds, "file_meta") else None  # type: ignore[attr-defined]
    if syntax is not None and syntax.is_compressed:
        try:
            decoder = get_decoder(syntax)
        except NotImplementedError:
            raise DicomError(f"uses the transfer syntax {syntax.name} ({syntax}), which pydicom cannot decode: "
                             "export it uncompressed (Explicit VR Little Endian)") from None
        if not decoder.is_available:
            raise DicomError(f"is compressed as {syntax.name} and no installed decoder reads it "
                             f"({'; '.join(decoder.missing_dependencies)}): {_install_hint(syntax)}")
    try:
        pixels = ds.pixel_array  # type: ignore[attr-defined]
    except Exception as exc:  # pydicom reports damage as ValueError, RuntimeError, AttributeError, ...
        raise DicomError(f"damaged or truncated pixel data ({type(exc).__name__}: {_first_line(exc)}): copy it "
                         "again from the PACS, or remove it") from None
    if pixels.ndim != 2:
        raise DicomError(f"pixel data has shape {pixels.shape}, not one 2-D grayscale image")
    return pixels


def _install_hint(syntax: object) -> str:
    name = str(getattr(syntax, "name", ""))
    if "2000" in name or "HTJ2K" in name:
        return "pip install 'rwft[dicom]' (pylibjpeg with pylibjpeg-openjpeg)"
    if "RLE" in name:
        return "pip install 'rwft[dicom]' (pylibjpeg-rle), though pydicom decodes RLE by itself with numpy"
    if "JPEG-LS" in name:
        return "pip install pyjpegls (MIT) or python-gdcm (BSD)"
    if "JPEG" in name:
        # pylibjpeg-libjpeg would also decode these, but it is GPLv3: rwft does not pull it in.
        return "pip install python-gdcm (BSD); pylibjpeg-libjpeg also works but is GPLv3"
    return "pip install python-gdcm, or export the image uncompressed (Explicit VR Little Endian)"


def _modality_lut(stored: np.ndarray, ds: object) -> np.ndarray:
    from pydicom.pixels import apply_modality_lut

    return apply_modality_lut(stored, ds)


def _modality_range(ds: object) -> tuple[float, float]:
    """The modality-transformed range of every value the stored pixels can take (BitsStored)."""
    bits = int(ds.BitsStored)  # type: ignore[attr-defined]
    signed = int(getattr(ds, "PixelRepresentation", 0) or 0) == 1
    low, high = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2 ** bits - 1)
    # Through pydicom's own modality LUT, so that slope, intercept and LUT sequences are read as it reads them.
    # Every value for a LUT sequence (up to 65,536 of them); the two ends suffice for slope/intercept.
    stored = np.arange(low, high + 1, dtype=np.int32) if bits <= 16 else np.array([low, high], dtype=np.int64)
    values = _modality_lut(stored, ds)
    return float(np.min(values)), float(np.max(values))


def _voi(values: np.ndarray, ds: object, modality_range: tuple[float, float]) -> tuple[np.ndarray, float, float]:
    """Apply the VOI LUT or window when the file has one; the result with its output range."""
    from pydicom.pixels import apply_voi, apply_windowing

    if ds.get("VOILUTSequence"):  # type: ignore[attr-defined]
        descriptor = ds.VOILUTSequence[0].LUTDescriptor  # type: ignore[attr-defined]
        entries, first = int(descriptor[0]) or 2 ** 16, int(descriptor[1])
        # Output range = the LUT's own entries (a LUT declared 16-bit may only use 12).
        table = apply_voi(np.arange(first, first + entries), ds)
        return apply_voi(np.rint(values).astype(np.int64), ds), float(table.min()), float(table.max())
    if ds.get("WindowCenter") is not None and ds.get("WindowWidth") is not None:  # type: ignore[attr-defined]
        # Values far outside any window land on the ends of its output range.
        low, high = modality_range
        span = max(abs(low), abs(high), 1.0) * 1e6
        ends = apply_windowing(np.array([-span, span], dtype=np.float64), ds)
        return apply_windowing(values.astype(np.float64), ds), float(ends[0]), float(ends[1])
    return values, *modality_range


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
