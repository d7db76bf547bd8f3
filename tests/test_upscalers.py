"""Upscaler models (upscalers/ folder): architectures, loading, tiling, hires fix, img2img,
the extras endpoints and the listings, on the tiny random-weight files of
scripts/make_tiny_upscalers.py."""

from __future__ import annotations

import base64
import io
import json
import pickle
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from engine.api import Engine
from engine.errors import RequestError
from engine.upscaler_models import (
    UpscalerCatalog,
    build,
    read_weights,
    recognise,
    upscale_with_model,
)
from scripts import make_tiny_upscalers as tiny

from .helpers import assert_pixels_changed, b64_png, card_image, payload, pixels

# file key -> (webui name, native scale)
FILES = {
    "esrgan-old": ("4x-tiny-esrgan", 4),
    "esrgan-new": ("R-ESRGAN 4x+", 4),
    "esrgan-x2": ("R-ESRGAN 2x+", 2),
    "srvgg": ("R-ESRGAN General 4xV3", 4),
    "swinir-real": ("SwinIR 4x", 4),
    "swinir-classical": ("001_classicalSR_DF2K_s64w8_SwinIR-M_x2", 2),
}
FAST = "R-ESRGAN General 4xV3"  # the SRVGGNetCompact file: the cheapest to run


def noise(width: int, height: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray((rng.random((height, width, 3)) * 255).astype(np.uint8))


def levels(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.int16)


@pytest.fixture(scope="module")
def catalog(tiny_models_dir: Path) -> UpscalerCatalog:
    return UpscalerCatalog.scan(sorted((tiny_models_dir / "upscalers").iterdir()))


# ------------------------------------------------------------------------ architectures


def test_every_tiny_file_is_listed_under_webuis_name(catalog: UpscalerCatalog) -> None:
    assert sorted(f.name for f in catalog.listed) == sorted(name for name, _ in FILES.values())
    # Requests may also use webui's other name for SwinIR's download (not listed).
    assert sorted(catalog.names) == sorted([*(name for name, _ in FILES.values()), "SwinIR_4x"])
    assert catalog.skipped == {}
    for name, scale in FILES.values():
        assert catalog.files[name].scale == scale


@pytest.mark.parametrize("key", list(FILES))
def test_each_architecture_upscales_by_its_scale_and_follows_the_input(
    catalog: UpscalerCatalog, key: str
) -> None:
    name, scale = FILES[key]
    model = catalog.model(name)
    a = upscale_with_model(model, noise(24, 16, 1), tile=0)
    b = upscale_with_model(model, noise(24, 16, 2), tile=0)
    assert a.size == b.size == (24 * scale, 16 * scale)
    # A working network: the picture varies, and another input gives another picture.
    assert levels(a).std() > 5
    assert np.abs(levels(a) - levels(b)).mean() > 2


def test_half_precision_stays_within_two_levels_of_float32(tiny_models_dir: Path) -> None:
    # A CUDA placement runs the models in fp16; here the same dtype on the CPU.
    paths = sorted((tiny_models_dir / "upscalers").iterdir())
    full = UpscalerCatalog.scan(paths)
    half = UpscalerCatalog.scan(paths, dtype=torch.float16)
    image = noise(24, 16, 9)
    for name in full.names:
        a = levels(upscale_with_model(full.model(name), image, tile=0))
        b = levels(upscale_with_model(half.model(name), image, tile=0))
        assert np.abs(a - b).max() <= 2, name


def test_original_and_basicsr_layouts_are_the_same_network(tiny_models_dir: Path) -> None:
    # The original ESRGAN keys renamed by hand into BasicSR's must run identically.
    old = read_weights(tiny_models_dir / tiny.FILES["esrgan-old"])
    renamed: dict[str, torch.Tensor] = {}
    tail = {"0": "conv_first", "3": "conv_up1", "6": "conv_up2", "8": "conv_hr", "10": "conv_last"}
    for key, value in old.items():
        parts = key.split(".")
        if parts[1] == "1" and parts[3] == str(tiny.BLOCKS):
            renamed[f"conv_body.{parts[-1]}"] = value
        elif parts[1] == "1":
            block, rdb, conv = parts[3], parts[4][3], parts[5][4]
            renamed[f"body.{block}.rdb{rdb}.conv{conv}.{parts[-1]}"] = value
        else:
            renamed[f"{tail[parts[1]]}.{parts[-1]}"] = value
    x = torch.rand(1, 3, 12, 10)
    outputs = []
    for sd in (old, renamed):
        arch, args, keys = recognise(sd)
        assert (arch.kind, arch.scale) == ("ESRGAN", 4)
        outputs.append(build(arch, args, keys)(x))
    assert torch.equal(outputs[0], outputs[1])


def test_x2_model_sees_a_pixel_unshuffled_input(catalog: UpscalerCatalog) -> None:
    model = catalog.model("R-ESRGAN 2x+")
    assert model.conv_first.in_channels == 12  # type: ignore[union-attr]
    assert upscale_with_model(model, noise(20, 14), tile=0).size == (40, 28)
    # Odd sides are reflect-padded for the unshuffle and cut back (Real-ESRGAN's mod_pad).
    odd = upscale_with_model(model, noise(21, 15), tile=0)
    assert odd.size == (42, 30)


# ------------------------------------------------------------------------------ tiling


def test_one_tile_covering_the_image_equals_no_tiling(catalog: UpscalerCatalog) -> None:
    model = catalog.model(FAST)
    image = noise(48, 48, 3)
    whole = upscale_with_model(model, image, tile=0)
    tiled = upscale_with_model(model, image, tile=48, overlap=8)
    assert np.array_equal(levels(whole), levels(tiled))


def test_tiled_output_matches_away_from_seams_and_stays_close_at_them(
    catalog: UpscalerCatalog,
) -> None:
    # SRVGGNetCompact's receptive field is 4 input pixels (four 3x3 convs): away from the tile
    # edges a tile sees what the whole image sees. Tiles of 32 overlapping by 8 on 80x48.
    model = catalog.model(FAST)
    image = noise(80, 48, 4)
    whole = levels(upscale_with_model(model, image, tile=0))
    tiled = levels(upscale_with_model(model, image, tile=32, overlap=8))
    assert whole.shape == tiled.shape == (192, 320, 3)
    diff = np.abs(whole - tiled).max(axis=2)
    # webui's split_grid: tiles at x = 0, 24, 48 and y = 0, 16. Within 8 input pixels of an
    # inner tile edge (4 of receptive field + the 8-pixel blend) a tile saw less than the whole.
    near = np.zeros(diff.shape, dtype=bool)
    for edge in (24, 32, 48, 56):
        near[:, (edge - 8) * 4 : (edge + 8) * 4] = True
    for edge in (16, 32):
        near[(edge - 8) * 4 : (edge + 8) * 4, :] = True
    assert diff[~near].max() <= 1  # equal up to one level of float rounding
    assert 0 < (~near).mean() < 1
    # At the seams: webui's linear blend of two tiles that each saw a cut-off neighbourhood.
    assert diff.max() <= 32, diff.max()


def test_an_image_smaller_than_the_tile_is_padded_left_and_top_as_in_webui(
    catalog: UpscalerCatalog,
) -> None:
    # webui's split_grid puts a single tile at a negative offset: black padding on the left
    # and top, so only the right/bottom part matches the untiled output exactly.
    model = catalog.model(FAST)
    image = noise(40, 40, 5)
    whole = levels(upscale_with_model(model, image, tile=0))
    tiled = levels(upscale_with_model(model, image, tile=64, overlap=8))
    assert np.abs(whole[16:, 16:] - tiled[16:, 16:]).max() <= 1


def test_webuis_upscale_loop_passes_until_the_rounded_target(
    catalog: UpscalerCatalog, monkeypatch: pytest.MonkeyPatch
) -> None:
    import engine.upscaler_models as module

    sizes: list[tuple[int, int]] = []
    real = module.upscale_with_model

    def counted(model: Any, image: Image.Image, **kw: Any) -> Image.Image:
        sizes.append(image.size)
        return real(model, image, **kw)

    monkeypatch.setattr(module, "upscale_with_model", counted)
    # x2 model, factor 3 on 20x12: 2x -> 40x24, again -> 80x48 (>= 56x32), LANCZOS to the
    # target 60x36 rounded down to multiples of 8, 56x32 (webui's Upscaler.upscale).
    out = catalog.upscale("R-ESRGAN 2x+", noise(20, 12), 3.0, tile=0)
    assert sizes == [(20, 12), (40, 24)] and out.size == (56, 32)
    sizes.clear()
    # x4 model, factor 1.5: one pass (80x48 covers 30x18 -> 24x16), then LANCZOS down.
    assert catalog.upscale(FAST, noise(20, 12), 1.5, tile=0).size == (24, 16)
    assert sizes == [(20, 12)]


def test_hires_resize_runs_a_model_upscale_then_lanczos_to_the_size() -> None:
    from engine.geometry import upscale_pixels

    calls: list[tuple[tuple[int, int], float]] = []

    def model(image: Image.Image, scale: float) -> Image.Image:
        calls.append((image.size, scale))
        return image.resize((image.width * 4, image.height * 4), Image.Resampling.NEAREST)

    out = upscale_pixels(noise(32, 16), 80, 40, model)
    assert calls == [((32, 16), 2.5)] and out.size == (80, 40)


# ------------------------------------------------------------------ files that are skipped


def _hat_like() -> dict[str, torch.Tensor]:
    # HAT shares SwinIR's block keys and adds overlapping cross-attention.
    return {
        "conv_first.weight": torch.zeros(60, 3, 3, 3),
        "layers.0.residual_group.blocks.0.attn.relative_position_bias_table": torch.zeros(225, 6),
        "layers.0.residual_group.overlap_attn.qkv.weight": torch.zeros(180, 60),
    }


class _Payload:
    """A pickle that would create a file when unpickled without weights_only."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (Path.touch, (self.marker,))


def test_unsupported_files_are_skipped_with_their_reason_and_code_never_runs(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    folder = tmp_path / "upscalers"
    folder.mkdir()
    torch.save(_hat_like(), folder / "HAT_SRx4_ImageNet-pretrain.pth")
    torch.save({"weight": torch.zeros(3)}, folder / "mystery.pth")
    marker = tmp_path / "pwned"
    (folder / "evil.pth").write_bytes(pickle.dumps({"params": _Payload(marker)}))
    (folder / "truncated.safetensors").write_bytes(b"\x10\x00\x00")
    names = sorted(folder.iterdir())
    with caplog.at_level("WARNING"):
        catalog = UpscalerCatalog.scan(names, reserved=["Lanczos"])
    assert catalog.files == {}
    reasons = {path.name: reason for path, reason in catalog.skipped.items()}
    assert "a HAT model" in reasons["HAT_SRx4_ImageNet-pretrain.pth"]
    assert "supported here: ESRGAN" in reasons["mystery.pth"]
    assert "not a weights-only torch file" in reasons["evil.pth"]
    assert "safetensors" in reasons["truncated.safetensors"]
    assert not marker.exists()
    for name in reasons:
        assert any(name in r.message and "skipped" in r.message for r in caplog.records)


def test_only_files_inside_the_models_folder_are_found(
    tmp_path: Path, tiny_models_dir: Path
) -> None:
    from engine.catalog import Catalog

    outside = tmp_path / "outside.pth"
    outside.write_bytes((tiny_models_dir / tiny.FILES["srvgg"]).read_bytes())
    folder = tmp_path / "models" / "upscalers"
    folder.mkdir(parents=True)
    (folder / "escape.pth").symlink_to(outside)
    (folder / "inside.pth").write_bytes(outside.read_bytes())
    (folder / "notes.ckpt").write_bytes(b"not an upscaler suffix")
    found = Catalog.scan(tmp_path / "models").files("upscalers")
    assert [p.name for p in found] == ["inside.pth"]


def test_a_file_cannot_take_a_builtin_name(tmp_path: Path, tiny_models_dir: Path) -> None:
    source = tiny_models_dir / tiny.FILES["srvgg"]
    clash = tmp_path / "Lanczos.pth"
    clash.write_bytes(source.read_bytes())
    catalog = UpscalerCatalog.scan([clash], reserved=["None", "Lanczos", "Nearest"])
    assert catalog.files == {} and "already taken" in catalog.skipped[clash]


# ---------------------------------------------------------------------- through the engine


def run(engine: Engine, endpoint: str, body: str) -> tuple[list[bytes], str]:
    response = engine.handle(endpoint, body, lambda step, total: None)
    return [image.data for image in response.images], response.info


HIRES = {"enable_hr": True, "hr_scale": 2, "denoising_strength": 0.3, "hr_second_pass_steps": 2}


def test_hires_fix_with_a_model_upscaler_changes_the_picture_vs_lanczos(engine: Engine) -> None:
    lanczos, _ = run(engine, "txt2img", payload(hr_upscaler="Lanczos", **HIRES))
    model, info = run(engine, "txt2img", payload(hr_upscaler=FAST, **HIRES))
    assert pixels(model[0]).size == (128, 128)
    assert_pixels_changed(lanczos, model)
    assert f"Hires upscaler: {FAST}" in json.loads(info)["infotexts"][0]
    # Denoising 0 returns the upscaled first pass: the model's upscale, not Lanczos'.
    still = {**HIRES, "denoising_strength": 0}
    plain, _ = run(engine, "txt2img", payload(hr_upscaler="Lanczos", **still))
    upscaled, _ = run(engine, "txt2img", payload(hr_upscaler=FAST, **still))
    assert_pixels_changed(plain, upscaled)


def test_hires_tile_options_are_honoured(engine: Engine) -> None:
    # Tile 0 (no tiling) vs webui's 192 tiles: a 64x64 first pass in one padded tile differs
    # near the left/top edges only (then the VAE spreads it a little).
    tiled, _ = run(
        engine, "txt2img", payload(hr_upscaler=FAST, **{**HIRES, "denoising_strength": 0})
    )
    whole, _ = run(
        engine,
        "txt2img",
        payload(
            hr_upscaler=FAST,
            override_settings={"ESRGAN_tile": 0},
            **{**HIRES, "denoising_strength": 0},
        ),
    )
    a, b = levels(pixels(tiled[0])), levels(pixels(whole[0]))
    assert not np.array_equal(a, b)
    assert np.abs(a - b)[96:, 96:].mean() < np.abs(a - b)[:32, :32].mean()


def test_an_unknown_hr_upscaler_names_the_field_and_the_installed_models(engine: Engine) -> None:
    with pytest.raises(RequestError) as err:
        run(engine, "txt2img", payload(hr_upscaler="4x-UltraSharp", **HIRES))
    text = str(err.value)
    assert "hr_upscaler" in text and "'4x-UltraSharp'" in text
    assert "'R-ESRGAN 4x+'" in text and "'Latent'" in text and "'Lanczos'" in text


def test_img2img_upscaler_option_uses_the_model(engine: Engine) -> None:
    init = b64_png(card_image(32, 32))
    body = {"init_images": [init], "denoising_strength": 0.0, "width": 64, "height": 64}
    lanczos, _ = run(
        engine, "img2img", payload(override_settings={"upscaler_for_img2img": "Lanczos"}, **body)
    )
    model, _ = run(
        engine, "img2img", payload(override_settings={"upscaler_for_img2img": FAST}, **body)
    )
    assert_pixels_changed(lanczos, model)
    with pytest.raises(RequestError) as err:
        run(engine, "img2img", payload(override_settings={"upscaler_for_img2img": "x"}, **body))
    assert "upscaler_for_img2img" in str(err.value) and repr(FAST) in str(err.value)


# ------------------------------------------------------------------------------ extras


def extras(engine: Engine, endpoint: str, **body: Any) -> tuple[list[Image.Image], str]:
    response = engine.handle(endpoint, json.dumps(body))
    return [Image.open(io.BytesIO(i.data)) for i in response.images], response.info


def test_extras_single_image_by_factor_with_a_model(engine: Engine) -> None:
    image = card_image(40, 24)
    (out,), html_info = extras(
        engine, "extra-single-image", image=b64_png(image), upscaler_1=FAST, upscaling_resize=2
    )
    assert out.size == (80, 48)
    assert html_info == f"<p>Postprocess upscale by: 2.0, Postprocess upscaler: {FAST}</p>"
    assert out.info["postprocessing"] == html_info[3:-4]
    lanczos = image.resize((80, 48), Image.Resampling.LANCZOS)
    assert np.abs(levels(out) - levels(lanczos)).mean() > 1


def test_extras_single_image_to_a_size_with_crop_and_a_blended_second_upscaler(
    engine: Engine,
) -> None:
    image = noise(40, 20, 7)
    common = {"image": b64_png(image), "resize_mode": 1, "upscaling_resize_w": 64}
    (cropped,), info = extras(
        engine, "extra-single-image", upscaler_1="Lanczos", upscaling_resize_h=64, **common
    )
    # Factor max(64/40, 64/20) = 3.2 -> 128x64, centred on a 64x64 canvas.
    assert cropped.size == (64, 64)
    expected = image.resize((128, 64), Image.Resampling.LANCZOS).crop((32, 0, 96, 64))
    assert np.abs(levels(cropped) - levels(expected)).max() <= 1
    assert "Postprocess upscale to: 64x64, Postprocess crop to: 64x64" in info
    (blended,), info = extras(
        engine,
        "extra-single-image",
        upscaler_1="Lanczos",
        upscaler_2="Nearest",
        extras_upscaler_2_visibility=0.5,
        upscaling_resize_h=64,
        upscaling_crop=False,
        **common,
    )
    nearest = image.resize((128, 64), Image.Resampling.NEAREST)
    lanczos = image.resize((128, 64), Image.Resampling.LANCZOS)
    mix = (levels(nearest) + levels(lanczos)) / 2
    assert blended.size == (128, 64) and np.abs(levels(blended) - mix).max() <= 1
    assert info.endswith("Postprocess upscaler: Lanczos, Postprocess upscaler 2: Nearest</p>")


def test_extras_batch_round_trip_keeps_order_and_text_chunks(engine: Engine) -> None:
    first = Image.new("RGB", (16, 16), (200, 10, 10))
    second = card_image(24, 16)
    buffer = io.BytesIO()
    from PIL import PngImagePlugin

    meta = PngImagePlugin.PngInfo()
    meta.add_text("parameters", "a red square")
    first.save(buffer, format="PNG", pnginfo=meta)
    items = [
        {"data": base64.b64encode(buffer.getvalue()).decode(), "name": "a.png"},
        {"data": b64_png(second), "name": "b.png"},
    ]
    outs, info = extras(engine, "extra-batch-images", imageList=items, upscaler_1=FAST)
    assert [o.size for o in outs] == [(32, 32), (48, 32)]
    assert outs[0].info["parameters"] == "a red square"
    assert np.abs(levels(outs[0]).mean(axis=(0, 1)) - [200, 10, 10]).max() < 60
    assert info.startswith("<p>Postprocess upscale by: 2.0")


def test_extras_single_image_takes_the_playgrounds_init_image(
    engine: Engine, tmp_path: Path
) -> None:
    path = tmp_path / "init.png"
    card_image(24, 16).save(path)
    body = json.dumps({"upscaler_1": "Lanczos"})
    response = engine.handle("extra-single-image", body, playground={"init_image": path})
    assert Image.open(io.BytesIO(response.images[0].data)).size == (48, 32)


def test_extras_upscaler_none_returns_the_image_unchanged(engine: Engine) -> None:
    image = card_image(24, 16)
    (out,), info = extras(engine, "extra-single-image", image=b64_png(image))
    assert out.size == (24, 16) and np.array_equal(levels(out), levels(image))
    assert info == "<p></p>"


@pytest.mark.parametrize(
    ("changes", "field", "says"),
    [
        ({"upscaler_1": "4x-UltraSharp"}, "upscaler_1", "'R-ESRGAN 4x+'"),
        ({"upscaler_2": "nope"}, "upscaler_2", "'Lanczos'"),
        ({"gfpgan_visibility": 0.5}, "gfpgan_visibility", "face restoration"),
        ({"codeformer_visibility": 1}, "codeformer_visibility", "face restoration"),
        ({"resize_mode": 2}, "resize_mode", "allowed: 0"),
        ({"upscaling_resize": 0}, "upscaling_resize", "above 0"),
        ({"upscaler_1": "Lanczos", "upscaling_resize": 0.01}, "upscaling_resize", "too small"),
        ({"upscaler_1": "Lanczos", "upscaling_resize": 500}, "upscaling_resize", "pixels"),
        ({"upscaling_resize_w": 0}, "upscaling_resize_w", "at least 1"),
        ({"upscaler1": "Lanczos"}, "upscaler1", "not a field"),
        ({"image": ""}, "image", "required"),
        ({"image": "bm90IGFuIGltYWdl"}, "image", "PNG"),
    ],
)
def test_extras_errors_name_the_field_before_any_work(
    engine: Engine, changes: dict[str, Any], field: str, says: str
) -> None:
    body = {"image": b64_png(card_image(16, 16)), **changes}
    with pytest.raises(RequestError) as err:
        engine.handle("extra-single-image", json.dumps(body))
    text = str(err.value)
    assert f"{field}: got" in text and says in text, text


def test_extras_batch_is_bounded_by_the_image_limit(engine: Engine) -> None:
    items = [{"data": "x", "name": f"{i}.png"} for i in range(engine.limits.images + 1)]
    with pytest.raises(RequestError) as err:
        engine.handle("extra-batch-images", json.dumps({"imageList": items}))
    assert f"imageList: got '{engine.limits.images + 1} images'; at most" in str(err.value)


def test_extras_batch_needs_its_image_list(engine: Engine) -> None:
    with pytest.raises(RequestError) as err:
        engine.handle("extra-batch-images", json.dumps({"upscaler_1": "Lanczos"}))
    assert "imageList: got None; required" in str(err.value)


# ------------------------------------------------------------------------------ listings


def test_upscalers_listing_has_the_models_after_the_builtins(engine: Engine) -> None:
    rows = engine.handle("upscalers", "").listing
    names = [row["name"] for row in rows]
    assert names[:3] == ["None", "Lanczos", "Nearest"]
    assert names[3:] == sorted(names[3:], key=str.lower)
    by_name = {row["name"]: row for row in rows}
    assert by_name["R-ESRGAN 4x+"]["model_name"] is None
    assert by_name["R-ESRGAN 4x+"]["model_path"].endswith("upscalers/RealESRGAN_x4plus.pth")
    assert by_name["R-ESRGAN 2x+"]["scale"] == 2.0
    assert by_name["4x-tiny-esrgan"]["model_name"] == "ESRGAN_4x"
    assert all(row["model_url"] is None for row in rows)


def test_realesrgan_models_listing_names_the_installed_release_files(engine: Engine) -> None:
    rows = engine.handle("realesrgan-models", "").listing
    assert [row["name"] for row in rows] == [
        "R-ESRGAN General 4xV3",
        "R-ESRGAN 4x+",
        "R-ESRGAN 2x+",
    ]
    assert rows[1]["path"].endswith("RealESRGAN_x4plus.pth") and rows[1]["scale"] == 4
