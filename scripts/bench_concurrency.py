"""Benchmark (not a test): images per second for 1, 2, 4, 8 concurrent clients against the same
requests sent one after another, through the real Cog server (async predictor, batched steps).

    python scripts/bench_concurrency.py [--models DIR] [--requests 16] [--clients 1,2,4,8]
                                        [--size 64] [--steps 20]

Starts the Cog server on 127.0.0.1 over the tiny models (made into a temporary folder unless
--models names a folder made by make_tiny_models.py) with COG_MAX_CONCURRENCY and
SD_MAX_CONCURRENCY set to the largest client count, sends `--requests` txt2img requests (each
its own seed) serially, then from N client threads at once, and prints images/s, the ratio to
serial, and the per-request latency percentiles (p50, p95). At 64x64 on the tiny model the
per-step overhead dominates, which is what batching UNet calls across requests saves.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from scripts.make_tiny_models import make_all  # noqa: E402
from tests.cog_server import CogServer, running_server  # noqa: E402
from tests.helpers import payload  # noqa: E402


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def run(server: CogServer, bodies: list[str], clients: int) -> tuple[float, list[float]]:
    """Wall seconds for all bodies with `clients` threads, and each request's latency."""
    latencies: list[float] = []
    queue = list(bodies)
    lock = threading.Lock()

    def client() -> None:
        while True:
            with lock:
                if not queue:
                    return
                body = queue.pop()
            started = time.perf_counter()
            prediction = server.predict(body)
            assert prediction["status"] == "succeeded", prediction.get("error")
            with lock:
                latencies.append(time.perf_counter() - started)

    started = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return time.perf_counter() - started, latencies


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", type=Path)
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--clients", default="1,2,4,8")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=20)  # webui's default
    args = parser.parse_args()
    counts = [int(c) for c in args.clients.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        models = args.models
        if models is None:
            models = Path(tmp) / "models"
            make_all(models)
        env = {
            "COG_MAX_CONCURRENCY": str(max(counts)),
            "SD_MAX_CONCURRENCY": str(max(counts)),
            # As cog.yaml and the Makefile set it (README "Many users at once").
            "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
        }
        with running_server(models, Path(tmp) / "server.log", env) as (server, status):
            if status != "READY":
                print((Path(tmp) / "server.log").read_text()[-3000:])
                return 1
            bodies = [
                payload(seed=1000 + i, width=args.size, height=args.size, steps=args.steps)
                for i in range(args.requests)
            ]
            run(server, bodies[:2], 1)  # warm-up
            serial, serial_lat = run(server, bodies, 1)
            print(
                f"{args.requests} requests, {args.size}x{args.size}, {args.steps} steps, "
                "tiny SD1, through the Cog server"
            )
            print("| clients | images/s | vs serial | p50 latency s | p95 latency s |")
            print("|---|---|---|---|---|")
            base = args.requests / serial
            print(
                f"| serial | {base:.2f} | 1.00 | {statistics.median(serial_lat):.2f} | "
                f"{percentile(serial_lat, 0.95):.2f} |"
            )
            for clients in counts:
                wall, lat = run(server, bodies, clients)
                rate = args.requests / wall
                print(
                    f"| {clients} | {rate:.2f} | {rate / base:.2f} | "
                    f"{statistics.median(lat):.2f} | {percentile(lat, 0.95):.2f} |"
                )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
