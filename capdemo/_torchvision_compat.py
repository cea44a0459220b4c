"""Make torchvision importable next to a CPU-only torch 2.13.0.

torchvision 0.28.0 is the only release pinned to torch 2.13.0, and it is a CUDA
build: its compiled ops link against libtorch_cuda, so next to the CPU wheel of
torch they never register, and ``import torchvision`` dies with
``RuntimeError: operator torchvision::nms does not exist`` (raised while
registering fake kernels). open_clip, timm, transformers and peft all import
torchvision, so the whole stack fails with it.

This module is imported before any of them (first thing in ``capdemo/__init__``
and in ``tests/conftest.py``). It does nothing when torchvision imports cleanly
(any GPU host, or a CPU torchvision build). Only on that exact error does it
declare the two missing operator schemas so the fake-kernel registration
succeeds, then imports torchvision again. The compiled ops (``ops.nms``,
``io.decode_jpeg``) stay unavailable; capdemo never uses them (PIL decodes
images, and open_clip's transforms are pure Python).
"""

from __future__ import annotations

import sys

_MISSING_OPERATOR = "operator torchvision::nms does not exist"
_SCHEMAS = (
    "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
)
_library = None  # keeps the torch.library registration alive for the process


def _forget_partial_import() -> None:
    for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
        del sys.modules[name]


def ensure_torchvision() -> bool:
    """Import torchvision, patching the CPU-torch case; True when the shim was needed."""
    global _library
    try:
        import torchvision
        return False
    except RuntimeError as err:
        if _MISSING_OPERATOR not in str(err):
            raise
    _forget_partial_import()
    import torch.library

    _library = torch.library.Library("torchvision", "DEF")
    for schema in _SCHEMAS:
        _library.define(schema)
    import torchvision  # noqa: F401

    return True


ensure_torchvision()
