"""TOMCap: config, prompt, trainable set and its size, masked loss, batched inference, bundle round trip."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from capdemo.bundle import Bundle, BundleWriter
from capdemo.encoders import EncoderConfig
from capdemo.gap import GapStats
from capdemo.lm import save_causal_lm
from capdemo.retrieval import CaptionDatastore, DatastoreError
from capdemo.lm import IGNORE_INDEX
from capdemo.methods.base import options_from_config
from capdemo.methods.tomcap.inference import (
    TOMCapMethod, TOMCapOptions, add_to_bundle, caption_images, datastore_from_bundle, load_from_bundle,
    retrieve_neighbours,
)
from capdemo.methods.tomcap.model import (
    TOMCap, TOMCapConfig, build_prompt, load_gpt2_with_cross_attention, parameter_count_formula,
)
from capdemo.testing import TINY_CORPUS, tiny_gpt2, tiny_tokenizer

EMBED_DIM = 32  # the tiny CLIP's joint space
N_EMBD, N_LAYER = 64, 2  # tiny_gpt2


# --------------------------------------------------------------------------------------------
# Helpers shared with test_train_tomcap


def shapes_captions() -> list[str]:
    """200 distinct captions, each differing from 20 others by exactly one word."""
    sizes, colours = ["small", "large"], ["red", "blue", "green", "yellow", "white"]
    shapes = ["circle", "square", "triangle", "star"]
    places = ["on the left", "on the right", "at the top", "at the bottom", "in the middle"]
    return [f"a {s} {c} {h} {p}" for s, c, h, p in itertools.product(sizes, colours, shapes, places)]


def bag_of_words_embedder(vocabulary: list[str], *, dim: int = EMBED_DIM, seed: int = 0):
    """A stand-in text encoder: normalised sum of random word vectors, so one-word edits are near neighbours."""
    generator = torch.Generator().manual_seed(seed)
    words = {w: torch.randn(dim, generator=generator) for w in sorted({w for text in vocabulary for w in text.split()})}

    def embed(texts: list[str]) -> torch.Tensor:
        return F.normalize(torch.stack([sum(words[w] for w in text.split()) for text in texts]), dim=-1)  # (N, D)

    return embed


def save_tiny_lm(folder: Path, captions: list[str], *, output_gain: float = 1.0) -> Path:
    """A tiny GPT-2 without cross-attention (as a pretrained one comes), dropout off, saved with its tokenizer.

    ``output_gain`` sets ln_f's (frozen) gain. A random GPT-2 with tied 0.02-scale embeddings has
    logits within about +-1.3, so no trainable part can make it confident (loss stays near
    log(vocab)); a pretrained GPT-2 has no such bound, and a gain stands in for that.
    """
    tokenizer = tiny_tokenizer(list(captions) + [build_prompt(["a"], TOMCapConfig())], vocab_size=400)
    lm = tiny_gpt2(tokenizer, n_embd=N_EMBD, n_layer=N_LAYER)
    lm.config.resid_pdrop = lm.config.embd_pdrop = lm.config.attn_pdrop = 0.0
    with torch.no_grad():
        lm.transformer.ln_f.weight.fill_(output_gain)
    return save_causal_lm(lm, tokenizer, folder)


def build_model(lm_dir: Path, *, seed: int = 0, **overrides) -> TOMCap:
    config = TOMCapConfig(lm=str(lm_dir), embed_dim=EMBED_DIM, lora_dropout=0.0, **overrides)
    torch.manual_seed(seed)  # the new cross-attention, LoRA and projection weights
    lm, tokenizer = load_gpt2_with_cross_attention(lm_dir)
    return TOMCap(config, lm, tokenizer).eval()


# --------------------------------------------------------------------------------------------
# Fixtures


@pytest.fixture(scope="module")
def lm_dir(tmp_path_factory) -> Path:
    return save_tiny_lm(tmp_path_factory.mktemp("tomcap-lm"), TINY_CORPUS)


def perturb_trainable(model: TOMCap, scale: float) -> TOMCap:
    """Trained-looking weights: at initialisation LoRA B is zero and the memory barely matters."""
    with torch.no_grad():
        for param in model.trainable_parameters():
            param.add_(scale * torch.randn_like(param))
    return model


@pytest.fixture(scope="module")
def model(lm_dir) -> TOMCap:
    torch.manual_seed(1)
    return perturb_trainable(build_model(lm_dir, max_new_tokens=6, noise_variance=0.0), 0.3)  # noise-free loss


@pytest.fixture(scope="module")
def image_embeds(tiny_encoder) -> torch.Tensor:
    """Unit vectors far enough apart to retrieve different neighbours (prompts of different lengths): (3, D)."""
    return tiny_encoder.encode_text(["a red circle", "two green triangles above", "a large white square at the bottom"])


@pytest.fixture(scope="module")
def datastore(tiny_encoder, tmp_path_factory) -> tuple[CaptionDatastore, Path]:
    store = CaptionDatastore.build(tiny_encoder.encode_text(TINY_CORPUS), TINY_CORPUS, encoder_name=tiny_encoder.name)
    folder = tmp_path_factory.mktemp("tomcap-store")
    store.save(folder)
    return store, folder


@pytest.fixture(scope="module")
def pixels() -> torch.Tensor:
    return torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(3))  # (B, 3, H, W) for the tiny CLIP


# --------------------------------------------------------------------------------------------
# Config and prompt


def test_config_round_trips_and_refuses_bad_values():
    siglip = EncoderConfig(model_name="ViT-B-16-SigLIP2", pretrained="webli")
    config = TOMCapConfig(k=3, target="input", retrieval_encoder=siglip)
    assert TOMCapConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ValueError, match="target"):
        TOMCapConfig(target="original")
    with pytest.raises(ValueError, match="lora_targets"):
        TOMCapConfig(lora_targets=("mlp.c_fc",))
    with pytest.raises(ValueError, match="mean_std"):
        TOMCapConfig(gap_correction="median")


def test_prompt_is_the_papers_sentence_with_neighbours_as_sentences():
    config = TOMCapConfig()
    prompt = build_prompt(["a red circle.", " two green triangles ", "a blue square"], config)
    assert prompt == ("Similar images have the following captions: a red circle. two green triangles. "
                      "a blue square. Write a caption:")
    assert build_prompt(["ignored"], config.replace(use_retrieval=False)) == "Write a caption:"


@pytest.mark.parametrize(
    ("overrides", "hits", "target", "prompt"),
    [
        ({}, 5, 10, [11, 12, 13, 14]),  # paper target, kept out of the prompt
        ({"target_in_prompt": True}, 4, 10, [10, 11, 12, 13]),  # target is c1: a copy task
        ({"target": "input"}, 4, None, [10, 11, 12, 13]),
        ({"use_retrieval": False}, 1, 10, []),
        ({"use_retrieval": False, "target": "input"}, 0, None, []),
    ],
)
def test_split_hits_gives_target_and_prompt_neighbours(overrides, hits, target, prompt):
    config = TOMCapConfig(k=4, **overrides)
    assert config.hits_for_training == hits
    assert config.split_hits([10, 11, 12, 13, 14][:hits]) == (target, prompt)


# --------------------------------------------------------------------------------------------
# Trainable set


def test_trainable_count_matches_formula(lm_dir):
    formula = parameter_count_formula(TOMCapConfig(), n_embd=N_EMBD, n_layer=N_LAYER, embed_dim=EMBED_DIM)
    # by hand: projection 32*64 + 64 + 2*64; cross-attention 2*(4*64^2 + 6*64); LoRA 2*32*64*((1+3) + (1+1))
    assert formula == {"projection": 2240, "cross_attention": 33536, "lora": 24576, "total": 60352}
    for targets in [("attn.c_attn", "attn.c_proj"), ("attn.c_attn", "crossattention.q_attn")]:
        model = build_model(lm_dir, lora_targets=targets)
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        expected = parameter_count_formula(model.config, n_embd=N_EMBD, n_layer=N_LAYER)["total"]
        assert trainable == expected
    # GPT-2 base with 512-d CLIP: LoRA 12*32*768*6, cross-attention 12*(4*768^2 + 6*768)
    base = parameter_count_formula(TOMCapConfig(), n_embd=768, n_layer=12, embed_dim=512)
    assert (base["lora"], base["cross_attention"]) == (1_769_472, 28_366_848)


def test_only_cross_attention_lora_and_projection_train(model):
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    frozen = {name for name, p in model.named_parameters() if not p.requires_grad}
    for name in trainable:
        assert (name.startswith("memory_proj.") or ".crossattention." in name or ".ln_cross_attn." in name
                or ".lora_A." in name or ".lora_B." in name), name
    for block in range(N_LAYER):  # everything of the backbone is frozen, the wrapped projections' base weights too
        assert {f"lm.transformer.h.{block}.attn.c_attn.base_layer.weight", f"lm.transformer.h.{block}.mlp.c_fc.weight",
                f"lm.transformer.h.{block}.ln_1.weight"} <= frozen
        assert {f"lm.transformer.h.{block}.attn.{m}.lora_{ab}.default.weight"
                for m in ("c_attn", "c_proj") for ab in "AB"} <= trainable
    assert {"lm.transformer.wte.weight", "lm.transformer.wpe.weight", "lm.transformer.ln_f.weight"} <= frozen
    assert not any(".crossattention." in name and "lora_" in name for name in trainable)  # no LoRA on the new layers


def test_a_training_step_leaves_the_backbone_unchanged(lm_dir):
    model = build_model(lm_dir, noise_variance=0.016).train()
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    ids, labels = model.tokens.training_tokens(["a red circle on the left", "two green triangles"], "a blue square")
    input_ids, labels = torch.tensor([ids, ids]), torch.tensor([labels, labels])
    optimizer = torch.optim.AdamW(model.trainable_parameters(), lr=1e-2)
    mask = torch.ones_like(input_ids)
    loss = model.loss(torch.randn(2, EMBED_DIM), torch.randn(2, 2, EMBED_DIM), input_ids, mask, labels)
    loss.backward()
    optimizer.step()
    for name, param in model.named_parameters():
        changed = not torch.equal(param, before[name])
        assert changed == param.requires_grad, name  # every trainable tensor moved, no frozen one did


def test_loss_is_on_the_target_tokens_only(model):
    tokenizer = model.tokenizer
    neighbours = ["a red circle on the left", "two green triangles"]
    input_ids, labels = model.tokens.training_tokens(neighbours, "a blue square.")
    prompt = tokenizer(build_prompt(neighbours, model.config), add_special_tokens=False)["input_ids"]
    target = tokenizer(" a blue square.", add_special_tokens=False)["input_ids"] + [model.eos_id]
    assert input_ids == prompt + target
    assert labels == [IGNORE_INDEX] * len(prompt) + target

    ids, lab = torch.tensor([input_ids]), torch.tensor([labels])
    inputs, neighbour_embeds = torch.randn(1, EMBED_DIM), torch.randn(1, 2, EMBED_DIM)
    loss = model.loss(inputs, neighbour_embeds, ids, torch.ones_like(ids), lab)
    with torch.no_grad():
        logits = model.lm(input_ids=ids, encoder_hidden_states=model.memory(inputs, neighbour_embeds)).logits[0]
    start = len(prompt) - 1  # the logits at the last prompt token predict the first target token
    manual = F.cross_entropy(logits[start : start + len(target)], torch.tensor(target))
    torch.testing.assert_close(loss, manual)
    changed_prompt = ids.clone()
    changed_prompt[0, 1] = (changed_prompt[0, 1] + 1) % len(tokenizer)
    other = model.loss(inputs, neighbour_embeds, changed_prompt, torch.ones_like(ids), lab)
    assert not torch.isclose(loss, other)  # the prompt conditions the target ...
    nothing = torch.full_like(lab, IGNORE_INDEX)
    assert model.loss(inputs, neighbour_embeds, ids, torch.ones_like(ids), nothing) == 0  # ... but no loss of its own


def test_training_target_is_cut_to_max_caption_tokens(lm_dir):
    model = build_model(lm_dir, max_caption_tokens=3)
    _, labels = model.tokens.training_tokens(["a red circle"], "a small yellow circle at the top")
    target = [t for t in labels if t != IGNORE_INDEX]
    assert len(target) == 3 and target[-1] == model.eos_id


# --------------------------------------------------------------------------------------------
# Inference


def caption(model: TOMCap, encoder, store, images: torch.Tensor, **settings) -> list:
    """TOMCap's batched inference from pixels (B, 3, H, W) or image embeddings (B, D), the config's settings
    changed by ``settings``."""
    embeds = images if images.ndim == 2 else encoder.encode_image_embeds(images)
    options = options_from_config(TOMCapOptions, model.config).replace(**settings)
    return caption_images(model, encoder, store, embeds, embeds, options)


def test_result_holds_beams_neighbours_embeddings_and_prompt(model, tiny_encoder, datastore, image_embeds):
    store, _ = datastore
    results = caption(model, tiny_encoder, store, image_embeds, beams=3, select_by="clip")
    for b, result in enumerate(results):
        assert result.method == "tomcap" and len(result.candidates) == 3
        scores = [c.clip_score for c in result.candidates]
        assert scores == sorted(scores, reverse=True) and result.caption == result.candidates[0].text
        assert sorted(c.sample for c in result.candidates) == [0, 1, 2]
        expected = store.retrieve(image_embeds[b : b + 1], 4)[0]
        assert [n.text for n in result.neighbours] == [n.text for n in expected]
        assert result.extras["prompt"] == build_prompt([n.text for n in expected], model.config)
        assert {k: tuple(v.shape) for k, v in result.embeddings.items()} == {
            "image": (1, EMBED_DIM), "neighbours": (4, EMBED_DIM), "candidates": (3, EMBED_DIM)}
        neighbour_embeds = tiny_encoder.encode_text([n.text for n in expected])
        torch.testing.assert_close(result.embeddings["neighbours"], neighbour_embeds)
        for candidate, embed in zip(result.candidates, result.embeddings["candidates"]):
            if candidate.text:
                assert candidate.clip_score == pytest.approx(float(embed @ image_embeds[b]), abs=1e-5)
        assert list(result.timings_ms) == ["retrieve", "generate", "rerank"]  # encode: the facade's


def test_batched_inference_equals_one_image_at_a_time(model, tiny_encoder, datastore, image_embeds):
    store, _ = datastore
    batched = caption(model, tiny_encoder, store, image_embeds)
    assert len({r.extras["prompt"] for r in batched}) == 3 and len({r.caption for r in batched}) == 3  # not trivial
    for b in range(len(image_embeds)):
        single = caption(model, tiny_encoder, store, image_embeds[b : b + 1])[0]
        assert [c.text for c in single.candidates] == [c.text for c in batched[b].candidates]
        assert [n.text for n in single.neighbours] == [n.text for n in batched[b].neighbours]
        scores = [c.clip_score for c in batched[b].candidates]
        assert [c.clip_score for c in single.candidates] == pytest.approx(scores, abs=1e-5)


def test_beam_order_selection_keeps_the_beams_as_decoded(model, tiny_encoder, datastore, image_embeds):
    store, _ = datastore
    assert model.config.select_by == "beam"  # the paper decodes by beam search; the CLIP rerank is capdemo's option
    by_beam = caption(model, tiny_encoder, store, image_embeds)
    by_clip = caption(model, tiny_encoder, store, image_embeds, select_by="clip")
    reordered = 0
    for beam_result, clip_result in zip(by_beam, by_clip):
        assert [c.sample for c in beam_result.candidates] == list(range(len(beam_result.candidates)))
        assert sorted(c.text for c in beam_result.candidates) == sorted(c.text for c in clip_result.candidates)
        scores = [c.clip_score for c in clip_result.candidates]
        assert scores == sorted(scores, reverse=True)
        reordered += [c.sample for c in clip_result.candidates] != [c.sample for c in beam_result.candidates]
    assert reordered, "the rerank changed no order: this test would not notice it being ignored"


def test_without_retrieval_the_memory_is_the_image_alone(lm_dir, tiny_encoder, pixels):
    model = build_model(lm_dir, use_retrieval=False, max_new_tokens=6)
    results = caption(model, tiny_encoder, None, pixels)
    assert all(r.neighbours == [] and r.extras["prompt"] == "Write a caption:" for r in results)
    assert results[0].embeddings["neighbours"].shape == (0, EMBED_DIM)
    assert model.memory(torch.randn(2, EMBED_DIM), None).shape == (2, 1, N_EMBD)


def test_without_retrieval_the_text_to_text_ceiling_decodes_the_text_embedding_alone(lm_dir, tiny_encoder):
    model = build_model(lm_dir, use_retrieval=False, gap_correction="none", max_new_tokens=6)
    method = TOMCapMethod(model, tiny_encoder, datastore=None, gap_stats=None, retriever=None)
    texts = list(TINY_CORPUS[:3])
    embeds = tiny_encoder.encode_text(texts)  # (3, D)
    with torch.inference_mode():  # as the evaluation calls it
        decoded = method.text_to_text(texts, embeds)  # no store to search: before, this crashed on datastore.search
    as_images = [r.caption for r in caption(model, tiny_encoder, None, embeds.float())]
    assert decoded == as_images  # the same decoder, memory and rerank as an image with that embedding


def test_the_text_to_text_ceiling_retrieves_the_options_k_neighbours(lm_dir, tiny_encoder, datastore, monkeypatch):
    store, _ = datastore
    model = build_model(lm_dir, gap_correction="none", max_new_tokens=6)
    method = TOMCapMethod(model, tiny_encoder, datastore=store, gap_stats=None, retriever=None)
    texts = list(TINY_CORPUS[:3])
    embeds = tiny_encoder.encode_text(texts)  # (3, D)
    memory, neighbours = model.memory, []
    monkeypatch.setattr(model, "memory", lambda inputs, near: neighbours.append(near.shape[1]) or memory(inputs, near))
    with torch.inference_mode():
        for k in (1, 3):
            method.text_to_text(texts, embeds, method.options(k=k))
    assert neighbours == [1, 3]  # the memory holds K neighbour embeddings, as an image's does


def test_bad_retrieval_setups_are_one_line_errors(model, tiny_encoder, datastore, pixels):
    store, _ = datastore
    with pytest.raises(DatastoreError, match=r"k=9 neighbours asked for, but the datastore holds only 8 captions"):
        retrieve_neighbours(store, tiny_encoder.encode_image_embeds(pixels), 9)
    method = TOMCapMethod(model, tiny_encoder, datastore=store, gap_stats=None, retriever=None)
    with pytest.raises(ValueError, match=r"k must be between 1 and 8, got 9"):  # the store's size bounds K
        method.options(k=9)
    with pytest.raises(DatastoreError, match="no datastore"):
        caption(model, tiny_encoder, None, pixels)
    other = CaptionDatastore.build(torch.randn(8, EMBED_DIM), TINY_CORPUS, encoder_name="another-clip")
    with pytest.raises(DatastoreError, match="another-clip"):  # checked once, when the method is put together
        TOMCapMethod(model, tiny_encoder, datastore=other, gap_stats=None, retriever=None)


# --------------------------------------------------------------------------------------------
# Bundles


def _write_bundle(path: Path, model: TOMCap, store_dir: Path, *, copy_datastore: bool, gap_stats: GapStats) -> Bundle:
    writer = BundleWriter(path, name="tomcap-test")
    add_to_bundle(writer, model, datastore=store_dir, copy_datastore=copy_datastore, gap_stats=gap_stats)
    writer.finish()
    return Bundle.load(path)


def test_bundle_round_trip_gives_identical_captions(lm_dir, tiny_encoder, datastore, image_embeds, tmp_path):
    store, store_dir = datastore
    model = perturb_trainable(build_model(lm_dir, seed=7, max_new_tokens=6), 0.3)
    gap_stats = GapStats.compute(torch.randn(20, EMBED_DIM), torch.randn(30, EMBED_DIM))
    bundle = _write_bundle(tmp_path / "bundle", model, store_dir, copy_datastore=True, gap_stats=gap_stats)

    component = bundle.component("tomcap")
    assert (component["lm"], component["datastore"], component["gap_stats"]) == (
        "bundle:tomcap/lm", "bundle:tomcap/datastore", "bundle:tomcap/gap_stats.safetensors")
    loaded, loaded_store = load_from_bundle(bundle), datastore_from_bundle(bundle)
    assert loaded.config == model.config.replace(**{k: component[k] for k in ("lm", "datastore", "gap_stats")})
    for name, tensor in model.trainable_state().items():
        assert torch.equal(loaded.trainable_state()[name], tensor), name
    assert list(loaded_store.captions) == TINY_CORPUS
    torch.testing.assert_close(GapStats.load(bundle.file("tomcap/gap_stats.safetensors")).mu_text, gap_stats.mu_text)
    original = caption(model, tiny_encoder, store, image_embeds)
    reloaded = caption(loaded, tiny_encoder, loaded_store, image_embeds)
    assert [r.to_json()["candidates"] for r in reloaded] == [r.to_json()["candidates"] for r in original]

    resaved = _write_bundle(tmp_path / "again", loaded, store_dir, copy_datastore=False, gap_stats=gap_stats)
    assert resaved.component("tomcap")["datastore"] == str(store_dir)  # referenced, not copied
    assert not (resaved.path / "tomcap" / "datastore").exists()
    assert list(datastore_from_bundle(resaved).captions) == TINY_CORPUS


def test_weights_of_another_config_are_refused(lm_dir, model):
    other = build_model(lm_dir, lora_targets=("attn.c_attn",))
    with pytest.raises(ValueError, match="do not fit this config"):
        other.load_trainable_state(model.trainable_state())


def test_input_noise_is_scale_times_sigma_image_per_dimension_and_not_renormalised(lm_dir):
    """The cross-attention input in training: corrected embedding + N(0, (s sigma_I)^2) per dimension, kept off the
    sphere, so the corrected set keeps its mean and each dimension's std grows to sigma_I sqrt(1 + s^2)."""
    generator = torch.Generator().manual_seed(0)
    texts = F.normalize(torch.randn(3000, EMBED_DIM, generator=generator), dim=-1)
    images = torch.randn(400, EMBED_DIM, generator=generator) * torch.linspace(0.05, 0.3, EMBED_DIM) + 0.1
    stats = GapStats.compute(images, texts)
    model = build_model(lm_dir, input_noise_scale=0.5)
    with pytest.raises(ValueError, match="pass --gap-stats"):
        model.set_training_noise(None)
    model.set_training_noise(stats)
    seen = {}

    def capture(input_embeds, neighbour_embeds):
        seen["inputs"] = input_embeds
        raise StopIteration  # the memory is all this test needs

    model.memory = capture
    corrected = stats.correct(texts, "mean_std")  # what the examples hand over
    torch.manual_seed(11)
    with pytest.raises(StopIteration):
        model.loss(corrected, None, torch.zeros(3000, 2, dtype=torch.long), torch.ones(3000, 2, dtype=torch.long),
                   torch.zeros(3000, 2, dtype=torch.long))
    noise = seen["inputs"] - corrected  # (N, D)
    torch.testing.assert_close(noise.std(dim=0, correction=0), 0.5 * stats.sigma_image, rtol=0.05, atol=1e-2)
    torch.testing.assert_close(noise.mean(dim=0), torch.zeros(EMBED_DIM), atol=3 * 0.5 * 0.3 / 3000**0.5, rtol=0)
    torch.testing.assert_close(seen["inputs"].std(dim=0, correction=0), stats.sigma_image * 1.25**0.5, rtol=0.05,
                               atol=1e-2)
    assert not torch.allclose(seen["inputs"].norm(dim=-1), torch.ones(3000), atol=0.05)  # no re-normalisation
    model.config = model.config.replace(input_noise_scale=0.0)
    model.set_training_noise(stats)
    assert model.input_noise_std is None
