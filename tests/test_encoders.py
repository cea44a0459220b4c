"""The encoder layer: shapes, normalisation, the CLS attention against a recomputation, weight resolution."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from capdemo.encoders import ClipEncoder, EncoderConfig
from capdemo.features import ImageFeatures
from capdemo.weights import UnsafeWeightsError, WeightsUnavailableError, WeightSource, resolve
from capdemo.testing import tiny_encoder, tiny_encoder_config


@pytest.fixture(scope="module")
def vit_b32() -> ClipEncoder:
    torch.manual_seed(0)
    return ClipEncoder.from_config(EncoderConfig(model_name="ViT-B-32", pretrained=None))


def _check_features(encoder: ClipEncoder, pixels: torch.Tensor, *, dim: int, grid: tuple[int, int], heads: int):
    features = encoder.encode_images(pixels)
    batch, tokens = pixels.shape[0], 1 + grid[0] * grid[1]
    assert features.image_embeds.shape == (batch, dim)
    assert features.token_embeds.shape == (batch, tokens, dim)
    assert features.patch_embeds.shape == (batch, tokens - 1, dim)
    assert features.attention.shape == (batch, heads, tokens, tokens)
    assert features.cls_attention.shape == (batch, heads, tokens)
    assert features.cls_attention_mean.shape == (batch, tokens)
    assert features.grid_size == grid
    for tensor in (features.image_embeds, features.token_embeds, features.attention):
        assert tensor.dtype == torch.float32
    torch.testing.assert_close(features.image_embeds.norm(dim=-1), torch.ones(batch))
    torch.testing.assert_close(features.attention.sum(dim=-1), torch.ones(batch, heads, tokens))
    # the global embedding is the tower's own pooled output, and token 0 is its unnormalised form
    reference = F.normalize(encoder.model.encode_image(pixels), dim=-1)
    torch.testing.assert_close(features.image_embeds, reference, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(F.normalize(features.token_embeds[:, 0], dim=-1), reference, atol=1e-5, rtol=1e-5)
    return features


def test_vit_b32_shapes_and_normalisation(vit_b32):
    pixels = torch.randn(2, 3, 224, 224)
    _check_features(vit_b32, pixels, dim=512, grid=(7, 7), heads=12)
    text = vit_b32.encode_text(["a photo of a cat", "two dogs"])
    assert text.shape == (2, 512) and text.dtype == torch.float32
    torch.testing.assert_close(text.norm(dim=-1), torch.ones(2))
    assert vit_b32.embed_dim == 512


def test_tiny_config_shapes(tiny_encoder):
    pixels = torch.randn(3, 3, 32, 32)
    _check_features(tiny_encoder, pixels, dim=32, grid=(4, 4), heads=4)


def _recompute_last_block_attention(encoder: ClipEncoder, pixels: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) from the last block's input and its in_proj weights, per head."""
    block = encoder.model.visual.transformer.resblocks[-1]
    seen = {}
    handle = block.register_forward_pre_hook(lambda module, args: seen.setdefault("x", args[0]))
    with torch.no_grad():
        encoder.model.encode_image(pixels)
    handle.remove()
    x = block.ln_1(seen["x"])  # (B, T, W)
    attn = block.attn
    width, heads = attn.embed_dim, attn.num_heads
    head_dim = width // heads
    w_q, w_k = attn.in_proj_weight[:width], attn.in_proj_weight[width: 2 * width]
    b_q, b_k = attn.in_proj_bias[:width], attn.in_proj_bias[width: 2 * width]
    q = (x @ w_q.T + b_q).unflatten(-1, (heads, head_dim)).transpose(1, 2)  # (B, H, T, d)
    k = (x @ w_k.T + b_k).unflatten(-1, (heads, head_dim)).transpose(1, 2)  # (B, H, T, d)
    return torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(head_dim), dim=-1)  # (B, H, T, T)


@pytest.mark.parametrize("which", ["tiny", "vit_b32"])
def test_cls_attention_matches_recomputation(which, tiny_encoder, vit_b32):
    encoder = tiny_encoder if which == "tiny" else vit_b32
    size = encoder.model.visual.image_size[0]
    pixels = torch.randn(2, 3, size, size)
    features = encoder.encode_images(pixels)
    expected = _recompute_last_block_attention(encoder, pixels)
    torch.testing.assert_close(features.attention, expected, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(features.cls_attention, expected[:, :, 0, :], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(features.cls_attention_mean, expected[:, :, 0, :].mean(1), atol=1e-5, rtol=1e-4)


def test_hooks_removed_and_encoder_reusable(tiny_encoder):
    attn = tiny_encoder.model.visual.transformer.resblocks[-1].attn
    pixels = torch.randn(1, 3, 32, 32)
    first = tiny_encoder.encode_images(pixels)
    assert not attn._forward_hooks and not attn._forward_pre_hooks
    second = tiny_encoder.encode_images(pixels)
    torch.testing.assert_close(first.attention, second.attention)


def test_select_subset(tiny_encoder):
    features = tiny_encoder.encode_images(torch.randn(3, 3, 32, 32))
    part = features.select([2, 0])
    assert isinstance(part, ImageFeatures)
    torch.testing.assert_close(part.image_embeds, features.image_embeds[[2, 0]])
    torch.testing.assert_close(part.attention[1], features.attention[0])


# --- weight resolution ---------------------------------------------------------------------------


def test_local_safetensors_reload_gives_identical_embeddings(tmp_path):
    original = tiny_encoder(seed=3)
    weights = tmp_path / "tiny.safetensors"
    save_file({k: v.contiguous() for k, v in original.model.state_dict().items()}, str(weights))
    reloaded = ClipEncoder.from_config(tiny_encoder_config(pretrained=str(weights)))
    pixels = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(reloaded.encode_images(pixels).token_embeds, original.encode_images(pixels).token_embeds)
    text = ["two green triangles"]
    torch.testing.assert_close(reloaded.encode_text(text), original.encode_text(text))


def _fake_hub_cache(cache: Path, repo: str, revision: str, files: dict[str, bytes]) -> None:
    """Lay files out exactly as huggingface_hub caches a snapshot of ``repo`` at ``revision``."""
    root = cache / f"models--{repo.replace('/', '--')}"
    snapshot = root / "snapshots" / revision
    snapshot.mkdir(parents=True)
    for name, data in files.items():
        (snapshot / name).write_bytes(data)
    (root / "refs").mkdir()
    (root / "refs" / "main").write_text(revision)


from pathlib import Path  # noqa: E402


def test_hub_id_resolves_through_the_same_loader(tmp_path, monkeypatch):
    import huggingface_hub.constants as hub_constants
    from safetensors.torch import save

    original = tiny_encoder(seed=4)
    blob = save({k: v.contiguous() for k, v in original.model.state_dict().items()})
    revision = "0123456789abcdef0123456789abcdef01234567"
    _fake_hub_cache(tmp_path, "capdemo/tiny-clip", revision, {"open_clip_model.safetensors": blob})
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    reloaded = ClipEncoder.from_config(tiny_encoder_config(pretrained=f"hf-hub:capdemo/tiny-clip@{revision}"))
    pixels = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(reloaded.encode_images(pixels).image_embeds, original.encode_images(pixels).image_embeds)


def test_missing_hub_model_offline_is_one_line_error(tmp_path, monkeypatch):
    import huggingface_hub.constants as hub_constants

    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(WeightsUnavailableError) as info:
        ClipEncoder.from_config(EncoderConfig(model_name="ViT-B-32", pretrained="openai"))
    message = str(info.value)
    assert "\n" not in message
    assert "timm/vit_base_patch32_clip_224.openai" in message and "ViT-B-32" in message
    assert "hf download" in message
    assert "--revision a6f597a30f7b82c51704746581f9a4e41421e878" in message  # the tag's pinned commit


HEX_COMMIT = r"[0-9a-f]{40}"


@pytest.mark.parametrize("model_name,tag,hub_id", [
    ("ViT-B-32", "openai", "timm/vit_base_patch32_clip_224.openai"),
    ("ViT-B-16-SigLIP2", "webli", "timm/ViT-B-16-SigLIP2"),
])
def test_pretrained_tags_download_a_pinned_commit(monkeypatch, model_name, tag, hub_id):
    """open_clip fetches a tag from its repo's main branch; capdemo asks for a fixed commit (or the config's own)."""
    import re

    import capdemo.encoders as encoders

    asked = []

    def fake_resolve(spec, **kwargs):
        asked.append(spec)
        raise WeightsUnavailableError("stop here")

    monkeypatch.setattr(encoders, "resolve", fake_resolve)
    for revision in (None, "f" * 40):
        with pytest.raises(WeightsUnavailableError, match="stop here"):
            encoders.create_clip(EncoderConfig(model_name=model_name, pretrained=tag, revision=revision))
    pinned, chosen = (WeightSource.parse(spec) for spec in asked)
    assert pinned.location == chosen.location == hub_id
    assert re.fullmatch(HEX_COMMIT, pinned.revision) and pinned.revision == encoders.PRETRAINED_HUB_REVISIONS[hub_id]
    assert chosen.revision == "f" * 40


def test_a_bundle_that_references_a_tag_records_its_commit(monkeypatch):
    from capdemo.encoders import ENCODER_COMPONENT, PRETRAINED_HUB_REVISIONS, add_encoder_to_bundle

    class Recorder:
        def __init__(self):
            self.components = {}

        def add_component(self, name, config):
            self.components[name] = config

    writer = Recorder()
    add_encoder_to_bundle(writer, None, EncoderConfig(model_name="ViT-B-32", pretrained="openai"), copy_weights=False)
    recorded = EncoderConfig.from_dict(writer.components[ENCODER_COMPONENT])
    assert recorded.revision == PRETRAINED_HUB_REVISIONS["timm/vit_base_patch32_clip_224.openai"]


def test_default_language_models_are_pinned_to_commits():
    import re

    from capdemo.methods.maccap.model import MacCapConfig
    from capdemo.methods.tomcap.model import TOMCapConfig

    for spec in (MacCapConfig().lm, TOMCapConfig().lm):
        source = WeightSource.parse(spec)
        assert source.on_hub and re.fullmatch(HEX_COMMIT, source.revision or ""), spec


def test_source_spec_parsing():
    assert WeightSource.parse("hf-hub:org/name@abc") == WeightSource("org/name", "abc", on_hub=True)
    assert WeightSource.parse("hf-hub:org/name") == WeightSource("org/name", None, on_hub=True)
    assert WeightSource.parse("weights/shapes") == WeightSource("weights/shapes")
    assert str(WeightSource.parse("hf-hub:org/name@abc")) == "hf-hub:org/name@abc"
    with pytest.raises(ValueError, match="bad hub id"):
        WeightSource.parse("hf-hub:justname")
    with pytest.raises(WeightsUnavailableError, match="does not exist"):
        resolve("/nonexistent/weights.safetensors")


@pytest.mark.parametrize("name,content", [
    ("model.pt", b"anything"),
    ("model.bin", b"anything"),
    ("weights", b"\x80\x04\x95\x10\x00\x00"),  # a pickle (protocol 4) without a telling suffix
    ("archive", b"PK\x03\x04rest"),  # torch.save's zip container
])
def test_pickle_weights_refused_before_loading(tmp_path, name, content):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(UnsafeWeightsError, match="pickle"):
        ClipEncoder.from_config(tiny_encoder_config(pretrained=str(path)))


def test_encoder_spec_forms(tmp_path, tiny_bundle_dir):
    from capdemo.encoders import parse_encoder_spec

    assert parse_encoder_spec("ViT-B-32/openai") == EncoderConfig(model_name="ViT-B-32", pretrained="openai")
    assert parse_encoder_spec("ViT-B-32").pretrained is None
    assert parse_encoder_spec("ViT-B-32/hf-hub:org/clip@abc").pretrained == "hf-hub:org/clip@abc"
    config_file = tmp_path / "encoder.json"
    tiny_encoder_config().save_json(config_file)
    assert parse_encoder_spec(str(config_file)) == tiny_encoder_config()
    assert parse_encoder_spec(str(tmp_path)) == tiny_encoder_config()  # a folder holding encoder.json
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="neither a bundle"):  # not read as model name "" + pretrained path
        parse_encoder_spec(str(tmp_path / "empty"))
    from_bundle = parse_encoder_spec(str(tiny_bundle_dir))
    assert from_bundle.model_name == "capdemo-tiny-test"
    assert from_bundle.pretrained == str(tiny_bundle_dir / "encoder" / "open_clip_model.safetensors")


def test_a_hub_tokenizer_loads_from_its_pinned_commit(tmp_path, monkeypatch, tiny_tokenizer):
    """SigLIP2-style configs name a transformers tokenizer on the hub; it comes from the pinned commit,
    offline from the cache, and tokenizes as the tokenizer saved there."""
    import copy

    import huggingface_hub.constants as hub_constants
    from open_clip.tokenizer import HFTokenizer

    import capdemo.encoders as encoders
    from capdemo.testing import TINY_CLIP_CONFIG

    revision = "89abcdef0123456789abcdef0123456789abcdef"
    saved = tmp_path / "saved"
    tiny_tokenizer.save_pretrained(saved)
    cache = tmp_path / "hub"
    _fake_hub_cache(cache, "capdemo/tiny-tok", revision, {p.name: p.read_bytes() for p in saved.iterdir()})
    (cache / "models--capdemo--tiny-tok" / "refs" / "main").write_text("0" * 40)  # main moved on: unused
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setitem(encoders.PRETRAINED_HUB_REVISIONS, "capdemo/tiny-tok", revision)
    model_config = copy.deepcopy(TINY_CLIP_CONFIG)
    model_config["text_cfg"].update(hf_tokenizer_name="capdemo/tiny-tok", context_length=12)

    _, _, tokenizer = encoders.create_clip(tiny_encoder_config(model_name="capdemo-tiny-hub-tok",
                                                               model_config=model_config))
    assert isinstance(tokenizer, HFTokenizer)
    ids = tokenizer(["two green triangles"])
    assert ids.shape == (1, 12)
    expected = tiny_tokenizer("two green triangles")["input_ids"]
    assert ids[0, : len(expected)].tolist() == expected


def test_concurrent_image_passes_do_not_mix_their_outputs(tiny_encoder):
    """The hooked pass is shared state: threads encoding different batches each get their own features."""
    from concurrent.futures import ThreadPoolExecutor

    batches = [torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(seed)) for seed in range(8)]
    alone = [tiny_encoder.encode_images(pixels) for pixels in batches]
    with ThreadPoolExecutor(max_workers=4) as pool:
        together = list(pool.map(tiny_encoder.encode_images, batches * 3))
    for i, features in enumerate(together):
        torch.testing.assert_close(features.attention, alone[i % len(batches)].attention)
        torch.testing.assert_close(features.token_embeds, alone[i % len(batches)].token_embeds)


@pytest.mark.parametrize("model_name,tag,resize_mode", [("ViT-B-32", "openai", "shortest"),
                                                          ("ViT-B-16-SigLIP2", "webli", "squash")])
def test_a_pretrained_tag_keeps_its_whole_preprocessing(monkeypatch, tmp_path, model_name, tag, resize_mode):
    """open_clip forgets a tag's resize mode when weights come from a file; capdemo passes it on."""
    import open_clip

    import capdemo.encoders as encoders

    seen = {}

    def fake_create(name, **kwargs):
        seen.update(kwargs)
        raise WeightsUnavailableError("stop here")

    monkeypatch.setattr(encoders, "resolve", lambda spec, **kwargs: tmp_path / "weights.safetensors")
    monkeypatch.setattr(open_clip, "create_model_and_transforms", fake_create)
    with pytest.raises(WeightsUnavailableError, match="stop here"):
        encoders.create_clip(EncoderConfig(model_name=model_name, pretrained=tag))
    assert seen["image_resize_mode"] == resize_mode and seen["image_interpolation"] == "bicubic"


def test_center_crops_is_read_from_the_preprocessing(tiny_encoder):
    import open_clip

    assert tiny_encoder.center_crops
    _, _, squash = open_clip.create_model_and_transforms("ViT-B-32", image_resize_mode="squash")
    squashing = ClipEncoder(tiny_encoder.model, squash, tiny_encoder.tokenizer, embed_dim=tiny_encoder.embed_dim)
    assert not squashing.center_crops
