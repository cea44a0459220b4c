"""The Gradio Blocks UI.

Placeholder until the app lands: it shows what the loaded bundle contains, so `python app.py`
already serves a page and fails loudly (one line) on a bad bundle.
"""

from __future__ import annotations

import json

import gradio as gr

from capdemo.bundle import Bundle, BundleError


def build_app(weights: str, *, device: str | None = None) -> gr.Blocks:
    try:
        bundle = Bundle.load(weights)
        summary = {"name": bundle.name, "components": sorted(bundle.components)}
    except (BundleError, OSError) as err:
        summary = {"error": str(err)}
    with gr.Blocks(title="capdemo") as demo:
        gr.Markdown("# capdemo\nText-only image captioning (MacCap, TOMCap) you can see into.")
        gr.Code(json.dumps(summary, indent=2), language="json", label="Loaded bundle")
    return demo
