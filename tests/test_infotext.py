"""engine.infotext: webui infotext text, its parser and the `info` JSON.

Every expected string below is written by hand from webui v1.10.1's layout
(shared/reference/webui-api.md §2, §3), not produced by the code under test.
"""

from __future__ import annotations

import dataclasses
import json
from datetime import datetime
from typing import Any

import pytest

from engine.infotext import (
    ImageParams,
    InfoRecord,
    create_infotext,
    info_json,
    job_timestamp,
    parse_infotext,
    quote,
)

SD15 = ImageParams(
    steps=20,
    sampler="DPM++ 2M",
    schedule_type="Karras",
    cfg_scale=7.0,
    seed=1234,
    width=512,
    height=512,
    model_hash="6ce0161689",
    model_name="v1-5-pruned-emaonly",
    version="v1.10.1",
)

# A bare image: no model, no version, so each case shows only what it changes.
BARE = ImageParams(
    steps=20,
    sampler="Euler a",
    schedule_type="Automatic",
    cfg_scale=7.0,
    seed=7,
    width=512,
    height=512,
)


def test_plain_sd15_txt2img_matches_webui() -> None:
    text = create_infotext("a cat", "blurry", SD15)
    assert text == (
        "a cat\n"
        "Negative prompt: blurry\n"
        "Steps: 20, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7.0, Seed: 1234, "
        "Size: 512x512, Model hash: 6ce0161689, Model: v1-5-pruned-emaonly, Version: v1.10.1"
    )


PARAMS_LINE_CASES = [
    pytest.param(
        {},
        "Steps: 20, Sampler: Euler a, Schedule type: Automatic, CFG scale: 7.0, Seed: 7, "
        "Size: 512x512",
        id="clip-skip-1-absent",
    ),
    pytest.param(
        {"schedule_type": None, "width": 768, "height": 512},
        "Steps: 20, Sampler: Euler a, CFG scale: 7.0, Seed: 7, Size: 768x512",
        id="no-schedule-type",
    ),
    pytest.param(
        {"clip_skip": 2, "denoising_strength": 0.5, "seed_resize_from": (640, 480)},
        "Steps: 20, Sampler: Euler a, Schedule type: Automatic, CFG scale: 7.0, Seed: 7, "
        "Size: 512x512, Seed resize from: 640x480, Denoising strength: 0.5, Clip skip: 2",
        id="clip-skip-2-after-denoising-and-seed-resize",
    ),
    pytest.param(
        {"seed_resize_from": (640, 0)},
        "Steps: 20, Sampler: Euler a, Schedule type: Automatic, CFG scale: 7.0, Seed: 7, "
        "Size: 512x512",
        id="seed-resize-needs-both-sides",
    ),
    pytest.param(
        {"ensd": 31337, "rng": "CPU"},
        "Steps: 20, Sampler: Euler a, Schedule type: Automatic, CFG scale: 7.0, Seed: 7, "
        "Size: 512x512, ENSD: 31337, RNG: CPU",
        id="ensd-and-cpu-rng",
    ),
    pytest.param(
        {"rng": "GPU"},
        "Steps: 20, Sampler: Euler a, Schedule type: Automatic, CFG scale: 7.0, Seed: 7, "
        "Size: 512x512",
        id="gpu-rng-hidden",
    ),
    pytest.param(
        {"subseed": 99, "subseed_strength": 0.25},
        "Steps: 20, Sampler: Euler a, Schedule type: Automatic, CFG scale: 7.0, Seed: 7, "
        "Size: 512x512, Variation seed: 99, Variation seed strength: 0.25",
        id="variation-seed-pair",
    ),
    pytest.param(
        {"subseed": 99, "subseed_strength": 0.0},
        "Steps: 20, Sampler: Euler a, Schedule type: Automatic, CFG scale: 7.0, Seed: 7, "
        "Size: 512x512",
        id="variation-seed-hidden-at-strength-0",
    ),
    pytest.param(
        {"cfg_scale": 7, "denoising_strength": 1, "subseed": 3, "subseed_strength": 1},
        "Steps: 20, Sampler: Euler a, Schedule type: Automatic, CFG scale: 7.0, Seed: 7, "
        "Size: 512x512, Variation seed: 3, Variation seed strength: 1.0, "
        "Denoising strength: 1.0",
        id="ints-print-as-pydantic-floats",
    ),
    pytest.param(
        {
            "image_cfg_scale": 1.5,
            "face_restoration": "CodeFormer",
            "model_hash": "6ce0161689",
            "model_name": "v1-5",
            "vae_hash": "735e4c3a44",
            "vae_name": "vae-ft-mse-840000-ema-pruned",
            "denoising_strength": 0.75,
            "conditional_mask_weight": 1.0,
            "init_image_hash": "abc123",
            "rng": "NV",
            "tiling": True,
        },
        "Steps: 20, Sampler: Euler a, Schedule type: Automatic, CFG scale: 7.0, "
        "Image CFG scale: 1.5, Seed: 7, Face restoration: CodeFormer, Size: 512x512, "
        "Model hash: 6ce0161689, Model: v1-5, VAE hash: 735e4c3a44, "
        "VAE: vae-ft-mse-840000-ema-pruned, Denoising strength: 0.75, "
        "Conditional mask weight: 1.0, Init image hash: abc123, RNG: NV, Tiling: True",
        id="every-fixed-key-in-order",
    ),
    pytest.param(
        {
            "schedule_type": "Automatic",
            "extra": {
                "Hires upscale": 2.0,
                "Hires upscaler": "Latent",
                "Lora hashes": "a: 0123456789ab, b: ba9876543210",
                "Schedule type": "Karras",
                "Foo": "Foo",
            },
            "version": "v1.10.1",
            "user": "alice",
        },
        "Steps: 20, Sampler: Euler a, Schedule type: Karras, CFG scale: 7.0, Seed: 7, "
        "Size: 512x512, Hires upscale: 2.0, Hires upscaler: Latent, "
        'Lora hashes: "a: 0123456789ab, b: ba9876543210", Foo, Version: v1.10.1, User: alice',
        id="extras-in-order-schedule-type-stays-3rd-version-after",
    ),
    pytest.param(
        {"denoising_strength": 0.5, "clip_skip": 2, "extra": {"Denoising strength": 0.3}},
        "Steps: 20, Sampler: Euler a, Schedule type: Automatic, CFG scale: 7.0, Seed: 7, "
        "Size: 512x512, Denoising strength: 0.3, Clip skip: 2",
        id="extra-updates-fixed-key-in-place",
    ),
    pytest.param(
        {"denoising_strength": 0.5, "extra": {"Denoising strength": None, "Mask blur": 4}},
        "Steps: 20, Sampler: Euler a, Schedule type: Automatic, CFG scale: 7.0, Seed: 7, "
        "Size: 512x512, Mask blur: 4",
        id="extra-none-removes-key",
    ),
    pytest.param(
        {"extra": {"Hires prompt": "a cat\nin a hat", "Hires negative prompt": "café, nuit"}},
        "Steps: 20, Sampler: Euler a, Schedule type: Automatic, CFG scale: 7.0, Seed: 7, "
        'Size: 512x512, Hires prompt: "a cat\\nin a hat", Hires negative prompt: "café, nuit"',
        id="newline-and-unicode-quoted",
    ),
]


@pytest.mark.parametrize(("changes", "expected_line"), PARAMS_LINE_CASES)
def test_params_line(changes: dict, expected_line: str) -> None:
    params = dataclasses.replace(BARE, **changes)
    assert create_infotext("p", "", params) == "p\n" + expected_line


def test_empty_negative_has_no_negative_line() -> None:
    assert create_infotext("a cat", "", BARE) == (
        "a cat\n"
        "Steps: 20, Sampler: Euler a, Schedule type: Automatic, CFG scale: 7.0, Seed: 7, "
        "Size: 512x512"
    )


def test_multiline_prompt_and_empty_prompt_layout() -> None:
    line = (
        "Steps: 20, Sampler: Euler a, Schedule type: Automatic, CFG scale: 7.0, Seed: 7, "
        "Size: 512x512"
    )
    assert create_infotext("line one\nline two", "bad,\nworse", BARE) == (
        "line one\nline two\nNegative prompt: bad,\nworse\n" + line
    )
    # webui strips the whole text, so an empty prompt leaves no blank first line
    assert create_infotext("", "ugly", BARE) == "Negative prompt: ugly\n" + line
    assert create_infotext("", "", BARE) == line


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("Latent", "Latent"),
        (2.0, "2.0"),
        (20, "20"),
        (True, "True"),
        ("a, b", '"a, b"'),
        ("a: b", '"a: b"'),
        ("a\nb", '"a\\nb"'),
        ("é, ü", '"é, ü"'),
        ('say "hi", ok', '"say \\"hi\\", ok"'),
    ],
)
def test_quote(value: object, expected: str) -> None:
    assert quote(value) == expected


# ---------------------------------------------------------------------------- parsing

REAL_WEBUI_TEXT = (
    "masterpiece, best quality, 1girl, <lora:add_detail:0.5>\n"
    "Negative prompt: (worst quality:1.4), lowres, EasyNegative\n"
    "Steps: 28, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7, Seed: 3503441893, "
    "Size: 512x768, Model hash: 6ce0161689, Model: v1-5-pruned-emaonly, "
    "Denoising strength: 0.45, Clip skip: 2, Hires upscale: 2, Hires upscaler: Latent, "
    'TI hashes: "EasyNegative: c74b4e810b03, badhandv4: 5e40d722fc3d", '
    'Lora hashes: "add_detail: 7c6bad76eb54", '
    'ControlNet 0: "Module: canny, Model: control_v11p_sd15_canny [d14c016b], Weight: 1.0", '
    "Version: v1.10.1"
)


def test_parse_real_webui_text_with_quoted_commas() -> None:
    assert parse_infotext(REAL_WEBUI_TEXT) == {
        "Steps": "28",
        "Sampler": "DPM++ 2M",
        "Schedule type": "Karras",
        "CFG scale": "7",
        "Seed": "3503441893",
        "Size": "512x768",
        "Size-1": "512",
        "Size-2": "768",
        "Model hash": "6ce0161689",
        "Model": "v1-5-pruned-emaonly",
        "Denoising strength": "0.45",
        "Clip skip": "2",
        "Hires upscale": "2",
        "Hires upscaler": "Latent",
        "TI hashes": "EasyNegative: c74b4e810b03, badhandv4: 5e40d722fc3d",
        "Lora hashes": "add_detail: 7c6bad76eb54",
        "ControlNet 0": "Module: canny, Model: control_v11p_sd15_canny [d14c016b], Weight: 1.0",
        "Version": "v1.10.1",
        "Prompt": "masterpiece, best quality, 1girl, <lora:add_detail:0.5>",
        "Negative prompt": "(worst quality:1.4), lowres, EasyNegative",
    }


def test_round_trip_plain() -> None:
    parsed = parse_infotext(create_infotext("a cat", "blurry", SD15))
    assert parsed == {
        "Steps": "20",
        "Sampler": "DPM++ 2M",
        "Schedule type": "Karras",
        "CFG scale": "7.0",
        "Seed": "1234",
        "Size": "512x512",
        "Size-1": "512",
        "Size-2": "512",
        "Model hash": "6ce0161689",
        "Model": "v1-5-pruned-emaonly",
        "Version": "v1.10.1",
        "Prompt": "a cat",
        "Negative prompt": "blurry",
    }


def test_round_trip_quoted_values_multiline_prompts_no_negative() -> None:
    params = dataclasses.replace(
        BARE,
        seed_resize_from=(640, 480),
        extra={
            "Lora hashes": "a: 0123456789ab, b: ba9876543210",
            "Hires prompt": 'two\nlines, "quoted"',
            "Hires resize": "1024x768",
        },
    )
    prompt = "a cat, (fluffy:1.2)\nsecond line: with colon"
    parsed = parse_infotext(create_infotext(prompt, "", params))
    assert parsed["Prompt"] == prompt
    assert parsed["Negative prompt"] == ""
    assert parsed["Lora hashes"] == "a: 0123456789ab, b: ba9876543210"
    assert parsed["Hires prompt"] == 'two\nlines, "quoted"'
    assert (parsed["Seed resize from-1"], parsed["Seed resize from-2"]) == ("640", "480")
    assert (parsed["Hires resize-1"], parsed["Hires resize-2"]) == ("1024", "768")
    assert parsed["Steps"] == "20"


def test_round_trip_multiline_negative_and_empty_prompt() -> None:
    parsed = parse_infotext(create_infotext("", "bad hands,\nblurry", BARE))
    assert parsed["Prompt"] == ""
    assert parsed["Negative prompt"] == "bad hands,\nblurry"
    assert parsed["Seed"] == "7"


def test_last_line_with_few_pairs_is_prompt() -> None:
    parsed = parse_infotext("a photo\nof a cat: cute, fluffy")
    assert parsed == {"Prompt": "a photo\nof a cat: cute, fluffy", "Negative prompt": ""}


def test_parse_drops_bare_keys_and_empty_values_like_webui() -> None:
    parsed = parse_infotext("x\nSteps: 20, Sampler: Euler, Foo, Bar: , Seed: 1")
    assert parsed == {
        "Steps": "20",
        "Sampler": "Euler",
        "Seed": "1",
        "Prompt": "x",
        "Negative prompt": "",
    }


def test_parse_with_defaults_fills_only_missing_keys() -> None:
    parsed = parse_infotext(
        "x\nSteps: 20, Sampler: Euler, Clip skip: 2, Seed: 1", with_defaults=True
    )
    assert parsed["Clip skip"] == "2"
    assert parsed["Schedule type"] == "Automatic"
    assert parsed["RNG"] == "GPU"
    assert parsed["Hires sampler"] == "Use same sampler"
    assert "Clip skip" not in parse_infotext("x\nSteps: 20, Sampler: Euler, Seed: 1")


# ---------------------------------------------------------------------------- info JSON

WEBUI_INFO_KEYS = [
    "prompt", "all_prompts", "negative_prompt", "all_negative_prompts",
    "seed", "all_seeds", "subseed", "all_subseeds", "subseed_strength",
    "width", "height", "sampler_name", "cfg_scale", "steps", "batch_size",
    "restore_faces", "face_restoration_model",
    "sd_model_name", "sd_model_hash", "sd_vae_name", "sd_vae_hash",
    "seed_resize_from_w", "seed_resize_from_h", "denoising_strength",
    "extra_generation_params", "index_of_first_image", "infotexts",
    "styles", "job_timestamp", "clip_skip", "is_using_inpainting_conditioning", "version",
]  # fmt: skip


def _record(**changes: Any) -> InfoRecord:
    base = InfoRecord(
        prompt="a cat",
        all_prompts=["a cat", "a cat"],
        negative_prompt="blurry",
        all_negative_prompts=["blurry", "blurry"],
        seed=1234,
        all_seeds=[1234, 1235],
        subseed=99,
        all_subseeds=[99, 100],
        subseed_strength=0.0,
        width=512,
        height=512,
        sampler_name="DPM++ 2M",
        cfg_scale=7.0,
        steps=20,
        batch_size=2,
        restore_faces=False,
        face_restoration_model=None,
        sd_model_name="v1-5-pruned-emaonly",
        sd_model_hash="6ce0161689",
        sd_vae_name=None,
        sd_vae_hash=None,
        seed_resize_from_w=-1,
        seed_resize_from_h=-1,
        denoising_strength=None,
        extra_generation_params={"Schedule type": "Karras"},
        index_of_first_image=0,
        infotexts=["one", "two"],
        styles=[],
        job_timestamp="20240727120000",
        clip_skip=1,
        is_using_inpainting_conditioning=False,
        version="v1.10.1",
        warnings=["override_settings.foo: ignored"],
    )
    return dataclasses.replace(base, **changes)


def test_info_json_key_order_is_webui_then_warnings() -> None:
    decoded = json.loads(info_json(_record()))
    assert list(decoded) == [*WEBUI_INFO_KEYS, "warnings"]
    assert decoded["warnings"] == ["override_settings.foo: ignored"]
    assert decoded["extra_generation_params"] == {"Schedule type": "Karras"}


def test_info_json_floats_stay_floats_and_ints_are_coerced() -> None:
    text = info_json(_record(cfg_scale=7, subseed_strength=0, denoising_strength=1))
    assert '"subseed_strength": 0.0' in text
    assert '"cfg_scale": 7.0' in text
    assert '"denoising_strength": 1.0' in text
    assert '"seed": 1234,' in text
    assert '"restore_faces": false' in text
    assert '"face_restoration_model": null' in text
    assert '"denoising_strength": null' in info_json(_record())


def test_info_json_unserialisable_value_becomes_null() -> None:
    extra = {"Hires upscale": 2.0, "Thing": object(), "Set": {1, 2}}
    decoded = json.loads(info_json(_record(extra_generation_params=extra)))
    assert decoded["extra_generation_params"] == {"Hires upscale": 2.0, "Thing": None, "Set": None}


def test_info_json_warnings_default_empty() -> None:
    fields = {f.name: getattr(_record(), f.name) for f in dataclasses.fields(InfoRecord)}
    del fields["warnings"]
    assert json.loads(info_json(InfoRecord(**fields)))["warnings"] == []


def test_job_timestamp_format() -> None:
    assert job_timestamp(datetime(2024, 7, 27, 9, 5, 3)) == "20240727090503"
