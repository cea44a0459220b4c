"""capdemo: text-only image captioning (MacCap, TOMCap, CapDec) you can see into.

The Python API is this module::

    import capdemo

    captioner = capdemo.load("weights/shapes")  # a bundle folder, or "hf-hub:org/name@<commit>"
    results = captioner.caption(captioner.examples()[:2], "maccap", samples=10)
    print(results[0].caption, results[0].candidates[0].clip_score, results[0].to_json()["timings_ms"])
    print(captioner.answer(captioner.examples()[0], "What colour is the circle?").answer)

:func:`load` returns a :class:`~capdemo.pipeline.Captioner`; its ``caption`` returns
:class:`~capdemo.result.Result` objects (caption, candidates with CLIP scores, picked patches,
retrieved neighbours, per-image timings) and ``answer`` a :class:`~capdemo.vqa.VQAResult`.
:func:`list_methods` names the captioning methods this installation knows.

The torchvision compatibility shim is imported first, before anything can import open_clip, timm,
transformers or peft (see ``_torchvision_compat``); everything else loads when first used.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

# Idle OpenMP threads sleep instead of spinning. Measured here on 2 shared cores: training the shapes CLIP ran at
# 0.35 steps/s with the default (spinning) policy and 1.3 steps/s with PASSIVE. Must be set before torch loads.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from capdemo import _torchvision_compat  # noqa: F401  (before open_clip, timm, transformers, peft)

if TYPE_CHECKING:
    from capdemo.pipeline import Captioner

__version__ = "0.1.0"


def load(weights: str | os.PathLike | None = None, *, device: str | None = None,
         precision: str | None = None) -> Captioner:
    """Load and verify a bundle once, with every captioning method it has.

    Args:
        weights: a bundle folder, or ``"hf-hub:org/name@revision"`` (pin the revision); None: ``$CAPDEMO_WEIGHTS``,
            else the shipped shapes-world bundle.
        device: a torch device ("cpu", "cuda", ...); None: CUDA when available, else the CPU.
        precision: "fp32", "bf16" or "int8" (CPU only); None: the bundle's measured recommendation on a CPU,
            else fp32.

    Returns:
        A :class:`~capdemo.pipeline.Captioner`: ``caption(images, method, **settings)`` (PIL images or file paths;
        settings left out take the bundle's values, see ``options(method)``), ``answer(image, question)``,
        ``encode(images)``, ``examples()``, ``info()``.
    """
    from capdemo.pipeline import Captioner
    from capdemo.weights import default_bundle

    return Captioner.from_bundle(weights if weights is not None else default_bundle(), device=device,
                                 precision=precision)


def list_methods() -> tuple[str, ...]:
    """The names of the captioning methods capdemo knows (a bundle serves those it has a component for)."""
    from capdemo.methods import names

    return names()


__all__ = ["__version__", "list_methods", "load"]
