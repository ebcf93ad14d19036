"""The single source of truth for networks, their Grad-CAM layers and weight files.

Classifiers take one channel, the bone-windowed crop divided by 255, shaped
(N, 1, 64, 64, 32) = (batch, channel, x, y, z), and return one logit per crop: the
log-odds of a pathologic fracture within three months. Everything is built from MONAI
networks, trained from scratch; nothing is downloaded.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch
from monai.networks.nets import DenseNet121, UNet, resnet18, resnet34
from monai.networks.nets.swin_unetr import SwinTransformer
from safetensors.torch import load_file, save_file
from torch import nn

from femurrisk.geometry import LABEL_FEMORAL_HEAD

#: Where shipped weights live; FEMURRISK_ASSETS overrides (e.g. for a training run).
ASSETS_DIR = Path(os.environ.get("FEMURRISK_ASSETS", Path(__file__).resolve().parents[1] / "assets"))

CLASSIFIERS = ("densenet121", "resnet18", "resnet34", "swin")
DEFAULT_CLASSIFIER = "densenet121"

#: Grad-CAM layer per architecture and the spatial size of its output for a
#: 64 x 64 x 32 crop: the deepest layer whose grid still resolves the slab along z.
GRADCAM_LAYERS = {
    "densenet121": ("features.denseblock2", (8, 8, 4)),
    "resnet18": ("layer3", (8, 8, 4)),
    "resnet34": ("layer3", (8, 8, 4)),
    "swin": ("encoder.layers2.0", (8, 8, 4)),
}


class SwinClassifier(nn.Module):
    """MONAI's 3D Swin Transformer encoder with global pooling and a linear head.

    Patch 2, window 4, four stages: a 64 x 64 x 32 crop becomes 32 x 32 x 16 tokens,
    then 16 x 16 x 8, 8 x 8 x 4, 4 x 4 x 2 and 2 x 2 x 1 after the patch merges.
    """

    def __init__(self, embed_dim: int = 24) -> None:
        super().__init__()
        self.encoder = SwinTransformer(
            in_chans=1, embed_dim=embed_dim, window_size=(4, 4, 4), patch_size=(2, 2, 2),
            depths=(2, 2, 2, 2), num_heads=(3, 6, 12, 24), spatial_dims=3,
        )
        self.head = nn.Linear(embed_dim * 16, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.encoder(x, normalize=True)[-1]  # (N, 16 * embed_dim, 2, 2, 1)
        return self.head(features.mean(dim=(2, 3, 4)))  # (N, 1)


def build_classifier(name: str = DEFAULT_CLASSIFIER) -> nn.Module:
    """A classifier with freshly initialised weights.

    Raises:
        ValueError: If ``name`` is not one of :data:`CLASSIFIERS`.
    """
    if name == "densenet121":
        return DenseNet121(spatial_dims=3, in_channels=1, out_channels=1)
    if name == "resnet18":
        return resnet18(spatial_dims=3, n_input_channels=1, num_classes=1)
    if name == "resnet34":
        return resnet34(spatial_dims=3, n_input_channels=1, num_classes=1)
    if name == "swin":
        return SwinClassifier()
    raise ValueError(f"classifier must be one of {CLASSIFIERS}, not {name!r}")


def gradcam_layer(model: nn.Module, name: str) -> nn.Module:
    """The module whose activations Grad-CAM weighs, for architecture ``name``."""
    return model.get_submodule(GRADCAM_LAYERS[name][0])


def build_landmark_unet() -> nn.Module:
    """MONAI 3D U-Net: background, AIIS and femoral head (three output channels)."""
    return UNet(
        spatial_dims=3, in_channels=1, out_channels=LABEL_FEMORAL_HEAD + 1,
        channels=(16, 32, 64, 128), strides=(2, 2, 2), num_res_units=1, norm="instance",
    )


def classifier_weights_path(name: str = DEFAULT_CLASSIFIER) -> Path:
    return ASSETS_DIR / f"classifier_{name}.safetensors"


def landmark_weights_path() -> Path:
    return ASSETS_DIR / "landmark_unet.safetensors"


def save_weights(model: nn.Module, path: Path, metadata: dict[str, str], *, fp16: bool) -> None:
    """Write a state dict as safetensors, floating tensors in fp16 when asked."""
    state = {}
    for key, tensor in model.state_dict().items():
        tensor = tensor.detach().cpu().contiguous()
        if fp16 and tensor.is_floating_point():
            tensor = tensor.half()
        state[key] = tensor
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(path), metadata={k: str(v) for k, v in metadata.items()})


def read_metadata(path: Path) -> dict[str, str]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        return dict(handle.metadata() or {})


def load_weights(model: nn.Module, path: Path) -> dict[str, str]:
    """Load safetensors weights into ``model`` (cast to its dtype); return the metadata.

    Raises:
        FileNotFoundError: If the weight file is missing (say how to get it).
    """
    if not path.is_file():
        raise FileNotFoundError(
            f"weights not found at {path}; they ship in assets/ with the repository, "
            "or are written there by training/export.py"
        )
    state = load_file(str(path))
    reference = model.state_dict()
    state = {k: v.to(reference[k].dtype) if k in reference else v for k, v in state.items()}
    model.load_state_dict(state, strict=True)
    return read_metadata(path)


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def choose_device(requested: str | None = None) -> torch.device:
    """CUDA when present, else CPU; ``requested`` or FEMURRISK_DEVICE override.

    Raises:
        ValueError: If the name is not cpu, cuda or cuda:N, or names a CUDA device
            this machine does not have.
    """
    name = requested or os.environ.get("FEMURRISK_DEVICE") or ""
    if not name:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise ValueError(f"device must be cpu, cuda or cuda:N, not {name!r}")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device must be available on this machine, not {name!r}: "
                             "no CUDA")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"device must be available on this machine, not {name!r}: "
                             f"{torch.cuda.device_count()} CUDA device(s)")
    return device
