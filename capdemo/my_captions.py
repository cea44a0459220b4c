"""Bring your own captions: a visitor's caption list as a retrieval store for that visitor's session only.

A visitor pastes captions or uploads a text file (one caption per line) or a JSON list of strings, within
documented limits (MAX_LINES captions, MAX_BYTES bytes, MAX_CAPTION_CHARS characters each). They are embedded
with the encoder each retrieving method queries with (its datastore's encoder) into a flat faiss store
(:class:`~capdemo.retrieval.CaptionDatastore`), kept in the visitor's ``gr.State`` and so never seen by anyone
else. A retrieving method then searches the bundle's store, the visitor's, or both (:data:`RETRIEVE_FROM`);
every neighbour says which store it came from. ``save_zip`` writes the store as a datastore folder that
``--datastore`` and ``python -m training index --corpus captions.txt`` accept.

Anything wrong with the input (binary, not UTF-8, empty, over a limit) is a one-line ``ValueError``.
"""

from __future__ import annotations

import json
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from capdemo.result import Neighbour
from capdemo.retrieval import CAPTIONS_FILE, CaptionDatastore

MAX_LINES = 50_000  # captions per visitor
MAX_BYTES = 5 * 1024 * 1024  # size of the pasted text or uploaded file
MAX_CAPTION_CHARS = 300  # characters per caption (a longer line is a paragraph, not a caption)
EMBED_CHUNK = 512  # captions per encoder call (one progress step each)
BUNDLE, MINE, BOTH = "bundle", "mine", "both"
RETRIEVE_FROM = (BUNDLE, MINE, BOTH)  # which store a retrieving method searches
STORE_TAGS = {BUNDLE: "bundle", MINE: "mine"}  # what the neighbours table says about each store
ZIP_FOLDER = "my-captions-datastore"  # the folder inside the downloaded zip


def decode_text(data: bytes, *, name: str = "the text") -> str:
    """``data`` as UTF-8 text, or a one-line error: too large, binary (NUL bytes) or not UTF-8."""
    if len(data) > MAX_BYTES:
        raise ValueError(f"{name} is {len(data) / 2**20:.1f} MB; the limit is {MAX_BYTES / 2**20:.0f} MB")
    if b"\x00" in data:
        raise ValueError(f"{name} looks binary (it holds NUL bytes): give a UTF-8 text file, one caption per line")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise ValueError(f"{name} is not UTF-8 text (undecodable byte at position {err.start})") from None


def parse_captions(text: str, *, name: str = "the text") -> list[str]:
    """Captions from a JSON list of strings (text starting with '[') or from lines; blank lines dropped."""
    if len(text.encode("utf-8")) > MAX_BYTES:
        raise ValueError(f"{name} is over the {MAX_BYTES / 2**20:.0f} MB limit")
    stripped = text.strip()
    if stripped.startswith("["):
        try:
            items = json.loads(stripped)
        except json.JSONDecodeError as err:
            raise ValueError(f"{name} starts like a JSON list but is not one ({err.msg}, line {err.lineno})") from None
        if not isinstance(items, list) or not all(isinstance(item, str) for item in items):
            raise ValueError(f"{name} must be a JSON list of strings")
    else:
        items = stripped.splitlines()
    captions = [" ".join(item.split()) for item in items]
    captions = [caption for caption in captions if caption]
    if not captions:
        raise ValueError(f"no captions: {name} is empty or blank")
    if len(captions) > MAX_LINES:
        raise ValueError(f"{len(captions):,} captions; the limit is {MAX_LINES:,}")
    long = next((i for i, caption in enumerate(captions) if len(caption) > MAX_CAPTION_CHARS), None)
    if long is not None:
        raise ValueError(f"caption {long + 1} is {len(captions[long])} characters long; "
                         f"the limit is {MAX_CAPTION_CHARS}")
    if any(not ch.isprintable() for caption in captions for ch in caption):
        raise ValueError(f"{name} holds control characters: give plain text, one caption per line")
    return captions


def read_input(text: str | None, file: str | Path | None) -> list[str]:
    """The captions a visitor gave: the uploaded file when there is one, else the pasted text."""
    if file:
        path = Path(file)
        if path.stat().st_size > MAX_BYTES:
            raise ValueError(f"{path.name} is {path.stat().st_size / 2**20:.1f} MB; the limit is "
                             f"{MAX_BYTES / 2**20:.0f} MB")
        return parse_captions(decode_text(path.read_bytes(), name=path.name), name=path.name)
    return parse_captions(text or "")


class TaggedStore:
    """A datastore whose neighbours say which store they came from."""

    def __init__(self, store: CaptionDatastore, tag: str):
        self.store, self.tag = store, tag
        self.encoder_name = store.encoder_name

    def __len__(self) -> int:
        return len(self.store)

    @property
    def captions(self) -> Any:
        return self.store.captions

    def require_encoder(self, encoder_name: str) -> None:
        self.store.require_encoder(encoder_name)

    def retrieve(self, queries: torch.Tensor | np.ndarray, k: int) -> list[list[Neighbour]]:
        return [[replace(n, store=self.tag) for n in row] for row in self.store.retrieve(queries, min(k, len(self)))]


class CombinedStores:
    """Several stores searched as one: each query's best ``k`` over all of them, by cosine."""

    def __init__(self, stores: Sequence[TaggedStore]):
        self.stores = list(stores)
        self.encoder_name = self.stores[0].encoder_name

    def __len__(self) -> int:
        return sum(len(store) for store in self.stores)

    @property
    def captions(self) -> list[str]:
        return [store.captions[i] for store in self.stores for i in range(len(store))]

    def require_encoder(self, encoder_name: str) -> None:
        for store in self.stores:
            store.require_encoder(encoder_name)

    def retrieve(self, queries: torch.Tensor | np.ndarray, k: int) -> list[list[Neighbour]]:
        per_store = [store.retrieve(queries, k) for store in self.stores]
        return [sorted((n for rows in per_store for n in rows[q]), key=lambda n: -n.score)[:k]
                for q in range(len(per_store[0]))]


@dataclass
class MyCaptions:
    """One visitor's own captions, embedded once per retrieval encoder (encoder name -> flat store)."""

    captions: list[str]
    stores: dict[str, CaptionDatastore] = field(default_factory=dict)

    def __deepcopy__(self, memo: dict) -> MyCaptions:
        return self  # gr.State deep-copies its value per session; faiss indexes cannot be, and this one is built fresh

    @classmethod
    def build(cls, captions: Sequence[str], encoders: Sequence[Any],
              progress: Callable[[tuple[int, int], str], Any] | None = None) -> MyCaptions:
        """Embed ``captions`` with each encoder (``encode_text``, ``name``) into a flat store."""
        mine = cls(list(captions))
        steps = max(1, len(encoders) * -(-len(captions) // EMBED_CHUNK))
        done = 0
        for encoder in encoders:
            chunks = []
            for start in range(0, len(captions), EMBED_CHUNK):
                if progress is not None:
                    progress((done, steps), f"embedding captions {start + 1}-"
                                            f"{min(start + EMBED_CHUNK, len(captions))} of {len(captions)}")
                chunks.append(encoder.encode_text(list(captions[start : start + EMBED_CHUNK])).float().cpu())
                done += 1
            embeds = torch.cat(chunks)  # (N, D)
            mine.stores[encoder.name] = CaptionDatastore.build(embeds, mine.captions, encoder_name=encoder.name,
                                                               kind="flat")
        return mine

    def search_store(self, bundle_store: Any, retrieve_from: str) -> Any:
        """What a method whose own store is ``bundle_store`` searches when asked to use ``retrieve_from``."""
        if retrieve_from not in RETRIEVE_FROM:
            raise ValueError(f"retrieve_from must be one of {', '.join(RETRIEVE_FROM)}, got {retrieve_from!r}")
        own = self.stores.get(bundle_store.encoder_name)
        if own is None:
            raise ValueError("your captions were embedded for another retrieval encoder; add them again")
        mine = TaggedStore(own, STORE_TAGS[MINE])
        if retrieve_from == MINE:
            return mine
        return CombinedStores([TaggedStore(bundle_store, STORE_TAGS[BUNDLE]), mine])

    def save_zip(self, path: str | Path, encoder_name: str) -> Path:
        """The store for ``encoder_name`` as a zip of a datastore folder (index.faiss, captions.txt,
        datastore.json): ``--datastore`` opens the folder, ``python -m training index --corpus`` reads its
        captions.txt."""
        path = Path(path)
        folder = path.with_suffix("")
        self.stores[encoder_name].save(folder)
        with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as archive:
            for file in sorted(folder.iterdir()):
                archive.write(file, f"{ZIP_FOLDER}/{file.name}")
        return path


@dataclass(frozen=True)
class StoreChoice:
    """A caption request's retrieval choice: the session's own captions (or none) and which store to search."""

    mine: MyCaptions | None
    retrieve_from: str = BUNDLE

    def store_for(self, method: Any) -> Any:
        """The store ``method`` searches (None: its own, unchanged); one-line errors for impossible choices."""
        if self.retrieve_from not in RETRIEVE_FROM:
            raise ValueError(f"retrieve_from must be one of {', '.join(RETRIEVE_FROM)}, got {self.retrieve_from!r}")
        if self.retrieve_from == BUNDLE or method.datastore is None:
            return None
        if self.mine is None:
            raise ValueError("no captions of yours yet: add some under 'Bring your own captions' first")
        return self.mine.search_store(method.datastore, self.retrieve_from)


__all__ = [
    "BOTH", "BUNDLE", "CAPTIONS_FILE", "CombinedStores", "MAX_BYTES", "MAX_CAPTION_CHARS", "MAX_LINES", "MINE",
    "MyCaptions", "RETRIEVE_FROM", "StoreChoice", "TaggedStore", "decode_text", "parse_captions", "read_input",
]
