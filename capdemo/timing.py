"""Wall time per named stage, in milliseconds, with CUDA work counted; split per image for a batch."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

import torch


class StageTimer:
    """Accumulates the wall time of each named stage (``with timer("generate"): ...``).

    CUDA is synchronised at the end of a stage, so asynchronous GPU work lands in the stage that
    launched it. Stages keep the order in which they first ran.
    """

    def __init__(self, device: torch.device | str = "cpu"):
        self.device = torch.device(device)
        self.ms: dict[str, float] = {}

    @contextmanager
    def __call__(self, stage: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            self.ms[stage] = self.ms.get(stage, 0.0) + (time.perf_counter() - start) * 1000.0

    def per_image(self, batch: int) -> dict[str, float]:
        """Each stage's time divided equally among the ``batch`` images that shared it."""
        if batch < 1:
            raise ValueError(f"a batch has at least one image, got {batch}")
        return {stage: ms / batch for stage, ms in self.ms.items()}


__all__ = ["StageTimer"]
