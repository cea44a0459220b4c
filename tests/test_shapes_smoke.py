"""The whole shapes recipe at smoke size, end to end, as `python -m training reproduce shapes --smoke` runs it: the
same commands as the shipped bundle, then real scores and the reproduction's table.

An untrained or broken pipeline produces captions that do not parse (attribute accuracy 0), or ignores the image
(a constant caption scores about 0.25 on attributes, see test_constant_caption_baseline); the trained smoke
models must clear both.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from capdemo.bundle import Bundle
from capdemo.pipeline import Captioner
from training.bundle_evaluation import read_evaluation
from training.kernels import PINNED_KERNELS
from training.shapes import world
from training.shapes.build import ShapesRecipe, StageOutputs, examples_seed
from training.shapes.clip import TinyClipConfig
from training.shapes.evaluate import evaluate_bundle, score
from training.shapes.language import captions
from training.shapes.questions import QUESTION_TYPES, answer_list, example_questions

TEST_SEED = 1234
N_TEST = 120
SMOKE_WORLD = ShapesRecipe.smoke().world


@pytest.fixture(scope="module")
def reproduction(tmp_path_factory):
    """``reproduce shapes --smoke --json``: the build (bundle/, work/), shapes-eval, and the table's JSON."""
    import contextlib
    import io
    import json

    from training.reproduce import main

    root = tmp_path_factory.mktemp("reproduce-shapes")
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert main(["shapes", "--smoke", "--json", "--out", str(root)]) == 0
    return root, json.loads(printed.getvalue().splitlines()[-1])


@pytest.fixture(scope="module")
def smoke_bundle(reproduction):
    return reproduction[0] / "bundle"


def test_reproduce_runs_the_recipe_end_to_end_and_tables_ours_next_to_the_published_numbers(reproduction):
    import contextlib
    import io

    from training.reproduce import main

    root, report = reproduction
    rows = {(row["method"], row["metric"]): row for row in report["rows"]}
    assert {"maccap", "tomcap"} <= {method for method, _ in rows} and report["smoke"] is True
    for (method, metric), row in rows.items():
        assert row["ours"] is not None and row["paper"] > 0, (method, metric)
        assert 0.0 <= row["ours"] <= (10.0 if metric == "CIDEr" else 1.0)
    shipped = Bundle.load(Path(__file__).resolve().parents[1] / "weights" / "shapes")
    measured = {result.method: result.metrics for result in read_evaluation(shipped)  # the README's measured table
                if result.task == "shapes-eval"}
    assert rows[("maccap", "scene_accuracy")]["paper"] == round(measured["maccap"]["scene_accuracy"], 3)
    assert (root / "reproduction.md").read_text().count("| shapes-held-out-500 |") == len(rows)
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed), contextlib.redirect_stderr(io.StringIO()) as log:
        assert main(["shapes", "--smoke", "--out", str(root)]) == 0  # a second run: every stage done before
    assert log.getvalue().count("done before:") == 2 and "| maccap |" in printed.getvalue()


@pytest.fixture(scope="module")
def report(smoke_bundle):
    return evaluate_bundle(str(smoke_bundle), n=N_TEST, seed=TEST_SEED, settings={"maccap": {"samples": 8}},
                           ceiling=True)


def test_constant_caption_baseline():
    scenes = world.generate_scenes(N_TEST, seed=TEST_SEED, config=world.WorldConfig())
    constant = score([captions(scenes[0])[0]] * N_TEST, scenes)
    assert constant["attribute_accuracy"] < 0.35 and constant["scene_accuracy"] < 0.05


def test_bundle_is_complete_and_serves(smoke_bundle):
    captioner = Captioner.from_bundle(smoke_bundle, device="cpu")
    assert captioner.method_names == ("tomcap", "maccap", "capdec")  # the recipe's lead first, then the rest
    assert captioner.bundle.manifest["default_method"] == "tomcap"  # the build wrote the recipe's lead_method
    assert captioner.bundle.component("vqa")["caption_method"] == "tomcap"
    # the recipe's pick among TOMCap's beams, written after training; the trained run keeps the paper's beam order
    assert captioner.bundle.component("tomcap")["select_by"] == ShapesRecipe.smoke().tomcap_select_by == "clip"
    assert captioner.options("tomcap").select_by == "clip"
    trained = Bundle.load(StageOutputs(smoke_bundle.parent / "work").method_bundle("tomcap")).component("tomcap")
    assert trained["select_by"] == "beam"
    assert captioner.info()["world"] == "shapes" and len(captioner.examples()) == 3
    kernels = captioner.bundle.manifest["training"]["cpu_kernels"]  # what the build ran on (pinned by conftest)
    assert {name: kernels[name] for name in PINNED_KERNELS} == {name: os.environ.get(name) for name in PINNED_KERNELS}
    assert captioner.answers is not None and captioner.answers.answers == list(answer_list(  # the world's own list
        colours=SMOKE_WORLD.colours, shapes=SMOKE_WORLD.shapes, max_count=SMOKE_WORLD.max_count))
    vqa = captioner.bundle.component("vqa")
    assert vqa["lm"] == "bundle:vqa/lm"  # the frozen, untouched LM answers (paper), not MacCap's trained one
    frozen = captioner.bundle.directory("vqa/lm")
    work = smoke_bundle.parent / "work"
    assert (frozen / "model.safetensors").read_bytes() == (work / "lm" / "model.safetensors").read_bytes()
    assert (frozen / "model.safetensors").read_bytes() != (
        captioner.bundle.directory("maccap/lm") / "model.safetensors").read_bytes()  # MacCap trained its LM
    listed = captioner.bundle.json("examples/scenes.json")
    assert [entry["file"] for entry in listed] == [path.relative_to(captioner.bundle.path).as_posix()
                                                  for path in captioner.examples()]
    assert [world.parse_caption(entry["caption"]).kind for entry in listed] == ["single", "pair", "group"]
    asked = captioner.bundle.json(vqa["examples"])  # the Ask tab's: one question about each example, in rotation
    expected = example_questions([world.parse_caption(entry["caption"]) for entry in listed],
                                 seed=examples_seed(SMOKE_WORLD), colours=SMOKE_WORLD.colours,
                                 shapes=SMOKE_WORLD.shapes)
    assert [(a["image"], a["question"], a["answer"], a["type"]) for a in asked] == [
        (entry["file"], q.text, q.answer, q.kind) for entry, q in zip(listed, expected)]
    assert [a["type"] for a in asked] == ["colour", "shape", "count"]
    assert [item.image for item in captioner.example_questions()] == captioner.examples()
    result = captioner.caption([world.generate_images(1, seed=TEST_SEED, config=world.WorldConfig())[0]],
                               "maccap", samples=4)[0]
    assert len(result.candidates) == 4 and result.caption == result.candidates[0].text


def test_report_has_the_keys_others_rely_on(report):
    assert report["world"] == {"image_size": 56, "patch_grid": [7, 7]}
    assert set(report["gap"]) >= {"paired_cosine_mean", "modality_probe_accuracy", "mean_gap_norm",
                                  "subregion_closer_fraction", "i2t_r1"}
    assert report["gap"]["n"] == 1000
    gap = report["gap"]  # where MacCap's N_cr patches land: on the objects at most as often as there are enough
    assert 0 <= gap["selected_patches_on_objects"] <= gap["selection_on_objects_ceiling"] <= 1
    assert 0 < gap["patches_on_objects"] < 1
    # TOMCap's correction: uncorrected, the nearest caption by distance is the nearest by cosine (unit vectors)
    assert set(gap["tomcap_correction"]) == {"none", "mean", "mean_std"}
    assert gap["tomcap_correction"]["none"]["nearest_caption_same_scene"] == pytest.approx(gap["i2t_r1"], abs=0.0015)
    assert gap["tomcap_correction"]["none"]["paired_cosine"] == pytest.approx(gap["paired_cosine_mean"], abs=1e-6)
    for method in ("maccap", "tomcap"):
        assert {"scene_accuracy", "attribute_accuracy", "cider"} <= set(report[method])
        assert report[method]["scene_accuracy"] <= report[method]["candidate_scene_accuracy"] <= 1
        assert 0 <= report[method]["clip_prefers_wrong"] <= 1
    vqa = report["vqa"]
    assert {"accuracy", "n", "by_type", "frozen_lm", "caption_trained_lm"} <= set(vqa)
    assert vqa["accuracy"] == vqa["frozen_lm"]["accuracy"] and set(vqa["by_type"]) == set(QUESTION_TYPES)
    for row in (vqa["frozen_lm"], vqa["caption_trained_lm"], vqa["frozen_lm_true_captions"]):
        by_kind = row["by_scene_kind"]  # the same questions, split by their scene's kind
        assert set(by_kind) <= {"single", "pair", "group"} and sum(k["n"] for k in by_kind.values()) == row["n"]
        assert sum(k["accuracy"] * k["n"] for k in by_kind.values()) == pytest.approx(row["accuracy"] * row["n"])
    shipped = report["examples"]  # the app's default method's count (the recipe's lead), every method's by_method
    assert shipped["method"] == "tomcap" and shipped["n"] == 3 and 0 <= shipped["correct"] <= 3
    assert set(shipped["by_method"]) == {"maccap", "tomcap", "capdec"}
    assert shipped["by_method"]["tomcap"] == {"correct": shipped["correct"], "n": 3}
    questions = shipped["questions"]  # the Ask tab's example questions, answered as the app answers them
    assert questions["n"] == 3 and questions["correct"] == sum(a["answer"] == a["truth"] for a in questions["answers"])
    assert vqa["method"] == "tomcap" and vqa["caption_trained_lm"]["of"] == "maccap"  # MacCap's LM: its own


def test_a_lead_method_is_the_one_shapes_eval_asks_questions_through_and_counts_examples_of(smoke_bundle, tmp_path):
    """The same bundle with MacCap in the lead (the paper's VQA captioner, world v1's lead): VQA reads MacCap's
    captions, the examples' headline count is MacCap's, and the caption-trained LM row is still MacCap's LM."""
    from capdemo.testing import lead_bundle

    lead = lead_bundle(smoke_bundle, tmp_path / "lead", default_method="maccap", caption_method="maccap")
    report = evaluate_bundle(str(lead), n=8, seed=TEST_SEED, methods=["maccap", "tomcap"], ceiling=False, gap=False,
                             vqa_scenes=4)
    assert report["vqa"]["method"] == "maccap" and report["vqa"]["caption_trained_lm"]["of"] == "maccap"
    assert report["examples"]["method"] == "maccap"
    assert report["examples"]["by_method"]["maccap"] == {"correct": report["examples"]["correct"], "n": 3}


def test_candidate_report_counts_the_true_scene_among_candidates_and_what_the_clip_prefers():
    """Four images, a hand-made CLIP: one captioned right; one wrongly, its truth among the candidates and the
    CLIP preferring the wrong caption; one wrongly, the truth nowhere and the CLIP preferring the truth; one
    wrongly, the truth nowhere and the CLIP preferring the wrong caption."""
    import types

    import torch

    from capdemo.result import Candidate
    from training.shapes.evaluate import candidate_report

    scenes = list(dict.fromkeys(world.generate_scenes(40, seed=TEST_SEED, config=SMOKE_WORLD)))[:5]
    truth = [captions(scene)[0] for scene in scenes]
    cosines = {truth[3]: (1.0, 0.0), truth[4]: (1.0, 0.0), truth[0]: (0.0, 1.0)}  # with every image; the rest 0.6

    def encode_text(texts):
        return torch.tensor([cosines.get(text, (0.6, 0.8)) for text in texts])

    def result(caption, *candidates):
        return types.SimpleNamespace(caption=caption, candidates=[Candidate(text, 0.0) for text in candidates])

    captioner = types.SimpleNamespace(encoder=types.SimpleNamespace(encode_text=encode_text))
    results = [result(truth[0], truth[0]), result(truth[3], truth[3], truth[1]), result(truth[0], truth[0]),
               result(truth[4], truth[4])]
    images = torch.tensor([[1.0, 0.0]] * 4)  # (4, D)
    report = candidate_report(captioner, results, [scenes[0], scenes[1], scenes[2], scenes[1]], images)
    assert report == {"candidate_scene_accuracy": 0.5, "clip_prefers_wrong": pytest.approx(2 / 3)}


def test_trained_smoke_models_beat_untrained_thresholds(report, smoke_bundle):
    """Smoke sizes train for seconds, so the bar is "learned the world", not the full bundle's accuracy.

    Measured on a world-v2 smoke build (4,000 pairs at 56 px): CLIP i2t 0.021 among 1,000 (chance 0.001; world v1's
    32 px smoke CLIP reached 0.13); MacCap captions parse as scenes 91 % of the time
    (a random LM: 0 %), CIDEr 1.2; TOMCap CIDEr 0.84. The full bundle's numbers are in the README.
    """
    from capdemo.bundle import Bundle

    clip = Bundle.load(smoke_bundle).manifest["training"]["clip_metrics"]["eval"]
    assert clip["i2t"] >= 0.01 and clip["gap"]["probe_accuracy"] >= 0.9
    assert report["maccap"]["parse_rate"] >= 0.6
    assert report["maccap"]["cider"] >= 0.5
    assert report["tomcap"]["cider"] >= 0.3


def test_ablation_trains_each_variant_as_described_and_resumes_from_its_scores(smoke_bundle, capsys, monkeypatch):
    import json

    from capdemo.bundle import Bundle
    from training.shapes import ablate

    work = smoke_bundle.parent / "work"
    argv = ["--smoke", "--work-dir", str(work), "--weights", str(smoke_bundle), "--only", "gap-none", "maccap-s1",
            "maccap-single-no-noise", "capdec-no-noise", "--steps", "10", "--n", "20", "--json"]
    assert ablate.main(argv) == 0
    first = json.loads(capsys.readouterr().out)
    assert set(first["rows"]) == {"gap-none", "maccap-s1", "maccap-single-no-noise", "capdec-no-noise"}
    assert first["n"] == 20 and first["capdec_steps"] == 10
    for row in first["rows"].values():
        assert 0.0 <= row["scene_accuracy"] <= row["attribute_accuracy"] <= 1.0
        assert 0.0 <= row["text_to_text_scene_accuracy"] <= 1.0
    assert first["rows"]["maccap-s1"]["parse_rate"] > 0.5  # the smoke MacCap, scored through the ablation
    for row in first["rows"].values():  # each row's method on the shipped bundle's 3 examples, its misses named
        run = row["seeds"]["0"]
        assert run["examples_n"] == 3 and run["examples_correct"] == 3 - len(run["examples_missed"])
        assert row["examples_correct"] == run["examples_correct"]
    (trained_dir,) = (work / "ablation" / "gap-none").glob("steps-10-*")  # steps and a hash of the inputs
    variant = Bundle.load(trained_dir / "bundle").component("tomcap")
    assert (variant["gap_correction"], variant["noise_variance"], variant["input_noise_scale"],
            variant["query_noise_scale"]) == ("none", 0.0, 0.0, 0.0)  # the row's flags took effect
    (maccap_dir,) = (work / "ablation" / "maccap-single-no-noise").glob("steps-10-*")  # a trained MacCap row
    maccap = Bundle.load(maccap_dir / "bundle").component("maccap")
    assert (maccap["text_copies"], maccap["noise_variance"]) == (1, 0.0)
    (capdec_dir,) = (work / "ablation" / "capdec-no-noise").glob("steps-10-*")  # a trained CapDec row
    assert Bundle.load(capdec_dir / "bundle").component("capdec")["noise_variance"] == 0.0
    trained = (trained_dir / "bundle" / "bundle.json").stat().st_mtime_ns
    assert ablate.main(argv) == 0  # a second run reads the stored scores: no training, same numbers
    assert json.loads(capsys.readouterr().out) == first
    assert (trained_dir / "bundle" / "bundle.json").stat().st_mtime_ns == trained
    monkeypatch.setattr(ablate, "SCORING_VERSION", ablate.SCORING_VERSION + 1)  # scoring changed: rescore, not retrain
    assert ablate.main(argv) == 0
    assert json.loads(capsys.readouterr().out) == first  # the same code scores the same bundles the same
    assert (trained_dir / "bundle" / "bundle.json").stat().st_mtime_ns == trained
    assert len(list(trained_dir.glob("scores-v*.json"))) == 2  # the earlier version's score was not read
    monkeypatch.undo()
    other = ["--smoke", "--work-dir", str(work), "--weights", str(smoke_bundle), "--only", "gap-none",
             "--steps", "12", "--n", "20", "--train-seeds", "0", "1", "--json"]  # other inputs: new rows, own folders
    assert ablate.main(other) == 0
    second = json.loads(capsys.readouterr().out)
    assert second["tomcap_steps"] == 12 and second["train_seeds"] == [0, 1]
    row = second["rows"]["gap-none"]  # the mean and sample std over the two training seeds
    runs = [row["seeds"][seed]["scene_accuracy"] for seed in ("0", "1")]
    assert row["scene_accuracy"] == pytest.approx(sum(runs) / 2)
    assert row["scene_accuracy_std"] == pytest.approx(abs(runs[0] - runs[1]) / 2 ** 0.5)
    assert [(d / "bundle" / "bundle.json").is_file() for d in (work / "ablation" / "gap-none").glob("steps-12-*")
            ] == [True, True]
    assert (trained_dir / "bundle" / "bundle.json").stat().st_mtime_ns == trained
    assert ablate.main(["--work-dir", str(work / "missing")]) == 2
    assert "not a finished shapes build" in capsys.readouterr().err


def test_the_build_records_the_bundles_domain_for_the_apps_warning(smoke_bundle):
    from capdemo.bundle import Bundle
    from capdemo.domain import DOMAIN_KEY

    domain = Bundle.load(smoke_bundle).manifest[DOMAIN_KEY]
    assert "shapes world" in domain["summary"]
    assert set(domain["clip_score"]) == {"maccap", "tomcap", "capdec", "best"}
    for scores in domain["clip_score"].values():
        assert scores["n"] == 20 and -1 <= scores["p05"] <= scores["median"] <= 1
    assert domain["clip_score"]["best"]["median"] >= max(s["median"] for s in domain["clip_score"].values()) - 1e-6


def test_stage_times_keep_a_complete_stages_recorded_time_and_replace_a_rerun_ones(tmp_path):
    import json

    from training.shapes.build import StageTimes

    timed = StageTimes(tmp_path)
    with timed("lm", complete=True):  # nothing recorded yet: the time is recorded whatever it is
        pass
    assert set(json.loads((tmp_path / "timings.json").read_text())["lm"]) == {"wall_s", "cpu_s"}
    (tmp_path / "timings.json").write_text(json.dumps({"lm": {"wall_s": 99.0, "cpu_s": 98.0}}))
    timed = StageTimes(tmp_path)
    with timed("lm", complete=True):
        pass
    assert json.loads((tmp_path / "timings.json").read_text())["lm"] == {"wall_s": 99.0, "cpu_s": 98.0}
    with timed("lm", complete=False):  # it ran again, however quickly
        pass
    assert json.loads((tmp_path / "timings.json").read_text())["lm"] == {"wall_s": 0.0, "cpu_s": 0.0}


def test_a_resumed_build_keeps_each_trained_stages_time_and_reproduces_its_weights(smoke_bundle, tmp_path):
    import json

    from capdemo.bundle import Bundle
    from capdemo.methods.maccap.model import ADAPTOR_WEIGHTS
    from capdemo.methods.tomcap.model import TRAINABLE_WEIGHTS
    from training.shapes.build import build

    work = smoke_bundle.parent / "work"
    first = json.loads((work / "timings.json").read_text())
    again = build(ShapesRecipe.smoke(), tmp_path / "again", work)  # every stage's output is there already
    seconds = Bundle.load(again).manifest["training"]["stage_seconds"]
    for stage in ("world data", "clip", "lm", "datastore + gap statistics", "maccap", "tomcap", "capdec"):
        assert seconds[stage] == first[stage], stage  # the time it took to train, not to re-export
    assert Bundle.load(smoke_bundle).manifest["training"]["stage_seconds"]["domain"] == first["domain"]
    assert seconds["domain"]["wall_s"] > 0  # measured after the bundle was written, and in its manifest all the same
    for weights in (ADAPTOR_WEIGHTS, TRAINABLE_WEIGHTS):
        assert (again / weights).read_bytes() == (smoke_bundle / weights).read_bytes()


def test_stages_side_by_side_make_the_same_bundle_as_one_after_another(smoke_bundle, tmp_path):
    """The reproduction built with the CLI's default two jobs; one job, in process, gives every file the same bytes
    (the run records name their own run dirs, and the manifest its own timings)."""
    from capdemo.bundle import Bundle
    from training.shapes.build import RUN_RECORDS, build, built_files

    assert Bundle.load(smoke_bundle).manifest["training"]["jobs"] == 2
    serial = build(ShapesRecipe.smoke(), tmp_path / "serial", tmp_path / "work", jobs=1)
    assert Bundle.load(serial).manifest["training"]["jobs"] == 1
    assert RUN_RECORDS == ("training.json", "bundle.json")  # only the run records and the manifest may differ
    side_by_side, one_by_one = built_files(smoke_bundle), built_files(serial)
    assert any(name.endswith(".safetensors") for name in side_by_side) and set(side_by_side) == set(one_by_one)
    assert [name for name in side_by_side if side_by_side[name] != one_by_one[name]] == []


def test_a_half_saved_lm_is_not_a_finished_stage(tmp_path):
    """save_pretrained writes lm/config.json before the weights: the LM stage is done only at its own marker."""
    from training.shapes.build import StageOutputs

    stages = StageOutputs(tmp_path)
    stages.lm.mkdir()
    (stages.lm / "config.json").write_text("{}")
    assert "lm.done" in stages.missing() and not stages.lm_done.is_relative_to(stages.lm)  # lm/ ships as vqa/lm


def test_a_stage_pool_worker_keeps_the_builds_threads_and_reports_a_stages_error(tmp_path):
    import os

    import torch

    from training.shapes.stage_pool import StagePool, timed_call

    with pytest.raises(ValueError, match="jobs must be at least 1"):
        StagePool(0)
    with StagePool(2) as pool:
        threads = pool.submit(torch.get_num_threads).result()
        worker = pool.submit(os.getpid).result()
        failed = pool.submit(int, "not a number")
        with pytest.raises(ValueError, match="not a number"):
            failed.result()
    assert threads.value == torch.get_num_threads() and worker.value != os.getpid()
    run = timed_call(sum, [1, 2, 3])
    assert run.value == 6 and set(run.seconds) == {"wall_s", "cpu_s"}


def test_the_ablation_table_shows_each_seeds_example_count_and_a_dash_for_runs_without_one():
    from training.shapes.ablate import markdown_table, over_seeds

    def run(scene, examples=None):
        counts = {} if examples is None else {"examples_correct": examples, "examples_n": 8}
        return {"group": "gap", "description": "row", "scene_accuracy": scene, "attribute_accuracy": 0.9,
                "cider": 6.0, "bleu4": 0.9, "parse_rate": 1.0, "text_to_text_scene_accuracy": 0.8, **counts}

    counted = over_seeds({0: run(0.7, 7), 1: run(0.8, 6), 2: run(0.9, 8)})
    assert counted["examples_correct"] == 7.0 and counted["examples_correct_std"] == 1.0
    assert markdown_table({"a": counted}).splitlines()[-1] == (
        "| row | 3 | 0.800 ± 0.100 | 0.900 ± 0.000 | 6.00 ± 0.00 | 0.900 ± 0.000 | 0.800 ± 0.000 | 7, 6, 8 of 8 |")
    uncounted = over_seeds({0: run(0.7, 7), 1: run(0.8)})  # a run scored before examples were: no count at all
    assert "examples_correct" not in uncounted
    assert markdown_table({"a": uncounted}).splitlines()[-1].endswith("| 0.800 ± 0.000 | – |")


def test_the_readmes_ablation_table_is_the_shipped_ablation_json():
    """Every row of weights/shapes/ablation.json is in the README's world-v2 table with the numbers it holds."""
    import json
    from pathlib import Path

    from training.shapes.ablate import VARIANTS, full_length_lines, markdown_table

    root = Path(__file__).resolve().parents[1]
    ablation = json.loads((root / "weights" / "shapes" / "ablation.json").read_text())
    assert list(ablation["rows"]) == [v.name for v in VARIANTS]  # every row the ablation knows was run
    assert [row["description"] for row in ablation["rows"].values()] == [v.description for v in VARIANTS]
    trained = {v.name for v in VARIANTS if v.trained}
    assert all(len(row["seeds"]) == 3 for name, row in ablation["rows"].items() if name in trained)
    readme = (root / "README.md").read_text()
    v2 = readme[readme.index("### Ablations"):readme.index("### History")]
    assert all(line in v2 for line in markdown_table(ablation["rows"]).splitlines())
    full_length = ablation["full_length"]  # rows retrained at the build's own length, three seeds each
    assert full_length["rows"] and all(len(row["seeds"]) == 3 for row in full_length["rows"].values())
    assert all(line in v2 for line in full_length_lines(full_length))
    tomcap = ablation["tomcap_full_length"]  # TOMCap's rows at its 2400 steps, three seeds each
    recipe_rows = {"gap-none", "noise-scale-4"}  # no gap handling, the recipe's; and its two noises apart
    assert set(tomcap["rows"]) == recipe_rows | {"noise-4-query-0", "noise-4-query-0.5"}
    assert tomcap["tomcap_steps"] == ShapesRecipe.full().tomcap_steps
    assert all(len(row["seeds"]) == 3 for row in tomcap["rows"].values())
    assert all(line in v2 for line in full_length_lines(tomcap))
    # at twice that length: no handling, the recipe, 0.5 x on its queries, the paper's, half the recipe's input noise
    twice = ablation["tomcap_twice_length"]
    assert set(twice["rows"]) == recipe_rows | {"noise-4-query-0.5", "gap-mean-std-noise", "noise-2-query-0.5"}
    assert twice["tomcap_steps"] == 2 * tomcap["tomcap_steps"]
    assert all(len(row["seeds"]) == 3 for row in twice["rows"].values())
    assert all(line in v2 for line in full_length_lines(twice))
    assert "(2 x TOMCap's length in the build)" in full_length_lines(twice)[0]
    five = ablation["tomcap_twice_length_five_seeds"]  # no handling and the paper's there: those runs and two more
    assert set(five["rows"]) == {"gap-none", "gap-mean-std-noise"} and five["tomcap_steps"] == twice["tomcap_steps"]
    assert all(list(row["seeds"]) == ["0", "1", "2", "3", "4"] for row in five["rows"].values())
    assert all(row["seeds"][seed] == twice["rows"][name]["seeds"][seed] for name, row in five["rows"].items()
               for seed in ("0", "1", "2"))
    assert all(line in v2 for line in full_length_lines(five))
    assert full_length["maccap_steps"] == ShapesRecipe.full().maccap_steps
    half = ablation["maccap_half_length"]  # MacCap's two full-length rows at half their length (the recipe before)
    assert set(half["rows"]) == set(full_length["rows"]) and 2 * half["maccap_steps"] == full_length["maccap_steps"]
    assert all(len(row["seeds"]) == 3 for row in half["rows"].values())
    assert all(line in v2 for line in full_length_lines(half))
    assert "(0.5 x MacCap's length in the build)" in full_length_lines(half)[0]


def test_shapes_lm_pretrains_the_changed_lm_and_scores_the_builds_lm_as_shapes_eval_does(reproduction, report,
                                                                                        tmp_path, capsys):
    """``python -m training shapes-lm``: the changed settings reach pretraining, and its reference row (the build's
    own LM on the true captions) is shapes-eval's ``frozen_lm_true_captions`` on the same scenes."""
    import json

    from training.__main__ import main

    work = reproduction[0] / "work"
    argv = ["shapes-lm", "--smoke", "--work-dir", str(work), "--recipe-set", "lm_steps=4", "--set", "answer_weight=2",
            "--train-set", "lr=0.001", "--train-set", "log_every=1", "--n", str(N_TEST), "--seed", str(TEST_SEED),
            "--run-dir", str(tmp_path / "run"), "--threads", "1", "--json"]
    assert main(argv) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["steps"] == 4 and printed["lm"]["answer_weight"] == 2 and printed["lm_steps"] == 4
    assert printed["training"]["lr"] == 0.001 and printed["training"]["warmup_steps"] == 1  # 10 % of 4 steps, >= 1
    history = json.loads((tmp_path / "run" / "history.json").read_text())["train"]
    assert len(history) == 4 and max(row["lr"] for row in history) == pytest.approx(0.001)  # the lr that trained
    assert printed["true_captions"]["n"] == printed["build_lm_true_captions"]["n"] == report["vqa"]["n"]
    assert printed["build_lm_true_captions"]["accuracy"] == report["vqa"]["frozen_lm_true_captions"]["accuracy"]
    assert main(["shapes-lm", "--smoke", "--work-dir", str(work), "--recipe-set", "maccap_steps=3"]) == 1
    assert "--recipe-set takes lm_steps" in capsys.readouterr().err
    assert main(["shapes-lm", "--smoke", "--work-dir", str(work), "--train-set", "learning_rate=0.1"]) == 1
    assert "learning_rate" in capsys.readouterr().err


def test_seed_reseeds_every_stage_and_clip_set_changes_the_clip_as_the_bundle_records(monkeypatch, tmp_path, capsys):
    from training.shapes import build as build_module

    shipped, other = ShapesRecipe.full(), ShapesRecipe.full().with_training_seed(3)
    assert (shipped.seed, shipped.clip.init_seed, shipped.clip.train.seed) == (0, 1, 1)  # the shipped bundle's
    assert (other.seed, other.clip.init_seed, other.clip.train.seed) == (3, 4, 4)  # the CLIP's draw moves along
    assert other.world == shipped.world  # the same images, corpus and examples
    assert other.replace(seed=0, clip=shipped.clip) == shipped  # and nothing else changed
    assert other.with_training_seed(3) == other and other.with_training_seed(0) == shipped  # redrawn, not compounded
    built = {}
    monkeypatch.setattr(build_module, "build", lambda recipe, out, work, **kw: built.update(recipe=recipe, **kw))
    assert build_module.main(["--smoke", "--seed", "3", "--clip-set", "text_layers=4", "--work-dir", str(tmp_path),
                              "--out", str(tmp_path)]) == 0
    assert built["recipe"].seed == 3 and built["recipe"].clip.init_seed == 3 and built["recipe"].clip.train.seed == 3
    assert built["recipe"].clip == ShapesRecipe.smoke().with_training_seed(3).clip.replace(text_layers=4)
    assert built["command"] == "python -m training shapes --seed 3 --clip-set text_layers=4"  # what the bundle records
    from training.__main__ import main

    assert main(["shapes", "--smoke", "--clip-set", "text_layer=4", "--out", str(tmp_path)]) == 1  # one line
    assert "--clip-set: unknown field(s) text_layer" in capsys.readouterr().err


def test_clip_train_set_and_lead_method_change_only_what_they_name(monkeypatch, tmp_path, capsys):
    """``--clip-train-set epochs=6`` trains the recipe's CLIP longer and keeps every other training field (its lr,
    batch, schedule) the recipe's; the bundle records the flag, and a misspelt field fails in one line."""
    from training.shapes import build as build_module

    built = {}
    monkeypatch.setattr(build_module, "build", lambda recipe, out, work, **kw: built.update(recipe=recipe, **kw))
    assert build_module.main(["--smoke", "--clip-set", "image_views=0.25", "--clip-train-set", "epochs=6",
                              "--lead-method", "tomcap", "--work-dir", str(tmp_path), "--out", str(tmp_path)]) == 0
    smoke = ShapesRecipe.smoke().clip
    assert built["recipe"].clip == smoke.replace(image_views=0.25, train=smoke.train.replace(epochs=6))
    assert smoke.train.epochs != 6 and smoke.train.lr == built["recipe"].clip.train.lr
    assert built["recipe"].lead_method == "tomcap" == ShapesRecipe.full().lead_method  # world v2's lead
    assert ShapesRecipe.world_v1().lead_method is None  # world v1 shipped MacCap first
    assert built["command"] == ("python -m training shapes --clip-set image_views=0.25 --clip-train-set epochs=6 "
                                "--lead-method tomcap")
    from training.__main__ import main

    assert main(["shapes", "--smoke", "--clip-train-set", "epoch=6", "--out", str(tmp_path)]) == 1
    assert "--clip-train-set: unknown field(s) epoch" in capsys.readouterr().err


def test_method_args_reach_the_training_commands_and_the_ablation_names_the_same_trial(monkeypatch, tmp_path,
                                                                                       capsys):
    """``--method-args`` appends to a method's recipe arguments (the last of a repeated flag wins in its command),
    the bundle records it, shapes-ablate builds the same trial recipe from the same flags, and a misspelt flag
    fails in one line before any stage runs."""
    from training.shapes import ablate
    from training.shapes import build as build_module
    from training.shapes.build import maccap_command
    from training.maccap import build_parser

    built = {}
    monkeypatch.setattr(build_module, "build", lambda recipe, out, work, **kw: built.update(recipe=recipe, **kw))
    flags = ["--clip-set", "vision_pos_embed=sin_cos_2d", "--method-args", "maccap=--noise-variance 0.01"]
    assert build_module.main(["--smoke", *flags, "--work-dir", str(tmp_path), "--out", str(tmp_path)]) == 0
    recipe = built["recipe"]
    smoke = ShapesRecipe.smoke()
    assert recipe.maccap_args == (*smoke.maccap_args, "--noise-variance", "0.01")
    assert recipe.tomcap_args == smoke.tomcap_args and recipe.clip.vision_pos_embed == "sin_cos_2d"
    assert built["command"] == ("python -m training shapes --clip-set vision_pos_embed=sin_cos_2d "
                                "--method-args 'maccap=--noise-variance 0.01'")
    command = maccap_command(recipe, tmp_path, out=tmp_path / "out", run_dir=tmp_path / "run")
    assert build_parser().parse_args(command[1:]).noise_variance == 0.01  # what MacCap trains with
    seen = {}

    def run_variant(variant, *, recipe, **kw):  # what the ablation's rows would train on
        seen["recipe"] = recipe
        return {"group": variant.group, "description": variant.description, **{k: 0.5 for k in ablate.REPORTED}}

    monkeypatch.setattr(ablate.StageOutputs, "require_finished", lambda self: None)
    monkeypatch.setattr(ablate, "run_variant", run_variant)
    assert ablate.main(["--smoke", *flags, "--work-dir", str(tmp_path), "--only", "maccap-s1", "--json"]) == 0
    assert seen["recipe"] == ShapesRecipe.smoke().replace(clip=recipe.clip.replace(threads=smoke.clip.threads),
                                                          maccap_args=recipe.maccap_args)
    capsys.readouterr()
    from training.__main__ import main

    assert main(["shapes", "--smoke", "--method-args", "maccap=--noise-varience 0.01", "--out", str(tmp_path)]) == 1
    assert "--method-args maccap: " in (err := capsys.readouterr().err) and "--noise-varience" in err
    assert len(err.strip().splitlines()) == 1
    assert main(["shapes", "--smoke", "--method-args", "mapcap=--steps 3", "--out", str(tmp_path)]) == 1
    assert "METHOD one of maccap, tomcap, capdec, got 'mapcap=--steps 3'" in capsys.readouterr().err


def test_a_work_dir_is_resumed_only_with_the_recipe_that_made_it(tmp_path):
    from training.shapes.build import claim_work_dir

    recipe = ShapesRecipe.smoke()
    claim_work_dir(recipe, tmp_path)
    claim_work_dir(ShapesRecipe.smoke(), tmp_path)  # the same recipe again: a resume
    with pytest.raises(ValueError, match=r"another recipe \(clip, seed differ\)"):
        claim_work_dir(recipe.with_training_seed(1), tmp_path)  # would mix seed 0's CLIP with seed 1's methods
    with pytest.raises(ValueError, match=r"another recipe \(tomcap_steps differ\)"):
        claim_work_dir(recipe.replace(tomcap_steps=recipe.tomcap_steps + 1), tmp_path)


def test_a_work_dir_made_before_a_recipe_field_existed_resumes_at_its_default(tmp_path):
    from training.shapes.build import claim_work_dir

    recipe = ShapesRecipe.smoke()
    claim_work_dir(recipe, tmp_path)
    recorded = json.loads((tmp_path / "recipe.json").read_text())
    assert recipe.clip.mismatched == TinyClipConfig.mismatched == 0.0
    del recorded["clip"]["mismatched"]  # as a work dir made before the field existed recorded it
    (tmp_path / "recipe.json").write_text(json.dumps(recorded))
    claim_work_dir(recipe, tmp_path)  # a resume: the missing field is its default
    with pytest.raises(ValueError, match=r"another recipe \(clip differ\)"):
        claim_work_dir(recipe.replace(clip=recipe.clip.replace(mismatched=0.03)), tmp_path)
    recorded["clip"]["patch_dropout"] = 0.5  # a field this code does not know
    (tmp_path / "recipe.json").write_text(json.dumps(recorded))
    with pytest.raises(ValueError, match=r"another recipe .*patch_dropout.*--fresh"):
        claim_work_dir(recipe, tmp_path)


def test_an_ablation_rows_key_holds_what_it_trains_on():
    """A trained row is keyed by the recipe less the lead, the methods' step counts (its own steps are in the key
    beside it) and the other methods' arguments: lengthening or retuning one method in the recipe keeps the other
    methods' rows' caches; another seed, or a setting of the row's own method, does not."""
    from training.shapes.ablate import TRAINED_METHODS, trained_recipe

    recipe = ShapesRecipe.full()
    lengthened = recipe.replace(maccap_steps=recipe.maccap_steps * 2, tomcap_steps=7, capdec_steps=9,
                                lead_method="maccap", tomcap_select_by="beam")
    retuned = recipe.replace(tomcap_args=recipe.tomcap_args[:-2])
    for method in TRAINED_METHODS:
        assert trained_recipe(lengthened, method) == trained_recipe(recipe, method)
        assert trained_recipe(recipe.with_training_seed(1), method) != trained_recipe(recipe, method)
        assert (trained_recipe(retuned, method) == trained_recipe(recipe, method)) == (method != "tomcap")
        kept = set(trained_recipe(recipe, method))
        assert kept & {f"{m}_args" for m in TRAINED_METHODS} == {f"{method}_args"}
        assert not {"lead_method", "maccap_steps", "tomcap_steps", "capdec_steps"} & kept


def test_a_recipe_refuses_an_unknown_lead_or_tomcap_pick_in_one_line():
    with pytest.raises(ValueError, match=r"^ShapesRecipe.lead_method must be one of maccap, tomcap, capdec or null, "
                                         r"got 'vibes'$"):
        ShapesRecipe(lead_method="vibes")
    with pytest.raises(ValueError, match=r"^ShapesRecipe.tomcap_select_by must be one of clip, beam or null, "
                                         r"got 'vibes'$"):
        ShapesRecipe(tomcap_select_by="vibes")
    assert ShapesRecipe(tomcap_select_by=None).tomcap_select_by is None  # null: the trained config's pick
