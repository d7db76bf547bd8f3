"""Webui sampler + schedule type -> a diffusers scheduler: two tables and a resolver.

`SAMPLERS` lists webui 1.10's samplers in `/sdapi/v1/samplers` order, each with the diffusers
class and settings that emulate it (reference/webui-api.md §4.4), or with the reason we cannot
run it. `SCHEDULES` lists webui's "Schedule type" choices and the scheduler settings that
emulate each. `resolve_sampler` applies webui's name rules (§4.3) but never falls back silently;
`build_scheduler` turns the result into a fresh diffusers scheduler for one request.

Initial noise: webui starts k-diffusion sampling from `x = noise * sigma_max` (SGM noise
multiplier off). Diffusers' Euler-family `init_noise_sigma` is `sigma_max` for "linspace" and
"trailing" spacing, which is why every k-diffusion schedule below sets the spacing explicitly
(a checkpoint's own "leading" config would give `sqrt(sigma_max**2 + 1)` instead).
DPMSolverMultistep and UniPC work in the variance-preserving form with `init_noise_sigma=1`,
equal to webui's start up to sigma/sqrt(1 + sigma**2) (about 0.998 at sigma_max).
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from enum import Enum
from functools import cache
from typing import Any

from diffusers import SchedulerMixin

from engine.errors import Problem, RequestError, UnknownName, show_choices

Kwargs = tuple[tuple[str, Any], ...]

# The API's default when neither sampler_name nor sampler_index is sent (webui 1.10's API
# model defaults sampler_index to "Euler"; its UI default "DPM++ 2M" is not used by the API).
DEFAULT_SAMPLER = "Euler"
AUTOMATIC = "automatic"
# What webui's "Automatic" means for a sampler with no schedule option: the model's own
# `get_sigmas(n)`, i.e. the uniform schedule.
MODEL_DEFAULT_SCHEDULE = "uniform"


class Eta(Enum):
    """How a sampler uses eta, in webui and here."""

    IGNORED = "ignored"  # webui's sampler takes no eta: Euler, DPM++ 2M, PLMS, UniPC, LCM, ...
    CALL = "call"  # DDIM: honoured through the pipeline's `eta` call kwarg (opts.eta_ddim = 0)
    FIXED_ONE = "fixed_one"  # ancestral/SDE: webui default 1.0 (opts.eta_ancestral); the diffusers
    # class has no eta setting and always runs as eta = 1


@dataclass(frozen=True)
class ScheduleRow:
    """One webui "Schedule type" and how to get it from a diffusers scheduler."""

    name: str
    label: str
    aliases: tuple[str, ...] | None = None  # None, not (), because webui's API prints null
    default_rho: float = -1.0
    need_inner_model: bool = False
    # Scheduler settings that produce this schedule; None: no diffusers setting computes it.
    apply: Kwargs | None = None
    requires: tuple[str, ...] = ()  # Python packages the settings need at run time

    @property
    def computable(self) -> bool:
        """Whether this server can produce the schedule (settings exist, packages installed)."""
        return self.apply is not None and _installed(self.requires)


@dataclass(frozen=True)
class SamplerRow:
    """One webui sampler and the diffusers scheduler that emulates it."""

    name: str
    aliases: tuple[str, ...]
    options: Kwargs  # webui's options dict, as `/sdapi/v1/samplers` prints it
    scheduler_class: str | None  # diffusers class name; None: no diffusers equivalent
    class_kwargs: Kwargs = ()
    # Schedule names this class can run (webui's "Automatic" resolves to `default_schedule`).
    schedules: tuple[str, ...] = ()
    # Webui's timestep samplers (DDIM, PLMS, UniPC) never read the schedule field.
    ignores_schedule: bool = False
    eta: Eta = Eta.IGNORED
    requires: tuple[str, ...] = ()  # Python packages the diffusers class needs
    unsupported_reason: str = ""  # why scheduler_class is None

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
        """Adds fresh noise every step (webui's `uses_ensd`: ENSD applies)."""
        return bool(dict(self.options).get("uses_ensd", False))

    @property
    def uses_ensd(self) -> bool:
        """Webui prints ENSD in the infotext only for these samplers."""
        return self.ancestral

    @property
    def second_order(self) -> bool:
        """Two model evaluations per step."""
        return bool(dict(self.options).get("second_order", False))

    @property
    def runnable(self) -> bool:
        """Whether this server can run the sampler."""
        return self.scheduler_class is not None and _installed(self.requires)


# Settings the table owns: reset on every build so that a checkpoint config which already
# carries, say, use_karras_sigmas or "leading" spacing does not leak into another sampler.
# Keys a class does not accept are dropped by `from_config` (passed as kwargs, silently).
_RESET: Kwargs = (
    ("use_karras_sigmas", False),
    ("use_exponential_sigmas", False),
    ("use_beta_sigmas", False),
    ("use_lu_lambdas", False),
    ("timestep_spacing", "linspace"),
    ("steps_offset", 0),
    # k-diffusion always ends at sigma 0; diffusers' "sigma_min" would stop one step short.
    ("final_sigmas_type", "zero"),
    ("interpolation_type", "linear"),
)

_LINSPACE: Kwargs = (("timestep_spacing", "linspace"), ("steps_offset", 0))

SCHEDULES: tuple[ScheduleRow, ...] = (
    ScheduleRow("automatic", "Automatic"),
    # k-diffusion get_sigmas(n): t = linspace(999, 0, n) plus a final 0 == diffusers "linspace".
    ScheduleRow("uniform", "Uniform", need_inner_model=True, apply=_LINSPACE),
    # Euler/Heun/KDPM2/LMS take sigma_min/max from the already spaced sigmas, so "linspace"
    # (which keeps t=999 and t=0) is needed for webui's extremes.
    ScheduleRow(
        "karras", "Karras", default_rho=7.0, apply=(*_LINSPACE, ("use_karras_sigmas", True))
    ),
    ScheduleRow("exponential", "Exponential", apply=(*_LINSPACE, ("use_exponential_sigmas", True))),
    # Needs explicit `sigmas=`; no scheduler setting produces it.
    ScheduleRow("polyexponential", "Polyexponential", default_rho=1.0),
    # linspace(t_max, t_min, n + 1)[:-1] == diffusers "trailing".
    ScheduleRow(
        "sgm_uniform",
        "SGM Uniform",
        aliases=("SGMUniform",),
        need_inner_model=True,
        apply=(("timestep_spacing", "trailing"), ("steps_offset", 0)),
    ),
    ScheduleRow("kl_optimal", "KL Optimal"),
    ScheduleRow("align_your_steps", "Align Your Steps"),
    # Every (1000/n)-th training sigma counted from the end == "trailing".
    ScheduleRow(
        "simple",
        "Simple",
        need_inner_model=True,
        apply=(("timestep_spacing", "trailing"), ("steps_offset", 0)),
    ),
    # linspace(t_max, t_min, n) plus 0: the same as uniform.
    ScheduleRow("normal", "Normal", need_inner_model=True, apply=_LINSPACE),
    # Training sigmas 1, 1 + 1000//n, ... reversed == "leading" with steps_offset 1.
    ScheduleRow(
        "ddim",
        "DDIM",
        need_inner_model=True,
        apply=(("timestep_spacing", "leading"), ("steps_offset", 1)),
    ),
    # webui's opts.beta_dist_alpha = beta = 0.6, diffusers' use_beta_sigmas uses the same.
    ScheduleRow(
        "beta",
        "Beta",
        need_inner_model=True,
        apply=(*_LINSPACE, ("use_beta_sigmas", True)),
        requires=("scipy",),
    ),
)

# Schedules a class with use_karras/exponential/beta_sigmas and timestep_spacing can run.
_SIGMA_FLAG_SCHEDULES = (
    "uniform",
    "karras",
    "exponential",
    "beta",
    "sgm_uniform",
    "simple",
    "normal",
    "ddim",
)
# Classes with timestep_spacing only (no sigma-shaping flag).
_SPACING_SCHEDULES = ("uniform", "sgm_uniform", "simple", "normal", "ddim")

_DPMPP = (("algorithm_type", "dpmsolver++"), ("solver_order", 2), ("solver_type", "midpoint"))
_DPMPP_SDE = (("algorithm_type", "sde-dpmsolver++"), ("solver_type", "midpoint"))
# k-diffusion's multistep solvers take a first-order last step down to sigma 0; diffusers does
# the same with final_sigmas_type="zero" and lower_order_final.
_MULTISTEP_FINAL = (("lower_order_final", True), ("euler_at_final", False))
_NO_EQUIVALENT = "diffusers has no equivalent scheduler"

SAMPLERS: tuple[SamplerRow, ...] = (
    SamplerRow(
        "DPM++ 2M",
        ("k_dpmpp_2m",),
        (("scheduler", "karras"),),
        "DPMSolverMultistepScheduler",
        (*_DPMPP, *_MULTISTEP_FINAL),
        _SIGMA_FLAG_SCHEDULES,
    ),
    # DPMSolverSDEScheduler is the port of k-diffusion's dpmpp_sde with a Brownian tree (the
    # diffusers docs' DPMSolverSinglestepScheduler is deterministic, not this sampler).
    SamplerRow(
        "DPM++ SDE",
        ("k_dpmpp_sde",),
        (("scheduler", "karras"), ("second_order", True), ("brownian_noise", True)),
        "DPMSolverSDEScheduler",
        (),
        _SIGMA_FLAG_SCHEDULES,
        eta=Eta.FIXED_ONE,
        requires=("torchsde",),
    ),
    SamplerRow(
        "DPM++ 2M SDE",
        ("k_dpmpp_2m_sde",),
        (("scheduler", "exponential"), ("brownian_noise", True)),
        "DPMSolverMultistepScheduler",
        (*_DPMPP_SDE, ("solver_order", 2), *_MULTISTEP_FINAL),
        _SIGMA_FLAG_SCHEDULES,
        eta=Eta.FIXED_ONE,
    ),
    SamplerRow(
        "DPM++ 2M SDE Heun",
        ("k_dpmpp_2m_sde_heun",),
        (("scheduler", "exponential"), ("brownian_noise", True), ("solver_type", "heun")),
        "DPMSolverMultistepScheduler",
        (
            ("algorithm_type", "sde-dpmsolver++"),
            ("solver_type", "heun"),
            ("solver_order", 2),
            *_MULTISTEP_FINAL,
        ),
        _SIGMA_FLAG_SCHEDULES,
        eta=Eta.FIXED_ONE,
    ),
    SamplerRow(
        "DPM++ 2S a",
        ("k_dpmpp_2s_a",),
        (("scheduler", "karras"), ("uses_ensd", True), ("second_order", True)),
        None,
        unsupported_reason="diffusers has no ancestral single-step DPM-Solver++ "
        "(DPMSolverSinglestepScheduler is deterministic)",
    ),
    # webui also discards the penultimate sigma for 3M SDE; diffusers does not (approximate).
    SamplerRow(
        "DPM++ 3M SDE",
        ("k_dpmpp_3m_sde",),
        (
            ("scheduler", "exponential"),
            ("discard_next_to_last_sigma", True),
            ("brownian_noise", True),
        ),
        "DPMSolverMultistepScheduler",
        (*_DPMPP_SDE, ("solver_order", 3), *_MULTISTEP_FINAL),
        _SIGMA_FLAG_SCHEDULES,
        eta=Eta.FIXED_ONE,
    ),
    # EulerAncestralDiscreteScheduler has no sigma-shaping flag (checked in 0.42): spacing only.
    SamplerRow(
        "Euler a",
        ("k_euler_a", "k_euler_ancestral"),
        (("uses_ensd", True),),
        "EulerAncestralDiscreteScheduler",
        (),
        _SPACING_SCHEDULES,
        eta=Eta.FIXED_ONE,
    ),
    SamplerRow("Euler", ("k_euler",), (), "EulerDiscreteScheduler", (), _SIGMA_FLAG_SCHEDULES),
    SamplerRow(
        "LMS",
        ("k_lms",),
        (),
        "LMSDiscreteScheduler",
        (),
        _SIGMA_FLAG_SCHEDULES,
        requires=("scipy",),
    ),
    SamplerRow(
        "Heun",
        ("k_heun",),
        (("second_order", True),),
        "HeunDiscreteScheduler",
        (),
        _SIGMA_FLAG_SCHEDULES,
    ),
    # webui discards the penultimate sigma for DPM2 / DPM2 a; KDPM2 does not (approximate).
    SamplerRow(
        "DPM2",
        ("k_dpm_2",),
        (("scheduler", "karras"), ("discard_next_to_last_sigma", True), ("second_order", True)),
        "KDPM2DiscreteScheduler",
        (),
        _SIGMA_FLAG_SCHEDULES,
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
        "KDPM2AncestralDiscreteScheduler",
        (),
        _SIGMA_FLAG_SCHEDULES,
        eta=Eta.FIXED_ONE,
    ),
    SamplerRow(
        "DPM fast",
        ("k_dpm_fast",),
        (("uses_ensd", True),),
        None,
        unsupported_reason=_NO_EQUIVALENT,
    ),
    SamplerRow(
        "DPM adaptive",
        ("k_dpm_ad",),
        (("uses_ensd", True),),
        None,
        unsupported_reason=_NO_EQUIVALENT + " (it is adaptive and ignores the step count)",
    ),
    SamplerRow(
        "Restart",
        ("restart",),
        (("scheduler", "karras"), ("second_order", True)),
        None,
        unsupported_reason=_NO_EQUIVALENT,
    ),
    # webui: timesteps range(0, 1000, 1000 // steps) + 1, no clipping, alpha_prev of t=0 is
    # alphas_cumprod[0]; eta from opts.eta_ddim = 0.
    SamplerRow(
        "DDIM",
        ("ddim",),
        (),
        "DDIMScheduler",
        (
            ("timestep_spacing", "leading"),
            ("steps_offset", 1),
            ("set_alpha_to_one", False),
            ("clip_sample", False),
        ),
        ignores_schedule=True,
        eta=Eta.CALL,
    ),
    SamplerRow("DDIM CFG++", ("ddim_cfgpp",), (), None, unsupported_reason=_NO_EQUIVALENT),
    SamplerRow(
        "PLMS",
        ("plms",),
        (),
        "PNDMScheduler",
        (
            ("skip_prk_steps", True),
            ("set_alpha_to_one", False),
            ("timestep_spacing", "leading"),
            ("steps_offset", 1),
        ),
        ignores_schedule=True,
    ),
    # webui opts: uni_pc_variant bh1, uni_pc_order 3, skip_type time_uniform (~ "linspace"),
    # lower_order_final on; diffusers' defaults are bh2 / order 2. We run bh2: diffusers 0.42.1's
    # bh1 path returns NaN on SD's schedule at any step count (checked with random eps, and
    # tests/test_txt2img.py::test_every_listed_sampler_runs caught it), so the variant differs.
    SamplerRow(
        "UniPC",
        ("unipc",),
        (),
        "UniPCMultistepScheduler",
        (
            ("solver_type", "bh2"),
            ("solver_order", 3),
            ("predict_x0", True),
            ("lower_order_final", True),
            ("timestep_spacing", "linspace"),
            ("steps_offset", 0),
        ),
        ignores_schedule=True,
    ),
    # webui runs k-diffusion's sample_lcm on the uniform schedule (t = 999 ... 0). With
    # original_inference_steps=1000 LCMScheduler's grid is every training step, so its picks are
    # evenly spaced too and any step count works (the diffusers default of 50 caps steps at 50).
    SamplerRow(
        "LCM",
        ("k_lcm",),
        (),
        "LCMScheduler",
        (("original_inference_steps", 1000),),
        ("uniform",),
    ),
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
        reason = row.unsupported_reason or _missing_packages_text(row.requires)
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
    if schedule.name in row.schedules and schedule.computable:
        return
    if schedule.apply is None:
        why = f"{schedule.label!r} is a webui schedule type this server cannot compute"
    elif not _installed(schedule.requires):
        why = f"schedule type {schedule.label!r} {_missing_packages_text(schedule.requires)}"
    else:
        why = (
            f"sampler {row.name!r} cannot run schedule type {schedule.label!r} "
            f"(diffusers' {row.scheduler_class} has no such option)"
        )
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


def _scheduler_class(row: SamplerRow) -> type[SchedulerMixin]:
    if row.scheduler_class is None:
        raise ValueError(f"{row.name!r} has no diffusers scheduler")
    cls: type[SchedulerMixin] = getattr(importlib.import_module("diffusers"), row.scheduler_class)
    return cls


def build_scheduler(
    choice: SamplerChoice,
    base_config: Mapping[str, Any],
    *,
    eta: float | None = None,
    seeds: Sequence[int] | None = None,
) -> SchedulerMixin:
    """A new diffusers scheduler for `choice`, on top of the checkpoint's scheduler config.

    The model's training schedule and prediction_type come from `base_config`; the sampler's
    and schedule's settings are laid over it (keys the class does not take are dropped by
    `from_config`). `eta` is accepted for symmetry but no class here takes it at construction
    (DDIM's eta goes through `sampler_call_kwargs`). `seeds`: the per-image seeds of the batch;
    DPM++ SDE seeds its Brownian-tree noise with them, as webui does (otherwise it would draw
    a seed from torch's global RNG and not be reproducible).
    """
    del eta  # see docstring
    row = choice.row
    overrides: dict[str, Any] = {**dict(_RESET), **dict(row.class_kwargs)}
    if choice.schedule is not None and choice.schedule.apply is not None:
        overrides.update(choice.schedule.apply)
    if seeds and row.scheduler_class == "DPMSolverSDEScheduler":
        overrides["noise_sampler_seed"] = seeds[0] if len(seeds) == 1 else list(seeds)
    cls = _scheduler_class(row)
    # Keep only what this class takes: from_config would drop the rest anyway, but would log a
    # warning per request and carry the dropped keys along as hidden config entries.
    accepted = inspect.signature(cls.__init__).parameters
    config = {k: v for k, v in base_config.items() if k in accepted and k not in overrides}
    return cls.from_config(config, **overrides)


def sampler_call_kwargs(choice: SamplerChoice, eta: float | None) -> dict[str, Any]:
    """Extra pipeline call kwargs: `{"eta": ...}` for DDIM (webui default 0.0), else `{}`."""
    if choice.row.eta is Eta.CALL:
        return {"eta": 0.0 if eta is None else float(eta)}
    return {}


def eta_warning(choice: SamplerChoice, eta: float | None) -> str | None:
    """A warning text when the request's eta cannot be honoured, else None.

    Pass the effective eta the client asked for (request `eta`, or override_settings
    eta_ancestral / eta_ddim when set), None for webui's defaults.
    """
    if eta is None or choice.row.eta is not Eta.FIXED_ONE or float(eta) == 1.0:
        return None
    return (
        f"eta: got {eta!r}; sampler {choice.sampler!r} runs here with eta 1.0 only "
        "(the diffusers scheduler has no eta setting), so the image was made with eta 1.0"
    )


def eta_infotext_params(choice: SamplerChoice, eta: float | None) -> dict[str, float]:
    """Webui's infotext keys for the eta that actually ran: "Eta DDIM" when DDIM's eta != 0.

    Ancestral/SDE samplers run with eta 1.0 here, which webui does not print.
    """
    if choice.row.eta is Eta.CALL:
        value = sampler_call_kwargs(choice, eta)["eta"]
        if value != 0.0:
            return {"Eta DDIM": value}
    return {}


def effective_eta(
    choice: SamplerChoice, request_eta: float | None, *, eta_ancestral: float, eta_ddim: float
) -> float | None:
    """The eta webui would use: the request's, else the option for this kind of sampler
    (opts.eta_ddim for DDIM, opts.eta_ancestral for ancestral/SDE); None where eta is unused."""
    if request_eta is not None:
        return request_eta
    return {Eta.CALL: eta_ddim, Eta.FIXED_ONE: eta_ancestral}.get(choice.row.eta)
