"""webui's extras endpoints: `extra-single-image` and `extra-batch-images` (upscaling).

The request fields and their meaning are webui 1.10.1's (`modules/api/models.py`
ExtrasBaseRequest, `api.py`, `modules/postprocessing.py: run_extras`,
`scripts/postprocessing_upscale.py`):

- `resize_mode` 0: upscale by `upscaling_resize`; 1: to `upscaling_resize_w`x`_h` (the
  factor that covers both), then, with `upscaling_crop`, centred on a canvas of exactly that
  size (cropping what sticks out).
- `upscaler_1` does the upscale ("None": the image comes back as it is); `upscaler_2` with
  `extras_upscaler_2_visibility` > 0 upscales the original too and is blended over it.
- An upscaler upscales like webui's `Upscaler.upscale`: towards the factor's size rounded down
  to a multiple of 8 (model upscalers in up to three passes of their own scale), then LANCZOS to
  exactly that size.
- Face restoration (GFPGAN, CodeFormer) is not available here: its fields are accepted at their
  off value (visibility 0) only.

The answer: the images (PNG, the input's text chunks kept and webui's `postprocessing` chunk
added) and `html_info`, webui's HTML of the postprocessing infotext. Every field is checked
before any work; an error names the field, the value and what is allowed.
"""

from __future__ import annotations

import html
import io
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from PIL import Image, PngImagePlugin

from .errors import Problem, RequestError, UnknownName, show_choices
from .geometry import LANCZOS, PIXEL_UPSCALERS
from .images import EncodedImage
from .inputs import open_image
from .listings import IGNORED_INFO_KEYS
from .payload import _Bad, _check_bool, _check_float, _check_int, _check_str, decode_api_json
from .playground import _image_file as playground_image
from .upscaler_models import DEFAULT_TILE, DEFAULT_TILE_OVERLAP

if TYPE_CHECKING:
    from .api import Engine

EXTRAS_ENDPOINTS = ("extra-single-image", "extra-batch-images")


def _unit(value: Any) -> float:
    value = _check_float(value)
    if not 0 <= value <= 1:
        raise _Bad("must be a number from 0 to 1")
    return value


def _positive(value: Any) -> float:
    value = _check_float(value)
    if value <= 0:
        raise _Bad("must be a number above 0")
    return value


def _at_least_1(value: Any) -> int:
    value = _check_int(value)
    if value < 1:
        raise _Bad("must be an integer of at least 1")
    return value


def _mode(value: Any) -> int:
    value = _check_int(value)
    if value not in (0, 1):
        raise _Bad("allowed: 0 (upscale by upscaling_resize) or 1 (to upscaling_resize_w x _h)")
    return value


def _off(value: Any) -> float:
    value = _unit(value)
    if value != 0:
        raise _Bad("face restoration is not available on this server; allowed: 0 (off)")
    return value


# Field -> (check, webui's default). `image` / `imageList` are the per-endpoint fields.
_FIELDS: Mapping[str, tuple[Callable[[Any], Any], Any]] = {
    "resize_mode": (_mode, 0),
    "show_extras_results": (_check_bool, True),
    "gfpgan_visibility": (_off, 0.0),
    "codeformer_visibility": (_off, 0.0),
    "codeformer_weight": (_unit, 0.0),
    "upscaling_resize": (_positive, 2.0),
    "upscaling_resize_w": (_at_least_1, 512),
    "upscaling_resize_h": (_at_least_1, 512),
    "upscaling_crop": (_check_bool, True),
    "upscaler_1": (_check_str, "None"),
    "upscaler_2": (_check_str, "None"),
    "extras_upscaler_2_visibility": (_unit, 0.0),
    "upscale_first": (_check_bool, False),
}

# webui's images.IGNORED_INFO_KEYS: one table, in listings.py (png-info reads them too).
_IGNORED_INFO = IGNORED_INFO_KEYS

Upscale = Callable[[Image.Image, float], Image.Image]


@dataclass(frozen=True)
class ExtrasResult:
    images: list[EncodedImage]
    html_info: str


def _upscalers(engine: Engine) -> dict[str, Upscale | None]:
    """Every name upscaler_1/2 accept: "None" (no upscale), the built-ins, the models."""
    table: dict[str, Upscale | None] = {"None": None}
    for name, resample in PIXEL_UPSCALERS.items():
        if resample is not None:
            table[name] = _builtin(resample)
    catalog = engine.models.upscalers
    for name in catalog.names:
        table[name] = _model(catalog.upscale, name)
    return table


def _builtin(resample: Image.Resampling) -> Upscale:
    def upscale(image: Image.Image, scale: float) -> Image.Image:
        # webui's Upscaler.upscale over UpscalerLanczos/UpscalerNearest.do_upscale.
        dest = (int((image.width * scale) // 8 * 8), int((image.height * scale) // 8 * 8))
        for i in range(3):
            if image.width >= dest[0] and image.height >= dest[1] and (i > 0 or scale != 1):
                break
            shape = image.size
            image = image.resize((int(image.width * scale), int(image.height * scale)), resample)
            if shape == image.size:
                break
        if image.size != dest:
            image = image.resize(dest, LANCZOS)
        return image

    return upscale


def _model(run: Callable[..., Image.Image], name: str) -> Upscale:
    # The extras endpoints take no override_settings: webui's default tile options.
    def upscale(image: Image.Image, scale: float) -> Image.Image:
        return run(name, image, scale, tile=DEFAULT_TILE, overlap=DEFAULT_TILE_OVERLAP)

    return upscale


@dataclass(frozen=True)
class _Request:
    images: list[Image.Image]
    values: dict[str, Any]
    upscaler_1: Upscale | None
    upscaler_2: Upscale | None


def _parse(engine: Engine, endpoint: str, api_json: str, init_image: Any) -> _Request:
    body = decode_api_json(api_json, engine.limits)
    image_field = "image" if endpoint == "extra-single-image" else "imageList"
    if image_field == "image" and init_image is not None and not body.get("image"):
        # The playground's init_image input, where api_json sends no image.
        body["image"] = playground_image("init_image")(init_image)
    problems: list[Problem] = []
    values: dict[str, Any] = {}
    for name, (check, default) in _FIELDS.items():
        try:
            values[name] = check(body[name]) if name in body else default
        except _Bad as bad:
            problems.append(Problem(name, body[name], str(bad)))
    unknown = [k for k in body if k not in _FIELDS and k != image_field]
    for key in unknown:
        problems.append(
            Problem(
                key,
                body[key],
                f"not a field of {endpoint}; allowed: {show_choices([image_field, *_FIELDS])}",
            )
        )
    table = _upscalers(engine)
    chosen: dict[str, Upscale | None] = {}
    for field in ("upscaler_1", "upscaler_2"):
        given = values.get(field)
        if isinstance(given, str) and given not in table:
            problems.extend(UnknownName(field, given, table, kind="upscaler").problems)
        chosen[field] = table.get(given) if isinstance(given, str) else None
    images: list[Image.Image] = []
    if image_field == "image":
        value = body.get("image", "")
        if not value:
            problems.append(Problem("image", value, "required: the image to upscale (base64)"))
        else:
            images.append(_open("image", value, problems))
    else:
        items = body.get("imageList")
        if not isinstance(items, list) or not items:
            problems.append(
                Problem("imageList", items, "required: a list of {data, name} (data: base64)")
            )
        elif len(items) > engine.limits.images:
            problems.append(
                Problem("imageList", f"{len(items)} images", f"at most {engine.limits.images}")
            )
        else:
            for index, item in enumerate(items):
                where = f"imageList[{index}]"
                if not isinstance(item, dict) or not isinstance(item.get("data"), str):
                    problems.append(Problem(where, item, "must be an object with data (base64)"))
                    continue
                if not isinstance(item.get("name", ""), str):
                    problems.append(Problem(f"{where}.name", item.get("name"), "a string"))
                images.append(_open(f"{where}.data", item["data"], problems))
    if problems:
        raise RequestError(problems)
    request = _Request(images, values, chosen["upscaler_1"], chosen["upscaler_2"])
    _check_sizes(engine, request)
    return request


def _open(field: str, value: Any, problems: list[Problem]) -> Image.Image:
    try:
        image = open_image(value, field=field)
    except RequestError as exc:
        problems.extend(exc.problems)
        return Image.new("RGB", (1, 1))
    image.load()
    return image


def _factor(values: Mapping[str, Any], image: Image.Image) -> float:
    if values["resize_mode"] == 1:
        return float(
            max(
                values["upscaling_resize_w"] / image.width,
                values["upscaling_resize_h"] / image.height,
            )
        )
    return float(values["upscaling_resize"])


def output_size(values: Mapping[str, Any], image: Image.Image) -> tuple[int, int]:
    """The size webui's Upscale script returns for `image`: the canvas with crop, else the
    factor's size rounded down to a multiple of 8."""
    if values["resize_mode"] == 1 and values["upscaling_crop"]:
        return values["upscaling_resize_w"], values["upscaling_resize_h"]
    scale = _factor(values, image)
    return int((image.width * scale) // 8 * 8), int((image.height * scale) // 8 * 8)


def _check_sizes(engine: Engine, request: _Request) -> None:
    if request.upscaler_1 is None:
        return  # the images come back unchanged
    field = "upscaling_resize" if request.values["resize_mode"] == 0 else "upscaling_resize_w"
    limits = engine.limits
    total = 0
    for image in request.images:
        width, height = output_size(request.values, image)
        scaled = output_size({**request.values, "upscaling_crop": False}, image)
        what = f"{image.width}x{image.height} would become {scaled[0]}x{scaled[1]}"
        if min(scaled) < 1:
            raise RequestError.single(field, request.values[field], f"{what}: too small")
        if max(scaled[0] * scaled[1], width * height) > limits.pixels:
            raise RequestError.single(
                field, request.values[field], f"{what}: above this server's {limits.pixels} pixels"
            )
        total += width * height
    if total > limits.total_pixels:
        raise RequestError.single(
            field,
            request.values[field],
            f"the images would total {total} pixels, above this server's {limits.total_pixels}",
        )


def _quote(value: Any) -> Any:
    # webui's infotext_utils.quote.
    text = str(value)
    if "," not in text and "\n" not in text and ":" not in text:
        return value
    return json.dumps(text, ensure_ascii=False)


def _upscale(
    image: Image.Image, values: Mapping[str, Any], upscale: Upscale, info: dict[str, Any]
) -> Image.Image:
    # webui ScriptPostprocessingUpscale.upscale (max_side_length 0: the API has no such field).
    scale = _factor(values, image)
    if values["resize_mode"] == 1:
        to_w, to_h = values["upscaling_resize_w"], values["upscaling_resize_h"]
        info["Postprocess upscale to"] = f"{to_w}x{to_h}"
    else:
        info["Postprocess upscale by"] = scale
    image = upscale(image, scale)
    if values["resize_mode"] == 1 and values["upscaling_crop"]:
        canvas = Image.new("RGB", (to_w, to_h))
        canvas.paste(image, (to_w // 2 - image.width // 2, to_h // 2 - image.height // 2))
        image = canvas
        info["Postprocess crop to"] = f"{image.width}x{image.height}"
    return image


def _process(request: _Request, image: Image.Image) -> tuple[Image.Image, str]:
    values = request.values
    if image.mode not in ("RGBA", "RGB"):
        image = image.convert("RGB")
    info: dict[str, Any] = {}
    if request.upscaler_1 is not None:
        out = _upscale(image, values, request.upscaler_1, info)
        info["Postprocess upscaler"] = values["upscaler_1"]
        if request.upscaler_2 is not None and values["extras_upscaler_2_visibility"] > 0:
            second = _upscale(image, values, request.upscaler_2, info)
            if second.mode != out.mode:
                second = second.convert(out.mode)
            out = Image.blend(out, second, values["extras_upscaler_2_visibility"])
            info["Postprocess upscaler 2"] = values["upscaler_2"]
        image = out
    text = ", ".join(k if k == v else f"{k}: {_quote(v)}" for k, v in info.items())
    return image, text


def _encode(image: Image.Image, source: Image.Image, infotext: str) -> EncodedImage:
    # webui: the input's text chunks (its `parameters` too) plus "postprocessing", written by
    # encode_pil_to_base64 as PNG text chunks.
    meta = PngImagePlugin.PngInfo()
    for key, value in (source.info or {}).items():
        skipped = key in _IGNORED_INFO or key == "postprocessing"
        if isinstance(key, str) and isinstance(value, str) and not skipped:
            meta.add_text(key, value)
    meta.add_text("postprocessing", infotext)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=meta)
    return EncodedImage(buffer.getvalue(), "png", "image/png")


def _html(text: str) -> str:
    # webui's ui_common.plaintext_to_html.
    return "<p>" + "<br>\n".join(html.escape(line) for line in text.split("\n")) + "</p>"


def run_extras(
    engine: Engine, endpoint: str, api_json: str, init_image: Any = None
) -> ExtrasResult:
    """Serve `extra-single-image` / `extra-batch-images` from the request body `api_json`
    (`init_image`: the playground's image file, the single image when api_json has none)."""
    request = _parse(engine, endpoint, api_json, init_image)
    outputs = []
    infotext = ""
    for source in request.images:
        image, infotext = _process(request, source)
        outputs.append(_encode(image, source, infotext))
    # webui's html_info is the last image's infotext.
    return ExtrasResult(outputs, _html(infotext))
