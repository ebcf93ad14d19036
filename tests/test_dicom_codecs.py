"""Pixel encodings the DICOM reader must handle, and decoders that fail badly.

Synthetic series (the phantom of test_loading, marker on the patient's left) are
written in every encoding pydicom, pylibjpeg and Pillow can produce here; encodings
nothing here can write (JPEG extended, JPEG-LS, big endian) come from the test files
shipped inside the pinned pydicom wheel, turned into a two-slice CT series. The values
read must equal pydicom's own in-process decoding, or the phantom within the loss of
a lossy codec.
"""

from __future__ import annotations

import io
import sys
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.encaps import encapsulate
from pydicom.uid import (
    CTImageStorage,
    DeflatedExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    MPEG2MPML,
    RLELossless,
    generate_uid,
)

from femurrisk import dicom
from femurrisk.errors import InputError
from femurrisk.loading import load_ct
from test_loading import (
    MARKER_HU,
    SECRET,
    assert_clean_text,
    assert_marker_kept,
    sample_on_grid,
    write_series,
)

PYDICOM_FILES = Path(pydicom.__file__).parent / "data" / "test_files"


def volume_of(loaded) -> np.ndarray:
    return np.asarray(loaded.image.dataobj)


def recode(folder: Path, change) -> None:
    """Apply ``change(ds)`` to every file of a folder and save it in place."""
    for path in sorted(folder.iterdir()):
        ds = pydicom.dcmread(path)
        change(ds)
        ds.save_as(path, enforce_file_format=True)


def expected_phantom(loaded) -> np.ndarray:
    return sample_on_grid(loaded.image.affine, loaded.image.shape)


# --- synthetic series in each encoding ------------------------------------------------


def _syntax(uid):
    def change(ds):
        ds.file_meta.TransferSyntaxUID = uid

    return change


def _compress(uid, **options):
    def change(ds):
        ds.compress(uid, **options)

    return change


@pytest.mark.parametrize(
    "change",
    [
        _syntax(ImplicitVRLittleEndian),
        _syntax(DeflatedExplicitVRLittleEndian),
        _compress(RLELossless),
        _compress(JPEG2000Lossless),
    ],
    ids=["implicit-VR", "deflated", "RLE", "J2K-lossless"],
)
def test_lossless_encodings_read_exactly(tmp_path, change):
    write_series(tmp_path / "s", count=10)
    recode(tmp_path / "s", change)
    loaded = load_ct(tmp_path / "s")
    np.testing.assert_array_equal(volume_of(loaded), expected_phantom(loaded))
    assert_marker_kept(loaded)
    assert_clean_text(loaded)


def test_j2k_lossy_within_tolerance(tmp_path):
    write_series(tmp_path / "s", count=10)
    recode(tmp_path / "s", _compress(JPEG2000, j2k_cr=[8]))
    loaded = load_ct(tmp_path / "s")
    error = np.abs(volume_of(loaded) - expected_phantom(loaded))
    assert np.mean(error) < 30  # HU; the marker and body edges blur a little
    assert_marker_kept(loaded)


def _jpeg_baseline(ds) -> None:
    """8-bit JPEG baseline made with Pillow; 16 HU per stored step."""
    hu = ds.pixel_array.astype(float) * float(ds.RescaleSlope) + ds.RescaleIntercept
    stored = np.clip(np.round((hu + 1024) / 16), 0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(stored, mode="L").save(buffer, format="JPEG", quality=95)
    ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 8, 8, 7
    ds.PixelRepresentation = 0
    ds.RescaleSlope, ds.RescaleIntercept = 16, -1024
    ds.PixelData = encapsulate([buffer.getvalue()])
    ds["PixelData"].VR = "OB"


def test_jpeg_baseline_8bit(tmp_path):
    write_series(tmp_path / "s", count=10)
    recode(tmp_path / "s", _jpeg_baseline)
    loaded = load_ct(tmp_path / "s")
    error = np.abs(volume_of(loaded) - expected_phantom(loaded))
    assert np.median(error) <= 16  # one stored step
    assert_marker_kept(loaded)


def test_file_without_meta_and_with_a_stray_leading_byte(tmp_path):
    paths = write_series(tmp_path / "s", count=10)
    for path in paths[:3]:
        ds = pydicom.dcmread(path)
        del ds.file_meta
        ds.preamble = None
        buffer = io.BytesIO()
        ds.save_as(buffer, implicit_vr=True, little_endian=True)
        path.write_bytes(b"\x20" + buffer.getvalue())  # no preamble, no meta
    loaded = load_ct(tmp_path / "s")
    np.testing.assert_array_equal(volume_of(loaded), expected_phantom(loaded))
    assert any("3 file(s) had stray bytes" in text for text in loaded.warnings)


def test_geometry_and_rescale_with_vr_un(tmp_path):
    paths = write_series(tmp_path / "s", count=10)
    for path in paths:
        ds = pydicom.dcmread(path)
        for keyword in ("ImagePositionPatient", "RescaleIntercept", "PixelSpacing"):
            element = ds[keyword]
            raw = "\\".join(str(v) for v in np.atleast_1d(element.value)).encode()
            ds[keyword] = pydicom.DataElement(element.tag, "UN", raw + b" " * (len(raw) % 2))
        ds.save_as(path, enforce_file_format=True)
    assert pydicom.dcmread(paths[0])["ImagePositionPatient"].VR in ("UN", "DS")
    loaded = load_ct(tmp_path / "s")
    np.testing.assert_array_equal(volume_of(loaded), expected_phantom(loaded))


# --- real encoded files from the pydicom wheel ----------------------------------------


def two_slice_ct(source: Path, folder: Path) -> Path:
    """Two CT slices 3 mm apart, axial HFS, carrying the pixel data of ``source``."""
    folder.mkdir()
    series = generate_uid()
    for k in range(2):
        ds = pydicom.dcmread(source)
        ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.Modality = "CT"
        ds.SeriesInstanceUID = series
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.ImagePositionPatient = [-100, -100, 3.0 * k]
        ds.PixelSpacing = [0.8, 0.8]
        ds.RescaleSlope, ds.RescaleIntercept = 1, -1024
        ds.PatientName = SECRET
        for keyword in ("NumberOfFrames", "PerFrameFunctionalGroupsSequence"):
            if keyword in ds and ds.get("NumberOfFrames", 1) == 1:
                delattr(ds, keyword)
        ds.save_as(folder / f"{k}", enforce_file_format=True)
    return folder


@pytest.mark.parametrize(
    "name",
    [
        "MR_small_implicit.dcm",
        "MR_small_bigendian.dcm",
        "MR_small_RLE.dcm",
        "MR_small_jpeg_ls_lossless.dcm",
        "MR_small_jp2klossless.dcm",
        "JPGExtended.dcm",
        "JPEG2000.dcm",
    ],
)
def test_real_encodings_match_pydicom(tmp_path, name):
    source = PYDICOM_FILES / name
    reference = pydicom.dcmread(source).pixel_array.astype(np.float32) - 1024
    loaded = load_ct(two_slice_ct(source, tmp_path / "s"))
    data = volume_of(loaded)
    for k in range(2):
        np.testing.assert_array_equal(data[:, :, k], reference.T)
    assert_clean_text(loaded)


# --- isolation of decoders ------------------------------------------------------------


@pytest.fixture
def j2k_series(tmp_path) -> Path:
    write_series(tmp_path / "s", count=4)
    recode(tmp_path / "s", _compress(JPEG2000Lossless))
    return tmp_path / "s"


def test_decoder_crash_is_an_input_error(j2k_series, monkeypatch):
    crash = "import os, sys; sys.stdin.buffer.read(8); os.abort()"
    monkeypatch.setattr(dicom, "_worker_command", lambda: [sys.executable, "-c", crash])
    with pytest.raises(InputError, match="crashed the decoder|stopped the decoder"):
        load_ct(j2k_series)


def test_decoder_hang_is_bounded(j2k_series, monkeypatch):
    hang = "import sys, time; sys.stdin.buffer.read(8); time.sleep(60)"
    monkeypatch.setattr(dicom, "_worker_command", lambda: [sys.executable, "-c", hang])
    monkeypatch.setattr(dicom, "DECODE_TIMEOUT_S", 1.0)
    with pytest.raises(InputError, match=r"did not finish within 1 s"):
        load_ct(j2k_series)


def test_uncompressed_reads_start_no_worker(tmp_path, monkeypatch):
    def refuse():
        raise AssertionError("a worker was started for uncompressed data")

    monkeypatch.setattr(dicom, "_start_worker", refuse)
    write_series(tmp_path / "s", count=4)
    assert load_ct(tmp_path / "s").image.shape[2] == 4


def test_corrupt_compressed_frame(j2k_series):
    path = sorted(j2k_series.iterdir())[1]
    ds = pydicom.dcmread(path)
    frame = bytearray(next(pydicom.encaps.generate_frames(ds.PixelData)))
    frame[len(frame) // 3 :] = bytes(len(frame) - len(frame) // 3)  # zeroed tail
    ds.PixelData = encapsulate([bytes(frame[: len(frame) // 2])])
    ds.save_as(path)
    with pytest.raises(InputError, match="could not be decoded|Hounsfield"):
        load_ct(j2k_series)


def test_unsupported_and_unknown_compression(tmp_path):
    write_series(tmp_path / "s", count=3)
    recode(tmp_path / "s", _compress(RLELossless))
    recode(tmp_path / "s", _syntax(MPEG2MPML))
    with pytest.raises(InputError, match="no decoder is installed; export it"):
        load_ct(tmp_path / "s")
    for path in (tmp_path / "s").iterdir():  # JPEG XL, unknown to this pydicom
        data = path.read_bytes().replace(MPEG2MPML.encode(), b"1.2.840.10008.1.2.4.110")
        path.write_bytes(data)
    with pytest.raises(InputError, match="unknown or private"):
        load_ct(tmp_path / "s")


@pytest.mark.parametrize("keep", [0.3, 0.9])
def test_truncated_file(tmp_path, keep):
    paths = write_series(tmp_path / "s", count=4)
    data = paths[2].read_bytes()
    paths[2].write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(InputError) as info:
        load_ct(tmp_path / "s")
    assert SECRET not in str(info.value)


def test_marker_value_survives_rescale(tmp_path):
    """Guard for the helpers above: the phantom's marker is in the written data."""
    write_series(tmp_path / "s", count=10)
    assert volume_of(load_ct(tmp_path / "s")).max() == MARKER_HU
