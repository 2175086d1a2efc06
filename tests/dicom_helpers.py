"""Real DICOM files made from the real chest X-ray JPEGs, for the DICOM, predict and shift tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    BasicTextSRStorage,
    DigitalXRayImageStorageForPresentation,
    ExplicitVRLittleEndian,
    RLELossless,
    generate_uid,
)


def jpeg_pixels(path: Path) -> np.ndarray:
    """The 8-bit grayscale pixels of a JPEG, as Pillow decodes them."""
    with Image.open(path) as image:
        return np.asarray(image.convert("L"), dtype=np.uint8)


def write_dicom(path: Path, stored: np.ndarray, *, photometric: str = "MONOCHROME2", bits_stored: int = 8,
                rescale: tuple[float, float] | None = None, window: tuple[float, float] | None = None,
                presentation_lut_shape: str | None = None, rle: bool = False, frames: int = 1) -> Path:
    """A DX image object holding ``stored`` (the stored pixel values) with the given grayscale tags.

    ``rescale`` is (slope, intercept); ``window`` is (center, width). ``rle`` compresses the
    pixel data with pydicom's own RLE Lossless encoder. Written with the 128-byte preamble
    and ``DICM`` magic, whatever the file name.
    """
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = DigitalXRayImageStorageForPresentation
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Modality = "DX"
    ds.PatientName = "Anonymous"
    ds.Rows, ds.Columns = stored.shape[-2:]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated = 8 if bits_stored <= 8 else 16
    ds.BitsStored, ds.HighBit, ds.PixelRepresentation = bits_stored, bits_stored - 1, 0
    if frames > 1:
        ds.NumberOfFrames = frames
    if rescale is not None:
        ds.RescaleSlope, ds.RescaleIntercept = rescale
    if window is not None:
        ds.WindowCenter, ds.WindowWidth = window
    if presentation_lut_shape is not None:
        ds.PresentationLUTShape = presentation_lut_shape
    ds.PixelData = stored.astype(np.uint8 if bits_stored <= 8 else np.uint16).tobytes()
    if rle:
        ds.compress(RLELossless)
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def write_structured_report(path: Path) -> Path:
    """A Basic Text SR: a DICOM object with no pixel data, as a PACS export may contain."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = BasicTextSRStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Modality = "SR"
    ds.ValueType = "CONTAINER"
    ds.save_as(path, enforce_file_format=True)
    return path


def chest_jpegs(shared_data: Path, label: str, count: int, split: str = "train") -> list[Path]:
    return sorted((shared_data / "chest_xray" / split / label).glob("*.jpeg"))[:count]
