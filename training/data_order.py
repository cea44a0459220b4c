"""Which samples each optimizer step reads, and the seeds of every random stream: pure functions of
(seed, step), so a resumed run reads and draws exactly what the killed one would have."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator

import torch
from torch.utils.data import Sampler


def derive_seed(seed: int, *stream: object) -> int:
    """A 63-bit seed for one named random stream, e.g. ``("order", epoch)`` or ``("step", step, micro, rank)``."""
    key = "/".join(str(part) for part in (seed, *stream)).encode()
    return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little") >> 1


class DataOrder:
    """Which samples each optimizer step reads: a pure function of (seed, step), so resuming needs no sampler state."""

    def __init__(self, *, dataset_size: int, batch_size: int, seed: int):
        if dataset_size < batch_size:
            raise ValueError(f"the dataset has {dataset_size} samples, fewer than one batch of {batch_size}")
        self.dataset_size = dataset_size
        self.batch_size = batch_size
        self.seed = seed
        self.steps_per_epoch = dataset_size // batch_size
        self._cached: tuple[int, torch.Tensor] | None = None  # (epoch, its permutation)

    def permutation(self, epoch: int) -> torch.Tensor:
        """The order of the whole dataset in ``epoch``."""
        if self._cached is None or self._cached[0] != epoch:
            generator = torch.Generator().manual_seed(derive_seed(self.seed, "order", epoch))
            self._cached = (epoch, torch.randperm(self.dataset_size, generator=generator))
        return self._cached[1]

    def global_batch(self, step: int) -> list[int]:
        """Dataset indices of the global batch of optimizer step ``step``."""
        epoch, position = divmod(step, self.steps_per_epoch)
        start = position * self.batch_size
        return self.permutation(epoch)[start : start + self.batch_size].tolist()

    def micro_batch_size(self, *, world_size: int, grad_accum: int) -> int:
        """Samples per micro-batch; the global batch must split evenly over ranks and micro-batches."""
        if self.batch_size % (world_size * grad_accum):
            raise ValueError(f"batch_size {self.batch_size} must be divisible by world_size * grad_accum"
                             f" = {world_size} * {grad_accum}")
        return self.batch_size // (world_size * grad_accum)

    def micro_batches(self, step: int, *, rank: int, world_size: int, grad_accum: int) -> list[list[int]]:
        """This rank's contiguous slice of the global batch, cut into ``grad_accum`` equal micro-batches."""
        size = self.micro_batch_size(world_size=world_size, grad_accum=grad_accum)
        shard = self.global_batch(step)[rank * grad_accum * size : (rank + 1) * grad_accum * size]
        return [shard[i * size : (i + 1) * size] for i in range(grad_accum)]


class StepRangeSampler(Sampler[list[int]]):
    """A DataLoader batch sampler over this rank's micro-batches of steps [start, end)."""

    def __init__(self, order: DataOrder, *, start: int, end: int, rank: int, world_size: int, grad_accum: int):
        self.order, self.start, self.end = order, start, end
        self.rank, self.world_size, self.grad_accum = rank, world_size, grad_accum

    def __iter__(self) -> Iterator[list[int]]:
        for step in range(self.start, self.end):
            yield from self.order.micro_batches(step, rank=self.rank, world_size=self.world_size,
                                                grad_accum=self.grad_accum)

    def __len__(self) -> int:
        return max(0, self.end - self.start) * self.grad_accum
