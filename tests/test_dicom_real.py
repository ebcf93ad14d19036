"""The DICOM reader on real data: the pelvis scan written as DICOM, the shared files.

The real pelvis CT (NIfTI, sform only) is written by the tests as an axial DICOM
series in several patient positions, then broken one way at a time. Every variant is
compared voxel by voxel with the NIfTI in world space. SimpleITK (GDCM) reads the
same files independently, so a left-right sign error shared by our writer and our
reader cannot pass. The real series and single files of ../shared/data are read and
each must give the stated volume or message.
"""

from __future__ import annotations

import shutil
import zipfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

from femurrisk.errors import InputError
from femurrisk.loading import load_ct
from femurrisk.preprocessing import to_canonical
from test_loading import DATA, SECRET, copies_of

sitk = pytest.importorskip("SimpleITK")

PELVIS = DATA / "ct" / "pelvis_ct_3mm.nii.gz"
EDGE = DATA / "dicom_edge_cases"
SERIES = DATA / "dicom_series"
pytestmark = pytest.mark.skipif(not PELVIS.exists(), reason="shared test data absent")

HFS = (1, 0, 0, 0, 1, 0)
FFS = (-1, 0, 0, 0, 1, 0)
HFP = (-1, 0, 0, 0, -1, 0)
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0])
METAL_HU = 2500


# --- the real scan as DICOM -----------------------------------------------------------


@pytest.fixture(scope="module")
def pelvis() -> nib.Nifti1Image:
    """The real scan in RAS+ canonical order, int16-exact HU."""
    image = to_canonical(load_ct(PELVIS).image)
    data = np.asarray(image.dataobj)
    assert np.array_equal(data, np.round(data))
    return image


def _world_sampler(image: nib.Nifti1Image):
    """Nearest-voxel lookup of HU at RAS points; air outside the volume."""
    data = np.asarray(image.dataobj)
    inverse = np.linalg.inv(image.affine)

    def sample(points_ras: np.ndarray) -> np.ndarray:
        index = np.rint(points_ras @ inverse[:3, :3].T + inverse[:3, 3]).astype(int)
        inside = np.all((index >= 0) & (index < data.shape), axis=-1)
        index = np.where(inside[..., None], index, 0)
        values = data[index[..., 0], index[..., 1], index[..., 2]]
        return np.where(inside, values, -1024.0)

    return sample


def pelvis_series(
    image: nib.Nifti1Image,
    folder: Path,
    iop=HFS,
    *,
    spacing_mm: float = 3.0,
    every: int = 1,
    tilt_deg: float = 0.0,
    series_uid: str | None = None,
    **tags,
) -> list[Path]:
    """Write the scan as an axial series with orientation ``iop`` (LPS cosines).

    Pixels are the scan's voxels (no interpolation) when ``tilt_deg`` is 0; with a
    tilt, the image planes are tilted about the left-right axis while the slice
    origins move straight along the body axis, as on a tilted gantry.
    """
    folder.mkdir(parents=True, exist_ok=True)
    sample = _world_sampler(image)
    shape = image.shape
    lo = image.affine[:3, 3]
    hi = lo + image.affine[:3, :3] @ (np.array(shape) - 1)
    centre_lps = LPS_TO_RAS @ ((lo + hi) / 2)
    row_cos, col_cos = np.array(iop[:3], float), np.array(iop[3:], float)
    if tilt_deg:
        t = np.radians(tilt_deg)
        col_cos = col_cos * np.cos(t) + np.array([0, 0, -np.sign(col_cos[1])]) * np.sin(t)
    normal = np.cross(row_cos, col_cos)
    columns, rows = shape[0], shape[1]
    count = shape[2]
    body_axis = np.array([0, 0, np.sign(normal[2])])
    series_uid = series_uid or generate_uid()
    rng = np.random.default_rng(0)
    names = rng.permutation(count)  # shuffled names: order must come from positions
    paths = []
    r, c = np.meshgrid(np.arange(rows), np.arange(columns), indexing="ij")
    for k in range(0, count, every):
        ipp = (
            centre_lps
            - row_cos * 3.0 * (columns - 1) / 2
            - col_cos * 3.0 * (rows - 1) / 2
            + body_axis * spacing_mm * (k - (count - 1) / 2)
        )
        lps = ipp + c[..., None] * 3.0 * row_cos + r[..., None] * 3.0 * col_cos
        hu = sample(lps @ LPS_TO_RAS)
        ds = _ct_slice(hu, ipp, (row_cos.tolist() + col_cos.tolist()), series_uid, k)
        for key, value in tags.items():
            setattr(ds, key, value)
        path = folder / f"{SECRET}_{names[k]:04d}"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def _ct_slice(hu, ipp, iop, series_uid, k) -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.Modality = "CT"
    ds.PatientName = ds.PatientID = SECRET
    ds.PatientBirthDate = "19500101"
    ds.AccessionNumber = SECRET
    ds.StudyInstanceUID = "1.2.3"
    ds.StudyDate, ds.StudyTime, ds.StudyID = "20240101", "120000", "1"
    ds.SeriesInstanceUID = series_uid
    ds.SeriesNumber, ds.SeriesDescription = 2, "Pelvis 3.0 Standard"
    ds.ConvolutionKernel = "STANDARD"
    ds.InstanceNumber = k + 1
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.ImagePositionPatient = [f"{v:.4f}" for v in ipp]
    ds.ImageOrientationPatient = [f"{v:.6f}" for v in iop]
    ds.PixelSpacing = [3.0, 3.0]
    ds.SliceThickness = 3.0
    ds.Rows, ds.Columns = hu.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 16, 15
    ds.PixelRepresentation = 1
    ds.RescaleSlope, ds.RescaleIntercept = 1, -1024
    ds.PixelData = np.round(hu + 1024).astype(np.int16).tobytes()
    return ds


def canonical(loaded) -> nib.Nifti1Image:
    return to_canonical(loaded.image)


def assert_same_as_pelvis(loaded, pelvis, atol_hu: float = 0.0) -> None:
    image = canonical(loaded)
    assert image.shape == pelvis.shape
    np.testing.assert_allclose(image.affine, pelvis.affine, atol=1e-3)
    np.testing.assert_allclose(np.asarray(image.dataobj), pelvis.dataobj, atol=atol_hu)


def metal_x_mm(image: nib.Nifti1Image) -> float:
    data = np.asarray(image.dataobj)
    return float(np.median(nib.affines.apply_affine(image.affine, np.argwhere(data > METAL_HU))[:, 0]))


def sitk_image(folder: Path) -> nib.Nifti1Image:
    """The series as SimpleITK (GDCM) reads it, as a RAS+ NIfTI image."""
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(folder)))
    image = reader.Execute()
    direction = np.array(image.GetDirection()).reshape(3, 3)
    affine = np.eye(4)
    affine[:3, :3] = LPS_TO_RAS @ direction @ np.diag(image.GetSpacing())
    affine[:3, 3] = LPS_TO_RAS @ np.array(image.GetOrigin())
    data = sitk.GetArrayFromImage(image).transpose(2, 1, 0).astype(np.float32)
    return nib.Nifti1Image(data, affine)


@pytest.mark.parametrize("iop", [HFS, FFS, HFP], ids=["HFS", "FFS", "prone"])
def test_pelvis_as_dicom_equals_nifti_and_simpleitk_agrees(tmp_path, pelvis, iop):
    pelvis_series(pelvis, tmp_path / "s", iop)
    loaded = load_ct(tmp_path / "s")
    assert_same_as_pelvis(loaded, pelvis)
    assert metal_x_mm(canonical(loaded)) < -30  # the implant stays in the left femur
    independent = to_canonical(sitk_image(tmp_path / "s"))
    np.testing.assert_allclose(independent.affine, pelvis.affine, atol=1e-3)
    np.testing.assert_array_equal(np.asarray(independent.dataobj), pelvis.dataobj)
    assert all(SECRET not in text for text in [loaded.description, *loaded.warnings])


def test_real_j2k_series_agrees_with_simpleitk():
    folder = DATA / "ct" / "upper_abdomen_dicom_j2k"
    ours = canonical(load_ct(folder))
    theirs = to_canonical(sitk_image(folder))
    np.testing.assert_allclose(ours.affine, theirs.affine, atol=1e-3)
    np.testing.assert_array_equal(np.asarray(ours.dataobj), np.asarray(theirs.dataobj))


# --- the real scan broken one way at a time -------------------------------------------


@pytest.fixture
def hfs(tmp_path, pelvis) -> list[Path]:
    return pelvis_series(pelvis, tmp_path / "s")


def _edit(path: Path, change) -> None:
    ds = pydicom.dcmread(path)
    change(ds)
    ds.save_as(path)


def _along(path: Path) -> float:
    return float(pydicom.dcmread(path, stop_before_pixels=True).ImagePositionPatient[2])


def test_slice_removed(hfs, pelvis):
    middle = sorted(hfs, key=_along)[50]
    middle.unlink()
    loaded = load_ct(hfs[0].parent)
    assert loaded.image.shape[2] == pelvis.shape[2]  # the gap is filled
    assert any("slices may be missing" in text for text in loaded.warnings)
    data, truth = np.asarray(canonical(loaded).dataobj), np.asarray(pelvis.dataobj)
    keep = [k for k in range(truth.shape[2]) if k != 50]
    np.testing.assert_allclose(data[:, :, keep], truth[:, :, keep], atol=0.01)


def test_slice_duplicated_under_a_new_uid(hfs, pelvis):
    copy = hfs[0].parent / "copy"
    shutil.copy(hfs[10], copy)
    _edit(copy, lambda ds: setattr(ds, "SOPInstanceUID", generate_uid()))
    loaded = load_ct(hfs[0].parent)
    assert_same_as_pelvis(loaded, pelvis)
    assert any("Dropped 1 repeated" in text for text in loaded.warnings)


def test_localizer_added(hfs, pelvis):
    shutil.copy(hfs[0], hfs[0].parent / "scout")

    def scout(ds):
        ds.ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER"]
        ds.SOPInstanceUID = generate_uid()
        ds.ImageOrientationPatient = [1, 0, 0, 0, 0, -1]

    _edit(hfs[0].parent / "scout", scout)
    loaded = load_ct(hfs[0].parent)
    assert_same_as_pelvis(loaded, pelvis)
    assert any("1 localizer" in text for text in loaded.warnings)


def test_tilted_gantry(tmp_path, pelvis):
    pelvis_series(pelvis, tmp_path / "s", tilt_deg=12.0)
    loaded = load_ct(tmp_path / "s")
    assert any("tilted by 12.0 degrees" in text for text in loaded.warnings)
    image = canonical(loaded)
    assert metal_x_mm(image) == pytest.approx(metal_x_mm(pelvis), abs=3.0)
    # Straightened and resampled twice: compare where both have data.
    resampled = nib.processing.resample_from_to(image, pelvis, order=0, cval=-1024)
    body = np.asarray(pelvis.dataobj) > -500
    error = np.abs(np.asarray(resampled.dataobj) - np.asarray(pelvis.dataobj))[body]
    assert np.median(error) < 40


def test_second_series_and_the_selection_rule(tmp_path, pelvis):
    folder = tmp_path / "study"
    standard = generate_uid()
    pelvis_series(pelvis, folder / "a", series_uid=standard)
    pelvis_series(
        pelvis, folder / "b", every=2, spacing_mm=3.0, SeriesNumber=5,
        SeriesDescription="Pelvis 6.0 Bone", ConvolutionKernel="BONE",
    )
    lung = generate_uid()
    pelvis_series(
        pelvis, folder / "c", series_uid=lung, SeriesNumber=6,
        SeriesDescription="Thorax 3.0 Lung", ConvolutionKernel="LUNG",
    )
    loaded = load_ct(folder)  # thin standard beats a thick bone and a thin lung kernel
    assert_same_as_pelvis(loaded, pelvis)
    text = " ".join(loaded.warnings)
    assert "Using series 2 'Pelvis 3.0 Standard'" in text
    assert "series 5 'Pelvis 6.0 Bone'" in text and "series 6 'Thorax 3.0 Lung'" in text

    pelvis_series(
        pelvis, folder / "d", SeriesNumber=7, SeriesDescription="Pelvis 3.0 Bone",
        ConvolutionKernel="BONEPLUS",
    )
    assert "Using series 7" in " ".join(load_ct(folder).warnings)
    assert "Using series 6" in " ".join(load_ct(folder, series_uid=lung).warnings)


def test_monochrome1(hfs, pelvis):
    for path in hfs:
        _edit(path, lambda ds: setattr(ds, "PhotometricInterpretation", "MONOCHROME1"))
    assert_same_as_pelvis(load_ct(hfs[0].parent), pelvis)


def test_padding_values(hfs, pelvis):
    def pad(ds):
        stored = ds.pixel_array.copy()
        stored[stored <= 0] = -3000  # air (HU -1024 and below) becomes padding
        ds.PixelData = stored.tobytes()
        ds.add_new(0x00280120, "SS", -3000)  # PixelPaddingValue

    for path in hfs:
        _edit(path, pad)
    data = np.asarray(canonical(load_ct(hfs[0].parent)).dataobj)
    truth = np.asarray(pelvis.dataobj)
    np.testing.assert_array_equal(data, np.where(truth <= -1024, -1024, truth))


def test_mixed_rescale_per_slice(hfs, pelvis):
    def finer(ds):  # HU = stored * 0.5 - 1024: twice the stored values
        stored = ds.pixel_array.astype(np.int32) * 2
        ds.PixelData = stored.astype(np.int16).tobytes()
        ds.RescaleSlope, ds.RescaleIntercept = 0.5, -1024

    for path in hfs[::2]:
        _edit(path, finer)
    assert_same_as_pelvis(load_ct(hfs[0].parent), pelvis)


def test_not_ct_and_single_image(hfs):
    with pytest.raises(InputError, match="at least 2 slices"):
        load_ct(hfs[0])

    def as_mr(ds):
        ds.Modality = "MR"
        ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.4"

    for path in hfs:
        _edit(path, as_mr)
    with pytest.raises(InputError, match=r"holds only \d+ MR objects: this is not a CT"):
        load_ct(hfs[0].parent)


def test_zip_with_dicomdir(tmp_path, pelvis):
    from pydicom.fileset import FileSet

    paths = pelvis_series(pelvis, tmp_path / "s")
    fileset = FileSet()
    for path in paths:
        fileset.add(pydicom.dcmread(path))
    fileset.write(tmp_path / "export")
    with zipfile.ZipFile(tmp_path / "upload.zip", "w") as bundle:
        for path in sorted((tmp_path / "export").rglob("*")):
            if path.is_file():
                bundle.write(path, "CD/" + path.relative_to(tmp_path / "export").as_posix())
    loaded = load_ct(tmp_path / "upload.zip")
    assert_same_as_pelvis(loaded, pelvis)
    assert any("1 DICOMDIR index file" in text for text in loaded.warnings)


# --- the shared single files and series -----------------------------------------------

#: Each file alone, then copied into a two-slice series: the expected outcome.
EDGE_CASES = {
    "CT_small.dcm": ("at least 2 slices", (128, 128, 2)),
    "no_meta.dcm": ("at least 2 slices", None),
    "693_J2KI.dcm": ("at least 2 slices", (512, 512, 2)),
    "J2K_pixelrep_mismatch.dcm": ("at least 2 slices", (512, 512, 2)),
    "eCT_Supplemental.dcm": (r"values not in HU \(Rescale Type 'US'\)", None),
    "bad_sequence.dcm": ("at least 2 slices", (512, 512, 2)),
    "explicit_VR-UN.dcm": ("at least 2 slices", (512, 512, 2)),
    "TOSHIBA_J2K_SIZ0_PixRep1.dcm": ("only 1 non-axial reformatted", (512, 512, 2)),
    "TOSHIBA_J2K_SIZ1_PixRep0.dcm": ("only 1 non-axial reformatted", (512, 512, 2)),
    "TOSHIBA_J2K_OpenJPEGv2Regression.dcm": ("at least 2 slices", (512, 512, 2)),
    "MAROTECH_CT_JP2Lossy.dcm": ("only 1 localizer", (512, 716, 2)),
    "JPEGLossless_1s_1f_i_16_16_bad.dcm": ("at least 2 slices", "Hounsfield units"),
}


def test_every_edge_case_file_is_listed():
    assert sorted(p.name for p in EDGE.glob("*.dcm")) == sorted(EDGE_CASES)


@pytest.mark.parametrize("name", sorted(EDGE_CASES))
def test_edge_case_file(tmp_path, name):
    alone, as_series = EDGE_CASES[name]
    with pytest.raises(InputError, match=alone):
        load_ct(EDGE / name)
    if as_series is None:
        return
    folder = copies_of(EDGE / name, tmp_path / "s")
    if isinstance(as_series, str):
        with pytest.raises(InputError, match=as_series):
            load_ct(folder)
        return
    loaded = load_ct(folder)
    data = np.asarray(loaded.image.dataobj)
    assert data.shape == as_series
    assert np.median(data) > -1100 and np.percentile(data, 99) < 3000
    ds = pydicom.dcmread(folder / "0")
    if name.startswith(("TOSHIBA_J2K_SIZ1", "J2K_pixelrep")):
        return  # signedness fixes, checked in test_loading
    reference = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    if "PixelPaddingValue" in ds:  # padding reads as air, -1024 HU
        reference[ds.pixel_array == ds.PixelPaddingValue] = -1024
    np.testing.assert_allclose(data[:, :, 0], reference.T)  # same as pydicom in-process


def test_no_meta_file_beside_its_twin(tmp_path):
    """The file with a stray leading byte reads like the same image with a header."""
    twin = pydicom.dcmread(EDGE / "CT_small.dcm")
    twin.SOPInstanceUID = generate_uid()
    twin.ImagePositionPatient[2] = float(twin.ImagePositionPatient[2]) + 5.0
    twin.save_as(tmp_path / "twin.dcm")
    loaded = load_ct([EDGE / "no_meta.dcm", tmp_path / "twin.dcm"])
    data = np.asarray(loaded.image.dataobj)
    np.testing.assert_array_equal(data[:, :, 0], data[:, :, 1])
    assert any("stray bytes" in text for text in loaded.warnings)


def test_real_series_gantry_tilt_head():
    loaded = load_ct(SERIES / "ge_head_gantry_tilt")
    assert loaded.image.shape == (512, 512, 37)
    np.testing.assert_allclose(loaded.image.header.get_zooms(), (0.488, 0.488, 4.0), atol=0.01)
    text = " ".join(loaded.warnings)
    assert "tilted by 18.5 degrees" in text and "Gap of up to 7.00 mm" in text


def test_real_series_philips_multiseries():
    loaded = load_ct(SERIES / "philips_phantom_multiseries")
    assert loaded.image.shape == (512, 512, 54)
    np.testing.assert_allclose(loaded.image.header.get_zooms(), (0.482, 0.482, 2.371), atol=0.01)
    text = " ".join(loaded.warnings)
    assert "5 CT secondary capture" in text and "4 DICOMDIR index files" in text
    assert "1 localizer" in text and "tilted by 18.5 degrees" in text


FAILING = SERIES / "dicom2nifti_failing"


def test_real_series_tilt_without_tilt_tag():
    loaded = load_ct(FAILING / "gantrytilting")
    assert loaded.image.shape == (512, 512, 4)
    assert any("tilted by 14.0 degrees" in text for text in loaded.warnings)


def test_real_series_missing_slice():
    loaded = load_ct(FAILING / "sliceincrement" / "001")
    assert loaded.image.shape == (512, 512, 5)
    assert any("Gap of up to 10.00 mm" in text for text in loaded.warnings)


def test_real_series_uneven_matches_reference_extent():
    loaded = load_ct(FAILING / "sliceincrement" / "002")
    reference = nib.load(FAILING / "sliceincrement" / "002_ground_truth.nii.gz")
    assert any("uneven" in text for text in loaded.warnings)

    def centre(image):
        corners = np.array(np.meshgrid(*[[0, n - 1] for n in image.shape[:3]])).reshape(3, -1).T
        return nib.affines.apply_affine(image.affine, corners).mean(axis=0)

    # Same block of the patient, whatever the voxel order (reference from dicom2nifti).
    np.testing.assert_allclose(centre(loaded.image), centre(reference), atol=2.0)


def test_real_series_not_a_volume():
    with pytest.raises(InputError, match="4 of 4 slices share a position"):
        load_ct(FAILING / "notavolume")
