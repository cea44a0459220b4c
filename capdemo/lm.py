"""Causal language models through transformers: loading, embedding access, generation from embeddings.

Both methods drive a stock ``AutoModelForCausalLM`` (OPT, GPT-2, ...) with a
sequence of input *embeddings* rather than token ids: a learned prefix (MacCap)
or a prompt (VQA, TOMCap). What differs between LM families is read from the
model itself (``get_input_embeddings()``, the generation config), never guessed
from its name. Weights load only from safetensors and never run remote code.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any
from collections.abc import Sequence

import torch
from torch import nn

from capdemo.beam_cache import prompt_cache
from capdemo.weights import resolve

LM_WEIGHT_PATTERNS = ("*.json", "*.safetensors", "*.txt", "*.model")  # hub files a model + tokenizer need
IGNORE_INDEX = -100  # label value the training losses skip (prefix, prompt and padding positions)
_WHITESPACE = re.compile(r"\s+")


class LanguageModelError(ValueError):
    """A language model or tokenizer that cannot drive generation as asked."""


def load_causal_lm(
    spec: str | Path,
    *,
    dtype: torch.dtype | None = None,
    device: str | torch.device = "cpu",
) -> tuple[nn.Module, Any]:
    """``(model, tokenizer)`` from a local ``save_pretrained`` folder or ``hf-hub:org/name@rev``.

    The model is returned in eval mode; ``dtype=None`` keeps the checkpoint's
    stored dtype. Pickle checkpoints (``pytorch_model.bin``) are refused.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve(spec, what="language model", patterns=LM_WEIGHT_PATTERNS)
    if not path.is_dir():
        raise LanguageModelError(f"language model {spec}: expected a folder with config.json, got the file {path}")
    if not any(path.glob("*.safetensors")):
        raise LanguageModelError(
            f"language model {spec}: no *.safetensors weights in {path}; capdemo never loads pickle checkpoints "
            "(pytorch_model.bin): use a revision or folder with model.safetensors, e.g. the hub's safetensors "
            "conversion pull request as hf-hub:org/name@refs/pr/N"
        )
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=False)
    model = AutoModelForCausalLM.from_pretrained(
        path, use_safetensors=True, trust_remote_code=False, dtype=dtype if dtype is not None else "auto"
    )
    return model.to(device).eval(), tokenizer


LOAD_TIME_TOKENIZER_KEYS = ("is_local", "local_files_only")  # what from_pretrained records in a tokenizer's config


def save_causal_lm(model: nn.Module, tokenizer: Any, out_dir: str | Path) -> Path:
    """Write model (safetensors) and tokenizer into ``out_dir`` in the form :func:`load_causal_lm` reads."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    # how this tokenizer was loaded (a local folder; HF_HUB_OFFLINE), not what it is: kept, the saved files would
    # depend on the loader's environment
    for key in LOAD_TIME_TOKENIZER_KEYS:
        tokenizer.init_kwargs.pop(key, None)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def embedding_size(model: nn.Module) -> int:
    """Width of the vectors ``inputs_embeds`` takes (OPT-350m: 512 although its hidden size is 1024)."""
    return int(model.get_input_embeddings().embedding_dim)


def max_positions(model: nn.Module) -> int:
    """How many positions (prompt + generated tokens) the LM can attend over (GPT-2's n_positions, OPT's
    max_position_embeddings; transformers maps one name onto the other)."""
    return int(model.config.max_position_embeddings)


def embed_tokens(model: nn.Module, token_ids: torch.Tensor) -> torch.Tensor:
    """Token ids (..., L) -> the LM's input embeddings (..., L, E)."""
    return model.get_input_embeddings()(token_ids)


def special_ids(tokenizer: Any) -> tuple[int | None, int, int]:
    """``(bos, eos, pad)`` token ids; pad falls back to eos for tokenizers without one (GPT-2)."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise LanguageModelError(f"tokenizer {type(tokenizer).__name__} has no end-of-sequence token")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    return tokenizer.bos_token_id, eos, pad


def generate_from_embeds(
    model: nn.Module,
    inputs_embeds: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    *,
    eos_token_id: int,
    pad_token_id: int,
    beams: int = 4,
    max_new_tokens: int = 16,
    num_return_sequences: int = 1,
    share_prompt: bool = True,
    **generate_kwargs: Any,
) -> torch.Tensor:
    """Beam search (greedy when ``beams == 1``) from embeddings (N, L, E): new token ids only.

    Returns (N * num_return_sequences, <= max_new_tokens) ids, rows of one input
    adjacent (the order transformers uses), finished rows padded with ``pad_token_id``.
    ``inputs_embeds`` is cast to the model's dtype; extra keyword arguments go
    straight to ``generate`` (e.g. ``length_penalty``, ``min_new_tokens``,
    ``encoder_hidden_states``).

    ``generate`` copies every prompt once per beam before its first forward pass,
    so a prompt of L positions costs beams x L token forwards. With
    ``share_prompt`` the first L - 1 positions run once per prompt and their
    key/value cache is repeated per beam, in a cache whose beam reordering leaves
    those shared positions in place (:mod:`capdemo.beam_cache`); the ids are the same.
    """
    if inputs_embeds.ndim != 3 or inputs_embeds.shape[-1] != embedding_size(model):
        raise LanguageModelError(
            f"inputs_embeds must be (N, L, {embedding_size(model)}), got {tuple(inputs_embeds.shape)}"
        )
    if num_return_sequences > beams:
        raise LanguageModelError(f"num_return_sequences ({num_return_sequences}) cannot exceed beams ({beams})")
    n, length, _ = inputs_embeds.shape
    if attention_mask is None:
        attention_mask = torch.ones(n, length, dtype=torch.long, device=inputs_embeds.device)
    dtype = model.get_input_embeddings().weight.dtype
    inputs_embeds = inputs_embeds.to(dtype)
    with torch.inference_mode():
        if share_prompt and beams > 1 and length > 1:
            context = {k: v for k, v in generate_kwargs.items() if k in _PREFILL_INPUTS}
            generate_kwargs["past_key_values"] = prompt_cache(model, inputs_embeds, attention_mask, beams,
                                                              max_new_tokens=max_new_tokens, **context)
        return model.generate(
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            num_beams=beams,
            num_return_sequences=num_return_sequences,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=eos_token_id,
            pad_token_id=pad_token_id,
            **generate_kwargs,
        )


_PREFILL_INPUTS = ("encoder_hidden_states", "encoder_attention_mask")  # generate kwargs the prompt's forward needs


def clean_text(text: str) -> str:
    """Generated text as shown: control characters (and stray U+FFFD from cut byte sequences) become
    spaces, surrounding whitespace is stripped and inner runs of whitespace are collapsed.

    Deliberately minimal (the reference code also drops every character except
    letters, digits, space, comma and period, and deletes 4-digit numbers; we
    keep what the LM wrote so the demo shows its real output).
    """
    printable = "".join(ch if ch.isprintable() and ch != "\ufffd" else " " for ch in text)
    return _WHITESPACE.sub(" ", printable).strip()


def decode(tokenizer: Any, token_ids: torch.Tensor | Sequence[Sequence[int]], *, raw: bool = False) -> list[str]:
    """Token id rows -> strings, special tokens (eos, pad) dropped; cleaned (:func:`clean_text`) unless ``raw``,
    which keeps line breaks for a caller that cuts at them first."""
    rows = token_ids.tolist() if isinstance(token_ids, torch.Tensor) else [list(r) for r in token_ids]
    texts = tokenizer.batch_decode(rows, skip_special_tokens=True)
    return texts if raw else [clean_text(t) for t in texts]


__all__ = [
    "IGNORE_INDEX",
    "LanguageModelError",
    "clean_text",
    "decode",
    "embed_tokens",
    "embedding_size",
    "generate_from_embeds",
    "load_causal_lm",
    "max_positions",
    "prompt_cache",
    "save_causal_lm",
    "special_ids",
]
