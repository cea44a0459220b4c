"""``python -m training maccap``: train MacCap text-only on a caption corpus and write a bundle.

Captions (<= 15 words, as in the paper) are embedded once with the frozen CLIP text encoder into a
sharded, resumable cache (:mod:`training.embed`); each step injects region noise into those
embeddings (N_cr noisy copies) and the adaptor (and the LM when ``--train-lm``) learns to
reconstruct the caption. The shared loop (:mod:`training.loop`) does AdamW with warmup and cosine
decay, AMP on GPU, checkpoints, ``--resume`` and DDP under ``torchrun``. The finished run becomes a
bundle with the encoder, the MacCap config and weights, and optionally the VQA answer list.

    python -m training maccap --corpus coco_train.json --encoder ViT-B-32/openai --out weights/maccap-coco
    torchrun --nproc-per-node 2 -m training maccap ...   # data parallel
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

import capdemo  # noqa: F401  (the torchvision shim, before any model library)
from capdemo.encoders import ClipEncoder, EncoderConfig
from capdemo.lm import embedding_size, load_causal_lm
from capdemo.methods.maccap.model import (
    MACCAP_COMPONENT, REGION_COMBINE_MODES, REGION_MODES, MacCap, MacCapConfig, add_to_bundle,
    caption_text_embeddings,
)
from capdemo.vqa import AnswerList
from capdemo.weights import WeightSource
from training.caption_data import exact_match, train_prefix_captioner
from training.cli import (
    OptimDefaults, add_optimisation, model_group, print_summary, read_command, training_parser, write_method_bundle,
)
from training.distributed import resolve_device
from training.embed import cached_text_embeddings, corpus_sha256
from training.loop import TrainConfig, TrainResult, frozen_weights_dtype, resolve_precision

TRAINING_RECORD = "maccap/training.json"  # bundle file: how the weights were trained
# The reference code's COCO run (scripts/train_coco.sh): 8 epochs, lr 1e-4 at batch 32 (16 x 2 GPUs) = the paper's
# 4e-4 at batch 128 under linear scaling; cosine to 0.1 lr; 200 warm-up steps of 32 = 50 of 128. CC3M: 4 epochs.
DEFAULTS = OptimDefaults(epochs=8, batch_size=128, lr=4e-4, warmup=50, min_lr_ratio=0.1,
                         source="the paper's batch and lr, the reference code's COCO epochs, cosine floor and warm-up")


def run_identity(config: MacCapConfig, captions: Sequence[str]) -> dict[str, Any]:
    """What a resumed run must share with the killed one: every model setting (the LM's location aside:
    a moved folder is the same model) and the exact caption list."""
    settings = {f"maccap.{name}": value for name, value in config.to_dict().items() if name != "lm"}
    return {**settings, "corpus_sha256": corpus_sha256(captions)}


def text_to_text_exact(model: MacCap, text_embeds: torch.Tensor, captions: list[str]) -> float:
    """Share of captions decoded (greedy, no noise) exactly from their own text embeddings."""
    return exact_match(lambda embeds: caption_text_embeddings(model, embeds.to(model.device), beams=1),
                       text_embeds, captions)


@dataclass
class MacCapRun:
    """What :func:`train_maccap` produced."""

    result: TrainResult  # the loop's record (history, evaluations, final checkpoint)
    model: MacCap  # the trained model (on the training device)
    bundle: Path | None  # the written bundle; None when the run stopped early or on ranks > 0


def train_maccap(
    captions: list[str],
    *,
    encoder: ClipEncoder,
    encoder_config: EncoderConfig,
    config: MacCapConfig,
    train_config: TrainConfig,
    out: str | Path,
    lm: Any = None,
    tokenizer: Any = None,
    embeddings_dir: str | Path | None = None,
    answers: AnswerList | None = None,
    eval_captions: int = 64,
    resume: bool = False,
    stop_after: int | None = None,
    name: str | None = None,
) -> MacCapRun:
    """Train MacCap on ``captions`` and write the bundle ``out`` (the programmatic form of :func:`main`).

    ``lm``/``tokenizer`` default to loading ``config.lm``; ``config.embed_dim`` and ``config.lm_embed_dim``
    are taken from the encoder and the LM. ``eval_captions`` > 0 scores text-to-text exact match on that
    many training captions at every evaluation.
    """
    device = resolve_device(train_config.device, local_rank=int(os.environ.get("LOCAL_RANK", "0")))
    if (lm is None) != (tokenizer is None):
        raise ValueError("pass both lm and tokenizer, or neither (then config.lm is loaded)")
    if lm is None:  # trainable weights must be float32 (autocast brings the low precision); so must CPU maths
        precision = resolve_precision(train_config.precision, device=device)
        # a frozen LM in autocast's dtype (OPT-1.3b is stored in fp16, which under bf16 autocast would carry
        # the prefix's gradient in fp16 with no loss scaler)
        dtype = torch.float32 if config.train_lm else frozen_weights_dtype(precision)
        lm, tokenizer = load_causal_lm(config.lm, dtype=dtype)
    config = config.replace(embed_dim=encoder.embed_dim, lm_embed_dim=embedding_size(lm))
    cache_dir = Path(embeddings_dir) if embeddings_dir else Path(train_config.out_dir) / "text-embeddings"
    text_embeds = cached_text_embeddings(captions, encoder, cache_dir)  # (N, D)
    torch.manual_seed(train_config.seed)  # the adaptor's initialisation
    model = MacCap(config, lm, tokenizer)
    token_ids, attention_mask = model.tokenize(captions)  # (N, L) each
    scored = slice(0, min(eval_captions, len(captions)))  # the first training captions

    def evaluate(trained: MacCap) -> dict[str, float]:
        return {"text_to_text_exact": text_to_text_exact(trained, text_embeds[scored], captions[scored])}

    def add(writer) -> None:
        add_to_bundle(writer, model, include_lm=model.config.train_lm or not WeightSource.parse(config.lm).on_hub)
        if answers is not None:
            answers.add_to_bundle(writer, encoder)

    result, bundle = train_prefix_captioner(
        model, text_embeds, token_ids, attention_mask, train_config=train_config,
        identity=run_identity(config, captions), evaluate=evaluate if eval_captions > 0 else None,
        resume=resume, stop_after=stop_after,
        write_bundle=lambda record: write_method_bundle(
            out, name=name or Path(out).name, component=MACCAP_COMPONENT,
            description=f"MacCap trained text-only on {len(captions)} captions", encoder=encoder,
            encoder_config=encoder_config, record=record, add=add))
    return MacCapRun(result=result, model=model, bundle=bundle)


# --------------------------------------------------------------------------------------------
# CLI


def build_parser() -> argparse.ArgumentParser:
    parser = training_parser("python -m training maccap", __doc__.split("\n\n")[0])
    parser.add_argument("--vqa-answers", default=None, help="openvqa answer dictionary to ship for VQA")
    model = model_group(parser, "MacCapConfig fields (left out: the paper's setting, or --config's)")
    model.add_argument("--train-lm", action=argparse.BooleanOptionalAction, default=None,
                       help="train the LM with the adaptor (the paper keeps it frozen)")
    model.add_argument("--n-query", type=int, default=None, help="learnable queries N_q = prefix length")
    model.add_argument("--n-cr", type=int, default=None, help="noisy text copies N_cr (= patches picked at inference)")
    model.add_argument("--text-copies", type=int, default=None,
                       help="noisy copies of the text embedding in training: 1 = Table 5's 'single token' row "
                            "(default: N_cr, 'multiple token')")
    model.add_argument("--region-mode", choices=REGION_MODES, default=None,
                       help="the bundle's image features at inference: subregion aggregation (the paper) or the "
                            "CLS token alone (Table 5's row)")
    model.add_argument("--noise-variance", type=float, default=None, help="region noise variance per dimension")
    model.add_argument("--width", type=int, default=None, help="adaptor width (default: the CLIP dimension)")
    model.add_argument("--layers", type=int, default=None, help="adaptor transformer-decoder layers")
    model.add_argument("--heads", type=int, default=None, help="adaptor attention heads")
    model.add_argument("--ffn-dim", type=int, default=None, help="adaptor feed-forward width")
    model.add_argument("--dropout", type=float, default=None, help="adaptor dropout")
    model.add_argument("--mlp-layers", type=int, default=None, help="Linear layers of the adaptor's output MLP")
    model.add_argument("--memory-layernorm", action=argparse.BooleanOptionalAction, default=None,
                       help="LayerNorm on the region features before cross-attention (not in the paper; tiny worlds)")
    model.add_argument("--region-combine", choices=REGION_COMBINE_MODES, default=None,
                       help="I_cr from I_s and I_c: mean (the paper's text) or sum (eq. 13, reference code)")
    model.add_argument("--max-caption-tokens", type=int, default=None, help="LM tokens per caption incl. EOS")
    add_optimisation(parser, DEFAULTS)
    return parser


def main(argv: list[str] | None = None) -> int:
    command = read_command(build_parser(), argv, MacCapConfig, MACCAP_COMPONENT)
    args = command.args
    answers = AnswerList.from_openvqa(args.vqa_answers) if args.vqa_answers else None
    run = train_maccap(
        command.captions, encoder=command.encoder, encoder_config=command.encoder_config, config=command.config,
        train_config=command.train_config, out=args.out, embeddings_dir=args.embeddings, answers=answers,
        eval_captions=args.eval_captions, resume=args.resume, stop_after=args.stop_after, name=args.name,
    )
    print_summary(run.bundle, run.result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
