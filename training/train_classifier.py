"""Train a fracture classifier on cached per-side crops, by the source study's protocol.

    python -m training.train_classifier --config densenet121_minimal --run runs/densenet121
    python -m training.train_classifier --config densenet121_quick --run runs/quick/densenet121
    torchrun --nproc_per_node 8 -m training.train_classifier -- --config densenet121_paper --run DIR
    python -m training.train_classifier --config DIR/config.yaml --run DIR --resume

Steps, as in the study (config keys in brackets): split by patient, training and
validation from one hospital [train_site, val_fraction], test on the others; each
training positive is shown with [positive_copies] affine copies per epoch, and every
presentation of either class is augmented with the same chance [augment_probability]
so that augmentation is no label; the epoch with the best validation AUROC is kept;
the operating threshold is chosen on validation only [threshold_rule]; probabilities
are moved by a prior shift from the presented (inflated) prevalence back to the
cohort's and to the deployment prevalence [target_prevalence].

A run folder holds one run: a folder another training is writing is refused (a lock
held while the process lives), a new run refuses a folder with a checkpoint, and
``--resume`` continues only with the run's own config (its saved ``config.yaml``, as in
the last command above; ``epochs`` may be raised).

Outputs in the run folder: ``config.yaml`` (resolved), ``metrics.csv`` and ``tb/``
(per epoch), ``checkpoint_last.safetensors`` (``--resume`` continues from it),
``classifier_<arch>.safetensors`` (best epoch, metadata for the app),
``predictions.csv`` (validation and test rows, with augmented copies) and
``summary.json`` (split sizes, calibration, threshold, throughput, shortcut check).
"""

from __future__ import annotations

import argparse
import csv
import fcntl
import json
import logging
import os
import time
import zipfile
from pathlib import Path

import numpy as np
import torch
import yaml
from safetensors.torch import load_file, save_file
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from tqdm import tqdm

from femurrisk import geometry as g
from femurrisk import registry
from training import distributed
from training.augment import (
    EVAL_EPOCH, affine_transform, augmentation_shift, augmented, presentation_seed, to_tensor,
    training_transform,
)
from training.config import load_config, save_config, validate
from training.data import assign_splits
from training.metrics import auroc, auprc, choose_threshold, logit, prior_shift, sigmoid

logger = logging.getLogger(__name__)

#: Per-row truth carried into predictions.csv when crops.npz has it.
TRUTH_FIELDS = ("true_risk", "lesion_kind", "lesion_place", "size_ratio",
                "axial_cortical_involvement_mm")


# --- Data -----------------------------------------------------------------------------


def _read_npz(path: Path) -> dict[str, np.ndarray]:
    """Every array of an .npz archive, or a ValueError saying why there are none."""
    try:
        loaded = np.load(path)
    except (OSError, EOFError, ValueError, zipfile.BadZipFile) as error:
        raise ValueError(f"{path} is not a readable NumPy .npz archive "
                         f"({type(error).__name__}: empty, truncated or another format)"
                         ) from None
    if not isinstance(loaded, np.lib.npyio.NpzFile):
        raise ValueError(f"{path} is a single array, not a NumPy .npz archive of the "
                         "arrays of training/prepare.py")
    try:
        with loaded as data:
            return {k: data[k] for k in data.files}
    except ValueError:  # object arrays need allow_pickle, which is never given
        raise ValueError(f"{path} holds Python objects (pickled arrays); save plain "
                         "arrays of numbers and strings (np.savez)") from None
    except (OSError, EOFError, zipfile.BadZipFile) as error:
        raise ValueError(f"{path} is not a readable NumPy .npz archive "
                         f"({type(error).__name__}: truncated or damaged)") from None


def load_crops(data_dir: Path) -> dict[str, np.ndarray]:
    """Arrays of ``crops.npz`` without implanted sides; older caches get defaults.

    Caches written before sites and patients were recorded take the site from
    ``manifest.csv`` when it has one and treat each case as its own patient.
    """
    path = Path(data_dir) / "crops.npz"
    if not path.is_file():
        raise ValueError(f"no crops.npz in {data_dir}: make it with training.prepare "
                         "or lay out your own (training/prepare.py, CROP_FIELDS)")
    arrays = _read_npz(path)
    arrays.setdefault("label", arrays.get("labels"))
    check_crops(arrays)
    if not len(arrays["inputs"]):
        raise ValueError(f"{path} holds no sides")
    arrays.setdefault("patient_id", arrays["case_id"])
    if "site" not in arrays:
        sites = {}
        manifest = data_dir / "manifest.csv"
        if manifest.is_file():
            with open(manifest) as handle:
                sites = {int(r["case_id"]): r.get("site", "") for r in csv.DictReader(handle)}
        arrays["site"] = np.array([sites.get(int(c), "") for c in arrays["case_id"]])
    keep = ~arrays["implant"].astype(bool)  # the product does not score implanted sides
    if not keep.any():
        raise ValueError(f"every side in {path} has an implant; the product scores "
                         "femurs without one, so nothing is left to train on")
    return {k: np.asarray(v)[keep] for k, v in arrays.items() if v is not None}


def dataset_splits(data: dict, labels: np.ndarray, config: dict) -> np.ndarray:
    """Per-row split: crops.npz's own ``split`` when it has one for every row (the
    design cohort, split by :func:`training.splits.study_splits`), otherwise by
    patient and site with ``train_site`` and ``val_fraction``.

    Raises:
        ValueError: If a patient's rows fall into two splits.
    """
    given = np.asarray(data.get("split", np.array([""] * len(labels)))).astype(str)
    if len(given) and all(given != ""):
        logger.info("splits from crops.npz (train_site and val_fraction unused)")
        split = given
    else:
        split = assign_splits(data["patient_id"], data["site"], labels,
                              config["train_site"], config["val_fraction"], config["seed"])
    patients = np.asarray(data["patient_id"]).astype(str)
    crossing = [p for p in np.unique(patients) if len(set(split[patients == p])) > 1]
    if crossing:
        raise ValueError(f"{len(crossing)} patients have rows in two splits; "
                         "every patient must belong to one split")
    return split


def check_splits(rows: dict[str, np.ndarray], labels: np.ndarray) -> None:
    """Training and validation must each hold both classes (the threshold and the
    epoch choice need validation positives and negatives).

    Raises:
        ValueError: Naming the split and what it lacks.
    """
    for name in ("train", "validation"):
        y = labels[rows[name]]
        if len(y) == 0 or y.min() == y.max():
            raise ValueError(
                f"the {name} split needs positive and negative sides, got {len(y)} sides "
                f"with {int(y.sum())} positive; use a larger cohort (training.prepare "
                "--scale, --case-control) or check the labels and splits")


#: Config keys that may change when a run is resumed.
RESUMABLE_CHANGES = {"epochs", "eval_batch_size", "num_workers", "config_file",
                     "config_overrides"}


def check_run_folder(run_dir: Path, config: dict, resume: bool) -> None:
    """A new run needs a folder without a run; a resumed one its checkpoint and the
    same config (only ``epochs`` and evaluation settings may change).

    Raises:
        ValueError: Saying what is in the way.
    """
    if run_dir.exists() and not run_dir.is_dir():
        raise ValueError(f"--run must be a folder, but {run_dir} is a file")
    checkpoint = run_dir / "checkpoint_last.safetensors"
    if not resume:
        if checkpoint.is_file():
            raise ValueError(f"{run_dir} already holds a run; continue it with --resume "
                             "or choose another --run folder")
        return
    if not checkpoint.is_file():
        raise ValueError(f"nothing to resume: {run_dir} has no checkpoint_last.safetensors")
    try:
        saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    except (OSError, yaml.YAMLError):
        saved = None
    if not isinstance(saved, dict):
        raise ValueError(f"cannot resume: {run_dir / 'config.yaml'} is missing or unreadable")
    changed = sorted(k for k in (set(saved) | set(config)) - RESUMABLE_CHANGES
                     if saved.get(k) != config.get(k))
    if changed:
        raise ValueError(f"--resume needs the run's own config; these keys differ from "
                         f"{run_dir / 'config.yaml'}: {changed}")


def distributed_world_size() -> int:
    """Processes training together (torchrun's WORLD_SIZE; 1 without it)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def lock_run_folder(run_dir: Path):
    """Hold an exclusive lock on the run folder for as long as this process lives.

    Two trainings writing one folder would mix their checkpoints and metrics; the
    second one is refused instead. The lock (``flock`` on ``.lock``) goes with the
    process, so a killed run leaves nothing to clean up.

    Returns:
        The open lock file; keep a reference to it.

    Raises:
        ValueError: Another process holds the folder.
    """
    run_dir.mkdir(parents=True, exist_ok=True)
    handle = open(run_dir / ".lock", "w")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        handle.close()
        raise ValueError(f"{run_dir} is in use by another training process; wait for it "
                         "or choose another --run folder") from None
    return handle


def check_crops(arrays: dict) -> None:
    """Refuse a crops.npz that training would misread, naming what is wrong.

    Raises:
        ValueError: A missing array, inputs that are not (N, 64, 64, 32) uint8,
            arrays of other lengths, labels other than 0/1, sides other than
            left/right, or split values other than train/validation/test (on every
            row or on none), or non-finite truth (true_risk and the lesion measures
            the rule baselines read).
    """
    for name in ("inputs", "label", "case_id", "side", "implant"):
        if arrays.get(name) is None:
            raise ValueError(f"crops.npz has no '{name}' array; expected the arrays "
                             "of training/prepare.py (CROP_FIELDS and inputs)")
    inputs = arrays["inputs"]
    for name, value in arrays.items():
        if value is not None and name != "inputs" and np.ndim(value) != 1:
            raise ValueError(f"crops.npz '{name}' must be one value per side (1-D), got "
                             f"shape {np.shape(value)}")
    if inputs.ndim != 4 or tuple(inputs.shape[1:]) != g.CROP_SHAPE or inputs.dtype != np.uint8:
        raise ValueError(f"crops.npz inputs must be (N, {', '.join(map(str, g.CROP_SHAPE))}) "
                         f"uint8 bone-window crops, got {inputs.shape} {inputs.dtype}")
    n = len(inputs)
    for name, value in arrays.items():
        if np.ndim(value) >= 1 and len(value) != n:
            raise ValueError(f"crops.npz '{name}' has {len(value)} rows, inputs have {n}")
    if not np.isin(arrays["label"], (0, 1)).all():
        raise ValueError("crops.npz labels must be 0 (no fracture) or 1 (fracture), got "
                         f"{sorted(set(np.unique(arrays['label']).tolist()) - {0, 1})}")
    implant = arrays["implant"]
    if implant.dtype != bool and not np.isin(implant, (0, 1)).all():
        raise ValueError("crops.npz implant must be true/false (or 0/1) per side, got "
                         f"values such as {np.unique(implant)[:3].tolist()}")
    if not np.isin(arrays["side"].astype(str), ("left", "right")).all():
        raise ValueError("crops.npz sides must be 'left' or 'right'")
    if "split" in arrays:
        split = arrays["split"].astype(str)
        bad = sorted(set(split) - {"train", "validation", "test", ""})
        if bad:
            raise ValueError(f"crops.npz split values must be train, validation or test, "
                             f"got {bad}")
        if (split == "").any() and (split != "").any():
            raise ValueError("crops.npz split must be given on every row or on none, "
                             f"got {int((split == '').sum())} rows without one")
    for name in ("true_risk", "axial_cortical_involvement_mm", "size_ratio"):
        if name not in arrays:
            continue
        try:
            bad = int((~np.isfinite(np.asarray(arrays[name], dtype=np.float64))).sum())
        except (TypeError, ValueError):
            bad = -1
        if bad:
            raise ValueError(f"crops.npz '{name}' must be a finite number on every row "
                             "(leave the array out when it is unknown), got "
                             + ("values that are not numbers" if bad < 0
                                else f"{bad} non-finite values"))


class Presentations(Dataset):
    """Training presentations of one epoch: (row, copy) pairs, augmented reproducibly.

    Every positive row appears ``1 + positive_copies`` times, every negative once.
    Whether a presentation is augmented is drawn from its own seed: with
    ``augment_all_classes`` every presentation has the chance ``augment_probability``;
    without it (the study's literal protocol) only a positive's copies 1.. are.
    """

    def __init__(self, inputs: np.ndarray, labels: np.ndarray, rows: np.ndarray,
                 config: dict) -> None:
        self.inputs, self.labels, self.config = inputs, labels, config
        copies = np.where(labels[rows] == 1, 1 + config["positive_copies"], 1)
        self.items = [(int(r), c) for r, n in zip(rows, copies) for c in range(n)]
        self.transform = training_transform(config)
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.items)

    def positive_share(self) -> float:
        return float(np.mean([self.labels[r] for r, _ in self.items]))

    def is_augmented(self, row: int, copy: int, seed: int) -> bool:
        if self.config["augment_all_classes"]:
            draw = np.random.default_rng(seed).random()
            return bool(draw < self.config["augment_probability"])
        return copy > 0

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        row, copy = self.items[index]
        seed = presentation_seed(self.config["seed"], self.epoch, row, copy)
        volume = self.inputs[row]
        x = (augmented(volume, self.transform, seed) if self.is_augmented(row, copy, seed)
             else to_tensor(volume))  # (1, x, y, z)
        return x, torch.tensor([float(self.labels[row])])


def subsample_patients(rows: np.ndarray, patient_ids: np.ndarray, limit: int | None,
                       seed: int) -> np.ndarray:
    """At most ``limit`` patients' rows, drawn at random (all rows when None)."""
    patients = np.unique(patient_ids[rows])
    if limit is None or len(patients) <= limit:
        return rows
    keep = np.random.default_rng([seed, 5]).choice(patients, size=limit, replace=False)
    return rows[np.isin(patient_ids[rows], keep)]


def evaluation_rows(labels: np.ndarray, rows: np.ndarray, positive_copies: int
                    ) -> list[tuple[int, int]]:
    """(row, copy) pairs to score: every row as is, positives also as fixed copies."""
    items = [(int(r), 0) for r in rows]
    items += [(int(r), c) for r in rows if labels[r] == 1
              for c in range(1, positive_copies + 1)]
    return items


@torch.no_grad()
def predict(model: torch.nn.Module, inputs: np.ndarray, items: list[tuple[int, int]],
            config: dict, device: torch.device, desc: str = "predict") -> np.ndarray:
    """Logits of (row, copy) pairs; copy 0 is the crop as is, others fixed augmentations."""
    model.eval()
    transform = affine_transform(config)
    size = config["eval_batch_size"]
    out = []
    for start in tqdm(range(0, len(items), size), desc=desc, leave=False):
        batch = torch.stack([
            to_tensor(inputs[r]) if c == 0 else
            augmented(inputs[r], transform, presentation_seed(config["seed"], EVAL_EPOCH, r, c))
            for r, c in items[start:start + size]
        ])  # (N, 1, x, y, z)
        out.append(model(batch.to(device))[:, 0].float().cpu().numpy())
    return np.concatenate(out) if out else np.zeros(0, np.float32)


# --- Checkpoints ----------------------------------------------------------------------


def save_checkpoint(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    state: dict) -> None:
    """Model, optimizer and loop state as one safetensors file (written atomically)."""
    tensors = {f"model.{k}": v.detach().cpu().contiguous()
               for k, v in model.state_dict().items()}
    optim = optimizer.state_dict()
    for pid, slots in optim["state"].items():
        for name, value in slots.items():
            tensors[f"optimizer.{pid}.{name}"] = torch.as_tensor(value).cpu().contiguous()
    meta = {"param_groups": json.dumps(optim["param_groups"]), "state": json.dumps(state)}
    tmp = path.with_suffix(".tmp")
    save_file(tensors, str(tmp), metadata=meta)
    tmp.replace(path)


def load_checkpoint(path: Path, model: torch.nn.Module,
                    optimizer: torch.optim.Optimizer) -> dict:
    """Restore model and optimizer from :func:`save_checkpoint`; return the loop state."""
    from safetensors import safe_open

    tensors = load_file(str(path))
    with safe_open(str(path), framework="pt") as handle:
        meta = handle.metadata()
    model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
    slots: dict[int, dict] = {}
    for key, value in tensors.items():
        if key.startswith("optimizer."):
            _, pid, name = key.split(".", 2)
            slots.setdefault(int(pid), {})[name] = value
    optimizer.load_state_dict({"state": slots,
                               "param_groups": json.loads(meta["param_groups"])})
    return json.loads(meta["state"])


# --- Training -------------------------------------------------------------------------


def learning_rate_at(step: int, total_steps: int, config: dict) -> float:
    """Learning rate of optimizer step ``step`` (0-based) of ``total_steps``.

    ``lr_schedule: constant`` keeps ``learning_rate``; ``cosine`` rises linearly over
    ``warmup_steps`` and then decays to zero along a half cosine, which lets a short
    run take large steps early and still end at a settled model. The rate depends
    on the step number alone, so a resumed run continues the same curve.
    """
    base = float(config["learning_rate"])
    if config.get("lr_schedule", "constant") == "constant":
        return base
    warmup = int(config.get("warmup_steps", 0))
    if step < warmup:
        return base * (step + 1) / warmup
    progress = (step - warmup) / max(1, total_steps - warmup)
    return base * 0.5 * (1.0 + np.cos(np.pi * min(progress, 1.0)))


def train_one_epoch(model: torch.nn.Module, loader: DataLoader,
                    optimizer: torch.optim.Optimizer, device: torch.device,
                    scaler: torch.amp.GradScaler | None = None, on_step=None,
                    desc: str = "train", show: bool = True,
                    lr_at=None, first_step: int = 0) -> list[float]:
    """One pass over ``loader``; returns the loss of every step (this process's).

    Args:
        on_step: Called as ``on_step(step, loss)`` after every optimizer step (the
            distributed test checks parameters there).
        lr_at: ``lr_at(global_step)`` sets the learning rate before each step
            (None: leave the optimizer's rate).
        first_step: Global step number of this epoch's first step.
    """
    model.train()
    loss_fn = torch.nn.BCEWithLogitsLoss()
    losses = []
    for x, y in tqdm(loader, desc=desc, leave=False, disable=not show):
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        if lr_at is not None:
            for group in optimizer.param_groups:
                group["lr"] = lr_at(first_step + len(losses))
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.float16, enabled=scaler is not None):
            loss = loss_fn(model(x).float(), y)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            optimizer.step()
        losses.append(float(loss.item()))
        if on_step is not None:
            on_step(len(losses), losses[-1])
    return losses


def pipeline_throughput(loader: DataLoader, max_batches: int = 20) -> float:
    """Cases per second of the data pipeline alone (loading and augmentation)."""
    start, cases = time.perf_counter(), 0
    for n, (x, _) in enumerate(loader):
        cases += len(x)
        if n + 1 >= max_batches:
            break
    return cases / max(time.perf_counter() - start, 1e-9)


def _tensorboard(run_dir: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is in requirements.txt; CSV still logs
        logger.warning("tensorboard is not installed; metrics go to metrics.csv only")
        return None
    return SummaryWriter(str(run_dir / "tb"))


def set_determinism(config: dict, device: torch.device) -> None:
    """Seeds everywhere; deterministic kernels on CPU, cudnn autotuning on GPU if asked."""
    torch.manual_seed(config["seed"])
    np.random.seed(config["seed"] % 2**32)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = bool(config["cudnn_benchmark"])
        torch.backends.cudnn.deterministic = not config["cudnn_benchmark"]
    else:
        torch.use_deterministic_algorithms(True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=None,
                        help="config name or YAML path (default: densenet121_minimal; "
                        "with --resume, the run's own config.yaml)")
    parser.add_argument("--run", type=Path, required=True)
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE")
    parser.add_argument("--resume", action="store_true",
                        help="continue from the run's checkpoint_last.safetensors")
    parser.add_argument("--device", default=None, help="cpu, cuda or cuda:N")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    # Everything a user can get wrong is checked before anything is written.
    if args.config is None:
        saved = args.run / "config.yaml"
        args.config = str(saved) if args.resume and saved.is_file() else "densenet121_minimal"
    try:
        config = load_config(args.config, args.set, base="classifier_base")
        validate(config, "classifier_base")
        check_run_folder(args.run, config, args.resume)  # before the data are read
        data = load_crops(Path(config["data"]))
        labels = data["label"].astype(np.int64)
        split = dataset_splits(data, labels, config)
        rows = {name: np.nonzero(split == name)[0]
                for name in ("train", "validation", "test")}
        check_splits(rows, labels)
        requested_device = registry.choose_device(args.device)
        if int(os.environ.get("RANK", "0")) == 0:
            lock = lock_run_folder(args.run)  # noqa: F841 - held until the process ends
    except ValueError as error:
        parser.error(str(error))
    try:
        train(args, config, data, labels, rows, requested_device)
    except KeyboardInterrupt:
        if (args.run / "checkpoint_last.safetensors").is_file():
            raise SystemExit(f"interrupted; continue with: python -m training.train_classifier "
                             f"--run {args.run} --resume") from None
        raise SystemExit("interrupted in the first epoch, before any checkpoint: nothing to "
                         "resume; start the run again with the same command") from None


def train(args: argparse.Namespace, config: dict, data: dict, labels: np.ndarray,
          rows: dict, requested_device: torch.device) -> None:
    """Train, keep the selected epoch and finish the run (after main's checks)."""
    info = distributed.init(requested_device)
    device = info.device
    if info.is_main:
        save_config(config, args.run)
        # A resumed run is unfinished until finish() writes these again: outputs of an
        # earlier, shorter finish must not pass for this run's (export, benchmark).
        for name in ("summary.json", "predictions.csv"):
            (args.run / name).unlink(missing_ok=True)
        for path in args.run.glob("classifier_*.safetensors"):
            path.unlink()
    set_determinism(config, device)

    # Data and splits by patient.
    rows["test"] = subsample_patients(rows["test"], data["patient_id"],
                                      config["max_test_patients"], config["seed"])
    for name, index in rows.items() if info.is_main else ():
        logger.info("%s: %d sides (%d positive) of %d patients", name, len(index),
                    labels[index].sum(), len(np.unique(data["patient_id"][index])))

    # Presentations, sampler (one shuffled order per epoch, shared by all ranks).
    dataset = Presentations(data["inputs"], labels, rows["train"], config)
    sampler = DistributedSampler(dataset, num_replicas=info.world_size, rank=info.rank,
                                 shuffle=True, seed=config["seed"])
    loader = DataLoader(dataset, batch_size=max(1, config["batch_size"] // info.world_size),
                        sampler=sampler, num_workers=config["num_workers"],
                        pin_memory=device.type == "cuda",
                        persistent_workers=config["num_workers"] > 0)

    model = registry.build_classifier(config["architecture"]).to(device)
    if config.get("init_weights"):
        # Fine-tune from an earlier run's weights (a longer schedule in two sittings).
        registry.load_weights(model, Path(config["init_weights"]))
        logger.info("initialised from %s", config["init_weights"])
    optimizer = torch.optim.Adam(model.parameters(), lr=config["learning_rate"],
                                 weight_decay=config["weight_decay"])
    use_amp = device.type == "cuda" and config["amp"]
    scaler = torch.amp.GradScaler("cuda") if use_amp else None
    state = {"epoch": 0, "best": -1.0, "best_epoch": 0, "seconds": 0.0, "cases": 0}
    checkpoint = args.run / "checkpoint_last.safetensors"
    if args.resume and checkpoint.is_file():
        state = load_checkpoint(checkpoint, model, optimizer)
        logger.info("resumed after epoch %d", state["epoch"])
    model = distributed.wrap(model, info)

    sampler.set_epoch(0)
    dataset.epoch = 0
    pipeline_cps = pipeline_throughput(loader)
    writer = _tensorboard(args.run) if info.is_main else None
    log_path = args.run / "metrics.csv"
    if info.is_main and (state["epoch"] == 0 or not log_path.is_file()):
        with open(log_path, "w", newline="") as handle:
            csv.writer(handle).writerow(["epoch", "train_loss", "val_auroc", "val_auprc",
                                         "train_cases_per_s", "seconds"])
    val_items = evaluation_rows(labels, rows["validation"], 0)
    for epoch in range(state["epoch"] + 1, config["epochs"] + 1):
        torch.manual_seed(config["seed"] * 1000 + epoch)
        sampler.set_epoch(epoch)
        dataset.epoch = epoch
        start = time.perf_counter()
        total_steps = config["epochs"] * len(loader)
        losses = train_one_epoch(model, loader, optimizer, device, scaler,
                                 desc=f"epoch {epoch}", show=info.is_main,
                                 lr_at=lambda step: learning_rate_at(step, total_steps, config),
                                 first_step=(epoch - 1) * len(loader))
        seconds = time.perf_counter() - start
        loss = distributed.mean_over_ranks(float(np.mean(losses)), info)
        if not np.isfinite(loss):
            raise SystemExit(f"training diverged at epoch {epoch} (loss {loss}); "
                             "lower learning_rate or check the crops")
        state["seconds"] += seconds
        state["cases"] += len(dataset)
        if info.is_main:
            val_logits = predict(distributed.unwrap(model), data["inputs"], val_items,
                                 config, device, "validation")
            y_val = labels[rows["validation"]]
            auc, ap = auroc(y_val, val_logits), auprc(y_val, val_logits)
            cps = len(dataset) / seconds
            with open(log_path, "a", newline="") as handle:
                csv.writer(handle).writerow([epoch, f"{loss:.4f}", f"{auc:.4f}", f"{ap:.4f}",
                                             f"{cps:.2f}", f"{state['seconds']:.0f}"])
            if writer is not None:
                for key, value in (("train/loss", loss), ("val/auroc", auc),
                                   ("val/auprc", ap), ("train/cases_per_s", cps)):
                    writer.add_scalar(key, value, epoch)
                writer.flush()
            logger.info("epoch %d: loss %.3f, validation AUROC %.3f, %.2f cases/s",
                        epoch, loss, auc, cps)
            keep = config["select_metric"] == "last" or auc > state["best"]
            if keep or not np.isfinite(auc):
                state["best"], state["best_epoch"] = float(np.nan_to_num(auc, nan=0.0)), epoch
                registry.save_weights(distributed.unwrap(model),
                                      args.run / "best_model.safetensors", {}, fp16=False)
            state["epoch"] = epoch
            save_checkpoint(checkpoint, distributed.unwrap(model), optimizer, state)
        distributed.barrier(info)
    if writer is not None:
        writer.close()
    model = distributed.unwrap(model)  # every rank lets go of the wrapper before close()
    if info.is_main:
        registry.load_weights(model, args.run / "best_model.safetensors")
        finish(model, data, labels, rows, config, args.run, device, state, pipeline_cps)
    distributed.close(info)


# --- After training: calibration, threshold, predictions --------------------------------


def finish(model: torch.nn.Module, data: dict, labels: np.ndarray, rows: dict,
           config: dict, run_dir: Path, device: torch.device, state: dict,
           pipeline_cps: float) -> None:
    """Score validation and test, calibrate, choose the threshold, write the outputs.

    ``summary.json`` is written last: its presence marks a finished run.
    """
    y_train = labels[rows["train"]]
    presented = (y_train.sum() * (1 + config["positive_copies"])) / (
        y_train.sum() * (1 + config["positive_copies"]) + (1 - y_train).sum())
    cohort_prevalence = float(y_train.mean())
    target = config["target_prevalence"]
    target = cohort_prevalence if target == "cohort" else float(target)
    offset_cohort = prior_shift(presented, cohort_prevalence)
    offset_deploy = prior_shift(presented, target)

    records = []
    for name, copies in (("validation", config["val_positive_copies"]),
                         ("test", config["test_positive_copies"])):
        items = evaluation_rows(labels, rows[name], copies)
        logits = predict(model, data["inputs"], items, config, device, name)
        for (row, copy), z in zip(items, logits):
            record = {"set": name, "row": row, "copy": copy,
                      "case_id": int(data["case_id"][row]),
                      "patient_id": str(data["patient_id"][row]),
                      "site": str(data["site"][row]), "side": str(data["side"][row]),
                      "label": int(labels[row]), "logit": float(z),
                      "probability": float(sigmoid(z + offset_cohort))}
            for key in TRUTH_FIELDS:
                if key in data:
                    value = data[key][row]
                    record[key] = value.item() if hasattr(value, "item") else value
            records.append(record)

    val = [r for r in records if r["set"] == "validation"
           and (r["copy"] == 0 or config["threshold_set"] == "validation_augmented")]
    threshold = choose_threshold(np.array([r["label"] for r in val]),
                                 np.array([r["probability"] for r in val]),
                                 config["threshold_rule"])
    # The app compares deployment-calibrated probabilities with its threshold.
    app_threshold = float(sigmoid(logit(threshold) - offset_cohort + offset_deploy))
    negatives = data["inputs"][rows["validation"]][labels[rows["validation"]] == 0]
    shortcut = augmentation_shift(model, negatives, config, device, config["seed"],
                                  config["eval_batch_size"])

    with open(run_dir / "predictions.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(records[0]))
        writer.writeheader()
        writer.writerows(records)
    summary = {
        "architecture": config["architecture"], "best_epoch": state["best_epoch"],
        "val_auroc": state["best"],
        "split": {name: {"sides": int(len(index)), "positives": int(labels[index].sum()),
                         "patients": int(len(np.unique(data["patient_id"][index]))),
                         "sites": sorted(set(map(str, data["site"][index])))}
                  for name, index in rows.items()},
        "presented_prevalence": float(presented), "cohort_prevalence": cohort_prevalence,
        "target_prevalence": target, "logit_offset_cohort": offset_cohort,
        "logit_offset": offset_deploy, "threshold": threshold,
        "threshold_deployment": app_threshold, "threshold_rule": config["threshold_rule"],
        "threshold_set": config["threshold_set"],
        "train_cases_per_s": state["cases"] / max(state["seconds"], 1e-9),
        "pipeline_cases_per_s": pipeline_cps, "augmentation_shift": shortcut,
    }
    metadata = {
        "architecture": config["architecture"], "epoch": state["best_epoch"],
        "val_auroc": f"{state['best']:.4f}", "threshold": f"{app_threshold:.6g}",
        "logit_offset": f"{offset_deploy:.6g}", "train_prevalence": f"{presented:.4f}",
        "target_prevalence": target, "threshold_rule": config["threshold_rule"],
        "train_sides": int(len(y_train)), "train_positives": int(y_train.sum()),
        "val_sides": int(len(rows["validation"])),
        "val_positives": int(labels[rows["validation"]].sum()),
        "config": config["config_file"],
        "config_overrides": " ".join(config.get("config_overrides", [])),
        "device": (f"{torch.cuda.get_device_name(device)} x {distributed_world_size()}"
                   if device.type == "cuda"
                   else f"CPU, {torch.get_num_threads()} threads x {distributed_world_size()} "
                   "process(es)"),
    }
    registry.save_weights(model, run_dir / f"classifier_{config['architecture']}.safetensors",
                          metadata, fp16=False)
    (run_dir / "summary.tmp.json").write_text(json.dumps(summary, indent=2))
    (run_dir / "summary.tmp.json").replace(run_dir / "summary.json")
    logger.info("saved: %s", metadata)


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        raise SystemExit("interrupted; continue the run with --resume") from None
