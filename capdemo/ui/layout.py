"""The page: five tabs over one loaded Captioner, every method's controls and outputs generated from the registry.

``create_blocks`` lays the page out and wires each event to a stable ``api_name``; the views the
event functions return (:mod:`capdemo.ui.views`) are flattened here into the page's outputs (the Caption tab's
by :mod:`capdemo.ui.caption_outputs`).
"""

from __future__ import annotations

import inspect
import logging
import os
import threading
from pathlib import Path
from typing import Any
from collections.abc import Sequence

import gradio as gr
import numpy as np
from gradio.data_classes import FileData

from capdemo import __version__, analysis
from capdemo.my_captions import BUNDLE, StoreChoice
from capdemo.pipeline import Captioner
from capdemo.ui.controls import SettingControl, method_controls, options_from_values, with_parameters
from capdemo.ui.events import AppConfig, CaptionDemo
from capdemo.ui.examples_cache import claim_examples_cache, source_key
from capdemo.ui.panels import MyCaptionsPanel, my_captions_panel
from capdemo.ui.caption_outputs import RESULTS_ID, CaptionOutputs
from capdemo.ui.style import CSS

log = logging.getLogger(__name__)

PROJECTION_CHOICES = [("PCA", "pca"), ("UMAP", "umap")]
MODEL_CONCURRENCY_ID = "model"  # the queue group of the events that caption (Caption, Ask, Batch, an example)
PLOT_CONCURRENCY_ID = "plots"  # the Embedding tab's own group: a long UMAP never holds up a caption
MAX_UPLOAD_SIZE = "50mb"  # per file, enforced by Gradio before the upload reaches the app
SYSTEM_FONTS = ("ui-sans-serif", "system-ui", "sans-serif")
SYSTEM_MONO_FONTS = ("ui-monospace", "monospace")
def on_gpu(fn: Any) -> Any:
    """``spaces.GPU(fn)`` on a Hugging Face ZeroGPU Space (where ``spaces`` is installed), else ``fn`` itself."""
    try:
        import spaces
    except ImportError:
        return fn
    return spaces.GPU(fn)


def image_input(**kwargs: Any) -> gr.Image:
    """A ``gr.Image`` whose uploads reach the events as file paths, unopened.

    Plain ``gr.Image`` opens the file with Pillow before the event runs, so a corrupt upload fails
    inside Gradio with its generic "Error"; this way :func:`capdemo.images.load_image` reads it and
    names the problem. It is not a subclass because Gradio writes a ``.pyi`` stub next to the module
    of every component subclass.
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


def reveal_below_screen(elem_id: str, *, shown_px: int = 120) -> str:
    """Browser code that scrolls the element ``elem_id`` to the top of the screen when less than ``shown_px`` of it
    is on the screen (a phone, where the columns stack and it starts below); where it already shows, or is hidden
    in another tab, nothing moves."""
    return (f"() => {{ const element = document.getElementById({elem_id!r});"
            f" if (element && element.getBoundingClientRect().top > window.innerHeight - {shown_px})"
            " element.scrollIntoView({behavior: 'smooth', block: 'start'}); }")


def header(captioner: Captioner, domain_summary: str = "") -> tuple[str, str]:
    """The title with the bundle's domain line (when its manifest records one), and what the page shows."""
    named = " and ".join(f"**{m.label}** ({m.citation.split(':')[0]})" for m in captioner.methods.values())
    domain = f"\n\n**Domain:** {domain_summary}" if domain_summary else ""
    intro = (f"{named} caption images with language models trained on *captions alone*, across CLIP's modality gap. "
             "Pick an image, then see which patches the attention chose, every candidate with its CLIP rerank "
             "score, the retrieved neighbour captions, and where images and texts sit in the embedding space.")
    return f"# capdemo · text-only image captioning you can see into{domain}", intro


def serve(demo: gr.Blocks, **launch_args: Any) -> Any:
    """``demo.launch`` with the app's theme, CSS and upload limit (Gradio 6 takes them at launch, not in ``Blocks``)."""
    theme = gr.themes.Soft(  # system fonts: the default web fonts would be fetched from Google, and the app is offline
        primary_hue="indigo", secondary_hue="pink", font=SYSTEM_FONTS, font_mono=SYSTEM_MONO_FONTS
    )
    return demo.launch(theme=theme, css=CSS, show_error=False, max_file_size=MAX_UPLOAD_SIZE, **launch_args)


def create_blocks(captioner: Captioner, *, config: AppConfig | None = None, photos: Sequence[Path] = (),
                  cache_examples: bool = True) -> gr.Blocks:
    """Lay out the page over a loaded captioner and wire every event to a stable api_name.

    ``photos`` are extra example images, shown only when the bundle is a real-world one. ``cache_examples``:
    an example shows its captions on click, computed on its first click and cached (Gradio's lazy caching).
    """
    app = CaptionDemo(captioner, config=config)
    config = app.config
    shown_photos = list(photos) if captioner.info()["world"] == "real" else []
    examples = [[str(path)] for path in [*captioner.examples(), *shown_photos]]
    age = config.cache_max_age_s  # checked as often as files may live: Gradio keeps them forever by default
    title, intro = header(captioner, app.domain.summary if app.domain else "")
    with gr.Blocks(title="capdemo: " + " and ".join(app.labels.values()), delete_cache=(age, age)) as demo:
        state = gr.State()
        stores = gr.State()  # this session's own caption stores (Bring your own captions)
        gr.Markdown(title, elem_classes=["capdemo-header"])
        gr.Markdown(intro, elem_classes=["capdemo-intro"])
        with gr.Row(equal_height=False):
            with gr.Column(scale=2, min_width=300) as left:
                picture = image_input(label="Image", height=320,
                                      sources=["upload", "clipboard"], elem_id="image-input")
            with gr.Column(scale=5):
                with gr.Tabs():
                    with gr.Tab("Caption", id="caption"):
                        chosen, controls, caption_button, caption_outputs, panel = _caption_tab(captioner, app)
                    with gr.Tab("Ask (VQA)", id="vqa"):
                        vqa_inputs, vqa_outputs, vqa_button, asked = _vqa_tab(captioner, picture)
                    with gr.Tab("Embedding space", id="embedding"):
                        embedding_inputs, embedding_outputs, embedding_button, embedding_note = _embedding_tab()
                    with gr.Tab("Batch", id="batch"):
                        batch_inputs, batch_outputs, batch_button = _batch_tab(config, captioner)
                    with gr.Tab("About", id="about"):
                        about_text = gr.Markdown(elem_id="about-text")
                        with gr.Accordion("Bundle details as data", open=False):
                            about_details = gr.JSON(label="Bundle details")

        def caption(image: Any, methods: Any, settings: list, retrieve_from: str, session: Any, own: Any,
                    progress: gr.Progress) -> list:
            choice = StoreChoice(own, retrieve_from or BUNDLE)
            view = app.caption_event(image, methods, options_from_values(captioner.methods, controls, settings),
                                     session, progress=progress, stores=choice)
            return [*caption_outputs.values(view), view.session]

        def datastore(text: str, file: Any, own: Any, progress: gr.Progress = gr.Progress()) -> list:
            view = app.datastore_event(text, file, progress=progress)
            return [view.message, view.archive, view.mine if view.mine is not None else own]

        def example_caption(image: Any) -> list:
            """An example's captions with the bundle's settings (what the cached examples show)."""
            return caption_outputs.values(app.caption_event(image, list(captioner.methods)))

        def vqa(image: Any, question: str, session: Any, progress: gr.Progress = gr.Progress()) -> list:
            view = app.vqa_event(image, question, session, progress=progress)
            return [view.answer, view.top_answers, view.generated, view.caption, view.prompt]

        def embedding(image: Any, projection: str, session: Any, progress: gr.Progress = gr.Progress()) -> list:
            view = app.embedding_event(image, projection, session, progress=progress)
            if view.message:
                return [gr.update(), gr.update(), gr.update(), view.message, gr.update()]
            return [view.projection, view.gap_histogram, view.gap_table, "", view.session]

        def batch(files: Any, progress: gr.Progress = gr.Progress()) -> list:
            view = app.batch_event(files, progress=progress)
            return [view.table, view.csv_path, view.json_path]

        vqa_blank, embedding_blank = ["", None, "", "", ""], [None, None, None, ""]  # answer ...; plots and note

        def cleared() -> list:
            """A new image: every earlier result goes (captions, tables, heatmap, answer, plots)."""
            return [*caption_outputs.cleared(), *vqa_blank, *embedding_blank, None]

        with left:
            if examples:
                shown = gr.Examples(examples=examples, inputs=[picture], outputs=caption_outputs.components(),
                                    fn=on_gpu(example_caption), cache_examples=cache_examples, cache_mode="lazy",
                                    label="Examples (click one: its captions show at once)", examples_per_page=12,
                                    elem_id="examples")
                if cache_examples:  # outputs cached by another bundle or capdemo version are dropped
                    claim_examples_cache(Path(shown.cached_folder), source_key(captioner.info(), __version__))
                    # An example's first click captions it: that event counts against the model's limit too
                    demo.fns[shown.cache_event["id"]].concurrency_id = MODEL_CONCURRENCY_ID
                    # on a phone its captions land a screen below the examples: brought into view as they show
                    shown.cache_event.then(None, js=reveal_below_screen(RESULTS_ID), queue=False,
                                           api_visibility="private")
            gr.Markdown(f"<small>Requests wait in a queue ({config.concurrency_limit} captioning at once, at most "
                        f"{config.max_queue_size} waiting). When it is full the page says the app is busy: "
                        "try again shortly.</small>", elem_classes=["capdemo-queue"])

        trailing = [inspect.Parameter("retrieve_from", inspect.Parameter.POSITIONAL_OR_KEYWORD, default=BUNDLE),
                    inspect.Parameter("session", inspect.Parameter.POSITIONAL_OR_KEYWORD, default=None),
                    inspect.Parameter("own", inspect.Parameter.POSITIONAL_OR_KEYWORD, default=None),
                    inspect.Parameter("progress", inspect.Parameter.POSITIONAL_OR_KEYWORD, default=gr.Progress())]
        caption_fn = with_parameters(caption, ["image", "methods"], controls, trailing)
        caption_fn.__doc__ = app.caption_event.__doc__
        model = {"concurrency_id": MODEL_CONCURRENCY_ID}  # at most `concurrency_limit` captioning events at once
        retrieve_from = [panel.retrieve_from] if panel else [gr.State(BUNDLE)]
        caption_events = [caption_button.click(
            on_gpu(caption_fn), [picture, chosen, *(c.component for c in controls), *retrieve_from, state, stores],
            [*caption_outputs.components(), state], api_name="caption", **model)]
        if panel is not None:
            panel.button.click(on_gpu(datastore), [panel.text, panel.file, stores],
                               [panel.status, panel.download, stores], api_name="datastore", **model)
        embedding_event = embedding_button.click(on_gpu(embedding), [picture, *embedding_inputs, state],
                                                 [*embedding_outputs, embedding_note, state], api_name="embedding",
                                                 concurrency_id=PLOT_CONCURRENCY_ID, concurrency_limit=1)
        batch_button.click(on_gpu(batch), batch_inputs, batch_outputs, api_name="batch", **model)
        vqa_events = [vqa_button.click(on_gpu(vqa), [picture, *vqa_inputs, state], vqa_outputs, api_name="vqa",
                                       **model),
                      vqa_inputs[0].submit(on_gpu(vqa), [picture, *vqa_inputs, state], vqa_outputs,
                                           api_visibility="private", **model)]
        if asked is not None:  # an example question: its picture and question, then the answer as Ask gives it,
            # scrolled into view (on a phone it lies below the list of questions)
            vqa_events.append(asked.load_input_event.then(on_gpu(vqa), [picture, *vqa_inputs, state], vqa_outputs,
                                                          scroll_to_output=True, api_visibility="private", **model))
        # A new image (an upload, a clear, an example) empties what the old one showed and cancels what it still
        # waits for, so no result of an earlier image lands next to it; an example keeps what it fills itself.
        clear_targets = [*caption_outputs.components(), *vqa_outputs, *embedding_outputs, embedding_note, state]
        pending = [*caption_events, *vqa_events, embedding_event]
        for trigger in (picture.upload, picture.clear):
            trigger(cleared, None, clear_targets, cancels=pending, api_visibility="private", queue=False)

        def emptied_except(filled: Sequence) -> tuple[list, Any]:
            """What a new image empties (the session state aside) less ``filled``, what an example fills itself:
            the outputs and the function that empties them."""
            pairs = [(output, blank) for output, blank in zip(clear_targets[:-1], cleared()[:-1])
                     if all(output is not mine for mine in filled)]
            return [output for output, _ in pairs], lambda: [blank for _, blank in pairs]

        if examples:  # its captions (uncached examples only load the picture: then those go too)
            targets, empty = emptied_except(caption_outputs.components() if cache_examples else [])
            shown.dataset.click(empty, None, targets, cancels=pending, api_visibility="private", queue=False)
        if asked is not None:  # its answer
            targets, empty = emptied_except(vqa_outputs)
            asked.dataset.click(empty, None, targets, cancels=[*caption_events, embedding_event],
                                api_visibility="private", queue=False)
        demo.load(app.about, None, [about_text, about_details], api_name="about")

    demo.queue(default_concurrency_limit=config.concurrency_limit, max_size=config.max_queue_size)
    return demo


def _caption_tab(captioner: Captioner, app: CaptionDemo) -> tuple[Any, list[SettingControl], Any, CaptionOutputs,
                                                                   MyCaptionsPanel | None]:
    choices = [(method.label, name) for name, method in captioner.methods.items()]
    chosen = gr.CheckboxGroup(choices, value=[name for _, name in choices], label="Methods (side by side)",
                              elem_id="methods")
    controls: list[SettingControl] = []
    for method in captioner.methods.values():
        with gr.Accordion(f"{method.label} settings (preset to the bundle's)", open=False):
            with gr.Row():
                controls += method_controls(method)
    own = my_captions_panel(captioner)
    button = gr.Button("Caption", variant="primary", elem_id="caption-button")
    return chosen, controls, button, CaptionOutputs(captioner), own


def _vqa_tab(captioner: Captioner, picture: Any) -> tuple[list, list, Any, gr.Examples | None]:
    """The question, the Ask button, the bundle's example questions (about its example images: a click loads the
    picture and the question, and create_blocks answers it) and the answer's outputs."""
    limit = captioner.question_limit()
    if captioner.vqa_method is None:
        gr.Markdown("This bundle cannot answer questions (it has no answer list or no method with an LM); "
                    "Ask will say so.")
    question = gr.Textbox(label="Question", info=f"up to {limit} characters: what the answering LM has room for",
                          placeholder="e.g. how many objects are there?", max_length=limit or None, elem_id="question")
    button = gr.Button("Ask", variant="primary", elem_id="ask-button")
    examples_slot = gr.Column()  # filled below, once the outputs its examples answer into exist
    answer = gr.Textbox(label="Answer", elem_classes=["capdemo-caption"], elem_id="answer")
    with gr.Row(equal_height=False):
        top = gr.Dataframe(label="Top candidate answers", interactive=False, elem_id="top-answers",
                           elem_classes=["capdemo-table"])
        with gr.Column():
            generated = gr.Textbox(label="The language model's free-form answer")
            caption = gr.Textbox(label="Caption used (the Caption tab's caption when there is one)")
            prompt = gr.Textbox(label="Prompt the language model continued", lines=2)
    outputs = [answer, top, generated, caption, prompt]
    asked = captioner.example_questions() if captioner.vqa_method is not None else []
    with examples_slot:
        examples = gr.Examples(
            examples=[[str(item.image), item.question] for item in asked], inputs=[picture, question],
            cache_examples=False, examples_per_page=len(asked), elem_id="example-questions",
            label="Example questions, in the forms this bundle's LM was taught (click one: it is answered at once)",
        ) if asked else None
    return [question], outputs, button, examples


def _embedding_tab() -> tuple[list, list, Any, Any]:
    gr.Markdown("CLIP puts images and texts in separate regions of its embedding space (the *modality gap*). "
                "MacCap moves the image side towards the texts by mixing in subregion features; TOMCap moves "
                "texts towards the images by matching per-dimension statistics; CapDec trains with noise around "
                "the texts. The Caption tab's results for this image are reused; missing ones are made with the "
                "bundle's settings. Plots run in their own queue, so a slow UMAP never delays a caption.")
    with gr.Row():
        projection = gr.Radio(PROJECTION_CHOICES, value="pca", label="Projection", min_width=200)
        button = gr.Button("Draw", variant="primary", elem_id="embedding-button", min_width=120)
    note = gr.Markdown(elem_id="embedding-notice", elem_classes=["capdemo-notice"])
    figure = gr.Plot(label="Embedding space", elem_id="embedding-plot", min_width=300)
    with gr.Row(equal_height=False):
        histogram = gr.Plot(label="Per-dimension gap (MacCap Fig. 1)", elem_id="gap-histogram", min_width=300)
        table = gr.Dataframe(label="Gap numbers (MacCap Table 1, TOMCap std ratios)", interactive=False,
                             elem_id="gap-table", elem_classes=["capdemo-table"], min_width=300)
    return [projection], [figure, histogram, table], button, note


def batch_widths(methods: Sequence[str]) -> list[str]:
    """Column shares of the Batch table (image, per method caption and score, error): everything in view."""
    caption, score = 52 / len(methods), 18 / len(methods)
    return ["10%", *[f"{w:.1f}%" for _ in methods for w in (caption, score)], "20%"]


def _batch_tab(config: AppConfig, captioner: Captioner) -> tuple[list, list, Any]:
    files = gr.File(label=f"Images (up to {config.max_batch_images})", file_count="multiple", file_types=["image"],
                    elem_id="batch-files")
    button = gr.Button("Caption all (bundle settings)", variant="primary", elem_id="batch-button")
    table = gr.Dataframe(label="Captions", interactive=False, wrap=True, elem_id="batch-table",
                         column_widths=batch_widths(list(captioner.methods)),
                         elem_classes=["capdemo-table", "capdemo-wrap-all"])
    with gr.Row():
        csv_file = gr.DownloadButton("Download CSV")
        json_file = gr.DownloadButton("Download JSON")
    return [files], [table, csv_file, json_file], button


def build_app(
    weights: str, *, device: str | None = None, precision: str | None = None, config: AppConfig | None = None,
    photos: Sequence[Path] = (),
) -> gr.Blocks:
    """Load the bundle ``weights`` (folder or ``hf-hub:org/name@rev``) once and build the page over it."""
    captioner = Captioner.from_bundle(weights, device=device, precision=precision)
    warm_up_umap()
    return create_blocks(captioner, config=config, photos=photos)


WARM_UP_NICENESS = 10  # the warm-up thread's niceness: captions keep the CPU while it compiles
_umap_warmed = threading.Event()  # set once UMAP's numba code is compiled in this process
_umap_started = threading.Lock()


def warm_up_umap() -> threading.Event:
    """Compile UMAP's numba code in a background thread, once per process, so the first visitor to ask for a
    UMAP does not wait 10-30 s for it (nor hold a queue slot meanwhile). Returns the event set when done."""
    if _umap_started.acquire(blocking=False):
        def compile_umap() -> None:
            try:  # a background job: let the request threads have the CPU first (Linux: per-thread niceness)
                os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), WARM_UP_NICENESS)
            except (AttributeError, OSError):
                pass
            try:
                analysis.umap_project(np.random.default_rng(0).normal(size=(2 * analysis.UMAP_MIN_POINTS + 8, 8)))
            except Exception:  # UMAP stays usable: its first real request compiles instead
                log.exception("warming up UMAP failed")
            finally:
                _umap_warmed.set()

        threading.Thread(target=compile_umap, name="umap-warm-up", daemon=True).start()
    return _umap_warmed


__all__ = ["MODEL_CONCURRENCY_ID", "PLOT_CONCURRENCY_ID", "build_app", "create_blocks", "image_input", "on_gpu",
           "serve", "warm_up_umap"]
