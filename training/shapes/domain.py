"""Record a shapes bundle's domain in its manifest: ``python -m training.shapes.domain BUNDLE [--n 100]``.

Captions ``--n`` held-out images of the bundle's own world (its recipe's world config, test seed) with every
method and writes the manifest's top-level ``domain`` field (:mod:`capdemo.domain`): the summary line the app
shows under its title and the in-domain CLIP-score range it warns against. Top-level manifest fields are not
hashed, so the bundle's files still verify.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from capdemo.domain import DOMAIN_KEY, measure_domain
from capdemo.fileio import atomic_output

SHAPES_SUMMARY = ("This bundle knows the shapes world: synthetic coloured circles, squares and triangles on small "
                  "images. Photos are outside it, and its captions of them are not meaningful.")


def main(argv: list[str] | None = None) -> None:
    from capdemo.pipeline import Captioner
    from training.shapes.world import WorldConfig, generate_images

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("bundle", help="a shapes bundle folder (weights/shapes)")
    parser.add_argument("--n", type=int, default=100, help="held-out images to measure (default 100)")
    parser.add_argument("--summary", default=SHAPES_SUMMARY, help="the domain line the app shows")
    args = parser.parse_args(argv)
    captioner = Captioner.from_bundle(args.bundle, device="cpu")
    world = WorldConfig.from_dict(captioner.bundle.manifest["training"]["recipe"]["world"])
    domain = measure_domain(captioner, generate_images(args.n, seed=world.test_seed, config=world), args.summary)
    path = Path(args.bundle) / "bundle.json"
    manifest = json.loads(path.read_text())
    manifest[DOMAIN_KEY] = domain.to_dict()
    with atomic_output(path) as tmp:
        tmp.write_text(json.dumps(manifest, indent=2) + "\n")
    print(json.dumps(domain.to_dict(), indent=1))


if __name__ == "__main__":
    main()
