"""The real Cog HTTP server (coglet), started here on 127.0.0.1 over the tiny models."""

from __future__ import annotations

import base64
import http.server
import json
import re
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from replicate.prediction import Prediction

from .cog_server import (
    BUSY_RETRIES,
    CogServer,
    image_bytes,
    running_server,
)
from .helpers import b64_png, box_mask, card_image, payload

pytestmark = pytest.mark.http


@pytest.fixture(scope="module")
def server(cog_server: CogServer) -> CogServer:
    """The session's Cog server over the tiny models (tests/conftest.py), one for every HTTP
    test module: each module that imports this fixture shares it."""
    return cog_server


def test_corrupt_checkpoint_fails_setup_instead_of_serving(
    tiny_models_dir: Path, tmp_path: Path
) -> None:
    models = tmp_path / "models"
    (models / "checkpoints").mkdir(parents=True)
    data = (tiny_models_dir / "checkpoints" / "tiny-sd15.safetensors").read_bytes()
    (models / "checkpoints" / "broken.safetensors").write_bytes(data[: len(data) // 3])
    with running_server(models, tmp_path / "server.log") as (server, status):
        assert status == "SETUP_FAILED"
        _, health = server.call("GET", "/health-check")
        assert "broken.safetensors" in json.dumps(health)
        status_code, reply = server.call("POST", "/predictions", {"input": {"api_json": payload()}})
        assert status_code == 503, reply


def test_txt2img_prediction_succeeds_with_images_and_info(server: CogServer) -> None:
    prediction = server.predict(payload(batch_size=2))
    assert prediction["status"] == "succeeded", prediction.get("error")
    images = image_bytes(prediction)
    assert len(images) == 2 and all(d.startswith(b"\x89PNG") for d in images)
    info = json.loads(prediction["output"]["info"])
    assert info["all_seeds"] == [1234, 1235]
    assert prediction["output"]["seed"] == 1234
    assert "Using seed: 1234" in prediction["logs"]
    # Replicate's client turns the tqdm-shaped lines into prediction.progress.
    progress = Prediction.Progress.parse(prediction["logs"])
    assert progress is not None and (progress.current, progress.total) == (4, 4)


def test_data_url_payload_as_cog_cli_sends_it(server: CogServer) -> None:
    url = "data:application/json;base64," + base64.b64encode(payload().encode()).decode()
    assert image_bytes(server.predict(url)) == image_bytes(server.predict(payload()))


def test_listing_endpoint_over_http(server: CogServer) -> None:
    prediction = server.predict("{}", endpoint="samplers")
    assert prediction["status"] == "succeeded"
    names = [s["name"] for s in json.loads(prediction["output"]["listing"])]
    assert "Euler" in names


def test_malformed_json_fails_clearly_and_server_stays_ready(server: CogServer) -> None:
    prediction = server.predict('{"prompt": "a cat",')
    assert prediction["status"] == "failed"
    assert "api_json" in prediction["error"] and "not valid JSON" in prediction["error"]
    assert "Error:" not in prediction["error"]  # no Python class name
    assert server.settled_health() == "READY"


def test_bad_field_fails_naming_field_and_allowed_values(server: CogServer) -> None:
    prediction = server.predict(payload(sampler_name="Nope"))
    assert prediction["status"] == "failed"
    assert "sampler_name" in prediction["error"] and "'Nope'" in prediction["error"]
    assert "Euler" in prediction["error"]


class WebhookSink:
    """A loopback HTTP server that records the prediction objects Cog posts to a webhook."""

    def __init__(self) -> None:
        events: list[dict[str, Any]] = []
        self.events = events

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", "0"))
                events.append(json.loads(self.rfile.read(length)))
                self.send_response(200)
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/hook"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def wait_for(self, predicate: Any, timeout: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for event in list(self.events):
                if predicate(event):
                    return event
            time.sleep(0.1)
        pytest.fail(
            f"no matching webhook event in {timeout}s; got {[e.get('status') for e in self.events]}"
        )

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def test_cancelled_async_prediction_then_next_gives_expected_bytes(server: CogServer) -> None:
    golden = image_bytes(server.predict(payload()))
    sink = WebhookSink()
    try:
        # A long run (many steps) so that the cancel lands mid-denoising.
        body = {
            "input": {"api_json": payload(steps=150, width=128, height=128)},
            "webhook": sink.url,
        }
        for _ in range(BUSY_RETRIES):
            status, reply = server.call(
                "PUT", "/predictions/cancel-me", body, {"Prefer": "respond-async"}
            )
            if status != 409:
                break
            time.sleep(0.1)
        assert status == 202, reply
        sink.wait_for(lambda e: "/150" in (e.get("logs") or ""), timeout=60)
        # One prediction at a time: a second request while this one runs is refused as busy.
        status, busy = server.call("POST", "/predictions", {"input": {"api_json": payload()}})
        assert status == 409, busy
        status, _ = server.call("POST", "/predictions/cancel-me/cancel")
        assert status == 200
        final = sink.wait_for(
            lambda e: e.get("status") in ("canceled", "succeeded", "failed"), timeout=60
        )
    finally:
        sink.close()
    assert final["status"] == "canceled", final
    assert "| 150/150" not in (final.get("logs") or "")
    assert server.settled_health(timeout=30) == "READY"
    assert image_bytes(server.predict(payload())) == golden


def test_webui_prompt_syntax_payload(server: CogServer) -> None:
    """webui's own API test prompt (test/test_txt2img.py) through the real server."""
    prompt = "((emphasis)), (emphasis1:1.1), [to:1], [from::2], [from:to:0.3], [alt|alt1]"
    prediction = server.predict(payload(prompt=prompt, steps=3))
    assert prediction["status"] == "succeeded", prediction.get("error")
    assert json.loads(prediction["output"]["info"])["prompt"] == prompt


@pytest.mark.parametrize("variant", ["plain", "mask", "inverted"])
def test_webui_img2img_payloads(server: CogServer, variant: str) -> None:
    """The shapes of webui's img2img API tests: plain, with a mask, with the mask inverted."""
    changes: dict[str, Any] = {
        "init_images": [b64_png(card_image(64, 64))],
        "denoising_strength": 0.6,
    }
    if variant != "plain":
        changes["mask"] = b64_png(box_mask(64, 64, (16, 16, 48, 48)))
    if variant == "inverted":
        changes["inpainting_mask_invert"] = 1
    prediction = server.predict(payload(**changes))
    assert prediction["status"] == "succeeded", prediction.get("error")
    assert len(image_bytes(prediction)) == 1


def test_controlnet_payload_as_clients_send_it(server: CogServer) -> None:
    # predict() retries coglet's momentary 409 after the previous prediction.
    listing = server.predict("{}", endpoint="controlnet/model_list")
    model = json.loads(listing["output"]["listing"])["model_list"][0]  # "name [hash]"
    unit = {
        "enabled": True,
        "input_image": b64_png(card_image(64, 64)),
        "module": "canny",
        "model": model,
        "weight": 1,
        "resize_mode": 1,
        "lowvram": False,
        "processor_res": 64,
        "threshold_a": 100,
        "threshold_b": 200,
        "guidance_start": 0.0,
        "guidance_end": 1.0,
        "control_mode": 0,
        "pixel_perfect": False,
    }
    prediction = server.predict(payload(alwayson_scripts={"ControlNet": {"args": [unit]}}))
    assert prediction["status"] == "succeeded", prediction.get("error")
    assert len(image_bytes(prediction)) == 2  # the image and the detected map


# --------------------------------------------------------------------------- the playground


def decoded(prediction: dict[str, Any]) -> list[Any]:
    import io

    from PIL import Image

    return [Image.open(io.BytesIO(data)) for data in image_bytes(prediction)]


def test_playground_only_request_runs_end_to_end(server: CogServer) -> None:
    """Typed inputs only, as a person fills them in on Replicate (api_json left at "{}")."""
    body: dict[str, Any] = {
        "prompt": "a red barn",
        "negative_prompt": "fog",
        "width": 64,
        "height": 96,
        "steps": 3,
        "seed": 42,
        "sampler": "DPM++ 2M",
        "scheduler": "Karras",
        "cfg_scale": 5.5,
        "output_format": "webp",
    }
    reply = server.predict("{}", **body)
    assert reply["status"] == "succeeded", reply.get("error")
    (image,) = decoded(reply)
    assert image.format == "WEBP" and image.size == (64, 96)
    assert reply["output"]["seed"] == 42 and "Using seed: 42" in reply["logs"]
    info = json.loads(reply["output"]["info"])
    assert info["prompt"] == "a red barn" and info["negative_prompt"] == "fog"
    assert info["steps"] == 3 and info["cfg_scale"] == 5.5
    assert info["sampler_name"] == "DPM++ 2M" and "Schedule type: Karras" in info["infotexts"][0]


def test_playground_img2img_with_an_uploaded_file(server: CogServer) -> None:
    url = "data:image/png;base64," + b64_png(card_image(64, 64))
    body: dict[str, Any] = {
        "prompt": "x",
        "init_image": url,
        "denoising_strength": 0.5,
        "steps": 4,
        "seed": 3,
    }
    reply = server.predict("{}", **body)
    assert reply["status"] == "succeeded", reply.get("error")
    assert json.loads(reply["output"]["info"])["denoising_strength"] == 0.5


def test_api_json_wins_over_a_playground_input(server: CogServer) -> None:
    prediction = server.predict(payload(steps=2), steps=3, seed=99)
    info = json.loads(prediction["output"]["info"])
    assert info["steps"] == 2 and info["seed"] == 1234


@pytest.mark.parametrize(
    ("field", "value"),
    [("steps", 0), ("width", 4096), ("sampler", "Nope"), ("output_format", "gif"), ("seed", "7")],
)
def test_cog_refuses_out_of_range_and_unknown_choices_with_422(
    server: CogServer, field: str, value: Any
) -> None:
    status, reply = server.call("POST", "/predictions", {"input": {field: value}})
    assert status == 422, reply
    assert any(d["loc"][-1] == field for d in reply["detail"]), reply


def test_error_is_our_sentence_without_class_names(server: CogServer) -> None:
    prediction = server.predict(payload(steps=0))
    assert prediction["status"] == "failed"
    error = prediction["error"]
    # coglet itself prefixes "Prediction failed: Async prediction failed: " (0.23.1, an async
    # predictor); after that, our sentence.
    sentence = error.split("prediction failed: ")[-1]
    assert sentence.startswith("Invalid request: steps: got 0; "), error
    assert "RequestError" not in error and "Exception" not in error


def test_setup_log_names_device_dtype_attention_and_each_load_time(server: CogServer) -> None:
    _, health = server.call("GET", "/health-check")
    logs = health["setup"]["logs"]
    assert "setup: device cpu, dtype float32, attention PyTorch SDPA" in logs
    for name in ("tiny-sd15.safetensors", "tiny-sdxl.safetensors"):
        assert re.search(rf"loaded {re.escape(name)} \[\w+\] in [\d.]+ s \([\d.]+ MiB", logs), name
