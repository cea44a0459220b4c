"""``python -m training shapes-lm``: pretrain the shapes world's LM alone, with changed settings, and score its VQA.

VQA in the shapes world is only as good as the frozen LM's reading of a caption (the paper's §4.4 pipeline:
caption, LM answer, nearest candidate answer). This pretrains the recipe's LM on a finished build's corpus with
``--set field=value`` changes to :class:`training.shapes.lm.TinyLMConfig` (``--recipe-set`` for the recipe's
``lm_steps``, ``qa_texts``, ``qa_per_text`` and ``prompt_texts``; ``--train-set`` for the optimiser's
:class:`training.loop.TrainConfig`) and scores it on the true captions of ``--n`` held-out scenes (the text-only
ceiling ``shapes-eval`` reports as ``frozen_lm_true_captions``), next to the build's own LM on the same
questions, overall and on pair scenes, where an LM that does not bind attributes to objects shows. It writes no
bundle.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import fields
from pathlib import Path
from typing import Any

import torch

from capdemo.config import ConfigError
from capdemo.encoders import EncoderConfig, load_encoder
from capdemo.lm import load_causal_lm
from capdemo.methods.maccap.model import MacCapConfig
from capdemo.vqa import AnswerList, AnswerLM
from training.shapes import world
from training.loop import TrainConfig
from training.shapes.build import (
    ShapesRecipe, StageOutputs, add_recipe_arguments, chosen_recipe, lm_train_config, pretrain_shapes_lm,
)
from training.shapes.clip_levers import parse_settings
from training.shapes.language import captions
from training.shapes.lm import TinyLMConfig
from training.shapes.vqa_eval import question_set, vqa_accuracy

RECIPE_FIELDS = ("lm_steps", "qa_texts", "qa_per_text", "prompt_texts")  # what --recipe-set may change


def changed_recipe(recipe: ShapesRecipe, lm_settings: dict[str, Any], recipe_settings: dict[str, Any]
                   ) -> ShapesRecipe:
    """``recipe`` with its LM's fields and its LM-pretraining fields changed; an unknown field or one outside
    :data:`RECIPE_FIELDS` is a :class:`ConfigError` naming it."""
    outside = sorted(set(recipe_settings) - set(RECIPE_FIELDS))
    if outside:
        raise ConfigError(f"shapes-lm: --recipe-set takes {', '.join(RECIPE_FIELDS)}, not {', '.join(outside)}")
    lm = TinyLMConfig.from_dict({**recipe.lm.to_dict(), **lm_settings}, where="shapes-lm --set")
    for name, value in recipe_settings.items():
        if not isinstance(value, int) or value < 1:
            raise ConfigError(f"shapes-lm: --recipe-set {name} must be a positive integer, got {value!r}")
    return recipe.replace(lm=lm, **recipe_settings)


def changed_training(base: TrainConfig, settings: dict[str, Any]) -> TrainConfig:
    """``base`` with ``--train-set`` changes (lr, weight_decay, batch_size, ...); an unknown field or a bad value is
    a :class:`ConfigError` naming it."""
    return TrainConfig.from_dict({**base.to_dict(), **settings}, where="shapes-lm --train-set")


def true_caption_vqa(lms: dict[str, tuple[Any, Any]], *, work: Path, config: world.WorldConfig, n: int, seed: int
                     ) -> dict[str, dict[str, Any]]:
    """:func:`vqa_accuracy` of each ``(lm, tokenizer)`` in ``lms`` (decoded as a shapes bundle's app decodes)
    answering every question about ``n`` held-out scenes (world seed ``seed``) from their true captions, matched
    to the build's answer list by the build's CLIP (loaded once for all of them)."""
    stages = StageOutputs(work)
    encoder = load_encoder(EncoderConfig.load_json(stages.encoder))
    answers = AnswerList.from_openvqa(stages.answers)
    scenes = world.generate_scenes(n, seed=seed, config=config)
    asked = question_set(scenes, seed=seed, colours=config.colours, shapes=config.shapes)
    truth = [captions(scene)[0] for scene in scenes]
    kinds = [scene.kind for scene in scenes]
    settings = MacCapConfig()  # a shapes bundle's app answers with MacCap's VQA settings, the recipe leaves at these
    return {name: vqa_accuracy(truth, asked, answer_lm=AnswerLM.of_config(lm, tokenizer, settings), encoder=encoder,
                               answers=answers, scene_kinds=kinds)
            for name, (lm, tokenizer) in lms.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training shapes-lm", description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--work-dir", default="runs/shapes-build-v2",
                        help="a finished `python -m training shapes` work dir (its corpus, CLIP, answers and LM)")
    parser.add_argument("--set", dest="settings", action="append", default=[], metavar="FIELD=VALUE",
                        help=f"change a TinyLMConfig field ({', '.join(f.name for f in fields(TinyLMConfig))})")
    parser.add_argument("--recipe-set", dest="recipe_settings", action="append", default=[], metavar="FIELD=VALUE",
                        help=f"change the recipe's LM pretraining ({', '.join(RECIPE_FIELDS)})")
    parser.add_argument("--train-set", dest="train_settings", action="append", default=[], metavar="FIELD=VALUE",
                        help="change a TrainConfig field of the LM's pretraining, e.g. --train-set lr=0.001")
    parser.add_argument("--n", type=int, default=200, help="held-out scenes whose questions are asked")
    parser.add_argument("--seed", type=int, default=1234, help="world seed of the held-out scenes")
    parser.add_argument("--run-dir", default="runs/shapes-lm", help="the pretraining run (emptied first)")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    add_recipe_arguments(parser)
    parser.add_argument("--json", action="store_true", help="print the whole report, with example answers")
    args = parser.parse_args(argv)
    work = Path(args.work_dir)
    StageOutputs(work).require_finished()
    recipe = changed_recipe(chosen_recipe(args), parse_settings(args.settings, "--set"),
                            parse_settings(args.recipe_settings, "--recipe-set"))
    training = changed_training(lm_train_config(recipe, Path(args.run_dir)),
                                parse_settings(args.train_settings, "--train-set"))
    torch.set_num_threads(args.threads)
    lm, tokenizer, result = pretrain_shapes_lm(recipe, StageOutputs(work).corpus, run_dir=Path(args.run_dir),
                                               train_config=training)
    scored = true_caption_vqa({"changed": (lm, tokenizer), "build": load_causal_lm(StageOutputs(work).lm)},
                              work=work, config=recipe.world, n=args.n, seed=args.seed)
    changed, built = scored["changed"], scored["build"]
    report = {"lm": recipe.lm.to_dict(), **{name: getattr(recipe, name) for name in RECIPE_FIELDS},
              "training": {key: value for key, value in training.to_dict().items() if key != "out_dir"},
              "steps": result.step, "final_loss": result.history[-1]["loss"] if result.history else None,
              "true_captions": changed, "build_lm_true_captions": built}
    if not args.json:
        report = {"accuracy": changed["accuracy"], "by_type": changed["by_type"], "n": changed["n"],
                  "pair_scenes_by_type": changed["by_scene_kind"].get("pair", {}).get("by_type"),
                  "build_lm_accuracy": built["accuracy"], "build_lm_by_type": built["by_type"],
                  "build_lm_pair_scenes_by_type": built["by_scene_kind"].get("pair", {}).get("by_type"),
                  "steps": result.step}
    print(json.dumps(report, indent=1 if args.json else None))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
