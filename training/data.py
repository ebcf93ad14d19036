"""Training samples made by the same femurrisk code the app runs (one implementation).

Landmark samples: the scan on the landmark grid (:func:`femurrisk.landmark.landmark_input`)
with a label volume painted from the cohort's truth: a ball of
:data:`AIIS_LABEL_RADIUS_MM` around each AIIS point and of
:data:`FEMORAL_HEAD_LABEL_RADIUS_MM` around each femoral head centre.

Classifier samples: :func:`femurrisk.cropping.side_crop` at the true landmark level and
head centres, optionally jittered by a landmark error the U-Net can make, then
:func:`femurrisk.classification.network_input`. Sides carrying an implant are left out,
because the product does not score them.
"""

from __future__ import annotations

from dataclasses import dataclass

import nibabel as nib
import numpy as np

from femurrisk import geometry as g
from femurrisk.classification import network_input
from femurrisk.cropping import metal_volume_mm3, side_crop
from femurrisk.landmark import landmark_input

SIDES = ("left", "right")


def paint_balls(shape, affine, centres_mm, radius_mm: float, value: int, out: np.ndarray) -> None:
    """Set ``out`` to ``value`` inside balls of ``radius_mm`` around world points."""
    inverse = np.linalg.inv(affine)
    spacing = np.sqrt((affine[:3, :3] ** 2).sum(axis=0))
    grid = np.indices(shape, dtype=np.float32)
    for centre in centres_mm:
        ijk = nib.affines.apply_affine(inverse, np.asarray(centre, dtype=float))
        distance2 = sum(((grid[a] - ijk[a]) * spacing[a]) ** 2 for a in range(3))
        out[distance2 <= radius_mm**2] = value


def landmark_sample(case) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Input (x, y, z) float16 0-1, labels (x, y, z) uint8 and the grid's affine."""
    net_in = landmark_input(case.image)
    shape, affine = net_in.shape, net_in.affine
    labels = np.zeros(shape, dtype=np.uint8)
    paint_balls(shape, affine, list(case.femoral_head_world_mm.values()),
                g.FEMORAL_HEAD_LABEL_RADIUS_MM, g.LABEL_FEMORAL_HEAD, labels)
    paint_balls(shape, affine, list(case.aiis_world_mm.values()),
                g.AIIS_LABEL_RADIUS_MM, g.LABEL_AIIS, labels)
    return np.asarray(net_in.dataobj, dtype=np.float16), labels, affine


def landmark_level_mm(case) -> float:
    """The true landmark level: mean z of the two AIIS points."""
    return float(np.mean([p[2] for p in case.aiis_world_mm.values()]))


@dataclass
class CropSample:
    side: str
    input_u8: np.ndarray  # (64, 64, 32) network input rounded to uint8
    label: int
    true_risk: float
    implant: bool


def classifier_samples(case, rng: np.random.Generator | None = None,
                       jitter_slices: float = 1.0, jitter_mm: float = 4.0) -> list[CropSample]:
    """Both sides' network inputs; landmark level and head centres jittered by ``rng``.

    The jitter (uniform, up to ``jitter_slices`` crop slices in z and ``jitter_mm``
    in-plane) teaches the classifier to tolerate the landmark network's error.
    """
    z_mm = landmark_level_mm(case)
    samples = []
    for side in SIDES:
        head = np.asarray(case.femoral_head_world_mm[side], dtype=float)
        z = z_mm
        if rng is not None:
            head = head + np.r_[rng.uniform(-jitter_mm, jitter_mm, 2), 0.0]
            z = z_mm + rng.uniform(-jitter_slices, jitter_slices) * g.CROP_SLICE_SPACING_MM
        crop = side_crop(case.image, side, head, z)
        implant = bool(case.implant[side]) or metal_volume_mm3(crop) >= g.METAL_MIN_VOLUME_MM3
        windowed = network_input(crop.volume_hu, side)
        samples.append(CropSample(
            side, np.round(windowed).astype(np.uint8), int(case.label[side]),
            float(case.true_risk[side]), implant,
        ))
    return samples


# --- Splits ---------------------------------------------------------------------------


def assign_splits(patient_ids: np.ndarray, sites: np.ndarray, labels: np.ndarray,
                  train_site: str | None, val_fraction: float, seed: int) -> np.ndarray:
    """Split rows into ``"train"``, ``"validation"`` and ``"test"`` by patient.

    The study's protocol: train on one hospital (``train_site``), take the internal
    validation from that hospital's patients, test on every other hospital. Without
    ``train_site`` all rows are split into training and validation only. Every row of
    a patient lands in one split.

    This is the local stand-in for the cohort's own split helpers; it takes patient
    and site per row, so a table from a real cohort works unchanged.

    Raises:
        ValueError: If ``train_site`` has no rows, or a patient appears at two sites.
    """
    patient_ids, sites = np.asarray(patient_ids), np.asarray(sites).astype(str)
    split = np.full(len(patient_ids), "test", dtype=object)
    at_site = np.ones(len(patient_ids), bool) if train_site is None else sites == train_site
    if not at_site.any():
        raise ValueError(f"train_site must be one of {sorted(set(sites))}, got {train_site!r}")
    crossing = set(patient_ids[at_site]) & set(patient_ids[~at_site])
    if crossing:
        raise ValueError(f"patients must belong to one site, got {len(crossing)} at two")
    rng = np.random.default_rng(seed)
    val_patients = []
    # Stratified: patients with and without a positive side are drawn separately, so
    # that the few positives of one hospital reach both training and validation.
    positive = set(patient_ids[at_site & (np.asarray(labels) == 1)])
    for stratum in (True, False):
        group = np.array(sorted(p for p in set(patient_ids[at_site])
                                if (p in positive) == stratum))
        if len(group):
            n_val = max(1, int(round(val_fraction * len(group))))
            val_patients += list(rng.choice(group, size=n_val, replace=False))
    split[at_site] = np.where(np.isin(patient_ids[at_site], val_patients),
                              "validation", "train")
    return split.astype(str)
