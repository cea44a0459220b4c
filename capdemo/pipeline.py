"""The one object the app, the CLI and scripts talk to: a bundle loaded once, its methods, VQA, analysis.

``Captioner`` owns the image towers, every captioning method the bundle has (chosen through the
registry in :mod:`capdemo.methods`) and an LRU cache of tower outputs keyed by image content, so
captioning, question answering and the embedding plots of the same image share one encoder
pass. The vision tower runs, and is timed, here and only here; each method starts from the
:class:`~capdemo.methods.base.Encoded` batch.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image

from capdemo import methods as registry
from capdemo.bundle import Bundle
from capdemo.encoders import encoder_from_bundle
from capdemo.features import ImageFeatures
from capdemo.images import load_image
from capdemo.methods.base import CaptionMethod, Encoded, LoadContext, MethodOptions, Towers
from capdemo.inputs import MAX_QUESTION_CHARS, clean_question
from capdemo.precision import DEFAULT_PRECISION, PrecisionReport, apply_precision, bf16_is_native, check_precision
from capdemo.result import Result
from capdemo.timing import StageTimer

log = logging.getLogger(__name__)

EXAMPLES_DIR = "examples"  # bundle folder of example images
EXAMPLE_SUFFIXES = ("png", "jpg", "jpeg")
ENCODE_CACHE_SIZE = 64  # images whose tower outputs are kept
CORPUS_SAMPLE = 300  # datastore captions embedded for the embedding-space plot
MAX_TOP_K = 50  # most candidate answers a VQA request may list

ImageInput = Image.Image | str | os.PathLike


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def image_key(image: Image.Image) -> str:
    """Content hash of a decoded image (mode, size and pixels): equal pictures share cached features."""
    digest = hashlib.blake2b(digest_size=16)
    digest.update(f"{image.mode}{image.size}".encode())
    digest.update(image.tobytes())
    return digest.hexdigest()


@dataclass(frozen=True)
class _Cached:
    """One image's tower outputs, as the encode cache keeps them."""

    features: ImageFeatures  # batch 1
    tower_embeds: dict[str, torch.Tensor]  # encoder name -> (1, D_t)
    encode_ms: float  # this image's share of the pass that encoded it


class Captioner:
    """A loaded bundle: its image towers, every captioning method it has, and VQA when it has an answer list."""

    def __init__(self, bundle: Bundle, towers: Towers, methods: dict[str, CaptionMethod], *, answers=None,
                 answer_lm=None, precision: str = DEFAULT_PRECISION,
                 precision_reports: dict[str, PrecisionReport] | None = None):
        self.bundle = bundle
        self.towers = towers
        self.methods = methods  # registry name -> loaded method: the bundle's default first, then registry order
        self.answers = answers
        self.answer_lm = answer_lm  # capdemo.vqa.AnswerLM: the LM that answers questions (None: no VQA)
        self.precision = precision  # the arithmetic every model serves at (capdemo.precision)
        self.precision_reports = precision_reports or {}  # model name -> what the conversion changed
        self._cache: OrderedDict[str, _Cached] = OrderedDict()
        self._lock = threading.Lock()
        self._corpus: tuple[list[str], torch.Tensor] | None = None

    @classmethod
    def from_bundle(cls, spec: str | os.PathLike, *, device: str | None = None,
                    precision: str | None = None) -> Captioner:
        """Load and verify the bundle at ``spec`` (folder or ``hf-hub:org/name@rev``) and every method it has,
        then convert every model to the serving ``precision`` (None: the bundle's recommendation on a CPU,
        else fp32; see :func:`serving_precision`)."""
        from capdemo.vqa import VQA_CAPTION_METHOD_KEY, VQA_COMPONENT, AnswerList

        device = device or default_device()
        bundle = Bundle.load(spec)
        precision = serving_precision(bundle, device, precision)
        towers = Towers(encoder_from_bundle(bundle, device=device), device=device)
        context = LoadContext(bundle=bundle, towers=towers, device=device)
        loaded = {method.name: method.from_bundle(context) for method in registry.methods() if bundle.has(method.name)}
        loaded = lead_with(bundle.manifest.get(DEFAULT_METHOD_KEY), loaded)
        answers = AnswerList.from_bundle(bundle) if bundle.has(VQA_COMPONENT) else None
        if answers is not None:
            check_method_named(bundle.component(VQA_COMPONENT).get(VQA_CAPTION_METHOD_KEY), loaded,
                               where=f"the {VQA_COMPONENT} component's {VQA_CAPTION_METHOD_KEY}")
        answer_lm = answering_lm(bundle, loaded.values(), device=device) if answers is not None else None
        served = {**{f"encoder:{e.name}": e for e in towers.encoders()},
                  **{f"{name}:{i}" if i else name: module
                     for name, method in loaded.items() for i, module in enumerate(method.modules())}}
        own_lms = [lm.lm for lm in (m.answer_lm() for m in loaded.values()) if lm is not None]
        if answer_lm is not None and not any(answer_lm.lm is lm for lm in own_lms):
            served["vqa:lm"] = answer_lm.lm  # the frozen LM the bundle names for VQA
        reports = {name: apply_precision(module, precision) for name, module in served.items()}
        return cls(bundle, towers, loaded, answers=answers, answer_lm=answer_lm, precision=precision,
                   precision_reports=reports)

    @property
    def encoder(self):
        """The captioning CLIP (every method's image embeddings and reranks come from it)."""
        return self.towers.main

    @property
    def method_names(self) -> tuple[str, ...]:
        return tuple(self.methods)

    def method(self, name: str) -> CaptionMethod:
        """The loaded method ``name``; unknown or absent from this bundle: a one-line ValueError."""
        registry.get(name)
        if name not in self.methods:
            have = ", ".join(m.label for m in self.methods.values()) or "none"
            raise ValueError(f"this bundle has no {registry.get(name).label} model (it has: {have})")
        return self.methods[name]

    def retrieval_encoders(self) -> list[Any]:
        """The distinct encoders the retrieving methods' datastores were embedded with (a visitor's own captions are
        embedded with each)."""
        found = {e.name: e for e in (m.retrieval_encoder() for m in self.methods.values()) if e is not None}
        return list(found.values())

    def shared(self, attribute: str) -> Any:
        """The first loaded method's ``datastore`` or ``gap_stats`` (what analysis views show), or None."""
        return next((getattr(m, attribute) for m in self.methods.values() if getattr(m, attribute) is not None), None)

    # ------------------------------------------------------------------ encoding (cached, timed)

    def encode(self, images: Sequence[ImageInput] | Encoded) -> Encoded:
        """One pass of every image tower for the images not already cached, timed; any number of images."""
        if isinstance(images, Encoded):
            return images
        pictures = [image if isinstance(image, Image.Image) else load_image(image) for image in images]
        keys = [image_key(picture) for picture in pictures]
        towers = {tower.name: tower for m in self.methods.values() for tower in m.image_towers()}
        with self._lock:  # an entry cached before a tower was attached lacks its embeddings
            entries = {key: self._cache[key] for key in keys
                       if key in self._cache and set(towers) <= set(self._cache[key].tower_embeds)}
        cached = [key in entries for key in keys]
        first_index = {key: i for i, key in reversed(list(enumerate(keys)))}
        todo = [key for key in first_index if key not in entries]  # distinct new images, in batch order
        if todo:
            picked = [pictures[first_index[key]] for key in todo]
            timer = StageTimer(self.encoder.device)
            with timer("encode"):
                fresh = self.encoder.encode_images(self.encoder.preprocess(picked))
                extra = {name: tower.encode_image_embeds(tower.preprocess(picked)) for name, tower in towers.items()}
            share = timer.per_image(len(todo))["encode"]
            for j, key in enumerate(todo):
                entries[key] = _Cached(fresh.select([j]), {name: e[j : j + 1] for name, e in extra.items()}, share)
        with self._lock:
            for key in keys:
                self._cache[key] = entries[key]
                self._cache.move_to_end(key)
            while len(self._cache) > ENCODE_CACHE_SIZE:
                self._cache.popitem(last=False)
        rows = [entries[key] for key in keys]
        features = rows[0].features if len(rows) == 1 else ImageFeatures.cat([row.features for row in rows])
        embeds = {name: torch.cat([row.tower_embeds[name] for row in rows]) for name in towers} if rows else {}
        return Encoded(keys=keys, features=features, features_encoder=self.encoder.name, tower_embeds=embeds,
                       encode_ms=[row.encode_ms for row in rows], cached=cached)

    # ------------------------------------------------------------------ captioning

    def options(self, method: str, options: MethodOptions | None = None, **settings: Any) -> MethodOptions:
        """``method``'s settings: the bundle's defaults (or ``options``) with ``settings`` applied, validated."""
        return self.method(method).options(options, **settings)

    def caption(self, images: Sequence[ImageInput] | Encoded, method: str, options: MethodOptions | None = None,
                *, store: Any = None, **settings: Any) -> list[Result]:
        """Caption images (PIL images, file paths, or an Encoded batch) with one method.

        Settings not given take the bundle's defaults: ``caption(images, "maccap", samples=5)``. ``store``: a
        retrieving method searches it instead of its own datastore (:mod:`capdemo.my_captions`).
        Each Result's ``timings_ms`` are its own: its share of the vision-tower pass ("encode") and of
        each of the method's batched stages.
        """
        chosen = self.method(method) if store is None else self.method(method).using_store(store)
        options = chosen.options(options, **settings)
        if not isinstance(images, Encoded) and len(images) == 0:
            raise ValueError("no images to caption")
        encoded = self.encode(images)
        results = self._caption_degrading(chosen, encoded, options)
        for result, encode_ms in zip(results, encoded.encode_ms):
            result.timings_ms = {"encode": encode_ms, **result.timings_ms}
        return results

    def _caption_degrading(self, method: CaptionMethod, encoded: Encoded, options: MethodOptions) -> list[Result]:
        """Caption a batch; when it does not fit in memory, caption its halves instead (recursively)."""
        try:
            with torch.inference_mode():
                return method.caption(encoded, options)
        except torch.OutOfMemoryError:
            batch = len(encoded)
            if batch == 1:
                raise
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            half = batch // 2
            log.warning("out of memory captioning %d images; retrying as %d + %d", batch, half, batch - half)
            return [result for part in (slice(0, half), slice(half, batch))
                    for result in self._caption_degrading(method, encoded.select(part), options)]

    # ------------------------------------------------------------------ VQA

    @property
    def vqa_method(self) -> CaptionMethod | None:
        """The method whose captions answer questions, if the bundle has an answer list: the one its ``vqa``
        component names, else the first with an LM of its own (MacCap, the paper's)."""
        from capdemo.vqa import VQA_CAPTION_METHOD_KEY, VQA_COMPONENT

        if self.answers is None:
            return None
        named = self.bundle.component(VQA_COMPONENT).get(VQA_CAPTION_METHOD_KEY)
        return self.methods[named] if named is not None else with_own_lm(self.methods.values())

    def question_limit(self) -> int:
        """The longest question (characters) that always fits the answering LM beside a caption of the VQA method's
        default length; 0 when the bundle cannot answer."""
        method = self.vqa_method
        if method is None or self.answer_lm is None:
            return 0
        caption_tokens = int(getattr(method.default_options(), "max_new_tokens", 0)) + 1  # + the caption's '.'
        return min(MAX_QUESTION_CHARS, self.answer_lm.question_limit(caption_tokens))

    def answer(self, image: ImageInput | Encoded, question: str, *, top_k: int = 10, caption: str | None = None):
        """Zero-shot VQA (MacCap §4.4): caption the image, prompt the answering LM with the question, match the
        answers. ``caption`` skips captioning (e.g. the app already has one for this image)."""
        from capdemo.vqa import answer_question

        question = clean_question(question, max_chars=self.question_limit())
        method = self.vqa_method
        if method is None or self.answer_lm is None:
            raise ValueError("this bundle cannot answer questions (it needs a VQA answer list and a method with an LM)")
        if not 1 <= top_k <= MAX_TOP_K:
            raise ValueError(f"top_k must be between 1 and {MAX_TOP_K}, got {top_k}")
        encoded = self.encode(image if isinstance(image, Encoded) else [image])
        if len(encoded) != 1:
            raise ValueError(f"answer takes one image, got {len(encoded)}")
        if caption is None:
            caption = self.caption(encoded, method.name)[0].caption
        with torch.inference_mode():
            return answer_question(self.answer_lm, self.encoder, caption, question, self.answers, top_k=top_k)

    # ------------------------------------------------------------------ analysis inputs

    def corpus_sample(self) -> tuple[list[str], torch.Tensor]:
        """A fixed sample of datastore captions with their CLIP text embeddings (computed once)."""
        if self._corpus is None:
            datastore = self.shared("datastore")
            if datastore is None or len(datastore) == 0:
                self._corpus = ([], torch.zeros(0, self.encoder.embed_dim))
            else:
                count = min(CORPUS_SAMPLE, len(datastore))
                ids = np.random.default_rng(0).choice(len(datastore), size=count, replace=False)
                texts = [datastore.captions[int(i)] for i in sorted(ids)]
                self._corpus = (texts, self.encoder.encode_text(texts).cpu())
        return self._corpus

    # ------------------------------------------------------------------ bundle facts

    def examples(self) -> list[Path]:
        files = self.bundle.manifest.get("files", {})
        return [self.bundle.path / rel for rel in sorted(files) if rel.startswith(EXAMPLES_DIR + "/")
                and rel.rsplit(".", 1)[-1].lower() in EXAMPLE_SUFFIXES]

    def example_questions(self) -> list[Any]:
        """The bundle's questions about its examples, with their true answers (``capdemo.vqa.ExampleQuestion``)."""
        from capdemo.vqa import example_questions

        return example_questions(self.bundle)

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
            "file_entries": dict(manifest.get("files", {})),  # rel -> {"sha256", "bytes"}
            "device": str(self.encoder.device),
            "precision": self.precision,
            "precision_reports": {name: report.summary() for name, report in self.precision_reports.items()},
        }


DEFAULT_METHOD_KEY = "default_method"  # optional manifest entry: the method the app shows first (else MacCap)


def lead_with(name: str | None, loaded: dict[str, CaptionMethod]) -> dict[str, CaptionMethod]:
    """``loaded`` with the bundle's default method ``name`` first (the app's first panel and default choice)."""
    if name is None:
        return loaded
    check_method_named(name, loaded, where=DEFAULT_METHOD_KEY)
    return {name: loaded[name], **{other: method for other, method in loaded.items() if other != name}}


def check_method_named(name: str | None, loaded: dict[str, CaptionMethod], *, where: str) -> None:
    """A method that ``bundle.json`` names at ``where`` must be one the bundle holds (one-line ValueError)."""
    if name is not None and name not in loaded:
        raise ValueError(f"bundle.json: {where} {name!r} is not one of its methods ({', '.join(loaded)})")


def with_own_lm(methods) -> CaptionMethod | None:
    """The first of ``methods`` with an LM of its own that can answer (MacCap's, trained for captions), or None."""
    return next((method for method in methods if method.answer_lm() is not None), None)


def answering_lm(bundle: Bundle, methods, *, device: str):
    """The LM that answers questions: the frozen LM the bundle names for VQA (decoded with the VQA method's
    settings), else the VQA method's own LM; None when no method serves VQA."""
    from capdemo.vqa import AnswerLM

    method = with_own_lm(methods)
    if method is None:
        return None
    own = method.answer_lm()
    return AnswerLM.frozen_from_bundle(bundle, own, device=device) or own


SERVING_KEY = "serving"  # manifest entry: {"precision": ...}, the bundle's measured recommendation for CPU serving


def serving_precision(bundle: Bundle, device: str, requested: str | None = None) -> str:
    """The precision to serve ``bundle`` at: ``requested`` when given; else the bundle's recommendation
    (written from a measured quality check) on a CPU, except bf16 on a CPU without bf16 instructions (emulated,
    slower than fp32); else fp32 (int8 is CPU-only)."""
    if requested is not None:
        return check_precision(requested)
    recommended = bundle.manifest.get(SERVING_KEY, {}).get("precision")
    if recommended is None or torch.device(device).type != "cpu":
        return DEFAULT_PRECISION
    recommended = check_precision(recommended)
    return DEFAULT_PRECISION if recommended == "bf16" and not bf16_is_native(device) else recommended


__all__ = ["DEFAULT_METHOD_KEY", "Captioner", "Encoded", "default_device", "image_key", "serving_precision"]
