"""Caption datastore benchmark: exact flat vs compressed IVF-PQ; prints ONE JSON object.

    OMP_WAIT_POLICY=PASSIVE python -m benchmarks.datastore [--quick]

Sizes: 100k and 1M random-but-clustered 512-d unit vectors (5 GB peak RAM);
``--quick`` uses 20k and 100k. IVF-PQ training dominates the run time: on a
shared 2-core machine under heavy load (load average ~7) the full run took 18
min and ``--quick`` 3 min; expect roughly a third of that on 2 idle cores. Set
OMP_WAIT_POLICY=PASSIVE: with faiss's default busy-waiting OpenMP threads,
IVF-PQ training on a shared or loaded machine runs several times slower.

Per size and index kind it reports build time, memory (index file bytes, RSS
growth after the build, RSS growth when the saved store is loaded with mmap),
search latency per query at batch 1 and batch 32, recall@4 against the exact
flat index on fresh queries drawn from the same clusters, and top-1 agreement
with flat on near-duplicate queries (stored vectors + small noise, the TOMCap
training case). ``projection_16m`` extrapolates to 16M captions (see
``project`` for the assumptions). Importable: ``run(quick) -> dict``.

Reading the numbers: in 512-d, the members of a synthetic cluster are almost
equidistant from a query, so any compressed index reaches only about 0.5
recall@4 here and nprobe hardly changes it; the near-duplicate agreement is
the figure that matters for TOMCap training, and recall on real caption
embeddings has to be measured on them. Latencies on a shared 2-core machine
are noisy (2-5x between idle and loaded).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import tempfile
import time
from typing import Any

import faiss
import numpy as np
import psutil

from capdemo.retrieval import CaptionDatastore, IndexSpec

DIM = 512
SIZES = (100_000, 1_000_000)
QUICK_SIZES = (20_000, 100_000)
CAPTIONS_PER_CLUSTER = 100  # mean cluster size: topics of near-paraphrase captions
CLUSTER_SPREAD = 0.6  # jitter norm around a cluster centre (unit centres)
NEAR_DUPLICATE_NOISE = 0.05  # query jitter norm for near-duplicate queries
NUM_QUERIES = 256  # recall / agreement queries
LATENCY_SINGLE = 64  # batch-1 searches timed
LATENCY_BATCHES = 8  # batch-32 searches timed
K = 4  # TOMCap's number of retrieved captions
TARGET_COUNT = 16_000_000  # the paper's datastore size
SEED = 0


def clustered_unit_vectors(count: int, dim: int, *, seed: int, centres: np.ndarray | None = None) -> np.ndarray:
    """Unit vectors around random unit centres (count // CAPTIONS_PER_CLUSTER of them unless given)."""
    rng = np.random.default_rng(seed)
    if centres is None:
        centres = rng.standard_normal((max(1, count // CAPTIONS_PER_CLUSTER), dim)).astype(np.float32)
        centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    out = np.empty((count, dim), dtype=np.float32)
    for start in range(0, count, 65_536):  # chunked: float64 temporaries of 1M x 512 would need 4 GB
        rows = min(65_536, count - start)
        jitter = rng.standard_normal((rows, dim), dtype=np.float32) * (CLUSTER_SPREAD / math.sqrt(dim))
        chunk = centres[rng.integers(0, len(centres), rows)] + jitter
        out[start : start + rows] = chunk / np.linalg.norm(chunk, axis=1, keepdims=True)
    return out


def _rss() -> int:
    return psutil.Process().memory_info().rss


def _latency_ms(store: CaptionDatastore, queries: np.ndarray) -> dict[str, float]:
    started = time.perf_counter()
    for row in range(LATENCY_SINGLE):
        store.search(queries[row : row + 1], K)
    single = (time.perf_counter() - started) / LATENCY_SINGLE
    started = time.perf_counter()
    for batch in range(LATENCY_BATCHES):
        store.search(queries[batch * 32 : (batch + 1) * 32], K)
    batched = (time.perf_counter() - started) / (LATENCY_BATCHES * 32)
    return {"batch1_ms_per_query": round(1e3 * single, 3), "batch32_ms_per_query": round(1e3 * batched, 3)}


def _recall(ids: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean([len(set(row) & set(true_row)) / truth.shape[1] for row, true_row in zip(ids, truth)]))


def _measure(
    vectors: np.ndarray,
    captions: list[str],
    kind: str,
    queries: dict[str, np.ndarray],
    truth: dict[str, np.ndarray] | None,
) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Build, save, mmap-load and query one index kind; ``truth`` (flat results) None for flat itself."""
    rss_before = _rss()
    started = time.perf_counter()
    store = CaptionDatastore.build(vectors, captions, encoder_name="synthetic", spec=IndexSpec(kind=kind, seed=SEED))
    build_s = time.perf_counter() - started
    rss_build = _rss() - rss_before
    with tempfile.TemporaryDirectory() as directory:
        store.save(directory)
        index_bytes = os.path.getsize(os.path.join(directory, "index.faiss"))
        captions_bytes = os.path.getsize(os.path.join(directory, "captions.txt"))
        del store
        rss_before = _rss()
        store = CaptionDatastore.load(directory, mmap=True)
        rss_load = _rss() - rss_before
        hits = {name: store.search(q, K).ids for name, q in queries.items()}
        result: dict[str, Any] = {
            "spec": store.spec.to_dict(),
            "build_s": round(build_s, 2),
            "index_bytes": index_bytes,
            "captions_bytes": captions_bytes,
            "rss_delta_build_mb": round(rss_build / 2**20, 1),
            "rss_delta_mmap_load_mb": round(rss_load / 2**20, 1),
            **_latency_ms(store, queries["fresh"]),
        }
        if truth is not None:
            result["recall_at_4"] = round(_recall(hits["fresh"], truth["fresh"]), 4)
            agreement = np.mean(hits["near"][:, 0] == truth["near"][:, 0])
            result["near_duplicate_top1_agreement"] = round(float(agreement), 4)
        if store.nprobe is not None:
            result["nprobe_sweep"] = _nprobe_sweep(store, queries["fresh"], truth["fresh"])
        del store
    return result, hits


def _nprobe_sweep(store: CaptionDatastore, queries: np.ndarray, truth: np.ndarray) -> dict[str, dict[str, float]]:
    default, sweep = store.nprobe, {}
    for nprobe in sorted({max(1, default // 4), max(1, default // 2), default, min(2 * default, store.spec.nlist)}):
        store.nprobe = nprobe
        started = time.perf_counter()
        ids = store.search(queries, K).ids
        per_query_ms = 1e3 * (time.perf_counter() - started) / len(queries)
        sweep[str(nprobe)] = {
            "recall_at_4": round(_recall(ids, truth), 4),
            f"batch{len(queries)}_ms_per_query": round(per_query_ms, 3),
        }
    store.nprobe = default
    return sweep


def _measure_size(count: int) -> dict[str, Any]:
    vectors = clustered_unit_vectors(count, DIM, seed=SEED)
    captions = [f"synthetic caption {i}" for i in range(count)]
    rng = np.random.default_rng(SEED + 1)
    picked = rng.choice(count, NUM_QUERIES, replace=False)
    jitter = rng.standard_normal((NUM_QUERIES, DIM), dtype=np.float32) * (NEAR_DUPLICATE_NOISE / math.sqrt(DIM))
    near = vectors[picked] + jitter
    queries = {
        "fresh": clustered_unit_vectors(NUM_QUERIES, DIM, seed=SEED + 2, centres=_centres_of(vectors, rng)),
        "near": (near / np.linalg.norm(near, axis=1, keepdims=True)).astype(np.float32),
    }
    flat, truth = _measure(vectors, captions, "flat", queries, None)
    flat["near_duplicate_self_hit"] = round(float(np.mean(truth["near"][:, 0] == picked)), 4)
    compressed, _ = _measure(vectors, captions, "ivfpq", queries, truth)
    return {"count": count, "dim": DIM, "flat": flat, "ivfpq": compressed}


def _centres_of(vectors: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Stored vectors used as centres for fresh queries, so queries land in populated regions."""
    return vectors[rng.choice(len(vectors), NUM_QUERIES, replace=False)]


def project(largest: dict[str, Any], target: int = TARGET_COUNT) -> dict[str, Any]:
    """Extrapolate the largest measured size to ``target`` captions.

    Assumptions: memory is linear in N (flat: 4*D bytes per vector; IVF-PQ:
    the measured bytes per vector beyond its fixed centroid and codebook
    tables, whose size uses the nlist the default spec picks at ``target``);
    flat search is a full scan, so its latency is linear in N; IVF-PQ search
    time is proportional to the codes scanned, N * nprobe / nlist, with the
    default nprobe/nlist at each size; caption text grows linearly. Recall at
    16M is not projected: it depends on the real data, measure it there.
    """
    count, scale = largest["count"], target / largest["count"]
    flat, compressed = largest["flat"], largest["ivfpq"]
    measured_spec = IndexSpec.from_dict(compressed["spec"])
    target_spec = IndexSpec(kind="ivfpq").resolve(target, DIM)
    fixed = lambda spec: 4 * DIM * (spec.nlist + 2**8)  # noqa: E731  coarse centroids + PQ codebooks, float32
    per_vector = (compressed["index_bytes"] - fixed(measured_spec)) / count
    scanned = lambda spec, n: n * spec.nprobe / spec.nlist  # noqa: E731
    scan_ratio = scanned(target_spec, target) / scanned(measured_spec, count)
    return {
        "count": target,
        "from_count": count,
        "captions_gb": round(flat["captions_bytes"] * scale / 1e9, 2),
        "flat": {
            "index_gb": round(flat["index_bytes"] * scale / 1e9, 2),
            "batch1_ms_per_query": round(flat["batch1_ms_per_query"] * scale, 1),
            "batch32_ms_per_query": round(flat["batch32_ms_per_query"] * scale, 1),
        },
        "ivfpq": {
            "spec": target_spec.to_dict(),
            "bytes_per_vector": round(per_vector, 1),
            "index_gb": round((fixed(target_spec) + per_vector * target) / 1e9, 2),
            "batch1_ms_per_query": round(compressed["batch1_ms_per_query"] * scan_ratio, 2),
            "batch32_ms_per_query": round(compressed["batch32_ms_per_query"] * scan_ratio, 2),
        },
        "assumptions": " ".join(project.__doc__.split("\n\n")[1].split()),
    }


def run(quick: bool = False) -> dict[str, Any]:
    """Measure both sizes (``quick``: the small pair) and project to 16M captions."""
    sizes = QUICK_SIZES if quick else SIZES
    results = [_measure_size(count) for count in sizes]
    return {
        "benchmark": "datastore",
        "quick": quick,
        "faiss": faiss.__version__,
        "omp_threads": faiss.omp_get_max_threads(),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "(unset)"),
        "k": K,
        "sizes": results,
        "projection_16m": project(results[-1]),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.datastore", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="20k and 100k vectors instead of 100k and 1M (~1-2 min)")
    args = parser.parse_args(argv)
    print(json.dumps(run(quick=args.quick), indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
