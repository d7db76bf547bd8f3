"""Prompt text -> text-encoder embeddings for SD 1.x / 2.x, with webui's clip skip.

This is the plain encoder: the text is tokenized as is and truncated to CLIP's 77-token
window (webui's prompt grammar, long prompts and emphasis arrive with a later issue).
We encode here instead of inside the diffusers pipeline because diffusers' clip-skip path
reaches for `text_encoder.text_model`, which transformers 5 no longer has on CLIPTextModel.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from .errors import RequestError


def _final_norm(text_encoder: Any) -> Any:
    inner = getattr(text_encoder, "text_model", text_encoder)
    return inner.final_layer_norm


def check_clip_skip(text_encoder: Any, clip_skip: int) -> None:
    """webui's CLIP_stop_at_last_layers N reads hidden layer -N; it must exist."""
    layers = int(text_encoder.config.num_hidden_layers)
    if clip_skip > layers:
        raise RequestError.single(
            "override_settings.CLIP_stop_at_last_layers",
            clip_skip,
            f"this checkpoint's text encoder has {layers} layers; allowed: 1..{layers}",
        )


def truncation_warnings(tokenizer: Any, field: str, texts: Sequence[str]) -> list[str]:
    """One warning per distinct text longer than CLIP's window (it is cut, not chunked, yet)."""
    window = int(tokenizer.model_max_length) - 2  # BOS and EOS take two places
    notes = []
    for text in dict.fromkeys(texts):
        count = len(tokenizer(text, truncation=False, add_special_tokens=False).input_ids)
        if count > window:
            notes.append(
                f"{field}: {count} tokens; only the first {window} are used (long prompts are "
                "not supported yet)"
            )
    return notes


@torch.no_grad()
def encode_clip(
    tokenizer: Any, text_encoder: Any, texts: Sequence[str], clip_skip: int
) -> torch.Tensor:
    """Embeddings as webui computes them for SD1/SD2: N=1 the last layer (final norm
    included), N>=2 hidden state -N passed through the final layer norm (sd_hijack_clip)."""
    window = int(tokenizer.model_max_length)
    ids = tokenizer(
        list(texts), padding="max_length", max_length=window, truncation=True, return_tensors="pt"
    ).input_ids.to(text_encoder.device)
    if clip_skip <= 1:
        embeds = text_encoder(ids)[0]
    else:
        hidden = text_encoder(ids, output_hidden_states=True).hidden_states[-clip_skip]
        embeds = _final_norm(text_encoder)(hidden)
    return embeds.to(dtype=text_encoder.dtype)
