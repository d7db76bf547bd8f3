"""txt2img end to end on the tiny models, through the engine's front door."""

from __future__ import annotations

import json
from typing import Any

import pytest

from engine.api import Engine
from engine.errors import RequestError, UnknownName
from engine.infotext import parse_infotext
from engine.samplers import list_samplers

from .helpers import (
    SD1,
    SD2,
    SDXL,
    assert_pixels_changed,
    payload,
    pixels,
    png_parameters,
    with_model,
)


def run(engine: Engine, body: str, endpoint: str = "auto") -> tuple[list[bytes], dict[str, Any]]:
    response = engine.handle(endpoint, body, lambda step, total: None)
    return [image.data for image in response.images], json.loads(response.info)


def test_same_payload_twice_gives_identical_bytes(engine: Engine) -> None:
    first, _ = run(engine, payload())
    second, _ = run(engine, payload())
    assert first == second


def test_another_seed_gives_different_bytes(engine: Engine) -> None:
    first, _ = run(engine, payload(seed=1))
    second, _ = run(engine, payload(seed=2))
    assert first != second
    assert pixels(first[0]).tobytes() != pixels(second[0]).tobytes()


def test_switching_sd1_sdxl_sd1_gives_the_first_bytes_again(engine: Engine) -> None:
    sd1_first, info1 = run(engine, with_model(SD1))
    sdxl, info_xl = run(engine, with_model(SDXL))
    sd1_again, _ = run(engine, with_model(SD1))
    assert info1["sd_model_name"] == "tiny-sd15"
    assert info_xl["sd_model_name"] == "tiny-sdxl"
    assert sdxl != sd1_first
    assert sd1_again == sd1_first


def test_request_without_checkpoint_gets_the_default_not_the_previous(engine: Engine) -> None:
    default, info = run(engine, payload())
    run(engine, with_model(SDXL))
    after, info_after = run(engine, payload())
    assert info["sd_model_name"] == info_after["sd_model_name"] == "tiny-sd15"
    assert after == default


def test_restore_afterwards_false_changes_nothing_beyond_its_request(engine: Engine) -> None:
    default, _ = run(engine, payload())
    _, info = run(engine, with_model(SDXL, override_settings_restore_afterwards=False))
    assert any("override_settings_restore_afterwards" in w for w in info["warnings"])
    after, info_after = run(engine, payload())
    assert info_after["sd_model_name"] == "tiny-sd15"
    assert after == default


def test_batch_2_by_n_iter_2_gives_four_images_with_consecutive_seeds(engine: Engine) -> None:
    images, info = run(engine, payload(seed=500, batch_size=2, n_iter=2))
    assert len(images) == 4
    assert info["all_seeds"] == [500, 501, 502, 503]
    assert info["seed"] == 500
    assert len(info["infotexts"]) == 4
    for i, (data, text) in enumerate(zip(images, info["infotexts"], strict=True)):
        assert parse_infotext(text)["Seed"] == str(500 + i)
        assert png_parameters(data) == text
    assert len({pixels(d).tobytes() for d in images}) == 4


def test_infotext_and_info_follow_webui(engine: Engine) -> None:
    images, info = run(engine, payload(sampler_name="DPM++ 2M", cfg_scale=7, steps=3))
    text = png_parameters(images[0])
    assert text is not None
    lines = text.split("\n")
    assert lines[0] == "a lighthouse on a cliff"
    assert lines[1] == "Negative prompt: blurry"
    assert lines[2].startswith(
        "Steps: 3, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7.0, Seed: 1234, "
        "Size: 64x64, "
        f"Model hash: {info['sd_model_hash']}, Model: tiny-sd15, Version: "
    )
    assert len(info["sd_model_hash"]) == 10
    keys = list(info)
    assert keys[:4] == ["prompt", "all_prompts", "negative_prompt", "all_negative_prompts"]
    assert info["sampler_name"] == "DPM++ 2M"
    assert info["cfg_scale"] == 7.0 and isinstance(info["cfg_scale"], float)
    assert info["extra_generation_params"]["Schedule type"] == "Karras"


def test_legacy_sampler_name_with_schedule_suffix(engine: Engine) -> None:
    legacy, info = run(engine, payload(sampler_name="DPM++ 2M Karras", steps=3))
    split, _ = run(engine, payload(sampler_name="DPM++ 2M", scheduler="karras", steps=3))
    assert legacy == split
    assert info["sampler_name"] == "DPM++ 2M"


def test_sampler_changes_the_image(engine: Engine) -> None:
    euler, _ = run(engine, payload(sampler_name="Euler"))
    ancestral, _ = run(engine, payload(sampler_name="Euler a"))
    assert_pixels_changed(euler, ancestral)


def test_clip_skip_changes_sd1_and_does_not_leak(engine: Engine) -> None:
    plain, _ = run(engine, payload())
    skipped, info = run(engine, payload(override_settings={"CLIP_stop_at_last_layers": 2}))
    assert_pixels_changed(skipped, plain)
    assert info["clip_skip"] == 2
    assert "Clip skip: 2" in info["infotexts"][0]
    again, _ = run(engine, payload())
    assert again == plain


def test_sd2_v_prediction_checkpoint_generates(engine: Engine) -> None:
    loaded = next(c for c in engine.models.cache.loaded.values() if c.info.name == SD2)
    assert loaded.prediction_type == "v_prediction"
    images, info = run(engine, with_model(SD2))
    assert len(images) == 1 and info["sd_model_name"] == "tiny-sd21-v"


@pytest.mark.parametrize("alias", ["tiny-sdxl", "tiny-sdxl.safetensors", "title", "hash", "sha256"])
def test_checkpoint_aliases_select_the_same_model(engine: Engine, alias: str) -> None:
    info = engine.models.catalog.resolve_checkpoint(SDXL)
    name = str(
        {"title": info.title, "hash": info.shorthash, "sha256": info.sha256}.get(alias, alias)
    )
    _, result = run(engine, with_model(name))
    assert result["sd_model_name"] == "tiny-sdxl"


def test_unknown_checkpoint_is_an_error_listing_titles(engine: Engine) -> None:
    with pytest.raises(UnknownName) as err:
        run(engine, with_model("no-such-model"))
    message = str(err.value)
    assert "override_settings.sd_model_checkpoint" in message
    assert "'no-such-model'" in message
    assert "tiny-sd15.safetensors [" in message


def test_unknown_sampler_is_an_error_listing_supported_ones(engine: Engine) -> None:
    with pytest.raises(RequestError) as err:
        run(engine, payload(sampler_name="Not A Sampler"))
    message = str(err.value)
    assert "sampler_name" in message and "Not A Sampler" in message and "Euler a" in message


def test_several_bad_fields_are_reported_together(engine: Engine) -> None:
    with pytest.raises(RequestError) as err:
        run(engine, payload(steps=0, width=5000, cfg_scale="high"))
    fields = {p.field for p in err.value.problems}
    assert {"steps", "width", "cfg_scale"} <= fields


def test_unknown_fields_and_unsupported_ones_become_warnings(engine: Engine) -> None:
    _, info = run(engine, payload(not_a_field=1, restore_faces=True))
    warnings = " | ".join(info["warnings"])
    assert "not_a_field" in warnings
    assert "restore_faces" in warnings and "not supported yet" in warnings


def test_send_images_false_returns_no_images_but_info(engine: Engine) -> None:
    images, info = run(engine, payload(send_images=False))
    assert images == []
    assert len(info["infotexts"]) == 1


def test_jpeg_format_on_request(engine: Engine) -> None:
    response = engine.handle("txt2img", payload(override_settings={"samples_format": "jpg"}))
    assert response.images[0].extension == "jpg"
    assert response.images[0].data[:3] == b"\xff\xd8\xff"


def test_progress_is_reported_per_step(engine: Engine) -> None:
    steps: list[tuple[int, int]] = []
    engine.handle("txt2img", payload(steps=3), lambda s, t: steps.append((s, t)))
    assert steps == [(1, 3), (2, 3), (3, 3)]


@pytest.mark.parametrize(
    ("endpoint", "check"),
    [
        (
            "sd-models",
            lambda data: (
                {"title", "model_name", "hash", "sha256", "filename", "config"} <= set(data[0])
            ),
        ),
        ("samplers", lambda data: any(s["name"] == "Euler a" for s in data)),
        ("schedulers", lambda data: any(s["name"] == "karras" for s in data)),
    ],
)
def test_listing_endpoints(engine: Engine, endpoint: str, check: Any) -> None:
    response = engine.handle(endpoint, "{}")
    assert response.images == []
    assert check(response.listing)


def test_sd_models_listing_names_every_tiny_checkpoint(engine: Engine) -> None:
    titles = [m["title"] for m in engine.handle("sd-models", "").listing]
    assert [t.split(" [")[0] for t in titles] == sorted(
        [SD1, SD2, SDXL, "tiny-sd15_inpainting.safetensors", "tiny-sdxl_refiner.safetensors"],
        key=str.lower,
    )


@pytest.mark.parametrize("sampler", [s["name"] for s in list_samplers()])
def test_every_listed_sampler_runs(engine: Engine, sampler: str) -> None:
    images, info = run(engine, payload(sampler_name=sampler, steps=3))
    assert len(images) == 1
    assert info["sampler_name"] == sampler
    assert f"Sampler: {sampler}," in info["infotexts"][0]


@pytest.mark.parametrize("model", [SDXL, SD2])
def test_clip_skip_is_ignored_outside_sd1_as_in_webui(engine: Engine, model: str) -> None:
    plain, _ = run(engine, with_model(model))
    body = payload(override_settings={"sd_model_checkpoint": model, "CLIP_stop_at_last_layers": 2})
    skipped, info = run(engine, body)
    assert skipped != plain  # the infotext says "Clip skip: 2", as webui's does
    assert pixels(skipped[0]).tobytes() == pixels(plain[0]).tobytes()
    assert any("CLIP_stop_at_last_layers is ignored" in w for w in info["warnings"])
