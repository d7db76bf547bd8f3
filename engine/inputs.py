"""Decoding the images that arrive in requests: `init_images`, `mask`, ControlNet images.

webui's `decode_base64_to_image` accepts raw base64, a `data:image/...;base64,` URL or an
http(s) URL, and hands whatever PIL opens to the pipeline. We accept the same base64 forms, but
check them strictly and early so that a bad image is a clear `RequestError` naming the field
before any heavy work:

1. the value is a string: raw base64 or a base64 data URL (never a URL we would fetch);
2. strict base64 (whitespace tolerated, missing padding added), size limit on the decoded bytes;
3. the format from the bytes' magic, allowlisted: PNG, JPEG, WebP;
4. width and height from the header, against the limits, before any pixel is decoded;
5. pixels decoded with PIL's decompression-bomb protection left on;
6. normalised: EXIF orientation applied, first frame of an animation, RGB (or RGBA on request),
   16-bit grey scaled to 8 bits.
"""

from __future__ import annotations

import base64
import binascii
import io
import re
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image, ImageOps

from .errors import Problem, RequestError

__all__ = [
    "ALLOWED_FORMATS",
    "IMAGE_LIMITS",
    "WEBUI_BACKGROUND",
    "ImageLimits",
    "decode_image",
    "decode_image_list",
    "decode_mask",
    "open_image",
]


@dataclass(frozen=True)
class ImageLimits:
    """What one request image may be. Pixels are checked from the header, before decoding."""

    max_bytes: int = 20 * 1024 * 1024  # decoded (not base64) bytes per image
    max_pixels: int = 4096 * 4096  # width * height per image
    max_side: int = 8192  # width or height


IMAGE_LIMITS = ImageLimits()

# webui flattens transparent init images onto opts.img2img_background_color (default "#ffffff"),
# and ControlNet's HWC3 blends RGBA onto white too; RGB output here does the same.
WEBUI_BACKGROUND: tuple[int, int, int] = (255, 255, 255)

ALLOWED_FORMATS = "PNG, JPEG or WebP"
_HOW_TO_SEND = (
    f"allowed: a {ALLOWED_FORMATS} image as base64, raw or as a data URL "
    "('data:image/png;base64,...')"
)
_HOW_TO_SEND_LIST = f"allowed: a list of {ALLOWED_FORMATS} images, each as base64 or a data URL"
_PREVIEW_CHARS = 24


# --- 3. formats, by the bytes' magic --------------------------------------------------------


@dataclass(frozen=True)
class _Signature:
    name: str  # what the user is told
    matches: Callable[[bytes], bool]
    pil_format: str | None  # the only PIL plugin allowed to open it; None: refused


def _is_xml(data: bytes) -> bool:
    head = data[:256].removeprefix(b"\xef\xbb\xbf").lstrip()
    return head.startswith(b"<")


# Order matters only for the weak two-byte BMP magic, which comes after the allowed formats.
_SIGNATURES: tuple[_Signature, ...] = (
    _Signature("PNG", lambda d: d.startswith(b"\x89PNG\r\n\x1a\n"), "PNG"),
    _Signature("JPEG", lambda d: d.startswith(b"\xff\xd8\xff"), "JPEG"),
    _Signature("WebP", lambda d: d[:4] == b"RIFF" and d[8:12] == b"WEBP", "WEBP"),
    _Signature("GIF", lambda d: d[:6] in (b"GIF87a", b"GIF89a"), None),
    _Signature("TIFF", lambda d: d[:4] in (b"II*\x00", b"MM\x00*"), None),
    _Signature("PDF", lambda d: d.startswith(b"%PDF"), None),
    _Signature("AVIF/HEIC", lambda d: d[4:8] == b"ftyp", None),
    _Signature("SVG/XML", _is_xml, None),
    _Signature("BMP", lambda d: d.startswith(b"BM"), None),
)
_UNKNOWN = _Signature("unknown", lambda d: True, None)


def _sniff(data: bytes) -> _Signature:
    return next((s for s in _SIGNATURES if s.matches(data)), _UNKNOWN)


# What PIL raises on corrupt, truncated or hostile data (it has no common base class).
DECODE_ERRORS: tuple[type[BaseException], ...] = (
    OSError,  # includes UnidentifiedImageError and "image file is truncated"
    SyntaxError,  # PIL's "broken PNG file", "not a JPEG file"
    ValueError,
    EOFError,
    IndexError,
    KeyError,
    TypeError,
    struct.error,
    zlib.error,
    Image.DecompressionBombError,
)


# --- errors ---------------------------------------------------------------------------------


class _Preview(str):
    """A long base64 value shown by its start and length (still a plain str for JSON)."""

    __slots__ = ()

    def __repr__(self) -> str:
        return str(self)


def _shown(value: Any) -> Any:
    if isinstance(value, str) and len(value) > 2 * _PREVIEW_CHARS:
        return _Preview(f"{value[:_PREVIEW_CHARS]!r}... ({len(value)} characters)")
    return value


def _fail(field: str, value: Any, what: str, allowed: str = _HOW_TO_SEND) -> RequestError:
    return RequestError([Problem(field, _shown(value), f"{what}; {allowed}")])


# --- 1. the string ----------------------------------------------------------------------------

_URL = re.compile(r"^([A-Za-z][A-Za-z0-9+.\-]*)://")
_DATA_URL = re.compile(r"^data:([^,]*),", re.IGNORECASE)


def _base64_text(value: Any, field: str) -> str:
    """The base64 part of a request value: raw base64 or a data URL.

    URLs are refused on purpose. webui fetches http(s) images when `api_enable_requests` is on
    (its default), but a serverless worker that fetches whatever a request names is a
    server-side request forgery and a latency/timeout risk, and Replicate already moves files;
    clients send the bytes as base64 instead.
    """
    if value is None:
        raise _fail(field, value, "no image given")
    if not isinstance(value, str):
        raise _fail(field, value, f"expected a base64 string, got {type(value).__name__}")
    text = value.strip()
    if not text:
        raise _fail(field, value, "empty string")
    url = _URL.match(text)
    if url:
        scheme = url.group(1).lower()
        if scheme in ("http", "https"):
            what = "this server does not fetch image URLs (as webui with api_enable_requests off)"
        else:
            what = f"this server does not open {scheme}:// URLs"
        raise _fail(field, value, what)
    data_url = _DATA_URL.match(text)
    if data_url is None:
        return text
    params = [p.strip().lower() for p in data_url.group(1).split(";")]
    if "base64" not in params:
        raise _fail(field, value, "the data URL is not base64-encoded (';base64,' missing)")
    # The declared media type is not trusted: the bytes' magic decides the format.
    return text[data_url.end() :]


# --- 2. strict base64 -------------------------------------------------------------------------

_WHITESPACE = str.maketrans("", "", " \t\r\n\f\v")
_NOT_BASE64 = re.compile(r"[^A-Za-z0-9+/=\s]")


def _decode_base64(text: str, value: Any, field: str, limits: ImageLimits) -> bytes:
    # Bound the work before touching a huge string: no legal value is this long, even with
    # every other character a line break.
    if len(text) > 2 * (limits.max_bytes // 3 + 1) * 4 + 1024:
        raise _fail(field, value, _too_many_bytes(len(text) * 3 // 4, limits, "about "))
    bad = _NOT_BASE64.search(text)
    if bad:
        hint = " (URL-safe base64 is not accepted)" if bad.group() in "-_" else ""
        raise _fail(
            field,
            value,
            f"invalid base64: character {bad.group()!r} at position {bad.start()}{hint}",
        )
    # Browsers and `base64` CLIs wrap lines; webui's lenient b64decode skipped them too.
    body = text.translate(_WHITESPACE).rstrip("=")
    if "=" in body:
        raise _fail(field, value, "invalid base64: '=' padding inside the data")
    if len(body) % 4 == 1:
        raise _fail(field, value, "invalid base64: the length is impossible (truncated?)")
    if len(body) * 3 // 4 > limits.max_bytes:
        raise _fail(field, value, _too_many_bytes(len(body) * 3 // 4, limits))
    try:
        # Padding is added, not required: some clients strip it.
        return base64.b64decode(body + "=" * (-len(body) % 4), validate=True)
    except binascii.Error as err:  # unreachable after the checks above, kept as a guard
        raise _fail(field, value, f"invalid base64: {err}") from None


def _too_many_bytes(size: int, limits: ImageLimits, about: str = "") -> str:
    return f"the image is {about}{size:,} bytes; at most {limits.max_bytes:,} bytes are allowed"


# --- 3-5. open, check the header, decode ------------------------------------------------------


def _open(value: Any, field: str, limits: ImageLimits) -> Image.Image:
    """Decoded, loaded first frame with EXIF orientation applied; mode as in the file."""
    data = _decode_base64(_base64_text(value, field), value, field, limits)
    if not data:
        raise _fail(field, value, "the base64 decodes to no bytes")
    signature = _sniff(data)
    pil_format = signature.pil_format
    if pil_format is None:
        raise _fail(field, value, f"this is a {signature.name} file, not an allowed format")
    try:
        size = _header_size(data, pil_format)
    except DECODE_ERRORS:
        raise _fail(field, value, _unreadable(signature)) from None
    if size[0] * size[1] > limits.max_pixels or max(size) > limits.max_side:
        raise _fail(field, value, _too_many_pixels(size, limits))
    try:
        # `formats` keeps every other PIL plugin out of reach; PIL's own bomb check runs here.
        image = Image.open(io.BytesIO(data), formats=[pil_format])
    except Image.DecompressionBombError:
        raise _fail(field, value, _too_many_pixels(size, limits)) from None
    except DECODE_ERRORS:
        raise _fail(field, value, _unreadable(signature)) from None
    try:
        # Animated PNG/WebP: webui's PIL hands the first frame to the pipeline.
        image.seek(0)
        image.load()
    except DECODE_ERRORS:
        raise _fail(field, value, _unreadable(signature)) from None
    try:
        # Phone photos are stored sideways with an orientation tag; webui's fix_image applies
        # it. A broken EXIF block is ignored there too.
        return ImageOps.exif_transpose(image)
    except DECODE_ERRORS:
        return image


def _header_size(data: bytes, pil_format: str) -> tuple[int, int]:
    """Width and height from the header alone, through the one plugin the magic allows.

    Image.open reads the same header, but raises PIL's bomb error without telling the size.
    """
    Image.init()
    factory, _accept = Image.OPEN[pil_format]
    probe = factory(io.BytesIO(data), "")  # parses the header, decodes no pixels
    width, height = probe.size
    return width, height


def _too_many_pixels(size: tuple[int, int], limits: ImageLimits) -> str:
    return (
        f"the image is {size[0]}x{size[1]} pixels; at most {limits.max_pixels:,} pixels "
        f"and {limits.max_side} pixels a side are allowed"
    )


def _unreadable(signature: _Signature) -> str:
    return f"the {signature.name} data is corrupt or truncated"


# --- 6. normalise -----------------------------------------------------------------------------

_ALPHA_MODES = frozenset({"RGBA", "RGBa", "LA", "La", "PA"})
# PNG's 16-bit grey opens as one of these; F cannot come from PNG/JPEG/WebP but is scaled alike.
_WIDE_MODES = frozenset({"I", "I;16", "I;16L", "I;16B", "I;16N", "F"})


def _has_alpha(image: Image.Image) -> bool:
    # An alpha channel, or a PNG tRNS chunk (palette or single-colour transparency).
    return image.mode in _ALPHA_MODES or "transparency" in image.info


def _wide_to_l(image: Image.Image) -> Image.Image:
    """16-bit grey to 8-bit, scaled (65535 -> 255); PIL's own convert("L") clips at 255."""
    values = np.clip(np.asarray(image, dtype=np.float64), 0, 65535)
    return Image.fromarray(np.rint(values / 257).astype(np.uint8), mode="L")


def _flatten(image: Image.Image, background: tuple[int, int, int]) -> Image.Image:
    """webui's images.flatten: transparent areas become the background colour."""
    rgba = image.convert("RGBA")
    out = Image.new("RGB", rgba.size, background)
    out.paste(rgba, mask=rgba.getchannel("A"))
    return out


def _normalise(
    image: Image.Image, return_alpha: bool, background: tuple[int, int, int]
) -> Image.Image:
    if image.mode in _WIDE_MODES:
        # The tRNS grey level of a 16-bit PNG (if any) is dropped with the extra bits.
        return _wide_to_l(image).convert("RGB")
    if _has_alpha(image):
        return image.convert("RGBA") if return_alpha else _flatten(image, background)
    # P, L, 1, CMYK (Adobe-inverted JPEGs are already un-inverted by PIL), RGB.
    return image.convert("RGB")


# --- public -----------------------------------------------------------------------------------


def decode_image(
    value: Any,
    *,
    field: str,
    limits: ImageLimits = IMAGE_LIMITS,
    return_alpha: bool = False,
    background: tuple[int, int, int] = WEBUI_BACKGROUND,
) -> Image.Image:
    """Decode one request image (base64, raw or a `data:` URL) into a loaded PIL image.

    Accepted: PNG, JPEG and WebP, decided by the bytes, not by a declared type. http(s) URLs
    are refused (unlike webui with `api_enable_requests`): this server never fetches what a
    request names; send the bytes as base64. Width and height are checked against `limits`
    from the header, before any pixel is decoded.

    The result is mode "RGB": EXIF orientation applied, first frame of an animation, palette,
    grey, CMYK and 16-bit grey converted (16-bit scaled, 65535 -> 255), transparency
    flattened onto `background` (white, as webui's img2img does). With `return_alpha=True` an
    image that carries transparency is returned as "RGBA" instead.

    Raises RequestError naming `field`, what was wrong and what is allowed.
    """
    image = _open(value, field, limits)
    return _normalise(image, return_alpha, background)


def open_image(value: Any, *, field: str, limits: ImageLimits = IMAGE_LIMITS) -> Image.Image:
    """Decode one request image as the file holds it: its mode, text chunks and EXIF kept
    (`image.info`), for reading its metadata (png-info). Same checks and errors as
    `decode_image`."""
    return _open(value, field, limits)


def decode_mask(value: Any, *, field: str, limits: ImageLimits = IMAGE_LIMITS) -> Image.Image:
    """Decode an inpainting mask into mode "L" (white = repaint), like webui's
    `create_binary_mask`: a mask with transparency uses its alpha channel, any other is
    converted to grey.

    webui decides on "RGBA" only (after turning tRNS PNGs into RGBA); any transparency counts
    here, so an LA or single-transparent-colour PNG mask uses its alpha too rather than grey
    values the sender likely left arbitrary. The 0/1 rounding of the alpha branch
    (`mask_round`) is the caller's, as in webui it depends on a request field.
    """
    image = decode_image(value, field=field, limits=limits, return_alpha=True)
    if image.mode == "RGBA":
        alpha = image.getchannel("A")
        if alpha.getextrema() != (255, 255):
            return alpha
    return image.convert("L")


def decode_image_list(
    values: Any,
    *,
    field: str,
    limits: ImageLimits = IMAGE_LIMITS,
    return_alpha: bool = False,
    background: tuple[int, int, int] = WEBUI_BACKGROUND,
) -> list[Image.Image]:
    """Decode a list of request images (e.g. `init_images`); each is named `field[i]`.

    Every bad image is reported at once in one RequestError. An empty list is an error:
    every webui field that takes a list of images needs at least one.
    """
    if not isinstance(values, list | tuple):
        raise _fail(field, values, "expected a list of images", _HOW_TO_SEND_LIST)
    if not values:
        raise _fail(field, values, "the list is empty", _HOW_TO_SEND_LIST)
    images: list[Image.Image] = []
    problems: list[Problem] = []
    for index, value in enumerate(values):
        try:
            images.append(
                decode_image(
                    value,
                    field=f"{field}[{index}]",
                    limits=limits,
                    return_alpha=return_alpha,
                    background=background,
                )
            )
        except RequestError as err:
            problems.extend(err.problems)
    if problems:
        raise RequestError(problems)
    return images
