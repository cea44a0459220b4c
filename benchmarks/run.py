"""Run every benchmark and print one JSON object with all their figures; ``--record`` writes them into the README.

    python benchmarks/run.py --quick --json          # < 5 min on 2 CPU cores
    python benchmarks/run.py --json                  # the full sizes (much longer on a CPU)
    python benchmarks/run.py --only maccap_latency --device cuda --dtype bf16

Each benchmark runs in its own process (``python -m benchmarks.<name>``): its
peak memory is then its own, a crash in one leaves the others' figures, and
every process starts with OMP_WAIT_POLICY=PASSIVE and the same thread count.
The printed object maps each benchmark's name to its JSON (failures go under
``"failed"`` with the end of their log); with ``--record`` (never with ``--tiny``),
one row per benchmark is appended to the results table of benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script (python benchmarks/run.py): make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import common

REPO_ROOT = Path(__file__).resolve().parents[1]
LOG_TAIL_CHARS = 2000  # how much of a failed benchmark's log the JSON keeps


def datastore_summary(result: dict[str, Any]) -> str:
    """The datastore benchmark (another issue's module) has no summary of its own: its largest size's figures."""
    largest = result["sizes"][-1]
    return (f"{largest['count']} x {largest['dim']}: flat {largest['flat']['batch1_ms_per_query']} ms/query, "
            f"ivfpq {largest['ivfpq']['batch1_ms_per_query']} ms/query, recall@4 {largest['ivfpq'].get('recall_at_4')}")


@dataclass(frozen=True)
class Benchmark:
    """One benchmark module and how this runner drives it."""

    name: str  # module benchmarks/<name>.py
    in_quick: bool  # part of --quick (the datastore benchmark's quick mode alone takes 1-2 min)
    common_cli: bool  # takes benchmark_main's arguments (--json --tiny ...) and has summary(); else only --quick
    cpu_only: bool = False  # measures CPU serving itself: left out of a --device cuda run

    def summary(self, result: dict[str, Any]) -> str:
        if not self.common_cli:
            return datastore_summary(result)
        return importlib.import_module(f"benchmarks.{self.name}").summary(result)


BENCHMARKS = (
    Benchmark("maccap_latency", in_quick=True, common_cli=True),
    Benchmark("tomcap_latency", in_quick=True, common_cli=True),
    Benchmark("throughput", in_quick=True, common_cli=True),
    Benchmark("training_throughput", in_quick=True, common_cli=True),
    Benchmark("app_latency", in_quick=True, common_cli=True),
    Benchmark("serving_precision", in_quick=True, common_cli=True, cpu_only=True),
    Benchmark("datastore", in_quick=False, common_cli=False),
    Benchmark("shapes_build", in_quick=False, common_cli=True, cpu_only=True),  # minutes even at its quick size
)
BY_NAME = {benchmark.name: benchmark for benchmark in BENCHMARKS}


def arguments_for(benchmark: Benchmark, settings: common.Settings, threads: int) -> list[str]:
    if not benchmark.common_cli:
        return ["--quick"] if settings.quick or settings.tiny else []
    flags = ["--json", "--device", settings.device, "--dtype", settings.dtype, "--threads", str(threads)]
    return flags + (["--tiny"] if settings.tiny else ["--quick"] if settings.quick else [])


def parse_output(stdout: str) -> dict[str, Any]:
    """The benchmark's JSON object: the whole output, or else its last line that parses as an object."""
    try:
        return json.loads(stdout)
    except json.JSONDecodeError:
        for line in reversed(stdout.splitlines()):
            if line.startswith("{"):
                return json.loads(line)
        raise


def run_one(benchmark: Benchmark, settings: common.Settings, threads: int, log_dir: Path) -> dict[str, Any]:
    """Run one benchmark in its own process; its JSON, or ``{"error": ..., "log_tail": ...}``."""
    log = log_dir / f"{benchmark.name}.log"
    command = [sys.executable, "-m", f"benchmarks.{benchmark.name}", *arguments_for(benchmark, settings, threads)]
    env = {**os.environ, **common.PROCESS_ENV, "OMP_NUM_THREADS": str(threads)}
    with open(log, "wb") as stderr:
        done = subprocess.run(command, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=stderr, text=True)
    if done.returncode == 0:
        try:
            return parse_output(done.stdout)
        except json.JSONDecodeError:
            pass
    tail = (log.read_text(errors="replace") + done.stdout)[-LOG_TAIL_CHARS:]
    return {"error": f"exit code {done.returncode}", "log_tail": tail}


def run_all(names: list[str], settings: common.Settings, *, threads: int = common.DEFAULT_THREADS) -> dict[str, Any]:
    """Every named benchmark, one after the other; the combined object."""
    started = time.perf_counter()
    combined: dict[str, Any] = {"mode": settings.mode, "machine": common.machine(settings.device)}
    failed: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="capdemo-bench-logs-") as logs:
        for name in names:
            result = run_one(BY_NAME[name], settings, threads, Path(logs))
            if "error" in result:
                failed[name] = result
            else:
                combined[name] = result
    combined["failed"] = failed
    combined["wall_s"] = round(time.perf_counter() - started, 1)
    return combined


def record(combined: dict[str, Any], names: list[str], command: str, *, readme: Path = common.README) -> None:
    """One results-table row per benchmark that produced figures."""
    rows = [common.results_row(benchmark=name, figures=BY_NAME[name].summary(combined[name]), command=command,
                               machine_info=combined[name].get("machine", combined["machine"]))
            for name in names if name in combined]
    if rows:
        common.append_results_rows(rows, readme)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python benchmarks/run.py", description=__doc__.split("\n\n")[0])
    common.add_settings_arguments(parser)
    parser.add_argument("--only", nargs="+", choices=list(BY_NAME), default=None,
                        help="run these benchmarks only (default: all; --quick leaves out datastore)")
    args = parser.parse_args(argv)
    try:
        settings = common.settings_from_arguments(args)
    except common.BenchmarkError as err:
        parser.error(str(err))
    quick = settings.quick or settings.tiny
    names = args.only or [b.name for b in BENCHMARKS
                          if (b.in_quick or not quick) and not (b.cpu_only and settings.device != "cpu")]
    combined = run_all(names, settings, threads=args.threads)
    if args.json:
        print(json.dumps(combined), flush=True)
    else:
        for name in names:
            line = BY_NAME[name].summary(combined[name]) if name in combined else combined["failed"][name]["error"]
            print(f"{name}: {line}")
        print(f"total {combined['wall_s']} s")
    if args.record and not settings.tiny:
        record(combined, names, common.command_line())
    return 1 if combined["failed"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
