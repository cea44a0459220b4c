"""``python -m training shapes-eval``: score a bundle on freshly generated, held-out shapes scenes.

Images are captioned by the app's own code path (:class:`capdemo.pipeline.Captioner`,
every method with its bundle defaults), parsed back into scenes and scored:
exact scene accuracy, per-attribute accuracy, BLEU-4 and CIDEr against all
paraphrases. ``text_to_text`` is the ceiling of text-only training: each test
scene's caption decoded from its own CLIP text embedding, where no modality gap
exists (each method's ``text_to_text``: MacCap one clean sample, greedy;
TOMCap its training input, decoded with its default beams and selection).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

import torch

import capdemo  # noqa: F401  (the torchvision shim, before any model library)
from capdemo import methods as registry
from capdemo.methods.flags import add_setting_arguments, settings_from_arguments
from capdemo.pipeline import Captioner
from training.evaluate import score_captions
from training.shapes import world
from training.shapes.language import Scene, attribute_accuracy, captions, parse_caption, references, scene_accuracy

CAPTION_BATCH = 50  # images per captioning call
TEXT_METRICS = ("Bleu", "CIDEr")  # no METEOR: it needs a JVM start per call and adds nothing on a 35-word world
DEFAULT_TEST_SEED = 1234  # world seed of the held-out test scenes (never one of the build's training seeds)


def world_config_of(captioner: Captioner) -> world.WorldConfig:
    recipe = captioner.bundle.manifest.get("training", {}).get("recipe", {})
    return world.WorldConfig.from_dict(recipe["world"]) if "world" in recipe else world.WorldConfig()


def used_seeds(config: world.WorldConfig) -> set[int]:
    """Every world seed the build draws training data from (the LM's question-answer scenes use text_seed + 7)."""
    return {config.train_seed, config.text_seed, config.text_seed + 7, config.unpaired_seed, config.test_seed + 1}


def score(predictions: list[str], scenes: list[Scene]) -> dict[str, Any]:
    refs = {i: references(scene) for i, scene in enumerate(scenes)}
    text = score_captions(dict(enumerate(predictions)), refs, spice=False, metrics=TEXT_METRICS)
    attributes = attribute_accuracy(predictions, scenes)
    parsed = sum(parse_caption(p) is not None for p in predictions) / max(1, len(predictions))
    return {"scene_accuracy": scene_accuracy(predictions, scenes), "attribute_accuracy": attributes["overall"],
            "parse_rate": parsed,  # captions that are valid scene descriptions (an untrained LM's never are)
            "attributes": attributes, "cider": text["CIDEr"], "bleu4": text["Bleu_4"]}


def in_batches(images: list) -> list[list]:
    return [images[i: i + CAPTION_BATCH] for i in range(0, len(images), CAPTION_BATCH)]


def caption_all(captioner: Captioner, batches: list, method: str, settings: dict[str, Any]) -> tuple[list[str], float]:
    """Captions of every image in ``batches`` (lists of images, or Encoded batches), and seconds per image."""
    start, predictions = time.perf_counter(), []
    options = captioner.options(method, **settings)
    for batch in batches:
        predictions += [result.caption for result in captioner.caption(batch, method, options)]
    return predictions, (time.perf_counter() - start) / max(1, len(predictions))


def text_to_text(captioner: Captioner, method: str, texts: list[str]) -> list[str] | None:
    """Captions decoded from the CLIP text embeddings of ``texts`` as the method's training presents them."""
    embeds = torch.cat([captioner.encoder.encode_text(texts[i: i + 256]) for i in range(0, len(texts), 256)])
    with torch.inference_mode():
        return captioner.method(method).text_to_text(texts, embeds)


def evaluate_bundle(weights: str, *, n: int, seed: int, methods: list[str] | None = None,
                    settings: dict[str, dict[str, Any]] | None = None, ceiling: bool = True,
                    world_config: world.WorldConfig | None = None) -> dict[str, Any]:
    """Score ``methods`` (default: every method of the bundle) on ``n`` held-out scenes of its world
    (``world_config``: the recipe's world, for bundles that do not record it), each with the bundle's
    settings changed by ``settings[method]``; seconds per image exclude the one shared encoding pass."""
    captioner = Captioner.from_bundle(weights)
    methods = list(methods or captioner.method_names)
    config = world_config or world_config_of(captioner)
    if seed in used_seeds(config):
        raise ValueError(f"seed {seed} generated training data; pick a held-out seed "
                         f"(not {sorted(used_seeds(config))})")
    pairs = world.generate_pairs(n, seed=seed, config=config)
    scenes, images = [scene for scene, _, _ in pairs], [image for _, image, _ in pairs]
    report: dict[str, Any] = {"n": n, "seed": seed, "bundle": captioner.bundle.name}
    started = time.perf_counter()
    encoded = [captioner.encode(batch) for batch in in_batches(images)]  # one vision-tower pass, every method
    report["encode_seconds_per_image"] = (time.perf_counter() - started) / max(1, n)
    for method in methods:
        predictions, seconds = caption_all(captioner, encoded, method, (settings or {}).get(method, {}))
        report[method] = {**score(predictions, scenes), "seconds_per_image": seconds,
                          "examples": [{"prediction": p, "reference": captions(s)[0]}
                                       for p, s in list(zip(predictions, scenes))[:5]]}
    if ceiling:
        texts = [captions(scene)[0] for scene in scenes]
        decoded = {m: text_to_text(captioner, m, texts) for m in methods}
        report["text_to_text"] = {m: score(out, scenes) for m, out in decoded.items() if out is not None}
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training shapes-eval", description=__doc__.splitlines()[0])
    parser.add_argument("--weights", default="weights/shapes", help="bundle to evaluate")
    parser.add_argument("--n", type=int, default=500, help="held-out scenes to generate")
    parser.add_argument("--seed", type=int, default=DEFAULT_TEST_SEED,
                        help="world seed of the test scenes (never a training seed)")
    parser.add_argument("--methods", nargs="+", choices=registry.names(), default=None,
                        help="methods to score (default: every method in the bundle)")
    parser.add_argument("--no-ceiling", action="store_true", help="skip the text-to-text ceiling")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    add_setting_arguments(parser, exclude=("seed",))  # --seed is the test scenes' world seed here
    args = parser.parse_args(argv)
    try:
        settings = {method: settings_from_arguments(args, method, strict=False) for method in registry.names()}
        report = evaluate_bundle(args.weights, n=args.n, seed=args.seed, methods=args.methods, settings=settings,
                                 ceiling=not args.no_ceiling)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(report))
    else:
        for method in (m for m in registry.names() if m in report):
            row = report[method]
            print(f"{method:7s} scene {row['scene_accuracy']:.3f}  attributes {row['attribute_accuracy']:.3f}  "
                  f"CIDEr {row['cider']:.2f}  BLEU-4 {row['bleu4']:.3f}")
        for method, row in report.get("text_to_text", {}).items():
            print(f"{method:7s} text-to-text scene {row['scene_accuracy']:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
