"""CLIP through open_clip: global embeddings, projected patch tokens and the pooling attention in one pass.

MacCap needs three things from the image tower that ``encode_image`` does not
return: the last-layer tokens projected into the joint space (I'_p, paper eq. 10),
and the last block's attention (the pooling query's row picks the informative
patches, the picked rows aggregate them; eq. 12). :class:`ClipEncoder` gets all
of them from a single forward pass of one of two kinds of tower:

* open_clip's own ViT, pooled by its CLS token: the tower is switched to return
  its tokens, and a hook on the last block's ``nn.MultiheadAttention`` asks it for
  per-head weights; the CLS row of those weights is the pooling attention. A ViT
  that keeps its CLS token but pools by averaging the patch tokens (open_clip's
  ``pool_type="avg"``, e.g. the shapes world's tiny CLIP) is read the same way:
  the CLS row still says which patches the CLS token attends to.
* a timm ViT pooled by a MAP head (``AttentionPoolLatent``, e.g. open_clip's
  SigLIP2 configs): hooks keep the trunk's final-norm tokens, the last block's
  self-attention and the MAP latent query's attention over the tokens (the
  analogue of the CLS row), and the tokens are mapped into the joint space through
  the pool's value path (:func:`map_tokens_through_pool`).

Other towers (ResNets, timm towers pooled otherwise) give global image/text
embeddings only; asking them for tokens is a clear error.
"""

from __future__ import annotations

import json
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from capdemo.config import Config
from capdemo.features import ImageFeatures
from capdemo.map_pool import map_pool_tower, map_tokens_through_pool
from capdemo.weights import WeightSource, check_not_pickle, resolve

OPEN_CLIP_WEIGHTS_FILE = "open_clip_model.safetensors"
# Hub commits that open_clip's pretrained tags are pinned to (open_clip itself always downloads the repo's
# main branch). Keyed by the tag's hub repo, so every tag stored there shares the pin.
PRETRAINED_HUB_REVISIONS = {
    "timm/vit_base_patch32_clip_224.openai": "a6f597a30f7b82c51704746581f9a4e41421e878",  # ViT-B-32/openai
    "timm/ViT-B-16-SigLIP2": "eee10eff6dd8cabae2d7f379d4e8cfcd352030aa",  # ViT-B-16-SigLIP2/webli
}


@dataclass
class EncoderConfig(Config):
    """Which CLIP to run and where its weights come from."""

    model_name: str = "ViT-B-32"  # open_clip architecture name (or the name of `model_config` below)
    # Weights: an open_clip pretrained tag ("openai"), "hf-hub:org/repo@rev", a local .safetensors
    # file or folder holding open_clip_model.safetensors, or None for random initialisation.
    pretrained: str | None = "openai"
    # hub revision used with a pretrained tag; None: the pin in PRETRAINED_HUB_REVISIONS, else the hub's main
    revision: str | None = None
    # An open_clip architecture JSON (embed_dim, vision_cfg, text_cfg) registered under `model_name`
    # at load time, for custom towers such as the shapes world's tiny CLIP. None: a built-in config.
    model_config: dict[str, Any] | None = None
    quick_gelu: bool | None = None  # None: take it from the pretrained tag's config (OpenAI weights use QuickGELU)


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


def _tag_hub_source(config: EncoderConfig) -> tuple[str, str | None, dict[str, Any]]:
    """(hub repo, revision, open_clip's tag config) of a pretrained tag; the revision is the config's own,
    else the pin in PRETRAINED_HUB_REVISIONS, else None (the hub's main)."""
    import open_clip

    tag_cfg = open_clip.get_pretrained_cfg(config.model_name, config.pretrained)
    hub_id = tag_cfg["hf_hub"].strip("/")
    return hub_id, config.revision or PRETRAINED_HUB_REVISIONS.get(hub_id), tag_cfg


def create_clip(config: EncoderConfig, *, device: str | torch.device = "cpu") -> tuple[nn.Module, Any, Any]:
    """Build (model, preprocess, tokenizer) for ``config``; weights always load from a local safetensors file."""
    import open_clip

    if config.model_config is not None:
        register_model_config(config.model_name, config.model_config)
    what = f"CLIP encoder {config.model_name}"
    kwargs: dict[str, Any] = {}
    weights: Path | None = None
    if _is_pretrained_tag(config):
        hub_id, revision, tag_cfg = _tag_hub_source(config)
        spec = f"hf-hub:{hub_id}" + (f"@{revision}" if revision else "")
        weights = resolve(spec, what=f"{what} ({config.pretrained})", filename=OPEN_CLIP_WEIGHTS_FILE)
        # the tag's whole preprocessing (SigLIP2 squashes the image instead of centre-cropping it)
        kwargs.update(image_mean=tag_cfg.get("mean"), image_std=tag_cfg.get("std"),
                      image_interpolation=tag_cfg.get("interpolation"), image_resize_mode=tag_cfg.get("resize_mode"))
        quick_gelu = tag_cfg.get("quick_gelu", False) if config.quick_gelu is None else config.quick_gelu
        kwargs["force_quick_gelu"] = quick_gelu
    elif config.pretrained:
        weights = _local_weights_file(config.pretrained, what)
        kwargs["force_quick_gelu"] = bool(config.quick_gelu)
    elif config.quick_gelu:
        kwargs["force_quick_gelu"] = True
    model, _, preprocess = open_clip.create_model_and_transforms(
        config.model_name, pretrained=str(weights) if weights else None, device=device, **kwargs
    )
    model.eval().requires_grad_(False)
    return model, preprocess, _tokenizer(config.model_name)


TOKENIZER_PATTERNS = ("*.json", "*.model", "*.txt")  # the files a transformers tokenizer loads from


def _tokenizer(model_name: str) -> Any:
    """open_clip's tokenizer for ``model_name``; one backed by a transformers tokenizer on the hub
    (SigLIP2's) loads from the commit pinned in PRETRAINED_HUB_REVISIONS, which open_clip cannot ask for."""
    import open_clip
    from open_clip.tokenizer import DEFAULT_CONTEXT_LENGTH, HFTokenizer

    text_cfg = (open_clip.get_model_config(model_name) or {}).get("text_cfg", {})
    repo = text_cfg.get("hf_tokenizer_name")
    revision = PRETRAINED_HUB_REVISIONS.get(repo) if repo else None
    if revision is None:
        return open_clip.get_tokenizer(model_name)
    folder = resolve(f"hf-hub:{repo}@{revision}", what=f"tokenizer of {model_name}", patterns=TOKENIZER_PATTERNS)
    return HFTokenizer(str(folder), context_length=text_cfg.get("context_length", DEFAULT_CONTEXT_LENGTH),
                       tokenizer_mode=text_cfg.get("tokenizer_mode"), **text_cfg.get("tokenizer_kwargs", {}))


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
        self._map_tower = map_pool_tower(visual) if self._last_attn is None else None
        self.images_encoded = 0  # vision-tower passes, counted per image (the app promises one per image)
        self._hooked_pass = threading.Lock()  # see encode_images

    @property
    def center_crops(self) -> bool:
        """Whether preprocessing centre-crops (the patch grid covers the centre square) rather than squashing
        the whole image onto the grid; read from the transform itself."""
        from torchvision.transforms import CenterCrop

        return any(isinstance(step, CenterCrop) for step in getattr(self.transform, "transforms", []))

    @classmethod
    def from_config(cls, config: EncoderConfig, *, device: str | torch.device = "cpu") -> ClipEncoder:
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
        return self._last_attn is not None or self._map_tower is not None

    @property
    def grid_size(self) -> tuple[int, int]:
        if self._map_tower is not None:
            return tuple(self._map_tower.trunk.patch_embed.grid_size)  # type: ignore[return-value]
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
        """Pixels (B, 3, H, W) -> :class:`ImageFeatures`, from one forward pass of the tower.

        The pass hooks the tower (and toggles its token output), which is state shared by every
        caller, so concurrent calls (an app serving several requests at once) take turns.
        """
        with self._hooked_pass:
            if self._map_tower is not None:
                return self._encode_images_map(pixels)
            return self._encode_images_cls(pixels)

    def _encode_images_cls(self, pixels: torch.Tensor) -> ImageFeatures:
        """:meth:`encode_images` for an open_clip ViT pooled by its CLS token or by the patch mean: hooks on one
        pass."""
        if self._last_attn is None:
            raise NotImplementedError(
                f"{self.name}: patch tokens and the pooling attention need an open_clip ViT with a CLS token "
                "or a timm ViT with a MAP head; this tower pools differently (use encode_image_embeds)"
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
        pooled = pooled.float()  # (B, D)
        patches = tokens @ visual.proj if visual.proj is not None else tokens  # (B, N_p, D)
        token_embeds = torch.cat([pooled.unsqueeze(1), patches.float()], dim=1)  # (B, 1 + N_p, D)
        attention = captured["weights"].float()  # (B, H, T, T)
        # Pooled by the patch mean, the global embedding is the mean of the patch tokens, so the attention that
        # formed it is the mean of their attention rows; the CLS token's own row feeds nothing the tower outputs
        by_mean = visual.pool_type == "avg"
        pool_attention = attention[:, :, 1:, :].mean(dim=2) if by_mean else None  # (B, H, T)
        return ImageFeatures(
            image_embeds=F.normalize(pooled, dim=-1),
            token_embeds=token_embeds,
            attention=attention,
            grid_size=self.grid_size,
            num_prefix_tokens=1,
            pool_attention=pool_attention,
            pooled_embeds=pooled if by_mean else None,  # token 0 as well: the pooled output
        )

    def _encode_images_map(self, pixels: torch.Tensor) -> ImageFeatures:
        """:meth:`encode_images` for a timm ViT with a MAP head: hooks on one pass of the tower."""
        tower = self._map_tower
        assert tower is not None
        self.images_encoded += pixels.shape[0]
        captured: dict[str, torch.Tensor] = {}
        handles = tower.capture(captured)
        try:
            pooled = self.model.visual(pixels.to(self.device, self._dtype()))  # (B, D)
        finally:
            for handle in handles:
                handle.remove()
        tokens = captured["tokens"]  # (B, T, W) the trunk's final-norm tokens, prefix tokens first
        prefix, num_tokens = tower.trunk.num_prefix_tokens, tokens.shape[1]
        rows, cols = self.grid_size
        if num_tokens - prefix != rows * cols:
            raise RuntimeError(f"{self.name}: {num_tokens - prefix} patch tokens do not fill the {rows}x{cols} grid")
        pool_attention = captured["pool_attention"]  # (B, H_p, N_in) over the tokens the pool saw
        if pool_attention.shape[-1] == num_tokens - prefix and prefix:  # the pool left the prefix tokens out
            pool_attention = F.pad(pool_attention, (prefix, 0))  # they get no pooling attention
        if pool_attention.shape[-1] != num_tokens:
            raise RuntimeError(f"{self.name}: the MAP head saw {pool_attention.shape[-1]} of {num_tokens} tokens")
        return ImageFeatures(
            image_embeds=F.normalize(pooled.float(), dim=-1),
            token_embeds=map_tokens_through_pool(self.model.visual, tokens).float(),  # (B, T, D)
            attention=captured["attention"],  # (B, H, T, T) float32
            grid_size=(rows, cols),
            num_prefix_tokens=prefix,
            pool_attention=pool_attention,  # (B, H_p, T) float32
            pooled_embeds=pooled.float(),
        )

    def _dtype(self) -> torch.dtype:
        return next(self.model.visual.parameters()).dtype


def _last_block_attention(visual: nn.Module) -> nn.MultiheadAttention | None:
    """The last block's attention module, for open_clip ViTs with a CLS token pooled by it or by the patch mean;
    None otherwise."""
    from open_clip.transformer import VisionTransformer

    if not isinstance(visual, VisionTransformer) or visual.attn_pool is not None:
        return None
    if visual.pool_type not in ("tok", "avg"):  # "none": no pooling to explain
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
    - a JSON file holding an :class:`EncoderConfig`, or a folder holding one as ``encoder.json`` (any other
      folder is an error, not a model name that then fails to load);
    - ``MODEL[/PRETRAINED]``: ``ViT-B-32/openai``, ``ViT-B-32/hf-hub:org/repo@rev``, ``ViT-B-32/./w.safetensors``.
    """
    from capdemo.bundle import MANIFEST, Bundle

    path = Path(text)
    if (path / MANIFEST).is_file():
        bundle = Bundle.load(path)
        config = EncoderConfig.from_dict(bundle.component(ENCODER_COMPONENT))
        return config.replace(pretrained=bundle.locate(config.pretrained))
    if (path / ENCODER_CONFIG_FILE).is_file():
        path = path / ENCODER_CONFIG_FILE
    elif path.is_dir():
        raise ValueError(f"encoder {text}: a folder, but neither a bundle ({MANIFEST}) nor an encoder folder "
                         f"({ENCODER_CONFIG_FILE})")
    if path.suffix == ".json" and path.is_file():
        return EncoderConfig.load_json(path)
    name, _, pretrained = text.partition("/")
    return EncoderConfig(model_name=name, pretrained=pretrained or None)


ENCODER_COMPONENT = "encoder"
ENCODER_CONFIG_FILE = "encoder.json"  # an EncoderConfig saved in a folder (the shapes build's CLIP stage)
BUNDLED_WEIGHTS = f"{ENCODER_COMPONENT}/{OPEN_CLIP_WEIGHTS_FILE}"


def add_encoder_to_bundle(writer: Any, encoder: ClipEncoder, config: EncoderConfig, *, copy_weights: bool) -> None:
    """Record the encoder in a bundle: by reference (hub tag/id) or with its weights copied in."""
    if copy_weights:
        state = encoder.model.state_dict()
        if all(not t.is_floating_point() or torch.equal(t, t.half().to(t.dtype)) for t in state.values()):
            state = {k: t.half() if t.is_floating_point() else t for k, t in state.items()}  # lossless: half the bytes
        writer.add_tensors(BUNDLED_WEIGHTS, state)
        config = config.replace(pretrained=f"bundle:{BUNDLED_WEIGHTS}", revision=None)
    elif _is_pretrained_tag(config):
        config = config.replace(revision=_tag_hub_source(config)[1])  # the commit it loads, recorded with it
    writer.add_component(ENCODER_COMPONENT, config.to_dict())


def encoder_from_bundle(bundle: Any, *, device: str | torch.device = "cpu") -> ClipEncoder:
    """Rebuild the bundle's CLIP exactly from its stored config."""
    config = EncoderConfig.from_dict(bundle.component(ENCODER_COMPONENT))
    return ClipEncoder.from_config(config.replace(pretrained=bundle.locate(config.pretrained)), device=device)
