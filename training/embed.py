"""Embed a caption corpus once and keep the embeddings on disk: sharded, resumable, checked against the corpus.

Every later step (the datastore, the gap statistics, TOMCap training) reads the
same cached text embeddings instead of running the text encoder again.

Layout of a cache folder::

    manifest.json              format, corpus sha256, encoder name, count, dim, shard size, shard list, complete
    shard-00000.safetensors    rows [0, shard_size) as float16 "embeddings" (N_s, D); the same
    shard-00001.safetensors    corpus sha256, encoder and row range in its own metadata, so a stray shard is
                               never reused

Shards hold float16: half the disk and RAM of float32 (16M x 512 captions: 16 GB
instead of 33 GB), and for unit vectors whose entries are around 0.04 the
rounding error (about 2e-5 per entry, cosine error ~1e-4) is far below anything
retrieval or training can notice. Each shard is written to a temporary file and
renamed into place, so a killed run leaves only complete shards; running the
same command again embeds only the missing ones.

Under ``torchrun`` the shards are split across the ranks (rank r embeds shards
r, r + W, r + 2W, ... of a world of W) and the ranks meet through the folder,
not through collectives: rank 0 prepares the folder and writes the manifest,
the other ranks start once it is there, and rank 0, after its own shards, waits
for everyone's and marks the cache complete. A shard is named by its row range,
not by the rank that wrote it, so a killed run resumes under any number of
ranks, and the result is byte-identical to a single-process run.

CLI: ``python -m training embed --corpus FILE --encoder SPEC --out DIR``
(``torchrun --nproc-per-node N -m training embed ...`` to split it over N GPUs).
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
from safetensors import SafetensorError, safe_open
from tqdm import tqdm

from capdemo.fileio import atomic_output, save_safetensors
from training.distributed import launch_rank, resolve_device

CACHE_WAIT_S = 3600  # how long a rank waits, without any progress, for the shards or manifest of another rank
POLL_S = 1.0  # seconds between looks at a folder another rank is writing

EmbedFn = Callable[[list[str]], np.ndarray | torch.Tensor]
"""Texts -> (len(texts), D) L2-normalised embeddings, e.g. ``ClipEncoder.encode_text``."""

EMBEDDINGS_FORMAT = "capdemo.embeddings/1"
MANIFEST_FILE = "manifest.json"
SHARD_TENSOR = "embeddings"
# A shard's identity sits in ONE metadata entry as sorted JSON: safetensors writes several entries
# in hash-map order, which differs between processes, and identical runs should give identical bytes.
SHARD_IDENTITY_KEY = "capdemo_shard"
STORED_DTYPE = torch.float16
DEFAULT_SHARD_SIZE = 8192
DEFAULT_BATCH_SIZE = 256


class StaleCacheError(ValueError):
    """A cache folder made for another corpus or encoder, or left incomplete."""


def corpus_sha256(captions: Sequence[str]) -> str:
    """Fingerprint of the exact caption list (after cleaning), in order."""
    digest = hashlib.sha256()
    for caption in captions:
        digest.update(caption.encode("utf-8"))
        digest.update(b"\n")
    return digest.hexdigest()


def _shard_name(number: int) -> str:
    return f"shard-{number:05d}.safetensors"


def _rerun_hint(directory: Path) -> str:
    return f"re-embed with `python -m training embed --corpus CORPUS --encoder ENCODER --out {directory} --overwrite`"


@dataclass(frozen=True)
class EmbeddingCache:
    """A complete cache folder; rows are in corpus order."""

    directory: Path
    manifest: dict[str, Any]

    @property
    def count(self) -> int:
        return int(self.manifest["count"])

    @property
    def dim(self) -> int:
        return int(self.manifest["dim"])

    @property
    def encoder_name(self) -> str:
        return self.manifest["encoder_name"]

    @property
    def corpus_sha256(self) -> str:
        return self.manifest["corpus_sha256"]

    @property
    def shard_paths(self) -> list[Path]:
        return [self.directory / shard["file"] for shard in self.manifest["shards"]]

    @classmethod
    def load(
        cls, directory: str | Path, *, captions: Sequence[str] | None = None, encoder_name: str | None = None
    ) -> EmbeddingCache:
        """Open a finished cache, checking it was made for ``captions`` / ``encoder_name`` when given."""
        directory = Path(directory)
        manifest = _read_manifest(directory)
        if manifest is None:
            hint = _rerun_hint(directory)
            raise StaleCacheError(f"{directory}: no embedding cache ({MANIFEST_FILE} missing); {hint}")
        if not manifest.get("complete"):
            raise StaleCacheError(f"{directory}: the embedding run did not finish; run the same command to resume it")
        cache = cls(directory, manifest)
        missing = [path.name for path in cache.shard_paths if not path.is_file()]
        if missing:
            raise StaleCacheError(f"{directory}: {missing[0]} is missing; run the same embed command to re-embed it")
        if captions is not None and corpus_sha256(captions) != cache.corpus_sha256:
            raise StaleCacheError(
                f"{directory}: embeddings were made for another corpus ({cache.count} captions, sha256 "
                f"{cache.corpus_sha256[:12]}), not this one ({len(captions)} captions); {_rerun_hint(directory)}"
            )
        if encoder_name is not None and encoder_name != cache.encoder_name:
            raise StaleCacheError(
                f"{directory}: embeddings were made with {cache.encoder_name!r}, not {encoder_name!r}; "
                + _rerun_hint(directory)
            )
        return cache

    def shard(self, number: int) -> torch.Tensor:
        """One shard's rows, float16: (rows in shard, D)."""
        with safe_open(str(self.shard_paths[number]), framework="pt") as handle:
            return handle.get_tensor(SHARD_TENSOR)

    def tensor(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """All rows as one (N, D) tensor, filled shard by shard (peak memory: the result plus one shard)."""
        out = torch.empty(self.count, self.dim, dtype=dtype)
        for number, shard in enumerate(self.manifest["shards"]):
            out[shard["start"] : shard["stop"]] = self.shard(number).to(dtype)
        return out


def _read_manifest(directory: Path) -> dict[str, Any] | None:
    path = directory / MANIFEST_FILE
    if not path.is_file():
        return None
    manifest = json.loads(path.read_text())
    if manifest.get("format") != EMBEDDINGS_FORMAT:
        raise StaleCacheError(f"{path}: format {manifest.get('format')!r} is not {EMBEDDINGS_FORMAT!r}")
    return manifest


def _write_manifest(directory: Path, manifest: dict[str, Any]) -> None:
    with atomic_output(directory / MANIFEST_FILE) as tmp:
        tmp.write_text(json.dumps(manifest, indent=1) + "\n")


def _shard_metadata(identity: dict[str, str]) -> dict[str, str]:
    return {SHARD_IDENTITY_KEY: json.dumps(identity, sort_keys=True)}


def _shard_shape(path: Path, identity: dict[str, str]) -> tuple[int, int] | None:
    """The (rows, D) of ``path`` if it is a finished shard with exactly this identity (corpus, encoder, range)."""
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as handle:
            if (handle.metadata() or {}) != _shard_metadata(identity) or SHARD_TENSOR not in handle.keys():
                return None
            shape = tuple(handle.get_slice(SHARD_TENSOR).get_shape())
    except (OSError, SafetensorError):  # unreadable: a foreign or damaged file, so embed it again
        return None
    expected_rows = int(identity["stop"]) - int(identity["start"])
    return shape if len(shape) == 2 and shape[0] == expected_rows else None  # type: ignore[return-value]


def _as_rows(values: np.ndarray | torch.Tensor, *, expected_rows: int) -> torch.Tensor:
    """An embed_fn result as a float32 CPU (rows, D) tensor, checked."""
    rows = torch.as_tensor(values).detach().to("cpu", torch.float32)
    if rows.ndim != 2 or rows.shape[0] != expected_rows:
        raise ValueError(
            f"embed_fn returned shape {tuple(rows.shape)} for {expected_rows} texts; expected ({expected_rows}, D)"
        )
    if not torch.isfinite(rows).all():
        raise ValueError("embed_fn returned NaN or infinite values")
    return rows


def embed_corpus(
    captions: Sequence[str],
    embed_fn: EmbedFn,
    out_dir: str | Path,
    *,
    encoder_name: str,
    shard_size: int = DEFAULT_SHARD_SIZE,
    batch_size: int = DEFAULT_BATCH_SIZE,
    overwrite: bool = False,
    progress: bool = True,
    rank: int = 0,
    world_size: int = 1,
    stale_fix: str = "pass --overwrite or pick another --out",
) -> EmbeddingCache | None:
    """Embed ``captions`` into ``out_dir`` (resuming a run of the same corpus and encoder) and open the cache.

    A folder holding a cache of another corpus, encoder or shard size is an
    error unless ``overwrite``, which deletes its shards first. With
    ``world_size`` > 1 this rank embeds only its share of the shards (see the
    module docstring); rank 0 returns the complete cache, other ranks ``None``.
    """
    if not captions:
        raise ValueError("cannot embed an empty corpus")
    if shard_size < 1 or batch_size < 1:
        raise ValueError(f"shard_size and batch_size must be >= 1, got {shard_size} and {batch_size}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not a rank of a world of {world_size}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    identity = {"corpus_sha256": corpus_sha256(captions), "encoder_name": encoder_name}
    manifest = {"format": EMBEDDINGS_FORMAT, **identity, "count": len(captions), "shard_size": shard_size}
    if rank == 0:
        _prepare_folder(out_dir, manifest, overwrite=overwrite, stale_fix=stale_fix)
    else:  # rank 0 may still be clearing the folder (--overwrite): start once it has written this run's manifest
        _wait_for(lambda: 0 if _manifest_matches(out_dir, manifest) else 1, what=f"rank 0's manifest in {out_dir}")

    ranges = [(start, min(start + shard_size, len(captions))) for start in range(0, len(captions), shard_size)]
    shards = [{"file": _shard_name(n), "start": start, "stop": stop} for n, (start, stop) in enumerate(ranges)]
    identities = [{**identity, "start": str(s["start"]), "stop": str(s["stop"])} for s in shards]
    mine = [number for number in range(len(shards)) if number % world_size == rank]
    shapes = {n: _shard_shape(out_dir / shards[n]["file"], identities[n]) for n in mine}
    if rank == 0:
        _write_manifest(out_dir, {**manifest, "dim": None, "shards": shards, "complete": False})

    total = sum(shards[n]["stop"] - shards[n]["start"] for n in mine)
    already = sum(shape[0] for shape in shapes.values() if shape is not None)
    with tqdm(total=total, initial=already, unit="caption", desc="embedding", disable=not progress) as bar:
        for number in mine:
            shard, shard_identity = shards[number], identities[number]
            if shapes[number] is not None:
                continue
            parts = []
            for start in range(shard["start"], shard["stop"], batch_size):
                batch = list(captions[start : min(start + batch_size, shard["stop"])])
                parts.append(_as_rows(embed_fn(batch), expected_rows=len(batch)))
                bar.update(len(batch))
            rows = torch.cat(parts).to(STORED_DTYPE)  # (shard rows, D)
            with atomic_output(out_dir / shard["file"]) as tmp:
                save_safetensors({SHARD_TENSOR: rows}, tmp, _shard_metadata(shard_identity))
            shapes[number] = tuple(rows.shape)
    if rank != 0:
        return None
    others = [n for n in range(len(shards)) if n not in shapes]
    _wait_for(lambda: _collect_shapes(out_dir, shards, identities, others, shapes),
              what=f"the other ranks' shards in {out_dir}")
    dims = {shape[1] for shape in shapes.values() if shape is not None}
    if len(dims) != 1:
        raise ValueError(f"{out_dir}: shards disagree on the embedding dim ({sorted(dims)}); rerun with --overwrite")
    final = {**manifest, "dim": dims.pop(), "shards": shards, "complete": True}
    _write_manifest(out_dir, final)
    return EmbeddingCache(out_dir, final)


def _manifest_matches(out_dir: Path, manifest: dict[str, Any]) -> bool:
    """Whether ``out_dir`` holds a manifest of this very run (corpus, encoder, count, shard size)."""
    try:
        existing = _read_manifest(out_dir)
    except (StaleCacheError, json.JSONDecodeError):  # another run's folder, or a manifest being replaced
        return False
    return existing is not None and all(existing.get(key) == value for key, value in manifest.items())


def _collect_shapes(out_dir: Path, shards: list[dict[str, Any]], identities: list[dict[str, str]],
                    pending: list[int], shapes: dict[int, tuple[int, int] | None]) -> int:
    """Record the shapes of the ``pending`` shards that are now finished; returns how many are still missing."""
    for number in list(pending):
        shape = _shard_shape(out_dir / shards[number]["file"], identities[number])
        if shape is not None:
            shapes[number] = shape
            pending.remove(number)
    return len(pending)


def _wait_for(missing: Callable[[], int], *, what: str) -> None:
    """Poll ``missing()`` (a count of things not there yet) until it is 0; fail after CACHE_WAIT_S without progress.

    A smaller count than the last one is progress and restarts the clock, so a long run of many shards waits as
    long as shards keep arriving.
    """
    deadline, last = time.monotonic() + CACHE_WAIT_S, None
    while (count := missing()) > 0:
        if last is not None and count < last:
            deadline = time.monotonic() + CACHE_WAIT_S
        last = count
        if time.monotonic() > deadline:
            raise StaleCacheError(f"waited {CACHE_WAIT_S} s for {what} without progress; is every rank running? "
                                  "Run the same command again to resume")
        time.sleep(POLL_S)


def _prepare_folder(out_dir: Path, manifest: dict[str, Any], *, overwrite: bool, stale_fix: str) -> None:
    """Clear leftovers of killed writes; refuse (or with ``overwrite``, wipe) a cache of something else."""
    # atomic_output's temporary names, and the one safetensors' save_file writes through first (.tmpXXXXXX)
    for pattern in (".shard-*.tmp", f".{MANIFEST_FILE}.*.tmp", ".tmp*"):
        for leftover in out_dir.glob(pattern):
            leftover.unlink(missing_ok=True)
    existing = _read_manifest(out_dir)
    if existing is None or all(existing.get(key) == value for key, value in manifest.items()):
        return
    if not overwrite:
        raise StaleCacheError(
            f"{out_dir}: holds embeddings of another corpus, encoder or shard size "
            f"({existing.get('count')} captions, {existing.get('encoder_name')!r}); {stale_fix}"
        )
    for shard in existing.get("shards", []):
        (out_dir / shard["file"]).unlink(missing_ok=True)
    (out_dir / MANIFEST_FILE).unlink()


# --------------------------------------------------------------------------------------------
# CLI


def add_encoder_arguments(parser: argparse.ArgumentParser, *, aliases: tuple[str, ...] = ()) -> None:
    """The --encoder / --device pair shared by the embed, index and gapstats commands (``aliases``: other names
    of --encoder, e.g. index's --retrieval-encoder, the name the tomcap command uses for the store's encoder)."""
    parser.add_argument(
        "--encoder", *aliases, dest="encoder",
        required=True,
        help="CLIP to embed with: MODEL[/PRETRAINED] as in `ViT-B-32/openai`, or a JSON file of an EncoderConfig",
    )
    parser.add_argument(
        "--device", default=None, help="torch device for the encoder (None: cuda when available, else cpu)"
    )


def encoder_from_arguments(args: argparse.Namespace) -> Any:
    """The ClipEncoder named by ``--encoder`` on ``--device`` (default: this rank's GPU, cuda:LOCAL_RANK, when
    there is one; imports open_clip only here)."""
    from capdemo.encoders import load_encoder, parse_encoder_spec

    config = parse_encoder_spec(args.encoder)
    device = args.device or str(resolve_device("auto", local_rank=int(os.environ.get("LOCAL_RANK", "0"))))
    return load_encoder(config, device=device)


def add_corpus_arguments(parser: argparse.ArgumentParser, *, max_words: int | None = None) -> None:
    """--corpus / --corpus-split / --max-words / --dedupe, shared by every command that reads a caption corpus.

    ``max_words`` is the command's default length filter: the MacCap paper (§5.1) drops sentences of more than
    15 words; a retrieval datastore, its statistics and TOMCap keep every caption (SmallCap: up to 25 tokens).
    """
    from training.datasets import MACCAP_MAX_CAPTION_WORDS

    default = MACCAP_MAX_CAPTION_WORDS if max_words is None else max_words
    parser.add_argument(
        "--corpus",
        required=True,
        help="caption corpus: a text file (one caption per line), a JSON list of strings, or a Karpathy split file "
        "(dataset_coco.json / dataset_flickr30k.json, or a MAGIC-format list) with --corpus-split",
    )
    parser.add_argument(
        "--corpus-split",
        default=None,
        metavar="NAMES",
        help="with a Karpathy split file: the splits whose captions form the corpus, joined by '+' "
        "(e.g. train+restval for COCO, train for Flickr30k)",
    )
    parser.add_argument(
        "--max-words", type=int, default=default, help="drop captions longer than this many words (0: keep all)"
    )
    parser.add_argument(
        "--dedupe",
        action="store_true",
        help="keep only the first of repeated captions (the MacCap paper trains on every sentence, repeats included)",
    )


def corpus_from_arguments(args: argparse.Namespace) -> list[str]:
    """The caption list the corpus flags of ``add_corpus_arguments`` describe."""
    from training.datasets import load_caption_corpus, parse_split_names

    splits = parse_split_names(args.corpus_split) if args.corpus_split else None
    return load_caption_corpus(args.corpus, splits=splits, max_words=args.max_words or None, dedupe=args.dedupe)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m training embed", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_corpus_arguments(parser)
    add_encoder_arguments(parser)
    parser.add_argument("--out", required=True, help="cache folder (created; an interrupted run here is resumed)")
    parser.add_argument("--shard-size", type=int, default=DEFAULT_SHARD_SIZE, help="captions per shard file")
    parser.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE, help="captions per encoder call")
    parser.add_argument(
        "--overwrite", action="store_true", help="replace a cache of another corpus or encoder in --out"
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    rank, world_size = launch_rank()
    captions = corpus_from_arguments(args)
    encoder = encoder_from_arguments(args)
    cache = embed_corpus(
        captions,
        encoder.encode_text,
        args.out,
        encoder_name=encoder.name,
        shard_size=args.shard_size,
        batch_size=args.batch_size,
        overwrite=args.overwrite,
        rank=rank,
        world_size=world_size,
    )
    if cache is None:  # a rank > 0 under torchrun: its shards are written, rank 0 finishes the cache
        print(json.dumps({"out": str(args.out), "rank": rank, "world_size": world_size}))
        return 0
    summary = {"out": str(cache.directory), "count": cache.count, "dim": cache.dim, "encoder": cache.encoder_name}
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())


def cached_text_embeddings(captions: list[str], encoder: Any, cache_dir: Path) -> torch.Tensor:
    """(N, D) float32 text embeddings of a training corpus, from the cache or embedded into it.

    Under DDP every rank embeds its share of the shards; rank 0 completes the cache and the other ranks then
    read it (waiting up to CACHE_WAIT_S).
    """
    rank, world_size = launch_rank()
    cache = embed_corpus(captions, encoder.encode_text, cache_dir, encoder_name=encoder.name, rank=rank,
                         world_size=world_size, progress=rank == 0,  # the training commands' flags for the folder:
                         stale_fix="pass another --embeddings folder (or --run-dir), or delete this one")
    if cache is not None:
        return cache.tensor()
    deadline = time.monotonic() + CACHE_WAIT_S
    while True:  # other ranks read what rank 0 writes
        try:
            return EmbeddingCache.load(cache_dir, captions=captions, encoder_name=encoder.name).tensor()
        except StaleCacheError:
            if time.monotonic() > deadline:
                raise
            time.sleep(1.0)
