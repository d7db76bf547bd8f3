"""Webui sampler names and schedule types -> the sampler functions and sigma schedules.

`SAMPLERS` lists webui 1.10's samplers in `/sdapi/v1/samplers` order, each with its webui
options, the function in engine/kdiffusion.py that runs it and how webui drives it (`kind`).
`SCHEDULES` lists webui's "Schedule type" choices; engine/schedules.py computes them. Every
k-diffusion sampler takes every schedule type, as in webui; DDIM, DDIM CFG++, PLMS and UniPC
never read the schedule. `resolve_sampler` applies webui's name rules but never falls back
silently.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Iterable
from dataclasses import dataclass
from enum import Enum
from functools import cache
from typing import Any

from engine.errors import Problem, RequestError, UnknownName, show_choices
from engine.schedules import Discretization, ScheduleOptions, schedule_overrides

Kwargs = tuple[tuple[str, Any], ...]

# The API's default when neither sampler_name nor sampler_index is sent (webui 1.10's API
# model defaults sampler_index to "Euler"; its UI default "DPM++ 2M" is not used by the API).
DEFAULT_SAMPLER = "Euler"
AUTOMATIC = "automatic"
# What webui's "Automatic" means for a sampler with no schedule option: the model's own
# `get_sigmas(n)`, i.e. the uniform schedule.
MODEL_DEFAULT_SCHEDULE = "uniform"


class Eta(Enum):
    """How a sampler takes eta in webui."""

    IGNORED = "ignored"  # no eta parameter: Euler, Heun, DPM++ 2M, PLMS, UniPC, LCM, ...
    ANCESTRAL = "ancestral"  # k-diffusion `eta`: request eta, else opts.eta_ancestral (1.0)
    DDIM = "ddim"  # webui's DDIM / DDIM CFG++: request eta, else opts.eta_ddim (0.0)


class Kind(Enum):
    """How webui hands the schedule to a sampler function."""

    SIGMAS = "sigmas"  # k-diffusion: an explicit list of sigmas
    DPM = "dpm"  # DPM fast / adaptive: sigma_min, sigma_max (and n)
    TIMESTEPS = "timesteps"  # webui's DDIM / PLMS grid of integer timesteps
    UNIPC = "unipc"  # UniPC (webui's bh1 code) over the timestep range


class ModelWrap(Enum):
    """The k-diffusion model wrapper webui puts around the UNet for a sampler."""

    COMPVIS = "compvis"  # CompVis(V)Denoiser over the model's 1000 timesteps
    LCM = "lcm"  # sd_samplers_lcm.LCMCompVisDenoiser: LCM's 50 timesteps, boundary scalings


@dataclass(frozen=True)
class ScheduleRow:
    """One webui "Schedule type"."""

    name: str
    label: str
    aliases: tuple[str, ...] | None = None  # None, not (), because webui's API prints null
    default_rho: float = -1.0
    need_inner_model: bool = False
    requires: tuple[str, ...] = ()  # Python packages the schedule needs at run time

    @property
    def computable(self) -> bool:
        """Whether this server can produce the schedule (its packages are installed)."""
        return _installed(self.requires)


@dataclass(frozen=True)
class SamplerRow:
    """One webui sampler and the function that runs it."""

    name: str
    aliases: tuple[str, ...]
    options: Kwargs  # webui's options dict, as `/sdapi/v1/samplers` prints it
    function: str  # sample_* in engine/kdiffusion.py
    kind: Kind = Kind.SIGMAS
    eta: Eta = Eta.IGNORED
    # webui's sampler_extra_params: the s_* settings this sampler's function takes.
    extra_params: tuple[str, ...] = ()
    requires: tuple[str, ...] = ()  # Python packages the function needs
    model_wrap: ModelWrap = ModelWrap.COMPVIS

    @property
    def schedules(self) -> tuple[str, ...]:
        """Schedule names this sampler runs: all of them, unless it never reads one."""
        return () if self.ignores_schedule else tuple(r.name for r in SCHEDULES[1:])

    @property
    def ignores_schedule(self) -> bool:
        """webui's timestep samplers (DDIM, DDIM CFG++, PLMS, UniPC) never read the schedule."""
        return self.kind in (Kind.TIMESTEPS, Kind.UNIPC)

    @property
    def default_schedule(self) -> str | None:
        """Webui's `options["scheduler"]`: what "Automatic" means (None: the model's default)."""
        value = dict(self.options).get("scheduler")
        return value if isinstance(value, str) else None

    @property
    def effective_default(self) -> str:
        """The schedule that "Automatic" runs."""
        return self.default_schedule or MODEL_DEFAULT_SCHEDULE

    @property
    def ancestral(self) -> bool:
        """webui's `uses_ensd` option: the infotext prints ENSD for these samplers."""
        return bool(dict(self.options).get("uses_ensd", False))

    @property
    def uses_ensd(self) -> bool:
        """Webui prints ENSD in the infotext only for these samplers (when eta != 0)."""
        return self.ancestral

    @property
    def second_order(self) -> bool:
        """Two model evaluations per step."""
        return bool(dict(self.options).get("second_order", False))

    @property
    def discard_penultimate(self) -> bool:
        return bool(dict(self.options).get("discard_next_to_last_sigma", False))

    @property
    def brownian(self) -> bool:
        """SDE samplers: webui's Brownian-tree noise seeded from the batch's seeds."""
        return bool(dict(self.options).get("brownian_noise", False))

    @property
    def runnable(self) -> bool:
        """Whether this server can run the sampler."""
        return _installed(self.requires)


SCHEDULES: tuple[ScheduleRow, ...] = (
    ScheduleRow("automatic", "Automatic"),
    ScheduleRow("uniform", "Uniform", need_inner_model=True),
    ScheduleRow("karras", "Karras", default_rho=7.0),
    ScheduleRow("exponential", "Exponential"),
    ScheduleRow("polyexponential", "Polyexponential", default_rho=1.0),
    ScheduleRow("sgm_uniform", "SGM Uniform", aliases=("SGMUniform",), need_inner_model=True),
    ScheduleRow("kl_optimal", "KL Optimal"),
    ScheduleRow("align_your_steps", "Align Your Steps"),
    ScheduleRow("simple", "Simple", need_inner_model=True),
    ScheduleRow("normal", "Normal", need_inner_model=True),
    ScheduleRow("ddim", "DDIM", need_inner_model=True),
    # webui's opts.beta_dist_alpha = beta = 0.6, the beta distribution from scipy.
    ScheduleRow("beta", "Beta", need_inner_model=True, requires=("scipy",)),
)

_CHURN = ("s_churn", "s_tmin", "s_tmax", "s_noise")
_NOISE = ("s_noise",)

SAMPLERS: tuple[SamplerRow, ...] = (
    SamplerRow("DPM++ 2M", ("k_dpmpp_2m",), (("scheduler", "karras"),), "sample_dpmpp_2m"),
    SamplerRow(
        "DPM++ SDE",
        ("k_dpmpp_sde",),
        (("scheduler", "karras"), ("second_order", True), ("brownian_noise", True)),
        "sample_dpmpp_sde",
        eta=Eta.ANCESTRAL,
        extra_params=_NOISE,
        requires=("torchsde",),
    ),
    SamplerRow(
        "DPM++ 2M SDE",
        ("k_dpmpp_2m_sde",),
        (("scheduler", "exponential"), ("brownian_noise", True)),
        "sample_dpmpp_2m_sde",
        eta=Eta.ANCESTRAL,
        extra_params=_NOISE,
        requires=("torchsde",),
    ),
    SamplerRow(
        "DPM++ 2M SDE Heun",
        ("k_dpmpp_2m_sde_heun",),
        (("scheduler", "exponential"), ("brownian_noise", True), ("solver_type", "heun")),
        "sample_dpmpp_2m_sde",
        eta=Eta.ANCESTRAL,
        extra_params=_NOISE,
        requires=("torchsde",),
    ),
    SamplerRow(
        "DPM++ 2S a",
        ("k_dpmpp_2s_a",),
        (("scheduler", "karras"), ("uses_ensd", True), ("second_order", True)),
        "sample_dpmpp_2s_ancestral",
        eta=Eta.ANCESTRAL,
        extra_params=_NOISE,
    ),
    SamplerRow(
        "DPM++ 3M SDE",
        ("k_dpmpp_3m_sde",),
        (
            ("scheduler", "exponential"),
            ("discard_next_to_last_sigma", True),
            ("brownian_noise", True),
        ),
        "sample_dpmpp_3m_sde",
        eta=Eta.ANCESTRAL,
        extra_params=_NOISE,
        requires=("torchsde",),
    ),
    SamplerRow(
        "Euler a",
        ("k_euler_a", "k_euler_ancestral"),
        (("uses_ensd", True),),
        "sample_euler_ancestral",
        eta=Eta.ANCESTRAL,
    ),
    SamplerRow("Euler", ("k_euler",), (), "sample_euler", extra_params=_CHURN),
    SamplerRow("LMS", ("k_lms",), (), "sample_lms", requires=("scipy",)),
    SamplerRow("Heun", ("k_heun",), (("second_order", True),), "sample_heun", extra_params=_CHURN),
    SamplerRow(
        "DPM2",
        ("k_dpm_2",),
        (("scheduler", "karras"), ("discard_next_to_last_sigma", True), ("second_order", True)),
        "sample_dpm_2",
        extra_params=_CHURN,
    ),
    SamplerRow(
        "DPM2 a",
        ("k_dpm_2_a",),
        (
            ("scheduler", "karras"),
            ("discard_next_to_last_sigma", True),
            ("uses_ensd", True),
            ("second_order", True),
        ),
        "sample_dpm_2_ancestral",
        eta=Eta.ANCESTRAL,
        extra_params=_NOISE,
    ),
    SamplerRow(
        "DPM fast",
        ("k_dpm_fast",),
        (("uses_ensd", True),),
        "sample_dpm_fast",
        kind=Kind.DPM,
        eta=Eta.ANCESTRAL,
        extra_params=_NOISE,
    ),
    SamplerRow(
        "DPM adaptive",
        ("k_dpm_ad",),
        (("uses_ensd", True),),
        "sample_dpm_adaptive",
        kind=Kind.DPM,
        eta=Eta.ANCESTRAL,
    ),
    SamplerRow(
        "Restart", ("restart",), (("scheduler", "karras"), ("second_order", True)), "sample_restart"
    ),
    SamplerRow("DDIM", ("ddim",), (), "sample_ddim", kind=Kind.TIMESTEPS, eta=Eta.DDIM),
    SamplerRow(
        "DDIM CFG++", ("ddim_cfgpp",), (), "sample_ddim_cfgpp", kind=Kind.TIMESTEPS, eta=Eta.DDIM
    ),
    SamplerRow("PLMS", ("plms",), (), "sample_plms", kind=Kind.TIMESTEPS),
    SamplerRow("UniPC", ("unipc",), (), "sample_unipc", kind=Kind.UNIPC),
    SamplerRow("LCM", ("k_lcm",), (), "sample_lcm", model_wrap=ModelWrap.LCM),
)


@dataclass(frozen=True)
class SamplerChoice:
    """A resolved sampler request: what to build and what to print."""

    sampler: str  # webui display name, e.g. "DPM++ 2M"
    # Webui's p.scheduler as a name: "automatic" when none was asked for or when the request
    # equals the sampler's default; for DDIM/PLMS/UniPC the (ignored) requested name.
    scheduler: str
    schedule_label: str  # infotext "Schedule type", e.g. "Karras", "Automatic"
    row: SamplerRow
    schedule: ScheduleRow | None  # the schedule actually applied; None: the sampler ignores it


class UnsupportedSampler(UnknownName):
    """A real webui sampler that this server cannot run."""

    def __init__(self, field: str, value: Any, row: SamplerRow, choices: Iterable[str]):
        self.choices = list(choices)
        self.row = row
        reason = _missing_packages_text(row.requires)
        RequestError.__init__(
            self,
            [
                Problem(
                    field,
                    value,
                    f"{row.name!r} is a webui sampler this server cannot run ({reason}); "
                    f"supported samplers: {show_choices(self.choices)}",
                )
            ],
        )


@cache
def _installed(packages: tuple[str, ...]) -> bool:
    return all(importlib.util.find_spec(p) is not None for p in packages)


def _missing_packages_text(packages: tuple[str, ...]) -> str:
    missing = [p for p in packages if not _installed((p,))]
    return f"needs the Python package(s) {', '.join(missing)}, not installed on this server"


def _key(text: str) -> str:
    """Lookup key: case-insensitive, whitespace-normalised."""
    return " ".join(text.split()).casefold()


@cache
def _sampler_index() -> dict[str, SamplerRow]:
    index: dict[str, SamplerRow] = {}
    for row in SAMPLERS:
        for text in (row.name, *row.aliases):
            index.setdefault(_key(text), row)
    return index


@cache
def _schedule_index() -> dict[str, ScheduleRow]:
    index: dict[str, ScheduleRow] = {}
    for row in SCHEDULES:
        for text in (row.name, row.label, *(row.aliases or ())):
            index.setdefault(_key(text), row)
    return index


_SCHEDULES_BY_NAME = {row.name: row for row in SCHEDULES}


def supported_sampler_names() -> list[str]:
    """Display names of the samplers this server can run, in webui's order."""
    return [row.name for row in SAMPLERS if row.runnable]


def _listed_schedules() -> list[ScheduleRow]:
    return [row for row in SCHEDULES if row.name == AUTOMATIC or row.computable]


def list_samplers() -> list[dict[str, Any]]:
    """`GET /sdapi/v1/samplers`: the samplers this server can run, in webui's shape."""
    return [
        {"name": row.name, "aliases": list(row.aliases), "options": dict(row.options)}
        for row in SAMPLERS
        if row.runnable
    ]


def list_schedulers() -> list[dict[str, Any]]:
    """`GET /sdapi/v1/schedulers`: the schedule types this server can compute, webui's shape."""
    return [
        {
            "name": row.name,
            "label": row.label,
            "aliases": list(row.aliases) if row.aliases is not None else None,
            "default_rho": row.default_rho,
            "need_inner_model": row.need_inner_model,
        }
        for row in _listed_schedules()
    ]


def _split_schedule_suffix(name: str) -> tuple[str, ScheduleRow] | None:
    """Split a schedule suffix off a sampler name: "DPM++ 2M Karras" -> ("dpm++ 2m", karras).

    The longest matching suffix wins, so that "X SGM Uniform" is not read as "X SGM" +
    "Uniform" (webui 1.10 checks "Uniform" first and then fails to find "X SGM").
    """
    key = _key(name)
    best: tuple[int, ScheduleRow] | None = None
    for row in SCHEDULES:
        for text in (row.label, row.name, *(row.aliases or ())):
            suffix = " " + _key(text)
            if key.endswith(suffix) and (best is None or len(suffix) > best[0]):
                best = (len(suffix), row)
    if best is None:
        return None
    return key[: -best[0]], best[1]


def _find_sampler(name: str, field: str) -> tuple[SamplerRow, ScheduleRow | None]:
    index = _sampler_index()
    row = index.get(_key(name))
    suffix_schedule: ScheduleRow | None = None
    if row is None:
        split = _split_schedule_suffix(name)
        if split is not None:
            row = index.get(split[0])
            suffix_schedule = split[1]
    if row is None:
        raise UnknownName(field, name, supported_sampler_names(), kind="sampler")
    if not row.runnable:
        raise UnsupportedSampler(field, name, row, supported_sampler_names())
    return row, suffix_schedule


def _find_schedule(value: str, field: str) -> ScheduleRow:
    row = _schedule_index().get(_key(value))
    if row is None:
        names = [r.name for r in _listed_schedules()]
        raise UnknownName(field, value, names, kind="scheduler")
    return row


def _runnable_schedules(row: SamplerRow) -> list[str]:
    """Schedule names `row` accepts here, "automatic" first."""
    if row.ignores_schedule:
        return [r.name for r in _listed_schedules()]
    return [AUTOMATIC] + [name for name in row.schedules if _SCHEDULES_BY_NAME[name].computable]


def _check_combination(
    row: SamplerRow, schedule: ScheduleRow, fields: dict[str, str | None]
) -> None:
    if schedule.computable:
        return
    why = f"schedule type {schedule.label!r} {_missing_packages_text(schedule.requires)}"
    raise RequestError.single(
        "/".join(fields),
        fields,
        f"{why}; schedule types for {row.name!r}: {show_choices(_runnable_schedules(row))}",
    )


def resolve_sampler(
    sampler_name: str | None,
    sampler_index: str | None,
    scheduler: str | None,
    *,
    sampler_field: str = "sampler_name",
    scheduler_field: str = "scheduler",
) -> SamplerChoice:
    """Resolve a request's sampler and schedule type the webui 1.10 way, without fallbacks.

    The sampler is `sampler_name or sampler_index or "Euler"`; display names, webui aliases
    (k_euler_a, ...) and any letter case are accepted. A trailing schedule type ("DPM++ 2M
    Karras") becomes the schedule unless `scheduler` is set (None or "" means not set; an
    explicit "Automatic" wins over the suffix, as in webui). Raises `UnknownName` for unknown
    names or webui samplers we cannot run, `RequestError` for a sampler + schedule pair that
    cannot be honoured.
    """
    if sampler_name:
        field, name = sampler_field, sampler_name
    elif sampler_index:
        field, name = "sampler_index", sampler_index
    else:
        field, name = sampler_field, DEFAULT_SAMPLER
    row, suffix_schedule = _find_sampler(name, field)

    requested: ScheduleRow | None = suffix_schedule
    if scheduler:
        requested = _find_schedule(scheduler, scheduler_field)
    requested_name = requested.name if requested is not None else AUTOMATIC

    if row.ignores_schedule:
        # DDIM/PLMS/UniPC: webui never reads the schedule, but prints the requested label.
        label = _SCHEDULES_BY_NAME[requested_name].label
        return SamplerChoice(row.name, requested_name, label, row, None)

    if requested_name == row.default_schedule:
        requested_name = AUTOMATIC  # webui's get_sampler_and_scheduler conversion
    effective = row.effective_default if requested_name == AUTOMATIC else requested_name
    schedule = _SCHEDULES_BY_NAME[effective]
    _check_combination(row, schedule, {field: name, scheduler_field: scheduler})

    # k-diffusion samplers print the effective schedule unless it is the model's default
    # (webui's get_sigmas): DPM++ 2M -> "Karras", Euler -> "Automatic", Euler+uniform -> "Uniform".
    if requested_name == AUTOMATIC and row.default_schedule is None:
        label = _SCHEDULES_BY_NAME[AUTOMATIC].label
    else:
        label = schedule.label
    return SamplerChoice(row.name, requested_name, label, row, schedule)


def effective_eta(
    choice: SamplerChoice, request_eta: float | None, *, eta_ancestral: float, eta_ddim: float
) -> float | None:
    """The eta webui runs: the request's, else the option for this kind of sampler
    (opts.eta_ddim for DDIM, opts.eta_ancestral for the others that take one); None where
    the sampler has no eta."""
    if choice.row.eta is Eta.IGNORED:
        return None
    if request_eta is not None:
        return float(request_eta)
    return eta_ddim if choice.row.eta is Eta.DDIM else eta_ancestral


def eta_infotext_params(choice: SamplerChoice, eta: float | None) -> dict[str, float]:
    """webui Sampler.initialize: "Eta" (ancestral, default 1) or "Eta DDIM" (default 0) when
    the eta that ran differs from the sampler's default."""
    if eta is None:
        return {}
    if choice.row.eta is Eta.DDIM:
        return {"Eta DDIM": eta} if eta != 0.0 else {}
    return {"Eta": eta} if eta != 1.0 else {}


def uses_ensd(choice: SamplerChoice, eta: float | None) -> bool:
    """webui is_sampler_using_eta_noise_seed_delta: whether the infotext prints ENSD (the
    noise is re-seeded with ENSD whatever the sampler; only the infotext depends on this)."""
    effective = 1.0 if eta is None else eta
    return effective != 0 and choice.row.uses_ensd


def sigma_infotext_params(
    choice: SamplerChoice, *, s_churn: float, s_tmin: float, s_tmax: float, s_noise: float
) -> dict[str, float]:
    """webui Sampler.initialize: "Sigma churn/tmin/tmax/noise" for the settings this sampler
    takes (its sampler_extra_params) when they differ from the defaults (s_tmax 0 = infinity)."""
    values = {
        "s_churn": ("Sigma churn", s_churn, 0.0),
        "s_tmin": ("Sigma tmin", s_tmin, 0.0),
        "s_tmax": ("Sigma tmax", s_tmax or float("inf"), float("inf")),
        "s_noise": ("Sigma noise", s_noise, 1.0),
    }
    return {
        key: value
        for param, (key, value, default) in values.items()
        if param in choice.row.extra_params and value != default
    }


def schedule_infotext_params(
    model: Discretization, options: ScheduleOptions, choice: SamplerChoice, *, first: bool = True
) -> dict[str, Any]:
    """webui get_sigmas for one pass, in its order: the first pass' "Schedule type" (its label,
    unless "Automatic"; only when `first`: the hires pass' goes to "Hires schedule type"),
    "Schedule min/max sigma", "Schedule rho" (the options that apply to the pass' schedule)
    and "Beta schedule alpha/beta" when it samples on the Beta schedule; never for
    DDIM/PLMS/UniPC or Automatic without a schedule (no schedule function)."""
    found: dict[str, Any] = {}
    if choice.schedule is None or choice.row.kind in (Kind.TIMESTEPS, Kind.UNIPC):
        return found
    if first and choice.schedule_label != _SCHEDULES_BY_NAME[AUTOMATIC].label:
        found["Schedule type"] = choice.schedule_label
    found.update(schedule_overrides(choice.schedule.name, model, options))
    if choice.schedule.name == "beta":
        found["Beta schedule alpha"] = options.beta_alpha
        found["Beta schedule beta"] = options.beta_beta
    return found


def discard_infotext_params(choice: SamplerChoice, always_discard: bool) -> dict[str, bool]:
    """webui get_sigmas / get_timesteps: "Discard penultimate sigma: True" when the option
    makes a sampler discard that does not always do it."""
    if always_discard and not choice.row.discard_penultimate:
        return {"Discard penultimate sigma": True}
    return {}
