"""Train the landmark U-Net (AIIS and femoral heads) on cached landmark samples.

    python -m training.train_landmark --config landmark_minimal --run runs/landmark

Validation runs the same post-processing the app uses
(:func:`femurrisk.landmark.landmarks_from_probabilities`) on whole volumes and reports
the distance of the found landmark level to the truth, in mm and in 3 mm slices.
"""

from __future__ import annotations

import argparse
import csv
import logging
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from monai.data import DataLoader, Dataset
from monai.inferers import sliding_window_inference
from monai.losses import DiceLoss
from monai.transforms import (
    Compose, RandCropByPosNegLabeld, RandScaleIntensityd, RandShiftIntensityd, SpatialPadd,
)
from monai.utils import set_determinism
from tqdm import tqdm

from femurrisk import geometry as g
from femurrisk import registry
from femurrisk.errors import InputError
from femurrisk.landmark import landmarks_from_probabilities
from training.config import load_config, save_config

logger = logging.getLogger(__name__)


def _load(path: Path) -> dict:
    with np.load(path) as data:
        return {
            "image": data["image"].astype(np.float32)[None],  # (1, x, y, z)
            "label": data["labels"].astype(np.int64)[None],
            "affine": data["affine"], "landmark_z_mm": float(data["landmark_z_mm"]),
        }


def train_transforms(config: dict) -> Compose:
    keys = ["image", "label"]
    return Compose([
        SpatialPadd(keys, spatial_size=g.LANDMARK_PATCH),
        RandCropByPosNegLabeld(
            keys, label_key="label", spatial_size=g.LANDMARK_PATCH,
            pos=config["positive_ratio"], neg=1, num_samples=config["samples_per_volume"],
        ),
        RandScaleIntensityd("image", factors=0.1, prob=0.5),
        RandShiftIntensityd("image", offsets=0.05, prob=0.5),
    ])


@torch.no_grad()
def landmark_errors(model: torch.nn.Module, cases: list[dict], device) -> list[float]:
    """Signed landmark level error (found - true), mm, per validation case (nan if none)."""
    model.eval()
    errors = []
    for case in cases:
        x = torch.from_numpy(case["image"])[None].to(device)
        logits = sliding_window_inference(x, g.LANDMARK_PATCH, 2, model, overlap=0.25,
                                          mode="gaussian")
        probs = torch.softmax(logits, 1)[0].cpu().numpy()
        image = nib.Nifti1Image(case["image"][0], case["affine"])
        try:
            found, _ = landmarks_from_probabilities(probs, case["affine"], image)
            errors.append(found.world_z_mm - case["landmark_z_mm"])
        except InputError:
            errors.append(float("nan"))
    model.train()
    return errors


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="landmark_minimal")
    parser.add_argument("--run", type=Path, required=True, help="run folder")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    try:
        config = load_config(args.config, args.set)
        device = registry.choose_device(None)  # FEMURRISK_DEVICE may name one
    except ValueError as error:
        parser.error(str(error))
    save_config(config, args.run)
    set_determinism(config["seed"])
    torch.set_num_threads(max(1, torch.get_num_threads()))

    files = sorted((Path(config["data"]) / "landmark").glob("*.npz"))
    cases = [_load(f) for f in tqdm(files, desc="loading")]
    if not 0 < config["val_cases"] < len(cases):
        raise SystemExit(f"val_cases must be between 1 and {len(cases) - 1} for the "
                         f"{len(cases)} landmark samples in {config['data']}, got "
                         f"{config['val_cases']}; prepare more with --landmark-studies")
    val, train = cases[: config["val_cases"]], cases[config["val_cases"]:]
    logger.info("%d training and %d validation volumes", len(train), len(val))
    loader = DataLoader(
        Dataset([{k: c[k] for k in ("image", "label")} for c in train], train_transforms(config)),
        batch_size=config["batch_size"] // config["samples_per_volume"] or 1, shuffle=True,
        num_workers=0,
    )

    model = registry.build_landmark_unet().to(device)
    # The landmarks fill about 0.1 % of the volume: the Dice term leaves the background
    # out so that the small classes drive it, and the cross-entropy weighs them up.
    dice = DiceLoss(to_onehot_y=True, softmax=True, include_background=False)
    cross_entropy = torch.nn.CrossEntropyLoss(
        weight=torch.tensor(config["class_weights"], dtype=torch.float32, device=device)
    )

    def loss_fn(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return dice(logits, labels) + cross_entropy(logits, labels[:, 0].long())
    optimizer = torch.optim.Adam(model.parameters(), lr=config["learning_rate"],
                                 weight_decay=config["weight_decay"])
    log_path = args.run / "metrics.csv"
    best = float("inf")
    step, start = 0, time.time()
    progress = tqdm(total=config["iterations"], desc="steps")
    with open(log_path, "w", newline="") as handle:
        log = csv.writer(handle)
        log.writerow(["step", "loss", "val_mae_mm", "val_mae_slices", "val_within_6mm",
                      "val_failed", "seconds"])
        while step < config["iterations"]:
            for batch in loader:
                optimizer.zero_grad()
                loss = loss_fn(model(batch["image"].to(device)), batch["label"].to(device))
                loss.backward()
                optimizer.step()
                step += 1
                progress.update(1)
                progress.set_postfix(loss=f"{loss.item():.3f}")
                if step % config["validate_every"] == 0 or step == config["iterations"]:
                    errors = np.array(landmark_errors(model, val, device))
                    ok = np.isfinite(errors)
                    mae = float(np.abs(errors[ok]).mean()) if ok.any() else float("inf")
                    within = float((np.abs(errors[ok]) <= 6.0).sum() / len(errors))
                    # Slices of the classifier's crop (3 mm): how far the crop moves.
                    slices = mae / g.CROP_SLICE_SPACING_MM
                    log.writerow([step, f"{loss.item():.4f}", f"{mae:.2f}", f"{slices:.2f}",
                                  f"{within:.3f}",
                                  int((~ok).sum()), f"{time.time() - start:.0f}"])
                    handle.flush()
                    logger.info("step %d: landmark MAE %.1f mm, %.0f%% within 6 mm, %d failed",
                                step, mae, 100 * within, int((~ok).sum()))
                    score = mae + 100.0 * (~ok).sum()
                    if score <= best:
                        best = score
                        registry.save_weights(model, args.run / "landmark_unet.safetensors", {
                            "step": step, "val_mae_mm": f"{mae:.2f}",
                            "val_mae_slices": f"{mae / g.CROP_SLICE_SPACING_MM:.2f}",
                            "val_within_6mm": f"{within:.3f}", "config": config["config_file"],
                        }, fp16=False)
                if step >= config["iterations"]:
                    break
    progress.close()


if __name__ == "__main__":
    main()
