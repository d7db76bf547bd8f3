"""Benchmark (not a test): our per-request LoRA handling against plain diffusers, in one run.

    python scripts/bench_lora.py [--models DIR] [--adapters 8] [--repeats 20] [--peft-public]

On the tiny models (made into a temporary folder unless --models names a folder made by
make_tiny_models.py) it times, for our LoraManager and for the same operations done with
diffusers' own API on a second copy of the pipeline:
  1. first use of a LoRA (file read + wrapping the model's layers),
  2. a switch between cached LoRAs (what a request with another LoRA or weight costs),
  3. the way back to the plain model after a LoRA request,
  4. the switch cost with 2 and with N cached adapters (ours must not grow with N).
It prints milliseconds and the ratio ours / diffusers. The tiny models have few layers, so the
absolute numbers are small; the ratios and the growth with N are what this is for.

--peft-public swaps our per-layer switch (a write of the attribute peft's `active_adapter`
property reads) for peft's public `BaseTunerLayer.set_adapter(names, inference_mode=True)`,
so the cost of using only the public API can be measured in the same run shape (issue 13).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch
from safetensors.torch import load_file, save_file

from engine import networks
from engine.catalog import Catalog
from engine.loading import default_placement, load_checkpoint
from engine.networks import LoraCatalog, LoraManager, LoraRequest
from scripts.make_tiny_models import make_all


def timed(action: Callable[[], object], repeats: int) -> float:
    """Median milliseconds of `repeats` runs."""
    samples = []
    for _ in range(repeats):
        started = time.perf_counter()
        action()
        samples.append((time.perf_counter() - started) * 1e3)
    return statistics.median(samples)


def public_set_active(layer: Any, names: list[str]) -> None:
    """Our switch done with peft's public API only (for --peft-public)."""
    if layer.disable_adapters:
        layer.enable_adapters(True)
    if list(layer.active_adapters) != names:
        layer.set_adapter(names, inference_mode=True)


def lora_copies(source: Path, folder: Path, count: int) -> list[Path]:
    """`count` distinct LoRA files (scaled copies of the tiny one)."""
    state = load_file(str(source))
    paths = []
    for i in range(count):
        scaled = {
            k: (v * (1 + i / 10) if k.endswith("lora_up.weight") else v) for k, v in state.items()
        }
        path = folder / f"bench-lora-{i}.safetensors"
        save_file(scaled, str(path), metadata={"ss_base_model_version": "sd_v1"})
        paths.append(path)
    return paths


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", type=Path)
    parser.add_argument("--adapters", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--peft-public", action="store_true")
    args = parser.parse_args()
    if args.peft_public:
        networks._set_active = public_set_active
    torch.set_num_threads(1)

    with tempfile.TemporaryDirectory() as tmp:
        models = args.models or Path(tmp) / "models"
        if args.models is None:
            make_all(models)
        loras_dir = Path(tmp) / "loras"
        loras_dir.mkdir()
        files = lora_copies(
            models / "loras" / "tiny-lora-sd15.safetensors", loras_dir, args.adapters
        )
        catalog = Catalog.scan(models)
        info = catalog.resolve_checkpoint("tiny-sd15.safetensors")
        ours_ckpt = load_checkpoint(info, default_placement(), Path(tmp) / "cache")
        raw = load_checkpoint(info, default_placement(), Path(tmp) / "cache").pipe
        manager = LoraManager(ours_ckpt, LoraCatalog.scan(files), max_cached=args.adapters)
        names = [f.stem for f in files]

        def ours_use(name: str, weight: float = 1.0) -> None:
            with manager.applied([LoraRequest(name, weight, weight)]):
                pass

        rows: list[tuple[str, float, float]] = []
        # 1. First use (one sample each: it is a first use only once).
        t0 = time.perf_counter()
        ours_use(names[0])
        ours_first = (time.perf_counter() - t0) * 1e3
        t0 = time.perf_counter()
        raw.load_lora_weights(str(files[0]), adapter_name="a0")
        raw.set_adapters(["a0"], adapter_weights=[1.0])
        raw_first = (time.perf_counter() - t0) * 1e3
        rows.append(("first use of a LoRA", ours_first, raw_first))

        # Load the rest so both sides hold every adapter.
        for i, name in enumerate(names[1:], start=1):
            ours_use(name)
            raw.load_lora_weights(str(files[i]), adapter_name=f"a{i}")

        # 2. Switching between cached LoRAs (including the way back to none, as a request ends).
        flip = [0]

        def ours_switch() -> None:
            flip[0] ^= 1
            ours_use(names[flip[0]])

        def raw_switch() -> None:
            flip[0] ^= 1
            raw.set_adapters([f"a{flip[0]}"], adapter_weights=[1.0])

        rows.append(
            (
                "switch cached LoRA (+ off)",
                timed(ours_switch, args.repeats),
                timed(raw_switch, args.repeats),
            )
        )
        # 3. Weight-only change.
        weights = [0.5, 0.8]

        def ours_weight() -> None:
            weights.reverse()
            ours_use(names[0], weights[0])

        def raw_weight() -> None:
            weights.reverse()
            raw.set_adapters(["a0"], adapter_weights=[weights[0]])

        rows.append(
            (
                "weight-only change",
                timed(ours_weight, args.repeats),
                timed(raw_weight, args.repeats),
            )
        )

        # 4. Back to the plain model: ours deactivates when the request's context closes;
        #    diffusers' way is disable_lora(). Only that step is timed.
        def ours_off_once() -> float:
            context = manager.applied([LoraRequest(names[0], 1.0, 1.0)])
            context.__enter__()
            started = time.perf_counter()
            context.__exit__(None, None, None)
            return (time.perf_counter() - started) * 1e3

        ours_off = statistics.median(ours_off_once() for _ in range(args.repeats))
        rows.append(("back to the plain model", ours_off, timed(raw.disable_lora, args.repeats)))

        # 5. Growth with the number of cached adapters (ours only: the goal is flat).
        small = LoraManager(
            load_checkpoint(info, default_placement(), Path(tmp) / "cache"),
            LoraCatalog.scan(files[:2]),
            max_cached=2,
        )
        for name in names[:2]:
            with small.applied([LoraRequest(name, 1, 1)]):
                pass
        flip2 = [0]

        def small_switch() -> None:
            flip2[0] ^= 1
            with small.applied([LoraRequest(names[flip2[0]], 1, 1)]):
                pass

        two = timed(small_switch, args.repeats)
        many = timed(ours_switch, args.repeats)

    print(f"{'operation':32} {'ours ms':>10} {'diffusers ms':>13} {'ratio':>7}")
    for label, ours, theirs in rows:
        print(f"{label:32} {ours:10.2f} {theirs:13.2f} {ours / theirs:7.2f}")
    print(
        f"switch with 2 cached: {two:.2f} ms; with {args.adapters} cached: {many:.2f} ms; "
        f"ratio {many / two:.2f}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
