"""MacCap inference, batched: S noisy samples of every image in one generate call, one rerank call.

The paper's "multiple sampling and filtering" (§4.3) as the official code runs
it re-encodes the image and runs beam search once per sample, then reranks image
by image. Here the image arrives encoded once (the facade ran the vision tower),
its region features are replicated S times with independent noise, all B x S
prefixes are decoded in a single ``generate`` call (each prompt forwarded once,
its KV cache shared by the beams), and all B x S candidates are scored in one
CLIP text call. :func:`sequential_reference` keeps the official code's order of
work (same seeds, same candidates) for tests and benchmarks.

Noise for sample ``s`` comes from its own generator seeded from ``(seed, s)``
and has shape (N_cr, D), shared by all images of a batch: an image's candidates
therefore depend only on the image and the seed, not on the rest of the batch
or on whether samples are decoded together or one at a time.
"""

from __future__ import annotations

from dataclasses import dataclass
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from capdemo.encoders import ClipEncoder
from capdemo.features import ImageFeatures
from capdemo.gap import sample_noise
from capdemo.lm import max_positions
from capdemo.methods.base import CaptionMethod, Encoded, LoadContext, MethodOptions, options_from_config, setting
from capdemo.methods.maccap.model import (
    REGION_MODES, MacCap, image_regions, load_from_bundle,
)
from capdemo.rerank import ScoredTexts, clip_scores
from capdemo.result import Candidate, Patch, Result
from capdemo.vqa import AnswerLM
from capdemo.timing import StageTimer


TEXT_TO_TEXT_BATCH = 25  # texts decoded per generate call by text_to_text (x S samples each)


@dataclass
class MacCapOptions(MethodOptions):
    """MacCap's per-request settings (a bundle presets them from its MacCapConfig)."""

    samples: int = setting(20, low=1, high=64, label="Samples S",
                           help="noisy samples of the region features, reranked by CLIP (paper: 20); 1: one clean "
                                "sample, no noise (Table 5's row without sampling and filtering)")
    beams: int = setting(4, low=1, high=8, label="Beams", help="beam width per sample (paper: 4)")
    noise_variance: float = setting(0.016, low=0.0, high=1.0, step=0.001, label="Noise variance",
                                    help="inference noise variance per dimension on the region features (paper: 0.016)")
    n_cr: int = setting(10, low=1, high=256, label="Patches N_cr",
                        help="patches picked by the CLS attention (paper: 10)")
    region_mode: str = setting("subregion", choices=REGION_MODES, label="Image features",
                               help="'subregion': subregion aggregation I_cr (the paper); 'cls': the CLS token alone "
                                    "(Table 5's ablation row)")
    max_new_tokens: int = setting(16, low=1, high=64, label="Max new tokens", help="caption length cap (reference: 16)")
    seed: int = setting(0, low=0, high=2**31 - 1, label="Seed",
                        help="seeds the inference noise: same seed, same captions")


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


def inference_variance(options: MacCapOptions) -> float:
    """The noise on the region features: the option's, or none for a single sample (no sampling and filtering)."""
    return 0.0 if options.samples == 1 else options.noise_variance


@torch.inference_mode()
def sample_and_filter(model: MacCap, encoder: ClipEncoder, regions: torch.Tensor, targets: torch.Tensor,
                      options: MacCapOptions, timer: StageTimer | None = None) -> list[ScoredTexts]:
    """The paper's multiple sampling and filtering: S noisy samples of each item's region features (B, N_cr, D),
    all decoded in one generate call, each item's S candidates scored by CLIP cosine with its ``targets`` row (B, D)
    (an image's embedding; a text's own, for the text-to-text ceiling). ``timer`` collects the stages' times."""
    timer = timer or StageTimer(model.device)
    with timer("aggregate"):
        noisy = noisy_samples(regions, samples=options.samples, variance=inference_variance(options),
                              seed=options.seed)  # (B, S, N_cr, D)
    with timer("adaptor"):
        prompt = model.prompt_embeds(noisy.flatten(0, 1))  # (B * S, P, E), rows of one item adjacent
    with timer("generate"):
        texts = model.generate_from_prompt(prompt, beams=options.beams, max_new_tokens=options.max_new_tokens)
    with timer("rerank"):
        per_item = options.samples
        groups = [texts[b * per_item : (b + 1) * per_item] for b in range(regions.shape[0])]
        return clip_scores(encoder, targets, groups)


@torch.inference_mode()
def caption_images(model: MacCap, encoder: ClipEncoder, features: ImageFeatures,
                   options: MacCapOptions) -> list[Result]:
    """Caption B images from their vision-tower features; each Result holds all S candidates best first."""
    timer = StageTimer(model.device)
    with timer("aggregate"):
        features = features.to(model.device)
        token_index, attention, regions = image_regions(features, model.config, n_cr=options.n_cr,
                                                        region_mode=options.region_mode)
    scored = sample_and_filter(model, encoder, regions, features.image_embeds, options, timer)
    batch = regions.shape[0]
    timings = timer.per_image(batch)
    return [build_result(features, b, token_index, attention, regions, scored[b], timings, options)
            for b in range(batch)]


@torch.inference_mode()
def sequential_reference(model: MacCap, encoder: ClipEncoder, pixels: torch.Tensor,
                         options: MacCapOptions) -> list[Result]:
    """The official code's order of work: per sample a fresh CLIP pass, aggregation, noise and stock beam
    search (the prompt forwarded once per beam); one more CLIP pass for the rerank, then one text-encoder
    call per image. Same seeds, same candidates as :func:`caption_images`; slower by design (for tests and
    benchmarks). Its timings include those repeated vision-tower passes ("encode")."""
    timer = StageTimer(model.device)
    texts_by_sample: list[list[str]] = []
    for sample in range(options.samples):
        with timer("encode"):
            features = encoder.encode_images(pixels).to(model.device)
        with timer("aggregate"):
            token_index, attention, regions = image_regions(features, model.config, n_cr=options.n_cr,
                                                            region_mode=options.region_mode)
            noisy = sample_noise_batch(regions, sample=sample, variance=inference_variance(options), seed=options.seed)
        with timer("adaptor"):
            prompt = model.prompt_embeds(noisy)  # (B, P, E)
        with timer("generate"):
            texts_by_sample.append(model.generate_from_prompt(
                prompt, beams=options.beams, max_new_tokens=options.max_new_tokens, share_prompt=False,
            ))
    with timer("encode"):
        image_embeds = encoder.encode_image_embeds(pixels)  # (B, D)
    scored = []
    for b in range(pixels.shape[0]):
        with timer("rerank"):
            candidates = [texts[b] for texts in texts_by_sample]
            scored.append(clip_scores(encoder, image_embeds[b : b + 1], [candidates])[0])
    timings = timer.per_image(pixels.shape[0])
    return [build_result(features, b, token_index, attention, regions, scored[b], timings, options)
            for b in range(pixels.shape[0])]


def build_result(
    features: ImageFeatures,
    b: int,
    token_index: torch.Tensor,
    attention: torch.Tensor,
    regions: torch.Tensor,
    scored: ScoredTexts,
    timings_ms: dict[str, float],
    options: MacCapOptions,
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
        method=MacCapMethod.name,
        candidates=candidates,
        patches=patches,
        embeddings=embeddings,
        timings_ms=dict(timings_ms),
        extras={**options.to_dict(), "batch_size": int(token_index.shape[0])},
    )


class MacCapMethod(CaptionMethod):
    """MacCap behind the method interface: the bundle's model and the captioning CLIP it reads regions from."""

    name = "maccap"
    label = "MacCap"
    citation = "Qiu et al., AAAI 2024: subregion features, noise injection, sampling and CLIP filtering"
    Options = MacCapOptions

    def __init__(self, model: MacCap, encoder: ClipEncoder):
        self.model = model
        self.encoder = encoder

    @classmethod
    def from_bundle(cls, context: LoadContext) -> MacCapMethod:
        return cls(load_from_bundle(context.bundle, device=context.device), context.encoder)

    def default_options(self) -> MacCapOptions:
        return options_from_config(MacCapOptions, self.model.config)

    def limits(self) -> dict[str, tuple[float, float]]:
        rows, cols = self.encoder.grid_size
        tokens = rows * cols + int(self.model.config.include_cls_in_topk)
        room = max_positions(self.model.lm) - self.model.prompt_length
        return {"n_cr": (1, tokens), "max_new_tokens": (1, room)}

    def caption(self, encoded: Encoded, options: MacCapOptions) -> list[Result]:
        return caption_images(self.model, self.encoder, encoded.features, options)

    @torch.inference_mode()
    def text_to_text(self, texts: Sequence[str], text_embeds: torch.Tensor,
                     options: MacCapOptions | None = None) -> list[str]:
        """Each text's embedding in the image's place: its N_cr copies (the regions MacCap trains on) through
        :func:`sample_and_filter` with ``options`` (default: the bundle's), reranked by cosine with the text."""
        options = options or self.default_options()
        embeds = F.normalize(text_embeds.to(self.model.device).float(), dim=-1)  # (N, D)
        captions = []
        for start in range(0, len(texts), TEXT_TO_TEXT_BATCH):
            chunk = embeds[start : start + TEXT_TO_TEXT_BATCH]  # (b, D)
            regions = chunk.unsqueeze(1).expand(-1, options.n_cr, -1)  # (b, N_cr, D)
            captions += [scored.texts[scored.order()[0]]
                         for scored in sample_and_filter(self.model, self.encoder, regions, chunk, options)]
        return captions

    def answer_lm(self) -> AnswerLM:
        return AnswerLM.of_captioner(self.model)

    def modules(self) -> list[torch.nn.Module]:
        return [self.model]


__all__ = [
    "MacCapMethod",
    "MacCapOptions",
    "build_result",
    "caption_images",
    "noisy_samples",
    "sample_and_filter",
    "sample_generator",
    "sample_noise_batch",
    "sequential_reference",
]
