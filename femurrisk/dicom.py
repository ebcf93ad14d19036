"""Read one CT series out of a pile of DICOM files and turn it into a volume.

Array axes of the volume built here are (column, row, slice): index ``c`` moves along
the row direction cosine ``IOP[0:3]`` by ``PixelSpacing[1]``, index ``r`` along the
column direction cosine ``IOP[3:6]`` by ``PixelSpacing[0]`` (DICOM PS3.3 C.7.6.2.1.1),
and index ``s`` along the slice normal, cranial or caudal as the positions run. With
that order the affine is simply [row cosine, column cosine, normal] times spacing.

Nothing here ever puts a file name or a patient attribute into a message or a log
line; series are named by SeriesNumber and SeriesDescription only.
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.encaps import generate_frames
from pydicom.pixels.utils import get_j2k_parameters
from pydicom.uid import (
    JPEG2000TransferSyntaxes,
    CTImageStorage,
    EnhancedCTImageStorage,
    LegacyConvertedEnhancedCTImageStorage,
    MediaStorageDirectoryStorage,
)
from scipy import ndimage

from femurrisk.errors import InputError

logger = logging.getLogger(__name__)

#: SOP classes read as CT volumes. Secondary captures labelled CT (screenshots, dose
#: reports) and everything else are skipped.
CT_SOP_CLASSES = frozenset(
    {CTImageStorage, EnhancedCTImageStorage, LegacyConvertedEnhancedCTImageStorage}
)

#: Fewest slices that make a volume.
MIN_SLICES = 2

#: Two slices closer than this along the normal, mm, count as one position.
SAME_POSITION_MM = 0.01

#: Steps between slices may differ by this fraction of the typical step (or by
#: ``SPACING_TOLERANCE_MM``, whichever is larger) before the series counts as uneven.
SPACING_TOLERANCE = 0.01
SPACING_TOLERANCE_MM = 0.01

#: A step longer than this many typical steps is reported as probably missing slices.
GAP_WARNING_FACTOR = 1.5

#: A step longer than this many typical steps is refused: too much would be invented.
GAP_REFUSAL_FACTOR = 4.0

#: In-plane drift of the slice origin, in pixels over the whole stack, below which a
#: stack counts as untilted.
SHEAR_TOLERANCE_PX = 0.05

#: A stack is axial when its slice normal is within 45 degrees of the body axis.
AXIAL_MIN_COSINE = math.cos(math.radians(45.0))

#: Value given to padding pixels and to pixels shifted in from outside the field of
#: view when a tilted stack is straightened, HU (air).
AIR_HU = -1024.0


@dataclass
class DicomVolume:
    """A CT series read into memory.

    Attributes:
        volume_hu: float32 array, axes (column, row, slice), Hounsfield units.
        affine_ras: 4x4 voxel -> RAS+ mm.
        description: what was read, without identifiers.
        warnings: things the user should know.
    """

    volume_hu: np.ndarray
    affine_ras: np.ndarray
    description: str
    warnings: list[str] = field(default_factory=list)


@dataclass
class _Slice:
    """One 2D image: a single-frame file or one frame of a multi-frame file."""

    path: Path
    frame: int | None
    instance_uid: str
    position: np.ndarray  # ImagePositionPatient, LPS mm
    orientation: np.ndarray  # ImageOrientationPatient, 6 values
    spacing: tuple[float, float]  # PixelSpacing: (between rows, between columns)
    shape: tuple[int, int]  # (Rows, Columns)
    slope: float
    intercept: float


@dataclass
class _Series:
    """Slices that share a SeriesInstanceUID, orientation, matrix and pixel size."""

    uid: str
    number: str
    label: str
    slices: list[_Slice] = field(default_factory=list)

    @property
    def normal(self) -> np.ndarray:
        iop = self.slices[0].orientation
        return np.cross(iop[:3], iop[3:])

    @property
    def is_axial(self) -> bool:
        return abs(self.normal[2]) >= AXIAL_MIN_COSINE

    def name(self) -> str:
        """Series number and description, for messages (never an identifier)."""
        plane = "axial" if self.is_axial else "non-axial"
        count = len(self.slices)
        return f"series {self.number} '{self.label}' ({count} {plane} images)"


@dataclass
class _Survey:
    """What the files turned out to be."""

    series: dict[tuple, _Series] = field(default_factory=dict)
    skipped: Counter = field(default_factory=Counter)


# --- public entry point ---------------------------------------------------------------


def read_ct_series(files: Sequence[Path], series_uid: str | None = None) -> DicomVolume:
    """Read the CT series among ``files`` into a volume in Hounsfield units.

    Files that are not CT images are skipped: DICOMDIR and other index files, non-DICOM
    files, localizers (ImageType containing LOCALIZER), secondary captures and other
    SOP classes, other modalities. The remaining slices are grouped by
    SeriesInstanceUID, orientation, matrix and pixel size. Selection rule: the group
    named by ``series_uid`` if given; else the axial group (slice normal within 45
    degrees of the body axis) with the most slices; if no group is axial, the largest
    group, with a warning. Other groups are listed in the warnings.

    Slices are ordered by ImagePositionPatient projected on the slice normal and the
    slice spacing is taken from those positions, never from file names,
    InstanceNumber or SliceThickness. A gantry-tilted (sheared) stack is straightened
    by shifting each slice in-plane, and uneven spacing is resampled onto a regular
    grid at the typical (median) step by linear interpolation along the normal; both
    with a warning.

    Args:
        files: candidate files; anything that is not a CT image is ignored.
        series_uid: SeriesInstanceUID of the series to read, if several are present.

    Returns:
        The volume, its RAS+ affine, a description and warnings.

    Raises:
        InputError: no CT series, the named series is absent, or the chosen series is
            not a volume (too few slices, duplicated positions, large gaps, missing
            geometry, undecodable or non-HU pixels).
    """
    survey = _survey(files)
    series, warnings = _choose_series(survey, series_uid)
    slices = _drop_duplicate_instances(series.slices, warnings)
    slices, offsets = _sort_along_normal(slices)

    volume = _read_pixels(slices, warnings)  # (column, row, slice)
    volume, step_mm = _regularise(volume, slices, offsets, warnings)
    affine = _affine_ras(slices[0], step_mm)

    rows, columns = slices[0].shape
    row_mm, col_mm = slices[0].spacing
    description = (
        f"DICOM CT series, {volume.shape[2]} slices of {columns}x{rows}, "
        f"{col_mm:.2f} x {row_mm:.2f} x {step_mm:.2f} mm"
    )
    return DicomVolume(volume, affine, description, warnings)


# --- survey: which files are CT slices ------------------------------------------------


def _survey(files: Sequence[Path]) -> _Survey:
    """Read every header once and sort the files into series or skip counts."""
    survey = _Survey()
    for path in files:
        ds = _read_header(path)
        kind = _classify(ds)
        if kind != "ct":
            survey.skipped[kind] += 1
            continue
        try:
            slices = _slices_of(path, ds)
        except _NotHounsfield as exc:
            label = f"CT image with values not in HU (Rescale Type '{exc}')"
            survey.skipped[label] += 1
            continue
        except (AttributeError, KeyError, IndexError, TypeError, ValueError):
            survey.skipped["CT image without usable geometry"] += 1
            continue
        for item in slices:
            key = (
                str(ds.get("SeriesInstanceUID", "")),
                tuple(np.round(item.orientation, 3)),
                item.shape,
                tuple(round(v, 4) for v in item.spacing),
            )
            if key not in survey.series:
                survey.series[key] = _Series(
                    uid=key[0],
                    number=str(ds.get("SeriesNumber") or "?"),
                    label=str(ds.get("SeriesDescription", "")).strip()
                    or "no description",
                )
            survey.series[key].slices.append(item)
    return survey


def _read_header(path: Path) -> Dataset | None:
    """Header of a file read as DICOM, or None when it is not one."""
    try:
        return pydicom.dcmread(path, force=True, stop_before_pixels=True)
    except Exception as exc:  # pydicom raises many types on non-DICOM input
        logger.debug("A file is not readable as DICOM (%s)", type(exc).__name__)
        return None


def _classify(ds: Dataset | None) -> str:
    """'ct' for a CT image, else a short plural-ready label of what the file is."""
    if ds is None or len(ds) == 0:
        return "non-DICOM file"
    media_class = getattr(getattr(ds, "file_meta", None), "MediaStorageSOPClassUID", "")
    if media_class == MediaStorageDirectoryStorage or "DirectoryRecordSequence" in ds:
        return "DICOMDIR index file"
    if "Rows" not in ds and "SOPClassUID" not in ds and "Modality" not in ds:
        return "non-DICOM file"
    modality = str(ds.get("Modality", "")).upper()
    sop_class = str(ds.get("SOPClassUID", ""))
    if sop_class and sop_class not in CT_SOP_CLASSES:
        if modality == "CT":
            return "CT secondary capture or other non-volume CT object"
        return f"{modality or 'unknown-modality'} object"
    if not sop_class and modality != "CT":
        return f"{modality or 'unknown-modality'} object"
    image_type = [str(v).upper() for v in ds.get("ImageType", [])]
    if "LOCALIZER" in image_type:
        return "localizer (scout) image"
    if "Rows" not in ds:
        return "CT object without pixel data"
    return "ct"


def _slices_of(path: Path, ds: Dataset) -> list[_Slice]:
    """The 2D images of a CT file with their geometry and rescale (PS3.3 C.11.1)."""
    # Anonymisers sometimes blank the UID; then the file itself is the instance.
    uid = str(ds.get("SOPInstanceUID") or "") or f"file {path}"
    shape = (int(ds.Rows), int(ds.Columns))
    if "PerFrameFunctionalGroupsSequence" not in ds:
        return [
            _Slice(
                path=path,
                frame=None,
                instance_uid=uid,
                position=_floats(ds.ImagePositionPatient, 3),
                orientation=_floats(ds.ImageOrientationPatient, 6),
                spacing=tuple(_floats(ds.PixelSpacing, 2)),
                shape=shape,
                slope=float(ds.get("RescaleSlope", 1.0) or 1.0),
                intercept=float(ds.get("RescaleIntercept", 0.0) or 0.0),
            )
        ]
    _check_rescale_type(ds)

    # Enhanced CT (PS3.3 C.7.6.16): each attribute sits in the per-frame functional
    # group of a frame or, when it is the same for all frames, in the shared one.
    shared = ds.get("SharedFunctionalGroupsSequence", [Dataset()])[0]
    slices = []
    for index, frame in enumerate(ds.PerFrameFunctionalGroupsSequence):
        orientation = _group(frame, shared, "PlaneOrientationSequence")
        measures = _group(frame, shared, "PixelMeasuresSequence")
        transform = _group(frame, shared, "PixelValueTransformationSequence")
        _check_rescale_type(transform)
        slices.append(
            _Slice(
                path=path,
                frame=index,
                instance_uid=uid,
                position=_floats(
                    _group(frame, shared, "PlanePositionSequence").ImagePositionPatient,
                    3,
                ),
                orientation=_floats(orientation.ImageOrientationPatient, 6),
                spacing=tuple(_floats(measures.PixelSpacing, 2)),
                shape=shape,
                slope=float(transform.get("RescaleSlope", 1.0) or 1.0),
                intercept=float(transform.get("RescaleIntercept", 0.0) or 0.0),
            )
        )
    return slices


def _group(frame: Dataset, shared: Dataset, keyword: str) -> Dataset:
    """First item of a functional group macro, per-frame first, then shared."""
    for source in (frame, shared):
        if keyword in source and len(source[keyword].value) > 0:
            return source[keyword].value[0]
    return Dataset()


class _NotHounsfield(Exception):
    """A CT object whose Rescale Type says its values are not HU (e.g. perfusion)."""


def _check_rescale_type(ds: Dataset) -> None:
    """Reject values that the header says are not HU (PS3.3 C.8.15.3.10).

    Rescale Type may be other than HU only for DERIVED images such as perfusion
    maps, whose values are not densities.
    """
    rescale_type = str(ds.get("RescaleType", "HU") or "HU").strip().upper()
    if rescale_type != "HU":
        raise _NotHounsfield(rescale_type[:16])


def _floats(value, count: int) -> np.ndarray:
    """Exactly ``count`` finite floats from a multi-valued DICOM element."""
    numbers = np.array([float(v) for v in value], dtype=float)
    if numbers.shape != (count,) or not np.all(np.isfinite(numbers)):
        raise ValueError(f"expected {count} finite numbers")
    return numbers


# --- choosing the series --------------------------------------------------------------


def _choose_series(
    survey: _Survey, series_uid: str | None
) -> tuple[_Series, list[str]]:
    """Apply the selection rule of :func:`read_ct_series`; warn about the rest."""
    candidates = sorted(survey.series.values(), key=lambda s: -len(s.slices))
    if not candidates:
        raise InputError(_nothing_found_message(survey.skipped))

    if series_uid is not None:
        chosen = [s for s in candidates if s.uid == series_uid]
        if not chosen:
            names = "; ".join(s.name() for s in candidates)
            raise InputError(
                f"series_uid must name one of the {len(candidates)} CT series found "
                f"({names}), not the value given"
            )
        series = chosen[0]
    else:
        axial = [s for s in candidates if s.is_axial]
        series = (axial or candidates)[0]

    warnings = []
    if not series.is_axial:
        warnings.append(
            f"No axial CT series found; using the non-axial {series.name()}."
        )
    others = [s for s in candidates if s is not series]
    if others:
        warnings.append(
            f"Using {series.name()}; also found "
            + "; ".join(s.name() for s in others)
            + ". Pass series_uid to choose another."
        )
    if survey.skipped:
        warnings.append("Skipped " + _count_phrase(survey.skipped) + ".")
    for text in warnings:
        logger.info(text)
    return series, warnings


def _nothing_found_message(skipped: Counter) -> str:
    if not skipped:
        return "input must contain a CT image series, but no files were found"
    return (
        "input must contain an axial CT image series (DICOM CT Image Storage), "
        f"but it holds only {_count_phrase(skipped)}: this is not a CT volume"
    )


def _count_phrase(counter: Counter) -> str:
    """'3 non-DICOM files, 1 localizer (scout) image' from label counts."""
    parts = []
    for label, count in counter.most_common():
        noun, detail = (label.split(" with ", 1) + [""])[:2]
        noun += "s" if count > 1 else ""
        parts.append(f"{count} {noun}" + (f" with {detail}" if detail else ""))
    return ", ".join(parts)


def _drop_duplicate_instances(
    slices: list[_Slice], warnings: list[str]
) -> list[_Slice]:
    """Keep one copy of each SOP instance (and frame); the same file sent twice."""
    unique = {(s.instance_uid, s.frame): s for s in slices}
    if len(unique) < len(slices):
        warnings.append(
            f"Ignored {len(slices) - len(unique)} duplicate copies of the same images."
        )
    return list(unique.values())


# --- geometry -------------------------------------------------------------------------


def _sort_along_normal(slices: list[_Slice]) -> tuple[list[_Slice], np.ndarray]:
    """Order slices by position along the normal; offsets are relative to the first.

    Returns:
        The sorted slices and their offsets from the first slice, shape (n, 3) as
        (along row cosine in column pixels, along column cosine in row pixels,
        along the normal in mm).
    """
    if len(slices) < MIN_SLICES:
        raise InputError(
            f"a CT series must have at least {MIN_SLICES} slices to make a volume, "
            f"not {len(slices)}; upload the whole series, not a single image"
        )
    iop = slices[0].orientation
    row_cos, col_cos = iop[:3], iop[3:]
    if not _is_orthonormal(row_cos, col_cos):
        raise InputError(
            "ImageOrientationPatient must hold two perpendicular unit vectors, "
            f"not {np.round(iop, 4).tolist()}"
        )
    normal = np.cross(row_cos, col_cos)
    slices = sorted(slices, key=lambda s: float(s.position @ normal))

    delta = np.array([s.position - slices[0].position for s in slices])
    row_mm, col_mm = slices[0].spacing
    offsets = np.stack(
        [delta @ row_cos / col_mm, delta @ col_cos / row_mm, delta @ normal], axis=1
    )

    steps = np.diff(offsets[:, 2])
    if np.any(steps < SAME_POSITION_MM):
        shared = int(np.sum(steps < SAME_POSITION_MM)) + 1
        raise InputError(
            "slices of a CT series must lie at distinct positions, but "
            f"{shared} of {len(slices)} slices share a position: this is not a volume "
            "(several acquisitions or phases mixed in one series?)"
        )
    return slices, offsets


def _is_orthonormal(row_cos: np.ndarray, col_cos: np.ndarray) -> bool:
    return (
        abs(np.linalg.norm(row_cos) - 1.0) < 0.01
        and abs(np.linalg.norm(col_cos) - 1.0) < 0.01
        and abs(float(row_cos @ col_cos)) < 0.01
    )


def _regularise(
    volume: np.ndarray, slices: list[_Slice], offsets: np.ndarray, warnings: list[str]
) -> tuple[np.ndarray, float]:
    """Straighten a tilted stack and resample uneven spacing onto a regular grid.

    Args:
        volume: (column, row, slice) HU, slices in the order of ``offsets``.
        slices: the sorted slices.
        offsets: from :func:`_sort_along_normal`.
        warnings: appended to.

    Returns:
        The volume on a regular orthogonal grid and its slice step, mm.
    """
    along = offsets[:, 2]
    steps = np.diff(along)
    step_mm = float(np.median(steps))

    drift_px = float(np.max(np.hypot(offsets[:, 0], offsets[:, 1])))
    if drift_px > SHEAR_TOLERANCE_PX:
        volume = _straighten(volume, offsets[:, :2])
        in_plane_mm = np.hypot(
            offsets[-1, 0] * slices[0].spacing[1], offsets[-1, 1] * slices[0].spacing[0]
        )
        tilt_deg = math.degrees(math.atan2(in_plane_mm, along[-1]))
        warnings.append(
            f"The slices are tilted by {tilt_deg:.1f} degrees against the slice stack "
            "(gantry tilt); each slice was shifted in-plane to give a straight volume."
        )

    tolerance = max(SPACING_TOLERANCE * step_mm, SPACING_TOLERANCE_MM)
    if np.ptp(steps) <= tolerance:
        return volume, float(along[-1] / (len(along) - 1))

    largest = float(steps.max())
    if largest > GAP_REFUSAL_FACTOR * step_mm:
        raise InputError(
            f"slice spacing must be regular enough to fill, but a gap of {largest:.1f} "
            f"mm lies in a series whose slices are typically {step_mm:.2f} mm apart: "
            "slices are missing"
        )
    if largest > GAP_WARNING_FACTOR * step_mm:
        warnings.append(
            f"Gap of up to {largest:.2f} mm between slices that are typically "
            f"{step_mm:.2f} mm apart: slices may be missing; the gap was filled by "
            "interpolation."
        )
    count = int(round(along[-1] / step_mm)) + 1
    step_mm = float(along[-1] / (count - 1))
    warnings.append(
        f"Slice spacing is uneven ({steps.min():.2f} to {largest:.2f} mm); the series "
        f"was resampled onto a regular {step_mm:.2f} mm grid by linear interpolation."
    )
    return _resample_along_normal(volume, along, count, step_mm), step_mm


def _straighten(volume: np.ndarray, shifts_px: np.ndarray) -> np.ndarray:
    """Shift each slice in-plane so that all share the first slice's origin."""
    out = np.empty_like(volume)
    for k in range(volume.shape[2]):
        out[:, :, k] = ndimage.shift(
            volume[:, :, k], shifts_px[k], order=1, mode="constant", cval=AIR_HU
        )
    return out


def _resample_along_normal(
    volume: np.ndarray, along_mm: np.ndarray, count: int, step_mm: float
) -> np.ndarray:
    """Linear interpolation along axis 2 from positions ``along_mm`` to a grid."""
    targets = np.arange(count) * step_mm
    upper = np.searchsorted(along_mm, targets, side="right")
    upper = np.clip(upper, 1, len(along_mm) - 1)
    lower = upper - 1
    weight = (targets - along_mm[lower]) / (along_mm[upper] - along_mm[lower])
    weight = np.clip(weight, 0.0, 1.0).astype(np.float32)
    return volume[:, :, lower] * (1 - weight) + volume[:, :, upper] * weight


def _affine_ras(first: _Slice, step_mm: float) -> np.ndarray:
    """Voxel (column, row, slice) -> RAS+ mm for a straight regular stack."""
    iop = first.orientation
    row_cos, col_cos = iop[:3], iop[3:]
    row_mm, col_mm = first.spacing
    affine_lps = np.eye(4)
    affine_lps[:3, 0] = row_cos * col_mm
    affine_lps[:3, 1] = col_cos * row_mm
    affine_lps[:3, 2] = np.cross(row_cos, col_cos) * step_mm
    affine_lps[:3, 3] = first.position
    return np.diag([-1.0, -1.0, 1.0, 1.0]) @ affine_lps  # LPS -> RAS


# --- pixels ---------------------------------------------------------------------------


def _read_pixels(slices: list[_Slice], warnings: list[str]) -> np.ndarray:
    """Decode, rescale to HU and stack; axes (column, row, slice), float32."""
    rows, columns = slices[0].shape
    volume = np.empty((columns, rows, len(slices)), dtype=np.float32)
    cache: dict[Path, tuple[np.ndarray, tuple[int, int] | None]] = {}
    notes: set[str] = set()
    for k, item in enumerate(slices):
        if item.path not in cache:
            cache.clear()  # a file's frames are adjacent in practice; keep memory low
            cache[item.path] = _stored_values(item.path, notes)
        stored, padding = cache[item.path]
        frame = stored if item.frame is None else stored[item.frame]
        if frame.shape != (rows, columns):
            raise InputError(
                f"every slice must be {columns}x{rows} pixels, not "
                f"{frame.shape[1]}x{frame.shape[0]}"
            )
        # Modality LUT, PS3.3 C.11.1.1.2: HU = stored * slope + intercept. It applies
        # to stored values whatever the Photometric Interpretation, so MONOCHROME1
        # needs no inversion here (that only concerns display).
        hu = frame.astype(np.float32) * item.slope + item.intercept
        if padding is not None:
            hu[(frame >= padding[0]) & (frame <= padding[1])] = AIR_HU
        volume[:, :, k] = hu.T  # (row, column) -> (column, row)
    warnings.extend(sorted(notes))
    return volume


def _stored_values(
    path: Path, notes: set[str]
) -> tuple[np.ndarray, tuple[int, int] | None]:
    """Stored values of a file and its padding range.

    Returns:
        Stored values, (rows, columns) or (frames, rows, columns), and the range of
        stored values that marks padding, or None.
    """
    ds = None
    try:
        ds = pydicom.dcmread(path, force=True)
        if "PixelData" not in ds:
            raise InputError("a CT slice must contain pixel data, but one has none")
        photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2"))
        if not photometric.startswith("MONOCHROME"):
            raise InputError(
                f"CT slices must be greyscale (MONOCHROME1/2), not {photometric}"
            )
        signed_j2k = _j2k_signed_mismatch(ds)
        if signed_j2k:
            ds.pixel_array_options(apply_j2k_sign_correction=False)
        stored = ds.pixel_array
    except InputError:
        raise
    except Exception as exc:  # decoders raise many types; their text may hold paths
        syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
        name = getattr(syntax, "name", "an undeclared transfer syntax")
        logger.warning("Pixel decoding failed (%s)", type(exc).__name__)
        raise InputError(
            f"CT pixel data must be decodable, but a slice encoded with {name} "
            "could not be decoded"
        ) from None

    if signed_j2k:
        # The codestream says signed, PixelRepresentation says unsigned; the
        # codestream is what the encoder actually wrote, so it wins.
        stored = stored.view(stored.dtype.str.replace("u", "i"))
        notes.add(
            "JPEG 2000 data is signed although the header says unsigned; "
            "read as signed."
        )
    return stored, _padding_range(ds)


def _j2k_signed_mismatch(ds: Dataset) -> bool:
    """True when a JPEG 2000 codestream is signed but PixelRepresentation is 0."""
    syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    if syntax not in JPEG2000TransferSyntaxes or ds.get("PixelRepresentation", 0) != 0:
        return False
    first = next(generate_frames(ds.PixelData, number_of_frames=1))
    return bool(get_j2k_parameters(first).get("is_signed", False))


def _padding_range(ds: Dataset) -> tuple[int, int] | None:
    """Stored-value range marked as padding (PS3.3 C.7.5.1.1.2), or None."""
    if "PixelPaddingValue" not in ds:
        return None
    signed = ds.get("PixelRepresentation", 0) == 1
    bits = int(ds.get("BitsAllocated", 16))

    def as_stored(value) -> int:
        value = int(value)
        if signed and value >= 2 ** (bits - 1):
            value -= 2**bits  # read as US although the data are signed
        return value

    low = as_stored(ds.PixelPaddingValue)
    high = as_stored(ds.get("PixelPaddingRangeLimit", low))
    return min(low, high), max(low, high)
