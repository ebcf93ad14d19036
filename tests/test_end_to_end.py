"""The shipped models on the one real pelvis CT: landmark, sides, outputs, CLI."""

import json
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from femurrisk.prediction import DECISION_IMPLANT, SIDES
from femurrisk.preprocessing import resample_to_grid

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "assets" / "examples" / "pelvis_ct_3mm.nii.gz"
SHARED_SCAN = ROOT.parent / "shared" / "data" / "ct" / "pelvis_ct_3mm.nii.gz"
REAL_SCAN = SHARED_SCAN if SHARED_SCAN.exists() else EXAMPLE
ANNOTATION = json.loads((ROOT / "tests" / "fixtures" / "pelvis_ct_3mm_annotation.json").read_text())


@pytest.fixture(scope="module")
def predictor():
    from femurrisk.pipeline import Predictor

    return Predictor(device="cpu")


@pytest.fixture(scope="module")
def prediction(predictor):
    return predictor.predict(REAL_SCAN)


def _annotated_aiis_z_mm() -> float:
    return float(np.mean([ANNOTATION["landmarks"]["aiis"][side]["world_mm"][2] for side in SIDES]))


def test_landmark_within_two_slices_of_hand_annotation(prediction):
    error_mm = prediction.landmarks.world_z_mm - _annotated_aiis_z_mm()
    assert abs(error_mm) <= 6.0, f"landmark {error_mm:+.1f} mm from the annotation"


def test_femoral_heads_found_on_the_right_sides(prediction):
    for side in SIDES:
        found = np.array(prediction.landmarks.femoral_head_world_mm[side])
        truth = np.array(ANNOTATION["landmarks"]["femoral_head_centre"][side]["world_mm"])
        assert np.linalg.norm(found - truth) <= 12.0, (side, found, truth)


def test_crop_named_left_holds_the_patients_left_femur(prediction):
    """Proof from image content: the real scan's hardware sits in one femur only.

    Which femur is a fact of the image and its sform (the metal lies at RAS x < 0, the
    patient's left). The crop called "left" must contain it and "right" must not, and
    each crop must equal the input sampled at the crop's world positions.
    """
    stored = nib.load(REAL_SCAN)
    data = np.asarray(stored.dataobj, dtype=np.float32)
    image = nib.Nifti1Image(data, stored.affine)
    metal_world = nib.affines.apply_affine(image.affine, np.argwhere(data > 2500))
    assert np.median(metal_world[:, 0]) < 0  # the hardware is in the patient's left

    assert prediction.sides["left"].implant_detected
    assert prediction.sides["left"].decision == DECISION_IMPLANT
    assert not prediction.sides["right"].implant_detected
    for side in SIDES:
        result = prediction.sides[side]
        direct = resample_to_grid(image, result.crop_hu.shape, result.crop_affine)
        np.testing.assert_allclose(result.crop_hu, direct, atol=1e-3)


def test_probabilities_and_heatmaps_are_sane(prediction):
    for side in SIDES:
        result = prediction.sides[side]
        assert 0.0 <= result.probability <= 1.0
        assert result.heatmap.shape == result.crop_hu.shape
        assert 0.0 <= result.heatmap.min() and result.heatmap.max() <= 1.0
        # The implanted left side is scaled on its own, so it cannot flatten the right.
        assert result.heatmap.max() == pytest.approx(1.0, abs=0.05)


def test_manual_landmark_outside_the_scan_is_refused(predictor):
    from femurrisk.errors import InputError

    for z_mm in (99999.0, float("nan"), float("-inf")):
        with pytest.raises(InputError, match="landmark level must lie within the scan"):
            predictor.predict(REAL_SCAN, landmark_z_mm=z_mm)


def test_manual_landmark_is_recorded(predictor):
    prediction = predictor.predict(REAL_SCAN, landmark_z_mm=_annotated_aiis_z_mm())
    assert prediction.landmarks.method == "manual"
    assert prediction.landmarks.world_z_mm == pytest.approx(_annotated_aiis_z_mm())
    assert any("set manually" in w for w in prediction.warnings)


def test_cli_writes_outputs_that_match_the_library(tmp_path, prediction):
    out = tmp_path / "out"
    completed = subprocess.run(
        [sys.executable, "-m", "femurrisk", "predict", str(REAL_SCAN), "--out", str(out),
         "--save-crops", "--device", "cpu"],
        capture_output=True, text=True, cwd=ROOT, timeout=600,
    )
    assert completed.returncode == 0, completed.stderr
    result = json.loads((out / "result.json").read_text())
    assert result["schema_version"]
    for side in SIDES:
        assert result["sides"][side]["raw_model_output"] == pytest.approx(
            prediction.sides[side].probability, abs=1e-4)
        if prediction.sides[side].scored:
            assert result["sides"][side]["probability"] == pytest.approx(
                prediction.sides[side].probability, abs=1e-4)
        else:  # the implanted side has no probability to be mistaken for a risk
            assert result["sides"][side]["probability"] is None
        heat = nib.load(out / f"gradcam_{side}.nii.gz")
        np.testing.assert_allclose(heat.affine, nib.load(REAL_SCAN).affine)
        crop = nib.load(out / f"crop_{side}_hu.nii.gz")
        np.testing.assert_allclose(crop.affine, prediction.sides[side].crop_affine)
        assert (out / f"crop_{side}_network_input.nii.gz").exists()
    assert not list(out.glob(".partial-*"))


@pytest.mark.parametrize("name", [
    "ct/upper_abdomen_ct_3mm.nii.gz",
    "dicom_series/ge_head_gantry_tilt",  # a head CT: two skull points must not pass as hips
])
def test_cli_refuses_scan_without_pelvis(tmp_path, name):
    scan = SHARED_SCAN.parents[1] / name
    if not scan.exists():
        pytest.skip("../shared/data is not present")
    completed = subprocess.run(
        [sys.executable, "-m", "femurrisk", "predict", str(scan), "--out", str(tmp_path)],
        capture_output=True, text=True, cwd=ROOT, timeout=600,
    )
    assert completed.returncode == 2
    assert completed.stderr.count("\n") == 1 and "Traceback" not in completed.stderr
    assert "pelvis" in completed.stderr.lower()
    assert not (tmp_path / "result.json").exists()


def test_cli_bad_path_exits_2_with_one_line(tmp_path):
    completed = subprocess.run(
        [sys.executable, "-m", "femurrisk", "predict", str(tmp_path / "missing.nii.gz"),
         "--out", str(tmp_path / "o")],
        capture_output=True, text=True, cwd=ROOT, timeout=300,
    )
    assert completed.returncode == 2
    assert completed.stderr.startswith("error: ") and completed.stderr.count("\n") == 1
