"""Engine tables against webui 1.10.1's own, written out here from its source (not from ours).

These replace checks that compared a table with values derived from the same table. Sources
(stable-diffusion-webui v1.10.1): modules/sd_samplers_kdiffusion.py `samplers_k_diffusion`,
modules/sd_samplers_timesteps.py `samplers_timesteps`, modules/sd_samplers_lcm.py
`samplers_lcm` (all_samplers is their concatenation; api.get_samplers lists name, aliases,
options), modules/sd_schedulers.py `schedulers` (api.get_schedulers), modules/shared_options.py
and extensions-builtin/Lora/scripts/lora_script.py (`OptionInfo` defaults), modules/upscaler.py
(the built-in upscalers needing no weights).
"""

from __future__ import annotations

from typing import Any

from engine.geometry import PIXEL_UPSCALERS
from engine.payload import OPTIONS, Settings
from engine.samplers import list_samplers, list_schedulers

KARRAS = {"scheduler": "karras"}
EXPONENTIAL = {"scheduler": "exponential"}
WEBUI_SAMPLERS: list[dict[str, Any]] = [
    {"name": "DPM++ 2M", "aliases": ["k_dpmpp_2m"], "options": KARRAS},
    {
        "name": "DPM++ SDE",
        "aliases": ["k_dpmpp_sde"],
        "options": {**KARRAS, "second_order": True, "brownian_noise": True},
    },
    {
        "name": "DPM++ 2M SDE",
        "aliases": ["k_dpmpp_2m_sde"],
        "options": {**EXPONENTIAL, "brownian_noise": True},
    },
    {
        "name": "DPM++ 2M SDE Heun",
        "aliases": ["k_dpmpp_2m_sde_heun"],
        "options": {**EXPONENTIAL, "brownian_noise": True, "solver_type": "heun"},
    },
    {
        "name": "DPM++ 2S a",
        "aliases": ["k_dpmpp_2s_a"],
        "options": {**KARRAS, "uses_ensd": True, "second_order": True},
    },
    {
        "name": "DPM++ 3M SDE",
        "aliases": ["k_dpmpp_3m_sde"],
        "options": {**EXPONENTIAL, "discard_next_to_last_sigma": True, "brownian_noise": True},
    },
    {
        "name": "Euler a",
        "aliases": ["k_euler_a", "k_euler_ancestral"],
        "options": {"uses_ensd": True},
    },
    {"name": "Euler", "aliases": ["k_euler"], "options": {}},
    {"name": "LMS", "aliases": ["k_lms"], "options": {}},
    {"name": "Heun", "aliases": ["k_heun"], "options": {"second_order": True}},
    {
        "name": "DPM2",
        "aliases": ["k_dpm_2"],
        "options": {**KARRAS, "discard_next_to_last_sigma": True, "second_order": True},
    },
    {
        "name": "DPM2 a",
        "aliases": ["k_dpm_2_a"],
        "options": {
            **KARRAS,
            "discard_next_to_last_sigma": True,
            "uses_ensd": True,
            "second_order": True,
        },
    },
    {"name": "DPM fast", "aliases": ["k_dpm_fast"], "options": {"uses_ensd": True}},
    {"name": "DPM adaptive", "aliases": ["k_dpm_ad"], "options": {"uses_ensd": True}},
    {"name": "Restart", "aliases": ["restart"], "options": {**KARRAS, "second_order": True}},
    {"name": "DDIM", "aliases": ["ddim"], "options": {}},
    {"name": "DDIM CFG++", "aliases": ["ddim_cfgpp"], "options": {}},
    {"name": "PLMS", "aliases": ["plms"], "options": {}},
    {"name": "UniPC", "aliases": ["unipc"], "options": {}},
    {"name": "LCM", "aliases": ["k_lcm"], "options": {}},
]

# name, label, aliases, default_rho, need_inner_model
_SCHEDULER_ROWS: list[tuple[str, str, list[str] | None, float, bool]] = [
    ("automatic", "Automatic", None, -1.0, False),
    ("uniform", "Uniform", None, -1.0, True),
    ("karras", "Karras", None, 7.0, False),
    ("exponential", "Exponential", None, -1.0, False),
    ("polyexponential", "Polyexponential", None, 1.0, False),
    ("sgm_uniform", "SGM Uniform", ["SGMUniform"], -1.0, True),
    ("kl_optimal", "KL Optimal", None, -1.0, False),
    ("align_your_steps", "Align Your Steps", None, -1.0, False),
    ("simple", "Simple", None, -1.0, True),
    ("normal", "Normal", None, -1.0, True),
    ("ddim", "DDIM", None, -1.0, True),
    ("beta", "Beta", None, -1.0, True),
]
WEBUI_SCHEDULERS = [
    dict(zip(("name", "label", "aliases", "default_rho", "need_inner_model"), row, strict=True))
    for row in _SCHEDULER_ROWS
]

# OptionInfo defaults of the options the engine knows.
WEBUI_OPTION_DEFAULTS: dict[str, Any] = {
    "sd_model_checkpoint": None,
    "CLIP_stop_at_last_layers": 1,
    "samples_format": "png",
    "enable_pnginfo": True,
    "add_model_hash_to_info": True,
    "add_model_name_to_info": True,
    "add_version_to_infotext": True,
    "eta_ancestral": 1.0,
    "eta_ddim": 0.0,
    "jpeg_quality": 80,
    "sd_vae": "Automatic",
    "eta_noise_seed_delta": 0,
    "randn_source": "GPU",
    "emphasis": "Original",
    "sigma_min": 0.0,
    "sigma_max": 0.0,
    "rho": 0.0,
    "beta_dist_alpha": 0.6,
    "beta_dist_beta": 0.6,
    "use_old_karras_scheduler_sigmas": False,
    "s_min_uncond": 0.0,
    "s_churn": 0.0,
    "s_tmin": 0.0,
    "s_tmax": 0.0,
    "s_noise": 1.0,
    "sgm_noise_multiplier": False,
    "always_discard_next_to_last_sigma": False,
    "img2img_fix_steps": False,
    "initial_noise_multiplier": 1.0,
    "inpainting_mask_weight": 1.0,
    "token_merging_ratio": 0.0,
    "sd_lora": "None",
    "use_old_scheduling": False,
    "comma_padding_backtrack": 20,
    # modules/processing_scripts/comments.py
    "enable_prompt_comments": True,
    "img2img_color_correction": False,
    "upscaler_for_img2img": None,
    # modules/shared_options.py, "Upscaling" section.
    "ESRGAN_tile": 192,
    "ESRGAN_tile_overlap": 8,
    # extensions-builtin/SwinIR/scripts/swinir_model.py, on_ui_settings.
    "SWIN_tile": 192,
    "SWIN_tile_overlap": 8,
}


def test_samplers_listing_is_webuis() -> None:
    assert list_samplers() == WEBUI_SAMPLERS


def test_schedulers_listing_is_webuis() -> None:
    assert list_schedulers() == WEBUI_SCHEDULERS


def test_option_defaults_are_webuis() -> None:
    """What runs when a request overrides nothing: webui's defaults, option by option."""
    assert set(OPTIONS) <= set(WEBUI_OPTION_DEFAULTS)
    assert Settings().model_dump() == {n: WEBUI_OPTION_DEFAULTS[n] for n in OPTIONS}


def test_weightless_upscalers_are_webuis() -> None:
    """modules/upscaler.py: UpscalerNone ("None"), UpscalerLanczos, UpscalerNearest."""
    assert list(PIXEL_UPSCALERS) == ["None", "Lanczos", "Nearest"]
