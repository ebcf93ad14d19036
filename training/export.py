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


def export(classifier_run: Path, landmark_run: Path, assets: Path, extra: dict) -> None:
    name = read_metadata(next(classifier_run.glob("classifier_*.safetensors")))["architecture"]
    classifier_meta = read_metadata(classifier_run / f"classifier_{name}.safetensors")
    model = registry.build_classifier(name)
    registry.load_weights(model, classifier_run / f"classifier_{name}.safetensors")
    classifier_meta.update(extra)
    registry.save_weights(model, assets / f"classifier_{name}.safetensors", classifier_meta, fp16=True)

    landmark_meta = read_metadata(landmark_run / "landmark_unet.safetensors")
    unet = registry.build_landmark_unet()
    registry.load_weights(unet, landmark_run / "landmark_unet.safetensors")
    landmark_meta.update(extra)
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
    )
    (assets / "MODEL_CARD.md").write_text(card)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--classifier-run", type=Path, required=True)
    parser.add_argument("--landmark-run", type=Path, required=True)
    parser.add_argument("--assets", type=Path, default=registry.ASSETS_DIR)
    parser.add_argument("--trained-on", default="femurrisk minimal synthetic cohort")
    args = parser.parse_args(argv)
    export(args.classifier_run, args.landmark_run, args.assets,
           {"trained_on": args.trained_on, "research_demo": "true"})


if __name__ == "__main__":
    main()
