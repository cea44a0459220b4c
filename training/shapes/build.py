"""``python -m training shapes --out weights/shapes``: rebuild the shipped shapes-world bundle from nothing.

Every stage runs the same commands a real-world user runs (``python -m training
index | gapstats | maccap | tomcap``), only on shapes captions and tiny models:

1. world data: a text-only caption corpus, unpaired images (for the image statistics), example images;
2. the tiny CLIP, trained contrastively on generated image-caption pairs (the only stage that sees images
   paired with text: it stands in for OpenAI's pretraining);
3. the tiny LM: a BPE tokenizer and GPT-2 trained on captions and caption-grounded question-answer text;
4. the caption datastore and the modality-gap statistics;
5. MacCap and TOMCap, trained text-only, written into one bundle;
6. examples and provenance in the bundle manifest.

Stages cache their outputs in ``--work-dir``, so a killed build continues where it stopped.
``--smoke`` shrinks everything so the whole recipe runs in about a minute (CI).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

import capdemo  # noqa: F401  (the torchvision shim, before any model library)
from capdemo.bundle import BundleWriter
from capdemo.config import Config
from capdemo.fileio import atomic_output
from training.loop import TrainConfig
from training.shapes.clip import TinyClipConfig
from training.shapes import world
from training.shapes.lm import TinyLMConfig, pretrain_lm
from training.shapes.questions import qa_texts

ANSWERS_FILE = Path(__file__).resolve().parents[1] / "data" / "openvqa_answer_dict.json"
# The tiny CLIP: 32 px images, 8 px patches (a 4x4 grid), a 96-wide 3-layer ViT, in-batch negatives plus 3 near
# misses per pair (TinyClipConfig), 5 epochs. Shipped build: i2t 0.96, 828-way zero-shot 0.94, 1.2 % of captions
# crowded within cosine 0.99 of another scene's (6.5 % without near misses), gap 0.29 with probe 1.0.
SHAPES_IMAGE_SIZE = 32
SHAPES_CLIP = dict(image_size=SHAPES_IMAGE_SIZE, patch_size=8, vision_width=96, vision_layers=3,
                   same_scene_positives=False)


@dataclass
class ShapesRecipe(Config):
    """Sizes of every stage; ``full()`` makes the shipped bundle, ``smoke()`` the CI one."""

    world: world.WorldConfig = field(default_factory=lambda: world.WorldConfig(image_size=SHAPES_IMAGE_SIZE))
    # the tiny CLIP and its training
    clip: TinyClipConfig = field(default_factory=lambda: TinyClipConfig(**SHAPES_CLIP))
    corpus_captions: int = 20000  # text-only captions drawn (the commands get --dedupe: ~2.5k distinct ones)
    unpaired_images: int = 2000  # images for the image-side gap statistics (never paired with text)
    qa_texts: int = 10000  # question-answer texts for LM pretraining (so VQA works on the shapes LM)
    prompt_texts: int = 4000  # TOMCap-prompt-shaped texts for LM pretraining (its template words, listing captions)
    examples: int = 8  # example images shipped in the bundle
    lm: TinyLMConfig = field(default_factory=TinyLMConfig)
    lm_steps: int = 200  # LM pretraining steps (batch 64 x 48 tokens)
    maccap_steps: int = 1500  # MacCap text-only training steps
    maccap_args: tuple[str, ...] = (
        "--train-lm", "--memory-layernorm", "--n-query", "8", "--n-cr", "10", "--width", "64", "--heads", "4",
        "--ffn-dim", "256", "--batch-size", "64", "--lr", "3e-3", "--warmup", "100",
    )  # the shapes LM must train with the adaptor (shapes-world-prototype.md, round 2)
    tomcap_steps: int = 2400  # TOMCap text-only training steps
    tomcap_args: tuple[str, ...] = ("--batch-size", "32", "--lr", "2e-3", "--warmup", "60", "--lora-r", "32")
    seed: int = 0

    @classmethod
    def full(cls) -> ShapesRecipe:
        return cls()

    @classmethod
    def smoke(cls) -> ShapesRecipe:
        return cls(clip=TinyClipConfig.smoke().replace(**{**SHAPES_CLIP, "vision_width": 64, "vision_layers": 2}),
                   corpus_captions=3000, unpaired_images=300, qa_texts=1000, prompt_texts=500, examples=2,
                   lm=TinyLMConfig(n_embd=64, n_layer=2, n_positions=128), lm_steps=40, maccap_steps=120,
                   maccap_args=cls().maccap_args[:-6] + ("--batch-size", "32", "--lr", "3e-3", "--warmup", "20"),
                   tomcap_steps=60,
                   tomcap_args=("--batch-size", "16", "--lr", "3e-3", "--warmup", "10", "--lora-r", "16"))


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
        return self.work / "clip" / "encoder.json"  # EncoderConfig JSON; the weights sit beside it

    @property
    def lm(self) -> Path:
        return self.work / "lm"

    @property
    def datastore(self) -> Path:
        return self.work / "datastore"

    @property
    def gap_stats(self) -> Path:
        return self.work / "gap_stats.safetensors"

    def missing(self) -> list[str]:
        """The stage outputs not (completely) written yet, as paths relative to the work dir."""
        done = [self.corpus, self.encoder, self.lm / "config.json", self.datastore / "datastore.json", self.gap_stats]
        return [str(path.relative_to(self.work)) for path in done if not path.is_file()]


def write_world_data(recipe: ShapesRecipe, work: Path) -> dict[str, Path]:
    """Corpus, unpaired images and examples on disk (skipped when already there)."""
    paths = {"corpus": StageOutputs(work).corpus, "unpaired": work / "unpaired", "examples": work / "examples"}
    config = recipe.world
    if not paths["corpus"].is_file():
        captions = world.generate_captions(recipe.corpus_captions, seed=config.text_seed, config=config)
        with atomic_output(paths["corpus"]) as tmp:
            tmp.write_text("\n".join(captions) + "\n")
    for key, count, seed in (("unpaired", recipe.unpaired_images, config.unpaired_seed),
                             ("examples", recipe.examples, config.test_seed + 1)):
        folder = paths[key]
        if not (folder / "done").is_file():
            folder.mkdir(parents=True, exist_ok=True)
            for i, image in enumerate(world.generate_images(count, seed=seed, config=config)):
                image.save(folder / f"{key}-{i:05d}.png")
            (folder / "done").write_text("")
    return paths


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


def train_language_model(recipe: ShapesRecipe, work: Path, corpus: Path) -> Path:
    from capdemo.lm import save_causal_lm

    out = StageOutputs(work).lm
    if (out / "config.json").is_file():
        return out
    captions = [line for line in corpus.read_text().splitlines() if line]
    scenes = world.generate_scenes(recipe.qa_texts, seed=recipe.world.text_seed + 7, config=recipe.world)
    rng = np.random.default_rng(recipe.seed)
    qa = qa_texts(scenes, rng)
    prompts = prompt_texts(captions, recipe.prompt_texts, rng)
    train_config = TrainConfig(out_dir=str(work / "lm-run"), seed=recipe.seed, batch_size=64, max_steps=recipe.lm_steps,
                               lr=3e-3, warmup_steps=max(1, recipe.lm_steps // 10), checkpoint_every=0, log_every=50)
    shutil.rmtree(train_config.out_dir, ignore_errors=True)
    lm, tokenizer, result = pretrain_lm([*captions, *qa, *prompts], recipe.lm, train_config)
    log(f"LM: loss {result.history[-1]['loss']:.3f} after {result.step} steps")
    save_causal_lm(lm, tokenizer, out)
    return out


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
    """One ``python -m training`` command, in process, exactly as a user would run it."""
    from training.__main__ import main

    log("python -m training " + " ".join(argv))
    status = main(argv)
    if status:
        raise SystemExit(f"training command failed with status {status}: {' '.join(argv)}")


def tomcap_command(recipe: ShapesRecipe, work: Path, *, out: Path, run_dir: Path, steps: int | None = None,
                   extra: tuple[str, ...] = ()) -> list[str]:
    """The recipe's ``python -m training tomcap`` arguments on a work dir's stage outputs (``extra`` last wins)."""
    stages = StageOutputs(work)
    return ["tomcap", "--corpus", str(stages.corpus), "--dedupe", "--datastore", str(stages.datastore),
            "--gap-stats", str(stages.gap_stats), "--encoder", str(stages.encoder),
            "--lm", str(stages.lm), "--out", str(out), "--run-dir", str(run_dir),
            "--steps", str(recipe.tomcap_steps if steps is None else steps), "--seed", str(recipe.seed),
            "--device", "cpu", *recipe.tomcap_args, *extra, "--resume"]


def build(recipe: ShapesRecipe, out: Path, work: Path) -> Path:
    start = time.time()
    work.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(recipe.seed)
    data = write_world_data(recipe, work)
    encoder = str(train_encoder(recipe, work))
    lm = str(train_language_model(recipe, work, data["corpus"]))
    corpus = str(data["corpus"])
    stages = StageOutputs(work)
    datastore, gap_stats = stages.datastore, stages.gap_stats
    if not (datastore / "datastore.json").is_file():
        run_command(["index", "--corpus", corpus, "--dedupe", "--encoder", encoder, "--out", str(datastore),
                     "--kind", "flat"])
    if not gap_stats.is_file():
        run_command(["gapstats", "--images", str(data["unpaired"]), "--corpus", corpus, "--dedupe",
                     "--encoder", encoder, "--out", str(gap_stats)])
    staging = work / "bundle"
    shutil.rmtree(staging, ignore_errors=True)
    run_command(["maccap", "--corpus", corpus, "--dedupe", "--encoder", encoder, "--lm", lm, "--out", str(staging),
                 "--run-dir", str(work / "maccap-run"), "--steps", str(recipe.maccap_steps), "--seed", str(recipe.seed),
                 "--vqa-answers", str(ANSWERS_FILE), "--device", "cpu", *recipe.maccap_args, "--resume"])
    run_command(tomcap_command(recipe, work, out=staging, run_dir=work / "tomcap-run"))
    writer = BundleWriter.extending(
        staging, name=out.name, world="shapes",
        description="The shapes world: a tiny CLIP, LM, MacCap and TOMCap trained text-only on synthetic captions",
        training={"recipe": recipe.to_dict(), "command": "python -m training shapes",
                  "clip_metrics": json.loads((work / "clip" / "metrics.json").read_text()),
                  "build_seconds": round(time.time() - start)},
    )
    for image in sorted(data["examples"].glob("*.png")):
        writer.add_file(f"examples/{image.name}", image)
    writer.finish()
    shutil.rmtree(out, ignore_errors=True)
    shutil.move(str(staging), str(out))
    log(f"bundle written to {out} in {time.time() - start:.0f} s")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training shapes", description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="weights/shapes", help="bundle folder to write")
    parser.add_argument("--work-dir", default=None, help="stage outputs (default: runs/shapes-build or -smoke)")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes: the whole recipe in about a minute (CI)")
    parser.add_argument("--fresh", action="store_true", help="delete the work dir first instead of resuming")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--maccap-steps", type=int, default=None, help="override the recipe's MacCap steps")
    parser.add_argument("--tomcap-steps", type=int, default=None, help="override the recipe's TOMCap steps")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    recipe = ShapesRecipe.smoke() if args.smoke else ShapesRecipe.full()
    steps = {"maccap_steps": args.maccap_steps, "tomcap_steps": args.tomcap_steps}
    recipe = recipe.replace(**{name: value for name, value in steps.items() if value is not None})
    work = Path(args.work_dir or f"runs/shapes-{'smoke' if args.smoke else 'build'}")
    if args.fresh:
        shutil.rmtree(work, ignore_errors=True)
    build(recipe, Path(args.out), work)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
