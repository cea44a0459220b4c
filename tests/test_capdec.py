"""CapDec: config, the mapper and its size, the noise, a trained tiny model, batched inference, bundle round trip,
training from the command line, and the CLI's JSON matching the other methods'."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch
import torch.nn.functional as F

from capdemo.bundle import Bundle, BundleWriter
from capdemo.config import ConfigError
from capdemo.lm import save_causal_lm
from capdemo.methods.capdec.inference import CapDecMethod, CapDecOptions, caption_images
from capdemo.methods.capdec.model import (
    CapDec, CapDecConfig, MLPMapper, TransformerMapper, add_to_bundle, load_from_bundle,
)
from capdemo.testing import TINY_CAPDEC, TINY_CORPUS, example_images, tiny_encoder_config, tiny_gpt2

def tiny_config(**overrides) -> CapDecConfig:
    return CapDecConfig(**{**TINY_CAPDEC, "lm": "unused", **overrides})


@pytest.fixture(scope="module")
def trained(tiny_encoder, tiny_tokenizer) -> CapDec:
    """A tiny CapDec fitted to the 8 TINY_CORPUS captions (little noise: the random tiny CLIP's text space is
    crowded, see test_train_maccap)."""
    torch.manual_seed(0)
    model = CapDec(tiny_config(noise_variance=1e-3), tiny_gpt2(tiny_tokenizer), tiny_tokenizer)
    text_embeds = tiny_encoder.encode_text(TINY_CORPUS).clone()
    token_ids, mask = model.tokenize(TINY_CORPUS)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    model.train()
    for _ in range(100):
        loss = model.loss(text_embeds, token_ids, mask)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


def test_config_defaults_are_capdecs_and_bad_values_are_refused():
    config = CapDecConfig()
    assert (config.mapper, config.prefix_length, config.clip_length, config.mapper_layers) == ("transformer", 40, 40, 8)
    assert config.noise_variance == 0.016 and config.train_lm and config.beams == 5
    assert CapDecConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ValueError, match="mapper must be one of"):
        tiny_config(mapper="lstm")
    with pytest.raises(ValueError, match="not divisible by mapper_heads=5"):
        tiny_config(mapper_heads=5)
    with pytest.raises(ConfigError, match="prefix_lenght"):
        CapDecConfig.from_dict({"prefix_lenght": 3})


def test_transformer_mapper_size_and_shapes_match_clipcaps_layout():
    config = tiny_config(embed_dim=32, lm_embed_dim=64, prefix_length=4, clip_length=3, mapper_layers=2)
    mapper = TransformerMapper(config)
    d, e, p, c, layers, ffn = 32, 64, 4, 3, 2, 128
    per_layer = 4 * e * e + 4 * e + 2 * e * ffn + ffn + e + 4 * e  # attention in/out + biases, FFN, two LayerNorms
    assert sum(t.numel() for t in mapper.parameters()) == d * c * e + c * e + p * e + layers * per_layer
    prefix = mapper(F.normalize(torch.randn(5, d), dim=-1))
    assert prefix.shape == (5, p, e)
    mlp = MLPMapper(config)
    assert mlp(torch.randn(5, d)).shape == (5, p, e)
    assert sum(t.numel() for t in mlp.parameters()) == d * (p * e // 2) + p * e // 2 + (p * e // 2) * p * e + p * e


def test_training_noise_is_capdecs_normalise_add_renormalise(tiny_tokenizer, monkeypatch):
    """loss() feeds the mapper L2norm(L2norm(e) + n) with n ~ N(0, variance): checked by recomputing it."""
    model = CapDec(tiny_config(noise_variance=0.04), tiny_gpt2(tiny_tokenizer), tiny_tokenizer)
    seen = {}
    monkeypatch.setattr(model, "caption_loss", lambda inputs, ids, mask: seen.setdefault("inputs", inputs).sum())
    embeds = 3 * torch.randn(4, 32)
    model.loss(embeds, torch.zeros(4, 2, dtype=torch.long), torch.ones(4, 2, dtype=torch.long),
               generator=torch.Generator().manual_seed(5))
    noise = torch.randn(4, 32, generator=torch.Generator().manual_seed(5)) * math.sqrt(0.04)
    torch.testing.assert_close(seen["inputs"], F.normalize(F.normalize(embeds, dim=-1) + noise, dim=-1))


def test_trained_model_reconstructs_its_captions_and_its_prompt_has_no_bos(trained, tiny_encoder):
    embeds = tiny_encoder.encode_text(TINY_CORPUS)
    decoded = trained.generate(embeds, beams=1, max_new_tokens=16)
    assert sum(d == c for d, c in zip(decoded, TINY_CORPUS)) >= 7
    assert trained.prompt_embeds(embeds).shape == (8, TINY_CAPDEC["prefix_length"], 64)
    assert trained.prompt_length == TINY_CAPDEC["prefix_length"]


def test_inference_keeps_every_beam_best_first_with_its_clip_score(trained, tiny_encoder):
    images = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    embeds = tiny_encoder.encode_image_embeds(images)
    results = caption_images(trained, tiny_encoder, embeds, CapDecOptions(beams=3, max_new_tokens=8))
    expected = trained.generate(embeds, beams=3, max_new_tokens=8)
    for b, result in enumerate(results):
        assert [c.text for c in result.candidates] == expected[3 * b : 3 * b + 3]  # beam order (the paper)
        assert [c.sample for c in result.candidates] == [0, 1, 2] and result.caption == expected[3 * b]
        for candidate, embed in zip(result.candidates, result.embeddings["candidates"]):
            if candidate.text:
                assert candidate.clip_score == pytest.approx(float(embed @ embeds[b]), abs=1e-5)
        assert list(result.timings_ms) == ["mapper", "generate", "rerank"] and result.method == "capdec"
    by_clip = caption_images(trained, tiny_encoder, embeds, CapDecOptions(beams=3, max_new_tokens=8, select_by="clip"))
    for result in by_clip:
        scores = [c.clip_score for c in result.candidates]
        assert scores == sorted(scores, reverse=True)


def test_text_to_text_decodes_the_text_embedding_as_an_image_with_the_options_given(trained, tiny_encoder):
    texts = list(TINY_CORPUS[:4])
    embeds = tiny_encoder.encode_text(texts)  # (4, D)
    method = CapDecMethod(trained, tiny_encoder)
    by_beam = CapDecOptions(beams=3, max_new_tokens=4)
    for options in (by_beam, dataclasses.replace(by_beam, select_by="clip")):
        as_images = [r.caption for r in caption_images(trained, tiny_encoder, embeds, options)]
        assert method.text_to_text(texts, embeds, options) == as_images  # the same beams and selection
    beams = trained.generate(embeds, beams=3, max_new_tokens=4)
    assert method.text_to_text(texts, embeds, CapDecOptions(beams=3, max_new_tokens=4)) == beams[::3]


def test_bundle_round_trip_gives_the_same_captions(trained, tiny_encoder, tmp_path):
    writer = BundleWriter(tmp_path / "b", name="capdec")
    add_to_bundle(writer, trained)
    bundle = Bundle.load(writer.finish())
    assert bundle.component("capdec")["lm"] == "bundle:capdec/lm"
    loaded = load_from_bundle(bundle)
    embeds = tiny_encoder.encode_image_embeds(torch.randn(2, 3, 32, 32))
    torch.testing.assert_close(loaded.prefix(embeds), trained.prefix(embeds))
    method = CapDecMethod(loaded, tiny_encoder)
    options = method.options(beams=2)
    assert [r.caption for r in caption_images(trained, tiny_encoder, embeds, options)] == [
        r.caption for r in caption_images(loaded, tiny_encoder, embeds, options)]
    long_prefix = CapDec(tiny_config(prefix_length=100), trained.lm, trained.tokenizer)
    with pytest.raises(ValueError, match="max_new_tokens must be between 1 and 28, got 29"):  # 128 positions - 100
        CapDecMethod(long_prefix, tiny_encoder).options(max_new_tokens=29)


def test_capdec_trains_from_the_command_line_into_an_existing_bundle(tiny_bundle_dir, tiny_tokenizer, tmp_path):
    """`python -m training capdec` on the shared CLI: it replaces the bundle's CapDec, keeps the other methods
    and records its run."""
    import shutil

    from training.__main__ import main

    bundle_dir = tmp_path / "bundle"
    shutil.copytree(tiny_bundle_dir, bundle_dir)
    lm_dir = save_causal_lm(tiny_gpt2(tiny_tokenizer), tiny_tokenizer, tmp_path / "lm")
    (tmp_path / "encoder.json").write_text(json.dumps(tiny_encoder_config().to_dict()))
    (tmp_path / "corpus.txt").write_text("\n".join(TINY_CORPUS) + "\n")
    argv = ["capdec", "--corpus", str(tmp_path / "corpus.txt"), "--encoder", str(tmp_path / "encoder.json"),
            "--lm", str(lm_dir), "--out", str(bundle_dir), "--run-dir", str(tmp_path / "run"), "--steps", "3",
            "--batch-size", "4", "--warmup", "1", "--device", "cpu", "--prefix-length", "2", "--clip-length", "2",
            "--mapper-layers", "1", "--mapper-heads", "4", "--eval-captions", "4"]
    assert main(argv) == 0
    bundle = Bundle.load(bundle_dir)
    assert set(bundle.components) >= {"encoder", "maccap", "tomcap", "capdec", "vqa"}
    config = CapDecConfig.from_dict(bundle.component("capdec"))
    assert (config.prefix_length, config.embed_dim, config.lm_embed_dim, config.mapper_layers) == (2, 32, 64, 1)
    record = bundle.json("capdec/training.json")
    assert record["captions"] == len(TINY_CORPUS) and record["train"]["max_steps"] == 3
    assert "text_to_text_exact" in record["evaluations"][-1]


def test_the_cli_captions_with_capdec_and_prints_the_same_keys_as_the_other_methods(tiny_bundle_dir, tmp_path,
                                                                                     capsys):
    from capdemo.__main__ import main

    path = tmp_path / "image.png"
    example_images()[0].save(path)
    lines = {}
    for method in ("maccap", "tomcap", "capdec"):
        assert main(["caption", str(path), "--weights", str(tiny_bundle_dir), "--method", method, "--json"]) == 0
        lines[method] = json.loads(capsys.readouterr().out)
    assert set(lines["capdec"]) == set(lines["maccap"]) == set(lines["tomcap"])
    capdec = lines["capdec"]
    assert len(capdec["candidates"]) == TINY_CAPDEC["beams"] and capdec["caption"] == capdec["candidates"][0]["text"]
    assert capdec["timings_ms"]["encode"] > 0 and list(capdec["timings_ms"]) == ["encode", "mapper", "generate",
                                                                                  "rerank"]
