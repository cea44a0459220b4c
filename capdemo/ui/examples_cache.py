"""Cached example captions that belong to the bundle and code that made them.

Gradio keeps a clicked example's outputs under ``.gradio/cached_examples/<component id>``, a path that names
neither the bundle nor capdemo's version. A checkout that served one bundle and then pulled new weights (or new
code) would keep showing the old captions, heatmaps and candidates for the examples. Each cache folder therefore
gets a stamp of what produced it, and a folder whose stamp differs is emptied before the app serves it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from pathlib import Path
from typing import Any

from capdemo.fileio import atomic_output

log = logging.getLogger(__name__)

STAMP = "capdemo-source.json"  # written inside Gradio's cache folder, next to its log.csv


def source_key(info: dict[str, Any], version: str) -> str:
    """What an example's outputs depend on, as one hash: capdemo's version, the bundle's components and file
    digests, the methods served and the serving precision (``info`` is ``Captioner.info()``)."""
    source = {"capdemo": version, "components": info["components"], "files": info["file_entries"],
              "methods": info["methods"], "precision": info["precision"]}
    return hashlib.sha256(json.dumps(source, sort_keys=True, default=str).encode()).hexdigest()


def claim_examples_cache(folder: Path, key: str) -> bool:
    """Make ``folder`` (a ``gr.Examples``' ``cached_folder``) hold outputs of ``key`` only: a folder stamped with
    another key, or with none, is emptied. Returns whether stale outputs were removed."""
    stamp = folder / STAMP
    try:
        current = json.loads(stamp.read_text())["key"] if stamp.is_file() else None
    except (OSError, ValueError, KeyError, TypeError):
        current = None  # an unreadable stamp is a stale one
    if current == key:
        return False
    stale = folder.exists() and any(folder.iterdir())
    if stale:
        log.info("examples cache %s was made by another bundle or version: emptied", folder)
        shutil.rmtree(folder)
    folder.mkdir(parents=True, exist_ok=True)
    with atomic_output(stamp) as tmp:
        tmp.write_text(json.dumps({"key": key}))
    return stale
