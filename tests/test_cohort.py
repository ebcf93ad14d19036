"""Tests of the synthetic cohort (training/cohort.py) and the hand annotation fixture."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from training import cohort

FIXTURE = Path(__file__).parent / "fixtures" / "pelvis_ct_3mm_annotation.json"

pytestmark = pytest.mark.skipif(
    not cohort.REAL_CT_PATH.exists(), reason="shared pelvis CT not available"
)


def _midline_x(case: cohort.SyntheticCase) -> float:
    return float(np.mean([p[0] for p in case.femoral_head_world_mm.values()]))


def _lesion_world_x(case: cohort.SyntheticCase, value: int) -> float:
    ijk = np.argwhere(case.lesion_mask == value).mean(axis=0)
    return float(nib.affines.apply_affine(case.image.affine, ijk)[0])


def _hu_peaks(volume: np.ndarray) -> tuple[float, float, float]:
    """Fat peak, soft-tissue peak (histogram modes) and the body's 99th percentile."""

    def mode(lo: float, hi: float) -> float:
        values = volume[(volume > lo) & (volume < hi)]
        counts, edges = np.histogram(values, bins=np.arange(lo, hi + 1, 5))
        return float(edges[np.argmax(counts)] + 2.5)

    return mode(-200, -20), mode(0, 120), float(np.percentile(volume[volume > -500], 99))


@pytest.fixture(scope="module")
def case_pair() -> tuple[cohort.SyntheticCase, cohort.SyntheticCase]:
    """One case unmirrored and mirrored; case 2 of seed 0 has lesions on both sides."""
    return (cohort.generate_case(0, 2, mirror=False),
            cohort.generate_case(0, 2, mirror=True))


def test_generate_case_is_deterministic():
    first = cohort.generate_case(11, 4)
    second = cohort.generate_case(11, 4)
    assert np.array_equal(np.asarray(first.image.dataobj), np.asarray(second.image.dataobj))
    assert np.array_equal(first.image.affine, second.image.affine)
    assert np.array_equal(first.lesion_mask, second.lesion_mask)
    assert cohort.truth_dict(first) == cohort.truth_dict(second)
    other = cohort.generate_case(11, 5)
    assert other.image.shape != first.image.shape or not np.array_equal(
        np.asarray(other.image.dataobj), np.asarray(first.image.dataobj))


def test_case_fields_are_consistent(case_pair):
    case = case_pair[0]
    assert np.asarray(case.image.dataobj).dtype == np.float32
    assert nib.aff2axcodes(case.image.affine) == ("R", "A", "S")
    assert case.lesion_mask.shape == case.image.shape
    assert case.lesion_mask.dtype == np.uint8
    for side in cohort.SIDES:
        assert 0.0 < case.true_risk[side] < 1.0
        assert case.label[side] in (0, 1)
        assert (case.lesion[side] is None) == (not (case.lesion_mask == (
            1 if side == "left" else 2)).any())
    # Patient's left is -x: the left head and AIIS lie at smaller x than the right.
    assert case.femoral_head_world_mm["left"][0] < case.femoral_head_world_mm["right"][0]
    assert case.aiis_world_mm["left"][0] < case.aiis_world_mm["right"][0]
    # The AIIS lies above and in front of the head, 20-60 mm up.
    for side in cohort.SIDES:
        rise = case.aiis_world_mm[side][2] - case.femoral_head_world_mm[side][2]
        assert 20.0 < rise < 60.0
        assert case.aiis_world_mm[side][1] > case.femoral_head_world_mm[side][1]


@pytest.mark.parametrize("mirrored", [False, True])
def test_lesion_mask_is_on_its_patient_side(case_pair, mirrored):
    case = case_pair[int(mirrored)]
    midline = _midline_x(case)
    for side, value in (("left", 1), ("right", 2)):
        if case.lesion[side] is None:
            continue
        offset = _lesion_world_x(case, value) - midline
        assert offset < -30.0 if side == "left" else offset > 30.0
        centre_x = case.lesion[side].centre_world_mm[0] - midline
        assert np.sign(centre_x) == np.sign(offset)


def test_mirroring_swaps_sides(case_pair):
    plain, mirrored = case_pair
    assert not plain.mirrored and mirrored.mirrored
    for side, other in (("left", "right"), ("right", "left")):
        assert plain.label[side] == mirrored.label[other]
        # The same draws on a mirrored grid: cortical involvement may differ by a slice.
        assert plain.true_risk[side] == pytest.approx(mirrored.true_risk[other], abs=0.15)
        assert plain.implant[side] == mirrored.implant[other]
        lesion, swapped = plain.lesion[side], mirrored.lesion[other]
        assert (lesion is None) == (swapped is None)
        if lesion is not None:
            assert lesion.kind == swapped.kind and lesion.place == swapped.place
            x_plain = lesion.centre_world_mm[0] - _midline_x(plain)
            x_mirrored = swapped.centre_world_mm[0] - _midline_x(mirrored)
            assert np.sign(x_plain) == -np.sign(x_mirrored)
            assert abs(abs(x_plain) - abs(x_mirrored)) < 15.0
    # In the real scan the left AIIS lies 21 mm lateral of its head centre, the right
    # one 13.5 mm: after mirroring the patient's left carries the smaller offset.
    # (Rotation shifts both offsets alike, so the difference of differences is
    # about 15 mm times the scale.)
    def lateral_gap(case):
        aiis, head = case.aiis_world_mm, case.femoral_head_world_mm
        left = head["left"][0] - aiis["left"][0]
        right = aiis["right"][0] - head["right"][0]
        return left - right

    assert lateral_gap(plain) - lateral_gap(mirrored) > 8.0


@pytest.mark.parametrize("site", ["A", "D"])
def test_tissue_hu_matches_the_real_scan(site):
    real = np.asarray(nib.load(cohort.REAL_CT_PATH).dataobj, dtype=np.float32)
    fat_real, soft_real, bone_real = _hu_peaks(real)
    case = cohort.generate_case(5, 1, site=site)
    fat, soft, bone = _hu_peaks(np.asarray(case.image.dataobj))
    # Real scan: fat -102, soft tissue 22, body p99 385 HU. Sites shift by up to
    # +-30 HU and noise broadens the peaks.
    assert abs(fat - fat_real) <= 60.0
    assert abs(soft - soft_real) <= 40.0
    assert 0.6 * bone_real <= bone <= 1.6 * bone_real


def test_annotation_fixture_matches_affine_and_cohort():
    annotation = json.loads(FIXTURE.read_text())
    image = nib.load(cohort.REAL_CT_PATH)
    assert tuple(annotation["shape"]) == image.shape
    expected = {"aiis": cohort.REAL_AIIS_VOXEL,
                "femoral_head_centre": cohort.REAL_HEAD_VOXEL}
    for name, per_side in annotation["landmarks"].items():
        for side, point in per_side.items():
            world = nib.affines.apply_affine(image.affine, point["voxel_ijk"])
            assert np.allclose(world, point["world_mm"], atol=1e-2)
            assert tuple(point["voxel_ijk"]) == expected[name][side]
    heads = annotation["landmarks"]["femoral_head_centre"]
    assert heads["left"]["world_mm"][0] < heads["right"]["world_mm"][0]
    assert annotation["implant"] == {"left": True, "right": False}
    metal = np.argwhere(np.asarray(image.dataobj) > 2500)
    midline_i = (heads["left"]["voxel_ijk"][0] + heads["right"]["voxel_ijk"][0]) / 2
    assert (metal[:, 0] < midline_i).all()


def test_fracture_risk_ordering():
    def lesion(kind, ratio, involvement):
        return cohort.LesionParams(kind, "neck", (0, 0, 0), (10, 10, 10), 40.0, 32.0,
                                   ratio, involvement, 1000.0)

    assert cohort.fracture_risk(None) == cohort.BASELINE_RISK
    assert (cohort.fracture_risk(lesion("lytic", 0.6, 20))
            > cohort.fracture_risk(lesion("mixed", 0.6, 20))
            > cohort.fracture_risk(lesion("blastic", 0.6, 20)))
    assert cohort.fracture_risk(lesion("lytic", 0.6, 35)) > 0.9
    assert cohort.fracture_risk(lesion("blastic", 0.2, 0)) < 0.02


def test_write_nifti(tmp_path, case_pair):
    case = case_pair[0]
    folder = cohort.write_nifti(case, tmp_path / "case")
    truth = json.loads((folder / "truth.json").read_text())
    assert truth["label"] == case.label
    landmarks = np.asarray(nib.load(folder / "landmarks.nii.gz").dataobj)
    assert set(np.unique(landmarks)) == {0, 1, 2}
    lesions = np.asarray(nib.load(folder / "lesions.nii.gz").dataobj)
    assert np.array_equal(lesions, case.lesion_mask)


def test_landmarks_follow_the_image(case_pair):
    """Head centres sit in bone and each AIIS point within 9 mm of cortical bone."""
    clean = cohort.generate_case(3, 9, positive_fraction=None, lesion_probability=0.0,
                                 implant_probability=0.0)
    for case in (*case_pair, clean):
        volume = np.asarray(case.image.dataobj)
        inverse = np.linalg.inv(case.image.affine)
        spacing = np.abs(np.diag(case.image.affine)[:3])
        for side in cohort.SIDES:
            if case.lesion[side] is not None or case.implant[side]:
                continue
            head = np.round(nib.affines.apply_affine(
                inverse, case.femoral_head_world_mm[side])).astype(int)
            r = np.maximum(1, np.round(6.0 / spacing)).astype(int)
            ball = volume[tuple(slice(c - n, c + n + 1) for c, n in zip(head, r))]
            assert 100.0 < float(np.median(ball)) < 700.0
        for side in cohort.SIDES:
            aiis = np.round(nib.affines.apply_affine(
                inverse, case.aiis_world_mm[side])).astype(int)
            r = np.maximum(1, np.round(9.0 / spacing)).astype(int)
            near = volume[tuple(slice(c - n, c + n + 1) for c, n in zip(aiis, r))]
            assert float(near.max()) > 300.0
