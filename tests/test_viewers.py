"""Tests of femurrisk.viewers on small synthetic crops."""

from __future__ import annotations

import json

import numpy as np
import pytest

from femurrisk import viewers
from femurrisk.geometry import CROP_SHAPE
from femurrisk.prediction import DECISION_HIGH, DECISION_IMPLANT, Landmarks, SideResult

N_SLICES = CROP_SHAPE[2]
LABELS_MM = [-93.0 + 3.0 * k for k in range(N_SLICES)]  # k grows cranially


@pytest.fixture
def crop():
    """Bone-windowed CT bright towards the patient's right, heatmap peaking at k=20."""
    x, y, z = np.meshgrid(*(np.arange(n) for n in CROP_SHAPE), indexing="ij")
    ct = np.where(x > 40, 220.0, 30.0)
    heat = np.exp(-((x - 32) ** 2 + (y - 32) ** 2 + (z - 20) ** 2) / 40.0)
    return ct, heat


def _visible(fig):
    return [i for i, t in enumerate(fig.data) if t.visible is True]


def test_one_slider_step_and_two_traces_per_slice(crop):
    fig = viewers.axial_viewer(*crop, side="left", slice_labels_mm=LABELS_MM)
    (slider,) = fig.layout.sliders
    assert len(slider.steps) == N_SLICES
    assert len(fig.data) == 2 * N_SLICES
    for position, step in enumerate(slider.steps):
        shown = [i for i, v in enumerate(step.args[0]["visible"]) if v]
        assert shown == [2 * position, 2 * position + 1]


def test_slider_labels_are_world_z_from_cranial_to_caudal(crop):
    fig = viewers.axial_viewer(*crop, side="right", slice_labels_mm=LABELS_MM)
    labels = [float(s.label) for s in fig.layout.sliders[0].steps]
    assert labels == sorted(LABELS_MM, reverse=True)
    assert "mm" in fig.layout.sliders[0].currentvalue.suffix


def test_opens_on_the_strongest_heatmap_slice(crop):
    fig = viewers.axial_viewer(*crop, side="left", slice_labels_mm=LABELS_MM)
    active = fig.layout.sliders[0].active
    assert fig.layout.sliders[0].steps[active].label == f"{LABELS_MM[20]:.1f}"
    assert len(_visible(fig)) == 2


def test_heatmap_overlay_is_transparent_at_zero_and_uses_opacity(crop):
    fig = viewers.axial_viewer(*crop, side="left", opacity=0.7)
    heat = fig.data[1]
    assert heat.colorscale[0][1].replace(" ", "").endswith(",0.0)")
    assert heat.opacity == 0.7
    assert max(np.asarray(t.z).max() for t in fig.data[1::2]) == 255


def test_radiological_orientation_and_patient_labels(crop):
    fig = viewers.axial_viewer(*crop, side="right")
    assert fig.layout.xaxis.autorange == "reversed"  # patient's right on screen left
    assert fig.layout.yaxis.autorange in (None, True)  # anterior (high j) on top
    edges = {a.text: a.x for a in fig.layout.annotations}
    assert edges["R"] < 0.5 < edges["L"]
    assert {"A", "P"} <= set(edges)
    assert "Right" in fig.layout.title.text
    # rows are y, columns are x: the bright patient-right half is at high columns
    ct = np.asarray(fig.data[0].z)
    assert ct.shape == (CROP_SHAPE[1], CROP_SHAPE[0])
    assert ct[:, -1].mean() > ct[:, 0].mean()


def test_payload_is_uint8_and_modest(crop):
    fig = viewers.axial_viewer(*crop, side="left", slice_labels_mm=LABELS_MM)
    assert np.asarray(fig.data[0].z).dtype == np.uint8
    assert len(fig.to_json()) < 500_000
    assert json.loads(fig.to_json())["layout"]["meta"]["side"] == "left"


@pytest.mark.parametrize("kwargs,match", [
    ({"side": "middle"}, "side must be"),
    ({"side": "left", "opacity": 1.5}, "opacity"),
    ({"side": "left", "slice_labels_mm": [0.0]}, "one value per slice"),
])
def test_bad_arguments_are_named(crop, kwargs, match):
    with pytest.raises(ValueError, match=match):
        viewers.axial_viewer(*crop, **kwargs)


def test_heatmap_shape_must_match(crop):
    with pytest.raises(ValueError, match="heatmap must have"):
        viewers.axial_viewer(crop[0], crop[1][:, :, :5], side="left")


def test_bone_window_and_slice_positions():
    assert viewers.bone_window_uint8(np.array([-1000.0, 500.0, 3000.0])).tolist() == [
        0, 128, 255]
    affine = np.diag([2.0, 2.0, 3.0, 1.0])
    affine[2, 3] = -93.0
    assert viewers.slice_world_z_mm(affine, 3) == [-93.0, -90.0, -87.0]


def _side(side, decision, probability=0.7):
    affine = np.diag([2.0, 2.0, 3.0, 1.0])
    return SideResult(
        side=side, probability=probability, decision=decision,
        scored=decision != DECISION_IMPLANT,
        implant_detected=decision == DECISION_IMPLANT, metal_volume_mm3=0.0,
        padded_slices=4, crop_hu=np.zeros(CROP_SHAPE, np.float32), crop_affine=affine,
        network_input=np.zeros(CROP_SHAPE, np.float32),
        heatmap=np.zeros(CROP_SHAPE, np.float32),
    )


def test_side_viewer_builds_from_a_side_result():
    fig = viewers.side_viewer(_side("left", DECISION_HIGH))
    assert fig.layout.sliders[0].steps[0].label == f"{3.0 * (N_SLICES - 1):.1f}"


def test_summaries_in_patient_terms():
    text = viewers.side_summary_markdown(_side("right", DECISION_HIGH, 0.734), 0.5)
    assert "patient's right" in text and "73.4 %" in text and DECISION_HIGH in text
    assert "4 of the crop's slices" in text
    implant = viewers.side_summary_markdown(_side("left", DECISION_IMPLANT), 0.5)
    assert DECISION_IMPLANT in implant and "Probability" not in implant
    assert "for reference only" in implant
    landmarks = Landmarks(world_z_mm=12.34, slice_index=7,
                          aiis_world_mm={"left": None, "right": (1.0, 2.0, 3.0)},
                          femoral_head_world_mm={})
    text = viewers.landmark_summary_markdown(landmarks)
    assert "12.3 mm" in text and "slice 7" in text and "left AIIS was not found" in text
