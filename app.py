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


def _source_from_uploads(files, folder):
    """What to hand to ``load_ct``: the folder upload if given, else the files."""
    paths = [str(p) for p in (folder or [])] or [str(p) for p in (files or [])]
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


def _figures(sides, opacity: float):
    return [viewers.side_viewer(sides[s], opacity=opacity)
            for s in ("right", "left")]


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

    def predict(files, folder, opacity, progress=gr.Progress()):
        source = _source_from_uploads(files, folder)
        progress(0.0, desc="Loading models")
        try:
            prediction = holder.get().predict(
                source, progress=_progress_adapter(progress)
            )
            report_path = _write_report(prediction, reports_dir)
            right_fig, left_fig = _figures(prediction.sides, opacity)
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
            viewers.warnings_markdown(prediction),
            gr.DownloadButton(value=report_path, visible=True),
            prediction.sides,  # enough to redraw; the whole image stays out of State
        )

    def redraw(opacity, sides):
        if sides is None:
            return gr.skip(), gr.skip()
        return tuple(_figures(sides, opacity))

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
                        value=cases[first_case], file_count="multiple",
                        label="CT: a NIfTI (.nii, .nii.gz), DICOM files or a .zip",
                        elem_id="ct-files", height=220,
                    )
                with gr.Tab("Folder"):
                    folder = gr.File(file_count="directory",
                                     label="CT: a folder holding one DICOM series",
                                     elem_id="ct-folder", height=220)
            with gr.Column(scale=1):
                example = gr.Dropdown(list(cases), value=first_case, label="Examples",
                                      elem_id="examples")
                predict_btn = gr.Button("Predict", variant="primary",
                                        elem_id="predict")
                opacity = gr.Slider(0.0, 1.0, value=0.4, step=0.05,
                                    label="Heatmap opacity", elem_id="opacity")

        landmark_md = gr.Markdown(elem_id="landmark")
        gr.Markdown("Radiological layout: the patient's **right** femur is on the "
                    "screen's left, as in the axial images.")
        with gr.Row():
            with gr.Column():
                right_md = gr.Markdown(elem_id="result-right")
                right_plot = gr.Plot(label="Right femur, axial", elem_id="plot-right")
            with gr.Column():
                left_md = gr.Markdown(elem_id="result-left")
                left_plot = gr.Plot(label="Left femur, axial", elem_id="plot-left")
        with gr.Accordion("Warnings", open=True):
            warnings_md = gr.Markdown(elem_id="warnings")
        download = gr.DownloadButton("Download JSON report", visible=False,
                                     elem_id="download")

        results = [landmark_md, right_md, right_plot, left_md, left_plot, warnings_md,
                   download, result_state]

        def clear_results():
            """Results of an earlier scan must never stand beside a new input."""
            return ("", "", None, "", None, "", gr.DownloadButton(visible=False), None)

        # One input at a time: choosing an example or uploading empties the other.
        example.input(lambda label: (cases[label], None), inputs=example,
                      outputs=[files, folder])
        folder.upload(lambda: None, outputs=files)
        files.upload(lambda: None, outputs=folder)
        for component in (files, folder):
            component.change(clear_results, outputs=results, queue=False)
        predict_btn.click(predict, inputs=[files, folder, opacity], outputs=results,
                          concurrency_limit=1)
        opacity.release(redraw, inputs=[opacity, result_state],
                        outputs=[right_plot, left_plot])
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
