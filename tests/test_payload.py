"""engine.payload: webui request bodies -> typed requests, settings and warnings."""

from __future__ import annotations

import base64
import json
import math
import urllib.parse
from typing import Any

import numpy as np
import pytest

from engine.errors import RequestError
from engine.payload import (
    IGNORED_FIELDS,
    LIMIT_ENV,
    Img2ImgRequest,
    Limits,
    Mode,
    Range,
    Settings,
    Txt2ImgRequest,
    all_negative_prompts,
    all_prompts,
    choose_mode,
    decode_api_json,
    echo_parameters,
    effective_mask_blur,
    parse_request,
    requested_sampler,
)

IMG = {"init_images": ["aGVsbG8="]}  # img2img needs one; content is not decoded here
LIMITS = Limits()


def txt(**fields: Any):
    return parse_request(fields, "txt2img", LIMITS)


def img(**fields: Any):
    return parse_request({**IMG, **fields}, "img2img", LIMITS)


def problems_of(payload: dict[str, Any], mode: Mode = "txt2img") -> RequestError:
    with pytest.raises(RequestError) as info:
        parse_request(payload, mode, LIMITS)
    return info.value


# ---------------------------------------------------------------------------------------------
# Defaults
# ---------------------------------------------------------------------------------------------

Defaults = list[tuple[str, Any]]

COMMON_DEFAULTS: Defaults = [
    ("prompt", ""),
    ("negative_prompt", ""),
    ("sampler_name", None),
    ("sampler_index", "Euler"),
    ("scheduler", None),
    ("steps", 50),
    ("cfg_scale", 7.0),
    ("width", 512),
    ("height", 512),
    ("seed", -1),
    ("subseed", -1),
    ("subseed_strength", 0.0),
    ("seed_resize_from_w", -1),
    ("seed_resize_from_h", -1),
    ("batch_size", 1),
    ("n_iter", 1),
    ("denoising_strength", 0.75),
    ("eta", None),
    ("restore_faces", None),
    ("tiling", None),
    ("send_images", True),
    ("save_images", False),
    ("override_settings_restore_afterwards", True),
    ("script_args", []),
    ("alwayson_scripts", {}),
]
TXT2IMG_DEFAULTS: Defaults = [
    ("enable_hr", False),
    ("hr_scale", 2.0),
    ("hr_upscaler", None),
    ("hr_second_pass_steps", 0),
    ("firstphase_width", 0),
    ("hr_prompt", ""),
]
IMG2IMG_DEFAULTS: Defaults = [
    ("resize_mode", 0),
    ("mask", None),
    ("mask_blur_x", 4),
    ("mask_blur_y", 4),
    ("mask_blur", None),
    ("mask_round", True),
    ("inpainting_fill", 0),
    ("inpaint_full_res", True),  # API default; the UI's is "Whole picture"
    ("inpaint_full_res_padding", 0),
    ("inpainting_mask_invert", 0),
    ("initial_noise_multiplier", None),
    ("include_init_images", False),
]


@pytest.mark.parametrize(("field", "expected"), COMMON_DEFAULTS + TXT2IMG_DEFAULTS)
def test_empty_txt2img_body_gets_webui_api_defaults(field, expected):
    value = getattr(txt().request, field)
    assert value == expected
    assert type(value) is type(expected)  # 7.0 stays a float, 50 an int


@pytest.mark.parametrize(("field", "expected"), COMMON_DEFAULTS + IMG2IMG_DEFAULTS)
def test_img2img_body_gets_webui_api_defaults(field, expected):
    value = getattr(img().request, field)
    assert value == expected
    assert type(value) is type(expected)


def test_empty_body_is_clean_and_uses_euler():
    parsed = txt()
    assert parsed.mode == "txt2img"
    assert isinstance(parsed.request, Txt2ImgRequest)
    assert parsed.warnings == ()
    assert requested_sampler(parsed.request) == "Euler"
    assert parsed.settings == Settings()


def test_null_means_default_for_every_field():
    every_field_null = dict.fromkeys(Txt2ImgRequest.model_fields)
    assert parse_request(every_field_null, "txt2img", LIMITS).request == txt().request
    assert img(**dict.fromkeys(set(Img2ImgRequest.model_fields) - {"init_images"})).request == (
        img().request
    )


@pytest.mark.parametrize(
    ("payload", "sampler"),
    [
        ({}, "Euler"),
        ({"sampler_index": "DPM++ 2M"}, "DPM++ 2M"),
        ({"sampler_name": "Euler a"}, "Euler a"),
        ({"sampler_name": "Euler a", "sampler_index": "DDIM"}, "Euler a"),
        ({"sampler_name": "", "sampler_index": "DDIM"}, "DDIM"),  # webui: name or index
        ({"sampler_name": None}, "Euler"),
    ],
)
def test_sampler_index_is_the_legacy_alias(payload, sampler):
    assert requested_sampler(txt(**payload).request) == sampler


# ---------------------------------------------------------------------------------------------
# Types and coercions
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "sent", "stored"),
    [
        ("cfg_scale", 7, 7.0),  # webui's pydantic coerces; infotext prints "CFG scale: 7.0"
        ("denoising_strength", 1, 1.0),
        ("eta", 0, 0.0),
        ("steps", 20.0, 20),  # some clients send whole numbers as floats
        ("seed", 1234.0, 1234),
        ("prompt", ["a", "b"], ["a", "b"]),
    ],
)
def test_numbers_are_normalised(field, sent, stored):
    extra = {"batch_size": 2} if field == "prompt" else {}
    value = getattr(txt(**{field: sent}, **extra).request, field)
    assert value == stored
    assert type(value) is type(stored)
    assert str(txt(cfg_scale=7).request.cfg_scale) == "7.0"


# What webui's API accepts through its pydantic v1 models: clients send these (webui's own
# img2img test request, the ControlNet extension's inpaint example, webuiapi, bots).
CLIENT_COERCIONS = [
    ("steps", "5", 5),
    ("steps", 20.7, 20),  # pydantic v1's int() truncates
    ("steps", True, 1),
    ("cfg_scale", "7", 7.0),
    ("cfg_scale", True, 1.0),
    ("enable_hr", "false", False),
    ("enable_hr", "Yes", True),
    ("enable_hr", 1, True),
    ("seed", "-1", -1),
    ("seed", " 42 ", 42),
    ("prompt", 5, "5"),
    ("sampler_name", 3, "3"),
    ("alwayson_scripts", [], {}),
    ("override_settings", [["CLIP_stop_at_last_layers", 2]], {"CLIP_stop_at_last_layers": 2}),
]


@pytest.mark.parametrize(("field", "sent", "stored"), CLIENT_COERCIONS)
def test_webui_coercions_are_accepted(field, sent, stored):
    value = getattr(txt(**{field: sent}).request, field)
    assert value == stored
    assert type(value) is type(stored)


def test_webui_img2img_test_request_types_are_accepted():
    # webui's own test_img2img.py and ControlNet's inpaint example send 0/false here.
    request = img(inpaint_full_res=0, inpainting_mask_invert=False, mask_round="true").request
    assert request.inpaint_full_res is False
    assert request.inpainting_mask_invert == 0
    assert request.mask_round is True


BAD_VALUES = [
    # field, value, words the message must contain
    ("steps", 0, "integer from 1 to 150"),
    ("steps", 151, "integer from 1 to 150"),
    ("steps", "20.5", "integer from 1 to 150"),  # int("20.5") fails in webui too
    ("steps", "twenty", "integer from 1 to 150"),
    ("steps", [20], "integer from 1 to 150"),
    ("batch_size", 9, "from 1 to 8"),
    ("n_iter", 33, "from 1 to 32"),
    ("width", 32, "from 64 to 2048"),
    ("height", 4096, "from 64 to 2048"),
    ("cfg_scale", math.nan, "finite number from -100 to 100"),
    ("cfg_scale", math.inf, "finite number from -100 to 100"),
    ("cfg_scale", "nan", "finite number from -100 to 100"),
    ("cfg_scale", "-Infinity", "finite number from -100 to 100"),
    ("cfg_scale", 101, "from -100 to 100"),
    ("cfg_scale", "high", "number"),
    ("denoising_strength", 1.5, "from 0 to 1"),
    ("eta", 1.5, "from 0 to 1"),
    ("seed", 2**64, "-1 for random"),
    ("seed", "1.5", "-1 for random"),
    ("subseed_strength", 2, "from 0 to 1"),
    ("prompt", {"a": 1}, "string or a list of strings"),
    ("prompt", "x" * 20001, "at most 20000 characters"),
    ("negative_prompt", {"a": 1}, "string or a list of strings"),
    ("sampler_name", [3], "must be a string"),
    ("sampler_index", {}, "must be a string"),
    ("scheduler", ["karras"], "must be a string"),
    ("styles", "anime", "list of strings"),
    ("send_images", "maybe", "true or false"),
    ("send_images", 2, "true or false"),
    ("restore_faces", 0.5, "true or false"),
    ("enable_hr", " true", "true or false"),  # pydantic v1 lowers, never strips
    ("override_settings", ["CLIP_stop_at_last_layers", 2], "JSON object"),
    ("alwayson_scripts", "controlnet", "JSON object"),
    ("script_args", {}, "must be a list"),
    ("hr_scale", 1e6, "from 0 to 16"),
    ("hr_second_pass_steps", 1000000, "integer from 0 to 150"),
    ("hr_resize_x", 60000, "integer from 0 to 2048"),
    ("hr_resize_y", -1, "integer from 0 to 2048"),
    ("firstphase_width", 40000, "integer from 0 to 2048"),
    ("firstphase_height", 40000, "integer from 0 to 2048"),
    ("refiner_switch_at", 1.5, "from 0 to 1"),
    ("s_churn", 101, "from 0 to 100"),
]


@pytest.mark.parametrize(("field", "value", "words"), BAD_VALUES)
def test_bad_value_names_field_value_and_what_is_allowed(field, value, words):
    error = problems_of({field: value})
    assert len(error.problems) == 1
    problem = error.problems[0]
    assert problem.field == field
    assert problem.value is value
    assert words in problem.allowed
    assert field in str(error) and words in str(error)


@pytest.mark.parametrize(
    ("field", "value", "path"),
    [
        ("prompt", ["ok", [3]], "prompt[1]"),
        ("styles", ["a", None], "styles[1]"),
        ("prompt", ["ok", "x" * 20001], "prompt[1]"),
    ],
)
def test_bad_list_item_is_named_by_index(field, value, path):
    error = problems_of({field: value, "batch_size": 2})
    assert [p.field for p in error.problems] == [path]


def test_every_problem_is_reported_in_one_error():
    error = problems_of(
        {
            "steps": 0,
            "cfg_scale": "high",
            "width": 10,
            "seed": "1.5",
            "override_settings": {"CLIP_stop_at_last_layers": 0, "samples_format": "bmp"},
        }
    )
    assert {p.field for p in error.problems} == {
        "steps",
        "cfg_scale",
        "width",
        "seed",
        "override_settings.CLIP_stop_at_last_layers",
        "override_settings.samples_format",
    }
    assert "6 problems" in str(error)


def test_prompt_list_must_have_one_entry_per_image_even_beside_other_problems():
    error = problems_of({"prompt": ["a", "b"], "batch_size": 3, "steps": 0})
    fields = {p.field: p for p in error.problems}
    assert set(fields) == {"prompt", "steps"}
    assert "3 entries" in fields["prompt"].allowed


def test_prompt_lists_give_one_prompt_per_image():
    request = txt(prompt=["a", "b", "c", "d"], negative_prompt="bad", batch_size=2, n_iter=2)
    assert all_prompts(request.request) == ["a", "b", "c", "d"]
    assert all_negative_prompts(request.request) == ["bad"] * 4
    with pytest.raises(RequestError, match="negative_prompt"):
        txt(negative_prompt=["x"], batch_size=2)


@pytest.mark.parametrize(("sent", "used"), [(513, 512), (519, 512), (520, 520), (2047, 2040)])
def test_size_not_multiple_of_8_is_floored_with_a_warning(sent, used):
    parsed = txt(width=sent, height=sent)
    assert (parsed.request.width, parsed.request.height) == (used, used)
    size_warnings = [w for w in parsed.warnings if str(sent) in w and "multiple of 8" in w]
    assert len(size_warnings) == (2 if sent != used else 0)


def test_configurable_limits():
    limits = Limits(steps=Range(1, 10))
    with pytest.raises(RequestError, match="from 1 to 10"):
        parse_request({"steps": 11}, "txt2img", limits=limits)
    assert parse_request({"steps": 10}, "txt2img", limits=limits).request.steps == 10


# ---------------------------------------------------------------------------------------------
# Warnings: unknown keys, the other endpoint's keys, fields we accept but ignore
# ---------------------------------------------------------------------------------------------


def test_unknown_and_other_endpoint_keys_are_warnings_not_errors():
    parsed = txt(foo=1, init_images=["x"], distilled_cfg_scale=3.5)
    assert "unknown field 'foo' ignored" in parsed.warnings
    assert "unknown field 'distilled_cfg_scale' ignored" in parsed.warnings
    assert any("'init_images'" in w and "ignored by txt2img" in w for w in parsed.warnings)
    parsed = img(enable_hr=True)
    assert any("'enable_hr'" in w and "ignored by img2img" in w for w in parsed.warnings)


IGNORED_CASES = [
    # field, values that change nothing (no warning), a value that would (warning)
    ("styles", [None, []], ["Anime"]),
    ("restore_faces", [False], True),
    ("s_churn", [0.0], 0.5),
    ("s_noise", [1.0], 1.003),
    ("script_name", [""], "x/y/z plot"),
    ("script_args", [[]], [1, 2]),
    ("infotext", [""], "a cat\nSteps: 20"),
    ("firstpass_image", [""], "aGVsbG8="),
    ("save_images", [False], True),
    ("override_settings_restore_afterwards", [True], False),
]


@pytest.mark.parametrize(("field", "quiet", "loud"), IGNORED_CASES)
def test_ignored_field_warns_only_when_it_would_change_something(field, quiet, loud):
    for value in quiet:
        assert not [w for w in txt(**{field: value}).warnings if w.startswith(field)]
    warnings = [w for w in txt(**{field: loud}).warnings if w.startswith(f"{field}:")]
    assert len(warnings) == 1 and warnings[0].endswith("ignored")


def test_not_yet_fields_use_the_agreed_wording():
    assert "restore_faces: not supported yet; ignored" in txt(restore_faces=True).warnings
    assert any("never saved" in w for w in txt(save_images=True).warnings)
    restore = txt(override_settings_restore_afterwards=False).warnings
    assert any("never keeps settings between requests" in w for w in restore)


def test_implemented_fields_give_no_warning():
    hr = {"enable_hr": True, "hr_scale": 1.5, "hr_upscaler": "Latent", "hr_second_pass_steps": 10}
    assert txt(**hr, subseed_strength=0.5, seed_resize_from_w=768).warnings == ()
    assert img(mask="bWFzaw==", resize_mode=1, inpaint_full_res=False, mask_blur=8).warnings == ()
    assert (
        txt(override_settings={"eta_noise_seed_delta": 31337, "randn_source": "CPU"}).warnings == ()
    )


def test_ignored_fields_are_still_type_checked():
    error = problems_of({"hr_scale": "2x", "tiling": "maybe", "script_args": "a"})
    assert {p.field for p in error.problems} == {"hr_scale", "tiling", "script_args"}


def test_img2img_requires_init_images():
    payloads: list[dict[str, Any]] = [{}, {"init_images": None}, {"init_images": []}]
    for payload in payloads:
        error = problems_of(payload, "img2img")
        assert [p.field for p in error.problems] == ["init_images"]
    assert problems_of({"init_images": "abc"}, "img2img").problems[0].field == "init_images"


def test_ignored_table_names_real_fields():
    every_field = set(Txt2ImgRequest.model_fields) | set(Img2ImgRequest.model_fields)
    assert set(IGNORED_FIELDS) <= every_field


def test_webui_noop_fields_are_silent():
    parsed = txt(
        do_not_save_samples=True, do_not_save_grid=True, force_task_id="t1", comments={"a": 1}
    )
    assert parsed.warnings == ()


# ---------------------------------------------------------------------------------------------
# override_settings
# ---------------------------------------------------------------------------------------------


def test_honoured_overrides_reach_settings():
    parsed = txt(
        override_settings={
            "CLIP_stop_at_last_layers": 2,
            "sd_model_checkpoint": "v1-5-pruned-emaonly",
            "samples_format": "JPG",  # webui compares case-insensitively
            "eta_ancestral": 1,
            "jpeg_quality": 95,
            "enable_pnginfo": False,
        }
    )
    s = parsed.settings
    assert (s.CLIP_stop_at_last_layers, s.sd_model_checkpoint) == (2, "v1-5-pruned-emaonly")
    assert (s.samples_format, s.jpeg_quality, s.enable_pnginfo) == ("jpg", 95, False)
    assert s.eta_ancestral == 1.0 and isinstance(s.eta_ancestral, float)
    assert parsed.warnings == ()


def test_unknown_option_is_a_warning():
    parsed = txt(override_settings={"show_progressbar": True})
    assert parsed.warnings == ("override_settings.show_progressbar: unknown option; ignored",)


@pytest.mark.parametrize(
    ("option", "default", "other"),
    [
        ("token_merging_ratio", 0.0, 0.5),
        ("sgm_noise_multiplier", False, True),
    ],
)
def test_known_but_not_honoured_option_warns_only_when_not_default(option, default, other):
    assert txt(override_settings={option: default}).warnings == ()
    parsed = txt(override_settings={option: other})
    assert parsed.warnings == (f"override_settings.{option}: not supported yet; ignored",)
    assert getattr(parsed.settings, option) == default  # what actually runs


@pytest.mark.parametrize(
    ("option", "value", "words"),
    [
        ("CLIP_stop_at_last_layers", 13, "integer from 1 to 12"),
        ("CLIP_stop_at_last_layers", "2", "integer"),
        ("samples_format", "bmp", "'png'"),
        ("jpeg_quality", 0, "from 1 to 100"),
        ("enable_pnginfo", "false", "true or false"),
        ("randn_source", "gpu", "'GPU', 'CPU'"),
        ("sd_vae", 1, "string"),
    ],
)
def test_bad_option_value_is_an_error_at_its_path(option, value, words):
    error = problems_of({"override_settings": {option: value}})
    [problem] = error.problems
    assert problem.field == f"override_settings.{option}"
    assert problem.value == value
    assert words in problem.allowed


def test_a_null_option_means_its_default():
    # The defaults themselves are checked against webui's in tests/test_webui_tables.py.
    assert txt(override_settings={"CLIP_stop_at_last_layers": None}).settings == Settings()


# ---------------------------------------------------------------------------------------------
# Helpers for the lead
# ---------------------------------------------------------------------------------------------


def test_echo_parameters_is_the_request_with_defaults():
    params = echo_parameters(txt(prompt="cat", cfg_scale=5))
    assert params["prompt"] == "cat" and params["cfg_scale"] == 5.0 and params["steps"] == 50
    assert params["sampler_name"] is None and params["sampler_index"] == "Euler"
    json.dumps(params)  # the response must serialise


@pytest.mark.parametrize(("include", "echoed"), [(False, None), (True, ["aGVsbG8="])])
def test_echo_parameters_hides_init_images_unless_asked(include, echoed):
    params = echo_parameters(img(mask="bWFzaw==", include_init_images=include))
    assert params["init_images"] == echoed
    assert params["mask"] == ("bWFzaw==" if include else None)


def test_mask_blur_sets_both_axes_like_webui():
    assert effective_mask_blur(img().request) == (4, 4)
    assert effective_mask_blur(img(mask_blur=8).request) == (8, 8)
    assert effective_mask_blur(img(mask_blur_x=2).request) == (2, 4)


# ---------------------------------------------------------------------------------------------
# decode_api_json and choose_mode
# ---------------------------------------------------------------------------------------------

BODY = {"prompt": "a cat, (fluffy:1.2)", "steps": 20, "é": "ü"}
BODY_TEXT = json.dumps(BODY, ensure_ascii=False)
B64 = base64.b64encode(BODY_TEXT.encode()).decode()


@pytest.mark.parametrize(
    "text",
    [
        BODY_TEXT,
        f"  {BODY_TEXT}\n",
        f"data:application/json;base64,{B64}",  # what `cog predict -i api_json=@f.json` sends
        f"data:application/json;charset=utf-8;base64,{B64}",
        f"data:text/plain;base64,{B64.rstrip('=')}",  # padding dropped
        "data:application/json," + urllib.parse.quote(BODY_TEXT),
        "data:application/json;charset=latin-1;base64,"
        + base64.b64encode(BODY_TEXT.encode("latin-1")).decode(),
        "\ufeff" + BODY_TEXT,
    ],
)
def test_decode_api_json_accepts_text_and_data_urls(text):
    assert decode_api_json(text, LIMITS) == BODY


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ('{"prompt": "a cat",}', "not valid JSON"),
        ("{'prompt': 'a cat'}", "line 1 column 2"),
        ("[1, 2]", "not a JSON array"),
        ('"just a string"', "not a JSON string"),
        ("null", "JSON object"),
        ('{"cfg_scale": NaN}', "NaN and Infinity"),
        ('{"cfg_scale": -Infinity}', "NaN and Infinity"),
        ("", "empty"),
        ("data:application/json;base64,{not base64}", "not valid base64"),
        ("data:application/json;base64" + B64, "','"),
        ("data:application/json;charset=nope;base64," + B64, "unknown charset"),
        ("data:application/json;base64," + base64.b64encode(b"\xff\xfe{").decode(), "utf-8"),
    ],
)
def test_decode_api_json_errors_name_api_json_and_say_why(text, words):
    with pytest.raises(RequestError) as info:
        decode_api_json(text, LIMITS)
    [problem] = info.value.problems
    assert problem.field == "api_json"
    assert words in str(info.value)


@pytest.mark.parametrize(
    ("endpoint", "payload", "mode"),
    [
        ("auto", {}, "txt2img"),
        ("auto", {"prompt": "x"}, "txt2img"),
        ("auto", {"init_images": None}, "txt2img"),
        ("auto", {"init_images": ["aGVsbG8="]}, "img2img"),
        ("auto", {"init_images": []}, "img2img"),  # present: img2img then says it is empty
        ("txt2img", {"init_images": ["aGVsbG8="]}, "txt2img"),
        ("img2img", {}, "img2img"),
        (" IMG2IMG ", {}, "img2img"),
    ],
)
def test_choose_mode(endpoint, payload, mode):
    assert choose_mode(endpoint, payload) == mode


def test_choose_mode_rejects_other_endpoints():
    with pytest.raises(RequestError) as info:
        choose_mode("extra-single-image", {})
    assert info.value.problems[0].field == "endpoint"
    assert "'txt2img'" in str(info.value)


# ---------------------------------------------------------------------------------------------
# Implied work: sizes and steps webui derives from the fields, against the limits
# ---------------------------------------------------------------------------------------------

HIRES = {"enable_hr": True}


def fields_of(error: RequestError) -> list[str]:
    return [p.field for p in error.problems]


@pytest.mark.parametrize(
    ("body", "field", "words"),
    [
        # The legacy first pass is the image webui samples (width/height are then ignored).
        (
            {"firstphase_width": 1024, "firstphase_height": 1024},
            "firstphase_width*firstphase_height",
            "first pass would be 1024x1024",
        ),
        ({**HIRES, "hr_scale": 2.0}, "hr_scale", "hires target would be 1024x1024"),
        (
            {**HIRES, "hr_resize_x": 2048, "width": 64, "height": 512},
            "hr_resize_x*hr_resize_y",
            "hires target would be 2048x16384",
        ),
    ],
)
def test_implied_sizes_are_checked_against_the_pixel_limit(body, field, words):
    limits = Limits(pixels=512 * 512)
    with pytest.raises(RequestError) as caught:
        parse_request(body, "txt2img", limits)
    assert fields_of(caught.value) == [field]
    assert words in str(caught.value) and "SD_LIMIT_MAX_PIXELS" in str(caught.value)


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"firstphase_width": 40000, "firstphase_height": 40000}, "firstphase_width"),
        ({**HIRES, "hr_resize_x": 60000, "hr_resize_y": 60000}, "hr_resize_x"),
        ({**HIRES, "hr_scale": 1000}, "hr_scale"),
        ({**HIRES, "hr_scale": 1e6}, "hr_scale"),
        ({**HIRES, "hr_second_pass_steps": 1000000, "denoising_strength": 0.01}, "hr_second"),
        ({**HIRES, "width": 2048, "height": 2048}, "hr_scale"),  # 4096x4096 target
        ({**HIRES, "width": 64, "height": 2048, "hr_resize_x": 2048}, "hr_resize_x"),
    ],
)
def test_red_team_sizes_are_refused(body, field):
    error = problems_of(body)
    assert any(f.startswith(field) for f in fields_of(error)), fields_of(error)


@pytest.mark.parametrize("denoise", [0.005, 1e-300, 5e-324])
def test_hires_schedule_after_the_denoising_rule_is_bounded(denoise):
    # webui builds int(steps / denoise) steps and runs the last `steps` of them.
    error = problems_of({**HIRES, "hr_second_pass_steps": 150, "denoising_strength": denoise})
    assert fields_of(error) == ["denoising_strength"]
    assert "SD_LIMIT_MAX_SCHEDULE_STEPS" in str(error) and "at most 15000" in str(error)


def test_hires_schedule_at_the_limit_is_accepted():
    parsed = txt(**HIRES, hr_second_pass_steps=150, denoising_strength=0.01)  # 15000 steps
    assert parsed.request.hr_second_pass_steps == 150


def test_img2img_schedule_is_bounded_only_with_fix_steps():
    body = {"steps": 150, "denoising_strength": 0.001}
    assert img(**body).request.steps == 150  # webui runs int(0.001 * 150) + 1 steps of 150
    fixed = {**body, "override_settings": {"img2img_fix_steps": True}}
    error = problems_of({**IMG, **fixed}, "img2img")
    assert fields_of(error) == ["denoising_strength"]
    assert "150000-step schedule" in str(error)


def test_unet_evaluations_are_bounded_and_configurable():
    body = {**HIRES, "steps": 150, "hr_second_pass_steps": 150, "batch_size": 8, "n_iter": 8}
    error = problems_of(body)
    assert fields_of(error) == ["steps*batch_size*n_iter"]
    assert "64 images x (150 + 150) steps = 19200" in str(error)
    assert "at most 10000" in str(error) and "SD_LIMIT_MAX_UNET_EVALS" in str(error)
    assert txt(steps=150, batch_size=8, n_iter=8).request.steps == 150  # 9600 fits
    limits = Limits.from_env({"SD_LIMIT_MAX_UNET_EVALS": "100"})
    with pytest.raises(RequestError, match="SD_LIMIT_MAX_UNET_EVALS"):
        parse_request({"steps": 101}, "txt2img", limits)
    parse_request({"steps": 100}, "txt2img", limits)


def test_total_output_pixels_are_bounded():
    body = {"steps": 1, "width": 1024, "height": 1088, "batch_size": 8, "n_iter": 8}
    error = problems_of(body)
    assert fields_of(error) == ["batch_size*n_iter*width*height"]
    assert "64 images of 1024x1088" in str(error) and "SD_LIMIT_MAX_TOTAL_PIXELS" in str(error)
    assert txt(**{**body, "height": 1024}).request.height == 1024


def test_one_firstphase_side_is_a_field_error_before_model_work():
    assert fields_of(problems_of({"firstphase_width": 512})) == ["firstphase_height"]


def test_parsers_take_limits_explicitly():
    import inspect

    import engine.payload as payload_module

    assert not hasattr(payload_module, "LIMITS")
    for function in (parse_request, decode_api_json):
        assert inspect.signature(function).parameters["limits"].default is inspect.Parameter.empty


# ---------------------------------------------------------------------------------------------
# Hostile values: a field error, never a raw exception deep in the engine
# ---------------------------------------------------------------------------------------------

PROMPT_FIELDS = ["prompt", "negative_prompt", "hr_prompt", "hr_negative_prompt"]


@pytest.mark.parametrize("field", PROMPT_FIELDS)
def test_lone_surrogate_in_a_prompt_is_a_field_error(field):
    # json.loads('"\\ud800"') gives a lone surrogate; tokenizers raise a TypeError on it.
    body = {field: json.loads('"a cat \\ud800 on a hat"')}
    error = problems_of(body)
    assert fields_of(error) == [field]
    assert "lone surrogate" in str(error) and "position 6" in str(error)
    assert txt(**{field: json.loads('"a \\ud83d\\ude00 pair"')}).request  # a real pair


def test_lone_surrogate_in_a_prompt_list_names_the_item():
    error = problems_of({"prompt": ["ok", "bad \udfff"], "batch_size": 2})
    assert fields_of(error) == ["prompt[1]"]


FLOAT_FIELDS = sorted(
    {
        (mode, name)
        for mode, model in (("txt2img", Txt2ImgRequest), ("img2img", Img2ImgRequest))
        for name, info in model.model_fields.items()
        if float in {info.annotation, *getattr(info.annotation, "__args__", ())}
    }
)


@pytest.mark.parametrize("value", ["nan", "NaN", "inf", "-Infinity", "1e999"])
@pytest.mark.parametrize(("mode", "field"), FLOAT_FIELDS)
def test_non_finite_numbers_are_refused_naming_the_field(mode, field, value):
    error = problems_of({**(IMG if mode == "img2img" else {}), field: value}, mode)
    assert fields_of(error) == [field]
    assert "finite number" in str(error)


def test_float_fields_cover_the_hires_and_sigma_fields():
    names = {name for _, name in FLOAT_FIELDS}
    assert {"hr_scale", "eta", "s_churn", "refiner_switch_at", "cfg_scale"} <= names


@pytest.mark.parametrize("delta", [2**64, -(2**64), 2**62 + 1])
def test_eta_noise_seed_delta_out_of_torch_range_is_a_field_error(delta):
    error = problems_of({"override_settings": {"eta_noise_seed_delta": delta}})
    assert fields_of(error) == ["override_settings.eta_noise_seed_delta"]
    assert "4611686018427387904" in str(error)  # 2**62


def test_eta_noise_seed_delta_at_its_bounds_is_accepted():
    for delta in (2**62, -(2**62), 31337):
        assert txt(override_settings={"eta_noise_seed_delta": delta}).settings.eta_noise_seed_delta


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"eta": 10, "sampler_name": "DDIM"}, "eta"),  # DDIM's sqrt(1 - a - sigma^2) is NaN
        ({"eta": 1.01}, "eta"),
        ({"override_settings": {"eta_ddim": 10}}, "override_settings.eta_ddim"),
        ({"override_settings": {"eta_ancestral": 1.5}}, "override_settings.eta_ancestral"),
    ],
)
def test_eta_is_bounded_by_webuis_slider(body, field):
    error = problems_of(body)
    assert fields_of(error) == [field]
    assert "from 0 to 1" in str(error)
    assert txt(eta=1, sampler_name="DDIM").request.eta == 1.0


# ---------------------------------------------------------------------------------------------
# As lenient as webui: negative seeds, refiner_switch_at 1, LoRA tags per field
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [-2, -1234, -(2**62)])
def test_any_negative_seed_is_accepted(seed):
    # webui's get_fixed_seed: only -1 is random; -2 is a fixed seed torch takes.
    assert txt(seed=seed, subseed=seed).request.seed == seed


def test_refiner_switch_at_one_is_accepted():
    assert txt(refiner_switch_at=1.0).request.refiner_switch_at == 1.0
    assert fields_of(problems_of({"refiner_switch_at": 1.01})) == ["refiner_switch_at"]


def test_lora_tags_are_counted_per_prompt_field():
    tag = "<lora:x:1>"
    full = {name: tag * 16 for name in PROMPT_FIELDS}
    assert txt(**full).request.prompt == tag * 16
    error = problems_of({**full, "negative_prompt": tag * 17})
    assert fields_of(error) == ["negative_prompt"]


# ---------------------------------------------------------------------------------------------
# Warnings are worded once
# ---------------------------------------------------------------------------------------------


def test_image_cfg_scale_is_silent_as_in_webui():
    """webui keeps image_cfg_scale only for edit models (None otherwise, no infotext); the
    webuiapi client sends 1.5 with every img2img, which must not draw a warning."""
    parsed = img(image_cfg_scale=1.5)
    assert not [w for w in parsed.warnings if "image_cfg_scale" in w]


def test_no_warning_repeats_a_word_or_itself():
    loud: dict[str, Any] = {row.field: "x" for row in IGNORED_FIELDS.values()}
    loud.update(image_cfg_scale=1.5, s_churn=1.0, s_noise=0.5, restore_faces=True)
    loud.update(save_images=True, override_settings_restore_afterwards=False, styles=["a"])
    loud.update(script_args=[1], latent_mask="x", firstpass_image="x", infotext="x")
    loud.update(s_min_uncond=1.0, s_tmax=1.0, s_tmin=1.0, script_name="x")
    parsed = img(**loud, foo=1, enable_hr=True, override_settings={"token_merging_ratio": 0.5})
    assert len(parsed.warnings) == len(set(parsed.warnings)) >= len(IGNORED_FIELDS)
    for warning in parsed.warnings:
        assert "ignored; ignored" not in warning, warning
        assert warning.count("ignored") == 1, warning


# ---------------------------------------------------------------------------------------------
# The same through the engine (tiny models)
# ---------------------------------------------------------------------------------------------


def _run(engine, **changes):
    from .helpers import payload, pixels

    response = engine.handle("txt2img", payload(steps=2, **changes), lambda s, t: None)
    return [np.asarray(pixels(i.data), dtype=np.int16) for i in response.images], json.loads(
        response.info
    )


def test_negative_seed_is_a_fixed_seed_end_to_end(engine):
    images, info = _run(engine, seed=-2, batch_size=2)
    again, _ = _run(engine, seed=-2, batch_size=2)
    assert info["seed"] == -2 and info["all_seeds"] == [-2, -1]
    assert int(np.abs(images[0] - again[0]).max()) == 0  # fixed: identical pixels
    assert "Seed: -2," in info["infotexts"][0]


def test_refiner_switch_at_one_never_switches_like_webui(engine):
    from .helpers import SD1

    plain, _ = _run(engine)
    refined, info = _run(engine, refiner_checkpoint=SD1, refiner_switch_at=1.0)
    assert int(np.abs(plain[0] - refined[0]).max()) == 0  # the same pixels
    assert "Refiner" not in info["infotexts"][0]


def test_a_warning_repeated_per_batch_is_listed_once(engine):
    _, info = _run(engine, prompt="a cat <hypernet:foo:1>", n_iter=2)
    notes = [w for w in info["warnings"] if "hypernet" in w]
    assert len(notes) == 1, info["warnings"]


def test_readme_limits_table_lists_every_variable_with_its_default():
    from pathlib import Path

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    rows = [line for line in readme.splitlines() if line.startswith("|")]
    defaults = Limits()
    for var, (name, kind) in LIMIT_ENV.items():
        row = next((r for r in rows if f"`{var}`" in r), None)
        assert row is not None, f"{var} is not in the README's Limits table"
        value = getattr(defaults, name)
        default = value.hi if kind == "range" else value
        assert f"| {int(default)}" in row, (var, default, row)


def test_nv_randn_source_is_refused_before_model_work_with_the_reason():
    # webui offers "NV" (its Philox imitation of CUDA noise); drawing elsewhere while the
    # infotext says NV would break same-seed reproduction, so the parser refuses it.
    error = problems_of({"override_settings": {"randn_source": "NV"}})
    [problem] = error.problems
    assert problem.field == "override_settings.randn_source"
    assert "Philox" in problem.allowed and "'GPU', 'CPU'" in problem.allowed
    assert txt(override_settings={"randn_source": "CPU"}).settings.randn_source == "CPU"
