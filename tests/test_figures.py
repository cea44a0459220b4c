"""capdemo.figures and capdemo.analysis's projections on hand-made inputs: heatmap geometry, projections, figures."""

import math
import sys
import types

import numpy as np
import plotly.graph_objects as go
import pytest
from PIL import Image

from capdemo import analysis, figures
from capdemo.analysis import PointGroup


def _is_outline(pixel) -> bool:
    return tuple(int(v) for v in pixel) == figures.OUTLINE_RGB


def _outlined_cells(picture: Image.Image, grid: tuple[int, int]) -> set[tuple[int, int]]:
    """Cells whose left and right edges (middle row, inside the cell) carry the outline colour."""
    pixels = np.asarray(picture)
    box = figures.center_square(picture.size)
    found = set()
    for row in range(grid[0]):
        for col in range(grid[1]):
            x0, y0, x1, y1 = figures.cell_box(row, col, grid, box)
            middle = (y0 + y1) // 2
            if _is_outline(pixels[middle, x0]) and _is_outline(pixels[middle, x1 - 1]):
                found.add((row, col))
    return found


def test_the_veil_is_clear_at_the_highest_attention_and_thickest_at_the_lowest():
    alpha = figures.fog_alpha(np.array([-1.0, 0.0, 0.5, 1.0, 2.0]))
    assert np.allclose(alpha, [figures.FOG_ALPHA[1], figures.FOG_ALPHA[1], sum(figures.FOG_ALPHA) / 2,
                               figures.FOG_ALPHA[0], figures.FOG_ALPHA[0]])


def test_cell_boxes_tile_the_grid_box_exactly():
    box = (10, 0, 110, 100)
    covered = np.zeros((100, 120), dtype=int)
    for row in range(7):
        for col in range(7):
            x0, y0, x1, y1 = figures.cell_box(row, col, (7, 7), box)
            covered[y0:y1, x0:x1] += 1
    assert (covered[:, 10:110] == 1).all() and covered[:, :10].sum() == 0 and covered[:, 110:].sum() == 0


def test_heatmap_outlines_exactly_the_given_patches_and_labels_them():
    image = Image.new("RGB", (64, 64), (128, 128, 128))
    picked = [(0, 1), (2, 3), (3, 0)]
    overlay = figures.attention_overlay(image, np.zeros((4, 4)), outlined=picked, side=256, legend=False)
    assert overlay.size == (256, 256) and overlay.mode == "RGB"
    assert _outlined_cells(overlay, (4, 4)) == set(picked)
    # each label box is drawn in the cell's top-left corner and holds white text
    pixels = np.asarray(overlay)
    for row, col in picked:
        x0, y0, x1, y1 = figures.cell_box(row, col, (4, 4), (0, 0, 256, 256))
        corner = pixels[y0 : y0 + 20, x0 : x0 + 14]
        assert (corner == figures.LABEL_TEXT_RGB).all(axis=-1).any()


def test_heatmap_keeps_the_image_colours_and_veils_only_the_ignored_patches():
    red = (220, 30, 30)
    image = Image.new("RGB", (32, 32), red)  # a red shape must stay red wherever the attention is high
    attention = np.zeros((2, 2))
    attention[1, 0] = 5.0
    overlay = figures.attention_overlay(image, attention, side=64)
    assert overlay.size == (64, 64 + figures.LEGEND_HEIGHT)  # the colour scale sits under the image
    pixels = np.asarray(overlay).astype(float)
    assert tuple(pixels[48, 16]) == red  # the attended patch is untouched: no recolouring
    veiled = np.asarray(red) * (1 - figures.FOG_ALPHA[1]) + figures.FOG_RGB * figures.FOG_ALPHA[1]
    assert np.abs(pixels[16, 48] - veiled).max() <= 1.0  # an ignored patch: the one-hue veil at full strength
    hue = np.argmax(pixels[16, 48])
    assert hue == 0  # still reddest in its red channel: the veil darkens, it does not change the hue
    legend = pixels[64:]
    assert legend.std() > 10  # the colour scale is drawn


def test_small_inputs_are_enlarged_with_nearest_neighbour():
    checker = Image.fromarray((np.indices((4, 4)).sum(0) % 2 * 255).astype(np.uint8)).convert("RGB")
    big = np.asarray(figures.display_copy(checker, side=64))
    assert set(np.unique(big)) == {0, 255}  # no blended edges
    assert (big[:16, :16] == 0).all() and (big[:16, 16:32] == 255).all()


def test_heatmap_grid_covers_the_centre_square_of_a_wide_image():
    image = Image.new("RGB", (200, 100), (200, 200, 200))
    overlay = figures.attention_overlay(image, np.ones((2, 2)), outlined=[(0, 0)], side=200, legend=False)
    assert overlay.size == (200, 100)
    assert figures.center_square(overlay.size) == (50, 0, 150, 100)
    pixels = np.asarray(overlay)
    assert _is_outline(pixels[25, 50]) and not _is_outline(pixels[25, 49])
    dimmed = round(200 * figures.OUTSIDE_GRID_DIM)
    assert (pixels[50, 10] == dimmed).all() and (pixels[50, 190] == dimmed).all()


def test_heatmap_refuses_patches_outside_the_grid_and_bad_grids():
    image = Image.new("RGB", (16, 16))
    with pytest.raises(ValueError, match="outside the 4x4 grid"):
        figures.attention_overlay(image, np.zeros((4, 4)), outlined=[(4, 0)])
    with pytest.raises(ValueError, match="finite"):
        figures.attention_overlay(image, np.full((4, 4), np.nan))


def test_pca_puts_points_on_a_line_on_the_first_axis():
    direction = np.array([3.0, -4.0, 0.0, 12.0]) / 13.0
    t = np.array([-2.0, -1.0, 0.5, 1.0, 3.0])
    points = np.array([1.0, 2.0, 3.0, 4.0]) + t[:, None] * direction
    projection = analysis.pca_project(points)
    assert projection.coords.shape == (5, 2)
    assert np.allclose(projection.coords[:, 1], 0.0, atol=1e-9)
    # distances along the line are kept, and the sign is fixed: direction's largest loading (12/13) is positive
    assert np.allclose(projection.coords[:, 0], t - t.mean())
    assert projection.axis_titles[0].startswith("PC1 (100%")
    flipped = analysis.pca_project(points[::-1])
    assert np.allclose(flipped.coords[::-1], projection.coords)


def test_pca_matches_the_covariance_eigenvectors():
    rng = np.random.default_rng(0)
    points = rng.normal(size=(40, 6)) * np.array([5.0, 3.0, 1.0, 0.5, 0.2, 0.1])
    coords = analysis.pca_project(points).coords
    centred = points - points.mean(0)
    values, vectors = np.linalg.eigh(np.cov(centred.T))
    top = vectors[:, ::-1][:, :2]
    assert np.allclose(np.abs(coords), np.abs(centred @ top), atol=1e-8)
    assert np.allclose(coords.var(0, ddof=1), values[::-1][:2])


def test_pca_of_a_single_point_is_the_origin():
    projection = analysis.pca_project(np.ones((1, 8)))
    assert projection.coords.shape == (1, 2) and not projection.coords.any()


class _FakeUMAP:
    """Stands in for umap.UMAP (whose first fit JIT-compiles for 10-40 s): records its settings."""

    seen: dict = {}

    def __init__(self, **settings):
        _FakeUMAP.seen = settings

    def fit_transform(self, data):
        return data[:, :2] * 2.0


def test_umap_projection_asks_umap_for_a_seeded_cosine_2d_fit(monkeypatch):
    monkeypatch.setitem(sys.modules, "umap", types.SimpleNamespace(UMAP=_FakeUMAP))
    points = np.arange(24, dtype=float).reshape(6, 4)
    projection = analysis.umap_project(points, seed=7)
    assert np.array_equal(projection.coords, points[:, :2] * 2.0)
    assert projection.axis_titles == ("UMAP 1", "UMAP 2")
    settings = _FakeUMAP.seen
    assert settings["n_components"] == 2 and settings["metric"] == "cosine" and settings["random_state"] == 7
    assert settings["n_neighbors"] == 5  # clipped to n - 1 for small sets
    analysis.umap_project(np.zeros((40, 4)))
    assert _FakeUMAP.seen["n_neighbors"] == analysis.UMAP_MAX_NEIGHBOURS
    with pytest.raises(ValueError, match="at least"):
        analysis.umap_project(np.ones((analysis.UMAP_MIN_POINTS - 1, 8)))


def test_embedding_figure_has_one_trace_per_non_empty_group_in_one_projection():
    rng = np.random.default_rng(1)
    groups = [
        PointGroup("mystery", "something new", rng.normal(size=(2, 8)), ["m1", "m2"]),
        PointGroup("candidates", "MacCap candidates", rng.normal(size=(4, 8)), ["a", "b", "c", "d"], method="maccap"),
        PointGroup("neighbours", "TOMCap retrieved neighbours", np.zeros((0, 8)), [], method="tomcap"),
        PointGroup("candidates", "TOMCap candidates", rng.normal(size=(3, 8)), ["x", "y", "z"], method="tomcap"),
        PointGroup("image", "global image embedding", rng.normal(size=(1, 8)), ["img"]),
    ]
    figure = figures.embedding_figure(groups)
    assert isinstance(figure, go.Figure)
    names = [trace.name for trace in figure.data]
    # known kinds first in style order (groups of one kind in the given order), unknown kinds after, empty dropped
    assert names == ["global image embedding", "MacCap candidates", "TOMCap candidates", "something new"]
    assert list(figure.data[1].text) == ["a", "b", "c", "d"]
    assert figure.data[1].marker.color != figure.data[2].marker.color  # each method's candidates its own colour
    stacked = np.concatenate([groups[4].vectors, groups[1].vectors, groups[3].vectors, groups[0].vectors])
    expected = analysis.pca_project(stacked).coords
    got = np.concatenate([np.column_stack([t.x, t.y]) for t in figure.data])
    assert np.allclose(got, expected)
    assert figure.layout.height == figures.FIGURE_HEIGHT
    with pytest.raises(ValueError, match="unknown projection"):
        figures.embedding_figure(groups, method="tsne")
    with pytest.raises(ValueError, match="empty"):
        figures.embedding_figure([PointGroup("image", "image", np.zeros((0, 8)), [])])


def test_gap_histogram_has_a_histogram_and_normal_fit_per_series():
    values = np.array([-0.25, -0.125, 0.0, 0.125, 0.25, 0.0]) + 0.5
    figure = figures.gap_histogram_figure({"image - caption": values, "flat": np.zeros(4)})
    kinds = [type(trace).__name__ for trace in figure.data]
    assert kinds == ["Histogram", "Scatter", "Histogram"]  # a constant series gets no fit curve
    assert f"mean +0.500, std {values.std():.3f}" in figure.data[0].name
    curve = figure.data[1]
    reach = 0.25 / values.std()  # the curve spans min..max: +-reach standard deviations
    assert np.isclose(np.trapezoid(curve.y, curve.x), math.erf(reach / math.sqrt(2)), atol=1e-3)


def test_a_squashing_tower_covers_the_whole_image():
    assert figures.grid_box((200, 100)) == (50, 0, 150, 100)
    assert figures.grid_box((200, 100), center_crop=False) == (0, 0, 200, 100)
    picture = Image.new("RGB", (200, 100), (200, 200, 200))
    grid = np.ones((2, 2))
    cropped = np.asarray(figures.attention_overlay(picture, grid, side=200))
    squashed = np.asarray(figures.attention_overlay(picture, grid, side=200, center_crop=False))
    assert (cropped[50, 10] < 200).all()  # outside the centre square: dimmed
    assert not np.array_equal(squashed[50, 10], cropped[50, 10])  # covered by the heatmap instead
