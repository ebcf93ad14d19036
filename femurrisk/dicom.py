"""Read one CT series out of a pile of DICOM files and turn it into a volume.

Array axes of the volume built here are (column, row, slice): index ``c`` moves along
the row direction cosine ``IOP[0:3]`` by ``PixelSpacing[1]``, index ``r`` along the
column direction cosine ``IOP[3:6]`` by ``PixelSpacing[0]`` (DICOM PS3.3 C.7.6.2.1.1),
and index ``s`` along the slice normal, cranial or caudal as the positions run. With
that order the affine is simply [row cosine, column cosine, normal] times spacing.

Compressed pixel data are decoded in a separate worker process with a time limit
(:class:`_IsolatedDecoder`), so a decoder that crashes or hangs on a corrupt frame
ends in an :class:`InputError` instead of taking the application down; uncompressed
and deflated data are read in-process.

Nothing here ever puts a file name or a patient attribute into a message or a log
line; series are named by SeriesNumber and SeriesDescription only.
"""

from __future__ import annotations

import io
import logging
import math
import os
import pickle
import select
import struct
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import generate_frames
from pydicom.pixels import get_decoder
from pydicom.pixels.utils import get_j2k_parameters
from pydicom.uid import (
    UID,
    CTImageStorage,
    EnhancedCTImageStorage,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000TransferSyntaxes,
    LegacyConvertedEnhancedCTImageStorage,
    MediaStorageDirectoryStorage,
)
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

#: Longest time one compressed file may take to decode in the worker process, s.
DECODE_TIMEOUT_S = 60.0

#: Address-space limit of the decoder worker, bytes: a corrupt header that asks a
#: decoder for an absurd buffer fails there instead of exhausting the machine.
DECODER_MEMORY_BYTES = 8 * 1024**3

#: How many leading bytes are searched for the first element of a DICOM file that
#: has neither preamble nor file-meta header (some exporters prepend stray bytes).
STRAY_BYTES_SEARCHED = 256

#: A series whose slices are this far apart or less counts as thin, mm.
THIN_SLICE_MM = 3.0

#: An axial series covering less than this fraction of the longest axial series'
#: extent counts as incomplete coverage when choosing a series.
MIN_COVERAGE_FRACTION = 0.8

#: ImageType values (PS3.3 C.7.6.1.1.2, C.8.16.1) of images that are not slices of
#: a reconstructed volume: projections, renderings, curved reformats.
PROJECTION_TYPES = frozenset(
    {"MIP", "MINIP", "MINIMUM", "MAXIMUM", "PROJECTION IMAGE", "VOLUME RENDERING",
     "VR", "SSD", "CURVED", "CPR", "SURFACE"}
)

#: ImageType values of planar reformats (multiplanar reconstructions).
REFORMAT_TYPES = frozenset({"MPR", "REFORMATTED", "MULTIPLANAR"})

#: Words in ConvolutionKernel or SeriesDescription. Bone and standard (or unnamed)
#: kernels are preferred; a series named with one of ``OTHER_KERNEL_WORDS`` (lung,
#: smooth soft-tissue, brain) only when nothing else fits; bone breaks ties.
BONE_KERNEL_WORDS = ("BONE", "OSTEO", "KNOCHEN", "SKELET")
OTHER_KERNEL_WORDS = ("LUNG", "PULMO", "SOFT", "BRAIN", "MEDIASTIN")


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
    thickness_mm: float | None = None
    lead: int = 0  # stray bytes before the first element (file without preamble)
    syntax: str | None = None  # declared TransferSyntaxUID, None when undeclared


@dataclass
class _Series:
    """Slices that share a SeriesInstanceUID, orientation, matrix and pixel size."""

    uid: str
    number: str
    label: str
    kernel: str = ""
    reformat: bool = False
    slices: list[_Slice] = field(default_factory=list)

    @property
    def normal(self) -> np.ndarray:
        iop = self.slices[0].orientation
        return np.cross(iop[:3], iop[3:])

    @property
    def is_axial(self) -> bool:
        return abs(self.normal[2]) >= AXIAL_MIN_COSINE

    def along_mm(self) -> np.ndarray:
        """Sorted slice positions projected on the normal, mm."""
        return np.sort([float(s.position @ self.normal) for s in self.slices])

    def name(self) -> str:
        """Series number and description, for messages (never an identifier)."""
        plane = "axial" if self.is_axial else "non-axial"
        kind = " reformatted" if self.reformat else ""
        count = len(self.slices)
        return f"series {self.number} '{self.label}' ({count} {plane}{kind} images)"


@dataclass
class _Survey:
    """What the files turned out to be."""

    series: dict[tuple, _Series] = field(default_factory=dict)
    skipped: Counter = field(default_factory=Counter)
    repaired: int = 0  # files read past stray leading bytes


# --- public entry point ---------------------------------------------------------------


def read_ct_series(files: Sequence[Path], series_uid: str | None = None) -> DicomVolume:
    """Read the CT series among ``files`` into a volume in Hounsfield units.

    Files that are not CT slices are skipped: DICOMDIR and other index files,
    non-DICOM files, localizers (ImageType LOCALIZER), secondary captures and other
    SOP classes, other modalities, projections and curved reformats (MIP, volume
    rendering, CPR), and non-axial planar reformats (MPR). The remaining slices are
    grouped by SeriesInstanceUID, orientation, matrix and pixel size.

    Selection rule, the series a radiologist would open to look at bone: the group
    named by ``series_uid`` if given; otherwise among the axial groups (slice normal
    within 45 degrees of the body axis), ranked in this order, original before
    reformatted images; complete (at least two slices, no gap beyond 1.5 typical
    steps, no shared position) before incomplete; covering at least 80 % of the
    longest axial extent; a bone, standard or unnamed kernel before a lung, soft or
    brain kernel (words in ConvolutionKernel or SeriesDescription); thin (step at
    most 3 mm) before thick; bone kernel before standard; then the most slices. A
    non-axial original series is used only when nothing axial exists, with a
    warning. The others are listed in the warnings.

    Slices are ordered by ImagePositionPatient projected on the slice normal and the
    slice spacing is taken from those positions, never from file names,
    InstanceNumber or SliceThickness. Copies of the same slice (same position, same
    pixels) are dropped with a warning; different images at one position are
    refused. A gantry-tilted (sheared) stack is straightened by shifting each slice
    in-plane, and uneven spacing is resampled onto a regular grid at the typical
    (median) step by linear interpolation along the normal; both with a warning.

    Args:
        files: candidate files; anything that is not a CT image is ignored.
        series_uid: SeriesInstanceUID of the series to read, if several are present.

    Returns:
        The volume, its RAS+ affine, a description and warnings.

    Raises:
        InputError: no CT series, the named series is absent, or the chosen series is
            not a volume (too few slices, different images at one position, large
            gaps, missing geometry, undecodable, unsupported or non-HU pixels).
    """
    survey = _survey(files)
    series, warnings = _choose_series(survey, series_uid)
    slices = _drop_duplicate_instances(series.slices, warnings)
    slices, offsets = _sort_along_normal(slices)

    volume = _read_pixels(slices, warnings)  # (column, row, slice)
    volume, slices, offsets = _drop_repeated_positions(
        volume, slices, offsets, warnings
    )
    volume, step_mm = _regularise(volume, slices, offsets, warnings)
    _note_overlap(slices, step_mm, warnings)
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
        ds, lead = _read_header(path)
        kind = _classify(ds)
        if kind != "ct":
            survey.skipped[kind] += 1
            continue
        survey.repaired += bool(lead)
        try:
            slices = _slices_of(path, ds, lead)
        except _NotHounsfield as exc:
            label = f"CT image with values not in HU (Rescale Type '{exc}')"
            survey.skipped[label] += 1
            continue
        except (AttributeError, KeyError, IndexError, TypeError, ValueError):
            survey.skipped["CT image without usable geometry"] += 1
            continue
        image_type = {str(v).strip().upper() for v in ds.get("ImageType", [])}
        reformat = bool(image_type & REFORMAT_TYPES)
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
                    kernel=_text(ds.get("ConvolutionKernel", "")),
                    reformat=reformat,
                )
            survey.series[key].slices.append(item)

    # Planar reformats in another plane are views of a volume, not the volume.
    for key, series in list(survey.series.items()):
        if series.reformat and not series.is_axial:
            survey.skipped["non-axial reformatted (MPR) image"] += len(series.slices)
            del survey.series[key]
    return survey


def _text(value) -> str:
    """A DICOM string or multi-valued string as one upper-case string."""
    if isinstance(value, str):
        return value.upper()
    try:
        return " ".join(str(v) for v in value).upper()
    except TypeError:
        return str(value).upper()


def _read_header(path: Path) -> tuple[Dataset | None, int]:
    """Header of a file read as DICOM and its count of stray leading bytes.

    Returns:
        The dataset, or None when the file is not DICOM, and how many bytes before
        the first element were skipped (0 for a well-formed file).
    """
    ds = _dcmread(path, 0, stop_before_pixels=True)
    if ds is not None and _looks_like_image(ds):
        return ds, 0
    lead = _stray_lead(path)
    if lead:
        repaired = _dcmread(path, lead, stop_before_pixels=True)
        if repaired is not None and _looks_like_image(repaired):
            logger.info("A file had %d stray byte(s) before its first element", lead)
            return repaired, lead
    return ds, 0


def _looks_like_image(ds: Dataset) -> bool:
    return any(key in ds for key in ("Rows", "SOPClassUID", "Modality"))


def _dcmread(path: Path, lead: int, **options) -> Dataset | None:
    """pydicom's forced read from byte ``lead`` on, or None if it fails."""
    try:
        if lead == 0:
            return pydicom.dcmread(path, force=True, **options)
        with open(path, "rb") as handle:
            handle.seek(lead)
            return pydicom.dcmread(io.BytesIO(handle.read()), force=True, **options)
    except Exception as exc:  # pydicom raises many types on non-DICOM input
        logger.debug("A file is not readable as DICOM (%s)", type(exc).__name__)
        return None


def _stray_lead(path: Path) -> int:
    """Offset of a plausible first element (group 0008) within the first bytes.

    A file without preamble and file-meta header starts directly with its dataset,
    normally with group 0008. Some exporters put a stray byte or two in front; then
    the first offset at which a group-0008 tag is followed by an explicit VR, or by
    an implicit-VR length that fits in the file, is returned. 0 when none is found.
    """
    try:
        with open(path, "rb") as handle:
            head = handle.read(STRAY_BYTES_SEARCHED + 8)
            size = os.fstat(handle.fileno()).st_size
    except OSError:
        return 0
    if len(head) > 132 and head[128:132] == b"DICM":
        return 0
    for lead in range(1, min(STRAY_BYTES_SEARCHED, len(head) - 8)):
        if head[lead : lead + 2] != b"\x08\x00":
            continue
        vr = head[lead + 4 : lead + 6]
        if vr.isalpha() and vr.isupper():
            return lead
        (length,) = struct.unpack("<I", head[lead + 4 : lead + 8])
        if length < 256 and lead + 8 + length <= size:
            return lead
    return 0


def _classify(ds: Dataset | None) -> str:
    """'ct' for a CT image, else a short plural-ready label of what the file is."""
    if ds is None or len(ds) == 0:
        return "non-DICOM file"
    media_class = getattr(getattr(ds, "file_meta", None), "MediaStorageSOPClassUID", "")
    if media_class == MediaStorageDirectoryStorage or "DirectoryRecordSequence" in ds:
        return "DICOMDIR index file"
    if not _looks_like_image(ds):
        return "non-DICOM file"
    modality = str(ds.get("Modality", "")).upper()
    sop_class = str(ds.get("SOPClassUID", ""))
    if sop_class and sop_class not in CT_SOP_CLASSES:
        if modality == "CT":
            return "CT secondary capture or other non-volume CT object"
        return f"{modality or 'unknown-modality'} object"
    if not sop_class and modality != "CT":
        return f"{modality or 'unknown-modality'} object"
    image_type = {str(v).strip().upper() for v in ds.get("ImageType", [])}
    if "LOCALIZER" in image_type:
        return "localizer (scout) image"
    if image_type & PROJECTION_TYPES:
        return "MIP, rendering or curved-reformat image"
    if "Rows" not in ds:
        return "CT object without pixel data"
    return "ct"


def _slices_of(path: Path, ds: Dataset, lead: int = 0) -> list[_Slice]:
    """The 2D images of a CT file with their geometry and rescale (PS3.3 C.11.1).

    Raises:
        ValueError, AttributeError, ...: geometry or rescale missing or not finite.
    """
    # Anonymisers sometimes blank the UID; then the file itself is the instance.
    uid = str(ds.get("SOPInstanceUID") or "") or f"file {path}"
    shape = (int(ds.Rows), int(ds.Columns))
    if min(shape) < 1:
        raise ValueError("empty matrix")
    syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    common = dict(
        path=path,
        instance_uid=uid,
        shape=shape,
        thickness_mm=_thickness(ds),
        lead=lead,
        syntax=str(syntax) if syntax else None,
    )
    if "PerFrameFunctionalGroupsSequence" not in ds:
        return [
            _Slice(
                frame=None,
                position=_floats(ds.ImagePositionPatient, 3),
                orientation=_floats(ds.ImageOrientationPatient, 6),
                spacing=_spacing(ds.PixelSpacing),
                **_rescale(ds),
                **common,
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
                frame=index,
                position=_floats(
                    _group(frame, shared, "PlanePositionSequence").ImagePositionPatient,
                    3,
                ),
                orientation=_floats(orientation.ImageOrientationPatient, 6),
                spacing=_spacing(measures.PixelSpacing),
                **_rescale(transform),
                **common,
            )
        )
    return slices


def _rescale(ds: Dataset) -> dict[str, float]:
    """Finite RescaleSlope and RescaleIntercept (PS3.3 C.11.1.1.2), else ValueError.

    Missing values mean the identity; a slope of 0 or a non-finite value cannot
    give Hounsfield units.
    """
    slope, intercept = ds.get("RescaleSlope"), ds.get("RescaleIntercept")
    slope = 1.0 if slope is None or slope == "" else float(slope)
    intercept = 0.0 if intercept is None or intercept == "" else float(intercept)
    if not (math.isfinite(slope) and math.isfinite(intercept)) or slope == 0:
        raise ValueError("rescale slope must be finite and non-zero")
    return {"slope": slope, "intercept": intercept}


def _spacing(value) -> tuple[float, float]:
    """PixelSpacing as two positive finite numbers, else ValueError."""
    spacing = _floats(value, 2)
    if np.any(spacing <= 0):
        raise ValueError("pixel spacing must be positive")
    return float(spacing[0]), float(spacing[1])


def _thickness(ds: Dataset) -> float | None:
    """SliceThickness in mm when present and sensible; only used for a warning."""
    try:
        value = float(ds.get("SliceThickness"))
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) and value > 0 else None


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
        pool = axial or [s for s in candidates if not s.reformat] or candidates
        longest = max(_extent_mm(s) for s in pool)
        series = min(pool, key=lambda s: _rank(s, longest))

    warnings = []
    if not series.is_axial:
        warnings.append(
            f"No axial CT series found; using the non-axial {series.name()}."
        )
    if series.reformat:
        warnings.append(
            f"Using reformatted images ({series.name()}); no original axial series "
            "was found."
        )
    parts = [s for s in candidates if s is not series and s.uid == series.uid]
    if parts:
        warnings.append(
            f"{sum(len(s.slices) for s in parts)} image(s) of the chosen series differ "
            "in orientation, matrix or pixel size from the rest and were left out."
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
    if survey.repaired:
        warnings.append(
            f"{survey.repaired} file(s) had stray bytes before the DICOM header and "
            "were read from the first element on."
        )
    for text in warnings:
        logger.info(text)
    return series, warnings


def _unique_along_mm(series: _Series) -> np.ndarray:
    """Sorted positions on the normal, each SOP instance (and frame) once."""
    unique = {(s.instance_uid, s.frame): s for s in series.slices}
    normal = series.normal
    return np.sort([float(s.position @ normal) for s in unique.values()])


def _extent_mm(series: _Series) -> float:
    along = _unique_along_mm(series)
    return float(along[-1] - along[0])


def _rank(series: _Series, longest_mm: float) -> tuple:
    """Sort key of the selection rule; smaller is better."""
    along = _unique_along_mm(series)
    steps = np.diff(along)
    complete = len(along) >= MIN_SLICES and bool(
        np.all(steps >= SAME_POSITION_MM)
        and steps.max() <= GAP_WARNING_FACTOR * np.median(steps)
    )
    covers = along[-1] - along[0] >= MIN_COVERAGE_FRACTION * longest_mm
    words = f"{series.kernel} {series.label}".upper()
    bone = any(word in words for word in BONE_KERNEL_WORDS)
    other = not bone and any(word in words for word in OTHER_KERNEL_WORDS)
    thin = len(steps) > 0 and float(np.median(steps)) <= THIN_SLICE_MM
    return (
        series.reformat, not complete, not covers, other, not thin, not bone,
        -len(along),
    )


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
    return slices, offsets


def _drop_repeated_positions(
    volume: np.ndarray, slices: list[_Slice], offsets: np.ndarray, warnings: list[str]
) -> tuple[np.ndarray, list[_Slice], np.ndarray]:
    """Drop extra copies of a slice at one position; refuse different images there.

    Exporters sometimes write the same image twice under two SOP instance UIDs;
    those copies carry no information and are dropped. Different images at one
    position (several phases or acquisitions in one series) cannot make one volume.

    Raises:
        InputError: different images share a position, or too few slices remain.
    """
    steps = np.diff(offsets[:, 2])
    repeated = np.flatnonzero(steps < SAME_POSITION_MM) + 1  # index of each repeat
    if len(repeated) == 0:
        return volume, slices, offsets
    differing = 0
    for k in repeated:
        first = k - 1
        while first in repeated:  # compare with the first image at this position
            first -= 1
        if np.max(np.abs(volume[:, :, k] - volume[:, :, first])) > 1.0:
            differing += 1
    keep = np.setdiff1d(np.arange(len(slices)), repeated)
    shared = len(set(repeated.tolist()) | set((repeated - 1).tolist()))
    if differing:
        raise InputError(
            "slices of a CT series must lie at distinct positions, but "
            f"{shared} of {len(slices)} slices share a position and show different "
            "images: this is not a volume (several acquisitions or phases mixed in "
            "one series?)"
        )
    if len(keep) < MIN_SLICES:
        raise InputError(
            f"a CT series must have at least {MIN_SLICES} slice positions to make a "
            f"volume, but all {len(slices)} slices lie at {len(keep)} position"
        )
    warnings.append(
        f"Dropped {len(repeated)} repeated copies of slices at positions already "
        "present (identical images)."
    )
    return volume[:, :, keep], [slices[k] for k in keep], offsets[keep]


def _note_overlap(slices: list[_Slice], step_mm: float, warnings: list[str]) -> None:
    """Warn when slices are thicker than their spacing (overlapping reconstruction)."""
    thickness = [s.thickness_mm for s in slices if s.thickness_mm is not None]
    if not thickness:
        return
    typical = float(np.median(thickness))
    if 1.05 * step_mm < typical <= 10 * step_mm:  # beyond that the tag is wrong
        warnings.append(
            f"Slices are {typical:.2f} mm thick but {step_mm:.2f} mm apart "
            "(overlapping reconstruction); voxels are spaced by position, detail "
            f"along the body axis is that of {typical:.2f} mm slices."
        )


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
    from scipy import ndimage  # imported here: the decoder worker never needs it

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
    """Decode, rescale to HU and stack; axes (column, row, slice), float32.

    Compressed (encapsulated) files go through one worker process for the whole
    series; uncompressed and deflated files are read here.
    """
    rows, columns = slices[0].shape
    volume = np.empty((columns, rows, len(slices)), dtype=np.float32)
    cache: dict[Path, tuple[np.ndarray, tuple[int, int] | None, list[str]]] = {}
    notes: set[str] = set()
    decoder = _IsolatedDecoder()
    try:
        for k, item in enumerate(slices):
            if item.path not in cache:
                cache.clear()  # a file's frames are adjacent in practice
                if _is_compressed(item.syntax):
                    cache[item.path] = decoder.decode(item.path, item.lead, item.syntax)
                else:
                    cache[item.path] = _decode_here(item.path, item.lead, item.syntax)
            stored, padding, file_notes = cache[item.path]
            notes.update(file_notes)
            frame = stored if item.frame is None else stored[item.frame]
            if frame.shape != (rows, columns):
                raise InputError(
                    f"every slice must be {columns}x{rows} pixels, not "
                    f"{'x'.join(str(n) for n in frame.shape[::-1])}"
                )
            # Modality LUT, PS3.3 C.11.1.1.2: HU = stored * slope + intercept, per
            # slice. It applies to stored values whatever the Photometric
            # Interpretation, so MONOCHROME1 needs no inversion here (that only
            # concerns display).
            hu = frame.astype(np.float32) * item.slope + item.intercept
            if padding is not None:
                hu[(frame >= padding[0]) & (frame <= padding[1])] = AIR_HU
            volume[:, :, k] = hu.T  # (row, column) -> (column, row)
    finally:
        decoder.close()
    warnings.extend(sorted(notes))
    return volume


def _is_compressed(syntax: str | None) -> bool:
    """True for encapsulated transfer syntaxes; refuses those nothing can decode.

    Raises:
        InputError: an unknown transfer syntax, or one with no installed decoder.
    """
    if syntax is None:
        return False
    uid = UID(syntax)
    if not uid.is_transfer_syntax:
        raise InputError(
            "CT pixel data must use a standard DICOM transfer syntax, but a slice "
            "declares an unknown or private one"
        )
    if not uid.is_encapsulated:
        return False
    try:
        available = get_decoder(uid).is_available
    except NotImplementedError:
        available = False
    if not available:
        raise InputError(
            "CT pixel data must be compressed in a supported format (uncompressed, "
            "JPEG, JPEG-LS, JPEG 2000, RLE or deflate), but the series uses "
            f"{uid.name}, for which no decoder is installed; export it uncompressed"
        )
    return True


def _syntax_name(syntax: str | None) -> str:
    return UID(syntax).name if syntax else "an undeclared transfer syntax"


def _decode_here(
    path: Path, lead: int, syntax: str | None
) -> tuple[np.ndarray, tuple[int, int] | None, list[str]]:
    """:func:`_decode_file` in this process, every failure as an InputError."""
    try:
        return _decode_file(path, lead)
    except InputError:
        raise
    except Exception as exc:  # decoders raise many types; their text may hold paths
        logger.warning("Pixel decoding failed (%s)", type(exc).__name__)
        raise InputError(_undecodable_message(syntax)) from None


def _undecodable_message(syntax: str | None, why: str = "could not be decoded") -> str:
    return (
        f"CT pixel data must be decodable, but a slice encoded with "
        f"{_syntax_name(syntax)} {why}: the file is damaged or truncated"
    )


def _decode_file(
    path: Path, lead: int = 0
) -> tuple[np.ndarray, tuple[int, int] | None, list[str]]:
    """Stored values of a file, its padding range and notes for the user.

    Returns:
        Stored values, (rows, columns) or (frames, rows, columns); the range of
        stored values that marks padding, or None; notes such as a signedness fix.

    Raises:
        InputError: no pixel data, not greyscale. Anything else a decoder raises is
            passed on for the caller to translate.
    """
    if lead:  # pydicom rewinds to byte 0 when it finds no preamble: give it a copy
        with open(path, "rb") as handle:
            handle.seek(lead)
            ds = pydicom.dcmread(io.BytesIO(handle.read()), force=True)
    else:
        ds = pydicom.dcmread(path, force=True)
    _declare_syntax(ds)
    if "PixelData" not in ds:
        raise InputError("a CT slice must contain pixel data, but one has none")
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).strip()
    samples = int(ds.get("SamplesPerPixel", 1) or 1)
    if not photometric.startswith("MONOCHROME") or samples != 1:
        raise InputError(
            f"CT slices must be greyscale (MONOCHROME1/2), not {photometric[:16]}"
        )
    notes = []
    signed_j2k = _j2k_signed_mismatch(ds)
    if signed_j2k:
        ds.pixel_array_options(apply_j2k_sign_correction=False)
    stored = ds.pixel_array
    if signed_j2k:
        # The codestream says signed, PixelRepresentation says unsigned; the
        # codestream is what the encoder actually wrote, so it wins.
        stored = stored.view(stored.dtype.str.replace("u", "i"))
        notes.append(
            "JPEG 2000 data is signed although the header says unsigned; "
            "read as signed."
        )
    if not np.issubdtype(stored.dtype, np.integer) and not np.issubdtype(
        stored.dtype, np.floating
    ):
        raise InputError(f"CT pixel data must be numbers, not {stored.dtype}")
    return stored, _padding_range(ds), notes


def _declare_syntax(ds: Dataset) -> None:
    """Give a dataset read without file meta the transfer syntax it was read with."""
    meta = getattr(ds, "file_meta", None)
    if meta is not None and "TransferSyntaxUID" in meta:
        return
    implicit, little = ds.original_encoding
    if implicit is None:
        implicit, little = True, True
    if implicit:
        syntax = ImplicitVRLittleEndian
    else:
        syntax = ExplicitVRLittleEndian if little else ExplicitVRBigEndian
    ds.file_meta = meta if meta is not None else FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = syntax


# --- decoding in a worker process -----------------------------------------------------


class _DecoderFailed(Exception):
    """The worker process died or ran past its time."""


class _IsolatedDecoder:
    """Decodes compressed files in a worker process, one file at a time.

    The worker is started on first use and serves every compressed file of a series;
    a crash (e.g. a segmentation fault inside a codec), a hang past
    :data:`DECODE_TIMEOUT_S` or an exception all end in an :class:`InputError` here,
    and the worker is killed. Requests and replies are pickles framed by an 8-byte
    length on the worker's stdin and stdout; its stderr is discarded because codec
    messages may quote file names.
    """

    def __init__(self) -> None:
        self._process: subprocess.Popen | None = None

    def decode(
        self, path: Path, lead: int, syntax: str | None
    ) -> tuple[np.ndarray, tuple[int, int] | None, list[str]]:
        """Decode one file in the worker.

        Raises:
            InputError: the file could not be decoded, the decoder crashed, or it
                took longer than :data:`DECODE_TIMEOUT_S`.
        """
        try:
            if self._process is None:
                self._process = _start_worker()
            request = pickle.dumps((str(path), lead))
            self._process.stdin.write(struct.pack("<Q", len(request)) + request)
            self._process.stdin.flush()
            deadline = time.monotonic() + DECODE_TIMEOUT_S
            (size,) = struct.unpack("<Q", self._receive(8, deadline))
            reply = pickle.loads(self._receive(size, deadline))
        except _DecoderFailed as exc:
            self.close(kill=True)
            logger.warning("Decoder worker failed: %s", exc)
            raise InputError(_undecodable_message(syntax, str(exc))) from None
        except (OSError, EOFError, pickle.UnpicklingError, struct.error):
            self.close(kill=True)
            logger.warning("Decoder worker stopped unexpectedly")
            raise InputError(
                _undecodable_message(syntax, "stopped the decoder")
            ) from None

        status, *payload = reply
        if status == "ok":
            return payload[0], payload[1], payload[2]
        if status == "input":
            raise InputError(payload[0])
        logger.warning("Pixel decoding failed in the worker (%s)", payload[0])
        raise InputError(_undecodable_message(syntax))

    def _receive(self, count: int, deadline: float) -> bytes:
        """Exactly ``count`` bytes from the worker, or :class:`_DecoderFailed`."""
        fd = self._process.stdout.fileno()
        chunks, remaining = [], count
        while remaining:
            wait = deadline - time.monotonic()
            ready = select.select([fd], [], [], max(wait, 0.0))[0] if wait > 0 else []
            if not ready:
                raise _DecoderFailed(
                    f"did not finish within {DECODE_TIMEOUT_S:g} s and was stopped"
                )
            chunk = os.read(fd, min(remaining, 1 << 20))
            if not chunk:
                code = self._process.wait(timeout=5)
                raise _DecoderFailed(f"crashed the decoder (exit status {code})")
            chunks.append(chunk)
            remaining -= len(chunk)
        return b"".join(chunks)

    def close(self, kill: bool = False) -> None:
        """Stop the worker, if one runs: end of input, or ``kill`` at once."""
        process, self._process = self._process, None
        if process is None:
            return
        if kill:
            process.kill()
        try:
            process.stdin.close()
        except OSError:
            pass
        try:
            process.wait(timeout=2)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        process.stdout.close()


def _worker_command() -> list[str]:
    """Command line of the decoder worker (a fresh interpreter, no forked state)."""
    return [
        sys.executable,
        "-c",
        "from femurrisk.dicom import serve_decoder; serve_decoder()",
    ]


def _start_worker() -> subprocess.Popen:
    package_root = str(Path(__file__).resolve().parents[1])
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (package_root, env.get("PYTHONPATH", "")) if p
    )
    return subprocess.Popen(
        _worker_command(),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        bufsize=0,
        env=env,
        close_fds=True,
    )


def serve_decoder() -> None:
    """Worker loop: decode the files named on stdin, reply on stdout, until EOF.

    Run by :class:`_IsolatedDecoder` in a separate interpreter; not for direct use.
    """
    try:
        import resource

        resource.setrlimit(
            resource.RLIMIT_AS, (DECODER_MEMORY_BYTES, DECODER_MEMORY_BYTES)
        )
    except (ImportError, ValueError, OSError):
        pass
    requests = os.fdopen(os.dup(0), "rb", buffering=0)
    replies = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)  # anything a codec prints must not corrupt the replies
    while header := requests.read(8):
        (size,) = struct.unpack("<Q", header)
        path, lead = pickle.loads(_read_all(requests, size))
        try:
            reply = ("ok", *_decode_file(Path(path), lead))
        except InputError as exc:
            reply = ("input", str(exc))
        except BaseException as exc:  # noqa: BLE001 - report, never die silently
            reply = ("failed", type(exc).__name__)
        data = pickle.dumps(reply, protocol=pickle.HIGHEST_PROTOCOL)
        replies.write(struct.pack("<Q", len(data)) + data)
        replies.flush()


def _read_all(stream, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = stream.read(size - len(data))
        if not chunk:
            raise EOFError("request cut short")
        data += chunk
    return data


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
