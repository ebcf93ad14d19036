"""Patient-level splits that reproduce the source study's design.

The study trained on one hospital, drew its internal validation from the same
hospital, and tested externally on the other three. Every split here is made of
whole patients, so no patient's CTs fall into two splits.
"""

from __future__ import annotations

import numpy as np

from training.cohort_design import TRAINING_SITE, Design


def study_splits(design: Design, *, validation_fraction: float = 0.2,
                 training_site: str = TRAINING_SITE, seed: int = 0
                 ) -> dict[str, list[int]]:
    """Case ids of ``train``, ``validation`` (both from ``training_site``) and
    ``external`` (all other sites).

    Patients of the training site are shuffled (by ``seed``) and the validation
    patients taken until they hold about ``validation_fraction`` of that site's
    cases, stratified so that validation holds its share of the site's positives.

    Args:
        design: The cohort.
        validation_fraction: Share of the training site's cases for validation.
        training_site: The hospital whose patients are trained on.
        seed: Seeds the patient shuffle.

    Returns:
        ``{"train": [...], "validation": [...], "external": [...]}``.

    Raises:
        ValueError: If ``validation_fraction`` is not within (0, 1).
    """
    if not 0.0 < validation_fraction < 1.0:
        raise ValueError(f"validation_fraction must be in (0, 1), got {validation_fraction}")
    rng = np.random.default_rng([seed, 0x5B])
    by_patient: dict[int, list[int]] = {}
    for case in design.cases:
        by_patient.setdefault(case.patient_id, []).append(case.case_id)
    internal = [p.patient_id for p in design.patients
                if p.site == training_site and p.patient_id in by_patient]
    positive = {p for p in internal
                if any(design.cases[c].label for c in by_patient[p])}
    validation: set[int] = set()
    for group in (sorted(positive), sorted(set(internal) - positive)):
        order = [group[i] for i in rng.permutation(len(group))]
        want = validation_fraction * sum(len(by_patient[p]) for p in group)
        taken = 0
        for p in order:
            if taken >= want:
                break
            validation.add(p)
            taken += len(by_patient[p])
    splits: dict[str, list[int]] = {"train": [], "validation": [], "external": []}
    for p, cases in sorted(by_patient.items()):
        if design.patients[p].site != training_site:
            splits["external"].extend(cases)
        elif p in validation:
            splits["validation"].extend(cases)
        else:
            splits["train"].extend(cases)
    return splits


def patient_folds(design: Design, n_folds: int = 5, seed: int = 0,
                  site: str | None = TRAINING_SITE) -> list[list[int]]:
    """Case ids in ``n_folds`` patient-disjoint folds (cross-validation).

    Args:
        design: The cohort.
        n_folds: Number of folds (>= 2).
        seed: Seeds the patient shuffle.
        site: Only this hospital's patients, or None for all.

    Returns:
        One list of case ids per fold.

    Raises:
        ValueError: If ``n_folds`` < 2.
    """
    if n_folds < 2:
        raise ValueError(f"n_folds must be at least 2, got {n_folds}")
    rng = np.random.default_rng([seed, 0xF0])
    patients = [p.patient_id for p in design.patients if site in (None, p.site)]
    folds: list[list[int]] = [[] for _ in range(n_folds)]
    for n, index in enumerate(rng.permutation(len(patients))):
        p = patients[index]
        folds[n % n_folds].extend(c.case_id for c in design.cases if c.patient_id == p)
    return folds
