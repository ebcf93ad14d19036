"""Tests of app.py: building the UI without launching it, and the login rules."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import app  # noqa: E402
from femurrisk.errors import InputError  # noqa: E402
from femurrisk.geometry import CROP_SHAPE  # noqa: E402
from femurrisk.prediction import (  # noqa: E402
    DECISION_IMPLANT,
    DECISION_LOW,
    Landmarks,
    Prediction,
    SideResult,
)


def fake_prediction(seed: int = 0) -> Prediction:
    """A Prediction with synthetic crops, in the shape the pipeline returns."""
    rng = np.random.default_rng(seed)
    sides = {}
    for side, probability in (("left", 0.12), ("right", 0.81)):
        affine = np.diag([2.0, 2.0, 3.0, 1.0])
        affine[:3, 3] = (-70.0 if side == "left" else 6.0, -60.0, -93.0)
        implant = side == "right"
        sides[side] = SideResult(
            side=side, probability=probability,
            decision=DECISION_IMPLANT if implant else DECISION_LOW, scored=not implant,
            implant_detected=implant, metal_volume_mm3=850.0 if implant else 0.0,
            padded_slices=0,
            crop_hu=rng.normal(300, 400, CROP_SHAPE).astype(np.float32),
            crop_affine=affine,
            network_input=rng.integers(0, 255, CROP_SHAPE).astype(np.float32),
            heatmap=rng.random(CROP_SHAPE).astype(np.float32),
        )
    landmarks = Landmarks(
        world_z_mm=0.0, slice_index=40,
        aiis_world_mm={"left": (-50.0, 20.0, 0.0), "right": None},
        femoral_head_world_mm={"left": (-90.0, 0.0, -30.0),
                               "right": (90.0, 0.0, -30.0)},
    )
    return Prediction(
        sides=sides, landmarks=landmarks, threshold=0.5,
        input_description="synthetic", input_kind="nifti", input_shape=(10, 10, 10),
        input_spacing_mm=(3.0, 3.0, 3.0), model={"research_demo": True},
        warnings=["a synthetic warning"],
    )


class FakePredictor:
    """Stands in for femurrisk.pipeline.Predictor; refuses sources named 'bad'."""

    def __init__(self):
        self.sources = []
        self.calls = []

    def predict(self, source, *, landmark_z_mm=None, progress=None, method="gradcam"):
        self.sources.append(source)
        self.calls.append({"landmark_z_mm": landmark_z_mm, "method": method})
        if progress is not None:
            progress(0.5, "halfway")
        if "bad" in str(source):
            raise InputError("no pelvis found: the scan must include both hips")
        if "crash" in str(source):
            leaked = "/secret/" + "patient_name.dcm exploded"  # not on the raise line
            raise RuntimeError(leaked)
        prediction = fake_prediction()
        if landmark_z_mm is not None:
            prediction.landmarks.world_z_mm = float(landmark_z_mm)
            prediction.landmarks.method = "manual"
            prediction.warnings.append("The landmark slice was set manually.")
        return prediction


# --- build_demo -------------------------------------------------------------------


def test_build_demo_does_not_launch():
    demo = app.build_demo(FakePredictor())
    assert demo.analytics_enabled is False
    assert not getattr(demo, "is_running", False)


def test_building_the_app_loads_neither_torch_nor_models():
    code = ("import sys, app; app.build_demo(); "
            "print('torch' in sys.modules, 'femurrisk.pipeline' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                         text=True, timeout=120, check=True)
    assert out.stdout.split() == ["False", "False"]


def test_analytics_are_off_before_gradio_is_used():
    assert os.environ["GRADIO_ANALYTICS_ENABLED"] == "False"


def test_demo_preselects_the_bundled_example():
    demo = app.build_demo(FakePredictor())
    example = next(b for b in demo.blocks.values() if b.elem_id == "examples")
    files = next(b for b in demo.blocks.values() if b.elem_id == "ct-files")
    assert app.BUNDLED_EXAMPLE.is_file()
    assert example.value == "Pelvis CT, 3 mm (bundled example)"
    assert not files.value  # uploads start empty, so they never mix with the example


def test_an_upload_is_used_alone_never_with_the_example():
    cases = app.example_cases()
    label = next(iter(cases))
    assert app.choose_source(None, None, label, cases) == str(app.BUNDLED_EXAMPLE)
    upload = ["/tmp/upload/scan.nii.gz"]
    assert app.choose_source(upload, None, label, cases) == upload[0]
    folder = ["/tmp/dir/a", "/tmp/dir/b"]
    assert app.choose_source(upload, folder, label, cases) == folder
    with pytest.raises(app.gr.Error):
        app.choose_source(None, None, None, cases)


def test_example_cases_lists_shared_scans_only_when_present(tmp_path):
    assert list(app.example_cases(tmp_path)) == ["Pelvis CT, 3 mm (bundled example)"]
    (tmp_path / "ct" / "upper_abdomen_dicom_j2k").mkdir(parents=True)
    (tmp_path / "ct" / "upper_abdomen_dicom_j2k" / "IM1").write_bytes(b"x")
    (tmp_path / "ct" / "upper_abdomen_ct_3mm.nii.gz").write_bytes(b"x")
    cases = app.example_cases(tmp_path)
    assert len(cases) == 3
    assert all(Path(p).exists() for paths in cases.values() for p in paths)


# --- handlers through the Blocks' own functions ------------------------------------


def _fn(demo, name):
    return next(f.fn for f in demo.fns.values() if f.name == name)


def _predict_fn(demo):
    fn = _fn(demo, "predict")

    def call(files, folder, opacity=0.4, *, example=None, method="gradcam",
             threshold=0.0, plane="axial", progress=None):
        return fn(files, folder, example, method, opacity, threshold, plane,
                  progress=progress or (lambda *a, **k: None))

    return call


def test_predict_handler_fills_both_sides_and_writes_the_report():
    predictor = FakePredictor()
    outputs = _predict_fn(app.build_demo(predictor))(
        ["scan.nii.gz"], None, 0.4, progress=lambda *a, **k: None
    )
    (landmark_md, right_md, right_fig, left_md, left_fig, fig_3d, warn_md, download,
     state, landmark_z) = outputs
    assert predictor.sources == ["scan.nii.gz"]
    assert DECISION_IMPLANT in right_md
    assert "%" not in right_md  # no number beside an implant: it reads as a risk
    assert "12.0 %" in left_md and DECISION_LOW in left_md
    assert "right AIIS was not found" in landmark_md
    assert "a synthetic warning" in warn_md
    assert right_fig.layout.meta["side"] == "right"
    assert left_fig.layout.meta["side"] == "left"
    report = json.loads(Path(download.value["path"]).read_text())
    assert "schema_version" in report
    assert set(state["views"]) == {"left", "right"}
    assert fig_3d.layout.meta["view"] == "3d"
    assert landmark_z == 0.0


def test_predict_handler_prefers_the_folder_and_passes_lists():
    predictor = FakePredictor()
    fn = _predict_fn(app.build_demo(predictor))
    fn(["a.nii.gz"], ["d/1.dcm", "d/2.dcm"], 0.4, progress=lambda *a, **k: None)
    assert predictor.sources == [["d/1.dcm", "d/2.dcm"]]


def test_input_errors_reach_the_user_verbatim():
    import gradio as gr

    fn = _predict_fn(app.build_demo(FakePredictor()))
    with pytest.raises(gr.Error, match="no pelvis found"):
        fn(["bad.nii.gz"], None, 0.4, progress=lambda *a, **k: None)


def test_unexpected_errors_are_generic_and_not_logged_with_their_message(caplog):
    import gradio as gr

    fn = _predict_fn(app.build_demo(FakePredictor()))
    with pytest.raises(gr.Error) as info:
        fn(["crash.nii.gz"], None, 0.4, progress=lambda *a, **k: None)
    assert "patient_name" not in info.value.message
    assert "RuntimeError" in caplog.text
    assert "patient_name" not in caplog.text and "crash.nii.gz" not in caplog.text


def test_missing_upload_asks_for_one():
    import gradio as gr

    fn = _predict_fn(app.build_demo(FakePredictor()))
    with pytest.raises(gr.Error, match="Upload a CT"):
        fn(None, None, 0.4, progress=lambda *a, **k: None)


# --- login rules --------------------------------------------------------------------


@pytest.mark.parametrize("host",
                         ["127.0.0.1", "127.0.0.2", "localhost", "::1", "[::1]"])
def test_loopback_hosts(host):
    assert app.is_loopback(host)


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.168.1.20", "example.org", ""])
def test_other_hosts_are_not_loopback(host):
    assert not app.is_loopback(host)


def test_loopback_needs_no_login():
    assert app.resolve_auth("127.0.0.1", share=False, env={}) is None


@pytest.mark.parametrize("host,share", [("0.0.0.0", False), ("10.0.0.5", False),
                                        ("127.0.0.1", True)])
def test_exposed_server_without_credentials_refuses(host, share):
    with pytest.raises(app.LaunchConfigError, match="login is required"):
        app.resolve_auth(host, share=share, env={})


def test_credentials_from_environment():
    env = {app.ENV_USERNAME: "ops", app.ENV_PASSWORD: "s3cret-long"}
    assert app.resolve_auth("0.0.0.0", share=False, env=env) == [("ops", "s3cret-long")]


def test_half_set_credentials_refuse():
    with pytest.raises(app.LaunchConfigError, match="together"):
        app.resolve_auth("0.0.0.0", share=False, env={app.ENV_USERNAME: "ops"})


def test_credentials_from_file(tmp_path):
    auth = tmp_path / "auth"
    auth.write_text("# operators\nalice:pa:ss\n\nbob:x\n")
    auth.chmod(stat.S_IRUSR | stat.S_IWUSR)
    env = {app.ENV_AUTH_FILE: str(auth)}
    assert app.resolve_auth("0.0.0.0", True, env) == [("alice", "pa:ss"), ("bob", "x")]


@pytest.mark.parametrize("content", ["alice\n", "alice:\n", ":pw\n"])
def test_malformed_auth_file_refuses(tmp_path, content):
    auth = tmp_path / "auth"
    auth.write_text(content)
    with pytest.raises(app.LaunchConfigError, match="line 1"):
        app.resolve_auth("0.0.0.0", False, {app.ENV_AUTH_FILE: str(auth)})


def test_missing_auth_file_refuses(tmp_path):
    with pytest.raises(app.LaunchConfigError, match="cannot be read"):
        app.read_credentials({app.ENV_AUTH_FILE: str(tmp_path / "nope")})


def test_main_refuses_to_start_exposed_without_credentials(monkeypatch, capsys):
    for name in (app.ENV_USERNAME, app.ENV_PASSWORD, app.ENV_AUTH_FILE):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(app, "launch", lambda *a, **k: pytest.fail("launched"))
    assert app.main(["--host", "0.0.0.0"]) == 2
    assert "login is required" in capsys.readouterr().err
    assert app.main(["--share"]) == 2


def test_main_warns_about_share(monkeypatch, capsys):
    monkeypatch.setenv(app.ENV_USERNAME, "ops")
    monkeypatch.setenv(app.ENV_PASSWORD, "long-password")
    launched = {}
    monkeypatch.setattr(app, "_load_predictor", lambda device: "predictor")
    monkeypatch.setattr(app, "build_demo", lambda predictor, **k: "demo")
    monkeypatch.setattr(app, "launch", lambda demo, **k: launched.update(k))
    assert app.main(["--share"]) == 0
    assert launched["share"] is True and launched["auth"] == [("ops", "long-password")]
    assert "outside relay" in capsys.readouterr().err


# --- viewers: plane switch, threshold, hand-set landmark ---------------------------


def _predicted(predictor=None):
    predictor = predictor or FakePredictor()
    demo = app.build_demo(predictor)
    outputs = _predict_fn(demo)(["scan.nii.gz"], None, 0.4)
    return demo, predictor, outputs


def test_plane_switch_keeps_the_point_the_sliders_were_on():
    demo, _, outputs = _predicted()
    state = outputs[8]
    cursor = json.dumps({"left": {"x": -20.0, "y": -10.0, "z": -30.0}})
    right_fig, left_fig = _fn(demo, "redraw_planes")("coronal", 0.4, 0.0, cursor, state)
    assert right_fig.layout.meta["plane"] == left_fig.layout.meta["plane"] == "coronal"
    meta = left_fig.layout.meta
    assert meta["cursor"]["z"] == -30.0
    assert meta["positions_mm"][left_fig.layout.sliders[0].active] == pytest.approx(
        -10.0, abs=1.0)
    assert _fn(demo, "redraw_planes")("axial", 0.4, 0.0, "", None) == (
        app.gr.skip(), app.gr.skip())


def test_threshold_redraws_2d_and_3d():
    demo, _, outputs = _predicted()
    right_fig, left_fig, fig_3d = _fn(demo, "redraw_all")("axial", 0.4, 0.6, "{}",
                                                          outputs[8])
    heat = [t for t in left_fig.data if t.meta == "heat"]
    values = np.concatenate([np.asarray(t.z).ravel() for t in heat])
    assert values[values > 0].min() >= 0.6 * 255 - 1
    assert fig_3d.layout.meta["view"] == "3d"


@pytest.mark.parametrize("text", [None, "", "not json", "[1, 2]",
                                  '{"left": {"x": "a"}}', '{"left": 3}'])
def test_malformed_cursor_is_ignored(text):
    assert app._parse_cursor(text) == {}


def test_rerun_with_a_hand_set_landmark_says_so():
    demo, predictor, outputs = _predicted()
    rerun = _fn(demo, "rerun")
    again = rerun(-12.5, "guided_gradcam", 0.4, 0.0, "axial", outputs[8],
                  progress=lambda *a, **k: None)
    assert predictor.sources == ["scan.nii.gz", "scan.nii.gz"]
    assert predictor.calls[-1] == {"landmark_z_mm": -12.5, "method": "guided_gradcam"}
    landmark_md, warn_md, left_fig, landmark_z = again[0], again[6], again[4], again[9]
    assert "set by hand" in landmark_md and "set manually" in warn_md
    assert left_fig.layout.meta["landmark_method"] == "manual"
    assert landmark_z == -12.5
    assert "Guided Grad-CAM" in left_fig.data[-1].colorbar.title.text


def test_rerun_needs_a_prediction_and_a_level():
    import gradio as gr

    demo, _, outputs = _predicted()
    rerun = _fn(demo, "rerun")
    with pytest.raises(gr.Error, match="Predict first"):
        rerun(10.0, "gradcam", 0.4, 0.0, "axial", None, progress=lambda *a, **k: None)
    with pytest.raises(gr.Error, match="AIIS level"):
        rerun(None, "gradcam", 0.4, 0.0, "axial", outputs[8],
              progress=lambda *a, **k: None)
