"""training.prepare on the multi-site design: splits by patient and hospital, labels
and sides from the design, case-control sampling that keeps every positive."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from training import prepare
from training.cohort_design import TRAINING_SITE, CohortSpec, build_design
from training.splits import study_splits
from training.train_classifier import dataset_splits

SCALE, SEED, RATIO = 0.1, 4, 1.0


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("prepared")
    prepare.main(["--seed", str(SEED), "--scale", str(SCALE), "--case-control", str(RATIO),
                  "--landmark-studies", "1", "--workers", "2", "--out", str(out)])
    return out


def test_rows_are_the_design_cases_with_their_split(prepared):
    with np.load(prepared / "crops.npz") as data:
        crops = {k: data[k] for k in data.files}
    design = build_design(CohortSpec(seed=SEED, scale=SCALE))
    split_of = {c: name for name, ids in study_splits(design, seed=SEED).items() for c in ids}
    assert crops["inputs"].shape[1:] == (64, 64, 32) and crops["inputs"].dtype == np.uint8
    for i, case_id in enumerate(crops["case_id"]):
        case = design.cases[int(case_id)]
        assert crops["side"][i] == case.side
        assert crops["label"][i] == case.label
        assert crops["study_id"][i] == case.study_id
        assert crops["patient_id"][i] == design.patients[case.patient_id].pseudo_id
        assert crops["site"][i] == design.studies[case.study_id].site
        assert crops["split"][i] == prepare.SPLIT_NAMES[split_of[int(case_id)]]
    # Study protocol: hospital A trains and validates, the others test.
    internal = np.isin(crops["split"], ["train", "validation"])
    assert set(crops["site"][internal]) == {TRAINING_SITE}
    assert TRAINING_SITE not in set(crops["site"][crops["split"] == "test"])
    # No patient in two splits, and training agrees with the file.
    labels = crops["label"].astype(np.int64)
    split = dataset_splits(crops, labels, {"seed": 0})
    assert (split == crops["split"]).all()
    for patient in np.unique(crops["patient_id"]):
        assert len(set(split[crops["patient_id"] == patient])) == 1
    # The manifest holds the same rows, without pixels.
    with open(prepared / "manifest.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert [int(r["case_id"]) for r in rows] == crops["case_id"].tolist()
    assert "input" not in rows[0]
    assert len(list((prepared / "landmark").glob("*.npz"))) == 1
    # How the crops were made travels with them (read by the export's model card).
    record = json.loads((prepared / "prepare.json").read_text())
    assert record["generator"] == "multi-site design" and record["seed"] == SEED
    assert f"--scale {SCALE}" in record["command"]


def test_case_control_keeps_every_positive_and_the_ratio(prepared):
    with np.load(prepared / "crops.npz") as data:
        labels, split, implant = data["label"], data["split"], data["implant"]
    design = build_design(CohortSpec(seed=SEED, scale=SCALE))
    for name, ids in study_splits(design, seed=SEED).items():
        rows = split == prepare.SPLIT_NAMES[name]
        positives = sum(design.cases[c].label for c in ids)
        assert labels[rows].sum() == positives
        negatives = int((labels[rows] == 0).sum())
        assert negatives == min(len(ids) - positives, round(RATIO * positives))
    assert not implant.any()  # an old implant is never in a femur with a metastasis


def test_a_patient_in_two_splits_is_refused():
    data = {"patient_id": np.array(["p1", "p1", "p2"]),
            "split": np.array(["train", "test", "test"]),
            "site": np.array(["A", "A", "B"])}
    with pytest.raises(ValueError, match="two splits"):
        dataset_splits(data, np.zeros(3, np.int64), {"seed": 0})


@pytest.mark.parametrize("args, message", [
    (["--scale", "nan"], "--scale must be a number > 0"),
    (["--scale", "0"], "--scale must be a number > 0"),
    (["--single-anatomy", "2", "--first-case", "-5"], "--first-case must be >= 0"),
    (["--max-external-patients", "-1"], "--max-external-patients must be >= 1"),
    (["--landmark-studies", "-3"], "--landmark-studies must be >= 0"),
    (["--single-anatomy", "2", "--positive-fraction", "2"], "--positive-fraction must be"),
    (["--single-anatomy", "2", "--sites", "A,Z"], "--sites must name hospitals"),
    (["--workers", "0"], "--workers must be >= 1"),
    (["--landmark-only"], "--landmark-only needs --landmark-studies"),
])
def test_bad_arguments_are_refused_before_any_work(tmp_path, capsys, args, message):
    with pytest.raises(SystemExit) as exit_info:
        prepare.main([*args, "--out", str(tmp_path / "out")])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out" / "crops.npz").exists()
