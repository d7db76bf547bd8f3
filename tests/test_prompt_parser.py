"""webui's prompt language: expected values are webui's own doctests and documented examples
(modules/prompt_parser.py, sd_hijack_clip.py, extra_networks.py), written out by hand.

Weights are written as the products webui forms, left to right (`1.3 * 1.1 * 1.1`), so the
tables compare bit-equal floats as webui's doctests do.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import pytest

from engine.errors import RequestError
from engine.prompt_parser import (
    CHUNK_LENGTH,
    MAX_WEIGHT,
    Chunk,
    EmbeddingMatch,
    extract_extra_networks,
    get_learned_conditioning_prompt_schedules,
    lora_weights,
    parse_prompt_attention,
    split_and,
    strip_comments,
    tokenize_chunks,
)

BOS, EOS = 49406, 49407
CAT, COMMA = 2368, 267

# ---------------------------------------------------------------------------------------
# parse_prompt_attention
# ---------------------------------------------------------------------------------------

ATTENTION_CASES: list[tuple[str, list[tuple[str, float]]]] = [
    # webui's doctests
    ("normal text", [("normal text", 1.0)]),
    ("an (important) word", [("an ", 1.0), ("important", 1.1), (" word", 1.0)]),
    ("(unbalanced", [("unbalanced", 1.1)]),
    ("\\(literal\\]", [("(literal]", 1.0)]),
    ("(unnecessary)(parens)", [("unnecessaryparens", 1.1)]),
    (
        "a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
        [
            ("a ", 1.0),
            ("house", 1.3 * 1.1 * 1.1),  # 1.5730000000000004 in webui's doctest
            (" ", 1.1),
            ("on", 1.0),
            (" a ", 1.1),
            ("hill", 0.5 * 1.1),
            (", sun, ", 1.1),
            ("sky", 1.1 * 1.1 * 1.1 * 1.1),  # 1.4641000000000006
            (".", 1.1),
        ],
    ),
    # the documented syntax
    ("[a]", [("a", 1 / 1.1)]),
    ("[[a]]", [("a", 1 / 1.1 / 1.1)]),
    ("((a:1.3):0.5)", [("a", 1.3 * 0.5)]),
    ("(x:-1)", [("x", -1.0)]),
    ("(x: 1.5 )", [("x", 1.5)]),
    ("(x:.5) (y:2.)", [("x", 0.5), (" ", 1.0), ("y", 2.0)]),
    ("", [("", 1.0)]),
    # unbalanced and stray brackets: closers without an opener are literal
    ("a)b]", [("a)b]", 1.0)]),
    ("[unclosed (both", [("unclosed ", 1 / 1.1), ("both", 1.1 / 1.1)]),
    # round and square brackets are separate stacks
    ("(a [b) c]", [("a ", 1.1), ("b", 1.1 / 1.1), (" c", 1 / 1.1)]),
    # escapes; a backslash before anything else is dropped
    ("\\\\ \\[x\\)", [("\\ [x)", 1.0)]),
    ("a\\b", [("ab", 1.0)]),
    # BREAK
    ("a BREAK b", [("a", 1.0), ("BREAK", -1.0), ("b", 1.0)]),
    ("a\nBREAK\nb", [("a", 1.0), ("BREAK", -1.0), ("b", 1.0)]),
    ("BREAK", [("", 1.0), ("BREAK", -1.0), ("", 1.0)]),
    ("a BREAK BREAK b", [("a", 1.0), ("BREAK", -1.0), ("", 1.0), ("BREAK", -1.0), ("b", 1.0)]),
    ("BREAKfast break", [("BREAKfast break", 1.0)]),
    # inside brackets BREAK is weighted, so it is no longer the marker (webui's edge case)
    ("(a BREAK b)", [("a", 1.1), ("BREAK", -1.1), ("b", 1.1)]),
    # weights webui's regex does not take as numbers stay literal text
    ("(x:nan)", [("x:nan", 1.1)]),
    ("(x:inf)", [("x:inf", 1.1)]),
    ("(x:1e309)", [("x:1e309", 1.1)]),
    ("(a:1.2.3)", [("a:1.2.3", 1.1)]),  # webui raises ValueError here
    # weights are clamped to ±MAX_WEIGHT
    ("(x:1e3)", [("x:1e3", 1.1)]),
    ("(x:1000)", [("x", MAX_WEIGHT)]),
    ("(x:-1000)", [("x", -MAX_WEIGHT)]),
    ("(x:1" + "0" * 400 + ")", [("x", MAX_WEIGHT)]),
]


@pytest.mark.parametrize(("text", "expected"), ATTENTION_CASES)
def test_parse_prompt_attention(text: str, expected: list[tuple[str, float]]) -> None:
    assert parse_prompt_attention(text) == expected


# ---------------------------------------------------------------------------------------
# Prompt editing and alternation
# ---------------------------------------------------------------------------------------

ALTERNATE_FEMALE = [(s, "female" if s % 2 else "male") for s in range(1, 11)]

SCHEDULE_CASES: list[tuple[str, list[tuple[int, str]]]] = [
    # webui's doctests (10 steps)
    ("test", [(10, "test")]),
    ("a [b:3]", [(3, "a "), (10, "a b")]),
    ("a [b: 3]", [(3, "a "), (10, "a b")]),
    ("a [[[b]]:2]", [(2, "a "), (10, "a [[b]]")]),
    ("[(a:2):3]", [(3, ""), (10, "(a:2)")]),
    ("a [b : c : 1] d", [(1, "a b  d"), (10, "a  c  d")]),
    ("a[b:[c:d:2]:1]e", [(1, "abe"), (2, "ace"), (10, "ade")]),
    ("a [unbalanced", [(10, "a [unbalanced")]),
    ("a [b:.5] c", [(5, "a  c"), (10, "a b c")]),
    ("((a][:b:c [d:3]", [(3, "((a][:b:c "), (10, "((a][:b:c d")]),
    ("[a|(b:1.1)]", [(s, "a" if s % 2 else "(b:1.1)") for s in range(1, 11)]),
    ("[fe|]male", ALTERNATE_FEMALE),
    ("[fe|||]male", [(s, "female" if s % 4 == 1 else "male") for s in range(1, 11)]),
    # the three forms of prompt editing (webui-api.md §5)
    ("[from:to:3]", [(3, "from"), (10, "to")]),
    ("[to:2]", [(2, ""), (10, "to")]),
    ("[from::2]", [(2, "from"), (10, "")]),
    ("a [b:c:0.5] d", [(5, "a b d"), (10, "a c d")]),
    # nesting: an alternation inside an edit
    ("[a:[b|c]:8]", [*[(s, "a") for s in range(1, 9)], (9, "b"), (10, "c")]),
    # a "|" outside [a|b], or a trailing backslash: the whole prompt is literal
    ("a [b:3] | c", [(10, "a [b:3] | c")]),
    ("[a|b:3]", [(10, "[a|b:3]")]),
    ("a [b:3] \\", [(10, "a [b:3] \\")]),
    # not an edit: stays literal
    ("[a:b:c:3]", [(10, "[a:b:c:3]")]),
    ("[a:1e]", [(10, "[a:1e]")]),
    ("\\[a:2]", [(10, "\\[a:2]")]),
    # inside a bracket that is not valid, a valid one still counts
    ("[a:[b:3]:c:4]", [(3, "[a::c:4]"), (10, "[a:b:c:4]")]),
    # out-of-range steps are clamped (webui raises OverflowError on 1e309)
    ("[x:y:1e309]", [(10, "x")]),
    ("[x:y:-1e309]", [(10, "y")]),
]


@pytest.mark.parametrize(("prompt", "expected"), SCHEDULE_CASES)
def test_schedules(prompt: str, expected: list[tuple[int, str]]) -> None:
    assert get_learned_conditioning_prompt_schedules([prompt], 10) == [expected]


HIRES_CASES: list[tuple[str, int | None, bool, list[tuple[int, str]]]] = [
    # (prompt, hires_steps, use_old_scheduling, schedule); base steps are 10.
    # webui's doctests: in the hires pass fractions run over 1.0-2.0 ...
    ("a [b:.5] c", 10, False, [(10, "a b c")]),
    ("a [b:1.5] c", 10, False, [(5, "a  c"), (10, "a b c")]),
    # ... and integers count on from the base steps
    ("a [b:3] c", 10, False, [(10, "a b c")]),
    ("a [b:13] c", 10, False, [(3, "a  c"), (10, "a b c")]),
    ("a [b:13] c", 20, False, [(3, "a  c"), (20, "a b c")]),
    # old timelines: hires steps are ignored, values below 1 are fractions
    ("a [b:0.5] c", 10, True, [(5, "a  c"), (10, "a b c")]),
    ("a [b:3] c", None, True, [(3, "a  c"), (10, "a b c")]),
    ("a [b:1.5] c", None, True, [(1, "a  c"), (10, "a b c")]),
]


@pytest.mark.parametrize(("prompt", "hires", "old", "expected"), HIRES_CASES)
def test_schedules_hires_and_old_timelines(
    prompt: str, hires: int | None, old: bool, expected: list[tuple[int, str]]
) -> None:
    got = get_learned_conditioning_prompt_schedules([prompt], 10, hires, use_old_scheduling=old)
    assert got == [expected]


def test_schedules_one_list_per_prompt_in_order() -> None:
    got = get_learned_conditioning_prompt_schedules(["a", "[b:c:2]", "a"], 4)
    assert got == [[(4, "a")], [(2, "b"), (4, "c")], [(4, "a")]]


# ---------------------------------------------------------------------------------------
# AND
# ---------------------------------------------------------------------------------------

AND_CASES: list[tuple[str, list[tuple[str, float]]]] = [
    ("a cat", [("a cat", 1.0)]),
    ("a cat :1.2 AND a dog :0.7", [("a cat", 1.2), (" a dog", 0.7)]),
    ("a AND b AND c:-.5", [("a", 1.0), (" b", 1.0), (" c", -0.5)]),
    ("a : 2.  ", [("a", 2.0)]),
    # word-bounded, uppercase only
    ("ANDROID and AND", [("ANDROID and", 1.0), ("", 1.0)]),
    # not a number: stays in the text
    ("a:1.2.3 AND (x:1.1)", [("a:1.2.3", 1.0), (" (x:1.1)", 1.0)]),
    ("a :1e5", [("a :1e5", 1.0)]),
    # clamped
    ("a :555", [("a", MAX_WEIGHT)]),
]


@pytest.mark.parametrize(("prompt", "expected"), AND_CASES)
def test_split_and(prompt: str, expected: list[tuple[str, float]]) -> None:
    assert split_and(prompt) == expected


# ---------------------------------------------------------------------------------------
# Extra networks
# ---------------------------------------------------------------------------------------

EXTRA_CASES: list[tuple[str, str, list[tuple[str, str, tuple[str, ...], dict[str, str]]]]] = [
    (
        "<lora:a:0.5> cat <lora:b:0.2:0.8>",
        " cat ",
        [("lora", "a", ("0.5",), {}), ("lora", "b", ("0.2", "0.8"), {})],
    ),
    ("<lyco:x:1>dog", "dog", [("lora", "x", ("1",), {})]),
    ("<lora:x:te=0.5:unet=1>", "", [("lora", "x", (), {"te": "0.5", "unet": "1"})]),
    (
        "<hypernet:agm:1.1> <whatever:q>",
        " ",
        [("hypernet", "agm", ("1.1",), {}), ("whatever", "q", (), {})],
    ),
    # webui's regex: no match without a ">", or with nothing after the colon
    ("<lora:a:1", "<lora:a:1", []),
    ("<lora:> x", "<lora:> x", []),
    ("a <b> c", "a <b> c", []),
    # [^>]+ runs to the first ">", even over another "<"
    ("<lora:a <lora:b:1>", "", [("lora", "a <lora", ("b", "1"), {})]),
    # "a=b=c" has three parts: positional (webui splits with maxsplit 2)
    ("<lora:x:a=b=c>", "", [("lora", "x", ("a=b=c",), {})]),
]


@pytest.mark.parametrize(("prompt", "text", "tags"), EXTRA_CASES)
def test_extract_extra_networks(
    prompt: str, text: str, tags: list[tuple[str, str, tuple[str, ...], dict[str, str]]]
) -> None:
    got_text, got_tags = extract_extra_networks(prompt)
    assert got_text == text
    assert [(t.kind, t.name, t.positional, dict(t.named)) for t in got_tags] == tags


def test_extra_network_keeps_the_tag_as_written() -> None:
    _, tags = extract_extra_networks("x <lyco:foo:0.3> y")
    assert tags[0].source == "<lyco:foo:0.3>"


LORA_WEIGHT_CASES: list[tuple[str, tuple[float, float]]] = [
    ("<lora:x>", (1.0, 1.0)),
    ("<lora:x:0.8>", (0.8, 0.8)),
    ("<lora:x:0.5:1.0>", (0.5, 1.0)),
    ("<lora:x:0.5:1.0:8>", (0.5, 1.0)),
    ("<lora:x:te=0.5:unet=1>", (0.5, 1.0)),
    ("<lora:x:te=0.25>", (0.25, 0.25)),  # unet defaults to te
    ("<lora:x:0.3:unet=0.9>", (0.3, 0.9)),
    ("<lora:x:-1>", (-1.0, -1.0)),
]


@pytest.mark.parametrize(("prompt", "expected"), LORA_WEIGHT_CASES)
def test_lora_weights(prompt: str, expected: tuple[float, float]) -> None:
    _, tags = extract_extra_networks(prompt)
    (tag,) = tags
    assert lora_weights(tag, field="prompt") == expected
    assert (tag.te_weight, tag.unet_weight) == expected


@pytest.mark.parametrize(
    "prompt", ["<lora:x:abc>", "<lora:x:0.5:big>", "<lora:x:te=nan>", "<lora:x:inf>"]
)
def test_lora_weight_that_is_not_a_number_is_a_request_error(prompt: str) -> None:
    _, tags = extract_extra_networks(prompt)
    with pytest.raises(RequestError) as caught:
        lora_weights(tags[0], field="prompt")
    message = str(caught.value)
    assert message.startswith("Invalid request: prompt: got")
    assert prompt in message
    assert "not a number" in message


# ---------------------------------------------------------------------------------------
# tokenize_chunks with the real CLIP tokenizer
# ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory) -> Any:
    from transformers import CLIPTokenizer

    from engine.clip_vocab import EOS as EOS_TEXT
    from engine.clip_vocab import write_tokenizer

    folder: Path = tmp_path_factory.mktemp("clip-tokenizer")
    write_tokenizer(folder, pad_token=EOS_TEXT)
    return CLIPTokenizer.from_pretrained(str(folder))


def prompt_tokens(chunk: Chunk) -> list[int]:
    return chunk.tokens[1 : 1 + chunk.token_count]


def assert_well_formed(chunks: list[Chunk]) -> None:
    for chunk in chunks:
        assert len(chunk.tokens) == len(chunk.multipliers) == CHUNK_LENGTH + 2
        assert chunk.tokens[0] == BOS and chunk.tokens[-1] == EOS
        assert chunk.multipliers[0] == chunk.multipliers[-1] == 1.0
        assert all(m == 1.0 for m in chunk.multipliers[1 + chunk.token_count :])


def test_token_ids_of_a_short_prompt(tokenizer: Any) -> None:
    (chunk,) = tokenize_chunks(tokenizer, "a photo of a cat")
    assert chunk.token_count == 5
    assert chunk.tokens[:7] == [BOS, 320, 1125, 539, 320, CAT, EOS]
    assert chunk.tokens[7:] == [EOS] * 70
    assert chunk.multipliers == [1.0] * 77
    assert_well_formed([chunk])


def test_empty_prompt_gives_one_padded_chunk(tokenizer: Any) -> None:
    (chunk,) = tokenize_chunks(tokenizer, "")
    assert chunk.tokens == [BOS] + [EOS] * 76
    assert chunk.token_count == 0


def test_a_hundred_words_give_two_chunks(tokenizer: Any) -> None:
    chunks = tokenize_chunks(tokenizer, " ".join(["cat"] * 100))
    assert [c.token_count for c in chunks] == [75, 25]
    assert_well_formed(chunks)
    assert prompt_tokens(chunks[0]) == [CAT] * 75
    assert prompt_tokens(chunks[1]) == [CAT] * 25


def test_break_ends_a_chunk(tokenizer: Any) -> None:
    chunks = tokenize_chunks(tokenizer, "a cat BREAK a photo")
    assert [prompt_tokens(c) for c in chunks] == [[320, CAT], [320, 1125]]
    assert_well_formed(chunks)
    # two BREAKs in a row leave an empty chunk between them, as in webui
    assert [c.token_count for c in tokenize_chunks(tokenizer, "cat BREAK BREAK cat")] == [1, 0, 1]
    # with emphasis "None" the prompt is not parsed: BREAK is a word
    assert len(tokenize_chunks(tokenizer, "a cat BREAK a photo", emphasis="None")) == 1


def test_comma_back_off_moves_the_tail_to_the_next_chunk(tokenizer: Any) -> None:
    prompt = "cat " * 70 + ", " + "photo " * 10  # comma is token 71 of 81
    chunks = tokenize_chunks(tokenizer, prompt)
    assert [c.token_count for c in chunks] == [71, 10]
    assert prompt_tokens(chunks[0]) == [CAT] * 70 + [COMMA]
    assert prompt_tokens(chunks[1]) == [1125] * 10
    assert_well_formed(chunks)
    # comma too far from the end, or back-off off: the chunk is cut at 75
    assert [c.token_count for c in tokenize_chunks(tokenizer, prompt, comma_backtrack=3)] == [75, 6]
    assert [c.token_count for c in tokenize_chunks(tokenizer, prompt, comma_backtrack=0)] == [75, 6]


def test_multipliers_follow_the_weights(tokenizer: Any) -> None:
    (chunk,) = tokenize_chunks(tokenizer, "a (cat:1.5) [photo] ((of))")
    assert prompt_tokens(chunk) == [320, CAT, 1125, 539]
    assert chunk.multipliers[:6] == [1.0, 1.0, 1.5, 1 / 1.1, 1.1 * 1.1, 1.0]


@pytest.mark.parametrize(
    ("emphasis", "tokens", "multipliers"),
    [
        ("Original", [CAT, 1125], [1.5, 1.0]),
        ("No norm", [CAT, 1125], [1.5, 1.0]),
        ("Ignore", [CAT, 1125], [1.0, 1.0]),
        # not parsed: "(", ":1.5)" are tokenized as text
        ("None", None, None),
    ],
)
def test_emphasis_modes(
    tokenizer: Any, emphasis: str, tokens: list[int] | None, multipliers: list[float] | None
) -> None:
    (chunk,) = tokenize_chunks(tokenizer, "(cat:1.5) photo", emphasis=emphasis)
    if tokens is None:
        assert chunk.token_count > 2 and CAT in chunk.tokens
        assert set(chunk.multipliers) == {1.0}
        return
    assert prompt_tokens(chunk) == tokens
    assert chunk.multipliers[1:3] == multipliers


def test_unknown_emphasis_is_a_request_error(tokenizer: Any) -> None:
    with pytest.raises(RequestError, match=r"override_settings\.emphasis: got 'Loud'"):
        tokenize_chunks(tokenizer, "cat", emphasis="Loud")


def test_pad_token_replaces_everything_after_the_first_eos(tokenizer: Any) -> None:
    (chunk,) = tokenize_chunks(tokenizer, "a cat", pad_token_id=0)
    assert chunk.tokens == [BOS, 320, CAT, EOS] + [0] * 73
    full = tokenize_chunks(tokenizer, "cat " * 75, pad_token_id=0)[0]
    assert full.tokens == [BOS] + [CAT] * 75 + [EOS]


def test_an_embedding_never_straddles_two_chunks(tokenizer: Any) -> None:
    photo = 1125

    def find(ids: Any, position: int) -> EmbeddingMatch | None:
        if ids[position] != photo:
            return None
        return EmbeddingMatch(name="emb", consumed=1, token_ids=(1, 2, 3, 4))

    chunks = tokenize_chunks(tokenizer, "cat " * 73 + "photo cat", find_embedding=find)
    assert [c.token_count for c in chunks] == [73, 5]
    assert prompt_tokens(chunks[1]) == [1, 2, 3, 4, CAT]
    assert chunks[1].embeddings == ((1, "emb"),)
    assert_well_formed(chunks)


# ---------------------------------------------------------------------------------------
# Hostile input: fast, finite, never raises
# ---------------------------------------------------------------------------------------

HOSTILE = {
    "10k nested parens": "(" * 10_000 + "x" + ")" * 10_000,
    "10k unclosed parens": "(" * 10_000 + "x",
    "nesting with text at every level": "(a" * 20_000 + ")" * 20_000,
    "nested square edits": "[a:" * 5_000 + "x" + ":1]" * 5_000,
    "huge weight": "(x:1e309) (y:1" + "0" * 400 + ") (z:-1" + "0" * 400 + ")",
    "overflow then zero": "(" * 8_000 + "x" + ")" * 8_000 + ":0)",
    "nan text": "(x:nan) [y:nan:3] (z:inf) a :nan AND b",
    "100k characters": ("a photo of a (cat:1.2), [dog] BREAK " * 3_000)[:100_000],
    "100k spaces": " " * 100_000 + "x",
    "unclosed tags": "<lora:" * 16_000,
    "many alternations": "[a|b]" * 20_000,
    "long number": "(x:" + "1" * 100_000,
}


HANG_GUARD_S = 15.0


@pytest.mark.parametrize("name", list(HOSTILE))
def test_hostile_prompts_are_fast_and_finite(tokenizer: Any, name: str) -> None:
    prompt = HOSTILE[name]
    started = time.perf_counter()
    text, _ = extract_extra_networks(prompt)
    parts = split_and(text)
    schedule = get_learned_conditioning_prompt_schedules([parts[0][0]], 20)[0]
    weights = parse_prompt_attention(schedule[-1][1])
    chunks = tokenize_chunks(tokenizer, schedule[-1][1])
    elapsed = time.perf_counter() - started
    # A hang guard, not a speed target (those are benchmarks): each input here takes well
    # under a second in linear time, while a quadratic pass over 100k characters takes minutes.
    # The bound is generous because CI machines may be busy.
    assert elapsed < HANG_GUARD_S, f"{name}: {elapsed:.2f} s"
    assert all(math.isfinite(w) and abs(w) <= MAX_WEIGHT for _, w in weights)
    assert all(math.isfinite(w) and abs(w) <= MAX_WEIGHT for _, w in parts)
    assert all(math.isfinite(m) and abs(m) <= MAX_WEIGHT for c in chunks for m in c.multipliers)
    assert_well_formed(chunks)


def test_deep_nesting_weight_is_clamped() -> None:
    assert parse_prompt_attention("(" * 10_000 + "x" + ")" * 10_000) == [("x", MAX_WEIGHT)]
    ((text, weight),) = parse_prompt_attention("[" * 10_000 + "x")
    assert text == "x" and 0.0 <= weight < 1e-300
    # 1.1**8000 overflows; multiplied by 0 webui would get nan, we get 0
    assert parse_prompt_attention("(" * 8_000 + "(x" + ")" * 8_000 + ":0)") == [("x", 0.0)]


@pytest.mark.parametrize(
    ("text", "stripped"),
    [
        # Worked by hand through webui's two substitutions (processing_scripts/comments.py):
        # a whole-line comment and its line break become one break, then `#` to the end of a
        # line becomes a break.
        ("a cat # and a dog", "a cat \n"),
        ("#only a comment\nreal", "\nreal"),
        ("a\n#x\nb", "a\nb"),
        ("a\n#x\n#y\nb", "a\n\nb"),  # the second line's break was used by the first match
        ("x#y#z", "x\n"),
        ("no comment", "no comment"),
        ("<lora:a:1> cat # <lora:b:1>", "<lora:a:1> cat \n"),
    ],
)
def test_comments_are_stripped_as_webui_does(text: str, stripped: str) -> None:
    assert strip_comments(text) == stripped
