"""The AIIS landmark and the femoral head centres, found by a MONAI 3D U-Net.

The network sees the whole scan resampled to :data:`LANDMARK_SPACING_MM` in the bone
window scaled to 0-1, and labels each voxel background, AIIS or femoral head. The two
largest femoral-head blobs give the head centres; the midline between them splits the
AIIS label into the patient's left (smaller RAS x) and right. The landmark level is the
mean cranio-caudal position of the two AIIS centres.
"""

from __future__ import annotations

import logging

import nibabel as nib
import numpy as np
import torch
from monai.inferers import sliding_window_inference
from scipy import ndimage

from femurrisk import geometry as g
from femurrisk import registry
from femurrisk.errors import InputError
from femurrisk.prediction import Landmarks
from femurrisk.preprocessing import bone_window, resample, voxel_to_world, world_to_voxel

logger = logging.getLogger(__name__)

#: Smallest femoral head blob accepted, mm^3 (a 15 mm ball is 14,000 mm^3; a third of
#: it survives even a poor segmentation, while noise blobs stay far smaller).
MIN_HEAD_VOLUME_MM3 = 2000.0

#: Expected height of the AIIS above the femoral head centre, mm. Outside this range
#: the landmark is reported with a warning.
AIIS_ABOVE_HEAD_MM = (5.0, 80.0)

#: Plausible distance between the two femoral head centres, mm. Adults measure about
#: 150-210 mm; the range is wide for children and very large patients. Blobs farther
#: apart or closer together are not a pair of hips (e.g. a scan without the pelvis).
HEAD_DISTANCE_MM = (100.0, 300.0)

#: Soft tissue must reach at least this far lateral of each femoral head centre, mm.
#: The greater trochanter alone lies 50-70 mm lateral of it, with muscle and fat beyond,
#: so a pair of "heads" without this margin is not a pair of hips (e.g. in a skull).
MIN_LATERAL_TISSUE_MM = 50.0

#: Tissue (not air) for the lateral margin check, HU.
BODY_HU = -400.0

#: An AIIS more than this far from its own side's femoral head centre is not accepted;
#: in adults it lies about 40-70 mm cranial, anterior and lateral of it.
AIIS_MAX_DISTANCE_FROM_HEAD_MM = 110.0


def landmark_input(image: nib.Nifti1Image) -> nib.Nifti1Image:
    """The scan on the landmark grid, bone window scaled to 0-1 (float32)."""
    coarse = resample(image, g.LANDMARK_SPACING_MM, order=1)
    scaled = bone_window(np.asarray(coarse.dataobj)) / 255.0
    return nib.Nifti1Image(scaled.astype(np.float32), coarse.affine)


class LandmarkFinder:
    """Loads the landmark U-Net once; :meth:`find` locates landmarks in a scan."""

    def __init__(self, device: torch.device, weights=None) -> None:
        self.device = device
        self.model = registry.build_landmark_unet()
        self.metadata = registry.load_weights(
            self.model, weights or registry.landmark_weights_path()
        )
        self.model.to(device).eval()

    @torch.no_grad()
    def probabilities(self, image: nib.Nifti1Image) -> tuple[np.ndarray, np.ndarray]:
        """Softmax label probabilities (3, x, y, z) on the landmark grid and its affine."""
        net_in = landmark_input(image)
        x = torch.from_numpy(np.asarray(net_in.dataobj))[None, None].to(self.device)
        logits = sliding_window_inference(
            x, roi_size=g.LANDMARK_PATCH, sw_batch_size=2, predictor=self.model,
            overlap=0.25, mode="gaussian",
        )
        probs = torch.softmax(logits, dim=1)[0].cpu().numpy()
        return probs, net_in.affine

    def find(self, image: nib.Nifti1Image) -> tuple[Landmarks, list[str]]:
        """Landmarks of a Hounsfield image in world mm, with warnings.

        Raises:
            InputError: If no pair of hips or no AIIS is found (for example a scan
                without the pelvis in its field of view).
        """
        probs, affine = self.probabilities(image)
        landmarks, warnings = landmarks_from_probabilities(probs, affine, image)
        check_hips_in_body(image, landmarks)
        return landmarks, warnings


def _centroid_mm(weights: np.ndarray, affine: np.ndarray) -> np.ndarray:
    ijk = np.array(ndimage.center_of_mass(weights))
    return voxel_to_world(affine, ijk)


def _components(mask: np.ndarray, keep: int) -> list[np.ndarray]:
    """The ``keep`` largest connected components of a mask, largest first.

    Only those masks are built: a fragmented prediction can hold thousands of
    components, and one full-size mask each would exhaust memory.
    """
    labels, count = ndimage.label(mask)
    if count == 0:
        return []
    sizes = ndimage.sum_labels(mask, labels, index=np.arange(1, count + 1))
    order = np.argsort(sizes)[::-1][:keep]
    return [labels == (index + 1) for index in order]


def landmarks_from_probabilities(
    probs: np.ndarray, affine: np.ndarray, image: nib.Nifti1Image
) -> tuple[Landmarks, list[str]]:
    """Turn U-Net probabilities (3, x, y, z) into landmarks; see the module docstring."""
    warnings: list[str] = []
    labels = probs.argmax(axis=0)
    voxel_mm3 = abs(np.linalg.det(affine[:3, :3]))

    heads = [
        c for c in _components(labels == g.LABEL_FEMORAL_HEAD, keep=2)
        if c.sum() * voxel_mm3 >= MIN_HEAD_VOLUME_MM3
    ]
    if len(heads) < 2:
        raise InputError(
            "No pelvis with both hips found in the field of view: the scan must be an "
            "abdominopelvic CT that covers both hip joints, from above the iliac spines "
            f"to below the femoral heads, but {len(heads)} femoral head(s) were found."
        )
    centres = sorted(
        (_centroid_mm(probs[g.LABEL_FEMORAL_HEAD] * c, affine) for c in heads),
        key=lambda xyz: xyz[0],
    )
    head_mm = {"left": centres[0], "right": centres[1]}  # RAS: left has the smaller x
    midline_x = (centres[0][0] + centres[1][0]) / 2.0
    distance = float(np.linalg.norm(centres[1] - centres[0]))
    if not HEAD_DISTANCE_MM[0] <= distance <= HEAD_DISTANCE_MM[1]:
        raise InputError(
            "No pelvis with both hips found in the field of view: the scan must be an "
            "abdominopelvic CT that covers both hip joints; the two structures taken for "
            f"femoral heads lie {distance:.0f} mm apart, not "
            f"{HEAD_DISTANCE_MM[0]:.0f}-{HEAD_DISTANCE_MM[1]:.0f} mm as hips do."
        )

    aiis_mask = labels == g.LABEL_AIIS
    i_mid = world_to_voxel(affine, (midline_x, 0.0, 0.0))[0]
    index_x = np.arange(labels.shape[0])[:, None, None]
    # On an axis-aligned RAS+ grid, voxel index i grows with world x.
    sides = {"left": index_x < i_mid, "right": index_x >= i_mid}
    aiis_mm: dict[str, tuple[float, float, float] | None] = {}
    for side, half in sides.items():
        parts = _components(aiis_mask & half, keep=1)
        if not parts:
            aiis_mm[side] = None
            warnings.append(f"The {side} AIIS was not found; the landmark level uses the other side.")
            continue
        centre = _centroid_mm(probs[g.LABEL_AIIS] * parts[0], affine)
        if np.linalg.norm(centre - head_mm[side]) > AIIS_MAX_DISTANCE_FROM_HEAD_MM:
            aiis_mm[side] = None
            warnings.append(
                f"The {side} AIIS candidate lies too far from the {side} femoral head and "
                "was ignored; the landmark level uses the other side."
            )
            continue
        aiis_mm[side] = tuple(float(v) for v in centre)
    found = [v for v in aiis_mm.values() if v is not None]
    if not found:
        raise InputError(
            "The anterior inferior iliac spine (AIIS) was not found: the scan must cover "
            "the pelvis from above the iliac spines to below the femoral heads."
        )
    z_mm = float(np.mean([v[2] for v in found]))

    for side in ("left", "right"):
        height = z_mm - head_mm[side][2]
        if not AIIS_ABOVE_HEAD_MM[0] <= height <= AIIS_ABOVE_HEAD_MM[1]:
            warnings.append(
                f"The landmark lies {height:.0f} mm above the {side} femoral head centre; "
                f"{AIIS_ABOVE_HEAD_MM[0]:.0f}-{AIIS_ABOVE_HEAD_MM[1]:.0f} mm is expected. "
                "Check the landmark slice and set it by hand if it is wrong."
            )
    landmarks = Landmarks(
        world_z_mm=z_mm,
        slice_index=nearest_slice(image, z_mm),
        aiis_world_mm=aiis_mm,
        femoral_head_world_mm={s: tuple(float(v) for v in head_mm[s]) for s in head_mm},
        method="unet",
    )
    return landmarks, warnings


def check_hips_in_body(image: nib.Nifti1Image, landmarks: Landmarks) -> None:
    """Refuse femoral heads without a hip's worth of tissue lateral of them.

    Samples the Hounsfield image along the patient's left-right line through each head
    centre and measures how far tissue (above :data:`BODY_HU`) continues laterally.

    Raises:
        InputError: If either side has less than :data:`MIN_LATERAL_TISSUE_MM`.
    """
    data = np.asarray(image.dataobj, dtype=np.float32)
    inverse = np.linalg.inv(image.affine)
    step_mm = 2.0
    for side, lateral in (("left", -1.0), ("right", 1.0)):
        head = np.array(landmarks.femoral_head_world_mm[side], dtype=float)
        distances = np.arange(0.0, 300.0, step_mm)
        points = head[None, :] + np.outer(distances * lateral, (1.0, 0.0, 0.0))
        ijk = nib.affines.apply_affine(inverse, points).T
        values = ndimage.map_coordinates(data, ijk, order=0, cval=-1024.0)
        outside = np.nonzero(values < BODY_HU)[0]
        margin = distances[outside[0]] if len(outside) else distances[-1]
        if margin < MIN_LATERAL_TISSUE_MM:
            raise InputError(
                "No pelvis with both hips found in the field of view: the scan must be an "
                "abdominopelvic CT that covers both hip joints; the structure taken for "
                f"the {side} femoral head has only {margin:.0f} mm of tissue lateral of it, "
                f"not the {MIN_LATERAL_TISSUE_MM:.0f} mm or more of a hip."
            )


def nearest_slice(image: nib.Nifti1Image, z_mm: float) -> int:
    """Index along the image's most cranio-caudal voxel axis nearest to world z."""
    axis = int(np.argmax(np.abs(image.affine[2, :3])))
    centre = (np.array(image.shape[:3]) - 1) / 2.0
    probe = np.tile(centre, (image.shape[axis], 1))
    probe[:, axis] = np.arange(image.shape[axis])
    z_world = nib.affines.apply_affine(image.affine, probe)[:, 2]
    return int(np.argmin(np.abs(z_world - z_mm)))
