"""The shapes world's questions, its answer list, the gap numbers shapes-eval reports, and the VQA scorer."""

from __future__ import annotations

import math
import re
from collections import Counter
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from capdemo.features import ImageFeatures
from capdemo.vqa import VQA_PROMPT, AnswerList
from training.shapes.language import COUNT_WORDS, Scene
from training.shapes.metrics import (correction_geometry, gap_metrics, patches_on_objects, recall_at_1,
                                     selection_on_objects, subregion_closer)
from training.shapes.questions import (QUESTION_TYPES, WHERE, Question, answer_list, example_questions, qa_texts,
                                      questions)
from training.shapes.vqa_eval import match_answers, question_set, vqa_accuracy
from training.shapes.world import WorldConfig, all_scenes, captions

WORLD = WorldConfig()
ANSWERS = answer_list(colours=WORLD.colours, shapes=WORLD.shapes, max_count=WORLD.max_count)
RED_CIRCLE_LEFT_OF_BLUE_SQUARE = Scene("pair", "red", "circle", relation="left of", colour2="blue",
                                       shape2="square", count=2)


def drawn_objects(scene: Scene) -> list[tuple[str, str, str | None]]:
    """(colour, shape, side) of each object, written out from the Scene's fields (the test's own oracle)."""
    if scene.kind == "single":
        return [(scene.colour, scene.shape, WHERE[scene.position])]
    if scene.kind == "pair":
        first, second = ("left", "right") if scene.relation == "left of" else ("top", "bottom")
        return [(scene.colour, scene.shape, first), (scene.colour2, scene.shape2, second)]
    return [(scene.colour, scene.shape, None)] * scene.count


def singular(word: str) -> str:
    return word[:-2] if word.endswith("ses") else word.rstrip("s")


def oracle(scene: Scene, text: str) -> str:
    """The answer to one generated question, read off the scene by parsing the question (independently)."""
    objects = drawn_objects(scene)
    side = re.search(r"(?:on the|at the) (left|right|top|bottom)\?$", text)
    if match := re.fullmatch(r"what colou?r (?:is|are) the (\w+)(?: (?:on|at) the \w+)?\?", text):
        found = {c for c, s, w in objects if s == singular(match[1]) and (side is None or w == side[1])}
    elif match := re.fullmatch(r"what shape (?:is|are) the (?:(\w+) objects?|object (?:on|at) the \w+)\?", text):
        found = {s for c, s, w in objects if (match[1] is None or c == match[1]) and (side is None or w == side[1])}
    elif text == "how many objects are there?":
        found = {str(len(objects))}
    elif match := re.fullmatch(r"how many (\w+) are there\?", text):
        found = {str(sum(s == singular(match[1]) for _, s, _ in objects))}
    elif match := re.fullmatch(r"where is the (\w+) (\w+)\?", text):
        found = {w for c, s, w in objects if (c, s) == (match[1], match[2])}
    elif match := re.fullmatch(r"is there a (\w+) (\w+)\?", text):
        found = {"yes" if any((c, s) == (match[1], match[2]) for c, s, _ in objects) else "no"}
    elif match := re.fullmatch(r"is the (\w+) (small|large)\?", text):
        found = {"yes" if scene.size == match[2] else "no"}
    elif match := re.fullmatch(r"is the (\w+) (\w+) (left of|above) the (\w+) (\w+)\?", text):
        sides = {(c, s): w for c, s, w in objects}
        first, second = sides[(match[1], match[2])], sides[(match[4], match[5])]
        found = {"yes" if (first, second) in (("left", "right"), ("top", "bottom")) else "no"}
    elif match := re.fullmatch(r"are there (\w+) (\w+)\?", text):
        count = {word: n for n, word in COUNT_WORDS.items()}[match[1]]
        found = {"yes" if count == sum(s == singular(match[2]) for _, s, _ in objects) else "no"}
    else:
        raise AssertionError(f"the test does not know the question {text!r}")
    assert len(found) == 1, (scene, text, found)  # every question has one right answer
    return found.pop()


def test_every_question_about_every_scene_has_the_answer_the_scene_implies():
    rng = np.random.default_rng(0)
    kinds_asked = {kind: set() for kind in ("single", "pair", "group")}
    answers, answered = Counter(), set()
    for scene in all_scenes(WORLD) * 2:
        for question in questions(scene, rng, colours=WORLD.colours, shapes=WORLD.shapes):
            assert question.kind in QUESTION_TYPES and question.answer in ANSWERS
            assert question.text == question.text.lower() and question.text.endswith("?")
            assert question.answer == oracle(scene, question.text), (scene, question)
            kinds_asked[scene.kind].add(question.kind)
            answers[question.answer] += question.kind == "yes/no"
            answered.add(question.answer)
    assert kinds_asked["single"] == kinds_asked["pair"] == set(QUESTION_TYPES)
    assert kinds_asked["group"] == set(QUESTION_TYPES) - {"position"}  # identical objects have no one place
    assert 0.4 < answers["yes"] / (answers["yes"] + answers["no"]) < 0.6  # yes/no questions are not all "yes"
    assert answered == set(ANSWERS)  # the answer list is exactly what the world's questions can answer


def test_questions_on_a_hand_made_scene():
    asked = questions(RED_CIRCLE_LEFT_OF_BLUE_SQUARE, np.random.default_rng(3), colours=WORLD.colours,
                      shapes=WORLD.shapes)
    by_text = {q.text.replace("color", "colour"): q.answer for q in asked}
    assert by_text["what colour is the circle?"] == "red" and by_text["what colour is the square?"] == "blue"
    assert by_text["what shape is the blue object?"] == "square"
    assert by_text["how many objects are there?"] == "2"
    two_circles = Scene("pair", "red", "circle", relation="above", colour2="blue", shape2="circle", count=2)
    asked = {q.text.replace("color", "colour"): q.answer for q in questions(
        two_circles, np.random.default_rng(0), colours=WORLD.colours, shapes=WORLD.shapes)}
    assert asked["what colour is the circle at the top?"] == "red"  # two circles: the question says which
    assert asked["what colour is the circle at the bottom?"] == "blue"
    assert asked["how many circles are there?"] == "2"


def test_example_questions_rotate_through_the_types_and_skip_one_a_scene_cannot_be_asked():
    group = Scene("group", "white", "triangle", count=3)
    scenes = [RED_CIRCLE_LEFT_OF_BLUE_SQUARE] * 3 + [group, group, RED_CIRCLE_LEFT_OF_BLUE_SQUARE]
    asked = example_questions(scenes, seed=5, colours=WORLD.colours, shapes=WORLD.shapes)
    # types colour, shape, count, position (a group has none: the next, yes/no), yes/no, then colour again
    assert [q.kind for q in asked] == ["colour", "shape", "count", "yes/no", "yes/no", "colour"]
    assert all(q.answer == oracle(scene, q.text) for scene, q in zip(scenes, asked))  # the world's truth
    assert asked == example_questions(scenes, seed=5, colours=WORLD.colours, shapes=WORLD.shapes)  # fixed by seed


def test_answer_list_is_the_worlds_own_and_pretraining_text_uses_the_vqa_prompt():
    assert len(ANSWERS) == len(set(ANSWERS)) < 40  # the world's answers, not VQAv2's 3,128
    assert {"red", "circle", "4", "left", "middle", "yes", "no"} <= set(ANSWERS)
    assert not {"cross", "small", "5"} & set(ANSWERS)  # a shape never drawn, a size, a count no scene has
    assert "4" not in answer_list(colours=WORLD.colours, shapes=WORLD.shapes, max_count=3)  # world v1's groups
    scenes = [RED_CIRCLE_LEFT_OF_BLUE_SQUARE] * 50
    texts = qa_texts(scenes, np.random.default_rng(0), colours=WORLD.colours, shapes=WORLD.shapes)
    pattern = re.compile(re.escape(VQA_PROMPT).replace(r"\{caption\}", "(.+)").replace(r"\{question\}", "(.+)")
                         + " (.+)")
    kinds = set()
    for text in texts:
        caption, question, answer = pattern.fullmatch(text).groups()
        assert caption in captions(RED_CIRCLE_LEFT_OF_BLUE_SQUARE)
        assert answer == oracle(RED_CIRCLE_LEFT_OF_BLUE_SQUARE, question)
        kinds.add(question.split()[0] + " " + question.split()[1])
    assert len(kinds) >= 5  # several question types, not one
    first = question_set(scenes[:3], seed=5, colours=WORLD.colours, shapes=WORLD.shapes)
    assert first == question_set(scenes[:3], seed=5, colours=WORLD.colours, shapes=WORLD.shapes)  # seeded


# The gap numbers


def features_by_hand() -> ImageFeatures:
    """Two images, CLS + 4 patches in 2-d, one head; the CLS row picks patches 1 and 2 (tokens 2 and 3)."""
    tokens = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [0.0, 1.0], [1.0, 1.0], [1.0, 0.0]],
                           [[1.0, 0.0], [0.0, 1.0], [0.0, 1.0], [1.0, 1.0], [1.0, 0.0]]])  # (2, 5, 2)
    attention = torch.zeros(2, 1, 5, 5)
    attention[:, 0, 0] = torch.tensor([0.1, 0.1, 0.4, 0.3, 0.1])  # CLS row: tokens 2 then 3 attended most
    attention[:, 0, 1:] = torch.eye(5)[1:]  # patch token t attends to itself only
    return ImageFeatures(image_embeds=F.normalize(tokens[:, 0], dim=-1), token_embeds=tokens, attention=attention,
                         grid_size=(2, 2))


def test_subregion_closer_on_a_hand_made_case():
    features = features_by_hand()
    # I_c = (1, 0). With N_cr = 1 the picked subregion is token 2, (0, 1); with N_cr = 2 also token 3, (1, 1)/sqrt2.
    captions = torch.tensor([[0.2, 1.0], [1.0, 0.1]])  # image 0's caption is near (0, 1), image 1's near I_c
    assert subregion_closer(features, captions, 1).tolist() == [True, False]
    both_close = torch.tensor([[1.0, 0.9], [1.0, 0.9]])  # cos with (1, 1)/sqrt2 beats cos with (1, 0)
    assert subregion_closer(features, both_close, 1).tolist() == [False, False]  # (0, 1) is not closer
    assert subregion_closer(features, both_close, 2).tolist() == [True, True]  # but the second region is


def test_patches_on_objects_reads_coverage_per_patch_row_major():
    coverage = torch.zeros(1, 4, 4)  # a 2x2 grid of 2x2-pixel patches
    coverage[0, 0:2, 2:4] = 1.0  # patch 1 (top right): fully covered
    coverage[0, 2, 0] = 1.0  # patch 2 (bottom left): a quarter covered, exactly the threshold
    coverage[0, 3, 3] = 0.9  # patch 3 (bottom right): 0.225 of it, under
    assert patches_on_objects(coverage, (2, 2)).tolist() == [[False, True, True, False]]
    with pytest.raises(ValueError, match="4 px does not divide into a 3x3"):
        patches_on_objects(coverage, (3, 3))


def test_selection_on_objects_on_a_hand_made_case():
    features = features_by_hand()  # N_cr = 2 picks tokens 2 and 3 = patches 1 and 2 in both images
    coverage = torch.zeros(2, 4, 4)
    coverage[0, 0:2, 2:4] = 1.0  # image 0: the object covers patch 1 only
    coverage[1, 2:4, 0:2] = 1.0  # image 1: patch 2
    coverage[1, 2:4, 2:4] = 1.0  # and patch 3
    numbers = selection_on_objects(features, coverage, 2)
    assert numbers["selected_patches_on_objects"] == pytest.approx(2 / 4)  # one of two picks on each image
    assert numbers["patches_on_objects"] == pytest.approx(3 / 8)
    assert numbers["selection_on_objects_ceiling"] == pytest.approx((1 / 2 + 2 / 2) / 2)  # image 0 has one
    # a selected CLS token is never on an object: its row put first, N_cr = 1 picks it
    features.attention[:, 0, 0] = torch.tensor([0.6, 0.1, 0.1, 0.1, 0.1])
    assert selection_on_objects(features, coverage, 1, include_cls=True)["selected_patches_on_objects"] == 0


def test_gap_numbers_on_a_hand_made_case():
    raw_images = [(1.0, 1.0, 0.0), (1.0, -1.0, 0.0), (1.0, 0.0, 1.0), (1.0, 0.0, -1.0)]
    raw_texts = [(0.0, 1.0, 1.0), (0.0, -1.0, 1.2), (0.0, 0.0, 1.0), (0.0, 0.1, 1.0)]
    images, texts = F.normalize(torch.tensor(raw_images), dim=-1), F.normalize(torch.tensor(raw_texts), dim=-1)
    scene_ids = [0, 1, 2, 2]  # the last two pairs show one scene: either of their captions is a hit
    # image 3 = (1, 0, -1)/sqrt2 is nearest to text 0 (cosine -0.5; the others are lower): the only miss
    assert recall_at_1(images, texts, scene_ids) == pytest.approx(3 / 4)

    def cosine(a, b):
        return sum(x * y for x, y in zip(a, b)) / (sum(x * x for x in a) * sum(y * y for y in b)) ** 0.5

    # tokens: CLS = the image embedding, one patch = its opposite, which attends only to itself
    features = ImageFeatures(image_embeds=images, token_embeds=torch.stack([images, -images], dim=1),
                             attention=torch.tensor([[0.5, 0.5], [0.0, 1.0]]).expand(4, 1, 2, 2), grid_size=(1, 1))
    numbers = gap_metrics(features, texts, scene_ids, n_cr=1)
    paired = [cosine(i, t) for i, t in zip(raw_images, raw_texts)]
    assert numbers["paired_cosine_mean"] == pytest.approx(sum(paired) / 4, abs=1e-6)
    mean_i = [sum(column) / 4 for column in zip(*images.tolist())]
    mean_t = [sum(column) / 4 for column in zip(*texts.tolist())]
    assert numbers["mean_gap_norm"] == pytest.approx(sum((a - b) ** 2 for a, b in zip(mean_i, mean_t)) ** 0.5)
    assert numbers["i2t_r1"] == pytest.approx(3 / 4)
    # I_s = -I_c is closer to the caption exactly when the pair's cosine is negative: pair 3 only
    assert [p < 0 for p in paired] == [False, False, False, True]
    assert numbers["subregion_closer_fraction"] == pytest.approx(1 / 4)
    assert numbers["n"] == 4


# The VQA scorer


def test_match_answers_takes_an_exact_answer_to_itself():
    from capdemo.testing import tiny_encoder

    encoder = tiny_encoder()
    answers = AnswerList(list(ANSWERS))
    assert match_answers(["red", "yes", "4", "middle"], answers, encoder) == ["red", "yes", "4", "middle"]


def scripted_lm(match: str = "clip") -> SimpleNamespace:
    """Stands in for an AnswerLM whose generation a test scripts (it has no LM): beams 3, answers of 7 tokens."""
    return SimpleNamespace(lm=None, tokenizer=None, beams=3, max_new_tokens=7, match=match)


def test_vqa_accuracy_counts_by_type_with_a_scripted_lm(monkeypatch):
    """The scorer's bookkeeping: a stand-in for generation answers every question "yes"; it is asked with the
    AnswerLM's own beams and answer length (the app's decoding)."""
    from capdemo.testing import tiny_encoder
    from training.shapes import vqa_eval

    decoding = []

    def say_yes(lm, tokenizer, prompts, *, beams, max_new_tokens):
        decoding.append((beams, max_new_tokens))
        return ["yes"] * len(prompts)

    monkeypatch.setattr(vqa_eval, "generate_answers", say_yes)
    scenes = [RED_CIRCLE_LEFT_OF_BLUE_SQUARE, Scene("group", "red", "circle", count=3)]
    asked = question_set(scenes, seed=0, colours=WORLD.colours, shapes=WORLD.shapes)
    report = vqa_accuracy([captions(s)[0] for s in scenes], asked, answer_lm=scripted_lm(), encoder=tiny_encoder(),
                          answers=AnswerList(list(ANSWERS)))
    assert decoding == [(3, 7)]
    flat = [q for qs in asked for q in qs]
    assert report["n"] == len(flat)
    assert report["accuracy"] == pytest.approx(sum(q.answer == "yes" for q in flat) / len(flat))
    assert report["by_type"]["colour"] == 0.0 and report["by_type"]["count"] == 0.0
    yes_no = [q for q in flat if q.kind == "yes/no"]
    assert report["by_type"]["yes/no"] == pytest.approx(sum(q.answer == "yes" for q in yes_no) / len(yes_no))
    with pytest.raises(ValueError, match="captions for"):
        vqa_accuracy(["one caption"], asked, answer_lm=scripted_lm(), encoder=tiny_encoder(), answers=None)


def test_vqa_accuracy_matches_answers_as_its_answer_lm_says(monkeypatch):
    """With word matching (the official code's), an answer is the first listed candidate it names as a word, or
    itself when it names none; with CLIP matching every answer becomes a candidate."""
    from capdemo.testing import tiny_encoder
    from training.shapes import vqa_eval

    said = ["it is red!", "a cupcake"]
    monkeypatch.setattr(vqa_eval, "generate_answers", lambda lm, tokenizer, prompts, **decoding: said[: len(prompts)])
    asked = [[Question("colour", "what colour is the circle?", "red"),
              Question("shape", "what shape is it?", "circle")]]
    answers = AnswerList(list(ANSWERS))
    report = vqa_accuracy(["a red circle on the left"], asked, answer_lm=scripted_lm("word"), encoder=tiny_encoder(),
                          answers=answers)
    assert [row["answer"] for row in report["examples"]] == ["red", "a cupcake"]
    by_clip = vqa_accuracy(["a red circle on the left"], asked, answer_lm=scripted_lm(), encoder=tiny_encoder(),
                           answers=answers)
    assert all(row["answer"] in ANSWERS for row in by_clip["examples"])


def test_vqa_accuracy_by_scene_kind_splits_the_questions_by_their_scene(monkeypatch):
    """Pair scenes apart: a scripted LM answering "red" is right on the pair's colour question about its red
    circle, and on nothing about a group of blue squares."""
    from capdemo.testing import tiny_encoder
    from training.shapes import vqa_eval

    monkeypatch.setattr(vqa_eval, "generate_answers", lambda lm, tokenizer, prompts, **decoding: ["red"] * len(prompts))
    scenes = [RED_CIRCLE_LEFT_OF_BLUE_SQUARE, Scene("group", "blue", "square", count=2)]
    asked = question_set(scenes, seed=0, colours=WORLD.colours, shapes=WORLD.shapes)
    report = vqa_accuracy([captions(s)[0] for s in scenes], asked, answer_lm=scripted_lm(), encoder=tiny_encoder(),
                          answers=AnswerList(list(ANSWERS)), scene_kinds=[s.kind for s in scenes])
    pair, group = report["by_scene_kind"]["pair"], report["by_scene_kind"]["group"]
    assert (pair["n"], group["n"]) == (len(asked[0]), len(asked[1]))
    colour = [q for q in asked[0] if q.kind == "colour"]
    assert [q.answer for q in colour] == ["red", "blue"]
    assert pair["by_type"]["colour"] == 0.5 and pair["accuracy"] == pytest.approx(1 / len(asked[0]))
    assert group["accuracy"] == 0.0
    assert "by_scene_kind" not in vqa_accuracy([captions(s)[0] for s in scenes], asked, answer_lm=scripted_lm(),
                                               encoder=tiny_encoder(), answers=AnswerList(list(ANSWERS)))
    with pytest.raises(ValueError, match="1 scene kinds for 2 question lists"):
        vqa_accuracy([captions(s)[0] for s in scenes], asked, answer_lm=scripted_lm(), encoder=tiny_encoder(),
                     answers=AnswerList(list(ANSWERS)), scene_kinds=["pair"])


# The LM's pretraining rows


def test_pretraining_rows_start_question_answer_texts_at_zero_and_weight_the_answers():
    from training.shapes.lm import PackedCaptions, PretrainingRows, train_tokenizer

    captions_ = ["a red circle on the left", "two blue squares", "a green triangle above a red square"] * 4
    qa = qa_texts([RED_CIRCLE_LEFT_OF_BLUE_SQUARE] * 3, np.random.default_rng(1), colours=WORLD.colours,
                  shapes=WORLD.shapes, per_text=2)
    every_qa = qa_texts(all_scenes(WORLD), np.random.default_rng(0), colours=WORLD.colours, shapes=WORLD.shapes)
    tokenizer = train_tokenizer([*captions_, *qa, *every_qa], vocab_size=400)  # as the build: answers are one token
    assert all(len(tokenizer(" " + answer, add_special_tokens=False)["input_ids"]) == 1 for answer in ANSWERS[:6])
    rows = PretrainingRows(captions_, qa, tokenizer, length=48, answer_weight=5.0)
    packed = PackedCaptions(captions_, tokenizer, length=48).rows
    assert len(rows) == len(packed) + len(qa)
    assert torch.equal(rows.ids[: len(packed)], packed) and torch.all(rows.weights[: len(packed)] == 1.0)
    for j, text in enumerate(qa):
        item = rows[len(packed) + j]
        ids = [tokenizer.eos_token_id, *tokenizer(text, add_special_tokens=False)["input_ids"], tokenizer.eos_token_id]
        kept = min(len(ids), 48)  # a text longer than a row is cut
        assert item["input_ids"][:kept].tolist() == ids[:kept]
        assert torch.all(item["input_ids"][kept:] == tokenizer.pad_token_id)
        assert torch.all(item["weights"][kept:] == 0.0)  # padding teaches nothing
        weighted = [tokenizer.decode([t]).strip() for t, w in zip(item["input_ids"].tolist(),
                                                                   item["weights"].tolist()) if w == 5.0]
        shown = tokenizer.decode(ids[1:kept], skip_special_tokens=True)
        assert weighted == re.findall(r"Answer: (\S+)", shown)  # exactly the answers in the row, each once
        assert weighted  # the first answer always fits


def test_the_shipped_frozen_lm_reads_answers_back_from_true_captions():
    """The shipped bundle's untouched LM (``vqa/lm``) answers held-out questions from the scenes' true captions:
    every question type above chance, and more than 0.7 of all (measured 0.796 on 1,514 questions; the 200-step LM
    world v1 shipped scored 0.509, colour at chance). Exact match of the generated answer, no answer list."""
    from pathlib import Path

    from capdemo.lm import load_causal_lm
    from training.shapes.questions import prompt
    from training.shapes.vqa_eval import generate_answers
    from training.shapes.world import generate_scenes

    lm, tokenizer = load_causal_lm(Path(__file__).resolve().parents[1] / "weights" / "shapes" / "vqa" / "lm")
    scenes = generate_scenes(60, seed=1234, config=WORLD)
    asked = [(captions(scene)[0], q) for scene, qs in zip(scenes, question_set(
        scenes, seed=1234, colours=WORLD.colours, shapes=WORLD.shapes)) for q in qs]
    generated = generate_answers(lm, tokenizer, [prompt(caption, q.text) for caption, q in asked])
    right, total = Counter(), Counter()
    for (_, question), answer in zip(asked, generated):
        total[question.kind] += 1
        right[question.kind] += answer == question.answer
    assert sum(right.values()) / len(asked) > 0.7, dict(right)
    chance = {"colour": 1 / len(WORLD.colours), "shape": 1 / len(WORLD.shapes), "count": 1 / WORLD.max_count,
              "position": 1 / len(WHERE), "yes/no": 1 / 2}  # a uniform guess among each type's answers
    assert all(right[kind] / total[kind] > chance[kind] + 0.1 for kind in total), (dict(right), dict(total))


def test_the_evaluation_answers_as_the_app_answers():
    """shapes-eval's VQA score is the app's: on the true captions of 12 held-out scenes every answer the batched
    scorer picks is the one the app (``Captioner.answer``'s AnswerLM, one prompt at a time) gives. The app decodes
    the shipped frozen LM with MacCap's 4 beams; greedy decoding, which the scorer used until 2026-12-06, answers
    4 of these 91 questions otherwise ("what color is the triangle?" on "a blue square above a yellow triangle":
    yellow greedily, blue with 4 beams)."""
    from pathlib import Path

    from capdemo.pipeline import Captioner
    from capdemo.vqa import answer_question
    from training.shapes.world import generate_scenes

    captioner = Captioner.from_bundle(Path(__file__).resolve().parents[1] / "weights" / "shapes")
    scenes = generate_scenes(12, seed=1234, config=WORLD)
    asked = question_set(scenes, seed=1234, colours=WORLD.colours, shapes=WORLD.shapes)
    truth = [captions(scene)[0] for scene in scenes]
    served = captioner.answer_lm
    report = vqa_accuracy(truth, asked, answer_lm=served, encoder=captioner.encoder, answers=captioner.answers,
                          examples=10**6)
    app = [answer_question(served, captioner.encoder, caption, q.text, captioner.answers).answer
           for caption, qs in zip(truth, asked) for q in qs]
    assert len(report["examples"]) == len(app) == 91
    assert [row["answer"] for row in report["examples"]] == app
    assert served.beams == 4 and report["examples"][2]["answer"] == "blue"


def test_correction_geometry_on_a_hand_made_case():
    """Two pairs in 2-d, statistics that shrink dimension 1 to a quarter for mean+std (means zero, so the mean-only
    correction moves nothing): each image's nearest caption is its own before the correction; after it, image 1's
    nearest by distance is caption 0, though by cosine it would still be its own."""
    from capdemo.gap import GapStats

    images = F.normalize(torch.tensor([[-1.0, 2.0], [0.0, -1.0]]), dim=-1)
    texts = F.normalize(torch.tensor([[-1.0, 3.0], [2.0, 3.0]]), dim=-1)
    zeros = torch.zeros(2)
    stats = GapStats(mu_image=zeros, sigma_image=torch.tensor([1.0, 0.25]), mu_text=zeros,
                     sigma_text=torch.ones(2), n_image=2, n_text=2)
    numbers = correction_geometry(images, texts, [0, 1], stats)
    assert set(numbers) == {"none", "mean", "mean_std"}
    assert numbers["none"]["nearest_caption_same_scene"] == recall_at_1(images, texts, [0, 1]) == 1.0
    assert numbers["mean"] == pytest.approx(numbers["none"])
    corrected = [(x, y / 4) for x, y in texts.tolist()]  # (t - 0) * sigma_I / sigma_T + 0
    image_1 = images[1].tolist()
    assert math.dist(image_1, corrected[0]) < math.dist(image_1, corrected[1])  # 1.277 < 1.330: a miss
    assert numbers["mean_std"]["nearest_caption_same_scene"] == 0.5
    own = [math.dist(i, c) for i, c in zip(images.tolist(), corrected)]
    assert numbers["mean_std"]["paired_distance"] == pytest.approx(sum(own) / 2, abs=1e-6)
    cosines = [(i[0] * c[0] + i[1] * c[1]) / math.hypot(*c) for i, c in zip(images.tolist(), corrected)]
    assert numbers["mean_std"]["paired_cosine"] == pytest.approx(sum(cosines) / 2, abs=1e-6)
