"""CapDec inference, batched: every image's prefix in one generate call, its beams scored in one CLIP call.

The image's CLIP embedding takes the place of the noisy text embedding the model was trained on
(the paper's point: training noise covers the modality gap, so nothing is done to the image).
Beam search decodes; the caption is the best beam, as in CapDec. Every beam is kept as a
candidate with its CLIP cosine, so the app can show them; ``select_by="clip"`` picks by that
cosine instead (capdemo's option, not the paper's).
"""

from __future__ import annotations

from dataclasses import dataclass
from collections.abc import Sequence

import torch

from capdemo.encoders import ClipEncoder
from capdemo.lm import max_positions
from capdemo.methods.base import CaptionMethod, Encoded, LoadContext, MethodOptions, options_from_config, setting
from capdemo.methods.capdec.model import CapDec, load_from_bundle
from capdemo.rerank import clip_scores
from capdemo.result import Candidate, Result
from capdemo.timing import StageTimer

SELECT_BY = ("beam", "clip")
TEXT_TO_TEXT_BATCH = 50  # texts decoded per generate call by text_to_text


@dataclass
class CapDecOptions(MethodOptions):
    """CapDec's per-request settings (a bundle presets them from its CapDecConfig)."""

    beams: int = setting(5, low=1, high=8, label="Beams", help="beam width; every beam is a candidate (CapDec: 5)")
    max_new_tokens: int = setting(20, low=1, high=64, label="Max new tokens", help="caption length cap")
    select_by: str = setting("beam", choices=SELECT_BY, label="Pick the caption by",
                             help="'beam': the beam search's best (the paper); 'clip': the beam closest to the image "
                                  "by CLIP cosine (capdemo's rerank)")


@torch.inference_mode()
def caption_images(model: CapDec, encoder: ClipEncoder, image_embeds: torch.Tensor,
                   options: CapDecOptions) -> list[Result]:
    """Caption B images from their CLIP image embeddings (B, D); timings per image."""
    timer = StageTimer(model.device)
    batch, beams = image_embeds.shape[0], options.beams
    with timer("mapper"):
        prompt = model.prompt_embeds(image_embeds)  # (B, P, E)
    with timer("generate"):
        texts = model.generate_from_prompt(prompt, beams=beams, max_new_tokens=options.max_new_tokens,
                                           num_return_sequences=beams)  # B x beams, best beam first
    with timer("rerank"):
        scored = clip_scores(encoder, image_embeds, [texts[b * beams : (b + 1) * beams] for b in range(batch)])
    timings = timer.per_image(batch)
    results = []
    for b, group in enumerate(scored):
        order = group.order() if options.select_by == "clip" else list(range(beams))
        candidates = [Candidate(text=group.texts[j], clip_score=float(group.scores[j]), sample=j) for j in order]
        results.append(Result(
            caption=candidates[0].text, method=CapDecMethod.name, candidates=candidates,
            embeddings={"image": image_embeds[b : b + 1].float().cpu(),  # (1, D)
                        "candidates": group.embeds[order].float().cpu()},  # (beams, D), as listed
            timings_ms=dict(timings), extras={**options.to_dict(), "batch_size": batch},
        ))
    return results


class CapDecMethod(CaptionMethod):
    """CapDec behind the method interface: the bundle's model and the captioning CLIP."""

    name = "capdec"
    label = "CapDec"
    citation = "Nukrai et al., EMNLP Findings 2022: noise injection on CLIP text embeddings, a mapper, a trained LM"
    Options = CapDecOptions

    def __init__(self, model: CapDec, encoder: ClipEncoder):
        self.model = model
        self.encoder = encoder

    @classmethod
    def from_bundle(cls, context: LoadContext) -> CapDecMethod:
        return cls(load_from_bundle(context.bundle, device=context.device), context.encoder)

    def default_options(self) -> CapDecOptions:
        return options_from_config(CapDecOptions, self.model.config)

    def limits(self) -> dict[str, tuple[float, float]]:
        return {"max_new_tokens": (1, max_positions(self.model.lm) - self.model.prompt_length)}

    def caption(self, encoded: Encoded, options: CapDecOptions) -> list[Result]:
        return caption_images(self.model, self.encoder, encoded.image_embeds(), options)

    def text_to_text(self, texts: Sequence[str], text_embeds: torch.Tensor,
                     options: CapDecOptions | None = None) -> list[str]:
        """Each text's own normalised embedding, no noise (CapDec's noise is training's alone), captioned as an
        image embedding is, with ``options`` (default: the bundle's)."""
        options = options or self.default_options()
        return [result.caption for start in range(0, len(texts), TEXT_TO_TEXT_BATCH)
                for result in caption_images(self.model, self.encoder, text_embeds[start : start + TEXT_TO_TEXT_BATCH],
                                             options)]

    def modules(self) -> list[torch.nn.Module]:
        return [self.model]


__all__ = ["CapDecMethod", "CapDecOptions", "caption_images"]
