"""What a bundle knows: a one-line summary of its domain and the CLIP scores its captions reach on in-domain images.

A bundle trained on one world (the shapes world, COCO) captions anything, but only images like its training
images get captions that fit them. ``measure_domain`` runs every method of a loaded bundle on held-out in-domain
images when the bundle is built and records, per method and for the image's best caption over the methods, the
5th percentile and the median of the chosen caption's CLIP score. The manifest keeps that as its optional
``domain`` field (top level, so file hashes are unaffected); the app shows the summary under its title and warns
when an image's best CLIP score falls well below the recorded range (:meth:`Domain.warning`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

DOMAIN_KEY = "domain"  # optional top-level manifest field
BEST = "best"  # the image's best chosen-caption score over every method of the bundle
PERCENTILES = {"p05": 5.0, "median": 50.0}


@dataclass(frozen=True)
class ScoreRange:
    """In-domain CLIP scores of chosen captions: 5th percentile, median and how many images they come from."""

    p05: float
    median: float
    n: int

    @property
    def floor(self) -> float:
        """Scores below this are "far below" the range: as far under the 5th percentile as it is under the median."""
        return self.p05 - (self.median - self.p05)


@dataclass(frozen=True)
class Domain:
    """A bundle's domain: a summary line and in-domain score ranges per method (and ``best``, over methods)."""

    summary: str
    scores: dict[str, ScoreRange] = field(default_factory=dict)

    @classmethod
    def from_manifest(cls, manifest: Mapping[str, Any]) -> Domain | None:
        """The manifest's ``domain`` field, or None when the bundle has none (older bundles)."""
        data = manifest.get(DOMAIN_KEY)
        if not isinstance(data, Mapping) or not data.get("summary"):
            return None
        ranges = {name: ScoreRange(**{key: entry[key] for key in ScoreRange.__dataclass_fields__})
                  for name, entry in (data.get("clip_score") or {}).items()}
        return cls(summary=str(data["summary"]), scores=ranges)

    def to_dict(self) -> dict[str, Any]:
        return {"summary": self.summary,
                "clip_score": {name: {"p05": r.p05, "median": r.median, "n": r.n} for name, r in self.scores.items()}}

    def warning(self, best_scores: Mapping[str, float]) -> str:
        """One line when the image's best CLIP score (``best_scores``: method -> its chosen caption's score) is far
        below the in-domain range; "" when it is not, or when nothing was measured for these methods."""
        if not best_scores:
            return ""
        reference = self.scores.get(BEST) if len(best_scores) > 1 else self.scores.get(next(iter(best_scores)))
        if reference is None:
            return ""
        best = max(best_scores.values())
        if best >= reference.floor:
            return ""
        return (f"This image looks outside the bundle's domain: its best caption scores CLIP {best:.2f}, where "
                f"in-domain images score {reference.p05:.2f}-{reference.median:.2f} (5th percentile-median). "
                f"{self.summary}")


def score_range(scores: Sequence[float]) -> ScoreRange:
    values = np.asarray(scores, dtype=np.float64)
    if values.size == 0:
        raise ValueError("no scores to summarise")
    p05, median = (float(np.percentile(values, q)) for q in PERCENTILES.values())
    return ScoreRange(p05=round(p05, 4), median=round(median, 4), n=int(values.size))


def measure_domain(captioner: Any, images: Sequence[Any], summary: str) -> Domain:
    """Caption held-out in-domain ``images`` with every method of ``captioner`` (bundle defaults) and record the
    range of their chosen captions' CLIP scores, per method and for the best over methods."""
    if not images:
        raise ValueError("measuring a domain needs in-domain images")
    encoded = captioner.encode(list(images))
    per_method = {name: [result.candidates[0].clip_score for result in captioner.caption(encoded, name)]
                  for name in captioner.methods}
    best = np.max(np.asarray(list(per_method.values())), axis=0)  # (N,) best over methods per image
    ranges = {name: score_range(scores) for name, scores in per_method.items()}
    ranges[BEST] = score_range(best)
    return Domain(summary=summary, scores=ranges)


__all__ = ["BEST", "DOMAIN_KEY", "Domain", "ScoreRange", "measure_domain", "score_range"]
