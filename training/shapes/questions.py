"""Questions about shapes scenes with their true answers, the world's answer list, and LM pretraining text.

MacCap answers a question by prompting its frozen LM with ``"{caption} Question: {q} Answer:"``
(capdemo.vqa.VQA_PROMPT). A real LM already knows how to answer; the shapes world's tiny LM learns
it here, from text alone: captions followed by questions whose answer the caption states. The same
generator writes the held-out evaluation questions (on other seeds), so every question type the
world supports is both taught and scored:

- colour: "what colour is the square?" -> "blue"
- shape: "what shape is the red object?" -> "circle"
- count: "how many circles are there?" -> "3"
- position: "where is the red circle?" -> "left" (singles: left/right/top/bottom/middle; pairs: the side)
- yes/no: "is there a green triangle?", "is the circle large?", "is the red circle left of the blue square?",
  "are there three squares?" -> "yes" / "no", about as often each

Answers are short VQAv2-style strings (digits for counts), all in :func:`answer_list`, the answer list a
shapes bundle ships (real bundles ship VQAv2's 3,128).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from capdemo.vqa import VQA_PROMPT
from training.shapes.language import COUNT_WORDS, SIZES, Scene, captions

QUESTION_TYPES = ("colour", "shape", "count", "position", "yes/no")
WHERE = {"left": "left", "right": "right", "top": "top", "bottom": "bottom", "centre": "middle"}
COUNT_ANSWERS = {n: str(n) for n in range(1, max(COUNT_WORDS) + 1)}  # VQAv2 writes counts as digits
_COLOUR_WORDS = ("colour", "color")  # both spellings occur in questions (the README asks "what colour")
_SIDES = {"left of": ("left", "right"), "above": ("top", "bottom")}  # where a pair's first and second objects are


@dataclass(frozen=True)
class Question:
    """One question about a scene, the answer its caption implies, and the question's type."""

    kind: str  # one of QUESTION_TYPES
    text: str  # lower case, ends with "?"
    answer: str  # one of the world's answer_list


def answer_list(*, colours: tuple[str, ...], shapes: tuple[str, ...], max_count: int) -> tuple[str, ...]:
    """Every answer a question about a world with these colours, shapes and largest group can have: the
    answer list its bundle ships (a word the world never draws, such as an unused shape, is not an answer)."""
    counts = (COUNT_ANSWERS[n] for n in range(1, max_count + 1))
    return (*colours, *shapes, *counts, *dict.fromkeys(WHERE.values()), "yes", "no")


def _plural(shape: str) -> str:
    return shape + ("es" if shape.endswith("s") else "s")


def _objects(scene: Scene) -> list[tuple[str, str, str | None]]:
    """(colour, shape, where) of each drawn object; where is the object's side, None when it has none to tell."""
    if scene.kind == "single":
        return [(scene.colour, scene.shape, WHERE[scene.position])]
    if scene.kind == "pair":
        first, second = _SIDES[scene.relation]
        return [(scene.colour, scene.shape, first), (scene.colour2, scene.shape2, second)]
    return [(scene.colour, scene.shape, None)] * scene.count


def _absent_object(scene: Scene, rng: np.random.Generator, colours, shapes) -> tuple[str, str]:
    """A (colour, shape) drawn uniformly among those not in the scene."""
    present = {(c, s) for c, s, _ in _objects(scene)}
    options = [(c, s) for c in colours for s in shapes if (c, s) not in present]
    return options[int(rng.integers(len(options)))]


def questions(scene: Scene, rng: np.random.Generator, *, colours: tuple[str, ...], shapes: tuple[str, ...]
              ) -> list[Question]:
    """Every question type about ``scene`` (one or more of each), answered from the scene.

    ``rng`` picks the spelling of "colour", the object a yes/no question names and whether it is true;
    ``colours``/``shapes`` are the world's (absent objects are drawn from them).
    """
    objects = _objects(scene)
    colour_word = _COLOUR_WORDS[int(rng.integers(2))]
    out: list[Question] = []
    distinct_shapes = {s for _, s, _ in objects}
    distinct_colours = {c for c, _, _ in objects}
    # colour and shape: name the object by what identifies it in this scene
    for colour, shape, where in dict.fromkeys(objects):
        if scene.kind == "group":
            out.append(Question("colour", f"what {colour_word} are the {_plural(shape)}?", colour))
            out.append(Question("shape", f"what shape are the {colour} objects?", shape))
            continue
        if len(distinct_shapes) == len(objects):
            out.append(Question("colour", f"what {colour_word} is the {shape}?", colour))
        else:  # a pair of two circles: say which one
            out.append(Question("colour", f"what {colour_word} is the {shape} on the {where}?"
                                if where in ("left", "right") else f"what {colour_word} is the {shape} at the {where}?",
                                colour))
        if len(distinct_colours) == len(objects):
            out.append(Question("shape", f"what shape is the {colour} object?", shape))
        else:  # a pair of two red objects: say which one
            place = f"on the {where}" if where in ("left", "right") else f"at the {where}"
            out.append(Question("shape", f"what shape is the object {place}?", shape))
    # count: of one shape, or of everything
    shape = objects[int(rng.integers(len(objects)))][1]
    count = sum(s == shape for _, s, _ in objects)
    out.append(Question("count", f"how many {_plural(shape)} are there?", COUNT_ANSWERS[count]))
    out.append(Question("count", "how many objects are there?", COUNT_ANSWERS[len(objects)]))
    # position: where a named object is
    if scene.kind != "group":
        colour, shape, where = objects[int(rng.integers(len(objects)))]
        out.append(Question("position", f"where is the {colour} {shape}?", where))
    # yes/no: existence, size, relation, count; true and false about equally often
    if rng.random() < 0.5:
        colour, shape, _ = objects[int(rng.integers(len(objects)))]
        out.append(Question("yes/no", f"is there a {colour} {shape}?", "yes"))
    else:
        colour, shape = _absent_object(scene, rng, colours, shapes)
        out.append(Question("yes/no", f"is there a {colour} {shape}?", "no"))
    if scene.kind == "single":
        size = SIZES[int(rng.integers(len(SIZES)))]
        out.append(Question("yes/no", f"is the {scene.shape} {size}?", "yes" if size == scene.size else "no"))
    elif scene.kind == "pair":
        (c1, s1, _), (c2, s2, _) = objects
        word = "left of" if scene.relation == "left of" else "above"
        truth = rng.random() < 0.5
        a, b = ((c1, s1), (c2, s2)) if truth else ((c2, s2), (c1, s1))
        out.append(Question("yes/no", f"is the {a[0]} {a[1]} {word} the {b[0]} {b[1]}?", "yes" if truth else "no"))
    else:
        asked = int(rng.choice(list(COUNT_WORDS)))
        out.append(Question("yes/no", f"are there {COUNT_WORDS[asked]} {_plural(scene.shape)}?",
                            "yes" if asked == scene.count else "no"))
    return out


def prompt(caption: str, question: str) -> str:
    """The VQA prompt the LM continues (the paper's format, capdemo.vqa.VQA_PROMPT)."""
    return VQA_PROMPT.format(caption=caption, question=question)


def pick_one_per_type(asked: list[Question], rng: np.random.Generator) -> Question:
    """A question type uniformly among those asked, then one question of that type."""
    kinds = [kind for kind in QUESTION_TYPES if any(q.kind == kind for q in asked)]
    kind = kinds[int(rng.integers(len(kinds)))]
    of_kind = [q for q in asked if q.kind == kind]
    return of_kind[int(rng.integers(len(of_kind)))]


def example_questions(scenes: list[Scene], *, seed: int, colours: tuple[str, ...], shapes: tuple[str, ...]
                      ) -> list[Question]:
    """One question about each scene (the shipped examples), its type in rotation through QUESTION_TYPES: scene i
    gets type i (mod 5), or the next type it can be asked (a group has no position question). A rule fixed before
    training, like the examples': the answers are the world's truth, whatever the bundle answers."""
    chosen = []
    for i, scene in enumerate(scenes):
        asked = questions(scene, np.random.default_rng([seed, i]), colours=colours, shapes=shapes)
        kinds = QUESTION_TYPES[i % len(QUESTION_TYPES):] + QUESTION_TYPES[:i % len(QUESTION_TYPES)]
        chosen.append(next(q for kind in kinds for q in asked if q.kind == kind))
    return chosen


def qa_texts(scenes: list[Scene], rng: np.random.Generator, *, colours: tuple[str, ...], shapes: tuple[str, ...],
             per_text: int = 1) -> list[str]:
    """One LM pretraining text per scene: a random paraphrase, then ``per_text`` questions and their answers.

    The first question follows the caption exactly as in the VQA prompt; the others follow the previous answer
    in the same form (``... Answer: blue Question: ... Answer: 2``), so one text teaches several answers.
    Each question's type is drawn uniformly among the types asked about the scene.
    """
    texts = []
    for scene in scenes:
        options = captions(scene)
        caption = options[int(rng.integers(len(options)))]
        asked = questions(scene, rng, colours=colours, shapes=shapes)
        text = caption
        for _ in range(per_text):
            question = pick_one_per_type(asked, rng)
            text = f"{prompt(text, question.text)} {question.answer}"
        texts.append(text)
    return texts
