"""A bundle's evaluation record: ``evaluation.json``, the scores the model card reports.

The file is an ordinary bundle file (listed in ``bundle.json`` with its sha256, so it is verified like the
weights), written by the commands that score a bundle (``shapes-eval``, ``caption-split``) through
:func:`record_evaluation`. Format (``capdemo.evaluation/1``)::

    {
      "format": "capdemo.evaluation/1",
      "results": [
        {
          "method": "tomcap",                       # the component scored
          "task": "shapes-eval",                    # the command that scored it
          "dataset": "shapes world, held-out scenes",  # what was captioned, for people
          "dataset_id": null,                       # its Hugging Face dataset id, when it has one
          "split": "seed 1234, 500 scenes",         # which part of it
          "metrics": {"scene_accuracy": 0.684, "CIDEr": 6.16},  # name -> number, as the command reports them
          "command": "python -m training shapes-eval --n 500 --seed 1234",  # how to reproduce it
          "date": "2026-11-23"                      # when (UTC)
        }
      ]
    }

A new result replaces the one with the same (method, task, dataset, split) and is otherwise appended.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from datetime import datetime, UTC
from pathlib import Path
from typing import Any

from capdemo.bundle import Bundle, BundleError, BundleWriter

EVALUATION_FILE = "evaluation.json"  # bundle file holding the evaluation record
EVALUATION_FORMAT = "capdemo.evaluation/1"


@dataclass(frozen=True)
class EvaluationResult:
    """One scored run of one method on one dataset split."""

    method: str  # the bundle component scored, e.g. "maccap"
    task: str  # the command that scored it: "shapes-eval", "caption-split", ...
    dataset: str  # what was captioned, in words
    split: str  # which part of it (a split name, or a seed and a count)
    metrics: dict[str, float]  # metric name -> value, named as the command reports them
    dataset_id: str | None = None  # Hugging Face dataset id, when the data has one
    command: str = ""  # the command line that reproduces the numbers
    date: str = field(default_factory=lambda: datetime.now(UTC).strftime("%Y-%m-%d"))  # UTC day

    def __post_init__(self) -> None:
        for name in ("method", "task", "dataset", "split"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name).strip():
                raise ValueError(f"evaluation result: {name} must be a non-empty string, got {getattr(self, name)!r}")
        if not self.metrics:
            raise ValueError("evaluation result: no metrics")
        for name, value in self.metrics.items():
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"evaluation result: metric {name!r} must be a finite number, got {value!r}")

    @property
    def key(self) -> tuple[str, str, str, str]:
        """What a newer result of the same evaluation replaces it by."""
        return self.method, self.task, self.dataset, self.split

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> EvaluationResult:
        known = {name: data[name] for name in cls.__dataclass_fields__ if name in data}
        return cls(**{**known, "metrics": dict(known.get("metrics", {}))})


def read_evaluation(bundle: Bundle) -> list[EvaluationResult]:
    """The bundle's recorded results (none when it has no evaluation.json); BundleError if the file is malformed."""
    if EVALUATION_FILE not in bundle.manifest.get("files", {}):
        return []
    record = bundle.json(EVALUATION_FILE)
    if not isinstance(record, dict) or record.get("format") != EVALUATION_FORMAT:
        raise BundleError(f"{bundle.path / EVALUATION_FILE}: not a {EVALUATION_FORMAT} record")
    try:
        return [EvaluationResult.from_dict(result) for result in record.get("results", [])]
    except (TypeError, ValueError, AttributeError) as err:
        raise BundleError(f"{bundle.path / EVALUATION_FILE}: {err}") from None


def record_evaluation(bundle_dir: str | Path, result: EvaluationResult) -> list[EvaluationResult]:
    """Add ``result`` to the bundle's evaluation.json (rewriting the bundle atomically); returns every result.

    A model card generated earlier (README.md beside bundle.json) is regenerated, so it shows the new numbers.
    """
    from training.model_card import CARD_FILE, write_model_card

    bundle_dir = Path(bundle_dir)
    had_card = (bundle_dir / CARD_FILE).is_file()
    results = [old for old in read_evaluation(Bundle.load(bundle_dir)) if old.key != result.key] + [result]
    writer = BundleWriter.extending(bundle_dir)
    try:
        writer.add_json(EVALUATION_FILE, {"format": EVALUATION_FORMAT, "results": [asdict(r) for r in results]})
        writer.finish()
    except BaseException:
        writer.abort()
        raise
    if had_card:
        write_model_card(Bundle.load(bundle_dir))
    return results
