"""TOMCap (CVPR 2026): retrieval-augmented GPT-2 with cross-attention to CLIP embeddings, trained on text only.

Training (paper §3): a caption's CLIP text embedding is moved onto the image
statistics (``(e - mu_T) * sigma_I / sigma_T + mu_I``), the K captions nearest to
it in a caption datastore are retrieved, and GPT-2 reads
``"Similar images have the following captions: {c1}. ... {cK}. Write a caption:"``
while a cross-attention layer in every block attends to the memory
``[corrected embedding; the K neighbours' CLIP embeddings]``. The target is the
caption of the store nearest to the input, not the input caption. The GPT-2
backbone is frozen; the new cross-attention layers and LoRA (r = 32) on the
self-attention projections train.

Inference (:mod:`capdemo.methods.tomcap.inference`): the CLIP *image* embedding
queries the datastore and fills the memory directly (no correction: the
correction maps text onto image statistics, the image already has them); beam
search decodes and the best beam is the caption (CLIP rerank of the beams is a
capdemo option, ``select_by="clip"``, not the paper's).

No official code exists, so every choice the paper leaves open is a field of
:class:`TOMCapConfig` whose comment gives the default and the reason.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from capdemo.config import Config
from capdemo.encoders import EncoderConfig
from capdemo.gap import GapCorrection, GapStats, gap_noise, inject_noise
from capdemo.lm import (
    IGNORE_INDEX, LM_WEIGHT_PATTERNS, LanguageModelError, decode, embed_tokens, generate_from_embeds, max_positions,
    special_ids,
)
from capdemo.weights import resolve

TARGETS = ("nearest", "input")
SELECT_BY = ("clip", "beam")
TOMCAP_COMPONENT = "tomcap"  # bundle component holding TOMCapConfig
TRAINABLE_WEIGHTS = "tomcap/trainable.safetensors"  # cross-attention + LoRA + memory projection, by parameter name
BUNDLED_LM = "tomcap/lm"  # the base GPT-2 (without cross-attention) and tokenizer, when the bundle carries them
BUNDLED_DATASTORE = "tomcap/datastore"  # the caption datastore, when the bundle carries it
BUNDLED_GAP_STATS = "tomcap/gap_stats.safetensors"  # the statistics the training inputs were corrected with
BUNDLED_RETRIEVER = "tomcap/retriever.safetensors"  # the retrieval encoder's weights, when they are local

# (fan_in, fan_out) of GPT-2's attention projections in units of n_embd: the LoRA targets TOMCap allows.
# Names match peft's suffix rule, so "attn.c_attn" is the self-attention's c_attn and never crossattention's.
LORA_TARGET_SHAPES: dict[str, tuple[int, int]] = {
    "attn.c_attn": (1, 3),
    "attn.c_proj": (1, 1),
    "crossattention.c_attn": (1, 2),
    "crossattention.q_attn": (1, 1),
    "crossattention.c_proj": (1, 1),
}


@dataclass
class TOMCapConfig(Config):
    """Every setting that shapes a TOMCap model; stored in a bundle as component ``"tomcap"``.

    Choices the paper leaves open, and why the defaults are what they are:

    * Target and prompt. With the nearest retrieved caption as target and the K nearest in the
      prompt, the target *is* c1 and training becomes "copy the first caption", which at
      inference returns the image's nearest caption and ignores the memory. By default the
      prompt therefore holds the next K (ranks 2..K+1) and the model must produce a caption the
      memory points at ("similar embeddings produce the same caption"); ``target_in_prompt``
      restores the literal reading.
    * The gap: secondary sources say TOMCap adds Gaussian noise after the mean+std correction, scaled
      separately for the cross-attention input and for the retrieval query. Both scales are relative
      to the image statistics (noise std = scale x sigma_I per dimension), so the noise is measured
      in the spread the correction matched, and nothing is re-normalised afterwards (that would
      undo the matched statistics). Training queries the datastore with the noised corrected
      embedding, an image-like query as IFCap does, once per caption with a seeded draw.
    * The K neighbours enter the memory as their plain CLIP text embeddings (the paper is silent;
      at inference they are text too, so they need no correction).
    * The memory projection (Linear D -> n_embd, then LayerNorm) is always there: CLIP vectors
      are unit-norm, far below GPT-2's hidden scale, and the projection is also what lets a
      D != n_embd encoder feed the cross-attention.
    """

    # ---- language model
    # GPT-2 as a save_pretrained folder, "hf-hub:org/name@rev" or "bundle:..."; the cross-attention
    # layers are added on load (paper: GPT-2 base; pinned to the hub's commit of Feb 2024, which has safetensors)
    lm: str = "hf-hub:openai-community/gpt2@607a30d783dfa663caf39e06633721c8d4cfcd7e"
    embed_dim: int = 512  # D: width of the CLIP embeddings in the memory (ViT-B/32: 512)
    # ---- LoRA on the frozen GPT-2; the new cross-attention layers train fully, so no LoRA on them by default
    lora_r: int = 32  # rank (paper: 32)
    lora_alpha: float = 32.0  # scale alpha / r = 1 (paper: unstated)
    lora_dropout: float = 0.05  # dropout on the LoRA input (paper: unstated; peft's usual value)
    # "the attention projections": q/k/v and output of each self-attention; keys of LORA_TARGET_SHAPES
    lora_targets: tuple[str, ...] = ("attn.c_attn", "attn.c_proj")
    # ---- retrieval
    k: int = 4  # neighbour captions in the prompt and the memory (paper: 4 is best)
    use_retrieval: bool = True  # False: the "without retrieval" ablation (no captions; memory = the input alone)
    # the model that embedded the datastore; None: the captioning CLIP, so one tower pass serves both
    # (shapes world, CPU demo). Paper: SigLIP2 (L/16 per secondary sources), e.g. ViT-B-16-SigLIP2/webli
    retrieval_encoder: EncoderConfig | None = None
    # the caption datastore: "bundle:tomcap/datastore", a local folder or "hf-hub:org/name@rev" (large stores)
    datastore: str | None = None
    # ---- training inputs and targets
    target: str = "nearest"  # "nearest": the store caption nearest to the input (paper); "input": the input (ablation)
    target_in_prompt: bool = False  # target "nearest": True puts it in the prompt as c1 (see the class docstring)
    gap_correction: str = "mean_std"  # onto image statistics: "mean_std" (paper), "mean" (CapDec's offset), "none"
    # training noise on the corrected cross-attention input: std = input_noise_scale x sigma_I per dimension
    # (the value: a sweep in the shapes world, docs/shapes-world-history.md, "TOMCap's gap noise")
    input_noise_scale: float = 0.5
    # the same for the training retrieval queries (image-like queries; 0: the clean corrected embedding)
    query_noise_scale: float = 0.5
    # CapDec's noise instead, for the ablation rows: L2norm(e + n), n ~ N(0, noise_variance) (CapDec: 0.016)
    noise_variance: float = 0.0
    # the statistics of the correction ("bundle:tomcap/gap_stats.safetensors"); for analysis, unused at inference
    gap_stats: str | None = None
    max_caption_tokens: int = 25  # training target tokens including EOS; longer targets are cut (SmallCap: 25)
    # ---- prompt (paper: "Similar images have the following captions: {c1}...{ck}. Write a caption:")
    prompt_template: str = "Similar images have the following captions: {captions}. Write a caption:"
    caption_separator: str = ". "  # joins the neighbours into {captions}, each a sentence (paper: unstated)
    prompt_without_retrieval: str = "Write a caption:"  # the prompt when use_retrieval is False
    # ---- decoding
    beams: int = 3  # beam width; every beam is a candidate (SmallCap, TOMCap's code ancestor: 3)
    max_new_tokens: int = 25  # generation length cap (SmallCap: 25)
    select_by: str = "beam"  # "beam": the beam search's best (paper); "clip": reranked by CLIP cosine (capdemo's)

    def __post_init__(self) -> None:
        if self.target not in TARGETS:
            raise ValueError(f"TOMCapConfig.target must be one of {TARGETS}, got {self.target!r}")
        if self.select_by not in SELECT_BY:
            raise ValueError(f"TOMCapConfig.select_by must be one of {SELECT_BY}, got {self.select_by!r}")
        modes = [mode.value for mode in GapCorrection]
        if self.gap_correction not in modes:
            raise ValueError(f"TOMCapConfig.gap_correction must be one of {modes}, got {self.gap_correction!r}")
        unknown = [t for t in self.lora_targets if t not in LORA_TARGET_SHAPES]
        if unknown or not self.lora_targets:
            raise ValueError(f"TOMCapConfig.lora_targets must be a non-empty subset of {sorted(LORA_TARGET_SHAPES)},"
                             f" got {list(self.lora_targets)}")
        for name in ("embed_dim", "lora_r", "k", "beams", "max_new_tokens", "max_caption_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"TOMCapConfig.{name} must be >= 1, got {getattr(self, name)}")
        noise = (self.noise_variance, self.input_noise_scale, self.query_noise_scale)
        if min(noise) < 0 or not 0 <= self.lora_dropout < 1:
            raise ValueError("TOMCapConfig needs noise_variance, input_noise_scale, query_noise_scale >= 0 and "
                             "0 <= lora_dropout < 1")
        if "{captions}" not in self.prompt_template:
            raise ValueError("TOMCapConfig.prompt_template must contain the {captions} placeholder")

    @property
    def hits_for_training(self) -> int:
        """Store captions retrieved per training caption: the prompt's neighbours, plus the target if not among them."""
        in_prompt = self.k if self.use_retrieval else 0
        separate_target = self.target == "nearest" and not (self.target_in_prompt and self.use_retrieval)
        return in_prompt + int(separate_target)

    def split_hits(self, hit_ids: Sequence[int]) -> tuple[int | None, list[int]]:
        """A training caption's ranked hits -> (target id or None for the input caption, prompt neighbour ids)."""
        hits = list(hit_ids)
        if self.target == "input":
            return None, hits[: self.k] if self.use_retrieval else []
        if not self.use_retrieval:
            return hits[0], []
        return hits[0], hits[: self.k] if self.target_in_prompt else hits[1 : self.k + 1]


def build_prompt(neighbours: Sequence[str], config: TOMCapConfig) -> str:
    """The text GPT-2 reads before the caption; trailing periods of the neighbours give way to the separator."""
    if not config.use_retrieval:
        return config.prompt_without_retrieval
    joined = config.caption_separator.join(text.strip().rstrip(".").strip() for text in neighbours)
    return config.prompt_template.format(captions=joined)


def parameter_count_formula(
    config: TOMCapConfig, *, n_embd: int, n_layer: int, embed_dim: int | None = None
) -> dict[str, int]:
    """Trainable parameters by part, from the architecture alone (n = n_embd, D = embed_dim, L = n_layer).

    memory projection: Linear D -> n and LayerNorm(n): D n + n + 2 n.
    cross-attention per block: c_attn n -> 2n, q_attn n -> n, c_proj n -> n (each with bias), ln_cross_attn:
    4 n^2 + 6 n. LoRA per block and target with shape (a n -> b n): r (a + b) n.
    """
    n, d = n_embd, embed_dim or config.embed_dim
    projection = d * n + n + 2 * n
    cross_attention = n_layer * (4 * n * n + 6 * n)
    lora = n_layer * sum(config.lora_r * n * sum(LORA_TARGET_SHAPES[t]) for t in config.lora_targets)
    return {"projection": projection, "cross_attention": cross_attention, "lora": lora,
            "total": projection + cross_attention + lora}


# --------------------------------------------------------------------------------------------
# The model


def load_gpt2_with_cross_attention(spec: str | Path, *, device: str | torch.device = "cpu") -> tuple[nn.Module, Any]:
    """``(GPT2LMHeadModel with a new, randomly initialised cross-attention layer per block, tokenizer)``."""
    from transformers import AutoTokenizer, GPT2LMHeadModel
    from transformers.utils import logging as hf_logging

    path = resolve(spec, what="TOMCap language model", patterns=LM_WEIGHT_PATTERNS)
    if not path.is_dir():
        raise LanguageModelError(f"TOMCap language model {spec}: expected a folder with config.json, got {path}")
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=False)
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the cross-attention weights are missing from a plain GPT-2 by design: no report
    try:
        lm = GPT2LMHeadModel.from_pretrained(
            path, add_cross_attention=True, use_safetensors=True, trust_remote_code=False
        )
    finally:
        hf_logging.set_verbosity(verbosity)
    return lm.float().to(device).eval(), tokenizer


@dataclass(frozen=True)
class PromptTokens:
    """Token ids of prompts and training examples for one config and tokenizer (picklable, for data workers)."""

    config: TOMCapConfig
    tokenizer: Any
    eos_id: int
    max_positions: int  # the LM's context length

    def prompt_ids(self, neighbours: Sequence[str]) -> list[int]:
        return self.tokenizer(build_prompt(neighbours, self.config), add_special_tokens=False)["input_ids"]

    def room_after(self, prompts: Sequence[Sequence[int]]) -> int:
        """Positions left for new tokens after the longest of ``prompts`` (left-padded to one length)."""
        return self.max_positions - max(len(p) for p in prompts)

    def largest_k(self, captions: Sequence[str], *, room: int, k_max: int) -> int:
        """The largest K (at most ``k_max``) whose prompt leaves ``room`` positions even when its neighbours are
        the K longest of ``captions``; 0 when not even one fits. Only the longest captions are tokenized, so a
        store of millions costs as much as one of hundreds."""
        pool = sorted(captions, key=len, reverse=True)[: 4 * k_max]  # the longest by characters
        longest = sorted(pool, key=lambda text: len(self.tokenizer(text, add_special_tokens=False)["input_ids"]),
                         reverse=True)
        fits = 0
        for k in range(1, min(k_max, len(longest)) + 1):
            if len(self.prompt_ids(longest[:k])) + room > self.max_positions:
                break
            fits = k
        return fits

    def training_tokens(self, neighbours: Sequence[str], target: str) -> tuple[list[int], list[int]]:
        """``(input_ids, labels)`` of one example: prompt, then " target" and EOS; only the target carries labels."""
        prompt = self.prompt_ids(neighbours)
        caption = self.tokenizer(" " + target.strip(), add_special_tokens=False)["input_ids"]
        caption = caption[: self.config.max_caption_tokens - 1] + [self.eos_id]
        if len(prompt) + len(caption) > self.max_positions:
            raise ValueError(f"a TOMCap example is {len(prompt) + len(caption)} tokens, more than the LM's"
                             f" {self.max_positions} positions")
        return prompt + caption, [IGNORE_INDEX] * len(prompt) + caption


class TOMCap(nn.Module):
    """GPT-2 with cross-attention and LoRA, the memory projection and the tokenizer: loss and generation.

    Trainable, and nothing else: the memory projection, every block's ``crossattention`` and
    ``ln_cross_attn``, and the LoRA matrices peft injected (found by type, not by name).
    """

    def __init__(self, config: TOMCapConfig, lm: nn.Module, tokenizer: Any, *, lm_source: str | Path | None = None):
        super().__init__()
        from peft import LoraConfig, inject_adapter_in_model
        from transformers import GPT2LMHeadModel

        if not isinstance(lm, GPT2LMHeadModel) or not lm.config.add_cross_attention:
            raise LanguageModelError("TOMCap needs a GPT2LMHeadModel loaded with add_cross_attention=True")
        self.config = config
        self.tokenizer = tokenizer
        self.lm_source = str(lm_source or config.lm)  # where the base LM was read from (for re-saving a loaded model)
        self.bos_id, self.eos_id, self.pad_id = special_ids(tokenizer)
        self.tokens = PromptTokens(config, tokenizer, self.eos_id, max_positions(lm))
        lora = LoraConfig(r=config.lora_r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
                          target_modules=list(config.lora_targets), fan_in_fan_out=True)  # GPT-2 uses Conv1D (in, out)
        self.lm = inject_adapter_in_model(lora, lm)
        width = lm.config.n_embd
        # CLIP embeddings are unit vectors (entries ~ D^-1/2); the LayerNorm brings them to GPT-2's hidden scale
        self.memory_proj = nn.Sequential(nn.Linear(config.embed_dim, width), nn.LayerNorm(width))
        # (D,) std of the training noise on the corrected input (scale x sigma_I), set for training only
        self.register_buffer("input_noise_std", None, persistent=False)
        self.requires_grad_(False)
        for param in self.trainable_parameters():
            param.requires_grad_(True)

    def trainable_parameters(self) -> list[nn.Parameter]:
        """The explicit trainable set (see the class docstring), each parameter once."""
        from peft.tuners.lora import LoraLayer

        blocks = self.lm.transformer.h
        modules: list[nn.Module] = [self.memory_proj, *(b.crossattention for b in blocks)]
        modules += [b.ln_cross_attn for b in blocks]
        for module in self.lm.modules():
            if isinstance(module, LoraLayer):
                modules += [*module.lora_A.values(), *module.lora_B.values()]
        unique = {id(p): p for module in modules for p in module.parameters()}
        return list(unique.values())

    def trainable_state(self) -> dict[str, torch.Tensor]:
        return {name: param.detach() for name, param in self.named_parameters() if param.requires_grad}

    def load_trainable_state(self, tensors: dict[str, torch.Tensor]) -> None:
        """Copy saved trainable weights in; the names must be exactly this model's trainable set."""
        params = {name: param for name, param in self.named_parameters() if param.requires_grad}
        if set(tensors) != set(params):
            missing, unexpected = sorted(set(params) - set(tensors)), sorted(set(tensors) - set(params))
            raise ValueError(f"TOMCap weights do not fit this config (missing {missing[:3]},"
                             f" unexpected {unexpected[:3]})")
        with torch.no_grad():
            for name, param in params.items():
                param.copy_(tensors[name])

    @property
    def device(self) -> torch.device:
        return self.memory_proj[0].weight.device

    def float_submodules(self) -> list[tuple[str, nn.Module]]:
        """What a serving precision must leave float: :meth:`memory` reads the projection's weight dtype and
        device (one D x n_embd product per image: nothing to gain from int8)."""
        return [("TOMCap.memory_proj", self.memory_proj)]

    def memory(self, input_embeds: torch.Tensor, neighbour_embeds: torch.Tensor | None) -> torch.Tensor:
        """Keys/values of every cross-attention: input (B, D) and neighbours (B, K, D) -> (B, 1 + K, n_embd)."""
        tokens = input_embeds.unsqueeze(1)  # (B, 1, D)
        if neighbour_embeds is not None and neighbour_embeds.shape[1]:
            tokens = torch.cat([tokens, neighbour_embeds.to(tokens.dtype)], dim=1)  # (B, 1 + K, D)
        return self.memory_proj(tokens.to(self.device, self.memory_proj[0].weight.dtype))

    # ---- training

    def set_training_noise(self, gap_stats: GapStats | None) -> None:
        """Scale the input noise to ``gap_stats``' image spread (``input_noise_scale x sigma_I``); a scale > 0
        without statistics is an error naming the fix."""
        scale = self.config.input_noise_scale
        if scale > 0 and gap_stats is None:
            raise ValueError("TOMCap's input noise is scaled to the image statistics: pass --gap-stats (python -m "
                             "training gapstats), or --input-noise-scale 0")
        self.input_noise_std = None if scale == 0 else (scale * gap_stats.sigma_image).to(self.device)

    def loss(self, input_embeds: torch.Tensor, neighbour_embeds: torch.Tensor | None, input_ids: torch.Tensor,
             attention_mask: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Cross-entropy on the target tokens, averaged per caption, then over the batch.

        input_embeds (B, D): gap-corrected text embeddings; the configured noise is added here from torch's
        default generator (the training loop seeds it per step): ``input_noise_std`` per dimension, not
        re-normalised (:meth:`set_training_noise`), and/or CapDec's ``noise_variance`` (re-normalised).
        input_ids, attention_mask, labels (B, L), right-padded, labels IGNORE_INDEX off the target.
        """
        if self.input_noise_std is not None:
            input_embeds = gap_noise(input_embeds.float(), self.input_noise_std)
        if self.config.noise_variance > 0:
            input_embeds = inject_noise(input_embeds.float(), self.config.noise_variance)
        memory = self.memory(input_embeds, neighbour_embeds)  # (B, 1 + K, n_embd)
        logits = self.lm(input_ids=input_ids, attention_mask=attention_mask, encoder_hidden_states=memory).logits
        targets = labels[:, 1:]  # (B, L - 1): position t predicts token t + 1
        per_token = F.cross_entropy(logits[:, :-1].float().transpose(1, 2), targets,
                                    ignore_index=IGNORE_INDEX, reduction="none")  # (B, L - 1)
        counted = (targets != IGNORE_INDEX).sum(1).clamp_min(1)  # (B,)
        return (per_token.sum(1) / counted).mean()

    # ---- generation

    @torch.inference_mode()
    def generate(self, prompts: Sequence[Sequence[int]], memory: torch.Tensor, *, beams: int,
                 max_new_tokens: int) -> list[str]:
        """Beam search for each prompt (token ids) with its memory (B, M, n_embd): B x beams texts, best beam first."""
        length = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), length), self.pad_id, dtype=torch.long, device=self.device)
        mask = torch.zeros_like(ids)
        for row, prompt in enumerate(prompts):  # left padding: every prompt ends where generation starts
            ids[row, length - len(prompt):] = torch.tensor(prompt, dtype=torch.long)
            mask[row, length - len(prompt):] = 1
        new_tokens = generate_from_embeds(
            self.lm, embed_tokens(self.lm, ids), mask, eos_token_id=self.eos_id, pad_token_id=self.pad_id,
            beams=beams, num_return_sequences=beams, max_new_tokens=max_new_tokens, encoder_hidden_states=memory,
        )
        return decode(self.tokenizer, new_tokens)


__all__ = [
    "LORA_TARGET_SHAPES",
    "PromptTokens",
    "TOMCap",
    "TOMCapConfig",
    "build_prompt",
    "load_gpt2_with_cross_attention",
    "parameter_count_formula",
]
