"""``python -m training shapes-clip``: train the shapes world's CLIP alone, with changed settings, and report its gap.

The modality gap is what the shapes world exists to show, and it answers to a handful of levers (the embedding
width, the batch, the logit scale, mismatched pairs, the pooling, image views;
:class:`training.shapes.clip.TinyClipConfig`).
This trains the recipe's CLIP with ``--set field=value`` changes (``--train-set`` for the optimiser and schedule)
and prints :func:`training.shapes.clip.evaluate_clip` on held-out pairs: the gap, paired and unpaired cosine,
the modality means' norms, image-to-text R@1 among 1,000 and zero-shot accuracy. ``--untrained`` measures the
same CLIP at its seeded random initialisation instead: the gap it starts from, before training narrows it. It
writes no bundle; the CLIP trial tables of docs/shapes-world-history.md come from it.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from capdemo.config import ConfigError
from training.loop import TrainConfig
from training.shapes.build import add_recipe_arguments, chosen_recipe
from training.shapes.clip import TinyClipConfig, build_encoder, evaluate_clip, train_clip

SUMMARY = ("i2t", "zero_shot")  # the evaluation's headline retrieval numbers, next to the gap's
GAP_SUMMARY = ("mean_distance", "paired_cosine", "unpaired_cosine", "image_mean_norm", "text_mean_norm",
               "probe_accuracy")


def parse_settings(pairs: list[str], what: str) -> dict[str, Any]:
    """``["embed_dim=512", "mismatched=0.03"]`` -> ``{"embed_dim": 512, "mismatched": 0.03}`` (values as JSON,
    else as text); a pair without ``=`` is a one-line error naming it."""
    settings: dict[str, Any] = {}
    for pair in pairs:
        key, sep, text = pair.partition("=")
        if not sep or not key:
            raise ConfigError(f"{what} {pair!r}: expected field=value")
        try:
            settings[key] = json.loads(text)
        except ValueError:
            settings[key] = text
    return settings


def changed_clip(base: TinyClipConfig, settings: dict[str, Any], train_settings: dict[str, Any], *, out_dir: str,
                 where: str = "shapes-clip --set", train_where: str = "shapes-clip --train-set") -> TinyClipConfig:
    """``base`` with ``settings`` and ``train_settings`` applied (validated as when a recipe is loaded: an unknown
    field or a bad value is a :class:`ConfigError` naming ``where``, or ``train_where`` for the training fields),
    training into ``out_dir``."""
    data = {**base.to_dict(), **settings}
    data["train"] = TrainConfig.from_dict({**data["train"], **train_settings, "out_dir": out_dir},
                                          where=train_where).to_dict()
    return TinyClipConfig.from_dict(data, where=where)


def summary(metrics: dict[str, Any]) -> dict[str, Any]:
    """The numbers the CLIP trial tables of docs/shapes-world-history.md show, from :func:`train_clip`'s metrics."""
    evaluation = metrics["eval"]
    return {**{key: evaluation[key] for key in SUMMARY}, **{key: evaluation["gap"][key] for key in GAP_SUMMARY},
            "steps": metrics["steps"], "train_wall_s": metrics["timings"]["train"]["wall_s"]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training shapes-clip", description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--set", dest="settings", action="append", default=[], metavar="FIELD=VALUE",
                        help="change a TinyClipConfig field, e.g. --set embed_dim=512 --set mismatched=0.03")
    parser.add_argument("--train-set", dest="train_settings", action="append", default=[], metavar="FIELD=VALUE",
                        help="change a TrainConfig field of the CLIP's training, e.g. --train-set batch_size=64")
    parser.add_argument("--run-dir", default="runs/shapes-clip", help="checkpoints and training curves")
    add_recipe_arguments(parser)
    parser.add_argument("--untrained", action="store_true",
                        help="measure the CLIP as initialised, without training it (the gap before training)")
    parser.add_argument("--json", action="store_true", help="print the whole evaluation and config as JSON")
    args = parser.parse_args(argv)
    recipe = chosen_recipe(args)
    config = changed_clip(recipe.clip, parse_settings(args.settings, "--set"),
                          parse_settings(args.train_settings, "--train-set"), out_dir=str(Path(args.run_dir)))
    if args.untrained:
        encoder, _ = build_encoder(config)
        metrics = {"eval": evaluate_clip(encoder, world=recipe.world), "steps": 0,
                   "timings": {"train": {"wall_s": 0.0, "cpu_s": 0.0}}}
    else:
        _, _, metrics = train_clip(config, world=recipe.world)
    report = {"config": config.to_dict(), "summary": summary(metrics), "metrics": metrics}
    print(json.dumps(report, indent=1) if args.json else json.dumps(report["summary"]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
