"""MacCap (AAAI 2024): region features from CLIP, an adaptor-decoder prefix, a causal LM, CLIP reranking.

Text-only training (paper §4.2): a caption's CLIP text embedding T_c is copied
N_cr times, each copy gets Gaussian noise and is L2-normalised (eq. 2-4); the
adaptor's N_q learnable queries read those copies through one transformer
decoder layer, an MLP maps them into the LM's embedding space (eq. 5-8), and the
LM reconstructs the caption from that prefix (eq. 9).

Inference (§4.3): the N_cr patches the CLS token attends to most are picked, each
picked token's attention row pools all tokens into a subregion feature I_s,
I_c is added (eq. 10-13), and the same noise as in training makes S samples; every
sample is decoded with beam search and CLIP picks the caption closest to the image.

Where the official code (Artanic30/MacCap @ 1802bff) differs from the paper and
someone may want its behaviour, :class:`MacCapConfig` has a switch; each field's
comment says which value is the paper's and which the reference code's.
Inference, batched, lives in :mod:`capdemo.methods.maccap.inference`.
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
from capdemo.features import ImageFeatures
from capdemo.gap import inject_noise
from capdemo.lm import load_causal_lm, save_causal_lm
from capdemo.prefix_lm import PrefixLM

REGION_COMBINE_MODES = ("mean", "sum")
REGION_MODES = ("subregion", "cls")  # Table 5's inference rows: subregion aggregation (I_cr), or the CLS token alone
from capdemo.vqa import MATCH_MODES as VQA_MATCH_MODES  # noqa: E402
MACCAP_COMPONENT = "maccap"  # bundle component holding MacCapConfig
ADAPTOR_WEIGHTS = "maccap/adaptor.safetensors"  # bundle file with the adaptor's state dict
BUNDLED_LM = "maccap/lm"  # bundle folder with the LM and tokenizer (save_pretrained), when the bundle carries them


@dataclass
class MacCapConfig(Config):
    """Every setting that shapes a MacCap model; stored in a bundle as component ``"maccap"``."""

    # ---- language model
    # Causal LM: local save_pretrained folder, "hf-hub:org/name@rev", or "bundle:<path>" (paper: OPT-1.3b,
    # pinned to the commit that has been the hub's main since 2023-09-15)
    lm: str = "hf-hub:facebook/opt-1.3b@3f5c25d0bc631cb57ac65913f76e22c2dfb61d62"
    lm_embed_dim: int = 2048  # E: width of the LM's input embeddings = the adaptor's output (OPT-1.3b: 2048)
    # Paper: False, the LM stays frozen. True trains it with the adaptor, as CapDec/DeCap do: a tiny LM trained
    # unconditionally and then frozen cannot be steered by a prefix (shapes world: 0.02-0.04 vs 0.92 text-to-text).
    train_lm: bool = False
    bos_after_prefix: bool = True  # LM's BOS embedding after the prefix, in training and inference (reference: yes)
    max_caption_tokens: int = 25  # training: LM tokens per caption incl. EOS; longer ones are cut (reference: 25)
    # ---- CLIP regions (eq. 10-13)
    embed_dim: int = 512  # D: CLIP joint-space dimension (ViT-B/32: 512)
    n_cr: int = 10  # N_cr: noisy text copies in training = patches picked at inference (paper: 10)
    # Table 5's training rows: None = "multiple token" (N_cr noisy copies of the text embedding, the paper);
    # 1 = "single token" (one noisy copy in the adaptor's memory)
    text_copies: int | None = None
    # Table 5's inference rows: "subregion" = subregion aggregation I_cr = (I_s + I_c) (the paper); "cls" = the
    # CLS token I_c alone (I_cr without I_s), repeated N_cr times so the memory has the trained size
    region_mode: str = "subregion"
    # Paper: top-N_cr among the patches only (False). Reference: over all tokens, so CLS itself may be picked.
    include_cls_in_topk: bool = False
    # Paper: A is the picked tokens' attention rows as they are (False). Reference: softmax applied to these
    # probabilities again, which makes the rows nearly uniform (I_s close to a mean over all tokens).
    resoftmax_attention_rows: bool = False
    # L2-normalise the tokens, I_s and I_c before combining (reference: True). The paper leaves scales open;
    # True keeps I_cr on the unit scale of the noisy text features the adaptor was trained on.
    normalise_region_parts: bool = True
    # "mean": I_cr = (I_s + I_c) / 2, the paper's text ("the average"); "sum": eq. 13 and the reference code.
    # Only the size of the inference noise relative to I_cr differs (the noisy sum is L2-normalised).
    region_combine: str = "mean"
    # ---- adaptor decoder (eq. 5-8)
    n_query: int = 32  # N_q learnable queries = prefix length (paper: unstated; reference: 32)
    width: int | None = None  # query/decoder width; None = embed_dim (reference: 512 = D); else regions are projected
    heads: int = 8  # attention heads (paper and reference: 8)
    layers: int = 1  # transformer decoder layers (paper and reference: 1)
    ffn_dim: int = 2048  # decoder feed-forward width, ReLU (reference: 2048)
    dropout: float = 0.1  # decoder dropout on attention and FFN (reference: 0.1)
    norm_first: bool = False  # False = post-norm as in the original Transformer and the reference code
    # LayerNorm on the region features before cross-attention (ours; paper and reference: none). Unit CLIP
    # vectors have per-dimension scale 1/sqrt(D), far below the queries', so without it the prefix barely
    # depends on the input at first; measured on a tiny world: 0.25 -> 0.97 text-to-text after 400 steps.
    memory_layernorm: bool = False
    final_norm: bool = True  # LayerNorm on the decoder output (reference: yes)
    mlp_hidden_dim: int | None = None  # MLP hidden width; None = width (reference: MLP(512, 512, 2048, 3))
    mlp_layers: int = 3  # Linear layers in the MLP, ReLU between them (reference: 3)
    # ---- noise, sampling, decoding
    noise_variance: float = 0.016  # sigma^2 per dimension of the Gaussian noise, training and inference (paper)
    samples: int = 20  # S noisy samples reranked by CLIP at inference (paper: 20; reference default: 4)
    beams: int = 4  # beam width per sample (paper: 4)
    max_new_tokens: int = 16  # generation length cap (reference: 16)
    # ---- VQA (paper §4.4)
    # "clip": rank the candidate answers by CLIP text cosine with the LM's answer (paper);
    # "word": the candidates that occur as whole words in the LM's answer (reference code).
    vqa_match: str = "clip"
    vqa_max_new_tokens: int = 10  # length cap of the LM's free-form answer

    def __post_init__(self) -> None:
        if self.region_mode not in REGION_MODES:
            raise ValueError(f"MacCapConfig.region_mode must be one of {REGION_MODES}, got {self.region_mode!r}")
        if self.text_copies is not None and self.text_copies < 1:
            raise ValueError(f"MacCapConfig.text_copies must be None or >= 1, got {self.text_copies}")
        if self.region_combine not in REGION_COMBINE_MODES:
            raise ValueError(
                f"MacCapConfig.region_combine must be one of {REGION_COMBINE_MODES}, got {self.region_combine!r}"
            )
        if self.vqa_match not in VQA_MATCH_MODES:
            raise ValueError(f"MacCapConfig.vqa_match must be one of {VQA_MATCH_MODES}, got {self.vqa_match!r}")
        for name in ("n_cr", "n_query", "heads", "layers", "mlp_layers", "samples", "beams", "max_new_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"MacCapConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.adaptor_width % self.heads:
            raise ValueError(f"MacCapConfig: adaptor width {self.adaptor_width} is not divisible by heads={self.heads}")
        if self.noise_variance < 0:
            raise ValueError(f"MacCapConfig.noise_variance must be >= 0, got {self.noise_variance}")

    @property
    def adaptor_width(self) -> int:
        return self.width if self.width is not None else self.embed_dim


# --------------------------------------------------------------------------------------------
# Sub-region feature aggregation (eq. 10-13)


def select_patches(
    features: ImageFeatures, n_cr: int, *, include_cls: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``n_cr`` tokens the pooling query attends to most (head-averaged), highest first.

    The query is the CLS token in the last block, or a MAP head's latent (towers without a CLS
    token; see :class:`ImageFeatures`). Returns ``(token_index (B, N_cr), attention (B, N_cr))``;
    indices count all T tokens, so patch ``p`` is token ``p + num_prefix_tokens``.
    """
    scores = features.cls_attention_mean  # (B, T)
    if not include_cls:
        scores = scores.clone()
        scores[:, : features.num_prefix_tokens] = float("-inf")
    available = scores.shape[1] - (0 if include_cls else features.num_prefix_tokens)
    if not 1 <= n_cr <= available:
        raise ValueError(f"n_cr must be between 1 and {available} (the tokens this encoder has), got {n_cr}")
    attention, token_index = scores.topk(n_cr, dim=-1)  # (B, N_cr) each, sorted descending
    return token_index, attention


def aggregate_regions(
    features: ImageFeatures,
    token_index: torch.Tensor,
    *,
    resoftmax: bool = False,
    normalise_parts: bool = True,
    combine: str = "mean",
) -> torch.Tensor:
    """I_cr (B, N_cr, D): each picked token's attention row pools all tokens (I_s = A I'_p), plus I_c."""
    attention = features.attention.mean(dim=1)  # (B, T, T) head-averaged
    num_tokens = attention.shape[-1]
    rows = attention.gather(1, token_index.unsqueeze(-1).expand(-1, -1, num_tokens))  # (B, N_cr, T) = A
    if resoftmax:
        rows = rows.softmax(dim=-1)
    tokens = features.token_embeds  # (B, T, D) = I'_p
    global_embed = features.global_embeds  # (B, D) = I_c: the projected CLS token (eq. 11), or a MAP head's output
    if normalise_parts:
        tokens, global_embed = F.normalize(tokens, dim=-1), F.normalize(global_embed, dim=-1)
    subregions = torch.bmm(rows, tokens)  # (B, N_cr, D) = I_s
    if normalise_parts:
        subregions = F.normalize(subregions, dim=-1)
    regions = subregions + global_embed.unsqueeze(1)  # (B, N_cr, D)
    return regions / 2 if combine == "mean" else regions


def image_regions(
    features: ImageFeatures, config: MacCapConfig, *, n_cr: int | None = None, region_mode: str | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(token_index (B, N_cr), attention (B, N_cr), regions (B, N_cr, D))`` with the config's switches.

    ``region_mode`` "cls" (Table 5's "CLS token" row) makes every region the normalised global embedding I_c;
    the picked patches are still returned, to show what subregion aggregation would have used.
    """
    token_index, attention = select_patches(features, n_cr or config.n_cr, include_cls=config.include_cls_in_topk)
    if (region_mode or config.region_mode) == "cls":
        global_embed = F.normalize(features.global_embeds, dim=-1)  # (B, D) = I_c
        return token_index, attention, global_embed.unsqueeze(1).expand(-1, token_index.shape[1], -1)
    regions = aggregate_regions(
        features, token_index, resoftmax=config.resoftmax_attention_rows,
        normalise_parts=config.normalise_region_parts, combine=config.region_combine,
    )
    return token_index, attention, regions


def text_regions(
    text_embeds: torch.Tensor, n_cr: int, variance: float, *, generator: torch.Generator | None = None
) -> torch.Tensor:
    """T_cr (B, N_cr, D): N_cr independently noised, L2-normalised copies of each text embedding (eq. 2-4).

    Without a generator the noise comes from torch's default one, which the training loop seeds per step.
    """
    copies = F.normalize(text_embeds.float(), dim=-1).unsqueeze(1).expand(-1, n_cr, -1)  # (B, N_cr, D)
    return inject_noise(copies, variance, generator=generator)


# --------------------------------------------------------------------------------------------
# Adaptor decoder (eq. 5-8)


def _mlp(width_in: int, hidden: int, width_out: int, layers: int) -> nn.Sequential:
    sizes = [width_in] + [hidden] * (layers - 1) + [width_out]
    modules: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes, sizes[1:])):
        modules.append(nn.Linear(a, b))
        if i < layers - 1:
            modules.append(nn.ReLU())
    return nn.Sequential(*modules)


class MacCapAdaptor(nn.Module):
    """N_q learnable queries: self-attention, cross-attention over the region features, FFN; then an MLP to the LM."""

    def __init__(self, config: MacCapConfig):
        super().__init__()
        width = config.adaptor_width
        self.queries = nn.Parameter(torch.randn(config.n_query, width))  # Q (N_q, W), N(0, 1) as nn.Embedding's init
        project = nn.Identity() if width == config.embed_dim else nn.Linear(config.embed_dim, width)
        self.memory_in = nn.Sequential(nn.LayerNorm(config.embed_dim), project) if config.memory_layernorm else project
        layer = nn.TransformerDecoderLayer(
            width, config.heads, config.ffn_dim, config.dropout,
            activation="relu", batch_first=True, norm_first=config.norm_first,
        )  # self-attention, cross-attention to the memory, FFN: eq. 5-7
        final_norm = nn.LayerNorm(width) if config.final_norm else None
        self.decoder = nn.TransformerDecoder(layer, config.layers, norm=final_norm)
        self.mlp = _mlp(width, config.mlp_hidden_dim or width, config.lm_embed_dim, config.mlp_layers)  # eq. 8

    def forward(self, regions: torch.Tensor) -> torch.Tensor:
        """Region features (N, N_cr, D) -> prefix E (N, N_q, E_lm)."""
        memory = self.memory_in(regions)  # (N, N_cr, W)
        queries = self.queries.unsqueeze(0).expand(regions.shape[0], -1, -1)  # (N, N_q, W)
        return self.mlp(self.decoder(queries, memory))  # (N, N_q, E_lm)


# --------------------------------------------------------------------------------------------
# The model: adaptor + LM


class MacCap(PrefixLM):
    """Adaptor and causal LM with the tokenizer: prefix, training loss and generation (:class:`PrefixLM`)."""

    def __init__(self, config: MacCapConfig, lm: nn.Module, tokenizer: Any):
        super().__init__(config, lm, tokenizer)
        self.adaptor = MacCapAdaptor(config)

    @property
    def prefix_length(self) -> int:
        return self.config.n_query

    def prefix(self, regions: torch.Tensor) -> torch.Tensor:
        """Region features (N, N_cr, D) -> the adaptor's prefix (N, N_q, E)."""
        return self.adaptor(regions.to(self.device, self.adaptor.queries.dtype))

    def loss(
        self, text_embeds: torch.Tensor, token_ids: torch.Tensor, attention_mask: torch.Tensor,
        *, generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Eq. 9 on noisy text regions: token cross-entropy averaged per caption, then over the batch.

        text_embeds (B, D) CLIP text embeddings; token_ids / attention_mask (B, L) from :meth:`tokenize`.
        The noise comes from ``generator``, or torch's default one (seeded per step by the training loop).
        """
        copies = self.config.text_copies or self.config.n_cr
        regions = text_regions(text_embeds, copies, self.config.noise_variance, generator=generator)
        return self.caption_loss(regions, token_ids, attention_mask)  # regions (B, copies, D)

    @torch.inference_mode()
    def generate(
        self, regions: torch.Tensor, *, beams: int | None = None, max_new_tokens: int | None = None
    ) -> list[str]:
        """Region features (N, N_cr, D) -> N captions."""
        return self.generate_from_prompt(
            self.prompt_embeds(regions),
            beams=beams or self.config.beams, max_new_tokens=max_new_tokens or self.config.max_new_tokens,
        )


@torch.inference_mode()
def caption_text_embeddings(
    model: MacCap, text_embeds: torch.Tensor, *, beams: int = 1, max_new_tokens: int | None = None,
    noise_variance: float = 0.0, seed: int = 0,
) -> list[str]:
    """Text-to-text reconstruction: a caption from each CLIP text embedding (B, D) as N_cr copies.

    The ceiling of text-only training (no modality gap): a trained model should
    give back the caption it was trained on. ``noise_variance > 0`` adds the
    training noise (seeded).
    """
    generator = torch.Generator().manual_seed(seed)
    regions = text_regions(text_embeds, model.config.n_cr, noise_variance, generator=generator)  # (B, N_cr, D)
    return model.generate(regions, beams=beams, max_new_tokens=max_new_tokens)


# --------------------------------------------------------------------------------------------
# Bundles


def add_to_bundle(writer: Any, model: MacCap, *, include_lm: bool) -> None:
    """Record a trained model in a ``BundleWriter``: config, adaptor weights and, if asked, LM + tokenizer.

    Include the LM when it was trained or is a local model; a frozen hub LM is
    recorded by its pinned ``hf-hub:`` spec only.
    """
    config = model.config
    writer.add_tensors(ADAPTOR_WEIGHTS, model.adaptor.state_dict())
    if include_lm:
        with tempfile.TemporaryDirectory() as folder:
            save_causal_lm(model.lm, model.tokenizer, folder)
            writer.add_directory(BUNDLED_LM, folder)
        config = config.replace(lm=IN_BUNDLE_PREFIX + BUNDLED_LM)
    writer.add_component(MACCAP_COMPONENT, config.to_dict())


def load_from_bundle(bundle: Any, *, device: str | torch.device = "cpu", dtype: torch.dtype | None = None) -> MacCap:
    """Rebuild the bundle's MacCap (eval mode) exactly from its stored config and weights."""
    config = MacCapConfig.from_dict(bundle.component(MACCAP_COMPONENT))
    lm, tokenizer = load_causal_lm(bundle.locate(config.lm), dtype=dtype, device=device)
    model = MacCap(config, lm, tokenizer)
    model.adaptor.load_state_dict(bundle.tensors(ADAPTOR_WEIGHTS))
    return model.to(device).eval()


__all__ = [
    "MacCap",
    "MacCapAdaptor",
    "MacCapConfig",
    "add_to_bundle",
    "aggregate_regions",
    "caption_text_embeddings",
    "image_regions",
    "load_from_bundle",
    "select_patches",
    "text_regions",
]
