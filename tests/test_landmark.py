import nibabel as nib
import numpy as np
import pytest

from femurrisk import geometry as g
from femurrisk.errors import InputError
from femurrisk.landmark import landmarks_from_probabilities

AFFINE = np.diag([6.0, 6.0, 4.0, 1.0])
AFFINE[:3, 3] = (-192.0, -192.0, -96.0)  # world x = 6 i - 192
SHAPE = (64, 64, 48)


def _probs(heads_mm, aiis_mm):
    """Label probabilities with balls at the given world points (RAS+ mm)."""
    labels = np.zeros(SHAPE, dtype=int)
    grid = nib.affines.apply_affine(AFFINE, np.indices(SHAPE).reshape(3, -1).T).reshape(SHAPE + (3,))
    for point in heads_mm:
        labels[np.linalg.norm(grid - point, axis=-1) <= 15.0] = g.LABEL_FEMORAL_HEAD
    for point in aiis_mm:
        labels[np.linalg.norm(grid - point, axis=-1) <= 10.0] = g.LABEL_AIIS
    probs = np.stack([labels == c for c in range(3)]).astype(np.float32)
    return probs, nib.Nifti1Image(np.zeros(SHAPE, np.float32), AFFINE)


def test_sides_follow_patient_frame_and_level_is_mean_aiis_height():
    heads = [np.array([-85.0, 0.0, 0.0]), np.array([85.0, 0.0, 0.0])]
    aiis = [np.array([-100.0, 40.0, 36.0]), np.array([100.0, 40.0, 28.0])]
    probs, image = _probs(heads, aiis)

    found, warnings = landmarks_from_probabilities(probs, AFFINE, image)

    assert found.femoral_head_world_mm["left"][0] < 0 < found.femoral_head_world_mm["right"][0]
    assert found.aiis_world_mm["left"][2] == pytest.approx(36.0, abs=2.0)
    assert found.aiis_world_mm["right"][2] == pytest.approx(28.0, abs=2.0)
    assert found.world_z_mm == pytest.approx(32.0, abs=2.0)
    assert found.method == "unet" and warnings == []


def test_one_missing_aiis_uses_the_other_with_a_warning():
    heads = [np.array([-85.0, 0.0, 0.0]), np.array([85.0, 0.0, 0.0])]
    probs, image = _probs(heads, [np.array([100.0, 40.0, 30.0])])
    found, warnings = landmarks_from_probabilities(probs, AFFINE, image)
    assert found.aiis_world_mm["left"] is None
    assert found.world_z_mm == pytest.approx(30.0, abs=2.0)
    assert any("left AIIS" in w for w in warnings)


@pytest.mark.parametrize("heads", [
    [np.array([-85.0, 0.0, 0.0])],  # one hip only
    [np.array([-180.0, 0.0, 0.0]), np.array([180.0, 0.0, 0.0])],  # too far apart
])
def test_no_pair_of_hips_is_refused(heads):
    probs, image = _probs(heads, [np.array([100.0, 40.0, 30.0])])
    with pytest.raises(InputError, match="No pelvis"):
        landmarks_from_probabilities(probs, AFFINE, image)


def test_no_aiis_is_refused():
    heads = [np.array([-85.0, 0.0, 0.0]), np.array([85.0, 0.0, 0.0])]
    probs, image = _probs(heads, [])
    with pytest.raises(InputError, match="anterior inferior iliac spine"):
        landmarks_from_probabilities(probs, AFFINE, image)


def test_fragmented_prediction_stays_cheap():
    """Thousands of one-voxel blobs must not build a full-size mask each."""
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, SHAPE) * (rng.random(SHAPE) < 0.2)
    probs = np.stack([labels == c for c in range(3)]).astype(np.float32)
    image = nib.Nifti1Image(np.zeros(SHAPE, np.float32), AFFINE)
    with pytest.raises(InputError):
        landmarks_from_probabilities(probs, AFFINE, image)
