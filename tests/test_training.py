"""Training package: splits, configs, the classifier run end to end with a tiny net,
determinism, resume, and augmentation that carries no label."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from training import train_classifier
from training.augment import affine_transform, augmented, to_tensor, training_transform
from training.config import load_config
from training.data import assign_splits

SHAPE = (64, 64, 32)


class TinyNet(torch.nn.Module):
    """A few hundred parameters: enough to find a bright blob, fast on any CPU."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv3d(1, 4, 3, stride=2, padding=1)
        self.head = torch.nn.Linear(4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = torch.relu(self.conv(x)).amax(dim=(2, 3, 4))  # (N, 4)
        return self.head(features)


def make_crops(folder: Path, patients: int = 40, seed: int = 0) -> Path:
    """crops.npz of two sides per patient at four sites; positives carry a blob."""
    rng = np.random.default_rng(seed)
    n = 2 * patients
    labels = (rng.random(n) < 0.3).astype(np.int64)
    inputs = rng.integers(60, 120, (n, *SHAPE), dtype=np.uint8)
    for i in np.nonzero(labels)[0]:
        x, y, z = rng.integers(16, 48), rng.integers(16, 48), rng.integers(8, 24)
        inputs[i, x - 5:x + 5, y - 5:y + 5, z - 4:z + 4] = 250
    patient = np.repeat(np.arange(patients), 2)
    folder.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(
        folder / "crops.npz", inputs=inputs, label=labels, labels=labels,
        case_id=patient, patient_id=patient, site=np.array(list("ABCD"))[patient % 4],
        side=np.tile(["left", "right"], patients), implant=np.zeros(n, bool),
        true_risk=np.where(labels == 1, 0.6, 0.01).astype(np.float32),
        lesion_kind=np.where(labels == 1, "lytic", ""),
        lesion_place=np.where(labels == 1, "neck", ""),
        size_ratio=labels * 0.5, axial_cortical_involvement_mm=labels * 35.0,
    )
    return folder


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory) -> Path:
    return make_crops(tmp_path_factory.mktemp("crops"))


@pytest.fixture
def tiny_net(monkeypatch):
    monkeypatch.setattr(train_classifier.registry, "build_classifier",
                        lambda name: TinyNet())


def run(data: Path, run_dir: Path, *extra: str) -> None:
    train_classifier.main([
        "--config", "densenet121_quick", "--run", str(run_dir), "--device", "cpu",
        "--set", f"data={data}", "epochs=2", "batch_size=8", "eval_batch_size=32",
        "positive_copies=2", "val_positive_copies=2", "test_positive_copies=3",
        "max_test_patients=null", *extra,
    ])


def test_splits_keep_patients_and_sites_apart():
    rng = np.random.default_rng(1)
    patients = np.repeat(np.arange(100), 2)
    sites = np.array(list("ABCD"))[rng.integers(0, 4, 100)][patients]
    labels = (rng.random(200) < 0.2).astype(int)
    split = assign_splits(patients, sites, labels, "B", 0.2, seed=3)
    for name in ("train", "validation", "test"):
        others = patients[split != name]
        assert not set(patients[split == name]) & set(others)
    assert set(sites[split == "test"]) == {"A", "C", "D"}
    assert set(sites[split != "test"]) == {"B"}
    assert labels[split == "validation"].sum() > 0


def test_splits_reject_unknown_site():
    with pytest.raises(ValueError, match="train_site must be one of"):
        assign_splits(np.arange(4), np.array(list("AABB")), np.zeros(4), "Z", 0.2, 0)


def test_configs_resolve_and_name_every_key():
    base = load_config("classifier_base")
    for preset in ("quick", "paper"):
        for arch in ("densenet121", "resnet18", "resnet34", "swin"):
            config = load_config(f"{arch}_{preset}", base="classifier_base")
            assert config["architecture"] == arch
            assert set(base) <= set(config)
    assert load_config("densenet121_minimal", base="classifier_base")["positive_copies"] == 0
    text = (Path(train_classifier.__file__).parent / "configs/classifier_base.yaml").read_text()
    for line in text.splitlines():
        if line and not line.startswith((" ", "#")):
            assert "#" in line, f"config line without a reason: {line}"


def test_augmentation_adds_no_padded_corners():
    volume = np.full(SHAPE, 100, np.uint8)
    copy = augmented(volume, affine_transform(load_config("classifier_base")), seed=5)
    # Border padding: no air corners, so the copy's values stay those of the original.
    assert float(copy.min()) == pytest.approx(100 / 255, abs=1e-3)
    assert copy.shape == to_tensor(volume).shape


def test_classifier_run_end_to_end(tiny_data, tiny_net, tmp_path):
    run(tiny_data, tmp_path / "run")
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["split"]["test"]["sites"] == ["B", "C", "D"]
    assert summary["split"]["train"]["sites"] == ["A"]
    with open(tmp_path / "run" / "predictions.csv") as handle:
        rows = list(csv.DictReader(handle))
    test = [r for r in rows if r["set"] == "test"]
    assert {int(r["copy"]) for r in test if r["label"] == "1"} == {0, 1, 2, 3}
    assert {int(r["copy"]) for r in test if r["label"] == "0"} == {0}
    assert (tmp_path / "run" / "config.yaml").is_file()
    assert (tmp_path / "run" / "classifier_densenet121.safetensors").is_file()
    assert list((tmp_path / "run" / "tb").iterdir())
    with open(tmp_path / "run" / "metrics.csv") as handle:
        assert len(list(csv.DictReader(handle))) == 2


def test_cpu_runs_are_bit_identical_and_resume(tiny_data, tiny_net, tmp_path):
    run(tiny_data, tmp_path / "a")
    run(tiny_data, tmp_path / "b")
    # Interrupted after one epoch, then resumed: same weights as the full run.
    run(tiny_data, tmp_path / "c", "epochs=1")
    train_classifier.main([
        "--config", "densenet121_quick", "--run", str(tmp_path / "c"), "--device", "cpu",
        "--resume", "--set", f"data={tiny_data}", "epochs=2", "batch_size=8",
        "eval_batch_size=32", "positive_copies=2", "val_positive_copies=2",
        "test_positive_copies=3", "max_test_patients=null",
    ])
    weights = [load_file(str(tmp_path / r / "checkpoint_last.safetensors")) for r in "abc"]
    for key in weights[0]:
        assert torch.equal(weights[0][key], weights[1][key]), key
        assert torch.equal(weights[0][key], weights[2][key]), key


def check_table(table: dict, runs: dict[str, list[dict]]) -> None:
    """Every number of every scored row against its confusion matrix and predictions."""
    from training.metrics import auprc, auroc, brier, from_confusion

    for entry in table["entries"]:
        if "confusion" not in entry:
            continue  # the study's published rows
        c = entry["confusion"]
        assert sum(c.values()) == entry["n"] and c["tp"] + c["fn"] == entry["positives"]
        for key, value in from_confusion(c).items():
            assert entry["metrics"][key] == pytest.approx(value, nan_ok=True), key
        predictions = runs.get(entry.get("run", ""))
        if predictions is None:
            continue
        rows = [r for r in predictions if r["set"] == "test"
                and (entry["kind"] != "test" or r["copy"] == "0")]
        y = np.array([int(r["label"]) for r in rows])
        p = np.array([float(r["probability"]) for r in rows])
        assert entry["n"] == len(rows)
        called = p >= entry["threshold"]
        assert c["tp"] == int((called & (y == 1)).sum())
        assert c["fp"] == int((called & (y == 0)).sum())
        assert entry["metrics"]["auroc"] == pytest.approx(auroc(y, p))
        assert entry["metrics"]["auprc"] == pytest.approx(auprc(y, p))
        assert entry["metrics"]["brier"] == pytest.approx(brier(y, p))


def test_benchmark_table_matches_predictions(tiny_data, tiny_net, tmp_path):
    from training import benchmark

    run(tiny_data, tmp_path / "runs" / "densenet121")
    table = benchmark.write_table([tmp_path / "runs" / "densenet121"],
                                  tmp_path / "out" / "bench", "test", 50, 0)
    predictions = {str(tmp_path / "runs" / "densenet121"):
                   benchmark.read_predictions(tmp_path / "runs" / "densenet121")}
    check_table(table, predictions)
    kinds = [e["kind"] for e in table["entries"] if e["name"] == "densenet121"]
    assert kinds == ["test", "augmented test (positives x4)"]
    names = [e["name"] for e in table["entries"]]
    assert "ceiling (true risk)" in names and any("Mirels" in n for n in names)
    for suffix in (".md", ".json", ".png"):
        assert (tmp_path / "out" / f"bench{suffix}").stat().st_size > 0


@pytest.mark.parametrize("name", ["benchmark_quick"])
def test_committed_benchmark_is_consistent(name):
    path = Path(__file__).resolve().parents[1] / "docs" / f"{name}.json"
    if not path.is_file():
        pytest.skip(f"{path.name} not written yet")
    table = json.loads(path.read_text())
    check_table(table, {})
    # No patient crosses splits: train and validation at one site, test at the others.
    for entry in table["entries"]:
        if "summary" in entry:
            split = entry["summary"]["split"]
            assert len(split["train"]["sites"]) == 1
            assert split["validation"]["sites"] == split["train"]["sites"]
            assert not set(split["test"]["sites"]) & set(split["train"]["sites"])


def test_minimal_config_reads_caches_of_the_first_format(tiny_data, tiny_net, tmp_path):
    """The model card's command: crops.npz without sites or patients, no test set."""
    with np.load(tiny_data / "crops.npz") as data:
        old = {k: data[k] for k in ("inputs", "labels", "true_risk", "case_id",
                                    "implant", "side")}
    (tmp_path / "old").mkdir()
    np.savez_compressed(tmp_path / "old" / "crops.npz", **old)
    train_classifier.main([
        "--config", "densenet121_minimal", "--run", str(tmp_path / "run"),
        "--device", "cpu", "--set", f"data={tmp_path / 'old'}", "epochs=1",
    ])
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["split"]["test"]["sides"] == 0
    assert summary["presented_prevalence"] == pytest.approx(summary["cohort_prevalence"])
    assert (tmp_path / "run" / "classifier_densenet121.safetensors").is_file()


def test_export_writes_weights_and_card_from_a_run(tiny_data, tiny_net, tmp_path):
    from femurrisk import registry
    from training import export

    run(tiny_data, tmp_path / "run", "epochs=1")
    landmark = tmp_path / "landmark"
    registry.save_weights(registry.build_landmark_unet(), landmark / "landmark_unet.safetensors",
                          {"step": "1"}, fp16=False)
    (landmark / "metrics.csv").write_text("step,val_mae_mm\n1,5.0\n")
    export.main(["--classifier-run", str(tmp_path / "run"), "--landmark-run", str(landmark),
                 "--assets", str(tmp_path / "assets")])
    meta = registry.read_metadata(tmp_path / "assets" / "classifier_densenet121.safetensors")
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert float(meta["threshold"]) == pytest.approx(summary["threshold_deployment"], rel=1e-5)
    assert float(meta["logit_offset"]) == pytest.approx(summary["logit_offset"], rel=1e-5)
    card = (tmp_path / "assets" / "MODEL_CARD.md").read_text()
    assert "val_auroc" in card and "train_cases_per_s" in card
    # Crops not made by training.prepare are named as such, never as the synthetic cohort.
    assert meta["trained_on"].startswith(f"crops in {tiny_data}")
    assert "not made by training.prepare" in meta["trained_on"]


def test_model_card_names_the_prepare_command_of_the_data(tmp_path):
    from training import export

    data, run_dir = tmp_path / "data", tmp_path / "run"
    data.mkdir()
    run_dir.mkdir()
    (run_dir / "config.yaml").write_text(f"data: {data}\n")
    (data / "prepare.json").write_text(json.dumps({
        "command": "python -m training.prepare --scale 1 --out data/paper",
        "generator": "multi-site design", "seed": 0}))
    assert export.describe_training_data(run_dir) == (
        "femurrisk synthetic cohort (multi-site design, seed 0): "
        "`python -m training.prepare --scale 1 --out data/paper`")
    (run_dir / "config.yaml").unlink()
    assert export.describe_training_data(run_dir).startswith("unknown")


def test_cosine_schedule_warms_up_then_decays_to_zero():
    config = {"learning_rate": 1e-3, "lr_schedule": "cosine", "warmup_steps": 10}
    rates = [train_classifier.learning_rate_at(s, 100, config) for s in range(100)]
    assert rates[0] == pytest.approx(1e-4) and rates[9] == pytest.approx(1e-3)
    assert all(a >= b for a, b in zip(rates[9:], rates[10:]))  # never rises after warm-up
    assert rates[-1] < 1e-5
    constant = {"learning_rate": 1e-3, "lr_schedule": "constant"}
    assert {train_classifier.learning_rate_at(s, 100, constant) for s in (0, 50, 99)} == {1e-3}


def test_acquisition_augmentation_is_reproducible_and_bounded():
    config = load_config("classifier_base")
    config.update(augment_acquisition=True, augment_noise_hu=25.0, augment_offset_hu=30.0)
    transform = training_transform(config)
    volume = np.full(SHAPE, 120, dtype=np.uint8)
    volume[20:40, 20:40, 8:24] = 200
    first, again = augmented(volume, transform, 3), augmented(volume, transform, 3)
    assert torch.equal(first, again)
    assert not torch.equal(first, augmented(volume, transform, 4))
    assert float(first.min()) >= 0.0 and float(first.max()) <= 1.0
    # Noise and offset stay within what hospitals differ by: the mean of a flat
    # region moves by no more than the offset (30 HU = 0.015 input units) plus a margin.
    flat = augmented(np.full(SHAPE, 120, dtype=np.uint8), transform, 5)
    assert abs(float(flat.mean()) - 120 / 255) < 30.0 / 2000.0 + 0.005
    # Without the key, training sees the affine alone, as in the study.
    config["augment_acquisition"] = False
    plain = training_transform(config)
    assert torch.equal(augmented(volume, plain, 3), augmented(volume, affine_transform(config), 3))
