"""Plotly figures and short text summaries of a prediction, for the web app.

Arrays in, figures or strings out; this module never imports torch. Arrays use the
package's axis order (x, y, z): index i grows towards the patient's right, j
anteriorly and k cranially. Every figure is drawn in world RAS+ millimetres, so the
CT, the heatmap (placed by the crop's affine) and the crop outline line up exactly.

Views follow the radiological convention and label their edges, so that nobody has
to remember it: axial with the patient's right on the screen's left and anterior on
top; coronal with the patient's right on the left and cranial on top; sagittal with
anterior on the left and cranial on top.

Gradio's ``gr.Plot`` hands plotly only a figure's data, layout and config, never its
animation frames. So each slice is its own pair of traces (CT and heatmap) and each
step of the slice slider switches which pair is visible, with plotly's ``update``
method, which also moves the crop outline and the landmark mark: moving a slider sends
nothing to the server.

What is sent to the browser is kept small: both layers as uint8 (base64 in plotly's
JSON), the CT on a display grid of the crop's spacing (2 x 2 x 3 mm) around the crop
only, and the 3D view on a 5 mm grid. Display grids are for looking only; the network
always sees the full-resolution crop.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass

import nibabel as nib
import numpy as np
import plotly.graph_objects as go

from femurrisk import geometry
from femurrisk.prediction import (
    DECISION_HIGH,
    DECISION_IMPLANT,
    SIDES,
    Landmarks,
    Prediction,
    SideResult,
)
from femurrisk.preprocessing import resample_to_grid


logger = logging.getLogger(__name__)

#: Heatmap colours from 0 to 1: fully transparent at 0 so that unattended bone shows
#: through unchanged, then red to yellow with rising opacity.
HEATMAP_COLORSCALE = [
    [0.0, "rgba(255, 0, 0, 0.0)"],
    [0.15, "rgba(255, 0, 0, 0.25)"],
    [0.5, "rgba(255, 110, 0, 0.7)"],
    [1.0, "rgba(255, 240, 0, 1.0)"],
]

#: The same hues for the 3D isosurfaces, opaque (their opacity is set per trace).
_HEAT_3D_COLORSCALE = [[0.0, "rgb(255, 0, 0)"], [0.5, "rgb(255, 110, 0)"],
                       [1.0, "rgb(255, 240, 0)"]]

_GRAY = [[0.0, "rgb(0, 0, 0)"], [1.0, "rgb(255, 255, 255)"]]
_EDGE_FONT = {"size": 18, "color": "#ffd24d"}


def bone_window_uint8(volume_hu: np.ndarray) -> np.ndarray:
    """Map Hounsfield units to 0-255 with the model's bone window.

    Args:
        volume_hu: Any array of Hounsfield units.

    Returns:
        uint8 array of the same shape: level 500 HU, width 2000 HU as in
        :mod:`femurrisk.geometry`, values outside the window clipped.
    """
    low = geometry.WINDOW_LEVEL_HU - geometry.WINDOW_WIDTH_HU / 2.0
    scaled = (np.asarray(volume_hu, dtype=np.float32) - low) / geometry.WINDOW_WIDTH_HU
    return np.clip(np.rint(scaled * 255.0), 0, 255).astype(np.uint8)


def slice_world_z_mm(affine: np.ndarray, n_slices: int) -> list[float]:
    """World z (RAS+ mm) of the centre of each axial slice of a crop.

    Args:
        affine: 4 x 4 voxel-to-world affine of the crop.
        n_slices: Number of slices (size of the array's third axis).

    Returns:
        One z per slice index k, rounded to 0.1 mm.
    """
    affine = np.asarray(affine, dtype=float)
    if affine.shape != (4, 4):
        raise ValueError(f"affine must be 4 x 4, not {affine.shape}")
    k = np.arange(n_slices, dtype=float)
    z = affine[2, 2] * k + affine[2, 3]  # the crop's in-plane centre shares this z
    return [round(float(v), 1) for v in z]




# --- Display grids ----------------------------------------------------------------------

PLANES = ("axial", "coronal", "sagittal")

#: Per plane: the axis a slice is taken along, the screen's horizontal and vertical
#: axes, the slider's direction (-1: from high to low world coordinate), and the edge
#: labels (left, right, top, bottom of the screen) with their meanings.
_PLANE_AXES = {
    "axial": (2, 0, 1, ("R", "L", "A", "P")),
    "coronal": (1, 0, 2, ("R", "L", "S", "I")),
    "sagittal": (0, 1, 2, ("A", "P", "S", "I")),
}
_AXIS_NAMES = ("x", "y", "z")
_EDGE_MEANING = {"R": "patient's right", "L": "patient's left", "A": "anterior",
                 "P": "posterior", "S": "cranial", "I": "caudal"}
_SLIDER_WORDS = {"axial": "cranial to caudal", "coronal": "anterior to posterior",
                 "sagittal": "patient's right to left"}

#: Display margins around the crop, voxels of the crop grid (2 x 2 x 3 mm): 24 mm
#: in-plane, 24 mm below the crop and 45 mm above the landmark, so that a misplaced
#: landmark can be judged against the anatomy above it.
DISPLAY_MARGIN_LOW = (12, 12, 8)
DISPLAY_MARGIN_HIGH = (12, 12, 15)

#: Grid of the 3D view, mm (isotropic): a coarse bone surface, light to send.
SCENE_SPACING_MM = 5.0
#: The 3D bone surface is drawn at this Hounsfield level (partial volume at 5 mm
#: lowers cortical bone well below its true value).
SCENE_BONE_HU = 180.0

_CROP_COLOR = "#ffd24d"
_LANDMARK_COLOR = "#4dff88"
_CURSOR_COLOR = "#4dd2ff"


@dataclass
class SideView:
    """What the 2D viewers of one side need, on a display grid around the crop.

    Attributes:
        side: ``"left"`` or ``"right"``, patient terms.
        ct_u8: Bone-windowed CT on the display grid, axes (x, y, z).
        affine: Display grid voxel-to-world (axis-aligned, positive spacing).
        heat: Explanation on the crop grid, 0-1, the crop's own (unmirrored) order.
        crop_affine: The crop's voxel-to-world affine.
        landmark_z_mm: AIIS level the crop starts from.
        landmark_method: ``"unet"`` or ``"manual"``.
    """

    side: str
    ct_u8: np.ndarray
    affine: np.ndarray
    heat: np.ndarray
    crop_affine: np.ndarray
    landmark_z_mm: float
    landmark_method: str = "unet"

    def axis_mm(self, axis: int) -> np.ndarray:
        """World coordinate of every display voxel along ``axis`` (0, 1, 2)."""
        return self.affine[axis, 3] + self.affine[axis, axis] * np.arange(
            self.ct_u8.shape[axis])

    def crop_axis_mm(self, axis: int) -> np.ndarray:
        return self.crop_affine[axis, 3] + self.crop_affine[axis, axis] * np.arange(
            self.heat.shape[axis])

    def crop_box_mm(self) -> list[tuple[float, float]]:
        """The crop's extent per axis, voxel edges included, world mm."""
        box = []
        for axis in range(3):
            centres = self.crop_axis_mm(axis)
            half = abs(self.crop_affine[axis, axis]) / 2.0
            box.append((float(centres.min() - half), float(centres.max() + half)))
        return box

    def peak_mm(self) -> dict[str, float]:
        """World position of the heatmap's peak; the crop centre when it is empty."""
        heat = np.nan_to_num(self.heat)
        if heat.max() > 0:
            ijk = np.unravel_index(int(np.argmax(heat)), heat.shape)
        else:
            ijk = tuple((n - 1) / 2.0 for n in heat.shape)
        xyz = nib.affines.apply_affine(self.crop_affine, np.array(ijk, dtype=float))
        return dict(zip(_AXIS_NAMES, (round(float(v), 1) for v in xyz)))


def _check_axis_aligned(affine: np.ndarray, what: str) -> np.ndarray:
    affine = np.asarray(affine, dtype=float)
    if affine.shape != (4, 4):
        raise ValueError(f"{what} must be 4 x 4, not {affine.shape}")
    linear = affine[:3, :3]
    oblique = np.abs(linear - np.diag(np.diag(linear))).max() > 1e-6
    if oblique or (np.diag(linear) <= 0).any():
        raise ValueError(f"{what} must be axis-aligned RAS+ with positive spacing")
    return affine


def _image_or_crop(image, result: SideResult) -> nib.Nifti1Image:
    """The CT to show; the crop itself when the prediction kept no image."""
    if image is not None:
        return image
    return nib.Nifti1Image(np.asarray(result.crop_hu, np.float32), result.crop_affine)


def side_view(result: SideResult, image=None, landmarks: Landmarks | None = None
              ) -> SideView:
    """The display grid of one side: the crop grid widened by the display margins.

    Args:
        result: One side of a prediction.
        image: The CT in the canonical RAS+ frame (``Prediction.image``); when None,
            only the crop itself is shown.
        landmarks: The prediction's landmarks (for the landmark level and method);
            the crop's top slice when None.

    Returns:
        The side's :class:`SideView`; the CT is resampled (trilinear) onto the grid.
    """
    crop_affine = _check_axis_aligned(result.crop_affine, "crop_affine")
    low = np.array(DISPLAY_MARGIN_LOW)
    shape = tuple(int(n) for n in np.array(result.crop_hu.shape) + low
                  + np.array(DISPLAY_MARGIN_HIGH))
    affine = crop_affine.copy()
    affine[:3, 3] = crop_affine[:3, 3] - np.diag(crop_affine)[:3] * low
    volume = resample_to_grid(_image_or_crop(image, result), shape, affine, order=1,
                              cval=geometry.PAD_HU)
    top_z = float(crop_affine[2, 3] + crop_affine[2, 2] * (result.crop_hu.shape[2] - 1))
    return SideView(
        side=result.side, ct_u8=bone_window_uint8(volume), affine=affine,
        heat=np.clip(np.nan_to_num(np.asarray(result.heatmap, np.float32)), 0, 1),
        crop_affine=crop_affine,
        landmark_z_mm=float(landmarks.world_z_mm) if landmarks else top_z,
        landmark_method=landmarks.method if landmarks else "unet",
    )


# --- 2D viewer --------------------------------------------------------------------------


def _heat_u8(heat: np.ndarray, threshold: float) -> np.ndarray:
    values = np.rint(np.clip(heat, 0.0, 1.0) * 255.0).astype(np.uint8)
    values[heat < threshold] = 0  # transparent: the colour scale starts clear
    return values


def _edge_labels(letters: Sequence[str]) -> list[dict]:
    """Letters written just outside the image's left, right, top and bottom edges."""
    common = {"showarrow": False, "font": _EDGE_FONT, "xref": "x domain",
              "yref": "y domain"}
    places = [(-0.02, 0.5, "right", "middle"), (1.02, 0.5, "left", "middle"),
              (0.5, 1.01, "center", "bottom"), (0.5, -0.01, "center", "top")]
    return [
        {"text": text, "x": x, "y": y, "xanchor": xa, "yanchor": ya,
         "hovertext": _EDGE_MEANING[text], "name": f"edge {text}", **common}
        for text, (x, y, xa, ya) in zip(letters, places)
    ]


def _line(x0, x1, y0, y1, color, dash, name, visible=True) -> dict:
    return {"type": "line", "x0": x0, "x1": x1, "y0": y0, "y1": y1, "xref": "x",
            "yref": "y", "line": {"color": color, "width": 1.5, "dash": dash},
            "name": name, "visible": visible}


def _check_viewer_args(plane: str, opacity: float, threshold: float) -> None:
    if plane not in PLANES:
        raise ValueError(f"plane must be one of {PLANES}, not {plane!r}")
    if not 0.0 <= opacity <= 1.0:
        raise ValueError(f"opacity must be within 0-1, not {opacity}")
    if not 0.0 <= threshold <= 1.0:
        raise ValueError(f"threshold must be within 0-1, not {threshold}")


def plane_viewer(
    view: SideView,
    plane: str = "axial",
    *,
    cursor: dict[str, float] | None = None,
    opacity: float = 0.5,
    threshold: float = 0.0,
    method_label: str = "Grad-CAM",
) -> go.Figure:
    """One side's CT in one plane with the heatmap laid over it and a slice slider.

    The slider steps through the plane's slices (axial: cranial to caudal; coronal:
    anterior to posterior; sagittal: patient's right to left) and shows each slice's
    world position in mm. Drawn on top: the 32-slice crop outline (dashed yellow, on
    slices that cut the crop), the landmark (green: a line in coronal and sagittal
    views, a label on the axial landmark slice) and the other two planes' positions
    (dotted blue), which is how the three planes are linked.

    Args:
        view: The side's display grid (:func:`side_view`).
        plane: ``"axial"``, ``"coronal"`` or ``"sagittal"``.
        cursor: World point (keys ``x``, ``y``, ``z``, mm) the three planes go
            through; the heatmap's peak when None.
        opacity: Opacity of the heatmap layer, 0-1.
        threshold: Heatmap values below this (0-1) are not drawn.
        method_label: Name of the explanation, for the colour bar.

    Returns:
        A figure with one CT trace per slice, one heatmap trace per slice that cuts
        the crop, and one slider step per slice.

    Raises:
        ValueError: If plane, opacity or threshold are out of range.
    """
    _check_viewer_args(plane, opacity, threshold)
    normal, across, up, letters = _PLANE_AXES[plane]
    cursor = {**view.peak_mm(), **(cursor or {})}
    positions = view.axis_mm(normal)
    order = list(np.argsort(-positions, kind="stable"))  # high to low world coordinate
    crop_positions = view.crop_axis_mm(normal)
    heat_u8 = _heat_u8(view.heat, threshold)
    spacing = np.diag(view.affine)[:3]
    crop_spacing = np.diag(view.crop_affine)[:3]

    fig = go.Figure()
    groups = []
    for index in order:
        fig.add_trace(go.Heatmap(
            z=np.take(view.ct_u8, index, axis=normal).T, x0=view.affine[across, 3],
            dx=spacing[across], y0=view.affine[up, 3], dy=spacing[up], zmin=0, zmax=255,
            colorscale=_GRAY, showscale=False, hoverinfo="skip", visible=False,
            name=f"CT {plane} {positions[index]:.1f}", meta="ct",
        ))
        group = [len(fig.data) - 1]
        distance = np.abs(crop_positions - positions[index])
        k = int(np.argmin(distance))
        if distance[k] < 0.25 * crop_spacing[normal]:
            fig.add_trace(go.Heatmap(
                z=np.take(heat_u8, k, axis=normal).T, x0=view.crop_affine[across, 3],
                dx=crop_spacing[across], y0=view.crop_affine[up, 3], dy=crop_spacing[up],
                zmin=0, zmax=255, colorscale=HEATMAP_COLORSCALE, opacity=opacity,
                hoverinfo="skip", visible=False, meta="heat", showscale=False,
                name=f"heatmap {plane} {positions[index]:.1f}",
            ))
            group.append(len(fig.data) - 1)
        groups.append(group)

    # A colour bar that stays put whichever slice is shown.
    fig.add_trace(go.Heatmap(
        z=[[0, 255]], x0=view.affine[across, 3], y0=view.affine[up, 3], zmin=0, zmax=255,
        colorscale=HEATMAP_COLORSCALE, opacity=0.0, hoverinfo="skip", visible=True,
        name="colour bar", meta="colorbar",
        colorbar={"title": {"text": method_label}, "tickvals": [0, 127.5, 255],
                  "ticktext": ["0", "0.5", "1"], "len": 0.7, "thickness": 12},
    ))

    box = view.crop_box_mm()
    shapes = [{"type": "rect", "x0": box[across][0], "x1": box[across][1],
               "y0": box[up][0], "y1": box[up][1], "xref": "x", "yref": "y",
               "line": {"color": _CROP_COLOR, "width": 1.5, "dash": "dash"},
               "name": "crop outline", "visible": False}]
    extent = [(float(view.axis_mm(a).min()), float(view.axis_mm(a).max()))
              for a in range(3)]
    how = "set by hand" if view.landmark_method == "manual" else "landmark network"
    annotations = _edge_labels(letters)
    if plane != "axial":  # the landmark level is a line across the image
        shapes.append(_line(*extent[across], view.landmark_z_mm, view.landmark_z_mm,
                            _LANDMARK_COLOR, "solid", "landmark level"))
        annotations.append({"text": f"AIIS level ({how})", "x": extent[across][1],
                            "y": view.landmark_z_mm, "xref": "x", "yref": "y",
                            "showarrow": False, "xanchor": "left", "yanchor": "bottom",
                            "font": {"color": _LANDMARK_COLOR, "size": 11},
                            "name": "landmark label"})
    else:  # the landmark is one of the slices: say so on it
        annotations.append({"text": f"AIIS landmark slice ({how})", "x": 0.02, "y": 0.98,
                            "xref": "x domain", "yref": "y domain", "showarrow": False,
                            "xanchor": "left", "yanchor": "top", "visible": False,
                            "font": {"color": _LANDMARK_COLOR, "size": 12},
                            "name": "landmark label"})
    for axis in (across, up):  # where the other two planes cut this one
        value = float(cursor[_AXIS_NAMES[axis]])
        if axis == across:
            shapes.append(_line(value, value, *extent[up], _CURSOR_COLOR, "dot",
                                f"cursor {_AXIS_NAMES[axis]}"))
        else:
            shapes.append(_line(*extent[across], value, value, _CURSOR_COLOR, "dot",
                                f"cursor {_AXIS_NAMES[axis]}"))

    landmark_index = None
    if plane == "axial":
        landmark_index = int(np.argmin(np.abs(positions - view.landmark_z_mm)))
    wanted = float(cursor[_AXIS_NAMES[normal]])
    active = int(np.argmin([abs(positions[i] - wanted) for i in order]))
    steps = []
    n_traces = len(fig.data)
    for position, (index, group) in enumerate(zip(order, groups)):
        visible = [False] * n_traces
        for t in group:
            visible[t] = True
        visible[-1] = True  # the colour bar
        inside = box[normal][0] <= positions[index] <= box[normal][1]
        relayout = {"shapes[0].visible": bool(inside)}
        if plane == "axial":
            relayout[f"annotations[{len(annotations) - 1}].visible"] = bool(
                index == landmark_index)
        steps.append({"method": "update", "args": [{"visible": visible}, relayout],
                      "label": f"{positions[index]:.1f}"})
        if position == active:
            for t in group:
                fig.data[t].visible = True
            shapes[0]["visible"] = bool(inside)
            if plane == "axial":
                annotations[-1]["visible"] = bool(index == landmark_index)

    axis_name = _AXIS_NAMES[normal]
    slider = {
        "active": active, "steps": steps, "pad": {"t": 28, "b": 4}, "len": 1.0,
        # The tick labels are hidden (transparent); the current value needs its own
        # colour, or it inherits theirs and is drawn invisibly.
        "currentvalue": {"visible": True, "prefix": f"{plane} slice, {axis_name} = ",
                         "suffix": " mm (world RAS+)",
                         "font": {"size": 13, "color": "#e8e8e8"}},
        "font": {"size": 6, "color": "rgba(0,0,0,0)"}, "ticklen": 2, "minorticklen": 0,
        "name": f"{plane} slice",
    }
    side_title = f"{view.side.capitalize()} proximal femur, {plane}"
    fig.update_layout(
        template="none",
        title={"text": f"{side_title}<br><sup>radiological view; slider: "
                       f"{_SLIDER_WORDS[plane]}. Dashed yellow: the 32-slice crop; "
                       "dotted blue: the other planes</sup>", "font": {"size": 15}},
        sliders=[slider], shapes=shapes, annotations=annotations,
        margin={"l": 34, "r": 16, "t": 78, "b": 8}, height=560,
        paper_bgcolor="#1b1b1b", plot_bgcolor="#000000", font={"color": "#e8e8e8"},
        meta={"side": view.side, "plane": plane, "axis": axis_name,
              "positions_mm": [round(float(positions[i]), 1) for i in order],
              "cursor": cursor, "landmark_z_mm": round(view.landmark_z_mm, 1),
              "landmark_method": view.landmark_method},
    )
    fig.update_xaxes(autorange="reversed", showticklabels=False, showgrid=False,
                     zeroline=False, constrain="domain")
    fig.update_yaxes(scaleanchor="x", scaleratio=1.0, showticklabels=False,
                     showgrid=False, zeroline=False, constrain="domain")
    logger.debug("%s viewer built: side=%s, %d slices", plane, view.side, len(order))
    return fig


# --- 3D view ----------------------------------------------------------------------------


@dataclass
class Scene3D:
    """Both femurs on one coarse grid for the 3D view.

    Attributes:
        ct_u8: Bone-windowed CT on the scene grid, axes (x, y, z).
        heat: Per side, the explanation (0-1) on the same grid, zero outside its crop.
        origin_mm: World position of voxel (0, 0, 0); the grid is axis-aligned with
            :data:`SCENE_SPACING_MM` spacing and whole-millimetre coordinates.
        femoral_head_mm: Per side, the femoral head centre (labels L and R).
        landmark_z_mm: AIIS level.
    """

    ct_u8: np.ndarray
    heat: dict[str, np.ndarray]
    origin_mm: np.ndarray
    femoral_head_mm: dict[str, tuple[float, float, float]]
    landmark_z_mm: float


def scene_3d(prediction: Prediction) -> Scene3D:
    """Resample the CT and both heatmaps onto one 5 mm grid around both crops."""
    spacing = SCENE_SPACING_MM
    boxes = []
    for result in prediction.sides.values():
        corners = np.array([[i, j, k] for i in (0, result.crop_hu.shape[0] - 1)
                            for j in (0, result.crop_hu.shape[1] - 1)
                            for k in (0, result.crop_hu.shape[2] - 1)], dtype=float)
        boxes.append(nib.affines.apply_affine(result.crop_affine, corners))
    corners = np.concatenate(boxes)
    low = np.floor((corners.min(axis=0) - [10.0, 10.0, 10.0]) / spacing) * spacing
    high = corners.max(axis=0) + [10.0, 10.0, 30.0]
    shape = tuple(int(n) for n in np.ceil((high - low) / spacing) + 1)
    affine = np.diag([spacing, spacing, spacing, 1.0])
    affine[:3, 3] = low

    if prediction.image is not None:
        ct = resample_to_grid(prediction.image, shape, affine, order=1,
                              cval=geometry.PAD_HU)
    else:
        ct = np.full(shape, geometry.PAD_HU, np.float32)
        for result in prediction.sides.values():
            crop = nib.Nifti1Image(np.asarray(result.crop_hu, np.float32),
                                   result.crop_affine)
            ct = np.maximum(ct, resample_to_grid(crop, shape, affine, order=1,
                                                 cval=geometry.PAD_HU))
    heat = {}
    for side, result in prediction.sides.items():
        image = nib.Nifti1Image(np.asarray(result.heatmap, np.float32),
                                result.crop_affine)
        placed = resample_to_grid(image, shape, affine, order=1, cval=0.0)
        heat[side] = np.clip(placed, 0, 1)
    return Scene3D(ct_u8=bone_window_uint8(ct), heat=heat, origin_mm=low,
                   femoral_head_mm=dict(prediction.landmarks.femoral_head_world_mm),
                   landmark_z_mm=float(prediction.landmarks.world_z_mm))


def _grid_coordinates(shape, origin_mm, spacing: float, box=None):
    """Flattened world x, y, z (int16 mm) of a grid, or of a sub-box of it."""
    box = box or tuple(slice(0, n) for n in shape)
    axes = [np.rint(origin_mm[a] + spacing * np.arange(shape[a])[box[a]]).astype(np.int16)
            for a in range(3)]
    x, y, z = np.meshgrid(*axes, indexing="ij")
    return x.ravel(), y.ravel(), z.ravel()


def _bone_level_u8() -> float:
    low = geometry.WINDOW_LEVEL_HU - geometry.WINDOW_WIDTH_HU / 2.0
    return (SCENE_BONE_HU - low) / geometry.WINDOW_WIDTH_HU * 255.0


def figure_3d(scene: Scene3D, *, threshold: float = 0.0, opacity: float = 0.5,
              method_label: str = "Grad-CAM") -> go.Figure:
    """Bone surface of both hips with each side's heatmap as coloured isosurfaces.

    Seen from the front at first (the patient's right on the screen's left), and
    rotatable; each femur carries an L or R label in patient terms.

    Args:
        scene: From :func:`scene_3d`.
        threshold: Heatmap isosurfaces start at this value (at least 0.3).
        opacity: Opacity of the heatmap isosurfaces.
        method_label: Name of the explanation, for the colour bar.
    """
    if not 0.0 <= threshold <= 1.0:
        raise ValueError(f"threshold must be within 0-1, not {threshold}")
    if not 0.0 <= opacity <= 1.0:
        raise ValueError(f"opacity must be within 0-1, not {opacity}")
    shape = scene.ct_u8.shape
    x, y, z = _grid_coordinates(shape, scene.origin_mm, SCENE_SPACING_MM)
    fig = go.Figure()
    fig.add_trace(go.Isosurface(
        # Two surfaces, at the bone level and at the top of the window (metal).
        x=x, y=y, z=z, value=scene.ct_u8.ravel(), isomin=_bone_level_u8(), isomax=254,
        surface={"count": 2}, caps={"x_show": False, "y_show": False, "z_show": False},
        colorscale=[[0, "#e8dcc0"], [1, "#e8dcc0"]], showscale=False, opacity=0.35,
        flatshading=False, name="bone", meta="bone", hoverinfo="skip",
        lighting={"ambient": 0.5, "diffuse": 0.8, "specular": 0.2},
    ))
    level = max(threshold, 0.3)
    for side in SIDES:
        heat = scene.heat.get(side)
        if heat is None or heat.max() < level:
            continue
        # Only the box around the drawn isosurfaces travels to the browser.
        box = tuple(slice(max(int(a.min()) - 1, 0), int(a.max()) + 2)
                    for a in np.nonzero(heat >= level))
        hx, hy, hz = _grid_coordinates(shape, scene.origin_mm, SCENE_SPACING_MM, box)
        fig.add_trace(go.Isosurface(
            x=hx, y=hy, z=hz, value=np.rint(heat[box] * 255).astype(np.uint8).ravel(),
            isomin=level * 255, isomax=255, surface={"count": 3},
            caps={"x_show": False, "y_show": False, "z_show": False},
            colorscale=_HEAT_3D_COLORSCALE,
            cmin=0, cmax=255, opacity=opacity, name=f"heatmap {side}", meta="heat",
            showscale=side == "left", hoverinfo="skip",
            colorbar={"title": {"text": method_label}, "tickvals": [0, 127.5, 255],
                      "ticktext": ["0", "0.5", "1"], "len": 0.6, "thickness": 12},
        ))

    annotations = []
    for side, letter in (("right", "R"), ("left", "L")):
        head = scene.femoral_head_mm.get(side)
        if head is None:
            continue
        lateral = 1.0 if side == "right" else -1.0  # RAS+: the right is +x
        annotations.append({
            "x": head[0] + lateral * 75.0, "y": head[1], "z": head[2], "text": letter,
            "showarrow": False, "font": {"size": 22, "color": "#ffd24d"},
            "hovertext": f"patient's {side}",
        })
    axis = {"showbackground": False, "color": "#bbbbbb", "showspikes": False}
    fig.update_layout(
        template="none", height=520, margin={"l": 0, "r": 0, "t": 60, "b": 0},
        title={"text": "Both proximal femurs, 3D<br><sup>bone surface with the heatmap; "
                       "drag to rotate. Seen from the front: the patient's right (R) "
                       "on the screen's left</sup>", "font": {"size": 15}},
        paper_bgcolor="#1b1b1b", font={"color": "#e8e8e8"},
        scene={"xaxis": {**axis, "title": {"text": "x mm (to patient's right)"}},
               "yaxis": {**axis, "title": {"text": "y mm (anterior)"}},
               "zaxis": {**axis, "title": {"text": "z mm (cranial)"}},
               "aspectmode": "data", "annotations": annotations,
               "camera": {"eye": {"x": 0.0, "y": 1.9, "z": 0.35},
                          "up": {"x": 0, "y": 0, "z": 1}}},
        meta={"view": "3d", "landmark_z_mm": round(scene.landmark_z_mm, 1)},
    )
    return fig


def side_viewer(result: SideResult, *, opacity: float = 0.5) -> go.Figure:
    """The axial viewer of one side of a prediction, on the crop and its margins."""
    return plane_viewer(side_view(result), "axial", opacity=opacity)


def format_probability(probability: float) -> str:
    """A probability as a percentage with one decimal, e.g. ``"12.5 %"``."""
    if not math.isfinite(probability):
        return "n/a"
    return f"{100.0 * probability:.1f} %"


def side_summary_markdown(result: SideResult, threshold: float) -> str:
    """Markdown lines with one side's probability, decision and crop caveats.

    Args:
        result: One side of a prediction.
        threshold: The model's decision threshold on the probability.

    Returns:
        A short Markdown block headed by the side in patient terms.
    """
    lines = [f"### {result.side.capitalize()} femur (patient's {result.side})"]
    if result.decision == DECISION_IMPLANT:
        # No number is shown: a probability beside an implant would read as a risk.
        lines.append(f"**{DECISION_IMPLANT}** (metal: "
                     f"{result.metal_volume_mm3:.0f} mm³); the model does not cover "
                     "femurs with implants. The crop and heatmap are shown for "
                     "inspection; the heatmap is scaled on its own.")
    elif not result.scored:
        lines.append(f"**{result.decision}**: more than half of the crop lay beyond "
                     "the end of the scan, so the model was not applied.")
    else:
        emphasis = "⚠️ " if result.decision == DECISION_HIGH else ""
        lines.append(f"Probability of pathologic fracture within 3 months: "
                     f"**{format_probability(result.probability)}**")
        lines.append(f"Decision at the model's threshold "
                     f"({format_probability(threshold)}): "
                     f"{emphasis}**{result.decision}**")
    if result.padded_slices:
        lines.append(f"{result.padded_slices} of the crop's slices lay outside the "
                     "scan and were filled with air.")
    return "\n\n".join(lines)


def landmark_summary_markdown(landmarks: Landmarks) -> str:
    """Markdown describing the AIIS level the crops start from.

    Args:
        landmarks: The landmarks of a prediction.

    Returns:
        One short paragraph; says when a side's AIIS was not found or the level was
        set by hand.
    """
    manual = landmarks.method == "manual"
    how = "set by hand" if manual else "found by the landmark network"
    text = (f"AIIS level {how}: world z = {landmarks.world_z_mm:.1f} mm (RAS+), "
            f"input slice {landmarks.slice_index}.")
    missing = [s for s in SIDES if landmarks.aiis_world_mm.get(s) is None]
    if not manual and missing:
        text += (f" The {' and '.join(missing)} AIIS was not found; the level comes "
                 "from the other side.")
    return text


def warnings_markdown(prediction: Prediction) -> str:
    """The prediction's warnings as a Markdown list, or a line saying there are none."""
    if not prediction.warnings:
        return "No warnings."
    return "\n".join(f"- {w}" for w in prediction.warnings)
