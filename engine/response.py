"""webui's response pieces for a finished plan: per-image infotext and the info JSON."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from . import __version__
from .images import EncodedImage
from .infotext import ImageParams, InfoRecord, create_infotext, job_timestamp
from .planning import Plan, short_title
from .samplers import (
    discard_infotext_params,
    eta_infotext_params,
    sigma_infotext_params,
    uses_ensd,
)

log = logging.getLogger(__name__)


VERSION = f"cog-webui-sd-v{__version__}"


@dataclass
class Result:
    """A finished generation, in webui's response shape."""

    images: list[EncodedImage]
    info: str
    parameters: dict[str, Any]
    warnings: list[str] = field(default_factory=list)


def _ensd(plan: Plan) -> int:
    """The infotext's ENSD: webui prints it only for samplers that use it (eta != 0)."""
    delta = plan.settings.eta_noise_seed_delta
    if delta and uses_ensd(plan.sampler, plan.eta):
        return int(delta)
    return 0


def image_params(plan: Plan, index: int) -> ImageParams:
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
        extra=extra_params(plan),
        version=VERSION if settings.add_version_to_infotext else None,
    )


def extra_params(plan: Plan) -> dict[str, Any]:
    """webui's p.extra_generation_params: what the infotext adds after its fixed keys, and
    what `info` lists under extra_generation_params (the same entries in both).

    In the order webui 1.10.1 inserts them (a key set again keeps its first place): the
    extensions' `process` hooks, `p.init` (hires or img2img keys), the extensions'
    `before_process_batch` hooks, the LoRA activation, text encoding, img2img's noise
    multiplier, the first pass' `get_sigmas` and `Sampler.initialize`, the hires pass'
    `get_sigmas`, and the refiner at its switch (during sampling)."""
    settings = plan.settings
    noise = plan.img2img.noise_multiplier if plan.img2img is not None else 1.0
    refiner: dict[str, Any] = {}
    if plan.refiner is not None:
        refiner["Refiner"] = short_title(plan.refiner.checkpoint.info)
        refiner["Refiner switch at"] = plan.refiner.switch_at
    return {
        **plan.effects.infotext,
        **plan.extras,
        **plan.effects.batch_infotext,
        **({"Lora hashes": plan.lora_hashes} if plan.lora_hashes else {}),
        **plan.encoding_extras,
        **({"Noise multiplier": noise} if noise != 1.0 else {}),
        **discard_infotext_params(plan.sampler, settings.always_discard_next_to_last_sigma),
        **plan.schedule_extras,
        **eta_infotext_params(plan.sampler, plan.eta),
        **sigma_infotext_params(
            plan.sampler,
            s_churn=settings.s_churn,
            s_tmin=settings.s_tmin,
            s_tmax=settings.s_tmax,
            s_noise=settings.s_noise,
        ),
        **plan.hires_schedule_extras,
        **refiner,
    }


def image_infotext(plan: Plan, index: int) -> str:
    seed_index = min(index, len(plan.seeds) - 1)
    return create_infotext(
        plan.prompts[seed_index],
        plan.negative_prompts[seed_index],
        image_params(plan, seed_index),
    )


def build_info(plan: Plan, infotexts: list[str]) -> InfoRecord:
    req = plan.request
    ckpt = plan.checkpoint.info
    extra = extra_params(plan)
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
        batch_size=plan.batch_size,  # k init images make a batch of k: webui p.batch_size
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
