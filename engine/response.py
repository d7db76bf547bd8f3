"""webui's response pieces for a finished plan: per-image infotext and the info JSON."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from . import __version__
from .images import EncodedImage
from .infotext import ImageParams, InfoRecord, create_infotext, job_timestamp
from .passes import Embeddings
from .planning import Plan
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
        extra=extra_params(plan, used),
        version=VERSION if settings.add_version_to_infotext else None,
    )


def extra_params(plan: Plan, used: Embeddings) -> dict[str, Any]:
    """webui's p.extra_generation_params: what the infotext adds after its fixed keys, and
    what `info` lists under extra_generation_params (the same entries in both)."""
    settings = plan.settings
    return {
        **plan.extras,
        **network_extras(used),
        **eta_infotext_params(plan.sampler, plan.eta),
        **discard_infotext_params(plan.sampler, settings.always_discard_next_to_last_sigma),
        **sigma_infotext_params(
            plan.sampler,
            s_churn=settings.s_churn,
            s_tmin=settings.s_tmin,
            s_tmax=settings.s_tmax,
            s_noise=settings.s_noise,
        ),
    }


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
    extra = {"Schedule type": plan.sampler.schedule_label, **extra_params(plan, used)}
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
