"""The GPU check: one command to run first on a CUDA machine (the CUDA path is otherwise unrun).

    python scripts/gpu_check.py                      # CUDA, real-size random-weight SD1.5 + SDXL
    python scripts/gpu_check.py --device cpu --tiny  # the same code path on the tiny models

Steps:
1. The GPU-marked tests (`pytest -m gpu`), unless --skip-tests.
2. Models: real-size SD 1.5 and SDXL single files (the original key layout, random weights,
   fp16) with a LoRA, a ControlNet, an embedding and a VAE file of the same shapes, written by
   the tiny-model maker's own layout code with the released models' dimensions (nothing is
   downloaded); --tiny uses the tiny models instead; --models DIR reuses a folder.
3. Every feature path through Engine.handle in the engine's dtype (SD_DTYPE; fp16 on CUDA):
   wall time, sampling it/s, peak device memory, and whether the picture is finite.
4. Time per sampling step against diffusers' own pipeline on the same components (Euler,
   two step counts: the difference removes the fixed costs), as a ratio.
5. Checkpoint switch: a request on the other checkpoint right after one on this checkpoint,
   against a request on the same checkpoint (all checkpoints resident).
6. The device working set (SD_DEVICE_MEMORY) with a budget for one checkpoint: requests
   alternating SD1/SDXL, the time of each host<->device move, pictures equal to the resident ones.
7. Concurrent requests (engine/step_batcher.py): images/s for 1, 4 and 8 client threads against
   the same requests one after another, per family, with latency p50/p95 and the largest pixel
   difference from the serial pictures (8-bit levels).
8. On CUDA: step 6 again from pageable host memory (SD_PINNED_MEMORY=0) against pinned, and
   scripts/bench_memory.py on the tiny models (resident bytes, switch-time ratios).
It prints one table and writes the figures as JSON (--out).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

from engine.api import Engine, EngineConfig
from engine.device import choose_placement, describe
from engine.errors import EngineError
from engine.working_set import weight_bytes
from scripts import make_tiny_models as maker
from tests.helpers import b64_png, box_mask, card_image

ROOT = Path(__file__).resolve().parent.parent

# The released models' dimensions (SD 1.5: v1-inference.yaml; SDXL base: sd_xl_base.yaml).
REAL_VAE = maker.VAEDims(ch=128, ch_mult=(1, 2, 4, 4))
REAL_SD15 = maker.SD1Dims(
    unet=maker.UNetDims(
        model_channels=320,
        channel_mult=(1, 2, 4, 4),
        num_res_blocks=2,
        transformer_depth=(1, 1, 1, 0),
        transformer_depth_middle=1,
        context_dim=768,
        use_linear_in_transformer=False,
        num_heads=8,
    ),
    vae=REAL_VAE,
    text=maker.TextDims(hidden=768, intermediate=3072, layers=12),
)
_TEXT_L = maker.TextDims(hidden=768, intermediate=3072, layers=12)
_TEXT_G = maker.TextDims(hidden=1280, intermediate=5120, layers=32, projection_dim=1280)
REAL_SDXL = maker.SDXLDims(
    unet=maker.UNetDims(
        model_channels=320,
        channel_mult=(1, 2, 4),
        num_res_blocks=2,
        transformer_depth=(0, 2, 10),
        transformer_depth_middle=10,
        context_dim=2048,
        use_linear_in_transformer=True,
        num_head_channels=64,
        adm_in_channels=1280 + 6 * 256,
    ),
    vae=REAL_VAE,
    text_l=_TEXT_L,
    text_g=_TEXT_G,
)


@dataclass(frozen=True)
class Names:
    """The model names the feature payloads use."""

    sd1: str
    sdxl: str
    lora_sd1: str
    lora_sdxl: str
    controlnet_sd1: str
    embedding: str
    vae: str
    size_sd1: int
    size_sdxl: int


CONCURRENT_REQUESTS = 8  # per family and client count in step 7
CONCURRENT_CLIENTS = (1, 4, 8)

TINY = Names(
    sd1="tiny-sd15",
    sdxl="tiny-sdxl",
    lora_sd1="tiny-lora-sd15",
    lora_sdxl="tiny-lora-sdxl",
    controlnet_sd1="tiny-controlnet-sd15",
    embedding="tiny-embedding",
    vae="tiny-vae.safetensors",
    size_sd1=64,
    size_sdxl=64,
)
REAL = Names(
    sd1="real-sd15",
    sdxl="real-sdxl",
    lora_sd1="real-lora-sd15",
    lora_sdxl="real-lora-sdxl",
    controlnet_sd1="real-controlnet-sd15",
    embedding="real-embedding",
    vae="real-vae.safetensors",
    size_sd1=512,
    size_sdxl=1024,
)


def write_real_models(folder: Path, seed: int = 0) -> None:
    """Real-size random-weight files in the original layouts (fp16, as most downloads)."""
    fp16 = torch.float16
    lora = maker.LoraDims(rank=16, alpha=8.0)
    files: list[tuple[str, Callable[[], Any], dict[str, str] | None]] = [
        ("checkpoints/real-sd15.safetensors", lambda: maker.sd1_checkpoint(REAL_SD15), None),
        ("checkpoints/real-sdxl.safetensors", lambda: maker.sdxl_checkpoint(REAL_SDXL), None),
        (
            "loras/real-lora-sd15.safetensors",
            lambda: maker.sd1_lora(REAL_SD15, lora),
            maker.kohya_metadata("real-lora-sd15", "sd_v1", lora, v2=False),
        ),
        (
            "loras/real-lora-sdxl.safetensors",
            lambda: maker.sdxl_lora(REAL_SDXL, lora),
            maker.kohya_metadata("real-lora-sdxl", "sdxl_base_v1-0", lora, v2=False),
        ),
        (
            "controlnet/real-controlnet-sd15.safetensors",
            lambda: maker.prefixed(
                "control_model.", maker.ldm_controlnet(maker.ControlNetDims(unet=REAL_SD15.unet))
            ),
            None,
        ),
        (
            "embeddings/real-embedding.safetensors",
            lambda: maker.sd1_embedding(REAL_SD15, maker.EMBEDDING),
            None,
        ),
        ("vae/real-vae.safetensors", lambda: maker.ldm_vae(REAL_VAE), None),
    ]
    for relative, params, metadata in files:
        path = folder / relative
        if not path.exists():
            started = time.perf_counter()
            maker.write_safetensors(path, params(), seed, dtype=fp16, metadata=metadata)
            print(f"wrote {relative} in {time.perf_counter() - started:.1f} s", flush=True)


def features(n: Names, steps: int) -> dict[str, tuple[str, dict[str, Any]]]:
    """Feature name -> (endpoint, payload): every path the engine has, on both families."""
    size = n.size_sd1
    card = b64_png(card_image(size, size))
    mask = b64_png(box_mask(size, size, (size // 4, size // 4, 3 * size // 4, 3 * size // 4)))
    sd1 = {"override_settings": {"sd_model_checkpoint": n.sd1}}
    xl = {
        "override_settings": {"sd_model_checkpoint": n.sdxl},
        "width": n.size_sdxl,
        "height": n.size_sdxl,
    }
    base = {"prompt": "a lighthouse on a cliff", "steps": steps, "width": size, "height": size}
    unit = {"module": "canny", "model": n.controlnet_sd1, "image": card}
    rows: dict[str, tuple[str, dict[str, Any]]] = {
        "txt2img": ("txt2img", {**sd1}),
        "txt2img batch 4": ("txt2img", {**sd1, "batch_size": 4}),
        "img2img": ("img2img", {**sd1, "init_images": [card], "denoising_strength": 0.6}),
        "inpainting": ("img2img", {**sd1, "init_images": [card], "mask": mask}),
        "hires 2x": (
            "txt2img",
            {**sd1, "enable_hr": True, "hr_scale": 2, "denoising_strength": 0.5},
        ),
        "lora": ("txt2img", {**sd1, "prompt": f"a lighthouse <lora:{n.lora_sd1}:0.8>"}),
        "embedding": ("txt2img", {**sd1, "prompt": f"a lighthouse, {n.embedding}"}),
        "vae file": (
            "txt2img",
            {"override_settings": {"sd_model_checkpoint": n.sd1, "sd_vae": n.vae}},
        ),
        "controlnet": ("txt2img", {**sd1, "alwayson_scripts": {"controlnet": {"args": [unit]}}}),
        "sdxl txt2img": ("txt2img", {**xl}),
        "sdxl lora": ("txt2img", {**xl, "prompt": f"a lighthouse <lora:{n.lora_sdxl}:0.8>"}),
        "DPM++ 2M SDE": ("txt2img", {**sd1, "sampler_name": "DPM++ 2M SDE", "scheduler": "Karras"}),
    }
    return {name: (endpoint, {**base, **body}) for name, (endpoint, body) in rows.items()}


@dataclass
class Row:
    feature: str
    status: str
    seconds: float
    it_per_s: float
    peak_mib: float


REPEATS = 3  # timings are the fastest of this many runs: robust against a busy machine


def _fastest(action: Callable[[], object], device: str) -> float:
    times = []
    for _ in range(REPEATS):
        _sync(device)
        started = time.perf_counter()
        action()
        _sync(device)
        times.append(time.perf_counter() - started)
    return min(times)


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _peak_reset(device: str) -> None:
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()


def _peak_mib(device: str) -> float:
    return torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else 0.0


def run_feature(engine: Engine, device: str, name: str, endpoint: str, body: dict[str, Any]) -> Row:
    text = json.dumps(body)
    steps = int(body["steps"]) * int(body.get("batch_size", 1))
    try:
        engine.handle(endpoint, text, lambda step, total: None)  # warm-up (first-use loads)
        _peak_reset(device)
        seconds = _fastest(lambda: engine.handle(endpoint, text, lambda s, t: None), device)
        status = "ok"
    except EngineError as err:  # NaN pictures, OOM, refusals: reported, not fatal to the check
        seconds, status = 0.0, f"error: {err}"[:80]
    return Row(name, status, seconds, steps / seconds if seconds else 0.0, _peak_mib(device))


def per_step_vs_diffusers(engine: Engine, device: str, name: str, size: int) -> dict[str, float]:
    """ms per Euler step: the engine vs the checkpoint's own diffusers pipeline object."""
    from diffusers import EulerDiscreteScheduler

    loaded = next(c for c in engine.models.cache.loaded.values() if c.info.name_for_extra == name)
    pipe = loaded.pipe
    scheduler = EulerDiscreteScheduler.from_config(loaded.scheduler_config)
    low, high = 4, 12

    def engine_time(steps: int) -> float:
        body = {
            "prompt": "a lighthouse",
            "steps": steps,
            "width": size,
            "height": size,
            "override_settings": {"sd_model_checkpoint": name},
        }
        engine.handle("txt2img", json.dumps(body), lambda s, t: None)
        return _fastest(
            lambda: engine.handle("txt2img", json.dumps(body), lambda s, t: None), device
        )

    def diffusers_time(steps: int) -> float:
        kwargs = {"num_inference_steps": steps, "height": size, "width": size}
        original = pipe.scheduler
        pipe.scheduler = scheduler
        try:
            pipe("a lighthouse", output_type="latent", **kwargs)
            return _fastest(lambda: pipe("a lighthouse", output_type="latent", **kwargs), device)
        finally:
            pipe.scheduler = original

    ours = (engine_time(high) - engine_time(low)) / (high - low) * 1e3
    theirs = (diffusers_time(high) - diffusers_time(low)) / (high - low) * 1e3
    return {"engine_ms_per_step": ours, "diffusers_ms_per_step": theirs, "ratio": ours / theirs}


def switch_times(engine: Engine, n: Names, steps: int) -> dict[str, float]:
    def request(name: str, size: int) -> float:
        body = {
            "steps": steps,
            "width": size,
            "height": size,
            "override_settings": {"sd_model_checkpoint": name},
        }
        started = time.perf_counter()
        engine.handle("txt2img", json.dumps(body), lambda s, t: None)
        return time.perf_counter() - started

    request(n.sd1, n.size_sd1)
    same = request(n.sd1, n.size_sd1)
    request(n.sdxl, n.size_sdxl)
    switched = request(n.sd1, n.size_sd1)
    return {"same_checkpoint_s": same, "after_switch_s": switched, "ratio": switched / same}


def working_set_moves(engine: Engine, n: Names, steps: int, pinned: bool = True) -> dict[str, Any]:
    """SD_DEVICE_MEMORY at work: the budget set to hold only the largest checkpoint, then
    requests alternating between SD1 and SDXL, each moving its checkpoint onto the device and
    the other off. Pictures must equal the all-resident ones; move times and the device memory
    after each request are recorded. Everything is moved back at the end. `pinned=False`: the
    host tier in pageable memory (SD_PINNED_MEMORY=0), to compare the copy times."""
    working = engine.models.cache.working
    assert working is not None
    pinned_limit = working.pinned_limit
    if not pinned:
        working.pinned_limit = 0

    def request(name: str, size: int) -> tuple[float, bytes]:
        body = {
            "steps": steps,
            "width": size,
            "height": size,
            "seed": 5,
            "override_settings": {"sd_model_checkpoint": name},
        }
        started = time.perf_counter()
        answer = engine.handle("txt2img", json.dumps(body), lambda s, t: None)
        return time.perf_counter() - started, answer.images[0].data

    order = [(n.sd1, n.size_sd1), (n.sdxl, n.size_sdxl)]
    resident = {name: request(name, size)[1] for name, size in order}
    saved = working.budget
    biggest = max(weight_bytes(pipe) for pipe in working.pipes.values())
    working.budget = int(biggest * 1.1)
    first = len(working.moves)
    runs = []
    for name, size in order * 2:
        seconds, data = request(name, size)
        allocated = torch.cuda.memory_allocated() if torch.cuda.is_available() else 0
        runs.append(
            {
                "checkpoint": name,
                "seconds": seconds,
                "same_picture": data == resident[name],
                "device_allocated_gib": allocated / 2**30,
            }
        )
    moves = [
        {"checkpoint": title, "direction": direction, "seconds": seconds}
        for title, direction, seconds in working.moves[first:]
    ]
    working.budget = sum(weight_bytes(pipe) for pipe in working.pipes.values())
    working.acquire(list(working.pipes))  # all back on the device
    working.budget, working.pinned_limit = saved, pinned_limit
    return {
        "budget_gib": int(biggest * 1.1) / 2**30,
        "requests": runs,
        "moves": moves,
        "same_pictures": all(run["same_picture"] for run in runs),
    }


def concurrency(engine: Engine, name: str, size: int, steps: int) -> dict[str, Any]:
    """Images/s of CONCURRENT_REQUESTS requests from 1, 4 and 8 threads vs serial."""
    import threading

    import numpy as np
    from PIL import Image

    bodies = [
        json.dumps(
            {
                "steps": steps,
                "width": size,
                "height": size,
                "seed": 100 + i,
                "override_settings": {"sd_model_checkpoint": name},
            }
        )
        for i in range(CONCURRENT_REQUESTS)
    ]

    def picture(data: bytes) -> Any:
        return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), dtype=np.int16)

    def serve(clients: int) -> tuple[float, list[float], dict[int, Any]]:
        queue, latencies, pictures = list(enumerate(bodies)), [], {}
        lock = threading.Lock()

        def client() -> None:
            while True:
                with lock:
                    if not queue:
                        return
                    index, body = queue.pop()
                started = time.perf_counter()
                answer = engine.handle("txt2img", body, lambda s, t: None)
                with lock:
                    latencies.append(time.perf_counter() - started)
                    pictures[index] = picture(answer.images[0].data)

        started = time.perf_counter()
        threads = [threading.Thread(target=client) for _ in range(clients)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        return time.perf_counter() - started, sorted(latencies), pictures

    batcher = engine.models.cache.batcher
    saved = batcher.max_sessions
    batcher.max_sessions = max(CONCURRENT_CLIENTS)
    try:
        engine.handle("txt2img", bodies[0], lambda s, t: None)  # warm-up
        wall, latencies, serial = serve(1)
        rows = {"serial": {"images_per_s": len(bodies) / wall, "ratio": 1.0}}
        for clients in CONCURRENT_CLIENTS:
            seconds, lat, pictures = serve(clients)
            rows[str(clients)] = {
                "images_per_s": len(bodies) / seconds,
                "ratio": wall / seconds,
                "p50_s": lat[len(lat) // 2],
                "p95_s": lat[min(len(lat) - 1, round(0.95 * (len(lat) - 1)))],
                "max_level_diff": max(int(np.abs(pictures[i] - serial[i]).max()) for i in serial),
            }
        rows["serial"]["p50_s"] = latencies[len(latencies) // 2]
    finally:
        batcher.max_sessions = saved
    return rows


def bench_memory() -> str:
    done = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "bench_memory.py"), "--device", "cuda"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    return (
        done.stdout if done.returncode == 0 else f"exited {done.returncode}: {done.stderr[-2000:]}"
    )


def gpu_tests() -> str:
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider", "tests"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    lines = done.stdout.strip().splitlines()
    return lines[-1] if lines else f"pytest exited {done.returncode}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--tiny", action="store_true", help="the tiny models (CPU-sized)")
    parser.add_argument("--models", type=Path, default=None, help="reuse a models folder")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--skip-tests", action="store_true")
    parser.add_argument("--out", type=Path, default=None, help="write the figures as JSON")
    args = parser.parse_args(argv)
    report: dict[str, Any] = {}
    started = time.perf_counter()
    # 1. The GPU-marked tests.
    report["gpu_tests"] = "skipped" if args.skip_tests else gpu_tests()
    print(f"gpu tests: {report['gpu_tests']}", flush=True)
    # 2. Models.
    names = TINY if args.tiny else REAL
    folder = args.models or Path(tempfile.mkdtemp(prefix="gpu-check-"))
    if args.models is None:
        if args.tiny:
            maker.make_all(folder)
        else:
            write_real_models(folder)
    placement = choose_placement({**os.environ, "SD_DEVICE": args.device})
    engine = Engine.setup(
        EngineConfig(models_dir=folder, cache_dir=folder / ".cache"), placement=placement
    )
    report["device"] = describe(placement)
    report["setup_s"] = time.perf_counter() - started
    # 3. Every feature path.
    rows = [
        run_feature(engine, placement.device, name, endpoint, body)
        for name, (endpoint, body) in features(names, args.steps).items()
    ]
    report["features"] = [asdict(row) for row in rows]
    # 4. Per-step time against diffusers on the same components.
    report["vs_diffusers"] = {
        "sd1": per_step_vs_diffusers(engine, placement.device, names.sd1, names.size_sd1),
        "sdxl": per_step_vs_diffusers(engine, placement.device, names.sdxl, names.size_sdxl),
    }
    # 5. Checkpoint switch.
    report["switch"] = switch_times(engine, names, args.steps)
    # 6. The device working set under a budget that holds one checkpoint.
    report["working_set"] = working_set_moves(engine, names, args.steps)
    # 7. Concurrent requests batched step by step, per family.
    report["concurrency"] = {
        "sd1": concurrency(engine, names.sd1, names.size_sd1, args.steps),
        "sdxl": concurrency(engine, names.sdxl, names.size_sdxl, args.steps),
    }
    # 8. On CUDA: the same from pageable host memory (the host tier is pinned by default), and
    # scripts/bench_memory.py on the tiny models (resident bytes, switch-time ratios).
    if placement.device == "cuda":
        report["working_set_pageable"] = working_set_moves(engine, names, args.steps, pinned=False)
        report["bench_memory"] = bench_memory()
    report["total_s"] = time.perf_counter() - started
    print_table(report)
    if args.out:
        args.out.write_text(json.dumps(report, indent=2))
    failed = [row.feature for row in rows if row.status != "ok"]
    return 1 if failed else 0


def print_table(report: dict[str, Any]) -> None:
    print(
        f"\n{report['device']}; setup {report['setup_s']:.1f} s; gpu tests: {report['gpu_tests']}"
    )
    print(f"{'feature':<18} {'status':<8} {'seconds':>8} {'it/s':>8} {'peak MiB':>9}")
    for row in report["features"]:
        status = row["status"] if row["status"] == "ok" else "ERROR"
        print(
            f"{row['feature']:<18} {status:<8} {row['seconds']:8.2f} {row['it_per_s']:8.2f} "
            f"{row['peak_mib']:9.0f}"
        )
        if status != "ok":
            print(f"    {row['status']}")
    for family, figures in report["vs_diffusers"].items():
        print(
            f"{family}: engine {figures['engine_ms_per_step']:.1f} ms/step, diffusers "
            f"{figures['diffusers_ms_per_step']:.1f} ms/step, ratio {figures['ratio']:.2f}"
        )
    switch = report["switch"]
    print(
        f"checkpoint switch: same {switch['same_checkpoint_s']:.2f} s, after switch "
        f"{switch['after_switch_s']:.2f} s, ratio {switch['ratio']:.2f} (all resident)"
    )
    moves = report["working_set"]["moves"]
    to_device = [m["seconds"] for m in moves if m["direction"] == "to device"]
    print(
        f"working set ({report['working_set']['budget_gib']:.2f} GiB budget): {len(moves)} "
        f"moves, to device {max(to_device, default=0):.2f} s at most, same pictures "
        f"{report['working_set']['same_pictures']}"
    )
    for family, rows in report["concurrency"].items():
        cells = ", ".join(
            f"{clients} clients {row['images_per_s']:.2f} img/s ({row['ratio']:.2f}x"
            + (
                f", p95 {row['p95_s']:.2f} s, max diff {row['max_level_diff']})"
                if "p95_s" in row
                else ")"
            )
            for clients, row in rows.items()
        )
        print(f"concurrency {family}: {cells}")
    pageable = report.get("working_set_pageable")
    if pageable is not None:
        slow = [m["seconds"] for m in pageable["moves"] if m["direction"] == "to device"]
        print(
            f"host tier pageable: to device {max(slow, default=0):.2f} s at most "
            f"({max(slow, default=0) / max(max(to_device, default=0), 1e-9):.2f}x pinned)"
        )
    if "bench_memory" in report:
        print(f"scripts/bench_memory.py --device cuda:\n{report['bench_memory']}")
    print(f"total {report['total_s']:.0f} s")


if __name__ == "__main__":
    raise SystemExit(main())
