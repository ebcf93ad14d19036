"""Tests of femurrisk.explanation: shapes and layouts on every architecture, then
sanity checks of the shipped DenseNet-121 against synthetic truth."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from torch import nn

from femurrisk import explanation, registry
from femurrisk.geometry import CROP_SHAPE

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _input(seed: int = 0, n: int = 2) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.rand((n, 1, *CROP_SHAPE), generator=generator)  # (N, 1, x, y, z)


# --- every architecture ------------------------------------------------------------


@pytest.mark.parametrize("name", registry.CLASSIFIERS)
def test_gradcam_layer_keeps_a_volume_of_8_8_4(name):
    torch.manual_seed(0)
    model = registry.build_classifier(name).eval()
    layer = registry.gradcam_layer(model, name)
    shapes = []
    handle = layer.register_forward_hook(lambda m, i, o: shapes.append(tuple(o.shape)))
    maps = explanation.gradcam(model, layer, _input(n=1))
    handle.remove()
    assert shapes[0][2:] == registry.GRADCAM_LAYERS[name][1] == (8, 8, 4)
    assert maps.shape == (1, *CROP_SHAPE) and maps.dtype == np.float32
    assert (maps >= 0).all() and np.isfinite(maps).all()


# --- correctness on a network whose evidence is known ------------------------------


class _Brightness(nn.Module):
    """Logit = mean brightness; its 'layer' is an 8 x 8 x 8 voxel average (8 x 8 x 4)."""

    def __init__(self):
        super().__init__()
        self.pool = nn.AvgPool3d(kernel_size=8)
        self.head = nn.Linear(1, 1)
        nn.init.constant_(self.head.weight, 1.0)
        nn.init.zeros_(self.head.bias)

    def forward(self, x):
        return self.head(self.pool(x).mean(dim=(2, 3, 4)))  # (N, 1)


@pytest.mark.parametrize("blob", [(52, 6, 28), (4, 60, 2), (30, 33, 17)])
def test_gradcam_peak_lands_on_the_evidence_with_axes_kept(blob):
    x = torch.zeros((1, 1, *CROP_SHAPE))
    i, j, k = blob
    x[0, 0, i - 2:i + 3, j - 2:j + 3, k - 2:k + 3] = 1.0
    model = _Brightness().eval()
    maps = explanation.gradcam(model, model.pool, x)
    peak = np.unravel_index(int(np.argmax(maps[0])), CROP_SHAPE)
    assert np.abs(np.subtract(peak, blob)).max() <= 8  # within one Grad-CAM cell


def test_positive_only_drops_negative_evidence():
    model = _Brightness().eval()
    nn.init.constant_(model.head.weight, -1.0)  # brightness now lowers the logit
    x = _input(n=1)
    assert explanation.gradcam(model, model.pool, x).max() == 0.0
    assert explanation.gradcam(model, model.pool, x, positive_only=False).min() < 0.0


def test_tokens_become_a_channel_first_volume():
    tokens = torch.arange(8 * 6, dtype=torch.float32).reshape(1, 8, 6)  # (N, L, C)
    volume = explanation.layer_output_volume(tokens)
    assert volume.shape == (1, 6, 2, 2, 2)
    assert volume[0, :, 1, 0, 1].tolist() == tokens[0, 5].tolist()  # token (1, 0, 1)
    channel_first = torch.zeros(1, 4, 8, 8, 4)
    assert explanation.layer_output_volume(channel_first) is channel_first
    with pytest.raises(ValueError, match="tokens"):
        explanation.layer_output_volume(torch.zeros(1, 7, 5))


def test_guided_gradcam_on_densenet_restores_inplace_relus():
    torch.manual_seed(0)
    model = registry.build_classifier("densenet121").eval()
    inplace = [m for m in model.modules() if isinstance(m, nn.ReLU) and m.inplace]
    assert inplace  # MONAI's DenseNet uses in-place ReLUs
    x = _input(n=1)
    fine = explanation.explain(model, registry.gradcam_layer(model, "densenet121"), x,
                               "guided_gradcam")
    coarse = explanation.gradcam(model, registry.gradcam_layer(model, "densenet121"), x)
    assert fine.shape == (1, *CROP_SHAPE) and (fine >= 0).all()
    assert not fine[coarse == 0].any()  # only where Grad-CAM saw positive evidence
    assert all(m.inplace for m in inplace)


def test_unknown_method_is_named():
    with pytest.raises(ValueError, match="method must be one of"):
        explanation.explain(_Brightness(), nn.Identity(), _input(n=1), "lime")


def test_joint_normalization_keeps_sides_comparable():
    left, right = np.full((2, 2, 2), 2.0), np.full((2, 2, 2), 1.0)
    scaled = explanation.normalize_jointly([left, right])
    assert scaled[0].max() == 1.0 and scaled[1].max() == 0.5
    spiky = np.array([100.0] + [1.0] * 8 + [0.5])
    robust = explanation.normalize_jointly([spiky], quantile=0.8)[0]
    assert robust[0] == robust[1] == 1.0 and robust[-1] == 0.5  # the spike is clipped
    zeros = explanation.normalize_jointly([np.zeros(3), np.zeros(3)])
    assert all(not z.any() for z in zeros)


def test_heatmap_lands_at_the_same_world_point_on_the_ct_grid():
    crop_affine = np.diag([2.0, 2.0, 3.0, 1.0])
    crop_affine[:3, 3] = (-120.0, -40.0, -90.0)
    heat = np.zeros(CROP_SHAPE, np.float32)
    heat[10, 40, 20] = 1.0
    ct_affine = np.diag([1.0, 1.0, 1.5, 1.0])
    ct_affine[:3, 3] = (-200.0, -150.0, -150.0)
    placed = explanation.heatmap_in_world(heat, crop_affine, (300, 300, 150), ct_affine)
    peak = np.unravel_index(int(np.argmax(placed)), placed.shape)
    assert np.allclose(nib.affines.apply_affine(ct_affine, peak),
                       nib.affines.apply_affine(crop_affine, (10, 40, 20)))
    assert placed[0, 0, 0] == 0.0


def test_randomized_copy_changes_the_copy_only():
    torch.manual_seed(0)
    model = registry.build_classifier("resnet18")
    before = model.conv1.weight.detach().clone()
    clone = explanation.randomized_copy(model, seed=1)
    assert torch.equal(model.conv1.weight, before)
    assert not torch.equal(clone.conv1.weight, before)


def test_app_and_cli_offer_exactly_the_methods():
    import app
    from femurrisk.cli import build_parser

    assert [value for _, value in app.METHOD_CHOICES] == list(explanation.METHODS)
    args = build_parser().parse_args(["predict", "x.nii.gz", "--out", "o",
                                      "--explain", "guided_gradcam"])
    assert args.explain == "guided_gradcam"
    with pytest.raises(SystemExit):
        build_parser().parse_args(["predict", "x.nii.gz", "--out", "o", "--explain", "x"])


# --- the shipped DenseNet-121 on synthetic cases with known lesions -----------------

WEIGHTS = Path(os.environ.get("FEMURRISK_ASSETS", ROOT / "assets")) / (
    "classifier_densenet121.safetensors")
REAL_CT = ROOT.parent / "shared" / "data" / "ct" / "pelvis_ct_3mm.nii.gz"
#: Case ids of the sanity checks: outside every training range (0-499, 1000-1239).
SANITY_CASES = range(5000, 5004)

needs_weights = pytest.mark.skipif(
    not WEIGHTS.is_file() or not REAL_CT.is_file(),
    reason="needs the shipped DenseNet-121 weights and the shared pelvis CT",
)


@pytest.fixture(scope="module")
def checked():
    from benchmarks import gradcam_checks

    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    sides = gradcam_checks.lesion_sides(SANITY_CASES)
    assert len(sides) >= 3, "too few lesion sides among the sanity cases"
    return gradcam_checks.check_architecture("densenet121", WEIGHTS, sides,
                                             methods=("gradcam",), random_repeats=1)


@needs_weights
def test_map_changes_when_the_weights_are_randomized(checked):
    correlations = [row["randomization_spearman"] for row in checked["rows"]]
    assert max(correlations) < 0.5, correlations


@needs_weights
def test_pointing_game_finds_the_lesion(checked):
    summary = checked["summary"]
    assert summary["gradcam_pointing_within_10mm"] >= 0.5, summary


@needs_weights
def test_deleting_attributed_voxels_lowers_the_score_faster_than_random(checked):
    summary = checked["summary"]
    assert summary["deletion_auc_top"] < summary["deletion_auc_random"], summary
