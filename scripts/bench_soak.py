"""Where a worker's memory goes under a long run of mixed requests (issue: RSS kept growing).

Runs N mixed requests (txt2img, LoRA, img2img, inpainting, hires, ControlNet, SDXL and refused
ones) through one Engine over the tiny models and prints, every `--every` requests: resident
set size, the Python heap (tracemalloc), glibc's malloc arena bytes in use vs held
(mallinfo2), and the engine's cache sizes. Run it twice, with and without `--no-trim`, to see
what returning freed arenas to the OS (the engine's `release_host_memory`) changes.

    .venv/bin/python scripts/bench_soak.py --requests 300 [--models DIR] [--no-trim]
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import contextlib

from engine import memory_release
from engine.api import Engine, EngineConfig
from engine.errors import RequestError
from scripts.make_tiny_models import make_all
from tests.helpers import b64_png, box_mask, card_image, payload


class _MallInfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in (
            "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
            "fsmblks", "uordblks", "fordblks", "keepcost",
        )
    ]  # fmt: skip


def malloc_figures() -> tuple[int, int]:
    """(bytes in use, bytes held free) by glibc's allocator; (0, 0) where there is none."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallinfo2.restype = _MallInfo2
        info = libc.mallinfo2()
    except (OSError, AttributeError):
        return 0, 0
    return int(info.uordblks + info.hblkhd), int(info.fordblks)


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def mixed_bodies() -> list[tuple[str, str]]:
    card = b64_png(card_image(64, 64))
    mask = b64_png(box_mask(64, 64, (16, 16, 48, 48)))
    unit = {"module": "canny", "model": "tiny-controlnet-sd15", "image": card}
    return [
        ("txt2img", payload(steps=2, seed=7)),
        ("txt2img", payload(steps=2, prompt="<lora:tiny-lora-sd15:0.7> a dog")),
        ("img2img", payload(steps=2, init_images=[card], denoising_strength=0.5)),
        ("img2img", payload(steps=2, init_images=[card], mask=mask)),
        ("txt2img", payload(steps=2, enable_hr=True, hr_scale=1.5, denoising_strength=0.5)),
        ("txt2img", payload(steps=2, alwayson_scripts={"controlnet": {"args": [unit]}})),
        (
            "txt2img",
            payload(steps=2, override_settings={"sd_model_checkpoint": "tiny-sdxl.safetensors"}),
        ),
        ("txt2img", payload(steps=0)),
        ("txt2img", payload(prompt="<lora:nope:1>")),
        ("txt2img", "{not json"),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--every", type=int, default=50)
    parser.add_argument("--models", type=Path, default=None)
    parser.add_argument("--no-trim", action="store_true", help="skip release_host_memory")
    args = parser.parse_args()
    if args.no_trim:
        memory_release.ENABLED = False

    folder = args.models or Path(tempfile.mkdtemp(prefix="soak-models-"))
    if args.models is None:
        make_all(folder, seed=0)
    engine = Engine.setup(EngineConfig(models_dir=folder, cache_dir=folder / ".cache"))
    bodies = mixed_bodies()
    gc.collect()
    print(f"after setup: RSS {rss_bytes() / 2**20:.0f} MiB")
    tracemalloc.start()
    started = time.perf_counter()
    first = None
    for i in range(1, args.requests + 1):
        endpoint, body = bodies[i % len(bodies)]
        with contextlib.suppress(RequestError):
            engine.handle(endpoint, body, lambda step, total: None)
        if i % args.every == 0:
            gc.collect()
            used, held = malloc_figures()
            rss = rss_bytes()
            first = first or rss
            print(
                f"{i:5d} requests: RSS {rss / 2**20:7.1f} MiB (+{(rss - first) / 2**20:6.1f}), "
                f"python heap {tracemalloc.get_traced_memory()[0] / 2**20:6.2f} MiB, "
                f"malloc in use {used / 2**20:7.1f} MiB, held free {held / 2**20:6.1f} MiB, "
                f"{(time.perf_counter() - started) / i * 1000:.0f} ms/request",
                flush=True,
            )
    print(json.dumps({"requests": args.requests, "trim": not args.no_trim}))


if __name__ == "__main__":
    main()
