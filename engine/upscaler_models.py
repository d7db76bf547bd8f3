"""Upscaler models from the `upscalers/` folder: the architectures, their loading, and webui's
tiled upscale.

The architectures are written here from their published layouts (no package: `spandrel`, which
webui uses, imports torchvision at import time, and PyPI's torchvision does not import beside
this project's pinned CPU torch; README "Packages"):

- ESRGAN's RRDBNet, in both key layouts real files use: the original ESRGAN one
  (`model.0.weight`, `model.1.sub.N.RDB1.conv1.0.weight`, ..., e.g. 4x-UltraSharp, ESRGAN_4x)
  and BasicSR's (`conv_first`, `body.N.rdb1.conv1`, `conv_body`, `conv_up1`, ..., `conv_hr`,
  `conv_last`; Real-ESRGAN x4plus / x4plus_anime_6B / x2plus, wrapped in `params_ema` or
  `params`). Scale 1 and 2 models see a pixel-unshuffled input (Real-ESRGAN's way); the block
  count, channel width and growth channels come from the keys.
- Real-ESRGAN's SRVGGNetCompact (`body.N.weight`: convolutions and PReLUs, then a pixel
  shuffle; realesr-general-x4v3, realesr-animevideov3).
- SwinIR (engine/upscaler_swinir.py), every upsampler its released files use (webui's
  "SwinIR 4x" is the real-world x4 one), run as webui's SwinIR upscaler runs it: in float32,
  tiled by `upscale_2` (tiles averaged in tensor space) with the `SWIN_tile` options.
- DAT (engine/upscaler_dat.py), every variant (DAT, DAT-S, DAT-2, DAT-light), run as webui's
  DAT upscaler runs it: in float32, tiled by `upscale_with_model` with the `DAT_tile` options.
- HAT (engine/upscaler_hat.py), run as webui's HAT upscaler runs it: in float32, tiled by
  `upscale_with_model` with the `ESRGAN_tile` options (webui's HAT class reads those).

Each kind's way of running (tiling, tile options, half precision, listed model_name) is one
row of KINDS. Anything else (Swin2SR, SCUNet, an unknown layout, a pickle that is
not weights-only) is skipped at setup with its reason in the log and never offered. `.pth`
files are read with `torch.load(weights_only=True)`, so no code in a pickle ever runs;
`.safetensors` with safetensors. Only files the catalog found inside the models folder are opened.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from .upscaler_arch import Architecture, Unsupported
from .upscaler_dat import DAT, DAT_ALIASES, DAT_NAMES, recognise_dat
from .upscaler_dat import KEY as DAT_KEY
from .upscaler_hat import HAT, recognise_hat
from .upscaler_hat import KEY as HAT_KEY
from .upscaler_swinir import KEY as SWINIR_KEY
from .upscaler_swinir import SWINIR_NAMES, SwinIR, pad_to, recognise_swinir
from .working_set import WorkingSet, module_entry

__all__ = ["Architecture", "Unsupported"]  # shared with engine/upscaler_swinir.py

log = logging.getLogger(__name__)


# webui's options `ESRGAN_tile` / `ESRGAN_tile_overlap` (shared_options.py): tile side and
# overlap in input pixels; tile 0 upscales the whole image at once.
DEFAULT_TILE: Final = 192
DEFAULT_TILE_OVERLAP: Final = 8

# The names webui gives the Real-ESRGAN release files (modules/realesrgan_model.py:
# get_realesrgan_models), by file stem. Any other file is named by its stem, as webui's
# ESRGAN upscaler names the files of models/ESRGAN (modelloader.friendly_name).
WEBUI_NAMES: Final[Mapping[str, str]] = {
    "realesr-general-x4v3": "R-ESRGAN General 4xV3",
    "realesr-general-wdn-x4v3": "R-ESRGAN General WDN 4xV3",
    "realesr-animevideov3": "R-ESRGAN AnimeVideo",
    "RealESRGAN_x4plus": "R-ESRGAN 4x+",
    "RealESRGAN_x4plus_anime_6B": "R-ESRGAN 4x+ Anime6B",
    "RealESRGAN_x2plus": "R-ESRGAN 2x+",
}


# --------------------------------------------------------------------------------------------
# Architectures
# --------------------------------------------------------------------------------------------


class _DenseBlock(nn.Module):
    """ESRGAN's residual dense block: five 3x3 convs, each seeing all earlier outputs."""

    def __init__(self, nf: int, gc: int):
        super().__init__()
        self.convs = nn.ModuleList(
            nn.Conv2d(nf + i * gc, gc if i < 4 else nf, 3, 1, 1) for i in range(5)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feats = [x]
        for index, conv in enumerate(self.convs):
            out = conv(torch.cat(feats, 1))
            if index < 4:
                feats.append(F.leaky_relu(out, 0.2))
        return out * 0.2 + x


class _RRDB(nn.Module):
    """Residual-in-residual dense block: three dense blocks, scaled residual."""

    def __init__(self, nf: int, gc: int):
        super().__init__()
        self.blocks = nn.Sequential(*(_DenseBlock(nf, gc) for _ in range(3)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(x) * 0.2 + x


class RRDBNet(nn.Module):
    """ESRGAN's generator. `unshuffle` 1/2/4: the input is pixel-unshuffled by it first
    (Real-ESRGAN's x2/x1 models), `upsamples` nearest x2 steps each followed by a conv."""

    def __init__(self, nf: int, gc: int, blocks: int, upsamples: int, unshuffle: int):
        super().__init__()
        self.unshuffle = unshuffle
        self.conv_first = nn.Conv2d(3 * unshuffle * unshuffle, nf, 3, 1, 1)
        self.body = nn.Sequential(*(_RRDB(nf, gc) for _ in range(blocks)))
        self.conv_body = nn.Conv2d(nf, nf, 3, 1, 1)
        self.ups = nn.ModuleList(nn.Conv2d(nf, nf, 3, 1, 1) for _ in range(upsamples))
        self.conv_hr = nn.Conv2d(nf, nf, 3, 1, 1)
        self.conv_last = nn.Conv2d(nf, 3, 3, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        height, width = x.shape[-2:]
        if self.unshuffle > 1:
            # Sides that do not divide are reflect-padded first and the result cut back, as
            # Real-ESRGAN does (its mod_pad) for its x2/x1 models.
            pad_h, pad_w = (-height) % self.unshuffle, (-width) % self.unshuffle
            if pad_h or pad_w:
                x = F.pad(x, (0, pad_w, 0, pad_h), mode="reflect")
            x = F.pixel_unshuffle(x, self.unshuffle)
        feat = self.conv_first(x)
        feat = feat + self.conv_body(self.body(feat))
        for conv in self.ups:
            feat = F.leaky_relu(conv(F.interpolate(feat, scale_factor=2, mode="nearest")), 0.2)
        out = self.conv_last(F.leaky_relu(self.conv_hr(feat), 0.2))
        scale = 2 ** len(self.ups) // self.unshuffle
        return out[..., : height * scale, : width * scale]


class SRVGGNetCompact(nn.Module):
    """Real-ESRGAN's compact net: conv + PReLU pairs, a last conv to 3*s*s channels, pixel
    shuffle by s, plus the nearest-upsampled input."""

    def __init__(self, layers: list[tuple[str, int, int]], scale: int):
        super().__init__()
        self.scale = scale
        modules: list[nn.Module] = []
        for kind, cin, cout in layers:
            modules.append(nn.Conv2d(cin, cout, 3, 1, 1) if kind == "conv" else nn.PReLU(cout))
        self.body = nn.Sequential(*modules)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.pixel_shuffle(self.body(x), self.scale)
        return out + F.interpolate(x, scale_factor=self.scale, mode="nearest")


# --------------------------------------------------------------------------------------------
# Recognising a state dict
# --------------------------------------------------------------------------------------------

_OTHER_ARCHES: Final = (
    # (a key pattern, what it is): layouts recognised only to say why they are skipped. Checked
    # before SwinIR's: Swin2SR shares SwinIR's `layers.i.residual_group.blocks.j` keys.
    (re.compile(r"\.attn\.logit_scale$|\.attn\.cpb_mlp\."), "Swin2SR"),
    (re.compile(r"(^|\.)m_head\.|(^|\.)m_down1\."), "SCUNet"),
)
SUPPORTED: Final = (
    "ESRGAN/RRDBNet (original and BasicSR key layouts), Real-ESRGAN SRVGGNetCompact, SwinIR, "
    "DAT and HAT"
)


def unwrap(state: Any) -> dict[str, torch.Tensor]:
    """The weights of a loaded file: Real-ESRGAN files wrap them in `params_ema` (or
    `params`); the EMA copy is what Real-ESRGAN's own inference uses."""
    if not isinstance(state, Mapping):
        raise Unsupported(f"holds a {type(state).__name__}, not a state dict")
    for key in ("params_ema", "params"):
        if isinstance(state.get(key), Mapping):
            state = state[key]
            break
    tensors = {k: v for k, v in state.items() if isinstance(k, str) and torch.is_tensor(v)}
    if not tensors:
        raise Unsupported("holds no tensors")
    return tensors


def _shape(sd: Mapping[str, torch.Tensor], key: str) -> tuple[int, ...]:
    return tuple(sd[key].shape)


def _old_to_new(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The original ESRGAN layout renamed into BasicSR's: `model.0` conv_first,
    `model.1.sub.N.RDBk.convj.0` the blocks, `model.1.sub.<last>` conv_body, then the
    upsampling convs and the last two convs (conv_hr, conv_last) by their index order."""
    out: dict[str, torch.Tensor] = {}
    block = re.compile(r"model\.1\.sub\.(\d+)\.RDB(\d)\.conv(\d)\.0\.(weight|bias)$")
    body = re.compile(r"model\.1\.sub\.(\d+)\.(weight|bias)$")
    tail = re.compile(r"model\.(\d+)\.(weight|bias)$")
    tail_convs: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in sd.items():
        if m := block.match(key):
            out[f"body.{m[1]}.rdb{m[2]}.conv{m[3]}.{m[4]}"] = value
        elif m := body.match(key):
            out[f"conv_body.{m[2]}"] = value
        elif m := tail.match(key):
            index = int(m[1])
            if index == 0:
                out[f"conv_first.{m[2]}"] = value
            else:
                tail_convs.setdefault(index, {})[m[2]] = value
        else:
            raise Unsupported(f"has a key the original ESRGAN layout does not: {key!r}")
    order = sorted(tail_convs)
    if len(order) < 2:
        raise Unsupported("has no conv_hr/conv_last after the trunk (model.N after model.1)")
    names = [f"conv_up{i + 1}" for i in range(len(order) - 2)] + ["conv_hr", "conv_last"]
    for name, index in zip(names, order, strict=True):
        for part, value in tail_convs[index].items():
            out[f"{name}.{part}"] = value
    return out


def _rrdb_arch(sd: Mapping[str, torch.Tensor]) -> tuple[Architecture, dict[str, Any]]:
    need = ("conv_first.weight", "conv_body.weight", "conv_hr.weight", "conv_last.weight")
    if missing := [k for k in need if k not in sd]:
        raise Unsupported(f"RRDBNet without {', '.join(missing)}")
    nf, in_ch = _shape(sd, "conv_first.weight")[:2]
    if _shape(sd, "conv_last.weight")[0] != 3:
        raise Unsupported(f"RRDBNet with {_shape(sd, 'conv_last.weight')[0]} output channels")
    unshuffle = {3: 1, 12: 2, 48: 4}.get(in_ch)
    if unshuffle is None:
        raise Unsupported(f"RRDBNet with {in_ch} input channels (only RGB: 3, 12 or 48)")
    blocks = (
        1 + max(int(k.split(".")[1]) for k in sd if k.startswith("body."))
        if any(k.startswith("body.") for k in sd)
        else 0
    )
    gc = _shape(sd, "body.0.rdb1.conv1.weight")[0] if blocks else 32
    ups = 0
    while f"conv_up{ups + 1}.weight" in sd:
        ups += 1
    scale_num = 2**ups
    if scale_num % unshuffle:
        raise Unsupported(f"RRDBNet with {ups} upsamplings over a x{unshuffle} unshuffle")
    scale = scale_num // unshuffle
    args = {"nf": nf, "gc": gc, "blocks": blocks, "upsamples": ups, "unshuffle": unshuffle}
    text = f"ESRGAN x{scale} ({blocks} blocks, {nf} channels, growth {gc})"
    return Architecture("ESRGAN", scale, text), args


def _srvgg_arch(sd: Mapping[str, torch.Tensor]) -> tuple[Architecture, dict[str, Any]]:
    indices = sorted({int(k.split(".")[1]) for k in sd})
    if indices != list(range(len(indices))):
        raise Unsupported("SRVGGNetCompact with parameter-free activations (only PReLU)")
    layers: list[tuple[str, int, int]] = []
    for i in indices:
        shape = _shape(sd, f"body.{i}.weight")
        if len(shape) == 4:
            layers.append(("conv", shape[1], shape[0]))
        elif len(shape) == 1:
            layers.append(("prelu", shape[0], shape[0]))
        else:
            raise Unsupported(f"SRVGGNetCompact layer body.{i} of shape {shape}")
    if layers[0][:2] != ("conv", 3) or layers[-1][0] != "conv":
        raise Unsupported("SRVGGNetCompact that does not start from RGB and end with a conv")
    scale = math.isqrt(layers[-1][2] // 3)
    if scale < 1 or 3 * scale * scale != layers[-1][2]:
        raise Unsupported(f"SRVGGNetCompact ending in {layers[-1][2]} channels (not 3*s*s)")
    convs = sum(1 for kind, *_ in layers if kind == "conv")
    text = f"SRVGGNetCompact x{scale} ({convs} convs, {layers[0][2]} channels)"
    return Architecture("SRVGGNetCompact", scale, text), {"layers": layers, "scale": scale}


def recognise(sd: Mapping[str, torch.Tensor]) -> tuple[Architecture, dict[str, Any], dict]:
    """(architecture, constructor arguments, the state dict in the module's own key layout),
    or `Unsupported` saying what the file is and what is supported."""
    for pattern, name in _OTHER_ARCHES:
        if any(pattern.search(k) for k in sd):
            raise Unsupported(f"a {name} model; supported here: {SUPPORTED}")
    if any(DAT_KEY.match(k) for k in sd):
        arch, dat_config, weights = recognise_dat(sd)
        return arch, {"config": dat_config}, weights
    if any(HAT_KEY.match(k) for k in sd):  # before SwinIR's: HAT shares its block keys
        arch, hat_config, weights = recognise_hat(sd)
        return arch, {"config": hat_config}, weights
    if any(SWINIR_KEY.match(k) for k in sd):
        arch, config, weights = recognise_swinir(sd)
        return arch, {"config": config}, weights
    if "model.0.weight" in sd and any(k.startswith("model.1.sub.") for k in sd):
        sd = _old_to_new(sd)
    if "conv_first.weight" in sd:
        arch, args = _rrdb_arch(sd)
        return arch, args, _rrdb_keys(sd, args["upsamples"])
    if "body.0.weight" in sd and all(re.fullmatch(r"body\.\d+\.(weight|bias)", k) for k in sd):
        arch, args = _srvgg_arch(sd)
        return arch, args, dict(sd)
    sample = ", ".join(sorted(sd)[:3])
    raise Unsupported(f"an unknown layout (keys {sample}, ...); supported here: {SUPPORTED}")


def _rrdb_keys(sd: Mapping[str, torch.Tensor], upsamples: int) -> dict[str, torch.Tensor]:
    """BasicSR names -> this module's parameter names."""
    out: dict[str, torch.Tensor] = {}
    rdb = re.compile(r"body\.(\d+)\.rdb(\d)\.conv(\d)\.(weight|bias)$")
    for key, value in sd.items():
        if m := rdb.match(key):
            out[f"body.{m[1]}.blocks.{int(m[2]) - 1}.convs.{int(m[3]) - 1}.{m[4]}"] = value
        elif m := re.match(r"conv_up(\d+)\.(weight|bias)$", key):
            if int(m[1]) > upsamples:
                raise Unsupported(f"RRDBNet with a gap in its upsampling convs ({key})")
            out[f"ups.{int(m[1]) - 1}.{m[2]}"] = value
        elif key.split(".")[0] in ("conv_first", "conv_body", "conv_hr", "conv_last"):
            out[key] = value
        else:
            raise Unsupported(f"RRDBNet with an unexpected key {key!r}")
    return out


def build(arch: Architecture, args: Mapping[str, Any], sd: Mapping[str, torch.Tensor]) -> nn.Module:
    """The module with the file's weights (strict: every key must fit)."""
    model = KINDS[arch.kind].build(**args)
    try:
        model.load_state_dict(dict(sd), strict=True)
    except RuntimeError as exc:
        raise Unsupported(f"{arch.describe} whose weights do not fit: {exc}") from None
    return model.eval().requires_grad_(False)


def read_weights(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of `path`: safetensors, or a weights-only torch pickle (a pickle that asks
    for anything but tensors and plain containers is refused by torch, never run)."""
    if path.suffix.lower() == ".safetensors":
        from safetensors.torch import load_file

        try:
            return unwrap(load_file(str(path), device="cpu"))
        except Exception as exc:  # noqa: BLE001 - any unreadable file is skipped with its reason
            raise Unsupported(f"not a readable safetensors file ({exc})") from None
    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - weights_only refusals, truncated files, ...
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise Unsupported(f"not a weights-only torch file ({first[:160]})") from None
    return unwrap(state)


# --------------------------------------------------------------------------------------------
# The catalog of the upscalers/ folder
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class UpscalerFile:
    """One usable file: its webui name, path and what its keys say."""

    name: str
    path: Path
    arch: Architecture

    @property
    def scale(self) -> int:
        return self.arch.scale


def webui_name(path: Path, kind: str) -> str:
    """webui's name for a file of `kind`: its release name, else the file name's stem."""
    return KINDS[kind].names.get(path.stem, path.stem)


@dataclass
class UpscalerCatalog:
    """The usable files of upscalers/ by webui name, the skipped ones with their reason, and
    the models loaded so far (each on first use, then kept)."""

    files: dict[str, UpscalerFile] = field(default_factory=dict)
    skipped: dict[Path, str] = field(default_factory=dict)
    device: str = "cpu"
    dtype: torch.dtype = torch.float32
    # The device working set (engine/working_set.py): loaded models count against
    # SD_DEVICE_MEMORY and an idle one waits in host memory; None: each stays where it loaded.
    memory: WorkingSet | None = None
    _loaded: dict[str, nn.Module] = field(default_factory=dict, repr=False)

    @classmethod
    def scan(
        cls,
        paths: Iterable[Path],
        *,
        reserved: Iterable[str] = (),
        device: str = "cpu",
        dtype: torch.dtype = torch.float32,
        memory: WorkingSet | None = None,
    ) -> UpscalerCatalog:
        """Read each file's keys once: a usable one is listed under its webui name; anything
        else is skipped with the reason logged. `reserved`: names already taken (webui's
        built-in upscalers and latent modes), which a file cannot shadow."""
        taken = set(reserved)
        catalog = cls(device=device, dtype=dtype, memory=memory)
        for path in paths:
            try:
                arch, _, _ = recognise(read_weights(path))
                name = webui_name(path, arch.kind)
                if name in taken:
                    raise Unsupported(f"its upscaler name {name!r} is already taken")
            except Unsupported as exc:
                catalog.skipped[path] = str(exc)
                log.warning("upscalers: %s skipped: %s", path.name, exc)
                continue
            taken.add(name)
            entry = catalog.files[name] = UpscalerFile(name, path, arch)
            log.info("upscalers: %r from %s: %s", name, path.name, arch.describe)
            for alias in KINDS[arch.kind].aliases.get(name, ()):
                if alias not in taken:
                    taken.add(alias)
                    catalog.files[alias] = entry
        return catalog

    @property
    def names(self) -> list[str]:
        """Every name a request may use: the listed ones and their aliases."""
        return list(self.files)

    @property
    def listed(self) -> list[UpscalerFile]:
        """The usable files, once each (the `upscalers` listing; aliases are not listed)."""
        return [entry for key, entry in self.files.items() if key == entry.name]

    def kind(self, name: str) -> Kind:
        """How webui runs the file listed as `name`."""
        return KINDS[self.files[name].arch.kind]

    def model(self, name: str) -> nn.Module:
        """The loaded model of `name` (a listed name), loaded on first use; in the catalog's
        dtype, or float32 for a kind webui never runs in half precision."""
        entry = self.files[name]
        if entry.name not in self._loaded:  # an alias shares its file's model
            if self.memory is not None:
                self.memory.before_load(entry.path.stat().st_size)
            arch, args, sd = recognise(read_weights(entry.path))
            dtype = self.dtype if KINDS[arch.kind].half else torch.float32
            model = build(arch, args, sd).to(device=self.device, dtype=dtype)
            self._loaded[entry.name] = model
        if self.memory is not None:  # on the device for this request
            label = f"{entry.name} ({entry.path.name})"
            self.memory.use(module_entry("upscaler", label, self._loaded[entry.name]))
        return self._loaded[entry.name]

    def upscale(
        self,
        name: str,
        image: Image.Image,
        scale: float,
        *,
        tile: int = DEFAULT_TILE,
        overlap: int = DEFAULT_TILE_OVERLAP,
    ) -> Image.Image:
        """webui `Upscaler.upscale(img, scale)` with this model: up to three model passes
        (tiled as webui tiles this kind) until the /8-rounded target is reached, then LANCZOS
        to exactly that size."""
        model = self.model(name)
        # Looked up per call (not stored in KINDS) so that both stay patchable in tests.
        tiler = {"grid": upscale_with_model, "tensor": upscale_2}[self.kind(name).tiling]
        dest_w = int((image.width * scale) // 8 * 8)
        dest_h = int((image.height * scale) // 8 * 8)
        for i in range(3):
            if image.width >= dest_w and image.height >= dest_h and (i > 0 or scale != 1):
                break
            shape = image.size
            image = tiler(model, image, tile=tile, overlap=overlap)
            if shape == image.size:
                break
        if image.size != (dest_w, dest_h):
            image = image.resize((dest_w, dest_h), Image.Resampling.LANCZOS)
        return image


# --------------------------------------------------------------------------------------------
# Running a model over an image, whole or in webui's tiles
# --------------------------------------------------------------------------------------------


def _to_tensor(image: Image.Image, model: nn.Module) -> torch.Tensor:
    # webui's pil_image_to_torch_bgr: RGB -> BGR, CHW, [0, 1] (ESRGAN files are BGR-trained).
    array = np.asarray(image.convert("RGB"), dtype=np.float32)[:, :, ::-1] / 255.0
    param = next(model.parameters())
    tensor = torch.from_numpy(np.ascontiguousarray(array.transpose(2, 0, 1)))[None]
    return tensor.to(device=param.device, dtype=param.dtype)


def _to_image(tensor: torch.Tensor) -> Image.Image:
    # webui's torch_bgr_to_pil_image: clamp, *255, round, BGR -> RGB.
    array = tensor[0].float().cpu().clamp_(0, 1).numpy()
    array = (255.0 * np.moveaxis(array, 0, 2)).round().astype(np.uint8)[:, :, ::-1]
    return Image.fromarray(np.ascontiguousarray(array), "RGB")


def upscale_patch(model: nn.Module, image: Image.Image) -> Image.Image:
    """One pass of the model over the whole of `image`, called as webui calls it (spandrel's
    descriptor: a DAT tile under 16 pixels padded up first)."""
    with torch.inference_mode():
        return _to_image(_descriptor_call(model, _to_tensor(image, model)))


@dataclass
class _Grid:
    tiles: list[tuple[int, int, list[tuple[int, int, Image.Image]]]]
    tile_w: int
    tile_h: int
    image_w: int
    image_h: int
    overlap: int


def split_grid(image: Image.Image, tile_w: int, tile_h: int, overlap: int) -> _Grid:
    """webui `images.split_grid`: tiles spread evenly; the last ones pushed back inside the
    image. An image smaller than a tile gets one tile at a negative offset: PIL pads the
    outside with black, on the left/top, as in webui."""
    w, h = image.size
    cols = max(1, math.ceil((w - overlap) / (tile_w - overlap)))
    rows = max(1, math.ceil((h - overlap) / (tile_h - overlap)))
    dx = (w - tile_w) / (cols - 1) if cols > 1 else 0
    dy = (h - tile_h) / (rows - 1) if rows > 1 else 0
    grid = _Grid([], tile_w, tile_h, w, h, overlap)
    for row in range(rows):
        y = int(row * dy)
        if y + tile_h >= h:
            y = h - tile_h
        row_tiles = []
        for col in range(cols):
            x = int(col * dx)
            if x + tile_w >= w:
                x = w - tile_w
            row_tiles.append((x, tile_w, image.crop((x, y, x + tile_w, y + tile_h))))
        grid.tiles.append((y, tile_h, row_tiles))
    return grid


def _ramp(length: int, across: int, horizontal: bool) -> Image.Image:
    # webui's make_mask_image: arange(overlap) * 255 / overlap as uint8.
    ramp = (np.arange(length, dtype=np.float32) * 255 / length).astype(np.uint8)
    array = (
        np.tile(ramp[None, :], (across, 1)) if horizontal else np.tile(ramp[:, None], (1, across))
    )
    return Image.fromarray(array, "L")


def combine_grid(grid: _Grid) -> Image.Image:
    """webui `images.combine_grid`: each tile's first `overlap` columns (rows) blended over
    the previous one with a linear ramp, the rest pasted."""
    ov = grid.overlap
    combined = Image.new("RGB", (grid.image_w, grid.image_h))
    mask_w = _ramp(ov, grid.tile_h, True) if ov else None
    mask_h = _ramp(ov, grid.image_w, False) if ov else None
    for y, h, row in grid.tiles:
        line = Image.new("RGB", (grid.image_w, h))
        for x, w, tile in row:
            if x == 0:
                line.paste(tile, (0, 0))
                continue
            if ov:
                line.paste(tile.crop((0, 0, ov, h)), (x, 0), mask=mask_w)
            line.paste(tile.crop((ov, 0, w, h)), (x + ov, 0))
        if y == 0:
            combined.paste(line, (0, 0))
            continue
        if ov:
            combined.paste(line.crop((0, 0, line.width, ov)), (0, y), mask=mask_h)
        combined.paste(line.crop((0, ov, line.width, h)), (0, y + ov))
    return combined


def upscale_with_model(
    model: nn.Module,
    image: Image.Image,
    *,
    tile: int = DEFAULT_TILE,
    overlap: int = DEFAULT_TILE_OVERLAP,
) -> Image.Image:
    """webui `upscaler_utils.upscale_with_model`: the whole image when `tile` is 0, else
    `tile`x`tile` tiles overlapping by `overlap`, each upscaled, blended back together."""
    if tile <= 0:
        return upscale_patch(model, image)
    grid = split_grid(image, tile, tile, overlap)
    factor = 1
    rows = []
    for y, h, row in grid.tiles:
        out_row = []
        for x, w, piece in row:
            output = upscale_patch(model, piece)
            factor = output.width // piece.width
            out_row.append((x * factor, w * factor, output))
        rows.append((y * factor, h * factor, out_row))
    return combine_grid(
        _Grid(
            rows,
            grid.tile_w * factor,
            grid.tile_h * factor,
            grid.image_w * factor,
            grid.image_h * factor,
            grid.overlap * factor,
        )
    )


def _descriptor_call(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """One model call as webui makes it through spandrel's model descriptor: a side under the
    model's `min_side` padded up to it (reflected, then replicated) and cut back after, the
    output clamped to [0, 1] (before any tile averaging)."""
    height, width = x.shape[-2:]
    side = getattr(model, "min_side", 0)
    out = model(pad_to(x, max(height, side), max(width, side)))
    scale = out.shape[-1] // max(width, side)
    return out[..., : height * scale, : width * scale].clamp_(0, 1)


def upscale_2(
    model: nn.Module,
    image: Image.Image,
    *,
    tile: int = DEFAULT_TILE,
    overlap: int = DEFAULT_TILE_OVERLAP,
) -> Image.Image:
    """webui `upscaler_utils.upscale_2` / `tiled_upscale_2` (its SwinIR path): square tiles of
    `min(tile, height, width)` at a stride of tile - overlap, the last row and column pushed
    back inside the image, each tile's output added into the result and divided by how many
    tiles covered each pixel. Tile 0 runs the whole image. Where webui's stride would be 0 or
    less (an image no larger than the overlap), it fails or leaves pixels uncovered; here the
    whole image is run instead."""
    x = _to_tensor(image, model)
    height, width = x.shape[-2:]
    tile = min(tile, height, width)
    with torch.inference_mode():
        if tile <= 0 or tile - overlap <= 0:
            return _to_image(_descriptor_call(model, x))
        stride = tile - overlap
        rows = [*range(0, height - tile, stride), height - tile]
        cols = [*range(0, width - tile, stride), width - tile]
        result: torch.Tensor | None = None
        weights: torch.Tensor | None = None
        scale = 1
        for top in rows:
            for left in cols:
                out = _descriptor_call(model, x[..., top : top + tile, left : left + tile])
                if result is None or weights is None:
                    scale = out.shape[-1] // tile
                    result = x.new_zeros((*x.shape[:2], height * scale, width * scale))
                    weights = torch.zeros_like(result)
                rows_out = slice(top * scale, (top + tile) * scale)
                cols_out = slice(left * scale, (left + tile) * scale)
                result[..., rows_out, cols_out] += out
                weights[..., rows_out, cols_out] += 1
        assert result is not None and weights is not None  # at least one tile ran
        return _to_image(result / weights)


# --------------------------------------------------------------------------------------------
# How webui runs each kind
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Kind:
    """One architecture as webui runs it."""

    build: Callable[..., nn.Module]  # the module, from recognise()'s arguments
    names: Mapping[str, str]  # file stem -> webui's name for it (others: the stem)
    tiling: str  # "grid": upscale_with_model (PIL tiles, ramps); "tensor": upscale_2
    tile_options: tuple[str, str]  # webui's options for the tile side and overlap
    half: bool  # runs in the catalog's half dtype (spandrel's supports_half)
    model_name: str | None  # the `upscalers` listing's model_name (webui's upscaler class's)
    # listed name -> other names requests may use for the same file (not listed)
    aliases: Mapping[str, tuple[str, ...]] = field(default_factory=dict)


KINDS: Final[Mapping[str, Kind]] = {
    "ESRGAN": Kind(
        RRDBNet, WEBUI_NAMES, "grid", ("ESRGAN_tile", "ESRGAN_tile_overlap"), True, "ESRGAN_4x"
    ),
    "SRVGGNetCompact": Kind(
        SRVGGNetCompact,
        WEBUI_NAMES,
        "grid",
        ("ESRGAN_tile", "ESRGAN_tile_overlap"),
        True,
        "ESRGAN_4x",
    ),
    # webui's UpscalerSwinIR: spandrel loads SwinIR with supports_half=False (float32 even
    # under --half), upscale_2 with SWIN_tile / SWIN_tile_overlap, model_name "SwinIR 4x".
    # webui lists its download as "SwinIR 4x" until a restart finds the saved SwinIR_4x.pth
    # and lists it by its stem: payloads from either state name the same file.
    "SwinIR": Kind(
        SwinIR,
        SWINIR_NAMES,
        "tensor",
        ("SWIN_tile", "SWIN_tile_overlap"),
        False,
        "SwinIR 4x",
        {"SwinIR 4x": ("SwinIR_4x",)},
    ),
    # webui's UpscalerDAT: spandrel loads DAT with supports_half=False, upscale_with_model with
    # DAT_tile / DAT_tile_overlap; the class sets no model_name. A restarted webui lists a saved
    # download both as "DAT x4" (its built-in entry) and "DAT_x4" (the file's stem).
    "DAT": Kind(DAT, DAT_NAMES, "grid", ("DAT_tile", "DAT_tile_overlap"), False, None, DAT_ALIASES),
    # webui's UpscalerHAT: files named by their stem, spandrel's HAT loaded in float32 (no
    # prefer_half), upscale_with_model with the ESRGAN_tile options; no model_name.
    "HAT": Kind(HAT, {}, "grid", ("ESRGAN_tile", "ESRGAN_tile_overlap"), False, None),
}
