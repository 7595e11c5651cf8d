"""The notebook in a real browser: Voilà serves it on 127.0.0.1, headless Chromium (driven by
Playwright) picks an image, edits the prompt, presses Run and reads the streamed caption."""

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync"]

IN_CI = os.environ.get("CI", "").lower() == "true"
pytestmark = pytest.mark.skipif(
    not Path(CHROMIUM).exists() and not IN_CI, reason="needs Debian's chromium (apt-get install chromium)"
)
ARTIFACTS = Path(os.environ.get("MAGMA_TEST_ARTIFACTS", ROOT / "test-artifacts"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def voila_url(tmp_path_factory):
    pytest.importorskip("voila")
    port = free_port()
    log = open(tmp_path_factory.mktemp("voila") / "voila.log", "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "voila", "magma_interactive.ipynb", "--no-browser", f"--port={port}",
         "--Voila.ip=127.0.0.1", "--show_tracebacks=True"],
        cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    deadline = time.time() + 60
    while time.time() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                break
        time.sleep(0.3)
    yield f"http://127.0.0.1:{port}/"
    proc.terminate()
    proc.wait(timeout=20)
    log.close()


def set_slider(page, label: str, value: str) -> None:
    readout = page.locator(".widget-slider", has_text=label).locator(".widget-readout")
    readout.click()
    page.keyboard.press("Control+A")
    page.keyboard.type(value)
    page.keyboard.press("Enter")


def image_src(page, name: str) -> str:
    return page.locator(f".magma-{name} img, img.magma-{name}").first.get_attribute("src") or ""


def test_notebook_runs_in_chromium(voila_url):
    if not Path(CHROMIUM).exists():
        pytest.fail("CI must run the browser test: install Debian's chromium (apt-get install -y chromium)")
    sync_api = pytest.importorskip("playwright.sync_api")
    truth = json.loads((ROOT / "demo_example_images" / "scenes.json").read_text())
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        page = browser.new_page(viewport={"width": 1280, "height": 1800})
        page.goto(voila_url, timeout=180_000)
        run = page.get_by_role("button", name="Run")
        run.wait_for(timeout=180_000)
        page.locator(".magma-status", has_text="tokens/s").wait_for(timeout=120_000)  # the notebook's first run
        page.locator("select").first.select_option("scene_5.png")
        page.get_by_label("Prompt").fill("A picture of")
        set_slider(page, "seed", "42")
        set_slider(page, "top_p", "1")  # no nucleus cut, so a new temperature shows in every bar
        run.click()
        expected = [f"{o['colour']} {o['shape']}" for o in truth["scene_5.png"]["objects"]]
        page.wait_for_function(
            "(words) => { const t = document.querySelector('.magma-caption').innerText;"
            " return words.every(w => t.includes(w)); }",
            arg=expected, timeout=60_000,
        )
        page.locator(".magma-status", has_text="run 2 ·").wait_for(timeout=60_000)  # the click's run, finished
        caption = page.locator(".magma-caption").inner_text()
        assert all(w in caption for w in expected), caption
        assert image_src(page, "chart") and image_src(page, "heatmap")
        page.screenshot(path=str(ARTIFACTS / "notebook.png"), full_page=True)

        # moving the temperature slider re-draws the chart from the same logits: no new run
        chart, status = image_src(page, "chart"), page.locator(".magma-status").inner_text()
        set_slider(page, "temperature", "1.4")
        page.wait_for_function("(old) => { const i = document.querySelector('.magma-chart img, img.magma-chart');"
                               " return i && i.getAttribute('src') !== old; }", arg=chart, timeout=30_000)
        assert page.locator(".magma-status").inner_text() == status
        assert page.locator(".magma-caption").inner_text() == caption
        page.screenshot(path=str(ARTIFACTS / "notebook_temperature.png"), full_page=True)
        browser.close()
