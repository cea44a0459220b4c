"""The Caption tab's output components (captions, candidate and neighbour tables, heatmap, timings, notice, JSON)
and how a :class:`~capdemo.ui.views.CaptionView` fills or empties them, in one fixed order."""

from __future__ import annotations

from typing import Any

import gradio as gr

from capdemo.pipeline import Captioner
from capdemo.ui.style import CANDIDATE_WIDTHS, NEIGHBOUR_WIDTHS
from capdemo.ui.views import CaptionView

RESULTS_ID = "caption-results"  # elem_id of the block holding every output below


class CaptionOutputs:
    """The Caption tab's output components and how a :class:`CaptionView` fills them, in order.

    A table without rows and an empty heatmap are not drawn (the CSS hides them), so nothing empty shows before a
    run; a new upload empties every output (:meth:`cleared`), so no result of an earlier image is ever shown next
    to a new one. Values stay plain (no visibility updates), so API clients get the tables themselves.
    """

    def __init__(self, captioner: Captioner):
        self.methods = list(captioner.methods)
        self.captions: dict[str, gr.Textbox] = {}
        self.candidates: dict[str, gr.Dataframe] = {}
        self.neighbours: dict[str, gr.Dataframe] = {}
        with gr.Column(elem_id=RESULTS_ID):  # one block, so a page can bring the results into view
            self.notice = gr.Markdown(elem_id="caption-notice", elem_classes=["capdemo-notice"])
            with gr.Row(equal_height=False):
                for name, method in captioner.methods.items():
                    with gr.Column(min_width=300):
                        self.captions[name] = gr.Textbox(label=f"{method.label} caption", elem_id=f"{name}-caption",
                                                         elem_classes=["capdemo-caption"], buttons=["copy"])
                        self.candidates[name] = gr.Dataframe(
                            label=f"{method.label} candidates (best first)", interactive=False, wrap=True,
                            column_widths=CANDIDATE_WIDTHS, elem_id=f"{name}-candidates",
                            elem_classes=["capdemo-table"])
                        if method.datastore is not None:
                            self.neighbours[name] = gr.Dataframe(
                                label=f"{method.label}: retrieved neighbour captions", interactive=False, wrap=True,
                                column_widths=NEIGHBOUR_WIDTHS, elem_id=f"{name}-neighbours",
                                elem_classes=["capdemo-table"])
            with gr.Row(equal_height=False):
                with gr.Column(min_width=300):
                    self.heatmap = gr.Image(label="Pooling attention; the picked patches outlined by rank", type="pil",
                                            show_label=False, buttons=[], interactive=False,
                                            elem_id="heatmap", elem_classes=["capdemo-heatmap"])
                with gr.Column(min_width=300):
                    self.timings = gr.Dataframe(label="Time per stage and image (ms)", interactive=False,
                                                elem_id="timings", elem_classes=["capdemo-table"])
            with gr.Accordion("Everything as JSON", open=False):
                self.details = gr.JSON(label="Caption details")

    def components(self) -> list[Any]:
        per_method = [c for name in self.methods
                      for c in (self.captions[name], self.candidates[name], self.neighbours.get(name)) if c is not None]
        return [*per_method, self.heatmap, self.timings, self.notice, self.details]  # details last (API users)

    def values(self, view: CaptionView) -> list[Any]:
        per_method = []
        for name in self.methods:
            result = view.methods[name]
            per_method += [result.shown, result.candidates]
            if name in self.neighbours:
                per_method.append(result.neighbours)
        return [*per_method, view.heatmap, view.timings, view.notice, view.details]

    def cleared(self) -> list[Any]:
        """Every output emptied (a new image was picked)."""
        per_method = []
        for name in self.methods:
            per_method += [""] + [None] * (1 + (name in self.neighbours))
        return [*per_method, None, None, "", None]


__all__ = ["RESULTS_ID", "CaptionOutputs"]
