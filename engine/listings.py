"""webui's listing endpoints (`GET /sdapi/v1/<name>`, and `POST /sdapi/v1/png-info`), by name.

Every listing answers in the shape webui 1.10.1 declares for its route (the response models
of `modules/api/models.py`, named beside each function). FastAPI passes webui's answers
through those pydantic v1 models, so their coercions are webui's answer too (a sampler
option `True` is sent as the string "True"; a `scale` 4 as 4.0); the functions here build
those values directly.

A listing is a function of the engine (and, for png-info, of the request's `api_json`);
`LISTINGS` is the table `Engine.handle` looks names up in.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from PIL import Image

from .catalog import Catalog
from .device import attention_backend
from .errors import RequestError
from .geometry import LATENT_UPSCALE_MODES, PIXEL_UPSCALERS
from .infotext import parse_generation_parameters
from .inputs import ALLOWED_FORMATS, DECODE_ERRORS, open_image
from .payload import OPTIONS, decode_api_json
from .samplers import list_samplers, list_schedulers
from .upscaler_models import KINDS, WEBUI_NAMES, UpscalerFile

if TYPE_CHECKING:
    from .api import Engine

# ------------------------------------------------------------------------------ upscalers


@dataclass(frozen=True)
class UpscalerRow:
    """One entry of `GET /sdapi/v1/upscalers` (webui's `UpscalerItem`)."""

    name: str
    model_name: str | None = None  # the upscaler class's model name (None for built-ins)
    model_path: str | None = None  # the weights file (None for built-ins)
    model_url: str | None = None  # always None in webui 1.10.1's answer
    scale: float = 4.0  # webui's UpscalerData default, which its built-ins keep

    def item(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "model_name": self.model_name,
            "model_path": self.model_path,
            "model_url": self.model_url,
            "scale": float(self.scale),
        }


# webui's built-in pixel upscalers (modules/upscaler.py: UpscalerNone, UpscalerLanczos,
# UpscalerNearest), first in its list as there. The latent modes are not upscalers in webui's
# listing: they are `latent-upscale-modes`.
BUILTIN_UPSCALERS: tuple[UpscalerRow, ...] = tuple(UpscalerRow(name) for name in PIXEL_UPSCALERS)


def _model_row(file: UpscalerFile) -> UpscalerRow:
    # webui's model_name is the upscaler class's: None for its RealESRGAN class (the R-ESRGAN
    # names), "ESRGAN_4x" for its ESRGAN class (every other ESRGAN-kind file), "SwinIR 4x" for
    # its SwinIR class, None for its DAT and HAT classes (KINDS). model_path: the file here
    # (webui gives the download URL for the R-ESRGAN entries). scale: the file's own.
    realesrgan = file.name in WEBUI_NAMES.values()
    return UpscalerRow(
        file.name,
        model_name=None if realesrgan else KINDS[file.arch.kind].model_name,
        model_path=str(file.path),
        scale=float(file.scale),
    )


def upscalers(engine: Engine) -> list[dict[str, Any]]:
    """`GET /sdapi/v1/upscalers` -> list[UpscalerItem]: name, model_name, model_path,
    model_url, scale. The built-ins first, then the upscalers/ files by lower-cased name
    (webui's `sd_upscalers` order)."""
    files = sorted(engine.models.upscalers.listed, key=lambda f: f.name.lower())
    rows = [*BUILTIN_UPSCALERS, *(_model_row(f) for f in files)]
    return [row.item() for row in rows]


def latent_upscale_modes(engine: Engine) -> list[dict[str, Any]]:
    """`GET /sdapi/v1/latent-upscale-modes` -> list[LatentUpscalerModeItem]: name, in
    webui's `shared.latent_upscale_modes` order."""
    return [{"name": name} for name in LATENT_UPSCALE_MODES]


# ------------------------------------------------------------------------------- models


def sd_models(engine: Engine) -> list[dict[str, Any]]:
    """`GET /sdapi/v1/sd-models` -> list[SDModelItem]: title, model_name, hash, sha256,
    filename, config."""
    return engine.models.catalog.sd_models_listing()


def sd_vae(engine: Engine) -> list[dict[str, Any]]:
    """`GET /sdapi/v1/sd-vae` -> list[SDVaeItem]: model_name, filename."""
    return engine.models.vaes.listing() if engine.models.vaes else []


def sd_modules(engine: Engine) -> list[dict[str, Any]]:
    """`GET /sdapi/v1/sd-modules`: Forge's listing (webui 1.10.1 has none) of the separate
    modules a request can add, {model_name, filename} each. Here: the VAE files (there are no
    separate text encoders)."""
    return sd_vae(engine)


def samplers(engine: Engine) -> list[dict[str, Any]]:
    """`GET /sdapi/v1/samplers` -> list[SamplerItem]: name, aliases, options. `options` is a
    dict[str, str] there: pydantic v1 turns True into "True"."""
    return [
        {**row, "options": {key: str(value) for key, value in row["options"].items()}}
        for row in list_samplers()
    ]


def schedulers(engine: Engine) -> list[dict[str, Any]]:
    """`GET /sdapi/v1/schedulers` -> list[SchedulerItem]: name, label, aliases, default_rho,
    need_inner_model."""
    return [
        {**row, "default_rho": None if row["default_rho"] is None else float(row["default_rho"])}
        for row in list_schedulers()
    ]


def loras(engine: Engine) -> list[dict[str, Any]]:
    """`GET /sdapi/v1/loras` (the built-in Lora extension's route, no response model):
    name, alias, path, metadata."""
    return engine.models.loras.listing()


def _encoder_width(engine: Engine) -> int | None:
    """webui's `EmbeddingDatabase.get_expected_shape` for the default checkpoint: the width
    of the text conditioning an embedding must match (768 for SD1, 2048 for SDXL: both text
    encoders together, 1280 for the SDXL refiner)."""
    loaded = engine.models.cache.loaded.get(engine.models.default.title)
    if loaded is None:
        return None
    widths = [
        int(encoder.config.hidden_size)
        for encoder in (
            getattr(loaded.pipe, "text_encoder", None),
            getattr(loaded.pipe, "text_encoder_2", None),
        )
        if encoder is not None
    ]
    return sum(widths) or None


def embeddings(engine: Engine) -> dict[str, Any]:
    """`GET /sdapi/v1/embeddings` -> EmbeddingsResponse: {"loaded": {name: EmbeddingItem},
    "skipped": {name: EmbeddingItem}}, EmbeddingItem being step, sd_checkpoint,
    sd_checkpoint_name, shape, vectors. "loaded" is for the default checkpoint (webui's
    "current model"); an embedding of another width is "skipped" there, as in webui."""
    return engine.models.embeddings.listing(_encoder_width(engine))


def hypernetworks(engine: Engine) -> list[dict[str, Any]]:
    """`GET /sdapi/v1/hypernetworks` -> list[HypernetworkItem] (name, path): none here."""
    return []


def face_restorers(engine: Engine) -> list[dict[str, Any]]:
    """`GET /sdapi/v1/face-restorers` -> list[FaceRestorerItem] (name, cmd_dir): none here
    (`restore_faces` is accepted and reported as not supported)."""
    return []


def realesrgan_models(engine: Engine) -> list[dict[str, Any]]:
    """`GET /sdapi/v1/realesrgan-models` -> list[RealesrganItem] (name, path, scale): the
    installed Real-ESRGAN release files under webui's names ("R-ESRGAN 4x+", ...), in webui's
    table order. webui lists its whole table with download URLs; only files are served here."""
    files = engine.models.upscalers.files
    return [
        {"name": name, "path": str(files[name].path), "scale": files[name].scale}
        for name in WEBUI_NAMES.values()
        if name in files
    ]


def prompt_styles(engine: Engine) -> list[dict[str, Any]]:
    """`GET /sdapi/v1/prompt-styles` -> list[PromptStyleItem] (name, prompt,
    negative_prompt): this server has no styles.csv."""
    return []


# ------------------------------------------------------------------------ options, flags


_SETTINGS_PER_REQUEST = (
    "no options to set: this server keeps no settings between requests; send them as "
    "override_settings of a txt2img/img2img payload (endpoint options only lists them)"
)


def options(engine: Engine, api_json: str = "{}") -> dict[str, Any]:
    """`GET /sdapi/v1/options` (webui's `OptionsModel`: option name -> value): the options a
    request's `override_settings` can change here, at the value a request without
    override_settings runs with. webui's option names and value types; `sd_model_checkpoint`
    is the default checkpoint's title and `sd_checkpoint_hash` its sha256, as in webui.

    webui's `POST /sdapi/v1/options` changes the server's settings; a server whose requests
    never share settings cannot, so options sent in `api_json` are refused, not ignored."""
    if api_json.strip() not in ("", "{}") and decode_api_json(api_json, engine.limits):
        raise RequestError.single("api_json", api_json, _SETTINGS_PER_REQUEST)
    default = engine.models.default
    values: dict[str, Any] = {"sd_model_checkpoint": default.title}
    for name, spec in OPTIONS.items():
        if spec.honoured and name != "sd_model_checkpoint":
            values[name] = spec.default
    values["sd_checkpoint_hash"] = default.sha256
    return values


def _folder(catalog: Catalog, name: str) -> str:
    return str(Path(catalog.models_dir) / name)


def cmd_flags(engine: Engine) -> dict[str, Any]:
    """`GET /sdapi/v1/cmd-flags` (webui's `FlagsModel`: its command-line options). This
    server has no command line: the flags whose meaning holds here, under webui's names
    (model folders, half precision, attention, CPU use, API only)."""
    catalog = engine.models.catalog
    placement = engine.models.cache.placement
    backend = attention_backend(placement)
    return {
        "data_dir": str(catalog.models_dir),
        "models_dir": str(catalog.models_dir),
        "ckpt_dir": _folder(catalog, "checkpoints"),
        "vae_dir": _folder(catalog, "vae"),
        "embeddings_dir": _folder(catalog, "embeddings"),
        "lora_dir": _folder(catalog, "loras"),
        "controlnet_dir": _folder(catalog, "controlnet"),
        "hypernetwork_dir": None,
        "no_half": placement.dtype != _half(),
        "use_cpu": ["all"] if placement.device == "cpu" else [],
        "xformers": backend == "xformers",
        "opt_sdp_attention": backend == "PyTorch SDPA",
        "api": True,
        "nowebui": True,
    }


def _half() -> Any:
    import torch

    return torch.float16


# ------------------------------------------------------------------------------- memory


def _ram() -> dict[str, Any]:
    """webui's `ram`: used = this process's resident memory, total = the machine's memory,
    free = total - used (webui's arithmetic, not the system's free memory)."""
    try:
        page = os.sysconf("SC_PAGE_SIZE")
        total = os.sysconf("SC_PHYS_PAGES") * page
        with open("/proc/self/statm", encoding="ascii") as statm:
            used = int(statm.read().split()[1]) * page
    except (OSError, ValueError, IndexError) as err:
        return {"error": str(err)}
    return {"free": float(total - used), "used": used, "total": float(total)}


def _cuda(engine: Engine) -> dict[str, Any]:
    """webui's `cuda`: {"error": "unavailable"} without CUDA, else the driver's free/total and
    torch's allocator counters (current and peak) under webui's names."""
    import torch

    if engine.models.cache.placement.device != "cuda" or not torch.cuda.is_available():
        return {"error": "unavailable"}
    try:
        free, total = torch.cuda.mem_get_info()
        stats = torch.cuda.memory_stats()
    except RuntimeError as err:
        return {"error": str(err)}

    def pair(key: str) -> dict[str, int]:
        return {
            "current": stats.get(f"{key}.all.current", 0),
            "peak": stats.get(f"{key}.all.peak", 0),
        }

    return {
        "system": {"free": free, "used": total - free, "total": total},
        "active": pair("active_bytes"),
        "allocated": pair("allocated_bytes"),
        "reserved": pair("reserved_bytes"),
        "inactive": pair("inactive_split_bytes"),
        "events": {"retries": stats.get("num_alloc_retries", 0), "oom": stats.get("num_ooms", 0)},
    }


def memory(engine: Engine) -> dict[str, Any]:
    """`GET /sdapi/v1/memory` -> MemoryResponse: {"ram": {...}, "cuda": {...}}."""
    return {"ram": _ram(), "cuda": _cuda(engine)}


# ------------------------------------------------------------------------------ png-info

# modules/images.py IGNORED_INFO_KEYS: image.info entries png-info does not return.
IGNORED_INFO_KEYS = frozenset(
    {
        "jfif",
        "jfif_version",
        "jfif_unit",
        "jfif_density",
        "dpi",
        "exif",
        "loop",
        "background",
        "timestamp",
        "duration",
        "progressive",
        "progression",
        "icc_profile",
        "chromaticity",
        "photoshop",
    }
)
_EXIF_IFD = 0x8769
_USER_COMMENT = 0x9286
_PNG_INFO_IMAGE = f"a {ALLOWED_FORMATS} image as base64 or a data URL, under 'image'"


def _user_comment(image: Image.Image) -> str:
    """The EXIF UserComment as webui reads it (piexif.helper.UserComment.load, else UTF-8).

    A broken EXIF block reads as no comment (webui: `piexif.load` failing gives no comment),
    as img2img ignores it (inputs.open_image)."""
    try:
        raw = image.getexif().get_ifd(_EXIF_IFD).get(_USER_COMMENT, b"")
    except DECODE_ERRORS:
        return ""
    if isinstance(raw, str):
        return raw
    prefix, body = bytes(raw[:8]), bytes(raw[8:])
    codecs = {b"ASCII\0\0\0": "ascii", b"JIS\0\0\0\0\0": "shift_jis", b"UNICODE\0": "utf-16-be"}
    if prefix in codecs:
        try:
            return body.decode(codecs[prefix])
        except UnicodeDecodeError:
            pass
    return bytes(raw).decode("utf8", errors="ignore")


def _json_value(value: Any) -> Any:
    """An image.info value as JSON can carry it (tuples as lists, text bytes as text)."""
    if isinstance(value, bytes):
        return value.decode("utf8", errors="replace")
    if isinstance(value, tuple | list):
        return [_json_value(v) for v in value]
    if isinstance(value, str | int | float | bool) or value is None:
        return value
    return str(value)


def read_info(image: Image.Image) -> tuple[str, dict[str, Any]]:
    """webui's `images.read_info_from_image`: the infotext (PNG `parameters` chunk, or the
    EXIF UserComment of a JPEG/WebP) and the image's other metadata entries."""
    items = dict(image.info or {})
    geninfo = items.pop("parameters", None)
    if "exif" in items:
        comment = _user_comment(image)
        if comment:
            geninfo = comment
    for key in IGNORED_INFO_KEYS:
        items.pop(key, None)
    text = geninfo if isinstance(geninfo, str) else ""
    return text, {str(k): _json_value(v) for k, v in items.items()}


def png_info(engine: Engine, api_json: str) -> dict[str, Any]:
    """`POST /sdapi/v1/png-info` -> PNGInfoResponse: {"info": the infotext, "items": the
    image's other metadata, "parameters": the infotext parsed as webui's
    parse_generation_parameters}. The request is `api_json`: {"image": base64 or data URL}."""
    body = decode_api_json(api_json, engine.limits)
    value = body.get("image")
    if value is None or (isinstance(value, str) and not value.strip()):
        raise RequestError.single("image", value, f"required: {_PNG_INFO_IMAGE}")
    image = open_image(value, field="image")
    info, items = read_info(image)
    return {"info": info, "items": items, "parameters": parse_generation_parameters(info)}


# --------------------------------------------------------------------------------- table

Listing = Callable[["Engine"], Any]

# Listing endpoints, named like webui's /sdapi/v1/<name>.
LISTINGS: Mapping[str, Listing] = {
    "sd-models": sd_models,
    "sd-modules": sd_modules,
    "sd-vae": sd_vae,
    "samplers": samplers,
    "schedulers": schedulers,
    "upscalers": upscalers,
    "latent-upscale-modes": latent_upscale_modes,
    "loras": loras,
    "embeddings": embeddings,
    "hypernetworks": hypernetworks,
    "face-restorers": face_restorers,
    "realesrgan-models": realesrgan_models,
    "prompt-styles": prompt_styles,
    "cmd-flags": cmd_flags,
    "memory": memory,
}

# Endpoints that read the request (`api_json`) and answer JSON, like a listing.
INSPECTORS: Mapping[str, Callable[[Engine, str], Any]] = {"options": options, "png-info": png_info}
