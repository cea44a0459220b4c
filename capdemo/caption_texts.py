"""Captions stored as UTF-8 lines in one buffer, indexed by line offsets: a datastore's texts, read lazily.

A store of 16M captions is ~1-2 GB of text; :meth:`CaptionTexts.open` memory-maps ``captions.txt`` and
keeps only the line offsets in RAM, so a caption is decoded when it is asked for.
"""

from __future__ import annotations

import mmap
import os
from collections.abc import Sequence
from pathlib import Path
from typing import overload

import numpy as np

from capdemo.fileio import atomic_output
from capdemo.index_spec import DatastoreError

_SCAN_CHUNK = 1 << 26  # bytes scanned at a time when indexing the lines of captions.txt



class CaptionTexts(Sequence[str]):
    """Captions stored as UTF-8 lines in one buffer (bytes, or a read-only mmap of captions.txt)."""

    def __init__(self, buffer: bytes | mmap.mmap, line_starts: np.ndarray):
        self._buffer = buffer
        self._starts = line_starts  # (N + 1,) int64 byte offset of each line; the last is the buffer length

    @classmethod
    def from_list(cls, captions: Sequence[str]) -> CaptionTexts:
        for i, caption in enumerate(captions):
            if not isinstance(caption, str):
                raise DatastoreError(f"caption {i} is a {type(caption).__name__}, not a string")
            if "\n" in caption or "\r" in caption:
                raise DatastoreError(f"caption {i} contains a line break; captions must be single lines")
        encoded = [caption.encode("utf-8") + b"\n" for caption in captions]
        starts = np.zeros(len(encoded) + 1, dtype=np.int64)
        np.cumsum([len(line) for line in encoded], out=starts[1:])
        return cls(b"".join(encoded), starts)

    @classmethod
    def open(cls, path: Path, *, use_mmap: bool) -> CaptionTexts:
        with open(path, "rb") as handle:
            if os.fstat(handle.fileno()).st_size == 0:
                raise DatastoreError(f"{path}: empty captions file")
            buffer = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) if use_mmap else handle.read()
        view = np.frombuffer(buffer, dtype=np.uint8)
        ends = [  # byte offset just past each "\n", scanned in chunks to bound the temporary mask
            np.flatnonzero(view[i : i + _SCAN_CHUNK] == ord("\n")) + i + 1 for i in range(0, len(view), _SCAN_CHUNK)
        ]
        starts = np.concatenate([np.zeros(1, dtype=np.int64), *ends]).astype(np.int64)
        del view  # an mmap cannot be closed while numpy still exports it
        if starts[-1] != len(buffer):
            raise DatastoreError(f"{path}: the last caption has no line end (truncated file?)")
        return cls(buffer, starts)

    def write(self, path: Path) -> None:
        with atomic_output(path) as tmp:
            tmp.write_bytes(self._buffer[: self._starts[-1]])

    def __len__(self) -> int:
        return len(self._starts) - 1

    @overload
    def __getitem__(self, index: int) -> str: ...
    @overload
    def __getitem__(self, index: slice) -> list[str]: ...
    def __getitem__(self, index: int | slice) -> str | list[str]:
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        if not -len(self) <= index < len(self):
            raise IndexError(f"caption id {index} out of range for {len(self)} captions")
        index %= len(self)
        return self._buffer[self._starts[index] : self._starts[index + 1] - 1].decode("utf-8")


__all__ = ["CaptionTexts"]
