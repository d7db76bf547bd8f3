"""Field coercion against webui's own validator: pydantic v1 with webui's declared types.

webui's API request models (modules/api/models.py) are pydantic v1 models generated from the
processing classes' signatures: each field is `Optional[<declared type>]`. pydantic v2 ships
that validator as `pydantic.v1`, so for every field and a table of client-shaped inputs this
test asks pydantic v1 what webui would do and checks that `parse_request` does the same:
refuses what it refuses (naming the field), accepts what it accepts with the same value and
type, except where this server refuses on purpose (README "Where we differ"): a number that is
NaN/Infinity or outside the field's declared range, a text with a lone surrogate.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Optional

import pydantic.v1 as pydantic_v1
import pytest

from engine.errors import RequestError
from engine.payload import Img2ImgRequest, Limits, Mode, Txt2ImgRequest, parse_request
from engine.payload import _bound_of as bound_of

LIMITS = Limits()
IMG = {"init_images": ["aGVsbG8="]}

# webui v1.10.1, modules/processing.py (StableDiffusionProcessing and its Txt2Img/Img2Img
# subclasses) plus the API-only keys of modules/api/models.py, which override a same-named
# field (sampler_index: str, init_images: list, mask: str). "Image" annotations become str.
COMMON_TYPES: dict[str, Any] = {
    "prompt": str,
    "negative_prompt": str,
    "styles": list[str],
    "seed": int,
    "subseed": int,
    "subseed_strength": float,
    "seed_resize_from_h": int,
    "seed_resize_from_w": int,
    "sampler_name": str,
    "sampler_index": str,
    "scheduler": str,
    "batch_size": int,
    "n_iter": int,
    "steps": int,
    "cfg_scale": float,
    "width": int,
    "height": int,
    "restore_faces": bool,
    "tiling": bool,
    "do_not_save_samples": bool,
    "do_not_save_grid": bool,
    "eta": float,
    "denoising_strength": float,
    "s_min_uncond": float,
    "s_churn": float,
    "s_tmax": float,
    "s_tmin": float,
    "s_noise": float,
    "override_settings": dict[str, Any],
    "override_settings_restore_afterwards": bool,
    "refiner_checkpoint": str,
    "refiner_switch_at": float,
    "disable_extra_networks": bool,
    "firstpass_image": str,
    "comments": dict,
    "script_name": str,
    "script_args": list,
    "send_images": bool,
    "save_images": bool,
    "alwayson_scripts": dict,
    "force_task_id": str,
    "infotext": str,
}
TXT2IMG_TYPES: dict[str, Any] = {
    **COMMON_TYPES,
    "enable_hr": bool,
    "firstphase_width": int,
    "firstphase_height": int,
    "hr_scale": float,
    "hr_upscaler": str,
    "hr_second_pass_steps": int,
    "hr_resize_x": int,
    "hr_resize_y": int,
    "hr_checkpoint_name": str,
    "hr_sampler_name": str,
    "hr_scheduler": str,
    "hr_prompt": str,
    "hr_negative_prompt": str,
}
IMG2IMG_TYPES: dict[str, Any] = {
    **COMMON_TYPES,
    "init_images": list,
    "resize_mode": int,
    "image_cfg_scale": float,
    "mask": str,
    "mask_blur_x": int,
    "mask_blur_y": int,
    "mask_blur": int,
    "mask_round": bool,
    "inpainting_fill": int,
    "inpaint_full_res": bool,
    "inpaint_full_res_padding": int,
    "inpainting_mask_invert": int,
    "initial_noise_multiplier": float,
    "latent_mask": str,
    "include_init_images": bool,
}
WEBUI_TYPES: dict[Mode, dict[str, Any]] = {"txt2img": TXT2IMG_TYPES, "img2img": IMG2IMG_TYPES}
MODELS: dict[Mode, Any] = {"txt2img": Txt2ImgRequest, "img2img": Img2ImgRequest}

INPUTS: list[Any] = [
    *("5", " 5 ", "+5", "5.0", "5.5", "-1", "0", "1", "2", "1_0", "1e3", "0.25", ""),
    *("true", "false", "True", "FALSE", "yes", "no", "on", "off", "t", "f", "y", "n", " true"),
    *("abc", "nan", "NaN", "inf", "-inf", "Infinity", "1e400", "\ud800", "a\udfffb"),
    *(0, 1, 2, 5, -1, -2, 8, 512, 5.0, 5.5, 0.5, 0.999, 1.0, 1e300, -1e300, 2**70, -(2**70)),
    *(True, False),
    *([], [1], ["a"], ["a", 1], [["a", 1]], ["ab"], [None], {}, {"a": 1}),
]
# Fields whose inputs need a partner to mean anything on their own.
PARTNERS: dict[str, dict[str, Any]] = {
    "firstphase_width": {"firstphase_height": 512},
    "firstphase_height": {"firstphase_width": 512},
}
# This server's additions, not webui's: a list of prompts (one per image); init_images
# items are checked as base64 text (webui's bare `list` fails later, when decoding).
SKIP = {("prompt", list), ("negative_prompt", list), ("init_images", list)}


@functools.cache
def webui_model(type_: Any) -> Any:
    """webui's field model: `Optional[<declared type>]`, default None, pydantic v1."""
    return pydantic_v1.create_model("WebuiField", field=(Optional[type_], None))  # noqa: UP045


def webui_verdict(type_: Any, value: Any) -> tuple[bool, Any]:
    """(accepted, coerced value) from pydantic v1 with webui's declared type."""
    model = webui_model(type_)
    try:
        return True, model(field=value).field
    except pydantic_v1.ValidationError:
        return False, None
    except (OverflowError, ValueError):  # escapes pydantic v1: webui answers 500
        return False, None


def our_verdict(mode: Mode, name: str, value: Any) -> tuple[bool, Any, list[str]]:
    body = {**(IMG if mode == "img2img" else {}), **PARTNERS.get(name, {}), name: value}
    try:
        parsed = parse_request(body, mode, LIMITS)
    except RequestError as err:
        return False, None, [p.field for p in err.problems]
    return True, getattr(parsed.request, name), []


def stricter_on_purpose(mode: Mode, name: str, coerced: Any) -> bool:
    """True where webui accepts but this server refuses on purpose."""
    if isinstance(coerced, float) and not math.isfinite(coerced):
        return True
    if isinstance(coerced, str) and any(0xD800 <= ord(c) <= 0xDFFF for c in coerced):
        return True
    if name in PARTNERS and coerced == 0:
        return True  # one firstphase side 0, the other 512: webui makes a 0-pixel image
    bound = bound_of(MODELS[mode].model_fields[name])
    return bound is not None and coerced not in bound.get(LIMITS)


CASES = [
    pytest.param(mode, name, value, id=f"{mode}-{name}-{value!r}")
    for mode, types in WEBUI_TYPES.items()
    for name in types
    for value in INPUTS
    if (name, type(value)) not in SKIP
]


def test_the_table_covers_every_field_we_accept() -> None:
    for mode, types in WEBUI_TYPES.items():
        assert set(types) == set(MODELS[mode].model_fields), mode


@pytest.mark.parametrize(("mode", "name", "value"), CASES)
def test_field_coercion_matches_webui(mode: Mode, name: str, value: Any) -> None:
    accepted, coerced = webui_verdict(WEBUI_TYPES[mode][name], value)
    ours, stored, fields = our_verdict(mode, name, value)
    if not accepted or stricter_on_purpose(mode, name, coerced):
        assert not ours, f"webui refuses {value!r} (or we do on purpose); we stored {stored!r}"
        assert any(f == name or f.startswith(name + "[") for f in fields), fields
        return
    assert ours, f"webui accepts {value!r} as {coerced!r}; we refused it ({fields})"
    if name in ("width", "height"):
        coerced -= coerced % 8  # webui's latent floors it; we floor with a warning
    assert stored == coerced
    assert type(stored) is type(coerced)


def test_every_number_field_declares_its_range() -> None:
    for model in MODELS.values():
        for name, info in model.model_fields.items():
            members = {info.annotation, *getattr(info.annotation, "__args__", ())}
            if members & {int, float}:
                assert bound_of(info) is not None, f"{model.__name__}.{name} has no range"


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("hr_scale", 17),
        ("hr_resize_x", 2049),
        ("hr_resize_y", 2049),
        ("hr_second_pass_steps", 151),
        ("firstphase_width", 2049),
        ("firstphase_height", 2049),
    ],
)
def test_hires_fields_have_ranges(name: str, value: Any) -> None:
    with pytest.raises(RequestError) as caught:
        parse_request({name: value, **PARTNERS.get(name, {})}, "txt2img", LIMITS)
    assert [p.field for p in caught.value.problems] == [name]
    assert "from 0 to" in str(caught.value)
