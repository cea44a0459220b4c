"""``python -m training maccap``: train MacCap text-only on a caption corpus and write a bundle.

Captions (<= 15 words, as in the paper) are embedded once with the frozen CLIP
text encoder into a sharded, resumable cache (:mod:`training.embed`); each step
injects region noise into those embeddings (N_cr noisy copies) and the adaptor
(and the LM when ``--train-lm``) learns to reconstruct the caption. The shared
loop (:mod:`training.loop`) does AdamW with warmup and cosine decay, AMP on GPU,
checkpoints, ``--resume`` and DDP under ``torchrun``. The finished run becomes a
bundle with the encoder, the MacCap config and weights, and optionally the VQA
answer list, which ``capdemo`` loads as is.

    python -m training maccap --corpus coco_train.json --encoder ViT-B-32/openai \\
        --out weights/maccap-coco --epochs 8   # LM: the config's pinned OPT-1.3b
    torchrun --nproc-per-node 2 -m training maccap ...   # data parallel
"""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import dataclass
from pathlib import Path
from collections.abc import Sequence
from typing import Any

import torch
from torch.utils.data import Dataset

import capdemo  # noqa: F401  (the torchvision shim, before any model library)
from capdemo.bundle import BundleWriter
from capdemo.encoders import ClipEncoder, EncoderConfig, add_encoder_to_bundle, load_encoder, parse_encoder_spec
from capdemo.lm import embedding_size, load_causal_lm
from capdemo.maccap import MACCAP_COMPONENT, MacCap, MacCapConfig, add_to_bundle, caption_text_embeddings
from capdemo.vqa import AnswerList
from capdemo.weights import WeightSource
from training.embed import add_corpus_arguments, cached_text_embeddings, corpus_from_arguments, corpus_sha256
from training.distributed import resolve_device
from training.loop import TrainConfig, TrainResult, TrainTask, frozen_weights_dtype, resolve_precision, train

TRAINING_RECORD = "maccap/training.json"  # bundle file: how the weights were trained


class CaptionDataset(Dataset):
    """Caption i as (CLIP text embedding (D,), token ids (L,), mask (L,)); all precomputed, so indexing is pure."""

    def __init__(self, text_embeds: torch.Tensor, token_ids: torch.Tensor, attention_mask: torch.Tensor):
        if not len(text_embeds) == len(token_ids) == len(attention_mask):
            raise ValueError(f"{len(text_embeds)} embeddings for {len(token_ids)} tokenised captions")
        self.text_embeds, self.token_ids, self.attention_mask = text_embeds, token_ids, attention_mask

    def __len__(self) -> int:
        return len(self.token_ids)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.text_embeds[index], self.token_ids[index], self.attention_mask[index]


def collate(samples: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Stack samples; cut the token columns to the batch's longest caption."""
    embeds, ids, mask = (torch.stack(column) for column in zip(*samples))
    length = int(mask.sum(1).max())
    return {"text_embeds": embeds, "token_ids": ids[:, :length], "attention_mask": mask[:, :length]}


def maccap_loss(model: MacCap, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return model.loss(batch["text_embeds"], batch["token_ids"], batch["attention_mask"])


def run_identity(config: MacCapConfig, captions: Sequence[str]) -> dict[str, Any]:
    """What a resumed run must share with the killed one: every model setting (the LM's location aside:
    a moved folder is the same model) and the exact caption list."""
    settings = {f"maccap.{name}": value for name, value in config.to_dict().items() if name != "lm"}
    return {**settings, "corpus_sha256": corpus_sha256(captions)}


def text_to_text_exact(model: MacCap, text_embeds: torch.Tensor, captions: list[str]) -> float:
    """Share of captions decoded (greedy, no noise) exactly from their own text embeddings."""
    decoded = caption_text_embeddings(model, text_embeds.to(model.device), beams=1)
    return sum(" ".join(a.split()) == " ".join(b.split()) for a, b in zip(decoded, captions)) / max(1, len(captions))


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

    ``lm``/``tokenizer`` default to loading ``config.lm``; ``config.embed_dim``
    and ``config.lm_embed_dim`` are taken from the encoder and the LM.
    ``eval_captions`` > 0 scores text-to-text exact match on that many training
    captions at every evaluation.
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

    task = TrainTask(model=model, dataset=CaptionDataset(text_embeds, token_ids, attention_mask), collate_fn=collate,
                     loss_fn=maccap_loss, evaluate=evaluate if eval_captions > 0 else None,
                     identity=run_identity(config, captions))
    result = train(task, train_config, resume=resume, stop_after=stop_after)
    bundle = None
    if result.finished and int(os.environ.get("RANK", "0")) == 0:
        bundle = write_bundle(out, model=model, encoder=encoder, encoder_config=encoder_config, answers=answers,
                              record={"captions": len(captions), "train": train_config.to_dict(),
                                      "history": result.history, "evaluations": result.evaluations},
                              name=name or Path(out).name)
    return MacCapRun(result=result, model=model, bundle=bundle)


def write_bundle(out: str | Path, *, model: MacCap, encoder: ClipEncoder, encoder_config: EncoderConfig,
                 answers: AnswerList | None, record: dict[str, Any], name: str) -> Path:
    """The bundle capdemo serves: encoder, MacCap (LM included when trained or local), answers, training record."""
    writer = BundleWriter.extending(out, name=name)  # keeps the bundle's other components (e.g. TOMCap)
    writer.set_info(description=f"MacCap trained text-only on {record['captions']} captions", overwrite=False)
    writer.remove(MACCAP_COMPONENT)
    try:
        copy_encoder = encoder_config.pretrained is None or Path(encoder_config.pretrained).exists()
        add_encoder_to_bundle(writer, encoder, encoder_config, copy_weights=copy_encoder)
        include_lm = model.config.train_lm or not WeightSource.parse(model.config.lm).on_hub
        add_to_bundle(writer, model, include_lm=include_lm)
        if answers is not None:
            answers.add_to_bundle(writer, encoder)
        writer.add_json(TRAINING_RECORD, record)
        return writer.finish()
    except BaseException:
        writer.abort()
        raise


# --------------------------------------------------------------------------------------------
# CLI


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m training maccap", description=__doc__.split("\n\n")[0])
    io = parser.add_argument_group("data and output")
    add_corpus_arguments(io)
    io.add_argument("--out", required=True, help="bundle folder to write (weights/NAME)")
    io.add_argument("--name", default=None, help="bundle name (default: the --out folder name)")
    io.add_argument("--encoder", default="ViT-B-32/openai",
                    help="frozen CLIP: MODEL[/PRETRAINED] as in ViT-B-32/openai, or an EncoderConfig JSON file")
    io.add_argument("--lm", default=None, help="causal LM: local save_pretrained folder or hf-hub:org/name@rev "
                                               "(default: the config's, OPT-1.3b)")
    io.add_argument("--config", default=None, help="MacCapConfig JSON file to start from (flags override it)")
    io.add_argument("--run-dir", default=None, help="checkpoints and history (default: runs/<bundle name>)")
    io.add_argument("--embeddings", default=None,
                    help="text-embedding cache folder (default: <run-dir>/text-embeddings)")
    io.add_argument("--vqa-answers", default=None, help="openvqa answer dictionary to ship with the bundle for VQA")

    model = parser.add_argument_group("model (default: the paper's settings; other MacCapConfig fields via --config)")
    model.add_argument("--train-lm", action=argparse.BooleanOptionalAction, default=None,
                       help="train the LM with the adaptor (the paper keeps it frozen)")
    model.add_argument("--n-query", type=int, default=None, help="learnable queries N_q = prefix length")
    model.add_argument("--n-cr", type=int, default=None, help="noisy text copies N_cr (= patches picked at inference)")
    model.add_argument("--noise-variance", type=float, default=None, help="region noise variance per dimension")
    model.add_argument("--width", type=int, default=None, help="adaptor width (default: the CLIP dimension)")
    model.add_argument("--layers", type=int, default=None, help="adaptor transformer-decoder layers")
    model.add_argument("--heads", type=int, default=None, help="adaptor attention heads")
    model.add_argument("--ffn-dim", type=int, default=None, help="adaptor feed-forward width")
    model.add_argument("--dropout", type=float, default=None, help="adaptor dropout")
    model.add_argument("--mlp-layers", type=int, default=None, help="Linear layers of the adaptor's output MLP")
    model.add_argument("--memory-layernorm", action=argparse.BooleanOptionalAction, default=None,
                       help="LayerNorm on the region features before cross-attention (not in the paper; tiny worlds)")
    model.add_argument("--max-caption-tokens", type=int, default=None, help="LM tokens per caption incl. EOS")

    optim = parser.add_argument_group("optimisation")
    optim.add_argument("--steps", type=int, default=None, help="optimizer steps (overrides --epochs)")
    optim.add_argument("--epochs", type=int, default=1, help="passes over the corpus")
    optim.add_argument("--batch-size", type=int, default=128, help="global batch size (paper: 128)")
    optim.add_argument("--grad-accum", type=int, default=1, help="micro-batches per step on each rank")
    optim.add_argument("--lr", type=float, default=4e-4, help="peak learning rate (paper: 4e-4)")
    optim.add_argument("--warmup", type=int, default=200, help="linear warmup steps (reference code: 200)")
    optim.add_argument("--min-lr-ratio", type=float, default=0.0, help="cosine floor as a fraction of --lr")
    optim.add_argument("--weight-decay", type=float, default=0.01, help="AdamW weight decay")
    optim.add_argument("--grad-clip", type=float, default=1.0, help="max gradient norm (0: no clipping)")
    optim.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                       help="autocast precision on GPU (auto: bf16 where supported); CPU trains in fp32")
    optim.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="training device")
    optim.add_argument("--seed", type=int, default=0, help="seeds the adaptor init, data order and noise")
    optim.add_argument("--checkpoint-every", type=int, default=500, help="steps between checkpoints")
    optim.add_argument("--eval-captions", type=int, default=64,
                       help="training captions scored text-to-text at each evaluation (0: none)")
    optim.add_argument("--eval-every", type=int, default=0, help="steps between evaluations (0: at the end only)")
    optim.add_argument("--resume", action="store_true", help="continue the run in --run-dir from its newest checkpoint")
    optim.add_argument("--stop-after", type=int, default=None, help="stop after this many steps as if killed (tests)")
    return parser


_MODEL_FLAGS = ("train_lm", "n_query", "n_cr", "noise_variance", "width", "layers", "heads", "ffn_dim", "dropout",
                "mlp_layers", "memory_layernorm", "max_caption_tokens")


def configs_from_arguments(args: argparse.Namespace) -> tuple[MacCapConfig, TrainConfig]:
    config = MacCapConfig.load_json(args.config) if args.config else MacCapConfig()
    config = config.replace(**{f: getattr(args, f) for f in _MODEL_FLAGS if getattr(args, f) is not None})
    if args.lm:
        config = config.replace(lm=args.lm)
    run_dir = args.run_dir or str(Path("runs") / (args.name or Path(args.out).name))
    train_config = TrainConfig(
        out_dir=run_dir, seed=args.seed, batch_size=args.batch_size, grad_accum=args.grad_accum, epochs=args.epochs,
        max_steps=args.steps, lr=args.lr, min_lr_ratio=args.min_lr_ratio, warmup_steps=args.warmup,
        weight_decay=args.weight_decay, grad_clip=args.grad_clip or None, precision=args.precision,
        device=args.device, checkpoint_every=args.checkpoint_every, eval_every=args.eval_every,
    )
    return config, train_config


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    config, train_config = configs_from_arguments(args)
    captions = corpus_from_arguments(args)
    encoder_config = parse_encoder_spec(args.encoder)
    device = resolve_device(train_config.device, local_rank=int(os.environ.get("LOCAL_RANK", "0")))
    encoder = load_encoder(encoder_config, device=device)
    answers = AnswerList.from_openvqa(args.vqa_answers) if args.vqa_answers else None
    run = train_maccap(
        captions, encoder=encoder, encoder_config=encoder_config, config=config, train_config=train_config,
        out=args.out, embeddings_dir=args.embeddings, answers=answers, eval_captions=args.eval_captions,
        resume=args.resume, stop_after=args.stop_after, name=args.name,
    )
    if run.bundle is not None:
        summary = {"bundle": str(run.bundle), "steps": run.result.step,
                   "final_loss": run.result.history[-1]["loss"] if run.result.history else None,
                   "evaluations": run.result.evaluations[-1:]}
        print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
