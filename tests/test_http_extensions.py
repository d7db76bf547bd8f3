"""Extensions through the real Cog HTTP server (started by tests/test_http.py's fixture)."""

from __future__ import annotations

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
