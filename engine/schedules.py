"""Noise levels as webui computes them: the model's discrete sigmas and the schedule types.

webui samples in k-diffusion's sigma space. The model's sigmas come from its training
`alphas_cumprod` (ldm's `register_schedule`, float64 then stored float32), and k-diffusion's
`CompVisDenoiser` maps any sigma back to a *fractional* timestep by interpolating in log-sigma
(webui leaves `enable_quantization` off), which is what the UNet sees. The schedule functions
below are webui 1.10's `sd_schedulers.py` and k-diffusion 0.1.1's `get_sigmas_*`, written out.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch

# webui opts.beta_dist_alpha / beta_dist_beta defaults.
BETA_ALPHA = 0.6
BETA_BETA = 0.6

# NVIDIA's Align Your Steps tables (webui sd_schedulers.get_align_your_steps_sigmas).
AYS_SD1 = (14.615, 6.475, 3.861, 2.697, 1.886, 1.396, 0.963, 0.652, 0.399, 0.152, 0.029)
AYS_SDXL = (14.615, 6.315, 3.771, 2.181, 1.342, 0.862, 0.555, 0.380, 0.234, 0.113, 0.029)


def alphas_cumprod(config: Mapping[str, Any]) -> torch.Tensor:
    """The training schedule's alpha-bar, as ldm's register_schedule builds it (float32)."""
    steps = int(config.get("num_train_timesteps", 1000))
    start = float(config.get("beta_start", 0.00085))
    end = float(config.get("beta_end", 0.012))
    kind = config.get("beta_schedule", "scaled_linear")
    trained = config.get("trained_betas")
    if trained is not None:
        betas = torch.tensor(trained, dtype=torch.float64)
    elif kind == "scaled_linear":
        betas = torch.linspace(start**0.5, end**0.5, steps, dtype=torch.float64) ** 2
    elif kind == "linear":
        betas = torch.linspace(start, end, steps, dtype=torch.float64)
    else:
        raise ValueError(f"unsupported beta_schedule {kind!r}")
    return torch.cumprod(1.0 - betas, dim=0).to(torch.float32)


def append_zero(x: torch.Tensor) -> torch.Tensor:
    return torch.cat([x, x.new_zeros([1])])


@dataclass(frozen=True)
class Discretization:
    """k-diffusion's DiscreteSchedule over a CompVis model's alphas_cumprod (CPU, float32)."""

    alphas_cumprod: torch.Tensor
    sigmas: torch.Tensor  # ascending, one per training timestep
    log_sigmas: torch.Tensor

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> Discretization:
        alphas = alphas_cumprod(config)
        sigmas = ((1 - alphas) / alphas) ** 0.5
        return cls(alphas, sigmas, sigmas.log())

    @property
    def sigma_min(self) -> float:
        return float(self.sigmas[0])

    @property
    def sigma_max(self) -> float:
        return float(self.sigmas[-1])

    def sigma_to_t(self, sigma: torch.Tensor) -> torch.Tensor:
        """Fractional timestep by log-sigma interpolation (CompVisDenoiser, quantize off)."""
        log_sigmas = self.log_sigmas.to(sigma.device)
        log_sigma = sigma.log()
        dists = log_sigma - log_sigmas[:, None]
        low_idx = dists.ge(0).cumsum(dim=0).argmax(dim=0).clamp(max=log_sigmas.shape[0] - 2)
        high_idx = low_idx + 1
        low, high = log_sigmas[low_idx], log_sigmas[high_idx]
        w = ((low - log_sigma) / (low - high)).clamp(0, 1)
        t = (1 - w) * low_idx + w * high_idx
        return t.view(sigma.shape)

    def t_to_sigma(self, t: torch.Tensor) -> torch.Tensor:
        t = t.float()
        low_idx, high_idx, w = t.floor().long(), t.ceil().long(), t.frac()
        log_sigma = (1 - w) * self.log_sigmas[low_idx] + w * self.log_sigmas[high_idx]
        return log_sigma.exp()

    # Whether the UNet output is read as eps whatever the model's prediction type.
    output_is_eps: ClassVar[bool] = False

    def scale_output(
        self, sigma: torch.Tensor, denoised: torch.Tensor, x: torch.Tensor
    ) -> torch.Tensor:
        """The wrapper's last step on the denoised prediction (none for CompVisDenoiser)."""
        return denoised

    def get_sigmas(self, n: int) -> torch.Tensor:
        """The model's own schedule: n timesteps evenly from 999 to 0, then 0."""
        t = torch.linspace(len(self.sigmas) - 1, 0, n)
        return append_zero(self.t_to_sigma(t))


# webui sd_samplers_lcm: LCM models are distilled on 50 of the 1000 timesteps, with consistency
# boundary scalings of sigma_data 0.5 and the timestep times 10.
LCM_ORIGINAL_STEPS = 50
LCM_SIGMA_DATA = 0.5
LCM_TIMESTEP_SCALING = 10.0


@dataclass(frozen=True)
class LCMDiscretization(Discretization):
    """webui's LCMCompVisDenoiser, which its LCM sampler puts around the model instead of
    CompVisDenoiser: the sigmas of LCM's 50 timesteps (19, 39, ..., 999), the UNet called at
    the nearest of them (no interpolation), its own `get_sigmas` (n timesteps evenly from 999
    to 19) and the consistency scalings c_out * denoised + c_skip * x on every prediction.
    As in webui, the UNet output is read as eps even for v-prediction models."""

    skip: int = 20
    output_is_eps: ClassVar[bool] = True

    @classmethod
    def of(cls, model: Discretization) -> LCMDiscretization:
        total = len(model.alphas_cumprod)
        skip = total // LCM_ORIGINAL_STEPS
        # webui: alphas_cumprod_valid[49 - x] = alphas_cumprod[999 - x * skip].
        timesteps = (total - 1) - torch.arange(LCM_ORIGINAL_STEPS - 1, -1, -1) * skip
        alphas = model.alphas_cumprod[timesteps]
        sigmas = ((1 - alphas) / alphas) ** 0.5
        return cls(model.alphas_cumprod, sigmas, sigmas.log(), skip)

    def sigma_to_t(self, sigma: torch.Tensor) -> torch.Tensor:
        """The timestep of the nearest grid sigma (in log sigma), an integer."""
        dists = sigma.log() - self.log_sigmas.to(sigma.device)[:, None]
        index = dists.abs().argmin(dim=0).view(sigma.shape)
        return index * self.skip + (self.skip - 1)

    def t_to_sigma(self, t: torch.Tensor) -> torch.Tensor:
        index = ((t - (self.skip - 1)) / self.skip).float()
        return super().t_to_sigma(index.clamp(min=0, max=len(self.sigmas) - 1))

    def get_sigmas(self, n: int) -> torch.Tensor:
        start = float(self.sigma_to_t(torch.tensor(self.sigma_max)))
        end = float(self.sigma_to_t(torch.tensor(self.sigma_min)))
        return append_zero(self.t_to_sigma(torch.linspace(start, end, n)))

    def scale_output(
        self, sigma: torch.Tensor, denoised: torch.Tensor, x: torch.Tensor
    ) -> torch.Tensor:
        scaled = self.sigma_to_t(sigma.cpu()).to(torch.float32) * LCM_TIMESTEP_SCALING
        scaled = scaled.view(-1, 1, 1, 1).to(x.device)
        c_skip = LCM_SIGMA_DATA**2 / (scaled**2 + LCM_SIGMA_DATA**2)
        c_out = scaled / (scaled**2 + LCM_SIGMA_DATA**2) ** 0.5
        return c_out * denoised + c_skip * x


# ---------------------------------------------------------------------------------------------
# Schedule functions: (n, sigma_min, sigma_max, model, family) -> n + 1 sigmas ending in 0.


@dataclass(frozen=True)
class ScheduleArgs:
    n: int
    sigma_min: float
    sigma_max: float
    model: Discretization
    sdxl: bool = False
    rho: float | None = None  # webui opts.rho when it differs from the schedule's default
    beta_alpha: float = BETA_ALPHA  # webui opts.beta_dist_alpha / beta_dist_beta
    beta_beta: float = BETA_BETA


@dataclass(frozen=True)
class ScheduleOptions:
    """webui's options that change a schedule's sigmas; 0 means "the default" as in webui."""

    sigma_min: float = 0.0
    sigma_max: float = 0.0
    rho: float = 0.0
    beta_alpha: float = BETA_ALPHA
    beta_beta: float = BETA_BETA
    old_karras: bool = False  # opts.use_old_karras_scheduler_sigmas: the range 0.1 .. 10


# webui sd_schedulers: the schedules whose function takes rho, and its default there.
DEFAULT_RHO: dict[str, float] = {"karras": 7.0, "polyexponential": 1.0}


def schedule_overrides(
    schedule: str, model: Discretization, options: ScheduleOptions
) -> dict[str, float]:
    """webui get_sigmas: the sigma_min / sigma_max / rho options that apply to `schedule`
    (each only when non-zero and different from the model's value or the schedule's default),
    under the infotext keys webui writes for them."""
    found: dict[str, float] = {}
    if options.sigma_min != 0 and options.sigma_min != model.sigma_min:
        found["Schedule min sigma"] = options.sigma_min
    if options.sigma_max != 0 and options.sigma_max != model.sigma_max:
        found["Schedule max sigma"] = options.sigma_max
    default_rho = DEFAULT_RHO.get(schedule)
    if default_rho is not None and options.rho != 0 and options.rho != default_rho:
        found["Schedule rho"] = options.rho
    return found


def uniform(a: ScheduleArgs) -> torch.Tensor:
    return a.model.get_sigmas(a.n)


def karras(a: ScheduleArgs) -> torch.Tensor:
    rho = 7.0 if a.rho is None else a.rho
    ramp = torch.linspace(0, 1, a.n)
    min_inv_rho = a.sigma_min ** (1 / rho)
    max_inv_rho = a.sigma_max ** (1 / rho)
    return append_zero((max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** rho)


def exponential(a: ScheduleArgs) -> torch.Tensor:
    return append_zero(torch.linspace(math.log(a.sigma_max), math.log(a.sigma_min), a.n).exp())


def polyexponential(a: ScheduleArgs) -> torch.Tensor:
    rho = 1.0 if a.rho is None else a.rho
    ramp = torch.linspace(1, 0, a.n) ** rho
    log_min, log_max = math.log(a.sigma_min), math.log(a.sigma_max)
    return append_zero(torch.exp(ramp * (log_max - log_min) + log_min))


def sgm_uniform(a: ScheduleArgs) -> torch.Tensor:
    start = a.model.sigma_to_t(torch.tensor(a.sigma_max))
    end = a.model.sigma_to_t(torch.tensor(a.sigma_min))
    sigs = [float(a.model.t_to_sigma(ts)) for ts in torch.linspace(start, end, a.n + 1)[:-1]]
    return torch.tensor([*sigs, 0.0], dtype=torch.float32)


def kl_optimal(a: ScheduleArgs) -> torch.Tensor:
    alpha_min = torch.arctan(torch.tensor(a.sigma_min))
    alpha_max = torch.arctan(torch.tensor(a.sigma_max))
    idx = torch.arange(a.n + 1)
    return torch.tan(idx / a.n * alpha_min + (1.0 - idx / a.n) * alpha_max)


def align_your_steps(a: ScheduleArgs) -> torch.Tensor:
    table = list(AYS_SDXL if a.sdxl else AYS_SD1)
    if a.n == len(table):
        return torch.tensor([*table, 0.0], dtype=torch.float32)
    # Log-linear interpolation of the table to n points (NVIDIA's published recipe).
    xs = np.linspace(0, 1, len(table))
    ys = np.log(table[::-1])
    new_ys = np.interp(np.linspace(0, 1, a.n), xs, ys)
    values = np.exp(new_ys)[::-1].copy()
    return torch.tensor(np.append(values, [0.0]), dtype=torch.float32)


def simple(a: ScheduleArgs) -> torch.Tensor:
    sigmas = a.model.sigmas
    ss = len(sigmas) / a.n
    sigs = [float(sigmas[-(1 + int(x * ss))]) for x in range(a.n)]
    return torch.tensor([*sigs, 0.0], dtype=torch.float32)


def normal(a: ScheduleArgs) -> torch.Tensor:
    start = a.model.sigma_to_t(torch.tensor(a.sigma_max))
    end = a.model.sigma_to_t(torch.tensor(a.sigma_min))
    sigs = [float(a.model.t_to_sigma(ts)) for ts in torch.linspace(start, end, a.n)]
    return torch.tensor([*sigs, 0.0], dtype=torch.float32)


def ddim(a: ScheduleArgs) -> torch.Tensor:
    sigmas = a.model.sigmas
    ss = max(len(sigmas) // a.n, 1)
    sigs = [float(sigmas[x]) for x in range(1, len(sigmas), ss)]
    return torch.tensor([*sigs[::-1], 0.0], dtype=torch.float32)


def beta(a: ScheduleArgs) -> torch.Tensor:
    from scipy import stats

    timesteps = 1 - np.linspace(0, 1, a.n)
    points = [stats.beta.ppf(x, a.beta_alpha, a.beta_beta) for x in timesteps]
    sigs = [a.sigma_min + (x * (a.sigma_max - a.sigma_min)) for x in points]
    return torch.tensor([*sigs, 0.0], dtype=torch.float32)


ScheduleFn = Callable[[ScheduleArgs], torch.Tensor]

FUNCTIONS: dict[str, ScheduleFn] = {
    "uniform": uniform,
    "karras": karras,
    "exponential": exponential,
    "polyexponential": polyexponential,
    "sgm_uniform": sgm_uniform,
    "kl_optimal": kl_optimal,
    "align_your_steps": align_your_steps,
    "simple": simple,
    "normal": normal,
    "ddim": ddim,
    "beta": beta,
}


def sigmas_for(
    schedule: str | None,
    steps: int,
    model: Discretization,
    *,
    discard_penultimate: bool = False,
    sdxl: bool = False,
    options: ScheduleOptions | None = None,
) -> torch.Tensor:
    """webui KDiffusionSampler.get_sigmas: the schedule's n + 1 sigmas (float32, CPU).

    `schedule` None is "Automatic" for a sampler without a default: the model's own
    `get_sigmas` (webui applies no option there). Samplers that discard the next-to-last sigma
    ask for one step more. `options`: webui's sigma_min / sigma_max / rho / beta options."""
    n = steps + 1 if discard_penultimate else steps
    if schedule is None:
        sigmas = model.get_sigmas(n)
    else:
        o = options or ScheduleOptions()
        over = schedule_overrides(schedule, model, o)
        # webui: the old range replaces the model's, then the sigma options override it.
        low, high = (0.1, 10.0) if o.old_karras else (model.sigma_min, model.sigma_max)
        args = ScheduleArgs(
            n,
            over.get("Schedule min sigma", low),
            over.get("Schedule max sigma", high),
            model,
            sdxl,
            rho=over.get("Schedule rho"),
            beta_alpha=o.beta_alpha,
            beta_beta=o.beta_beta,
        )
        sigmas = FUNCTIONS[schedule](args).to(torch.float32)
    if discard_penultimate:
        sigmas = torch.cat([sigmas[:-2], sigmas[-1:]])
    return sigmas


def timestep_grid(steps: int) -> torch.Tensor:
    """webui CompVisSampler.get_timesteps: range(0, 1000, 1000 // steps) + 1, clipped."""
    return torch.clip(torch.arange(0, 1000, 1000 // steps) + 1, 0, 999)
