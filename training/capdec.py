"""``python -m training capdec``: train CapDec text-only on a caption corpus and write (or extend) a bundle.

Each caption's CLIP text embedding (cached, :mod:`training.embed`) is normalised and noised
(variance 0.016 per dimension, re-normalised) inside the model's loss; the mapper and the LM learn to
reconstruct the caption. The shared loop and the shared training CLI do the rest (checkpoints,
``--resume``, DDP under ``torchrun``), as for MacCap and TOMCap.

    python -m training capdec --corpus coco_train.json --encoder ViT-B-32/openai --out weights/capdec-coco
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

import capdemo  # noqa: F401  (the torchvision shim, before any model library)
from capdemo.encoders import ClipEncoder, EncoderConfig
from capdemo.lm import embedding_size, load_causal_lm
from capdemo.methods.capdec.model import CAPDEC_COMPONENT, MAPPERS, CapDec, CapDecConfig, add_to_bundle
from training.caption_data import exact_match, train_prefix_captioner
from training.cli import (
    OptimDefaults, add_optimisation, model_group, print_summary, read_command, training_parser, write_method_bundle,
)
from training.embed import cached_text_embeddings, corpus_sha256
from training.loop import TrainConfig, TrainResult

# CapDec's train.py: lr 2e-5, 10 epochs, batch 40 (36 on COCO), 5,000 linear warm-up steps then a linear decay.
# The shared loop decays by a cosine; its floor 0 matches the linear schedule's end.
DEFAULTS = OptimDefaults(epochs=10, batch_size=40, lr=2e-5, warmup=5000, min_lr_ratio=0.0,
                         source="CapDec's train.py (its schedule decays linearly; the shared loop's is a cosine)")


def run_identity(config: CapDecConfig, captions: Sequence[str]) -> dict[str, Any]:
    """What a resumed run must share with the killed one: the model settings (not the LM's location) and corpus."""
    settings = {f"capdec.{name}": value for name, value in config.to_dict().items() if name != "lm"}
    return {**settings, "corpus_sha256": corpus_sha256(captions)}


@dataclass
class CapDecRun:
    """What :func:`train_capdec` produced."""

    result: TrainResult
    model: CapDec
    bundle: Path | None  # None when the run stopped early or on ranks > 0


def train_capdec(captions: list[str], *, encoder: ClipEncoder, encoder_config: EncoderConfig, config: CapDecConfig,
                 train_config: TrainConfig, out: str | Path, embeddings_dir: str | Path | None = None,
                 eval_captions: int = 64, resume: bool = False, stop_after: int | None = None,
                 name: str | None = None) -> CapDecRun:
    """Train CapDec on ``captions`` and write the bundle ``out`` (the programmatic form of :func:`main`);
    ``config.embed_dim`` and ``config.lm_embed_dim`` are taken from the encoder and the LM."""
    lm, tokenizer = load_causal_lm(config.lm, dtype=torch.float32)  # trained: float32 (autocast on GPU)
    config = config.replace(embed_dim=encoder.embed_dim, lm_embed_dim=embedding_size(lm))
    cache_dir = Path(embeddings_dir) if embeddings_dir else Path(train_config.out_dir) / "text-embeddings"
    text_embeds = cached_text_embeddings(captions, encoder, cache_dir)  # (N, D)
    torch.manual_seed(train_config.seed)  # the mapper's initialisation
    model = CapDec(config, lm, tokenizer)
    token_ids, attention_mask = model.tokenize(captions)  # (N, L) each
    scored = slice(0, min(eval_captions, len(captions)))

    def evaluate(trained: CapDec) -> dict[str, float]:
        decode = lambda embeds: trained.generate(embeds, beams=1, max_new_tokens=config.max_new_tokens)  # noqa: E731
        return {"text_to_text_exact": exact_match(decode, text_embeds[scored], captions[scored])}

    result, bundle = train_prefix_captioner(
        model, text_embeds, token_ids, attention_mask, train_config=train_config,
        identity=run_identity(config, captions), evaluate=evaluate if eval_captions > 0 else None,
        resume=resume, stop_after=stop_after,
        write_bundle=lambda record: write_method_bundle(
            out, name=name or Path(out).name, component=CAPDEC_COMPONENT,
            description=f"CapDec trained text-only on {len(captions)} captions", encoder=encoder,
            encoder_config=encoder_config, record=record, add=lambda writer: add_to_bundle(writer, model)))
    return CapDecRun(result=result, model=model, bundle=bundle)


def build_parser() -> argparse.ArgumentParser:
    parser = training_parser("python -m training capdec", __doc__.split("\n\n")[0], corpus_max_words=0)
    model = model_group(parser, "CapDecConfig fields (left out: CapDec's setting, or --config's)")
    model.add_argument("--mapper", choices=MAPPERS, default=None, help="CLIP embedding -> prefix mapping")
    model.add_argument("--prefix-length", type=int, default=None, help="prefix vectors the LM reads")
    model.add_argument("--clip-length", type=int, default=None, help="vectors the embedding is projected into")
    model.add_argument("--mapper-layers", type=int, default=None, help="transformer mapper layers")
    model.add_argument("--mapper-heads", type=int, default=None, help="transformer mapper attention heads")
    model.add_argument("--noise-variance", type=float, default=None, help="training noise variance per dimension")
    model.add_argument("--train-lm", action=argparse.BooleanOptionalAction, default=None,
                       help="train the LM with the mapper (CapDec does)")
    model.add_argument("--beams", type=int, default=None, help="beam width at inference")
    model.add_argument("--max-new-tokens", type=int, default=None, help="generation length cap")
    model.add_argument("--max-caption-tokens", type=int, default=None, help="target tokens per caption incl. EOS")
    add_optimisation(parser, DEFAULTS)
    return parser


def main(argv: list[str] | None = None) -> int:
    command = read_command(build_parser(), argv, CapDecConfig, CAPDEC_COMPONENT)
    args = command.args
    run = train_capdec(command.captions, encoder=command.encoder, encoder_config=command.encoder_config,
                       config=command.config, train_config=command.train_config, out=args.out,
                       embeddings_dir=args.embeddings, eval_captions=args.eval_captions, resume=args.resume,
                       stop_after=args.stop_after, name=args.name)
    print_summary(run.bundle, run.result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
