"""Running a plan: one batch through its passes (txt2img or img2img, then hires), each pass
one `SamplerPass` value handed to one runner (engine/runner.py), then decoding.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .conditioning import PromptSchedules, TextConditioner, step_conditioning
from .errors import GenerationError
from .geometry import (
    InitImage,
    crop_latent,
    finish_image,
    latent_mask,
    resize_image,
    resize_latent,
    upscale_latent,
    upscale_pixels,
)
from .loading import Family, LoadedCheckpoint
from .networks import LoraManager, LoraRequest
from .planning import (
    Hires,
    Img2Img,
    PassLoras,
    Plan,
    Refiner,
    discretization,
    placement,
    schedule_options,
)
from .prompt_parser import extract_extra_networks
from .runner import SamplerPass, run_pass
from .samplers import (
    SamplerChoice,
    effective_eta,
)
from .sampling import (
    CFGDenoiser,
    MaskBlend,
    ScopedUNetHook,
    Stage,
    StopSampling,
    circular_padding,
    decode_latents,
    encode_images,
    has_non_finite,
)
from .seeds import NoiseSpec, first_noise
from .step_batcher import away, exclusive, lora_state

log = logging.getLogger(__name__)


LATENT_CHANNELS = 4


Progress = Callable[[int, int], None]


@dataclass(frozen=True)
class Batch:
    """One batch's pictures, and whether a progress callback stopped it (webui's interrupt
    or skip)."""

    images: list[Any]
    stopped: StopSampling | None = None


def run_batch(plan: Plan, lo: int, hi: int, progress: Progress) -> Batch:
    """One UNet batch: noise, first pass (txt2img or img2img), hires pass, decode, overlay."""
    loaded = plan.checkpoint
    seeds, prompts, negatives = (
        plan.seeds[lo:hi],
        plan.cond_prompts[lo:hi],
        plan.negative_prompts[lo:hi],
    )
    # 1. Per-image noise from per-image generators (webui ImageRNG).
    spec = _noise_spec(plan, lo, hi)
    noise, generators = first_noise(spec, LATENT_CHANNELS, plan.height, plan.width)
    # Latents stay float32 between steps; only the UNet input is cast (CFGDenoiser).
    noise = noise.to(device=placement(loaded).device)
    batch = lo // plan.batch_size
    stopped: StopSampling | None = None
    tiled = [m.pipe.unet for m in models_used(plan)] + [plan.vae.vae]
    with (
        torch.inference_mode(),
        # Tiling changes the shared modules: no other request runs meanwhile.
        exclusive(bool(plan.request.tiling)),
        circular_padding(tiled, bool(plan.request.tiling)),
        LoraSwitch() as loras,
    ):
        # 2. The first pass, with the prompt's LoRAs.
        loras.switch(plan.loras, batch)
        try:
            if plan.img2img is None:
                latents = txt2img_pass(plan, seeds, noise, generators, prompts, negatives, progress)
            else:
                latents = img2img_pass(
                    plan, plan.img2img, lo, hi, noise, generators, prompts, negatives, progress
                )
            # 3. Hires fix: upscale, then img2img at the target size with fresh noise.
            if plan.hires is not None:
                loras.switch(plan.hires.loras, batch)  # hr_prompt's LoRAs (kept when the same)
                latents = hires_pass(plan, plan.hires, latents, lo, hi, progress)
        except StopSampling as stop:
            # Interrupt/skip (webui): the last prediction is decoded; no hires pass after it.
            assert stop.latents is not None
            latents, stopped = stop.latents, stop
        # 4. Decode; NaN is an error, never a black picture.
        if has_non_finite(latents):
            raise GenerationError(
                f"the model produced NaN or Inf values for seeds {seeds}; no image is returned"
            )
        images = decode_latents(plan.vae.vae, latents)
    for image_hook in plan.effects.image_hooks:  # extensions' post-processing
        images = [image_hook(img) for img in images]
    # 5. img2img with a mask: paste "only masked" crops back and lay the original over.
    if plan.img2img is not None and plan.img2img.mask is not None:
        inits = _batch_inits(plan.img2img, hi - lo)
        images = [finish_image(img, init) for img, init in zip(images, inits, strict=True)]
    return Batch(images, stopped)


def models_used(plan: Plan) -> list[LoadedCheckpoint]:
    """The checkpoints a plan runs: its model, then the hires and refiner checkpoints."""
    used = [plan.checkpoint]
    for other in (
        plan.hires.checkpoint if plan.hires else None,
        plan.refiner.checkpoint if plan.refiner else None,
    ):
        if other is not None and other not in used:
            used.append(other)
    return used


class LoraSwitch(ExitStack):
    """The LoRAs active on the shared models, pass by pass; none once the batch ends (also on
    errors). Switching to the set already active keeps it. With several requests in flight
    each one's LoRAs are switched on in its own turns only (engine/step_batcher.py)."""

    def __init__(self) -> None:
        super().__init__()
        self._active: tuple[LoraManager | None, list[LoraRequest]] = (None, [])

    def switch(self, loras: PassLoras, batch: int) -> None:
        wanted = (loras.manager, loras.of_batch(batch))
        if wanted == self._active:
            return
        self.close()  # the previous pass's adapters off, its manager's lock released
        self._active = (None, [])
        manager, requests = wanted
        if manager is not None and requests:
            _, uses = self.enter_context(manager.prepared(requests))
            self.enter_context(lora_state(manager, uses))
            self._active = wanted


def _noise_spec(plan: Plan, lo: int, hi: int) -> NoiseSpec:
    req = plan.request
    resize = (req.seed_resize_from_h, req.seed_resize_from_w)
    return NoiseSpec(
        seeds=plan.seeds[lo:hi],
        subseeds=plan.subseeds[lo:hi],
        subseed_strength=req.subseed_strength,
        seed_resize_from=resize if min(resize) > 0 else None,
        # webui's ImageRNG re-seeds with seed + ENSD after the first draw, whatever the sampler.
        ensd=int(plan.settings.eta_noise_seed_delta or 0),
        device=plan.rng_device,
    )


def _sampler_pass(
    plan: Plan,
    choice: SamplerChoice,
    loaded: LoadedCheckpoint,
    schedule_steps: int,
    steps_run: int,
    img2img: bool,
) -> SamplerPass:
    settings = plan.settings
    eta = effective_eta(
        choice,
        plan.request.eta,
        eta_ancestral=settings.eta_ancestral,
        eta_ddim=settings.eta_ddim,
    )
    return SamplerPass(
        choice=choice,
        schedule_steps=schedule_steps,
        steps_run=steps_run,
        img2img=img2img,
        eta=eta,
        s_noise=settings.s_noise,
        s_churn=settings.s_churn,
        s_tmin=settings.s_tmin,
        # webui: s_tmax 0 means infinity.
        s_tmax=settings.s_tmax or float("inf"),
        sdxl=loaded.family.latent_space == "sdxl",
        always_discard=settings.always_discard_next_to_last_sigma,
        schedule_options=schedule_options(settings),
    )


@dataclass(frozen=True)
class PassJob:
    """One pass of one batch, as the three passes (txt2img, img2img, hires) hand it to `_run`."""

    loaded: LoadedCheckpoint
    spec: SamplerPass
    noise: torch.Tensor
    generators: list[torch.Generator]
    seeds: Sequence[int]
    prompts: list[str]  # without extra-network tags
    negatives: list[str]
    size: tuple[int, int]  # width, height in pixels
    init: torch.Tensor | None = None  # img2img / hires: the latent the window starts from
    inpaint_inputs: torch.Tensor | None = None  # 9-channel models' extra UNet input
    blend: MaskBlend | None = None  # img2img with a mask: keep the unmasked latent
    refiner: Refiner | None = None
    hires_steps: int | None = None  # the hires pass' prompt schedule length
    hooks: Sequence[Any] = ()  # extension UNet hooks for this pass


def _run(plan: Plan, job: PassJob, progress: Progress) -> torch.Tensor:
    """One sampler pass over `job.loaded` (and the refiner, which takes over at its switch
    point): the final latents."""
    loaded, spec, refiner = job.loaded, job.spec, job.refiner
    width, height = job.size
    settings = plan.settings
    calls = spec.model_calls
    schedules = PromptSchedules.build(
        job.prompts, job.negatives, plan.request.steps, job.hires_steps
    )
    stages = []
    models = [(loaded, None)] + ([(refiner.checkpoint, refiner.switch_at)] if refiner else [])
    for model, switch_at in models:
        conditioner = TextConditioner(
            model,
            plan.clip_skip,
            emphasis=settings.emphasis,
            comma_backtrack=settings.comma_padding_backtrack,
            embeddings=plan.embeddings,
        )
        time_ids, uncond_time_ids = sdxl_time_ids(model, width, height)
        stages.append(
            Stage(
                unet=model.pipe.unet,
                dtype=placement(model).dtype,
                # webui indexes the prompt schedule by the denoiser's call count.
                schedule=step_conditioning(conditioner, schedules, calls, calls),
                discretization=discretization(model),
                prediction_type=model.prediction_type,
                time_ids=time_ids,
                uncond_time_ids=uncond_time_ids,
                # Extension hooks run with the request's model only (a refiner is another model).
                hooks=tuple(job.hooks) if model is loaded else (),
                switch_at=switch_at,
            )
        )
    denoiser = CFGDenoiser(
        stages=stages,
        cfg_scale=plan.request.cfg_scale,
        total=calls,
        inpaint_inputs=job.inpaint_inputs,
        blend=job.blend,
        cfg_hooks=tuple(plan.effects.cfg_hooks),
        progress=progress,
    )
    try:
        with ExitStack() as scoped:
            # Hooks that change the UNet for this pass (ControlNet reference) undo it on exit.
            for hook in job.hooks:
                if isinstance(hook, ScopedUNetHook):
                    # It changes the shared UNet: no other request runs meanwhile.
                    scoped.enter_context(exclusive())
                    scoped.enter_context(hook.attached(loaded.pipe.unet))
            latents = run_pass(
                spec, denoiser, job.noise, job.generators, job.seeds, plan.rng_device, job.init
            )
    except StopSampling as stop:
        # webui keeps the last x0 prediction; stopped before any step: the pass' start.
        start = job.init if job.init is not None else job.noise
        stop.latents = start if denoiser.last_denoised is None else denoiser.last_denoised
        raise
    if job.blend is not None:
        latents = job.blend.apply(latents)  # webui's final blend of the inpainted latent
    return latents


def txt2img_pass(
    plan: Plan,
    seeds: list[int],
    noise: torch.Tensor,
    generators: list[torch.Generator],
    prompts: list[str],
    negatives: list[str],
    progress: Progress,
) -> torch.Tensor:
    loaded = plan.checkpoint
    steps = plan.request.steps
    spec = _sampler_pass(plan, plan.sampler, loaded, steps, steps, img2img=False)
    inpaint_inputs = None
    if loaded.is_inpainting:
        inpaint_inputs = txt2img_inpaint_inputs(
            plan.vae.vae, loaded, noise.shape[0], plan.width, plan.height
        )
    job = PassJob(
        loaded,
        spec,
        noise,
        generators,
        seeds,
        prompts,
        negatives,
        (plan.width, plan.height),
        inpaint_inputs=inpaint_inputs,
        refiner=plan.refiner,
        hooks=plan.effects.unet_hooks,
    )
    return _run(plan, job, progress)


def txt2img_inpaint_inputs(
    vae: Any, loaded: LoadedCheckpoint, batch: int, width: int, height: int
) -> torch.Tensor:
    """webui txt2img_image_conditioning for 9-channel models: the whole image is "masked",
    so the mask is all ones and the masked image is mid-grey (0 in the VAE's -1..1 range)."""
    from PIL import Image

    grey = Image.new("RGB", (width, height), (127, 127, 127))
    latent = encode_images(vae, [grey]).to(placement(loaded).dtype)
    ones = torch.ones_like(latent[:, :1])
    return torch.cat([ones, latent], dim=1).repeat(batch, 1, 1, 1)


def _batch_inits(job: Img2Img, size: int) -> list[InitImage]:
    # webui: one init image repeats for the batch; k images (k <= batch_size) are the batch.
    if len(job.inits) == 1:
        return job.inits * size
    return list(job.inits[:size])


def img2img_pass(
    plan: Plan,
    job: Img2Img,
    lo: int,
    hi: int,
    noise: torch.Tensor,
    generators: list[torch.Generator],
    prompts: list[str],
    negatives: list[str],
    progress: Progress,
) -> torch.Tensor:
    loaded = plan.checkpoint
    inits = _batch_inits(job, hi - lo)
    noise = noise[: len(inits)]
    # 1. Init latents (resize_mode 3: encoded at the original size, then the latent resized).
    init = encode_images(plan.vae.vae, [i.image for i in inits]).to(torch.float32)
    if init.shape[-2:] != noise.shape[-2:]:
        init = resize_latent(init, plan.width, plan.height)
    # 2. The mask at latent size (1 = repaint) and webui's masked-content fill.
    repaint = None
    if job.mask is not None and job.mask.mask is not None:
        values = latent_mask(
            job.mask.mask, plan.width // 8, plan.height // 8, round_mask=job.mask_round
        )
        repaint = torch.from_numpy(np.ascontiguousarray(values))[None, None].to(
            init.device, init.dtype
        )
        if job.inpainting_fill == 2:  # latent noise
            init = init * (1 - repaint) + noise * repaint
        elif job.inpainting_fill == 3:  # latent nothing
            init = init * (1 - repaint)
    # 3. webui's step window: nothing to run leaves the init latent as it is.
    if job.steps_run <= 0:
        return init
    spec = _sampler_pass(
        plan, plan.sampler, loaded, job.schedule_steps, job.steps_run, img2img=True
    )
    # 4. Inpainting conditioning (9-channel) and the per-step blend with the original.
    inpaint_inputs = None
    if loaded.is_inpainting:
        inpaint_inputs = img2img_inpaint_inputs(plan.vae.vae, loaded, inits, job)
    blend = MaskBlend(init.to(torch.float32), 1 - repaint) if repaint is not None else None
    pass_job = PassJob(
        loaded,
        spec,
        noise * job.noise_multiplier,
        generators,
        plan.seeds[lo:hi],
        prompts,
        negatives,
        (plan.width, plan.height),
        init=init,
        inpaint_inputs=inpaint_inputs,
        blend=blend,
        refiner=plan.refiner,
        hooks=plan.effects.unet_hooks,
    )
    return _run(plan, pass_job, progress)


def img2img_inpaint_inputs(
    vae: Any, loaded: LoadedCheckpoint, inits: list[InitImage], job: Img2Img
) -> torch.Tensor:
    """webui img2img_image_conditioning for 9-channel models: [rounded mask, VAE(masked image)],
    the masked image lerped with the original by opts.inpainting_mask_weight."""
    width, height = inits[0].image.size
    if job.mask is not None and job.mask.mask is not None:
        mask = (
            np.asarray(job.mask.mask.convert("L").resize((width, height)), dtype=np.float32) / 255
        )
    else:
        mask = np.ones((height, width), dtype=np.float32)
    cond_mask = torch.from_numpy(np.round(mask))[None, None]
    pixels = [np.asarray(i.image.convert("RGB"), dtype=np.float32) / 255 for i in inits]
    masked = []
    for array in pixels:
        source = torch.from_numpy(array).permute(2, 0, 1)[None]
        blended = torch.lerp(source, source * (1.0 - cond_mask), job.mask_weight)
        masked.append(blended)
    from PIL import Image

    masked_images = [
        Image.fromarray((m[0].permute(1, 2, 0).numpy() * 255).round().astype("uint8"))
        for m in masked
    ]
    latents = encode_images(vae, masked_images).to(placement(loaded).dtype)
    small = torch.nn.functional.interpolate(cond_mask, size=latents.shape[-2:]).to(
        latents.device, latents.dtype
    )
    return torch.cat([small.repeat(latents.shape[0], 1, 1, 1), latents], dim=1)


def hires_pass(
    plan: Plan, hires: Hires, latents: torch.Tensor, lo: int, hi: int, progress: Progress
) -> torch.Tensor:
    loaded = hires.checkpoint
    target = hires.target
    # 1. Upscale: in latent space, or decode -> pixel upscaler -> encode.
    if hires.upscaler.latent:
        upscaled = upscale_latent(latents, target.resize_x, target.resize_y, hires.upscaler.name)
        upscaled = crop_latent(upscaled, target)
    else:
        images = decode_latents(plan.vae.vae, latents)
        with away():  # upscaler models hold no request state; other requests step meanwhile
            resized = [
                resize_image(
                    1 if target.crop else 0,
                    upscale_pixels(img, target.resize_x, target.resize_y, hires.upscaler.pixels),
                    target.width,
                    target.height,
                )
                for img in images
            ]
        upscaled = encode_images(plan.vae.vae, resized).to(torch.float32)
    if hires.steps_run <= 0:
        return upscaled  # webui decodes the upscaled latent as it is when denoising is 0
    # 2. Fresh noise from the same seeds at the new size (webui makes a new ImageRNG).
    spec = _noise_spec(plan, lo, hi)
    noise, generators = first_noise(spec, LATENT_CHANNELS, target.height, target.width)
    noise = noise.to(device=placement(loaded).device)
    # 3. The second pass: img2img over webui's fixed-steps window.
    hires_pass_spec = _sampler_pass(
        plan, hires.sampler, loaded, hires.schedule_steps, hires.steps_run, img2img=True
    )
    inpaint_inputs = None
    if loaded.is_inpainting:
        inpaint_inputs = txt2img_inpaint_inputs(
            plan.vae.vae, loaded, upscaled.shape[0], target.width, target.height
        )
    job = PassJob(
        loaded,
        hires_pass_spec,
        noise,
        generators,
        plan.seeds[lo:hi],
        [extract_extra_networks(p)[0] for p in hires.prompts[lo:hi]],
        hires.negative_prompts[lo:hi],
        (target.width, target.height),
        init=upscaled,
        inpaint_inputs=inpaint_inputs,
        hooks=plan.effects.hires_unet_hooks,
        hires_steps=hires.steps_run,
    )
    return _run(plan, job, progress)


# webui's sdxl_refiner_high_aesthetic_score / low_aesthetic_score defaults.
AESTHETIC_SCORE = 6.0


NEGATIVE_AESTHETIC_SCORE = 2.5


def sdxl_time_ids(
    loaded: LoadedCheckpoint, width: int, height: int
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """SDXL size conditioning as webui: original = target = (h, w), crop (0, 0). The refiner
    takes an aesthetic score instead of the target size (6.0, and 2.5 for the negative)."""
    where = placement(loaded)
    if loaded.family is Family.SDXL:
        values = [[height, width, 0, 0, height, width]]
        return torch.tensor(values, device=where.device, dtype=where.dtype), None
    if loaded.family is Family.SDXL_REFINER:

        def ids(score: float) -> torch.Tensor:
            return torch.tensor(
                [[height, width, 0, 0, score]], device=where.device, dtype=where.dtype
            )

        return ids(AESTHETIC_SCORE), ids(NEGATIVE_AESTHETIC_SCORE)
    return None, None
