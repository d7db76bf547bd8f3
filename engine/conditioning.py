"""Prompts -> the per-step text conditioning the sampler loop consumes, as webui builds it.

webui's pipeline for a prompt (reference §5; modules/sd_hijack_clip.py, prompt_parser.py):
1. extra-network tags are stripped (the caller does that, see networks),
2. the positive prompt is split on AND into weighted parts (composable prompts),
3. each part becomes a schedule of texts over the steps (prompt editing, alternation),
4. each text is tokenized into 77-token chunks with per-token weights (emphasis, BREAK, comma
   back-off, textual-inversion embeddings), every chunk is encoded on its own, weighted, and
   the chunks are concatenated.
SD1 applies webui's clip skip; SD2 uses its (already penultimate) last layer; SDXL
concatenates CLIP-L and OpenCLIP-G penultimate states and adds G's pooled projection from the
first chunk. An empty SDXL negative prompt is all zeros, as in webui.

The text encoders are run layer by layer here (the same modules and arithmetic as their
forward, checked bit for bit in the tests) because textual-inversion vectors have to replace
token embeddings, which transformers 5's CLIPTextModel.forward no longer accepts.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from .embeddings import EmbeddingCatalog
from .errors import RequestError
from .loading import Family, LoadedCheckpoint
from .prompt_parser import (
    Chunk,
    EmbeddingMatch,
    get_learned_conditioning_prompt_schedules,
    split_and,
    tokenize_chunks,
)
from .sampling import CondPart, StepConditioning
from .step_batcher import text_encoding

PENULTIMATE = -2


@dataclass(frozen=True)
class EncoderSlot:
    """One text encoder of a checkpoint and how webui reads it."""

    tokenizer: Any
    encoder: Any
    pad_token_id: int | None  # OpenCLIP-style encoders pad with 0 after the first EOS
    layer: int  # hidden state index: -1 last (final norm applied), -N with `normed`
    normed: bool  # apply the final layer norm to the chosen hidden state
    vectors_key: str  # which vector set of a textual-inversion file this encoder takes
    pooled: bool = False  # SDXL's second encoder also gives the pooled projection


def encoder_slots(loaded: LoadedCheckpoint, clip_skip: int) -> list[EncoderSlot]:
    pipe = loaded.pipe
    if loaded.family is Family.SDXL:
        return [
            EncoderSlot(pipe.tokenizer, pipe.text_encoder, None, PENULTIMATE, False, "clip_l"),
            EncoderSlot(
                pipe.tokenizer_2, pipe.text_encoder_2, 0, PENULTIMATE, False, "clip_g", pooled=True
            ),
        ]
    if loaded.family is Family.SDXL_REFINER:  # OpenCLIP-G only
        return [
            EncoderSlot(
                pipe.tokenizer_2, pipe.text_encoder_2, 0, PENULTIMATE, False, "clip_g", pooled=True
            )
        ]
    if loaded.family is Family.SD2:
        return [EncoderSlot(pipe.tokenizer, pipe.text_encoder, 0, -1, True, "clip_h")]
    # SD1, webui: N = 1 the last layer; N >= 2 hidden state -N through the final layer norm.
    return [
        EncoderSlot(pipe.tokenizer, pipe.text_encoder, None, -max(1, clip_skip), True, "clip_l")
    ]


def check_clip_skip(text_encoder: Any, clip_skip: int) -> None:
    """webui's CLIP_stop_at_last_layers N reads hidden layer -N; it must exist."""
    layers = int(text_encoder.config.num_hidden_layers)
    if clip_skip > layers:
        raise RequestError.single(
            "override_settings.CLIP_stop_at_last_layers",
            clip_skip,
            f"this checkpoint's text encoder has {layers} layers; allowed: 1..{layers}",
        )


@dataclass(frozen=True)
class Encoded:
    embeds: torch.Tensor  # (1, 77 * chunks, D)
    pooled: torch.Tensor | None = None  # (1, P)


def _text_model(encoder: Any) -> Any:
    return getattr(encoder, "text_model", encoder)


@torch.no_grad()
def run_encoder(
    encoder: Any, ids: torch.Tensor, token_embeds: torch.Tensor
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """CLIP text encoder forward from token embeddings: (hidden states, final-normed last)."""
    from transformers.masking_utils import create_causal_mask

    model = _text_model(encoder)
    hidden = model.embeddings(inputs_embeds=token_embeds)
    mask = create_causal_mask(
        config=model.config, inputs_embeds=hidden, attention_mask=None, cache=None
    )
    states = [hidden]
    for layer in model.encoder.layers:
        out = layer(hidden, mask, is_causal=True)
        hidden = out[0] if isinstance(out, tuple) else out
        states.append(hidden)
    return states, model.final_layer_norm(hidden)


def apply_emphasis(z: torch.Tensor, multipliers: torch.Tensor, emphasis: str) -> torch.Tensor:
    """webui sd_emphasis: "Original" weights and restores the chunk's mean, "No norm" only
    weights, "Ignore"/"None" leave it (their multipliers are all 1 anyway)."""
    if emphasis in ("Ignore", "None") or bool((multipliers == 1).all()):
        # All weights 1: webui's rescale is by exactly 1 (or 0/0 when the mean is 0).
        return z
    original_mean = z.mean()
    z = z * multipliers.reshape(1, -1, 1)
    new_mean = z.mean()
    # Guard webui's division: a mean of (almost) zero would blow the chunk up or give NaN
    # (it happens with layer norms without bias); then the weights apply without the rescale.
    if emphasis == "Original" and new_mean.abs() > 1e-4 * z.abs().mean():
        z = z * (original_mean / new_mean)
    return z


@dataclass
class TextConditioner:
    """Encodes prompt texts for one checkpoint, caching each distinct text for the request."""

    loaded: LoadedCheckpoint
    clip_skip: int
    emphasis: str = "Original"
    comma_backtrack: int = 20
    embeddings: EmbeddingCatalog | None = None
    _cache: dict[tuple[str, bool], Encoded] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.slots = encoder_slots(self.loaded, self.clip_skip)
        self.dtype = self.loaded.pipe.unet.dtype

    def _finder(
        self, slot: EncoderSlot
    ) -> Callable[[Sequence[int], int], EmbeddingMatch | None] | None:
        if self.embeddings is None or not self.embeddings.items:
            return None
        return self.embeddings.finder(
            slot.tokenizer, slot.vectors_key, int(_text_model(slot.encoder).config.hidden_size)
        )

    def _chunks(self, slot: EncoderSlot, text: str) -> list[Chunk]:
        return tokenize_chunks(
            slot.tokenizer,
            text,
            emphasis=self.emphasis,
            comma_backtrack=self.comma_backtrack,
            pad_token_id=slot.pad_token_id,
            find_embedding=self._finder(slot),
        )

    def chunk_count(self, text: str) -> int:
        """How many 75-token chunks `text` encodes to (tokenizing only)."""
        return len(self._chunks(self.slots[0], text))

    def embeddings_in(self, texts: Sequence[str]) -> list[tuple[str, str]]:
        """(name, hash) of the embeddings one webui forward over `texts` uses, in the order
        it records them: chunk by chunk, and within a chunk text by text (tokenizing only;
        SDXL's two tokenizers find the same names)."""
        if self.embeddings is None or not self.embeddings.items:
            return []
        per_text = [self._chunks(self.slots[0], text) for text in texts]
        found: dict[str, str] = {}
        for index in range(max((len(chunks) for chunks in per_text), default=0)):
            for chunks in per_text:
                for _, name in chunks[index].embeddings if index < len(chunks) else ():
                    found.setdefault(name, self.embeddings.get(name).hash)
        return list(found.items())

    def _encode_chunk(self, slot: EncoderSlot, chunk: Chunk) -> tuple[torch.Tensor, torch.Tensor]:
        model = _text_model(slot.encoder)
        device = slot.encoder.device
        ids = torch.tensor([chunk.tokens], device=device)
        token_embeds = model.embeddings.token_embedding(ids)
        if chunk.embeddings and self.embeddings is not None:
            token_embeds = token_embeds.clone()
            for index, name in chunk.embeddings:
                item = self.embeddings.get(name)
                vectors = item.vectors_for(slot.vectors_key, token_embeds.shape[-1])
                end = min(index + vectors.shape[0], token_embeds.shape[1] - 1)
                token_embeds[0, index:end] = vectors[: end - index].to(token_embeds)
        states, last = run_encoder(slot.encoder, ids, token_embeds)
        z = last if slot.layer == -1 else states[slot.layer]
        if slot.normed and slot.layer != -1:
            z = model.final_layer_norm(z)
        weights = torch.tensor(chunk.multipliers, device=device, dtype=z.dtype)
        z = apply_emphasis(z, weights, self.emphasis)
        pooled = last[0, ids[0].argmax()].unsqueeze(0)
        if slot.pooled and hasattr(slot.encoder, "text_projection"):
            pooled = slot.encoder.text_projection(pooled)
        return z, pooled

    @torch.no_grad()
    def encode(self, text: str, *, negative: bool = False) -> Encoded:
        key = (text, negative)
        if key in self._cache:
            return self._cache[key]
        per_slot = []
        pooled = None
        # Beside other requests' UNet steps, with this request's text-encoder LoRAs
        # (engine/step_batcher.py).
        with text_encoding():
            for slot in self.slots:
                chunks = self._chunks(slot, text)
                encoded = [self._encode_chunk(slot, chunk) for chunk in chunks]
                per_slot.append(torch.cat([z for z, _ in encoded], dim=1))
                if slot.pooled:
                    pooled = encoded[0][1]  # webui: the pooled output of the first chunk
        # Both SDXL encoders chunk the same token ids, so their lengths agree.
        length = max(t.shape[1] for t in per_slot)
        per_slot = [
            _pad_to(t, length, lambda t=t: torch.zeros_like(t[:, :77]))  # type: ignore[misc]
            for t in per_slot
        ]
        embeds = torch.cat(per_slot, dim=-1)
        if self.loaded.family is Family.SDXL and negative and text == "":
            embeds = torch.zeros_like(embeds)
            pooled = torch.zeros_like(pooled) if pooled is not None else None
        result = Encoded(embeds.to(self.dtype), None if pooled is None else pooled.to(self.dtype))
        self._cache[key] = result
        return result


def _pad_to(t: torch.Tensor, length: int, filler: Callable[[], torch.Tensor]) -> torch.Tensor:
    while t.shape[1] < length:
        t = torch.cat([t, filler()], dim=1)
    return t


# --------------------------------------------------------------------------------------------
# Per-step schedules


Schedule = list[tuple[int, str]]  # (end step, text), webui's ScheduledPromptConditioning


def pick(schedule: Schedule, step: int) -> str:
    """webui reconstruct_cond_batch: the first entry whose end step is >= the current step."""
    for end, text in schedule:
        if step <= end:
            return text
    return schedule[-1][1]


@dataclass
class PromptSchedules:
    """The batch's prompts as schedules: positive AND-parts with weights, and the negatives."""

    parts: list[list[tuple[Schedule, float]]]  # per image: [(schedule, weight), ...]
    negatives: list[Schedule]

    @classmethod
    def build(
        cls,
        prompts: Sequence[str],
        negatives: Sequence[str],
        steps: int,
        hires_steps: int | None = None,
    ) -> PromptSchedules:
        parts = []
        for prompt in prompts:
            split = split_and(prompt)
            texts = [text for text, _ in split]
            schedules = get_learned_conditioning_prompt_schedules(texts, steps, hires_steps)
            parts.append(
                [(sched, weight) for sched, (_, weight) in zip(schedules, split, strict=True)]
            )
        negs = get_learned_conditioning_prompt_schedules(list(negatives), steps, hires_steps)
        # Images whose prompts have fewer AND parts get zero-weight copies of their first part,
        # which add nothing to the CFG sum, so one UNet batch serves the whole batch.
        most = max(len(p) for p in parts)
        for image_parts in parts:
            image_parts += [(image_parts[0][0], 0.0)] * (most - len(image_parts))
        return cls(parts, negs)


def step_conditioning(
    conditioner: TextConditioner, schedules: PromptSchedules, steps: int, timesteps: int
) -> Callable[[int], StepConditioning]:
    """index of the sampler's model call -> the batch's conditioning at that step.

    The batch tensors are rebuilt only when a schedule picks another text (prompt editing,
    alternation); a plain prompt is assembled once for the whole run."""
    current: dict[tuple[tuple[str, ...], ...], StepConditioning] = {}

    def at(index: int) -> StepConditioning:
        # Second-order samplers call the model twice per step: map calls onto webui's steps.
        step = min(steps - 1, index * steps // max(timesteps, 1))
        negatives = tuple(pick(s, step) for s in schedules.negatives)
        parts = tuple(
            tuple(pick(image[j][0], step) for image in schedules.parts)
            for j in range(len(schedules.parts[0]))
        )
        key = (negatives, *parts)
        if key in current:
            return current[key]
        negative = [conditioner.encode(text, negative=True) for text in negatives]
        positives = [
            (
                [conditioner.encode(text) for text in texts],
                [image[j][1] for image in schedules.parts],
            )
            for j, texts in enumerate(parts)
        ]
        current.clear()  # keep only the texts in use now
        # The empty-chunk filler is encoded only when lengths differ (cached by the encoder).
        current[key] = _assemble(negative, positives, lambda: conditioner.encode("").embeds)
        return current[key]

    return at


def _stack(
    encoded: list[Encoded], length: int, filler: Callable[[], torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor | None]:
    embeds = torch.cat([_pad_to(e.embeds, length, filler) for e in encoded])
    pooled = None
    if encoded[0].pooled is not None:
        pooled = torch.cat([e.pooled for e in encoded if e.pooled is not None])
    return embeds, pooled


def _assemble(
    negative: list[Encoded],
    positives: list[tuple[list[Encoded], list[float]]],
    filler: Callable[[], torch.Tensor],
) -> StepConditioning:
    # Every tensor of one UNet batch needs the same length: the shorter ones are padded with
    # the encoding of an empty chunk (webui runs cond and uncond separately by default, which
    # needs no padding; its pad_cond_uncond option pads the same way).
    everything = negative + [e for encoded, _ in positives for e in encoded]
    length = max(e.embeds.shape[1] for e in everything)
    u_embeds, u_pooled = _stack(negative, length, filler)
    parts = []
    for encoded, weights in positives:
        embeds, pooled = _stack(encoded, length, filler)
        weight = torch.tensor(weights, device=embeds.device, dtype=embeds.dtype).view(-1, 1, 1, 1)
        parts.append(CondPart(embeds, weight, pooled))
    return StepConditioning(uncond=CondPart(u_embeds, 1.0, u_pooled), conds=tuple(parts))
