"""ControlNet preprocessors: bounded work at webui's slider maxima, filters checked against
independent references (scipy), and what each module visibly does to an image."""

from __future__ import annotations

import json
import time
from typing import Any

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from engine.api import Engine
from extensions.controlnet.preprocessors import PREPROCESSORS, gaussian_blur, run_preprocessor

from .helpers import b64_png, card_image, payload

HANG_GUARD_S = 30.0  # generous: the slider maxima take a few seconds on two busy CPU cores


def noise(size: int = 64, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8))


# --------------------------------------------------------------------------------------------
# The Gaussian filter against scipy (cv2.GaussianBlur's kernel and reflect-101 border)


@pytest.mark.parametrize(
    ("shape", "sigma"),
    [((40, 50, 3), 3.0), ((64, 64, 3), 0.5), ((20, 9, 3), 30.0), ((1, 7, 3), 2.0)],
)
def test_gaussian_blur_matches_scipy_with_reflect_101(
    shape: tuple[int, int, int], sigma: float
) -> None:
    # (20, 9) at sigma 30: a 241-tap kernel on a 9-pixel row, reflected many times over.
    img = np.random.default_rng(1).random(shape).astype(np.float32) * 255
    radius = (round(sigma * 8 + 1) | 1) // 2  # cv2's size for float images
    reference = ndimage.gaussian_filter(
        img.astype(np.float64), sigma=(sigma, sigma, 0), mode="mirror", truncate=radius / sigma
    )
    assert np.abs(gaussian_blur(img, sigma) - reference).max() < 1e-3


def test_gaussian_blur_of_uint8_uses_cv2s_shorter_kernel() -> None:
    img = np.random.default_rng(2).integers(0, 256, (30, 30, 3), dtype=np.uint8)
    radius = (round(4.0 * 6 + 1) | 1) // 2  # cv2: 3 sigma each side for 8-bit images
    reference = ndimage.gaussian_filter(
        img.astype(np.float64), sigma=(4.0, 4.0, 0), mode="mirror", truncate=radius / 4.0
    )
    assert np.abs(gaussian_blur(img, 4.0) - reference).max() < 1e-3


# --------------------------------------------------------------------------------------------
# Bounded work: every module at its slider maxima


def _maxima(name: str) -> tuple[int, float, float]:
    pre = PREPROCESSORS[name]
    res = int(pre.resolution.max) if pre.resolution else 512
    a = pre.slider_a.max if pre.slider_a else -1.0
    b = pre.slider_b.max if pre.slider_b else -1.0
    return res, a, b


@pytest.mark.parametrize("name", sorted(PREPROCESSORS))
def test_every_module_at_its_slider_maxima_finishes(name: str) -> None:
    # Issue 16: blur_gaussian at the slider maxima took 64 s (a Python loop per kernel tap).
    res, a, b = _maxima(name)
    start = time.monotonic()
    out = run_preprocessor(PREPROCESSORS[name], noise(), res, a, b)
    assert time.monotonic() - start < HANG_GUARD_S, "hang guard"
    assert out.mode == "RGB" and min(out.size) in (64 // 8, 64, res)  # tile_resample: 1/8


def test_canny_lowest_thresholds_on_noise_finish() -> None:
    # Every pixel of a noise image is an edge candidate at thresholds 1/1: the hysteresis
    # must not walk millions of pixels one by one in Python.
    start = time.monotonic()
    edges = np.asarray(run_preprocessor(PREPROCESSORS["canny"], noise(), 2048, 1, 1))
    assert time.monotonic() - start < HANG_GUARD_S, "hang guard"
    assert 0.05 < (edges[:, :, 0] > 0).mean() < 0.95


# --------------------------------------------------------------------------------------------
# Out-of-range and non-finite values through the engine


def _controlnet(**unit: Any) -> str:
    base = {"module": "blur_gaussian", "model": "tiny-controlnet-sd15"}
    base["image"] = b64_png(card_image(64, 64))
    return payload(alwayson_scripts={"controlnet": {"args": [{**base, **unit}]}})


@pytest.mark.parametrize(
    ("unit", "field", "used"),
    [
        ({"threshold_a": 1e300}, "threshold_a", "Threshold A: 9.0"),
        ({"processor_res": 1000000}, "processor_res", "Processor Res: 512"),
        ({"module": "canny", "threshold_b": 1e6}, "threshold_b", "Threshold B: 200.0"),
    ],
)
def test_out_of_range_slider_values_become_the_default_with_a_warning(
    engine: Engine, unit: dict[str, Any], field: str, used: str
) -> None:
    # The ControlNet extension (bound_check_params) resets such values to the slider default;
    # we do the same and say so (sigma 1e300 took minutes; processor_res 1e6 a 91 GiB map).
    info = json.loads(engine.handle("auto", _controlnet(**unit)).info)
    assert used in info["infotexts"][0]
    note = next(w for w in info["warnings"] if f"args[0].{field}" in w)
    assert "used the default" in note


def test_api_default_minus_one_is_the_default_without_a_warning(engine: Engine) -> None:
    info = json.loads(engine.handle("auto", _controlnet(processor_res=-1, threshold_a=-1)).info)
    assert "Threshold A: 9.0" in info["infotexts"][0]
    assert not [w for w in info.get("warnings", []) if "controlnet" in w]
