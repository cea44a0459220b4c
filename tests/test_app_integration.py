"""The app served over HTTP and driven with gradio_client, as an API user would: /caption, /vqa and the rest.

The served bundle comes from ``tests.app_server.served_bundle`` (the shipped
``weights/shapes`` once it exists). Inputs: a generated shapes-world image and a
real COCO photo from the project data.
"""

from __future__ import annotations

import csv
import json
import re
import threading
import time
from pathlib import Path

import pytest
from gradio_client import Client, handle_file
from gradio_client.exceptions import AppError
from gradio_client.utils import QueueError, Status
from PIL import Image

from capdemo import figures, ui
from capdemo import methods as registry
from capdemo.bundle import Bundle
from capdemo.pipeline import DEFAULT_METHOD_KEY, Captioner, lead_with
from tests.app_server import ROOT, coco_photo, corrupt_png, running_app, served_bundle, shapes_image

SETTINGS = dict(maccap_samples=6, maccap_beams=2, maccap_noise_variance=0.016, maccap_n_cr=3,
                maccap_max_new_tokens=12, maccap_seed=0, tomcap_k=3, tomcap_beams=3, tomcap_max_new_tokens=10)
BOTH = ["maccap", "tomcap"]


def output_names(bundle: Path) -> tuple[str, ...]:
    """/caption's outputs: per method in the bundle's order (its ``default_method`` first) its caption and candidates
    (and neighbours for TOMCap, the method with a datastore), then the heatmap, the timings, the image's notice line
    and every result as JSON."""
    manifest = Bundle.load(bundle, verify=False).manifest
    held = {method.name: method for method in registry.methods() if method.name in manifest["components"]}
    order = list(lead_with(manifest.get(DEFAULT_METHOD_KEY), held))  # the order Captioner.from_bundle serves
    per_method = {name: (f"{name}_caption", f"{name}_table", *(("neighbours",) if name == "tomcap" else ()))
                  for name in order}
    return (*(output for name in order for output in per_method[name]), "heatmap", "timings", "notice", "details")


def caption(client: Client, path: Path, methods: list[str], **settings) -> dict:
    outputs = client.predict(image=handle_file(str(path)), methods=methods, api_name="/caption",
                             **{**SETTINGS, **settings})
    return dict(zip(client.output_names, outputs, strict=True))


@pytest.fixture(scope="module")
def bundle(tiny_bundle_dir) -> Path:
    return served_bundle(tiny_bundle_dir)


@pytest.fixture(scope="module")
def url(bundle):
    demo = ui.build_app(str(bundle), device="cpu")
    with running_app(demo) as address:
        yield address


def connect(url: str, bundle: Path) -> Client:
    """A visitor's client of the app at ``url``, serving ``bundle``; caption() names its outputs by that bundle."""
    client = Client(url, verbose=False)
    client.output_names = output_names(bundle)
    return client


@pytest.fixture(scope="module")
def client(url, bundle):
    return connect(url, bundle)


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> dict[str, Path]:
    found = {"shapes": shapes_image(tmp_path_factory.mktemp("images") / "shapes.png")}
    photo = coco_photo()
    if photo is not None:
        found["coco"] = photo
    return found


def image_of(images: dict[str, Path], name: str) -> Path:
    if name not in images:
        pytest.skip("no COCO photo: set CAPDEMO_DATA_DIR or provide ../shared/data/images/coco")
    return images[name]


def rows(table: dict) -> list[dict]:
    """A Dataframe output as the client receives it ({"headers", "data"}) -> one dict per row."""
    return [dict(zip(table["headers"], row)) for row in table["data"]]


@pytest.mark.parametrize("name", ["shapes", "coco"])
def test_caption_outputs_are_complete_and_consistent(client, images, name):
    path = image_of(images, name)
    out = caption(client, path, BOTH)
    heatmap, neighbours, timings, details = out["heatmap"], out["neighbours"], out["timings"], out["details"]
    # MacCap's candidates are ranked by their CLIP score; TOMCap's keep the paper's beam order (its default)
    shown_tables = ((out["maccap_caption"], out["maccap_table"], SETTINGS["maccap_samples"], True),
                    (out["tomcap_caption"], out["tomcap_table"], SETTINGS["tomcap_beams"], False))
    for shown, table, count, by_score in shown_tables:
        candidates = rows(table)
        assert len(candidates) == count
        scores = [c["CLIP score"] for c in candidates]
        assert (scores == sorted(scores, reverse=True)) or not by_score
        assert shown == candidates[0]["caption"] and candidates[0]["chosen"] == "✓"
        assert [c["chosen"] for c in candidates[1:]] == [""] * (count - 1)

    with Image.open(path) as original:
        size = original.size
    assert details["image_size"] == list(size)
    grid_rows, grid_cols = details["grid"]
    patches = details["results"]["maccap"]["patches"]
    assert len(patches) == SETTINGS["maccap_n_cr"]
    assert len({p["index"] for p in patches}) == SETTINGS["maccap_n_cr"]
    for patch in patches:
        assert 0 <= patch["row"] < grid_rows and 0 <= patch["col"] < grid_cols
        assert patch["index"] == patch["row"] * grid_cols + patch["col"]

    listed = rows(neighbours)
    assert len(listed) == SETTINGS["tomcap_k"] and all(n["neighbour caption"] for n in listed)
    assert [n["neighbour caption"] for n in listed] == [n["text"] for n in details["results"]["tomcap"]["neighbours"]]

    with Image.open(heatmap) as drawn:  # the overlay keeps the photo's aspect ratio; the colour scale is under it
        width, height = drawn.width, drawn.height - figures.LEGEND_HEIGHT
        assert max(width, height) == figures.DISPLAY_SIDE
        assert abs(width / height - size[0] / size[1]) < 0.02
    assert (out["notice"] != "") == (name == "coco")  # a photo is outside the shapes bundle's domain
    stages = {(r["method"], r["stage"]): r["ms"] for r in rows(timings)}
    assert ("MacCap", "total") in stages and ("TOMCap", "total") in stages
    assert stages[("MacCap", "encode")] > 0 or details["results"]["maccap"]["timings_ms"]["encode"] > 0


@pytest.mark.parametrize("name", ["shapes", "coco"])
def test_vqa_answer_comes_with_its_evidence(client, images, name):
    path = image_of(images, name)
    answer, top, generated, caption, prompt = client.predict(
        handle_file(str(path)), "What colour is the biggest shape?", api_name="/vqa"
    )
    ranked = rows(top)
    assert 1 <= len(ranked) <= ui.AppConfig().vqa_top_k
    scores = [r["score"] for r in ranked]
    assert scores == sorted(scores, reverse=True) and answer == ranked[0]["answer"]
    assert prompt.endswith("Question: What colour is the biggest shape? Answer:") and caption in prompt
    assert isinstance(generated, str)


def test_embedding_endpoint_returns_two_plots_and_the_gap_table(client, images):
    projection, histogram, table, note = client.predict(handle_file(str(images["shapes"])), "pca",
                                                        api_name="/embedding")
    assert note == ""
    for figure in (projection, histogram):
        assert figure["type"] == "plotly" and json.loads(figure["plot"])["data"]
    names = {trace["name"] for trace in json.loads(projection["plot"])["data"]}
    assert {"global image embedding", "image patches", "MacCap region features I_cr"} <= names
    assert rows(table) and all(isinstance(r["value"], float) for r in rows(table))


def test_batch_endpoint_returns_a_table_and_downloads(client, images, tmp_path):
    broken = corrupt_png(tmp_path / "broken.png")
    files = [handle_file(str(images["shapes"])), handle_file(str(broken))]
    table, csv_path, json_path = client.predict(files, api_name="/batch")
    listed = rows(table)
    assert [r["image"] for r in listed] == ["shapes.png", "broken.png"]
    assert listed[0]["error"] == "" and listed[0]["maccap caption"] == listed[0]["maccap caption"].strip()
    assert "truncated or corrupt" in listed[1]["error"]
    with open(csv_path, newline="") as handle:
        assert [r["image"] for r in csv.DictReader(handle)] == ["shapes.png", "broken.png"]
    assert [r["image"] for r in json.loads(Path(json_path).read_text())] == ["shapes.png", "broken.png"]


def test_about_endpoint_describes_the_served_bundle(client, bundle):
    text, info = client.predict(api_name="/about")
    assert f"`{info['name']}`" in text and "--weights" in text and "| file | size | sha256 |" in text
    assert str(bundle.resolve()) not in text + json.dumps(info)  # nothing of the server's file system


def test_bad_requests_get_one_line_messages_in_place_and_the_server_keeps_serving(client, images, tmp_path):
    broken = corrupt_png(tmp_path / "broken.png")
    out = caption(client, broken, BOTH)
    for method in ("maccap", "tomcap"):
        assert out[f"{method}_caption"].startswith("⚠ broken.png: truncated or corrupt image data")
        assert "Traceback" not in out[f"{method}_caption"] and "\n" not in out[f"{method}_caption"]
    answer, *_ = client.predict(handle_file(str(images["shapes"])), "   ", api_name="/vqa")
    assert answer.startswith("⚠ question is empty")
    with pytest.raises(AppError, match="less than minimum value 1"):  # Gradio checks the slider's range itself
        caption(client, images["shapes"], ["maccap"], maccap_samples=0)
    out = caption(client, images["shapes"], BOTH, maccap_samples=2.5)  # one method's bad setting: its own message
    assert out["maccap_caption"] == "⚠ MacCap: samples must be a whole number, got 2.5"
    assert out["tomcap_caption"] and not out["tomcap_caption"].startswith("⚠")  # the other's result stays
    assert caption(client, images["shapes"], ["tomcap"])["tomcap_caption"]


def test_a_full_queue_turns_requests_away_with_a_clear_message(tiny_bundle_dir, monkeypatch):
    captioner = Captioner.from_bundle(tiny_bundle_dir, device="cpu")
    example = handle_file(str(captioner.examples()[0]))
    entered, release = threading.Event(), threading.Event()
    caption = captioner.caption

    def held_caption(*args, **kwargs):
        entered.set()
        release.wait(60)
        return caption(*args, **kwargs)

    monkeypatch.setattr(captioner, "caption", held_caption)
    demo = ui.create_blocks(captioner, config=ui.AppConfig(concurrency_limit=1, max_queue_size=1))
    request = dict(image=example, methods=["tomcap"], **SETTINGS)
    with running_app(demo) as url:
        client = Client(url, verbose=False)
        try:
            running = client.submit(**request, api_name="/caption")
            assert entered.wait(60), "the first request never started"
            waiting = client.submit(**request, api_name="/caption")
            deadline = time.monotonic() + 60
            while waiting.status().code != Status.IN_QUEUE:
                assert time.monotonic() < deadline, "the second request never reached the queue"
                time.sleep(0.05)
            with pytest.raises(QueueError, match="Queue is full"):
                client.predict(**request, api_name="/caption")
        finally:
            release.set()
        assert running.result(timeout=60)[2] == waiting.result(timeout=60)[2]  # TOMCap's caption


def test_the_readme_client_example_runs(url, bundle, tmp_path, monkeypatch, capsys):
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## Using the app"):]
    example = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    assert 'api_name="/caption"' in example and 'api_name="/vqa"' in example
    (tmp_path / "weights").mkdir()
    (tmp_path / "weights" / "shapes").symlink_to(bundle.resolve(), target_is_directory=True)
    monkeypatch.chdir(tmp_path)  # the example reads weights/shapes/examples from the repository root
    exec(compile(example.replace("http://127.0.0.1:7860/", url), "README.md", "exec"), {})
    printed = capsys.readouterr().out
    assert "maccap: " in printed and "neighbours:" in printed and "patches (row, col):" in printed


def slider_bounds(client: Client) -> dict[str, tuple[float, float]]:
    """Every /caption parameter that the page shows as a slider, with the slider's minimum and maximum."""
    config = client.config
    by_id = {c["id"]: c for c in config["components"]}
    dependency = next(d for d in config["dependencies"] if d.get("api_name") == "caption")
    info = client.view_api(print_info=False, return_format="dict")["named_endpoints"]["/caption"]["parameters"]
    names = [p["parameter_name"] for p in info]
    sliders = {}
    for name, component_id in zip(names, dependency["inputs"]):
        props = by_id[component_id]["props"]
        if by_id[component_id]["type"] == "slider":
            sliders[name] = (props["minimum"], props["maximum"])
    return sliders


def test_every_decoding_slider_of_every_method_answers_at_its_minimum_and_its_maximum(client, images):
    sliders = slider_bounds(client)
    methods = sorted({name.split("_", 1)[0] for name in sliders})
    assert {"maccap_samples", "maccap_n_cr", "tomcap_k", "tomcap_max_new_tokens"} <= set(sliders)
    for name, (low, high) in sorted(sliders.items()):
        method = name.split("_", 1)[0]
        assert method in methods
        for value in (low, high):
            outputs = client.predict(image=handle_file(str(images["shapes"])), methods=[method],
                                     api_name="/caption", **{name: value})
            details = outputs[-1]
            assert details["errors"] == {}, f"{name}={value}: {details['errors']}"
            result = details["results"][method]
            assert result["candidates"] and result["caption"] == result["candidates"][0]["text"], f"{name}={value}"


def test_a_question_at_the_length_limit_answers(client, images, bundle):
    limit = Captioner.from_bundle(str(bundle), device="cpu").question_limit()
    assert 0 < limit <= 500
    question = ("what colour is the circle on the left of the square " * 20)[:limit]
    answer, top, generated, caption, prompt = client.predict(handle_file(str(images["shapes"])), question,
                                                             api_name="/vqa")
    assert not answer.startswith("⚠") and rows(top) and answer == rows(top)[0]["answer"]
    assert prompt.endswith(f"Question: {question.strip()} Answer:")
    too_long, *_ = client.predict(handle_file(str(images["shapes"])), question + "?", api_name="/vqa")
    assert too_long == f"⚠ question is {limit + 1} characters long; the limit is {limit}"


def test_my_captions_change_my_neighbours_and_never_another_sessions(url, bundle, images):
    """Two visitors: A adds captions of its own; A's TOMCap retrieves them, B's never sees them."""
    mine = ["a giraffe standing in tall grass", "two zebras drinking at a river", "an elephant under a tree",
            "a lion asleep on a rock", "a flock of birds over the sea"]
    visitor_a, visitor_b = connect(url, bundle), connect(url, bundle)
    status, archive = visitor_a.predict("\n".join(mine), None, api_name="/datastore")
    assert status.startswith("5 captions of yours embedded") and archive.endswith(".zip")
    image = handle_file(str(images["shapes"]))
    a_mine = caption(visitor_a, images["shapes"], ["tomcap"], tomcap_k=2, retrieve_from="mine")
    listed = rows(a_mine["neighbours"])
    assert len(listed) == 2 and {n["store"] for n in listed} == {"mine"}
    assert {n["neighbour caption"] for n in listed} <= set(mine)
    a_both = caption(visitor_a, images["shapes"], ["tomcap"], tomcap_k=4, retrieve_from="both")
    scores = [n["cosine"] for n in rows(a_both["neighbours"])]
    assert scores == sorted(scores, reverse=True)
    b_mine = caption(visitor_b, images["shapes"], ["tomcap"], retrieve_from="mine")
    assert b_mine["tomcap_caption"].startswith("⚠ TOMCap: no captions of yours yet")
    b_both = visitor_b.predict(image=image, methods=["tomcap"], retrieve_from="both", api_name="/caption")[-1]
    assert b_both["errors"]["tomcap"].startswith("TOMCap: no captions of yours yet")
    b_bundle = caption(visitor_b, images["shapes"], ["tomcap"], tomcap_k=4)
    assert {n["store"] for n in rows(b_bundle["neighbours"])} == {"bundle"}
    assert not {n["neighbour caption"] for n in rows(b_bundle["neighbours"])} & set(mine)
    bad, no_archive = visitor_b.predict("", None, api_name="/datastore")
    assert bad == "⚠ no captions: the text is empty or blank" and no_archive is None
