"""How much text-encoder and UNet work a prompt's own syntax implies, checked against limits.

A prompt inside `prompt_chars` can still ask for a lot: every `AND` part is one more UNet batch
row at every step (composable diffusion), every `BREAK` one more 75-token chunk per encode, and
every distinct text that prompt editing (`[from:to:when]`, `[a|b]`) produces over the steps is
encoded separately. webui bounds none of these; a server shared by many users has to, so the
bounds are ours (SD_LIMIT_MAX_AND_PARTS, SD_LIMIT_MAX_PROMPT_CHUNKS,
SD_LIMIT_MAX_PROMPT_SCHEDULE, SD_LIMIT_MAX_SCHEDULED_CHARS) and sized far above what real
prompts use. Everything here is pure and linear in the prompt length times the step count.
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import Problem
from .prompt_parser import (
    extract_extra_networks,
    get_learned_conditioning_prompt_schedules,
    split_and,
    split_break,
)


@dataclass(frozen=True)
class PromptBounds:
    """The limits this module checks (a slice of payload.Limits, so it needs no import cycle)."""

    and_parts: int
    prompt_chunks: int
    prompt_schedule: int
    scheduled_chars: int


def prompt_problems(
    field: str,
    prompt: str,
    steps: int,
    hires_steps: int | None,
    bounds: PromptBounds,
    *,
    positive: bool,
) -> list[Problem]:
    """The problems of one prompt text, in webui's processing order (tags, AND, schedules).

    `hires_steps` is the second pass's step count when hires fix runs (its schedule is
    computed separately, as webui does). Negative prompts have no AND (webui never splits
    them), but the same chunk and schedule bounds."""
    # 1. LoRA and other extra-network tags are cut out first, as in webui.
    text = extract_extra_networks(prompt)[0] if positive else prompt
    # 2. Composable diffusion: each part is a UNet batch row at every step.
    parts = [part for part, _ in split_and(text)] if positive else [text]
    if len(parts) > bounds.and_parts:
        return [
            Problem(
                field,
                f"{len(parts)} AND parts",
                f"at most {bounds.and_parts} AND parts per prompt (SD_LIMIT_MAX_AND_PARTS)",
            )
        ]
    # 3. BREAK starts a new 75-token chunk: a lower bound on the chunks one encode needs.
    chunks = max(len(split_break(part)) for part in parts)
    if chunks > bounds.prompt_chunks:
        return [
            Problem(
                field,
                f"{chunks} BREAK-separated chunks",
                f"at most {bounds.prompt_chunks} chunks per prompt (SD_LIMIT_MAX_PROMPT_CHUNKS)",
            )
        ]
    # 4. Prompt editing: every distinct text over the steps is one more encode.
    texts: set[str] = set()
    passes = [None] if hires_steps is None else [None, hires_steps]
    for hires in passes:
        for schedule in get_learned_conditioning_prompt_schedules(parts, steps, hires):
            texts.update(text for _, text in schedule)
        if len(texts) > bounds.prompt_schedule:
            break
    problems = []
    if len(texts) > bounds.prompt_schedule:
        problems.append(
            Problem(
                field,
                f"{len(texts)} different texts over the steps (prompt editing)",
                f"at most {bounds.prompt_schedule} per prompt (SD_LIMIT_MAX_PROMPT_SCHEDULE)",
            )
        )
    elif (chars := sum(len(t) for t in texts)) > bounds.scheduled_chars:
        problems.append(
            Problem(
                field,
                f"{chars} characters to encode over the steps (prompt editing)",
                f"at most {bounds.scheduled_chars} per prompt (SD_LIMIT_MAX_SCHEDULED_CHARS)",
            )
        )
    return problems
