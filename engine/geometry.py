"""webui's image geometry for img2img, inpainting and hires fix, as pure functions.

Everything here reproduces AUTOMATIC1111 webui v1.10.1 (`modules/images.py: resize_image`,
`modules/masking.py`, `modules/processing.py`, `sd_samplers_common.setup_img2img_steps`) with
PIL, numpy and (for latents only) torch. No model, no files, no module state.

Sections:
- resize modes (img2img `resize_mode`) and pixel upscalers ("None", "Lanczos", "Nearest"; a
  model upscaler comes in as its upscale function, resolved by the caller)
- step arithmetic: how many steps webui runs for img2img / the hires pass, and the diffusers
  `(num_inference_steps, strength)` that runs the same timesteps
- hires fix: target size, latent upscale and crop, upscaler choice, legacy `firstphase_*`
- masks and inpainting: binarize, invert, blur (OpenCV's bit-exact Gaussian, without cv2), the
  "only masked" crop region, `fill`, and the final overlay / paste-back

Where webui has a quirk we keep it and the comment says so; where webui would crash we either
do the obvious thing or raise a `RequestError`, and the docstring says which.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Final

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageFilter, ImageOps

from engine.errors import RequestError, UnknownName

LANCZOS: Final = Image.Resampling.LANCZOS
NEAREST: Final = Image.Resampling.NEAREST

# Latent pixels per image pixel side (webui `opt_f`).
LATENT_FACTOR: Final = 8

# webui clamps the denoising strength below 1 so that t_enc < steps (`min(d, 0.999)`).
_MAX_DENOISE: Final = 0.999

# opts.img2img_background_color: what transparent init-image pixels become.
DEFAULT_BACKGROUND: Final = "#ffffff"


# --------------------------------------------------------------------------------------------
# Pixel upscalers and the resize modes
# --------------------------------------------------------------------------------------------

# The pixel upscalers that need no weights. The value is the resample filter of the upscaler's
# own pass; None ("None") means webui resizes straight to the size with LANCZOS.
PIXEL_UPSCALERS: Final[Mapping[str, Image.Resampling | None]] = MappingProxyType(
    {"None": None, "Lanczos": LANCZOS, "Nearest": NEAREST}
)


# A model upscaler, resolved by the caller (engine/upscaler_models.py): webui's
# `Upscaler.upscale(img, scale)`, i.e. model passes up to the /8-rounded `scale` size.
PixelUpscale = Callable[[Image.Image, float], Image.Image]
# What the resize functions take as `upscaler`: a built-in name, a model's upscale, or None.
UpscalerArg = str | PixelUpscale | None
_Resample = Image.Resampling | PixelUpscale | None


def _pixel_upscaler(name: UpscalerArg, field: str) -> _Resample:
    if name is None or callable(name):
        return name
    if name not in PIXEL_UPSCALERS:
        raise UnknownName(field, name, PIXEL_UPSCALERS, kind="upscaler")
    return PIXEL_UPSCALERS[name]


def _upscaler_pass(image: Image.Image, scale: float, resample: Image.Resampling) -> Image.Image:
    # webui `Upscaler.upscale`: aim at the scaled size rounded down to /8, run the upscaler
    # (up to 3 times, each time by `scale` from the current size) until it is reached, then
    # LANCZOS to exactly that /8 size.
    dest_w = int((image.width * scale) // 8 * 8)
    dest_h = int((image.height * scale) // 8 * 8)
    for _ in range(3):
        shape = image.size
        image = image.resize((int(image.width * scale), int(image.height * scale)), resample)
        if shape == image.size or (image.width >= dest_w and image.height >= dest_h):
            break
    if image.size != (dest_w, dest_h):
        image = image.resize((dest_w, dest_h), LANCZOS)
    return image


def _resize(image: Image.Image, width: int, height: int, resample: _Resample) -> Image.Image:
    """webui `resize_image.resize`: LANCZOS, or an upscaler pass first when enlarging."""
    if resample is None or image.mode == "L":
        return image.resize((width, height), LANCZOS)
    scale = max(width / image.width, height / image.height)
    if scale > 1.0:
        if callable(resample):
            image = resample(image, scale)
        else:
            image = _upscaler_pass(image, scale, resample)
    if image.size != (width, height):
        image = image.resize((width, height), LANCZOS)
    return image


def _canvas(image: Image.Image, width: int, height: int) -> Image.Image:
    # webui pastes into a new RGB image; we keep L masks as L (the same values, and what every
    # caller converts them to anyway).
    return Image.new("L" if image.mode == "L" else "RGB", (width, height))


def _just_resize(image: Image.Image, width: int, height: int, resample: _Resample) -> Image.Image:
    return _resize(image, width, height, resample)


def _crop_and_resize(
    image: Image.Image, width: int, height: int, resample: _Resample
) -> Image.Image:
    # Cover the target keeping the aspect ratio (integer floor division, as webui), centre.
    ratio = width / height
    src_ratio = image.width / image.height
    src_w = width if ratio > src_ratio else image.width * height // image.height
    src_h = height if ratio <= src_ratio else image.height * width // image.width
    resized = _resize(image, src_w, src_h, resample)
    result = _canvas(image, width, height)
    result.paste(resized, (width // 2 - src_w // 2, height // 2 - src_h // 2))
    return result


def _resize_and_fill(
    image: Image.Image, width: int, height: int, resample: _Resample
) -> Image.Image:
    # Fit inside the target keeping the aspect ratio, centre, then fill the two bands by
    # stretching the first/last row (or column) of the resized image across them. The band
    # resizes use PIL's default filter and a zero-height (zero-width) source box: webui's exact
    # calls. Webui crashes on a zero-size band; we skip it. It also crashes when the fitted
    # image would be 0 px thin (a 1x4096 image into 64x64); we keep 1 px, and the bands
    # stretch that line.
    ratio = width / height
    src_ratio = image.width / image.height
    src_w = width if ratio < src_ratio else max(1, image.width * height // image.height)
    src_h = height if ratio >= src_ratio else max(1, image.height * width // image.width)
    resized = _resize(image, src_w, src_h, resample)
    result = _canvas(image, width, height)
    result.paste(resized, (width // 2 - src_w // 2, height // 2 - src_h // 2))
    if ratio < src_ratio:
        fill = height // 2 - src_h // 2
        if fill > 0:
            top = resized.resize((width, fill), box=(0, 0, width, 0))
            bottom = resized.resize((width, fill), box=(0, resized.height, width, resized.height))
            result.paste(top, (0, 0))
            result.paste(bottom, (0, fill + src_h))
    elif ratio > src_ratio:
        fill = width // 2 - src_w // 2
        if fill > 0:
            left = resized.resize((fill, height), box=(0, 0, 0, height))
            right = resized.resize((fill, height), box=(resized.width, 0, resized.width, height))
            result.paste(left, (0, 0))
            result.paste(right, (fill + src_w, 0))
    return result


def _latent_resize(image: Image.Image, width: int, height: int, resample: _Resample) -> Image.Image:
    # Mode 3 resizes the latent, not the pixels: the caller VAE-encodes the image as it is and
    # calls `resize_latent` on the result.
    return image


@dataclass(frozen=True)
class ResizeMode:
    label: str  # as webui's UI labels it
    apply: Callable[[Image.Image, int, int, _Resample], Image.Image]


_RESIZE_MODES: Final[Mapping[int, ResizeMode]] = MappingProxyType(
    {
        0: ResizeMode("Just resize", _just_resize),
        1: ResizeMode("Crop and resize", _crop_and_resize),
        2: ResizeMode("Resize and fill", _resize_and_fill),
        3: ResizeMode("Just resize (latent upscale)", _latent_resize),
    }
)

RESIZE_MODES: Final[Mapping[int, str]] = MappingProxyType(
    {mode: spec.label for mode, spec in _RESIZE_MODES.items()}
)


def check_resize_mode(mode: int, field: str = "resize_mode") -> int:
    """The mode if it is one of webui's four, else a RequestError naming them."""
    if isinstance(mode, bool) or mode not in _RESIZE_MODES:
        allowed = ", ".join(f"{k} ({v})" for k, v in RESIZE_MODES.items())
        raise RequestError.single(field, mode, f"allowed: {allowed}")
    return mode


def resize_image(
    mode: int,
    image: Image.Image,
    width: int,
    height: int,
    *,
    upscaler: UpscalerArg = None,
    field: str = "resize_mode",
    upscaler_field: str = "upscaler_for_img2img",
) -> Image.Image:
    """webui `images.resize_image`: fit `image` to `width`×`height`.

    0 "Just resize": stretch. 1 "Crop and resize": scale to cover, centre-crop. 2 "Resize and
    fill": scale to fit, centre, fill the bands by stretching the edge rows/columns.
    3 "Just resize (latent upscale)": the image is returned **unchanged**; the caller encodes it
    at its own size and calls `resize_latent` (webui bilinear-interpolates the init latent).

    Resizing uses LANCZOS. `upscaler` (webui `opts.upscaler_for_img2img`, or a hires
    `hr_upscaler` pixel name) runs that upscaler first when the image is enlarged; L images
    always use plain LANCZOS, as in webui. Modes 1 and 2 return RGB (L for L input), like
    webui's RGB canvas; mode 0 keeps the input mode.
    """
    spec = _RESIZE_MODES[check_resize_mode(mode, field)]
    resample = _pixel_upscaler(upscaler, upscaler_field)
    if width <= 0 or height <= 0:
        raise ValueError(f"resize target must be positive, got {width}x{height}")
    return spec.apply(image, width, height, resample)


def _resize_mask(mode: int, mask: Image.Image, width: int, height: int) -> Image.Image:
    # webui's resize_image has no branch for 3: masks resized "with mode 3" fall through to
    # "Resize and fill". We keep that for masks, where webui does it.
    return resize_image(2 if mode == 3 else mode, mask, width, height)


def upscale_pixels(
    image: Image.Image, width: int, height: int, name: str | PixelUpscale
) -> Image.Image:
    """Hires fix with a pixel or model upscaler: webui `resize_image(0, image, w, h,
    upscaler_name=name)`."""
    return resize_image(0, image, width, height, upscaler=name, upscaler_field="hr_upscaler")


def flatten(image: Image.Image, background: str = DEFAULT_BACKGROUND) -> Image.Image:
    """webui `images.flatten`: RGBA onto `background` (opts.img2img_background_color), as RGB."""
    if image.mode == "RGBA":
        canvas = Image.new("RGBA", image.size, background)
        canvas.paste(image, mask=image)
        image = canvas
    return image.convert("RGB")


# --------------------------------------------------------------------------------------------
# Step arithmetic
# --------------------------------------------------------------------------------------------


def img2img_steps(
    steps: int,
    denoising_strength: float,
    fix_steps: bool = False,
    *,
    timestep_sampler: bool = False,
) -> tuple[int, int]:
    """`(schedule_steps, steps_run)` of a webui img2img pass.

    webui (`setup_img2img_steps`): without `opts.img2img_fix_steps` the schedule has `steps`
    steps and `t_enc = int(min(d, 0.999) * steps)`; with it (and always for the hires pass) the
    schedule has `int(steps / min(d, 0.999))` steps (0 when d <= 0) and `t_enc = steps - 1`.
    The k-diffusion samplers (Euler, DPM++, ... : everything but DDIM/PLMS/UniPC) then run the
    last `t_enc + 1` steps of the schedule (`sigmas[steps - t_enc - 1:]`); webui's timestep
    samplers (`timestep_sampler=True`: DDIM, PLMS, UniPC) run `t_enc` steps. So 20 steps at
    0.75 run 16 Euler steps (15 DDIM steps), and at 1.0 all 20 (19 DDIM).

    d = 0 with fix_steps gives a 0-step schedule: webui then returns the (noise-free) init
    latent unchanged; `(0, 0)` tells the caller to skip sampling.
    """
    d = min(denoising_strength, _MAX_DENOISE)
    if fix_steps:
        schedule = int(steps / d) if denoising_strength > 0 else 0
        t_enc = steps - 1
    else:
        schedule = steps
        t_enc = int(d * steps)
    if schedule <= 0:
        return 0, 0
    run = t_enc if timestep_sampler else t_enc + 1
    return schedule, max(run, 0)


# --------------------------------------------------------------------------------------------
# Hires fix: target size, latents, upscaler choice
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class HiresTarget:
    """Where webui's hires fix goes for a `width`×`height` first pass.

    `resize_x`×`resize_y` is what the first pass is upscaled to (webui `hr_upscale_to_x/y`; the
    latent becomes `resize_y // 8`×`resize_x // 8`). With both `hr_resize_x` and `hr_resize_y`
    set, the upscale covers the requested box and `truncate_x`/`truncate_y` latent pixels are
    cut off, centred (`crop=True`; see `crop_latent`). `width`×`height` is the size of the
    final image: the kept latent times 8. `infotext` is webui's extra generation param.
    """

    width: int
    height: int
    resize_x: int
    resize_y: int
    crop: bool
    infotext: Mapping[str, Any]
    truncate_x: int = 0
    truncate_y: int = 0

    @property
    def latent_size(self) -> tuple[int, int]:
        """(latent_height, latent_width) of the second pass."""
        return self.height // LATENT_FACTOR, self.width // LATENT_FACTOR


def hires_target(
    width: int, height: int, hr_scale: float, hr_resize_x: int, hr_resize_y: int
) -> HiresTarget:
    """webui `calculate_target_resolution` (without opts.use_old_hires_fix_width_height).

    Both resizes 0: `int(width * hr_scale)`×`int(height * hr_scale)`, infotext "Hires upscale".
    Only one set: the other follows the aspect ratio with integer floor division (no /8
    rounding here: the latent floor-divides by 8 later). Both set: scale to cover the box,
    crop the latent centred ("truncate"). Infotext "Hires resize": "XxY" for both cases.
    """
    problems = [
        (name, value)
        for name, value in (("hr_resize_x", hr_resize_x), ("hr_resize_y", hr_resize_y))
        if value < 0
    ]
    if problems:
        name, value = problems[0]
        raise RequestError.single(name, value, "must be 0 (unset) or a positive size")
    truncate_x = truncate_y = 0
    if hr_resize_x == 0 and hr_resize_y == 0:
        info: dict[str, Any] = {"Hires upscale": hr_scale}
        up_x, up_y = int(width * hr_scale), int(height * hr_scale)
    else:
        info = {"Hires resize": f"{hr_resize_x}x{hr_resize_y}"}
        if hr_resize_y == 0:
            up_x, up_y = hr_resize_x, hr_resize_x * height // width
        elif hr_resize_x == 0:
            up_x, up_y = hr_resize_y * width // height, hr_resize_y
        else:
            if width / height < hr_resize_x / hr_resize_y:
                up_x, up_y = hr_resize_x, hr_resize_x * height // width
            else:
                up_x, up_y = hr_resize_y * width // height, hr_resize_y
            truncate_x = (up_x - hr_resize_x) // LATENT_FACTOR
            truncate_y = (up_y - hr_resize_y) // LATENT_FACTOR
    if up_x < LATENT_FACTOR or up_y < LATENT_FACTOR:
        raise RequestError.single(
            "hr_scale" if "Hires upscale" in info else "hr_resize_x",
            hr_scale if "Hires upscale" in info else hr_resize_x,
            f"the hires target {up_x}x{up_y} is smaller than one latent pixel (8x8)",
        )
    final_w = (up_x // LATENT_FACTOR - truncate_x) * LATENT_FACTOR
    final_h = (up_y // LATENT_FACTOR - truncate_y) * LATENT_FACTOR
    return HiresTarget(
        width=final_w,
        height=final_h,
        resize_x=up_x,
        resize_y=up_y,
        crop=bool(truncate_x or truncate_y),
        infotext=MappingProxyType(info),
        truncate_x=truncate_x,
        truncate_y=truncate_y,
    )


def crop_latent(latent: torch.Tensor, target: HiresTarget) -> torch.Tensor:
    """webui's hires "truncate": drop `truncate//2` rows/columns before, the rest after."""
    tx, ty = target.truncate_x, target.truncate_y
    h, w = latent.shape[-2:]
    return latent[..., ty // 2 : h - (ty + 1) // 2, tx // 2 : w - (tx + 1) // 2]


def firstphase_to_hires(
    width: int, height: int, firstphase_width: int, firstphase_height: int
) -> tuple[int, int]:
    """First-pass size under the legacy (<1.0) `firstphase_width/height` API.

    webui 1.10 (`StableDiffusionProcessingTxt2Img.__post_init__`): when either firstphase value
    is non-zero, the first pass runs at `firstphase_width`×`firstphase_height` and
    `width`/`height` only become the provisional hires target, which
    `calculate_target_resolution` then overwrites from the first-pass size and
    `hr_scale`/`hr_resize_*`. So the request's width/height are effectively discarded: call
    `hires_target(*firstphase_to_hires(...), hr_scale, hr_resize_x, hr_resize_y)`. Without
    `enable_hr` the image is simply generated at the firstphase size. Exactly one of the two
    set would make webui generate a 0-pixel side; that is a RequestError here.
    """
    if firstphase_width == 0 and firstphase_height == 0:
        return width, height
    for name, value in (
        ("firstphase_width", firstphase_width),
        ("firstphase_height", firstphase_height),
    ):
        if value <= 0:
            raise RequestError.single(
                name, value, "set both firstphase_width and firstphase_height, or neither"
            )
    return firstphase_width, firstphase_height


# webui `shared.latent_upscale_modes`: name -> (torch interpolate mode, antialias).
LATENT_UPSCALE_MODES: Final[Mapping[str, tuple[str, bool]]] = MappingProxyType(
    {
        "Latent": ("bilinear", False),
        "Latent (antialiased)": ("bilinear", True),
        "Latent (bicubic)": ("bicubic", False),
        "Latent (bicubic antialiased)": ("bicubic", True),
        "Latent (nearest)": ("nearest", False),
        "Latent (nearest-exact)": ("nearest-exact", False),
    }
)

# webui `shared.latent_upscale_default_mode`: what hr_upscaler None means.
DEFAULT_HR_UPSCALER: Final = "Latent"


@dataclass(frozen=True)
class HiresUpscaler:
    """A resolved `hr_upscaler`."""

    name: str
    latent: bool  # True: interpolate the latent (`upscale_latent`); False: `upscale_pixels`
    given: bool  # the request named it (webui writes "Hires upscaler" only then)
    model: PixelUpscale | None = None  # a model upscaler's upscale (else a built-in by name)

    @property
    def pixels(self) -> str | PixelUpscale:
        """What `upscale_pixels` takes for this upscaler."""
        return self.model if self.model is not None else self.name

    @property
    def infotext(self) -> Mapping[str, Any]:
        return MappingProxyType({"Hires upscaler": self.name} if self.given else {})


def available_hr_upscalers(models: Iterable[str] = ()) -> tuple[str, ...]:
    """Every name `hr_upscaler` accepts here, latent modes first (webui's list order), then
    the built-ins and the installed model upscalers (`models`)."""
    return (*LATENT_UPSCALE_MODES, *PIXEL_UPSCALERS, *models)


def hr_upscaler_choice(
    name: str | None,
    *,
    field: str = "hr_upscaler",
    models: Mapping[str, PixelUpscale] = MappingProxyType({}),
) -> HiresUpscaler:
    """Resolve `hr_upscaler` exactly as webui matches it (case-sensitive). None → "Latent".

    `models`: the installed model upscalers by webui name (upscalers/ folder). Any other
    name: UnknownName listing what is accepted.
    """
    if name is None:
        return HiresUpscaler(DEFAULT_HR_UPSCALER, latent=True, given=False)
    if name in LATENT_UPSCALE_MODES:
        return HiresUpscaler(name, latent=True, given=True)
    if name in PIXEL_UPSCALERS:
        return HiresUpscaler(name, latent=False, given=True)
    if name in models:
        return HiresUpscaler(name, latent=False, given=True, model=models[name])
    raise UnknownName(field, name, available_hr_upscalers(models), kind="upscaler")


def img2img_upscaler(
    name: str | None,
    models: Mapping[str, PixelUpscale] = MappingProxyType({}),
    *,
    field: str = "override_settings.upscaler_for_img2img",
) -> UpscalerArg:
    """`opts.upscaler_for_img2img`: None, a built-in pixel upscaler's name, or an installed
    model upscaler (its upscale). Anything else: UnknownName listing what is accepted."""
    if name is None or name in PIXEL_UPSCALERS:
        return name
    if name in models:
        return models[name]
    raise UnknownName(field, name, [*PIXEL_UPSCALERS, *models], kind="upscaler")


def upscale_latent(latent: torch.Tensor, width: int, height: int, mode: str) -> torch.Tensor:
    """webui's latent upscale: `F.interpolate` to `(height // 8, width // 8)`.

    `mode` is a `LATENT_UPSCALE_MODES` name ("Latent", "Latent (bicubic antialiased)", ...).
    """
    if mode not in LATENT_UPSCALE_MODES:
        raise UnknownName("hr_upscaler", mode, LATENT_UPSCALE_MODES, kind="latent upscale mode")
    interp, antialias = LATENT_UPSCALE_MODES[mode]
    size = (height // LATENT_FACTOR, width // LATENT_FACTOR)
    return F.interpolate(latent, size=size, mode=interp, antialias=antialias)


def resize_latent(latent: torch.Tensor, width: int, height: int) -> torch.Tensor:
    """img2img resize_mode 3: webui bilinear-interpolates the init latent to `h//8`×`w//8`."""
    return upscale_latent(latent, width, height, "Latent")


# resize_mode 3 VAE-encodes the image at its own size. SD's VAE encoder halves each side three
# times with a 3x3 stride-2 convolution padded on one side only: below 8 px a side it fails
# (webui fails there too, with a torch error).
MIN_LATENT_RESIZE_SIDE = 8


def latent_resize_problem(
    size: tuple[int, int], first: tuple[int, int] | None = None
) -> str | None:
    """What an init image of `size` lacks for resize_mode 3, or None. `first`: the size of
    the batch's first init image (they are encoded as one batch; webui fails there too)."""
    if min(size) < MIN_LATENT_RESIZE_SIDE:
        return (
            f"at least {MIN_LATENT_RESIZE_SIDE} px a side with resize_mode 3 (latent upscale "
            "encodes the image at its own size); or resize_mode 0-2"
        )
    if first is not None and size != first:
        return (
            f"the size of init_images[0] ({first[0]}x{first[1]}) with resize_mode 3 (the "
            "images are encoded at their own size, as one batch); or resize_mode 0-2"
        )
    return None


# --------------------------------------------------------------------------------------------
# Masks
# --------------------------------------------------------------------------------------------


def binarize(mask: Image.Image, *, round_alpha: bool = True) -> Image.Image:
    """webui `create_binary_mask`: the request's mask as an L image (white = repaint).

    An RGBA mask whose alpha is not fully opaque is read from its alpha channel, thresholded
    (> 128 → 255, else 0) when `round_alpha` (the request's `mask_round`); anything else is
    simply converted to L. Despite webui's name, L/RGB masks are not thresholded.
    """
    if mask.mode == "RGBA":
        alpha_extrema = mask.getextrema()[-1]
        if alpha_extrema != (255, 255):
            alpha = mask.getchannel("A")
            return alpha.point(lambda v: 255 if v > 128 else 0) if round_alpha else alpha
    return mask.convert("L")


def invert_mask(mask: Image.Image) -> Image.Image:
    """`inpainting_mask_invert=1` ("Inpaint not masked"): 255 - mask, as L."""
    return ImageOps.invert(mask.convert("L"))


def gaussian_kernel_size(sigma: int) -> int:
    """webui's mask blur kernel width for blur `sigma`: `2 * int(2.5 * sigma + 0.5) + 1`."""
    return 2 * int(2.5 * sigma + 0.5) + 1


def _fixed_point_kernel(size: int, sigma: float) -> np.ndarray:
    """OpenCV's 8-bit GaussianBlur kernel: the normalised Gaussian in 1/256 units.

    cv2 (`getGaussianKernelBitExact` + `getGaussianKernelFixedPoint_ED`) rounds the half
    kernel with error diffusion (round-half-even) and gives the centre what makes the sum 256.
    """
    half = (size - 1) // 2
    scale = -0.125 / (sigma * sigma)  # on doubled offsets: exp(-x^2 / (2 sigma^2))
    values = [math.exp(float(x * x) * scale) for x in range(1 - size, 0, 2)]
    norm = 1.0 / (sum(values) * 2.0 + 1.0)
    raw = [0] * size
    err = 0.0
    for i, value in enumerate(values):
        adjusted = value * norm * 256.0 + err
        rounded = round(adjusted)
        err = adjusted - rounded
        raw[i] = raw[size - 1 - i] = rounded
    raw[half] = 256 - 2 * sum(raw[:half])
    return np.asarray(raw, dtype=np.int32)


def _reflect101(indices: np.ndarray, length: int) -> np.ndarray:
    # OpenCV BORDER_REFLECT_101 (cv2's default): ...2 1 | 0 1 2 ... n-1 | n-2 n-3...
    if length == 1:
        return np.zeros_like(indices)
    period = 2 * (length - 1)
    folded = np.mod(indices, period)
    return np.where(folded >= length, period - folded, folded)


def _blur_axis(array: np.ndarray, sigma: int, axis: int) -> np.ndarray:
    """cv2.GaussianBlur of a uint8 image along one axis (a 1-pixel-thick kernel), bit-exact:
    integer taps, then `(sum + 128) >> 8`."""
    length = array.shape[axis]
    if length == 1:  # cv2 shrinks the kernel to 1 along a 1-pixel side: a copy
        return array.copy()
    kernel = _fixed_point_kernel(gaussian_kernel_size(sigma), float(sigma))
    radius = len(kernel) // 2
    source = np.take(array, _reflect101(np.arange(-radius, length + radius), length), axis=axis)
    source = source.astype(np.int32)
    acc = np.zeros(array.shape, dtype=np.int32)
    for tap, weight in enumerate(kernel):
        if weight:
            window = [slice(None)] * array.ndim
            window[axis] = slice(tap, tap + length)
            acc += int(weight) * source[tuple(window)]
    return np.clip((acc + 128) >> 8, 0, 255).astype(np.uint8)


def blur_mask(mask: Image.Image, blur_x: int, blur_y: int) -> Image.Image:
    """webui's mask blur: cv2.GaussianBlur with ksize (k, 1) and sigma `blur_x`, then (1, k)
    and `blur_y`, k = `gaussian_kernel_size(sigma)`; 0 skips that direction.

    Reproduced without cv2: the same fixed-point kernel, BORDER_REFLECT_101 and rounding.
    """
    for name, value in (("mask_blur_x", blur_x), ("mask_blur_y", blur_y)):
        if value < 0:
            raise RequestError.single(name, value, "must be 0 (no blur) or more")
    array = np.asarray(mask.convert("L"))
    if blur_x > 0:
        array = _blur_axis(array, blur_x, axis=1)
    if blur_y > 0:
        array = _blur_axis(array, blur_y, axis=0)
    return Image.fromarray(array, mode="L")


def latent_mask(
    mask: Image.Image, latent_width: int, latent_height: int, *, round_mask: bool = True
) -> np.ndarray:
    """webui's latent blend mask (`nmask`), float32 `(h, w)`, 1 = repaint.

    webui resizes the processing-size mask to the latent size with PIL's default (bicubic)
    filter on an RGB copy, scales to 0..1 and rounds it when `mask_round`.
    """
    small = mask.convert("RGB").resize((latent_width, latent_height))
    values = np.asarray(small, dtype=np.float32)[:, :, 0] / 255
    return np.around(values) if round_mask else values


@dataclass(frozen=True)
class CropRegion:
    """A box in image pixels, right/bottom exclusive (PIL's convention)."""

    x1: int
    y1: int
    x2: int
    y2: int

    @property
    def width(self) -> int:
        return self.x2 - self.x1

    @property
    def height(self) -> int:
        return self.y2 - self.y1

    @property
    def box(self) -> tuple[int, int, int, int]:
        return self.x1, self.y1, self.x2, self.y2


def mask_crop_region(mask: Image.Image, padding: int) -> CropRegion | None:
    """webui `masking.get_crop_region_v2`: the bounding box of the non-black mask pixels,
    grown by `padding` and clipped to the image; None for an all-black mask."""
    if padding < 0:
        raise RequestError.single("inpaint_full_res_padding", padding, "must be 0 or more")
    gray = mask.convert("L")
    box = gray.getbbox()
    if box is None:
        return None
    x1, y1, x2, y2 = box
    return CropRegion(
        max(x1 - padding, 0),
        max(y1 - padding, 0),
        min(x2 + padding, gray.width),
        min(y2 + padding, gray.height),
    )


def _expand_span(lo: int, hi: int, diff: int, limit: int) -> tuple[int, int]:
    # Grow [lo, hi) by `diff` (half each side, the odd pixel after), shift it back inside
    # [0, limit), and clip if it is still too long. webui's `>=` tests kept as they are.
    lo -= diff // 2
    hi += diff - diff // 2
    if hi >= limit:
        shift = hi - limit
        hi -= shift
        lo -= shift
    if lo < 0:
        hi -= lo
        lo = 0
    if hi >= limit:
        hi = limit
    return lo, hi


def expand_crop_region(
    region: CropRegion, width: int, height: int, image_width: int, image_height: int
) -> CropRegion:
    """webui `masking.expand_crop_region`: grow the shorter side of `region` so it has the
    `width`:`height` aspect of the processing size, staying inside the image where it can."""
    ratio_region = region.width / region.height
    ratio_processing = width / height
    x1, y1, x2, y2 = region.box
    if ratio_region > ratio_processing:
        diff = int(region.width / ratio_processing - region.height)
        y1, y2 = _expand_span(y1, y2, diff, image_height)
    else:
        diff = int(region.height * ratio_processing - region.width)
        x1, x2 = _expand_span(x1, x2, diff, image_width)
    return CropRegion(x1, y1, x2, y2)


# webui `masking.fill`: (Gaussian radius, times composited), from coarse to fine.
_FILL_PASSES: Final = ((256, 1), (64, 1), (16, 2), (4, 4), (2, 2), (0, 1))


def fill_masked(image: Image.Image, mask: Image.Image) -> Image.Image:
    """webui `masking.fill` (inpainting_fill 0 "fill"): replace the masked area with blurred
    colours of its surroundings. Unmasked pixels (mask 0) keep their values."""
    if image.size != mask.size:
        raise ValueError(f"image {image.size} and mask {mask.size} differ in size")
    result = Image.new("RGBA", image.size)
    kept = Image.new("RGBa", image.size)
    kept.paste(image.convert("RGBA").convert("RGBa"), mask=ImageOps.invert(mask.convert("L")))
    for radius, repeats in _FILL_PASSES:
        blurred = kept.filter(ImageFilter.GaussianBlur(radius)).convert("RGBA")
        for _ in range(repeats):
            result.alpha_composite(blurred)
    return result.convert("RGB")


def make_overlay(original: Image.Image, mask: Image.Image) -> Image.Image:
    """webui's overlay image: the original's pixels with alpha = 255 - mask (RGBA)."""
    if original.size != mask.size:
        raise ValueError(f"image {original.size} and mask {mask.size} differ in size")
    overlay = Image.new("RGBa", original.size)
    overlay.paste(original.convert("RGBA").convert("RGBa"), mask=ImageOps.invert(mask.convert("L")))
    return overlay.convert("RGBA")


def _composite(generated: Image.Image, overlay: Image.Image) -> Image.Image:
    if generated.size != overlay.size:
        raise ValueError(f"generated {generated.size} and overlay {overlay.size} differ in size")
    result = generated.convert("RGBA")
    result.alpha_composite(overlay)
    return result.convert("RGB")


def _uncrop(
    generated: Image.Image,
    size: tuple[int, int],
    region: CropRegion,
    upscaler: UpscalerArg = None,
) -> Image.Image:
    # webui `uncrop`: crop-and-resize the generated image to the region, on a transparent canvas.
    canvas = Image.new("RGBA", size)
    canvas.paste(
        resize_image(1, generated, region.width, region.height, upscaler=upscaler), region.box[:2]
    )
    return canvas


def overlay_original(
    original: Image.Image, generated: Image.Image, mask: Image.Image
) -> Image.Image:
    """webui `apply_overlay` without a paste location: the original's unmasked pixels over the
    generated image (mask 0 → original byte for byte, 255 → generated, between → blended)."""
    return _composite(generated, make_overlay(original, mask))


def paste_back(
    original: Image.Image,
    generated_crop: Image.Image,
    region: CropRegion,
    mask: Image.Image,
    *,
    upscaler: UpscalerArg = None,
) -> Image.Image:
    """The "only masked" finish (webui `apply_overlay` with `paste_to`): fit the generated crop to
    `region` (crop and resize), place it on the original-size canvas, then lay the original's
    unmasked pixels over it. `mask` is the full-size overlay mask. Output: original size, RGB."""
    canvas = _uncrop(generated_crop, original.size, region, upscaler)
    return _composite(canvas, make_overlay(original, mask))


# --------------------------------------------------------------------------------------------
# img2img / inpainting preparation, in webui's order (`StableDiffusionProcessingImg2Img.init`)
# --------------------------------------------------------------------------------------------

_MASKED_CONTENT: Final[Mapping[int, str | None]] = MappingProxyType(
    {0: "fill", 1: None, 2: "latent noise", 3: "latent nothing"}
)

BLANK_MASK_COMMENT: Final = (
    'Unable to perform "Inpaint Only mask" because mask is blank, switch to img2img mode.'
)


@dataclass(frozen=True)
class MaskPlan:
    """The request's mask, processed once per request as webui does.

    `mask`: processing-size (width×height) L mask: inpaint conditioning and `latent_mask`
    source; None when "only masked" met an all-black mask (webui falls back to plain img2img
    and says so in `comments`). `overlay_mask`: webui's `mask_for_overlay` (full-size blurred
    mask for "only masked"; for "whole picture" the resized mask doubled and clipped, which
    makes the pasted-back border tighter). `crop`: the region of the init image that is
    processed ("only masked"), also where the result is pasted back.
    """

    mask: Image.Image | None
    overlay_mask: Image.Image | None
    crop: CropRegion | None
    infotext: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))
    comments: tuple[str, ...] = ()


def prepare_mask(
    mask: Image.Image,
    *,
    width: int,
    height: int,
    resize_mode: int = 0,
    mask_blur_x: int = 4,
    mask_blur_y: int = 4,
    inpaint_full_res: bool = True,
    inpaint_full_res_padding: int = 0,
    inpainting_mask_invert: int = 0,
    inpainting_fill: int = 0,
    mask_round: bool = True,
) -> MaskPlan:
    """webui's mask steps: binarize → invert → blur x → blur y → crop ("only masked") or
    resize ("whole picture"). Defaults are webui's API defaults."""
    check_resize_mode(resize_mode)
    if inpainting_fill not in _MASKED_CONTENT:
        allowed = ", ".join(f"{k} ({v or 'original'})" for k, v in _MASKED_CONTENT.items())
        raise RequestError.single("inpainting_fill", inpainting_fill, f"allowed: {allowed}")
    info: dict[str, Any] = {}
    image_mask = binarize(mask, round_alpha=mask_round)
    if inpainting_mask_invert:
        image_mask = invert_mask(image_mask)
        info["Mask mode"] = "Inpaint not masked"
    image_mask = blur_mask(image_mask, mask_blur_x, mask_blur_y)
    # webui's `mask_blur` property: the value when x == y, else None (left out).
    if (mask_blur_x > 0 or mask_blur_y > 0) and mask_blur_x == mask_blur_y:
        info["Mask blur"] = mask_blur_x

    if inpaint_full_res:
        region = mask_crop_region(image_mask, inpaint_full_res_padding)
        if region is None:
            return MaskPlan(None, None, None, MappingProxyType(info), (BLANK_MASK_COMMENT,))
        region = expand_crop_region(region, width, height, image_mask.width, image_mask.height)
        processing = resize_image(2, image_mask.crop(region.box), width, height)
        overlay_mask = image_mask
        info["Inpaint area"] = "Only masked"
        info["Masked area padding"] = inpaint_full_res_padding
    else:
        region = None
        processing = _resize_mask(resize_mode, image_mask, width, height)
        doubled = np.clip(np.asarray(processing, dtype=np.float32) * 2, 0, 255).astype(np.uint8)
        overlay_mask = Image.fromarray(doubled, mode="L")

    content = _MASKED_CONTENT[inpainting_fill]
    if content is not None:
        info["Masked content"] = content
    return MaskPlan(processing, overlay_mask, region, MappingProxyType(info))


@dataclass(frozen=True)
class InitImage:
    """One init image, ready for the VAE, and what finishing the result needs.

    `image`: RGB, width×height (resize_mode 3 without a crop: the original size, interpolate
    its latent with `resize_latent`). `overlay`: RGBA original pixels to lay over the result
    (None without a mask). `paste_to`: "only masked" region; the result then comes back at the
    init image's size, not width×height.
    """

    image: Image.Image
    overlay: Image.Image | None = None
    paste_to: CropRegion | None = None


def prepare_init_image(
    image: Image.Image,
    *,
    width: int,
    height: int,
    resize_mode: int = 0,
    mask: MaskPlan | None = None,
    inpainting_fill: int = 0,
    background: str = DEFAULT_BACKGROUND,
    upscaler: UpscalerArg = None,
) -> InitImage:
    """webui's per-image steps: flatten → resize (unless "only masked" or mode 3) → overlay →
    crop and "resize and fill" ("only masked") → `fill_masked` (inpainting_fill != 1, as webui:
    also for latent noise/nothing). `upscaler` is opts.upscaler_for_img2img.

    Where webui would crash (mode 3 with a mask and fill: the image keeps its size but the mask
    is width×height) the mask is fitted to the image with "resize and fill" instead.
    """
    check_resize_mode(resize_mode)
    flat = flatten(image, background)
    plan = mask if mask is not None and mask.mask is not None else None
    region = plan.crop if plan is not None else None
    if region is None and resize_mode != 3:
        flat = resize_image(resize_mode, flat, width, height, upscaler=upscaler)
    if plan is None or plan.overlay_mask is None:
        return InitImage(flat)

    overlay_mask = plan.overlay_mask
    if overlay_mask.size != flat.size:
        overlay_mask = _resize_mask(resize_mode, overlay_mask, flat.width, flat.height)
    overlay = make_overlay(flat, overlay_mask)

    processed = flat
    if region is not None:
        processed = resize_image(2, flat.crop(region.box), width, height, upscaler=upscaler)
    if inpainting_fill != 1:
        fill_mask = plan.mask
        assert fill_mask is not None
        if fill_mask.size != processed.size:
            fill_mask = _resize_mask(2, fill_mask, processed.width, processed.height)
        processed = fill_masked(processed, fill_mask)
    return InitImage(processed, overlay, region)


def finish_image(
    generated: Image.Image, init: InitImage, *, upscaler: UpscalerArg = None
) -> Image.Image:
    """webui `apply_overlay` (opts.overlay_inpaint): paste an "only masked" result back into
    the init image and lay the original unmasked pixels over it. No overlay: unchanged."""
    if init.overlay is None:
        return generated
    if init.paste_to is not None:
        generated = _uncrop(generated, init.overlay.size, init.paste_to, upscaler)
    return _composite(generated, init.overlay)


__all__ = [
    "BLANK_MASK_COMMENT",
    "DEFAULT_BACKGROUND",
    "DEFAULT_HR_UPSCALER",
    "LATENT_FACTOR",
    "LATENT_UPSCALE_MODES",
    "PIXEL_UPSCALERS",
    "RESIZE_MODES",
    "CropRegion",
    "HiresTarget",
    "HiresUpscaler",
    "InitImage",
    "MaskPlan",
    "PixelUpscale",
    "UpscalerArg",
    "available_hr_upscalers",
    "binarize",
    "blur_mask",
    "check_resize_mode",
    "crop_latent",
    "expand_crop_region",
    "fill_masked",
    "finish_image",
    "firstphase_to_hires",
    "flatten",
    "gaussian_kernel_size",
    "hires_target",
    "hr_upscaler_choice",
    "img2img_steps",
    "img2img_upscaler",
    "invert_mask",
    "latent_mask",
    "make_overlay",
    "mask_crop_region",
    "overlay_original",
    "paste_back",
    "prepare_init_image",
    "prepare_mask",
    "resize_image",
    "resize_latent",
    "upscale_latent",
    "upscale_pixels",
]
