"""`inpaint_only`: what the ControlNet extension adds to the inpaint hint outside img2img
inpainting (Mikubill scripts/hook.py "Post-processing for restore" and scripts/controlnet.py
`inpaint_only_post_processing`).

1. Every step, the prediction is changed so that the implied clean image keeps the control
   image's VAE latent outside the mask: x0 = x0_pred * m + x0_origin * (1 - m), turned back
   into a noise prediction and mixed by the unit weight (clamped to 0..1). The map is affine
   in the prediction with weights summing to one, so applying it to the CFG-combined
   prediction equals the extension's per-row application before CFG.
2. After decoding, the picture is laid over the control image through the mask, dilated and
   box-blurred by 7 px (`control_net_inpaint_blur_sigma`).

Like the extension, the UNet output is treated as a noise prediction (for v-prediction
checkpoints the extension does the same).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from PIL import Image
from scipy import ndimage

from engine.sampling import StepConditioning, StepInfo, encode_images

BLUR_SIGMA = 7  # webui option control_net_inpaint_blur_sigma (default)


@dataclass
class InpaintRestore:
    """A CFGHook: keep the control image outside the mask in the implied clean image."""

    vae: Any
    colour: Image.Image  # the control image at the first-pass size
    mask: Image.Image  # "L", 255 = inpaint, the same size
    weight: float
    alphas_cumprod: torch.Tensor
    _latents: dict[tuple[int, int, str], tuple[torch.Tensor, torch.Tensor]] = field(
        default_factory=dict, repr=False
    )

    def _at(self, height: int, width: int, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # The first pass uses the control as made; a hires pass gets it at its own size (the
        # extension builds a separate hires control), encoded once per size.
        key = (height, width, str(like.device))
        if key not in self._latents:
            size = (width * 8, height * 8)
            colour = self.colour.resize(size, Image.Resampling.BICUBIC)
            mask = self.mask.resize(size, Image.Resampling.NEAREST)
            x0 = encode_images(self.vae, [colour])
            pixels = torch.from_numpy(np.asarray(mask, dtype=np.float32) / 255.0)[None, None]
            # Mikubill: max_pool2d(mask, (10, 10), stride=(8, 8), padding=1) to latent size.
            latent_mask = torch.nn.functional.max_pool2d(pixels, (10, 10), (8, 8), padding=1)
            self._latents[key] = (x0, latent_mask)
        x0, latent_mask = self._latents[key]
        return x0.to(like.device, like.dtype), latent_mask.to(like.device, like.dtype)

    def __call__(
        self, eps: torch.Tensor, outputs: torch.Tensor, cond: StepConditioning, info: StepInfo
    ) -> torch.Tensor:
        if info.sample is None or info.t is None:
            return eps
        x_t = info.sample.to(eps.dtype)
        x0_origin, mask = self._at(eps.shape[-2], eps.shape[-1], eps)
        index = int(torch.as_tensor(info.t).float().round().clamp(0, len(self.alphas_cumprod) - 1))
        alpha_bar = self.alphas_cumprod[index].to(eps.device, torch.float64)
        a, s = float(alpha_bar.sqrt()), float((1 - alpha_bar).sqrt())
        # The noise prediction whose clean image is x0_origin: eps_o = (x_t - a x0_o) / s.
        eps_origin = (x_t - a * x0_origin) / s
        w = max(0.0, min(1.0, float(self.weight)))
        return eps + w * (1 - mask) * (eps_origin - eps)


@dataclass(frozen=True)
class InpaintComposite:
    """An image hook: the decoded picture inside the (softened) mask, the control outside."""

    colour: Image.Image
    mask: Image.Image

    def __call__(self, image: Image.Image) -> Image.Image:
        size = image.size
        raw = np.asarray(self.colour.convert("RGB").resize(size, Image.Resampling.BICUBIC))
        mask = np.asarray(self.mask.resize(size, Image.Resampling.NEAREST), dtype=np.float32)
        # cv2.dilate with a 7x7 square, then cv2.blur 7x7 (reflect-101 border).
        soft = ndimage.maximum_filter(mask / 255.0, size=BLUR_SIGMA, mode="nearest")
        soft = ndimage.uniform_filter(soft, size=BLUR_SIGMA, mode="mirror")[:, :, None]
        picture = np.asarray(image.convert("RGB"), dtype=np.float32)
        out = soft * picture + (1 - soft) * raw.astype(np.float32)
        return Image.fromarray(np.clip(np.round(out), 0, 255).astype(np.uint8))
