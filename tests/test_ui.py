"""The app's event functions, called directly on the tiny bundle: the tables, images and figures they return."""

from __future__ import annotations

import json
import logging
import sys
import types
from pathlib import Path
from typing import Any

import gradio as gr
import numpy as np
import pandas as pd
import pytest
from gradio.data_classes import FileData
from PIL import Image

from capdemo import figures, ui
from capdemo.pipeline import Captioner
from capdemo.vqa import VQA_PROMPT
from tests.app_server import corrupt_png
from capdemo.testing import TINY_ANSWERS, TINY_MACCAP

SETTINGS = {"maccap": dict(samples=5, beams=2, noise_variance=0.016, n_cr=3, max_new_tokens=6, seed=1),
            "tomcap": dict(k=2, beams=3, max_new_tokens=7)}  # each method its own beams and length cap
BOTH = ["maccap", "tomcap"]
ALL = ["maccap", "tomcap", "capdec"]  # every method of the tiny bundle


@pytest.fixture(scope="module")
def captioner(tiny_bundle_dir) -> Captioner:
    return Captioner.from_bundle(tiny_bundle_dir, device="cpu")


@pytest.fixture
def app(captioner) -> ui.CaptionDemo:
    return ui.CaptionDemo(captioner)


@pytest.fixture(scope="module")
def example(captioner) -> str:
    return str(captioner.examples()[0])


@pytest.fixture(scope="module")
def both_view(captioner, example) -> ui.CaptionView:
    return ui.CaptionDemo(captioner).caption_event(example, BOTH, SETTINGS)


def fresh_image(tmp_path, seed: int) -> str:
    """An image no other test has shown the captioner (its encoder cache is shared by the module)."""
    pixels = np.random.default_rng(1000 + seed).integers(0, 255, (40, 48, 3), dtype=np.uint8)
    path = tmp_path / f"fresh-{seed}.png"
    Image.fromarray(pixels).save(path)
    return str(path)


def count_calls(monkeypatch, captioner, name: str) -> list:
    calls = []
    original = getattr(captioner, name)

    def spy(*args, **kwargs):
        calls.append(args)
        return original(*args, **kwargs)

    monkeypatch.setattr(captioner, name, spy)
    return calls


# --- /caption ---------------------------------------------------------------------------------------------------


def test_caption_tables_list_every_candidate_best_first_with_the_chosen_one_marked(both_view):
    maccap = both_view.methods["maccap"]
    table = maccap.candidates
    samples = SETTINGS["maccap"]["samples"]
    assert list(table.columns) == ["#", "CLIP score", "chosen", "sample", "caption"]  # numbers before the caption
    assert len(table) == samples and list(table["#"]) == list(range(1, samples + 1))
    assert sorted(table["sample"]) == list(range(samples))  # every noisy sample appears once
    assert table["CLIP score"].is_monotonic_decreasing
    assert list(table["chosen"]) == ["✓"] + [""] * (samples - 1)
    assert maccap.caption == table["caption"][0] and maccap.shown == maccap.caption and not maccap.error

    tom = both_view.methods["tomcap"].candidates  # TOMCap keeps the paper's beam order by default (select_by)
    beams = SETTINGS["tomcap"]["beams"]
    assert len(tom) == beams and list(tom["sample"]) == list(range(beams))  # beam 0 (highest beam score) first
    assert list(tom["chosen"]) == ["✓"] + [""] * (beams - 1)
    assert both_view.methods["tomcap"].caption == tom["caption"][0]


def test_caption_details_agree_with_the_tables(both_view):
    results = both_view.details["results"]
    assert set(results) == set(BOTH) and both_view.details["errors"] == {}
    for method in BOTH:
        table = both_view.methods[method].candidates
        listed = results[method]["candidates"]
        assert [c["text"] for c in listed] == list(table["caption"])
        assert np.allclose([c["clip_score"] for c in listed], table["CLIP score"], atol=5e-5)
        assert results[method]["caption"] == listed[0]["text"]
    neighbours = both_view.methods["tomcap"].neighbours
    assert [n["text"] for n in results["tomcap"]["neighbours"]] == list(neighbours["neighbour caption"])


def test_neighbours_are_k_captions_from_the_datastore_most_similar_first(both_view, captioner):
    table = both_view.methods["tomcap"].neighbours
    assert list(table.columns) == ["#", "cosine", "store", "neighbour caption"]
    assert len(table) == SETTINGS["tomcap"]["k"] and table["cosine"].is_monotonic_decreasing
    assert set(table["store"]) == {"bundle"}  # no captions of the visitor's own in this session
    store = captioner.shared("datastore")
    assert set(table["neighbour caption"]) <= set(store.captions[i] for i in range(len(store)))


def test_picked_patches_lie_in_the_grid_and_carry_the_grid_attention(both_view, captioner, example):
    rows, cols = captioner.encoder.grid_size
    assert both_view.details["grid"] == [rows, cols]
    patches = both_view.details["results"]["maccap"]["patches"]
    assert len(patches) == SETTINGS["maccap"]["n_cr"]
    grid = ui.attention_grid(captioner.encode([Image.open(example).convert("RGB")]))
    assert grid.shape == (rows, cols) and 0 < grid.sum() <= 1 + 1e-5  # CLS attention over patches (CLS excluded)
    for patch in patches:
        assert 0 <= patch["row"] < rows and 0 <= patch["col"] < cols
        assert patch["index"] == patch["row"] * cols + patch["col"]
        assert np.isclose(patch["attention"], grid[patch["row"], patch["col"]], atol=1e-5)
    weights = [p["attention"] for p in patches]
    assert weights == sorted(weights, reverse=True) and min(weights) >= np.sort(grid.ravel())[-len(patches)] - 1e-6


def test_heatmap_is_the_attention_overlay_with_the_picked_patches_outlined(both_view, captioner, example):
    picture = Image.open(example).convert("RGB")
    grid = ui.attention_grid(captioner.encode([picture]))
    patches = both_view.details["results"]["maccap"]["patches"]
    expected = figures.attention_overlay(picture, grid, outlined=[(p["row"], p["col"]) for p in patches])
    assert isinstance(both_view.heatmap, Image.Image) and both_view.heatmap.width == figures.DISPLAY_SIDE
    assert both_view.heatmap.height == figures.DISPLAY_SIDE + figures.LEGEND_HEIGHT  # the colour scale under it
    assert np.array_equal(np.asarray(both_view.heatmap), np.asarray(expected))


def test_timings_list_each_stage_per_image_with_the_encode_pass_and_their_total(both_view):
    table = both_view.timings
    assert list(table.columns) == ["method", "stage", "ms"]
    for label, method in (("MacCap", "maccap"), ("TOMCap", "tomcap")):
        rows = table[table["method"] == label]
        stages = dict(zip(rows["stage"], rows["ms"]))
        assert list(stages)[:-1] == list(both_view.details["results"][method]["timings_ms"])
        assert list(stages)[0] == "encode"
        assert np.isclose(stages.pop("total"), sum(stages.values()), atol=0.1 * len(stages))
        assert all(ms >= 0 for ms in stages.values())


def test_one_method_leaves_the_other_methods_outputs_empty(app, example):
    view = app.caption_event(example, ["tomcap"], SETTINGS)
    assert view.methods["maccap"].caption == "" and view.methods["maccap"].candidates.empty
    assert view.methods["tomcap"].caption
    assert set(view.details["results"]) == {"tomcap"} and set(view.session.results) == {"tomcap"}
    assert set(view.timings["method"]) == {"TOMCap"}
    assert isinstance(view.heatmap, Image.Image)  # the attention is the encoder's: shown without outlines


def test_an_error_in_one_method_leaves_the_others_result_and_says_why_where_its_caption_goes(app, example):
    view = app.caption_event(example, BOTH, {**SETTINGS, "maccap": {**SETTINGS["maccap"], "samples": 0}})
    maccap, tomcap = view.methods["maccap"], view.methods["tomcap"]
    assert maccap.error == "MacCap: samples must be between 1 and 64, got 0" and maccap.candidates.empty
    assert maccap.shown == "⚠ " + maccap.error and "\n" not in maccap.shown
    assert tomcap.caption and not tomcap.error and len(tomcap.candidates) == SETTINGS["tomcap"]["beams"]
    assert view.details["errors"] == {"maccap": maccap.error} and set(view.session.results) == {"tomcap"}


def test_same_seed_same_captions_and_the_session_remembers_them(app, example, both_view):
    again = app.caption_event(example, BOTH, SETTINGS)
    assert again.methods["maccap"].candidates.equals(both_view.methods["maccap"].candidates)
    assert again.session.key == both_view.session.key and set(again.session.results) == set(BOTH)


@pytest.mark.parametrize(
    ("change", "failed", "message"),
    [
        ({"image": None}, ALL, "no image"),
        ({"methods": []}, ALL, "no method chosen"),
        ({"methods": ["blip"]}, ALL, "unknown method 'blip'"),
        ({"settings": {"maccap": {"samples": 0}}}, ["maccap"], "samples must be between 1 and 64"),
        ({"settings": {"maccap": {"samples": 2.5}}}, ["maccap"], "samples must be a whole number"),
        ({"settings": {"maccap": {"noise_variance": float("nan")}}}, ["maccap"], "noise_variance must be finite"),
        ({"settings": {"maccap": {"n_cr": 17}}}, ["maccap"], "n_cr must be between 1 and 16"),
    ],
)
def test_bad_requests_are_one_line_messages_where_the_output_goes(app, example, change, failed, message, caplog):
    request = {"image": example, "methods": ["maccap"], "settings": SETTINGS, **change}
    with caplog.at_level(logging.DEBUG):
        view = app.caption_event(**request)
    for method in failed:
        shown = view.methods[method].shown
        assert message in shown and shown.startswith("⚠") and "\n" not in shown
        assert view.methods[method].candidates.empty
    assert not [r for r in caplog.records if r.exc_info]  # a visitor's mistake leaves no traceback in the log


def test_bad_uploads_are_one_line_messages(app, tmp_path, captioner):
    not_an_image = tmp_path / "notes.png"
    not_an_image.write_text("hello")
    cases = {
        str(corrupt_png(tmp_path / "broken.png")): "broken.png: truncated or corrupt image data",
        str(not_an_image): "notes.png: not an image",
    }
    for path, message in cases.items():
        view = app.caption_event(path, BOTH, SETTINGS)
        for method in ALL:
            assert view.methods[method].error.startswith(message) and "\n" not in view.methods[method].error
        assert view.heatmap is None and view.timings.empty
    small = ui.CaptionDemo(captioner, config=ui.AppConfig(max_upload_pixels=1000))
    view = small.caption_event(str(captioner.examples()[0]), BOTH, SETTINGS)
    assert "32x32 = 1,024 pixels, above the limit of 1,000" in view.methods["maccap"].error


def test_internal_errors_show_only_their_type_in_place_and_log_the_traceback_once(app, example, monkeypatch, caplog):
    def broken(*args, **kwargs):
        raise RuntimeError("CUDA exploded at 0xdeadbeef")

    monkeypatch.setattr(app.captioner, "encode", broken)
    with caplog.at_level(logging.ERROR, logger="capdemo.ui.events"):
        view = app.caption_event(example, BOTH, SETTINGS)
    assert view.methods["maccap"].error == "internal error while captioning: RuntimeError"
    assert "0xdeadbeef" not in view.methods["tomcap"].shown
    logged = [r for r in caplog.records if r.exc_info]
    assert len(logged) == 1 and logged[0].exc_info[0] is RuntimeError


# --- /vqa -------------------------------------------------------------------------------------------------------


def test_vqa_uses_the_caption_tab_caption_and_ranks_the_answers(app, example, both_view):
    view = app.vqa_event(example, "  what   colour is it? ", both_view.session)
    assert view.caption == both_view.methods["maccap"].caption
    assert view.prompt == VQA_PROMPT.format(caption=view.caption, question="what colour is it?").strip()
    top = view.top_answers
    assert list(top.columns) == ["rank", "score", "answer"]
    assert len(top) == min(app.config.vqa_top_k, len(TINY_ANSWERS)) and set(top["answer"]) <= set(TINY_ANSWERS)
    assert top["score"].is_monotonic_decreasing and view.answer == top["answer"][0]


def test_vqa_without_a_session_captions_with_the_bundle_defaults(app, captioner, example):
    view = app.vqa_event(example, "how many shapes?")
    expected = captioner.caption([Image.open(example).convert("RGB")], "maccap")[0].caption
    assert view.caption == expected


@pytest.mark.parametrize("question", ["", "   \n\t "])
def test_empty_question_is_a_message_in_the_answer_box(app, example, question):
    view = app.vqa_event(example, question)
    assert view.answer.startswith("⚠ question is empty") and view.top_answers.empty


# --- /embedding -------------------------------------------------------------------------------------------------


def test_embedding_plot_shows_every_group_with_the_right_counts(app, captioner, example, both_view):
    view = app.embedding_event(example, "pca", both_view.session)
    traces = {trace.name: trace for trace in view.projection.data}
    rows, cols = captioner.encoder.grid_size
    counts = {"global image embedding": 1, "image patches": rows * cols,
              "MacCap region features I_cr": SETTINGS["maccap"]["n_cr"],
              "MacCap candidates": SETTINGS["maccap"]["samples"], "TOMCap candidates": SETTINGS["tomcap"]["beams"],
              "TOMCap retrieved neighbours": SETTINGS["tomcap"]["k"]}
    for name, count in counts.items():
        assert len(traces[name].x) == count, name
    corpus = traces["caption corpus (sample)"]
    assert len(corpus.x) == len(traces["corpus, gap-corrected towards images (TOMCap)"].x) > 0
    shown = list(traces["MacCap candidates"].text)
    assert [text.rsplit(" (CLIP", 1)[0] for text in shown] == list(both_view.methods["maccap"].candidates["caption"])


def test_gap_histogram_and_table(app, captioner, example, both_view):
    view = app.embedding_event(example, "pca", both_view.session)
    sizes = {t.name.split(" (")[0]: len(t.x) for t in view.gap_histogram.data if t.type == "histogram"}
    dim = captioner.encoder.embed_dim
    assert sizes == {"best caption - global image": dim,
                     "best caption - region mixes": SETTINGS["maccap"]["n_cr"] * dim,
                     "bundle mean gap mu_text - mu_image": dim}
    table = view.gap_table
    assert list(table.columns) == ["quantity", "value"]
    assert {"MacCap: cos(caption, global image)", "std ratio median"} <= set(table["quantity"])
    assert np.isfinite(table["value"].astype(float)).all()


def test_caption_vqa_and_plot_share_one_encoder_pass(app, captioner, tmp_path, monkeypatch):
    image = fresh_image(tmp_path, seed=1)
    before = captioner.encoder.images_encoded
    view = app.caption_event(image, ALL, SETTINGS)
    captions = count_calls(monkeypatch, captioner, "caption")
    app.vqa_event(image, "what is it?", view.session)
    app.embedding_event(image, "pca", view.session)
    assert captioner.encoder.images_encoded - before == 1
    assert captions == []  # the plot reused the Caption tab's results


def test_embedding_without_a_session_captions_each_method_once(app, captioner, tmp_path, monkeypatch):
    captions = count_calls(monkeypatch, captioner, "caption")
    view = app.embedding_event(fresh_image(tmp_path, seed=2), "pca")
    assert sorted(call[1] for call in captions) == sorted(ALL)
    assert set(view.session.results) == set(ALL)


def test_unknown_projection_is_a_message_and_draws_nothing(app, example):
    view = app.embedding_event(example, "tsne")
    assert view.message.startswith("⚠ unknown projection 'tsne'") and view.projection is None


# --- /batch -----------------------------------------------------------------------------------------------------


def test_batch_captions_each_image_and_reports_bad_files(app, captioner, tmp_path):
    good = [str(p) for p in captioner.examples()]
    bad = str(corrupt_png(tmp_path / "broken.png"))
    view = app.batch_event([*good, bad])
    table = view.table
    assert list(table.columns) == ["image", "maccap caption", "maccap clip_score", "tomcap caption",
                                   "tomcap clip_score", "capdec caption", "capdec clip_score", "error"]
    assert list(table["image"]) == ["random-0.png", "random-1.png", "broken.png"]
    assert list(table["error"][:2]) == ["", ""] and table["error"][2].startswith("broken.png: truncated or corrupt")
    for row, path in enumerate(good):  # the same captions as one image at a time with the bundle's defaults
        single = captioner.caption([Image.open(path).convert("RGB")], "maccap")[0]
        assert table["maccap caption"][row] == single.caption
        assert np.isclose(table["maccap clip_score"][row], single.candidates[0].clip_score, atol=5e-5)
    records = json.loads(open(view.json_path).read())
    assert records == json.loads(table.to_json(orient="records"))
    from_csv = pd.read_csv(view.csv_path, keep_default_na=False)
    assert list(from_csv["image"]) == list(table["image"]) and list(from_csv["error"]) == list(table["error"])
    assert list(from_csv["tomcap caption"]) == list(table["tomcap caption"])


def test_batch_limits_and_download_rotation(captioner, tmp_path):
    app = ui.CaptionDemo(captioner, config=ui.AppConfig(max_batch_images=2, kept_downloads=1))
    example = str(captioner.examples()[0])
    with pytest.raises(gr.Error, match="3 images; the limit per batch is 2"):
        app.batch_event([example] * 3)
    with pytest.raises(gr.Error, match="no images"):
        app.batch_event([])
    first = app.batch_event([example])
    second = app.batch_event([example])
    assert not __import__("os").path.exists(first.csv_path) and open(second.csv_path).read()


# --- /about and the page ----------------------------------------------------------------------------------------


def test_about_describes_the_bundle_and_how_to_load_another(app):
    text, info = app.about()
    assert "`tiny` (shapes world)" in text and "MacCap, TOMCap, CapDec" in text and "--weights hf-hub:" in text
    assert "| component | files | size |" in text and "| file | size | sha256 |" in text  # tables, not JSON
    files = app.captioner.bundle.manifest["files"]
    first = sorted(files)[0]
    assert f"| {first} | " in text and files[first]["sha256"][:12] in text and files[first]["sha256"] not in text
    assert info["methods"] == ALL and len(info["files"]) > 0
    folder = str(app.captioner.bundle.path)
    assert folder not in text and folder not in json.dumps(info)  # nothing of the server's file system


def _controls(demo: gr.Blocks) -> dict[str, Any]:
    """The page's setting controls by elem_id (``<method>-<setting>``)."""
    return {block.elem_id: block for block in demo.blocks.values()
            if getattr(block, "elem_id", None) and block.elem_id.split("-")[0] in ALL
            and not block.elem_id.endswith(("-caption", "-candidates", "-neighbours"))}


def test_controls_are_generated_from_each_methods_settings_preset_and_bounded_by_the_bundle(captioner):
    demo = ui.create_blocks(captioner)
    controls = _controls(demo)
    for name, method in captioner.methods.items():
        defaults, limits = method.default_options(), method.limits()
        for item in method.Options.settings():
            control = controls[f"{name}-{item.name.replace('_', '-')}"]
            assert control.value == getattr(defaults, item.name) and control.label == item.label
            if isinstance(control, gr.Slider):
                assert (control.minimum, control.maximum) == item.bounded(limits)
    assert controls["maccap-n-cr"].maximum == 16  # the tiny CLIP's 4x4 grid, not the static 256
    tom = captioner.methods["tomcap"]  # K: as many of the store's longest captions as the LM's positions hold
    tokens, k_max = tom.model.tokens, controls["tomcap-k"].maximum
    store = [tom.datastore.captions[i] for i in range(len(tom.datastore))]
    longest = sorted(store, key=lambda text: len(tokens.prompt_ids([text])), reverse=True)
    room = min(tom.model.config.max_new_tokens, tom.model.config.max_caption_tokens)
    assert 1 <= k_max <= len(store) and len(tokens.prompt_ids(longest[:k_max])) + room <= tokens.max_positions
    assert k_max == len(store) or len(tokens.prompt_ids(longest[: k_max + 1])) + room > tokens.max_positions
    assert controls["maccap-samples"].value == TINY_MACCAP["samples"]
    assert isinstance(controls["tomcap-select-by"], gr.Radio)


def test_the_caption_api_takes_one_named_parameter_per_method_setting_defaulting_to_the_bundles(captioner, example):
    import inspect

    demo = ui.create_blocks(captioner)
    event = next(fn for fn in demo.fns.values() if fn.api_name == "caption").fn
    parameters = inspect.signature(event).parameters
    expected = [f"{name}_{item.name}" for name, m in captioner.methods.items() for item in m.Options.settings()]
    assert list(parameters)[:2] == ["image", "methods"] and list(parameters)[2:-4] == expected
    assert parameters["retrieve_from"].default == "bundle"  # which store retrieving methods search
    assert list(parameters)[-3:] == ["session", "own", "progress"]  # the page's states, not API parameters
    assert parameters["tomcap_beams"].default == captioner.methods["tomcap"].default_options().beams
    outputs = event(example, ["tomcap"], tomcap_k=1, tomcap_beams=2, session=None, progress=lambda *a, **k: None)
    notice, details = outputs[-3], outputs[-2]  # then the session state
    assert notice == ""  # the tiny bundle records no domain: no warning
    assert len(details["results"]["tomcap"]["neighbours"]) == 1 and len(details["results"]["tomcap"]["candidates"]) == 2


def _examples_shown(demo: gr.Blocks) -> list:
    return [sample for block in demo.blocks.values() if isinstance(block, gr.Dataset) for sample in block.samples]


def test_page_wires_stable_api_names_and_a_bounded_queue(captioner):
    demo = ui.create_blocks(captioner, config=ui.AppConfig(concurrency_limit=2, max_queue_size=5))
    public = {fn.api_name for fn in demo.fns.values() if fn.api_visibility == "public"}
    assert public == {"caption", "vqa", "embedding", "batch", "about", "datastore"}
    assert demo._queue.max_size == 5 and demo._queue.default_concurrency_limit == 2
    assert demo.delete_cache == (3600, 3600)  # Gradio's file cache is swept, not kept until a restart
    model_events = [fn for fn in demo.fns.values() if fn.api_name in {"caption", "vqa", "batch"}]
    assert {fn.concurrency_id for fn in model_events} == {ui.MODEL_CONCURRENCY_ID}  # one shared limit
    # every other queued event that runs the model (an example's first click captions it; an example question
    # answers) shares it: only the About text and the plots have their own groups
    queued = [fn for fn in demo.fns.values() if fn.queue and fn.api_name not in {"about", "embedding"}]
    assert len(queued) > len(model_events) and {fn.concurrency_id for fn in queued} == {ui.MODEL_CONCURRENCY_ID}
    plot = next(fn for fn in demo.fns.values() if fn.api_name == "embedding")
    assert plot.concurrency_id == ui.PLOT_CONCURRENCY_ID != ui.MODEL_CONCURRENCY_ID  # never queued behind captions
    assert plot.concurrency_limit == 1
    assert len(_examples_shown(demo)) == len(captioner.examples())


def test_photo_examples_only_for_a_real_world_bundle(captioner, monkeypatch, tmp_path):
    photo = tmp_path / "photo.jpg"
    Image.new("RGB", (8, 8)).save(photo)
    shapes_page = ui.create_blocks(captioner, photos=[photo])
    assert len(_examples_shown(shapes_page)) == len(captioner.examples())
    real_info = {**captioner.info(), "world": "real"}
    monkeypatch.setattr(captioner, "info", lambda: real_info)
    real_page = ui.create_blocks(captioner, photos=[photo])
    assert len(_examples_shown(real_page)) == len(captioner.examples()) + 1


def test_gpu_wrapping_only_when_spaces_is_importable(monkeypatch):
    def event():
        return "ran"

    monkeypatch.setitem(sys.modules, "spaces", None)  # import spaces -> ImportError
    assert ui.on_gpu(event) is event
    monkeypatch.setitem(sys.modules, "spaces", types.SimpleNamespace(GPU=lambda fn: ("on gpu", fn)))
    assert ui.on_gpu(event) == ("on gpu", event)


def test_image_input_hands_over_the_upload_path_without_decoding(tmp_path):
    broken = corrupt_png(tmp_path / "broken.png")
    with gr.Blocks():
        image = ui.image_input()
    assert image.type == "filepath" and image.get_block_name() == "image"
    assert image.preprocess(FileData(path=str(broken), orig_name="broken.png")) == str(broken)
    assert image.preprocess(None) is None
    assert not list(Path(ui.__file__).parent.glob("*.pyi"))  # no stub written next to the package


def test_user_facing_squeezes_messages_onto_one_line():
    @ui.user_facing("testing")
    def event(kind):
        raise kind("first line\n  second line")

    with pytest.raises(gr.Error) as raised:
        event(ValueError)
    assert raised.value.message == "first line second line"
    with pytest.raises(gr.Error) as raised:
        event(KeyError)
    assert raised.value.message == "internal error while testing: KeyError"


def test_a_new_image_cancels_what_the_old_one_still_waits_for(captioner):
    """An upload, a clear or a clicked example cancels the model events of the image before (a caption, an answer,
    the plots still queued or running), so their results never land next to the new image."""
    demo = ui.create_blocks(captioner)
    dependencies = demo.config["dependencies"]
    by_api = {dep["api_name"]: dep["id"] for dep in dependencies}
    model_events = {by_api["caption"], by_api["vqa"], by_api["embedding"]}
    ids = {block.elem_id: block._id for block in demo.blocks.values() if getattr(block, "elem_id", None)}
    triggers = {(ids["image-input"], "upload"), (ids["image-input"], "clear")}
    examples = next(block._id for block in demo.blocks.values() if isinstance(block, gr.Dataset))
    cancelling = {target: set(dep["cancels"]) for dep in dependencies for target in map(tuple, dep["targets"])
                  if target in triggers or target == (examples, "click") and dep["cancels"]}
    assert set(cancelling) == triggers | {(examples, "click")}
    for target, cancelled in cancelling.items():
        assert model_events <= cancelled, target
