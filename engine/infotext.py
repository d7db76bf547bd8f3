"""webui infotext (the PNG `parameters` text) and the `info` JSON of a response.

Matches AUTOMATIC1111 v1.10.1: `processing.py: create_infotext` / `Processed.js` and
`infotext_utils.py: quote / unquote / parse_generation_parameters`.
Facts: shared/reference/webui-api.md §2 and §3.

Everything here is pure: callers resolve webui's options (add_model_hash_to_info, the
ancestral/eta rule for ENSD, ...) and pass the per-image values; a value of None means
"the key is not printed", exactly like webui's `None` entries.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from datetime import datetime
from typing import Any

NEGATIVE_PREFIX = "Negative prompt:"


@dataclass(frozen=True)
class ImageParams:
    """Everything that goes on the params line of ONE image, typed.

    Pass floats for cfg_scale, denoising_strength, subseed_strength, image_cfg_scale and
    conditional_mask_weight: webui's API (pydantic v1) coerced them, so `7` prints as
    `CFG scale: 7.0`. An int that arrives anyway is printed as that float.

    `extra` is webui's `p.extra_generation_params` for this image: insertion order is kept,
    values must already be per-image scalars (webui's list/callable forms are resolved by
    the caller) and are printed as given (`Hires upscale` must be `2.0`, not `2`). A key
    that is also a fixed key ("Schedule type", "Denoising strength", ...) keeps the fixed
    position and only replaces the value; a None value removes the key.
    """

    steps: int
    sampler: str  # e.g. "DPM++ 2M"
    schedule_type: str | None  # "Karras" / "Automatic" / None (omitted)
    cfg_scale: float
    seed: int
    width: int  # first-pass size
    height: int
    model_hash: str | None = None  # 10 hex; None → key omitted
    model_name: str | None = None
    vae_hash: str | None = None
    vae_name: str | None = None
    subseed: int | None = None
    subseed_strength: float = 0.0  # "Variation seed"/"Variation seed strength" only if != 0
    seed_resize_from: tuple[int, int] | None = None  # (w, h); printed when both > 0
    denoising_strength: float | None = None
    clip_skip: int = 1  # printed only if > 1
    ensd: int = 0  # printed only if != 0; the caller applies webui's ancestral/eta rule
    rng: str | None = None  # printed only if not "GPU"/None
    tiling: bool = False
    image_cfg_scale: float | None = None
    face_restoration: str | None = None
    conditional_mask_weight: float | None = None
    init_image_hash: str | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)
    version: str | None = None  # "Version", after the extras
    user: str | None = None


def _as_float(value: float | None) -> float | None:
    """Print ints as webui would after pydantic v1 coerced them to float (`7` → `7.0`)."""
    return None if value is None else float(value)


def _seed_resize(p: ImageParams) -> str | None:
    if p.seed_resize_from is None:
        return None
    w, h = p.seed_resize_from
    return f"{w}x{h}" if w > 0 and h > 0 else None


def _absent(_: ImageParams) -> None:
    """A fixed key we never fill ourselves; listed so that an `extra` keeps its position."""
    return None


# webui's dict literal in create_infotext, in order (reference §3, items 1..22).
_FIXED_KEYS: tuple[tuple[str, Callable[[ImageParams], Any]], ...] = (
    ("Steps", lambda p: p.steps),
    ("Sampler", lambda p: p.sampler),
    ("Schedule type", lambda p: p.schedule_type),
    ("CFG scale", lambda p: _as_float(p.cfg_scale)),
    ("Image CFG scale", lambda p: _as_float(p.image_cfg_scale)),
    ("Seed", lambda p: p.seed),
    ("Face restoration", lambda p: p.face_restoration),
    ("Size", lambda p: f"{p.width}x{p.height}"),
    ("Model hash", lambda p: p.model_hash),
    ("Model", lambda p: p.model_name),
    ("FP8 weight", _absent),
    ("Cache FP16 weight for LoRA", _absent),
    ("VAE hash", lambda p: p.vae_hash),
    ("VAE", lambda p: p.vae_name),
    ("Variation seed", lambda p: p.subseed if p.subseed_strength != 0 else None),
    (
        "Variation seed strength",
        lambda p: _as_float(p.subseed_strength) if p.subseed_strength != 0 else None,
    ),
    ("Seed resize from", _seed_resize),
    ("Denoising strength", lambda p: _as_float(p.denoising_strength)),
    ("Conditional mask weight", lambda p: _as_float(p.conditional_mask_weight)),
    ("Clip skip", lambda p: p.clip_skip if p.clip_skip > 1 else None),
    ("ENSD", lambda p: p.ensd if p.ensd != 0 else None),
    ("Token merging ratio", _absent),
    ("Token merging ratio hr", _absent),
    ("Init image hash", lambda p: p.init_image_hash),
    ("RNG", lambda p: p.rng if p.rng not in (None, "GPU") else None),
    ("Tiling", lambda p: "True" if p.tiling else None),
)

FIXED_KEYS: tuple[str, ...] = tuple(key for key, _ in _FIXED_KEYS)


def generation_params(params: ImageParams) -> dict[str, Any]:
    """The ordered key → value dict behind the params line (None values still included).

    Built the way webui's dict literal behaves: fixed keys, then `extra` (a repeated key
    keeps its first position and takes the new value), then "Version" and "User".
    """
    result = {key: get(params) for key, get in _FIXED_KEYS}
    result.update(params.extra)
    result["Version"] = params.version
    result["User"] = params.user
    return result


def remove_symbols(name: str) -> str:
    """A network's name as webui's "Lora hashes" / "TI hashes" print it: ':' and ',' removed
    (they would end the `name: hash` pair)."""
    return name.replace(":", "").replace(",", "")


def quote(value: Any) -> str:
    """webui's `quote`: JSON-quote a value whose text has `,`, `:` or a newline.

    Other values are printed with `str()`. A value json cannot encode is quoted as its
    `str()` (webui would raise there).
    """
    text = str(value)
    if "," not in text and ":" not in text and "\n" not in text:
        return text
    return json.dumps(value, ensure_ascii=False, default=str)


def params_line(params: ImageParams) -> str:
    """The last infotext line: `Key: value` pairs; a value equal to its key prints the key."""
    return ", ".join(
        key if key == value else f"{key}: {quote(value)}"
        for key, value in generation_params(params).items()
        if value is not None
    )


def create_infotext(prompt: str, negative_prompt: str, params: ImageParams) -> str:
    """The infotext of one image, byte for byte as webui writes it.

    The negative line is left out when the negative prompt is empty; like webui the whole
    text is `.strip()`ped, so an empty prompt leaves just the params line.
    """
    negative = f"\n{NEGATIVE_PREFIX} {negative_prompt}" if negative_prompt else ""
    return f"{prompt}{negative}\n{params_line(params)}".strip()


# ---------------------------------------------------------------------------- parsing

# infotext_utils.re_param / re_imagesize, verbatim patterns.
_PARAM_RE = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')
_SIZE_RE = re.compile(r"^(\d+)x(\d+)$")
_SPACES = re.compile(r"\s*")
_WORD_CHAR = re.compile(r"\w")
_KEY_CHARS = re.compile(r"[\w \-/]*")


def param_pairs(line: str) -> list[tuple[str, str]]:
    r"""`_PARAM_RE.findall(line)` (webui's re_param), in linear time.

    findall retries the pattern at every position, and a start fails only at the end of the
    run of key characters (`[\w \-/]`) it begins, when no ':' follows that run: across a long
    run that is quadratic (a 100 kB line of words takes a minute), and png-info parses
    whatever text an uploaded image carries. Every start up to the end of such a run fails
    the same way, so the scan jumps there; where a ':' follows, the pattern itself matches.
    """
    pairs: list[tuple[str, str]] = []
    pos, size = 0, len(line)
    while pos < size:
        spaces = _SPACES.match(line, pos)
        key_start = spaces.end() if spaces else pos
        if key_start >= size or not _WORD_CHAR.match(line, key_start):
            pos = key_start + 1
            continue
        run = _KEY_CHARS.match(line, key_start + 1)
        run_end = run.end() if run else key_start + 1
        if run_end > key_start + 1 and run_end < size and line[run_end] == ":":
            found = _PARAM_RE.match(line, pos)
            if found:  # always, by the reasoning above
                pairs.append((found.group(1), found.group(2)))
                pos = found.end()
                continue
        pos = run_end
    return pairs


# webui only treats the last line as parameters if it holds at least this many pairs.
_MIN_PARAMS_ON_LINE = 3

# What webui's parse_generation_parameters fills in for keys that are absent (the subset
# that maps to request fields we serve). Used only with `with_defaults=True`.
PARSE_DEFAULTS: tuple[tuple[str, str], ...] = (
    ("Clip skip", "1"),
    ("Hires resize-1", "0"),
    ("Hires resize-2", "0"),
    ("Hires sampler", "Use same sampler"),
    ("Hires schedule type", "Use same scheduler"),
    ("Hires checkpoint", "Use same checkpoint"),
    ("Hires prompt", ""),
    ("Hires negative prompt", ""),
    ("Mask mode", "Inpaint masked"),
    ("Masked content", "original"),
    ("Inpaint area", "Whole picture"),
    ("Masked area padding", "32"),
    ("RNG", "GPU"),
    ("Schedule type", "Automatic"),
    ("Schedule max sigma", "0"),
    ("Schedule min sigma", "0"),
    ("Schedule rho", "0"),
    ("VAE Encoder", "Full"),
    ("VAE Decoder", "Full"),
)


def _unquote(text: str) -> str:
    """webui's `unquote`: JSON-decode a quoted value; keep the raw text if that fails."""
    if len(text) < 2 or text[0] != '"' or text[-1] != '"':
        return text
    try:
        decoded = json.loads(text)
    except ValueError:
        return text
    return decoded if isinstance(decoded, str) else text


def _add_line(lines: list[str], line: str) -> None:
    # webui: `acc += ("" if acc == "" else "\n") + line`, so leading blank lines vanish. Kept
    # as a list (joined once): adding to a string is quadratic in the number of lines.
    if lines or line:
        lines.append(line)


def parse_infotext(text: str, *, with_defaults: bool = False) -> dict[str, str]:
    """Parse an infotext like webui's `parse_generation_parameters` (the essentials).

    Returns every `Key: value` of the params line (quoted values decoded), then "Prompt"
    and "Negative prompt". A `WxH` value is kept under its key AND split into `Key-1` /
    `Key-2` (webui keeps only the split). Like webui: lines are stripped, the last line
    is parameters only if it has at least 3 pairs, bare keys and empty values are dropped.
    `with_defaults=True` adds webui's defaults for absent keys (PARSE_DEFAULTS).
    """
    prompt, negative, last = _split_infotext(text)
    result: dict[str, str] = {}
    for key, raw_value in param_pairs(last):
        if not raw_value:
            continue  # webui fails on v[0] for an empty value and skips the key
        value = _unquote(raw_value)
        result[key] = value
        size = _SIZE_RE.match(value)
        if size is not None:
            result[f"{key}-1"] = size.group(1)
            result[f"{key}-2"] = size.group(2)

    result["Prompt"] = prompt
    result["Negative prompt"] = negative
    if with_defaults:
        for key, default in PARSE_DEFAULTS:
            result.setdefault(key, default)
    return result


def _split_infotext(text: str) -> tuple[str, str, str]:
    """(prompt, negative prompt, parameters line), split as webui splits them."""
    *lines, last = text.strip().split("\n")
    if len(param_pairs(last)) < _MIN_PARAMS_ON_LINE:
        lines.append(last)
        last = ""
    prompt: list[str] = []
    negative: list[str] = []
    in_negative = False
    for raw in lines:
        line = raw.strip()
        if line.startswith(NEGATIVE_PREFIX):
            in_negative = True
            line = line[len(NEGATIVE_PREFIX) :].strip()
        _add_line(negative if in_negative else prompt, line)
    return "\n".join(prompt), "\n".join(negative), last


# What webui's parse_generation_parameters adds for absent keys, in its order and with its
# value types (ints where webui writes ints). "Hires resize-1/-2" and the old first-pass
# conversion come before "RNG" (see parse_generation_parameters).
_WEBUI_DEFAULTS_BEFORE: tuple[tuple[str, Any], ...] = (
    ("Hires sampler", "Use same sampler"),
    ("Hires schedule type", "Use same scheduler"),
    ("Hires checkpoint", "Use same checkpoint"),
    ("Hires prompt", ""),
    ("Hires negative prompt", ""),
    ("Mask mode", "Inpaint masked"),
    ("Masked content", "original"),
    ("Inpaint area", "Whole picture"),
    ("Masked area padding", 32),
)
_WEBUI_DEFAULTS_AFTER: tuple[tuple[str, Any], ...] = (
    ("RNG", "GPU"),
    ("Schedule type", "Automatic"),
    ("Schedule max sigma", 0),
    ("Schedule min sigma", 0),
    ("Schedule rho", 0),
    ("VAE Encoder", "Full"),
    ("VAE Decoder", "Full"),
    ("FP8 weight", "Disable"),
)
# webui's infotext_versions: the versions its backcompat and hires-style rules compare with.
_V160, _V170_TSNR, _V180, _V180_HR_STYLES = "1.6.0", "v1.7.0-225", "1.8.0", "1.8.0-139"


def _version(text: Any) -> Any:
    """webui's infotext_versions.parse_version: "v1.10.1-12-gabc" -> 1.10.1.post12; None when
    it is not a version (our own "cog-webui-sd-v..." is not)."""
    from packaging import version

    if not isinstance(text, str):
        return None
    match = re.match(r"([^-]+-[^-]+)-.*", text)
    if match:
        text = match.group(1)
    try:
        return version.parse(text)
    except version.InvalidVersion:
        return None


def _old_hires_fix(res: dict[str, Any]) -> None:
    """webui's restore_old_hires_fix_params (use_old_hires_fix_width_height off): an old
    "First pass size" becomes the size, and the size the hires target."""
    first_w, first_h = res.get("First pass size-1"), res.get("First pass size-2")
    if first_w is None or first_h is None:
        return
    first_w, first_h = int(first_w), int(first_h)
    width, height = int(res.get("Size-1", 512)), int(res.get("Size-2", 512))
    if first_w == 0 or first_h == 0:
        # processing.old_hires_fix_first_pass_dimensions
        scale = math.sqrt(512 * 512 / (width * height))
        first_w = math.ceil(scale * width / 64) * 64
        first_h = math.ceil(scale * height / 64) * 64
    res["Size-1"], res["Size-2"] = first_w, first_h
    res["Hires resize-1"], res["Hires resize-2"] = width, height


def _backcompat(res: dict[str, Any]) -> None:
    """webui's infotext_versions.backcompat (opts.auto_backcompat is on by default)."""
    from packaging import version

    ver = _version(res.get("Version"))
    if ver is None:
        return
    if ver < version.parse(_V160) and "[" in res.get("Prompt", ""):
        res["Old prompt editing timelines"] = True
    if ver < version.parse(_V160) and res.get("Sampler", "") in ("DDIM", "PLMS"):
        res["Pad conds v0"] = True
    if ver < version.parse(_V170_TSNR):
        res["Downcast alphas_cumprod"] = True
    if ver < version.parse(_V180) and res.get("Refiner"):
        res["Refiner switch by sampling steps"] = True


def parse_generation_parameters(text: str) -> dict[str, Any]:
    """webui 1.10.1's `infotext_utils.parse_generation_parameters`, as png-info answers it.

    Every `Key: value` of the parameters line (quoted values decoded; a `WxH` value only as
    `Key-1` / `Key-2`), "Prompt" and "Negative prompt", then webui's defaults for absent keys
    with webui's types, the old first-pass size conversion, "Emphasis: Original" when a prompt
    uses weights, and the version back-compatibility flags. This server has no styles, so no
    style is extracted (webui with an empty styles.csv does the same); the callbacks
    extensions hook into pasting (the Lora extension's "AddNet" conversion) are not run.
    """
    from packaging import version

    from .prompt_parser import parse_prompt_attention

    prompt, negative, last = _split_infotext(text)
    res: dict[str, Any] = {}
    for key, raw_value in param_pairs(last):
        if not raw_value:
            continue  # webui: v[0] raises on an empty value and the key is skipped
        value = _unquote(raw_value) if raw_value[0] == raw_value[-1] == '"' else raw_value
        size = _SIZE_RE.match(value)
        if size is not None:
            res[f"{key}-1"], res[f"{key}-2"] = size.group(1), size.group(2)
        else:
            res[key] = value
    # Styles: with no styles, only the hires prompts are normalised (webui >= 1.8.0-139).
    if "Hires prompt" in res or "Hires negative prompt" in res:
        ver = _version(res.get("Version"))
        if ver is None or ver > version.parse(_V180_HR_STYLES):
            hr_prompt = res.get("Hires prompt", prompt)
            hr_negative = res.get("Hires negative prompt", negative)
            res["Hires prompt"] = "" if hr_prompt == prompt else hr_prompt
            res["Hires negative prompt"] = "" if hr_negative == negative else hr_negative
    res["Prompt"] = prompt
    res["Negative prompt"] = negative
    res.setdefault("Clip skip", "1")
    if "Hypernet" in res:
        res["Prompt"] += f"<hypernet:{res['Hypernet']}:{res.get('Hypernet strength', '1.0')}>"
    if "Hires resize-1" not in res:
        res["Hires resize-1"] = 0
        res["Hires resize-2"] = 0
    for key, default in _WEBUI_DEFAULTS_BEFORE:
        res.setdefault(key, default)
    _old_hires_fix(res)
    for key, default in _WEBUI_DEFAULTS_AFTER:
        res.setdefault(key, default)
    if "Cache FP16 weight for LoRA" not in res and res["FP8 weight"] != "Disable":
        res["Cache FP16 weight for LoRA"] = False
    attention = parse_prompt_attention(prompt) + parse_prompt_attention(negative)
    plain = [p for p in attention if p[1] == 1.0 or p[0] == "BREAK"]
    if "Emphasis" not in res and len(attention) != len(plain):
        res["Emphasis"] = "Original"
    res.setdefault("Refiner switch by sampling steps", False)
    _backcompat(res)
    return res


# ---------------------------------------------------------------------------- info JSON


@dataclass(frozen=True)
class InfoRecord:
    """The `info` JSON of a txt2img/img2img response, fields in webui's key order.

    `warnings` is ours (always last): what the request asked for that we ignored or could
    not honour. webui has no such key; webui clients ignore unknown keys.
    """

    prompt: str
    all_prompts: list[str]
    negative_prompt: str
    all_negative_prompts: list[str]
    seed: int
    all_seeds: list[int]
    subseed: int
    all_subseeds: list[int]
    subseed_strength: float
    width: int
    height: int
    sampler_name: str
    cfg_scale: float
    steps: int
    batch_size: int
    restore_faces: bool
    face_restoration_model: str | None
    sd_model_name: str | None
    sd_model_hash: str | None
    sd_vae_name: str | None
    sd_vae_hash: str | None
    seed_resize_from_w: int
    seed_resize_from_h: int
    denoising_strength: float | None
    extra_generation_params: dict[str, Any]
    index_of_first_image: int
    infotexts: list[str]
    styles: list[str]
    job_timestamp: str
    clip_skip: int
    is_using_inpainting_conditioning: bool
    version: str
    warnings: list[str] = field(default_factory=list)


# Fields webui's API holds as floats (pydantic v1 coercion): an int becomes `7.0` in JSON.
_FLOAT_FIELDS = ("subseed_strength", "cfg_scale", "denoising_strength")


def _coerce_float(value: Any) -> Any:
    if isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    return value


def _unserialisable(_: Any) -> None:
    return None


def info_json(record: InfoRecord) -> str:
    """`json.dumps` of the record in webui's key order (then "warnings").

    Like webui's `Processed.js` (`default=lambda o: None`), a value json cannot encode
    (at any depth, e.g. inside extra_generation_params) becomes null.
    """
    obj = {f.name: getattr(record, f.name) for f in fields(record)}
    for name in _FLOAT_FIELDS:
        obj[name] = _coerce_float(obj[name])
    return json.dumps(obj, default=_unserialisable)


def job_timestamp(moment: datetime) -> str:
    """webui's `state.job_timestamp` format: `YYYYMMDDhhmmss`."""
    return moment.strftime("%Y%m%d%H%M%S")
