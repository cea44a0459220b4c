"""Issue #15's build budget: the shapes build with its stages one after another against side by side (``--jobs 2``).

Both builds start from nothing in fresh work dirs and run the shipped recipe's models at their full sizes for a
fraction of their training (the CLIP's pairs and the LM's and each method's steps), so every step costs what it
costs in the shipped build and keeps as many cores busy. They run one after the other in this process (the
side-by-side build's stages in its own workers), with the build's torch threads; the JSON gives both wall times,
their ratio, each build's stage seconds, and whether the two made the same bytes in every weight file.
A full build's own time is in its manifest (``bundle.json``: ``training.build_seconds``).
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks import common

NAME = "shapes_build"
FRACTION = {"full": 0.1, "quick": 0.03}  # of the shipped recipe's training; tiny runs the smoke recipe shorter


def recipe_for(settings: common.Settings):
    """The shipped recipe scaled to ``FRACTION`` of its training (the smoke recipe, shorter, when tiny)."""
    from training.shapes.build import ShapesRecipe

    if settings.tiny:
        recipe, fraction = ShapesRecipe.smoke(), 0.25
    else:
        recipe, fraction = ShapesRecipe.full(), FRACTION[settings.mode]
    clip = recipe.clip
    pairs = max(clip.train.batch_size, round(clip.pairs * fraction / clip.family_size) * clip.family_size)
    steps = {name: max(2, round(getattr(recipe, name) * fraction))
             for name in ("lm_steps", "maccap_steps", "tomcap_steps", "capdec_steps")}
    return recipe.replace(clip=clip.replace(pairs=pairs), **steps)


def run(*, quick: bool = False, tiny: bool = False, device: str = "cpu", dtype: str = "fp32") -> dict[str, Any]:
    from capdemo.bundle import Bundle
    from training.kernels import pin_cpu_kernels
    from training.shapes.build import build, built_files

    pin_cpu_kernels()  # as `python -m training shapes` does, before the first tensor operation
    started = time.perf_counter()
    settings = common.Settings(quick=quick, tiny=tiny, device=device, dtype=dtype)
    if settings.device != "cpu":
        raise common.BenchmarkError("shapes_build measures the CPU build (the recipe trains on the CPU)")
    recipe = recipe_for(settings)
    builds: dict[str, dict[str, Any]] = {}
    files = {}
    with tempfile.TemporaryDirectory(prefix="capdemo-bench-build-") as scratch:
        for name, jobs in (("one_after_another", 1), ("side_by_side", 2)):
            begin = time.perf_counter()
            bundle = build(recipe, Path(scratch) / name / "bundle", Path(scratch) / name / "work", jobs=jobs)
            seconds = time.perf_counter() - begin
            stages = Bundle.load(bundle).manifest["training"]["stage_seconds"]
            builds[name] = {"jobs": jobs, "wall_s": round(seconds, 1),
                            "stage_wall_s": {stage: times["wall_s"] for stage, times in stages.items()}}
            files[name] = built_files(bundle)
    serial, parallel = files["one_after_another"], files["side_by_side"]
    figures = {
        "recipe": "smoke" if tiny else f"shipped, {FRACTION[settings.mode]:g} of its training",
        "steps": {"clip_pairs": recipe.clip.pairs, "lm": recipe.lm_steps, "maccap": recipe.maccap_steps,
                  "tomcap": recipe.tomcap_steps, "capdec": recipe.capdec_steps},
        **builds,
        "speedup": round(builds["one_after_another"]["wall_s"] / builds["side_by_side"]["wall_s"], 3),
        "files_compared": len(serial),
        "same_bytes": serial == parallel,
    }
    return common.envelope(NAME, settings, figures, started=started)


def summary(result: dict[str, Any]) -> str:
    return (f"{result['recipe']}: one after another {result['one_after_another']['wall_s']:.0f} s, side by side "
            f"{result['side_by_side']['wall_s']:.0f} s ({result['speedup']:.2f}x); {result['files_compared']} files "
            f"{'the same' if result['same_bytes'] else 'DIFFERENT'}")


def main(argv: list[str] | None = None) -> int:
    return common.benchmark_main(NAME, run, summary, description=__doc__.split("\n\n")[0], argv=argv)


if __name__ == "__main__":
    raise SystemExit(main())
