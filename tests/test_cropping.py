import nibabel as nib
import numpy as np
import pytest

from femurrisk import geometry as g
from femurrisk.cropping import (
    crop_affine, metal_volume_mm3, side_crop, to_network_orientation, world_point_in_crop,
)


def _phantom(lps: bool = False):
    """A 1 mm body with a 'femur' column on each side; the left one holds a marker."""
    shape = (300, 200, 200)
    data = np.full(shape, -100.0, dtype=np.float32)
    affine = np.eye(4)
    affine[:3, 3] = (-150.0, -100.0, -100.0)  # RAS+: world x = i - 150
    heads = {"left": np.array([-80.0, 0.0, 0.0]), "right": np.array([80.0, 0.0, 0.0])}
    for centre in heads.values():
        i, j = int(centre[0] + 150), int(centre[1] + 100)
        data[i - 10:i + 10, j - 10:j + 10, :] = 1000.0
    marker = np.array([-95.0, 5.0, -30.0])  # inside the left crop, lateral of the head
    mi, mj, mk = (marker + (150, 100, 100)).astype(int)
    data[mi - 2:mi + 3, mj - 2:mj + 3, mk - 2:mk + 3] = 3000.0
    image = nib.Nifti1Image(data, affine)
    if lps:  # same anatomy stored with i towards the patient's left
        flipped = affine.copy()
        flipped[0, 0] = -1.0
        flipped[0, 3] = 149.0
        image = nib.Nifti1Image(data[::-1].copy(), flipped)
    return image, heads, marker


@pytest.mark.parametrize("lps", [False, True])
def test_left_crop_holds_left_marker_whatever_the_storage_order(lps):
    image, heads, marker = _phantom(lps)
    landmark_z = 40.0

    left = side_crop(image, "left", heads["left"], landmark_z)
    right = side_crop(image, "right", heads["right"], landmark_z)

    assert metal_volume_mm3(left) > g.METAL_MIN_VOLUME_MM3
    assert metal_volume_mm3(right) == 0.0
    peak = np.unravel_index(left.volume_hu.argmax(), g.CROP_SHAPE)
    np.testing.assert_allclose(nib.affines.apply_affine(left.affine, peak), marker, atol=3.0)


def test_crop_geometry_slices_from_landmark_caudally():
    affine = crop_affine("left", np.array([-80.0, 10.0, 0.0]), 50.0)
    z = affine[2, 3] + affine[2, 2] * np.arange(g.CROP_SLICES)
    assert z[-1] == pytest.approx(50.0)  # the landmark is the last (most cranial) slice
    assert z[0] == pytest.approx(50.0 - 31 * 3.0)
    centre = nib.affines.apply_affine(affine, ((g.CROP_PIXELS - 1) / 2,) * 2 + (0,))
    # The centre lies lateral (towards -x for the left side) of the head.
    assert centre[0] == pytest.approx(-80.0 - g.CROP_LATERAL_SHIFT_MM)
    right = crop_affine("right", np.array([80.0, 10.0, 0.0]), 50.0)
    assert nib.affines.apply_affine(right, (31.5, 31.5, 0))[0] == pytest.approx(100.0)


def test_padded_slices_counted_when_scan_ends_early():
    image, heads, _ = _phantom()
    # Scan z spans -100..99 mm; a landmark at -60 puts 32*3 = 96 mm below it out of range.
    crop = side_crop(image, "left", heads["left"], -60.0)
    assert crop.padded_slices == 18  # slices at -153..-102 mm lie outside
    assert np.all(crop.volume_hu[:, :, :10] == g.PAD_HU)


def test_network_orientation_mirrors_right_only_and_undoes_itself():
    volume = np.arange(64 * 64 * 32, dtype=np.float32).reshape(g.CROP_SHAPE)
    np.testing.assert_array_equal(to_network_orientation(volume, "left"), volume)
    mirrored = to_network_orientation(volume, "right")
    np.testing.assert_array_equal(mirrored[0], volume[-1])
    np.testing.assert_array_equal(to_network_orientation(mirrored, "right"), volume)


def test_world_point_in_crop_round_trip():
    image, heads, _ = _phantom()
    crop = side_crop(image, "left", heads["left"], 30.0)
    ijk = world_point_in_crop(crop, nib.affines.apply_affine(crop.affine, (5, 6, 7)))
    np.testing.assert_allclose(ijk, (5, 6, 7))
