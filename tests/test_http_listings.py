"""Listings, png-info and the webuiapi client through the real Cog HTTP server.

The webuiapi client (PyPI webuiapi 0.9.17, what many Python users drive webui with) talks to
`requests.Session`; here its session is a transport that records each request body the client
built and sends it, unchanged, to the Cog server as `api_json` (the endpoint from the URL),
then hands the client webui's response shape built from the prediction's output.
"""

from __future__ import annotations

import base64
import json
from typing import Any
from urllib.parse import urlparse

import pytest
from PIL import Image

from .helpers import SD1, card_image, payload
from .test_http import CogServer, image_bytes, server
from .test_listings import (
    CLIENT_LISTINGS,
    EMBEDDING_ITEM,
    EMBEDDINGS_RESPONSE,
    LIST_SHAPES,
    MEMORY_RESPONSE,
    PNG_INFO_RESPONSE,
    assert_shape,
)

__all__ = ["server"]  # the module-scoped fixture, shared with test_http.py's definition

pytestmark = pytest.mark.http

webuiapi = pytest.importorskip("webuiapi", minversion="0.9.17")


def listed(server: CogServer, endpoint: str, api_json: str = "{}") -> Any:
    prediction = server.predict(api_json, endpoint=endpoint)
    assert prediction["status"] == "succeeded", prediction.get("error")
    return json.loads(prediction["output"]["listing"])


# ------------------------------------------------------------------- one test per listing


@pytest.mark.parametrize("endpoint", [e for e in CLIENT_LISTINGS if e != "png-info"])
def test_listing_over_http_has_webuis_shape(server: CogServer, endpoint: str) -> None:
    data = listed(server, endpoint)
    if endpoint in LIST_SHAPES:
        assert isinstance(data, list)
        for index, item in enumerate(data):
            assert_shape(item, LIST_SHAPES[endpoint], f"{endpoint}[{index}]")
    elif endpoint == "embeddings":
        assert_shape(data, EMBEDDINGS_RESPONSE, endpoint)
        for item in [*data["loaded"].values(), *data["skipped"].values()]:
            assert_shape(item, EMBEDDING_ITEM, endpoint)
        assert "tiny-embedding" in data["loaded"]
    elif endpoint == "memory":
        assert_shape(data, MEMORY_RESPONSE, endpoint)
        assert data["ram"]["used"] > 0
    elif endpoint == "options":
        assert data["sd_model_checkpoint"].startswith(SD1 + " [")
        assert data["CLIP_stop_at_last_layers"] == 1
    else:
        assert endpoint == "cmd-flags"
        assert data["api"] is True and data["ckpt_dir"].endswith("checkpoints")


def test_png_info_over_http_round_trip(server: CogServer) -> None:
    body = payload(seed=2024, cfg_scale=5.5, prompt="a (red:1.1) boat")
    generated = server.predict(body)
    assert generated["status"] == "succeeded", generated.get("error")
    png = base64.b64encode(image_bytes(generated)[0]).decode()
    info = listed(server, "png-info", json.dumps({"image": png}))
    assert_shape(info, PNG_INFO_RESPONSE, "png-info")
    request = json.loads(body)
    params = info["parameters"]
    assert params["Prompt"] == request["prompt"]
    assert params["Negative prompt"] == request["negative_prompt"]
    assert params["Seed"] == "2024" and params["Steps"] == str(request["steps"])
    assert float(params["CFG scale"]) == 5.5 and params["Sampler"] == request["sampler_name"]
    assert (params["Size-1"], params["Size-2"]) == (str(request["width"]), str(request["height"]))


def test_png_info_over_http_refuses_a_missing_image_naming_the_field(server: CogServer) -> None:
    prediction = server.predict('{"img": "x"}', endpoint="png-info")
    assert prediction["status"] == "failed"
    assert "image" in prediction["error"] and "required" in prediction["error"]


# ------------------------------------------------------------------------------ webuiapi


class Reply:
    """The part of `requests.Response` webuiapi reads."""

    def __init__(self, status_code: int, body: Any):
        self.status_code = status_code
        self._body = body
        self.text = json.dumps(body)

    def json(self) -> Any:
        return self._body


class CogTransport:
    """Stands in for webuiapi's `requests.Session`: records each call, replays it through
    the Cog server, answers in webui's response shapes."""

    def __init__(self, server: CogServer):
        self.server = server
        self.auth: Any = None
        self.calls: list[tuple[str, str, Any]] = []

    def _endpoint(self, url: str) -> str:
        path = urlparse(url).path
        assert path.startswith("/sdapi/v1/"), url
        return path.removeprefix("/sdapi/v1/")

    def get(self, url: str, **_: Any) -> Reply:
        return self._send("GET", url, None)

    def post(self, url: str, json: Any = None, **_: Any) -> Reply:
        return self._send("POST", url, json)

    def _send(self, method: str, url: str, body: Any) -> Reply:
        endpoint = self._endpoint(url)
        self.calls.append((method, endpoint, body))
        # requests serialises `json=` with json.dumps(allow_nan=False): the same text.
        api_json = "{}" if body is None else json.dumps(body, allow_nan=False)
        prediction = self.server.predict(api_json, endpoint=endpoint)
        if prediction["status"] != "succeeded":
            return Reply(500, {"error": "failed", "detail": prediction.get("error")})
        output = prediction["output"]
        if output["listing"]:
            return Reply(200, json.loads(output["listing"]))
        images = [base64.b64encode(data).decode() for data in image_bytes(prediction)]
        # webui's extras answers: ExtrasSingleImageResponse / ExtrasBatchImagesResponse.
        if endpoint == "extra-single-image":
            return Reply(200, {"image": images[0], "html_info": output["info"]})
        if endpoint == "extra-batch-images":
            return Reply(200, {"images": images, "html_info": output["info"]})
        parameters = json.loads(output["parameters"]) if output["parameters"] else {}
        return Reply(200, {"images": images, "parameters": parameters, "info": output["info"]})


@pytest.fixture
def client(server: CogServer, monkeypatch: pytest.MonkeyPatch) -> Any:
    transport = CogTransport(server)
    monkeypatch.setattr(webuiapi.webuiapi.requests, "Session", lambda: transport)
    api = webuiapi.WebUIApi(baseurl="http://webui.invalid/sdapi/v1", sampler="Euler", steps=4)
    assert api.session is transport
    transport.calls.clear()  # the client's start-up probe of /scripts (not served here)
    return api


def last_body(api: Any, endpoint: str) -> dict[str, Any]:
    method, name, body = api.session.calls[-1]
    assert (method, name) == ("POST", endpoint)
    assert isinstance(body, dict)
    return body


def test_webuiapi_txt2img_body_runs_unchanged(client: Any) -> None:
    result = client.txt2img(
        prompt="a lighthouse",
        negative_prompt="blurry",
        seed=1234,
        width=64,
        height=64,
        alwayson_scripts={},
    )
    body = last_body(client, "txt2img")
    # What webuiapi sends that a hand-written payload would not: its own defaults.
    assert body["scheduler"] == "automatic" and body["sampler_index"] == "Euler"
    assert body["override_settings_restore_afterwards"] is True and body["styles"] == []
    assert len(result.images) == 1 and result.images[0].size == (64, 64)
    assert result.info["seed"] == 1234 and result.info["all_seeds"] == [1234]
    # Nothing in webuiapi's default body is unknown or ignored here.
    assert result.info["warnings"] == []


def test_webuiapi_hires_txt2img_body_runs_unchanged(client: Any) -> None:
    result = client.txt2img(
        prompt="a lighthouse",
        seed=5,
        width=64,
        height=64,
        enable_hr=True,
        hr_scale=1.5,
        hr_upscaler=webuiapi.HiResUpscaler.Latent,
        hr_second_pass_steps=2,
        denoising_strength=0.5,
        alwayson_scripts={},
    )
    assert last_body(client, "txt2img")["hr_upscaler"] == "Latent"
    assert result.images[0].size == (96, 96)


def test_webuiapi_img2img_and_inpainting_bodies_run_unchanged(client: Any) -> None:
    init = card_image(64, 64)
    result = client.img2img(
        images=[init],
        prompt="a card",
        seed=7,
        width=64,
        height=64,
        denoising_strength=0.5,
        alwayson_scripts={},
    )
    body = last_body(client, "img2img")
    assert body["init_images"][0].startswith("data:image/png;base64,")
    assert result.images[0].size == (64, 64)
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (16, 16, 48, 48))
    inpainted = client.img2img(
        images=[init],
        mask_image=mask,
        prompt="a card",
        seed=7,
        width=64,
        height=64,
        inpainting_fill=1,
        alwayson_scripts={},
    )
    assert "mask" in last_body(client, "img2img")
    assert inpainted.images[0].size == (64, 64)


def test_webuiapi_controlnet_units_run_unchanged(client: Any) -> None:
    units = [
        webuiapi.ControlNetUnit(
            image=card_image(64, 64),
            module="canny",
            model="tiny-controlnet-sd15",
            threshold_a=100,
            threshold_b=200,
        ),
        # A unit without image: webuiapi sends "image": "".
        webuiapi.ControlNetUnit(module="none", model="None", enabled=False),
    ]
    result = client.txt2img(
        prompt="a lighthouse",
        seed=1234,
        width=64,
        height=64,
        controlnet_units=units,
        alwayson_scripts={},
    )
    args = last_body(client, "txt2img")["alwayson_scripts"]["ControlNet"]["args"]
    assert args[0]["control_mode"] == "Balanced" and args[0]["resize_mode"] == "Resize and Fill"
    assert args[1]["image"] == ""
    assert result.images[0].size == (64, 64)
    assert "ControlNet 0" in result.info["infotexts"][0]
    assert result.info["warnings"] == []


def test_webuiapi_extra_single_image(client: Any) -> None:
    image = card_image(32, 32)
    result = client.extra_single_image(image=image, upscaler_1="Lanczos", upscaling_resize=2)
    body = last_body(client, "extra-single-image")
    assert body["upscaler_1"] == "Lanczos" and body["gfpgan_visibility"] == 0
    assert result.images[0].size == (64, 64)
    assert result.info == "<p>Postprocess upscale by: 2.0, Postprocess upscaler: Lanczos</p>"


def test_webuiapi_extra_batch_images_with_a_model_upscaler(client: Any) -> None:
    images = [card_image(16, 16), card_image(24, 16)]
    result = client.extra_batch_images(
        images=images, upscaler_1="R-ESRGAN General 4xV3", upscaling_resize=2
    )
    assert [i.size for i in result.images] == [(32, 32), (48, 32)]
    assert "Postprocess upscaler: R-ESRGAN General 4xV3" in result.info


def test_webuiapi_png_info_of_its_own_txt2img_image(client: Any) -> None:
    generated = client.txt2img(
        prompt="a (red:1.1) boat", seed=99, width=64, height=64, alwayson_scripts={}
    )
    # webuiapi keeps the PNG's text chunks when it re-encodes the image (raw_b64_img).
    result = client.png_info(generated.image)
    info = result.json
    assert info["parameters"]["Prompt"] == "a (red:1.1) boat"
    assert info["parameters"]["Seed"] == "99"


def test_webuiapi_set_options_gets_a_clear_refusal(client: Any) -> None:
    reply = client.set_options({"sd_model_checkpoint": SD1})
    assert reply["error"] == "failed" and "override_settings" in reply["detail"]
    assert client.get_options()["sd_model_checkpoint"].startswith(SD1 + " [")


def test_webuiapi_listing_getters(client: Any) -> None:
    getters = {
        "sd-models": client.get_sd_models,
        "sd-vae": client.get_sd_vae,
        "samplers": client.get_samplers,
        "schedulers": client.get_schedulers,
        "upscalers": client.get_upscalers,
        "latent-upscale-modes": client.get_latent_upscale_modes,
        "loras": client.get_loras,
        "hypernetworks": client.get_hypernetworks,
        "face-restorers": client.get_face_restorers,
        "realesrgan-models": client.get_realesrgan_models,
        "prompt-styles": client.get_prompt_styles,
        "embeddings": client.get_embeddings,
        "memory": client.get_memory,
        "options": client.get_options,
        "cmd-flags": client.get_cmd_flags,
    }
    for name, getter in getters.items():
        data = getter()
        assert not (isinstance(data, dict) and data.get("error") == "failed"), (name, data)
        if name in LIST_SHAPES:
            for item in data:
                assert_shape(item, LIST_SHAPES[name], name)
    assert client.util_get_model_names()[0].startswith(SD1 + " [")
