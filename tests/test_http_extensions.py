"""Extensions through the real Cog HTTP server (started by tests/test_http.py's fixture)."""

from __future__ import annotations

import json
from typing import Any

import pytest

from .helpers import b64_png, card_image, payload, pixels
from .test_http import CogServer, image_bytes, server

__all__ = ["server"]  # the module-scoped fixture, shared with test_http.py's definition

pytestmark = pytest.mark.http

CARD = b64_png(card_image(64, 64))


def unit(**changes: Any) -> dict[str, Any]:
    base: dict[str, Any] = {"module": "canny", "model": "tiny-controlnet-sd15", "image": CARD}
    base.update(changes)
    return base


def golden(server: CogServer) -> bytes:
    prediction = server.predict(payload())
    assert prediction["status"] == "succeeded", prediction.get("error")
    return pixels(image_bytes(prediction)[0]).tobytes()


def refused(server: CogServer, body: str) -> str:
    prediction = server.predict(body)
    assert prediction["status"] == "failed", prediction.get("output")
    return str(prediction["error"])


def test_duplicate_extension_keys_are_refused_and_the_worker_stays_sound(
    server: CogServer,
) -> None:
    before = golden(server)
    keys = ["controlnet", "ControlNet", "CONTROLNET", " controlnet "]
    scripts = {key: {"args": [unit(), unit(), unit()]} for key in keys}
    error = refused(server, payload(alwayson_scripts=scripts))
    assert "alwayson_scripts" in error
    for key in keys:
        assert repr(key) in error
    assert golden(server) == before


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"processor_res": "nan"}, "processor_res"),
        ({"threshold_a": "inf"}, "threshold_a"),
        ({"weight": "nan"}, "weight"),
        ({"guidance_start": "nan"}, "guidance_start"),
    ],
)
def test_non_finite_controlnet_numbers_are_refused_naming_the_field(
    server: CogServer, changes: dict[str, Any], field: str
) -> None:
    before = golden(server)
    error = refused(server, payload(alwayson_scripts={"controlnet": {"args": [unit(**changes)]}}))
    assert f"alwayson_scripts.controlnet.args[0].{field}" in error
    assert "finite number" in error
    assert golden(server) == before


def test_blur_sigma_far_beyond_the_slider_is_bounded(server: CogServer) -> None:
    # Issue 16: sigma 10000 held a worker for 290 s; the extension resets it to the default.
    before = golden(server)
    body = payload(
        alwayson_scripts={"controlnet": {"args": [unit(module="blur_gaussian", threshold_a=10000)]}}
    )
    prediction = server.predict(body)
    assert prediction["status"] == "succeeded", prediction.get("error")
    info = json.loads(prediction["output"]["info"])
    assert "Threshold A: 9.0" in info["infotexts"][0]
    assert any("args[0].threshold_a" in w for w in info["warnings"])
    assert golden(server) == before


def test_webui_builtin_scripts_are_accepted_and_change_no_pixel(server: CogServer) -> None:
    # As webui's payload display lists them; webui's API ignores the UI-only scripts' args.
    before = golden(server)
    scripts = {
        "Seed": {"args": [1234, False, -1, 0, 0, 0]},
        "Sampler": {"args": [20, "DPM++ 2M", "Automatic"]},
        "Refiner": {"args": [False, "", 0.8]},
        "Comments": {"args": []},
        "Hypertile": {"args": []},
        "Extra options": {"args": []},
    }
    prediction = server.predict(payload(alwayson_scripts=scripts))
    assert prediction["status"] == "succeeded", prediction.get("error")
    assert pixels(image_bytes(prediction)[0]).tobytes() == before
    warnings = json.loads(prediction["output"]["info"])["warnings"]
    assert any("alwayson_scripts.Sampler.args ignored" in w for w in warnings)


def test_webuiapi_style_units_with_empty_image_and_padding(server: CogServer) -> None:
    # webuiapi's ControlNetUnit.to_dict() sends "image": "" when the unit has none; clients
    # pad the list with disabled units. In img2img the init image is the control image.
    before = golden(server)
    sent = unit(image="", processor_res=512, threshold_a=64, threshold_b=64, lowvram=False)
    padding = [unit(enabled=False, image="")] * 4
    body = payload(
        init_images=[CARD],
        denoising_strength=0.6,
        alwayson_scripts={"controlnet": {"args": [sent, *padding]}},
    )
    prediction = server.predict(body)
    assert prediction["status"] == "succeeded", prediction.get("error")
    info = json.loads(prediction["output"]["info"])
    assert "ControlNet 0" in info["infotexts"][0] and "ControlNet 1" not in info["infotexts"][0]
    assert golden(server) == before


def test_reference_only_unit_without_a_model_and_the_worker_stays_sound(
    server: CogServer,
) -> None:
    # Mikubill's API test "test_reference": module reference_only, model "None".
    before = golden(server)
    sent = unit(module="reference_adain+attn", model="None", save_detected_map=False)
    prediction = server.predict(payload(alwayson_scripts={"controlnet": {"args": [sent]}}))
    assert prediction["status"] == "succeeded", prediction.get("error")
    info = json.loads(prediction["output"]["info"])
    assert "Module: reference_adain+attn, Model: None," in info["infotexts"][0]
    assert pixels(image_bytes(prediction)[0]).tobytes() != before
    assert golden(server) == before  # attention processors and block hooks are gone again
