"""The sampler table: webui names and schedule types -> working diffusers schedulers."""

from __future__ import annotations

import importlib.util
import math
from typing import Any

import pytest
import torch

from engine.errors import RequestError, UnknownName
from engine.samplers import (
    AUTOMATIC,
    SAMPLERS,
    SCHEDULES,
    SamplerRow,
    ScheduleRow,
    UnsupportedSampler,
    build_scheduler,
    eta_infotext_params,
    eta_warning,
    list_samplers,
    list_schedulers,
    resolve_sampler,
    sampler_call_kwargs,
    supported_sampler_names,
)

# numpy 2 deprecation chatter from inside diffusers' schedulers, thousands per run.
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

SD1 = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "prediction_type": "epsilon",
}
V_PRED = {**SD1, "prediction_type": "v_prediction"}
# SDXL's shipped config: "leading" spacing and steps_offset 1 must not leak into k-samplers.
SDXL_LIKE = {
    **SD1,
    "_class_name": "EulerDiscreteScheduler",
    "timestep_spacing": "leading",
    "steps_offset": 1,
    "interpolation_type": "linear",
    "use_karras_sigmas": True,
    "skip_prk_steps": True,
}
SIGMA_MAX, SIGMA_MIN = 14.6146, 0.0292  # SD1/SDXL training extremes
STEPS = 20

SCHEDULE_BY_NAME = {s.name: s for s in SCHEDULES}


def _build(choice: Any, base: dict) -> Any:
    """build_scheduler, typed loosely: SchedulerMixin declares none of the scheduler methods."""
    return build_scheduler(choice, base)


def _installed(packages: tuple[str, ...]) -> bool:
    return all(importlib.util.find_spec(p) is not None for p in packages)


def _expected_timesteps(class_name: str, n: int) -> int:
    """How many timesteps each class documents for n steps."""
    if class_name in {
        "HeunDiscreteScheduler",
        "KDPM2DiscreteScheduler",
        "KDPM2AncestralDiscreteScheduler",
        "DPMSolverSDEScheduler",
    }:
        return 2 * n - 1  # second-order: two model calls per step except the last
    if class_name == "PNDMScheduler":
        return n + 1  # PLMS warm-up repeats one timestep
    return n


def _cases() -> list:
    cases = []
    for row in SAMPLERS:
        if row.scheduler_class is None:
            continue
        schedules = [AUTOMATIC] if row.ignores_schedule else [AUTOMATIC, *row.schedules]
        for schedule in schedules:
            for base in (SD1, V_PRED):
                cases.append(
                    pytest.param(
                        row, schedule, base, id=f"{row.name}-{schedule}-{base['prediction_type']}"
                    )
                )
    return cases


@pytest.mark.parametrize(("row", "schedule", "base"), _cases())
def test_every_row_and_schedule_builds_and_steps(row: SamplerRow, schedule: str, base: dict):
    needs = row.requires + SCHEDULE_BY_NAME[schedule].requires
    if not _installed(needs):
        pytest.skip(f"needs {needs}")
    choice = resolve_sampler(row.name, None, schedule)
    scheduler = _build(choice, base)

    assert type(scheduler).__name__ == row.scheduler_class
    assert scheduler.config.prediction_type == base["prediction_type"]
    assert scheduler.config.beta_schedule == "scaled_linear"
    # The class really took the sampler's and the schedule's settings (none silently dropped).
    applied = dict(row.class_kwargs)
    if choice.schedule is not None and choice.schedule.apply is not None:
        applied.update(choice.schedule.apply)
    for key, value in applied.items():
        assert scheduler.config[key] == value, key

    scheduler.set_timesteps(STEPS)
    assert len(scheduler.timesteps) == _expected_timesteps(row.scheduler_class, STEPS)


def _sigmas(sampler: str, schedule: str | None) -> torch.Tensor:
    scheduler = _build(resolve_sampler(sampler, None, schedule), SD1)
    scheduler.set_timesteps(STEPS)
    return scheduler.sigmas


@pytest.mark.parametrize("sampler", ["Euler", "DPM++ 2M", "Heun", "DPM2", "DPM++ 2M SDE"])
def test_karras_and_exponential_change_the_sigmas(sampler: str):
    uniform = _sigmas(sampler, "uniform")
    karras = _sigmas(sampler, "karras")
    exponential = _sigmas(sampler, "exponential")
    for shaped in (karras, exponential):
        assert shaped.shape == uniform.shape
        assert not torch.allclose(shaped, uniform, atol=1e-3)
        # Same webui extremes: start at sigma_max, end at 0.
        assert shaped[0].item() == pytest.approx(SIGMA_MAX, rel=1e-3)
        assert shaped[-1].item() == 0.0
    assert not torch.allclose(karras, exponential, atol=1e-3)


def test_euler_karras_and_exponential_match_k_diffusion_formulas():
    n = STEPS
    ramp = [i / (n - 1) for i in range(n)]
    rho = 7.0
    hi, lo = SIGMA_MAX ** (1 / rho), SIGMA_MIN ** (1 / rho)
    karras = [(hi + r * (lo - hi)) ** rho for r in ramp]
    exponential = [
        math.exp(math.log(SIGMA_MAX) + r * (math.log(SIGMA_MIN) - math.log(SIGMA_MAX)))
        for r in ramp
    ]
    assert _sigmas("Euler", "karras")[:-1].tolist() == pytest.approx(karras, rel=2e-3)
    assert _sigmas("Euler", "exponential")[:-1].tolist() == pytest.approx(exponential, rel=2e-3)


def test_euler_uniform_spans_webui_extremes_and_starts_at_sigma_max():
    """webui: x = noise * sigma_max; diffusers' init_noise_sigma must agree."""
    for base in (SD1, SDXL_LIKE):
        scheduler = _build(resolve_sampler("Euler", None, None), base)
        scheduler.set_timesteps(STEPS)
        assert scheduler.sigmas[0].item() == pytest.approx(SIGMA_MAX, rel=1e-3)
        assert scheduler.sigmas[-2].item() == pytest.approx(SIGMA_MIN, rel=1e-2)
        assert scheduler.sigmas[-1].item() == 0.0
        assert float(scheduler.init_noise_sigma) == pytest.approx(SIGMA_MAX, rel=1e-3)


def test_checkpoint_config_does_not_leak_schedule_flags():
    scheduler = _build(resolve_sampler("Euler", None, None), SDXL_LIKE)
    assert scheduler.config.timestep_spacing == "linspace"
    assert scheduler.config.use_karras_sigmas is False
    # Keys the class does not take are not carried along.
    assert "skip_prk_steps" not in scheduler.config


def test_ddim_and_plms_use_webui_timesteps():
    expected = [t + 1 for t in range(0, 1000, 1000 // STEPS)][::-1]
    ddim = _build(resolve_sampler("DDIM", None, None), SDXL_LIKE)
    ddim.set_timesteps(STEPS)
    assert ddim.timesteps.tolist() == expected
    plms = _build(resolve_sampler("PLMS", None, None), SD1)
    plms.set_timesteps(STEPS)
    assert sorted(set(plms.timesteps.tolist()), reverse=True) == expected


def test_lcm_runs_more_than_fifty_steps():
    scheduler = _build(resolve_sampler("LCM", None, None), SD1)
    scheduler.set_timesteps(60)
    assert len(scheduler.timesteps) == 60
    assert scheduler.timesteps[0].item() == 999


@pytest.mark.parametrize(
    ("sampler_name", "sampler_index", "scheduler", "expected"),
    [
        ("DPM++ 2M Karras", None, None, ("DPM++ 2M", AUTOMATIC, "karras")),
        ("DPM++ 2M", None, None, ("DPM++ 2M", AUTOMATIC, "karras")),
        ("Euler a", None, None, ("Euler a", AUTOMATIC, "uniform")),
        (None, None, None, ("Euler", AUTOMATIC, "uniform")),
        ("", "", None, ("Euler", AUTOMATIC, "uniform")),
        (None, "Heun", None, ("Heun", AUTOMATIC, "uniform")),
        ("DDIM", "Heun", None, ("DDIM", AUTOMATIC, None)),
        ("k_euler_a", None, None, ("Euler a", AUTOMATIC, "uniform")),
        ("k_dpmpp_2m", None, None, ("DPM++ 2M", AUTOMATIC, "karras")),
        ("euler A", None, None, ("Euler a", AUTOMATIC, "uniform")),
        ("  dpm++  2m  ", None, None, ("DPM++ 2M", AUTOMATIC, "karras")),
        ("Euler a Karras", None, "uniform", ("Euler a", "uniform", "uniform")),
        ("DPM++ 2M Karras", None, "exponential", ("DPM++ 2M", "exponential", "exponential")),
        ("Euler", None, "karras", ("Euler", "karras", "karras")),
        ("Euler", None, "Karras", ("Euler", "karras", "karras")),
        ("Euler", None, "KARRAS", ("Euler", "karras", "karras")),
        ("Euler", None, "SGMUniform", ("Euler", "sgm_uniform", "sgm_uniform")),
        ("Euler", None, "SGM Uniform", ("Euler", "sgm_uniform", "sgm_uniform")),
        ("Euler SGM Uniform", None, None, ("Euler", "sgm_uniform", "sgm_uniform")),
        ("DPM++ 2M SDE Exponential", None, None, ("DPM++ 2M SDE", AUTOMATIC, "exponential")),
        ("DPM++ 2M SDE Karras", None, None, ("DPM++ 2M SDE", "karras", "karras")),
        ("DPM++ 2M SDE Heun Karras", None, None, ("DPM++ 2M SDE Heun", "karras", "karras")),
        ("DPM2 a Karras", None, None, ("DPM2 a", AUTOMATIC, "karras")),
        ("DPM++ 2M", None, "uniform", ("DPM++ 2M", "uniform", "uniform")),
        # An explicit scheduler field wins over the suffix, "Automatic" included (webui's API).
        ("Euler Karras", None, "Automatic", ("Euler", AUTOMATIC, "uniform")),
        # DDIM/PLMS/UniPC never read the schedule (webui): nothing applied, name kept.
        ("DDIM", None, "karras", ("DDIM", "karras", None)),
        ("UniPC Karras", None, None, ("UniPC", "karras", None)),
    ],
)
def test_name_resolution(sampler_name, sampler_index, scheduler, expected):
    choice = resolve_sampler(sampler_name, sampler_index, scheduler)
    applied = choice.schedule.name if choice.schedule is not None else None
    assert (choice.sampler, choice.scheduler, applied) == expected


@pytest.mark.parametrize(
    ("sampler", "scheduler", "label"),
    [
        ("DPM++ 2M", None, "Karras"),
        ("DPM++ 2M", "karras", "Karras"),
        ("DPM++ 2M Karras", None, "Karras"),
        ("DPM++ 2M", "uniform", "Uniform"),
        ("DPM++ 2M SDE", None, "Exponential"),
        ("DPM2 a", None, "Karras"),
        ("Euler", None, "Automatic"),
        ("Euler a", None, "Automatic"),
        ("Euler", "karras", "Karras"),
        ("Euler", "uniform", "Uniform"),
        ("Euler", "automatic", "Automatic"),
        ("DDIM", None, "Automatic"),
        ("DDIM", "karras", "Karras"),  # webui prints p.scheduler for timestep samplers
        ("UniPC", None, "Automatic"),
        ("LCM", None, "Automatic"),
    ],
)
def test_schedule_label(sampler, scheduler, label):
    assert resolve_sampler(sampler, None, scheduler).schedule_label == label


@pytest.mark.parametrize(
    ("sampler_name", "sampler_index", "field"),
    [
        ("Nope", None, "sampler_name"),
        (None, "Nope", "sampler_index"),
        ("Nope Karras", None, "sampler_name"),
    ],
)
def test_unknown_sampler_names_field_value_and_choices(sampler_name, sampler_index, field):
    with pytest.raises(UnknownName) as info:
        resolve_sampler(sampler_name, sampler_index, None)
    message = str(info.value)
    assert field in message
    assert repr(sampler_name or sampler_index) in message
    assert "'Euler a'" in message and "'DPM++ 2M'" in message
    assert info.value.choices == supported_sampler_names()


def test_unknown_sampler_uses_the_given_field_name():
    with pytest.raises(UnknownName, match="hr_sampler_name"):
        resolve_sampler("Nope", None, None, sampler_field="hr_sampler_name")


@pytest.mark.parametrize(
    "name", ["DPM fast", "dpm adaptive", "Restart", "DDIM CFG++", "DPM++ 2S a", "DPM++ 2S a Karras"]
)
def test_webui_sampler_we_cannot_run_says_so(name: str):
    with pytest.raises(UnsupportedSampler) as info:
        resolve_sampler(name, None, None)
    assert isinstance(info.value, UnknownName)
    message = str(info.value)
    assert "sampler_name" in message and repr(name) in message
    assert "webui sampler this server cannot run" in message
    assert "'Euler'" in message


@pytest.mark.parametrize(
    ("name", "package"),
    [(row.name, row.requires) for row in SAMPLERS if row.scheduler_class and row.requires],
)
def test_sampler_with_missing_package_is_refused_and_unlisted(name: str, package: tuple[str, ...]):
    if _installed(package):
        assert name in supported_sampler_names()
        return
    assert name not in supported_sampler_names()
    with pytest.raises(UnsupportedSampler, match=package[0]):
        resolve_sampler(name, None, None)


def test_unknown_scheduler_lists_scheduler_names():
    with pytest.raises(UnknownName) as info:
        resolve_sampler("Euler", None, "Karras2", scheduler_field="hr_scheduler")
    message = str(info.value)
    assert "hr_scheduler" in message and "'Karras2'" in message
    assert "'karras'" in message and "'sgm_uniform'" in message


@pytest.mark.parametrize(
    ("sampler", "scheduler", "reason"),
    [
        ("Euler a", "karras", "no such option"),
        ("Euler a Karras", None, "no such option"),
        ("LCM", "exponential", "no such option"),
        ("Euler", "kl_optimal", "cannot compute"),
        ("DPM++ 2M", "Align Your Steps", "cannot compute"),
        ("Euler", "polyexponential", "cannot compute"),
    ],
)
def test_unsupported_combination_names_both_fields(sampler, scheduler, reason):
    with pytest.raises(RequestError) as info:
        resolve_sampler(sampler, None, scheduler)
    assert not isinstance(info.value, UnknownName)
    message = str(info.value)
    assert "sampler_name" in message and "scheduler" in message
    assert repr(sampler) in message
    assert reason in message
    assert "'automatic'" in message  # lists what this sampler supports


def test_beta_schedule_follows_scipy():
    if _installed(("scipy",)):
        assert resolve_sampler("Euler", None, "beta").schedule_label == "Beta"
    else:
        with pytest.raises(RequestError, match="scipy"):
            resolve_sampler("Euler", None, "beta")
        assert "beta" not in [s["name"] for s in list_schedulers()]


def test_list_samplers_has_webui_shape_and_every_entry_resolves():
    listed = list_samplers()
    assert [s["name"] for s in listed] == supported_sampler_names()
    assert {"Euler", "Euler a", "DPM++ 2M", "DDIM", "UniPC"} <= set(supported_sampler_names())
    for entry in listed:
        assert set(entry) == {"name", "aliases", "options"}
        assert resolve_sampler(entry["name"], None, None).sampler == entry["name"]
        for alias in entry["aliases"]:
            assert resolve_sampler(alias, None, None).sampler == entry["name"]
    by_name = {s["name"]: s for s in listed}
    assert by_name["DPM++ 2M"]["options"] == {"scheduler": "karras"}
    assert by_name["Euler a"]["aliases"] == ["k_euler_a", "k_euler_ancestral"]


def test_list_schedulers_has_webui_shape_and_every_entry_resolves():
    listed = list_schedulers()
    assert listed[0]["name"] == AUTOMATIC
    for entry in listed:
        assert set(entry) == {"name", "label", "aliases", "default_rho", "need_inner_model"}
        for text in (entry["name"], entry["label"], *(entry["aliases"] or [])):
            assert resolve_sampler("Euler", None, text).scheduler in {entry["name"], AUTOMATIC}
    by_name = {s["name"]: s for s in listed}
    assert by_name["karras"]["default_rho"] == 7.0
    assert by_name["sgm_uniform"]["aliases"] == ["SGMUniform"]
    assert by_name["uniform"]["aliases"] is None


def test_table_is_consistent():
    owner: dict[str, str] = {}
    for row in SAMPLERS:
        for text in (row.name, *row.aliases):
            assert owner.setdefault(text.casefold(), row.name) == row.name, text
        assert set(row.schedules) <= set(SCHEDULE_BY_NAME)
        if row.scheduler_class is not None and not row.ignores_schedule:
            assert row.effective_default in row.schedules, row.name
        if row.scheduler_class is None:
            assert row.unsupported_reason
    schedule_keys: set[str] = set()
    for schedule in SCHEDULES:
        assert isinstance(schedule, ScheduleRow)
        for text in (schedule.name, schedule.label, *(schedule.aliases or ())):
            schedule_keys.add(text.casefold())
    assert len(schedule_keys) >= len(SCHEDULES)


def test_every_build_is_a_fresh_object():
    choice = resolve_sampler("DPM++ 2M", None, None)
    first = _build(choice, SD1)
    second = _build(choice, SD1)
    assert first is not second
    first.set_timesteps(5)
    first.register_to_config(solver_order=1)
    second.set_timesteps(STEPS)
    assert len(second.timesteps) == STEPS
    assert second.config.solver_order == 2
    assert _build(choice, SD1).config.solver_order == 2


def test_base_config_is_not_mutated():
    base = dict(SDXL_LIKE)
    _build(resolve_sampler("DDIM", None, None), base)
    assert base == SDXL_LIKE


@pytest.mark.parametrize(
    ("sampler", "eta", "kwargs"),
    [
        ("DDIM", None, {"eta": 0.0}),
        ("DDIM", 0.3, {"eta": 0.3}),
        ("Euler a", None, {}),
        ("Euler a", 0.5, {}),
        ("Euler", 0.5, {}),
        ("UniPC", 0.5, {}),
    ],
)
def test_sampler_call_kwargs(sampler, eta, kwargs):
    assert sampler_call_kwargs(resolve_sampler(sampler, None, None), eta) == kwargs


@pytest.mark.parametrize(
    ("sampler", "eta", "warns"),
    [
        ("Euler a", None, False),
        ("Euler a", 1.0, False),
        ("Euler a", 0.5, True),
        ("Euler a", 0.0, True),
        ("DPM2 a", 0.7, True),
        ("DPM++ 2M SDE", 0.2, True),
        ("DDIM", 0.5, False),  # honoured through the call kwarg
        ("Euler", 0.5, False),  # webui ignores eta for Euler too
        ("DPM++ 2M", 0.5, False),
    ],
)
def test_eta_warning(sampler, eta, warns):
    warning = eta_warning(resolve_sampler(sampler, None, None), eta)
    assert (warning is not None) == warns
    if warning is not None:
        assert "eta" in warning and repr(sampler) in warning and str(eta) in warning


def test_eta_infotext_params_follow_what_ran():
    assert eta_infotext_params(resolve_sampler("DDIM", None, None), None) == {}
    assert eta_infotext_params(resolve_sampler("DDIM", None, None), 0.4) == {"Eta DDIM": 0.4}
    assert eta_infotext_params(resolve_sampler("Euler a", None, None), 0.4) == {}


def test_row_flags():
    rows = {row.name: row for row in SAMPLERS}
    assert rows["Euler a"].ancestral and rows["Euler a"].uses_ensd
    assert not rows["Euler"].ancestral
    assert rows["Heun"].second_order
    assert rows["DPM++ 2M"].default_schedule == "karras"
    assert rows["Euler"].default_schedule is None
