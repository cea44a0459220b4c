"""Training data of the prefix captioners (MacCap, CapDec): each caption as its CLIP text embedding and tokens.

Everything is precomputed (the embeddings by :mod:`training.embed`, the tokens by the model's
tokenizer), so indexing is pure and the loop's data order alone decides what a step sees; the
noise that stands in for the modality gap is the model's, drawn inside its ``loss``.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import torch
from torch.utils.data import Dataset

from training.loop import TrainConfig, TrainResult, TrainTask, train


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


def train_prefix_captioner(model, text_embeds: torch.Tensor, token_ids: torch.Tensor, attention_mask: torch.Tensor, *,
                           train_config: TrainConfig, identity: dict[str, Any],
                           evaluate: Callable[[Any], dict[str, float]] | None, resume: bool, stop_after: int | None,
                           write_bundle: Callable[[dict[str, Any]], Any]) -> tuple[TrainResult, Any]:
    """Train a prefix captioner on its captions through the shared loop; when the run finished, rank 0 writes
    its bundle with ``write_bundle(record)`` (the record: caption count, train config, loss history, evaluations).

    Returns the loop's result and the bundle (None while unfinished and on other ranks)."""
    task = TrainTask(model=model, dataset=CaptionDataset(text_embeds, token_ids, attention_mask), collate_fn=collate,
                     loss_fn=prefix_loss, evaluate=evaluate, identity=identity)
    result = train(task, train_config, resume=resume, stop_after=stop_after)
    if not result.finished or int(os.environ.get("RANK", "0")) != 0:
        return result, None
    record = {"captions": len(token_ids), "train": train_config.to_dict(), "history": result.history,
              "evaluations": result.evaluations}
    return result, write_bundle(record)


__all__ = ["CaptionDataset", "collate", "exact_match", "prefix_loss", "train_prefix_captioner"]
