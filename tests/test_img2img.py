"""img2img, inpainting, hires fix, refiner and webui seed semantics on the tiny models."""

from __future__ import annotations

import base64
import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

import engine.passes as passes_module
from engine.api import Engine, EngineConfig
from engine.errors import RequestError, UnknownName
from engine.payload import choose_mode, decode_api_json, parse_request
from engine.planning import make_plan

from .helpers import (
    SDXL,
    assert_pixels_changed,
    b64_png,
    box_mask,
    card_image,
    mean_pixel_change,
    payload,
    pixels,
)


def run(engine: Engine, body: str) -> tuple[list[bytes], dict[str, Any]]:
    response = engine.handle("auto", body, lambda s, t: None)
    return [image.data for image in response.images], json.loads(response.info)


def plan_of(engine: Engine, body: str) -> Any:
    data = decode_api_json(body, engine.limits)
    parsed = parse_request(data, choose_mode("auto", data), engine.limits)
    return make_plan(engine.models, parsed, engine.limits)


INIT = card_image(96, 64)


def i2i(**changes: Any) -> str:
    return payload(**{"init_images": [b64_png(INIT)], "denoising_strength": 0.5, **changes})


# -- img2img ---------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", [0, 1, 2, 3])
def test_resize_modes_give_the_requested_size(engine: Engine, mode: int) -> None:
    images, info = run(engine, i2i(resize_mode=mode, width=64, height=64))
    assert pixels(images[0]).size == (64, 64)
    assert info["denoising_strength"] == 0.5
    assert "Denoising strength: 0.5" in info["infotexts"][0]


@pytest.mark.parametrize("mode", [0, 1, 2])
def test_init_image_content_lands_where_webui_puts_it(engine: Engine, mode: int) -> None:
    """The prepared init image equals a PIL reference of the same geometry."""
    plan = plan_of(engine, i2i(resize_mode=mode, width=64, height=64))
    got = np.asarray(plan.img2img.inits[0].image.convert("RGB"), dtype=np.int16)
    if mode == 0:
        reference = INIT.resize((64, 64), Image.Resampling.LANCZOS)
    elif mode == 1:  # cover 64x64 keeping 3:2, centre crop: 96x64 -> 96x64, crop x 16..80
        reference = INIT.crop((16, 0, 80, 64))
    else:  # fit inside: 96x64 -> 64x(64*64//96 = 42) at y = 32 - 21, bands filled from the edges
        fitted = INIT.resize((64, 42), Image.Resampling.LANCZOS)
        reference = Image.new("RGB", (64, 64))
        reference.paste(fitted, (0, 11))
    ref = np.asarray(reference, dtype=np.int16)
    if mode == 2:  # compare the pasted band only; the filled edges are webui's stretch
        got, ref = got[11:53], ref[11:53]
    assert np.abs(got - ref).max() <= 2


def test_denoising_changes_the_image_and_more_denoising_changes_more(engine: Engine) -> None:
    low, _ = run(engine, i2i(denoising_strength=0.2, steps=10))
    high, _ = run(engine, i2i(denoising_strength=0.9, steps=10))
    assert_pixels_changed(low, high)
    init = [base64.b64decode(b64_png(INIT.resize(pixels(low[0]).size)))]
    assert mean_pixel_change(high, init) > mean_pixel_change(low, init)


def test_webui_step_rule_for_img2img(engine: Engine) -> None:
    steps: list[tuple[int, int]] = []
    engine.handle(
        "img2img", i2i(steps=20, denoising_strength=0.75), lambda s, t: steps.append((s, t))
    )
    # webui: t_enc = int(0.75 * 20) = 15; k-diffusion samplers run t_enc + 1 = 16 steps.
    assert len(steps) == 16


def test_one_init_image_repeats_for_the_batch_and_more_than_batch_size_is_an_error(
    engine: Engine,
) -> None:
    images, info = run(engine, i2i(batch_size=2))
    assert len(images) == 2 and info["all_seeds"] == [1234, 1235]
    body = payload(init_images=[b64_png(INIT)] * 3, batch_size=2)
    with pytest.raises(RequestError, match="init_images"):
        run(engine, body)


def test_fewer_init_images_than_batch_size_make_the_batch_and_info_says_so(
    engine: Engine,
) -> None:
    # webui's img2img init sets p.batch_size = len(imgs) when 1 < len(imgs) <= batch_size.
    other = card_image(96, 64).transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    images, info = run(engine, i2i(init_images=[b64_png(INIT), b64_png(other)], batch_size=4))
    assert len(images) == 2
    assert info["batch_size"] == 2


def test_a_very_thin_init_image_is_fitted_by_resize_and_fill(engine: Engine) -> None:
    # 1x512 into 64x64 keeping the aspect ratio is 0 px wide (webui crashes); kept at 1 px,
    # and the bands stretch that column across the picture.
    thin = Image.new("RGB", (1, 512), (200, 30, 60))
    plan = plan_of(engine, i2i(init_images=[b64_png(thin)], resize_mode=2, width=64, height=64))
    prepared = np.asarray(plan.img2img.inits[0].image.convert("RGB"), dtype=np.int16)
    assert prepared.shape == (64, 64, 3)
    assert np.abs(prepared - np.array([200, 30, 60])).max() <= 2
    images, _ = run(engine, i2i(init_images=[b64_png(thin)], resize_mode=2, width=64, height=64))
    assert pixels(images[0]).size == (64, 64)


def test_latent_resize_refuses_an_init_image_under_8_px_a_side(engine: Engine) -> None:
    # resize_mode 3 VAE-encodes the image at its own size; the encoder fails below 8 px.
    small = b64_png(Image.new("RGB", (4, 40), (9, 9, 9)))
    with pytest.raises(RequestError) as err:
        run(engine, i2i(init_images=[small], resize_mode=3))
    assert [p.field for p in err.value.problems] == ["init_images[0]"]
    assert "4x40" in str(err.value) and "8 px" in str(err.value)
    # Several images are encoded as one batch at their own size: they must agree.
    with pytest.raises(RequestError) as err:
        pair = [b64_png(INIT), b64_png(card_image(64, 96))]
        run(engine, i2i(init_images=pair, batch_size=2, resize_mode=3))
    assert [p.field for p in err.value.problems] == ["init_images[1]"]
    assert "64x96" in str(err.value) and "96x64" in str(err.value)
    images, _ = run(engine, i2i(init_images=[b64_png(Image.new("RGB", (8, 8)))], resize_mode=3))
    assert pixels(images[0]).size == (64, 64)


def test_bad_init_image_is_a_clear_error(engine: Engine) -> None:
    with pytest.raises(RequestError) as err:
        run(engine, payload(init_images=["not base64!"]))
    assert "init_images[0]" in str(err.value)


def test_include_init_images_echoes_them(engine: Engine) -> None:
    hidden = engine.handle("img2img", i2i()).parameters
    shown = engine.handle("img2img", i2i(include_init_images=True)).parameters
    assert hidden["init_images"] is None
    assert shown["init_images"] == [b64_png(INIT)]


# -- inpainting ------------------------------------------------------------------------------

MASK_BOX = (8, 8, 40, 40)


def inpaint(**changes: Any) -> str:
    mask = box_mask(64, 64, MASK_BOX)
    base = {
        "init_images": [b64_png(card_image(64, 64))],
        "mask": b64_png(mask),
        "denoising_strength": 0.9,
    }
    base.update(changes)
    return payload(**base)


def changed_pixels(data: bytes) -> np.ndarray:
    got = np.asarray(pixels(data), dtype=np.int16)
    original = np.asarray(card_image(64, 64), dtype=np.int16)
    return np.abs(got - original).max(axis=2) > 0


@pytest.mark.parametrize("full_res", [False, True])
def test_inpainting_keeps_pixels_outside_the_mask(engine: Engine, full_res: bool) -> None:
    images, info = run(engine, inpaint(inpaint_full_res=full_res, mask_blur=0))
    changed = changed_pixels(images[0])
    x1, y1, x2, y2 = MASK_BOX
    inside = np.zeros_like(changed)
    inside[y1 : y2 + 1, x1 : x2 + 1] = True
    assert not changed[~inside].any()  # outside: byte-identical to the init image
    assert changed[inside].mean() > 0.5  # inside: repainted
    assert ("Inpaint area: Only masked" in info["infotexts"][0]) == full_res


def test_blurred_mask_changes_only_near_the_mask(engine: Engine) -> None:
    images, _ = run(engine, inpaint(inpaint_full_res=False, mask_blur=4))
    changed = changed_pixels(images[0])
    # sigma 4: webui's kernel is 21 wide, so the blur reaches 10 px past the box (40 -> 50).
    assert not changed[52:, :].any() and not changed[:, 52:].any()
    assert changed[41:50, 8:40].any()  # the blurred rim is partly repainted


def test_inverted_mask_swaps_what_is_repainted(engine: Engine) -> None:
    images, info = run(
        engine, inpaint(inpaint_full_res=False, mask_blur=0, inpainting_mask_invert=1)
    )
    changed = changed_pixels(images[0])
    x1, y1, x2, y2 = MASK_BOX
    assert not changed[y1 : y2 + 1, x1 : x2 + 1].any()
    assert changed[50:, 50:].mean() > 0.5
    assert "Mask mode: Inpaint not masked" in info["infotexts"][0]


def test_each_inpainting_fill_gives_a_distinct_first_latent(
    engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[Any] = []

    class Stop(Exception):
        pass

    def capture(*args: Any, **kwargs: Any) -> Any:
        init = kwargs.get("init", args[6] if len(args) > 6 else None)
        assert init is not None
        seen.append(init.clone())  # the latent the sampler starts from, before its noise
        raise Stop

    monkeypatch.setattr(passes_module, "run_pass", capture)
    for fill in range(4):
        with pytest.raises(Stop):
            run(engine, inpaint(inpainting_fill=fill, inpaint_full_res=False))
    assert all(not seen[i].equal(seen[j]) for i in range(4) for j in range(i + 1, 4))


def test_only_masked_mode_processes_the_crop(engine: Engine) -> None:
    plan = plan_of(engine, inpaint(inpaint_full_res=True, inpaint_full_res_padding=4, mask_blur=0))
    crop = plan.img2img.inits[0].paste_to
    assert (crop.x1, crop.y1) <= (8 - 4, 8 - 4) and (crop.x2, crop.y2) >= (40 + 4, 40 + 4)
    assert plan.img2img.inits[0].image.size == (64, 64)  # the crop, resized to width x height


def test_inpainting_checkpoint_inpaints_and_generates(engine: Engine) -> None:
    model = {"sd_model_checkpoint": "tiny-sd15_inpainting"}
    images, info = run(
        engine, inpaint(override_settings=model, inpaint_full_res=False, mask_blur=0)
    )
    changed = changed_pixels(images[0])
    x1, y1, x2, y2 = MASK_BOX
    assert changed[y1 : y2 + 1, x1 : x2 + 1].mean() > 0.5
    changed[y1 : y2 + 1, x1 : x2 + 1] = False
    assert not changed.any()
    assert info["is_using_inpainting_conditioning"] is True
    assert "Conditional mask weight: 1.0" in info["infotexts"][0]
    txt, _ = run(engine, payload(override_settings={"sd_model_checkpoint": "tiny-sd15_inpainting"}))
    assert len(txt) == 1


def test_sdxl_img2img_and_inpainting(engine: Engine) -> None:
    model = {"sd_model_checkpoint": SDXL}
    images, info = run(
        engine, inpaint(override_settings=model, inpaint_full_res=False, mask_blur=0)
    )
    assert info["sd_model_name"] == "tiny-sdxl"
    x1, y1, x2, y2 = MASK_BOX
    changed = changed_pixels(images[0])
    outside = np.ones_like(changed)
    outside[y1 : y2 + 1, x1 : x2 + 1] = False
    assert not changed[outside].any()


# -- hires fix -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("changes", "size", "key"),
    [
        ({"hr_scale": 2}, (128, 128), "Hires upscale: 2.0"),
        ({"hr_resize_x": 96}, (96, 96), "Hires resize: 96x0"),
        ({"hr_resize_y": 80}, (80, 80), "Hires resize: 0x80"),
        ({"hr_resize_x": 128, "hr_resize_y": 96}, (128, 96), "Hires resize: 128x96"),
        ({"hr_scale": 1.5, "hr_upscaler": "Lanczos"}, (96, 96), "Hires upscaler: Lanczos"),
        ({"hr_scale": 1.5, "hr_upscaler": "Latent (nearest-exact)"}, (96, 96), "Hires upscaler"),
    ],
)
def test_hires_output_size(
    engine: Engine, changes: dict[str, Any], size: tuple[int, int], key: str
) -> None:
    images, info = run(engine, payload(enable_hr=True, denoising_strength=0.5, **changes))
    assert pixels(images[0]).size == size
    assert info["width"] == 64 and info["height"] == 64  # webui reports the first pass
    assert key in info["infotexts"][0]
    assert "Denoising strength: 0.5" in info["infotexts"][0]


def test_hires_steps_follow_webui_arithmetic(engine: Engine) -> None:
    totals: list[int] = []
    body = payload(enable_hr=True, steps=10, hr_second_pass_steps=6, denoising_strength=0.7)
    engine.handle("txt2img", body, lambda s, t: totals.append(t))
    first, second = totals[:10], totals[10:]
    assert set(first) == {10}
    # webui: the second pass runs exactly hr_second_pass_steps of an int(6 / 0.7) = 8 schedule.
    assert len(second) == 6


def test_unknown_hires_upscaler_lists_the_available_ones(engine: Engine) -> None:
    with pytest.raises(UnknownName) as err:
        run(engine, payload(enable_hr=True, hr_upscaler="4x-UltraSharp"))
    assert "hr_upscaler" in str(err.value) and "Lanczos" in str(err.value)
    assert "'R-ESRGAN 4x+'" in str(err.value)  # the installed model upscalers are offered too


def test_hires_prompt_and_sampler_are_reported(engine: Engine) -> None:
    _, info = run(engine, payload(enable_hr=True, hr_prompt="a castle", hr_sampler_name="Euler a"))
    text = info["infotexts"][0]
    assert "Hires prompt: a castle" in text and "Hires sampler: Euler a" in text


HIRES = {"enable_hr": True, "hr_scale": 1.5, "denoising_strength": 0.7, "hr_second_pass_steps": 3}


def _rgb(images: list[bytes]) -> list[bytes]:
    return [pixels(d).tobytes() for d in images]


def test_hires_negative_prompt_is_used_by_the_second_pass(engine: Engine) -> None:
    """webui: the second pass is conditioned on hr_negative_prompt ("" = the negative prompt),
    infotext "Hires negative prompt" only when it differs from the negative prompt."""
    plain, info = run(engine, payload(**HIRES))
    other, other_info = run(engine, payload(**HIRES, hr_negative_prompt="ugly, grainy"))
    same, same_info = run(engine, payload(**HIRES, hr_negative_prompt="blurry"))
    assert_pixels_changed(plain, other)
    assert 'Hires negative prompt: "ugly, grainy"' in other_info["infotexts"][0]
    assert _rgb(same) == _rgb(plain)
    for text in (info["infotexts"][0], same_info["infotexts"][0]):
        assert "Hires negative prompt" not in text
    # Only the second pass: the same request without hires is unchanged by the field.
    first, _ = run(engine, payload())
    first_other, _ = run(engine, payload(hr_negative_prompt="ugly, grainy"))
    assert _rgb(first) == _rgb(first_other)


def test_hires_schedule_type_is_used_by_the_second_pass(engine: Engine) -> None:
    """webui sd_samplers_kdiffusion.get_sigmas: the hires pass takes hr_scheduler and writes
    "Hires schedule type" when it differs from the first pass's."""
    plain, info = run(engine, payload(**HIRES))
    karras, karras_info = run(engine, payload(**HIRES, hr_scheduler="Karras"))
    assert_pixels_changed(plain, karras)
    assert "Hires schedule type: Karras" in karras_info["infotexts"][0]
    assert "Hires schedule type" not in info["infotexts"][0]
    # The first pass alone: hr_scheduler does not touch it.
    first, _ = run(engine, payload())
    first_karras, _ = run(engine, payload(hr_scheduler="Karras"))
    assert _rgb(first) == _rgb(first_karras)


# -- refiner ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def two_sd1_engine(tiny_models_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Engine:
    """Two SD1 checkpoints with different weights (a base and a "refiner")."""
    from safetensors.torch import load_file, save_file

    folder = tmp_path_factory.mktemp("two-sd1")
    (folder / "checkpoints").mkdir()
    source = tiny_models_dir / "checkpoints" / "tiny-sd15.safetensors"
    shutil.copy(source, folder / "checkpoints" / "a-base.safetensors")
    state = load_file(str(source))
    for key in [k for k in state if k.startswith("model.diffusion_model.out.")]:
        state[key] = state[key] * -1.5
    save_file(state, str(folder / "checkpoints" / "b-refiner.safetensors"))
    return Engine.setup(EngineConfig(models_dir=folder, cache_dir=folder / ".cache"))


def test_refiner_switches_checkpoints_at_its_fraction(two_sd1_engine: Engine) -> None:
    engine = two_sd1_engine
    plain, _ = run(engine, payload(steps=6))
    refined, info = run(
        engine, payload(steps=6, refiner_checkpoint="b-refiner", refiner_switch_at=0.5)
    )
    only_refiner, _ = run(
        engine, payload(steps=6, override_settings={"sd_model_checkpoint": "b-refiner"})
    )
    assert_pixels_changed(refined, plain)
    assert_pixels_changed(refined, only_refiner)
    assert "Refiner: b-refiner [" in info["infotexts"][0]
    assert "Refiner switch at: 0.5" in info["infotexts"][0]
    for off in ("", "None"):
        same, _ = run(engine, payload(steps=6, refiner_checkpoint=off, refiner_switch_at=0.5))
        assert same == plain
    # At 0 webui switches before the first step: the refiner's picture (same VAE and text
    # encoder here).
    from_start, info = run(
        engine, payload(steps=6, refiner_checkpoint="b-refiner", refiner_switch_at=0)
    )
    assert mean_pixel_change(from_start, only_refiner) == 0.0
    assert "Refiner switch at: 0.0," in info["infotexts"][0]  # a float field, as webui


def test_refiner_of_another_family_is_an_error(engine: Engine) -> None:
    with pytest.raises(RequestError, match="refiner_checkpoint"):
        run(engine, payload(refiner_checkpoint=SDXL, refiner_switch_at=0.5))


def test_unknown_refiner_is_an_error(engine: Engine) -> None:
    with pytest.raises(UnknownName, match="refiner_checkpoint"):
        run(engine, payload(refiner_checkpoint="nope", refiner_switch_at=0.8))


# -- seeds -----------------------------------------------------------------------------------


def test_an_images_seed_not_its_batch_position_decides_it(engine: Engine) -> None:
    alone, _ = run(engine, payload(seed=5000))
    batch, info = run(engine, payload(seed=4998, batch_size=3))
    assert info["all_seeds"] == [4998, 4999, 5000]
    # Same noise, same conditioning: equal up to the rounding of batched CPU kernels, which
    # sum in another order for a batch of 3 than for 1 (at most one level of 255).
    diff = np.abs(np.asarray(pixels(batch[2]), np.int16) - np.asarray(pixels(alone[0]), np.int16))
    assert diff.max() <= 1
    other = np.abs(np.asarray(pixels(batch[1]), np.int16) - np.asarray(pixels(alone[0]), np.int16))
    assert other.max() > 10


def test_variation_strength_zero_is_no_variation(engine: Engine) -> None:
    plain, _ = run(engine, payload(seed=7))
    zero, _ = run(engine, payload(seed=7, subseed=99, subseed_strength=0))
    assert pixels(zero[0]).tobytes() == pixels(plain[0]).tobytes()


def test_variation_strength_one_is_the_subseed_image(engine: Engine) -> None:
    as_seed, _ = run(engine, payload(seed=99))
    full, info = run(engine, payload(seed=7, subseed=99, subseed_strength=1.0))
    assert pixels(full[0]).tobytes() == pixels(as_seed[0]).tobytes()
    assert "Variation seed: 99, Variation seed strength: 1.0" in info["infotexts"][0]


def test_variation_batch_shares_the_seed_and_counts_subseeds(engine: Engine) -> None:
    _, info = run(engine, payload(seed=7, subseed=20, subseed_strength=0.3, batch_size=2))
    assert info["all_seeds"] == [7, 7] and info["all_subseeds"] == [20, 21]


def test_seed_resize_from_changes_the_noise(engine: Engine) -> None:
    plain, _ = run(engine, payload(seed=7))
    resized, info = run(engine, payload(seed=7, seed_resize_from_w=32, seed_resize_from_h=32))
    assert pixels(resized[0]).tobytes() != pixels(plain[0]).tobytes()
    assert "Seed resize from: 32x32" in info["infotexts"][0]


def test_cpu_randn_source_is_reported(engine: Engine) -> None:
    _, info = run(engine, payload(override_settings={"randn_source": "CPU"}))
    assert "RNG: CPU" in info["infotexts"][0]


def test_ensd_changes_ancestral_samplers_only(engine: Engine) -> None:
    euler_a, _ = run(engine, payload(sampler_name="Euler a"))
    euler_a_ensd, info = run(
        engine, payload(sampler_name="Euler a", override_settings={"eta_noise_seed_delta": 31337})
    )
    assert_pixels_changed(euler_a, euler_a_ensd)
    assert "ENSD: 31337" in info["infotexts"][0]
    euler, _ = run(engine, payload(sampler_name="Euler"))
    euler_ensd, info = run(
        engine, payload(sampler_name="Euler", override_settings={"eta_noise_seed_delta": 31337})
    )
    assert pixels(euler[0]).tobytes() == pixels(euler_ensd[0]).tobytes()
    assert "ENSD" not in info["infotexts"][0]


# -- tiling ----------------------------------------------------------------------------------


def test_tiling_makes_seamless_images_and_leaves_nothing_behind(engine: Engine) -> None:
    plain, _ = run(engine, payload())
    tiled, info = run(engine, payload(tiling=True))
    assert_pixels_changed(tiled, plain)
    assert "Tiling: True" in info["infotexts"][0]
    # Seamless: the jump across the wrap-around edge is like the jumps inside the image.
    arr = np.asarray(pixels(tiled[0]), dtype=np.float32)
    wrap = np.abs(arr[:, 0] - arr[:, -1]).mean()
    inside = np.abs(arr[:, 1:] - arr[:, :-1]).mean()
    assert wrap < 2 * inside
    again, _ = run(engine, payload())
    assert again == plain
    convs = [m for m in engine.models.cache.loaded.values() for m in m.pipe.unet.modules()]
    assert all(getattr(m, "padding_mode", "zeros") == "zeros" for m in convs)


def test_initial_noise_multiplier(engine: Engine) -> None:
    plain, _ = run(engine, i2i())
    scaled, info = run(engine, i2i(initial_noise_multiplier=0.5))
    assert_pixels_changed(scaled, plain)
    assert "Noise multiplier: 0.5" in info["infotexts"][0]


def test_legacy_firstphase_size_is_the_first_pass(engine: Engine) -> None:
    images, info = run(
        engine,
        payload(enable_hr=True, firstphase_width=64, firstphase_height=64, width=128, height=128),
    )
    assert info["width"] == 64 and pixels(images[0]).size == (128, 128)


def test_hires_checkpoint_must_share_the_latent_space(engine: Engine) -> None:
    with pytest.raises(RequestError, match="hr_checkpoint_name"):
        run(engine, payload(enable_hr=True, hr_checkpoint_name=SDXL))
    _, info = run(engine, payload(enable_hr=True, hr_checkpoint_name="tiny-sd15"))
    assert "Hires checkpoint: tiny-sd15 [" in info["infotexts"][0]


def test_sdxl_base_with_the_sdxl_refiner(engine: Engine) -> None:
    model = {"sd_model_checkpoint": SDXL}
    plain, _ = run(engine, payload(steps=6, override_settings=model))
    refined, info = run(
        engine,
        payload(
            steps=6,
            override_settings=model,
            refiner_checkpoint="tiny-sdxl_refiner",
            refiner_switch_at=0.5,
        ),
    )
    assert_pixels_changed(refined, plain)
    assert "Refiner: tiny-sdxl_refiner [" in info["infotexts"][0]
    alone, _ = run(
        engine, payload(steps=6, override_settings={"sd_model_checkpoint": "tiny-sdxl_refiner"})
    )
    assert len(alone) == 1
    with pytest.raises(RequestError, match="refiner_checkpoint"):
        run(engine, payload(refiner_checkpoint="tiny-sdxl_refiner", refiner_switch_at=0.5))


def test_sde_sampler_noise_follows_the_seed_across_n_iter(engine: Engine) -> None:
    """DPM++ SDE seeds its Brownian noise with the batch's seeds, not the first batch's."""
    body = payload(seed=100, n_iter=2, sampler_name="DPM++ SDE")
    both, info = run(engine, body)
    alone, _ = run(engine, payload(seed=101, sampler_name="DPM++ SDE"))
    assert info["all_seeds"] == [100, 101]
    assert both[1] == alone[0]
