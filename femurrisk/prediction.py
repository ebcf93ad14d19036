"""What one prediction holds: per-side results, the landmark, and their provenance.

Arrays are kept for the viewers and the NIfTI outputs; :meth:`Prediction.to_json_dict`
gives the documented JSON report (schema in ``docs/result_schema.md``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

SCHEMA_VERSION = "1.0"

SIDES = ("left", "right")

DECISION_HIGH = "high risk"
DECISION_LOW = "low risk"
DECISION_IMPLANT = "implant present, not scored"
DECISION_SHORT = "scan too short below the landmark, not scored"


@dataclass
class Landmarks:
    """The AIIS landmark level and the femoral head centres, in world RAS+ mm.

    Attributes:
        world_z_mm: Axial level of the AIIS; the crop's first (most cranial) slice.
        slice_index: Index of the canonical input slice nearest to ``world_z_mm``.
        aiis_world_mm: Per side, the AIIS centre found (x, y, z), or None if that side
            was not found and the level came from the other side alone.
        femoral_head_world_mm: Per side, the femoral head centre (x, y, z).
        method: ``"unet"`` when found by the network, ``"manual"`` when set by a user.
    """

    world_z_mm: float
    slice_index: int
    aiis_world_mm: dict[str, tuple[float, float, float] | None]
    femoral_head_world_mm: dict[str, tuple[float, float, float]]
    method: str = "unet"


@dataclass
class SideResult:
    """Result for one proximal femur.

    Arrays are on the crop grid, axes (x, y, z) in canonical RAS+ order, shape
    :data:`femurrisk.geometry.CROP_SHAPE`; ``crop_affine`` maps their voxels to world mm.

    Attributes:
        side: ``"left"`` or ``"right"``, patient terms.
        probability: Predicted probability of a pathologic fracture within 3 months.
        decision: One of ``DECISION_HIGH``, ``DECISION_LOW``, ``DECISION_IMPLANT``,
            ``DECISION_SHORT``.
        scored: False when the side is outside the model's scope (an implant, or more
            than half of the crop beyond the end of the scan); ``probability`` is then
            the network's raw output, kept for inspection only.
        implant_detected: Metal found in the crop.
        metal_volume_mm3: Volume of voxels above the metal threshold in the crop.
        padded_slices: Crop slices that lay outside the scan and were filled with air.
        crop_hu: Hounsfield units of the crop, not mirrored.
        crop_affine: 4 x 4 voxel-to-world affine of the crop.
        network_input: Bone-windowed crop (0-255) exactly as the network saw it; the
            right side is mirrored in x so that both sides look like a left femur.
        heatmap: Grad-CAM on the crop grid, 0-1, in the crop's own (unmirrored) order.
            Scored sides share one scale so that they are comparable; a side that is
            not scored is scaled on its own, so that (for example) an implant's strong
            evidence cannot flatten the scored side's map.
    """

    side: str
    probability: float
    decision: str
    scored: bool
    implant_detected: bool
    metal_volume_mm3: float
    padded_slices: int
    crop_hu: np.ndarray
    crop_affine: np.ndarray
    network_input: np.ndarray
    heatmap: np.ndarray


@dataclass
class Prediction:
    """Everything one run of the pipeline produced for one CT."""

    sides: dict[str, SideResult]
    landmarks: Landmarks
    threshold: float
    input_description: str
    input_kind: str
    input_shape: tuple[int, ...]
    input_spacing_mm: tuple[float, ...]
    model: dict
    warnings: list[str] = field(default_factory=list)
    timings_s: dict[str, float] = field(default_factory=dict)
    device: str = "cpu"
    #: The input in the canonical RAS+ frame (Hounsfield units), for viewers.
    image: object = None
    #: Voxel-to-world affine of the input as read (before reorientation).
    input_affine: np.ndarray | None = None
