"""The shapes world: seeded procedural images of coloured shapes with paraphrased captions.

It stands in for COCO where there is no network or GPU. This module samples scenes, draws them and
builds the seeded datasets. What a scene is and how captions say it (``Scene``, ``captions``,
``parse_caption``, ``scene_accuracy``, ...) live in :mod:`training.shapes.language`; they are
re-exported here, so ``training.shapes.world`` is the one import for users of the world.

All randomness comes from explicitly seeded numpy Generators: the same seed gives the same bytes.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from capdemo.config import Config, ConfigError
from training.shapes.language import (
    ATTRIBUTES,
    COLOURS,
    COUNT_WORDS,
    KINDS,
    PAIR_RELATIONS,
    POSITION_PHRASES,
    SHAPES,
    SIZES,
    Scene,
    SceneError,
    attribute_accuracy,
    captions,
    parse_caption,
    references,
    sample_caption,
    scene_accuracy,
)

# Colours are bright or saturated and far apart in RGB, so they survive downsampling and stand out
# against the dark, desaturated backgrounds. One entry per colour word, in the order of COLOURS.
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (230, 45, 45),
    "green": (40, 200, 70),
    "blue": (50, 110, 255),
    "yellow": (245, 220, 40),
    "purple": (190, 70, 235),
    "white": (240, 240, 240),
}


# Geometry, as fractions of the image side. At 56 px a small object is ~11 px across, a large one ~22 px.
_SUPERSAMPLE = 4  # draw this many times larger, then box-downsample for anti-aliased edges
_SINGLE_DIAMETER = {"small": 0.2, "large": 0.4}
_PAIR_DIAMETER = 0.3
_GROUP_DIAMETER = 0.22  # with the jitters below, objects in a 3x3 grid of cells never touch
_SIZE_JITTER = 0.1  # relative
_REACH = 1.2  # the farthest any shape reaches from its centre, in radii (a triangle's corners)
_POSITION_CENTRES = {"left": (0.25, 0.5), "right": (0.75, 0.5), "top": (0.5, 0.25),
                     "bottom": (0.5, 0.75), "centre": (0.5, 0.5)}
_POSITION_JITTER = 0.06
_PAIR_ALONG = ((0.2, 0.32), (0.68, 0.8))  # centre ranges of first/second object along the relation axis
_PAIR_ACROSS = (0.38, 0.62)  # centre range across it: the stated relation always dominates
_GROUP_JITTER = 0.03
_BACKGROUND_GREY = (15, 75)  # range of the background's grey level
_BACKGROUND_TINT = 12  # at most this far from grey per channel: dark and desaturated
_GRADIENT_SPREAD = 25  # textured backgrounds: the far end of the gradient is this far from the near end, per channel
_STRIPE_AMPLITUDE = 8  # textured backgrounds: stripes up to this many grey levels above and below the gradient
_STRIPE_CYCLES = (2.0, 7.0)  # stripes per image side
_NOISE_AMPLITUDE = 10  # per-pixel noise, uniform integers in [-10, 10] (std ~6; far cheaper than Gaussian)
# Clutter: small, dull, unmentioned things (captions leave them out, as real captions leave out the background).
# Their grey levels sit between the dark backgrounds and the bright palette, so no caption colour describes them.
_CLUTTER_GREY = (85, 150)
_CLUTTER_TINT = 15
_CLUTTER_DIAMETER = (0.05, 0.09)
_CLUTTER_SHAPES = ("circle", "square", "triangle")
# Occluders: one dull shape over the edge of one object hides part of it (at most about a quarter).
_OCCLUDER_DIAMETER = (0.4, 0.6)  # relative to the occluded object's diameter
_OCCLUDER_OFFSET = 0.45  # occluder centre's distance from the object's centre, in object diameters


BACKGROUNDS = ("plain", "textured")


@dataclass
class WorldConfig(Config):
    """What the shapes world contains, how its images look and which seed makes each split."""

    colours: tuple[str, ...] = COLOURS  # colour words in use (a subset of COLOURS)
    shapes: tuple[str, ...] = ("circle", "square", "triangle")  # shapes in use ("cross" is also available)
    image_size: int = 56  # side of the square RGB images, in pixels (56 with 8 px patches: ViT-B/32's 7x7 grid)
    kind_probs: tuple[float, float, float] = (0.4, 0.4, 0.2)  # probabilities of single, pair and group scenes
    # "plain": one dark tinted grey (world v1); "textured": a dark two-colour gradient in a random direction with
    # faint stripes, so the background differs from image to image as a photograph's does
    background: str = "textured"
    clutter: int = 3  # up to this many small dull unmentioned shapes per image (uniform 0..clutter)
    occlusion: float = 0.3  # probability that a dull occluder hides part of one object
    max_count: int = 4  # largest group (groups hold 2..max_count objects; world v1: 3)
    # Novel compositions: this fraction of the world's scenes of each kind (novel_scenes) is left out of every text
    # the captioning side learns from, the caption corpus (so TOMCap's datastore) and the LM's question-answer text,
    # as a COCO test image's scene is in no training caption. The CLIP still sees them, as a web-scale CLIP has seen
    # most things. ``shapes-eval --novel`` scores these scenes alone. 0: the corpus describes every scene.
    novel: float = 0.0
    novel_seed: int = 5  # which scenes are novel (not a data seed: nothing is drawn from it but the choice)
    train_seed: int = 0  # image-caption pairs for training the tiny CLIP
    text_seed: int = 1  # text-only caption corpus (never rendered)
    unpaired_seed: int = 2  # unpaired images (image-side statistics of the modality gap)
    test_seed: int = 3  # held-out test images

    def __post_init__(self) -> None:
        if not self.colours or not set(self.colours) <= set(COLOURS) or len(set(self.colours)) < len(self.colours):
            raise ConfigError(f"colours must be distinct names from {COLOURS}, got {self.colours}")
        if not self.shapes or not set(self.shapes) <= set(SHAPES) or len(set(self.shapes)) < len(self.shapes):
            raise ConfigError(f"shapes must be distinct names from {SHAPES}, got {self.shapes}")
        if self.image_size < 16:
            raise ConfigError(f"image_size must be at least 16 pixels, got {self.image_size}")
        probs = self.kind_probs
        if len(probs) != len(KINDS) or min(probs) < 0 or not math.isclose(sum(probs), 1.0, abs_tol=1e-6):
            raise ConfigError(f"kind_probs must be 3 non-negative numbers summing to 1, got {self.kind_probs}")
        if self.kind_probs[1] > 0 and len(self.colours) * len(self.shapes) < 2:
            raise ConfigError("pair scenes need at least two distinct objects (colours x shapes)")
        if self.background not in BACKGROUNDS:
            raise ConfigError(f"background must be one of {BACKGROUNDS}, got {self.background!r}")
        if self.clutter < 0 or not 0 <= self.occlusion <= 1:
            raise ConfigError(f"clutter must be >= 0 and occlusion a probability, got {self.clutter}, {self.occlusion}")
        if not 0 <= self.novel < 1:
            raise ConfigError(f"novel must be a fraction in [0, 1), got {self.novel}")
        if self.max_count not in COUNT_WORDS:
            raise ConfigError(f"max_count must be one of {tuple(COUNT_WORDS)}, got {self.max_count}")

    @property
    def group_counts(self) -> tuple[int, ...]:
        """The group sizes this world draws."""
        return tuple(n for n in COUNT_WORDS if n <= self.max_count)


# Sampling and rendering


def sample_scene(rng: np.random.Generator, *, config: WorldConfig | None = None) -> Scene:
    """Draw one scene: kind by ``config.kind_probs``, then every attribute uniformly."""
    config = config or WorldConfig()
    colours, shapes = config.colours, config.shapes
    kind = KINDS[int(np.searchsorted(np.cumsum(config.kind_probs), rng.random(), side="right"))]
    if kind == "pair":
        n_objects = len(colours) * len(shapes)
        first = rng.integers(n_objects)
        second = (first + 1 + rng.integers(n_objects - 1)) % n_objects  # uniform over the other objects
        return Scene("pair", colours[first // len(shapes)], shapes[first % len(shapes)],
                     relation=PAIR_RELATIONS[rng.integers(2)], colour2=colours[second // len(shapes)],
                     shape2=shapes[second % len(shapes)], count=2)
    colour, shape = colours[rng.integers(len(colours))], shapes[rng.integers(len(shapes))]
    if kind == "single":
        position = tuple(POSITION_PHRASES)[rng.integers(len(POSITION_PHRASES))]
        return Scene("single", colour, shape, size=SIZES[rng.integers(len(SIZES))], position=position)
    counts = config.group_counts
    return Scene("group", colour, shape, count=counts[rng.integers(len(counts))])


def layout(scene: Scene, rng: np.random.Generator) -> list[tuple[str, str, float, float, float]]:
    """Objects to draw as (shape, colour, centre x, centre y, diameter), in fractions of the image side."""
    scale = 1 + rng.uniform(-_SIZE_JITTER, _SIZE_JITTER)
    if scene.kind == "single":
        diameter = _SINGLE_DIAMETER[scene.size] * scale
        centre = np.add(_POSITION_CENTRES[scene.position], rng.uniform(-_POSITION_JITTER, _POSITION_JITTER, 2))
        x, y = np.clip(centre, _REACH * diameter / 2, 1 - _REACH * diameter / 2)  # stay inside the frame
        return [(scene.shape, scene.colour, float(x), float(y), diameter)]
    if scene.kind == "pair":
        along = [rng.uniform(*bounds) for bounds in _PAIR_ALONG]
        across = rng.uniform(*_PAIR_ACROSS, 2)
        centres = list(zip(along, across)) if scene.relation == "left of" else list(zip(across, along))
        objects = [(scene.shape, scene.colour), (scene.shape2, scene.colour2)]
        return [(shape, colour, float(x), float(y), _PAIR_DIAMETER * scale)
                for (shape, colour), (x, y) in zip(objects, centres)]
    cells = rng.choice(9, size=scene.count, replace=False)  # distinct cells of a 3x3 grid
    offsets = rng.uniform(-_GROUP_JITTER, _GROUP_JITTER, (scene.count, 2))
    centres = [((cell % 3 + 0.5) / 3 + dx, (cell // 3 + 0.5) / 3 + dy) for cell, (dx, dy) in zip(cells, offsets)]
    return [(scene.shape, scene.colour, float(x), float(y), _GROUP_DIAMETER * scale) for x, y in centres]


def _draw(draw: ImageDraw.ImageDraw, shape: str, rgb: tuple[int, int, int] | int, x: float, y: float,
          r: float) -> None:
    """Draw one filled shape of radius ``r`` (pixels) centred on (x, y) in ``rgb`` (a grey level on a mask); areas
    are roughly equal."""
    if shape == "circle":
        draw.ellipse((x - r, y - r, x + r, y + r), fill=rgb)
    elif shape == "square":
        half = 0.95 * r
        draw.rectangle((x - half, y - half, x + half, y + half), fill=rgb)
    elif shape == "triangle":  # equilateral, pointing up, centred on its centroid
        corners = (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)
        draw.polygon([(x + _REACH * r * math.cos(a), y + _REACH * r * math.sin(a)) for a in corners], fill=rgb)
    elif shape == "cross":
        arm = r / 3
        draw.rectangle((x - r, y - arm, x + r, y + arm), fill=rgb)
        draw.rectangle((x - arm, y - r, x + arm, y + r), fill=rgb)
    else:
        raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")


def _background(rng: np.random.Generator, side: int, style: str) -> tuple[np.ndarray, float]:
    """(side, side, 3) float background: a dark tinted grey, or (textured) a gradient with faint stripes; and its
    grey level."""
    grey = rng.uniform(*_BACKGROUND_GREY)
    near = grey + rng.uniform(-_BACKGROUND_TINT, _BACKGROUND_TINT, 3)  # (3,)
    if style == "plain":
        return np.broadcast_to(near, (side, side, 3)).astype(np.float32), float(grey)
    far = near + rng.uniform(-_GRADIENT_SPREAD, _GRADIENT_SPREAD, 3)  # (3,)
    angle, stripe_angle, phase = rng.uniform(0, 2 * math.pi, 3)
    amplitude, cycles = rng.uniform(0, _STRIPE_AMPLITUDE), rng.uniform(*_STRIPE_CYCLES)
    coords = (np.arange(side, dtype=np.float32) + 0.5) / side
    x, y = coords[None, :], coords[:, None]  # broadcast to (side, side)
    along = x * math.cos(angle) + y * math.sin(angle)
    along = (along - along.min()) / max(float(np.ptp(along)), 1e-6)  # (side, side) in [0, 1]
    stripes = amplitude * np.sin(2 * math.pi * cycles * (x * math.cos(stripe_angle) + y * math.sin(stripe_angle))
                                 + phase)  # (side, side)
    return (near + along[..., None] * (far - near) + stripes[..., None]).astype(np.float32), float(grey)


def _dull_colour(rng: np.random.Generator) -> tuple[int, int, int]:
    """A clutter colour: a mid grey, slightly tinted (never a caption colour, never the dark background)."""
    return tuple(int(c) for c in rng.uniform(*_CLUTTER_GREY) + rng.uniform(-_CLUTTER_TINT, _CLUTTER_TINT, 3))


def render(scene: Scene, rng: np.random.Generator, *, config: WorldConfig | None = None) -> Image.Image:
    """Draw ``scene`` as an RGB image; ``rng`` picks the background, clutter, occluder, placement and pixel noise.

    Drawing order: background, clutter (behind everything), the scene's objects, then the occluder, if any,
    over the edge of one object.
    """
    return _render(scene, rng, config or WorldConfig(), with_coverage=False)[0]


@dataclass(frozen=True)
class Unmentioned:
    """What an image shows and the world's captions leave out. Web alt-text sometimes says such things, so a CLIP
    trained on it has to keep them in its image embedding (``TinyClipConfig.detail``)."""

    dark: bool  # the background's grey level lies in the darker half of its range
    clutter: int  # small dull shapes drawn
    occluded: bool  # a dull occluder hides part of one object

    def phrases(self) -> tuple[str, ...]:
        """One phrase per thing the image has, in a fixed order: background, clutter, occluder."""
        background = "on a dark background" if self.dark else "on a grey background"
        clutter = () if not self.clutter else (
            "with one speck" if self.clutter == 1 else f"with {COUNT_WORDS.get(self.clutter, 'many')} specks",)
        return (background, *clutter, *(("partly hidden",) if self.occluded else ()))


def render_with_unmentioned(scene: Scene, rng: np.random.Generator, *,
                            config: WorldConfig | None = None) -> tuple[Image.Image, Unmentioned]:
    """:func:`render`'s image (the same bytes for the same ``rng``) and what it shows that no caption says."""
    image, _, unmentioned = _render(scene, rng, config or WorldConfig(), with_coverage=False)
    return image, unmentioned


def render_with_coverage(scene: Scene, rng: np.random.Generator, *,
                         config: WorldConfig | None = None) -> tuple[Image.Image, np.ndarray]:
    """:func:`render`'s image (the same bytes for the same ``rng``) and its object coverage: (S, S) float32, the
    fraction of each pixel that shows one of the scene's objects (the caption's; clutter, background and the
    occluder's cover are not objects). What a subregion that "is on the objects" has to look at."""
    image, coverage, _ = _render(scene, rng, config or WorldConfig(), with_coverage=True)
    return image, coverage


def _render(scene: Scene, rng: np.random.Generator, config: WorldConfig, *,
            with_coverage: bool) -> tuple[Image.Image, np.ndarray | None, Unmentioned]:
    """The image, when asked its object coverage drawn alongside on a mask, and what it shows that no caption says;
    neither the mask nor the record draws randomness."""
    size = config.image_size
    background, grey = _background(rng, size, config.background)  # (S, S, 3) at the output size
    canvas = Image.fromarray(np.clip(background, 0, 255).astype(np.uint8).repeat(_SUPERSAMPLE, 0)
                             .repeat(_SUPERSAMPLE, 1), mode="RGB")
    side = size * _SUPERSAMPLE
    draw = ImageDraw.Draw(canvas)
    mask = Image.new("L", (side, side), 0) if with_coverage else None
    mask_draw = ImageDraw.Draw(mask) if mask is not None else None
    n_clutter = int(rng.integers(config.clutter + 1)) if config.clutter else 0  # no draw when off: v1 images stay
    for _ in range(n_clutter):
        diameter = rng.uniform(*_CLUTTER_DIAMETER)
        x, y = rng.uniform(diameter, 1 - diameter, 2)
        shape = _CLUTTER_SHAPES[rng.integers(len(_CLUTTER_SHAPES))]
        _draw(draw, shape, _dull_colour(rng), x * side, y * side, diameter * side / 2)
    objects = layout(scene, rng)
    for shape, colour, x, y, diameter in objects:
        _draw(draw, shape, PALETTE[colour], x * side, y * side, diameter * side / 2)
        if mask_draw is not None:
            _draw(mask_draw, shape, 255, x * side, y * side, diameter * side / 2)
    occluded = bool(config.occlusion and rng.random() < config.occlusion)  # likewise
    if occluded:
        _, _, x, y, diameter = objects[rng.integers(len(objects))]
        angle = rng.uniform(0, 2 * math.pi)
        radius = rng.uniform(*_OCCLUDER_DIAMETER) * diameter / 2
        ox, oy = x + _OCCLUDER_OFFSET * diameter * math.cos(angle), y + _OCCLUDER_OFFSET * diameter * math.sin(angle)
        _draw(draw, "circle", _dull_colour(rng), ox * side, oy * side, radius * side)
        if mask_draw is not None:
            _draw(mask_draw, "circle", 0, ox * side, oy * side, radius * side)
    pixels = np.asarray(canvas.reduce(_SUPERSAMPLE), dtype=np.int16)  # (S, S, 3)
    pixels += rng.integers(-_NOISE_AMPLITUDE, _NOISE_AMPLITUDE + 1, pixels.shape, dtype=np.int16)
    image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), mode="RGB")
    unmentioned = Unmentioned(dark=grey < sum(_BACKGROUND_GREY) / 2, clutter=n_clutter, occluded=occluded)
    if mask is None:
        return image, None, unmentioned
    return image, np.asarray(mask.reduce(_SUPERSAMPLE), dtype=np.float32) / 255, unmentioned  # coverage (S, S)


# Datasets


def _streams(seed: int) -> tuple[np.random.Generator, np.random.Generator, np.random.Generator]:
    """Independent generators for scenes, paraphrase choice and pixels: the scenes of a seed do not
    depend on the image size or on whether images are drawn at all."""
    return tuple(np.random.default_rng(child) for child in np.random.SeedSequence(seed).spawn(3))


def generate_scenes(n: int, *, seed: int, config: WorldConfig) -> list[Scene]:
    """``n`` sampled scenes: those of ``generate_pairs`` with the same seed."""
    scene_rng, _, _ = _streams(seed)
    return [sample_scene(scene_rng, config=config) for _ in range(n)]


def generate_pairs(n: int, *, seed: int, config: WorldConfig) -> list[tuple[Scene, Image.Image, str]]:
    """``n`` (scene, image, caption) triples, each caption a random paraphrase of its scene."""
    _, caption_rng, pixel_rng = _streams(seed)
    return [(scene, render(scene, pixel_rng, config=config), sample_caption(scene, caption_rng))
            for scene in generate_scenes(n, seed=seed, config=config)]


def generate_captions(n: int, *, seed: int, config: WorldConfig) -> list[str]:
    """A text-only corpus: the captions of ``generate_pairs`` with the same seed, without drawing images."""
    _, caption_rng, _ = _streams(seed)
    return [sample_caption(scene, caption_rng) for scene in generate_scenes(n, seed=seed, config=config)]


def generate_images(n: int, *, seed: int, config: WorldConfig) -> list[Image.Image]:
    """The images of ``generate_pairs`` with the same seed, without their scenes or captions."""
    _, _, pixel_rng = _streams(seed)
    return [render(scene, pixel_rng, config=config)
            for scene in generate_scenes(n, seed=seed, config=config)]


def generate_covered_pairs(n: int, *, seed: int,
                           config: WorldConfig) -> list[tuple[Scene, Image.Image, str, np.ndarray]]:
    """The triples of ``generate_pairs`` with the same seed, each with its image's object coverage
    (:func:`render_with_coverage`) as a fourth item."""
    return _pairs_with(render_with_coverage, n, seed=seed, config=config)


def generate_pairs_with_unmentioned(n: int, *, seed: int,
                                    config: WorldConfig) -> list[tuple[Scene, Image.Image, str, Unmentioned]]:
    """The triples of ``generate_pairs`` with the same seed, each with what its image shows that no caption says
    (:func:`render_with_unmentioned`) as a fourth item."""
    return _pairs_with(render_with_unmentioned, n, seed=seed, config=config)


def _pairs_with(renderer: Callable[..., tuple[Image.Image, Any]], n: int, *, seed: int,
                config: WorldConfig) -> list[tuple[Scene, Image.Image, str, Any]]:
    """The triples of ``generate_pairs``, each image drawn by ``renderer`` (a ``render_with_*``: the same bytes as
    :func:`render`) with what it returns beside the image as a fourth item."""
    _, caption_rng, pixel_rng = _streams(seed)
    pairs = []
    for scene in generate_scenes(n, seed=seed, config=config):
        image, extra = renderer(scene, pixel_rng, config=config)
        pairs.append((scene, image, sample_caption(scene, caption_rng), extra))
    return pairs


def example_pairs(count: int, *, seed: int, config: WorldConfig) -> list[tuple[Scene, Image.Image, str]]:
    """The app's example images, by a rule fixed before any training: slot i takes the next scene of kind
    ``KINDS[i % 3]`` from the scene stream of ``seed`` (single, pair, group, single, ...), skipping the others.

    Only the scene kind decides; nothing about a model's captions does. Kinds the world never draws are
    left out of the rotation.
    """
    kinds = [kind for kind, p in zip(KINDS, config.kind_probs) if p > 0]
    scene_rng, caption_rng, pixel_rng = _streams(seed)
    chosen: list[tuple[Scene, Image.Image, str]] = []
    while len(chosen) < count:
        scene = sample_scene(scene_rng, config=config)
        image, caption = render(scene, pixel_rng, config=config), sample_caption(scene, caption_rng)
        if scene.kind == kinds[len(chosen) % len(kinds)]:
            chosen.append((scene, image, caption))
    return chosen


def all_scenes(config: WorldConfig) -> list[Scene]:
    """Every distinct scene of the world, in a fixed order (e.g. for zero-shot classification)."""
    objects = list(itertools.product(config.colours, config.shapes))
    singles = [Scene("single", c, s, size=size, position=p)
               for c, s in objects for size in SIZES for p in POSITION_PHRASES]
    pairs = [Scene("pair", c, s, relation=r, colour2=c2, shape2=s2, count=2)
             for (c, s), (c2, s2) in itertools.permutations(objects, 2) for r in PAIR_RELATIONS]
    groups = [Scene("group", c, s, count=n) for c, s in objects for n in config.group_counts]
    return singles + pairs + groups


def novel_scenes(config: WorldConfig) -> frozenset[Scene]:
    """The scenes no training text describes (``config.novel`` of each kind, a fixed draw from
    ``config.novel_seed``); every word they use still appears in the others."""
    rng = np.random.default_rng(config.novel_seed)
    every = all_scenes(config)
    chosen: list[Scene] = []
    for kind in KINDS:
        of_kind = [scene for scene in every if scene.kind == kind]
        count = round(config.novel * len(of_kind))
        chosen += [of_kind[i] for i in sorted(rng.choice(len(of_kind), size=count, replace=False))]
    return frozenset(chosen)


def vocabulary(config: WorldConfig) -> list[str]:
    """Sorted words used by the captions of all scenes."""
    return sorted({word for scene in all_scenes(config) for text in captions(scene) for word in text.split()})


__all__ = [  # the language's names are re-exported: this module is the world's one import
    "ATTRIBUTES", "BACKGROUNDS", "COLOURS", "COUNT_WORDS", "KINDS", "PAIR_RELATIONS", "PALETTE", "POSITION_PHRASES",
    "SHAPES", "SIZES", "Scene", "SceneError", "Unmentioned", "WorldConfig", "all_scenes", "attribute_accuracy",
    "captions", "example_pairs", "generate_captions", "generate_images", "generate_pairs",
    "generate_pairs_with_unmentioned", "generate_scenes", "layout", "novel_scenes", "parse_caption", "references",
    "render", "render_with_unmentioned", "sample_caption", "sample_scene", "scene_accuracy", "vocabulary",
]
