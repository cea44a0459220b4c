"""Recipes: every one loads, names only flags its commands have, and carries the papers' numbers exactly."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import pytest

from capdemo.encoders import EncoderConfig

from training.recipes import RecipeError, flags_to_argv, list_recipes, load_recipe

PAPERS = Path(__file__).resolve().parents[2] / "shared" / "papers"
RECIPES = ["maccap-cc3m-to-flickr30k", "maccap-coco", "maccap-flickr30k", "shapes", "tomcap-coco"]

# The maccap / tomcap commands are being rewritten (issue 13): their flags as of d3b1df4 (+ --corpus-split/--dedupe),
# which the lead keeps. When a command's parser can be imported, the snapshot is checked against it as well.
SHAPES_EVAL_FLAGS = {"weights", "n", "seed", "methods", "samples", "beams", "no-ceiling", "json"}  # parser in main()
SNAPSHOTS = {"shapes-eval": SHAPES_EVAL_FLAGS}  # a parser built inside main(): its flags as of writing
# Each importable parser and the required arguments to fill in around a recipe's hyperparameters.
REQUIRED = {
    "embed": ["--corpus", "c.txt", "--encoder", "ViT-B-32", "--out", "o"],
    "index": ["--corpus", "c.txt", "--encoder", "ViT-B-32", "--out", "o"],
    "gapstats": ["--images", "i", "--corpus", "c.txt", "--encoder", "ViT-B-32", "--out", "o"],
    "caption-split": ["--weights", "w", "--method", "maccap", "--split", "s.json", "--images", "i", "--out", "o"],
    "vqa-eval": ["--weights", "w", "--questions", "q", "--annotations", "a", "--out", "o"],
    "maccap": ["--corpus", "c.txt", "--out", "o"],
    "tomcap": ["--corpus", "c.txt", "--datastore", "d", "--out", "o"],
    "capdec": ["--corpus", "c.txt", "--out", "o"],
}


def parser_of(command: str) -> argparse.ArgumentParser | None:
    """The command's argparse parser, when its module exposes ``build_parser``."""
    import importlib

    from training.__main__ import SUBCOMMANDS

    module = importlib.import_module(SUBCOMMANDS[command][0])
    return module.build_parser() if hasattr(module, "build_parser") else None


def option_names(parser: argparse.ArgumentParser) -> set[str]:
    return {o[2:] for action in parser._actions for o in action.option_strings if o.startswith("--")} - {"help"}


def test_every_recipe_loads_with_data_sources_stages_and_numbers():
    assert list_recipes() == RECIPES
    for name in RECIPES:
        recipe = load_recipe(name)
        assert recipe.name == name and recipe.stages and recipe.published and recipe.title
        if recipe.method != "both":  # the shapes world downloads nothing
            named = {s.file.rstrip("/") for s in recipe.sources}
            files = {v for k, v in recipe.data.items() if not k.endswith(("split", "subset", "evaluation"))}
            assert {f.split("/")[0] for f in files} <= {n.split("/")[0] for n in named}, name  # every file sourced
            assert all(s.url.startswith(("http://", "https://")) for s in recipe.sources)


@pytest.mark.parametrize("name", RECIPES)
def test_recipes_name_only_flags_their_commands_have(name):
    recipe = load_recipe(name)
    for stage, flags in recipe.stages.items():
        names = {key if value is not False else f"no-{key}" for key, value in flags.items()}
        parser = parser_of(stage)
        if stage in SNAPSHOTS:
            assert names <= SNAPSHOTS[stage], f"{name}: {stage} has no --{sorted(names - SNAPSHOTS[stage])}"
        if parser is None:
            continue
        if stage in SNAPSHOTS:  # the snapshot still describes the command
            assert SNAPSHOTS[stage] <= option_names(parser), sorted(SNAPSHOTS[stage] - option_names(parser))
        args = parser.parse_args(REQUIRED[stage] + recipe.argv(stage))  # flags exist and their values parse
        for key, value in flags.items():
            parsed = getattr(args, parser_dest(parser, key))
            if isinstance(parsed, EncoderConfig):  # --retrieval-encoder MODEL/TAG parses into an EncoderConfig
                parsed = f"{parsed.model_name}/{parsed.pretrained}"
            assert parsed == value or (value is True and parsed) or str(parsed) == str(value), (stage, key, parsed)


def parser_dest(parser: argparse.ArgumentParser, flag: str) -> str:
    return next(a.dest for a in parser._actions if f"--{flag}" in a.option_strings)


def test_the_shapes_recipe_is_what_the_shapes_build_runs():
    """The stage flags parse to the same settings as the build's ShapesRecipe (plus steps, seed and --dedupe)."""
    from training.shapes.build import ShapesRecipe

    recipe, shipped = load_recipe("shapes"), ShapesRecipe()
    for stage, args, steps in (("maccap", shipped.maccap_args, shipped.maccap_steps),
                               ("tomcap", shipped.tomcap_args, shipped.tomcap_steps),
                               ("capdec", shipped.capdec_args, shipped.capdec_steps)):
        flags = dict(recipe.stages[stage])
        assert (flags.pop("steps"), flags.pop("seed"), flags.pop("dedupe")) == (steps, shipped.seed, True)
        assert sorted(flags) == sorted(a[2:] for a in args if a.startswith("--"))
        parser = parser_of(stage)
        if parser is not None:
            assert parser.parse_args(REQUIRED[stage] + flags_to_argv(flags)) == parser.parse_args(
                REQUIRED[stage] + list(args))


def test_flags_to_argv_and_bad_recipes(tmp_path):
    assert flags_to_argv({"batch-size": 128, "dedupe": True, "train-lm": False, "lr": 4e-4}) == [
        "--batch-size", "128", "--dedupe", "--no-train-lm", "--lr", "0.0004"]
    with pytest.raises(RecipeError, match="no recipe 'maccap-imagenet'; shipped recipes: maccap-cc3m"):
        load_recipe("maccap-imagenet")
    bad = tmp_path / "bad.toml"
    bad.write_text('method = "maccap"\ntitle = "t"\npaper = "p"\n[data]\n[stages.maccap]\nlr = [1]\n')
    with pytest.raises(RecipeError, match=r"stage 'maccap' must map flags to plain values \(bad: \['lr'\]\)"):
        load_recipe(str(bad))
    bad.write_text('method = "magic"\n')
    with pytest.raises(RecipeError, match="method must be one of"):
        load_recipe(str(bad))
    with pytest.raises(RecipeError, match="no stage 'tomcap'"):
        load_recipe("maccap-coco").argv("tomcap")


# --------------------------------------------------------------------------------------------
# The published numbers against the paper text


def _numbers(line: str) -> list[float]:
    return [float(x) for x in re.findall(r"(?<![\w.])\d+\.\d+", line)]


def maccap_paper_rows() -> dict[tuple[str, str], dict[str, float]]:
    """(evaluation, setting) -> metrics, read from the MacCap paper text's Tables 2-5."""
    text = (PAPERS / "maccap-aaai2024.txt").read_text(encoding="utf-8")
    six = ("Bleu_1", "Bleu_4", "METEOR", "ROUGE_L", "CIDEr", "SPICE")
    rows: dict[tuple[str, str], dict[str, float]] = {}
    for line in text.splitlines():
        numbers = _numbers(line)
        if line.startswith("MacCap\t") and len(numbers) == 18:  # Table 2: CC3M->COCO, COCO->Flickr, Flickr->COCO
            rows[("coco-karpathy-test", "cc3m")] = dict(zip(six, numbers[:6]))
        elif line.startswith("MacCap\t") and len(numbers) == 12:  # Table 3: MSCOCO, Flickr30k
            rows[("coco-karpathy-test", "")] = dict(zip(six, numbers[:6]))
            rows[("flickr30k-karpathy-test", "")] = dict(zip(six, numbers[6:]))
        elif line.startswith(("MacCap\t", "Baseline\t")) and len(numbers) in (3, 6) and numbers[0] > 1:  # Table 4
            setting = "" if line.startswith("MacCap") else "question only (vqa-eval --question-only)"
            rows[("vqav2-val-20k", setting)] = dict(zip(("top1", "top5", "top10"), numbers[:3]))
        elif match := re.match(r"<i>(.+?)</i>\t", line):  # Table 5
            rows[("flickr30k-karpathy-test", match.group(1))] = dict(zip(six, numbers))
    return rows


@pytest.mark.skipif(not (PAPERS / "maccap-aaai2024.txt").is_file(), reason="shared/papers/maccap-aaai2024.txt absent")
def test_maccap_numbers_are_the_papers():
    rows = maccap_paper_rows()
    checked = 0
    for name in ("maccap-coco", "maccap-flickr30k", "maccap-cc3m-to-flickr30k"):
        for published in load_recipe(name).published:
            setting = published.setting
            if name == "maccap-cc3m-to-flickr30k" and not setting:  # the full method's rows of Tables 5 and 2
                setting = "sampling and filtering" if published.evaluation.startswith("flickr") else "cc3m"
            assert published.metrics == rows[(published.evaluation, setting)], (name, published.source)
            checked += 1
    assert checked == 12  # 3 + 1 + 8 rows
    assert rows[("coco-karpathy-test", "")]["CIDEr"] == 0.697  # a spot check of the reader itself


def test_the_shapes_recipes_numbers_are_the_shipped_bundles_evaluation():
    """The shapes recipe's "published" rows are what the shipped bundle's evaluation.json records (rounded as the
    README's table rounds them), so a rebuilt bundle cannot leave them behind."""
    from capdemo.bundle import Bundle
    from training.bundle_evaluation import read_evaluation

    shipped = Bundle.load(Path(__file__).resolve().parents[1] / "weights" / "shapes")
    recorded = {result.method: result.metrics for result in read_evaluation(shipped) if result.task == "shapes-eval"}
    published = load_recipe("shapes").published
    assert {p.method for p in published} == {"maccap", "tomcap"}
    for row in published:  # the table's CIDEr has two decimals, every other metric three (rounded from the report,
        # which evaluation.json stores to four places: one last digit of slack)
        assert set(row.metrics) == set(recorded[row.method]), row.method
        for metric, value in row.metrics.items():
            assert value == pytest.approx(recorded[row.method][metric], abs=0.01 if metric == "CIDEr" else 0.001)


@pytest.mark.skipif(not (PAPERS / "tomcap-cvpr2026-summary.txt").is_file(), reason="TOMCap summary absent")
def test_tomcap_numbers_are_the_summarys():
    lines = (PAPERS / "tomcap-cvpr2026-summary.txt").read_text(encoding="utf-8").splitlines()
    coco = next(_numbers(line) for line in lines if line.startswith("Text-only TOMCap"))
    nocaps = next(_numbers(line) for line in lines if line.startswith("TOMCap "))
    published = {p.evaluation: p.metrics for p in load_recipe("tomcap-coco").published}
    assert published["coco-karpathy-test"] == dict(zip(("Bleu_4", "METEOR", "CIDEr"), coco))
    assert published["nocaps-val"] == dict(
        zip(("CIDEr_in_domain", "CIDEr_near_domain", "CIDEr_out_domain", "CIDEr"), nocaps))
    assert coco == [28.8, 25.5, 97.8]


@pytest.mark.parametrize("name", RECIPES)
def test_reproduce_builds_command_lines_each_command_accepts(name, tmp_path):
    """`reproduce --dry-run`: every stage's full command line (data and output paths plus the recipe's flags)
    parses with that command's own parser, and the training stages resume."""
    from training.reproduce import Layout, commands

    recipe = load_recipe(name)
    lines = commands(recipe, Layout(data=tmp_path / "data", out=tmp_path / "out", smoke=False))
    assert [line[0] for line in lines][: len(recipe.commands)] == list(recipe.commands)
    for line in lines:
        parser = parser_of(line[0])
        if parser is None:  # shapes-eval builds its parser inside main()
            continue
        args = parser.parse_args(line[1:])
        if line[0] in ("maccap", "tomcap", "capdec"):
            assert args.resume and args.run_dir == str(tmp_path / "out" / "runs" / line[0])
