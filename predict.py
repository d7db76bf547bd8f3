"""Cog adapter: a webui API payload (or the playground's typed inputs) in, images and `info` out.

Cog reads this file statically: every Input() argument is a plain literal (tests/
test_deploy_schema.py). `predict` is async with 8 slots (`@concurrent`); each prediction runs
the engine in a worker thread, cancellable at its next step (engine/worker_calls.py), and the
engine batches the UNet steps of the requests in flight (engine/step_batcher.py).
"""

from __future__ import annotations

import json
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from cog import BaseModel, BasePredictor, Input, Path, concurrent
from cog.input import FieldInfo

os.environ.setdefault("OMP_NUM_THREADS", "1")  # per torch-calling thread; before torch loads

from engine.api import Engine, EngineConfig
from engine.device import setup_logging
from engine.errors import EngineError, public_error
from engine.output_files import OutputFolders
from engine.playground import FIELD_NAMES
from engine.progress import print_progress
from engine.worker_calls import Progress, run_cancellable

SLOTS = 8  # keep equal to @concurrent(max=...) below (Cog reads that literal)


class Output(BaseModel):
    """The image files (PNG carries the infotext), the first seed, webui's info, JSON texts."""

    images: list[Path]
    seed: int | None
    info: str
    parameters: str
    listing: str


def given(value: Any) -> Any:
    """A direct call (scripts, tests) leaves the Input() objects of omitted inputs in place."""
    return value.default if isinstance(value, FieldInfo) else value


class Predictor(BasePredictor):
    def setup(self) -> None:
        """Load every checkpoint under SD_MODELS_DIR (default: this repository)."""
        setup_logging()
        self.engine = Engine.setup(EngineConfig.from_env())
        self.outputs = OutputFolders()
        self.workers = ThreadPoolExecutor(SLOTS, thread_name_prefix="predict")

    # fmt: off
    @concurrent(max=8)
    async def predict(
        self,
        api_json: str = Input(description="For API clients: the webui API payload (body of /sdapi/v1/txt2img or /img2img) as JSON text, or a data: URL of it. A field set here wins over the inputs below.", default="{}"),
        endpoint: str = Input(description="auto (img2img when there is an init image, else txt2img), txt2img, img2img, or a listing named like webui's: sd-models, samplers, schedulers, loras, embeddings, sd-vae, upscalers, latent-upscale-modes, options, memory, controlnet/model_list, ... (all in the README). png-info answers the infotext of the image in api_json (an object whose image field is base64). extra-single-image / extra-batch-images upscale the image(s) in api_json as webui's extras do (info: webui's html_info).", default="auto"),
        prompt: str = Input(description="What to draw (webui prompt syntax: (word:1.2), [from:to:0.5], <lora:name:0.8>, BREAK). Ignored when api_json sets prompt.", default=""),
        negative_prompt: str = Input(description="What to avoid. Ignored when api_json sets negative_prompt.", default=""),
        checkpoint: str = Input(description="Checkpoint by any webui name (file name, title, or hash); empty = the default checkpoint. See endpoint=sd-models. Ignored when api_json sets override_settings.sd_model_checkpoint.", default=""),
        sampler: str = Input(description="Sampler. Ignored when api_json sets sampler_name or sampler_index.", default="Euler", choices=["DPM++ 2M", "DPM++ SDE", "DPM++ 2M SDE", "DPM++ 2M SDE Heun", "DPM++ 2S a", "DPM++ 3M SDE", "Euler a", "Euler", "LMS", "Heun", "DPM2", "DPM2 a", "DPM fast", "DPM adaptive", "Restart", "DDIM", "DDIM CFG++", "PLMS", "UniPC", "LCM"]),
        scheduler: str = Input(description="Schedule type (Automatic: the sampler's own). Ignored when api_json sets scheduler.", default="Automatic", choices=["Automatic", "Uniform", "Karras", "Exponential", "Polyexponential", "SGM Uniform", "KL Optimal", "Align Your Steps", "Simple", "Normal", "DDIM", "Beta"]),
        width: int = Input(description="Width in pixels (a multiple of 8). Ignored when api_json sets width.", default=512, ge=64, le=2048),
        height: int = Input(description="Height in pixels (a multiple of 8). Ignored when api_json sets height.", default=512, ge=64, le=2048),
        steps: int = Input(description="Sampling steps. Ignored when api_json sets steps.", default=50, ge=1, le=150),
        cfg_scale: float = Input(description="How strongly the image follows the prompt (CFG scale). Ignored when api_json sets cfg_scale.", default=7.0, ge=1, le=30),
        seed: int = Input(description="Seed; -1 picks a random one (the seed used is in the output and the log). Ignored when api_json sets seed.", default=-1, ge=-1),
        batch_size: int = Input(description="Images per request. Ignored when api_json sets batch_size.", default=1, ge=1, le=8),
        init_image: Path | None = Input(description="Image to start from (img2img). Ignored when api_json sets init_images.", default=None),
        mask: Path | None = Input(description="Inpainting mask for init_image: white is repainted, black is kept. Ignored when api_json sets mask.", default=None),
        denoising_strength: float = Input(description="img2img and hires fix: how much of the image is redrawn (0 keeps it, 1 replaces it). Ignored when api_json sets denoising_strength.", default=0.75, ge=0, le=1),
        enable_hr: bool = Input(description="Hires fix: generate, upscale by hr_scale, then redraw details in a second pass. Ignored when api_json sets enable_hr.", default=False),
        hr_scale: float = Input(description="Hires fix upscale factor. Ignored when api_json sets hr_scale.", default=2.0, ge=1, le=4),
        output_format: str = Input(description="Image file format (PNG carries the infotext). Ignored when api_json sets override_settings.samples_format.", default="png", choices=["png", "webp", "jpg"]),
        output_quality: int = Input(description="JPEG/WebP quality. Ignored when api_json sets override_settings.jpeg_quality.", default=80, ge=1, le=100),
    ) -> Output:
        # fmt: on
        args = {name: given(value) for name, value in locals().items() if name != "self"}
        playground = {name: args[name] for name in FIELD_NAMES}

        def work(progress: Progress) -> Any:  # progress raises once Cog cancels this prediction
            return self.engine.handle(args["endpoint"], args["api_json"], progress, playground)

        try:
            response = await run_cancellable(self.workers, work, print_progress)
        except EngineError as exc:
            raise public_error(exc) from None
        if response.seed is not None:
            print(f"Using seed: {response.seed}", flush=True)
        return Output(
            images=[Path(p) for p in self.outputs.write(response.images)],
            seed=response.seed,
            info=response.info,
            parameters=json.dumps(response.parameters) if response.parameters else "",
            listing="" if response.listing is None else json.dumps(response.listing),
        )
