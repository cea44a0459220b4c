"""Tiny, randomly initialised models built from configs, shared by the tests (no network, seconds to build)."""

from __future__ import annotations

from typing import Sequence

import torch

from capdemo.encoders import ClipEncoder, EncoderConfig

TINY_CLIP_NAME = "capdemo-tiny-test"
TINY_CLIP_CONFIG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "head_width": 16, "patch_size": 8},
    "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 64, "heads": 4, "layers": 2},
}
TINY_CORPUS = [
    "a red circle on the left",
    "a blue square on the right",
    "two green triangles",
    "a small yellow circle at the top",
    "a large white square at the bottom",
    "a red circle to the left of a blue square",
    "three purple triangles",
    "a green square above a yellow circle",
]


def tiny_encoder_config(**overrides) -> EncoderConfig:
    settings = {"model_name": TINY_CLIP_NAME, "pretrained": None, "model_config": TINY_CLIP_CONFIG, **overrides}
    return EncoderConfig(**settings)


def tiny_encoder(seed: int = 0, **overrides) -> ClipEncoder:
    torch.manual_seed(seed)
    return ClipEncoder.from_config(tiny_encoder_config(**overrides))


def tiny_tokenizer(corpus: Sequence[str] = TINY_CORPUS, vocab_size: int = 300):
    """A byte-level BPE tokenizer trained on ``corpus``, wrapped for transformers."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(list(corpus), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>", pad_token="<pad>"
    )


def tiny_gpt2(tokenizer, *, cross_attention: bool = False, seed: int = 0, n_embd: int = 64, n_layer: int = 2):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=len(tokenizer), n_positions=128, n_embd=n_embd, n_layer=n_layer, n_head=4,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, add_cross_attention=cross_attention,
    )
    return GPT2LMHeadModel(config).eval()


def tiny_opt(tokenizer, *, seed: int = 0, hidden_size: int = 64):
    from transformers import OPTConfig, OPTForCausalLM

    torch.manual_seed(seed)
    config = OPTConfig(
        vocab_size=len(tokenizer), hidden_size=hidden_size, num_hidden_layers=2, ffn_dim=128,
        num_attention_heads=4, max_position_embeddings=128, word_embed_proj_dim=hidden_size,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return OPTForCausalLM(config).eval()
