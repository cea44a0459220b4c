"""Where a training process runs: its device, and its rank in a ``torchrun`` data-parallel group."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as dist

DEVICES = ("auto", "cpu", "cuda")


def resolve_device(device: str, *, local_rank: int = 0) -> torch.device:
    """The device this rank trains on: ``cuda:LOCAL_RANK`` or ``cpu``."""
    if device not in DEVICES:
        raise ValueError(f"device must be one of {', '.join(DEVICES)}, got {device!r}")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' was asked for but CUDA is not available; use 'auto' or 'cpu'")
    if device == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", local_rank)


@dataclass(frozen=True)
class DistEnv:
    """Where this process sits in a data-parallel run (world_size 1 when run alone)."""

    rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        """Rank 0 alone writes checkpoints and logs."""
        return self.rank == 0


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name, str(default))
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name} must be an integer, got {value!r}") from None


def launch_rank() -> tuple[int, int]:
    """``(RANK, WORLD_SIZE)`` as ``torchrun`` sets them, ``(0, 1)`` when run alone; no process group is needed.

    For work that ranks split by index and coordinate through files (the sharded embedding cache), where a
    collective would wait under the backend's timeout (NCCL: 10 minutes) while another rank is still busy.
    """
    rank, world_size = _env_int("RANK", 0), _env_int("WORLD_SIZE", 1)
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"RANK {rank} and WORLD_SIZE {world_size} do not describe a rank of a group")
    return rank, world_size


@contextmanager
def distributed_session(*, device: str = "auto") -> Iterator[DistEnv]:
    """Join the process group that ``torchrun`` describes (RANK, WORLD_SIZE, LOCAL_RANK), or run alone.

    Initialises the group (nccl on CUDA, gloo on CPU; MASTER_ADDR/PORT from the environment)
    unless the caller already did, and destroys only a group it created.
    """
    local_rank = _env_int("LOCAL_RANK", 0)
    if dist.is_available() and dist.is_initialized():
        rank, world_size, created = dist.get_rank(), dist.get_world_size(), False
    else:
        rank, world_size = _env_int("RANK", 0), _env_int("WORLD_SIZE", 1)
        created = world_size > 1
    torch_device = resolve_device(device, local_rank=local_rank)
    if created:
        if torch_device.type == "cuda":
            torch.cuda.set_device(torch_device)
        dist.init_process_group(backend="nccl" if torch_device.type == "cuda" else "gloo")
    try:
        yield DistEnv(rank=rank, world_size=world_size, device=torch_device)
    finally:
        if created:
            dist.destroy_process_group()
