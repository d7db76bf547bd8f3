"""The sampler table: webui names and schedule types -> working diffusers schedulers."""

from __future__ import annotations

import importlib.util
import types
from typing import Any

import pytest
import torch

from engine.errors import GenerationError, RequestError, UnknownName
from engine.samplers import (
    AUTOMATIC,
    SAMPLERS,
    SCHEDULES,
    ScheduleRow,
    discard_infotext_params,
    effective_eta,
    eta_infotext_params,
    list_samplers,
    list_schedulers,
    resolve_sampler,
    sigma_infotext_params,
    supported_sampler_names,
)
from engine.sampling import decode_latents
from engine.schedules import AYS_SD1, AYS_SDXL, Discretization, sigmas_for, timestep_grid

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


def test_unknown_scheduler_lists_scheduler_names():
    with pytest.raises(UnknownName) as info:
        resolve_sampler("Euler", None, "Karras2", scheduler_field="hr_scheduler")
    message = str(info.value)
    assert "hr_scheduler" in message and "'Karras2'" in message
    assert "'karras'" in message and "'sgm_uniform'" in message


def test_beta_schedule_follows_scipy():
    if importlib.util.find_spec("scipy") is not None:
        assert resolve_sampler("Euler", None, "beta").schedule_label == "Beta"
    else:
        with pytest.raises(RequestError, match="scipy"):
            resolve_sampler("Euler", None, "beta")
        assert "beta" not in [s["name"] for s in list_schedulers()]


def test_list_samplers_has_webui_shape_and_every_entry_resolves():
    listed = list_samplers()
    # The listing itself is compared with webui's in tests/test_webui_tables.py.
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
        if not row.ignores_schedule:
            assert row.effective_default in row.schedules, row.name
    schedule_keys: set[str] = set()
    for schedule in SCHEDULES:
        assert isinstance(schedule, ScheduleRow)
        for text in (schedule.name, schedule.label, *(schedule.aliases or ())):
            schedule_keys.add(text.casefold())
    assert len(schedule_keys) >= len(SCHEDULES)


def test_eta_infotext_params_follow_what_ran():
    """webui Sampler.initialize prints the eta when it differs from the sampler's default."""
    assert eta_infotext_params(resolve_sampler("DDIM", None, None), 0.0) == {}
    assert eta_infotext_params(resolve_sampler("DDIM", None, None), 0.4) == {"Eta DDIM": 0.4}
    assert eta_infotext_params(resolve_sampler("Euler a", None, None), 1.0) == {}
    assert eta_infotext_params(resolve_sampler("Euler a", None, None), 0.4) == {"Eta": 0.4}
    assert eta_infotext_params(resolve_sampler("Euler", None, None), None) == {}


@pytest.mark.parametrize(
    ("sampler", "request_eta", "expected"),
    [
        ("Euler a", None, 1.0),  # opts.eta_ancestral
        ("Euler a", 0.0, 0.0),  # webui's own test request sends eta 0
        ("DPM++ 2M SDE", 0.3, 0.3),
        ("DDIM", None, 0.0),  # opts.eta_ddim
        ("DDIM", 0.5, 0.5),
        ("Euler", 0.5, None),  # no eta parameter
        ("DPM++ 2M", 0.5, None),
    ],
)
def test_effective_eta(sampler, request_eta, expected):
    choice = resolve_sampler(sampler, None, None)
    assert effective_eta(choice, request_eta, eta_ancestral=1.0, eta_ddim=0.0) == expected


def test_every_webui_sampler_and_schedule_is_listed():
    """All 20 webui 1.10 samplers and 12 schedule types run here (Beta needs scipy)."""
    assert len(supported_sampler_names()) == 20
    assert len(list_schedulers()) == 12
    for row in SAMPLERS:
        for schedule in SCHEDULES:
            resolve_sampler(row.name, None, schedule.name)


def test_row_flags():
    rows = {row.name: row for row in SAMPLERS}
    assert rows["Euler a"].ancestral and rows["Euler a"].uses_ensd
    assert not rows["Euler"].ancestral
    assert rows["Heun"].second_order
    assert rows["DPM++ 2M"].default_schedule == "karras"
    assert rows["Euler"].default_schedule is None


# --------------------------------------------------------------------------------------------
# Schedules, grids and 8-bit conversion


def test_timestep_grid_is_webuis():
    """webui CompVisSampler.get_timesteps: range(0, 1000, 1000 // steps) + 1 (15 steps give 16
    timesteps, the case diffusers' "leading" spacing got wrong)."""
    assert timestep_grid(20).tolist() == [t + 1 for t in range(0, 1000, 50)]
    assert timestep_grid(15).tolist() == [t + 1 for t in range(0, 1000, 66)]
    assert len(timestep_grid(15)) == 16


def test_discard_penultimate_sigma():
    model = Discretization.from_config(SD1)
    plain = sigmas_for("karras", 5, model)
    discarded = sigmas_for("karras", 5, model, discard_penultimate=True)
    assert len(plain) == len(discarded) == 6
    six = sigmas_for("karras", 6, model)
    assert discarded.tolist() == [*six[:-2].tolist(), 0.0]


@pytest.mark.parametrize("schedule", [r.name for r in SCHEDULES[1:]])
def test_every_schedule_spans_the_model_and_ends_at_zero(schedule: str):
    """webui's quirks kept: the DDIM schedule steps every 1000 // n training sigmas from t=1, so
    it can run more steps than asked (7 -> 8); KL Optimal ends at sigma_min, not 0."""
    model = Discretization.from_config(SD1)
    for steps in (1, 7, 20):
        sigmas = sigmas_for(schedule, steps, model)
        if schedule == "ddim":
            assert len(sigmas) == len(range(1, 1000, 1000 // steps)) + 1
        else:
            assert len(sigmas) == steps + 1
        if schedule == "kl_optimal":
            assert float(sigmas[-1]) == pytest.approx(model.sigma_min, rel=1e-5)
        else:
            assert sigmas[-1] == 0
        assert sigmas.dtype == torch.float32
        assert bool((sigmas[:-1] > 0).all()) and bool((sigmas[:-2] >= sigmas[1:-1]).all())
        assert float(sigmas[0]) <= SIGMA_MAX + 1e-3


def test_align_your_steps_uses_the_published_tables():
    """11 steps use NVIDIA's 11 sigmas as they are; other counts interpolate them log-linearly."""
    model = Discretization.from_config(SD1)
    assert sigmas_for("align_your_steps", 11, model)[:-1].tolist() == pytest.approx(AYS_SD1)
    assert sigmas_for("align_your_steps", 11, model, sdxl=True)[:-1].tolist() == pytest.approx(
        AYS_SDXL
    )
    five = sigmas_for("align_your_steps", 5, model)
    assert len(five) == 6 and float(five[0]) == pytest.approx(AYS_SD1[0])
    assert float(five[-2]) == pytest.approx(AYS_SD1[-1])


class _PixelsVAE:
    """Stands in for a VAE in a unit test of the 8-bit conversion only."""

    dtype = torch.float32

    class config:
        scaling_factor = 1.0

    def __init__(self, pixels: torch.Tensor):
        self.pixels = pixels

    def decode(self, latents: torch.Tensor) -> Any:
        return types.SimpleNamespace(sample=self.pixels)


def test_8bit_conversion_truncates_like_webui():
    # (x + 1) / 2 * 255: 0.999 -> 254.87 and -0.5 -> 63.75; webui's astype(uint8) truncates.
    pixels = torch.tensor([0.999, -0.5, 2.0, -3.0]).view(1, 1, 2, 2).repeat(1, 3, 1, 1)
    image = decode_latents(_PixelsVAE(pixels), torch.zeros(1, 4, 1, 1))[0]
    assert list(image.getdata())[:4] == [(254,) * 3, (63,) * 3, (255,) * 3, (0,) * 3]


def test_nan_in_decoded_pixels_is_an_error():
    pixels = torch.zeros(1, 3, 2, 2)
    pixels[0, 1, 1, 1] = float("nan")
    with pytest.raises(GenerationError, match="NaN"):
        decode_latents(_PixelsVAE(pixels), torch.zeros(1, 4, 1, 1))


def test_sigma_and_discard_infotext_follow_webui():
    """webui prints "Sigma *" only for the samplers whose function takes the setting."""
    euler = resolve_sampler("Euler", None, None)
    euler_a = resolve_sampler("Euler a", None, None)
    values = {"s_churn": 0.5, "s_tmin": 0.0, "s_tmax": 0.0, "s_noise": 1.003}
    assert sigma_infotext_params(euler, **values) == {"Sigma churn": 0.5, "Sigma noise": 1.003}
    assert sigma_infotext_params(euler_a, **values) == {}  # Euler a takes none of them
    assert sigma_infotext_params(resolve_sampler("DPM2 a", None, None), **values) == {
        "Sigma noise": 1.003
    }
    assert discard_infotext_params(euler, True) == {"Discard penultimate sigma": True}
    assert discard_infotext_params(resolve_sampler("DPM2", None, None), True) == {}
    assert discard_infotext_params(euler, False) == {}
