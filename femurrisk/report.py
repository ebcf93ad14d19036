"""The JSON report and the NIfTI outputs of a prediction.

The JSON schema is documented in ``docs/result_schema.md``; bump
:data:`femurrisk.prediction.SCHEMA_VERSION` on any change that is not an addition.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import nibabel as nib
import numpy as np

from femurrisk.geometry import (
    CROP_LATERAL_SHIFT_MM, CROP_PIXEL_MM, CROP_PIXELS, CROP_SLICE_SPACING_MM, CROP_SLICES,
    WINDOW_LEVEL_HU, WINDOW_WIDTH_HU,
)
from femurrisk.prediction import SCHEMA_VERSION, Prediction
from femurrisk.preprocessing import resample_to_grid

DISCLAIMER = (
    "Research demo: the model was trained on synthetic data only and is not for "
    "clinical use."
)


def _rounded(values, digits: int = 2) -> list[float] | None:
    return None if values is None else [round(float(v), digits) for v in values]


def to_json_dict(prediction: Prediction) -> dict:
    """A JSON-ready summary of a prediction (no arrays, no patient identifiers)."""
    marks = prediction.landmarks
    sides = {}
    for side, result in prediction.sides.items():
        crop_origin = result.crop_affine[:3, 3]
        sides[side] = {
            # A side that is not scored has no probability: its raw output is kept apart
            # so that no reader can take it for a risk.
            "probability": round(result.probability, 4) if result.scored else None,
            "raw_model_output": round(result.probability, 4),
            "decision": result.decision,
            "scored": result.scored,
            "implant_detected": result.implant_detected,
            "metal_volume_mm3": round(result.metal_volume_mm3, 1),
            "padded_slices": result.padded_slices,
            "femoral_head_world_mm": _rounded(marks.femoral_head_world_mm[side]),
            "aiis_world_mm": _rounded(marks.aiis_world_mm.get(side)),
            "crop_origin_world_mm": _rounded(crop_origin),
            "gradcam_peak_world_mm": _rounded(_peak_world(result.heatmap, result.crop_affine)),
        }
    return {
        "schema_version": SCHEMA_VERSION,
        "disclaimer": DISCLAIMER,
        "coordinate_system": "RAS+ mm (x to the patient's right, y anterior, z superior)",
        "input": {
            "kind": prediction.input_kind,
            "description": prediction.input_description,
            "shape": list(prediction.input_shape),
            "spacing_mm": _rounded(prediction.input_spacing_mm, 3),
        },
        "landmark": {
            "structure": "anterior inferior iliac spine (AIIS)",
            "method": marks.method,
            "world_z_mm": round(marks.world_z_mm, 2),
            "slice_index": marks.slice_index,
            "slice_index_frame": "canonical RAS+ input, index 0 most caudal",
        },
        "crop": {
            "slices": CROP_SLICES,
            "slice_spacing_mm": CROP_SLICE_SPACING_MM,
            "pixels": CROP_PIXELS,
            "pixel_mm": CROP_PIXEL_MM,
            "lateral_shift_mm": CROP_LATERAL_SHIFT_MM,
            "window": {"level_hu": WINDOW_LEVEL_HU, "width_hu": WINDOW_WIDTH_HU,
                       "scaled_to": [0, 255]},
            "sides_presented": "right crop mirrored in x so both look like a left femur",
        },
        "threshold": round(prediction.threshold, 4),
        "sides": sides,
        "model": prediction.model,
        "warnings": list(prediction.warnings),
        "timings_s": dict(prediction.timings_s),
        "device": prediction.device,
    }


def _peak_world(heatmap: np.ndarray, affine: np.ndarray) -> list[float] | None:
    if float(heatmap.max()) <= 0.0:
        return None
    ijk = np.unravel_index(int(np.argmax(heatmap)), heatmap.shape)
    return list(nib.affines.apply_affine(affine, np.array(ijk, dtype=float)))


def write_outputs(prediction: Prediction, out_dir: Path, *, save_crops: bool = False) -> list[Path]:
    """Write result.json, one Grad-CAM NIfTI per side and optionally the crops.

    Files are written into a temporary folder beside ``out_dir`` and moved into place
    one by one only when all were written, so a failure leaves no half-written result.

    Returns:
        The paths written.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    files: dict[str, object] = {}
    shape = prediction.input_shape[:3]
    for side, result in prediction.sides.items():
        heat = nib.Nifti1Image(result.heatmap, result.crop_affine)
        # On the input's own grid, so that it overlays the input file in any viewer.
        world = resample_to_grid(heat, shape, prediction.input_affine, order=1, cval=0.0)
        files[f"gradcam_{side}.nii.gz"] = nib.Nifti1Image(world.astype(np.float32),
                                                          prediction.input_affine)
        if save_crops:
            files[f"crop_{side}_hu.nii.gz"] = nib.Nifti1Image(result.crop_hu, result.crop_affine)
            # Exactly the network input; the right side is mirrored in x, so its
            # affine mirrors x too and it still lands on the patient's right in a viewer.
            files[f"crop_{side}_network_input.nii.gz"] = nib.Nifti1Image(
                result.network_input, _network_affine(result.crop_affine, side)
            )
            files[f"crop_{side}_gradcam.nii.gz"] = heat
    files["result.json"] = to_json_dict(prediction)

    written = []
    with tempfile.TemporaryDirectory(dir=out_dir, prefix=".partial-") as staging:
        for name, content in files.items():
            path = Path(staging) / name
            if isinstance(content, dict):
                path.write_text(json.dumps(content, indent=2) + "\n")
            else:
                nib.save(content, str(path))
        for name in files:
            os.replace(Path(staging) / name, out_dir / name)
            written.append(out_dir / name)
    return written


def _network_affine(affine: np.ndarray, side: str) -> np.ndarray:
    """Affine of the network input: for the mirrored right crop, x runs backwards."""
    if side != "right":
        return affine
    flipped = affine.copy()
    flipped[:3, 0] = -affine[:3, 0]
    flipped[:3, 3] = affine[:3, 3] + affine[:3, 0] * (CROP_PIXELS - 1)
    return flipped
