"""What every benchmark shares: settings, timing, memory, the machine, JSON output and the results table.

Numbers from a shared 2-core machine are noisy, so the helpers lean towards what
stays meaningful under load: medians over repeats after a warm-up, *interleaved*
repeats when two implementations are compared (a load spike hits both), the load
average recorded next to every result, and peak memory measured per section by a
sampling thread (the process's lifetime peak says nothing about one section).

Every benchmark module exposes ``run(*, quick, tiny, device, dtype) -> dict`` and
``summary(result) -> str`` and hands both to :func:`benchmark_main` for its CLI.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import resource
import statistics
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from capdemo.fileio import atomic_output

import psutil
import torch

README = Path(__file__).resolve().with_name("README.md")
TABLE_START = "<!-- results:start -->"  # the results table of README.md lies between these two lines
TABLE_END = "<!-- results:end -->"
TABLE_HEADER = ("date (UTC)", "machine", "command", "benchmark", "figures")
DEFAULT_THREADS = 2  # torch intra-op threads: the project's reference machine has 2 cores
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
DEVICES = ("cpu", "cuda")
# Environment every benchmark process runs under. OpenMP reads OMP_WAIT_POLICY once, when the
# runtime loads, so it has to be in the environment before torch or faiss is imported:
# busy-waiting threads run several times slower on a shared machine (docs/environment.md).
PROCESS_ENV = {
    "OMP_WAIT_POLICY": "PASSIVE",
    "TOKENIZERS_PARALLELISM": "false",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "GRADIO_ANALYTICS_ENABLED": "False",
}
MEMORY_POLL_S = 0.01  # how often the peak-memory sampler reads the RSS


class BenchmarkError(ValueError):
    """A benchmark asked to run in a way it cannot (bad device, dtype or size)."""


# ----------------------------------------------------------------------------------------- settings


@dataclass(frozen=True)
class Settings:
    """How a benchmark runs; the same four knobs for every module."""

    quick: bool = False  # the reduced sizes that keep `run.py --quick` under 5 minutes on 2 CPU cores
    tiny: bool = False  # tiny random models and minimal repeats: checks the plumbing (tests), measures nothing
    device: str = "cpu"  # "cpu" or "cuda"
    dtype: str = "fp32"  # model weights for inference: "fp32", "bf16" or "fp16" (fp16 needs CUDA)
    # the machine's 1/5/15-minute load when the benchmark started (made with its Settings), before its own work
    load_at_start: tuple[float, ...] = field(default_factory=lambda: tuple(round(x, 2) for x in os.getloadavg()),
                                             compare=False)

    def __post_init__(self) -> None:
        if self.device not in DEVICES:
            raise BenchmarkError(f"device must be one of {', '.join(DEVICES)}, got {self.device!r}")
        if self.dtype not in DTYPES:
            raise BenchmarkError(f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if self.device == "cuda" and not torch.cuda.is_available():
            raise BenchmarkError("device 'cuda' asked for, but torch sees no CUDA device")
        if self.dtype == "fp16" and self.device == "cpu":
            raise BenchmarkError("fp16 inference needs --device cuda (use bf16 or fp32 on CPU)")

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def mode(self) -> str:
        return "tiny" if self.tiny else "quick" if self.quick else "full"


def ensure_process_env() -> None:
    """Re-execute this process with :data:`PROCESS_ENV` when any of it is missing (it must precede OpenMP)."""
    missing = {name: value for name, value in PROCESS_ENV.items() if name not in os.environ}
    if missing:
        os.execve(sys.executable, sys.orig_argv, {**os.environ, **missing})


def set_threads(threads: int) -> None:
    """Pin torch (and faiss, when loaded) to ``threads`` intra-op threads."""
    torch.set_num_threads(threads)
    if "faiss" in sys.modules:
        sys.modules["faiss"].omp_set_num_threads(threads)


# ----------------------------------------------------------------------------------------- timing


@dataclass(frozen=True)
class Timing:
    """Wall times of the repeats of one measured call, in seconds."""

    samples: tuple[float, ...]

    @property
    def median(self) -> float:
        return statistics.median(self.samples)

    def to_dict(self, *, per: int = 1) -> dict[str, Any]:
        """Median, min and max divided by ``per`` (e.g. images per call), plus the repeat count."""
        return {"median_s": round(self.median / per, 4), "min_s": round(min(self.samples) / per, 4),
                "max_s": round(max(self.samples) / per, 4), "repeats": len(self.samples)}


def synchronize(device: torch.device | str) -> None:
    """Wait for queued GPU work, so a timer stopped afterwards counts it."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def time_calls(
    calls: dict[str, Callable[[], Any]],
    *,
    warmup: int = 1,
    repeats: int = 3,
    device: torch.device | str = "cpu",
    clock: Callable[[], float] = time.perf_counter,
) -> tuple[dict[str, Timing], dict[str, Any]]:
    """Time each call ``repeats`` times after ``warmup`` untimed runs, the calls interleaved round by round.

    Interleaving (A B A B ...) makes a change in machine load hit every call
    alike, so their ratio stays meaningful on a shared machine. Returns the
    timings and each call's last return value.
    """
    if repeats < 1 or warmup < 0:
        raise BenchmarkError(f"need repeats >= 1 and warmup >= 0, got {repeats} and {warmup}")
    for _ in range(warmup):
        for call in calls.values():
            call()
    synchronize(device)
    samples: dict[str, list[float]] = {name: [] for name in calls}
    outputs: dict[str, Any] = {}
    for _ in range(repeats):
        for name, call in calls.items():
            start = clock()
            outputs[name] = call()
            synchronize(device)
            samples[name].append(clock() - start)
    return {name: Timing(tuple(values)) for name, values in samples.items()}, outputs


def percentile(values: list[float], q: float) -> float:
    """The ``q``-th percentile (0-100) with linear interpolation between order statistics."""
    if not values:
        raise BenchmarkError("percentile of no values")
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100.0
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


# ----------------------------------------------------------------------------------------- memory


def rss_mb(pid: int | None = None) -> float:
    """Resident memory of a process now, in MiB."""
    return psutil.Process(pid).memory_info().rss / 2**20


def lifetime_peak_rss_mb() -> float:
    """This process's peak resident memory since it started, in MiB (``ru_maxrss``: KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10


def process_peak_rss_mb(pid: int) -> float | None:
    """Peak resident memory of another (live) process, from ``VmHWM`` in /proc; None where there is no /proc."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 2**10
    except OSError:
        return None
    return None


class PeakMemory:
    """Peak resident memory (and CUDA allocation) while a block runs, sampled by a background thread.

    ``start_mb`` is the RSS on entry, ``peak_mb`` the highest sample, ``delta_mb``
    their difference: what the block added at its worst moment.
    """

    def __init__(self, device: torch.device | str = "cpu", *, poll_s: float = MEMORY_POLL_S):
        self.device = torch.device(device)
        self.poll_s = poll_s
        self.start_mb = self.peak_mb = 0.0
        self.cuda_peak_mb: float | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> PeakMemory:
        self.start_mb = self.peak_mb = rss_mb()
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(self.poll_s):
            self.peak_mb = max(self.peak_mb, rss_mb())

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.peak_mb = max(self.peak_mb, rss_mb())
        if self.device.type == "cuda":
            self.cuda_peak_mb = torch.cuda.max_memory_allocated(self.device) / 2**20

    @property
    def delta_mb(self) -> float:
        return self.peak_mb - self.start_mb

    def to_dict(self) -> dict[str, float]:
        out = {"rss_start_mb": round(self.start_mb, 1), "rss_peak_mb": round(self.peak_mb, 1),
               "rss_delta_mb": round(self.delta_mb, 1)}
        if self.cuda_peak_mb is not None:
            out["cuda_peak_allocated_mb"] = round(self.cuda_peak_mb, 1)
        return out


# ----------------------------------------------------------------------------------------- the machine


def cpu_model() -> str:
    """The CPU's marketing name where the OS tells it, else the architecture."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine(device: torch.device | str = "cpu") -> dict[str, Any]:
    """What the figures were measured on, including how busy the machine was (load average)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    info: dict[str, Any] = {
        "cpu": cpu_model(),
        "cores": cores,
        "torch_threads": torch.get_num_threads(),
        "memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
        "load_average": [round(x, 2) for x in os.getloadavg()],  # now (a benchmark's envelope adds its start's)
        "platform": platform.platform(terse=True),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "(unset)"),
        "device": str(device),
    }
    if torch.device(device).type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def machine_label(info: dict[str, Any]) -> str:
    """One short line for the results table: CPU, cores, GPU, load average at the start."""
    gpu = info.get("gpu", "no GPU")
    load = info.get("load_average_at_start", info.get("load_average", [float("nan")]))[0]
    return f"{info.get('cpu', '?')}, {info.get('cores', '?')} cores, {gpu}, load {load:.1f}"


# ----------------------------------------------------------------------------------------- output


def envelope(name: str, settings: Settings, figures: dict[str, Any], *, started: float) -> dict[str, Any]:
    """A benchmark's JSON object: its figures plus what they were measured on and how long it took."""
    return {
        "benchmark": name,
        "mode": settings.mode,
        "device": settings.device,
        "dtype": settings.dtype,
        "machine": {**machine(settings.device), "load_average_at_start": list(settings.load_at_start)},
        **figures,
        "wall_s": round(time.perf_counter() - started, 1),
    }


def utc_now() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M")


def _cell(text: str) -> str:
    return " ".join(str(text).split()).replace("|", "\\|")


def results_row(
    *, benchmark: str, figures: str, command: str, machine_info: dict[str, Any], date: str | None = None
) -> str:
    """One markdown row of the results table."""
    cells = (date or utc_now(), machine_label(machine_info), f"`{command}`", benchmark, figures)
    return "| " + " | ".join(_cell(c) for c in cells) + " |"


def append_results_rows(rows: list[str], readme: Path = README) -> None:
    """Add rows at the end of the results table in ``readme`` (written atomically).

    The table lies between :data:`TABLE_START` and :data:`TABLE_END`; when the
    markers are missing, a new table is appended at the end of the file.
    """
    text = readme.read_text() if readme.exists() else ""
    if TABLE_START not in text or TABLE_END not in text:
        header = "| " + " | ".join(TABLE_HEADER) + " |\n|" + "---|" * len(TABLE_HEADER)
        text = text.rstrip("\n") + f"\n\n{TABLE_START}\n{header}\n{TABLE_END}\n"
    head, rest = text.split(TABLE_END, 1)
    text = head.rstrip("\n") + "\n" + "\n".join(rows) + "\n" + TABLE_END + rest
    with atomic_output(readme) as temporary:
        temporary.write_text(text)


def command_line() -> str:
    """How this process was started, as someone would type it (``python -m benchmarks.x --quick``)."""
    argv = list(sys.orig_argv)
    argv[0] = "python"
    return " ".join(argv)


# ----------------------------------------------------------------------------------------- the CLI


def add_settings_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quick", action="store_true", help="reduced sizes (the whole suite in < 5 min on 2 cores)")
    parser.add_argument("--tiny", action="store_true", help="tiny random models: a smoke test, not a measurement")
    parser.add_argument("--device", default="cpu", choices=DEVICES, help="where the models run")
    parser.add_argument("--dtype", default="fp32", choices=list(DTYPES), help="inference weight dtype")
    parser.add_argument("--threads", type=int, default=DEFAULT_THREADS, help="torch intra-op threads")
    parser.add_argument("--json", action="store_true", help="print the one JSON object instead of a summary")
    parser.add_argument("--record", action="store_true",
                        help="append a row to the results table of benchmarks/README.md (a tracked file)")


def settings_from_arguments(args: argparse.Namespace) -> Settings:
    return Settings(quick=args.quick, tiny=args.tiny, device=args.device, dtype=args.dtype)


def benchmark_main(
    name: str,
    run: Callable[..., dict[str, Any]],
    summary: Callable[[dict[str, Any]], str],
    *,
    description: str,
    argv: list[str] | None = None,
) -> int:
    """The command line of one benchmark module: run it, print JSON or the summary; with ``--record``, add a
    row to the results table.

    Started from a shell (``argv`` None), the process first re-executes itself with :data:`PROCESS_ENV`.
    """
    if argv is None:
        ensure_process_env()
    parser = argparse.ArgumentParser(prog=f"python -m benchmarks.{name}", description=description)
    add_settings_arguments(parser)
    args = parser.parse_args(argv)
    try:
        settings = settings_from_arguments(args)
    except BenchmarkError as err:
        parser.error(str(err))
    set_threads(args.threads)
    result = run(quick=settings.quick, tiny=settings.tiny, device=settings.device, dtype=settings.dtype)
    print(json.dumps(result) if args.json else f"{name}: {summary(result)}", flush=True)
    if args.record and not settings.tiny:
        append_results_rows([results_row(benchmark=name, figures=summary(result), command=command_line(),
                                         machine_info=result["machine"])])
    return 0
