"""``python -m training shapes-ablate``: what each part of the two methods is worth in the shapes world.

Rows, each scored by :func:`training.shapes.evaluate.evaluate_bundle` on the
same freshly generated held-out scenes:

* modality-gap handling: TOMCap decoders trained with no gap handling, noise
  injection only, mean-only correction, mean+std correction, and mean+std
  with the paper's noise (0.5 x sigma_I), every other setting equal;
* the noise scale: mean+std correction with the training noise (cross-attention input and retrieval query)
  at 0, 0.25, 0.5 (the paper's), 1, 2 and 4 x sigma_I per dimension (4 is the shapes recipe's), and the recipe's
  two noises apart: 4 x sigma_I on the input with clean queries, and with 0.5 x on the queries;
* retrieval: TOMCap trained and run without retrieved captions (the recipe's mean+std and noise);
* neighbours: TOMCap with K = 1, 2 and 6 retrieved captions (4, the paper's best, is the recipe's: the
  noise-scale-4 row; the paper's 8 does not fit the shapes LM's positions);
* MacCap's text reconstruction training (its Table 5): a single or N_cr noisy copies of the text embedding, each
  with and without the region noise;
* multiple sampling and subregions: MacCap at S = 1, with the CLS token instead of subregion aggregation, and at
  S = 20 with CLIP rerank (inference only, on the built bundle);
* CapDec's noise injection (its paper's central claim): CapDec trained on clean text embeddings against the
  recipe's noise variance.

Every row also reports its text-to-text ceiling (its method's inference fed the captions' text embeddings where the
images' go), so a row that loses on images can be told apart from a weaker decoder, and how many of the shipped
bundle's example images (the app's) its method captions exactly. It reuses a finished build's
stage outputs (``--work-dir`` of ``python -m training shapes``: CLIP, LM, datastore, gap statistics), trains each
variant with the build's own ``python -m training tomcap`` or ``maccap`` command, and keeps every variant's bundle
and scores under ``<work-dir>/ablation`` so an interrupted run continues where it stopped.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from capdemo import methods as registry
from capdemo.bundle import MANIFEST, Bundle, sha256_of
from capdemo.fileio import atomic_output
from capdemo.methods.capdec.model import CapDecConfig
from capdemo.methods.maccap.model import MacCapConfig
from capdemo.methods.tomcap.model import TOMCapConfig
from capdemo.pipeline import Captioner
from training.shapes.build import (EXAMPLES_FILE, TOMCAP_NOISE_SCALE, ShapesRecipe, StageOutputs,
                                   add_recipe_arguments, TRAINING_COMMANDS, add_trial_arguments, chosen_recipe, log,
                                   run_command, trial_recipe)
from training.shapes.evaluate import evaluate_bundle, examples_report


@dataclass(frozen=True)
class Variant:
    """One ablation row: a name, what it tests, and how it differs from the default."""

    name: str
    group: str
    description: str
    method: str = "tomcap"  # the method the row trains (or, for an inference-only row, runs)
    flags: tuple[str, ...] = ()  # extra ``python -m training <method>`` flags (trained variants)
    settings: tuple[tuple[str, object], ...] = ()  # inference settings on the built bundle (inference-only variants)

    @property
    def trained(self) -> bool:
        return not self.settings


# The methods a row can train (each by build.TRAINING_COMMANDS), and the config whose defaults its flags change
TRAINED_METHODS = {"tomcap": TOMCapConfig, "maccap": MacCapConfig, "capdec": CapDecConfig}


NO_NOISE = ("--input-noise-scale", "0", "--query-noise-scale", "0", "--noise-variance", "0")
VARIANTS = (
    Variant("gap-none", "gap", "no gap handling", flags=("--gap-correction", "none", *NO_NOISE)),
    Variant("gap-noise", "gap", "CapDec's noise only (variance 0.016, re-normalised)",
            flags=("--gap-correction", "none", *NO_NOISE[:-1], "0.016")),
    Variant("gap-mean", "gap", "mean-only correction", flags=("--gap-correction", "mean", *NO_NOISE)),
    Variant("gap-mean-std", "gap", "mean+std correction", flags=("--gap-correction", "mean_std", *NO_NOISE)),
    Variant("gap-mean-std-noise", "gap", "mean+std correction + noise 0.5 x sigma_I (the paper's)",
            flags=("--gap-correction", "mean_std", "--input-noise-scale", "0.5", "--query-noise-scale", "0.5")),
    # with gap-mean-std (0) and the paper's 0.5: the noise-scale sweep
    *(Variant(f"noise-scale-{scale}", "noise", f"mean+std correction + noise {scale} x sigma_I"
              + (" (the shapes recipe's)" if scale == TOMCAP_NOISE_SCALE else ""),
              flags=("--gap-correction", "mean_std", "--input-noise-scale", scale, "--query-noise-scale", scale))
      for scale in ("0.25", "1", "2", "4")),
    # the recipe's two noises apart: its input noise with clean queries and with the paper's 0.5 on the queries;
    # then half its input noise with 0.5 on the queries (a decoder that reads clean text nearly as well as one
    # trained without noise: "The gap matters" in the README)
    *(Variant(f"noise-{scale}-query-{query}", "noise",
              f"mean+std correction + noise {scale} x sigma_I on the input, "
              + ("none on the retrieval queries" if query == "0" else f"{query} x on the retrieval queries"),
              flags=("--gap-correction", "mean_std", "--input-noise-scale", scale, "--query-noise-scale", query))
      for scale, query in ((TOMCAP_NOISE_SCALE, "0"), (TOMCAP_NOISE_SCALE, "0.5"), ("2", "0.5"))),
    # with the default (K = 4): the paper's K sweep, its 8 replaced by 6, since the shapes LM's 160 positions hold
    # at most 7 of the store's longest captions (TOMCapMethod.limits refuses more)
    *(Variant(f"tomcap-k{k}", "neighbours", f"TOMCap with K = {k} retrieved captions", flags=("--k", k))
      for k in ("1", "2", "6")),
    Variant("no-retrieval", "retrieval", "TOMCap without retrieval",
            flags=("--gap-correction", "mean_std", "--no-retrieval")),
    Variant("maccap-single-no-noise", "text training", "MacCap single token w/o noise", method="maccap",
            flags=("--text-copies", "1", "--noise-variance", "0")),
    Variant("maccap-single-noise", "text training", "MacCap single token w/ noise", method="maccap",
            flags=("--text-copies", "1")),
    Variant("maccap-multi-no-noise", "text training", "MacCap multiple token w/o noise", method="maccap",
            flags=("--noise-variance", "0")),
    Variant("maccap-multi-noise", "text training", "MacCap multiple token w/ noise (default)", method="maccap"),
    Variant("maccap-s1", "sampling", "MacCap S = 1 (one clean sample, no rerank)", method="maccap",
            settings=(("samples", 1),)),
    Variant("maccap-cls", "region", "MacCap with the CLS token instead of subregion aggregation, S = 20",
            method="maccap", settings=(("region_mode", "cls"),)),
    Variant("maccap-s20", "sampling", "MacCap S = 20 + CLIP rerank (default)", method="maccap",
            settings=(("samples", 20),)),
    Variant("capdec-no-noise", "capdec", "CapDec w/o noise (clean text embeddings)", method="capdec",
            flags=("--noise-variance", "0")),
    Variant("capdec-noise", "capdec", "CapDec w/ noise (default)", method="capdec"),
)
# What a stored score measures: raised when scoring changes, so that a rerun rescores every row (its bundle kept)
# instead of mixing two kinds of score. 2: MacCap's text-to-text ceiling read through its own sampling and rerank.
SCORING_VERSION = 2
REPORTED = ("scene_accuracy", "attribute_accuracy", "cider", "bleu4", "parse_rate", "text_to_text_scene_accuracy")
EXAMPLES_CORRECT = "examples_correct"  # of the shipped bundle's "examples_n" example images, captioned exactly


def trained_recipe(recipe: ShapesRecipe, method: str) -> dict[str, Any]:
    """What of ``recipe`` a trained row of ``method`` depends on: everything but the lead and the shipped TOMCap's
    pick among its beams (they shape the shipped bundle and train nothing), the methods' step counts (a row trains
    its own, which its key holds) and the other methods' training arguments (they never reach its command), so a
    recipe that only lengthens or retunes one method keeps the other methods' rows' caches."""
    fields = recipe.to_dict()
    for name in ("lead_method", "tomcap_select_by", *(f"{other}_steps" for other in TRAINED_METHODS)):
        fields.pop(name)
    for other in TRAINED_METHODS.keys() - {method}:
        fields.pop(f"{other}_args")
    return fields


def row_folder(variant: Variant, *, recipe: ShapesRecipe, work: Path, weights: Path, steps: int | None) -> Path:
    """Where one row's bundle and scores live: a folder named by a hash of what it was measured on (a trained row:
    the recipe's :func:`trained_recipe`, its steps, its flags and its method's defaults; an inference row: the scored
    ``weights``' manifest and its settings), so a rerun with other inputs, or after a default changed, never reuses
    a bundle or a score."""
    if variant.trained:
        method_steps = recipe.steps_of(variant.method) if steps is None else steps
        source: dict[str, Any] = {"recipe": trained_recipe(recipe, variant.method), "method": variant.method,
                                  "steps": method_steps, "flags": variant.flags,
                                  "defaults": TRAINED_METHODS[variant.method]().to_dict()}
    else:
        source = {"weights": sha256_of(weights / MANIFEST), "settings": variant.settings}
    key = hashlib.sha256(json.dumps(source, sort_keys=True).encode()).hexdigest()[:12]
    return work / "ablation" / variant.name / (f"steps-{method_steps}-{key}" if variant.trained else key)


def run_variant(variant: Variant, *, recipe: ShapesRecipe, work: Path, shipped: Bundle, steps: int | None, n: int,
                seed: int, novel: bool = False) -> dict[str, Any]:
    """Train (if needed) and score one variant in its :func:`row_folder`; scores are cached next to its bundle,
    named by the ``SCORING_VERSION`` they were made under. ``shipped`` (the app's bundle) is what inference rows run
    on and whose example images every row captions."""
    weights = shipped.path
    folder = row_folder(variant, recipe=recipe, work=work, weights=weights, steps=steps)
    scores_file = folder / f"scores-v{SCORING_VERSION}-n{n}-seed{seed}{'-novel' if novel else ''}.json"
    scored = folder / "bundle" if variant.trained else weights
    if scores_file.is_file():  # the scores are the cache's; what the row is called is the code's, as it is now
        row = {**json.loads(scores_file.read_text()), "group": variant.group, "description": variant.description}
        return {**row, **examples_of(variant, scored=scored, shipped=shipped, folder=folder)}
    folder.mkdir(parents=True, exist_ok=True)
    if variant.trained:
        if not (scored / "bundle.json").is_file():  # run_command prints to stderr: stdout carries only the report
            command = TRAINING_COMMANDS[variant.method]
            run_command(command(recipe, work, out=scored, run_dir=folder / "run", steps=steps, extra=variant.flags))
    report = evaluate_bundle(str(scored), n=n, seed=seed, methods=[variant.method],
                             settings={variant.method: dict(variant.settings)}, gap=False, vqa_scenes=0,
                             examples=False, world_config=recipe.world,  # a trained row's bundle has no recipe
                             novel=novel)
    scores = {**report[variant.method],
              "text_to_text_scene_accuracy": report["text_to_text"][variant.method]["scene_accuracy"]}
    row = {"group": variant.group, "description": variant.description, **{k: scores[k] for k in REPORTED}}
    with atomic_output(scores_file) as tmp:
        tmp.write_text(json.dumps(row, indent=1))
    log(f"{variant.name}: scene {row['scene_accuracy']:.3f} attributes {row['attribute_accuracy']:.3f}")
    return {**row, **examples_of(variant, scored=scored, shipped=shipped, folder=folder)}


def examples_of(variant: Variant, *, scored: Path, shipped: Bundle, folder: Path) -> dict[str, Any]:
    """The row's method on the shipped bundle's example images (the app's): how many it captions exactly of how
    many, and the captions it missed; cached next to the row's scores under the hash of the examples' list, and
    nothing when the shipped bundle has no examples."""
    listed = shipped.manifest.get("files", {}).get(EXAMPLES_FILE)
    if listed is None:
        return {}
    cache = folder / f"examples-{listed['sha256'][:12]}.json"
    if cache.is_file():
        return json.loads(cache.read_text())
    report = examples_report(Captioner.from_bundle(scored), variant.method, dict(variant.settings), shipped_by=shipped)
    missed = [{"reference": c["reference"], "prediction": c["prediction"]} for c in report["captions"]
              if not c["exact"]]
    found = {EXAMPLES_CORRECT: report["correct"], "examples_n": report["n"], "examples_missed": missed}
    with atomic_output(cache) as tmp:
        tmp.write_text(json.dumps(found, indent=1))
    return found


def over_seeds(runs: dict[int, dict[str, Any]]) -> dict[str, Any]:
    """One row from a variant's runs (training seed -> row): each metric's mean and, over two or more seeds,
    its sample standard deviation (``<metric>_std``); the runs themselves under ``seeds``."""
    first = next(iter(runs.values()))
    row: dict[str, Any] = {"group": first["group"], "description": first["description"]}
    examples = all(EXAMPLES_CORRECT in run for run in runs.values())  # rows scored before examples were have none
    for metric in REPORTED + ((EXAMPLES_CORRECT,) if examples else ()):
        values = np.array([run[metric] for run in runs.values()], dtype=float)
        row[metric] = float(values.mean())
        if len(values) > 1:
            row[f"{metric}_std"] = float(values.std(ddof=1))
    row["seeds"] = {str(seed): run for seed, run in runs.items()}
    return row


def markdown_table(rows: dict[str, dict[str, Any]], *, suffix: str = "") -> str:
    """The ablation as a Markdown table, one line per variant (mean ± std where several seeds ran); ``suffix``
    follows each description (e.g. the training length of rows run at another one)."""
    def cell(row: dict[str, Any], metric: str, digits: int) -> str:
        std = row.get(f"{metric}_std")
        return f"{row[metric]:.{digits}f}" + (f" ± {std:.{digits}f}" if std is not None else "")

    def examples(row: dict[str, Any]) -> str:  # each seed's count: a handful of images, not a rate to average
        if EXAMPLES_CORRECT not in row:  # over_seeds counts a row only when every run of it was
            return "–"
        runs = list(row["seeds"].values())
        return ", ".join(str(run[EXAMPLES_CORRECT]) for run in runs) + f" of {runs[0]['examples_n']}"

    lines = ["| variant | seeds | scene acc. | attribute acc. | CIDEr | BLEU-4 | text-to-text scene acc. "
             "| examples exact (each seed) |",
             "|---|---|---|---|---|---|---|---|"]
    for row in rows.values():
        lines.append(f"| {row['description']}{suffix} | {len(row['seeds'])} | {cell(row, 'scene_accuracy', 3)} "
                     f"| {cell(row, 'attribute_accuracy', 3)} | {cell(row, 'cider', 2)} | {cell(row, 'bleu4', 3)} "
                     f"| {cell(row, 'text_to_text_scene_accuracy', 3)} | {examples(row)} |")
    return "\n".join(lines)


def full_length_lines(full_length: dict[str, Any], *, recipe: ShapesRecipe | None = None) -> list[str]:
    """Table lines of rows retrained at another length than the table's (``ablation.json``'s ``full_length``: the
    rows, and ``<method>_steps`` for each method they train), each description naming its method and its length,
    against the length ``recipe`` (default: the shipped one) builds it with."""
    by_name = {variant.name: variant for variant in VARIANTS}
    recipe = recipe or ShapesRecipe.full()
    lines = []
    for method in TRAINED_METHODS:
        rows = {name: row for name, row in full_length["rows"].items() if by_name[name].method == method}
        if rows:
            steps, label = full_length[f"{method}_steps"], registry.get(method).label
            times = "" if steps == recipe.steps_of(method) else f"{steps / recipe.steps_of(method):g} x "
            table = markdown_table(rows, suffix=f", **{steps} steps** ({times}{label}'s length in the build)")
            lines += table.splitlines()[2:]  # without the header
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training shapes-ablate", description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--work-dir", default="runs/shapes-build-v2",
                        help="a finished `python -m training shapes` work dir")
    parser.add_argument("--weights", default="weights/shapes",
                        help="the shipped bundle: the inference-only (MacCap) rows run on it, every row captions its "
                             "examples")
    parser.add_argument("--steps", type=int, default=None,
                        help="training steps per trained variant (default: the recipe's steps of its method)")
    parser.add_argument("--n", type=int, default=500, help="held-out scenes per row")
    parser.add_argument("--seed", type=int, default=1234, help="world seed of the test scenes")
    parser.add_argument("--novel", action="store_true",
                        help="score only scenes no training text describes (a build with --world-set novel=F)")
    parser.add_argument("--train-seeds", type=int, nargs="+", default=[0],
                        help="training seeds per trained row (mean ± std over them)")
    add_recipe_arguments(parser)  # the work dir's recipe: the shipped bundle's by default, --world v1, --smoke for CI's
    add_trial_arguments(parser)  # a trial build's changes, as its build named them
    parser.add_argument("--only", nargs="+", default=None, choices=[v.name for v in VARIANTS], help="run these rows")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a Markdown table")
    args = parser.parse_args(argv)
    work = Path(args.work_dir)
    try:
        StageOutputs(work).require_finished()
        shipped = Bundle.load(args.weights)  # verified once: every row captions its examples
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    recipe = trial_recipe(chosen_recipe(args), args)
    chosen = [v for v in VARIANTS if args.only is None or v.name in args.only]
    rows = {}
    for variant in chosen:  # inference rows do not train: one run, whatever --train-seeds says
        seeds = args.train_seeds if variant.trained else [recipe.seed]
        rows[variant.name] = over_seeds({
            seed: run_variant(variant, recipe=recipe.replace(seed=seed), work=work, shipped=shipped,
                              steps=args.steps, n=args.n, seed=args.seed, novel=args.novel)
            for seed in seeds})
    report = {"n": args.n, "seed": args.seed, **({"novel": True} if args.novel else {}),
              "tomcap_steps": args.steps or recipe.tomcap_steps,
              "maccap_steps": args.steps or recipe.maccap_steps, "capdec_steps": args.steps or recipe.capdec_steps,
              "train_seeds": args.train_seeds, "rows": rows}
    print(json.dumps(report) if args.json else markdown_table(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
