"""A bundle's model card: README.md with Hugging Face Hub metadata, generated from what the bundle records.

:func:`model_card` is a function of the bundle alone (``bundle.json``, each method's ``<component>/training.json``
and the optional ``evaluation.json``, see :mod:`training.bundle_evaluation`): what each component is, how it was
trained, its evaluation numbers, its domain, intended use and limits, and how to serve it. The card is not a
bundle file (``bundle.json`` does not list it): it is derived, so writers that rebuild a bundle drop it and
whoever publishes the bundle regenerates it (``capdemo-train push``, the shapes build).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from capdemo.bundle import MANIFEST, Bundle, IN_BUNDLE_PREFIX
from capdemo.fileio import atomic_output
from capdemo import methods as registry
from training.bundle_evaluation import EvaluationResult, read_evaluation

CARD_FILE = "README.md"  # the Hub shows a repository's README.md as its model card
LIBRARY_NAME = "capdemo"
PIPELINE_TAG = "image-to-text"
TRAINING_RECORD = "training.json"  # each method's trainer writes <component>/training.json into the bundle
BASE_TAGS = ("capdemo", "image-captioning", "text-only-training", "zero-shot", "clip", "safetensors")
SERVE_PLACEHOLDER = "<org>/<name>"  # the repo id in serving commands when the card is not for a known repo

# What each component that is not a captioning method is, in a sentence (a method's role is its registry entry's
# label and citation); components not listed here are named with their settings only.
COMPONENT_ROLES = {
    "encoder": "CLIP image and text encoder. Its text side embeds the training captions, the datastore and the "
               "caption candidates; its image side reads the picture at inference.",
    "vqa": "Zero-shot visual question answering: a vocabulary of candidate answers and their CLIP text embeddings.",
}
COMPONENT_TAGS = {"vqa": ("visual-question-answering",)}  # besides each method's name
# Hub metric ids (https://huggingface.co/metrics) of the metric names capdemo's evaluations report.
HUB_METRIC_IDS = {
    "Bleu_1": "bleu", "Bleu_2": "bleu", "Bleu_3": "bleu", "Bleu_4": "bleu", "bleu4": "bleu",
    "METEOR": "meteor", "ROUGE_L": "rouge", "CIDEr": "cider", "cider": "cider", "SPICE": "spice",
    "scene_accuracy": "accuracy", "attribute_accuracy": "accuracy", "top1": "accuracy",
}
# What a bundle trained in a world is for, by the manifest's "world" (the app treats a missing one as "real").
DOMAINS = {
    "real": "Natural photographs of the kind its training captions describe (see the datasets above). It has "
            "never seen an image in training: it reads a photo only through CLIP.",
}
INTENDED_USE = (
    "Research and teaching: comparing text-only captioners, and seeing why a caption came out (the CLIP patches "
    "MacCap's attention picked, every sampled candidate with its CLIP score, TOMCap's retrieved neighbours, the "
    "modality gap) in the capdemo app.")
LIMITS = (
    "Trained on captions alone: everything it knows about images comes through CLIP, across the modality gap, "
    "so a caption can be fluent and wrong.",
    "English captions in the style and vocabulary of its training corpus; it inherits that corpus's and CLIP's "
    "biases.",
    "Not for decisions about people, for surveillance, or as unreviewed alt text where accessibility depends on it.",
)


def _front_matter(bundle: Bundle, evaluation: Sequence[EvaluationResult], *, license: str | None,
                  datasets: Sequence[str]) -> str:
    from huggingface_hub import ModelCardData

    world = bundle.manifest.get("world", "real")
    tags = list(BASE_TAGS) + [tag for name in bundle.components
                              for tag in COMPONENT_TAGS.get(name, (name,) if name in registry.names() else ())]
    if world != "real":
        tags += [world, "synthetic-data"]
    known_datasets = [*datasets, *bundle.manifest.get("datasets", []),
                      *(result.dataset_id for result in evaluation if result.dataset_id)]
    metrics = sorted({HUB_METRIC_IDS[name] for result in evaluation for name in result.metrics
                      if name in HUB_METRIC_IDS})
    data = ModelCardData(library_name=LIBRARY_NAME, pipeline_tag=PIPELINE_TAG, tags=list(dict.fromkeys(tags)),
                         license=license or bundle.manifest.get("license"),
                         datasets=list(dict.fromkeys(known_datasets)) or None, metrics=metrics or None)
    return f"---\n{data.to_yaml()}\n---\n"


def _spec_text(bundle: Bundle, spec: Any) -> str:
    """A component's weight spec for people: in-bundle paths named as such, hub sources as given."""
    if isinstance(spec, str) and spec.startswith(IN_BUNDLE_PREFIX):
        return f"in this bundle (`{spec[len(IN_BUNDLE_PREFIX):]}`)"
    return f"`{spec}`"


def _role(name: str) -> str:
    if name in registry.names():
        method = registry.get(name)
        return f"{method.label}: {method.citation}."
    return COMPONENT_ROLES.get(name, "component of this bundle")


def _components_section(bundle: Bundle) -> list[str]:
    lines = ["## What is in this bundle", "",
             "| component | what it is | weights and settings |", "| --- | --- | --- |"]
    for name, config in bundle.components.items():
        facts = []
        if "model_name" in config:
            facts.append(f"model `{config['model_name']}`, pretrained {_spec_text(bundle, config.get('pretrained'))}"
                         + (f" @ `{config['revision']}`" if config.get("revision") else ""))
        if "lm" in config:
            facts.append(f"language model {_spec_text(bundle, config['lm'])}")
        if "count" in config:
            facts.append(f"{config['count']} answers")
        settings = registry.get(name).Options.settings() if name in registry.names() else []
        defaults = [f"{item.name}={config[item.name]}" for item in settings if config.get(item.name) is not None]
        if defaults:
            facts.append("inference defaults " + ", ".join(defaults))
        lines.append(f"| `{name}` | {_role(name)} | {'; '.join(facts)} |")
    lines += ["", f"Every hyperparameter needed to rebuild each component is in `{MANIFEST}`."]
    return lines


def _training_record(bundle: Bundle, component: str) -> dict[str, Any] | None:
    rel = f"{component}/{TRAINING_RECORD}"
    return bundle.json(rel) if rel in bundle.manifest.get("files", {}) else None


def _training_section(bundle: Bundle) -> list[str]:
    lines = ["## How it was trained", ""]
    training = bundle.manifest.get("training", {})
    if training.get("command"):
        lines.append(f"Built by `{training['command']}`"
                     + (f" in {training['build_seconds'] / 60:.1f} min." if "build_seconds" in training else "."))
    rows = []
    for name in bundle.components:
        record = _training_record(bundle, name)
        if record is None:
            continue
        train, history = record.get("train", {}), record.get("history", [])
        steps = history[-1]["step"] if history else train.get("max_steps")
        final = f"{history[-1]['loss']:.4f}" if history else ""
        evaluated = record.get("evaluations", [])
        scores = ", ".join(f"{k} {v:.3f}" for k, v in evaluated[-1].items() if k != "step") if evaluated else ""
        rows.append(f"| `{name}` | {record.get('captions', '')} | {steps} | {train.get('batch_size', '')} | "
                    f"{train.get('lr', '')} | {train.get('warmup_steps', '')} | {final} | {scores} |")
    if rows:
        lines += ["", "Each method was trained on captions only (no image), with AdamW, linear warmup and cosine "
                  "decay (`training/loop.py`):", "",
                  "| component | training captions | steps | batch | peak lr | warmup steps | final loss | "
                  "end-of-training evaluation |", "| --- | --- | --- | --- | --- | --- | --- | --- |", *rows,
                  "", f"The full loss history of each is in `<component>/{TRAINING_RECORD}`."]
    if training:
        lines += ["", "<details><summary>The build's recipe and records</summary>", "", "```json",
                  json.dumps(training, indent=1, ensure_ascii=False), "```", "", "</details>"]
    if len(lines) == 2:
        lines.append("This bundle records nothing about its training.")
    return lines


def _evaluation_section(evaluation: Sequence[EvaluationResult]) -> list[str]:
    lines = ["## Evaluation", ""]
    if not evaluation:
        return lines + ["No evaluation is recorded in this bundle (`evaluation.json`; `capdemo-train shapes-eval "
                        "--record` writes one)."]
    groups: dict[tuple[str, str, str], list[EvaluationResult]] = {}
    for result in evaluation:
        groups.setdefault((result.task, result.dataset, result.split), []).append(result)
    for (task, dataset, split), results in groups.items():
        names = list(dict.fromkeys(name for result in results for name in result.metrics))
        lines += [f"**{dataset}** ({split}; `{task}`)", "", "| method | " + " | ".join(names) + " |",
                  "| --- |" + " --- |" * len(names)]
        for result in results:
            values = [f"{result.metrics[name]:.4g}" if name in result.metrics else "" for name in names]
            lines.append(f"| {result.method} | " + " | ".join(values) + " |")
        commands = list(dict.fromkeys(f"`{r.command}` ({r.date})" for r in results if r.command))
        lines += ["", *(f"Measured with {command}." for command in commands), ""]
    return lines


def _shapes_domain(recipe: Mapping[str, Any]) -> str:
    world = recipe.get("world", {})
    described = ""
    if world:
        described = (f": {world['image_size']}x{world['image_size']}-pixel images of {', '.join(world['shapes'])} "
                     f"in {len(world['colours'])} colours ({', '.join(world['colours'])})")
    return (f"A synthetic world of coloured shapes{described}, their sizes, positions, counts and relations. It "
            "describes nothing else: given a photograph it still answers in the shapes vocabulary. It exists to "
            "run capdemo end to end on a laptop with a real, measurable captioner.")


def _use_section(bundle: Bundle, repo_id: str | None) -> list[str]:
    world = bundle.manifest.get("world", "real")
    if world == "shapes":
        domain = _shapes_domain(bundle.manifest.get("training", {}).get("recipe", {}))
    else:
        domain = DOMAINS.get(world, f"The `{world}` world of its training captions.")
    repo = repo_id or SERVE_PLACEHOLDER
    return ["## Domain", "", domain, "", "## Intended use", "", INTENDED_USE, "", "## Limits", "",
            *(f"- {limit}" for limit in LIMITS), "",
            "## How to serve it", "",
            "With capdemo installed (from its repository: `pip install .`), pin the commit you tested:", "",
            "```bash",
            f"python app.py --weights hf-hub:{repo}@<commit>            # the Gradio app",
            f"capdemo caption photo.jpg --weights hf-hub:{repo}@<commit> --json",
            f"CAPDEMO_WEIGHTS=hf-hub:{repo}@<commit> python app.py     # e.g. as a Space variable",
            "```", "",
            "`<commit>` is a commit id of this repository (its *Files and versions* tab; `capdemo-train push` "
            f"prints the one it made). Loading checks every file against the sha256 in `{MANIFEST}` and refuses "
            "pickled weights."]


def model_card(bundle: Bundle, *, repo_id: str | None = None, license: str | None = None,
               datasets: Sequence[str] = ()) -> str:
    """The model card of ``bundle`` as markdown with Hub metadata front matter.

    ``repo_id`` (``org/name``) goes into the serving commands; ``license`` and ``datasets`` (Hub dataset ids)
    add to what the bundle's manifest records (its ``license`` and ``datasets`` fields, when present).
    """
    evaluation = read_evaluation(bundle)
    files = bundle.manifest.get("files", {})
    total_mb = sum(entry["bytes"] for entry in files.values()) / 1e6
    title = [f"# capdemo bundle: {bundle.name}", ""]
    if bundle.manifest.get("description"):
        title += [bundle.manifest["description"], ""]
    title += [f"A capdemo weight bundle: {len(files)} files ({total_mb:.1f} MB), safetensors "
              f"weights, described and hashed by `{MANIFEST}`. Components: "
              + ", ".join(f"`{name}`" for name in bundle.components) + ".", ""]
    sections = [_components_section(bundle), _training_section(bundle), _evaluation_section(evaluation),
                _use_section(bundle, repo_id)]
    body = "\n".join(title + [line for section in sections for line in [*section, ""]])
    return _front_matter(bundle, evaluation, license=license, datasets=datasets) + "\n" + body.rstrip() + "\n"


def write_model_card(bundle: Bundle, **card_args: Any) -> Path:
    """Write :func:`model_card` as README.md beside the bundle's manifest (atomically); returns its path."""
    path = Path(bundle.path) / CARD_FILE
    with atomic_output(path) as temp:
        temp.write_text(model_card(bundle, **card_args), encoding="utf-8")
    return path
