"""``python -m training shapes-domain BUNDLE``: record a shapes bundle's domain in its manifest.

Captions ``--n`` held-out images of the bundle's own world (its recipe's world config, test seed) with every
method and writes the manifest's top-level ``domain`` field (:mod:`capdemo.domain`): the summary line the app
shows under its title and the in-domain CLIP-score range it warns against. Top-level manifest fields are not
hashed, so the bundle's files still verify.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from capdemo.bundle import update_info
from capdemo.domain import DOMAIN_KEY, measure_domain

SHAPES_SUMMARY = ("This bundle knows the shapes world: synthetic coloured circles, squares and triangles on small "
                  "images. Photos are outside it, and its captions of them are not meaningful.")


def record_domain(bundle: str | Path, *, n: int = 100, summary: str = SHAPES_SUMMARY) -> dict:
    """Measure the domain of the shapes bundle at ``bundle`` on ``n`` held-out images of its recorded world
    (fp32: the bundle as trained) and write it into the manifest; returns what was written."""
    from capdemo.pipeline import Captioner
    from training.shapes.world import WorldConfig, generate_images

    captioner = Captioner.from_bundle(bundle, device="cpu", precision="fp32")
    world = WorldConfig.from_dict(captioner.bundle.manifest["training"]["recipe"]["world"])
    domain = measure_domain(captioner, generate_images(n, seed=world.test_seed, config=world), summary).to_dict()
    update_info(bundle, **{DOMAIN_KEY: domain})
    return domain


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training shapes-domain", description=__doc__.split("\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("bundle", help="a shapes bundle folder (weights/shapes)")
    parser.add_argument("--n", type=int, default=100, help="held-out images to measure")
    parser.add_argument("--summary", default=SHAPES_SUMMARY, help="the domain line the app shows")
    args = parser.parse_args(argv)
    print(json.dumps(record_domain(args.bundle, n=args.n, summary=args.summary), indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
