"""HAT upscaler files (engine/upscaler_hat.py): the network against spandrel's HAT (what webui
runs) on the same random weights, the index facts, recognition from the keys, and a HAT file
through hires fix and the extras endpoint with webui's HAT tiling (the ESRGAN_tile options)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from engine.api import Engine
from engine.upscaler_hat import CONV_SCALE, HAT, _HybridBlock, oca_index
from engine.upscaler_models import (
    Unsupported,
    UpscalerCatalog,
    _descriptor_call,
    build,
    read_weights,
    recognise,
    upscale_with_model,
)
from scripts import make_tiny_upscalers as tiny

from .helpers import assert_pixels_changed, b64_png, card_image, levels, noise, payload, pixels
from .spandrel_ref import spandrel_arch as reference_arch

# spandrel's HAT calls torch.meshgrid without `indexing` (a deprecation warning).
pytestmark = pytest.mark.filterwarnings("ignore:torch.meshgrid:UserWarning")

NAME = "HAT_SRx4_ImageNet-pretrain"  # tiny.HAT_X4, named by its stem as webui names HAT files

# x2/x3/x4; HAT-S's narrow channel attention; no residual convs (spandrel's "identity"); the
# released windows' proportions (16 with 24 around it: here 8 with 12); no qkv bias.
SHAPES = {
    "x4 (the tiny file)": tiny.HAT_X4,
    "x2 window 8/12, no residual convs": tiny.HATShape(
        2, resi=False, window=8, overlap=12, compress=4, depths=(3,), heads=(4,)
    ),
    "x3 no qkv bias, HAT-S compress": tiny.HATShape(3, qkv_bias=False, compress=2, squeeze=1),
}
SIZES = [(16, 16), (24, 20), (13, 9), (5, 30)]


def model_of(shape: tiny.HATShape, seed: int = 0) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    state = tiny.hat_state(shape, seed, "test")
    arch, args, weights = recognise(state)
    return build(arch, args, weights), state


@pytest.fixture(scope="module")
def spandrel_arch() -> Any:
    return reference_arch("HAT")


@pytest.mark.parametrize("label", list(SHAPES))
def test_the_network_matches_spandrels_hat_on_the_same_weights(
    spandrel_arch: Any, label: str
) -> None:
    shape = SHAPES[label]
    mine, state = model_of(shape)
    reference = spandrel_arch.load(dict(state))
    reference.model.eval()
    assert reference.scale == shape.scale and not reference.supports_half
    generator = torch.Generator().manual_seed(1)
    for height, width in SIZES:
        x = torch.rand(1, 3, height, width, generator=generator)
        with torch.no_grad():
            ours, theirs = mine(x), reference.model(x)
            ours_call, theirs_call = _descriptor_call(mine, x), reference(x)
        assert ours.shape == theirs.shape == (1, 3, height * shape.scale, width * shape.scale)
        assert (ours - theirs).abs().max() < 2e-5, (label, height, width)
        assert (ours_call - theirs_call).abs().max() < 2e-5, (label, height, width)
        assert ours.std() > 0.05


def test_a_wrong_shift_or_overlap_index_would_be_seen_by_the_reference(
    spandrel_arch: Any,
) -> None:
    x = torch.rand(1, 3, 24, 20, generator=torch.Generator().manual_seed(2))
    for change in ("no shift", "centred overlap index"):
        mine, state = model_of(tiny.HAT_X4)
        reference = spandrel_arch.load(dict(state))
        reference.model.eval()
        assert isinstance(mine, HAT)
        if change == "no shift":
            for module in mine.modules():
                if isinstance(module, _HybridBlock):
                    module.shift = 0
        else:
            # The "natural" centred offsets instead of HAT's formula (negative rows and all).
            index = mine.get_buffer("index_oca")
            mine.register_buffer("index_oca", index - index.min(), persistent=False)
        with torch.no_grad():
            assert (mine(x) - reference.model(x)).abs().max() > 1e-2, change


def test_the_index_buffers_are_hats_published_formulas() -> None:
    # tiny's buffers are written from HAT's formulas by their own loops.
    for window, overlap in ((4, 6), (8, 12), (16, 24)):
        buffers = tiny.hat_buffers(tiny.HATShape(4, window=window, overlap=overlap))
        index = oca_index(window, overlap)
        assert torch.equal(index, buffers["relative_position_index_OCA"])
        assert index.shape == (window**2, overlap**2)
        # Not centred: the key token at the overlapping window's top-left against the query
        # at the window's bottom-right gives HAT's most negative row.
        low = 2 - overlap
        assert int(index.min()) == low * (window + overlap - 1) + low
        assert int(index.max()) == window * (window + overlap - 1) + window
    assert CONV_SCALE == 0.01


@pytest.mark.parametrize("label", list(SHAPES))
def test_the_keys_give_the_config_and_every_weight_is_used(label: str) -> None:
    shape = SHAPES[label]
    state = tiny.hat_state(shape, 0, "test")
    arch, args, weights = recognise(state)
    config = args["config"]
    assert (arch.kind, arch.scale) == ("HAT", shape.scale)
    assert (config.window, config.overlap_window) == (shape.window, shape.overlap)
    assert config.depths == shape.depths and config.num_heads == shape.heads
    assert (config.compress, config.squeeze) == (shape.compress, shape.squeeze)
    assert config.resi_conv == shape.resi and config.qkv_bias == shape.qkv_bias
    model = build(arch, args, weights)
    assert set(state) - set(weights) == {
        "relative_position_index_SA",
        "relative_position_index_OCA",
    }
    assert set(model.state_dict()) == set(weights)


def _unsupported(state: dict[str, torch.Tensor]) -> str:
    with pytest.raises(Unsupported) as err:
        arch, args, weights = recognise(state)
        build(arch, args, weights)
    return str(err.value)


def test_files_hat_does_not_run_say_why() -> None:
    state = tiny.hat_state(tiny.HAT_X4, 0, "test")
    gray = {**state, "conv_first.weight": torch.zeros(32, 1, 3, 3)}
    assert "1 input channels" in _unsupported(gray)
    ape = {**state, "absolute_pos_embed": torch.zeros(1, 64 * 64, 32)}
    assert "absolute position embedding" in _unsupported(ape)
    missing = {k: v for k, v in state.items() if not k.endswith("overlap_attn.mlp.fc2.weight")}
    assert "do not fit" in _unsupported(missing)
    oca = "relative_position_index_OCA"
    assert "not HAT's" in _unsupported({**state, oca: state[oca].flip(0)})
    no_index = {k: v for k, v in state.items() if k != oca}
    assert "without relative_position_index_OCA" in _unsupported(no_index)


# ---------------------------------------------------------------- catalog and engine


@pytest.fixture(scope="module")
def catalog(tiny_models_dir: Path) -> UpscalerCatalog:
    return UpscalerCatalog.scan([tiny_models_dir / tiny.FILES["hat"]], dtype=torch.float16)


def test_a_hat_file_is_named_by_its_stem_and_runs_as_webui_runs_it(
    catalog: UpscalerCatalog, tiny_models_dir: Path
) -> None:
    assert catalog.names == [NAME] and catalog.files[NAME].scale == 4
    kind = catalog.kind(NAME)
    # webui's UpscalerHAT: upscale_with_model with the ESRGAN options, float32 (no half).
    assert (kind.tiling, kind.tile_options) == ("grid", ("ESRGAN_tile", "ESRGAN_tile_overlap"))
    model = catalog.model(NAME)
    assert next(model.parameters()).dtype == torch.float32
    state = read_weights(tiny_models_dir / tiny.FILES["hat"])
    assert set(state) == set(tiny.hat_state(tiny.HAT_X4, 0, "hat"))
    image = noise(40, 32, 4)
    whole = levels(upscale_with_model(model, image, tile=0))
    tiled = levels(upscale_with_model(model, image, tile=24, overlap=8))
    other = levels(upscale_with_model(model, noise(40, 32, 5), tile=0))
    assert whole.shape == (128, 160, 3) and whole.std() > 5
    change, unrelated = np.abs(tiled - whole).mean(), np.abs(other - whole).mean()
    assert 0 < change < unrelated / 2, (change, unrelated)


def run(engine: Engine, endpoint: str, body: str) -> tuple[list[bytes], str]:
    response = engine.handle(endpoint, body, lambda step, total: None)
    return [image.data for image in response.images], response.info


HIRES = {"enable_hr": True, "hr_scale": 2, "denoising_strength": 0, "hr_second_pass_steps": 1}


def test_hires_fix_with_a_hat_file_and_the_esrgan_tile_option(engine: Engine) -> None:
    lanczos, _ = run(engine, "txt2img", payload(hr_upscaler="Lanczos", **HIRES))
    hat, info = run(engine, "txt2img", payload(hr_upscaler=NAME, **HIRES))
    assert pixels(hat[0]).size == (128, 128)
    assert_pixels_changed(lanczos, hat)
    assert f"Hires upscaler: {NAME}" in json.loads(info)["infotexts"][0]
    small, _ = run(
        engine, "txt2img", payload(hr_upscaler=NAME, override_settings={"ESRGAN_tile": 32}, **HIRES)
    )
    dat_tile, _ = run(
        engine, "txt2img", payload(hr_upscaler=NAME, override_settings={"DAT_tile": 32}, **HIRES)
    )
    assert_pixels_changed(hat, small)
    assert np.array_equal(levels(pixels(hat[0])), levels(pixels(dat_tile[0])))


def test_extras_with_a_hat_file_and_the_listing(engine: Engine) -> None:
    image = card_image(40, 24)
    response = engine.handle(
        "extra-single-image",
        json.dumps({"image": b64_png(image), "upscaler_1": NAME, "upscaling_resize": 2}),
    )
    out = pixels(response.images[0].data)
    assert out.size == (80, 48)
    lanczos = image.resize((80, 48), Image.Resampling.LANCZOS)
    assert np.abs(levels(out) - levels(lanczos)).mean() > 1
    rows = {row["name"]: row for row in engine.handle("upscalers", "").listing}
    assert rows[NAME]["model_name"] is None and rows[NAME]["scale"] == 4.0
