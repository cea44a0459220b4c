"""The shapes world's tiny CLIP: exact preprocessing, the loss, near misses, training quality, the gap, bundles."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from capdemo.bundle import Bundle, BundleWriter
from capdemo.config import ConfigError
from capdemo.encoders import ENCODER_COMPONENT, add_encoder_to_bundle, encoder_from_bundle
from training.shapes.clip import (
    SHAPES_CLIP_NAME,
    ClipPairs,
    TinyClipConfig,
    build_encoder,
    collate_pairs,
    contrastive_loss,
    evaluate_clip,
    generate_training_pairs,
    near_miss,
    normalise_pixels,
    shifted,
    train_clip,
    uint8_pixels,
)
from training.shapes import world
from training.shapes.language import COLOURS
from training.shapes.world import PALETTE, WorldConfig, captions, generate_pairs, generate_scenes

WORLD = WorldConfig(image_size=TinyClipConfig().image_size)  # training draws the world at the CLIP's input size
EVAL_PAIRS = 300  # held-out pairs per evaluation here: enough to tell trained from untrained
EVAL_REFERENCE = 1000


@pytest.fixture(scope="module")
def untrained():
    return build_encoder(TinyClipConfig.smoke())[0]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """The CI-sized CLIP, trained once for this module: (encoder, encoder_config, config, metrics)."""
    config = TinyClipConfig.smoke(out_dir=str(tmp_path_factory.mktemp("clip-run")))
    encoder, encoder_config, metrics = train_clip(config, world=WORLD, evaluate=False)
    metrics["eval"] = evaluate_clip(encoder, world=WORLD, n=EVAL_PAIRS, n_reference=EVAL_REFERENCE)
    return encoder, encoder_config, config, metrics


def test_config_builds_the_open_clip_model_it_describes(untrained):
    config = TinyClipConfig.smoke()
    assert TinyClipConfig.from_dict(config.to_dict()) == config
    encoder_config = config.encoder_config()
    assert encoder_config.model_name == SHAPES_CLIP_NAME and encoder_config.pretrained is None
    assert encoder_config.model_config == config.open_clip_config()
    assert untrained.embed_dim == config.embed_dim
    assert untrained.grid_size == (config.image_size // config.patch_size,) * 2
    assert untrained.tokenizer.context_length == config.context_length
    assert untrained.model.logit_scale.exp().item() == pytest.approx(config.logit_scale)
    assert not any(p.requires_grad for p in untrained.model.parameters())
    with pytest.raises(ConfigError, match="multiple of patch_size"):
        TinyClipConfig(patch_size=12)
    with pytest.raises(ConfigError, match="near_misses"):
        TinyClipConfig(near_misses=2, pairs=1000)  # 1000 pairs do not split into families of 3


def test_palette_draws_every_colour_word():
    assert tuple(PALETTE) == COLOURS


def test_training_pixels_equal_the_apps_preprocess(untrained):
    images = [image for _, image, _ in generate_pairs(6, seed=5, config=WORLD)]
    pixels = normalise_pixels(uint8_pixels(images), untrained.model)
    assert pixels.dtype == torch.float32 and torch.equal(pixels, untrained.preprocess(images))
    with pytest.raises(ValueError, match="draw the world at the CLIP's image_size"):
        normalise_pixels(uint8_pixels([images[0].resize((48, 48))]), untrained.model)


def test_near_misses_change_exactly_one_attribute():
    rng = np.random.default_rng(0)
    object_fields = {("colour",), ("colour2",), ("shape",), ("shape2",), ("relation",)}
    for scene in generate_scenes(600, seed=2, config=WORLD):
        variant = near_miss(scene, rng, world=WORLD)
        changed = tuple(f.name for f in dataclasses.fields(scene) if getattr(scene, f.name) != getattr(variant, f.name))
        assert variant.kind == scene.kind and changed, scene
        swapped = (variant.colour, variant.shape, variant.colour2, variant.shape2) == (
            scene.colour2, scene.shape2, scene.colour, scene.shape)
        assert len(changed) == 1 or (scene.kind == "pair" and swapped), (scene, variant)
        if scene.kind == "pair" and not swapped:
            assert changed in object_fields


def test_dataset_serves_families_with_every_paraphrase(untrained):
    config = TinyClipConfig.smoke(batch_size=8).replace(near_misses=3, pairs=40)
    pairs = generate_training_pairs(config, world=WORLD)
    dataset = ClipPairs(pairs, untrained.tokenizer, family_size=config.family_size)
    assert len(dataset) == 10
    batch = collate_pairs([dataset[2], dataset[7]])
    size = config.image_size
    assert batch["pixels"].shape == (8, 3, size, size) and batch["pixels"].dtype == torch.uint8
    assert batch["captions"].shape == (8, 3, config.context_length)
    for row, index in enumerate([8, 9, 10, 11, 28, 29, 30, 31]):  # families 2 and 7, each of 4 pairs
        scene, image, detail = pairs[index]
        assert detail == ""  # the recipe's captions say only the scene
        expected = untrained.tokenizer(captions(scene))
        assert torch.equal(batch["captions"][row, : batch["caption_count"][row]], expected)
        assert torch.equal(batch["pixels"][row], uint8_pixels([image])[0])
    anchor, misses = pairs[8][0], [scene for scene, _, _ in pairs[9:12]]
    assert all(miss != anchor for miss in misses)


def test_contrastive_loss_counts_pairs_of_one_scene_as_matches(untrained):
    pairs = generate_pairs(4, seed=1, config=WORLD)
    tokens = untrained.tokenizer([text for _, _, text in pairs])  # (4, L)
    batch = {"pixels": uint8_pixels([image for _, image, _ in pairs]), "captions": tokens[:, None],
             "caption_count": torch.ones(4, dtype=torch.long), "scene": torch.tensor([0, 0, 1, 2])}
    with torch.no_grad():
        images = F.normalize(untrained.model.encode_image(normalise_pixels(batch["pixels"], untrained.model)), dim=-1)
        texts = F.normalize(untrained.model.encode_text(tokens), dim=-1)
        logits = untrained.model.logit_scale.exp() * images @ texts.T
        targets = torch.tensor([[0.5, 0.5, 0, 0], [0.5, 0.5, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]])
        image_to_text = (targets * logits.log_softmax(1)).sum(1).mean()
        text_to_image = (targets * logits.T.log_softmax(1)).sum(1).mean()
        by_hand = -image_to_text / 2 - text_to_image / 2
        plain = (F.cross_entropy(logits, torch.arange(4)) + F.cross_entropy(logits.T, torch.arange(4))) / 2
        torch.testing.assert_close(contrastive_loss(untrained.model, batch, same_scene_positives=True), by_hand)
        torch.testing.assert_close(contrastive_loss(untrained.model, batch, same_scene_positives=False), plain)


def test_shifted_moves_each_image_by_its_own_offset_and_repeats_the_edge():
    pixels = torch.arange(2 * 4 * 4, dtype=torch.float).reshape(2, 1, 4, 4)  # (B, C, H, W)
    torch.manual_seed(3)
    offsets = torch.randint(0, 3, (2, 2)).tolist()  # the draw shifted makes: (top, left) in [0, 2 * reach]
    torch.manual_seed(3)
    moved = shifted(pixels, 1)
    assert moved.shape == pixels.shape
    for image, out, (top, left) in zip(pixels, moved, offsets):
        rows = [min(max(row + top - 1, 0), 3) for row in range(4)]  # an offset of 1 is no move
        columns = [min(max(column + left - 1, 0), 3) for column in range(4)]
        assert torch.equal(out, image[:, rows][:, :, columns])
    assert torch.equal(shifted(pixels, 0), pixels)


def test_image_views_add_an_image_to_image_infonce_of_the_configured_weight(untrained, monkeypatch):
    pairs = generate_pairs(4, seed=1, config=WORLD)
    tokens = untrained.tokenizer([text for _, _, text in pairs])  # (4, L)
    batch = {"pixels": uint8_pixels([image for _, image, _ in pairs]), "captions": tokens[:, None],
             "caption_count": torch.ones(4, dtype=torch.long), "scene": torch.arange(4)}
    model = untrained.model
    with torch.no_grad():
        plain = contrastive_loss(model, batch, same_scene_positives=False)
        assert torch.equal(contrastive_loss(model, batch, same_scene_positives=False, image_views=0.0), plain)
        # with views that are the images themselves, the added term is InfoNCE over the images' own similarities
        monkeypatch.setattr("training.shapes.clip.shifted", lambda pixels, reach: pixels)
        images = F.normalize(model.encode_image(normalise_pixels(batch["pixels"], model)), dim=-1)  # (4, D)
        term = F.cross_entropy(10.0 * images @ images.T, torch.arange(4))
        torch.testing.assert_close(contrastive_loss(model, batch, same_scene_positives=False, image_views=0.5,
                                                    image_views_scale=10.0), plain + 0.5 * term)
    with pytest.raises(ConfigError, match="image_views"):
        TinyClipConfig.smoke().replace(image_views=-1.0)


def test_training_beats_an_untrained_clip_by_far(trained, untrained):
    encoder, _, _, metrics = trained
    before = evaluate_clip(untrained, world=WORLD, n=EVAL_PAIRS, n_reference=EVAL_REFERENCE)
    after = metrics["eval"]
    assert before["i2t"] < 0.03 and before["zero_shot"] < 0.02  # chance is about 1/846 per scene
    assert after["i2t"] > 0.08 and after["t2i"] > 0.08
    # among all 846 scenes of world v2 (clutter, occluders, textured backgrounds) the smoke CLIP measured
    # zero-shot 0.033 and image_nn 0.073, ~28x and ~60x chance
    assert after["zero_shot"] > 0.02 and after["image_nn"] > 0.05
    assert after["zero_shot_attributes"]["overall"] > before["zero_shot_attributes"]["overall"] + 0.15
    assert metrics["final_loss"] < math.log(TinyClipConfig.smoke().train.batch_size) - 1.5
    selection = after["selection"]  # where MacCap's 10 patches land: never more often than any 10 could
    assert 0 <= selection["selected_patches_on_objects"] <= selection["selection_on_objects_ceiling"] <= 1
    assert not encoder.model.training and not any(p.requires_grad for p in encoder.model.parameters())


def test_fixed_logit_scale_leaves_a_real_modality_gap(trained):
    encoder, _, config, metrics = trained
    gap = metrics["eval"]["gap"]
    assert encoder.model.logit_scale.exp().item() == pytest.approx(config.logit_scale, rel=1e-3)  # never trained
    assert gap["probe_accuracy"] > 0.9  # a linear probe tells the two modalities apart
    assert gap["mean_distance"] > 0.2 and gap["image_mean_norm"] > 0.2 and gap["text_mean_norm"] > 0.2
    assert gap["paired_cosine"] > gap["unpaired_cosine"] + 0.1


def test_image_views_widen_the_gap_and_lower_the_paired_cosine(trained, tmp_path):
    """SLIP's image-to-image term makes the image embedding keep what tells one picture from another, which no
    caption predicts: the same CI-sized CLIP trained with it ends further from its captions (measured: gap 0.74 ->
    0.97, paired cosine 0.59 -> 0.32; at the recipe's size 0.58 -> 0.86 and 0.76 -> 0.45), retrieving no worse."""
    plain = trained[3]["eval"]
    config = TinyClipConfig.smoke(out_dir=str(tmp_path)).replace(image_views=0.25, image_views_scale=200.0)
    encoder, _, _ = train_clip(config, world=WORLD, evaluate=False)
    viewed = evaluate_clip(encoder, world=WORLD, n=EVAL_PAIRS, n_reference=EVAL_REFERENCE)
    assert viewed["gap"]["mean_distance"] > plain["gap"]["mean_distance"] + 0.1
    assert viewed["gap"]["paired_cosine"] < plain["gap"]["paired_cosine"] - 0.15
    assert viewed["gap"]["probe_accuracy"] >= 0.99
    assert viewed["i2t"] >= plain["i2t"] - 0.05


def test_trained_weights_round_trip_through_a_bundle(trained, tmp_path):
    encoder, encoder_config, _, _ = trained
    state = encoder.model.state_dict()
    assert all(torch.equal(t.half().float(), t) for t in state.values() if t.is_floating_point())  # fp16-exact
    writer = BundleWriter(tmp_path / "bundle", name="clip-test")
    add_encoder_to_bundle(writer, encoder, encoder_config, copy_weights=True)
    bundle = Bundle.load(writer.finish())
    assert bundle.component(ENCODER_COMPONENT)["model_config"] == encoder_config.model_config
    reloaded = encoder_from_bundle(bundle)
    pairs = generate_pairs(8, seed=11, config=WORLD)
    images, texts = [image for _, image, _ in pairs], [text for _, _, text in pairs]
    assert torch.equal(reloaded.encode_image_embeds(reloaded.preprocess(images)),
                       encoder.encode_image_embeds(encoder.preprocess(images)))
    assert torch.equal(reloaded.encode_text(texts), encoder.encode_text(texts))


def test_train_clip_refuses_a_world_drawn_at_another_size():
    with pytest.raises(ConfigError, match="image_size"):
        train_clip(TinyClipConfig.smoke(), world=WorldConfig(image_size=64))


def test_default_clip_sees_vit_b32s_seven_by_seven_grid(untrained):
    assert TinyClipConfig().image_size // TinyClipConfig().patch_size == 7
    assert WorldConfig().image_size == TinyClipConfig().image_size
    assert untrained.grid_size == (7, 7)


def test_mismatched_pairs_carry_another_scenes_caption_at_the_configured_rate():
    clean = TinyClipConfig.smoke(batch_size=8).replace(near_misses=1, pairs=400)
    noisy = clean.replace(mismatched=0.25)
    right, wrong = generate_training_pairs(clean, world=WORLD), generate_training_pairs(noisy, world=WORLD)
    assert [image.tobytes() for _, image, _ in right] == [image.tobytes() for _, image, _ in wrong]  # same images
    flipped = sum(a != b for (a, _, _), (b, _, _) in zip(right, wrong)) / len(right)
    assert 0.15 < flipped < 0.3  # (a redrawn scene equals the true one about 1 time in 400)
    again = generate_training_pairs(noisy, world=WORLD)
    assert [scene for scene, _, _ in again] == [scene for scene, _, _ in wrong]  # seeded
    with pytest.raises(ConfigError, match="mismatched"):
        TinyClipConfig(mismatched=1.0)


def test_detailed_captions_say_what_their_own_image_shows_at_the_configured_rate():
    plain = TinyClipConfig.smoke(batch_size=8).replace(near_misses=1, pairs=400)
    told = plain.replace(detail=0.5)
    right, detailed = generate_training_pairs(plain, world=WORLD), generate_training_pairs(told, world=WORLD)
    assert [(scene, image.tobytes()) for scene, image, _ in right] == [
        (scene, image.tobytes()) for scene, image, _ in detailed]  # the same pairs, only the captions say more
    assert {detail for _, _, detail in right} == {""}
    # the image's own facts, redrawn the way the pairs were drawn: anchors from the world's stream, near misses
    anchors = world.generate_pairs_with_unmentioned(200, seed=WORLD.train_seed, config=WORLD)
    mentioned = said = 0
    for (_, image, _, unmentioned), (_, drawn, detail) in zip(anchors, detailed[::2]):
        assert image.tobytes() == drawn.tobytes()
        phrases = [phrase for phrase in detail.split(", ") if phrase]
        assert all(phrase in unmentioned.phrases() for phrase in phrases)  # never says what the image lacks
        mentioned += len(phrases)
        said += len(unmentioned.phrases())
    assert 0.4 < mentioned / said < 0.6
    with pytest.raises(ConfigError, match="detail"):
        TinyClipConfig(detail=1.5)


def test_detail_misses_redraw_the_anchors_scene_inside_its_family():
    config = TinyClipConfig.smoke(batch_size=8).replace(near_misses=2, detail_misses=1, detail=1.0, pairs=40,
                                                        context_length=28)
    pairs = generate_training_pairs(config, world=WORLD)
    for start in range(0, len(pairs), config.family_size):
        (anchor, anchor_image, _), *misses, (redrawn, redrawn_image, detail) = pairs[start : start + 4]
        assert redrawn == anchor and redrawn_image.tobytes() != anchor_image.tobytes()
        assert all(scene != anchor for scene, _, _ in misses)
        assert detail.startswith(", on a ")  # at detail 1 every caption says its background's tone
    with pytest.raises(ConfigError, match="detail_misses"):
        TinyClipConfig.smoke(batch_size=8).replace(near_misses=3, detail_misses=1, pairs=40)  # families of 5


def test_unmentioned_records_what_the_renderer_drew():
    rng_a, rng_b = np.random.default_rng(5), np.random.default_rng(5)
    scene = world.Scene("group", "red", "circle", count=3)
    drawn = []
    for _ in range(200):
        image, unmentioned = world.render_with_unmentioned(scene, rng_a, config=WORLD)
        assert image.tobytes() == world.render(scene, rng_b, config=WORLD).tobytes()  # same draws
        assert 0 <= unmentioned.clutter <= WORLD.clutter
        drawn.append(unmentioned)
    assert 0.2 < sum(u.occluded for u in drawn) / len(drawn) < 0.4  # WORLD.occlusion is 0.3
    assert 0.3 < sum(u.dark for u in drawn) / len(drawn) < 0.7  # the darker half of a uniform grey
    assert {u.clutter for u in drawn} == set(range(WORLD.clutter + 1))
    bare = WORLD.replace(clutter=0, occlusion=0.0)  # nothing unmentioned is drawn but the background
    assert {world.render_with_unmentioned(scene, rng_a, config=bare)[1].phrases()[1:] for _ in range(20)} == {()}
    facts = world.Unmentioned(dark=True, clutter=2, occluded=True)
    assert facts.phrases() == ("on a dark background", "with two specks", "partly hidden")
    assert world.Unmentioned(dark=False, clutter=0, occluded=False).phrases() == ("on a grey background",)
    assert world.Unmentioned(dark=False, clutter=1, occluded=False).phrases()[1] == "with one speck"


def test_a_caption_the_context_would_cut_is_refused(untrained):
    scene = world.Scene("single", "red", "circle", size="large", position="left")
    image = world.render(scene, np.random.default_rng(0), config=WORLD)
    long_detail = ", on a dark background" * 6
    with pytest.raises(ConfigError, match="context"):
        ClipPairs([(scene, image, long_detail)], untrained.tokenizer)


def test_an_average_pooled_clip_embeds_images_as_the_mean_of_its_projected_patch_tokens(untrained):
    from PIL import Image

    pooled_by_mean = build_encoder(TinyClipConfig.smoke().replace(vision_pool="avg"))[0]
    image = Image.new("RGB", (WORLD.image_size, WORLD.image_size), (200, 40, 40))
    for encoder, is_mean in ((pooled_by_mean, True), (untrained, False)):
        features = encoder.encode_images(encoder.preprocess([image]))
        patches = features.token_embeds[:, 1:]  # (1, 49, D) projected patch tokens
        mean_of_patches = F.normalize(patches.mean(dim=1), dim=-1)  # (1, D)
        assert torch.allclose(features.image_embeds, mean_of_patches, atol=1e-5) is is_mean
        # the patch saliency MacCap selects by is the pooling query's attention: the mean of the 49 patch rows when
        # the tower pools by the patch mean, the CLS token's row otherwise
        rows = features.attention  # (1, H, 50, 50)
        pooling_row = rows[:, :, 1:, :].mean(dim=2) if is_mean else rows[:, :, 0, :]  # (1, H, 50)
        assert torch.allclose(features.cls_attention, pooling_row, atol=1e-6)
        assert torch.allclose(features.cls_attention.sum(dim=-1), torch.ones(1, rows.shape[1]), atol=1e-5)
        assert not torch.allclose(rows[:, :, 1:, :].mean(dim=2), rows[:, :, 0, :], atol=1e-3)  # the two differ
        assert torch.allclose(features.global_embeds, features.token_embeds[:, 0])
    assert "pool_type" not in TinyClipConfig().open_clip_config()["vision_cfg"]  # "tok": world v1's config unchanged
    with pytest.raises(ConfigError, match="vision_pool"):
        TinyClipConfig(vision_pool="max")


def test_a_fixed_position_embedding_stays_fixed_through_training(tmp_path):
    learned, fixed = TinyClipConfig.smoke(), TinyClipConfig.smoke().replace(vision_pos_embed="sin_cos_2d")
    assert "pos_embed_type" not in learned.open_clip_config()["vision_cfg"]  # the shipped encoders' configs unchanged
    assert fixed.open_clip_config()["vision_cfg"]["pos_embed_type"] == "sin_cos_2d"
    table = build_encoder(fixed)[0].model.visual.positional_embedding.detach().clone()  # (1 + 49, width)
    assert table[1:, 0].unique().numel() > 1 and torch.equal(table[0], torch.zeros_like(table[0]))  # CLS: zeros
    short = fixed.replace(pairs=512, train=fixed.train.replace(epochs=1, out_dir=str(tmp_path)))
    encoder, _, _ = train_clip(short, world=WORLD, evaluate=False)
    trained_table = encoder.model.visual.positional_embedding
    assert torch.equal(trained_table, table.half().float())  # only the bundle's fp16 rounding touched it
    assert not torch.equal(encoder.model.visual.conv1.weight, build_encoder(fixed)[0].model.visual.conv1.weight)
    with pytest.raises(ConfigError, match="vision_pos_embed"):
        TinyClipConfig(vision_pos_embed="rope")
