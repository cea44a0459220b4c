"""``python -m training shapes --out weights/shapes``: rebuild the shipped shapes-world bundle from nothing.

Every stage runs the same commands a real-world user runs (``python -m training
index | gapstats | maccap | tomcap``), only on shapes captions and tiny models:

1. world data: a text-only caption corpus, unpaired images (for the image statistics), the world's VQA
   answer list, and the example images (chosen by scene kind from a held-out seed, before any training);
2. the tiny CLIP, trained contrastively on generated image-caption pairs (the only stage that sees images
   paired with text: it stands in for OpenAI's pretraining);
3. the tiny LM: a BPE tokenizer and GPT-2 trained on captions, TOMCap-shaped prompts and caption-grounded
   question-answer text in the VQA prompt format;
4. the caption datastore and the modality-gap statistics;
5. MacCap, TOMCap and CapDec, trained text-only, written into one bundle;
6. examples (``examples/scenes.json`` lists each with its caption, ``examples/questions.json`` a question about
   each with its answer, which the Ask tab offers), the untouched LM as ``vqa/lm`` (the
   ``vqa`` component's ``"lm": "bundle:vqa/lm"``: VQA follows the paper and answers with the frozen LM,
   while MacCap's own LM was trained for captioning), and provenance with per-stage timings in the manifest;
7. the bundle's domain (``python -m training shapes-domain``): the app's summary line and the in-domain CLIP-score
   range it warns against.

Stages cache their outputs in ``--work-dir``, so a killed build continues where it stopped; stages that need
nothing of each other run side by side (``--jobs``, :mod:`training.shapes.stage_pool`), with the same bytes.
``--smoke`` shrinks everything so the whole recipe runs in about a minute (CI).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import io
import json
import shlex
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

import capdemo  # noqa: F401  (the torchvision shim, before any model library)
from capdemo.bundle import IN_BUNDLE_PREFIX, Bundle, BundleWriter, update_info
from capdemo.encoders import ENCODER_CONFIG_FILE
from capdemo.pipeline import DEFAULT_METHOD_KEY
from capdemo.vqa import VQA_CAPTION_METHOD_KEY, VQA_COMPONENT, VQA_EXAMPLES_KEY
from capdemo.config import Config, ConfigError
from capdemo.fileio import atomic_output
from capdemo.methods.tomcap.model import SELECT_BY, TOMCAP_COMPONENT
from training.checkpoints import checkpoint_path
from training.kernels import kernels_in_force, pin_cpu_kernels
from training.loop import TrainConfig
from training.shapes.clip import TinyClipConfig
from training.shapes.domain import record_domain
from training.shapes import world
from training.shapes.lm import TinyLMConfig, pretrain_lm
from training.shapes.questions import answer_list, example_questions, qa_texts
from training.shapes.stage_pool import StagePool, clocks, seconds_since

VQA_LM = "vqa/lm"  # bundle folder: the untouched pretrained LM that answers questions (MacCap's VQA LM is frozen)
EXAMPLES_FILE = "examples/scenes.json"  # bundle file: each shipped example's image file and canonical caption
EXAMPLE_QUESTIONS_FILE = "examples/questions.json"  # bundle file: a question about each example, with its answer
# The tiny CLIP (TinyClipConfig): 56 px images, 8 px patches (ViT-B/32's 7x7 grid), a 256-d joint space, in-batch
# negatives plus 3 near misses per pair, 50k pairs x 6 epochs at batch 128. The logit scale is fixed at 300, not
# CLIP's 100: measured on held-out pairs, 100 let training close the gap to 0.44 (paired cosine 0.70) by the time
# retrieval was half-way useful, 200 kept 0.55 at i2t 0.92, 300 keeps 0.57 at i2t 0.88 (trials in
# docs/shapes-world-history.md).
# The ViT pools by the mean of its patch tokens (vision_pool "avg"): pooled by its CLS token, a 3-layer ViT's patch
# tokens never meet the text, no subregion was ever closer to a caption than the image (real CLIP: 33 %) and MacCap's
# subregion aggregation captioned 0.05 of scenes; averaged, 23 % of images have a closer subregion and it scored 0.63.
# Image views (0.25 of an image-to-image InfoNCE at inverse temperature 200) ask the image tower for what a caption
# would not predict, which keeps the gap open (0.58 -> 0.86, paired cosine 0.76 -> 0.45 at 4 epochs); 6 epochs
# instead of 4 buy back retrieval and captions (gap 0.81, cosine 0.52, i2t 0.95; docs/shapes-world-history.md,
# "Longer CLIP training").
SHAPES_CLIP = dict(image_size=56, patch_size=8, embed_dim=256, vision_width=96, vision_layers=3, vision_pool="avg",
                   logit_scale=300.0, pairs=50_000, same_scene_positives=False, image_views=0.25,
                   image_views_scale=200.0)
SHAPES_CLIP_TRAIN = dict(batch_size=128, epochs=6, lr=2e-3)
# The CLIP's draw (its initialisation and batch order). Whether this 3-layer ViT grows position-bound attention sinks
# (Darcet et al. 2023) is its initialisation's: of this recipe's CLIPs from seeds 0, 1 and 2, 0.355, 0.663 and 0.509
# of MacCap's N_cr picks land on the objects of the world's test split (at most 0.693), retrieval alike (i2t R@1
# 0.957, 0.959, 0.957; seed 2 a one-thread trial; docs/shapes-world-history.md, "A CLIP without attention sinks").
# The recipe takes seed 1's, so the app's heatmap shows the objects MacCap reads; another draw (--seed S) moves it
# with every other stage, to 1 + S.
SHAPES_CLIP_SEED = 1


# World v1, the world shipped before v2: 32 px images (a 4x4 patch grid), flat backgrounds, nothing unmentioned,
# groups of up to three; a 64-d CLIP at CLIP's logit scale 100, 40k pairs x 5 epochs at batch 256 (i2t 0.96, gap
# 0.29: far better aligned than real CLIP, which is why world v2 exists).
WORLD_V1 = dict(image_size=32, background="plain", clutter=0, occlusion=0.0, max_count=3)
SHAPES_CLIP_V1 = dict(image_size=32, patch_size=8, embed_dim=64, vision_width=96, vision_layers=3,
                      logit_scale=100.0, pairs=40_000, same_scene_positives=False)
SHAPES_CLIP_V1_TRAIN = dict(batch_size=256, epochs=5, lr=2e-3, warmup_steps=50)
# TOMCap's optimisation in both worlds (world v2's recipe adds its training noise to it)
_TOMCAP_OPTIMISATION = ("--batch-size", "32", "--lr", "2e-3", "--warmup", "60", "--lora-r", "32")
# World v2's TOMCap training noise, x sigma_I on input and query: not the paper's 0.5, which in this world's gap is no
# better than no gap handling; 4 is the ablation's best (README, shapes world; TOMCapConfig keeps 0.5)
TOMCAP_NOISE_SCALE = "4"


def _shapes_clip(architecture: dict[str, Any] = SHAPES_CLIP, train: dict[str, Any] = SHAPES_CLIP_TRAIN, *,
                 seed: int = 0) -> TinyClipConfig:
    config = TinyClipConfig(**architecture, init_seed=seed)
    return config.replace(train=config.train.replace(**train, seed=seed))


@dataclass
class ShapesRecipe(Config):
    """Sizes of every stage; ``full()`` makes the shipped bundle, ``smoke()`` the CI one."""

    world: world.WorldConfig = field(default_factory=world.WorldConfig)
    clip: TinyClipConfig = field(default_factory=lambda: _shapes_clip(seed=SHAPES_CLIP_SEED))  # and its training
    corpus_captions: int = 20000  # text-only captions drawn (the commands get --dedupe: ~2.5k distinct ones)
    unpaired_images: int = 2000  # images for the image-side gap statistics (never paired with text)
    qa_texts: int = 40000  # question-answer texts for LM pretraining (so the frozen shapes LM answers questions)
    qa_per_text: int = 3  # questions (with answers) per question-answer text
    prompt_texts: int = 4000  # TOMCap-prompt-shaped texts for LM pretraining (its template words, listing captions)
    examples: int = 8  # example images shipped in the bundle
    domain_images: int = 100  # held-out images that measure the in-domain CLIP-score range (the app's warning)
    lm: TinyLMConfig = field(default_factory=TinyLMConfig)
    # LM pretraining steps (batch 64 x 48 tokens). Reading an answer back from the caption emerges late and
    # suddenly: held-out answer-token accuracy was 0.51 after 500 steps, 0.70 after 1000, 0.86 after 2000 and 0.85
    # after 3000 (world v1 shipped with 200, which never reached it)
    lm_steps: int = 3000
    lm_lr: float = 1e-3  # LM pretraining peak lr (world v1 and the first v2 bundle: 3e-3; see answer_weight)
    # MacCap text-only training steps. At 1500 (the bundles shipped until 2026-12-05) the recipe's MacCap was short
    # of converged: three training seeds captioned 0.531 +- 0.086 of the held-out scenes there, 0.630 +- 0.012 at
    # 3000 (ablation.json). It trains beside TOMCap's longer stage, so the build takes no longer
    maccap_steps: int = 3000
    maccap_args: tuple[str, ...] = (
        "--train-lm", "--memory-layernorm", "--n-query", "8", "--n-cr", "10", "--width", "64", "--heads", "4",
        "--ffn-dim", "256", "--batch-size", "64", "--lr", "3e-3", "--warmup", "100",
    )  # the shapes LM must train with the adaptor (shapes-world-prototype.md, round 2)
    tomcap_steps: int = 2400  # TOMCap text-only training steps
    tomcap_args: tuple[str, ...] = (*_TOMCAP_OPTIMISATION, "--input-noise-scale", TOMCAP_NOISE_SCALE,
                                    "--query-noise-scale", TOMCAP_NOISE_SCALE)
    # the shipped bundle's pick among TOMCap's beams, written into its tomcap component after training (a decoding
    # choice: no training command sees it). "clip": capdemo's CLIP rerank of the beams, not the paper's beam order
    # ("beam"), which TOMCapConfig keeps: on the bundle's 500 held-out scenes it captions 0.864 against 0.794, and
    # 0.862-0.866 against 0.756-0.796 over three training draws (README, shapes world); None: the trained config's
    tomcap_select_by: str | None = "clip"
    capdec_steps: int = 1500  # CapDec text-only training steps
    # CapDec's mapper scaled to the 128-wide shapes LM (the paper's: 40 prefix vectors, 8 layers, 8 heads)
    capdec_args: tuple[str, ...] = ("--prefix-length", "8", "--clip-length", "8", "--mapper-layers", "2",
                                    "--mapper-heads", "4", "--batch-size", "64", "--lr", "2e-3", "--warmup", "100")
    # the method the app shows first and whose captions VQA reads (bundle.json's default_method and the vqa
    # component's caption_method); None: MacCap, the paper's VQA captioner. TOMCap leads world v2: it captions the
    # held-out scenes best (0.79 against MacCap's 0.62; on the seed-0 CLIP 0.80 against 0.64, where VQA read its
    # captions better too: 0.83 against 0.76)
    lead_method: str | None = "tomcap"
    seed: int = 0

    def __post_init__(self) -> None:
        if self.lead_method is not None and self.lead_method not in METHOD_COMMANDS:
            raise ValueError(f"ShapesRecipe.lead_method must be one of {', '.join(METHOD_COMMANDS)} or null, "
                             f"got {self.lead_method!r}")
        if self.tomcap_select_by is not None and self.tomcap_select_by not in SELECT_BY:
            raise ValueError(f"ShapesRecipe.tomcap_select_by must be one of {', '.join(SELECT_BY)} or null, "
                             f"got {self.tomcap_select_by!r}")

    def steps_of(self, method: str) -> int:
        """The recipe's training steps of ``method`` (one of the three it trains)."""
        return {"maccap": self.maccap_steps, "tomcap": self.tomcap_steps, "capdec": self.capdec_steps}[method]

    @classmethod
    def full(cls) -> ShapesRecipe:
        return cls()

    def with_training_seed(self, seed: int) -> ShapesRecipe:
        """This recipe trained from ``seed``: the LM's initialisation and question-answer text and every method's
        training from ``seed``, the CLIP's initialisation and batch order from its own seed plus ``seed``. The world's
        images, corpus and examples stay the recipe's, so another seed is another draw of the same recipe (0 made
        the shipped bundle). The CLIP's seeds move by the change of training seed, so a recipe already drawn from
        another seed is redrawn, never compounded."""
        clip, shift = self.clip, seed - self.seed
        return self.replace(seed=seed, clip=clip.replace(init_seed=clip.init_seed + shift,
                                                         train=clip.train.replace(seed=clip.train.seed + shift)))

    @classmethod
    def world_v1(cls) -> ShapesRecipe:
        """World v1's recipe (the bundle shipped before world v2): its world, its CLIP and its 200 LM steps;
        everything else as in ``full``."""
        return cls(world=world.WorldConfig(**WORLD_V1), clip=_shapes_clip(SHAPES_CLIP_V1, SHAPES_CLIP_V1_TRAIN),
                   lm=TinyLMConfig(answer_weight=5.0), lm_steps=200, lm_lr=3e-3,
                   tomcap_args=_TOMCAP_OPTIMISATION,  # v1's TOMCap trained at the paper's noise
                   lead_method=None,  # and MacCap led
                   tomcap_select_by=None)  # and TOMCap decoded in the paper's beam order

    @classmethod
    def smoke(cls) -> ShapesRecipe:
        return cls(clip=TinyClipConfig.smoke().replace(**{**SHAPES_CLIP, "vision_width": 64, "vision_layers": 2,
                                                          "pairs": 4_000}),
                   corpus_captions=3000, unpaired_images=300, qa_texts=1000, prompt_texts=500, examples=3,
                   domain_images=20, lm=TinyLMConfig(n_embd=64, n_layer=2, n_positions=128), lm_steps=40,
                   lm_lr=3e-3,  # 40 steps at the full recipe's 1e-3 leave an LM TOMCap cannot learn from (CIDEr 0.03)
                   maccap_steps=120,
                   maccap_args=cls().maccap_args[:-6] + ("--batch-size", "32", "--lr", "3e-3", "--warmup", "20"),
                   tomcap_steps=60,
                   tomcap_args=("--batch-size", "16", "--lr", "3e-3", "--warmup", "10", "--lora-r", "16"),
                   capdec_steps=60, capdec_args=cls().capdec_args[:-6] + ("--batch-size", "32", "--lr", "3e-3",
                                                                          "--warmup", "6"))


def log(message: str) -> None:
    print(f"[shapes] {message}", file=sys.stderr, flush=True)


@dataclass(frozen=True)
class StageOutputs:
    """Where the build's stages leave what the training commands read, inside its work dir."""

    work: Path

    @property
    def corpus(self) -> Path:
        return self.work / "corpus.txt"

    @property
    def encoder(self) -> Path:
        return self.work / "clip" / ENCODER_CONFIG_FILE  # EncoderConfig JSON; the weights sit beside it

    @property
    def lm(self) -> Path:
        return self.work / "lm"

    @property
    def lm_done(self) -> Path:
        return self.work / "lm.done"  # written once the LM and its tokenizer are saved (outside lm/, which ships)

    @property
    def answers(self) -> Path:
        return self.work / "answers.json"  # the world's VQA answer list, openvqa format

    @property
    def datastore(self) -> Path:
        return self.work / "datastore"

    @property
    def datastore_done(self) -> Path:
        return self.datastore / "datastore.json"

    @property
    def recipe(self) -> Path:
        return self.work / "recipe.json"  # the recipe the stage outputs were made with

    @property
    def examples_done(self) -> Path:
        return self.work / "examples" / "done"  # the world data's last output

    @property
    def gap_stats(self) -> Path:
        return self.work / "gap_stats.safetensors"

    def method_run(self, method: str) -> Path:
        return self.work / f"{method}-run"  # a method's training run: checkpoints, history, run record

    def method_bundle(self, method: str) -> Path:
        return self.work / "trained" / method  # the bundle a method's training command wrote, before assembly

    def missing(self) -> list[str]:
        """The stage outputs not (completely) written yet, as paths relative to the work dir."""
        done = [self.corpus, self.encoder, self.lm_done, self.datastore_done, self.gap_stats]
        return [str(path.relative_to(self.work)) for path in done if not path.is_file()]

    def require_finished(self) -> None:
        """Raise a one-line ValueError naming what is missing when the build has not finished."""
        missing = self.missing()
        if missing:
            raise ValueError(f"{self.work} is not a finished shapes build (missing {', '.join(missing)}); "
                             "run python -m training shapes --work-dir first")


def claim_work_dir(recipe: ShapesRecipe, work: Path) -> None:
    """Record ``recipe`` as the one ``work``'s stage outputs are made with, or, if the work dir holds another
    recipe's, raise a one-line ValueError naming what differs: resuming would mix two recipes' stages. A field
    added to the recipe since the work dir was made counts at its default (which keeps the earlier behaviour)."""
    stages = StageOutputs(work)
    now = json.loads(json.dumps(recipe.to_dict()))
    if not stages.recipe.is_file():
        with atomic_output(stages.recipe) as tmp:
            tmp.write_text(json.dumps(now, indent=1))
        return
    hint = "resume it with the same settings, or start again with --fresh or another --work-dir"
    try:
        recorded = ShapesRecipe.from_dict(json.loads(stages.recipe.read_text()), where=str(stages.recipe))
    except ConfigError as err:  # e.g. a field this code no longer has
        raise ValueError(f"{work} holds the stages of another recipe ({err}): {hint}") from err
    before = json.loads(json.dumps(recorded.to_dict()))
    changed = sorted(key for key in {*before, *now} if before.get(key) != now.get(key))
    if changed:
        raise ValueError(f"{work} holds the stages of another recipe ({', '.join(changed)} differ): {hint}")


def examples_seed(config: world.WorldConfig) -> int:
    """The world seed the shipped examples come from (never a training seed; shapes-eval refuses it)."""
    return config.test_seed + 1


def write_world_data(recipe: ShapesRecipe, work: Path) -> dict[str, Path]:
    """Corpus, unpaired images, the VQA answer list and the examples on disk (each skipped when already there).

    The examples follow :func:`training.shapes.world.example_pairs` (scene kinds in rotation from a held-out
    seed), a rule fixed before training; ``examples/scenes.json`` lists each file with its canonical caption.
    """
    stages = StageOutputs(work)
    paths = {"corpus": stages.corpus, "unpaired": work / "unpaired", "examples": work / "examples",
             "answers": stages.answers}
    config = recipe.world
    if not paths["corpus"].is_file():
        captions = world.generate_captions(recipe.corpus_captions, seed=config.text_seed, config=config)
        if config.novel:  # the novel scenes' captions are left out
            novel = world.novel_scenes(config)
            captions = [caption for caption in captions if world.parse_caption(caption) not in novel]
        with atomic_output(paths["corpus"]) as tmp:
            tmp.write_text("\n".join(captions) + "\n")
    if not paths["answers"].is_file():  # the openvqa format `python -m training maccap --vqa-answers` reads
        with atomic_output(paths["answers"]) as tmp:
            answers = answer_list(colours=config.colours, shapes=config.shapes, max_count=config.max_count)
            tmp.write_text(json.dumps([{a: i for i, a in enumerate(answers)}, dict(enumerate(answers))]))
    unpaired = paths["unpaired"]
    if not (unpaired / "done").is_file():
        unpaired.mkdir(parents=True, exist_ok=True)
        for i, image in enumerate(world.generate_images(recipe.unpaired_images, seed=config.unpaired_seed,
                                                        config=config)):
            image.save(unpaired / f"unpaired-{i:05d}.png")
        (unpaired / "done").write_text("")
    if not (stages.examples_done.is_file() and (paths["examples"] / Path(EXAMPLE_QUESTIONS_FILE).name).is_file()):
        write_examples(recipe, paths["examples"])
        stages.examples_done.write_text("")
    return paths


def write_examples(recipe: ShapesRecipe, examples: Path) -> None:
    """The example images in ``examples``, with ``scenes.json`` (each file's canonical caption) and
    ``questions.json`` (a question about each, with its answer: :func:`training.shapes.questions.example_questions`).
    """
    config = recipe.world
    examples.mkdir(parents=True, exist_ok=True)
    listed, scenes = [], []
    for i, (scene, image, _) in enumerate(world.example_pairs(recipe.examples, seed=examples_seed(config),
                                                              config=config)):
        image.save(examples / f"example-{i}-{scene.kind}.png")
        listed.append({"file": f"examples/example-{i}-{scene.kind}.png", "caption": world.captions(scene)[0]})
        scenes.append(scene)
    (examples / Path(EXAMPLES_FILE).name).write_text(json.dumps(listed, indent=1) + "\n")
    asked = example_questions(scenes, seed=examples_seed(config), colours=config.colours, shapes=config.shapes)
    (examples / Path(EXAMPLE_QUESTIONS_FILE).name).write_text(json.dumps(
        [{"image": entry["file"], "question": q.text, "answer": q.answer, "type": q.kind}
         for entry, q in zip(listed, asked)], indent=1) + "\n")


def train_encoder(recipe: ShapesRecipe, work: Path) -> Path:
    """The tiny CLIP as an EncoderConfig JSON whose weights sit next to it."""
    from capdemo.encoders import OPEN_CLIP_WEIGHTS_FILE
    from safetensors.torch import save_file
    from training.shapes.clip import train_clip

    spec = StageOutputs(work).encoder
    if spec.is_file():
        return spec
    clip_config = recipe.clip.replace(train=recipe.clip.train.replace(out_dir=str(work / "clip-run")))
    encoder, encoder_config, metrics = train_clip(clip_config, world=recipe.world, resume=True)
    spec.parent.mkdir(parents=True, exist_ok=True)
    weights = spec.parent / OPEN_CLIP_WEIGHTS_FILE
    with atomic_output(weights) as tmp:
        save_file({k: v.contiguous() for k, v in encoder.model.state_dict().items()}, str(tmp))
    with atomic_output(spec.parent / "metrics.json") as tmp:
        tmp.write_text(json.dumps(metrics, indent=1))
    encoder_config.replace(pretrained=str(weights.resolve())).save_json(spec)
    log(f"tiny CLIP: {json.dumps({k: v for k, v in metrics.items() if isinstance(v, (int, float))})}")
    return spec


def qa_seed(config: world.WorldConfig) -> int:
    """The world seed of the scenes the LM's question-answer pretraining text is about."""
    return config.text_seed + 7


def train_language_model(recipe: ShapesRecipe, work: Path, corpus: Path) -> Path:
    """The tiny LM (tokenizer + GPT-2) pretrained on captions, question-answer text and TOMCap-shaped prompts.

    This LM is what TOMCap adapts (its base stays frozen), what MacCap's ``--train-lm`` starts from, and,
    untouched, what answers questions (the bundle's ``vqa/lm``).
    """
    from capdemo.lm import save_causal_lm

    stages = StageOutputs(work)
    if stages.lm_done.is_file():
        return stages.lm
    lm, tokenizer, result = pretrain_shapes_lm(recipe, corpus, run_dir=work / "lm-run")
    log(f"LM: loss {result.history[-1]['loss']:.3f} after {result.step} steps")
    save_causal_lm(lm, tokenizer, stages.lm)
    stages.lm_done.write_text("")
    return stages.lm


def lm_train_config(recipe: ShapesRecipe, run_dir: Path) -> TrainConfig:
    """How the recipe's LM pretrains: batch 64, ``recipe.lm_lr``, 10 % warmup, ``recipe.lm_steps`` steps in
    ``run_dir``."""
    return TrainConfig(out_dir=str(run_dir), seed=recipe.seed, batch_size=64, max_steps=recipe.lm_steps,
                       lr=recipe.lm_lr, warmup_steps=max(1, recipe.lm_steps // 10), checkpoint_every=0, log_every=50)


def pretrain_shapes_lm(recipe: ShapesRecipe, corpus: Path, *, run_dir: Path, train_config: TrainConfig | None = None):
    """Pretrain the recipe's LM on ``corpus`` (one caption per line) plus the recipe's question-answer and
    TOMCap-prompt texts, training in a fresh ``run_dir`` (``train_config``: instead of :func:`lm_train_config`,
    for the shapes-lm trials); returns ``(lm, tokenizer, TrainResult)``."""
    captions = [line for line in corpus.read_text().splitlines() if line]
    scenes = world.generate_scenes(recipe.qa_texts, seed=qa_seed(recipe.world), config=recipe.world)
    if recipe.world.novel:  # as in the corpus, the novel scenes are left out
        novel = world.novel_scenes(recipe.world)
        scenes = [scene for scene in scenes if scene not in novel]
    rng = np.random.default_rng(recipe.seed)
    qa = qa_texts(scenes, rng, colours=recipe.world.colours, shapes=recipe.world.shapes, per_text=recipe.qa_per_text)
    prompts = prompt_texts(captions, recipe.prompt_texts, rng)
    train_config = (train_config or lm_train_config(recipe, run_dir)).replace(out_dir=str(run_dir))
    shutil.rmtree(train_config.out_dir, ignore_errors=True)
    return pretrain_lm([*captions, *prompts], recipe.lm, train_config, aligned_texts=qa)


def prompt_texts(captions: list[str], count: int, rng: np.random.Generator) -> list[str]:
    """Texts in TOMCap's prompt format (its default template) that end by repeating one listed caption."""
    from capdemo.methods.tomcap.model import TOMCapConfig

    config = TOMCapConfig()
    texts = []
    for _ in range(count):
        listed = [captions[int(i)] for i in rng.integers(len(captions), size=config.k)]
        prompt = config.prompt_template.format(captions=config.caption_separator.join(listed))
        texts.append(f"{prompt} {listed[int(rng.integers(config.k))]}")
    return texts


def run_command(argv: list[str]) -> None:
    """One ``python -m training`` command, in process, exactly as a user would run it; what it prints goes to
    stderr with the build's log (a worker's stdout is the build's too, and the build prints no report)."""
    from training.__main__ import main

    log("python -m training " + " ".join(argv))
    with contextlib.redirect_stdout(sys.stderr):
        status = main(argv)
    if status:
        raise SystemExit(f"training command failed with status {status}: {' '.join(argv)}")


def maccap_command(recipe: ShapesRecipe, work: Path, *, out: Path, run_dir: Path, steps: int | None = None,
                   extra: tuple[str, ...] = ()) -> list[str]:
    """The recipe's ``python -m training maccap`` arguments on a work dir's stage outputs (``extra`` last wins);
    the bundle gets the world's VQA answer list."""
    stages = StageOutputs(work)
    return ["maccap", "--corpus", str(stages.corpus), "--dedupe", "--encoder", str(stages.encoder),
            "--lm", str(stages.lm), "--out", str(out), "--run-dir", str(run_dir),
            "--steps", str(recipe.maccap_steps if steps is None else steps), "--seed", str(recipe.seed),
            "--vqa-answers", str(stages.answers), "--device", "cpu", *recipe.maccap_args, *extra, "--resume"]


def tomcap_command(recipe: ShapesRecipe, work: Path, *, out: Path, run_dir: Path, steps: int | None = None,
                   extra: tuple[str, ...] = ()) -> list[str]:
    """The recipe's ``python -m training tomcap`` arguments on a work dir's stage outputs (``extra`` last wins)."""
    stages = StageOutputs(work)
    return ["tomcap", "--corpus", str(stages.corpus), "--dedupe", "--datastore", str(stages.datastore),
            "--gap-stats", str(stages.gap_stats), "--encoder", str(stages.encoder),
            "--lm", str(stages.lm), "--out", str(out), "--run-dir", str(run_dir),
            "--steps", str(recipe.tomcap_steps if steps is None else steps), "--seed", str(recipe.seed),
            "--device", "cpu", *recipe.tomcap_args, *extra, "--resume"]


def capdec_command(recipe: ShapesRecipe, work: Path, *, out: Path, run_dir: Path, steps: int | None = None,
                   extra: tuple[str, ...] = ()) -> list[str]:
    """The recipe's ``python -m training capdec`` arguments on a work dir's stage outputs (``extra`` last wins)."""
    stages = StageOutputs(work)
    return ["capdec", "--corpus", str(stages.corpus), "--dedupe", "--encoder", str(stages.encoder),
            "--lm", str(stages.lm), "--out", str(out), "--run-dir", str(run_dir),
            "--steps", str(recipe.capdec_steps if steps is None else steps), "--seed", str(recipe.seed),
            "--device", "cpu", *recipe.capdec_args, *extra, "--resume"]


TRAINING_COMMANDS = {"maccap": maccap_command, "tomcap": tomcap_command, "capdec": capdec_command}


class StageTimes:
    """Wall and CPU seconds per build stage, kept in ``<work>/timings.json`` so a resumed build reports every
    stage: a stage whose output was complete before it ran keeps the time it took when it did the work."""

    def __init__(self, work: Path):
        self.file = work / "timings.json"
        self.seconds: dict[str, dict[str, float]] = json.loads(self.file.read_text()) if self.file.is_file() else {}

    @contextlib.contextmanager
    def __call__(self, stage: str, *, complete: bool):
        """Time ``stage`` in this process; ``complete``: its output was already there, so it only re-reads or
        re-exports."""
        start = clocks()
        yield
        self.record(stage, seconds_since(start), complete=complete)

    def record(self, stage: str, seconds: dict[str, float], *, complete: bool) -> None:
        """Keep ``seconds`` as ``stage``'s time, unless the stage was ``complete`` before and has a time already."""
        if complete and stage in self.seconds:
            return
        self.seconds[stage] = seconds
        with atomic_output(self.file) as tmp:
            tmp.write_text(json.dumps(self.seconds, indent=1))


RUN_RECORDS = ("training.json", "bundle.json")  # bundle files that name their own run dirs and timings


def built_files(bundle: Path) -> dict[str, bytes]:
    """Every file of a built bundle but its run records, by path: what two builds of one recipe must share."""
    return {path.relative_to(bundle).as_posix(): path.read_bytes() for path in sorted(bundle.rglob("*"))
            if path.is_file() and path.name not in RUN_RECORDS}


def trained(run_dir: Path, steps: int) -> bool:
    """Whether a training command's run dir holds its final checkpoint (so ``--resume`` only re-exports)."""
    return checkpoint_path(run_dir / "checkpoints", steps).is_file()


def index_and_measure(work: Path, unpaired: Path) -> None:
    """The caption datastore and the modality-gap statistics, each unless already there (they need the CLIP)."""
    stages = StageOutputs(work)
    corpus, encoder = str(stages.corpus), str(stages.encoder)
    if not stages.datastore_done.is_file():
        run_command(["index", "--corpus", corpus, "--dedupe", "--encoder", encoder, "--out", str(stages.datastore),
                     "--kind", "flat"])
    if not stages.gap_stats.is_file():
        run_command(["gapstats", "--images", str(unpaired), "--corpus", corpus, "--dedupe", "--encoder", encoder,
                     "--out", str(stages.gap_stats)])


METHOD_COMMANDS = {"maccap": maccap_command, "tomcap": tomcap_command, "capdec": capdec_command}  # bundle order


def build(recipe: ShapesRecipe, out: Path, work: Path, *, command: str = "python -m training shapes",
          jobs: int = 1) -> Path:
    """Run every stage not done yet in ``work``, then write the bundle to ``out``; with ``jobs`` > 1, stages that
    need nothing of each other run side by side (:mod:`training.shapes.stage_pool`: the same weights, sooner)."""
    start = time.time()
    kernels = kernels_in_force()  # before the first stage: what every stage trains on
    work.mkdir(parents=True, exist_ok=True)
    claim_work_dir(recipe, work)
    torch.manual_seed(recipe.seed)
    timed = StageTimes(work)
    stages = StageOutputs(work)
    with timed("world data", complete=stages.examples_done.is_file()):
        data = write_world_data(recipe, work)
    complete = {"clip": stages.encoder.is_file(), "lm": stages.lm_done.is_file(),
                "datastore + gap statistics": stages.datastore_done.is_file() and stages.gap_stats.is_file(),
                **{method: trained(stages.method_run(method), recipe.steps_of(method)) for method in METHOD_COMMANDS}}
    with StagePool(jobs) as pool:
        runs = {"clip": pool.submit(train_encoder, recipe, work),  # the CLIP and the LM need nothing of each other
                "lm": pool.submit(train_language_model, recipe, work, data["corpus"])}
        timed.record("clip", runs["clip"].result().seconds, complete=complete["clip"])
        runs["datastore + gap statistics"] = pool.submit(index_and_measure, work, data["unpaired"])
        for stage in ("lm", "datastore + gap statistics"):
            timed.record(stage, runs[stage].result().seconds, complete=complete[stage])
        # each method trains into a bundle of its own (TOMCap, the longest, first); the shipped one is assembled below
        untrained = [method for method in ("tomcap", "maccap", "capdec") if not complete[method]]
        runs.update({method: pool.submit(run_command, METHOD_COMMANDS[method](
            recipe, work, out=stages.method_bundle(method), run_dir=stages.method_run(method)))
            for method in untrained})
        for method in untrained:
            timed.record(method, runs[method].result().seconds, complete=False)
    staging = work / "bundle"
    shutil.rmtree(staging, ignore_errors=True)
    for method, command_of in METHOD_COMMANDS.items():
        with timed(method, complete=True):  # its run dir holds the final checkpoint: --resume only exports it
            run_command(command_of(recipe, work, out=staging, run_dir=stages.method_run(method)))
    staged = Bundle.load(staging)  # the three methods' bundles, as their commands wrote them
    answers = staged.component(VQA_COMPONENT)  # written by the maccap command
    # the recipe now, for the domain measurement below; its timings once that is done too
    training = {"recipe": recipe.to_dict(), "command": command,
                "clip_metrics": json.loads((work / "clip" / "metrics.json").read_text()), "jobs": jobs,
                "cpu_kernels": kernels}
    writer = BundleWriter.extending(
        staging, name=out.name, world="shapes",
        description="The shapes world: a tiny CLIP and LM, and MacCap, TOMCap and CapDec trained text-only on "
                    "synthetic captions",
        training=training, **({DEFAULT_METHOD_KEY: recipe.lead_method} if recipe.lead_method else {}),
    )
    for image in sorted(data["examples"].glob("*.png")):
        writer.add_file(f"examples/{image.name}", image)
    writer.add_file(EXAMPLES_FILE, data["examples"] / Path(EXAMPLES_FILE).name)
    writer.add_file(EXAMPLE_QUESTIONS_FILE, data["examples"] / Path(EXAMPLE_QUESTIONS_FILE).name)
    if recipe.tomcap_select_by is not None:  # the trained config keeps the training command's (the paper's order)
        writer.add_component(TOMCAP_COMPONENT, {**staged.component(TOMCAP_COMPONENT),
                                                "select_by": recipe.tomcap_select_by})
    # VQA follows the paper: the LM that answers is the frozen, untouched one (MacCap's was trained for captions)
    writer.add_directory(VQA_LM, stages.lm)
    lead = {VQA_CAPTION_METHOD_KEY: recipe.lead_method} if recipe.lead_method else {}
    writer.add_component(VQA_COMPONENT, {**answers, "lm": IN_BUNDLE_PREFIX + VQA_LM, **lead,
                                         VQA_EXAMPLES_KEY: EXAMPLE_QUESTIONS_FILE})
    writer.finish()
    with timed("domain", complete=False):
        record_domain(staging, n=recipe.domain_images)  # it reads the recipe's world from the finished manifest
    update_info(staging, training={**training, "stage_seconds": timed.seconds,
                                   "build_seconds": round(time.time() - start)})
    shutil.rmtree(out, ignore_errors=True)
    shutil.move(str(staging), str(out))
    log(f"bundle written to {out} in {time.time() - start:.0f} s")
    return out


def add_recipe_arguments(parser: argparse.ArgumentParser) -> None:
    """``--world`` and ``--smoke``: which recipe (the build and the ablation must name the same one)."""
    parser.add_argument("--world", choices=("v2", "v1"), default="v2",
                        help="v2 (the shipped bundle's): 56 px scenes with clutter and occlusion, a 7x7 patch grid; "
                             "v1: the 32 px world shipped before it (see docs/shapes-world-history.md)")
    parser.add_argument("--smoke", action="store_true",
                        help="tiny sizes, the whole recipe in about a minute (CI): world v2 whatever --world says")


def add_trial_arguments(parser: argparse.ArgumentParser) -> None:
    """``--world-set``, ``--clip-set`` and ``--method-args``: a trial recipe, the chosen one with changes (a trial
    build's ablation must name the same changes, or its rows train on another recipe)."""
    parser.add_argument("--world-set", dest="world_settings", action="append", default=[], metavar="FIELD=VALUE",
                        help="change a WorldConfig field of the recipe's world (a trial recipe), e.g. --world-set "
                             "novel=0.2 to leave a fifth of the scenes out of every training text")
    parser.add_argument("--clip-set", dest="clip_settings", action="append", default=[], metavar="FIELD=VALUE",
                        help="change a TinyClipConfig field of the recipe's CLIP, as shapes-clip --set does (a trial "
                             "recipe: every stage after the CLIP is rebuilt on it), e.g. --clip-set text_layers=4")
    parser.add_argument("--clip-train-set", dest="clip_train_settings", action="append", default=[],
                        metavar="FIELD=VALUE",
                        help="change a TrainConfig field of the recipe's CLIP training, as shapes-clip --train-set "
                             "does (a trial recipe), e.g. --clip-train-set epochs=6")
    parser.add_argument("--lead-method", choices=tuple(METHOD_COMMANDS), default=None,
                        help="the method the bundle's app shows first and whose captions VQA reads (the recipe's "
                             "lead_method; the shipped recipe's: MacCap, the paper's VQA captioner)")
    parser.add_argument("--method-args", dest="method_args", action="append", default=[], metavar="METHOD=ARGS",
                        help="append ARGS to the recipe's training arguments of METHOD (maccap, tomcap or capdec; "
                             "the last of a repeated flag wins), e.g. --method-args maccap='--noise-variance 0.01'")


def trial_recipe(recipe: ShapesRecipe, args: argparse.Namespace) -> ShapesRecipe:
    """``recipe`` with ``add_trial_arguments``' changes; a one-line ValueError names a bad one."""
    if args.world_settings:
        from training.shapes.clip_levers import parse_settings  # it imports this module

        changes = parse_settings(args.world_settings, "--world-set")
        recipe = recipe.replace(world=world.WorldConfig.from_dict({**recipe.world.to_dict(), **changes},
                                                                  where="--world-set"))
    if args.clip_settings or args.clip_train_settings:
        from training.shapes.clip_levers import changed_clip, parse_settings  # it imports this module

        clip = changed_clip(recipe.clip, parse_settings(args.clip_settings, "--clip-set"),
                            parse_settings(args.clip_train_settings, "--clip-train-set"),
                            out_dir=recipe.clip.train.out_dir, where="--clip-set", train_where="--clip-train-set")
        recipe = recipe.replace(clip=clip)
    if args.lead_method is not None:
        recipe = recipe.replace(lead_method=args.lead_method)
    for setting in args.method_args:
        method, _, extra = setting.partition("=")
        if method not in TRAINING_COMMANDS or not extra.strip():
            raise ValueError(f"--method-args: expected METHOD=ARGS with METHOD one of {', '.join(TRAINING_COMMANDS)}, "
                             f"got {setting!r}")
        recipe = recipe.replace(**{f"{method}_args": (*getattr(recipe, f"{method}_args"), *shlex.split(extra))})
        check_training_arguments(recipe, method)
    return recipe


def check_training_arguments(recipe: ShapesRecipe, method: str) -> None:
    """Parse the recipe's training command of ``method`` as its subcommand would, before any stage runs, so that a
    misspelt flag fails at once instead of after the CLIP and the LM have trained."""
    from training.__main__ import SUBCOMMANDS

    command = TRAINING_COMMANDS[method](recipe, Path("work"), out=Path("out"), run_dir=Path("run"))
    parser = importlib.import_module(SUBCOMMANDS[command[0]][0]).build_parser()  # the module `python -m training` runs
    refused = io.StringIO()
    try:
        with contextlib.redirect_stderr(refused):
            parser.parse_args(command[1:])
    except SystemExit:
        said = refused.getvalue().strip().splitlines()
        raise ValueError(f"--method-args {method}: {said[-1] if said else 'refused'}") from None


def chosen_recipe(args: argparse.Namespace) -> ShapesRecipe:
    """The recipe ``add_recipe_arguments``' flags name."""
    if args.smoke:
        return ShapesRecipe.smoke()
    return ShapesRecipe.world_v1() if args.world == "v1" else ShapesRecipe.full()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training shapes", description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--out", default="weights/shapes", help="bundle folder to write")
    parser.add_argument("--work-dir", default=None,
                        help="stage outputs (default: runs/shapes-build-v2, -build-v1 or -smoke, with -seedN for "
                             "--seed N); a work dir is for one recipe, and resuming it with another is an error")
    add_recipe_arguments(parser)
    parser.add_argument("--fresh", action="store_true", help="delete the work dir first instead of resuming")
    parser.add_argument("--threads", type=int, default=2,
                        help="torch CPU threads for every stage (the shipped weights were built with 2; float sums, "
                             "and so the weights' last bits, depend on it)")
    parser.add_argument("--jobs", type=int, default=2,
                        help="stages run side by side in this many worker processes, each with --threads threads "
                             "(1: one after another, in process); the weights are the same either way")
    parser.add_argument("--seed", type=int, default=0,
                        help="training seed of every stage (the world's data stay the recipe's): 0 made the shipped "
                             "bundle, another seed is another draw of the same recipe")
    add_trial_arguments(parser)
    parser.add_argument("--maccap-steps", type=int, default=None, help="override the recipe's MacCap steps")
    parser.add_argument("--tomcap-steps", type=int, default=None, help="override the recipe's TOMCap steps")
    parser.add_argument("--capdec-steps", type=int, default=None, help="override the recipe's CapDec steps")
    args = parser.parse_args(argv)
    pin_cpu_kernels()  # as `python -m training` does, for `python -m training.shapes.build`
    torch.set_num_threads(args.threads)
    recipe = chosen_recipe(args).with_training_seed(args.seed)
    steps = {"maccap_steps": args.maccap_steps, "tomcap_steps": args.tomcap_steps, "capdec_steps": args.capdec_steps}
    recipe = recipe.replace(**{name: value for name, value in steps.items() if value is not None})
    recipe = trial_recipe(recipe.replace(clip=recipe.clip.replace(threads=args.threads)), args)
    seeded = f"-seed{args.seed}" if args.seed else ""
    work = Path(args.work_dir or f"runs/shapes-{'smoke' if args.smoke else 'build-' + args.world}{seeded}")
    if args.fresh:
        shutil.rmtree(work, ignore_errors=True)
    command = " ".join(["python -m training shapes", *(["--world v1"] if args.world == "v1" else []),
                        *([f"--seed {args.seed}"] if args.seed else []),
                        *(f"--world-set {setting}" for setting in args.world_settings),
                        *(f"--clip-set {setting}" for setting in args.clip_settings),
                        *(f"--clip-train-set {setting}" for setting in args.clip_train_settings),
                        *([f"--lead-method {args.lead_method}"] if args.lead_method else []),
                        *(f"--method-args {shlex.quote(setting)}" for setting in args.method_args)])
    if args.jobs < 1:
        parser.error(f"--jobs must be at least 1, got {args.jobs}")
    build(recipe, Path(args.out), work, command=command, jobs=args.jobs)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
