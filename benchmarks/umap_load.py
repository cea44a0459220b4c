"""Captions while a UMAP runs: does one visitor's first UMAP hold up everyone else's captions?

    python -m benchmarks.umap_load [--clients 4] [--requests 5] [--warm] [--json]

Serves the shapes bundle in this process, by default *without* warming UMAP up, so the first /embedding UMAP
compiles numba on the request path (the worst case the app's start-up warm-up exists to avoid); ``--warm`` lets the
warm-up finish first, as ``python app.py`` does. One client asks for that UMAP; while
it runs, ``--clients`` others each send ``--requests`` /caption requests back to back (bundle settings, both
methods). Reported: the UMAP's own time, the captions' p50/p95 and how many captions finished while the UMAP was
still running. Captions and plots sit in different concurrency groups (capdemo.ui.layout), so the captions should
not wait for the UMAP; the target is a caption p95 under 3 s on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from capdemo import ui
from capdemo.pipeline import Captioner

ROOT = Path(__file__).resolve().parents[1]
P95_TARGET_S = 3.0


def measure(bundle: Path, *, clients: int = 4, requests: int = 5, warm: bool = False) -> dict:
    """Serve ``bundle``, run one UMAP and ``clients`` x ``requests`` captions at once; the timings. ``warm``: let
    the start-up warm-up compile UMAP first (as ``python app.py`` does), so the UMAP request only fits."""
    from gradio_client import Client, handle_file

    from tests.app_server import running_app

    captioner = Captioner.from_bundle(str(bundle), device="cpu")
    demo = ui.create_blocks(captioner, cache_examples=False)  # build_app would warm UMAP up: only with ``warm``
    if warm:
        ui.warm_up_umap().wait(300)
    examples = [str(p) for p in captioner.examples()]
    with running_app(demo) as url:
        first = Client(url, verbose=False)
        first.predict(image=handle_file(examples[0]), methods=list(captioner.methods), api_name="/caption")
        plotter = Client(url, verbose=False)
        umap_done = threading.Event()
        started = time.perf_counter()

        def run_umap() -> float:
            plotter.predict(handle_file(examples[1]), "umap", api_name="/embedding")
            umap_done.set()
            return time.perf_counter() - started

        def captions(index: int) -> list[tuple[float, bool]]:
            client = Client(url, verbose=False)
            timings = []
            for request in range(requests):
                image = handle_file(examples[(index + request) % len(examples)])
                begin = time.perf_counter()
                client.predict(image=image, methods=list(captioner.methods), api_name="/caption")
                timings.append((time.perf_counter() - begin, not umap_done.is_set()))
            return timings

        with ThreadPoolExecutor(clients + 1) as pool:
            umap_future = pool.submit(run_umap)
            time.sleep(0.5)  # the UMAP is running before the captions arrive
            results = [t for f in [pool.submit(captions, i) for i in range(clients)] for t in f.result()]
            umap_s = umap_future.result()
    seconds = np.array([s for s, _ in results])
    return {"umap_s": round(umap_s, 2), "captions": len(seconds), "p50_s": round(float(np.percentile(seconds, 50)), 2),
            "p95_s": round(float(np.percentile(seconds, 95)), 2), "max_s": round(float(seconds.max()), 2),
            "during_umap": int(sum(during for _, during in results)), "target_p95_s": P95_TARGET_S,
            "umap_warmed_first": warm}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--bundle", default=str(ROOT / "weights" / "shapes"), help="bundle folder (weights/shapes)")
    parser.add_argument("--clients", type=int, default=4, help="caption clients besides the UMAP one")
    parser.add_argument("--requests", type=int, default=5, help="captions per client")
    parser.add_argument("--warm", action="store_true", help="compile UMAP at start-up first, as the app does")
    parser.add_argument("--json", action="store_true", help="print JSON only")
    args = parser.parse_args(argv)
    result = measure(Path(args.bundle), clients=args.clients, requests=args.requests, warm=args.warm)
    print(json.dumps(result) if args.json else "\n".join(f"{k}: {v}" for k, v in result.items()))


if __name__ == "__main__":
    main()
