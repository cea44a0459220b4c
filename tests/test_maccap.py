"""MacCap inference: patch choice, region equations, noise, adaptor, loss masking, the batched S-sample path."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from capdemo.bundle import Bundle, BundleWriter
from capdemo.config import ConfigError
from capdemo.features import ImageFeatures
from capdemo.gap import sample_noise
from capdemo.lm import clean_text, embedding_size
from capdemo.methods.maccap.model import (
    MacCap,
    MacCapConfig,
    add_to_bundle,
    aggregate_regions,
    caption_text_embeddings,
    image_regions,
    load_from_bundle,
    select_patches,
    text_regions,
)
from capdemo.methods.maccap.inference import (
    MacCapMethod,
    MacCapOptions,
    caption_images,
    sample_generator,
    sample_noise_batch,
    sequential_reference,
)
from capdemo.rerank import EMPTY_TEXT_SCORE, clip_scores
from capdemo.testing import TINY_CORPUS, tiny_gpt2, tiny_opt

TINY = dict(embed_dim=32, lm_embed_dim=64, n_cr=4, n_query=4, heads=4, ffn_dim=64, mlp_layers=2, lm="unused")


def tiny_config(**overrides) -> MacCapConfig:
    return MacCapConfig(**{**TINY, **overrides})


def random_features(batch: int = 3, heads: int = 2, grid: int = 4, dim: int = 8, seed: int = 0) -> ImageFeatures:
    generator = torch.Generator().manual_seed(seed)
    tokens = 1 + grid * grid
    attention = torch.rand(batch, heads, tokens, tokens, generator=generator).softmax(-1)  # (B, H, T, T)
    return ImageFeatures(
        image_embeds=F.normalize(torch.randn(batch, dim, generator=generator), dim=-1),
        token_embeds=3 * torch.randn(batch, tokens, dim, generator=generator),
        attention=attention,
        grid_size=(grid, grid),
    )


@pytest.fixture(scope="module")
def trained(tiny_encoder, tiny_tokenizer) -> MacCap:
    """A tiny MacCap (LM trained too) fitted to the 8 TINY_CORPUS captions: decodes real captions, varies with noise."""
    lm = tiny_gpt2(tiny_tokenizer)
    torch.manual_seed(0)
    config = tiny_config(train_lm=True, dropout=0.0, memory_layernorm=True, noise_variance=1e-3)
    model = MacCap(config, lm, tiny_tokenizer)
    text_embeds = tiny_encoder.encode_text(TINY_CORPUS).clone()
    token_ids, mask = model.tokenize(TINY_CORPUS)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    model.train()
    for _ in range(120):
        loss = model.loss(text_embeds, token_ids, mask)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


# --------------------------------------------------------------------------------------------
# Config


def test_config_round_trips_and_refuses_bad_values():
    config = tiny_config(include_cls_in_topk=True, region_combine="sum", vqa_match="word")
    assert MacCapConfig.from_dict(config.to_dict()) == config
    assert MacCapConfig().n_cr == 10 and MacCapConfig().samples == 20 and MacCapConfig().beams == 4
    assert MacCapConfig().noise_variance == 0.016 and not MacCapConfig().train_lm
    with pytest.raises(ValueError, match="region_combine"):
        tiny_config(region_combine="max")
    with pytest.raises(ValueError, match="divisible"):
        tiny_config(heads=5)
    with pytest.raises(ConfigError, match="n_qeury"):
        MacCapConfig.from_dict({"n_qeury": 3})


# --------------------------------------------------------------------------------------------
# Sub-region aggregation


@pytest.mark.parametrize("include_cls", [False, True])
def test_top_n_cr_equals_a_hand_computed_argsort(include_cls):
    features = random_features()
    n_cr = 5
    token_index, attention = select_patches(features, n_cr, include_cls=include_cls)
    cls_row = features.attention[:, :, 0, :].mean(dim=1)  # (B, T), by hand
    for b in range(cls_row.shape[0]):
        scores = cls_row[b].tolist()
        candidates = range(len(scores)) if include_cls else range(1, len(scores))
        expected = sorted(candidates, key=lambda t: -scores[t])[:n_cr]
        assert token_index[b].tolist() == expected
        assert attention[b].tolist() == pytest.approx([scores[t] for t in expected])
    if not include_cls:
        assert (token_index > 0).all()


def test_top_n_cr_refuses_more_patches_than_there_are():
    with pytest.raises(ValueError, match="n_cr must be between 1 and 16"):
        select_patches(random_features(grid=4), 17)


@pytest.mark.parametrize("resoftmax", [False, True])
def test_region_features_follow_equations_12_and_13(resoftmax):
    features = random_features()
    token_index, _ = select_patches(features, 3)
    regions = aggregate_regions(features, token_index, resoftmax=resoftmax, normalise_parts=False, combine="sum")
    for b in range(3):
        for k, t in enumerate(token_index[b].tolist()):
            row = features.attention[b, :, t, :].mean(0)  # (T,) head-averaged attention row of token t
            if resoftmax:
                row = row.softmax(-1)
            subregion = sum(row[j] * features.token_embeds[b, j] for j in range(row.shape[0]))  # I_s = A I'_p
            torch.testing.assert_close(regions[b, k], subregion + features.token_embeds[b, 0])  # + I_c


def test_normalised_parts_are_averaged():
    features = random_features()
    token_index, _ = select_patches(features, 3)
    regions = aggregate_regions(features, token_index, normalise_parts=True, combine="mean")
    unit_tokens = F.normalize(features.token_embeds, dim=-1)
    rows = features.attention.mean(1)[0, token_index[0]]  # (3, T)
    expected = (F.normalize(rows @ unit_tokens[0], dim=-1) + unit_tokens[0, 0]) / 2
    torch.testing.assert_close(regions[0], expected)
    assert (regions.norm(dim=-1) <= 1 + 1e-6).all()


# --------------------------------------------------------------------------------------------
# Noise


def test_training_noise_is_gaussian_with_the_configured_variance():
    variance, dim = 0.016, 512
    text = F.normalize(torch.randn(64, dim), dim=-1)  # (B, D)
    copies = text.unsqueeze(1).expand(-1, 10, -1)
    torch.manual_seed(7)
    raw = sample_noise(copies, variance)  # what text_regions draws, from the same seed
    torch.manual_seed(7)
    regions = text_regions(text, 10, variance)  # (B, N_cr, D)
    torch.testing.assert_close(regions, F.normalize(copies + raw, dim=-1))  # eq. 4: L2Norm(T_c + n)
    assert raw.mean().abs() < 2e-3
    assert raw.var().item() == pytest.approx(variance, rel=0.02)  # 327,680 draws: std error of the variance ~0.25 %
    assert regions.norm(dim=-1).sub(1).abs().max() < 1e-5


def test_inference_noise_per_sample_is_seeded_independent_and_has_the_variance():
    regions = F.normalize(torch.randn(2, 10, 512), dim=-1)
    variance = 0.016
    draws = torch.stack([sample_noise(regions[0], variance, generator=sample_generator(3, s)) for s in range(40)])
    assert draws.var().item() == pytest.approx(variance, rel=0.02)
    correlation = torch.corrcoef(draws.flatten(1))[0, 1:]  # sample 0 vs the others
    assert correlation.abs().max() < 0.05
    noisy = sample_noise_batch(regions, sample=5, variance=variance, seed=3)
    torch.testing.assert_close(noisy, F.normalize(regions + draws[5], dim=-1))
    torch.testing.assert_close(noisy, sample_noise_batch(regions, sample=5, variance=variance, seed=3))
    assert not torch.equal(noisy, sample_noise_batch(regions, sample=5, variance=variance, seed=4))


# --------------------------------------------------------------------------------------------
# Adaptor and LM


@pytest.mark.parametrize("overrides", [{}, {"width": 16, "layers": 2, "norm_first": True, "memory_layernorm": True}])
def test_prefix_shape_and_region_order_invariance(tiny_tokenizer, overrides):
    model = MacCap(tiny_config(**overrides), tiny_gpt2(tiny_tokenizer), tiny_tokenizer).eval()
    regions = F.normalize(torch.randn(5, 4, 32), dim=-1)
    prefix = model.prefix(regions)
    assert prefix.shape == (5, 4, 64)
    torch.testing.assert_close(model.prefix(regions[:, [2, 0, 3, 1]]), prefix, atol=1e-5, rtol=1e-5)  # no positions
    assert model.prompt_embeds(regions).shape == (5, 5, 64)  # + BOS
    bos = model.lm.get_input_embeddings().weight[model.bos_id]
    torch.testing.assert_close(model.prompt_embeds(regions)[:, -1], bos.expand(5, -1))


def test_loss_is_per_caption_cross_entropy_on_caption_tokens_only(tiny_tokenizer):
    model = MacCap(tiny_config(dropout=0.0), tiny_gpt2(tiny_tokenizer), tiny_tokenizer).eval()
    captions = ["a red circle on the left", "two green triangles", "three purple triangles"]
    token_ids, mask = model.tokenize(captions)
    text = F.normalize(torch.randn(3, 32), dim=-1)
    torch.manual_seed(1)
    loss = model.loss(text, token_ids, mask)
    torch.manual_seed(1)
    prompt = model.prompt_embeds(text_regions(text, 4, model.config.noise_variance))  # the same noise
    expected = []
    for b in range(3):
        length = int(mask[b].sum())
        ids = token_ids[b, :length]
        assert ids[-1] == model.eos_id
        inputs = torch.cat([prompt[b], model.lm.get_input_embeddings()(ids)]).unsqueeze(0)
        logits = model.lm(inputs_embeds=inputs).logits[0]  # (P + length, V)
        predicted = logits[prompt.shape[1] - 1 : -1]  # positions BOS .. second-to-last caption token
        expected.append(F.cross_entropy(predicted, ids))
    torch.testing.assert_close(loss, torch.stack(expected).mean(), atol=1e-5, rtol=1e-5)
    junk = token_ids.masked_fill(mask == 0, 7)  # padding content must not matter
    torch.manual_seed(1)
    torch.testing.assert_close(model.loss(text, junk, mask), loss)


def test_frozen_lm_gets_no_gradient_and_stays_in_eval_mode(tiny_tokenizer):
    model = MacCap(tiny_config(), tiny_gpt2(tiny_tokenizer), tiny_tokenizer)
    model.train()
    assert model.adaptor.training and not model.lm.training
    token_ids, mask = model.tokenize(TINY_CORPUS[:2])
    model.loss(F.normalize(torch.randn(2, 32), dim=-1), token_ids, mask).backward()
    assert all(p.grad is None for p in model.lm.parameters())
    assert all(p.grad is not None for p in model.adaptor.parameters())
    trained_lm = MacCap(tiny_config(train_lm=True), tiny_gpt2(tiny_tokenizer), tiny_tokenizer).train()
    assert trained_lm.lm.training and all(p.requires_grad for p in trained_lm.lm.parameters())


def test_opt_family_with_a_narrower_input_embedding(tiny_tokenizer):
    from transformers import OPTConfig, OPTForCausalLM

    lm = OPTForCausalLM(OPTConfig(
        vocab_size=len(tiny_tokenizer), hidden_size=64, word_embed_proj_dim=32, num_hidden_layers=1, ffn_dim=64,
        num_attention_heads=4, max_position_embeddings=64, bos_token_id=tiny_tokenizer.bos_token_id,
        eos_token_id=tiny_tokenizer.eos_token_id, pad_token_id=tiny_tokenizer.pad_token_id,
    )).eval()
    assert embedding_size(lm) == 32 and lm.config.hidden_size == 64  # inputs_embeds are 32-d, not hidden_size
    with pytest.raises(ValueError, match="lm_embed_dim is 64"):
        MacCap(tiny_config(), lm, tiny_tokenizer)
    model = MacCap(tiny_config(lm_embed_dim=32), lm, tiny_tokenizer).eval()
    token_ids, mask = model.tokenize(TINY_CORPUS[:2])
    assert torch.isfinite(model.loss(F.normalize(torch.randn(2, 32), dim=-1), token_ids, mask))
    captions = model.generate(F.normalize(torch.randn(2, 4, 32), dim=-1), beams=2, max_new_tokens=4)
    assert len(captions) == 2 and all(isinstance(c, str) for c in captions)
    opt_model = MacCap(tiny_config(), tiny_opt(tiny_tokenizer), tiny_tokenizer)
    assert opt_model.prefix(torch.randn(1, 4, 32)).shape == (1, 4, 64)


def test_clean_text_is_minimal():
    assert clean_text("  a  red\tcircle \n") == "a red circle"
    assert clean_text("a\x00b\ufffd c") == "a b c"


# --------------------------------------------------------------------------------------------
# Rerank


def test_clip_scores_use_one_text_call_and_rank_empty_texts_last(tiny_encoder):
    calls = []

    class Counting:
        def encode_text(self, texts):
            calls.append(list(texts))
            return tiny_encoder.encode_text(texts)

    images = F.normalize(torch.randn(2, 32), dim=-1)
    texts = [["a red circle", "", "two green triangles"], ["three purple triangles", "  ", "a red circle"]]
    scored = clip_scores(Counting(), images, texts)
    assert calls == [["a red circle", "two green triangles", "three purple triangles"]]  # distinct texts, once
    expected = tiny_encoder.encode_text(["a red circle", "two green triangles"]) @ images[0]
    torch.testing.assert_close(scored[0].scores[[0, 2]], expected)
    torch.testing.assert_close(scored[1].scores[2], tiny_encoder.encode_text(["a red circle"])[0] @ images[1])
    assert scored[0].scores[1] == EMPTY_TEXT_SCORE and scored[1].scores[1] == EMPTY_TEXT_SCORE
    assert scored[0].order()[-1] == 1 and scored[1].order()[-1] == 1


# --------------------------------------------------------------------------------------------
# The batched pipeline


def test_trained_model_reconstructs_its_captions(trained, tiny_encoder):
    decoded = caption_text_embeddings(trained, tiny_encoder.encode_text(TINY_CORPUS), max_new_tokens=16)
    assert sum(d == c for d, c in zip(decoded, TINY_CORPUS)) >= 7


def test_batched_samples_equal_the_sequential_reference(trained, tiny_encoder):
    pixels = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    settings = MacCapOptions(samples=6, beams=3, noise_variance=0.05, n_cr=4, max_new_tokens=16, seed=11)
    batched = caption_images(trained, tiny_encoder, tiny_encoder.encode_images(pixels), settings)
    reference = sequential_reference(trained, tiny_encoder, pixels, settings)
    distinct = set()
    for fast, slow in zip(batched, reference):
        by_sample = lambda result: sorted((c.sample, c.text, c.clip_score) for c in result.candidates)  # noqa: E731
        for (s1, t1, c1), (s2, t2, c2) in zip(by_sample(fast), by_sample(slow)):
            assert (s1, t1) == (s2, t2)
            assert c1 == pytest.approx(c2, abs=1e-5)
        assert fast.caption == slow.caption
        distinct.update(c.text for c in fast.candidates)
    assert len(distinct) >= 2, "the noise should make the samples differ, or this test checks nothing"
    alone = caption_images(trained, tiny_encoder, tiny_encoder.encode_images(pixels[1:2]), settings)[0]  # batch-free
    assert [(c.sample, c.text) for c in alone.candidates] == [(c.sample, c.text) for c in batched[1].candidates]


def test_result_carries_candidates_patches_embeddings_and_timings(trained, tiny_encoder):
    pixels = torch.randn(2, 3, 32, 32)
    features = tiny_encoder.encode_images(pixels)
    results = caption_images(trained, tiny_encoder, features, MacCapOptions(samples=5, beams=2, n_cr=4, seed=0))
    for b, result in enumerate(results):
        scores = [c.clip_score for c in result.candidates]
        assert len(scores) == 5 and scores == sorted(scores, reverse=True)
        assert result.caption == result.candidates[0].text
        assert sorted(c.sample for c in result.candidates) == list(range(5))
        texts = [c.text for c in result.candidates if c.text]
        cosines = tiny_encoder.encode_text(texts) @ features.image_embeds[b]
        torch.testing.assert_close(torch.tensor(scores[: len(texts)]), cosines)
        assert len(result.patches) == 4
        for patch in result.patches:
            assert patch.row * 4 + patch.col == patch.index
            assert patch.attention == pytest.approx(features.cls_attention_mean[b, patch.index + 1].item())
        shapes = {name: tuple(t.shape) for name, t in result.embeddings.items()}
        assert shapes == {"image": (1, 32), "region": (4, 32), "candidates": (5, 32), "patches": (16, 32)}
        assert list(result.timings_ms) == ["aggregate", "adaptor", "generate", "rerank"]  # encode: the facade's
        assert all(v >= 0 for v in result.timings_ms.values())
        assert result.to_json()["method"] == "maccap"
    method = MacCapMethod(trained, tiny_encoder)
    with pytest.raises(ValueError, match="samples must be between 1 and 64, got 0"):
        method.options(samples=0)
    with pytest.raises(ValueError, match="n_cr must be between 1 and 16, got 17"):  # a 4x4 grid has 16 patches
        method.options(n_cr=17)


def test_bundle_round_trip_gives_the_same_captions(trained, tiny_encoder, tmp_path):
    writer = BundleWriter(tmp_path / "b", name="tiny")
    add_to_bundle(writer, trained, include_lm=True)
    bundle = Bundle.load(writer.finish())
    assert bundle.component("maccap")["lm"] == "bundle:maccap/lm"
    loaded = load_from_bundle(bundle)
    regions = F.normalize(torch.randn(2, 4, 32), dim=-1)
    torch.testing.assert_close(loaded.prefix(regions), trained.prefix(regions))
    features = tiny_encoder.encode_images(torch.randn(1, 3, 32, 32))
    options = MacCapMethod(trained, tiny_encoder).default_options()
    original = caption_images(trained, tiny_encoder, features, options)[0]
    assert caption_images(loaded, tiny_encoder, features, options)[0].caption == original.caption


def test_a_picked_cls_token_leaves_patches_and_region_rows_aligned(tiny_encoder):
    """With include_cls_in_topk the CLS token can be picked: it is no patch, so its region row is left out too."""
    from capdemo.methods.maccap.inference import build_result
    from capdemo.rerank import ScoredTexts

    features = tiny_encoder.encode_images(torch.randn(1, 3, 32, 32))
    token_index = torch.tensor([[0, 6, 1]])  # CLS, then patches 5 and 0
    regions = torch.randn(1, 3, 32)
    scored = ScoredTexts(texts=["a", "b"], scores=torch.tensor([0.2, 0.3]), embeds=torch.eye(2, 32))
    result = build_result(features, 0, token_index, torch.tensor([[0.5, 0.3, 0.2]]), regions, scored, {},
                          MacCapOptions())
    assert [p.index for p in result.patches] == [5, 0]
    torch.testing.assert_close(result.embeddings["region"], F.normalize(regions[0, 1:], dim=-1))


# --------------------------------------------------------------------------------------------
# Table 5's rows


def test_cls_token_mode_gives_the_global_embedding_as_every_region():
    features = random_features()
    token_index, _, regions = image_regions(features, tiny_config(embed_dim=8, n_cr=3), region_mode="cls")
    expected = F.normalize(features.token_embeds[:, 0], dim=-1)  # I_c: the projected CLS token, normalised
    assert regions.shape == (3, 3, 8) and token_index.shape == (3, 3)
    torch.testing.assert_close(regions, expected.unsqueeze(1).expand(-1, 3, -1))
    _, _, subregions = image_regions(features, tiny_config(embed_dim=8, n_cr=3))
    assert not torch.allclose(subregions, regions)


def test_single_token_training_gives_the_adaptor_one_noisy_copy(tiny_tokenizer, monkeypatch):
    seen = []
    for copies, expected in ((1, 1), (None, TINY["n_cr"])):
        model = MacCap(tiny_config(text_copies=copies), tiny_gpt2(tiny_tokenizer), tiny_tokenizer)
        monkeypatch.setattr(model, "caption_loss", lambda regions, ids, mask: seen.append(regions.shape) or 0)
        model.loss(torch.randn(2, 32), torch.zeros(2, 3, dtype=torch.long), torch.ones(2, 3, dtype=torch.long))
        assert seen[-1] == (2, expected, 32)
    with pytest.raises(ValueError, match="text_copies"):
        tiny_config(text_copies=0)


def test_text_to_text_is_the_image_inference_with_the_text_in_the_images_place(trained, tiny_encoder):
    texts = list(TINY_CORPUS[:8])
    embeds = tiny_encoder.encode_text(texts)  # (8, D)
    method = MacCapMethod(trained, tiny_encoder)
    # noise strong enough that some texts lose every clean reading among their samples
    options = MacCapOptions(samples=6, beams=2, noise_variance=2.0, n_cr=3, max_new_tokens=5, seed=3)
    with torch.inference_mode():
        decoded = method.text_to_text(texts, embeds, options)
        one_clean = method.text_to_text(texts, embeds, dataclasses.replace(options, samples=1))
    # by hand: sample s is the text's N_cr copies plus that sample's noise, decoded alone; the rerank keeps the
    # candidate whose CLIP text embedding is nearest the text's own
    copies = F.normalize(embeds, dim=-1).unsqueeze(1).expand(-1, 3, -1)  # (8, N_cr, D)
    by_sample = [trained.generate(sample_noise_batch(copies, sample=s, variance=2.0, seed=3), beams=2,
                                  max_new_tokens=5) for s in range(6)]
    choices = 0
    for i in range(len(texts)):
        candidates = [sample[i] for sample in by_sample]
        choices += len(set(candidates)) > 1
        cosines = tiny_encoder.encode_text(candidates) @ F.normalize(embeds[i], dim=-1)  # (S,)
        assert decoded[i] == candidates[int(cosines.argmax())]
    assert choices, "the noise should make some text's samples differ, or the rerank is not checked"
    assert decoded != one_clean  # the sampled reading is not the clean one here
    # S = 1 (Table 5's row without sampling and filtering): one clean sample, as training's copies without noise
    clean_copies = F.normalize(embeds, dim=-1).unsqueeze(1).expand(-1, 3, -1)  # N_cr = 3, no noise
    assert one_clean == trained.generate(clean_copies, beams=2, max_new_tokens=5)


def test_one_sample_is_the_clean_regions_without_noise_or_filtering(trained, tiny_encoder):
    features = tiny_encoder.encode_images(torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(4)))
    noisy = caption_images(trained, tiny_encoder, features, MacCapOptions(samples=1, noise_variance=0.5, n_cr=4))
    clean = caption_images(trained, tiny_encoder, features, MacCapOptions(samples=1, noise_variance=0.0, n_cr=4))
    _, _, regions = image_regions(features, trained.config, n_cr=4)
    direct = trained.generate(F.normalize(regions, dim=-1), beams=4, max_new_tokens=16)
    assert [r.caption for r in noisy] == [r.caption for r in clean] == direct
    assert [len(r.candidates) for r in noisy] == [1, 1]
