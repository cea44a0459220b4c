"""The app in a real browser: Debian's Chromium driven by playwright, as a visitor would use it.

Every check runs at a desktop (1400x1000) and a phone (390x844) viewport on the shipped bundle (the tiny test
bundle before it exists): the score columns of both candidate tables inside the viewport, a K at the slider's
maximum and a question at the length limit answering, an error in one method leaving the other's result, a new
upload clearing the old results, the uploaded picture and the heatmap's top-row labels uncovered, a photo flagged
as outside the bundle's domain, every tab reachable on a phone (on a 360x640 one too, with the picture and the
examples), an example showing its captions on click, in view.
Each step leaves a screenshot in the test's tmp_path. CI installs ``chromium`` (``.ci/run``); without it and outside
CI the tests are skipped.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from capdemo import ui
from tests.app_server import coco_photo, corrupt_png, running_app, served_bundle, shapes_image

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
TIMEOUT_MS = 90_000  # generous: CI machines are small and shared
VIEWPORTS = {"desktop": {"width": 1400, "height": 1000}, "phone": {"width": 390, "height": 844}}
SMALL_PHONE = {"width": 360, "height": 640}
SCORE_HEADERS = ("CLIP score", "chosen")
TAB_NAMES = ["Caption", "Ask (VQA)", "Embedding space", "Batch", "About"]

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
def browser():
    from playwright.sync_api import expect, sync_playwright

    expect.set_options(timeout=TIMEOUT_MS)
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            yield launched
        finally:
            launched.close()


def open_page(browser, url: str, name: str, viewport: dict):
    """A fresh page (its own Gradio session) at ``viewport``, loaded and ready, collecting its script errors."""
    page = browser.new_page(viewport=viewport)
    page.set_default_timeout(TIMEOUT_MS)
    page.viewport_name = name
    page.script_errors = []
    page.on("pageerror", lambda error: page.script_errors.append(str(error)))
    page.goto(url, wait_until="load")
    page.locator("#caption-button").wait_for()
    return page


@pytest.fixture(params=list(VIEWPORTS))
def page(request, browser, url):
    """A fresh page at each viewport."""
    page = open_page(browser, url, request.param, VIEWPORTS[request.param])
    yield page
    page.close()


@pytest.fixture(scope="module")
def shapes_png(tmp_path_factory) -> Path:
    return shapes_image(tmp_path_factory.mktemp("images") / "shapes.png")


def upload(page, path: Path) -> None:
    page.locator("#image-input input[type=file]").set_input_files(str(path))
    page.locator("#image-input img").first.wait_for()


def caption_now(page) -> None:
    """Click Caption and wait until every method's caption box is filled."""
    from playwright.sync_api import expect

    page.locator("#caption-button").click()
    for box in page.locator(".capdemo-caption textarea").all()[:2]:
        expect(box).not_to_have_value("")


def scroll_to(page, selector: str) -> None:
    """Bring an output into view as a visitor scrolling down would: Gradio's images load lazily, so one far below
    the fold (the heatmap on a phone, under three methods' tables) has no size until it is near the viewport."""
    page.locator(selector).evaluate("element => element.scrollIntoView({block: 'center'})")


def shot(page, tmp_path: Path, name: str) -> Path:
    path = tmp_path / f"{page.viewport_name}-{name}.png"
    page.screenshot(path=str(path), full_page=True)
    return path


def set_slider(page, elem_id: str, value: float) -> None:
    """Type ``value`` into a slider's number box and wait until the slider itself shows it."""
    from playwright.sync_api import expect

    number = page.locator(f"#{elem_id} input[type=number]")
    number.scroll_into_view_if_needed()
    number.fill(str(value))
    number.press("Enter")
    number.blur()
    expect(page.locator(f"#{elem_id} input[type=range]")).to_have_value(str(value))


def header_box(page, table_id: str, header: str) -> dict:
    cell = page.locator(f"#{table_id} th[title='{header}']").first
    cell.scroll_into_view_if_needed()
    return cell.evaluate("""th => { const r = th.getBoundingClientRect(); const span = th.querySelector('span');
        return {left: r.left, right: r.right, clipped: span.scrollWidth > span.clientWidth + 1,
                lines: Math.round(span.getBoundingClientRect().height / parseFloat(getComputedStyle(span).lineHeight))};
    }""")


def test_score_columns_are_inside_the_viewport_and_headers_never_break_mid_word(page, shapes_png, tmp_path):
    upload(page, shapes_png)
    caption_now(page)
    width = page.viewport_size["width"]
    for table in ("maccap-candidates", "tomcap-candidates"):
        for header in SCORE_HEADERS:
            box = header_box(page, table, header)
            assert 0 <= box["left"] and box["right"] <= width, f"{table} {header}: {box} outside 0..{width}"
            assert not box["clipped"], f"{table} {header} is cut off: {box}"
            assert box["lines"] <= len(header.split()), f"{table} {header} breaks inside a word: {box}"
        grid = page.locator(f"#{table} [role=grid]")
        assert grid.evaluate("g => g.scrollWidth <= g.clientWidth + 1"), f"{table} scrolls sideways"
        score = page.locator(f"#{table} [data-testid='cell-0-1'] span")  # the best candidate's CLIP score
        assert score.evaluate("s => s.getClientRects().length") == 1, f"{table}: a score breaks over lines"
        assert score.evaluate("""s => s.getBoundingClientRect().right <=
            s.closest('[role=gridcell]').getBoundingClientRect().right + 0.5"""), f"{table}: a score is cut off"
        box = score.bounding_box()
        assert 0 <= box["x"] and box["x"] + box["width"] <= width, f"{table}: the score is outside the viewport"
    shot(page, tmp_path, "caption")
    assert page.script_errors == []


def test_k_at_the_slider_maximum_and_a_question_at_the_length_limit_both_answer(page, shapes_png, tmp_path):
    from playwright.sync_api import expect

    upload(page, shapes_png)
    page.get_by_text("TOMCap settings").click()
    k_max = int(page.locator("#tomcap-k input[type=number]").get_attribute("max"))
    set_slider(page, "tomcap-k", k_max)
    caption_now(page)
    assert not page.locator("#tomcap-caption textarea").input_value().startswith("⚠")
    expect(page.locator("#tomcap-neighbours [role=grid]")).to_have_attribute("aria-rowcount", str(k_max + 1))
    shot(page, tmp_path, "k-max")

    page.get_by_role("tab", name="Ask (VQA)").click()
    question = page.locator("#question textarea")
    limit = int(question.get_attribute("maxlength"))
    question.fill(("what colour is the circle on the left of the square " * 20)[:limit])
    page.locator("#ask-button").click()
    answer = page.locator("#answer textarea")
    expect(answer).not_to_have_value("")
    assert not answer.input_value().startswith("⚠"), answer.input_value()
    shot(page, tmp_path, "question-limit")


def test_an_error_in_one_method_leaves_the_others_result_and_a_one_line_message(page, shapes_png, tmp_path):
    from playwright.sync_api import expect

    upload(page, shapes_png)
    page.get_by_text("Bring your own captions").click()
    page.locator("#retrieve-from").get_by_text("my captions").click()  # none added yet: TOMCap cannot retrieve
    page.locator("#caption-button").click()
    tomcap = page.locator("#tomcap-caption textarea")
    expect(tomcap).to_have_value("⚠ TOMCap: no captions of yours yet: add some under 'Bring your own captions' first")
    expect(page.locator("#maccap-caption textarea")).not_to_have_value("")
    assert not page.locator("#maccap-caption textarea").input_value().startswith("⚠")
    expect(page.locator("#maccap-candidates")).to_be_visible()  # MacCap's result stays whole
    expect(page.locator("#tomcap-candidates")).to_be_hidden()
    assert page.locator(".toast-body").count() == 0  # no pop-up, no red badges: the message sits in place
    shot(page, tmp_path, "one-method-error")

    page.locator("#my-captions-text textarea").fill("a giraffe standing in tall grass\ntwo zebras at a river")
    page.locator("#my-captions-button").click()
    expect(page.locator("#my-captions-status")).to_contain_text("2 captions of yours embedded")
    page.get_by_text("TOMCap settings").click()
    set_slider(page, "tomcap-k", 2)
    page.locator("#caption-button").click()
    expect(page.locator("#tomcap-caption textarea")).not_to_have_value(re.compile("^(⚠.*)?$"))
    expect(page.locator("#tomcap-neighbours")).to_contain_text("mine")
    assert "bundle" not in page.locator("#tomcap-neighbours [role=grid]").inner_text()
    shot(page, tmp_path, "my-captions")


def test_the_ask_tab_answers_the_readmes_question_about_the_first_example(page, bundle, tmp_path):
    """README: "how many objects are there?" on the shipped bundle's first example (one small square) answers 1."""
    import json

    from playwright.sync_api import expect

    listed = json.loads((Path(bundle) / "examples" / "scenes.json").read_text())
    assert listed[0]["file"].endswith("-single.png")  # the shipped bundle's first example shows one object
    upload(page, Path(bundle) / listed[0]["file"])
    page.get_by_role("tab", name="Ask (VQA)").click()
    page.locator("#question textarea").fill("how many objects are there?")
    page.locator("#ask-button").click()
    expect(page.locator("#answer textarea")).to_have_value("1")
    shot(page, tmp_path, "ask")


def test_an_example_question_shows_its_picture_and_is_answered_as_its_world_answers_it(page, bundle, shapes_png,
                                                                                      tmp_path):
    """The Ask tab's first example question (about the first example): clicking it puts that picture in the input
    and the question in the box, answers it with the world's answer, and clears the captions of the image before."""
    from playwright.sync_api import expect

    from capdemo.bundle import Bundle
    from capdemo.vqa import example_questions

    asked = example_questions(Bundle.load(bundle))
    if not asked:
        pytest.skip("the bundle ships no example questions (the tiny test bundle)")
    upload(page, shapes_png)
    caption_now(page)
    page.get_by_role("tab", name="Ask (VQA)").click()
    page.locator("#example-questions tbody tr").first.click()
    expect(page.locator("#question textarea")).to_have_value(asked[0].question)
    expect(page.locator("#answer textarea")).to_have_value(asked[0].answer)
    assert asked[0].image.name in page.locator("#image-input img").first.get_attribute("src")
    for method in ("maccap", "tomcap"):  # the uploaded image's captions went with it
        expect(page.locator(f"#{method}-caption textarea")).to_have_value("")
    shot(page, tmp_path, "example-question")


def test_an_example_picture_clears_the_answer_about_the_image_before(page, shapes_png, tmp_path):
    """Clicking an example is a new image, as an upload is: the answer about the previous one goes (it once stayed,
    next to the example's picture), and the example's captions show."""
    from playwright.sync_api import expect

    upload(page, shapes_png)
    page.get_by_role("tab", name="Ask (VQA)").click()
    page.locator("#question textarea").fill("how many objects are there?")
    page.locator("#ask-button").click()
    expect(page.locator("#answer textarea")).not_to_have_value("")
    page.locator("#examples .gallery-item").nth(1).click()
    expect(page.locator("#maccap-caption textarea")).not_to_have_value("")
    expect(page.locator("#answer textarea")).to_have_value("")
    shot(page, tmp_path, "example-clears-answer")


def test_a_new_upload_clears_the_old_results(page, shapes_png, tmp_path):
    from playwright.sync_api import expect

    upload(page, shapes_png)
    caption_now(page)
    scroll_to(page, "#heatmap")
    expect(page.locator("#heatmap img")).to_be_visible()
    upload(page, corrupt_png(tmp_path / "broken.png"))
    for method in ("maccap", "tomcap"):
        expect(page.locator(f"#{method}-caption textarea")).to_have_value("")
        expect(page.locator(f"#{method}-candidates")).to_be_hidden()
    expect(page.locator("#heatmap")).to_be_hidden()
    expect(page.locator("#timings")).to_be_hidden()
    page.locator("#caption-button").click()
    for method in ("maccap", "tomcap"):  # the bad upload: one line where each caption goes
        expect(page.locator(f"#{method}-caption textarea")).to_have_value(
            re.compile(r"^⚠ broken\.png: truncated or corrupt image data[^\n]*$"))
    assert "Traceback" not in page.content()
    shot(page, tmp_path, "new-upload")


def test_the_heatmap_top_row_labels_are_not_covered(page, shapes_png, tmp_path):
    upload(page, shapes_png)
    caption_now(page)
    scroll_to(page, "#heatmap")
    image = page.locator("#heatmap img")
    image.scroll_into_view_if_needed()
    box = image.bounding_box()
    covered = image.evaluate("""(img) => { const r = img.getBoundingClientRect(); const hits = [];
        for (let i = 1; i < 20; i++) { const x = r.left + r.width * i / 20, y = r.top + 6;
            if (document.elementFromPoint(x, y) !== img) hits.push(Math.round(x)); }
        return hits; }""")
    assert covered == [], f"something lies over the heatmap's top row at x = {covered}"
    assert box["width"] >= 300  # shown large (the 56 px input is enlarged), not as a thumbnail
    shot(page, tmp_path, "heatmap")


def tab_bottoms(page) -> dict[str, float]:
    """Where each tab ends on the page, by its name, in the page's order."""
    bottoms = {}
    for tab in page.get_by_role("tab").all():
        box = tab.bounding_box()
        bottoms[tab.inner_text().strip()] = box["y"] + box["height"]
    return bottoms


def shown_picture(page) -> dict:
    """The uploaded picture as drawn inside the image input: its width and height on the page (``w``, ``h``) and
    everything else drawn over it (``covering``)."""
    image = page.locator("#image-input img").first
    image.scroll_into_view_if_needed()
    return image.evaluate("""async (img) => { await img.decode();  // its natural size is known once decoded
        const r = img.getBoundingClientRect(), fit = getComputedStyle(img).objectFit;
        let scale = Math.min(r.width / img.naturalWidth, r.height / img.naturalHeight);
        if (fit === 'scale-down') scale = Math.min(scale, 1);
        const w = img.naturalWidth * scale, h = img.naturalHeight * scale;  // the picture drawn inside the box
        const left = r.left + (r.width - w) / 2, top = r.top + (r.height - h) / 2, covering = [];
        // everything drawn in the input but the picture (labels ignore the pointer, so hit-testing misses them)
        for (const other of img.closest('#image-input').querySelectorAll('*')) {
            const box = other.getBoundingClientRect();
            if (other.contains(img) || img.contains(other) || box.width < 2 || box.height < 2
                || !other.checkVisibility({opacityProperty: true, visibilityProperty: true})) continue;
            if (box.left < left + w - 1 && box.right > left + 1 && box.top < top + h - 1 && box.bottom > top + 1)
                covering.push(`${other.tagName} ${other.getAttribute('class')}: ${other.textContent.trim()}`);
        }
        return {covering, w, h}; }""")


def test_the_whole_picture_shows_in_the_image_input(page, shapes_png, tmp_path):
    """No label or button lies over the uploaded picture (the input's floating label once hid its top fifth, and
    with it two of the three triangles of the third example), and it shows large at both sizes: on a phone, with
    every tab still on the first screen (test_every_tab_is_reachable...), it once had only 130 px."""
    upload(page, shapes_png)
    shown = shown_picture(page)
    assert shown["covering"] == [], f"drawn over the picture: {shown['covering']}"
    assert min(shown["w"], shown["h"]) >= 200  # the 56 px scene enlarged, not a thumbnail
    thumbnails = [item.bounding_box()["width"] for item in page.locator("#examples .gallery-item").all()]
    assert thumbnails and min(thumbnails) >= 64, thumbnails  # the examples below it, not shrunk to fit it
    shot(page, tmp_path, "image-input")


def test_a_photo_is_flagged_outside_the_domain_and_a_shapes_image_is_not(page, bundle, shapes_png, tmp_path):
    from playwright.sync_api import expect

    from capdemo.domain import Domain
    from capdemo.bundle import Bundle

    photo = coco_photo()
    if photo is None or Domain.from_manifest(Bundle.load(bundle).manifest) is None:
        pytest.skip("needs a COCO photo and a bundle that records its domain")
    expect(page.locator(".capdemo-header").first).to_contain_text("Domain:")
    upload(page, shapes_png)
    caption_now(page)
    assert page.locator("#caption-notice").inner_text().strip() == ""
    upload(page, photo)
    caption_now(page)
    expect(page.locator("#caption-notice")).to_contain_text("outside the bundle's domain")
    shot(page, tmp_path, "domain-warning")


def test_every_tab_is_reachable_and_the_plot_is_not_squeezed(page, shapes_png, tmp_path):
    from playwright.sync_api import expect

    for tab in page.get_by_role("tab").all():
        expect(tab).to_be_visible()
    bottoms = tab_bottoms(page)
    assert list(bottoms) == TAB_NAMES  # none folded behind "..."
    assert max(bottoms.values()) <= page.viewport_size["height"], f"a tab ends below the first screen: {bottoms}"
    upload(page, shapes_png)
    page.get_by_role("tab", name="Embedding space").click()
    page.locator("#embedding-button").click()
    plot = page.locator("#embedding-plot .js-plotly-plot")
    expect(plot).to_be_visible()
    box = plot.bounding_box()
    assert box["height"] >= 300 and box["width"] >= 0.7 * min(page.viewport_size["width"], 800), box
    area = page.locator("#embedding-plot .nsewdrag").first.bounding_box()  # the plotting area itself
    assert area["width"] >= 0.6 * box["width"] and area["height"] >= 200, (area, box)  # not squeezed by a legend
    shot(page, tmp_path, "embedding")
    page.get_by_role("tab", name="About").click()
    about = page.locator("#about-text")
    expect(about).to_contain_text("sha256")
    assert about.locator("table").count() >= 2 and "/weights/" not in about.inner_text()
    shot(page, tmp_path, "about")


def test_on_a_small_phone_the_picture_the_examples_and_every_tab_share_the_first_screen(browser, url, shapes_png,
                                                                                         tmp_path):
    """At 360x640, the smallest common phone screen, the page's first screen holds the title, the domain line, the
    picture, the examples and every tab (it once ended with the examples, the tabs a screen below), and the picture
    still shows larger than an example's thumbnail."""
    page = open_page(browser, url, "small-phone", SMALL_PHONE)
    try:
        upload(page, shapes_png)
        shown = shown_picture(page)
        page.evaluate("window.scrollTo(0, 0)")
        bottoms = tab_bottoms(page)
        assert list(bottoms) == TAB_NAMES and max(bottoms.values()) <= SMALL_PHONE["height"], bottoms
        thumbnails = [item.bounding_box() for item in page.locator("#examples .gallery-item").all()]
        assert thumbnails and min(box["width"] for box in thumbnails) >= 64, thumbnails
        assert shown["covering"] == [] and min(shown["w"], shown["h"]) >= 1.5 * thumbnails[0]["width"], shown
        shot(page, tmp_path, "first-screen")
    finally:
        page.close()


def test_in_dark_mode_the_plots_show_the_page_through_and_their_text_is_light(page, url, shapes_png, tmp_path):
    """Issue #16: plots follow the theme (white plots on a dark page were the complaint)."""
    from playwright.sync_api import expect

    page.goto(url + "?__theme=dark", wait_until="load")
    page.locator("#caption-button").wait_for()
    upload(page, shapes_png)
    page.get_by_role("tab", name="Embedding space").click()
    page.locator("#embedding-button").click()
    plot = page.locator("#embedding-plot .js-plotly-plot")
    expect(plot).to_be_visible()
    assert page.evaluate("document.body.classList.contains('dark')")
    backgrounds = plot.evaluate("""p => [...p.querySelectorAll('.main-svg')].map(
        svg => getComputedStyle(svg).backgroundColor)""")
    assert backgrounds and set(backgrounds) == {"rgba(0, 0, 0, 0)"}, backgrounds  # the dark page shows through
    title = plot.locator(".main-svg text.gtitle").first
    red, green, blue = map(int, re.findall(r"\d+", title.evaluate("t => getComputedStyle(t).fill"))[:3])
    assert min(red, green, blue) >= 180, (red, green, blue)  # light text on the dark page
    shot(page, tmp_path, "dark-embedding")


def test_an_example_shows_its_captions_on_click(page, tmp_path):
    from playwright.sync_api import expect

    assert page.locator("#maccap-candidates").is_hidden() and page.locator("#heatmap").is_hidden()  # no clutter
    page.locator(".gallery-item, button.gallery-item, [data-testid='examples'] button").first.click()
    expect(page.locator("#maccap-caption textarea")).not_to_have_value("")
    expect(page.locator("#maccap-candidates")).to_be_visible()
    # in view without scrolling: on a phone the captions land a screen below the examples, and the page brings
    # them up; on a desktop they already show beside the picture, and the page stays where it was
    first_caption = page.locator(".capdemo-caption textarea").first
    page.wait_for_function("box => { const r = box.getBoundingClientRect();"
                           " return r.top >= 0 && r.bottom <= window.innerHeight; }",
                           arg=first_caption.element_handle())
    if page.viewport_name == "desktop":
        assert page.evaluate("window.scrollY") == 0
    shot(page, tmp_path, "example")


def test_batch_shows_every_method_and_the_error_column(page, shapes_png, tmp_path):
    from playwright.sync_api import expect

    page.get_by_role("tab", name="Batch").click()
    page.locator("#batch-files input[type=file]").set_input_files([str(shapes_png),
                                                                   str(corrupt_png(tmp_path / "broken.png"))])
    page.locator("#batch-button").click()
    table = page.locator("#batch-table [role=grid]")
    expect(table).to_have_attribute("aria-rowcount", "3")  # header + two images
    width = page.viewport_size["width"]
    headers = [h for h in page.locator("#batch-table th").all_inner_texts() if h.strip()]
    assert "tomcap caption" in headers and "error" in headers
    expect(page.locator("#batch-table")).to_contain_text("truncated or corrupt")
    if page.viewport_name == "phone":  # seven columns do not fit 390 px: the table scrolls sideways instead
        shot(page, tmp_path, "batch")
        return
    for header in ("tomcap caption", "tomcap clip_score", "error"):
        cell = page.locator(f"#batch-table th[title='{header}']").first
        cell.scroll_into_view_if_needed()
        box = cell.bounding_box()
        assert 0 <= box["x"] and box["x"] + box["width"] <= width + 0.5, f"{header}: {box} outside 0..{width}"
    assert table.evaluate("g => g.scrollWidth <= g.clientWidth + 1"), "the batch table scrolls sideways"
    expect(page.locator("#batch-table")).to_contain_text("truncated or corrupt")
    shot(page, tmp_path, "batch")
