"""The shapes world's language: what a scene is, the captions that say it, the parser that reads them back.

A ``Scene`` is the meaning of a caption in canonical form. ``captions`` writes the paraphrases that
each fully specify a scene, and ``parse_caption`` maps any of them (and near-variants) back to the
exact ``Scene``, so a generated caption can be scored by meaning (``scene_accuracy``,
``attribute_accuracy``) as well as by n-gram metrics against ``references``. Three kinds of scene:

- single: one object with a size and a position ("a large red circle on the left");
- pair: two different objects side by side or stacked ("a red circle to the left of a blue square");
- group: two to four identical objects ("three white triangles").

How scenes are sampled and drawn lives in :mod:`training.shapes.world`, which re-exports everything here.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

# Vocabulary: the words a caption can use for each attribute.
COLOURS = ("red", "green", "blue", "yellow", "purple", "white")
SHAPES = ("circle", "square", "triangle", "cross")
SIZES = ("small", "large")
POSITION_PHRASES = {"left": "on the left", "right": "on the right", "top": "at the top",
                    "bottom": "at the bottom", "centre": "in the centre"}
PAIR_RELATIONS = ("left of", "above")  # canonical: the first object is left of / above the second
COUNT_WORDS = {2: "two", 3: "three", 4: "four"}
KINDS = ("single", "pair", "group")
ATTRIBUTES = ("type", "colour", "shape", "size", "position", "relation", "count")


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
    count: int = 1  # objects drawn: 1 for single, 2 for pair, 2 to 4 for group

    def __post_init__(self) -> None:
        single, pair = self.kind == "single", self.kind == "pair"
        rules = {
            f"kind must be one of {KINDS}": self.kind in KINDS,
            "unknown colour or shape": self.colour in COLOURS and self.shape in SHAPES,
            "size and position are required for single scenes and only for them":
                (self.size in SIZES and self.position in POSITION_PHRASES) if single
                else self.size is None and self.position is None,
            "relation, colour2 and shape2 are required for pair scenes and only for them":
                (self.relation in PAIR_RELATIONS and self.colour2 in COLOURS and self.shape2 in SHAPES) if pair
                else self.relation is None and self.colour2 is None and self.shape2 is None,
            "the two objects of a pair must differ":
                not pair or (self.colour, self.shape) != (self.colour2, self.shape2),
            "count must be 1 for single, 2 for pair, 2 to 4 for group":
                self.count in {"single": (1,), "pair": (2,), "group": tuple(COUNT_WORDS)}.get(self.kind, ()),
        }
        broken = [message for message, ok in rules.items() if not ok]
        if broken:
            raise SceneError(f"invalid {self.kind!r} scene: {broken[0]}")


# Captions and their parser


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
            rf"(?P<{tag}_colour>{_either(COLOURS)}) (?P<{tag}_shape>{_either(SHAPES)})")


_CAPTION_FORMS = (  # (kind, pattern) for every sentence form that captions() writes, and near-variants
    ("single", re.compile(rf"(?:there is )?{_thing('a')} (?P<a_place>{_PLACE})")),
    ("single", re.compile(rf"(?P<a_place>{_PLACE}) there is {_thing('a')}")),
    ("pair", re.compile(rf"{_thing('a')} (?P<relation>{_either(_RELATION_PLACE)}) {_thing('b')}")),
    ("pair", re.compile(rf"{_thing('a')} (?P<a_place>{_PLACE}) and {_thing('b')} (?P<b_place>{_PLACE})")),
    ("group", re.compile(rf"(?:there are )?(?P<number>{_either(COUNT_WORDS.values())}) (?:identical )?"
                         rf"(?P<colour>{_either(COLOURS)}) (?P<plural>{_either(map(_plural, SHAPES))})")),
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
