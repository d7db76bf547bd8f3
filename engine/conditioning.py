"""Prompts -> the text conditioning the sampler loop consumes, per checkpoint family.

SD1/SD2 use one CLIP text encoder; SDXL concatenates CLIP-L and OpenCLIP-G penultimate hidden
states and adds G's pooled projection. An empty SDXL negative prompt is all zeros, as in webui
(and diffusers' force_zeros_for_empty_prompt).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .loading import Family
from .prompts import encode_clip
from .sampling import CondPart, StepConditioning


@dataclass(frozen=True)
class Encoded:
    embeds: torch.Tensor
    pooled: torch.Tensor | None = None


@torch.no_grad()
def _sdxl_encoder(tokenizer: Any, encoder: Any, texts: Sequence[str]) -> tuple[torch.Tensor, Any]:
    ids = tokenizer(
        list(texts),
        padding="max_length",
        max_length=int(tokenizer.model_max_length),
        truncation=True,
        return_tensors="pt",
    ).input_ids.to(encoder.device)
    out = encoder(ids, output_hidden_states=True)
    # SDXL uses the penultimate layer of both encoders, without the final layer norm.
    return out.hidden_states[-2], out


@torch.no_grad()
def encode_sdxl(pipe: Any, texts: Sequence[str], *, zero_empty: bool) -> Encoded:
    hidden_l, _ = _sdxl_encoder(pipe.tokenizer, pipe.text_encoder, texts)
    hidden_g, out_g = _sdxl_encoder(pipe.tokenizer_2, pipe.text_encoder_2, texts)
    embeds = torch.cat([hidden_l, hidden_g], dim=-1)
    pooled = out_g.text_embeds
    if zero_empty:
        empty = torch.tensor([t == "" for t in texts], device=embeds.device)
        embeds = torch.where(empty[:, None, None], torch.zeros_like(embeds), embeds)
        pooled = torch.where(empty[:, None], torch.zeros_like(pooled), pooled)
    return Encoded(embeds.to(pipe.unet.dtype), pooled.to(pipe.unet.dtype))


def encode(
    pipe: Any, family: Family, texts: Sequence[str], *, clip_skip: int, negative: bool
) -> Encoded:
    """One batch of prompts -> embeddings for this family."""
    if family is Family.SDXL:
        return encode_sdxl(pipe, texts, zero_empty=negative)
    skip = clip_skip if family is Family.SD1 else 1
    return Encoded(encode_clip(pipe.tokenizer, pipe.text_encoder, texts, skip).to(pipe.unet.dtype))


def constant_schedule(
    pipe: Any, family: Family, prompts: Sequence[str], negatives: Sequence[str], clip_skip: int
) -> StepConditioning:
    """The same conditioning at every step (plain prompts)."""
    cond = encode(pipe, family, prompts, clip_skip=clip_skip, negative=False)
    uncond = encode(pipe, family, negatives, clip_skip=clip_skip, negative=True)
    return StepConditioning(
        uncond=CondPart(uncond.embeds, 1.0, uncond.pooled),
        conds=(CondPart(cond.embeds, 1.0, cond.pooled),),
    )
