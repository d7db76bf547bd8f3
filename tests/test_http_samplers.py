"""Every sampler family through the real Cog server: the request runs, the infotext names the
sampler and schedule as webui writes them, the same request gives the same pixels, and the
family's picture differs from Euler's (its own algorithm ran, not a fallback)."""

from __future__ import annotations

import json

import pytest

from .helpers import assert_pixels_changed, payload, pixels
from .test_http import CogServer, image_bytes
from .test_http import server as server

pytestmark = pytest.mark.http

# One sampler per way webui drives a sampler (engine/samplers.py Kind, plus the noise kinds):
# ancestral, second order, multistep, Brownian-tree SDE, DPM fast/adaptive (sigma_min/max),
# the timestep samplers (DDIM, DDIM CFG++, PLMS), UniPC, LCM and Restart.
FAMILIES = [
    ("Euler a", "Automatic"),
    ("Heun", "Karras"),
    ("DPM++ 2M", "Karras"),
    ("DPM++ 2M SDE", "Exponential"),
    ("DPM++ 3M SDE", "Karras"),
    ("DPM fast", "Automatic"),
    ("DPM adaptive", "Automatic"),
    ("DDIM", "Automatic"),
    ("DDIM CFG++", "Automatic"),
    ("PLMS", "Automatic"),
    ("UniPC", "Automatic"),
    ("LCM", "Automatic"),
    ("Restart", "Automatic"),
]


def generate(server: CogServer, **fields: object) -> tuple[list[bytes], str]:
    prediction = server.predict(payload(steps=5, **fields))
    assert prediction["status"] == "succeeded", prediction.get("error")
    info = json.loads(prediction["output"]["info"])
    return image_bytes(prediction), info["infotexts"][0]


@pytest.fixture(scope="module")
def euler(server: CogServer) -> list[bytes]:
    return generate(server, sampler_name="Euler")[0]


@pytest.mark.parametrize(("sampler", "schedule"), FAMILIES, ids=[f[0] for f in FAMILIES])
def test_sampler_family_runs_through_the_server(
    server: CogServer, euler: list[bytes], sampler: str, schedule: str
) -> None:
    images, infotext = generate(server, sampler_name=sampler, scheduler=schedule)
    assert f"Sampler: {sampler}," in infotext
    assert "Schedule type:" in infotext
    if schedule != "Automatic":
        assert f"Schedule type: {schedule}," in infotext
    again, _ = generate(server, sampler_name=sampler, scheduler=schedule)
    assert [pixels(i).tobytes() for i in again] == [pixels(i).tobytes() for i in images]
    assert_pixels_changed(euler, images)
