"""Training throughput (captions/s) and peak memory of both methods: cached text embeddings vs on the fly.

    python -m benchmarks.training_throughput [--quick] [--json] [--device cuda --dtype bf16]

Both methods train through the project's one loop (:func:`training.loop.train`)
on the tasks their trainers build:

* ``cached``: what ``python -m training maccap|tomcap`` does. The corpus's CLIP
  text embeddings are computed once into the sharded cache
  (:func:`training.embed.embed_corpus`, timed separately as ``cache_build_s``)
  and every step only reads them.
* ``on_the_fly``: the same task, but every step runs the frozen CLIP text tower
  on its captions (MacCap: the batch's captions; TOMCap: the input caption and
  its K prompt neighbours), as a pipeline without the cache would.

TOMCap's retrieval is done once before training in both variants (as its
trainer does). Throughput is measured from the end of the warm-up steps to the
last step; peak memory is the highest RSS (and, on CUDA, allocated memory)
during each variant's run. ``--quick`` / ``--tiny`` use the tiny test bundle's
model configs and short captions of the tiny corpus's words; the full run uses ViT-B/32 + GPT-2
base with random weights (MacCap trains its adaptor with the LM frozen, TOMCap
its cross-attention and LoRA) on synthetic captions.
"""

from __future__ import annotations

import gc
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from collections.abc import Callable

import torch
from torch.utils.data import Dataset

from benchmarks import common
from benchmarks.models import (
    TINY_CAPTION_WORDS,
    caption_words,
    random_clip,
    random_images,
    random_lm,
    synthetic_captions,
)
from capdemo.encoders import ClipEncoder
from capdemo.gap import GapCorrection, GapStats
from capdemo.lm import embedding_size
from capdemo.methods.maccap.model import MacCap, MacCapConfig
from capdemo.retrieval import CaptionDatastore
from capdemo.methods.tomcap.model import TOMCap, TOMCapConfig
from training.caption_data import CaptionDataset, collate, prefix_loss
from training import tomcap as tomcap_training
from training.embed import cached_text_embeddings
from training.loop import TrainConfig, TrainTask, train

NAME = "training_throughput"
VARIANTS = ("cached", "on_the_fly")
GAP_IMAGES = 64  # random images whose CLIP embeddings give TOMCap's gap statistics
SEED = 0


@dataclass(frozen=True)
class Plan:
    tiny_models: bool  # the tiny test bundle's configs, else random ViT-B/32 + GPT-2 base
    batch_size: int
    warmup_steps: int  # steps run before the clock starts
    measured_steps: int


def plan_for(settings: common.Settings) -> Plan:
    if settings.tiny:
        return Plan(tiny_models=True, batch_size=8, warmup_steps=1, measured_steps=2)
    if settings.quick:
        return Plan(tiny_models=True, batch_size=32, warmup_steps=3, measured_steps=17)
    return Plan(tiny_models=False, batch_size=32, warmup_steps=1, measured_steps=4)


class StepClock:
    """Wraps a collate function and notes when each batch is made: the loop makes batch ``s`` as step ``s`` starts."""

    def __init__(self, collate: Callable[[list[Any]], Any]):
        self.collate = collate
        self.times: list[float] = []

    def __call__(self, items: list[Any]) -> Any:
        self.times.append(time.perf_counter())
        return self.collate(items)


# ----------------------------------------------------------------------------------------- models and data


@dataclass
class Setup:
    """What both methods' tasks are built from."""

    encoder: ClipEncoder
    captions: list[str]
    make_lm: Callable[[bool], tuple[torch.nn.Module, Any]]  # cross_attention -> fresh (lm, tokenizer)
    maccap_config: dict[str, Any]
    tomcap_config: dict[str, Any]
    tiny: bool


def setup_for(plan: Plan, settings: common.Settings) -> Setup:
    steps = plan.warmup_steps + plan.measured_steps
    count = plan.batch_size * steps
    encoder = random_clip(tiny=plan.tiny_models, seed=SEED, device=settings.device)
    if plan.tiny_models:
        from capdemo.testing import TINY_MACCAP, TINY_TOMCAP
        from capdemo.testing import tiny_gpt2, tiny_tokenizer

        # short captions of the tiny corpus's words: a TOMCap prompt must fit the tiny GPT-2's 128 positions
        captions = synthetic_captions(count, words=caption_words(tiny_tokenizer(), tiny=True),
                                      length=TINY_CAPTION_WORDS, seed=SEED)

        def make_lm(cross_attention: bool):
            tokenizer = tiny_tokenizer()
            return tiny_gpt2(tokenizer, cross_attention=cross_attention, seed=SEED), tokenizer

        return Setup(encoder, captions, make_lm, dict(TINY_MACCAP), dict(TINY_TOMCAP), tiny=True)
    _, tokenizer = random_lm("gpt2", seed=SEED)
    captions = synthetic_captions(count, words=caption_words(tokenizer, tiny=False), seed=SEED)
    return Setup(encoder, captions, lambda cross: random_lm("gpt2", cross_attention=cross, seed=SEED), {}, {},
                 tiny=False)


def cached_embeddings(setup: Setup, folder: Path) -> tuple[torch.Tensor, float]:
    """The corpus's text embeddings through the training cache, and the seconds the cache took to build."""
    started = time.perf_counter()
    embeds = cached_text_embeddings(setup.captions, setup.encoder, folder)
    return embeds, time.perf_counter() - started


def fresh_text_embeds(encoder: ClipEncoder, texts: list[str], device: torch.device) -> torch.Tensor:
    """CLIP text embeddings (N, D) usable in a training graph (``encode_text`` returns inference tensors)."""
    return encoder.encode_text(texts).clone().to(device)


# ----------------------------------------------------------------------------------------- MacCap tasks


class CaptionTexts(Dataset):
    """Caption i as (text, token ids (L,), mask (L,)): MacCap's dataset without the embedding."""

    def __init__(self, captions: list[str], token_ids: torch.Tensor, attention_mask: torch.Tensor):
        self.captions, self.token_ids, self.attention_mask = captions, token_ids, attention_mask

    def __len__(self) -> int:
        return len(self.captions)

    def __getitem__(self, index: int) -> tuple[str, torch.Tensor, torch.Tensor]:
        return self.captions[index], self.token_ids[index], self.attention_mask[index]


def maccap_task(setup: Setup, variant: str, embeds: torch.Tensor) -> TrainTask:
    lm, tokenizer = setup.make_lm(False)
    config = MacCapConfig(lm="random", **{**setup.maccap_config, "embed_dim": setup.encoder.embed_dim,
                                          "lm_embed_dim": embedding_size(lm)})
    torch.manual_seed(SEED)
    model = MacCap(config, lm, tokenizer)
    token_ids, mask = model.tokenize(setup.captions)
    if variant == "cached":
        dataset = CaptionDataset(embeds, token_ids, mask)
        return TrainTask(model=model, dataset=dataset, collate_fn=collate, loss_fn=prefix_loss)

    def collate_texts(items: list[tuple[str, torch.Tensor, torch.Tensor]]) -> dict[str, Any]:
        texts, ids, masks = zip(*items)
        ids, masks = torch.stack(ids), torch.stack(masks)
        length = int(masks.sum(1).max())
        return {"captions": list(texts), "token_ids": ids[:, :length], "attention_mask": masks[:, :length]}

    def loss(trained: MacCap, batch: dict[str, Any]) -> torch.Tensor:
        text_embeds = fresh_text_embeds(setup.encoder, batch["captions"], trained.device)  # (B, D)
        return trained.loss(text_embeds, batch["token_ids"], batch["attention_mask"])

    return TrainTask(model=model, dataset=CaptionTexts(setup.captions, token_ids, mask), collate_fn=collate_texts,
                     loss_fn=loss)


# ----------------------------------------------------------------------------------------- TOMCap tasks


class IndexedExamples(Dataset):
    """TOMCap examples that also carry their index, so a loss can look up the texts behind them."""

    def __init__(self, examples: tomcap_training.TOMCapExamples):
        self.examples = examples

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> tuple[int, dict[str, torch.Tensor]]:
        return index, self.examples[index]


def tomcap_task(setup: Setup, variant: str, embeds: torch.Tensor) -> TrainTask:
    lm, tokenizer = setup.make_lm(True)
    config = TOMCapConfig(lm="random", **{**setup.tomcap_config, "embed_dim": setup.encoder.embed_dim})
    torch.manual_seed(SEED)
    model = TOMCap(config, lm, tokenizer)
    store = CaptionDatastore.build(embeds, setup.captions, encoder_name=setup.encoder.name, kind="flat")
    size = 32 if setup.tiny else 224
    image_embeds = setup.encoder.encode_image_embeds(
        setup.encoder.preprocess(random_images(GAP_IMAGES, size=size, seed=SEED)))
    gap_stats = GapStats.compute(image_embeds, embeds)
    examples = tomcap_training.prepare_examples(model, setup.captions, embeds, store, setup.encoder.encode_text,
                                                gap_stats=gap_stats, progress=False)
    if variant == "cached":
        return tomcap_training.build_task(model, examples)
    correction = GapCorrection(config.gap_correction)
    base_collate = tomcap_training.collate(model.pad_id)

    def collate(items: list[tuple[int, dict[str, torch.Tensor]]]) -> dict[str, Any]:
        return {**base_collate([item for _, item in items]), "index": torch.tensor([i for i, _ in items])}

    def loss(trained: TOMCap, batch: dict[str, Any]) -> torch.Tensor:
        indices = batch["index"].tolist()
        neighbours = [examples.parts(i)[1] for i in indices]
        texts = [examples.captions[i] for i in indices] + [text for row in neighbours for text in row]
        fresh = fresh_text_embeds(setup.encoder, texts, trained.device)  # (B + B K, D)
        batch_size = len(indices)
        inputs = gap_stats.correct(fresh[:batch_size], correction)  # (B, D)
        memory = fresh[batch_size:].view(batch_size, len(neighbours[0]), -1)  # (B, K, D)
        return trained.loss(inputs, memory, batch["input_ids"], batch["attention_mask"], batch["labels"])

    return TrainTask(model=model, dataset=IndexedExamples(examples), collate_fn=collate, loss_fn=loss)


TASKS: dict[str, Callable[[Setup, str, torch.Tensor], TrainTask]] = {"maccap": maccap_task, "tomcap": tomcap_task}


# ----------------------------------------------------------------------------------------- measuring


def precision_for(settings: common.Settings) -> str:
    """The loop's autocast precision: fp32 on CPU (the loop trains fp32 there), else the asked dtype."""
    return "fp32" if settings.device == "cpu" else settings.dtype


def measure(task: TrainTask, plan: Plan, settings: common.Settings, out_dir: Path) -> dict[str, Any]:
    """Train ``warmup + measured`` steps; captions/s over the measured ones and the run's peak memory."""
    clock = StepClock(task.collate_fn)
    task.collate_fn = clock
    steps = plan.warmup_steps + plan.measured_steps
    config = TrainConfig(out_dir=str(out_dir), seed=SEED, batch_size=plan.batch_size, max_steps=steps + 1,
                         lr=1e-4, checkpoint_every=0, log_every=steps, precision=precision_for(settings),
                         device=settings.device)
    with common.PeakMemory(settings.device) as memory:
        train(task, config, stop_after=steps)  # one step short of max_steps: no final checkpoint or evaluation
        common.synchronize(settings.device)
        finished = time.perf_counter()
    seconds = finished - clock.times[plan.warmup_steps]
    trainable = sum(p.numel() for p in task.model.parameters() if p.requires_grad)
    return {"captions_per_s": round(plan.measured_steps * plan.batch_size / seconds, 2),
            "s_per_step": round(seconds / plan.measured_steps, 4), "trainable_parameters": trainable,
            "memory": memory.to_dict()}


def run(*, quick: bool = False, tiny: bool = False, device: str = "cpu", dtype: str = "fp32") -> dict[str, Any]:
    started = time.perf_counter()
    settings = common.Settings(quick=quick, tiny=tiny, device=device, dtype=dtype)
    plan = plan_for(settings)
    methods: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="capdemo-bench-train-") as scratch:
        setup = setup_for(plan, settings)
        embeds, cache_s = cached_embeddings(setup, Path(scratch) / "text-embeddings")
        for method, build_task in TASKS.items():
            methods[method] = {}
            for variant in VARIANTS:
                task = build_task(setup, variant, embeds)
                methods[method][variant] = measure(task, plan, settings, Path(scratch) / f"{method}-{variant}")
                del task
                gc.collect()
            cached, on_the_fly = (methods[method][v]["captions_per_s"] for v in VARIANTS)
            methods[method]["cached_speedup"] = round(cached / on_the_fly, 3)
    figures = {
        "models": "tiny (capdemo.testing configs)" if plan.tiny_models else "random ViT-B-32 + gpt2",
        "batch_size": plan.batch_size,
        "measured_steps": plan.measured_steps,
        "corpus_captions": len(setup.captions),
        "cache_build_s": round(cache_s, 3),
        "cache_captions_per_s": round(len(setup.captions) / cache_s, 1),
        **methods,
    }
    return common.envelope(NAME, settings, figures, started=started)


def summary(result: dict[str, Any]) -> str:
    parts = []
    for method in TASKS:
        entry = result[method]
        rates = ", ".join(f"{v} {entry[v]['captions_per_s']:.4g} cap/s "
                          f"(peak RSS +{entry[v]['memory']['rss_delta_mb']:.0f} MB)" for v in VARIANTS)
        parts.append(f"{method}: {rates}, cached {entry['cached_speedup']:.2f}x")
    return f"{result['models']}, batch {result['batch_size']}: " + "; ".join(parts) + \
        f"; cache built at {result['cache_captions_per_s']:.4g} cap/s"


def main(argv: list[str] | None = None) -> int:
    return common.benchmark_main(NAME, run, summary, description=__doc__.split("\n\n")[0], argv=argv)


if __name__ == "__main__":
    raise SystemExit(main())
