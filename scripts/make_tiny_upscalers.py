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
- `SwinIR_4x.pth`: SwinIR's real-world layout (`nearest+conv` upsampler, `3conv` residual
  convs) wrapped in `params_ema`, with the `relative_position_index` and `attn_mask` buffers
  real files carry, x4 (webui's "SwinIR 4x").
- `001_classicalSR_DF2K_s64w8_SwinIR-M_x2.pth`: SwinIR's classical layout (`pixelshuffle`,
  `1conv`) wrapped in `params`, x2 (named by its stem).

Real topologies (two RRDB blocks, two body convs), tiny widths. Every tensor comes from its own
generator seeded from (seed, file, key), so a seed gives the same tensors on every run.
"""

from __future__ import annotations

import argparse
import hashlib
import math
from dataclasses import dataclass
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
    "swinir-real": "upscalers/SwinIR_4x.pth",
    "swinir-classical": "upscalers/001_classicalSR_DF2K_s64w8_SwinIR-M_x2.pth",
}


@dataclass(frozen=True)
class SwinIRShape:
    """A SwinIR layout: tiny widths, real topology. `feat` stays 64: SwinIR's (and spandrel's)
    reconstruction width is fixed at 64 in every released file."""

    upsampler: str  # "pixelshuffle", "pixelshuffledirect", "nearest+conv" or ""
    scale: int
    resi: str = "1conv"  # or "3conv"
    dim: int = 16
    depths: tuple[int, ...] = (2, 2)
    heads: tuple[int, ...] = (2, 4)
    window: int = 4
    mlp_hidden: int = 32
    feat: int = 64

    @property
    def train_size(self) -> int:
        # The training patch side the attn_mask buffers are made for (real files: 64, w 8).
        return 4 * self.window

    @property
    def last(self) -> str:
        # The conv that writes the picture's channels.
        return "upsample.0" if self.upsampler == "pixelshuffledirect" else "conv_last"


SWINIR_REAL = SwinIRShape("nearest+conv", 4, resi="3conv")
SWINIR_CLASSICAL = SwinIRShape("pixelshuffle", 2, dim=12, depths=(2,), heads=(3,), mlp_hidden=24)


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


def _convs(key: str, cin: int, cout: int, resi: str) -> dict[str, tuple[int, ...]]:
    """SwinIR's residual conv: one 3x3, or `3conv` (3x3 to a quarter, 1x1, 3x3 back)."""
    if resi == "1conv":
        return _conv(key, cin, cout)
    quarter = cin // 4
    one = {f"{key}.2.weight": (quarter, quarter, 1, 1), f"{key}.2.bias": (quarter,)}
    return _conv(f"{key}.0", cin, quarter) | one | _conv(f"{key}.4", quarter, cout)


def swinir_shapes(shape: SwinIRShape) -> dict[str, tuple[int, ...]]:
    """SwinIR's parameter keys (no buffers) for `shape`."""
    dim, table = shape.dim, (2 * shape.window - 1) ** 2
    shapes = _conv("conv_first", 3, dim)
    shapes |= {"patch_embed.norm.weight": (dim,), "patch_embed.norm.bias": (dim,)}
    for i, (depth, heads) in enumerate(zip(shape.depths, shape.heads, strict=True)):
        for j in range(depth):
            b = f"layers.{i}.residual_group.blocks.{j}."
            shapes |= {
                b + "norm1.weight": (dim,),
                b + "norm1.bias": (dim,),
                b + "attn.relative_position_bias_table": (table, heads),
                b + "attn.qkv.weight": (3 * dim, dim),
                b + "attn.qkv.bias": (3 * dim,),
                b + "attn.proj.weight": (dim, dim),
                b + "attn.proj.bias": (dim,),
                b + "norm2.weight": (dim,),
                b + "norm2.bias": (dim,),
                b + "mlp.fc1.weight": (shape.mlp_hidden, dim),
                b + "mlp.fc1.bias": (shape.mlp_hidden,),
                b + "mlp.fc2.weight": (dim, shape.mlp_hidden),
                b + "mlp.fc2.bias": (dim,),
            }
        shapes |= _convs(f"layers.{i}.conv", dim, dim, shape.resi)
    shapes |= {"norm.weight": (dim,), "norm.bias": (dim,)}
    shapes |= _convs("conv_after_body", dim, dim, shape.resi)
    feat, steps = shape.feat, shape.scale.bit_length() - 1
    if shape.upsampler == "pixelshuffle":
        shapes |= _conv("conv_before_upsample.0", dim, feat)
        # Conv + PixelShuffle(2) per doubling, or one conv + PixelShuffle(3) for x3.
        factors = [3] if shape.scale == 3 else [2] * steps
        for step, factor in enumerate(factors):
            shapes |= _conv(f"upsample.{2 * step}", feat, factor * factor * feat)
        shapes |= _conv("conv_last", feat, 3)
    elif shape.upsampler == "pixelshuffledirect":
        shapes |= _conv("upsample.0", dim, 3 * shape.scale**2)
    elif shape.upsampler == "nearest+conv":
        shapes |= _conv("conv_before_upsample.0", dim, feat)
        for step in range(steps):
            shapes |= _conv(f"conv_up{step + 1}", feat, feat)
        shapes |= _conv("conv_hr", feat, feat) | _conv("conv_last", feat, 3)
    else:
        shapes |= _conv("conv_last", dim, 3)
    return shapes


def _swinir_tensor(
    shape: tuple[int, ...], seed: int, file: str, key: str, last: str
) -> torch.Tensor:
    digest = hashlib.sha256(f"{seed}/{file}/{key}".encode()).digest()
    gen = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little"))
    noise = torch.randn(shape, generator=gen)
    if key.endswith(("norm.weight", "norm1.weight", "norm2.weight")):
        return 1 + 0.1 * noise  # LayerNorm gains near 1
    if key.endswith("bias"):
        return noise * 0.02
    if key.endswith("relative_position_bias_table"):
        return noise  # large enough that a wrong index or mask shows in the output
    fan_in = math.prod(shape[1:])
    # The last conv smaller, so the picture varies around SwinIR's mean without saturating.
    return noise * ((0.08 if key.startswith(last) else 1.0) * (2.0 / fan_in) ** 0.5)


def swinir_buffers(shape: SwinIRShape) -> dict[str, torch.Tensor]:
    """The buffers SwinIR files carry beside the weights: each block's
    relative_position_index, and each shifted block's attn_mask for the training size."""
    w = shape.window
    coords = [(y, x) for y in range(w) for x in range(w)]
    index = torch.tensor(
        [
            [(a[0] - b[0] + w - 1) * (2 * w - 1) + (a[1] - b[1] + w - 1) for b in coords]
            for a in coords
        ]
    )
    side, shift = shape.train_size, w // 2
    region = [
        [_band(y, side, w, shift) * 3 + _band(x, side, w, shift) for x in range(side)]
        for y in range(side)
    ]
    windows = [
        [region[wy + y][wx + x] for y in range(w) for x in range(w)]
        for wy in range(0, side, w)
        for wx in range(0, side, w)
    ]
    mask = torch.tensor(
        [[[0.0 if a == b else -100.0 for b in ids] for a in ids] for ids in windows]
    )
    out: dict[str, torch.Tensor] = {}
    for i, depth in enumerate(shape.depths):
        for j in range(depth):
            b = f"layers.{i}.residual_group.blocks.{j}.attn"
            out[f"{b}.relative_position_index"] = index
            if j % 2:
                out[f"layers.{i}.residual_group.blocks.{j}.attn_mask"] = mask
    return out


def _band(pos: int, side: int, window: int, shift: int) -> int:
    # Which of the three strips of a shifted image a coordinate is in (SwinIR's slices).
    return 0 if pos < side - window else 1 if pos < side - shift else 2


def swinir_state(shape: SwinIRShape, seed: int, file: str) -> dict[str, torch.Tensor]:
    """A random-weight SwinIR state dict for `shape`, with the buffers real files carry."""
    shapes = swinir_shapes(shape)
    weights = {k: _swinir_tensor(v, seed, file, k, shape.last) for k, v in sorted(shapes.items())}
    return weights | swinir_buffers(shape)


def _tensors(shapes: dict[str, tuple[int, ...]], seed: int, file: str) -> dict[str, torch.Tensor]:
    return {key: _tensor(shape, seed, file, key) for key, shape in sorted(shapes.items())}


def write_all(out_dir: Path, seed: int = 0) -> dict[str, Path]:
    """Write the files under `out_dir`; returns FILES' names mapped to the paths."""
    paths = {name: Path(out_dir) / rel for name, rel in FILES.items()}
    paths["esrgan-old"].parent.mkdir(parents=True, exist_ok=True)
    torch.save(_tensors(rrdb_old_shapes(), seed, "esrgan-old"), paths["esrgan-old"])
    new = _tensors(rrdb_new_shapes(3, 2), seed, "esrgan-new")
    torch.save({"params_ema": new}, paths["esrgan-new"])
    save_file(_tensors(rrdb_new_shapes(12, 2), seed, "esrgan-x2"), str(paths["esrgan-x2"]))
    torch.save({"params": _tensors(srvgg_shapes(), seed, "srvgg")}, paths["srvgg"])
    real = swinir_state(SWINIR_REAL, seed, "swinir-real")
    torch.save({"params_ema": real}, paths["swinir-real"])
    classical = swinir_state(SWINIR_CLASSICAL, seed, "swinir-classical")
    torch.save({"params": classical}, paths["swinir-classical"])
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
