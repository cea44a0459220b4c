"""``python -m training shapes-eval``: score a bundle on freshly generated, held-out shapes scenes.

Images are captioned by the app's own code path (:class:`capdemo.pipeline.Captioner`,
every method with its bundle defaults), parsed back into scenes and scored:
exact scene accuracy, per-attribute accuracy, BLEU-4 and CIDEr against all
paraphrases. ``text_to_text`` is the ceiling of text-only training: each test
scene's caption decoded from its own CLIP text embedding, where no modality gap
exists (MacCap: one clean sample, greedy; TOMCap: its training input, decoded
with its default beams and selection).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

import torch

import capdemo  # noqa: F401  (the torchvision shim, before any model library)
from capdemo.options import CaptionOptions
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


def caption_all(captioner: Captioner, batches: list, method: str, options: CaptionOptions) -> tuple[list[str], float]:
    """Captions of every image in ``batches`` (lists of images, or Encoded batches), and seconds per image."""
    start, predictions = time.perf_counter(), []
    for batch in batches:
        predictions += [result.caption for result in captioner.caption(batch, method, options)]
    return predictions, (time.perf_counter() - start) / max(1, len(predictions))


def text_to_text(captioner: Captioner, method: str, texts: list[str]) -> list[str]:
    """Captions decoded from the CLIP text embeddings of ``texts`` (clean, as in training but without noise)."""
    embeds = torch.cat([captioner.encoder.encode_text(texts[i: i + 256]) for i in range(0, len(texts), 256)])
    if method == "maccap":
        from capdemo.maccap import caption_text_embeddings

        model = captioner.maccap
        return [out for i in range(0, len(texts), CAPTION_BATCH)
                for out in caption_text_embeddings(model, embeds[i: i + CAPTION_BATCH].to(model.device))]
    return tomcap_text_to_text(captioner, texts, embeds)


@torch.inference_mode()
def tomcap_text_to_text(captioner: Captioner, texts: list[str], embeds: torch.Tensor) -> list[str]:
    """TOMCap's captions of its own training-style inputs, decoded as images are by default.

    Each text's input is what training feeds (its gap-corrected embedding and the
    captions retrieved for it, itself excluded); decoding uses the config's beam
    width and picks the beam by CLIP cosine with the text's embedding, as
    inference picks it by the image's (``select_by``).
    """
    from capdemo.rerank import clip_scores
    from training.tomcap import decode_examples, prepare_examples

    model, config = captioner.tomcap, captioner.tomcap.config
    examples = prepare_examples(model, texts, embeds, captioner.datastore, captioner.encoder.encode_text,
                                gap_stats=captioner.gap_stats if config.gap_correction != "none" else None,
                                progress=False)
    groups = decode_examples(model, examples, range(len(texts)), beams=config.beams, batch_size=CAPTION_BATCH)
    if config.select_by != "clip":
        return [group[0] for group in groups]
    return [scored.texts[scored.order()[0]] for scored in clip_scores(captioner.encoder, embeds, groups)]


def evaluate_bundle(weights: str, *, n: int, seed: int, methods: list[str], options: CaptionOptions,
                    ceiling: bool = True, world_config: world.WorldConfig | None = None) -> dict[str, Any]:
    """Score ``methods`` of a bundle on ``n`` held-out scenes of its world (``world_config``: the recipe's
    world, for bundles that do not record it); seconds per image exclude the one shared encoding pass."""
    captioner = Captioner.from_bundle(weights)
    config = world_config or world_config_of(captioner)
    if seed in used_seeds(config):
        raise ValueError(f"seed {seed} generated training data; pick a held-out seed (not {sorted(used_seeds(config))})")
    pairs = world.generate_pairs(n, seed=seed, config=config)
    scenes, images = [scene for scene, _, _ in pairs], [image for _, image, _ in pairs]
    report: dict[str, Any] = {"n": n, "seed": seed, "bundle": captioner.bundle.name}
    started = time.perf_counter()
    encoded = [captioner.encode(batch) for batch in in_batches(images)]  # one vision-tower pass, every method
    report["encode_seconds_per_image"] = (time.perf_counter() - started) / max(1, n)
    for method in methods:
        predictions, seconds = caption_all(captioner, encoded, method, options)
        report[method] = {**score(predictions, scenes), "seconds_per_image": seconds,
                          "examples": [{"prediction": p, "reference": captions(s)[0]}
                                       for p, s in list(zip(predictions, scenes))[:5]]}
    if ceiling:
        texts = [captions(scene)[0] for scene in scenes]
        report["text_to_text"] = {m: score(text_to_text(captioner, m, texts), scenes) for m in methods}
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training shapes-eval", description=__doc__.splitlines()[0])
    parser.add_argument("--weights", default="weights/shapes", help="bundle to evaluate")
    parser.add_argument("--n", type=int, default=500, help="held-out scenes to generate")
    parser.add_argument("--seed", type=int, default=DEFAULT_TEST_SEED,
                        help="world seed of the test scenes (never a training seed)")
    parser.add_argument("--methods", nargs="+", default=["maccap", "tomcap"], help="methods to score")
    parser.add_argument("--samples", type=int, default=None, help="MacCap samples S (bundle default)")
    parser.add_argument("--beams", type=int, default=None, help="beam width (bundle default)")
    parser.add_argument("--no-ceiling", action="store_true", help="skip the text-to-text ceiling")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)
    try:
        report = evaluate_bundle(args.weights, n=args.n, seed=args.seed, methods=args.methods,
                                 options=CaptionOptions(samples=args.samples, beams=args.beams),
                                 ceiling=not args.no_ceiling)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(report))
    else:
        for method in args.methods:
            row = report[method]
            print(f"{method:7s} scene {row['scene_accuracy']:.3f}  attributes {row['attribute_accuracy']:.3f}  "
                  f"CIDEr {row['cider']:.2f}  BLEU-4 {row['bleu4']:.3f}")
        for method, row in report.get("text_to_text", {}).items():
            print(f"{method:7s} text-to-text scene {row['scene_accuracy']:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
