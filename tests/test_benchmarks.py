"""The benchmarks compare equal work and report what they claim: equality of the two MacCap paths, fixed
generation length, the timing/percentile/table helpers, and the JSON each benchmark prints (tiny mode)."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch

from benchmarks import (common, maccap_latency, serving_precision, shapes_build, throughput, tomcap_latency,
                        training_throughput)
from benchmarks import run as runner
from benchmarks.models import fix_generation_length, maccap_stack, random_pixels, synthetic_tokenizer
from capdemo.lm import generate_from_embeds
from capdemo.methods.maccap.inference import MacCapOptions, sequential_reference
from capdemo.result import Candidate, Result

SAMPLES, BEAMS, NEW_TOKENS, BATCH = 6, 2, 5, 2


@pytest.fixture(scope="module")
def stack():
    return maccap_stack(tiny=True, samples=SAMPLES, beams=BEAMS, new_tokens=NEW_TOKENS, seed=0)


# --- the two MacCap paths do the same work ---------------------------------------------------------------


def test_batched_and_sequential_paths_return_identical_candidates(stack):
    pixels = random_pixels(BATCH, tiny=True, seed=3)
    options = MacCapOptions(samples=SAMPLES, beams=BEAMS, max_new_tokens=NEW_TOKENS, seed=7)
    encoded = stack.encoder.images_encoded
    batched = maccap_latency.batched(stack, pixels, options)
    batched_passes = stack.encoder.images_encoded - encoded
    sequential = sequential_reference(stack.model, stack.encoder, pixels, options)
    sequential_passes = stack.encoder.images_encoded - encoded - batched_passes

    assert len(batched) == len(sequential) == BATCH
    for fast, slow in zip(batched, sequential):
        assert len(fast.candidates) == SAMPLES
        assert [c.text for c in fast.candidates] == [c.text for c in slow.candidates]
        assert [c.sample for c in fast.candidates] == [c.sample for c in slow.candidates]
        assert sorted(c.sample for c in fast.candidates) == list(range(SAMPLES))
        np.testing.assert_allclose([c.clip_score for c in fast.candidates], [c.clip_score for c in slow.candidates],
                                   atol=1e-5)
        assert fast.caption == slow.caption
    assert maccap_latency.same_candidates(batched, sequential)
    assert batched_passes == BATCH  # one vision-tower pass per image
    assert sequential_passes == (SAMPLES + 1) * BATCH  # the reference: one per sample, one more for the rerank


def _result(*candidates: tuple[str, float, int]) -> Result:
    items = [Candidate(text=t, clip_score=s, sample=j) for t, s, j in candidates]
    return Result(caption=items[0].text, method="maccap", candidates=items)


def test_same_candidates_notices_a_different_text_score_or_sample():
    reference = [_result(("a red circle", 0.30, 1), ("a blue square", 0.20, 0))]
    reordered = [_result(("a blue square", 0.20, 0), ("a red circle", 0.30, 1))]
    same = maccap_latency.same_candidates
    assert same(reference, reordered)  # matched by sample, not by position
    assert same(reference, [_result(("a red circle", 0.30005, 1), ("a blue square", 0.2, 0))])  # within 1e-4
    assert not same(reference, [_result(("a red square", 0.30, 1), ("a blue square", 0.2, 0))])
    assert not same(reference, [_result(("a red circle", 0.31, 1), ("a blue square", 0.2, 0))])
    assert not same(reference, [_result(("a red circle", 0.30, 2), ("a blue square", 0.2, 0))])
    assert not same(reference, reference * 2)


def test_fixed_generation_length_runs_every_beam_to_the_cap(stack):
    lm, tokenizer = stack.model.lm, stack.model.tokenizer
    prompt = torch.randn(3, 4, lm.config.n_embd, generator=torch.Generator().manual_seed(0))  # (N, P, E)
    fix_generation_length(lm, 9)
    try:
        ids = generate_from_embeds(lm, prompt, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                                   beams=3, num_return_sequences=3, max_new_tokens=9)
    finally:
        fix_generation_length(lm, NEW_TOKENS)
    assert ids.shape == (9, 9)
    assert not (ids == tokenizer.eos_token_id).any()
    assert not (ids == tokenizer.pad_token_id).any()


def test_synthetic_tokenizer_has_the_lm_vocabulary_and_decodes_every_id():
    tokenizer = synthetic_tokenizer(300, eos_id=299, pad_id=1)
    assert len(tokenizer) == 300
    assert tokenizer.eos_token_id == 299 and tokenizer.pad_token_id == 1 and tokenizer.unk_token_id == 0
    assert tokenizer("w5 w7 unheard", add_special_tokens=False)["input_ids"] == [5, 7, 0]
    assert tokenizer.decode([5, 7, 298]) == "w5 w7 w298"
    assert tokenizer.decode([5, 299, 1], skip_special_tokens=True) == "w5"
    with pytest.raises(ValueError, match="id 0"):
        synthetic_tokenizer(300, eos_id=0)


# --- helpers ------------------------------------------------------------------------------------------------


def test_time_calls_warms_up_interleaves_and_reports_the_median():
    now, order = [0.0], []
    durations = {"a": iter([9.0, 1.0, 3.0, 2.0]), "b": iter([9.0, 10.0, 30.0, 20.0])}  # first of each: warm-up

    def call(name):
        def go():
            order.append(name)
            now[0] += next(durations[name])
            return name.upper()
        return go

    timings, outputs = common.time_calls({"a": call("a"), "b": call("b")}, warmup=1, repeats=3, clock=lambda: now[0])
    assert order == ["a", "b"] * 4
    assert timings["a"].samples == (1.0, 3.0, 2.0) and timings["a"].median == 2.0
    assert timings["b"].median == 20.0
    assert timings["b"].to_dict(per=10) == {"median_s": 2.0, "min_s": 1.0, "max_s": 3.0, "repeats": 3}
    assert outputs == {"a": "A", "b": "B"}
    with pytest.raises(common.BenchmarkError, match="repeats"):
        common.time_calls({"a": call("a")}, repeats=0)


@pytest.mark.parametrize("q", [0, 25, 50, 90, 95, 100])
def test_percentile_is_numpys_linear_percentile(q):
    values = [0.31, 4.0, 1.5, 2.25, 9.0, 0.7, 3.3]
    assert common.percentile(values, q) == pytest.approx(np.percentile(values, q))


def test_results_rows_go_at_the_end_of_the_table(tmp_path):
    readme = tmp_path / "README.md"
    table_lines = [common.TABLE_START, "| a | b |", "|---|---|", "| old | row |", common.TABLE_END]
    readme.write_text("# B\n\n" + "\n".join(table_lines) + "\n\nAfter.\n")
    info = {"cpu": "CPU X", "cores": 2, "load_average": [3.25, 1, 1]}
    row = common.results_row(benchmark="maccap_latency", figures="2.1x | fast", command="python run.py",
                             machine_info=info, date="2026-01-02 03:04")
    common.append_results_rows([row, row.replace("2.1x", "2.2x")], readme)
    text = readme.read_text()
    table = text.split(common.TABLE_START)[1].split(common.TABLE_END)[0].strip().splitlines()
    assert table[2] == "| old | row |"
    assert table[3] == ("| 2026-01-02 03:04 | CPU X, 2 cores, no GPU, load 3.2 | `python run.py` | maccap_latency "
                        "| 2.1x \\| fast |")
    assert "2.2x" in table[4] and len(table) == 5
    assert text.startswith("# B\n") and text.endswith(f"{common.TABLE_END}\n\nAfter.\n")

    fresh = tmp_path / "NEW.md"
    common.append_results_rows([row], fresh)
    lines = fresh.read_text().split(common.TABLE_START)[1].split(common.TABLE_END)[0].strip().splitlines()
    assert lines[0].startswith("| date (UTC) |") and lines[2] == row


def test_settings_refuse_what_cannot_run():
    with pytest.raises(common.BenchmarkError, match="fp16"):
        common.Settings(dtype="fp16")
    with pytest.raises(common.BenchmarkError, match="dtype"):
        common.Settings(dtype="fp8")
    with pytest.raises(common.BenchmarkError, match="device"):
        common.Settings(device="tpu")
    assert common.Settings(quick=True).mode == "quick" and common.Settings(quick=True, tiny=True).mode == "tiny"


def test_peak_memory_sees_a_temporary_allocation():
    with common.PeakMemory(poll_s=0.001) as memory:
        block = torch.ones(64 * 2**20 // 4)  # 64 MiB, written, so resident
        time.sleep(0.05)  # several samples while it is alive
        del block
    assert memory.delta_mb > 48
    assert memory.to_dict()["rss_peak_mb"] >= memory.to_dict()["rss_start_mb"]


# --- the JSON each benchmark prints ---------------------------------------------------------------------------


def test_maccap_benchmark_reports_the_speedup_of_equal_work():
    result = maccap_latency.run(tiny=True)
    assert result["benchmark"] == "maccap_latency" and result["mode"] == "tiny"
    assert isinstance(result["speedup_vs_sequential"], float) and result["speedup_vs_sequential"] > 0
    assert result["same_candidates"] is True
    assert isinstance(result["meets_target"], bool) and result["target_speedup"] == maccap_latency.TARGET_SPEEDUP
    first = result["cases"][0]
    assert (first["samples"], first["batch"]) == (maccap_latency.SAMPLES, 1)
    assert first["speedup"] == result["speedup_vs_sequential"]
    assert first["speedup"] == pytest.approx(first["sequential"]["median_s"] / first["batched"]["median_s"], rel=0.01)
    assert first["vision_passes_per_image"] == {"batched": 1.0, "sequential": maccap_latency.SAMPLES + 1.0}
    assert set(first["stage_ms_per_image"]["batched"]) == {"encode", "aggregate", "adaptor", "generate", "rerank"}
    assert [c["batch"] for c in result["batch_sweep"]] == [1, 2]
    assert len(result["machine"]["load_average"]) == 3 and result["machine"]["cores"] >= 1
    assert result["memory"]["rss_peak_mb"] >= result["memory"]["rss_start_mb"] > 0
    assert "speedup" in maccap_latency.summary(result)


def test_tomcap_benchmark_times_both_datastores():
    result = tomcap_latency.run(tiny=True)
    assert [case["batch"] for case in result["cases"]] == [1, 4]
    for case in result["cases"]:
        for kind in tomcap_latency.STORE_KINDS:
            assert case[kind]["median_s"] > 0
            assert set(case[kind]["stage_ms_per_image"]) == {"encode", "retrieve", "generate", "rerank"}
    assert result["stores"][0]["ivfpq_spec"]["kind"] == "ivfpq"


def test_throughput_benchmark_times_every_method_of_the_bundle():
    from capdemo.testing import TINY_MACCAP, TINY_TOMCAP

    result = throughput.run(tiny=True)
    (entry,) = result["runs"]
    assert entry["models"] == "bundle tiny"
    for method in ("maccap", "tomcap"):
        assert entry[method]["images"] == throughput.plan_for(common.Settings(tiny=True)).bundle_images
        assert entry[method]["images_per_s"] == pytest.approx(entry[method]["images"] / entry[method]["seconds"],
                                                              rel=0.02)
    assert entry["decoding"]["maccap"]["samples"] == TINY_MACCAP["samples"]
    assert entry["decoding"]["tomcap"]["k"] == TINY_TOMCAP["k"]


def test_training_benchmark_compares_cached_and_on_the_fly_embeddings():
    result = training_throughput.run(tiny=True)
    for method in ("maccap", "tomcap"):
        entry = result[method]
        for variant in training_throughput.VARIANTS:
            assert entry[variant]["captions_per_s"] > 0 and entry[variant]["trainable_parameters"] > 0
            assert "rss_peak_mb" in entry[variant]["memory"]
        assert entry["cached_speedup"] == pytest.approx(  # the benchmark rounds it to 3 decimals
            entry["cached"]["captions_per_s"] / entry["on_the_fly"]["captions_per_s"], rel=0.01, abs=5e-4)
    assert result["cache_build_s"] > 0 and result["corpus_captions"] == 8 * 3


def test_build_benchmark_times_both_schedules_of_one_recipe_and_compares_their_bytes():
    result = shapes_build.run(tiny=True)
    serial, side_by_side = result["one_after_another"], result["side_by_side"]
    assert (serial["jobs"], side_by_side["jobs"]) == (1, 2)
    assert result["speedup"] == pytest.approx(serial["wall_s"] / side_by_side["wall_s"], rel=0.01)
    assert set(side_by_side["stage_wall_s"]) >= {"clip", "lm", "maccap", "tomcap", "capdec"}
    assert result["same_bytes"] is True and result["files_compared"] >= 30  # weights, tokenizers, examples, stores
    assert result["steps"]["lm"] == 10 and result["steps"]["clip_pairs"] == 1000  # a quarter of the smoke recipe's
    with pytest.raises(common.BenchmarkError, match="cuda|CUDA"):  # the recipe trains on the CPU only
        shapes_build.run(tiny=True, device="cuda")


def test_precision_benchmark_times_every_precision_and_scores_its_quality():
    result = serving_precision.run(tiny=True)
    for section in ("maccap", "tomcap"):
        entry = result[section]
        for precision in ("fp32", "bf16", "int8"):
            assert entry[f"{precision}_s"] == entry["timings"][precision]["median_s"] > 0
        for precision in ("bf16", "int8"):
            assert entry[f"speedup_{precision}"] == pytest.approx(entry["fp32_s"] / entry[f"{precision}_s"], rel=0.02)
        assert entry["best_s"] == min(entry[f"{p}_s"] for p in ("fp32", "bf16", "int8"))
        assert entry["same_as_fp32"]["fp32"] == 1.0
        assert entry["reports"]["int8"]["model"]["quantized"]["Conv1D"] > 0
        assert entry["reports"]["bf16"]["encoder"]["kept_float"]["MultiheadAttention"] > 0
    quality = result["quality"]
    assert quality["bundle"] == "tiny"
    assert quality["n"] == serving_precision.plan_for(common.Settings(tiny=True)).quality_n
    for method in ("maccap", "tomcap"):
        assert quality[method]["fp32"]["loss"] == 0 and quality[method]["fp32"]["same_caption_as_fp32"] == 1
        for precision in ("bf16", "int8"):
            row = quality[method][precision]
            assert row["loss"] == pytest.approx(quality[method]["fp32"]["scene_accuracy"] - row["scene_accuracy"])
    (sweep,) = result["lms"]
    for precision in ("fp32", "bf16", "int8"):
        largest = sweep[precision]["largest_s"]
        assert largest["within_budget"] and largest["s"] <= serving_precision.BUDGET_S
        within = [int(s) for s, t in largest["measured"].items() if t <= serving_precision.BUDGET_S]
        assert largest["samples"] == max(within)
    assert sweep["speedup_int8"] == pytest.approx(sweep["fp32"]["s20_s"] / sweep["int8"]["s20_s"], rel=0.02)
    assert set(result["recommended"]) == {"maccap", "tomcap", "bundle"}
    assert isinstance(result["bf16_native"], bool) and "Recommended" in serving_precision.summary(result)


def test_recommended_precision_is_the_fastest_within_the_quality_limit():
    speed = {"maccap": {"fp32_s": 6.0, "bf16_s": 4.0, "int8_s": 2.0}, "tomcap": {"fp32_s": 4.0, "bf16_s": 5.0,
                                                                                 "int8_s": 3.0}}
    quality = {"maccap": {"fp32": {"loss": 0.0}, "bf16": {"loss": 0.004}, "int8": {"loss": 0.02}},
               "tomcap": {"fp32": {"loss": 0.0}, "bf16": {"loss": 0.0}, "int8": {"loss": 0.011}}}
    assert serving_precision.recommend(quality, speed) == {"maccap": "bf16", "tomcap": "fp32", "bundle": "bf16"}
    quality["maccap"]["int8"]["loss"] = 0.01  # the limit itself is allowed
    assert serving_precision.recommend(quality, speed)["maccap"] == "int8"
    quality["tomcap"]["int8"]["loss"] = -0.01  # int8 allowed everywhere: 5 s summed against fp32's 10, bf16's 9
    assert serving_precision.recommend(quality, speed) == {"maccap": "int8", "tomcap": "int8", "bundle": "int8"}


def test_paired_quality_loss_counts_scenes_lost_and_gained():
    from training.shapes import world
    from training.shapes.language import captions

    scenes = [scene for scene, _, _ in world.generate_pairs(4, seed=99, config=world.WorldConfig())]
    right = [captions(scene)[0] for scene in scenes]
    reference = [right[0], right[1], "nothing", right[3]]  # 3 of 4 right
    predictions = [right[0], "nothing", right[2], "nothing"]  # loses scenes 1 and 3, gains scene 2
    out = serving_precision.paired_loss(reference, predictions, scenes)
    assert (out["lost"], out["gained"], out["loss"]) == (2, 1, 0.25)
    assert out["loss_se"] == pytest.approx(np.sqrt((3 / 4 - 0.25**2) / 4), abs=1e-4)
    assert serving_precision.paired_loss(reference, reference, scenes) == {"loss": 0, "loss_se": 0, "lost": 0,
                                                                          "gained": 0}


@pytest.mark.parametrize("per_sample, largest", [(0.5, 18), (0.05, 64), (12.0, 1), (0.9, 10)])
def test_the_largest_s_within_the_budget_is_found_in_few_measurements(per_sample, largest):
    def seconds(samples):  # 1 s fixed + per_sample s per sample, a little worse than linear past S = 20
        return 1.0 + per_sample * samples * (1.0 + 0.002 * max(0, samples - 20))

    calls = []
    found = serving_precision.largest_within({1: seconds(1), 20: seconds(20)},
                                             lambda s: calls.append(s) or seconds(s), budget=10.0, steps=4, cap=64)
    brute = max((s for s in range(1, 65) if seconds(s) <= 10.0), default=1)
    assert found["samples"] == brute == largest
    assert found["within_budget"] is (seconds(largest) <= 10.0)
    assert len(calls) <= 4 and set(found["measured"]) == {"1", "20", *map(str, calls)}


def test_runner_records_only_when_asked(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(runner, "run_all", lambda names, settings, threads: {"mode": "quick", "machine": {},
                                                                          "failed": {}, "wall_s": 0.0})
    monkeypatch.setattr(runner, "record", lambda *args, **kwargs: calls.append(args))
    runner.main(["--quick", "--json", "--only", "maccap_latency"])
    assert calls == []
    runner.main(["--quick", "--json", "--only", "maccap_latency", "--record"])
    assert len(calls) == 1


def test_runner_prints_one_object_with_every_benchmark(tmp_path):
    settings = common.Settings(tiny=True)
    assert runner.arguments_for(runner.BY_NAME["maccap_latency"], settings, 2)[-1] == "--tiny"
    assert runner.arguments_for(runner.BY_NAME["datastore"], common.Settings(), 2) == []
    assert runner.parse_output('noise\n{"a": 1}\n') == {"a": 1}
    combined = runner.run_all(["maccap_latency"], settings)
    assert combined["failed"] == {}
    assert combined["maccap_latency"]["speedup_vs_sequential"] > 0
    readme = tmp_path / "README.md"
    runner.record(combined, ["maccap_latency"], "python benchmarks/run.py --tiny", readme=readme)
    assert "| maccap_latency |" in readme.read_text()


def test_the_recorded_load_is_the_one_before_the_benchmark_ran(monkeypatch):
    """A benchmark's own threads raise the load average: the table shows the load at its start."""
    loads = iter([(0.3, 0.5, 0.75), (2.0, 1.0, 1.0)])
    monkeypatch.setattr(common.os, "getloadavg", lambda: next(loads))
    settings = common.Settings()  # made when a benchmark starts
    result = common.envelope("x", settings, {}, started=0.0)  # after its work
    assert result["machine"]["load_average_at_start"] == [0.3, 0.5, 0.75]
    assert result["machine"]["load_average"] == [2.0, 1.0, 1.0]
    assert common.machine_label(result["machine"]).endswith("load 0.3")
