"""Sampler functions in k-diffusion's shape, as webui 1.10 runs them.

Every function is `sample_x(model, x, sigmas, noise, ...)`: `model(x, sigma)` returns the
denoised prediction (CFG and every per-step feature live behind it, see sampling.py),
`sigmas` is the explicit schedule ending in 0, and `noise` supplies every random draw.
The algorithms are k-diffusion 0.1.1's (MIT, Katherine Crowson) and webui's own
(`sd_samplers_extra.restart_sampler`, `sd_samplers_lcm.sample_lcm`,
`sd_samplers_timesteps_impl`), written out here with the same arithmetic so that a seed gives
webui's picture; tests/test_kdiffusion_reference.py compares them with the published package.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

Model = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
NoiseSampler = Callable[[Any, Any], torch.Tensor]  # (sigma, sigma_next) -> noise like x


@dataclass
class Noise:
    """The random draws of one sampler run.

    `step` is webui's `torch.randn_like` replacement (TorchHijack -> ImageRNG.next): one float32
    draw per image from that image's generator. `brownian` is the SDE samplers' Brownian-tree
    noise sampler (seeded from the batch's seeds), None for the others."""

    step: Callable[[], torch.Tensor]
    brownian: NoiseSampler | None = None

    def sampler(self) -> NoiseSampler:
        if self.brownian is not None:
            return self.brownian
        return lambda sigma, sigma_next: self.step()


@dataclass(frozen=True)
class Options:
    """Sampler parameters webui passes through (`eta`, `s_*`, the 2M SDE solver type)."""

    eta: float = 1.0
    s_churn: float = 0.0
    s_tmin: float = 0.0
    s_tmax: float = float("inf")
    s_noise: float = 1.0
    solver_type: str = "midpoint"


def to_d(x: torch.Tensor, sigma: torch.Tensor, denoised: torch.Tensor) -> torch.Tensor:
    """Karras ODE derivative (webui's override: sigma is a scalar here)."""
    return (x - denoised) / sigma


def get_ancestral_step(sigma_from: Any, sigma_to: Any, eta: float = 1.0) -> tuple[Any, Any]:
    if not eta:
        return sigma_to, 0.0
    sigma_up = min(
        sigma_to, eta * (sigma_to**2 * (sigma_from**2 - sigma_to**2) / sigma_from**2) ** 0.5
    )
    sigma_down = (sigma_to**2 - sigma_up**2) ** 0.5
    return sigma_down, sigma_up


def _ones(x: torch.Tensor) -> torch.Tensor:
    return x.new_ones([x.shape[0]])


def _mark(model: Any, step: int) -> None:
    """webui's callback_state: after sampler step `step` (0-based) completes, the denoiser's
    `sampling_step` (webui's state.sampling_step, which hooks read during the next steps)
    becomes `step`. `model` is the denoiser or one of its bound methods (`eps`)."""
    target = getattr(model, "__self__", model)
    if hasattr(target, "sampling_step"):
        target.sampling_step = step


def _steps(model: Any, count: int) -> Iterator[int]:
    """range(count), marking each step complete (`_mark`) before the next one starts."""
    for step in range(count):
        yield step
        _mark(model, step)


def _churn(
    x: torch.Tensor, sigmas: torch.Tensor, i: int, noise: Noise, o: Options
) -> tuple[torch.Tensor, torch.Tensor]:
    """Karras' stochastic churn (Euler, Heun, DPM2). webui's k-diffusion draws the churn noise
    at every step even when it is unused; without churn the draws cannot show, so they are
    skipped; with churn they are made at every step to keep webui's noise sequence."""
    gamma = (
        min(o.s_churn / (len(sigmas) - 1), 2**0.5 - 1) if o.s_tmin <= sigmas[i] <= o.s_tmax else 0.0
    )
    sigma_hat = sigmas[i] * (gamma + 1)
    if o.s_churn > 0:
        eps = noise.step() * o.s_noise
        if gamma > 0:
            x = x + eps * (sigma_hat**2 - sigmas[i] ** 2) ** 0.5
    return x, sigma_hat


def sample_euler(
    model: Model, x: torch.Tensor, sigmas: torch.Tensor, noise: Noise, o: Options
) -> torch.Tensor:
    s_in = _ones(x)
    for i in _steps(model, len(sigmas) - 1):
        x, sigma_hat = _churn(x, sigmas, i, noise, o)
        denoised = model(x, sigma_hat * s_in)
        d = to_d(x, sigma_hat, denoised)
        x = x + d * (sigmas[i + 1] - sigma_hat)
    return x


def sample_euler_ancestral(
    model: Model, x: torch.Tensor, sigmas: torch.Tensor, noise: Noise, o: Options
) -> torch.Tensor:
    s_in = _ones(x)
    sampler = noise.sampler()
    for i in _steps(model, len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in)
        sigma_down, sigma_up = get_ancestral_step(sigmas[i], sigmas[i + 1], eta=o.eta)
        d = to_d(x, sigmas[i], denoised)
        x = x + d * (sigma_down - sigmas[i])
        if sigmas[i + 1] > 0:
            x = x + sampler(sigmas[i], sigmas[i + 1]) * o.s_noise * sigma_up
    return x


def sample_heun(
    model: Model, x: torch.Tensor, sigmas: torch.Tensor, noise: Noise, o: Options
) -> torch.Tensor:
    s_in = _ones(x)
    for i in _steps(model, len(sigmas) - 1):
        x, sigma_hat = _churn(x, sigmas, i, noise, o)
        denoised = model(x, sigma_hat * s_in)
        d = to_d(x, sigma_hat, denoised)
        dt = sigmas[i + 1] - sigma_hat
        if sigmas[i + 1] == 0:
            x = x + d * dt
        else:
            x_2 = x + d * dt
            denoised_2 = model(x_2, sigmas[i + 1] * s_in)
            d_2 = to_d(x_2, sigmas[i + 1], denoised_2)
            x = x + (d + d_2) / 2 * dt
    return x


def sample_dpm_2(
    model: Model, x: torch.Tensor, sigmas: torch.Tensor, noise: Noise, o: Options
) -> torch.Tensor:
    s_in = _ones(x)
    for i in _steps(model, len(sigmas) - 1):
        x, sigma_hat = _churn(x, sigmas, i, noise, o)
        denoised = model(x, sigma_hat * s_in)
        d = to_d(x, sigma_hat, denoised)
        if sigmas[i + 1] == 0:
            x = x + d * (sigmas[i + 1] - sigma_hat)
        else:
            sigma_mid = sigma_hat.log().lerp(sigmas[i + 1].log(), 0.5).exp()
            x_2 = x + d * (sigma_mid - sigma_hat)
            denoised_2 = model(x_2, sigma_mid * s_in)
            d_2 = to_d(x_2, sigma_mid, denoised_2)
            x = x + d_2 * (sigmas[i + 1] - sigma_hat)
    return x


def sample_dpm_2_ancestral(
    model: Model, x: torch.Tensor, sigmas: torch.Tensor, noise: Noise, o: Options
) -> torch.Tensor:
    s_in = _ones(x)
    sampler = noise.sampler()
    for i in _steps(model, len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in)
        sigma_down, sigma_up = get_ancestral_step(sigmas[i], sigmas[i + 1], eta=o.eta)
        d = to_d(x, sigmas[i], denoised)
        if sigma_down == 0:
            x = x + d * (sigma_down - sigmas[i])
        else:
            sigma_mid = sigmas[i].log().lerp(sigma_down.log(), 0.5).exp()
            x_2 = x + d * (sigma_mid - sigmas[i])
            denoised_2 = model(x_2, sigma_mid * s_in)
            d_2 = to_d(x_2, sigma_mid, denoised_2)
            x = x + d_2 * (sigma_down - sigmas[i])
            x = x + sampler(sigmas[i], sigmas[i + 1]) * o.s_noise * sigma_up
    return x


def _lms_coeff(order: int, t: Any, i: int, j: int) -> float:
    from scipy import integrate

    def fn(tau: float) -> float:
        prod = 1.0
        for k in range(order):
            if j == k:
                continue
            prod *= (tau - t[i - k]) / (t[i - j] - t[i - k])
        return prod

    return float(integrate.quad(fn, t[i], t[i + 1], epsrel=1e-4)[0])


def sample_lms(
    model: Model, x: torch.Tensor, sigmas: torch.Tensor, noise: Noise, o: Options
) -> torch.Tensor:
    order = 4
    s_in = _ones(x)
    sigmas_cpu = sigmas.detach().cpu().numpy()
    ds: list[torch.Tensor] = []
    for i in _steps(model, len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in)
        ds.append(to_d(x, sigmas[i], denoised))
        if len(ds) > order:
            ds.pop(0)
        cur = min(i + 1, order)
        coeffs = [_lms_coeff(cur, sigmas_cpu, i, j) for j in range(cur)]
        x = x + sum(c * d for c, d in zip(coeffs, reversed(ds), strict=True))
    return x


def _sigma_fn(t: torch.Tensor) -> torch.Tensor:
    return t.neg().exp()


def _t_fn(sigma: torch.Tensor) -> torch.Tensor:
    return sigma.log().neg()


def sample_dpmpp_2s_ancestral(
    model: Model, x: torch.Tensor, sigmas: torch.Tensor, noise: Noise, o: Options
) -> torch.Tensor:
    s_in = _ones(x)
    sampler = noise.sampler()
    for i in _steps(model, len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in)
        sigma_down, sigma_up = get_ancestral_step(sigmas[i], sigmas[i + 1], eta=o.eta)
        if sigma_down == 0:
            d = to_d(x, sigmas[i], denoised)
            x = x + d * (sigma_down - sigmas[i])
        else:
            t, t_next = _t_fn(sigmas[i]), _t_fn(sigma_down)
            h = t_next - t
            s = t + h / 2
            x_2 = (_sigma_fn(s) / _sigma_fn(t)) * x - (-h / 2).expm1() * denoised
            denoised_2 = model(x_2, _sigma_fn(s) * s_in)
            x = (_sigma_fn(t_next) / _sigma_fn(t)) * x - (-h).expm1() * denoised_2
        if sigmas[i + 1] > 0:
            x = x + sampler(sigmas[i], sigmas[i + 1]) * o.s_noise * sigma_up
    return x


def sample_dpmpp_sde(
    model: Model, x: torch.Tensor, sigmas: torch.Tensor, noise: Noise, o: Options
) -> torch.Tensor:
    r = 0.5
    s_in = _ones(x)
    sampler = noise.sampler()
    for i in _steps(model, len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in)
        if sigmas[i + 1] == 0:
            d = to_d(x, sigmas[i], denoised)
            x = x + d * (sigmas[i + 1] - sigmas[i])
            continue
        t, t_next = _t_fn(sigmas[i]), _t_fn(sigmas[i + 1])
        h = t_next - t
        s = t + h * r
        fac = 1 / (2 * r)
        # Step 1: to the midpoint, with its share of the noise.
        sd, su = get_ancestral_step(_sigma_fn(t), _sigma_fn(s), o.eta)
        s_ = _t_fn(sd)
        x_2 = (_sigma_fn(s_) / _sigma_fn(t)) * x - (t - s_).expm1() * denoised
        x_2 = x_2 + sampler(_sigma_fn(t), _sigma_fn(s)) * o.s_noise * su
        denoised_2 = model(x_2, _sigma_fn(s) * s_in)
        # Step 2: the full step from the combined prediction.
        sd, su = get_ancestral_step(_sigma_fn(t), _sigma_fn(t_next), o.eta)
        t_next_ = _t_fn(sd)
        denoised_d = (1 - fac) * denoised + fac * denoised_2
        x = (_sigma_fn(t_next_) / _sigma_fn(t)) * x - (t - t_next_).expm1() * denoised_d
        x = x + sampler(_sigma_fn(t), _sigma_fn(t_next)) * o.s_noise * su
    return x


def sample_dpmpp_2m(
    model: Model, x: torch.Tensor, sigmas: torch.Tensor, noise: Noise, o: Options
) -> torch.Tensor:
    s_in = _ones(x)
    old_denoised = None
    for i in _steps(model, len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in)
        t, t_next = _t_fn(sigmas[i]), _t_fn(sigmas[i + 1])
        h = t_next - t
        if old_denoised is None or sigmas[i + 1] == 0:
            x = (_sigma_fn(t_next) / _sigma_fn(t)) * x - (-h).expm1() * denoised
        else:
            h_last = t - _t_fn(sigmas[i - 1])
            r = h_last / h
            denoised_d = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * old_denoised
            x = (_sigma_fn(t_next) / _sigma_fn(t)) * x - (-h).expm1() * denoised_d
        old_denoised = denoised
    return x


def sample_dpmpp_2m_sde(
    model: Model, x: torch.Tensor, sigmas: torch.Tensor, noise: Noise, o: Options
) -> torch.Tensor:
    if o.solver_type not in {"heun", "midpoint"}:
        raise ValueError("solver_type must be 'heun' or 'midpoint'")
    s_in = _ones(x)
    sampler = noise.sampler()
    old_denoised = None
    h_last = h = None
    for i in _steps(model, len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in)
        if sigmas[i + 1] == 0:
            x = denoised
        else:
            t, s = -sigmas[i].log(), -sigmas[i + 1].log()
            h = s - t
            eta_h = o.eta * h
            x = sigmas[i + 1] / sigmas[i] * (-eta_h).exp() * x
            x = x + (-h - eta_h).expm1().neg() * denoised
            if old_denoised is not None and h_last is not None:
                r = h_last / h
                if o.solver_type == "heun":
                    x = x + ((-h - eta_h).expm1().neg() / (-h - eta_h) + 1) * (1 / r) * (
                        denoised - old_denoised
                    )
                else:
                    x = x + 0.5 * (-h - eta_h).expm1().neg() * (1 / r) * (denoised - old_denoised)
            if o.eta:
                x = x + (
                    sampler(sigmas[i], sigmas[i + 1])
                    * sigmas[i + 1]
                    * (-2 * eta_h).expm1().neg().sqrt()
                    * o.s_noise
                )
        old_denoised = denoised
        h_last = h
    return x


def sample_dpmpp_3m_sde(
    model: Model, x: torch.Tensor, sigmas: torch.Tensor, noise: Noise, o: Options
) -> torch.Tensor:
    s_in = _ones(x)
    sampler = noise.sampler()
    denoised_1 = denoised_2 = None
    h = h_1 = h_2 = None
    for i in _steps(model, len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in)
        if sigmas[i + 1] == 0:
            x = denoised
        else:
            t, s = -sigmas[i].log(), -sigmas[i + 1].log()
            h = s - t
            h_eta = h * (o.eta + 1)
            x = torch.exp(-h_eta) * x + (-h_eta).expm1().neg() * denoised
            if h_2 is not None:
                assert denoised_1 is not None and denoised_2 is not None and h_1 is not None
                r0 = h_1 / h
                r1 = h_2 / h
                d1_0 = (denoised - denoised_1) / r0
                d1_1 = (denoised_1 - denoised_2) / r1
                d1 = d1_0 + (d1_0 - d1_1) * r0 / (r0 + r1)
                d2 = (d1_0 - d1_1) / (r0 + r1)
                phi_2 = h_eta.neg().expm1() / h_eta + 1
                phi_3 = phi_2 / h_eta - 0.5
                x = x + phi_2 * d1 - phi_3 * d2
            elif h_1 is not None:
                assert denoised_1 is not None
                r = h_1 / h
                d = (denoised - denoised_1) / r
                phi_2 = h_eta.neg().expm1() / h_eta + 1
                x = x + phi_2 * d
            if o.eta:
                x = x + (
                    sampler(sigmas[i], sigmas[i + 1])
                    * sigmas[i + 1]
                    * (-2 * h * o.eta).expm1().neg().sqrt()
                    * o.s_noise
                )
        denoised_1, denoised_2 = denoised, denoised_1
        h_1, h_2 = h, h_1
    return x


def sample_lcm(
    model: Model, x: torch.Tensor, sigmas: torch.Tensor, noise: Noise, o: Options
) -> torch.Tensor:
    """webui sd_samplers_lcm.sample_lcm; `model` wraps the UNet the LCM way (the runner gives
    its stages an LCMDiscretization: LCM's timesteps and consistency scalings)."""
    s_in = _ones(x)
    sampler = noise.sampler()
    for i in _steps(model, len(sigmas) - 1):
        x = model(x, sigmas[i] * s_in)
        if sigmas[i + 1] > 0:
            x = x + sigmas[i + 1] * sampler(sigmas[i], sigmas[i + 1])
    return x


def _karras(n: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> torch.Tensor:
    ramp = torch.linspace(0, 1, n)
    min_inv, max_inv = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    sigmas = (max_inv + ramp * (min_inv - max_inv)) ** rho
    return torch.cat([sigmas, sigmas.new_zeros([1])])


def sample_restart(
    model: Model, x: torch.Tensor, sigmas: torch.Tensor, noise: Noise, o: Options
) -> torch.Tensor:
    """webui sd_samplers_extra.restart_sampler with its automatic restart list."""
    s_in = _ones(x)

    def heun_step(x: torch.Tensor, old: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
        denoised = model(x, old * s_in)
        d = to_d(x, old, denoised)
        dt = new - old
        if new == 0:
            return x + d * dt
        x_2 = x + d * dt
        denoised_2 = model(x_2, new * s_in)
        d_2 = to_d(x_2, new, denoised_2)
        return x + (d + d_2) / 2 * dt

    steps = sigmas.shape[0] - 1
    restarts: dict[float, list[float]] = {}
    if steps >= 20:
        restart_steps, restart_times = 9, 1
        if steps >= 36:
            restart_steps, restart_times = steps // 4, 2
        sigmas = _karras(
            steps - restart_steps * restart_times, sigmas[-2].item(), sigmas[0].item()
        ).to(sigmas.device)
        restarts = {0.1: [restart_steps + 1, restart_times, 2]}
    by_index = {int(torch.argmin(abs(sigmas - key), dim=0)): v for key, v in restarts.items()}
    step_list: list[tuple[torch.Tensor, torch.Tensor]] = []
    for i in _steps(model, len(sigmas) - 1):
        step_list.append((sigmas[i], sigmas[i + 1]))
        if i + 1 in by_index:
            r_steps, r_times, r_max = by_index[i + 1]
            min_idx = i + 1
            max_idx = int(torch.argmin(abs(sigmas - r_max), dim=0))
            if max_idx < min_idx:
                restart = _karras(int(r_steps), sigmas[min_idx].item(), sigmas[max_idx].item()).to(
                    sigmas.device
                )[:-1]
                for _ in range(int(r_times)):
                    step_list.extend(itertools.pairwise(restart))
    last: torch.Tensor | None = None
    for step_id in _steps(model, len(step_list)):  # webui counts every Heun step (step_id)
        old, new = step_list[step_id]
        if last is None:
            last = old
        elif last < old:
            x = x + noise.step() * o.s_noise * (old**2 - last**2) ** 0.5
        x = heun_step(x, old, new)
        last = new
    return x


# ---------------------------------------------------------------------------------------------
# DPM-Solver (fast, adaptive): continuous-time solvers that take sigma_min/max and a step count.


class _DPMSolver:
    def __init__(self, model: Model):
        self.model = model

    @staticmethod
    def t(sigma: torch.Tensor) -> torch.Tensor:
        return -sigma.log()

    @staticmethod
    def sigma(t: torch.Tensor) -> torch.Tensor:
        return t.neg().exp()

    def eps(
        self, cache: dict[str, torch.Tensor], key: str, x: torch.Tensor, t: torch.Tensor
    ) -> torch.Tensor:
        if key not in cache:
            sigma = self.sigma(t) * x.new_ones([x.shape[0]])
            cache[key] = (x - self.model(x, sigma)) / self.sigma(t)
        return cache[key]

    def step_1(self, x: torch.Tensor, t: Any, t_next: Any, cache: dict) -> torch.Tensor:
        h = t_next - t
        eps = self.eps(cache, "eps", x, t)
        return x - self.sigma(t_next) * h.expm1() * eps

    def step_2(self, x: torch.Tensor, t: Any, t_next: Any, cache: dict, r1: float = 0.5) -> Any:
        h = t_next - t
        eps = self.eps(cache, "eps", x, t)
        s1 = t + r1 * h
        u1 = x - self.sigma(s1) * (r1 * h).expm1() * eps
        eps_r1 = self.eps(cache, "eps_r1", u1, s1)
        return (
            x
            - self.sigma(t_next) * h.expm1() * eps
            - self.sigma(t_next) / (2 * r1) * h.expm1() * (eps_r1 - eps)
        )

    def step_3(self, x: torch.Tensor, t: Any, t_next: Any, cache: dict) -> Any:
        r1, r2 = 1 / 3, 2 / 3
        h = t_next - t
        eps = self.eps(cache, "eps", x, t)
        s1, s2 = t + r1 * h, t + r2 * h
        u1 = x - self.sigma(s1) * (r1 * h).expm1() * eps
        eps_r1 = self.eps(cache, "eps_r1", u1, s1)
        u2 = (
            x
            - self.sigma(s2) * (r2 * h).expm1() * eps
            - self.sigma(s2) * (r2 / r1) * ((r2 * h).expm1() / (r2 * h) - 1) * (eps_r1 - eps)
        )
        eps_r2 = self.eps(cache, "eps_r2", u2, s2)
        return (
            x
            - self.sigma(t_next) * h.expm1() * eps
            - self.sigma(t_next) / r2 * (h.expm1() / h - 1) * (eps_r2 - eps)
        )


def sample_dpm_fast(
    model: Model,
    x: torch.Tensor,
    sigma_min: float,
    sigma_max: float,
    n: int,
    noise: Noise,
    o: Options,
) -> torch.Tensor:
    if sigma_min <= 0 or sigma_max <= 0:
        raise ValueError("sigma_min and sigma_max must not be 0")
    solver = _DPMSolver(model)
    sampler = noise.sampler()
    t_start, t_end = solver.t(torch.tensor(sigma_max)), solver.t(torch.tensor(sigma_min))
    m = math.floor(n / 3) + 1
    ts = torch.linspace(t_start, t_end, m + 1, device=x.device)
    orders = [3] * (m - 2) + [2, 1] if n % 3 == 0 else [3] * (m - 1) + [n % 3]
    for i, order in enumerate(orders):
        cache: dict[str, torch.Tensor] = {}
        t, t_next = ts[i], ts[i + 1]
        su: Any = 0.0
        t_next_ = t_next
        if o.eta:
            sd, _ = get_ancestral_step(solver.sigma(t), solver.sigma(t_next), o.eta)
            t_next_ = torch.minimum(t_end, solver.t(sd))
            su = (solver.sigma(t_next) ** 2 - solver.sigma(t_next_) ** 2) ** 0.5
        solver.eps(cache, "eps", x, t)
        step = {1: solver.step_1, 2: solver.step_2, 3: solver.step_3}[order]
        x = step(x, t, t_next_, cache)
        x = x + su * o.s_noise * sampler(solver.sigma(t), solver.sigma(t_next))
        _mark(model, i)
    return x


def sample_dpm_adaptive(
    model: Model,
    x: torch.Tensor,
    sigma_min: float,
    sigma_max: float,
    noise: Noise,
    o: Options,
    *,
    max_evals: int = 10_000,
) -> torch.Tensor:
    """DPM-Solver-23 with k-diffusion's PID step-size control (order 3, rtol 0.05, atol 0.0078,
    h_init 0.05). It ignores the step count, as in webui; `max_evals` bounds the loop."""
    if sigma_min <= 0 or sigma_max <= 0:
        raise ValueError("sigma_min and sigma_max must not be 0")
    solver = _DPMSolver(model)
    sampler = noise.sampler()
    t_start, t_end = solver.t(torch.tensor(sigma_max)), solver.t(torch.tensor(sigma_min))
    atol, rtol = torch.tensor(0.0078), torch.tensor(0.05)
    order_for_pid = 1.5 if o.eta else 3
    b1 = 1.0 / order_for_pid  # pcoeff 0, icoeff 1, dcoeff 0
    h = 0.05
    errs: list[float] = []
    s = t_start
    x_prev = x
    evals = 0
    attempt = 0
    while s < t_end - 1e-5:
        if evals >= max_evals:
            raise RuntimeError("DPM adaptive did not converge within its evaluation bound")
        cache: dict[str, torch.Tensor] = {}
        t = torch.minimum(t_end, s + h)
        su: Any = 0.0
        t_ = t
        if o.eta:
            sd, _ = get_ancestral_step(solver.sigma(s), solver.sigma(t), o.eta)
            t_ = torch.minimum(t_end, solver.t(sd))
            su = (solver.sigma(t) ** 2 - solver.sigma(t_) ** 2) ** 0.5
        solver.eps(cache, "eps", x, s)
        x_low = solver.step_2(x, s, t_, cache, r1=1 / 3)
        x_high = solver.step_3(x, s, t_, cache)
        evals += 3
        delta = torch.maximum(atol, rtol * torch.maximum(x_low.abs(), x_prev.abs()))
        error = torch.linalg.norm((x_low - x_high) / delta) / x.numel() ** 0.5
        # PIDStepSizeController.propose_step with only the integral term.
        inv_error = 1 / (float(error) + 1e-8)
        if not errs:
            errs = [inv_error, inv_error, inv_error]
        errs[0] = inv_error
        factor = errs[0] ** b1
        factor = 1 + math.atan(factor - 1)
        accept = factor >= 0.81
        if accept:
            errs[2] = errs[1]
            errs[1] = errs[0]
        h *= factor
        if accept:
            x_prev = x_low
            x = x_high + su * o.s_noise * sampler(solver.sigma(s), solver.sigma(t))
            s = t
        _mark(model, attempt)  # k-diffusion reports every attempt, accepted or not, as a step
        attempt += 1
    return x


# ---------------------------------------------------------------------------------------------
# webui's timestep samplers (DDIM, DDIM CFG++, PLMS): the model returns eps at integer t.

EpsModel = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _ddim_tables(
    alphas_cumprod: torch.Tensor, timesteps: torch.Tensor, eta: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    alphas = alphas_cumprod[timesteps]
    alphas_prev = alphas_cumprod[torch.nn.functional.pad(timesteps[:-1], pad=(1, 0))].to(
        torch.float64
    )
    sqrt_one_minus = torch.sqrt(1 - alphas)
    a, ap = alphas.double(), alphas_prev
    sigmas = eta * torch.sqrt((1 - ap) / (1 - a) * (1 - a / ap))
    return alphas, alphas_prev, sqrt_one_minus, sigmas


def sample_ddim(
    model: EpsModel,
    x: torch.Tensor,
    timesteps: torch.Tensor,
    alphas_cumprod: torch.Tensor,
    noise: Noise,
    o: Options,
    *,
    uncond_eps: Callable[[], torch.Tensor] | None = None,
) -> torch.Tensor:
    """webui's ddim (and ddim_cfgpp when `uncond_eps` gives the last unconditional eps)."""
    alphas, alphas_prev, sqrt_one_minus, sigmas = _ddim_tables(alphas_cumprod, timesteps, o.eta)
    s_in = x.new_ones((x.shape[0],))
    s_x = x.new_ones((x.shape[0], 1, 1, 1))
    for i in _steps(model, len(timesteps) - 1):
        index = len(timesteps) - 1 - i
        e_t = model(x, timesteps[index].item() * s_in)
        direction = e_t if uncond_eps is None else uncond_eps()
        a_t = alphas[index].item() * s_x
        a_prev = alphas_prev[index].item() * s_x
        sigma_t = sigmas[index].item() * s_x
        pred_x0 = (x - sqrt_one_minus[index].item() * s_x * e_t) / a_t.sqrt()
        dir_xt = (1.0 - a_prev - sigma_t**2).sqrt() * direction
        x = a_prev.sqrt() * pred_x0 + dir_xt
        if o.eta:
            x = x + sigma_t * noise.step()
    return x


def sample_plms(
    model: EpsModel,
    x: torch.Tensor,
    timesteps: torch.Tensor,
    alphas_cumprod: torch.Tensor,
    noise: Noise,
    o: Options,
) -> torch.Tensor:
    alphas, alphas_prev, sqrt_one_minus, _ = _ddim_tables(alphas_cumprod, timesteps, 0.0)
    s_in = x.new_ones([x.shape[0]])
    s_x = x.new_ones((x.shape[0], 1, 1, 1))
    old_eps: list[torch.Tensor] = []

    def x_prev_of(x: torch.Tensor, e_t: torch.Tensor, index: int) -> torch.Tensor:
        a_t = alphas[index].item() * s_x
        a_prev = alphas_prev[index].item() * s_x
        pred_x0 = (x - sqrt_one_minus[index].item() * s_x * e_t) / a_t.sqrt()
        return a_prev.sqrt() * pred_x0 + (1.0 - a_prev).sqrt() * e_t

    for i in _steps(model, len(timesteps) - 1):
        index = len(timesteps) - 1 - i
        ts = timesteps[index].item() * s_in
        t_next = timesteps[max(index - 1, 0)].item() * s_in
        e_t = model(x, ts)
        if not old_eps:
            e_t_next = model(x_prev_of(x, e_t, index), t_next)
            e_prime = (e_t + e_t_next) / 2
        elif len(old_eps) == 1:
            e_prime = (3 * e_t - old_eps[-1]) / 2
        elif len(old_eps) == 2:
            e_prime = (23 * e_t - 16 * old_eps[-1] + 5 * old_eps[-2]) / 12
        else:
            e_prime = (55 * e_t - 59 * old_eps[-1] + 37 * old_eps[-2] - 9 * old_eps[-3]) / 24
        x = x_prev_of(x, e_prime, index)
        old_eps.append(e_t)
        if len(old_eps) >= 4:
            old_eps.pop(0)
    return x


# ---------------------------------------------------------------------------------------------
# UniPC (Zhao et al. 2023) as webui runs it: its port of the reference implementation with
# webui's options (variant bh1, order 3, time-uniform skips, lower-order final steps), in
# data-prediction mode over the discrete VP schedule of the model's alphas_cumprod.


class _VPSchedule:
    """NoiseScheduleVP("discrete"): log alpha(t) piecewise linear over t_n = (n + 1) / N."""

    def __init__(self, alphas_cumprod: torch.Tensor):
        self.total_n = len(alphas_cumprod)
        self.t_array = torch.linspace(0.0, 1.0, self.total_n + 1)[1:]
        self.log_alpha_array = 0.5 * torch.log(alphas_cumprod.float().cpu())

    def log_alpha(self, t: torch.Tensor) -> torch.Tensor:
        xp, yp = self.t_array, self.log_alpha_array
        flat = t.reshape(-1).cpu().float().contiguous()
        # Segment of each t (the outer segments extend beyond the ends, as interpolate_fn).
        idx = torch.searchsorted(xp, flat).clamp(1, len(xp) - 1)
        x0, x1, y0, y1 = xp[idx - 1], xp[idx], yp[idx - 1], yp[idx]
        out = y0 + (flat - x0) * (y1 - y0) / (x1 - x0)
        return out.reshape(t.shape).to(t.device)

    def alpha(self, t: torch.Tensor) -> torch.Tensor:
        return torch.exp(self.log_alpha(t))

    def std(self, t: torch.Tensor) -> torch.Tensor:
        return torch.sqrt(1.0 - torch.exp(2.0 * self.log_alpha(t)))

    def lam(self, t: torch.Tensor) -> torch.Tensor:
        log_mean = self.log_alpha(t)
        return log_mean - 0.5 * torch.log(1.0 - torch.exp(2.0 * log_mean))


def sample_unipc(
    model: EpsModel,
    x: torch.Tensor,
    alphas_cumprod: torch.Tensor,
    steps: int,
    *,
    t_start: float | None = None,
    order: int = 3,
    variant: str = "bh1",
    lower_order_final: bool = True,
) -> torch.Tensor:
    """UniPC multistep (webui's `unipc` with its default options)."""
    ns = _VPSchedule(alphas_cumprod)
    if steps < order:
        raise ValueError(f"UniPC order {order} must be < sampling steps ({steps})")

    def data_prediction(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        # webui UniPCCFG.get_model_input_time: (t - 1/N) * 1000, the UNet's timestep.
        eps = model(x, (t - 1.0 / ns.total_n) * 1000.0)
        alpha_t, sigma_t = ns.alpha(t), ns.std(t)
        return (x - sigma_t.view(-1, 1, 1, 1) * eps) / alpha_t.view(-1, 1, 1, 1)

    def update(
        x: torch.Tensor,
        models: list[torch.Tensor],
        ts: list[torch.Tensor],
        t: torch.Tensor,
        order: int,
        use_corrector: bool,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        t_prev_0 = ts[-1]
        lambda_prev_0, lambda_t = ns.lam(t_prev_0), ns.lam(t)
        model_prev_0 = models[-1]
        sigma_prev_0, sigma_t = ns.std(t_prev_0), ns.std(t)
        alpha_t = torch.exp(ns.log_alpha(t))
        h = lambda_t - lambda_prev_0
        rks: list[Any] = []
        d1s: list[torch.Tensor] = []
        for i in range(1, order):
            rk = ((ns.lam(ts[-(i + 1)]) - lambda_prev_0) / h)[0]
            rks.append(rk)
            d1s.append((models[-(i + 1)] - model_prev_0) / rk)
        rks.append(1.0)
        rks_t = torch.tensor(rks, device=x.device)
        hh = -h[0]  # data prediction
        h_phi_1 = torch.expm1(hh)
        h_phi_k = h_phi_1 / hh - 1
        factorial_i = 1
        b_h = hh if variant == "bh1" else torch.expm1(hh)
        r_rows, b_vals = [], []
        for i in range(1, order + 1):
            r_rows.append(torch.pow(rks_t, i - 1))
            b_vals.append(h_phi_k * factorial_i / b_h)
            factorial_i *= i + 1
            h_phi_k = h_phi_k / hh - 1 / factorial_i
        r_mat = torch.stack(r_rows)
        b = torch.tensor(b_vals, device=x.device)
        stacked = torch.stack(d1s, dim=1) if d1s else None
        rhos_p = None
        if stacked is not None:
            rhos_p = (
                torch.tensor([0.5], device=x.device)
                if order == 2
                else torch.linalg.solve(r_mat[:-1, :-1], b[:-1])
            )
        dims = (-1, 1, 1, 1)
        x_t_ = (sigma_t / sigma_prev_0).view(dims) * x - (alpha_t * h_phi_1).view(
            dims
        ) * model_prev_0
        pred_res: Any = torch.einsum("k,bkchw->bchw", rhos_p, stacked) if stacked is not None else 0
        x_t = x_t_ - (alpha_t * b_h).view(dims) * pred_res
        model_t = None
        if use_corrector:
            rhos_c = (
                torch.tensor([0.5], device=x.device) if order == 1 else torch.linalg.solve(r_mat, b)
            )
            model_t = data_prediction(x_t, t)
            corr_res: Any = (
                torch.einsum("k,bkchw->bchw", rhos_c[:-1], stacked) if stacked is not None else 0
            )
            x_t = x_t_ - (alpha_t * b_h).view(dims) * (
                corr_res + rhos_c[-1] * (model_t - model_prev_0)
            )
        return x_t, model_t

    t_0 = 1.0 / ns.total_n
    t_T = 1.0 if t_start is None else t_start
    timesteps = torch.linspace(t_T, t_0, steps + 1).to(x.device)
    batch = x.shape[0]
    vec_t = timesteps[0].expand(batch)
    models = [data_prediction(x, vec_t)]
    ts = [vec_t]
    for init_order in range(1, order):
        vec_t = timesteps[init_order].expand(batch)
        x, model_x = update(x, models, ts, vec_t, init_order, True)
        if model_x is None:
            model_x = data_prediction(x, vec_t)
        _mark(model, init_order - 1)  # webui's after_update: callback i = steps done - 1
        models.append(model_x)
        ts.append(vec_t)
    for step in range(order, steps + 1):
        vec_t = timesteps[step].expand(batch)
        step_order = min(order, steps + 1 - step) if lower_order_final else order
        x, model_x = update(x, models, ts, vec_t, step_order, step != steps)
        for i in range(order - 1):
            ts[i] = ts[i + 1]
            models[i] = models[i + 1]
        ts[-1] = vec_t
        if step < steps:
            if model_x is None:
                model_x = data_prediction(x, vec_t)
            _mark(model, step - 1)
            models[-1] = model_x
    return x
