"""The command line every method's training subcommand shares: data and output, optimisation, the run summary.

A method's module (``training.maccap``, ``training.tomcap``, ``training.capdec``) adds only its own
model flags, in an argument group whose flag destinations are its config's field names, and its
optimisation defaults (:class:`OptimDefaults`); everything else, and turning the flags into the
method's config and a :class:`~training.loop.TrainConfig`, is here.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar
from collections.abc import Callable

from capdemo.bundle import BundleWriter
from capdemo.config import Config
from capdemo.encoders import ClipEncoder, EncoderConfig, add_encoder_to_bundle, load_encoder, parse_encoder_spec
from training.curves import require_tensorboard
from training.distributed import resolve_device
from training.embed import add_corpus_arguments, corpus_from_arguments
from training.loop import PRECISIONS, TrainConfig, TrainResult

log = logging.getLogger(__name__)

C = TypeVar("C", bound=Config)
MODEL_GROUP = "model"  # the argument group whose flags are fields of the method's config
TRAINING_RECORD_NAME = "training.json"  # <component>/training.json in a bundle: how the weights were trained


@dataclass(frozen=True)
class OptimDefaults:
    """A method's optimisation defaults (each flag's default; the help says where the value comes from)."""

    epochs: int
    batch_size: int
    lr: float
    warmup: int
    min_lr_ratio: float
    source: str  # where these come from, shown in --help ("paper", "reference code", ...)
    checkpoint_every: int = 500
    weight_decay: float = 0.01


def training_parser(prog: str, description: str, *, corpus_max_words: int | None = None) -> argparse.ArgumentParser:
    """A parser with the shared data-and-output flags; the caller adds its model group and :func:`add_optimisation`."""
    parser = argparse.ArgumentParser(prog=prog, description=description,
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    io = parser.add_argument_group("data and output")
    if corpus_max_words is None:
        add_corpus_arguments(io)
    else:
        add_corpus_arguments(io, max_words=corpus_max_words)
    io.add_argument("--out", required=True, help="bundle folder to write (weights/NAME); other methods in it are kept")
    io.add_argument("--name", default=None, help="bundle name (default: the --out folder name)")
    io.add_argument("--encoder", default="ViT-B-32/openai",
                    help="frozen CLIP: MODEL[/PRETRAINED] as in ViT-B-32/openai, a bundle folder, or an EncoderConfig "
                         "JSON file")
    io.add_argument("--lm", default=None, help="language model: local save_pretrained folder or hf-hub:org/name@rev "
                                               "(default: the method config's)")
    io.add_argument("--config", default=None, help="the method's config as a JSON file to start from (flags override)")
    io.add_argument("--run-dir", default=None,
                    help="checkpoints, history and caches (default: runs/<bundle name>/<method>)")
    io.add_argument("--embeddings", default=None,
                    help="text-embedding cache folder (default: <run-dir>/text-embeddings)")
    return parser


def add_optimisation(parser: argparse.ArgumentParser, defaults: OptimDefaults, *, eval_flag: str = "--eval-captions",
                     eval_help: str = "training captions decoded text-to-text at each evaluation (0: none)") -> None:
    """The shared loop's flags, with the method's defaults."""
    optim = parser.add_argument_group("optimisation", f"defaults: {defaults.source}")
    optim.add_argument("--steps", type=int, default=None, help="optimizer steps (overrides --epochs)")
    optim.add_argument("--epochs", type=int, default=defaults.epochs, help="passes over the corpus")
    optim.add_argument("--batch-size", type=int, default=defaults.batch_size, help="global batch size")
    optim.add_argument("--grad-accum", type=int, default=1, help="micro-batches per step on each rank")
    optim.add_argument("--lr", type=float, default=defaults.lr, help="peak learning rate")
    optim.add_argument("--warmup", type=int, default=defaults.warmup,
                       help="linear warm-up steps (a warning when over a tenth of the run)")
    optim.add_argument("--min-lr-ratio", type=float, default=defaults.min_lr_ratio,
                       help="the cosine decays to this fraction of --lr")
    optim.add_argument("--weight-decay", type=float, default=defaults.weight_decay, help="AdamW weight decay")
    optim.add_argument("--grad-clip", type=float, default=1.0, help="max gradient norm (0: no clipping)")
    optim.add_argument("--precision", default="auto", choices=PRECISIONS,
                       help="autocast precision on GPU (auto: bf16 where supported); CPU trains in fp32")
    optim.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="training device")
    optim.add_argument("--num-workers", type=int, default=0, help="DataLoader worker processes per rank")
    optim.add_argument("--seed", type=int, default=0, help="seeds the initialisation, data order and noise")
    optim.add_argument("--checkpoint-every", type=int, default=defaults.checkpoint_every,
                       help="steps between checkpoints")
    optim.add_argument(eval_flag, type=int, default=64, help=eval_help)
    optim.add_argument("--eval-every", type=int, default=0, help="steps between evaluations (0: at the end only)")
    optim.add_argument("--tensorboard", default=None, metavar="DIR",
                       help="also log the scalars to TensorBoard here (needs `pip install capdemo[tensorboard]`)")
    optim.add_argument("--resume", action="store_true", help="continue the run in --run-dir from its newest checkpoint")
    optim.add_argument("--stop-after", type=int, default=None, help="stop after this many steps as if killed (tests)")


def model_group(parser: argparse.ArgumentParser, description: str) -> Any:
    """The group for a method's model flags: each flag's ``dest`` must be a field of the method's config, its
    default None (left out: the config's value)."""
    return parser.add_argument_group(MODEL_GROUP, description)


def config_from_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace, config_class: type[C]) -> C:
    """The method's config: ``--config`` (or the defaults), then every model flag that was given, then ``--lm``."""
    config = config_class.load_json(args.config) if args.config else config_class()
    group = next(g for g in parser._action_groups if g.title == MODEL_GROUP)
    given = {a.dest: getattr(args, a.dest) for a in group._group_actions if getattr(args, a.dest) is not None}
    if args.lm:
        given["lm"] = args.lm
    return config.replace(**given)


def run_dir_of(args: argparse.Namespace, method: str) -> str:
    """``--run-dir``, else ``runs/<bundle name>/<method>``: methods written into one bundle keep apart their
    checkpoints and their embedding caches (their corpora may differ: MacCap drops captions over 15 words)."""
    return args.run_dir or str(Path("runs") / (args.name or Path(args.out).name) / method)


def train_config_from_arguments(args: argparse.Namespace, method: str) -> TrainConfig:
    """The loop's config from the optimisation flags; a missing tensorboard is a one-line error now, not later."""
    if args.tensorboard:
        require_tensorboard()
    return TrainConfig(
        out_dir=run_dir_of(args, method), seed=args.seed, batch_size=args.batch_size, grad_accum=args.grad_accum,
        epochs=args.epochs, max_steps=args.steps, lr=args.lr, min_lr_ratio=args.min_lr_ratio,
        warmup_steps=args.warmup, weight_decay=args.weight_decay, grad_clip=args.grad_clip or None,
        precision=args.precision, device=args.device, checkpoint_every=args.checkpoint_every,
        eval_every=args.eval_every, num_workers=args.num_workers, tensorboard_dir=args.tensorboard,
    )


def write_method_bundle(out: str | Path, *, name: str, component: str, description: str, encoder: Any,
                        encoder_config: Any, record: dict[str, Any], add: Callable[[BundleWriter], None]) -> Path:
    """Add (or replace) one method's component in the bundle ``out``, keeping the others: the encoder (its weights
    copied when they are local), what ``add`` writes, and the training record ``<component>/training.json``."""
    writer = BundleWriter.extending(out, name=name)
    writer.set_info(description=description, overwrite=False)
    writer.remove(component)
    try:
        copy_encoder = encoder_config.pretrained is None or Path(encoder_config.pretrained).exists()
        add_encoder_to_bundle(writer, encoder, encoder_config, copy_weights=copy_encoder)
        add(writer)
        writer.add_json(f"{component}/{TRAINING_RECORD_NAME}", record)
        return writer.finish()
    except BaseException:
        writer.abort()
        raise


@dataclass
class TrainingCommand:
    """A training command line, read: what every method's ``main`` starts from."""

    args: argparse.Namespace
    config: Any  # the method's config (--config, then the model flags)
    train_config: TrainConfig
    captions: list[str]  # the corpus, filtered as the flags say
    encoder_config: EncoderConfig
    encoder: ClipEncoder  # loaded on this rank's device


def read_command(parser: argparse.ArgumentParser, argv: list[str] | None, config_class: type[C], method: str, *,
                 check: Callable[[argparse.Namespace, Any], None] | None = None) -> TrainingCommand:
    """Parse ``argv`` and load what it names: the method's config, the loop's config, the corpus and the encoder
    (``check(args, config)`` runs first, to refuse a bad combination before anything loads)."""
    args = parser.parse_args(argv)
    config = config_from_arguments(parser, args, config_class)
    if check is not None:
        check(args, config)
    train_config = train_config_from_arguments(args, method)
    encoder_config = parse_encoder_spec(args.encoder)
    device = resolve_device(train_config.device, local_rank=int(os.environ.get("LOCAL_RANK", "0")))
    return TrainingCommand(args=args, config=config, train_config=train_config, captions=corpus_from_arguments(args),
                           encoder_config=encoder_config, encoder=load_encoder(encoder_config, device=device))


def print_summary(bundle: Path | None, result: TrainResult) -> None:
    """One JSON line on stdout when a run wrote its bundle (scripts read it)."""
    if bundle is None:
        return
    summary = {"bundle": str(bundle), "steps": result.step,
               "final_loss": result.history[-1]["loss"] if result.history else None,
               "evaluations": result.evaluations[-1:]}
    print(json.dumps(summary))


__all__ = ["OptimDefaults", "TrainingCommand", "add_optimisation", "config_from_arguments", "model_group",
           "print_summary", "read_command",
           "run_dir_of", "train_config_from_arguments", "training_parser", "write_method_bundle"]
