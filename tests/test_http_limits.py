"""Implied sizes and step counts through the real Cog server: refused before model work.

Each request below was accepted (and held or crashed the worker) before the limits covered
what a request implies, not only what it sends. Each must now fail at once with an error that
names the field, and the golden request must give the same pixels afterwards.
"""

from __future__ import annotations

import json
import time

import numpy as np
import pytest

from .helpers import payload, pixels
from .test_http import CogServer, image_bytes
from .test_http import server as server  # the module-scoped server fixture

pytestmark = pytest.mark.http

GOLDEN = payload(steps=2, prompt="a lighthouse <lora:tiny-lora-sd15:0.8>")
# A refusal happens in the parser: far below this. Sampling a 60000-pixel target would not.
HANG_GUARD_S = 60

CASES = [
    # (id, payload changes, a field the error must name)
    ("firstphase-40000", {"firstphase_width": 40000, "firstphase_height": 40000}, "firstphase"),
    (
        "firstphase-implied-pixels",
        {"enable_hr": True, "firstphase_width": 2048, "firstphase_height": 2048, "hr_scale": 2},
        "hr_scale",
    ),
    ("hr-resize-60000", {"enable_hr": True, "hr_resize_x": 60000, "hr_resize_y": 60000}, "hr_"),
    (
        "hr-resize-implied-60000",
        {"enable_hr": True, "width": 64, "height": 2048, "hr_resize_x": 2048},
        "hr_resize_x",
    ),
    ("hr-scale-1000", {"enable_hr": True, "hr_scale": 1000}, "hr_scale"),
    ("hr-scale-1e6", {"enable_hr": True, "hr_scale": 1e6}, "hr_scale"),
    (
        "hr-steps-1000000",
        {"enable_hr": True, "hr_second_pass_steps": 1000000, "denoising_strength": 0.01},
        "hr_second_pass_steps",
    ),
    (
        "hr-denoise-tiny",
        {"enable_hr": True, "hr_second_pass_steps": 150, "denoising_strength": 1e-300},
        "denoising_strength",
    ),
    (
        "unet-evals",
        {
            "enable_hr": True,
            "steps": 150,
            "hr_second_pass_steps": 150,
            "batch_size": 8,
            "n_iter": 8,
        },
        "steps*batch_size*n_iter",
    ),
    (
        "total-pixels",
        {"steps": 1, "width": 1024, "height": 1088, "batch_size": 8, "n_iter": 8},
        "batch_size*n_iter",
    ),
]


@pytest.fixture(scope="module")
def golden(server: CogServer) -> np.ndarray:
    return np.asarray(pixels(image_bytes(server.predict(GOLDEN))[0]), dtype=np.int16)


@pytest.mark.parametrize(("changes", "field"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_implied_work_is_refused_naming_the_field(
    server: CogServer, golden: np.ndarray, changes: dict[str, object], field: str
) -> None:
    started = time.monotonic()
    prediction = server.predict(payload(**changes))
    assert time.monotonic() - started < HANG_GUARD_S
    assert prediction["status"] == "failed", json.dumps(prediction)[:300]
    assert field in prediction["error"], prediction["error"]
    assert "at most" in prediction["error"] or "from 0 to" in prediction["error"]
    assert server.settled_health() == "READY"
    # The worker is unharmed: the golden request gives identical pixels (difference 0).
    after = np.asarray(pixels(image_bytes(server.predict(GOLDEN))[0]), dtype=np.int16)
    assert int(np.abs(after - golden).max()) == 0
