"""Where the classifier found its evidence: Grad-CAM and guided Grad-CAM via captum.

Both methods explain the fracture logit (the network's only output). Maps are computed
on the network's input, whose right side is mirrored; callers mirror them back with
:func:`femurrisk.cropping.to_network_orientation` and then scale both sides together
with :func:`normalize_jointly`, so that the same colour means the same evidence on the
left and on the right.

Grad-CAM layers (:data:`femurrisk.registry.GRADCAM_LAYERS`) for a 64 x 64 x 32 crop:

* DenseNet-121: ``features.denseblock2``, 8 x 8 x 4, 512 channels.
* ResNet-18 / ResNet-34: ``layer3``, 8 x 8 x 4, 256 channels. ``layer4`` would give
  4 x 4 x 2: two cells along the 96 mm slab, too coarse to say which part of the
  femur the evidence lay in.
* Swin Transformer: ``encoder.layers2.0``, the second stage. MONAI's stage turns its
  tokens (N, x, y, z, C) back into a channel-first volume (N, 96, 8, 8, 4) after the
  patch merge, which is the layout Grad-CAM needs (:func:`gradcam` refuses any
  other). :func:`layer_output_volume` turns token layouts into such a volume, for a
  wrapper around a layer that returns tokens; no registered layer needs it.

One Grad-CAM cell covers 16 x 16 mm in-plane and 24 mm along z, so the map says which
region of the crop mattered, not which voxels: it is not a lesion segmentation. Guided
Grad-CAM multiplies the upsampled Grad-CAM with the magnitude of guided
backpropagation's input gradient, which is voxel-sharp; for the Swin Transformer,
whose activations are GELU rather than ReLU, guided backpropagation reduces to the
plain input gradient.
"""

from __future__ import annotations

import contextlib
import copy
import warnings

import nibabel as nib
import numpy as np
import torch
from captum.attr import GuidedBackprop, LayerAttribution, LayerGradCam
from torch import nn

from femurrisk.preprocessing import resample_to_grid

#: Explanation methods offered in the app and the command line.
METHODS = ("gradcam", "guided_gradcam")
DEFAULT_METHOD = "gradcam"
METHOD_LABELS = {"gradcam": "Grad-CAM", "guided_gradcam": "Guided Grad-CAM"}

#: Joint normalization divides by this quantile of both sides' values: the maximum for
#: Grad-CAM (smooth), a high quantile for guided Grad-CAM, whose maximum is a single
#: voxel that would leave the rest of the map invisible.
NORMALIZATION_QUANTILE = {"gradcam": 1.0, "guided_gradcam": 0.999}


def layer_output_volume(output: torch.Tensor, spatial_rank: int = 3) -> torch.Tensor:
    """A layer's output as a channel-first volume (N, C, x, y, z).

    Returns a volume of rank ``spatial_rank + 2`` unchanged (it cannot tell channel-
    first from channel-last; the caller must know), and reshapes a cubic transformer
    token sequence (N, L, C), L = s**3, to (N, C, s, s, s).

    Raises:
        ValueError: If the layout cannot be recognised.
    """
    if output.ndim == spatial_rank + 2:
        return output
    if output.ndim == 3:
        n, length, channels = output.shape
        side = round(length ** (1.0 / spatial_rank))
        if side**spatial_rank == length:
            tokens = output.reshape(n, *([side] * spatial_rank), channels)
            return tokens.permute(0, spatial_rank + 1, *range(1, spatial_rank + 1))
    raise ValueError(
        "layer output must be (N, C, x, y, z) or tokens (N, L, C), "
        f"not {tuple(output.shape)}"
    )


def gradcam(
    model: nn.Module, layer: nn.Module, batch: torch.Tensor, *,
    positive_only: bool = True,
) -> np.ndarray:
    """Grad-CAM for the fracture logit, trilinearly upsampled to the crop.

    Args:
        model: A classifier returning one logit per crop, shape (N, 1).
        layer: The layer whose activations are weighed (see
            :data:`femurrisk.registry.GRADCAM_LAYERS`); it must output a channel-first
            volume (N, C, x', y', z').
        batch: Network input (N, 1, x, y, z).
        positive_only: Keep positive evidence only (the ReLU of Grad-CAM). False gives
            the signed map, used by the randomization sanity check.

    Returns:
        Array (N, x, y, z), not normalized.

    Raises:
        ValueError: If the layer does not output a spatial volume.
    """
    explainer = LayerGradCam(model, layer)
    with torch.enable_grad():
        attribution = explainer.attribute(
            batch.detach().clone().requires_grad_(True), target=0,
            relu_attributions=positive_only,
        )  # (N, 1, x', y', z') on the layer's coarse grid
    if attribution.ndim != batch.ndim or attribution.shape[1] != 1:
        raise ValueError(
            "the Grad-CAM layer must output a channel-first volume (N, C, x, y, z); "
            f"its attribution had shape {tuple(attribution.shape)}"
        )
    upsampled = LayerAttribution.interpolate(
        attribution, tuple(batch.shape[2:]), interpolate_mode="trilinear"
    )  # (N, 1, x, y, z)
    maps = upsampled[:, 0].detach()
    if positive_only:
        maps = maps.clamp(min=0)  # trilinear weights are positive; guards rounding
    return maps.float().cpu().numpy()


@contextlib.contextmanager
def _relus_not_inplace(model: nn.Module):
    """Guided backpropagation hooks ReLU modules; in-place ones would break autograd."""
    changed = [m for m in model.modules() if isinstance(m, nn.ReLU) and m.inplace]
    for module in changed:
        module.inplace = False
    try:
        yield
    finally:
        for module in changed:
            module.inplace = True


def guided_gradcam(model: nn.Module, layer: nn.Module, batch: torch.Tensor) -> np.ndarray:
    """Guided Grad-CAM: Grad-CAM times the magnitude of the guided input gradient.

    The Grad-CAM factor keeps the map to regions of positive evidence; the guided
    gradient shows which voxels within them the logit is sensitive to. Its magnitude
    is used because a lytic lesion raises the logit where the image is darker (a
    negative gradient).

    Returns:
        Array (N, x, y, z) of non-negative values, not normalized.
    """
    coarse = gradcam(model, layer, batch)  # (N, x, y, z)
    with _relus_not_inplace(model), torch.enable_grad(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Setting backward hooks on ReLU")
        guided = GuidedBackprop(model).attribute(
            batch.detach().clone().requires_grad_(True), target=0
        )  # (N, 1, x, y, z)
    return (coarse * guided[:, 0].detach().abs().float().cpu().numpy()).astype(np.float32)


def explain(
    model: nn.Module, layer: nn.Module, batch: torch.Tensor, method: str = DEFAULT_METHOD
) -> np.ndarray:
    """The maps of ``method`` (one of :data:`METHODS`) for a batch, (N, x, y, z).

    Raises:
        ValueError: If ``method`` is unknown.
    """
    if method == "gradcam":
        return gradcam(model, layer, batch)
    if method == "guided_gradcam":
        return guided_gradcam(model, layer, batch)
    raise ValueError(f"method must be one of {METHODS}, not {method!r}")


def normalize_jointly(maps: list[np.ndarray], quantile: float = 1.0) -> list[np.ndarray]:
    """Scale all maps by one common value so that sides are comparable (0-1).

    Args:
        maps: Non-negative maps, one per side.
        quantile: The common scale is this quantile of all maps' values pooled (1.0:
            their common maximum); values above it are clipped to 1.
    """
    if not maps:
        return []
    pooled = np.concatenate([np.ravel(m) for m in maps])
    scale = float(pooled.max())
    if quantile < 1.0:
        scale = float(np.quantile(pooled, quantile))
    if not np.isfinite(scale) or scale <= 0.0:
        scale = float(pooled.max())
    if not np.isfinite(scale) or scale <= 0.0:
        return [np.zeros_like(m, dtype=np.float32) for m in maps]
    return [np.clip(m / scale, 0.0, 1.0).astype(np.float32) for m in maps]


def heatmap_in_world(
    heatmap: np.ndarray, crop_affine: np.ndarray, shape, affine: np.ndarray
) -> np.ndarray:
    """A crop's heatmap placed on another grid of the same world (e.g. the CT's).

    Trilinear in world coordinates through both affines; zero outside the crop.

    Args:
        heatmap: Map on the crop grid, axes (x, y, z).
        crop_affine: The crop's voxel-to-world affine.
        shape: Shape of the target grid.
        affine: The target grid's voxel-to-world affine.
    """
    image = nib.Nifti1Image(np.asarray(heatmap, np.float32), np.asarray(crop_affine))
    return resample_to_grid(image, shape, affine, order=1, cval=0.0)


def randomized_copy(model: nn.Module, seed: int = 0) -> nn.Module:
    """A copy of ``model`` with every learnable layer re-initialised (sanity check).

    Adebayo et al.'s model randomization test: a map that hardly changes when the
    weights are destroyed does not explain the trained model.
    """
    torch.manual_seed(seed)
    clone = copy.deepcopy(model)
    for module in clone.modules():
        if module is not clone and hasattr(module, "reset_parameters"):
            module.reset_parameters()
    return clone.eval()
