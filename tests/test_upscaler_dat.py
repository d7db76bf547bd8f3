"""DAT upscaler files (engine/upscaler_dat.py): the network against spandrel's DAT (what webui
runs) on the same random weights, the window/offset/mask facts, recognition from the keys,
webui's upscale_with_model tiling with the DAT_tile options, and "DAT x4" through hires fix,
img2img and the extras endpoints."""

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
from engine.upscaler_dat import (
    MASKED,
    _SpatialAttention,
    _WindowBranch,
    from_windows,
    is_shifted,
    relative_offsets,
    relative_position_index,
    shift_mask,
    to_windows,
)
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

# spandrel's DAT calls torch.meshgrid without `indexing` (a deprecation warning).
pytestmark = pytest.mark.filterwarnings("ignore:torch.meshgrid:UserWarning")

NAME = "DAT x4"  # tiny.DAT_X4, written as DAT_x4.pth

# Both upsamplers and residual-conv forms, the published variants' distinguishing traits
# (DAT-S/DAT: wider rectangular windows, DAT-2: expansion 2, DAT-light: pixelshuffledirect and
# one-block groups), x2/x3/x4, with and without qkv bias.
SHAPES = {
    "x4 pixelshuffle (the tiny file)": tiny.DAT_X4,
    "x2 pixelshuffle, 3conv": tiny.DATShape("pixelshuffle", 2, resi="3conv"),
    "x3 pixelshuffle, no qkv bias": tiny.DATShape("pixelshuffle", 3, qkv_bias=False),
    "x2 pixelshuffledirect, one-block group (light)": tiny.DATShape(
        "pixelshuffledirect", 2, resi="3conv", depths=(4, 1), heads=(4, 2)
    ),
    "x2 window 4x8, 6+5 blocks, expansion 4": tiny.DATShape(
        "pixelshuffle", 2, dim=128, depths=(6, 5), heads=(8, 4), split=(4, 8), expansion=4.0
    ),
}
# The training size (the stored masks' size), sizes off the window multiple, and under
# spandrel's 16-pixel minimum.
SIZES = [(16, 16), (24, 20), (13, 9), (5, 30)]


def model_of(shape: tiny.DATShape, seed: int = 0) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    state = tiny.dat_state(shape, seed, "test")
    arch, args, weights = recognise(state)
    return build(arch, args, weights), state


# ------------------------------------------------------------------ the independent reference


@pytest.fixture(scope="module")
def spandrel_arch() -> Any:
    return reference_arch("DAT")


@pytest.mark.parametrize("label", list(SHAPES))
def test_the_network_matches_spandrels_dat_on_the_same_weights(
    spandrel_arch: Any, label: str
) -> None:
    shape = SHAPES[label]
    mine, state = model_of(shape)
    reference = spandrel_arch.load(dict(state))  # spandrel infers its own hyperparameters
    reference.model.eval()  # (its DropPath is random in training mode)
    assert reference.scale == mine.config.scale == shape.scale  # type: ignore[union-attr]
    assert not reference.supports_half  # why webui runs DAT in float32
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
        # The picture is not flat: a wrong mask, shift or offset would show.
        assert ours.std() > 0.05


def test_a_wrong_shift_or_window_would_be_seen_by_the_reference(spandrel_arch: Any) -> None:
    # The reference comparison can fail: without the shift (and so without the mask), or with
    # the second branch on the first one's window, the output moves far beyond the tolerance.
    x = torch.rand(1, 3, 24, 20, generator=torch.Generator().manual_seed(2))
    for change in ("no shift", "one window"):
        mine, state = model_of(tiny.DAT_X4)
        reference = spandrel_arch.load(dict(state))
        reference.model.eval()
        for module in mine.modules():
            if change == "no shift" and isinstance(module, _SpatialAttention):
                module.shifted = False
            if change == "one window" and isinstance(module, _SpatialAttention):
                first, second = module.attns
                assert isinstance(first, _WindowBranch) and isinstance(second, _WindowBranch)
                second.wh, second.ww = first.wh, first.ww
                second.register_buffer("index", first.get_buffer("index"), persistent=False)
                second.register_buffer(
                    "rpe_biases", first.get_buffer("rpe_biases"), persistent=False
                )
        with torch.no_grad():
            assert (mine(x) - reference.model(x)).abs().max() > 1e-2, change


# ------------------------------------------------------------------------- hand-computed facts


def test_windows_round_trip_in_row_major_order() -> None:
    x = torch.arange(2 * 8 * 12 * 3, dtype=torch.float32).view(2, 8, 12, 3)
    windows = to_windows(x, 2, 4)
    assert windows.shape == (2, 4 * 3, 8, 3)
    # The second window of the first image is rows 0..1, columns 4..7.
    assert torch.equal(windows[0, 1].view(2, 4, 3), x[0, 0:2, 4:8])
    assert torch.equal(windows[1, 3].view(2, 4, 3), x[1, 2:4, 0:4])
    assert torch.equal(from_windows(windows, 2, 4, 8, 12), x)


def test_offsets_and_index_are_the_published_tables() -> None:
    # tiny's buffers are written from the published formulas by their own loops.
    for split in ((2, 4), (8, 16), (8, 32)):
        buffers = tiny.dat_buffers(tiny.DATShape("pixelshuffle", 2, split=split, depths=(1,)))
        for branch, (wh, ww) in enumerate((split, split[::-1])):
            prefix = f"layers.0.blocks.0.attn.attns.{branch}."
            offsets, index = relative_offsets(wh, ww), relative_position_index(wh, ww)
            assert torch.equal(offsets, buffers[prefix + "rpe_biases"])
            assert torch.equal(index, buffers[prefix + "relative_position_index"])
            assert offsets.shape == ((2 * wh - 1) * (2 * ww - 1), 2)
            # The last offset is (wh-1, ww-1): how spandrel reads the window from a file.
            assert offsets[-1].tolist() == [wh - 1, ww - 1]
            # A token against itself: offset (0, 0), the middle row.
            middle = (wh - 1) * (2 * ww - 1) + ww - 1
            assert torch.equal(index.diagonal(), torch.full((wh * ww,), middle))
            assert offsets[middle].tolist() == [0, 0]


def test_shift_mask_separates_only_the_wrapped_regions() -> None:
    mask = shift_mask(8, 16, 2, 4)
    assert mask.shape == (4 * 4, 8, 8)
    assert set(mask.unique().tolist()) == {0.0, MASKED}
    assert torch.equal(mask, mask.transpose(1, 2))
    grid = mask.view(4, 4, 8, 8)
    # Windows away from the last row and column see one region only.
    assert not grid[:3, :3].any()
    # The bottom-right window holds four regions of 2 tokens (1 row x 2 columns each).
    assert int((grid[3, 3] == MASKED).sum()) == 64 - 4 * 2 * 2
    # As written into the tiny file's attn_mask buffers by its own loop, for its 16x16 size.
    buffers = tiny.dat_buffers(tiny.DAT_X4)
    assert torch.equal(shift_mask(16, 16, 2, 4), buffers["layers.0.blocks.2.attn.attn_mask_0"])
    assert torch.equal(shift_mask(16, 16, 4, 2), buffers["layers.0.blocks.2.attn.attn_mask_1"])


def test_which_spatial_blocks_are_shifted() -> None:
    # DAT: in even groups blocks 2, 6, 10, ...; in odd groups blocks 0, 4, 8, ...
    even = [j for j in range(0, 12, 2) if is_shifted(0, j)]
    odd = [j for j in range(0, 12, 2) if is_shifted(1, j)]
    assert (even, odd) == ([2, 6, 10], [0, 4, 8])
    # The files carry masks exactly for those blocks.
    masks = {k for k in tiny.dat_buffers(tiny.DAT_X4) if k.endswith("attn_mask_0")}
    assert masks == {"layers.0.blocks.2.attn.attn_mask_0", "layers.1.blocks.0.attn.attn_mask_0"}


# -------------------------------------------------------------------------------- recognition


@pytest.mark.parametrize("label", list(SHAPES))
def test_the_keys_give_the_config_and_every_weight_is_used(label: str) -> None:
    shape = SHAPES[label]
    state = tiny.dat_state(shape, 0, "test")
    arch, args, weights = recognise(state)
    config = args["config"]
    assert (arch.kind, arch.scale) == ("DAT", shape.scale)
    assert config.embed_dim == shape.dim and config.split == shape.split
    assert config.depths == shape.depths
    assert config.spatial_heads == tuple(h // 2 for h in shape.heads)
    assert config.hidden == shape.hidden and config.pos_dim == shape.pos_dim
    assert config.resi_connection == shape.resi and config.upsampler == shape.upsampler
    assert config.qkv_bias == shape.qkv_bias
    # Every parameter and BatchNorm statistic of the file loads (strict); only the derived
    # buffers are left out.
    model = build(arch, args, weights)
    dropped = set(state) - set(weights)
    assert dropped and all(
        k.endswith(("attn_mask_0", "attn_mask_1", "rpe_biases", "relative_position_index"))
        for k in dropped
    )
    assert set(model.state_dict()) == set(weights)


def _unsupported(state: dict[str, torch.Tensor]) -> str:
    with pytest.raises(Unsupported) as err:
        arch, args, weights = recognise(state)
        build(arch, args, weights)
    return str(err.value)


def test_files_dat_does_not_run_say_why() -> None:
    state = tiny.dat_state(tiny.DAT_X4, 0, "test")
    gray = {**state, "conv_first.weight": torch.zeros(64, 1, 3, 3)}
    assert "1 input channels" in _unsupported(gray)
    missing = {k: v for k, v in state.items() if not k.endswith("blocks.1.ffn.fc2.weight")}
    assert "do not fit" in _unsupported(missing)
    extra = {**state, "layers.0.blocks.0.attn.extra": torch.zeros(3)}
    assert "do not fit" in _unsupported(extra)
    index = "layers.0.blocks.0.attn.attns.1.relative_position_index"
    assert "not DAT's" in _unsupported({**state, index: state[index].flip(0)})
    offsets = "layers.0.blocks.0.attn.attns.0.rpe_biases"
    no_offsets = {k: v for k, v in state.items() if k != offsets}
    assert "window size is unknown" in _unsupported(no_offsets)
    assert "3x4 window" in _unsupported({**state, offsets: relative_offsets(3, 4)})
    unnormed = {k: v for k, v in state.items() if not k.startswith("before_RG.")}
    assert "without before_RG.1.weight" in _unsupported(unnormed)


# ---------------------------------------------------------------------------- the catalog


@pytest.fixture(scope="module")
def catalog(tiny_models_dir: Path) -> UpscalerCatalog:
    return UpscalerCatalog.scan(sorted((tiny_models_dir / "upscalers").iterdir()))


def test_the_tiny_file_is_listed_under_webuis_name(
    catalog: UpscalerCatalog, tiny_models_dir: Path, tmp_path: Path
) -> None:
    assert catalog.files[NAME].path.name == "DAT_x4.pth"
    assert catalog.files[NAME].scale == 4
    assert catalog.kind(NAME).tile_options == ("DAT_tile", "DAT_tile_overlap")
    assert catalog.kind(NAME).tiling == "grid"
    # A restarted webui lists the saved download by its stem too: same file, same model.
    assert catalog.model("DAT_x4") is catalog.model(NAME)
    assert "DAT_x4" not in [f.name for f in catalog.listed]
    # Any other DAT file is named by its stem.
    other = tmp_path / "4xNomos8kDAT.pth"
    other.write_bytes((tiny_models_dir / tiny.FILES["dat"]).read_bytes())
    assert UpscalerCatalog.scan([other]).names == ["4xNomos8kDAT"]


def test_dat_runs_in_float32_under_a_half_catalog(tiny_models_dir: Path) -> None:
    # webui: spandrel's DAT has supports_half=False, so --half leaves it in float32.
    half = UpscalerCatalog.scan([tiny_models_dir / tiny.FILES["dat"]], dtype=torch.float16)
    assert next(half.model(NAME).parameters()).dtype == torch.float32


def test_the_file_gives_the_same_pixels_as_the_network_from_its_weights(
    catalog: UpscalerCatalog, tiny_models_dir: Path
) -> None:
    state = read_weights(tiny_models_dir / tiny.FILES["dat"])
    assert set(state) == set(tiny.dat_state(tiny.DAT_X4, 0, "dat"))
    image = noise(24, 16, 1)
    out = upscale_with_model(catalog.model(NAME), image, tile=0)
    assert out.size == (96, 64) and levels(out).std() > 5
    # BGR in, BGR out, as webui feeds every upscaler.
    x = torch.from_numpy(np.ascontiguousarray(levels(image)[:, :, ::-1].transpose(2, 0, 1)))
    with torch.no_grad():
        y = catalog.model(NAME)(x[None].float() / 255).clamp(0, 1)[0]
    expected = (y.numpy().transpose(1, 2, 0)[:, :, ::-1] * 255).round()
    assert np.abs(levels(out) - expected).max() == 0


# ------------------------------------------------------ webui's upscale_with_model tiling


def test_tiles_blend_close_to_the_whole_and_small_tiles_are_padded_to_16(
    catalog: UpscalerCatalog, spandrel_arch: Any
) -> None:
    model = catalog.model(NAME)
    image = noise(40, 32, 4)
    whole = levels(upscale_with_model(model, image, tile=0))
    tiled = levels(upscale_with_model(model, image, tile=24, overlap=8))
    assert tiled.shape == whole.shape == (128, 160, 3)
    # Each tile's attention sees less context, so the pixels move, but far less than they do
    # for another picture.
    other = levels(upscale_with_model(model, noise(40, 32, 5), tile=0))
    change, unrelated = np.abs(tiled - whole).mean(), np.abs(other - whole).mean()
    assert 0 < change < unrelated / 2, (change, unrelated)
    # An 8-pixel tile (DAT_tile may go down to 0) is run as spandrel runs it: padded to 16
    # (reflected), the output cut back. The reference's descriptor gives the same pixels.
    reference = spandrel_arch.load(dict(read_weights(catalog.files[NAME].path)))
    reference.model.eval()
    piece = noise(8, 8, 6)
    x = torch.from_numpy(np.ascontiguousarray(levels(piece)[:, :, ::-1].transpose(2, 0, 1)))
    with torch.no_grad():
        theirs = reference(x[None].float() / 255)[0]
    expected = (theirs.numpy().transpose(1, 2, 0)[:, :, ::-1] * 255).round()
    ours = levels(upscale_with_model(model, piece, tile=0))
    assert ours.shape == (32, 32, 3) and np.abs(ours - expected).max() <= 1


# ---------------------------------------------------------------------- through the engine


def run(engine: Engine, endpoint: str, body: str) -> tuple[list[bytes], str]:
    response = engine.handle(endpoint, body, lambda step, total: None)
    return [image.data for image in response.images], response.info


HIRES = {"enable_hr": True, "hr_scale": 2, "denoising_strength": 0, "hr_second_pass_steps": 1}


def test_hires_fix_with_dat_x4_and_its_tile_options(engine: Engine) -> None:
    lanczos, _ = run(engine, "txt2img", payload(hr_upscaler="Lanczos", **HIRES))
    dat, info = run(engine, "txt2img", payload(hr_upscaler=NAME, **HIRES))
    assert pixels(dat[0]).size == (128, 128)
    assert_pixels_changed(lanczos, dat)
    assert f"Hires upscaler: {NAME}" in json.loads(info)["infotexts"][0]
    # DAT_tile is DAT's option (64x64 first pass: one tile at 192, several at 32); the
    # ESRGAN and SwinIR options do not touch it.
    small, _ = run(
        engine, "txt2img", payload(hr_upscaler=NAME, override_settings={"DAT_tile": 32}, **HIRES)
    )
    others, _ = run(
        engine,
        "txt2img",
        payload(hr_upscaler=NAME, override_settings={"ESRGAN_tile": 32, "SWIN_tile": 32}, **HIRES),
    )
    assert_pixels_changed(dat, small)
    assert np.array_equal(levels(pixels(dat[0])), levels(pixels(others[0])))


def test_webuis_stem_name_for_the_saved_download_is_the_same_upscaler(engine: Engine) -> None:
    named, _ = run(engine, "txt2img", payload(hr_upscaler=NAME, **HIRES))
    stem, info = run(engine, "txt2img", payload(hr_upscaler="DAT_x4", **HIRES))
    assert np.array_equal(levels(pixels(named[0])), levels(pixels(stem[0])))
    assert "Hires upscaler: DAT_x4" in json.loads(info)["infotexts"][0]


def test_dat_tile_option_ranges_are_checked(engine: Engine) -> None:
    for option, value, allowed in (
        ("DAT_tile", 513, "from 0 to 512"),
        ("DAT_tile_overlap", 49, "from 0 to 48"),
    ):
        with pytest.raises(RequestError) as err:
            run(engine, "txt2img", payload(override_settings={option: value}))
        text = str(err.value)
        assert f"{option}: got {value}" in text and allowed in text, text


def test_img2img_upscaler_for_img2img_dat(engine: Engine) -> None:
    init = b64_png(card_image(32, 32))
    body = {"init_images": [init], "denoising_strength": 0.0, "width": 64, "height": 64}
    lanczos, _ = run(
        engine, "img2img", payload(override_settings={"upscaler_for_img2img": "Lanczos"}, **body)
    )
    dat, _ = run(
        engine, "img2img", payload(override_settings={"upscaler_for_img2img": NAME}, **body)
    )
    assert_pixels_changed(lanczos, dat)


def test_extras_with_dat_and_the_listing(engine: Engine) -> None:
    image = card_image(40, 24)
    response = engine.handle(
        "extra-single-image",
        json.dumps({"image": b64_png(image), "upscaler_1": NAME, "upscaling_resize": 2}),
    )
    out = pixels(response.images[0].data)
    assert out.size == (80, 48)
    assert response.info == f"<p>Postprocess upscale by: 2.0, Postprocess upscaler: {NAME}</p>"
    lanczos = image.resize((80, 48), Image.Resampling.LANCZOS)
    assert np.abs(levels(out) - levels(lanczos)).mean() > 1
    rows = {row["name"]: row for row in engine.handle("upscalers", "").listing}
    # webui's UpscalerDAT sets no model_name.
    assert rows[NAME]["model_name"] is None and rows[NAME]["scale"] == 4.0
    assert rows[NAME]["model_path"].endswith("DAT_x4.pth") and "DAT_x4" not in rows
