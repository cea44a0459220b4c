"""Caption/VQA evaluation and the dataset readers, checked against the official COCO demo and hand-computed cases.

Java runs (PTB tokenizer, METEOR) are kept to a minimum: METEOR runs once, on
the full official demo through the CLI; the other caption scores use BLEU and
CIDEr only, which costs a sub-second tokenizer call each.
"""

from __future__ import annotations

import gzip
import json
import math
import os
from pathlib import Path

import pytest

from training import evaluate
from training.datasets import (
    DataFormatError,
    SplitImage,
    captions_from_split,
    image_id_from_name,
    load_caption_corpus,
    load_coco_references,
    load_karpathy_split,
    load_references,
    references_from_split,
)
from training.evaluate import (
    EvaluationError,
    MetricUnavailableError,
    evaluate_captions,
    load_predictions,
    load_vqa_answers,
    load_vqa_predictions,
    main,
    normalise_answer,
    score_captions,
    vqa_topk_accuracy,
)

REPO = Path(__file__).resolve().parents[1]
DATA_DIR_CANDIDATES = (os.environ.get("CAPDEMO_DATA_DIR"), REPO / "tests" / "data", REPO.parent / "shared" / "data")

# Published by the official COCO demo (cocoEvalCapDemo.ipynb) for its fake captions, PTB + pycocoevalcap.
OFFICIAL_DEMO_SCORES = {
    "Bleu_1": 0.5794,
    "Bleu_2": 0.4044,
    "Bleu_3": 0.2785,
    "Bleu_4": 0.1908,
    "METEOR": 0.1953,
    "ROUGE_L": 0.3963,
    "CIDEr": 0.5998,
}
ALL_CAPTION_KEYS = [key for name in evaluate.CAPTION_METRICS for key in evaluate.METRIC_KEYS[name]]


@pytest.fixture(scope="module")
def data_dir() -> Path:
    """The evaluation data: $CAPDEMO_DATA_DIR, the vendored tests/data (see its README) or ../shared/data."""
    for candidate in DATA_DIR_CANDIDATES:
        if candidate and (Path(candidate) / "coco" / "fakecap_references.json").is_file():
            return Path(candidate)
    pytest.fail(f"evaluation data not found in any of {DATA_DIR_CANDIDATES}; set CAPDEMO_DATA_DIR")


@pytest.fixture(scope="module")
def fakecap(data_dir: Path) -> tuple[dict, dict]:
    """The official demo's predictions and references as ``{image_id: ...}`` dicts."""
    predictions = load_predictions(data_dir / "coco" / "captions_val2014_fakecap_results.json")
    references = load_references(data_dir / "coco" / "fakecap_references.json")
    return predictions, references


@pytest.fixture
def missing_spice(tmp_path, monkeypatch) -> Path:
    """Point pycocoevalcap's SPICE folder at an empty directory; returns where the jars are looked for."""
    monkeypatch.setattr(evaluate.spice_corenlp, "SPICEDIR", str(tmp_path))
    return tmp_path / evaluate.spice_corenlp.SPICELIB


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(record) + "\n" for record in records))
    return path


# --------------------------------------------------------------------------------------------
# Caption metrics


def test_official_coco_demo_scores_are_reproduced_through_the_cli(data_dir, capsys):
    # The only METEOR run of the file (~10-20 s of JVM): the official demo's inputs, end to end through main().
    results = data_dir / "coco" / "captions_val2014_fakecap_results.json"
    references = data_dir / "coco" / "fakecap_references.json"
    assert main(["--predictions", str(results), "--references", str(references), "--json"]) == 0
    out, err = capsys.readouterr()
    report = json.loads(out)
    assert report["task"] == "captions" and report["num_scored"] == 1000 and report["notes"] == []
    scores = report["metrics"]
    assert list(scores) == ALL_CAPTION_KEYS
    assert {key: round(value, 4) for key, value in scores.items()} == OFFICIAL_DEMO_SCORES
    # BLEU from the n-gram counts the demo notebook prints (correct 5732/2510/1043/423 of 9893/8893/7893/6893).
    assert scores["Bleu_1"] == pytest.approx(5732 / 9893, abs=1e-9)
    assert scores["Bleu_4"] == pytest.approx((5732 * 2510 * 1043 * 423 / (9893 * 8893 * 7893 * 6893)) ** 0.25, abs=1e-9)
    assert err == ""


def test_bleu_matches_a_hand_computed_case_and_notes_missing_spice(missing_spice, capsys):
    # After PTB tokenisation (lower case, no final period) the hypothesis is 5 tokens against a 6-token reference.
    # Clipped n-gram precisions: 5/5, 3/4 ("on grass" misses), 2/3, 1/2; brevity penalty exp(1 - 6/5).
    scores = score_captions({7: "A dog runs on grass."}, {7: ["a dog runs on the grass"]}, metrics=("Bleu",))
    brevity = math.exp(1 - 6 / 5)
    precisions = [1.0, 3 / 4, 2 / 3, 1 / 2]
    for n in range(1, 5):
        expected = brevity * math.prod(precisions[:n]) ** (1 / n)
        assert scores[f"Bleu_{n}"] == pytest.approx(expected, abs=1e-6)
    assert set(scores) == {"Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4"}
    stderr_lines = capsys.readouterr().err.splitlines()
    assert f"SPICE skipped: Stanford CoreNLP 3.6.0 jars not found at {missing_spice}; see README" in stderr_lines


def test_identical_captions_score_perfect_bleu_and_cider_of_ten():
    # CIDEr is tf-idf cosine x 10; with >= 2 images every n-gram has a positive idf, so a copy scores exactly 10.
    captions = {1: "a red bus parked by the road", 2: "two cats sleeping on a sofa", 3: "a man riding a wave"}
    report = evaluate_captions(captions, {i: [c] for i, c in captions.items()}, metrics=("Bleu", "CIDEr"), spice=False)
    assert report.metrics["CIDEr"] == pytest.approx(10.0, abs=1e-6)
    assert [report.metrics[f"Bleu_{n}"] for n in range(1, 5)] == pytest.approx([1.0] * 4, abs=1e-6)
    assert report.notes == () and report.num_scored == 3


def test_spice_required_but_missing_is_a_one_line_error(missing_spice):
    with pytest.raises(MetricUnavailableError, match=f"jars not found at {missing_spice}") as err:
        evaluate_captions({1: "a dog"}, {1: ["a dog"]}, spice=True)
    assert "\n" not in str(err.value)


def test_scoring_refuses_predictions_without_references_and_bad_arguments():
    with pytest.raises(EvaluationError, match=r"2 predicted image\(s\) have no references, e.g. 5, 6") as err:
        evaluate_captions({1: "a dog", 5: "a cat", 6: "a cow"}, {1: ["a dog"]}, spice=False)
    assert "\n" not in str(err.value)
    with pytest.raises(EvaluationError, match="no predictions"):
        evaluate_captions({}, {1: ["a dog"]}, spice=False)
    with pytest.raises(EvaluationError, match="non-empty list of reference strings"):
        evaluate_captions({1: "a dog"}, {1: "a dog"}, spice=False)
    with pytest.raises(ValueError, match="subset of"):
        evaluate_captions({1: "a dog"}, {1: ["a dog"]}, metrics=("SPICE",), spice=False)


# --------------------------------------------------------------------------------------------
# Prediction files


def test_prediction_formats_parse_to_the_same_dict(tmp_path):
    coco_results = [{"image_id": 391895, "caption": "a man on a bike"}, {"image_id": 60623, "caption": "a cake"}]
    (tmp_path / "results.json").write_text(json.dumps(coco_results))
    capdemo_lines = [
        {"image": "/photos/COCO_val2014_000000391895.jpg", "caption": "a man on a bike", "method": "maccap"},
        {"image": "000000060623.jpg", "caption": "a cake", "candidates": []},
    ]
    by_id_lines = [{"image_id": "COCO_val2014_000000391895.jpg", "caption": "a man on a bike"}, coco_results[1]]
    expected = {391895: "a man on a bike", 60623: "a cake"}
    assert load_predictions(tmp_path / "results.json") == expected
    assert load_predictions(write_jsonl(tmp_path / "capdemo.jsonl", capdemo_lines)) == expected
    assert load_predictions(write_jsonl(tmp_path / "ids.jsonl", by_id_lines)) == expected
    gz = tmp_path / "results.json.gz"
    gz.write_bytes(gzip.compress(json.dumps(coco_results).encode()))
    assert load_predictions(gz) == expected


@pytest.mark.parametrize(
    ("lines", "message"),
    [
        ('{"image": "a.jpg", "caption": "x"}\n{"image": "b.jpg"}\n', r":2: no string 'caption' \(keys: image\)"),
        ('{"caption": "x"}\n', r":1: no 'image_id' or 'image' key"),
        ('{"image": "a.jpg", "caption": "x"}\n{"image": "a.png", "caption": "y"}\n', r":2: a second prediction"),
        ('{"image": "a.jpg", "caption": "x"}\n{"image": \n', r":2: invalid JSON line"),
        ('[{"image_id": 1, "caption": "x"},\n', r":2:1: invalid JSON"),
        ('["a caption"]', r"item 0: expected a JSON object, got str"),
    ],
)
def test_malformed_prediction_files_give_one_line_errors(tmp_path, lines, message):
    path = tmp_path / "predictions.jsonl"
    path.write_text(lines)
    with pytest.raises(DataFormatError, match=message) as err:
        load_predictions(path)
    assert str(err.value).startswith(str(path)) and "\n" not in str(err.value)


@pytest.mark.parametrize(
    ("name", "image_id"),
    [
        ("COCO_val2014_000000391895.jpg", 391895),
        ("/data/train2014/COCO_train2014_000000000009.jpg", 9),
        ("000000397133.jpg", 397133),
        ("1007129816.jpg", 1007129816),
        ("my_holiday.png", "my_holiday"),
    ],
)
def test_image_ids_from_file_names(name, image_id):
    assert image_id_from_name(name) == image_id


# --------------------------------------------------------------------------------------------
# Karpathy splits, COCO references, caption corpora


def test_karpathy_coco_test_split(data_dir):
    images = load_karpathy_split(data_dir / "coco" / "karpathy" / "mscoco_test.json.gz")
    assert len(images) == 5000 and len(captions_from_split(images)) == 25010
    assert images[0].image_name == "COCO_val2014_000000391895.jpg" and images[0].image_id == 391895
    assert images[0].split == "test"
    assert images[0].captions[0] == "A man with a red helmet on a small moped on a dirt road."
    references = references_from_split(images)
    assert len(references) == 5000 and all(5 <= len(caps) <= 6 for caps in references.values())
    # The COCO-format copy of the same split holds the same captions under the same ids.
    coco_format = load_coco_references(data_dir / "coco" / "karpathy" / "mscoco_test_references.json.gz")
    assert {i: [c.strip() for c in caps] for i, caps in coco_format.items()} == references


def test_karpathy_flickr30k_test_split(data_dir):
    images = load_karpathy_split(data_dir / "flickr30k" / "flickr30k_test.json.gz")
    assert len(images) == 1000 and len(captions_from_split(images)) == 5000
    assert images[0].image_name == "1007129816.jpg" and images[0].image_id == 1007129816
    assert len(references_from_split(images)) == 1000


def test_split_loader_errors_name_the_record(tmp_path):
    path = tmp_path / "split.json"
    path.write_text(json.dumps([{"image_name": "a.jpg", "captions": ["x"]}, {"image_name": "b.jpg", "captions": "x"}]))
    with pytest.raises(DataFormatError, match=r"split.json item 1: 'captions' must be a list of strings"):
        load_karpathy_split(path)
    twice = [SplitImage("a.jpg", "a", ("x",), "test"), SplitImage("a.png", "a", ("y",), "test")]
    with pytest.raises(DataFormatError, match="appears twice"):
        references_from_split(twice)


def test_caption_corpus_filters_long_captions_and_dedupes_only_when_asked(tmp_path):
    fifteen = " ".join(["word"] * 15)
    sixteen = " ".join(["word"] * 16)
    lines = ["  A dog  runs. ", "", fifteen, sixteen, "A dog runs.", "a dog runs.", "   "]
    text_file = tmp_path / "corpus.txt"
    text_file.write_text("\n".join(lines) + "\n")
    expected = ["A dog runs.", fifteen, "A dog runs.", "a dog runs."]  # the paper keeps repeats
    assert load_caption_corpus(text_file) == expected
    assert load_caption_corpus(text_file, dedupe=True) == ["A dog runs.", fifteen, "a dog runs."]
    assert load_caption_corpus(text_file, max_words=None, dedupe=True) == ["A dog runs.", fifteen, sixteen,
                                                                           "a dog runs."]
    assert load_caption_corpus(text_file, max_words=3) == ["A dog runs.", "A dog runs.", "a dog runs."]
    json_file = tmp_path / "corpus.json.gz"
    json_file.write_bytes(gzip.compress(json.dumps(lines).encode()))
    assert load_caption_corpus(json_file) == expected


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ('["a dog",\n "a cat"\n', r"corpus.json:3:1: invalid JSON"),
        ('{"captions": ["a dog"]}', r"corpus.json: expected a JSON list of caption strings or a Karpathy split"),
        ('["a dog", 3]', r"corpus.json item 1: expected a caption string, got int"),
        ('[{"image_name": "a.jpg", "captions": ["a dog"]}]', r"corpus.json is a Karpathy split file.*--corpus-split"),
    ],
)
def test_malformed_caption_corpus_raises_one_line_error(tmp_path, content, message):
    path = tmp_path / "corpus.json"
    path.write_text(content)
    with pytest.raises(DataFormatError, match=message) as err:
        load_caption_corpus(path)
    assert "\n" not in str(err.value)


def test_caption_corpus_rejects_binary_text(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_bytes(b"a dog\na cat\n\xff\xfe broken\n")
    with pytest.raises(DataFormatError, match=r"corpus.txt:3: not UTF-8"):
        load_caption_corpus(path)


# --------------------------------------------------------------------------------------------
# VQA


def test_answer_normalisation():
    assert normalise_answer("The Two Dogs!") == "2 dogs"
    assert normalise_answer("T-shirt") == normalise_answer("t shirt") == "t shirt"
    assert normalise_answer("1,000") == "1000" and normalise_answer("2.5") == "2.5"
    assert normalise_answer("yes.") == "yes" and normalise_answer("None") == "0"
    assert normalise_answer("a man's hat") == "mans hat"


def test_vqa_topk_accuracy_on_a_hand_made_case():
    ten_answers = ["2"] * 6 + ["3"] * 4
    ranked = {
        1: ["Yes", "no"],  # hit at rank 1
        2: ["red", "blue", "green", "white", "Two", "one"],  # "Two" -> "2" at rank 5
        3: ["a", "b", "c", "d", "e", "f", "g", "the dog", "h"],  # "the dog" -> "dog" at rank 8
        4: ["cat"] + [str(i) for i in range(20)],  # "dogs" is never ranked: a miss at every k
    }
    answers = {1: ["yes"] * 10, 2: ten_answers, 3: ["dog", "puppy"], 4: ["dogs"], 5: ["unranked"]}
    accuracy = vqa_topk_accuracy(ranked, answers)
    assert accuracy == {"top1": 1 / 4, "top5": 2 / 4, "top10": 3 / 4}
    assert vqa_topk_accuracy(ranked, answers, ks=(2, 8)) == {"top2": 1 / 4, "top8": 3 / 4}
    with pytest.raises(EvaluationError, match=r"1 predicted question\(s\) have no references, e.g. 9"):
        vqa_topk_accuracy({9: ["yes"]}, answers)
    with pytest.raises(ValueError, match="positive"):
        vqa_topk_accuracy(ranked, answers, ks=(0,))


def test_vqa_cli_reads_capdemo_lines_and_vqav2_annotations(tmp_path, capsys):
    predictions = write_jsonl(
        tmp_path / "vqa.jsonl",
        [
            {"question_id": 11, "question": "What color?", "top_answers": [{"text": "Red", "score": 0.9}]},
            {"id": "12", "question": "How many?", "top_answers": [{"text": "3", "score": 0.5}, {"text": "two"}]},
        ],
    )
    references = tmp_path / "answers.json"
    annotations = [
        {"question_id": 11, "answers": [{"answer": "red", "answer_id": i} for i in range(1, 11)]},
        {"question_id": 12, "answers": [{"answer": "2"}] * 10},
        {"question_id": 13, "answers": [{"answer": "no"}] * 10},
    ]
    references.write_text(json.dumps({"annotations": annotations}))
    assert load_vqa_predictions(predictions) == {11: ["Red"], 12: ["3", "two"]}
    assert load_vqa_answers(references)[12] == ["2"] * 10
    assert main(["--vqa", "--predictions", str(predictions), "--references", str(references), "--json"]) == 0
    out, err = capsys.readouterr()
    report = json.loads(out)
    assert report["metrics"] == {"top1": 0.5, "top5": 1.0, "top10": 1.0} and report["num_scored"] == 2
    assert err == "warning: 1 of 3 reference questions have no prediction; scoring the 2 predicted questions only\n"


# --------------------------------------------------------------------------------------------
# CLI on captions


def test_cli_json_on_twenty_fakecap_images_named_by_file(fakecap, data_dir, tmp_path, capsys):
    predictions, _ = fakecap
    subset = dict(list(predictions.items())[:20])
    lines = [{"image": f"val2014/COCO_val2014_{i:012d}.jpg", "caption": c, "method": "m"} for i, c in subset.items()]
    path = write_jsonl(tmp_path / "captions.jsonl", lines)
    references = data_dir / "coco" / "fakecap_references.json"
    argv = ["--predictions", str(path), "--references", str(references), "--json", "--metrics", "Bleu", "CIDEr"]
    assert main(argv) == 0
    out, err = capsys.readouterr()
    report = json.loads(out)
    assert report["task"] == "captions" and report["num_scored"] == 20
    assert list(report["metrics"]) == ["Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "CIDEr"]
    assert err == "warning: 980 of 1000 reference images have no prediction; scoring the 20 predicted images only\n"
    # The same subset keyed by COCO id, scored directly: equal scores, so the file names found the right images.
    direct = evaluate_captions(subset, load_references(references), metrics=("Bleu", "CIDEr"), spice=False)
    assert report["metrics"] == pytest.approx(direct.metrics, abs=1e-12)
    assert report["notes"] == list(direct.notes)


def test_cli_table_and_errors(data_dir, tmp_path, capsys):
    references = data_dir / "coco" / "fakecap_references.json"
    orphans = write_jsonl(tmp_path / "orphans.jsonl", [{"image_id": i, "caption": "a dog"} for i in (1, 2, 3)])
    assert main(["--predictions", str(orphans), "--references", str(references)]) == 1
    err = capsys.readouterr().err
    assert err == "error: 3 predicted image(s) have no references, e.g. 1, 2, 3\n"
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"image": "a.jpg"}\n')
    assert main(["--predictions", str(broken), "--references", str(references)]) == 1
    assert capsys.readouterr().err.startswith(f"error: {broken}:1: no string 'caption'")
    table = evaluate.EvaluationReport(task="captions", num_scored=2, metrics={"Bleu_1": 0.5, "CIDEr": 1.23456})
    assert table.to_table() == "captions: 2 images scored\nBleu_1  0.5000\nCIDEr   1.2346"


def test_only_referenced_scores_the_referenced_predictions_and_says_how_many_were_left_out(tmp_path, capsys):
    predictions = write_jsonl(tmp_path / "vqa.jsonl", [
        {"question_id": 11, "answers_ranked": ["red"]},
        {"question_id": 12, "answers_ranked": ["blue", "2"]},
        {"question_id": 99, "answers_ranked": ["yes"]},  # no reference: refused without the flag
    ])
    references = tmp_path / "answers.json"
    references.write_text(json.dumps([{"question_id": 11, "answers": ["red"]}, {"question_id": 12, "answers": ["2"]}]))
    argv = ["--vqa", "--predictions", str(predictions), "--references", str(references), "--json"]
    assert main(argv) == 1
    assert "1 predicted question(s) have no references, e.g. 99" in capsys.readouterr().err
    assert main([*argv, "--only-referenced"]) == 0
    out, err = capsys.readouterr()
    report = json.loads(out)
    assert report["num_scored"] == 2 and report["metrics"]["top1"] == 0.5 and report["metrics"]["top5"] == 1.0
    assert err == "left out 1 of 3 predicted questions that have no references\n"
    assert report["notes"] == ["left out 1 of 3 predicted questions that have no references"]


def test_only_referenced_captions_against_a_karpathy_original_file(data_dir, tmp_path, capsys):
    """Captions of the whole tiny split scored against Karpathy's original file: every image has references there."""
    split = data_dir / "karpathy" / "dataset_coco_tiny.json"
    lines = [{"image_id": i, "caption": "a dog and a cat on a bed"} for i in (74, 73)] + [
        {"image_id": 5, "caption": "not in the split"}]
    path = write_jsonl(tmp_path / "captions.jsonl", lines)
    argv = ["--predictions", str(path), "--references", str(split), "--json", "--metrics", "Bleu", "--only-referenced"]
    assert main(argv) == 0
    out, err = capsys.readouterr()
    report = json.loads(out)
    assert report["num_scored"] == 2
    assert err.splitlines()[0] == "left out 1 of 3 predicted images that have no references"
    assert "3 of 5 reference images have no prediction" in err
