"""What the app draws, as pure functions: the attention heatmap, the embedding plot, the gap histogram.

Nothing here loads a model or knows about Gradio: every function takes arrays
(or a PIL image) and returns a PIL image or a plotly figure, so each one is
tested on hand-made inputs. The numbers behind them are :mod:`capdemo.analysis`.

* :func:`attention_overlay` — the CLS attention over the ViT patch grid, drawn
  over the image with a colormap, and MacCap's picked patches outlined and
  numbered by rank.
* :func:`embedding_figure` — one scatter trace per group of embeddings, in one
  shared 2-D projection, so the modality gap (images on one side, texts on the
  other) and what each method does about it can be seen.
* :func:`gap_histogram_figure` — MacCap's Figure 1: per-dimension image - text
  differences, close to a zero-mean Gaussian.
"""

from __future__ import annotations

from dataclasses import dataclass
from collections.abc import Mapping, Sequence

import numpy as np
import plotly.graph_objects as go
from PIL import Image, ImageDraw, ImageFont

from capdemo.analysis import PROJECTIONS, PointGroup, pca_project, umap_project

# ---------------------------------------------------------------------------------------------------------------
# Heatmap

OUTLINE_RGB = (255, 48, 48)  # picked-patch outline and label box
LABEL_TEXT_RGB = (255, 255, 255)
OUTSIDE_GRID_DIM = 0.35  # brightness kept outside the square CLIP looked at (its centre crop)
# The attention is shown without recolouring the image (in the shapes world colour is often the answer): patches
# the CLS token ignored are veiled in one translucent hue, the attended ones stay clear. The veil's opacity runs
# from FOG_ALPHA[0] at the highest attention to FOG_ALPHA[1] at the lowest.
FOG_RGB = np.array([30, 41, 59], dtype=np.float64)  # slate: one hue, never a colour of the shapes world
FOG_ALPHA = (0.0, 0.72)
LEGEND_HEIGHT = 40  # pixels of the colour scale drawn under the image
DISPLAY_SIDE = 448  # longest side of the drawn image (legend excluded): small inputs enlarged, large ones shrunk


def fog_alpha(level: np.ndarray) -> np.ndarray:
    """Veil opacity for attention levels in [0, 1] (any shape): clear at 1, FOG_ALPHA[1] at 0."""
    level = np.clip(np.asarray(level, dtype=np.float64), 0.0, 1.0)
    return FOG_ALPHA[0] + (FOG_ALPHA[1] - FOG_ALPHA[0]) * (1.0 - level)


def center_square(size: tuple[int, int]) -> tuple[int, int, int, int]:
    """The centred square ``(left, top, right, bottom)`` of an image of ``size`` (W, H).

    CLIP's preprocessing resizes the shorter side and centre-crops, so this is
    the part of the image its patch grid covers.
    """
    width, height = size
    side = min(width, height)
    left, top = (width - side) // 2, (height - side) // 2
    return left, top, left + side, top + side


def grid_box(size: tuple[int, int], *, center_crop: bool = True) -> tuple[int, int, int, int]:
    """The part ``(left, top, right, bottom)`` of an image of ``size`` that the patch grid covers: the centre
    square for a tower that centre-crops (OpenAI CLIP), the whole image for one that squashes it (SigLIP2)."""
    return center_square(size) if center_crop else (0, 0, *size)


def cell_box(row: int, col: int, grid: tuple[int, int], box: tuple[int, int, int, int]) -> tuple[int, int, int, int]:
    """Pixel box ``(x0, y0, x1, y1)``, end-exclusive, of patch (row, col) of a (rows, cols) grid over ``box``."""
    rows, cols = grid
    left, top, right, bottom = box
    x0 = left + (right - left) * col // cols
    x1 = left + (right - left) * (col + 1) // cols
    y0 = top + (bottom - top) * row // rows
    y1 = top + (bottom - top) * (row + 1) // rows
    return x0, y0, x1, y1


def display_copy(image: Image.Image, *, side: int = DISPLAY_SIDE) -> Image.Image:
    """An RGB copy of ``image`` scaled so its longest side is ``side`` pixels (aspect ratio kept): enlarged with
    nearest-neighbour (a 32 px input keeps its crisp pixels), shrunk with Lanczos."""
    scale = side / max(image.size)
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    resample = Image.Resampling.NEAREST if scale >= 1 else Image.Resampling.LANCZOS
    return image.convert("RGB").resize(size, resample)


def attention_overlay(
    image: Image.Image,
    attention: np.ndarray,
    *,
    outlined: Sequence[tuple[int, int]] = (),
    side: int = DISPLAY_SIDE,
    center_crop: bool = True,
    legend: bool = True,
) -> Image.Image:
    """The patch attention over the part of ``image`` CLIP saw, its colours untouched: ignored patches veiled,
    attended ones clear; ``outlined`` patches boxed and numbered; a colour scale underneath.

    Args:
        image: the input image, any size; it is redrawn with its longest side ``side``.
        attention: (rows, cols) non-negative attention per patch (e.g. the head-averaged pooling attention of the
            last block); min-max scaled for the veil, so only the relative pattern is shown (the legend gives
            the actual range).
        outlined: (row, col) of the picked patches, best first; patch ``i`` of the list is labelled ``i + 1``.
        side: longest side of the image part in pixels.
        center_crop: the tower's preprocessing centre-crops (the grid covers the centre square); False: it
            squashes the whole image onto the grid (:attr:`capdemo.encoders.ClipEncoder.center_crops`).
        legend: draw the colour scale (LEGEND_HEIGHT pixels) under the image.

    Returns:
        A new RGB image. Outside the part the grid covers the image is dimmed.
    """
    grid = np.asarray(attention, dtype=np.float64)
    if grid.ndim != 2 or 0 in grid.shape or not np.isfinite(grid).all():
        raise ValueError(f"attention must be a finite (rows, cols) grid, got shape {grid.shape}")
    rows, cols = grid.shape
    for row, col in outlined:
        if not (0 <= row < rows and 0 <= col < cols):
            raise ValueError(f"patch ({row}, {col}) lies outside the {rows}x{cols} grid")

    canvas = display_copy(image, side=side)
    box = grid_box(canvas.size, center_crop=center_crop)
    left, top, right, bottom = box
    pixels = np.asarray(canvas, dtype=np.float64)  # (H, W, 3)
    shaded = pixels * OUTSIDE_GRID_DIM
    spread = grid.max() - grid.min()
    scaled = (grid - grid.min()) / spread if spread > 0 else np.ones_like(grid)  # (rows, cols) in [0, 1]
    level = np.asarray(Image.fromarray(scaled.astype(np.float32), mode="F").resize(
        (right - left, bottom - top), Image.Resampling.NEAREST), dtype=np.float64)  # (h, w): one level per patch
    alpha = fog_alpha(level)[..., None]  # (h, w, 1)
    shaded[top:bottom, left:right] = pixels[top:bottom, left:right] * (1.0 - alpha) + FOG_RGB * alpha
    result = Image.fromarray(np.rint(shaded).astype(np.uint8), mode="RGB")
    _outline_patches(result, outlined, grid=(rows, cols), box=box)
    if not legend:
        return result
    framed = Image.new("RGB", (result.width, result.height + LEGEND_HEIGHT), (255, 255, 255))
    framed.paste(result, (0, 0))
    _draw_legend(framed, top=result.height, low=float(grid.min()), high=float(grid.max()))
    return framed


def _draw_legend(canvas: Image.Image, *, top: int, low: float, high: float) -> None:
    """The colour scale under the image: the veil over a mid grey from the lowest to the highest attention."""
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default(size=12)
    margin, bar_height = 8, 12
    low_text, high_text = f"{low:.3f}", f"{high:.3f}"
    label = "pooling attention per patch (veiled = ignored)"
    bar_left = margin + int(draw.textlength(low_text, font=font)) + 6
    bar_right = canvas.width - margin - int(draw.textlength(high_text, font=font)) - 6
    width = max(2, bar_right - bar_left)
    ramp = np.linspace(0.0, 1.0, width)  # (w,)
    alpha = fog_alpha(ramp)[:, None]  # (w, 1)
    colours = np.full((width, 3), 190.0) * (1.0 - alpha) + FOG_RGB * alpha  # (w, 3)
    strip = np.repeat(np.rint(colours).astype(np.uint8)[None], bar_height, axis=0)  # (bar_height, w, 3)
    canvas.paste(Image.fromarray(strip, mode="RGB"), (bar_left, top + 6))
    text_y = top + 6 + (bar_height - 12) // 2
    draw.text((margin, text_y), low_text, fill=(55, 65, 81), font=font)
    draw.text((bar_right + 6, text_y), high_text, fill=(55, 65, 81), font=font)
    draw.text((bar_left, top + 6 + bar_height + 3), label, fill=(55, 65, 81), font=font)


def _outline_patches(
    canvas: Image.Image, outlined: Sequence[tuple[int, int]], *, grid: tuple[int, int], box: tuple[int, int, int, int]
) -> None:
    """Box each picked patch inside its own cell (so neighbours' outlines never merge) and write its rank."""
    draw = ImageDraw.Draw(canvas)
    cell_side = min((box[2] - box[0]) // grid[1], (box[3] - box[1]) // grid[0])
    width = max(1, cell_side // 16)
    font = ImageFont.load_default(size=max(8, min(16, cell_side // 3)))
    for rank, (row, col) in enumerate(outlined, start=1):
        x0, y0, x1, y1 = cell_box(row, col, grid, box)
        draw.rectangle((x0, y0, x1 - 1, y1 - 1), outline=OUTLINE_RGB, width=width)
        label = str(rank)
        text_left, text_top, text_right, text_bottom = draw.textbbox((0, 0), label, font=font)
        label_box = (x0, y0, x0 + text_right - text_left + 2 * width + 2, y0 + text_bottom - text_top + 2 * width + 2)
        draw.rectangle(label_box, fill=OUTLINE_RGB)
        draw.text((x0 + width + 1 - text_left, y0 + width + 1 - text_top), label, fill=LABEL_TEXT_RGB, font=font)


# ---------------------------------------------------------------------------------------------------------------
# Figures


@dataclass(frozen=True)
class TraceStyle:
    """How one kind of embedding is drawn."""

    color: str
    symbol: str
    size: int
    opacity: float = 0.9


# Styles of the point kinds of :class:`capdemo.analysis.PointGroup`, drawn in this order (background first).
# Image-side points are warm, caption-side points cool, the corpus grey, the corrected corpus amber.
KIND_STYLES: dict[str, TraceStyle] = {
    "corpus": TraceStyle("#9ca3af", "circle", 5, 0.45),
    "corpus corrected": TraceStyle("#f59e0b", "circle-open", 6, 0.7),
    "patches": TraceStyle("#fca5a5", "square", 6, 0.6),
    "region": TraceStyle("#dc2626", "diamond", 10),
    "image": TraceStyle("#7f1d1d", "star", 18, 1.0),
    "neighbours": TraceStyle("#0891b2", "triangle-up", 10),
    "candidates": TraceStyle("#7c3aed", "circle", 9),
}
FALLBACK_STYLE = TraceStyle("#10b981", "x", 8)
# Candidates of the second, third, ... method (by the order the methods ran) in their own colours.
METHOD_CANDIDATE_COLORS = ("#7c3aed", "#2563eb", "#059669", "#db2777")
FIGURE_HEIGHT = 620  # explicit: autosized plotly figures can render blank or tiny inside hidden tabs
# One template for light and dark pages: transparent backgrounds (the page's own colour shows through), grey grid
# lines at half opacity that read on either, and text in the page's text colour (the app's CSS sets it for the
# dark theme, where Gradio puts the ``dark`` class on the page).
THEME_TEMPLATE = go.layout.Template(layout={
    "paper_bgcolor": "rgba(0,0,0,0)", "plot_bgcolor": "rgba(0,0,0,0)",
    "font": {"color": "#374151"},
    "xaxis": {"gridcolor": "rgba(128,128,128,0.3)", "zerolinecolor": "rgba(128,128,128,0.5)"},
    "yaxis": {"gridcolor": "rgba(128,128,128,0.3)", "zerolinecolor": "rgba(128,128,128,0.5)"},
    "legend": {"bgcolor": "rgba(0,0,0,0)"},
})


def _style(group: PointGroup, method_order: Sequence[str]) -> TraceStyle:
    style = KIND_STYLES.get(group.kind, FALLBACK_STYLE)
    if group.kind == "candidates" and group.method in method_order:
        color = METHOD_CANDIDATE_COLORS[method_order.index(group.method) % len(METHOD_CANDIDATE_COLORS)]
        style = TraceStyle(color, style.symbol, style.size, style.opacity)
    return style


def embedding_figure(groups: Sequence[PointGroup], *, method: str = "pca", seed: int = 0) -> go.Figure:
    """Scatter of all embedding groups in one shared 2-D projection (so distances compare), one trace each.

    Groups are drawn in the order of ``KIND_STYLES`` (background first); empty groups are left out.
    ``method`` is "pca" or "umap"; ``seed`` is UMAP's random seed.
    """
    if method not in PROJECTIONS:
        raise ValueError(f"unknown projection {method!r}; choose one of {', '.join(PROJECTIONS)}")
    rank = {kind: i for i, kind in enumerate(KIND_STYLES)}
    drawn = sorted((g for g in groups if len(g.vectors)), key=lambda g: rank.get(g.kind, len(rank)))
    if not drawn:
        raise ValueError("nothing to plot: every embedding group is empty")
    stacked = np.concatenate([np.asarray(g.vectors, dtype=np.float64) for g in drawn])  # (n, D)
    projection = pca_project(stacked) if method == "pca" else umap_project(stacked, seed=seed)
    method_order = list(dict.fromkeys(g.method for g in groups if g.method))
    figure = go.Figure()
    start = 0
    for group in drawn:
        count = len(group.vectors)
        xy = projection.coords[start : start + count]
        start += count
        style = _style(group, method_order)
        texts = list(group.hover) or [f"{group.label} {i}" for i in range(count)]
        figure.add_trace(
            go.Scatter(
                x=xy[:, 0], y=xy[:, 1], mode="markers", name=group.label, text=texts,
                hovertemplate="%{text}<extra>" + group.label + "</extra>",
                marker={"color": style.color, "symbol": style.symbol, "size": style.size, "opacity": style.opacity},
            )
        )
    figure.update_layout(
        height=FIGURE_HEIGHT, template=THEME_TEMPLATE, margin={"l": 40, "r": 20, "t": 50, "b": 40},
        title=f"Embedding space ({method.upper()})",
        # under the plot, not beside it: a side legend leaves a phone's plot a narrow strip
        legend={"itemsizing": "constant", "orientation": "h", "yanchor": "top", "y": -0.15, "xanchor": "left", "x": 0},
        xaxis_title=projection.axis_titles[0], yaxis_title=projection.axis_titles[1],
    )
    return figure


HISTOGRAM_COLORS = ("#7f1d1d", "#dc2626", "#6b7280")


def gap_histogram_figure(differences: Mapping[str, np.ndarray]) -> go.Figure:
    """Overlaid histograms of per-dimension differences, each with its fitted normal curve (MacCap's Figure 1).

    Args:
        differences: legend name -> (D,) differences, e.g. ``image - caption`` per dimension for one pair,
            or ``mu_image - mu_text`` for the whole training distribution.
    """
    figure = go.Figure()
    for index, (name, values) in enumerate(differences.items()):
        values = np.asarray(values, dtype=np.float64).ravel()
        mean, std = float(values.mean()), float(values.std())
        color = HISTOGRAM_COLORS[index % len(HISTOGRAM_COLORS)]
        label = f"{name} (mean {mean:+.3f}, std {std:.3f})"
        figure.add_trace(
            go.Histogram(
                x=values, histnorm="probability density", name=label, opacity=0.55, marker_color=color,
                nbinsx=max(10, int(2 * np.sqrt(values.size))), legendgroup=name,
            )
        )
        if std > 0:
            grid = np.linspace(values.min(), values.max(), 200)
            density = np.exp(-0.5 * ((grid - mean) / std) ** 2) / (std * np.sqrt(2 * np.pi))
            figure.add_trace(
                go.Scatter(x=grid, y=density, mode="lines", line={"color": color, "dash": "dash"},
                           name=f"normal fit: {name}", legendgroup=name, showlegend=False, hoverinfo="skip")
            )
    figure.update_layout(
        height=FIGURE_HEIGHT - 120, template=THEME_TEMPLATE, barmode="overlay",
        margin={"l": 40, "r": 20, "t": 50, "b": 40}, title="Per-dimension modality gap",
        xaxis_title="image - text, per embedding dimension", yaxis_title="density",
        legend={"orientation": "h", "y": -0.25},
    )
    return figure
