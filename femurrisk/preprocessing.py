"""Hounsfield volumes into the frames and value ranges the networks expect.

Every move into model space goes through world coordinates (the image affine), so a
result on any grid maps back to the input's world space with the affines alone.
"""

from __future__ import annotations

from collections.abc import Sequence

import nibabel as nib
import numpy as np
from nibabel.processing import resample_from_to, resample_to_output

from femurrisk.geometry import PAD_HU, WINDOW_LEVEL_HU, WINDOW_WIDTH_HU


def to_canonical(image: nib.Nifti1Image) -> nib.Nifti1Image:
    """Reorient to RAS+ by axis flips and permutations only (no interpolation)."""
    return nib.as_closest_canonical(image)


def resample(
    image: nib.Nifti1Image, spacing_mm: Sequence[float], *, order: int = 1
) -> nib.Nifti1Image:
    """Resample onto an axis-aligned RAS+ grid with the given (x, y, z) spacing, mm.

    Outside the input the volume is filled with air (:data:`PAD_HU`).
    """
    return resample_to_output(
        image, voxel_sizes=tuple(float(s) for s in spacing_mm), order=order, cval=PAD_HU
    )


def resample_to_grid(
    image: nib.Nifti1Image,
    shape: Sequence[int],
    affine: np.ndarray,
    *,
    order: int = 1,
    cval: float = PAD_HU,
) -> np.ndarray:
    """Sample ``image`` on the grid (``shape``, ``affine``), in world coordinates."""
    out = resample_from_to(image, (tuple(shape), affine), order=order, cval=cval)
    return np.asarray(out.dataobj, dtype=np.float32)


def bone_window(volume_hu: np.ndarray) -> np.ndarray:
    """Bone window of the study, level 500 HU and width 2000 HU, scaled to 0-255.

    HU at or below -500 map to 0, at or above 1500 to 255, linearly between.
    """
    low = WINDOW_LEVEL_HU - WINDOW_WIDTH_HU / 2.0
    scaled = (np.asarray(volume_hu, dtype=np.float32) - low) / WINDOW_WIDTH_HU * 255.0
    return np.clip(scaled, 0.0, 255.0).astype(np.float32)


def voxel_to_world(affine: np.ndarray, ijk: Sequence[float]) -> np.ndarray:
    """World (RAS+ mm) position of a voxel index."""
    return nib.affines.apply_affine(affine, np.asarray(ijk, dtype=float))


def world_to_voxel(affine: np.ndarray, xyz: Sequence[float]) -> np.ndarray:
    """Continuous voxel index of a world (RAS+ mm) position."""
    return nib.affines.apply_affine(np.linalg.inv(affine), np.asarray(xyz, dtype=float))
