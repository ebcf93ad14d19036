"""One CT in, per-side fracture risk with Grad-CAM out.

Steps, each in its own module: loading -> canonical RAS+ frame -> landmark U-Net ->
per-side crops -> bone window -> classifier -> Grad-CAM. Models load once per
:class:`Predictor`; :meth:`Predictor.predict` is safe to call for many scans.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from contextlib import contextmanager

import nibabel as nib
import numpy as np

from femurrisk import __version__, registry
from femurrisk.classification import Classifier, network_input, to_batch
from femurrisk.cropping import metal_volume_mm3, side_crop, to_network_orientation
from femurrisk.errors import InputError
from femurrisk.explanation import (
    DEFAULT_METHOD, METHODS, NORMALIZATION_QUANTILE, explain, normalize_jointly,
)
from femurrisk.geometry import CROP_SLICES, METAL_MIN_VOLUME_MM3
from femurrisk.landmark import LandmarkFinder, nearest_slice
from femurrisk.loading import LoadedCT, load_ct
from femurrisk.prediction import (
    DECISION_HIGH, DECISION_IMPLANT, DECISION_LOW, DECISION_SHORT, SIDES, Landmarks,
    Prediction, SideResult,
)
from femurrisk.preprocessing import to_canonical

logger = logging.getLogger(__name__)

Progress = Callable[[float, str], None]


class Predictor:
    """Holds the landmark U-Net and the classifier, loaded once on one device."""

    def __init__(
        self, device: str | None = None, classifier: str = registry.DEFAULT_CLASSIFIER
    ) -> None:
        self.device = registry.choose_device(device)
        self.landmarks = LandmarkFinder(self.device)
        self.classifier = Classifier(self.device, classifier)
        logger.info("models loaded on %s (classifier %s)", self.device, classifier)

    def model_info(self) -> dict:
        meta = self.classifier.metadata
        return {
            "classifier": self.classifier.name,
            "classifier_weights_sha256": registry.sha256(self.classifier.weights_path),
            "landmark_weights_sha256": registry.sha256(registry.landmark_weights_path()),
            "threshold": self.classifier.threshold,
            "logit_offset": self.classifier.logit_offset,
            "trained_on": meta.get("trained_on", "unknown"),
            "research_demo": True,
            "femurrisk_version": __version__,
        }

    def predict(
        self, source, *, landmark_z_mm: float | None = None,
        progress: Progress | None = None, series_uid: str | None = None,
        method: str = DEFAULT_METHOD,
    ) -> Prediction:
        """Run the whole pipeline on a CT.

        Args:
            source: Whatever :func:`femurrisk.loading.load_ct` accepts, or a
                :class:`~femurrisk.loading.LoadedCT` already read.
            landmark_z_mm: World z (RAS+ mm) of the AIIS level set by hand; when given,
                the network's level is replaced and the result says so.
            progress: Optional callback ``(fraction, message)``.
            series_uid: DICOM series to use when the upload holds several.
            method: Explanation, one of :data:`femurrisk.explanation.METHODS`.

        Raises:
            InputError: If the input cannot be read or holds no pelvis.
            ValueError: If ``method`` is not one of the explanation methods.
        """
        if method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, not {method!r}")
        report = progress or (lambda fraction, message: None)
        timings: dict[str, float] = {}

        @contextmanager
        def step(name: str, fraction: float, message: str):
            report(fraction, message)
            start = time.perf_counter()
            yield
            timings[name] = round(time.perf_counter() - start, 3)

        with step("load", 0.0, "Reading the CT"):
            if isinstance(source, LoadedCT):
                loaded = source
            else:
                loaded = load_ct(source, series_uid=series_uid)
            image = to_canonical(loaded.image)
            _check_finite(image)
        warnings = list(loaded.warnings)

        with step("landmark", 0.2, "Finding the AIIS landmark"):
            landmarks, found_warnings = self.landmarks.find(image)
            warnings += found_warnings
            if landmark_z_mm is not None:
                landmarks = _manual(landmarks, image, _checked_level(image, landmark_z_mm))
                warnings.append("The landmark slice was set manually.")

        with step("crop", 0.5, "Cropping both femurs"):
            crops = {
                side: side_crop(
                    image, side, np.array(landmarks.femoral_head_world_mm[side]),
                    landmarks.world_z_mm,
                )
                for side in SIDES
            }
            inputs = {side: network_input(crops[side].volume_hu, side) for side in SIDES}
            for side in SIDES:
                if crops[side].padded_slices:
                    warnings.append(
                        f"The scan ends {crops[side].padded_slices} of {CROP_SLICES} slices "
                        f"too early for the {side} crop; those slices were filled with air, "
                        "so the distal part of the femur was not seen."
                    )

        with step("classify", 0.65, "Scoring both femurs"):
            batch = to_batch([inputs[side] for side in SIDES])
            probabilities = self.classifier.probabilities(batch)

        with step("gradcam", 0.8, "Computing the explanation"):
            maps = explain(self.classifier.model, self.classifier.gradcam_layer,
                           batch.to(self.device), method)
            # Back to each crop's own orientation (mirroring is its own inverse).
            maps = [to_network_orientation(m, side) for m, side in zip(maps, SIDES)]

        decisions = {}
        for index, side in enumerate(SIDES):
            metal = metal_volume_mm3(crops[side])
            if metal >= METAL_MIN_VOLUME_MM3:
                decisions[side] = DECISION_IMPLANT
            elif crops[side].padded_slices > MAX_PADDED_SLICES:
                decisions[side] = DECISION_SHORT
            elif probabilities[index] >= self.classifier.threshold:
                decisions[side] = DECISION_HIGH
            else:
                decisions[side] = DECISION_LOW
        # Scored sides share one scale; a side not scored gets its own (see SideResult).
        quantile = NORMALIZATION_QUANTILE[method]
        scored = [i for i, side in enumerate(SIDES) if decisions[side] in SCORED_DECISIONS]
        if scored:
            for i, m in zip(scored, normalize_jointly([maps[i] for i in scored], quantile)):
                maps[i] = m
        for i, side in enumerate(SIDES):
            if i not in scored:
                maps[i] = normalize_jointly([maps[i]], quantile)[0]

        sides = {}
        for index, side in enumerate(SIDES):
            metal = metal_volume_mm3(crops[side])
            implant = metal >= METAL_MIN_VOLUME_MM3
            probability = float(probabilities[index])
            decision = decisions[side]
            sides[side] = SideResult(
                side=side, probability=probability, decision=decision,
                scored=decision in SCORED_DECISIONS,
                implant_detected=bool(implant), metal_volume_mm3=metal,
                padded_slices=crops[side].padded_slices, crop_hu=crops[side].volume_hu,
                crop_affine=crops[side].affine, network_input=inputs[side],
                heatmap=np.ascontiguousarray(maps[index]),
            )
        report(1.0, "Done")
        zooms = tuple(float(z) for z in loaded.image.header.get_zooms()[:3])
        return Prediction(
            sides=sides, landmarks=landmarks, threshold=self.classifier.threshold,
            input_description=loaded.description, input_kind=loaded.kind,
            input_shape=tuple(int(s) for s in loaded.image.shape),
            input_spacing_mm=zooms, model={**self.model_info(), "explanation": method},
            warnings=warnings,
            timings_s=timings, device=str(self.device), image=image,
            input_affine=np.asarray(loaded.image.affine),
        )


#: A side whose crop lies more than half beyond the end of the scan is not scored: the
#: network would judge mostly air. Fewer padded slices are scored with a warning.
MAX_PADDED_SLICES = CROP_SLICES // 2

SCORED_DECISIONS = (DECISION_HIGH, DECISION_LOW)


def _check_finite(image) -> None:
    """Refuse volumes with NaN or infinite voxels: they are not Hounsfield units."""
    data = np.asarray(image.dataobj)
    bad = int(data.size - np.count_nonzero(np.isfinite(data)))
    if bad:
        raise InputError(
            f"The volume must hold finite Hounsfield units, but {bad} voxel(s) are NaN "
            "or infinite; export the CT again without masking or undefined values."
        )


def _checked_level(image, z_mm: float) -> float:
    """A hand-set landmark level, if finite and within the scan's cranio-caudal extent.

    Raises:
        InputError: If it is not a number or lies outside the scan.
    """
    z_mm = float(z_mm)
    corners = np.array([[i, j, k] for i in (0, image.shape[0] - 1)
                        for j in (0, image.shape[1] - 1) for k in (0, image.shape[2] - 1)])
    z_world = nib.affines.apply_affine(image.affine, corners)[:, 2]
    low, high = float(z_world.min()), float(z_world.max())
    if not np.isfinite(z_mm) or not low <= z_mm <= high:
        raise InputError(
            f"The landmark level must lie within the scan, between {low:.1f} and "
            f"{high:.1f} mm (world z, RAS+), not {z_mm}."
        )
    return z_mm


def _manual(found: Landmarks, image, z_mm: float) -> Landmarks:
    """The network's landmarks with the level replaced by a hand-set one."""
    return Landmarks(
        world_z_mm=z_mm, slice_index=nearest_slice(image, z_mm),
        aiis_world_mm=found.aiis_world_mm,
        femoral_head_world_mm=found.femoral_head_world_mm, method="manual",
    )
