"""Build the caption datastore: embed the corpus (through the resumable cache), index it, save it.

CLI: ``python -m training index --corpus FILE --encoder SPEC --out DIR [--kind auto|flat|ivfpq|hnsw_sq]``;
``torchrun --nproc-per-node N -m training index ...`` splits the embedding over N processes (rank 0 indexes).
The embeddings go to a cache folder beside the datastore (``DIR.embeddings`` by
default), so a killed indexing run resumes from the finished shards, and the
datastore itself stays small enough to ship in a bundle. The encoder's name is
written into the datastore, so queries from another model are refused.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from capdemo.retrieval import CaptionDatastore, IndexSpec
from training.distributed import launch_rank
from training.embed import (
    DEFAULT_BATCH_SIZE,
    DEFAULT_SHARD_SIZE,
    EmbedFn,
    add_corpus_arguments,
    add_encoder_arguments,
    corpus_from_arguments,
    embed_corpus,
    encoder_from_arguments,
)

EMBEDDINGS_SUFFIX = ".embeddings"


def default_embeddings_dir(out_dir: str | Path) -> Path:
    """Where ``index`` caches embeddings unless told otherwise: ``<out>.embeddings`` beside the datastore."""
    out_dir = Path(out_dir)
    return out_dir.with_name(out_dir.name + EMBEDDINGS_SUFFIX)


def build_datastore(
    captions: Sequence[str],
    embed_fn: EmbedFn,
    out_dir: str | Path,
    *,
    encoder_name: str,
    spec: IndexSpec | None = None,
    embeddings_dir: str | Path | None = None,
    shard_size: int = DEFAULT_SHARD_SIZE,
    batch_size: int = DEFAULT_BATCH_SIZE,
    overwrite_embeddings: bool = False,
    progress: bool = True,
    rank: int = 0,
    world_size: int = 1,
) -> CaptionDatastore | None:
    """Embed (or reuse cached embeddings of) ``captions``, build the datastore and save it to ``out_dir``.

    Under ``torchrun`` (``world_size`` > 1) every rank embeds its share of the shards and rank 0 alone, once all
    are written, builds and saves the index; the other ranks return ``None``.
    """
    cache = embed_corpus(
        captions,
        embed_fn,
        embeddings_dir or default_embeddings_dir(out_dir),
        encoder_name=encoder_name,
        shard_size=shard_size,
        batch_size=batch_size,
        overwrite=overwrite_embeddings,
        progress=progress,
        rank=rank,
        world_size=world_size,
    )
    if cache is None:
        return None
    # float16 halves the peak memory; build() converts to float32 chunk by chunk while adding
    store = CaptionDatastore.build(cache.tensor(torch.float16), captions, encoder_name=encoder_name, spec=spec)
    store.save(out_dir)
    return store


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m training index", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_corpus_arguments(parser, max_words=0)  # a datastore / its statistics keep every caption
    add_encoder_arguments(parser, aliases=("--retrieval-encoder",))  # TOMCap's name for the store's encoder
    parser.add_argument(
        "--out", required=True, help="datastore folder to write (index.faiss, captions.txt, datastore.json)"
    )
    parser.add_argument(
        "--kind",
        default="auto",
        choices=["auto", "flat", "ivfpq", "hnsw_sq"],
        help="faiss index: exact flat, compressed IVF-PQ, HNSW over 8-bit codes; auto = flat below 200k captions",
    )
    parser.add_argument("--nlist", type=int, default=None, help="IVF lists (None: 4 * sqrt(N))")
    parser.add_argument("--pq-m", type=int, default=None, help="PQ bytes per caption (None: embedding dim / 8)")
    parser.add_argument(
        "--nprobe", type=int, default=None, help="IVF lists searched per query (None: nlist / 16, within 16..256)"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the index training sample and k-means")
    parser.add_argument("--embeddings", default=None, help="embedding cache folder (None: OUT.embeddings)")
    parser.add_argument(
        "--overwrite-embeddings", action="store_true", help="replace a cache made for another corpus or encoder"
    )
    parser.add_argument("--shard-size", type=int, default=DEFAULT_SHARD_SIZE, help="captions per embedding shard file")
    parser.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE, help="captions per encoder call")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    rank, world_size = launch_rank()
    captions = corpus_from_arguments(args)
    encoder = encoder_from_arguments(args)
    spec = IndexSpec(kind=args.kind, nlist=args.nlist, pq_m=args.pq_m, nprobe=args.nprobe, seed=args.seed)
    started = time.perf_counter()
    store = build_datastore(
        captions,
        encoder.encode_text,
        args.out,
        encoder_name=encoder.name,
        spec=spec,
        embeddings_dir=args.embeddings,
        shard_size=args.shard_size,
        batch_size=args.batch_size,
        overwrite_embeddings=args.overwrite_embeddings,
        rank=rank,
        world_size=world_size,
    )
    if store is None:  # a rank > 0 under torchrun: its shards are written, rank 0 builds the index
        print(json.dumps({"out": str(args.out), "rank": rank, "world_size": world_size}))
        return 0
    summary = {**store.meta(), "out": str(args.out), "seconds": round(time.perf_counter() - started, 1)}
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
