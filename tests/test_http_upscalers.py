"""Upscaler models and the extras endpoints through the real Cog HTTP server (the session's
shared server over the tiny models, whose upscalers/ holds the tiny upscaler files)."""

from __future__ import annotations

import io
import json

import pytest
from PIL import Image

from .helpers import b64_png, card_image, payload
from .test_http import CogServer, image_bytes, server

__all__ = ["server"]

pytestmark = pytest.mark.http


def test_extra_single_image_over_http_answers_the_image_and_html_info(server: CogServer) -> None:
    body = {"image": b64_png(card_image(24, 16)), "upscaler_1": "R-ESRGAN 4x+"}
    prediction = server.predict(json.dumps(body), endpoint="extra-single-image")
    assert prediction["status"] == "succeeded", prediction.get("error")
    (data,) = image_bytes(prediction)
    image = Image.open(io.BytesIO(data))
    assert image.size == (48, 32)
    info = prediction["output"]["info"]
    assert info == "<p>Postprocess upscale by: 2.0, Postprocess upscaler: R-ESRGAN 4x+</p>"
    assert prediction["output"]["seed"] is None and prediction["output"]["listing"] == ""


def test_extras_error_over_http_names_the_field_and_the_choices(server: CogServer) -> None:
    body = {"image": b64_png(card_image(16, 16)), "upscaler_1": "4x-UltraSharp"}
    prediction = server.predict(json.dumps(body), endpoint="extra-single-image")
    assert prediction["status"] == "failed"
    error = prediction["error"]
    assert "upscaler_1: got '4x-UltraSharp'" in error and "'R-ESRGAN 4x+'" in error
    assert "Traceback" not in error


def test_shared_hires_payload_naming_r_esrgan_runs(server: CogServer) -> None:
    body = payload(
        enable_hr=True,
        hr_scale=1.5,
        hr_upscaler="R-ESRGAN 4x+",
        denoising_strength=0.3,
        hr_second_pass_steps=1,
        override_settings={"ESRGAN_tile": 0},
    )
    prediction = server.predict(body)
    assert prediction["status"] == "succeeded", prediction.get("error")
    (data,) = image_bytes(prediction)
    assert Image.open(io.BytesIO(data)).size == (96, 96)
    assert (
        "Hires upscaler: R-ESRGAN 4x+" in json.loads(prediction["output"]["info"])["infotexts"][0]
    )


def test_shared_hires_payload_naming_swinir_4x_runs(server: CogServer) -> None:
    # webui's SwinIR upscaler name, with its own tile option (SWIN_tile) in override_settings.
    body = payload(
        enable_hr=True,
        hr_scale=2,
        hr_upscaler="SwinIR 4x",
        denoising_strength=0.3,
        hr_second_pass_steps=1,
        override_settings={"SWIN_tile": 32, "SWIN_tile_overlap": 8},
    )
    prediction = server.predict(body)
    assert prediction["status"] == "succeeded", prediction.get("error")
    (data,) = image_bytes(prediction)
    assert Image.open(io.BytesIO(data)).size == (128, 128)
    assert "Hires upscaler: SwinIR 4x" in json.loads(prediction["output"]["info"])["infotexts"][0]
