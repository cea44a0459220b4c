"""MacCap inference, batched: one encoder pass, S noisy samples in one generate call, one rerank call.

The paper's "multiple sampling and filtering" (§4.3) as the official code runs
it re-encodes the image and runs beam search once per sample, then reranks image
by image. Here the image is encoded once, its region features are replicated S
times with independent noise, all B x S prefixes are decoded in a single
``generate`` call (each prompt forwarded once, its KV cache shared by the beams),
and all B x S candidates are scored in one CLIP text call.
:func:`sequential_reference` keeps the official code's order of work (same
seeds, same candidates) for tests and benchmarks.

Noise for sample ``s`` comes from its own generator seeded from ``(seed, s)``
and has shape (N_cr, D), shared by all images of a batch: an image's candidates
therefore depend only on the image and the seed, not on the rest of the batch
or on whether samples are decoded together or one at a time.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from typing import Iterator

import numpy as np
import torch
import torch.nn.functional as F

from capdemo.encoders import ClipEncoder, ImageFeatures
from capdemo.gap import sample_noise
from capdemo.maccap import MacCap, image_regions
from capdemo.rerank import ScoredTexts, clip_scores
from capdemo.result import Candidate, Patch, Result

METHOD = "maccap"
STAGES = ("encode", "aggregate", "adaptor", "generate", "rerank")  # keys of Result.timings_ms


class StageTimer:
    """Wall time per named stage in milliseconds (accumulating), synchronising CUDA so GPU work is counted."""

    def __init__(self, device: torch.device):
        self.device = device
        self.ms = {stage: 0.0 for stage in STAGES}

    @contextmanager
    def __call__(self, stage: str) -> Iterator[None]:
        start = time.perf_counter()
        yield
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.ms[stage] = self.ms.get(stage, 0.0) + (time.perf_counter() - start) * 1000.0


def sample_generator(seed: int, sample: int) -> torch.Generator:
    """The CPU generator of noise sample ``sample`` for a request seeded ``seed`` (well mixed, independent)."""
    state = np.random.SeedSequence([seed, sample]).generate_state(1, dtype=np.uint64)[0]
    return torch.Generator().manual_seed(int(state >> np.uint64(1)))


def sample_noise_batch(regions: torch.Tensor, *, sample: int, variance: float, seed: int) -> torch.Tensor:
    """Noisy sample ``sample`` of region features (B, N_cr, D): ``L2norm(I_cr + n)``, n ~ N(0, variance)."""
    noise = sample_noise(regions[0], variance, generator=sample_generator(seed, sample))  # (N_cr, D), shared by images
    return F.normalize(regions + noise, dim=-1)


def noisy_samples(regions: torch.Tensor, *, samples: int, variance: float, seed: int) -> torch.Tensor:
    """All S noisy samples of region features (B, N_cr, D) -> (B, S, N_cr, D)."""
    return torch.stack([sample_noise_batch(regions, sample=s, variance=variance, seed=seed) for s in range(samples)], 1)


def _settings(model: MacCap, samples, beams, noise_variance, n_cr, max_new_tokens) -> dict:
    """Per-call settings, the model config's values where a call leaves them ``None``."""
    config = model.config
    chosen = {"samples": samples, "beams": beams, "noise_variance": noise_variance, "n_cr": n_cr,
              "max_new_tokens": max_new_tokens}
    settings = {name: getattr(config, name) if value is None else value for name, value in chosen.items()}
    for name, value in settings.items():
        if name == "noise_variance" and value < 0 or name != "noise_variance" and value < 1:
            raise ValueError(f"{name} must be {'>= 0' if name == 'noise_variance' else '>= 1'}, got {value}")
    return settings


@torch.inference_mode()
def caption_images(
    model: MacCap,
    encoder: ClipEncoder,
    images: torch.Tensor | ImageFeatures,
    *,
    samples: int | None = None,
    beams: int | None = None,
    noise_variance: float | None = None,
    n_cr: int | None = None,
    max_new_tokens: int | None = None,
    seed: int = 0,
) -> list[Result]:
    """Caption B images: pixels (B, 3, H, W) or features already computed by ``encoder.encode_images``.

    ``None`` settings take the model config's values. Each Result holds all S
    candidates best first; its timings are for the whole batch.
    """
    settings = _settings(model, samples, beams, noise_variance, n_cr, max_new_tokens)
    timer = StageTimer(model.device)
    with timer("encode"):
        features = images if isinstance(images, ImageFeatures) else encoder.encode_images(images)
    with timer("aggregate"):
        features = features.to(model.device)
        token_index, attention, regions = image_regions(features, model.config, n_cr=settings["n_cr"])
        noisy = noisy_samples(regions, samples=settings["samples"], variance=settings["noise_variance"], seed=seed)
    with timer("adaptor"):
        prompt = model.prompt_embeds(noisy.flatten(0, 1))  # (B * S, P, E), rows of one image adjacent
    with timer("generate"):
        texts = model.generate_from_prompt(prompt, beams=settings["beams"], max_new_tokens=settings["max_new_tokens"])
    with timer("rerank"):
        per_image = settings["samples"]
        groups = [texts[b * per_image : (b + 1) * per_image] for b in range(regions.shape[0])]
        scored = clip_scores(encoder, features.image_embeds, groups)
    return [
        build_result(features, b, token_index, attention, regions, scored[b], timer.ms, settings, seed)
        for b in range(regions.shape[0])
    ]


@torch.inference_mode()
def sequential_reference(
    model: MacCap,
    encoder: ClipEncoder,
    pixels: torch.Tensor,
    *,
    samples: int | None = None,
    beams: int | None = None,
    noise_variance: float | None = None,
    n_cr: int | None = None,
    max_new_tokens: int | None = None,
    seed: int = 0,
) -> list[Result]:
    """The official code's order of work: per sample a fresh CLIP pass, aggregation, noise and stock beam
    search (the prompt forwarded once per beam); one more CLIP pass for the rerank, then one text-encoder
    call per image. Same seeds, same candidates
    as :func:`caption_images`; slower by design (for tests and benchmarks)."""
    settings = _settings(model, samples, beams, noise_variance, n_cr, max_new_tokens)
    timer = StageTimer(model.device)
    texts_by_sample: list[list[str]] = []
    for sample in range(settings["samples"]):
        with timer("encode"):
            features = encoder.encode_images(pixels).to(model.device)
        with timer("aggregate"):
            token_index, attention, regions = image_regions(features, model.config, n_cr=settings["n_cr"])
            noisy = sample_noise_batch(regions, sample=sample, variance=settings["noise_variance"], seed=seed)
        with timer("adaptor"):
            prompt = model.prompt_embeds(noisy)  # (B, P, E)
        with timer("generate"):
            texts_by_sample.append(model.generate_from_prompt(
                prompt, beams=settings["beams"], max_new_tokens=settings["max_new_tokens"], share_prompt=False,
            ))
    with timer("encode"):
        image_embeds = encoder.encode_image_embeds(pixels)  # (B, D)
    results = []
    for b in range(pixels.shape[0]):
        with timer("rerank"):
            candidates = [texts[b] for texts in texts_by_sample]
            scored = clip_scores(encoder, image_embeds[b : b + 1], [candidates])[0]
        results.append(build_result(features, b, token_index, attention, regions, scored, timer.ms, settings, seed))
    return results


def build_result(
    features: ImageFeatures,
    b: int,
    token_index: torch.Tensor,
    attention: torch.Tensor,
    regions: torch.Tensor,
    scored: ScoredTexts,
    timings_ms: dict[str, float],
    settings: dict,
    seed: int,
) -> Result:
    """Result of image ``b``: candidates best first, picked patches, embeddings for plots, timings."""
    order = scored.order()
    candidates = [Candidate(text=scored.texts[j], clip_score=float(scored.scores[j]), sample=j) for j in order]
    prefix_tokens = features.num_prefix_tokens
    grid_cols = features.grid_size[1]
    patches = []
    for token, weight in zip(token_index[b].tolist(), attention[b].tolist()):
        if token >= prefix_tokens:  # the CLS token, when picked (include_cls_in_topk), is not a patch
            row, col = divmod(token - prefix_tokens, grid_cols)
            patches.append(Patch(index=token - prefix_tokens, row=row, col=col, attention=float(weight)))
    embeddings = {
        "image": features.image_embeds[b : b + 1].float().cpu(),  # (1, D)
        # (N_cr, D) I_cr before noise, row for row with ``patches`` (a picked CLS token has no patch: left out)
        "region": F.normalize(regions[b][token_index[b] >= prefix_tokens].float(), dim=-1).cpu(),
        "candidates": scored.embeds[order].float().cpu(),  # (S, D), best first
        "patches": F.normalize(features.patch_embeds[b].float(), dim=-1).cpu(),  # (N_p, D)
    }
    return Result(
        caption=candidates[0].text,
        method=METHOD,
        candidates=candidates,
        patches=patches,
        embeddings=embeddings,
        timings_ms=dict(timings_ms),
        extras={**settings, "seed": seed, "batch_size": int(token_index.shape[0])},
    )


__all__ = [
    "STAGES",
    "StageTimer",
    "build_result",
    "caption_images",
    "noisy_samples",
    "sample_generator",
    "sample_noise_batch",
    "sequential_reference",
]
