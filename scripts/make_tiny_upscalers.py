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
- `DAT_x4.pth`: DAT's layout (`pixelshuffle`, `1conv`, two residual groups so that both
  groups' shifted blocks exist) wrapped in `params`, with the `rpe_biases`,
  `relative_position_index` and `attn_mask_0/1` buffers and the BatchNorm statistics real
  files carry, x4 (the name webui saves its "DAT x4" download under).
- `HAT_SRx4_ImageNet-pretrain.pth`: HAT's layout (hybrid attention blocks with their channel
  attention, one overlapping cross-attention block per group, `1conv`) wrapped in
  `params_ema`, with the `relative_position_index_SA`/`_OCA` buffers real files carry, x4
  (named by its stem, as webui names HAT files).

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
    "dat": "upscalers/DAT_x4.pth",
    "hat": "upscalers/HAT_SRx4_ImageNet-pretrain.pth",
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


@dataclass(frozen=True)
class DATShape:
    """A DAT layout: tiny widths, real topology. The derived widths follow DAT's constructor
    (spandrel's): spatial heads heads//2 per branch, position MLP ((dim//2)//4)//4 wide (2 at
    dim 64: the smallest width whose LayerNorm keeps a dependence on the offset), SGFN
    dim*expansion; `feat` 64 as in every released file."""

    upsampler: str  # "pixelshuffle" or "pixelshuffledirect"
    scale: int
    resi: str = "1conv"  # or "3conv"
    dim: int = 64
    depths: tuple[int, ...] = (3, 2)  # block 2 of group 0 and block 0 of group 1 are shifted
    heads: tuple[int, ...] = (4, 4)
    split: tuple[int, int] = (2, 4)
    expansion: float = 2.0
    qkv_bias: bool = True
    feat: int = 64
    train_size: int = 16  # the patch side the attn_mask buffers are made for

    @property
    def hidden(self) -> int:
        return int(self.dim * self.expansion)

    @property
    def pos_dim(self) -> int:
        return ((self.dim // 2) // 4) // 4

    @property
    def last(self) -> str:
        return "upsample.0" if self.upsampler == "pixelshuffledirect" else "conv_last"


DAT_X4 = DATShape("pixelshuffle", 4)


def _norm(key: str, width: int) -> dict[str, tuple[int, ...]]:
    return {f"{key}.weight": (width,), f"{key}.bias": (width,)}


def _batchnorm(key: str, width: int) -> dict[str, tuple[int, ...]]:
    stats = {f"{key}.running_mean": (width,), f"{key}.running_var": (width,)}
    return _norm(key, width) | stats | {f"{key}.num_batches_tracked": ()}


def _linear(key: str, cin: int, cout: int, bias: bool = True) -> dict[str, tuple[int, ...]]:
    return {f"{key}.weight": (cout, cin)} | ({f"{key}.bias": (cout,)} if bias else {})


def _conv1(key: str, cin: int, cout: int, groups: int = 1, k: int = 1) -> dict:
    return {f"{key}.weight": (cout, cin // groups, k, k), f"{key}.bias": (cout,)}


def dat_shapes(shape: DATShape) -> dict[str, tuple[int, ...]]:
    """DAT's parameter keys and BatchNorm statistics (no derived buffers) for `shape`."""
    dim, hidden, pos = shape.dim, shape.hidden, shape.pos_dim
    shapes = _conv("conv_first", 3, dim) | _norm("before_RG.1", dim)
    for i, (depth, heads) in enumerate(zip(shape.depths, shape.heads, strict=True)):
        for j in range(depth):
            b = f"layers.{i}.blocks.{j}."
            shapes |= _norm(b + "norm1", dim) | _norm(b + "norm2", dim)
            shapes |= _linear(b + "attn.qkv", dim, 3 * dim, shape.qkv_bias)
            shapes |= _linear(b + "attn.proj", dim, dim)
            shapes |= _conv1(b + "attn.dwconv.0", dim, dim, groups=dim, k=3)
            shapes |= _batchnorm(b + "attn.dwconv.1", dim)
            ci, si = b + "attn.channel_interaction.", b + "attn.spatial_interaction."
            shapes |= _conv1(ci + "1", dim, dim // 8) | _batchnorm(ci + "2", dim // 8)
            shapes |= _conv1(ci + "4", dim // 8, dim)
            shapes |= _conv1(si + "0", dim, dim // 16) | _batchnorm(si + "1", dim // 16)
            shapes |= _conv1(si + "3", dim // 16, 1)
            if j % 2 == 0:
                for branch in (0, 1):
                    p = f"{b}attn.attns.{branch}.pos."
                    shapes |= _linear(p + "pos_proj", 2, pos)
                    for stage in ("pos1", "pos2", "pos3"):
                        out = heads // 2 if stage == "pos3" else pos
                        shapes |= _norm(f"{p}{stage}.0", pos) | _linear(f"{p}{stage}.2", pos, out)
            else:
                shapes[b + "attn.temperature"] = (heads, 1, 1)
            shapes |= _linear(b + "ffn.fc1", dim, hidden)
            shapes |= _norm(b + "ffn.sg.norm", hidden // 2)
            shapes |= _conv1(b + "ffn.sg.conv", hidden // 2, hidden // 2, groups=hidden // 2, k=3)
            shapes |= _linear(b + "ffn.fc2", hidden // 2, dim)
        shapes |= _convs(f"layers.{i}.conv", dim, dim, shape.resi)
    shapes |= _norm("norm", dim) | _convs("conv_after_body", dim, dim, shape.resi)
    if shape.upsampler == "pixelshuffle":
        feat = shape.feat
        shapes |= _conv("conv_before_upsample.0", dim, feat)
        factors = [3] if shape.scale == 3 else [2] * (shape.scale.bit_length() - 1)
        for step, factor in enumerate(factors):
            shapes |= _conv(f"upsample.{2 * step}", feat, factor * factor * feat)
        shapes |= _conv("conv_last", feat, 3)
    else:
        shapes |= _conv("upsample.0", dim, 3 * shape.scale**2)
    return shapes


def _dat_tensor(shape: tuple[int, ...], seed: int, file: str, key: str, last: str) -> torch.Tensor:
    digest = hashlib.sha256(f"{seed}/{file}/{key}".encode()).digest()
    gen = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little"))
    if key.endswith("num_batches_tracked"):
        return torch.tensor(1000)
    noise = torch.randn(shape, generator=gen)
    if key.endswith(("running_var", "temperature")):
        return 0.5 + noise.abs()  # positive
    if key.endswith("running_mean"):
        return 0.1 * noise
    if len(shape) == 1 and key.endswith("weight"):
        return 1 + 0.1 * noise  # LayerNorm / BatchNorm gains near 1
    if key.endswith("bias"):
        return noise * 0.02
    fan_in = math.prod(shape[1:])
    # The position MLP's last layer larger, so that a wrong offset or index shows; the last
    # conv smaller, so the picture varies around the mean without saturating.
    gain = 0.08 if key.startswith(last) else 3.0 if ".pos3.2." in key else 1.0
    return noise * (gain * (2.0 / fan_in) ** 0.5)


def dat_buffers(shape: DATShape) -> dict[str, torch.Tensor]:
    """The buffers DAT files carry beside the weights, written from the published formulas
    by loops of their own: each window branch's offsets (`rpe_biases`) and
    relative_position_index, and each shifted block's attn_mask_0/1 for the training size."""
    out: dict[str, torch.Tensor] = {}
    windows = {0: shape.split, 1: shape.split[::-1]}
    for i, depth in enumerate(shape.depths):
        for j in range(0, depth, 2):
            b = f"layers.{i}.blocks.{j}.attn."
            for branch, (wh, ww) in windows.items():
                offsets = [[dy, dx] for dy in range(1 - wh, wh) for dx in range(1 - ww, ww)]
                coords = [(y, x) for y in range(wh) for x in range(ww)]
                index = [
                    [(a[0] - c[0] + wh - 1) * (2 * ww - 1) + a[1] - c[1] + ww - 1 for c in coords]
                    for a in coords
                ]
                out[f"{b}attns.{branch}.rpe_biases"] = torch.tensor(offsets, dtype=torch.float32)
                out[f"{b}attns.{branch}.relative_position_index"] = torch.tensor(index)
            # DAT's rule: blocks 2, 6, ... of even groups, 0, 4, ... of odd groups.
            if (j % 4 == 2) if i % 2 == 0 else (j % 4 == 0):
                for branch, (wh, ww) in windows.items():
                    out[f"{b}attn_mask_{branch}"] = _dat_mask(shape.train_size, wh, ww)
    return out


def _dat_mask(side: int, wh: int, ww: int) -> torch.Tensor:
    # Regions of the shifted image by their three strips per axis, windows row-major.
    def band(pos: int, window: int) -> int:
        return 0 if pos < side - window else 1 if pos < side - window // 2 else 2

    region = [[band(y, wh) * 3 + band(x, ww) for x in range(side)] for y in range(side)]
    ids = [
        [region[wy + y][wx + x] for y in range(wh) for x in range(ww)]
        for wy in range(0, side, wh)
        for wx in range(0, side, ww)
    ]
    return torch.tensor([[[0.0 if a == b else -100.0 for b in w] for a in w] for w in ids])


def dat_state(shape: DATShape, seed: int, file: str) -> dict[str, torch.Tensor]:
    """A random-weight DAT state dict for `shape`, with the buffers real files carry."""
    shapes = dat_shapes(shape)
    weights = {k: _dat_tensor(v, seed, file, k, shape.last) for k, v in sorted(shapes.items())}
    return weights | dat_buffers(shape)


@dataclass(frozen=True)
class HATShape:
    """A HAT layout: tiny widths, real topology (`feat` 64 as in every released file)."""

    scale: int
    dim: int = 32
    depths: tuple[int, ...] = (2, 2)
    heads: tuple[int, ...] = (2, 4)
    window: int = 4
    overlap: int = 6  # window + int(0.5 * window): HAT's overlap ratio 0.5
    compress: int = 8  # dim / compress_ratio (HAT: 3, HAT-S: 24)
    squeeze: int = 2  # dim / squeeze_factor (HAT: 30)
    mlp_hidden: int = 64
    resi: bool = True  # conv_after_body and each group's conv (else none: "identity")
    qkv_bias: bool = True
    feat: int = 64


HAT_X4 = HATShape(4)


def hat_shapes(shape: HATShape) -> dict[str, tuple[int, ...]]:
    """HAT's parameter keys (no buffers) for `shape`."""
    dim, hidden = shape.dim, shape.mlp_hidden
    sa, oca = (2 * shape.window - 1) ** 2, (shape.window + shape.overlap - 1) ** 2
    shapes = _conv("conv_first", 3, dim) | _norm("patch_embed.norm", dim)
    for i, (depth, heads) in enumerate(zip(shape.depths, shape.heads, strict=True)):
        group = f"layers.{i}.residual_group."
        for j in range(depth):
            b = f"{group}blocks.{j}."
            shapes |= _norm(b + "norm1", dim) | _norm(b + "norm2", dim)
            shapes[b + "attn.relative_position_bias_table"] = (sa, heads)
            shapes |= _linear(b + "attn.qkv", dim, 3 * dim, shape.qkv_bias)
            shapes |= _linear(b + "attn.proj", dim, dim)
            shapes |= _conv(b + "conv_block.cab.0", dim, shape.compress)
            shapes |= _conv(b + "conv_block.cab.2", shape.compress, dim)
            shapes |= _conv1(b + "conv_block.cab.3.attention.1", dim, shape.squeeze)
            shapes |= _conv1(b + "conv_block.cab.3.attention.3", shape.squeeze, dim)
            shapes |= _linear(b + "mlp.fc1", dim, hidden) | _linear(b + "mlp.fc2", hidden, dim)
        o = group + "overlap_attn."
        shapes |= _norm(o + "norm1", dim) | _norm(o + "norm2", dim)
        shapes |= _linear(o + "qkv", dim, 3 * dim, shape.qkv_bias)
        shapes[o + "relative_position_bias_table"] = (oca, heads)
        shapes |= _linear(o + "proj", dim, dim)
        shapes |= _linear(o + "mlp.fc1", dim, hidden) | _linear(o + "mlp.fc2", hidden, dim)
        if shape.resi:
            shapes |= _conv(f"layers.{i}.conv", dim, dim)
    shapes |= _norm("norm", dim)
    if shape.resi:
        shapes |= _conv("conv_after_body", dim, dim)
    feat = shape.feat
    shapes |= _conv("conv_before_upsample.0", dim, feat)
    factors = [3] if shape.scale == 3 else [2] * (shape.scale.bit_length() - 1)
    for step, factor in enumerate(factors):
        shapes |= _conv(f"upsample.{2 * step}", feat, factor * factor * feat)
    return shapes | _conv("conv_last", feat, 3)


def hat_buffers(shape: HATShape) -> dict[str, torch.Tensor]:
    """The index buffers HAT files carry, from HAT's published formulas by loops of their own:
    window attention's (dy + w - 1) * (2w - 1) + dx + w - 1, and the overlapping attention's
    (ky - qy + w - o + 1) * (w + o - 1) + kx - qx + w - o + 1 (query token q of a w x w window,
    key token k of its o x o window; negative where k is far above or left of q)."""
    w, o = shape.window, shape.overlap
    window = [(y, x) for y in range(w) for x in range(w)]
    around = [(y, x) for y in range(o) for x in range(o)]
    sa = [
        [(a[0] - b[0] + w - 1) * (2 * w - 1) + a[1] - b[1] + w - 1 for b in window] for a in window
    ]
    shift = w - o + 1
    oca = [
        [(k[0] - q[0] + shift) * (w + o - 1) + k[1] - q[1] + shift for k in around] for q in window
    ]
    return {
        "relative_position_index_SA": torch.tensor(sa),
        "relative_position_index_OCA": torch.tensor(oca),
    }


def hat_state(shape: HATShape, seed: int, file: str) -> dict[str, torch.Tensor]:
    """A random-weight HAT state dict for `shape`, with the buffers real files carry."""
    shapes = hat_shapes(shape)
    weights = {k: _swinir_tensor(v, seed, file, k, "conv_last") for k, v in sorted(shapes.items())}
    return weights | hat_buffers(shape)


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
    torch.save({"params": dat_state(DAT_X4, seed, "dat")}, paths["dat"])
    torch.save({"params_ema": hat_state(HAT_X4, seed, "hat")}, paths["hat"])
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
