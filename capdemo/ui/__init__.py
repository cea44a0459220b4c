"""The Gradio app: five tabs over one loaded :class:`capdemo.pipeline.Captioner`, generated from its methods.

``build_app(weights)`` loads a bundle once and lays out the page (:mod:`capdemo.ui.layout`); the
event functions (:mod:`capdemo.ui.events`) return plain views (:mod:`capdemo.ui.views`); every
method's settings controls and API parameters come from its declared options
(:mod:`capdemo.ui.controls`).
"""

from capdemo.ui.events import AppConfig, CaptionDemo, attention_grid, user_facing
from capdemo.ui.layout import (
    MODEL_CONCURRENCY_ID, PLOT_CONCURRENCY_ID, build_app, create_blocks, image_input, on_gpu, serve, warm_up_umap,
)
from capdemo.ui.views import CaptionView, SessionResults

__all__ = [
    "AppConfig", "CaptionDemo", "CaptionView", "MODEL_CONCURRENCY_ID", "PLOT_CONCURRENCY_ID", "SessionResults",
    "attention_grid", "warm_up_umap",
    "build_app", "create_blocks", "image_input", "on_gpu", "serve", "user_facing",
]
