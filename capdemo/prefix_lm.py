"""A causal LM steered by a learned prefix of input embeddings: the decoder MacCap and CapDec share.

Both methods turn CLIP features into a short sequence of vectors in the LM's input-embedding space
(MacCap: an adaptor over region features; CapDec: a mapper from one embedding) and let the LM
continue it with the caption. What is shared lives here: the caption targets (tokens + EOS), the
per-caption loss with prefix and padding masked out, and batched beam search from the prefix.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from capdemo.lm import (
    IGNORE_INDEX, LanguageModelError, decode, embed_tokens, embedding_size, generate_from_embeds, special_ids,
)


class PrefixLM(nn.Module):
    """Base of prefix captioners: subclasses define :meth:`prefix` (inputs -> (N, P, E)) and keep ``config``
    with ``max_caption_tokens``, ``bos_after_prefix``, ``train_lm`` and ``lm_embed_dim``."""

    config: Any

    def __init__(self, config: Any, lm: nn.Module, tokenizer: Any):
        super().__init__()
        if embedding_size(lm) != config.lm_embed_dim:
            raise LanguageModelError(f"{type(config).__name__}.lm_embed_dim is {config.lm_embed_dim} but the LM takes "
                                     f"{embedding_size(lm)}-d embeddings")
        self.config = config
        self.lm = lm
        self.tokenizer = tokenizer
        self.bos_id, self.eos_id, self.pad_id = special_ids(tokenizer)
        if config.bos_after_prefix and self.bos_id is None:
            raise LanguageModelError(f"the tokenizer has no BOS token; set {type(config).__name__}.bos_after_prefix"
                                     "=False")
        self.lm.requires_grad_(config.train_lm)

    def train(self, mode: bool = True) -> PrefixLM:
        """A frozen LM stays in eval mode (no dropout) while the prefix network trains."""
        super().train(mode)
        self.lm.train(mode and self.config.train_lm)
        return self

    @property
    def device(self) -> torch.device:
        return self.lm.get_input_embeddings().weight.device

    @property
    def prefix_length(self) -> int:
        raise NotImplementedError

    @property
    def prompt_length(self) -> int:
        """Positions the LM reads before the caption: the prefix, plus BOS if configured."""
        return self.prefix_length + int(self.config.bos_after_prefix)

    def prefix(self, inputs: torch.Tensor) -> torch.Tensor:
        """The method's features -> the prefix (N, P, E)."""
        raise NotImplementedError

    def prompt_embeds(self, inputs: torch.Tensor) -> torch.Tensor:
        """What the LM reads before the caption: the prefix, then BOS if configured: (N, P [+ 1], E)."""
        prefix = self.prefix(inputs)
        if not self.config.bos_after_prefix:
            return prefix
        bos = torch.full((prefix.shape[0], 1), self.bos_id, dtype=torch.long, device=prefix.device)
        return torch.cat([prefix, embed_tokens(self.lm, bos).to(prefix.dtype)], dim=1)

    def tokenize(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Training targets: ``caption tokens + EOS``, right-padded: ids and mask, each (B, L) long."""
        limit = self.config.max_caption_tokens - 1
        encoded = self.tokenizer(list(captions), add_special_tokens=False)["input_ids"]
        rows = [ids[:limit] + [self.eos_id] for ids in encoded]
        length = max(len(r) for r in rows)
        ids = torch.full((len(rows), length), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), length), dtype=torch.long)
        for i, row in enumerate(rows):
            ids[i, : len(row)] = torch.tensor(row)
            mask[i, : len(row)] = 1
        return ids, mask

    def caption_loss(self, inputs: torch.Tensor, token_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Token cross-entropy of the captions after the prefix of ``inputs``, averaged per caption, then over
        the batch. token_ids / attention_mask (B, L) from :meth:`tokenize`; prefix, BOS and padding carry no loss."""
        prompt = self.prompt_embeds(inputs)  # (B, P, E)
        captions = embed_tokens(self.lm, token_ids)  # (B, L, E)
        joined = torch.cat([prompt.to(captions.dtype), captions], dim=1)  # (B, P + L, E)
        mask = torch.cat([torch.ones(prompt.shape[:2], dtype=attention_mask.dtype, device=attention_mask.device),
                          attention_mask], dim=1)  # (B, P + L)
        length = token_ids.shape[1]
        # the logits at the last prompt position and all caption positions but the last predict the caption
        outputs = self.lm(inputs_embeds=joined, attention_mask=mask, logits_to_keep=length + 1)
        logits = outputs.logits[:, :-1]  # (B, L, V)
        labels = token_ids.masked_fill(attention_mask == 0, IGNORE_INDEX)  # (B, L)
        per_token = F.cross_entropy(logits.float().transpose(1, 2), labels, ignore_index=IGNORE_INDEX, reduction="none")
        per_caption = per_token.sum(1) / attention_mask.sum(1).clamp_min(1)  # (B,)
        return per_caption.mean()

    @torch.inference_mode()
    def generate_from_prompt(self, prompt: torch.Tensor, *, beams: int, max_new_tokens: int,
                             share_prompt: bool = True, num_return_sequences: int = 1) -> list[str]:
        """Beam search from prompt rows (N, P, E): N x ``num_return_sequences`` captions, best beam first.

        ``share_prompt=False`` is stock ``generate`` (the prompt forwarded once per beam, as the official
        code runs it); the captions are the same.
        """
        ids = generate_from_embeds(
            self.lm, prompt, eos_token_id=self.eos_id, pad_token_id=self.pad_id, beams=beams,
            max_new_tokens=max_new_tokens, share_prompt=share_prompt, num_return_sequences=num_return_sequences,
        )
        return decode(self.tokenizer, ids)


__all__ = ["PrefixLM"]
