"""Evaluation: the official COCO caption metrics and MacCap's zero-shot VQA top-k accuracy.

Caption metrics run through pycocoevalcap 1.2 the way the official COCO demo
(``cocoEvalCapDemo``) does: references and predictions are PTB-tokenised by
Stanford CoreNLP, then BLEU-1..4, METEOR, ROUGE-L and CIDEr score exactly the
images that have a prediction. On the demo's own inputs this reproduces its
published numbers to four decimals (see tests/test_evaluate.py). The tokenizer
and METEOR are Java programs, so a Java runtime must be on PATH. SPICE needs
the Stanford CoreNLP 3.6.0 jars, which pycocoevalcap downloads on first use;
offline, and without them, SPICE is skipped with a one-line note instead.

VQA is scored as in the MacCap paper (Table 4): the model ranks a fixed answer
list, and a question counts as a top-k hit when any of its accepted human
answers is among the first k ranked, both sides normalised by
``normalise_answer``. This is not the official VQA soft accuracy.

CLI (``python -m training evaluate``, see ``main``) reads predictions as COCO
results JSON or capdemo JSON lines and references in COCO or Karpathy format.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import json
import re
import shutil
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.meteor.meteor import Meteor
from pycocoevalcap.rouge.rouge import Rouge
from pycocoevalcap.spice import get_stanford_models as spice_corenlp
from pycocoevalcap.spice.spice import Spice
from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

from capdemo.inputs import positive_int
from training.datasets import (
    DataFormatError,
    ImageId,
    image_id_from_name,
    load_references,
    normalise_image_id,
    read_json_records,
)

QuestionId = int | str

METRIC_KEYS: dict[str, tuple[str, ...]] = {
    "Bleu": ("Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4"),
    "METEOR": ("METEOR",),
    "ROUGE_L": ("ROUGE_L",),
    "CIDEr": ("CIDEr",),
    "SPICE": ("SPICE",),
}
"""Each pycocoevalcap scorer and the result keys it fills (the official COCO names)."""

CAPTION_METRICS = ("Bleu", "METEOR", "ROUGE_L", "CIDEr")
"""Scorers run by default; SPICE is separate because it may be unavailable (see ``score_captions``)."""

_SCORER_TYPES: dict[str, Callable[[], Any]] = {
    "Bleu": lambda: Bleu(4),  # BLEU-1..4
    "METEOR": Meteor,
    "ROUGE_L": Rouge,
    "CIDEr": Cider,  # pycocoevalcap's Cider is CIDEr-D (clipped counts, length penalty, x10)
    "SPICE": Spice,
}

VQA_TOP_KS = (1, 5, 10)  # the cut-offs MacCap reports for VQAv2
_IDS_SHOWN = 5  # how many offending ids an error message lists


class EvaluationError(ValueError):
    """Predictions and references that cannot be scored together."""


class MetricUnavailableError(RuntimeError):
    """A metric whose external dependency (Java, the SPICE jars) is missing."""


@dataclass(frozen=True)
class EvaluationReport:
    """Scores of one evaluation run, with what was scored and anything worth flagging."""

    task: str  # "captions" or "vqa"
    num_scored: int  # images (captions) or questions (vqa) that had a prediction and were scored
    metrics: dict[str, float]  # metric key -> score, e.g. "CIDEr" -> 0.5998 or "top1" -> 0.41
    notes: tuple[str, ...] = field(default=())  # one-line remarks: skipped metrics, unpredicted references

    def to_json(self) -> dict[str, Any]:
        return {"task": self.task, "num_scored": self.num_scored, "metrics": self.metrics, "notes": list(self.notes)}

    def to_table(self) -> str:
        unit = "images" if self.task == "captions" else "questions"
        width = max(len(key) for key in self.metrics)
        rows = [f"{key:<{width}}  {value:.4f}" for key, value in self.metrics.items()]
        return "\n".join([f"{self.task}: {self.num_scored} {unit} scored", *rows])


# --------------------------------------------------------------------------------------------
# Caption metrics


def score_captions(
    predictions: Mapping[ImageId, str],
    references: Mapping[ImageId, Sequence[str]],
    *,
    spice: bool | None = None,
    metrics: Sequence[str] = CAPTION_METRICS,
) -> dict[str, float]:
    """COCO caption metrics of ``predictions`` against ``references``, keyed by official name.

    Scores exactly the predicted image ids, like the official code. ``spice``:
    ``None`` runs SPICE when its jars are installed and otherwise skips it,
    ``True`` requires it (``MetricUnavailableError`` when missing), ``False``
    never runs it. ``metrics`` picks scorers from ``CAPTION_METRICS`` (METEOR
    alone costs ~10 s of JVM start). Notes (skipped SPICE, references without a
    prediction) go to stderr, one line each.
    """
    report = evaluate_captions(predictions, references, spice=spice, metrics=metrics)
    for note in report.notes:
        print(note, file=sys.stderr)
    return report.metrics


def evaluate_captions(
    predictions: Mapping[ImageId, str],
    references: Mapping[ImageId, Sequence[str]],
    *,
    spice: bool | None = None,
    metrics: Sequence[str] = CAPTION_METRICS,
) -> EvaluationReport:
    """``score_captions`` returning an ``EvaluationReport`` and printing nothing."""
    unknown = sorted(set(metrics) - set(CAPTION_METRICS))
    if unknown or not metrics:
        raise ValueError(f"metrics must be a non-empty subset of {CAPTION_METRICS}, got {tuple(metrics)}")
    coverage_note = _check_coverage(predictions, references, what="image")
    _check_caption_types(predictions, references)
    notes = [coverage_note] if coverage_note else []
    scorers = list(dict.fromkeys(metrics))
    missing_dir = missing_spice_jars_dir() if spice is not False else None
    if spice is not False and missing_dir is None:
        scorers.append("SPICE")
    elif missing_dir is not None:
        reason = f"Stanford CoreNLP 3.6.0 jars not found at {missing_dir}; see README"
        if spice:
            raise MetricUnavailableError(f"SPICE unavailable: {reason}")
        notes.append(f"SPICE skipped: {reason}")
    if shutil.which("java") is None:
        raise MetricUnavailableError(
            "Java not found on PATH: pycocoevalcap's PTB tokenizer and METEOR need a Java runtime "
            "(e.g. apt-get install default-jre-headless)"
        )
    tokenized_refs = _ptb_tokenize({i: list(references[i]) for i in predictions})
    tokenized_preds = _ptb_tokenize({i: [caption] for i, caption in predictions.items()})
    scores: dict[str, float] = {}
    for name in scorers:
        scores.update(_run_scorer(name, tokenized_refs, tokenized_preds))
    return EvaluationReport(task="captions", num_scored=len(predictions), metrics=scores, notes=tuple(notes))


def missing_spice_jars_dir() -> Path | None:
    """The folder where pycocoevalcap's SPICE expects the CoreNLP jars, if any of them is missing there.

    ``Spice()`` downloads the jars when ``stanford-corenlp-3.6.0.jar`` is
    absent, which fails (or hangs) offline, so it is only built when this
    returns ``None``. The models jar is checked as well: SPICE needs both.
    """
    lib_dir = Path(spice_corenlp.SPICEDIR) / spice_corenlp.SPICELIB
    jars = (lib_dir / f"{spice_corenlp.JAR}.jar", lib_dir / f"{spice_corenlp.JAR}-models.jar")
    return None if all(jar.is_file() for jar in jars) else lib_dir


def _check_coverage(predicted: Iterable[Any], references: Mapping[Any, Any], *, what: str) -> str | None:
    """Refuse predictions without references; return a note when references lack predictions."""
    predicted = list(predicted)
    if not predicted:
        raise EvaluationError(f"no predictions to score (0 {what}s)")
    orphans = [key for key in predicted if key not in references]
    if orphans:
        shown = ", ".join(repr(key) for key in orphans[:_IDS_SHOWN])
        raise EvaluationError(f"{len(orphans)} predicted {what}(s) have no references, e.g. {shown}")
    unpredicted = len(references) - len(predicted)
    if unpredicted:
        return (
            f"warning: {unpredicted} of {len(references)} reference {what}s have no prediction; "
            f"scoring the {len(predicted)} predicted {what}s only"
        )
    return None


def only_referenced(predictions: Mapping[Any, Any], references: Mapping[Any, Any], *, what: str
                    ) -> tuple[dict[Any, Any], str | None]:
    """The predictions that have references, and a note saying how many were left out (``None``: none were).

    For scoring a prediction file against references of a subset (e.g. the
    captions of a whole split scored against the test references only).
    """
    kept = {key: value for key, value in predictions.items() if key in references}
    left_out = len(predictions) - len(kept)
    if not left_out:
        return kept, None
    return kept, f"left out {left_out} of {len(predictions)} predicted {what}s that have no references"


def _check_caption_types(predictions: Mapping[ImageId, Any], references: Mapping[ImageId, Any]) -> None:
    for image_id, caption in predictions.items():
        if not isinstance(caption, str):
            raise EvaluationError(f"prediction for image {image_id!r} is {type(caption).__name__}, not a string")
        refs = references[image_id]
        if isinstance(refs, str) or not refs or not all(isinstance(r, str) for r in refs):
            raise EvaluationError(f"image {image_id!r} needs a non-empty list of reference strings")


def _ptb_tokenize(captions: dict[ImageId, list[str]]) -> dict[ImageId, list[str]]:
    """Lower-cased PTB tokens without punctuation, as the official code feeds every scorer.

    Line breaks inside a caption are turned into spaces first: the tokenizer
    works line by line, so a stray ``\\r`` would shift every later caption.
    """
    flat = {i: [{"caption": " ".join(c.splitlines())} for c in caps] for i, caps in captions.items()}
    tokenized = PTBTokenizer().tokenize(flat)
    if any(len(tokenized.get(i, ())) != len(caps) for i, caps in captions.items()):
        raise EvaluationError("the PTB tokenizer returned a different number of captions than it was given")
    return tokenized


def _run_scorer(
    name: str, references: dict[ImageId, list[str]], predictions: dict[ImageId, list[str]]
) -> dict[str, float]:
    """One pycocoevalcap scorer on tokenised captions: ``{result key: corpus score}``."""
    scorer = _SCORER_TYPES[name]()  # METEOR and SPICE start a JVM here; Meteor's is killed when it is collected
    with contextlib.redirect_stdout(io.StringIO()):  # Bleu prints its n-gram statistics
        score, _per_image = scorer.compute_score(references, predictions)
    values = score if isinstance(score, list) else [score]
    return {key: float(value) for key, value in zip(METRIC_KEYS[name], values, strict=True)}


def load_predictions(path: str | Path) -> dict[ImageId, str]:
    """``{image_id: caption}`` from COCO results JSON or capdemo JSON lines.

    Each record needs a ``caption`` and either an ``image_id`` or an
    ``image`` (path or file name, mapped by ``image_id_from_name``, so
    ``.../COCO_val2014_000000391895.jpg`` is image 391895).
    """
    predictions: dict[ImageId, str] = {}
    for where, record in read_json_records(path):
        if "image_id" in record:
            image_id = normalise_image_id(record["image_id"], where=where)
        elif isinstance(record.get("image"), str):
            image_id = image_id_from_name(record["image"])
        else:
            raise DataFormatError(f"{where}: no 'image_id' or 'image' key (keys: {', '.join(record)})")
        if not isinstance(record.get("caption"), str):
            raise DataFormatError(f"{where}: no string 'caption' (keys: {', '.join(record)})")
        if image_id in predictions:
            raise DataFormatError(f"{where}: a second prediction for image {image_id!r}")
        predictions[image_id] = record["caption"]
    return predictions


# --------------------------------------------------------------------------------------------
# VQA top-k accuracy

# VQA's manualMap: number words up to ten become digits, and "none" becomes "0"
_NUMBER_WORDS = {word: str(n) for n, word in enumerate("zero one two three four five six seven eight nine ten".split())}
_NUMBER_WORDS["none"] = "0"
_ARTICLES = frozenset({"a", "an", "the"})
_DIGIT_COMMA = re.compile(r"(?<=\d),(?=\d)")  # 1,000 -> 1000
_PUNCTUATION = re.compile(r"[^\w\s.]|_|(?<!\d)\.|\.(?!\d)")  # every punctuation mark but a decimal point


def normalise_answer(text: str) -> str:
    """A simplified VQA answer normalisation, applied to both sides before matching.

    Lower-case; drop apostrophes (``man's`` -> ``mans``) and the commas of
    ``1,000``; every other punctuation mark becomes a space, except a decimal
    point; number words up to ten become digits; the articles a/an/the go;
    whitespace collapses. Unlike the official VQA code there is no contraction
    table, which is harmless here because both sides are normalised alike.
    """
    text = _DIGIT_COMMA.sub("", text.lower().replace("'", ""))
    words = _PUNCTUATION.sub(" ", text).split()
    return " ".join(_NUMBER_WORDS.get(word, word) for word in words if word not in _ARTICLES)


def vqa_topk_accuracy(
    ranked: Mapping[QuestionId, Sequence[str]],
    answers: Mapping[QuestionId, Sequence[str]],
    ks: Sequence[int] = VQA_TOP_KS,
) -> dict[str, float]:
    """Fraction of questions with an accepted answer among the first k ranked, as ``{"top<k>": acc}``.

    ``ranked`` holds each question's answers best first; ``answers`` the
    accepted answers (VQAv2: the ten human answers, repeats allowed). Every
    ranked question must have answers; answered questions without a ranking
    are not scored.
    """
    if not ks or any(k < 1 for k in ks):
        raise ValueError(f"ks must be positive cut-offs, got {tuple(ks)}")
    _check_coverage(ranked, answers, what="question")
    hits = dict.fromkeys(ks, 0)
    for question_id, ranking in ranked.items():
        accepted = {normalise_answer(answer) for answer in answers[question_id]} - {""}
        if not accepted:
            raise EvaluationError(f"question {question_id!r} has no non-empty accepted answer")
        first_hit = next((rank for rank, a in enumerate(ranking) if normalise_answer(a) in accepted), None)
        for k in ks:
            hits[k] += first_hit is not None and first_hit < k
    return {f"top{k}": hits[k] / len(ranked) for k in ks}


def evaluate_vqa(
    ranked: Mapping[QuestionId, Sequence[str]],
    answers: Mapping[QuestionId, Sequence[str]],
    *,
    ks: Sequence[int] = VQA_TOP_KS,
) -> EvaluationReport:
    """``vqa_topk_accuracy`` as an ``EvaluationReport``, noting answered questions left unranked."""
    note = _check_coverage(ranked, answers, what="question")
    metrics = vqa_topk_accuracy(ranked, answers, ks)
    return EvaluationReport(task="vqa", num_scored=len(ranked), metrics=metrics, notes=(note,) if note else ())


def _question_id(value: Any, *, where: str) -> QuestionId:
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip():
        return int(value) if value.strip().isdigit() else value.strip()
    raise DataFormatError(f"{where}: question id must be an int or a non-empty string")


def _record_question_id(record: dict[str, Any], *, where: str) -> QuestionId:
    key = next((k for k in ("question_id", "id") if k in record), None)
    if key is None:
        raise DataFormatError(f"{where}: no 'question_id' or 'id' key (keys: {', '.join(record)})")
    return _question_id(record[key], where=where)


def load_vqa_predictions(path: str | Path) -> dict[QuestionId, list[str]]:
    """``{question_id: answers best first}`` from capdemo VQA JSON lines or a simple JSON list.

    A record carries ``question_id`` (or ``id``) and either ``answers_ranked``
    (strings) or capdemo's ``top_answers`` (``{"text", "score"}`` objects,
    kept in file order, which capdemo writes best first).
    """
    ranked: dict[QuestionId, list[str]] = {}
    for where, record in read_json_records(path):
        question_id = _record_question_id(record, where=where)
        if isinstance(record.get("answers_ranked"), list):
            ranking = record["answers_ranked"]
        elif isinstance(record.get("top_answers"), list):
            ranking = [a.get("text") if isinstance(a, dict) else a for a in record["top_answers"]]
        else:
            raise DataFormatError(f"{where}: no 'answers_ranked' or 'top_answers' list (keys: {', '.join(record)})")
        if not all(isinstance(answer, str) for answer in ranking):
            raise DataFormatError(f"{where}: ranked answers must be strings (or objects with a 'text' string)")
        if question_id in ranked:
            raise DataFormatError(f"{where}: a second prediction for question {question_id!r}")
        ranked[question_id] = ranking
    return ranked


def load_vqa_answers(path: str | Path) -> dict[QuestionId, list[str]]:
    """``{question_id: accepted answers}`` from ``[{question_id, answers}]`` records.

    ``answers`` may be strings or VQAv2 answer objects (``{"answer": ...}``);
    a VQAv2 annotation file (``{"annotations": [...]}``) works as is.
    """
    accepted: dict[QuestionId, list[str]] = {}
    for where, record in read_json_records(path, list_key="annotations"):
        question_id = _record_question_id(record, where=where)
        raw = record.get("answers")
        if not isinstance(raw, list):
            raise DataFormatError(f"{where}: no 'answers' list (keys: {', '.join(record)})")
        answers = [a.get("answer") if isinstance(a, dict) else a for a in raw]
        if not all(isinstance(answer, str) for answer in answers):
            raise DataFormatError(f"{where}: answers must be strings or objects with an 'answer' string")
        if question_id in accepted:
            raise DataFormatError(f"{where}: question {question_id!r} appears twice")
        accepted[question_id] = answers
    return accepted


# --------------------------------------------------------------------------------------------
# CLI


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m training evaluate",
        description="Score captions with the COCO metrics (pycocoevalcap) or VQA answers with top-k accuracy.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--predictions",
        required=True,
        type=Path,
        help="captions: COCO results JSON [{image_id, caption}] or capdemo JSON lines {image, caption}; "
        "--vqa: capdemo VQA JSON lines {question_id, top_answers} or [{question_id, answers_ranked}]",
    )
    parser.add_argument(
        "--references",
        required=True,
        type=Path,
        help="captions: COCO annotation JSON or Karpathy split [{image_name, captions}] (.gz allowed); "
        "--vqa: [{question_id, answers}] or a VQAv2 annotation file",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    parser.add_argument(
        "--spice",
        action="store_true",
        help="also compute SPICE when the Stanford CoreNLP 3.6.0 jars are installed (skipped with a note if not)",
    )
    parser.add_argument(
        "--metrics",
        nargs="+",
        choices=CAPTION_METRICS,
        default=list(CAPTION_METRICS),
        metavar="SCORER",
        help=f"caption scorers to run, from {' '.join(CAPTION_METRICS)}; "
        "leaving out METEOR saves ~10 s of JVM start",
    )
    parser.add_argument(
        "--only-referenced",
        action="store_true",
        help="score only the predictions that have references and say how many were left out "
        "(without it, a prediction without references is an error)",
    )
    parser.add_argument("--vqa", action="store_true", help="score VQA answer rankings instead of captions")
    parser.add_argument(
        "--ks",
        nargs="+",
        type=positive_int,
        default=list(VQA_TOP_KS),
        help="--vqa: top-k cut-offs",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one evaluation from the command line; returns the process exit status."""
    args = build_parser().parse_args(argv)
    try:
        if args.vqa:
            predictions, references = load_vqa_predictions(args.predictions), load_vqa_answers(args.references)
        else:
            predictions, references = load_predictions(args.predictions), load_references(args.references)
        left_out_note = None
        if args.only_referenced:
            predictions, left_out_note = only_referenced(predictions, references,
                                                         what="question" if args.vqa else "image")
        if args.vqa:
            report = evaluate_vqa(predictions, references, ks=args.ks)
        else:
            report = evaluate_captions(predictions, references, spice=None if args.spice else False,
                                       metrics=args.metrics)
        if left_out_note:
            report = dataclasses.replace(report, notes=(left_out_note, *report.notes))
    except (DataFormatError, EvaluationError, MetricUnavailableError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    for note in report.notes:
        print(note, file=sys.stderr)
    print(json.dumps(report.to_json()) if args.json else report.to_table())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
