"""webui's remaining schedule types against references that share no code with engine/schedules.py.

tests/test_kdiffusion_reference.py checks Automatic/Uniform, Karras, Exponential and
Polyexponential against k-diffusion's own `get_sigmas_*`. The other schedule types webui 1.10
offers (modules/sd_schedulers.py) have no package implementation of webui's exact variant
installed here (ComfyUI has some, but is not installable, and its KL Optimal and Beta differ
from webui's: see below), so each reference is one of:

- SGM Uniform, Normal, Simple, DDIM: the published definition over k-diffusion 0.1.1's
  `CompVisDenoiser` (its `sigmas`, `sigma_to_t`, `t_to_sigma`: the timestep <-> sigma mapping
  these schedules are defined on), built with numpy from the definition, not from our code.
  SGM Uniform: n + 1 timesteps evenly from sigma_max's to sigma_min's, the last dropped.
  Normal: n of them, both ends kept. Simple: every (1000 / n)-th training sigma from the
  top (the offsets floored in float64 as webui does, see ref_simple). DDIM: the training
  sigmas at timesteps 1, 1 + 1000 // n, ... (webui keeps every one below 1000, which is
  n + 1 of them when 1000 // n * n + 1 < 1000: 12 steps for 11, 8 for 7; ComfyUI's
  ddim_uniform does the same).
- KL Optimal: the closed form of the KL-optimal schedule (Sabour et al., "Align Your Steps",
  2024, appendix), sigma(t) = tan((1 - t) atan(sigma_max) + t atan(sigma_min)) at t = i / n,
  i = 0..n, in float64. As in webui, the last of the n + 1 sigmas is sigma_min, not zero
  (ComfyUI's kl_optimal_scheduler puts n points from sigma_max to sigma_min and then 0: a
  different schedule).
- Beta: diffusers 0.42's EulerDiscreteScheduler with `use_beta_sigmas=True` (Lee et al.,
  "Beta Sampling is All You Need", alpha = beta = 0.6, webui's beta_dist_alpha/beta
  defaults), given the model's sigma_min / sigma_max as webui passes them (with its default
  config diffusers takes the ends of its timestep grid: the same except with 1 step).
  ComfyUI's beta_scheduler instead maps the ppf onto rounded training timesteps: a different
  schedule.
- Align Your Steps: the NVIDIA tables as diffusers ships them (`AysSchedules`, whose last
  entry is 0 where NVIDIA's table ends at 0.029, the model's sigma_min to three places),
  interpolated for other step counts log-linearly with scipy's interp1d (webui's and NVIDIA's
  loglinear_interp use np.interp over the ascending table). With 1 step that gives the lowest
  sigma only, [0.029, 0], as webui does.

Every schedule is compared through `sigmas_for`, which run_pass uses, at several step counts,
over the model's CompVisDenoiser and over the LCM sampler's 50-sigma wrapper (k-diffusion's
DiscreteSchedule over those sigmas, quantized), which webui's schedule functions also accept;
then one Euler run per schedule (k-diffusion's sample_euler over the reference sigmas and
CompVisDenoiser, against the engine's run_pass) must reach the same final latent to 1e-4
(measured: 3.5e-7 AYS ... 1.0e-5 KL Optimal, on the tiny SD1 UNet, 6 steps, 64x64). Requests
on an SDXL checkpoint must use the SDXL AYS table, and Beta's infotext entries are webui's.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import torch

from engine.loading import LoadedCheckpoint
from engine.samplers import resolve_sampler
from engine.schedules import Discretization, LCMDiscretization, ScheduleOptions, sigmas_for
from tests.test_kdiffusion_reference import (
    CFG,
    _CompVisModel,
    _engine,
    _import_k_diffusion,
    _start_noise,
)

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

STEP_COUNTS = (1, 2, 5, 10, 11, 20, 37, 38)  # 38: see ref_simple
# float32 sigmas from float64 formulas (and, for SGM Uniform / Normal, float32 vs float64
# timesteps before the log-sigma interpolation).
SIGMA_RTOL = 1e-5
E2E_STEPS = 6
TOLERANCE = 1e-4


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    """The UNet runs are tiny: one thread is faster than two on a shared machine."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


@pytest.fixture(scope="module")
def sd1(engine: Any) -> LoadedCheckpoint:
    from tests.helpers import SD1

    return next(v for k, v in engine.models.cache.loaded.items() if k.startswith(SD1))


@pytest.fixture(scope="module")
def kd_model(sd1: LoadedCheckpoint) -> Any:
    """k-diffusion's CompVisDenoiser over the model's alphas_cumprod (ldm's formula)."""
    kd = _import_k_diffusion()
    return kd.external.CompVisDenoiser(_CompVisModel(sd1.pipe.unet), quantize=False)


# --------------------------------------------------------------------------------------------
# The references: (n, k-diffusion model, sdxl) -> n + 1 (or, DDIM, more) sigmas, float64.


def _ends(kd: Any) -> tuple[float, float]:
    return float(kd.sigmas[0]), float(kd.sigmas[-1])


def _t_to_sigma(kd: Any, timesteps: np.ndarray) -> np.ndarray:
    return kd.t_to_sigma(torch.tensor(timesteps, dtype=torch.float32)).double().numpy()


def _timestep_ends(kd: Any) -> tuple[float, float]:
    lo, hi = _ends(kd)
    return float(kd.sigma_to_t(torch.tensor(hi))), float(kd.sigma_to_t(torch.tensor(lo)))


def ref_sgm_uniform(n: int, kd: Any, sdxl: bool) -> np.ndarray:
    start, end = _timestep_ends(kd)
    return np.append(_t_to_sigma(kd, np.linspace(start, end, n + 1)[:-1]), 0.0)


def ref_normal(n: int, kd: Any, sdxl: bool) -> np.ndarray:
    start, end = _timestep_ends(kd)
    return np.append(_t_to_sigma(kd, np.linspace(start, end, n)), 0.0)


def ref_simple(n: int, kd: Any, sdxl: bool) -> np.ndarray:
    table = kd.sigmas.double().numpy()
    total = len(table)
    # The offset is floor(i * (total / n)) in float64, as webui (and ComfyUI) compute it: for
    # 163 step counts up to 1000 that is one less than the exact i * total // n (38 steps,
    # i = 19: 499.99999999999994 -> 499), so the exact integer form would not be webui's.
    offsets = np.floor(np.arange(n) * (total / n)).astype(np.int64)
    return np.append(table[total - 1 - offsets], 0.0)


def ref_ddim(n: int, kd: Any, sdxl: bool) -> np.ndarray:
    table = kd.sigmas.double().numpy()
    return np.append(table[np.arange(1, len(table), max(len(table) // n, 1))][::-1], 0.0)


def ref_kl_optimal(n: int, kd: Any, sdxl: bool) -> np.ndarray:
    lo, hi = _ends(kd)
    t = np.arange(n + 1) / n
    return np.tan((1 - t) * math.atan(hi) + t * math.atan(lo))


def ref_beta(n: int, kd: Any, sdxl: bool) -> np.ndarray:
    from diffusers import EulerDiscreteScheduler

    scheduler: Any = EulerDiscreteScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        use_beta_sigmas=True,
        timestep_spacing="linspace",
    )
    # webui's ends: the model's sigma_min / sigma_max (diffusers otherwise takes the ends of
    # its timestep grid, which with one step is timestep 0 alone). With them given, diffusers'
    # own alphas_cumprod only place its timesteps, not the sigmas.
    lo, hi = _ends(kd)
    scheduler.register_to_config(sigma_min=lo, sigma_max=hi)
    scheduler.set_timesteps(n)
    return scheduler.sigmas.double().numpy()


# NVIDIA's tables end at 0.029, SD's sigma_min to three places; diffusers puts 0 there.
AYS_LAST = 0.029


def ref_align_your_steps(n: int, kd: Any, sdxl: bool) -> np.ndarray:
    from diffusers.schedulers import AysSchedules
    from scipy.interpolate import interp1d

    tables: Any = AysSchedules
    published = tables["StableDiffusionXLSigmas" if sdxl else "StableDiffusionSigmas"]
    table = np.array([*published[:-1], AYS_LAST])
    if n == len(table):
        return np.append(table, 0.0)
    # Ascending, as NVIDIA's loglinear_interp: with one step its only point is the low end.
    curve = interp1d(np.linspace(0, 1, len(table)), np.log(table[::-1]))
    return np.append(np.exp(curve(np.linspace(0, 1, n)))[::-1], 0.0)


REFERENCES = {
    "sgm_uniform": ref_sgm_uniform,
    "normal": ref_normal,
    "simple": ref_simple,
    "ddim": ref_ddim,
    "kl_optimal": ref_kl_optimal,
    "beta": ref_beta,
    "align_your_steps": ref_align_your_steps,
}


def _ours(schedule: str, n: int, sd1: LoadedCheckpoint, sdxl: bool = False) -> np.ndarray:
    model = Discretization.from_config(sd1.scheduler_config)
    return sigmas_for(schedule, n, model, sdxl=sdxl).double().numpy()


def _assert_sigmas_match(ours: np.ndarray, reference: np.ndarray, what: str) -> None:
    assert ours.shape == reference.shape, f"{what}: {len(ours)} sigmas, reference {len(reference)}"
    np.testing.assert_allclose(ours, reference, rtol=SIGMA_RTOL, atol=0, err_msg=what)


@pytest.mark.parametrize("n", STEP_COUNTS)
@pytest.mark.parametrize("schedule", sorted(REFERENCES))
def test_sigmas_match_reference(
    sd1: LoadedCheckpoint, kd_model: Any, schedule: str, n: int
) -> None:
    reference = REFERENCES[schedule](n, kd_model, False)
    _assert_sigmas_match(_ours(schedule, n, sd1), reference, f"{schedule} at {n} steps")


def test_ays_tables_end_at_the_models_sigma_min(kd_model: Any) -> None:
    assert round(_ends(kd_model)[0], 3) == AYS_LAST


@pytest.mark.parametrize("n", STEP_COUNTS)
def test_align_your_steps_sdxl_table(sd1: LoadedCheckpoint, kd_model: Any, n: int) -> None:
    """SDXL has its own table (same training schedule as SD1, so the same CompVisDenoiser)."""
    reference = ref_align_your_steps(n, kd_model, True)
    ours = _ours("align_your_steps", n, sd1, sdxl=True)
    _assert_sigmas_match(ours, reference, f"AYS SDXL at {n} steps")
    if n > 2:
        assert not np.allclose(ours, _ours("align_your_steps", n, sd1)), "SD1 table used"


@pytest.fixture(scope="module")
def kd_lcm(kd_model: Any) -> Any:
    """webui's LCM wrapper as k-diffusion's DiscreteSchedule over the sigmas of LCM's 50
    timesteps 19, 39, ..., 999, quantized (webui's LCMCompVisDenoiser maps a sigma to the
    nearest of them, as timestep 20 i + 19 rather than index i: an affine relabelling that
    the schedules' linspace and t_to_sigma do not see)."""
    kd = _import_k_diffusion()
    alphas = kd_model.inner_model.alphas_cumprod[torch.arange(19, 1000, 20)]
    return kd.external.DiscreteSchedule(((1 - alphas) / alphas) ** 0.5, quantize=True)


@pytest.mark.parametrize("n", STEP_COUNTS)
@pytest.mark.parametrize("schedule", sorted(REFERENCES))
def test_lcm_sigmas_match_reference(
    sd1: LoadedCheckpoint, kd_lcm: Any, schedule: str, n: int
) -> None:
    """The LCM sampler takes every schedule type in webui, over its own 50-sigma wrapper."""
    model = LCMDiscretization.of(Discretization.from_config(sd1.scheduler_config))
    ours = sigmas_for(schedule, n, model).double().numpy()
    _assert_sigmas_match(ours, REFERENCES[schedule](n, kd_lcm, False), f"LCM {schedule} at {n}")


def test_ddim_schedule_runs_one_step_more_where_webui_does(sd1: LoadedCheckpoint) -> None:
    """webui's ddim_scheduler keeps every sigma at 1, 1 + 1000 // n, ... below 1000."""
    assert len(_ours("ddim", 11, sd1)) == 13  # 12 steps for 11 asked (1000 // 11 = 90)
    assert len(_ours("ddim", 10, sd1)) == 11


# --------------------------------------------------------------------------------------------
# End to end: Euler over each schedule, the engine against k-diffusion's sample_euler.


def _reference_latent(kd_model: Any, conds: Any, sigmas: torch.Tensor) -> torch.Tensor:
    kd = _import_k_diffusion()
    cond, uncond = conds

    def cfg(x: torch.Tensor, sigma: torch.Tensor, **_: Any) -> torch.Tensor:
        out = kd_model(torch.cat([x, x]), torch.cat([sigma, sigma]), cond=torch.cat([cond, uncond]))
        denoised_cond, denoised_uncond = out.chunk(2)
        return denoised_uncond + (denoised_cond - denoised_uncond) * CFG

    x = _start_noise() * sigmas[0]
    with torch.no_grad():
        return kd.sampling.sample_euler(cfg, x, sigmas, disable=True)


def _engine_latent(sd1: LoadedCheckpoint, conds: Any, schedule: str) -> torch.Tensor:
    return _engine(sd1, conds, "Euler", schedule, steps=E2E_STEPS)


@pytest.fixture(scope="module")
def conds(sd1: LoadedCheckpoint) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(3)
    dim = sd1.pipe.unet.config.cross_attention_dim
    return torch.randn(2, 77, dim, generator=gen), torch.randn(2, 77, dim, generator=gen)


@pytest.mark.parametrize("schedule", sorted(REFERENCES))
def test_euler_final_latent_matches_k_diffusion(
    sd1: LoadedCheckpoint, kd_model: Any, conds: Any, schedule: str
) -> None:
    sigmas = torch.tensor(REFERENCES[schedule](E2E_STEPS, kd_model, False), dtype=torch.float32)
    reference = _reference_latent(kd_model, conds, sigmas)
    ours = _engine_latent(sd1, conds, schedule)
    error = float((ours - reference).norm() / reference.norm())
    assert error <= TOLERANCE, f"Euler + {schedule}: relative error {error:.2e}"


def test_requests_pick_the_ays_table_of_the_checkpoint(
    engine: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """webui reads shared.sd_model.is_sdxl: the SDXL table for an SDXL checkpoint only."""
    from engine import schedules
    from tests.helpers import SDXL, payload, with_model

    seen: list[bool] = []

    def spy(args: schedules.ScheduleArgs) -> torch.Tensor:
        seen.append(args.sdxl)
        return schedules.align_your_steps(args)

    monkeypatch.setitem(schedules.FUNCTIONS, "align_your_steps", spy)
    engine.handle("txt2img", with_model(SDXL, scheduler="Align Your Steps"), lambda s, t: None)
    engine.handle("txt2img", payload(scheduler="Align Your Steps"), lambda s, t: None)
    assert seen == [True, False]


def test_beta_schedule_parameters_are_in_the_infotext_as_webui_writes_them(engine: Any) -> None:
    """webui get_sigmas adds opts.beta_dist_alpha/beta when a k-diffusion pass runs Beta."""
    import json

    from engine.samplers import schedule_infotext_params
    from tests.helpers import payload

    response = engine.handle("txt2img", payload(scheduler="Beta"), lambda s, t: None)
    info = json.loads(response.info)
    expected = {"Beta schedule alpha": 0.6, "Beta schedule beta": 0.6}
    assert expected.items() <= info["extra_generation_params"].items()
    assert "Schedule type: Beta, " in info["infotexts"][0]
    assert "Beta schedule alpha: 0.6, Beta schedule beta: 0.6" in info["infotexts"][0]
    # Not for another schedule, nor for a sampler that ignores the schedule; a hires pass
    # that runs Beta counts. The first pass' label joins extra_generation_params there too.
    model, default = Discretization.from_config({}), ScheduleOptions()
    karras, beta = (resolve_sampler("Euler", None, s) for s in ("Karras", "Beta"))
    assert schedule_infotext_params(model, default, karras) == {"Schedule type": "Karras"}
    assert schedule_infotext_params(model, default, karras, first=False) == {}
    assert schedule_infotext_params(model, default, resolve_sampler("DDIM", None, "Beta")) == {}
    assert schedule_infotext_params(model, default, beta, first=False) == expected
    assert list(info["extra_generation_params"])[-3:] == ["Schedule type", *expected]


def test_sigma_options_against_k_diffusion_and_scipy() -> None:
    """webui's sigma_min / sigma_max / rho options feed the schedule functions (k-diffusion's
    get_sigmas_karras / _exponential / _polyexponential), beta_dist_alpha/beta scipy's beta
    ppf; equal options to the defaults (or 0) change nothing, as in webui."""
    from scipy import stats

    model = Discretization.from_config({})
    o = ScheduleOptions(sigma_min=0.1, sigma_max=5.0, rho=3.0, beta_alpha=0.3, beta_beta=0.8)
    kd = _import_k_diffusion().sampling
    cases = {
        "karras": kd.get_sigmas_karras(9, 0.1, 5.0, rho=3.0),
        "exponential": kd.get_sigmas_exponential(9, 0.1, 5.0),
        "polyexponential": kd.get_sigmas_polyexponential(9, 0.1, 5.0, rho=3.0),
    }
    for name, expected in cases.items():
        got = sigmas_for(name, 9, model, options=o)
        assert torch.allclose(got.double(), expected.double(), rtol=1e-6), name
    ppf = stats.beta.ppf(1 - np.linspace(0, 1, 9), 0.3, 0.8)
    beta = sigmas_for("beta", 9, model, options=o).double().numpy()
    assert np.allclose(beta[:-1], 0.1 + ppf * (5.0 - 0.1), rtol=1e-6) and beta[-1] == 0
    old = sigmas_for("karras", 9, model, options=ScheduleOptions(old_karras=True))
    assert torch.allclose(old.double(), kd.get_sigmas_karras(9, 0.1, 10.0).double(), rtol=1e-6)
    same = ScheduleOptions(sigma_min=0.0, sigma_max=float(model.sigma_max), rho=7.0)
    assert torch.equal(sigmas_for("karras", 9, model, options=same), sigmas_for("karras", 9, model))
