import nibabel as nib
import numpy as np
import pytest

from femurrisk.preprocessing import bone_window, resample, to_canonical, world_to_voxel


def test_bone_window_maps_level_500_width_2000_to_0_255():
    hu = np.array([-1000.0, -500.0, 500.0, 1500.0, 3000.0])
    np.testing.assert_allclose(bone_window(hu), [0.0, 0.0, 127.5, 255.0, 255.0])


def test_to_canonical_keeps_world_position_of_a_marker():
    data = np.zeros((10, 12, 14), dtype=np.float32)
    data[2, 3, 4] = 1000.0
    # LPS-like storage: i runs to the patient's left (-x), j posterior (-y).
    affine = np.diag([-1.5, -2.0, 3.0, 1.0])
    affine[:3, 3] = (40.0, 50.0, -10.0)
    image = nib.Nifti1Image(data, affine)
    world = nib.affines.apply_affine(affine, (2, 3, 4))

    canonical = to_canonical(image)

    assert nib.aff2axcodes(canonical.affine) == ("R", "A", "S")
    ijk = np.argwhere(np.asarray(canonical.dataobj) == 1000.0)[0]
    np.testing.assert_allclose(nib.affines.apply_affine(canonical.affine, ijk), world)


def test_resample_to_spacing_keeps_world_geometry():
    data = np.zeros((40, 40, 20), dtype=np.float32)
    data[10:14, 20:24, 8:12] = 1000.0
    image = nib.Nifti1Image(data, np.diag([1.0, 1.0, 2.0, 1.0]))

    coarse = resample(image, (2.0, 2.0, 3.0))

    assert coarse.header.get_zooms()[:3] == pytest.approx((2.0, 2.0, 3.0))
    values = np.asarray(coarse.dataobj)
    peak = np.unravel_index(values.argmax(), values.shape)
    centre = nib.affines.apply_affine(coarse.affine, peak)
    np.testing.assert_allclose(centre, (11.5, 21.5, 19.0), atol=2.0)
    assert values.min() == pytest.approx(-1024.0)  # outside is filled with air


def test_world_to_voxel_inverts_affine():
    affine = np.array([[0, 2.0, 0, 5], [-1.0, 0, 0, 7], [0, 0, 3.0, -9], [0, 0, 0, 1]])
    xyz = nib.affines.apply_affine(affine, (3, 4, 5))
    np.testing.assert_allclose(world_to_voxel(affine, xyz), (3, 4, 5))
