"""Typed webui request models: a txt2img/img2img JSON body in, a validated request out.

`parse_request` turns the body a user would POST to webui's `/sdapi/v1/txt2img` or
`/sdapi/v1/img2img` into a typed request with webui's **API** defaults (they differ from the
UI's: steps 50, sampler Euler via `sampler_index`, `inpaint_full_res` True, ...), the effective
`override_settings` and a list of human-readable warnings. Every problem is reported at once in
one `RequestError`. The module is pure: no model, no files.

Where we match a webui quirk the comment says so; where we choose to differ (strict types,
bounds) the user gets a clear error or a warning, never a silent change.
"""

from __future__ import annotations

import base64
import binascii
import codecs
import json
import math
import os
import re
import types
import typing
import urllib.parse
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final, Literal

from pydantic import BaseModel, ConfigDict, Field

from engine.errors import Problem, RequestError
from engine.prompt_parser import extract_extra_networks

Mode = Literal["txt2img", "img2img"]
MODES: Final[tuple[Mode, ...]] = ("txt2img", "img2img")
ENDPOINTS: Final[tuple[str, ...]] = ("auto", *MODES)


# --------------------------------------------------------------------------------------------
# Limits
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Range:
    """Inclusive numeric bounds."""

    lo: float
    hi: float

    def __contains__(self, value: object) -> bool:
        return isinstance(value, int | float) and self.lo <= value <= self.hi

    def describe(self) -> str:
        return f"from {_num(self.lo)} to {_num(self.hi)}"


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else str(x)


@dataclass(frozen=True)
class Limits:
    """What this server accepts. One object so a deployment can make it configurable."""

    width: Range = Range(64, 2048)
    height: Range = Range(64, 2048)
    steps: Range = Range(1, 150)
    batch_size: Range = Range(1, 8)
    n_iter: Range = Range(1, 32)
    cfg_scale: Range = Range(-100, 100)
    denoising_strength: Range = Range(0, 1)
    eta: Range = Range(0, 10)
    subseed_strength: Range = Range(0, 1)
    # -1 means "random"; anything else goes to torch's manual_seed, which takes < 2**64, and
    # image i uses seed + i, so stay well below that.
    seed: Range = Range(-1, 2**63 - 1)
    prompt_chars: int = 20000
    # batch_size * n_iter: images one request may ask for.
    images: int = 64
    # width * height of one image (each side is capped above too).
    pixels: int = 2048 * 2048
    # UTF-8 bytes of the api_json text (base64 init images count: a 20 MB image is ~27 MB).
    payload_bytes: int = 64 * 1024 * 1024
    # Nesting of [ and { in api_json; deeper JSON would exhaust Python's recursion limit.
    json_depth: int = 32
    # <lora:...>/<lyco:...> tags in one prompt.
    lora_tags: int = 16
    # Enabled ControlNet units (webui's control_net_unit_count defaults to 3).
    controlnet_units: int = 3

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Limits:
        """Limits with SD_LIMIT_* environment overrides (table: LIMIT_ENV); bad values fail."""
        env = os.environ if environ is None else environ
        changes: dict[str, Any] = {}
        for var, (name, kind) in LIMIT_ENV.items():
            text = env.get(var)
            if text is None or not text.strip():
                continue
            try:
                number = int(text.strip())
            except ValueError:
                raise ValueError(f"{var}={text!r}: must be a positive integer") from None
            if number < 1:
                raise ValueError(f"{var}={text!r}: must be a positive integer")
            current = getattr(cls(), name)
            changes[name] = Range(current.lo, number) if kind == "range" else number
        return cls(**changes)


# Environment variable -> (Limits field, "range" (sets the upper bound) or "int").
LIMIT_ENV: Final[dict[str, tuple[str, Literal["range", "int"]]]] = {
    "SD_LIMIT_MAX_WIDTH": ("width", "range"),
    "SD_LIMIT_MAX_HEIGHT": ("height", "range"),
    "SD_LIMIT_MAX_PIXELS": ("pixels", "int"),
    "SD_LIMIT_MAX_STEPS": ("steps", "range"),
    "SD_LIMIT_MAX_BATCH_SIZE": ("batch_size", "range"),
    "SD_LIMIT_MAX_N_ITER": ("n_iter", "range"),
    "SD_LIMIT_MAX_IMAGES": ("images", "int"),
    "SD_LIMIT_MAX_PROMPT_CHARS": ("prompt_chars", "int"),
    "SD_LIMIT_MAX_PAYLOAD_BYTES": ("payload_bytes", "int"),
    "SD_LIMIT_MAX_JSON_DEPTH": ("json_depth", "int"),
    "SD_LIMIT_MAX_LORA_TAGS": ("lora_tags", "int"),
    "SD_LIMIT_MAX_CONTROLNET_UNITS": ("controlnet_units", "int"),
}


LIMITS: Final = Limits()


def _field_ranges(limits: Limits) -> dict[str, Range]:
    """Field -> allowed range. Fields a later issue implements only get enum-like bounds."""
    return {
        "width": limits.width,
        "height": limits.height,
        "steps": limits.steps,
        "batch_size": limits.batch_size,
        "n_iter": limits.n_iter,
        "cfg_scale": limits.cfg_scale,
        "denoising_strength": limits.denoising_strength,
        "eta": limits.eta,
        "subseed_strength": limits.subseed_strength,
        "seed": limits.seed,
        "subseed": limits.seed,
        "seed_resize_from_w": Range(-1, limits.width.hi),
        "seed_resize_from_h": Range(-1, limits.height.hi),
        "resize_mode": Range(0, 3),
        "inpainting_fill": Range(0, 3),
        "inpainting_mask_invert": Range(0, 1),
        "mask_blur": Range(0, 64),
        "mask_blur_x": Range(0, 64),
        "mask_blur_y": Range(0, 64),
        "inpaint_full_res_padding": Range(0, 256),
    }


# Text fields whose length is capped by Limits.prompt_chars.
_PROMPT_FIELDS: Final = ("prompt", "negative_prompt", "hr_prompt", "hr_negative_prompt")
# webui makes the latent h//8 x w//8, so the image comes out floored to a multiple of 8.
_SNAP_TO_8: Final = ("width", "height")


# --------------------------------------------------------------------------------------------
# Request models (webui names and API defaults; modules/processing.py + modules/api/models.py)
# --------------------------------------------------------------------------------------------

_MODEL_CONFIG = ConfigDict(frozen=True, extra="forbid")


class _CommonRequest(BaseModel):
    """Fields of webui's `StableDiffusionProcessing` plus the API-only keys."""

    model_config = _MODEL_CONFIG

    prompt: str | list[str] = ""
    negative_prompt: str | list[str] = ""
    styles: list[str] | None = None
    seed: int = -1
    subseed: int = -1
    subseed_strength: float = 0.0
    seed_resize_from_h: int = -1
    seed_resize_from_w: int = -1
    sampler_name: str | None = None
    # The API re-adds sampler_index as a str defaulting to "Euler": with no sampler_name the
    # API samples with Euler, not the UI's default.
    sampler_index: str = "Euler"
    scheduler: str | None = None
    batch_size: int = 1
    n_iter: int = 1
    steps: int = 50
    cfg_scale: float = 7.0
    width: int = 512
    height: int = 512
    restore_faces: bool | None = None
    tiling: bool | None = None
    do_not_save_samples: bool = False
    do_not_save_grid: bool = False
    eta: float | None = None
    denoising_strength: float = 0.75
    s_min_uncond: float | None = None
    s_churn: float | None = None
    s_tmax: float | None = None
    s_tmin: float | None = None
    s_noise: float | None = None
    override_settings: dict[str, Any] | None = None
    override_settings_restore_afterwards: bool = True
    refiner_checkpoint: str | None = None
    refiner_switch_at: float | None = None
    disable_extra_networks: bool = False
    firstpass_image: str | None = None
    comments: dict[str, Any] | None = None
    script_name: str | None = None
    script_args: list[Any] = Field(default_factory=list)
    send_images: bool = True
    save_images: bool = False
    alwayson_scripts: dict[str, Any] = Field(default_factory=dict)
    force_task_id: str | None = None
    infotext: str | None = None


class Txt2ImgRequest(_CommonRequest):
    """`POST /sdapi/v1/txt2img` body (webui `StableDiffusionProcessingTxt2Img`)."""

    enable_hr: bool = False
    firstphase_width: int = 0
    firstphase_height: int = 0
    hr_scale: float = 2.0
    hr_upscaler: str | None = None
    hr_second_pass_steps: int = 0
    hr_resize_x: int = 0
    hr_resize_y: int = 0
    hr_checkpoint_name: str | None = None
    hr_sampler_name: str | None = None
    hr_scheduler: str | None = None
    hr_prompt: str = ""
    hr_negative_prompt: str = ""


class Img2ImgRequest(_CommonRequest):
    """`POST /sdapi/v1/img2img` body (webui `StableDiffusionProcessingImg2Img`)."""

    # webui: None -> HTTP 404 "Init image not found"; we require it (see parse_request).
    init_images: list[str] | None = None
    resize_mode: int = 0
    image_cfg_scale: float | None = None
    mask: str | None = None
    mask_blur_x: int = 4
    mask_blur_y: int = 4
    # A property in webui: when set it overrides both mask_blur_x and mask_blur_y.
    mask_blur: int | None = None
    mask_round: bool = True
    inpainting_fill: int = 0
    # The API default is True ("Only masked"); the UI's is "Whole picture".
    inpaint_full_res: bool = True
    inpaint_full_res_padding: int = 0
    inpainting_mask_invert: int = 0
    initial_noise_multiplier: float | None = None
    latent_mask: str | None = None
    include_init_images: bool = False


Request = Txt2ImgRequest | Img2ImgRequest
_MODELS: Final[dict[Mode, type[Txt2ImgRequest] | type[Img2ImgRequest]]] = {
    "txt2img": Txt2ImgRequest,
    "img2img": Img2ImgRequest,
}


# --------------------------------------------------------------------------------------------
# Value checkers: each returns the normalised value or raises _Bad with "what is allowed".
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


def _check_str_list(value: Any) -> list[str]:
    if not isinstance(value, list):
        raise _Bad("must be a list of strings")
    for i, item in enumerate(value):
        if not isinstance(item, str):
            raise _Bad("must be a string", field=f"[{i}]", value=item)
    return list(value)


def _check_str_or_list(value: Any) -> str | list[str]:
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        return _check_str_list(value)
    raise _Bad("must be a string or a list of strings")


def _check_list(value: Any) -> list[Any]:
    if not isinstance(value, list):
        raise _Bad("must be a list")
    return list(value)


def _check_dict(value: Any) -> dict[str, Any]:
    if not isinstance(value, Mapping):
        raise _Bad("must be a JSON object")
    return dict(value)


# Annotation (without None) -> checker. Keyed by the set of union members.
_CHECKERS: Final[dict[frozenset[Any], Callable[[Any], Any]]] = {
    frozenset({int}): _check_int,
    frozenset({float}): _check_float,
    frozenset({bool}): _check_bool,
    frozenset({str}): _check_str,
    frozenset({list[str]}): _check_str_list,
    frozenset({str, list[str]}): _check_str_or_list,
    frozenset({list[Any]}): _check_list,
    frozenset({dict[str, Any]}): _check_dict,
}


# How a ranged number is described: "must be an integer from 1 to 150".
_NOUNS: Final[dict[Callable[[Any], Any], str]] = {
    _check_int: "an integer",
    _check_float: "a finite number",
}


def _checker_for(annotation: Any) -> Callable[[Any], Any]:
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        members = frozenset(a for a in typing.get_args(annotation) if a is not type(None))
    else:
        members = frozenset({annotation})
    return _CHECKERS[members]


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

    def validate(self, value: Any) -> Any:
        """The normalised value, or _Bad saying what is allowed."""
        value = self.check(value)
        if self.normalise is not None:
            value = self.normalise(value)
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
    _opt("eta_ancestral", _check_float, 1.0, True, range=Range(0, 10)),
    _opt("eta_ddim", _check_float, 0.0, True, range=Range(0, 10)),
    _opt("jpeg_quality", _check_int, 80, True, range=Range(1, 100)),
    # Known, validated, not honoured yet: a value other than the default gets a warning.
    _opt("sd_vae", _check_str, "Automatic", True),
    _opt("eta_noise_seed_delta", _check_int, 0, True),
    _opt("randn_source", _check_str, "GPU", True, choices=("GPU", "CPU", "NV")),
    _opt(
        "emphasis", _check_str, "Original", True, choices=("Original", "No norm", "Ignore", "None")
    ),
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
    _opt("img2img_color_correction", _check_bool, False, False),
    _opt("upscaler_for_img2img", _check_str, None, True),
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
    img2img_color_correction: bool = _d("img2img_color_correction")
    upscaler_for_img2img: str | None = _d("upscaler_for_img2img")


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
    # img2img-only fields webui itself only uses for edit models / never decodes.
    Ignored(
        "image_cfg_scale", _one_of(None), note="only instruct-pix2pix (edit) models use it; ignored"
    ),
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


def decode_api_json(text: str, limits: Limits = LIMITS) -> dict[str, Any]:
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


def parse_request(payload: Mapping[str, Any], mode: Mode, limits: Limits = LIMITS) -> ParsedRequest:
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

    # 5. Accepted-but-ignored fields, in table order.
    if not problems:
        warnings += _ignored_field_warnings(values, model)

    if problems:
        raise RequestError(problems)
    return ParsedRequest(mode, model.model_validate(values), settings, tuple(warnings))


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
    """Checked values of every field; a field with a problem is left out of the result."""
    ranges = _field_ranges(limits)
    values: dict[str, Any] = {}
    for name, info in model.model_fields.items():
        raw = payload.get(name)
        if raw is None:  # webui's fields are all Optional: null means "the default"
            values[name] = info.get_default(call_default_factory=True)
            continue
        checker = _checker_for(info.annotation)
        try:
            values[name] = _check_bounds(name, checker(raw), ranges.get(name), limits)
        except _Bad as bad:
            if bad.field is not None:  # a list item
                problems.append(Problem(name + bad.field, bad.value, bad.allowed))
            else:
                problems.append(Problem(name, raw, _allowed_text(name, checker, bad, ranges)))
    return values


def _check_bounds(name: str, value: Any, rng: Range | None, limits: Limits) -> Any:
    if rng is not None and value not in rng:
        raise _Bad("out of range")
    if name in _PROMPT_FIELDS:
        texts = [value] if isinstance(value, str) else value
        for i, text in enumerate(texts):
            if len(text) > limits.prompt_chars:
                allowed = f"must be at most {limits.prompt_chars} characters (got {len(text)})"
                if isinstance(value, str):
                    raise _Bad(allowed)
                raise _Bad(allowed, field=f"[{i}]", value=text)
    return value


_RANGE_NOTES: Final = {
    "seed": " (-1 for random)",
    "subseed": " (-1 for random)",
    "seed_resize_from_w": " (0 or less: off)",
    "seed_resize_from_h": " (0 or less: off)",
    "width": " (floored to a multiple of 8)",
    "height": " (floored to a multiple of 8)",
}


def _allowed_text(
    name: str, checker: Callable[[Any], Any], bad: _Bad, ranges: Mapping[str, Range]
) -> str:
    """For a ranged number always give the full rule: "must be an integer from 1 to 150"."""
    rng = ranges.get(name)
    if rng is None or checker not in _NOUNS:
        return bad.allowed
    return f"must be {_NOUNS[checker]} {rng.describe()}{_RANGE_NOTES.get(name, '')}"


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
    "IGNORED_FIELDS",
    "LIMITS",
    "LIMIT_ENV",
    "MODES",
    "OPTIONS",
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
