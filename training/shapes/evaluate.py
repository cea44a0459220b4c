"""``python -m training shapes-eval``: score a bundle on freshly generated, held-out shapes scenes.

Images are captioned by the app's own code path (:class:`capdemo.pipeline.Captioner`,
every method with its bundle defaults), parsed back into scenes and scored:
exact scene accuracy, per-attribute accuracy, BLEU-4 and CIDEr against all
paraphrases. ``text_to_text`` is the ceiling of text-only training: each test
scene's caption decoded from its own CLIP text embedding, where no modality gap
exists, by the method's image inference with the same settings (each method's
``text_to_text``: MacCap the embedding's N_cr copies as the regions, S noisy
samples reranked by cosine with the text; TOMCap its training input, clean,
with its beams and selection; CapDec the clean embedding, best beam).

With ``--novel`` only the scenes no training text describes are drawn (a world built with ``--world-set
novel=F``; :func:`training.shapes.world.novel_scenes`), and the report says ``"novel": true``.

Besides the captions (JSON keys others rely on, issue 15):

- ``world``: ``image_size`` and the CLIP's ``patch_grid`` [rows, cols];
- ``gap``: the modality-gap numbers of :mod:`training.shapes.metrics` on 1,000 held-out pairs, and where
  MacCap's N_cr patches land on those images (``selected_patches_on_objects`` and its references);
- ``vqa``: zero-shot VQA as the app answers (the VQA method's caption, LM answer decoded with the app's beams
  and answer length, nearest answer in the bundle's list) on questions of every type: ``accuracy`` / ``n`` /
  ``by_type`` of the LM the app uses, and the same per LM: the frozen, untouched LM the bundle names for VQA
  (``frozen_lm``), the method's caption-trained LM (``caption_trained_lm``) and the frozen LM reading the true
  captions (``frozen_lm_true_captions``, the ceiling);
- ``examples``: ``correct`` of ``n`` shipped example images captioned exactly by the app's default method (the
  bundle's first), ``by_method``: the same count for every method scored, and ``questions``: ``correct`` of ``n``
  of the bundle's questions about its examples (the Ask tab's) answered as the world answers them.
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
from capdemo.bundle import Bundle
from capdemo.features import ImageFeatures
from capdemo.methods.flags import add_setting_arguments, settings_from_arguments
from capdemo.pipeline import Captioner, with_own_lm
from capdemo.result import Result
from training.evaluate import score_captions
from training.shapes import world
from training.shapes.build import EXAMPLES_FILE, examples_seed, qa_seed
from training.shapes.language import Scene, attribute_accuracy, captions, parse_caption, references, scene_accuracy
from training.shapes.metrics import GAP_KEYS, correction_geometry, gap_metrics, selection_on_objects
from training.shapes.vqa_eval import question_set, vqa_accuracy

CAPTION_BATCH = 50  # images per captioning call
TEXT_METRICS = ("Bleu", "CIDEr")  # no METEOR: it needs a JVM start per call and adds nothing on a 35-word world
DEFAULT_TEST_SEED = 1234  # world seed of the held-out test scenes (never one of the build's training seeds)


def world_config_of(captioner: Captioner) -> world.WorldConfig:
    recipe = captioner.bundle.manifest.get("training", {}).get("recipe", {})
    return world.WorldConfig.from_dict(recipe["world"]) if "world" in recipe else world.WorldConfig()


def used_seeds(config: world.WorldConfig) -> set[int]:
    """Every world seed the build draws data from: training, the LM's question-answer scenes, the examples."""
    return {config.train_seed, config.text_seed, qa_seed(config), config.unpaired_seed, examples_seed(config)}


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


def caption_all(captioner: Captioner, batches: list, method: str, settings: dict[str, Any]
                ) -> tuple[list[Result], float]:
    """Results of every image in ``batches`` (lists of images, or Encoded batches), and seconds per image."""
    start, results = time.perf_counter(), []
    options = captioner.options(method, **settings)
    for batch in batches:
        results += captioner.caption(batch, method, options)
    return results, (time.perf_counter() - start) / max(1, len(results))


def candidate_report(captioner: Captioner, results: list[Result], scenes: list[Scene], image_embeds: torch.Tensor | None
                     ) -> dict[str, float]:
    """Where a method's wrong captions come from, given each image's CLIP embedding ``image_embeds`` (N, D).

    ``candidate_scene_accuracy``: the scenes some candidate (sample or beam) describes exactly, what a perfect
    reranker would caption. ``clip_prefers_wrong``: of the scenes captioned wrongly, the fraction where the CLIP
    scores the wrong caption above every true caption of the scene, so that reranking by CLIP cannot fix them.
    """
    right = [parse_caption(r.caption) == scene for r, scene in zip(results, scenes, strict=True)]
    proposed = sum(ok or any(parse_caption(c.text) == scene for c in r.candidates)
                   for ok, r, scene in zip(right, results, scenes))
    wrong = [i for i, ok in enumerate(right) if not ok]
    prefers = 0
    for i in wrong:
        texts = captioner.encoder.encode_text([results[i].caption, *references(scenes[i])])  # (1 + R, D)
        cosines = torch.nn.functional.normalize(image_embeds[i].float(), dim=-1) @ texts.float().T  # (1 + R,)
        prefers += bool(cosines[0] > cosines[1:].max())
    return {"candidate_scene_accuracy": proposed / max(1, len(scenes)),
            "clip_prefers_wrong": prefers / len(wrong) if wrong else 0.0}


def text_to_text(captioner: Captioner, method: str, texts: list[str], settings: dict[str, Any]
                 ) -> list[str] | None:
    """Captions decoded from the CLIP text embeddings of ``texts`` in the images' place, with ``settings``."""
    embeds = torch.cat([captioner.encoder.encode_text(texts[i: i + 256]) for i in range(0, len(texts), 256)])
    with torch.inference_mode():
        return captioner.method(method).text_to_text(texts, embeds, captioner.options(method, **settings))


GAP_PAIRS = 1000  # held-out pairs the gap numbers are measured on (i2t R@1 "among 1,000")


def gap_report(captioner: Captioner, pairs: list, features: ImageFeatures,
               coverage: list | None = None) -> dict[str, Any]:
    """:func:`training.shapes.metrics.gap_metrics` of held-out ``pairs`` (scene, image, caption) whose images'
    ``features`` are given (in order), with MacCap's N_cr when the bundle has MacCap (else the paper's 10); given
    the images' object ``coverage`` (each (S, S)), where those N_cr patches lie
    (:func:`training.shapes.metrics.selection_on_objects`); and for a bundle with TOMCap, where its gap correction
    puts the captions (``tomcap_correction``: :func:`training.shapes.metrics.correction_geometry`)."""
    texts = [text for _, _, text in pairs]
    text_embeds = torch.cat([captioner.encoder.encode_text(texts[i: i + 256]) for i in range(0, len(texts), 256)])
    catalogue: dict[Scene, int] = {}
    scene_ids = [catalogue.setdefault(scene, len(catalogue)) for scene, _, _ in pairs]
    maccap = captioner.methods["maccap"].model.config if "maccap" in captioner.methods else None
    n_cr, include_cls = (maccap.n_cr, maccap.include_cls_in_topk) if maccap else (10, False)
    features = features.to("cpu")
    report = gap_metrics(features, text_embeds.cpu(), scene_ids, n_cr=n_cr, include_cls=include_cls)
    if coverage is not None:
        report.update(selection_on_objects(features, torch.stack([torch.from_numpy(c) for c in coverage]), n_cr,
                                           include_cls=include_cls))
    tomcap = captioner.methods.get("tomcap")
    if tomcap is not None and tomcap.gap_stats is not None:  # where TOMCap's correction puts the captions
        report["tomcap_correction"] = correction_geometry(features.image_embeds, text_embeds.cpu(), scene_ids,
                                                          tomcap.gap_stats)
    return report


def vqa_report(captioner: Captioner, predicted: list[str], scenes: list[Scene], *, seed: int,
               config: world.WorldConfig) -> dict[str, Any] | None:
    """VQA accuracy with the VQA method's ``predicted`` captions of the held-out images: for the LM the app
    answers with (the headline numbers), the frozen LM the bundle names and the caption-trained LM of the first
    method with an LM of its own (MacCap's: the paper's §5.4 claim; ``of`` names it), and the frozen LM reading
    the true captions (the text-only ceiling). None when the bundle cannot answer."""
    method = captioner.vqa_method
    if method is None:
        return None
    asked = question_set(scenes, seed=seed, colours=config.colours, shapes=config.shapes)
    truth = [captions(scene)[0] for scene in scenes]
    common = {"encoder": captioner.encoder, "answers": captioner.answers,
              "scene_kinds": [scene.kind for scene in scenes]}
    # the LM a method trained for captions (MacCap's), reading the same captions: the paper's §5.4 claim
    trained = with_own_lm(captioner.methods.values())
    report: dict[str, Any] = {"scenes": len(scenes), "answers": len(captioner.answers), "method": method.name}
    served = captioner.answer_lm
    own = trained.answer_lm() if trained is not None else served
    report["caption_trained_lm"] = vqa_accuracy(predicted, asked, answer_lm=own, **common)
    if trained is not None:
        report["caption_trained_lm"]["of"] = trained.name
    if served.lm is not own.lm:
        report["frozen_lm"] = vqa_accuracy(predicted, asked, answer_lm=served, **common)
        report["frozen_lm_true_captions"] = vqa_accuracy(truth, asked, answer_lm=served, **common)
    headline = report.get("frozen_lm", report["caption_trained_lm"])
    report.update({key: headline[key] for key in ("accuracy", "n", "by_type")})
    return report


def examples_report(captioner: Captioner, method: str, settings: dict[str, Any], *,
                    shipped_by: Bundle | None = None) -> dict[str, Any] | None:
    """Scene accuracy of ``method`` on the shipped examples (``examples/scenes.json``) of ``shipped_by`` (default:
    the captioner's own bundle; an ablation row's bundle ships none, so it captions the shipped bundle's), or None
    when that bundle has none."""
    source = shipped_by or captioner.bundle
    if EXAMPLES_FILE not in source.manifest.get("files", {}):
        return None
    from PIL import Image

    listed = source.json(EXAMPLES_FILE)
    images = [Image.open(source.file(entry["file"])).convert("RGB") for entry in listed]
    predictions = [result.caption for result in captioner.caption(images, method, **settings)]
    scenes = [parse_caption(entry["caption"]) for entry in listed]
    exact = [parse_caption(p) == s for p, s in zip(predictions, scenes)]
    return {"correct": sum(exact), "n": len(listed), "method": method,
            "captions": [{"file": e["file"], "prediction": p, "reference": e["caption"], "exact": x}
                         for e, p, x in zip(listed, predictions, exact)]}


def held_out_pairs(n: int, *, seed: int, config: world.WorldConfig, novel: bool = False) -> list[tuple]:
    """``n`` (scene, image, caption, coverage) pairs of world seed ``seed``; with ``novel``, only pairs of the
    scenes no training text describes (:func:`training.shapes.world.novel_scenes`), in the order drawn."""
    if not novel:
        return world.generate_covered_pairs(n, seed=seed, config=config)
    chosen = world.novel_scenes(config)
    if not chosen:
        raise ValueError("--novel: this world leaves no scene out of its training text (WorldConfig.novel is 0)")
    drawn = world.generate_covered_pairs(round(2 * n / config.novel) + 100, seed=seed, config=config)
    kept = [pair for pair in drawn if pair[0] in chosen]
    if len(kept) < n:
        raise ValueError(f"--novel: drew {len(kept)} novel scenes, fewer than the {n} asked for")
    return kept[:n]


def evaluate_bundle(weights: str, *, n: int, seed: int, methods: list[str] | None = None,
                    settings: dict[str, dict[str, Any]] | None = None, ceiling: bool = True,
                    world_config: world.WorldConfig | None = None, gap: bool = True,
                    vqa_scenes: int | None = 200, examples: bool = True, novel: bool = False) -> dict[str, Any]:
    """Score ``methods`` (default: every method of the bundle) on ``n`` held-out scenes of its world
    (``world_config``: the recipe's world, for bundles that do not record it; ``novel``: only scenes no training
    text describes), each with the bundle's settings changed by ``settings[method]``; seconds per image exclude
    the one shared encoding pass.

    Also, each when asked and possible: the gap numbers on ``GAP_PAIRS`` held-out pairs of the same seed,
    VQA on the first ``vqa_scenes`` test scenes (the VQA method's captions), and the shipped examples' scene
    accuracy for the app's default method (the bundle's first) and, under ``by_method``, for every method.
    """
    captioner = Captioner.from_bundle(weights)
    methods = list(methods or captioner.method_names)
    settings = settings or {}
    config = world_config or world_config_of(captioner)
    if seed in used_seeds(config):
        raise ValueError(f"seed {seed} generated training data; pick a held-out seed "
                         f"(not {sorted(used_seeds(config))})")
    drawn = held_out_pairs(max(n, GAP_PAIRS if gap else 0), seed=seed, config=config, novel=novel)
    pairs = [(scene, image, caption) for scene, image, caption, _ in drawn]
    scenes, images = [scene for scene, _, _ in pairs[:n]], [image for _, image, _ in pairs]
    report: dict[str, Any] = {"n": n, "seed": seed, **({"novel": True} if novel else {}),
                              "bundle": captioner.bundle.name,
                              "world": {"image_size": config.image_size,
                                        "patch_grid": list(captioner.encoder.grid_size)}}
    started = time.perf_counter()
    encoded = [captioner.encode(batch) for batch in in_batches(images[:n])]  # one vision-tower pass, every method
    report["encode_seconds_per_image"] = (time.perf_counter() - started) / max(1, n)
    image_embeds = torch.cat([batch.features.global_embeds for batch in encoded]) if encoded else None  # (n, D)
    if gap:
        extra = [captioner.encode(batch) for batch in in_batches(images[n:GAP_PAIRS])]
        features = ImageFeatures.cat([batch.features for batch in encoded + extra]).select(slice(0, GAP_PAIRS))
        coverage = [cover for _, _, _, cover in drawn[:GAP_PAIRS]]  # the images' object masks
        report["gap"] = gap_report(captioner, pairs[:GAP_PAIRS], features, coverage)
    predictions_of: dict[str, list[str]] = {}
    for method in methods:
        results, seconds = caption_all(captioner, encoded, method, settings.get(method, {}))
        predictions = predictions_of[method] = [result.caption for result in results]
        report[method] = {**score(predictions, scenes), "seconds_per_image": seconds,
                          **candidate_report(captioner, results, scenes, image_embeds),
                          "examples": [{"prediction": p, "reference": captions(s)[0]}
                                       for p, s in list(zip(predictions, scenes))[:5]]}
    if ceiling:
        texts = [captions(scene)[0] for scene in scenes]
        decoded = {m: text_to_text(captioner, m, texts, settings.get(m, {})) for m in methods}
        report["text_to_text"] = {m: score(out, scenes) for m, out in decoded.items() if out is not None}
    vqa_method = captioner.vqa_method
    if vqa_scenes and vqa_method is not None and vqa_method.name in predictions_of:
        count = min(vqa_scenes, n)
        vqa = vqa_report(captioner, predictions_of[vqa_method.name][:count], scenes[:count], seed=seed,
                         config=config)
        if vqa is not None:
            report["vqa"] = vqa
    shipped = {m: examples_report(captioner, m, settings.get(m, {})) for m in methods} if examples else {}
    shipped = {m: row for m, row in shipped.items() if row is not None}
    default_method = captioner.method_names[0]  # what the app shows first: the keys others rely on are its own
    if default_method in shipped:
        counts = {m: {"correct": row["correct"], "n": row["n"]} for m, row in shipped.items()}
        report["examples"] = {**shipped[default_method], "by_method": counts}
        asked = example_questions_report(captioner)
        if asked is not None:
            report["examples"]["questions"] = asked
    return report


def example_questions_report(captioner: Captioner) -> dict[str, Any] | None:
    """The bundle's questions about its examples (the Ask tab's), answered as the app answers them, against the
    world's answers; None when it ships none or cannot answer."""
    asked = captioner.example_questions()
    if not asked or captioner.vqa_method is None:
        return None
    answers = [captioner.answer(item.image, item.question).answer for item in asked]
    return {"correct": sum(answer == item.answer for answer, item in zip(answers, asked)), "n": len(asked),
            "answers": [{"image": item.image.name, "question": item.question, "answer": answer, "truth": item.answer}
                        for answer, item in zip(answers, asked)]}


def record(weights: str, report: dict[str, Any], argv: list[str]) -> None:
    """Each method's scores as an evaluation result of the bundle (rewritten atomically; its card follows)."""
    from training.bundle_evaluation import EvaluationResult, record_evaluation

    flags = [flag for flag in argv if flag not in ("--record", "--json")]
    for method in (m for m in registry.names() if m in report):
        row = report[method]
        record_evaluation(weights, EvaluationResult(
            method=method, task="shapes-eval", dataset="shapes world, held-out scenes",
            split=f"{report['n']} scenes, world seed {report['seed']}",
            metrics={"scene_accuracy": round(row["scene_accuracy"], 4),
                     "attribute_accuracy": round(row["attribute_accuracy"], 4),
                     "CIDEr": round(row["cider"], 3), "Bleu_4": round(row["bleu4"], 4)},
            command=" ".join(["python -m training shapes-eval", *flags])))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training shapes-eval", description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--weights", default="weights/shapes", help="bundle to evaluate")
    parser.add_argument("--n", type=int, default=500, help="held-out scenes to generate")
    parser.add_argument("--seed", type=int, default=DEFAULT_TEST_SEED,
                        help="world seed of the test scenes (never a training seed)")
    parser.add_argument("--methods", nargs="+", choices=registry.names(), default=None,
                        help="methods to score (default: every method in the bundle)")
    parser.add_argument("--no-ceiling", action="store_true", help="skip the text-to-text ceiling")
    parser.add_argument("--no-gap", action="store_true", help="skip the modality-gap numbers")
    parser.add_argument("--vqa-scenes", type=int, default=200, help="test scenes asked questions (0: no VQA)")
    parser.add_argument("--no-examples", action="store_true", help="skip the shipped examples")
    parser.add_argument("--novel", action="store_true",
                        help="score only scenes no training text describes (a world built with --world-set novel=F)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--record", action="store_true",
                        help="add each method's scores to the bundle's evaluation.json (its model card shows them)")
    add_setting_arguments(parser, exclude=("seed",))  # --seed is the test scenes' world seed here
    args = parser.parse_args(argv)
    try:
        settings = {method: settings_from_arguments(args, method, strict=False) for method in registry.names()}
        report = evaluate_bundle(args.weights, n=args.n, seed=args.seed, methods=args.methods, settings=settings,
                                 ceiling=not args.no_ceiling, gap=not args.no_gap, vqa_scenes=args.vqa_scenes,
                                 examples=not args.no_examples, novel=args.novel)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.record:
        record(args.weights, report, argv if argv is not None else sys.argv[2:])
    if args.json:
        print(json.dumps(report))
        return 0
    for method in (m for m in registry.names() if m in report):
        row = report[method]
        print(f"{method:7s} scene {row['scene_accuracy']:.3f}  attributes {row['attribute_accuracy']:.3f}  "
              f"CIDEr {row['cider']:.2f}  BLEU-4 {row['bleu4']:.3f}  some candidate exact "
              f"{row['candidate_scene_accuracy']:.3f}  CLIP prefers the wrong caption {row['clip_prefers_wrong']:.3f}")
    for method, row in report.get("text_to_text", {}).items():
        print(f"{method:7s} text-to-text scene {row['scene_accuracy']:.3f}")
    if "gap" in report:
        print("gap     " + "  ".join(f"{key} {report['gap'][key]:.3f}" for key in GAP_KEYS))
        if "selected_patches_on_objects" in report["gap"]:
            gap = report["gap"]
            print(f"patches MacCap's selection on objects {gap['selected_patches_on_objects']:.3f} (at most "
                  f"{gap['selection_on_objects_ceiling']:.3f}; all patches {gap['patches_on_objects']:.3f})")
    if "vqa" in report:
        vqa = report["vqa"]
        rows = {name: vqa[name] for name in ("frozen_lm", "caption_trained_lm", "frozen_lm_true_captions")
                if name in vqa}
        for name, row in rows.items():
            by_type = "  ".join(f"{kind} {value:.3f}" for kind, value in row["by_type"].items())
            print(f"vqa     {name}: {row['accuracy']:.3f} ({row['n']} questions; {by_type})")
            for kind, of_kind in row.get("by_scene_kind", {}).items():
                of_types = "  ".join(f"{question} {value:.3f}" for question, value in of_kind["by_type"].items())
                print(f"vqa       {kind} scenes: {of_kind['accuracy']:.3f} ({of_kind['n']}; {of_types})")
    for method, shipped in report.get("examples", {}).get("by_method", {}).items():
        print(f"examples {method}: {shipped['correct']} / {shipped['n']} scenes exact")
    asked = report.get("examples", {}).get("questions")
    if asked:
        wrong = "; ".join(f"{a['image']} {a['question']!r}: {a['answer']} (truth {a['truth']})"
                          for a in asked["answers"] if a["answer"] != a["truth"])
        print(f"examples questions: {asked['correct']} / {asked['n']} answered right"
              + (f"; wrong: {wrong}" if wrong else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
