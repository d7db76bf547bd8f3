"""Request images: real bytes made here with PIL, decoded through engine.inputs."""

from __future__ import annotations

import base64
import contextlib
import io
import struct
import zlib
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
from PIL import Image, ImageFile

from engine.errors import RequestError
from engine.inputs import ImageLimits, decode_image, decode_image_list, decode_mask

FIELD = "init_images[0]"
RED, GREEN, BLUE, WHITE, BLACK = (255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 255), (0, 0, 0)


def encode(image: Image.Image, fmt: str, **options: Any) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def data_url(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{b64(data)}"


def pattern(size: tuple[int, int] = (16, 12)) -> Image.Image:
    """An RGB image whose every pixel differs, so any shuffle or loss shows."""
    width, height = size
    ys, xs = np.mgrid[0:height, 0:width]
    array = np.stack([xs * 15, ys * 20, (xs + ys) * 7], axis=-1).astype(np.uint8)
    return Image.fromarray(array, mode="RGB")


def blocks(left: tuple[int, int, int], right: tuple[int, int, int]) -> Image.Image:
    """20x10: left half one colour, right half another."""
    image = Image.new("RGB", (20, 10), left)
    image.paste(right, (10, 0, 20, 10))
    return image


def error_of(value: Any, **kwargs: Any) -> RequestError:
    with pytest.raises(RequestError) as caught:
        decode_image(value, field=FIELD, **kwargs)
    return caught.value


def max_diff(a: Image.Image, b: Image.Image) -> int:
    return int(np.abs(np.asarray(a, dtype=int) - np.asarray(b, dtype=int)).max())


# --- accepted formats and forms ---------------------------------------------------------------

ROUND_TRIPS = [
    # (PIL format, options, mime, largest pixel error)
    ("PNG", {}, "image/png", 0),
    ("WEBP", {"lossless": True}, "image/webp", 0),
    ("WEBP", {"quality": 95}, "image/webp", 40),
    ("JPEG", {"quality": 95}, "image/jpeg", 40),
]


@pytest.mark.parametrize(("fmt", "options", "mime", "tolerance"), ROUND_TRIPS)
@pytest.mark.parametrize("form", ["raw", "data_url"])
def test_round_trip(fmt: str, options: dict, mime: str, tolerance: int, form: str) -> None:
    original = pattern()
    data = encode(original, fmt, **options)
    value = b64(data) if form == "raw" else data_url(data, mime)
    image = decode_image(value, field=FIELD)
    assert image.mode == "RGB"
    assert image.size == original.size
    assert max_diff(image, original) <= tolerance


def test_declared_media_type_does_not_decide_the_format() -> None:
    # Clients label everything image/png; the bytes are what count.
    data = encode(pattern(), "JPEG", quality=95)
    image = decode_image(data_url(data, "image/png"), field=FIELD)
    assert image.size == (16, 12)


def test_wrapped_lines_and_missing_padding_are_accepted() -> None:
    data = encode(pattern(), "PNG")
    data += b"\0" * ((1 - len(data)) % 3)  # bytes after IEND are ignored; this forces "=="
    text = b64(data)
    assert text.endswith("=")
    wrapped = "\n".join(text[i : i + 76] for i in range(0, len(text), 76)).rstrip("=")
    image = decode_image(f"  data:image/png;base64,{wrapped}\r\n", field=FIELD)
    assert max_diff(image, pattern()) == 0


# --- modes ------------------------------------------------------------------------------------


def rgba_half_transparent() -> Image.Image:
    """Left half opaque red, right half fully transparent black."""
    image = Image.new("RGBA", (20, 10), (*RED, 255))
    image.paste((0, 0, 0, 0), (10, 0, 20, 10))
    return image


def test_rgba_is_flattened_onto_white_like_webui_img2img() -> None:
    image = decode_image(b64(encode(rgba_half_transparent(), "PNG")), field=FIELD)
    assert image.mode == "RGB"
    assert image.getpixel((2, 2)) == RED
    assert image.getpixel((15, 2)) == WHITE  # not the black hidden under alpha 0


def test_rgba_is_kept_when_alpha_is_asked_for() -> None:
    value = b64(encode(rgba_half_transparent(), "PNG"))
    image = decode_image(value, field=FIELD, return_alpha=True)
    assert image.mode == "RGBA"
    assert image.getpixel((2, 2)) == (*RED, 255)
    assert image.getchannel("A").getpixel((15, 2)) == 0


def test_opaque_image_stays_rgb_even_when_alpha_is_asked_for() -> None:
    image = decode_image(b64(encode(pattern(), "PNG")), field=FIELD, return_alpha=True)
    assert image.mode == "RGB"


def palette_image() -> Image.Image:
    return blocks(RED, BLUE).convert("P", palette=Image.Palette.ADAPTIVE, colors=4)


def la_image() -> Image.Image:
    image = Image.new("LA", (20, 10), (50, 255))
    image.paste((0, 0), (10, 0, 20, 10))
    return image


MODES = [
    # (source image, format, options, expected left pixel, expected right pixel)
    (palette_image(), "PNG", {}, RED, BLUE),
    (la_image(), "PNG", {}, (50, 50, 50), WHITE),  # transparent right half flattened
    (blocks(BLACK, WHITE).convert("1"), "PNG", {}, BLACK, WHITE),
    (blocks(RED, BLUE).convert("CMYK"), "JPEG", {"quality": 95}, RED, BLUE),
    (blocks(RED, BLUE).convert("L"), "JPEG", {"quality": 95}, (76, 76, 76), (29, 29, 29)),
]


@pytest.mark.parametrize(("source", "fmt", "options", "left", "right"), MODES)
def test_modes_become_rgb(
    source: Image.Image, fmt: str, options: dict, left: tuple, right: tuple
) -> None:
    data = encode(source, fmt, **options)
    assert Image.open(io.BytesIO(data)).mode == source.mode  # the file really has that mode
    image = decode_image(b64(data), field=FIELD)
    assert image.mode == "RGB"
    assert max_diff(image.crop((2, 2, 3, 3)), Image.new("RGB", (1, 1), left)) <= 8
    assert max_diff(image.crop((17, 2, 18, 3)), Image.new("RGB", (1, 1), right)) <= 8


def test_16_bit_grey_is_scaled_not_clipped() -> None:
    values = np.array([[0, 257, 32896, 65535]], dtype=np.uint16)
    data = encode(Image.fromarray(values), "PNG")
    assert Image.open(io.BytesIO(data)).mode.startswith("I")
    image = decode_image(b64(data), field=FIELD)
    assert image.mode == "RGB"
    assert np.asarray(image)[0, :, 0].tolist() == [0, 1, 128, 255]


def test_exif_orientation_is_applied() -> None:
    # Orientation 6: the stored pixels must be turned 90 degrees clockwise to be seen upright.
    exif = Image.Exif()
    exif[0x0112] = 6
    data = encode(blocks(RED, BLUE), "JPEG", quality=95, exif=exif.tobytes())
    image = decode_image(b64(data), field=FIELD)
    assert image.size == (10, 20)
    assert max_diff(image.crop((2, 2, 8, 8)), Image.new("RGB", (6, 6), RED)) <= 8
    assert max_diff(image.crop((2, 12, 8, 18)), Image.new("RGB", (6, 6), BLUE)) <= 8


@pytest.mark.parametrize(("fmt", "options"), [("PNG", {}), ("WEBP", {"lossless": True})])
def test_animation_gives_its_first_frame(fmt: str, options: dict) -> None:
    frames = [Image.new("RGB", (8, 8), colour) for colour in (GREEN, RED, BLUE)]
    data = encode(frames[0], fmt, save_all=True, append_images=frames[1:], duration=100, **options)
    assert getattr(Image.open(io.BytesIO(data)), "n_frames", 1) == 3
    image = decode_image(b64(data), field=FIELD)
    assert image.getpixel((4, 4)) == GREEN


# --- refused values ---------------------------------------------------------------------------

REFUSED_FORMATS = [
    ("GIF", encode(pattern(), "GIF")),
    ("BMP", encode(pattern(), "BMP")),
    ("TIFF", encode(pattern(), "TIFF")),
    ("SVG/XML", b'<svg xmlns="http://www.w3.org/2000/svg" width="8" height="8"/>'),
    ("SVG/XML", b'\xef\xbb\xbf  <?xml version="1.0"?><svg/>'),
    ("PDF", b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n"),
    ("unknown", b"hello, this is not an image"),
]


@pytest.mark.parametrize(("name", "data"), REFUSED_FORMATS)
def test_other_formats_are_refused_by_name(name: str, data: bytes) -> None:
    message = str(error_of(data_url(data)))
    assert FIELD in message
    assert f"this is a {name} file" in message
    assert "PNG, JPEG or WebP" in message


@pytest.mark.parametrize(
    "url",
    ["http://example.com/cat.png", "https://example.com/cat.png", "HTTPS://EXAMPLE.COM/a.jpg"],
)
def test_urls_are_not_fetched(url: str) -> None:
    message = str(error_of(url))
    assert FIELD in message
    assert "does not fetch" in message
    assert "base64" in message


def test_other_url_schemes_are_not_opened() -> None:
    message = str(error_of("file:///etc/passwd"))
    assert "does not open file:// URLs" in message


BAD_VALUES = [
    # (value, words the message must contain)
    ("", "empty string"),
    ("   \n", "empty string"),
    (None, "no image given"),
    (5, "expected a base64 string, got int"),
    ({"image": "abc"}, "expected a base64 string, got dict"),
    (["abc"], "expected a base64 string, got list"),
    ("iVBOR%w0KGgo", "invalid base64: character '%' at position 5"),
    ("iVBORw0KGgo-_AA", "URL-safe base64 is not accepted"),
    ("iVBO\nRw0K\nGgo=AAAA", "'=' padding inside the data"),
    ("data:image/png;base64,iVBO\nR\u00e9w0KGgo", "character 'é' at position 6"),
    ("iVBORw0KG", "invalid base64: the length is impossible"),
    ("data:image/svg+xml,<svg/>", "not base64-encoded"),
    ("====", "decodes to no bytes"),
]


@pytest.mark.parametrize(("value", "words"), BAD_VALUES)
def test_bad_values_name_the_field_and_the_fault(value: Any, words: str) -> None:
    error = error_of(value)
    assert [p.field for p in error.problems] == [FIELD]
    message = str(error)
    assert words in message
    assert "PNG, JPEG or WebP" in message


def test_a_long_bad_value_is_shown_short() -> None:
    huge = b64(encode(pattern((256, 256)), "GIF"))
    message = str(error_of(huge))
    assert huge[:24] in message
    assert f"({len(huge)} characters)" in message
    assert len(message) < 400


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP"])
@pytest.mark.parametrize("keep", [0.5, 0.02])
def test_truncated_images_give_a_clear_error(fmt: str, keep: float) -> None:
    data = encode(Image.effect_noise((64, 64), 60).convert("RGB"), fmt)
    message = str(error_of(b64(data[: max(16, int(len(data) * keep))])))
    assert FIELD in message
    assert "corrupt or truncated" in message
    # PIL's own text (object addresses, file names) never reaches the user.
    assert "BytesIO" not in message
    assert "0x" not in message


def png_with_header_size(width: int, height: int) -> bytes:
    """A tiny valid PNG whose IHDR is rewritten to claim another size (CRC fixed)."""
    data = bytearray(encode(Image.new("L", (1, 1)), "PNG"))
    ihdr = bytearray(data[12:29])  # chunk type + 13 bytes of data
    assert ihdr[:4] == b"IHDR"
    ihdr[4:12] = struct.pack(">II", width, height)
    data[12:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(ihdr)))
    return bytes(data)


@contextlib.contextmanager
def pixels_never_decoded() -> Iterator[None]:
    """Fails the test if PIL decodes pixel data inside the block (the header is all it may read)."""

    def refuse(self: Any) -> Any:
        raise AssertionError("pixel data was decoded")

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(ImageFile.ImageFile, "load", refuse)
        yield


@pytest.mark.parametrize(("width", "height"), [(50000, 50000), (5000, 5000), (9000, 16)])
def test_decompression_bomb_is_refused_from_the_header(width: int, height: int) -> None:
    value = b64(png_with_header_size(width, height))
    with pixels_never_decoded():
        error = error_of(value)
    message = str(error)
    # The size is reported, so the pixels were never reached (they would be "corrupt").
    assert f"{width}x{height} pixels" in message
    assert "16,777,216 pixels and 8192 pixels a side" in message
    assert "corrupt" not in message


def test_real_large_image_is_refused_before_decoding() -> None:
    # 4100x4100 black compresses to a few KB but would be 50 MB of RGB once decoded.
    value = b64(encode(Image.new("L", (4100, 4100)), "PNG"))
    assert len(value) < 100_000
    with pixels_never_decoded():
        message = str(error_of(value))
    assert "4100x4100 pixels" in message


def test_limits_can_be_tightened() -> None:
    value = b64(encode(pattern((16, 16)), "PNG"))
    assert "16x16 pixels; at most 100 pixels" in str(
        error_of(value, limits=ImageLimits(max_pixels=100))
    )
    assert "and 8 pixels a side" in str(error_of(value, limits=ImageLimits(max_side=8)))
    message = str(error_of(value, limits=ImageLimits(max_bytes=50)))
    assert "at most 50 bytes are allowed" in message


# --- masks ------------------------------------------------------------------------------------


def test_mask_with_transparency_uses_the_alpha_channel() -> None:
    # White everywhere in RGB: only the alpha says where to repaint.
    image = Image.new("RGBA", (20, 10), (255, 255, 255, 255))
    image.paste((255, 255, 255, 0), (10, 0, 20, 10))
    mask = decode_mask(b64(encode(image, "PNG")), field="mask")
    assert mask.mode == "L"
    assert mask.getpixel((2, 2)) == 255
    assert mask.getpixel((15, 2)) == 0


def test_opaque_rgba_mask_uses_luminance() -> None:
    image = blocks(WHITE, BLACK).convert("RGBA")
    mask = decode_mask(b64(encode(image, "PNG")), field="mask")
    assert mask.mode == "L"
    assert mask.getpixel((2, 2)) == 255
    assert mask.getpixel((15, 2)) == 0


@pytest.mark.parametrize(
    ("source", "left", "right"),
    [
        (Image.new("L", (20, 10), 200), 200, 200),
        (blocks(RED, BLUE), 76, 29),
    ],
)
def test_grey_and_colour_masks_become_l(source: Image.Image, left: int, right: int) -> None:
    mask = decode_mask(b64(encode(source, "PNG")), field="mask")
    assert mask.mode == "L"
    assert (mask.getpixel((2, 2)), mask.getpixel((15, 2))) == (left, right)


def test_mask_errors_name_the_mask_field() -> None:
    with pytest.raises(RequestError) as caught:
        decode_mask("not base64!", field="mask")
    assert [p.field for p in caught.value.problems] == ["mask"]


# --- lists ------------------------------------------------------------------------------------


def test_list_decodes_every_image_in_order() -> None:
    values = [b64(encode(Image.new("RGB", (8, 8), c), "PNG")) for c in (RED, GREEN)]
    images = decode_image_list(values, field="init_images")
    assert [im.getpixel((0, 0)) for im in images] == [RED, GREEN]


def test_list_reports_every_bad_image_at_once() -> None:
    good = b64(encode(pattern(), "PNG"))
    gif = b64(encode(pattern(), "GIF"))
    with pytest.raises(RequestError) as caught:
        decode_image_list([good, gif, good, "https://x/y.png"], field="init_images")
    problems = caught.value.problems
    assert [p.field for p in problems] == ["init_images[1]", "init_images[3]"]
    message = str(caught.value)
    assert "2 problems" in message
    assert "GIF" in message
    assert "does not fetch" in message


@pytest.mark.parametrize(
    ("values", "words"),
    [
        ([], "the list is empty"),
        ("iVBORw0KGgo", "expected a list of images"),
        (None, "expected a list of images"),
    ],
)
def test_list_itself_must_be_a_non_empty_list(values: Any, words: str) -> None:
    with pytest.raises(RequestError) as caught:
        decode_image_list(values, field="init_images")
    assert [p.field for p in caught.value.problems] == ["init_images"]
    assert words in str(caught.value)
