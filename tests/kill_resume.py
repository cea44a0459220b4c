"""Kill a training command with SIGKILL at chosen points, for the resume tests of `python -m training maccap/tomcap`.

Each kill waits until the run has written a checkpoint beyond the last one seen, then either
sleeps a (seeded, random) delay or waits for the next checkpoint write to begin (a new file in
the checkpoint folder), and sends SIGKILL. After each kill every checkpoint file under its final
name must load completely.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from training.checkpoints import CHECKPOINT_FORMAT, Checkpoint, checkpoint_paths, load_checkpoint

REPO_ROOT = Path(__file__).resolve().parents[1]
CHECKPOINT_NAME = re.compile(r"^step-(\d+)\.safetensors$")
MID_WRITE = "mid-write"  # a kill plan: SIGKILL as soon as a new file appears (a checkpoint write has begun)


@dataclass
class Kill:
    """What one kill left behind."""

    plan: float | str  # the delay in seconds after a new checkpoint, or MID_WRITE
    step: int  # the newest checkpoint on disk after the kill
    checkpoints: list[Checkpoint]  # every checkpoint on disk after the kill, each loaded in full
    temp_files: list[str]  # temporary files a killed writer left (never under a checkpoint's name)

    def __repr__(self) -> str:
        return (f"Kill(plan={self.plan!r}, step={self.step}, on disk={[c.step for c in self.checkpoints]},"
                f" temp files={self.temp_files})")


def _newest_step(directory: Path) -> int:
    paths = checkpoint_paths(directory)
    return int(paths[-1].stem.split("-")[1]) if paths else 0


def temp_files(directory: Path) -> list[str]:
    """Hidden files in a checkpoint folder: the loop's ``.step-*.tmp`` and safetensors' own ``.tmpXXXXXX``."""
    return sorted(entry.name for entry in os.scandir(directory) if entry.name.startswith(".")) \
        if directory.is_dir() else []


def _output(log) -> str:
    log.seek(0)
    return log.read().decode(errors="replace")[-3000:]


def _entries(directory: Path) -> set[str]:
    return {entry.name for entry in os.scandir(directory)}


def _new_files(directory: Path, known: set[str], newest: int) -> set[str]:
    """Names in ``directory`` not in ``known``, ignoring checkpoints up to step ``newest`` (a listing taken
    while files are renamed may miss one, which must not count as new)."""
    fresh = set()
    for name in _entries(directory) - known:
        match = CHECKPOINT_NAME.match(name)
        if match is None or int(match[1]) > newest:
            fresh.add(name)
    return fresh


def _wait(condition, process: subprocess.Popen, log, what: str, timeout: float, poll: float) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if process.poll() is not None:
            raise AssertionError(f"the run ended (exit {process.returncode}) while waiting for {what}:\n{_output(log)}")
        if time.monotonic() > deadline:
            raise AssertionError(f"no {what} within {timeout} s")
        time.sleep(poll)


def kill_during_training(command: list[str], checkpoint_dir: Path, plans: list[float | str], *,
                         total_steps: int, timeout: float = 120.0) -> list[Kill]:
    """Run ``command`` (it must resume on its own, i.e. pass --resume) once per plan, SIGKILLing each run."""
    kills: list[Kill] = []
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"}
    for plan in plans:
        reached = _newest_step(checkpoint_dir)
        with tempfile.TemporaryFile() as log:  # a file, not a pipe: a full pipe would stall the run
            process = subprocess.Popen([sys.executable, *command], cwd=REPO_ROOT, env=env,
                                       stdout=subprocess.DEVNULL, stderr=log)
            try:
                _wait(lambda reached=reached: _newest_step(checkpoint_dir) > reached, process, log,
                      f"a checkpoint after step {reached}", timeout, 0.005)
                if plan == MID_WRITE:  # the first new file of the next write (a temp file, or a checkpoint
                    newest = _newest_step(checkpoint_dir)  # a careless writer would fill under its final name)
                    known = _entries(checkpoint_dir)
                    started = lambda known=known, newest=newest: bool(_new_files(checkpoint_dir, known, newest))  # noqa: E731
                    _wait(started, process, log, "a checkpoint write", timeout, 0.001)
                else:
                    time.sleep(plan)
                process.kill()
                code = process.wait()
            finally:
                if process.poll() is None:
                    process.kill()
                    process.wait()
            assert code == -signal.SIGKILL, (
                f"the run ended (exit {code}) before the kill (plan {plan}, plans {plans}):\n{_output(log)}")
        checkpoints = [load_checkpoint(path) for path in checkpoint_paths(checkpoint_dir)]  # raises if one is broken
        assert checkpoints, "no checkpoint on disk after the kill"
        for checkpoint in checkpoints:
            assert checkpoint.path.name == f"step-{checkpoint.step:08d}.safetensors", checkpoint.path
        step = checkpoints[-1].step
        assert reached < step < total_steps, f"kill {len(kills) + 1} left step {step} (before it: {reached})"
        kills.append(Kill(plan=plan, step=step, checkpoints=checkpoints, temp_files=temp_files(checkpoint_dir)))
    return kills


def assert_same_tensors(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], what: str) -> None:
    assert actual.keys() == expected.keys(), what
    for name, value in expected.items():
        assert actual[name].dtype == value.dtype and torch.equal(actual[name], value), f"{what}: {name} differs"


def differs(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> bool:
    return any(not torch.equal(actual[name], value) for name, value in expected.items())


def final_checkpoint_tensors(run_dir: Path) -> dict[str, torch.Tensor]:
    """Weights and AdamW state of the newest checkpoint in ``run_dir``."""
    return load_file(checkpoint_paths(run_dir / "checkpoints")[-1])


def write_checkpoint_as_step(checkpoint: Checkpoint, directory: Path, step: int) -> Path:
    """A copy of ``checkpoint`` that claims to be from ``step``: resuming it replays (or skips) steps."""
    state = {**checkpoint.state, "step": step}
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"step-{step:08d}.safetensors"
    save_file(checkpoint.tensors, path, metadata={"format": CHECKPOINT_FORMAT, "state": json.dumps(state)})
    return path
