"""Every `override_settings` key the engine accepts does what a webui user would notice, or is
accepted-and-ignored with a warning and no effect (engine/payload.py OPTIONS).

One row per option: the request with the option against the same request without it, observed
as a webui user would (decoded pixels, the infotext webui writes, the image file). Infotext keys
are webui 1.10.1's (modules/processing.py create_infotext, sd_samplers_*.py, sd_hijack_clip.py).
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from engine.api import Engine, EngineConfig
from engine.payload import OPTIONS

from .helpers import (
    INPAINT,
    SD1,
    SDXL,
    assert_pixels_changed,
    b64_png,
    box_mask,
    card_image,
    payload,
    png_parameters,
)

IMG2IMG = {"init_images": [b64_png(card_image(64, 64))], "denoising_strength": 0.5}
INPAINTING = {
    **IMG2IMG,
    "mask": b64_png(box_mask(64, 64, (16, 16, 47, 47))),
    "denoising_strength": 0.9,
    "inpaint_full_res": False,
    "mask_blur": 0,
}
# 70 one-token words, a comma, 10 more: at the 75-token chunk end the comma is 5 tokens back, so
# webui's comma back-off (sd_hijack_clip.py, up to comma_padding_backtrack tokens) moves the
# last words into the next chunk; with 0 they stay.
LONG_PROMPT = "cat " * 70 + ", " + "dog " * 10
EMPHASISED = "a (lighthouse:1.6) on a [cliff]"
MODEL_HIRES = {
    "enable_hr": True,
    "hr_scale": 2,
    "hr_upscaler": "R-ESRGAN 4x+",
    "denoising_strength": 0.3,
}
SWINIR_HIRES = {**MODEL_HIRES, "hr_upscaler": "SwinIR 4x"}


@dataclass(frozen=True)
class Row:
    option: str
    value: Any
    request: dict[str, Any] = field(default_factory=dict)  # what the option needs to matter
    pixels: bool = True  # the picture changes
    infotext: str | None = None  # this text appears in the infotext (None: not checked)
    absent: tuple[str, ...] = ()  # these infotext keys disappear
    check: str | None = None  # a special observation (see test below)


HONOURED = (
    Row("sd_model_checkpoint", SDXL.removesuffix(".safetensors"), infotext="Model: tiny-sdxl"),
    Row("CLIP_stop_at_last_layers", 2, infotext="Clip skip: 2"),
    Row("samples_format", "jpg", pixels=False, check="jpeg"),
    Row("jpeg_quality", 10, {"override_settings": {"samples_format": "jpg"}}, check="quality"),
    Row("enable_pnginfo", False, pixels=False, check="no-pnginfo"),
    Row("add_model_hash_to_info", False, pixels=False, absent=("Model hash",)),
    Row("add_model_name_to_info", False, pixels=False, absent=("Model",)),
    Row("add_version_to_infotext", False, pixels=False, absent=("Version",)),
    Row("eta_ancestral", 0.5, {"sampler_name": "Euler a"}, infotext="Eta: 0.5"),
    Row("eta_ddim", 0.5, {"sampler_name": "DDIM"}, infotext="Eta DDIM: 0.5"),
    Row("sd_vae", "tiny-vae.safetensors", infotext="VAE: tiny-vae"),
    Row("eta_noise_seed_delta", 31337, {"sampler_name": "Euler a"}, infotext="ENSD: 31337"),
    # On a CPU engine the "GPU" source is torch's CPU generator too: only the infotext differs.
    Row("randn_source", "CPU", pixels=False, infotext="RNG: CPU"),
    # "No norm" against "Original": test_no_norm_emphasis_skips_webuis_mean_restore below.
    Row("emphasis", "Ignore", {"prompt": EMPHASISED}),
    # webui get_sigmas: the schedule options apply to a schedule with a function (Karras here)
    # and are written as "Schedule min/max sigma" / "Schedule rho".
    Row("sigma_min", 0.5, {"scheduler": "Karras"}, infotext="Schedule min sigma: 0.5"),
    Row("sigma_max", 4.0, {"scheduler": "Karras"}, infotext="Schedule max sigma: 4.0"),
    Row("rho", 3.0, {"scheduler": "Karras"}, infotext="Schedule rho: 3.0"),
    Row("beta_dist_alpha", 0.3, {"scheduler": "Beta"}, infotext="Beta schedule alpha: 0.3"),
    Row("beta_dist_beta", 0.3, {"scheduler": "Beta"}, infotext="Beta schedule beta: 0.3"),
    # The sigma range 0.1 .. 10 instead of the model's (webui writes no infotext key for it).
    Row("use_old_karras_scheduler_sigmas", True, {"scheduler": "Karras"}),
    Row("s_churn", 1.0, infotext="Sigma churn: 1.0"),
    # Churn only where s_tmin <= sigma <= s_tmax: a window holding no sigma turns it off again.
    Row("s_tmin", 1000.0, {"override_settings": {"s_churn": 1.0}}, check="churn-off"),
    Row("s_tmax", 1e-4, {"override_settings": {"s_churn": 1.0}}, check="churn-off"),
    # webui passes s_noise only to the samplers that take it (sampler_extra_params): not Euler a.
    Row("s_noise", 0.5, {"sampler_name": "DPM2 a"}, infotext="Sigma noise: 0.5"),
    Row("always_discard_next_to_last_sigma", True, infotext="Discard penultimate sigma: True"),
    Row("img2img_fix_steps", True, IMG2IMG),
    Row("initial_noise_multiplier", 0.5, IMG2IMG, infotext="Noise multiplier: 0.5"),
    Row(
        "inpainting_mask_weight",
        0.5,
        {**INPAINTING, "override_settings": {"sd_model_checkpoint": INPAINT}},
        infotext="Conditional mask weight: 0.5",
    ),
    Row("comma_padding_backtrack", 0, {"prompt": LONG_PROMPT}),
    # Off, `#` and what follows it are prompt text (webui's Comments script does nothing).
    Row("enable_prompt_comments", False, {"prompt": "a lighthouse # on a stormy cliff"}),
    Row(
        "upscaler_for_img2img",
        "Nearest",
        {**IMG2IMG, "init_images": [b64_png(card_image(32, 32))]},
    ),
    # A model upscaler in the hires pass: the 64x64 first pass fits one default (192) tile;
    # 32-pixel tiles cut it into several, and their overlap decides how the seams blend.
    Row("ESRGAN_tile", 32, MODEL_HIRES),
    Row("ESRGAN_tile_overlap", 0, {**MODEL_HIRES, "override_settings": {"ESRGAN_tile": 32}}),
    # The same for a SwinIR file, whose tiles (webui's upscale_2) take the SWIN_ options.
    Row("SWIN_tile", 32, SWINIR_HIRES),
    Row("SWIN_tile_overlap", 0, {**SWINIR_HIRES, "override_settings": {"SWIN_tile": 32}}),
)

# Known, validated, and not acted on: a warning names them, and the picture is the plain one.
IGNORED = (
    Row("s_min_uncond", 5.0),
    Row("sgm_noise_multiplier", True),
    Row("token_merging_ratio", 0.5),
    Row("sd_lora", "tiny-lora-sd15"),
    Row("use_old_scheduling", True),
    Row("img2img_color_correction", True, IMG2IMG),
)


def test_every_accepted_option_has_a_row() -> None:
    assert sorted(r.option for r in HONOURED + IGNORED) == sorted(OPTIONS)
    assert {r.option for r in HONOURED} == {n for n, spec in OPTIONS.items() if spec.honoured}


def request(row: Row, with_option: bool) -> str:
    body = {k: v for k, v in row.request.items() if k != "override_settings"}
    settings = dict(row.request.get("override_settings", {}))
    if with_option:
        settings[row.option] = row.value
    return payload(**body, override_settings=settings or None)


def run(engine: Engine, body: str) -> tuple[list[bytes], dict[str, Any]]:
    response = engine.handle("auto", body, lambda step, total: None)
    return [image.data for image in response.images], json.loads(response.info)


def infotext_keys(text: str) -> set[str]:
    last = text.splitlines()[-1]
    return {part.split(":", 1)[0].strip() for part in last.split(", ") if ":" in part}


@pytest.mark.parametrize("row", HONOURED, ids=lambda r: r.option)
def test_honoured_option_has_its_webui_effect(engine: Engine, row: Row) -> None:
    plain, _ = run(engine, request(row, with_option=False))
    got, info = run(engine, request(row, with_option=True))
    text = info["infotexts"][0]
    assert not any(row.option in w for w in info["warnings"]), info["warnings"]
    if row.pixels:
        assert_pixels_changed(plain, got)
    if row.infotext is not None:
        assert row.infotext in text
    for key in row.absent:
        assert key in infotext_keys(info_of(engine, request(row, False)))
        assert key not in infotext_keys(text)
    if row.check == "jpeg":
        assert Image.open(io.BytesIO(got[0])).format == "JPEG"
    elif row.check == "quality":
        assert len(got[0]) < len(plain[0])  # quality 10 against webui's default 80
    elif row.check == "no-pnginfo":
        assert png_parameters(plain[0]) is not None and png_parameters(got[0]) is None
    elif row.check == "churn-off":
        # The same request with churn but without this option's window: churn changed pixels.
        no_churn = request(Row(row.option, row.value), with_option=False)
        unchurned, _ = run(engine, no_churn)
        assert [px(d) for d in got] == [px(d) for d in unchurned]


@pytest.mark.parametrize(
    ("option", "value", "request_fields", "key"),
    [
        ("s_churn", 1.0, {}, "Sigma churn"),
        ("s_noise", 0.5, {"sampler_name": "DPM2 a"}, "Sigma noise"),
        ("always_discard_next_to_last_sigma", True, {}, "Discard penultimate sigma"),
    ],
)
def test_sampler_extras_are_in_info_too(
    engine: Engine, option: str, value: Any, request_fields: dict[str, Any], key: str
) -> None:
    """webui writes these into p.extra_generation_params, which `info` carries as well."""
    _, info = run(engine, request(Row(option, value, request_fields), with_option=True))
    assert info["extra_generation_params"][key] == value
    assert f"{key}: {value}" in info["infotexts"][0]


def info_of(engine: Engine, body: str) -> str:
    text: str = run(engine, body)[1]["infotexts"][0]
    return text


def px(data: bytes) -> bytes:
    return Image.open(io.BytesIO(data)).convert("RGB").tobytes()


@pytest.mark.parametrize("row", IGNORED, ids=lambda r: r.option)
def test_ignored_option_warns_and_changes_nothing(engine: Engine, row: Row) -> None:
    plain, _ = run(engine, request(row, with_option=False))
    got, info = run(engine, request(row, with_option=True))
    assert f"override_settings.{row.option}: not supported yet; ignored" in info["warnings"]
    assert [px(d) for d in got] == [px(d) for d in plain]


def test_no_norm_emphasis_skips_webuis_mean_restore(tiny_models_dir: Path, tmp_path: Path) -> None:
    """ "Original" rescales the weighted chunk back to its mean, "No norm" does not
    (webui sd_emphasis.py). The tiny text encoders' final layer norm has a zero bias, so their
    chunk mean is ~0 and the rescale is skipped; real CLIP's bias is not zero. Same weights
    with a biased final norm show the difference."""
    models = tmp_path / "models"
    (models / "checkpoints").mkdir(parents=True)
    state = load_file(str(tiny_models_dir / "checkpoints" / SD1))
    bias = "cond_stage_model.transformer.text_model.final_layer_norm.bias"
    state[bias] = torch.full_like(state[bias], 0.5)
    save_file(state, str(models / "checkpoints" / SD1))
    biased = Engine.setup(EngineConfig(models_dir=models, cache_dir=models / ".cache"))
    original, _ = run(biased, payload(prompt=EMPHASISED))
    no_norm, info = run(
        biased, payload(prompt=EMPHASISED, override_settings={"emphasis": "No norm"})
    )
    assert info["warnings"] == []
    assert_pixels_changed(original, no_norm)


def test_emphasis_mode_is_in_the_infotext(engine: Engine) -> None:
    # webui 1.10.1 sd_hijack_clip.py: "Emphasis: <mode>" when an encoded text has ( or [ and
    # the mode is not Original; prompt-editing brackets are resolved before that check.
    row = next(r for r in HONOURED if r.option == "emphasis")
    assert "Emphasis: Ignore" in info_of(engine, request(row, with_option=True))
    assert "Emphasis:" not in info_of(engine, request(row, with_option=False))
    editing_only = payload(prompt="a [cat:dog:0.5]", override_settings={"emphasis": "Ignore"})
    assert "Emphasis:" not in info_of(engine, editing_only)


def test_readme_lists_every_option_as_honoured_or_ignored() -> None:
    readme = (Path(__file__).parents[1] / "README.md").read_text(encoding="utf-8")
    bullet = readme.split("- **override_settings**:", 1)[1].split("\n- ", 1)[0]
    honoured, ignored = bullet.split("Accepted,", 1)
    for row in HONOURED:
        assert f"`{row.option}`" in honoured, row.option
    for row in IGNORED:
        assert f"`{row.option}`" in ignored, row.option
