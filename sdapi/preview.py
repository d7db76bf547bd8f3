"""Live previews for /progress: webui's "Approx cheap" method, a fixed linear map from the
four latent channels to RGB (webui's sd_vae_approx.cheap_approximation; one table for SD1/SD2
latents, one for SDXL). It needs no weights, unlike webui's default "Approx NN", whose model
webui downloads on first use."""

from __future__ import annotations

import base64
import io

import numpy as np
import torch
from PIL import Image

# Rows: latent channels 0..3; columns: R, G, B (webui's coefficients).
CHEAP_RGB = {
    False: (
        (0.298, 0.207, 0.208),
        (0.187, 0.286, 0.173),
        (-0.158, 0.189, 0.264),
        (-0.184, -0.271, -0.473),
    ),
    True: (
        (0.3448, 0.4168, 0.4395),
        (-0.1953, -0.0290, 0.0250),
        (0.1074, 0.0886, -0.0163),
        (-0.3730, -0.2499, -0.2088),
    ),
}


def cheap_preview(latent: torch.Tensor, sdxl: bool) -> Image.Image:
    """One latent (4, h, w) as a small RGB picture (h, w), as webui's cheap approximation."""
    coefs = torch.tensor(CHEAP_RGB[sdxl], dtype=torch.float32)
    rgb = torch.einsum("lxy,lr->rxy", latent.detach().to("cpu", torch.float32), coefs)
    pixels = torch.clamp((rgb + 1.0) / 2.0, 0.0, 1.0).permute(1, 2, 0).numpy()
    return Image.fromarray((255.0 * pixels).astype(np.uint8))


def png_base64(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")
