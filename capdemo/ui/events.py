"""The app's event functions over one loaded :class:`~capdemo.pipeline.Captioner`.

Each returns a plain view (:mod:`capdemo.ui.views`), so tests call them directly and the HTTP API
serves the same values. Model work goes through the Captioner, numbers through
:mod:`capdemo.analysis`, drawing through :mod:`capdemo.figures`; nothing here runs a model or
names a method: every method in the bundle is handled the same way.

Errors stay where they happen: a visitor's mistake in Caption or Ask (no image, no method ticked, an
empty question, a corrupt upload) is a one-line message where the output goes, never a traceback in
the server log; a method that fails shows its reason where its caption goes while the other methods'
results stay. Embedding and Batch turn mistakes into a one-line ``gr.Error``. Anything unexpected is
logged once with its traceback and reaches the page only as "internal error while ...: <type>".
"""

from __future__ import annotations

import csv
import functools
import json
import logging
import shutil
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from collections.abc import Callable, Sequence

import gradio as gr
import numpy as np
import pandas as pd
from PIL import Image

from capdemo import analysis, figures
from capdemo.domain import Domain
from capdemo.my_captions import MyCaptions, read_input
from capdemo.ui.about import about_markdown
from capdemo.config import Config
from capdemo.images import load_image
from capdemo.methods.base import Encoded
from capdemo.pipeline import Captioner
from capdemo.result import Result
from capdemo.ui.views import (
    BatchView, CaptionView, EmbeddingOutputs, MethodView, MyCaptionsView, SessionResults, VQAView, candidates_table,
    neighbours_table, timings_table,
)

log = logging.getLogger(__name__)

BATCH_FIELDS = ("caption", "clip_score")  # per-method columns of the Batch table and downloads


@dataclass
class AppConfig(Config):
    """Serving limits of the app (decoding defaults come from the bundle, not from here)."""

    concurrency_limit: int = 1  # model events run at once: one copy of the models on one device
    max_queue_size: int = 16  # waiting requests beyond which new ones are told the app is busy
    max_upload_pixels: int = 25_000_000  # larger uploads are refused from the header, before decoding
    max_batch_images: int = 32  # images per Batch request
    batch_chunk: int = 8  # images per pipeline call in Batch (one progress step each)
    kept_downloads: int = 8  # Batch CSV/JSON pairs kept on disk for download; older ones are deleted
    cache_max_age_s: int = 3600  # Gradio's copies of uploads, heatmaps and downloads older than this are deleted
    vqa_top_k: int = 10  # candidate answers listed by Ask


def one_line(text: object) -> str:
    return " ".join(str(text).split())


def user_facing(action: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Turn an event function's exceptions into messages fit for the page.

    ``ValueError`` (bad images, settings, questions, bundles: the project's one-line errors all
    derive from it) shows its message; anything else is logged with its traceback and shown only
    as its type.
    """

    def decorate(fn: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(fn)
        def event(*args: Any, **kwargs: Any) -> Any:
            try:
                return fn(*args, **kwargs)
            except gr.Error:
                raise
            except ValueError as err:  # the visitor's mistake: a message, and nothing in the server log
                raise gr.Error(one_line(err) or f"invalid input while {action}", print_exception=False) from None
            except Exception as err:  # ours: its traceback logged once, here, and not again by Gradio
                log.exception("internal error while %s", action)
                raise gr.Error(f"internal error while {action}: {type(err).__name__}", print_exception=False) from None

        return event

    return decorate


def attention_grid(encoded: Encoded, index: int = 0) -> np.ndarray:
    """Head-averaged last-block pooling attention (the CLS token's, or the patch mean's) over the patch grid of
    image ``index``: (rows, cols)."""
    features = encoded.features
    over_patches = features.cls_attention_mean[index, features.num_prefix_tokens :]  # (N_p,)
    return over_patches.float().cpu().numpy().reshape(features.grid_size)


class CaptionDemo:
    """The app's event functions over one loaded Captioner."""

    def __init__(self, captioner: Captioner, *, config: AppConfig | None = None):
        self.captioner = captioner
        self.config = config or AppConfig()
        self.labels = {name: method.label for name, method in captioner.methods.items()}
        self.domain = Domain.from_manifest(captioner.bundle.manifest)  # None: the bundle records no domain
        self._downloads = Path(tempfile.mkdtemp(prefix="capdemo-downloads-"))
        self._download_count = 0
        self._download_lock = threading.Lock()

    # --- helpers -------------------------------------------------------------------------------------------------

    def load(self, image: Any) -> Image.Image:
        if image is None or (isinstance(image, str) and not image):
            raise ValueError("no image: upload one or pick an example first")
        return load_image(image, max_pixels=self.config.max_upload_pixels)

    def chosen_methods(self, methods: Sequence[str] | str | None) -> list[str]:
        """The requested methods in the bundle's order; one the bundle lacks is a one-line error."""
        requested = [methods] if isinstance(methods, str) else list(methods or [])
        if not requested:
            raise ValueError(f"no method chosen: tick {' or '.join(self.labels.values())}")
        for name in requested:
            self.captioner.method(name)
        return [name for name in self.captioner.methods if name in requested]

    def complete_results(
        self, encoded: Encoded, session: SessionResults | None, progress: Any
    ) -> tuple[dict[str, Result], SessionResults]:
        """This image's results from the session, captioning with the bundle defaults where a method is missing."""
        key = encoded.keys[0]
        results = (session or SessionResults()).for_image(key)
        missing = [m for m in self.captioner.methods if m not in results]
        for i, method in enumerate(missing):
            progress((i, len(missing)), desc=f"{self.labels[method]}: captioning with the bundle's defaults")
            results[method] = self.captioner.caption(encoded, method)[0]
        return results, SessionResults(key=key, results=results)

    def _run_method(self, encoded: Encoded, method: str, settings: dict[str, Any], stores: Any = None) -> Result | str:
        """One method's result, or the one-line reason it failed (its settings, or an internal error)."""
        label = self.labels[method]
        try:
            store = stores.store_for(self.captioner.methods[method]) if stores is not None else None
            return self.captioner.caption(encoded, method, store=store, **settings)[0]
        except ValueError as err:
            return f"{label}: {one_line(err)}"
        except Exception as err:  # one method's crash must not take the others' results with it
            log.exception("internal error while captioning with %s", label)
            return f"{label}: internal error ({type(err).__name__})"

    # --- events --------------------------------------------------------------------------------------------------

    @user_facing("captioning")
    def caption_event(self, image: Any, methods: Sequence[str] | str | None,
                      settings: dict[str, dict[str, Any]] | None = None, session: SessionResults | None = None,
                      progress: gr.Progress = gr.Progress(), stores: Any = None) -> CaptionView:
        """Caption one image with the chosen methods (``settings``: per method, the values to change).

        Nothing a visitor can do raises: no image, no method ticked or a bad upload is a one-line message where
        every method's caption goes; a method whose settings fail shows its message while the others' results
        stay. ``stores``: the session's own caption stores (:mod:`capdemo.ui.my_captions`), for the methods that
        retrieve.
        """
        try:
            chosen = self.chosen_methods(methods)
            picture = self.load(image)
        except ValueError as err:
            return CaptionView.failed(list(self.captioner.methods), one_line(err), session)
        settings = settings or {}
        progress(0.05, desc="Encoding the image")
        try:
            encoded = self.captioner.encode([picture])
        except Exception as err:  # an internal error: logged once, shown in place
            log.exception("internal error while encoding an image")
            return CaptionView.failed(list(self.captioner.methods),
                                      f"internal error while captioning: {type(err).__name__}", session)
        results: dict[str, Result] = {}
        views = {name: MethodView() for name in self.captioner.methods}
        for i, method in enumerate(chosen):
            progress((i, len(chosen)), desc=f"{self.labels[method]}: sampling, decoding, reranking")
            outcome = self._run_method(encoded, method, settings.get(method, {}), stores)
            if isinstance(outcome, str):
                views[method] = MethodView(error=outcome)
                continue
            results[method] = outcome
            views[method] = MethodView(caption=outcome.caption, candidates=candidates_table(outcome),
                                       neighbours=neighbours_table(outcome))
        attention = attention_grid(encoded)
        outlined = next(([(p.row, p.col) for p in r.patches] for r in results.values() if r.patches), [])
        best = {method: result.candidates[0].clip_score for method, result in results.items() if result.candidates}
        return CaptionView(
            methods=views,
            heatmap=figures.attention_overlay(picture, attention, outlined=outlined,
                                              center_crop=self.captioner.encoder.center_crops),
            timings=timings_table(results, self.labels),
            details={
                "grid": list(attention.shape),
                "image_size": list(picture.size),
                "results": {method: result.to_json() for method, result in results.items()},
                "errors": {method: view.error for method, view in views.items() if view.error},
            },
            session=SessionResults(key=encoded.keys[0], results=results),
            notice=self.domain.warning(best) if self.domain else "",
        )

    @user_facing("answering the question")
    def vqa_event(
        self, image: Any, question: str, session: SessionResults | None = None, progress: gr.Progress = gr.Progress()
    ) -> VQAView:
        """Answer a question about the image: the caption -> the LM -> the nearest candidate answers.

        A visitor's mistake (no image, an empty or too long question) is the answer box's one-line message."""
        progress(0.0, desc="Reading the image")
        try:
            picture = self.load(image)
            encoded = self.captioner.encode([picture])
            method = self.captioner.vqa_method
            shown = (session or SessionResults()).for_image(encoded.keys[0]).get(method.name) if method else None
            progress(0.2, desc="Answering" if shown else "Captioning and answering")
            result = self.captioner.answer(encoded, question, top_k=self.config.vqa_top_k,
                                           caption=shown.caption if shown else None)
        except ValueError as err:
            return VQAView.failed(one_line(err))
        top = pd.DataFrame(
            [(rank, round(score, 4), text) for rank, (text, score) in enumerate(result.top_answers, start=1)],
            columns=["rank", "score", "answer"],
        )
        return VQAView(answer=result.answer, top_answers=top, generated=result.generated, caption=result.caption,
                       prompt=result.prompt)

    @user_facing("drawing the embedding space")
    def embedding_event(
        self, image: Any, projection: str, session: SessionResults | None = None, progress: gr.Progress = gr.Progress()
    ) -> EmbeddingOutputs:
        """Where this image, its patches and regions, its captions and the corpus sit in CLIP space.

        A visitor's mistake (no image, an unknown projection) is a one-line ``message``; the plots already shown
        stay."""
        try:
            if projection not in analysis.PROJECTIONS:
                raise ValueError(f"unknown projection {projection!r}; choose one of {', '.join(analysis.PROJECTIONS)}")
            picture = self.load(image)
        except ValueError as err:
            return EmbeddingOutputs(projection=None, gap_histogram=None, gap_table=None, session=session,
                                    message=f"⚠ {one_line(err)}")
        encoded = self.captioner.encode([picture])
        results, session = self.complete_results(encoded, session, progress)
        progress(0.9, desc="Projecting" + (" (UMAP compiles on its first run)" if projection == "umap" else ""))
        view = analysis.embedding_view(encoded.features.select([0]), results, self.labels,
                                       corpus=self.captioner.corpus_sample(),
                                       gap_stats=self.captioner.shared("gap_stats"))
        figure = figures.embedding_figure(view.groups, method=projection)
        histogram = figures.gap_histogram_figure(view.differences)
        table = pd.DataFrame([(name, round(value, 4)) for name, value in view.table.items()],
                             columns=["quantity", "value"])
        return EmbeddingOutputs(projection=figure, gap_histogram=histogram, gap_table=table, session=session)

    @user_facing("captioning the batch")
    def batch_event(self, files: list[Any] | None, progress: gr.Progress = gr.Progress()) -> BatchView:
        """Caption several images with every method: a table plus CSV and JSON downloads."""
        paths = [str(getattr(f, "name", f)) for f in (files or [])]
        if not paths:
            raise ValueError("no images: add one or more image files")
        if len(paths) > self.config.max_batch_images:
            raise ValueError(f"{len(paths)} images; the limit per batch is {self.config.max_batch_images}")
        rows: list[dict[str, Any]] = [{"image": Path(p).name, "error": ""} for p in paths]
        methods = list(self.captioner.methods)
        size = self.config.batch_chunk
        chunks = [range(start, min(start + size, len(paths))) for start in range(0, len(paths), size)]
        steps, done = max(1, len(methods) * len(chunks)), 0
        for chunk in chunks:  # decoded a chunk at a time: 32 photos of 25 MP would hold ~2.4 GB at once
            pictures: list[tuple[int, Image.Image]] = []
            for index in chunk:
                try:
                    pictures.append((index, self.load(paths[index])))
                except ValueError as err:  # one bad file does not sink the batch
                    rows[index]["error"] = one_line(err)
            encoded = self.captioner.encode([picture for _, picture in pictures]) if pictures else None
            for method in methods:
                progress((done, steps), desc=f"{self.labels[method]}: images {chunk[0] + 1}-{chunk[-1] + 1}")
                if encoded is not None:
                    for (index, _), result in zip(pictures, self.captioner.caption(encoded, method)):
                        rows[index][f"{method} caption"] = result.caption
                        rows[index][f"{method} clip_score"] = round(result.candidates[0].clip_score, 4)
                done += 1
        columns = ["image", *(f"{m} {name}" for m in methods for name in BATCH_FIELDS), "error"]
        table = pd.DataFrame(rows, columns=columns).fillna("")
        csv_path, json_path = self.write_downloads(table)
        return BatchView(table=table, csv_path=str(csv_path), json_path=str(json_path))

    @user_facing("embedding your captions")
    def datastore_event(self, text: str | None, file: Any = None, progress: gr.Progress = gr.Progress()
                        ) -> MyCaptionsView:
        """Embed a visitor's own captions (pasted text, or an uploaded text file or JSON list) into a store for
        their session only; a one-line message for bad input (binary, not UTF-8, empty, over a limit)."""
        encoders = self.captioner.retrieval_encoders()
        if not encoders:
            return MyCaptionsView(message="⚠ no method of this bundle retrieves captions")
        try:
            captions = read_input(text, getattr(file, "name", file))
        except ValueError as err:
            return MyCaptionsView(message=f"⚠ {one_line(err)}")
        mine = MyCaptions.build(captions, encoders, progress=lambda step, desc: progress(step, desc=desc))
        with self._download_lock:
            self._download_count += 1
            number = self._download_count
            stale = self._downloads / f"my-captions-{number - self.config.kept_downloads}.zip"
            stale.unlink(missing_ok=True)
            shutil.rmtree(stale.with_suffix(""), ignore_errors=True)
        archive = mine.save_zip(self._downloads / f"my-captions-{number}.zip", encoders[0].name)
        return MyCaptionsView(message=f"{len(captions):,} captions of yours embedded (this session only); TOMCap "
                                      "retrieves from them when asked below.", mine=mine, archive=str(archive))

    def write_downloads(self, table: pd.DataFrame) -> tuple[Path, Path]:
        """Write the batch table as CSV and JSON; only the newest ``kept_downloads`` pairs stay on disk."""
        with self._download_lock:
            self._download_count += 1
            number = self._download_count
            for suffix in (".csv", ".json"):
                (self._downloads / f"captions-{number - self.config.kept_downloads}{suffix}").unlink(missing_ok=True)
        csv_path = self._downloads / f"captions-{number}.csv"
        json_path = self._downloads / f"captions-{number}.json"
        table.to_csv(csv_path, index=False, quoting=csv.QUOTE_NONNUMERIC)
        json_path.write_text(json.dumps(table.to_dict(orient="records"), indent=1, ensure_ascii=False) + "\n")
        return csv_path, json_path

    def about(self) -> tuple[str, dict[str, Any]]:
        """A readable summary of the loaded bundle (tables), and its description as data; neither names a folder
        of the server."""
        info = self.captioner.info()
        text = about_markdown(info, self.labels, self.domain.summary if self.domain else "")
        hidden = {"path", "file_entries"}  # the server's folder; the files are in the text already
        return text, {key: value for key, value in info.items() if key not in hidden}


__all__ = ["AppConfig", "CaptionDemo", "attention_grid", "one_line", "user_facing"]
