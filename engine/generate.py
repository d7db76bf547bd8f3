"""txt2img and img2img as webui does them, in numbered steps.

`make_plan` decides everything a request asks for (names, sampler, seeds, prompts, images,
masks, hires and refiner settings) and raises every user error before any model work. The
batches then run on the cached models, which are read, never changed.
"""

from __future__ import annotations

import gc
import logging
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Final

import numpy as np
import torch

from . import __version__
from .catalog import Catalog, CheckpointInfo
from .conditioning import PromptSchedules, TextConditioner, check_clip_skip, step_conditioning
from .embeddings import EmbeddingCatalog
from .errors import GenerationError, Problem, RequestError
from .extensions import Effects, ExtensionRegistry, GenerationContext
from .geometry import (
    HiresTarget,
    HiresUpscaler,
    InitImage,
    MaskPlan,
    crop_latent,
    finish_image,
    firstphase_to_hires,
    hires_target,
    hr_upscaler_choice,
    img2img_steps,
    latent_mask,
    prepare_init_image,
    prepare_mask,
    resize_image,
    resize_latent,
    upscale_latent,
    upscale_pixels,
)
from .images import EncodedImage, encode_image
from .infotext import ImageParams, InfoRecord, create_infotext, info_json, job_timestamp
from .inputs import decode_image_list, decode_mask
from .loading import Family, LoadedCheckpoint
from .networks import LoraCatalog, LoraInfo, LoraManager, LoraRequest, lora_hashes
from .payload import (
    Img2ImgRequest,
    ParsedRequest,
    Settings,
    Txt2ImgRequest,
    all_negative_prompts,
    all_prompts,
    echo_parameters,
    effective_mask_blur,
)
from .pipelines import PipelineCache
from .prompt_parser import extract_extra_networks, lora_weights
from .runner import SamplerPass, run_pass
from .samplers import (
    SamplerChoice,
    discard_infotext_params,
    effective_eta,
    eta_infotext_params,
    resolve_sampler,
    sigma_infotext_params,
    uses_ensd,
)
from .sampling import (
    CFGDenoiser,
    MaskBlend,
    Stage,
    circular_padding,
    decode_latents,
    encode_images,
    has_non_finite,
)
from .schedules import Discretization
from .seeds import NoiseSpec, first_noise, fix_seed, request_seeds
from .vae import VaeCatalog, VaeChoice

log = logging.getLogger(__name__)

VERSION = f"cog-webui-sd-v{__version__}"
LATENT_CHANNELS = 4
Progress = Callable[[int, int], None]
_OFF = (None, "", "None", "none")
Embeddings = dict[str, str]  # textual-inversion name -> hash, as text encoding found them
Sampled = tuple[torch.Tensor, Embeddings]  # a pass's final latents and the embeddings it used


@dataclass
class Models:
    """What setup built: the catalog and its loaded pipelines."""

    catalog: Catalog
    cache: PipelineCache
    default: CheckpointInfo
    loras: LoraCatalog = field(default_factory=lambda: LoraCatalog(()))
    embeddings: EmbeddingCatalog = field(default_factory=EmbeddingCatalog)
    vaes: VaeCatalog | None = None
    extensions: ExtensionRegistry | None = None
    lora_managers: dict[str, LoraManager] = field(default_factory=dict)

    def lora_manager(self, loaded: LoadedCheckpoint) -> LoraManager:
        """One adapter cache per checkpoint, made on first use."""
        title = loaded.info.title
        if title not in self.lora_managers:
            self.lora_managers[title] = LoraManager(loaded, self.loras)
        return self.lora_managers[title]


@dataclass
class Result:
    """A finished generation, in webui's response shape."""

    images: list[EncodedImage]
    info: str
    parameters: dict[str, Any]
    warnings: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class PassLoras:
    """The LoRAs of one pass: per batch (webui reads the tags of each batch's first prompt),
    applied through the LoRA manager of the checkpoint that pass runs on."""

    per_batch: list[list[LoraRequest]]
    manager: LoraManager | None

    def of_batch(self, batch: int) -> list[LoraRequest]:
        return self.per_batch[batch] if self.manager is not None else []


NO_LORAS: Final = PassLoras([], None)


@dataclass(frozen=True)
class Hires:
    """The hires-fix second pass, decided up front."""

    target: HiresTarget
    upscaler: HiresUpscaler
    checkpoint: LoadedCheckpoint
    sampler: SamplerChoice
    schedule_steps: int
    steps_run: int
    denoise: float
    prompts: list[str]
    negative_prompts: list[str]
    # webui parses hr_prompt's own extra-network tags and activates them for the second pass
    # (processing.py: hr_extra_network_data); hr_prompt defaults to the prompt, tags included.
    loras: PassLoras = NO_LORAS


@dataclass(frozen=True)
class Img2Img:
    """The init images and mask of an img2img request, prepared as webui does."""

    inits: list[InitImage]
    mask: MaskPlan | None
    resize_mode: int
    schedule_steps: int
    steps_run: int
    noise_multiplier: float
    inpainting_fill: int
    mask_round: bool
    mask_weight: float


@dataclass(frozen=True)
class Refiner:
    checkpoint: LoadedCheckpoint
    switch_at: float


@dataclass(frozen=True)
class Plan:
    """Everything decided about a request before any model work."""

    request: Txt2ImgRequest | Img2ImgRequest
    settings: Settings
    checkpoint: LoadedCheckpoint
    sampler: SamplerChoice
    eta: float | None
    clip_skip: int
    batch_size: int
    seeds: list[int]
    subseeds: list[int]
    prompts: list[str]
    negative_prompts: list[str]
    cond_prompts: list[str]  # the prompts without their extra-network tags
    loras: PassLoras  # of the first pass (the hires pass has its own: Hires.loras)
    embeddings: EmbeddingCatalog
    vae: VaeChoice
    effects: Effects  # what the request's alwayson_scripts extensions add
    width: int
    height: int
    rng_device: str
    hires: Hires | None
    img2img: Img2Img | None
    refiner: Refiner | None
    extras: dict[str, Any]
    warnings: list[str]
    comments: list[str]

    @property
    def denoising_strength(self) -> float | None:
        if self.img2img is not None or self.hires is not None:
            return float(self.request.denoising_strength)
        return None


def log_progress(step: int, total: int) -> None:
    log.info("step %d/%d", step, total)


# --------------------------------------------------------------------------------------------
# Orchestration


def generate(models: Models, parsed: ParsedRequest, progress: Progress = log_progress) -> Result:
    """Run a parsed txt2img or img2img request and build webui's response."""
    # 1. Decide everything (names, sampler, seeds, prompts, images): every error before model work.
    plan = make_plan(models, parsed)
    req = plan.request
    # 2. Generate batch by batch (n_iter batches of batch_size).
    pil_images: list[Any] = []
    used: Embeddings = {}  # what text encoding learned: embedding name -> hash (TI hashes)
    with _out_of_memory_reported(plan):
        for batch in range(req.n_iter):
            lo, hi = batch * plan.batch_size, (batch + 1) * plan.batch_size
            batch_images, batch_used = run_batch(plan, lo, hi, progress)
            pil_images += batch_images
            used.update(batch_used)
    # 3. Infotext per image, encoded files, the info JSON.
    infotexts = [image_infotext(plan, i, used) for i in range(len(pil_images))]
    settings = parsed.settings
    images = [
        encode_image(
            img,
            settings.samples_format,
            text if settings.enable_pnginfo else None,
            jpeg_quality=settings.jpeg_quality,
        )
        for img, text in zip(pil_images, infotexts, strict=True)
    ]
    # Extension images (ControlNet detected maps) follow the generated ones, without infotext.
    images += [
        encode_image(img, settings.samples_format, None, jpeg_quality=settings.jpeg_quality)
        for img in plan.effects.extra_images
    ]
    if not req.send_images:
        images = []
    info = info_json(build_info(plan, infotexts, used))
    return Result(
        images=images, info=info, parameters=echo_parameters(parsed), warnings=plan.warnings
    )


@contextmanager
def _out_of_memory_reported(plan: Plan) -> Iterator[None]:
    """Out of memory: free the allocator's cache and say what to shrink (the next request runs)."""
    try:
        yield
    except torch.OutOfMemoryError:
        # Drop the traceback (it holds the failed activations) before freeing the cache.
        pass
    else:
        return
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    req = plan.request
    raise GenerationError(
        f"out of memory generating {req.batch_size} image(s) of {plan.width}x{plan.height}; "
        "try a smaller width/height, batch_size, or hires scale"
    )


def make_plan(models: Models, parsed: ParsedRequest) -> Plan:
    """Resolve names and values; raise RequestError listing what is wrong."""
    req = parsed.request
    settings = parsed.settings
    warnings = list(parsed.warnings)
    # 1. The checkpoint: the request's, else the default. Never the previous request's.
    checkpoint = _checkpoint(
        models, settings.sd_model_checkpoint, "override_settings.sd_model_checkpoint"
    )
    # 2. Sampler, eta and clip skip.
    sampler = resolve_sampler(req.sampler_name, req.sampler_index, req.scheduler)
    eta = effective_eta(
        sampler, req.eta, eta_ancestral=settings.eta_ancestral, eta_ddim=settings.eta_ddim
    )
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
    # 3. img2img images first: k init images make a batch of k (webui).
    decoded = _decode_img2img(req) if isinstance(req, Img2ImgRequest) else None
    batch_size = req.batch_size
    if decoded is not None and len(decoded[0]) > 1:
        batch_size = len(decoded[0])
    # 4. Prompts and seeds (webui: with a variation strength all images share the seed).
    count = batch_size * req.n_iter
    prompts = all_prompts(req, req.batch_size * req.n_iter)[:count]
    negatives = all_negative_prompts(req, req.batch_size * req.n_iter)[:count]
    seeds, subseeds = request_seeds(
        fix_seed(req.seed), fix_seed(req.subseed), req.subseed_strength, count
    )
    extras: dict[str, Any] = {}
    comments: list[str] = []
    # 5. Extra-network tags: stripped from every prompt, LoRAs resolved before any model work.
    cond_prompts, loras = _plan_networks(
        models, req, checkpoint, prompts, batch_size, "prompt", warnings
    )
    lora_pairs = _resolved(loras)
    # 6. The VAE (override_settings.sd_vae), loaded on first use, never swapped into the model.
    vae = (
        models.vaes.choose(settings.sd_vae, checkpoint)
        if models.vaes is not None
        else VaeChoice(None, checkpoint.pipe.vae)
    )
    # 7. Mode specifics: hires fix for txt2img, init images and mask for img2img.
    width, height = req.width, req.height
    hires = img2img = None
    if isinstance(req, Txt2ImgRequest):
        width, height, hires = _plan_hires(
            models, req, settings, checkpoint, sampler, prompts, negatives, extras, warnings
        )
        if hires is not None:
            # webui's Lora hashes: the first pass's, then the hires pass's added (is_hr_pass).
            lora_pairs += _resolved(hires.loras)
    else:
        assert decoded is not None
        img2img = _plan_img2img(req, decoded, settings, sampler, extras, comments)
    if hashes := lora_hashes(lora_pairs):
        extras["Lora hashes"] = hashes
    refiner = _plan_refiner(models, req, checkpoint, extras)
    # 8. alwayson_scripts extensions: parsed and prepared now, so their errors come first too.
    effects = _plan_extensions(models, req, checkpoint, width, height, batch_size, decoded)
    extras.update(effects.infotext)
    warnings.extend(effects.warnings)
    return Plan(
        request=req,
        settings=settings,
        checkpoint=checkpoint,
        sampler=sampler,
        eta=eta,
        clip_skip=clip_skip,
        batch_size=batch_size,
        seeds=seeds,
        subseeds=subseeds,
        prompts=prompts,
        negative_prompts=negatives,
        cond_prompts=cond_prompts,
        loras=loras,
        embeddings=models.embeddings,
        vae=vae,
        effects=effects,
        width=width,
        height=height,
        rng_device=_rng_device(checkpoint, settings.randn_source),
        hires=hires,
        img2img=img2img,
        refiner=refiner,
        extras=extras,
        warnings=warnings,
        comments=comments,
    )


def short_title(info: CheckpointInfo) -> str:
    """webui's CheckpointInfo.short_title: "name [hash]" (Hires checkpoint, Refiner keys)."""
    return f"{info.name_for_extra} [{info.shorthash}]" if info.shorthash else info.name_for_extra


def _checkpoint(models: Models, name: str | None, field: str) -> LoadedCheckpoint:
    info = models.catalog.resolve_checkpoint(name, field=field) if name else models.default
    return models.cache.get(info)


def _rng_device(checkpoint: LoadedCheckpoint, source: str) -> str:
    """webui's randn_source: "GPU" draws on CUDA when the model is there, "CPU" always on CPU
    ("NV" is refused by the request parser: engine/payload.py)."""
    on_cuda = placement(checkpoint).device.type == "cuda"
    return "cuda" if source == "GPU" and on_cuda else "cpu"


def _plan_hires(
    models: Models,
    req: Txt2ImgRequest,
    settings: Settings,
    checkpoint: LoadedCheckpoint,
    sampler: SamplerChoice,
    prompts: list[str],
    negatives: list[str],
    extras: dict[str, Any],
    warnings: list[str],
) -> tuple[int, int, Hires | None]:
    width, height = req.width, req.height
    if req.firstphase_width > 0 or req.firstphase_height > 0:
        # Legacy (<1.0) hires API: firstphase_* is the first pass (webui ignores width/height).
        width, height = firstphase_to_hires(
            req.width, req.height, req.firstphase_width, req.firstphase_height
        )
    if not req.enable_hr:
        return width, height, None
    hr_checkpoint = checkpoint
    if req.hr_checkpoint_name not in (*_OFF, "Use same checkpoint"):
        hr_checkpoint = _checkpoint(models, req.hr_checkpoint_name, "hr_checkpoint_name")
        _same_family(checkpoint, hr_checkpoint, "hr_checkpoint_name")
        extras["Hires checkpoint"] = short_title(hr_checkpoint.info)
    hr_sampler = sampler
    if req.hr_sampler_name not in (*_OFF, "Use same sampler") or req.hr_scheduler not in (
        *_OFF,
        "Use same scheduler",
    ):
        name = (
            req.hr_sampler_name
            if req.hr_sampler_name not in (*_OFF, "Use same sampler")
            else sampler.sampler
        )
        scheduler = (
            req.hr_scheduler
            if req.hr_scheduler not in (*_OFF, "Use same scheduler")
            else req.scheduler
        )
        hr_sampler = resolve_sampler(
            name, None, scheduler, sampler_field="hr_sampler_name", scheduler_field="hr_scheduler"
        )
        if hr_sampler.sampler != sampler.sampler:
            extras["Hires sampler"] = hr_sampler.sampler
        if hr_sampler.schedule_label != sampler.schedule_label:
            extras["Hires schedule type"] = hr_sampler.schedule_label
    hr_prompts = [req.hr_prompt or p for p in prompts]
    hr_negatives = [req.hr_negative_prompt or n for n in negatives]
    if hr_prompts != prompts:
        extras["Hires prompt"] = hr_prompts[0]
    if hr_negatives != negatives:
        extras["Hires negative prompt"] = hr_negatives[0]
    target = hires_target(width, height, req.hr_scale, req.hr_resize_x, req.hr_resize_y)
    extras.update(target.infotext)
    if req.hr_second_pass_steps:
        extras["Hires steps"] = req.hr_second_pass_steps
    upscaler = hr_upscaler_choice(req.hr_upscaler)
    if req.hr_upscaler is not None:
        extras["Hires upscaler"] = req.hr_upscaler
    schedule, run = img2img_steps(
        req.hr_second_pass_steps or req.steps,
        req.denoising_strength,
        fix_steps=True,
        timestep_sampler=hr_sampler.row.ignores_schedule,
    )
    hires = Hires(
        target=target,
        upscaler=upscaler,
        checkpoint=hr_checkpoint,
        sampler=hr_sampler,
        schedule_steps=schedule,
        steps_run=run,
        denoise=req.denoising_strength,
        prompts=hr_prompts,
        negative_prompts=hr_negatives,
        loras=_plan_networks(
            models, req, hr_checkpoint, hr_prompts, req.batch_size, "hr_prompt", warnings
        )[1],
    )
    return width, height, hires


def _plan_extensions(
    models: Models,
    req: Txt2ImgRequest | Img2ImgRequest,
    checkpoint: LoadedCheckpoint,
    width: int,
    height: int,
    batch_size: int,
    decoded: tuple[list[Any], Any] | None,
) -> Effects:
    effects = Effects()
    if not req.alwayson_scripts:
        return effects
    if models.extensions is None:
        raise RequestError.single(
            "alwayson_scripts", list(req.alwayson_scripts), "no extensions are installed"
        )
    parsed = models.extensions.parse(req.alwayson_scripts)
    context = GenerationContext(
        mode="img2img" if isinstance(req, Img2ImgRequest) else "txt2img",
        loaded=checkpoint,
        width=width,
        height=height,
        batch_size=batch_size,
        steps=req.steps,
        init_images=tuple(decoded[0]) if decoded is not None else (),
        init_mask=decoded[1] if decoded is not None else None,
        resize_mode=req.resize_mode if isinstance(req, Img2ImgRequest) else 0,
        request=req,
    )
    for extension, args in parsed:
        effects = effects.merge(extension.prepare(context, args))
    return effects


def _plan_networks(
    models: Models,
    req: Txt2ImgRequest | Img2ImgRequest,
    checkpoint: LoadedCheckpoint,
    prompts: list[str],
    batch_size: int,
    field: str,
    warnings: list[str],
) -> tuple[list[str], PassLoras]:
    """Strip `<kind:...>` tags; LoRA requests per batch from its first prompt (webui). Every
    named LoRA is resolved now (unknown names are errors naming `field`)."""
    stripped, tags = zip(*(extract_extra_networks(p) for p in prompts), strict=True)
    per_batch: list[list[LoraRequest]] = []
    for first in range(0, len(prompts), batch_size):
        requests = []
        for tag in tags[first]:
            if tag.kind != "lora":
                warnings.append(
                    f"{field}: <{tag.kind}:...> networks are not supported; tag ignored"
                )
                continue
            te, unet = lora_weights(tag, field=field)
            requests.append(LoraRequest(tag.name, te, unet))
        per_batch.append([] if req.disable_extra_networks else requests)
    if not any(per_batch):
        return list(stripped), PassLoras(per_batch, None)
    loras = PassLoras(per_batch, models.lora_manager(checkpoint))
    _resolved(loras, field)  # every error before model work
    return list(stripped), loras


def _resolved(loras: PassLoras, field: str = "prompt") -> list[tuple[LoraInfo, LoraRequest]]:
    """(file, tag) pairs of every batch, in mention order (for the Lora hashes infotext)."""
    if loras.manager is None:
        return []
    return [pair for batch in loras.per_batch for pair in loras.manager.resolve(batch, field)]


def _decode_img2img(req: Img2ImgRequest) -> tuple[list[Any], Any]:
    """Init images and mask, decoded strictly (every bad image reported at once)."""
    problems: list[Problem] = []
    images = mask_image = None
    try:
        images = decode_image_list(req.init_images, field="init_images")
    except RequestError as err:
        problems += err.problems
    if req.mask is not None:
        try:
            mask_image = decode_mask(req.mask, field="mask")
        except RequestError as err:
            problems += err.problems
    if images is not None and len(images) > req.batch_size:
        problems.append(
            Problem(
                "init_images",
                f"{len(images)} images",
                f"at most batch_size ({req.batch_size}) images, as in webui",
            )
        )
    if problems:
        raise RequestError(problems)
    assert images is not None
    return images, mask_image


def _plan_img2img(
    req: Img2ImgRequest,
    decoded: tuple[list[Any], Any],
    settings: Settings,
    sampler: SamplerChoice,
    extras: dict[str, Any],
    comments: list[str],
) -> Img2Img:
    images, mask_image = decoded
    # 2. The mask as webui processes it (binarize, invert, blur, crop or resize).
    blur_x, blur_y = effective_mask_blur(req)
    mask_plan = None
    if mask_image is not None:
        mask_plan = prepare_mask(
            mask_image,
            width=req.width,
            height=req.height,
            resize_mode=req.resize_mode,
            mask_blur_x=blur_x,
            mask_blur_y=blur_y,
            inpaint_full_res=req.inpaint_full_res,
            inpaint_full_res_padding=req.inpaint_full_res_padding,
            inpainting_mask_invert=req.inpainting_mask_invert,
            inpainting_fill=req.inpainting_fill,
            mask_round=req.mask_round,
        )
        extras.update(mask_plan.infotext)
        comments.extend(mask_plan.comments)
        if mask_plan.mask is None:
            mask_plan = None
    # 3. Init images resized/cropped/filled; one image repeats for the batch (webui).
    upscaler = settings.upscaler_for_img2img
    inits = [
        prepare_init_image(
            image,
            width=req.width,
            height=req.height,
            resize_mode=req.resize_mode,
            mask=mask_plan,
            inpainting_fill=req.inpainting_fill,
            upscaler=upscaler,
        )
        for image in images
    ]
    # 4. webui's step rule and noise multiplier.
    schedule, run = img2img_steps(
        req.steps,
        req.denoising_strength,
        settings.img2img_fix_steps,
        timestep_sampler=sampler.row.ignores_schedule,
    )
    multiplier = req.initial_noise_multiplier
    if multiplier is None:
        multiplier = settings.initial_noise_multiplier
    if multiplier != 1.0:
        extras["Noise multiplier"] = multiplier
    return Img2Img(
        inits=inits,
        mask=mask_plan,
        resize_mode=req.resize_mode,
        schedule_steps=schedule,
        steps_run=run,
        noise_multiplier=multiplier,
        inpainting_fill=req.inpainting_fill,
        mask_round=req.mask_round,
        mask_weight=settings.inpainting_mask_weight,
    )


def _plan_refiner(
    models: Models,
    req: Txt2ImgRequest | Img2ImgRequest,
    checkpoint: LoadedCheckpoint,
    extras: dict[str, Any],
) -> Refiner | None:
    if req.refiner_checkpoint in _OFF or req.refiner_switch_at is None:
        return None
    if not 0 < req.refiner_switch_at <= 1:
        raise RequestError.single(
            "refiner_switch_at", req.refiner_switch_at, "a fraction of the steps: 0 < value <= 1"
        )
    refiner = _checkpoint(models, req.refiner_checkpoint, "refiner_checkpoint")
    if req.refiner_switch_at == 1:
        # webui switches once (999 - timestep) / 1000 reaches the value: never at 1 (slider max).
        return None
    _same_family(checkpoint, refiner, "refiner_checkpoint")
    extras["Refiner"] = short_title(refiner.info)
    extras["Refiner switch at"] = req.refiner_switch_at
    return Refiner(refiner, req.refiner_switch_at)


def _same_family(base: LoadedCheckpoint, other: LoadedCheckpoint, field: str) -> None:
    if (
        other.family.latent_space != base.family.latent_space
        or other.is_inpainting != base.is_inpainting
    ):
        kind = (
            "an SDXL (base or refiner)" if base.family.latent_space == "sdxl" else "an SD 1.x/2.x"
        )
        raise RequestError.single(
            field,
            other.info.title,
            f"must be {kind} checkpoint like {base.info.title}, with the same UNet inputs (the "
            "latent spaces must match)",
        )


# --------------------------------------------------------------------------------------------
# One batch


def run_batch(plan: Plan, lo: int, hi: int, progress: Progress) -> tuple[list[Any], Embeddings]:
    """One UNet batch: noise, first pass (txt2img or img2img), hires pass, decode, overlay.
    Returns the images and the embeddings the prompts used."""
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
    tiled = [m.pipe.unet for m in _models_used(plan)] + [plan.vae.vae]
    with (
        torch.inference_mode(),
        circular_padding(tiled, bool(plan.request.tiling)),
        LoraSwitch() as loras,
    ):
        # 2. The first pass, with the prompt's LoRAs.
        loras.switch(plan.loras, batch)
        if plan.img2img is None:
            latents, used = txt2img_pass(
                plan, seeds, noise, generators, prompts, negatives, progress
            )
        else:
            latents, used = img2img_pass(
                plan, plan.img2img, lo, hi, noise, generators, prompts, negatives, progress
            )
        # 3. Hires fix: upscale, then img2img at the target size with fresh noise of the same seeds.
        if plan.hires is not None:
            loras.switch(plan.hires.loras, batch)  # hr_prompt's LoRAs (kept when the same)
            latents, hires_used = hires_pass(plan, plan.hires, latents, lo, hi, progress)
            used = {**used, **hires_used}
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
    return images, used


def _models_used(plan: Plan) -> list[LoadedCheckpoint]:
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
    errors). Switching to the set already active keeps it (no deactivate/activate)."""

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
            self.enter_context(manager.applied(requests))
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


def _ensd(plan: Plan) -> int:
    """The infotext's ENSD: webui prints it only for samplers that use it (eta != 0)."""
    delta = plan.settings.eta_noise_seed_delta
    if delta and uses_ensd(plan.sampler, plan.eta):
        return int(delta)
    return 0


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
    )


def _run(
    plan: Plan,
    loaded: LoadedCheckpoint,
    spec: SamplerPass,
    noise: torch.Tensor,
    prompts: list[str],
    negatives: list[str],
    generators: list[torch.Generator],
    seeds: Sequence[int],
    size: tuple[int, int],
    progress: Progress,
    *,
    init: torch.Tensor | None = None,
    inpaint_inputs: torch.Tensor | None = None,
    blend: MaskBlend | None = None,
    refiner: Refiner | None = None,
    hires_steps: int | None = None,
    hooks: Sequence[Any] = (),
) -> Sampled:
    """One sampler pass over `loaded` (and the refiner, which takes over at its switch point):
    the final latents and the embeddings the prompts used."""
    width, height = size
    settings = plan.settings
    calls = spec.model_calls
    schedules = PromptSchedules.build(prompts, negatives, plan.request.steps, hires_steps)
    stages = []
    conditioners = []
    models = [(loaded, None)] + ([(refiner.checkpoint, refiner.switch_at)] if refiner else [])
    for model, switch_at in models:
        conditioner = TextConditioner(
            model,
            plan.clip_skip,
            emphasis=settings.emphasis,
            comma_backtrack=settings.comma_padding_backtrack,
            embeddings=plan.embeddings,
        )
        conditioners.append(conditioner)
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
                hooks=tuple(hooks) if model is loaded else (),
                switch_at=switch_at,
            )
        )
    denoiser = CFGDenoiser(
        stages=stages,
        cfg_scale=plan.request.cfg_scale,
        total=calls,
        inpaint_inputs=inpaint_inputs,
        blend=blend,
        cfg_hooks=tuple(plan.effects.cfg_hooks),
        progress=progress,
    )
    latents = run_pass(spec, denoiser, noise, generators, seeds, plan.rng_device, init)
    if blend is not None:
        latents = blend.apply(latents)  # webui's final blend of the inpainted latent
    used = {name: h for c in conditioners for name, h in c.used_embeddings.items()}
    return latents, used


@dataclass(frozen=True)
class UNetPlacement:
    """Where a checkpoint's UNet lives, read once per checkpoint: diffusers' `device` and
    `dtype` properties walk every parameter on each access."""

    device: torch.device
    dtype: torch.dtype


def placement(loaded: LoadedCheckpoint) -> UNetPlacement:
    cached = loaded.extra.get("placement")
    if not isinstance(cached, UNetPlacement):
        param = next(loaded.pipe.unet.parameters())
        cached = UNetPlacement(param.device, param.dtype)
        loaded.extra["placement"] = cached
    return cached


def discretization(loaded: LoadedCheckpoint) -> Discretization:
    """The checkpoint's sigmas, computed once per checkpoint."""
    cached = loaded.extra.get("discretization")
    if not isinstance(cached, Discretization):
        cached = Discretization.from_config(loaded.scheduler_config)
        loaded.extra["discretization"] = cached
    return cached


def txt2img_pass(
    plan: Plan,
    seeds: list[int],
    noise: torch.Tensor,
    generators: list[torch.Generator],
    prompts: list[str],
    negatives: list[str],
    progress: Progress,
) -> Sampled:
    loaded = plan.checkpoint
    steps = plan.request.steps
    spec = _sampler_pass(plan, plan.sampler, loaded, steps, steps, img2img=False)
    inpaint_inputs = None
    if loaded.is_inpainting:
        inpaint_inputs = txt2img_inpaint_inputs(
            plan.vae.vae, loaded, noise.shape[0], plan.width, plan.height
        )
    return _run(
        plan,
        loaded,
        spec,
        noise,
        prompts,
        negatives,
        generators,
        seeds,
        (plan.width, plan.height),
        progress,
        inpaint_inputs=inpaint_inputs,
        refiner=plan.refiner,
        hooks=plan.effects.unet_hooks,
    )


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
) -> Sampled:
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
        return init, {}
    spec = _sampler_pass(
        plan, plan.sampler, loaded, job.schedule_steps, job.steps_run, img2img=True
    )
    # 4. Inpainting conditioning (9-channel) and the per-step blend with the original.
    inpaint_inputs = None
    if loaded.is_inpainting:
        inpaint_inputs = img2img_inpaint_inputs(plan.vae.vae, loaded, inits, job)
    blend = MaskBlend(init.to(torch.float32), 1 - repaint) if repaint is not None else None
    return _run(
        plan,
        loaded,
        spec,
        noise * job.noise_multiplier,
        prompts,
        negatives,
        generators,
        plan.seeds[lo:hi],
        (plan.width, plan.height),
        progress,
        init=init,
        inpaint_inputs=inpaint_inputs,
        blend=blend,
        refiner=plan.refiner,
        hooks=plan.effects.unet_hooks,
    )


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
) -> Sampled:
    loaded = hires.checkpoint
    target = hires.target
    # 1. Upscale: in latent space, or decode -> pixel upscaler -> encode.
    if hires.upscaler.latent:
        upscaled = upscale_latent(latents, target.resize_x, target.resize_y, hires.upscaler.name)
        upscaled = crop_latent(upscaled, target)
    else:
        images = decode_latents(plan.vae.vae, latents)
        resized = [
            resize_image(
                1 if target.crop else 0,
                upscale_pixels(img, target.resize_x, target.resize_y, hires.upscaler.name),
                target.width,
                target.height,
            )
            for img in images
        ]
        upscaled = encode_images(plan.vae.vae, resized).to(torch.float32)
    if hires.steps_run <= 0:
        return upscaled, {}  # webui decodes the upscaled latent as it is when denoising is 0
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
    return _run(
        plan,
        loaded,
        hires_pass_spec,
        noise,
        [extract_extra_networks(p)[0] for p in hires.prompts[lo:hi]],
        hires.negative_prompts[lo:hi],
        generators,
        plan.seeds[lo:hi],
        (target.width, target.height),
        progress,
        init=upscaled,
        inpaint_inputs=inpaint_inputs,
        hooks=plan.effects.hires_unet_hooks,
        hires_steps=hires.steps_run,
    )


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


# --------------------------------------------------------------------------------------------
# Response pieces


def image_params(plan: Plan, index: int, used: Embeddings) -> ImageParams:
    req = plan.request
    info = plan.checkpoint.info
    settings = plan.settings
    resize = (req.seed_resize_from_w, req.seed_resize_from_h)
    return ImageParams(
        steps=req.steps,
        sampler=plan.sampler.sampler,
        schedule_type=plan.sampler.schedule_label,
        cfg_scale=req.cfg_scale,
        seed=plan.seeds[index],
        width=plan.width,
        height=plan.height,
        model_hash=info.shorthash if settings.add_model_hash_to_info else None,
        model_name=info.name_for_extra if settings.add_model_name_to_info else None,
        vae_hash=plan.vae.file.shorthash if plan.vae.file else None,
        vae_name=plan.vae.file.name_for_infotext if plan.vae.file else None,
        subseed=plan.subseeds[index] if req.subseed_strength else None,
        subseed_strength=req.subseed_strength,
        seed_resize_from=resize if min(resize) > 0 else None,
        denoising_strength=plan.denoising_strength,
        clip_skip=plan.clip_skip,
        ensd=_ensd(plan),
        tiling=bool(req.tiling),
        rng=None if settings.randn_source == "GPU" else settings.randn_source,
        conditional_mask_weight=(
            plan.img2img.mask_weight
            if plan.img2img is not None and plan.checkpoint.is_inpainting
            else None
        ),
        extra={
            **plan.extras,
            **network_extras(used),
            **eta_infotext_params(plan.sampler, plan.eta),
            **discard_infotext_params(
                plan.sampler, plan.settings.always_discard_next_to_last_sigma
            ),
            **sigma_infotext_params(
                plan.sampler,
                s_churn=settings.s_churn,
                s_tmin=settings.s_tmin,
                s_tmax=settings.s_tmax,
                s_noise=settings.s_noise,
            ),
        },
        version=VERSION if settings.add_version_to_infotext else None,
    )


def network_extras(used: Embeddings) -> dict[str, Any]:
    """webui's "TI hashes" entry, for the embeddings the prompts actually used."""
    if not used:
        return {}
    return {"TI hashes": ", ".join(f"{n}: {h}" for n, h in used.items())}


def image_infotext(plan: Plan, index: int, used: Embeddings) -> str:
    seed_index = min(index, len(plan.seeds) - 1)
    return create_infotext(
        plan.prompts[seed_index],
        plan.negative_prompts[seed_index],
        image_params(plan, seed_index, used),
    )


def build_info(plan: Plan, infotexts: list[str], used: Embeddings) -> InfoRecord:
    req = plan.request
    ckpt = plan.checkpoint.info
    extra = {"Schedule type": plan.sampler.schedule_label, **plan.extras, **network_extras(used)}
    extra.update(eta_infotext_params(plan.sampler, plan.eta))
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
        width=plan.width,
        height=plan.height,
        sampler_name=plan.sampler.sampler,
        cfg_scale=req.cfg_scale,
        steps=req.steps,
        batch_size=req.batch_size,
        restore_faces=bool(req.restore_faces),
        face_restoration_model=None,
        sd_model_name=ckpt.name_for_extra,
        sd_model_hash=ckpt.shorthash,
        sd_vae_name=plan.vae.file.name_for_infotext if plan.vae.file else None,
        sd_vae_hash=plan.vae.file.shorthash if plan.vae.file else None,
        seed_resize_from_w=req.seed_resize_from_w,
        seed_resize_from_h=req.seed_resize_from_h,
        denoising_strength=plan.denoising_strength,
        extra_generation_params=extra,
        index_of_first_image=0,
        infotexts=infotexts,
        styles=list(req.styles or []),
        job_timestamp=job_timestamp(datetime.now()),
        clip_skip=plan.clip_skip,
        is_using_inpainting_conditioning=plan.checkpoint.is_inpainting,
        version=VERSION,
        # One line per problem: a tag repeated in every batch's prompt warns once.
        warnings=list(dict.fromkeys(plan.warnings + plan.comments)),
    )
