"""A complete bundle of tiny random models (encoder, MacCap, TOMCap, datastore, gap stats, VQA answers, examples).

Untrained, so captions are arbitrary tokens; what it pins down is structure: every
component loads through the same code as a real bundle and every output has the
right shape and consistency.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from capdemo.bundle import BundleWriter
from capdemo.encoders import add_encoder_to_bundle
from capdemo.gap import GapStats
from capdemo.lm import save_causal_lm
from capdemo.retrieval import CaptionDatastore
from tests.tiny_models import TINY_CORPUS, tiny_encoder, tiny_encoder_config, tiny_gpt2, tiny_tokenizer

TINY_ANSWERS = ["yes", "no", "red", "blue", "green", "circle", "square", "triangle", "two", "three"]
TINY_MACCAP = dict(lm_embed_dim=64, embed_dim=32, n_cr=4, n_query=4, heads=4, ffn_dim=64, samples=5, beams=2,
                   max_new_tokens=6, train_lm=True)
TINY_TOMCAP = dict(embed_dim=32, lora_r=4, lora_alpha=4.0, k=2, beams=2, max_new_tokens=6)


def example_images(seed: int = 0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)) for _ in range(2)]


def build_tiny_bundle(out_dir: str | Path, *, seed: int = 0) -> Path:
    from capdemo import maccap, tomcap
    from capdemo.vqa import AnswerList

    torch.manual_seed(seed)
    encoder = tiny_encoder(seed=seed)
    tokenizer = tiny_tokenizer()
    writer = BundleWriter(out_dir, name="tiny", description="tiny random models for tests", world="shapes")
    add_encoder_to_bundle(writer, encoder, tiny_encoder_config(), copy_weights=True)
    with tempfile.TemporaryDirectory() as scratch:
        lm_dir = save_causal_lm(tiny_gpt2(tokenizer, seed=seed), tokenizer, Path(scratch) / "lm")
        mac = maccap.MacCap(maccap.MacCapConfig(lm=str(lm_dir), **TINY_MACCAP), *_load_lm(lm_dir))
        maccap.add_to_bundle(writer, mac, include_lm=True)

        corpus_embeds = encoder.encode_text(TINY_CORPUS)
        store_dir = Path(scratch) / "datastore"
        CaptionDatastore.build(corpus_embeds, TINY_CORPUS, encoder_name=encoder.name, kind="flat").save(store_dir)
        images = example_images(seed)
        image_embeds = encoder.encode_image_embeds(encoder.preprocess(images * 4))
        stats = GapStats.compute(image_embeds, corpus_embeds)
        lm, tok = tomcap.load_gpt2_with_cross_attention(lm_dir)
        tom = tomcap.TOMCap(tomcap.TOMCapConfig(lm=str(lm_dir), **TINY_TOMCAP), lm, tok, lm_source=lm_dir)
        tomcap.add_to_bundle(writer, tom, datastore=store_dir, copy_datastore=True, gap_stats=stats)
        AnswerList(TINY_ANSWERS).add_to_bundle(writer, encoder)
        for i, image in enumerate(images):
            image.save(writer.path(f"examples/random-{i}.png"))
        return writer.finish()


def _load_lm(lm_dir: Path):
    from capdemo.lm import load_causal_lm

    return load_causal_lm(lm_dir)
