"""The caption datastore: captions plus a faiss inner-product index over their CLIP embeddings.

TOMCap retrieves the K captions nearest to an embedding and puts them in the
prompt; at training time the query is itself a caption of the store, so search
can leave out the query's own entry (by id or by exact text) and repeated
captions. Embeddings are L2-normalised float32, so the inner product is the
cosine.

Index kinds (``IndexSpec.kind``; ``"auto"`` picks by size):

* ``flat``: exact ``IndexFlatIP``, ``4 * D`` bytes per caption. ``auto`` uses it
  below ``flat_max_count`` = 200k captions (410 MB at 512-d), where exact search
  stays fast on a CPU and the result is the ground truth.
* ``ivfpq``: ``IndexIVFPQ``, about ``pq_m + 8`` bytes per caption (72 B at 512-d,
  so 1.2 GB for 16M captions instead of 33 GB flat). ``nlist ~ 4 sqrt(N)``
  coarse lists, trained on a seeded sample, with polysemous training off (it
  makes training several times slower and is only used by Hamming filtering,
  which this store does not do). ``auto`` uses it from 200k captions up.
* ``hnsw_sq``: ``IndexHNSWSQ`` (8-bit scalar quantiser + HNSW graph), about
  ``D + 8 * hnsw_m`` bytes per caption: higher recall than PQ for 4-8x the
  memory. Only on request.

Files in a saved store (each written atomically, the JSON last):
``index.faiss``, ``captions.txt`` (UTF-8, one caption per line, in id order)
and ``datastore.json`` (format, encoder name, dim, count, resolved index spec).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import torch

from capdemo.fileio import atomic_output
from capdemo.caption_texts import CaptionTexts
from capdemo.index_spec import INDEX_KINDS, DatastoreError, IndexSpec, empty_index
from capdemo.result import Neighbour

DATASTORE_FORMAT = "capdemo.datastore/1"
INDEX_FILE = "index.faiss"
CAPTIONS_FILE = "captions.txt"
META_FILE = "datastore.json"

_ADD_CHUNK = 65_536  # rows converted to float32 and added to faiss at a time
# faiss read flags that memory-map the bulk of each index kind instead of reading it into RAM
# (checked on faiss 1.15: IO_FLAG_MMAP_IFC maps flat codes; IO_FLAG_MMAP maps IVF inverted lists).
_MMAP_FLAGS = {"flat": faiss.IO_FLAG_MMAP_IFC, "ivfpq": faiss.IO_FLAG_MMAP, "hnsw_sq": faiss.IO_FLAG_MMAP_IFC}


@dataclass(frozen=True)
class SearchHits:
    """Top-K results for Q queries, best first; rows with fewer than K results are padded with id -1, score -inf."""

    scores: np.ndarray  # (Q, K) float32 inner products (cosines for unit queries)
    ids: np.ndarray  # (Q, K) int64 caption ids in the store


# --------------------------------------------------------------------------------------------
# The datastore


def _as_matrix(values: torch.Tensor | np.ndarray, *, what: str) -> np.ndarray:
    """``values`` as a 2-D numpy array (any float dtype; no copy when already numpy)."""
    if isinstance(values, torch.Tensor):
        values = values.detach().cpu()
        array = (values.float() if values.dtype == torch.bfloat16 else values).numpy()  # numpy has no bfloat16
    else:
        array = np.asarray(values)
    if array.ndim != 2 or not np.issubdtype(array.dtype, np.floating):
        raise DatastoreError(f"{what} must be a 2-D float matrix, got shape {array.shape} of {array.dtype}")
    return array


def _unit_rows(rows: np.ndarray) -> np.ndarray:
    """float32, C-contiguous, each row L2-normalised (zero rows stay zero)."""
    rows = np.ascontiguousarray(rows, dtype=np.float32)
    norms = np.linalg.norm(rows, axis=1, keepdims=True)
    return rows / np.maximum(norms, np.finfo(np.float32).tiny)


def _first_occurrences(captions: Sequence[str]) -> np.ndarray:
    """Ids of the first occurrence of every distinct caption, in order."""
    seen: set[str] = set()
    keep = [i for i, caption in enumerate(captions) if not (caption in seen or seen.add(caption))]
    return np.asarray(keep, dtype=np.int64)


class CaptionDatastore:
    """Captions with a faiss index over their embeddings; build, save/load, and exclude-aware top-K search."""

    def __init__(self, index: faiss.Index, captions: Sequence[str], *, encoder_name: str, spec: IndexSpec):
        if index.ntotal != len(captions):
            raise DatastoreError(f"the index holds {index.ntotal} vectors but there are {len(captions)} captions")
        self.index = index
        self.captions = captions  # caption id -> text
        self.encoder_name = encoder_name  # the model that embedded the captions; queries must come from it too
        self.spec = spec  # resolved: concrete kind and derived parameters

    @property
    def dim(self) -> int:
        return int(self.index.d)

    @property
    def kind(self) -> str:
        return self.spec.kind

    def __len__(self) -> int:
        return len(self.captions)

    @property
    def nprobe(self) -> int | None:
        """IVF lists scanned per query (None for non-IVF kinds); settable to trade speed for recall."""
        return int(self.index.nprobe) if self.kind == "ivfpq" else None

    @nprobe.setter
    def nprobe(self, value: int) -> None:
        if self.kind != "ivfpq":
            raise DatastoreError(f"nprobe only applies to ivfpq stores, this one is {self.kind}")
        if not 1 <= value <= self.spec.nlist:
            raise DatastoreError(f"nprobe must be between 1 and nlist={self.spec.nlist}, got {value}")
        self.index.nprobe = value
        self.spec = self.spec.replace(nprobe=value)

    @classmethod
    def build(
        cls,
        embeddings: torch.Tensor | np.ndarray,
        captions: Sequence[str],
        *,
        encoder_name: str,
        kind: str | None = None,
        spec: IndexSpec | None = None,
        dedupe: bool = False,
    ) -> CaptionDatastore:
        """Index ``captions`` by their embeddings (N, D), row i embedding caption i.

        Rows are L2-normalised here (in float32 chunks, so a float16 matrix is
        fine). ``kind`` is a shortcut for ``spec.kind``. ``dedupe`` keeps only
        the first occurrence of each exact caption text, so ids then count the
        kept captions.
        """
        vectors = _as_matrix(embeddings, what="caption embeddings")  # (N, D)
        if len(vectors) != len(captions):
            raise DatastoreError(f"{len(vectors)} embeddings for {len(captions)} captions; they must match row for row")
        if len(captions) == 0:
            raise DatastoreError("cannot build a datastore from zero captions")
        if not encoder_name:
            raise DatastoreError("encoder_name is required: it is how queries are checked against the store")
        if dedupe:
            keep = _first_occurrences(captions)
            if len(keep) < len(captions):
                vectors, captions = vectors[keep], [captions[i] for i in keep]
        texts = CaptionTexts.from_list(captions)
        spec = (spec or IndexSpec()).replace(**({"kind": kind} if kind else {}))
        spec = spec.resolve(len(vectors), vectors.shape[1])
        index = empty_index(spec, vectors.shape[1])
        if spec.train_size is not None:
            rng = np.random.default_rng(spec.seed)
            sample = np.sort(rng.choice(len(vectors), spec.train_size, replace=False))
            index.train(_unit_rows(vectors[sample]))
        for start in range(0, len(vectors), _ADD_CHUNK):
            index.add(_unit_rows(vectors[start : start + _ADD_CHUNK]))
        return cls(index, texts, encoder_name=encoder_name, spec=spec)

    # ----------------------------------------------------------------------------------------
    # Files

    def meta(self) -> dict[str, Any]:
        return {
            "format": DATASTORE_FORMAT,
            "encoder_name": self.encoder_name,
            "dim": self.dim,
            "count": len(self),
            "index": self.spec.to_dict(),
        }

    def save(self, directory: str | Path) -> Path:
        """Write the three files into ``directory``, each atomically, the JSON (which load checks first) last."""
        directory = Path(directory)
        with atomic_output(directory / INDEX_FILE) as tmp:
            faiss.write_index(self.index, str(tmp))
        texts = self.captions if isinstance(self.captions, CaptionTexts) else CaptionTexts.from_list(self.captions)
        texts.write(directory / CAPTIONS_FILE)
        with atomic_output(directory / META_FILE) as tmp:
            tmp.write_text(json.dumps(self.meta(), indent=2) + "\n")
        return directory

    @classmethod
    def load(cls, directory: str | Path, *, mmap: bool = True) -> CaptionDatastore:
        """Open a saved store; ``mmap`` maps the index's vectors/codes and the captions instead of reading them."""
        directory = Path(directory)
        meta_path = directory / META_FILE
        if not meta_path.is_file():
            raise DatastoreError(f"{directory}: not a caption datastore ({META_FILE} missing)")
        meta = json.loads(meta_path.read_text())
        if meta.get("format") != DATASTORE_FORMAT:
            raise DatastoreError(f"{meta_path}: format {meta.get('format')!r} is not {DATASTORE_FORMAT!r}")
        spec = IndexSpec.from_dict(meta["index"])
        if spec.kind not in INDEX_KINDS:
            raise DatastoreError(f"{meta_path}: unknown index kind {spec.kind!r}")
        flags = _MMAP_FLAGS[spec.kind] if mmap else 0
        index = faiss.read_index(str(directory / INDEX_FILE), flags)
        captions = CaptionTexts.open(directory / CAPTIONS_FILE, use_mmap=mmap)
        if (index.ntotal, index.d, len(captions)) != (meta["count"], meta["dim"], meta["count"]):
            raise DatastoreError(
                f"{directory}: files disagree: {META_FILE} says {meta['count']} x {meta['dim']}, "
                f"index has {index.ntotal} x {index.d}, {CAPTIONS_FILE} has {len(captions)} lines"
            )
        store = cls(index, captions, encoder_name=meta["encoder_name"], spec=spec)
        if spec.kind == "ivfpq":
            store.nprobe = spec.nprobe
        elif spec.kind == "hnsw_sq":
            index.hnsw.efSearch = spec.hnsw_ef_search
        return store

    def require_encoder(self, encoder_name: str) -> None:
        """Refuse queries from a different model than the one that embedded the captions."""
        if encoder_name != self.encoder_name:
            raise DatastoreError(
                f"the datastore was embedded with {self.encoder_name!r} but the queries come from {encoder_name!r}; "
                "rebuild it with `python -m training index` for this encoder"
            )

    # ----------------------------------------------------------------------------------------
    # Search

    def search(
        self,
        queries: torch.Tensor | np.ndarray,
        k: int,
        *,
        exclude_ids: Sequence[set[int] | None] | None = None,
        exclude_texts: Sequence[str | None] | None = None,
        dedupe: bool = False,
    ) -> SearchHits:
        """Top-``k`` captions by inner product for each query row (Q, D).

        ``exclude_ids[q]`` / ``exclude_texts[q]`` drop those ids / every caption
        equal to that text from query q's results (a training query's own
        caption); ``dedupe`` keeps only the best-scoring of equal caption texts.
        Filtering over-fetches and widens the search until ``k`` results remain
        or the index has no more, so ``k`` come back whenever the store (and,
        for IVF, the probed lists) hold that many.
        """
        matrix = _as_matrix(queries, what="queries")
        if matrix.shape[1] != self.dim:
            raise DatastoreError(f"queries are {matrix.shape[1]}-d but the datastore is {self.dim}-d")
        if k < 1:
            raise DatastoreError(f"k must be >= 1, got {k}")
        matrix = np.ascontiguousarray(matrix, dtype=np.float32)
        num_queries = len(matrix)
        for name, values in (("exclude_ids", exclude_ids), ("exclude_texts", exclude_texts)):
            if values is not None and len(values) != num_queries:
                raise DatastoreError(f"{name} has {len(values)} entries for {num_queries} queries")
        if exclude_ids is None and exclude_texts is None and not dedupe:
            scores, ids = self._raw_search(matrix, min(k, len(self)))
            return _pad_hits(scores, ids, k)

        scores = np.full((num_queries, k), -np.inf, dtype=np.float32)
        ids = np.full((num_queries, k), -1, dtype=np.int64)
        most_excluded = max((len(s) for s in exclude_ids or () if s), default=0)
        fetch = min(len(self), 2 * k + most_excluded + (exclude_texts is not None))
        pending = np.arange(num_queries)
        while pending.size:
            raw_scores, raw_ids = self._raw_search(matrix[pending], fetch)  # (P, fetch) each
            unfinished = []
            for row, query in enumerate(pending):
                kept = self._filter(
                    raw_scores[row],
                    raw_ids[row],
                    k=k,
                    excluded=(exclude_ids[query] if exclude_ids is not None else None) or set(),
                    excluded_text=exclude_texts[query] if exclude_texts is not None else None,
                    dedupe=dedupe,
                )
                exhausted = fetch >= len(self) or raw_ids[row, -1] < 0
                if len(kept) < k and not exhausted:
                    unfinished.append(query)
                    continue
                for rank, (caption_id, score) in enumerate(kept):
                    ids[query, rank], scores[query, rank] = caption_id, score
            pending = np.asarray(unfinished, dtype=np.int64)
            fetch = min(len(self), 2 * fetch)
        return SearchHits(scores=scores, ids=ids)

    def _raw_search(self, matrix: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """faiss search; HNSW's search breadth is raised to ``k`` when it is below (it bounds the results)."""
        if self.kind == "hnsw_sq" and self.index.hnsw.efSearch < k:
            return self.index.search(matrix, k, params=faiss.SearchParametersHNSW(efSearch=k))
        return self.index.search(matrix, k)

    def _filter(
        self,
        scores: np.ndarray,
        ids: np.ndarray,
        *,
        k: int,
        excluded: set[int],
        excluded_text: str | None,
        dedupe: bool,
    ) -> list[tuple[int, float]]:
        """The first ``k`` of one query's ranked candidates that pass the exclusions."""
        kept: list[tuple[int, float]] = []
        seen_texts: set[str] = set()
        for caption_id, score in zip(ids.tolist(), scores.tolist()):
            if caption_id < 0:
                break
            if caption_id in excluded:
                continue
            if excluded_text is not None or dedupe:
                text = self.captions[caption_id]
                if text == excluded_text or text in seen_texts:
                    continue
                if dedupe:
                    seen_texts.add(text)
            kept.append((caption_id, score))
            if len(kept) == k:
                break
        return kept

    def neighbours(self, hits: SearchHits) -> list[list[Neighbour]]:
        """The hits as ``Neighbour(text, score)`` lists, one per query (padding dropped)."""
        return [
            [Neighbour(self.captions[i], float(s)) for i, s in zip(row_ids.tolist(), row_scores.tolist()) if i >= 0]
            for row_ids, row_scores in zip(hits.ids, hits.scores)
        ]

    def retrieve(self, queries: torch.Tensor | np.ndarray, k: int, **exclusions: Any) -> list[list[Neighbour]]:
        """``neighbours(search(queries, k, **exclusions))``: what the captioning pipeline shows."""
        return self.neighbours(self.search(queries, k, **exclusions))


def _pad_hits(scores: np.ndarray, ids: np.ndarray, k: int) -> SearchHits:
    """Hits with exactly ``k`` columns; faiss's -1 ids (no result) get score -inf."""
    padded_scores = np.full((len(ids), k), -np.inf, dtype=np.float32)
    padded_ids = np.full((len(ids), k), -1, dtype=np.int64)
    padded_scores[:, : scores.shape[1]], padded_ids[:, : ids.shape[1]] = scores, ids
    padded_scores[padded_ids < 0] = -np.inf
    return SearchHits(scores=padded_scores, ids=padded_ids)
