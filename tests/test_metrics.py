"""Metrics of the benchmark against brute-force definitions."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from training import metrics as m


@pytest.fixture
def scored():
    rng = np.random.default_rng(0)
    labels = (rng.random(200) < 0.2).astype(int)
    scores = np.round(rng.random(200) * 0.6 + 0.4 * labels, 2)  # ties included
    return labels, scores


def test_auroc_is_the_pairwise_probability(scored):
    labels, scores = scored
    pos, neg = scores[labels == 1], scores[labels == 0]
    pairs = [(p > n) + 0.5 * (p == n) for p, n in itertools.product(pos, neg)]
    assert m.auroc(labels, scores) == pytest.approx(np.mean(pairs))


def test_auprc_sums_precision_over_recall_steps(scored):
    labels, scores = scored
    total, previous_recall = 0.0, 0.0
    for t in np.unique(scores)[::-1]:
        called = scores >= t
        recall = (called & (labels == 1)).sum() / labels.sum()
        total += (recall - previous_recall) * (called & (labels == 1)).sum() / called.sum()
        previous_recall = recall
    assert m.auprc(labels, scores) == pytest.approx(total)


def test_micro_precision_and_f1_equal_accuracy_and_class_metrics_differ():
    c = {"tp": 481, "fp": 36, "tn": 1178, "fn": 86}  # the study's DenseNet-121 row
    r = m.from_confusion(c)
    assert r["accuracy"] == pytest.approx(1659 / 1781)
    assert r["sensitivity"] == pytest.approx(481 / 567)
    assert r["specificity"] == pytest.approx(1178 / 1214)
    assert r["precision_micro"] == pytest.approx(r["accuracy"])
    assert r["f1_micro"] == pytest.approx(r["accuracy"])
    assert r["precision_fracture"] == pytest.approx(481 / 517)
    assert r["f1_fracture"] == pytest.approx(2 * 481 / (2 * 481 + 36 + 86))


def test_thresholds_follow_their_rule(scored):
    labels, scores = scored
    t = m.choose_threshold(labels, scores, "youden")
    j = [((scores[labels == 1] >= u).mean() + (scores[labels == 0] < u).mean())
         for u in np.unique(scores)]
    best = (scores[labels == 1] >= t).mean() + (scores[labels == 0] < t).mean()
    assert best == pytest.approx(max(j))
    t90 = m.choose_threshold(labels, scores, "sensitivity:0.9")
    assert (scores[labels == 1] >= t90).mean() >= 0.9
    with pytest.raises(ValueError, match="threshold rule must be"):
        m.choose_threshold(labels, scores, "f2")


def test_prior_shift_moves_the_mean_to_the_new_prevalence():
    assert m.sigmoid(m.logit(0.5) + m.prior_shift(0.5, 0.014)) == pytest.approx(0.014)


def test_bootstrap_moves_whole_patients():
    labels = np.array([0, 0, 1, 1])
    patients = np.array([0, 0, 1, 1])
    # Resampling patients, each resample holds one class or both in pairs: the share
    # of positives is always 0, 0.5 or 1.
    ci = m.bootstrap(lambda r: {"share": labels[r].mean()}, patients, 200, 0)
    assert set(ci["share"]) <= {0.0, 0.5, 1.0}


def test_evaluate_reports_a_consistent_confusion(scored):
    labels, scores = scored
    result = m.evaluate(labels, scores, 0.5, np.arange(200), n_resamples=50)
    c = result["confusion"]
    assert sum(c.values()) == result["n"] == 200
    assert c["tp"] + c["fn"] == result["positives"]
    assert result["metrics"]["accuracy"] == pytest.approx((c["tp"] + c["tn"]) / 200)
    lo, hi = result["ci95"]["auroc"]
    assert lo <= result["metrics"]["auroc"] <= hi
