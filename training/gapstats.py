"""Measure the modality gap of an encoder and write the statistics TOMCap's correction uses.

CLI: ``python -m training gapstats --images DIR_OR_LIST --corpus FILE --encoder SPEC --out FILE``.
Image statistics come from an unpaired image set (a folder, searched
recursively, or a text file listing image paths), text statistics from the
caption corpus: from its embedding cache when ``--embeddings`` names one, else
from a seeded sample of ``--max-captions`` captions embedded here. Writes the
:class:`capdemo.gap.GapStats` safetensors file and prints the gap report as JSON.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from capdemo.gap import GapStats, gap_report
from capdemo.images import ImageLoadError, load_image
from training.embed import (
    DEFAULT_BATCH_SIZE,
    EmbeddingCache,
    add_corpus_arguments,
    add_encoder_arguments,
    corpus_from_arguments,
    encoder_from_arguments,
)

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"})
DEFAULT_MAX_CAPTIONS = 100_000  # per-dimension moments of 100k samples are accurate to ~0.3% of sigma


def list_images(source: str | Path) -> list[Path]:
    """Image files under a folder (recursive, sorted), or the paths listed one per line in a text file.

    Relative paths in a list file are relative to the list file's folder.
    """
    source = Path(source)
    if source.is_dir():
        paths = sorted(p for p in source.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    elif source.is_file():
        lines = [line.strip() for line in source.read_text().splitlines()]
        paths = [source.parent / line for line in lines if line and not line.startswith("#")]
    else:
        raise FileNotFoundError(f"{source}: no such image folder or list file")
    if not paths:
        raise ValueError(f"{source}: no images found (looked for {', '.join(sorted(IMAGE_SUFFIXES))})")
    return paths


def embed_images(paths: Sequence[Path], encoder: Any, *, batch_size: int, progress: bool = True) -> torch.Tensor:
    """Global image embeddings (N_ok, D) of the images that load; unreadable ones are reported and skipped."""
    embeds, skipped = [], []
    for start in tqdm(range(0, len(paths), batch_size), desc="images", unit="batch", disable=not progress):
        images = []
        for path in paths[start : start + batch_size]:
            try:
                images.append(load_image(path))
            except (ImageLoadError, OSError) as err:
                skipped.append(f"{path}: {err}")
        if images:
            embeds.append(encoder.encode_image_embeds(encoder.preprocess(images)).float().cpu())
    for message in skipped:
        print(f"skipped {message}", file=sys.stderr)
    if not embeds:
        raise ValueError(f"none of the {len(paths)} images could be read")
    return torch.cat(embeds)


def embed_captions(captions: Sequence[str], encoder: Any, *, batch_size: int, progress: bool = True) -> torch.Tensor:
    """Text embeddings (N, D) of ``captions``."""
    batches = range(0, len(captions), batch_size)
    return torch.cat(
        [
            encoder.encode_text(list(captions[start : start + batch_size])).float().cpu()
            for start in tqdm(batches, desc="captions", unit="batch", disable=not progress)
        ]
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m training gapstats", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--images", required=True, help="folder of images (recursive) or a text file of image paths")
    add_corpus_arguments(parser, max_words=0)  # a datastore / its statistics keep every caption
    add_encoder_arguments(parser)
    parser.add_argument("--out", required=True, help="gap statistics file to write (.safetensors)")
    parser.add_argument(
        "--embeddings", default=None, help="embedding cache of the corpus to reuse (from `training embed`)"
    )
    parser.add_argument(
        "--max-images", type=int, default=None, help="use at most this many images (seeded sample; None: all)"
    )
    parser.add_argument(
        "--max-captions", type=int, default=DEFAULT_MAX_CAPTIONS, help="captions to embed when there is no cache"
    )
    parser.add_argument(
        "--batch-size", type=int, default=DEFAULT_BATCH_SIZE, help="images or captions per encoder call"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the image/caption samples and the linear probe")
    parser.add_argument(
        "--per-dim", action="store_true", help="include the per-dimension std ratios in the printed report"
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    captions = corpus_from_arguments(args)
    paths = list_images(args.images)
    rng = random.Random(args.seed)
    if args.max_images is not None and len(paths) > args.max_images:
        paths = sorted(rng.sample(paths, args.max_images))
    encoder = encoder_from_arguments(args)
    image_embeds = embed_images(paths, encoder, batch_size=args.batch_size)
    if args.embeddings:
        text_embeds = EmbeddingCache.load(args.embeddings, captions=captions, encoder_name=encoder.name).tensor()
    else:
        if len(captions) > args.max_captions:
            captions = [captions[i] for i in sorted(rng.sample(range(len(captions)), args.max_captions))]
        text_embeds = embed_captions(captions, encoder, batch_size=args.batch_size)
    GapStats.compute(image_embeds, text_embeds, encoder_name=encoder.name).save(args.out)
    report = gap_report(image_embeds, text_embeds, seed=args.seed)
    if not args.per_dim:
        report.pop("std_ratio_per_dim")
    print(json.dumps({"out": str(args.out), "encoder": encoder.name, **report}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
