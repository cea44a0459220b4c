"""What the image tower gives the methods: one dataclass for a batch, whichever kind of ViT made it."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from collections.abc import Sequence

import torch


@dataclass
class ImageFeatures:
    """Everything the methods read from the image tower, for a batch of B images.

    T = num_prefix_tokens + N_p tokens; patches follow the prefix tokens in
    row-major grid order. Two towers fill this:

    * CLS-pooled ViT: num_prefix_tokens == 1, token 0 is the CLS token; the pooling
      query is that token, so its attention is row 0 of ``attention`` and the global
      embedding is token 0 (``pool_attention`` and ``pooled_embeds`` stay None).
    * MAP-pooled ViT: the pooling query is a learned latent outside the tokens, so
      its attention over the T tokens is ``pool_attention`` and the tower's pooled
      output is ``pooled_embeds``; num_prefix_tokens is the trunk's own count (0
      for SigLIP2: no CLS, every token is a patch).
    * ViT pooled by the patch mean (open_clip ``pool_type="avg"``): the global embedding
      is the mean of the patch tokens, so ``pool_attention`` is the mean of the patch
      rows of ``attention`` (the CLS token's row feeds no output), and token 0 and
      ``pooled_embeds`` are both the pooled output.

    Consumers read the pooling attention as :attr:`cls_attention` and the global
    token as :attr:`global_embeds`, which cover both cases.
    """

    image_embeds: torch.Tensor  # (B, D) global embedding I_c, L2-normalised
    token_embeds: torch.Tensor  # (B, T, D) last-layer tokens mapped into the joint space (I'_p), not normalised
    attention: torch.Tensor  # (B, H, T, T) last block's self-attention probabilities per head (rows sum to 1)
    grid_size: tuple[int, int]  # (rows, cols) of the patch grid
    num_prefix_tokens: int = 1
    # (B, H_p, T) attention of a pooling query that is not one of the tokens (a MAP head's latent, or the patch mean),
    # None: the CLS token (token 0) is the pooling query. Rows sum to 1.
    pool_attention: torch.Tensor | None = None
    # (B, D) the tower's pooled output before normalisation, when it is not token 0 (MAP); None: token 0.
    pooled_embeds: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if (self.pool_attention is None) != (self.pooled_embeds is None):
            raise ValueError("ImageFeatures: pool_attention and pooled_embeds come together (a tower whose pooling "
                             "query is not the CLS token)")
        if self.pool_attention is None and self.num_prefix_tokens < 1:
            raise ValueError("ImageFeatures: without a CLS token (num_prefix_tokens == 0) the pooling attention "
                             "and pooled embedding must be given (pool_attention, pooled_embeds)")

    @property
    def patch_embeds(self) -> torch.Tensor:
        return self.token_embeds[:, self.num_prefix_tokens:]  # (B, N_p, D)

    @property
    def cls_attention(self) -> torch.Tensor:
        """The pooling query's attention over all T tokens, per head: (B, H, T).

        The CLS token's row of the last block's attention, a MAP head's latent query attention, or the mean of
        the patch rows for a tower pooled by the patch mean.
        """
        return self.pool_attention if self.pool_attention is not None else self.attention[:, :, 0, :]

    @property
    def cls_attention_mean(self) -> torch.Tensor:
        """Head-averaged pooling attention over all T tokens: (B, T)."""
        return self.cls_attention.mean(dim=1)

    @property
    def global_embeds(self) -> torch.Tensor:
        """(B, D) the unnormalised global embedding I_c: the projected CLS token or the MAP head's output."""
        return self.pooled_embeds if self.pooled_embeds is not None else self.token_embeds[:, 0]

    def _apply(self, fn) -> ImageFeatures:
        """The same features with ``fn`` applied to every tensor (each has the batch on dim 0)."""
        tensors = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        return dataclasses.replace(
            self, **{name: fn(t) for name, t in tensors.items() if isinstance(t, torch.Tensor)}
        )

    def select(self, index: torch.Tensor | slice | Sequence[int]) -> ImageFeatures:
        """The features of a subset of the batch (same tensors, indexed on dim 0)."""
        return self._apply(lambda t: t[index])

    def to(self, device: torch.device | str) -> ImageFeatures:
        return self._apply(lambda t: t.to(device))

    @classmethod
    def cat(cls, parts: Sequence[ImageFeatures]) -> ImageFeatures:
        """Batches of the same tower joined along dim 0."""
        first = parts[0]
        joined = {
            f.name: torch.cat([getattr(p, f.name) for p in parts])
            for f in dataclasses.fields(first) if isinstance(getattr(first, f.name), torch.Tensor)
        }
        return dataclasses.replace(first, **joined)


__all__ = ["ImageFeatures"]
