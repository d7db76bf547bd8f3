"""The per-step ControlNet call: residuals for the UNet, as Mikubill's hook computes them.

The hook only reads what it is given (the UNet input and kwargs) and returns new tensors; the
ControlNet model is shared and never modified.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from PIL import Image

from engine.sampling import StepInfo, UNetExtras

BALANCED, PROMPT_MORE, CONTROLNET_MORE = 0, 1, 2
_SOFT_BASE = 0.825  # Mikubill soft injection: weight * 0.825 ** (12 - i)
_SOFT_TOP = 12


def soft_scales(weight: float, count: int) -> list[float]:
    """Per-residual scales of soft injection, shallow to deep: 13 for SD1/2 (12 down + mid),
    the first `count` of the same 13 for SDXL (10), as Mikubill's hook does."""
    return [weight * _SOFT_BASE ** float(_SOFT_TOP - i) for i in range(_SOFT_TOP + 1)][:count]


def active(info: StepInfo, start: float, end: float) -> bool:
    """The extension's guidance_schedule_handler: a unit runs while
    start <= sampling_step / sampling_steps <= end, with webui's state values (the last
    completed sampler step, so 0 during the first two steps; the steps of the pass, t_enc + 1
    in img2img). Every model call of a step (Heun's two) sees the same value. Without them
    (a hook called outside a sampler pass) the call index stands in for the step."""
    if info.sampling_steps > 0:
        done, steps = info.sampling_step, info.sampling_steps
    else:
        done, steps = max(info.index - 1, 0), max(info.total, 1)
    return start <= done / steps <= end


def image_tensor(image: Image.Image) -> torch.Tensor:
    """RGB image -> (1, 3, H, W) float in [0, 1] (the hint ControlNets are trained on)."""
    array = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(array).permute(2, 0, 1).unsqueeze(0)


@dataclass
class ControlNetHook:
    """A `UNetHook` for one unit."""

    model: Any  # diffusers ControlNetModel
    control: torch.Tensor  # (1, 3, H, W) in [0, 1] (+ a 4th mask channel), on the CPU
    weight: float
    guidance_start: float
    guidance_end: float
    control_mode: int
    _resized: dict[tuple[int, int, str, torch.dtype], torch.Tensor] = field(
        default_factory=dict, repr=False
    )

    def _hint(self, model_in: torch.Tensor) -> torch.Tensor:
        # The control image is made at the first-pass size; a hires pass (or any other latent
        # size) gets it resized to 8x the latent, once.
        height, width = model_in.shape[-2] * 8, model_in.shape[-1] * 8
        key = (height, width, str(model_in.device), self.model.dtype)
        if key not in self._resized:
            hint = self.control
            if hint.shape[-2:] != (height, width):
                hint = torch.nn.functional.interpolate(
                    hint, size=(height, width), mode="bilinear", align_corners=False
                )
            if hint.shape[1] == 4:
                # Mikubill's "ControlNet inpaint protocol": -1 where the mask is set.
                colour, mask = hint[:, :3], (hint[:, 3:] > 0.5).to(hint.dtype)
                hint = colour * (1 - mask) - mask
            self._resized[key] = hint.to(device=model_in.device, dtype=self.model.dtype)
        return self._resized[key]

    def __call__(
        self, model_in: torch.Tensor, t: Any, kwargs: dict[str, Any], info: StepInfo
    ) -> UNetExtras:
        if not active(info, self.guidance_start, self.guidance_end) or self.weight == 0:
            return UNetExtras()
        channels = self.model.config.in_channels
        sample = model_in[:, :channels].to(self.model.dtype)  # 9-channel inpainting UNets
        hint = self._hint(model_in).expand(model_in.shape[0], -1, -1, -1)
        extra: dict[str, Any] = {}
        if "added_cond_kwargs" in kwargs:
            extra["added_cond_kwargs"] = kwargs["added_cond_kwargs"]
        down, mid = self.model(
            sample,
            t,
            encoder_hidden_states=kwargs["encoder_hidden_states"].to(self.model.dtype),
            controlnet_cond=hint,
            conditioning_scale=1.0,
            return_dict=False,
            **extra,
        )
        residuals = [*down, mid]
        if self.control_mode == BALANCED:
            scales = [self.weight] * len(residuals)
        else:
            scales = soft_scales(self.weight, len(residuals))
        scaled = [r * s for r, s in zip(residuals, scales, strict=True)]
        if self.control_mode == CONTROLNET_MORE:
            # Control on the positive blocks only: the negative block (the first `batch` rows)
            # gets no residual, so CFG pushes toward the control (Mikubill cfg_injection).
            keep = torch.ones(
                model_in.shape[0], 1, 1, 1, dtype=scaled[0].dtype, device=scaled[0].device
            )
            keep[: info.batch] = 0
            scaled = [r * keep for r in scaled]
        dtype = model_in.dtype
        return UNetExtras(
            down_block_additional_residuals=tuple(r.to(dtype) for r in scaled[:-1]),
            mid_block_additional_residual=scaled[-1].to(dtype),
        )
