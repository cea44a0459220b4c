"""A stand-in for Hugging Face's ``spaces`` package (ZeroGPU) for the Spaces rehearsal (tests/test_spaces.py).

``spaces.GPU`` decorates as the real one does, bare (``spaces.GPU(fn)``) or configured
(``spaces.GPU(duration=60)(fn)``), and appends to the file named by ``$FAKE_SPACES_LOG`` one line per
decorated function (``applied <qualname>``) and one per call of it (``called <qualname>``). Outside a test it
is never on the import path.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from typing import Any


def _record(line: str) -> None:
    with open(os.environ["FAKE_SPACES_LOG"], "a", encoding="utf-8") as log:
        log.write(line + "\n")


def GPU(fn: Callable[..., Any] | None = None, **settings: Any) -> Any:
    """``fn`` wrapped so that its calls are recorded; with only settings, a decorator that does that."""
    if fn is None:
        return lambda inner: GPU(inner, **settings)
    _record(f"applied {fn.__qualname__}")

    @functools.wraps(fn)  # Gradio reads the wrapped signature (gr.Progress parameters and the like)
    def on_gpu(*args: Any, **kwargs: Any) -> Any:
        _record(f"called {fn.__qualname__}")
        return fn(*args, **kwargs)

    return on_gpu
