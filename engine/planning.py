"""Planning a txt2img or img2img request: everything decided before model work.

`make_plan` resolves names and values (checkpoint, sampler, seeds, prompts, LoRAs, images,
masks, hires and refiner settings) into an immutable `Plan` and raises every user error before
any model work. `Models` is what setup loaded; the passes only read it.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Final

from .catalog import Catalog, CheckpointInfo
from .conditioning import TextConditioner, check_clip_skip
from .embeddings import EmbeddingCatalog
from .encoding_infotext import encoding_infotext, forwards_of
from .errors import Problem, RequestError
from .extensions import Effects, ExtensionRegistry, GenerationContext
from .geometry import (
    HiresTarget,
    HiresUpscaler,
    InitImage,
    MaskPlan,
    PixelUpscale,
    firstphase_to_hires,
    hires_target,
    hr_upscaler_choice,
    img2img_steps,
    img2img_upscaler,
    latent_resize_problem,
    prepare_init_image,
    prepare_mask,
)
from .inputs import decode_image_list, decode_mask
from .limits import Limits
from .loading import Family, LoadedCheckpoint, placement
from .lora_memory import track
from .networks import LoraCatalog, LoraInfo, LoraManager, LoraRequest, lora_hashes
from .payload import (
    Img2ImgRequest,
    ParsedRequest,
    Settings,
    Txt2ImgRequest,
    all_negative_prompts,
    all_prompts,
    effective_mask_blur,
)
from .pipelines import PipelineCache
from .prompt_parser import (
    extract_extra_networks,
    get_learned_conditioning_prompt_schedules,
    lora_weights,
    split_and,
    strip_comments,
)
from .samplers import (
    SamplerChoice,
    effective_eta,
    resolve_sampler,
    schedule_infotext_params,
)
from .schedules import Discretization, ScheduleOptions
from .seeds import fix_seed, request_seeds
from .upscaler_models import UpscalerCatalog
from .vae import VaeCatalog, VaeChoice

log = logging.getLogger(__name__)


_OFF = (None, "", "None", "none")


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
    upscalers: UpscalerCatalog = field(default_factory=UpscalerCatalog)

    def model_upscalers(self, settings: Settings) -> dict[str, PixelUpscale]:
        """The installed model upscalers by webui name, each as webui's
        `Upscaler.upscale(img, scale)` with the request's tile options for its kind
        (`ESRGAN_tile`/`ESRGAN_tile_overlap`, `SWIN_tile`/`SWIN_tile_overlap`, `DAT_tile`/
        `DAT_tile_overlap`)."""
        table: dict[str, PixelUpscale] = {}
        for name in self.upscalers.names:
            tile, overlap = self.upscalers.kind(name).tile_options
            table[name] = partial(
                self.upscalers.upscale,
                name,
                tile=getattr(settings, tile),
                overlap=getattr(settings, overlap),
            )
        return table

    def lora_manager(self, loaded: LoadedCheckpoint) -> LoraManager:
        """One adapter cache per checkpoint, made on first use."""
        title = loaded.info.title
        if title not in self.lora_managers:
            manager = LoraManager(loaded, self.loras)
            # No request's text encoding runs through layers a LoRA load or delete changes.
            manager.modules_lock = self.cache.batcher.text_encoder_lock
            track(manager, self.cache.memory)  # adapters under SD_DEVICE_MEMORY
            self.lora_managers[title] = manager
        return self.lora_managers[title]


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
    # Infotext keys decided here, by where webui inserts them (engine/response.py: extra_params).
    extras: dict[str, Any]  # webui's p.init: the hires or img2img keys
    lora_hashes: str | None
    encoding_extras: dict[str, str]  # "TI hashes" / "Emphasis" (engine/encoding_infotext.py)
    schedule_extras: dict[str, Any]  # the first pass' get_sigmas
    hires_schedule_extras: dict[str, float]  # what the hires pass' get_sigmas adds
    warnings: list[str]
    comments: list[str]

    @property
    def denoising_strength(self) -> float | None:
        if self.img2img is not None or self.hires is not None:
            return float(self.request.denoising_strength)
        return None


def make_plan(models: Models, parsed: ParsedRequest, limits: Limits) -> Plan:
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
    if settings.enable_prompt_comments:  # webui's Comments script, before any tag is read
        prompts = [strip_comments(p) for p in prompts]
        negatives = [strip_comments(n) for n in negatives]
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
        img2img = _plan_img2img(
            req, decoded, settings, sampler, extras, comments, models.model_upscalers(settings)
        )
    refiner = _plan_refiner(models, req, checkpoint)
    # 8. alwayson_scripts extensions: parsed and prepared now, so their errors come first too.
    effects = _plan_extensions(models, req, checkpoint, width, height, batch_size, decoded)
    warnings.extend(effects.warnings)
    # 9. Every text the passes encode within the chunk limit, and what webui's text encoding
    # and get_sigmas add to the infotext (from the first batch).
    conditioner = TextConditioner(
        checkpoint,
        clip_skip,
        emphasis=settings.emphasis,
        comma_backtrack=settings.comma_padding_backtrack,
        embeddings=models.embeddings,
    )
    passes = [
        ("prompt", cond_prompts, req.steps, True),
        ("negative_prompt", negatives, req.steps, False),
    ]
    if hires is not None:
        passes += [
            ("hr_prompt", hires.prompts, hires.schedule_steps, True),
            ("hr_negative_prompt", hires.negative_prompts, hires.schedule_steps, False),
        ]
    _check_chunks(conditioner, passes, limits.prompt_chunks)
    encoding = _encoding_extras(
        conditioner, settings, cond_prompts, negatives, batch_size, req.steps
    )
    schedule = partial(
        schedule_infotext_params, discretization(checkpoint), schedule_options(settings)
    )
    first = schedule(sampler)
    hires_schedule = schedule(hires.sampler, first=False) if hires is not None else {}
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
        lora_hashes=lora_hashes(lora_pairs),
        encoding_extras=encoding,
        schedule_extras=first,
        hires_schedule_extras={k: v for k, v in hires_schedule.items() if k not in first},
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
    extras["Denoising strength"] = float(req.denoising_strength)  # webui's init, first
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
    # The hires prompts fall back to the (already stripped) prompts; their own text is
    # stripped too, as webui's Comments script does with enable_hr.
    strip = strip_comments if settings.enable_prompt_comments else str
    hr_prompt = strip(req.hr_prompt) if req.hr_prompt else None
    hr_prompts = [p if hr_prompt is None else hr_prompt for p in prompts]
    hr_negatives = [
        strip(req.hr_negative_prompt) if req.hr_negative_prompt else n for n in negatives
    ]
    if hr_prompts != prompts:
        extras["Hires prompt"] = hr_prompts[0]
    if hr_negatives != negatives:
        extras["Hires negative prompt"] = hr_negatives[0]
    if hr_sampler.schedule_label != sampler.schedule_label:
        # Its place is set here (webui's init puts a None there); its value at the hires pass.
        extras["Hires schedule type"] = hr_sampler.schedule_label
    target = hires_target(width, height, req.hr_scale, req.hr_resize_x, req.hr_resize_y)
    extras.update(target.infotext)
    if req.hr_second_pass_steps:
        extras["Hires steps"] = req.hr_second_pass_steps
    upscaler = hr_upscaler_choice(req.hr_upscaler, models=models.model_upscalers(settings))
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


def _check_chunks(
    conditioner: TextConditioner,
    passes: list[tuple[str, list[str], int, bool]],
    limit: int,
) -> None:
    """Each text a pass encodes (every AND part and prompt-editing text of every image) in at
    most `limit` chunks of 75 tokens (SD_LIMIT_MAX_PROMPT_CHUNKS). The parse counts BREAKs
    only; tokens need the checkpoint's tokenizer. A prompt of 19,000 "ẑ" (3 tokens each)
    inside the character limit is ~760 chunks: minutes of text encoding, and a UNet context
    that long at every step. Tokenizing costs milliseconds for real prompts."""
    problems: list[Problem] = []
    seen: set[str] = set()  # hr_prompt defaults to the prompt: one problem, the prompt's
    for field_name, prompts, steps, positive in passes:
        distinct = list(dict.fromkeys(prompts))
        parts = [t for p in distinct for t, _ in split_and(p)] if positive else distinct
        schedules = get_learned_conditioning_prompt_schedules(parts, steps)
        texts = {text for schedule in schedules for _, text in schedule} - seen
        seen |= texts
        most = max((conditioner.chunk_count(text) for text in texts), default=0)
        if most > limit:
            problems.append(
                Problem(
                    field_name,
                    f"{most} chunks of 75 tokens",
                    f"at most {limit} chunks per prompt (SD_LIMIT_MAX_PROMPT_CHUNKS)",
                )
            )
    if problems:
        raise RequestError(problems)


def _encoding_extras(
    conditioner: TextConditioner,
    settings: Settings,
    prompts: list[str],
    negatives: list[str],
    batch_size: int,
    steps: int,
) -> dict[str, str]:
    """webui's "TI hashes" and "Emphasis" for the first batch's first-pass encodings."""
    forwards = forwards_of(
        prompts[:batch_size], negatives[:batch_size], steps, conditioner.embeddings_in
    )
    return encoding_infotext(forwards, settings.emphasis, wrappers=len(conditioner.slots))


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
    encoded_whole = images if images is not None and req.resize_mode == 3 else []
    for index, image in enumerate(encoded_whole):
        lacking = latent_resize_problem(image.size, first=encoded_whole[0].size if index else None)
        if lacking is not None:
            size = f"a {image.width}x{image.height} image"
            problems.append(Problem(f"init_images[{index}]", size, lacking))
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
    model_upscalers: Mapping[str, PixelUpscale],
) -> Img2Img:
    images, mask_image = decoded
    extras["Denoising strength"] = float(req.denoising_strength)  # webui's init, first
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
    upscaler = img2img_upscaler(settings.upscaler_for_img2img, model_upscalers)
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
    models: Models, req: Txt2ImgRequest | Img2ImgRequest, checkpoint: LoadedCheckpoint
) -> Refiner | None:
    if req.refiner_checkpoint in _OFF or req.refiner_switch_at is None:
        return None
    # 0..1 is checked with the field. At 0 webui's apply_refiner switches before the first
    # step (`completed_ratio < 0` never holds): the refiner runs every step.
    refiner = _checkpoint(models, req.refiner_checkpoint, "refiner_checkpoint")
    if req.refiner_switch_at == 1:
        # webui switches once (999 - timestep) / 1000 reaches the value: never at 1 (slider max).
        return None
    _same_family(checkpoint, refiner, "refiner_checkpoint")
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


def schedule_options(settings: Settings) -> ScheduleOptions:
    """webui's sigma_min / sigma_max / rho / beta_dist_alpha / beta_dist_beta options."""
    return ScheduleOptions(
        sigma_min=settings.sigma_min,
        sigma_max=settings.sigma_max,
        rho=settings.rho,
        beta_alpha=settings.beta_dist_alpha,
        beta_beta=settings.beta_dist_beta,
        old_karras=settings.use_old_karras_scheduler_sigmas,
    )


def discretization(loaded: LoadedCheckpoint) -> Discretization:
    """The checkpoint's sigmas, computed once per checkpoint."""
    cached = loaded.extra.get("discretization")
    if not isinstance(cached, Discretization):
        cached = Discretization.from_config(loaded.scheduler_config)
        loaded.extra["discretization"] = cached
    return cached
