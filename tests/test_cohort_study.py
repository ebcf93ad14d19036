"""Tests of the multi-site synthetic cohort: design, splits, images, DICOM, HU."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest

from femurrisk.loading import load_ct
from training import cohort
from training import cohort_design as cd
from training.dicom_writer import ORIENTATION_LPS, write_dicom_series
from training.splits import patient_folds, study_splits

SMALL = cd.CohortSpec(seed=3, scale=0.03)

needs_real_ct = pytest.mark.skipif(
    not cohort.REAL_CT_PATH.exists(), reason="shared pelvis CT not available")


# --- Design -----------------------------------------------------------------------------


def test_default_design_reproduces_the_study_counts():
    summary = cd.build_design(cd.CohortSpec()).summary()
    assert (summary["patients"], summary["cts"], summary["cases"]) == (540, 2933, 3621)
    assert summary["positives"] == 51
    assert (summary["cases_men"], summary["cases_women"]) == (1956, 1665)
    assert summary["age_mean"] == pytest.approx(63.0, abs=1.0)
    assert summary["age_sd"] == pytest.approx(11.0, abs=1.0)
    assert set(summary["per_site_cases"]) == {"A", "B", "C", "D"}


def test_design_is_deterministic_and_seeded():
    build = cd.build_design.__wrapped__
    first, second = build(SMALL), build(SMALL)
    rows = [cd.case_row(first, c) for c in first.cases]
    assert rows == [cd.case_row(second, c) for c in second.cases]
    other = build(cd.CohortSpec(seed=4, scale=0.03))
    assert rows != [cd.case_row(other, c) for c in other.cases]


def test_scale_and_enrichment():
    design = cd.build_design(cd.CohortSpec(seed=1, scale=0.2, enrich=0.12))
    summary = design.summary()
    assert (summary["patients"], summary["cts"], summary["cases"]) == (108, 587, 724)
    assert summary["positives"] == round(0.12 * 724)
    assert design.risk_logit_shift > 0.0
    assert summary["cases_men"] == round(724 * 1956 / 3621)


def test_labels_follow_the_stated_rules():
    design = cd.build_design(cd.CohortSpec())
    cases = design.cases
    for case in cases:
        study = design.studies[case.study_id]
        assert case.side in study.case_sides
        assert 0.0 < case.true_risk < 1.0
        if case.label:
            assert case.last_of_series and case.end_reason == "fracture"
        if not case.last_of_series:
            assert case.label == 0 and case.label_probability == 0.0
        if case.censored:
            assert case.label == 0
            assert case.end_reason in ("prophylactic_fixation", "death")
    # Every CT contributes one or two sides; a patient's CTs are in time order.
    assert all(1 <= len(s.case_sides) <= 2 for s in design.studies)
    # The recorded inclusion probabilities add up to the positives drawn and agree
    # with the risk model's probability of an observed fracture.
    last = [c for c in cases if c.last_of_series]
    assert sum(c.label_probability for c in last) == pytest.approx(51, abs=0.01)
    for c in last:
        assert c.label_probability == pytest.approx(c.observed_risk, rel=0.05, abs=1e-4)


def test_risk_model_is_ordered():
    base = dict(onset_index=0, radius_onset_mm=3.0, radius_final_mm=11.0,
                elongation=1.5, eccentricity=0.5, angle_deg=0.0, along=0.5,
                shape_seed=0)

    def risk(kind, place="neck", radius=11.0):
        series = cd.LesionSeries(kind=kind, place=place,
                                 **{**base, "radius_final_mm": radius})
        return cd.fracture_risk(cd.lesion_state(series, 1.0, 1.0, 0.9), 0.9, -4.0)

    assert risk("lytic") > risk("mixed") > risk("blastic")
    assert risk("lytic", radius=13.0) > risk("lytic", radius=6.0)
    assert risk("lytic", place="head") < risk("lytic", place="neck")
    state = cd.lesion_state(cd.LesionSeries(kind="lytic", place="neck", **base),
                            1.0, 1.0, 1.0)
    assert state.axial_cortical_involvement_mm > 0.0
    assert 0.0 < state.axial_rigidity_loss < 1.0


def test_conditional_poisson_draws_exactly_k():
    rng = np.random.default_rng(0)
    probs = rng.uniform(0.0, 0.3, 200)
    chosen, inclusion = cd.conditional_poisson(rng, probs, 17)
    assert chosen.sum() == 17
    assert inclusion.sum() == pytest.approx(17.0)
    assert np.all((inclusion >= 0) & (inclusion <= 1))


def test_splits_are_patient_disjoint_and_follow_the_study_design():
    design = cd.build_design(cd.CohortSpec())
    splits = study_splits(design)
    patients = {name: {design.cases[c].patient_id for c in ids}
                for name, ids in splits.items()}
    assert not patients["train"] & patients["validation"]
    assert not patients["train"] & patients["external"]
    assert not patients["validation"] & patients["external"]
    assert sorted(sum(splits.values(), [])) == list(range(len(design.cases)))
    sites = {name: {design.studies[design.cases[c].study_id].site for c in ids}
             for name, ids in splits.items()}
    assert sites["train"] == sites["validation"] == {"A"}
    assert sites["external"] == {"B", "C", "D"}
    assert all(sum(design.cases[c].label for c in ids) > 0 for ids in splits.values())
    # The one real scan's anatomy stays out of the external test by default.
    assert {design.patients[p].anatomy.kind for p in patients["external"]} == {"phantom"}
    folds = patient_folds(design, 5)
    fold_patients = [{design.cases[c].patient_id for c in f} for f in folds]
    assert sum(len(f) for f in fold_patients) == len(set().union(*fold_patients))


# --- Images -----------------------------------------------------------------------------


def _pick(kind: str) -> int:
    """A CT of the small design with a lesion, whose anatomy is ``kind``."""
    design = cd.build_design(SMALL)
    for study in design.studies:
        patient = design.patients[study.patient_id]
        if patient.anatomy.kind == kind and study.site in ("A", "B"):
            return study.study_id
    raise AssertionError(f"no {kind} study")


@pytest.fixture(scope="module")
def studies() -> dict[str, cohort.SyntheticCase]:
    return {kind: cohort.generate_study(SMALL, _pick(kind))
            for kind in ("phantom", "real")}


def _side_of_mask(case, mask: np.ndarray, affine: np.ndarray, value: int) -> float:
    """World x of a mask label's centroid relative to the midline between the heads."""
    ijk = np.argwhere(mask == value).mean(axis=0)
    midline = np.mean([p[0] for p in case.femoral_head_world_mm.values()])
    return float(nib.affines.apply_affine(affine, ijk)[0] - midline)


@needs_real_ct
def test_generate_study_is_bit_identical(studies):
    again = cohort.generate_study(SMALL, _pick("phantom"))
    first = studies["phantom"]
    assert np.array_equal(np.asarray(again.image.dataobj), np.asarray(first.image.dataobj))
    assert np.array_equal(again.image.affine, first.image.affine)
    assert np.array_equal(again.lesion_mask, first.lesion_mask)
    assert np.array_equal(again.femur_mask, first.femur_mask)
    assert cohort.manifest_rows(again) == cohort.manifest_rows(first)


@needs_real_ct
@pytest.mark.parametrize("kind", ["phantom", "real"])
def test_landmarks_and_masks_are_on_their_patient_side(studies, kind):
    case = studies[kind]
    volume = np.asarray(case.image.dataobj)
    inverse = np.linalg.inv(case.image.affine)
    spacing = np.abs(np.diag(case.image.affine)[:3])
    for side, value, sign in (("left", 1, -1.0), ("right", 2, 1.0)):
        head = np.round(nib.affines.apply_affine(
            inverse, case.femoral_head_world_mm[side])).astype(int)
        assert case.femur_mask[tuple(head)] == value  # the head centre is in its femur
        assert np.sign(_side_of_mask(case, case.femur_mask, case.image.affine,
                                     value)) == sign
        aiis = np.round(nib.affines.apply_affine(
            inverse, case.aiis_world_mm[side])).astype(int)
        r = np.maximum(1, np.round(9.0 / spacing)).astype(int)
        near = volume[tuple(slice(c - n, c + n + 1) for c, n in zip(aiis, r))]
        assert float(near.max()) > 300.0  # the AIIS point sits on bone
    rows = cohort.manifest_rows(case)
    assert rows and all(r["anatomy"] == kind for r in rows)
    for row in rows:
        value = 1 if row["side"] == "left" else 2
        assert (case.lesion_mask == value).any()
        offset = _side_of_mask(case, case.lesion_mask, case.image.affine, value)
        assert offset < -20.0 if row["side"] == "left" else offset > 20.0
        assert case.label[row["side"]] == row["label"]
        voxel = [row[f"head_voxel_{a}"] for a in "ijk"]
        world = nib.affines.apply_affine(case.image.affine, voxel)
        assert np.allclose(world, [row[f"head_world_{a}_mm"] for a in "xyz"], atol=0.01)


@needs_real_ct
def test_written_dicom_and_nifti_read_back(studies, tmp_path):
    case = studies["phantom"]
    folder = cohort.write_study(case, tmp_path / "study")
    expected = np.round(np.asarray(case.image.dataobj))
    loaded = load_ct(folder / "dicom")
    image = nib.as_closest_canonical(loaded.image)
    assert image.shape == case.image.shape
    assert np.allclose(image.affine, case.image.affine, atol=1e-3)
    assert np.array_equal(np.asarray(image.dataobj), expected)
    nifti = nib.load(folder / "image.nii.gz")
    assert np.array_equal(np.asarray(nifti.dataobj), np.asarray(case.image.dataobj))
    lesions = nib.load(folder / "lesions.nii.gz")
    truth = json.loads((folder / "truth.json").read_text())
    for row in case.params["design"]:
        value = 1 if row["side"] == "left" else 2
        offset = _side_of_mask(case, np.asarray(lesions.dataobj), lesions.affine, value)
        assert np.sign(offset) == (-1.0 if row["side"] == "left" else 1.0)
        assert truth["label"][row["side"]] == row["label"]
    assert (np.asarray(nib.load(folder / "femur.nii.gz").dataobj) > 0).any()


@pytest.mark.parametrize("position", sorted(ORIENTATION_LPS))
def test_every_patient_position_reads_back_in_patient_terms(tmp_path, position):
    rng = np.random.default_rng(1)
    volume = rng.normal(0.0, 200.0, (24, 20, 6)).astype(np.float32)
    volume[2, 5, 3] = 2000.0  # a marker near the patient's left (small i)
    affine = np.diag([1.7, 1.9, 2.5, 1.0])
    affine[:3, 3] = (-120.0, 40.0, -30.0)
    write_dicom_series(nib.Nifti1Image(volume, affine), tmp_path, position=position)
    image = nib.as_closest_canonical(load_ct(tmp_path).image)
    assert np.allclose(image.affine, affine, atol=1e-3)
    assert np.array_equal(np.asarray(image.dataobj), np.round(volume))


# --- HU distributions against the real scan ---------------------------------------------

#: Tissue classes by HU window (fat, muscle) and the dense-bone percentile.
FAT_HU, MUSCLE_HU = (-200.0, -30.0), (0.0, 100.0)
#: Stated tolerances: median fat and muscle within 40 and 30 HU of the real scan's
#: (sites shift calibration by up to 35 HU), bone's 95th percentile within -40 % /
#: +60 % (bone density varies with age and sex; slice thickness blurs cortex).
FAT_TOL_HU, MUSCLE_TOL_HU, BONE_RATIO = 40.0, 30.0, (0.6, 1.6)


def _tissue_stats(volume: np.ndarray) -> tuple[float, float, float]:
    fat = float(np.median(volume[(volume > FAT_HU[0]) & (volume < FAT_HU[1])]))
    muscle = float(np.median(volume[(volume > MUSCLE_HU[0]) & (volume < MUSCLE_HU[1])]))
    bone = float(np.percentile(volume[(volume > 200.0) & (volume < 2000.0)], 95))
    return fat, muscle, bone


@needs_real_ct
@pytest.mark.parametrize("kind", ["phantom", "real"])
def test_tissue_hu_lies_within_stated_ranges_of_the_real_scan(studies, kind):
    real = np.asarray(nib.load(cohort.REAL_CT_PATH).dataobj, dtype=np.float32)
    fat_real, muscle_real, bone_real = _tissue_stats(real)
    fat, muscle, bone = _tissue_stats(np.asarray(studies[kind].image.dataobj))
    assert abs(fat - fat_real) <= FAT_TOL_HU
    assert abs(muscle - muscle_real) <= MUSCLE_TOL_HU
    assert BONE_RATIO[0] * bone_real <= bone <= BONE_RATIO[1] * bone_real
