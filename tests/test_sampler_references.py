"""UniPC, LCM, Restart and DDIM CFG++ against references that share no code with the engine.

tests/test_kdiffusion_reference.py checks the k-diffusion samplers against the published
k-diffusion package and DDIM/PLMS against diffusers' schedulers. The four samplers here are
webui's own (webui 1.10.1: modules/models/diffusion/uni_pc, sd_samplers_lcm.py,
sd_samplers_extra.py, sd_samplers_timesteps_impl.py); each reference is another project's
implementation of the same mathematics, driven the way webui drives it:

- UniPC: diffusers' UniPCMultistepScheduler (bh1 or bh2, order 3, data prediction, lower-order
  final steps) on the step counts where webui's time-uniform grid is integer timesteps, and
  on an img2img window.
- LCM: diffusers' LCMScheduler on webui's LCM timesteps, with webui's per-image noise; for
  other step counts and schedule types k-diffusion's DiscreteEpsDDPMDenoiser over LCM's 50
  timesteps with diffusers' LCM boundary scalings.
- Restart: k-diffusion's own get_sigmas_karras and sample_heun, composed with the restart
  schedule of webui's restart_sampler (written here from its description).
- DDIM CFG++: diffusers' DDIMScheduler.step with its inputs arranged so that its update is the
  CFG++ paper's x_prev = sqrt(a_prev) x0(eps_cfg) + sqrt(1 - a_prev - s^2) eps_uncond + s z.

The same tiny SD1 UNet, conditioning, initial noise and per-image generators go into both; the
final latents must agree to a relative error of 1e-4 (`TOLERANCE`).
"""

from __future__ import annotations

import itertools
from typing import Any

import pytest
import torch

from engine.errors import RequestError
from engine.kdiffusion import sample_unipc
from engine.loading import LoadedCheckpoint
from engine.runner import SamplerPass, run_pass
from engine.samplers import resolve_sampler
from engine.sampling import CFGDenoiser, CondPart, Stage, StepConditioning, UNetExtras
from engine.schedules import Discretization, LCMDiscretization
from tests.test_kdiffusion_reference import (
    CFG,
    SEEDS,
    _CompVisModel,
    _import_k_diffusion,
    _ldm_alphas_cumprod,
    _start_noise,
)

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def sd1(engine: Any) -> LoadedCheckpoint:
    from tests.helpers import SD1

    return next(v for k, v in engine.models.cache.loaded.items() if k.startswith(SD1))


@pytest.fixture(scope="module")
def sd2(engine: Any) -> LoadedCheckpoint:
    """The tiny v-prediction model."""
    from tests.helpers import SD2

    return next(v for k, v in engine.models.cache.loaded.items() if k.startswith(SD2))


def _conds_for(model: LoadedCheckpoint) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(3)
    dim = model.pipe.unet.config.cross_attention_dim
    return torch.randn(2, 77, dim, generator=gen), torch.randn(2, 77, dim, generator=gen)


@pytest.fixture(scope="module")
def conds(sd1: LoadedCheckpoint) -> tuple[torch.Tensor, torch.Tensor]:
    return _conds_for(sd1)


def _generators() -> list[torch.Generator]:
    return [torch.Generator().manual_seed(s) for s in SEEDS]


def _draw(generators: list[torch.Generator], like: torch.Tensor) -> torch.Tensor:
    """webui's ImageRNG.next: one draw per image from its own generator."""
    return torch.stack([torch.randn(like.shape[1:], generator=g) for g in generators])


def _relative_error(ours: torch.Tensor, reference: torch.Tensor) -> float:
    assert torch.isfinite(reference).all() and torch.isfinite(ours).all()
    return float((ours - reference).norm() / reference.norm())


def _denoiser(sd1: LoadedCheckpoint, conds: Any, calls: int) -> CFGDenoiser:
    cond, uncond = conds
    stage = Stage(
        unet=sd1.pipe.unet,
        schedule=lambda i: StepConditioning(CondPart(uncond), (CondPart(cond),)),
        discretization=Discretization.from_config(sd1.scheduler_config),
        prediction_type=sd1.prediction_type,
    )
    return CFGDenoiser([stage], CFG, calls)


def _engine(
    sd1: LoadedCheckpoint,
    conds: Any,
    sampler: str,
    schedule: str,
    steps: int,
    eta: float | None = None,
) -> torch.Tensor:
    """Our sampler through the engine's own pass runner (schedule, noise and wiring included)."""
    choice = resolve_sampler(sampler, None, schedule)
    spec = SamplerPass(choice, steps, steps, eta=eta)
    with torch.no_grad():
        return run_pass(
            spec,
            _denoiser(sd1, conds, spec.model_calls),
            _start_noise(),
            _generators(),
            SEEDS,
            "cpu",
        )


def _unet_eps(
    sd1: LoadedCheckpoint, conds: Any, x: torch.Tensor, t: Any
) -> tuple[torch.Tensor, torch.Tensor]:
    """The conditional and unconditional UNet outputs at timestep t (one batch): eps, or v
    for a v-prediction model."""
    cond, uncond = conds
    timesteps = torch.as_tensor(t).reshape(-1).expand(2 * x.shape[0])
    out = sd1.pipe.unet(
        torch.cat([x, x]), timesteps, encoder_hidden_states=torch.cat([cond, uncond])
    ).sample
    eps_cond, eps_uncond = out.chunk(2)
    return eps_cond, eps_uncond


def _cfg(eps_cond: torch.Tensor, eps_uncond: torch.Tensor, scale: float) -> torch.Tensor:
    return eps_uncond + (eps_cond - eps_uncond) * scale


def _ldm_config(sd1: LoadedCheckpoint, prediction_type: str | None = None) -> dict[str, Any]:
    """The model's scheduler config for diffusers' schedulers."""
    return {**sd1.scheduler_config, "prediction_type": prediction_type or sd1.prediction_type}


def _as_eps(output: torch.Tensor, x: torch.Tensor, a_t: torch.Tensor, v: bool) -> torch.Tensor:
    """A v prediction as the eps it implies (v = sqrt(a) eps - sqrt(1 - a) x0)."""
    return a_t.sqrt() * output + (1 - a_t).sqrt() * x if v else output


# --------------------------------------------------------------------------------------------
# UniPC. webui (sd_samplers_timesteps_impl.unipc) runs its UniPC port in data-prediction mode
# over NoiseScheduleVP("discrete"), from continuous time 1 to 1/1000 in `steps` equal steps
# (uni_pc_skip_type "time_uniform"), calling the UNet at (t - 1/1000) * 1000: the timesteps
# linspace(999, 0, steps + 1). Where 999 / steps is an integer (3, 9, 27, 37, ...) those are
# integer timesteps, log-alpha is read exactly at its knots, and the grid is diffusers' own
# "linspace" spacing (999 ... 999/steps) with the last step to timestep 0's alpha
# (final_sigmas_type "sigma_min"). Other step counts evaluate the UNet at fractional
# timesteps with interpolated log-alpha, which diffusers cannot express; they are not compared.
# webui's options: uni_pc_variant "bh1", uni_pc_order 3, uni_pc_lower_order_final True (in
# webui without diffusers' "fewer than 15 steps" remark: diffusers 0.42 applies it at any count).


def _unipc_reference(sd1: LoadedCheckpoint, conds: Any, steps: int, variant: str) -> Any:
    from diffusers import UniPCMultistepScheduler

    scheduler = UniPCMultistepScheduler.from_config(
        _ldm_config(sd1),
        solver_order=3,
        solver_type=variant,
        predict_x0=True,
        lower_order_final=True,
        timestep_spacing="linspace",
        final_sigmas_type="sigma_min",
        thresholding=False,
        use_karras_sigmas=False,
    )
    # ldm's alphas_cumprod (float64 cumprod, stored float32), as webui's NoiseScheduleVP reads
    # them, instead of diffusers' float32 cumprod (which differs in the 6th digit at t=999).
    scheduler.alphas_cumprod = _ldm_alphas_cumprod()
    scheduler.set_timesteps(steps)
    expected = [round(999 - i * 999 / steps) for i in range(steps)]
    assert scheduler.timesteps.tolist() == expected
    x = _start_noise()
    with torch.no_grad():
        for t in scheduler.timesteps:
            eps = _cfg(*_unet_eps(sd1, conds, x, t), CFG)
            x = scheduler.step(eps, t, x).prev_sample
    return x


def _webui_unipc_steps(steps: int) -> int:
    """webui hands UniPC `steps=len(timesteps)` of the DDIM grid range(0, 1000, 1000 // steps):
    one step more than asked unless 1000 is a multiple of `steps` (9 -> 10, 26 -> 27)."""
    return len(range(0, 1000, 1000 // steps))


def test_unipc_through_the_engine_matches_diffusers_unipc(
    sd1: LoadedCheckpoint, conds: Any
) -> None:
    """A request for 26 steps: webui runs 27 UniPC steps, 999 / 27 = 37 apart."""
    steps = 26
    unipc_steps = _webui_unipc_steps(steps)
    assert 999 % unipc_steps == 0
    reference = _unipc_reference(sd1, conds, unipc_steps, "bh1")
    ours = _engine(sd1, conds, "UniPC", "automatic", steps)
    error = _relative_error(ours, reference)
    assert error <= TOLERANCE, f"UniPC {steps} steps: relative error {error:.2e}"


@pytest.mark.parametrize(("variant", "steps"), [("bh1", 3), ("bh1", 9), ("bh2", 9)])
def test_unipc_function_matches_diffusers_unipc(
    sd1: LoadedCheckpoint, conds: Any, variant: str, steps: int
) -> None:
    """The engine's UniPC function at UniPC step counts no request produces (3: warm-up and
    lower-order final only; 9), and webui's other B(h), uni_pc_variant "bh2" (the API has no
    setting for it; the function takes it)."""
    reference = _unipc_reference(sd1, conds, steps, variant)
    denoiser = _denoiser(sd1, conds, steps)
    alphas = denoiser.stage.discretization.alphas_cumprod
    with torch.no_grad():
        ours = sample_unipc(denoiser.eps, _start_noise(), alphas, steps, variant=variant)
    error = _relative_error(ours, reference)
    assert error <= TOLERANCE, f"UniPC {variant} {steps} steps: relative error {error:.2e}"
    other = _unipc_reference(sd1, conds, steps, "bh2" if variant == "bh1" else "bh1")
    assert _relative_error(other, reference) > 1e-3  # the variants differ measurably


def test_unipc_img2img_window_matches_diffusers_unipc(sd1: LoadedCheckpoint, conds: Any) -> None:
    """img2img, 10 steps, 3 of them run: webui noises the init latent to the alpha of grid
    timestep 301 (timesteps[t_enc]) and starts UniPC at continuous time 201 / 1000 + 1 / 1000
    (timesteps[t_enc - 1], its "likely off by a bit"), 3 steps down to 1 / 1000: the UNet at
    201, 134, 67. diffusers' scheduler is given that grid (timesteps and the matching sigmas)
    after its own set_timesteps; its step arithmetic is unchanged."""
    from diffusers import UniPCMultistepScheduler

    init = torch.randn(_start_noise().shape, generator=torch.Generator().manual_seed(7))
    alphas = _ldm_alphas_cumprod()
    a_start = alphas[301]
    x = init * a_start.sqrt() + _start_noise() * (1 - a_start).sqrt()
    scheduler = UniPCMultistepScheduler.from_config(
        _ldm_config(sd1),
        solver_order=3,
        solver_type="bh1",
        predict_x0=True,
        lower_order_final=True,
        final_sigmas_type="sigma_min",
    )
    scheduler.alphas_cumprod = alphas
    scheduler.set_timesteps(3)
    window = torch.tensor([201, 134, 67])
    sigmas = ((1 - alphas[[*window.tolist(), 0]]) / alphas[[*window.tolist(), 0]]) ** 0.5
    scheduler.timesteps, scheduler.sigmas = window, sigmas
    with torch.no_grad():
        for t in scheduler.timesteps:
            eps = _cfg(*_unet_eps(sd1, conds, x, t), CFG)
            x = scheduler.step(eps, t, x).prev_sample
    reference = x

    spec = SamplerPass(resolve_sampler("UniPC", None, "automatic"), 10, 3, img2img=True)
    denoiser = _denoiser(sd1, conds, spec.model_calls)
    with torch.no_grad():
        ours = run_pass(spec, denoiser, _start_noise(), _generators(), SEEDS, "cpu", init)
    error = _relative_error(ours, reference)
    assert error <= TOLERANCE, f"UniPC img2img: relative error {error:.2e}"


@pytest.mark.parametrize("steps", [8, 9])
def test_unipc_runs_as_many_steps_as_webuis_timestep_grid(
    sd1: LoadedCheckpoint, conds: Any, steps: int
) -> None:
    """One model call per UniPC step (the first evaluation, then one after each step but the
    last): 8 steps -> 8 calls, 9 -> 10."""
    choice = resolve_sampler("UniPC", None, "automatic")
    spec = SamplerPass(choice, steps, steps)
    denoiser = _denoiser(sd1, conds, spec.model_calls)
    with torch.no_grad():
        run_pass(spec, denoiser, _start_noise(), _generators(), SEEDS, "cpu")
    assert denoiser.calls == _webui_unipc_steps(steps)


# --------------------------------------------------------------------------------------------
# DDIM CFG++. webui's ddim_cfgpp is DDIM with the CFG scale divided by 12.5, x0 from the
# guided eps and the direction (and the eta noise) from the unconditional eps. diffusers has
# no CFG++, but its DDIMScheduler.step(eps, t, sample) computes x0 = (sample - sqrt(1-a) eps)
# / sqrt(a) and returns sqrt(a_prev) x0 + sqrt(1 - a_prev - s^2) eps + s z. Given eps_uncond
# and the shifted sample x - sqrt(1-a) (eps_cfg - eps_uncond), its x0 is exactly x0(eps_cfg)
# and its direction eps_uncond: the CFG++ update, with diffusers' alphas, eta variance and
# final alpha. Nothing of the engine's DDIM code is used.

STEPS = 6
WEBUI_GRID = [t + 1 for t in range(0, 1000, 1000 // STEPS)][::-1][:-1]  # 997 ... 167


def _ddim_cfgpp_reference(sd1: LoadedCheckpoint, conds: Any, eta: float) -> Any:
    from diffusers import DDIMScheduler

    config = {**_ldm_config(sd1, "epsilon"), "set_alpha_to_one": False, "steps_offset": 1}
    scheduler = DDIMScheduler.from_config(config, timestep_spacing="leading")
    scheduler.set_timesteps(STEPS)
    # Its step goes from t to t - 1000 // steps (the last to timestep 1's alpha, webui's
    # alphas_prev[0]), so it runs webui's grid once `t` walks it.
    assert 1000 // scheduler.num_inference_steps == WEBUI_GRID[0] - WEBUI_GRID[1]
    generators = _generators()
    x = _start_noise()
    with torch.no_grad():
        for t in WEBUI_GRID:
            a_t = scheduler.alphas_cumprod[t]
            v = sd1.prediction_type == "v_prediction"
            eps_cond, eps_uncond = (_as_eps(o, x, a_t, v) for o in _unet_eps(sd1, conds, x, t))
            eps_cfg = _cfg(eps_cond, eps_uncond, CFG / 12.5)
            shifted = x - (1 - a_t).sqrt() * (eps_cfg - eps_uncond)
            noise = _draw(generators, x)
            out = scheduler.step(eps_uncond, t, shifted, eta=eta, variance_noise=noise)
            x = out.prev_sample
    return x


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_ddim_cfgpp_matches_diffusers_ddim_step(
    sd1: LoadedCheckpoint, conds: Any, eta: float
) -> None:
    reference = _ddim_cfgpp_reference(sd1, conds, eta)
    ours = _engine(sd1, conds, "DDIM CFG++", "automatic", STEPS, eta=eta)
    error = _relative_error(ours, reference)
    assert error <= TOLERANCE, f"DDIM CFG++ eta {eta}: relative error {error:.2e}"
    plain = _engine(sd1, conds, "DDIM", "automatic", STEPS, eta=eta)
    assert _relative_error(plain, reference) > 1e-2  # CFG++ is not DDIM


# --------------------------------------------------------------------------------------------
# Restart (webui sd_samplers_extra.restart_sampler, automatic restart list). Under 20 steps it
# is Heun over the given sigmas. From 20 steps it replaces them with a Karras schedule of
# `steps - restart_steps * restart_times` steps between the given schedule's last non-zero and
# first sigma (restart_steps 9 and one restart; from 36 steps steps // 4 and two), and once the
# schedule passes the sigma nearest 0.1 it jumps back up to the sigma nearest 2 (adding noise
# sqrt(high^2 - low^2), one per-image draw) and runs a Karras schedule of restart_steps + 1
# sigmas down to it again, zero dropped, restart_times times. Every step is a Heun step (Euler
# onto sigma 0), which is k-diffusion's sample_heun without churn over each descending run.
# From 20 steps only the given schedule's end points matter: Karras, Exponential, Uniform and
# Polyexponential all give the same picture.


def _karras(kd: Any, n: int, lo: float, hi: float) -> torch.Tensor:
    return kd.sampling.get_sigmas_karras(n, lo, hi)


def _restart_segments(kd: Any, sigmas: torch.Tensor) -> list[torch.Tensor]:
    """The descending runs of sigmas restart sampling steps through, in order."""
    steps = len(sigmas) - 1
    if steps < 20:
        return [sigmas]
    restart_steps, times = (steps // 4, 2) if steps >= 36 else (9, 1)
    main = _karras(kd, steps - restart_steps * times, float(sigmas[-2]), float(sigmas[0]))
    low = int((main - 0.1).abs().argmin())
    high = int((main - 2.0).abs().argmin())
    restart = _karras(kd, restart_steps + 1, float(main[low]), float(main[high]))[:-1]
    return [main[: low + 1], *[restart] * times, main[low:]]


def _restart_reference(kd: Any, sd1: LoadedCheckpoint, conds: Any, sigmas: torch.Tensor) -> Any:
    cond, uncond = conds
    wrapper = {"epsilon": kd.external.CompVisDenoiser, "v_prediction": kd.external.CompVisVDenoiser}
    denoiser = wrapper[sd1.prediction_type](_CompVisModel(sd1.pipe.unet), quantize=False)

    def cfg(x: torch.Tensor, sigma: torch.Tensor, **_: Any) -> torch.Tensor:
        out = denoiser(torch.cat([x, x]), torch.cat([sigma, sigma]), cond=torch.cat([cond, uncond]))
        denoised_cond, denoised_uncond = out.chunk(2)
        return denoised_uncond + (denoised_cond - denoised_uncond) * CFG

    generators = _generators()
    x = _start_noise() * sigmas[0]
    last = None
    with torch.no_grad():
        for run in _restart_segments(kd, sigmas):
            if last is not None and run[0] > last:
                x = x + _draw(generators, x) * (run[0] ** 2 - last**2) ** 0.5
            # sample_heun draws (unused) churn noise with torch.randn_like: k_diffusion's own
            # torch here, so the per-image generators only feed restart noise, as in webui.
            x = kd.sampling.sample_heun(cfg, x, run, disable=True)
            last = run[-1]
    return x


@pytest.mark.parametrize(
    ("schedule", "steps"),
    [("karras", 6), ("exponential", 6), ("karras", 20), ("karras", 36), ("ddim", 20)],
)
def test_restart_matches_k_diffusion_heun_with_restarts(
    sd1: LoadedCheckpoint, conds: Any, schedule: str, steps: int
) -> None:
    """The DDIM schedule (webui sd_schedulers.ddim_scheduler: every (1000 // n)-th model sigma from
    index 1, descending) neither starts at sigma_max nor ends at sigma_min: from 20 steps the
    restart schedule must take its ends from the given schedule, not from the model."""
    kd = _import_k_diffusion()
    compvis = kd.external.CompVisDenoiser(_CompVisModel(sd1.pipe.unet), quantize=False)
    lo, hi = float(compvis.sigmas[0]), float(compvis.sigmas[-1])
    sigmas = {
        "karras": lambda: kd.sampling.get_sigmas_karras(steps, lo, hi),
        "exponential": lambda: kd.sampling.get_sigmas_exponential(steps, lo, hi),
        "ddim": lambda: kd.sampling.append_zero(compvis.sigmas[1 :: 1000 // steps].flip(0)),
    }[schedule]()
    reference = _restart_reference(kd, sd1, conds, sigmas)
    ours = _engine(sd1, conds, "Restart", schedule, steps)
    error = _relative_error(ours, reference)
    assert error <= TOLERANCE, f"Restart {schedule} {steps} steps: relative error {error:.2e}"


# --------------------------------------------------------------------------------------------
# LCM (webui sd_samplers_lcm). webui wraps the model in LCMCompVisDenoiser: the 50 timesteps
# 19, 39, ..., 999 of LCM's original schedule, the UNet at the nearest of them, and LCM's
# boundary scalings (sigma_data 0.5, timestep x 10); "Automatic" is its get_sigmas(n), n
# timesteps evenly from 999 to 19. Each step is x = denoised, plus sigma_next times one
# per-image draw except after the last. With n - 1 dividing 49 (n = 2, 8, 50) every sigma is a
# grid sigma and this is diffusers' LCMScheduler on the custom timesteps below (VP sample =
# VE sample / sqrt(1 + sigma^2); webui applies c_skip to the VE sample, diffusers to the VP
# one: c_skip <= 6.9e-6 and the two samples differ by about 1% at timestep 19, so the
# predictions differ by about 1e-7 of the sample).


def _lcm_grid(steps: int) -> list[int]:
    return [round(999 - i * 980 / (steps - 1)) for i in range(steps)]


def _lcm_reference(sd1: LoadedCheckpoint, conds: Any, steps: int) -> Any:
    from diffusers import LCMScheduler

    scheduler = LCMScheduler.from_config(
        _ldm_config(sd1, "epsilon"), original_inference_steps=50, timestep_scaling=10.0
    )
    scheduler.alphas_cumprod = _ldm_alphas_cumprod()
    grid = _lcm_grid(steps)
    scheduler.set_timesteps(timesteps=grid)
    a_top = scheduler.alphas_cumprod[grid[0]]
    # webui starts from noise * sigma_max in sigma space: that is noise * sqrt(1 - a) as VP.
    x = _start_noise() * (1 - a_top).sqrt()
    generators = _generators()
    with torch.no_grad():
        for t in scheduler.timesteps:
            eps = _cfg(*_unet_eps(sd1, conds, x, t), CFG)
            x = scheduler.step(eps, t, x, generator=generators).prev_sample
    return x


@pytest.mark.parametrize("steps", [2, 8])
def test_lcm_matches_diffusers_lcm_scheduler(sd1: LoadedCheckpoint, conds: Any, steps: int) -> None:
    reference = _lcm_reference(sd1, conds, steps)
    ours = _engine(sd1, conds, "LCM", "automatic", steps)
    error = _relative_error(ours, reference)
    assert error <= TOLERANCE, f"LCM {steps} steps: relative error {error:.2e}"


# Other step counts interpolate sigma between grid points (the UNet still sees the nearest grid
# timestep) and other schedule types space the sigmas freely; diffusers cannot express either.
# There the reference is k-diffusion's DiscreteEpsDDPMDenoiser over the alphas_cumprod of the
# 50 LCM timesteps (taken from diffusers' LCMScheduler), quantized (the nearest grid timestep;
# its get_sigmas, sigma_min/max and t_to_sigma are webui's LCM schedule), followed by diffusers'
# LCM boundary scalings at that timestep.


class _LCMGridModel(torch.nn.Module):
    """What DiscreteEpsDDPMDenoiser wraps: eps at grid index i, i.e. at LCM timestep grid[i]."""

    def __init__(self, unet: Any, grid: torch.Tensor):
        super().__init__()
        self.unet, self.grid = unet, grid

    def forward(self, x: torch.Tensor, index: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        return self.unet(x, self.grid[index], encoder_hidden_states=cond).sample


def _lcm_kdiffusion_reference(
    kd: Any, sd1: LoadedCheckpoint, conds: Any, schedule: str, steps: int
) -> Any:
    from diffusers import LCMScheduler

    cond, uncond = conds
    scheduler = LCMScheduler.from_config(
        _ldm_config(sd1, "epsilon"), original_inference_steps=50, timestep_scaling=10.0
    )
    scheduler.set_timesteps(50)
    grid = scheduler.timesteps.flip(0)  # 19, 39, ..., 999
    alphas = _ldm_alphas_cumprod()[grid]
    denoiser = kd.external.DiscreteEpsDDPMDenoiser(
        _LCMGridModel(sd1.pipe.unet, grid), alphas, quantize=True
    )

    def cfg(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        both = torch.cat([cond, uncond])
        out = denoiser(torch.cat([x, x]), torch.cat([sigma, sigma]), cond=both)
        denoised_cond, denoised_uncond = out.chunk(2)
        denoised = denoised_uncond + (denoised_cond - denoised_uncond) * CFG
        timestep = grid[denoiser.sigma_to_t(sigma)]
        c_skip, c_out = scheduler.get_scalings_for_boundary_condition_discrete(timestep)
        return c_out.view(-1, 1, 1, 1) * denoised + c_skip.view(-1, 1, 1, 1) * x

    lo, hi = float(denoiser.sigma_min), float(denoiser.sigma_max)
    sigmas = {
        "uniform": lambda: denoiser.get_sigmas(steps),
        "karras": lambda: kd.sampling.get_sigmas_karras(steps, lo, hi),
        "exponential": lambda: kd.sampling.get_sigmas_exponential(steps, lo, hi),
        "polyexponential": lambda: kd.sampling.get_sigmas_polyexponential(steps, lo, hi),
    }[schedule]()
    generators = _generators()
    x = _start_noise() * sigmas[0]
    ones = x.new_ones([x.shape[0]])
    with torch.no_grad():
        for sigma, sigma_next in itertools.pairwise(sigmas):
            x = cfg(x, sigma * ones)
            if sigma_next > 0:
                x = x + sigma_next * _draw(generators, x)
    return x


@pytest.mark.parametrize(
    ("schedule", "steps"),
    [("uniform", 4), ("uniform", 8), ("karras", 4), ("exponential", 5), ("polyexponential", 4)],
)
def test_lcm_matches_k_diffusion_over_lcm_timesteps(
    sd1: LoadedCheckpoint, conds: Any, schedule: str, steps: int
) -> None:
    """LCM's "Automatic" is "uniform" (webui: the wrapper's own get_sigmas)."""
    reference = _lcm_kdiffusion_reference(_import_k_diffusion(), sd1, conds, schedule, steps)
    ours = _engine(sd1, conds, "LCM", schedule, steps)
    error = _relative_error(ours, reference)
    assert error <= TOLERANCE, f"LCM {schedule} {steps} steps: relative error {error:.2e}"


def test_lcm_wrapper_is_lcms_50_timesteps(sd1: LoadedCheckpoint, conds: Any) -> None:
    """The engine's LCM wrapper against diffusers' LCM timesteps: its sigmas are theirs, the
    UNet only ever sees them, and an 8-step "Automatic" schedule is every seventh of them."""
    from diffusers import LCMScheduler

    scheduler = LCMScheduler.from_config(_ldm_config(sd1, "epsilon"), original_inference_steps=50)
    scheduler.set_timesteps(50)
    grid = scheduler.timesteps.flip(0)
    alphas = _ldm_alphas_cumprod()[grid]
    lcm = LCMDiscretization.of(Discretization.from_config(sd1.scheduler_config))
    torch.testing.assert_close(lcm.sigmas, ((1 - alphas) / alphas) ** 0.5, rtol=1e-6, atol=0)
    assert lcm.sigma_to_t(lcm.sigmas * 1.01).tolist() == grid.tolist()
    assert lcm.sigma_to_t(lcm.get_sigmas(8)[:-1]).tolist() == _lcm_grid(8)
    torch.testing.assert_close(lcm.get_sigmas(8)[:-1], lcm.sigmas[list(range(49, -1, -7))])

    seen: list[int] = []

    def spy(batch: Any, t: Any, kwargs: Any, info: Any) -> UNetExtras:
        seen.append(int(t[0]))
        return UNetExtras()

    cond, uncond = conds
    stage = Stage(
        unet=sd1.pipe.unet,
        schedule=lambda i: StepConditioning(CondPart(uncond), (CondPart(cond),)),
        discretization=Discretization.from_config(sd1.scheduler_config),
        hooks=(spy,),
    )
    spec = SamplerPass(resolve_sampler("LCM", None, "karras"), 5, 5)
    with torch.no_grad():
        run_pass(spec, CFGDenoiser([stage], CFG, 5), _start_noise(), _generators(), SEEDS, "cpu")
    assert len(seen) == 5 and set(seen) <= set(grid.tolist())
    assert seen[0] == 999 and seen[-1] == 19  # Karras between LCM's own sigma_max and min


# --------------------------------------------------------------------------------------------
# The tiny v-prediction model (SD 2.x): webui's timestep samplers convert v to eps
# (CompVisTimestepsVDenoiser), k-diffusion samplers use CompVisVDenoiser, and LCM reads the
# output as eps whatever the model predicts (LCMCompVisDenoiser subclasses the eps wrapper).
# The references: diffusers' UniPC in v mode, DDIM CFG++ as above on eps = sqrt(a) v +
# sqrt(1 - a) x, k-diffusion's CompVisVDenoiser under Restart, LCM's eps-reading reference.


@pytest.mark.parametrize("sampler", ["UniPC", "DDIM CFG++", "Restart", "LCM"])
def test_v_prediction_model_matches_the_references(sd2: LoadedCheckpoint, sampler: str) -> None:
    assert sd2.prediction_type == "v_prediction"
    conds = _conds_for(sd2)
    kd = _import_k_diffusion()
    if sampler == "UniPC":
        reference = _unipc_reference(sd2, conds, 27, "bh1")
        ours = _engine(sd2, conds, sampler, "automatic", 26)
    elif sampler == "DDIM CFG++":
        reference = _ddim_cfgpp_reference(sd2, conds, 1.0)
        ours = _engine(sd2, conds, sampler, "automatic", STEPS, eta=1.0)
    elif sampler == "Restart":
        lo, hi = (
            float(s) for s in Discretization.from_config(sd2.scheduler_config).sigmas[[0, -1]]
        )
        reference = _restart_reference(kd, sd2, conds, kd.sampling.get_sigmas_karras(6, lo, hi))
        ours = _engine(sd2, conds, sampler, "karras", 6)
    else:
        reference = _lcm_kdiffusion_reference(kd, sd2, conds, "uniform", 4)
        ours = _engine(sd2, conds, sampler, "uniform", 4)
    error = _relative_error(ours, reference)
    assert error <= TOLERANCE, f"{sampler} (v-prediction): relative error {error:.2e}"


def test_unipc_needs_as_many_steps_as_its_order(sd1: LoadedCheckpoint, conds: Any) -> None:
    with pytest.raises(RequestError, match="UniPC"):
        _engine(sd1, conds, "UniPC", "automatic", 2)
