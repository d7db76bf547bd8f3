"""txt2img as webui does it, in numbered steps.

Everything a request decides lives in local values of `txt2img`; the only shared objects are
the cached model weights, which are read, never changed.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import torch

from . import __version__
from .catalog import Catalog, CheckpointInfo
from .conditioning import constant_schedule
from .errors import GenerationError, RequestError
from .images import EncodedImage, encode_image
from .infotext import ImageParams, InfoRecord, create_infotext, info_json, job_timestamp
from .loading import Family, LoadedCheckpoint
from .payload import (
    ParsedRequest,
    Settings,
    Txt2ImgRequest,
    all_negative_prompts,
    all_prompts,
    echo_parameters,
)
from .pipelines import PipelineCache
from .prompts import check_clip_skip, truncation_warnings
from .samplers import (
    SamplerChoice,
    build_scheduler,
    effective_eta,
    eta_infotext_params,
    eta_warning,
    resolve_sampler,
    sampler_call_kwargs,
)
from .sampling import DenoiseJob, decode_latents, denoise, has_non_finite
from .seeds import fix_seed, image_seeds, initial_noise, make_generators

log = logging.getLogger(__name__)

VERSION = f"cog-webui-sd-v{__version__}"
Progress = Callable[[int, int], None]


@dataclass
class Models:
    """What setup built: the catalog and its loaded pipelines."""

    catalog: Catalog
    cache: PipelineCache
    default: CheckpointInfo


@dataclass
class Result:
    """A finished generation, in webui's response shape."""

    images: list[EncodedImage]
    info: str
    parameters: dict[str, Any]
    warnings: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Plan:
    """Everything decided about a request before any model work."""

    request: Txt2ImgRequest
    settings: Settings
    checkpoint: LoadedCheckpoint
    sampler: SamplerChoice
    eta: float | None
    clip_skip: int
    seeds: list[int]
    subseeds: list[int]
    prompts: list[str]
    negative_prompts: list[str]
    warnings: list[str]


def log_progress(step: int, total: int) -> None:
    log.info("step %d/%d", step, total)


# --------------------------------------------------------------------------------------------
# Orchestration


def txt2img(models: Models, parsed: ParsedRequest, progress: Progress = log_progress) -> Result:
    """Run a parsed txt2img request and build webui's response."""
    # 1. Decide everything (names, sampler, seeds, prompts): every error before model work.
    plan = make_plan(models, parsed)
    req = plan.request
    # 2. Generate batch by batch (n_iter batches of batch_size), each with a fresh scheduler.
    pil_images: list[Any] = []
    for batch in range(req.n_iter):
        lo, hi = batch * req.batch_size, (batch + 1) * req.batch_size
        pil_images += run_batch(
            plan, plan.seeds[lo:hi], plan.prompts[lo:hi], plan.negative_prompts[lo:hi], progress
        )
    # 3. Infotext per image, encoded files, the info JSON.
    infotexts = [image_infotext(plan, i) for i in range(len(pil_images))]
    fmt = parsed.settings.samples_format
    pnginfo = parsed.settings.enable_pnginfo
    images = [
        encode_image(img, fmt, text if pnginfo else None, jpeg_quality=parsed.settings.jpeg_quality)
        for img, text in zip(pil_images, infotexts, strict=True)
    ]
    if not req.send_images:
        images = []
    info = info_json(build_info(plan, infotexts))
    return Result(
        images=images, info=info, parameters=echo_parameters(parsed), warnings=plan.warnings
    )


def make_plan(models: Models, parsed: ParsedRequest) -> Plan:
    """Resolve names and values; raise RequestError listing what is wrong."""
    req = parsed.request
    if not isinstance(req, Txt2ImgRequest):
        raise RequestError.single(
            "init_images",
            "(present)",
            "img2img is not supported yet by this server; send a txt2img payload",
        )
    settings = parsed.settings
    warnings = list(parsed.warnings)
    # The checkpoint: the request's, else the default. Never the previous request's.
    info = (
        models.catalog.resolve_checkpoint(settings.sd_model_checkpoint)
        if settings.sd_model_checkpoint
        else models.default
    )
    checkpoint = models.cache.get(info)
    if checkpoint.is_inpainting:
        raise RequestError.single(
            "override_settings.sd_model_checkpoint",
            info.title,
            "is an inpainting (9-channel) checkpoint; txt2img with inpainting checkpoints is not "
            "supported yet, choose another checkpoint",
        )
    sampler = resolve_sampler(req.sampler_name, req.sampler_index, req.scheduler)
    eta = effective_eta(
        sampler, req.eta, eta_ancestral=settings.eta_ancestral, eta_ddim=settings.eta_ddim
    )
    note = eta_warning(sampler, eta)
    if note:
        warnings.append(note)
    clip_skip = settings.CLIP_stop_at_last_layers
    if checkpoint.family is Family.SD1:
        check_clip_skip(checkpoint.pipe.text_encoder, clip_skip)
    elif clip_skip > 1:
        # webui applies Clip skip to SD1 only: SDXL always uses the penultimate layers (unless
        # opts.sdxl_clip_l_skip), and SD2's OpenCLIP wrapper never reads the option.
        warnings.append(
            f"CLIP_stop_at_last_layers is ignored for {checkpoint.family.value.upper()} "
            "checkpoints, as in webui"
        )
    count = req.batch_size * req.n_iter
    prompts, negatives = all_prompts(req, count), all_negative_prompts(req, count)
    tokenizer = checkpoint.pipe.tokenizer
    warnings += truncation_warnings(tokenizer, "prompt", prompts)
    warnings += truncation_warnings(tokenizer, "negative_prompt", negatives)
    first_seed = fix_seed(req.seed)
    # webui draws a random subseed even when variation is off; info reports it.
    first_subseed = fix_seed(req.subseed)
    return Plan(
        request=req,
        settings=settings,
        checkpoint=checkpoint,
        sampler=sampler,
        eta=eta,
        clip_skip=clip_skip,
        seeds=image_seeds(first_seed, count),
        subseeds=image_seeds(first_subseed, count),
        prompts=prompts,
        negative_prompts=negatives,
        warnings=warnings,
    )


def run_batch(
    plan: Plan, seeds: list[int], prompts: list[str], negatives: list[str], progress: Progress
) -> list[Any]:
    """One UNet batch: per-image noise from per-image generators, a fresh scheduler."""
    req = plan.request
    loaded = plan.checkpoint
    pipe = loaded.pipe
    # 1. A fresh scheduler for this batch; the timesteps of the full schedule.
    scheduler: Any = build_scheduler(
        plan.sampler, loaded.scheduler_config, eta=plan.eta, seeds=seeds
    )
    scheduler.set_timesteps(req.steps, device=pipe.device)
    # 2. Per-image noise (float32, per-image generators), scaled to the first sigma.
    generators = make_generators(seeds, generator_device(pipe.device))
    noise = initial_noise(generators, LATENT_CHANNELS, req.height, req.width)
    latents = noise.to(device=pipe.device, dtype=pipe.unet.dtype) * scheduler.init_noise_sigma
    # 3. Text conditioning (the same at every step for plain prompts).
    with torch.inference_mode():
        conditioning = constant_schedule(pipe, loaded.family, prompts, negatives, plan.clip_skip)
    # 4. Denoise, then decode; NaN is an error, never a black picture.
    job = DenoiseJob(
        unet=pipe.unet,
        scheduler=scheduler,
        timesteps=scheduler.timesteps,
        latents=latents,
        cfg_scale=req.cfg_scale,
        schedule=lambda _step: conditioning,
        generators=generators,
        time_ids=sdxl_time_ids(loaded, req.width, req.height),
        eta=sampler_call_kwargs(plan.sampler, plan.eta).get("eta"),
        progress=progress,
    )
    with torch.inference_mode():
        latents = denoise(job)
        if has_non_finite(latents):
            raise GenerationError(
                f"the model produced NaN or Inf values for seeds {seeds}; no image is returned"
            )
        return decode_latents(pipe.vae, latents)


LATENT_CHANNELS = 4


def generator_device(device: Any) -> str:
    """webui's default randn source "GPU": CUDA generators on CUDA, else the CPU one."""
    return "cuda" if str(device).startswith("cuda") else "cpu"


def sdxl_time_ids(loaded: LoadedCheckpoint, width: int, height: int) -> torch.Tensor | None:
    """SDXL size conditioning as webui: original = target = (h, w), crop (0, 0)."""
    if loaded.family is not Family.SDXL:
        return None
    pipe = loaded.pipe
    return torch.tensor(
        [[height, width, 0, 0, height, width]], device=pipe.device, dtype=pipe.unet.dtype
    )


# --------------------------------------------------------------------------------------------
# Response pieces


def image_params(plan: Plan, index: int) -> ImageParams:
    req = plan.request
    info = plan.checkpoint.info
    settings = plan.settings
    return ImageParams(
        steps=req.steps,
        sampler=plan.sampler.sampler,
        schedule_type=plan.sampler.schedule_label,
        cfg_scale=req.cfg_scale,
        seed=plan.seeds[index],
        width=req.width,
        height=req.height,
        model_hash=info.shorthash if settings.add_model_hash_to_info else None,
        model_name=info.name_for_extra if settings.add_model_name_to_info else None,
        clip_skip=plan.clip_skip,
        extra=sampler_extras(plan),
        version=VERSION if settings.add_version_to_infotext else None,
    )


def sampler_extras(plan: Plan) -> dict[str, Any]:
    """webui's extra_generation_params from the sampler (Eta DDIM when it is not 0)."""
    return dict(eta_infotext_params(plan.sampler, plan.eta))


def image_infotext(plan: Plan, index: int) -> str:
    return create_infotext(
        plan.prompts[index], plan.negative_prompts[index], image_params(plan, index)
    )


def build_info(plan: Plan, infotexts: list[str]) -> InfoRecord:
    req = plan.request
    ckpt = plan.checkpoint.info
    return InfoRecord(
        prompt=plan.prompts[0],
        all_prompts=plan.prompts,
        negative_prompt=plan.negative_prompts[0],
        all_negative_prompts=plan.negative_prompts,
        seed=plan.seeds[0],
        all_seeds=plan.seeds,
        subseed=plan.subseeds[0],
        all_subseeds=plan.subseeds,
        subseed_strength=req.subseed_strength,
        width=req.width,
        height=req.height,
        sampler_name=plan.sampler.sampler,
        cfg_scale=req.cfg_scale,
        steps=req.steps,
        batch_size=req.batch_size,
        restore_faces=bool(req.restore_faces),
        face_restoration_model=None,
        sd_model_name=ckpt.name_for_extra,
        sd_model_hash=ckpt.shorthash,
        sd_vae_name=None,
        sd_vae_hash=None,
        seed_resize_from_w=req.seed_resize_from_w,
        seed_resize_from_h=req.seed_resize_from_h,
        denoising_strength=None,
        extra_generation_params={
            "Schedule type": plan.sampler.schedule_label,
            **sampler_extras(plan),
        },
        index_of_first_image=0,
        infotexts=infotexts,
        styles=list(req.styles or []),
        job_timestamp=job_timestamp(datetime.now()),
        clip_skip=plan.clip_skip,
        is_using_inpainting_conditioning=False,
        version=VERSION,
        warnings=plan.warnings,
    )
