"""Left stays left through every way of writing the same scan, end to end.

The real pelvis CT (its LEFT femur carries metal) is written as NIfTI in RAS, LPS and
with permuted axes, and as DICOM head-first supine, feet-first supine and prone. The
full pipeline must give the same per-side probabilities within
:data:`PROBABILITY_TOLERANCE` (absolute) and report the implant on the left each
time. These tests need the trained weights in assets/ and are skipped without them.

Bad inputs through the command line (exit status 2, one line on stderr) use a stand-in
predictor that only reads the input, so they run without weights; the "no pelvis"
cases need the real models.
"""

from __future__ import annotations

import logging
import zipfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from pydicom.uid import MPEG2MPML, RLELossless

from femurrisk import cli, registry
from femurrisk.errors import InputError
from femurrisk.loading import load_ct
from femurrisk.preprocessing import to_canonical
from test_dicom_real import FFS, HFP, HFS, PELVIS, pelvis_series
from test_loading import DATA, SECRET, write_series

#: Largest difference in a side's probability between two writings of one scan.
#: Axis flips and permutations are exact; only the DICOM int16 rounding and the
#: order of floating-point sums differ, so the models see (nearly) the same input.
PROBABILITY_TOLERANCE = 0.02

HAVE_WEIGHTS = (
    registry.landmark_weights_path().exists()
    and registry.classifier_weights_path().exists()
)
needs_weights = pytest.mark.skipif(not HAVE_WEIGHTS, reason="trained weights absent")
needs_data = pytest.mark.skipif(not PELVIS.exists(), reason="shared test data absent")


# --- the same scan written six ways ---------------------------------------------------


@pytest.fixture(scope="module")
def pelvis() -> nib.Nifti1Image:
    return to_canonical(load_ct(PELVIS).image)


def _nifti(image: nib.Nifti1Image, path: Path, order: tuple, flips: tuple) -> Path:
    """Save ``image`` with its axes permuted by ``order`` and flipped where asked."""
    data = np.asarray(image.dataobj)
    affine = image.affine.copy()
    for axis, flip in enumerate(flips):
        if flip:
            data = np.flip(data, axis)
            affine = affine @ nib.affines.from_matvec(
                np.diag([-1 if a == axis else 1 for a in range(3)]),
                [image.shape[axis] - 1 if a == axis else 0 for a in range(3)],
            )
    data = np.transpose(data, order)
    affine = affine @ nib.affines.from_matvec(np.eye(3)[:, list(order)])
    out = nib.Nifti1Image(data.astype(np.int16), affine)
    out.set_sform(affine, code=1)
    out.set_qform(affine, code=1)
    nib.save(out, path)
    return path


WRITERS = {
    "nifti-RAS": lambda img, tmp: _nifti(img, tmp / "v.nii.gz", (0, 1, 2), (0, 0, 0)),
    "nifti-LPS": lambda img, tmp: _nifti(img, tmp / "v.nii.gz", (0, 1, 2), (1, 1, 0)),
    "nifti-permuted": lambda img, tmp: _nifti(img, tmp / "v.nii", (2, 0, 1), (1, 0, 1)),
    "dicom-HFS": lambda img, tmp: pelvis_series(img, tmp / "d", HFS)[0].parent,
    "dicom-FFS": lambda img, tmp: pelvis_series(img, tmp / "d", FFS)[0].parent,
    "dicom-prone": lambda img, tmp: pelvis_series(img, tmp / "d", HFP)[0].parent,
}


@pytest.mark.parametrize("name", sorted(WRITERS))
@needs_data
def test_every_writing_reads_back_to_the_same_canonical_volume(tmp_path, pelvis, name):
    """Cheap guard that runs without weights: the inputs the models would see."""
    image = to_canonical(load_ct(WRITERS[name](pelvis, tmp_path)).image)
    np.testing.assert_allclose(image.affine, pelvis.affine, atol=1e-3)
    np.testing.assert_array_equal(np.asarray(image.dataobj), np.asarray(pelvis.dataobj))


@pytest.fixture(scope="module")
def predictor():
    from femurrisk.pipeline import Predictor

    return Predictor(device="cpu")


@pytest.fixture(scope="module")
def predictions(predictor, pelvis, tmp_path_factory) -> dict:
    results = {}
    for name, write in WRITERS.items():
        folder = tmp_path_factory.mktemp(name)
        results[name] = predictor.predict(write(pelvis, folder))
    return results


@needs_weights
@needs_data
@pytest.mark.parametrize("name", sorted(set(WRITERS) - {"nifti-RAS"}))
def test_same_per_side_result_whatever_the_writing(predictions, name):
    reference, result = predictions["nifti-RAS"], predictions[name]
    for side in ("left", "right"):
        expected, found = reference.sides[side], result.sides[side]
        assert found.probability == pytest.approx(
            expected.probability, abs=PROBABILITY_TOLERANCE
        ), side
        assert found.decision == expected.decision, side
        assert found.implant_detected == expected.implant_detected, side
    assert result.sides["left"].implant_detected  # the real scan's left femur
    assert not result.sides["right"].implant_detected
    heads = result.landmarks.femoral_head_world_mm
    assert heads["left"][0] < 0 < heads["right"][0]


@needs_weights
@needs_data
@pytest.mark.parametrize(
    "source", ["ct/upper_abdomen_ct_3mm.nii.gz", "ct/upper_abdomen_dicom_j2k"]
)
def test_no_pelvis_in_the_field_of_view(predictor, source, monkeypatch, capsys):
    with pytest.raises(InputError, match="pelvis"):
        predictor.predict(DATA / source)
    monkeypatch.setattr("femurrisk.pipeline.Predictor", lambda **kwargs: predictor)
    status = cli.main(["predict", str(DATA / source), "--out", "/nonexistent"])
    assert status == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1


# --- bad input through the command line -----------------------------------------------


class _ReadOnlyPredictor:
    """Stands in for the pipeline: reads the input, as the real one does first."""

    def __init__(self, **kwargs) -> None:
        pass

    def predict(self, source, **kwargs):
        load_ct(source)
        raise AssertionError("a bad input was read without an error")


def _bad_inputs(tmp: Path) -> dict[str, Path]:
    png = tmp / f"{SECRET}.png"
    png.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(100))
    zipfile.ZipFile(tmp / "empty.zip", "w").close()
    broken = tmp / "broken.nii.gz"
    broken.write_bytes(b"\x1f\x8b\x08 truncated")
    few = write_series(tmp / "few", count=1)[0]
    mpeg = tmp / "mpeg"
    write_series(mpeg, count=3)
    for path in mpeg.iterdir():
        ds = pydicom.dcmread(path)
        ds.compress(RLELossless)
        ds.file_meta.TransferSyntaxUID = MPEG2MPML
        ds.save_as(path)
    truncated = tmp / "truncated"
    paths = write_series(truncated, count=4)
    paths[1].write_bytes(paths[1].read_bytes()[:3000])
    return {
        "not a CT": png,
        "empty zip": tmp / "empty.zip",
        "corrupt NIfTI": broken,
        "single 2D image": few,
        "unsupported compression": mpeg,
        "truncated slice": truncated,
    }


def test_cli_bad_inputs_exit_2_with_one_line(tmp_path, monkeypatch, capsys, caplog):
    monkeypatch.setattr("femurrisk.pipeline.Predictor", _ReadOnlyPredictor)
    caplog.set_level(logging.DEBUG)
    for case, path in _bad_inputs(tmp_path).items():
        status = cli.main(["predict", str(path), "--out", str(tmp_path / "out")])
        err = capsys.readouterr().err
        lines = err.strip().splitlines()
        assert status == 2, (case, err)
        assert len(lines) == 1 and lines[0].startswith("error: "), (case, err)
        assert SECRET not in err and str(tmp_path) not in err, case
    assert SECRET not in caplog.text and str(tmp_path) not in caplog.text


def test_no_identifier_or_file_name_in_logs(tmp_path, caplog):
    caplog.set_level(logging.DEBUG, logger="femurrisk")
    paths = write_series(tmp_path / "s", count=10, PatientBirthDate="19500101",
                         AccessionNumber="ACC" + SECRET)
    paths[3].write_bytes(b"junk")  # a non-DICOM file among them
    loaded = load_ct(tmp_path / "s")
    text = caplog.text + loaded.description + " ".join(loaded.warnings)
    for secret in (SECRET, "19500101", str(tmp_path)):
        assert secret not in text
