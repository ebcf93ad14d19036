"""Train a fracture classifier on cached per-side crops.

    python -m training.train_classifier --config densenet121_minimal --run runs/densenet121

Splits by case (patient), trains with random affine augmentation applied to both
classes alike, keeps the epoch with the best validation AUROC, then sets the operating
threshold on validation and the prior-shift calibration (see the config).
"""

from __future__ import annotations

import argparse
import csv
import logging
import time
from pathlib import Path

import numpy as np
import torch
from monai.metrics import compute_roc_auc
from monai.transforms import RandAffine
from monai.utils import set_determinism
from tqdm import tqdm

from femurrisk import registry
from training.config import load_config, save_config

logger = logging.getLogger(__name__)


def logit(p: float) -> float:
    return float(np.log(p / (1.0 - p)))


def split_by_case(case_ids: np.ndarray, val_fraction: float, seed: int) -> np.ndarray:
    """Boolean mask of validation rows; every side of a case falls on one side of it."""
    cases = np.unique(case_ids)
    rng = np.random.default_rng(seed)
    val_cases = rng.choice(cases, size=max(1, int(round(val_fraction * len(cases)))), replace=False)
    return np.isin(case_ids, val_cases)


def youden_threshold(probabilities: np.ndarray, labels: np.ndarray) -> float:
    """Threshold maximising sensitivity + specificity - 1 on the given set."""
    best, best_t = -1.0, 0.5
    for t in np.unique(probabilities):
        predicted = probabilities >= t
        sensitivity = (predicted & (labels == 1)).sum() / max(1, (labels == 1).sum())
        specificity = (~predicted & (labels == 0)).sum() / max(1, (labels == 0).sum())
        if sensitivity + specificity - 1 > best:
            best, best_t = sensitivity + specificity - 1, float(t)
    return best_t


@torch.no_grad()
def predict_logits(model, inputs: np.ndarray, device, batch_size: int = 16) -> np.ndarray:
    model.eval()
    out = []
    for start in range(0, len(inputs), batch_size):
        x = torch.from_numpy(inputs[start:start + batch_size, None].astype(np.float32) / 255.0)
        out.append(model(x.to(device))[:, 0].float().cpu().numpy())
    model.train()
    return np.concatenate(out)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="densenet121_minimal")
    parser.add_argument("--run", type=Path, required=True)
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    config = load_config(args.config, args.set)
    save_config(config, args.run)
    set_determinism(config["seed"])
    device = registry.choose_device(None)

    with np.load(Path(config["data"]) / "crops.npz") as data:
        keep = ~data["implant"]  # implanted sides are not scored by the product
        inputs, labels = data["inputs"][keep], data["labels"][keep]
        case_ids = data["case_id"][keep]
    is_val = split_by_case(case_ids, config["val_fraction"], config["seed"])
    x_train, y_train = inputs[~is_val], labels[~is_val]
    x_val, y_val = inputs[is_val], labels[is_val]
    logger.info("train %d sides (%d positive), validation %d (%d positive)",
                len(y_train), y_train.sum(), len(y_val), y_val.sum())

    model = registry.build_classifier(config["architecture"]).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=config["learning_rate"],
                                 weight_decay=config["weight_decay"])
    loss_fn = torch.nn.BCEWithLogitsLoss()
    augment = RandAffine(
        prob=config["augment_probability"], rotate_range=(0.12, 0.12, 0.12),
        scale_range=(0.08, 0.08, 0.08), translate_range=(3, 3, 1), padding_mode="border",
    )
    augment.set_random_state(config["seed"])
    rng = np.random.default_rng(config["seed"])
    best_auc, start = -1.0, time.time()
    with open(args.run / "metrics.csv", "w", newline="") as handle:
        log = csv.writer(handle)
        log.writerow(["epoch", "train_loss", "val_auroc", "seconds"])
        for epoch in range(1, config["epochs"] + 1):
            order = rng.permutation(len(y_train))
            losses = []
            for begin in tqdm(range(0, len(order), config["batch_size"]), desc=f"epoch {epoch}"):
                index = order[begin:begin + config["batch_size"]]
                batch = torch.stack([
                    augment(torch.from_numpy(x_train[i][None].astype(np.float32) / 255.0))
                    for i in index
                ])  # (N, 1, 64, 64, 32)
                target = torch.from_numpy(y_train[index].astype(np.float32))[:, None]
                optimizer.zero_grad()
                loss = loss_fn(model(batch.to(device)), target.to(device))
                loss.backward()
                optimizer.step()
                losses.append(loss.item())
            val_logits = predict_logits(model, x_val, device)
            auc = float(compute_roc_auc(torch.from_numpy(val_logits), torch.from_numpy(y_val)))
            log.writerow([epoch, f"{np.mean(losses):.4f}", f"{auc:.4f}", f"{time.time() - start:.0f}"])
            handle.flush()
            logger.info("epoch %d: loss %.3f, validation AUROC %.3f", epoch, np.mean(losses), auc)
            if auc > best_auc:
                best_auc = auc
                best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
                best_logits, best_epoch = val_logits, epoch

    model.load_state_dict(best_state)
    train_prevalence = float(y_train.mean())
    offset = logit(config["target_prevalence"]) - logit(train_prevalence)
    calibrated = 1.0 / (1.0 + np.exp(-(best_logits + offset)))
    threshold = youden_threshold(calibrated, y_val)
    predicted = calibrated >= threshold
    metadata = {
        "architecture": config["architecture"], "epoch": best_epoch,
        "val_auroc": f"{best_auc:.4f}", "threshold": f"{threshold:.6g}",
        "logit_offset": f"{offset:.6g}", "train_prevalence": f"{train_prevalence:.4f}",
        "target_prevalence": config["target_prevalence"],
        "val_sensitivity": f"{(predicted & (y_val == 1)).sum() / max(1, y_val.sum()):.4f}",
        "val_specificity": f"{(~predicted & (y_val == 0)).sum() / max(1, (y_val == 0).sum()):.4f}",
        "val_sides": len(y_val), "val_positives": int(y_val.sum()),
        "train_sides": len(y_train), "train_positives": int(y_train.sum()),
        "config": config["config_file"],
    }
    registry.save_weights(model, args.run / f"classifier_{config['architecture']}.safetensors",
                          metadata, fp16=False)
    logger.info("saved: %s", metadata)


if __name__ == "__main__":
    main()
