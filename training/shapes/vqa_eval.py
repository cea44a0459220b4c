"""VQA in the shapes world, scored as MacCap §4.4 answers: caption -> LM answer -> nearest candidate answer.

Each held-out image is captioned (by the caller, e.g. MacCap from the bundle); the LM continues
``"{caption} Question: {q} Answer:"`` (capdemo.vqa.VQA_PROMPT) for questions generated from the image's
true scene (:func:`training.shapes.questions.questions`); the continuation is decoded, cut with
:func:`capdemo.vqa.short_answer` and matched to the answer list as the app's :class:`capdemo.vqa.AnswerLM`
says (its beams, answer length and matching), so the score is the app's. The AnswerLM is an argument,
so the same evaluation scores the frozen, untouched LM (the paper's VQA) and the LM that MacCap's
caption training changed (the paper's §5.4: fine-tuning the LM harms VQA).
"""

from __future__ import annotations

from collections import Counter
from typing import Any
from collections.abc import Sequence

import numpy as np
import torch

from capdemo.encoders import ClipEncoder
from capdemo.lm import decode, embed_tokens, generate_from_embeds, special_ids
from capdemo.vqa import AnswerList, AnswerLM, short_answer, word_matches
from training.shapes.language import Scene
from training.shapes.questions import QUESTION_TYPES, Question, prompt, questions

ANSWER_BATCH = 64  # prompts per generate call


@torch.inference_mode()
def generate_answers(lm: Any, tokenizer: Any, prompts: Sequence[str], *, beams: int = 1,
                     max_new_tokens: int = AnswerLM.max_new_tokens) -> list[str]:
    """The LM's short answer to each prompt: tokenised as capdemo.vqa does, left-padded into batches (the same
    answers as :func:`capdemo.vqa.generate_answer` one prompt at a time)."""
    _, eos_id, pad_id = special_ids(tokenizer)
    device = next(lm.parameters()).device
    answers: list[str] = []
    for start in range(0, len(prompts), ANSWER_BATCH):
        rows = tokenizer(list(prompts[start : start + ANSWER_BATCH]))["input_ids"]
        length = max(map(len, rows))
        ids = torch.full((len(rows), length), pad_id, dtype=torch.long, device=device)
        mask = torch.zeros_like(ids)
        for row, tokens in enumerate(rows):  # left padding: every prompt ends where generation starts
            ids[row, length - len(tokens):] = torch.tensor(tokens, dtype=torch.long)
            mask[row, length - len(tokens):] = 1
        out = generate_from_embeds(lm, embed_tokens(lm, ids), mask, eos_token_id=eos_id, pad_token_id=pad_id,
                                   beams=beams, max_new_tokens=max_new_tokens)
        answers += [short_answer(text) for text in decode(tokenizer, out, raw=True)]
    return answers


@torch.inference_mode()
def match_answers(generated: Sequence[str], answers: AnswerList, encoder: ClipEncoder, *, match: str = "clip"
                  ) -> list[str]:
    """Each free-form answer's best candidate as capdemo.vqa picks it: ``match="clip"``, the nearest by CLIP text
    cosine; ``"word"``, the first candidate that occurs as a whole word (none: the answer itself)."""
    if match == "word":
        return [next(iter(word_matches(text, answers.answers)), text) for text in generated]
    queries = torch.cat([encoder.encode_text(list(generated[i : i + 256])).cpu()
                         for i in range(0, len(generated), 256)])  # (Q, D)
    best = (queries.float() @ answers.embeddings(encoder).float().T).argmax(dim=1)  # (Q,)
    return [answers.answers[i] for i in best.tolist()]


def question_set(scenes: Sequence[Scene], *, seed: int, colours: tuple[str, ...], shapes: tuple[str, ...]
                 ) -> list[list[Question]]:
    """Every question of :func:`questions` for each scene, drawn from one seeded generator."""
    rng = np.random.default_rng(seed)
    return [questions(scene, rng, colours=colours, shapes=shapes) for scene in scenes]


def vqa_accuracy(captions: Sequence[str], asked: Sequence[Sequence[Question]], *, answer_lm: AnswerLM,
                 encoder: ClipEncoder, answers: AnswerList, examples: int = 5,
                 scene_kinds: Sequence[str] | None = None) -> dict[str, Any]:
    """Accuracy overall and by question type of ``answer_lm`` answering ``asked[i]`` from ``captions[i]``, decoded
    and matched as the app does with it.

    Returns ``{"accuracy", "n" (questions), "by_type": {type: accuracy}, "examples": [...]}``, and with
    ``scene_kinds`` (the kind of each caption's scene) also ``"by_scene_kind": {kind: {"accuracy", "n",
    "by_type"}}``: whether the LM binds an attribute to its object shows only in scenes with two objects.
    """
    if len(captions) != len(asked):
        raise ValueError(f"{len(captions)} captions for {len(asked)} question lists")
    if scene_kinds is not None and len(scene_kinds) != len(asked):
        raise ValueError(f"{len(scene_kinds)} scene kinds for {len(asked)} question lists")
    kinds = scene_kinds if scene_kinds is not None else [None] * len(asked)
    flat = [(caption, q, kind) for caption, qs, kind in zip(captions, asked, kinds) for q in qs]
    if not flat:
        raise ValueError("no questions to answer")
    generated = generate_answers(answer_lm.lm, answer_lm.tokenizer, [prompt(c, q.text) for c, q, _ in flat],
                                 beams=answer_lm.beams, max_new_tokens=answer_lm.max_new_tokens)
    chosen = match_answers(generated, answers, encoder, match=answer_lm.match)
    scored = [(q, answer == q.answer) for (_, q, _), answer in zip(flat, chosen)]
    report = {
        **_accuracy_by_type(scored),
        "examples": [{"prompt": prompt(c, q.text), "generated": g, "answer": a, "truth": q.answer}
                     for (c, q, _), g, a in list(zip(flat, generated, chosen))[:examples]],
    }
    if scene_kinds is not None:
        report["by_scene_kind"] = {
            kind: _accuracy_by_type([row for row, (_, _, of) in zip(scored, flat) if of == kind])
            for kind in dict.fromkeys(scene_kinds)
        }
    return report


def _accuracy_by_type(scored: Sequence[tuple[Question, bool]]) -> dict[str, Any]:
    """``{"accuracy", "n", "by_type"}`` of questions scored right (True) or wrong."""
    correct, total = Counter(), Counter()
    for question, right in scored:
        total[question.kind] += 1
        correct[question.kind] += right
    return {"accuracy": sum(correct.values()) / len(scored), "n": len(scored),
            "by_type": {kind: correct[kind] / total[kind] for kind in QUESTION_TYPES if total[kind]}}
