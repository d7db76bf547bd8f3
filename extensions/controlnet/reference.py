"""The weight-free reference modules: `reference_only`, `reference_adain`, `reference_adain+attn`
(Mikubill scripts/hook.py, the AttentionInjection part of UnetHook).

At every step of the pass, for each unit whose guidance window contains the step:
1. The reference image's VAE latent, noised to this step's level (q_sample with fresh noise),
   goes through the UNet with the step's prompts and timestep, without ControlNet residuals:
   the "write" pass. It records
   - attention (reference_only, +attn): the input of each chosen BasicTransformerBlock's
     self-attention (the hidden states after norm1);
   - AdaIN (reference_adain, +attn): the per-channel mean and variance of the output of each
     chosen UNet block (the extension's "group norm" hook sits on whole LDM input, middle and
     output blocks).
2. The real UNet call "reads": self-attention takes its keys and values from the hidden states
   concatenated with the recorded ones; block outputs are renormalised to the recorded
   statistics. On the negative rows both are blended back toward the plain result by the style
   fidelity (the positive rows always get the reference).

The unit weight decides how many layers take part, not a strength: a layer joins when
weight > its rank; ranks run 0..1 over the attention layers from the widest to the narrowest,
and 0..2 over the blocks from the middle outwards. Weight 0 records nothing.

Style fidelity is threshold_a clamped to 0..1 and cubed on SDXL ("sdxl's attention hacking is
highly unstable"); "ControlNet is more important" makes it 1, "My prompt is more important"
and the hires pass make it 0.

As in the extension, a write pass runs the mechanism it does not write in "read" mode: a
reference_adain unit's write pass consumes what an earlier attention unit recorded this step
(and the other way round). Units of one kind accumulate: attention concatenates every record,
AdaIN averages the statistics.

Differences, by choice: the reference noise comes from a generator seeded per unit and step,
not torch's global RNG (the same request gives the same picture); the statistics are computed
in float32 (the extension uses the UNet's dtype, where a variance can overflow float16); the
encoder takes the posterior's mean (as everywhere in this engine).

`ReferenceHook.attached(unet)` changes the shared UNet for one pass (attn1 processors swapped,
forward hooks on the chosen blocks) and puts everything back on exit, errors included.
"""

from __future__ import annotations

import enum
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Final

import torch
from PIL import Image

from engine.sampling import StepInfo, UNetExtras, encode_images

from .hook import CONTROLNET_MORE, PROMPT_MORE, active

# module -> (attention, AdaIN)
MODES: Final[Mapping[str, tuple[bool, bool]]] = MappingProxyType(
    {
        "reference_only": (True, False),
        "reference_adain": (False, True),
        "reference_adain+attn": (True, True),
    }
)

# The LDM block indices the extension renormalises (hook.py input_block_indices /
# output_block_indices), by "is SDXL".
_ADAIN_BLOCKS: Final[Mapping[bool, tuple[tuple[int, ...], tuple[int, ...]]]] = MappingProxyType(
    {
        False: ((4, 5, 7, 8, 10, 11), (0, 1, 2, 3, 4, 5, 6, 7)),
        True: ((4, 5, 7, 8), (0, 1, 2, 3, 4, 5)),
    }
)
_EPS: Final = 1e-6  # hacked_group_norm_forward's floor under the variance
_TINY: Final = 1e-5  # below this style fidelity the negative rows are not recomputed
_NOISE_SEED: Final = 0x5EED


class Machine(enum.Enum):
    READ = "read"
    WRITE = "write"


@dataclass
class _State:
    """What every layer of one attached UNet reads: the outer machine of the extension."""

    attention: Machine = Machine.READ
    adain: Machine = Machine.READ
    weight: float = 1.0  # the writing unit's weight
    fidelity: float = 0.0  # the writing unit's style fidelity
    negative_rows: int = 0  # the UNet batch starts with this many negative-prompt rows


@dataclass(eq=False)
class AttentionLayer:
    """attn1's processor while attached; the processor it replaced does the attention."""

    inner: Any
    rank: float
    state: _State
    bank: list[torch.Tensor] = field(default_factory=list)
    fidelities: list[float] = field(default_factory=list)

    def clear(self) -> None:
        self.bank.clear()
        self.fidelities.clear()

    def __call__(
        self,
        attn: Any,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
    ) -> torch.Tensor:
        def attend(x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
            return self.inner(attn, x, encoder_hidden_states=context, temb=temb)

        if encoder_hidden_states is not None or attention_mask is not None:
            # Not self-attention (the extension leaves disable_self_attn blocks alone).
            return self.inner(attn, hidden_states, encoder_hidden_states, attention_mask, temb)
        state = self.state
        if state.attention is Machine.WRITE:
            if state.weight > self.rank:
                self.bank.append(hidden_states.detach().clone())
                self.fidelities.append(state.fidelity)
            return attend(hidden_states)
        if not self.bank:
            return attend(hidden_states)
        fidelity = sum(self.fidelities) / len(self.fidelities)
        with_reference = attend(hidden_states, torch.cat([hidden_states, *self.bank], dim=1))
        kept = with_reference.clone()
        rows = state.negative_rows
        if rows > 0 and fidelity > _TINY:
            kept[:rows] = attend(hidden_states[:rows])
        self.clear()
        return fidelity * kept + (1.0 - fidelity) * with_reference


@dataclass(eq=False)
class AdainLayer:
    """A forward hook on one UNet block: records or applies its output's channel statistics."""

    rank: float
    state: _State
    means: list[torch.Tensor] = field(default_factory=list)
    variances: list[torch.Tensor] = field(default_factory=list)
    fidelities: list[float] = field(default_factory=list)

    def clear(self) -> None:
        self.means.clear()
        self.variances.clear()
        self.fidelities.clear()

    def __call__(self, module: Any, args: Any, output: Any) -> Any:
        # Transformer2DModel is called with return_dict=False: a 1-tuple.
        x = output[0] if isinstance(output, tuple) else output
        y = self.apply(x)
        if y is x:
            return None  # the output unchanged
        return (y, *output[1:]) if isinstance(output, tuple) else y

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        state = self.state
        if state.adain is Machine.WRITE:
            if state.weight > self.rank:
                var, mean = torch.var_mean(x.float(), dim=(2, 3), keepdim=True, correction=0)
                self.means.append(mean)
                self.variances.append(var)
                self.fidelities.append(state.fidelity)
            return x
        if not self.means:
            self.clear()
            return x
        fidelity = sum(self.fidelities) / len(self.fidelities)
        values = x.float()
        var, mean = torch.var_mean(values, dim=(2, 3), keepdim=True, correction=0)
        std = var.clamp(min=_EPS) ** 0.5
        mean_ref = torch.stack(self.means).sum(dim=0) / len(self.means)
        var_ref = torch.stack(self.variances).sum(dim=0) / len(self.variances)
        std_ref = var_ref.clamp(min=_EPS) ** 0.5
        renormalised = (values - mean) / std * std_ref + mean_ref
        kept = renormalised.clone()
        rows = state.negative_rows
        if rows > 0 and fidelity > _TINY:
            kept[:rows] = values[:rows]
        self.clear()
        return (fidelity * kept + (1.0 - fidelity) * renormalised).to(x.dtype)


def is_sdxl(unet: Any) -> bool:
    """SDXL-shaped UNets (the base and the refiner) take the size/pooled-text embedding."""
    return getattr(unet.config, "addition_embed_type", None) == "text_time"


def transformer_blocks(unet: Any) -> list[Any]:
    """Every BasicTransformerBlock in the LDM order (input, middle, output blocks)."""
    levels = (*unet.down_blocks, unet.mid_block, *unet.up_blocks)
    return [
        block
        for level in levels
        for transformer in (getattr(level, "attentions", None) or ())
        for block in transformer.transformer_blocks
    ]


def ldm_input_blocks(unet: Any) -> list[Any]:
    """The module whose output is LDM `input_blocks[i]`'s, for every i: conv_in, then per level
    each layer (its attention, else its resnet) and the downsampler."""
    blocks = [unet.conv_in]
    for level in unet.down_blocks:
        attentions = getattr(level, "attentions", None)
        blocks.extend(attentions[j] if attentions else r for j, r in enumerate(level.resnets))
        if level.downsamplers:
            blocks.append(level.downsamplers[0])
    return blocks


def ldm_output_blocks(unet: Any) -> list[Any]:
    """The module whose output is LDM `output_blocks[i]`'s: per level each layer (attention,
    else resnet); the level's last layer ends with its upsampler where there is one."""
    blocks: list[Any] = []
    for level in unet.up_blocks:
        attentions = getattr(level, "attentions", None)
        layers = [attentions[j] if attentions else r for j, r in enumerate(level.resnets)]
        if level.upsamplers:
            layers[-1] = level.upsamplers[0]
        blocks.extend(layers)
    return blocks


def attention_ranks(unet: Any) -> list[tuple[Any, float]]:
    """(block, rank): widest first (a stable sort of the LDM order), rank i / n."""
    blocks = sorted(transformer_blocks(unet), key=lambda b: -int(b.norm1.normalized_shape[0]))
    return [(block, i / len(blocks)) for i, block in enumerate(blocks)]


def adain_ranks(unet: Any) -> list[tuple[Any, float]]:
    """(module, rank): the middle block at 0, the chosen input blocks from 2 down to deep ones
    near 0, the chosen output blocks from 0 up (the extension's gn_weight, doubled)."""
    inputs, outputs = _ADAIN_BLOCKS[is_sdxl(unet)]
    input_blocks, output_blocks = ldm_input_blocks(unet), ldm_output_blocks(unet)
    ranks = [(unet.mid_block, 0.0)]
    ranks += [(input_blocks[i], 2 * (1 - w / len(inputs))) for w, i in enumerate(inputs)]
    ranks += [(output_blocks[i], 2 * (w / len(outputs))) for w, i in enumerate(outputs)]
    return ranks


@dataclass(frozen=True)
class ReferenceUnit:
    """One reference unit, validated."""

    index: int  # the unit's position (its noise stream)
    attention: bool
    adain: bool
    weight: float
    guidance_start: float
    guidance_end: float
    style_fidelity: float  # threshold_a after the slider's bounds
    control_mode: int
    image: Image.Image  # the reference at the first-pass size (after the unit's resize mode)


def style_fidelity(unit: ReferenceUnit, *, sdxl: bool, hires: bool) -> float:
    """hook.py: clamp, cube on SDXL, then the control mode (and the hires pass) decide."""
    if unit.control_mode == CONTROLNET_MORE:  # cfg_injection
        return 1.0
    if unit.control_mode == PROMPT_MORE or hires:  # soft_injection, or in high-res fix
        return 0.0
    value = max(0.0, min(1.0, unit.style_fidelity))
    return value**3.0 if sdxl else value


@dataclass(eq=False)
class _Attached:
    unet: Any
    state: _State
    layers: list[AttentionLayer | AdainLayer]
    sdxl: bool


@dataclass(eq=False)
class ReferenceHook:
    """A ScopedUNetHook running every reference unit of one pass (first or hires)."""

    units: tuple[ReferenceUnit, ...]
    vae: Any
    alphas_cumprod: torch.Tensor
    hires: bool = False
    _latents: dict[tuple[int, int, int], torch.Tensor] = field(default_factory=dict, repr=False)
    _attached: _Attached | None = field(default=None, repr=False)

    @contextmanager
    def attached(self, unet: Any) -> Iterator[None]:
        """Swap every attn1 processor and hook the chosen blocks; all undone on exit."""
        state = _State()
        layers: list[AttentionLayer | AdainLayer] = []
        swapped: list[tuple[Any, Any]] = []
        handles: list[Any] = []
        try:
            for block, rank in attention_ranks(unet):
                layer = AttentionLayer(block.attn1.processor, rank, state)
                swapped.append((block.attn1, block.attn1.processor))
                block.attn1.set_processor(layer)
                layers.append(layer)
            for module, rank in adain_ranks(unet):
                adain = AdainLayer(rank, state)
                handles.append(module.register_forward_hook(adain))
                layers.append(adain)
            self._attached = _Attached(unet, state, layers, is_sdxl(unet))
            yield
        finally:
            self._attached = None
            for handle in handles:
                handle.remove()
            for attn, processor in swapped:
                attn.set_processor(processor)

    def _reference_latent(self, unit: ReferenceUnit, height: int, width: int) -> torch.Tensor:
        # The first pass uses the reference as fitted; a hires pass gets it at its own size
        # (the extension's hr_hint_cond); each encoded once.
        key = (unit.index, height, width)
        if key not in self._latents:
            size = (width * 8, height * 8)
            image = unit.image
            if image.size != size:
                image = image.resize(size, Image.Resampling.BICUBIC)
            self._latents[key] = encode_images(self.vae, [image]).to(torch.float32)
        return self._latents[key]

    def _noised(self, unit: ReferenceUnit, model_in: torch.Tensor, info: StepInfo) -> torch.Tensor:
        """q_sample of the reference latent at this step's timestep, one noise draw per UNet
        row; 9-channel UNets get the extension's [x_t, zero mask, latent]."""
        rows, _, height, width = model_in.shape
        latent = self._reference_latent(unit, height, width).to(model_in.device)
        index = int(torch.as_tensor(info.t).float().round().clamp(0, len(self.alphas_cumprod) - 1))
        alpha_bar = float(self.alphas_cumprod[index])
        generator = torch.Generator().manual_seed(_NOISE_SEED + 1009 * unit.index + info.index)
        noise = torch.randn((rows, *latent.shape[1:]), generator=generator, dtype=torch.float32)
        x_t = alpha_bar**0.5 * latent + (1 - alpha_bar) ** 0.5 * noise.to(model_in.device)
        if model_in.shape[1] > x_t.shape[1]:
            zeros = torch.zeros_like(x_t[:, :1])
            x_t = torch.cat([x_t, zeros, latent.expand(rows, -1, -1, -1)], dim=1)
        return x_t.to(model_in.dtype)

    def __call__(
        self, model_in: torch.Tensor, t: Any, kwargs: dict[str, Any], info: StepInfo
    ) -> UNetExtras:
        attached = self._attached
        assert attached is not None, "ReferenceHook called outside attached(unet)"
        state = attached.state
        for layer in attached.layers:  # the extension clears every record at each step
            layer.clear()
        state.negative_rows = info.batch  # the negative block comes first (StepInfo)
        for unit in self.units:
            if not active(info, unit.guidance_start, unit.guidance_end):
                continue
            state.fidelity = style_fidelity(unit, sdxl=attached.sdxl, hires=self.hires)
            state.weight = unit.weight
            state.attention = Machine.WRITE if unit.attention else Machine.READ
            state.adain = Machine.WRITE if unit.adain else Machine.READ
            try:
                attached.unet(self._noised(unit, model_in, info), t, **kwargs)
            finally:
                state.attention = state.adain = Machine.READ
        return UNetExtras()
