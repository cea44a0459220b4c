"""TOMCap latency per image (retrieval + generation + rerank), flat against compressed datastore.

    python -m benchmarks.tomcap_latency [--quick] [--json] [--device cuda --dtype bf16]

Random real-size models (ViT-B/32, GPT-2 base with cross-attention and LoRA
r = 32; K = 4 neighbours, 3 beams, exactly 25 new tokens per beam) caption
random images through :func:`capdemo.methods.tomcap.inference.caption_images` against two
datastores holding the same synthetic captions and unit vectors: exact
``flat`` and compressed ``ivfpq``. The two calls are timed interleaved; only
retrieval differs between them (the neighbours, hence the prompts, differ too,
but every prompt has the same length: each synthetic caption has the same
number of words). Cases: batch 1 and batch 32 (the tiny models, whose GPT-2 has
128 positions, use K = 2 and 6 tokens). ``--quick`` runs batch 1 with
the real-size models on a 10k-caption store and batch 32 with the tiny test
models (32 real-size images x 3 beams x 25 tokens twice would take minutes on a
CPU); the full run uses the real-size models and a 200k-caption store for both.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch

from benchmarks import common
from benchmarks.models import (
    CAPTION_WORDS,
    TINY_CAPTION_WORDS,
    TOMCapStack,
    caption_words,
    fix_generation_length,
    random_pixels,
    synthetic_datastore,
    tomcap_stack,
)
from capdemo.retrieval import CaptionDatastore
from capdemo.timing import StageTimer
from capdemo.methods.tomcap.inference import TOMCapOptions, caption_images

NAME = "tomcap_latency"
K = 4  # neighbours in the prompt and the memory (paper)
BEAMS = 3  # TOMCapConfig's default beam width
NEW_TOKENS = 25  # TOMCapConfig's default length cap, fixed for every beam
WARMUP_TOKENS = 2  # new tokens of the untimed warm-up call
TINY_K, TINY_NEW_TOKENS = 2, 6  # the tiny GPT-2 has 128 positions: a shorter prompt and caption
STORE_KINDS = ("flat", "ivfpq")
SEED = 0


@dataclass(frozen=True)
class Plan:
    real_batches: tuple[int, ...]  # batch sizes measured with the real-size models
    tiny_batches: tuple[int, ...]  # batch sizes measured with the tiny test models
    store_size: int  # captions in each datastore (ivfpq needs >= 9,984 to train its codebooks)
    repeats: int  # timed runs per store at batch 1
    batch_repeats: int  # timed runs per store at larger batches (32 real-size images take minutes on a CPU)

    def repeats_for(self, batch: int) -> int:
        return self.repeats if batch == 1 else self.batch_repeats


def plan_for(settings: common.Settings) -> Plan:
    if settings.tiny:
        return Plan(real_batches=(), tiny_batches=(1, 4), store_size=10_000, repeats=1, batch_repeats=1)
    if settings.quick:
        return Plan(real_batches=(1,), tiny_batches=(32,), store_size=10_000, repeats=1, batch_repeats=3)
    return Plan(real_batches=(1, 32), tiny_batches=(), store_size=200_000, repeats=3, batch_repeats=1)


def build_stores(stack: TOMCapStack, size: int) -> tuple[dict[str, CaptionDatastore], dict[str, float]]:
    """The same captions and vectors indexed flat and IVF-PQ; with each build's seconds."""
    stores, build_s = {}, {}
    tiny = stack.architecture == "tiny"
    words = caption_words(stack.model.tokenizer, tiny=tiny)
    for kind in STORE_KINDS:
        started = time.perf_counter()
        stores[kind] = synthetic_datastore(size, encoder_name=stack.encoder.name, dim=stack.encoder.embed_dim,
                                           kind=kind, words=words, length=TINY_CAPTION_WORDS if tiny else CAPTION_WORDS,
                                           seed=SEED)
        build_s[kind] = round(time.perf_counter() - started, 2)
    return stores, build_s


def per_image_stages(results: list) -> dict[str, float]:
    """Each stage's mean time per image over the batch (every Result carries its own share), in ms."""
    stages = results[0].timings_ms
    return {stage: round(sum(r.timings_ms[stage] for r in results) / len(results), 2) for stage in stages}


def caption_batch(stack: TOMCapStack, store: CaptionDatastore, pixels: torch.Tensor, options: TOMCapOptions) -> list:
    """One timed vision-tower pass (as the facade runs it), then the batched method."""
    timer = StageTimer(stack.model.device)
    with torch.inference_mode(), timer("encode"):
        embeds = stack.encoder.encode_image_embeds(pixels)  # (B, D)
    results = caption_images(stack.model, stack.encoder, store, embeds, embeds, options)
    for result in results:
        result.timings_ms = {**timer.per_image(len(results)), **result.timings_ms}
    return results


def warm_up(stack: TOMCapStack, store: CaptionDatastore, pixels: torch.Tensor) -> None:
    """One short call: lazy initialisation (kernels, caches) stays out of the timings."""
    fix_generation_length(stack.model.lm, WARMUP_TOKENS)
    try:
        config = stack.model.config
        caption_batch(stack, store, pixels, TOMCapOptions(k=config.k, beams=config.beams, max_new_tokens=WARMUP_TOKENS))
    finally:
        fix_generation_length(stack.model.lm, stack.model.config.max_new_tokens)


def measure(stack: TOMCapStack, stores: dict[str, CaptionDatastore], batch: int, *, repeats: int,
            settings: common.Settings) -> dict[str, Any]:
    """Seconds per image with each store, and the per-stage split of each."""
    pixels = random_pixels(batch, tiny=stack.architecture == "tiny", seed=SEED, device=settings.device)
    config = stack.model.config
    options = TOMCapOptions(k=config.k, beams=config.beams, max_new_tokens=config.max_new_tokens,
                            select_by=config.select_by)
    calls = {kind: (lambda store=store: caption_batch(stack, store, pixels, options)) for kind, store in stores.items()}
    warm_up(stack, stores["flat"], pixels)
    timings, outputs = common.time_calls(calls, warmup=0, repeats=repeats, device=settings.device)
    return {
        "architecture": stack.architecture,
        "batch": batch,
        **options.to_dict(),
        **{kind: {**timings[kind].to_dict(per=batch), "stage_ms_per_image": per_image_stages(outputs[kind])}
           for kind in stores},
    }


def run_stack(settings: common.Settings, *, tiny: bool, batches: tuple[int, ...], plan: Plan) -> tuple[list, dict]:
    stack = tomcap_stack(tiny=tiny, beams=BEAMS, new_tokens=TINY_NEW_TOKENS if tiny else NEW_TOKENS,
                         k=TINY_K if tiny else K, device=settings.device, dtype=settings.torch_dtype, seed=SEED)
    stores, build_s = build_stores(stack, plan.store_size)
    cases = [measure(stack, stores, batch, repeats=plan.repeats_for(batch), settings=settings) for batch in batches]
    return cases, {"architecture": stack.architecture, "store_build_s": build_s,
                   "ivfpq_spec": stores["ivfpq"].spec.to_dict()}


def run(*, quick: bool = False, tiny: bool = False, device: str = "cpu", dtype: str = "fp32") -> dict[str, Any]:
    started = time.perf_counter()
    settings = common.Settings(quick=quick, tiny=tiny, device=device, dtype=dtype)
    plan = plan_for(settings)
    cases, stores = [], []
    with common.PeakMemory(settings.device) as memory:
        for use_tiny, batches in ((False, plan.real_batches), (True, plan.tiny_batches)):
            if batches:
                measured, store_info = run_stack(settings, tiny=use_tiny, batches=batches, plan=plan)
                cases += measured
                stores.append(store_info)
    figures = {
        "beams": BEAMS,
        "store_size": plan.store_size,
        "cases": cases,
        "stores": stores,
        "memory": memory.to_dict(),
    }
    return common.envelope(NAME, settings, figures, started=started)


def summary(result: dict[str, Any]) -> str:
    parts = []
    for case in result["cases"]:
        kind = "tiny" if case["architecture"] == "tiny" else "real"
        timings = ", ".join(f"{store} {case[store]['median_s']:.3g} s/img (retrieve "
                            f"{case[store]['stage_ms_per_image']['retrieve']:.3g} ms)" for store in STORE_KINDS)
        parts.append(f"B={case['batch']} ({kind}, K={case['k']}, {case['max_new_tokens']} tokens): {timings}")
    return f"{result['store_size']} captions, beams {result['beams']}. " + "; ".join(parts)


def main(argv: list[str] | None = None) -> int:
    return common.benchmark_main(NAME, run, summary, description=__doc__.split("\n\n")[0], argv=argv)


if __name__ == "__main__":
    raise SystemExit(main())
