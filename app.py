"""femurrisk web app: upload an abdominopelvic CT, get a per-side fracture risk.

Research demo trained on synthetic data; not for clinical use.

Run ``python app.py`` for a local app on http://127.0.0.1:7860. Binding to any
other address, or ``--share``, needs a login that the operator sets through
FEMURRISK_USERNAME / FEMURRISK_PASSWORD or a file named by FEMURRISK_AUTH_FILE.
Tests import :func:`build_demo` without launching anything.
"""

from __future__ import annotations

import os

# Before gradio is imported: no usage statistics, no version check, no hub telemetry.
os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"

import argparse  # noqa: E402
import ipaddress  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import shutil  # noqa: E402
import stat  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
import uuid  # noqa: E402
from collections.abc import Mapping  # noqa: E402
from pathlib import Path  # noqa: E402

import gradio as gr  # noqa: E402
import numpy as np  # noqa: E402

from femurrisk import viewers  # noqa: E402
from femurrisk.errors import InputError  # noqa: E402

logger = logging.getLogger("femurrisk.app")

ROOT = Path(__file__).resolve().parent
EXAMPLES_DIR = ROOT / "assets" / "examples"
BUNDLED_EXAMPLE = EXAMPLES_DIR / "pelvis_ct_3mm.nii.gz"
SHARED_DATA = ROOT.parent / "shared" / "data"

#: Reports and uploads older than this are deleted, seconds.
CACHE_MAX_AGE_S = 3600

ENV_USERNAME = "FEMURRISK_USERNAME"
ENV_PASSWORD = "FEMURRISK_PASSWORD"
ENV_AUTH_FILE = "FEMURRISK_AUTH_FILE"

BANNER = """
<div style="border:2px solid #c62828;border-radius:8px;padding:10px 14px;
background:#fdecea;color:#5f1111">
<strong>Research demo — not for clinical use.</strong> The model was trained on
<strong>synthetic data only</strong>. Its probabilities have not been validated on
patients and must not inform any diagnosis or treatment.
</div>
"""

GENERIC_ERROR = (
    "The prediction failed for a reason the app did not expect. The error was logged "
    "on the server; please try another scan or contact the operator."
)


class LaunchConfigError(RuntimeError):
    """The requested way of serving the app is not allowed as configured."""


# --- Launch rules --------------------------------------------------------------------


def is_loopback(host: str) -> bool:
    """Whether ``host`` only accepts connections from this machine.

    Args:
        host: The address the server binds to, e.g. ``"127.0.0.1"`` or ``"0.0.0.0"``.

    Returns:
        True for ``localhost`` and loopback IP addresses (127.0.0.0/8, ::1).
    """
    if host.strip().lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name other than localhost may resolve anywhere


def read_credentials(env: Mapping[str, str]) -> list[tuple[str, str]]:
    """Logins the operator configured, from the environment or an auth file.

    The auth file holds one ``username:password`` per line; blank lines and lines
    starting with ``#`` are ignored.

    Args:
        env: Environment variables (normally ``os.environ``).

    Returns:
        The (username, password) pairs; empty when none are configured.

    Raises:
        LaunchConfigError: If the variables are half set, a password is empty, or
            the auth file cannot be read or holds a malformed line.
    """
    pairs: list[tuple[str, str]] = []
    user, password = env.get(ENV_USERNAME, ""), env.get(ENV_PASSWORD, "")
    if bool(user) != bool(password):
        raise LaunchConfigError(
            f"{ENV_USERNAME} and {ENV_PASSWORD} must be set together, not one alone"
        )
    if user:
        pairs.append((user, password))

    auth_file = env.get(ENV_AUTH_FILE, "")
    if auth_file:
        pairs.extend(_read_auth_file(Path(auth_file)))
    return pairs


def _read_auth_file(path: Path) -> list[tuple[str, str]]:
    try:
        text = path.read_text(encoding="utf-8")
        mode = path.stat().st_mode
    except OSError as exc:
        raise LaunchConfigError(
            f"{ENV_AUTH_FILE} cannot be read: {exc.strerror}"
        ) from None
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        logger.warning("%s is readable by other users; chmod 600 it", ENV_AUTH_FILE)

    pairs = []
    for number, line in enumerate(text.splitlines(), start=1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        user, sep, password = line.partition(":")
        if not sep or not user.strip() or not password:
            raise LaunchConfigError(
                f"{ENV_AUTH_FILE} line {number} must be 'username:password' with "
                "both parts non-empty"
            )
        pairs.append((user.strip(), password))
    return pairs


def resolve_auth(
    host: str, share: bool, env: Mapping[str, str] | None = None
) -> list[tuple[str, str]] | None:
    """The login the server must ask for, refusing exposed servers without one.

    Args:
        host: Address the server binds to.
        share: Whether a Gradio share link was requested.
        env: Environment variables; ``os.environ`` when None.

    Returns:
        The logins to require, or None for a loopback server with none configured.

    Raises:
        LaunchConfigError: If the server is reachable from other machines (a
            non-loopback bind or a share link) and no login is configured, or the
            configuration is malformed.
    """
    pairs = read_credentials(os.environ if env is None else env)
    if pairs:
        return pairs
    if share or not is_loopback(host):
        reason = "--share" if share else f"binding to {host}"
        raise LaunchConfigError(
            f"{reason} exposes the app beyond this machine, so a login is required: "
            f"set {ENV_USERNAME} and {ENV_PASSWORD}, or {ENV_AUTH_FILE} naming a file "
            "of 'username:password' lines. There is no default password."
        )
    return None


# --- Examples -------------------------------------------------------------------------


def example_cases(shared_data: Path = SHARED_DATA) -> dict[str, list[str]]:
    """Example scans offered in the app, by label, as the file lists to load.

    The bundled pelvis CT is always first; the project's shared scans are added when
    ``shared_data`` exists beside the repository.

    Args:
        shared_data: The shared data folder.

    Returns:
        Mapping from a label to the paths making up that case.
    """
    cases = {"Pelvis CT, 3 mm (bundled example)": [str(BUNDLED_EXAMPLE)]}
    upper_nifti = shared_data / "ct" / "upper_abdomen_ct_3mm.nii.gz"
    if upper_nifti.is_file():
        label = "Upper abdomen CT, NIfTI (no pelvis: expect a message)"
        cases[label] = [str(upper_nifti)]
    upper_dicom = shared_data / "ct" / "upper_abdomen_dicom_j2k"
    if upper_dicom.is_dir():
        files = sorted(str(p) for p in upper_dicom.iterdir() if p.is_file())
        if files:
            cases["Upper abdomen DICOM series, JPEG 2000 (no pelvis)"] = files
    return cases


def allowed_paths(shared_data: Path = SHARED_DATA) -> list[str]:
    """Folders outside Gradio's cache that the app may serve files from."""
    paths = [str(EXAMPLES_DIR)]
    if (shared_data / "ct").is_dir():
        paths.append(str(shared_data / "ct"))
    return paths


# --- Handlers -------------------------------------------------------------------------


class _LazyPredictor:
    """Creates the pipeline's Predictor on first use, once, from any thread."""

    def __init__(self, predictor=None, device: str | None = None):
        self._predictor = predictor
        self._device = device
        self._lock = threading.Lock()

    def get(self):
        with self._lock:
            if self._predictor is None:
                from femurrisk.pipeline import Predictor  # loads torch: only when used

                self._predictor = Predictor(device=self._device)
            return self._predictor


def choose_source(files, folder, example: str | None, cases: dict[str, list[str]]):
    """What to hand to ``load_ct``: the folder upload, else the files, else the example.

    Uploads and the example never mix: the example is used only when nothing is
    uploaded, so an upload can never be scored together with (or silently replaced by)
    the example.
    """
    paths = [str(p) for p in (folder or [])] or [str(p) for p in (files or [])]
    if not paths and example in cases:
        paths = list(cases[example])
    if not paths:
        raise gr.Error("Upload a CT (NIfTI, DICOM files, a .zip or a folder) or pick "
                       "an example first.", print_exception=False)
    return paths[0] if len(paths) == 1 else paths


def _progress_adapter(progress: gr.Progress):
    """A ``progress(fraction, message)`` callback that feeds Gradio's progress bar."""

    def report(fraction: float, message: str | None = None, *args, **kwargs) -> None:
        try:
            progress(float(fraction), desc=message)
        except Exception:  # a progress bar must never break a prediction
            logger.debug("progress update failed", exc_info=True)

    return report


def _write_report(prediction, out_dir: Path) -> str:
    """Write the JSON report to a fresh folder; delete reports older than an hour."""
    from femurrisk.report import to_json_dict

    now = time.time()
    for old in out_dir.iterdir():
        if now - old.stat().st_mtime > CACHE_MAX_AGE_S:
            shutil.rmtree(old, ignore_errors=True)
    run_dir = out_dir / uuid.uuid4().hex
    run_dir.mkdir(parents=True)
    path = run_dir / "result.json"
    path.write_text(json.dumps(to_json_dict(prediction), indent=2), encoding="utf-8")
    return str(path)


def _log_unexpected(exc: BaseException) -> None:
    """Log an unexpected failure by type and code location, never its message.

    Messages of third-party errors can carry uploaded file names or header values.
    """
    frames = "".join(traceback.format_tb(exc.__traceback__))
    logger.error("prediction failed with %s\n%s", type(exc).__name__, frames)


#: Explanation methods offered; the values are femurrisk.explanation.METHODS (that
#: module imports torch, so they are repeated here and checked by a test).
METHOD_CHOICES = [("Grad-CAM", "gradcam"), ("Guided Grad-CAM (finer)", "guided_gradcam")]
METHOD_LABELS = dict((value, label) for label, value in METHOD_CHOICES)
PLANE_CHOICES = [("Axial", "axial"), ("Coronal", "coronal"), ("Sagittal", "sagittal")]
DEFAULT_OPACITY = 0.5

#: Runs in the browser before a redraw: reads where each side's slice slider stands
#: (which the server cannot know: the sliders move without it) into the hidden
#: ``cursor`` input, so that a redrawn or switched plane goes through the same point.
READ_CURSOR_JS = """
(...args) => {
  const out = {};
  for (const side of ["right", "left"]) {
    const gd = document.querySelector("#plot-" + side + " .js-plotly-plot");
    if (!gd || !gd.layout || !gd.layout.meta || !gd.layout.sliders) continue;
    const meta = gd.layout.meta;
    const active = gd.layout.sliders[0].active;
    const cursor = Object.assign({}, meta.cursor);
    if (meta.positions_mm && active !== undefined) {
      cursor[meta.axis] = meta.positions_mm[active];
    }
    out[side] = cursor;
  }
  args[CURSOR_INDEX] = JSON.stringify(out);
  return args;
}
"""

#: Runs in the browser only: heatmap opacity changes without a round trip.
OPACITY_JS = """
(opacity) => {
  if (window.Plotly) {
    const plots = document.querySelectorAll(
      "#plot-right .js-plotly-plot, #plot-left .js-plotly-plot, " +
      "#plot-3d .js-plotly-plot");
    for (const gd of plots) {
      const heat = (gd.data || []).map((t, i) => t.meta === "heat" ? i : -1)
                                  .filter(i => i >= 0);
      if (heat.length) window.Plotly.restyle(gd, {opacity: opacity}, heat);
    }
  }
  return [];
}
"""

#: Runs in the browser only: the axial slice shown on the right side's viewer (or
#: else the left's) becomes the hand-set landmark level.
AXIAL_SLICE_JS = """
(current) => {
  for (const side of ["right", "left"]) {
    const gd = document.querySelector("#plot-" + side + " .js-plotly-plot");
    const meta = gd && gd.layout && gd.layout.meta;
    if (meta && meta.plane === "axial") {
      return meta.positions_mm[gd.layout.sliders[0].active];
    }
  }
  return current;
}
"""


def _parse_cursor(text: str | None) -> dict:
    """The per-side cursors sent by READ_CURSOR_JS; empty when absent or malformed."""
    try:
        value = json.loads(text or "{}")
    except ValueError:
        return {}
    if not isinstance(value, dict):
        return {}
    cursors = {}
    for side in ("right", "left"):
        point = value.get(side)
        if isinstance(point, dict):
            try:
                cursors[side] = {a: float(point[a]) for a in ("x", "y", "z")
                                 if a in point}
            except (TypeError, ValueError):
                continue
    return cursors


def _plane_figures(state: dict, plane: str, opacity: float, threshold: float,
                   cursors: dict | None = None):
    label = METHOD_LABELS.get(state["method"], "Grad-CAM")
    return [viewers.plane_viewer(state["views"][side], plane,
                                 cursor=(cursors or {}).get(side), opacity=opacity,
                                 threshold=threshold, method_label=label)
            for side in ("right", "left")]


def _figure_3d(state: dict, opacity: float, threshold: float):
    return viewers.figure_3d(state["scene"], threshold=threshold, opacity=opacity,
                             method_label=METHOD_LABELS.get(state["method"], "Grad-CAM"))


def _view_state(prediction, source, method: str) -> dict:
    """What redraws need, computed once per prediction (display grids, 3D scene)."""
    views = {side: viewers.side_view(prediction.sides[side], prediction.image,
                                     prediction.landmarks)
             for side in ("right", "left")}
    return {"views": views, "scene": viewers.scene_3d(prediction), "source": source,
            "method": method}


# --- Layout ---------------------------------------------------------------------------


def build_demo(predictor=None, *, device: str | None = None) -> gr.Blocks:
    """The Gradio app, built but not launched.

    Args:
        predictor: An object with the ``femurrisk.pipeline.Predictor`` interface;
            created from ``femurrisk.pipeline`` on the first prediction when None.
        device: Torch device for the Predictor created here ("cpu", "cuda", ...).

    Returns:
        The Blocks app; call :func:`launch` or ``.launch()`` on it.
    """
    holder = _LazyPredictor(predictor, device)
    reports_dir = Path(tempfile.mkdtemp(prefix="femurrisk_reports_"))
    cases = example_cases()
    first_case = next(iter(cases))

    def run(source, method, opacity, threshold, plane, landmark_z_mm, progress):
        progress(0.0, desc="Loading models")
        try:
            prediction = holder.get().predict(
                source, landmark_z_mm=landmark_z_mm, method=method,
                progress=_progress_adapter(progress),
            )
            report_path = _write_report(prediction, reports_dir)
            state = _view_state(prediction, source, method)
            right_fig, left_fig = _plane_figures(state, plane, opacity, threshold)
            fig_3d = _figure_3d(state, opacity, threshold)
        except InputError as exc:
            raise gr.Error(str(exc), print_exception=False) from None
        except gr.Error:
            raise
        except Exception as exc:  # noqa: BLE001 - shown generically, logged in full
            _log_unexpected(exc)
            raise gr.Error(GENERIC_ERROR, print_exception=False) from None
        summary = {side: viewers.side_summary_markdown(prediction.sides[side],
                                                       prediction.threshold)
                   for side in ("right", "left")}
        return (
            viewers.landmark_summary_markdown(prediction.landmarks),
            summary["right"],
            right_fig,
            summary["left"],
            left_fig,
            fig_3d,
            viewers.warnings_markdown(prediction),
            gr.DownloadButton(value=report_path, visible=True),
            state,  # display grids and the source; the full image stays out of State
            round(float(prediction.landmarks.world_z_mm), 1),
        )

    def predict(files, folder, example_label, method, opacity, threshold, plane,
                progress=gr.Progress()):
        source = choose_source(files, folder, example_label, cases)
        return run(source, method, opacity, threshold, plane, None, progress)

    def rerun(landmark_z, method, opacity, threshold, plane, state,
              progress=gr.Progress()):
        if state is None:
            raise gr.Error("Press Predict first; the landmark can then be moved.",
                           print_exception=False)
        if landmark_z is None or not np.isfinite(float(landmark_z)):
            raise gr.Error("Enter the AIIS level as a world z in mm.",
                           print_exception=False)
        return run(state["source"], method, opacity, threshold, plane,
                   float(landmark_z), progress)

    def redraw_planes(plane, opacity, threshold, cursor, state):
        if state is None:
            return gr.skip(), gr.skip()
        return tuple(_plane_figures(state, plane, opacity, threshold,
                                    _parse_cursor(cursor)))

    def redraw_all(plane, opacity, threshold, cursor, state):
        if state is None:
            return gr.skip(), gr.skip(), gr.skip()
        right_fig, left_fig = _plane_figures(state, plane, opacity, threshold,
                                             _parse_cursor(cursor))
        return right_fig, left_fig, _figure_3d(state, opacity, threshold)

    with gr.Blocks(title="femurrisk (research demo)", analytics_enabled=False,
                   delete_cache=(CACHE_MAX_AGE_S, CACHE_MAX_AGE_S)) as demo:
        gr.HTML(BANNER, elem_id="banner")
        gr.Markdown(
            "# femurrisk\nEstimates, for each proximal femur, the risk of a pathologic "
            "fracture within 3 months from an abdominopelvic CT (32 axial slices "
            "below the anterior inferior iliac spine)."
        )
        result_state = gr.State(None, time_to_live=3600)

        with gr.Row():
            with gr.Column(scale=2):
                with gr.Tab("Files"):
                    files = gr.File(
                        file_count="multiple",
                        label="CT: a NIfTI (.nii, .nii.gz), DICOM files or a .zip",
                        elem_id="ct-files", height=220,
                    )
                with gr.Tab("Folder"):
                    folder = gr.File(file_count="directory",
                                     label="CT: a folder holding one DICOM series",
                                     elem_id="ct-folder", height=220)
            with gr.Column(scale=1):
                example = gr.Dropdown(
                    list(cases), value=first_case, elem_id="examples",
                    label="Example (used when nothing is uploaded)",
                )
                method = gr.Radio(METHOD_CHOICES, value="gradcam",
                                  label="Explanation", elem_id="method")
                predict_btn = gr.Button("Predict", variant="primary",
                                        elem_id="predict")

        landmark_md = gr.Markdown(elem_id="landmark")
        with gr.Row(equal_height=True):
            landmark_z = gr.Number(None, label="AIIS level, world z (mm, RAS+)",
                                   elem_id="landmark-z", precision=1, scale=2)
            use_slice_btn = gr.Button("Take the axial slice shown", size="md",
                                      elem_id="use-slice", scale=1)
            rerun_btn = gr.Button("Rerun with this level", variant="secondary",
                                  elem_id="rerun", scale=1)
        with gr.Row():
            plane = gr.Radio(PLANE_CHOICES, value="axial", label="Plane",
                             elem_id="plane")
            opacity = gr.Slider(0.0, 1.0, value=DEFAULT_OPACITY, step=0.05,
                                label="Heatmap opacity", elem_id="opacity")
            threshold = gr.Slider(0.0, 0.95, value=0.0, step=0.05,
                                  label="Heatmap threshold", elem_id="threshold")
        cursor = gr.Textbox("", visible=False, elem_id="cursor")
        gr.Markdown("Radiological layout: the patient's **right** femur is on the "
                    "screen's left. Slice sliders move in the browser; the dotted lines "
                    "show where the other two planes cut, and switching the plane keeps "
                    "the point you were looking at.")
        with gr.Row():
            with gr.Column():
                right_md = gr.Markdown(elem_id="result-right")
                right_plot = gr.Plot(label="Right femur", elem_id="plot-right")
            with gr.Column():
                left_md = gr.Markdown(elem_id="result-left")
                left_plot = gr.Plot(label="Left femur", elem_id="plot-left")
        plot_3d = gr.Plot(label="Both femurs, 3D", elem_id="plot-3d")
        with gr.Accordion("Warnings", open=True):
            warnings_md = gr.Markdown(elem_id="warnings")
        download = gr.DownloadButton("Download JSON report", visible=False,
                                     elem_id="download")

        results = [landmark_md, right_md, right_plot, left_md, left_plot, plot_3d,
                   warnings_md, download, result_state, landmark_z]

        def clear_results():
            """Results of an earlier scan must never stand beside a new input."""
            return ("", "", None, "", None, None, "", gr.DownloadButton(visible=False),
                    None, None)

        # One input at a time: choosing an example empties the uploads; an upload
        # empties the other upload and unselects the example.
        example.input(lambda label: (None, None), inputs=example,
                      outputs=[files, folder])
        folder.upload(lambda: (None, None), outputs=[files, example])
        files.upload(lambda: (None, None), outputs=[folder, example])
        for component in (files, folder, example):
            component.change(clear_results, outputs=results, queue=False)
        predict_btn.click(predict,
                          inputs=[files, folder, example, method, opacity, threshold,
                                  plane],
                          outputs=results, concurrency_limit=1)
        rerun_btn.click(rerun, inputs=[landmark_z, method, opacity, threshold, plane,
                                       result_state],
                        outputs=results, concurrency_limit=1)
        use_slice_btn.click(None, inputs=landmark_z, outputs=landmark_z,
                            js=AXIAL_SLICE_JS)
        view_inputs = [plane, opacity, threshold, cursor, result_state]
        read_cursor = READ_CURSOR_JS.replace("CURSOR_INDEX", "3")
        plane.change(redraw_planes, inputs=view_inputs, outputs=[right_plot, left_plot],
                     js=read_cursor)
        threshold.release(redraw_all, inputs=view_inputs,
                          outputs=[right_plot, left_plot, plot_3d], js=read_cursor)
        opacity.change(None, inputs=opacity, outputs=None, js=OPACITY_JS)
    return demo


def launch(demo: gr.Blocks, *, host: str = "127.0.0.1", port: int | None = None,
           share: bool = False, auth: list[tuple[str, str]] | None = None,
           **kwargs):
    """Serve ``demo`` with the app's privacy settings.

    Args:
        demo: The app from :func:`build_demo`.
        host: Address to bind.
        port: TCP port; Gradio picks from 7860 on when None.
        share: Open a Gradio share tunnel.
        auth: Logins from :func:`resolve_auth`.
        **kwargs: Further ``Blocks.launch`` arguments (e.g. prevent_thread_lock).

    Returns:
        What ``Blocks.launch`` returns.
    """
    return demo.queue(default_concurrency_limit=1).launch(
        server_name=host, server_port=port, share=share, auth=auth,
        auth_message="femurrisk research demo: log in with the operator's credentials.",
        allowed_paths=allowed_paths(), show_error=False, ssr_mode=False,
        mcp_server=False, enable_monitoring=False, pwa=False, max_file_size="2gb",
        footer_links=[], **kwargs,
    )


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point: parse arguments, check the login rules, serve."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to bind (default 127.0.0.1, this machine only)")
    parser.add_argument("--port", type=int, default=None,
                        help="TCP port (default 7860)")
    parser.add_argument("--share", action="store_true",
                        help="open a public Gradio share link (needs a login)")
    parser.add_argument("--device", default=None,
                        help="torch device, e.g. cpu or cuda (default: best available)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    try:
        auth = resolve_auth(args.host, args.share)
    except LaunchConfigError as exc:
        print(f"femurrisk: refusing to start: {exc}", file=sys.stderr)
        return 2
    if args.share:
        print(
            "WARNING: --share needs internet access. Gradio downloads a helper binary "
            "(frpc) and routes all traffic, including uploaded CTs, through an "
            "outside relay server (gradio.live). Use it only for data you may send "
            "off this machine.",
            file=sys.stderr,
        )

    predictor = _load_predictor(args.device)
    if predictor is None:
        return 1
    launch(build_demo(predictor), host=args.host, port=args.port, share=args.share,
           auth=auth)
    return 0


def _load_predictor(device: str | None):
    """Load the models before serving, so that a missing weight file stops the start.

    Returns:
        The Predictor, or None after logging why it could not be created.
    """
    logger.info("loading models")
    try:
        from femurrisk.pipeline import Predictor

        return Predictor(device=device)
    except Exception as exc:  # noqa: BLE001 - reported to the operator, then exit
        logger.error("cannot load the models: %s: %s", type(exc).__name__, exc)
        return None


if __name__ == "__main__":
    sys.exit(main())
