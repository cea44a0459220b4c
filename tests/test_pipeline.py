"""The Captioner facade on a complete tiny bundle: every method, VQA, plots, one timed encoder pass per image, CLI."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from capdemo.pipeline import Captioner
from capdemo.testing import TINY_MACCAP, TINY_TOMCAP, example_images, lead_bundle

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def captioner(tiny_bundle_dir) -> Captioner:
    return Captioner.from_bundle(tiny_bundle_dir, device="cpu")


def test_loads_every_component(captioner):
    assert captioner.method_names == ("maccap", "tomcap", "capdec")
    assert captioner.shared("datastore") is not None and captioner.shared("gap_stats") is not None
    assert captioner.answers is not None and captioner.vqa_method is captioner.methods["maccap"]
    assert len(captioner.examples()) == 2
    info = captioner.info()
    assert info["world"] == "shapes" and info["methods"] == ["maccap", "tomcap", "capdec"]
    assert all(len(h) == 12 for h in info["files"].values())


def test_the_frozen_lm_the_bundle_names_answers_questions_not_maccaps(captioner, tiny_bundle_dir):
    from safetensors.torch import load_file

    from capdemo.vqa import AnswerLM, generate_answer

    maccap = captioner.methods["maccap"].model
    answer_lm = captioner.answer_lm
    assert answer_lm.lm is not maccap.lm  # the paper's VQA LM is frozen; MacCap's was trained for captioning here
    stored = load_file(Path(tiny_bundle_dir) / "vqa" / "lm" / "model.safetensors")
    served = answer_lm.lm.state_dict()
    assert all(torch.equal(served[name], tensor) for name, tensor in stored.items() if name in served)
    assert not torch.equal(answer_lm.lm.get_input_embeddings().weight, maccap.lm.get_input_embeddings().weight)
    own = AnswerLM.of_captioner(maccap)
    assert (answer_lm.beams, answer_lm.max_new_tokens, answer_lm.match) == (own.beams, own.max_new_tokens, own.match)
    result = captioner.answer(example_images()[0], "what colour is it?", caption="a red circle")
    assert result.generated == generate_answer(answer_lm, result.prompt)


def test_maccap_results_are_consistent(captioner):
    images = example_images()
    results = captioner.caption(images, "maccap", samples=6, seed=3)
    assert len(results) == 2
    for result in results:
        scores = [c.clip_score for c in result.candidates]
        assert len(result.candidates) == 6 and scores == sorted(scores, reverse=True)
        assert result.caption == result.candidates[0].text
        assert len(result.patches) == TINY_MACCAP["n_cr"]
        assert all(0 <= p.row < 4 and 0 <= p.col < 4 and p.index == 4 * p.row + p.col for p in result.patches)
        assert result.embeddings["region"].shape == (TINY_MACCAP["n_cr"], 32)
        assert list(result.timings_ms) == ["encode", "aggregate", "adaptor", "generate", "rerank"]
        assert result.extras["samples"] == 6 and result.extras["n_cr"] == TINY_MACCAP["n_cr"]  # the bundle's
    again = captioner.caption(images, "maccap", samples=6, seed=3)
    assert [r.to_json()["candidates"] for r in again] == [r.to_json()["candidates"] for r in results]


def test_tomcap_results_are_consistent(captioner):
    results = captioner.caption(example_images(), "tomcap")
    for result in results:
        assert len(result.neighbours) == TINY_TOMCAP["k"]
        assert [n.score for n in result.neighbours] == sorted((n.score for n in result.neighbours), reverse=True)
        assert len(result.candidates) == TINY_TOMCAP["beams"] and result.caption == result.candidates[0].text
        assert result.extras["prompt"].startswith("Similar images have the following captions:")


def test_image_goes_through_the_tower_once(captioner):
    from capdemo.analysis import embedding_view

    image = example_images(seed=11)[0]
    before = captioner.encoder.images_encoded
    maccap = captioner.caption([image], "maccap", samples=2)[0]
    captioner.caption([image], "tomcap")
    captioner.answer(image, "what shape is it?", caption=maccap.caption)
    encoded = captioner.encode([image])
    view = embedding_view(encoded.features, {"maccap": maccap}, {"maccap": "MacCap"},
                          corpus=captioner.corpus_sample(), gap_stats=captioner.shared("gap_stats"))
    assert captioner.encoder.images_encoded - before == 1
    shapes = {group.kind: group.vectors.shape for group in view.groups}
    assert shapes["image"] == (1, 32) and shapes["patches"] == (16, 32) and shapes["region"] == (4, 32)
    assert shapes["corpus corrected"] == shapes["corpus"]
    assert "gap norm ||mu_I - mu_T||" in view.table and encoded.cached == [True]


def test_timings_are_per_image_with_the_vision_tower_timed_once_and_shared(captioner):
    """A batch of 3: each Result has its own share of the encode pass (> 0) and of each batched stage."""
    generator = torch.Generator().manual_seed(21)
    images = [Image.fromarray((torch.rand(32, 32, 3, generator=generator) * 255).byte().numpy()) for _ in range(3)]
    results = captioner.caption(images, "maccap", samples=3)
    timings = [r.timings_ms for r in results]
    assert all(t["encode"] > 0 for t in timings)
    assert len({t["encode"] for t in timings}) == 1  # the batch's one pass, divided equally
    for stage in ("aggregate", "adaptor", "generate", "rerank"):
        assert len({t[stage] for t in timings}) == 1 and timings[0][stage] > 0
    encoded = captioner.encode(images)  # cached now: the shares recorded when they were encoded
    assert encoded.cached == [True] * 3 and encoded.encode_ms == [timings[0]["encode"]] * 3


def test_vqa_ranks_the_answer_list(captioner):
    result = captioner.answer(example_images()[0], "  what colour is it?\x00 ", top_k=4)
    assert len(result.top_answers) == 4
    scores = [score for _, score in result.top_answers]
    assert scores == sorted(scores, reverse=True) and result.answer == result.top_answers[0][0]
    assert "Question: what colour is it? Answer:" in result.prompt


@pytest.mark.parametrize("method,settings,message", [
    ("maccap", {"samples": 0}, "samples must be between 1 and 64, got 0"),
    ("maccap", {"beams": 100}, "beams must be between 1 and 8, got 100"),
    ("maccap", {"noise_variance": float("nan")}, "noise_variance must be finite"),
    ("maccap", {"seed": -1}, "seed must be between"),
    ("maccap", {"k": 2}, "MacCap has no setting k"),
    ("tomcap", {"k": 2.5}, "k must be a whole number"),
    # the tiny datastore holds 8 captions; the tiny LM's 128 positions fit 4 of its longest with room for a caption
    ("tomcap", {"k": 9}, "k must be between 1 and 4, got 9"),
    ("tomcap", {"select_by": "vibes"}, "select_by must be one of clip, beam"),
])
def test_bad_settings_are_one_line_errors(captioner, method, settings, message):
    with pytest.raises(ValueError, match=message):
        captioner.caption(example_images()[:1], method, **settings)


@pytest.mark.parametrize("question", ["", "   ", "\n\t", "x" * 600])
def test_bad_questions_refused(captioner, question):
    with pytest.raises(ValueError, match="question is"):
        captioner.answer(example_images()[0], question)


def test_unknown_method_refused(captioner):
    with pytest.raises(ValueError, match="unknown method 'blip'"):
        captioner.caption(example_images()[:1], "blip")


def test_cli_captions_good_images_and_reports_bad_ones(tiny_bundle_dir, tmp_path):
    good = [tmp_path / "a.png", tmp_path / "b.png"]
    for path, image in zip(good, example_images()):
        image.save(path)
    bad = tmp_path / "broken.jpg"
    bad.write_text("not really a jpeg")
    command = [sys.executable, "-m", "capdemo", "caption", str(good[0]), str(bad), str(good[1]),
               "--weights", str(tiny_bundle_dir), "--method", "maccap", "--samples", "3", "--json"]
    run = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert run.returncode == 1
    lines = [json.loads(line) for line in run.stdout.splitlines()]
    assert [Path(line["image"]).name for line in lines] == ["a.png", "b.png"]
    for line in lines:
        assert set(line) >= {"caption", "candidates", "patches", "neighbours", "timings_ms"}
        assert len(line["candidates"]) == 3 and line["caption"] == line["candidates"][0]["text"]
    errors = [row for row in run.stderr.splitlines() if row.startswith("error:")]
    assert len(errors) == 1 and "broken.jpg" in errors[0]


def test_cli_vqa_reports_an_unreadable_image_in_one_line_with_caption_s_exit_code(tiny_bundle_dir, tmp_path, capsys):
    from capdemo.__main__ import main

    bad = tmp_path / "broken.jpg"
    bad.write_text("not really a jpeg")
    for image in (bad, tmp_path / "missing.png"):
        assert main(["vqa", str(image), "--question", "how many?", "--weights", str(tiny_bundle_dir)]) == 1
        errors = [row for row in capsys.readouterr().err.splitlines() if row.startswith("error:")]
        assert len(errors) == 1 and image.name in errors[0]  # (transformers' loading bars share stderr)


@pytest.mark.parametrize("size", ["0", "-1", "two"])
def test_cli_refuses_a_batch_size_that_is_not_a_positive_number(size, tmp_path, capsys):
    from capdemo.__main__ import main

    with pytest.raises(SystemExit) as exit_info:
        main(["caption", str(tmp_path / "a.png"), "--batch-size", size])
    assert exit_info.value.code == 2 and "--batch-size" in capsys.readouterr().err


def test_out_of_memory_degrades_to_smaller_batches(captioner, monkeypatch):
    """A batch that does not fit is captioned in halves, with the same results as one by one."""
    method = captioner.methods["maccap"]
    real = method.caption
    sizes = []

    def limited(encoded, options):
        sizes.append(len(encoded))
        if len(encoded) > 1:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return real(encoded, options)

    images = example_images() + example_images(seed=5)
    expected = [captioner.caption([image], "maccap", samples=3)[0].to_json()["candidates"] for image in images]
    monkeypatch.setattr(method, "caption", limited)
    results = captioner.caption(images, "maccap", samples=3)
    assert [r.to_json()["candidates"] for r in results] == expected
    assert sizes[0] == 4 and sizes.count(1) == 4


def test_a_separate_retrieval_encoder_queries_the_datastore(tiny_bundle_dir):
    """TOMCap with its own retrieval encoder (the paper's SigLIP2): the facade runs that tower in the same
    encode pass, and its embeddings are the queries, whether images or an Encoded batch are handed over."""
    from capdemo.methods.tomcap import inference
    from capdemo.retrieval import CaptionDatastore
    from capdemo.testing import TINY_CORPUS, tiny_encoder

    captioner = Captioner.from_bundle(tiny_bundle_dir, device="cpu")
    method = captioner.methods["tomcap"]
    retriever = tiny_encoder(seed=9, model_name="capdemo-tiny-retriever")
    method.retriever = retriever
    method.datastore = CaptionDatastore.build(retriever.encode_text(TINY_CORPUS), TINY_CORPUS,
                                              encoder_name=retriever.name)
    images = example_images()
    expected = retriever.encode_image_embeds(retriever.preprocess(images))
    encoded = captioner.encode(images)
    assert torch.equal(encoded.tower_embeds[retriever.name], expected)
    queries = encoded.image_embeds(retriever)
    hits = [[n.text for n in row] for row in method.datastore.retrieve(queries, 2)]
    results = captioner.caption(encoded, "tomcap")
    assert [[n.text for n in r.neighbours] for r in results] == hits
    assert not torch.equal(queries, encoded.image_embeds())  # the captioning CLIP would have asked otherwise
    assert inference.TOMCapMethod.image_towers(method) == [retriever]


def test_encoding_more_images_than_the_cache_holds(captioner):
    """A batch larger than the encode cache is encoded whole, once, in order; the cache stays bounded."""
    from capdemo.pipeline import ENCODE_CACHE_SIZE

    count = ENCODE_CACHE_SIZE + 6
    generator = torch.Generator().manual_seed(11)
    images = [Image.fromarray((torch.rand(32, 32, 3, generator=generator) * 255).byte().numpy())
              for _ in range(count)]
    before = captioner.encoder.images_encoded
    encoded = captioner.encode(images + images[:2])  # the repeats are encoded once
    assert captioner.encoder.images_encoded - before == count
    assert len(encoded) == count + 2 and encoded.features.image_embeds.shape[0] == count + 2
    assert torch.equal(encoded.features.image_embeds[count:], encoded.features.image_embeds[:2])
    alone = captioner.encoder.encode_images(captioner.encoder.preprocess([images[-1]])).image_embeds
    torch.testing.assert_close(encoded.features.image_embeds[count - 1], alone[0], atol=1e-5, rtol=1e-5)
    assert len(captioner._cache) == ENCODE_CACHE_SIZE


def test_a_bundle_names_the_method_shown_first_and_the_one_whose_captions_answer(tiny_bundle_dir, tmp_path):
    lead = Captioner.from_bundle(lead_bundle(Path(tiny_bundle_dir), tmp_path / "lead", default_method="tomcap",
                                             caption_method="tomcap"), device="cpu")
    assert lead.method_names == ("tomcap", "maccap", "capdec")  # the bundle's default first, then registry order
    assert lead.vqa_method is lead.methods["tomcap"]
    image = example_images()[0]
    result = lead.answer(image, "what colour is it?")
    assert result.caption == lead.caption([image], "tomcap")[0].caption  # TOMCap's caption, not MacCap's
    assert lead.answer_lm.lm is not lead.methods["maccap"].model.lm  # still the frozen LM that answers
    for default, caption in (("clipcap", "tomcap"), ("tomcap", "clipcap")):
        bad = lead_bundle(Path(tiny_bundle_dir), tmp_path / f"bad-{default}", default_method=default,
                          caption_method=caption)
        with pytest.raises(ValueError, match="'clipcap' is not one of its methods") as raised:
            Captioner.from_bundle(bad, device="cpu")
        assert "\n" not in str(raised.value)
