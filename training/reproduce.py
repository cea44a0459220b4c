"""``python -m training reproduce RECIPE --data DIR --out DIR``: from caption and split files to a paper's table.

Runs a recipe's commands in order (corpus -> embed -> index -> gapstats -> train -> caption-split -> vqa-eval;
the shapes world: its build, then shapes-eval), each exactly as a user would type it, with the recipe's
hyperparameters and the data and output paths filled in. A stage whose command line is unchanged and that
finished before is skipped, and the training commands resume a killed run, so the whole reproduction resumes
by running it again. It ends with our numbers next to the paper's, as ``reproduction.md`` and
``reproduction.json`` in ``--out`` (``--json`` prints the JSON).

``--dry-run`` prints the commands without running them (what a GPU job script needs); ``--smoke`` (the
shapes recipe) shrinks everything so the whole reproduction runs on a CPU in a few minutes (CI).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from collections.abc import Callable

from capdemo.fileio import atomic_output
from training.recipes import Recipe, RecipeError, list_recipes, load_recipe

SMOKE_EVAL_SCENES = 60  # held-out scenes shapes-eval scores in a --smoke reproduction
METRIC_NAMES = {"cider": "CIDEr", "bleu4": "Bleu_4"}  # shapes-eval's keys -> the names papers (and evaluate) use


@dataclass(frozen=True)
class Layout:
    """Where a reproduction reads its data and writes everything it makes."""

    data: Path
    out: Path
    smoke: bool

    def file(self, recipe: Recipe, role: str) -> str:
        if role not in recipe.data:
            raise RecipeError(f"recipe {recipe.name!r} names no data file for {role!r}")
        return str(self.data / recipe.data[role])

    def corpus(self, recipe: Recipe, prefix: str = "") -> list[str]:
        argv = ["--corpus", self.file(recipe, f"{prefix}corpus")]
        return argv + (["--corpus-split", recipe.data[f"{prefix}corpus_split"]]
                       if f"{prefix}corpus_split" in recipe.data else [])

    @property
    def bundle(self) -> str:
        return str(self.out / "bundle")


def _training(method: str, *, retrieves: bool = False) -> Callable[[Recipe, Layout], list[str]]:
    """A training command's paths: the corpus, the shared bundle, its run folder (and the store and statistics
    the index and gapstats stages made, for a method that ``retrieves``)."""
    def argv(recipe: Recipe, layout: Layout) -> list[str]:
        paths = [*layout.corpus(recipe), "--out", layout.bundle, "--run-dir", str(layout.out / "runs" / method)]
        if retrieves:
            paths += ["--datastore", str(layout.out / "datastore"), "--gap-stats", str(layout.out / "gap.safetensors")]
        return [*paths, "--resume"]
    return argv


def _caption_split(recipe: Recipe, layout: Layout, prefix: str = "") -> list[str]:
    method = recipe.stages.get("caption-split", {}).get("method", recipe.method)
    return ["--weights", layout.bundle, "--split", layout.file(recipe, f"{prefix}eval_split"),
            "--subset", recipe.data.get(f"{prefix}eval_subset", "test"),
            "--images", layout.file(recipe, f"{prefix}eval_images" if prefix else "images"),
            "--out", str(layout.out / f"{prefix}captions-{method}.jsonl"), "--json"]


# Data and output flags of each command a recipe can run (its hyperparameters come from the recipe).
PATHS: dict[str, Callable[[Recipe, Layout], list[str]]] = {
    "embed": lambda r, o: [*o.corpus(r), "--out", str(o.out / "embeddings")],
    "index": lambda r, o: [*o.corpus(r, "datastore_" if "datastore_corpus" in r.data else ""),
                           "--out", str(o.out / "datastore")],
    "gapstats": lambda r, o: ["--images", o.file(r, "gap_images"), *o.corpus(r), "--out",
                              str(o.out / "gap.safetensors")],
    "maccap": _training("maccap"),
    "tomcap": _training("tomcap", retrieves=True),
    "capdec": _training("capdec"),
    "caption-split": _caption_split,
    "vqa-eval": lambda r, o: ["--weights", o.bundle, "--questions", o.file(r, "vqa_questions"), "--annotations",
                              o.file(r, "vqa_annotations"), "--images", o.file(r, "vqa_images"),
                              "--out", str(o.out / "vqa.jsonl"), "--json"],
    "shapes": lambda r, o: ["--out", o.bundle, "--work-dir", str(o.out / "work"), *(["--smoke"] if o.smoke else [])],
    "shapes-eval": lambda r, o: ["--weights", o.bundle, "--json", *(["--n", str(SMOKE_EVAL_SCENES)] if o.smoke
                                                                     else [])],
}
# The evaluation (a recipe's published rows' ``evaluation``) each scoring command measures, by its data role.
EVALUATION_ROLE = {"caption-split": "evaluation", "vqa-eval": "vqa_evaluation"}


def commands(recipe: Recipe, layout: Layout) -> list[list[str]]:
    """Every command line of the reproduction, in order (caption-split a second time for a cross-domain split)."""
    lines = []
    for command in recipe.commands:
        if command not in PATHS:
            raise RecipeError(f"recipe {recipe.name!r}: reproduce does not know how to run {command!r}")
        own = recipe.argv(command) if command in recipe.stages else []
        if command == "shapes-eval" and layout.smoke:
            own = [flag for i, flag in enumerate(own) if flag != "--n" and (i == 0 or own[i - 1] != "--n")]
        lines.append([command, *PATHS[command](recipe, layout), *own])
        if command == "caption-split" and "cross_eval_split" in recipe.data:
            lines.append([command, *_caption_split(recipe, layout, "cross_"), *own])
    return lines


@dataclass
class Stage:
    """One finished command of a reproduction and what it printed as JSON (None for training commands)."""

    argv: list[str]
    output: Any


def stage_record(out: Path, number: int) -> Path:
    return out / "stages" / f"{number:02d}.json"


def run(argv: list[str], out: Path, number: int, *, log: Callable[[str], None]) -> Stage:
    """Run one command in process, unless its record says this very command line finished before."""
    from training.__main__ import main

    record = stage_record(out, number)
    if record.is_file():
        saved = json.loads(record.read_text())
        if saved["argv"] == argv:
            log(f"done before: python -m training {' '.join(argv)}")
            return Stage(argv=argv, output=saved["output"])
    log(f"python -m training {' '.join(argv)}")
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        status = main(argv)
    if status:
        raise SystemExit(f"error: the stage failed with status {status}: python -m training {' '.join(argv)}")
    lines = [line for line in printed.getvalue().splitlines() if line.startswith(("{", "["))]
    output = json.loads(lines[-1]) if lines else None
    with atomic_output(record) as tmp:
        tmp.write_text(json.dumps({"argv": argv, "output": output}, indent=1) + "\n")
    return Stage(argv=argv, output=output)


def measured(recipe: Recipe, stages: list[Stage]) -> dict[tuple[str, str], dict[str, float]]:
    """Our numbers by (evaluation, method): caption-split and vqa-eval rows, and every method of shapes-eval."""
    found: dict[tuple[str, str], dict[str, float]] = {}
    crossed = False
    for stage in stages:
        command, output = stage.argv[0], stage.output
        if output is None:
            continue
        if command == "shapes-eval":
            evaluation = next((p.evaluation for p in recipe.published), "shapes")
            for method, row in output.items():
                if isinstance(row, dict) and "scene_accuracy" in row:
                    found[(evaluation, method)] = {METRIC_NAMES.get(k, k): float(v) for k, v in row.items()
                                                   if isinstance(v, (int, float))}
        elif command in EVALUATION_ROLE:
            role = EVALUATION_ROLE[command]
            if command == "caption-split" and crossed:
                role = "cross_evaluation"
            crossed = crossed or command == "caption-split"
            metrics = output.get("metrics", output)
            method = output.get("method", recipe.method)
            found[(recipe.data.get(role, command), method)] = {k: float(v) for k, v in metrics.items()
                                                               if isinstance(v, (int, float))}
    return found


def table(recipe: Recipe, found: dict[tuple[str, str], dict[str, float]]) -> list[dict[str, Any]]:
    """One row per published number: the paper's, and ours in the paper's unit (None when not reproduced here)."""
    rows = []
    for published in recipe.published:
        method = published.method or recipe.method
        ours_all = found.get((published.evaluation, method)) if not published.setting or published.method else None
        scale = 100.0 if published.unit == "percent" else 1.0
        for metric, paper in published.metrics.items():
            ours = None if ours_all is None or metric not in ours_all else round(ours_all[metric] * scale, 4)
            rows.append({"evaluation": published.evaluation, "method": method, "setting": published.setting,
                         "metric": metric, "ours": ours, "paper": paper, "unit": published.unit,
                         "source": published.source})
    return rows


def markdown(recipe: Recipe, rows: list[dict[str, Any]]) -> str:
    lines = [f"# Reproduction: {recipe.title}", "", f"Recipe `{recipe.name}`; numbers from: {recipe.paper}.", "",
             "| evaluation | method | setting | metric | ours | paper |", "| --- | --- | --- | --- | --- | --- |"]
    for row in rows:
        ours = "not run" if row["ours"] is None else f"{row['ours']:.4g}"
        lines.append(f"| {row['evaluation']} | {row['method']} | {row['setting'] or 'default'} | {row['metric']} | "
                     f"{ours} | {row['paper']:.4g} |")
    lines += ["", "Rows marked *not run* are ablation settings this reproduction does not train; the recipe's notes "
              "say which flags make them."]
    return "\n".join(lines) + "\n"


def reproduce(recipe: Recipe, layout: Layout, *, log: Callable[[str], None]) -> list[dict[str, Any]]:
    layout.out.mkdir(parents=True, exist_ok=True)
    stages = [run(argv, layout.out, number, log=log) for number, argv in enumerate(commands(recipe, layout))]
    rows = table(recipe, measured(recipe, stages))
    with atomic_output(layout.out / "reproduction.json") as tmp:
        tmp.write_text(json.dumps({"recipe": recipe.name, "smoke": layout.smoke, "rows": rows}, indent=1) + "\n")
    with atomic_output(layout.out / "reproduction.md") as tmp:
        tmp.write_text(markdown(recipe, rows))
    return rows


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m training reproduce", description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("recipe", help=f"a shipped recipe ({', '.join(list_recipes())}) or a recipe .toml file")
    parser.add_argument("--data", default="data", help="folder holding the recipe's data files (see its sources)")
    parser.add_argument("--out", default=None, help="folder for everything made (default: runs/reproduce-RECIPE)")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes (the shapes recipe): minutes on a CPU")
    parser.add_argument("--dry-run", action="store_true", help="print the commands instead of running them")
    parser.add_argument("--json", action="store_true", help="print one JSON object with the table's rows")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    recipe = load_recipe(args.recipe)
    layout = Layout(data=Path(args.data), out=Path(args.out or f"runs/reproduce-{recipe.name}"), smoke=args.smoke)
    if args.dry_run:
        for line in commands(recipe, layout):
            print("python -m training " + " ".join(line))
        return 0
    rows = reproduce(recipe, layout, log=lambda message: print(f"[reproduce] {message}", file=sys.stderr, flush=True))
    if args.json:
        print(json.dumps({"recipe": recipe.name, "smoke": args.smoke, "rows": rows}))
    else:
        print(markdown(recipe, rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
