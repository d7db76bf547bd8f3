"""Many users on one server: the real Cog server with 4 prediction slots (COG_MAX_CONCURRENCY=4,
the async predictor), concurrent clients with mixed payloads. Each result is compared, in
decoded pixels, with the same request served alone by the same server; a cancelled and a bad
request change nobody else's picture; a short request finishes while a long one runs; each
prediction's logs are its own."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from .cog_server import BUSY_RETRIES, CogServer, image_bytes, running_server
from .helpers import CONTROLNET_UNIT, b64_png, card_image, payload, pixels, with_model
from .test_http import WebhookSink

pytestmark = pytest.mark.http

SLOTS = 4
MAX_LEVELS = 1  # as in tests/test_step_batcher.py


MIXED = {
    "euler": payload(seed=41),
    "lora": payload(seed=42, prompt="a lighthouse <lora:tiny-lora-sd15:1>", steps=5),
    "img2img": payload(seed=43, init_images=[b64_png(card_image(64, 64))]),
    "sdxl": with_model("tiny-sdxl", seed=44, sampler_name="DPM++ 2M"),
    "controlnet": payload(
        seed=45, width=96, alwayson_scripts={"controlnet": {"args": [CONTROLNET_UNIT]}}
    ),
}


@pytest.fixture(scope="module")
def server(tiny_models_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[CogServer]:
    log = tmp_path_factory.mktemp("cog-concurrent") / "server.log"
    env = {"COG_MAX_CONCURRENCY": str(SLOTS), "SD_MAX_CONCURRENCY": str(SLOTS)}
    with running_server(tiny_models_dir, log, env) as (srv, status):
        if status != "READY":
            pytest.fail(f"Cog server did not become READY ({status}):\n{log.read_text()[-4000:]}")
        yield srv


@pytest.fixture(scope="module")
def alone(server: CogServer) -> dict[str, list[np.ndarray]]:
    return {name: _arrays(server.predict(body)) for name, body in MIXED.items()}


def _arrays(prediction: dict[str, Any]) -> list[np.ndarray]:
    assert prediction["status"] == "succeeded", prediction.get("error")
    return [np.asarray(pixels(b), dtype=np.int16) for b in image_bytes(prediction)]


def _diff(a: list[np.ndarray], b: list[np.ndarray]) -> int:
    return max(int(np.abs(x - y).max()) for x, y in zip(a, b, strict=True))


def _all_at_once(server: CogServer, bodies: dict[str, str]) -> dict[str, dict[str, Any]]:
    results: dict[str, dict[str, Any]] = {}
    start = threading.Barrier(len(bodies))

    def work(name: str, body: str) -> None:
        start.wait()
        results[name] = server.predict(body)

    threads = [threading.Thread(target=work, args=item) for item in bodies.items()]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=600)
    assert len(results) == len(bodies)
    return results


def test_concurrent_clients_each_get_the_picture_they_get_alone(
    server: CogServer, alone: dict[str, list[np.ndarray]]
) -> None:
    results = _all_at_once(server, MIXED)
    for name, prediction in results.items():
        assert _diff(_arrays(prediction), alone[name]) <= MAX_LEVELS, name
        # Logs are routed per prediction: its own seed line, nobody else's.
        seeds = {n: f"Using seed: {40 + i}" for i, n in enumerate(MIXED, start=1)}
        assert all(str(40 + i) in body for i, body in enumerate(MIXED.values(), start=1))
        assert seeds[name] in prediction["logs"]
        assert not any(line in prediction["logs"] for n, line in seeds.items() if n != name)


def _start_async(server: CogServer, prediction_id: str, body: str, webhook: str) -> None:
    request = {"input": {"api_json": body}, "webhook": webhook}
    for _ in range(BUSY_RETRIES):
        status, reply = server.call(
            "PUT", f"/predictions/{prediction_id}", request, {"Prefer": "respond-async"}
        )
        if status != 409:
            break
        time.sleep(0.1)
    assert status == 202, reply


def test_short_request_finishes_while_long_one_runs_and_cancel_touches_nobody(
    server: CogServer, alone: dict[str, list[np.ndarray]]
) -> None:
    sink = WebhookSink()
    try:
        body = payload(steps=150, width=128, height=128, seed=7)
        _start_async(server, "long-one", body, sink.url)
        sink.wait_for(lambda e: "/150" in (e.get("logs") or ""), timeout=120)
        short = _all_at_once(server, {"euler": MIXED["euler"], "bad": payload(sampler_name="Nope")})
        assert not any(e.get("status") != "processing" for e in sink.events), (
            "the short request waited for the long one"
        )
        assert _diff(_arrays(short["euler"]), alone["euler"]) <= MAX_LEVELS
        assert short["bad"]["status"] == "failed" and "sampler_name" in short["bad"]["error"]
        # Cancel the long one while another request runs beside it.
        beside: dict[str, Any] = {}
        thread = threading.Thread(target=lambda: beside.update(server.predict(MIXED["lora"])))
        thread.start()
        status, _ = server.call("POST", "/predictions/long-one/cancel")
        assert status == 200
        thread.join(timeout=300)
        final = sink.wait_for(
            lambda e: e.get("status") in ("canceled", "succeeded", "failed"), timeout=120
        )
    finally:
        sink.close()
    assert final["status"] == "canceled", final
    assert "| 150/150" not in (final.get("logs") or "")
    assert _diff(_arrays(beside), alone["lora"]) <= MAX_LEVELS
    # Afterwards every slot is free and pictures are unchanged.
    assert server.settled_health(timeout=30) == "READY"
    assert _diff(_arrays(server.predict(MIXED["sdxl"])), alone["sdxl"]) == 0
