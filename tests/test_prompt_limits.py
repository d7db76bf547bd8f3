"""The work a prompt's syntax implies is bounded before any model work (engine/prompt_limits.py)."""

from __future__ import annotations

import json

import pytest

from engine.api import Engine
from engine.errors import RequestError
from engine.payload import LIMIT_ENV, Limits, parse_request
from engine.prompt_limits import PromptBounds, prompt_problems

from .helpers import payload

BOUNDS = PromptBounds(and_parts=4, prompt_chunks=3, prompt_schedule=5, scheduled_chars=200)


def problems(text: str, steps: int = 20, hires: int | None = None, positive: bool = True) -> list:
    return prompt_problems("prompt", text, steps, hires, BOUNDS, positive=positive)


@pytest.mark.parametrize(
    "text",
    [
        "a cat",
        "a AND b AND c AND d",  # 4 parts: at the bound
        "a BREAK b BREAK c",  # 3 chunks
        "[a|b] [c:d:5]",  # 4 texts over 20 steps
        "ANDROID BREAKFAST",  # not the keywords
        "(a BREAK b)",  # BREAK inside brackets is literal for the tokenizer; counted anyway
    ],
)
def test_real_prompts_pass(text: str) -> None:
    assert problems(text) == []


def test_too_many_and_parts_names_the_count_and_the_variable() -> None:
    [problem] = problems("a AND " * 4 + "b")
    assert problem.field == "prompt" and problem.value == "5 AND parts"
    assert "SD_LIMIT_MAX_AND_PARTS" in problem.allowed and "at most 4" in problem.allowed


def test_negative_prompts_are_never_split_on_and() -> None:
    # webui only splits positive prompts; "AND" in a negative prompt is a word.
    assert problems("a AND " * 10, positive=False) == []


def test_lora_tags_are_cut_before_counting() -> None:
    # webui removes <lora:...> before AND splitting; a tag is not a part.
    assert problems("a <lora:x:1> AND b <lora:y:1>") == []


def test_too_many_break_chunks() -> None:
    [problem] = problems("x BREAK " * 3 + "y")
    assert problem.value == "4 BREAK-separated chunks"
    assert "SD_LIMIT_MAX_PROMPT_CHUNKS" in problem.allowed


def test_too_many_scheduled_texts() -> None:
    edits = " ".join(f"[x{i}:y{i}:{i}]" for i in range(1, 5))  # texts at steps 1-4 and 5-10
    assert problems(edits, steps=10) == []
    [problem] = problems(edits + " [p|q]", steps=10)
    assert "different texts over the steps" in problem.value
    assert "SD_LIMIT_MAX_PROMPT_SCHEDULE" in problem.allowed


def test_the_hires_pass_schedule_counts_too() -> None:
    # With hires fix, a fraction above 1 switches during the second pass (webui's timelines).
    one_text = PromptBounds(and_parts=4, prompt_chunks=3, prompt_schedule=1, scheduled_chars=200)
    assert prompt_problems("prompt", "[a:b:1.5]", 10, None, one_text, positive=True) == []
    [problem] = prompt_problems("prompt", "[a:b:1.5]", 10, 10, one_text, positive=True)
    assert problem.value.startswith("2 different texts")


def test_alternation_is_counted_by_distinct_text_not_by_step() -> None:
    # [a|b] changes the text at every step but has only two texts to encode.
    assert problems("[a|b]", steps=150) == []


def test_scheduled_characters_are_bounded() -> None:
    long = "w" * 90
    [problem] = problems(f"{long} [a:b:5] [c:d:10]", steps=20)  # 3 texts x ~95 chars
    assert "characters to encode" in problem.value
    assert "SD_LIMIT_MAX_SCHEDULED_CHARS" in problem.allowed


def test_the_limits_are_configurable_from_the_environment() -> None:
    names = {"and_parts", "prompt_chunks", "prompt_schedule", "scheduled_chars"}
    assert names <= {field for field, _ in LIMIT_ENV.values()}
    limits = Limits.from_env({"SD_LIMIT_MAX_AND_PARTS": "2"})
    assert limits.and_parts == 2


@pytest.mark.parametrize(
    ("field", "text", "needle"),
    [
        ("prompt", "a BREAK " * 2500, "BREAK-separated chunks"),
        ("prompt", "a AND " * 3333, "AND parts"),
        ("prompt", "".join(f"[x{i}:y{i}:{i % 149 + 1}] " for i in range(1500)), "texts over"),
        ("negative_prompt", "b BREAK " * 100, "BREAK-separated chunks"),
        ("hr_prompt", "c AND " * 20, "AND parts"),
    ],
    ids=["breaks", "ands", "edits", "negative-breaks", "hr-ands"],
)
def test_red_team_prompts_are_refused_by_the_request_parser(
    field: str, text: str, needle: str
) -> None:
    body = {"prompt": "a", "steps": 150, "enable_hr": True, field: text[:20000]}
    with pytest.raises(RequestError) as caught:
        parse_request(json.loads(json.dumps(body)), "txt2img", Limits())
    [problem] = [p for p in caught.value.problems if p.field == field]
    assert needle in str(problem.value)


@pytest.mark.parametrize("field", ["prompt", "negative_prompt", "hr_prompt", "hr_negative_prompt"])
def test_a_prompt_of_too_many_tokens_is_refused_before_model_work(
    engine: Engine, field: str
) -> None:
    # Inside the character limit but ~760 chunks of 75 tokens ("ẑ" is 3 CLIP tokens): minutes of
    # text encoding and a huge UNet context. BREAKs alone (the parse-time count) miss it.
    text = "ẑ" * 19000
    body = payload(steps=2, enable_hr=True, hr_scale=1.5, denoising_strength=0.5, **{field: text})
    steps: list[int] = []
    with pytest.raises(RequestError) as caught:
        engine.handle("txt2img", body, lambda step, total: steps.append(step))
    [problem] = caught.value.problems
    assert problem.field == field
    assert (
        str(problem.value).endswith("chunks of 75 tokens") and int(problem.value.split()[0]) > 700
    )
    assert "SD_LIMIT_MAX_PROMPT_CHUNKS" in problem.allowed
    assert steps == []  # refused before the first step
    # A prompt that fits is unaffected (32 chunks is the default bound).
    engine.handle("txt2img", payload(steps=1, **{field: "ẑ" * 100}))
