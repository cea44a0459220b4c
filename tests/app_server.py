"""What the tests that serve the app share: which bundle to serve, a running server, test images.

The served bundle is chosen in one place (:func:`served_bundle`): the shipped
``weights/shapes`` when it is present, else the tiny random test bundle, so the
integration and browser tests run the same way before and after the real
bundle lands.
"""

from __future__ import annotations

import os
import socket
from contextlib import contextmanager
from pathlib import Path
from collections.abc import Iterator

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SHAPES_BUNDLE = ROOT / "weights" / "shapes"
ARTIFACTS = ROOT / "test-artifacts"
DATA_DIR_CANDIDATES = (os.environ.get("CAPDEMO_DATA_DIR"), ROOT / "tests" / "data", ROOT.parent / "shared" / "data")
COCO_PHOTO = "images/coco/COCO_val2014_000000391895.jpg"  # a man on a motorbike on a dirt road


def served_bundle(tiny_bundle_dir: Path) -> Path:
    """The shipped shapes bundle when it exists, else the tiny random bundle."""
    return SHAPES_BUNDLE if (SHAPES_BUNDLE / "bundle.json").is_file() else Path(tiny_bundle_dir)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextmanager
def running_app(demo) -> Iterator[str]:
    """Serve ``demo`` on a free local port for the duration of the block; yields its URL."""
    from capdemo.ui import serve

    serve(demo, server_name="127.0.0.1", server_port=free_port(), prevent_thread_lock=True, quiet=True)
    try:
        yield demo.local_url
    finally:
        demo.close()


def shapes_image(path: Path) -> Path:
    """Write one held-out shapes-world image (the world the shipped bundle was trained on) to ``path``."""
    from capdemo.bundle import Bundle
    from training.shapes.world import WorldConfig, generate_images

    manifest = Bundle.load(SHAPES_BUNDLE).manifest if (SHAPES_BUNDLE / "bundle.json").is_file() else {}
    recorded = manifest.get("training", {}).get("recipe", {}).get("world")
    config = WorldConfig.from_dict(recorded) if recorded else WorldConfig()
    generate_images(1, seed=config.test_seed, config=config)[0].save(path)
    return path


def coco_photo() -> Path | None:
    """A real COCO val2014 photo from the project data, or None when no data folder is available."""
    for base in filter(None, DATA_DIR_CANDIDATES):
        if (Path(base) / COCO_PHOTO).is_file():
            return Path(base) / COCO_PHOTO
    return None


def corrupt_png(path: Path) -> Path:
    """A file named .png that holds a valid PNG signature followed by garbage."""
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + np.random.default_rng(0).bytes(256))
    return path
