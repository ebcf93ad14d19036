"""Wall time of each pipeline step on this machine, median over repeated runs.

    python -m benchmarks.pipeline_steps [SCAN] [--repeats 3] [--device cpu]

Models are loaded once (as in the app); the first prediction is a warm-up and not
counted. Prints one line per step and the total.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

from femurrisk.pipeline import Predictor

DEFAULT_SCAN = Path(__file__).resolve().parents[1] / "assets" / "examples" / "pelvis_ct_3mm.nii.gz"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("scan", nargs="?", type=Path, default=DEFAULT_SCAN)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default=None)
    args = parser.parse_args()

    start = time.perf_counter()
    predictor = Predictor(device=args.device)
    print(f"model loading: {time.perf_counter() - start:.2f} s on {predictor.device}")
    predictor.predict(args.scan)  # warm-up
    runs = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        prediction = predictor.predict(args.scan)
        runs.append((prediction.timings_s, time.perf_counter() - start))
    for step in runs[0][0]:
        values = [timings[step] for timings, _ in runs]
        print(f"{step:10s} median {statistics.median(values):6.2f} s "
              f"(min {min(values):.2f}, max {max(values):.2f})")
    totals = [total for _, total in runs]
    print(f"{'total':10s} median {statistics.median(totals):6.2f} s over {args.repeats} runs")


if __name__ == "__main__":
    main()
