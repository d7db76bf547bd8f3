"""webui's image geometry: resize modes, step arithmetic, hires targets, masks and paste-back.

Expected values are worked out by hand from webui's formulas (or built with plain PIL/numpy in
the test), never by calling the code under test twice.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter

from engine.errors import RequestError, UnknownName
from engine.geometry import (
    BLANK_MASK_COMMENT,
    LATENT_UPSCALE_MODES,
    RESIZE_MODES,
    CropRegion,
    binarize,
    blur_mask,
    crop_latent,
    expand_crop_region,
    fill_masked,
    finish_image,
    firstphase_to_hires,
    flatten,
    gaussian_kernel_size,
    hires_target,
    hr_upscaler_choice,
    img2img_steps,
    invert_mask,
    latent_mask,
    mask_crop_region,
    overlay_original,
    paste_back,
    prepare_init_image,
    prepare_mask,
    resize_image,
    resize_latent,
    upscale_latent,
    upscale_pixels,
)

RED = (255, 0, 0)
BLUE = (0, 0, 255)


def red_square_image() -> Image.Image:
    """100x50 blue image, red square x 40..59, y 10..39 (well inside, so LANCZOS ringing stays
    away from the pixels we look at)."""
    image = Image.new("RGB", (100, 50), BLUE)
    image.paste(RED, (40, 10, 60, 40))
    return image


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image).astype(np.int16)


def is_color(image: Image.Image, box: tuple[int, int, int, int], color: tuple[int, ...]) -> bool:
    x1, y1, x2, y2 = box
    region = pixels(image)[y1:y2, x1:x2]
    # LANCZOS rings by a few levels next to a sharp edge.
    return bool(np.all(np.abs(region - np.array(color)) <= 10))


# --------------------------------------------------------------------------------------------
# Resize modes
# --------------------------------------------------------------------------------------------


def test_resize_mode_names_are_webuis_labels():
    assert dict(RESIZE_MODES) == {
        0: "Just resize",
        1: "Crop and resize",
        2: "Resize and fill",
        3: "Just resize (latent upscale)",
    }


def test_just_resize_stretches_with_lanczos():
    image = red_square_image()
    out = resize_image(0, image, 50, 50)
    assert out.size == (50, 50)
    assert np.array_equal(
        np.asarray(out), np.asarray(image.resize((50, 50), Image.Resampling.LANCZOS))
    )
    # x halves, y stays: the square (40..59, 10..39) lands at (20..29, 10..39).
    assert is_color(out, (22, 12, 28, 38), RED)
    assert is_color(out, (0, 0, 15, 50), BLUE)
    assert is_color(out, (35, 0, 50, 50), BLUE)


def test_crop_and_resize_covers_then_crops_the_centre():
    image = red_square_image()
    # 100x50 into 50x50: cover keeps 100x50 (no scaling), centre crop x 25..74.
    out = resize_image(1, image, 50, 50)
    assert out.size == (50, 50)
    assert np.array_equal(np.asarray(out), np.asarray(image.crop((25, 0, 75, 50))))
    assert is_color(out, (15, 10, 35, 40), RED)


def test_crop_and_resize_scales_up_to_cover():
    image = red_square_image()
    # 100x50 into 100x100: cover scales to 200x100, crop x 50..149: square x 80..119 -> 30..69.
    out = resize_image(1, image, 100, 100)
    assert out.size == (100, 100)
    assert is_color(out, (35, 25, 65, 75), RED)
    assert is_color(out, (0, 0, 25, 100), BLUE)


def test_resize_and_fill_fits_centres_and_stretches_the_edges():
    # Left half green, right half blue, a red square inside; 100x50 into 100x100:
    # fits at 100x50 (no scaling), pasted at y 25..74; the bands y 0..24 and 75..99 repeat the
    # first / last row, so they are green on the left and blue on the right.
    image = Image.new("RGB", (100, 50), BLUE)
    image.paste((0, 255, 0), (0, 0, 50, 50))
    image.paste(RED, (60, 10, 80, 40))
    out = resize_image(2, image, 100, 100)
    assert out.size == (100, 100)
    assert np.array_equal(np.asarray(out)[25:75], np.asarray(image))
    for band in ((0, 0, 100, 25), (0, 75, 100, 100)):
        x1, y1, x2, y2 = band
        assert is_color(out, (x1, y1, 45, y2), (0, 255, 0))
        assert is_color(out, (55, y1, x2, y2), BLUE)


def test_resize_and_fill_side_bands():
    image = Image.new("RGB", (50, 100), BLUE)
    image.paste(RED, (0, 0, 50, 10))  # the top rows are red; the left column is red at the top
    out = resize_image(2, image, 100, 100)
    # Fits at 50x100, pasted at x 25..74; the side bands stretch the left/right columns.
    assert np.array_equal(np.asarray(out)[:, 25:75], np.asarray(image))
    assert is_color(out, (0, 0, 25, 9), RED)
    assert is_color(out, (0, 12, 25, 100), BLUE)
    assert is_color(out, (75, 12, 100, 100), BLUE)


def test_latent_resize_mode_returns_the_image_unchanged():
    image = red_square_image()
    assert resize_image(3, image, 64, 64) is image


@pytest.mark.parametrize("mode", [-1, 4, 7])
def test_unknown_resize_mode_lists_the_modes(mode):
    with pytest.raises(RequestError) as caught:
        resize_image(mode, red_square_image(), 64, 64)
    message = str(caught.value)
    assert "resize_mode" in message
    for number, name in RESIZE_MODES.items():
        assert f"{number} ({name})" in message


def test_l_masks_stay_l_and_keep_their_values():
    mask = Image.new("L", (100, 50), 0)
    mask.paste(255, (40, 10, 60, 40))
    for mode in (0, 1, 2):
        out = resize_image(mode, mask, 50, 50)
        assert out.mode == "L"


def test_nearest_upscaler_doubles_pixels_exactly():
    image = Image.fromarray(np.arange(8 * 16 * 3, dtype=np.uint8).reshape(8, 16, 3))
    out = upscale_pixels(image, 32, 16, "Nearest")
    expected = np.repeat(np.repeat(np.asarray(image), 2, axis=0), 2, axis=1)
    assert np.array_equal(np.asarray(out), expected)


def test_upscaler_none_is_plain_lanczos():
    image = red_square_image()
    out = upscale_pixels(image, 160, 80, "None")
    assert np.array_equal(
        np.asarray(out), np.asarray(image.resize((160, 80), Image.Resampling.LANCZOS))
    )


def test_unknown_pixel_upscaler_lists_the_names():
    with pytest.raises(UnknownName) as caught:
        upscale_pixels(red_square_image(), 200, 100, "ESRGAN_4x")
    assert caught.value.choices == ["None", "Lanczos", "Nearest"]  # webui's weightless ones
    assert "hr_upscaler" in str(caught.value)


def test_flatten_puts_transparency_on_white():
    image = Image.new("RGBA", (4, 4), (255, 0, 0, 0))
    image.putpixel((0, 0), (255, 0, 0, 255))
    flat = flatten(image)
    assert flat.mode == "RGB"
    assert flat.getpixel((0, 0)) == (255, 0, 0)
    assert flat.getpixel((3, 3)) == (255, 255, 255)


# --------------------------------------------------------------------------------------------
# Steps
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("steps", "denoise", "fix", "timestep", "expected"),
    [
        # k-diffusion runs sigmas[steps - t_enc - 1:], i.e. t_enc + 1 steps, t_enc = int(d*steps)
        (20, 0.75, False, False, (20, 16)),
        (20, 0.75, False, True, (20, 15)),  # DDIM/PLMS/UniPC run t_enc steps
        (20, 1.0, False, False, (20, 20)),  # 0.999 rule: t_enc = 19
        (20, 1.0, False, True, (20, 19)),
        (50, 0.5, False, False, (50, 26)),
        (20, 0.0, False, False, (20, 1)),
        (30, 0.33, False, False, (30, 10)),  # int(9.9) = 9
        # img2img_fix_steps: a longer schedule of which `steps` run
        (20, 0.75, True, False, (26, 20)),  # int(26.67)
        (20, 0.75, True, True, (26, 19)),
        (20, 1.0, True, False, (20, 20)),  # int(20 / 0.999) = 20
        (20, 0.0, True, False, (0, 0)),
    ],
)
def test_img2img_steps(steps, denoise, fix, timestep, expected):
    assert img2img_steps(steps, denoise, fix, timestep_sampler=timestep) == expected


@pytest.mark.parametrize(
    ("steps", "hr_steps", "denoise", "schedule", "run"),
    [
        (20, 0, 0.7, 28, 20),  # int(20 / 0.7) = 28 (floor, not ceil 29)
        (30, 10, 0.5, 20, 10),  # hr_second_pass_steps wins
        (20, 0, 1.0, 20, 20),
        (25, 0, 0.3, 83, 25),
    ],
)
def test_hires_pass_runs_exactly_the_requested_count(steps, hr_steps, denoise, schedule, run):
    # webui passes `hr_second_pass_steps or steps` to the img2img sampler's fixed-steps branch.
    assert img2img_steps(hr_steps or steps, denoise, fix_steps=True) == (schedule, run)


def test_hires_pass_with_zero_denoise_is_skipped():
    assert img2img_steps(20, 0.0, fix_steps=True) == (0, 0)


def test_hires_pass_for_timestep_samplers_runs_one_less():
    assert img2img_steps(20, 0.7, fix_steps=True, timestep_sampler=True) == (28, 19)


# --------------------------------------------------------------------------------------------
# Hires fix
# --------------------------------------------------------------------------------------------


def test_hires_scale():
    target = hires_target(512, 768, 2.0, 0, 0)
    assert (target.resize_x, target.resize_y) == (1024, 1536)
    assert (target.width, target.height) == (1024, 1536)
    assert not target.crop
    assert dict(target.infotext) == {"Hires upscale": 2.0}
    assert target.latent_size == (192, 128)


def test_hires_resize_x_only_keeps_the_aspect():
    target = hires_target(512, 768, 2.0, 1000, 0)
    assert (target.resize_x, target.resize_y) == (1000, 1500)  # 1000 * 768 // 512
    assert (target.width, target.height) == (1000, 1496)  # the latent floors to /8
    assert dict(target.infotext) == {"Hires resize": "1000x0"}


def test_hires_resize_y_only_keeps_the_aspect():
    target = hires_target(512, 768, 2.0, 0, 1024)
    assert (target.resize_x, target.resize_y) == (682, 1024)  # 1024 * 512 // 768
    assert (target.width, target.height) == (680, 1024)
    assert dict(target.infotext) == {"Hires resize": "0x1024"}


def test_hires_resize_both_covers_and_crops():
    target = hires_target(512, 768, 2.0, 1024, 1024)
    assert (target.resize_x, target.resize_y) == (1024, 1536)
    assert (target.truncate_x, target.truncate_y) == (0, 64)
    assert (target.width, target.height) == (1024, 1024)
    assert target.crop
    assert dict(target.infotext) == {"Hires resize": "1024x1024"}

    wide = hires_target(512, 768, 2.0, 1536, 1024)
    assert (wide.resize_x, wide.resize_y) == (1536, 2304)
    assert (wide.width, wide.height) == (1536, 1024)


@pytest.mark.parametrize(
    ("width", "height", "scale", "resize", "final"),
    [
        (500, 300, 1.5, (750, 450), (744, 448)),
        (512, 512, 1.15, (588, 588), (584, 584)),  # int(588.8)
        (600, 700, 1.1, (660, 770), (656, 768)),  # 600 * 1.1 = 660.0000000000001 -> 660
    ],
)
def test_hires_scale_rounding(width, height, scale, resize, final):
    target = hires_target(width, height, scale, 0, 0)
    assert (target.resize_x, target.resize_y) == resize
    assert (target.width, target.height) == final


def test_crop_latent_drops_the_odd_row_at_the_end():
    target = hires_target(512, 536, 2.0, 1024, 1048)  # truncate_y = (1072 - 1048) // 8 = 3
    assert target.truncate_y == 3
    latent = torch.arange(134, dtype=torch.float32).view(1, 1, 134, 1).expand(1, 4, 134, 128)
    cropped = crop_latent(latent, target)
    assert cropped.shape == (1, 4, 131, 128)
    assert cropped[0, 0, 0, 0].item() == 1.0  # one row off the top, two off the bottom
    assert cropped[0, 0, -1, 0].item() == 131.0
    assert target.height == 131 * 8


def test_firstphase_legacy_mapping():
    assert firstphase_to_hires(1024, 1024, 0, 0) == (1024, 1024)
    assert firstphase_to_hires(1024, 1024, 512, 384) == (512, 384)
    with pytest.raises(RequestError, match="firstphase_height"):
        firstphase_to_hires(1024, 1024, 512, 0)


def test_latent_upscale_modes_table():
    assert dict(LATENT_UPSCALE_MODES) == {
        "Latent": ("bilinear", False),
        "Latent (antialiased)": ("bilinear", True),
        "Latent (bicubic)": ("bicubic", False),
        "Latent (bicubic antialiased)": ("bicubic", True),
        "Latent (nearest)": ("nearest", False),
        "Latent (nearest-exact)": ("nearest-exact", False),
    }


@pytest.mark.parametrize("mode", list(LATENT_UPSCALE_MODES))
def test_latent_upscale_shape_per_mode(mode):
    latent = torch.randn(2, 4, 64, 96, generator=torch.Generator().manual_seed(0))
    out = upscale_latent(latent, 1536, 1028, mode)
    assert out.shape == (2, 4, 128, 192)  # (1028 // 8, 1536 // 8)


def test_latent_nearest_upscale_repeats_values():
    latent = torch.arange(4, dtype=torch.float32).view(1, 1, 2, 2)
    out = upscale_latent(latent, 32, 32, "Latent (nearest)")
    expected = torch.tensor([[0, 0, 1, 1], [0, 0, 1, 1], [2, 2, 3, 3], [2, 2, 3, 3.0]])
    assert torch.equal(out[0, 0], expected)


def test_resize_latent_is_bilinear():
    latent = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    expected = torch.nn.functional.interpolate(latent, size=(12, 10), mode="bilinear")
    assert torch.equal(resize_latent(latent, 80, 96), expected)


def test_hr_upscaler_choice():
    default = hr_upscaler_choice(None)
    assert (default.name, default.latent, dict(default.infotext)) == ("Latent", True, {})
    bicubic = hr_upscaler_choice("Latent (bicubic)")
    assert bicubic.latent
    assert dict(bicubic.infotext) == {"Hires upscaler": "Latent (bicubic)"}
    lanczos = hr_upscaler_choice("Lanczos")
    assert not lanczos.latent


def test_unknown_hr_upscaler_lists_every_name():
    with pytest.raises(UnknownName) as caught:
        hr_upscaler_choice("R-ESRGAN 4x+")
    assert caught.value.choices == [*LATENT_UPSCALE_MODES, "None", "Lanczos", "Nearest"]
    assert "hr_upscaler" in str(caught.value)
    with pytest.raises(UnknownName):
        hr_upscaler_choice("latent")  # webui matches names exactly


# --------------------------------------------------------------------------------------------
# Masks
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("sigma", "size"), [(1, 7), (2, 11), (4, 21), (8, 41), (64, 321)])
def test_blur_kernel_size(sigma, size):
    assert gaussian_kernel_size(sigma) == size


def test_blur_zero_is_identity():
    mask = Image.fromarray(
        np.random.default_rng(0).integers(0, 256, (40, 60), dtype=np.uint8), mode="L"
    )
    assert np.array_equal(np.asarray(blur_mask(mask, 0, 0)), np.asarray(mask))


def _gauss(sigma: float, size: int) -> np.ndarray:
    offsets = np.arange(size) - size // 2
    weights = np.exp(-(offsets**2) / (2 * sigma**2))
    return weights / weights.sum()


def test_blur_of_a_dot_is_the_gaussian_along_x_only():
    mask = Image.new("L", (61, 9), 0)
    mask.putpixel((30, 4), 255)
    out = np.asarray(blur_mask(mask, 4, 0)).astype(float)
    expected_row = np.zeros(61)
    expected_row[20:41] = 255 * _gauss(4, 21)
    assert np.abs(out[4] - expected_row).max() <= 1.0
    assert out[[0, 1, 2, 3, 5, 6, 7, 8]].max() == 0  # no vertical spread
    assert out[4, :20].max() == 0 and out[4, 41:].max() == 0  # kernel is 21 wide


def test_blur_y_spreads_vertically():
    mask = Image.new("L", (9, 61), 0)
    mask.putpixel((4, 30), 255)
    out = np.asarray(blur_mask(mask, 0, 4)).astype(float)
    assert np.abs(out[20:41, 4] - 255 * _gauss(4, 21)).max() <= 1.0
    assert out[:, [0, 1, 2, 3, 5, 6, 7, 8]].max() == 0


def test_blur_border_is_reflect_101():
    # cv2's default border mirrors without repeating the edge pixel: a dot on column 0 gets
    # only the centre tap, where a replicated border would add the whole left half.
    mask = Image.new("L", (40, 1), 0)
    mask.putpixel((0, 0), 255)
    out = np.asarray(blur_mask(mask, 4, 0)).astype(float)
    g = _gauss(4, 21)
    assert abs(out[0, 0] - 255 * g[10]) <= 1.0
    assert abs(out[0, 3] - 255 * g[13]) <= 1.0


def test_blur_keeps_a_uniform_mask_uniform():
    mask = Image.new("L", (30, 20), 200)
    assert np.all(np.asarray(blur_mask(mask, 3, 5)) == 200)


def test_binarize_reads_alpha_and_thresholds():
    rgba = Image.new("RGBA", (3, 1), (0, 0, 0, 0))
    rgba.putpixel((1, 0), (0, 0, 0, 128))
    rgba.putpixel((2, 0), (0, 0, 0, 129))
    assert list(binarize(rgba).get_flattened_data()) == [0, 0, 255]
    assert list(binarize(rgba, round_alpha=False).get_flattened_data()) == [0, 128, 129]
    opaque = Image.new("RGBA", (2, 1), (255, 255, 255, 255))
    assert list(binarize(opaque).get_flattened_data()) == [255, 255]
    gray = Image.new("RGB", (1, 1), (100, 100, 100))
    assert list(binarize(gray).get_flattened_data()) == [100]  # L/RGB masks are not thresholded


def test_invert_mask():
    assert list(invert_mask(Image.new("L", (1, 1), 55)).get_flattened_data()) == [200]


def box_mask(size=(100, 80), box=(40, 20, 50, 30)) -> Image.Image:
    mask = Image.new("L", size, 0)
    mask.paste(255, box)
    return mask


def test_crop_region_of_a_box():
    assert mask_crop_region(box_mask(), 0) == CropRegion(40, 20, 50, 30)
    assert mask_crop_region(box_mask(), 5) == CropRegion(35, 15, 55, 35)
    # padding is clipped to the image
    assert mask_crop_region(box_mask(box=(2, 70, 10, 78)), 5) == CropRegion(0, 65, 15, 80)


def test_crop_region_of_a_black_mask_is_none():
    assert mask_crop_region(Image.new("L", (10, 10), 0), 32) is None


def test_expand_crop_region_to_the_processing_aspect():
    # 20x20 box for a 2:1 processing size: width grows by 20, 10 each side.
    region = expand_crop_region(CropRegion(35, 15, 55, 35), 512, 256, 100, 80)
    assert region == CropRegion(25, 15, 65, 35)
    # webui's docstring example: a 128x32 region for 512x512 becomes 128x128.
    tall = expand_crop_region(CropRegion(100, 200, 228, 232), 512, 512, 512, 512)
    assert (tall.width, tall.height) == (128, 128)
    assert tall == CropRegion(100, 152, 228, 280)


def test_expand_crop_region_shifts_back_inside_the_image():
    region = expand_crop_region(CropRegion(0, 0, 20, 20), 512, 256, 100, 80)
    assert region == CropRegion(0, 0, 40, 20)
    right = expand_crop_region(CropRegion(85, 0, 100, 30), 1, 1, 100, 80)
    assert right == CropRegion(70, 0, 100, 30)
    # wider than the image: shifted to 0 and clipped
    clipped = expand_crop_region(CropRegion(0, 0, 20, 80), 4, 1, 100, 80)
    assert clipped == CropRegion(0, 0, 100, 80)


def test_fill_replaces_the_masked_area_with_its_surroundings():
    image = Image.new("RGB", (64, 64), BLUE)
    image.paste((255, 255, 255), (24, 24, 40, 40))
    mask = box_mask((64, 64), (24, 24, 40, 40))
    filled = fill_masked(image, mask)
    outside = np.asarray(mask) == 0
    assert np.array_equal(np.asarray(filled)[outside], np.asarray(image)[outside])
    assert is_color(filled, (26, 26, 38, 38), BLUE)  # no white left


def test_latent_mask_rounds_to_the_latent_grid():
    mask = box_mask((64, 64), (0, 0, 32, 64))
    values = latent_mask(mask, 8, 8)
    assert values.shape == (8, 8)
    assert set(np.unique(values)) == {0.0, 1.0}
    assert values[:, :4].min() == 1.0 and values[:, 4:].max() == 0.0


# --------------------------------------------------------------------------------------------
# Overlay and paste-back
# --------------------------------------------------------------------------------------------


def random_image(size, seed) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def test_overlay_keeps_unmasked_pixels_byte_identical():
    original = random_image((64, 48), 1)
    generated = random_image((64, 48), 2)
    mask = box_mask((64, 48), (16, 8, 48, 40)).filter(ImageFilter.GaussianBlur(3))
    out = overlay_original(original, generated, mask)
    m = np.asarray(mask)
    assert (m == 0).any() and (m == 255).any()
    assert np.array_equal(np.asarray(out)[m == 0], np.asarray(original)[m == 0])
    assert np.array_equal(np.asarray(out)[m == 255], np.asarray(generated)[m == 255])
    between = (m > 0) & (m < 255)
    assert between.any()


def test_paste_back_puts_the_crop_in_its_region():
    original = random_image((100, 80), 3)
    region = CropRegion(20, 10, 60, 50)  # 40x40
    mask = box_mask((100, 80), (25, 15, 55, 45))
    generated = Image.new("RGB", (64, 64), RED)  # processing size, same aspect
    out = paste_back(original, generated, region, mask)
    assert out.size == (100, 80)
    assert is_color(out, (25, 15, 55, 45), RED)
    unmasked = np.asarray(mask) == 0
    assert np.array_equal(np.asarray(out)[unmasked], np.asarray(original)[unmasked])


def test_paste_back_fits_a_crop_of_another_aspect_by_cropping():
    original = Image.new("RGB", (100, 80), BLUE)
    region = CropRegion(0, 0, 40, 20)  # 2:1
    mask = box_mask((100, 80), (0, 0, 40, 20))
    generated = Image.new("RGB", (64, 64), (0, 255, 0))
    # 64x64 onto 40x20: "crop and resize" scales to 40x40 and keeps rows 10..29, i.e. the
    # generated rows 16..47; red rows 0..7 (and 56..63) are cut away.
    generated.paste(RED, (0, 0, 64, 8))
    generated.paste(RED, (0, 56, 64, 64))
    out = paste_back(original, generated, region, mask)
    assert is_color(out, (0, 0, 40, 20), (0, 255, 0))
    assert is_color(out, (40, 0, 100, 80), BLUE)


# --------------------------------------------------------------------------------------------
# The whole img2img / inpainting preparation
# --------------------------------------------------------------------------------------------


def test_only_masked_crops_processes_and_pastes_back():
    init = random_image((128, 96), 4)
    mask = box_mask((128, 96), (60, 40, 76, 56))
    plan = prepare_mask(
        mask, width=64, height=64, mask_blur_x=0, mask_blur_y=0, inpaint_full_res_padding=8
    )
    # bbox 60..76 x 40..56 + 8 padding = 52..84 x 32..64, already square
    assert plan.crop == CropRegion(52, 32, 84, 64)
    assert plan.mask is not None and plan.mask.size == (64, 64)
    assert dict(plan.infotext) == {
        "Inpaint area": "Only masked",
        "Masked area padding": 8,
        "Masked content": "fill",
    }
    prepared = prepare_init_image(init, width=64, height=64, mask=plan)
    assert prepared.image.size == (64, 64)
    assert prepared.paste_to == plan.crop
    result = finish_image(Image.new("RGB", (64, 64), RED), prepared)
    assert result.size == (128, 96)  # the init image's size, not width x height
    assert is_color(result, (60, 40, 76, 56), RED)
    unmasked = np.asarray(mask) == 0
    assert np.array_equal(np.asarray(result)[unmasked], np.asarray(init)[unmasked])


def test_whole_picture_resizes_and_doubles_the_overlay_mask():
    init = random_image((128, 96), 5)
    mask = Image.new("L", (128, 96), 0)
    mask.paste(100, (32, 32, 96, 64))
    plan = prepare_mask(
        mask,
        width=64,
        height=48,
        inpaint_full_res=False,
        mask_blur_x=0,
        mask_blur_y=0,
        inpainting_fill=1,
    )
    assert plan.crop is None
    assert plan.mask is not None and plan.mask.size == (64, 48)
    assert plan.overlay_mask is not None
    assert plan.overlay_mask.getpixel((32, 24)) == 200  # webui doubles it
    assert dict(plan.infotext) == {}
    prepared = prepare_init_image(init, width=64, height=48, mask=plan, inpainting_fill=1)
    expected = np.asarray(init.resize((64, 48), Image.Resampling.LANCZOS))
    assert np.array_equal(np.asarray(prepared.image), expected)  # "original": no fill
    result = finish_image(Image.new("RGB", (64, 48), RED), prepared)
    assert result.size == (64, 48)


def test_blank_mask_with_only_masked_falls_back_to_img2img():
    plan = prepare_mask(Image.new("L", (64, 64), 0), width=32, height=32)
    assert plan.mask is None and plan.crop is None
    assert plan.comments == (BLANK_MASK_COMMENT,)
    init = random_image((64, 64), 6)
    prepared = prepare_init_image(init, width=32, height=32, mask=plan)
    assert prepared.overlay is None and prepared.image.size == (32, 32)
    generated = random_image((32, 32), 7)
    assert finish_image(generated, prepared) is generated


def test_mask_infotext_for_inverted_blurred_masks():
    plan = prepare_mask(
        box_mask(),
        width=64,
        height=64,
        mask_blur_x=4,
        mask_blur_y=4,
        inpainting_mask_invert=1,
        inpainting_fill=2,
    )
    assert dict(plan.infotext) == {
        "Mask mode": "Inpaint not masked",
        "Mask blur": 4,
        "Inpaint area": "Only masked",
        "Masked area padding": 0,
        "Masked content": "latent noise",
    }
    uneven = prepare_mask(box_mask(), width=64, height=64, mask_blur_x=2, mask_blur_y=4)
    assert "Mask blur" not in uneven.infotext  # webui's property is None when x != y


def test_bad_inpainting_fill_is_a_request_error():
    with pytest.raises(RequestError, match="inpainting_fill"):
        prepare_mask(box_mask(), width=64, height=64, inpainting_fill=4)


def test_plain_img2img_resizes_and_has_no_overlay():
    init = red_square_image()
    prepared = prepare_init_image(init, width=50, height=50, resize_mode=1)
    assert np.array_equal(np.asarray(prepared.image), np.asarray(init.crop((25, 0, 75, 50))))
    assert prepared.overlay is None
    latent_mode = prepare_init_image(init, width=64, height=64, resize_mode=3)
    assert latent_mode.image.size == (100, 50)  # the latent is resized instead


def test_lanczos_upscaler_aims_at_a_multiple_of_8_first():
    # webui's Upscaler.upscale: scale 1.5 of 100x50 -> 150x75, then LANCZOS to the /8 size
    # 144x72, then resize_image LANCZOS-es that to the requested 150x75.
    image = red_square_image()
    lanczos = Image.Resampling.LANCZOS
    expected = image.resize((150, 75), lanczos).resize((144, 72), lanczos)
    expected = expected.resize((150, 75), lanczos)
    out = upscale_pixels(image, 150, 75, "Lanczos")
    assert np.array_equal(np.asarray(out), np.asarray(expected))


def test_latent_resize_mode_with_a_mask_fits_the_mask_like_webui():
    # webui's resize_image has no mode 3 branch: the mask gets "resize and fill".
    init = red_square_image()
    mask = Image.new("L", (100, 50), 0)
    mask.paste(255, (40, 10, 60, 40))
    plan = prepare_mask(
        mask,
        width=64,
        height=64,
        resize_mode=3,
        inpaint_full_res=False,
        mask_blur_x=0,
        mask_blur_y=0,
    )
    assert plan.mask is not None
    assert np.array_equal(np.asarray(plan.mask), np.asarray(resize_image(2, mask, 64, 64)))
    prepared = prepare_init_image(init, width=64, height=64, resize_mode=3, mask=plan)
    assert prepared.image.size == (100, 50)  # encoded at its own size, latent resized later
    assert prepared.overlay is not None and prepared.overlay.size == (100, 50)
