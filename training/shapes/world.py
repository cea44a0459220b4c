"""The shapes world: seeded procedural images of coloured shapes with paraphrased captions.

It stands in for COCO where there is no network or GPU. Every caption fully specifies its scene and
``parse_caption`` maps it back to the exact ``Scene``, so a generated caption can be scored by meaning
(``scene_accuracy``, ``attribute_accuracy``) as well as by n-gram metrics against ``references``.
Three kinds of scene:

- single: one object with a size and a position ("a large red circle on the left");
- pair: two different objects side by side or stacked ("a red circle to the left of a blue square");
- group: two or three identical objects ("three white triangles").

All randomness comes from explicitly seeded numpy Generators: the same seed gives the same bytes.
"""

from __future__ import annotations

import itertools
import math
import re
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

from capdemo.config import Config, ConfigError

# Vocabulary. Colours are bright or saturated and far apart in RGB, so they survive downsampling and
# stand out against the dark, desaturated backgrounds.
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (230, 45, 45),
    "green": (40, 200, 70),
    "blue": (50, 110, 255),
    "yellow": (245, 220, 40),
    "purple": (190, 70, 235),
    "white": (240, 240, 240),
}
SHAPES = ("circle", "square", "triangle", "cross")
SIZES = ("small", "large")
POSITION_PHRASES = {"left": "on the left", "right": "on the right", "top": "at the top",
                    "bottom": "at the bottom", "centre": "in the centre"}
PAIR_RELATIONS = ("left of", "above")  # canonical: the first object is left of / above the second
COUNT_WORDS = {2: "two", 3: "three"}
KINDS = ("single", "pair", "group")
ATTRIBUTES = ("type", "colour", "shape", "size", "position", "relation", "count")

# Geometry, as fractions of the image side. At 64 px a small object is ~13 px across, a large one ~26 px.
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
_NOISE_AMPLITUDE = 10  # per-pixel noise, uniform integers in [-10, 10] (std ~6; far cheaper than Gaussian)


class SceneError(ValueError):
    """A Scene whose fields do not describe a valid scene."""


@dataclass(frozen=True)
class Scene:
    """One scene in canonical form: two captions mean the same thing iff they parse to equal Scenes.

    A pair stores its left (or upper) object first, so "a blue square to the right of a red circle"
    and "a red circle to the left of a blue square" are the same Scene.
    """

    kind: str  # "single", "pair" or "group"
    colour: str  # colour of the object (pair: of the left or upper one)
    shape: str  # shape of the object (pair: of the left or upper one)
    size: str | None = None  # single only: "small" or "large"
    position: str | None = None  # single only: "left", "right", "top", "bottom" or "centre"
    relation: str | None = None  # pair only: "left of" or "above", the first object relative to the second
    colour2: str | None = None  # pair only: colour of the right or lower object
    shape2: str | None = None  # pair only: shape of the right or lower object
    count: int = 1  # objects drawn: 1 for single, 2 for pair, 2 or 3 for group

    def __post_init__(self) -> None:
        single, pair = self.kind == "single", self.kind == "pair"
        rules = {
            f"kind must be one of {KINDS}": self.kind in KINDS,
            "unknown colour or shape": self.colour in PALETTE and self.shape in SHAPES,
            "size and position are required for single scenes and only for them":
                (self.size in SIZES and self.position in POSITION_PHRASES) if single
                else self.size is None and self.position is None,
            "relation, colour2 and shape2 are required for pair scenes and only for them":
                (self.relation in PAIR_RELATIONS and self.colour2 in PALETTE and self.shape2 in SHAPES) if pair
                else self.relation is None and self.colour2 is None and self.shape2 is None,
            "the two objects of a pair must differ":
                not pair or (self.colour, self.shape) != (self.colour2, self.shape2),
            "count must be 1 for single, 2 for pair, 2 or 3 for group":
                self.count in {"single": (1,), "pair": (2,), "group": tuple(COUNT_WORDS)}.get(self.kind, ()),
        }
        broken = [message for message, ok in rules.items() if not ok]
        if broken:
            raise SceneError(f"invalid {self.kind!r} scene: {broken[0]}")


@dataclass
class WorldConfig(Config):
    """What the shapes world contains, how its images look and which seed makes each split."""

    colours: tuple[str, ...] = tuple(PALETTE)  # colour words in use (a subset of PALETTE)
    shapes: tuple[str, ...] = ("circle", "square", "triangle")  # shapes in use ("cross" is also available)
    image_size: int = 64  # side of the square RGB images, in pixels
    kind_probs: tuple[float, float, float] = (0.4, 0.4, 0.2)  # probabilities of single, pair and group scenes
    train_seed: int = 0  # image-caption pairs for training the tiny CLIP
    text_seed: int = 1  # text-only caption corpus (never rendered)
    unpaired_seed: int = 2  # unpaired images (image-side statistics of the modality gap)
    test_seed: int = 3  # held-out test images

    def __post_init__(self) -> None:
        if not self.colours or not set(self.colours) <= set(PALETTE) or len(set(self.colours)) < len(self.colours):
            raise ConfigError(f"colours must be distinct names from {tuple(PALETTE)}, got {self.colours}")
        if not self.shapes or not set(self.shapes) <= set(SHAPES) or len(set(self.shapes)) < len(self.shapes):
            raise ConfigError(f"shapes must be distinct names from {SHAPES}, got {self.shapes}")
        if self.image_size < 16:
            raise ConfigError(f"image_size must be at least 16 pixels, got {self.image_size}")
        probs = self.kind_probs
        if len(probs) != len(KINDS) or min(probs) < 0 or not math.isclose(sum(probs), 1.0, abs_tol=1e-6):
            raise ConfigError(f"kind_probs must be 3 non-negative numbers summing to 1, got {self.kind_probs}")
        if self.kind_probs[1] > 0 and len(self.colours) * len(self.shapes) < 2:
            raise ConfigError("pair scenes need at least two distinct objects (colours x shapes)")


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
    return Scene("group", colour, shape, count=tuple(COUNT_WORDS)[rng.integers(len(COUNT_WORDS))])


def _layout(scene: Scene, rng: np.random.Generator) -> list[tuple[str, str, float, float, float]]:
    """Objects to draw as (shape, colour, centre x, centre y, diameter), in fractions of the image side."""
    scale = 1 + rng.uniform(-_SIZE_JITTER, _SIZE_JITTER)
    if scene.kind == "single":
        diameter = _SINGLE_DIAMETER[scene.size] * scale
        centre = np.add(_POSITION_CENTRES[scene.position], rng.uniform(-_POSITION_JITTER, _POSITION_JITTER, 2))
        x, y = np.clip(centre, _REACH * diameter / 2, 1 - _REACH * diameter / 2)  # stay inside the frame
        return [(scene.shape, scene.colour, x, y, diameter)]
    if scene.kind == "pair":
        along = [rng.uniform(*bounds) for bounds in _PAIR_ALONG]
        across = rng.uniform(*_PAIR_ACROSS, 2)
        centres = list(zip(along, across)) if scene.relation == "left of" else list(zip(across, along))
        objects = [(scene.shape, scene.colour), (scene.shape2, scene.colour2)]
        return [(shape, colour, x, y, _PAIR_DIAMETER * scale) for (shape, colour), (x, y) in zip(objects, centres)]
    cells = rng.choice(9, size=scene.count, replace=False)  # distinct cells of a 3x3 grid
    offsets = rng.uniform(-_GROUP_JITTER, _GROUP_JITTER, (scene.count, 2))
    centres = [((cell % 3 + 0.5) / 3 + dx, (cell // 3 + 0.5) / 3 + dy) for cell, (dx, dy) in zip(cells, offsets)]
    return [(scene.shape, scene.colour, x, y, _GROUP_DIAMETER * scale) for x, y in centres]


def _draw(draw: ImageDraw.ImageDraw, shape: str, rgb: tuple[int, int, int], x: float, y: float, r: float) -> None:
    """Draw one filled shape of radius ``r`` (pixels) centred on (x, y); areas are roughly equal."""
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


def render(scene: Scene, rng: np.random.Generator, *, image_size: int = 64) -> Image.Image:
    """Draw ``scene`` as an RGB image; ``rng`` picks the background, placement jitter and pixel noise."""
    if image_size < 16:
        raise ValueError(f"image_size must be at least 16 pixels, got {image_size}")
    grey = rng.uniform(*_BACKGROUND_GREY)
    background = tuple(int(c) for c in grey + rng.uniform(-_BACKGROUND_TINT, _BACKGROUND_TINT, 3))
    side = image_size * _SUPERSAMPLE
    canvas = Image.new("RGB", (side, side), background)
    draw = ImageDraw.Draw(canvas)
    for shape, colour, x, y, diameter in _layout(scene, rng):
        _draw(draw, shape, PALETTE[colour], x * side, y * side, diameter * side / 2)
    pixels = np.asarray(canvas.reduce(_SUPERSAMPLE), dtype=np.int16)  # (S, S, 3)
    pixels += rng.integers(-_NOISE_AMPLITUDE, _NOISE_AMPLITUDE + 1, pixels.shape, dtype=np.int16)
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), mode="RGB")


# Language: captions and their parser


def _plural(shape: str) -> str:
    return shape + ("es" if shape.endswith("s") else "s")


def captions(scene: Scene) -> list[str]:
    """Paraphrases that each fully specify ``scene``; the first is the canonical one."""
    if scene.kind == "single":
        thing, where = f"a {scene.size} {scene.colour} {scene.shape}", POSITION_PHRASES[scene.position]
        return [f"{thing} {where}", f"there is {thing} {where}", f"{where} there is {thing}"]
    if scene.kind == "pair":
        first, second = f"a {scene.colour} {scene.shape}", f"a {scene.colour2} {scene.shape2}"
        if scene.relation == "left of":
            return [f"{first} to the left of {second}", f"{second} to the right of {first}",
                    f"{first} {POSITION_PHRASES['left']} and {second} {POSITION_PHRASES['right']}"]
        return [f"{first} above {second}", f"{second} below {first}",
                f"{first} {POSITION_PHRASES['top']} and {second} {POSITION_PHRASES['bottom']}"]
    number, things = COUNT_WORDS[scene.count], f"{scene.colour} {_plural(scene.shape)}"
    return [f"{number} {things}", f"there are {number} {things}", f"{number} identical {things}"]


def sample_caption(scene: Scene, rng: np.random.Generator) -> str:
    """One paraphrase of ``scene``, chosen uniformly (e.g. a fresh one each training epoch)."""
    options = captions(scene)
    return options[rng.integers(len(options))]


def references(scene: Scene) -> list[str]:
    """All paraphrases of ``scene``: the reference set for BLEU/CIDEr."""
    return captions(scene)


def _either(words: Iterable[str]) -> str:
    """Regex alternation of ``words``, longest first."""
    return "|".join(sorted(map(re.escape, words), key=len, reverse=True))


_PLACES = {**{phrase: place for place, phrase in POSITION_PHRASES.items()},
           "in the center": "centre", "in the middle": "centre"}
_RELATION_PLACE = {"to the left of": "left", "to the right of": "right", "above": "top", "below": "bottom"}
_OPPOSITE = {"left": "right", "right": "left", "top": "bottom", "bottom": "top"}
_PLACE = rf"(?:{_either(_PLACES)})"


def _thing(tag: str) -> str:
    """Regex for "a [size] colour shape", with named groups prefixed by ``tag``."""
    return (rf"an? (?:(?P<{tag}_size>{_either(SIZES)}) )?"
            rf"(?P<{tag}_colour>{_either(PALETTE)}) (?P<{tag}_shape>{_either(SHAPES)})")


_CAPTION_FORMS = (  # (kind, pattern) for every sentence form that captions() writes, and near-variants
    ("single", re.compile(rf"(?:there is )?{_thing('a')} (?P<a_place>{_PLACE})")),
    ("single", re.compile(rf"(?P<a_place>{_PLACE}) there is {_thing('a')}")),
    ("pair", re.compile(rf"{_thing('a')} (?P<relation>{_either(_RELATION_PLACE)}) {_thing('b')}")),
    ("pair", re.compile(rf"{_thing('a')} (?P<a_place>{_PLACE}) and {_thing('b')} (?P<b_place>{_PLACE})")),
    ("group", re.compile(rf"(?:there are )?(?P<number>{_either(COUNT_WORDS.values())}) (?:identical )?"
                         rf"(?P<colour>{_either(PALETTE)}) (?P<plural>{_either(map(_plural, SHAPES))})")),
)


def _normalise(text: str) -> str:
    return " ".join(text.lower().replace(",", " ").strip().rstrip(".!").split())


def _scene_from_match(kind: str, match: re.Match) -> Scene:
    """Build the canonical Scene from a full match of one of the caption forms (may raise SceneError)."""
    groups = match.groupdict()
    if kind == "group":
        count = {word: n for n, word in COUNT_WORDS.items()}[groups["number"]]
        shape = {_plural(shape): shape for shape in SHAPES}[groups["plural"]]
        return Scene("group", groups["colour"], shape, count=count)
    if kind == "single":
        return Scene("single", groups["a_colour"], groups["a_shape"], size=groups["a_size"],
                     position=_PLACES[groups["a_place"]])
    if groups["a_size"] or groups["b_size"]:
        raise SceneError("objects of a pair have no size")
    a_place = _RELATION_PLACE[groups["relation"]] if groups.get("relation") else _PLACES[groups["a_place"]]
    if groups.get("b_place") and _PLACES[groups["b_place"]] != _OPPOSITE.get(a_place):
        raise SceneError("the two objects of a pair must be on opposite sides")
    a, b = (groups["a_colour"], groups["a_shape"]), (groups["b_colour"], groups["b_shape"])
    (colour, shape), (colour2, shape2) = (a, b) if a_place in ("left", "top") else (b, a)
    relation = "left of" if a_place in ("left", "right") else "above"
    return Scene("pair", colour, shape, relation=relation, colour2=colour2, shape2=shape2, count=2)


def parse_caption(text: str) -> Scene | None:
    """The Scene that ``text`` fully specifies, or None when it is not a (near-)caption of this world.

    Case, extra spaces, commas and a final period are ignored; the world's full vocabulary is accepted.
    """
    normalised = _normalise(text)
    for kind, form in _CAPTION_FORMS:
        match = form.fullmatch(normalised)
        if match:
            try:
                return _scene_from_match(kind, match)
            except SceneError:
                return None
    return None


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
    return [(scene, render(scene, pixel_rng, image_size=config.image_size), sample_caption(scene, caption_rng))
            for scene in generate_scenes(n, seed=seed, config=config)]


def generate_captions(n: int, *, seed: int, config: WorldConfig) -> list[str]:
    """A text-only corpus: the captions of ``generate_pairs`` with the same seed, without drawing images."""
    _, caption_rng, _ = _streams(seed)
    return [sample_caption(scene, caption_rng) for scene in generate_scenes(n, seed=seed, config=config)]


def generate_images(n: int, *, seed: int, config: WorldConfig) -> list[Image.Image]:
    """The images of ``generate_pairs`` with the same seed, without their scenes or captions."""
    _, _, pixel_rng = _streams(seed)
    return [render(scene, pixel_rng, image_size=config.image_size)
            for scene in generate_scenes(n, seed=seed, config=config)]


def all_scenes(config: WorldConfig) -> list[Scene]:
    """Every distinct scene of the world, in a fixed order (e.g. for zero-shot classification)."""
    objects = list(itertools.product(config.colours, config.shapes))
    singles = [Scene("single", c, s, size=size, position=p)
               for c, s in objects for size in SIZES for p in POSITION_PHRASES]
    pairs = [Scene("pair", c, s, relation=r, colour2=c2, shape2=s2, count=2)
             for (c, s), (c2, s2) in itertools.permutations(objects, 2) for r in PAIR_RELATIONS]
    groups = [Scene("group", c, s, count=n) for c, s in objects for n in COUNT_WORDS]
    return singles + pairs + groups


def vocabulary(config: WorldConfig) -> list[str]:
    """Sorted words used by the captions of all scenes."""
    return sorted({word for scene in all_scenes(config) for text in captions(scene) for word in text.split()})


# Scoring


def _attributes(scene: Scene) -> dict[str, object]:
    """Comparable attributes; None where one does not apply. Pairs list their objects left (upper) first,
    so the order a caption mentions them in does not matter."""
    pair = scene.kind == "pair"
    return {
        "type": scene.kind,
        "colour": (scene.colour, scene.colour2) if pair else (scene.colour,),
        "shape": (scene.shape, scene.shape2) if pair else (scene.shape,),
        "size": scene.size,
        "position": scene.position,
        "relation": scene.relation,
        "count": scene.count if scene.kind == "group" else None,
    }


def _check_lengths(predictions: list[str], scenes: list[Scene]) -> None:
    if not scenes or len(predictions) != len(scenes):
        raise ValueError(f"need one prediction per scene and at least one scene, got {len(predictions)} "
                         f"predictions for {len(scenes)} scenes")


def scene_accuracy(predictions: list[str], scenes: list[Scene]) -> float:
    """Fraction of predictions that parse to exactly their scene."""
    _check_lengths(predictions, scenes)
    return sum(parse_caption(text) == scene for text, scene in zip(predictions, scenes)) / len(scenes)


def attribute_accuracy(predictions: list[str], scenes: list[Scene]) -> dict[str, float]:
    """Per-attribute accuracy, each over the scenes it applies to, plus "overall" over all judgements.

    type, colour and shape apply to every scene (colour/shape compare the tuple of object colours/shapes,
    a pair's left or upper object first); size and position to single scenes; relation (the axis, "left of"
    or "above") to pairs; count to groups. An unparseable prediction is wrong on everything. Attributes
    that apply to none of ``scenes`` are left out.
    """
    _check_lengths(predictions, scenes)
    correct, total = Counter(), Counter()
    for text, scene in zip(predictions, scenes):
        parsed = parse_caption(text)
        guess = _attributes(parsed) if parsed else {}
        for name, value in _attributes(scene).items():
            if value is not None:
                total[name] += 1
                correct[name] += guess.get(name) == value
    scores = {name: correct[name] / total[name] for name in ATTRIBUTES if total[name]}
    scores["overall"] = sum(correct.values()) / sum(total.values())
    return scores
