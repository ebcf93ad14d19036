"""Train the landmark U-Net (AIIS and femoral heads) on cached landmark samples.

    python -m training.train_landmark --config landmark_minimal --run runs/landmark

Validation runs the same post-processing the app uses
(:func:`femurrisk.landmark.landmarks_from_probabilities`) on whole volumes and reports
the distance of the found landmark level to the truth, in mm and in 3 mm slices.

Everything a user can get wrong (config keys and values, the samples, the run folder,
the device) is checked before anything is written. A run folder holds one run: a
folder with a finished landmark run is refused, and so is one that another training
is writing (a lock held while the process lives).

Outputs in the run folder: ``config.yaml`` (resolved), ``metrics.csv`` (per
validation) and ``landmark_unet.safetensors`` (the best validation's weights). While
training, the best weights so far are kept in ``landmark_unet.partial.safetensors``,
which is moved to ``landmark_unet.safetensors`` only when the last step is done: an
interrupted run leaves no file that training.export would take for a finished model,
and is started again with the same command.
"""

from __future__ import annotations

import argparse
import csv
import difflib
import logging
import math
import time
import zipfile
import zlib
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
from training.train_classifier import lock_run_folder

logger = logging.getLogger(__name__)

#: The config whose keys every landmark config has.
BASE_CONFIG = "landmark_minimal"
#: Keys that must be whole numbers >= 1.
POSITIVE_INT = ("iterations", "batch_size", "samples_per_volume", "validate_every",
                "val_cases", "positive_ratio")
WEIGHTS = "landmark_unet.safetensors"
PARTIAL_WEIGHTS = "landmark_unet.partial.safetensors"
#: Arrays of a landmark sample, as training.prepare writes them.
SAMPLE_ARRAYS = ("image", "labels", "affine", "landmark_z_mm")


def _load(path: Path) -> dict:
    with np.load(path) as data:
        return {
            "image": data["image"].astype(np.float32)[None],  # (1, x, y, z)
            "label": data["labels"].astype(np.int64)[None],
            "affine": data["affine"], "landmark_z_mm": float(data["landmark_z_mm"]),
        }


def _is_number(value) -> bool:
    """A finite int or float (YAML's true and false are no numbers)."""
    if isinstance(value, bool):
        return False
    return isinstance(value, int) or (isinstance(value, float) and math.isfinite(value))


def validate_landmark(config: dict) -> None:
    """Refuse a config whose keys are not those of ``landmark_minimal`` or whose
    values cannot work, before anything is written or trained.

    Raises:
        ValueError: Naming the key, the value and what is expected.
    """
    known = set(load_config(BASE_CONFIG))  # its keys and config_file
    unknown, missing = sorted(set(config) - known), sorted(known - set(config))
    if unknown:
        close = {k: difflib.get_close_matches(k, known, 1) for k in unknown}
        hints = [f"{k!r}: did you mean {m[0]!r}?" for k, m in close.items() if m]
        hint = (" (is --config a landmark config?)" if missing
                else f" ({'; '.join(hints)})" if hints else "")
        raise ValueError(f"unknown config keys {unknown}; known keys are those of "
                         f"training/configs/{BASE_CONFIG}.yaml{hint}")
    if missing:
        raise ValueError(f"config keys {missing} are missing; a landmark config needs "
                         f"every key of training/configs/{BASE_CONFIG}.yaml")
    for key in POSITIVE_INT:
        value = config[key]
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{key} must be a whole number >= 1, got {value!r}")
    value = config["learning_rate"]
    if not (_is_number(value) and 0.0 < value <= 1.0):
        raise ValueError(f"learning_rate must be a number in (0, 1], got {value!r}"
                         + (" (write 1e-3 as 0.001)" if isinstance(value, str) else ""))
    value = config["weight_decay"]
    if not (_is_number(value) and 0.0 <= value <= 1.0):
        raise ValueError(f"weight_decay must be a number in [0, 1], got {value!r}"
                         + (" (write 1e-5 as 0.00001)" if isinstance(value, str) else ""))
    weights = config["class_weights"]
    if not (isinstance(weights, list) and len(weights) == 3
            and all(_is_number(w) and w >= 0 for w in weights) and sum(weights) > 0):
        raise ValueError("class_weights must be a list of three finite numbers >= 0, not "
                         f"all 0 (background, AIIS, femoral head), got {weights!r}")
    seed = config["seed"]
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be a whole number >= 0, got {seed!r}")
    if not isinstance(config["data"], str) or not config["data"]:
        raise ValueError("data must be the path of a training.prepare output folder, "
                         f"got {config['data']!r}")


def check_landmark_run_folder(run_dir: Path) -> None:
    """A new run needs a folder (or a place for one) that holds no finished run.

    Raises:
        ValueError: Saying what is in the way.
    """
    for folder in (run_dir, *run_dir.parents):
        if folder.exists():
            if not folder.is_dir():
                raise ValueError(f"--run must be a folder, but {folder} is a file; choose "
                                 "another --run folder")
            break
    if (run_dir / WEIGHTS).is_file():
        raise ValueError(f"{run_dir} already holds a finished landmark run ({WEIGHTS}); "
                         "choose another --run folder")
    if (run_dir / "checkpoint_last.safetensors").is_file():
        raise ValueError(f"{run_dir} holds a classifier run; choose another --run folder")


def load_samples(data_dir: Path) -> list[dict]:
    """Every landmark sample of a training.prepare output folder, checked.

    Raises:
        ValueError: No samples, or one that is not readable as training.prepare
            writes them (named by its file name only).
    """
    folder = data_dir / "landmark"
    files = sorted(folder.glob("*.npz"))
    if not files:
        where = "" if folder.is_dir() else " (no such folder)"
        raise ValueError(f"no landmark samples (*.npz) in {folder}{where}; make them with "
                         "python -m training.prepare --landmark-only --landmark-studies N "
                         f"--out {data_dir}")
    return [_load_checked(f) for f in tqdm(files, desc="loading")]


def _load_checked(path: Path) -> dict:
    expected = ("; expected an .npz with arrays image (x, y, z), labels (same shape, 0-2), "
                "affine (4, 4) and landmark_z_mm, as training.prepare writes them")
    try:
        with np.load(path) as data:
            absent = [k for k in SAMPLE_ARRAYS if k not in data.files]
        case = None if absent else _load(path)
    except (OSError, ValueError, TypeError, EOFError, zipfile.BadZipFile, zlib.error):
        raise ValueError(f"landmark sample {path.name} cannot be read" + expected) from None
    if absent:
        raise ValueError(f"landmark sample {path.name} has no {absent} array" + expected)
    image, labels = case["image"][0], case["label"][0]
    if (image.ndim != 3 or labels.shape != image.shape or case["affine"].shape != (4, 4)
            or not np.isfinite(image).all() or not np.isfinite(case["affine"]).all()
            or not math.isfinite(case["landmark_z_mm"])
            or labels.min() < 0 or labels.max() > g.LABEL_FEMORAL_HEAD):
        raise ValueError(f"landmark sample {path.name} holds arrays of other shapes or "
                         "values (non-finite numbers, labels outside 0-2)" + expected)
    return case


def check_val_cases(config: dict, samples: int, data_dir: Path) -> None:
    """Validation takes ``val_cases`` samples and leaves at least one for training.

    Raises:
        ValueError: Too few samples for that split.
    """
    if samples < 2:
        raise ValueError(f"training needs at least 2 landmark samples (validation and "
                         f"training), found {samples} in {data_dir / 'landmark'}; prepare "
                         "more with --landmark-studies")
    if not 0 < config["val_cases"] < samples:
        raise ValueError(f"val_cases must be between 1 and {samples - 1} for the "
                         f"{samples} landmark samples in {data_dir}, got "
                         f"{config['val_cases']}; prepare more with --landmark-studies")


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
    parser.add_argument("--device", default=None,
                        help="cpu, cuda or cuda:N (default: FEMURRISK_DEVICE, else CUDA "
                             "when present)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    # Everything a user can get wrong is checked before anything is written.
    try:
        config = load_config(args.config, args.set)
        validate_landmark(config)
        check_landmark_run_folder(args.run)
        device = registry.choose_device(args.device)
        data_dir = Path(config["data"])
        cases = load_samples(data_dir)
        check_val_cases(config, len(cases), data_dir)
        try:
            lock = lock_run_folder(args.run)  # noqa: F841 - held while the process lives
        except OSError as error:
            raise ValueError(f"cannot make the run folder {args.run}: {error.strerror}; "
                             "choose another --run folder") from None
        # Again under the lock: a run that held it may have finished meanwhile.
        check_landmark_run_folder(args.run)
    except ValueError as error:
        parser.error(str(error))
    save_config(config, args.run)
    set_determinism(config["seed"])
    torch.set_num_threads(max(1, torch.get_num_threads()))

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
    partial = args.run / PARTIAL_WEIGHTS  # the best weights so far; see the docstring
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
                        registry.save_weights(model, partial, {
                            "step": step, "val_mae_mm": f"{mae:.2f}",
                            "val_mae_slices": f"{mae / g.CROP_SLICE_SPACING_MM:.2f}",
                            "val_within_6mm": f"{within:.3f}", "config": config["config_file"],
                            "config_overrides": " ".join(config.get("config_overrides", [])),
                        }, fp16=False)
                if step >= config["iterations"]:
                    break
    progress.close()
    partial.replace(args.run / WEIGHTS)  # only now is the run finished
    logger.info("saved %s", args.run / WEIGHTS)


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        raise SystemExit("interrupted; the run folder holds no finished model, start it "
                         "again") from None
