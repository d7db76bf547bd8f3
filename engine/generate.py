"""txt2img and img2img as webui does them, in numbered steps: plan, run, respond.

`planning.make_plan` decides everything a request asks for (names, sampler, seeds, prompts,
LoRAs, images, masks, hires and refiner settings) and raises every user error before any model
work; `passes.run_batch` runs each batch's passes on the cached models, which are read, never
changed; `response` builds webui's infotext and info JSON."""

from __future__ import annotations

import logging
from typing import Any

from .images import encode_image
from .infotext import info_json
from .limits import Limits
from .oom import reported
from .passes import Progress, models_used, run_batch
from .payload import (
    ParsedRequest,
    echo_parameters,
)
from .planning import Models, make_plan
from .response import Result, build_info, image_infotext
from .step_batcher import away

log = logging.getLogger(__name__)


def log_progress(step: int, total: int) -> None:
    log.info("step %d/%d", step, total)


def generate(
    models: Models, parsed: ParsedRequest, limits: Limits, progress: Progress = log_progress
) -> Result:
    """Run a parsed txt2img or img2img request and build webui's response."""
    # 1. Decide everything (names, sampler, seeds, prompts, images): every error before model work.
    plan = make_plan(models, parsed, limits)
    req = plan.request
    # 1a. Its checkpoints onto the device, within SD_DEVICE_MEMORY (engine/working_set.py).
    models.cache.acquire(models_used(plan))
    # 2. Generate batch by batch (n_iter batches of batch_size).
    pil_images: list[Any] = []
    with reported(
        f"generating {req.batch_size} image(s) of {plan.width}x{plan.height}",
        "try a smaller width/height, batch_size, or hires scale",
    ):
        for batch in range(req.n_iter):
            lo, hi = batch * plan.batch_size, (batch + 1) * plan.batch_size
            done = run_batch(plan, lo, hi, progress)
            pil_images += done.images
            if done.stopped is not None and not done.stopped.skip:
                break  # webui's interrupt: the batches so far are the answer
    # 3. Infotext per image, encoded files, the info JSON; no model is touched from here, so
    # other requests' steps go on meanwhile (engine/step_batcher.py).
    infotexts = [image_infotext(plan, i) for i in range(len(pil_images))]
    settings = parsed.settings
    with away():
        images = [
            encode_image(
                img,
                settings.samples_format,
                text if settings.enable_pnginfo else None,
                jpeg_quality=settings.jpeg_quality,
            )
            for img, text in zip(pil_images, infotexts, strict=True)
        ]
        # Extension images (ControlNet detected maps) follow the generated ones, no infotext.
        images += [
            encode_image(img, settings.samples_format, None, jpeg_quality=settings.jpeg_quality)
            for img in plan.effects.extra_images
        ]
    if not req.send_images:
        images = []
    info = info_json(build_info(plan, infotexts))
    return Result(
        images=images, info=info, parameters=echo_parameters(parsed), warnings=plan.warnings
    )
