"""The app in a real browser: Debian's chromium driven by Playwright.

Uses /usr/bin/chromium (``apt-get install -y chromium``), never a browser that
``playwright install`` downloads. Servers are started on 127.0.0.1 only, and every
request the page makes is checked to stay on that address. Screenshots go to
``$FEMURRISK_ARTIFACTS`` (default ``/tmp/femurrisk-artifacts``).
"""

from __future__ import annotations

import io
import json
import os
import re
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = Path("/usr/bin/chromium")
EXAMPLE = ROOT / "assets" / "examples" / "pelvis_ct_3mm.nii.gz"
ARTIFACTS = Path(os.environ.get("FEMURRISK_ARTIFACTS", "/tmp/femurrisk-artifacts"))
#: WebGL for the 3D view comes from SwiftShader, chromium's software renderer.
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--use-gl=angle", "--use-angle=swiftshader",
    "--enable-unsafe-swiftshader", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--no-first-run",
]
PREDICTION_TIMEOUT_MS = 600_000  # first run on a CPU loads both models

pytestmark = pytest.mark.skipif(
    not CHROMIUM.exists(),
    reason="needs Debian's chromium at /usr/bin/chromium (apt-get install -y chromium; "
    "scripts/test.sh installs it)",
)
sync_api = pytest.importorskip("playwright.sync_api")
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_for_server(url: str, process: subprocess.Popen | None, timeout_s: float):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"app exited early with code {process.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(f"app did not answer on {url} within {timeout_s} s")


@pytest.fixture
def browser_page():
    """A chromium page that records every host it contacts."""
    hosts: set[str] = set()
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS
        )
        page = browser.new_page(viewport={"width": 1400, "height": 1100})
        requests: list[str] = []

        def record(request):
            hosts.add(urlsplit(request.url).netloc)
            requests.append(request.url)

        page.on("request", record)
        page.contacted_hosts = hosts
        page.requests = requests
        try:
            yield page
        finally:
            browser.close()


def _screenshot(page, name: str) -> Path:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / name
    page.screenshot(path=str(path), full_page=True)
    return path


def _plot_area_pixels(page, selector: str, name: str) -> np.ndarray:
    """Screenshot of one view's plot area (saved), as a grey-level array.

    For 2D views the plot area is plotly's drag layer (the image itself, without
    title, slider or colour bar); for the 3D view it is the WebGL scene.
    """
    from PIL import Image

    plot = page.locator(f"{selector} .js-plotly-plot").first
    plot.scroll_into_view_if_needed()
    area = plot.locator("rect.nsewdrag, .gl-container canvas").first
    box = area.bounding_box()
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    png = page.screenshot(clip=box, path=str(ARTIFACTS / name))
    return np.asarray(Image.open(io.BytesIO(png)).convert("L"), dtype=np.float32)


def _assert_holds_an_image(pixels: np.ndarray, what: str) -> None:
    assert pixels.size > 10_000, f"{what}: plot area too small ({pixels.shape})"
    assert pixels.std() > 8.0, f"{what} looks blank (pixel sd {pixels.std():.1f})"


def _upload_example(page) -> None:
    """Upload the example file itself (the dropdown's example is then unselected)."""
    files = page.locator("#ct-files")
    expect = sync_api.expect
    expect(files.locator(".file-preview")).to_have_count(0)
    files.locator("input[type=file]").set_input_files(str(EXAMPLE))
    expect(files.locator(".file-preview")).to_contain_text("pelvis_ct_3mm")


def _wait_for_views(page, timeout_ms: int = PREDICTION_TIMEOUT_MS) -> None:
    for side in ("right", "left"):
        page.locator(f"#plot-{side} .js-plotly-plot").wait_for(timeout=timeout_ms)
        sync_api.expect(page.locator(f"#result-{side}")).to_contain_text(
            re.compile(r"\d+\.\d %|not scored"), timeout=timeout_ms
        )
    page.locator("#plot-3d .js-plotly-plot .gl-container canvas").first.wait_for(
        timeout=timeout_ms)


def _predict_and_wait(page) -> float:
    """Press Predict; seconds until both 2D views and the 3D view are drawn."""
    start = time.monotonic()
    page.locator("#predict").click()
    _wait_for_views(page)
    return time.monotonic() - start


def _meta(page, side: str) -> dict:
    return page.evaluate(
        """sel => {const gd = document.querySelector(sel);
                   return {meta: gd.layout.meta, active: gd.layout.sliders[0].active};}""",
        f"#plot-{side} .js-plotly-plot",
    )


def _visible_traces(page, side: str) -> list[int]:
    return page.evaluate(
        """side => document.querySelector(`#plot-${side} .js-plotly-plot`).data
                 .map((t, i) => t.visible === true ? i : -1).filter(i => i >= 0)""",
        side,
    )


def _heat_opacities(page, selector: str) -> list[float]:
    return page.evaluate(
        """sel => document.querySelector(sel).data.filter(t => t.meta === "heat")
                 .map(t => t.opacity)""",
        f"{selector} .js-plotly-plot",
    )


def _move_slider(page, side: str, fraction: float) -> None:
    rail = page.locator(f"#plot-{side} .slider-rail-touch-rect").first
    rail.scroll_into_view_if_needed()
    box = rail.bounding_box()
    page.mouse.click(box["x"] + fraction * box["width"], box["y"] + box["height"] / 2)


def _set_slider(page, elem_id: str, value: float) -> None:
    """Set a Gradio slider through its number box, as a user typing would."""
    box = page.locator(f"#{elem_id} input[type=number]")
    box.fill(str(value))
    box.press("Enter")


def _assert_stayed_local(page) -> None:
    outside = {h for h in page.contacted_hosts if not h.startswith("127.0.0.1:")}
    assert not outside, f"the page contacted other hosts: {sorted(outside)}"


def _exercise_views(page, prefix: str) -> dict:
    """Slider, opacity, plane switch and threshold, checked in the page; screenshots.

    Returns:
        Figures for the note: seconds for a slider step and for a plane switch (a
        round trip that rebuilds, sends and draws both 2D views, without inference).
    """
    figures = {}
    for side in ("right", "left"):
        _assert_holds_an_image(_plot_area_pixels(page, f"#plot-{side}",
                                                 f"{prefix}_{side}_axial.png"),
                               f"{side} axial view")
    _assert_holds_an_image(_plot_area_pixels(page, "#plot-3d", f"{prefix}_3d.png"),
                           "3D view")
    for side in ("right", "left"):
        plot = page.locator(f"#plot-{side}")
        for edge in ("R", "L", "A", "P"):
            assert plot.locator("g.annotation-text-g", has_text=edge).count() >= 1

    # Slice slider: moves in the browser, no request, and the image changes.
    before_pixels = _plot_area_pixels(page, "#plot-left", f"{prefix}_left_before.png")
    before, n_requests = _visible_traces(page, "left"), len(page.requests)
    start = time.monotonic()
    _move_slider(page, "left", 0.02)
    page.wait_for_function(
        """before => {
             const gd = document.querySelector("#plot-left .js-plotly-plot");
             const shown = gd.data.map((t, i) => t.visible === true ? i : -1)
                                  .filter(i => i >= 0);
             return gd.layout.sliders[0].active === 0 &&
                    JSON.stringify(shown) !== JSON.stringify(before); }""",
        arg=before, timeout=10_000)
    figures["slider_step_s"] = round(time.monotonic() - start, 3)
    after = _visible_traces(page, "left")
    assert before != after and len(after) >= 2
    assert len(page.requests) == n_requests  # the slider works in the browser
    moved = _meta(page, "left")
    assert moved["active"] == 0  # the most cranial slice
    after_pixels = _plot_area_pixels(page, "#plot-left", f"{prefix}_left_moved.png")
    assert np.abs(after_pixels - before_pixels).mean() > 1.0, "the image did not change"
    moved_z = moved["meta"]["positions_mm"][moved["active"]]

    # Opacity: restyled in the browser for the 2D and 3D views.
    _set_slider(page, "opacity", 0.9)
    page.wait_for_function(
        """() => { const gd = document.querySelector("#plot-right .js-plotly-plot");
                   return gd.data.filter(t => t.meta === "heat")
                            .every(t => t.opacity === 0.9); }""", timeout=10_000)
    assert set(_heat_opacities(page, "#plot-left")) == {0.9}
    _plot_area_pixels(page, "#plot-right", f"{prefix}_right_opacity.png")

    # Plane switch: both views turn coronal, through the point the slider was on.
    start = time.monotonic()
    page.locator("#plane").get_by_label("Coronal").check()
    page.wait_for_function(
        """() => ["right", "left"].every(side => {
             const gd = document.querySelector(`#plot-${side} .js-plotly-plot`);
             return gd && gd.layout.meta && gd.layout.meta.plane === "coronal"; })""",
        timeout=60_000)
    figures["plane_switch_s"] = round(time.monotonic() - start, 2)  # no inference
    coronal = _meta(page, "left")
    assert coronal["meta"]["cursor"]["z"] == pytest.approx(moved_z)
    assert set(_heat_opacities(page, "#plot-left")) == {0.9}  # kept after redraw
    for side in ("right", "left"):
        plot = page.locator(f"#plot-{side}")
        for edge in ("S", "I"):
            assert plot.locator("g.annotation-text-g", has_text=edge).count() >= 1
        _assert_holds_an_image(_plot_area_pixels(page, f"#plot-{side}",
                                                 f"{prefix}_{side}_coronal.png"),
                               f"{side} coronal view")
    page.locator("#plane").get_by_label("Sagittal").check()
    page.wait_for_function(
        """() => document.querySelector("#plot-left .js-plotly-plot")
                   .layout.meta.plane === "sagittal" """, timeout=60_000)
    _assert_holds_an_image(_plot_area_pixels(page, "#plot-left",
                                             f"{prefix}_left_sagittal.png"),
                           "left sagittal view")
    page.locator("#plane").get_by_label("Axial").check()
    page.wait_for_function(
        """() => document.querySelector("#plot-left .js-plotly-plot")
                   .layout.meta.plane === "axial" """, timeout=60_000)
    return figures


def _set_landmark_by_hand(page, z_mm: float) -> None:
    box = page.locator("#landmark-z input")
    box.fill(f"{z_mm:.1f}")
    box.press("Tab")
    page.locator("#rerun").click()
    sync_api.expect(page.locator("#landmark")).to_contain_text(
        "set by hand", timeout=PREDICTION_TIMEOUT_MS)
    sync_api.expect(page.locator("#warnings")).to_contain_text(
        "set manually", timeout=PREDICTION_TIMEOUT_MS)
    _wait_for_views(page)


def _record(name: str, figures: dict) -> None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    (ARTIFACTS / name).write_text(json.dumps(figures, indent=1))


def test_ui_with_a_stand_in_predictor(browser_page):
    """Every view and control, without the trained models."""
    import app
    from test_app import FakePredictor

    port = _free_port()
    predictor = FakePredictor()
    demo = app.build_demo(predictor)
    app.launch(demo, host="127.0.0.1", port=port, prevent_thread_lock=True, quiet=True)
    try:
        page = browser_page
        page.goto(f"http://127.0.0.1:{port}/")
        sync_api.expect(page.locator("#banner")).to_contain_text("not for clinical use")
        sync_api.expect(page.locator("#examples input")).to_have_value(
            re.compile("bundled example"))
        _upload_example(page)
        figures = {"first_render_s": round(_predict_and_wait(page), 2)}

        assert "12.0 %" in page.locator("#result-left").inner_text()
        assert "implant present" in page.locator("#result-right").inner_text()
        figures.update(_exercise_views(page, "stand_in"))

        # The axial slice shown becomes the landmark; the rerun says it was set by hand.
        page.locator("#use-slice").click()
        shown = _meta(page, "right")
        z_shown = shown["meta"]["positions_mm"][shown["active"]]
        sync_api.expect(page.locator("#landmark-z input")).to_have_value(
            re.compile(rf"^{z_shown:.1f}$|^{z_shown:g}$"))
        _set_landmark_by_hand(page, -12.0)
        assert predictor.calls[-1]["landmark_z_mm"] == pytest.approx(-12.0)
        assert _meta(page, "left")["meta"]["landmark_method"] == "manual"
        _screenshot(page, "app_stand_in_predictor.png")
        _record("stand_in_figures.json", figures)

        # A new input clears the old results: they belong to another scan.
        page.locator("#ct-files").get_by_role("button", name="Clear").first.click()
        sync_api.expect(page.locator("#result-left")).not_to_contain_text("%")
        assert page.locator("#plot-left .js-plotly-plot").count() == 0
        _assert_stayed_local(page)
    finally:
        demo.close()


def _has_trained_weights() -> bool:
    assets = Path(os.environ.get("FEMURRISK_ASSETS", ROOT / "assets"))
    return any(assets.glob("*.safetensors"))


@pytest.mark.skipif(not _has_trained_weights(), reason="no trained weights in assets/")
def test_end_to_end_on_the_bundled_example(browser_page):
    """The real app, models and all, on the bundled pelvis CT."""
    port = _free_port()
    logins = ("FEMURRISK_USERNAME", "FEMURRISK_PASSWORD", "FEMURRISK_AUTH_FILE")
    env = {k: v for k, v in os.environ.items() if k not in logins}
    process = subprocess.Popen(
        [sys.executable, str(ROOT / "app.py"), "--port", str(port), "--device", "cpu"],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        _wait_for_server(f"http://127.0.0.1:{port}/", process, timeout_s=120)
        page = browser_page
        page.goto(f"http://127.0.0.1:{port}/")
        _upload_example(page)
        figures = {"first_render_s": round(_predict_and_wait(page), 2)}
        shot = _screenshot(page, "app_end_to_end.png")

        # The example's left femur carries a nail: no number there, a probability on
        # the right.
        right = page.locator("#result-right").inner_text()
        left = page.locator("#result-left").inner_text()
        assert "patient's right" in right and re.search(r"\d+\.\d %", right), right
        assert "patient's left" in left and "implant present, not scored" in left, left
        assert "%" not in left.split("slices")[0], left
        assert page.locator("#download").is_visible()
        assert "landmark network" in page.locator("#landmark").inner_text()
        figures.update(_exercise_views(page, "end_to_end"))

        found_z = _meta(page, "left")["meta"]["landmark_z_mm"]
        start = time.monotonic()
        _set_landmark_by_hand(page, found_z + 6.0)
        figures["rerun_s"] = round(time.monotonic() - start, 2)
        assert _meta(page, "left")["meta"]["landmark_z_mm"] == pytest.approx(found_z + 6.0)
        _screenshot(page, "app_end_to_end_manual_landmark.png")
        _record("end_to_end_figures.json", figures)
        _assert_stayed_local(page)
        assert shot.stat().st_size > 10_000
    finally:
        process.terminate()
        try:
            output, _ = process.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            output, _ = process.communicate()
        (ARTIFACTS / "app_end_to_end.log").parent.mkdir(parents=True, exist_ok=True)
        (ARTIFACTS / "app_end_to_end.log").write_text(output or "")
