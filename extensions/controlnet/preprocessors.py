"""ControlNet preprocessors that need no downloaded weights (numpy and PIL only).

Each follows Mikubill's sd-webui-controlnet `scripts/processor.py`: the image is resized so its
short side is `processor_res` (cubic when enlarging, area when shrinking), edge-padded to a
multiple of 64 for the detector, and the padding is cut off again. The size that resize makes
is checked before any pixel work (`working_size_problem`). Modules that need model weights
(depth, openpose, lineart, ...) are listed so that a request naming one gets a clear "needs
weights" error instead of "unknown".
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Final

import numpy as np
import torch
from PIL import Image

from engine.errors import Problem
from engine.inputs import IMAGE_LIMITS

Array = np.ndarray
DEFAULT_RES: Final = 512


@dataclass(frozen=True)
class Slider:
    name: str
    value: float
    min: float
    max: float
    step: float = 1.0

    def contains(self, value: float) -> bool:
        return self.min <= value <= self.max

    def bound(self, value: float) -> float:
        """The value, or the default outside the range (the extension's bound_check_params)."""
        return value if self.contains(value) else self.value

    def listing(self) -> dict[str, float | str]:
        return {
            "name": self.name,
            "value": self.value,
            "min": self.min,
            "max": self.max,
            "step": self.step,
        }


RESOLUTION: Final = Slider("Preprocessor Resolution", DEFAULT_RES, 64, 2048)
# The extension's default PreprocessorParameter(visible=False): what bounds threshold_a/b of a
# module without that slider (bound_check_params), so -1 becomes 0.5 in the infotext.
HIDDEN_SLIDER: Final = Slider("EMPTY_LABEL", 0.5, 0.0, 1.0, 0.01)
STYLE_FIDELITY: Final = Slider("Style Fidelity (only for Balanced mode)", 0.5, 0.0, 1.0, 0.01)


@dataclass(frozen=True)
class Preprocessor:
    name: str
    run: Callable[[Array, int, float, float], Array]  # (HWC uint8 RGB, res, a, b) -> HWC uint8
    resolution: Slider | None = RESOLUTION  # None: the module ignores processor_res
    slider_a: Slider | None = None
    slider_b: Slider | None = None
    # Inpaint modules: the map is the image plus a mask (the unit's, else img2img's), and the
    # hint carries -1 where the mask is set (the extension's "ControlNet inpaint protocol").
    uses_mask: bool = False
    # The extension's `do_not_need_model`: the unit runs without a ControlNet model (the
    # reference modules, see reference.py); `model` is then ignored.
    model_free: bool = False

    def sliders(self) -> list[dict[str, float | str]]:
        return [s.listing() for s in (self.resolution, self.slider_a, self.slider_b) if s]


# --------------------------------------------------------------------------------------------
# Resizing helpers (Mikubill utils.resize_image_with_pad)


def _resize(img: Array, width: int, height: int) -> Array:
    # cv2.INTER_CUBIC when enlarging, INTER_AREA (a box average) when shrinking, as Mikubill.
    enlarge = width * height > img.shape[0] * img.shape[1]
    resample = Image.Resampling.BICUBIC if enlarge else Image.Resampling.BOX
    return np.asarray(Image.fromarray(img).resize((width, height), resample))


def _scaled_size(size: tuple[int, int], res: int) -> tuple[int, int]:
    """(width, height) with the short side at `res`, rounded as resize_image_with_pad."""
    width, height = size
    k = res / min(width, height)
    return round(width * k), round(height * k)


def _short_side(img: Array, res: int) -> Array:
    width, height = _scaled_size((img.shape[1], img.shape[0]), res)
    if (height, width) == img.shape[:2]:
        return img
    return _resize(img, width, height)


def _padded(img: Array) -> Array:
    pad_h = -img.shape[0] % 64
    pad_w = -img.shape[1] % 64
    return np.pad(img, ((0, pad_h), (0, pad_w), (0, 0)), mode="edge")


def _with_pad(detector: Callable[[Array], Array]) -> Callable[[Array, int], Array]:
    """Resize to the resolution, pad to 64, detect, unpad (resize_image_with_pad)."""

    def run(img: Array, res: int) -> Array:
        resized = _short_side(img, res)
        result = detector(_padded(resized))
        return result[: resized.shape[0], : resized.shape[1]]

    return run


def _rgb(gray: Array) -> Array:
    return np.repeat(gray[:, :, None], 3, axis=2) if gray.ndim == 2 else gray


# --------------------------------------------------------------------------------------------
# Canny (what cv2.Canny computes: 3x3 Sobel on every channel, the strongest channel's L1
# gradient, non-maximum suppression, hysteresis). cv2.Canny applies no Gaussian blur of its
# own and Mikubill's canny adds none, so neither do we: the same image gives the same edges.


def _sobel(channel: Array) -> tuple[Array, Array]:
    p = np.pad(channel, 1, mode="reflect")  # cv2's default border (BORDER_REFLECT_101)
    gx = (p[:-2, 2:] + 2 * p[1:-1, 2:] + p[2:, 2:]) - (p[:-2, :-2] + 2 * p[1:-1, :-2] + p[2:, :-2])
    gy = (p[2:, :-2] + 2 * p[2:, 1:-1] + p[2:, 2:]) - (p[:-2, :-2] + 2 * p[:-2, 1:-1] + p[:-2, 2:])
    return gx, gy


def _gradients(img: Array) -> tuple[Array, Array, Array]:
    """Per pixel, the gradient of the channel with the largest L1 magnitude (as cv2)."""
    data = img.astype(np.float64)
    best_gx = best_gy = best_mag = None
    for c in range(data.shape[2]):
        gx, gy = _sobel(data[:, :, c])
        mag = np.abs(gx) + np.abs(gy)
        if best_mag is None or best_gx is None or best_gy is None:
            best_gx, best_gy, best_mag = gx, gy, mag
            continue
        take = mag > best_mag
        best_gx = np.where(take, gx, best_gx)
        best_gy = np.where(take, gy, best_gy)
        best_mag = np.where(take, mag, best_mag)
    assert best_gx is not None and best_gy is not None and best_mag is not None
    return best_gx, best_gy, best_mag


_TAN_22_5 = np.tan(np.pi / 8)


def _non_max_suppression(gx: Array, gy: Array, mag: Array) -> Array:
    """Keep pixels that are maxima along their gradient direction (4 sectors, as cv2)."""
    padded = np.pad(mag, 1)
    h, w = mag.shape

    def shifted(dy: int, dx: int) -> Array:
        return padded[1 + dy : 1 + dy + h, 1 + dx : 1 + dx + w]

    ax, ay = np.abs(gx), np.abs(gy)
    horizontal = ay <= ax * _TAN_22_5  # gradient along x: compare left/right
    vertical = ay > ax / _TAN_22_5  # gradient along y: compare up/down
    same_sign = (gx * gy) > 0
    # cv2 is strict on one side and loose on the other so plateaus keep one pixel.
    keep = np.zeros_like(mag, dtype=bool)
    keep |= horizontal & (mag > shifted(0, -1)) & (mag >= shifted(0, 1))
    keep |= vertical & (mag > shifted(-1, 0)) & (mag >= shifted(1, 0))
    diagonal = ~horizontal & ~vertical
    keep |= diagonal & same_sign & (mag > shifted(-1, -1)) & (mag > shifted(1, 1))
    keep |= diagonal & ~same_sign & (mag > shifted(-1, 1)) & (mag > shifted(1, -1))
    return keep


def _hysteresis(candidates: Array, strong: Array) -> Array:
    """Candidates 8-connected to a strong pixel: label the candidates' 8-connected components
    once and keep every component holding a strong pixel (what cv2's flood fill reaches,
    without a per-pixel Python loop: a noisy 2048x2048 map has millions of candidates)."""
    from scipy import ndimage

    labels, count = ndimage.label(candidates, structure=np.ones((3, 3), dtype=bool))
    if count == 0:
        return np.zeros_like(candidates)
    keep = np.zeros(count + 1, dtype=bool)
    keep[np.unique(labels[strong & candidates])] = True
    keep[0] = False  # the background
    result: Array = keep[labels]
    return result


def canny_edges(img: Array, low: float, high: float) -> Array:
    """cv2.Canny(img, low, high): uint8 HxW, 255 on edges."""
    low, high = min(low, high), max(low, high)
    gx, gy, mag = _gradients(img)
    maxima = _non_max_suppression(gx, gy, mag)
    edges = _hysteresis(maxima & (mag > low), maxima & (mag > high))
    return edges.astype(np.uint8) * 255


def _canny(img: Array, res: int, a: float, b: float) -> Array:
    return _rgb(_with_pad(lambda x: canny_edges(x, a, b))(img, res))


# --------------------------------------------------------------------------------------------
# The simple ones


def _none(img: Array, res: int, a: float, b: float) -> Array:
    return img


def _invert(img: Array, res: int, a: float, b: float) -> Array:
    # Mikubill: 255 - image, at the input size ("invert (from white bg & black line)").
    return 255 - img


def _threshold(img: Array, res: int, a: float, b: float) -> Array:
    # Mikubill `threshold`: white where every channel is above the threshold.
    def detect(x: Array) -> Array:
        return _rgb(np.where(x.min(axis=2) > a, 255, 0).astype(np.uint8))

    return _with_pad(detect)(img, res)


def _otsu(gray: Array) -> float:
    hist = np.bincount(gray.ravel(), minlength=256).astype(np.float64)
    total = hist.sum()
    levels = np.arange(256)
    w0 = np.cumsum(hist)
    w1 = total - w0
    m0 = np.cumsum(hist * levels)
    mean_all = m0[-1]
    with np.errstate(divide="ignore", invalid="ignore"):
        between = (mean_all * w0 / total - m0) ** 2 / (w0 * w1)
    between = np.nan_to_num(between)
    return float(np.argmax(between))


def _gray(img: Array) -> Array:
    # cv2.COLOR_RGB2GRAY weights.
    return np.asarray(Image.fromarray(img).convert("L"))


def _binary(img: Array, res: int, a: float, b: float) -> Array:
    # Mikubill `binary`: grey, then cv2.threshold (Otsu when the threshold is 0), inverted:
    # dark lines on a light background become white lines.
    def detect(x: Array) -> Array:
        gray = _gray(x)
        level = _otsu(gray) if a == 0 else a
        return _rgb(np.where(gray > level, 0, 255).astype(np.uint8))

    return _with_pad(detect)(img, res)


def _tile_resample(img: Array, res: int, a: float, b: float) -> Array:
    # Mikubill: shrink the input by the "Down Sampling Rate" (threshold_a) with INTER_AREA;
    # below 1.1 the image is used as it is.
    if a < 1.1:
        return img
    height, width = int(img.shape[0] / a), int(img.shape[1] / a)
    return _resize(img, max(1, width), max(1, height))


def _color(img: Array, res: int, a: float, b: float) -> Array:
    # Mikubill `color` (t2ia_color_grid): cubic down to 1/64, nearest back up.
    resized = _short_side(img, res)
    h, w = resized.shape[:2]
    small = Image.fromarray(resized).resize(
        (max(1, w // 64), max(1, h // 64)), Image.Resampling.BICUBIC
    )
    return np.asarray(small.resize((w, h), Image.Resampling.NEAREST))


def _gauss_kernel(sigma: float, *, uint8: bool) -> Array:
    # cv2.getGaussianKernel with ksize (0, 0): round(sigma * (3 if uint8 else 4) * 2 + 1) | 1.
    size = round(sigma * (3 if uint8 else 4) * 2 + 1) | 1
    x = np.arange(size) - size // 2
    kernel = np.exp(-(x**2) / (2 * sigma * sigma))
    result: Array = kernel / kernel.sum()
    return result


def _reflect_101(n: int, radius: int) -> torch.Tensor:
    """Source index of every padded position (cv2's BORDER_REFLECT_101, reflected as often
    as a kernel wider than the image needs)."""
    positions = torch.arange(-radius, n + radius)
    if n == 1:
        return torch.zeros_like(positions)
    period = 2 * (n - 1)
    folded = positions.remainder(period)
    return torch.where(folded >= n, period - folded, folded)


def _convolve_last(x: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """Every row of (C, H, W) convolved along W with a symmetric kernel, reflect-101 border.

    Through the FFT: the cost does not grow with the kernel (sigma 64 on a uint8 image is a
    385-tap kernel; at a 2048 short side a direct convolution is tens of GFLOP)."""
    radius = kernel.numel() // 2
    padded = x.index_select(2, _reflect_101(x.shape[2], radius))
    n = padded.shape[2]
    # Circular correlation of length n: outputs 0..W-1 read padded[j .. j + 2r] with no wrap.
    spectrum = torch.fft.rfft(padded, n=n) * torch.fft.rfft(kernel, n=n).conj()
    return torch.fft.irfft(spectrum, n=n)[..., : x.shape[2]]


def gaussian_blur(img: Array, sigma: float) -> Array:
    """cv2.GaussianBlur(img, (0, 0), sigma) on an HxWxC array (reflect-101 border), as two
    separable torch convolutions. The kernel size follows cv2's rule for the array's type
    (uint8 images get 6 sigma, float ones 8 sigma)."""
    if sigma <= 0:
        return img.astype(np.float32)
    kernel = torch.from_numpy(_gauss_kernel(sigma, uint8=img.dtype == np.uint8)).float()
    x = torch.from_numpy(np.ascontiguousarray(img, dtype=np.float32)).permute(2, 0, 1)
    with torch.inference_mode():
        x = _convolve_last(x, kernel)  # along width
        x = _convolve_last(x.transpose(1, 2).contiguous(), kernel).transpose(1, 2)  # height
    result: Array = x.permute(1, 2, 0).contiguous().numpy()
    return result


def _blur_gaussian(img: Array, res: int, a: float, b: float) -> Array:
    # Mikubill `blur_gaussian`: short side to the resolution, Gaussian blur of sigma threshold_a.
    resized = _short_side(img, res)
    return np.clip(np.round(gaussian_blur(resized, a)), 0, 255).astype(np.uint8)


def _scribble_xdog(img: Array, res: int, a: float, b: float) -> Array:
    # Mikubill `scribble_xdog`: difference of Gaussians (0.5 and 5.0), thresholded at a.
    def detect(x: Array) -> Array:
        g1 = gaussian_blur(x.astype(np.float32), 0.5)
        g2 = gaussian_blur(x.astype(np.float32), 5.0)
        dog = (255 - np.min(g2 - g1, axis=2)).clip(0, 255).astype(np.uint8)
        return _rgb(np.where(2 * (255 - dog.astype(np.int32)) > a, 255, 0).astype(np.uint8))

    return _with_pad(detect)(img, res)


def _scribble_thr(img: Array, res: int, a: float, b: float) -> Array:
    # Mikubill `scribble_thr` (invert (from white bg & black line) for scribbles).
    def detect(x: Array) -> Array:
        return _rgb(np.where(x.min(axis=2) < 127, 255, 0).astype(np.uint8))

    return _with_pad(detect)(img, res)


PREPROCESSORS: Final[Mapping[str, Preprocessor]] = MappingProxyType(
    {
        p.name: p
        for p in (
            Preprocessor("none", _none, resolution=None),
            Preprocessor(
                "canny",
                _canny,
                slider_a=Slider("Canny Low Threshold", 100, 1, 255),
                slider_b=Slider("Canny High Threshold", 200, 1, 255),
            ),
            Preprocessor("invert", _invert, resolution=None),
            Preprocessor(
                "threshold", _threshold, slider_a=Slider("Binarization Threshold", 127, 0, 255)
            ),
            Preprocessor("binary", _binary, slider_a=Slider("Binary threshold", 0, 0, 255)),
            Preprocessor(
                "tile_resample",
                _tile_resample,
                resolution=None,
                slider_a=Slider("Down Sampling Rate", 1.0, 1.0, 8.0, 0.01),
            ),
            Preprocessor("color", _color),
            Preprocessor(
                "blur_gaussian", _blur_gaussian, slider_a=Slider("Sigma", 9.0, 0.01, 64.0, 0.01)
            ),
            Preprocessor(
                "scribble_xdog", _scribble_xdog, slider_a=Slider("XDoG Threshold", 32, 1, 64)
            ),
            Preprocessor("scribble_thr", _scribble_thr),
            # Mikubill scripts/preprocessor/inpaint.py: both return the image unchanged (the
            # mask travels as alpha); inpaint_only also restores the unmasked area (see
            # extension.py for where that is supported).
            Preprocessor("inpaint", _none, resolution=None, uses_mask=True),
            Preprocessor("inpaint_only", _none, resolution=None, uses_mask=True),
            # Mikubill preprocessor_compiled.py: identity, no resolution, model_free; the map is
            # the reference image (see reference.py for what the UNet does with it).
            *(
                Preprocessor(
                    name,
                    _none,
                    resolution=None,
                    slider_a=STYLE_FIDELITY,
                    model_free=True,
                )
                for name in ("reference_only", "reference_adain", "reference_adain+attn")
            ),
        )
    }
)

# UI labels and legacy names (Mikubill preprocessor_aliases, Forge's capitalised names).
ALIASES: Final[Mapping[str, str]] = MappingProxyType(
    {
        "invert (from white bg & black line)": "invert",
        "t2ia_color_grid": "color",
        "tile_resample": "tile_resample",
        "blur": "blur_gaussian",
        "canny_edge": "canny",
        "inpaint_global_harmonious": "inpaint",
    }
)

# Modules webui offers that need detector weights this server does not ship.
NEEDS_WEIGHTS: Final = frozenset(
    {
        "depth",
        "depth_midas",
        "depth_leres",
        "depth_leres++",
        "depth_zoe",
        "depth_anything",
        "depth_anything_v2",
        "depth_hand_refiner",
        "normal_map",
        "normal_midas",
        "normal_bae",
        "normal_dsine",
        "openpose",
        "openpose_face",
        "openpose_faceonly",
        "openpose_full",
        "openpose_hand",
        "dw_openpose_full",
        "animal_openpose",
        "densepose",
        "densepose_parula",
        "lineart",
        "lineart_realistic",
        "lineart_coarse",
        "lineart_anime",
        "lineart_anime_denoise",
        "lineart_standard",
        "mlsd",
        "hed",
        "hed_safe",
        "softedge_hed",
        "softedge_hedsafe",
        "softedge_pidinet",
        "softedge_pidisafe",
        "softedge_teed",
        "te_hed",
        "pidinet",
        "pidinet_safe",
        "pidinet_sketch",
        "pidinet_scribble",
        "scribble_hed",
        "scribble_pidinet",
        "fake_scribble",
        "segmentation",
        "seg_ofade20k",
        "seg_ofcoco",
        "seg_ufade20k",
        "seg_anime_face",
        "oneformer_coco",
        "oneformer_ade20k",
        "anime_face_segment",
        "shuffle",
        "clip_vision",
        "t2ia_style_clipvision",
        "t2ia_sketch_pidi",
        "inpaint_only+lama",
        "tile_colorfix",
        "tile_colorfix+sharp",
        "recolor_luminance",
        "recolor_intensity",
        "revision_clipvision",
        "revision_ignore_prompt",
        "ip-adapter_clip_sd15",
        "ip-adapter_clip_sdxl",
        "ip-adapter_clip_sdxl_plus_vith",
        "ip-adapter_face_id",
        "ip-adapter_face_id_plus",
        "instant_id_face_embedding",
        "instant_id_face_keypoints",
        "mediapipe_face",
    }
)


# --------------------------------------------------------------------------------------------
# The size a preprocessor works at, checked before it runs


def working_size(pre: Preprocessor, size: tuple[int, int], res: int) -> tuple[int, int]:
    """(width, height) of the map `pre` makes from an image of `size` at resolution `res`
    (before the 64-padding; modules without a resolution work at the image's size)."""
    return size if pre.resolution is None else _scaled_size(size, res)


def working_size_problem(
    pre: Preprocessor, size: tuple[int, int], res: int, field: str
) -> Problem | None:
    """A problem naming `field` (where the image came from) when that map is empty or too
    large, else None.

    The short side goes to the resolution, so the long side grows with the aspect ratio: a
    1x4096 image at 512 is a 512x2097152 map (canny's float64 gradients alone need ~24 GiB),
    and pixel_perfect can pick a resolution that rounds to 0. Mikubill's resize_image_with_pad
    (scripts/preprocessor/legacy/processor.py) has no bound and would try either. The limit is
    the one request images already have (engine/inputs.py IMAGE_LIMITS): a map no larger than
    the largest image a client may send."""
    width, height = working_size(pre, size, res)
    limits = IMAGE_LIMITS
    if (
        min(width, height) >= 1
        and max(width, height) <= limits.max_side
        and width * height <= limits.max_pixels
    ):
        return None
    return Problem(
        field,
        f"{size[0]}x{size[1]} image",
        f"{pre.name} scales the short side to its resolution {res} (processor_res, or the one "
        f"pixel_perfect picks), which makes a {width}x{height} map; a map must be at least 1 "
        f"and at most {limits.max_side} pixels a side and at most {limits.max_pixels:,} pixels "
        "(the request image limits): send a less elongated image or change processor_res or "
        "pixel_perfect",
    )


def find_preprocessor(name: str) -> Preprocessor | None:
    """The preprocessor a request names (case-insensitive; UI labels and legacy aliases)."""
    key = name.strip().lower()
    key = ALIASES.get(key, key)
    return PREPROCESSORS.get(key)


def run_preprocessor(
    pre: Preprocessor, image: Image.Image, res: int, a: float, b: float
) -> Image.Image:
    """The detected map of an RGB image, as an RGB image. Callers check working_size_problem
    first (extension.py does, before it loads the unit's model)."""
    array = np.asarray(image.convert("RGB"))
    return Image.fromarray(np.ascontiguousarray(pre.run(array, res, a, b))).convert("RGB")
