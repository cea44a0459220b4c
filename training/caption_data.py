"""Training data of the prefix captioners (MacCap, CapDec): each caption as its CLIP text embedding and tokens.

Everything is precomputed (the embeddings by :mod:`training.embed`, the tokens by the model's
tokenizer), so indexing is pure and the loop's data order alone decides what a step sees; the
noise that stands in for the modality gap is the model's, drawn inside its ``loss``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.utils.data import Dataset


class CaptionDataset(Dataset):
    """Caption i as (CLIP text embedding (D,), token ids (L,), mask (L,))."""

    def __init__(self, text_embeds: torch.Tensor, token_ids: torch.Tensor, attention_mask: torch.Tensor):
        if not len(text_embeds) == len(token_ids) == len(attention_mask):
            raise ValueError(f"{len(text_embeds)} embeddings for {len(token_ids)} tokenised captions")
        self.text_embeds, self.token_ids, self.attention_mask = text_embeds, token_ids, attention_mask

    def __len__(self) -> int:
        return len(self.token_ids)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.text_embeds[index], self.token_ids[index], self.attention_mask[index]


def collate(samples: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Stack samples; cut the token columns to the batch's longest caption."""
    embeds, ids, mask = (torch.stack(column) for column in zip(*samples))
    length = int(mask.sum(1).max())
    return {"text_embeds": embeds, "token_ids": ids[:, :length], "attention_mask": mask[:, :length]}


def prefix_loss(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The shared loop's ``loss_fn`` for a prefix captioner: its own loss (noise included) on the batch."""
    return model.loss(batch["text_embeds"], batch["token_ids"], batch["attention_mask"])


def exact_match(decode: Callable[[torch.Tensor], list[str]], text_embeds: torch.Tensor, captions: list[str]) -> float:
    """Share of captions that ``decode`` gives back exactly (whitespace aside) from their own text embeddings."""
    decoded = decode(text_embeds)
    return sum(" ".join(a.split()) == " ".join(b.split()) for a, b in zip(decoded, captions)) / max(1, len(captions))


__all__ = ["CaptionDataset", "collate", "exact_match", "prefix_loss"]
