"""Random-weight model stacks for the benchmarks: real-size architectures offline, or the tests' tiny ones.

Latency depends on architecture and shapes, not on trained weights, so the
benchmarks build the paper's architectures with random weights and no download:
open_clip ViT-B/32, GPT-2 base / OPT-125m / OPT-1.3b from their transformers
configs, and a synthetic word-level tokenizer with exactly the LM's vocabulary
size (so any id decodes). Random LMs write arbitrary tokens and could stop at
any step, so :func:`fix_generation_length` makes every beam run to the length
cap: both sides of a comparison then do the same work.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any
from collections.abc import Callable, Sequence

import numpy as np
import torch
from PIL import Image

from capdemo.encoders import ClipEncoder, EncoderConfig, load_encoder
from capdemo.lm import embedding_size
from capdemo.methods.maccap.model import MacCap, MacCapConfig
from capdemo.retrieval import CaptionDatastore, IndexSpec
from capdemo.methods.tomcap.model import TOMCap, TOMCapConfig

SHAPES_BUNDLE = Path(__file__).resolve().parents[1] / "weights" / "shapes"  # the bundle the app ships
REAL_CLIP = "ViT-B-32"  # the papers' CLIP architecture (open_clip name), random weights
REAL_IMAGE_SIZE = 224  # ViT-B/32 input resolution
TINY_IMAGE_SIZE = 32  # capdemo.testing's tiny CLIP input resolution
UNKNOWN_TOKEN = "<unk>"  # id 0 of the synthetic tokenizer: prompt words outside the w<i> vocabulary
CAPTION_WORDS = 10  # words per synthetic datastore caption (COCO captions average ~10.5)
TINY_CAPTION_WORDS = 4  # the tiny GPT-2 has 128 positions: its prompts hold shorter captions


def _gpt2_base(cross_attention: bool):
    from transformers import GPT2Config

    return GPT2Config(add_cross_attention=cross_attention)  # defaults: 124M, 12 x 768, vocab 50257


def _opt_125m(cross_attention: bool):
    from transformers import OPTConfig

    return OPTConfig()  # defaults: 125M, 12 x 768, vocab 50272


def _opt_1_3b(cross_attention: bool):
    from transformers import OPTConfig

    return OPTConfig(hidden_size=2048, num_hidden_layers=24, ffn_dim=8192, num_attention_heads=32,
                     word_embed_proj_dim=2048)


# LM architecture name -> config factory(cross_attention). Only GPT-2 takes cross-attention (TOMCap).
LM_ARCHITECTURES: dict[str, Callable[[bool], Any]] = {
    "gpt2": _gpt2_base,
    "opt-125m": _opt_125m,
    "opt-1.3b": _opt_1_3b,
}


def synthetic_tokenizer(vocab_size: int, *, eos_id: int, bos_id: int | None = None, pad_id: int | None = None):
    """A word-level tokenizer with ids ``0 .. vocab_size-1``: ``<unk>`` at 0, special tokens at the
    LM's ids, ``w<i>`` everywhere else. Words are split on whitespace; ids decode to words joined by spaces."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = {eos_id: "<|endoftext|>"}
    if bos_id is not None and bos_id != eos_id:
        specials[bos_id] = "<|startoftext|>"
    if pad_id is not None and pad_id not in specials:
        specials[pad_id] = "<pad>"
    if 0 in specials:
        raise ValueError("the synthetic tokenizer keeps id 0 for <unk>; the LM's special ids must not use it")
    vocab = {specials.get(i, f"w{i}"): i for i in range(1, vocab_size)}
    vocab[UNKNOWN_TOKEN] = 0
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token=UNKNOWN_TOKEN))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.decoder = decoders.WordPiece(prefix="##")  # joins words with single spaces
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, unk_token=UNKNOWN_TOKEN, eos_token=specials[eos_id],
        bos_token=specials[bos_id if bos_id is not None else eos_id],
        pad_token=specials[pad_id] if pad_id is not None else None,
    )


def random_lm(architecture: str, *, cross_attention: bool = False, seed: int = 0) -> tuple[torch.nn.Module, Any]:
    """``(causal LM with random weights in eval mode, matching synthetic tokenizer)`` for a named architecture."""
    from transformers import AutoModelForCausalLM, GPT2LMHeadModel

    if architecture not in LM_ARCHITECTURES:
        raise ValueError(f"unknown LM architecture {architecture!r}; choose one of {', '.join(LM_ARCHITECTURES)}")
    config = LM_ARCHITECTURES[architecture](cross_attention)
    if cross_attention and not getattr(config, "add_cross_attention", False):
        raise ValueError(f"{architecture} has no cross-attention variant (TOMCap needs GPT-2)")
    torch.manual_seed(seed)
    model = GPT2LMHeadModel(config) if cross_attention else AutoModelForCausalLM.from_config(config)
    tokenizer = synthetic_tokenizer(config.vocab_size, eos_id=config.eos_token_id, bos_id=config.bos_token_id,
                                    pad_id=config.pad_token_id)
    return model.eval(), tokenizer


def fix_generation_length(lm: torch.nn.Module, new_tokens: int) -> None:
    """Every beam generates exactly ``new_tokens`` tokens (EOS is masked until then) when that is the cap."""
    lm.generation_config.min_new_tokens = new_tokens


def random_clip(*, tiny: bool, seed: int = 0, device: str | torch.device = "cpu",
                dtype: torch.dtype = torch.float32) -> ClipEncoder:
    """ViT-B/32 with random weights, or the tests' tiny CLIP."""
    torch.manual_seed(seed)
    if tiny:
        from capdemo.testing import tiny_encoder

        encoder = tiny_encoder(seed=seed)
    else:
        encoder = load_encoder(EncoderConfig(model_name=REAL_CLIP, pretrained=None))
    encoder.model.to(device, dtype)
    return encoder


def image_size(*, tiny: bool) -> int:
    return TINY_IMAGE_SIZE if tiny else REAL_IMAGE_SIZE


def random_pixels(count: int, *, tiny: bool, seed: int = 0, device: str | torch.device = "cpu") -> torch.Tensor:
    """Preprocessed-looking input (count, 3, H, W): standard-normal pixels."""
    size = image_size(tiny=tiny)
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(count, 3, size, size, generator=generator).to(device)


def random_images(count: int, *, size: int = REAL_IMAGE_SIZE, seed: int = 0) -> list[Image.Image]:
    """Distinct RGB noise images (distinct content, so no encoder cache hit between them)."""
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)) for _ in range(count)]


# ----------------------------------------------------------------------------------------- MacCap


@dataclass
class MacCapStack:
    """A MacCap model with its CLIP, and what it is."""

    encoder: ClipEncoder
    model: MacCap
    architecture: str  # "ViT-B-32 + gpt2", or "tiny"


def maccap_stack(*, tiny: bool, lm: str = "gpt2", samples: int = 20, beams: int = 4, new_tokens: int = 16,
                 device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32, seed: int = 0,
                 encoder: ClipEncoder | None = None) -> MacCapStack:
    """Random MacCap with the paper's adaptor (N_q = 32 queries, N_cr = 10 regions) and a fixed caption length.

    ``tiny``: the tests' tiny CLIP and GPT-2 with a 4-query adaptor. ``encoder``: share an existing CLIP.
    """
    if encoder is None:
        encoder = random_clip(tiny=tiny, seed=seed, device=device, dtype=dtype)
    if tiny:
        from capdemo.testing import tiny_gpt2, tiny_tokenizer

        tokenizer = tiny_tokenizer()
        language_model = tiny_gpt2(tokenizer, seed=seed)
        adaptor = dict(n_cr=4, n_query=4, heads=4, ffn_dim=64)
        name = "tiny"
    else:
        language_model, tokenizer = random_lm(lm, seed=seed)
        adaptor = {}
        name = f"{REAL_CLIP} + {lm}"
    config = MacCapConfig(lm=f"random:{name}", lm_embed_dim=embedding_size(language_model),
                          embed_dim=encoder.embed_dim, samples=samples, beams=beams, max_new_tokens=new_tokens,
                          **adaptor)
    torch.manual_seed(seed)
    model = MacCap(config, language_model, tokenizer).to(device, dtype).eval()
    fix_generation_length(model.lm, new_tokens)
    return MacCapStack(encoder=encoder, model=model, architecture=name)


# ----------------------------------------------------------------------------------------- TOMCap


@dataclass
class TOMCapStack:
    encoder: ClipEncoder
    model: TOMCap
    architecture: str


def tomcap_stack(*, tiny: bool, beams: int = 3, new_tokens: int = 25, k: int = 4,
                 device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32, seed: int = 0,
                 encoder: ClipEncoder | None = None) -> TOMCapStack:
    """Random TOMCap: GPT-2 base with cross-attention and LoRA r = 32 (or the tiny GPT-2 with r = 4).

    ``encoder``: share an existing CLIP.
    """
    if encoder is None:
        encoder = random_clip(tiny=tiny, seed=seed, device=device, dtype=dtype)
    if tiny:
        from capdemo.testing import tiny_gpt2, tiny_tokenizer

        tokenizer = tiny_tokenizer()
        language_model = tiny_gpt2(tokenizer, cross_attention=True, seed=seed)
        lora = dict(lora_r=4, lora_alpha=4.0)
        name = "tiny"
    else:
        language_model, tokenizer = random_lm("gpt2", cross_attention=True, seed=seed)
        lora = {}
        name = f"{REAL_CLIP} + gpt2 (cross-attention, LoRA)"
    config = TOMCapConfig(lm=f"random:{name}", embed_dim=encoder.embed_dim, k=k, beams=beams,
                          max_new_tokens=new_tokens, **lora)
    torch.manual_seed(seed)
    model = TOMCap(config, language_model, tokenizer).to(device, dtype).eval()
    fix_generation_length(model.lm, new_tokens)
    return TOMCapStack(encoder=encoder, model=model, architecture=name)


def synthetic_captions(count: int, *, words: Sequence[str], length: int = CAPTION_WORDS, seed: int = 0) -> list[str]:
    """``count`` captions of ``length`` words drawn from ``words``."""
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, len(words), size=(count, length))
    return [" ".join(words[i] for i in row) for row in picks]


def caption_words(tokenizer: Any, *, tiny: bool) -> list[str]:
    """Words that are single tokens of the LM's tokenizer: ``w<i>`` (synthetic) or the tiny corpus's words."""
    if tiny:
        from capdemo.testing import TINY_CORPUS

        return sorted({word for caption in TINY_CORPUS for word in caption.split()})
    vocabulary = tokenizer.get_vocab()
    return [word for word in (f"w{i}" for i in range(1, len(tokenizer))) if word in vocabulary]


def synthetic_datastore(count: int, *, encoder_name: str, dim: int, kind: str, words: Sequence[str],
                        length: int = CAPTION_WORDS, seed: int = 0) -> CaptionDatastore:
    """A caption datastore of random unit vectors (embedding real captions with CLIP would dominate the run).

    Search cost depends on the count, the dim and the index kind, not on the vectors' meaning.
    """
    rng = np.random.default_rng(seed)
    vectors = rng.standard_normal((count, dim), dtype=np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    captions = synthetic_captions(count, words=words, length=length, seed=seed)
    return CaptionDatastore.build(vectors, captions, encoder_name=encoder_name, spec=IndexSpec(kind=kind, seed=seed))


# ----------------------------------------------------------------------------------------- bundles


def app_bundle(scratch: str | Path, *, tiny: bool) -> tuple[Path, str]:
    """``(bundle folder, name)``: the shipped shapes bundle when present (and not ``tiny``), else the tiny
    random test bundle built into ``scratch``."""
    if not tiny and (SHAPES_BUNDLE / "bundle.json").is_file():
        return SHAPES_BUNDLE, "shapes"
    from capdemo.testing import build_tiny_bundle

    return build_tiny_bundle(Path(scratch) / "tiny"), "tiny"
