"""Synthetic cohort: the one public pelvis CT, deformed, re-acquired and given lesions.

Every case is made from the shared scan ``pelvis_ct_3mm.nii.gz`` (read at run time
from ``../shared/data/ct/``, never copied into the project) in two stages.

Base volume (built once per process, :func:`base_volume`):

1. The metal nail in the patient's left proximal femur is removed by replacing the
   left hip region with the mirror image of the healthy right hip. The mirror plane
   is the mid-sagittal plane between the two femoral head centres of the hand
   annotation (``tests/fixtures/pelvis_ct_3mm_annotation.json``), so the mirrored head
   lands on the annotated left head (within 1.5 mm). Both hips are then usable.
2. The scan ends at the intertrochanteric region; it is extended caudally by
   :data:`EXTENSION_MM` with synthetic proximal femoral shafts. The femur section of
   the lowest real slice morphs (signed-distance blend) into a cortical tube of
   about 30 mm with a lesser trochanter bump; the cortex thickens from the
   metaphysis to the diaphysis and cancellous bone turns into fatty marrow. Soft
   tissue is the lowest real slice with its bone in-painted from the surrounding
   tissue; ischium and pubis shrink to nothing within about 15 mm.

Per case (:func:`generate_case`), drawn from ``numpy.random.default_rng([seed,
case_id])`` only: a hospital site (slice thickness and spacing, pixel size, noise,
reconstruction kernel, HU offset, table height), optional left-right mirroring,
rotation, scale, translation and a smooth elastic displacement, cranio-caudal extent
and field of view, then metastases, synthetic implants, noise and a calibration
offset. Landmarks are carried through the same transform as the image.

Fracture risk (:func:`fracture_risk`) is a stated logistic model, not a fitted one:
lesion size relative to bone width, axial cortical involvement (over 30 mm is a
strong risk, after Van der Linden et al.), lytic > mixed > blastic, and site in the
femur. The label is a Bernoulli draw from that probability. The source study's
prevalence was 1.4 % of sides (:data:`STUDY_PREVALENCE`); by default the cohort is
enriched to about 35 % positive sides by case-control sampling (see
:func:`generate_case`), so its probabilities must be recalibrated to the target
prevalence.

The multi-site cohort of the source study's size (:func:`generate_study`, with the
table of :mod:`training.cohort_design`) reuses this pipeline with a patient's
anatomy that is either this base or a parametric phantom (:func:`phantom_base`),
per-site acquisition, a couch, and the design's lesions; see ``docs/cohort.md``.
The limitations below concern the real-anatomy base.

Known limitations, where they matter:

* All cases share one patient's anatomy; the deformations vary shape, not identity.
  A network can memorise this pelvis; it must be tested on real scans.
* Both hips are the same (mirrored) right hip below the acetabular roof.
* The synthetic shafts are idealised tubes with smooth muscle around them: crops
  below the real scan's end (more than about 70 mm below the AIIS) are simpler
  than real anatomy. The body outline below the real scan is the last real slice.
* The source is 3 mm isotropic: slices thinner than 3 mm and pixels finer than 3 mm
  add no detail, and lesions (drawn on the output grid) are sharper than anatomy
  at fine output spacings.
* In-plane pixels are 1.6-2.4 mm, coarser than real scanners (0.6-0.9 mm), to stay
  under 2 s per case; the product resamples to 2-4 mm anyway.
"""

from __future__ import annotations

import functools
import json
import logging
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage as ndi

logger = logging.getLogger(__name__)

SIDES = ("left", "right")

#: The shared scan; ``FEMURRISK_REAL_CT`` overrides the path.
REAL_CT_PATH = (
    Path(__file__).resolve().parents[2] / "shared" / "data" / "ct" / "pelvis_ct_3mm.nii.gz"
)

#: Hand annotation of the real scan, voxel (i, j, k); the same values as
#: ``tests/fixtures/pelvis_ct_3mm_annotation.json`` (a test keeps them equal).
REAL_AIIS_VOXEL = {"left": (26.0, 58.0, 24.0), "right": (91.5, 59.0, 24.0)}
REAL_HEAD_VOXEL = {"left": (32.5, 44.5, 12.5), "right": (87.0, 44.5, 12.5)}
REAL_IMPLANT_SIDE = "left"

#: Prevalence of pathologic fracture within 3 months in the source study (sides).
STUDY_PREVALENCE = 0.014

#: Synthetic extension of the real scan below its last slice, mm.
EXTENSION_MM = 102.0

AIR_HU = -1024.0
METAL_HU = 3000.0

#: The real scan's index of the mirror plane: heads at i = 32.5 and 87.0 give 59.75;
#: the integer plane 60 keeps the mirror an exact voxel permutation.
_MIRROR_I2 = 120
#: Left hip region replaced by the mirrored right hip: i <= 50 and k <= 18 fully,
#: fading out by i = 58 and k = 22 (the AIIS at k = 24 stays original).
_REPLACE_I = (50, 58)
_REPLACE_K = (18, 22)
_BONE_HU = 150.0


# --- Data classes ---------------------------------------------------------------------


@dataclass(frozen=True)
class Site:
    """Acquisition of one synthetic hospital.

    Attributes:
        name: Short name of the site.
        slice_thickness_mm: Reconstructed slice thickness (z blur, FWHM).
        slice_spacing_mm: Distance between slice centres.
        pixel_mm: In-plane pixel size.
        noise_hu: Standard deviation of added image noise.
        kernel: "soft", "standard" or "sharp".
        hu_offset: Calibration offset added to every voxel.
        table_shift_mm: Anteroposterior shift of the patient (table height).
    """

    name: str
    slice_thickness_mm: float
    slice_spacing_mm: float
    pixel_mm: float
    noise_hu: float
    kernel: str
    hu_offset: float
    table_shift_mm: float


#: Four hospitals with different protocols.
SITES = (
    Site("A", 5.0, 5.0, 1.6, 10.0, "standard", -15.0, -20.0),
    Site("B", 3.0, 3.0, 2.0, 15.0, "sharp", 10.0, 0.0),
    Site("C", 2.0, 1.5, 2.4, 22.0, "soft", 0.0, 15.0),
    Site("D", 2.5, 2.5, 1.8, 30.0, "sharp", 25.0, -10.0),
)


@dataclass(frozen=True)
class LesionParams:
    """One metastasis in one proximal femur.

    Attributes:
        kind: "lytic", "blastic" or "mixed".
        place: "head", "neck" or "intertrochanteric".
        centre_world_mm: Centre, RAS+ mm.
        radii_mm: Semi-axes of the ellipsoid before boundary irregularity, mm.
        hu: Lesion attenuation (lytic part for mixed lesions).
        bone_width_mm: Width of the femur where the lesion sits (nominal, scaled).
        size_ratio: Largest lesion diameter / bone width.
        axial_cortical_involvement_mm: Cranio-caudal extent of the cortex the lesion
            reaches, mm (slices with lesion-on-cortex times slice spacing).
        volume_mm3: Lesion volume inside the mask, mm^3.
    """

    kind: str
    place: str
    centre_world_mm: tuple[float, float, float]
    radii_mm: tuple[float, float, float]
    hu: float
    bone_width_mm: float
    size_ratio: float
    axial_cortical_involvement_mm: float
    volume_mm3: float


@dataclass
class SyntheticCase:
    """One generated scan with its truth; every dict is keyed by patient side.

    Attributes:
        case_id: Case number within the cohort.
        seed: Cohort seed.
        image: float32 HU volume, RAS+ axis-aligned affine.
        aiis_world_mm: AIIS point per side, RAS+ mm.
        femoral_head_world_mm: Femoral head centre per side, RAS+ mm.
        lesion: Lesion per side, or None.
        label: Pathologic fracture within 3 months (0/1) per side.
        true_risk: Probability the label was drawn from.
        implant: Whether a synthetic implant was added to that femur.
        lesion_mask: uint8 on the image grid, 1 = left lesion, 2 = right lesion.
        site: Name of the hospital site.
        mirrored: Whether the base anatomy was mirrored left-right.
        params: Every other drawn parameter, JSON-serialisable.
        femur_mask: uint8 on the image grid, 1 = left femur, 2 = right femur
            (multi-site cohort only; None for :func:`generate_case`).
    """

    case_id: int
    seed: int
    image: nib.Nifti1Image
    aiis_world_mm: dict[str, tuple[float, float, float]]
    femoral_head_world_mm: dict[str, tuple[float, float, float]]
    lesion: dict[str, LesionParams | None]
    label: dict[str, int]
    true_risk: dict[str, float]
    implant: dict[str, bool]
    lesion_mask: np.ndarray
    site: str
    mirrored: bool
    params: dict = field(default_factory=dict)
    femur_mask: np.ndarray | None = None


# --- Base volume ----------------------------------------------------------------------


@dataclass
class _Base:
    volume_hu: np.ndarray  # (x, y, z) float32
    femur: np.ndarray  # (x, y, z) uint8, 1 = source-left femur, 2 = source-right
    affine: np.ndarray
    aiis_mm: dict[str, np.ndarray]  # source sides
    head_mm: dict[str, np.ndarray]
    troch_mm: dict[str, np.ndarray]  # centre of the femur section at the real scan's end
    shaft_mm: dict[str, np.ndarray]  # shaft axis point at the extension's end
    mid_x_mm: float
    lt_mm: dict[str, np.ndarray] | None = None  # lesser trochanter on the shaft axis


def _real_ct_path() -> Path:
    return Path(os.environ.get("FEMURRISK_REAL_CT", REAL_CT_PATH))


def _ramp(x: np.ndarray, full: float, zero: float) -> np.ndarray:
    """1 up to ``full``, linear to 0 at ``zero``."""
    return np.clip((zero - x) / (zero - full), 0.0, 1.0)


def _smoothstep(t: np.ndarray | float) -> np.ndarray:
    t = np.clip(t, 0.0, 1.0)
    return t * t * (3.0 - 2.0 * t)


def _remove_left_implant(volume: np.ndarray) -> np.ndarray:
    """Replace the implanted left hip by the mirrored right hip (blended)."""
    mirrored = volume[_MIRROR_I2 - np.arange(volume.shape[0]).clip(0, _MIRROR_I2)]
    i = np.arange(volume.shape[0], dtype=np.float32)
    k = np.arange(volume.shape[2], dtype=np.float32)
    weight = _ramp(i, *_REPLACE_I)[:, None, None] * _ramp(k, *_REPLACE_K)[None, None, :]
    return (weight * mirrored + (1.0 - weight) * volume).astype(np.float32)


def _right_femur_mask(volume: np.ndarray) -> np.ndarray:
    """The right femur of the real scan: head ball plus lateral bone below the head."""
    head = np.asarray(REAL_HEAD_VOXEL["right"])
    shape = volume.shape
    i, j, k = np.meshgrid(*[np.arange(n) for n in shape], indexing="ij", sparse=True)
    radius_vox = 23.0 / 3.0
    ball = (i - head[0]) ** 2 + (j - head[1]) ** 2 + (k - head[2]) ** 2 <= radius_vox**2
    bone = volume > _BONE_HU
    bone = np.stack([ndi.binary_fill_holes(bone[:, :, z]) for z in range(shape[2])], -1)
    lateral = (i >= head[0] + 2) & (k <= head[2] - 1) & (j >= head[1] - 12)
    mask = ball | (bone & lateral & (k <= head[2] + 8))
    mask &= i >= _MIRROR_I2 // 2 + 8
    labels, _ = ndi.label(mask)
    keep = labels == labels[tuple(np.round(head).astype(int))]
    return keep


def _extend_caudally(
    volume: np.ndarray, femur: np.ndarray, n_ext: int, spacing_mm: float
) -> tuple[np.ndarray, np.ndarray, dict, dict]:
    """Add ``n_ext`` synthetic slices below the scan with proximal femoral shafts."""
    nx, ny, _ = volume.shape
    slice0 = volume[:, :, 0]
    bone0 = ndi.binary_fill_holes(slice0 > _BONE_HU)
    femur0 = femur[:, :, 0] > 0
    bone0 = ndi.binary_dilation(bone0 | femur0, iterations=1)

    # Soft tissue: bone voxels take the value of the nearest non-bone voxel.
    _, (ii, jj) = ndi.distance_transform_edt(bone0, return_indices=True)
    soft = slice0[ii, jj]
    soft = ndi.median_filter(soft, size=3)
    other_bone = bone0 & ~ndi.binary_dilation(femur0, iterations=2)

    gi, gj = np.meshgrid(np.arange(nx), np.arange(ny), indexing="ij")
    new = np.empty((nx, ny, n_ext), dtype=np.float32)
    new_femur = np.zeros((nx, ny, n_ext), dtype=np.uint8)
    troch, shaft = {}, {}
    sections = {}
    for value, side in ((1, "left"), (2, "right")):
        sect = (femur[:, :, 0] == value)
        sect = ndi.binary_fill_holes(sect)
        inside = ndi.distance_transform_edt(sect)
        outside = ndi.distance_transform_edt(~sect)
        sdf0 = (outside - inside) * spacing_mm
        centre = np.array(ndi.center_of_mass(sect))
        real = slice0[sect]
        cortex_hu0 = float(np.percentile(real, 85))
        interior_hu0 = float(np.median(slice0[ndi.binary_erosion(sect, iterations=2)]))
        medial = -1.0 if side == "right" else 1.0  # +i is patient's right
        end = centre + np.array([medial * 6.0, -2.0]) / spacing_mm
        sections[side] = (sdf0, centre, end, cortex_hu0, interior_hu0, medial, value)
        troch[side] = centre
        shaft[side] = end

    for n in range(n_ext):
        depth = (n_ext - n) * spacing_mm  # slice n_ext - 1 lies just below the real scan
        eroded = ndi.binary_erosion(other_bone, iterations=int(depth // 4.0 + 1))
        sl = np.where(eroded, slice0, soft)
        for side, (sdf0, c0, c1, cortex0, inner0, medial, value) in sections.items():
            t = float(_smoothstep(depth / 45.0))
            centre = c0 + (c1 - c0) * min(depth / EXTENSION_MM, 1.0)
            dist = np.hypot(gi - centre[0], gj - centre[1]) * spacing_mm
            sdf = (1.0 - t) * sdf0 + t * (dist - 15.0)
            bump = np.exp(-0.5 * ((depth - 38.0) / 9.0) ** 2)
            if bump > 0.05:
                lt = centre + np.array([medial * 13.0, -9.0]) / spacing_mm
                lt_dist = np.hypot(gi - lt[0], gj - lt[1]) * spacing_mm - 9.0 * bump
                sdf = np.minimum(sdf, lt_dist)
            cortex_mm = 2.5 + 2.5 * t
            occ = np.clip(0.5 - sdf / spacing_mm, 0.0, 1.0)
            occ_in = np.clip(0.5 - (sdf + cortex_mm) / spacing_mm, 0.0, 1.0)
            cortex_hu = cortex0 + (1150.0 - cortex0) * t
            inner_hu = inner0 + (90.0 - inner0) * t
            sl = sl * (1.0 - occ) + cortex_hu * (occ - occ_in) + inner_hu * occ_in
            new_femur[:, :, n][sdf <= 0] = value
        new[:, :, n] = sl

    out = np.concatenate([new, volume], axis=2)
    out_femur = np.concatenate([new_femur, femur], axis=2)
    return out, out_femur, troch, shaft


@functools.lru_cache(maxsize=1)
def base_volume() -> _Base:
    """The implant-free, caudally extended real scan with its femur masks.

    Raises:
        FileNotFoundError: If the shared scan is not where :data:`REAL_CT_PATH` says.
    """
    path = _real_ct_path()
    if not path.exists():
        raise FileNotFoundError(
            f"the shared pelvis CT must be at {path} (or set FEMURRISK_REAL_CT), "
            "not found"
        )
    image = nib.as_closest_canonical(nib.load(path))
    volume = np.asarray(image.dataobj, dtype=np.float32)
    affine = image.affine.copy()
    spacing_mm = float(affine[2, 2])

    volume = _remove_left_implant(volume)
    right = _right_femur_mask(volume)
    left = right[_MIRROR_I2 - np.arange(volume.shape[0]).clip(0, _MIRROR_I2)]
    femur = np.zeros(volume.shape, dtype=np.uint8)
    femur[left] = 1
    femur[right] = 2

    n_ext = int(round(EXTENSION_MM / spacing_mm))
    volume, femur, troch_ij, shaft_ij = _extend_caudally(volume, femur, n_ext, spacing_mm)
    affine_ext = affine.copy()
    affine_ext[:3, 3] = affine[:3, 3] - n_ext * affine[:3, 2]

    def world(ijk) -> np.ndarray:
        return nib.affines.apply_affine(affine_ext, np.asarray(ijk, dtype=float))

    head_right = np.asarray(REAL_HEAD_VOXEL["right"])
    head_left = head_right.copy()
    head_left[0] = _MIRROR_I2 - head_right[0]
    heads = {"left": head_left, "right": head_right}
    base = _Base(
        volume_hu=volume,
        femur=femur,
        affine=affine_ext,
        aiis_mm={s: world(np.r_[REAL_AIIS_VOXEL[s][:2], REAL_AIIS_VOXEL[s][2] + n_ext])
                 for s in SIDES},
        head_mm={s: world(heads[s] + [0, 0, n_ext]) for s in SIDES},
        troch_mm={s: world(np.r_[troch_ij[s], n_ext]) for s in SIDES},
        shaft_mm={s: world(np.r_[shaft_ij[s], 0]) for s in SIDES},
        mid_x_mm=float(world([_MIRROR_I2 / 2.0, 0, 0])[0]),
    )
    logger.info("base volume %s built from %s", volume.shape, path.name)
    return base


# --- Spatial transform ----------------------------------------------------------------


def _bspline(u: np.ndarray) -> np.ndarray:
    """Cubic B-spline kernel (support |u| < 2)."""
    a = np.abs(u)
    return np.where(a < 1.0, 2.0 / 3.0 - a**2 + 0.5 * a**3,
                    np.where(a < 2.0, (2.0 - a) ** 3 / 6.0, 0.0))


@dataclass
class _Transform:
    """Output world x -> base world p = centre + inv(G) (x - t - centre) + e(x - t).

    ``G`` is rotation @ scale @ mirror; ``e`` a cubic B-spline displacement whose
    control points span ``lo``..``hi`` (mm) with coefficients ``coeffs`` (3, nx, ny, nz).
    """

    linear: np.ndarray  # G, (3, 3)
    centre: np.ndarray
    translation: np.ndarray
    coeffs: np.ndarray
    lo: np.ndarray
    hi: np.ndarray

    def _weights(self, coords: np.ndarray, axis: int) -> np.ndarray:
        n = self.coeffs.shape[axis + 1]
        pos = (coords - self.lo[axis]) / (self.hi[axis] - self.lo[axis]) * (n - 1)
        return _bspline(pos[:, None] - np.arange(n)[None, :])

    def displacement_grid(self, xs, ys, zs) -> np.ndarray:
        """Elastic displacement on a grid of deformed-space coordinates, (3, X, Y, Z)."""
        wx, wy, wz = (self._weights(c, a) for a, c in enumerate((xs, ys, zs)))
        return np.einsum("ia,jb,kc,rabc->rijk", wx, wy, wz, self.coeffs,
                         optimize=True).astype(np.float32)

    def displacement_points(self, q: np.ndarray) -> np.ndarray:
        """Elastic displacement at deformed-space points (n, 3)."""
        q = np.atleast_2d(q)
        wx, wy, wz = (self._weights(q[:, a], a) for a in range(3))
        return np.einsum("na,nb,nc,rabc->nr", wx, wy, wz, self.coeffs)

    def forward(self, p: np.ndarray) -> np.ndarray:
        """Base world point -> output world point (fixed-point inverse of the warp)."""
        p = np.asarray(p, dtype=float)
        q = self.centre + self.linear @ (p - self.centre)
        for _ in range(20):
            e = self.displacement_points(q)[0]
            q = self.centre + self.linear @ (p - e - self.centre)
        return q + self.translation


def _random_rotation(rng: np.random.Generator, max_deg: float) -> tuple[np.ndarray, list]:
    angles = rng.uniform(-max_deg, max_deg, 3)
    ax, ay, az = np.deg2rad(angles)
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    return rz @ ry @ rx, angles.tolist()


def _warp_base(base: _Base, tf: _Transform, pad: int):
    """Base volume and femur labels resampled on a padded copy of the base grid.

    Returns the deformed volume, the deformed femur labels, the grid's affine (the
    grid is in deformed space, i.e. output world minus the translation) and the z
    range (mm) of the slices that lie wholly within the base's z extent.
    """
    spacing = np.diag(base.affine)[:3]
    shape = np.array(base.volume_hu.shape) + 2 * pad
    origin = base.affine[:3, 3] - pad * spacing
    axes = [origin[a] + spacing[a] * np.arange(shape[a]) for a in range(3)]
    disp = tf.displacement_grid(*axes)
    inv = np.linalg.inv(tf.linear)
    rel = [(axes[a] - tf.centre[a]).astype(np.float32) for a in range(3)]
    grids = (rel[0][:, None, None], rel[1][None, :, None], rel[2][None, None, :])
    coords = np.empty((3, *shape), dtype=np.float32)
    for r in range(3):
        p = inv[r, 0] * grids[0] + inv[r, 1] * grids[1] + inv[r, 2] * grids[2]
        p = p + disp[r] + (tf.centre[r] - base.affine[r, 3])
        coords[r] = p / spacing[r]
    nz = base.volume_hu.shape[2]
    inside_z = ((coords[2] >= 0) & (coords[2] <= nz - 1)).all(axis=(0, 1))
    volume = ndi.map_coordinates(base.volume_hu, coords, order=1, mode="constant",
                                 cval=AIR_HU, output=np.float32)
    femur = ndi.map_coordinates(base.femur, coords, order=0, mode="constant", cval=0)
    affine = np.diag([*spacing, 1.0])
    affine[:3, 3] = origin
    full = np.flatnonzero(inside_z)
    z_range = (axes[2][full[0]], axes[2][full[-1]]) if len(full) else (axes[2][0],) * 2
    return volume, femur.astype(np.uint8), affine, z_range


def _resample_axis(arr: np.ndarray, axis: int, frac: np.ndarray, cval: float,
                   order: int) -> np.ndarray:
    """Resample ``arr`` along ``axis`` at fractional indices ``frac`` (linear/nearest)."""
    n = arr.shape[axis]
    shape = [1] * arr.ndim
    shape[axis] = len(frac)
    outside = ((frac < -0.5) | (frac > n - 0.5)) if order == 0 else (
        (frac < 0) | (frac > n - 1))
    if order == 0:
        out = np.take(arr, np.clip(np.rint(frac), 0, n - 1).astype(int), axis=axis)
    else:
        i0 = np.clip(np.floor(frac), 0, n - 2).astype(int)
        w = np.clip(frac - i0, 0.0, 1.0).astype(np.float32).reshape(shape)
        lo = np.take(arr, i0, axis=axis)
        out = lo + w * (np.take(arr, i0 + 1, axis=axis) - lo)
    if outside.any():
        index = [slice(None)] * arr.ndim
        index[axis] = np.flatnonzero(outside)
        out[tuple(index)] = cval
    return out


def _resample_grid(arr, src_affine, axes_mm, cval, order):
    """Axis-aligned resampling of ``arr`` onto the grid with coordinates ``axes_mm``."""
    out = arr
    for a in range(3):
        frac = (axes_mm[a] - src_affine[a, 3]) / src_affine[a, a]
        out = _resample_axis(out, a, frac, cval, order)
    return out


# --- Fracture risk --------------------------------------------------------------------

#: Risk of a side without a metastasis (fractures of normal bone within 3 months).
BASELINE_RISK = 0.002
#: Log-odds added per lesion type: lytic lesions weaken bone most, blastic least.
KIND_LOGIT = {"lytic": 1.0, "mixed": 0.0, "blastic": -1.5}
#: Log-odds added per place: the neck and intertrochanteric region carry the bending
#: and torsional load; head lesions rarely fracture first.
PLACE_LOGIT = {"head": -0.5, "neck": 0.5, "intertrochanteric": 0.3}
#: Nominal femur width where a lesion sits, mm, before the case's scale.
BONE_WIDTH_MM = {"head": 46.0, "neck": 32.0, "intertrochanteric": 55.0}


def fracture_risk(lesion: LesionParams | None) -> float:
    """Probability of pathologic fracture within 3 months, a stated model.

    ``logit = -4.5 + 4.0 * size_ratio + 0.08 * min(L, 60) + 1.5 * [L > 30]
    + kind + place`` with ``L`` the axial cortical involvement in mm,
    ``size_ratio`` the largest lesion diameter over the bone width, and the
    offsets of :data:`KIND_LOGIT` and :data:`PLACE_LOGIT`. A side without a lesion
    has :data:`BASELINE_RISK`.

    Args:
        lesion: The side's lesion, or None.

    Returns:
        The probability, in (0, 1).
    """
    if lesion is None:
        return BASELINE_RISK
    involvement = lesion.axial_cortical_involvement_mm
    logit = (
        -4.5
        + 4.0 * lesion.size_ratio
        + 0.08 * min(involvement, 60.0)
        + 1.5 * float(involvement > 30.0)
        + KIND_LOGIT[lesion.kind]
        + PLACE_LOGIT[lesion.place]
    )
    return float(1.0 / (1.0 + np.exp(-logit)))


# --- Lesions and implants -------------------------------------------------------------


@dataclass
class _Grid:
    """The output grid: axis coordinates (mm) and spacing."""

    axes: list[np.ndarray]
    spacing: np.ndarray

    def index(self, point: np.ndarray) -> np.ndarray:
        return np.array([(point[a] - self.axes[a][0]) / self.spacing[a] for a in range(3)])

    def box(self, centre: np.ndarray, half_mm: float) -> tuple[slice, slice, slice]:
        sl = []
        for a in range(3):
            c = (centre[a] - self.axes[a][0]) / self.spacing[a]
            h = half_mm / self.spacing[a]
            lo = int(np.clip(np.floor(c - h), 0, len(self.axes[a])))
            hi = int(np.clip(np.ceil(c + h) + 1, 0, len(self.axes[a])))
            sl.append(slice(lo, hi))
        return tuple(sl)


def _smooth_noise(rng: np.random.Generator, shape, sigma_vox: float) -> np.ndarray:
    field_ = ndi.gaussian_filter(rng.standard_normal(shape).astype(np.float32), sigma_vox)
    return field_ / max(float(field_.std()), 1e-6)


@dataclass
class _LesionDraft:
    params: LesionParams
    box: tuple[slice, slice, slice]
    weight: np.ndarray  # soft occupancy in the box, 0-1
    target_hu: np.ndarray  # lesion HU in the box
    mode: str  # "replace" (lytic/mixed) or "max" (blastic)


def _draft_lesion(rng, grid: _Grid, femur_side: np.ndarray, head, troch,
                  scale: float) -> _LesionDraft | None:
    """Draw one lesion's parameters and shape in its femur; None if it misses bone."""
    kind = str(rng.choice(["lytic", "mixed", "blastic"], p=[0.5, 0.25, 0.25]))
    place = str(rng.choice(["head", "neck", "intertrochanteric"], p=[0.25, 0.4, 0.35]))
    mean_r = float(np.exp(rng.uniform(np.log(4.0), np.log(25.0))))
    radii = np.clip(mean_r * rng.uniform(0.7, 1.3, 3), 4.0, 25.0)
    axis = troch - head
    if place == "head":
        centre = head + rng.normal(0.0, 5.0, 3)
    elif place == "neck":
        centre = head + axis * rng.uniform(0.3, 0.55) + rng.normal(0.0, 3.0, 3)
    else:
        centre = head + axis * rng.uniform(0.8, 1.0) + rng.normal(0.0, 4.0, 3)
    rotation = np.linalg.qr(rng.standard_normal((3, 3)))[0]
    irregularity = rng.uniform(0.1, 0.3)
    noise_seed = int(rng.integers(2**31))
    if kind == "lytic":
        hu = rng.uniform(20.0, 60.0)
    elif kind == "blastic":
        hu = rng.uniform(700.0, 1400.0)
    else:
        hu = rng.uniform(20.0, 60.0)
    blastic_hu = rng.uniform(700.0, 1400.0)

    # Snap the centre into the femur (nearest femur voxel).
    box = grid.box(centre, 25.0 * 1.4 + 8.0)
    femur_box = femur_side[box]
    if not femur_box.any():
        return None
    ijk = grid.index(centre) - np.array([s.start for s in box])
    ijk = np.clip(np.round(ijk).astype(int), 0, np.array(femur_box.shape) - 1)
    if not femur_box[tuple(ijk)]:
        candidates = np.argwhere(femur_box)
        offsets = (candidates - ijk) * grid.spacing
        ijk = candidates[np.argmin((offsets**2).sum(axis=1))]
    centre = np.array([grid.axes[a][box[a].start + ijk[a]] for a in range(3)])

    box = grid.box(centre, float(radii.max()) * 1.4 + 2.0 * float(grid.spacing.max()))
    femur_box = femur_side[box]
    coords = np.meshgrid(*[grid.axes[a][box[a]] - centre[a] for a in range(3)],
                         indexing="ij")
    local = np.einsum("rc,cxyz->rxyz", rotation.T, np.stack(coords))
    r_norm = np.sqrt(sum((local[a] / radii[a]) ** 2 for a in range(3)))
    local_rng = np.random.default_rng(noise_seed)
    boundary = 1.0 + irregularity * _smooth_noise(local_rng, r_norm.shape, 2.0)
    edge = float(grid.spacing[:2].mean()) / float(radii.min())
    weight = np.clip((boundary - r_norm) / edge + 0.5, 0.0, 1.0)
    allowed = ndi.binary_dilation(femur_box, iterations=1)
    weight = (weight * allowed).astype(np.float32)
    mask = weight >= 0.5
    if not mask.any():
        return None

    texture = _smooth_noise(local_rng, r_norm.shape, 1.0)
    if kind == "lytic":
        target, mode = hu + 12.0 * texture, "replace"
    elif kind == "blastic":
        target, mode = hu + 120.0 * texture, "max"
    else:
        share = np.clip(_smooth_noise(local_rng, r_norm.shape, 1.5) + 0.3, 0.0, 1.0)
        target = (1.0 - share) * (hu + 12.0 * texture) + share * blastic_hu
        mode = "replace"

    # Axial cortical involvement: slices where the lesion reaches the outer 3 mm.
    erode = max(1, int(round(3.0 / float(grid.spacing[:2].mean()))))
    structure = np.zeros((3, 3, 1), dtype=bool)
    structure[1, :, 0] = structure[:, 1, 0] = True
    cortex = femur_box & ~ndi.binary_erosion(femur_box, structure, iterations=erode)
    slices = np.flatnonzero((mask & cortex).any(axis=(0, 1)))
    involvement = float(len(slices) * grid.spacing[2])

    width = BONE_WIDTH_MM[place] * scale
    params = LesionParams(
        kind=kind, place=place,
        centre_world_mm=tuple(float(v) for v in centre),
        radii_mm=tuple(float(v) for v in radii),
        hu=float(hu),
        bone_width_mm=float(width),
        size_ratio=float(2.0 * radii.max() / width),
        axial_cortical_involvement_mm=involvement,
        volume_mm3=float(mask.sum() * np.prod(grid.spacing)),
    )
    return _LesionDraft(params, box, weight, target.astype(np.float32), mode)


def _apply_lesion(volume: np.ndarray, mask: np.ndarray, draft: _LesionDraft,
                  value: int) -> None:
    sub = volume[draft.box]
    w = draft.weight
    if draft.mode == "max":
        new = np.maximum(sub, draft.target_hu)
    else:
        new = draft.target_hu
    volume[draft.box] = sub * (1.0 - w) + new * w
    mask[draft.box][w >= 0.5] = value


def _segment_occupancy(grid: _Grid, a: np.ndarray, b: np.ndarray, radius: float):
    """Soft occupancy (box, weights) of a cylinder of ``radius`` mm from a to b."""
    centre = (a + b) / 2.0
    half = np.linalg.norm(b - a) / 2.0 + radius + 3.0
    box = grid.box(centre, half)
    coords = np.stack(np.meshgrid(*[grid.axes[k][box[k]] for k in range(3)],
                                  indexing="ij"), axis=-1)
    ab = b - a
    t = np.clip(((coords - a) @ ab) / float(ab @ ab), 0.0, 1.0)
    dist = np.linalg.norm(coords - (a + t[..., None] * ab), axis=-1)
    pixel = float(grid.spacing.mean())
    return box, np.clip((radius - dist) / pixel + 0.5, 0.0, 1.0).astype(np.float32)


def _add_implant(rng, volume: np.ndarray, grid: _Grid, head, troch, shaft,
                 lateral: float) -> dict:
    """A cephalomedullary nail: lag screw along the neck and a rod down the shaft."""
    metal = np.zeros(volume.shape, dtype=np.float32)
    neck = troch - head
    neck = neck / np.linalg.norm(neck)
    screw_tip = head - 8.0 * neck
    screw_end = head + neck * rng.uniform(85.0, 100.0)
    nail_top = troch + np.array([lateral * 8.0, 0.0, 35.0])
    nail_bottom = shaft + np.array([0.0, 0.0, -40.0])
    hu = rng.uniform(2800.0, 3200.0)
    for a, b, r in ((screw_tip, screw_end, 5.0), (nail_top, nail_bottom, 5.5)):
        box, occ = _segment_occupancy(grid, a, b, r)
        metal[box] = np.maximum(metal[box], occ)
    zs = np.flatnonzero(metal.any(axis=(0, 1)))
    if len(zs):
        _add_streaks(rng, volume, metal, grid, zs)
    np.copyto(volume, volume * (1.0 - metal) + hu * metal)
    return {"metal_hu": float(hu), "screw": [screw_tip.tolist(), screw_end.tolist()],
            "nail": [nail_top.tolist(), nail_bottom.tolist()]}


def _add_streaks(rng, volume, metal, grid: _Grid, zs: np.ndarray) -> None:
    """Bright and dark radial streaks from the metal in each affected axial slice."""
    n_streaks = 10
    angles = rng.uniform(0.0, np.pi, n_streaks)
    amps = rng.normal(0.0, 1.0, n_streaks) * 250.0
    width = rng.uniform(0.015, 0.04)
    reach_mm = 100.0
    for z in zs:
        plane = metal[:, :, z]
        area = float(plane.sum())
        if area < 1.0:
            continue
        ci, cj = ndi.center_of_mass(plane)
        box = grid.box(np.array([grid.axes[0][int(ci)], grid.axes[1][int(cj)],
                                 grid.axes[2][z]]), reach_mm)
        xi = (np.arange(box[0].start, box[0].stop) - ci) * grid.spacing[0]
        yj = (np.arange(box[1].start, box[1].stop) - cj) * grid.spacing[1]
        theta = np.arctan2(yj[None, :], xi[:, None])
        radius = np.hypot(xi[:, None], yj[None, :])
        streak = np.zeros_like(theta, dtype=np.float32)
        for angle, amp in zip(angles + rng.normal(0, 0.03, n_streaks), amps):
            d = np.angle(np.exp(2j * (theta - angle))) / 2.0
            streak += amp * np.exp(-0.5 * (d / width) ** 2)
        strength = min(area * float(np.prod(grid.spacing[:2])) / 100.0, 1.5)
        decay = np.exp(-radius / 45.0) * (radius < reach_mm)
        volume[box[0], box[1], z] += (strength * streak * decay).astype(np.float32)


# --- The generator --------------------------------------------------------------------


def _other(side: str) -> str:
    return "right" if side == "left" else "left"


def generate_case(
    seed: int,
    case_id: int,
    *,
    positive_fraction: float | None = 0.35,
    lesion_probability: float = 0.5,
    implant_probability: float = 0.15,
    mirror: bool | None = None,
    site: str | None = None,
) -> SyntheticCase:
    """Generate one synthetic case, deterministically from ``(seed, case_id)``.

    Args:
        seed: Cohort seed.
        case_id: Case number; with ``seed`` it seeds ``numpy.random.default_rng``.
        positive_fraction: Case-control enrichment: each side is first given a
            target label (1 with this probability) and its lesion is redrawn until
            the label drawn from :func:`fracture_risk` equals the target. This keeps
            ``true_risk`` the population model while the cohort has about this
            fraction of positive sides (the source study had 1.4 %). None draws
            sides naturally: a lesion with ``lesion_probability``, then the label.
        lesion_probability: Chance that a side carries a metastasis (natural
            draw, and for sides whose target label is 0).
        implant_probability: Chance per femur of a synthetic nail, independent of
            lesion and label.
        mirror: Force (True/False) or draw (None) the left-right mirroring. Every
            random draw is made either way, so forcing it changes nothing else.
        site: Force a site name of :data:`SITES`, or None to draw one.

    Returns:
        The case; every per-side dict is keyed by patient side.
    """
    rng = np.random.default_rng([seed, case_id])
    base = base_volume()
    params: dict = {}

    # Acquisition and geometry.
    site_obj = SITES[int(rng.integers(len(SITES)))]
    if site is not None:
        site_obj = {s.name: s for s in SITES}[site]
    mirrored = bool(rng.random() < 0.5)
    if mirror is not None:
        mirrored = bool(mirror)
    rotation, angles = _random_rotation(rng, 5.0)
    scale = rng.uniform(0.9, 1.1) * rng.uniform(0.97, 1.03, 3)
    flip = np.diag([-1.0 if mirrored else 1.0, 1.0, 1.0])
    linear = rotation @ np.diag(scale) @ flip
    translation = np.r_[rng.uniform(-30.0, 30.0, 2), rng.uniform(-100.0, 100.0)]
    centre = np.r_[base.mid_x_mm, base.head_mm["right"][1:]]
    elastic_sd = rng.uniform(1.0, 3.5)
    spacing = np.diag(base.affine)[:3]
    lo = base.affine[:3, 3]
    hi = lo + spacing * (np.array(base.volume_hu.shape) - 1)
    coeffs = rng.normal(0.0, elastic_sd, (3, 6, 5, 7))
    tf = _Transform(linear, centre, translation, coeffs, lo, hi)
    params.update(rotation_deg=angles, scale=scale.tolist(),
                  translation_mm=translation.tolist(), elastic_sd_mm=elastic_sd)

    side_of = {s: (_other(s) if mirrored else s) for s in SIDES}  # source -> patient
    aiis = {side_of[s]: tf.forward(base.aiis_mm[s]) for s in SIDES}
    heads = {side_of[s]: tf.forward(base.head_mm[s]) for s in SIDES}
    troch = {side_of[s]: tf.forward(base.troch_mm[s]) for s in SIDES}
    shaft = {side_of[s]: tf.forward(base.shaft_mm[s]) for s in SIDES}

    # Deform at the base's 3 mm, then blur for slice thickness and kernel.
    volume_d, femur_d, affine_d, z_full = _warp_base(base, tf, pad=8)
    thickness = site_obj.slice_thickness_mm
    sigma_z = np.sqrt(max(thickness**2 - spacing[2] ** 2, 0.0)) / 2.355 / spacing[2]
    kernel_amount = rng.uniform(0.5, 1.0)
    if sigma_z > 0.05:
        volume_d = ndi.gaussian_filter1d(volume_d, sigma_z, axis=2)
    if site_obj.kernel == "soft":
        volume_d = ndi.gaussian_filter(volume_d, (0.6 * kernel_amount,) * 2 + (0,))
    elif site_obj.kernel == "sharp":
        blurred = ndi.gaussian_filter(volume_d, (1.0, 1.0, 0.0))
        volume_d = volume_d + 0.6 * kernel_amount * (volume_d - blurred)
    params.update(kernel_amount=kernel_amount)

    # Output grid: field of view, cranio-caudal extent, pixel and slice spacing.
    pixel = site_obj.pixel_mm
    dz = site_obj.slice_spacing_mm
    fov = rng.uniform(340.0, 430.0)
    body_centre = np.r_[centre[0], lo[1] + spacing[1] * base.volume_hu.shape[1] / 2.0]
    fov_centre = body_centre + translation[:2] + rng.normal(0.0, 10.0, 2)
    fov_centre[1] -= site_obj.table_shift_mm + rng.uniform(-10.0, 10.0)
    head_z = min(h[2] for h in heads.values())
    aiis_z = max(p[2] for p in aiis.values())
    # Slices partly outside the real scan's extent would show its tilted edge.
    z_bottom = max(head_z - rng.uniform(45.0, 125.0), z_full[0] + translation[2])
    z_top = min(aiis_z + rng.uniform(90.0, 330.0), z_full[1] + translation[2])
    n_xy = int(round(fov / pixel))
    n_z = int(np.floor((z_top - z_bottom) / dz)) + 1
    origin = np.r_[fov_centre - pixel * (n_xy - 1) / 2.0, z_bottom]
    out_spacing = np.array([pixel, pixel, dz])
    axes = [origin[a] + out_spacing[a] * np.arange((n_xy, n_xy, n_z)[a]) for a in range(3)]
    grid = _Grid(axes, out_spacing)
    shifted = affine_d.copy()
    shifted[:3, 3] += translation
    volume = _resample_grid(volume_d, shifted, axes, AIR_HU, 1).astype(np.float32)
    femur_src = _resample_grid(femur_d, shifted, axes, 0, 0)
    femur = {side_of["left"]: femur_src == 1, side_of["right"]: femur_src == 2}
    params.update(fov_mm=fov, z_range_mm=[float(z_bottom), float(axes[2][-1])])

    # Lesions, labels and implants, per patient side.
    lesion_mask = np.zeros(volume.shape, dtype=np.uint8)
    lesions: dict[str, LesionParams | None] = {}
    labels: dict[str, int] = {}
    risks: dict[str, float] = {}
    implants: dict[str, bool] = {}
    mean_scale = float(np.mean(scale))
    # Drawn in source-side order, so that forcing ``mirror`` moves the same lesion,
    # label and implant to the other patient side together with the anatomy.
    for source in SIDES:
        side = side_of[source]
        target = None if positive_fraction is None else int(
            rng.random() < positive_fraction)
        draft, label, risk = None, 0, BASELINE_RISK
        for attempt in range(200):
            has_lesion = target == 1 or rng.random() < lesion_probability
            draft = (_draft_lesion(rng, grid, femur[side], heads[side], troch[side],
                                   mean_scale) if has_lesion else None)
            risk = fracture_risk(draft.params if draft else None)
            label = int(rng.random() < risk)
            if target is None or label == target:
                break
        else:
            logger.warning("case %d %s: target label %s not reached", case_id, side, target)
        if draft is not None:
            _apply_lesion(volume, lesion_mask, draft, 1 if side == "left" else 2)
        lesions[side] = draft.params if draft else None
        labels[side], risks[side] = label, risk
    implant_params = {}
    for source in SIDES:
        side = side_of[source]
        implants[side] = bool(rng.random() < implant_probability)
        if implants[side]:
            lateral = 1.0 if side == "right" else -1.0
            implant_params[side] = _add_implant(rng, volume, grid, heads[side],
                                                troch[side], shaft[side], lateral)
    params["implants"] = implant_params

    # Calibration offset and correlated noise.
    hu_offset = site_obj.hu_offset + rng.uniform(-5.0, 5.0)
    noise_sd = site_obj.noise_hu * rng.uniform(0.8, 1.2)
    noise = rng.standard_normal(volume.shape, dtype=np.float32)
    noise = ndi.gaussian_filter(noise, (0.7, 0.7, 0.0))
    noise *= noise_sd / max(float(noise.std()), 1e-6)
    volume += noise + hu_offset
    np.clip(volume, -1024.0, 3071.0, out=volume)
    params.update(hu_offset=hu_offset, noise_sd_hu=noise_sd)

    affine = np.diag([*out_spacing, 1.0])
    affine[:3, 3] = origin
    image = nib.Nifti1Image(volume, affine)
    image.header.set_xyzt_units("mm")
    image.set_sform(affine, code=1)
    image.set_qform(affine, code=1)

    def as_tuple(p):
        return tuple(float(v) for v in p)

    return SyntheticCase(
        case_id=case_id, seed=seed, image=image,
        aiis_world_mm={s: as_tuple(aiis[s]) for s in SIDES},
        femoral_head_world_mm={s: as_tuple(heads[s]) for s in SIDES},
        lesion={s: lesions[s] for s in SIDES}, label={s: labels[s] for s in SIDES},
        true_risk={s: risks[s] for s in SIDES}, implant={s: implants[s] for s in SIDES},
        lesion_mask=lesion_mask, site=site_obj.name, mirrored=mirrored, params=params,
    )


# --- Parametric anatomy ---------------------------------------------------------------

#: Phantom grid: 3 mm voxels, origin and shape (x, y, z); the femoral heads sit at
#: z = 0 and y = 0, the midline at x = 0.
_PHANTOM_SPACING = 3.0
_PHANTOM_ORIGIN = np.array([-190.5, -160.5, -180.0])
_PHANTOM_SHAPE = (128, 100, 146)

#: Vessel attenuation (artery, vein) per contrast phase, HU.
VESSEL_HU = {"none": (40.0, 40.0), "arterial": (320.0, 90.0),
             "portal_venous": (170.0, 160.0)}


def _smin(a: np.ndarray, b: np.ndarray, k: float) -> np.ndarray:
    """Smooth minimum of two signed distances (blend radius ``k`` mm)."""
    h = np.clip(0.5 + 0.5 * (b - a) / k, 0.0, 1.0)
    return b + (a - b) * h - k * h * (1.0 - h)


class _Field:
    """Signed-distance primitives on the phantom grid (mm; negative inside)."""

    def __init__(self) -> None:
        axes = [_PHANTOM_ORIGIN[a] + _PHANTOM_SPACING * np.arange(n, dtype=np.float32)
                for a, n in enumerate(_PHANTOM_SHAPE)]
        self.x = axes[0][:, None, None]
        self.y = axes[1][None, :, None]
        self.z = axes[2][None, None, :]

    def sphere(self, c, r: float) -> np.ndarray:
        return np.sqrt((self.x - c[0]) ** 2 + (self.y - c[1]) ** 2
                       + (self.z - c[2]) ** 2) - r

    def ellipsoid(self, c, radii) -> np.ndarray:
        q = np.sqrt(((self.x - c[0]) / radii[0]) ** 2 + ((self.y - c[1]) / radii[1]) ** 2
                    + ((self.z - c[2]) / radii[2]) ** 2)
        return (q - 1.0) * float(min(radii))

    def capsule(self, a, b, r: float) -> np.ndarray:
        a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
        ab = b - a
        px, py, pz = self.x - a[0], self.y - a[1], self.z - a[2]
        t = np.clip((px * ab[0] + py * ab[1] + pz * ab[2]) / float(ab @ ab), 0.0, 1.0)
        return np.sqrt((px - t * ab[0]) ** 2 + (py - t * ab[1]) ** 2
                       + (pz - t * ab[2]) ** 2) - r


def _unit(v) -> np.ndarray:
    v = np.asarray(v, dtype=float)
    return v / np.linalg.norm(v)


def _render_bone(volume: np.ndarray, sdf: np.ndarray, cortex_mm, cortex_hu: float,
                 inner_hu) -> None:
    """Paint a bone with a cortical shell of ``cortex_mm`` into ``volume``."""
    occ = np.clip(0.5 - sdf / _PHANTOM_SPACING, 0.0, 1.0)
    inner = np.clip(0.5 - (sdf + cortex_mm) / _PHANTOM_SPACING, 0.0, 1.0)
    volume *= 1.0 - occ
    volume += cortex_hu * (occ - inner) + inner_hu * inner


@functools.lru_cache(maxsize=2)
def phantom_base(anatomy_seed: int, scale: float, sex: str, density: float,
                 contrast_phase: str, aiis_to_lt_mm: float) -> _Base:
    """A parametric pelvis with proximal femurs, soft tissue and vessels.

    Ellipsoids, capsules and shells (signed distances, blended) with cortex and
    medulla: femoral head, neck, intertrochanteric region with greater and lesser
    trochanter and shaft; acetabulum, iliac wings as a bowl, the AIIS as a bump on
    an anterior column, pubic and ischial rami, sacrum and lumbar spine; body
    outline with subcutaneous fat, muscle, pelvic viscera with gas, bladder, iliac
    and femoral vessels enhanced by ``contrast_phase``. Shape parameters are drawn
    from ``anatomy_seed``; the landmarks are the exact points the shapes are built
    around.

    Args:
        anatomy_seed: Seeds the shape draws.
        scale: Overall size.
        sex: "M" or "F" (wider pelvis, more subcutaneous fat in women).
        density: Relative bone density (scales trabecular and cortical HU).
        contrast_phase: Key of :data:`VESSEL_HU`.
        aiis_to_lt_mm: Nominal AIIS-to-lesser-trochanter distance at scale 1.

    Returns:
        The base, in the same form as :func:`base_volume`'s.
    """
    rng = np.random.default_rng([anatomy_seed, 0xF1])
    s = scale
    f = _Field()
    width = rng.uniform(0.95, 1.05) + (0.04 if sex == "F" else 0.0)
    hx = 84.0 * s * width
    fat_mm = rng.uniform(10.0, 32.0) * s + (8.0 if sex == "F" else 0.0)
    girth = rng.uniform(0.92, 1.1)
    volume = np.full(_PHANTOM_SHAPE, AIR_HU, dtype=np.float32)

    # Body outline and soft tissue.
    bx, by = (hx + 80.0 * s) * girth, 118.0 * s * girth
    waist = 1.0 - 0.12 * _smoothstep((f.z - 110.0 * s) / 90.0)
    trunk = np.sqrt((f.x / (bx * waist)) ** 2 + ((f.y + 15.0 * s) / by) ** 2)
    trunk = (trunk - 1.0) * by
    thighs = np.minimum(*[np.sqrt((f.x - sign * (hx + 12.0 * s)) ** 2
                                  + (f.y + 5.0 * s) ** 2) - 88.0 * s * girth
                          for sign in (-1.0, 1.0)])
    below = _smoothstep((-60.0 * s - f.z) / 40.0)
    body = trunk * (1.0 - below) + np.maximum(thighs, trunk) * below
    texture = _smooth_noise(rng, _PHANTOM_SHAPE, 2.0)
    occ = np.clip(0.5 - body / _PHANTOM_SPACING, 0.0, 1.0)
    volume += occ * (-100.0 + 8.0 * texture - AIR_HU)
    muscle = np.clip(0.5 - (body + fat_mm) / _PHANTOM_SPACING, 0.0, 1.0)
    volume += muscle * (52.0 + 6.0 * texture - (-100.0 + 8.0 * texture))
    fat_planes = np.clip((_smooth_noise(rng, _PHANTOM_SHAPE, 3.0) - 1.3) * 2.0, 0, 1)
    volume -= muscle * fat_planes * 140.0

    # Pelvic and abdominal contents: bowel, fat, gas, bladder.
    pelvis_in = f.ellipsoid((0.0, -10.0 * s, 80.0 * s), (hx * 0.95, 70.0 * s, 130.0 * s))
    inside = np.clip(0.5 - pelvis_in / _PHANTOM_SPACING, 0.0, 1.0) * (f.z > -30.0 * s)
    bowel = _smooth_noise(rng, _PHANTOM_SHAPE, 2.5)
    viscera = np.where(bowel > -0.4, 35.0, -90.0) + 10.0 * texture
    viscera = np.where(bowel > 2.2, -900.0, viscera)
    volume += inside * (viscera - volume)
    bladder = f.ellipsoid((0.0, 42.0 * s, 0.0), np.array([38.0, 32.0, 32.0]) * s
                          * rng.uniform(0.7, 1.2))
    volume += np.clip(0.5 - bladder / 3.0, 0, 1) * (8.0 - volume)

    # Vessels.
    artery_hu, vein_hu = VESSEL_HU[contrast_phase]
    for sign in (-1.0, 1.0):
        path = [(sign * 40.0 * s, -5.0 * s, 150.0 * s), (sign * (hx - 25.0 * s),
                42.0 * s, 5.0 * s), (sign * (hx - 5.0 * s), 45.0 * s, -170.0 * s)]
        for (a, b) in zip(path[:-1], path[1:]):
            for shift, radius, hu in ((0.0, 4.0, artery_hu), (-9.0, 6.0, vein_hu)):
                a2, b2 = np.add(a, (sign * shift * s, 0, 0)), np.add(b, (sign * shift * s,
                                                                          0, 0))
                v = f.capsule(a2, b2, radius * s)
                volume += np.clip(0.5 - v / 3.0, 0, 1) * (hu - volume)
    for x0, radius, hu in ((-5.0, 10.0, artery_hu), (22.0, 12.0, vein_hu)):
        v = f.capsule((x0 * s, -12.0 * s, 150.0 * s), (x0 * s, -12.0 * s, 300.0), radius * s)
        volume += np.clip(0.5 - v / 3.0, 0, 1) * (hu - volume)

    cortex_hu = 1150.0 * (0.8 + 0.2 * density)
    trabecular = 190.0 * density
    # Spine and sacrum.
    spine = f.ellipsoid((0.0, -78.0 * s, 55.0 * s), np.array([50.0, 22.0, 62.0]) * s)
    for z0 in np.arange(130.0, 450.0, 31.0) * s:
        spine = np.minimum(spine, f.capsule((0, -35.0 * s, z0 - 10.0 * s),
                                            (0, -35.0 * s, z0 + 10.0 * s), 21.0 * s))
        spine = np.minimum(spine, f.capsule((0, -60.0 * s, z0), (0, -85.0 * s, z0 - 10 * s),
                                            7.0 * s))
    _render_bone(volume, spine, 1.5, cortex_hu, trabecular * 0.9)

    # Per side: pelvis half and femur.
    femur = np.zeros(_PHANTOM_SHAPE, dtype=np.uint8)
    heads, aiis, troch, shaft, lts = {}, {}, {}, {}, {}
    # Iliac wings: the wall of an elliptic funnel that flares upwards to the crests.
    half_width = 1.05 * hx + 0.42 * np.maximum(f.z - 20.0 * s, 0.0)
    funnel = np.sqrt((f.x / half_width) ** 2 + ((f.y + 25.0 * s) / (115.0 * s)) ** 2)
    funnel = (funnel - 1.0) * np.minimum(half_width, 115.0 * s)
    bowl = np.abs(funnel + 5.0 * s) - 4.5 * s
    bowl = np.maximum(bowl, np.maximum(np.maximum(5.0 * s - f.z, f.z - 125.0 * s),
                                       np.maximum(35.0 * s - np.abs(f.x), f.y - 50.0 * s)))
    bowl = np.maximum(bowl, -75.0 * s - f.y)  # posteriorly the wings end at the SI joints
    pelvic_bone = bowl
    for side, sign in (("left", -1.0), ("right", 1.0)):
        jitter = rng.uniform(0.97, 1.03)
        head = np.array([sign * hx, 0.0, 0.0])
        r_head = (24.5 if sex == "M" else 22.5) * s * jitter
        theta = np.deg2rad(rng.uniform(122.0, 135.0) - 90.0)
        version = np.deg2rad(rng.uniform(5.0, 20.0))
        neck_dir = _unit((sign * np.cos(theta), -np.sin(version), -np.sin(theta)))
        t_point = head + neck_dir * 52.0 * s * jitter
        shaft_dir = _unit((-sign * 0.12, 0.02, -1.0))
        s_point = t_point + shaft_dir * 160.0 * s
        lt_depth = max(aiis_to_lt_mm * s - 66.0 * s, 12.0)
        lt = t_point + shaft_dir * lt_depth
        a_point = head + np.array([sign * 17.0, 40.0, 34.0]) * s * rng.uniform(0.94, 1.06, 3)

        bone = f.sphere(head, r_head)
        bone = _smin(bone, f.capsule(head, t_point, 15.5 * s * jitter), 6.0)
        bone = _smin(bone, f.capsule(t_point - shaft_dir * 5.0, t_point + shaft_dir * 25.0,
                                     22.0 * s), 8.0)
        bone = _smin(bone, f.ellipsoid(t_point + np.array([sign * 22.0, -6.0, 12.0]) * s,
                                       np.array([13.0, 16.0, 22.0]) * s), 6.0)
        bone = _smin(bone, f.sphere(lt + np.array([-sign * 12.0, -6.0, 0.0]) * s, 8.0 * s),
                     5.0)
        bone = _smin(bone, f.capsule(t_point, s_point, 15.0 * s), 10.0)
        depth = np.clip((t_point[2] - f.z) / 70.0, 0.0, 1.0)
        cortex = 1.6 + 4.0 * _smoothstep(depth)
        marrow = trabecular * (1.0 - 0.9 * depth) + (-20.0) * depth
        marrow = marrow + 60.0 * density * np.clip(1.0 - f.sphere(head, 0.0) / r_head, 0, 1)
        femur[bone <= 0.0] = 1 if side == "left" else 2

        acetabulum = np.abs(f.sphere(head, r_head + 6.0 * s)) - 4.5 * s
        opening = _unit((sign * 0.7, 0.35, -0.6))
        facing = ((f.x - head[0]) * opening[0] + (f.y - head[1]) * opening[1]
                  + (f.z - head[2]) * opening[2])
        acetabulum = np.maximum(acetabulum, facing - 0.3 * r_head)
        column = f.capsule(head + np.array([sign * 8.0, 12.0, 22.0]) * s, a_point, 8.0 * s)
        ischium = f.capsule(head + np.array([-sign * 8.0, -20.0, -20.0]) * s,
                            head + np.array([-sign * 22.0, -35.0, -65.0]) * s, 11.0 * s)
        pubis = f.capsule(head + np.array([-sign * 20.0, 20.0, -18.0]) * s,
                          np.array([sign * 6.0, 45.0, -28.0]) * s, 9.0 * s)
        ramus = f.capsule(head + np.array([-sign * 22.0, -35.0, -65.0]) * s,
                          np.array([sign * 8.0, 35.0, -45.0]) * s, 6.0 * s)
        sacroiliac = f.capsule((sign * 40.0 * s, -75.0 * s, 60.0 * s),
                               (sign * 72.0 * s, -68.0 * s, 72.0 * s), 12.0 * s)
        half = acetabulum
        for part in (column, f.sphere(a_point, 9.0 * s), ischium, pubis, ramus, sacroiliac):
            half = _smin(half, part, 4.0)
        pelvic_bone = _smin(pelvic_bone, half, 5.0)
        _render_bone(volume, bone, cortex, cortex_hu, marrow)
        heads[side], aiis[side], troch[side], shaft[side], lts[side] = (
            head, a_point, t_point, s_point, lt)
    _render_bone(volume, pelvic_bone, 1.5, cortex_hu * 0.95, trabecular)

    affine = np.diag([_PHANTOM_SPACING] * 3 + [1.0])
    affine[:3, 3] = _PHANTOM_ORIGIN
    return _Base(volume_hu=volume, femur=femur, affine=affine, aiis_mm=aiis,
                 head_mm=heads, troch_mm=troch, shaft_mm=shaft, mid_x_mm=0.0,
                 lt_mm=lts)


# --- The multi-site cohort ------------------------------------------------------------


def _anatomy_base(design, patient) -> tuple[_Base, bool]:
    """The patient's base anatomy and whether its sides are swapped (real scan)."""
    anatomy = patient.anatomy
    if anatomy.kind == "real":
        return base_volume(), anatomy.mirrored
    phase = design_module().HOSPITAL_BY_NAME[patient.site].contrast_phase
    return phantom_base(anatomy.seed, round(anatomy.scale, 6), patient.sex,
                        round(patient.bone_density, 6), phase,
                        anatomy.aiis_to_lesser_trochanter_mm), False


def design_module():
    """:mod:`training.cohort_design`, imported late to keep this module's import light."""
    from training import cohort_design

    return cohort_design


def _axis_frame(axis: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Two unit vectors perpendicular to ``axis`` and to each other."""
    ref = np.array([0.0, 1.0, 0.0]) if abs(axis[1]) < 0.9 else np.array([1.0, 0.0, 0.0])
    u = _unit(np.cross(axis, ref))
    return u, np.cross(axis, u)


def _place_lesion(state, head, troch, shaft, lt) -> tuple[np.ndarray, np.ndarray]:
    """Centre and bone axis of a design lesion in the case's anatomy (world mm)."""
    neck = _unit(troch - head)
    down = _unit(shaft - troch)
    if state.place == "head":
        axis, centre = neck, head + neck * (state.along - 0.5) * 10.0
    elif state.place == "neck":
        axis = neck
        centre = head + (troch - head) * (0.35 + 0.25 * state.along)
    elif state.place == "intertrochanteric":
        axis = down
        centre = troch + down * (state.along - 0.3) * 15.0
    else:
        axis = down
        centre = lt + down * (state.along * 40.0 + 0.3 * state.radius_mm)
    u, v = _axis_frame(axis)
    angle = np.deg2rad(state.angle_deg)
    offset = state.eccentricity * state.bone_radius_mm
    return centre + offset * (np.cos(angle) * u + np.sin(angle) * v), axis


def _render_design_lesion(grid: _Grid, femur_side: np.ndarray, state, centre, axis
                          ) -> _LesionDraft | None:
    """The design's lesion as an irregular ellipsoid clipped to its femur."""
    local_rng = np.random.default_rng(state.shape_seed)
    radii = np.array([state.radius_mm, state.radius_mm,
                      state.radius_mm * state.elongation])
    u, v = _axis_frame(axis)
    rotation = np.stack([u, v, axis], axis=1)  # columns: local axes in world
    hu = local_rng.uniform(20.0, 60.0)
    blastic_hu = local_rng.uniform(700.0, 1400.0)
    irregularity = local_rng.uniform(0.1, 0.25)
    box = grid.box(centre, float(radii.max()) * 1.4 + 2.0 * float(grid.spacing.max()))
    femur_box = femur_side[box]
    if not femur_box.any():
        return None
    coords = np.meshgrid(*[grid.axes[a][box[a]] - centre[a] for a in range(3)],
                         indexing="ij")
    local = np.einsum("rc,cxyz->rxyz", rotation.T, np.stack(coords))
    r_norm = np.sqrt(sum((local[a] / radii[a]) ** 2 for a in range(3)))
    # Texture is drawn on a fixed 24^3 lattice in lesion coordinates, so that the
    # same lesion keeps its shape across a patient's CTs and sites.
    lattice = _smooth_noise(local_rng, (24, 24, 24), 2.0)
    lattice_idx = [np.clip((local[a] / radii[a] + 1.5) / 3.0 * 23.0, 0, 23)
                   for a in range(3)]
    rough = ndi.map_coordinates(lattice, lattice_idx, order=1)
    boundary = 1.0 + irregularity * rough
    edge = float(grid.spacing[:2].mean()) / float(radii.min())
    weight = np.clip((boundary - r_norm) / edge + 0.5, 0.0, 1.0)
    weight = (weight * ndi.binary_dilation(femur_box, iterations=1)).astype(np.float32)
    mask = weight >= 0.5
    if not mask.any():
        return None
    texture = ndi.map_coordinates(_smooth_noise(local_rng, (24, 24, 24), 1.0),
                                  lattice_idx, order=1)
    if state.kind == "lytic":
        target, mode = hu + 12.0 * texture, "replace"
    elif state.kind == "blastic":
        target, mode = blastic_hu + 120.0 * texture, "max"
    else:
        share = np.clip(texture + 0.3, 0.0, 1.0)
        target = (1.0 - share) * (hu + 12.0 * texture) + share * blastic_hu
        mode = "replace"
    params = LesionParams(
        kind=state.kind, place=state.place,
        centre_world_mm=tuple(float(c) for c in centre),
        radii_mm=tuple(float(r) for r in radii), hu=float(hu),
        bone_width_mm=2.0 * state.bone_radius_mm,
        size_ratio=float(2.0 * radii.max() / (2.0 * state.bone_radius_mm)),
        axial_cortical_involvement_mm=state.axial_cortical_involvement_mm,
        volume_mm3=float(mask.sum() * np.prod(grid.spacing)),
    )
    return _LesionDraft(params, box, weight, target.astype(np.float32), mode)


def _add_table(volume: np.ndarray, grid: _Grid, prone: bool, rng) -> dict:
    """A curved carbon-fibre couch with foam core under (supine) or over (prone)
    the patient's back, in the patient frame."""
    body = (volume > -500.0).any(axis=2)
    rows = np.flatnonzero(body.any(axis=0))
    if not len(rows):
        return {}
    gap = rng.uniform(0.0, 6.0)
    x = grid.axes[0][:, None]
    y = grid.axes[1][None, :]
    centre_x = float(np.mean(grid.axes[0][np.flatnonzero(body.any(axis=1))]))
    curve = 0.0007 * (x - centre_x) ** 2
    if prone:
        top = grid.axes[1][rows[-1]] + gap
        depth = (y - top) - curve  # distance into the couch, mm
    else:
        top = grid.axes[1][rows[0]] - gap
        depth = (top - y) - curve
    thickness = rng.uniform(35.0, 50.0)
    pixel = float(grid.spacing[1])
    shell = 2.5

    def slab(lo: float, hi: float) -> np.ndarray:
        return np.clip((np.minimum(depth - lo, hi - depth)) / pixel + 0.5, 0.0, 1.0)

    wide = np.abs(x - centre_x) < 240.0
    hu = ((250.0 - AIR_HU) * (slab(0, shell) + slab(thickness - shell, thickness))
          + (-850.0 - AIR_HU) * slab(shell, thickness - shell)) * wide
    air = volume <= AIR_HU + 1.0
    volume += (hu[:, :, None] * air).astype(np.float32)
    return {"couch_top_y_mm": float(top), "couch_thickness_mm": float(thickness)}


def generate_study(spec=None, study_id: int = 0) -> SyntheticCase:
    """Generate one CT of the multi-site cohort, deterministically from its spec.

    The study's patient, site, position, contrast phase and lesions come from
    :func:`training.cohort_design.build_design`; everything continuous about the
    image (pose, deformation, field of view, noise) from
    ``numpy.random.default_rng([seed, study_id])`` streams, so any CT is
    regenerated bit for bit from (spec, study id). A patient's anatomy (real scan
    deformed and possibly mirrored, or a parametric phantom) and elastic field
    are the same in all of their CTs; pose and acquisition vary.

    Args:
        spec: A :class:`training.cohort_design.CohortSpec` (default: seed 0, the
            study's size).
        study_id: Index of the CT in the design.

    Returns:
        The case. ``label``, ``true_risk`` and ``lesion`` are set for the sides
        that are cases of this CT; a side that is not a case (no metastasis, or
        an implant) has label 0, lesion None and ``true_risk`` 0.
        ``params["design"]`` holds the study's manifest rows.

    Raises:
        IndexError: If ``study_id`` is outside the design.
    """
    cd = design_module()
    spec = spec or cd.CohortSpec()
    design = cd.build_design(spec)
    study = design.studies[study_id]
    patient = design.patients[study.patient_id]
    hospital = cd.HOSPITAL_BY_NAME[study.site]
    base, mirrored = _anatomy_base(design, patient)
    arng = np.random.default_rng([spec.seed, 0xA2, patient.patient_id])
    rng = np.random.default_rng([spec.seed, 0x57, study_id])
    params: dict = {"study_id": study_id, "patient": patient.pseudo_id,
                    "anatomy": patient.anatomy.kind, "position": study.position,
                    "contrast_phase": study.contrast_phase}

    # Patient-level shape, study-level pose.
    scale = patient.anatomy.scale * arng.uniform(0.97, 1.03, 3)
    if patient.anatomy.kind == "phantom":
        scale = scale / patient.anatomy.scale  # the phantom is built at its size
    coeffs = arng.normal(0.0, arng.uniform(1.0, 3.0), (3, 6, 5, 7))
    rotation, angles = _random_rotation(rng, 4.0)
    flip = np.diag([-1.0 if mirrored else 1.0, 1.0, 1.0])
    translation = np.r_[rng.uniform(-25.0, 25.0, 2), rng.uniform(-60.0, 60.0)]
    centre = np.r_[base.mid_x_mm, base.head_mm["right"][1:]]
    spacing = np.diag(base.affine)[:3]
    lo = base.affine[:3, 3]
    hi = lo + spacing * (np.array(base.volume_hu.shape) - 1)
    tf = _Transform(rotation @ np.diag(scale) @ flip, centre, translation, coeffs, lo, hi)
    params.update(rotation_deg=angles, scale=scale.tolist(),
                  translation_mm=translation.tolist(), mirrored=mirrored)

    side_of = {s: (_other(s) if mirrored else s) for s in SIDES}
    points = {}
    for name, table in (("aiis", base.aiis_mm), ("head", base.head_mm),
                        ("troch", base.troch_mm), ("shaft", base.shaft_mm)):
        points[name] = {side_of[s]: tf.forward(table[s]) for s in SIDES}
    if base.lt_mm is not None:
        points["lt"] = {side_of[s]: tf.forward(base.lt_mm[s]) for s in SIDES}
    else:  # the real base's lesser trochanter bump, 38 mm below the scan's end
        points["lt"] = {s: points["troch"][s] + _unit(points["shaft"][s]
                                                      - points["troch"][s]) * 38.0
                        for s in SIDES}

    # Deform, bone density (real anatomy; the phantom is built with it), blur.
    volume_d, femur_d, affine_d, z_full = _warp_base(base, tf, pad=8)
    if patient.anatomy.kind == "real":
        bone = volume_d > _BONE_HU
        factor = 0.55 + 0.45 * patient.bone_density
        volume_d[bone] = _BONE_HU + (volume_d[bone] - _BONE_HU) * factor
    sigma_z = np.sqrt(max(hospital.slice_thickness_mm**2 - spacing[2] ** 2, 0.0))
    sigma_z = sigma_z / 2.355 / spacing[2]
    if sigma_z > 0.05:
        volume_d = ndi.gaussian_filter1d(volume_d, sigma_z, axis=2)
    sharp = hospital.kernel_sharpness * rng.uniform(0.85, 1.15)
    blurred = ndi.gaussian_filter(volume_d, (1.0, 1.0, 0.0))
    volume_d = blurred + (volume_d - blurred) * (0.4 + 1.2 * sharp)

    # Output grid.
    pixel, dz = hospital.pixel_mm, hospital.slice_spacing_mm
    fov = rng.uniform(*hospital.fov_mm)
    body_centre = np.r_[centre[0], lo[1] + spacing[1] * base.volume_hu.shape[1] / 2.0]
    fov_centre = body_centre + translation[:2] + rng.normal(0.0, 8.0, 2)
    # Scanners centre the field so that the couch under the patient is in view.
    body_rows = np.flatnonzero((volume_d > -500.0).any(axis=(0, 2)))
    body_y = affine_d[1, 3] + translation[1] + affine_d[1, 1] * body_rows[[0, -1]]
    couch_side = rng.uniform(25.0, 45.0)
    if study.position.endswith("P"):
        fov_centre[1] = min(body_y[1] + couch_side - fov / 2.0, body_y[0] - 5.0 + fov / 2.0)
    else:
        fov_centre[1] = max(body_y[0] - couch_side + fov / 2.0, body_y[1] + 5.0 - fov / 2.0)
    head_z = min(h[2] for h in points["head"].values())
    aiis_z = max(p[2] for p in points["aiis"].values())
    z_bottom = max(head_z - rng.uniform(70.0, 125.0), z_full[0] + translation[2])
    z_top = min(aiis_z + rng.uniform(60.0, 200.0), z_full[1] + translation[2])
    n_xy = int(round(fov / pixel))
    n_z = int(np.floor((z_top - z_bottom) / dz)) + 1
    origin = np.r_[fov_centre - pixel * (n_xy - 1) / 2.0, z_bottom]
    out_spacing = np.array([pixel, pixel, dz])
    axes = [origin[a] + out_spacing[a] * np.arange((n_xy, n_xy, n_z)[a]) for a in range(3)]
    grid = _Grid(axes, out_spacing)
    shifted = affine_d.copy()
    shifted[:3, 3] += translation
    volume = _resample_grid(volume_d, shifted, axes, AIR_HU, 1).astype(np.float32)
    femur_src = _resample_grid(femur_d, shifted, axes, 0, 0)
    femur_mask = np.zeros(volume.shape, dtype=np.uint8)
    femur_mask[femur_src == 1] = 1 if side_of["left"] == "left" else 2
    femur_mask[femur_src == 2] = 2 if side_of["right"] == "right" else 1
    params.update(fov_mm=fov, table=_add_table(volume, grid, study.position.endswith("P"),
                                               rng))

    # Lesions of the design, then the old implant.
    lesion_mask = np.zeros(volume.shape, dtype=np.uint8)
    lesions: dict[str, LesionParams | None] = {s: None for s in SIDES}
    design_lesions = {}
    for side in SIDES:
        state = design.lesion_at(study_id, side)
        if state is None:
            continue
        value = 1 if side == "left" else 2
        c, axis = _place_lesion(state, points["head"][side], points["troch"][side],
                                points["shaft"][side], points["lt"][side])
        draft = _render_design_lesion(grid, femur_mask == value, state, c, axis)
        if draft is None:
            logger.warning("study %d %s: lesion outside the field", study_id, side)
            continue
        _apply_lesion(volume, lesion_mask, draft, value)
        lesions[side] = draft.params
        design_lesions[side] = asdict(state)
    implants = {s: s == patient.prior_implant_side for s in SIDES}
    implant_params = {}
    if patient.prior_implant_side:
        side = patient.prior_implant_side
        irng = np.random.default_rng([spec.seed, 0x1B, patient.patient_id])
        implant_params[side] = _add_implant(
            irng, volume, grid, points["head"][side], points["troch"][side],
            points["shaft"][side], 1.0 if side == "right" else -1.0)
    params.update(implants=implant_params, design_lesion=design_lesions)

    # Calibration offset and correlated noise.
    hu_offset = hospital.hu_offset + rng.uniform(-5.0, 5.0)
    noise_sd = hospital.noise_hu * rng.uniform(0.8, 1.2)
    noise = ndi.gaussian_filter(rng.standard_normal(volume.shape, dtype=np.float32),
                                (0.7, 0.7, 0.0))
    noise *= noise_sd / max(float(noise.std()), 1e-6)
    volume += noise + hu_offset
    np.clip(volume, -1024.0, 3071.0, out=volume)
    params.update(hu_offset=hu_offset, noise_sd_hu=noise_sd)

    affine = np.diag([*out_spacing, 1.0])
    affine[:3, 3] = origin
    image = nib.Nifti1Image(volume, affine)
    image.header.set_xyzt_units("mm")
    image.set_sform(affine, code=1)
    image.set_qform(affine, code=1)
    rows = [cd.case_row(design, design.cases[i])
            for i in design.cases_by_study.get(study_id, [])]
    params["design"] = rows
    by_side = {row["side"]: row for row in rows}

    def as_tuple(p):
        return tuple(float(v) for v in p)

    return SyntheticCase(
        case_id=study_id, seed=spec.seed, image=image,
        aiis_world_mm={s: as_tuple(points["aiis"][s]) for s in SIDES},
        femoral_head_world_mm={s: as_tuple(points["head"][s]) for s in SIDES},
        lesion=lesions,
        label={s: int(by_side[s]["label"]) if s in by_side else 0 for s in SIDES},
        true_risk={s: float(by_side[s]["true_risk"]) if s in by_side else 0.0
                   for s in SIDES},
        implant=implants, lesion_mask=lesion_mask, site=study.site, mirrored=mirrored,
        params=params, femur_mask=femur_mask,
    )


# --- Writing --------------------------------------------------------------------------


def _balls(shape, affine, centres, radius_mm: float) -> np.ndarray:
    inverse = np.linalg.inv(affine)
    spacing = np.sqrt((affine[:3, :3] ** 2).sum(axis=0))
    out = np.zeros(shape, dtype=bool)
    for centre in centres:
        ijk = nib.affines.apply_affine(inverse, np.asarray(centre, dtype=float))
        grid = _Grid([np.arange(n) * spacing[a] for a, n in enumerate(shape)], spacing)
        box = grid.box(ijk * spacing, radius_mm)
        coords = np.meshgrid(*[(np.arange(box[a].start, box[a].stop) - ijk[a]) * spacing[a]
                               for a in range(3)], indexing="ij")
        out[box] |= sum(c**2 for c in coords) <= radius_mm**2
    return out


def truth_dict(case: SyntheticCase) -> dict:
    """The case's truth as a JSON-serialisable dict."""
    return {
        "case_id": case.case_id, "seed": case.seed, "site": case.site,
        "mirrored": case.mirrored,
        "shape": list(case.image.shape), "affine": case.image.affine.tolist(),
        "aiis_world_mm": case.aiis_world_mm,
        "femoral_head_world_mm": case.femoral_head_world_mm,
        "lesion": {s: (asdict(v) if v else None) for s, v in case.lesion.items()},
        "label": case.label, "true_risk": case.true_risk, "implant": case.implant,
        "lesion_mask_values": {"left": 1, "right": 2},
        "landmark_label_values": {"aiis": 1, "femoral_head": 2},
        "params": case.params,
    }


def write_nifti(case: SyntheticCase, folder: str | Path) -> Path:
    """Write image, truth masks and truth JSON of a case into ``folder``.

    Files: ``image.nii.gz`` (float32 HU), ``landmarks.nii.gz`` (uint8, 1 = AIIS
    balls, 2 = femoral head balls, radii of :mod:`femurrisk.geometry`),
    ``lesions.nii.gz`` (uint8, 1 = left, 2 = right) and ``truth.json``.

    Args:
        case: The case.
        folder: Output folder, created if needed.

    Returns:
        The folder.

    Raises:
        OSError: If the folder cannot be written.
    """
    from femurrisk import geometry as g

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    shape, affine = case.image.shape, case.image.affine
    landmarks = np.zeros(shape, dtype=np.uint8)
    landmarks[_balls(shape, affine, case.femoral_head_world_mm.values(),
                     g.FEMORAL_HEAD_LABEL_RADIUS_MM)] = g.LABEL_FEMORAL_HEAD
    landmarks[_balls(shape, affine, case.aiis_world_mm.values(),
                     g.AIIS_LABEL_RADIUS_MM)] = g.LABEL_AIIS
    nib.save(case.image, folder / "image.nii.gz")
    nib.save(nib.Nifti1Image(landmarks, affine), folder / "landmarks.nii.gz")
    nib.save(nib.Nifti1Image(case.lesion_mask, affine), folder / "lesions.nii.gz")
    with open(folder / "truth.json", "w") as handle:
        json.dump(truth_dict(case), handle, indent=2)
    return folder


# --- Contact sheet and command line ---------------------------------------------------


def _views(volume, affine, aiis_mm, head_mm):
    """Coronal through the heads and axial at head, AIIS and 60 mm below the AIIS."""
    inverse = np.linalg.inv(affine)
    head = np.mean([nib.affines.apply_affine(inverse, p) for p in head_mm.values()], 0)
    aiis = np.mean([nib.affines.apply_affine(inverse, p) for p in aiis_mm.values()], 0)
    dz = affine[2, 2]
    levels = [head[2], aiis[2], aiis[2] - 60.0 / dz]
    coronal = volume[:, int(round(head[1])), :]
    axials = [volume[:, :, int(np.clip(round(k), 0, volume.shape[2] - 1))]
              if 0 <= round(k) < volume.shape[2] else None for k in levels]
    return coronal, axials, affine[2, 2] / affine[0, 0]


def render_contact_sheet(path: str | Path, seed: int = 0,
                         case_ids: tuple[int, ...] = (0, 2, 3, 4),
                         study_ids: tuple[int, ...] | None = None) -> Path:
    """Save a PNG of the real scan beside generated cases (bone-ish window).

    Args:
        path: PNG to write.
        seed: Cohort seed.
        case_ids: Cases of the first version's cohort to show, one row each.
        study_ids: If given, CTs of the multi-site cohort (seed ``seed``, the
            study's size) instead of ``case_ids``.

    Returns:
        The path.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    real = nib.as_closest_canonical(nib.load(_real_ct_path()))
    rows = [("real scan (implant left)", np.asarray(real.dataobj, dtype=np.float32),
             real.affine,
             {s: nib.affines.apply_affine(real.affine, REAL_AIIS_VOXEL[s]) for s in SIDES},
             {s: nib.affines.apply_affine(real.affine, REAL_HEAD_VOXEL[s]) for s in SIDES},
             None)]
    spec = design_module().CohortSpec(seed=seed)
    for case_id in (study_ids if study_ids is not None else case_ids):
        if study_ids is not None:
            case = generate_study(spec, case_id)
        else:
            case = generate_case(seed, case_id)
        lesions = ", ".join(f"{s[0].upper()}:{case.lesion[s].kind[:5]}" if case.lesion[s]
                            else f"{s[0].upper()}:-" for s in SIDES)
        kind = (f" {case.params['anatomy']} {case.params['position']}"
                if study_ids is not None else "")
        title = (f"case {case_id} site {case.site}{kind}"
                 f"{' mirrored' if case.mirrored else ''}"
                 f" | {lesions} | label L{case.label['left']} R{case.label['right']}"
                 f"{' | implant' if any(case.implant.values()) else ''}")
        rows.append((title, np.asarray(case.image.dataobj), case.image.affine,
                     case.aiis_world_mm, case.femoral_head_world_mm, case.lesion_mask))

    fig, axes = plt.subplots(len(rows), 4, figsize=(10, 2.6 * len(rows)),
                             gridspec_kw={"width_ratios": [1.3, 1, 1, 1]})
    names = ["coronal through heads", "axial at heads", "axial at AIIS",
             "axial AIIS - 60 mm"]
    for row, (title, volume, affine, aiis, heads, lesion_mask) in zip(axes, rows):
        coronal, axials, aspect = _views(volume, affine, aiis, heads)
        row[0].imshow(coronal.T, origin="lower", cmap="gray", vmin=-250, vmax=1250,
                      aspect=aspect)
        row[0].set_ylabel(title, fontsize=6)
        for ax, image, name in zip(row[1:], axials, names[1:]):
            if image is not None:
                ax.imshow(image.T, origin="lower", cmap="gray", vmin=-250, vmax=1250)
            ax.set_title(name, fontsize=6)
        row[0].set_title(names[0], fontsize=6)
        for ax in row:
            ax.set_xticks([])
            ax.set_yticks([])
    fig.suptitle("femurrisk synthetic cohort beside the real scan (window -250..1250 HU;"
                 " image left = patient's left, anterior up)", fontsize=7)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    from PIL import Image

    Image.open(path).convert("L").save(path, optimize=True)  # grey PNG: smaller file
    return path


def manifest_rows(case: SyntheticCase) -> list[dict]:
    """Manifest rows of a :func:`generate_study` case: the design's fields plus
    landmark and lesion positions in world mm and voxels (i, j, k) of the image."""
    inverse = np.linalg.inv(case.image.affine)
    rows = []
    for row in case.params.get("design", []):
        row = dict(row)
        side = row["side"]
        points = {"aiis": case.aiis_world_mm[side],
                  "head": case.femoral_head_world_mm[side]}
        lesion = case.lesion[side]
        if lesion is not None:
            points["lesion_centre"] = lesion.centre_world_mm
            row["lesion_volume_image_mm3"] = lesion.volume_mm3
        for name, world in points.items():
            voxel = nib.affines.apply_affine(inverse, np.asarray(world, dtype=float))
            for axis, w, v in zip("xyz", world, voxel):
                row[f"{name}_world_{axis}_mm"] = round(float(w), 3)
            for axis, v in zip("ijk", voxel):
                row[f"{name}_voxel_{axis}"] = round(float(v), 3)
        row["shape"] = "x".join(str(n) for n in case.image.shape)
        row["spacing_mm"] = "x".join(f"{v:g}" for v in np.diag(case.image.affine)[:3])
        rows.append(row)
    return rows


def write_study(case: SyntheticCase, folder: str | Path, *, dicom: bool = True) -> Path:
    """Write a :func:`generate_study` case as NIfTI (image and truth masks) and DICOM.

    Files: those of :func:`write_nifti`, ``femur.nii.gz`` (uint8, 1 = left femur,
    2 = right femur) and ``dicom/`` (one file per slice, written as the case's
    hospital and patient position would, see :mod:`training.dicom_writer`).

    Args:
        case: The case.
        folder: Output folder.
        dicom: Also write the DICOM series.

    Returns:
        The folder.

    Raises:
        OSError: If the folder cannot be written.
    """
    from training import dicom_writer

    cd = design_module()
    folder = write_nifti(case, folder)
    if case.femur_mask is not None:
        nib.save(nib.Nifti1Image(case.femur_mask, case.image.affine),
                 folder / "femur.nii.gz")
    if dicom:
        spec = cd.CohortSpec(seed=case.seed)
        hospital = cd.HOSPITAL_BY_NAME[case.site]
        rows = case.params.get("design") or [{}]
        dicom_writer.write_dicom_series(
            case.image, folder / "dicom", position=case.params.get("position", "HFS"),
            patient_id=case.params.get("patient", f"FR-SYN-{spec.seed:03d}-00000"),
            study_key=f"{case.seed}/{case.case_id}", day=float(rows[0].get("day", 0.0)),
            site=case.site, manufacturer=hospital.manufacturer,
            kernel=hospital.kernel.upper(), slice_thickness_mm=hospital.slice_thickness_mm,
            contrast_phase=case.params.get("contrast_phase", "none"),
            sex=rows[0].get("sex", "O"), age_years=rows[0].get("age"),
        )
    return folder


def _study_job(job: tuple) -> tuple[int, list[dict], float]:
    """Worker: generate one study, optionally write it; returns its manifest rows."""
    import time

    spec, study_id, out, write_files, dicom = job
    start = time.perf_counter()
    case = generate_study(spec, study_id)
    seconds = time.perf_counter() - start
    if write_files:
        write_study(case, Path(out) / "studies" / f"study_{study_id:06d}", dicom=dicom)
    return study_id, manifest_rows(case), seconds


def _write_csv(path: Path, rows: list[dict]) -> None:
    import csv

    fields: list[str] = []
    for row in rows:
        fields.extend(k for k in row if k not in fields)
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)


def main(argv: list[str] | None = None) -> None:
    """Command line of the synthetic cohort.

    ``python -m training.cohort --design --out DIR`` writes the design
    (``design.csv``: one row per side, no images needed) and the study splits;
    ``--generate N`` streams N CTs (all with ``--generate -1``) through
    ``--workers`` processes and writes ``manifest.csv`` with landmark positions;
    ``--write-dicom N`` also writes the first N of them as DICOM and NIfTI.
    ``--legacy-write N`` and ``--contact-sheet PNG`` keep the first version's
    single-scan cohort and the contact sheet.
    """
    import argparse
    import json as json_module
    from multiprocessing import get_context

    from tqdm import tqdm

    cd = design_module()
    parser = argparse.ArgumentParser(description="Synthetic femurrisk cohort.")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--scale", type=float, default=1.0,
                        help="multiplies the study's counts (1.0: 540 patients, 2,933 CTs)")
    parser.add_argument("--enrich", type=float, default=None,
                        help="target fraction of positive sides for small runs "
                             "(default: the study's 1.4 %%)")
    parser.add_argument("--design", action="store_true", help="write design.csv")
    parser.add_argument("--generate", type=int, default=0,
                        help="CTs to generate (-1: all)")
    parser.add_argument("--first-study", type=int, default=0)
    parser.add_argument("--write-dicom", type=int, default=0,
                        help="of the generated CTs, how many to write as DICOM + NIfTI")
    parser.add_argument("--no-dicom", action="store_true",
                        help="write NIfTI only for --write-dicom")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--out", type=Path, default=Path("out/cohort"))
    parser.add_argument("--legacy-write", "--write", type=int, default=0,
                        help="cases of the first version's cohort to write as NIfTI")
    parser.add_argument("--contact-sheet", type=Path, default=None)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO)

    spec = cd.CohortSpec(seed=args.seed, scale=args.scale, enrich=args.enrich)
    args.out.mkdir(parents=True, exist_ok=True)
    design = cd.build_design(spec)
    print(json_module.dumps(design.summary(), indent=1))
    if args.design:
        from training.splits import study_splits

        _write_csv(args.out / "design.csv",
                   [cd.case_row(design, case) for case in design.cases])
        splits = study_splits(design)
        (args.out / "splits.json").write_text(json_module.dumps(splits))
        print(f"wrote {args.out / 'design.csv'} and splits.json")

    count = len(design.studies) - args.first_study if args.generate < 0 else args.generate
    if count > 0:
        ids = range(args.first_study, min(args.first_study + count, len(design.studies)))
        jobs = [(spec, i, str(args.out), n < args.write_dicom, not args.no_dicom)
                for n, i in enumerate(ids)]
        rows: list[dict] = []
        seconds = 0.0
        if args.workers > 1:
            with get_context("spawn").Pool(args.workers) as pool:
                results = pool.imap(_study_job, jobs, chunksize=4)
                for _, study_rows, t in tqdm(results, total=len(jobs), desc="CTs"):
                    rows.extend(study_rows)
                    seconds += t
        else:
            for job in tqdm(jobs, desc="CTs"):
                _, study_rows, t = _study_job(job)
                rows.extend(study_rows)
                seconds += t
        _write_csv(args.out / "manifest.csv", rows)
        print(f"{len(jobs)} CTs, {len(rows)} sides, "
              f"{seconds / max(len(jobs), 1):.2f} s of generation per CT")

    for case_id in range(args.legacy_write):
        folder = write_nifti(generate_case(args.seed, case_id),
                             args.out / f"case_{case_id:06d}")
        logger.info("wrote %s", folder)
    if args.contact_sheet is not None:
        logger.info("wrote %s", render_contact_sheet(args.contact_sheet, args.seed))


if __name__ == "__main__":
    main()
