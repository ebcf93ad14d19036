"""Read a CT scan from whatever the user has: NIfTI, DICOM files, a folder or a ZIP.

Every reader ends in the same :class:`LoadedCT`: a 3D float32 NIfTI image in
Hounsfield units whose affine maps voxel indices to RAS+ mm. Everything a user can
fix raises :class:`femurrisk.errors.InputError`; messages and log lines never carry a
file name or a patient attribute. A ZIP archive is unpacked into a temporary
directory that is removed, after the volume is in memory, whether reading succeeds
or not.
"""

from __future__ import annotations

import logging
import tempfile
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np

from femurrisk import archive
from femurrisk.dicom import read_ct_series
from femurrisk.errors import InputError

logger = logging.getLogger(__name__)

#: Plausible Hounsfield range: air is -1000, dense cortical bone and contrast stay
#: well below 4000; metal goes beyond but covers little of a scan.
PLAUSIBLE_HU = (-1100.0, 4000.0)

#: Largest fraction of voxels outside :data:`PLAUSIBLE_HU` that is still accepted.
#: Padding outside the reconstruction circle (often -2000 or -3024) covers up to
#: about a quarter of a slice.
MAX_IMPLAUSIBLE_FRACTION = 0.5

NIFTI_SUFFIXES = (".nii", ".nii.gz")


@dataclass
class LoadedCT:
    """A CT volume ready for preprocessing.

    Attributes:
        image: float32 Hounsfield units, 3D; the affine maps voxel -> RAS+ mm.
        kind: ``"nifti"`` or ``"dicom"``.
        description: what was read, e.g. "DICOM CT series, 120 slices of 512x512,
            0.78 x 0.78 x 3.00 mm"; never an identifier or a file name.
        warnings: things the user should know (tilt, uneven spacing, other series).
    """

    image: nib.Nifti1Image
    kind: str
    description: str
    warnings: list[str] = field(default_factory=list)


def load_ct(
    source: str | Path | Sequence[str | Path], *, series_uid: str | None = None
) -> LoadedCT:
    """Read a CT scan into a float32 HU volume with a RAS+ affine.

    Args:
        source: a NIfTI file (.nii, .nii.gz), a DICOM file, a folder (searched
            recursively), a .zip archive (nested folders allowed), or a list of
            paths such as the loose DICOM files of a browser upload, with any or no
            extension.
        series_uid: SeriesInstanceUID of the DICOM series to read when several are
            present; by default the axial series with the most slices is read
            (see :func:`femurrisk.dicom.read_ct_series`).

    Returns:
        The volume with its kind, a description and warnings.

    Raises:
        InputError: the input does not exist, is not a CT volume, or cannot be read;
            the message says what was found and what is expected.
    """
    paths = _as_paths(source)
    if len(paths) == 1 and paths[0].is_file() and _is_zip(paths[0]):
        with tempfile.TemporaryDirectory(prefix="femurrisk-") as scratch:
            files = _unpack(paths[0], Path(scratch))
            loaded = _load_files(files, series_uid)  # all in memory before cleanup
    else:
        files = []
        for path in paths:
            files.extend(archive.list_folder(path) if path.is_dir() else [path])
        loaded = _load_files(files, series_uid)

    _check_plausible_hu(np.asarray(loaded.image.dataobj))
    for text in loaded.warnings:
        logger.warning(text)
    logger.info("Loaded %s", loaded.description)
    return loaded


# --- what was given -------------------------------------------------------------------


def _as_paths(source: str | Path | Sequence[str | Path]) -> list[Path]:
    """Paths from a path or a list of paths, all of which must exist."""
    if isinstance(source, (str, Path)):
        items = [source]
    elif isinstance(source, Sequence):
        items = list(source)
    else:
        raise InputError(
            "source must be a path or a list of paths, not "
            f"{type(source).__name__}"
        )
    if not items:
        raise InputError("source must name at least one file or folder, not none")
    paths = []
    for item in items:
        if not isinstance(item, (str, Path)):
            raise InputError(
                f"each source path must be a str or Path, not {type(item).__name__}"
            )
        path = Path(item)
        if not path.exists():
            raise InputError(
                "source must be an existing file or folder, but a given path does "
                "not exist"
            )
        paths.append(path)
    return paths


def _is_zip(path: Path) -> bool:
    return path.suffix.lower() == ".zip"


def _is_nifti(path: Path) -> bool:
    return path.name.lower().endswith(NIFTI_SUFFIXES)


def _unpack(path: Path, scratch: Path) -> list[Path]:
    try:
        return archive.extract_zip(path, scratch)
    except (zlib.error, NotImplementedError, EOFError, OSError) as exc:
        logger.warning("Unpacking failed (%s)", type(exc).__name__)
        raise InputError(
            "a ZIP archive must unpack with standard (deflate/store) compression, "
            "but this one could not be unpacked"
        ) from None


def _load_files(files: list[Path], series_uid: str | None) -> LoadedCT:
    """Dispatch on what the files are: one NIfTI volume, or DICOM."""
    niftis = [f for f in files if _is_nifti(f)]
    nested = [f for f in files if _is_zip(f)]
    others = [f for f in files if f not in niftis and f not in nested]
    if niftis and not others:
        if len(niftis) > 1:
            raise InputError(
                f"input must contain one NIfTI volume, not {len(niftis)}; "
                "upload the scans one at a time"
            )
        return _load_nifti(niftis[0])
    if nested and not others:
        raise InputError(
            "input must contain CT images, but it holds only ZIP archives; "
            "archives inside archives or folders are not opened, unpack them first"
        )
    try:
        volume = read_ct_series(others, series_uid)
    except InputError:
        if len(niftis) != 1:
            raise
        loaded = _load_nifti(niftis[0])  # e.g. a README beside the volume
        loaded.warnings.append(
            f"Read the one NIfTI volume; the {len(others)} other file(s) beside it "
            "are not a readable CT series."
        )
        return loaded
    if niftis or nested:
        volume.warnings.append(
            f"Ignored {len(niftis) + len(nested)} NIfTI or ZIP file(s) found beside "
            "the DICOM files."
        )
    image = nib.Nifti1Image(volume.volume_hu, volume.affine_ras)
    _set_header(image, volume.affine_ras)
    return LoadedCT(image, "dicom", volume.description, volume.warnings)


# --- NIfTI ----------------------------------------------------------------------------


def _load_nifti(path: Path) -> LoadedCT:
    """Read a NIfTI-1/2 file: sform if coded, else qform if coded, else refuse.

    nibabel's default affine would silently fall back to a voxel-size diagonal when no
    code is set, which can swap left and right; here the codes are checked directly.
    """
    try:
        image = nib.load(path, mmap=False)
        if not isinstance(image, (nib.Nifti1Image, nib.Nifti2Image)):
            raise InputError(
                "a .nii/.nii.gz file must hold a NIfTI image, not "
                f"{type(image).__name__}"
            )
        header = image.header
        sform_code = int(header["sform_code"])
        qform_code = int(header["qform_code"])
        data = np.asanyarray(image.dataobj)  # scl_slope/scl_inter applied by nibabel
    except InputError:
        raise
    except Exception as exc:  # nibabel, gzip and zlib raise many types
        logger.warning("NIfTI reading failed (%s)", type(exc).__name__)
        raise InputError(
            "a .nii/.nii.gz file must be a readable NIfTI image, but this one is "
            "damaged or not NIfTI"
        ) from None

    if sform_code > 0:
        affine = image.get_sform()
    elif qform_code > 0:
        affine = image.get_qform()
    else:
        raise InputError(
            "a NIfTI volume must state its orientation (sform_code or qform_code "
            "above 0), not 0 and 0: orientation unknown, left and right could be "
            "swapped"
        )
    data = _three_d(data)
    if not np.all(np.isfinite(affine)) or abs(np.linalg.det(affine[:3, :3])) < 1e-6:
        raise InputError("a NIfTI affine must be finite and invertible, but it is not")

    result = nib.Nifti1Image(data.astype(np.float32, copy=False), affine)
    _set_header(result, affine)
    zooms = result.header.get_zooms()
    description = (
        f"NIfTI CT volume, {'x'.join(str(n) for n in data.shape)} voxels, "
        + " x ".join(f"{z:.2f}" for z in zooms)
        + " mm"
    )
    return LoadedCT(result, "nifti", description, [])


def _three_d(data: np.ndarray) -> np.ndarray:
    """Squeeze singleton axes beyond the third; refuse real 4D, 2D and non-real data."""
    if not np.issubdtype(data.dtype, np.number) or np.iscomplexobj(data):
        raise InputError(
            f"a CT volume must hold real numbers, not {data.dtype} (RGB or complex)"
        )
    if data.ndim > 3:
        extra = data.shape[3:]
        if any(n != 1 for n in extra):
            raise InputError(
                "a CT volume must be 3D, not "
                f"{data.ndim}D with shape {tuple(data.shape)} (a time series or "
                "several volumes in one file?)"
            )
        data = data.reshape(data.shape[:3])
    if data.ndim < 3 or min(data.shape) < 2:
        raise InputError(
            "a CT volume must be 3D with at least 2 voxels along each axis, not "
            f"shape {tuple(data.shape)}"
        )
    return data


# --- shared ---------------------------------------------------------------------------


def _set_header(image: nib.Nifti1Image, affine: np.ndarray) -> None:
    """Mark both sform and qform as scanner coordinates, in mm."""
    image.set_sform(affine, code=1)
    image.set_qform(affine, code=1)
    image.header.set_xyzt_units(xyz="mm")
    image.header.set_data_dtype(np.float32)


def _check_plausible_hu(volume: np.ndarray) -> None:
    """Refuse volumes whose values are mostly not Hounsfield units.

    Catches wrong signedness, garbage from a broken decoder, and images stored in
    another unit (e.g. unscaled 0..4095 values or an MR scan saved as NIfTI).
    """
    low, high = PLAUSIBLE_HU
    sample = volume[:: max(1, volume.shape[0] // 64), :: max(1, volume.shape[1] // 64)]
    outside = float(np.mean((sample < low) | (sample > high)))
    if outside > MAX_IMPLAUSIBLE_FRACTION:
        raise InputError(
            f"CT values must be Hounsfield units, mostly within {low:.0f}..{high:.0f}, "
            f"but {outside:.0%} of voxels lie outside "
            f"(median {np.median(sample):.0f}): "
            "the pixel data are damaged, wrongly decoded, or not CT"
        )
