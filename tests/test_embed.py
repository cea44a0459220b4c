"""The embedding cache and the index builder: resumable after a kill, byte for byte, and refusing stale caches."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch

from capdemo.retrieval import CaptionDatastore
from training.embed import MANIFEST_FILE, EmbeddingCache, StaleCacheError, embed_corpus
from training.index import build_datastore, default_embeddings_dir

REPO_ROOT = Path(__file__).resolve().parents[1]
DIM = 24
SHARD_SIZE = 16
BATCH_SIZE = 5
RUN = {"encoder_name": "bow", "shard_size": SHARD_SIZE, "batch_size": BATCH_SIZE, "progress": False}
COLOURS = ["red", "blue", "green", "white", "black", "brown", "yellow"]
THINGS = ["dog", "cat", "bus", "kite", "horse", "pizza", "boat", "train"]
PLACES = ["on a beach", "in a field", "on a street", "near a lake", "in a kitchen"]
CORPUS = [f"a {c} {t} {p}" for c in COLOURS for t in THINGS for p in PLACES][:100]  # 100 captions -> 7 shards


def hashed_bag_of_words(texts: list[str]) -> np.ndarray:
    """A stand-in text encoder: each word adds +-1 to a crc32-chosen dimension; rows L2-normalised."""
    out = np.zeros((len(texts), DIM), dtype=np.float32)
    for row, text in enumerate(texts):
        for word in text.split():
            code = zlib.crc32(word.encode())
            out[row, code % DIM] += 1.0 if code & 1 << 20 else -1.0
    return out / np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)


class Interrupted(RuntimeError):
    pass


class CountingEmbedder:
    """The fake encoder that counts the captions it embeds and can die after ``fail_after`` calls."""

    def __init__(self, fail_after: int | None = None):
        self.calls, self.captions, self.fail_after = 0, 0, fail_after

    def __call__(self, texts: list[str]) -> torch.Tensor:
        if self.fail_after is not None and self.calls == self.fail_after:
            raise Interrupted("simulated kill")
        self.calls += 1
        self.captions += len(texts)
        return torch.from_numpy(hashed_bag_of_words(texts))


def _files(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> Path:
    """The reference: the whole pipeline in one go."""
    out = tmp_path_factory.mktemp("reference") / "store"
    build_datastore(CORPUS, CountingEmbedder(), out, **RUN)
    return out


def test_cache_holds_float16_rows_in_corpus_order(tmp_path):
    cache = embed_corpus(CORPUS, CountingEmbedder(), tmp_path, **RUN)
    assert (cache.count, cache.dim, len(cache.shard_paths)) == (100, DIM, 7)
    assert cache.shard(6).shape == (100 - 6 * SHARD_SIZE, DIM) and cache.shard(0).dtype == torch.float16
    expected = torch.from_numpy(hashed_bag_of_words(CORPUS)).half().float()
    assert torch.equal(cache.tensor(), expected)
    assert cache.tensor(torch.float16).dtype == torch.float16
    manifest = json.loads((tmp_path / MANIFEST_FILE).read_text())
    assert manifest["complete"] and manifest["encoder_name"] == "bow" and manifest["shard_size"] == SHARD_SIZE
    assert [s["start"] for s in manifest["shards"]] == list(range(0, 100, SHARD_SIZE))


def test_embedding_resumes_after_an_exception(tmp_path, uninterrupted):
    dying = CountingEmbedder(fail_after=10)  # 4 calls (5+5+5+1 captions) per shard: shards 0-1 done, shard 2 half done
    with pytest.raises(Interrupted):
        embed_corpus(CORPUS, dying, tmp_path, **RUN)
    shards = [f"shard-{i:05d}.safetensors" for i in range(2)]
    assert sorted(p.name for p in tmp_path.iterdir()) == [MANIFEST_FILE, *shards]
    with pytest.raises(StaleCacheError, match="did not finish"):
        EmbeddingCache.load(tmp_path)
    resumed = CountingEmbedder()
    cache = embed_corpus(CORPUS, resumed, tmp_path, **RUN)
    assert resumed.captions == 100 - 2 * SHARD_SIZE  # only the missing shards were embedded
    assert _files(tmp_path) == _files(default_embeddings_dir(uninterrupted))  # shards and manifest, byte for byte
    assert torch.equal(cache.tensor(), EmbeddingCache.load(default_embeddings_dir(uninterrupted)).tensor())


def test_index_build_resumes_after_an_exception(tmp_path, uninterrupted):
    out = tmp_path / "store"
    with pytest.raises(Interrupted):
        build_datastore(CORPUS, CountingEmbedder(fail_after=7), out, **RUN)
    assert not out.exists()
    build_datastore(CORPUS, CountingEmbedder(), out, **RUN)
    assert _files(out) == _files(uninterrupted)
    _assert_same_search(out, uninterrupted)


def test_index_build_resumes_after_sigkill(tmp_path, uninterrupted):
    """A real SIGKILL in the middle of a shard: the resumed run writes the same datastore."""
    out = tmp_path / "store"
    script = textwrap.dedent(
        f"""
        import os, signal, sys
        sys.path.insert(0, {str(REPO_ROOT)!r})
        from tests.test_embed import CORPUS, RUN, CountingEmbedder
        from training.index import build_datastore

        class Killer(CountingEmbedder):
            def __call__(self, texts):
                if self.calls == 14:  # 4 calls per shard: shards 0-2 written, shard 3 half embedded
                    os.kill(os.getpid(), signal.SIGKILL)
                return super().__call__(texts)

        build_datastore(CORPUS, Killer(), {str(out)!r}, **RUN)
        """
    )
    killed = subprocess.run([sys.executable, "-c", script], cwd=REPO_ROOT, capture_output=True, timeout=120)
    assert killed.returncode == -signal.SIGKILL, killed.stderr.decode()[-2000:]
    cache_dir = default_embeddings_dir(out)
    assert len(list(cache_dir.glob("shard-*.safetensors"))) == 3
    resumed = CountingEmbedder()
    build_datastore(CORPUS, resumed, out, **RUN)
    assert resumed.captions == 100 - 3 * SHARD_SIZE
    assert _files(out) == _files(uninterrupted)
    assert _files(cache_dir) == _files(default_embeddings_dir(uninterrupted))
    _assert_same_search(out, uninterrupted)


def _assert_same_search(store_dir: Path, reference_dir: Path) -> None:
    queries = hashed_bag_of_words(["a red dog on a beach", "a boat near a lake", "pizza in a kitchen"])
    got = CaptionDatastore.load(store_dir).search(queries, 4, exclude_texts=["a red dog on a beach", None, None])
    want = CaptionDatastore.load(reference_dir).search(queries, 4, exclude_texts=["a red dog on a beach", None, None])
    np.testing.assert_array_equal(got.ids, want.ids)
    np.testing.assert_array_equal(got.scores, want.scores)


def test_a_changed_corpus_or_encoder_is_refused(tmp_path):
    embed_corpus(CORPUS, CountingEmbedder(), tmp_path, **RUN)
    changed = CORPUS[:-1] + ["a purple giraffe in a zoo"]
    with pytest.raises(StaleCacheError, match="another corpus") as err:
        EmbeddingCache.load(tmp_path, captions=changed)
    assert "\n" not in str(err.value) and "--overwrite" in str(err.value)
    with pytest.raises(StaleCacheError, match="made with 'bow', not 'clip'"):
        EmbeddingCache.load(tmp_path, captions=CORPUS, encoder_name="clip")
    with pytest.raises(StaleCacheError, match="pass --overwrite"):
        embed_corpus(changed, CountingEmbedder(), tmp_path, **RUN)
    fresh = CountingEmbedder()
    cache = embed_corpus(changed, fresh, tmp_path, **RUN, overwrite=True)
    assert fresh.captions == 100
    assert torch.equal(cache.tensor(), torch.from_numpy(hashed_bag_of_words(changed)).half().float())
    EmbeddingCache.load(tmp_path, captions=changed, encoder_name="bow")  # now valid


def test_a_damaged_shard_is_embedded_again(tmp_path):
    embed_corpus(CORPUS, CountingEmbedder(), tmp_path, **RUN)
    reference = EmbeddingCache.load(tmp_path).tensor()
    (tmp_path / "shard-00002.safetensors").write_bytes(b"not a safetensors file")
    (tmp_path / ".shard-00003.safetensors.123-abcd.tmp").write_bytes(b"leftover of a killed write")
    (tmp_path / ".tmpAb12Cd").write_bytes(b"safetensors' own temp file, left by a kill inside save_file")
    again = CountingEmbedder()
    cache = embed_corpus(CORPUS, again, tmp_path, **RUN)
    assert again.captions == SHARD_SIZE
    assert torch.equal(cache.tensor(), reference)
    assert not list(tmp_path.glob(".*.tmp")) and not list(tmp_path.glob(".tmp*"))
    (tmp_path / "shard-00004.safetensors").unlink()
    with pytest.raises(StaleCacheError, match="shard-00004.safetensors is missing"):
        EmbeddingCache.load(tmp_path)


def test_bad_embedder_output_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match=r"shape \(3, 24\) for 5 texts"):
        embed_corpus(CORPUS, lambda texts: np.zeros((3, DIM)), tmp_path, **RUN)
    with pytest.raises(ValueError, match="empty corpus"):
        embed_corpus([], CountingEmbedder(), tmp_path, encoder_name="bow")


def test_index_command_end_to_end_with_a_tiny_clip(tmp_path):
    """``python -m training index`` (as the lead's dispatcher calls it) on a random tiny CLIP, offline."""
    from capdemo.testing import tiny_encoder_config
    from training import index

    config_file = tmp_path / "tiny.json"
    tiny_encoder_config().save_json(config_file)
    corpus_file = tmp_path / "corpus.txt"
    too_long = " ".join(["word"] * 16)
    corpus_file.write_text("\n".join(CORPUS[:30] + [CORPUS[0], "   ", too_long]))
    out = tmp_path / "store"
    argv = ["--corpus", str(corpus_file), "--encoder", str(config_file), "--out", str(out), "--device", "cpu",
            "--max-words", "15", "--dedupe"]  # a datastore keeps every caption by default; filter and dedupe asked
    assert index.main([*argv, "--shard-size", "8"]) == 0
    store = CaptionDatastore.load(out)
    assert len(store) == 30 and list(store.captions) == CORPUS[:30]  # blank, repeated and >15-word lines dropped
    assert store.kind == "flat" and store.dim == 32 and store.encoder_name == "capdemo-tiny-test"
    cache = EmbeddingCache.load(default_embeddings_dir(out), captions=CORPUS[:30], encoder_name="capdemo-tiny-test")
    assert len(cache.shard_paths) == 4
    hits = store.search(cache.tensor()[:5], 1)
    np.testing.assert_array_equal(hits.ids[:, 0], np.arange(5))  # each caption finds itself


def test_caption_length_filter_defaults_per_command():
    """The MacCap paper drops captions over 15 words; a datastore, its gap statistics and TOMCap keep them all."""
    from training import gapstats, index, maccap, tomcap

    required = ["--corpus", "c.txt", "--encoder", "ViT-B-32", "--out", "o", "--images", "i", "--datastore", "d"]
    defaults = {name: module.build_parser().parse_known_args(required)[0].max_words
                for name, module in (("index", index), ("gapstats", gapstats), ("maccap", maccap), ("tomcap", tomcap))}
    assert defaults == {"index": 0, "gapstats": 0, "maccap": 15, "tomcap": 0}


# --------------------------------------------------------------------------------------------
# Split across ranks (torchrun)


def test_ranks_split_the_shards_and_rank_0_completes_the_cache(tmp_path, uninterrupted):
    """Two ranks (threads here, processes below) embed shards 0,2,4,6 and 1,3,5: together what one process writes."""
    from concurrent.futures import ThreadPoolExecutor

    embedders = [CountingEmbedder(), CountingEmbedder()]
    with ThreadPoolExecutor(2) as pool:
        futures = [pool.submit(embed_corpus, CORPUS, embedders[rank], tmp_path, **RUN, rank=rank, world_size=2)
                   for rank in (1, 0)]  # rank 1 first: it must wait for rank 0's manifest
        rank1, rank0 = (future.result(timeout=120) for future in futures)
    assert rank1 is None and rank0.count == 100
    # rank 0: shards 0, 2, 4 and the 4-caption shard 6; rank 1: shards 1, 3, 5
    assert [e.captions for e in embedders] == [3 * SHARD_SIZE + (100 - 6 * SHARD_SIZE), 3 * SHARD_SIZE]
    assert _files(tmp_path) == _files(default_embeddings_dir(uninterrupted))  # byte-identical to one process
    with pytest.raises(ValueError, match="rank 2 is not a rank of a world of 2"):
        embed_corpus(CORPUS, CountingEmbedder(), tmp_path, **RUN, rank=2, world_size=2)


def test_torchrun_two_processes_build_the_same_datastore_as_one(tmp_path, tiny_encoder):
    """`torchrun --standalone --nproc-per-node 2 -m training index` on CPU: both ranks embed, rank 0 indexes."""
    from safetensors.torch import save_file

    from capdemo.testing import tiny_encoder_config

    save_file(tiny_encoder.model.state_dict(), tmp_path / "clip.safetensors")  # the same weights in every process
    tiny_encoder_config(pretrained=str(tmp_path / "clip.safetensors")).save_json(tmp_path / "encoder.json")
    (tmp_path / "corpus.txt").write_text("\n".join(CORPUS) + "\n")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CAPDEMO_DEBUG": "1"}

    def index(out: str, *launcher: str) -> subprocess.CompletedProcess:
        argv = [*launcher, "-m", "training", "index", "--corpus", str(tmp_path / "corpus.txt"), "--encoder",
                str(tmp_path / "encoder.json"), "--out", str(tmp_path / out), "--device", "cpu", "--shard-size", "16"]
        return subprocess.run(argv, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300, check=False)

    single = index("single", sys.executable)
    assert single.returncode == 0, single.stderr[-2000:]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    pair = index("pair", *torchrun)
    assert pair.returncode == 0, pair.stderr[-3000:]
    printed = [json.loads(line) for line in pair.stdout.splitlines() if line.startswith("{")]
    assert sorted(p.get("rank", 0) for p in printed) == [0, 1] and any(p.get("count") == 100 for p in printed)
    assert _files(tmp_path / "pair") == _files(tmp_path / "single")  # index, captions, metadata
    assert _files(tmp_path / "pair.embeddings") == _files(tmp_path / "single.embeddings")  # 7 shards + manifest
