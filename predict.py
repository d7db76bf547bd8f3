"""Cog adapter: a webui API payload (or the playground's typed inputs) in, images and `info` out.

All the work happens in `engine/`; this file only maps Cog inputs and outputs onto it. Cog reads
this file statically (tree-sitter), so every Input() argument is a plain literal
(tests/test_deploy_schema.py checks the schema Cog would build from it).

Concurrency: `predict` is async and Cog gives it up to 8 prediction slots (`@concurrent`, read
statically by `cog build`; COG_MAX_CONCURRENCY overrides it at run time). Each prediction runs
the engine in a worker thread; the engine admits SD_MAX_CONCURRENCY of them at once and batches
their UNet steps together (engine/step_batcher.py). A cancelled prediction stops at its next
step, or at once while it waits to start; the others go on.
"""

from __future__ import annotations

import asyncio
import contextvars
import json
import os
import shutil
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from cog import BaseModel, BasePredictor, Input, Path, concurrent
from cog.input import FieldInfo

# One OpenMP thread per torch-calling thread (cog.yaml sets it too), before torch loads.
os.environ.setdefault("OMP_NUM_THREADS", "1")

from engine.api import Engine, EngineConfig
from engine.device import setup_logging
from engine.errors import EngineError, public_error
from engine.playground import FIELD_NAMES
from engine.progress import print_progress
from engine.step_batcher import cancellable

SLOTS = 8  # keep equal to @concurrent(max=...) below (Cog reads that literal)
# Output folders are removed once this old: Cog has delivered their files long before, and a
# folder of a prediction still being delivered is never this old.
OUTPUT_TTL_S = 600.0


class Cancelled(BaseException):
    """Cog cancelled the prediction: raised in the engine's thread at its next step, or while
    it waits to start (a BaseException, like Cog's own, so no `except Exception` in the
    engine swallows it)."""


class Output(BaseModel):
    """`images`: the files (PNG with the infotext in its `parameters` chunk unless another
    format is asked for). `seed`: the first image's seed. `info`: webui's info JSON string
    (the extras endpoints: webui's `html_info`).
    `parameters`: the request with defaults filled, as JSON. `listing`: a listing's JSON."""

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
        self.outdirs: list[tuple[float, Path]] = []  # (created, folder), oldest first
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
        stop = threading.Event()

        def check() -> None:
            if stop.is_set():
                raise Cancelled

        def progress(step: int, total: int) -> None:
            check()
            print_progress(step, total)

        def run() -> Any:  # checked while it waits to start too (engine door, memory)
            with cancellable(check):
                return self.engine.handle(args["endpoint"], args["api_json"], progress, playground)

        # The worker thread keeps this prediction's context (Cog routes its logs by it).
        work = self.workers.submit(contextvars.copy_context().run, run)
        try:
            response = await asyncio.wrap_future(work)
        except asyncio.CancelledError:
            stop.set()  # the engine stops at its next step; the slot is free once it has
            await asyncio.wait([asyncio.wrap_future(work)])
            raise
        except EngineError as exc:
            raise public_error(exc) from None
        if response.seed is not None:
            print(f"Using seed: {response.seed}", flush=True)
        return Output(
            images=self._write(response.images),
            seed=response.seed,
            info=response.info,
            parameters=json.dumps(response.parameters) if response.parameters else "",
            listing="" if response.listing is None else json.dumps(response.listing),
        )

    def _write(self, images: list[Any]) -> list[Path]:
        """The files in a folder of this prediction's own; folders older than OUTPUT_TTL_S go
        (concurrent predictions may still be delivering the newer ones)."""
        now = time.monotonic()
        while self.outdirs and now - self.outdirs[0][0] > OUTPUT_TTL_S:
            shutil.rmtree(self.outdirs.pop(0)[1], ignore_errors=True)
        outdir = Path(tempfile.mkdtemp(prefix="sd-out-"))
        self.outdirs.append((now, outdir))
        files = []
        for index, image in enumerate(images):
            path = outdir / f"{index:05d}.{image.extension}"
            path.write_bytes(image.data)
            files.append(Path(path))
        return files
