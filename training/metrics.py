"""Classification metrics of the benchmark, with patient-level bootstrap intervals.

Every number of the benchmark table comes from :func:`evaluate`, which derives the
threshold metrics from one confusion matrix (so the table can be checked against
it) and the ranking metrics from the scores. Conventions:

* Positive class = pathologic fracture within three months (label 1).
* ``precision_micro`` and ``f1_micro`` are micro averages over both classes, as the
  source study computed them; for a binary problem both equal the accuracy.
  ``precision_fracture`` and ``f1_fracture`` are those of the fracture class alone.
* Intervals are 2.5 and 97.5 percentiles over bootstrap resamples of *patients*
  (every row of a patient, including augmented copies, moves together).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from scipy.stats import rankdata

#: Point metrics reported per model, in table order.
POINT_METRICS = (
    "accuracy", "sensitivity", "specificity", "precision_micro", "f1_micro",
    "precision_fracture", "f1_fracture", "auroc", "auprc", "brier",
)


def confusion(labels: np.ndarray, predicted: np.ndarray) -> dict[str, int]:
    """True/false positives/negatives of 0/1 predictions against 0/1 labels."""
    labels, predicted = np.asarray(labels).astype(bool), np.asarray(predicted).astype(bool)
    return {"tp": int((labels & predicted).sum()), "fp": int((~labels & predicted).sum()),
            "tn": int((~labels & ~predicted).sum()), "fn": int((labels & ~predicted).sum())}


def _ratio(a: float, b: float) -> float:
    return float(a / b) if b else float("nan")


def from_confusion(c: dict[str, int]) -> dict[str, float]:
    """Threshold metrics of one confusion matrix (nan where a denominator is 0)."""
    tp, fp, tn, fn = c["tp"], c["fp"], c["tn"], c["fn"]
    accuracy = _ratio(tp + tn, tp + fp + tn + fn)
    precision = _ratio(tp, tp + fp)
    sensitivity = _ratio(tp, tp + fn)
    return {
        "accuracy": accuracy, "sensitivity": sensitivity,
        "specificity": _ratio(tn, tn + fp),
        # Micro averages pool both classes' TP, FP, FN: every wrong prediction is one
        # FP of one class and one FN of the other, so both reduce to the accuracy.
        "precision_micro": _ratio(tp + tn, (tp + tn) + (fp + fn)),
        "f1_micro": _ratio(2 * (tp + tn), 2 * (tp + tn) + (fp + fn) + (fn + fp)),
        "precision_fracture": precision,
        "f1_fracture": _ratio(2 * tp, 2 * tp + fp + fn),
    }


def auroc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Area under the ROC curve (Mann-Whitney, ties count one half); nan if one class."""
    labels = np.asarray(labels).astype(bool)
    n_pos, n_neg = int(labels.sum()), int((~labels).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = rankdata(np.asarray(scores, dtype=float))
    return float((ranks[labels].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def auprc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Average precision: precision at each distinct threshold weighted by recall gain."""
    labels = np.asarray(labels).astype(bool)
    if not labels.any():
        return float("nan")
    order = np.argsort(-np.asarray(scores, dtype=float), kind="stable")
    sorted_scores, sorted_labels = np.asarray(scores, dtype=float)[order], labels[order]
    # Last index of each run of equal scores: a threshold admits all tied rows at once.
    last = np.r_[np.nonzero(np.diff(sorted_scores))[0], len(sorted_scores) - 1]
    tp = np.cumsum(sorted_labels)[last]
    precision = tp / (last + 1)
    recall = tp / labels.sum()
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def roc_curve(labels: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """False and true positive rates at every distinct threshold, from (0, 0) to (1, 1)."""
    labels = np.asarray(labels).astype(bool)
    order = np.argsort(-np.asarray(scores, dtype=float), kind="stable")
    sorted_scores = np.asarray(scores, dtype=float)[order]
    last = np.r_[np.nonzero(np.diff(sorted_scores))[0], len(sorted_scores) - 1]
    tp = np.cumsum(labels[order])[last]
    fp = last + 1 - tp
    return (np.r_[0.0, fp / max(1, (~labels).sum())],
            np.r_[0.0, tp / max(1, labels.sum())])


def pr_curve(labels: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Recall and precision at every distinct threshold (highest threshold first)."""
    labels = np.asarray(labels).astype(bool)
    order = np.argsort(-np.asarray(scores, dtype=float), kind="stable")
    sorted_scores = np.asarray(scores, dtype=float)[order]
    last = np.r_[np.nonzero(np.diff(sorted_scores))[0], len(sorted_scores) - 1]
    tp = np.cumsum(labels[order])[last]
    return tp / max(1, labels.sum()), tp / (last + 1)


def brier(labels: np.ndarray, probabilities: np.ndarray) -> float:
    """Mean squared difference between probability and 0/1 outcome."""
    return float(np.mean((np.asarray(probabilities, float) - np.asarray(labels, float)) ** 2))


def reliability_curve(labels: np.ndarray, probabilities: np.ndarray,
                      bins: int = 10) -> dict[str, list]:
    """Per equal-width probability bin: mean probability, observed rate and count."""
    probabilities = np.asarray(probabilities, float)
    labels = np.asarray(labels, float)
    which = np.clip((probabilities * bins).astype(int), 0, bins - 1)
    curve: dict[str, list] = {"mean_probability": [], "observed_rate": [], "count": []}
    for b in range(bins):
        inside = which == b
        if inside.any():
            curve["mean_probability"].append(float(probabilities[inside].mean()))
            curve["observed_rate"].append(float(labels[inside].mean()))
            curve["count"].append(int(inside.sum()))
    return curve


def choose_threshold(labels: np.ndarray, probabilities: np.ndarray, rule: str) -> float:
    """Operating threshold on a validation set, by a stated rule.

    Args:
        labels: 0/1 labels.
        probabilities: Scores; a row is called positive when its score >= threshold.
        rule: ``"youden"`` (maximise sensitivity + specificity - 1; ties go to the
            higher threshold) or ``"sensitivity:S"`` (the highest threshold whose
            sensitivity is at least S, i.e. the best specificity at that sensitivity).

    Raises:
        ValueError: If the rule is unknown or the set lacks a class.
    """
    labels = np.asarray(labels).astype(bool)
    if labels.all() or not labels.any():
        raise ValueError("threshold needs both classes in the validation set, got one")
    candidates = np.unique(np.asarray(probabilities, float))[::-1]  # high to low
    sens = np.array([(probabilities[labels] >= t).mean() for t in candidates])
    spec = np.array([(probabilities[~labels] < t).mean() for t in candidates])
    if rule == "youden":
        return float(candidates[int(np.argmax(sens + spec - 1.0))])
    if rule.startswith("sensitivity:"):
        target = float(rule.partition(":")[2])
        return float(candidates[int(np.argmax(sens >= target - 1e-12))])
    raise ValueError(f"threshold rule must be 'youden' or 'sensitivity:S', got {rule!r}")


def logit(p: np.ndarray | float) -> np.ndarray | float:
    p = np.clip(p, 1e-7, 1 - 1e-7)
    return np.log(p / (1.0 - p))


def sigmoid(x: np.ndarray | float) -> np.ndarray | float:
    return 1.0 / (1.0 + np.exp(-np.asarray(x, float)))


def prior_shift(from_prevalence: float, to_prevalence: float) -> float:
    """Logit offset that moves probabilities learnt at one prevalence to another.

    Bayes' rule with class-conditional likelihoods unchanged: the posterior odds scale
    by the ratio of the prior odds.
    """
    return float(logit(to_prevalence) - logit(from_prevalence))


def point_metrics(labels: np.ndarray, probabilities: np.ndarray,
                  threshold: float) -> dict[str, float]:
    """Every metric of :data:`POINT_METRICS` at ``threshold``."""
    c = confusion(labels, probabilities >= threshold)
    out = from_confusion(c)
    out.update(auroc=auroc(labels, probabilities), auprc=auprc(labels, probabilities),
               brier=brier(labels, probabilities))
    return out


def bootstrap(metric: Callable[[np.ndarray], dict[str, float]], patient_ids: np.ndarray,
              n_resamples: int, seed: int) -> dict[str, tuple[float, float]]:
    """2.5 and 97.5 percentiles of ``metric(rows)`` over resamples of patients.

    Args:
        metric: Maps an index array of rows to a dict of metrics.
        patient_ids: Patient of each row.
        n_resamples: Bootstrap resamples.
        seed: Seed of the resampling.
    """
    patients, inverse = np.unique(patient_ids, return_inverse=True)
    rows_of = [np.nonzero(inverse == p)[0] for p in range(len(patients))]
    rng = np.random.default_rng(seed)
    draws: dict[str, list[float]] = {}
    for _ in range(n_resamples):
        chosen = rng.integers(0, len(patients), len(patients))
        rows = np.concatenate([rows_of[p] for p in chosen])
        for key, value in metric(rows).items():
            draws.setdefault(key, []).append(value)
    return {k: (float(np.nanpercentile(v, 2.5)), float(np.nanpercentile(v, 97.5)))
            if np.isfinite(v).any() else (float("nan"), float("nan"))
            for k, v in draws.items()}


def evaluate(labels: np.ndarray, probabilities: np.ndarray, threshold: float,
             patient_ids: np.ndarray, n_resamples: int = 1000, seed: int = 0) -> dict:
    """Point metrics, bootstrap intervals, confusion matrix and reliability curve."""
    labels = np.asarray(labels).astype(int)
    probabilities = np.asarray(probabilities, float)
    result = point_metrics(labels, probabilities, threshold)
    ci = bootstrap(lambda r: point_metrics(labels[r], probabilities[r], threshold),
                   np.asarray(patient_ids), n_resamples, seed)
    return {
        "n": int(len(labels)), "positives": int(labels.sum()),
        "patients": int(len(np.unique(patient_ids))), "threshold": float(threshold),
        "metrics": result, "ci95": {k: list(v) for k, v in ci.items()},
        "confusion": confusion(labels, probabilities >= threshold),
        "reliability": reliability_curve(labels, probabilities),
    }
