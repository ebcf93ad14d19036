"""Do the explanations explain? Three checks against synthetic truth, per architecture.

On synthetic cases whose metastases are known voxel by voxel
(:class:`training.cohort.SyntheticCase` ``lesion_mask``), never seen in training
(seed 0, case ids from :data:`FIRST_CASE`; training used 0-499 and 1000-1239):

* **Pointing game**: does the map's peak fall in the lesion? Counted strictly (peak
  voxel inside the lesion mask) and within :data:`POINTING_TOLERANCE_MM` of it, a
  fair allowance for Grad-CAM's 16 x 16 x 24 mm cells.
* **Deletion**: the voxels with most attribution are replaced by a blurred copy of the
  crop (their information removed, no new edge added) in steps of
  :data:`DELETION_FRACTIONS`; the fracture probability should fall faster than when
  the same number of random voxels is removed. The figure is the mean probability
  over the steps (area under the deletion curve; lower is better).
* **Model randomization** (Adebayo et al. 2018): Spearman rank correlation between
  the signed Grad-CAM of the trained model and of the same network with every layer
  re-initialised; a map that survives the randomization does not explain the model.

Crops are cut at the true landmark level and head centres, so the checks measure the
classifier and its explanation, not the landmark network. Sides with an implant are
left out (the product does not score them), and so are sides whose lesion lies
outside the crop.

Usage::

    OMP_NUM_THREADS=1 .venv/bin/python -m benchmarks.gradcam_checks --cases 30 \\
        --weights densenet121=assets/classifier_densenet121.safetensors \\
        resnet18=runs/gradcam_resnet18/classifier_resnet18.safetensors \\
        --out runs/gradcam_checks

    .venv/bin/python -m benchmarks.gradcam_checks --payload-scan \\
        assets/examples/pelvis_ct_3mm.nii.gz     # figure sizes the app sends
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from scipy import ndimage, stats

from femurrisk import registry
from femurrisk.classification import network_input
from femurrisk.cropping import side_crop, to_network_orientation
from femurrisk.explanation import explain, gradcam, randomized_copy
from femurrisk.geometry import (
    CROP_PIXEL_MM, CROP_SHAPE, CROP_SLICE_SPACING_MM, METAL_MIN_VOLUME_MM3,
)
from femurrisk.preprocessing import resample_to_grid

logger = logging.getLogger(__name__)

SEED = 0
FIRST_CASE = 5000
SIDES = ("left", "right")
POINTING_TOLERANCE_MM = 10.0
DELETION_FRACTIONS = (0.0, 0.01, 0.02, 0.05, 0.1, 0.2)
RANDOM_REPEATS = 2
#: Blur of the deletion baseline, voxels (x, y, z): about 8 x 8 x 6 mm.
BLUR_SIGMA_VOXELS = (4.0, 4.0, 2.0)
_SPACING_MM = (CROP_PIXEL_MM, CROP_PIXEL_MM, CROP_SLICE_SPACING_MM)


@dataclass
class LesionSide:
    """One side of a synthetic case whose lesion lies in the crop."""

    case_id: int
    side: str
    label: int
    site: str
    network_input: np.ndarray  # (x, y, z) 0-255, the right side mirrored
    lesion_mask: np.ndarray  # (x, y, z) bool, crop (unmirrored) orientation


def lesion_sides(case_ids, seed: int = SEED) -> list[LesionSide]:
    """The sides of the given synthetic cases that carry a lesion inside the crop."""
    from training.cohort import generate_case

    found = []
    for case_id in case_ids:
        case = generate_case(seed, int(case_id))
        level = float(np.mean([p[2] for p in case.aiis_world_mm.values()]))
        for code, side in enumerate(SIDES, start=1):
            if case.lesion[side] is None or case.implant[side]:
                continue
            crop = side_crop(case.image, side,
                             np.asarray(case.femoral_head_world_mm[side]), level)
            voxel_mm3 = float(np.prod(_SPACING_MM))
            if (crop.volume_hu > 2500).sum() * voxel_mm3 >= METAL_MIN_VOLUME_MM3:
                continue
            mask_image = nib.Nifti1Image((case.lesion_mask == code).astype(np.float32),
                                         case.image.affine)
            mask = resample_to_grid(mask_image, CROP_SHAPE, crop.affine, order=0,
                                    cval=0.0) > 0.5
            if not mask.any():
                continue
            found.append(LesionSide(case_id=int(case_id), side=side,
                                    label=int(case.label[side]), site=case.site,
                                    network_input=network_input(crop.volume_hu, side),
                                    lesion_mask=mask))
    return found


def _batch(inputs: list[np.ndarray]) -> torch.Tensor:
    return torch.from_numpy(np.stack(inputs)[:, None] / 255.0).float()  # (N, 1, x, y, z)


@torch.no_grad()
def _probabilities(model, inputs: list[np.ndarray], chunk: int = 8) -> np.ndarray:
    out = []
    for start in range(0, len(inputs), chunk):
        logits = model(_batch(inputs[start:start + chunk]))[:, 0].float()
        out.append(torch.sigmoid(logits).numpy())
    return np.concatenate(out)


def pointing(heatmap: np.ndarray, mask: np.ndarray) -> tuple[bool, float]:
    """Whether the peak lies in the lesion, and its distance to the lesion, mm.

    An empty map (no positive evidence anywhere) peaks at voxel (0, 0, 0): a miss.
    """
    peak = np.unravel_index(int(np.argmax(heatmap)), heatmap.shape)
    distance = ndimage.distance_transform_edt(~mask, sampling=_SPACING_MM)
    return bool(mask[peak]), float(distance[peak])


def deletion_curves(model, image: np.ndarray, attribution: np.ndarray,
                    rng: np.random.Generator, start_probability: float,
                    random_repeats: int = RANDOM_REPEATS) -> tuple[np.ndarray, np.ndarray]:
    """Probability after deleting the top voxels, and after deleting random ones.

    Both in network orientation. Returns two arrays over :data:`DELETION_FRACTIONS`,
    the random one averaged over ``random_repeats`` orders.
    """
    baseline = ndimage.gaussian_filter(image.astype(np.float32), BLUR_SIGMA_VOXELS)
    jitter = rng.random(attribution.size) * 1e-9  # ties broken at random
    ranked = np.argsort(-(attribution.ravel() + jitter))
    orders = [ranked] + [rng.permutation(attribution.size) for _ in range(random_repeats)]
    fractions = [f for f in DELETION_FRACTIONS if f > 0]
    variants = []
    for order in orders:
        for fraction in fractions:
            deleted = image.astype(np.float32).ravel().copy()
            chosen = order[: int(round(fraction * image.size))]
            deleted[chosen] = baseline.ravel()[chosen]
            variants.append(deleted.reshape(image.shape))
    scores = _probabilities(model, variants).reshape(len(orders), len(fractions))
    if DELETION_FRACTIONS[0] == 0:
        scores = np.concatenate([np.full((len(orders), 1), start_probability), scores], 1)
    return scores[0], scores[1:].mean(axis=0)


def rank_correlation(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman correlation of two maps; 0 when either is constant."""
    if np.ptp(a) == 0 or np.ptp(b) == 0:
        return 0.0
    return float(stats.spearmanr(np.ravel(a), np.ravel(b)).statistic)


def check_architecture(name: str, weights: Path, sides: list[LesionSide],
                       methods=("gradcam", "guided_gradcam"), seed: int = 0,
                       random_repeats: int = RANDOM_REPEATS) -> dict:
    """Every check for one architecture's trained weights on the given sides."""
    model = registry.build_classifier(name)
    registry.load_weights(model, Path(weights))
    model.eval()
    layer = registry.gradcam_layer(model, name)
    random_model = randomized_copy(model, seed)
    random_layer = registry.gradcam_layer(random_model, name)
    rng = np.random.default_rng(seed)
    rows = []
    started = time.perf_counter()
    for item in sides:
        batch = _batch([item.network_input])
        row = {"case_id": item.case_id, "side": item.side, "label": item.label,
               "site": item.site}
        row["probability"] = float(_probabilities(model, [item.network_input])[0])
        # What a peak placed at random would score: the lesion's share of the crop.
        distance = ndimage.distance_transform_edt(~item.lesion_mask, sampling=_SPACING_MM)
        row["chance_strict"] = float(item.lesion_mask.mean())
        row["chance_within_tolerance"] = float((distance <= POINTING_TOLERANCE_MM).mean())
        for method in methods:
            net_map = explain(model, layer, batch, method)[0]  # network orientation
            crop_map = to_network_orientation(net_map, item.side)
            hit, distance = pointing(crop_map, item.lesion_mask)
            row[f"{method}_hit"], row[f"{method}_distance_mm"] = hit, distance
            row[f"{method}_empty"] = bool(net_map.max() <= 0)  # no positive evidence
            if method == "gradcam":
                top, random = deletion_curves(model, item.network_input, net_map, rng,
                                              row["probability"], random_repeats)
                row["deletion_top"], row["deletion_random"] = top.tolist(), random.tolist()
        signed = gradcam(model, layer, batch, positive_only=False)[0]
        signed_random = gradcam(random_model, random_layer, batch, positive_only=False)[0]
        row["randomization_spearman"] = rank_correlation(signed, signed_random)
        rows.append(row)
    return {"architecture": name, "weights": str(weights), "rows": rows,
            "seconds": round(time.perf_counter() - started, 1),
            "summary": summarize(rows, methods)}


def summarize(rows: list[dict], methods=("gradcam", "guided_gradcam")) -> dict:
    """Rates and means over sides (all lesion sides, and the positive ones)."""
    out: dict = {"sides": len(rows), "positive_sides": sum(r["label"] for r in rows)}
    if not rows:
        return out
    for method in methods:
        if f"{method}_hit" not in rows[0]:
            continue
        hits = np.array([r[f"{method}_hit"] for r in rows])
        near = np.array([r[f"{method}_distance_mm"] <= POINTING_TOLERANCE_MM for r in rows])
        out[f"{method}_pointing_strict"] = float(hits.mean())
        out[f"{method}_pointing_within_{POINTING_TOLERANCE_MM:.0f}mm"] = float(near.mean())
        out[f"{method}_empty_maps"] = float(np.mean([r[f"{method}_empty"] for r in rows]))
        out[f"{method}_median_distance_mm"] = float(
            np.median([r[f"{method}_distance_mm"] for r in rows]))
    out["pointing_chance_strict"] = float(np.mean([r["chance_strict"] for r in rows]))
    out[f"pointing_chance_within_{POINTING_TOLERANCE_MM:.0f}mm"] = float(
        np.mean([r["chance_within_tolerance"] for r in rows]))
    top = np.array([r["deletion_top"] for r in rows])
    random = np.array([r["deletion_random"] for r in rows])
    out["deletion_auc_top"] = float(top.mean())
    out["deletion_auc_random"] = float(random.mean())
    out["deletion_top_below_random"] = float((top.mean(1) < random.mean(1)).mean())
    positive = np.array([r["label"] == 1 for r in rows])
    if positive.any():
        out["deletion_auc_top_positive"] = float(top[positive].mean())
        out["deletion_auc_random_positive"] = float(random[positive].mean())
    spearman = np.array([r["randomization_spearman"] for r in rows])
    out["randomization_spearman_mean"] = float(spearman.mean())
    out["randomization_spearman_max"] = float(spearman.max())
    return out


def markdown_table(results: list[dict]) -> str:
    """One line per architecture with the headline figures."""
    lines = [
        "| architecture | lesion sides (positive) | pointing by chance strict / "
        f"≤{POINTING_TOLERANCE_MM:.0f} mm | pointing Grad-CAM strict / "
        f"≤{POINTING_TOLERANCE_MM:.0f} mm | pointing guided strict / ≤"
        f"{POINTING_TOLERANCE_MM:.0f} mm | deletion AUC top vs random | "
        "top < random (sides) | randomization Spearman mean (max) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    tol = f"within_{POINTING_TOLERANCE_MM:.0f}mm"
    for result in results:
        s = result["summary"]
        lines.append(
            f"| {result['architecture']} | {s['sides']} ({s['positive_sides']}) | "
            f"{s['pointing_chance_strict']:.2f} / {s[f'pointing_chance_{tol}']:.2f} | "
            f"{s['gradcam_pointing_strict']:.2f} / {s[f'gradcam_pointing_{tol}']:.2f} | "
            f"{s.get('guided_gradcam_pointing_strict', float('nan')):.2f} / "
            f"{s.get(f'guided_gradcam_pointing_{tol}', float('nan')):.2f} | "
            f"{s['deletion_auc_top']:.3f} vs {s['deletion_auc_random']:.3f} | "
            f"{s['deletion_top_below_random']:.2f} | "
            f"{s['randomization_spearman_mean']:.2f} ({s['randomization_spearman_max']:.2f}) |"
        )
    return "\n".join(lines)


def figure_payload(scan: Path, method: str = "gradcam") -> dict:
    """Bytes of every figure the app sends for one scan, and the time to build them.

    Runs the shipped models (assets/) on ``scan`` on the CPU.
    """
    from femurrisk import viewers
    from femurrisk.pipeline import Predictor

    prediction = Predictor(device="cpu").predict(scan, method=method)
    started = time.perf_counter()
    views = {side: viewers.side_view(prediction.sides[side], prediction.image,
                                     prediction.landmarks) for side in SIDES}
    scene = viewers.scene_3d(prediction)
    out = {"prediction_s": prediction.timings_s, "method": method,
           "display_grids_s": round(time.perf_counter() - started, 2)}
    for plane in viewers.PLANES:
        started = time.perf_counter()
        sizes = [len(viewers.plane_viewer(views[side], plane).to_json()) for side in SIDES]
        out[f"{plane}_bytes_both_sides"] = sum(sizes)
        out[f"{plane}_build_s"] = round(time.perf_counter() - started, 2)
    started = time.perf_counter()
    out["3d_bytes"] = len(viewers.figure_3d(scene).to_json())
    out["3d_build_s"] = round(time.perf_counter() - started, 2)
    out["first_view_bytes"] = out["axial_bytes_both_sides"] + out["3d_bytes"]
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", type=int, default=30)
    parser.add_argument("--first-case", type=int, default=FIRST_CASE)
    parser.add_argument("--weights", nargs="+", default=[], metavar="ARCH=PATH")
    parser.add_argument("--payload-scan", type=Path, metavar="NIFTI",
                        help="instead: figure sizes and build times for this scan")
    parser.add_argument("--out", type=Path, default=Path("runs/gradcam_checks"))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_grad_enabled(True)
    if args.payload_scan:
        print(json.dumps({m: figure_payload(args.payload_scan, m)
                          for m in ("gradcam", "guided_gradcam")}, indent=1))
        return

    started = time.perf_counter()
    sides = lesion_sides(range(args.first_case, args.first_case + args.cases))
    logger.info("%d lesion sides from %d cases in %.0f s", len(sides), args.cases,
                time.perf_counter() - started)
    results = []
    for item in args.weights:
        name, _, path = item.partition("=")
        result = check_architecture(name, Path(path), sides)
        logger.info("%s: %s", name, json.dumps(result["summary"]))
        results.append(result)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gradcam_checks.json").write_text(json.dumps(
        {"seed": SEED, "cases": [args.first_case, args.first_case + args.cases - 1],
         "results": results}, indent=1))
    table = markdown_table(results)
    (args.out / "gradcam_checks.md").write_text(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
