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
from engine.errors import RequestError
from extensions.controlnet import preprocessors
from extensions.controlnet.extension import bound_slider
from extensions.controlnet.models import ModelCache
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


@pytest.mark.parametrize(("value", "used"), [(-1, 0.5), (0.25, 0.25), (64, 0.5), (1e300, 0.5)])
def test_a_missing_slider_bounds_like_the_extensions_invisible_one(
    value: float, used: float
) -> None:
    # blur_gaussian has no slider_b: the extension's bound_check_params still checks
    # threshold_b against PreprocessorParameter(visible=False), 0..1 with default 0.5.
    assert bound_slider(value, None, "x.threshold_b", "blur_gaussian") == (used, None)


# --------------------------------------------------------------------------------------------
# The map size, refused before any work: the short side goes to the resolution, so a thin
# image's long side grows with its aspect ratio (1x4096 at 512: a 512x2097152 canny map, 24 GiB)


def _thin_unit(size: tuple[int, int], **unit: Any) -> str:
    base = {"module": "canny", "model": "tiny-controlnet-sd15"}
    base["image"] = b64_png(Image.new("RGB", size, (9, 9, 9)))
    return payload(steps=2, alwayson_scripts={"controlnet": {"args": [{**base, **unit}]}})


@pytest.fixture
def preprocessor_calls(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, ...]]:
    """Every resize to the resolution, refused: a run that got there would try the huge map."""
    calls: list[tuple[int, ...]] = []

    def refuse(img: np.ndarray, res: int) -> np.ndarray:
        calls.append(img.shape)
        raise AssertionError(f"the preprocessor ran on a {img.shape} image at {res}")

    monkeypatch.setattr(preprocessors, "_short_side", refuse)
    return calls


@pytest.fixture
def model_loads(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """The ControlNet model loads a test makes (spied on, not replaced)."""
    loads: list[Any] = []
    load = ModelCache.get

    def spy(self: ModelCache, *args: Any, **kwargs: Any) -> Any:
        loads.append(args)
        return load(self, *args, **kwargs)

    monkeypatch.setattr(ModelCache, "get", spy)
    return loads


@pytest.mark.parametrize(("size", "resize_mode"), [((1, 4096), 2), ((4096, 1), 0)])
def test_a_thin_image_is_refused_while_the_unit_is_validated(
    engine: Engine,
    model_loads: list[Any],
    preprocessor_calls: list[tuple[int, ...]],
    size: tuple[int, int],
    resize_mode: int,
) -> None:
    loads = model_loads
    with pytest.raises(RequestError) as err:
        engine.handle("auto", _thin_unit(size, resize_mode=resize_mode))
    (problem,) = err.value.problems
    assert problem.field == "alwayson_scripts.controlnet.args[0].image"
    long_side = 512 * 4096
    shown = f"{long_side}x512" if size[0] > size[1] else f"512x{long_side}"
    assert f"{size[0]}x{size[1]} image" in str(problem) and f"{shown} map" in str(problem)
    assert "16,777,216 pixels" in str(problem)
    # From validation: no ControlNet was loaded and no preprocessor ran.
    assert loads == [] and preprocessor_calls == []


@pytest.mark.parametrize(("resize_mode", "shown"), [(2, "0x0 map"), (0, "64x262144 map")])
def test_pixel_perfect_on_a_thin_image_names_the_image(
    engine: Engine,
    model_loads: list[Any],
    preprocessor_calls: list[tuple[int, ...]],
    resize_mode: int,
    shown: str,
) -> None:
    # Resize and Fill at 64x64 picks resolution round(64 / 4096) = 0 (PIL raised "height and
    # width must be > 0"); Just Resize picks 64, a 64x262144 map.
    body = _thin_unit((1, 4096), resize_mode=resize_mode, pixel_perfect=True)
    with pytest.raises(RequestError) as err:
        engine.handle("auto", body)
    (problem,) = err.value.problems
    assert problem.field == "alwayson_scripts.controlnet.args[0].image"
    assert shown in str(problem) and "at least 1" in str(problem)
    assert preprocessor_calls == [] and model_loads == []  # checked before the model loads


def test_a_thin_img2img_image_used_by_a_unit_names_init_images(
    engine: Engine, model_loads: list[Any], preprocessor_calls: list[tuple[int, ...]]
) -> None:
    # A unit without its own image runs on init_images[0]; the error says where it came from.
    unit = {"module": "canny", "model": "tiny-controlnet-sd15"}
    thin = b64_png(Image.new("RGB", (1, 4096), (9, 9, 9)))
    body = payload(init_images=[thin], alwayson_scripts={"controlnet": {"args": [unit]}})
    with pytest.raises(RequestError) as err:
        engine.handle("img2img", body)
    (problem,) = err.value.problems
    assert problem.field == "init_images[0]" and "1x4096 image" in str(problem)
    assert preprocessor_calls == [] and model_loads == []


# --------------------------------------------------------------------------------------------
# What each of the other modules visibly does (canny, invert and threshold: test_extensions.py)


def square(size: int = 64, lo: int = 0, hi: int = 255) -> Image.Image:
    """A bright square (rows/cols 16..47) centred on a dark background."""
    array = np.full((size, size, 3), lo, dtype=np.uint8)
    q = size // 4
    array[q : size - q, q : size - q] = hi
    return Image.fromarray(array)


def strokes() -> Image.Image:
    """Dark strokes on white paper (a scan of a line drawing): a cross, 4 px wide."""
    array = np.full((64, 64, 3), 240, dtype=np.uint8)
    array[30:34, 8:56] = 20
    array[8:56, 30:34] = 20
    return Image.fromarray(array)


def run(name: str, image: Image.Image, res: int = 64, a: float = -1, b: float = -1) -> np.ndarray:
    return np.asarray(run_preprocessor(PREPROCESSORS[name], image, res, a, b))


def test_none_passes_the_image_through() -> None:
    image = card_image(64, 64)
    assert np.array_equal(run("none", image), np.asarray(image))


@pytest.mark.parametrize("level", [0, 128])  # 0: Otsu picks the level
def test_binary_turns_dark_lines_into_white_lines_on_black(level: int) -> None:
    out = run("binary", strokes(), a=level)
    lines = np.asarray(strokes())[:, :, 0] < 128
    assert set(np.unique(out).tolist()) == {0, 255}
    assert np.array_equal(out[:, :, 0] == 255, lines)  # exactly the strokes, nothing else


def test_binary_threshold_decides_which_greys_count_as_lines() -> None:
    grey = square(64, lo=90, hi=200)  # a mid-grey frame around a light square
    assert (run("binary", grey, a=100)[:4, :4] == 255).all()  # 90 <= 100: a line
    assert (run("binary", grey, a=80)[:4, :4] == 0).all()  # 90 > 80: paper


def test_tile_resample_shrinks_by_the_rate_with_a_box_average() -> None:
    image = noise(64, seed=3)
    assert np.array_equal(run("tile_resample", image, a=1.0), np.asarray(image))  # < 1.1: as is
    out = run("tile_resample", image, a=2.0)
    assert out.shape == (32, 32, 3)
    blocks = np.asarray(image, dtype=np.float32).reshape(32, 2, 32, 2, 3).mean(axis=(1, 3))
    assert np.abs(out.astype(np.float32) - blocks).max() <= 1.0  # cv2.INTER_AREA at 1/2


def test_color_is_a_grid_of_flat_cells_in_the_images_colours() -> None:
    out = run("color", card_image(64, 64), res=512)
    assert out.shape == (512, 512, 3)
    cells = out.reshape(8, 64, 8, 64, 3)
    flat = (cells == cells[:, :1, :, :1]).all(axis=(1, 3, 4))
    assert flat.all()  # every 64x64 cell is one colour
    # The card is blue with a red square at 16..32 (cells 2..3 of 8 at 512): red stays red.
    red_cell, blue_cell = cells[2, 0, 2, 0], cells[6, 0, 6, 0]
    assert red_cell[0] > red_cell[2] and blue_cell[2] > blue_cell[0]


def test_blur_gaussian_softens_the_edge_by_sigma() -> None:
    sharp = square()
    out = run("blur_gaussian", sharp, a=2.0).astype(np.float32)
    reference = ndimage.gaussian_filter(
        np.asarray(sharp, dtype=np.float64),
        sigma=(2.0, 2.0, 0),
        mode="mirror",
        truncate=6 / 2.0,  # cv2's 8-bit kernel: 13 taps at sigma 2
    )
    assert np.abs(out - reference).max() <= 1.0
    # A user sees a ramp across the edge instead of a step: intermediate greys appear.
    row = out[32, 8:24, 0]
    assert ((row > 20) & (row < 235)).sum() >= 4
    wider = run("blur_gaussian", sharp, a=6.0)[32, 8:24, 0]
    assert ((wider > 20) & (wider < 235)).sum() > ((row > 20) & (row < 235)).sum()


def test_scribble_xdog_draws_the_outline_and_its_threshold_thins_it() -> None:
    out = run("scribble_xdog", square(), a=32)[:, :, 0] > 0
    assert out.any() and not out[26:38, 26:38].any() and not out[:4, :4].any()
    ys, xs = np.nonzero(out)
    # Every white pixel lies in a band around the outline (16 px from the centre; the DoG's
    # wide Gaussian, sigma 5, makes the band about 8 px either side).
    ring = np.maximum(np.abs(ys - 31.5), np.abs(xs - 31.5))
    assert ((ring > 8) & (ring < 24)).all()
    thin = run("scribble_xdog", square(), a=64)[:, :, 0] > 0
    assert 0 < thin.sum() < out.sum()


def test_scribble_thr_keeps_the_dark_strokes_as_white_scribbles() -> None:
    out = run("scribble_thr", strokes())
    lines = np.asarray(strokes())[:, :, 0] < 127
    assert np.array_equal(out[:, :, 0] == 255, lines)


def test_modules_give_visibly_different_maps_of_one_image() -> None:
    # A user switching modules sees a different control map: at least a tenth of the pixels
    # (on a 0..255 scale, a mean difference above 25) between any two of these.
    maps = {name: run(name, square()).astype(np.float32) for name in ("canny", "scribble_xdog")}
    maps["blur_gaussian"] = run("blur_gaussian", square(), a=9.0).astype(np.float32)
    maps["invert"] = run("invert", square()).astype(np.float32)
    names = sorted(maps)
    for i, left in enumerate(names):
        for right in names[i + 1 :]:
            assert np.abs(maps[left] - maps[right]).mean() > 25, (left, right)
