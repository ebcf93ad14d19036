"""Grad-CAM with captum, upsampled to the crop and comparable between sides."""

from __future__ import annotations

import numpy as np
import torch
from captum.attr import LayerAttribution, LayerGradCam
from torch import nn


def gradcam(model: nn.Module, layer: nn.Module, batch: torch.Tensor) -> np.ndarray:
    """Positive Grad-CAM evidence for the fracture logit, trilinearly upsampled.

    Args:
        model: A classifier returning one logit per crop, shape (N, 1).
        layer: The layer whose activations are weighed (see
            :data:`femurrisk.registry.GRADCAM_LAYERS`).
        batch: Network input (N, 1, x, y, z).

    Returns:
        Array (N, x, y, z) of non-negative evidence, not normalized.
    """
    explainer = LayerGradCam(model, layer)
    with torch.enable_grad():
        attribution = explainer.attribute(
            batch.requires_grad_(True), target=0, relu_attributions=True
        )  # (N, 1, x', y', z') on the layer's coarse grid
    upsampled = LayerAttribution.interpolate(
        attribution, tuple(batch.shape[2:]), interpolate_mode="trilinear"
    )  # (N, 1, x, y, z)
    return upsampled[:, 0].detach().clamp(min=0).cpu().numpy().astype(np.float32)


def normalize_jointly(maps: list[np.ndarray]) -> list[np.ndarray]:
    """Scale all maps by their common maximum so that sides are comparable (0-1)."""
    peak = max((float(m.max()) for m in maps), default=0.0)
    if peak <= 0.0:
        return [np.zeros_like(m) for m in maps]
    return [(m / peak).astype(np.float32) for m in maps]
