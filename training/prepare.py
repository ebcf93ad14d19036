"""Generate a synthetic cohort and cache the training samples of both networks.

    python -m training.prepare --seed 0 --cases 600 --out data/minimal

Writes ``landmark/<case>.npz`` (landmark-grid input and labels), ``crops.npz`` (all
per-side network inputs as uint8 with labels) and ``manifest.csv`` (one row per side).
Every case is regenerated exactly from (seed, case id), so the cache can be deleted.
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


def _one(job: tuple[int, int, str, bool]) -> list[dict]:
    seed, case_id, out, with_landmark, landmark_only = job
    case = generate_case(seed, case_id)
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
            "case_id": case_id, "site": getattr(case, "site", ""), "side": sample.side,
            "label": sample.label, "true_risk": sample.true_risk, "implant": sample.implant,
            "landmark_z_mm": landmark_level_mm(case), "input": sample.input_u8,
        })
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cases", type=int, default=600)
    parser.add_argument("--first-case", type=int, default=0)
    parser.add_argument("--landmark-cases", type=int, default=200,
                        help="how many of the cases also give a landmark sample")
    parser.add_argument("--landmark-only", action="store_true",
                        help="write only landmark samples (no crops.npz)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO)

    (args.out / "landmark").mkdir(parents=True, exist_ok=True)
    ids = range(args.first_case, args.first_case + args.cases)
    jobs = [(args.seed, i, str(args.out), n < args.landmark_cases, args.landmark_only)
            for n, i in enumerate(ids)]
    rows: list[dict] = []
    with get_context("spawn").Pool(args.workers) as pool:
        for result in tqdm(pool.imap(_one, jobs), total=len(jobs), desc="cases"):
            rows.extend(result)
    if args.landmark_only:
        return

    np.savez_compressed(
        args.out / "crops.npz",
        inputs=np.stack([r["input"] for r in rows]),
        labels=np.array([r["label"] for r in rows], dtype=np.int64),
        true_risk=np.array([r["true_risk"] for r in rows], dtype=np.float32),
        case_id=np.array([r["case_id"] for r in rows], dtype=np.int64),
        implant=np.array([r["implant"] for r in rows], dtype=bool),
        side=np.array([r["side"] for r in rows]),
    )
    with open(args.out / "manifest.csv", "w", newline="") as handle:
        fields = [k for k in rows[0] if k != "input"]
        writer = csv.DictWriter(handle, fieldnames=fields)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: row[k] for k in fields})
    positives = sum(r["label"] for r in rows)
    logger.info("%d sides from %d cases, %d positive", len(rows), len(jobs), positives)


if __name__ == "__main__":
    main()
