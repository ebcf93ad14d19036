"""Affine augmentation of crops (MONAI), used alike for every class it touches.

The source study augmented its positive crops 20-fold by affine transforms. Shown
only on positives, augmentation itself becomes a label: resampled crops are a little
blurred and, with zero padding, carry empty corners. Two measures keep a network from
learning that shortcut:

* ``padding_mode="border"`` repeats the edge instead of padding with zeros, so an
  augmented crop has no corners of air that an original lacks;
* in training every presentation of either class is augmented with the same
  probability (``augment_all_classes``), so blur and resampling carry no information
  about the label. :func:`augmentation_shift` measures what remains: how well a
  model's score tells augmented negatives from their originals.
"""

from __future__ import annotations

import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import (
    Compose, Identity, OneOf, RandAffine, RandGaussianNoise, RandGaussianSharpen,
    RandGaussianSmooth, RandShiftIntensity,
)

from femurrisk import geometry as g

from training.metrics import auroc


#: ``epoch`` values of :func:`presentation_seed` outside training: fixed evaluation
#: copies and the shortcut check draw their own affines.
EVAL_EPOCH, SHORTCUT_EPOCH = 1_000_000, 1_000_001


def presentation_seed(seed: int, epoch: int, row: int, copy: int) -> int:
    """A 32-bit seed per (run, epoch, row, copy), independent of batch and rank."""
    return int(np.random.SeedSequence([seed, epoch, row, copy]).generate_state(1)[0])


def affine_transform(config: dict) -> RandAffine:
    """The random affine of ``config``: rotation (degrees), scale, shift (voxels)."""
    angle = float(np.deg2rad(config["augment_rotate_deg"]))
    return RandAffine(
        prob=1.0, rotate_range=(angle, angle, angle),
        scale_range=(config["augment_scale"],) * 3,
        translate_range=tuple(config["augment_translate_voxels"]),
        padding_mode="border", mode="bilinear",
    )


def training_transform(config: dict):
    """What a training presentation gets: the affine, then, with
    ``augment_acquisition``, a random change of acquisition.

    The acquisition part imitates what differs between hospitals' scanners (the
    synthetic sites differ exactly so): reconstruction kernel (Gaussian blur or
    sharpening, each with probability 1/3), image noise (Gaussian, standard deviation
    up to ``augment_noise_hu``) and calibration (an offset up to
    ``augment_offset_hu``). HU amounts become 0-1 input units through the bone
    window's width (:data:`femurrisk.geometry.WINDOW_WIDTH_HU`). The source study
    used affine transforms only; this is ours, against overfitting one hospital.
    """
    affine = affine_transform(config)
    if not config.get("augment_acquisition"):
        return affine
    per_hu = 1.0 / g.WINDOW_WIDTH_HU  # input units (0-1) per HU
    return Compose([
        affine,
        OneOf([RandGaussianSmooth(sigma_x=(0.3, 0.8), sigma_y=(0.3, 0.8),
                                  sigma_z=(0.2, 0.5), prob=1.0),
               RandGaussianSharpen(sigma1_x=(0.4, 0.7), sigma1_y=(0.4, 0.7),
                                   sigma1_z=(0.3, 0.5), sigma2_x=0.3, sigma2_y=0.3,
                                   sigma2_z=0.2, alpha=(2.0, 6.0), prob=1.0),
               Identity()]),
        RandGaussianNoise(prob=1.0, mean=0.0,
                          std=float(config["augment_noise_hu"]) * per_hu),
        RandShiftIntensity(offsets=float(config["augment_offset_hu"]) * per_hu, prob=1.0),
    ])


def to_tensor(volume_u8: np.ndarray) -> torch.Tensor:
    """A uint8 crop (x, y, z) as the network's float input (1, x, y, z) in 0-1."""
    return torch.from_numpy(volume_u8[None].astype(np.float32) / 255.0)


def augmented(volume_u8: np.ndarray, transform, seed: int) -> torch.Tensor:
    """One augmented copy (1, x, y, z), reproducible from ``seed``."""
    transform.set_random_state(seed)
    out = transform(to_tensor(volume_u8))
    # A plain tensor, like to_tensor's: once monai.data is imported, batches that mix a
    # MetaTensor with plain tensors fail in MONAI's collate ("no attribute 'meta'").
    out = out.as_tensor() if isinstance(out, MetaTensor) else torch.as_tensor(out)
    return out.float().clamp_(0.0, 1.0)


@torch.no_grad()
def augmentation_shift(model: torch.nn.Module, negatives_u8: np.ndarray, config: dict,
                       device: torch.device, seed: int, batch_size: int = 16) -> dict:
    """How differently a model scores augmented negatives and their originals.

    Returns the mean and mean absolute logit difference (augmented - original) and
    the AUROC of the score for telling the augmented copies from the originals,
    which is 0.5 when the model cannot see augmentation.
    """
    transform = training_transform(config)
    model.eval()
    originals, copies = [], []
    for start in range(0, len(negatives_u8), batch_size):
        chunk = negatives_u8[start:start + batch_size]
        x = torch.stack([to_tensor(v) for v in chunk])  # (N, 1, x, y, z)
        a = torch.stack([augmented(v, transform, presentation_seed(seed, SHORTCUT_EPOCH, start + i, 1))
                         for i, v in enumerate(chunk)])
        originals.append(model(x.to(device))[:, 0].float().cpu().numpy())
        copies.append(model(a.to(device))[:, 0].float().cpu().numpy())
    original, copy = np.concatenate(originals), np.concatenate(copies)
    labels = np.r_[np.zeros(len(original)), np.ones(len(copy))]
    return {
        "negatives": int(len(original)),
        "mean_logit_shift": float(np.mean(copy - original)),
        "mean_abs_logit_shift": float(np.mean(np.abs(copy - original))),
        "logit_sd": float(np.std(original)),
        "auroc_augmented_vs_original": auroc(labels, np.r_[original, copy]),
    }
