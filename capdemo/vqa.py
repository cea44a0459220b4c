"""Zero-shot VQA through a caption (MacCap §4.4): caption -> LM answer -> nearest candidate answers.

The image is captioned by MacCap; the LM alone (no visual prefix) continues the
prompt ``"[caption] Question: [question] Answer:"`` (an :class:`AnswerLM`: the
frozen, untouched LM when the bundle ships one, as in the paper, where MacCap's
LM is frozen; else the captioning method's own LM); its short free-form answer
is embedded with the CLIP text encoder and the candidate answers (VQAv2's 3,128)
are ranked by cosine with it (the paper). ``MacCapConfig.vqa_match = "word"``
switches to the official code's matching instead: every candidate that occurs as
a whole word in the generated answer, in list order (multi-word answers cannot
match that way).
"""

from __future__ import annotations

import json
import re
import string
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from collections.abc import Sequence

import torch

from capdemo.bundle import BundleError
from capdemo.encoders import ClipEncoder
from capdemo.lm import (
    clean_text, decode, embed_tokens, generate_from_embeds, load_causal_lm, max_positions, special_ids,
)

VQA_PROMPT = "{caption} Question: {question} Answer:"  # paper §4.4
VQA_COMPONENT = "vqa"  # bundle component naming the answer files below
ANSWERS_FILE = "vqa/answers.json"  # JSON list of candidate answers
VQA_LM_KEY = "lm"  # optional field of the vqa component: the weight source of the frozen LM that answers
VQA_CAPTION_METHOD_KEY = "caption_method"  # optional field of the vqa component: the method whose captions the LM
# reads (default: the first method with an LM of its own, MacCap, as in the paper)
VQA_EXAMPLES_KEY = "examples"  # optional field of the vqa component: a bundle JSON file of questions about its example
# images, [{"image": <bundle path>, "question", "answer"}], that the Ask tab offers (a shapes bundle's answers are the
# world's truth, so a visitor sees the question forms its LM was taught and can check the answer)
MATCH_MODES = ("clip", "word")
ANSWER_EMBEDS_FILE = "vqa/answer_embeds.safetensors"  # their CLIP text embeddings, "embeds" (N, D)
ENCODE_BATCH = 512  # answers per CLIP text-encoder call when embedding the list
_PUNCTUATION = re.compile(f"[{re.escape(string.punctuation)}]")


class AnswerListError(ValueError):
    """A candidate-answer file that cannot be read as one."""


class AnswerList:
    """Candidate answers and (lazily) their CLIP text embeddings.

    Embeddings are computed once, on first use, with the encoder that asks; or
    they come precomputed (from a bundle), in which case they must be the
    embeddings of that bundle's encoder, which the bundle guarantees.
    """

    def __init__(self, answers: Sequence[str], *, embeds: torch.Tensor | None = None):
        self.answers = [a for a in answers if a.strip()]
        if not self.answers:
            raise AnswerListError("the candidate answer list is empty")
        if embeds is not None and embeds.shape[0] != len(self.answers):
            raise AnswerListError(f"{embeds.shape[0]} answer embeddings for {len(self.answers)} answers")
        self._embeds = embeds
        self._embedded_by: int | None = None  # id() of the encoder that computed _embeds (None: precomputed)

    def __len__(self) -> int:
        return len(self.answers)

    @classmethod
    def from_openvqa(cls, path: str | Path) -> AnswerList:
        """The VQAv2 vocabulary file ``[ans_to_ix, ix_to_ans]`` (openvqa): its non-empty answers in index order."""
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
            ans_to_ix = data[0]
            ordered = sorted(ans_to_ix.items(), key=lambda item: int(item[1]))
        except (OSError, json.JSONDecodeError, KeyError, IndexError, TypeError, AttributeError, ValueError) as err:
            raise AnswerListError(f"{path}: not an openvqa answer dictionary [ans_to_ix, ix_to_ans] ({err})") from None
        return cls([answer for answer, _ in ordered])

    @classmethod
    def from_bundle(cls, bundle: Any) -> AnswerList:
        """The answers a bundle ships, with their precomputed embeddings."""
        shipped = ANSWER_EMBEDS_FILE in bundle.manifest["files"]
        embeds = bundle.tensors(ANSWER_EMBEDS_FILE)["embeds"] if shipped else None
        return cls(bundle.json(ANSWERS_FILE), embeds=embeds)

    def add_to_bundle(self, writer: Any, encoder: ClipEncoder, *, lm: str | None = None) -> None:
        """Ship the answers and their embeddings by ``encoder`` (the bundle's encoder) in a BundleWriter;
        ``lm``: the weight source of a frozen LM that answers instead of the captioning method's own."""
        writer.add_json(ANSWERS_FILE, self.answers)
        writer.add_tensors(ANSWER_EMBEDS_FILE, {"embeds": self.embeddings(encoder)})
        writer.add_component(VQA_COMPONENT, {"answers": ANSWERS_FILE, "embeddings": ANSWER_EMBEDS_FILE,
                                             "count": len(self.answers), **({VQA_LM_KEY: lm} if lm else {})})

    def embeddings(self, encoder: ClipEncoder) -> torch.Tensor:
        """(N, D) L2-normalised CLIP text embeddings of the answers, computed at most once per encoder."""
        stale = self._embeds is None or (self._embedded_by is not None and self._embedded_by != id(encoder))
        if stale:
            chunks = [encoder.encode_text(self.answers[i : i + ENCODE_BATCH]).cpu()
                      for i in range(0, len(self.answers), ENCODE_BATCH)]
            self._embeds, self._embedded_by = torch.cat(chunks), id(encoder)
        if self._embeds.shape[1] != encoder.embed_dim:
            raise AnswerListError(
                f"answer embeddings are {self._embeds.shape[1]}-d, the encoder's are {encoder.embed_dim}-d"
            )
        return self._embeds


@dataclass(frozen=True)
class VQAResult:
    """An answer and how it was reached."""

    answer: str  # the best candidate answer (word mode with no match: the generated answer itself)
    generated: str  # the LM's free-form answer
    caption: str  # the caption the prompt was built from
    prompt: str  # the exact text the LM continued
    top_answers: list[tuple[str, float]] = field(default_factory=list)  # candidates best first, with scores

    def to_json(self) -> dict[str, Any]:
        return {"answer": self.answer, "generated": self.generated, "caption": self.caption, "prompt": self.prompt,
                "top_answers": [{"text": a, "score": s} for a, s in self.top_answers]}


@dataclass(frozen=True)
class ExampleQuestion:
    """A question about one of a bundle's example images, with its true answer."""

    image: Path
    question: str
    answer: str


def example_questions(bundle: Any) -> list[ExampleQuestion]:
    """The questions about its examples that a bundle ships (none when its vqa component names no file)."""
    relpath = bundle.component(VQA_COMPONENT).get(VQA_EXAMPLES_KEY) if bundle.has(VQA_COMPONENT) else None
    if relpath is None:
        return []
    files, where = bundle.manifest.get("files", {}), bundle.path / relpath
    listed = bundle.json(relpath)
    out = []
    for entry in listed if isinstance(listed, list) else [listed]:
        fields = [entry.get(key) for key in ("image", "question", "answer")] if isinstance(entry, dict) else [None]
        if not all(isinstance(value, str) for value in fields):
            raise BundleError(f"{where}: each entry needs an image, a question and an answer (strings), got "
                              f"{entry!r:.80}")
        image, question, answer = fields
        if image not in files:
            raise BundleError(f"{where}: {image!r:.80} is not a file of the bundle")
        out.append(ExampleQuestion(bundle.path / image, question, answer))
    return out


def short_answer(text: str) -> str:
    """The LM's continuation cut to its answer: the first line, before any new "Question:", no trailing dots."""
    first_line = text.split("\n", 1)[0]
    return clean_text(first_line.split("Question:", 1)[0]).strip(" .,;:")


def word_matches(generated: str, answers: Sequence[str]) -> list[str]:
    """Candidates that occur as a whole word of the answer after dropping punctuation (reference matching)."""
    words = set(_PUNCTUATION.sub(" ", generated.lower()).split())
    return [answer for answer in answers if answer in words]


@dataclass
class AnswerLM:
    """The LM that answers questions, its tokenizer and how its answer is decoded and matched."""

    lm: Any
    tokenizer: Any
    beams: int = 1
    max_new_tokens: int = 10  # length cap of the free-form answer
    match: str = "clip"  # "clip": nearest answers by CLIP text cosine (paper); "word": whole-word matches

    def __post_init__(self):
        if self.match not in MATCH_MODES:
            raise ValueError(f"VQA match must be one of {', '.join(MATCH_MODES)}, got {self.match!r}")
        _, self.eos_id, self.pad_id = special_ids(self.tokenizer)

    @property
    def device(self) -> torch.device:
        return next(self.lm.parameters()).device

    def token_count(self, text: str) -> int:
        """Tokens of ``text`` as the prompt is tokenized (with the LM's usual special tokens)."""
        return len(self.tokenizer(text)["input_ids"])

    def prompt_room(self) -> int:
        """Positions of the LM left for the caption and the question: its context minus the VQA template's own
        tokens and the answer's ``max_new_tokens``."""
        return max_positions(self.lm) - self.max_new_tokens - self.token_count(VQA_PROMPT.format(caption="",
                                                                                                question=""))

    def question_limit(self, caption_tokens: int) -> int:
        """Characters a question may have so that it fits beside a caption of ``caption_tokens`` tokens: one
        token per character at most (true of ASCII for byte-level and character-level tokenizers; longer
        non-ASCII questions are checked in tokens by :meth:`fit_prompt`)."""
        return max(0, self.prompt_room() - caption_tokens)

    def fit_prompt(self, caption: str, question: str) -> str:
        """The VQA prompt for ``caption`` and ``question``, its caption cut at a token when prompt and answer would
        run past the LM's positions; a question that alone does not fit is a one-line error."""
        prompt = VQA_PROMPT.format(caption=caption, question=question).strip()
        room = max_positions(self.lm) - self.max_new_tokens
        excess = self.token_count(prompt) - room
        if excess <= 0:
            return prompt
        caption_ids = self.tokenizer(caption, add_special_tokens=False)["input_ids"]
        if excess >= len(caption_ids) + 1:
            question_tokens = self.token_count(question)
            raise ValueError(f"the question is {question_tokens} tokens long; the language model has room for "
                             f"{question_tokens - excess + len(caption_ids)} beside the prompt and the answer")
        caption = self.tokenizer.decode(caption_ids[: len(caption_ids) - excess - 1]).strip()
        return VQA_PROMPT.format(caption=caption, question=question).strip()

    @classmethod
    def of_config(cls, lm: Any, tokenizer: Any, config: Any) -> AnswerLM:
        """``lm`` answering with a captioning config's VQA settings (MacCapConfig's beams, vqa_max_new_tokens,
        vqa_match)."""
        return cls(lm, tokenizer, beams=config.beams, max_new_tokens=config.vqa_max_new_tokens, match=config.vqa_match)

    @classmethod
    def of_captioner(cls, model: Any) -> AnswerLM:
        """A captioning model's own LM with its VQA settings (:meth:`of_config` of its config)."""
        return cls.of_config(model.lm, model.tokenizer, model.config)

    @classmethod
    def frozen_from_bundle(cls, bundle: Any, like: AnswerLM, *, device: str | torch.device = "cpu") -> AnswerLM | None:
        """The frozen LM a bundle names for VQA (``vqa`` component, field ``lm``), decoded as ``like`` is;
        None when it names none."""
        spec = bundle.component(VQA_COMPONENT).get(VQA_LM_KEY) if bundle.has(VQA_COMPONENT) else None
        if spec is None:
            return None
        lm, tokenizer = load_causal_lm(bundle.locate(spec), device=device)
        return cls(lm.eval(), tokenizer, beams=like.beams, max_new_tokens=like.max_new_tokens, match=like.match)


def generate_answer(answer_lm: AnswerLM, prompt: str) -> str:
    """The LM's short answer to ``prompt`` (plain text; the tokenizer adds the LM's usual special tokens)."""
    ids = answer_lm.tokenizer(prompt, return_tensors="pt")["input_ids"].to(answer_lm.device)  # (1, L)
    out = generate_from_embeds(
        answer_lm.lm, embed_tokens(answer_lm.lm, ids), eos_token_id=answer_lm.eos_id, pad_token_id=answer_lm.pad_id,
        beams=answer_lm.beams, max_new_tokens=answer_lm.max_new_tokens,
    )
    return short_answer(decode(answer_lm.tokenizer, out, raw=True)[0])  # cut at the first line break, then clean


@torch.inference_mode()
def answer_question(answer_lm: AnswerLM, encoder: ClipEncoder, caption: str, question: str, answers: AnswerList, *,
                    top_k: int = 10) -> VQAResult:
    """Answer a (cleaned) ``question`` about an image described by ``caption``: ``answer_lm``'s LM continues
    the VQA prompt, and its short answer is matched against the candidate answers (``top_k`` listed)."""
    prompt = answer_lm.fit_prompt(caption, question)
    generated = generate_answer(answer_lm, prompt)
    if answer_lm.match == "word":
        top = [(answer, 1.0) for answer in word_matches(generated, answers.answers)[:top_k]]
        best = top[0][0] if top else generated
    else:
        query = encoder.encode_text([generated]).cpu()  # (1, D); "" is a valid CLIP input
        scores = (answers.embeddings(encoder) @ query[0]).float()  # (N,)
        values, index = scores.topk(min(top_k, len(answers)))
        top = [(answers.answers[i], float(v)) for v, i in zip(values.tolist(), index.tolist())]
        best = top[0][0]
    return VQAResult(answer=best, generated=generated, caption=caption, prompt=prompt, top_answers=top)


__all__ = [
    "AnswerList",
    "AnswerLM",
    "AnswerListError",
    "VQAResult",
    "VQA_PROMPT",
    "answer_question",
    "generate_answer",
    "short_answer",
    "word_matches",
]
