"""Paper settings as data: one TOML file per reproduced table row, and a typed loader for them.

A recipe says, for one setting of a paper (``maccap-coco``, ``tomcap-coco``, ...):

* which method it trains and which paper table it reproduces;
* the data it needs (file names under the ``--data`` folder a reproduction is given) and where to get each file
  (URLs as text; nothing is downloaded);
* ``[stages.<command>]``: the hyperparameters of every ``python -m training`` command it runs, as that command's
  flags without the leading ``--`` (``batch-size = 128`` is ``--batch-size 128``; ``true`` is the bare flag,
  ``false`` its ``--no-`` form). Data and output paths are not here: the command that runs a recipe supplies them
  from ``[data]`` and its own output folder;
* ``[[published]]``: the paper's numbers for that row, transcribed exactly, in the paper's own unit.

``python -m training reproduce RECIPE`` runs these; :func:`load_recipe` and :func:`list_recipes` are what it reads.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

RECIPES_DIR = Path(__file__).resolve().parent
RECIPE_SUFFIX = ".toml"
METHODS = ("maccap", "tomcap", "both")  # "both": the shapes world trains MacCap and TOMCap into one bundle
UNITS = ("fraction", "percent")  # MacCap prints metrics as fractions (CIDEr 0.697); TOMCap in percent (97.8)
FlagValue = bool | int | float | str


class RecipeError(ValueError):
    """A recipe file that is missing, unreadable or not of the recipe shape."""


@dataclass(frozen=True)
class Source:
    """One file a recipe needs and where it comes from."""

    file: str  # name under the --data folder, e.g. "dataset_coco.json" or "val2014/"
    what: str  # what it holds, in a sentence
    url: str  # where to get it (text only; a reproduction never downloads)


@dataclass(frozen=True)
class Published:
    """One row of numbers a paper reports for this setting."""

    evaluation: str  # which test it is, e.g. "coco-karpathy-test", "flickr30k-karpathy-test", "vqav2-val-20k"
    source: str  # paper, table and row, e.g. "MacCap Table 3, MSCOCO, MacCap row"
    unit: str  # one of UNITS: how the paper prints the numbers (values are stored exactly as printed)
    metrics: dict[str, float]  # metric key as `evaluate` names it (Bleu_4, CIDEr, top1...) -> the paper's value
    setting: str = ""  # the ablation row or variant this is, when not the method's default ("CLS token", ...)
    method: str = ""  # whose numbers these are, when the recipe trains several methods (the shapes world)


@dataclass(frozen=True)
class Recipe:
    """One paper setting: data, every hyperparameter per command, and the numbers to compare with."""

    name: str  # the file stem, e.g. "maccap-coco"
    method: str  # one of METHODS
    title: str  # one line for tables and --help
    paper: str  # the paper the numbers come from
    data: dict[str, str]  # role -> file under --data: corpus, corpus_split, eval_split, eval_subset, images, ...
    sources: tuple[Source, ...]  # every file of `data` with where to get it
    stages: dict[str, dict[str, FlagValue]]  # command -> {flag without "--": value}, in run order
    published: tuple[Published, ...]  # the paper's numbers for this setting
    notes: tuple[str, ...]  # choices made where the paper is silent, and why
    path: Path  # the TOML file it was read from
    # the commands `reproduce` runs, in order; default: the stages (the shapes world: its build, then shapes-eval)
    pipeline: tuple[str, ...] = ()

    @property
    def commands(self) -> tuple[str, ...]:
        return self.pipeline or tuple(self.stages)

    def argv(self, stage: str) -> list[str]:
        """The hyperparameter flags of ``stage`` as command-line arguments (without data or output paths)."""
        if stage not in self.stages:
            raise RecipeError(f"recipe {self.name!r} has no stage {stage!r} (stages: {', '.join(self.stages)})")
        return flags_to_argv(self.stages[stage])


def flags_to_argv(flags: dict[str, FlagValue]) -> list[str]:
    """``{"batch-size": 128, "dedupe": True, "train-lm": False}`` -> ``["--batch-size", "128", "--dedupe",
    "--no-train-lm"]``."""
    argv: list[str] = []
    for key, value in flags.items():
        if value is True:
            argv.append(f"--{key}")
        elif value is False:
            argv.append(f"--no-{key}")
        else:
            argv += [f"--{key}", str(value)]
    return argv


def list_recipes() -> list[str]:
    """Names of the recipes shipped in training/recipes, sorted."""
    return sorted(path.stem for path in RECIPES_DIR.glob(f"*{RECIPE_SUFFIX}"))


def load_recipe(name: str) -> Recipe:
    """The recipe ``name`` (a shipped recipe's name, or a path to a .toml file), checked for shape."""
    path = Path(name) if name.endswith(RECIPE_SUFFIX) else RECIPES_DIR / f"{name}{RECIPE_SUFFIX}"
    if not path.is_file():
        raise RecipeError(f"no recipe {name!r}; shipped recipes: {', '.join(list_recipes())}")
    try:
        document = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as err:
        raise RecipeError(f"{path}: not a readable TOML file ({err})") from None
    return _recipe(document, path)


def _recipe(document: dict[str, Any], path: Path) -> Recipe:
    def need(table: dict[str, Any], key: str, kind: type, where: str) -> Any:
        value = table.get(key)
        if not isinstance(value, kind):
            raise RecipeError(f"{path}: {where}{key!r} must be a {kind.__name__}")
        return value

    method = need(document, "method", str, "")
    if method not in METHODS:
        raise RecipeError(f"{path}: method must be one of {', '.join(METHODS)}, got {method!r}")
    data = need(document, "data", dict, "")
    sources = tuple(Source(file=need(s, "file", str, "source "), what=need(s, "what", str, "source "),
                           url=need(s, "url", str, "source ")) for s in data.pop("sources", []))
    stages = need(document, "stages", dict, "")
    for stage, flags in stages.items():
        bad = [key for key, value in flags.items() if not isinstance(value, (bool, int, float, str))]
        if not isinstance(flags, dict) or bad:
            raise RecipeError(f"{path}: stage {stage!r} must map flags to plain values (bad: {bad})")
    published = []
    for row in document.get("published", []):
        unit = need(row, "unit", str, "published ")
        if unit not in UNITS:
            raise RecipeError(f"{path}: published unit must be one of {', '.join(UNITS)}, got {unit!r}")
        metrics = need(row, "metrics", dict, "published ")
        published.append(Published(evaluation=need(row, "evaluation", str, "published "),
                                   source=need(row, "source", str, "published "), unit=unit,
                                   metrics={key: float(value) for key, value in metrics.items()},
                                   setting=str(row.get("setting", "")), method=str(row.get("method", ""))))
    return Recipe(name=path.stem, method=method, title=need(document, "title", str, ""),
                  paper=need(document, "paper", str, ""), data={k: str(v) for k, v in data.items()},
                  sources=sources, stages=stages, published=tuple(published),
                  notes=tuple(document.get("notes", [])), path=path, pipeline=tuple(document.get("pipeline", [])))


__all__ = ["Published", "Recipe", "RecipeError", "Source", "flags_to_argv", "list_recipes", "load_recipe"]
