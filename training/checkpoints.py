"""Training checkpoints on disk: one safetensors file per step, written so a kill never corrupts one.

A checkpoint is one file, ``<out_dir>/checkpoints/step-XXXXXXXX.safetensors``: trainable weights
under ``model/``, AdamW state under ``optim/``, and the JSON training state (step, config,
loss scaler, history) in the safetensors metadata. It is written to a temporary file in the
same folder, fsynced and renamed (:func:`capdemo.fileio.atomic_output`), so a file under a final
name is always complete; resuming takes the newest file that loads and skips, with a warning, any
that do not.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from capdemo.fileio import TEMP_SUFFIX, atomic_output

log = logging.getLogger(__name__)

CHECKPOINT_FORMAT = "capdemo.train-checkpoint/1"
_CHECKPOINT_NAME = re.compile(r"^step-(\d+)\.safetensors$")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used: unreadable, from another format, or from another run."""


@dataclass(frozen=True)
class Checkpoint:
    """One checkpoint read back from disk (tensors on the CPU)."""

    path: Path
    tensors: dict[str, torch.Tensor]  # "model/<param name>" and "optim/<param name>/<AdamW state key>"
    state: dict[str, Any]  # JSON training state: step, config, dataset_size, grad_scaler, history, ...

    @property
    def step(self) -> int:
        return int(self.state["step"])

    def model_state(self) -> dict[str, torch.Tensor]:
        """The trainable weights, keyed by parameter name (ready for ``load_state_dict(strict=False)``)."""
        return {key.removeprefix("model/"): value for key, value in self.tensors.items() if key.startswith("model/")}


def checkpoint_path(directory: str | Path, step: int) -> Path:
    return Path(directory) / f"step-{step:08d}.safetensors"


def checkpoint_paths(directory: str | Path) -> list[Path]:
    """Files under a checkpoint's final name in ``directory``, oldest step first (temp files excluded)."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = [(int(match[1]), path) for path in directory.iterdir() if (match := _CHECKPOINT_NAME.match(path.name))]
    return [path for _, path in sorted(found)]


def load_checkpoint(path: str | Path) -> Checkpoint:
    """Read one checkpoint; raises CheckpointError (one line) unless it is complete and ours."""
    path = Path(path)
    try:
        with safe_open(path, framework="pt") as reader:
            metadata = reader.metadata() or {}
            tensors = {key: reader.get_tensor(key) for key in reader.keys()}
    except (SafetensorError, OSError) as err:
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise CheckpointError(f"{path}: not a readable checkpoint ({reason})") from None
    if metadata.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path}: format {metadata.get('format')!r} is not {CHECKPOINT_FORMAT!r}")
    try:
        state = json.loads(metadata["state"])
    except (KeyError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{path}: training state is missing or not JSON ({err})") from None
    return Checkpoint(path=path, tensors=tensors, state=state)


def latest_checkpoint(directory: str | Path) -> Checkpoint | None:
    """The newest checkpoint in ``directory`` that loads, skipping broken ones with a warning.

    None when there is no checkpoint at all; CheckpointError when there are some but none loads,
    because silently starting over would throw a run away.
    """
    candidates = checkpoint_paths(directory)
    for path in reversed(candidates):
        try:
            return load_checkpoint(path)
        except CheckpointError as err:
            log.warning("skipping a broken checkpoint: %s", err)
    if candidates:
        raise CheckpointError(f"none of the {len(candidates)} checkpoint(s) in {directory} loads;"
                              " see the warnings above")
    return None


def write_json_atomically(path: Path, data: Any) -> None:
    with atomic_output(path, durable=True) as tmp:
        tmp.write_text(json.dumps(data, indent=1) + "\n")


def remove_stale_temp_files(directory: Path) -> None:
    """Temp files of a run that was killed while writing; never a checkpoint, so never needed.

    Besides ours (``.step-*.tmp``, from :func:`capdemo.fileio.atomic_output`), safetensors' ``save_file``
    writes through a temp file of its
    own in the same folder (``.tmpXXXXXX``), which a kill during the write leaves behind too.
    """
    for pattern in (f".*{TEMP_SUFFIX}", ".tmp*"):
        for path in directory.glob(pattern):
            path.unlink(missing_ok=True)
