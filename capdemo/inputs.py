"""User inputs that are not a method's settings, checked in one place: questions and count arguments.

A method's own settings (samples, beams, K, ...) are its ``Options`` (:mod:`capdemo.methods.base`).
"""

from __future__ import annotations

import argparse

MAX_QUESTION_CHARS = 500


def positive_int(text: str) -> int:
    """An argparse ``type`` for counts that must be at least 1 (batch sizes, worker counts)."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def clean_question(question: object, *, max_chars: int = MAX_QUESTION_CHARS) -> str:
    """A question as the LM will see it: control characters removed, whitespace collapsed, length capped at
    ``max_chars`` (the smaller of MAX_QUESTION_CHARS and what the answering LM has room for)."""
    max_chars = min(max_chars, MAX_QUESTION_CHARS)
    if not isinstance(question, str):
        raise ValueError("question must be text")
    text = " ".join("".join(ch if ch.isprintable() else " " for ch in question).split())
    if not text:
        raise ValueError("question is empty: type a question about the image")
    if len(text) > max_chars:
        raise ValueError(f"question is {len(text)} characters long; the limit is {max_chars}")
    return text
