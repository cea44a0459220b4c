"""`python -m training vqa-eval`: the VQAv2 protocol on a hand-checkable stub and end to end on shapes scenes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from capdemo.vqa import VQAResult
from training import vqa_eval
from training.datasets import DataFormatError
from training.evaluate import load_vqa_predictions, vqa_topk_accuracy
from training.shapes import world
from training.shapes.questions import questions as scene_questions

SHAPES_BUNDLE = Path(__file__).resolve().parents[1] / "weights" / "shapes"
FILLER = [f"filler{i}" for i in range(20)]


def write_vqav2(root: Path, rows: list[dict]) -> tuple[Path, Path]:
    """VQAv2's two files from rows {question_id, image_id, question, mca, answers, answer_type}."""
    questions = [{"image_id": r["image_id"], "question": r["question"], "question_id": r["question_id"]} for r in rows]
    annotations = [{"question_id": r["question_id"], "image_id": r["image_id"], "answer_type": r["answer_type"],
                    "question_type": "what", "multiple_choice_answer": r["mca"],
                    "answers": [{"answer": a, "answer_confidence": "yes", "answer_id": i + 1}
                                for i, a in enumerate(r["answers"])]} for r in rows]
    (root / "questions.json").write_text(json.dumps({"questions": questions, "data_subtype": "val2014"}))
    (root / "annotations.json").write_text(json.dumps({"annotations": annotations, "data_subtype": "val2014"}))
    return root / "questions.json", root / "annotations.json"


# Four questions with known rankings. Majority answer at rank 1, 3, 8 and nowhere; question 4's annotators also
# said "cat", ranked first. By hand: majority top1 1/4, top5 2/4, top10 3/4; any annotator 2/4, 3/4, 4/4.
STUB_ROWS = [
    {"question_id": 1, "image_id": 10, "question": "how many dogs?", "mca": "2", "answers": ["2"] * 10,
     "answer_type": "number", "ranked": ["two", "3", *FILLER[:8]]},  # "two" normalises to "2"
    {"question_id": 2, "image_id": 10, "question": "what color is it?", "mca": "red", "answers": ["red"] * 9 + ["blue"],
     "answer_type": "other", "ranked": ["green", "blue", "Red", *FILLER[:7]]},
    {"question_id": 3, "image_id": 20, "question": "is it raining?", "mca": "yes", "answers": ["yes"] * 10,
     "answer_type": "yes/no", "ranked": [*FILLER[:7], "yes", "no", "maybe"]},
    {"question_id": 4, "image_id": 20, "question": "what animal?", "mca": "dog", "answers": ["dog"] * 6 + ["cat"] * 4,
     "answer_type": "other", "ranked": ["cat", *FILLER[:9]]},
]


class StubAnswerer:
    """Known rankings per question; records the caption each call was given."""

    def __init__(self):
        self.identity = {"stub": 1}
        self.calls: list[tuple[str, str | None]] = []

    def answer(self, image, question, *, top_k, caption):
        self.calls.append((question, caption))
        ranked = next(r["ranked"] for r in STUB_ROWS if r["question"] == question)[:top_k]
        made = f"caption of a {image.size[0]} px image" if caption is None else caption
        return VQAResult(answer=ranked[0], generated=ranked[0], caption=made, prompt=f"{made} Question: {question}",
                         top_answers=[(text, 1.0 - i / 10) for i, text in enumerate(ranked)])


@pytest.fixture
def stub_set(tmp_path):
    files = {}
    for image_id, size in ((10, 8), (20, 9)):
        files[image_id] = tmp_path / f"COCO_val2014_{image_id:012d}.jpg"
        Image.new("RGB", (size, size)).save(files[image_id])
    questions = vqa_eval.load_vqav2(*write_vqav2(tmp_path, STUB_ROWS))
    return questions, files


def test_topk_accuracy_of_known_rankings_by_hand(stub_set, tmp_path):
    questions, files = stub_set
    out = tmp_path / "answers.jsonl"
    stub = StubAnswerer()
    assert vqa_eval.answer_questions(stub, questions, out, top_k=10, question_only=False, files=files) == 4
    majority = vqa_eval.score(questions, out)
    assert majority["metrics"] == {"top1": 1 / 4, "top5": 2 / 4, "top10": 3 / 4}
    assert majority["by_answer_type"] == {"number": {"questions": 1, "top1": 1.0, "top5": 1.0, "top10": 1.0},
                                          "other": {"questions": 2, "top1": 0.0, "top5": 0.5, "top10": 0.5},
                                          "yes/no": {"questions": 1, "top1": 0.0, "top5": 0.0, "top10": 1.0}}
    anyone = vqa_eval.score(questions, out, ground_truth_kind="any")
    assert anyone["metrics"] == {"top1": 2 / 4, "top5": 3 / 4, "top10": 1.0}
    assert vqa_eval.score(questions, out, ks=(3,))["metrics"] == {"top3": 2 / 4}
    # each image is captioned once: its first question gets no caption, the next reuses what the first made
    assert [caption for _, caption in stub.calls] == [None, "caption of a 8 px image", None, "caption of a 9 px image"]
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert lines[1]["answers_ranked"] == STUB_ROWS[1]["ranked"] and lines[1]["answer_type"] == "other"
    assert load_vqa_predictions(out)[4] == STUB_ROWS[3]["ranked"]  # what `evaluate --vqa` reads


def test_question_only_runs_read_no_image_and_pass_an_empty_caption(stub_set, tmp_path):
    questions, _ = stub_set
    stub = StubAnswerer()
    vqa_eval.answer_questions(stub, questions, tmp_path / "q.jsonl", top_k=5, question_only=True, files=None)
    assert [caption for _, caption in stub.calls] == ["", "", "", ""]


def test_the_sample_is_seeded_sized_and_independent_of_file_order(tmp_path):
    rows = [{"question_id": i, "image_id": i // 3, "question": f"q{i}", "mca": "yes", "answers": ["yes"],
             "answer_type": "yes/no"} for i in range(30)]
    questions = vqa_eval.load_vqav2(*write_vqav2(tmp_path, rows))
    reordered = vqa_eval.load_vqav2(*write_vqav2(tmp_path, rows[::-1]))
    first = vqa_eval.sample_questions(questions, 12, seed=3)
    assert len(first) == 12 and len({q.question_id for q in first}) == 12
    assert first == vqa_eval.sample_questions(reordered, 12, seed=3)
    assert first != vqa_eval.sample_questions(questions, 12, seed=4)
    assert [(q.image_id, q.question_id) for q in first] == sorted((q.image_id, q.question_id) for q in first)
    assert len(vqa_eval.sample_questions(questions, 100, seed=0)) == 30


def test_malformed_vqav2_files_are_one_line_errors(tmp_path):
    row = {"question_id": 1, "image_id": 10, "question": "q", "mca": "yes", "answers": ["yes"], "answer_type": "x"}
    questions, annotations = write_vqav2(tmp_path, [row])
    data = json.loads(questions.read_text())
    data["questions"].append({"image_id": 10, "question": "q2", "question_id": 2})
    questions.write_text(json.dumps(data))
    with pytest.raises(DataFormatError, match="question 2 has no annotation"):
        vqa_eval.load_vqav2(questions, annotations)
    data["questions"][1]["question_id"] = 1
    questions.write_text(json.dumps(data))
    with pytest.raises(DataFormatError, match="question 1 appears twice"):
        vqa_eval.load_vqav2(questions, annotations)


# --------------------------------------------------------------------------------------------
# End to end on the shipped shapes bundle


@pytest.fixture(scope="module")
def shapes_vqa(tmp_path_factory):
    """Three rendered shapes scenes and questions whose answers the scene states, as VQAv2 files."""
    root = tmp_path_factory.mktemp("vqa")
    images = root / "val2014"
    images.mkdir()
    rows = []
    config = world.WorldConfig.from_dict(json.loads((SHAPES_BUNDLE / "bundle.json").read_text())
                                         ["training"]["recipe"]["world"])  # the world the bundle learned
    rng = np.random.default_rng(0)
    for image_id, (scene, image, _) in enumerate(world.generate_pairs(3, seed=99, config=config), start=500):
        image.save(images / f"COCO_val2014_{image_id:012d}.jpg")
        asked = scene_questions(scene, rng, colours=config.colours, shapes=config.shapes)
        for number, (question, answer) in enumerate((q.text, q.answer) for q in asked[:3]):
            kind = "yes/no" if answer in ("yes", "no") else "number" if answer.isdigit() else "other"
            rows.append({"question_id": image_id * 10 + number, "image_id": image_id, "question": question,
                         "mca": answer, "answers": [answer] * 10, "answer_type": kind})
    questions, annotations = write_vqav2(root, rows)
    return {"root": root, "images": images, "questions": questions, "annotations": annotations, "rows": rows}


def _argv(data, out, *extra):
    return ["--weights", str(SHAPES_BUNDLE), "--questions", str(data["questions"]), "--annotations",
            str(data["annotations"]), "--images", str(data["root"]), "--out", str(out), "--n", "7", "--seed", "1",
            "--device", "cpu", "--json", *extra]


def test_end_to_end_on_the_shapes_bundle_resumes_and_scores_like_evaluate(shapes_vqa, tmp_path, capsys):
    out = tmp_path / "vqa.jsonl"
    assert vqa_eval.main(_argv(shapes_vqa, out, "--limit", "5")) == 0
    report = json.loads(capsys.readouterr().out)
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert report["sample"] == 7 and report["questions"] == 5 and len(lines) == 5
    assert all(len(line["answers_ranked"]) == 10 for line in lines)
    assert all(line["prompt"] == f"{line['caption']} Question: {line['question']} Answer:" for line in lines)
    truth = {r["question_id"]: [r["mca"]] for r in shapes_vqa["rows"]}
    assert report["metrics"] == vqa_topk_accuracy(load_vqa_predictions(out), truth)  # scored independently
    assert sum(group["questions"] for group in report["by_answer_type"].values()) == 5

    complete = out.read_text()
    out.write_text("".join(complete.splitlines(keepends=True)[:3]) + complete.splitlines()[3][:15])  # killed
    assert vqa_eval.main(_argv(shapes_vqa, out, "--limit", "5")) == 0
    assert json.loads(capsys.readouterr().out) == report
    assert out.read_text() == complete  # the cut line answered again, the same way

    assert vqa_eval.main(_argv(shapes_vqa, out, "--seed", "2")) == 2  # another sample into the same file
    assert "(seed differ)" in capsys.readouterr().err
    assert out.read_text() == complete


def test_question_only_baseline_on_the_shapes_bundle(shapes_vqa, tmp_path, capsys):
    out = tmp_path / "baseline.jsonl"
    argv = _argv(shapes_vqa, out, "--question-only", "--limit", "3")
    argv[argv.index("--images"): argv.index("--images") + 2] = []  # no images needed
    assert vqa_eval.main(argv) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["question_only"] and report["questions"] == 3
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert all(line["caption"] == "" and line["prompt"] == f"Question: {line['question']} Answer:" for line in lines)


def test_missing_images_are_a_one_line_error(shapes_vqa, tmp_path, capsys):
    argv = _argv(shapes_vqa, tmp_path / "x.jsonl")
    argv[argv.index("--images") + 1] = str(tmp_path)
    assert vqa_eval.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "question images are not under" in err and "\n" not in err
