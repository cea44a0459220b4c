"""Training you can look at: the loss and learning-rate curves of a run, as a plotly HTML page and in TensorBoard.

:func:`write_curves` draws a run's history (the loop's ``history.json`` entries: step, loss, lr, grad_norm; and
its evaluations) into one self-contained HTML file beside the history, ``curves.html``, which opens offline in
any browser (plotly.js is embedded: ~5 MB). No PNG: that needs kaleido or matplotlib, which capdemo does not
depend on.

:func:`tensorboard_writer` opens a ``torch.utils.tensorboard`` writer for ``TrainConfig.tensorboard_dir``;
tensorboard is an optional extra (``pip install 'capdemo[tensorboard]'``), and without it the error is one line
that says so.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from capdemo.fileio import atomic_output

CURVES_FILE = "curves.html"  # written beside history.json in a run folder
# What each training-history row of the plot shows: (history key, axis title).
TRAIN_PANELS = (("loss", "training loss"), ("lr", "learning rate"), ("grad_norm", "gradient norm"))
PANEL_HEIGHT = 260  # pixels per row of the figure


class TensorBoardUnavailableError(RuntimeError):
    """TensorBoard logging was asked for, but the tensorboard package is not installed."""


def curves_figure(history: Sequence[Mapping[str, float]], evaluations: Sequence[Mapping[str, float]] = (),
                  *, title: str = "training curves") -> Any:
    """A plotly figure: one row per TRAIN_PANELS entry against the step, plus a row of evaluation metrics if any."""
    from plotly.subplots import make_subplots
    import plotly.graph_objects as go

    metrics = sorted({key for entry in evaluations for key in entry if key != "step"})
    titles = [label for _, label in TRAIN_PANELS] + (["evaluation"] if metrics else [])
    figure = make_subplots(rows=len(titles), cols=1, shared_xaxes=True, subplot_titles=titles, vertical_spacing=0.06)
    steps = [entry["step"] for entry in history]
    for row, (key, label) in enumerate(TRAIN_PANELS, start=1):
        figure.add_trace(go.Scatter(x=steps, y=[entry.get(key) for entry in history], mode="lines", name=label),
                         row=row, col=1)
        figure.update_yaxes(title_text=label, row=row, col=1)
    for metric in metrics:
        rows = [entry for entry in evaluations if metric in entry]
        figure.add_trace(go.Scatter(x=[entry["step"] for entry in rows], y=[entry[metric] for entry in rows],
                                    mode="lines+markers", name=metric), row=len(titles), col=1)
    figure.update_xaxes(title_text="optimizer step", row=len(titles), col=1)
    figure.update_layout(title=title, height=PANEL_HEIGHT * len(titles), hovermode="x unified")
    return figure


def write_curves(path: str | Path, history: Sequence[Mapping[str, float]],
                 evaluations: Sequence[Mapping[str, float]] = (), *, title: str = "training curves") -> Path:
    """Write the run's curves to ``path`` (atomically: a reader never sees half a page); returns the path."""
    page = curves_figure(history, evaluations, title=title).to_html(include_plotlyjs=True, full_html=True)
    path = Path(path)
    with atomic_output(path) as temp:
        temp.write_text(page, encoding="utf-8")
    return path


def require_tensorboard() -> type:
    """``torch.utils.tensorboard.SummaryWriter``, or TensorBoardUnavailableError (one line) when tensorboard is
    not installed: call it before any work that a missing package would waste (the loop does, on every rank)."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise TensorBoardUnavailableError(
            "TensorBoard logging needs the tensorboard package: pip install 'capdemo[tensorboard]'"
            " (or leave out the TensorBoard directory)") from None
    return SummaryWriter


def tensorboard_writer(log_dir: str | Path, *, purge_step: int | None = None) -> Any:
    """A ``SummaryWriter`` logging to ``log_dir``; ``purge_step`` (the first step a resumed run logs) drops the
    events a killed run logged from that step on, so the curves do not double back."""
    return require_tensorboard()(log_dir=str(log_dir), purge_step=purge_step)
