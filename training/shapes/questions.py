"""Question-answer text about shapes scenes, in the VQA prompt format, for pretraining the shapes LM.

MacCap answers questions by prompting its LM with ``"{caption} Question: {q} Answer:"``.
A real LM knows how to answer; the shapes world's tiny LM learns it here, from text
alone (captions plus questions whose answers the caption states), so the app's VQA
tab shows real behaviour on the shipped bundle.
"""

from __future__ import annotations

import numpy as np

from capdemo.vqa import VQA_PROMPT
from training.shapes.language import Scene, captions

COUNT_ANSWERS = {1: "1", 2: "2", 3: "3"}
WHERE = {"left": "left", "right": "right", "top": "top", "bottom": "bottom", "centre": "middle"}


def question_answers(scene: Scene) -> list[tuple[str, str]]:
    """Questions whose answer the scene's caption states, with that answer (VQAv2-style short answers)."""
    plural = "s" if scene.count > 1 else ""
    qa = [
        (f"what color is the {scene.shape}{plural}?", scene.colour),
        (f"what shape is the {scene.colour} object{plural}?", scene.shape),
        ("how many objects are there?", COUNT_ANSWERS[scene.count]),
        (f"is there a {scene.colour} {scene.shape}?", "yes"),
    ]
    if scene.kind == "single":
        qa += [(f"where is the {scene.shape}?", WHERE[scene.position]), (f"is the {scene.shape} large?",
               "yes" if scene.size == "large" else "no")]
    if scene.kind == "pair":
        qa += [(f"what color is the {scene.shape2}?", scene.colour2),
               (f"is the {scene.shape} {'left of' if scene.relation == 'left of' else 'above'} the {scene.shape2}?",
                "yes")]
    return qa


def qa_texts(scenes: list[Scene], rng: np.random.Generator) -> list[str]:
    """One prompt-formatted question-answer text per scene: a random paraphrase and a random question."""
    texts = []
    for scene in scenes:
        options = captions(scene)
        caption = options[int(rng.integers(len(options)))]
        pairs = question_answers(scene)
        question, answer = pairs[int(rng.integers(len(pairs)))]
        texts.append(f"{VQA_PROMPT.format(caption=caption, question=question)} {answer}")
    return texts
