"""HAT (Chen et al., "Activating More Pixels in Image Super-Resolution Transformer", CVPR 2023),
written here from the paper and the key layout of the published files, and recognised from
those keys (HAT-S, HAT, HAT-L and the community files in that layout).

The network: a 3x3 conv (`conv_first`), an optional LayerNorm (`patch_embed.norm`), residual
hybrid attention groups (`layers.i`: `residual_group.blocks.j`, then the group's overlapping
cross-attention block `residual_group.overlap_attn`, a conv `conv` (or none), plus the group's
input), a LayerNorm (`norm`), `conv_after_body` (or none) added to the shallow features, then
`conv_before_upsample`, conv + pixel shuffle steps (`upsample.N`) and `conv_last`.

- A hybrid attention block: LayerNorm, then window attention with a learned relative position
  bias (every second block on windows shifted by half a window, with the mask that keeps
  wrapped-around regions apart) plus 0.01 times a channel attention block over the same
  normalised map (conv to dim/compress, GELU, conv back, squeeze-excitation by
  dim/squeeze), residual; LayerNorm, MLP, residual.
- The overlapping cross-attention block: queries from each window, keys and values from a
  larger window around it (`window + int(overlap_ratio * window)`, zero-padded at the borders),
  a learned bias indexed by HAT's `relative_position_index_OCA` (whose formula gives negative
  entries, which index the table from its end, as in HAT), projection and residual; LayerNorm,
  MLP, residual.

What runs is what webui runs (through spandrel 0.3.4): the RGB mean (0.4488, 0.4371, 0.4040)
taken off, pixel range 1, the input padded (reflect) to a multiple of the window and the
output cut back, inputs under 16 pixels a side padded to 16 first (spandrel's size
requirement), each call's output clamped to [0, 1]. Only 3-channel files without absolute
position embedding are run.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final

import torch
import torch.nn.functional as F
from torch import nn

from .upscaler_arch import Architecture, Unsupported, ceil_to, count_indexed
from .upscaler_swinir import (
    RGB_MEAN,
    PatchEmbed,
    _pixelshuffle_steps,
    pad_to,
    relative_position_index,
    shift_mask,
    window_partition,
    window_reverse,
)

MIN_SIDE: Final = 16  # spandrel's SizeRequirements(minimum=16) for HAT
CONV_SCALE: Final = 0.01  # the channel attention branch's weight (HAT's; not in the files)

# A key only HAT-shaped files have: a group's overlapping cross-attention block.
KEY: Final = re.compile(r"^layers\.\d+\.residual_group\.overlap_attn\.")


@dataclass(frozen=True)
class HATConfig:
    """What a file's keys say about its network."""

    embed_dim: int
    depths: tuple[int, ...]
    num_heads: tuple[int, ...]
    window: int
    overlap_window: int  # the keys/values' window around each query window
    compress: int  # the channel attention block's conv width
    squeeze: int  # its squeeze-excitation width
    mlp_hidden: int
    qkv_bias: bool
    patch_norm: bool
    resi_conv: bool  # a conv closing each group and the body (else none)
    scale: int
    num_feat: int


def oca_index(window: int, overlap: int) -> torch.Tensor:
    """(window², overlap²): HAT's bias-table row for query token i of a window and key token j
    of its overlapping window: the coordinate difference (key - query) shifted by
    window - overlap + 1 per axis (not centred: some rows come out negative), y major with
    stride window + overlap - 1."""
    qy, qx = (
        t.flatten()
        for t in torch.meshgrid(torch.arange(window), torch.arange(window), indexing="ij")
    )
    ky, kx = (
        t.flatten()
        for t in torch.meshgrid(torch.arange(overlap), torch.arange(overlap), indexing="ij")
    )
    shift = window - overlap + 1
    dy = ky[None, :] - qy[:, None] + shift
    dx = kx[None, :] - qx[:, None] + shift
    return dy * (window + overlap - 1) + dx


# --------------------------------------------------------------------------------------------
# The network
# --------------------------------------------------------------------------------------------


class _Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class _Squeeze(nn.Module):
    """Squeeze-excitation (keys `attention.1`, `attention.3`)."""

    def __init__(self, dim: int, width: int):
        super().__init__()
        self.attention = nn.Sequential(
            nn.AdaptiveAvgPool2d(1),
            nn.Conv2d(dim, width, 1),
            nn.ReLU(),
            nn.Conv2d(width, dim, 1),
            nn.Sigmoid(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.attention(x)


class _ChannelBlock(nn.Module):
    """The channel attention block (key `cab`): conv, GELU, conv, squeeze-excitation."""

    def __init__(self, config: HATConfig):
        super().__init__()
        dim = config.embed_dim
        self.cab = nn.Sequential(
            nn.Conv2d(dim, config.compress, 3, 1, 1),
            nn.GELU(),
            nn.Conv2d(config.compress, dim, 3, 1, 1),
            _Squeeze(dim, config.squeeze),
        )


class _WindowAttention(nn.Module):
    def __init__(self, dim: int, heads: int, window: int, qkv_bias: bool):
        super().__init__()
        self.heads = heads
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * window - 1) ** 2, heads))
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(
        self, x: torch.Tensor, index: torch.Tensor, mask: torch.Tensor | None
    ) -> torch.Tensor:
        """x: (B, windows, N, C); mask: (windows, N, N) or None."""
        b, windows, n, c = x.shape
        q, k, v = (
            self.qkv(x)
            .view(b, windows, n, 3, self.heads, c // self.heads)
            .permute(3, 0, 1, 4, 2, 5)
        )
        bias = self.relative_position_bias_table[index.view(-1)].view(n, n, -1).permute(2, 0, 1)
        if mask is not None:
            bias = bias[None] + mask[:, None].to(bias.dtype)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        return self.proj(out.transpose(2, 3).reshape(b, windows, n, c))


class _HybridBlock(nn.Module):
    """LayerNorm; (shifted) window attention + 0.01 x channel attention, residual; LayerNorm,
    MLP, residual."""

    def __init__(self, config: HATConfig, heads: int, shift: int):
        super().__init__()
        dim = config.embed_dim
        self.window, self.shift = config.window, shift
        self.norm1 = nn.LayerNorm(dim)
        self.attn = _WindowAttention(dim, heads, config.window, config.qkv_bias)
        self.conv_block = _ChannelBlock(config)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = _Mlp(dim, config.mlp_hidden)

    def forward(self, x: torch.Tensor, index: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """x: (B, H, W, C), H and W multiples of the window."""
        b, h, w, c = x.shape
        y = self.norm1(x)
        conv = self.conv_block.cab(y.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        if self.shift:
            y = torch.roll(y, (-self.shift, -self.shift), dims=(1, 2))
        windows = window_partition(y, self.window).view(b, -1, self.window**2, c)
        attended = self.attn(windows, index, mask if self.shift else None)
        y = window_reverse(attended.reshape(-1, self.window**2, c), self.window, h, w)
        if self.shift:
            y = torch.roll(y, (self.shift, self.shift), dims=(1, 2))
        x = x + y + conv * CONV_SCALE
        return x + self.mlp(self.norm2(x))


class _OverlapBlock(nn.Module):
    """Overlapping cross-attention: each window's queries against the keys and values of the
    larger window centred on it."""

    def __init__(self, config: HATConfig, heads: int):
        super().__init__()
        dim, window, overlap = config.embed_dim, config.window, config.overlap_window
        self.heads, self.window, self.overlap = heads, window, overlap
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, dim * 3, bias=config.qkv_bias)
        self.relative_position_bias_table = nn.Parameter(
            torch.zeros((window + overlap - 1) ** 2, heads)
        )
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = _Mlp(dim, config.mlp_hidden)

    def forward(self, x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        b, h, w, c = x.shape
        ws, ow, heads = self.window, self.overlap, self.heads
        q, k, v = self.qkv(self.norm1(x)).chunk(3, dim=-1)
        nq = ws * ws
        queries = window_partition(q, ws).view(b, -1, nq, heads, c // heads).transpose(2, 3)
        # Keys/values: ow x ow patches at a stride of the window, zero-padded by (ow - ws) / 2.
        pad = (ow - ws) // 2

        def around(t: torch.Tensor) -> torch.Tensor:  # (B, windows, heads, ow², head_dim)
            patches = F.unfold(t.permute(0, 3, 1, 2), (ow, ow), padding=pad, stride=ws)
            patches = patches.view(b, heads, c // heads, ow * ow, -1)
            return patches.permute(0, 4, 1, 3, 2)

        bias = (
            self.relative_position_bias_table[index.view(-1)].view(nq, ow * ow, -1).permute(2, 0, 1)
        )
        out = F.scaled_dot_product_attention(queries, around(k), around(v), attn_mask=bias)
        out = window_reverse(out.transpose(2, 3).reshape(-1, nq, c), ws, h, w)
        x = x + self.proj(out)
        return x + self.mlp(self.norm2(x))


class _Blocks(nn.Module):
    def __init__(self, config: HATConfig, heads: int, depth: int):
        super().__init__()
        shift = config.window // 2
        self.blocks = nn.ModuleList(
            _HybridBlock(config, heads, shift if j % 2 else 0) for j in range(depth)
        )
        self.overlap_attn = _OverlapBlock(config, heads)


class _Group(nn.Module):
    """Residual hybrid attention group: the blocks, the overlapping cross-attention block, a
    conv over the feature map (or none), plus the group's input."""

    def __init__(self, config: HATConfig, heads: int, depth: int):
        super().__init__()
        self.residual_group = _Blocks(config, heads, depth)
        dim = config.embed_dim
        self.conv: nn.Module = nn.Conv2d(dim, dim, 3, 1, 1) if config.resi_conv else nn.Identity()

    def forward(
        self, x: torch.Tensor, indices: tuple[torch.Tensor, torch.Tensor], mask: torch.Tensor
    ) -> torch.Tensor:
        y = x
        for block in self.residual_group.blocks:
            y = block(y, indices[0], mask)
        y = self.residual_group.overlap_attn(y, indices[1])
        return self.conv(y.permute(0, 3, 1, 2)).permute(0, 2, 3, 1) + x


class HAT(nn.Module):
    """HAT over a (B, 3, H, W) tensor in [0, 1]; any H, W (padded to the window)."""

    # webui calls it through spandrel, which pads a smaller input up to this first
    # (engine/upscaler_models.py: _descriptor_call).
    min_side: int = MIN_SIDE

    def __init__(self, config: HATConfig):
        super().__init__()
        self.config = config
        dim, feat = config.embed_dim, config.num_feat
        self.register_buffer("mean", torch.tensor(RGB_MEAN).view(1, 3, 1, 1), persistent=False)
        # Derived, not learned: files carry both; recognise_hat() checks theirs equal these.
        self.register_buffer("index_sa", relative_position_index(config.window), persistent=False)
        self.register_buffer(
            "index_oca", oca_index(config.window, config.overlap_window), persistent=False
        )
        self.conv_first = nn.Conv2d(3, dim, 3, 1, 1)
        self.patch_embed = PatchEmbed(dim, config.patch_norm)
        self.layers = nn.ModuleList(
            _Group(config, heads, depth)
            for depth, heads in zip(config.depths, config.num_heads, strict=True)
        )
        self.norm = nn.LayerNorm(dim)
        self.conv_after_body: nn.Module = (
            nn.Conv2d(dim, dim, 3, 1, 1) if config.resi_conv else nn.Identity()
        )
        # nn.LeakyReLU's default slope (0.01), as in HAT.
        self.conv_before_upsample = nn.Sequential(nn.Conv2d(dim, feat, 3, 1, 1), nn.LeakyReLU())
        self.upsample = _pixelshuffle_steps(config.scale, feat)
        self.conv_last = nn.Conv2d(feat, 3, 3, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        config = self.config
        height, width = x.shape[-2:]
        mean = self.get_buffer("mean").to(x.dtype)
        window = config.window
        x = pad_to(x - mean, ceil_to(height, window), ceil_to(width, window))
        first = self.conv_first(x)
        h, w = x.shape[-2:]
        mask = shift_mask(h, w, window, window // 2).to(x.device)
        indices = (self.get_buffer("index_sa"), self.get_buffer("index_oca"))
        tokens = self.patch_embed.norm(first.permute(0, 2, 3, 1))
        for layer in self.layers:
            tokens = layer(tokens, indices, mask)
        body = self.conv_after_body(self.norm(tokens).permute(0, 3, 1, 2)) + first
        out = self.conv_last(self.upsample(self.conv_before_upsample(body))) + mean
        return out[..., : height * config.scale, : width * config.scale]


# --------------------------------------------------------------------------------------------
# Recognising a HAT state dict
# --------------------------------------------------------------------------------------------


def _scale(sd: Mapping[str, torch.Tensor], feat: int) -> int:
    scale = 1
    # Convs at the Sequential's even indices, a PixelShuffle after each.
    for index in range(0, count_indexed(sd, r"upsample\.(\d+)\.weight$"), 2):
        key = f"upsample.{index}.weight"
        step = math.isqrt(sd[key].shape[0] // feat) if key in sd else 0
        if step not in (2, 3) or step * step * feat != sd[key].shape[0]:
            raise Unsupported(f"a HAT upsample step {key} that is not a x2 or x3 pixel shuffle")
        scale *= step
    return scale


def recognise_hat(
    sd: Mapping[str, torch.Tensor],
) -> tuple[Architecture, HATConfig, dict[str, torch.Tensor]]:
    """(architecture, config, the weights HAT(config) loads strictly), or `Unsupported`."""
    need = (
        "conv_first.weight",
        "conv_before_upsample.0.weight",
        "conv_last.weight",
        "relative_position_index_SA",
        "relative_position_index_OCA",
    )
    if missing := [k for k in need if k not in sd]:
        raise Unsupported(f"a HAT-like model without {', '.join(missing)}")
    if "absolute_pos_embed" in sd:
        raise Unsupported("a HAT model with absolute position embedding")
    dim, in_ch = sd["conv_first.weight"].shape[:2]
    if in_ch != 3 or sd["conv_last.weight"].shape[0] != 3:
        raise Unsupported(f"a HAT model with {in_ch} input channels (only RGB: 3)")
    first = "layers.0.residual_group.blocks.0."
    keys = ("conv_block.cab.0.weight", "conv_block.cab.3.attention.1.weight", "mlp.fc1.weight")
    if missing := [first + k for k in keys if first + k not in sd]:
        raise Unsupported(f"a HAT-like model without {', '.join(missing)}")
    window = math.isqrt(sd["relative_position_index_SA"].shape[0])
    overlap = math.isqrt(sd["relative_position_index_OCA"].shape[-1])
    if overlap < window or (overlap - window) % 2:
        raise Unsupported(f"a HAT model with window {window} and overlapping window {overlap}")
    layers = count_indexed(sd, r"layers\.(\d+)\.")
    depths = tuple(
        count_indexed(sd, rf"layers\.{i}\.residual_group\.blocks\.(\d+)\.") for i in range(layers)
    )
    heads = tuple(
        sd[f"layers.{i}.residual_group.overlap_attn.relative_position_bias_table"].shape[1]
        for i in range(layers)
    )
    if any(dim % h for h in heads):
        raise Unsupported(f"HAT with {dim} channels over {heads} heads")
    feat = sd["conv_before_upsample.0.weight"].shape[0]
    config = HATConfig(
        embed_dim=dim,
        depths=depths,
        num_heads=heads,
        window=window,
        overlap_window=overlap,
        compress=sd[first + "conv_block.cab.0.weight"].shape[0],
        squeeze=sd[first + "conv_block.cab.3.attention.1.weight"].shape[0],
        mlp_hidden=sd[first + "mlp.fc1.weight"].shape[0],
        qkv_bias=first + "attn.qkv.bias" in sd,
        patch_norm="patch_embed.norm.weight" in sd,
        resi_conv="conv_after_body.weight" in sd,
        scale=_scale(sd, feat),
        num_feat=feat,
    )
    derived = {
        "relative_position_index_SA": relative_position_index(window),
        "relative_position_index_OCA": oca_index(window, overlap),
    }
    for key, expected in derived.items():
        value = sd[key]
        if tuple(value.shape) != tuple(expected.shape) or not torch.equal(value.long(), expected):
            raise Unsupported(f"a HAT-like model whose {key} is not HAT's")
    weights = {k: v for k, v in sd.items() if k not in derived}
    shape = "/".join(map(str, depths))
    text = (
        f"HAT x{config.scale} ({shape} blocks, {dim} channels, window {window}, overlap {overlap})"
    )
    return Architecture("HAT", config.scale, text), config, weights
