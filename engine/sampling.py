"""The denoising loop, written out so that webui's per-step semantics fit in it.

diffusers supplies the models and the schedulers (scale_model_input / step / add_noise); the
loop itself is ours because webui needs things a stock pipeline cannot do: a different
conditioning per step (prompt editing, alternation), several conditionings combined in one
CFG step (composable `AND`), inpainting blends, and extension hooks (ControlNet residuals).
Everything here works on values passed in; nothing is stored on the shared models.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass(frozen=True)
class CondPart:
    """One text conditioning and its weight in the CFG sum (webui's composable prompts)."""

    embeds: torch.Tensor  # (B, L, D)
    weight: float | torch.Tensor = 1.0  # a number, or one weight per image (B, 1, 1, 1)
    pooled: torch.Tensor | None = None  # SDXL pooled text embedding (B, P)


@dataclass(frozen=True)
class StepConditioning:
    """What the UNet sees at one step: the negative and the positive parts."""

    uncond: CondPart
    conds: tuple[CondPart, ...]


Schedule = Callable[[int], StepConditioning]  # step index -> conditioning
Progress = Callable[[int, int], None]


@dataclass(frozen=True)
class UNetExtras:
    """Extra UNet inputs computed per step by extensions (ControlNet residuals and the like)."""

    down_block_additional_residuals: tuple[torch.Tensor, ...] | None = None
    mid_block_additional_residual: torch.Tensor | None = None


@dataclass(frozen=True)
class StepInfo:
    """Where the loop is, for hooks: the model call index, the number of calls, the batch
    layout (the UNet batch is `copies` blocks of `batch` images: the negative block first,
    then one block per positive AND-part)."""

    index: int
    total: int
    batch: int
    copies: int
    t: Any = None  # the UNet timestep of this step
    sample: torch.Tensor | None = None  # the scaled UNet input of one block (latent channels)


# (UNet input batch, timestep, the UNet kwargs: encoder_hidden_states / added_cond_kwargs,
#  step) -> extra UNet inputs. Hooks must not change the tensors they are given.
UNetHook = Callable[[torch.Tensor, Any, dict[str, Any], StepInfo], UNetExtras]
# (combined CFG prediction, the raw UNet outputs, conditioning, step) -> new prediction
CFGHook = Callable[[torch.Tensor, torch.Tensor, "StepConditioning", StepInfo], torch.Tensor]


@dataclass
class MaskBlend:
    """Inpainting with a regular UNet: after every step, keep the original outside the mask.

    `keep` is 1 where the original is kept, 0 where the model repaints (latent resolution)."""

    init_latents: torch.Tensor
    noise: torch.Tensor
    keep: torch.Tensor


@dataclass
class DenoiseJob:
    unet: Any
    scheduler: Any
    timesteps: Sequence[Any]
    latents: torch.Tensor
    cfg_scale: float
    schedule: Schedule
    generators: list[torch.Generator]
    time_ids: torch.Tensor | None = None  # SDXL size conditioning, (1, 6); refiner (1, 5)
    uncond_time_ids: torch.Tensor | None = None  # the negative block's, when it differs (refiner)
    inpaint_inputs: torch.Tensor | None = None  # 9-channel UNets: [mask, masked-image latents]
    blend: MaskBlend | None = None
    eta: float | None = None
    hooks: list[UNetHook] = field(default_factory=list)
    cfg_hooks: list[CFGHook] = field(default_factory=list)
    progress: Progress | None = None
    # The slice of `timesteps` this job runs (a refiner switch splits one schedule in two jobs
    # that share the scheduler); step indices stay absolute for schedules and progress.
    first: int = 0
    stop: int | None = None


def step_kwargs(
    scheduler: Any, generators: list[torch.Generator], eta: float | None
) -> dict[str, Any]:
    """The optional arguments this scheduler's step() accepts (as diffusers pipelines do)."""
    accepted = set(inspect.signature(scheduler.step).parameters)
    kwargs: dict[str, Any] = {}
    if "generator" in accepted:
        kwargs["generator"] = generators
    if "eta" in accepted and eta is not None:
        kwargs["eta"] = eta
    return kwargs


def combine_cfg(outputs: torch.Tensor, cond: StepConditioning, cfg_scale: float) -> torch.Tensor:
    """webui CFGDenoiser.combine_denoised: uncond + sum_i w_i * cfg * (cond_i - uncond)."""
    parts = outputs.chunk(1 + len(cond.conds))
    uncond = parts[0]
    result = uncond.clone()
    for part, spec in zip(parts[1:], cond.conds, strict=True):
        result += (part - uncond) * (spec.weight * cfg_scale)
    return result


def _batched(cond: StepConditioning) -> tuple[torch.Tensor, torch.Tensor | None]:
    parts = (cond.uncond, *cond.conds)
    embeds = torch.cat([p.embeds for p in parts])
    pooled = None
    if cond.uncond.pooled is not None:
        pooled = torch.cat([p.pooled for p in parts if p.pooled is not None])
    return embeds, pooled


@torch.no_grad()
def denoise(job: DenoiseJob) -> torch.Tensor:
    """Run the sampler over job.timesteps and return the final latents."""
    latents = job.latents
    extra = step_kwargs(job.scheduler, job.generators, job.eta)
    total = len(job.timesteps)
    stop = total if job.stop is None else job.stop
    for index in range(job.first, stop):
        t = job.timesteps[index]
        cond = job.schedule(index)
        copies = 1 + len(cond.conds)
        model_in = job.scheduler.scale_model_input(torch.cat([latents] * copies), t)
        if job.inpaint_inputs is not None:
            model_in = torch.cat([model_in, torch.cat([job.inpaint_inputs] * copies)], dim=1)
        embeds, pooled = _batched(cond)
        kwargs: dict[str, Any] = {"encoder_hidden_states": embeds}
        if pooled is not None and job.time_ids is not None:
            batch = latents.shape[0]
            first = job.time_ids if job.uncond_time_ids is None else job.uncond_time_ids
            time_ids = torch.cat(
                [first.repeat(batch, 1), job.time_ids.repeat(batch * (copies - 1), 1)]
            )
            kwargs["added_cond_kwargs"] = {"text_embeds": pooled, "time_ids": time_ids}
        batch, channels = latents.shape[:2]
        info = StepInfo(index, total, batch, copies, t, model_in[:batch, :channels])
        _apply_unet_hooks(job.hooks, model_in, t, kwargs, info)
        outputs = job.unet(model_in, t, **kwargs).sample
        eps = combine_cfg(outputs, cond, job.cfg_scale)
        for cfg_hook in job.cfg_hooks:
            eps = cfg_hook(eps, outputs, cond, info)
        latents = job.scheduler.step(eps, t, latents, **extra).prev_sample
        if job.blend is not None:
            latents = _apply_blend(job, latents, index)
        if job.progress is not None:
            job.progress(index + 1, total)
    return latents


def _apply_unet_hooks(
    hooks: list[UNetHook], model_in: torch.Tensor, t: Any, kwargs: dict[str, Any], info: StepInfo
) -> None:
    """Sum the residuals of every hook (several ControlNet units add up, as in diffusers'
    MultiControlNet and webui)."""
    down: list[torch.Tensor] | None = None
    mid: torch.Tensor | None = None
    for hook in hooks:
        extras = hook(model_in, t, dict(kwargs), info)
        if extras.down_block_additional_residuals is None:
            continue
        if down is None:
            down = list(extras.down_block_additional_residuals)
            mid = extras.mid_block_additional_residual
        else:
            down = [
                a + b for a, b in zip(down, extras.down_block_additional_residuals, strict=True)
            ]
            if extras.mid_block_additional_residual is not None:
                mid = (
                    extras.mid_block_additional_residual
                    if mid is None
                    else mid + extras.mid_block_additional_residual
                )
    if down is not None:
        kwargs["down_block_additional_residuals"] = tuple(down)
        kwargs["mid_block_additional_residual"] = mid


def _apply_blend(job: DenoiseJob, latents: torch.Tensor, index: int) -> torch.Tensor:
    blend = job.blend
    assert blend is not None
    if index + 1 < len(job.timesteps):
        next_t = job.timesteps[index + 1]
        original = job.scheduler.add_noise(
            blend.init_latents, blend.noise, torch.as_tensor([next_t])
        )
    else:
        original = blend.init_latents
    return original * blend.keep + latents * (1 - blend.keep)


# ---------------------------------------------------------------------------------------------
# VAE


@torch.no_grad()
def decode_latents(vae: Any, latents: torch.Tensor) -> list[Any]:
    """Latents -> PIL images (the VAE's own dtype; SDXL's VAE is kept in fp32 at load)."""
    from PIL import Image

    scaled = latents.to(dtype=vae.dtype) / vae.config.scaling_factor
    pixels = vae.decode(scaled).sample
    pixels = (pixels / 2 + 0.5).clamp(0, 1)
    arrays = (pixels.float().permute(0, 2, 3, 1).cpu().numpy() * 255).round().astype("uint8")
    return [Image.fromarray(a) for a in arrays]


def has_non_finite(latents: torch.Tensor) -> bool:
    return not bool(torch.isfinite(latents).all())


@torch.no_grad()
def encode_images(vae: Any, images: Sequence[Any]) -> torch.Tensor:
    """PIL images -> scaled latents, with the posterior's mean.

    webui samples the posterior with the global RNG; we take the mean so the request's seeds
    are not consumed by the encoder (reference §6, requirement 6) and results are repeatable.
    """
    import numpy as np

    arrays = np.stack(
        [np.asarray(img.convert("RGB"), dtype=np.float32) / 127.5 - 1.0 for img in images]
    )
    tensor = torch.from_numpy(arrays).permute(0, 3, 1, 2).to(device=vae.device, dtype=vae.dtype)
    latents = vae.encode(tensor).latent_dist.mode()
    return latents * vae.config.scaling_factor


@contextmanager
def circular_padding(modules: Sequence[Any], enabled: bool) -> Iterator[None]:
    """webui's tiling: every Conv2d pads circularly for the duration of one request.

    This is the one place a request changes shared modules, so it restores every layer's own
    padding mode afterwards, also on errors and on Cog's cancel (a BaseException)."""
    if not enabled:
        yield
        return
    convs = {
        id(m): m for module in modules for m in module.modules() if isinstance(m, torch.nn.Conv2d)
    }
    saved = {key: conv.padding_mode for key, conv in convs.items()}
    try:
        for conv in convs.values():
            conv.padding_mode = "circular"
        yield
    finally:
        for key, conv in convs.items():
            conv.padding_mode = saved[key]
