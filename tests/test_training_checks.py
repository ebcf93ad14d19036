"""User mistakes in training are refused before anything is written, with a message
that names what is wrong (found by trying the package as a new user)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.test_training import make_crops, run, tiny_data, tiny_net  # noqa: F401 (fixtures)
from training import export, train_classifier


@pytest.fixture(scope="module")
def crops(tiny_data) -> Path:
    return tiny_data


def refused(capsys, data: Path, run_dir: Path, *extra: str) -> str:
    with pytest.raises(SystemExit) as exit_info:
        run(data, run_dir, *extra)
    assert exit_info.value.code == 2
    return capsys.readouterr().err


def rewrite(source: Path, folder: Path, **changes) -> Path:
    with np.load(source / "crops.npz") as data:
        arrays = {k: data[k] for k in data.files}
    arrays.update(changes)
    folder.mkdir(parents=True, exist_ok=True)
    np.savez(folder / "crops.npz", **arrays)
    return folder


@pytest.mark.parametrize("setting, message", [
    ("epochz=3", "unknown config keys ['epochz']"),
    ("lr_schedule=bogus", "lr_schedule must be one of"),
    ("threshold_set=bogus", "threshold_set must be one of"),
    ("threshold_rule=sensitivity:2", "threshold_rule must be"),
    ("epochs=0", "epochs must be a whole number >= 1"),
    ("batch_size=0", "batch_size must be a whole number >= 1"),
    ("architecture=vgg", "architecture must be one of"),
    ("seed=abc", "seed must be a whole number"),
    ("seed=-1", "seed must be a whole number >= 0, got -1"),
    ("amp=maybe", "amp must be true or false"),
    ("augment_translate_voxels=5", "augment_translate_voxels must be a list of three"),
    ("augment_rotate_deg=-5", "augment_rotate_deg must be a number >= 0"),
    ("max_test_patients=0", "max_test_patients must be null or a whole number >= 1"),
    ("val_fraction=0", "val_fraction must be"),
    ("init_weights=/nonexistent.safetensors", "init_weights must be null or"),
])
def test_bad_config_values_are_refused_before_writing(crops, tmp_path, capsys, setting,
                                                      message):
    err = refused(capsys, crops, tmp_path / "run", setting)
    assert message in err
    assert not (tmp_path / "run").exists()


def test_unknown_config_name_is_refused(tmp_path, capsys):
    with pytest.raises(SystemExit):
        train_classifier.main(["--config", "nonexistent", "--run", str(tmp_path / "r")])
    assert "no config 'nonexistent'" in capsys.readouterr().err


@pytest.mark.parametrize("change, message", [
    ({"label": None}, "labels must be 0"),
    ({"split": "Train"}, "split values must be train, validation or test"),
    ({"split": "partial"}, "split must be given on every row or on none"),
    ({"inputs": "float"}, "inputs must be (N, 64, 64, 32) uint8"),
    ({"inputs": "small"}, "inputs must be (N, 64, 64, 32) uint8"),
    ({"side": "screen"}, "sides must be 'left' or 'right'"),
    ({"true_risk": "nan"}, "'true_risk' must be a finite number on every row"),
    ({"true_risk": "text"}, "got values that are not numbers"),
])
def test_bad_crops_are_refused(crops, tmp_path, capsys, change, message):
    with np.load(crops / "crops.npz") as data:
        n, inputs = len(data["label"]), data["inputs"]
    key, how = next(iter(change.items()))
    value = {
        "label": np.where(np.arange(n) == 0, 2, 0),
        "split": (np.array(["Train"] * n) if how == "Train"
                  else np.where(np.arange(n) < 3, "", "train")),
        "inputs": (inputs.astype(np.float32) if how == "float" else inputs[:, :32, :32, :16]),
        "side": np.array(["screen"] * n),
        "true_risk": (np.where(np.arange(n) == 1, np.nan, 0.1) if how == "nan"
                      else np.array(["high"] * n)),
    }[key]
    bad = rewrite(crops, tmp_path / "bad", **{key: value})
    assert message in refused(capsys, bad, tmp_path / "run")


def test_missing_crops_and_one_class_validation_are_refused(crops, tmp_path, capsys):
    assert "no crops.npz in" in refused(capsys, tmp_path / "empty", tmp_path / "run")
    with np.load(crops / "crops.npz") as data:
        labels, sites = data["label"].copy(), data["site"]
    labels[sites != "A"] = 0
    labels[sites == "A"] = 0
    bad = rewrite(crops, tmp_path / "negatives", label=labels, labels=labels)
    assert "split needs positive and negative sides" in refused(capsys, bad, tmp_path / "r")


def test_run_folders_are_not_overwritten_and_resume_needs_the_same_config(
        crops, tiny_net, tmp_path, capsys):
    def main_refused(run_dir: Path, data: Path, *extra: str) -> str:
        with pytest.raises(SystemExit) as exit_info:
            train_classifier.main(["--config", "densenet121_quick", "--run", str(run_dir),
                                   "--device", "cpu", "--resume", "--set", f"data={data}",
                                   "batch_size=8", "eval_batch_size=32", "positive_copies=2",
                                   "val_positive_copies=2", "test_positive_copies=3",
                                   "max_test_patients=null", *extra])
        assert exit_info.value.code == 2
        return capsys.readouterr().err

    assert "nothing to resume" in main_refused(tmp_path / "none", crops)
    run(crops, tmp_path / "run", "epochs=1")
    assert "already holds a run" in refused(capsys, crops, tmp_path / "run", "epochs=1")
    other = make_crops(tmp_path / "other", seed=3)
    err = main_refused(tmp_path / "run", other, "epochs=2")
    assert "keys differ" in err and "['data']" in err
    err = main_refused(tmp_path / "run", crops, "epochs=2", "architecture=resnet18")
    assert "['architecture']" in err


def test_export_refuses_non_finite_calibration(tmp_path):
    from femurrisk import registry
    from tests.test_training import TinyNet

    classifier = tmp_path / "classifier"
    classifier.mkdir()
    registry.save_weights(TinyNet(), classifier / "classifier_densenet121.safetensors",
                          {"architecture": "densenet121", "threshold": "nan",
                           "logit_offset": "0.1", "val_auroc": "0.8"}, fp16=False)
    landmark = tmp_path / "landmark"
    landmark.mkdir()
    registry.save_weights(torch.nn.Linear(1, 1), landmark / "landmark_unet.safetensors", {},
                          fp16=False)
    with pytest.raises(ValueError, match="threshold is 'nan'"):
        export.check_runs(classifier, landmark)
    with pytest.raises(ValueError, match="no finished landmark run"):
        export.check_runs(classifier, tmp_path / "nowhere")


def test_benchmark_table_refuses_runs_on_other_splits(tmp_path):
    from training import benchmark

    runs = []
    for name, sides in (("densenet121", 10), ("swin", 12)):
        run_dir = tmp_path / name
        run_dir.mkdir()
        split = {"test": {"sides": sides, "positives": 3, "patients": 5, "sites": ["B"]}}
        (run_dir / "summary.json").write_text(json.dumps({"split": split}))
        runs.append(run_dir)
    with pytest.raises(ValueError, match=r"runs \['swin'\] were made on other splits"):
        benchmark.write_table(runs, tmp_path / "table", "t", 10, 0)


def test_every_shipped_config_passes_the_checks():
    from training.config import CONFIG_DIR, load_config, validate

    from training.train_landmark import validate_landmark

    for path in sorted(CONFIG_DIR.glob("*.yaml")):
        if path.stem.startswith("landmark"):
            validate_landmark(load_config(path.stem))
        elif path.stem != "classifier_base":
            validate(load_config(path.stem, base="classifier_base"), "classifier_base")


def test_resume_from_the_runs_own_config(crops, tiny_net, tmp_path):
    run(crops, tmp_path / "run", "epochs=1")
    train_classifier.main(["--config", str(tmp_path / "run" / "config.yaml"),
                           "--run", str(tmp_path / "run"), "--device", "cpu", "--resume",
                           "--set", "epochs=2"])
    epochs = (tmp_path / "run" / "metrics.csv").read_text().splitlines()[1:]
    assert [line.split(",")[0] for line in epochs] == ["1", "2"]


@pytest.mark.parametrize("device", ["tpu", "banana:0", "mps"]
                         + ([] if torch.cuda.is_available() else ["cuda", "cuda:1"]))
def test_unusable_devices_are_refused_in_one_line(crops, tmp_path, capsys, device):
    err = refused(capsys, crops, tmp_path / "run", "--device", device)
    assert "device must be" in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()


def test_a_run_folder_in_use_is_refused(crops, tmp_path, capsys):
    lock = train_classifier.lock_run_folder(tmp_path / "run")  # as a running training does
    try:
        err = refused(capsys, crops, tmp_path / "run", "epochs=1")
        assert "in use by another training process" in err
        assert not (tmp_path / "run" / "config.yaml").exists()
    finally:
        lock.close()
    train_classifier.lock_run_folder(tmp_path / "run").close()  # free again once released


@pytest.mark.parametrize("text, message", [
    ("epochs: [1\n", "is not readable YAML"),
    ("- 1\n- 2\n", "must be a mapping of keys to values"),
    ("extends: nope_parent\n", "named by 'extends'"),
])
def test_broken_config_files_are_refused(crops, tmp_path, capsys, text, message):
    path = tmp_path / "mine.yaml"
    path.write_text(text)
    with pytest.raises(SystemExit) as exit_info:
        train_classifier.main(["--config", str(path), "--run", str(tmp_path / "run")])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("setting, message", [
    ("data=null", "data must be the folder holding crops.npz"),
    ("augment_translate_voxels=[.inf,0,0]", "augment_translate_voxels must be a list"),
])
def test_more_bad_values_are_refused(crops, tmp_path, capsys, setting, message):
    assert message in refused(capsys, crops, tmp_path / "run", setting)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("damage, message", [
    ("empty", "is not a readable NumPy .npz archive"),
    ("truncated", "is not a readable NumPy .npz archive"),
    ("pickled", "holds Python objects"),
    ("scalar_case_id", "'case_id' must be one value per side"),
    ("implant_text", "implant must be true/false"),
    ("all_implants", "every side in"),
    ("single_array", "is a single array, not a NumPy .npz archive"),
])
def test_unreadable_or_odd_crops_are_refused(crops, tmp_path, capsys, damage, message):
    bad = tmp_path / "bad"
    bad.mkdir()
    raw = (crops / "crops.npz").read_bytes()
    with np.load(crops / "crops.npz") as data:
        n = len(data["label"])
    if damage == "empty":
        (bad / "crops.npz").write_bytes(b"")
    elif damage == "truncated":
        (bad / "crops.npz").write_bytes(raw[: len(raw) // 2])
    elif damage == "pickled":
        rewrite(crops, bad, side=np.array([{"side": "left"}] * n, dtype=object))
    elif damage == "scalar_case_id":
        rewrite(crops, bad, case_id=np.array(3))
    elif damage == "implant_text":
        rewrite(crops, bad, implant=np.array(["no"] * n))
    elif damage == "single_array":
        with open(bad / "crops.npz", "wb") as handle:
            np.save(handle, np.zeros((n, 64, 64, 32), np.uint8))
    else:
        rewrite(crops, bad, implant=np.ones(n, bool))
    err = refused(capsys, bad, tmp_path / "run")
    assert message in err and "Traceback" not in err


def test_a_run_that_is_a_file_is_refused(crops, tmp_path, capsys):
    (tmp_path / "afile").write_text("")
    assert "--run must be a folder" in refused(capsys, crops, tmp_path / "afile")


def test_resume_reads_the_runs_config_and_unfinishes_the_run(crops, tiny_net, tmp_path,
                                                             monkeypatch):
    run(crops, tmp_path / "run", "epochs=1")
    finished = ("summary.json", "predictions.csv", "classifier_densenet121.safetensors")
    assert all((tmp_path / "run" / name).is_file() for name in finished)

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    # No --config and no --set data=...: --resume takes the run's own config.yaml. An
    # interruption before the new finish leaves no output of the earlier, shorter run.
    monkeypatch.setattr(train_classifier, "finish", interrupted)
    with pytest.raises(SystemExit, match=f"continue with: .* --run {tmp_path / 'run'} --resume"):
        train_classifier.main(["--run", str(tmp_path / "run"), "--device", "cpu",
                               "--resume", "--set", "epochs=2"])
    assert not any((tmp_path / "run" / name).exists() for name in finished)
    epochs = (tmp_path / "run" / "metrics.csv").read_text().splitlines()[1:]
    assert [line.split(",")[0] for line in epochs] == ["1", "2"]
    # Finished after all, the run still says how it was first made.
    from tests.test_training import TinyNet

    monkeypatch.undo()  # also undid tiny_net: set it again
    monkeypatch.setattr(train_classifier.registry, "build_classifier", lambda name: TinyNet())
    train_classifier.main(["--run", str(tmp_path / "run"), "--device", "cpu", "--resume"])
    from femurrisk import registry

    meta = registry.read_metadata(tmp_path / "run" / "classifier_densenet121.safetensors")
    assert meta["config"].endswith("densenet121_quick.yaml")
    assert meta["config_overrides"].startswith(f"data={crops} ")
    assert meta["config_overrides"].endswith(" epochs=1 epochs=2")


def test_an_interrupt_before_any_checkpoint_says_to_start_again(crops, tiny_net, tmp_path,
                                                               monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(train_classifier, "train_one_epoch", interrupted)
    with pytest.raises(SystemExit, match="nothing to resume; start the run again"):
        run(crops, tmp_path / "run", "epochs=1")


def _fake_runs(tmp_path: Path, crops: Path, overrides: str = "") -> tuple[Path, Path]:
    """A finished classifier run (tiny training) and a stand-in landmark run."""
    from femurrisk import registry

    classifier = tmp_path / "runs" / "densenet121"
    run(crops, classifier, "epochs=1")
    if overrides:  # as if trained with other --set values
        path = classifier / "classifier_densenet121.safetensors"
        meta = registry.read_metadata(path)
        model = registry.build_classifier("densenet121")
        registry.load_weights(model, path)
        registry.save_weights(model, path, {**meta, "config_overrides": overrides},
                              fp16=False)
    landmark = tmp_path / "landmark"
    registry.save_weights(registry.build_landmark_unet(), landmark / "landmark_unet.safetensors",
                          {"step": "1"}, fp16=False)
    (landmark / "metrics.csv").write_text("step,val_mae_mm\n1,5.0\n")
    (landmark / "config.yaml").write_text(f"data: {tmp_path / 'lm_data'}\n"
                                          "config_file: training/configs/landmark_minimal.yaml\n")
    (tmp_path / "lm_data").mkdir()
    (tmp_path / "lm_data" / "prepare.json").write_text(json.dumps({
        "command": "python -m training.prepare --landmark-only --landmark-studies 9",
        "generator": "multi-site design", "seed": 5}))
    return classifier, landmark


def test_model_card_tells_own_data_from_synthetic_and_names_the_real_commands(
        crops, tiny_net, tmp_path):
    from femurrisk import registry

    classifier, landmark = _fake_runs(tmp_path, crops)
    export.main(["--classifier-run", str(classifier), "--landmark-run", str(landmark),
                 "--assets", str(tmp_path / "assets")])
    card = (tmp_path / "assets" / "MODEL_CARD.md").read_text()
    # The classifier's crops were not made by training.prepare: no synthetic-only claim.
    assert "Trained on synthetic data only" not in card
    assert "Research model. Not validated for clinical use." in card
    assert f"data in `{crops}`, not made by `training.prepare`" in card
    # The landmark's own data and command, not the classifier's.
    meta = registry.read_metadata(tmp_path / "assets" / "landmark_unet.safetensors")
    assert meta["trained_on"].startswith("femurrisk synthetic cohort (multi-site design, seed 5)")
    assert "--landmark-only --landmark-studies 9" in card
    # The classifier command with the --set values it was trained with.
    assert f"--run {classifier} --set data={crops}" in card
    assert "CPU, " in card and "2 cores" not in card


def test_export_refuses_corrupt_weights_and_leaves_no_empty_folder(crops, tiny_net, tmp_path,
                                                                   capsys):
    classifier, landmark = _fake_runs(tmp_path, crops)
    (landmark / "landmark_unet.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(SystemExit) as exit_info:
        export.main(["--classifier-run", str(classifier), "--landmark-run", str(landmark),
                     "--assets", str(tmp_path / "assets")])
    assert exit_info.value.code == 2
    assert "is not a readable safetensors file" in capsys.readouterr().err
    assert not (tmp_path / "assets").exists()


def test_benchmark_table_names_what_the_runs_are(crops, tiny_net, tmp_path, capsys):
    from training import benchmark

    classifier, _ = _fake_runs(tmp_path, crops)
    out = tmp_path / "table" / "bench"
    benchmark.main(["table", "--runs", str(classifier.parent), "--out", str(out),
                    "--models", "densenet121", "--bootstrap", "100"])
    text = out.with_suffix(".md").read_text()
    # Trained with --set overrides: not "the quick preset", and no "run" to reproduce it.
    assert text.startswith(f"# femurrisk benchmark, runs under {classifier.parent}")
    assert "benchmark run --preset" not in text
    for argv, message in (
            (["table", "--models", "vgg"], "invalid choice: 'vgg'"),
            (["table", "--bootstrap", "5"], "--bootstrap must be at least 100"),
            (["run", "--preset", "nonsense"], "--preset must be one with a config per model"),
            (["table", "--preset", "quick"], "--preset is for run"),
            (["table", "--models", "swin"], "no finished runs (summary.json)")):
        with pytest.raises(SystemExit) as exit_info:
            benchmark.main([*argv, "--runs", str(classifier.parent), "--out", str(out)])
        assert exit_info.value.code == 2
        assert message in capsys.readouterr().err


def test_augmented_and_plain_presentations_batch_together_after_monai_data_import():
    """MONAI's collate (registered when monai.data is imported, as the landmark trainer
    does) fails on a batch mixing a MetaTensor with plain tensors: both kinds of
    presentation must be plain tensors."""
    import monai.data  # noqa: F401 - registers MONAI's collate for MetaTensor
    from torch.utils.data import default_collate

    from training.augment import augmented, to_tensor, training_transform
    from training.config import load_config

    volume = np.random.default_rng(0).integers(0, 255, (64, 64, 32), dtype=np.uint8)
    copy = augmented(volume, training_transform(load_config("classifier_base")), 3)
    assert type(copy) is torch.Tensor
    for batch in ([copy, to_tensor(volume)], [to_tensor(volume), copy]):
        assert default_collate(batch).shape == (2, 1, 64, 64, 32)
