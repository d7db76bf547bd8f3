"""Typed webui request models: a txt2img/img2img JSON body in, a validated request out.

`parse_request` turns the body a user would POST to webui's `/sdapi/v1/txt2img` or
`/sdapi/v1/img2img` into a typed request with webui's **API** defaults (they differ from the
UI's: steps 50, sampler Euler via `sampler_index`, `inpaint_full_res` True, ...), the effective
`override_settings` and a list of human-readable warnings. Every problem is reported at once in
one `RequestError`. The module is pure: no model, no files.

Values are coerced as webui's pydantic v1 request models coerce them ("5" -> 5, "false" ->
False, 7 -> 7.0). Where we match a webui quirk the comment says so; where we choose to differ
(NaN/Infinity, lone surrogates, ranges on every number, the work a request implies: see
engine.limits) the user gets a clear error or a warning, never a silent change.
"""

from __future__ import annotations

import base64
import binascii
import codecs
import json
import math
import operator
import re
import types
import typing
import urllib.parse
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Annotated, Any, Final, Literal

from pydantic import BaseModel, ConfigDict, Field
from pydantic.fields import FieldInfo

from engine.errors import Problem, RequestError
from engine.limits import LIMIT_ENV, Limits, Range, check_work
from engine.prompt_limits import PromptBounds, prompt_problems
from engine.prompt_parser import extract_extra_networks

Mode = Literal["txt2img", "img2img"]
MODES: Final[tuple[Mode, ...]] = ("txt2img", "img2img")
ENDPOINTS: Final[tuple[str, ...]] = ("auto", *MODES)


# --------------------------------------------------------------------------------------------
# Ranges, declared with their fields
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Bound:
    """A number field's allowed range, declared beside the field (`Annotated[int, Bound]`).

    `get` reads the range from the server's Limits (some bounds are configurable); `note`
    ends the error message ("-1 for random").
    """

    get: Callable[[Limits], Range]
    note: str = ""


def _limit(name: str, note: str = "") -> Bound:
    """The range is Limits.<name>."""
    return Bound(operator.attrgetter(name), note)


def _fixed(lo: float, hi: float, note: str = "") -> Bound:
    rng = Range(lo, hi)
    return Bound(lambda _limits: rng, note)


def _up_to(name: str, lo: float, note: str = "") -> Bound:
    """From `lo` to the upper end of Limits.<name> (a size that may be 0 or -1 for "off")."""
    return Bound(lambda limits: Range(lo, getattr(limits, name).hi), note)


# A seed is any integer torch takes; only -1 is random (webui's get_fixed_seed).
_SEED = _limit("seed", " (-1 for random)")
_SIZE_NOTE = " (floored to a multiple of 8)"
# webui's option ranges (shared_options.py sliders) for the sigma options a request may set.
_S_MIN_UNCOND = _fixed(0, 15)
_S_CHURN = _fixed(0, 100)
_S_TMIN = _fixed(0, 10)
_S_TMAX = _fixed(0, 999)
_S_NOISE = _fixed(0, 1.1)
# ENSD is added to each image's seed; +-2**62 keeps seed + ENSD inside torch's seed range.
ENSD_RANGE: Final = Range(-(2**62), 2**62)


# Text fields whose length is capped by Limits.prompt_chars.
_PROMPT_FIELDS: Final = ("prompt", "negative_prompt", "hr_prompt", "hr_negative_prompt")
# webui makes the latent h//8 x w//8, so the image comes out floored to a multiple of 8.
_SNAP_TO_8: Final = ("width", "height")


# --------------------------------------------------------------------------------------------
# Request models (webui names and API defaults; modules/processing.py + modules/api/models.py)
# --------------------------------------------------------------------------------------------

_MODEL_CONFIG = ConfigDict(frozen=True, extra="forbid")


class _CommonRequest(BaseModel):
    """Fields of webui's `StableDiffusionProcessing` plus the API-only keys.

    Types are webui's declared ones (modules/processing.py; the API wraps each in Optional and
    pydantic v1 coerces to it), except `prompt`/`negative_prompt`, which also take one string
    per image. Every number carries its range (Bound) here, with the field.
    """

    model_config = _MODEL_CONFIG

    prompt: str | list[str] = ""
    negative_prompt: str | list[str] = ""
    styles: list[str] | None = None
    seed: Annotated[int, _SEED] = -1
    subseed: Annotated[int, _SEED] = -1
    subseed_strength: Annotated[float, _fixed(0, 1)] = 0.0
    seed_resize_from_h: Annotated[int, _up_to("height", -1, " (0 or less: off)")] = -1
    seed_resize_from_w: Annotated[int, _up_to("width", -1, " (0 or less: off)")] = -1
    sampler_name: str | None = None
    # The API re-adds sampler_index as a str defaulting to "Euler": with no sampler_name the
    # API samples with Euler, not the UI's default.
    sampler_index: str = "Euler"
    scheduler: str | None = None
    batch_size: Annotated[int, _limit("batch_size")] = 1
    n_iter: Annotated[int, _limit("n_iter")] = 1
    steps: Annotated[int, _limit("steps")] = 50
    cfg_scale: Annotated[float, _limit("cfg_scale")] = 7.0
    width: Annotated[int, _limit("width", _SIZE_NOTE)] = 512
    height: Annotated[int, _limit("height", _SIZE_NOTE)] = 512
    restore_faces: bool | None = None
    tiling: bool | None = None
    do_not_save_samples: bool = False
    do_not_save_grid: bool = False
    # webui's eta sliders (eta_ddim, eta_ancestral) end at 1; DDIM above 1 takes the square
    # root of a negative number and returns NaN.
    eta: Annotated[float | None, _fixed(0, 1)] = None
    denoising_strength: Annotated[float, _fixed(0, 1)] = 0.75
    s_min_uncond: Annotated[float | None, _S_MIN_UNCOND] = None
    s_churn: Annotated[float | None, _S_CHURN] = None
    s_tmax: Annotated[float | None, _S_TMAX] = None
    s_tmin: Annotated[float | None, _S_TMIN] = None
    s_noise: Annotated[float | None, _S_NOISE] = None
    override_settings: dict[str, Any] | None = None
    override_settings_restore_afterwards: bool = True
    refiner_checkpoint: str | None = None
    # webui's slider: 0.01 to 1 (at 1 its refiner never takes over).
    refiner_switch_at: Annotated[float | None, _fixed(0, 1)] = None
    disable_extra_networks: bool = False
    firstpass_image: str | None = None
    comments: dict | None = None  # webui: a bare dict (keys are not coerced)
    script_name: str | None = None
    script_args: list[Any] = Field(default_factory=list)
    send_images: bool = True
    save_images: bool = False
    alwayson_scripts: dict = Field(default_factory=dict)
    force_task_id: str | None = None
    infotext: str | None = None


class Txt2ImgRequest(_CommonRequest):
    """`POST /sdapi/v1/txt2img` body (webui `StableDiffusionProcessingTxt2Img`)."""

    enable_hr: bool = False
    firstphase_width: Annotated[int, _up_to("width", 0, " (0: off)")] = 0
    firstphase_height: Annotated[int, _up_to("height", 0, " (0: off)")] = 0
    # webui's slider is 1 to 4; the API takes any float. The target it implies is checked too.
    hr_scale: Annotated[float, _fixed(0, 16)] = 2.0
    hr_upscaler: str | None = None
    hr_second_pass_steps: Annotated[int, _up_to("steps", 0, " (0: same as steps)")] = 0
    hr_resize_x: Annotated[int, _up_to("width", 0, " (0: from hr_scale)")] = 0
    hr_resize_y: Annotated[int, _up_to("height", 0, " (0: from hr_scale)")] = 0
    hr_checkpoint_name: str | None = None
    hr_sampler_name: str | None = None
    hr_scheduler: str | None = None
    hr_prompt: str = ""
    hr_negative_prompt: str = ""


class Img2ImgRequest(_CommonRequest):
    """`POST /sdapi/v1/img2img` body (webui `StableDiffusionProcessingImg2Img`)."""

    # webui: None -> HTTP 404 "Init image not found"; we require it (see parse_request).
    init_images: list[str] | None = None
    resize_mode: Annotated[int, _fixed(0, 3)] = 0
    # Only edit (instruct-pix2pix) models read it; webui's slider is 0 to 3.
    image_cfg_scale: Annotated[float | None, _fixed(0, 3)] = None
    mask: str | None = None
    mask_blur_x: Annotated[int, _fixed(0, 64)] = 4
    mask_blur_y: Annotated[int, _fixed(0, 64)] = 4
    # A property in webui: when set it overrides both mask_blur_x and mask_blur_y.
    mask_blur: Annotated[int | None, _fixed(0, 64)] = None
    mask_round: bool = True
    inpainting_fill: Annotated[int, _fixed(0, 3)] = 0
    # The API default is True ("Only masked"); the UI's is "Whole picture".
    inpaint_full_res: bool = True
    inpaint_full_res_padding: Annotated[int, _fixed(0, 256)] = 0
    inpainting_mask_invert: Annotated[int, _fixed(0, 1)] = 0
    # webui's option slider (initial_noise_multiplier): 0 to 1.5.
    initial_noise_multiplier: Annotated[float | None, _fixed(0, 1.5)] = None
    latent_mask: str | None = None
    include_init_images: bool = False


Request = Txt2ImgRequest | Img2ImgRequest
_MODELS: Final[dict[Mode, type[Txt2ImgRequest] | type[Img2ImgRequest]]] = {
    "txt2img": Txt2ImgRequest,
    "img2img": Img2ImgRequest,
}


# --------------------------------------------------------------------------------------------
# Value checkers: each returns the normalised value or raises _Bad with "what is allowed".
# Strict ones are for override_settings values: webui stores those as sent (opts.set does not
# coerce), so "2" for CLIP_stop_at_last_layers fails there later; here it fails at once.
# --------------------------------------------------------------------------------------------


class _Bad(Exception):
    """A value failed a check; `allowed` says what would pass, `field` may refine the path."""

    def __init__(self, allowed: str, field: str | None = None, value: Any = None):
        super().__init__(allowed)
        self.allowed = allowed
        self.field = field
        self.value = value


def _check_int(value: Any) -> int:
    # A bool is an int to Python but never to us; 20.0 is a JSON artefact of some clients.
    if isinstance(value, bool):
        raise _Bad("must be an integer, not true/false")
    if isinstance(value, int):
        return value
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        return int(value)
    raise _Bad("must be an integer")


def _check_float(value: Any) -> float:
    # webui's pydantic coerces 7 -> 7.0, which is why infotext prints "CFG scale: 7.0".
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise _Bad("must be a number")
    try:
        result = float(value)
    except OverflowError:
        raise _Bad("must be a finite number") from None
    if not math.isfinite(result):
        raise _Bad("must be a finite number")
    return result


def _check_bool(value: Any) -> bool:
    if not isinstance(value, bool):
        raise _Bad("must be true or false")
    return value


def _check_str(value: Any) -> str:
    if not isinstance(value, str):
        raise _Bad("must be a string")
    return value


# --------------------------------------------------------------------------------------------
# Field coercion: exactly webui's pydantic v1 validators (int_validator, float_validator,
# bool_validator, str_validator, list_validator, dict_validator), plus two refusals of values
# webui accepts and then fails on: NaN/Infinity in a number, lone surrogates in a text.
# --------------------------------------------------------------------------------------------

# pydantic v1's BOOL_TRUE / BOOL_FALSE; compared after str.lower(), 1.0 == 1 counts as 1.
_BOOL_TRUE: Final = frozenset({1, "1", "on", "t", "true", "y", "yes"})
_BOOL_FALSE: Final = frozenset({0, "0", "off", "f", "false", "n", "no"})
# pydantic v1 refuses longer numeric strings (CPython's int() DoS guard).
_MAX_STR_INT: Final = 4300


def _coerce_int(value: Any) -> int:
    # int(v): True -> 1, 20.7 -> 20 (truncated, as pydantic v1), " 5 " -> 5, "5.0" refused.
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str) and len(value) > _MAX_STR_INT:
        raise _Bad("must be an integer")
    try:
        return int(value)
    except (TypeError, ValueError, OverflowError):
        raise _Bad("must be an integer") from None


def _coerce_float(value: Any) -> float:
    # float(v): True -> 1.0, "7" -> 7.0, " 1e3 " -> 1000.0. webui also takes "nan" and "inf";
    # they would poison the sampler, so they are refused here with the field named.
    try:
        result = value if isinstance(value, float) else float(value)
    except (TypeError, ValueError, OverflowError):
        raise _Bad("must be a number") from None
    if not math.isfinite(result):
        raise _Bad("must be a finite number")
    return result


def _coerce_bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    key = value.lower() if isinstance(value, str) else value
    try:
        if key in _BOOL_TRUE:
            return True
        if key in _BOOL_FALSE:
            return False
    except TypeError:  # unhashable (a list or object)
        pass
    raise _Bad("must be true or false (also accepted: 1/0, 'true'/'false', 'yes'/'no', 'on'/'off')")


def _coerce_str(value: Any) -> str:
    if isinstance(value, str):
        text = value
    elif isinstance(value, int | float):  # bools too: str(True) == "True", as pydantic v1
        try:
            text = str(value)
        except ValueError:  # an int with more digits than CPython prints
            raise _Bad("must be a string") from None
    else:
        raise _Bad("must be a string")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        # JSON's "\ud800" decodes to a lone surrogate: no tokenizer or PNG chunk takes it.
        raise _Bad(
            f"must be valid Unicode text (a lone surrogate {text[err.start]!r} at position "
            f"{err.start}; escape a character outside the BMP as a surrogate pair)"
        ) from None
    return text


def _coerce_str_list(value: Any) -> list[str]:
    if not isinstance(value, list):
        raise _Bad("must be a list of strings")
    result = []
    for i, item in enumerate(value):
        try:
            result.append(_coerce_str(item))
        except _Bad as bad:
            raise _Bad(bad.allowed, field=f"[{i}]", value=item) from None
    return result


def _coerce_str_or_list(value: Any) -> str | list[str]:
    # webui's API takes one string; a list (one prompt per image) is this server's addition.
    if isinstance(value, list):
        return _coerce_str_list(value)
    try:
        return _coerce_str(value)
    except _Bad as bad:
        if isinstance(value, str):
            raise
        raise _Bad("must be a string or a list of strings") from bad


def _coerce_list(value: Any) -> list[Any]:
    if not isinstance(value, list):
        raise _Bad("must be a list")
    return list(value)


def _coerce_dict(value: Any) -> dict[Any, Any]:
    # dict(v), as pydantic v1: [] and "" become {}, a list of [key, value] pairs a dict.
    if isinstance(value, Mapping):
        return dict(value)
    try:
        return dict(value)
    except (TypeError, ValueError):
        raise _Bad("must be a JSON object") from None


def _coerce_str_dict(value: Any) -> dict[str, Any]:
    result = {}
    for key, item in _coerce_dict(value).items():
        try:
            result[_coerce_str(key)] = item
        except _Bad:
            raise _Bad("must be a JSON object", field=f"[{key!r}]", value=key) from None
    return result


# Annotation (without None) -> coercer. Keyed by the set of union members.
_COERCERS: Final[dict[frozenset[Any], Callable[[Any], Any]]] = {
    frozenset({int}): _coerce_int,
    frozenset({float}): _coerce_float,
    frozenset({bool}): _coerce_bool,
    frozenset({str}): _coerce_str,
    frozenset({list[str]}): _coerce_str_list,
    frozenset({str, list[str]}): _coerce_str_or_list,
    frozenset({list[Any]}): _coerce_list,
    frozenset({dict}): _coerce_dict,
    frozenset({dict[str, Any]}): _coerce_str_dict,
}


# How a ranged number is described: "must be an integer from 1 to 150".
_NOUNS: Final[dict[Callable[[Any], Any], str]] = {
    _check_int: "an integer",
    _check_float: "a finite number",
    _coerce_int: "an integer",
    _coerce_float: "a finite number",
}


def _coercer_for(annotation: Any) -> Callable[[Any], Any]:
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        members = frozenset(a for a in typing.get_args(annotation) if a is not type(None))
    else:
        members = frozenset({annotation})
    return _COERCERS[members]


def _bound_of(info: FieldInfo) -> Bound | None:
    return next((m for m in info.metadata if isinstance(m, Bound)), None)


# --------------------------------------------------------------------------------------------
# override_settings: one table of the webui options we know (modules/shared_options.py)
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class OptionSpec:
    """A webui option name, how to check a value, its default, and whether we honour it now."""

    name: str
    check: Callable[[Any], Any]
    default: Any
    honoured: bool
    range: Range | None = None
    choices: tuple[str, ...] | None = None
    normalise: Callable[[Any], Any] | None = None
    # Values webui offers that this server refuses, each with the reason (said in the error).
    refused: Mapping[str, str] | None = None

    def validate(self, value: Any) -> Any:
        """The normalised value, or _Bad saying what is allowed."""
        value = self.check(value)
        if self.normalise is not None:
            value = self.normalise(value)
        if self.refused and value in self.refused:
            allowed = ", ".join(repr(c) for c in self.choices or ())
            raise _Bad(f"{self.refused[value]}; allowed: {allowed}")
        if self.range is not None and value not in self.range:
            noun = _NOUNS.get(self.check, "a value")
            raise _Bad(f"must be {noun} {self.range.describe()}")
        if self.choices is not None and value not in self.choices:
            raise _Bad("must be one of " + ", ".join(repr(c) for c in self.choices))
        return value


def _opt(
    name: str, check: Callable[[Any], Any], default: Any, honoured: bool, **kw: Any
) -> OptionSpec:
    return OptionSpec(name, check, default, honoured, **kw)


def _lower(value: str) -> str:
    return value.lower()


_OPTION_ROWS: Final[tuple[OptionSpec, ...]] = (
    # Honoured now.
    _opt("sd_model_checkpoint", _check_str, None, True),
    _opt("CLIP_stop_at_last_layers", _check_int, 1, True, range=Range(1, 12)),
    # webui compares samples_format case-insensitively (images.encode_pil_to_base64).
    _opt(
        "samples_format",
        _check_str,
        "png",
        True,
        normalise=_lower,
        choices=("png", "jpg", "jpeg", "webp"),
    ),
    _opt("enable_pnginfo", _check_bool, True, True),
    _opt("add_model_hash_to_info", _check_bool, True, True),
    _opt("add_model_name_to_info", _check_bool, True, True),
    _opt("add_version_to_infotext", _check_bool, True, True),
    # webui's sliders end at 1; DDIM above 1 returns NaN.
    _opt("eta_ancestral", _check_float, 1.0, True, range=Range(0, 1)),
    _opt("eta_ddim", _check_float, 0.0, True, range=Range(0, 1)),
    _opt("jpeg_quality", _check_int, 80, True, range=Range(1, 100)),
    # Known, validated, not honoured yet: a value other than the default gets a warning.
    _opt("sd_vae", _check_str, "Automatic", True),
    _opt("eta_noise_seed_delta", _check_int, 0, True, range=ENSD_RANGE),
    # webui's "NV" imitates CUDA's Philox generator on the CPU; that is not reproduced here, so
    # it is refused rather than drawn elsewhere while the infotext would say NV.
    _opt(
        "randn_source",
        _check_str,
        "GPU",
        True,
        choices=("GPU", "CPU"),
        refused={"NV": "webui's NV (Philox) noise source is not reproduced by this server"},
    ),
    _opt(
        "emphasis", _check_str, "Original", True, choices=("Original", "No norm", "Ignore", "None")
    ),
    # webui's k-diffusion schedule options (0: the model's value / the schedule's default). No
    # slider in webui (gr.Number); bounded here so a schedule stays finite.
    _opt("sigma_min", _check_float, 0.0, True, range=Range(0, 1000)),
    _opt("sigma_max", _check_float, 0.0, True, range=Range(0, 1000)),
    _opt("rho", _check_float, 0.0, True, range=Range(0, 100)),
    _opt("beta_dist_alpha", _check_float, 0.6, True, range=Range(0.01, 1.0)),
    _opt("beta_dist_beta", _check_float, 0.6, True, range=Range(0.01, 1.0)),
    _opt("use_old_karras_scheduler_sigmas", _check_bool, False, True),
    _opt("s_min_uncond", _check_float, 0.0, False),
    _opt("s_churn", _check_float, 0.0, True),
    _opt("s_tmin", _check_float, 0.0, True),
    _opt("s_tmax", _check_float, 0.0, True),
    _opt("s_noise", _check_float, 1.0, True),
    _opt("sgm_noise_multiplier", _check_bool, False, False),
    _opt("always_discard_next_to_last_sigma", _check_bool, False, True),
    _opt("img2img_fix_steps", _check_bool, False, True),
    _opt("initial_noise_multiplier", _check_float, 1.0, True),
    _opt("inpainting_mask_weight", _check_float, 1.0, True, range=Range(0, 1)),
    _opt("token_merging_ratio", _check_float, 0.0, False, range=Range(0, 0.9)),
    _opt("sd_lora", _check_str, "None", False),
    _opt("use_old_scheduling", _check_bool, False, False),
    _opt("comma_padding_backtrack", _check_int, 20, True, range=Range(0, 74)),
    # webui's Comments script (modules/processing_scripts/comments.py): `#` comments in prompts.
    _opt("enable_prompt_comments", _check_bool, True, True),
    _opt("img2img_color_correction", _check_bool, False, False),
    _opt("upscaler_for_img2img", _check_str, None, True),
    # webui's sliders: tile 0..512 (0: no tiling), overlap 0..48, in input pixels.
    _opt("ESRGAN_tile", _check_int, 192, True, range=Range(0, 512)),
    _opt("ESRGAN_tile_overlap", _check_int, 8, True, range=Range(0, 48)),
    # The SwinIR extension's sliders (extensions-builtin/SwinIR): tile 16..512, overlap 0..48.
    _opt("SWIN_tile", _check_int, 192, True, range=Range(16, 512)),
    _opt("SWIN_tile_overlap", _check_int, 8, True, range=Range(0, 48)),
)
OPTIONS: Final[dict[str, OptionSpec]] = {row.name: row for row in _OPTION_ROWS}


def _d(name: str) -> Any:
    return OPTIONS[name].default


class Settings(BaseModel):
    """The effective webui options for one request: defaults plus honoured overrides.

    Options we do not honour yet always hold their default here (that is what runs).
    """

    model_config = _MODEL_CONFIG

    # None: the server's default checkpoint (the catalog resolves names).
    sd_model_checkpoint: str | None = _d("sd_model_checkpoint")
    CLIP_stop_at_last_layers: int = _d("CLIP_stop_at_last_layers")
    samples_format: Literal["png", "jpg", "jpeg", "webp"] = _d("samples_format")
    enable_pnginfo: bool = _d("enable_pnginfo")
    add_model_hash_to_info: bool = _d("add_model_hash_to_info")
    add_model_name_to_info: bool = _d("add_model_name_to_info")
    add_version_to_infotext: bool = _d("add_version_to_infotext")
    eta_ancestral: float = _d("eta_ancestral")
    eta_ddim: float = _d("eta_ddim")
    jpeg_quality: int = _d("jpeg_quality")
    sd_vae: str = _d("sd_vae")
    eta_noise_seed_delta: int = _d("eta_noise_seed_delta")
    randn_source: str = _d("randn_source")
    emphasis: str = _d("emphasis")
    sigma_min: float = _d("sigma_min")
    sigma_max: float = _d("sigma_max")
    rho: float = _d("rho")
    beta_dist_alpha: float = _d("beta_dist_alpha")
    beta_dist_beta: float = _d("beta_dist_beta")
    use_old_karras_scheduler_sigmas: bool = _d("use_old_karras_scheduler_sigmas")
    s_min_uncond: float = _d("s_min_uncond")
    s_churn: float = _d("s_churn")
    s_tmin: float = _d("s_tmin")
    s_tmax: float = _d("s_tmax")
    s_noise: float = _d("s_noise")
    sgm_noise_multiplier: bool = _d("sgm_noise_multiplier")
    always_discard_next_to_last_sigma: bool = _d("always_discard_next_to_last_sigma")
    img2img_fix_steps: bool = _d("img2img_fix_steps")
    initial_noise_multiplier: float = _d("initial_noise_multiplier")
    inpainting_mask_weight: float = _d("inpainting_mask_weight")
    token_merging_ratio: float = _d("token_merging_ratio")
    sd_lora: str = _d("sd_lora")
    use_old_scheduling: bool = _d("use_old_scheduling")
    comma_padding_backtrack: int = _d("comma_padding_backtrack")
    enable_prompt_comments: bool = _d("enable_prompt_comments")
    img2img_color_correction: bool = _d("img2img_color_correction")
    upscaler_for_img2img: str | None = _d("upscaler_for_img2img")
    ESRGAN_tile: int = _d("ESRGAN_tile")
    ESRGAN_tile_overlap: int = _d("ESRGAN_tile_overlap")
    SWIN_tile: int = _d("SWIN_tile")
    SWIN_tile_overlap: int = _d("SWIN_tile_overlap")


if set(Settings.model_fields) != set(OPTIONS):  # pragma: no cover - guards edits of one side
    raise RuntimeError("engine.payload: Settings fields and OPTIONS table disagree")


# --------------------------------------------------------------------------------------------
# Fields accepted but not acted on (yet): one table, field -> when it matters -> note.
# --------------------------------------------------------------------------------------------

_NOT_YET = "not supported yet"


def _falsy(value: Any) -> bool:
    return not value


def _one_of(*values: Any) -> Callable[[Any], bool]:
    return lambda value: value in values


def _not_positive(value: Any) -> bool:
    return value is None or value <= 0


@dataclass(frozen=True)
class Ignored:
    """A field we accept and type-check but do not act on.

    `inactive(value)` is True when the value changes nothing in webui either (its default or
    an equivalent), so no warning is due. `gate` names another row of this table that must be
    active for this one to matter (webui reads hr_* only with enable_hr).
    """

    field: str
    inactive: Callable[[Any], bool] | None = None  # None: "equals the model default"
    note: str = _NOT_YET
    gate: str | None = None


_IGNORED_ROWS: Final[tuple[Ignored, ...]] = (
    # Common fields.
    Ignored("styles", _falsy, note=f"{_NOT_YET} (this server has no styles.csv)"),
    Ignored("restore_faces", _falsy),
    # webui >= 1.10 reads these from opts, whose defaults are 0, 0, 0 (inf), 0, 1.0.
    Ignored("s_min_uncond", _one_of(None, 0.0)),
    Ignored("s_churn", _one_of(None, 0.0)),
    Ignored("s_tmax", _one_of(None, 0.0)),
    Ignored("s_tmin", _one_of(None, 0.0)),
    Ignored("s_noise", _one_of(None, 1.0)),
    Ignored("firstpass_image", _falsy),
    Ignored("script_name", _falsy),
    Ignored("script_args", _falsy),
    Ignored("infotext", _falsy),
    Ignored(
        "save_images",
        _falsy,
        note="images are never saved on this server (and no grid image is returned)",
    ),
    Ignored(
        "override_settings_restore_afterwards",
        _one_of(True),
        note="this server never keeps settings between requests (each request starts "
        "from the defaults)",
    ),
    # img2img-only fields webui never decodes. (image_cfg_scale is not here: webui sets it to
    # None unless the model is an instruct-pix2pix "edit" model, and this server runs none, so
    # like webui it plays no part and is not in the infotext; webuiapi sends 1.5 with every
    # img2img, which therefore gets no warning.)
    Ignored("latent_mask", _falsy),
)
IGNORED_FIELDS: Final[dict[str, Ignored]] = {row.field: row for row in _IGNORED_ROWS}


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ParsedRequest:
    """A validated request, its effective settings and the warnings for the user."""

    mode: Mode
    request: Txt2ImgRequest | Img2ImgRequest
    settings: Settings
    warnings: tuple[str, ...]


def decode_api_json(text: str, limits: Limits) -> dict[str, Any]:
    """Decode the Cog input `api_json`: JSON text, or a `data:` URL of it.

    `cog predict -i api_json=@payload.json` sends `data:application/json;base64,...`; a
    `;charset=...` parameter and percent-encoded (non-base64) data URLs are accepted too.
    NaN/Infinity literals are rejected (they are not JSON). Size and nesting depth are
    capped by `limits`. Errors are a RequestError on field "api_json" that says what was wrong.
    """
    if not isinstance(text, str):
        raise RequestError.single("api_json", text, "must be JSON text or a data: URL of it")
    _check_payload_size(text, limits)
    stripped = text.strip()
    if stripped[:5].lower() == "data:":
        stripped = _decode_data_url(stripped)
    stripped = stripped.lstrip("\ufeff").strip()
    if not stripped:
        raise RequestError.single(
            "api_json", text, 'is empty; send a JSON object such as {"prompt": "a cat"}'
        )
    _check_json_depth(stripped, limits.json_depth)
    try:
        data = json.loads(stripped, parse_constant=_reject_constant)
    except json.JSONDecodeError as e:
        raise RequestError.single(
            "api_json",
            _excerpt(stripped, e.pos),
            f"not valid JSON: {e.msg} at line {e.lineno} column {e.colno}",
        ) from None
    except _NonFinite as e:
        raise RequestError.single(
            "api_json", e.literal, "not valid JSON: NaN and Infinity are not JSON numbers"
        ) from None
    if not isinstance(data, dict):
        raise RequestError.single(
            "api_json", data, f"must be a JSON object ({{...}}), not a JSON {_json_kind(data)}"
        )
    return data


def choose_mode(endpoint: str, payload: Mapping[str, Any]) -> Mode:
    """Endpoint name -> mode; "auto" is img2img when `init_images` is present and not null."""
    name = str(endpoint).strip().lower()
    if name == "auto":
        return "img2img" if payload.get("init_images") is not None else "txt2img"
    if name == "txt2img":
        return "txt2img"
    if name == "img2img":
        return "img2img"
    raise RequestError.single(
        "endpoint", endpoint, "must be one of " + ", ".join(repr(e) for e in ENDPOINTS)
    )


def parse_request(payload: Mapping[str, Any], mode: Mode, limits: Limits) -> ParsedRequest:
    """Validate a webui txt2img/img2img body; raise one RequestError listing every problem."""
    if not isinstance(payload, Mapping):
        raise RequestError.single("api_json", payload, "must be a JSON object")
    if mode not in _MODELS:
        raise RequestError.single("endpoint", mode, "must be 'txt2img' or 'img2img'")
    model = _MODELS[mode]
    problems: list[Problem] = []
    warnings: list[str] = []

    # 1. Keys webui would ignore: unknown ones and those of the other endpoint.
    warnings += _unknown_key_warnings(payload, mode)

    # 2. Every field: null -> default, else type, range and length checks.
    values = _check_fields(payload, model, limits, problems)

    # 3. Cross-field rules and webui's silent normalisations (made loud).
    warnings += _snap_sizes(values)
    problems += _check_prompt_lists(values)
    problems += _check_totals(values, payload, limits)
    if mode == "img2img" and "init_images" in values and not values["init_images"]:
        problems.append(
            Problem(
                "init_images",
                payload.get("init_images"),
                "img2img needs a non-empty list of base64 images (webui answers 404 "
                "'Init image not found')",
            )
        )

    # 4. override_settings -> effective Settings.
    settings, option_warnings = _parse_settings(values.get("override_settings"), problems)
    warnings += option_warnings

    # 5. The work the request implies (first pass, hires target, schedules, totals).
    problems += check_work(mode, values, settings.img2img_fix_steps, limits)

    # 6. Accepted-but-ignored fields, in table order.
    if not problems:
        warnings += _ignored_field_warnings(values, model)

    if problems:
        raise RequestError(problems)
    # One warning per problem, however many rules noticed it.
    unique = tuple(dict.fromkeys(warnings))
    return ParsedRequest(mode, model.model_validate(values), settings, unique)


def image_count(request: Txt2ImgRequest | Img2ImgRequest) -> int:
    """Images the request asks for: batch_size * n_iter."""
    return request.batch_size * request.n_iter


def all_prompts(request: Txt2ImgRequest | Img2ImgRequest, n: int | None = None) -> list[str]:
    """One positive prompt per image (webui `p.all_prompts`); n defaults to image_count."""
    return _per_image(request.prompt, image_count(request) if n is None else n)


def all_negative_prompts(
    request: Txt2ImgRequest | Img2ImgRequest, n: int | None = None
) -> list[str]:
    """One negative prompt per image (webui `p.all_negative_prompts`)."""
    return _per_image(request.negative_prompt, image_count(request) if n is None else n)


def requested_sampler(request: Txt2ImgRequest | Img2ImgRequest) -> str:
    """The sampler name as webui's API reads it: `sampler_name or sampler_index`."""
    return request.sampler_name or request.sampler_index


def effective_mask_blur(request: Img2ImgRequest) -> tuple[int, int]:
    """(x, y) blur: webui's `mask_blur` property sets both when given."""
    if request.mask_blur is not None:
        return request.mask_blur, request.mask_blur
    return request.mask_blur_x, request.mask_blur_y


def echo_parameters(parsed: ParsedRequest) -> dict[str, Any]:
    """webui's response `parameters`: the request with defaults filled, as sent.

    As webui does, img2img nulls `init_images` and `mask` unless `include_init_images`.
    Sizes are shown after flooring to a multiple of 8 (the warning says so).
    """
    params = parsed.request.model_dump()
    if isinstance(parsed.request, Img2ImgRequest) and not parsed.request.include_init_images:
        params["init_images"] = None
        params["mask"] = None
    return params


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------


class _NonFinite(ValueError):
    def __init__(self, literal: str):
        super().__init__(literal)
        self.literal = literal


def _reject_constant(literal: str) -> Any:
    raise _NonFinite(literal)


def _check_payload_size(text: str, limits: Limits) -> None:
    # Characters first (cheap); only text near the limit is measured in UTF-8 bytes.
    if len(text) * 4 <= limits.payload_bytes:
        return
    size = len(text) if len(text) > limits.payload_bytes else len(text.encode("utf-8", "replace"))
    if size > limits.payload_bytes:
        raise RequestError.single(
            "api_json",
            f"{size} bytes",
            f"must be at most {limits.payload_bytes} bytes (SD_LIMIT_MAX_PAYLOAD_BYTES)",
        )


# A JSON string (escapes included) or one bracket: strings are skipped, brackets counted.
_JSON_TOKEN: Final = re.compile(r'"(?:[^"\\]+|\\.)*"?|[\[\]{}]')


def _check_json_depth(text: str, limit: int) -> None:
    """Refuse nesting deeper than `limit` before json.loads recurses into it."""
    if text.count("[") + text.count("{") <= limit:
        return
    depth = 0
    for match in _JSON_TOKEN.finditer(text):
        token = match.group()
        if token in "[{":
            depth += 1
            if depth > limit:
                raise RequestError.single(
                    "api_json",
                    _excerpt(text, match.start()),
                    f"JSON nested more than {limit} levels deep (SD_LIMIT_MAX_JSON_DEPTH)",
                )
        elif token in "]}":
            depth -= 1


def _check_totals(
    values: Mapping[str, Any], payload: Mapping[str, Any], limits: Limits
) -> list[Problem]:
    """Limits over several fields: images per request, pixels, LoRA tags, ControlNet units."""
    problems: list[Problem] = []
    if {"batch_size", "n_iter"} <= values.keys():
        count = values["batch_size"] * values["n_iter"]
        if count > limits.images:
            problems.append(
                Problem(
                    "batch_size*n_iter",
                    count,
                    f"at most {limits.images} images per request (SD_LIMIT_MAX_IMAGES)",
                )
            )
    if {"width", "height"} <= values.keys():
        area = values["width"] * values["height"]
        if area > limits.pixels:
            problems.append(
                Problem(
                    "width*height",
                    area,
                    f"at most {limits.pixels} pixels per image (SD_LIMIT_MAX_PIXELS)",
                )
            )
    for name in _PROMPT_FIELDS:
        value = values.get(name)
        texts = [value] if isinstance(value, str) else value if isinstance(value, list) else []
        for text in texts:
            tags = [t for t in extract_extra_networks(text)[1] if t.kind == "lora"]
            if len(tags) > limits.lora_tags:
                problems.append(
                    Problem(
                        name,
                        f"{len(tags)} LoRA tags",
                        f"at most {limits.lora_tags} <lora:...> tags per prompt "
                        "(SD_LIMIT_MAX_LORA_TAGS)",
                    )
                )
                break
    problems += _prompt_work_problems(values, limits)
    units = _controlnet_units(payload)
    if units > limits.controlnet_units:
        problems.append(
            Problem(
                "alwayson_scripts.controlnet.args",
                f"{units} enabled units",
                f"at most {limits.controlnet_units} enabled ControlNet units "
                "(SD_LIMIT_MAX_CONTROLNET_UNITS)",
            )
        )
    return problems


def _prompt_work_problems(values: Mapping[str, Any], limits: Limits) -> list[Problem]:
    """AND parts, chunks and prompt-editing texts of every prompt (engine/prompt_limits.py)."""
    steps = values.get("steps")
    if not isinstance(steps, int):
        return []  # steps has its own problem
    hires_steps = None
    if values.get("enable_hr"):
        hires_steps = values.get("hr_second_pass_steps") or steps
    bounds = PromptBounds(
        limits.and_parts, limits.prompt_chunks, limits.prompt_schedule, limits.scheduled_chars
    )
    problems: list[Problem] = []
    for name in _PROMPT_FIELDS:
        value = values.get(name)
        texts = [value] if isinstance(value, str) else value if isinstance(value, list) else []
        seen: set[str] = set()
        for index, text in enumerate(texts):
            if text in seen:
                continue
            seen.add(text)
            field = name if isinstance(value, str) else f"{name}[{index}]"
            found = prompt_problems(
                field, text, steps, hires_steps, bounds, positive="negative" not in name
            )
            if found:
                problems += found
                break
    return problems


def _controlnet_units(payload: Mapping[str, Any]) -> int:
    """Enabled unit objects in alwayson_scripts.controlnet.args (any key case, as webui)."""
    scripts = payload.get("alwayson_scripts")
    if not isinstance(scripts, Mapping):
        return 0
    entry = next((v for k, v in scripts.items() if str(k).lower() == "controlnet"), None)
    args = entry.get("args") if isinstance(entry, Mapping) else None
    if not isinstance(args, list):
        return 0
    return sum(1 for unit in args if isinstance(unit, Mapping) and unit.get("enabled", True))


def _json_kind(value: Any) -> str:
    kinds: tuple[tuple[type | tuple[type, ...], str], ...] = (
        (list, "array"),
        (str, "string"),
        (bool, "boolean"),
        ((int, float), "number"),
    )
    for kind, name in kinds:
        if isinstance(value, kind):
            return name
    return "null"


def _excerpt(text: str, pos: int, width: int = 40) -> str:
    start = max(0, pos - width // 2)
    return text[start : start + width]


def _decode_data_url(url: str) -> str:
    """The text inside a `data:[<type>][;charset=x][;base64],<data>` URL."""
    header, sep, data = url[5:].partition(",")
    if not sep:
        raise RequestError.single(
            "api_json", url, "a data: URL needs a ',' between its header and its data"
        )
    params = [p.strip() for p in header.split(";")]
    is_base64 = len(params) > 1 and params[-1].lower() == "base64"
    charset = "utf-8"
    for param in params[1:]:
        key, _, val = param.partition("=")
        if key.strip().lower() == "charset" and val:
            charset = val.strip().strip('"')
    try:
        codecs.lookup(charset)
    except LookupError:
        raise RequestError.single(
            "api_json", f"data:{header},...", f"unknown charset {charset!r} in the data: URL"
        ) from None
    raw = urllib.parse.unquote_to_bytes(data)
    if is_base64:
        compact = b"".join(raw.split())
        compact += b"=" * (-len(compact) % 4)
        # Accept the URL-safe alphabet too; validate=True still rejects anything else.
        altchars = b"-_" if (b"-" in compact or b"_" in compact) else None
        try:
            raw = base64.b64decode(compact, altchars=altchars, validate=True)
        except (binascii.Error, ValueError) as e:
            raise RequestError.single(
                "api_json",
                f"data:{header},{data[:40]}...",
                f"the data: URL's payload is not valid base64 ({e})",
            ) from None
    try:
        # utf-8-sig also drops a byte-order mark that some editors write.
        return raw.decode("utf-8-sig" if codecs.lookup(charset).name == "utf-8" else charset)
    except UnicodeDecodeError as e:
        raise RequestError.single(
            "api_json", f"data:{header},...", f"the data: URL's payload is not {charset} text ({e})"
        ) from None


def _unknown_key_warnings(payload: Mapping[str, Any], mode: Mode) -> list[str]:
    own = _MODELS[mode].model_fields
    other: Mode = "img2img" if mode == "txt2img" else "txt2img"
    warnings = []
    for key in payload:
        if key in own:
            continue
        if key in _MODELS[other].model_fields:
            warnings.append(f"field {key!r} belongs to {other}; ignored by {mode}")
        else:
            warnings.append(f"unknown field {key!r} ignored")
    return warnings


def _check_fields(
    payload: Mapping[str, Any],
    model: type[_CommonRequest],
    limits: Limits,
    problems: list[Problem],
) -> dict[str, Any]:
    """Coerced, checked values of every field; a field with a problem is left out."""
    values: dict[str, Any] = {}
    for name, info in model.model_fields.items():
        raw = payload.get(name)
        if raw is None:  # webui's fields are all Optional: null means "the default"
            values[name] = info.get_default(call_default_factory=True)
            continue
        coerce = _coercer_for(info.annotation)
        bound = _bound_of(info)
        try:
            value = coerce(raw)
            if bound is not None and value not in bound.get(limits):
                raise _Bad("out of range")
            values[name] = _check_length(name, value, limits)
        except _Bad as bad:
            if bad.field is not None:  # a list item or a key
                problems.append(Problem(name + bad.field, bad.value, bad.allowed))
            else:
                problems.append(Problem(name, raw, _allowed_text(coerce, bad, bound, limits)))
    return values


def _check_length(name: str, value: Any, limits: Limits) -> Any:
    if name in _PROMPT_FIELDS:
        texts = [value] if isinstance(value, str) else value
        for i, text in enumerate(texts):
            if len(text) > limits.prompt_chars:
                allowed = f"must be at most {limits.prompt_chars} characters (got {len(text)})"
                if isinstance(value, str):
                    raise _Bad(allowed)
                raise _Bad(allowed, field=f"[{i}]", value=text)
    return value


def _allowed_text(
    coerce: Callable[[Any], Any], bad: _Bad, bound: Bound | None, limits: Limits
) -> str:
    """The one formatter of field errors: a ranged number always gets the full rule,
    "must be an integer from 1 to 150", whatever was wrong with it."""
    if bound is None or coerce not in _NOUNS:
        return bad.allowed
    return f"must be {_NOUNS[coerce]} {bound.get(limits).describe()}{bound.note}"


def _snap_sizes(values: dict[str, Any]) -> list[str]:
    warnings = []
    for name in _SNAP_TO_8:
        if name not in values:
            continue
        size = values[name]
        if size % 8:
            values[name] = size - size % 8
            warnings.append(
                f"{name}: {size} is not a multiple of 8; using {values[name]} "
                "(webui's latent is size//8, so it floors the same way)"
            )
    return warnings


def _check_prompt_lists(values: Mapping[str, Any]) -> list[Problem]:
    # webui slices a prompt list into batches; a short list silently ends generation early,
    # so we insist on exactly one prompt per image.
    if not {"batch_size", "n_iter", "prompt", "negative_prompt"} <= values.keys():
        return []  # one of them already has a problem of its own
    count = values["batch_size"] * values["n_iter"]
    return [
        Problem(
            name,
            values[name],
            f"a list must have batch_size*n_iter = {count} entries (got "
            f"{len(values[name])}); or send one string for every image",
        )
        for name in ("prompt", "negative_prompt")
        if isinstance(values[name], list) and len(values[name]) != count
    ]


def _parse_settings(
    overrides: Mapping[str, Any] | None, problems: list[Problem]
) -> tuple[Settings, list[str]]:
    effective: dict[str, Any] = {}
    warnings = []
    for name, raw in (overrides or {}).items():
        path = f"override_settings.{name}"
        spec = OPTIONS.get(name)
        if spec is None:
            warnings.append(f"{path}: unknown option; ignored")
            continue
        if raw is None:
            continue
        try:
            value = spec.validate(raw)
        except _Bad as bad:
            problems.append(Problem(path, raw, bad.allowed))
            continue
        if spec.honoured:
            effective[name] = value
        elif value != spec.default:
            warnings.append(f"{path}: {_NOT_YET}; ignored")
    return Settings.model_validate(effective), warnings


def _ignored_field_warnings(values: Mapping[str, Any], model: type[_CommonRequest]) -> list[str]:
    fields = model.model_fields

    def active(row: Ignored) -> bool:
        value = values[row.field]
        if row.inactive is not None:
            quiet = row.inactive(value)
        else:
            quiet = value == fields[row.field].get_default(call_default_factory=True)
        gate = IGNORED_FIELDS.get(row.gate) if row.gate else None
        return not quiet and (gate is None or active(gate))

    return [
        f"{row.field}: {row.note}; ignored"
        for row in _IGNORED_ROWS
        if row.field in fields and active(row)
    ]


def _per_image(prompt: str | list[str], n: int) -> list[str]:
    if isinstance(prompt, str):
        return [prompt] * n
    if len(prompt) != n:
        raise ValueError(f"prompt list has {len(prompt)} entries, expected {n}")
    return list(prompt)


__all__ = [
    "ENSD_RANGE",
    "IGNORED_FIELDS",
    "LIMIT_ENV",
    "MODES",
    "OPTIONS",
    "Bound",
    "Ignored",
    "Img2ImgRequest",
    "Limits",
    "OptionSpec",
    "ParsedRequest",
    "Range",
    "Request",
    "Settings",
    "Txt2ImgRequest",
    "all_negative_prompts",
    "all_prompts",
    "choose_mode",
    "decode_api_json",
    "echo_parameters",
    "effective_mask_blur",
    "image_count",
    "parse_request",
    "requested_sampler",
]
