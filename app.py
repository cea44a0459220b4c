"""capdemo's Gradio app: ``python app.py [--weights DIR|hf-hub:org/name@rev] [--host H] [--port P] [--photos DIR]``.

Thin on purpose: parse arguments, load the bundle once, build the UI from ``capdemo.ui``, launch.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import capdemo  # noqa: F401  (the torchvision shim, before any model library)
from capdemo.precision import PRECISIONS
from capdemo.weights import WeightsUnavailableError, default_bundle

PHOTO_SUFFIXES = (".jpg", ".jpeg", ".png")
DEFAULT_PORT = 7860
# Where the port comes from, first set wins: Gradio's own variable (a Hugging Face Space sets it, with
# GRADIO_SERVER_NAME=0.0.0.0), then PORT (what most other hosts set), then DEFAULT_PORT.
PORT_VARIABLES = ("GRADIO_SERVER_PORT", "PORT")


def port_from_environment() -> int:
    """The port named by the first of PORT_VARIABLES that is set, else DEFAULT_PORT."""
    for name in PORT_VARIABLES:
        if value := os.environ.get(name, "").strip():
            if not value.isdigit() or not 0 < int(value) < 65536:
                raise SystemExit(f"error: {name}={value!r} is not a port number")
            return int(value)
    return DEFAULT_PORT


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="capdemo: text-only image captioning you can see into")
    parser.add_argument("--weights", default=None,
                        help="bundle folder or hf-hub:org/name@revision (env CAPDEMO_WEIGHTS; default weights/shapes)")
    parser.add_argument("--host", default=os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"),
                        help="interface to bind (env GRADIO_SERVER_NAME; a Space sets 0.0.0.0)")
    parser.add_argument("--port", type=int, default=None,
                        help=f"port (env {' or '.join(PORT_VARIABLES)}; default {DEFAULT_PORT})")
    parser.add_argument("--device", default=None, help="torch device (default: cuda when available, else cpu)")
    parser.add_argument("--precision", choices=PRECISIONS, default=os.environ.get("CAPDEMO_PRECISION"),
                        help="serving arithmetic (env CAPDEMO_PRECISION; default: the bundle's recommendation on a "
                             "CPU, else fp32)")
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
    port = args.port if args.port is not None else port_from_environment()
    try:
        weights = args.weights or default_bundle()
        demo = build_app(weights, device=args.device, precision=args.precision, photos=photo_files(args.photos))
    except (ValueError, OSError, WeightsUnavailableError) as err:  # a missing or tampered bundle: one line
        raise SystemExit(f"error: {err}") from None
    serve(demo, server_name=args.host, server_port=port)


if __name__ == "__main__":
    main()
