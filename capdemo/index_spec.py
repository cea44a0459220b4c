"""Which faiss index a caption datastore builds, and how its size-dependent settings are derived.

See :mod:`capdemo.retrieval` for what each kind costs and when ``"auto"`` picks it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import faiss

from capdemo.config import Config

INDEX_KINDS = ("flat", "ivfpq", "hnsw_sq")
_MIN_TRAIN_PER_CENTROID = 39  # below this faiss k-means warns; PQ needs 256 centroids per sub-quantizer
_PQ_BITS = 8  # bits per PQ code: 256 centroids per sub-quantizer, one byte each
# rows sampled to train the 8-bit scalar quantizer, which learns one range per dimension: a million pin those
# down, and training on all 16M rows would copy them to float32 (~65 GB at 1024 dims)
_SQ_TRAIN_MAX = 1_000_000


class DatastoreError(ValueError):
    """A datastore that cannot be built, loaded or searched as asked."""


@dataclass
class IndexSpec(Config):
    """Which faiss index to build and how; ``None`` fields are derived from the store size (see ``resolve``)."""

    kind: str = "auto"  # "auto" | "flat" | "ivfpq" | "hnsw_sq"; auto: flat below flat_max_count, else ivfpq
    flat_max_count: int = 200_000  # auto's threshold: exact search for fewer captions than this
    nlist: int | None = None  # IVF coarse lists; None: round(4 * sqrt(N)), at most N // 39 (k-means needs 39 per list)
    pq_m: int | None = None  # PQ sub-quantizers = bytes per code; must divide D; None: D // 8 (64 at 512-d)
    # vectors sampled to train IVF-PQ / SQ; None: min(N, 64 * nlist) (>= 39 per centroid) / min(N, 1M)
    train_size: int | None = None
    nprobe: int | None = None  # IVF lists scanned per query; None: clamp(nlist // 16, 16, 256)
    hnsw_m: int = 32  # HNSW neighbours per node (hnsw_sq)
    hnsw_ef_search: int = 64  # HNSW search breadth (hnsw_sq); must be >= the k searched for
    seed: int = 0  # seeds the training sample and faiss k-means

    def resolve(self, count: int, dim: int) -> IndexSpec:
        """A copy with ``kind`` concrete and every derived field filled in for ``count`` x ``dim`` vectors."""
        kind = self.kind
        if kind == "auto":
            kind = "flat" if count < self.flat_max_count else "ivfpq"
        if kind not in INDEX_KINDS:
            raise DatastoreError(f"unknown index kind {self.kind!r}; expected auto or one of {', '.join(INDEX_KINDS)}")
        if kind == "flat":
            return self.replace(kind=kind, nlist=None, pq_m=None, train_size=None, nprobe=None)
        if kind == "hnsw_sq":
            train_size = min(count, self.train_size or _SQ_TRAIN_MAX)
            return self.replace(kind=kind, nlist=None, pq_m=None, nprobe=None, train_size=train_size)
        if count < _MIN_TRAIN_PER_CENTROID * 2**_PQ_BITS:
            raise DatastoreError(
                f"ivfpq needs at least {_MIN_TRAIN_PER_CENTROID * 2**_PQ_BITS} captions to train its PQ codebooks, "
                f"got {count}; use kind='flat'"
            )
        nlist = self.nlist or max(1, min(round(4 * math.sqrt(count)), count // _MIN_TRAIN_PER_CENTROID))
        if count < _MIN_TRAIN_PER_CENTROID * nlist:
            needed = _MIN_TRAIN_PER_CENTROID * nlist
            raise DatastoreError(f"nlist={nlist} needs at least {needed} captions to train, got {count}")
        pq_m = self.pq_m or dim // 8
        if pq_m < 1 or dim % pq_m:
            raise DatastoreError(f"pq_m={pq_m} must be a positive divisor of the embedding dim {dim}; set pq_m")
        min_train = _MIN_TRAIN_PER_CENTROID * max(nlist, 2**_PQ_BITS)
        train_size = min(count, max(self.train_size or 64 * nlist, min_train))
        nprobe = min(nlist, self.nprobe or min(max(nlist // 16, 16), 256))
        return self.replace(kind=kind, nlist=nlist, pq_m=pq_m, train_size=train_size, nprobe=nprobe)


def empty_index(spec: IndexSpec, dim: int) -> faiss.Index:
    """An untrained, empty faiss index of the resolved ``spec`` for ``dim``-d vectors (inner product)."""
    if spec.kind == "flat":
        return faiss.IndexFlatIP(dim)
    if spec.kind == "hnsw_sq":
        index = faiss.IndexHNSWSQ(dim, faiss.ScalarQuantizer.QT_8bit, spec.hnsw_m, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efSearch = spec.hnsw_ef_search
        return index
    quantizer = faiss.IndexFlatIP(dim)
    index = faiss.IndexIVFPQ(quantizer, dim, spec.nlist, spec.pq_m, _PQ_BITS, faiss.METRIC_INNER_PRODUCT)
    index.do_polysemous_training = False
    index.cp.seed = spec.seed  # coarse k-means
    index.pq.cp.seed = spec.seed  # product-quantizer k-means
    index.nprobe = spec.nprobe
    return index


__all__ = ["INDEX_KINDS", "DatastoreError", "IndexSpec", "empty_index"]
