"""The one object the app and the CLI talk to: a bundle loaded once, both methods, VQA, analysis.

``Captioner`` owns the models and an LRU cache of vision-tower outputs keyed by
image content, so captioning, question answering and the embedding plots of
the same image share one encoder pass. It holds no UI code; its methods take
PIL images (or an ``Encoded`` batch) and return plain results.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from capdemo.bundle import Bundle
from capdemo.encoders import ClipEncoder, ImageFeatures, encoder_from_bundle, load_encoder
from capdemo.options import CaptionOptions, check_method, clean_question
from capdemo.result import Result

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_WEIGHTS = Path(os.environ.get("CAPDEMO_WEIGHTS") or REPO_ROOT / "weights" / "shapes")
EXAMPLES_DIR = "examples"  # bundle folder of example images
ENCODE_CACHE_SIZE = 64  # images whose vision-tower output is kept
CORPUS_SAMPLE = 300  # datastore captions embedded for the embedding-space plot


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def image_key(image: Image.Image) -> str:
    """Content hash of a decoded image (mode, size and pixels): equal pictures share cached features."""
    digest = hashlib.blake2b(digest_size=16)
    digest.update(f"{image.mode}{image.size}".encode())
    digest.update(image.tobytes())
    return digest.hexdigest()


@dataclass
class Encoded:
    """A batch of images after the vision tower: what every method and plot starts from."""

    keys: list[str]  # content hash per image
    features: ImageFeatures  # batch B, on the encoder's device
    # (B, D_r) L2-normalised embeddings from TOMCap's own retrieval encoder, when the bundle has one
    queries: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.keys)


@dataclass(frozen=True)
class _Cached:
    """One image's tower outputs, as the encode cache keeps them."""

    features: ImageFeatures  # batch 1
    query: torch.Tensor | None  # (1, D_r) from the retrieval encoder, or None


@dataclass
class EmbeddingView:
    """Everything the embedding-space plot and the gap table need, as numpy arrays."""

    points: dict[str, np.ndarray]  # kind -> (n, D) L2-normalised embeddings
    gap: dict[str, np.ndarray] = field(default_factory=dict)  # mu_image, mu_text, sigma_image, sigma_text (D,)
    table: dict[str, float] = field(default_factory=dict)  # Table-1 cosines, gap norm, std-ratio summary


class Captioner:
    """A loaded bundle: encoder, MacCap and/or TOMCap, datastore, gap statistics, VQA answers."""

    def __init__(self, bundle: Bundle, encoder: ClipEncoder, *, maccap=None, tomcap=None, datastore=None,
                 gap_stats=None, answers=None, retriever: ClipEncoder | None = None):
        self.bundle = bundle
        self.encoder = encoder
        self.retriever = retriever  # TOMCap's separate retrieval encoder (the paper's SigLIP2), when it has one
        self.maccap, self.tomcap = maccap, tomcap
        self.datastore, self.gap_stats, self.answers = datastore, gap_stats, answers
        self._cache: OrderedDict[str, _Cached] = OrderedDict()
        self._lock = threading.Lock()
        self._corpus: tuple[list[str], torch.Tensor] | None = None

    @classmethod
    def from_bundle(cls, spec: str | os.PathLike, *, device: str | None = None) -> "Captioner":
        """Load and verify the bundle at ``spec`` and every component it has, once."""
        from capdemo import maccap as maccap_module
        from capdemo import tomcap as tomcap_module
        from capdemo.gap import GapStats
        from capdemo.vqa import VQA_COMPONENT, AnswerList

        device = device or default_device()
        bundle = Bundle.load(spec)
        encoder = encoder_from_bundle(bundle, device=device)
        parts: dict[str, Any] = {}
        if bundle.has(maccap_module.MACCAP_COMPONENT):
            parts["maccap"] = maccap_module.load_from_bundle(bundle, device=device)
        if bundle.has(tomcap_module.TOMCAP_COMPONENT):
            parts["tomcap"] = tomcap_module.load_from_bundle(bundle, device=device)
            parts["datastore"] = tomcap_module.datastore_from_bundle(bundle)
            if parts["tomcap"].config.retrieval_encoder is not None:
                parts["retriever"] = load_encoder(parts["tomcap"].config.retrieval_encoder, device=device)
            # the datastore must live in the space of whichever encoder makes the queries (checked once, here)
            if parts["datastore"] is not None:
                parts["datastore"].require_encoder(parts.get("retriever", encoder).name)
            gap_spec = parts["tomcap"].config.gap_stats
            if gap_spec:
                parts["gap_stats"] = GapStats.load(bundle.locate(gap_spec))
        if bundle.has(VQA_COMPONENT):
            parts["answers"] = AnswerList.from_bundle(bundle)
        return cls(bundle, encoder, **parts)

    @property
    def methods(self) -> tuple[str, ...]:
        return tuple(name for name in ("maccap", "tomcap") if getattr(self, name) is not None)

    # ------------------------------------------------------------------ encoding (cached)

    def encode(self, images: Sequence[Image.Image] | Encoded) -> Encoded:
        """One vision-tower pass (and one retrieval-encoder pass, when TOMCap has its own) for the
        images not already cached; cached ones are reused. Any number of images."""
        if isinstance(images, Encoded):
            return images
        keys = [image_key(image) for image in images]
        with self._lock:  # (an entry cached before a retrieval encoder was attached lacks its query)
            entries = {key: self._cache[key] for key in keys
                       if key in self._cache and (self.retriever is None or self._cache[key].query is not None)}
        first_index = {key: i for i, key in reversed(list(enumerate(keys)))}
        todo = [key for key in first_index if key not in entries]  # distinct new images, in batch order
        if todo:
            picked = [images[first_index[key]] for key in todo]
            fresh = self.encoder.encode_images(self.encoder.preprocess(picked))
            queries = None
            if self.retriever is not None:  # TOMCap's datastore lives in another model's space
                queries = self.retriever.encode_image_embeds(self.retriever.preprocess(picked))  # (n, D_r)
            for j, key in enumerate(todo):
                entries[key] = _Cached(fresh.select([j]), None if queries is None else queries[j : j + 1])
        with self._lock:
            for key in keys:
                self._cache[key] = entries[key]
                self._cache.move_to_end(key)
            while len(self._cache) > ENCODE_CACHE_SIZE:
                self._cache.popitem(last=False)
        cached = [entries[key] for key in keys]
        queries = torch.cat([entry.query for entry in cached]) if self.retriever is not None else None
        return Encoded(keys=keys, features=_concat([entry.features for entry in cached]), queries=queries)

    # ------------------------------------------------------------------ methods

    def caption(self, images: Sequence[Image.Image] | Encoded, method: str, options: CaptionOptions) -> list[Result]:
        """Caption a batch with one method; the options' ``None`` fields take the bundle's defaults."""
        check_method(method)
        options = options.validated()
        model = getattr(self, method)
        if model is None:
            raise ValueError(f"this bundle has no {method} model (it has: {', '.join(self.methods) or 'none'})")
        encoded = self.encode(images)
        if len(encoded) == 0:
            raise ValueError("no images to caption")
        queries = encoded.queries if method == "tomcap" else None
        if queries is None and method == "tomcap" and self.retriever is not None:
            raise ValueError("this Encoded batch was made without the bundle's retrieval encoder; pass the images")
        return self._caption_degrading(model, method, encoded.features, options, queries)

    def _caption_degrading(self, model, method: str, features: ImageFeatures, options: CaptionOptions,
                           queries: torch.Tensor | None = None) -> list[Result]:
        """Caption a batch; when it does not fit in memory, caption its halves instead (recursively)."""
        try:
            return self._caption_batch(model, method, features, options, queries)
        except torch.OutOfMemoryError:
            batch = features.image_embeds.shape[0]
            if batch == 1:
                raise
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            half = batch // 2
            log.warning("out of memory captioning %d images; retrying as %d + %d", batch, half, batch - half)
            halves = (slice(0, half), slice(half, batch))
            return [result for part in halves for result in self._caption_degrading(
                model, method, features.select(part), options, None if queries is None else queries[part])]

    def _caption_batch(self, model, method: str, features: ImageFeatures, options: CaptionOptions,
                       queries: torch.Tensor | None) -> list[Result]:
        with torch.inference_mode():
            if method == "maccap":
                from capdemo.maccap_pipeline import caption_images

                return caption_images(
                    model, self.encoder, features, samples=options.samples, beams=options.beams,
                    noise_variance=options.noise_variance, n_cr=options.n_cr, max_new_tokens=options.max_new_tokens,
                    seed=options.seed,
                )
            from capdemo.tomcap import caption_images

            return caption_images(
                model, self.encoder, self.datastore, features.image_embeds, query_embeds=queries, k=options.k,
                beams=options.beams, max_new_tokens=options.max_new_tokens,
            )

    def answer(self, image: Image.Image | Encoded, question: str, *, top_k: int = 10, caption: str | None = None):
        """Zero-shot VQA with MacCap (the paper's pipeline): caption, prompt the LM, match the answer list."""
        from capdemo.vqa import answer_question

        question = clean_question(question)
        if self.maccap is None or self.answers is None:
            raise ValueError("this bundle cannot answer questions (it needs a maccap model and a VQA answer list)")
        if not 1 <= top_k <= 50:
            raise ValueError(f"top_k must be between 1 and 50, got {top_k}")
        encoded = self.encode([image] if isinstance(image, Image.Image) else image)
        if len(encoded) != 1:
            raise ValueError(f"answer takes one image, got {len(encoded)}")
        with torch.inference_mode():
            return answer_question(self.maccap, self.encoder, encoded.features, question, self.answers,
                                   top_k=top_k, caption=caption)

    # ------------------------------------------------------------------ analysis

    def corpus_sample(self) -> tuple[list[str], torch.Tensor]:
        """A fixed sample of datastore captions with their CLIP text embeddings (computed once)."""
        if self._corpus is None:
            if self.datastore is None or len(self.datastore) == 0:
                self._corpus = ([], torch.zeros(0, self.encoder.embed_dim))
            else:
                count = min(CORPUS_SAMPLE, len(self.datastore))
                ids = np.random.default_rng(0).choice(len(self.datastore), size=count, replace=False)
                texts = [self.datastore.captions[int(i)] for i in sorted(ids)]
                self._corpus = (texts, self.encoder.encode_text(texts).cpu())
        return self._corpus

    def embedding_view(self, image: Image.Image | Encoded, results: dict[str, Result]) -> EmbeddingView:
        """Image, patches, regions, candidates, neighbours, a corpus sample and its gap-corrected copy."""
        encoded = self.encode([image] if isinstance(image, Image.Image) else image)
        features = encoded.features.select([0])
        points: dict[str, np.ndarray] = {
            "image": features.image_embeds.cpu().numpy(),
            "patches": F.normalize(features.patch_embeds[0], dim=-1).cpu().numpy(),
        }
        for method, result in results.items():
            for kind, tensor in result.embeddings.items():
                if kind not in ("image", "patches") and tensor.numel():
                    points[f"{method} {kind}"] = tensor.numpy()
        _, corpus = self.corpus_sample()
        if corpus.numel():
            points["corpus"] = corpus.numpy()
        gap, table = {}, {}
        if self.gap_stats is not None:
            stats = self.gap_stats
            gap = {"mu_image": stats.mu_image.numpy(), "mu_text": stats.mu_text.numpy(),
                   "sigma_image": stats.sigma_image.numpy(), "sigma_text": stats.sigma_text.numpy()}
            if corpus.numel():
                points["corpus corrected"] = F.normalize(stats.correct(corpus, "mean_std"), dim=-1).numpy()
            ratio = (stats.sigma_image / stats.sigma_text.clamp_min(1e-8)).numpy()
            table.update({"gap norm ||mu_I - mu_T||": float((stats.mu_image - stats.mu_text).norm()),
                          "std ratio min": float(ratio.min()), "std ratio median": float(np.median(ratio)),
                          "std ratio max": float(ratio.max())})
        table.update(_table_one(features, results))
        return EmbeddingView(points=points, gap=gap, table=table)

    # ------------------------------------------------------------------ bundle facts

    def examples(self) -> list[Path]:
        files = self.bundle.manifest.get("files", {})
        return [self.bundle.path / rel for rel in sorted(files) if rel.startswith(EXAMPLES_DIR + "/")
                and rel.rsplit(".", 1)[-1].lower() in ("png", "jpg", "jpeg")]

    def info(self) -> dict[str, Any]:
        manifest = self.bundle.manifest
        return {
            "name": self.bundle.name,
            "path": str(self.bundle.path),
            "description": manifest.get("description", ""),
            "world": manifest.get("world", "real"),
            "methods": list(self.methods),
            "components": manifest.get("components", {}),
            "training": manifest.get("training", {}),
            "files": {rel: entry["sha256"][:12] for rel, entry in manifest.get("files", {}).items()},
            "device": str(self.encoder.device),
        }


def _concat(parts: list[ImageFeatures]) -> ImageFeatures:
    return parts[0] if len(parts) == 1 else ImageFeatures.cat(parts)


def _table_one(features: ImageFeatures, results: dict[str, Result]) -> dict[str, float]:
    """MacCap's Table 1 for this image: cosine of the best caption with the global vs subregion-mixed embedding."""
    maccap = results.get("maccap")
    if maccap is None or "region" not in maccap.embeddings or not maccap.embeddings["candidates"].numel():
        return {}
    caption = maccap.embeddings["candidates"][0]  # (D,) best candidate's text embedding
    regions = maccap.embeddings["region"]  # (N_cr, D) normalised I_s + I_c
    region_cos = regions @ caption
    return {
        "cos(caption, global image)": float(features.image_embeds[0].cpu() @ caption),
        "cos(caption, region mix) mean": float(region_cos.mean()),
        "cos(caption, region mix) max": float(region_cos.max()),
    }
