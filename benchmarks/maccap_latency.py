"""MacCap latency per image: capdemo's batched path against the reference code's sequential order of work.

    python -m benchmarks.maccap_latency [--quick] [--json] [--device cuda --dtype bf16]

Both paths run in this process on the same random real-size models (ViT-B/32 +
GPT-2 base on CPU, + OPT-1.3b on CUDA), the same pixels and the same seed:

* batched (:func:`capdemo.methods.maccap.inference.caption_images`): one vision-tower
  pass, S noisy samples decoded by one ``generate`` over B x S prompts, one
  CLIP text call for all B x S candidates;
* sequential (:func:`capdemo.methods.maccap.inference.sequential_reference`): what the
  official code does, S ``generate`` calls each after a fresh vision-tower pass,
  one more pass for the rerank, one text-encoder call per image.

Every beam generates exactly 16 tokens (EOS masked until the cap), so the two
paths decode the same tokens and return the same candidates; the benchmark
checks that on every case and reports ``same_candidates``. Reported: seconds
per image (median over interleaved repeats), the ratio sequential / batched,
vision-tower passes per image and the per-stage split. Cases: S = 20 and S = 1
at batch 1 with the real-size models, and a batch-size sweep (1/8/32) at S = 20
(real-size in the full run; the tiny test models in ``--quick``, where 32
images x 20 samples of the real models would take tens of minutes on a CPU).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any
from collections.abc import Callable

import torch

from benchmarks import common
from benchmarks.models import MacCapStack, fix_generation_length, maccap_stack, random_pixels
from capdemo.methods.maccap.inference import MacCapOptions, caption_images, sequential_reference
from capdemo.result import Result
from capdemo.timing import StageTimer

NAME = "maccap_latency"
SAMPLES = 20  # S, the paper's number of noisy samples
BEAMS = 4  # beam width per sample (paper)
NEW_TOKENS = 16  # tokens generated per beam (the reference code's cap), fixed on both paths
TARGET_SPEEDUP = 4.0  # issue #7: batched >= 4x faster than sequential at S = 20 on CPU
SCORE_TOLERANCE = 1e-4  # CLIP cosines of the same text and image agree to this across the two paths
LM_BY_DEVICE = {"cpu": "gpt2", "cuda": "opt-1.3b"}  # the real-size LM each device is benchmarked with
SEED = 0


@dataclass(frozen=True)
class Case:
    """One measured setting: noisy samples S, images per call B, and timed runs of each path."""

    samples: int
    batch: int
    repeats: int = 1


@dataclass(frozen=True)
class Plan:
    """The cases a mode measures, and how often."""

    headline: tuple[Case, ...]  # measured with the real-size models (tiny in tiny mode)
    sweep: tuple[Case, ...]  # the batch-size sweep
    sweep_tiny: bool  # the sweep uses the tiny models


def plan_for(settings: common.Settings) -> Plan:
    """S = 20 is long with the real models (one run each in --quick); S = 1 is cheap, so it gets more repeats."""
    if settings.tiny:
        return Plan(headline=(Case(SAMPLES, 1), Case(1, 1)), sweep=(Case(SAMPLES, 1), Case(SAMPLES, 2)),
                    sweep_tiny=True)
    if settings.quick:
        return Plan(headline=(Case(SAMPLES, 1), Case(1, 1, repeats=3)),
                    sweep=tuple(Case(SAMPLES, batch, repeats=2) for batch in (1, 8, 32)), sweep_tiny=True)
    return Plan(headline=(Case(SAMPLES, 1, repeats=3), Case(1, 1, repeats=5)),
                sweep=(Case(SAMPLES, 8), Case(SAMPLES, 32)), sweep_tiny=False)


def same_candidates(first: list[Result], second: list[Result], *, atol: float = SCORE_TOLERANCE) -> bool:
    """Both paths gave every image the same candidate texts per noisy sample, with CLIP scores within ``atol``."""
    if len(first) != len(second):
        return False
    for a, b in zip(first, second):
        by_sample_a = {c.sample: c for c in a.candidates}
        by_sample_b = {c.sample: c for c in b.candidates}
        if by_sample_a.keys() != by_sample_b.keys():
            return False
        for sample, candidate in by_sample_a.items():
            other = by_sample_b[sample]
            if candidate.text != other.text or abs(candidate.clip_score - other.clip_score) > atol:
                return False
    return True


class CountedCall:
    """A call that remembers how many images its last run pushed through the vision tower."""

    def __init__(self, stack: MacCapStack, call: Callable[[], list[Result]]):
        self.stack, self.call = stack, call
        self.images_encoded = 0

    def __call__(self) -> list[Result]:
        before = self.stack.encoder.images_encoded
        out = self.call()
        self.images_encoded = self.stack.encoder.images_encoded - before
        return out


def batched(stack: MacCapStack, pixels: torch.Tensor, options: MacCapOptions) -> list[Result]:
    """capdemo's order of work: one timed vision-tower pass (as the facade runs it), then the batched method."""
    timer = StageTimer(stack.model.device)
    with timer("encode"):
        features = stack.encoder.encode_images(pixels)
    results = caption_images(stack.model, stack.encoder, features, options)
    for result in results:
        result.timings_ms = {**timer.per_image(len(results)), **result.timings_ms}
    return results


def warm_up(stack: MacCapStack, pixels: torch.Tensor) -> None:
    """One cheap call of each path: lazy initialisation (kernels, caches) stays out of the timings."""
    short = MacCapOptions(samples=1, beams=BEAMS, max_new_tokens=2, seed=SEED)
    fix_generation_length(stack.model.lm, 2)
    try:
        batched(stack, pixels[:1], short)
        sequential_reference(stack.model, stack.encoder, pixels[:1], short)
    finally:
        fix_generation_length(stack.model.lm, NEW_TOKENS)


def measure(stack: MacCapStack, case: Case, settings: common.Settings) -> dict[str, Any]:
    """Both paths on B random images at S samples: seconds per image, speedup, equality, tower passes, stages."""
    pixels = random_pixels(case.batch, tiny=stack.architecture == "tiny", seed=SEED, device=settings.device)
    options = MacCapOptions(samples=case.samples, beams=BEAMS, max_new_tokens=NEW_TOKENS, seed=SEED)
    calls = {
        "batched": CountedCall(stack, lambda: batched(stack, pixels, options)),
        "sequential": CountedCall(stack, lambda: sequential_reference(stack.model, stack.encoder, pixels, options)),
    }
    timings, outputs = common.time_calls(calls, warmup=0, repeats=case.repeats, device=settings.device)
    per_image = {name: timing.to_dict(per=case.batch) for name, timing in timings.items()}
    return {
        "architecture": stack.architecture,
        "samples": case.samples,
        "batch": case.batch,
        **per_image,
        "speedup": round(timings["sequential"].median / timings["batched"].median, 3),
        "same_candidates": same_candidates(outputs["batched"], outputs["sequential"]),
        "vision_passes_per_image": {name: call.images_encoded / case.batch for name, call in calls.items()},
        "stage_ms_per_image": {  # each Result carries its own share of the batch's stages
            name: {stage: round(ms, 1) for stage, ms in outputs[name][0].timings_ms.items()} for name in calls
        },
    }


def build(settings: common.Settings, *, tiny: bool) -> MacCapStack:
    return maccap_stack(tiny=tiny, lm=LM_BY_DEVICE[settings.device], samples=SAMPLES, beams=BEAMS,
                        new_tokens=NEW_TOKENS, device=settings.device, dtype=settings.torch_dtype, seed=SEED)


def run(*, quick: bool = False, tiny: bool = False, device: str = "cpu", dtype: str = "fp32") -> dict[str, Any]:
    """Measure the plan's cases; ``speedup_vs_sequential`` is the S = 20, batch-1 ratio."""
    started = time.perf_counter()
    settings = common.Settings(quick=quick, tiny=tiny, device=device, dtype=dtype)
    plan = plan_for(settings)
    with common.PeakMemory(settings.device) as memory:
        stack = build(settings, tiny=tiny)
        warm_up(stack, random_pixels(1, tiny=tiny, seed=SEED, device=device))
        headline = [measure(stack, case, settings) for case in plan.headline]
        if plan.sweep_tiny != tiny:
            stack = build(settings, tiny=plan.sweep_tiny)
            warm_up(stack, random_pixels(1, tiny=plan.sweep_tiny, seed=SEED, device=device))
        sweep = [measure(stack, case, settings) for case in plan.sweep]
    main_case = headline[0]
    figures = {
        "architecture": main_case["architecture"],
        "beams": BEAMS,
        "new_tokens": NEW_TOKENS,
        "speedup_vs_sequential": main_case["speedup"],
        "batched_s_per_image": main_case["batched"]["median_s"],
        "sequential_s_per_image": main_case["sequential"]["median_s"],
        "target_speedup": TARGET_SPEEDUP,
        "meets_target": main_case["speedup"] >= TARGET_SPEEDUP,
        "same_candidates": all(case["same_candidates"] for case in headline + sweep),
        "cases": headline,
        "batch_sweep": sweep,
        "memory": memory.to_dict(),
    }
    return common.envelope(NAME, settings, figures, started=started)


def summary(result: dict[str, Any]) -> str:
    """The headline figures in one line (for the results table)."""
    cases = "; ".join(
        f"S={c['samples']} B={c['batch']} ({'tiny' if c['architecture'] == 'tiny' else 'real'}): "
        f"{c['batched']['median_s']:.3g} vs {c['sequential']['median_s']:.3g} s/img = {c['speedup']:.2f}x"
        for c in result["cases"] + result["batch_sweep"]
    )
    return (f"{result['architecture']}, beams {result['beams']}, {result['new_tokens']} tokens: "
            f"speedup {result['speedup_vs_sequential']:.2f}x (target {result['target_speedup']:g}x), "
            f"same candidates {result['same_candidates']}. {cases}")


def main(argv: list[str] | None = None) -> int:
    return common.benchmark_main(NAME, run, summary, description=__doc__.split("\n\n")[0], argv=argv)


if __name__ == "__main__":
    raise SystemExit(main())
