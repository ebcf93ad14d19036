"""Tests for femurrisk.loading (and its helpers femurrisk.dicom, femurrisk.archive).

Synthetic phantoms are defined in world coordinates (a body cylinder with a bright
marker on the patient's left), sampled onto NIfTI and DICOM grids of many
orientations, read back, and the marker must come back at the same RAS+ position.
Real public files are read from the shared data folder and skipped when absent.
"""

from __future__ import annotations

import tempfile
import zipfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    CTImageStorage,
    EnhancedCTImageStorage,
    ExplicitVRLittleEndian,
    SecondaryCaptureImageStorage,
    generate_uid,
)

from femurrisk import archive
from femurrisk.errors import InputError
from femurrisk.loading import LoadedCT, load_ct

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
if not DATA.exists():
    DATA = Path("/work/shared/data")
needs_data = pytest.mark.skipif(not DATA.exists(), reason="shared test data absent")

#: Marker centre on the patient's LEFT, in RAS+ mm (x < 0 is left).
MARKER_RAS = np.array([-40.0, -10.0, 12.0])
MARKER_RADIUS_MM = 7.0
BODY_RADIUS_MM = 90.0
MARKER_HU, BODY_HU, AIR_HU = 1000.0, 40.0, -1000.0

#: A name that must never show up in a message, warning or description.
SECRET = "DOE_JANE_123"


# --- phantom --------------------------------------------------------------------------


def phantom_hu(points_ras: np.ndarray) -> np.ndarray:
    """HU of the world phantom at points (..., 3) in RAS+ mm."""
    radial = np.hypot(points_ras[..., 0], points_ras[..., 1])
    hu = np.where(radial < BODY_RADIUS_MM, BODY_HU, AIR_HU)
    near = np.linalg.norm(points_ras - MARKER_RAS, axis=-1) < MARKER_RADIUS_MM
    return np.where(near, MARKER_HU, hu).astype(np.float32)


def sample_on_grid(affine: np.ndarray, shape: tuple[int, int, int]) -> np.ndarray:
    """The phantom sampled at every voxel of an image with this voxel->RAS affine."""
    index = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), -1)
    world = index @ affine[:3, :3].T + affine[:3, 3]
    return phantom_hu(world)


def marker_world(loaded: LoadedCT) -> np.ndarray:
    """Centroid of the marker voxels of a loaded image, RAS+ mm."""
    data = np.asarray(loaded.image.dataobj)
    index = np.argwhere(data > (MARKER_HU + BODY_HU) / 2)
    assert len(index) > 0, "marker lost"
    centre = index.mean(axis=0)
    return loaded.image.affine[:3, :3] @ centre + loaded.image.affine[:3, 3]


def assert_marker_kept(loaded: LoadedCT, tolerance_mm: float = 2.0) -> None:
    found = marker_world(loaded)
    assert found[0] < 0, "the left-sided marker came back on the right"
    np.testing.assert_allclose(found, MARKER_RAS, atol=tolerance_mm)


def assert_clean_text(loaded: LoadedCT) -> None:
    assert SECRET not in loaded.description
    assert all(SECRET not in text for text in loaded.warnings)


# --- NIfTI ----------------------------------------------------------------------------

RAS_AFFINE = np.array(
    [[2.0, 0, 0, -60], [0, 2.0, 0, -70], [0, 0, 3.0, -30], [0, 0, 0, 1]]
)
LPS_AFFINE = np.array(
    [[-2.0, 0, 0, 60], [0, -2.0, 0, 70], [0, 0, 3.0, -30], [0, 0, 0, 1]]
)
# Array axes (z, x flipped, y): the first axis runs cranially, the second leftwards.
PERMUTED_AFFINE = np.array(
    [[0, -2.0, 0, 60], [0, 0, 2.0, -70], [3.0, 0, 0, -30], [0, 0, 0, 1]]
)
NIFTI_SHAPE = (60, 70, 24)


def write_nifti(
    path: Path,
    affine: np.ndarray,
    shape=NIFTI_SHAPE,
    sform_code: int = 1,
    qform_code: int = 0,
    stored_affine: np.ndarray | None = None,
) -> Path:
    """Write the phantom on the grid of ``affine`` with the given header codes."""
    image = nib.Nifti1Image(sample_on_grid(affine, shape), None)
    image.set_sform(affine if stored_affine is None else stored_affine, code=sform_code)
    image.set_qform(affine, code=qform_code)
    nib.save(image, path)
    return path


@pytest.mark.parametrize(
    "affine", [RAS_AFFINE, LPS_AFFINE], ids=["RAS", "LPS"]
)
def test_nifti_keeps_left_left(tmp_path, affine):
    loaded = load_ct(write_nifti(tmp_path / "v.nii.gz", affine))
    assert loaded.kind == "nifti"
    assert loaded.image.get_data_dtype() == np.float32
    assert np.asarray(loaded.image.dataobj).dtype == np.float32
    np.testing.assert_allclose(loaded.image.affine, affine)
    assert_marker_kept(loaded)


def test_nifti_with_permuted_axes(tmp_path):
    shape = (24, 60, 70)
    loaded = load_ct(write_nifti(tmp_path / "v.nii", PERMUTED_AFFINE, shape))
    assert loaded.image.shape == shape
    assert_marker_kept(loaded)


def test_nifti_qform_only(tmp_path):
    path = write_nifti(tmp_path / "v.nii.gz", LPS_AFFINE, sform_code=0, qform_code=1)
    assert_marker_kept(load_ct(path))


def test_nifti_sform_wins_over_qform(tmp_path):
    # qform says RAS, sform (code 2, as in the real example scan) says LPS.
    image = nib.Nifti1Image(sample_on_grid(LPS_AFFINE, NIFTI_SHAPE), None)
    image.set_qform(RAS_AFFINE, code=1)
    image.set_sform(LPS_AFFINE, code=2)
    nib.save(image, tmp_path / "v.nii.gz")
    assert_marker_kept(load_ct(tmp_path / "v.nii.gz"))


def test_nifti_without_codes_is_refused(tmp_path):
    path = write_nifti(tmp_path / "v.nii.gz", RAS_AFFINE, sform_code=0, qform_code=0)
    with pytest.raises(InputError, match="orientation unknown"):
        load_ct(path)


def test_nifti_scaling_applied(tmp_path):
    hu = sample_on_grid(RAS_AFFINE, NIFTI_SHAPE)
    image = nib.Nifti1Image(((hu + 1024) / 2).astype(np.int16), RAS_AFFINE)
    image.header.set_slope_inter(2.0, -1024.0)
    image.set_sform(RAS_AFFINE, code=1)
    nib.save(image, tmp_path / "scaled.nii.gz")
    loaded = load_ct(tmp_path / "scaled.nii.gz")
    np.testing.assert_allclose(np.asarray(loaded.image.dataobj), hu, atol=1.0)


def test_nifti_singleton_4d_squeezed_and_real_4d_refused(tmp_path):
    hu = sample_on_grid(RAS_AFFINE, NIFTI_SHAPE)
    nib.save(nib.Nifti1Image(hu[..., None], RAS_AFFINE), tmp_path / "one.nii.gz")
    loaded = load_ct(tmp_path / "one.nii.gz")
    assert loaded.image.shape == NIFTI_SHAPE
    assert_marker_kept(loaded)

    nib.save(nib.Nifti1Image(np.stack([hu, hu], -1), RAS_AFFINE), tmp_path / "t.nii")
    with pytest.raises(InputError, match="must be 3D, not 4D"):
        load_ct(tmp_path / "t.nii")


def test_nifti_not_in_hounsfield_units_refused(tmp_path):
    raw = sample_on_grid(RAS_AFFINE, NIFTI_SHAPE) + 6000  # values without rescale
    nib.save(nib.Nifti1Image(raw, RAS_AFFINE), tmp_path / "raw.nii.gz")
    with pytest.raises(InputError, match="must be Hounsfield units"):
        load_ct(tmp_path / "raw.nii.gz")


def test_damaged_nifti_refused(tmp_path):
    (tmp_path / f"{SECRET}.nii.gz").write_bytes(b"\x1f\x8b not really gzip")
    with pytest.raises(InputError, match="damaged or not NIfTI") as info:
        load_ct(tmp_path / f"{SECRET}.nii.gz")
    assert SECRET not in str(info.value)


# --- DICOM writing helpers ------------------------------------------------------------

HEAD_FIRST_SUPINE = (1, 0, 0, 0, 1, 0)
FEET_FIRST_SUPINE = (-1, 0, 0, 0, 1, 0)
HEAD_FIRST_PRONE = (-1, 0, 0, 0, -1, 0)
FEET_FIRST_PRONE = (1, 0, 0, 0, -1, 0)
ROWS, COLUMNS = 72, 64
PIXEL_SPACING = (2.5, 2.0)  # (between rows, between columns): unequal on purpose


def slice_hu(ipp_lps, iop, spacing=PIXEL_SPACING, rows=ROWS, columns=COLUMNS):
    """Phantom HU on one DICOM slice, array (rows, columns)."""
    row_cos, col_cos = np.array(iop[:3], float), np.array(iop[3:], float)
    r, c = np.meshgrid(np.arange(rows), np.arange(columns), indexing="ij")
    lps = (
        np.array(ipp_lps, float)
        + c[..., None] * spacing[1] * row_cos
        + r[..., None] * spacing[0] * col_cos
    )
    return phantom_hu(lps * np.array([-1.0, -1.0, 1.0]))


def ct_dataset(hu, ipp, iop, series_uid, spacing=PIXEL_SPACING, **extra) -> Dataset:
    """A minimal CT Image Storage dataset holding ``hu`` as int16 stored values."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.SOPClassUID = CTImageStorage
    ds.Modality = "CT"
    ds.PatientName = SECRET
    ds.PatientID = SECRET
    ds.SeriesInstanceUID = series_uid
    ds.SeriesNumber = 3
    ds.SeriesDescription = "Abdomen 3.0"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.ImagePositionPatient = [f"{v:.4f}" for v in ipp]
    ds.ImageOrientationPatient = [f"{v:.6f}" for v in iop]
    ds.PixelSpacing = list(spacing)
    ds.SliceThickness = 99  # deliberately wrong: spacing must come from positions
    ds.Rows, ds.Columns = hu.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 16, 15
    ds.PixelRepresentation = 1
    ds.RescaleSlope, ds.RescaleIntercept = 1, -1024
    ds.PixelData = np.round(hu + 1024).astype(np.int16).tobytes()
    for key, value in extra.items():
        setattr(ds, key, value)
    return ds


def write_series(
    folder: Path,
    iop=HEAD_FIRST_SUPINE,
    count: int = 14,
    step_mm=3.0,
    positions=None,
    series_uid=None,
    start=(-80.0, -90.0, -10.0),
    **extra,
) -> list[Path]:
    """Write a series of the phantom; files get scrambled names in reverse order.

    ``positions`` overrides the default IPPs (start + k * step * normal).
    """
    folder.mkdir(parents=True, exist_ok=True)
    series_uid = series_uid or generate_uid()
    normal = np.cross(iop[:3], iop[3:])
    if positions is None:
        positions = [np.array(start) + k * step_mm * normal for k in range(count)]
    rng = np.random.default_rng(len(positions))
    names = rng.permutation(len(positions))
    paths = []
    for k, ipp in enumerate(positions):
        ds = ct_dataset(
            slice_hu(ipp, iop), ipp, iop, series_uid, InstanceNumber=len(positions) - k
        )
        for key, value in extra.items():
            setattr(ds, key, value)
        path = folder / f"{SECRET}_{names[k]:03d}{'' if k % 2 else '.dcm'}"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


# --- DICOM geometry -------------------------------------------------------------------


@pytest.mark.parametrize(
    "iop",
    [HEAD_FIRST_SUPINE, FEET_FIRST_SUPINE, HEAD_FIRST_PRONE, FEET_FIRST_PRONE],
    ids=["HFS", "FFS", "HFP", "FFP"],
)
def test_dicom_series_keeps_left_left(tmp_path, iop):
    # Start so that the marker is inside the field of view for every orientation.
    row_cos, col_cos = np.array(iop[:3]), np.array(iop[3:])
    centre_lps = MARKER_RAS * np.array([-1, -1, 1])
    start = (
        centre_lps
        - row_cos * PIXEL_SPACING[1] * COLUMNS / 2
        - col_cos * PIXEL_SPACING[0] * ROWS / 2
        - np.cross(row_cos, col_cos) * 3.0 * 7
    )
    write_series(tmp_path / "s", iop=iop, start=start)
    loaded = load_ct(tmp_path / "s")
    assert loaded.kind == "dicom"
    assert loaded.image.shape == (COLUMNS, ROWS, 14)
    np.testing.assert_allclose(loaded.image.header.get_zooms(), (2.0, 2.5, 3.0))
    assert_marker_kept(loaded)
    assert_clean_text(loaded)
    assert loaded.description == (
        "DICOM CT series, 14 slices of 64x72, 2.00 x 2.50 x 3.00 mm"
    )


def test_dicom_volume_equals_phantom_on_its_grid(tmp_path):
    write_series(tmp_path / "s")
    loaded = load_ct(tmp_path / "s")
    expected = sample_on_grid(loaded.image.affine, loaded.image.shape)
    np.testing.assert_allclose(np.asarray(loaded.image.dataobj), expected)


def test_loose_files_as_a_list(tmp_path):
    paths = write_series(tmp_path / "s")
    loaded = load_ct([str(p) for p in paths])
    assert loaded.image.shape[2] == 14
    assert_marker_kept(loaded)


def test_gantry_tilt_is_straightened(tmp_path):
    tilt = np.radians(15.0)
    iop = (1, 0, 0, 0, np.cos(tilt), -np.sin(tilt))
    positions = [np.array([-80.0, -90.0, 10.0 + 2.5 * k]) for k in range(16)]
    write_series(tmp_path / "s", iop=iop, positions=positions)
    loaded = load_ct(tmp_path / "s")
    assert any("tilted by 15.0 degrees" in text for text in loaded.warnings)
    affine = loaded.image.affine[:3, :3]
    gram = affine.T @ affine
    np.testing.assert_allclose(gram - np.diag(np.diag(gram)), 0, atol=1e-6)
    assert_marker_kept(loaded, tolerance_mm=2.5)


def test_uneven_spacing_resampled_with_warning(tmp_path):
    along = [0, 3, 6, 9, 15, 18, 21, 24, 27, 30]  # one slice missing at 12 mm
    positions = [np.array([-80.0, -90.0, -10.0 + z]) for z in along]
    write_series(tmp_path / "s", positions=positions)
    loaded = load_ct(tmp_path / "s")
    assert loaded.image.shape[2] == 11
    assert np.isclose(loaded.image.header.get_zooms()[2], 3.0)
    assert any("slices may be missing" in text for text in loaded.warnings)
    assert any("uneven" in text for text in loaded.warnings)
    assert_marker_kept(loaded)


def test_large_gap_refused(tmp_path):
    along = [0, 3, 6, 30, 33]
    positions = [np.array([-80.0, -90.0, z]) for z in along]
    write_series(tmp_path / "s", positions=positions)
    with pytest.raises(InputError, match="slices are missing"):
        load_ct(tmp_path / "s")


def test_identical_images_at_one_position_dropped(tmp_path):
    # Three copies of one image under different SOP instance UIDs, then more slices.
    positions = [np.array([-80.0, -90.0, 0.0])] * 3 + [
        np.array([-80.0, -90.0, 3.0 * k]) for k in range(1, 6)
    ]
    write_series(tmp_path / "s", positions=positions)
    loaded = load_ct(tmp_path / "s")
    assert loaded.image.shape[2] == 6
    assert any("Dropped 2 repeated copies" in text for text in loaded.warnings)


def test_different_images_at_one_position_refused(tmp_path):
    positions = [np.array([-80.0, -90.0, 0.0])] * 3 + [np.array([-80.0, -90.0, 3.0])]
    paths = write_series(tmp_path / "s", positions=positions)
    ds = pydicom.dcmread(paths[1])
    ds.PixelData = (ds.pixel_array + 50).astype(np.int16).tobytes()  # another phase
    ds.save_as(paths[1])
    with pytest.raises(InputError, match="must lie at distinct positions"):
        load_ct(tmp_path / "s")


def test_same_file_twice_is_not_a_duplicate_position(tmp_path):
    paths = write_series(tmp_path / "s", count=5)
    loaded = load_ct(paths + [paths[0]])
    assert loaded.image.shape[2] == 5
    assert any("duplicate copies" in text for text in loaded.warnings)


def test_single_slice_refused(tmp_path):
    paths = write_series(tmp_path / "s", count=1)
    with pytest.raises(InputError, match="at least 2 slices") as info:
        load_ct(paths[0])
    assert SECRET not in str(info.value)


def test_monochrome1_and_padding(tmp_path):
    folder = tmp_path / "s"
    write_series(folder, count=10, PhotometricInterpretation="MONOCHROME1")
    for path in folder.iterdir():  # mark a corner as padding, stored -2000
        ds = pydicom.dcmread(path)
        stored = ds.pixel_array.copy()
        stored[:5, :5] = -2000
        ds.PixelData = stored.tobytes()
        ds.add_new(0x00280120, "SS", -2000)  # PixelPaddingValue, signed data
        ds.save_as(path)
    loaded = load_ct(folder)
    data = np.asarray(loaded.image.dataobj)
    assert np.all(data[:5, :5, :] == -1024.0)
    assert data.max() == MARKER_HU  # MONOCHROME1 changes display only, not HU


def test_enhanced_ct_multiframe(tmp_path):
    iop = HEAD_FIRST_SUPINE
    positions = [np.array([-80.0, -90.0, -10.0 + 3.0 * k]) for k in range(10)]
    frames = np.stack([slice_hu(p, iop) for p in positions])  # (frame, row, column)
    ds = ct_dataset(frames[0], positions[0], iop, generate_uid())
    for keyword in ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing"):
        delattr(ds, keyword)
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = EnhancedCTImageStorage
    ds.NumberOfFrames = len(positions)
    ds.PixelData = np.round(frames[::-1] + 1024).astype(np.int16).tobytes()

    shared = Dataset()
    shared.PlaneOrientationSequence = [Dataset()]
    shared.PlaneOrientationSequence[0].ImageOrientationPatient = list(iop)
    shared.PixelMeasuresSequence = [Dataset()]
    shared.PixelMeasuresSequence[0].PixelSpacing = list(PIXEL_SPACING)
    shared.PixelValueTransformationSequence = [Dataset()]
    transform = shared.PixelValueTransformationSequence[0]
    transform.RescaleSlope, transform.RescaleIntercept = 1, -1024
    transform.RescaleType = "HU"
    ds.SharedFunctionalGroupsSequence = [shared]
    per_frame = []
    for position in positions[::-1]:  # frames stored cranial first
        item = Dataset()
        item.PlanePositionSequence = [Dataset()]
        item.PlanePositionSequence[0].ImagePositionPatient = list(map(float, position))
        per_frame.append(item)
    ds.PerFrameFunctionalGroupsSequence = per_frame
    ds.save_as(tmp_path / "enhanced.dcm", enforce_file_format=True)

    loaded = load_ct(tmp_path / "enhanced.dcm")
    assert loaded.image.shape == (COLUMNS, ROWS, 10)
    assert_marker_kept(loaded)


# --- several series and non-CT objects ------------------------------------------------


def test_largest_axial_series_chosen_and_others_listed(tmp_path):
    write_series(tmp_path / "a", count=14)
    write_series(tmp_path / "b", count=6, SeriesNumber=7, SeriesDescription="Bone 1.0")
    localizer = ct_dataset(
        slice_hu((-80, -90, 0), HEAD_FIRST_SUPINE), (-80, -90, 0), HEAD_FIRST_SUPINE,
        generate_uid(), ImageType=["ORIGINAL", "PRIMARY", "LOCALIZER"],
    )
    localizer.save_as(tmp_path / "scout", enforce_file_format=True)
    capture = ct_dataset(
        slice_hu((-80, -90, 0), HEAD_FIRST_SUPINE), (-80, -90, 0), HEAD_FIRST_SUPINE,
        generate_uid(), SOPClassUID=SecondaryCaptureImageStorage,
    )
    capture.file_meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    capture.save_as(tmp_path / "summary", enforce_file_format=True)
    (tmp_path / "notes.txt").write_text("not an image")

    loaded = load_ct(tmp_path)
    assert loaded.image.shape[2] == 14
    text = " ".join(loaded.warnings)
    assert "series 7 'Bone 1.0' (6 axial images)" in text
    assert "1 localizer" in text and "secondary capture" in text
    assert "1 non-DICOM file" in text
    assert_clean_text(loaded)


def test_series_uid_selects_another_series(tmp_path):
    write_series(tmp_path / "a", count=14)
    wanted = generate_uid()
    write_series(tmp_path / "b", count=6, series_uid=wanted)
    assert load_ct(tmp_path, series_uid=wanted).image.shape[2] == 6
    with pytest.raises(InputError, match="series_uid must name one of the 2 CT series"):
        load_ct(tmp_path, series_uid="1.2.3.4")


def test_png_and_text_are_not_ct(tmp_path):
    png = tmp_path / f"{SECRET}.png"
    png.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(200))
    with pytest.raises(InputError, match="not a CT volume") as info:
        load_ct(png)
    assert SECRET not in str(info.value)
    (tmp_path / "readme.txt").write_text("hello")
    with pytest.raises(InputError, match="2 non-DICOM files"):
        load_ct(tmp_path)


def test_bad_sources(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        load_ct(tmp_path / SECRET)
    with pytest.raises(InputError, match="no files were found"):
        load_ct(tmp_path)
    with pytest.raises(InputError, match="at least one file"):
        load_ct([])
    with pytest.raises(InputError, match="must be a path or a list of paths, not int"):
        load_ct(3)


# --- archives -------------------------------------------------------------------------


def zip_folder(folder: Path, target: Path, prefix: str = "study/series 1/") -> Path:
    with zipfile.ZipFile(target, "w") as bundle:
        for path in sorted(folder.rglob("*")):
            if path.is_file():
                bundle.write(path, prefix + path.relative_to(folder).as_posix())
    return target


@pytest.fixture
def scratch(tmp_path, monkeypatch):
    """Redirect temporary directories, to check that nothing is left behind."""
    folder = tmp_path / "scratch"
    folder.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(folder))
    return folder


def test_zip_with_nested_folders(tmp_path, scratch):
    write_series(tmp_path / "s")
    loaded = load_ct(zip_folder(tmp_path / "s", tmp_path / "upload.zip"))
    assert loaded.image.shape[2] == 14
    assert_marker_kept(loaded)
    assert list(scratch.iterdir()) == []


def test_zip_member_names_cannot_escape(tmp_path, scratch):
    write_series(tmp_path / "s")
    zip_folder(tmp_path / "s", tmp_path / "evil.zip", prefix="../../../")
    assert load_ct(tmp_path / "evil.zip").image.shape[2] == 14
    assert sorted(p.name for p in tmp_path.iterdir()) == ["evil.zip", "s", "scratch"]


def test_zip_holding_a_nifti(tmp_path, scratch):
    write_nifti(tmp_path / "v.nii.gz", RAS_AFFINE)
    with zipfile.ZipFile(tmp_path / "n.zip", "w") as bundle:
        bundle.write(tmp_path / "v.nii.gz", "folder/v.nii.gz")
        bundle.writestr("folder/README.txt", "scan exported for femurrisk")
    loaded = load_ct(tmp_path / "n.zip")
    assert loaded.kind == "nifti"
    assert_marker_kept(loaded)
    assert any("1 other file(s)" in text for text in loaded.warnings)
    assert list(scratch.iterdir()) == []


def test_empty_and_damaged_zip(tmp_path, scratch):
    zipfile.ZipFile(tmp_path / "empty.zip", "w").close()
    with pytest.raises(InputError, match="this one is empty"):
        load_ct(tmp_path / "empty.zip")
    (tmp_path / "bad.zip").write_bytes(b"PK not a zip")
    with pytest.raises(InputError, match="must be a valid ZIP archive"):
        load_ct(tmp_path / "bad.zip")
    assert list(scratch.iterdir()) == []


def test_zip_limits(tmp_path, scratch, monkeypatch):
    write_series(tmp_path / "s", count=4)
    upload = zip_folder(tmp_path / "s", tmp_path / "u.zip")
    monkeypatch.setattr(archive, "MAX_FILES", 3)
    with pytest.raises(InputError, match="at most 3 files, not 4"):
        load_ct(upload)
    monkeypatch.setattr(archive, "MAX_FILES", 100)
    monkeypatch.setattr(archive, "MAX_UNPACKED_BYTES", 10_000)
    with pytest.raises(InputError, match="may unpack to at most"):
        load_ct(upload)
    monkeypatch.setattr(archive, "MAX_UNPACKED_BYTES", 10**9)
    monkeypatch.setattr(archive, "MAX_DEPTH", 1)
    with pytest.raises(InputError, match="nested at most 1 deep, not 2"):
        load_ct(upload)
    assert list(scratch.iterdir()) == []


def test_failure_inside_zip_leaves_nothing(tmp_path, scratch):
    write_series(tmp_path / "s", count=1)
    with pytest.raises(InputError, match="at least 2 slices"):
        load_ct(zip_folder(tmp_path / "s", tmp_path / "u.zip"))
    assert list(scratch.iterdir()) == []


# --- real public data -----------------------------------------------------------------


@needs_data
def test_real_pelvis_nifti_uses_sform():
    path = DATA / "ct" / "pelvis_ct_3mm.nii.gz"
    header = nib.load(path).header
    assert int(header["sform_code"]) == 2 and int(header["qform_code"]) == 0
    loaded = load_ct(path)
    assert loaded.image.shape == (122, 101, 112)
    np.testing.assert_allclose(loaded.image.affine, header.get_sform())
    assert loaded.description.startswith("NIfTI CT volume, 122x101x112 voxels, 3.00")


@needs_data
def test_real_j2k_series():
    loaded = load_ct(DATA / "ct" / "upper_abdomen_dicom_j2k")
    assert loaded.image.shape == (512, 512, 20)
    zooms = loaded.image.header.get_zooms()
    np.testing.assert_allclose(zooms, (0.977, 0.977, 2.0), atol=1e-3)
    data = np.asarray(loaded.image.dataobj)
    assert np.percentile(data, 1) == pytest.approx(-1024, abs=30)  # air
    assert 0.1 < np.mean(data > -500) < 0.6  # a body, not all air or all tissue
    assert 100 < np.percentile(data, 99.5) < 3000  # bone and contrast
    # Head-first supine axial: columns run to the patient's left, slices cranially.
    diagonal = np.diag(loaded.image.affine)[:3]
    np.testing.assert_allclose(diagonal, (-0.977, -0.977, 2.0), atol=1e-3)


def copies_of(source: Path, folder: Path, count: int = 2) -> Path:
    """Write ``count`` copies of one real slice, one per 3 mm, to make a series.

    The copies are marked as original images, so that a reformat's pixels can be
    read as a (non-axial) series.
    """
    folder.mkdir()
    for k in range(count):
        ds = pydicom.dcmread(source)
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.SOPInstanceUID = generate_uid()
        ipp = [float(v) for v in ds.ImagePositionPatient]
        normal = np.cross(
            [float(v) for v in ds.ImageOrientationPatient[:3]],
            [float(v) for v in ds.ImageOrientationPatient[3:]],
        )
        ds.ImagePositionPatient = list(np.array(ipp) + 3.0 * k * normal)
        ds.save_as(folder / f"{k}")
    return folder


@needs_data
def test_j2k_signed_codestream_with_unsigned_header(tmp_path):
    edge = DATA / "dicom_edge_cases"
    mismatch = load_ct(copies_of(edge / "TOSHIBA_J2K_SIZ1_PixRep0.dcm", tmp_path / "a"))
    reference = load_ct(
        copies_of(edge / "TOSHIBA_J2K_SIZ0_PixRep1.dcm", tmp_path / "b")
    )
    np.testing.assert_array_equal(
        np.asarray(mismatch.image.dataobj), np.asarray(reference.image.dataobj)
    )
    assert np.asarray(mismatch.image.dataobj).max() < 2000
    assert any("JPEG 2000" in text for text in mismatch.warnings)


@needs_data
def test_j2k_unsigned_codestream_with_signed_header(tmp_path):
    source = DATA / "dicom_edge_cases" / "J2K_pixelrep_mismatch.dcm"
    folder = copies_of(source, tmp_path / "a")
    data = np.asarray(load_ct(folder).image.dataobj)
    assert data.min() >= -2000 and data.max() < 2000


@needs_data
def test_garbage_pixels_refused(tmp_path):
    source = DATA / "dicom_edge_cases" / "JPEGLossless_1s_1f_i_16_16_bad.dcm"
    with pytest.raises(InputError, match="must be Hounsfield units"):
        load_ct(copies_of(source, tmp_path / "a"))


@needs_data
@pytest.mark.parametrize(
    "name, message",
    [
        ("MAROTECH_CT_JP2Lossy.dcm", "only 1 localizer"),
        ("eCT_Supplemental.dcm", r"values not in HU \(Rescale Type 'US'\)"),
        ("TOSHIBA_J2K_SIZ0_PixRep1.dcm", "only 1 non-axial reformatted"),
        ("no_meta.dcm", "at least 2 slices"),
    ],
)
def test_real_single_files_refused(name, message):
    with pytest.raises(InputError, match=message):
        load_ct(DATA / "dicom_edge_cases" / name)


@needs_data
def test_real_tilted_uneven_head_series():
    loaded = load_ct(DATA / "dicom_series" / "ge_head_gantry_tilt")
    text = " ".join(loaded.warnings)
    assert "tilted by 18.5 degrees" in text and "uneven" in text
    assert loaded.image.ndim == 3


@needs_data
def test_real_multiseries_export_picks_the_axial_series():
    loaded = load_ct(DATA / "dicom_series" / "philips_phantom_multiseries")
    assert loaded.image.shape == (512, 512, 54)
    text = " ".join(loaded.warnings)
    assert "localizer" in text and "secondary capture" in text and "DICOMDIR" in text


@needs_data
def test_real_not_a_volume():
    with pytest.raises(InputError, match="4 of 4 slices share a position"):
        load_ct(DATA / "dicom_series" / "dicom2nifti_failing" / "notavolume")
