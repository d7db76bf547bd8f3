"""Benchmark (not a test): what the local webui server (sdapi/) adds over a direct engine call.

    python scripts/bench_sdapi.py [--requests 20] [--steps 4] [--size 64]

Writes the tiny models into a temporary folder, loads one engine, serves it with uvicorn on
127.0.0.1, then alternates the same txt2img body between `Engine.handle` (direct) and an
HTTP POST to /sdapi/v1/txt2img (queue, worker thread, base64 encoding of the PNGs, JSON both
ways, the client's decode of the JSON). Prints the median and fastest of each, the added
milliseconds and the ratio; also a listing (GET /sdapi/v1/samplers) round trip. The tiny
model makes the generation itself cheap, so the added time is easy to see; on a GPU with a
real model the same milliseconds are a far smaller fraction.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import uvicorn

from engine.api import Engine, EngineConfig
from scripts.make_tiny_models import make_all
from sdapi.app import create_app


def timed(call: object) -> float:
    started = time.perf_counter()
    call()  # type: ignore[operator]
    return (time.perf_counter() - started) * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--requests", type=int, default=20)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--size", type=int, default=64)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        models = Path(folder)
        make_all(models, seed=0)
        engine = Engine.setup(EngineConfig(models_dir=models, cache_dir=models / ".cache"))
        server = uvicorn.Server(
            uvicorn.Config(create_app(engine), host="127.0.0.1", port=0, log_level="warning")
        )
        thread = threading.Thread(target=server.run, daemon=True)
        thread.start()
        for _ in range(600):
            if server.started:
                break
            time.sleep(0.05)
        port = server.servers[0].sockets[0].getsockname()[1]
        base = f"http://127.0.0.1:{port}"
        body = json.dumps(
            {"prompt": "a lighthouse", "steps": args.steps, "width": args.size,
             "height": args.size, "seed": 1, "sampler_name": "Euler"}
        )  # fmt: skip

        def over_http() -> None:
            request = urllib.request.Request(
                base + "/sdapi/v1/txt2img", data=body.encode(), method="POST"
            )
            request.add_header("Content-Type", "application/json")
            with urllib.request.urlopen(request, timeout=300) as reply:
                json.loads(reply.read())

        def listing() -> None:
            with urllib.request.urlopen(base + "/sdapi/v1/samplers", timeout=60) as reply:
                json.loads(reply.read())

        direct: list[float] = []
        http: list[float] = []
        over_http()  # warm-up of both paths
        engine.handle("txt2img", body)
        for _ in range(args.requests):
            direct.append(timed(lambda: engine.handle("txt2img", body)))
            http.append(timed(over_http))
        lists = [timed(listing) for _ in range(args.requests)]
        server.should_exit = True
        thread.join(timeout=30)
    med_d, med_h = statistics.median(direct), statistics.median(http)
    print(f"txt2img {args.size}x{args.size}, {args.steps} steps, {args.requests} requests each")
    print(f"  direct Engine.handle   median {med_d:8.1f} ms   fastest {min(direct):8.1f} ms")
    print(f"  POST /sdapi/v1/txt2img median {med_h:8.1f} ms   fastest {min(http):8.1f} ms")
    print(
        f"  added by the server: {med_h - med_d:+.1f} ms median "
        f"({min(http) - min(direct):+.1f} ms fastest), ratio {med_h / med_d:.3f}x"
    )
    print(f"GET /sdapi/v1/samplers median {statistics.median(lists):.1f} ms")


if __name__ == "__main__":
    main()
