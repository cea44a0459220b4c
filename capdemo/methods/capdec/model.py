"""CapDec (Nukrai et al., EMNLP Findings 2022): a CLIP embedding, a learned mapping to an LM prefix, the LM.

Text-only training: a caption's CLIP text embedding is L2-normalised, Gaussian noise of variance
0.016 per dimension is added and the result re-normalised (the noise stands in for the modality
gap); a mapper turns it into a prefix of ``prefix_length`` vectors in the LM's input-embedding
space, and the LM, trained with the mapper, reconstructs the caption. At inference the normalised
CLIP *image* embedding takes the text's place and beam search decodes (no CLIP rerank).

The mapper is ClipCap's, which CapDec builds on (DavidHuji/CapDec ``train.py``): ``"transformer"``
projects the embedding into ``clip_length`` vectors, appends ``prefix_length`` learned constants
and runs a pre-norm transformer over both, keeping the constants' outputs (CapDec's default:
8 layers, 8 heads, 40 + 40 positions); ``"mlp"`` is ClipCap's two-layer tanh MLP.
Where we depart from that code, :class:`CapDecConfig` says so next to the field.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from capdemo.bundle import IN_BUNDLE_PREFIX
from capdemo.config import Config
from capdemo.gap import inject_noise
from capdemo.lm import load_causal_lm, save_causal_lm
from capdemo.prefix_lm import PrefixLM

MAPPERS = ("transformer", "mlp")
CAPDEC_COMPONENT = "capdec"  # bundle component holding CapDecConfig
MAPPER_WEIGHTS = "capdec/mapper.safetensors"  # the mapper's state dict
BUNDLED_LM = "capdec/lm"  # the LM and tokenizer (trained with the mapper, so always carried)


@dataclass
class CapDecConfig(Config):
    """Every setting that shapes a CapDec model; stored in a bundle as component ``"capdec"``."""

    # ---- language model
    # Causal LM: folder, "hf-hub:org/name@rev" or "bundle:<path>" (CapDec: GPT-2 base, pinned to the Feb 2024 commit)
    lm: str = "hf-hub:openai-community/gpt2@607a30d783dfa663caf39e06633721c8d4cfcd7e"
    lm_embed_dim: int = 768  # E: width of the LM's input embeddings (GPT-2 base: 768)
    train_lm: bool = True  # CapDec trains the LM with the mapper (its default; ClipCap's --only_prefix freezes it)
    bos_after_prefix: bool = False  # CapDec feeds the caption tokens right after the prefix
    # training target tokens incl. EOS (ours: capdemo appends EOS so beam search ends; ClipCap stops at a period)
    max_caption_tokens: int = 25
    # ---- mapper
    embed_dim: int = 512  # D: CLIP joint-space dimension (CapDec: RN50x4, 640; ViT-B/32: 512)
    mapper: str = "transformer"  # one of MAPPERS (CapDec's default: transformer)
    prefix_length: int = 40  # prefix vectors the LM reads (CapDec: 40)
    clip_length: int = 40  # vectors the embedding is projected into before the transformer (CapDec: 40)
    mapper_layers: int = 8  # transformer layers (CapDec: 8)
    mapper_heads: int = 8  # attention heads (CapDec: 8)
    mapper_mlp_ratio: float = 2.0  # feed-forward width over the model width (ClipCap's Transformer: 2)
    # ---- noise and decoding
    noise_variance: float = 0.016  # sigma^2 per dimension on the normalised text embedding, training only (paper)
    beams: int = 5  # beam width at inference (ClipCap's generate_beam: 5); the best beam is the caption
    max_new_tokens: int = 20  # generation length cap

    def __post_init__(self) -> None:
        if self.mapper not in MAPPERS:
            raise ValueError(f"CapDecConfig.mapper must be one of {MAPPERS}, got {self.mapper!r}")
        for name in ("embed_dim", "lm_embed_dim", "prefix_length", "clip_length", "mapper_layers", "mapper_heads",
                     "max_caption_tokens", "beams", "max_new_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"CapDecConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.mapper == "transformer" and self.lm_embed_dim % self.mapper_heads:
            raise ValueError(f"CapDecConfig: lm_embed_dim {self.lm_embed_dim} is not divisible by "
                             f"mapper_heads={self.mapper_heads}")
        if self.noise_variance < 0:
            raise ValueError(f"CapDecConfig.noise_variance must be >= 0, got {self.noise_variance}")


class TransformerMapper(nn.Module):
    """ClipCap's mapper: embedding (N, D) -> clip_length projected vectors + prefix_length learned constants
    -> pre-norm transformer -> the constants' outputs, the prefix (N, P, E)."""

    def __init__(self, config: CapDecConfig):
        super().__init__()
        width = config.lm_embed_dim
        self.clip_length = config.clip_length
        self.project = nn.Linear(config.embed_dim, config.clip_length * width)  # (D) -> (clip_length * E)
        self.constants = nn.Parameter(torch.randn(config.prefix_length, width))  # (P, E), N(0, 1) as ClipCap
        layer = nn.TransformerEncoderLayer(width, config.mapper_heads, int(width * config.mapper_mlp_ratio),
                                           dropout=0.0, activation="relu", batch_first=True, norm_first=True)
        self.transformer = nn.TransformerEncoder(layer, config.mapper_layers, enable_nested_tensor=False)

    def forward(self, embeds: torch.Tensor) -> torch.Tensor:
        projected = self.project(embeds).view(embeds.shape[0], self.clip_length, -1)  # (N, C, E)
        constants = self.constants.unsqueeze(0).expand(embeds.shape[0], -1, -1)  # (N, P, E)
        return self.transformer(torch.cat([projected, constants], dim=1))[:, self.clip_length :]  # (N, P, E)


class MLPMapper(nn.Module):
    """ClipCap's MLP mapper: D -> P*E/2 -> P*E with tanh, reshaped to the prefix (N, P, E)."""

    def __init__(self, config: CapDecConfig):
        super().__init__()
        out = config.prefix_length * config.lm_embed_dim
        self.prefix_length = config.prefix_length
        self.mlp = nn.Sequential(nn.Linear(config.embed_dim, out // 2), nn.Tanh(), nn.Linear(out // 2, out))

    def forward(self, embeds: torch.Tensor) -> torch.Tensor:
        return self.mlp(embeds).view(embeds.shape[0], self.prefix_length, -1)  # (N, P, E)


class CapDec(PrefixLM):
    """Mapper and causal LM with the tokenizer: prefix, training loss and generation (:class:`PrefixLM`)."""

    def __init__(self, config: CapDecConfig, lm: nn.Module, tokenizer: Any):
        super().__init__(config, lm, tokenizer)
        self.mapper = TransformerMapper(config) if config.mapper == "transformer" else MLPMapper(config)

    @property
    def prefix_length(self) -> int:
        return self.config.prefix_length

    def prefix(self, embeds: torch.Tensor) -> torch.Tensor:
        """CLIP embeddings (N, D), normalised here -> the prefix (N, P, E)."""
        weight = next(self.mapper.parameters())
        return self.mapper(F.normalize(embeds.to(weight.device, weight.dtype), dim=-1))

    def loss(self, text_embeds: torch.Tensor, token_ids: torch.Tensor, attention_mask: torch.Tensor,
             *, generator: torch.Generator | None = None) -> torch.Tensor:
        """Caption cross-entropy from noisy text embeddings (B, D): ``L2norm(L2norm(e) + n)``, n ~ N(0, var).

        The noise comes from ``generator``, or torch's default one (seeded per step by the training loop).
        """
        noisy = inject_noise(F.normalize(text_embeds.float(), dim=-1), self.config.noise_variance, generator=generator)
        return self.caption_loss(noisy, token_ids, attention_mask)

    @torch.inference_mode()
    def generate(self, embeds: torch.Tensor, *, beams: int, max_new_tokens: int) -> list[str]:
        """CLIP embeddings (N, D) -> N x beams captions, best beam first for each."""
        return self.generate_from_prompt(self.prompt_embeds(embeds), beams=beams, max_new_tokens=max_new_tokens,
                                         num_return_sequences=beams)


# --------------------------------------------------------------------------------------------
# Bundles


def add_to_bundle(writer: Any, model: CapDec) -> None:
    """Record a trained model in a ``BundleWriter``: config, mapper weights, and the LM + tokenizer it trained."""
    writer.add_tensors(MAPPER_WEIGHTS, model.mapper.state_dict())
    with tempfile.TemporaryDirectory() as folder:
        save_causal_lm(model.lm, model.tokenizer, folder)
        writer.add_directory(BUNDLED_LM, folder)
    writer.add_component(CAPDEC_COMPONENT, model.config.replace(lm=IN_BUNDLE_PREFIX + BUNDLED_LM).to_dict())


def load_from_bundle(bundle: Any, *, device: str | torch.device = "cpu") -> CapDec:
    """Rebuild the bundle's CapDec (eval mode) exactly from its stored config and weights."""
    config = CapDecConfig.from_dict(bundle.component(CAPDEC_COMPONENT))
    lm, tokenizer = load_causal_lm(bundle.locate(config.lm), device=device)
    model = CapDec(config, lm, tokenizer)
    model.mapper.load_state_dict(bundle.tensors(MAPPER_WEIGHTS))
    return model.to(device).eval()


__all__ = ["CAPDEC_COMPONENT", "CapDec", "CapDecConfig", "MLPMapper", "TransformerMapper", "add_to_bundle",
           "load_from_bundle"]
