"""Write a synthetic case as a DICOM CT series, the way its hospital would.

One uncompressed CT Image Storage file per axial slice, int16 stored values with
rescale slope 1 and intercept 0 (PS3.3 C.11.1.1.2), fresh UIDs and fictitious
identifiers only. The pixel grid is laid out as the scanner displays it for the
patient position (PS3.3 C.7.3.1.1.2): Image Orientation (Patient) is

====== ===================== ==============================================
code   row, column direction  picture on screen
====== ===================== ==============================================
HFS    +x, +y (LPS)           patient's right on the left, anterior up
FFS    -x, +y                 patient's right on the right, anterior up
HFP    -x, -y                 patient's right on the right, posterior up
FFP    +x, -y                 patient's right on the left, posterior up
====== ===================== ==============================================

and Image Position (Patient) is the centre of each slice's first pixel, so any
reader that honours IOP/IPP rebuilds the same RAS+ volume. Head-first series are
numbered from the top slice down, feet-first from the bottom up, as scanners
acquire them.
"""

from __future__ import annotations

import datetime as dt
import logging
from pathlib import Path

import nibabel as nib
import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

logger = logging.getLogger(__name__)

#: Row and column direction cosines in DICOM LPS per patient position.
ORIENTATION_LPS = {
    "HFS": ((1.0, 0.0, 0.0), (0.0, 1.0, 0.0)),
    "FFS": ((-1.0, 0.0, 0.0), (0.0, 1.0, 0.0)),
    "HFP": ((-1.0, 0.0, 0.0), (0.0, -1.0, 0.0)),
    "FFP": ((1.0, 0.0, 0.0), (0.0, -1.0, 0.0)),
}

#: The UID root of pydicom's generator: every UID written is fresh.
_STUDY_DATE = dt.date(2020, 1, 6)


def _uid(seed_text: str) -> str:
    """A UID derived from ``seed_text`` (reproducible, unique per input)."""
    return generate_uid(entropy_srcs=[seed_text])


def write_dicom_series(
    image: nib.Nifti1Image,
    folder: str | Path,
    *,
    position: str = "HFS",
    patient_id: str = "FR-SYN-000-00000",
    study_key: str = "0",
    day: float = 0.0,
    site: str = "A",
    manufacturer: str = "Synthetic CT",
    kernel: str = "STANDARD",
    slice_thickness_mm: float | None = None,
    contrast_phase: str = "none",
    sex: str = "O",
    age_years: float | None = None,
) -> list[Path]:
    """Write an axis-aligned RAS+ HU volume as one DICOM file per slice.

    Args:
        image: Volume with an axis-aligned, positive-diagonal (RAS+) affine.
        folder: Output folder, created if needed.
        position: Patient position, a key of :data:`ORIENTATION_LPS`.
        patient_id: Fictitious patient identifier (also the name).
        study_key: Text that, with ``patient_id``, makes the UIDs unique and
            reproducible.
        day: Days since the patient's first CT (shifts the study date).
        site: Institution code.
        manufacturer: Written as Manufacturer.
        kernel: Convolution Kernel.
        slice_thickness_mm: Slice Thickness; the slice spacing if None.
        contrast_phase: "none" writes no Contrast/Bolus Agent.
        sex: "M", "F" or "O".
        age_years: Patient's Age, if known.

    Returns:
        The files, in instance order.

    Raises:
        ValueError: If the affine is not axis-aligned RAS+ or the position unknown.
        OSError: If the folder cannot be written.
    """
    affine = image.affine
    spacing = np.diag(affine)[:3]
    if not np.allclose(affine[:3, :3], np.diag(spacing)) or (spacing <= 0).any():
        raise ValueError(f"affine must be axis-aligned RAS+, got {affine[:3, :3].tolist()}")
    if position not in ORIENTATION_LPS:
        raise ValueError(f"position must be one of {sorted(ORIENTATION_LPS)}, "
                         f"got {position!r}")
    volume = np.asarray(image.dataobj, dtype=np.float32)  # (x, y, z) RAS
    stored = np.clip(np.round(volume), -32768, 32767).astype(np.int16)
    row_lps, col_lps = (np.array(v) for v in ORIENTATION_LPS[position])
    # RAS index i grows along LPS -x; j along LPS -y. A row runs along +x LPS when
    # row_lps[0] > 0, i.e. towards decreasing i.
    flip_i = row_lps[0] > 0 if row_lps[0] != 0 else False
    flip_j = col_lps[1] > 0
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)

    study_uid = _uid(f"{patient_id}/{study_key}/study")
    series_uid = _uid(f"{patient_id}/{study_key}/series")
    frame_uid = _uid(f"{patient_id}/{study_key}/frame")
    date = (_STUDY_DATE + dt.timedelta(days=int(day))).strftime("%Y%m%d")
    nx, ny, nz = stored.shape
    head_first = position.startswith("HF")
    order = range(nz - 1, -1, -1) if head_first else range(nz)
    files = []
    for number, k in enumerate(order, start=1):
        plane = stored[:, :, k]
        plane = plane[::-1] if flip_i else plane
        plane = plane[:, ::-1] if flip_j else plane
        pixels = np.ascontiguousarray(plane.T)  # (row, column)
        first_ijk = [nx - 1 if flip_i else 0, ny - 1 if flip_j else 0, k]
        first_ras = nib.affines.apply_affine(affine, first_ijk)
        position_lps = first_ras * np.array([-1.0, -1.0, 1.0])

        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
        ds.file_meta.MediaStorageSOPInstanceUID = _uid(
            f"{patient_id}/{study_key}/image/{number}")
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.SOPClassUID = CTImageStorage
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, series_uid
        ds.FrameOfReferenceUID = frame_uid
        ds.Modality = "CT"
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.PatientName = patient_id
        ds.PatientID = patient_id
        ds.PatientSex = sex
        if age_years is not None:
            ds.PatientAge = f"{int(age_years):03d}Y"
        ds.StudyDate = ds.SeriesDate = ds.ContentDate = date
        ds.StudyTime = ds.SeriesTime = ds.ContentTime = "090000"
        ds.StudyID = study_key[-16:]
        ds.AccessionNumber = ""
        ds.ReferringPhysicianName = ""
        ds.InstitutionName = f"Synthetic hospital {site}"
        ds.Manufacturer = manufacturer
        ds.StudyDescription = "CT ABDOMEN PELVIS (synthetic)"
        ds.SeriesDescription = f"Axial {kernel}"
        ds.BodyPartExamined = "PELVIS"
        ds.PatientPosition = position
        ds.ConvolutionKernel = kernel
        if contrast_phase != "none":
            ds.ContrastBolusAgent = f"IV contrast ({contrast_phase})"
        ds.SeriesNumber = 2
        ds.InstanceNumber = number
        ds.SliceThickness = float(slice_thickness_mm or spacing[2])
        ds.ImagePositionPatient = [float(round(v, 4)) for v in position_lps]
        ds.ImageOrientationPatient = [float(v) for v in (*row_lps, *col_lps)]
        ds.SliceLocation = float(round(position_lps[2], 4))
        ds.PixelSpacing = [float(spacing[1]), float(spacing[0])]  # row, column
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows, ds.Columns = pixels.shape
        ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 16, 15
        ds.PixelRepresentation = 1
        ds.RescaleIntercept, ds.RescaleSlope = 0.0, 1.0
        ds.RescaleType = "HU"
        ds.WindowCenter, ds.WindowWidth = 40.0, 400.0
        ds.PixelData = pixels.tobytes()
        path = folder / f"CT{number:05d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        files.append(path)
    logger.info("wrote %d DICOM slices (%s)", len(files), position)
    return files
