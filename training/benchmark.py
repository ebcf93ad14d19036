"""The benchmark table: four classifiers on the external test, beside the study,
the ceiling of the cohort's true risks and simple rules computed from its truth.

    python -m training.benchmark run --preset quick --runs runs/bench_quick --out docs/benchmark_quick
    python -m training.benchmark table --runs runs/bench_quick --out docs/benchmark_quick

``run`` trains every classifier of the preset (``<arch>_<preset>`` configs), one
process each, then writes the table; ``table`` only reads finished runs. Outputs:
``OUT.md`` (table), ``OUT.json`` (every number, confusion matrices, intervals,
reliability curves) and ``OUT.png`` (ROC, precision-recall and reliability curves).

Rows per model: the external test as it is (one row per side), and the "augmented
test" the study reported, in which every test positive also counts with its affine
copies (the study: 27 positives x 21 = 567). Baselines are scored on the test as it
is; their threshold, like the models', comes from validation.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import os
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import yaml

from femurrisk.registry import CLASSIFIERS, read_metadata
from training import prepare
from training.config import CONFIG_DIR, load_config
from training.metrics import (
    POINT_METRICS, choose_threshold, evaluate, logit, pr_curve, roc_curve, sigmoid,
)

logger = logging.getLogger(__name__)

#: The source study's external results (Joo et al.); precision and F1 were micro
#: averages, equal to the accuracy. Its test positives were augmented (27 x 21).
STUDY_ROWS = {
    "densenet121": (0.9315, 0.8483, 0.9703),
    "resnet34": (0.9242, 0.7743, 0.9942),
    "resnet18": (0.8782, 0.8201, 0.9053),
    "swin": (0.5244, 0.3686, 0.5972),
}

#: Mirels-like score from the cohort's truth (Mirels 1989 without pain, which the
#: cohort does not record; pain is set to "moderate", 2 points). A score of 9 or more
#: calls a fracture, Mirels's threshold for prophylactic fixation.
MIRELS_PAIN = 2
MIRELS_SITE = {"head": 2, "neck": 3, "intertrochanteric": 3}  # peritrochanteric = 3
MIRELS_KIND = {"blastic": 1, "mixed": 2, "lytic": 3}
MIRELS_THRESHOLD = 9


def prepare_data(config: dict, workers: int = 2) -> Path:
    """The config's data folder, made by ``training.prepare`` with the config's
    ``prepare`` arguments when it holds no ``crops.npz`` yet."""
    data = Path(config["data"])
    if not (data / "crops.npz").is_file():
        if not config.get("prepare"):
            raise SystemExit(f"{data}/crops.npz is missing and the config has no "
                             "'prepare' arguments to make it")
        logger.info("preparing %s: %s", data, config["prepare"])
        prepare.main([*shlex.split(config["prepare"]), "--workers", str(workers),
                      "--out", str(data)])
    return data


def read_predictions(run: Path) -> list[dict]:
    with open(run / "predictions.csv") as handle:
        return list(csv.DictReader(handle))


def _column(rows: list[dict], key: str, kind=float) -> np.ndarray:
    return np.array([kind(r[key]) for r in rows])


def mirels_score(row: dict) -> int:
    """Mirels-like points of one side; 0 without a lesion."""
    if not row.get("lesion_kind"):
        return 0
    ratio = float(row["size_ratio"])
    size = 1 if ratio < 1 / 3 else 2 if ratio <= 2 / 3 else 3
    return (MIRELS_PAIN + MIRELS_SITE[row["lesion_place"]] + MIRELS_KIND[row["lesion_kind"]]
            + size)


def _entry(name: str, kind: str, rows: list[dict], scores: np.ndarray, threshold: float,
           n_boot: int, seed: int, probabilistic: bool = True) -> dict:
    result = evaluate(_column(rows, "label", int), scores, threshold,
                      np.array([r["patient_id"] for r in rows]), n_boot, seed)
    if not probabilistic:  # a rule's score is no probability
        result["metrics"]["brier"] = float("nan")
        result["ci95"]["brier"] = [float("nan")] * 2
        result["reliability"] = None
    result.update(name=name, kind=kind)
    return result


def model_entries(run: Path, n_boot: int, seed: int) -> list[dict]:
    """The model's test row and its augmented-test row."""
    summary = json.loads((run / "summary.json").read_text())
    rows = [r for r in read_predictions(run) if r["set"] == "test"]
    if not rows:
        raise ValueError(f"{run} has no test predictions (its data had no test split); "
                         "the table compares models on the external test")
    plain = [r for r in rows if r["copy"] == "0"]
    copies = max(int(r["copy"]) for r in rows)
    name, t = summary["architecture"], summary["threshold"]
    out = [_entry(name, "test", plain, _column(plain, "probability"), t, n_boot, seed)]
    if copies:
        out.append(_entry(name, f"augmented test (positives x{copies + 1})", rows,
                          _column(rows, "probability"), t, n_boot, seed))
    for entry in out:
        entry["run"] = str(run)
        entry["summary"] = {k: summary[k] for k in (
            "best_epoch", "val_auroc", "split", "threshold", "threshold_rule",
            "threshold_set", "train_cases_per_s", "pipeline_cases_per_s",
            "augmentation_shift", "presented_prevalence", "cohort_prevalence")}
    return out


def baseline_entries(run: Path, rule: str, n_boot: int, seed: int) -> list[dict]:
    """Ceiling of the true risks and the two rules, on the test as it is."""
    rows = read_predictions(run)
    val = [r for r in rows if r["set"] == "validation" and r["copy"] == "0"]
    test = [r for r in rows if r["set"] == "test" and r["copy"] == "0"]
    if not test or "true_risk" not in test[0]:
        return []
    # True risks are population probabilities; one logit shift, fitted so that the
    # validation mean matches its prevalence, moves them to the cohort's enrichment.
    y_val, risk_val = _column(val, "label"), logit(_column(val, "true_risk"))
    lo, hi = -20.0, 20.0
    for _ in range(100):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if sigmoid(risk_val + mid).mean() < y_val.mean() else (lo, mid)
    ceiling_val = sigmoid(risk_val + lo)
    ceiling = sigmoid(logit(_column(test, "true_risk")) + lo)
    out = [_entry("ceiling (true risk)", "test", test, ceiling,
                  choose_threshold(y_val, ceiling_val, rule), n_boot, seed)]
    involvement = _column(test, "axial_cortical_involvement_mm")
    out.append(_entry("rule: axial cortical involvement > 30 mm", "test", test,
                      involvement, np.nextafter(30.0, 31.0), n_boot, seed, False))
    mirels = np.array([mirels_score(r) for r in test], dtype=float)
    out.append(_entry(f"rule: Mirels-like score >= {MIRELS_THRESHOLD}", "test", test,
                      mirels, float(MIRELS_THRESHOLD), n_boot, seed, False))
    return out


def study_entries() -> list[dict]:
    return [{"name": f"{name} (Joo et al., published)", "kind": "augmented test",
             "metrics": {"accuracy": acc, "sensitivity": sens, "specificity": spec,
                         "precision_micro": acc, "f1_micro": acc}}
            for name, (acc, sens, spec) in STUDY_ROWS.items()]


def _cell(entry: dict, key: str) -> str:
    value = entry["metrics"].get(key)
    if value is None or not np.isfinite(value):
        return "–"
    ci = entry.get("ci95", {}).get(key)
    if ci and np.isfinite(ci).all():
        return f"{value:.3f} ({ci[0]:.2f}–{ci[1]:.2f})"
    return f"{value:.3f}"


HEADERS = ("accuracy", "sensitivity", "specificity", "precision (micro, = accuracy)",
           "F1 (micro, = accuracy)", "precision (fracture)", "F1 (fracture)", "AUROC",
           "AUPRC", "Brier")


def markdown(entries: list[dict], title: str) -> str:
    lines = [f"# {title}", "",
             "External test: the hospitals not trained on. Cells: value (95 % bootstrap "
             "interval over patients). Micro-averaged precision and F1 are the study's "
             "way and equal the accuracy; the fracture-class columns are the informative "
             "ones. TP/FP/TN/FN: the confusion matrix at the threshold chosen on "
             "validation.", "",
             "| model | rows | n (positive) | " + " | ".join(HEADERS) + " | TP/FP/TN/FN |",
             "|" + "---|" * (len(HEADERS) + 4)]
    for e in entries:
        c = e.get("confusion")
        counts = f"{c['tp']}/{c['fp']}/{c['tn']}/{c['fn']}" if c else "–"
        size = f"{e['n']} ({e['positives']})" if "n" in e else "1,781 (567)"
        cells = " | ".join(_cell(e, k) for k in POINT_METRICS)
        lines.append(f"| {e['name']} | {e['kind']} | {size} | {cells} | {counts} |")
    runs = [e for e in entries if "summary" in e and e["kind"] == "test"]
    if runs:
        lines += ["", "## Runs", "",
                  "| model | best epoch | validation AUROC | threshold (rule, set) | "
                  "train cases/s | data pipeline cases/s | augmented vs original "
                  "negatives: AUROC, mean abs logit shift (logit SD) |", "|---|---|---|---|---|---|---|"]
        for e in runs:
            s, a = e["summary"], e["summary"]["augmentation_shift"]
            lines.append(
                f"| {e['name']} | {s['best_epoch']} | {s['val_auroc']:.3f} | "
                f"{s['threshold']:.3g} ({s['threshold_rule']}, {s['threshold_set']}) | "
                f"{s['train_cases_per_s']:.2f} | {s['pipeline_cases_per_s']:.1f} | "
                f"{a['auroc_augmented_vs_original']:.3f}, {a['mean_abs_logit_shift']:.3f} "
                f"({a['logit_sd']:.3f}) |")
        split = runs[0]["summary"]["split"]
        lines += ["", "Splits (sides, positives, patients, sites): " + "; ".join(
            f"{k} {v['sides']}, {v['positives']}, {v['patients']}, {'/'.join(v['sites'])}"
            for k, v in split.items())]
    return "\n".join(lines) + "\n"


def plot(entries: list[dict], runs: list[Path], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.6))
    for run in runs:
        rows = [r for r in read_predictions(run) if r["set"] == "test" and r["copy"] == "0"]
        y, p = _column(rows, "label"), _column(rows, "probability")
        name = json.loads((run / "summary.json").read_text())["architecture"]
        axes[0].plot(*roc_curve(y, p), label=name)
        axes[1].plot(*pr_curve(y, p), label=name)
    for e in entries:
        if e.get("reliability") and e["kind"] == "test":
            r = e["reliability"]
            axes[2].plot(r["mean_probability"], r["observed_rate"], "o-", label=e["name"])
    axes[0].plot([0, 1], [0, 1], "k:", lw=0.8)
    axes[2].plot([0, 1], [0, 1], "k:", lw=0.8)
    for ax, (xl, yl, title) in zip(axes, (
            ("1 - specificity", "sensitivity", "ROC, external test"),
            ("recall", "precision", "Precision-recall, external test"),
            ("mean predicted probability", "observed fracture rate", "Reliability"))):
        ax.set(xlabel=xl, ylabel=yl, title=title, xlim=(0, 1), ylim=(0, 1.02))
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_table(runs: list[Path], out: Path, title: str, n_boot: int, seed: int) -> dict:
    """Score finished runs and write OUT.md, OUT.json and OUT.png.

    Raises:
        ValueError: If the runs were not made on the same splits (rows of one table
            must compare models on the same sides).
    """
    splits = {run.name: json.loads((run / "summary.json").read_text())["split"]
              for run in runs}
    first = next(iter(splits.values()))
    differing = sorted(name for name, split in splits.items() if split != first)
    if differing:
        raise ValueError(f"runs {differing} were made on other splits than {runs[0].name}; "
                         "a table compares models on the same sides only")
    entries: list[dict] = []
    for run in runs:
        entries += model_entries(run, n_boot, seed)
    rule = json.loads((runs[0] / "summary.json").read_text())["threshold_rule"]
    entries += baseline_entries(runs[0], rule, n_boot, seed)
    entries += study_entries()
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".md").write_text(markdown(entries, title))
    table = {"title": title, "bootstrap_resamples": n_boot, "entries": entries}
    out.with_suffix(".json").write_text(json.dumps(table, indent=1, default=float))
    plot(entries, runs, out.with_suffix(".png"))
    return table


def preset_of(runs: list[Path]) -> str | None:
    """The preset every run was trained with unchanged (``<arch>_<preset>`` config and
    no ``--set``), or None."""
    presets = set()
    for run in runs:
        try:
            config = yaml.safe_load((run / "config.yaml").read_text())
            stem = Path(config["config_file"]).stem
            arch = config["architecture"]
            weights = next(run.glob("classifier_*.safetensors"))
            overrides = read_metadata(weights).get("config_overrides", "")
        except (OSError, KeyError, TypeError, StopIteration, yaml.YAMLError):
            return None
        if overrides or not stem.startswith(f"{arch}_"):
            return None
        presets.add(stem[len(arch) + 1:])
    return presets.pop() if len(presets) == 1 else None


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("command", choices=("run", "table"))
    parser.add_argument("--preset", default=None,
                        help="config suffix: quick (default), paper; run only: the table "
                        "names the preset from the runs")
    parser.add_argument("--runs", type=Path, required=True, help="folder of the runs")
    parser.add_argument("--out", type=Path, required=True, help="output path, no suffix")
    parser.add_argument("--models", nargs="*", default=list(CLASSIFIERS),
                        choices=list(CLASSIFIERS))
    parser.add_argument("--bootstrap", type=int, default=1000,
                        help="bootstrap resamples for the 95 %% intervals (>= 100)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if args.bootstrap < 100:
        parser.error(f"--bootstrap must be at least 100 resamples, got {args.bootstrap}")
    for path in (args.out.parent, args.runs):
        if path.exists() and not path.is_dir():
            parser.error(f"{path} must be a folder, but it is a file")
    if args.command == "table" and args.preset is not None:
        parser.error("--preset is for run; table reads how each run was made from its "
                     "folder")
    args.preset = args.preset or "quick"
    if args.command == "run":
        try:
            configs = [load_config(f"{n}_{args.preset}", base="classifier_base")
                       for n in args.models]
        except ValueError:
            suffixes = {p.stem.split("_", 1)[1] for p in CONFIG_DIR.glob("*_*.yaml")}
            known = sorted(x for x in suffixes
                           if all((CONFIG_DIR / f"{m}_{x}.yaml").is_file() for m in CLASSIFIERS))
            parser.error(f"--preset must be one with a config per model "
                         f"(<model>_<preset>.yaml), one of {known}; got {args.preset!r}")
        for config in configs:
            prepare_data(config)
        for name in args.models:
            run = args.runs / name
            if (run / "summary.json").is_file():
                logger.info("%s: finished run kept (delete the folder to retrain)", run)
                continue
            command = [sys.executable, "-m", "training.train_classifier", "--config",
                       f"{name}_{args.preset}", "--run", str(run)]
            if (run / "checkpoint_last.safetensors").is_file():
                command.append("--resume")  # an interrupted run continues
            logger.info("%s", " ".join(command))
            if subprocess.run(command, env=os.environ.copy()).returncode:
                raise SystemExit(f"training {name} stopped (see above); run the same "
                                 "command again to resume it")
    runs = [args.runs / n for n in args.models if (args.runs / n / "summary.json").is_file()]
    if not runs:
        parser.error(f"no finished runs (summary.json) under {args.runs} for "
                     f"{', '.join(args.models)}; an interrupted run is finished by "
                     "`benchmark run` or `train_classifier --run DIR --resume`")
    preset = preset_of(runs)
    title = (f"femurrisk benchmark, {preset} preset" if preset
             else f"femurrisk benchmark, runs under {args.runs}")
    try:
        table = write_table(runs, args.out, title, args.bootstrap, args.seed)
    except ValueError as error:
        parser.error(str(error))
    if preset:
        how = ("Reproduce (the data are made first from the preset's `prepare` key when "
               "missing; finished runs are kept, interrupted ones resumed):\n\n"
               f"    python -m training.benchmark run --preset {preset} --runs {args.runs}"
               + ("" if args.models == list(CLASSIFIERS) else f" --models {' '.join(args.models)}")
               + f" --out {args.out}\n")
    else:
        how = ("These runs were not all trained with one preset unchanged; each run "
               "folder's config.yaml says how it was. Table made with:\n\n"
               f"    python -m training.benchmark table --runs {args.runs} --out {args.out}\n")
    with open(args.out.with_suffix(".md"), "a") as handle:
        handle.write(f"\n{how}\nBootstrap resamples: {table['bootstrap_resamples']}.\n")


if __name__ == "__main__":
    main()
