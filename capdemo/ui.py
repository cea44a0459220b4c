"""The Gradio app: five tabs over one loaded :class:`capdemo.pipeline.Captioner`.

``build_app(weights)`` loads a bundle once and lays out the page. The event
functions live on :class:`CaptionDemo` and return plain data (strings, pandas
tables, PIL images, plotly figures, dicts), so tests call them directly and the
HTTP API (``/caption``, ``/vqa``, ``/embedding``, ``/batch``, ``/about``)
serves the same values. Model work goes through the Captioner, drawing through
:mod:`capdemo.analysis`; nothing here runs a model.

Each image goes through the vision tower once: the Captioner caches encodings
by image content, and each browser session keeps its latest caption results
(:class:`SessionResults`, a ``gr.State``), so Ask reuses the Caption tab's
caption and Embedding space plots the candidates that were shown.

Errors: a bad request (corrupt upload, empty question, out-of-range setting)
becomes a one-line ``gr.Error``; anything else is logged with its traceback on
the server and reaches the page only as "internal error while ...: <type>".
"""

from __future__ import annotations

import csv
import functools
import json
import logging
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, NamedTuple, Sequence

import gradio as gr
import numpy as np
import pandas as pd
from gradio.data_classes import FileData
from PIL import Image

from capdemo import analysis
from capdemo.config import Config
from capdemo.images import load_image
from capdemo.options import LIMITS, METHODS, CaptionOptions, check_method
from capdemo.pipeline import Captioner, Encoded
from capdemo.result import Result

log = logging.getLogger(__name__)

METHOD_LABELS = {"maccap": "MacCap", "tomcap": "TOMCap"}
PROJECTION_CHOICES = [("PCA", "pca"), ("UMAP (the first run compiles for ~10-30 s)", "umap")]
BATCH_FIELDS = ("caption", "clip_score")  # per-method columns of the Batch table and downloads
MODEL_CONCURRENCY_ID = "model"  # the queue group shared by every event that runs the models


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


# ---------------------------------------------------------------------------------------------------------------
# Errors and ZeroGPU


def _one_line(text: object) -> str:
    return " ".join(str(text).split())


def user_facing(action: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Turn an event function's exceptions into messages fit for the page.

    ``ValueError`` (bad images, settings, questions, bundles: the project's
    one-line errors all derive from it) shows its message; anything else is
    logged with its traceback and shown only as its type.
    """

    def decorate(fn: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(fn)
        def event(*args: Any, **kwargs: Any) -> Any:
            try:
                return fn(*args, **kwargs)
            except gr.Error:
                raise
            except ValueError as err:
                raise gr.Error(_one_line(err) or f"invalid input while {action}") from None
            except Exception as err:
                log.exception("internal error while %s", action)
                raise gr.Error(f"internal error while {action}: {type(err).__name__}") from None

        return event

    return decorate


def on_gpu(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``spaces.GPU(fn)`` on a Hugging Face ZeroGPU Space (where ``spaces`` is installed), else ``fn`` itself."""
    try:
        import spaces
    except ImportError:
        return fn
    return spaces.GPU(fn)


# ---------------------------------------------------------------------------------------------------------------
# Event outputs


@dataclass
class SessionResults:
    """One browser session's latest caption results, for the image with content hash ``key``."""

    key: str = ""
    results: dict[str, Result] = field(default_factory=dict)

    def for_image(self, key: str) -> dict[str, Result]:
        return dict(self.results) if key == self.key else {}


class CaptionView(NamedTuple):
    """Outputs of /caption, in the order of the page's output components (``session`` is not part of the API)."""

    maccap_caption: str  # "" when MacCap was not run
    tomcap_caption: str  # "" when TOMCap was not run
    maccap_candidates: pd.DataFrame  # rank, caption, CLIP score, chosen, sample; best first
    tomcap_candidates: pd.DataFrame
    heatmap: Image.Image  # CLS attention over the image; MacCap's picked patches outlined and numbered
    neighbours: pd.DataFrame  # TOMCap's retrieved captions with their similarity
    timings: pd.DataFrame  # method, stage, ms
    details: dict[str, Any]  # {"grid": [rows, cols], "image_size": [w, h], "results": {method: Result.to_json()}}
    session: SessionResults


class VQAView(NamedTuple):
    """Outputs of /vqa."""

    answer: str
    top_answers: pd.DataFrame  # rank, answer, score; best first
    generated: str  # the LM's free-form answer, before matching the answer list
    caption: str  # the caption the prompt was built from
    prompt: str  # the exact text the LM continued


class EmbeddingOutputs(NamedTuple):
    """Outputs of /embedding."""

    projection: Any  # plotly Figure: every embedding kind in one shared 2-D projection
    gap_histogram: Any  # plotly Figure: per-dimension differences image - caption, with normal fits
    gap_table: pd.DataFrame  # quantity, value: MacCap's Table 1 for this image, gap norm, std ratios
    session: SessionResults


class BatchView(NamedTuple):
    """Outputs of /batch."""

    table: pd.DataFrame  # image, "<method> caption", "<method> clip_score" per method, error
    csv_path: str
    json_path: str


def candidates_table(result: Result | None) -> pd.DataFrame:
    """Every candidate of a result in the result's order (best first), the chosen one marked."""
    rows = [
        (rank, c.text, round(c.clip_score, 4), "✓" if rank == 1 else "", c.sample)
        for rank, c in enumerate(result.candidates if result else [], start=1)
    ]
    return pd.DataFrame(rows, columns=["rank", "caption", "CLIP score", "chosen", "sample"])


def neighbours_table(result: Result | None) -> pd.DataFrame:
    rows = [(rank, n.text, round(n.score, 4)) for rank, n in enumerate(result.neighbours if result else [], start=1)]
    return pd.DataFrame(rows, columns=["rank", "neighbour caption", "similarity"])


def timings_table(results: dict[str, Result]) -> pd.DataFrame:
    rows = []
    for method, result in results.items():
        rows += [(METHOD_LABELS[method], stage, round(ms, 1)) for stage, ms in result.timings_ms.items()]
        rows.append((METHOD_LABELS[method], "total", round(sum(result.timings_ms.values()), 1)))
    return pd.DataFrame(rows, columns=["method", "stage", "ms"])


def attention_grid(encoded: Encoded, index: int = 0) -> np.ndarray:
    """Head-averaged last-block CLS attention over the patch grid of image ``index``: (rows, cols)."""
    features = encoded.features
    over_patches = features.cls_attention_mean[index, features.num_prefix_tokens :]  # (N_p,)
    return over_patches.float().cpu().numpy().reshape(features.grid_size)


def bundle_defaults(captioner: Captioner, method: str) -> CaptionOptions:
    """The decoding settings ``method``'s model was configured with (its fields only), to preset the sliders."""
    model = getattr(captioner, method)
    if model is None:
        return CaptionOptions()
    return CaptionOptions(**{name: getattr(model.config, name) for name in
                             ("samples", "beams", "noise_variance", "n_cr", "k", "max_new_tokens")
                             if hasattr(model.config, name)})


# ---------------------------------------------------------------------------------------------------------------
# Event functions


class CaptionDemo:
    """The app's event functions over one loaded Captioner."""

    def __init__(self, captioner: Captioner, *, config: AppConfig | None = None):
        self.captioner = captioner
        self.config = config or AppConfig()
        self._downloads = Path(tempfile.mkdtemp(prefix="capdemo-downloads-"))
        self._download_count = 0
        self._download_lock = threading.Lock()

    # --- helpers -------------------------------------------------------------------------------------------------

    def load(self, image: Any) -> Image.Image:
        if image is None or (isinstance(image, str) and not image):
            raise ValueError("no image: upload one or pick an example first")
        return load_image(image, max_pixels=self.config.max_upload_pixels)

    def chosen_methods(self, methods: Sequence[str] | str | None) -> list[str]:
        """The requested methods in canonical order; one the bundle lacks is a one-line error."""
        requested = [methods] if isinstance(methods, str) else list(methods or [])
        if not requested:
            raise ValueError("no method chosen: tick MacCap, TOMCap or both")
        for method in requested:
            check_method(method)
            if method not in self.captioner.methods:
                have = ", ".join(METHOD_LABELS[m] for m in self.captioner.methods)
                raise ValueError(f"this bundle has no {METHOD_LABELS[method]} model (it has: {have})")
        return [m for m in METHODS if m in requested]

    def complete_results(
        self, encoded: Encoded, session: SessionResults | None, progress: Any
    ) -> tuple[dict[str, Result], SessionResults]:
        """This image's results from the session, captioning with the bundle defaults where a method is missing."""
        key = encoded.keys[0]
        results = (session or SessionResults()).for_image(key)
        missing = [m for m in self.captioner.methods if m not in results]
        for i, method in enumerate(missing):
            progress((i, len(missing)), desc=f"{METHOD_LABELS[method]}: captioning with the bundle's defaults")
            results[method] = self.captioner.caption(encoded, method, CaptionOptions())[0]
        return results, SessionResults(key=key, results=results)

    # --- events --------------------------------------------------------------------------------------------------

    @user_facing("captioning")
    def caption_event(
        self,
        image: Any,
        methods: list[str],
        samples: float,
        beams: float,
        noise_variance: float,
        n_cr: float,
        k: float,
        max_new_tokens: float,
        seed: float,
        tomcap_beams: float | None = None,
        tomcap_max_new_tokens: float | None = None,
        session: SessionResults | None = None,
        progress: gr.Progress = gr.Progress(),
    ) -> CaptionView:
        """Caption one image with the chosen methods and show the evidence behind each caption.

        ``beams`` and ``max_new_tokens`` are MacCap's, ``tomcap_beams`` and ``tomcap_max_new_tokens``
        TOMCap's (None: the bundle's); the other settings belong to one method each.
        """
        chosen = self.chosen_methods(methods)
        maccap_options = CaptionOptions(
            samples=samples, beams=beams, noise_variance=noise_variance, n_cr=n_cr, k=k,
            max_new_tokens=max_new_tokens, seed=seed,
        ).validated()
        try:
            tomcap_options = maccap_options.replace(beams=tomcap_beams, max_new_tokens=tomcap_max_new_tokens).validated()
        except ValueError as err:
            raise ValueError(f"TOMCap {err}") from None
        per_method = {"maccap": maccap_options, "tomcap": tomcap_options}
        progress(0.0, desc="Reading the image")
        picture = self.load(image)
        progress(0.05, desc="Encoding the image")
        encoded = self.captioner.encode([picture])
        results: dict[str, Result] = {}
        for i, method in enumerate(chosen):
            progress((i, len(chosen)), desc=f"{METHOD_LABELS[method]}: sampling, decoding, reranking")
            results[method] = self.captioner.caption(encoded, method, per_method[method])[0]
        maccap, tomcap = results.get("maccap"), results.get("tomcap")
        attention = attention_grid(encoded)
        outlined = [(p.row, p.col) for p in maccap.patches] if maccap else []
        return CaptionView(
            maccap_caption=maccap.caption if maccap else "",
            tomcap_caption=tomcap.caption if tomcap else "",
            maccap_candidates=candidates_table(maccap),
            tomcap_candidates=candidates_table(tomcap),
            heatmap=analysis.attention_overlay(picture, attention, outlined=outlined,
                                               center_crop=self.captioner.encoder.center_crops),
            neighbours=neighbours_table(tomcap),
            timings=timings_table(results),
            details={
                "grid": list(attention.shape),
                "image_size": list(picture.size),
                "results": {method: result.to_json() for method, result in results.items()},
            },
            session=SessionResults(key=encoded.keys[0], results=results),
        )

    @user_facing("answering the question")
    def vqa_event(
        self, image: Any, question: str, session: SessionResults | None = None, progress: gr.Progress = gr.Progress()
    ) -> VQAView:
        """Answer a question about the image: MacCap's caption -> LM -> nearest candidate answers."""
        progress(0.0, desc="Reading the image")
        picture = self.load(image)
        encoded = self.captioner.encode([picture])
        shown = (session or SessionResults()).for_image(encoded.keys[0]).get("maccap")
        progress(0.2, desc="Answering" if shown else "Captioning and answering")
        result = self.captioner.answer(encoded, question, top_k=self.config.vqa_top_k,
                                       caption=shown.caption if shown else None)
        top = pd.DataFrame(
            [(rank, text, round(score, 4)) for rank, (text, score) in enumerate(result.top_answers, start=1)],
            columns=["rank", "answer", "score"],
        )
        return VQAView(answer=result.answer, top_answers=top, generated=result.generated, caption=result.caption,
                       prompt=result.prompt)

    @user_facing("drawing the embedding space")
    def embedding_event(
        self, image: Any, projection: str, session: SessionResults | None = None, progress: gr.Progress = gr.Progress()
    ) -> EmbeddingOutputs:
        """Where this image, its patches and regions, its captions and the corpus sit in CLIP space."""
        if projection not in analysis.PROJECTIONS:
            raise ValueError(f"unknown projection {projection!r}; choose one of {', '.join(analysis.PROJECTIONS)}")
        picture = self.load(image)
        encoded = self.captioner.encode([picture])
        results, session = self.complete_results(encoded, session, progress)
        progress(0.9, desc="Projecting" + (" (UMAP compiles on its first run)" if projection == "umap" else ""))
        view = self.captioner.embedding_view(encoded, results)
        figure = analysis.embedding_figure(view.points, hover=self.hover_texts(encoded, results), method=projection)
        histogram = analysis.gap_histogram_figure(gap_differences(view.points, view.gap))
        table = pd.DataFrame([(name, round(value, 4)) for name, value in view.table.items()],
                             columns=["quantity", "value"])
        return EmbeddingOutputs(projection=figure, gap_histogram=histogram, gap_table=table, session=session)

    def hover_texts(self, encoded: Encoded, results: dict[str, Result]) -> dict[str, list[str]]:
        """What each point of the embedding plot is, keyed like ``EmbeddingView.points``."""
        rows, cols = encoded.features.grid_size
        texts = {"image": ["global image embedding"],
                 "patches": [f"patch {i} (row {i // cols}, col {i % cols})" for i in range(rows * cols)]}
        for method, result in results.items():
            texts[f"{method} candidates"] = [f"{c.text} (CLIP {c.clip_score:.3f})" for c in result.candidates]
            texts[f"{method} neighbours"] = [f"{n.text} (sim {n.score:.3f})" for n in result.neighbours]
            texts[f"{method} region"] = [f"region {rank}: patch ({p.row}, {p.col})"
                                         for rank, p in enumerate(result.patches, start=1)]
        corpus, _ = self.captioner.corpus_sample()
        texts["corpus"] = list(corpus)
        texts["corpus corrected"] = [f"corrected: {text}" for text in corpus]
        return texts

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
                    rows[index]["error"] = _one_line(err)
            encoded = self.captioner.encode([picture for _, picture in pictures]) if pictures else None
            for method in methods:
                progress((done, steps), desc=f"{METHOD_LABELS[method]}: images {chunk[0] + 1}-{chunk[-1] + 1}")
                if encoded is not None:
                    for (index, _), result in zip(pictures, self.captioner.caption(encoded, method, CaptionOptions())):
                        rows[index][f"{method} caption"] = result.caption
                        rows[index][f"{method} clip_score"] = round(result.candidates[0].clip_score, 4)
                done += 1
        columns = ["image", *(f"{m} {name}" for m in methods for name in BATCH_FIELDS), "error"]
        table = pd.DataFrame(rows, columns=columns).fillna("")
        csv_path, json_path = self.write_downloads(table)
        return BatchView(table=table, csv_path=str(csv_path), json_path=str(json_path))

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
        """A readable summary of the loaded bundle, and its full description."""
        info = self.captioner.info()
        lines = [
            f"### Loaded bundle: `{info['name']}` ({info['world']} world)",
            info.get("description", ""),
            "",
            f"- **Methods:** {', '.join(METHOD_LABELS[m] for m in info['methods'])}",
            f"- **Components:** {', '.join(sorted(info['components']))}",
            f"- **Training:** {_one_line(json.dumps(info['training'])) if info['training'] else 'not recorded'}",
            f"- **Files:** {len(info['files'])}, each checked against its sha256 in `bundle.json` at load",
            f"- **Device:** {info['device']}",
            "",
            "**Loading another bundle:** `python app.py --weights path/to/bundle`, or "
            "`python app.py --weights hf-hub:org/name@revision` (pin the revision), or set `CAPDEMO_WEIGHTS`.",
        ]
        # "folder", not "path": gradio_client would take a dict with a "path" string for a file to download
        details = {("folder" if key == "path" else key): value for key, value in info.items()}
        return "\n".join(lines), details


def gap_differences(points: dict[str, np.ndarray], gap: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Per-dimension differences for the gap histogram: image - best caption (global, and each MacCap region),
    and the bundle's mean gap ``mu_image - mu_text``."""
    best = next((points[f"{m} candidates"][0] for m in METHODS if len(points.get(f"{m} candidates", ()))), None)
    differences = {}
    if best is not None:
        differences["global image - best caption"] = points["image"][0] - best
        if len(points.get("maccap region", ())):
            differences["MacCap regions - best caption"] = (points["maccap region"] - best).ravel()
    if gap:
        differences["bundle mean gap mu_image - mu_text"] = gap["mu_image"] - gap["mu_text"]
    return differences


# ---------------------------------------------------------------------------------------------------------------
# Layout


def image_input(**kwargs: Any) -> gr.Image:
    """A ``gr.Image`` whose uploads reach the events as file paths, unopened.

    Plain ``gr.Image`` opens the file with Pillow before the event runs, so a
    corrupt upload fails inside Gradio with its generic "Error"; this way
    :func:`capdemo.images.load_image` reads it and names the problem. It is not
    a subclass because Gradio writes a ``.pyi`` stub next to the module of every
    component subclass.
    """
    image = gr.Image(type="filepath", **kwargs)
    image.preprocess = uploaded_path  # Gradio calls the instance's preprocess for this component's inputs
    return image


def uploaded_path(payload: FileData | None) -> str | None:
    """The path of an uploaded file as Gradio stored it (None when nothing was uploaded)."""
    if payload is None:
        return None
    if payload.path is None:
        raise gr.Error("the upload arrived without a file; upload it again")
    return str(payload.path)


HEADER = """
# capdemo · text-only image captioning you can see into
**MacCap** (AAAI 2024) and **TOMCap** (CVPR 2026) caption images with language models trained on *captions alone*,
across CLIP's modality gap. Pick an image, then see which patches the attention chose, every candidate with its CLIP
rerank score, the retrieved neighbour captions, and where images and texts sit in the embedding space.
"""

SYSTEM_FONTS = ("ui-sans-serif", "system-ui", "sans-serif")
SYSTEM_MONO_FONTS = ("ui-monospace", "monospace")
CSS = """
.capdemo-caption textarea { font-size: 1.1rem !important; font-weight: 600; }
"""


MAX_UPLOAD_SIZE = "50mb"  # per file, enforced by Gradio before the upload reaches the app


def serve(demo: gr.Blocks, **launch_args: Any) -> Any:
    """``demo.launch`` with the app's theme, CSS and upload limit (Gradio 6 takes them at launch, not in ``Blocks``)."""
    theme = gr.themes.Soft(  # system fonts: the default web fonts would be fetched from Google, and the app is offline
        primary_hue="indigo", secondary_hue="pink", font=SYSTEM_FONTS, font_mono=SYSTEM_MONO_FONTS
    )
    return demo.launch(theme=theme, css=CSS, show_error=False, max_file_size=MAX_UPLOAD_SIZE, **launch_args)


def _slider(name: str, value: float | None, label: str, info: str, *, maximum: float | None = None) -> gr.Slider:
    low, high = LIMITS[name]
    high = min(high, maximum) if maximum is not None else high
    step = 0.001 if name == "noise_variance" else 1
    return gr.Slider(minimum=low, maximum=high, value=low if value is None else min(value, high), step=step,
                     label=label, info=info)


def create_blocks(captioner: Captioner, *, config: AppConfig | None = None, photos: Sequence[Path] = ()) -> gr.Blocks:
    """Lay out the page over a loaded captioner and wire every event to a stable api_name.

    ``photos`` are extra example images, shown only when the bundle is a real-world one.
    """
    app = CaptionDemo(captioner, config=config)
    config = app.config
    shown_photos = list(photos) if captioner.info()["world"] == "real" else []
    examples = [[str(path)] for path in [*captioner.examples(), *shown_photos]]

    age = config.cache_max_age_s  # checked as often as files may live: Gradio keeps them forever by default
    with gr.Blocks(title="capdemo: MacCap and TOMCap", delete_cache=(age, age)) as demo:
        session = gr.State(SessionResults())
        gr.Markdown(HEADER)
        with gr.Row(equal_height=False):
            with gr.Column(scale=2, min_width=300):
                image = image_input(label="Image (for Caption, Ask and Embedding space)", height=320,
                                    sources=["upload", "clipboard"], elem_id="image-input")
                if examples:
                    gr.Examples(examples=examples, inputs=[image], label="Examples", examples_per_page=12)
                gr.Markdown(f"<small>Requests wait in a queue ({config.concurrency_limit} running, at most "
                            f"{config.max_queue_size} waiting). When it is full the page says the app is busy: "
                            "try again shortly.</small>")
            with gr.Column(scale=5):
                with gr.Tabs():
                    with gr.Tab("Caption", id="caption"):
                        caption_inputs, caption_outputs, caption_button = _caption_tab(captioner)
                    with gr.Tab("Ask (VQA)", id="vqa"):
                        vqa_inputs, vqa_outputs, vqa_button = _vqa_tab(enabled="maccap" in captioner.methods)
                    with gr.Tab("Embedding space", id="embedding"):
                        embedding_inputs, embedding_outputs, embedding_button = _embedding_tab()
                    with gr.Tab("Batch", id="batch"):
                        batch_inputs, batch_outputs, batch_button = _batch_tab(config)
                    with gr.Tab("About", id="about"):
                        about_outputs = [gr.Markdown(label="Bundle summary"), gr.JSON(label="Bundle details")]

        # One concurrency group for every model event: at most `concurrency_limit` of them run at once in total.
        model = {"concurrency_id": MODEL_CONCURRENCY_ID}
        caption_button.click(on_gpu(app.caption_event), [image, *caption_inputs, session],
                             [*caption_outputs, session], api_name="caption", **model)
        vqa_button.click(on_gpu(app.vqa_event), [image, *vqa_inputs, session], vqa_outputs, api_name="vqa", **model)
        vqa_inputs[0].submit(on_gpu(app.vqa_event), [image, *vqa_inputs, session], vqa_outputs,
                             api_visibility="private", **model)
        embedding_button.click(on_gpu(app.embedding_event), [image, *embedding_inputs, session],
                               [*embedding_outputs, session], api_name="embedding", **model)
        batch_button.click(on_gpu(app.batch_event), batch_inputs, batch_outputs, api_name="batch", **model)
        demo.load(app.about, None, about_outputs, api_name="about")

    demo.queue(default_concurrency_limit=config.concurrency_limit, max_size=config.max_queue_size)
    return demo


def _caption_tab(captioner: Captioner) -> tuple[list, list, gr.Button]:
    defaults = bundle_defaults(captioner, "maccap")
    tomcap_defaults = bundle_defaults(captioner, "tomcap")
    rows, cols = captioner.encoder.grid_size
    methods = [(METHOD_LABELS[m], m) for m in captioner.methods]
    chosen = gr.CheckboxGroup(methods, value=[m for _, m in methods], label="Methods (both: side by side)",
                              elem_id="methods")
    with gr.Accordion("Decoding settings (preset to the bundle's)", open=False):
        with gr.Row():
            samples = _slider("samples", defaults.samples, "Samples S (MacCap)", "noisy samples reranked by CLIP")
            beams = _slider("beams", defaults.beams, "Beams (MacCap)", "beam width per sample")
            noise = _slider("noise_variance", defaults.noise_variance, "Noise variance (MacCap)",
                            "inference noise on the region features")
        with gr.Row():
            n_cr = _slider("n_cr", defaults.n_cr, "Patches N_cr (MacCap)", "picked by the CLS attention",
                           maximum=rows * cols)
            max_tokens = _slider("max_new_tokens", defaults.max_new_tokens, "Max new tokens (MacCap)",
                                 "caption length cap")
            seed = gr.Number(value=0, precision=0, minimum=0, maximum=LIMITS["seed"][1], label="Seed",
                             info="same seed, same captions")
        with gr.Row():
            k = _slider("k", tomcap_defaults.k, "Neighbours K (TOMCap)", "retrieved captions in the prompt")
            tomcap_beams = _slider("beams", tomcap_defaults.beams, "Beams (TOMCap)", "beam width")
            tomcap_tokens = _slider("max_new_tokens", tomcap_defaults.max_new_tokens, "Max new tokens (TOMCap)",
                                    "caption length cap")
    button = gr.Button("Caption", variant="primary", elem_id="caption-button")
    with gr.Row():
        maccap_caption = gr.Textbox(label="MacCap caption", elem_id="maccap-caption",
                                    elem_classes=["capdemo-caption"], buttons=["copy"])
        tomcap_caption = gr.Textbox(label="TOMCap caption", elem_id="tomcap-caption",
                                    elem_classes=["capdemo-caption"], buttons=["copy"])
    with gr.Row(equal_height=False):
        heatmap = gr.Image(label="CLS attention; MacCap's patches outlined by rank", type="pil", height=360,
                           interactive=False, elem_id="heatmap")
        timings = gr.Dataframe(label="Time per stage (ms)", interactive=False, elem_id="timings")
    with gr.Row(equal_height=False):
        maccap_table = gr.Dataframe(label="MacCap candidates (CLIP-reranked; click a header to sort)",
                                    interactive=False, wrap=True, elem_id="maccap-candidates")
        tomcap_table = gr.Dataframe(label="TOMCap candidates (CLIP-reranked beams)", interactive=False, wrap=True,
                                    elem_id="tomcap-candidates")
    neighbours = gr.Dataframe(label="TOMCap: retrieved neighbour captions", interactive=False, wrap=True,
                              elem_id="neighbours")
    with gr.Accordion("Everything as JSON", open=False):
        details = gr.JSON(label="Caption details")
    inputs = [chosen, samples, beams, noise, n_cr, k, max_tokens, seed, tomcap_beams, tomcap_tokens]
    outputs = [maccap_caption, tomcap_caption, maccap_table, tomcap_table, heatmap, neighbours, timings, details]
    return inputs, outputs, button


def _vqa_tab(*, enabled: bool) -> tuple[list, list, gr.Button]:
    if not enabled:
        gr.Markdown("This bundle has no MacCap model, which answers questions; Ask will say so.")
    question = gr.Textbox(label="Question", placeholder="e.g. What colour is the circle?", elem_id="question")
    button = gr.Button("Ask", variant="primary", elem_id="ask-button")
    answer = gr.Textbox(label="Answer", elem_classes=["capdemo-caption"], elem_id="answer")
    with gr.Row(equal_height=False):
        top = gr.Dataframe(label="Top candidate answers", interactive=False, elem_id="top-answers")
        with gr.Column():
            generated = gr.Textbox(label="The language model's free-form answer")
            caption = gr.Textbox(label="Caption used (the Caption tab's MacCap caption when there is one)")
            prompt = gr.Textbox(label="Prompt the language model continued", lines=2)
    return [question], [answer, top, generated, caption, prompt], button


def _embedding_tab() -> tuple[list, list, gr.Button]:
    gr.Markdown("CLIP puts images and texts in separate regions of its embedding space (the *modality gap*). "
                "MacCap moves the image side towards the texts by mixing in subregion features; TOMCap moves "
                "texts towards the images by matching per-dimension statistics. The Caption tab's results for "
                "this image are reused; missing ones are made with the bundle's settings.")
    with gr.Row():
        projection = gr.Radio(PROJECTION_CHOICES, value="pca", label="Projection")
        button = gr.Button("Draw", variant="primary", elem_id="embedding-button")
    figure = gr.Plot(label="Embedding space", elem_id="embedding-plot")
    with gr.Row(equal_height=False):
        histogram = gr.Plot(label="Per-dimension gap (MacCap Fig. 1)", elem_id="gap-histogram")
        table = gr.Dataframe(label="Gap numbers (MacCap Table 1, TOMCap std ratios)", interactive=False,
                             elem_id="gap-table")
    return [projection], [figure, histogram, table], button


def _batch_tab(config: AppConfig) -> tuple[list, list, gr.Button]:
    files = gr.File(label=f"Images (up to {config.max_batch_images})", file_count="multiple", file_types=["image"],
                    elem_id="batch-files")
    button = gr.Button("Caption all (bundle settings)", variant="primary", elem_id="batch-button")
    table = gr.Dataframe(label="Captions", interactive=False, wrap=True, elem_id="batch-table")
    with gr.Row():
        csv_file = gr.DownloadButton("Download CSV")
        json_file = gr.DownloadButton("Download JSON")
    return [files], [table, csv_file, json_file], button


def build_app(
    weights: str, *, device: str | None = None, config: AppConfig | None = None, photos: Sequence[Path] = ()
) -> gr.Blocks:
    """Load the bundle ``weights`` (folder or ``hf-hub:org/name@rev``) once and build the page over it."""
    return create_blocks(Captioner.from_bundle(weights, device=device), config=config, photos=photos)
