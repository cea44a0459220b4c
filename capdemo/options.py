"""Decoding controls shared by the CLI, the app and the HTTP API, validated in one place.

Values arrive from sliders, command-line flags and raw API calls alike, so every
field has a range, and anything outside it is a one-line ``ValueError`` naming
the field — never a crash deep inside generate().
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

from capdemo.config import Config

METHODS = ("maccap", "tomcap")
MAX_QUESTION_CHARS = 500

# field -> (minimum, maximum), inclusive
LIMITS: dict[str, tuple[float, float]] = {
    "samples": (1, 64),
    "beams": (1, 8),
    "noise_variance": (0.0, 1.0),
    "n_cr": (1, 256),
    "k": (1, 16),
    "max_new_tokens": (1, 64),
    "seed": (0, 2**31 - 1),
}


@dataclass
class CaptionOptions(Config):
    """Per-request decoding controls; ``None`` means "the bundle's trained default"."""

    samples: int | None = None  # MacCap: noisy samples S reranked by CLIP (paper: 20)
    beams: int | None = None  # beam width per sample (paper: 4)
    noise_variance: float | None = None  # MacCap: inference noise variance (paper: 0.016)
    n_cr: int | None = None  # MacCap: patches picked by the CLS attention (paper: 10)
    k: int | None = None  # TOMCap: retrieved neighbour captions in the prompt (paper: 4)
    max_new_tokens: int | None = None  # generation length cap
    seed: int = 0  # seeds the inference noise, so a request is reproducible

    def validated(self) -> "CaptionOptions":
        """Return self after range- and type-checking every set field (bools and NaN refused too)."""
        for field in fields(self):
            value = getattr(self, field.name)
            if value is None:
                continue
            low, high = LIMITS[field.name]
            integral = field.name != "noise_variance"
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ValueError(f"{field.name} must be a number, got {value!r}")
            if isinstance(value, float) and not math.isfinite(value):
                raise ValueError(f"{field.name} must be finite, got {value!r}")
            if integral and float(value) != int(value):
                raise ValueError(f"{field.name} must be a whole number, got {value!r}")
            if not low <= value <= high:
                raise ValueError(f"{field.name} must be between {low:g} and {high:g}, got {value!r}")
            if integral:
                setattr(self, field.name, int(value))
        return self


def positive_int(text: str) -> int:
    """An argparse ``type`` for counts that must be at least 1 (batch sizes, worker counts)."""
    import argparse

    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def check_method(method: str) -> str:
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    return method


def clean_question(question: object) -> str:
    """A question as the LM will see it: control characters removed, whitespace collapsed, length capped."""
    if not isinstance(question, str):
        raise ValueError("question must be text")
    text = " ".join("".join(ch if ch.isprintable() else " " for ch in question).split())
    if not text:
        raise ValueError("question is empty: type a question about the image")
    if len(text) > MAX_QUESTION_CHARS:
        raise ValueError(f"question is {len(text)} characters long; the limit is {MAX_QUESTION_CHARS}")
    return text
