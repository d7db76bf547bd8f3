"""Small helpers shared by the end-to-end tests (names of the tiny models, payloads, PNG text)."""

from __future__ import annotations

import io
import json
from typing import Any

import numpy as np
from PIL import Image

SD1 = "tiny-sd15.safetensors"
SDXL = "tiny-sdxl.safetensors"
SD2 = "tiny-sd21-v.safetensors"
INPAINT = "tiny-sd15_inpainting.safetensors"

# Small and quick on two CPU cores, but a real run of every stage.
BASE: dict[str, Any] = {
    "prompt": "a lighthouse on a cliff",
    "negative_prompt": "blurry",
    "width": 64,
    "height": 64,
    "steps": 4,
    "seed": 1234,
    "sampler_name": "Euler",
}


def payload(**changes: Any) -> str:
    """BASE with changes, as the JSON text a client sends."""
    body = dict(BASE)
    for key, value in changes.items():
        if value is None:
            body.pop(key, None)
        else:
            body[key] = value
    return json.dumps(body)


def with_model(name: str, **changes: Any) -> str:
    return payload(override_settings={"sd_model_checkpoint": name}, **changes)


def png_parameters(data: bytes) -> str | None:
    """The infotext in a PNG's `parameters` text chunk."""
    image = Image.open(io.BytesIO(data))
    text: str | None = image.info.get("parameters")
    return text


def pixels(data: bytes) -> Image.Image:
    return Image.open(io.BytesIO(data)).convert("RGB")


def b64_png(image: Image.Image) -> str:
    """An image as the raw base64 PNG webui clients send."""
    import base64

    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def card_image(width: int = 96, height: int = 64) -> Image.Image:
    """A picture whose content is easy to locate: blue, a red square, a green bar at the top."""
    from PIL import ImageDraw

    image = Image.new("RGB", (width, height), (20, 40, 200))
    draw = ImageDraw.Draw(image)
    draw.rectangle([width // 4, height // 4, width // 2, height // 2], fill=(220, 20, 20))
    draw.rectangle([0, 0, width - 1, height // 8], fill=(20, 200, 40))
    return image


def box_mask(width: int, height: int, box: tuple[int, int, int, int]) -> Image.Image:
    """White (repaint) inside box, black elsewhere."""
    from PIL import ImageDraw

    mask = Image.new("L", (width, height), 0)
    ImageDraw.Draw(mask).rectangle(box, fill=255)
    return mask


# A "this changes the image" assertion compares decoded pixels: two PNGs always differ in bytes
# once their infotexts differ. A change counts when the mean absolute difference over every
# channel of every image is at least this many 8-bit levels (a feature that does nothing gives
# exactly 0; the tiny random-weight models move pictures by whole levels).
MIN_CHANGE_LEVELS = 0.25


def mean_pixel_change(a: list[bytes], b: list[bytes]) -> float:
    """Mean absolute difference in 8-bit levels between two equally long lists of images."""
    assert len(a) == len(b) and a, (len(a), len(b))
    diffs = [
        np.abs(
            np.asarray(pixels(x), dtype=np.float64) - np.asarray(pixels(y), dtype=np.float64)
        ).mean()
        for x, y in zip(a, b, strict=True)
    ]
    return float(np.mean(diffs))


def assert_pixels_changed(a: list[bytes], b: list[bytes]) -> None:
    change = mean_pixel_change(a, b)
    assert change >= MIN_CHANGE_LEVELS, f"pixels changed by {change:.3f} levels on average"


def noise(width: int, height: int, seed: int = 0) -> Image.Image:
    """A random RGB picture (upscaler tests: every pixel differs from its neighbours)."""
    rng = np.random.default_rng(seed)
    return Image.fromarray((rng.random((height, width, 3)) * 255).astype(np.uint8))


def levels(image: Image.Image) -> np.ndarray:
    """An image's 8-bit RGB levels as signed integers (differences do not wrap)."""
    return np.asarray(image.convert("RGB"), dtype=np.int16)


# A ControlNet unit as clients send it (canny over a card, the tiny SD1 ControlNet).
CONTROLNET_UNIT = {
    "input_image": b64_png(card_image(64, 64)),
    "module": "canny",
    "model": "tiny-controlnet-sd15",
    "processor_res": 64,
}
