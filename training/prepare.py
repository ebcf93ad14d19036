"""Generate a synthetic cohort and cache the training samples of both networks.

    python -m training.prepare --seed 0 --cases 600 --out data/minimal

Writes ``landmark/<case>.npz`` (landmark-grid input and labels), ``crops.npz`` (all
per-side network inputs as uint8 with labels and truth) and ``manifest.csv`` (one row
per side: case, patient, hospital site, side, label, true risk, implant and the
lesion's truth used by the rule baselines). Every case is regenerated exactly from
(seed, case id), so the cache can be deleted.

Your own data: lay out ``crops.npz`` with the same arrays (see :data:`CROP_FIELDS`);
every later step reads only that file.
"""

from __future__ import annotations

import argparse
import csv
import logging
from multiprocessing import get_context
from pathlib import Path

import numpy as np
from tqdm import tqdm

from training.cohort import generate_case
from training.data import classifier_samples, landmark_level_mm, landmark_sample

logger = logging.getLogger(__name__)

#: Arrays of ``crops.npz`` besides ``inputs`` (N, 64, 64, 32) uint8, one entry per side.
CROP_FIELDS = (
    "case_id", "patient_id", "site", "side", "label", "true_risk", "implant",
    "lesion_kind", "lesion_place", "size_ratio", "axial_cortical_involvement_mm",
)


def _lesion_fields(lesion) -> dict:
    """The lesion truth the rule baselines read (empty kind when there is none)."""
    if lesion is None:
        return {"lesion_kind": "", "lesion_place": "", "size_ratio": 0.0,
                "axial_cortical_involvement_mm": 0.0}
    return {"lesion_kind": lesion.kind, "lesion_place": lesion.place,
            "size_ratio": float(lesion.size_ratio),
            "axial_cortical_involvement_mm": float(lesion.axial_cortical_involvement_mm)}


def _one(job: tuple) -> list[dict]:
    seed, case_id, out, with_landmark, landmark_only, site, positive_fraction = job
    case = generate_case(seed, case_id, site=site, positive_fraction=positive_fraction)
    if with_landmark:
        image, labels, affine = landmark_sample(case)
        np.savez_compressed(
            Path(out) / "landmark" / f"{case_id:06d}.npz", image=image, labels=labels,
            affine=affine, landmark_z_mm=landmark_level_mm(case),
        )
    if landmark_only:
        return []
    rng = np.random.default_rng([seed, case_id, 7])
    rows = []
    for sample in classifier_samples(case, rng):
        rows.append({
            # One case per patient in this cohort; a real cohort has several.
            "case_id": case_id, "patient_id": case_id, "site": case.site,
            "side": sample.side, "label": sample.label, "true_risk": sample.true_risk,
            "implant": sample.implant, "landmark_z_mm": landmark_level_mm(case),
            **_lesion_fields(case.lesion[sample.side]), "input": sample.input_u8,
        })
    return rows


def write_crops(rows: list[dict], out: Path) -> None:
    """``crops.npz`` and ``manifest.csv`` from per-side rows."""
    arrays = {"inputs": np.stack([r["input"] for r in rows])}
    for name in CROP_FIELDS:
        arrays[name] = np.array([r[name] for r in rows])
    arrays["labels"] = arrays["label"].astype(np.int64)  # the name older runs read
    np.savez_compressed(out / "crops.npz", **arrays)
    with open(out / "manifest.csv", "w", newline="") as handle:
        fields = [k for k in rows[0] if k != "input"]
        writer = csv.DictWriter(handle, fieldnames=fields)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: row[k] for k in fields})


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cases", type=int, default=600)
    parser.add_argument("--first-case", type=int, default=0)
    parser.add_argument("--landmark-cases", type=int, default=200,
                        help="how many of the cases also give a landmark sample")
    parser.add_argument("--landmark-only", action="store_true",
                        help="write only landmark samples (no crops.npz)")
    parser.add_argument("--sites", default="",
                        help="comma-separated hospital sites given to cases in turn "
                             "(e.g. A,A,B,C,D); default: drawn by the cohort")
    parser.add_argument("--positive-fraction", type=float, default=0.35,
                        help="case-control enrichment of positive sides (cohort.py)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO)

    (args.out / "landmark").mkdir(parents=True, exist_ok=True)
    sites = [s for s in args.sites.split(",") if s]
    ids = range(args.first_case, args.first_case + args.cases)
    jobs = [(args.seed, i, str(args.out), n < args.landmark_cases, args.landmark_only,
             sites[n % len(sites)] if sites else None, args.positive_fraction)
            for n, i in enumerate(ids)]
    rows: list[dict] = []
    with get_context("spawn").Pool(args.workers) as pool:
        for result in tqdm(pool.imap(_one, jobs), total=len(jobs), desc="cases"):
            rows.extend(result)
    if args.landmark_only:
        return
    write_crops(rows, args.out)
    positives = sum(r["label"] for r in rows)
    logger.info("%d sides from %d cases, %d positive", len(rows), len(jobs), positives)


if __name__ == "__main__":
    main()
