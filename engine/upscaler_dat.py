"""DAT (Chen et al., "Dual Aggregation Transformer for Image Super-Resolution", ICCV 2023),
written here from the paper and the key layout of the published files, and recognised from
those keys (DAT, DAT-S, DAT-2, DAT-light and the community files in that layout).

The network: a 3x3 conv (`conv_first`) to `embed_dim` features, a LayerNorm over the tokens
(`before_RG.1`), residual groups (`layers.i`: `blocks.j` then a conv, `1conv` or `3conv`,
plus the group's input), a LayerNorm (`norm`) and `conv_after_body` added to the shallow
features, then `pixelshuffle` (`conv_before_upsample`, conv + shuffle steps, `conv_last`) or
`pixelshuffledirect` (one conv + shuffle, DAT-light). The blocks alternate:

- even j, spatial: the channels split in halves, each half attending within rectangular
  windows (split h x w for the first half, w x h for the second), with a dynamic position bias
  (a small MLP over the window's relative offsets, `pos`); every other spatial block runs on
  windows shifted by half a window with the mask that keeps wrapped-around regions apart (in
  even groups blocks 2, 6, 10, ..., in odd groups blocks 0, 4, 8, ...). The tokens' q, k, v are
  zero-padded to a multiple of the larger window side (so padded tokens take part in the
  attention with zero keys, as in DAT);
- odd j, channel: attention across channels (L2-normalised q and k over the pixels, a learned
  temperature per head);
- each with a depthwise-conv branch over v and the adaptive interaction: the conv branch's
  channel map gates the spatial attention and the attention's spatial map gates the conv
  branch; in channel blocks the other way round;
- then the SGFN: a linear layer, GELU, half of the channels gated by a depthwise conv over the
  LayerNormed other half, a linear layer back.

What runs is what webui runs (through spandrel 0.3.4): the RGB mean (0.4488, 0.4371, 0.4040)
taken off, pixel range 1, inputs under 16 pixels a side padded to 16 first (spandrel's size
requirement), each call's output clamped to [0, 1]. Only 3-channel files are run.
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
from .upscaler_swinir import RGB_MEAN, _pixelshuffle_steps, _resi_conv

# webui's "DAT x2/x3/x4" (modules/dat_model.py): downloads saved as DAT_x2.pth, ... (the URL's
# file name); a restarted webui lists the saved file by its stem too, beside the built-in name.
DAT_NAMES: Final[Mapping[str, str]] = {f"DAT_x{s}": f"DAT x{s}" for s in (2, 3, 4)}
DAT_ALIASES: Final[Mapping[str, tuple[str, ...]]] = {f"DAT x{s}": (f"DAT_x{s}",) for s in (2, 3, 4)}

MIN_SIDE: Final = 16  # spandrel's SizeRequirements(minimum=16) for DAT
MASKED: Final = -100.0  # DAT's additive mask value between unrelated shifted regions
UPSAMPLERS: Final = ("pixelshuffle", "pixelshuffledirect")

# A key only DAT-shaped files have: the window attention branches of a spatial block.
KEY: Final = re.compile(r"^layers\.\d+\.blocks\.\d+\.attn\.attns\.")


@dataclass(frozen=True)
class DATConfig:
    """What a file's keys say about its network."""

    embed_dim: int
    depths: tuple[int, ...]
    spatial_heads: tuple[int, ...]  # per window branch (half the channels), per group
    channel_heads: tuple[int, ...]  # per group
    split: tuple[int, int]  # the first branch's window (height, width)
    hidden: int  # the SGFN's first linear layer's width
    pos_dim: int  # the dynamic position bias MLP's width
    qkv_bias: bool
    upsampler: str  # one of UPSAMPLERS
    scale: int
    num_feat: int  # the pixelshuffle reconstruction's channels
    resi_connection: str  # "1conv" or "3conv"


# --------------------------------------------------------------------------------------------
# Windows, relative offsets and the shift mask (pure functions)
# --------------------------------------------------------------------------------------------


def to_windows(x: torch.Tensor, wh: int, ww: int) -> torch.Tensor:
    """(B, H, W, C) -> (B, windows, wh * ww, C), windows in row-major order."""
    b, h, w, c = x.shape
    x = x.view(b, h // wh, wh, w // ww, ww, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(b, (h // wh) * (w // ww), wh * ww, c)


def from_windows(windows: torch.Tensor, wh: int, ww: int, h: int, w: int) -> torch.Tensor:
    """The inverse of `to_windows`: (B, windows, wh * ww, C) -> (B, H, W, C)."""
    b, c = windows.shape[0], windows.shape[-1]
    x = windows.view(b, h // wh, w // ww, wh, ww, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(b, h, w, c)


def relative_offsets(wh: int, ww: int) -> torch.Tensor:
    """((2wh-1)(2ww-1), 2): every (dy, dx) between two tokens of a window, dy major; the input
    of the dynamic position bias MLP (files carry it as `rpe_biases`)."""
    dy, dx = torch.meshgrid(torch.arange(1 - wh, wh), torch.arange(1 - ww, ww), indexing="ij")
    return torch.stack((dy.flatten(), dx.flatten()), dim=1).float()


def relative_position_index(wh: int, ww: int) -> torch.Tensor:
    """(N, N) with N = wh * ww: for tokens i, j of a window, the row of `relative_offsets`
    holding their offset: (dy + wh - 1) * (2ww - 1) + dx + ww - 1."""
    ys, xs = torch.meshgrid(torch.arange(wh), torch.arange(ww), indexing="ij")
    ys, xs = ys.flatten(), xs.flatten()
    return (ys[:, None] - ys[None, :] + wh - 1) * (2 * ww - 1) + xs[:, None] - xs[None, :] + ww - 1


def shift_mask(h: int, w: int, wh: int, ww: int) -> torch.Tensor:
    """(windows, N, N) additive mask for attention over wh x ww windows shifted by half a
    window: after the cyclic roll, the last window row/column holds up to three regions of the
    unrolled image; tokens of different regions must not attend to each other (MASKED)."""
    sh, sw = wh // 2, ww // 2
    region = torch.zeros(1, h, w, 1)
    rows = (slice(0, -wh), slice(-wh, -sh), slice(-sh, None))
    cols = (slice(0, -ww), slice(-ww, -sw), slice(-sw, None))
    for i, r in enumerate(rows):
        for j, c in enumerate(cols):
            region[:, r, c, :] = i * 3 + j
    ids = to_windows(region, wh, ww)[0, :, :, 0]  # (windows, N)
    different = ids[:, None, :] != ids[:, :, None]
    return torch.zeros(different.shape).masked_fill(different, MASKED)


def is_shifted(group: int, block: int) -> bool:
    """Whether spatial block `block` of group `group` runs on shifted windows: DAT shifts
    every other spatial block, starting from the second in even groups, the first in odd."""
    if group % 2 == 0:
        return block > 0 and (block - 2) % 4 == 0
    return block % 4 == 0


# --------------------------------------------------------------------------------------------
# The network
# --------------------------------------------------------------------------------------------


def _mlp_step(width: int, out: int) -> nn.Sequential:
    # LayerNorm, ReLU, Linear: one step of the position bias MLP (keys .0 and .2).
    return nn.Sequential(nn.LayerNorm(width), nn.ReLU(), nn.Linear(width, out))


class _PositionBias(nn.Module):
    """DAT's dynamic position bias: an MLP from a relative offset (dy, dx) to one bias per
    head (no residual connections in DAT's use of it)."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.pos_proj = nn.Linear(2, width)
        self.pos1 = _mlp_step(width, width)
        self.pos2 = _mlp_step(width, width)
        self.pos3 = _mlp_step(width, heads)

    def forward(self, offsets: torch.Tensor) -> torch.Tensor:
        return self.pos3(self.pos2(self.pos1(self.pos_proj(offsets))))


class _WindowBranch(nn.Module):
    """Attention within wh x ww windows over one half of the channels."""

    def __init__(self, heads: int, wh: int, ww: int, pos_dim: int):
        super().__init__()
        self.heads, self.wh, self.ww = heads, wh, ww
        self.pos = _PositionBias(pos_dim, heads)
        # Derived, not learned: files carry both; recognise_dat() checks theirs equal these.
        self.register_buffer("rpe_biases", relative_offsets(wh, ww), persistent=False)
        self.register_buffer("index", relative_position_index(wh, ww), persistent=False)

    def forward(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None
    ) -> torch.Tensor:
        """q, k, v: (B, H, W, C) with H, W multiples of the window; mask (windows, N, N)."""
        b, h, w, c = q.shape
        n, heads = self.wh * self.ww, self.heads

        def split(t: torch.Tensor) -> torch.Tensor:  # (B, windows, heads, N, head_dim)
            windows = to_windows(t, self.wh, self.ww)
            return windows.view(b, -1, n, heads, c // heads).transpose(2, 3)

        table = self.pos(self.get_buffer("rpe_biases"))  # (offsets, heads)
        bias = table[self.get_buffer("index").view(-1)].view(n, n, heads).permute(2, 0, 1)
        if mask is not None:
            bias = bias[None] + mask[:, None].to(bias.dtype)  # (windows, heads, N, N)
        # softmax(q k^T / sqrt(head_dim) + bias) v: DAT's default scale.
        out = F.scaled_dot_product_attention(split(q), split(k), split(v), attn_mask=bias)
        out = out.transpose(2, 3).reshape(b, -1, n, c)
        return from_windows(out, self.wh, self.ww, h, w)


def _interaction(dim: int) -> tuple[nn.Sequential, nn.Sequential, nn.Sequential]:
    """The adaptive interaction's convs: the depthwise conv branch over v, the channel map
    (pool, 1x1 to dim/8, 1x1 back) and the spatial map (1x1 to dim/16, 1x1 to one)."""
    dwconv = nn.Sequential(nn.Conv2d(dim, dim, 3, 1, 1, groups=dim), nn.BatchNorm2d(dim), nn.GELU())
    channel = nn.Sequential(
        nn.AdaptiveAvgPool2d(1),
        nn.Conv2d(dim, dim // 8, 1),
        nn.BatchNorm2d(dim // 8),
        nn.GELU(),
        nn.Conv2d(dim // 8, dim, 1),
    )
    spatial = nn.Sequential(
        nn.Conv2d(dim, dim // 16, 1),
        nn.BatchNorm2d(dim // 16),
        nn.GELU(),
        nn.Conv2d(dim // 16, 1, 1),
    )
    return dwconv, channel, spatial


def _maps(x: torch.Tensor) -> torch.Tensor:
    return x.permute(0, 3, 1, 2)  # (B, H, W, C) -> (B, C, H, W)


def _tokens(x: torch.Tensor) -> torch.Tensor:
    return x.permute(0, 2, 3, 1)  # (B, C, H, W) -> (B, H, W, C)


class _SpatialAttention(nn.Module):
    """Adaptive spatial self-attention: two window branches on the channel halves, the conv
    branch over v, the interaction between them, a projection."""

    def __init__(self, config: DATConfig, dim: int, heads: int, shifted: bool):
        super().__init__()
        self.shifted = shifted
        self.window = max(config.split)
        self.qkv = nn.Linear(dim, dim * 3, bias=config.qkv_bias)
        self.proj = nn.Linear(dim, dim)
        s0, s1 = config.split
        self.attns = nn.ModuleList(
            (
                _WindowBranch(heads, s0, s1, config.pos_dim),
                _WindowBranch(heads, s1, s0, config.pos_dim),
            )
        )
        self.dwconv, self.channel_interaction, self.spatial_interaction = _interaction(dim)

    def forward(self, x: torch.Tensor, masks: dict[tuple[int, int], torch.Tensor]) -> torch.Tensor:
        h, w, c = x.shape[1:]
        qkv = self.qkv(x)
        conv = self.dwconv(_maps(qkv[..., 2 * c :]))  # over v, unpadded
        pad_h, pad_w = (-h) % self.window, (-w) % self.window
        padded = F.pad(qkv, (0, 0, 0, pad_w, 0, pad_h))  # zeros after the projection, as DAT
        halves = []
        for index, branch in enumerate(self.attns):
            assert isinstance(branch, _WindowBranch)
            part = slice(index * c // 2, (index + 1) * c // 2)
            q, k, v = (padded[..., i * c : (i + 1) * c][..., part] for i in range(3))
            shift = (branch.wh // 2, branch.ww // 2)
            if self.shifted:
                q, k, v = (torch.roll(t, (-shift[0], -shift[1]), dims=(1, 2)) for t in (q, k, v))
            out = branch(q, k, v, masks[(branch.wh, branch.ww)] if self.shifted else None)
            if self.shifted:
                out = torch.roll(out, shift, dims=(1, 2))
            halves.append(out[:, :h, :w])
        attended = torch.cat(halves, dim=-1)
        # The conv branch's channel map gates the attention; the attention's spatial map gates
        # the conv branch.
        channel = torch.sigmoid(self.channel_interaction(conv))  # (B, C, 1, 1)
        spatial = torch.sigmoid(self.spatial_interaction(_maps(attended)))  # (B, 1, H, W)
        return self.proj(attended * _tokens(channel) + _tokens(spatial * conv))


class _ChannelAttention(nn.Module):
    """Adaptive channel self-attention: each head's channels attend to each other over all the
    pixels (cosine similarity times a learned temperature), with the conv branch over v and the
    interaction the other way round from the spatial blocks."""

    def __init__(self, config: DATConfig, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.temperature = nn.Parameter(torch.ones(heads, 1, 1))
        self.qkv = nn.Linear(dim, dim * 3, bias=config.qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.dwconv, self.channel_interaction, self.spatial_interaction = _interaction(dim)

    def forward(self, x: torch.Tensor, masks: dict[tuple[int, int], torch.Tensor]) -> torch.Tensor:
        b, h, w, c = x.shape
        # (3, B, heads, head_dim, pixels)
        q, k, v = self.qkv(x).view(b, h * w, 3, self.heads, c // self.heads).permute(2, 0, 3, 4, 1)
        attn = F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).transpose(-2, -1)
        attended = ((attn * self.temperature).softmax(dim=-1) @ v).reshape(b, c, h, w)
        conv = self.dwconv(v.reshape(b, c, h, w))
        # The conv branch's spatial map gates the attention; the attention's channel map gates
        # the conv branch.
        spatial = torch.sigmoid(self.spatial_interaction(conv))  # (B, 1, H, W)
        channel = torch.sigmoid(self.channel_interaction(attended))  # (B, C, 1, 1)
        return self.proj(_tokens(attended * spatial + conv * channel))


class _SpatialGate(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.conv = nn.Conv2d(width, width, 3, 1, 1, groups=width)


class _SGFN(nn.Module):
    """Spatial-gate feed-forward network."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.sg = _SpatialGate(hidden // 2)
        self.fc2 = nn.Linear(hidden // 2, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kept, gate = F.gelu(self.fc1(x)).chunk(2, dim=-1)
        gate = _tokens(self.sg.conv(_maps(self.sg.norm(gate))))
        return self.fc2(kept * gate)


class _Block(nn.Module):
    """LayerNorm, spatial or channel attention, residual; LayerNorm, SGFN, residual."""

    def __init__(self, config: DATConfig, group: int, index: int):
        super().__init__()
        dim = config.embed_dim
        self.norm1 = nn.LayerNorm(dim)
        self.attn: nn.Module = (
            _SpatialAttention(config, dim, config.spatial_heads[group], is_shifted(group, index))
            if index % 2 == 0
            else _ChannelAttention(config, dim, config.channel_heads[group])
        )
        self.norm2 = nn.LayerNorm(dim)
        self.ffn = _SGFN(dim, config.hidden)

    def forward(self, x: torch.Tensor, masks: dict[tuple[int, int], torch.Tensor]) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), masks)
        return x + self.ffn(self.norm2(x))


class _Group(nn.Module):
    """A residual group: its blocks, a conv over the feature map, plus the group's input."""

    def __init__(self, config: DATConfig, group: int):
        super().__init__()
        depth = config.depths[group]
        self.blocks = nn.ModuleList(_Block(config, group, j) for j in range(depth))
        self.conv = _resi_conv(config.embed_dim, config.resi_connection)

    def forward(self, x: torch.Tensor, masks: dict[tuple[int, int], torch.Tensor]) -> torch.Tensor:
        y = x
        for block in self.blocks:
            y = block(y, masks)
        return _tokens(self.conv(_maps(y))) + x


class DAT(nn.Module):
    """DAT over a (B, 3, H, W) tensor in [0, 1]; any H, W."""

    # webui calls it through spandrel, which pads a smaller input up to this first
    # (engine/upscaler_models.py: _descriptor_call).
    min_side: int = MIN_SIDE

    def __init__(self, config: DATConfig):
        super().__init__()
        self.config = config
        dim = config.embed_dim
        self.register_buffer("mean", torch.tensor(RGB_MEAN).view(1, 3, 1, 1), persistent=False)
        self.conv_first = nn.Conv2d(3, dim, 3, 1, 1)
        # Index 1 as in the files (index 0 of DAT's Sequential is a parameter-free reshape).
        self.before_RG = nn.Sequential(nn.Identity(), nn.LayerNorm(dim))
        self.layers = nn.ModuleList(_Group(config, i) for i in range(len(config.depths)))
        self.norm = nn.LayerNorm(dim)
        self.conv_after_body = _resi_conv(dim, config.resi_connection)
        if config.upsampler == "pixelshuffle":
            feat = config.num_feat
            # nn.LeakyReLU's default slope (0.01), as in DAT.
            self.conv_before_upsample = nn.Sequential(nn.Conv2d(dim, feat, 3, 1, 1), nn.LeakyReLU())
            self.upsample = _pixelshuffle_steps(config.scale, feat)
            self.conv_last = nn.Conv2d(feat, 3, 3, 1, 1)
        else:
            s = config.scale
            self.upsample = nn.Sequential(nn.Conv2d(dim, 3 * s * s, 3, 1, 1), nn.PixelShuffle(s))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        config = self.config
        mean = self.get_buffer("mean").to(x.dtype)
        first = self.conv_first(x - mean)  # pixel range 1
        tokens = self.before_RG[1](_tokens(first))
        # The shifted blocks' masks, one per window shape, for the padded size.
        side = max(config.split)
        h, w = ceil_to(x.shape[-2], side), ceil_to(x.shape[-1], side)
        s0, s1 = config.split
        masks = {shape: shift_mask(h, w, *shape).to(x.device) for shape in ((s0, s1), (s1, s0))}
        for layer in self.layers:
            tokens = layer(tokens, masks)
        body = self.conv_after_body(_maps(self.norm(tokens))) + first
        if config.upsampler == "pixelshuffle":
            out = self.conv_last(self.upsample(self.conv_before_upsample(body)))
        else:
            out = self.upsample(body)
        return out + mean


# --------------------------------------------------------------------------------------------
# Recognising a DAT state dict
# --------------------------------------------------------------------------------------------


def _scale_and_feat(sd: Mapping[str, torch.Tensor], upsampler: str) -> tuple[int, int]:
    if upsampler == "pixelshuffledirect":
        channels = sd["upsample.0.weight"].shape[0]
        scale = math.isqrt(channels // 3)
        if 3 * scale * scale != channels:
            raise Unsupported(f"DAT pixelshuffledirect to {channels} channels (not 3*s*s)")
        return scale, 0
    feat = sd["conv_before_upsample.0.weight"].shape[0]
    scale = 1
    # Convs at the Sequential's even indices, a PixelShuffle after each.
    for index in range(0, count_indexed(sd, r"upsample\.(\d+)\.weight$"), 2):
        key = f"upsample.{index}.weight"
        step = math.isqrt(sd[key].shape[0] // feat) if key in sd else 0
        if step not in (2, 3) or step * step * feat != sd[key].shape[0]:
            raise Unsupported(f"a DAT upsample step {key} that is not a x2 or x3 pixel shuffle")
        scale *= step
    return scale, feat


def _split(sd: Mapping[str, torch.Tensor]) -> tuple[int, int]:
    """The first branch's window from the offsets the files carry (the weights do not
    depend on it: the position bias is an MLP over offsets)."""
    offsets = sd.get("layers.0.blocks.0.attn.attns.0.rpe_biases")
    if offsets is None or offsets.ndim != 2 or offsets.shape[1] != 2:
        raise Unsupported("a DAT model without rpe_biases (its window size is unknown)")
    wh, ww = (int(v) + 1 for v in offsets[-1].tolist())
    if wh < 1 or ww < 1 or max(wh, ww) % min(wh, ww):
        raise Unsupported(f"a DAT model with a {wh}x{ww} window")
    return wh, ww


def recognise_dat(
    sd: Mapping[str, torch.Tensor],
) -> tuple[Architecture, DATConfig, dict[str, torch.Tensor]]:
    """(architecture, config, the weights DAT(config) loads strictly), or `Unsupported`."""
    need = ("conv_first.weight", "before_RG.1.weight", "norm.weight")
    if missing := [k for k in need if k not in sd]:
        raise Unsupported(f"a DAT-like model without {', '.join(missing)}")
    dim, in_ch = sd["conv_first.weight"].shape[:2]
    if in_ch != 3:
        raise Unsupported(f"a DAT model with {in_ch} input channels (only RGB: 3)")
    first = "layers.0.blocks.0."
    for key in ("attn.attns.0.pos.pos_proj.weight", "ffn.fc1.weight"):
        if first + key not in sd:
            raise Unsupported(f"a DAT-like model without {first + key}")
    layers = count_indexed(sd, r"layers\.(\d+)\.")
    depths = tuple(count_indexed(sd, rf"layers\.{i}\.blocks\.(\d+)\.") for i in range(layers))
    spatial = tuple(
        sd[f"layers.{i}.blocks.0.attn.attns.0.pos.pos3.2.weight"].shape[0] for i in range(layers)
    )
    # A group of one block has no channel block (its head count is then never used).
    channel = tuple(
        sd[f"layers.{i}.blocks.1.attn.temperature"].shape[0] if depths[i] > 1 else 2 * spatial[i]
        for i in range(layers)
    )
    if any((dim // 2) % h for h in spatial) or any(dim % h for h in channel):
        raise Unsupported(f"DAT with {dim} channels over {spatial}/{channel} heads")
    upsampler = "pixelshuffle" if "conv_last.weight" in sd else "pixelshuffledirect"
    out_key = "conv_last.weight" if upsampler == "pixelshuffle" else "upsample.0.weight"
    if out_key not in sd or (upsampler == "pixelshuffle" and sd[out_key].shape[0] != 3):
        raise Unsupported("a DAT model that does not end in 3 channels (only RGB)")
    if upsampler == "pixelshuffle" and "conv_before_upsample.0.weight" not in sd:
        raise Unsupported("a DAT model without conv_before_upsample")
    scale, feat = _scale_and_feat(sd, upsampler)
    split = _split(sd)
    config = DATConfig(
        embed_dim=dim,
        depths=depths,
        spatial_heads=spatial,
        channel_heads=channel,
        split=split,
        hidden=sd[first + "ffn.fc1.weight"].shape[0],
        pos_dim=sd[first + "attn.attns.0.pos.pos_proj.weight"].shape[0],
        qkv_bias=first + "attn.qkv.bias" in sd,
        upsampler=upsampler,
        scale=scale,
        num_feat=feat,
        resi_connection="1conv" if "conv_after_body.weight" in sd else "3conv",
    )
    weights = _without_derived_buffers(sd, split)
    shape = "/".join(map(str, depths))
    text = (
        f"DAT x{scale} {upsampler} ({shape} blocks, {dim} channels, window {split[0]}x{split[1]})"
    )
    return Architecture("DAT", scale, text), config, weights


def _without_derived_buffers(sd: Mapping[str, torch.Tensor], split: tuple[int, int]) -> dict:
    """The weights without the buffers DAT files carry but this module derives: each window
    branch's rpe_biases and relative_position_index (checked: a file whose buffers differ is
    another layout) and the shifted blocks' attn_mask_0/1 (made for the training patch size;
    recomputed for each input size)."""
    branch = re.compile(r"\.attn\.attns\.(\d)\.(rpe_biases|relative_position_index)$")
    weights: dict[str, torch.Tensor] = {}
    for key, value in sd.items():
        if re.search(r"\.attn\.attn_mask_[01]$", key):
            continue
        if m := branch.search(key):
            wh, ww = split if m[1] == "0" else split[::-1]
            derive = relative_offsets if m[2] == "rpe_biases" else relative_position_index
            derived = derive(wh, ww)
            if tuple(value.shape) != tuple(derived.shape) or not torch.equal(
                value.to(derived.dtype), derived
            ):
                raise Unsupported(f"a DAT-like model whose {key} is not DAT's")
            continue
        weights[key] = value
    return weights
