"""Tests of femurrisk.viewers on small synthetic crops and scans."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest

from femurrisk import viewers
from femurrisk.geometry import CROP_SHAPE
from femurrisk.prediction import (
    DECISION_HIGH, DECISION_IMPLANT, Landmarks, Prediction, SideResult,
)

N_SLICES = CROP_SHAPE[2]
HEAT_PEAK = (40, 20, 20)  # crop voxel of the heatmap's peak


def _crop_affine(origin=(-130.0, -60.0, -93.0)):
    affine = np.diag([2.0, 2.0, 3.0, 1.0])
    affine[:3, 3] = origin
    return affine


def _side(side="left", decision=DECISION_HIGH, probability=0.7, origin=None):
    """A side whose crop is bright at high x (patient's right) and whose heat peaks at
    HEAT_PEAK."""
    x, y, z = np.meshgrid(*(np.arange(n) for n in CROP_SHAPE), indexing="ij")
    crop_hu = np.where(x > 40, 1200.0, -200.0).astype(np.float32)
    heat = np.exp(-sum((g - c) ** 2 for g, c in zip((x, y, z), HEAT_PEAK)) / 20.0)
    origin = origin or ((-130.0, -60.0, -93.0) if side == "left" else (40.0, -60.0, -93.0))
    return SideResult(
        side=side, probability=probability, decision=decision,
        scored=decision != DECISION_IMPLANT,
        implant_detected=decision == DECISION_IMPLANT, metal_volume_mm3=0.0,
        padded_slices=4, crop_hu=crop_hu, crop_affine=_crop_affine(origin),
        network_input=np.zeros(CROP_SHAPE, np.float32),
        heatmap=heat.astype(np.float32),
    )


def _landmarks(z=0.0, method="unet"):
    return Landmarks(world_z_mm=z, slice_index=7,
                     aiis_world_mm={"left": (-60.0, 20.0, z), "right": (60.0, 20.0, z)},
                     femoral_head_world_mm={"left": (-90.0, 0.0, -30.0),
                                            "right": (90.0, 0.0, -30.0)},
                     method=method)


@pytest.fixture
def view():
    return viewers.side_view(_side("left"), None, _landmarks())


def _visible(fig):
    return [i for i, t in enumerate(fig.data) if t.visible is True]


def _step_visible(step):
    return [i for i, v in enumerate(step.args[0]["visible"]) if v]


# --- display grid ----------------------------------------------------------------------


def test_display_grid_extends_the_crop_grid_and_keeps_its_world(view):
    shape = np.array(CROP_SHAPE) + viewers.DISPLAY_MARGIN_LOW + np.array(
        viewers.DISPLAY_MARGIN_HIGH)
    assert view.ct_u8.shape == tuple(shape) and view.ct_u8.dtype == np.uint8
    # The crop voxel (i, j, k) sits at display voxel (i, j, k) + margin, same world point.
    margin = np.array(viewers.DISPLAY_MARGIN_LOW)
    world = nib.affines.apply_affine(view.crop_affine, [10, 20, 30])
    assert np.allclose(nib.affines.apply_affine(view.affine, np.add([10, 20, 30], margin)),
                       world)
    # The bright (patient-right) half of the crop is bright on the display grid too.
    i, j, k = margin + [50, 30, 10]
    assert view.ct_u8[i, j, k] > 200 and view.ct_u8[i - 20, j, k] < 100


def test_heat_peak_is_reported_in_world_mm(view):
    peak = view.peak_mm()
    expected = nib.affines.apply_affine(view.crop_affine, HEAT_PEAK)
    assert [peak[a] for a in "xyz"] == pytest.approx(list(expected), abs=0.05)


def test_side_view_uses_the_ct_around_the_crop():
    """With the whole image, the display shows anatomy outside the crop too."""
    volume = np.full((100, 80, 60), 1500.0, np.float32)
    image = nib.Nifti1Image(volume, np.diag([3.0, 3.0, 3.0, 1.0]) + np.array(
        [[0, 0, 0, -150.0], [0, 0, 0, -120.0], [0, 0, 0, -120.0], [0, 0, 0, 0]]))
    view = viewers.side_view(_side("left"), image, _landmarks())
    assert view.ct_u8[2, 2, 10] == 255  # margin voxel: the image, not air


# --- plane viewer -----------------------------------------------------------------------


@pytest.mark.parametrize("plane", viewers.PLANES)
def test_one_slider_step_per_slice_showing_one_ct_and_at_most_one_heat(view, plane):
    fig = viewers.plane_viewer(view, plane)
    (slider,) = fig.layout.sliders
    normal = {"axial": 2, "coronal": 1, "sagittal": 0}[plane]
    assert len(slider.steps) == view.ct_u8.shape[normal]
    for step in slider.steps:
        shown = [fig.data[i].meta for i in _step_visible(step)]
        assert shown.count("ct") == 1 and shown.count("heat") <= 1
        assert shown.count("colorbar") == 1
    # Exactly the slices that cut the crop carry a heatmap trace.
    assert sum(t.meta == "heat" for t in fig.data) == CROP_SHAPE[normal]


@pytest.mark.parametrize("plane,axis", [("axial", "z"), ("coronal", "y"),
                                        ("sagittal", "x")])
def test_slider_runs_from_high_to_low_world_position_in_mm(view, plane, axis):
    fig = viewers.plane_viewer(view, plane)
    labels = [float(s.label) for s in fig.layout.sliders[0].steps]
    assert labels == sorted(labels, reverse=True)
    assert fig.layout.meta["axis"] == axis
    assert fig.layout.meta["positions_mm"] == pytest.approx(labels)
    assert "mm" in fig.layout.sliders[0].currentvalue.suffix


@pytest.mark.parametrize("plane", viewers.PLANES)
def test_opens_on_the_heat_peak_and_the_heat_lies_on_it_in_world(view, plane):
    fig = viewers.plane_viewer(view, plane)
    peak = view.peak_mm()
    meta = fig.layout.meta
    active = fig.layout.sliders[0].active
    assert meta["positions_mm"][active] == pytest.approx(peak[meta["axis"]], abs=0.05)
    heat = next(fig.data[i] for i in _visible(fig) if fig.data[i].meta == "heat")
    z = np.asarray(heat.z)
    row, col = np.unravel_index(int(np.argmax(z)), z.shape)
    across, up = {"axial": ("x", "y"), "coronal": ("x", "z"),
                  "sagittal": ("y", "z")}[plane]
    assert heat.x0 + col * heat.dx == pytest.approx(peak[across])
    assert heat.y0 + row * heat.dy == pytest.approx(peak[up])


def test_radiological_orientation_and_edge_labels(view):
    expected = {"axial": "RLAP", "coronal": "RLSI", "sagittal": "APSI"}
    for plane, letters in expected.items():
        fig = viewers.plane_viewer(view, plane)
        assert fig.layout.xaxis.autorange == "reversed"  # high x / high y on the left
        edges = {a.text: a.x for a in fig.layout.annotations if a.xref == "x domain"
                 and a.text in letters}
        assert edges[letters[0]] < 0.5 < edges[letters[1]]
    # Axial: rows are y and columns x; the patient-right (high x) half is bright.
    fig = viewers.plane_viewer(view, "axial")
    ct = np.asarray(fig.data[_visible(fig)[0]].z)
    assert ct.shape == (view.ct_u8.shape[1], view.ct_u8.shape[0])
    assert ct[:, -20].mean() > ct[:, 20].mean()
    assert "Left" in fig.layout.title.text


def test_crop_outline_shows_only_on_slices_through_the_crop(view):
    fig = viewers.plane_viewer(view, "axial")
    assert fig.layout.shapes[0].name == "crop outline"
    box = view.crop_box_mm()
    for step in fig.layout.sliders[0].steps:
        inside = box[2][0] <= float(step.label) <= box[2][1]
        assert step.args[1]["shapes[0].visible"] is inside
    shown = sum(s.args[1]["shapes[0].visible"] for s in fig.layout.sliders[0].steps)
    assert shown == N_SLICES


def test_landmark_is_marked_and_says_how_it_was_set():
    view = viewers.side_view(_side("left"), None, _landmarks(0.0, "manual"))
    coronal = viewers.plane_viewer(view, "coronal")
    line = next(s for s in coronal.layout.shapes if s.name == "landmark level")
    assert line.y0 == line.y1 == 0.0
    assert any("set by hand" in a.text for a in coronal.layout.annotations)
    axial = viewers.plane_viewer(view, "axial")
    label = [i for i, a in enumerate(axial.layout.annotations) if "landmark" in a.text]
    (index,) = label
    marked = [float(s.label) for s in axial.layout.sliders[0].steps
              if s.args[1].get(f"annotations[{index}].visible")]
    assert marked == [0.0]  # exactly the landmark slice, the crop's top


def test_cursor_sets_the_slice_and_the_other_planes_lines(view):
    cursor = {"x": -100.0, "y": -20.0, "z": -30.0}
    fig = viewers.plane_viewer(view, "coronal", cursor=cursor)
    meta = fig.layout.meta
    assert meta["positions_mm"][fig.layout.sliders[0].active] == pytest.approx(-20.0)
    lines = {s.name: s for s in fig.layout.shapes}
    assert lines["cursor x"].x0 == -100.0 and lines["cursor z"].y0 == -30.0


def test_threshold_and_opacity(view):
    fig = viewers.plane_viewer(view, "axial", opacity=0.7, threshold=0.5)
    heat = [t for t in fig.data if t.meta == "heat"]
    assert all(t.opacity == 0.7 for t in heat)
    values = np.concatenate([np.asarray(t.z).ravel() for t in heat])
    assert values.max() == 255 and values[values > 0].min() >= 127
    assert heat[0].colorscale[0][1].replace(" ", "").endswith(",0.0)")  # clear at 0


@pytest.mark.parametrize("kwargs,match", [
    ({"plane": "oblique"}, "plane must be"),
    ({"opacity": 1.5}, "opacity"),
    ({"threshold": -0.1}, "threshold"),
])
def test_bad_arguments_are_named(view, kwargs, match):
    with pytest.raises(ValueError, match=match):
        viewers.plane_viewer(view, **kwargs)


def test_oblique_crop_affine_is_refused():
    side = _side("left")
    side.crop_affine = side.crop_affine.copy()
    side.crop_affine[0, 1] = 0.5
    with pytest.raises(ValueError, match="axis-aligned"):
        viewers.side_view(side)


def test_payload_is_uint8_and_modest(view):
    fig = viewers.plane_viewer(view, "axial")
    assert np.asarray(fig.data[0].z).dtype == np.uint8
    payload = fig.to_json()
    assert len(payload) < 1_000_000
    assert json.loads(payload)["layout"]["meta"]["side"] == "left"


# --- 3D view ----------------------------------------------------------------------------


def _prediction():
    sides = {"left": _side("left"), "right": _side("right")}
    return Prediction(sides=sides, landmarks=_landmarks(), threshold=0.5,
                      input_description="synthetic", input_kind="nifti",
                      input_shape=(1, 1, 1), input_spacing_mm=(1.0, 1.0, 1.0), model={})


def test_scene_puts_both_heatmaps_in_world_space():
    scene = viewers.scene_3d(_prediction())
    spacing = viewers.SCENE_SPACING_MM
    for side in ("left", "right"):
        heat = scene.heat[side]
        peak = np.array(np.unravel_index(int(np.argmax(heat)), heat.shape))
        world = scene.origin_mm + spacing * peak
        expected = nib.affines.apply_affine(_prediction().sides[side].crop_affine,
                                            HEAT_PEAK)
        assert np.abs(world - expected).max() <= spacing
    assert (scene.origin_mm == np.rint(scene.origin_mm)).all()


def test_3d_figure_labels_patient_sides_and_stays_small():
    fig = viewers.figure_3d(viewers.scene_3d(_prediction()), threshold=0.2)
    kinds = [t.meta for t in fig.data]
    assert kinds.count("bone") == 1 and kinds.count("heat") == 2
    labels = {a.text: a.x for a in fig.layout.scene.annotations}
    assert labels["R"] > 0 > labels["L"]  # RAS+: the patient's right is +x
    assert fig.layout.scene.camera.eye.y > 0  # seen from the front
    assert np.asarray(fig.data[0].x).dtype == np.int16
    assert len(fig.to_json()) < 1_500_000


# --- summaries --------------------------------------------------------------------------


def test_bone_window_and_slice_positions():
    assert viewers.bone_window_uint8(np.array([-1000.0, 500.0, 3000.0])).tolist() == [
        0, 128, 255]
    affine = np.diag([2.0, 2.0, 3.0, 1.0])
    affine[2, 3] = -93.0
    assert viewers.slice_world_z_mm(affine, 3) == [-93.0, -90.0, -87.0]


def test_side_viewer_builds_from_a_side_result():
    fig = viewers.side_viewer(_side("left", DECISION_HIGH))
    assert fig.layout.meta["plane"] == "axial"


def test_summaries_in_patient_terms():
    text = viewers.side_summary_markdown(_side("right", DECISION_HIGH, 0.734), 0.5)
    assert "patient's right" in text and "73.4 %" in text and DECISION_HIGH in text
    assert "4 of the crop's slices" in text
    implant = viewers.side_summary_markdown(_side("left", DECISION_IMPLANT), 0.5)
    assert DECISION_IMPLANT in implant and "Probability" not in implant
    assert "%" not in implant  # no number beside an implant: it would read as a risk
    landmarks = Landmarks(world_z_mm=12.34, slice_index=7,
                          aiis_world_mm={"left": None, "right": (1.0, 2.0, 3.0)},
                          femoral_head_world_mm={})
    text = viewers.landmark_summary_markdown(landmarks)
    assert "12.3 mm" in text and "slice 7" in text and "left AIIS was not found" in text
