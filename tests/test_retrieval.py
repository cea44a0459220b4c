"""The caption datastore: exact search, exclusions, exactly-K results, files, and the compressed index."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from capdemo.result import Neighbour
from capdemo.retrieval import CAPTIONS_FILE, CaptionDatastore, DatastoreError, IndexSpec

DIM = 32


def _unit(rows: np.ndarray) -> np.ndarray:
    return (rows / np.linalg.norm(rows, axis=1, keepdims=True)).astype(np.float32)


def _clustered(count: int, dim: int, *, clusters: int, spread: float, seed: int) -> np.ndarray:
    """Unit vectors scattered around ``clusters`` random unit centres: caption embeddings come in topics."""
    rng = np.random.default_rng(seed)
    centres = _unit(rng.standard_normal((clusters, dim)))
    jitter = spread * rng.standard_normal((count, dim)) / np.sqrt(dim)
    return _unit(centres[rng.integers(0, clusters, count)] + jitter)


def _brute_force(store_vectors: np.ndarray, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    scores = queries @ store_vectors.T  # (Q, N)
    ids = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(scores, ids, axis=1), ids


@pytest.fixture(scope="module")
def vectors() -> np.ndarray:
    return _clustered(2000, DIM, clusters=20, spread=0.8, seed=0)


@pytest.fixture(scope="module")
def store(vectors) -> CaptionDatastore:
    return CaptionDatastore.build(vectors, [f"caption {i}" for i in range(len(vectors))], encoder_name="fake-encoder")


@pytest.fixture(scope="module")
def compressed_pair() -> tuple[np.ndarray, CaptionDatastore, CaptionDatastore]:
    """20k x 64-d vectors indexed exactly and with a small IVF-PQ (picked by ``auto`` above a lowered threshold)."""
    vectors = _clustered(20_000, 64, clusters=200, spread=0.5, seed=1)
    captions = [f"c{i}" for i in range(len(vectors))]
    flat = CaptionDatastore.build(vectors, captions, encoder_name="fake", kind="flat")
    compressed = CaptionDatastore.build(vectors, captions, encoder_name="fake", spec=IndexSpec(flat_max_count=10_000))
    return vectors, flat, compressed


def test_flat_search_equals_brute_force(store, vectors):
    queries = _unit(np.random.default_rng(5).standard_normal((25, DIM)))
    hits = store.search(queries, 7)
    expected_scores, expected_ids = _brute_force(vectors, queries, 7)
    assert hits.ids.shape == (25, 7) and hits.ids.dtype == np.int64 and hits.scores.dtype == np.float32
    np.testing.assert_array_equal(hits.ids, expected_ids)
    np.testing.assert_allclose(hits.scores, expected_scores, atol=1e-5)
    torch_hits = store.search(torch.from_numpy(queries), 7)  # torch queries give the same answer
    np.testing.assert_array_equal(torch_hits.ids, hits.ids)


def test_build_normalises_rows(vectors):
    scaled = CaptionDatastore.build(3.0 * vectors, [str(i) for i in range(len(vectors))], encoder_name="fake")
    hits = scaled.search(vectors[:5], 1)
    np.testing.assert_array_equal(hits.ids[:, 0], np.arange(5))
    np.testing.assert_allclose(hits.scores[:, 0], 1.0, atol=1e-5)


def test_exclude_self_by_id(store, vectors):
    queries = vectors[:40]  # each query is a stored caption's own embedding
    hits = store.search(queries, 5, exclude_ids=[{i} for i in range(40)])
    assert (hits.ids >= 0).all()  # exactly 5 each
    for i in range(40):
        assert i not in hits.ids[i]
        others = np.delete(np.arange(len(vectors)), i)
        _, expected = _brute_force(vectors[others], queries[i : i + 1], 5)
        np.testing.assert_array_equal(hits.ids[i], others[expected[0]])


def test_exclude_self_by_text_with_duplicates():
    """A query whose caption is stored 30 times (the copies rank first) still gets K other, distinct captions."""
    rng = np.random.default_rng(2)
    base = _unit(rng.standard_normal((200, DIM)))
    copies = _unit(base[:1] + 1e-3 * rng.standard_normal((30, DIM)))  # near-identical embeddings of caption 0
    captions = [f"caption {i}" for i in range(200)] + ["caption 0"] * 30
    extra_pair = ["caption 1"] * 3  # caption 1 is also repeated, so dedupe has work to do
    vectors = np.concatenate([base, copies, _unit(base[1:2] + 1e-3 * rng.standard_normal((3, DIM)))])
    store = CaptionDatastore.build(vectors, captions + extra_pair, encoder_name="fake")
    for exclusion in ({"exclude_texts": ["caption 0"]}, {"exclude_ids": [{0, *range(200, 230)}]}):
        hits = store.search(base[:1], 4, dedupe=True, **exclusion)
        texts = [store.captions[i] for i in hits.ids[0]]
        assert len(texts) == 4 and "caption 0" not in texts
        assert len(set(texts)) == 4  # no repeated caption text
    without_dedupe = store.search(base[:1], 4, exclude_texts=["caption 0"])
    assert "caption 0" not in [store.captions[i] for i in without_dedupe.ids[0]]
    # per-query exclusions: None entries exclude nothing
    mixed = store.search(base[:2], 1, exclude_texts=["caption 0", None])
    assert store.captions[mixed.ids[0, 0]] != "caption 0" and mixed.ids[1, 0] == 1


def test_exactly_k_and_padding(store, vectors):
    tiny = CaptionDatastore.build(vectors[:3], ["a", "b", "c"], encoder_name="fake")
    hits = tiny.search(vectors[:1], 5)
    assert hits.ids[0, :3].tolist() == [0, *sorted([1, 2], key=lambda i: -float(vectors[0] @ vectors[i]))]
    assert hits.ids[0, 3:].tolist() == [-1, -1] and np.isneginf(hits.scores[0, 3:]).all()
    excluded = tiny.search(vectors[:1], 5, exclude_ids=[{0}])
    assert (excluded.ids[0] >= 0).sum() == 2
    expected = [Neighbour(tiny.captions[i], float(s)) for i, s in zip(excluded.ids[0, :2], excluded.scores[0, :2])]
    assert tiny.neighbours(excluded)[0] == expected
    assert (store.search(vectors[:10], 50, exclude_ids=[set(range(40))] * 10).ids >= 0).all()


def test_retrieve_returns_neighbours(store, vectors):
    neighbours = store.retrieve(vectors[3:4], 2)
    assert neighbours[0][0] == Neighbour("caption 3", pytest.approx(1.0, abs=1e-5))
    assert len(neighbours[0]) == 2 and isinstance(neighbours[0][1].score, float)


def test_build_dedupe_keeps_first(vectors):
    captions = ["a", "b", "a", "c", "b"]
    store = CaptionDatastore.build(vectors[:5], captions, encoder_name="fake", dedupe=True)
    assert list(store.captions) == ["a", "b", "c"] and len(store) == 3
    np.testing.assert_array_equal(store.search(vectors[[0, 1, 3]], 1).ids[:, 0], [0, 1, 2])  # rows 0, 1, 3 kept


@pytest.mark.parametrize("use_mmap", [True, False])
def test_save_load_round_trip_flat(store, vectors, tmp_path, use_mmap):
    store.save(tmp_path)
    loaded = CaptionDatastore.load(tmp_path, mmap=use_mmap)
    assert (len(loaded), loaded.dim, loaded.kind, loaded.encoder_name) == (2000, DIM, "flat", "fake-encoder")
    assert list(loaded.captions) == list(store.captions)
    queries = vectors[100:130]
    for kwargs in ({}, {"exclude_ids": [{100 + i} for i in range(30)], "dedupe": True}):
        before, after = store.search(queries, 6, **kwargs), loaded.search(queries, 6, **kwargs)
        np.testing.assert_array_equal(after.ids, before.ids)
        np.testing.assert_array_equal(after.scores, before.scores)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["captions.txt", "datastore.json", "index.faiss"]


def test_compressed_index_agrees_with_flat_on_near_duplicates(compressed_pair, tmp_path):
    vectors, flat, compressed = compressed_pair
    assert compressed.kind == "ivfpq" and flat.kind == "flat"
    assert compressed.spec.nlist == 20_000 // 39  # 4 sqrt(N) = 566, capped at 39 training points per list
    assert compressed.spec.pq_m == 64 // 8
    rng = np.random.default_rng(3)
    picked = rng.choice(len(vectors), 400, replace=False)
    queries = _unit(vectors[picked] + 0.05 * rng.standard_normal((400, 64)) / 8)
    flat_top1 = flat.search(queries, 1).ids[:, 0]
    compressed_top1 = compressed.search(queries, 1).ids[:, 0]
    assert (flat_top1 == picked).mean() == 1.0  # the queries really are near-duplicates
    assert (compressed_top1 == flat_top1).mean() >= 0.95
    compressed.save(tmp_path)  # and the mmap-loaded IVF index answers identically
    reloaded = CaptionDatastore.load(tmp_path, mmap=True)
    assert reloaded.nprobe == compressed.nprobe
    before, after = compressed.search(queries, 4), reloaded.search(queries, 4)
    np.testing.assert_array_equal(after.ids, before.ids)
    np.testing.assert_array_equal(after.scores, before.scores)


def test_auto_kind_and_spec_resolution():
    assert IndexSpec().resolve(199_999, 512).kind == "flat"
    big = IndexSpec().resolve(1_000_000, 512)
    assert (big.kind, big.nlist, big.pq_m) == ("ivfpq", 4000, 64)
    assert big.train_size == 64 * 4000 and 16 <= big.nprobe <= big.nlist
    assert IndexSpec(kind="ivfpq").resolve(12_000, 1024).nlist == 12_000 // 39  # k-means needs 39 points per list
    with pytest.raises(DatastoreError, match="divisor"):
        IndexSpec(kind="ivfpq", pq_m=7).resolve(50_000, 64)
    with pytest.raises(DatastoreError, match="at least"):
        IndexSpec(kind="ivfpq").resolve(5_000, 64)
    with pytest.raises(DatastoreError, match="unknown index kind"):
        IndexSpec(kind="lsh").resolve(10, 64)


def test_hnsw_sq_finds_near_duplicates(vectors, tmp_path):
    store = CaptionDatastore.build(vectors, [str(i) for i in range(len(vectors))], encoder_name="fake", kind="hnsw_sq")
    assert (store.search(vectors[:100], 1).ids[:, 0] == np.arange(100)).mean() >= 0.95
    store.save(tmp_path)
    reloaded = CaptionDatastore.load(tmp_path)
    np.testing.assert_array_equal(reloaded.search(vectors[:20], 3).ids, store.search(vectors[:20], 3).ids)


def test_bad_input_is_a_clear_error(store, vectors, tmp_path):
    with pytest.raises(DatastoreError, match="must match row for row"):
        CaptionDatastore.build(vectors[:3], ["a", "b"], encoder_name="fake")
    with pytest.raises(DatastoreError, match="line break"):
        CaptionDatastore.build(vectors[:2], ["a", "b\nc"], encoder_name="fake")
    with pytest.raises(DatastoreError, match="16-d"):
        store.search(np.zeros((1, 16), np.float32), 3)
    with pytest.raises(DatastoreError, match="exclude_ids has 1 entries for 2 queries"):
        store.search(vectors[:2], 3, exclude_ids=[{0}])
    with pytest.raises(DatastoreError, match="not a caption datastore"):
        CaptionDatastore.load(tmp_path / "nowhere")
    with pytest.raises(DatastoreError, match="embedded with 'fake-encoder'"):
        store.require_encoder("ViT-B-32/openai")
    store.save(tmp_path)
    captions_file = tmp_path / CAPTIONS_FILE
    captions_file.write_bytes(captions_file.read_bytes()[:-1])  # lose the final line end
    with pytest.raises(DatastoreError, match="truncated"):
        CaptionDatastore.load(tmp_path)
    captions_file.write_text("just one caption\n")
    with pytest.raises(DatastoreError, match="files disagree"):
        CaptionDatastore.load(tmp_path)


def test_scalar_quantizer_trains_on_a_bounded_sample():
    """hnsw_sq learns one range per dimension: a million rows, not all 16M copied to float32."""
    from capdemo.retrieval import IndexSpec

    assert IndexSpec(kind="hnsw_sq").resolve(16_000_000, 1024).train_size == 1_000_000
    assert IndexSpec(kind="hnsw_sq").resolve(500, 8).train_size == 500
    assert IndexSpec(kind="hnsw_sq", train_size=2_000).resolve(16_000_000, 8).train_size == 2_000
