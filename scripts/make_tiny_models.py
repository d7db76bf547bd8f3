"""Write tiny random-weight Stable Diffusion models in the ORIGINAL single-file key layouts.

    python scripts/make_tiny_models.py DIR [--seed N]

The files use the key layouts real downloads use (LDM/CompVis for SD1.x and SD2.x, SGM for SDXL,
kohya for LoRAs, lllyasviel's ``control_model.*`` for ControlNet, webui/kohya for embeddings) with
the REAL topology (block and layer indices are part of the key names) and only shrunk widths, so the
predictor's loaders run their real code paths on them. The dimensions are importable constants
(``SD1``, ``SDXL``, ``SD2`` ...) so loader tests can build matching diffusers configs.

Every tensor is drawn from its own ``torch.Generator`` seeded from (seed, file, key), so a fixed
seed gives byte-identical files on every run and machine.
"""

from __future__ import annotations

import argparse
import enum
import hashlib
import json
import math
import sys
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from safetensors.torch import save

# --------------------------------------------------------------------------------------------------
# Dimensions
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class UNetDims:
    """An openaimodel/SGM ``UNetModel``: the LDM hyper-parameters, which fix every key and shape."""

    model_channels: int
    channel_mult: tuple[int, ...]
    num_res_blocks: int
    # Transformer blocks per level (0 = no attention at that level), like SGM's transformer_depth.
    transformer_depth: tuple[int, ...]
    transformer_depth_middle: int
    context_dim: int
    use_linear_in_transformer: bool
    # Exactly one of num_heads (SD1: fixed 8) and num_head_channels (SD2/SDXL: 64) is set.
    num_heads: int | None = None
    num_head_channels: int | None = None
    in_channels: int = 4
    out_channels: int = 4
    adm_in_channels: int | None = None  # SDXL: pooled text embedding + 6 size/crop embeddings

    @property
    def block_channels(self) -> tuple[int, ...]:
        """Width of each level (diffusers' ``block_out_channels``)."""
        return tuple(self.model_channels * m for m in self.channel_mult)

    @property
    def time_embed_dim(self) -> int:
        return self.model_channels * 4

    @property
    def heads_per_level(self) -> tuple[int, ...]:
        """Attention heads per level (diffusers' ``attention_head_dim``, which counts heads)."""
        if self.num_heads is not None:
            return tuple(self.num_heads for _ in self.channel_mult)
        assert self.num_head_channels is not None
        return tuple(max(1, c // self.num_head_channels) for c in self.block_channels)


@dataclass(frozen=True)
class VAEDims:
    """An LDM ``AutoencoderKL`` (ddconfig)."""

    ch: int = 32
    ch_mult: tuple[int, ...] = (1, 2, 2, 2)
    num_res_blocks: int = 2
    z_channels: int = 4
    double_z: bool = True
    in_channels: int = 3
    out_ch: int = 3

    @property
    def block_channels(self) -> tuple[int, ...]:
        return tuple(self.ch * m for m in self.ch_mult)

    @property
    def embed_dim(self) -> int:
        """Channels of quant_conv's output (both halves of the Gaussian when double_z)."""
        return 2 * self.z_channels if self.double_z else self.z_channels


@dataclass(frozen=True)
class TextDims:
    """A CLIP text transformer (HF CLIP-L layout or OpenCLIP layout; same numbers either way)."""

    hidden: int
    intermediate: int
    layers: int
    vocab_size: int = 49408
    max_positions: int = 77
    projection_dim: int | None = None  # OpenCLIP text_projection is [hidden, projection_dim]

    @property
    def heads(self) -> int:
        return max(1, self.hidden // 64)


@dataclass(frozen=True)
class SD1Dims:
    unet: UNetDims
    vae: VAEDims
    text: TextDims


@dataclass(frozen=True)
class SD2Dims:
    unet: UNetDims
    vae: VAEDims
    text: TextDims  # OpenCLIP ViT-H layout under cond_stage_model.model.


@dataclass(frozen=True)
class SDXLDims:
    unet: UNetDims
    vae: VAEDims
    text_l: TextDims  # conditioner.embedders.0 (CLIP-L, HF layout)
    text_g: TextDims  # conditioner.embedders.1 (OpenCLIP bigG layout)
    addition_time_embed_dim: int = 256  # 6 of these (size, crop, target size) join the pooled text


@dataclass(frozen=True)
class ControlNetDims:
    unet: UNetDims  # the encoder half of this UNet is copied
    hint_channels: int = 3
    # input_hint_block widths are fixed in cldm (not scaled with the UNet); kept real.
    hint_block_channels: tuple[int, ...] = (16, 32, 96, 256)


@dataclass(frozen=True)
class LoraDims:
    rank: int = 4
    # alpha != rank on purpose: a loader that ignores alpha (scale alpha/rank) gives other pixels.
    alpha: float = 2.0


@dataclass(frozen=True)
class EmbeddingDims:
    vectors: int = 2


VAE = VAEDims()

SD1 = SD1Dims(
    unet=UNetDims(
        model_channels=32,
        channel_mult=(1, 1, 2, 2),
        num_res_blocks=2,
        transformer_depth=(1, 1, 1, 0),
        transformer_depth_middle=1,
        context_dim=64,
        use_linear_in_transformer=False,
        num_heads=8,
    ),
    vae=VAE,
    text=TextDims(hidden=64, intermediate=256, layers=4),
)

SD1_INPAINTING = replace(SD1, unet=replace(SD1.unet, in_channels=9))

# TE2 is wider than TE1 on purpose: diffusers' single-file CLIP loader tells the two SDXL text
# encoders apart by the width of the position embedding (768 vs 1280 in real files). With equal
# widths it loads CLIP-L's weights into text_encoder_2 and leaves its projection on the meta device.
_SDXL_TEXT_L = TextDims(hidden=64, intermediate=256, layers=3)
_SDXL_TEXT_G = TextDims(hidden=128, intermediate=512, layers=3, projection_dim=128)
SDXL = SDXLDims(
    unet=UNetDims(
        model_channels=32,
        channel_mult=(1, 2, 4),
        num_res_blocks=2,
        transformer_depth=(0, 1, 2),
        transformer_depth_middle=2,
        context_dim=_SDXL_TEXT_L.hidden + _SDXL_TEXT_G.hidden,
        use_linear_in_transformer=True,
        num_head_channels=64,
        # pooled TE2 output (after text_projection) + 6 Fourier embeddings of 256
        adm_in_channels=(_SDXL_TEXT_G.projection_dim or 0) + 6 * 256,
    ),
    vae=VAE,
    text_l=_SDXL_TEXT_L,
    text_g=_SDXL_TEXT_G,
)


@dataclass(frozen=True)
class SDXLRefinerDims:
    unet: UNetDims
    vae: VAEDims
    text_g: TextDims  # conditioner.embedders.0 (OpenCLIP bigG layout; the refiner has no CLIP-L)


# The refiner's real layout: 4 levels (384, 768, 1536, 1536), depth (0, 4, 4, 0), mid 4,
# context 1280 (bigG only), adm 1280 + 5 * 256 (size, crop and an aesthetic score). Its one
# text encoder can be narrow (no second encoder to tell apart by width).
_REFINER_TEXT_G = TextDims(hidden=64, intermediate=256, layers=3, projection_dim=64)
SDXL_REFINER = SDXLRefinerDims(
    unet=UNetDims(
        model_channels=32,
        channel_mult=(1, 2, 2, 2),
        num_res_blocks=2,
        transformer_depth=(0, 2, 2, 0),
        transformer_depth_middle=2,
        context_dim=_REFINER_TEXT_G.hidden,
        use_linear_in_transformer=True,
        num_head_channels=64,
        adm_in_channels=(_REFINER_TEXT_G.projection_dim or 0) + 5 * 256,
    ),
    vae=VAE,
    text_g=_REFINER_TEXT_G,
)

SD2 = SD2Dims(
    unet=UNetDims(
        model_channels=64,
        channel_mult=(1, 1, 2, 2),
        num_res_blocks=2,
        transformer_depth=(1, 1, 1, 0),
        transformer_depth_middle=1,
        context_dim=64,
        use_linear_in_transformer=True,
        num_head_channels=64,
    ),
    vae=VAE,
    text=TextDims(hidden=64, intermediate=256, layers=3, projection_dim=64),
)

CONTROLNET_SD1 = ControlNetDims(unet=SD1.unet)
CONTROLNET_SDXL = ControlNetDims(unet=SDXL.unet)
LORA = LoraDims()
EMBEDDING = EmbeddingDims()

# Where each file goes, relative to DIR; the keys are what make_all() returns.
FILES: dict[str, str] = {
    "sd15": "checkpoints/tiny-sd15.safetensors",
    # "_" sorts after ".", so tiny-sd15.safetensors stays the first checkpoint by name (the
    # default a request gets) while the name still says what it is.
    "sd15-inpainting": "checkpoints/tiny-sd15_inpainting.safetensors",
    "sdxl": "checkpoints/tiny-sdxl.safetensors",
    "sdxl-refiner": "checkpoints/tiny-sdxl_refiner.safetensors",
    "sd21-v": "checkpoints/tiny-sd21-v.safetensors",
    "sd21-v-yaml": "checkpoints/tiny-sd21-v.yaml",
    "lora-sd15": "loras/tiny-lora-sd15.safetensors",
    "lora-sdxl": "loras/tiny-lora-sdxl.safetensors",
    "controlnet-sd15": "controlnet/tiny-controlnet-sd15.safetensors",
    "controlnet-sdxl": "controlnet/tiny-controlnet-sdxl.safetensors",
    "embedding": "embeddings/tiny-embedding.safetensors",
    "embedding-sdxl": "embeddings/tiny-embedding-sdxl.safetensors",
    "vae": "vae/tiny-vae.safetensors",
}

# --------------------------------------------------------------------------------------------------
# Parameter specs: every architecture part is a generator of Param
# --------------------------------------------------------------------------------------------------


class Init(enum.Enum):
    FAN_IN = "fan_in"  # N(0, 1/sqrt(fan_in)): activations stay O(1) through the network
    BIAS = "bias"  # small N(0, 0.01)
    ONE = "one"  # norm weights
    ZERO = "zero"  # norm biases
    # N(0, 1), not real CLIP's N(0, 0.02): in a random network small token embeddings drown in
    # the layers' O(1) outputs and every prompt gives nearly the same text features and image.
    EMBEDDING = "embedding"  # token embeddings and textual-inversion vectors alike
    POSITION = "position"  # N(0, 0.1)
    CONST = "const"  # a fixed value (LoRA alpha, logit_scale)
    POSITION_IDS = "position_ids"  # int64 0..n-1: the buffer older transformers saved with CLIP
    SCHEDULE = "schedule"  # one of LDM's noise-schedule buffers (``value`` names it)


@dataclass(frozen=True)
class Param:
    key: str
    shape: tuple[int, ...]
    init: Init
    fan_in: int | None = None  # FAN_IN: overrides prod(shape[1:]) (OpenCLIP text_projection)
    value: float = 0.0  # CONST
    seed_key: str | None = None  # draw the values of this key instead (a renamed copy)


Params = Iterator[Param]


def prefixed(prefix: str, params: Iterable[Param]) -> Params:
    """The same params with ``prefix`` in front of every key."""
    for p in params:
        yield replace(p, key=prefix + p.key)


def linear(name: str, fan_in: int, fan_out: int, bias: bool = True) -> Params:
    yield Param(f"{name}.weight", (fan_out, fan_in), Init.FAN_IN)
    if bias:
        yield Param(f"{name}.bias", (fan_out,), Init.BIAS)


def conv(name: str, cin: int, cout: int, kernel: int) -> Params:
    yield Param(f"{name}.weight", (cout, cin, kernel, kernel), Init.FAN_IN)
    yield Param(f"{name}.bias", (cout,), Init.BIAS)


def norm(name: str, channels: int) -> Params:
    """GroupNorm or LayerNorm: both are a weight and a bias of the channel count."""
    yield Param(f"{name}.weight", (channels,), Init.ONE)
    yield Param(f"{name}.bias", (channels,), Init.ZERO)


# ---- UNet (openaimodel / SGM) ----


def unet_resblock(name: str, cin: int, cout: int, temb: int) -> Params:
    yield from norm(f"{name}.in_layers.0", cin)
    yield from conv(f"{name}.in_layers.2", cin, cout, 3)
    yield from linear(f"{name}.emb_layers.1", temb, cout)
    yield from norm(f"{name}.out_layers.0", cout)
    yield from conv(f"{name}.out_layers.3", cout, cout, 3)
    if cin != cout:
        yield from conv(f"{name}.skip_connection", cin, cout, 1)


def spatial_transformer(
    name: str, ch: int, depth: int, context_dim: int, linear_proj: bool
) -> Params:
    """SpatialTransformer; SD1 has 1x1-conv proj_in/proj_out, SD2/SDXL Linear ones."""

    def proj(pname: str) -> Params:
        return linear(pname, ch, ch) if linear_proj else conv(pname, ch, ch, 1)

    yield from norm(f"{name}.norm", ch)
    yield from proj(f"{name}.proj_in")
    for t in range(depth):
        block = f"{name}.transformer_blocks.{t}"
        for attn, kv_dim in (("attn1", ch), ("attn2", context_dim)):
            yield from linear(f"{block}.{attn}.to_q", ch, ch, bias=False)
            yield from linear(f"{block}.{attn}.to_k", kv_dim, ch, bias=False)
            yield from linear(f"{block}.{attn}.to_v", kv_dim, ch, bias=False)
            yield from linear(f"{block}.{attn}.to_out.0", ch, ch)
        yield from linear(f"{block}.ff.net.0.proj", ch, ch * 8)  # GEGLU: 2 x 4ch
        yield from linear(f"{block}.ff.net.2", ch * 4, ch)
        for n in ("norm1", "norm2", "norm3"):
            yield from norm(f"{block}.{n}", ch)
    yield from proj(f"{name}.proj_out")


@dataclass(frozen=True)
class _Block:
    """One ``input_blocks.N`` / ``output_blocks.N`` entry of the UNet."""

    index: int
    level: int
    cin: int
    cout: int
    resample: bool  # input: this block is a Downsample; output: an Upsample follows the ResBlock


def unet_input_blocks(d: UNetDims) -> list[_Block]:
    """input_blocks 1..N (0 is conv_in): num_res_blocks ResBlocks per level, then a Downsample."""
    blocks: list[_Block] = []
    ch = d.model_channels
    for level, width in enumerate(d.block_channels):
        for _ in range(d.num_res_blocks):
            blocks.append(_Block(len(blocks) + 1, level, ch, width, resample=False))
            ch = width
        if level != len(d.block_channels) - 1:
            blocks.append(_Block(len(blocks) + 1, level, ch, ch, resample=True))
    return blocks


def unet_output_blocks(d: UNetDims) -> list[_Block]:
    """output_blocks: num_res_blocks + 1 ResBlocks per level (deepest first), each eating a skip."""
    skips = [d.model_channels] + [b.cout for b in unet_input_blocks(d)]
    blocks: list[_Block] = []
    ch = d.block_channels[-1]
    for level in reversed(range(len(d.block_channels))):
        width = d.block_channels[level]
        for i in range(d.num_res_blocks + 1):
            upsample = level > 0 and i == d.num_res_blocks
            blocks.append(_Block(len(blocks), level, ch + skips.pop(), width, resample=upsample))
            ch = width
    return blocks


def unet_time_embed(d: UNetDims) -> Params:
    yield from linear("time_embed.0", d.model_channels, d.time_embed_dim)
    yield from linear("time_embed.2", d.time_embed_dim, d.time_embed_dim)


def unet_encoder(d: UNetDims) -> Params:
    """input_blocks and middle_block: shared by the UNet and its ControlNet copy."""
    linear_proj = d.use_linear_in_transformer
    yield from conv("input_blocks.0.0", d.in_channels, d.model_channels, 3)
    for b in unet_input_blocks(d):
        name = f"input_blocks.{b.index}"
        if b.resample:
            yield from conv(f"{name}.0.op", b.cin, b.cout, 3)
            continue
        yield from unet_resblock(f"{name}.0", b.cin, b.cout, d.time_embed_dim)
        if d.transformer_depth[b.level]:
            depth = d.transformer_depth[b.level]
            yield from spatial_transformer(f"{name}.1", b.cout, depth, d.context_dim, linear_proj)
    ch = d.block_channels[-1]
    yield from unet_resblock("middle_block.0", ch, ch, d.time_embed_dim)
    yield from spatial_transformer(
        "middle_block.1", ch, d.transformer_depth_middle, d.context_dim, linear_proj
    )
    yield from unet_resblock("middle_block.2", ch, ch, d.time_embed_dim)


def ldm_unet(d: UNetDims) -> Params:
    """The whole UNet, keys as under ``model.diffusion_model.``."""
    yield from unet_time_embed(d)
    if d.adm_in_channels is not None:
        yield from linear("label_emb.0.0", d.adm_in_channels, d.time_embed_dim)
        yield from linear("label_emb.0.2", d.time_embed_dim, d.time_embed_dim)
    yield from unet_encoder(d)
    for b in unet_output_blocks(d):
        name = f"output_blocks.{b.index}"
        yield from unet_resblock(f"{name}.0", b.cin, b.cout, d.time_embed_dim)
        sub = 1
        if d.transformer_depth[b.level]:
            depth = d.transformer_depth[b.level]
            linear_proj = d.use_linear_in_transformer
            yield from spatial_transformer(f"{name}.1", b.cout, depth, d.context_dim, linear_proj)
            sub = 2
        if b.resample:  # Upsample sits after the attention when there is one: .1.conv or .2.conv
            yield from conv(f"{name}.{sub}.conv", b.cout, b.cout, 3)
    yield from norm("out.0", d.model_channels)
    yield from conv("out.2", d.model_channels, d.out_channels, 3)


# ---- ControlNet (cldm) ----


def ldm_controlnet(d: ControlNetDims) -> Params:
    """cldm ControlNet, keys as under ``control_model.``."""
    u = d.unet
    yield from unet_time_embed(u)
    if u.adm_in_channels:  # SDXL: the size / pooled-text embedding, as in the UNet
        yield from linear("label_emb.0.0", u.adm_in_channels, u.time_embed_dim)
        yield from linear("label_emb.0.2", u.time_embed_dim, u.time_embed_dim)
    hint = d.hint_block_channels
    # input_hint_block: conv, SiLU, conv, SiLU, ...: the convs sit at the even indices 0..14.
    yield from conv("input_hint_block.0", d.hint_channels, hint[0], 3)
    for i in range(len(hint) - 1):
        yield from conv(f"input_hint_block.{2 + 4 * i}", hint[i], hint[i], 3)
        yield from conv(f"input_hint_block.{4 + 4 * i}", hint[i], hint[i + 1], 3)
    yield from conv(f"input_hint_block.{4 * len(hint) - 2}", hint[-1], u.model_channels, 3)
    yield from unet_encoder(u)
    widths = [u.model_channels] + [b.cout for b in unet_input_blocks(u)]
    for i, width in enumerate(widths):
        yield from conv(f"zero_convs.{i}.0", width, width, 1)
    yield from conv("middle_block_out.0", u.block_channels[-1], u.block_channels[-1], 1)


# ---- VAE (LDM AutoencoderKL) ----


def vae_resblock(name: str, cin: int, cout: int) -> Params:
    yield from norm(f"{name}.norm1", cin)
    yield from conv(f"{name}.conv1", cin, cout, 3)
    yield from norm(f"{name}.norm2", cout)
    yield from conv(f"{name}.conv2", cout, cout, 3)
    if cin != cout:
        yield from conv(f"{name}.nin_shortcut", cin, cout, 1)


def vae_mid(name: str, ch: int) -> Params:
    """mid: ResBlock, attention (1x1 convs, 4-D weights as in real files), ResBlock."""
    yield from vae_resblock(f"{name}.block_1", ch, ch)
    yield from norm(f"{name}.attn_1.norm", ch)
    for part in ("q", "k", "v", "proj_out"):
        yield from conv(f"{name}.attn_1.{part}", ch, ch, 1)
    yield from vae_resblock(f"{name}.block_2", ch, ch)


def ldm_vae(d: VAEDims) -> Params:
    """The whole VAE, keys as in a standalone VAE file (no prefix)."""
    widths = d.block_channels
    ch = widths[0]
    yield from conv("encoder.conv_in", d.in_channels, ch, 3)
    for i, width in enumerate(widths):
        for j in range(d.num_res_blocks):
            yield from vae_resblock(f"encoder.down.{i}.block.{j}", ch, width)
            ch = width
        if i != len(widths) - 1:
            yield from conv(f"encoder.down.{i}.downsample.conv", ch, ch, 3)
    yield from vae_mid("encoder.mid", ch)
    yield from norm("encoder.norm_out", ch)
    yield from conv("encoder.conv_out", ch, d.embed_dim, 3)

    ch = widths[-1]
    yield from conv("decoder.conv_in", d.z_channels, ch, 3)
    yield from vae_mid("decoder.mid", ch)
    for i in reversed(range(len(widths))):
        for j in range(d.num_res_blocks + 1):
            yield from vae_resblock(f"decoder.up.{i}.block.{j}", ch, widths[i])
            ch = widths[i]
        if i != 0:
            yield from conv(f"decoder.up.{i}.upsample.conv", ch, ch, 3)
    yield from norm("decoder.norm_out", ch)
    yield from conv("decoder.conv_out", ch, d.out_ch, 3)

    yield from conv("quant_conv", d.embed_dim, d.embed_dim, 1)
    yield from conv("post_quant_conv", d.z_channels, d.z_channels, 1)


# ---- Text encoders ----


def hf_clip_text(d: TextDims) -> Params:
    """transformers' CLIPTextModel layout, WITH the ``text_model.`` part real files carry."""
    h = d.hidden
    yield Param("text_model.embeddings.token_embedding.weight", (d.vocab_size, h), Init.EMBEDDING)
    yield Param(
        "text_model.embeddings.position_embedding.weight", (d.max_positions, h), Init.POSITION
    )
    for n in range(d.layers):
        layer = f"text_model.encoder.layers.{n}"
        yield from norm(f"{layer}.layer_norm1", h)
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            yield from linear(f"{layer}.self_attn.{proj}", h, h)
        yield from norm(f"{layer}.layer_norm2", h)
        yield from linear(f"{layer}.mlp.fc1", h, d.intermediate)
        yield from linear(f"{layer}.mlp.fc2", d.intermediate, h)
    yield from norm("text_model.final_layer_norm", h)


def open_clip_text(d: TextDims) -> Params:
    """OpenCLIP's text tower layout (SD2 ViT-H, SDXL bigG)."""
    h = d.hidden
    yield Param("token_embedding.weight", (d.vocab_size, h), Init.EMBEDDING)
    yield Param("positional_embedding", (d.max_positions, h), Init.POSITION)
    for n in range(d.layers):
        block = f"transformer.resblocks.{n}"
        yield from norm(f"{block}.ln_1", h)
        yield Param(f"{block}.attn.in_proj_weight", (3 * h, h), Init.FAN_IN)  # q, k, v stacked
        yield Param(f"{block}.attn.in_proj_bias", (3 * h,), Init.BIAS)
        yield from linear(f"{block}.attn.out_proj", h, h)
        yield from norm(f"{block}.ln_2", h)
        yield from linear(f"{block}.mlp.c_fc", h, d.intermediate)
        yield from linear(f"{block}.mlp.c_proj", d.intermediate, h)
    yield from norm("ln_final", h)
    # Stored [hidden, projection] and used as x @ P (diffusers transposes it), so fan-in is hidden.
    yield Param("text_projection", (h, d.projection_dim or h), Init.FAN_IN, fan_in=h)
    # Real SD2/SDXL files carry CLIP's trained temperature too (ln 100); loaders must ignore it.
    yield Param("logit_scale", (), Init.CONST, value=math.log(100.0))


# ---- Whole checkpoints ----


def sd1_checkpoint(d: SD1Dims) -> Params:
    yield from prefixed("model.diffusion_model.", ldm_unet(d.unet))
    yield from prefixed("first_stage_model.", ldm_vae(d.vae))
    yield from prefixed("cond_stage_model.transformer.", hf_clip_text(d.text))


def sd2_checkpoint(d: SD2Dims) -> Params:
    yield from prefixed("model.diffusion_model.", ldm_unet(d.unet))
    yield from prefixed("first_stage_model.", ldm_vae(d.vae))
    yield from prefixed("cond_stage_model.model.", open_clip_text(d.text))


def sdxl_refiner_checkpoint(d: SDXLRefinerDims) -> Params:
    yield from prefixed("model.diffusion_model.", ldm_unet(d.unet))
    yield from prefixed("first_stage_model.", ldm_vae(d.vae))
    yield from prefixed("conditioner.embedders.0.model.", open_clip_text(d.text_g))


def sdxl_checkpoint(d: SDXLDims) -> Params:
    yield from prefixed("model.diffusion_model.", ldm_unet(d.unet))
    yield from prefixed("first_stage_model.", ldm_vae(d.vae))
    yield from prefixed("conditioner.embedders.0.transformer.", hf_clip_text(d.text_l))
    yield from prefixed("conditioner.embedders.1.model.", open_clip_text(d.text_g))


# ---- What real downloads carry besides the weights (tests/data/layouts/ has the real lists) ----

# webui 1.10.1 modules/sd_models.py checkpoint_dict_replacements_sd1, read backwards: the layout
# of old SD1 fine-tunes, whose text model has no ``text_model.`` level.
_LEGACY_SD1_TEXT = "cond_stage_model.transformer.text_model."


def ldm_schedule(timesteps: int = 1000) -> Params:
    """LDM's DDPM.register_schedule buffers; SD 1.x/2.x use the "linear" schedule with
    linear_start 0.00085 and linear_end 0.012 (v1-inference.yaml)."""
    for name in schedule_buffers(timesteps):
        yield Param(name, (timesteps,), Init.SCHEDULE)


def schedule_buffers(timesteps: int = 1000) -> dict[str, torch.Tensor]:
    """Every buffer as LDM computes it (float64, then stored in the file's dtype)."""
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, timesteps, dtype=torch.float64) ** 2
    alphas = 1.0 - betas
    cumprod = torch.cumprod(alphas, dim=0)
    prev = torch.cat([torch.ones(1, dtype=torch.float64), cumprod[:-1]])
    posterior_variance = betas * (1.0 - prev) / (1.0 - cumprod)
    return {
        "betas": betas,
        "alphas_cumprod": cumprod,
        "alphas_cumprod_prev": prev,
        "sqrt_alphas_cumprod": cumprod.sqrt(),
        "sqrt_one_minus_alphas_cumprod": (1.0 - cumprod).sqrt(),
        "log_one_minus_alphas_cumprod": (1.0 - cumprod).log(),
        "sqrt_recip_alphas_cumprod": (1.0 / cumprod).sqrt(),
        "sqrt_recipm1_alphas_cumprod": (1.0 / cumprod - 1.0).sqrt(),
        "posterior_variance": posterior_variance,
        "posterior_log_variance_clipped": posterior_variance.clamp(min=1e-20).log(),
        "posterior_mean_coef1": betas * prev.sqrt() / (1.0 - cumprod),
        "posterior_mean_coef2": (1.0 - prev) * alphas.sqrt() / (1.0 - cumprod),
    }


def ema_copy(unet: Iterable[Param]) -> Params:
    """LitEma's shadow parameters: ``model_ema.`` + the UNet key without its dots, own values
    (a loader that took them instead of ``model.*`` would change the picture)."""
    for p in unet:
        yield replace(p, key="model_ema.diffusion_model" + p.key.replace(".", ""))
    yield Param("model_ema.decay", (), Init.CONST, value=0.9999)
    yield Param("model_ema.num_updates", (), Init.CONST, value=0.0)


@dataclass(frozen=True)
class Download:
    """Which extras a civitai-style SD1 file carries besides the weights a plain tiny file has."""

    ema: bool = False  # model_ema.* (a "pruned", not "emaonly", file)
    schedule: bool = False  # alphas_cumprod and the other LDM buffers
    position_ids: bool = False  # the text model's position_ids buffer
    legacy_text: bool = False  # text-encoder keys without ``text_model.`` (old fine-tunes)


def sd1_download(d: SD1Dims, extras: Download) -> Params:
    """An SD1 file shaped like a download; every weight key a plain file has keeps its values
    (renamed keys draw the values of their original name)."""
    for p in sd1_checkpoint(d):
        if extras.legacy_text and p.key.startswith(_LEGACY_SD1_TEXT):
            new = "cond_stage_model.transformer." + p.key[len(_LEGACY_SD1_TEXT) :]
            yield replace(p, key=new, seed_key=p.key)
        else:
            yield p
    if extras.ema:
        yield from ema_copy(prefixed("", ldm_unet(d.unet)))
    if extras.schedule:
        yield from ldm_schedule()
    if extras.position_ids:
        text = "cond_stage_model.transformer." if extras.legacy_text else _LEGACY_SD1_TEXT
        yield Param(f"{text}embeddings.position_ids", (1, d.text.max_positions), Init.POSITION_IDS)


def sdxl_download(d: SDXLDims) -> Params:
    """An SDXL file as released (sd_xl_base_1.0): the CLIP-L position_ids buffer besides the
    weights. SGM registers no schedule buffers and the release has no EMA copy."""
    yield from sdxl_checkpoint(d)
    yield Param(
        "conditioner.embedders.0.transformer.text_model.embeddings.position_ids",
        (1, d.text_l.max_positions),
        Init.POSITION_IDS,
    )


# ---- LoRA (kohya sd-scripts networks.lora) ----


@dataclass(frozen=True)
class _Target:
    """A module kohya wraps: its dotted name in the model kohya trained, and its dims."""

    module: str
    fan_in: int
    fan_out: int
    conv1x1: bool = False
    conv3x3: bool = False  # LoCon: down is a 3x3 conv, up a 1x1 one (sd-scripts conv_dim)


def transformer_lora_targets(
    name: str, ch: int, depth: int, context_dim: int, conv_proj: bool
) -> Iterator[_Target]:
    """What kohya's LoRA wraps in one Transformer2DModel: every Linear and 1x1 Conv."""
    yield _Target(f"{name}.proj_in", ch, ch, conv_proj)
    for t in range(depth):
        block = f"{name}.transformer_blocks.{t}"
        for attn, kv_dim in (("attn1", ch), ("attn2", context_dim)):
            yield _Target(f"{block}.{attn}.to_q", ch, ch)
            yield _Target(f"{block}.{attn}.to_k", kv_dim, ch)
            yield _Target(f"{block}.{attn}.to_v", kv_dim, ch)
            yield _Target(f"{block}.{attn}.to_out.0", ch, ch)
        yield _Target(f"{block}.ff.net.0.proj", ch, ch * 8)
        yield _Target(f"{block}.ff.net.2", ch * 4, ch)
    yield _Target(f"{name}.proj_out", ch, ch, conv_proj)


def text_lora_targets(d: TextDims) -> Iterator[_Target]:
    """kohya wraps CLIPAttention and CLIPMLP of the HF text model (SDXL's TE2 included)."""
    for n in range(d.layers):
        layer = f"text_model.encoder.layers.{n}"
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            yield _Target(f"{layer}.self_attn.{proj}", d.hidden, d.hidden)
        yield _Target(f"{layer}.mlp.fc1", d.hidden, d.intermediate)
        yield _Target(f"{layer}.mlp.fc2", d.intermediate, d.hidden)


def sd1_unet_lora_targets(d: UNetDims) -> Iterator[_Target]:
    """kohya trains SD1 on the diffusers UNet, so SD1 LoRA names are diffusers module paths."""
    conv_proj = not d.use_linear_in_transformer
    levels = len(d.block_channels)
    for level, width in enumerate(d.block_channels):
        if d.transformer_depth[level]:
            for j in range(d.num_res_blocks):
                yield from transformer_lora_targets(
                    f"down_blocks.{level}.attentions.{j}",
                    width,
                    d.transformer_depth[level],
                    d.context_dim,
                    conv_proj,
                )
    yield from transformer_lora_targets(
        "mid_block.attentions.0",
        d.block_channels[-1],
        d.transformer_depth_middle,
        d.context_dim,
        conv_proj,
    )
    for up in range(levels):
        level = levels - 1 - up
        if d.transformer_depth[level]:
            for j in range(d.num_res_blocks + 1):
                yield from transformer_lora_targets(
                    f"up_blocks.{up}.attentions.{j}",
                    d.block_channels[level],
                    d.transformer_depth[level],
                    d.context_dim,
                    conv_proj,
                )


def sgm_unet_lora_targets(d: UNetDims) -> Iterator[_Target]:
    """kohya trains SDXL on its SGM-layout UNet, so SDXL LoRA names are input_blocks.N.1...."""
    conv_proj = not d.use_linear_in_transformer
    for b in unet_input_blocks(d):
        depth = d.transformer_depth[b.level]
        if depth and not b.resample:
            yield from transformer_lora_targets(
                f"input_blocks.{b.index}.1", b.cout, depth, d.context_dim, conv_proj
            )
    yield from transformer_lora_targets(
        "middle_block.1",
        d.block_channels[-1],
        d.transformer_depth_middle,
        d.context_dim,
        conv_proj,
    )
    for b in unet_output_blocks(d):
        depth = d.transformer_depth[b.level]
        if depth:
            yield from transformer_lora_targets(
                f"output_blocks.{b.index}.1", b.cout, depth, d.context_dim, conv_proj
            )


def sd1_unet_conv_targets(d: UNetDims) -> Iterator[_Target]:
    """What a kohya LoCon (``conv_dim``) adds: the 3x3 convs of the diffusers UNet's ResNets
    (down and mid blocks here; enough to see them applied)."""
    ch = d.model_channels
    for level, width in enumerate(d.block_channels):
        for j in range(d.num_res_blocks):
            yield _Target(f"down_blocks.{level}.resnets.{j}.conv1", ch, width, conv3x3=True)
            yield _Target(f"down_blocks.{level}.resnets.{j}.conv2", width, width, conv3x3=True)
            ch = width
    for j in range(2):
        yield _Target(f"mid_block.resnets.{j}.conv1", ch, ch, conv3x3=True)
        yield _Target(f"mid_block.resnets.{j}.conv2", ch, ch, conv3x3=True)


def sd1_locon(d: SD1Dims, lora: LoraDims) -> Params:
    """A LoCon with only its 3x3 conv part: any effect it has comes from the conv layers."""
    yield from kohya_lora([("lora_unet_", t) for t in sd1_unet_conv_targets(d.unet)], lora)


def kohya_lora(targets: Iterable[tuple[str, _Target]], d: LoraDims) -> Params:
    """kohya keys: ``<prefix><module path with . replaced by _>.lora_down/.lora_up/.alpha``."""
    for prefix, t in targets:
        name = prefix + t.module.replace(".", "_")
        down = (3, 3) if t.conv3x3 else (1, 1) if t.conv1x1 else ()
        up = (1, 1) if t.conv3x3 or t.conv1x1 else ()
        yield Param(f"{name}.lora_down.weight", (d.rank, t.fan_in, *down), Init.FAN_IN)
        # Non-zero up (real training starts it at zero) so that the LoRA visibly changes the image.
        yield Param(f"{name}.lora_up.weight", (t.fan_out, d.rank, *up), Init.FAN_IN)
        yield Param(f"{name}.alpha", (), Init.CONST, value=d.alpha)


def sd1_lora(d: SD1Dims, lora: LoraDims) -> Params:
    targets = [("lora_unet_", t) for t in sd1_unet_lora_targets(d.unet)]
    targets += [("lora_te_", t) for t in text_lora_targets(d.text)]
    yield from kohya_lora(targets, lora)


def sdxl_lora(d: SDXLDims, lora: LoraDims) -> Params:
    targets = [("lora_unet_", t) for t in sgm_unet_lora_targets(d.unet)]
    targets += [("lora_te1_", t) for t in text_lora_targets(d.text_l)]
    targets += [("lora_te2_", t) for t in text_lora_targets(d.text_g)]
    yield from kohya_lora(targets, lora)


def kohya_metadata(
    output_name: str, base_model_version: str, lora: LoraDims, v2: bool
) -> dict[str, str]:
    """The ss_* metadata sd-scripts writes (a deterministic subset: no timestamps or hashes)."""
    tags = {"1_tiny": {"tiny": 4, "test": 2}}
    return {
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(lora.rank),
        "ss_network_alpha": str(lora.alpha),
        "ss_output_name": output_name,
        "ss_base_model_version": base_model_version,
        "ss_v2": str(v2),
        "ss_sd_model_name": "tiny",
        "ss_resolution": "(64, 64)",
        "ss_num_train_images": "4",
        "ss_tag_frequency": json.dumps(tags),
        "ss_training_comment": "random weights from scripts/make_tiny_models.py",
    }


# ---- Textual inversion ----


def sd1_embedding(d: SD1Dims, e: EmbeddingDims) -> Params:
    yield Param("emb_params", (e.vectors, d.text.hidden), Init.EMBEDDING)


def sdxl_embedding(d: SDXLDims, e: EmbeddingDims) -> Params:
    yield Param("clip_l", (e.vectors, d.text_l.hidden), Init.EMBEDDING)
    yield Param("clip_g", (e.vectors, d.text_g.hidden), Init.EMBEDDING)


# ---- SD2 v-prediction yaml ----


def sd2_v_yaml(d: SD2Dims) -> str:
    """A v2-inference-v.yaml with the tiny dims: webui reads a same-name yaml beside the file."""
    u, v = d.unet, d.vae
    levels = len(u.channel_mult)
    attention_resolutions = [2**lv for lv in reversed(range(levels)) if u.transformer_depth[lv]]
    return f"""\
model:
  base_learning_rate: 1.0e-4
  target: ldm.models.diffusion.ddpm.LatentDiffusion
  params:
    parameterization: "v"
    linear_start: 0.00085
    linear_end: 0.0120
    num_timesteps_cond: 1
    log_every_t: 200
    timesteps: 1000
    first_stage_key: "jpg"
    cond_stage_key: "txt"
    image_size: 96
    channels: 4
    cond_stage_trainable: false
    conditioning_key: crossattn
    monitor: val/loss_simple_ema
    scale_factor: 0.18215
    use_ema: False # we set this to false because this is an inference only config

    unet_config:
      target: ldm.modules.diffusionmodules.openaimodel.UNetModel
      params:
        use_checkpoint: True
        use_fp16: True
        image_size: 32 # unused
        in_channels: {u.in_channels}
        out_channels: {u.out_channels}
        model_channels: {u.model_channels}
        attention_resolutions: {attention_resolutions}
        num_res_blocks: {u.num_res_blocks}
        channel_mult: {list(u.channel_mult)}
        num_head_channels: {u.num_head_channels} # need to fix for flash-attn
        use_spatial_transformer: True
        use_linear_in_transformer: {u.use_linear_in_transformer}
        transformer_depth: {u.transformer_depth_middle}
        context_dim: {u.context_dim}
        legacy: False

    first_stage_config:
      target: ldm.models.autoencoder.AutoencoderKL
      params:
        embed_dim: {v.z_channels}
        monitor: val/rec_loss
        ddconfig:
          #attn_type: "vanilla-xformers"
          double_z: {v.double_z}
          z_channels: {v.z_channels}
          resolution: 256
          in_channels: {v.in_channels}
          out_ch: {v.out_ch}
          ch: {v.ch}
          ch_mult: {list(v.ch_mult)}
          num_res_blocks: {v.num_res_blocks}
          attn_resolutions: []
          dropout: 0.0
        lossconfig:
          target: torch.nn.Identity

    cond_stage_config:
      target: ldm.modules.encoders.modules.FrozenOpenCLIPEmbedder
      params:
        freeze: True
        layer: "penultimate"
"""


# --------------------------------------------------------------------------------------------------
# Writer
# --------------------------------------------------------------------------------------------------

_STD = {Init.BIAS: 0.01, Init.EMBEDDING: 1.0, Init.POSITION: 0.1}


def _generator(seed: int, file_tag: str, key: str) -> torch.Generator:
    """A generator seeded from (seed, file, key): the same on every run and machine."""
    digest = hashlib.sha256(f"{seed}/{file_tag}/{key}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))


def materialize(p: Param, seed: int, file_tag: str) -> torch.Tensor:
    """The fp32 tensor for one Param."""
    if p.init is Init.ONE:
        return torch.ones(p.shape)
    if p.init is Init.ZERO:
        return torch.zeros(p.shape)
    if p.init is Init.CONST:
        return torch.full(p.shape, p.value)
    if p.init is Init.POSITION_IDS:
        return torch.arange(p.shape[-1], dtype=torch.int64).reshape(p.shape)
    if p.init is Init.SCHEDULE:
        return schedule_buffers(p.shape[0])[p.key]
    if p.init is Init.FAN_IN:
        fan_in = p.fan_in or math.prod(p.shape[1:])
        std = 1.0 / math.sqrt(fan_in)
    else:
        std = _STD[p.init]
    key = p.seed_key or p.key
    return torch.randn(p.shape, generator=_generator(seed, file_tag, key)) * std


def write_safetensors(
    path: Path,
    params: Iterable[Param],
    seed: int,
    dtype: torch.dtype = torch.float32,
    metadata: dict[str, str] | None = None,
    tag: str | None = None,
) -> Path:
    """Materialize ``params`` (sorted by key) and save them; the file name (or ``tag``, for a
    variant of another file with the same weights) seeds every tensor. Integer buffers keep
    their dtype."""
    tensors: dict[str, torch.Tensor] = {}
    for p in params:
        if p.key in tensors:
            raise ValueError(f"duplicate key {p.key!r} in {path.name}")
        tensor = materialize(p, seed, tag or path.stem)
        if tensor.is_floating_point():
            tensor = tensor.to(dtype)
        tensors[p.key] = tensor.contiguous()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(_sorted_metadata(save(dict(sorted(tensors.items())), metadata=metadata)))
    return path


def _sorted_metadata(data: bytes) -> bytes:
    """Rewrite the header with ``__metadata__`` in key order.

    safetensors writes the metadata from a Rust HashMap, in a different order on every run; sorted,
    the same seed gives the same bytes. Data offsets are relative to the end of the header, so
    only the header changes.
    """
    size = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + size])
    metadata = header.pop("__metadata__", None)
    if metadata is None:
        return data
    header = {"__metadata__": dict(sorted(metadata.items())), **header}
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    text += b" " * (-len(text) % 8)  # safetensors keeps the data 8-byte aligned
    return len(text).to_bytes(8, "little") + text + data[8 + size :]


# Download-shaped variants of tiny-sd15 (same weights): what --downloads adds under checkpoints/.
DOWNLOADS: dict[str, Download] = {
    "tiny-sd15-pruned": Download(ema=True, schedule=True, position_ids=True),
    "tiny-sd15-legacy": Download(schedule=True, position_ids=True, legacy_text=True),
}


def write_download(path: Path, extras: Download, seed: int = 0) -> Path:
    """tiny-sd15's weights (same values: seeded as tiny-sd15) with a download's extra keys."""
    return write_safetensors(path, sd1_download(SD1, extras), seed, tag=Path(FILES["sd15"]).stem)


def write_sdxl_download(path: Path, seed: int = 0) -> Path:
    """tiny-sdxl's weights (fp16, seeded as tiny-sdxl) with the released file's extra buffer."""
    stem = Path(FILES["sdxl"]).stem
    return write_safetensors(path, sdxl_download(SDXL), seed, dtype=torch.float16, tag=stem)


def make_all(out_dir: Path, seed: int = 0) -> dict[str, Path]:
    """Write every tiny model under ``out_dir``; returns ``FILES``' names mapped to the paths."""
    out_dir = Path(out_dir)
    paths = {name: out_dir / rel for name, rel in FILES.items()}
    fp16 = torch.float16
    # One fp32 checkpoint (SD1, like the original release) and the rest fp16, as most civitai
    # downloads are; fp16 also keeps the whole set well under 150 MB.
    write_safetensors(paths["sd15"], sd1_checkpoint(SD1), seed)
    write_safetensors(paths["sd15-inpainting"], sd1_checkpoint(SD1_INPAINTING), seed, dtype=fp16)
    write_safetensors(paths["sdxl"], sdxl_checkpoint(SDXL), seed, dtype=fp16)
    write_safetensors(
        paths["sdxl-refiner"], sdxl_refiner_checkpoint(SDXL_REFINER), seed, dtype=fp16
    )
    write_safetensors(paths["sd21-v"], sd2_checkpoint(SD2), seed, dtype=fp16)
    paths["sd21-v-yaml"].write_text(sd2_v_yaml(SD2), encoding="utf-8")
    # kohya saves LoRAs in fp16 by default (save_precision); alpha included.
    write_safetensors(
        paths["lora-sd15"],
        sd1_lora(SD1, LORA),
        seed,
        dtype=fp16,
        metadata=kohya_metadata("tiny-lora-sd15", "sd_v1", LORA, v2=False),
    )
    write_safetensors(
        paths["lora-sdxl"],
        sdxl_lora(SDXL, LORA),
        seed,
        dtype=fp16,
        metadata=kohya_metadata("tiny-lora-sdxl", "sdxl_base_v1-0", LORA, v2=False),
    )
    # Like the *_fp16.safetensors ControlNet 1.1 files webui users download.
    controlnet = prefixed("control_model.", ldm_controlnet(CONTROLNET_SD1))
    write_safetensors(paths["controlnet-sd15"], controlnet, seed, dtype=fp16)
    controlnet_xl = prefixed("control_model.", ldm_controlnet(CONTROLNET_SDXL))
    write_safetensors(paths["controlnet-sdxl"], controlnet_xl, seed, dtype=fp16)
    write_safetensors(paths["embedding"], sd1_embedding(SD1, EMBEDDING), seed)
    write_safetensors(paths["embedding-sdxl"], sdxl_embedding(SDXL, EMBEDDING), seed)
    write_safetensors(paths["vae"], ldm_vae(VAE), seed)
    __import__("importlib").import_module(
        f"{__package__}.make_tiny_upscalers" if __package__ else "make_tiny_upscalers"
    ).write_all(out_dir, seed)
    return paths


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("out_dir", type=Path, help="folder to write checkpoints/, loras/, ... into")
    parser.add_argument("--seed", type=int, default=0, help="seed for every tensor (default 0)")
    parser.add_argument(
        "--downloads",
        action="store_true",
        help="also write tiny-sd15/-sdxl as civitai-shaped files (EMA, buffers, old text keys)",
    )
    args = parser.parse_args(argv)
    start = time.perf_counter()
    paths = make_all(args.out_dir, args.seed)
    if args.downloads:
        for name, extras in DOWNLOADS.items():
            path = args.out_dir / "checkpoints" / f"{name}.safetensors"
            paths[name] = write_download(path, extras, args.seed)
        path = args.out_dir / "checkpoints" / "tiny-sdxl-released.safetensors"
        paths["tiny-sdxl-released"] = write_sdxl_download(path, args.seed)
    elapsed = time.perf_counter() - start
    total = 0
    for path in paths.values():
        size = path.stat().st_size
        total += size
        print(f"{size / 1e6:8.2f} MB  {path}")
    print(f"{total / 1e6:8.2f} MB  total, written in {elapsed:.2f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
