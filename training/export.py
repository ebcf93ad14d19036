"""Export trained weights to assets/ and regenerate the model card from the runs.

    python -m training.export --classifier-run runs/densenet121 --landmark-run runs/landmark

The classifier is stored in fp16 (a 3D DenseNet-121 is 45 MB in fp32, 22 MB in fp16);
the U-Net in fp32 (5 MB). Run metadata travels inside the safetensors header.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import tempfile
from pathlib import Path

import torch
import yaml

from femurrisk import registry
from femurrisk.registry import read_metadata

CARD_TEMPLATE = Path(__file__).resolve().parent / "model_card_template.md"


def _metrics_table(path: Path) -> str:
    with open(path) as handle:
        rows = list(csv.reader(handle))
    header, body = rows[0], rows[1:]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in body]
    return "\n".join(lines)


DEFAULT_NOTES = """Commands (from the repository root):

```
python -m training.prepare --seed 0 --single-anatomy 600 --landmark-studies 200 --out data/minimal
python -m training.train_landmark --config landmark_minimal --run runs/landmark
python -m training.train_classifier --config densenet121_minimal --run runs/densenet121
python -m training.export --classifier-run runs/densenet121 --landmark-run runs/landmark
```
"""

ROOT = Path(__file__).resolve().parents[1]


def _relative_config(meta: dict[str, str]) -> dict[str, str]:
    """Config paths in the metadata relative to the repository, not this machine."""
    path = meta.get("config")
    if path and Path(path).is_absolute() and Path(path).is_relative_to(ROOT):
        meta["config"] = str(Path(path).relative_to(ROOT))
    return meta


def describe_training_data(classifier_run: Path) -> str:
    """What the classifier was trained on, from its config and the data's prepare.json.

    Crops made by :mod:`training.prepare` are synthetic and say how they were made;
    anything else is named by its folder only (the card then says the data is the
    user's own).
    """
    try:
        data = Path(yaml.safe_load((classifier_run / "config.yaml").read_text())["data"])
    except (OSError, KeyError, TypeError, yaml.YAMLError):
        return "unknown (the run has no readable config.yaml)"
    try:
        record = json.loads((data / "prepare.json").read_text())
        return (f"femurrisk synthetic cohort ({record['generator']}, seed {record['seed']}): "
                f"`{record['command']}`")
    except (OSError, KeyError, TypeError, ValueError):
        return f"crops in {data} (not made by training.prepare, or made before prepare.json)"


def check_runs(classifier_run: Path, landmark_run: Path) -> None:
    """Both runs finished, with finite calibration (a NaN threshold or offset would
    make every probability the app shows NaN).

    Raises:
        ValueError: Naming the missing file or the non-finite value.
    """
    found = sorted(classifier_run.glob("classifier_*.safetensors"))
    if len(found) != 1:
        raise ValueError(f"{classifier_run} must hold one finished classifier run "
                         f"(classifier_<architecture>.safetensors), found {len(found)}")
    if not (landmark_run / "landmark_unet.safetensors").is_file():
        raise ValueError(f"{landmark_run} holds no finished landmark run "
                         "(landmark_unet.safetensors)")
    meta = read_metadata(found[0])
    for key in ("threshold", "logit_offset", "val_auroc"):
        try:
            value = float(meta.get(key, "nan"))
        except ValueError:
            value = float("nan")
        if not math.isfinite(value):
            raise ValueError(f"the classifier run's {key} is {meta.get(key)!r}, not a "
                             "finite number; it cannot be exported")


def export(classifier_run: Path, landmark_run: Path, assets: Path, extra: dict,
           notes: str = DEFAULT_NOTES) -> None:
    """Write both models and the model card into ``assets``: all three are written
    to a staging folder first and moved in only when all succeeded."""
    check_runs(classifier_run, landmark_run)
    assets.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=assets, prefix=".export-") as staging:
        written = _export(classifier_run, landmark_run, Path(staging), extra, notes)
        for name in written:
            (Path(staging) / name).replace(assets / name)


def _export(classifier_run: Path, landmark_run: Path, assets: Path, extra: dict,
            notes: str) -> list[str]:
    name = read_metadata(next(classifier_run.glob("classifier_*.safetensors")))["architecture"]
    classifier_meta = read_metadata(classifier_run / f"classifier_{name}.safetensors")
    model = registry.build_classifier(name)
    registry.load_weights(model, classifier_run / f"classifier_{name}.safetensors")
    classifier_meta = _relative_config({**classifier_meta, **extra})
    registry.save_weights(model, assets / f"classifier_{name}.safetensors", classifier_meta, fp16=True)

    landmark_meta = read_metadata(landmark_run / "landmark_unet.safetensors")
    unet = registry.build_landmark_unet()
    registry.load_weights(unet, landmark_run / "landmark_unet.safetensors")
    landmark_meta = _relative_config({**landmark_meta, **extra})
    registry.save_weights(unet, assets / "landmark_unet.safetensors", landmark_meta, fp16=False)

    card = CARD_TEMPLATE.read_text().format(
        classifier=name,
        classifier_meta="\n".join(f"| {k} | {v} |" for k, v in sorted(classifier_meta.items())),
        landmark_meta="\n".join(f"| {k} | {v} |" for k, v in sorted(landmark_meta.items())),
        classifier_metrics=_metrics_table(classifier_run / "metrics.csv"),
        landmark_metrics=_metrics_table(landmark_run / "metrics.csv"),
        classifier_sha=registry.sha256(assets / f"classifier_{name}.safetensors"),
        landmark_sha=registry.sha256(assets / "landmark_unet.safetensors"),
        torch_version=torch.__version__,
        training_notes=notes.strip(),
    )
    (assets / "MODEL_CARD.md").write_text(card)
    return [f"classifier_{name}.safetensors", "landmark_unet.safetensors", "MODEL_CARD.md"]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--classifier-run", type=Path, required=True)
    parser.add_argument("--landmark-run", type=Path, required=True)
    parser.add_argument("--assets", type=Path, default=registry.ASSETS_DIR)
    parser.add_argument("--trained-on", default=None,
                        help="training data for the model card (default: read from the "
                        "classifier run's config and the data's prepare.json)")
    parser.add_argument("--notes", type=Path,
                        help="Markdown with the exact commands and data of these runs, "
                        "placed in the model card (default: the standard commands)")
    args = parser.parse_args(argv)
    try:
        notes = args.notes.read_text() if args.notes else DEFAULT_NOTES
        check_runs(args.classifier_run, args.landmark_run)
    except (ValueError, OSError) as error:
        parser.error(str(error))
    trained_on = args.trained_on or describe_training_data(args.classifier_run)
    export(args.classifier_run, args.landmark_run, args.assets,
           {"trained_on": trained_on, "research_demo": "true"}, notes)


if __name__ == "__main__":
    main()
