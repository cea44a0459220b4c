"""Train TOMCap text-only and write a bundle.

CLI: ``python -m training tomcap --corpus FILE --datastore DIR --encoder SPEC --gap-stats FILE --out weights/NAME``.

Steps, each cached so a rerun (or ``--resume``) skips what is done:

1. CLIP text embeddings of the corpus (``training.embed``, sharded and resumable).
2. Retrieval for every caption, once, before training: the caption's clean text embedding
   queries the datastore with the caption itself and its exact duplicates excluded and
   repeated captions collapsed (a text query in a text store, so no correction here).
   Stored as ``retrieval.safetensors`` in the run folder, keyed by corpus, store and settings.
3. Examples: the input is the caption's embedding corrected onto the image statistics
   (noise is added per step in :meth:`TOMCap.loss`); the memory adds the prompt neighbours'
   CLIP embeddings; the target is the nearest retrieved caption (or the input caption).
4. The shared loop (``training.loop``: AMP on GPU, torchrun DDP, atomic checkpoints, --resume).
5. A bundle: encoder, tomcap component, trainable weights, base LM when local, datastore
   (copied or referenced), gap statistics.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from torch.utils.data import Dataset
from tqdm import tqdm

import capdemo  # noqa: F401  (the torchvision shim, before any model library)
from capdemo.encoders import ClipEncoder, EncoderConfig, load_encoder, parse_encoder_spec
from capdemo.gap import GapCorrection, GapStats, gap_noise
from capdemo.fileio import atomic_output, save_safetensors
from capdemo.retrieval import CaptionDatastore, DatastoreError
from capdemo.lm import IGNORE_INDEX
from capdemo.methods.tomcap.inference import add_to_bundle, store_caption_embeddings
from capdemo.methods.tomcap.model import (
    SELECT_BY, TARGETS, TOMCAP_COMPONENT, PromptTokens, TOMCap, TOMCapConfig, build_prompt,
    load_gpt2_with_cross_attention,
)
from training.cli import (
    OptimDefaults, add_optimisation, model_group, print_summary, read_command, training_parser, write_method_bundle,
)
from training.embed import CACHE_WAIT_S, EmbedFn, cached_text_embeddings, corpus_sha256
from training.loop import TrainConfig, TrainResult, TrainTask, train

TRAINING_RECORD = "tomcap/training.json"  # bundle file: how the weights were trained
RETRIEVAL_CACHE = "retrieval.safetensors"
RETRIEVAL_FORMAT = "capdemo.tomcap-retrieval/1"
_SEARCH_CHUNK = 4096  # training queries per datastore search call
# SmallCap, TOMCap's code ancestor: lr 1e-4, batch 64, 10 epochs; the paper states none of them.
DEFAULTS = OptimDefaults(epochs=10, batch_size=64, lr=1e-4, warmup=500, min_lr_ratio=0.0,
                         source="SmallCap's (TOMCap's code ancestor; the paper states none)")


# --------------------------------------------------------------------------------------------
# Retrieval for training, cached


def _retrieval_key(captions: Sequence[str], datastore: CaptionDatastore, hits: int, query: dict[str, Any]) -> str:
    """Fingerprint of what the cached hits depend on: the corpus, the store (captions, encoder, index), ``hits``
    and how the queries were made (``query``)."""
    identity = {"corpus": corpus_sha256(captions), "store_captions": corpus_sha256(datastore.captions),
                "store": datastore.meta(), "hits": hits, "query": query}
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()


def retrieve_for_training(
    datastore: CaptionDatastore,
    query_embeds: torch.Tensor,
    captions: Sequence[str],
    hits: int,
    *,
    cache_file: str | Path | None = None,
    progress: bool = True,
    query_key: dict[str, Any] | None = None,
) -> np.ndarray:
    """Store ids (N, hits) of the captions nearest to each corpus caption's query, best first.

    The caption's own text and its exact duplicates are excluded, and equal captions count
    once, so the nearest hit is never the input caption itself. Reads ``cache_file`` when it
    was made for the same corpus, store, ``hits`` and queries (``query_key`` says how they were
    made); writes it (atomically) otherwise.
    """
    key = _retrieval_key(captions, datastore, hits, query_key or {})
    if cache_file is not None and Path(cache_file).is_file():
        with safe_open(str(cache_file), framework="pt") as handle:
            if (handle.metadata() or {}).get("key") == key:
                return handle.get_tensor("ids").numpy()
    if len(datastore) <= hits:
        raise ValueError(f"the datastore holds {len(datastore)} captions; training retrieves {hits} per caption"
                         f" besides the caption itself, so it needs more than {hits}")
    ids = np.empty((len(captions), hits), dtype=np.int64)
    for start in tqdm(range(0, len(captions), _SEARCH_CHUNK), desc="retrieval", unit="chunk", disable=not progress):
        stop = min(start + _SEARCH_CHUNK, len(captions))
        queries, own_texts = query_embeds[start:stop], list(captions[start:stop])
        ids[start:stop] = datastore.search(queries, hits, exclude_texts=own_texts, dedupe=True).ids
    if (ids < 0).any():
        raise ValueError(f"some captions got fewer than {hits} neighbours from the datastore (IVF lists too few?)")
    if cache_file is not None:
        with atomic_output(cache_file) as tmp:
            save_safetensors({"ids": torch.from_numpy(ids)}, tmp, {"format": RETRIEVAL_FORMAT, "key": key})
    return ids


# --------------------------------------------------------------------------------------------
# Examples


class TOMCapExamples(Dataset):
    """One training example per corpus caption: corrected input embedding, neighbour memory, tokens and labels."""

    def __init__(
        self,
        *,
        tokens: PromptTokens,
        captions: Sequence[str],
        corpus_embeds: torch.Tensor,
        hit_ids: np.ndarray,
        store_texts: Sequence[str],
        store_embeds: torch.Tensor,
        store_rows: np.ndarray,
        gap_stats: GapStats | None,
    ):
        config = tokens.config
        if GapCorrection(config.gap_correction) is not GapCorrection.NONE and gap_stats is None:
            raise ValueError(f"gap correction {config.gap_correction!r} needs gap statistics"
                             " (python -m training gapstats)")
        self.tokens = tokens
        self.config = config
        self.captions = captions  # corpus caption i: the query of example i
        self.corpus_embeds = corpus_embeds  # (N, D) CLIP text embeddings of the corpus
        self.hit_ids = hit_ids  # (N, H) store ids retrieved for each caption, best first
        self.store_texts = store_texts  # store id -> caption
        self.store_embeds = store_embeds  # (U, D) CLIP embeddings of the store captions used
        self.store_rows = store_rows  # (N, H) row of store_embeds for each hit
        self.gap_stats = gap_stats

    def __len__(self) -> int:
        return len(self.captions)

    def parts(self, index: int) -> tuple[str, list[str], list[int]]:
        """``(target text, prompt neighbour texts, their columns in the hits)`` of example ``index``."""
        target_column, columns = self.config.split_hits(range(self.hit_ids.shape[1]))
        ids = self.hit_ids[index]
        target = self.captions[index] if target_column is None else self.store_texts[int(ids[target_column])]
        return target, [self.store_texts[int(ids[c])] for c in columns], columns

    def input_embed(self, index: int) -> torch.Tensor:
        """The corrected (not yet noised) input embedding (D,)."""
        embed = self.corpus_embeds[index].float()
        mode = GapCorrection(self.config.gap_correction)
        return embed if mode is GapCorrection.NONE else self.gap_stats.correct(embed, mode)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        target, neighbours, columns = self.parts(index)
        input_ids, labels = self.tokens.training_tokens(neighbours, target)
        rows = torch.as_tensor(self.store_rows[index][columns], dtype=torch.long)
        return {
            "input_embeds": self.input_embed(index),  # (D,)
            "neighbour_embeds": self.store_embeds[rows].float(),  # (K, D)
            "input_ids": torch.tensor(input_ids, dtype=torch.long),  # (L,)
            "labels": torch.tensor(labels, dtype=torch.long),  # (L,)
        }


def collate(pad_id: int) -> Callable[[list[dict[str, torch.Tensor]]], dict[str, torch.Tensor]]:
    """Stack embeddings and right-pad token rows (pad id, mask 0, label IGNORE_INDEX)."""

    def collate_examples(items: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        length = max(len(item["input_ids"]) for item in items)
        input_ids = torch.full((len(items), length), pad_id, dtype=torch.long)
        labels = torch.full((len(items), length), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(items), length), dtype=torch.long)
        for row, item in enumerate(items):
            size = len(item["input_ids"])
            input_ids[row, :size], labels[row, :size], mask[row, :size] = item["input_ids"], item["labels"], 1
        return {
            "input_embeds": torch.stack([item["input_embeds"] for item in items]),  # (B, D)
            "neighbour_embeds": torch.stack([item["neighbour_embeds"] for item in items]),  # (B, K, D)
            "input_ids": input_ids,  # (B, L)
            "attention_mask": mask,  # (B, L)
            "labels": labels,  # (B, L)
        }

    return collate_examples


def loss_fn(model: TOMCap, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return model.loss(batch["input_embeds"], batch["neighbour_embeds"], batch["input_ids"], batch["attention_mask"],
                      batch["labels"])


@torch.inference_mode()
def reproduce_targets(model: TOMCap, examples: TOMCapExamples, indices: Sequence[int], *, beams: int = 1,
                      batch_size: int = 64) -> tuple[float, list[str]]:
    """Text-to-text check: decode examples from their clean corrected embeddings; (exact-match rate, outputs).

    The ceiling of text-only training (no modality gap, no noise): a trained model should give
    back each example's target.
    """
    outputs = [group[0] for group in decode_examples(model, examples, indices, beams=beams, batch_size=batch_size)]
    hits = sum(text == " ".join(examples.parts(i)[0].split()) for text, i in zip(outputs, indices))
    return hits / max(1, len(indices)), outputs


def decode_examples(model: TOMCap, examples: TOMCapExamples, indices: Sequence[int], *, beams: int,
                    batch_size: int = 64) -> list[list[str]]:
    """Beam search from examples' clean inputs (corrected embedding, neighbours, prompt): every beam, best first."""
    was_training = model.training
    model.eval()
    groups: list[list[str]] = []
    for start in range(0, len(indices), batch_size):
        chunk = list(indices[start : start + batch_size])
        items = [examples[i] for i in chunk]
        memory = model.memory(torch.stack([it["input_embeds"] for it in items]),
                              torch.stack([it["neighbour_embeds"] for it in items]))  # (b, 1 + K, n_embd)
        prompts = [model.tokens.prompt_ids(examples.parts(i)[1]) for i in chunk]
        texts = model.generate(prompts, memory, beams=beams, max_new_tokens=model.config.max_new_tokens)
        groups += [texts[j * beams : (j + 1) * beams] for j in range(len(chunk))]
    model.train(was_training)
    return groups


_LOCATION_FIELDS = ("lm", "datastore", "gap_stats")  # where things are, not what they are: may move between runs


def run_identity(config: TOMCapConfig, captions: Sequence[str], datastore: CaptionDatastore,
                 gap_stats: GapStats | None) -> dict[str, Any]:
    """What a resumed run must share with the killed one: the model settings, the exact corpus, the
    datastore (its encoder, size and index) and the gap statistics' values."""
    settings = {f"tomcap.{name}": json.dumps(value, sort_keys=True) if isinstance(value, dict) else value
                for name, value in config.to_dict().items() if name not in _LOCATION_FIELDS}
    gap = None
    if gap_stats is not None:
        digest = hashlib.sha256()
        for tensor in (gap_stats.mu_image, gap_stats.mu_text, gap_stats.sigma_image, gap_stats.sigma_text):
            digest.update(tensor.detach().cpu().float().numpy().tobytes())
        gap = digest.hexdigest()
    return {**settings, "corpus_sha256": corpus_sha256(captions),
            "datastore": json.dumps(datastore.meta(), sort_keys=True), "gap_stats_sha256": gap}


def build_task(model: TOMCap, examples: TOMCapExamples, *, eval_samples: int = 0,
               identity: dict[str, Any] | None = None) -> TrainTask:
    """The shared loop's TrainTask; ``eval_samples`` > 0 adds a text-to-text check on the first examples."""
    evaluate = None
    if eval_samples > 0:
        indices = list(range(min(eval_samples, len(examples))))

        def evaluate(trained: TOMCap) -> dict[str, float]:
            return {"text_to_text_exact": reproduce_targets(trained, examples, indices)[0]}

    return TrainTask(model=model, dataset=examples, collate_fn=collate(model.pad_id), loss_fn=loss_fn,
                     evaluate=evaluate, identity=identity or {})


def training_queries(config: TOMCapConfig, query_embeds: torch.Tensor, gap_stats: GapStats | None, *,
                     seed: int) -> torch.Tensor:
    """The queries training retrieves with (N, D_r): image-like, as the image queries at inference.

    With the captioning CLIP as the retrieval encoder, each caption's embedding is corrected onto the image
    statistics and noised (std ``query_noise_scale x sigma_I`` per dimension, one seeded draw, as IFCap
    queries with noised text embeddings). A separate retrieval encoder (the paper's SigLIP2) has no image
    statistics here: its text embeddings are noised in units of their own per-dimension spread.
    """
    queries = query_embeds.float()
    if gap_stats is not None and queries.shape[1] == gap_stats.dim and config.retrieval_encoder is None:
        mode = GapCorrection(config.gap_correction)
        if mode is not GapCorrection.NONE:
            queries = gap_stats.correct(queries, mode)
        spread = gap_stats.sigma_image
    else:
        spread = queries.std(dim=0, correction=0)  # (D_r,)
    if config.query_noise_scale == 0:
        return queries
    return gap_noise(queries, config.query_noise_scale * spread, generator=torch.Generator().manual_seed(seed))


def prepare_examples(
    model: TOMCap,
    captions: Sequence[str],
    corpus_embeds: torch.Tensor,
    datastore: CaptionDatastore,
    embed_fn: EmbedFn,
    *,
    gap_stats: GapStats | None,
    query_embeds: torch.Tensor | None = None,
    retrieval_cache: str | Path | None = None,
    progress: bool = True,
    seed: int = 0,
) -> TOMCapExamples:
    """Retrieve (cached) and assemble the examples; ``query_embeds`` (the retrieval encoder's text embeddings)
    default to the corpus CLIP embeddings, and become :func:`training_queries` (noise seeded by ``seed``)."""
    config = model.config
    hits = config.hits_for_training
    if hits:
        queries = training_queries(config, corpus_embeds if query_embeds is None else query_embeds, gap_stats,
                                   seed=seed)
        hit_ids = retrieve_for_training(datastore, queries, captions, hits, cache_file=retrieval_cache,
                                        progress=progress, query_key=_query_key(config, gap_stats, seed))
    else:
        hit_ids = np.zeros((len(captions), 0), dtype=np.int64)
    store_embeds, store_rows = store_caption_embeddings(hit_ids, datastore, captions, corpus_embeds, embed_fn)
    examples = TOMCapExamples(tokens=model.tokens, captions=captions, corpus_embeds=corpus_embeds, hit_ids=hit_ids,
                              store_texts=datastore.captions, store_embeds=store_embeds, store_rows=store_rows,
                              gap_stats=gap_stats)
    check_lengths(examples)
    return examples


def _query_key(config: TOMCapConfig, gap_stats: GapStats | None, seed: int) -> dict[str, Any]:
    """What the training queries depend on besides the corpus and the store (part of the retrieval cache key)."""
    stats = None if gap_stats is None else hashlib.sha256(gap_stats.sigma_image.numpy().tobytes()).hexdigest()
    return {"correction": config.gap_correction, "query_noise_scale": config.query_noise_scale, "seed": seed,
            "gap_stats": stats, "retrieval_encoder": config.retrieval_encoder is not None}


def check_lengths(examples: TOMCapExamples, *, chunk: int = 4096) -> None:
    """Refuse, before the first step, an example whose prompt and target run past the LM's positions, naming
    the flags that shorten it (training would otherwise fail at whichever step first drew it)."""
    tokens, config = examples.tokens, examples.config
    tokenizer = tokens.tokenizer
    for start in range(0, len(examples), chunk):
        rows = range(start, min(start + chunk, len(examples)))
        parts = [examples.parts(i) for i in rows]
        prompts = tokenizer([build_prompt(neighbours, config) for _, neighbours, _ in parts],
                            add_special_tokens=False)["input_ids"]
        targets = tokenizer([" " + target.strip() for target, _, _ in parts], add_special_tokens=False)["input_ids"]
        for i, prompt, target in zip(rows, prompts, targets):
            length = len(prompt) + min(len(target) + 1, config.max_caption_tokens)
            if length > tokens.max_positions:
                raise ValueError(f"TOMCap training example {i} is {length} tokens (its prompt with K={config.k} "
                                 f"neighbours is {len(prompt)}), more than the LM's {tokens.max_positions} "
                                 "positions: lower --k or --max-caption-tokens")


# --------------------------------------------------------------------------------------------
# A whole run


@dataclass
class TOMCapRun:
    """What :func:`train_tomcap` produced."""

    result: TrainResult  # the loop's record (history, evaluations, final checkpoint)
    model: TOMCap  # the trained model (on the training device)
    examples: TOMCapExamples  # the training examples (targets, prompts) the model saw
    bundle: Path | None  # the written bundle; None when the run stopped early or on ranks > 0


def _is_main_rank() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def train_tomcap(
    captions: list[str],
    *,
    encoder: ClipEncoder,
    encoder_config: EncoderConfig,
    datastore_dir: str | Path,
    gap_stats: GapStats | None,
    config: TOMCapConfig,
    train_config: TrainConfig,
    out: str | Path,
    embeddings_dir: str | Path | None = None,
    copy_datastore: bool = True,
    eval_samples: int = 64,
    resume: bool = False,
    stop_after: int | None = None,
    name: str | None = None,
) -> TOMCapRun:
    """Train TOMCap on ``captions`` and write the bundle ``out`` (the programmatic form of :func:`main`).

    ``config.embed_dim`` is taken from the encoder. With ``config.retrieval_encoder`` set, the
    corpus is embedded a second time with it for the retrieval queries.
    """
    config = config.replace(embed_dim=encoder.embed_dim)
    datastore = CaptionDatastore.load(datastore_dir)
    run_dir = Path(train_config.out_dir)
    corpus_embeds = cached_text_embeddings(captions, encoder, Path(embeddings_dir or run_dir / "text-embeddings"))
    query_embeds, retriever = None, None
    if config.retrieval_encoder is not None:
        retriever = load_encoder(config.retrieval_encoder, device=encoder.device)
        query_embeds = cached_text_embeddings(captions, retriever, run_dir / "retrieval-embeddings")
    require_query_encoder(datastore, retriever or encoder, separate=retriever is not None)
    if gap_stats is not None:  # corrects the captioning CLIP's text embeddings onto its image statistics
        gap_stats.require_encoder(encoder.name)
    torch.manual_seed(train_config.seed)  # the cross-attention, LoRA and projection initialisation
    lm, tokenizer = load_gpt2_with_cross_attention(config.lm)
    model = TOMCap(config, lm, tokenizer)
    model.set_training_noise(gap_stats)
    retrieval_cache = run_dir / RETRIEVAL_CACHE
    if config.hits_for_training and not _is_main_rank():  # rank 0 retrieves and writes the cache; the others read it
        wait_for_file(retrieval_cache)
    examples = prepare_examples(model, captions, corpus_embeds, datastore, encoder.encode_text, gap_stats=gap_stats,
                                query_embeds=query_embeds, retrieval_cache=retrieval_cache, progress=_is_main_rank(),
                                seed=train_config.seed)
    task = build_task(model, examples, eval_samples=eval_samples,
                      identity=run_identity(config, captions, datastore, gap_stats))
    result = train(task, train_config, resume=resume, stop_after=stop_after)
    bundle = None
    if result.finished and _is_main_rank():
        record = {"captions": len(captions), "datastore": str(datastore_dir), "train": train_config.to_dict(),
                  "history": result.history, "evaluations": result.evaluations}
        datastore_spec = datastore_dir if copy_datastore else Path(datastore_dir).resolve()
        bundle = write_method_bundle(
            out, name=name or Path(out).name, component=TOMCAP_COMPONENT, encoder=encoder,
            encoder_config=encoder_config, record=record,
            description=f"TOMCap trained text-only on {len(captions)} captions",
            add=lambda writer: add_to_bundle(writer, model, datastore=datastore_spec, copy_datastore=copy_datastore,
                                             gap_stats=gap_stats, retriever=retriever))
    return TOMCapRun(result=result, model=model, examples=examples, bundle=bundle)


def require_query_encoder(datastore: CaptionDatastore, queries_from: ClipEncoder, *, separate: bool) -> None:
    """Refuse a datastore embedded by another model than the one the queries come from, naming the flag that
    fixes it (the README's recipe indexes with SigLIP2 and captions with CLIP: --retrieval-encoder)."""
    if datastore.encoder_name == queries_from.name:
        return
    fix = (f"pass --retrieval-encoder {datastore.encoder_name}" if not separate
           else f"build the store with `python -m training index --retrieval-encoder {queries_from.name}`")
    raise DatastoreError(f"the datastore was embedded with {datastore.encoder_name!r} but the training queries come "
                         f"from {queries_from.name!r}: {fix} (the model that embedded the store)")


def wait_for_file(path: Path, *, timeout_s: float = CACHE_WAIT_S) -> None:
    """Block until ``path`` exists (another rank writes it atomically)."""
    deadline = time.monotonic() + timeout_s
    while not path.is_file():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path} did not appear within {timeout_s:.0f} s; did rank 0 fail?")
        time.sleep(1.0)


# --------------------------------------------------------------------------------------------
# CLI


def build_parser() -> argparse.ArgumentParser:
    parser = training_parser("python -m training tomcap", __doc__.split("\n\n")[0], corpus_max_words=0)
    data = parser.add_argument_group("datastore and gap statistics")
    data.add_argument("--datastore", required=True, help="caption datastore folder (python -m training index)")
    data.add_argument("--gap-stats", default=None,
                      help="gap statistics file (python -m training gapstats); needed unless --gap-correction none")
    data.add_argument("--reference-datastore", action="store_true",
                      help="record the datastore's absolute path in the bundle instead of copying it in (large stores)")
    model = model_group(parser, "TOMCapConfig fields (left out: the paper's setting, or --config's)")
    model.add_argument("--k", type=int, default=None, help="retrieved neighbour captions in prompt and memory")
    model.add_argument("--lora-r", type=int, default=None, help="LoRA rank")
    model.add_argument("--lora-alpha", type=float, default=None, help="LoRA alpha (scale alpha / r)")
    model.add_argument("--lora-dropout", type=float, default=None, help="dropout on the LoRA input")
    model.add_argument("--gap-correction", choices=[m.value for m in GapCorrection], default=None,
                       help="how training inputs move onto image statistics")
    model.add_argument("--input-noise-scale", type=float, default=None,
                       help="training noise on the corrected input: std = scale x sigma_I per dimension")
    model.add_argument("--query-noise-scale", type=float, default=None,
                       help="the same for the training retrieval queries (0: the clean corrected embedding)")
    model.add_argument("--noise-variance", type=float, default=None,
                       help="CapDec's noise instead (L2norm(e + n), n ~ N(0, var)): the ablation rows")
    model.add_argument("--retrieval-encoder", type=parse_encoder_spec, default=None, metavar="SPEC",
                       help="the model that embedded the datastore, when it is not --encoder (paper: SigLIP2, e.g. "
                            "ViT-B-16-SigLIP2/webli); MODEL[/PRETRAINED], a bundle or an EncoderConfig JSON file")
    model.add_argument("--target", choices=TARGETS, default=None,
                       help="training target: the nearest retrieved caption (paper) or the input caption")
    model.add_argument("--target-in-prompt", action=argparse.BooleanOptionalAction, default=None,
                       help="with target 'nearest': put the target among the prompt's neighbours (a copy task)")
    model.add_argument("--retrieval", dest="use_retrieval", action=argparse.BooleanOptionalAction, default=None,
                       help="retrieved captions in prompt and memory (--no-retrieval: the ablation)")
    model.add_argument("--beams", type=int, default=None, help="beam width at inference (every beam is a candidate)")
    model.add_argument("--select-by", choices=SELECT_BY, default=None,
                       help="the bundle's pick among the beams: 'beam' (the paper) or 'clip' (capdemo's rerank)")
    model.add_argument("--max-new-tokens", type=int, default=None, help="generation length cap")
    model.add_argument("--max-caption-tokens", type=int, default=None, help="target tokens per caption incl. EOS")
    add_optimisation(parser, DEFAULTS, eval_flag="--eval-samples",
                     eval_help="training examples decoded text-to-text at each evaluation (0: none)")
    return parser


def needs_gap_stats(config: TOMCapConfig) -> bool:
    """The correction and the sigma_I-scaled noise read the gap statistics (a separate retrieval encoder's
    queries are scaled by its own text spread instead)."""
    return (GapCorrection(config.gap_correction) is not GapCorrection.NONE or config.input_noise_scale > 0
            or config.query_noise_scale > 0 and config.retrieval_encoder is None)


def _require_gap_stats(args: argparse.Namespace, config: TOMCapConfig) -> None:
    if needs_gap_stats(config) and not args.gap_stats:
        raise SystemExit(f"error: --gap-stats is required for gap correction {config.gap_correction!r} and for noise "
                         "scaled to the image statistics (make it with `python -m training gapstats`, or pass "
                         "--gap-correction none --input-noise-scale 0 --query-noise-scale 0)")


def main(argv: list[str] | None = None) -> int:
    command = read_command(build_parser(), argv, TOMCapConfig, TOMCAP_COMPONENT, check=_require_gap_stats)
    args, config = command.args, command.config
    run = train_tomcap(
        command.captions, encoder=command.encoder, encoder_config=command.encoder_config, datastore_dir=args.datastore,
        gap_stats=GapStats.load(args.gap_stats) if needs_gap_stats(config) else None, config=config,
        train_config=command.train_config, out=args.out, embeddings_dir=args.embeddings,
        copy_datastore=not args.reference_datastore, eval_samples=args.eval_samples, resume=args.resume,
        stop_after=args.stop_after, name=args.name,
    )
    print_summary(run.bundle, run.result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
