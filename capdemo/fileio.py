"""Writing files so that a killed writer never leaves a truncated one behind, and the same content gives the same
bytes."""

from __future__ import annotations

import json
import os
import struct
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors.torch import save_file


TEMP_SUFFIX = ".tmp"  # every temp file written here is hidden and ends so: ``.<name>.<pid>-<random>.tmp``


@contextmanager
def atomic_output(path: str | Path, *, durable: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; it replaces ``path`` in one rename only if the block succeeds.

    A killed or failing writer leaves the old file (or none) and at most a
    hidden ``.<name>.*.tmp`` file, never a truncated ``path``. ``durable``
    also fsyncs the file before the rename and the folder after it, so the new
    file survives a power cut once this returns (training checkpoints).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}{TEMP_SUFFIX}")
    try:
        yield tmp
        if durable:
            with open(tmp, "rb+") as handle:
                os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    if durable:
        _fsync_directory(path.parent)


def _fsync_directory(directory: Path) -> None:
    """Make a rename inside ``directory`` durable."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_safetensors(tensors: dict[str, torch.Tensor], path: str | Path,
                     metadata: dict[str, str] | None = None) -> None:
    """``safetensors.torch.save_file`` with the header's metadata keys sorted, so the same tensors and metadata
    always give the same bytes: safetensors writes metadata from a hash map, in an order that changes from one
    process to the next, and a rebuilt bundle should be byte-identical to the shipped one."""
    save_file(tensors, str(path), metadata=metadata)
    sort_safetensors_metadata(path)


def sort_safetensors_metadata(path: str | Path) -> None:
    """Rewrite a safetensors file's header in place with its metadata keys sorted.

    safetensors writes the metadata from a hash map, so the same tensors and metadata come out in a different byte
    order from one process to the next; a sorted header makes a rebuilt bundle byte-identical to the shipped one.
    The header keeps its length (same characters, same padding), so the tensor data is not touched.
    """
    with open(path, "r+b") as file:
        (length,) = struct.unpack("<Q", file.read(8))
        header = json.loads(file.read(length))
        metadata = header.get("__metadata__")
        if not metadata or len(metadata) < 2:
            return
        header["__metadata__"] = dict(sorted(metadata.items()))
        text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
        if len(text) > length:  # cannot happen for a header safetensors wrote; never corrupt the file
            raise ValueError(f"{path}: sorted safetensors header is longer than the original")
        file.seek(8)
        file.write(text.ljust(length, b" "))
