"""What a captioning call returns: the caption and everything that explains it.

Both methods fill the same ``Result`` so the CLI, the app and the evaluation
code never branch on the method. Tensors are detached CPU float32; everything
else is plain Python so ``to_json()`` is a straight dump.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass(frozen=True)
class Candidate:
    """One decoded caption and its CLIP image-text cosine (the rerank score)."""

    text: str
    clip_score: float
    sample: int = 0  # which noisy sample (MacCap) or beam (TOMCap) produced it


@dataclass(frozen=True)
class Patch:
    """A patch picked by the CLS attention; ``row``/``col`` index the ViT patch grid."""

    index: int  # 0-based patch index (CLS excluded), row-major over the grid
    row: int
    col: int
    attention: float  # head-averaged CLS -> patch attention in the last block


@dataclass(frozen=True)
class Neighbour:
    """A caption retrieved from the datastore, with its similarity to the query."""

    text: str
    score: float
    store: str = "bundle"  # which datastore it came from: the bundle's, or a visitor's own captions ("mine")


@dataclass
class Result:
    """Caption of one image plus the evidence behind it.

    ``candidates`` are sorted best first and ``caption == candidates[0].text``.
    ``embeddings`` maps a name (``"image"``, ``"region"``, ``"candidates"``,
    ``"neighbours"``, ``"corrected"`` ...) to a ``(n, D)`` tensor for plots.
    """

    caption: str
    method: str
    candidates: list[Candidate] = field(default_factory=list)
    patches: list[Patch] = field(default_factory=list)
    neighbours: list[Neighbour] = field(default_factory=list)
    embeddings: dict[str, torch.Tensor] = field(default_factory=dict)
    timings_ms: dict[str, float] = field(default_factory=dict)
    extras: dict[str, Any] = field(default_factory=dict)  # method-specific, JSON-serialisable (e.g. the prompt)

    def to_json(self) -> dict[str, Any]:
        """The CLI/API view: everything but the embedding tensors."""
        return {
            "method": self.method,
            "caption": self.caption,
            "candidates": [{"text": c.text, "clip_score": c.clip_score} for c in self.candidates],
            "patches": [
                {"index": p.index, "row": p.row, "col": p.col, "attention": p.attention} for p in self.patches
            ],
            "neighbours": [{"text": n.text, "score": n.score, "store": n.store} for n in self.neighbours],
            "timings_ms": dict(self.timings_ms),
            **({"extras": self.extras} if self.extras else {}),
        }
