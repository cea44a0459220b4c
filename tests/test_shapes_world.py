"""The shapes world: reproducible data, captions that parse back exactly, images that match them, scoring."""

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from capdemo.config import ConfigError
from training.shapes import world
from training.shapes.world import (
    COUNT_WORDS,
    PALETTE,
    SHAPES,
    Scene,
    SceneError,
    WorldConfig,
    all_scenes,
    attribute_accuracy,
    captions,
    generate_captions,
    generate_images,
    generate_pairs,
    generate_scenes,
    parse_caption,
    references,
    render,
    sample_caption,
    sample_scene,
    scene_accuracy,
    vocabulary,
)

REPO = Path(__file__).resolve().parents[1]
COLOUR_TOLERANCE = 60  # RGB distance within which a pixel counts as showing a palette colour

RED_CIRCLE_LEFT_OF_BLUE_SQUARE = Scene("pair", "red", "circle", relation="left of", colour2="blue",
                                       shape2="square", count=2)
LARGE_RED_CIRCLE_LEFT = Scene("single", "red", "circle", size="large", position="left")


def colour_mask(image, colour: str) -> np.ndarray:
    """(H, W) bool: pixels within COLOUR_TOLERANCE of the palette colour."""
    pixels = np.asarray(image, dtype=np.float64)
    return np.linalg.norm(pixels - PALETTE[colour], axis=-1) < COLOUR_TOLERANCE


def objects_mask(image, scene: Scene) -> np.ndarray:
    """(H, W) bool: pixels of any of the scene's object colours."""
    return np.logical_or.reduce([colour_mask(image, colour) for colour in {scene.colour, scene.colour2} - {None}])


def centroid(mask: np.ndarray) -> tuple[float, float]:
    """(x, y) of a mask's pixels, as fractions of the image side."""
    ys, xs = np.nonzero(mask)
    return (xs.mean() + 0.5) / mask.shape[1], (ys.mean() + 0.5) / mask.shape[0]


# Determinism


def test_same_seed_gives_identical_bytes_and_different_seed_differs():
    config = WorldConfig()
    first, again, other = (generate_pairs(40, seed=s, config=config) for s in (7, 7, 8))
    assert [(s, im.tobytes(), t) for s, im, t in first] == [(s, im.tobytes(), t) for s, im, t in again]
    assert [t for _, _, t in first] != [t for _, _, t in other]
    assert all(a.tobytes() != b.tobytes() for (_, a, _), (_, b, _) in zip(first, other))


def test_generators_agree_for_one_seed_and_leave_the_global_rng_alone():
    config = WorldConfig(image_size=32)
    np.random.seed(123)
    expected_global = np.random.random()
    np.random.seed(123)
    pairs = generate_pairs(30, seed=3, config=config)
    assert np.random.random() == expected_global
    assert generate_scenes(30, seed=3, config=config) == [s for s, _, _ in pairs]
    assert generate_captions(30, seed=3, config=config) == [t for _, _, t in pairs]
    assert [im.tobytes() for im in generate_images(30, seed=3, config=config)] == [im.tobytes() for _, im, _ in pairs]
    # The scenes and captions of a seed do not depend on the image size.
    assert generate_captions(30, seed=3, config=WorldConfig(image_size=64)) == [t for _, _, t in pairs]


def test_kind_frequencies_follow_the_config():
    scenes = generate_scenes(5000, seed=0, config=WorldConfig())
    frequency = {kind: sum(s.kind == kind for s in scenes) / len(scenes) for kind in ("single", "pair", "group")}
    assert frequency == pytest.approx({"single": 0.4, "pair": 0.4, "group": 0.2}, abs=0.03)
    only_groups = generate_scenes(200, seed=0, config=WorldConfig(kind_probs=(0.0, 0.0, 1.0)))
    assert {s.kind for s in only_groups} == {"group"}
    assert {s.count for s in only_groups} == {2, 3, 4}


# The world's size


def test_scene_and_vocabulary_counts():
    config = WorldConfig()
    scenes = all_scenes(config)
    n_objects = 6 * 3
    assert len(scenes) == len(set(scenes)) == n_objects * 2 * 5 + n_objects * (n_objects - 1) * 2 + n_objects * 3
    assert len(scenes) == 846
    assert len(vocabulary(config)) == 36
    assert len(all_scenes(WorldConfig(shapes=SHAPES))) == 24 * 2 * 5 + 24 * 23 * 2 + 24 * 3
    assert set(generate_scenes(3000, seed=1, config=config)) <= set(scenes)


# Captions and parsing


def test_captions_are_short_lowercase_distinct_paraphrases():
    owner: dict[str, Scene] = {}
    for scene in all_scenes(WorldConfig(shapes=SHAPES)):
        texts = captions(scene)
        assert 2 <= len(texts) <= 4 and len(set(texts)) == len(texts)
        assert references(scene) == texts
        for text in texts:
            assert text == text.lower() and text == text.strip() and not text.endswith(".")
            assert len(text.split()) <= 15
            assert owner.setdefault(text, scene) == scene  # no caption describes two scenes


def test_sample_caption_draws_every_paraphrase():
    rng = np.random.default_rng(0)
    drawn = [sample_caption(RED_CIRCLE_LEFT_OF_BLUE_SQUARE, rng) for _ in range(60)]
    assert set(drawn) == set(captions(RED_CIRCLE_LEFT_OF_BLUE_SQUARE))


@pytest.mark.parametrize("shapes", [("circle", "square", "triangle"), SHAPES])
def test_every_paraphrase_of_every_scene_parses_back(shapes):
    for scene in all_scenes(WorldConfig(shapes=shapes)):
        for text in captions(scene):
            assert parse_caption(text) == scene, text


def test_sampled_scenes_and_near_variants_round_trip():
    rng = np.random.default_rng(0)
    config = WorldConfig(shapes=SHAPES)
    for _ in range(2000):
        scene = sample_scene(rng, config=config)
        for text in captions(scene):
            assert parse_caption(text) == scene
        variant = "  " + captions(scene)[-1].upper().replace(" ", "   ") + ". "
        assert parse_caption(variant) == scene, variant


def test_paraphrases_in_other_orders_parse_to_the_same_scene():
    assert parse_caption("a blue square on the right and a red circle on the left") == RED_CIRCLE_LEFT_OF_BLUE_SQUARE
    assert parse_caption("A blue square to the right of a red circle.") == RED_CIRCLE_LEFT_OF_BLUE_SQUARE
    red_circle_above_blue_square = Scene("pair", "red", "circle", relation="above", colour2="blue",
                                         shape2="square", count=2)
    assert parse_caption("a blue square below a red circle") == red_circle_above_blue_square
    assert parse_caption("in the center there is a small white cross") == Scene(
        "single", "white", "cross", size="small", position="centre")
    assert parse_caption("there are three identical green triangles") == Scene("group", "green", "triangle", count=3)
    assert parse_caption("there are four white squares") == Scene("group", "white", "square", count=4)


@pytest.mark.parametrize("junk", [
    "",
    "hello world",
    "a red circle",  # no size or position: not fully specified
    "a large red circle",
    "a large red circle to the left of a blue square",  # pairs have no size
    "a red circle to the left of a red circle",  # the two objects of a pair differ
    "a red circle on the left and a blue square on the left",
    "a red circle on the left and a blue square at the bottom",
    "five red circles",
    "one red circle",
    "two red circle",
    "a large pink circle on the left",
    "a large red circle on the left and more",
])
def test_junk_does_not_parse(junk):
    assert parse_caption(junk) is None


def test_invalid_scenes_and_configs_are_refused():
    with pytest.raises(SceneError, match="size and position"):
        Scene("single", "red", "circle")
    with pytest.raises(SceneError, match="must differ"):
        Scene("pair", "red", "circle", relation="left of", colour2="red", shape2="circle", count=2)
    for count in (1, 5):
        with pytest.raises(SceneError, match="count"):
            Scene("group", "red", "circle", count=count)
    with pytest.raises(SceneError, match="kind"):
        Scene("crowd", "red", "circle")
    with pytest.raises(ConfigError, match="colours"):
        WorldConfig(colours=("red", "pink"))
    with pytest.raises(ConfigError, match="kind_probs"):
        WorldConfig(kind_probs=(0.5, 0.5, 0.5))
    with pytest.raises(ConfigError, match="background"):
        WorldConfig(background="wallpaper")
    with pytest.raises(ConfigError, match="occlusion"):
        WorldConfig(occlusion=1.5)
    config = WorldConfig(colours=("red", "blue"), image_size=32, test_seed=9, background="plain", clutter=0)
    assert WorldConfig.from_dict(config.to_dict()) == config


# Images

CLEAN = {"clutter": 0, "occlusion": 0.0}  # only the scene's objects: their geometry is checked by colour masks


@pytest.mark.parametrize("image_size", [56, 32])
def test_image_size_and_mode(image_size):
    image = render(LARGE_RED_CIRCLE_LEFT, np.random.default_rng(0), config=WorldConfig(image_size=image_size))
    assert image.mode == "RGB" and image.size == (image_size, image_size)
    assert np.asarray(image).dtype == np.uint8
    with pytest.raises(ConfigError, match="image_size"):
        WorldConfig(image_size=8)


@pytest.mark.parametrize("image_size", [56, 32])
def test_single_objects_are_drawn_where_the_caption_says(image_size):
    regions = {"left": lambda x, y: x < 0.4, "right": lambda x, y: x > 0.6, "top": lambda x, y: y < 0.4,
               "bottom": lambda x, y: y > 0.6, "centre": lambda x, y: 0.4 < x < 0.6 and 0.4 < y < 0.6}
    # a flat background: a textured one's gradient would move the half-image means compared below
    config = WorldConfig(image_size=image_size, kind_probs=(1.0, 0.0, 0.0), shapes=SHAPES, background="plain", **CLEAN)
    for scene, image, _ in generate_pairs(150, seed=1, config=config):
        mask = colour_mask(image, scene.colour)
        assert regions[scene.position](*centroid(mask)), scene
        pixels = np.asarray(image, dtype=np.float64)
        half = image_size // 2
        if scene.position in ("left", "right"):  # the stated half's mean colour is closer to the object's
            near, far = (pixels[:, :half], pixels[:, half:])[:: 1 if scene.position == "left" else -1]
            distance = [np.linalg.norm(part.mean(axis=(0, 1)) - PALETTE[scene.colour]) for part in (near, far)]
            assert distance[0] < distance[1], scene


def test_small_and_large_objects_have_the_stated_sizes():
    config = WorldConfig(kind_probs=(1.0, 0.0, 0.0), **CLEAN)
    extent, area = {"small": [], "large": []}, {"small": [], "large": []}
    for scene, image, _ in generate_pairs(200, seed=2, config=config):
        ys, xs = np.nonzero(colour_mask(image, scene.colour))
        extent[scene.size].append(max(np.ptp(xs), np.ptp(ys)) + 1)
        area[scene.size].append(len(xs))
    assert min(extent["small"]) >= 9 and min(extent["large"]) >= 18  # pixels across, at 56 px
    assert max(area["small"]) < min(area["large"])


def test_pairs_are_drawn_in_the_stated_relation():
    config = WorldConfig(kind_probs=(0.0, 1.0, 0.0), **CLEAN)
    checked = 0
    for scene, image, _ in generate_pairs(200, seed=3, config=config):
        if scene.colour == scene.colour2:
            continue
        first, second = centroid(colour_mask(image, scene.colour)), centroid(colour_mask(image, scene.colour2))
        axis = 0 if scene.relation == "left of" else 1
        assert first[axis] + 0.2 < second[axis], scene
        assert abs(first[1 - axis] - second[1 - axis]) < 0.3, scene  # the other axis never dominates
        checked += 1
    assert checked > 150


def test_groups_show_the_stated_number_of_separate_objects():
    ndimage = pytest.importorskip("scipy.ndimage")
    config = WorldConfig(kind_probs=(0.0, 0.0, 1.0), **CLEAN)
    counts = set()
    for scene, image, _ in generate_pairs(100, seed=4, config=config):
        _, n_blobs = ndimage.label(colour_mask(image, scene.colour), structure=np.ones((3, 3)))  # 8-connected
        assert n_blobs == scene.count and scene.count in COUNT_WORDS, scene
        counts.add(scene.count)
    assert counts == {2, 3, 4}


def test_background_is_never_mistaken_for_an_object():
    for background in ("plain", "textured"):
        config = WorldConfig(background=background, **CLEAN)
        for _, image, _ in generate_pairs(100, seed=5, config=config):
            corner = np.asarray(image)[:2, :2].reshape(-1, 3)  # objects never reach the corners
            assert np.all(np.linalg.norm(corner[:, None] - np.array(list(PALETTE.values())), axis=-1) > 60)


def test_textured_backgrounds_vary_across_the_image_and_plain_ones_do_not():
    spread = {}
    for background in ("plain", "textured"):
        config = WorldConfig(background=background, **CLEAN)
        corners = [[pixels[rows, cols].mean(axis=(0, 1)) for rows in (slice(0, 3), slice(-3, None))
                    for cols in (slice(0, 3), slice(-3, None))]  # (4, 3): objects never reach the corners
                   for pixels in (np.asarray(image, dtype=np.float64) for _, image, _ in
                                  generate_pairs(100, seed=6, config=config))]
        spread[background] = np.mean([np.ptp(four, axis=0).max() for four in corners])  # widest channel
    assert spread["plain"] < 8 < 2 * 8 < spread["textured"]  # plain: pixel noise only, averaged over 9 values


def test_clutter_is_drawn_and_is_never_a_caption_colour():
    """Clutter and occluders are dull greys: no pixel comes near a palette colour the caption does not name."""
    cluttered = WorldConfig(background="plain", clutter=4, occlusion=1.0)
    clean = WorldConfig(background="plain", **CLEAN)  # the same scenes: the scene stream ignores the pixels

    def foreground(image) -> int:  # pixels far from the (plain) background's colour
        pixels = np.asarray(image, dtype=np.float64)
        return int((np.linalg.norm(pixels - np.median(pixels.reshape(-1, 3), axis=0), axis=-1) > 45).sum())

    extra = []
    for (scene, image, _), (_, plain, _) in zip(generate_pairs(200, seed=7, config=cluttered),
                                                generate_pairs(200, seed=7, config=clean)):
        for colour in set(PALETTE) - {scene.colour, scene.colour2}:
            assert colour_mask(image, colour).sum() <= 2, (scene, colour)  # anti-aliased edges at most
        extra.append(foreground(image) - foreground(plain))  # same scenes, so the objects' area cancels on average
    assert np.mean(extra) > 10  # clutter and occluders are really drawn


def test_an_occluder_hides_part_of_one_object_and_never_most_of_it():
    occluded = WorldConfig(clutter=0, occlusion=1.0)
    visible = WorldConfig(clutter=0, occlusion=0.0)
    fractions = []
    for i, scene in enumerate(generate_scenes(150, seed=8, config=WorldConfig(kind_probs=(1.0, 0.0, 0.0)))):
        # the same generator state draws the same background and layout; only the occluder differs
        hidden = render(scene, np.random.default_rng(i), config=occluded)
        shown = render(scene, np.random.default_rng(i), config=visible)
        before, after = colour_mask(shown, scene.colour).sum(), colour_mask(hidden, scene.colour).sum()
        fractions.append(after / before)
    assert 0.55 < min(fractions) and np.median(fractions) < 0.97  # part hidden, most of the object still shown
    assert max(fractions) <= 1.05


def test_coverage_marks_the_captions_objects_in_the_very_image_render_draws():
    occluded = WorldConfig(occlusion=1.0)  # clutter and an occluder on every image: neither is an object
    for i, scene in enumerate(generate_scenes(40, seed=8, config=occluded)):
        image, coverage = world.render_with_coverage(scene, np.random.default_rng(i), config=occluded)
        assert image.tobytes() == render(scene, np.random.default_rng(i), config=occluded).tobytes()
        assert coverage.shape == (56, 56) and coverage.dtype == np.float32
        assert 0 <= coverage.min() and coverage.max() <= 1
        # every fully covered pixel shows an object's palette colour (give or take the pixel noise), and nearly
        # every pixel of an object's colour is covered: clutter and the occluder are dull, never palette colours
        shown = objects_mask(image, scene)
        assert shown[coverage == 1].mean() > 0.95
        assert (coverage[shown] > 0).mean() > 0.95
    # a large circle alone (diameter 0.4 of the side, +-10 %): its coverage sums to its area, pi d^2 / 4
    config = WorldConfig(**CLEAN)
    image, coverage = world.render_with_coverage(LARGE_RED_CIRCLE_LEFT, np.random.default_rng(0), config=config)
    side = 56
    assert np.pi / 4 * (0.36 * side) ** 2 < coverage.sum() < np.pi / 4 * (0.44 * side) ** 2
    assert abs(coverage.sum() - colour_mask(image, "red").sum()) < 0.1 * coverage.sum()


def test_covered_pairs_are_generate_pairs_with_their_coverage():
    config = WorldConfig()
    pairs = generate_pairs(6, seed=5, config=config)
    covered = world.generate_covered_pairs(6, seed=5, config=config)
    for (scene, image, caption), (covered_scene, covered_image, covered_caption, cover) in zip(pairs, covered):
        assert (covered_scene, covered_caption) == (scene, caption)
        assert covered_image.tobytes() == image.tobytes()
        assert objects_mask(image, scene)[cover == 1].mean() > 0.95


def test_examples_rotate_scene_kinds_and_are_the_seeds_own_images():
    config = WorldConfig()
    chosen = world.example_pairs(8, seed=4, config=config)
    assert [scene.kind for scene, _, _ in chosen] == ["single", "pair", "group"] * 2 + ["single", "pair"]
    stream = generate_pairs(200, seed=4, config=config)
    index = 0
    for scene, image, caption in chosen:  # each example is the next scene of its kind in the seed's stream
        while stream[index][0].kind != scene.kind:
            index += 1
        assert (stream[index][0], stream[index][1].tobytes(), stream[index][2]) == (scene, image.tobytes(), caption)
        index += 1
    assert [s for s, _, _ in world.example_pairs(8, seed=4, config=config)] == [s for s, _, _ in chosen]
    only_pairs = WorldConfig(kind_probs=(0.0, 1.0, 0.0))
    assert {scene.kind for scene, _, _ in world.example_pairs(3, seed=4, config=only_pairs)} == {"pair"}


# Scoring


def test_scores_on_hand_made_cases():
    scenes = [
        LARGE_RED_CIRCLE_LEFT,
        RED_CIRCLE_LEFT_OF_BLUE_SQUARE,
        Scene("group", "green", "triangle", count=3),
        Scene("single", "white", "square", size="small", position="top"),
    ]
    predictions = [
        "a small red circle on the left",  # size wrong: 4 of 5
        "a blue square to the right of a red circle",  # a paraphrase: 4 of 4
        "two green triangles",  # count wrong: 3 of 4
        "a white square somewhere",  # unparseable: 0 of 5
    ]
    assert scene_accuracy(predictions, scenes) == 0.25
    assert attribute_accuracy(predictions, scenes) == pytest.approx({
        "type": 0.75, "colour": 0.75, "shape": 0.75, "size": 0.0, "position": 0.5, "relation": 1.0,
        "count": 0.0, "overall": 11 / 18})


def test_pair_attributes_follow_the_objects_positions_not_the_mention_order():
    truth = [RED_CIRCLE_LEFT_OF_BLUE_SQUARE] * 3
    predictions = [
        "a blue square to the left of a red circle",  # objects swapped: relation axis right only
        "a red circle above a blue square",  # objects right, axis wrong
        "a red square on the left and a blue circle on the right",  # shapes bound to the wrong colours
    ]
    scores = attribute_accuracy(predictions, truth)
    assert scores == pytest.approx({"type": 1.0, "colour": 2 / 3, "shape": 1 / 3, "relation": 2 / 3,
                                    "overall": (3 + 2 + 1 + 2) / 12})
    assert scene_accuracy(predictions, truth) == 0.0


def test_scoring_refuses_mismatched_lengths():
    with pytest.raises(ValueError, match="one prediction per scene"):
        scene_accuracy(["a red circle"], [])
    with pytest.raises(ValueError, match="one prediction per scene"):
        attribute_accuracy(["x", "y"], [LARGE_RED_CIRCLE_LEFT])


def test_the_world_recorded_in_the_shipped_bundle_redraws_its_examples_pixel_for_pixel():
    """The shipped bundle's manifest records its world (world v2's features switched off by their config fields,
    which then draw no random numbers); its examples follow ``example_pairs``' rule, so that record and the seed
    redraw every example image and its caption exactly: the bundle is evaluated on the world it learned."""
    import json

    from capdemo.bundle import Bundle
    from training.shapes.world import example_pairs

    bundle = Bundle.load(REPO / "weights" / "shapes")
    config = WorldConfig.from_dict(bundle.manifest["training"]["recipe"]["world"])
    listed = json.loads((bundle.path / "examples" / "scenes.json").read_text())
    assert len(listed) == 8
    for entry, (scene, image, _) in zip(listed, example_pairs(len(listed), seed=config.test_seed + 1,
                                                               config=config)):
        assert entry["caption"] == captions(scene)[0]  # the scene's canonical caption
        shipped = np.asarray(Image.open(bundle.path / entry["file"]).convert("RGB"))
        assert np.array_equal(shipped, np.asarray(image)), entry["file"]
