"""CLIP through open_clip: global embeddings, projected patch tokens and the CLS attention in one pass.

MacCap needs three things from the image tower that ``encode_image`` does not
return: the last-layer tokens projected into the joint space (I'_p, paper eq. 10),
and the last block's attention (the CLS row picks the informative patches, the
picked rows aggregate them; eq. 12). :class:`ClipEncoder` gets all of them from a
single forward pass: the tower is switched to return its tokens, and a hook on
the last block's ``nn.MultiheadAttention`` asks it for per-head weights.

Towers that pool without a CLS token (timm-backed SigLIP2 with a MAP head) give
global image/text embeddings only; asking them for tokens is a clear error.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from capdemo.config import Config
from capdemo.weights import WeightSource, check_not_pickle, resolve

OPEN_CLIP_WEIGHTS_FILE = "open_clip_model.safetensors"


@dataclass
class EncoderConfig(Config):
    """Which CLIP to run and where its weights come from."""

    model_name: str = "ViT-B-32"  # open_clip architecture name (or the name of `model_config` below)
    # Weights: an open_clip pretrained tag ("openai"), "hf-hub:org/repo@rev", a local .safetensors
    # file or folder holding open_clip_model.safetensors, or None for random initialisation.
    pretrained: str | None = "openai"
    revision: str | None = None  # pinned hub revision used with a pretrained tag (None: the hub's default)
    # An open_clip architecture JSON (embed_dim, vision_cfg, text_cfg) registered under `model_name`
    # at load time, for custom towers such as the shapes world's tiny CLIP. None: a built-in config.
    model_config: dict[str, Any] | None = None
    quick_gelu: bool | None = None  # None: take it from the pretrained tag's config (OpenAI weights use QuickGELU)


@dataclass
class ImageFeatures:
    """Everything the methods read from the image tower, for a batch of B images.

    T = num_prefix_tokens + N_p tokens; token 0 is the CLS token when
    num_prefix_tokens == 1, and patches follow in row-major grid order.
    """

    image_embeds: torch.Tensor  # (B, D) global embedding I_c, L2-normalised
    token_embeds: torch.Tensor  # (B, T, D) last-layer tokens after ln_post and the projection (I'_p), not normalised
    attention: torch.Tensor  # (B, H, T, T) last block's self-attention probabilities per head (rows sum to 1)
    grid_size: tuple[int, int]  # (rows, cols) of the patch grid
    num_prefix_tokens: int = 1

    @property
    def patch_embeds(self) -> torch.Tensor:
        return self.token_embeds[:, self.num_prefix_tokens:]  # (B, N_p, D)

    @property
    def cls_attention(self) -> torch.Tensor:
        """CLS query's attention over all T tokens, per head: (B, H, T)."""
        return self.attention[:, :, 0, :]

    @property
    def cls_attention_mean(self) -> torch.Tensor:
        """Head-averaged CLS attention over all T tokens: (B, T)."""
        return self.cls_attention.mean(dim=1)

    def select(self, index: torch.Tensor | slice | Sequence[int]) -> "ImageFeatures":
        """The features of a subset of the batch (same tensors, indexed on dim 0)."""
        return ImageFeatures(
            image_embeds=self.image_embeds[index],
            token_embeds=self.token_embeds[index],
            attention=self.attention[index],
            grid_size=self.grid_size,
            num_prefix_tokens=self.num_prefix_tokens,
        )

    def to(self, device: torch.device | str) -> "ImageFeatures":
        return ImageFeatures(
            self.image_embeds.to(device), self.token_embeds.to(device), self.attention.to(device),
            self.grid_size, self.num_prefix_tokens,
        )


def register_model_config(name: str, model_config: dict[str, Any]) -> None:
    """Make a custom open_clip architecture available under ``name`` (open_clip reads configs from files)."""
    import open_clip

    if name in open_clip.list_models() and open_clip.get_model_config(name) == model_config:
        return
    folder = Path(tempfile.mkdtemp(prefix="capdemo-open-clip-"))
    (folder / f"{name}.json").write_text(json.dumps(model_config))
    open_clip.add_model_config(folder / f"{name}.json")


def _local_weights_file(spec: str, what: str) -> Path:
    path = resolve(spec, what=what)
    if path.is_dir():
        path = path / OPEN_CLIP_WEIGHTS_FILE
        if not path.exists():
            raise FileNotFoundError(f"{what}: {path.parent} has no {OPEN_CLIP_WEIGHTS_FILE}")
    check_not_pickle(path)
    return path


def _is_pretrained_tag(config: EncoderConfig) -> bool:
    import open_clip

    tag = config.pretrained
    return bool(tag) and tag in open_clip.list_pretrained_tags_by_model(config.model_name)


def create_clip(config: EncoderConfig, *, device: str | torch.device = "cpu") -> tuple[nn.Module, Any, Any]:
    """Build (model, preprocess, tokenizer) for ``config``; weights always load from a local safetensors file."""
    import open_clip

    if config.model_config is not None:
        register_model_config(config.model_name, config.model_config)
    what = f"CLIP encoder {config.model_name}"
    kwargs: dict[str, Any] = {}
    weights: Path | None = None
    if _is_pretrained_tag(config):
        tag_cfg = open_clip.get_pretrained_cfg(config.model_name, config.pretrained)
        hub_id = tag_cfg["hf_hub"].strip("/")
        spec = f"hf-hub:{hub_id}" + (f"@{config.revision}" if config.revision else "")
        weights = resolve(spec, what=f"{what} ({config.pretrained})", filename=OPEN_CLIP_WEIGHTS_FILE)
        kwargs.update(image_mean=tag_cfg.get("mean"), image_std=tag_cfg.get("std"))
        kwargs["force_quick_gelu"] = tag_cfg.get("quick_gelu", False) if config.quick_gelu is None else config.quick_gelu
    elif config.pretrained:
        weights = _local_weights_file(config.pretrained, what)
        kwargs["force_quick_gelu"] = bool(config.quick_gelu)
    elif config.quick_gelu:
        kwargs["force_quick_gelu"] = True
    model, _, preprocess = open_clip.create_model_and_transforms(
        config.model_name, pretrained=str(weights) if weights else None, device=device, **kwargs
    )
    model.eval().requires_grad_(False)
    return model, preprocess, open_clip.get_tokenizer(config.model_name)


class ClipEncoder(nn.Module):
    """Frozen CLIP with batched image/text encoding; see the module docstring."""

    def __init__(self, model: nn.Module, preprocess: Any, tokenizer: Any, *, embed_dim: int, name: str = "clip"):
        super().__init__()
        self.model = model
        self._embed_dim = embed_dim
        self.transform = preprocess
        self.tokenizer = tokenizer
        self.name = name
        visual = model.visual
        self._last_attn = _last_block_attention(visual)
        self.images_encoded = 0  # vision-tower passes, counted per image (the app promises one per image)

    @classmethod
    def from_config(cls, config: EncoderConfig, *, device: str | torch.device = "cpu") -> "ClipEncoder":
        model, preprocess, tokenizer = create_clip(config, device=device)
        import open_clip

        embed_dim = open_clip.get_model_config(config.model_name)["embed_dim"]
        return cls(model, preprocess, tokenizer, embed_dim=embed_dim, name=encoder_name(config))

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def embed_dim(self) -> int:
        return self._embed_dim

    @property
    def supports_tokens(self) -> bool:
        return self._last_attn is not None

    @property
    def grid_size(self) -> tuple[int, int]:
        return tuple(self.model.visual.grid_size)  # type: ignore[return-value]

    def preprocess(self, images: Sequence[Any]) -> torch.Tensor:
        """PIL images -> (B, 3, H, W) pixels on the encoder's device."""
        return torch.stack([self.transform(image) for image in images]).to(self.device)

    @torch.inference_mode()
    def encode_text(self, texts: Sequence[str]) -> torch.Tensor:
        """Texts -> (B, D) L2-normalised float32 embeddings."""
        tokens = self.tokenizer(list(texts)).to(self.device)
        return F.normalize(self.model.encode_text(tokens).float(), dim=-1)

    @torch.inference_mode()
    def encode_image_embeds(self, pixels: torch.Tensor) -> torch.Tensor:
        """Pixels -> (B, D) L2-normalised global embeddings only (any tower)."""
        self.images_encoded += pixels.shape[0]
        out = self.model.visual(pixels.to(self.device, self._dtype()))
        pooled = out[0] if isinstance(out, tuple) else out
        return F.normalize(pooled.float(), dim=-1)

    @torch.inference_mode()
    def encode_images(self, pixels: torch.Tensor) -> ImageFeatures:
        """Pixels (B, 3, H, W) -> :class:`ImageFeatures`, from one forward pass of the tower."""
        if self._last_attn is None:
            raise NotImplementedError(
                f"{self.name}: patch tokens and CLS attention need an open_clip ViT with a CLS token; "
                "this tower pools differently (use encode_image_embeds)"
            )
        visual = self.model.visual
        self.images_encoded += pixels.shape[0]
        captured: dict[str, torch.Tensor] = {}
        handles = _capture_attention(self._last_attn, captured)
        visual.output_tokens = True  # this one pass returns (pooled, tokens) as well
        try:
            pooled, tokens = visual(pixels.to(self.device, self._dtype()))  # (B, D), (B, N_p, W)
        finally:
            visual.output_tokens = False
            for handle in handles:
                handle.remove()
        patches = tokens @ visual.proj if visual.proj is not None else tokens  # (B, N_p, D)
        token_embeds = torch.cat([pooled.unsqueeze(1), patches], dim=1).float()  # (B, 1 + N_p, D)
        return ImageFeatures(
            image_embeds=F.normalize(pooled.float(), dim=-1),
            token_embeds=token_embeds,
            attention=captured["weights"].float(),  # (B, H, T, T)
            grid_size=self.grid_size,
            num_prefix_tokens=1,
        )

    def _dtype(self) -> torch.dtype:
        return next(self.model.visual.parameters()).dtype


def _last_block_attention(visual: nn.Module) -> nn.MultiheadAttention | None:
    """The last block's attention module, for CLS-token ViTs built by open_clip; None otherwise."""
    from open_clip.transformer import VisionTransformer

    if not isinstance(visual, VisionTransformer) or visual.pool_type != "tok" or visual.attn_pool is not None:
        return None
    attn = visual.transformer.resblocks[-1].attn
    return attn if isinstance(attn, nn.MultiheadAttention) else None


def _capture_attention(attn: nn.MultiheadAttention, sink: dict[str, torch.Tensor]) -> list[Any]:
    """Hooks that make ``attn`` return per-head weights for one call and store them in ``sink``."""

    def ask_for_weights(module, args, kwargs):
        return args, {**kwargs, "need_weights": True, "average_attn_weights": False}

    def keep_weights(module, args, kwargs, output):
        sink["weights"] = output[1]  # (B, H, T, T)

    return [
        attn.register_forward_pre_hook(ask_for_weights, with_kwargs=True),
        attn.register_forward_hook(keep_weights, with_kwargs=True),
    ]


def encoder_name(config: EncoderConfig) -> str:
    """A stable name for the embedding space: ``MODEL/TAG`` for published weights, ``MODEL`` for local ones.

    Datastores record it so queries from another model are refused; local file paths are
    left out because a bundle's location changes from machine to machine.
    """
    published = config.pretrained and (_is_pretrained_tag(config) or WeightSource.parse(config.pretrained).on_hub)
    return f"{config.model_name}/{config.pretrained}" if published else config.model_name


def load_encoder(spec: EncoderConfig | dict[str, Any], *, device: str | torch.device = "cpu") -> ClipEncoder:
    """The one entry point: an EncoderConfig (or its dict form from a bundle) -> ClipEncoder."""
    config = spec if isinstance(spec, EncoderConfig) else EncoderConfig.from_dict(spec)
    return ClipEncoder.from_config(config, device=device)


def parse_encoder_spec(text: str) -> EncoderConfig:
    """The ``--encoder`` argument of every command, in one of three forms.

    - a bundle folder (``weights/shapes``): the encoder that bundle serves, weights located inside it;
    - a JSON file holding an :class:`EncoderConfig`;
    - ``MODEL[/PRETRAINED]``: ``ViT-B-32/openai``, ``ViT-B-32/hf-hub:org/repo@rev``, ``ViT-B-32/./w.safetensors``.
    """
    from capdemo.bundle import MANIFEST, Bundle

    path = Path(text)
    if (path / MANIFEST).is_file():
        bundle = Bundle.load(path)
        config = EncoderConfig.from_dict(bundle.component(ENCODER_COMPONENT))
        return config.replace(pretrained=bundle.locate(config.pretrained))
    if path.suffix == ".json" and path.is_file():
        return EncoderConfig.load_json(path)
    name, _, pretrained = text.partition("/")
    return EncoderConfig(model_name=name, pretrained=pretrained or None)


ENCODER_COMPONENT = "encoder"
BUNDLED_WEIGHTS = f"{ENCODER_COMPONENT}/{OPEN_CLIP_WEIGHTS_FILE}"


def add_encoder_to_bundle(writer: Any, encoder: ClipEncoder, config: EncoderConfig, *, copy_weights: bool) -> None:
    """Record the encoder in a bundle: by reference (hub tag/id) or with its weights copied in."""
    if copy_weights:
        state = encoder.model.state_dict()
        if all(not t.is_floating_point() or torch.equal(t, t.half().to(t.dtype)) for t in state.values()):
            state = {k: t.half() if t.is_floating_point() else t for k, t in state.items()}  # lossless: half the bytes
        writer.add_tensors(BUNDLED_WEIGHTS, state)
        config = config.replace(pretrained=f"bundle:{BUNDLED_WEIGHTS}", revision=None)
    writer.add_component(ENCODER_COMPONENT, config.to_dict())


def encoder_from_bundle(bundle: Any, *, device: str | torch.device = "cpu") -> ClipEncoder:
    """Rebuild the bundle's CLIP exactly from its stored config."""
    config = EncoderConfig.from_dict(bundle.component(ENCODER_COMPONENT))
    return ClipEncoder.from_config(config.replace(pretrained=bundle.locate(config.pretrained)), device=device)
