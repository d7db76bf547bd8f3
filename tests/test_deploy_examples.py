"""Every example payload in examples/ runs through the engine on the tiny models, and every
listing the examples' README shows is served."""

from __future__ import annotations

import base64
import io
import json
import re
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from engine.api import Engine
from engine.limits import Limits
from engine.payload import choose_mode, parse_request

from .helpers import png_parameters

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
NAMES = sorted(p.name for p in EXAMPLES.glob("*.json"))

LIMITS = Limits()


def test_every_feature_has_an_example() -> None:
    expected = {"txt2img", "img2img", "inpainting", "hires", "lora", "controlnet", "refiner"}
    assert expected <= {Path(n).stem for n in NAMES}
    listed = set(re.findall(r"`([\w-]+\.json)`", (EXAMPLES / "README.md").read_text()))
    assert listed == set(NAMES)


@pytest.mark.parametrize("name", NAMES)
def test_example_is_a_valid_webui_request(name: str) -> None:
    payload = json.loads((EXAMPLES / name).read_text())
    parsed = parse_request(payload, choose_mode("auto", payload), LIMITS)
    assert not parsed.warnings


def quick(payload: dict[str, Any]) -> dict[str, Any]:
    """The example with fewer steps and half the size (at least 64 px), so that all of them
    run on two CPU cores in about a minute; every field that selects a feature is kept."""
    fast = {**payload, "steps": 3}
    for side in ("width", "height"):
        fast[side] = max(64, payload[side] // 2)
    if "hr_second_pass_steps" in payload:
        fast["hr_second_pass_steps"] = 2
    return fast


@pytest.mark.parametrize("name", NAMES)
def test_example_runs_on_the_tiny_models(engine: Engine, name: str) -> None:
    payload = quick(json.loads((EXAMPLES / name).read_text()))
    response = engine.handle("auto", json.dumps(payload))
    info = json.loads(response.info)
    assert info["seed"] == payload["seed"] and info["prompt"] == payload["prompt"]
    first = Image.open(io.BytesIO(response.images[0].data))
    scale = payload.get("hr_scale", 1) if payload.get("enable_hr") else 1
    assert first.size == (payload["width"] * scale, payload["height"] * scale)
    infotext = png_parameters(response.images[0].data) or ""
    checks = {
        "img2img.json": "Denoising strength: 0.6",
        "inpainting.json": "Model: tiny-sd15_inpainting",
        "hires.json": "Hires upscale: 2",
        "lora.json": 'Lora hashes: "tiny-lora-sd15:',
        "controlnet.json": 'ControlNet 0: "Module: canny',
        "refiner.json": "Refiner: tiny-sdxl_refiner",
    }
    assert checks.get(name, "Steps: 3") in infotext, infotext


LISTINGS = re.findall(r"endpoint=([\w/-]+)", (EXAMPLES / "README.md").read_text())


def _png_with_infotext() -> str:
    from PIL import PngImagePlugin

    meta = PngImagePlugin.PngInfo()
    meta.add_text("parameters", "a cat\nSteps: 20, Sampler: Euler, Seed: 1234, Size: 64x64")
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buffer, format="PNG", pnginfo=meta)
    return json.dumps({"image": base64.b64encode(buffer.getvalue()).decode()})


def _extras_body() -> str:
    body = json.loads(_png_with_infotext())
    return json.dumps({**body, "upscaler_1": "R-ESRGAN 4x+", "upscaling_resize": 2})


# Endpoints that read `api_json`: a body like the README's.
BODIES = {"png-info": _png_with_infotext, "extra-single-image": _extras_body}


@pytest.mark.parametrize("endpoint", LISTINGS)
def test_listing_in_the_readme_is_served(engine: Engine, endpoint: str) -> None:
    body = BODIES[endpoint]() if endpoint in BODIES else "{}"
    response = engine.handle(endpoint, body)
    if endpoint.startswith("extra-"):
        (image,) = response.images
        assert Image.open(io.BytesIO(image.data)).size == (16, 16)
        assert "R-ESRGAN 4x+" in response.info
    else:
        assert response.listing is not None
