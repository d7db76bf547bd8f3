"""SwinIR upscaler files (engine/upscaler_swinir.py): the network against spandrel's SwinIR
(what webui runs) on the same random weights, the window/position/mask facts, recognition
from the keys, webui's upscale_2 tiling, and "SwinIR 4x" through hires fix, img2img and the
extras endpoints."""

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
from engine.errors import RequestError
from engine.upscaler_models import (
    Unsupported,
    UpscalerCatalog,
    _descriptor_call,
    build,
    read_weights,
    recognise,
    upscale_2,
)
from engine.upscaler_swinir import (
    MASKED,
    _SwinBlock,
    relative_position_index,
    shift_mask,
    window_partition,
    window_reverse,
)
from scripts import make_tiny_upscalers as tiny

from .helpers import assert_pixels_changed, b64_png, card_image, levels, noise, payload, pixels
from .spandrel_ref import spandrel_arch as reference_arch

# spandrel's SwinIR calls torch.meshgrid without `indexing` (a deprecation warning).
pytestmark = pytest.mark.filterwarnings("ignore:torch.meshgrid:UserWarning")

REAL = "SwinIR 4x"  # tiny.SWINIR_REAL, written as SwinIR_4x.pth
CLASSICAL = "001_classicalSR_DF2K_s64w8_SwinIR-M_x2"

# Every upsampler and residual conv real SwinIR files use (window 7: the JPEG models' range).
SHAPES = {
    "real-world x4 (nearest+conv, 3conv)": tiny.SWINIR_REAL,
    "real-world x2 (nearest+conv)": tiny.SwinIRShape("nearest+conv", 2),
    "classical x2 (pixelshuffle)": tiny.SWINIR_CLASSICAL,
    "classical x4 (pixelshuffle, 3conv)": tiny.SwinIRShape("pixelshuffle", 4, resi="3conv"),
    "classical x3 (pixelshuffle)": tiny.SwinIRShape("pixelshuffle", 3, depths=(2, 1)),
    "lightweight x3 (pixelshuffledirect)": tiny.SwinIRShape("pixelshuffledirect", 3),
    "denoise x1 (no upsampler)": tiny.SwinIRShape("", 1),
    "JPEG x1 (window 7, range 255)": tiny.SwinIRShape("", 1, window=7, heads=(1, 2)),
}
# Multiples of the window, not, and under spandrel's 16-pixel minimum.
SIZES = [(16, 16), (24, 20), (13, 9), (5, 30)]


def model_of(shape: tiny.SwinIRShape, seed: int = 0) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    state = tiny.swinir_state(shape, seed, "test")
    arch, args, weights = recognise(state)
    return build(arch, args, weights), state


# ------------------------------------------------------------------ the independent reference


@pytest.fixture(scope="module")
def spandrel_arch() -> Any:
    return reference_arch("SwinIR")


@pytest.mark.parametrize("label", list(SHAPES))
def test_the_network_matches_spandrels_swinir_on_the_same_weights(
    spandrel_arch: Any, label: str
) -> None:
    shape = SHAPES[label]
    mine, state = model_of(shape)
    reference = spandrel_arch.load(dict(state))  # spandrel infers its own hyperparameters
    reference.model.eval()  # (its DropPath is random in training mode)
    assert reference.scale == mine.config.scale  # type: ignore[union-attr]
    generator = torch.Generator().manual_seed(1)
    for height, width in SIZES:
        x = torch.rand(1, 3, height, width, generator=generator)
        with torch.no_grad():
            ours, theirs = mine(x), reference.model(x)
            # The call webui makes: spandrel's descriptor (16-pixel minimum, clamp).
            ours_call, theirs_call = _descriptor_call(mine, x), reference(x)
        scale = shape.scale
        assert ours.shape == theirs.shape == (1, 3, height * scale, width * scale)
        assert (ours - theirs).abs().max() < 2e-5, (label, height, width)
        assert (ours_call - theirs_call).abs().max() < 2e-5, (label, height, width)
        # The picture is not flat: a wrong mask, shift or bias index would show.
        assert ours.std() > 0.05


def test_a_wrong_shift_mask_would_be_seen_by_the_reference(spandrel_arch: Any) -> None:
    # The reference comparison can fail: without the mask (shifted windows mixing regions
    # that wrapped around) the output moves far beyond the tolerance.
    mine, state = model_of(tiny.SWINIR_REAL)
    reference = spandrel_arch.load(dict(state))
    reference.model.eval()
    x = torch.rand(1, 3, 24, 20, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        theirs = reference.model(x)
        for block in mine.modules():
            if isinstance(block, _SwinBlock):
                block.shift = 0  # no shift, hence no mask
        assert (mine(x) - theirs).abs().max() > 1e-2


# ------------------------------------------------------------------------- hand-computed facts


def test_window_partition_and_reverse_round_trip_in_row_major_order() -> None:
    x = torch.arange(2 * 8 * 12 * 3, dtype=torch.float32).view(2, 8, 12, 3)
    windows = window_partition(x, 4)
    assert windows.shape == (2 * 2 * 3, 16, 3)
    # The second window of the first image is rows 0..3, columns 4..7.
    assert torch.equal(windows[1].view(4, 4, 3), x[0, 0:4, 4:8])
    assert torch.equal(windows[6].view(4, 4, 3), x[1, 0:4, 0:4])
    assert torch.equal(window_reverse(windows, 4, 8, 12), x)


def test_relative_position_index_is_the_published_table() -> None:
    # tiny's buffer is written from the published formula by its own loop.
    for window in (4, 7, 8):
        index = relative_position_index(window)
        buffers = tiny.swinir_buffers(tiny.SwinIRShape("", 1, window=window))
        written = buffers["layers.0.residual_group.blocks.0.attn.relative_position_index"]
        assert torch.equal(index, written)
        assert index.shape == (window**2, window**2)
        assert index.min() == 0 and index.max() == (2 * window - 1) ** 2 - 1
        assert torch.equal(index.diagonal(), torch.full((window**2,), (window - 1) * (2 * window)))


def test_shift_mask_separates_only_the_wrapped_regions() -> None:
    mask = shift_mask(16, 12, 4, 2)
    assert mask.shape == (4 * 3, 16, 16)
    assert set(mask.unique().tolist()) == {0.0, MASKED}
    assert torch.equal(mask, mask.transpose(1, 2))
    grid = mask.view(4, 3, 16, 16)
    # Windows away from the last row and column see one region only.
    assert not grid[:3, :2].any()
    # The bottom-right window holds four regions of 4 tokens: 16*16 - 4*4*4 pairs masked.
    assert int((grid[3, 2] == MASKED).sum()) == 16 * 16 - 4 * 16
    # The last window of the first row: two regions side by side (columns 0-1 | 2-3).
    assert int((grid[0, 2] == MASKED).sum()) == 2 * 8 * 8
    # As written into the tiny file's attn_mask buffer by its own loop, for its 16x16 size.
    written = tiny.swinir_buffers(tiny.SWINIR_REAL)["layers.0.residual_group.blocks.1.attn_mask"]
    assert torch.equal(shift_mask(16, 16, 4, 2), written)


# -------------------------------------------------------------------------------- recognition


@pytest.mark.parametrize("label", list(SHAPES))
def test_the_keys_give_the_config_and_every_weight_is_used(label: str) -> None:
    shape = SHAPES[label]
    state = tiny.swinir_state(shape, 0, "test")
    arch, args, weights = recognise({"params_ema": state}["params_ema"])
    config = args["config"]
    assert (arch.kind, arch.scale) == ("SwinIR", shape.scale)
    assert config.embed_dim == shape.dim and config.window == shape.window
    assert config.depths == shape.depths and config.num_heads == shape.heads
    assert config.mlp_hidden == shape.mlp_hidden and config.resi_connection == shape.resi
    assert config.upsampler == shape.upsampler
    assert config.img_range == (255.0 if shape.window == 7 else 1.0)
    # Every parameter of the file loads (strict); only the derived buffers are left out.
    model = build(arch, args, weights)
    dropped = set(state) - set(weights)
    assert all(k.endswith(("attn_mask", "relative_position_index")) for k in dropped)
    assert set(model.state_dict()) == set(weights)


def _unsupported(state: dict[str, torch.Tensor]) -> str:
    with pytest.raises(Unsupported) as err:
        arch, args, weights = recognise(state)
        build(arch, args, weights)
    return str(err.value)


def test_files_swinir_does_not_run_say_why() -> None:
    state = tiny.swinir_state(tiny.SWINIR_CLASSICAL, 0, "test")
    gray = {**state, "conv_first.weight": torch.zeros(12, 1, 3, 3)}
    assert "1 input channels" in _unsupported(gray)
    missing = {k: v for k, v in state.items() if not k.endswith("blocks.1.mlp.fc2.weight")}
    assert "do not fit" in _unsupported(missing)
    extra = {**state, "layers.0.residual_group.blocks.0.attn.extra": torch.zeros(3)}
    assert "do not fit" in _unsupported(extra)
    index = "layers.0.residual_group.blocks.0.attn.relative_position_index"
    assert "not SwinIR's" in _unsupported({**state, index: state[index].flip(0)})
    # Layouts that share SwinIR's block keys but are other networks.
    swin2sr = {**state, "layers.0.residual_group.blocks.0.attn.logit_scale": torch.zeros(3)}
    assert "a Swin2SR model" in _unsupported(swin2sr)
    hat = {**state, "layers.0.residual_group.overlap_attn.qkv.weight": torch.zeros(3)}
    assert "a HAT-like model without" in _unsupported(hat)


# ---------------------------------------------------------------------------- the catalog


@pytest.fixture(scope="module")
def catalog(tiny_models_dir: Path) -> UpscalerCatalog:
    return UpscalerCatalog.scan(sorted((tiny_models_dir / "upscalers").iterdir()))


def test_tiny_files_are_listed_under_webuis_names(
    catalog: UpscalerCatalog, tiny_models_dir: Path, tmp_path: Path
) -> None:
    assert catalog.files[REAL].path.name == "SwinIR_4x.pth"
    assert (catalog.files[REAL].scale, catalog.files[CLASSICAL].scale) == (4, 2)
    assert catalog.kind(REAL).tile_options == ("SWIN_tile", "SWIN_tile_overlap")
    # The release file name gets webui's name too; a copy beside it would take a taken name.
    release = tmp_path / "003_realSR_BSRGAN_DFOWMFC_s64w8_SwinIR-L_x4_GAN.pth"
    release.write_bytes((tiny_models_dir / tiny.FILES["swinir-real"]).read_bytes())
    alone = UpscalerCatalog.scan([release])
    assert alone.names == [REAL, "SwinIR_4x"] and [f.name for f in alone.listed] == [REAL]
    both = UpscalerCatalog.scan([tiny_models_dir / tiny.FILES["swinir-real"], release])
    assert [f.name for f in both.listed] == [REAL] and "already taken" in both.skipped[release]


def test_swinir_runs_in_float32_under_a_half_catalog(tiny_models_dir: Path) -> None:
    # webui: spandrel's SwinIR has supports_half=False, so --half leaves it in float32.
    paths = sorted((tiny_models_dir / "upscalers").iterdir())
    half = UpscalerCatalog.scan(paths, dtype=torch.float16)
    assert next(half.model(REAL).parameters()).dtype == torch.float32
    assert next(half.model("R-ESRGAN 4x+").parameters()).dtype == torch.float16


def test_the_file_gives_the_same_pixels_as_the_network_from_its_weights(
    catalog: UpscalerCatalog, tiny_models_dir: Path
) -> None:
    state = read_weights(tiny_models_dir / tiny.FILES["swinir-real"])
    assert set(state) == set(tiny.swinir_state(tiny.SWINIR_REAL, 0, "swinir-real"))
    image = noise(24, 16, 1)
    out = upscale_2(catalog.model(REAL), image, tile=0)
    assert out.size == (96, 64) and levels(out).std() > 5
    # BGR in, BGR out, as webui feeds every upscaler.
    x = torch.from_numpy(np.ascontiguousarray(levels(image)[:, :, ::-1].transpose(2, 0, 1)))
    with torch.no_grad():
        y = catalog.model(REAL)(x[None].float() / 255).clamp(0, 1)[0]
    expected = (y.numpy().transpose(1, 2, 0)[:, :, ::-1] * 255).round()
    assert np.abs(levels(out) - expected).max() == 0


# ------------------------------------------------------------------- webui's upscale_2 tiling


class _TileMean(nn.Module):
    """x2 nearest upscale of each tile's mean: its output shows which tiles covered a pixel."""

    min_side = 16

    def __init__(self) -> None:
        super().__init__()
        self.anchor = nn.Parameter(torch.zeros(1))  # device and dtype for the input

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mean = x.mean(dim=(2, 3), keepdim=True)
        return mean.expand(-1, -1, x.shape[2] * 2, x.shape[3] * 2).clone()


def test_upscale_2_averages_tiles_at_webuis_positions() -> None:
    image = noise(40, 24, 3)
    out = levels(upscale_2(_TileMean(), image, tile=16, overlap=8))
    # webui: tile min(16, 24, 40) = 16, stride 8: rows [0, 8], columns [0, 8, 16, 24].
    x = np.asarray(image, dtype=np.float64)[:, :, ::-1] / 255  # BGR, as webui
    total, count = np.zeros((48, 80, 3)), np.zeros((48, 80, 1))
    for top in (0, 8):
        for left in (0, 8, 16, 24):
            mean = x[top : top + 16, left : left + 16].mean(axis=(0, 1))
            total[top * 2 : (top + 16) * 2, left * 2 : (left + 16) * 2] += mean
            count[top * 2 : (top + 16) * 2, left * 2 : (left + 16) * 2] += 1
    expected = np.round(total / count * 255)[:, :, ::-1]
    assert out.shape == (48, 80, 3)
    assert np.abs(out - expected).max() <= 1


def test_upscale_2_tile_over_the_image_equals_the_whole_and_small_tiles_stay_close(
    catalog: UpscalerCatalog,
) -> None:
    model = catalog.model(REAL)
    image = noise(40, 32, 4)
    whole = levels(upscale_2(model, image, tile=0))
    # min(tile, height, width): on a square image a large tile is the whole image.
    square = noise(32, 32, 5)
    assert np.array_equal(
        levels(upscale_2(model, square, tile=192)), levels(upscale_2(model, square, tile=0))
    )
    tiled = levels(upscale_2(model, image, tile=16, overlap=8))
    assert tiled.shape == whole.shape == (128, 160, 3)
    # Each tile's attention sees less context, so the pixels move, but far less than they do
    # for another picture.
    other = levels(upscale_2(model, noise(40, 32, 5), tile=0))
    change, unrelated = np.abs(tiled - whole).mean(), np.abs(other - whole).mean()
    assert 0 < change < unrelated / 2, (change, unrelated)


def test_upscale_2_with_an_overlap_as_large_as_the_image_runs_it_whole(
    catalog: UpscalerCatalog,
) -> None:
    model = catalog.model(CLASSICAL)
    image = noise(12, 8, 6)  # tile min(16, 8, 12) = 8, overlap 8: webui's stride would be 0
    out = upscale_2(model, image, tile=16, overlap=8)
    assert np.array_equal(levels(out), levels(upscale_2(model, image, tile=0)))


# ---------------------------------------------------------------------- through the engine


def run(engine: Engine, endpoint: str, body: str) -> tuple[list[bytes], str]:
    response = engine.handle(endpoint, body, lambda step, total: None)
    return [image.data for image in response.images], response.info


HIRES = {"enable_hr": True, "hr_scale": 2, "denoising_strength": 0, "hr_second_pass_steps": 1}


def test_hires_fix_with_swinir_4x_and_its_tile_options(engine: Engine) -> None:
    lanczos, _ = run(engine, "txt2img", payload(hr_upscaler="Lanczos", **HIRES))
    swinir, info = run(engine, "txt2img", payload(hr_upscaler=REAL, **HIRES))
    assert pixels(swinir[0]).size == (128, 128)
    assert_pixels_changed(lanczos, swinir)
    assert f"Hires upscaler: {REAL}" in json.loads(info)["infotexts"][0]
    # SWIN_tile is SwinIR's option (64x64 first pass: one tile at 192, four+ at 32);
    # ESRGAN_tile does not touch it.
    small, _ = run(
        engine,
        "txt2img",
        payload(hr_upscaler=REAL, override_settings={"SWIN_tile": 32}, **HIRES),
    )
    esrgan, _ = run(
        engine,
        "txt2img",
        payload(hr_upscaler=REAL, override_settings={"ESRGAN_tile": 0}, **HIRES),
    )
    assert_pixels_changed(swinir, small)
    assert np.array_equal(levels(pixels(swinir[0])), levels(pixels(esrgan[0])))


def test_webuis_name_for_the_saved_download_is_the_same_upscaler(engine: Engine) -> None:
    # A restarted webui lists its downloaded SwinIR_4x.pth by the stem: payloads copied from
    # it say "SwinIR_4x". Same file, same model, same picture; listed once.
    named, _ = run(engine, "txt2img", payload(hr_upscaler=REAL, **HIRES))
    stem, info = run(engine, "txt2img", payload(hr_upscaler="SwinIR_4x", **HIRES))
    assert np.array_equal(levels(pixels(named[0])), levels(pixels(stem[0])))
    assert "Hires upscaler: SwinIR_4x" in json.loads(info)["infotexts"][0]
    catalog = engine.models.upscalers
    assert catalog.model("SwinIR_4x") is catalog.model(REAL)
    names = [row["name"] for row in engine.handle("upscalers", "").listing]
    assert REAL in names and "SwinIR_4x" not in names


def test_swin_tile_option_range_is_checked(engine: Engine) -> None:
    with pytest.raises(RequestError) as err:
        run(engine, "txt2img", payload(override_settings={"SWIN_tile": 8}))
    text = str(err.value)
    assert "SWIN_tile: got 8" in text and "from 16 to 512" in text, text


def test_img2img_upscaler_for_img2img_swinir(engine: Engine) -> None:
    init = b64_png(card_image(32, 32))
    body = {"init_images": [init], "denoising_strength": 0.0, "width": 64, "height": 64}
    lanczos, _ = run(
        engine, "img2img", payload(override_settings={"upscaler_for_img2img": "Lanczos"}, **body)
    )
    swinir, _ = run(
        engine, "img2img", payload(override_settings={"upscaler_for_img2img": REAL}, **body)
    )
    assert_pixels_changed(lanczos, swinir)


def test_extras_with_both_swinir_files_and_the_listing(engine: Engine) -> None:
    image = card_image(40, 24)
    response = engine.handle(
        "extra-single-image",
        json.dumps({"image": b64_png(image), "upscaler_1": CLASSICAL, "upscaling_resize": 2}),
    )
    out = pixels(response.images[0].data)
    assert out.size == (80, 48)
    assert response.info == f"<p>Postprocess upscale by: 2.0, Postprocess upscaler: {CLASSICAL}</p>"
    lanczos = image.resize((80, 48), Image.Resampling.LANCZOS)
    assert np.abs(levels(out) - levels(lanczos)).mean() > 1
    rows = {row["name"]: row for row in engine.handle("upscalers", "").listing}
    assert rows[REAL]["model_name"] == "SwinIR 4x" and rows[REAL]["scale"] == 4.0
    assert rows[CLASSICAL]["model_name"] == "SwinIR 4x" and rows[CLASSICAL]["scale"] == 2.0
    assert REAL not in [row["name"] for row in engine.handle("realesrgan-models", "").listing]
