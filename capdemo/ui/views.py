"""What the app's events return, as plain data: per-method views, tables and the session's results.

Each event function returns one of these views; :mod:`capdemo.ui.layout` flattens a view into the
page's output components, in their order, so tests read the views by name while Gradio and the
HTTP API see ordinary positional outputs.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import pandas as pd
from PIL import Image

from capdemo.result import Result

# Numbers first and the caption last: the caption column takes what width is left and wraps at words, so the
# scores stay in view however long the captions are (the widths are the layout's, in CANDIDATE_WIDTHS).
CANDIDATE_COLUMNS = ["#", "CLIP score", "chosen", "sample", "caption"]  # "#": the rank, best first
NEIGHBOUR_COLUMNS = ["#", "cosine", "store", "neighbour caption"]  # cosine with the retrieval query


@dataclass
class SessionResults:
    """One browser session's latest caption results, for the image with content hash ``key``."""

    key: str = ""
    results: dict[str, Result] = field(default_factory=dict)

    def for_image(self, key: str) -> dict[str, Result]:
        return dict(self.results) if key == self.key else {}


@dataclass
class MethodView:
    """What the Caption tab shows for one method: its caption (or the one-line reason it has none)."""

    caption: str = ""  # "" when the method was not run or failed
    error: str = ""  # one line when this method failed; the other methods' results still show
    candidates: pd.DataFrame = field(default_factory=lambda: candidates_table(None))
    neighbours: pd.DataFrame = field(default_factory=lambda: neighbours_table(None))

    @property
    def shown(self) -> str:
        """The caption box's text."""
        return f"⚠ {self.error}" if self.error else self.caption


@dataclass
class CaptionView:
    """Outputs of /caption."""

    methods: dict[str, MethodView]  # every loaded method, in registry order (empty views for those not run)
    heatmap: Image.Image | None  # CLS attention over the image, picked patches outlined; None: no image was read
    timings: pd.DataFrame  # method, stage, ms
    details: dict[str, Any]  # {"grid": [rows, cols], "image_size": [w, h], "results": {...}, "errors": {...}}
    session: SessionResults
    notice: str = ""  # one line about the image as a whole (e.g. it looks outside the bundle's domain)

    @classmethod
    def failed(cls, methods: Sequence[str], message: str, session: SessionResults | None = None) -> CaptionView:
        """Nothing could run (no image, no method ticked, ...): ``message`` where every method's caption goes."""
        return cls(methods={name: MethodView(error=message) for name in methods}, heatmap=None,
                   timings=timings_table({}, {}), details={"results": {}, "errors": dict.fromkeys(methods, message)},
                   session=session or SessionResults())


@dataclass
class VQAView:
    """Outputs of /vqa."""

    answer: str  # or "⚠ <one line>" when the question could not be answered
    top_answers: pd.DataFrame  # rank, score, answer; best first
    generated: str  # the LM's free-form answer, before matching the answer list
    caption: str  # the caption the prompt was built from
    prompt: str  # the exact text the LM continued

    @classmethod
    def failed(cls, message: str) -> VQAView:
        """No answer: ``message`` where the answer goes."""
        return cls(answer=f"⚠ {message}", top_answers=pd.DataFrame(columns=["rank", "score", "answer"]),
                   generated="", caption="", prompt="")


@dataclass
class EmbeddingOutputs:
    """Outputs of /embedding."""

    projection: Any  # plotly Figure: every embedding group in one shared 2-D projection (None: not drawn)
    gap_histogram: Any  # plotly Figure: per-dimension differences, with normal fits (None: not drawn)
    gap_table: pd.DataFrame | None  # quantity, value (None: not drawn)
    session: SessionResults | None
    message: str = ""  # one line when nothing could be drawn (the page keeps the plots it shows)


@dataclass
class MyCaptionsView:
    """Outputs of /datastore: a one-line status, the session's new store, and its download."""

    message: str
    mine: Any = None  # capdemo.my_captions.MyCaptions (None: nothing was built)
    archive: str | None = None  # zip of the store as a datastore folder


@dataclass
class BatchView:
    """Outputs of /batch."""

    table: pd.DataFrame  # image, "<method> caption", "<method> clip_score" per method, error
    csv_path: str
    json_path: str


def candidates_table(result: Result | None) -> pd.DataFrame:
    """Every candidate of a result in the result's order (best first), the chosen one marked."""
    rows = [(rank, round(c.clip_score, 4), "✓" if rank == 1 else "", c.sample, c.text)
            for rank, c in enumerate(result.candidates if result else [], start=1)]
    return pd.DataFrame(rows, columns=CANDIDATE_COLUMNS)


def neighbours_table(result: Result | None) -> pd.DataFrame:
    """The retrieved captions, most similar first, each with the store it came from."""
    rows = [(rank, round(n.score, 4), n.store, n.text)
            for rank, n in enumerate(result.neighbours if result else [], start=1)]
    return pd.DataFrame(rows, columns=NEIGHBOUR_COLUMNS)


def timings_table(results: dict[str, Result], labels: dict[str, str]) -> pd.DataFrame:
    rows = []
    for method, result in results.items():
        rows += [(labels[method], stage, round(ms, 1)) for stage, ms in result.timings_ms.items()]
        rows.append((labels[method], "total", round(sum(result.timings_ms.values()), 1)))
    return pd.DataFrame(rows, columns=["method", "stage", "ms"])


__all__ = [
    "BatchView", "CaptionView", "EmbeddingOutputs", "MethodView", "MyCaptionsView", "SessionResults", "VQAView",
    "candidates_table", "neighbours_table", "timings_table",
]
