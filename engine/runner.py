"""One sampler pass as webui runs it: the schedule, the start latent, the noise, the function.

A `SamplerPass` describes a pass (txt2img, img2img window, hires second pass); `run_pass`
computes webui's sigmas or timestep grid for it, builds the starting latent from the noise
(and the init latent for img2img), and calls the sampler function with a `CFGDenoiser`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch

from . import kdiffusion
from .errors import RequestError
from .kdiffusion import Noise, Options
from .samplers import Kind, ModelWrap, SamplerChoice
from .sampling import CFGDenoiser
from .schedules import (
    Discretization,
    LCMDiscretization,
    ScheduleOptions,
    sigmas_for,
    timestep_grid,
)

# The model wrapper of each kind (webui builds it per sampler): the schedule and the denoiser
# read the stage's discretization.
WRAPS: dict[ModelWrap, Callable[[Discretization], Discretization]] = {
    ModelWrap.COMPVIS: lambda model: model,
    ModelWrap.LCM: LCMDiscretization.of,
}

# webui's UniPC options: uni_pc_order 3, variant bh1, time_uniform skips, lower-order final.
UNIPC_ORDER = 3


@dataclass(frozen=True)
class SamplerPass:
    """What one pass runs: webui's sampler, its settings, and the step window."""

    choice: SamplerChoice
    schedule_steps: int  # steps of the whole schedule
    steps_run: int  # steps this pass runs (img2img: webui's t_enc (+1 for k-diffusion))
    img2img: bool = False
    eta: float | None = None
    s_noise: float = 1.0
    s_churn: float = 0.0
    s_tmin: float = 0.0
    s_tmax: float = float("inf")
    sdxl: bool = False
    # opts.always_discard_next_to_last_sigma: every sampler drops the penultimate sigma
    # (timestep samplers take one grid step more), as the DPM2 samplers always do.
    always_discard: bool = False
    # opts.sigma_min / sigma_max / rho / beta_dist_alpha / beta_dist_beta.
    schedule_options: ScheduleOptions = ScheduleOptions()  # noqa: RUF009 (frozen, shared safely)

    @property
    def discard_penultimate(self) -> bool:
        return self.always_discard or self.choice.row.discard_penultimate

    @property
    def options(self) -> Options:
        row = self.choice.row
        solver = str(dict(row.options).get("solver_type", "midpoint"))
        return Options(
            eta=1.0 if self.eta is None else self.eta,
            s_churn=self.s_churn if "s_churn" in row.extra_params else 0.0,
            s_tmin=self.s_tmin if "s_tmin" in row.extra_params else 0.0,
            s_tmax=self.s_tmax if "s_tmax" in row.extra_params else float("inf"),
            s_noise=self.s_noise if "s_noise" in row.extra_params else 1.0,
            solver_type=solver,
        )

    @property
    def model_calls(self) -> int:
        """webui's total_steps: the steps run, twice for second-order samplers."""
        steps = self.steps_run if self.img2img else self.schedule_steps
        return steps * 2 if self.choice.row.second_order else steps


def step_noise(
    generators: Sequence[torch.Generator], shape: tuple[int, ...], device: Any
) -> Callable[[], torch.Tensor]:
    """webui ImageRNG.next: one float32 draw per image from its own generator, stacked."""

    def draw() -> torch.Tensor:
        draws = [
            torch.randn(shape, generator=g, device=g.device, dtype=torch.float32)
            for g in generators
        ]
        return torch.stack(draws).to(device)

    return draw


class BrownianNoise:
    """k-diffusion's BrownianTreeNoiseSampler with one tree per image, seeded with the image's
    seed (webui create_noise_sampler), drawn in float32 on the seeds' device."""

    def __init__(
        self, x: torch.Tensor, sigmas: torch.Tensor, seeds: Sequence[int], device: str
    ) -> None:
        import torchsde

        positive = sigmas[sigmas > 0]
        t0, t1 = torch.as_tensor(positive.min()), torch.as_tensor(sigmas.max())
        w0 = torch.zeros(x.shape[1:], dtype=torch.float32, device=device)
        self.trees = [torchsde.BrownianTree(t0, w0, t1, entropy=int(s)) for s in seeds]
        self.out_device = x.device

    def __call__(self, sigma: Any, sigma_next: Any) -> torch.Tensor:
        t0, t1 = torch.as_tensor(sigma).cpu(), torch.as_tensor(sigma_next).cpu()
        low, high, sign = (t0, t1, 1) if t0 < t1 else (t1, t0, -1)
        w = torch.stack([tree(low, high) for tree in self.trees]) * sign
        return (w / (t1 - t0).abs().sqrt()).to(self.out_device)


def run_pass(
    spec: SamplerPass,
    denoiser: CFGDenoiser,
    noise: torch.Tensor,
    generators: Sequence[torch.Generator],
    seeds: Sequence[int],
    rng_device: str,
    init: torch.Tensor | None = None,
) -> torch.Tensor:
    """Run one pass and return the final latents (float32).

    txt2img starts from `noise` scaled to the first sigma; img2img (`init` given) from the
    init latent noised to the window's first sigma (webui sample_img2img)."""
    row = spec.choice.row
    # webui's launch_sampling: state.sampling_steps is the steps asked for (txt2img), t_enc + 1
    # in img2img (k-diffusion runs t_enc + 1 steps, the timestep samplers t_enc).
    timestep_kind = row.kind in (Kind.TIMESTEPS, Kind.UNIPC)
    denoiser.sampling_step = 0
    denoiser.sampling_steps = (
        spec.steps_run + (1 if timestep_kind else 0) if init is not None else spec.schedule_steps
    )
    wrap = WRAPS[row.model_wrap]
    denoiser.stages = [replace(s, discretization=wrap(s.discretization)) for s in denoiser.stages]
    model = denoiser.stage.discretization
    noise = noise.to(torch.float32)
    draw = step_noise(generators, tuple(noise.shape[1:]), noise.device)
    if row.kind in (Kind.TIMESTEPS, Kind.UNIPC):
        return _timesteps_pass(spec, denoiser, model, noise, draw, init)
    schedule = spec.choice.schedule.name if spec.choice.schedule is not None else None
    sigmas = sigmas_for(
        schedule,
        spec.schedule_steps,
        model,
        discard_penultimate=spec.discard_penultimate,
        sdxl=spec.sdxl,
        options=spec.schedule_options,
    ).to(noise.device)
    if init is None:
        window = sigmas
        x = noise * sigmas[0]
    else:
        t_enc = spec.steps_run - 1
        window = sigmas[spec.schedule_steps - t_enc - 1 :]
        x = init.to(torch.float32) + noise * window[0]
    brownian = None
    if row.brownian:
        # webui seeds the trees over the whole schedule, also for an img2img window.
        brownian = BrownianNoise(x, sigmas.cpu(), seeds, rng_device)
    randomness = Noise(draw, brownian)
    fn: Callable[..., torch.Tensor] = getattr(kdiffusion, row.function)
    if row.kind is Kind.DPM:
        if init is None:
            lo, hi, n = model.sigma_min, model.sigma_max, spec.schedule_steps
        else:
            lo, hi, n = float(window[-2]), float(window[0]), len(window) - 1
        if row.function == "sample_dpm_fast":
            return fn(denoiser, x, lo, hi, n, randomness, spec.options)
        return fn(denoiser, x, lo, hi, randomness, spec.options)
    return fn(denoiser, x, window, randomness, spec.options)


def _timesteps_pass(
    spec: SamplerPass,
    denoiser: CFGDenoiser,
    model: Discretization,
    noise: torch.Tensor,
    draw: Callable[[], torch.Tensor],
    init: torch.Tensor | None,
) -> torch.Tensor:
    """webui CompVisSampler: DDIM / DDIM CFG++ / PLMS / UniPC over its timestep grid."""
    row = spec.choice.row
    grid_steps = spec.schedule_steps + (1 if spec.discard_penultimate else 0)
    grid = timestep_grid(grid_steps).to(noise.device)
    x = noise
    if init is not None:
        t_enc = spec.steps_run
        alpha = model.alphas_cumprod[int(grid[t_enc])]
        x = init.to(torch.float32) * alpha.sqrt() + noise * (1 - alpha).sqrt()
        grid = grid[:t_enc]
    alphas = model.alphas_cumprod.to(noise.device)
    if row.kind is Kind.UNIPC:
        # webui: as many UniPC steps as grid entries; img2img starts at the window's top.
        t_start = float(grid[-1]) / 1000 + 1 / 1000 if init is not None else None
        if len(grid) < UNIPC_ORDER:
            raise RequestError.single(
                "steps",
                len(grid),
                f"UniPC (order {UNIPC_ORDER}) needs at least {UNIPC_ORDER} sampling steps "
                "in this pass, as in webui",
            )
        return kdiffusion.sample_unipc(
            denoiser.eps, x, alphas, len(grid), t_start=t_start, order=UNIPC_ORDER
        )
    randomness = Noise(draw)
    if row.function == "sample_plms":
        return kdiffusion.sample_plms(denoiser.eps, x, grid, alphas, randomness, spec.options)
    uncond = None
    if row.function == "sample_ddim_cfgpp":
        denoiser.cond_scale_multiplier = 1 / 12.5

        def uncond() -> torch.Tensor:
            assert denoiser.last_uncond is not None
            return denoiser.last_uncond

    return kdiffusion.sample_ddim(
        denoiser.eps, x, grid, alphas, randomness, spec.options, uncond_eps=uncond
    )
