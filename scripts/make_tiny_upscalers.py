"""Write tiny random-weight upscaler files in the key layouts real downloads use.

    python scripts/make_tiny_upscalers.py DIR [--seed N]

Called by scripts/make_tiny_models.py's `make_all`, into DIR/upscalers/:

- `4x-tiny-esrgan.pth`: ESRGAN's original layout (`model.0`, `model.1.sub.N.RDBk.convj.0`,
  `model.3`/`model.6` upsampling convs, `model.8` conv_hr, `model.10` conv_last), x4, like
  4x-UltraSharp or ESRGAN_4x.
- `RealESRGAN_x4plus.pth`: BasicSR's layout wrapped in `params_ema`, x4 (webui names it
  "R-ESRGAN 4x+").
- `RealESRGAN_x2plus.safetensors`: BasicSR's layout, x2 through a pixel-unshuffled input
  (48 -> 12 input channels), flat keys ("R-ESRGAN 2x+").
- `realesr-general-x4v3.pth`: Real-ESRGAN's SRVGGNetCompact wrapped in `params` (conv + PReLU
  pairs, pixel shuffle), x4 ("R-ESRGAN General 4xV3").

Real topologies (two RRDB blocks, two body convs), tiny widths. Every tensor comes from its own
generator seeded from (seed, file, key), so a seed gives the same tensors on every run.
"""

from __future__ import annotations

import argparse
import hashlib
from pathlib import Path

import torch
from safetensors.torch import save_file

NF, GC, BLOCKS = 8, 4, 2  # RRDBNet: channels, growth channels, RRDB blocks
VGG_NF, VGG_CONVS = 8, 2  # SRVGGNetCompact: channels, body convs

FILES: dict[str, str] = {
    "esrgan-old": "upscalers/4x-tiny-esrgan.pth",
    "esrgan-new": "upscalers/RealESRGAN_x4plus.pth",
    "esrgan-x2": "upscalers/RealESRGAN_x2plus.safetensors",
    "srvgg": "upscalers/realesr-general-x4v3.pth",
}


def _tensor(shape: tuple[int, ...], seed: int, file: str, key: str) -> torch.Tensor:
    digest = hashlib.sha256(f"{seed}/{file}/{key}".encode()).digest()
    gen = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little"))
    if len(shape) == 1 and key.endswith("bias"):
        # The last conv's bias puts the output mid-grey, so the image is not clamped to black.
        last = shape[0] <= 3 and key in ("conv_last.bias", "model.10.bias")
        return torch.full(shape, 0.5) if last else torch.randn(shape, generator=gen) * 0.01
    if len(shape) == 1:  # PReLU slopes
        return torch.full(shape, 0.25)
    fan_in = shape[1] * shape[2] * shape[3]
    # Kaiming; ESRGAN scales its trunk's init by 0.1 (the residual blocks), kept here.
    # The last conv is scaled down too, so the output varies around grey instead of saturating.
    small = ".rdb" in key or ".RDB" in key or shape[0] <= 3 or key.startswith("body.6")
    return torch.randn(shape, generator=gen) * ((0.1 if small else 1.0) * (2.0 / fan_in) ** 0.5)


def _conv(key: str, cin: int, cout: int) -> dict[str, tuple[int, ...]]:
    return {f"{key}.weight": (cout, cin, 3, 3), f"{key}.bias": (cout,)}


def rrdb_new_shapes(in_ch: int, upsamples: int) -> dict[str, tuple[int, ...]]:
    """BasicSR's RRDBNet keys: conv_first, body.N.rdbK.convJ, conv_body, conv_upI, conv_hr,
    conv_last."""
    shapes = _conv("conv_first", in_ch, NF)
    for block in range(BLOCKS):
        for rdb in (1, 2, 3):
            for j in range(5):
                cout = NF if j == 4 else GC
                shapes |= _conv(f"body.{block}.rdb{rdb}.conv{j + 1}", NF + j * GC, cout)
    shapes |= _conv("conv_body", NF, NF)
    for i in range(upsamples):
        shapes |= _conv(f"conv_up{i + 1}", NF, NF)
    return shapes | _conv("conv_hr", NF, NF) | _conv("conv_last", NF, 3)


def rrdb_old_shapes() -> dict[str, tuple[int, ...]]:
    """The original ESRGAN keys of a x4 model (the Sequential's indices)."""
    shapes = _conv("model.0", 3, NF)
    for block in range(BLOCKS):
        for rdb in (1, 2, 3):
            for j in range(5):
                cout = NF if j == 4 else GC
                shapes |= _conv(f"model.1.sub.{block}.RDB{rdb}.conv{j + 1}.0", NF + j * GC, cout)
    shapes |= _conv(f"model.1.sub.{BLOCKS}", NF, NF)
    for index in (3, 6, 8):
        shapes |= _conv(f"model.{index}", NF, NF)
    return shapes | _conv("model.10", NF, 3)


def srvgg_shapes(scale: int = 4) -> dict[str, tuple[int, ...]]:
    """SRVGGNetCompact: body.0 conv, body.1 PReLU, ..., last conv to 3*scale*scale."""
    shapes = _conv("body.0", 3, VGG_NF) | {"body.1.weight": (VGG_NF,)}
    index = 2
    for _ in range(VGG_CONVS):
        shapes |= _conv(f"body.{index}", VGG_NF, VGG_NF) | {f"body.{index + 1}.weight": (VGG_NF,)}
        index += 2
    return shapes | _conv(f"body.{index}", VGG_NF, 3 * scale * scale)


def _tensors(shapes: dict[str, tuple[int, ...]], seed: int, file: str) -> dict[str, torch.Tensor]:
    return {key: _tensor(shape, seed, file, key) for key, shape in sorted(shapes.items())}


def write_all(out_dir: Path, seed: int = 0) -> dict[str, Path]:
    """Write the four files under `out_dir`; returns FILES' names mapped to the paths."""
    paths = {name: Path(out_dir) / rel for name, rel in FILES.items()}
    paths["esrgan-old"].parent.mkdir(parents=True, exist_ok=True)
    torch.save(_tensors(rrdb_old_shapes(), seed, "esrgan-old"), paths["esrgan-old"])
    new = _tensors(rrdb_new_shapes(3, 2), seed, "esrgan-new")
    torch.save({"params_ema": new}, paths["esrgan-new"])
    save_file(_tensors(rrdb_new_shapes(12, 2), seed, "esrgan-x2"), str(paths["esrgan-x2"]))
    torch.save({"params": _tensors(srvgg_shapes(), seed, "srvgg")}, paths["srvgg"])
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    for path in write_all(args.out_dir, args.seed).values():
        print(f"{path}  {path.stat().st_size / 1e3:.1f} kB")


if __name__ == "__main__":
    main()
