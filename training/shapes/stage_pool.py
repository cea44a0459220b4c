"""Run a build's independent stages side by side, in worker processes that keep the build's torch threads.

The shapes build's stages are small models whose matrix products keep only about 1.4 of two cores busy, so two
stages that need nothing of each other (the CLIP and the LM; the three methods) finish sooner side by side. Every
stage seeds its own randomness (the CLIP's and the LM's initialisation, each command's ``--seed``, the training
loop's per-step seeds) and a worker uses the thread count the build's own process would, so a stage computes the
same bits in a worker as in process: the number of jobs changes how long a build takes, never what it makes
(tests/test_shapes_smoke.py compares the two). With one job every stage runs in process, one after another.
"""

from __future__ import annotations

import ctypes
import multiprocessing
import os
import signal
import sys
import time
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass
from typing import Any
from collections.abc import Callable

import torch


@dataclass
class StageRun:
    """What a stage returned, and the wall and CPU seconds it took in the process that ran it."""

    value: Any
    seconds: dict[str, float]


def clocks() -> tuple[float, float]:
    """This process's wall and CPU clocks now, for :func:`seconds_since`."""
    return time.perf_counter(), time.process_time()


def seconds_since(start: tuple[float, float]) -> dict[str, float]:
    """Wall and process CPU seconds since ``start`` (:func:`clocks`); CPU time counts every thread of the process."""
    wall, cpu = start
    return {"wall_s": round(time.perf_counter() - wall, 1), "cpu_s": round(time.process_time() - cpu, 1)}


def timed_call(function: Callable[..., Any], *args: Any) -> StageRun:
    """``function(*args)`` with the seconds it took."""
    start = clocks()
    value = function(*args)
    return StageRun(value, seconds_since(start))


def _start_worker(threads: int) -> None:
    """A worker's setup: the build's torch threads; on Linux, die with the build (a killed build leaves no stage
    training on, so its resumed build never races an orphan for the same run dir)."""
    torch.set_num_threads(threads)
    if sys.platform == "linux":
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG


class StagePool:
    """``jobs`` worker processes (spawned: no forked torch state) that run stages; ``jobs=1`` runs them in process.

    Use as a context manager; :meth:`submit` returns a future of a :class:`StageRun`.
    """

    def __init__(self, jobs: int):
        if jobs < 1:
            raise ValueError(f"jobs must be at least 1, got {jobs}")
        self.jobs = jobs
        self._executor: ProcessPoolExecutor | None = None

    def __enter__(self) -> StagePool:
        if self.jobs > 1:
            # the workers' OpenMP threads must sleep, not spin, while they share the cores (read when a worker
            # starts; it does not change any result)
            os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
            self._executor = ProcessPoolExecutor(self.jobs, mp_context=multiprocessing.get_context("spawn"),
                                                 initializer=_start_worker, initargs=(torch.get_num_threads(),))
        return self

    def __exit__(self, *exc_info: Any) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=True, cancel_futures=True)
            self._executor = None

    def submit(self, function: Callable[..., Any], *args: Any) -> Future[StageRun]:
        """Run ``function(*args)`` (importable and picklable, as its arguments) in a worker, or now in process."""
        if self._executor is not None:
            return self._executor.submit(timed_call, function, *args)
        done: Future[StageRun] = Future()
        done.set_result(timed_call(function, *args))  # an error raises here, as the serial build always did
        return done
