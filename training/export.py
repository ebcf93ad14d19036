"""Export trained weights to assets/ and regenerate the model card from the runs.

    python -m training.export --classifier-run runs/densenet121 --landmark-run runs/landmark

The classifier is stored in fp16 (a 3D DenseNet-121 is 45 MB in fp32, 22 MB in fp16);
the U-Net in fp32 (5 MB). Run metadata travels inside the safetensors header.
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

import torch

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


def export(classifier_run: Path, landmark_run: Path, assets: Path, extra: dict,
           notes: str = DEFAULT_NOTES) -> None:
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


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--classifier-run", type=Path, required=True)
    parser.add_argument("--landmark-run", type=Path, required=True)
    parser.add_argument("--assets", type=Path, default=registry.ASSETS_DIR)
    parser.add_argument("--trained-on", default="femurrisk minimal synthetic cohort")
    parser.add_argument("--notes", type=Path,
                        help="Markdown with the exact commands and data of these runs, "
                        "placed in the model card (default: the standard commands)")
    args = parser.parse_args(argv)
    notes = args.notes.read_text() if args.notes else DEFAULT_NOTES
    export(args.classifier_run, args.landmark_run, args.assets,
           {"trained_on": args.trained_on, "research_demo": "true"}, notes)


if __name__ == "__main__":
    main()
