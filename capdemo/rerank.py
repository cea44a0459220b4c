"""CLIP reranking: score candidate captions against their image in one text-encoder call.

Shared by both methods: MacCap reranks its S noisy samples (the paper's
"multiple sampling and filtering"), TOMCap its beams. All candidates of all
images of a batch go through the CLIP text tower together, so a batch of B
images with S candidates each costs one text-encoder call instead of B.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol
from collections.abc import Sequence

import torch

EMPTY_TEXT_SCORE = -1.0
"""Score of an empty candidate: the lowest cosine there is, so an empty caption never wins."""


class TextEncoder(Protocol):
    def encode_text(self, texts: Sequence[str]) -> torch.Tensor: ...  # (N, D) L2-normalised


@dataclass(frozen=True)
class ScoredTexts:
    """One image's candidates with their CLIP cosines, in the order they were given."""

    texts: list[str]
    scores: torch.Tensor  # (n,) float32 cosine of each text with the image
    embeds: torch.Tensor  # (n, D) float32 L2-normalised text embeddings (zeros for empty texts)

    def order(self) -> list[int]:
        """Positions best first; equal scores keep their given order."""
        return rank(self.scores).tolist()


def rank(scores: torch.Tensor) -> torch.Tensor:
    """Indices that sort ``scores`` (n,) from best to worst, stable for ties."""
    return torch.sort(scores, descending=True, stable=True).indices


def clip_scores(
    encoder: TextEncoder, image_embeds: torch.Tensor, texts: Sequence[Sequence[str]]
) -> list[ScoredTexts]:
    """Cosine of every ``texts[b][j]`` with ``image_embeds[b]`` (B, D, normalised): one ``encode_text`` call.

    Each distinct text is encoded once (noisy samples often decode to the same
    caption). Empty (or whitespace-only) texts are not encoded; they score
    :data:`EMPTY_TEXT_SCORE` with a zero embedding.
    """
    if len(texts) != image_embeds.shape[0]:
        raise ValueError(f"got {len(texts)} candidate lists for {image_embeds.shape[0]} images")
    flat = [text for group in texts for text in group]
    distinct = list(dict.fromkeys(text for text in flat if text.strip()))  # first-seen order
    dim = image_embeds.shape[-1]
    embeds = torch.zeros(len(flat), dim)  # (N, D)
    keep = [i for i, text in enumerate(flat) if text.strip()]
    if distinct:
        encoded = encoder.encode_text(distinct).float().cpu()  # (U, D)
        row = {text: u for u, text in enumerate(distinct)}
        embeds[keep] = encoded[[row[flat[i]] for i in keep]]
    owner = torch.repeat_interleave(torch.arange(len(texts)), torch.tensor([len(g) for g in texts], dtype=torch.long))
    scores = (embeds * image_embeds.float().cpu()[owner]).sum(-1)  # (N,)
    empty = torch.ones(len(flat), dtype=torch.bool)
    empty[keep] = False
    scores[empty] = EMPTY_TEXT_SCORE
    out, start = [], 0
    for group in texts:
        stop = start + len(group)
        out.append(ScoredTexts(texts=list(group), scores=scores[start:stop], embeds=embeds[start:stop]))
        start = stop
    return out


__all__ = ["EMPTY_TEXT_SCORE", "ScoredTexts", "clip_scores", "rank"]
