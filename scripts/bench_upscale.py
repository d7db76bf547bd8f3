"""Benchmark (not a test): webui's tiled upscale with a tiny upscaler model, per tile size.

    python scripts/bench_upscale.py [--model srvgg|esrgan-new|esrgan-old|swinir-real|...]
                                    [--size 512] [--tiles 0,64,128,192,256,512] [--overlap 8]

Writes the tiny upscaler files (scripts/make_tiny_upscalers.py) into a temporary folder and
upscales one `--size` square noise image with the chosen file, once per tile size (0: the
whole image at once), each in a fresh child process so that its memory peak is its own. For
each tile size it prints the number of tiles, the time per tile and in all, and the peak
memory the upscale added: the child's peak resident set (ru_maxrss) after the upscale minus
its peak before it (model loaded, image made). The tiny models have few channels, so the
times are far below a real model's; the growth of memory with the tile size is what this is
for (activations scale with the tile's area times the output scale squared).
SwinIR files are tiled as webui tiles them (upscale_2: square tiles averaged in tensor space,
counted from its row and column offsets), the others by webui's split_grid.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np
from PIL import Image

from engine.upscaler_models import UpscalerCatalog, split_grid, upscale_2, upscale_with_model
from scripts.make_tiny_upscalers import FILES, write_all


def child(path: Path, size: int, tile: int, overlap: int) -> dict[str, float]:
    """One measurement in this process: model loaded and image made first, then upscaled."""
    catalog = UpscalerCatalog.scan([path])
    (name,) = catalog.names
    model = catalog.model(name)
    tensor_tiles = catalog.kind(name).tiling == "tensor"
    tiler = upscale_2 if tensor_tiles else upscale_with_model
    rng = np.random.default_rng(0)
    image = Image.fromarray((rng.random((size, size, 3)) * 255).astype(np.uint8))
    tiler(model, image.crop((0, 0, 16, 16)), tile=0)  # warm-up (oneDNN set-up)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    out = tiler(model, image, tile=tile, overlap=overlap)
    seconds = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    tiles = 1
    if tile > 0 and tensor_tiles:
        side = min(tile, size)  # webui's upscale_2: offsets by stride, plus the last one
        tiles = (len(range(0, size - side, side - overlap)) + 1) ** 2
    elif tile > 0:
        tiles = sum(len(row) for _, _, row in split_grid(image, tile, tile, overlap).tiles)
    return {
        "tiles": tiles,
        "seconds": seconds,
        "peak_mib": (after - before) / 1024,  # ru_maxrss is in KiB on Linux
        "out": out.width,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="srvgg", choices=sorted(FILES))
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--tiles", default="0,64,128,192,256,512")
    parser.add_argument("--overlap", type=int, default=8)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        path, tile = args.child.rsplit(":", 1)
        print(json.dumps(child(Path(path), args.size, int(tile), args.overlap)))
        return
    with tempfile.TemporaryDirectory() as folder:
        path = write_all(Path(folder))[args.model]
        print(f"{args.model} ({path.name}), {args.size}x{args.size}, overlap {args.overlap}")
        print(f"{'tile':>6} {'tiles':>6} {'s/tile':>8} {'total s':>8} {'peak MiB':>9} {'out':>6}")
        for tile in [int(t) for t in args.tiles.split(",")]:
            command = [
                sys.executable,
                __file__,
                "--size",
                str(args.size),
                "--overlap",
                str(args.overlap),
                "--child",
                f"{path}:{tile}",
            ]
            result = subprocess.run(command, capture_output=True, text=True, check=True)
            row = json.loads(result.stdout.strip().splitlines()[-1])
            per_tile = row["seconds"] / row["tiles"]
            print(
                f"{tile or 'whole':>6} {row['tiles']:>6} {per_tile:>8.3f} {row['seconds']:>8.2f}"
                f" {row['peak_mib']:>9.1f} {row['out']:>6}"
            )


if __name__ == "__main__":
    main()
