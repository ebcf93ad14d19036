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
import shlex
import tempfile
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file

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



ROOT = Path(__file__).resolve().parents[1]


def _relative_config(meta: dict[str, str]) -> dict[str, str]:
    """Config paths in the metadata relative to the repository, not this machine."""
    path = meta.get("config")
    if path and Path(path).is_absolute() and Path(path).is_relative_to(ROOT):
        meta["config"] = str(Path(path).relative_to(ROOT))
    return meta


def _run_data(run: Path) -> tuple[Path | None, dict | None, dict]:
    """A run's data folder, that folder's prepare.json (None when absent) and the
    run's resolved config ({} when unreadable)."""
    try:
        config = yaml.safe_load((run / "config.yaml").read_text())
        data = Path(config["data"])
    except (OSError, KeyError, TypeError, yaml.YAMLError):
        return None, None, {}
    try:
        record = json.loads((data / "prepare.json").read_text())
        record = record if {"command", "generator", "seed"} <= set(record) else None
    except (OSError, TypeError, ValueError):
        record = None
    return data, record, config


def describe_training_data(run: Path, what: str = "crops") -> str:
    """What a run was trained on, from its config and the data's prepare.json.

    Data made by :mod:`training.prepare` is synthetic and says how it was made;
    anything else is named by its folder only.
    """
    data, record, _ = _run_data(run)
    if data is None:
        return "unknown (the run has no readable config.yaml)"
    if record is None:
        return f"{what} in {data} (not made by training.prepare, or made before prepare.json)"
    return (f"femurrisk synthetic cohort ({record['generator']}, seed {record['seed']}): "
            f"`{record['command']}`")


#: What each generator of training.prepare makes, for the card.
GENERATORS = {
    "single-anatomy generator": (
        "the project's first synthetic generator (`training/cohort.py`, "
        "`generate_case`): the one public pelvis CT available here "
        "(`pelvis_ct_3mm.nii.gz`, TotalSegmentator example) deformed (affine and elastic), "
        "mirrored and re-acquired with per-site spacing, noise and calibration, with "
        "synthetic lytic, blastic and mixed metastases whose fracture label is drawn from "
        "a stated biomechanical risk. **The real scan itself is the base anatomy of this "
        "data**: a test on it is not an independent test."),
    "multi-site design": (
        "the synthetic multi-site cohort (`training/cohort_design.py`, "
        "`training/cohort.py` `generate_study`, docs/cohort.md): the study's design of "
        "patients, CTs and hospitals with synthetic metastases whose fracture label is "
        "drawn from a stated biomechanical risk; hospital A's CTs are built on the one "
        "public pelvis CT available here (`pelvis_ct_3mm.nii.gz`), the other hospitals' "
        "on phantom anatomy. A test on that real scan is not an independent test."),
}


def _data_paragraph(role: str, run: Path) -> tuple[str, bool]:
    """One sentence on a model's training data, and whether it is synthetic."""
    data, record, _ = _run_data(run)
    if record is not None and record["generator"] in GENERATORS:
        return (f"- {role}: {GENERATORS[record['generator']]} Made with "
                f"`{record['command']}`."), True
    where = f"`{data}`" if data is not None else "a folder the run does not record"
    return (f"- {role}: data in {where}, not made by `training.prepare` (the trainer's "
            "own cohort, or data prepared before `prepare.json` was written); ask them "
            "what it holds."), False


def _prevalence_text(target: str | None) -> str:
    try:
        return f"{100 * float(target):.3g} %"
    except (TypeError, ValueError):
        return "the training cohort's own" if target == "cohort" else "not recorded"


def training_commands(classifier_run: Path, landmark_run: Path) -> str:
    """The commands that made these runs, as far as the runs record them."""
    lines = []
    for run in (landmark_run, classifier_run):
        _, record, _ = _run_data(run)
        if record is not None and record["command"] not in lines:
            lines.append(record["command"])
    for module, run in (("train_landmark", landmark_run), ("train_classifier", classifier_run)):
        _, _, config = _run_data(run)
        command = ["python", "-m", f"training.{module}", "--config",
                   str(_relative_config({"config": config.get("config_file", "?")})["config"]),
                   "--run", str(run)]
        overrides = config.get("config_overrides") or []  # the --set values, as given
        lines.append(shlex.join([*command, *(["--set", *overrides] if overrides else [])]))
    lines.append(shlex.join(["python", "-m", "training.export", "--classifier-run",
                             str(classifier_run), "--landmark-run", str(landmark_run)]))
    return ("Commands (from the repository root; each run folder also holds its resolved "
            "`config.yaml`):\n\n```\n" + "\n".join(lines) + "\n```\n")


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
    for path in (found[0], landmark_run / "landmark_unet.safetensors"):
        try:
            load_file(path)
            read_metadata(path)
        except Exception as error:  # noqa: BLE001 - safetensors raises its own types
            raise ValueError(f"{path} is not a readable safetensors file "
                             f"({type(error).__name__})") from None
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
           notes: str | None = None) -> None:
    """Write both models and the model card into ``assets``: all three are written
    to a staging folder first and moved in only when all succeeded."""
    check_runs(classifier_run, landmark_run)
    if assets.exists() and not assets.is_dir():
        raise ValueError(f"--assets must be a folder, but {assets} is a file")
    created = not assets.exists()
    assets.mkdir(parents=True, exist_ok=True)
    try:
        with tempfile.TemporaryDirectory(dir=assets, prefix=".export-") as staging:
            written = _export(classifier_run, landmark_run, Path(staging), extra, notes)
            for name in written:
                (Path(staging) / name).replace(assets / name)
    except BaseException:
        if created and not any(assets.iterdir()):
            assets.rmdir()  # leave no empty folder behind a failed export
        raise


def _export(classifier_run: Path, landmark_run: Path, assets: Path, extra: dict,
            notes: str | None) -> list[str]:
    name = read_metadata(next(classifier_run.glob("classifier_*.safetensors")))["architecture"]
    classifier_meta = read_metadata(classifier_run / f"classifier_{name}.safetensors")
    model = registry.build_classifier(name)
    registry.load_weights(model, classifier_run / f"classifier_{name}.safetensors")
    classifier_meta = _relative_config({**classifier_meta, **extra})
    registry.save_weights(model, assets / f"classifier_{name}.safetensors", classifier_meta, fp16=True)

    landmark_meta = read_metadata(landmark_run / "landmark_unet.safetensors")
    unet = registry.build_landmark_unet()
    registry.load_weights(unet, landmark_run / "landmark_unet.safetensors")
    # --trained-on describes the classifier's data; the U-Net's comes from its own run.
    landmark_extra = {**extra, "trained_on": describe_training_data(landmark_run,
                                                                    "landmark samples")}
    landmark_meta = _relative_config({**landmark_meta, **landmark_extra})
    registry.save_weights(unet, assets / "landmark_unet.safetensors", landmark_meta, fp16=False)

    classifier_data, synthetic_c = _data_paragraph("Classifier", classifier_run)
    landmark_data, synthetic_l = _data_paragraph("Landmark U-Net", landmark_run)
    if synthetic_c and synthetic_l:
        banner = ("**Research demo. Trained on synthetic data only. Not for clinical "
                  "use.** These weights have never seen a patient with a known fracture "
                  "outcome. Their probabilities say how the model scores a CT; they are not "
                  "a validated risk for any patient.")
        data_limit = ("- Synthetic training data: anatomy, scanners and lesions are far "
                      "less varied than in practice. Expect failures on real patients.")
    else:
        banner = ("**Research model. Not validated for clinical use.** Trained on the data "
                  "named below, which this card cannot vouch for; its probabilities are "
                  "not a validated risk for any patient until tested on an independent "
                  "cohort.")
        data_limit = ("- Training data not made by this project: its size, labels and "
                      "make-up are as the trainer describes them, not as this card can "
                      "check.")
    card = CARD_TEMPLATE.read_text().format(
        banner=banner, data=f"{classifier_data}\n{landmark_data}", data_limit=data_limit,
        device=classifier_meta.get("device", "not recorded"),
        threshold_rule=classifier_meta.get("threshold_rule", "not recorded"),
        prevalence=_prevalence_text(classifier_meta.get("target_prevalence")),
        classifier=name,
        classifier_meta="\n".join(f"| {k} | {v} |" for k, v in sorted(classifier_meta.items())),
        landmark_meta="\n".join(f"| {k} | {v} |" for k, v in sorted(landmark_meta.items())),
        classifier_metrics=_metrics_table(classifier_run / "metrics.csv"),
        landmark_metrics=_metrics_table(landmark_run / "metrics.csv"),
        classifier_sha=registry.sha256(assets / f"classifier_{name}.safetensors"),
        landmark_sha=registry.sha256(assets / "landmark_unet.safetensors"),
        torch_version=torch.__version__,
        training_notes=(notes or training_commands(classifier_run, landmark_run)).strip(),
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
        notes = args.notes.read_text() if args.notes else None
        check_runs(args.classifier_run, args.landmark_run)
        if args.assets.exists() and not args.assets.is_dir():
            raise ValueError(f"--assets must be a folder, but {args.assets} is a file")
    except (ValueError, OSError) as error:
        parser.error(str(error))
    trained_on = args.trained_on or describe_training_data(args.classifier_run)
    export(args.classifier_run, args.landmark_run, args.assets,
           {"trained_on": trained_on, "research_demo": "true"}, notes)


if __name__ == "__main__":
    main()
