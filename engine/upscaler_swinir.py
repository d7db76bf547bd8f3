"""SwinIR (Liang et al., "SwinIR: Image Restoration Using Swin Transformer", 2021), written
here from the paper and the key layout of the published files, and recognised from those keys.

The network: a 3x3 conv (`conv_first`) to `embed_dim` features; residual Swin Transformer
blocks (`layers.i`: `residual_group.blocks.j` of window attention with a learned relative
position bias, every second block on windows shifted by half a window with the attention mask
that keeps the wrapped-around regions apart, then an MLP; each group closed by a conv,
`1conv` or the lighter `3conv`); a LayerNorm (`norm`) and `conv_after_body`, added to the
shallow features; then the reconstruction the file was trained with:

- `pixelshuffle` (classical SR): `conv_before_upsample`, conv + pixel shuffle steps
  (`upsample.N`), `conv_last`;
- `pixelshuffledirect` (lightweight SR): one conv + pixel shuffle (`upsample.0`);
- `nearest+conv` (real-world SR, e.g. webui's "SwinIR 4x",
  003_realSR_BSRGAN_DFOWMFC_s64w8_SwinIR-L_x4_GAN.pth): nearest x2 steps each followed by a
  conv (`conv_up1`, `conv_up2`), `conv_hr`, `conv_last`;
- none (denoising / JPEG artefact removal, scale 1): `conv_last` added to the input.

The input is padded (reflect) to a multiple of the window and the output cut back, as SwinIR
does. What runs is what webui runs (through spandrel 0.3.4): the RGB mean
(0.4488, 0.4371, 0.4040) taken off, pixel range 255 for the window-7 (JPEG) files and 1
otherwise, and inputs under 16 pixels a side padded to 16 first (spandrel's size requirement),
each call's output clamped to [0, 1]. Only 3-channel files are run: webui hands every upscaler
an RGB-sized (BGR-ordered) tensor.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

import torch
import torch.nn.functional as F
from torch import nn

from .upscaler_arch import Architecture, Unsupported, ceil_to, count_indexed

# The file names webui gives "SwinIR 4x": its download URL's release file, and the name its
# SwinIR upscaler saves that download under (load_model: model_name with "_" for " ").
SWINIR_NAMES: Final[Mapping[str, str]] = {
    "003_realSR_BSRGAN_DFOWMFC_s64w8_SwinIR-L_x4_GAN": "SwinIR 4x",
    "SwinIR_4x": "SwinIR 4x",
}

# SwinIR's 3-channel mean; its `img_range` is 255 for the JPEG models (the only window-7
# ones), 1 otherwise (spandrel's rule, which is what webui runs).
RGB_MEAN: Final = (0.4488, 0.4371, 0.4040)
MIN_SIDE: Final = 16  # spandrel's SizeRequirements(minimum=16) for SwinIR
MASKED: Final = -100.0  # SwinIR's additive mask value between unrelated shifted regions
UPSAMPLERS: Final = ("pixelshuffle", "pixelshuffledirect", "nearest+conv", "")

# A key only SwinIR-shaped files have (HAT, DAT and Swin2SR are told apart before this).
KEY: Final = re.compile(r"^layers\.\d+\.residual_group\.blocks\.\d+\.attn\.")


@dataclass(frozen=True)
class SwinIRConfig:
    """What a file's keys say about its network."""

    embed_dim: int
    depths: tuple[int, ...]
    num_heads: tuple[int, ...]
    window: int
    mlp_hidden: int
    upsampler: str  # one of UPSAMPLERS
    scale: int
    num_feat: int  # the reconstruction's channels (pixelshuffle, nearest+conv)
    resi_connection: str  # "1conv" or "3conv"
    patch_norm: bool
    img_range: float


# --------------------------------------------------------------------------------------------
# Windows, relative positions and the shift mask (pure functions)
# --------------------------------------------------------------------------------------------


def window_partition(x: torch.Tensor, window: int) -> torch.Tensor:
    """(B, H, W, C) -> (B * windows, window * window, C), windows in row-major order."""
    b, h, w, c = x.shape
    x = x.view(b, h // window, window, w // window, window, c)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, window * window, c)


def window_reverse(windows: torch.Tensor, window: int, h: int, w: int) -> torch.Tensor:
    """The inverse of `window_partition`: (B * windows, window * window, C) -> (B, H, W, C)."""
    c = windows.shape[-1]
    x = windows.view(-1, h // window, w // window, window, window, c)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, h, w, c)


def relative_position_index(window: int) -> torch.Tensor:
    """(N, N) with N = window²: for tokens i, j of a window, the row of the bias table that
    holds their offset (dy, dx), each shifted into 0..2w-2: (dy + w - 1) * (2w - 1) + dx + w - 1.
    """
    ys, xs = torch.meshgrid(torch.arange(window), torch.arange(window), indexing="ij")
    ys, xs = ys.flatten(), xs.flatten()
    dy = ys[:, None] - ys[None, :] + window - 1
    dx = xs[:, None] - xs[None, :] + window - 1
    return dy * (2 * window - 1) + dx


def shift_mask(h: int, w: int, window: int, shift: int) -> torch.Tensor:
    """(windows, N, N) additive mask for attention over windows shifted by `shift`: after the
    cyclic roll, the last window row/column holds pixels from up to three regions of the
    unrolled image (body, the strip before the wrap, the wrapped strip); tokens of different
    regions must not attend to each other (MASKED), the rest add 0."""
    region = torch.zeros(1, h, w, 1)
    bands = (slice(0, -window), slice(-window, -shift), slice(-shift, None))
    for i, rows in enumerate(bands):
        for j, cols in enumerate(bands):
            region[:, rows, cols, :] = i * 3 + j
    ids = window_partition(region, window).squeeze(-1)  # (windows, N)
    different = ids[:, None, :] != ids[:, :, None]
    return torch.zeros(different.shape).masked_fill(different, MASKED)


# --------------------------------------------------------------------------------------------
# The network
# --------------------------------------------------------------------------------------------


class _WindowAttention(nn.Module):
    def __init__(self, dim: int, heads: int, window: int):
        super().__init__()
        self.heads = heads
        self.window = window
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * window - 1) ** 2, heads))
        # Derived, not learned: files carry it too; recognise() checks theirs equals this.
        self.register_buffer(
            "relative_position_index", relative_position_index(window), persistent=False
        )

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """x: (B, windows, N, C); mask: (windows, N, N) or None."""
        b, windows, n, c = x.shape
        qkv = self.qkv(x).view(b, windows, n, 3, self.heads, c // self.heads)
        q, k, v = qkv.permute(3, 0, 1, 4, 2, 5)  # each (B, windows, heads, N, head_dim)
        index = self.get_buffer("relative_position_index")
        bias = self.relative_position_bias_table[index.view(-1)].view(n, n, -1).permute(2, 0, 1)
        if mask is not None:
            bias = bias[None] + mask[:, None].to(bias.dtype)  # (windows, heads, N, N)
        # softmax(q k^T / sqrt(head_dim) + bias) v, SwinIR's attention with its default scale.
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        return self.proj(out.transpose(2, 3).reshape(b, windows, n, c))


class _Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class _SwinBlock(nn.Module):
    """LayerNorm, (shifted) window attention, residual; LayerNorm, MLP, residual."""

    def __init__(self, dim: int, heads: int, window: int, shift: int, hidden: int):
        super().__init__()
        self.window = window
        self.shift = shift
        self.norm1 = nn.LayerNorm(dim)
        self.attn = _WindowAttention(dim, heads, window)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = _Mlp(dim, hidden)

    def forward(self, x: torch.Tensor, masks: dict[int, torch.Tensor]) -> torch.Tensor:
        """x: (B, H, W, C), H and W multiples of the window."""
        b, h, w, c = x.shape
        y = self.norm1(x)
        if self.shift:
            y = torch.roll(y, (-self.shift, -self.shift), dims=(1, 2))
        windows = window_partition(y, self.window).view(b, -1, self.window**2, c)
        attended = self.attn(windows, masks.get(self.shift))
        y = window_reverse(attended.reshape(-1, self.window**2, c), self.window, h, w)
        if self.shift:
            y = torch.roll(y, (self.shift, self.shift), dims=(1, 2))
        x = x + y
        return x + self.mlp(self.norm2(x))


def _resi_conv(dim: int, kind: str) -> nn.Module:
    """The conv closing a group / the body: one 3x3, or 3x3 to dim/4, 1x1, 3x3 back."""
    if kind == "1conv":
        return nn.Conv2d(dim, dim, 3, 1, 1)
    quarter = dim // 4
    return nn.Sequential(
        nn.Conv2d(dim, quarter, 3, 1, 1),
        nn.LeakyReLU(0.2),
        nn.Conv2d(quarter, quarter, 1, 1, 0),
        nn.LeakyReLU(0.2),
        nn.Conv2d(quarter, dim, 3, 1, 1),
    )


class _Group(nn.Module):
    def __init__(self, blocks: list[_SwinBlock]):
        super().__init__()
        self.blocks = nn.ModuleList(blocks)


class _RSTB(nn.Module):
    """Residual Swin Transformer block: `depth` Swin blocks (every second one shifted), a conv
    over the feature map, plus the group's input."""

    def __init__(self, config: SwinIRConfig, depth: int, heads: int):
        super().__init__()
        dim, window = config.embed_dim, config.window
        self.residual_group = _Group(
            [
                _SwinBlock(dim, heads, window, window // 2 if j % 2 else 0, config.mlp_hidden)
                for j in range(depth)
            ]
        )
        self.conv = _resi_conv(dim, config.resi_connection)

    def forward(self, x: torch.Tensor, masks: dict[int, torch.Tensor]) -> torch.Tensor:
        y = x
        for block in self.residual_group.blocks:
            y = block(y, masks)
        return self.conv(y.permute(0, 3, 1, 2)).permute(0, 2, 3, 1) + x


class PatchEmbed(nn.Module):
    # Patch size 1 in every SwinIR (and HAT) file: the embedding is only the optional LayerNorm.
    def __init__(self, dim: int, norm: bool):
        super().__init__()
        self.norm: nn.Module = nn.LayerNorm(dim) if norm else nn.Identity()


class SwinIR(nn.Module):
    """SwinIR over a (B, 3, H, W) tensor in [0, 1]; any H, W (padded to the window)."""

    # webui calls it through spandrel, which pads a smaller input up to this first
    # (engine/upscaler_models.py: _descriptor_call).
    min_side: int = MIN_SIDE

    def __init__(self, config: SwinIRConfig):
        super().__init__()
        self.config = config
        dim, feat = config.embed_dim, config.num_feat
        self.register_buffer("mean", torch.tensor(RGB_MEAN).view(1, 3, 1, 1), persistent=False)
        self.conv_first = nn.Conv2d(3, dim, 3, 1, 1)
        self.patch_embed = PatchEmbed(dim, config.patch_norm)
        self.layers = nn.ModuleList(
            _RSTB(config, depth, heads)
            for depth, heads in zip(config.depths, config.num_heads, strict=True)
        )
        self.norm = nn.LayerNorm(dim)
        self.conv_after_body = _resi_conv(dim, config.resi_connection)
        self.lrelu = nn.LeakyReLU(0.2)
        if config.upsampler == "pixelshuffle":
            # nn.LeakyReLU's default slope (0.01) here, as in SwinIR; 0.2 elsewhere.
            self.conv_before_upsample = nn.Sequential(nn.Conv2d(dim, feat, 3, 1, 1), nn.LeakyReLU())
            self.upsample = _pixelshuffle_steps(config.scale, feat)
            self.conv_last = nn.Conv2d(feat, 3, 3, 1, 1)
        elif config.upsampler == "pixelshuffledirect":
            s = config.scale
            self.upsample = nn.Sequential(nn.Conv2d(dim, 3 * s * s, 3, 1, 1), nn.PixelShuffle(s))
        elif config.upsampler == "nearest+conv":
            self.conv_before_upsample = nn.Sequential(nn.Conv2d(dim, feat, 3, 1, 1), nn.LeakyReLU())
            for i in range(int(math.log2(config.scale))):
                self.add_module(f"conv_up{i + 1}", nn.Conv2d(feat, feat, 3, 1, 1))
            self.conv_hr = nn.Conv2d(feat, feat, 3, 1, 1)
            self.conv_last = nn.Conv2d(feat, 3, 3, 1, 1)
        else:
            self.conv_last = nn.Conv2d(dim, 3, 3, 1, 1)

    def _features(self, x: torch.Tensor) -> torch.Tensor:
        """The deep features: (B, C, H, W) -> (B, C, H, W) through the RSTBs and the norm."""
        window = self.config.window
        h, w = x.shape[-2:]
        tokens = self.patch_embed.norm(x.permute(0, 2, 3, 1))
        shift = window // 2
        # One mask per image size, shared by every shifted block.
        masks = {shift: shift_mask(h, w, window, shift).to(x.device)}
        for layer in self.layers:
            tokens = layer(tokens, masks)
        return self.norm(tokens).permute(0, 3, 1, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        config = self.config
        height, width = x.shape[-2:]
        x = pad_to(x, ceil_to(height, config.window), ceil_to(width, config.window))
        mean = self.get_buffer("mean").to(x.dtype)
        x = (x - mean) * config.img_range
        first = self.conv_first(x)
        body = self.conv_after_body(self._features(first)) + first
        if config.upsampler in ("pixelshuffle", "nearest+conv"):
            out = self.conv_before_upsample(body)
            if config.upsampler == "pixelshuffle":
                out = self.conv_last(self.upsample(out))
            else:
                for i in range(int(math.log2(config.scale))):
                    up = getattr(self, f"conv_up{i + 1}")
                    out = self.lrelu(up(F.interpolate(out, scale_factor=2, mode="nearest")))
                out = self.conv_last(self.lrelu(self.conv_hr(out)))
        elif config.upsampler == "pixelshuffledirect":
            out = self.upsample(body)
        else:
            out = x + self.conv_last(body)
        out = out / config.img_range + mean
        return out[..., : height * config.scale, : width * config.scale]


def _pixelshuffle_steps(scale: int, feat: int) -> nn.Sequential:
    # SwinIR's Upsample: log2(scale) conv + shuffle-by-2 steps, or one by 3.
    if scale == 3:
        return nn.Sequential(nn.Conv2d(feat, 9 * feat, 3, 1, 1), nn.PixelShuffle(3))
    steps: list[nn.Module] = []
    for _ in range(int(math.log2(scale))):
        steps += [nn.Conv2d(feat, 4 * feat, 3, 1, 1), nn.PixelShuffle(2)]
    return nn.Sequential(*steps)


def pad_to(x: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Pad the bottom/right of (B, C, H, W) to at least height x width: reflected as SwinIR
    does, and, where the image is too small to reflect that far, the rest replicated (as
    spandrel pads a too-small input)."""
    h, w = x.shape[-2:]
    pad_h, pad_w = max(0, height - h), max(0, width - w)
    if not (pad_h or pad_w):
        return x
    reflect_h, reflect_w = min(pad_h, h - 1), min(pad_w, w - 1)
    x = F.pad(x, (0, reflect_w, 0, reflect_h), mode="reflect")
    if pad_h > reflect_h or pad_w > reflect_w:
        x = F.pad(x, (0, pad_w - reflect_w, 0, pad_h - reflect_h), mode="replicate")
    return x


# --------------------------------------------------------------------------------------------
# Recognising a SwinIR state dict
# --------------------------------------------------------------------------------------------


def _upsampler(sd: Mapping[str, torch.Tensor]) -> str:
    if "conv_before_upsample.0.weight" in sd:
        return "nearest+conv" if "conv_up1.weight" in sd else "pixelshuffle"
    return "pixelshuffledirect" if "upsample.0.weight" in sd else ""


def _scale_and_feat(sd: Mapping[str, torch.Tensor], upsampler: str, dim: int) -> tuple[int, int]:
    """The native scale and the reconstruction's channels, from the upsampler's convs."""
    if upsampler == "pixelshuffle":
        feat = sd["conv_before_upsample.0.weight"].shape[0]
        scale = 1
        # Convs at the Sequential's even indices, a PixelShuffle after each.
        for index in range(0, count_indexed(sd, r"upsample\.(\d+)\.weight$"), 2):
            key = f"upsample.{index}.weight"
            if key not in sd:
                raise Unsupported(f"SwinIR pixelshuffle without {key}")
            step = math.isqrt(sd[key].shape[0] // feat)
            if step not in (2, 3) or step * step * feat != sd[key].shape[0]:
                raise Unsupported(f"SwinIR upsample step of {sd[key].shape[0]} channels")
            scale *= step
        return scale, feat
    if upsampler == "nearest+conv":
        ups = count_indexed(sd, r"conv_up(\d+)\.weight$") - 1  # conv_up1.. are 1-based
        return 2**ups, sd["conv_before_upsample.0.weight"].shape[0]
    if upsampler == "pixelshuffledirect":
        channels = sd["upsample.0.weight"].shape[0]
        scale = math.isqrt(channels // 3)
        if 3 * scale * scale != channels:
            raise Unsupported(f"SwinIR pixelshuffledirect to {channels} channels (not 3*s*s)")
        return scale, dim
    return 1, dim


def recognise_swinir(
    sd: Mapping[str, torch.Tensor],
) -> tuple[Architecture, SwinIRConfig, dict[str, torch.Tensor]]:
    """(architecture, config, the weights SwinIR(config) loads strictly), or `Unsupported`."""
    if "conv_first.weight" not in sd:
        raise Unsupported("a SwinIR-like model without conv_first (pixel-unshuffled input?)")
    if "absolute_pos_embed" in sd:
        raise Unsupported("a SwinIR model with absolute position embedding")
    dim, in_ch = sd["conv_first.weight"].shape[:2]
    if in_ch != 3:
        raise Unsupported(f"a SwinIR model with {in_ch} input channels (only RGB: 3)")
    first = "layers.0.residual_group.blocks.0."
    table = sd.get(first + "attn.relative_position_bias_table")
    fc1 = sd.get(first + "mlp.fc1.weight")
    if table is None or fc1 is None:
        raise Unsupported("a SwinIR-like model without attention bias table or MLP")
    window = (math.isqrt(table.shape[0]) + 1) // 2
    if (2 * window - 1) ** 2 != table.shape[0]:
        raise Unsupported(f"a SwinIR bias table of {table.shape[0]} rows (not (2w-1)²)")
    layers = count_indexed(sd, r"layers\.(\d+)\.")
    depths = tuple(
        count_indexed(sd, rf"layers\.{i}\.residual_group\.blocks\.(\d+)\.") for i in range(layers)
    )
    heads = tuple(
        sd[f"layers.{i}.residual_group.blocks.0.attn.relative_position_bias_table"].shape[1]
        for i in range(layers)
    )
    if any(dim % h for h in heads):
        raise Unsupported(f"SwinIR with {dim} channels over {heads} heads")
    upsampler = _upsampler(sd)
    scale, feat = _scale_and_feat(sd, upsampler, dim)
    out_key = "upsample.0.weight" if upsampler == "pixelshuffledirect" else "conv_last.weight"
    if out_key not in sd or (upsampler != "pixelshuffledirect" and sd[out_key].shape[0] != 3):
        raise Unsupported("a SwinIR model that does not end in 3 channels (only RGB)")
    config = SwinIRConfig(
        embed_dim=dim,
        depths=depths,
        num_heads=heads,
        window=window,
        mlp_hidden=fc1.shape[0],
        upsampler=upsampler,
        scale=scale,
        num_feat=feat,
        resi_connection="1conv" if "conv_after_body.weight" in sd else "3conv",
        patch_norm="patch_embed.norm.weight" in sd,
        img_range=255.0 if window == 7 else 1.0,
    )
    weights = _without_derived_buffers(sd, window)
    name = upsampler or "no upsampler"
    shape = "/".join(map(str, depths))
    text = f"SwinIR x{scale} {name} ({shape} blocks, {dim} channels, window {window})"
    return Architecture("SwinIR", scale, text), config, weights


def _without_derived_buffers(sd: Mapping[str, torch.Tensor], window: int) -> dict[str, Any]:
    """The weights without the buffers SwinIR files carry but this module derives: each
    block's relative_position_index (checked: a file whose index differs is another layout)
    and its attn_mask (made for the training patch size; recomputed for each input size)."""
    expected = relative_position_index(window)
    weights: dict[str, Any] = {}
    for key, value in sd.items():
        if key.endswith(".attn_mask"):
            continue
        if key.endswith(".attn.relative_position_index"):
            if tuple(value.shape) != tuple(expected.shape) or not torch.equal(
                value.long(), expected
            ):
                raise Unsupported(f"a SwinIR-like model whose {key} is not SwinIR's")
            continue
        weights[key] = value
    return weights
