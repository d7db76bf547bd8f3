"""The per-step denoiser the sampler functions call (webui's CFGDenoiser), and the VAE.

diffusers supplies the models; the sampler functions (engine/kdiffusion.py) and this denoiser
are ours because webui needs things a stock pipeline cannot do: a different conditioning per
step (prompt editing, alternation), several conditionings combined in one CFG step
(composable `AND`), inpainting blends, and extension hooks (ControlNet residuals).
Everything here works on values passed in; nothing is stored on the shared models.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch

from .schedules import Discretization
from .step_batcher import away, run_unet


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


class StopSampling(Exception):
    """Raised by a progress callback to end sampling at a step boundary (webui's interrupt
    and skip). The pass keeps the last denoised prediction, as webui's `launch_sampling`
    returns `last_latent` on its InterruptedException. `skip` ends only the current batch;
    otherwise the remaining batches are dropped too."""

    def __init__(self, skip: bool = False) -> None:
        super().__init__("skip" if skip else "interrupt")
        self.skip = skip
        self.latents: torch.Tensor | None = None  # filled by the pass that stopped


@runtime_checkable
class LatentObserver(Protocol):
    """A progress callback that also wants each model call's denoised prediction (live
    previews) and webui's state there. `sdxl` says which latent space it is in (the previews'
    colour approximation differs); `step` / `steps` are webui's state.sampling_step (the last
    completed sampler step, 0 before the first) and state.sampling_steps, which count sampler
    steps where the progress callback's numbers count model calls (Heun: two per step)."""

    def observe(self, denoised: torch.Tensor, sdxl: bool, step: int, steps: int) -> None: ...


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
    # webui's state.sampling_step / state.sampling_steps (what extensions' step windows read):
    # the index of the last completed sampler step (0 until the first completes) and the
    # steps the pass asked for (t_enc + 1 in img2img and hires). 0 steps: not known.
    sampling_step: int = 0
    sampling_steps: int = 0


# (UNet input batch, timestep, the UNet kwargs: encoder_hidden_states / added_cond_kwargs,
#  step) -> extra UNet inputs. Hooks must not change the tensors they are given.
UNetHook = Callable[[torch.Tensor, Any, dict[str, Any], StepInfo], UNetExtras]


@runtime_checkable
class ScopedUNetHook(Protocol):
    """A UNetHook that needs the UNet itself for one pass (ControlNet's reference modules: an
    extra UNet call per step, attention processors and block hooks that read its records).

    The pass runner enters `attached(unet)` around the pass, on the UNet the hook runs with;
    on exit (errors and cancel included) every change to the shared UNet is undone."""

    def __call__(
        self, model_in: torch.Tensor, t: Any, kwargs: dict[str, Any], info: StepInfo
    ) -> UNetExtras: ...

    def attached(self, unet: Any) -> AbstractContextManager[None]: ...


# (combined CFG prediction, the raw UNet outputs, conditioning, step) -> new prediction
CFGHook = Callable[[torch.Tensor, torch.Tensor, "StepConditioning", StepInfo], torch.Tensor]


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


@dataclass(frozen=True)
class MaskBlend:
    """Inpainting with a regular UNet, as webui's CFGDenoiser: at every step the prediction
    keeps the original latent outside the mask, and so does the final latent.

    `keep` is 1 where the original is kept, 0 where the model repaints (latent resolution)."""

    init_latents: torch.Tensor
    keep: torch.Tensor

    def apply(self, latents: torch.Tensor) -> torch.Tensor:
        return latents * (1 - self.keep) + self.init_latents * self.keep


@dataclass(frozen=True)
class Stage:
    """One model behind the denoiser; a refiner is a second stage that takes over once the
    sampler has completed `switch_at` of the noise range (webui's apply_refiner)."""

    unet: Any
    schedule: Schedule
    discretization: Discretization
    prediction_type: str = "epsilon"
    time_ids: torch.Tensor | None = None  # SDXL size conditioning, (1, 6); refiner (1, 5)
    uncond_time_ids: torch.Tensor | None = None  # the negative block's, when it differs
    hooks: tuple[UNetHook, ...] = ()
    switch_at: float | None = None
    dtype: torch.dtype | None = None  # the UNet's, stored once (None: read from the UNet)


@dataclass
class CFGDenoiser:
    """webui's CFGDenoiser: one call per sampler step, CFG over the negative and every positive
    AND-part, extension hooks, inpainting inputs and blends, the refiner switch.

    k-diffusion samplers call it with sigmas and get the denoised latent (CompVis(V)Denoiser:
    input scaled by 1/sqrt(sigma^2+1), the fractional timestep of sigma to the UNet; LCM's
    wrapper is the stage's LCMDiscretization); webui's timestep samplers call `eps` with
    integer timesteps and get the noise prediction. Latents stay float32 between steps; only
    the UNet input is cast to the model's dtype."""

    stages: Sequence[Stage]
    cfg_scale: float
    total: int  # expected model calls, for hooks and progress
    inpaint_inputs: torch.Tensor | None = None  # 9-channel UNets: [mask, masked-image latents]
    blend: MaskBlend | None = None
    cfg_hooks: Sequence[CFGHook] = ()
    progress: Progress | None = None
    cond_scale_multiplier: float = 1.0  # DDIM CFG++ maps CFG onto 0..1
    calls: int = 0
    stage_index: int = 0
    last_uncond: torch.Tensor | None = None
    # The latest denoised (x0) prediction: what an interrupted pass returns (webui's last_latent).
    last_denoised: torch.Tensor | None = None
    # webui's state.sampling_step (set by the sampler functions after each step) and
    # state.sampling_steps (set per pass by the runner); hooks get them in StepInfo.
    sampling_step: int = 0
    sampling_steps: int = 0

    @property
    def stage(self) -> Stage:
        return self.stages[self.stage_index]

    def _switch(self, timestep: int) -> None:
        """webui apply_refiner: switch once (999 - t) / 1000 reaches the next stage's fraction."""
        if self.stage_index + 1 >= len(self.stages):
            return
        upcoming = self.stages[self.stage_index + 1]
        assert upcoming.switch_at is not None
        if (999 - timestep) / 1000 >= upcoming.switch_at:
            self.stage_index += 1

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """Denoised prediction at noise level sigma (B,), float32."""
        sigmas = self.stage.discretization.sigmas
        self._switch(int(torch.argmin((sigmas - sigma.max().cpu()).abs())))
        model = self.stage.discretization
        sig = sigma.to(torch.float32).view(-1, 1, 1, 1)
        c_in = 1 / (sig**2 + 1) ** 0.5
        t = model.sigma_to_t(sigma.cpu()).to(x.device)
        out = self._guided(x * c_in, t)
        if self.stage.prediction_type == "v_prediction" and not model.output_is_eps:
            denoised = out * (-sig / (sig**2 + 1) ** 0.5) + x * (1 / (sig**2 + 1))
        else:
            denoised = x + out * -sig
        # Per branch in webui; CFG's weights sum to 1, so after the combination is the same.
        denoised = model.scale_output(sigma, denoised, x)
        if self.blend is not None:
            denoised = self.blend.apply(denoised)
        self._stepped(denoised)
        return denoised

    def eps(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Noise prediction at integer timesteps t (B,) for webui's timestep samplers, which
        blend the original in before the model call (mask_before_denoising)."""
        self._switch(int(t.max()))
        if self.blend is not None:
            x = self.blend.apply(x)
        out = self._guided(x, t.to(torch.float32))
        if self.stage.prediction_type == "v_prediction":
            alphas = self.stage.discretization.alphas_cumprod
            a_t = alphas[t.to(torch.long).cpu()].view(-1, 1, 1, 1).to(x.device)
            out = a_t.sqrt() * out + (1 - a_t).sqrt() * x
            if self.last_uncond is not None:
                self.last_uncond = a_t.sqrt() * self.last_uncond + (1 - a_t).sqrt() * x
        alphas = self.stage.discretization.alphas_cumprod
        a_t = alphas[t.to(torch.long).cpu()].view(-1, 1, 1, 1).to(x.device, torch.float32)
        self._stepped((x - (1 - a_t).sqrt() * out) / a_t.sqrt())  # the x0 prediction
        return out

    def _stepped(self, denoised: torch.Tensor) -> None:
        """After each model call: keep the x0 prediction, then report progress (the callback
        may stop sampling here by raising StopSampling)."""
        self.last_denoised = denoised
        if self.progress is None:
            return
        if isinstance(self.progress, LatentObserver):
            sdxl = self.stage.time_ids is not None
            self.progress.observe(denoised, sdxl, self.sampling_step, self.sampling_steps)
        self.progress(min(self.calls, self.total), self.total)

    def _guided(self, model_in: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The UNet over [negative, positives...] and the CFG sum, in the model's output space."""
        stage = self.stage
        index = self.calls
        cond = stage.schedule(index)
        copies = 1 + len(cond.conds)
        batch = model_in.shape[0]
        dtype = stage.dtype if stage.dtype is not None else stage.unet.dtype
        unet_in = torch.cat([model_in] * copies).to(dtype)
        if self.inpaint_inputs is not None:
            extra = torch.cat([self.inpaint_inputs] * copies).to(dtype)
            unet_in = torch.cat([unet_in, extra], dim=1)
        t_in = torch.cat([t] * copies)
        embeds, pooled = _batched(cond)
        kwargs: dict[str, Any] = {"encoder_hidden_states": embeds}
        if pooled is not None and stage.time_ids is not None:
            first = stage.time_ids if stage.uncond_time_ids is None else stage.uncond_time_ids
            time_ids = torch.cat(
                [first.repeat(batch, 1), stage.time_ids.repeat(batch * (copies - 1), 1)]
            )
            kwargs["added_cond_kwargs"] = {"text_embeds": pooled, "time_ids": time_ids}
        info = StepInfo(
            index,
            self.total,
            batch,
            copies,
            t.reshape(-1)[0],
            model_in,
            sampling_step=self.sampling_step,
            sampling_steps=self.sampling_steps,
        )
        _apply_unet_hooks(list(stage.hooks), unet_in, t_in, kwargs, info)
        # Batched with other requests' calls when several run at once (engine/step_batcher.py).
        outputs = run_unet(stage.unet, unet_in, t_in, kwargs).to(torch.float32)
        if self.cond_scale_multiplier != 1.0:
            self.last_uncond = outputs[:batch].clone()
        guided = combine_cfg(outputs, cond, self.cfg_scale * self.cond_scale_multiplier)
        for cfg_hook in self.cfg_hooks:
            guided = cfg_hook(guided, outputs, cond, info)
        self.calls += 1
        return guided


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


# ---------------------------------------------------------------------------------------------
# VAE


@torch.no_grad()
def decode_latents(vae: Any, latents: torch.Tensor) -> list[Any]:
    """Latents -> PIL images, converted to 8 bits as webui does: clamp((x + 1) / 2) * 255,
    truncated (`astype(uint8)`), not rounded. A NaN or Inf in the decoded pixels is an error,
    never a black picture."""
    from PIL import Image

    from .errors import GenerationError
    from .vae_precision import decode_pixels

    with away():  # other requests' steps go on meanwhile (engine/step_batcher.py)
        pixels = decode_pixels(vae, latents)  # half precision, retried in fp32 on NaN
    if has_non_finite(pixels):
        raise GenerationError("the VAE produced NaN or Inf values; no image is returned")
    pixels = torch.clamp(pixels.float() * 0.5 + 0.5, min=0.0, max=1.0)
    arrays = (255.0 * pixels.permute(0, 2, 3, 1).cpu().numpy()).astype("uint8")
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
    with away():
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
