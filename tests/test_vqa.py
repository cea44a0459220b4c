"""Zero-shot VQA: the answer list, the prompt, CLIP answer ranking, word matching, and bad questions."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from capdemo.bundle import Bundle, BundleError, BundleWriter
from capdemo.methods.maccap.model import MacCap, MacCapConfig
from capdemo.vqa import (
    VQA_COMPONENT, VQA_EXAMPLES_KEY, AnswerList, AnswerListError, AnswerLM, ExampleQuestion, answer_question,
    example_questions, short_answer, word_matches,
)
from capdemo.testing import tiny_gpt2

OPENVQA_ANSWERS = Path(__file__).resolve().parents[2] / "shared" / "data" / "vqa" / "openvqa_answer_dict.json"
SMALL_ANSWERS = ["yes", "no", "red", "blue", "two", "circle", "square", "left", "right", "black and white"]


@pytest.fixture(scope="module")
def model(tiny_tokenizer) -> MacCap:
    config = MacCapConfig(embed_dim=32, lm_embed_dim=64, n_cr=4, n_query=4, heads=4, ffn_dim=64, mlp_layers=2,
                          lm="unused", samples=2, beams=2, max_new_tokens=4, vqa_max_new_tokens=4)
    torch.manual_seed(0)
    return MacCap(config, tiny_gpt2(tiny_tokenizer), tiny_tokenizer).eval()


class CountingEncoder:
    """The tiny encoder, counting text-encoder calls."""

    def __init__(self, encoder):
        self.encoder, self.text_calls = encoder, 0
        self.embed_dim = encoder.embed_dim

    def encode_text(self, texts):
        self.text_calls += 1
        return self.encoder.encode_text(texts)

    def __getattr__(self, name):
        return getattr(self.encoder, name)


@pytest.mark.skipif(not OPENVQA_ANSWERS.is_file(), reason="shared VQA answer dictionary not present")
def test_openvqa_list_has_the_3128_non_empty_answers_in_index_order():
    answers = AnswerList.from_openvqa(OPENVQA_ANSWERS)
    ans_to_ix = json.loads(OPENVQA_ANSWERS.read_text())[0]
    assert len(answers) == 3128 and "" not in answers.answers
    assert answers.answers[:3] == ["net", "pitcher", "orange"]
    assert [ans_to_ix[a] for a in answers.answers] == sorted(ans_to_ix[a] for a in answers.answers)


def test_bad_answer_files_are_one_line_errors(tmp_path):
    with pytest.raises(AnswerListError, match="not an openvqa answer dictionary"):
        AnswerList.from_openvqa(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text('{"yes": 0}')
    with pytest.raises(AnswerListError, match="bad.json"):
        AnswerList.from_openvqa(tmp_path / "bad.json")
    with pytest.raises(AnswerListError, match="empty"):
        AnswerList(["", "  "])


def test_answers_are_ranked_by_clip_cosine_with_the_generated_answer(model, tiny_encoder):
    encoder = CountingEncoder(tiny_encoder)
    answers = AnswerList(SMALL_ANSWERS)
    result = answer_question(AnswerLM.of_captioner(model), encoder, "a red circle on the left",
                             "What colour is the circle?", answers, top_k=4)
    assert result.prompt == "a red circle on the left Question: What colour is the circle? Answer:"
    assert result.caption == "a red circle on the left"
    query = tiny_encoder.encode_text([result.generated])[0]
    cosines = tiny_encoder.encode_text(SMALL_ANSWERS) @ query
    best = cosines.argsort(descending=True)[:4].tolist()
    assert [a for a, _ in result.top_answers] == [SMALL_ANSWERS[i] for i in best]
    assert [s for _, s in result.top_answers] == pytest.approx(cosines[best].tolist(), abs=1e-5)
    assert result.answer == result.top_answers[0][0]
    calls = encoder.text_calls
    answer_question(AnswerLM.of_captioner(model), encoder, "x", "Is it red?", answers)
    assert encoder.text_calls == calls + 1  # answer embeddings were cached; only the new answer is encoded
    assert result.to_json()["top_answers"][0]["text"] == result.answer


def test_word_matching_is_the_reference_behaviour(model, tiny_encoder):
    assert word_matches("Two red circles, left.", SMALL_ANSWERS) == ["red", "two", "left"]
    assert word_matches("black and white", SMALL_ANSWERS) == []  # multi-word answers never match
    word_lm = AnswerLM.of_captioner(MacCap(model.config.replace(vqa_match="word"), model.lm, model.tokenizer))
    assert word_lm.match == "word"
    result = answer_question(word_lm, tiny_encoder, "c", "What?", AnswerList(SMALL_ANSWERS))
    assert all(score == 1.0 for _, score in result.top_answers)
    assert result.top_answers == [(a, 1.0) for a in word_matches(result.generated, SMALL_ANSWERS)][:10]
    assert result.answer == (result.top_answers[0][0] if result.top_answers else result.generated)


def test_short_answer_cuts_the_continuation():
    assert short_answer(" red.\nQuestion: next") == "red"
    assert short_answer("two cats Question: what Answer: x") == "two cats"


def test_the_generated_answer_is_cut_at_its_first_line_break(model, monkeypatch):
    """The LM's continuation is cut before cleaning (cleaning turns line breaks into spaces)."""
    import capdemo.vqa as vqa

    continuation = " two\n\nThe man is holding a red umbrella."
    ids = torch.tensor([model.tokenizer(continuation)["input_ids"]])
    monkeypatch.setattr(vqa, "generate_from_embeds", lambda *args, **kwargs: ids)
    assert vqa.generate_answer(AnswerLM.of_captioner(model), "Question: how many? Answer:") == "two"


def test_answer_embeddings_travel_in_a_bundle(tiny_encoder, tmp_path):
    answers = AnswerList(SMALL_ANSWERS)
    writer = BundleWriter(tmp_path / "b", name="vqa")
    answers.add_to_bundle(writer, tiny_encoder)
    bundle = Bundle.load(writer.finish())
    loaded = AnswerList.from_bundle(bundle)
    assert loaded.answers == SMALL_ANSWERS and bundle.component("vqa")["count"] == len(SMALL_ANSWERS)
    encoder = CountingEncoder(tiny_encoder)
    torch.testing.assert_close(loaded.embeddings(encoder), tiny_encoder.encode_text(SMALL_ANSWERS))
    assert encoder.text_calls == 0  # precomputed: the answers are not embedded again


def _bundle_with_questions(tmp_path, questions) -> Bundle:
    writer = BundleWriter(tmp_path / "b", name="vqa")
    writer.add_file("examples/a.png", b"not read here")
    writer.add_json("examples/questions.json", questions)
    writer.add_component(VQA_COMPONENT, {"answers": "vqa/answers.json", VQA_EXAMPLES_KEY: "examples/questions.json"})
    return Bundle.load(writer.finish())


def test_example_questions_are_read_from_the_file_the_vqa_component_names(tmp_path):
    bundle = _bundle_with_questions(tmp_path, [{"image": "examples/a.png", "question": "how many?", "answer": "2",
                                                "type": "count"}])
    assert example_questions(bundle) == [ExampleQuestion(bundle.path / "examples/a.png", "how many?", "2")]
    bare = BundleWriter(tmp_path / "bare", name="bare")
    bare.add_component(VQA_COMPONENT, {"answers": "vqa/answers.json"})
    assert example_questions(Bundle.load(bare.finish())) == []  # a bundle without them offers none


@pytest.mark.parametrize("entry, said", [({"image": "examples/b.png", "question": "q?", "answer": "a"},
                                          "'examples/b.png' is not a file of the bundle"),
                                         ({"image": "examples/a.png", "question": "q?"},
                                          "each entry needs an image, a question and an answer"),
                                         ({"image": ["examples/a.png"], "question": "q?", "answer": "a"},
                                          "each entry needs an image, a question and an answer"),
                                         ({"image": "examples/a.png", "question": None, "answer": "a"},
                                          "each entry needs an image, a question and an answer"),
                                         ("two\nlines", "each entry needs an image, a question and an answer")])
def test_an_example_question_that_is_not_one_about_an_image_of_the_bundle_is_refused_in_one_line(tmp_path, entry,
                                                                                                  said):
    bundle = _bundle_with_questions(tmp_path, [entry])
    with pytest.raises(BundleError, match=re.escape(said)) as refused:
        example_questions(bundle)
    assert "\n" not in str(refused.value) and str(bundle.path) in str(refused.value)
