"""The app: cold start to first caption, /caption latency under concurrent users, peak memory, tower passes.

    python -m benchmarks.app_latency [--quick] [--json]

``python app.py`` is started as its own process on 127.0.0.1 and driven only
through ``gradio_client``, as a user's script would:

* cold start: from launching the process (imports, loading and verifying the
  bundle, building the page) to the first /caption response;
* latency under load: 8 users, each its own client in its own thread, send
  /caption requests back to back (distinct images, both methods, bundle
  defaults); p50 / p95 over all requests, queueing included (the app runs one
  model event at a time by design);
* the server's peak resident memory (``VmHWM``) over the whole run.

It also checks in this process that a caption request followed by the
embedding plots of the same image runs the vision tower once. The bundle is
``weights/shapes`` when present, else the tiny random test bundle.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks import common
from benchmarks.models import app_bundle
from capdemo.pipeline import Captioner

NAME = "app_latency"
REPO_ROOT = Path(__file__).resolve().parents[1]
USERS = 8  # concurrent gradio_client users (issue #7)
HOST = "127.0.0.1"  # the server is never exposed beyond this machine
START_TIMEOUT_S = 600.0  # how long the server may take to answer its first request
POLL_S = 0.5  # wait between connection attempts while the server starts
STOP_TIMEOUT_S = 60.0  # how long the server may take to exit after SIGTERM before it is killed
MEMORY_TARGET_MB = 1536  # issue #7: the app's peak memory on CPU with the shapes bundle stays below 1.5 GB


@dataclass(frozen=True)
class Plan:
    requests_per_user: int


def plan_for(settings: common.Settings) -> Plan:
    if settings.tiny:
        return Plan(requests_per_user=1)
    return Plan(requests_per_user=2 if settings.quick else 10)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind((HOST, 0))
        return probe.getsockname()[1]


def write_images(folder: Path, count: int, captioner: Any) -> list[Path]:
    """``count`` distinct held-out test images of the bundle's shapes world as PNG files (no encoder-cache hits)."""
    from training.shapes import world
    from training.shapes.evaluate import world_config_of

    config = world_config_of(captioner)
    paths = []
    for i, image in enumerate(world.generate_images(count, seed=config.test_seed, config=config)):
        paths.append(folder / f"request-{i}.png")
        image.save(paths[-1])
    return paths


def caption_request(client: Any, image: Path, methods: list[str]) -> float:
    """One /caption call with the bundle's default settings; its wall time in seconds."""
    from gradio_client import handle_file

    started = time.perf_counter()
    client.predict(image=handle_file(str(image)), methods=methods, api_name="/caption")
    return time.perf_counter() - started


def connect(url: str, server: subprocess.Popen, deadline: float) -> Any:
    """A client of the server at ``url``, retried until it answers (or the server dies, or time runs out)."""
    from gradio_client import Client

    while True:
        try:
            return Client(url, verbose=False)
        except Exception as err:  # the server is still starting: connection refused, or no config yet
            if server.poll() is not None:
                raise common.BenchmarkError(f"the app exited with code {server.returncode} while starting") from err
            if time.monotonic() > deadline:
                raise common.BenchmarkError(f"the app did not answer within {START_TIMEOUT_S:.0f} s") from err
            time.sleep(POLL_S)


def concurrent_latencies(url: str, images: list[Path], methods: list[str], users: int) -> tuple[list[float], float]:
    """Every request's latency when ``users`` clients send their share of ``images`` at once; and the wall time."""
    from gradio_client import Client

    shares = [images[user::users] for user in range(users)]
    latencies: list[list[float]] = [[] for _ in range(users)]
    errors: list[BaseException] = []
    start = threading.Barrier(users + 1)

    def user(index: int) -> None:
        try:
            client = Client(url, verbose=False)  # connecting is not part of a request's latency
        except BaseException as err:
            errors.append(err)
            start.abort()
            return
        try:
            start.wait()
            for image in shares[index]:
                latencies[index].append(caption_request(client, image, methods))
        except BaseException as err:  # reported after the join
            errors.append(err)

    threads = [threading.Thread(target=user, args=(i,)) for i in range(users)]
    for thread in threads:
        thread.start()
    try:
        start.wait()
    except threading.BrokenBarrierError:
        pass  # a client could not connect: the error is raised below
    began = time.perf_counter()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - began
    if errors:
        raise common.BenchmarkError(f"{len(errors)} of {users} users failed; first: {errors[0]}")
    return [value for per_user in latencies for value in per_user], wall


def vision_passes_per_request(captioner: Any, image: Path) -> dict[str, int]:
    """Vision-tower passes for a caption request (all methods), then for the embedding plots of the same image."""
    from capdemo.ui import CaptionDemo

    demo = CaptionDemo(captioner)
    encoder = captioner.encoder
    before = encoder.images_encoded
    view = demo.caption_event(str(image), list(captioner.methods), progress=lambda *a, **k: None)
    after_caption = encoder.images_encoded
    demo.embedding_event(str(image), "pca", view.session, progress=lambda *a, **k: None)
    return {"caption": after_caption - before, "caption_then_embedding": encoder.images_encoded - before}


def launch(bundle: Path, port: int, settings: common.Settings, log: Path) -> subprocess.Popen:
    env = {**os.environ, **common.PROCESS_ENV}
    command = [sys.executable, "app.py", "--weights", str(bundle), "--host", HOST, "--port", str(port),
               "--device", settings.device]
    with open(log, "wb") as sink:
        return subprocess.Popen(command, cwd=REPO_ROOT, env=env, stdout=sink, stderr=subprocess.STDOUT)


def run(*, quick: bool = False, tiny: bool = False, device: str = "cpu", dtype: str = "fp32") -> dict[str, Any]:
    """Cold start, latency under 8 users and peak memory of ``python app.py`` (the app serves in fp32)."""
    started = time.perf_counter()
    settings = common.Settings(quick=quick, tiny=tiny, device=device, dtype=dtype)
    plan = plan_for(settings)
    with tempfile.TemporaryDirectory(prefix="capdemo-bench-app-") as scratch:
        scratch_dir = Path(scratch)
        bundle, bundle_name = app_bundle(scratch_dir, tiny=tiny)
        captioner = Captioner.from_bundle(bundle, device=settings.device)
        methods = list(captioner.methods)
        images = write_images(scratch_dir, 2 + USERS * plan.requests_per_user, captioner)
        passes = vision_passes_per_request(captioner, images[0])
        del captioner  # the server process loads its own
        port = free_port()
        url = f"http://{HOST}:{port}/"
        launched = time.perf_counter()
        server = launch(bundle, port, settings, scratch_dir / "app.log")
        try:
            client = connect(url, server, time.monotonic() + START_TIMEOUT_S)
            server_up_s = time.perf_counter() - launched
            first = caption_request(client, images[1], methods)
            cold_start_s = time.perf_counter() - launched
            rss_idle_mb = common.rss_mb(server.pid)
            latencies, wall = concurrent_latencies(url, images[2:], methods, USERS)
            peak_mb = common.process_peak_rss_mb(server.pid)
        finally:
            server.terminate()
            try:
                server.wait(timeout=STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait()
    figures = {
        "bundle": bundle_name,
        "users": USERS,
        "requests": len(latencies),
        "methods": methods,
        "cold_start_s": round(cold_start_s, 2),
        "server_up_s": round(server_up_s, 2),
        "first_caption_s": round(first, 3),
        "caption_p50_s": round(common.percentile(latencies, 50), 3),
        "caption_p95_s": round(common.percentile(latencies, 95), 3),
        "caption_max_s": round(max(latencies), 3),
        "requests_per_s": round(len(latencies) / wall, 3),
        "server_rss_after_first_caption_mb": round(rss_idle_mb, 1),
        "server_peak_rss_mb": round(peak_mb, 1) if peak_mb is not None else None,
        "memory_target_mb": MEMORY_TARGET_MB,
        "vision_passes": passes,
    }
    return common.envelope(NAME, settings, figures, started=started)


def summary(result: dict[str, Any]) -> str:
    return (f"bundle {result['bundle']}: cold start {result['cold_start_s']:.3g} s; /caption under {result['users']} "
            f"users p50 {result['caption_p50_s']:.3g} s, p95 {result['caption_p95_s']:.3g} s "
            f"({result['requests']} requests); server peak RSS {result['server_peak_rss_mb']} MB; "
            f"vision passes caption+plots {result['vision_passes']['caption_then_embedding']}")


def main(argv: list[str] | None = None) -> int:
    return common.benchmark_main(NAME, run, summary, description=__doc__.split("\n\n")[0], argv=argv)


if __name__ == "__main__":
    raise SystemExit(main())
