"""Tiny, randomly initialised models and a complete tiny bundle, built from configs in seconds (no network).

For tests, benchmarks and anyone who wants to try the library's code paths without real weights:
every component loads through the same code as a real bundle, and every output has the right shape
and consistency. The models are untrained, so their captions are arbitrary tokens.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image

from capdemo.bundle import IN_BUNDLE_PREFIX, Bundle, BundleWriter
from capdemo.encoders import ClipEncoder, EncoderConfig, add_encoder_to_bundle
from capdemo.gap import GapStats
from capdemo.lm import load_causal_lm, save_causal_lm
from capdemo.retrieval import CaptionDatastore

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

TINY_ANSWERS = ["yes", "no", "red", "blue", "green", "circle", "square", "triangle", "two", "three"]
TINY_MACCAP = dict(lm_embed_dim=64, embed_dim=32, n_cr=4, n_query=4, heads=4, ffn_dim=64, samples=5, beams=2,
                   max_new_tokens=6, train_lm=True)
TINY_TOMCAP = dict(embed_dim=32, lora_r=4, lora_alpha=4.0, k=2, beams=2, max_new_tokens=6)
TINY_CAPDEC = dict(embed_dim=32, lm_embed_dim=64, prefix_length=4, clip_length=4, mapper_layers=1, mapper_heads=4,
                   beams=3, max_new_tokens=6)


def example_images(seed: int = 0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)) for _ in range(2)]


TINY_VQA_LM = "vqa/lm"  # bundle folder of the tiny bundle's frozen answering LM


def build_tiny_bundle(out_dir: str | Path, *, seed: int = 0) -> Path:
    from capdemo.methods.capdec import model as capdec
    from capdemo.methods.maccap import model as maccap
    from capdemo.methods.tomcap import inference as tomcap_bundle
    from capdemo.methods.tomcap import model as tomcap
    from capdemo.vqa import AnswerList

    torch.manual_seed(seed)
    encoder = tiny_encoder(seed=seed)
    tokenizer = tiny_tokenizer()
    writer = BundleWriter(out_dir, name="tiny", description="tiny random models for tests", world="shapes")
    add_encoder_to_bundle(writer, encoder, tiny_encoder_config(), copy_weights=True)
    with tempfile.TemporaryDirectory() as scratch:
        lm_dir = save_causal_lm(tiny_gpt2(tokenizer, seed=seed), tokenizer, Path(scratch) / "lm")
        mac = maccap.MacCap(maccap.MacCapConfig(lm=str(lm_dir), **TINY_MACCAP), *load_causal_lm(lm_dir))
        maccap.add_to_bundle(writer, mac, include_lm=True)

        corpus_embeds = encoder.encode_text(TINY_CORPUS)
        store_dir = Path(scratch) / "datastore"
        CaptionDatastore.build(corpus_embeds, TINY_CORPUS, encoder_name=encoder.name, kind="flat").save(store_dir)
        images = example_images(seed)
        image_embeds = encoder.encode_image_embeds(encoder.preprocess(images * 4))
        stats = GapStats.compute(image_embeds, corpus_embeds)
        lm, tok = tomcap.load_gpt2_with_cross_attention(lm_dir)
        tom = tomcap.TOMCap(tomcap.TOMCapConfig(lm=str(lm_dir), **TINY_TOMCAP), lm, tok, lm_source=lm_dir)
        tomcap_bundle.add_to_bundle(writer, tom, datastore=store_dir, copy_datastore=True, gap_stats=stats)
        dec = capdec.CapDec(capdec.CapDecConfig(lm=str(lm_dir), **TINY_CAPDEC), *load_causal_lm(lm_dir))
        capdec.add_to_bundle(writer, dec)
        # the frozen LM that answers questions (as the shapes bundle ships one): other weights than MacCap's
        frozen_dir = save_causal_lm(tiny_gpt2(tokenizer, seed=seed + 1), tokenizer, Path(scratch) / "vqa-lm")
        writer.add_directory(TINY_VQA_LM, frozen_dir)
        AnswerList(TINY_ANSWERS).add_to_bundle(writer, encoder, lm=IN_BUNDLE_PREFIX + TINY_VQA_LM)
        for i, image in enumerate(images):
            image.save(writer.path(f"examples/random-{i}.png"))
        return writer.finish()


def lead_bundle(source: str | Path, out: Path, *, default_method: str, caption_method: str) -> Path:
    """A copy of the bundle at ``source`` that names its default method and the method whose captions VQA reads."""
    from capdemo.pipeline import DEFAULT_METHOD_KEY
    from capdemo.vqa import VQA_CAPTION_METHOD_KEY, VQA_COMPONENT

    shutil.copytree(source, out)
    vqa = Bundle.load(out).component(VQA_COMPONENT)
    writer = BundleWriter.extending(out, **{DEFAULT_METHOD_KEY: default_method})
    writer.add_component(VQA_COMPONENT, {**vqa, VQA_CAPTION_METHOD_KEY: caption_method})
    writer.finish()
    return out
