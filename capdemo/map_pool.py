"""timm ViTs pooled by a MAP head (``AttentionPoolLatent``, e.g. open_clip's SigLIP2 configs): what to hook.

:class:`~capdemo.encoders.ClipEncoder` reads three things from such a tower in its one forward
pass: the trunk's final-norm tokens, the last block's self-attention probabilities, and the MAP
latent query's attention over the tokens (the analogue of a CLS row). The tokens are mapped into
the joint space through the pool's value path (:func:`map_tokens_through_pool`), so each token
becomes what the head would output if the latent attended to it alone.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class MapPoolTower:
    """The modules of a timm ViT with a MAP head that :meth:`ClipEncoder.encode_images` hooks."""

    trunk: nn.Module  # timm VisionTransformer
    pool: nn.Module  # its AttentionPoolLatent
    last_attn: nn.Module  # timm Attention of its last block

    def capture(self, sink: dict[str, torch.Tensor]) -> list[Any]:
        """Hooks for one forward pass that store in ``sink``: the final-norm tokens ("tokens", (B, T, W)),
        the last block's self-attention ("attention", (B, H, T, T)) and the latent query's attention over
        the tokens the pool sees ("pool_attention", (B, H_p, N_in)), both float32 probabilities."""

        def keep_tokens(module, args, output):
            sink["tokens"] = output

        def keep_self_attention(module, args, kwargs, output):
            sink["attention"] = _timm_self_attention(module, *args, **kwargs)

        def keep_pool_attention(module, args, kwargs, output):
            sink["pool_attention"] = _latent_attention(module, *args, **kwargs)

        return [
            self.trunk.norm.register_forward_hook(keep_tokens),
            self.last_attn.register_forward_hook(keep_self_attention, with_kwargs=True),
            self.pool.register_forward_hook(keep_pool_attention, with_kwargs=True),
        ]


def map_pool_tower(visual: nn.Module) -> MapPoolTower | None:
    """The hooked modules of an open_clip timm tower whose trunk is a timm ViT pooled by a MAP head; else None.

    Dispatch is on module types: the trunk must be timm's ``VisionTransformer`` with its own ``pool`` and
    ``forward_head`` (what :func:`map_tokens_through_pool` reproduces after the pool), the pool an
    ``AttentionPoolLatent`` with one latent and no positional embedding of its own, and the last block's
    attention timm's plain ``Attention`` (whose probabilities :func:`_timm_self_attention` recomputes).
    """
    try:
        from open_clip.timm_model import TimmModel
        from timm.layers import Attention, AttentionPoolLatent
        from timm.models.vision_transformer import VisionTransformer as TimmViT
    except ImportError:  # no timm: no timm towers either
        return None

    if not isinstance(visual, TimmModel) or not isinstance(visual.trunk, TimmViT):
        return None
    trunk = visual.trunk
    if type(trunk).pool is not TimmViT.pool or type(trunk).forward_head is not TimmViT.forward_head:
        return None
    pool = trunk.attn_pool
    if not isinstance(pool, AttentionPoolLatent) or type(pool).forward is not AttentionPoolLatent.forward:
        return None
    if pool.pos_embed is not None or pool.latent_len != 1 or pool.pool not in ("token", "avg"):
        return None
    last_attn = getattr(trunk.blocks[-1], "attn", None) if len(trunk.blocks) else None
    if not isinstance(last_attn, Attention) or type(last_attn).forward is not Attention.forward:
        return None
    return MapPoolTower(trunk=trunk, pool=pool, last_attn=last_attn)


def map_tokens_through_pool(visual: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """A MAP-pooled timm tower's final-norm tokens (B, T, W) -> the joint embedding space (B, T, D).

    Each token goes through the path the pooled token takes after the attention, as if it had
    been pooled alone: the pool's value projection (the second half of ``kv``), its output
    projection ``proj``, the residual ``x + mlp(norm(x))``, then timm's ``fc_norm``/``head`` and
    open_clip's head. This is exactly what :class:`timm.layers.AttentionPoolLatent` (and the tower
    after it) returns for a one-token input, where the softmax over a single key is 1.

    Why this is the analogue of CLIP's projected patch tokens: a CLS-pooled CLIP embeds the image
    as ``ln_post(cls) @ proj``, and MacCap's I'_p apply that same per-token map to every last-layer
    token, so tokens and the global embedding share one space (paper eq. 10). In a MAP tower the
    only step that mixes tokens is the latent query's attention-weighted sum of the value vectors;
    everything before it (the value projection) and after it (output projection, residual MLP,
    heads) acts on one vector at a time. Applying the whole pooling path to a token alone — the
    global embedding the tower would give if the latent attended to that token only — is therefore
    the same "pooled-token map applied to every token". Because the residual MLP is nonlinear,
    the pooled embedding is not the attention-weighted mean of these token embeddings (it is
    before the MLP).
    """
    trunk = visual.trunk
    pool = trunk.attn_pool
    width = pool.kv.out_features // 2  # kv's output is [keys | values], each (heads x head_dim) in head order
    value_bias = pool.kv.bias[width:] if pool.kv.bias is not None else None
    x = F.linear(tokens, pool.kv.weight[width:], value_bias)  # (B, T, C): what attention over one token returns
    x = pool.proj_drop(pool.proj(x))
    if pool.mlp is not None:
        x = x + pool.mlp(pool.norm(x))
    return _after_map_pool(visual, x)


def _after_map_pool(visual: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """What the tower applies to the MAP head's output: timm's ``forward_head`` after ``pool``, then open_clip's."""
    trunk = visual.trunk
    x = trunk.head(trunk.head_drop(trunk.fc_norm(x)))
    return visual.head(x)


def _additive_mask(logits: torch.Tensor, attn_mask: torch.Tensor | None) -> torch.Tensor:
    """``logits`` with an SDPA-style mask applied (bool: True attends; float: added)."""
    if attn_mask is None:
        return logits
    if attn_mask.dtype == torch.bool:
        return logits.masked_fill(~attn_mask, float("-inf"))
    return logits + attn_mask


def _timm_self_attention(
    attn: nn.Module, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False
) -> torch.Tensor:
    """Per-head probabilities (B, H, N, N) of timm ``Attention`` on its input ``x`` (B, N, C), as its forward."""
    batch, num_tokens, _ = x.shape
    qkv = attn.qkv(x).reshape(batch, num_tokens, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    q, k = attn.q_norm(qkv[0]), attn.k_norm(qkv[1])  # (B, H, N, d) each
    logits = (q * attn.scale) @ k.transpose(-2, -1)  # (B, H, N, N)
    if is_causal:
        attn_mask = torch.ones(num_tokens, num_tokens, dtype=torch.bool, device=x.device).tril()
    return _additive_mask(logits, attn_mask).float().softmax(dim=-1)


def _latent_attention(pool: nn.Module, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Per-head probabilities (B, H, N) of an ``AttentionPoolLatent``'s single latent query over its input
    x (B, N, C)."""
    batch, num_tokens, _ = x.shape
    width = pool.kv.out_features // 2
    key_bias = pool.kv.bias[:width] if pool.kv.bias is not None else None
    q = pool.q(pool.latent).reshape(1, pool.latent_len, pool.num_heads, pool.head_dim).transpose(1, 2)  # (1,H,1,d)
    k = F.linear(x, pool.kv.weight[:width], key_bias)  # (B, N, C): kv's first half, as the pool splits it
    k = k.reshape(batch, num_tokens, pool.num_heads, pool.head_dim).transpose(1, 2)  # (B, H, N, d)
    q, k = pool.q_norm(q), pool.k_norm(k)
    logits = (q * pool.scale) @ k.transpose(-2, -1)  # (B, H, 1, N)
    return _additive_mask(logits, attn_mask).float().softmax(dim=-1)[:, :, 0]


__all__ = ["MapPoolTower", "map_pool_tower", "map_tokens_through_pool"]
