"""The Bring-your-own-captions panel of the Caption tab (:mod:`capdemo.my_captions` does the work)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import gradio as gr

from capdemo.my_captions import BOTH, BUNDLE, MAX_BYTES, MAX_CAPTION_CHARS, MAX_LINES, MINE
from capdemo.pipeline import Captioner


def my_captions_panel(captioner: Captioner) -> MyCaptionsPanel | None:
    """Bring your own captions, for bundles with a retrieving method (None when none retrieves)."""
    retrieving = [m.label for m in captioner.methods.values() if m.retrieval_encoder() is not None]
    if not retrieving:
        return None
    with gr.Accordion(f"Bring your own captions ({', '.join(retrieving)} retrieval)", open=False,
                      elem_id="my-captions"):
        gr.Markdown(f"Paste captions, one per line (or a JSON list of strings), or upload a `.txt`/`.json` file: up "
                    f"to {MAX_LINES:,} captions, {MAX_BYTES // 2**20} MB, {MAX_CAPTION_CHARS} characters each. They "
                    "are embedded with the bundle's retrieval encoder into a store that only this browser session "
                    "sees, and can be downloaded as a datastore folder for `--datastore` or "
                    "`python -m training index --corpus captions.txt`.")
        panel = MyCaptionsPanel(
            text=gr.Textbox(label="Your captions", lines=4, elem_id="my-captions-text",
                            placeholder="a red circle above a blue square\na yellow triangle on the left"),
            file=gr.File(label="...or a file", file_types=[".txt", ".json"], elem_id="my-captions-file"),
            button=gr.Button("Embed my captions", elem_id="my-captions-button"),
            status=gr.Markdown(elem_id="my-captions-status", elem_classes=["capdemo-notice"]),
            download=gr.DownloadButton("Download my captions as a datastore (zip)", elem_id="my-captions-download"),
            retrieve_from=gr.Radio([("the bundle's store", BUNDLE), ("my captions", MINE), ("both", BOTH)],
                                   value=BUNDLE, label="Retrieve neighbours from", elem_id="retrieve-from"),
        )
    return panel


@dataclass
class MyCaptionsPanel:
    """The Bring-your-own-captions components."""

    text: Any
    file: Any
    button: Any
    status: Any
    download: Any
    retrieve_from: Any


__all__ = ["MyCaptionsPanel", "my_captions_panel"]
