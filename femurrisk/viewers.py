"""Plotly figures and short text summaries of a prediction, for the web app.

Arrays in, figures or strings out; this module never imports torch. Arrays use the
package's axis order (x, y, z): index i grows towards the patient's right, j
anteriorly and k cranially.

Axial images are shown in the radiological convention: the patient's right on the
screen's left, anterior at the top, as if looking up from the patient's feet. The R,
L, A and P edges are written on every figure so that nobody has to remember it.

Gradio's ``gr.Plot`` hands plotly only a figure's data, layout and config, never its
animation frames, so the slice slider does not animate frames: every slice is its own
pair of traces (CT and heatmap) and each slider step switches which pair is visible.
Everything happens in the browser; moving the slider sends nothing to the server.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence

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

logger = logging.getLogger(__name__)

#: Heatmap colours from 0 to 1: fully transparent at 0 so that unattended bone shows
#: through unchanged, then red to yellow with rising opacity.
HEATMAP_COLORSCALE = [
    [0.0, "rgba(255, 0, 0, 0.0)"],
    [0.15, "rgba(255, 0, 0, 0.25)"],
    [0.5, "rgba(255, 110, 0, 0.7)"],
    [1.0, "rgba(255, 240, 0, 1.0)"],
]

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


def _to_uint8(values: np.ndarray, scale: float) -> np.ndarray:
    scaled = np.rint(np.asarray(values, dtype=np.float32) * scale)
    return np.clip(scaled, 0, 255).astype(np.uint8)


def _check_viewer_args(
    ct_window: np.ndarray,
    heatmap: np.ndarray,
    side: str,
    opacity: float,
    slice_labels_mm: Sequence[float] | None,
) -> None:
    if side not in SIDES:
        raise ValueError(f"side must be one of {SIDES}, not {side!r}")
    if ct_window.ndim != 3:
        raise ValueError(f"ct_window must be 3D (x, y, z), not shape {ct_window.shape}")
    if heatmap.shape != ct_window.shape:
        raise ValueError(
            f"heatmap must have the CT's shape {ct_window.shape}, not {heatmap.shape}"
        )
    if not 0.0 <= opacity <= 1.0:
        raise ValueError(f"opacity must be within 0-1, not {opacity}")
    n_slices = ct_window.shape[2]
    if slice_labels_mm is not None and len(slice_labels_mm) != n_slices:
        raise ValueError(
            f"slice_labels_mm must have one value per slice ({n_slices}), "
            f"not {len(slice_labels_mm)}"
        )


def _display_order(n_slices: int, slice_labels_mm: Sequence[float] | None) -> list[int]:
    """Slice indices from cranial to caudal, the direction the crop is defined in."""
    if slice_labels_mm is None:
        return list(range(n_slices - 1, -1, -1))  # k grows cranially
    return [int(k) for k in np.argsort(-np.asarray(slice_labels_mm), kind="stable")]


def _edge_labels() -> list[dict]:
    """R, L, A and P written just outside the image's edges."""
    common = {"showarrow": False, "font": _EDGE_FONT, "xref": "x domain",
              "yref": "y domain"}
    edges = [  # text, x, y, xanchor, yanchor, meaning
        ("R", -0.02, 0.5, "right", "middle", "patient's right"),
        ("L", 1.02, 0.5, "left", "middle", "patient's left"),
        ("A", 0.5, 1.01, "center", "bottom", "anterior"),
        ("P", 0.5, -0.01, "center", "top", "posterior"),
    ]
    return [
        {"text": text, "x": x, "y": y, "xanchor": xa, "yanchor": ya,
         "hovertext": meaning, **common}
        for text, x, y, xa, ya, meaning in edges
    ]


def axial_viewer(
    ct_window: np.ndarray,
    heatmap: np.ndarray,
    *,
    side: str,
    opacity: float = 0.4,
    slice_labels_mm: Sequence[float] | None = None,
    title: str = "",
) -> go.Figure:
    """Axial slices of one side's crop with its Grad-CAM heatmap laid over them.

    Slices run from cranial (the AIIS level) to caudal along the slider; the figure
    opens on the slice where the heatmap is strongest. Values are sent to the browser
    as uint8 (CT 0-255, heatmap 0-1 quantized to 256 levels), about 350 kB for a
    64 x 64 x 32 crop.

    Args:
        ct_window: Bone-windowed CT, 0-255, axes (x, y, z) in canonical RAS+ order,
            not mirrored (see :func:`bone_window_uint8`).
        heatmap: Grad-CAM, 0-1, same shape and order as ``ct_window``.
        side: ``"left"`` or ``"right"``, patient terms; names the figure.
        opacity: Opacity of the heatmap layer, 0-1.
        slice_labels_mm: World z (RAS+ mm) of each slice index k, shown on the
            slider; slice indices are shown when None.
        title: Figure title; by default names the side.

    Returns:
        A figure with two traces per slice and one slider step per slice.

    Raises:
        ValueError: If shapes, side, opacity or labels are inconsistent.
    """
    ct_window = np.asarray(ct_window)
    heatmap = np.asarray(heatmap)
    _check_viewer_args(ct_window, heatmap, side, opacity, slice_labels_mm)
    n_slices = ct_window.shape[2]
    ct_u8 = _to_uint8(ct_window, 1.0)
    heat_u8 = _to_uint8(np.nan_to_num(heatmap), 255.0)

    order = _display_order(n_slices, slice_labels_mm)
    strongest = int(np.argmax(heat_u8.reshape(-1, n_slices).max(axis=0)))
    active = order.index(strongest) if heat_u8.any() else 0

    fig = go.Figure()
    for position, k in enumerate(order):
        shown = position == active
        # Plotly heatmaps take z[row][column] = z[y][x]; rows grow upwards (anterior
        # on top) and the x axis is reversed below (patient's right on the left).
        fig.add_trace(go.Heatmap(
            z=ct_u8[:, :, k].T, zmin=0, zmax=255, colorscale=_GRAY, showscale=False,
            hoverinfo="skip", visible=shown, name=f"CT slice {k}",
        ))
        fig.add_trace(go.Heatmap(
            z=heat_u8[:, :, k].T, zmin=0, zmax=255, colorscale=HEATMAP_COLORSCALE,
            opacity=opacity, hoverinfo="skip", visible=shown, name=f"heatmap slice {k}",
            colorbar={"title": {"text": "Grad-CAM"}, "tickvals": [0, 127.5, 255],
                      "ticktext": ["0", "0.5", "1"], "len": 0.7, "thickness": 12},
        ))

    steps = []
    for position, k in enumerate(order):
        visible = [False] * (2 * n_slices)
        visible[2 * position] = visible[2 * position + 1] = True
        label = f"{slice_labels_mm[k]:.1f}" if slice_labels_mm is not None else str(k)
        steps.append({"method": "restyle", "args": [{"visible": visible}],
                      "label": label})
    unit = " mm (world z, RAS+)" if slice_labels_mm is not None else ""
    slider = {
        "active": active, "steps": steps, "pad": {"t": 30}, "len": 1.0,
        "currentvalue": {"prefix": "slice z = " if unit else "slice index ",
                         "suffix": unit, "font": {"size": 13}},
        "font": {"size": 8}, "ticklen": 3,
    }

    side_title = title or f"{side.capitalize()} proximal femur"
    fig.update_layout(
        template="none",
        title={"text": f"{side_title}<br><sup>axial, radiological view: patient's "
                       "right on the screen's left; cranial to caudal</sup>"},
        sliders=[slider],
        annotations=_edge_labels(),
        margin={"l": 40, "r": 20, "t": 95, "b": 20},
        height=620,
        paper_bgcolor="#1b1b1b", plot_bgcolor="#000000", font={"color": "#e8e8e8"},
        meta={"side": side, "n_slices": n_slices},
    )
    fig.update_xaxes(autorange="reversed", showticklabels=False,
                     showgrid=False, zeroline=False, constrain="domain")
    fig.update_yaxes(scaleanchor="x", scaleratio=1.0, showticklabels=False,
                     showgrid=False, zeroline=False, constrain="domain")
    logger.debug("axial viewer built: side=%s, %d slices", side, n_slices)
    return fig


def side_viewer(result: SideResult, *, opacity: float = 0.4) -> go.Figure:
    """The axial viewer of one side of a prediction.

    The CT is re-windowed from the unmirrored Hounsfield crop, so that both sides
    are shown as they lie in the patient (the network's input is mirrored on the
    right).

    Args:
        result: One side of a :class:`~femurrisk.prediction.Prediction`.
        opacity: Opacity of the heatmap layer, 0-1.

    Returns:
        The figure of :func:`axial_viewer`.
    """
    labels = slice_world_z_mm(result.crop_affine, result.crop_hu.shape[2])
    return axial_viewer(
        bone_window_uint8(result.crop_hu), result.heatmap, side=result.side,
        opacity=opacity, slice_labels_mm=labels,
    )


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
    if not result.scored or result.decision == DECISION_IMPLANT:
        lines.append(f"**{DECISION_IMPLANT}** (metal: "
                     f"{result.metal_volume_mm3:.0f} mm³); the model does not cover "
                     "femurs with implants.")
        lines.append(f"Raw model output {format_probability(result.probability)}, "
                     "shown for reference only: it is not a risk estimate for this "
                     "femur.")
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
