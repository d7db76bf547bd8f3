"""Device memory and checkpoint switch costs of the working set (engine/working_set.py).

    python scripts/bench_memory.py [--checkpoints 3] [--device cpu|cuda] [--repeats 5]

With N fine-tunes of the tiny SD1 checkpoint (each its own UNet output weights, the base's VAE
and text encoder byte for byte, which the pipeline cache stores once; --models DIR reads
DIR/checkpoints instead) it prints:

1. Resident bytes of the N checkpoints, from torch storage sizes: each pipeline's own bytes
   added up (no sharing) against every storage once (what the device holds), as a ratio.
2. Request time (txt2img, --steps at --size) on the same checkpoint as the previous request,
   after a switch to a checkpoint that is resident (a budget that holds them all), and after a
   switch to one that waits in host memory (a budget that holds one checkpoint: the request
   first moves it onto the device and the other off), as ratios to the same-checkpoint time;
   and the host->device move itself. On CUDA the host tier is timed from pinned and from
   pageable host memory. On the CPU host and device are one memory: the moves cost nothing
   and the ratios show the manager's own overhead.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from safetensors.torch import load_file, save_file

from engine.api import Engine, EngineConfig
from engine.device import choose_placement
from engine.working_set import WorkingSet, weight_bytes
from scripts.make_tiny_models import make_all

SD1 = "tiny-sd15.safetensors"
FINE_TUNED = "model.diffusion_model.out."  # what each copy changes: its UNet is its own


def layout(folder: Path, count: int, models: Path | None, tiny: Path | None = None) -> Path:
    """N fine-tunes of the tiny SD1 checkpoint (from `tiny`, else made now), or the checkpoints
    of `models`, in a models folder."""
    (folder / "checkpoints").mkdir(parents=True)
    if models is not None:
        for path in sorted((models / "checkpoints").iterdir()):
            (folder / "checkpoints" / path.name).symlink_to(path.resolve())
        return folder
    if tiny is None:
        tiny = folder / "tiny"
        make_all(tiny, seed=0)
    state = load_file(str(tiny / "checkpoints" / SD1))
    for index in range(count):
        tuned = {
            k: v * (1 + index / 10) if k.startswith(FINE_TUNED) else v for k, v in state.items()
        }
        save_file(tuned, str(folder / "checkpoints" / f"ckpt-{index}.safetensors"))
    return folder


def request(engine: Engine, title: str, steps: int, size: int) -> float:
    body = {
        "prompt": "a lighthouse",
        "steps": steps,
        "width": size,
        "height": size,
        "seed": 1,
        "override_settings": {"sd_model_checkpoint": title.split(" ")[0]},
    }
    started = time.perf_counter()
    engine.handle("txt2img", json.dumps(body), lambda step, total: None)
    return time.perf_counter() - started


def switches(
    engine: Engine, working: WorkingSet, budget: int, args: argparse.Namespace
) -> tuple[list[float], list[float], list[float]]:
    """(same checkpoint, switched, host->device move) seconds under `budget`, per repeat."""
    a, b = list(working.pipes)[:2]
    working.budget = budget
    same, switched, moves = [], [], []
    request(engine, a, args.steps, args.size)  # a on the device, b wherever the budget says
    for _ in range(args.repeats):
        same.append(request(engine, a, args.steps, args.size))
        first = len(working.moves)
        switched.append(request(engine, b, args.steps, args.size))
        moves += [s for _, d, s in working.moves[first:] if d == "to device"]
        request(engine, a, args.steps, args.size)  # back, for the next round
    return same, switched, moves


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoints", type=int, default=3, help="copies of the tiny SD1 (>= 2)")
    parser.add_argument("--models", type=Path, help="a models folder to read checkpoints from")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--tiny", type=Path, help="a tiny-models folder to copy SD1 from")
    args = parser.parse_args(argv)
    placement = choose_placement({**os.environ, "SD_DEVICE": args.device})
    with tempfile.TemporaryDirectory() as tmp:
        count = max(2, args.checkpoints)
        folder = layout(Path(tmp) / "models", count, args.models, args.tiny)
        config = EngineConfig(models_dir=folder, cache_dir=folder / ".cache")
        engine = Engine.setup(config, placement=placement)  # budgets are set per measurement
        working = engine.models.cache.memory
        pipes = list(working.pipes.values())
        # 1. Resident bytes, storages counted once vs each pipeline's own.
        separate = sum(weight_bytes(pipe) for pipe in pipes)
        shared = weight_bytes(*pipes)
        one = max(weight_bytes(pipe) for pipe in pipes)
        # 2. Switch times: everything resident, then a budget for one checkpoint.
        same, resident, _ = switches(engine, working, separate, args)
        # Two fine-tunes (their shared VAE and text encoder once) do not fit one + 1/8.
        same_host, host, moves = switches(engine, working, one + one // 8, args)
        pageable: list[float] = []
        if args.device == "cuda":
            limit = working.pinned_limit
            working.pinned_limit = 0
            _, _, pageable = switches(engine, working, one + one // 8, args)
            working.pinned_limit = limit
    med = statistics.median
    base = med(same + same_host)
    rows: list[tuple[str, Any]] = [
        (f"checkpoints ({len(pipes)}), each pipeline's own bytes", f"{separate / 2**20:.1f} MiB"),
        ("resident, each storage once", f"{shared / 2**20:.1f} MiB ({shared / separate:.3f}x)"),
        ("request, same checkpoint", f"{base * 1e3:.1f} ms (1.00x)"),
        (
            "request after a switch, resident",
            f"{med(resident) * 1e3:.1f} ms ({med(resident) / base:.2f}x)",
        ),
        (
            "request after a switch, host tier",
            f"{med(host) * 1e3:.1f} ms ({med(host) / base:.2f}x)",
        ),
        (
            "host->device move" + (" (pinned)" if args.device == "cuda" else ""),
            f"{med(moves) * 1e3:.2f} ms",
        ),
    ]
    if pageable:
        rows.append(
            (
                "host->device move (pageable)",
                f"{med(pageable) * 1e3:.2f} ms ({med(pageable) / med(moves):.2f}x pinned)",
            )
        )
    size = f"{args.size}x{args.size}"
    print(f"device {args.device}, {args.steps} steps at {size}, median of {args.repeats}")
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        print(f"  {name:<{width}}  {value}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
