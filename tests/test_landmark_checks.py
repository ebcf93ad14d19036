"""Mistakes in landmark training are refused before anything is written, with one
message line that names what is wrong; a finished run moves its weights into place
only at the end."""

from __future__ import annotations

import runpy
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest

from training import train_landmark
from training.train_classifier import lock_run_folder

SHAPE = (20, 20, 16)  # (x, y, z) voxels of the landmark grid, 6 x 6 x 4 mm


def make_samples(folder: Path, count: int = 3, seed: int = 0) -> Path:
    """``count`` tiny landmark samples as training.prepare writes them.

    Each has two femoral heads (label 2) and two AIIS (label 1) as small bright
    blocks on a noisy background; ``landmark_z_mm`` is the AIIS level.
    """
    rng = np.random.default_rng(seed)
    affine = np.diag([6.0, 6.0, 4.0, 1.0])
    (folder / "landmark").mkdir(parents=True, exist_ok=True)
    for study in range(count):
        image = (0.2 * rng.random(SHAPE)).astype(np.float16)
        labels = np.zeros(SHAPE, np.uint8)
        z_aiis = int(rng.integers(9, 12))
        for x in (5, 14):
            labels[x - 1:x + 2, 9:12, 3:6] = 2
            labels[x - 1:x + 1, 12:14, z_aiis:z_aiis + 2] = 1
        image[labels > 0] = 0.9
        np.savez_compressed(folder / "landmark" / f"{study:06d}.npz", image=image,
                            labels=labels, affine=affine,
                            landmark_z_mm=np.float64(4.0 * (z_aiis + 0.5)))
    return folder


@pytest.fixture(scope="module")
def samples(tmp_path_factory) -> Path:
    return make_samples(tmp_path_factory.mktemp("data"))


def arguments(data: Path, run_dir: Path, *settings: str) -> list[str]:
    return ["--run", str(run_dir), "--device", "cpu", "--set", f"data={data}",
            "val_cases=1", "iterations=2", "validate_every=1", *settings]


def refused(capsys, argv: list[str]) -> str:
    """The one ``error:`` line of a refused call (exit code 2)."""
    with pytest.raises(SystemExit) as exit_info:
        train_landmark.main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return [line for line in err.splitlines() if "error:" in line][0]


@pytest.mark.parametrize("setting, message", [
    ("iterationz=5", "unknown config keys ['iterationz']; known keys are those of "
                     "training/configs/landmark_minimal.yaml ('iterationz': did you mean "
                     "'iterations'?)"),
    ("iterations=0", "iterations must be a whole number >= 1, got 0"),
    ("batch_size=0", "batch_size must be a whole number >= 1, got 0"),
    ("samples_per_volume=1.5", "samples_per_volume must be a whole number >= 1, got 1.5"),
    ("validate_every=-1", "validate_every must be a whole number >= 1, got -1"),
    ("val_cases=0", "val_cases must be a whole number >= 1, got 0"),
    ("positive_ratio=true", "positive_ratio must be a whole number >= 1, got True"),
    ("learning_rate=0", "learning_rate must be a number in (0, 1], got 0"),
    ("learning_rate=1e-3", "learning_rate must be a number in (0, 1], got '1e-3'"),
    ("weight_decay=-0.1", "weight_decay must be a number in [0, 1], got -0.1"),
    ("weight_decay=1" + "0" * 400, "weight_decay must be a number in [0, 1], got 1000"),
    ("class_weights=[1, 2]", "class_weights must be a list of three finite numbers >= 0"),
    ("class_weights=[1, .nan, 2]", "class_weights must be a list of three finite"),
    ("class_weights=[0, 0, 0]", "not all 0"),
    ("seed=abc", "seed must be a whole number >= 0, got 'abc'"),
    ("seed=-1", "seed must be a whole number >= 0, got -1"),
    ("data=null", "data must be the path of a training.prepare output folder"),
    ("iterations=[1,", "not valid YAML"),
    ("iterations", "override must be key=value"),
])
def test_bad_config_values_are_refused_before_writing(samples, tmp_path, capsys, setting,
                                                      message):
    assert message in refused(capsys, arguments(samples, tmp_path / "run", setting))
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("config, message", [
    ("densenet121_minimal", "landmark_minimal.yaml (is --config a landmark config?)"),
    ("nonexistent", "no config 'nonexistent'"),
    ("list.yaml", "must be a mapping of keys to values"),
    ("partial.yaml", "config keys ['batch_size', 'class_weights'"),
])
def test_configs_that_are_not_landmark_configs_are_refused(samples, tmp_path, capsys,
                                                           config, message):
    (tmp_path / "list.yaml").write_text("- iterations\n- 5\n")
    (tmp_path / "partial.yaml").write_text("data: data/landmark\nseed: 0\n")
    path = tmp_path / config if config.endswith(".yaml") else config
    argv = ["--config", str(path), "--run", str(tmp_path / "run")]
    assert message in refused(capsys, argv)
    assert not (tmp_path / "run").exists()


def write_bad(folder: Path, how: str) -> None:
    target = folder / "landmark" / "000001.npz"
    if how == "text":
        target.write_text("not an npz")
        return
    with np.load(target) as data:
        arrays = {k: data[k] for k in data.files}
    if how == "no labels":
        del arrays["labels"]
    elif how == "shape":
        arrays["labels"] = arrays["labels"][:, :, :8]
    elif how == "label 7":
        arrays["labels"][0, 0, 0] = 7
    elif how == "nan":
        arrays["image"][0, 0, 0] = np.nan
    np.savez(target, **arrays)


@pytest.mark.parametrize("how, message", [
    ("text", "landmark sample 000001.npz cannot be read"),
    ("no labels", "landmark sample 000001.npz has no ['labels'] array"),
    ("shape", "landmark sample 000001.npz holds arrays of other shapes"),
    ("label 7", "labels outside 0-2"),
    ("nan", "non-finite numbers"),
])
def test_unreadable_samples_are_refused_by_file_name(tmp_path, capsys, how, message):
    data = make_samples(tmp_path / "data")
    write_bad(data, how)
    line = refused(capsys, arguments(data, tmp_path / "run"))
    assert message in line
    assert str(tmp_path) not in line.split("; expected")[0]  # the base name only
    assert not (tmp_path / "run").exists()


def test_missing_or_too_few_samples_say_how_to_make_them(samples, tmp_path, capsys):
    line = refused(capsys, arguments(tmp_path / "nowhere", tmp_path / "run"))
    assert f"no landmark samples (*.npz) in {tmp_path / 'nowhere' / 'landmark'}" in line
    assert ("python -m training.prepare --landmark-only --landmark-studies N --out "
            f"{tmp_path / 'nowhere'}") in line
    one = make_samples(tmp_path / "one", count=1)
    assert "needs at least 2 landmark samples" in refused(
        capsys, arguments(one, tmp_path / "run"))
    line = refused(capsys, arguments(samples, tmp_path / "run", "val_cases=3"))
    assert "val_cases must be between 1 and 2 for the 3 landmark samples" in line
    assert not (tmp_path / "run").exists()


def test_run_folder_that_is_a_file_or_holds_a_run_is_refused(samples, tmp_path, capsys):
    (tmp_path / "file").write_text("")
    assert "--run must be a folder" in refused(capsys, arguments(samples, tmp_path / "file"))
    assert "--run must be a folder" in refused(
        capsys, arguments(samples, tmp_path / "file" / "run"))
    finished = tmp_path / "finished"
    finished.mkdir()
    for name in ("landmark_unet.safetensors", "metrics.csv"):
        (finished / name).write_text("kept")
    line = refused(capsys, arguments(samples, finished))
    assert "already holds a finished landmark run" in line
    assert "choose another --run folder" in line
    classifier = tmp_path / "classifier"
    classifier.mkdir()
    (classifier / "checkpoint_last.safetensors").write_text("kept")
    assert "holds a classifier run" in refused(capsys, arguments(samples, classifier))
    assert sorted(p.name for p in finished.iterdir()) == [
        "landmark_unet.safetensors", "metrics.csv"]
    assert (finished / "metrics.csv").read_text() == "kept"
    assert not (classifier / "config.yaml").exists()


def test_a_run_folder_in_use_is_refused(samples, tmp_path, capsys):
    lock = lock_run_folder(tmp_path / "run")
    try:
        line = refused(capsys, arguments(samples, tmp_path / "run"))
    finally:
        lock.close()
    assert "is in use by another training process" in line
    assert not (tmp_path / "run" / "config.yaml").exists()


def test_unknown_device_is_refused(samples, tmp_path, capsys):
    argv = arguments(samples, tmp_path / "run") + ["--device", "tpu"]
    assert "device must be cpu, cuda or cuda:N, not 'tpu'" in refused(capsys, argv)
    assert not (tmp_path / "run").exists()


def test_ctrl_c_ends_with_one_line(samples, tmp_path, monkeypatch):
    def interrupt(run_dir: Path):
        raise KeyboardInterrupt

    # The module runs afresh as __main__ and imports the lock from here.
    monkeypatch.setattr("training.train_classifier.lock_run_folder", interrupt)
    monkeypatch.setattr(sys, "argv", ["train_landmark", *arguments(samples, tmp_path / "r")])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # runpy: already imported
        with pytest.raises(SystemExit) as exit_info:
            runpy.run_module("training.train_landmark", run_name="__main__")
    assert exit_info.value.code == ("interrupted; the run folder holds no finished model, "
                                    "start it again")


def test_a_tiny_run_finishes_with_its_weights_in_place(samples, tmp_path):
    """Also from the folder of an interrupted run, which is started again."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "landmark_unet.partial.safetensors").write_text("interrupted")
    (run_dir / "metrics.csv").write_text("interrupted")
    train_landmark.main(arguments(samples, run_dir))
    assert (run_dir / "landmark_unet.safetensors").is_file()
    assert not (run_dir / "landmark_unet.partial.safetensors").exists()
    assert (run_dir / "config.yaml").is_file()
    rows = (run_dir / "metrics.csv").read_text().splitlines()
    assert rows[0].startswith("step,loss") and len(rows) == 3  # header and steps 1, 2
