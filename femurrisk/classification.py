"""The fracture classifier: per-side crops in, calibrated probabilities out.

How the two sides are presented: each crop is bone-windowed (0-255), the right crop is
mirrored in x (:func:`femurrisk.cropping.to_network_orientation`) so that every input
looks like a patient-left femur, and the values are divided by 255. Both sides go
through the network in one batch, shape (2, 1, 64, 64, 32) = (side, channel, x, y, z).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from femurrisk import registry
from femurrisk.cropping import to_network_orientation
from femurrisk.preprocessing import bone_window


def network_input(crop_hu: np.ndarray, side: str) -> np.ndarray:
    """The windowed, side-normalized crop (x, y, z), values 0-255, as the network sees it."""
    return np.ascontiguousarray(to_network_orientation(bone_window(crop_hu), side))


def to_batch(inputs: Sequence[np.ndarray]) -> torch.Tensor:
    """Stack 0-255 crops (x, y, z) into a float tensor (N, 1, x, y, z) scaled to 0-1."""
    return torch.from_numpy(np.stack(inputs)[:, None] / 255.0).float()


class Classifier:
    """A trained classifier with its operating threshold and calibration.

    The weight file's metadata holds ``threshold`` (chosen on validation) and
    ``logit_offset``: the prior-shift correction that maps the augmented training
    prevalence back to the intended prevalence (added to the logit before the sigmoid).
    """

    def __init__(
        self, device: torch.device, name: str = registry.DEFAULT_CLASSIFIER,
        weights: Path | None = None,
    ) -> None:
        self.name = name
        self.device = device
        self.model = registry.build_classifier(name)
        self.weights_path = Path(weights or registry.classifier_weights_path(name))
        self.metadata = registry.load_weights(self.model, self.weights_path)
        self.model.to(device).eval()
        self.threshold = float(self.metadata.get("threshold", 0.5))
        self.logit_offset = float(self.metadata.get("logit_offset", 0.0))

    @property
    def gradcam_layer(self) -> torch.nn.Module:
        return registry.gradcam_layer(self.model, self.name)

    @torch.no_grad()
    def probabilities(self, batch: torch.Tensor) -> np.ndarray:
        """Calibrated fracture probabilities, one per crop in ``batch``."""
        logits = self.model(batch.to(self.device))[:, 0].float().cpu().numpy()
        return 1.0 / (1.0 + np.exp(-(logits + self.logit_offset)))
