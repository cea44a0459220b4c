"""``python -m training caption-split``: caption a Karpathy test split with a bundle and score it, in one command.

    python -m training caption-split --weights weights/maccap-coco --method maccap \
        --split dataset_coco.json --images COCO/ --subset test --out results/maccap-coco-test.jsonl

``--split`` is a Karpathy split file in either layout: Karpathy's original
``dataset_coco.json`` / ``dataset_flickr30k.json`` or a MAGIC-format list
(``mscoco_test.json``); ``--subset`` names the split(s) to caption.

This is how the papers' tables are reproduced (MacCap: COCO and Flickr30k
Karpathy test splits, 5000 / 1000 images; TOMCap: the same with its bundle):
every image of the subset is captioned by the app's own code path
(:class:`capdemo.pipeline.Captioner`, the bundle's default settings unless
overridden), the captions are appended to ``--out`` as capdemo JSON lines
(``{image_id, image, caption}``) batch by batch, and the finished file is
scored by :func:`training.evaluate.evaluate_captions` against the split's
references. A killed run continues where it stopped: images already in
``--out`` are not captioned again (a line cut short by the kill is dropped), and
``--out.run.json`` records the bundle, method and options, so a resume with
other ones is refused instead of mixing two runs in one score.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from collections.abc import Sequence

import capdemo  # noqa: F401  (the torchvision shim, before any model library)
from capdemo.bundle import MANIFEST, sha256_of
from capdemo.config import differing_keys
from capdemo.images import ImageLoadError, load_image
from capdemo import methods as registry
from capdemo.inputs import positive_int
from capdemo.methods.base import MethodOptions
from capdemo.methods.flags import add_setting_arguments, settings_from_arguments
from capdemo.fileio import atomic_output
from training.datasets import (DataFormatError, ImageId, SplitImage, load_karpathy_split, parse_split_names,
                               references_from_split, select_splits)
from training.evaluate import (CAPTION_METRICS, EvaluationError, MetricUnavailableError, evaluate_captions,
                               load_predictions)


def select_subset(items: Sequence[SplitImage], subset: str | None, limit: int | None) -> list[SplitImage]:
    """The split's images of ``subset`` ("test", "val+test", ...; None: all), the first ``limit`` of them."""
    chosen = select_splits(items, None if subset is None else parse_split_names(subset))
    return chosen[:limit] if limit else chosen


def find_images(items: Sequence[SplitImage], root: Path) -> dict[str, Path]:
    """``image_name -> file`` under ``root``: in the folder the split names (COCO's val2014/), directly, or in any
    sub-folder."""
    found = {}
    for item in items:
        for candidate in (root / item.folder / item.image_name, root / item.image_name):
            if candidate.is_file():
                found[item.image_name] = candidate
                break
    if len(found) < len(items):
        wanted = {item.image_name for item in items} - set(found)
        for path in root.rglob("*"):
            if path.name in wanted:
                found[path.name] = path
    missing = [item.image_name for item in items if item.image_name not in found]
    if missing:
        raise FileNotFoundError(f"{len(missing)} split images are not under {root} (first: {missing[0]})")
    return found


def done_ids(out: Path, *, key: str = "image_id") -> set[ImageId]:
    """The ``key`` values (image ids) of the records already in ``out``; a last line cut short by a kill is
    removed from the file."""
    if not out.is_file():
        return set()
    lines = out.read_text().splitlines(keepends=True)
    done, keep = set(), []
    for line in lines:
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            break  # only the last line can be partial (lines are flushed one batch at a time)
        if not line.endswith("\n"):
            break
        done.add(record[key])
        keep.append(line)
    if len(keep) < len(lines):
        with atomic_output(out) as tmp:
            tmp.write_text("".join(keep))
    return done


def run_record_path(out: Path) -> Path:
    return out.with_name(out.name + ".run.json")


def check_run_record(out: Path, record: dict) -> None:
    """Resume only the run that wrote ``out``: its bundle (manifest hash), method and options are kept beside
    it, and a run that differs is refused, naming what changed, rather than mixing two runs' captions."""
    path = run_record_path(out)
    if out.is_file() and path.is_file():
        saved = json.loads(path.read_text())
        changed = differing_keys(saved, record)
        if changed:
            raise ValueError(f"{out} holds results of another run ({', '.join(changed)} differ); "
                             "use another --out, or delete it to start over")
    with atomic_output(path) as tmp:
        tmp.write_text(json.dumps(record, indent=1) + "\n")


def caption_split(captioner, items: Sequence[SplitImage], files: dict[str, Path], out: Path, *, method: str,
                  options: MethodOptions, batch_size: int) -> int:
    """Caption every image of ``items`` not yet in ``out``, appending JSON lines; returns how many were captioned."""
    done = done_ids(out)
    todo = [item for item in items if item.image_id not in done]
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("a") as sink:
        for start in range(0, len(todo), batch_size):
            batch = todo[start: start + batch_size]
            images = [load_image(files[item.image_name]) for item in batch]
            results = captioner.caption(images, method, options)
            sink.write("".join(json.dumps({"image_id": item.image_id, "image": item.image_name,
                                           "caption": result.caption}) + "\n"
                               for item, result in zip(batch, results)))
            sink.flush()
            os.fsync(sink.fileno())
            print(f"captioned {len(done) + start + len(batch)}/{len(items)}", file=sys.stderr)
    return len(todo)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m training caption-split", description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--weights", required=True, help="bundle folder or hf-hub:org/name@revision")
    parser.add_argument("--method", choices=registry.names(), required=True, help="captioning method")
    parser.add_argument("--split", required=True, type=Path,
                        help="Karpathy split file: dataset_coco.json / dataset_flickr30k.json or a MAGIC-format list")
    parser.add_argument("--images", required=True, type=Path, help="folder holding the split's image files")
    parser.add_argument("--subset", default="test",
                        help="which split(s) to caption, joined by '+' ('all': every image of the file)")
    parser.add_argument("--out", required=True, type=Path, help="JSON lines of captions (appended; resumable)")
    parser.add_argument("--limit", type=int, default=None, help="only the first N images (a quick check)")
    parser.add_argument("--batch-size", type=positive_int, default=16, help="images per captioning call")
    parser.add_argument("--metrics", nargs="+", choices=CAPTION_METRICS, default=list(CAPTION_METRICS),
                        help="caption scorers to run")
    parser.add_argument("--device", default=None, help="torch device (None: cuda when available)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    add_setting_arguments(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        settings = settings_from_arguments(args, args.method)
        items = select_subset(load_karpathy_split(args.split), None if args.subset == "all" else args.subset,
                              args.limit)
        files = find_images(items, args.images)
        from capdemo.pipeline import Captioner

        captioner = Captioner.from_bundle(args.weights, device=args.device)
        options = captioner.options(args.method, **settings)
        check_run_record(args.out, {"bundle_sha256": sha256_of(captioner.bundle.path / MANIFEST),
                                    "method": args.method, "options": options.to_dict()})
        caption_split(captioner, items, files, args.out, method=args.method, options=options,
                      batch_size=args.batch_size)
        predictions = load_predictions(args.out)
        wanted = {item.image_id for item in items}
        report = evaluate_captions({k: v for k, v in predictions.items() if k in wanted},
                                   references_from_split(items), metrics=args.metrics, spice=False)
    except (DataFormatError, FileNotFoundError, ImageLoadError, EvaluationError, MetricUnavailableError,
            ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(json.dumps({"method": args.method, "images": len(items), **report.to_json()}) if args.json
          else report.to_table())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
