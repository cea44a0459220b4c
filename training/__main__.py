"""``python -m training <subcommand> ...``: every training-side command behind one entry point.

Each subcommand lives in its own module with a ``main(argv) -> int``; this file
maps names to modules, importing the chosen one lazily so ``--help`` is fast, and
pins the CPU kernels first (:mod:`training.kernels`) so weights do not depend on the CPU.
"""

from __future__ import annotations

import importlib
import os
import sys

import capdemo  # noqa: F401  (the torchvision shim, before any model library)
from training.kernels import pin_cpu_kernels

SUBCOMMANDS = {
    "embed": ("training.embed", "cache CLIP text embeddings of a caption corpus (sharded, resumable)"),
    "index": ("training.index", "build a caption datastore (faiss) for retrieval"),
    "gapstats": ("training.gapstats", "compute modality-gap statistics (image vs text embeddings)"),
    "maccap": ("training.maccap", "train MacCap text-only and write a bundle"),
    "tomcap": ("training.tomcap", "train TOMCap text-only and write a bundle"),
    "capdec": ("training.capdec", "train CapDec text-only and write a bundle"),
    "evaluate": ("training.evaluate", "caption metrics (BLEU, METEOR, ROUGE-L, CIDEr) and VQA accuracy"),
    "caption-split": ("training.caption_split", "caption a Karpathy split with a bundle and score it (paper tables)"),
    "vqa-eval": ("training.vqa_eval", "zero-shot VQAv2 top-1/5/10 on a seeded question sample (MacCap Table 4)"),
    "reproduce": ("training.reproduce", "run a recipe end to end: data files -> trained bundle -> the paper's table"),
    "shapes": ("training.shapes.build", "rebuild the shapes-world bundle (weights/shapes) from scratch"),
    "shapes-eval": ("training.shapes.evaluate", "score a bundle on freshly generated held-out shapes scenes"),
    "shapes-domain": ("training.shapes.domain", "record a shapes bundle's domain (summary, in-domain CLIP scores)"),
    "shapes-clip": ("training.shapes.clip_levers", "train the shapes CLIP alone with changed settings; its gap"),
    "shapes-lm": ("training.shapes.lm_levers", "pretrain the shapes LM alone with changed settings; its VQA"),
    "shapes-ablate": ("training.shapes.ablate", "gap handling, retrieval and sampling ablations in the shapes world"),
    "push": ("training.push", "publish a verified bundle with its generated model card on the Hugging Face Hub"),
}


def usage() -> str:
    width = max(map(len, SUBCOMMANDS))
    lines = ["usage: python -m training <subcommand> [options]", "", "subcommands:"]
    lines += [f"  {name:<{width}}  {help_text}" for name, (_, help_text) in SUBCOMMANDS.items()]
    lines += ["", "Run `python -m training <subcommand> --help` for its options."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in SUBCOMMANDS:
        print(f"error: unknown subcommand {name!r}\n\n{usage()}", file=sys.stderr)
        return 2
    pin_cpu_kernels()  # before any tensor operation: trained weights must not depend on the CPU
    module = importlib.import_module(SUBCOMMANDS[name][0])
    try:
        return int(module.main(rest) or 0)
    except (ValueError, OSError, RuntimeError) as err:  # input, file and weight errors: one line, no traceback
        if os.environ.get("CAPDEMO_DEBUG"):
            raise
        message = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        print(f"error: {message} (set CAPDEMO_DEBUG=1 for the traceback)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
