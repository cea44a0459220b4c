"""``capdemo caption|vqa|info`` (or ``python -m capdemo``): the library from the command line, JSON on request.

One bad image never stops a batch: it gets a one-line error on stderr, the others
are captioned, and the exit code is 1 so scripts notice (``vqa``'s one image likewise); a bad
setting or bundle is exit code 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from capdemo import methods as registry
from capdemo.inputs import positive_int
from capdemo.precision import PRECISIONS
from capdemo.methods.flags import add_setting_arguments, settings_from_arguments


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="capdemo", description=__doc__.splitlines()[0] + " (also: python -m capdemo)")
    sub = parser.add_subparsers(dest="command", required=True)

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--weights", default=None, help="bundle folder or hf-hub:org/name@revision (default: "
                                                       "$CAPDEMO_WEIGHTS, else the shipped weights/shapes)")
        p.add_argument("--device", default=None, help="torch device (default: cuda when available, else cpu)")
        p.add_argument("--precision", choices=PRECISIONS, default=None,
                       help="serving arithmetic (default: the bundle's recommendation on a CPU, else fp32)")
        p.add_argument("--json", action="store_true", help="print one JSON object per image instead of text")

    formatter = argparse.ArgumentDefaultsHelpFormatter
    cap = sub.add_parser("caption", help="caption images", formatter_class=formatter)
    cap.add_argument("images", nargs="+", type=Path, help="image files")
    cap.add_argument("--method", choices=registry.names(), default=registry.names()[0], help="captioning method")
    cap.add_argument("--batch-size", type=positive_int, default=16, help="images per forward pass")
    common(cap)
    add_setting_arguments(cap)

    vqa = sub.add_parser("vqa", help="answer a question about an image", formatter_class=formatter)
    vqa.add_argument("image", type=Path, help="image file")
    vqa.add_argument("--question", required=True, help="the question")
    vqa.add_argument("--top-k", type=int, default=10, help="candidate answers to list")
    common(vqa)

    info = sub.add_parser("info", help="describe a bundle", formatter_class=formatter)
    common(info)
    return parser


def _error(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)


def _image_error(path: Path, err: Exception) -> None:
    """The one line an image that cannot be read gets (an ImageLoadError names its file already)."""
    from capdemo.images import ImageLoadError

    _error(str(err) if isinstance(err, ImageLoadError) else f"{path}: {getattr(err, 'strerror', None) or err}")


def _caption(args: argparse.Namespace, captioner) -> int:
    from capdemo.images import ImageLoadError, load_image

    options = captioner.options(args.method, **settings_from_arguments(args, args.method))
    loaded, failures = [], 0
    for path in args.images:
        try:
            loaded.append((path, load_image(path, name=path.name)))
        except (ImageLoadError, OSError) as err:
            _image_error(path, err)
            failures += 1
    for start in range(0, len(loaded), args.batch_size):
        chunk = loaded[start: start + args.batch_size]
        results = captioner.caption([image for _, image in chunk], args.method, options)
        for (path, _), result in zip(chunk, results):
            if args.json:
                print(json.dumps({"image": str(path), **result.to_json()}, ensure_ascii=False), flush=True)
            else:
                print(f"{path}: {result.caption}", flush=True)
    return 1 if failures else 0


def _vqa(args: argparse.Namespace, captioner) -> int:
    from capdemo.images import ImageLoadError, load_image

    try:
        image = load_image(args.image, name=args.image.name)
    except (ImageLoadError, OSError) as err:  # a bad image, as caption reports one: exit code 1
        _image_error(args.image, err)
        return 1
    result = captioner.answer(image, args.question, top_k=args.top_k)
    if args.json:
        print(json.dumps({"image": str(args.image), "question": args.question, **result.to_json()}, ensure_ascii=False))
    else:
        print(f"{result.answer}  (generated: {result.generated!r}; caption: {result.caption!r})")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from capdemo.images import ImageLoadError
    from capdemo.pipeline import Captioner
    from capdemo.weights import default_bundle

    try:
        if args.command == "caption":
            settings_from_arguments(args, args.method)  # a flag of another method: refused before loading anything
        captioner = Captioner.from_bundle(args.weights or default_bundle(), device=args.device,
                                          precision=args.precision)
        if args.command == "info":
            print(json.dumps(captioner.info(), indent=2 if not args.json else None))
            return 0
        return _caption(args, captioner) if args.command == "caption" else _vqa(args, captioner)
    except (ValueError, ImageLoadError, OSError, RuntimeError) as err:
        _error(str(err).splitlines()[0] if str(err) else type(err).__name__)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
