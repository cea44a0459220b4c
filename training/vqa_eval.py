"""``python -m training vqa-eval``: MacCap's zero-shot VQAv2 evaluation (paper §5.4, Table 4), resumable.

    python -m training vqa-eval --weights weights/maccap-coco \
        --questions v2_OpenEnded_mscoco_val2014_questions.json --annotations v2_mscoco_val2014_annotations.json \
        --images COCO/val2014 --out results/maccap-vqa.jsonl

The protocol, as the paper states it: a seeded random sample of ``--n``
(20,000) VQAv2 validation questions; each is answered through the app's own
code path (caption the image, prompt the frozen LM with
``"{caption} Question: {q} Answer:"``, rank the bundle's candidate answers,
VQAv2's 3,128, by CLIP similarity with the generated answer) and scored as
"image-text retrieval": a question is a top-k hit when its ground-truth answer
is among the first k ranked candidates (k = 1, 5, 10). The paper does not say
which annotation is the ground truth; here it is VQAv2's
``multiple_choice_answer`` (the answer most of the ten annotators gave) by
default, and ``--ground-truth any`` counts any of the ten annotator answers.
Both sides are compared after :func:`training.evaluate.normalise_answer`.

``--question-only`` is the paper's "Baseline" row: the LM answers from
``"Question: {q} Answer:"`` with no caption (no image is read).

Each answered question is appended to ``--out`` as one JSON line (the format
``python -m training evaluate --vqa`` reads); a killed run continues where it
stopped, and ``--out.run.json`` records the bundle, sample and mode so a resume
with other ones is refused. Questions are answered grouped by image, and an
image is captioned once for all of its questions.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from PIL import Image

import capdemo  # noqa: F401  (the torchvision shim, before any model library)
from capdemo.images import ImageLoadError, load_image
from capdemo.inputs import positive_int
from training.caption_split import check_run_record, done_ids
from training.datasets import DataFormatError, read_json_records
from training.evaluate import VQA_TOP_KS, EvaluationError, QuestionId, vqa_topk_accuracy

DEFAULT_SAMPLE = 20_000  # questions the paper samples from VQAv2 val
GROUND_TRUTHS = ("majority", "any")  # multiple_choice_answer, or any of the ten annotator answers
DEFAULT_IMAGE_PATTERN = "COCO_val2014_{image_id:012d}.jpg"  # VQAv2 val images are COCO val2014
QUESTION_ONLY_IMAGE_SIZE = 1  # the placeholder image of a question-only run (never looked at by the LM)


@dataclass(frozen=True)
class VQAQuestion:
    """One VQAv2 question joined with its annotation."""

    question_id: QuestionId
    image_id: int
    question: str
    majority: str  # multiple_choice_answer: the most common of the annotators' answers
    annotator_answers: tuple[str, ...]  # the ten human answers, repeats kept
    answer_type: str  # "yes/no", "number" or "other"


class Answerer(Protocol):
    """What the runner needs from the library: ``answer`` as :meth:`capdemo.pipeline.Captioner.answer`."""

    identity: dict[str, Any]  # what makes two runs comparable (the bundle's manifest hash)

    def answer(self, image: Image.Image, question: str, *, top_k: int, caption: str | None) -> Any: ...


class BundleAnswerer:
    """The one place vqa-eval calls capdemo: ``Captioner.from_bundle`` and ``Captioner.answer``."""

    def __init__(self, weights: str, *, device: str | None = None):
        from capdemo.bundle import MANIFEST, sha256_of
        from capdemo.pipeline import Captioner

        self.captioner = Captioner.from_bundle(weights, device=device)
        self.identity = {"bundle_sha256": sha256_of(self.captioner.bundle.path / MANIFEST)}

    def answer(self, image: Image.Image, question: str, *, top_k: int, caption: str | None) -> Any:
        """A ``capdemo.vqa.VQAResult``: top_answers best first, the generated answer, caption and prompt."""
        return self.captioner.answer(image, question, top_k=top_k, caption=caption)


# --------------------------------------------------------------------------------------------
# Data


def load_vqav2(questions_path: str | Path, annotations_path: str | Path) -> list[VQAQuestion]:
    """VQAv2 questions joined with their annotations by question id, in question-file order."""
    annotations: dict[QuestionId, tuple[str, dict[str, Any]]] = {}
    for where, record in read_json_records(annotations_path, list_key="annotations"):
        if "question_id" not in record:
            raise DataFormatError(f"{where}: no 'question_id' (keys: {', '.join(record)})")
        annotations[record["question_id"]] = (where, record)
    joined, seen = [], set()
    for where, record in read_json_records(questions_path, list_key="questions"):
        missing = [key for key in ("question_id", "image_id", "question") if key not in record]
        if missing:
            raise DataFormatError(f"{where}: no {missing[0]!r} (keys: {', '.join(record)})")
        question_id = record["question_id"]
        if question_id in seen:
            raise DataFormatError(f"{where}: question {question_id!r} appears twice")
        seen.add(question_id)
        if question_id not in annotations:
            raise DataFormatError(f"{where}: question {question_id!r} has no annotation in {annotations_path}")
        joined.append(_joined(record, *annotations[question_id]))
    if not joined:
        raise DataFormatError(f"{questions_path}: no questions")
    return joined


def _joined(question: dict[str, Any], where: str, annotation: dict[str, Any]) -> VQAQuestion:
    raw = annotation.get("answers")
    if not isinstance(raw, list) or not all(isinstance(a, dict) and isinstance(a.get("answer"), str) for a in raw):
        raise DataFormatError(f"{where}: 'answers' must be a list of objects with an 'answer' string")
    if not isinstance(annotation.get("multiple_choice_answer"), str):
        raise DataFormatError(f"{where}: no string 'multiple_choice_answer'")
    if not isinstance(question["image_id"], int) or annotation.get("image_id", question["image_id"]) != question[
            "image_id"]:
        raise DataFormatError(f"{where}: image id {annotation.get('image_id')!r} does not match the question's "
                              f"{question['image_id']!r}")
    return VQAQuestion(question_id=question["question_id"], image_id=question["image_id"],
                       question=str(question["question"]), majority=annotation["multiple_choice_answer"],
                       annotator_answers=tuple(a["answer"] for a in raw),
                       answer_type=str(annotation.get("answer_type", "")))


def sample_questions(questions: Sequence[VQAQuestion], n: int, *, seed: int) -> list[VQAQuestion]:
    """A seeded random sample of ``n`` questions (all when there are fewer), ordered by (image, question).

    The draw is over the questions sorted by id, so it depends only on the
    question set and the seed, not on the file's order; the result is grouped
    by image so that an image is captioned once for all its questions.
    """
    by_id = sorted(questions, key=lambda q: _id_order(q.question_id))
    chosen = random.Random(seed).sample(by_id, min(n, len(by_id)))
    return sorted(chosen, key=lambda q: (q.image_id, _id_order(q.question_id)))


def _id_order(question_id: QuestionId) -> tuple[bool, QuestionId]:
    """Sort key for ids that may mix ints and strings (ints first)."""
    return isinstance(question_id, str), question_id


def image_files(questions: Sequence[VQAQuestion], root: Path, pattern: str) -> dict[int, Path]:
    """``image_id -> file`` under ``root`` (named by ``pattern``, directly or in any sub-folder)."""
    names = {q.image_id: pattern.format(image_id=q.image_id) for q in questions}
    found = {image_id: root / name for image_id, name in names.items() if (root / name).is_file()}
    if len(found) < len(names):
        wanted = {name: image_id for image_id, name in names.items() if image_id not in found}
        for path in root.rglob("*"):
            if path.name in wanted:
                found[wanted[path.name]] = path
    missing = sorted(set(names) - set(found))
    if missing:
        raise FileNotFoundError(f"{len(missing)} question images are not under {root} "
                                f"(first: {names[missing[0]]}; --image-pattern names them)")
    return found


# --------------------------------------------------------------------------------------------
# Running and scoring


def answer_questions(answerer: Answerer, questions: Sequence[VQAQuestion], out: Path, *, top_k: int,
                     question_only: bool, files: Mapping[int, Path] | None) -> int:
    """Answer every question of ``questions`` not yet in ``out``, appending JSON lines; returns how many."""
    done = done_ids(out, key="question_id")
    todo = [q for q in questions if q.question_id not in done]
    placeholder = Image.new("RGB", (QUESTION_ONLY_IMAGE_SIZE,) * 2)
    captions: dict[int, str] = {}  # image id -> its caption, made by the first of its questions
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("a") as sink:
        for count, question in enumerate(todo, start=1):
            if question_only:
                image, caption = placeholder, ""
            else:
                image, caption = load_image(files[question.image_id]), captions.get(question.image_id)
            result = answerer.answer(image, question.question, top_k=top_k, caption=caption)
            captions.setdefault(question.image_id, result.caption)
            sink.write(json.dumps({
                "question_id": question.question_id, "image_id": question.image_id, "question": question.question,
                "answer_type": question.answer_type, "answers_ranked": [text for text, _ in result.top_answers],
                "scores": [round(float(score), 6) for _, score in result.top_answers],
                "generated": result.generated, "caption": result.caption, "prompt": result.prompt}) + "\n")
            sink.flush()
            if count % 64 == 0 or count == len(todo):
                os.fsync(sink.fileno())
                print(f"answered {len(done) + count}/{len(questions)}", file=sys.stderr)
    return len(todo)


def ground_truth(question: VQAQuestion, kind: str) -> list[str]:
    """The answers a ranked list may hit: the majority answer, or any of the annotators' (``kind``)."""
    if kind not in GROUND_TRUTHS:
        raise ValueError(f"ground truth must be one of {', '.join(GROUND_TRUTHS)}, got {kind!r}")
    return [question.majority] if kind == "majority" else list(question.annotator_answers)


def score(questions: Sequence[VQAQuestion], out: Path, *, ground_truth_kind: str = "majority",
          ks: Sequence[int] = VQA_TOP_KS) -> dict[str, Any]:
    """Top-k accuracy of the answers in ``out`` over ``questions``, overall and per VQAv2 answer type."""
    ranked: dict[QuestionId, list[str]] = {}
    for _, record in read_json_records(out):
        ranked[record["question_id"]] = record["answers_ranked"]
    missing = [q.question_id for q in questions if q.question_id not in ranked]
    if missing:
        raise EvaluationError(f"{len(missing)} sampled questions have no answer in {out} (first: {missing[0]!r})")
    truth = {q.question_id: ground_truth(q, ground_truth_kind) for q in questions}

    def accuracy(group: Sequence[VQAQuestion]) -> dict[str, float]:
        return vqa_topk_accuracy({q.question_id: ranked[q.question_id] for q in group}, truth, ks)

    by_type: dict[str, list[VQAQuestion]] = {}
    for question in questions:
        by_type.setdefault(question.answer_type, []).append(question)
    return {"questions": len(questions), "ground_truth": ground_truth_kind, "metrics": accuracy(questions),
            "by_answer_type": {kind: {"questions": len(group), **accuracy(group)}
                               for kind, group in sorted(by_type.items())}}


def to_table(report: dict[str, Any]) -> str:
    """The report as the paper prints it: accuracies in %."""
    ks = list(report["metrics"])
    rows = [f"{'':<10}  {'n':>6}  " + "  ".join(f"{k:>6}" for k in ks),
            f"{'all':<10}  {report['questions']:>6}  " + "  ".join(f"{100 * report['metrics'][k]:6.2f}" for k in ks)]
    for kind, values in report["by_answer_type"].items():
        rows.append(f"{kind or '?':<10}  {values['questions']:>6}  " + "  ".join(f"{100 * values[k]:6.2f}" for k in ks))
    return "\n".join(rows)


def file_sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


# --------------------------------------------------------------------------------------------
# CLI


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m training vqa-eval", description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--weights", required=True, help="bundle folder (or hf-hub:org/name@revision) with MacCap "
                        "and a VQA answer list")
    parser.add_argument("--questions", required=True, type=Path, help="v2_OpenEnded_mscoco_val2014_questions.json")
    parser.add_argument("--annotations", required=True, type=Path, help="v2_mscoco_val2014_annotations.json")
    parser.add_argument("--images", type=Path, default=None, help="folder of the COCO val2014 images "
                        "(not needed with --question-only)")
    parser.add_argument("--image-pattern", default=DEFAULT_IMAGE_PATTERN, help="image file name of an {image_id}")
    parser.add_argument("--out", required=True, type=Path, help="JSON lines of ranked answers (appended; resumable)")
    parser.add_argument("--n", type=positive_int, default=DEFAULT_SAMPLE, help="questions in the seeded sample")
    parser.add_argument("--seed", type=int, default=0, help="seed of the question sample")
    parser.add_argument("--limit", type=positive_int, default=None,
                        help="answer and score only the first N sampled questions (a quick check; None: all)")
    parser.add_argument("--question-only", action="store_true",
                        help="the paper's baseline: the LM answers 'Question: {q} Answer:' without a caption")
    parser.add_argument("--ground-truth", choices=GROUND_TRUTHS, default="majority",
                        help="a hit is the multiple_choice_answer (majority) or any annotator answer (any) "
                        "among the top k")
    parser.add_argument("--ks", nargs="+", type=positive_int, default=list(VQA_TOP_KS), help="top-k cut-offs")
    parser.add_argument("--device", default=None, help="torch device (None: cuda when available)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the evaluation from the command line; returns the process exit status."""
    args = build_parser().parse_args(argv)
    if args.images is None and not args.question_only:
        print("error: --images is required unless --question-only", file=sys.stderr)
        return 2
    try:
        questions = sample_questions(load_vqav2(args.questions, args.annotations), args.n, seed=args.seed)
        chosen = questions[: args.limit] if args.limit else questions
        files = None if args.question_only else image_files(chosen, args.images, args.image_pattern)
        answerer = BundleAnswerer(args.weights, device=args.device)
        top_k = max(args.ks)
        check_run_record(args.out, {**answerer.identity, "questions_sha256": file_sha256(args.questions),
                                    "n": args.n, "seed": args.seed, "question_only": args.question_only,
                                    "top_k": top_k})
        answer_questions(answerer, chosen, args.out, top_k=top_k, question_only=args.question_only, files=files)
        report = score(chosen, args.out, ground_truth_kind=args.ground_truth, ks=args.ks)
    except (DataFormatError, EvaluationError, FileNotFoundError, ImageLoadError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    report = {"sample": len(questions), "seed": args.seed, "question_only": args.question_only, **report}
    print(json.dumps(report) if args.json else to_table(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
