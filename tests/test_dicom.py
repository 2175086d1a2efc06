"""DICOM X-rays made from the real chest_xray JPEGs, read back and checked pixel by pixel."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from dicom_helpers import chest_jpegs, jpeg_pixels, write_dicom, write_structured_report
from PIL import Image
from pydicom.encaps import encapsulate
from pydicom.uid import JPEGLSLossless

from rwft.core.config import DataConfig
from rwft.core.data import load_data, resize_square
from rwft.core.dicom import DicomError, is_dicom, read_dicom
from rwft.core.sitecheck import check_site
from rwft.plugins.datasets_chest_xray import decode_image


@pytest.fixture(scope="module")
def source(shared_data: Path) -> np.ndarray:
    return jpeg_pixels(chest_jpegs(shared_data, "PNEUMONIA", 1)[0])


def test_monochrome2_8bit_reads_back_the_source_pixels_exactly(tmp_path: Path, source: np.ndarray) -> None:
    path = write_dicom(tmp_path / "a.dcm", source)
    assert np.array_equal(read_dicom(path), source)


def test_monochrome1_is_inverted_exactly_once(tmp_path: Path, source: np.ndarray) -> None:
    stored = 255 - source  # MONOCHROME1: bright bone is stored as low values
    assert np.array_equal(read_dicom(write_dicom(tmp_path / "m1.dcm", stored, photometric="MONOCHROME1")), source)
    # A DX MONOCHROME1 image carries PresentationLUTShape INVERSE: the same single inversion, not a second one.
    inverse = write_dicom(tmp_path / "m1i.dcm", stored, photometric="MONOCHROME1", presentation_lut_shape="INVERSE")
    assert np.array_equal(read_dicom(inverse), source)
    identity = write_dicom(tmp_path / "m2.dcm", source, presentation_lut_shape="IDENTITY")
    assert np.array_equal(read_dicom(identity), source)


def test_12bit_with_rescale_and_window(tmp_path: Path, source: np.ndarray) -> None:
    stored = np.rint(source.astype(np.float64) * 4095 / 255).astype(np.uint16)  # the whole 12-bit range
    slope, intercept = 0.5, -1024.0

    def modality(level: float) -> float:
        return (level * 4095 / 255) * slope + intercept

    low, high = 50, 200  # a window that shows 8-bit levels 50..200 of the source
    m_low, m_high = modality(low), modality(high)
    window = ((m_low + m_high) / 2 + 0.5, m_high - m_low + 1)  # DICOM's linear window (PS3.3 C.11.2.1.2.1)
    path = write_dicom(tmp_path / "12bit.dcm", stored, bits_stored=12, rescale=(slope, intercept), window=window)

    expected = np.clip((source.astype(np.float64) - low) / (high - low), 0, 1) * 255
    windowed = read_dicom(path).astype(np.float64)
    assert np.abs(windowed - expected).max() <= 2.0  # 12-bit rounding of the source, then 8-bit output
    assert windowed.min() == 0 and windowed.max() == 255  # clipped outside the window, as a viewer shows it

    # Without windowing the whole 12-bit range is scaled, not clipped or wrapped to 8 bits.
    full = read_dicom(path, windowing="none").astype(np.int16)
    assert np.abs(full - source).max() <= 1


def test_rle_compressed_reads_back_exactly(tmp_path: Path, source: np.ndarray) -> None:
    path = write_dicom(tmp_path / "rle.dcm", source, rle=True)
    assert b"1.2.840.10008.1.2.5" in path.read_bytes()[:1024]  # RLE Lossless transfer syntax in the file meta
    assert np.array_equal(read_dicom(path), source)
    stored12 = (source.astype(np.uint16) << 4) | (source.astype(np.uint16) >> 4)  # exact 8 -> 12 bit
    path12 = write_dicom(tmp_path / "rle12.dcm", stored12, bits_stored=12, rle=True)
    assert np.array_equal(read_dicom(path12), source)


def test_truncated_sr_multiframe_and_missing_decoder_are_refused_clearly(tmp_path: Path, source: np.ndarray) -> None:
    whole = write_dicom(tmp_path / "whole.dcm", source).read_bytes()
    truncated = tmp_path / "truncated.dcm"
    truncated.write_bytes(whole[: len(whole) // 2])
    with pytest.raises(DicomError, match="truncated"):
        read_dicom(truncated)
    with pytest.raises(DicomError, match="structured report.*not an image"):
        read_dicom(write_structured_report(tmp_path / "report.dcm"))
    with pytest.raises(DicomError, match="multi-frame object \\(2 frames"):
        read_dicom(write_dicom(tmp_path / "cine.dcm", np.stack([source, source]), frames=2))

    jpeg_ls = write_dicom(tmp_path / "jls.dcm", source)
    from pydicom import dcmread
    from pydicom.pixels import get_decoder

    if get_decoder(JPEGLSLossless).is_available:
        pytest.skip("a JPEG-LS decoder is installed here")
    ds = dcmread(jpeg_ls)
    ds.file_meta.TransferSyntaxUID = JPEGLSLossless
    ds.PixelData = encapsulate([b"\xff\xd8\xff\xf7" + bytes(64)])
    ds["PixelData"].VR = "OB"
    ds.save_as(jpeg_ls, enforce_file_format=True)
    with pytest.raises(DicomError, match="JPEG-LS.*pip install pyjpegls .* or python-gdcm"):
        read_dicom(jpeg_ls)


def _site_with_dicom(root: Path, shared_data: Path, per_class: int = 6) -> dict[str, Path]:
    """SITE/{NORMAL,PNEUMONIA}/ of DICOM files named as PACS exports name them, plus two bad objects."""
    sources = {}
    for label in ("NORMAL", "PNEUMONIA"):
        for i, jpeg in enumerate(chest_jpegs(shared_data, label, per_class)):
            name = [f"IM{i:04d}", f"img{i}.dcm", f"img{i}.jpeg"][i % 3]  # no extension, .dcm, a misleading one
            photometric = "MONOCHROME1" if i % 2 else "MONOCHROME2"
            pixels = jpeg_pixels(jpeg)
            write_dicom(root / label / name, 255 - pixels if i % 2 else pixels, photometric=photometric)
            sources[f"{label}/{name}"] = jpeg
    whole = (root / "NORMAL" / "img1.dcm").read_bytes()
    (root / "NORMAL" / "cut.dcm").write_bytes(whole[: len(whole) // 3])
    write_structured_report(root / "PNEUMONIA" / "SR0001")
    return sources


def test_dicom_inside_chest_xray_folders_decodes_like_the_source_jpegs(tmp_path: Path, shared_data: Path) -> None:
    site = tmp_path / "site"
    sources = _site_with_dicom(site, shared_data)
    assert is_dicom(site / "NORMAL" / "IM0000") and is_dicom(site / "NORMAL" / "img2.jpeg")
    for relative, jpeg in sources.items():
        # Same pixels, same resize (the JPEG path itself decodes at reduced DCT scale, so compare to the full decode).
        expected = resize_square(Image.fromarray(jpeg_pixels(jpeg)), 32)
        assert np.array_equal(decode_image(site / relative, 32), expected), relative

    splits = load_data(DataConfig(dataset="chest_xray", root=str(site), image_size=32, on_bad_file="skip",
                                  cache_dir=str(tmp_path / "cache")), seed=0)
    assert sum(map(len, (splits.train, splits.val, splits.test))) == 12
    reasons = "\n".join(splits.skipped)
    assert "cut.dcm" in reasons and "truncated" in reasons
    assert "SR0001" in reasons and "structured report" in reasons

    report = check_site(DataConfig(dataset="chest_xray", root=str(site), image_size=32,
                                   cache_dir=str(tmp_path / "cache")))
    assert report.num_images == 12 and len(report.unreadable) == 2
    assert "2 unreadable file(s)" in report.format() and "structured report" in report.format()


def test_dicom_dataset_reads_a_flat_pacs_export_with_a_labels_csv(tmp_path: Path, shared_data: Path) -> None:
    export = tmp_path / "export"
    rows = ["file,label"]
    for label in ("PNEUMONIA", "NORMAL"):
        for i, jpeg in enumerate(chest_jpegs(shared_data, label, 5)):
            name = f"{label[:1]}{i:03d}"  # PACS names: no extension, no class in the path
            write_dicom(export / name, jpeg_pixels(jpeg))
            rows.append(f"{name},{label}")
    (tmp_path / "labels.csv").write_text("\n".join(rows) + "\n")
    splits = load_data(DataConfig(dataset="dicom", root=str(export), labels_csv=str(tmp_path / "labels.csv"),
                                  image_size=28, cache_dir=str(tmp_path / "cache")), seed=0)
    assert splits.class_names == ("NORMAL", "PNEUMONIA")
    counts = np.sum([s.class_counts(2) for s in (splits.train, splits.val, splits.test)], axis=0)
    assert counts.tolist() == [5, 5]

    (tmp_path / "bad.csv").write_text("file,label\nN000,NORMAL\nnope,PNEUMONIA\n")
    from rwft.core.errors import DataError

    with pytest.raises(DataError, match="(?s)bad.csv do not exist.*line 3: .*nope"):
        load_data(DataConfig(dataset="dicom", root=str(export), labels_csv=str(tmp_path / "bad.csv")), seed=0)
