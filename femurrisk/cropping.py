"""Per-side crops: 32 axial slices from the AIIS level caudally, around each femur.

Geometry (all in :mod:`femurrisk.geometry`): slices every 3 mm, 64 x 64 pixels of 2 mm,
centred 20 mm lateral of the femoral head centre. The crop grid is axis-aligned in
RAS+, so its affine is exact world geometry and its NIfTI opens correctly in any viewer.
Within the crop, z index 31 is the landmark slice and index 0 lies 93 mm caudal of it.
"""

from __future__ import annotations

from dataclasses import dataclass

import nibabel as nib
import numpy as np

from femurrisk import geometry as g
from femurrisk.preprocessing import resample_to_grid, world_to_voxel


@dataclass
class Crop:
    """One side's crop in Hounsfield units with its world affine."""

    side: str
    volume_hu: np.ndarray  # (x, y, z) = CROP_SHAPE
    affine: np.ndarray  # voxel -> RAS+ mm
    padded_slices: int


def crop_affine(side: str, femoral_head_mm: np.ndarray, landmark_z_mm: float) -> np.ndarray:
    """Voxel-to-world affine of one side's crop.

    Args:
        side: ``"left"`` or ``"right"`` (patient terms). Lateral is -x on the left and
            +x on the right in RAS+.
        femoral_head_mm: Femoral head centre (x, y, z), world mm.
        landmark_z_mm: World z of the AIIS landmark, the crop's most cranial slice.
    """
    if side not in ("left", "right"):
        raise ValueError(f"side must be 'left' or 'right', not {side!r}")
    lateral = -1.0 if side == "left" else 1.0
    centre_x = float(femoral_head_mm[0]) + lateral * g.CROP_LATERAL_SHIFT_MM
    centre_y = float(femoral_head_mm[1])
    half = (g.CROP_PIXELS - 1) / 2.0 * g.CROP_PIXEL_MM
    affine = np.diag([g.CROP_PIXEL_MM, g.CROP_PIXEL_MM, g.CROP_SLICE_SPACING_MM, 1.0])
    affine[:3, 3] = (
        centre_x - half,
        centre_y - half,
        landmark_z_mm - (g.CROP_SLICES - 1) * g.CROP_SLICE_SPACING_MM,
    )
    return affine


def count_padded_slices(image: nib.Nifti1Image, affine: np.ndarray) -> int:
    """Crop slices whose centre lies beyond the scan's cranio-caudal extent."""
    corners = np.array(
        [[i, j, k] for i in (0, image.shape[0] - 1) for j in (0, image.shape[1] - 1)
         for k in (0, image.shape[2] - 1)], dtype=float,
    )
    z_world = nib.affines.apply_affine(image.affine, corners)[:, 2]
    z_min, z_max = z_world.min(), z_world.max()
    # Half a source slice of tolerance at each end.
    half_slice = abs(image.affine[2, :3]).max() / 2.0
    slice_z = affine[2, 3] + affine[2, 2] * np.arange(g.CROP_SLICES)
    outside = (slice_z < z_min - half_slice) | (slice_z > z_max + half_slice)
    return int(outside.sum())


def side_crop(
    image: nib.Nifti1Image, side: str, femoral_head_mm: np.ndarray, landmark_z_mm: float
) -> Crop:
    """Sample one side's crop from a Hounsfield image (any orientation, any spacing)."""
    affine = crop_affine(side, femoral_head_mm, landmark_z_mm)
    volume = resample_to_grid(image, g.CROP_SHAPE, affine, order=1, cval=g.PAD_HU)
    return Crop(side, volume, affine, count_padded_slices(image, affine))


def metal_volume_mm3(crop: Crop) -> float:
    """Volume of metal (above :data:`METAL_HU`) in a crop, mm^3."""
    voxel_mm3 = abs(np.linalg.det(crop.affine[:3, :3]))
    return float((crop.volume_hu > g.METAL_HU).sum() * voxel_mm3)


def to_network_orientation(volume: np.ndarray, side: str) -> np.ndarray:
    """Present both sides alike: the right crop is mirrored in x, so medial is at high x.

    After this, every crop looks like a patient-left femur: lateral at low x, medial at
    high x. The same function undoes itself (mirroring twice is the identity).
    """
    return volume[::-1].copy() if side == "right" else volume


def world_point_in_crop(crop: Crop, xyz_mm: np.ndarray) -> np.ndarray:
    """Continuous crop voxel index of a world point (for tests and overlays)."""
    return world_to_voxel(crop.affine, xyz_mm)
