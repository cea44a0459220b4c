"""TOMCap inference, batched: one datastore search, one generate and one CLIP text call for the whole batch.

The image embedding (from the retrieval encoder when the bundle has its own, the paper's SigLIP2;
else the captioning CLIP's) queries the caption datastore for the K nearest captions; they fill
the prompt, and their CLIP embeddings join the image's in the cross-attention memory. The image
embedding is not gap-corrected: the correction moves text onto image statistics, which an image
already has. Beam search decodes; every beam is a candidate, scored by CLIP.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from capdemo.encoders import ClipEncoder
from capdemo.gap import GapCorrection, GapStats
from capdemo.methods.base import CaptionMethod, Encoded, LoadContext, MethodOptions, options_from_config, setting
from capdemo.bundle import IN_BUNDLE_PREFIX
from capdemo.methods.tomcap.model import (
    BUNDLED_DATASTORE, BUNDLED_GAP_STATS, BUNDLED_LM, BUNDLED_RETRIEVER, SELECT_BY, TOMCAP_COMPONENT,
    TRAINABLE_WEIGHTS, TOMCap, TOMCapConfig, build_prompt, load_gpt2_with_cross_attention,
)
from capdemo.rerank import ScoredTexts, clip_scores
from capdemo.result import Candidate, Neighbour, Result
from capdemo.retrieval import CaptionDatastore, DatastoreError
from capdemo.timing import StageTimer
from capdemo.weights import WeightSource, resolve

MAX_K = 16  # most neighbours a request may ask for (the paper finds 4 best; more only adds noise)
TEXT_TO_TEXT_BATCH = 50  # texts decoded per generate call by text_to_text
_EMBED_CHUNK = 256  # texts per encoder call when store captions need embeddings


@dataclass
class TOMCapOptions(MethodOptions):
    """TOMCap's per-request settings (a bundle presets them from its TOMCapConfig)."""

    k: int = setting(4, low=1, high=MAX_K, label="Neighbours K",
                     help="retrieved captions in the prompt and the memory (paper: 4)")
    beams: int = setting(3, low=1, high=8, label="Beams", help="beam width; every beam is a candidate")
    max_new_tokens: int = setting(25, low=1, high=64, label="Max new tokens", help="caption length cap")
    select_by: str = setting("clip", choices=SELECT_BY, label="Pick the caption by",
                             help="'beam': the beam search's best (the paper); 'clip': the beam closest to the image "
                                  "by CLIP cosine (capdemo's rerank, as MacCap filters its samples)")


def store_caption_embeddings(
    store_ids: np.ndarray, datastore: CaptionDatastore, captions: Sequence[str], corpus_embeds: torch.Tensor,
    embed_fn: Callable[[Sequence[str]], torch.Tensor],
) -> tuple[torch.Tensor, np.ndarray]:
    """CLIP embeddings of the store captions in ``store_ids`` (N, H): ``(table (U, D), row of each id (N, H))``.

    Store captions that are also corpus captions reuse the corpus embedding; the rest are embedded here.
    """
    unique, rows = np.unique(store_ids, return_inverse=True)
    corpus_row: dict[str, int] = {}
    for row, caption in enumerate(captions):
        corpus_row.setdefault(caption, row)
    texts = [datastore.captions[int(i)] for i in unique]
    table = torch.empty(len(unique), corpus_embeds.shape[1], dtype=corpus_embeds.dtype)
    missing = [j for j, text in enumerate(texts) if text not in corpus_row]
    known = [j for j in range(len(texts)) if texts[j] in corpus_row]
    table[known] = corpus_embeds[[corpus_row[texts[j]] for j in known]]
    for start in range(0, len(missing), _EMBED_CHUNK):
        part = missing[start : start + _EMBED_CHUNK]
        table[part] = torch.as_tensor(embed_fn([texts[j] for j in part])).to(table.dtype).cpu()
    return table, rows.reshape(store_ids.shape)


def retrieve_neighbours(datastore: CaptionDatastore | None, queries: torch.Tensor, k: int) -> list[list[Neighbour]]:
    """The K captions nearest to each query (Q, D), best first; a store too small for K is an error."""
    if datastore is None:
        raise DatastoreError("TOMCap retrieves neighbour captions but no datastore was given")
    if len(datastore) < k:
        raise DatastoreError(f"k={k} neighbours asked for, but the datastore holds only {len(datastore)} captions")
    neighbours = datastore.retrieve(queries, k)
    if any(len(row) < k for row in neighbours):
        raise DatastoreError(f"the datastore returned fewer than k={k} neighbours for some images (IVF lists too few?)")
    return neighbours


def fitted_new_tokens(model: TOMCap, prompts: Sequence[Sequence[int]], requested: int) -> int:
    """``requested`` new tokens, fewer when the prompts leave less room in the LM's positions (the caption is cut
    where the LM's context ends instead of running past it); a prompt that fills them is a one-line error."""
    room = model.tokens.room_after(prompts)
    if room < 1:
        raise ValueError(f"the prompt with these neighbours fills all {model.tokens.max_positions} positions of "
                         "TOMCap's language model; choose a smaller K")
    return min(requested, room)


@torch.inference_mode()
def caption_images(model: TOMCap, encoder: ClipEncoder, datastore: CaptionDatastore | None,
                   image_embeds: torch.Tensor, query_embeds: torch.Tensor, options: TOMCapOptions) -> list[Result]:
    """Caption B images from their CLIP image embeddings (B, D) and retrieval queries (B, D_r).

    The queries are the image embeddings themselves unless the datastore lives in another encoder's
    space (``config.retrieval_encoder``). One faiss search, one ``generate`` and one CLIP text call
    serve the whole batch; timings are per image.
    """
    config, k, beams = model.config, options.k, options.beams
    timer = StageTimer(model.device)
    image_embeds = image_embeds.float().to(model.device)
    batch = image_embeds.shape[0]
    with timer("retrieve"):
        if config.use_retrieval:
            neighbours = retrieve_neighbours(datastore, query_embeds, k)
            texts = [n.text for row in neighbours for n in row]
            neighbour_embeds = encoder.encode_text(texts).float().to(model.device).view(batch, k, -1)  # (B, K, D)
        else:
            neighbours, neighbour_embeds = [[] for _ in range(batch)], None
    with timer("generate"):
        prompts = [model.tokens.prompt_ids([n.text for n in row]) for row in neighbours]
        new_tokens = fitted_new_tokens(model, prompts, options.max_new_tokens)
        memory = model.memory(image_embeds, neighbour_embeds)  # (B, 1 + K, n_embd), the image is not corrected
        texts = model.generate(prompts, memory, beams=beams, max_new_tokens=new_tokens)
    with timer("rerank"):
        scored = clip_scores(encoder, image_embeds, [texts[b * beams : (b + 1) * beams] for b in range(batch)])
    timings = timer.per_image(batch)
    settings = {**options.to_dict(), "k": k if config.use_retrieval else 0, "batch_size": batch,
                "max_new_tokens_fitted": new_tokens}
    return [_result(b, image_embeds, neighbours[b], neighbour_embeds, scored[b], config, timings, settings)
            for b in range(batch)]


def _result(b: int, image_embeds: torch.Tensor, neighbours: list[Neighbour], neighbour_embeds: torch.Tensor | None,
            scored: ScoredTexts, config: TOMCapConfig, timings: dict[str, float], settings: dict) -> Result:
    """Result of image ``b``: beams as candidates (CLIP-ranked or in beam order), neighbours, plot embeddings."""
    order = scored.order() if settings["select_by"] == "clip" else list(range(len(scored.texts)))
    candidates = [Candidate(text=scored.texts[j], clip_score=float(scored.scores[j]), sample=j) for j in order]
    dim = image_embeds.shape[-1]
    embeddings = {
        "image": image_embeds[b : b + 1].float().cpu(),  # (1, D)
        "neighbours": torch.zeros(0, dim) if neighbour_embeds is None else neighbour_embeds[b].float().cpu(),  # (K, D)
        "candidates": scored.embeds[order].float().cpu(),  # (beams, D), best first
    }
    return Result(
        caption=candidates[0].text,
        method=TOMCapMethod.name,
        candidates=candidates,
        neighbours=list(neighbours),
        embeddings=embeddings,
        timings_ms=dict(timings),
        extras={"prompt": build_prompt([n.text for n in neighbours], config), **settings},
    )


# --------------------------------------------------------------------------------------------
# Bundles


def add_to_bundle(writer: Any, model: TOMCap, *, datastore: str | Path | None, copy_datastore: bool,
                  gap_stats: GapStats | None = None, retriever: ClipEncoder | None = None) -> None:
    """Record a trained model in a ``BundleWriter``.

    Writes the config, the trainable weights, the base LM when it is local (a hub LM is kept as its
    ``hf-hub:`` spec), the retrieval encoder's weights when they are local, the datastore (copied, or
    referenced by its path or hub spec when ``copy_datastore`` is False) and the gap statistics the
    training inputs were corrected with.
    """
    config = model.config
    writer.add_tensors(TRAINABLE_WEIGHTS, model.trainable_state())
    spec = config.retrieval_encoder
    if spec is not None and (spec.pretrained is None or not WeightSource.parse(spec.pretrained).on_hub
                             and Path(spec.pretrained).exists()):
        if retriever is None:
            raise ValueError("a local retrieval encoder must be handed over to be copied into the bundle")
        writer.add_tensors(BUNDLED_RETRIEVER, retriever.model.state_dict())
        config = config.replace(retrieval_encoder=spec.replace(pretrained=IN_BUNDLE_PREFIX + BUNDLED_RETRIEVER))
    if not WeightSource.parse(model.lm_source).on_hub:
        writer.add_directory(BUNDLED_LM, resolve(model.lm_source, what="TOMCap language model"))
        config = config.replace(lm=IN_BUNDLE_PREFIX + BUNDLED_LM)
    if datastore is not None and copy_datastore:
        writer.add_directory(BUNDLED_DATASTORE, resolve(datastore, what="TOMCap datastore", patterns=("*",)))
        datastore = IN_BUNDLE_PREFIX + BUNDLED_DATASTORE
    if gap_stats is not None:
        gap_stats.save(writer.path(BUNDLED_GAP_STATS))
        config = config.replace(gap_stats=IN_BUNDLE_PREFIX + BUNDLED_GAP_STATS)
    writer.add_component(TOMCAP_COMPONENT, config.replace(datastore=str(datastore) if datastore else None).to_dict())


def load_from_bundle(bundle: Any, *, device: str | torch.device = "cpu") -> TOMCap:
    """Rebuild the bundle's TOMCap (eval mode) exactly from its stored config and weights."""
    config = TOMCapConfig.from_dict(bundle.component(TOMCAP_COMPONENT))
    source = bundle.locate(config.lm)
    lm, tokenizer = load_gpt2_with_cross_attention(source, device=device)
    model = TOMCap(config, lm, tokenizer, lm_source=source)
    model.load_trainable_state(bundle.tensors(TRAINABLE_WEIGHTS))
    return model.to(device).eval()


def datastore_from_bundle(bundle: Any) -> CaptionDatastore | None:
    """The bundle's caption datastore (inside it or referenced), or None when the model does not retrieve."""
    config = TOMCapConfig.from_dict(bundle.component(TOMCAP_COMPONENT))
    if not config.use_retrieval:
        return None
    if config.datastore is None:
        raise DatastoreError(f"{bundle.path}: the tomcap component names no datastore")
    return CaptionDatastore.load(resolve(bundle.locate(config.datastore), what="TOMCap datastore", patterns=("*",)))


class TOMCapMethod(CaptionMethod):
    """TOMCap behind the method interface: the model, its datastore, gap statistics and retrieval encoder."""

    name = "tomcap"
    label = "TOMCap"
    citation = "CVPR 2026: retrieval augmentation, mean+std gap correction, GPT-2 cross-attention with LoRA"
    Options = TOMCapOptions

    def __init__(self, model: TOMCap, encoder: ClipEncoder, *, datastore: CaptionDatastore | None,
                 gap_stats: GapStats | None, retriever: ClipEncoder | None):
        self.model = model
        self.encoder = encoder  # the captioning CLIP: memory embeddings and the rerank
        self.retriever = retriever  # the datastore's encoder when it is not the captioning CLIP (paper: SigLIP2)
        self.datastore = datastore
        self.gap_stats = gap_stats
        self._limits: dict[str, tuple[float, float]] | None = None  # computed on first use (tokenizes the store)
        self._limits_store: Any = None  # the store they were computed for
        if datastore is not None:  # queries must live in the datastore's space: checked once, here
            datastore.require_encoder((retriever or encoder).name)

    @classmethod
    def from_bundle(cls, context: LoadContext) -> TOMCapMethod:
        model = load_from_bundle(context.bundle, device=context.device)
        config, retriever = model.config, None
        if config.retrieval_encoder is not None:
            spec = config.retrieval_encoder
            retriever = context.towers.get(spec.replace(pretrained=context.bundle.locate(spec.pretrained)))
        gap_stats = GapStats.load(context.bundle.locate(config.gap_stats)) if config.gap_stats else None
        return cls(model, context.encoder, datastore=datastore_from_bundle(context.bundle), gap_stats=gap_stats,
                   retriever=retriever if retriever is not context.encoder else None)

    def default_options(self) -> TOMCapOptions:
        return options_from_config(TOMCapOptions, self.model.config)

    def limits(self) -> dict[str, tuple[float, float]]:
        """K: at most the datastore's size, and only as many neighbours as the LM's positions hold with room left
        for a caption of the bundle's length (checked against the store's longest captions); new tokens: at most
        what the shortest prompt leaves (a longer prompt cuts the caption at the LM's last position)."""
        if self._limits is None or self._limits_store is not self.datastore:  # a copy may search another store
            tokens, config = self.model.tokens, self.model.config
            shortest = [] if not config.use_retrieval or self.datastore is None else [""]
            limits = {"max_new_tokens": (1, tokens.room_after([tokens.prompt_ids(shortest)]))}
            if self.datastore is not None and config.use_retrieval:
                room = min(config.max_new_tokens, config.max_caption_tokens)
                store = self.datastore.captions
                largest = tokens.largest_k([store[i] for i in range(len(self.datastore))], room=room, k_max=MAX_K)
                limits["k"] = (1, max(1, min(largest, len(self.datastore))))
            self._limits, self._limits_store = limits, self.datastore
        return dict(self._limits)

    def retrieval_encoder(self) -> ClipEncoder | None:
        return (self.retriever or self.encoder) if self.datastore is not None else None

    def image_towers(self) -> list[ClipEncoder]:
        return [self.retriever] if self.retriever is not None else []

    def caption(self, encoded: Encoded, options: TOMCapOptions) -> list[Result]:
        image_embeds = encoded.image_embeds()
        queries = encoded.image_embeds(self.retriever) if self.retriever is not None else image_embeds
        return caption_images(self.model, self.encoder, self.datastore, image_embeds, queries, options)

    @torch.inference_mode()
    def text_to_text(self, texts: Sequence[str], text_embeds: torch.Tensor,
                     options: TOMCapOptions | None = None) -> list[str] | None:
        """Each text's training input, clean: its corrected embedding, and the captions that embedding retrieves
        as training's queries do (noise aside; itself excluded), decoded with ``options``' K, beams and selection
        (default: the bundle's; by CLIP cosine with the text's embedding, as images are by theirs)."""
        defaults = options or self.default_options()
        config = self.model.config.replace(k=defaults.k)  # the prompt's neighbours: K of them, as for an image
        if self.retriever is not None or (config.use_retrieval and self.datastore is None):
            return None  # training queried with the retrieval encoder's text embeddings: not rebuilt here
        mode = GapCorrection(config.gap_correction)
        inputs = text_embeds.float()
        if mode is not GapCorrection.NONE:
            inputs = self.gap_stats.correct(inputs, mode)
        hit_ids = np.zeros((len(texts), 0), dtype=np.int64)
        if config.use_retrieval and config.hits_for_training:
            hit_ids = self.datastore.search(inputs, config.hits_for_training, exclude_texts=list(texts),
                                            dedupe=True).ids  # (N, H)
        columns = config.split_hits(range(hit_ids.shape[1]))[1] if config.use_retrieval else []  # prompt hits
        if columns:
            store_embeds, store_rows = store_caption_embeddings(hit_ids, self.datastore, texts, text_embeds,
                                                                self.encoder.encode_text)
        groups = []
        for start in range(0, len(texts), TEXT_TO_TEXT_BATCH):
            rows = range(start, min(start + TEXT_TO_TEXT_BATCH, len(texts)))
            neighbour_embeds = (torch.stack([store_embeds[torch.as_tensor(store_rows[i][columns])] for i in rows])
                                .float() if columns else None)  # (b, K, D)
            memory = self.model.memory(inputs[start : rows.stop], neighbour_embeds)  # (b, 1 + K, n_embd)
            prompts = [self.model.tokens.prompt_ids([self.datastore.captions[int(hit_ids[i][c])] for c in columns])
                       for i in rows]
            beams = self.model.generate(prompts, memory, beams=defaults.beams, max_new_tokens=defaults.max_new_tokens)
            groups += [beams[j * defaults.beams : (j + 1) * defaults.beams] for j in range(len(rows))]
        if defaults.select_by != "clip":
            return [group[0] for group in groups]
        return [scored.texts[scored.order()[0]] for scored in clip_scores(self.encoder, text_embeds, groups)]

    def modules(self) -> list[torch.nn.Module]:
        return [self.model]


__all__ = ["MAX_K", "TOMCapMethod", "TOMCapOptions", "add_to_bundle", "caption_images", "datastore_from_bundle",
           "load_from_bundle", "retrieve_neighbours", "store_caption_embeddings"]
