"""Timm towers pooled by a MAP head (open_clip's SigLIP2 layout): projected tokens and the latent's attention.

The towers are tiny timm ViTs registered with timm at import time (the installed
open_clip passes no size kwargs from a config to ``timm.create_model``, so a
registered model name is how a config selects a small trunk), built the way
timm's ``vit_base_patch16_siglip_224`` is (no CLS token, ``global_pool="map"``)
and wrapped by open_clip configs written like its SigLIP2 JSONs. The names avoid
"siglip": open_clip picks the (downloaded) SigLIP tokenizer by that substring.
"""

from __future__ import annotations

import math

import pytest
import timm
import torch
import torch.nn.functional as F
from timm.models import build_model_with_cfg, register_model
from timm.models.vision_transformer import VisionTransformer

from capdemo.encoders import ClipEncoder, EncoderConfig, map_tokens_through_pool
from capdemo.features import ImageFeatures
from capdemo.methods.maccap.model import MacCapConfig, aggregate_regions, image_regions
from capdemo.methods.maccap.inference import MacCapOptions, build_result
from capdemo.rerank import ScoredTexts

# vit_base_patch16_siglip_224's arguments at test size: 32 px, patch 8 -> 4x4 grid, width 64, 2 blocks, 2 heads
TINY_SIGLIP_ARGS = dict(
    img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=2, class_token=False, global_pool="map"
)
GRID = (4, 4)
HEADS = 2


def _tiny_vit(variant: str, pretrained: bool, model_args: dict, kwargs: dict) -> VisionTransformer:
    """As timm's own ViT entrypoints build a model (open_clip's kwargs win), with a random-init cfg."""
    assert not pretrained, "random initialisation only"
    if not kwargs.get("pretrained_cfg"):  # no registered weights: describe the input instead
        kwargs["pretrained_cfg"] = dict(input_size=(3, 32, 32), num_classes=0)
    return build_model_with_cfg(VisionTransformer, variant, pretrained=False, **{**model_args, **kwargs})


def capdemo_test_vit_map(pretrained: bool = False, **kwargs) -> VisionTransformer:
    """SigLIP-shaped: no prefix tokens, MAP head."""
    return _tiny_vit("capdemo_test_vit_map", pretrained, TINY_SIGLIP_ARGS, kwargs)


def capdemo_test_vit_reg2_map(pretrained: bool = False, **kwargs) -> VisionTransformer:
    """With 2 register tokens, which the MAP head does not see (timm's *_reg4_map models)."""
    return _tiny_vit("capdemo_test_vit_reg2_map", pretrained, {**TINY_SIGLIP_ARGS, "reg_tokens": 2}, kwargs)


for _entrypoint in (capdemo_test_vit_map, capdemo_test_vit_reg2_map):
    if not timm.is_model(_entrypoint.__name__):
        register_model(_entrypoint)


def map_model_config(timm_model: str, *, embed_dim: int = 64, proj: str = "none", pool: str = "map") -> dict:
    """An open_clip config laid out as ViT-B-16-SigLIP2.json, tiny, with open_clip's own tokenizer (offline)."""
    return {
        "embed_dim": embed_dim,
        "init_logit_bias": -10,
        "custom_text": True,
        "vision_cfg": {
            "image_size": 32,
            "timm_model_name": timm_model,
            "timm_model_pretrained": False,
            "timm_pool": pool,
            "timm_proj": proj,
        },
        "text_cfg": {
            "context_length": 16, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 1,
            "no_causal_mask": True, "proj_bias": True, "pool_type": "last",
            "norm_kwargs": {"eps": 1e-6}, "act_kwargs": {"approximate": "tanh"},
        },
    }


VARIANTS = {
    # name: (open_clip model name, config, trunk prefix tokens, joint-space dim)
    "siglip2": ("capdemo-test-map-vit", map_model_config("capdemo_test_vit_map"), 0, 64),
    "linear-proj": (  # open_clip's own head after the MAP head: a width-64 trunk into a 32-d joint space
        "capdemo-test-map-linear", map_model_config("capdemo_test_vit_map", embed_dim=32, proj="linear"), 0, 32
    ),
    "registers": ("capdemo-test-reg2-map", map_model_config("capdemo_test_vit_reg2_map"), 2, 64),
}


def build_encoder(variant: str, seed: int = 0) -> ClipEncoder:
    name, config, _, _ = VARIANTS[variant]
    torch.manual_seed(seed)
    return ClipEncoder.from_config(EncoderConfig(model_name=name, pretrained=None, model_config=config))


@pytest.fixture(scope="module", params=list(VARIANTS))
def variant(request) -> tuple[str, ClipEncoder]:
    return request.param, build_encoder(request.param)


@pytest.fixture(scope="module")
def siglip2() -> ClipEncoder:
    return build_encoder("siglip2")


def pixels_for(batch: int = 3, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def capture_inputs(encoder: ClipEncoder, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
    """A plain ``model.encode_image`` pass, keeping the MAP head's input and the last block's input."""
    trunk = encoder.model.visual.trunk
    seen: dict[str, torch.Tensor] = {}
    handles = [
        trunk.attn_pool.register_forward_pre_hook(lambda module, args: seen.setdefault("pool_in", args[0])),
        trunk.blocks[-1].register_forward_pre_hook(lambda module, args: seen.setdefault("block_in", args[0])),
    ]
    try:
        with torch.no_grad():
            seen["pooled"] = encoder.model.encode_image(pixels)
    finally:
        for handle in handles:
            handle.remove()
    return seen


def recompute_latent_attention(pool, x: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) of the latent query from the pool's q and kv weights, per head: (B, H, N)."""
    width, heads = pool.kv.in_features, pool.num_heads
    head_dim = width // heads
    w_k, b_k = pool.kv.weight[:width], pool.kv.bias[:width]  # kv's output is [keys | values]
    q = pool.latent[0, 0] @ pool.q.weight.T + pool.q.bias  # (W,)
    k = x @ w_k.T + b_k  # (B, N, W)
    logits = torch.einsum("hd,bnhd->bhn", q.view(heads, head_dim), k.unflatten(-1, (heads, head_dim)))
    return torch.softmax(logits / math.sqrt(head_dim), dim=-1)


def recompute_block_attention(block, x: torch.Tensor) -> torch.Tensor:
    """The last block's self-attention from its input and its qkv weights, per head: (B, H, T, T)."""
    attn = block.attn
    h = block.norm1(x)
    width, heads = h.shape[-1], attn.num_heads
    head_dim = width // heads
    q, k, _ = (h @ attn.qkv.weight.T + attn.qkv.bias).split(width, dim=-1)
    q, k = q.unflatten(-1, (heads, head_dim)).transpose(1, 2), k.unflatten(-1, (heads, head_dim)).transpose(1, 2)
    return torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(head_dim), dim=-1)


# --- what the encoder returns ---------------------------------------------------------------------


def test_tower_is_a_timm_map_vit(variant):
    name, encoder = variant
    trunk = encoder.model.visual.trunk
    assert type(trunk.attn_pool).__name__ == "AttentionPoolLatent"
    assert trunk.num_prefix_tokens == VARIANTS[name][2]
    assert encoder.supports_tokens
    assert encoder.grid_size == GRID


def test_shapes_dtypes_and_normalisation(variant):
    name, encoder = variant
    _, _, prefix, dim = VARIANTS[name]
    batch, patches = 3, GRID[0] * GRID[1]
    tokens = prefix + patches
    features = encoder.encode_images(pixels_for(batch))
    assert features.num_prefix_tokens == prefix  # 0 for SigLIP2: no CLS token, every token is a patch
    assert features.grid_size == GRID
    assert features.image_embeds.shape == (batch, dim)
    assert features.token_embeds.shape == (batch, tokens, dim)
    assert features.patch_embeds.shape == (batch, patches, dim)
    assert features.attention.shape == (batch, HEADS, tokens, tokens)
    assert features.cls_attention.shape == (batch, HEADS, tokens)
    assert features.cls_attention_mean.shape == (batch, tokens)
    assert features.global_embeds.shape == (batch, dim)
    for tensor in (features.image_embeds, features.token_embeds, features.attention, features.cls_attention,
                   features.global_embeds):
        assert tensor.dtype == torch.float32
    torch.testing.assert_close(features.image_embeds.norm(dim=-1), torch.ones(batch))
    torch.testing.assert_close(features.cls_attention.sum(-1), torch.ones(batch, HEADS))
    torch.testing.assert_close(features.cls_attention_mean.sum(-1), torch.ones(batch))
    torch.testing.assert_close(features.attention.sum(-1), torch.ones(batch, HEADS, tokens))
    assert (features.cls_attention >= 0).all()
    if prefix:  # the MAP head never sees the register tokens
        assert torch.equal(features.cls_attention[..., :prefix], torch.zeros(batch, HEADS, prefix))


def test_global_embedding_is_the_towers_own(variant):
    _, encoder = variant
    pixels = pixels_for(2, seed=1)
    features = encoder.encode_images(pixels)
    with torch.no_grad():
        pooled = encoder.model.encode_image(pixels)
    torch.testing.assert_close(features.image_embeds, F.normalize(pooled, dim=-1), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(features.global_embeds, pooled, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(encoder.encode_image_embeds(pixels), features.image_embeds, atol=1e-6, rtol=1e-5)


def test_latent_attention_matches_recomputation_from_pool_weights(variant):
    name, encoder = variant
    prefix = VARIANTS[name][2]
    pixels = pixels_for(3, seed=2)
    features = encoder.encode_images(pixels)
    seen = capture_inputs(encoder, pixels)
    pool = encoder.model.visual.trunk.attn_pool
    expected = recompute_latent_attention(pool, seen["pool_in"])  # (B, H, N_p)
    torch.testing.assert_close(features.cls_attention[..., prefix:], expected, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(features.cls_attention_mean[:, prefix:], expected.mean(1), atol=1e-6, rtol=1e-5)
    # and it is the attention the pool used: its weighted values, through proj and the MLP, give its output
    width = pool.kv.in_features
    values = (seen["pool_in"] @ pool.kv.weight[width:].T + pool.kv.bias[width:]).unflatten(-1, (HEADS, -1))
    mixed = torch.einsum("bhn,bnhd->bhd", features.cls_attention[..., prefix:], values).flatten(1)  # (B, W)
    out = pool.proj(mixed)
    out = out + pool.mlp(pool.norm(out))
    with torch.no_grad():
        torch.testing.assert_close(out, pool(seen["pool_in"]), atol=1e-5, rtol=1e-4)


def test_block_attention_matches_recomputation(variant):
    _, encoder = variant
    pixels = pixels_for(2, seed=3)
    features = encoder.encode_images(pixels)
    seen = capture_inputs(encoder, pixels)
    expected = recompute_block_attention(encoder.model.visual.trunk.blocks[-1], seen["block_in"])
    torch.testing.assert_close(features.attention, expected, atol=1e-6, rtol=1e-5)


def test_token_mapping_is_the_pool_and_heads_on_a_single_token(variant):
    name, encoder = variant
    prefix = VARIANTS[name][2]
    visual = encoder.model.visual
    trunk = visual.trunk
    pixels = pixels_for(2, seed=4)
    features = encoder.encode_images(pixels)
    with torch.no_grad():
        tokens = trunk.forward_features(pixels)  # (B, T, W) final-norm tokens
        batch, num_tokens, width = tokens.shape
        alone = tokens.reshape(batch * num_tokens, 1, width)  # every token as a one-token sequence
        # the pool itself on a one-token input ...
        torch.testing.assert_close(
            map_tokens_through_pool(visual, alone), visual.head(trunk.fc_norm(trunk.attn_pool(alone))).unsqueeze(1),
            atol=1e-5, rtol=1e-4,
        )
        # ... and the whole tower after the trunk (timm's forward_head strips the prefix tokens: pad them back)
        padded = torch.cat([torch.zeros(batch * num_tokens, prefix, width), alone], dim=1)
        expected = visual.head(trunk.forward_head(padded)).reshape(batch, num_tokens, -1)
    torch.testing.assert_close(features.token_embeds, expected, atol=1e-5, rtol=1e-4)
    if name == "siglip2":  # SigLIP2 has no head after the pool: token_embeds are the pool's own outputs
        assert isinstance(trunk.head, torch.nn.Identity) and len(visual.head) == 0


def test_one_tower_pass_and_hooks_removed(siglip2):
    trunk = siglip2.model.visual.trunk
    passes = []
    counter = trunk.patch_embed.register_forward_hook(lambda *args: passes.append(1))
    before = siglip2.images_encoded
    try:
        first = siglip2.encode_images(pixels_for(3))
    finally:
        counter.remove()
    assert len(passes) == 1 and siglip2.images_encoded == before + 3
    for module in (trunk.norm, trunk.attn_pool, trunk.blocks[-1].attn):
        assert not module._forward_hooks and not module._forward_pre_hooks
    second = siglip2.encode_images(pixels_for(3))
    torch.testing.assert_close(first.cls_attention, second.cls_attention)
    torch.testing.assert_close(first.token_embeds, second.token_embeds)


# --- ImageFeatures without a CLS token -------------------------------------------------------------


def test_select_cat_and_to_keep_the_pooling_fields(siglip2):
    features = siglip2.encode_images(pixels_for(3))
    part = features.select([2, 0])
    torch.testing.assert_close(part.cls_attention, features.cls_attention[[2, 0]])
    torch.testing.assert_close(part.global_embeds, features.global_embeds[[2, 0]])
    joined = ImageFeatures.cat([features.select([0]), features.select([1, 2])])
    for field in ("image_embeds", "token_embeds", "attention", "pool_attention", "pooled_embeds"):
        assert torch.equal(getattr(joined, field), getattr(features, field))
    assert joined.num_prefix_tokens == 0 and joined.grid_size == GRID
    moved = features.to("cpu")
    assert torch.equal(moved.pool_attention, features.pool_attention)


def test_no_cls_token_requires_the_pooling_fields(siglip2):
    features = siglip2.encode_images(pixels_for(1))
    with pytest.raises(ValueError, match="num_prefix_tokens == 0"):
        ImageFeatures(features.image_embeds, features.token_embeds, features.attention, GRID, num_prefix_tokens=0)
    with pytest.raises(ValueError, match="come together"):
        ImageFeatures(features.image_embeds, features.token_embeds, features.attention, GRID, num_prefix_tokens=0,
                      pool_attention=features.pool_attention)


def test_timm_tower_pooled_otherwise_gives_global_embeddings_only():
    name = "capdemo-test-avg-vit"
    torch.manual_seed(0)
    encoder = ClipEncoder.from_config(EncoderConfig(
        model_name=name, pretrained=None, model_config=map_model_config("capdemo_test_vit_map", pool="avg"),
    ))
    assert encoder.model.visual.trunk.attn_pool is None and not encoder.supports_tokens
    with pytest.raises(NotImplementedError, match="MAP head"):
        encoder.encode_images(pixels_for(1))
    assert encoder.encode_image_embeds(pixels_for(2)).shape == (2, 64)


# --- MacCap on a MAP tower --------------------------------------------------------------------------


def test_maccap_regions_pick_top_patches_by_latent_attention(variant):
    name, encoder = variant
    prefix, dim = VARIANTS[name][2], VARIANTS[name][3]
    pixels = pixels_for(3, seed=5)
    features = encoder.encode_images(pixels)
    expected_attention = recompute_latent_attention(
        encoder.model.visual.trunk.attn_pool, capture_inputs(encoder, pixels)["pool_in"]
    ).mean(1)  # (B, N_p) head-averaged
    config = MacCapConfig(embed_dim=dim, n_cr=5, heads=4, lm="unused")
    token_index, attention, regions = image_regions(features, config)
    top_values, top_patches = expected_attention.topk(5, dim=-1)
    assert torch.equal(token_index, top_patches + prefix)  # prefix tokens are never picked
    torch.testing.assert_close(attention, top_values, atol=1e-6, rtol=1e-5)
    # regions as eq. 12-13: the picked tokens' last-block rows pool the tokens, plus the pooled embedding
    rows = features.attention.mean(1).gather(1, token_index.unsqueeze(-1).expand(-1, -1, features.attention.shape[-1]))
    subregions = F.normalize(rows @ F.normalize(features.token_embeds, dim=-1), dim=-1)
    expected_regions = (subregions + features.image_embeds.unsqueeze(1)) / 2
    assert regions.shape == (3, 5, dim)
    torch.testing.assert_close(regions, expected_regions, atol=1e-6, rtol=1e-5)
    raw = aggregate_regions(features, token_index, normalise_parts=False, combine="sum")
    torch.testing.assert_close(raw, rows @ features.token_embeds + features.global_embeds.unsqueeze(1))


def test_result_patches_on_the_grid(siglip2):
    features = siglip2.encode_images(pixels_for(2, seed=6))
    config = MacCapConfig(embed_dim=64, n_cr=4, heads=4, lm="unused")
    token_index, attention, regions = image_regions(features, config)
    scored = ScoredTexts(texts=["a", "b"], scores=torch.tensor([0.1, 0.3]), embeds=torch.zeros(2, 64))
    for b in range(2):
        result = build_result(features, b, token_index, attention, regions, scored, {}, MacCapOptions(n_cr=4))
        assert [p.index for p in result.patches] == token_index[b].tolist()  # no prefix: token i is patch i
        for patch in result.patches:
            assert patch.row * GRID[1] + patch.col == patch.index
            assert patch.attention == pytest.approx(features.cls_attention_mean[b, patch.index].item())
        assert result.embeddings["patches"].shape == (16, 64)
        assert result.caption == "b"
