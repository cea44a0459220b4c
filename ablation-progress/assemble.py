"""Temporary (removed once it has run): assemble weights/shapes/ablation.json for the seed-1-CLIP bundle.

Run from the repository root with PYTHONPATH=. once every run's output is in ``ablation-progress/out`` (one
``shapes-ablate --json`` report per row, steps and training seed, as ``abl.sh`` writes them):

    python ablation-progress/assemble.py [date]

It aggregates the runs over seeds with shapes-ablate's own ``over_seeds`` (no work dir needed), writes
``ablation.json`` into the bundle (BundleWriter.extending), replaces the README's table lines and writes the card.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from capdemo.bundle import Bundle, BundleWriter
from training.model_card import write_model_card
from training.shapes.ablate import VARIANTS, full_length_lines, markdown_table, over_seeds

ROOT = Path(__file__).resolve().parents[1]
WEIGHTS = ROOT / "weights" / "shapes"
OUT = Path(__file__).resolve().parent / "out"
MACCAP_FULL = ("maccap-multi-no-noise", "maccap-multi-noise")
TOMCAP_FULL = ("gap-none", "noise-scale-4")
DATE = sys.argv[1] if len(sys.argv) > 1 else "2026-12-05"


def row(steps: int, name: str, seeds: tuple[int, ...]) -> dict:
    """One row over its training seeds, from the per-run reports (a missing run stops the assembly, naming it)."""
    runs = {}
    for seed in seeds:
        report = OUT / f"out-{steps}-{seed}-{name}.json"
        if not report.is_file() or not report.stat().st_size:
            raise SystemExit(f"missing run: {report.name}")
        runs[seed] = json.loads(report.read_text())["rows"][name]["seeds"][str(seed)]
    return over_seeds(runs)


def main() -> None:
    rows = {v.name: row(500, v.name, (0, 1, 2) if v.trained else (0,)) for v in VARIANTS}
    maccap = {"rows": {name: row(1500, name, (0, 1, 2)) for name in MACCAP_FULL}}
    tomcap = {"rows": {name: row(2400, name, (0, 1, 2)) for name in TOMCAP_FULL}}
    ablation = {
        "what": "shapes-ablate on the shipped bundle's build (world v2; the tiny CLIP drawn from seed 1 and trained 6 "
                "epochs with image views 0.25 at inverse temperature 200; the LM pretrained with answer weight 20 "
                "at lr 1e-3; TOMCap's recipe noise 4 x sigma_I): every trained row retrained for 500 steps per "
                "training seed (TOMCap decoded in beam order, MacCap at S = 20 with CLIP rerank); MacCap's inference "
                "rows on the shipped MacCap; 500 held-out scenes, world seed 1234; std over training seeds. "
                "full_length: MacCap with and without its noise at the build's 1500 steps; tomcap_full_length: "
                "TOMCap without gap handling and with the recipe's (mean+std, noise 4 x sigma_I) at its 2400 steps, "
                "three training seeds each. The ablation of the bundle shipped before it (the same recipe on the "
                "CLIP drawn from seed 0) is docs/shapes-world-v2-seed0-clip-ablation.json.",
        "world": "v2",
        "commands": [
            "OMP_NUM_THREADS=1 python -m training shapes-ablate --work-dir <build> --weights weights/shapes --steps "
            "500 --n 500 --train-seeds S --only ROW --json, once per row and seed, two processes side by side. "
            "<build> is the work dir of `python -m training shapes --fresh` on this recipe, whose weight, "
            "datastore, statistics, answer-embedding, example and tokenizer files have the shipped bundle's sha256",
            "the same with --steps 1500 --only maccap-multi-no-noise maccap-multi-noise and with --steps 2400 --only "
            "gap-none noise-scale-4, for S in 0 1 2; the recipe's rows' seed 0 (maccap-multi-noise, noise-scale-4) "
            "is the build's own MacCap and TOMCap (its run dir copied to the row's, so the command only exports its "
            "final checkpoint), scored through the ablation",
            "each row's mean and std over its seeds: shapes-ablate's over_seeds on the per-run reports (what "
            "--train-seeds 0 1 2 prints from the cache)",
        ],
        "date": DATE, "n": 500, "seed": 1234, "tomcap_steps": 500, "maccap_steps": 500, "capdec_steps": 500,
        "train_seeds": [0, 1, 2], "rows": rows,
        "full_length": {"maccap_steps": 1500, "train_seeds": [0, 1, 2], "rows": maccap["rows"],
                        "compare_with": "maccap-multi-noise is the recipe's MacCap; its seed 0 is the shipped one"},
        "tomcap_full_length": {"tomcap_steps": 2400, "train_seeds": [0, 1, 2], "rows": tomcap["rows"],
                               "compare_with": "noise-scale-4 is the recipe's TOMCap; its seed 0 is the shipped one"},
    }
    lines = (markdown_table(rows).splitlines() + full_length_lines(ablation["full_length"])
             + full_length_lines(ablation["tomcap_full_length"]))
    readme = ROOT / "README.md"
    text = readme.read_text()
    start, end = text.index("### Ablations"), text.index("### History")
    section = text[start:end].splitlines(keepends=True)
    first = next(i for i, line in enumerate(section) if line.startswith("| variant |"))
    last = max(i for i, line in enumerate(section) if line.startswith("| "))
    section[first:last + 1] = [line + "\n" for line in lines]
    readme.write_text(text[:start] + "".join(section) + text[end:])
    writer = BundleWriter.extending(WEIGHTS)
    writer.add_json("ablation.json", ablation)
    writer.finish()
    write_model_card(Bundle.load(WEIGHTS))
    print(json.dumps({name: round(row["scene_accuracy"], 3) for name, row in rows.items()}))


if __name__ == "__main__":
    main()
