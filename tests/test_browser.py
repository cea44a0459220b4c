"""The app in a real browser: Debian's Chromium driven by playwright, as a visitor would use it.

Uploads an image, captions it, sees the captions, the candidates table, the
heatmap and the embedding plot; uploads a corrupt file and sees the error. Each
step leaves a screenshot in ``test-artifacts/``. CI installs ``chromium``
(``.ci/run``); elsewhere the test is skipped when ``/usr/bin/chromium`` is missing.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from capdemo import figures, ui
from capdemo.bundle import Bundle
from tests.app_server import ARTIFACTS, corrupt_png, running_app, served_bundle, shapes_image

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
TIMEOUT_MS = 60_000  # generous: CI machines are small and shared

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not CHROMIUM.exists() and not os.environ.get("CI"),
                       reason="needs Debian's chromium at /usr/bin/chromium (apt-get install chromium; .ci/run does)"),
]


@pytest.fixture(scope="module")
def bundle(tiny_bundle_dir) -> Path:
    return served_bundle(tiny_bundle_dir)


@pytest.fixture(scope="module")
def url(bundle):
    demo = ui.build_app(str(bundle), device="cpu")
    with running_app(demo) as address:
        yield address


@pytest.fixture(scope="module")
def page(url):
    from playwright.sync_api import expect, sync_playwright

    expect.set_options(timeout=TIMEOUT_MS)
    ARTIFACTS.mkdir(exist_ok=True)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.set_default_timeout(TIMEOUT_MS)
        page.script_errors = []
        page.on("pageerror", lambda error: page.script_errors.append(str(error)))
        page.goto(url, wait_until="load")
        page.locator("#caption-button").wait_for()
        try:
            yield page
        finally:
            browser.close()


def upload(page, path: Path) -> None:
    page.locator("#image-input input[type=file]").set_input_files(str(path))


def test_caption_candidates_heatmap_and_plot_render(page, bundle, tmp_path):
    from playwright.sync_api import expect

    samples = Bundle.load(bundle).component("maccap")["samples"]  # the Samples slider starts at the bundle's S
    upload(page, shapes_image(tmp_path / "shapes.png"))
    expect(page.locator("#image-input img").first).to_be_visible()
    page.locator("#caption-button").click()

    expect(page.locator("#tomcap-caption textarea")).not_to_have_value("")
    candidates = page.locator("#maccap-candidates [role=grid]")
    expect(candidates).to_have_attribute("aria-rowcount", str(samples + 1))  # header + one row per sample
    expect(candidates.locator('[data-testid="cell-0-2"]')).to_have_text("✓")  # the chosen candidate is marked
    best = candidates.locator('[data-testid="cell-0-3"]').inner_text().strip()
    assert page.locator("#maccap-caption textarea").input_value() == best
    heatmap = page.locator("#heatmap img")
    expect(heatmap).to_be_visible()
    assert heatmap.evaluate("img => img.complete && img.naturalWidth") == figures.DISPLAY_SIDE
    page.screenshot(path=str(ARTIFACTS / "browser-caption.png"), full_page=True)

    page.get_by_role("tab", name="Embedding space").click()
    page.locator("#embedding-button").click()
    traces = page.locator("#embedding-plot .js-plotly-plot .scatterlayer .trace")
    expect(traces.first).to_be_attached()
    assert traces.count() >= 3  # image, patches, captions, ...: one trace per kind
    expect(page.locator("#embedding-plot .js-plotly-plot")).to_be_visible()
    expect(page.locator("#gap-histogram .js-plotly-plot")).to_be_visible()
    page.screenshot(path=str(ARTIFACTS / "browser-embedding.png"), full_page=True)
    assert page.script_errors == []


def test_a_corrupt_upload_shows_a_clear_error(page, tmp_path):
    from playwright.sync_api import expect

    page.get_by_role("tab", name="Caption").click()
    upload(page, corrupt_png(tmp_path / "broken.png"))
    page.locator("#caption-button").click()
    message = page.get_by_text("broken.png: truncated or corrupt image data")
    expect(message.first).to_be_visible()
    assert "Traceback" not in page.content()
    page.wait_for_timeout(500)  # let the error pop-up finish fading in before the screenshot
    page.screenshot(path=str(ARTIFACTS / "browser-error.png"), full_page=True)
