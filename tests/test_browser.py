"""The app in a real browser: Debian's chromium driven by Playwright.

Uses /usr/bin/chromium (``apt-get install -y chromium``), never a browser that
``playwright install`` downloads. Servers are started on 127.0.0.1 only, and every
request the page makes is checked to stay on that address. Screenshots go to
``$FEMURRISK_ARTIFACTS`` (default ``/tmp/femurrisk-artifacts``).
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from urllib.parse import urlsplit

import pytest

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = Path("/usr/bin/chromium")
EXAMPLE = ROOT / "assets" / "examples" / "pelvis_ct_3mm.nii.gz"
ARTIFACTS = Path(os.environ.get("FEMURRISK_ARTIFACTS", "/tmp/femurrisk-artifacts"))
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
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


def _upload_example(page) -> None:
    """Replace the preselected example by an upload of the same file."""
    files = page.locator("#ct-files")
    files.get_by_role("button", name="Clear").first.click()
    expect = sync_api.expect
    expect(files.locator(".file-preview")).to_have_count(0)
    files.locator("input[type=file]").set_input_files(str(EXAMPLE))
    expect(files.locator(".file-preview")).to_contain_text("pelvis_ct_3mm")


def _predict_and_wait(page) -> None:
    page.locator("#predict").click()
    for side in ("right", "left"):
        page.locator(f"#plot-{side} .js-plotly-plot").wait_for(
            timeout=PREDICTION_TIMEOUT_MS
        )
        sync_api.expect(page.locator(f"#result-{side}")).to_contain_text(
            re.compile(r"\d+\.\d %"), timeout=PREDICTION_TIMEOUT_MS
        )


def _visible_traces(page, side: str) -> list[int]:
    return page.evaluate(
        """side => document.querySelector(`#plot-${side} .js-plotly-plot`).data
                 .map((t, i) => t.visible === true ? i : -1).filter(i => i >= 0)""",
        side,
    )


def _move_slider(page, side: str, fraction: float) -> None:
    rail = page.locator(f"#plot-{side} .slider-rail-touch-rect").first
    rail.scroll_into_view_if_needed()
    box = rail.bounding_box()
    page.mouse.click(box["x"] + fraction * box["width"], box["y"] + box["height"] / 2)


def _assert_stayed_local(page) -> None:
    outside = {h for h in page.contacted_hosts if not h.startswith("127.0.0.1:")}
    assert not outside, f"the page contacted other hosts: {sorted(outside)}"


def test_ui_with_a_stand_in_predictor(browser_page):
    """Layout, upload, viewer and slider, without the trained models."""
    import app
    from test_app import FakePredictor

    port = _free_port()
    demo = app.build_demo(FakePredictor())
    app.launch(demo, host="127.0.0.1", port=port, prevent_thread_lock=True, quiet=True)
    try:
        page = browser_page
        page.goto(f"http://127.0.0.1:{port}/")
        sync_api.expect(page.locator("#banner")).to_contain_text("not for clinical use")
        sync_api.expect(page.locator("#ct-files")).to_contain_text("pelvis_ct_3mm")
        _upload_example(page)
        _predict_and_wait(page)

        assert "12.0 %" in page.locator("#result-left").inner_text()
        assert "implant present" in page.locator("#result-right").inner_text()
        plot = page.locator("#plot-left")
        for edge in ("R", "L", "A", "P"):
            assert plot.locator("g.annotation-text-g", has_text=edge).count() >= 1
        before, n_requests = _visible_traces(page, "left"), len(page.requests)
        _move_slider(page, "left", 0.02)
        page.wait_for_timeout(500)
        after = _visible_traces(page, "left")
        assert len(before) == len(after) == 2 and before != after
        assert len(page.requests) == n_requests  # the slider works in the browser
        _screenshot(page, "app_stand_in_predictor.png")

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
        _predict_and_wait(page)
        shot = _screenshot(page, "app_end_to_end.png")

        for side in ("right", "left"):
            text = page.locator(f"#result-{side}").inner_text()
            assert f"patient's {side}" in text
            assert re.search(r"\d+\.\d %", text), text  # a probability on each side
        assert page.locator("#download").is_visible()
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
