"""One command from a Karpathy split to scores: captions every test image with a bundle, resumes, scores them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from capdemo.pipeline import Captioner
from training import caption_split
from training.evaluate import evaluate_captions, load_predictions
from training.shapes import world
from training.shapes.language import captions

N_TEST, N_TRAIN = 6, 2
METRICS = ["Bleu", "CIDEr"]
SHAPES_BUNDLE = Path(__file__).resolve().parents[1] / "weights" / "shapes"  # the shipped one, whatever the env says


@pytest.fixture(scope="module")
def split(tmp_path_factory):
    """A Karpathy-format split of shapes scenes (6 test, 2 train) with their image files and all paraphrases."""
    root = tmp_path_factory.mktemp("split")
    config = world.WorldConfig(image_size=32)
    records = []
    for i, (scene, image, _) in enumerate(world.generate_pairs(N_TEST + N_TRAIN, seed=4321, config=config)):
        name = f"COCO_val2014_{1000 + i:012d}.png"
        (root / "val2014").mkdir(exist_ok=True)
        image.save(root / "val2014" / name)  # in a sub-folder, as COCO ships them
        records.append({"image_name": name, "captions": captions(scene), "split": "test" if i < N_TEST else "train"})
    (root / "split.json").write_text(json.dumps(records))
    return root


def _argv(split, out, *extra, images=None):
    return ["--weights", str(SHAPES_BUNDLE), "--method", "tomcap", "--split", str(split / "split.json"),
            "--images", str(images or split), "--out", str(out), "--metrics", *METRICS, "--json", *extra]


def test_captions_the_test_subset_and_scores_it_like_evaluate(split, tmp_path, capsys):
    out = tmp_path / "results.jsonl"
    assert caption_split.main(_argv(split, out)) == 0
    report = json.loads(capsys.readouterr().out)
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["image_id"] for r in lines] == [1000 + i for i in range(N_TEST)]  # test images only, in split order
    assert report["images"] == N_TEST
    references = {1000 + i: r["captions"] for i, r in enumerate(json.loads((split / "split.json").read_text()))
                  if r["split"] == "test"}
    expected = evaluate_captions(load_predictions(out), references, metrics=METRICS, spice=False).to_json()
    assert report["metrics"] == expected["metrics"]
    assert report["metrics"]["CIDEr"] > 2.0  # the shipped shapes TOMCap scores ~6 on held-out scenes; noise ~0


def test_a_killed_run_resumes_without_captioning_done_images_again(split, tmp_path, capsys, monkeypatch):
    out = tmp_path / "results.jsonl"
    assert caption_split.main(_argv(split, out)) == 0
    complete = out.read_text()
    lines = complete.splitlines(keepends=True)
    out.write_text("".join(lines[:2]) + lines[2][:10])  # killed while writing the third line
    captioned = []
    original = Captioner.caption
    monkeypatch.setattr(Captioner, "caption",
                        lambda self, images, *a, **k: captioned.append(len(images)) or original(self, images, *a, **k))
    capsys.readouterr()
    assert caption_split.main(_argv(split, out)) == 0
    assert sum(captioned) == N_TEST - 2
    assert out.read_text() == complete  # same captions, same order, the cut line replaced


def test_missing_images_and_subsets_are_one_line_errors(split, tmp_path, capsys):
    assert caption_split.main(_argv(split, tmp_path / "r.jsonl", "--subset", "val")) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: no image of split 'val'") and "\n" not in err
    assert caption_split.main(_argv(split, tmp_path / "r.jsonl", images=tmp_path)) == 2  # no image files there
    assert "split images are not under" in capsys.readouterr().err


def test_a_resume_with_other_settings_is_refused(split, tmp_path, capsys):
    out = tmp_path / "results.jsonl"
    assert caption_split.main(_argv(split, out)) == 0
    record = json.loads((tmp_path / "results.jsonl.run.json").read_text())
    assert record["method"] == "tomcap" and len(record["bundle_sha256"]) == 64
    before = out.read_text()
    capsys.readouterr()
    assert caption_split.main(_argv(split, out, "--beams", "2")) == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]  # (after transformers' loading bars)
    assert error.startswith("error: ") and "(options differ)" in error
    assert out.read_text() == before  # nothing appended from the other run


def test_karpathy_original_layout_gives_the_same_captions(split, tmp_path, capsys):
    """The same images as Karpathy's dataset_coco.json layout (filepath + filename, sentences with raw text)."""
    magic = json.loads((split / "split.json").read_text())
    original = {"dataset": "coco", "images": [
        {"filepath": "val2014", "filename": r["image_name"], "split": r["split"], "cocoid": 1000 + i, "imgid": i,
         "sentences": [{"raw": c, "tokens": c.split()} for c in r["captions"]]} for i, r in enumerate(magic)]}
    (split / "dataset_coco.json").write_text(json.dumps(original))
    out_magic, out_original = tmp_path / "magic.jsonl", tmp_path / "original.jsonl"
    assert caption_split.main(_argv(split, out_magic)) == 0
    report_magic = json.loads(capsys.readouterr().out)
    argv = _argv(split, out_original)
    argv[argv.index("--split") + 1] = str(split / "dataset_coco.json")
    assert caption_split.main(argv) == 0
    assert json.loads(capsys.readouterr().out) == report_magic
    assert out_original.read_text() == out_magic.read_text()
