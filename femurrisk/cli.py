"""Command line: ``python -m femurrisk predict PATH --out DIR [--save-crops]``.

Exit status 0 on success, 2 for input the user can fix (one plain line on stderr),
1 for an internal error (one line on stderr; details only with ``--verbose``).
"""

from __future__ import annotations

import argparse
import logging
import sys
import warnings
from pathlib import Path

from femurrisk.errors import InputError

logger = logging.getLogger("femurrisk")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m femurrisk",
        description="Proximal femur pathologic fracture risk from abdominopelvic CT "
        "(research demo trained on synthetic data; not for clinical use).",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    predict = commands.add_parser("predict", help="score both femurs of one CT")
    predict.add_argument(
        "paths", nargs="+", type=Path, metavar="PATH",
        help="a NIfTI file, a DICOM folder or .zip, or several DICOM files of one series",
    )
    predict.add_argument("--out", type=Path, required=True, help="output folder")
    predict.add_argument(
        "--save-crops", action="store_true",
        help="also write each side's crop (HU and network input) as NIfTI",
    )
    predict.add_argument("--device", help="cpu, cuda or cuda:N (default: CUDA if present; "
                         "environment variable FEMURRISK_DEVICE)")
    predict.add_argument("--classifier", default="densenet121",
                         help="classifier architecture whose weights are in assets/")
    predict.add_argument("--landmark-z", type=float, metavar="MM",
                         help="set the AIIS level by hand, world z in RAS+ mm")
    predict.add_argument("--series-uid", help="DICOM SeriesInstanceUID to use")
    predict.add_argument(
        "--explain", choices=("gradcam", "guided_gradcam"), default="gradcam",
        help="explanation written as gradcam_<side>.nii.gz: Grad-CAM (coarse, "
        "default) or guided Grad-CAM (voxel-sharp)",
    )
    predict.add_argument("-v", "--verbose", action="store_true", help="log progress")
    return parser


def run_predict(args: argparse.Namespace) -> int:
    from femurrisk.loading import load_ct
    from femurrisk.pipeline import Predictor
    from femurrisk.report import to_json_dict, write_outputs

    # The input is read first, so that bad input is reported as such (exit 2) even
    # when the models cannot be loaded.
    source = args.paths[0] if len(args.paths) == 1 else list(args.paths)
    loaded = load_ct(source, series_uid=args.series_uid)
    predictor = Predictor(device=args.device, classifier=args.classifier)
    prediction = predictor.predict(
        loaded, landmark_z_mm=args.landmark_z, method=args.explain,
        progress=lambda fraction, message: logger.info("%3.0f%% %s", 100 * fraction, message),
    )
    write_outputs(prediction, args.out, save_crops=args.save_crops)
    summary = to_json_dict(prediction)["sides"]
    for side in ("left", "right"):
        probability = summary[side]["probability"]
        shown = "p=  -  " if probability is None else f"p={probability:.3f}"
        print(f"{side:5s}  {shown}  {summary[side]['decision']}")
    print(f"written to {args.out / 'result.json'}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # Warnings about the input go into result.json; stderr carries only the one error
    # line unless --verbose asks for progress and library warnings.
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.ERROR,
        format="%(levelname)s %(name)s: %(message)s",
    )
    if not args.verbose:
        warnings.filterwarnings("ignore")
    try:
        return run_predict(args)
    except InputError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except ValueError as error:
        # An unusable option, such as --device cuda on a machine without CUDA.
        print(f"error: {error}", file=sys.stderr)
        return 2
    except FileNotFoundError as error:
        # Missing weights: an installation problem, not bad input.
        print(f"error: {error}", file=sys.stderr)
        return 1
    except Exception:  # noqa: BLE001 - never show a traceback to the user
        if args.verbose:
            logger.exception("internal error")
        print("error: internal error while processing the CT; rerun with --verbose "
              "for details", file=sys.stderr)
        return 1
