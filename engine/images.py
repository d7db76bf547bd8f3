"""Encoding generated images the way webui returns them."""

from __future__ import annotations

import io
from dataclasses import dataclass

from PIL import Image, PngImagePlugin

# EXIF tags webui writes the infotext into for JPEG/WebP (piexif UserComment, "unicode").
_EXIF_IFD = 0x8769
_USER_COMMENT = 0x9286


@dataclass(frozen=True)
class EncodedImage:
    data: bytes
    extension: str  # "png", "jpg", "webp"
    mime: str


@dataclass(frozen=True)
class ImageFormat:
    extension: str
    pil_format: str
    mime: str


FORMATS: dict[str, ImageFormat] = {
    "png": ImageFormat("png", "PNG", "image/png"),
    "jpg": ImageFormat("jpg", "JPEG", "image/jpeg"),
    "jpeg": ImageFormat("jpg", "JPEG", "image/jpeg"),
    "webp": ImageFormat("webp", "WEBP", "image/webp"),
}


def _user_comment(text: str) -> bytes:
    # piexif.helper.UserComment.dump(text, encoding="unicode"): 8-byte charset prefix + UTF-16.
    return b"UNICODE\x00" + text.encode("utf-16-be")


def encode_image(
    image: Image.Image, fmt: str, infotext: str | None, *, jpeg_quality: int = 80
) -> EncodedImage:
    """Encode like webui's encode_pil_to_base64: PNG carries the infotext in a `parameters`
    text chunk; JPEG/WebP carry it in EXIF UserComment. `infotext=None` writes none
    (opts.enable_pnginfo false)."""
    spec = FORMATS[fmt]
    buffer = io.BytesIO()
    if spec.pil_format == "PNG":
        meta = PngImagePlugin.PngInfo()
        if infotext is not None:
            meta.add_text("parameters", infotext)
        image.save(buffer, format="PNG", pnginfo=meta)
    else:
        exif = Image.Exif()
        if infotext is not None:
            exif.get_ifd(_EXIF_IFD)[_USER_COMMENT] = _user_comment(infotext)
        image.convert("RGB").save(
            buffer, format=spec.pil_format, quality=jpeg_quality, exif=exif.tobytes()
        )
    return EncodedImage(buffer.getvalue(), spec.extension, spec.mime)
