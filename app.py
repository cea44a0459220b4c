"""capdemo's Gradio app: ``python app.py [--weights DIR|hf-hub:org/name@rev] [--host H] [--port P] [--photos DIR]``.

Thin on purpose: parse arguments, load the bundle once, build the UI from ``capdemo.ui``, launch.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import capdemo  # noqa: F401  (the torchvision shim, before any model library)

DEFAULT_WEIGHTS = os.environ.get("CAPDEMO_WEIGHTS") or str(Path(__file__).resolve().parent / "weights" / "shapes")
PHOTO_SUFFIXES = (".jpg", ".jpeg", ".png")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="capdemo: text-only image captioning you can see into")
    parser.add_argument("--weights", default=DEFAULT_WEIGHTS,
                        help="bundle folder or hf-hub:org/name@revision (env CAPDEMO_WEIGHTS; default weights/shapes)")
    parser.add_argument("--host", default=os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"), help="interface to bind")
    parser.add_argument("--port", type=int, default=int(os.environ.get("GRADIO_SERVER_PORT", "7860")), help="port")
    parser.add_argument("--device", default=None, help="torch device (default: cuda when available, else cpu)")
    parser.add_argument("--photos", default=os.environ.get("CAPDEMO_PHOTOS"),
                        help="folder of extra example photos, shown for a real-world bundle (env CAPDEMO_PHOTOS; "
                             "e.g. ../shared/data/images/coco)")
    return parser.parse_args(argv)


def photo_files(folder: str | None) -> list[Path]:
    """The images directly in ``folder``, sorted (none when no folder is given)."""
    if not folder:
        return []
    return sorted(path for path in Path(folder).iterdir() if path.suffix.lower() in PHOTO_SUFFIXES)


def main(argv: list[str] | None = None) -> None:
    from capdemo.ui import build_app, serve

    from transformers.utils import logging as transformers_logging

    args = parse_args(argv)
    transformers_logging.disable_progress_bar()  # "Loading weights" bars on every model load: noise in a server log
    try:
        demo = build_app(args.weights, device=args.device, photos=photo_files(args.photos))
    except (ValueError, OSError) as err:  # a missing or tampered bundle, a missing folder: one line, no traceback
        raise SystemExit(f"error: {err}") from None
    serve(demo, server_name=args.host, server_port=args.port)


if __name__ == "__main__":
    main()
