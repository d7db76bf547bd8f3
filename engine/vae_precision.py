"""One VAE precision and memory policy for every family, webui-like.

webui decodes in the model's half precision and, when a decode yields NaN, converts the VAE to
fp32 and retries (opts.auto_vae_precision); a NaN that survives is an error. Here:
- every VAE (a checkpoint's own or a vae/ file) runs in the engine's dtype (SD_DTYPE), except
  that an SDXL-family VAE is checked once at load with a fixed probe decode: the original SDXL
  VAE overflows in fp16, so one whose probe is not finite is kept in fp32 (an fp16-fix VAE
  passes and stays fp16). The decision depends only on the weights, never on earlier requests.
- a decode whose half-precision result is not finite is retried with an fp32 copy of the VAE;
  the shared module is never converted, so a request's pixels never depend on what ran before.
- decoding is sliced per image, as webui's decode_latent_batch does (one image's activations at
  a time, and each image's pixels independent of its batch-mates). An image is decoded in
  overlapping tiles (diffusers' tiled_decode, blended seams) when it is larger than
  SD_VAE_TILE_PIXELS (default 2048x2048), when the estimate of its decode's activations
  (`decode_bytes`) exceeds the device memory free at that moment (CUDA), or when the whole
  decode runs out of memory anyway (then retried in tiles). Otherwise it is never tiled, so its
  pixels are exactly the untiled decode's.
"""

from __future__ import annotations

import copy
import logging
import os
from typing import Any

import torch

from .loading import Family, Placement
from .oom import is_out_of_memory, memory_figures, release

log = logging.getLogger(__name__)

# Families whose original VAE is known to overflow in fp16 (webui's --no-half-vae advice).
PROBED_FAMILIES = (Family.SDXL, Family.SDXL_REFINER)
PROBE_SHAPE = (1, 4, 16, 16)  # a 128x128 decode: every block runs; cheap even in CPU fp16
PROBE_SEED = 0
TILE_ENV = "SD_VAE_TILE_PIXELS"
TILE_PIXELS = int(os.environ.get(TILE_ENV) or 2048 * 2048)  # decoded pixels per image
# What one image's decode holds at its peak, in elements per output pixel: SD's decoder runs
# its last up blocks at full resolution (256, then 128 channels) with a few such tensors live
# at once (input, normed, convolved, residual, the upsampled one). On the high side.
PEAK_ELEMENTS_PER_PIXEL = 1024


def _finite(tensor: torch.Tensor) -> bool:
    return bool(torch.isfinite(tensor).all())


@torch.no_grad()
def probe_is_finite(vae: Any) -> bool:
    """Decode a fixed latent (webui-scaled noise) in the VAE's current dtype."""
    generator = torch.Generator().manual_seed(PROBE_SEED)
    latent = torch.randn(PROBE_SHAPE, generator=generator)
    param = next(vae.parameters())
    latent = latent.to(device=param.device, dtype=param.dtype) / vae.config.scaling_factor
    return _finite(vae.decode(latent).sample)


def settle_precision(vae: Any, family: Family, placement: Placement, name: str) -> Any:
    """The VAE in the dtype it will run in: the engine's, or fp32 for an SDXL-family VAE whose
    half-precision probe decode overflows. Returns the module (converted in place)."""
    vae.to(placement.dtype)
    if placement.dtype == torch.float32 or family not in PROBED_FAMILIES:
        return vae
    if not probe_is_finite(vae):
        log.info("%s: VAE overflows in %s; kept in float32", name, placement.dtype)
        vae.to(torch.float32)
    return vae


def decode_pixels(vae: Any, latents: torch.Tensor) -> torch.Tensor:
    """VAE decode of model latents, one image at a time (tiled above TILE_PIXELS); a
    non-finite half-precision result is decoded again by an fp32 copy of the VAE (webui's
    auto_vae_precision). The caller checks the final result."""
    return torch.cat([_decode_one(vae, latents[i : i + 1]) for i in range(latents.shape[0])])


def decode_bytes(pixels: int, dtype: torch.dtype) -> int:
    """Estimated peak activation bytes of decoding one image of `pixels` output pixels."""
    return pixels * PEAK_ELEMENTS_PER_PIXEL * torch.finfo(dtype).bits // 8


def free_device_bytes(device: torch.device) -> int | None:
    """Device memory free now (CUDA; None elsewhere: the host has no such limit to check)."""
    if device.type != "cuda":
        return None
    return int(torch.cuda.mem_get_info(device)[0])


def _tiled(latent: torch.Tensor, dtype: torch.dtype) -> bool:
    pixels = latent.shape[-2] * latent.shape[-1] * 64
    if pixels > TILE_PIXELS:
        return True
    free = free_device_bytes(latent.device)
    return free is not None and decode_bytes(pixels, dtype) > free


def _run_decoder(vae: Any, latent: torch.Tensor) -> torch.Tensor:
    z = latent.to(dtype=vae.dtype) / vae.config.scaling_factor
    if _tiled(z, vae.dtype):
        return vae.tiled_decode(z).sample  # a method call: no flag is set on the shared module
    try:
        return vae.decode(z).sample
    except Exception as exc:
        if not is_out_of_memory(exc):
            raise
    release()  # outside the except block: the failed attempt's frames are gone
    log.warning(
        "VAE decode of %dx%d pixels ran out of memory (%s); decoding in tiles",
        z.shape[-1] * 8,
        z.shape[-2] * 8,
        memory_figures(),
    )
    return vae.tiled_decode(z).sample


def _decode_one(vae: Any, latent: torch.Tensor) -> torch.Tensor:
    pixels = _run_decoder(vae, latent)
    if _finite(pixels) or vae.dtype == torch.float32:
        return pixels
    log.warning("VAE decode in %s gave NaN/Inf; retrying in float32", vae.dtype)
    full = copy.deepcopy(vae).to(torch.float32)
    try:
        return _run_decoder(full, latent.to(torch.float32))
    finally:
        del full
