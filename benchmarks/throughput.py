"""Batch-captioning throughput (images/s) of both methods, through the evaluation's own code path.

    python -m benchmarks.throughput [--quick] [--json] [--device cuda --dtype bf16]

Images are captioned exactly as ``python -m training shapes-eval`` does it:
:func:`training.shapes.evaluate.caption_all` over a :class:`capdemo.pipeline.Captioner`
(PIL images in, preprocessing and the vision tower included, 50 images per
call, each method with its bundle defaults). Each method gets its own
Captioner, so neither profits from the other's cached vision-tower outputs.

Models: the app's bundle (``weights/shapes`` when present, else the tiny random
test bundle) on held-out shapes-world test images; the full run adds random
real-size models (ViT-B/32 + GPT-2 base, MacCap S = 20 x 4 beams x 16 tokens,
TOMCap K = 4, 3 beams x 25 tokens, a 20k-caption flat datastore) on 8 images.
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass
from typing import Any

import torch

from benchmarks import common
from benchmarks.models import (
    app_bundle,
    caption_words,
    maccap_stack,
    random_clip,
    random_images,
    synthetic_datastore,
    tomcap_stack,
)
from capdemo.methods.base import Towers
from capdemo.methods.maccap.inference import MacCapMethod
from capdemo.methods.tomcap.inference import TOMCapMethod
from capdemo.pipeline import Captioner
from training.shapes.evaluate import CAPTION_BATCH, caption_all, in_batches, world_config_of

NAME = "throughput"
REAL_STORE_SIZE = 20_000  # captions in the real-size run's flat datastore
SEED = 0


@dataclass(frozen=True)
class Plan:
    bundle_images: int  # shapes-world test images captioned with the app's bundle
    real_images: int  # random images captioned with the real-size models (0: skipped)


def plan_for(settings: common.Settings) -> Plan:
    if settings.tiny:
        return Plan(bundle_images=4, real_images=0)
    if settings.quick:
        return Plan(bundle_images=50, real_images=0)
    return Plan(bundle_images=200, real_images=8)


def test_images(captioner: Captioner, count: int) -> list:
    """Held-out test images of the bundle's shapes world (the split shapes-eval scores)."""
    from training.shapes import world

    config = world_config_of(captioner)
    return world.generate_images(count, seed=config.test_seed, config=config)


def decoding_settings(captioners: dict[str, Captioner]) -> dict[str, dict[str, Any]]:
    """Each method's bundle-default settings."""
    return {method: captioner.method(method).default_options().to_dict() for method, captioner in captioners.items()}


def measure(captioners: dict[str, Captioner], images: list, settings: common.Settings) -> dict[str, Any]:
    """Images/s of each method over ``images`` (after a two-image warm-up on other images)."""
    warmup = random_images(2, size=images[0].size[0], seed=SEED + 1)
    out = {}
    for method, captioner in captioners.items():
        caption_all(captioner, in_batches(warmup), method, {})
        with common.PeakMemory(settings.device) as memory:
            started = time.perf_counter()
            caption_all(captioner, in_batches(images), method, {})
            common.synchronize(settings.device)
            seconds = time.perf_counter() - started
        out[method] = {"images": len(images), "seconds": round(seconds, 5),
                       "images_per_s": round(len(images) / seconds, 3),
                       "s_per_image": round(seconds / len(images), 4), "memory": memory.to_dict()}
    return out


def bundle_captioners(path, device: str) -> dict[str, Captioner]:
    """One freshly loaded Captioner per method the bundle has."""
    methods = Captioner.from_bundle(path, device=device).methods
    return {method: Captioner.from_bundle(path, device=device) for method in methods}


def real_captioners(settings: common.Settings) -> dict[str, Captioner]:
    """Random real-size models behind two Captioners sharing one CLIP (each with its own encoding cache)."""
    encoder = random_clip(tiny=False, seed=SEED, device=settings.device, dtype=settings.torch_dtype)
    options = dict(tiny=False, device=settings.device, dtype=settings.torch_dtype, seed=SEED, encoder=encoder)
    maccap = maccap_stack(**options).model
    tomcap = tomcap_stack(**options).model
    store = synthetic_datastore(REAL_STORE_SIZE, encoder_name=encoder.name, dim=encoder.embed_dim, kind="flat",
                                words=caption_words(tomcap.tokenizer, tiny=False), seed=SEED)
    towers = Towers(encoder, device=settings.device)
    methods = {"maccap": MacCapMethod(maccap, encoder),
               "tomcap": TOMCapMethod(tomcap, encoder, datastore=store, gap_stats=None, retriever=None)}
    return {name: Captioner(None, towers, {name: method}) for name, method in methods.items()}


def run(*, quick: bool = False, tiny: bool = False, device: str = "cpu", dtype: str = "fp32") -> dict[str, Any]:
    started = time.perf_counter()
    settings = common.Settings(quick=quick, tiny=tiny, device=device, dtype=dtype)
    plan = plan_for(settings)
    runs = []
    with tempfile.TemporaryDirectory(prefix="capdemo-bench-") as scratch, torch.inference_mode():
        path, name = app_bundle(scratch, tiny=tiny)
        captioners = bundle_captioners(path, settings.device)
        runs.append({"models": f"bundle {name}", "decoding": decoding_settings(captioners),
                     **measure(captioners, test_images(next(iter(captioners.values())), plan.bundle_images), settings)})
        if plan.real_images:
            captioners = real_captioners(settings)
            runs.append({"models": "random ViT-B-32 + gpt2", "decoding": decoding_settings(captioners),
                         **measure(captioners, random_images(plan.real_images, seed=SEED), settings)})
    return common.envelope(NAME, settings, {"images_per_call": CAPTION_BATCH, "runs": runs}, started=started)


def summary(result: dict[str, Any]) -> str:
    parts = []
    for entry in result["runs"]:
        rates = ", ".join(f"{method} {entry[method]['images_per_s']:.3g} img/s" for method in ("maccap", "tomcap")
                          if method in entry)
        parts.append(f"{entry['models']} ({entry['maccap']['images'] if 'maccap' in entry else '?'} images): {rates}")
    return "; ".join(parts)


def main(argv: list[str] | None = None) -> int:
    return common.benchmark_main(NAME, run, summary, description=__doc__.split("\n\n")[0], argv=argv)


if __name__ == "__main__":
    raise SystemExit(main())
