"""capdemo's Gradio app: ``python app.py [--weights DIR|hf-hub:org/name@rev] [--host H] [--port P]``.

Thin on purpose: parse arguments, load the bundle once, build the UI from ``capdemo.ui``, launch.
"""

from __future__ import annotations

import argparse
import os

import capdemo  # noqa: F401  (the torchvision shim, before any model library)

DEFAULT_WEIGHTS = os.environ.get("CAPDEMO_WEIGHTS", os.path.join(os.path.dirname(os.path.abspath(__file__)), "weights", "shapes"))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="capdemo: text-only image captioning you can see into")
    parser.add_argument("--weights", default=DEFAULT_WEIGHTS,
                        help="bundle folder or hf-hub:org/name@revision (env CAPDEMO_WEIGHTS; default weights/shapes)")
    parser.add_argument("--host", default=os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"), help="interface to bind")
    parser.add_argument("--port", type=int, default=int(os.environ.get("GRADIO_SERVER_PORT", "7860")), help="port")
    parser.add_argument("--device", default=None, help="torch device (default: cuda when available, else cpu)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    from capdemo.ui import build_app

    args = parse_args(argv)
    demo = build_app(args.weights, device=args.device)
    demo.launch(server_name=args.host, server_port=args.port)


if __name__ == "__main__":
    main()
