"""webui's prompt language as pure functions (no model; a tokenizer object is passed in).

webui's `modules/prompt_parser.py`, `sd_hijack_clip.py` and `extra_networks.py` are the
spec; this is our own code with the same results. webui processes a prompt in this order
(reference/webui-api.md §5), and so should the caller:

1. `extract_extra_networks`: `<kind:args>` tags are cut out of the positive prompt.
2. `split_and`: the prompt is split on `AND`, each part may end with `:weight`.
3. `get_learned_conditioning_prompt_schedules`: `[from:to:when]` and `[a|b]` give one text
   per step range.
4. `tokenize_chunks` (which calls `parse_prompt_attention`): each text becomes 77-token
   chunks with one multiplier per token.

Rules for odd input. Nothing here raises on any prompt text, recurses, or takes more than
linear time (apart from `lora_weights`, which rejects a tag whose weight is not a number,
and `tokenize_chunks`, which rejects an unknown emphasis mode):

- Attention, unbalanced brackets (webui's rule): a `(` or `[` never closed is closed at the
  end of the prompt (round ones first, then square ones, each in order of position); a `)`
  or `]` with no open bracket of its kind is literal text. Round and square brackets are
  tracked separately, so `(a [b) c]` weights `a` ×1.1, `b` ×1.1/1.1 and `c` ×1/1.1.
- Attention escapes: `\\(`, `\\)`, `\\[`, `\\]`, `\\\\` give the character; a backslash before
  anything else is dropped (webui's `\\\\|` rule).
- Attention weights: only `(text:N)` with N written as `[+-]?` digits with at most one
  `.` (`1`, `1.`, `.5`, `-0.7`) is a weight. Anything else after the colon (`nan`, `inf`,
  `1e309`, `1.2.3`) leaves the colon and the text literal and the `)` closes with ×1.1
  (webui itself crashes on `1.2.3`). Every resulting weight is clamped to
  [-MAX_WEIGHT, MAX_WEIGHT] = [-100, 100], so deep nesting (1.1**depth) or a 400-digit
  weight still gives finite embeddings. Products are formed in webui's order (bit-equal
  weights, so the merging of equal runs matches); when that would take more than
  `_EXACT_WORK_LIMIT` multiplications (pathological nesting) or overflows, they are computed
  in log space instead (equal up to rounding), which is linear.
- BREAK (uppercase, word-bounded, surrounding whitespace eaten) becomes its own
  `("BREAK", -1.0)` entry; inside brackets it is weighted like text and so stays a literal
  word, as in webui.
- Scheduling (`[from:to:when]`, `[to:when]`, `[from::when]`, `[a|b]`): webui parses with a
  lark grammar; we match its results with a linear scanner. A bracket is structural when its
  contents form a valid prompt (balanced, properly nested, at most one `:` directly inside
  `( )`, at most two `:` directly inside `[ ]` and then a number after the last one, no `:`
  together with `|`); otherwise it is literal text and only the brackets inside it that are
  valid on their own count. Where stray brackets make the grammar ambiguous (e.g.
  `[[x:y:1][`), lark's choice depends on Python's string-hash seed, so webui's result
  changes from run to run; we always take the structural reading, one of lark's. As in
  webui, a `|` that is not directly inside a valid `[a|b]`,
  or a backslash at the end of the prompt or before a newline, makes the whole prompt
  unschedulable: it is used as one text for all steps. `when`: an integer is a step, a
  number with `.` is a fraction of the steps (with hires steps, integers count on from the
  base steps and fractions run over 1.0-2.0); `use_old_scheduling`: values below 1 are
  fractions. Steps beyond the range are clamped (webui crashes on `1e309`).
- AND: `\\bAND\\b` splits; a part ending in `:N` (`[+-]?` digits with at most one `.`) has
  weight N, clamped to [-MAX_WEIGHT, MAX_WEIGHT]; the text keeps its leading whitespace and
  loses its trailing whitespace, like webui.
- Chunks: see `tokenize_chunks`.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from itertools import pairwise
from types import MappingProxyType
from typing import Any

from .errors import RequestError, show_choices

MAX_WEIGHT = 100.0
"""Bound on every attention and AND weight (webui has none; ours keeps embeddings finite)."""

CHUNK_LENGTH = 75
"""Prompt tokens per chunk; with BOS and EOS a chunk is 77 tokens, CLIP's window."""

EMPHASIS_MODES = ("Original", "No norm", "Ignore", "None")
"""webui's `emphasis` option values (sd_emphasis.py)."""

BREAK = ("BREAK", -1.0)
"""The entry `parse_prompt_attention` gives for a BREAK keyword (webui's marker)."""

# Work budget of the bit-exact weight computation, in multiplications (see module doc).
_EXACT_WORK_LIMIT = 300_000
_ROUND_MULTIPLIER = 1.1
_SQUARE_MULTIPLIER = 1 / 1.1


# ---------------------------------------------------------------------------------------
# Extra networks: <lora:name:0.8>
# ---------------------------------------------------------------------------------------

KIND_ALIASES: Mapping[str, str] = MappingProxyType({"lyco": "lora"})
"""webui registers `lyco` as an alias of the built-in Lora extension."""

_TAG_HEAD = re.compile(r"\w+:")


@dataclass(frozen=True)
class ExtraNetwork:
    """One `<kind:name:args...>` tag. `positional` are the arguments after the name that are
    not `key=value`; `named` the `key=value` ones (webui's ExtraNetworkParams, whose
    positional list also starts with the name)."""

    kind: str
    name: str
    positional: tuple[str, ...] = ()
    named: Mapping[str, str] = field(default_factory=dict, hash=False)
    source: str = ""
    """The tag as written, e.g. `<lora:foo:0.8>` (for messages)."""

    @property
    def te_weight(self) -> float:
        """LoRA text-encoder multiplier (default 1.0). Raises RequestError if not a number."""
        return lora_weights(self, field="prompt")[0]

    @property
    def unet_weight(self) -> float:
        """LoRA UNet multiplier (default: the text-encoder one)."""
        return lora_weights(self, field="prompt")[1]


def _parse_tag(kind: str, args: str, source: str) -> ExtraNetwork:
    items = args.split(":")
    positional: list[str] = []
    named: dict[str, str] = {}
    for item in items[1:]:
        # webui splits on "=" with maxsplit 2: "a=b=c" has three parts and stays positional.
        parts = item.split("=", 2)
        if len(parts) == 2:
            named[parts[0]] = parts[1]
        else:
            positional.append(item)
    return ExtraNetwork(
        kind=KIND_ALIASES.get(kind, kind),
        name=items[0],
        positional=tuple(positional),
        named=MappingProxyType(named),
        source=source,
    )


# webui's "Comments" script (modules/processing_scripts/comments.py, option
# enable_prompt_comments, default on): a line that starts with `#` goes with its line break, then
# `#` to the end of any line becomes a line break. Two passes, in this order, as webui runs them.
_WHOLE_LINE_COMMENT = re.compile(r"(?:^|\n)#[^\n]*(?:\n|$)")
_LINE_END_COMMENT = re.compile(r"#[^\n]*(?:\n|$)")


def strip_comments(text: str) -> str:
    """The prompt without its `#` comments, exactly as webui strips them (before extra-network
    tags are read, so a LoRA tag inside a comment is not applied)."""
    return _LINE_END_COMMENT.sub("\n", _WHOLE_LINE_COMMENT.sub("\n", text))


def extract_extra_networks(prompt: str) -> tuple[str, list[ExtraNetwork]]:
    """Remove every `<kind:args>` tag (webui's regex `<(\\w+):([^>]+)>`, any kind, known or
    not) and return the remaining text and the tags in order. Arguments are split on ":";
    `key=value` arguments are named. `lyco` is reported as `lora`. Linear time (a plain
    `re.sub` with that regex is quadratic on text like `<a:<a:<a:...` with no `>`)."""
    tags: list[ExtraNetwork] = []
    pieces: list[str] = []
    kept_from = 0
    search_from = 0
    next_gt = -1  # position of the next ">" at or after the current "<", -1: not known yet
    while True:
        lt = prompt.find("<", search_from)
        if lt < 0:
            break
        head = _TAG_HEAD.match(prompt, lt + 1)
        if head is None:
            search_from = lt + 1
            continue
        args_start = head.end()
        if next_gt < args_start:
            next_gt = prompt.find(">", args_start)
            if next_gt < 0:
                break  # no ">" anywhere after: no later "<" can close either
        if next_gt == args_start:  # "<lora:>": [^>]+ needs one character
            search_from = lt + 1
            continue
        kind = prompt[lt + 1 : args_start - 1]
        tags.append(_parse_tag(kind, prompt[args_start:next_gt], prompt[lt : next_gt + 1]))
        pieces.append(prompt[kept_from:lt])
        kept_from = search_from = next_gt + 1
    pieces.append(prompt[kept_from:])
    return "".join(pieces), tags


def _tag_number(tag: ExtraNetwork, text: str, what: str, field_name: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        raise RequestError.single(
            field_name,
            tag.source or f"<{tag.kind}:{tag.name}>",
            f"the {what} weight {text!r} is not a number; write finite numbers, e.g. "
            f"<{tag.kind}:{tag.name}:0.8> or <{tag.kind}:{tag.name}:te=0.5:unet=1>",
        )
    return value


def lora_weights(tag: ExtraNetwork, *, field: str) -> tuple[float, float]:
    """(text-encoder, UNet) multipliers of a LoRA tag, as webui's extra_networks_lora reads
    them: te = 1st argument or `te=` (default 1.0); unet = 2nd argument or `unet=`
    (default: te). A 3rd argument / `dyn=` (dynamic rank) is not read here. A value that is
    not a finite number raises RequestError naming `field` and the tag."""
    te_text = tag.named.get("te", tag.positional[0] if tag.positional else None)
    te = 1.0 if te_text is None else _tag_number(tag, te_text, "te", field)
    unet_text = tag.named.get("unet", tag.positional[1] if len(tag.positional) > 1 else None)
    unet = te if unet_text is None else _tag_number(tag, unet_text, "unet", field)
    return te, unet


# ---------------------------------------------------------------------------------------
# Attention: (a:1.2) [b] \( BREAK
# ---------------------------------------------------------------------------------------

# webui's re_attention, except that the weight must be a number float() accepts.
_ATTENTION = re.compile(
    r"""
\\\(|
\\\)|
\\\[|
\\]|
\\\\|
\\|
\(|
\[|
:\s*([+-]?(?:\d+(?:\.\d*)?|\.\d+))\s*\)|
\)|
]|
[^\\()\[\]:]+|
:
""",
    re.X,
)
_BREAK_WORD = re.compile(r"\bBREAK\b")


def split_break(text: str) -> list[str]:
    """`re.split(r"\\s*\\bBREAK\\b\\s*", text)` (webui's re_break) in linear time: that regex
    backtracks quadratically over a long run of spaces with no BREAK."""
    if "BREAK" not in text:
        return [text]
    parts: list[str] = []
    kept_from = 0
    for match in _BREAK_WORD.finditer(text):
        start, end = match.start(), match.end()
        if start < kept_from:
            continue
        while start > kept_from and text[start - 1].isspace():
            start -= 1
        while end < len(text) and text[end].isspace():
            end += 1
        parts.append(text[kept_from:start])
        kept_from = end
    parts.append(text[kept_from:])
    return parts


def _clamp(value: float) -> float:
    return max(-MAX_WEIGHT, min(MAX_WEIGHT, value))


@dataclass(frozen=True)
class _Event:
    """Multiply entries [start, end) by multiplier (one closing bracket)."""

    start: int
    end: int
    multiplier: float


def _attention_entries(text: str) -> tuple[list[str], list[float], list[_Event]]:
    """Entries (text, base weight ±1) and the bracket events, in webui's order."""
    texts: list[str] = []
    bases: list[float] = []
    events: list[_Event] = []
    round_open: list[int] = []
    square_open: list[int] = []
    for match in _ATTENTION.finditer(text):
        token = match.group(0)
        weight = match.group(1)
        if token.startswith("\\"):
            texts.append(token[1:])
            bases.append(1.0)
        elif token == "(":
            round_open.append(len(texts))
        elif token == "[":
            square_open.append(len(texts))
        elif weight is not None and round_open:
            events.append(_Event(round_open.pop(), len(texts), float(weight)))
        elif token == ")" and round_open:
            events.append(_Event(round_open.pop(), len(texts), _ROUND_MULTIPLIER))
        elif token == "]" and square_open:
            events.append(_Event(square_open.pop(), len(texts), _SQUARE_MULTIPLIER))
        else:
            for index, part in enumerate(split_break(token)):
                if index:
                    texts.append(BREAK[0])
                    bases.append(BREAK[1])
                texts.append(part)
                bases.append(1.0)
    end = len(texts)
    events += [_Event(start, end, _ROUND_MULTIPLIER) for start in round_open]
    events += [_Event(start, end, _SQUARE_MULTIPLIER) for start in square_open]
    return texts, bases, events


def _exact_weights(bases: list[float], events: list[_Event]) -> list[float]:
    """webui's multiply_range, event by event (same float results)."""
    weights = list(bases)
    for event in events:
        m = event.multiplier
        for index in range(event.start, event.end):
            weights[index] *= m
    return weights


def _log_weights(bases: list[float], events: list[_Event]) -> list[float]:
    """The same products in linear time: every event covers [start, end), so difference
    arrays of log|m|, of zero factors and of negative factors give each entry's product."""
    size = len(bases) + 1
    logs = [0.0] * size
    zeros = [0] * size
    negatives = [0] * size
    cap = math.log(MAX_WEIGHT) + 1.0
    for event in events:
        m = event.multiplier
        if m == 0:
            zeros[event.start] += 1
            zeros[event.end] -= 1
            continue
        if m < 0:
            negatives[event.start] += 1
            negatives[event.end] -= 1
        log_m = math.log(min(abs(m), 1e300))  # 1e300: a 400-digit weight is inf
        logs[event.start] += log_m
        logs[event.end] -= log_m
    weights: list[float] = []
    log_sum = 0.0
    zero_count = negative_count = 0
    for index, base in enumerate(bases):
        log_sum += logs[index]
        zero_count += zeros[index]
        negative_count += negatives[index]
        if zero_count:
            weights.append(0.0)
            continue
        magnitude = math.exp(min(log_sum, cap))
        weights.append(-base * magnitude if negative_count % 2 else base * magnitude)
    return weights


def _merge_runs(entries: list[tuple[str, float]]) -> list[tuple[str, float]]:
    """Join neighbours of equal weight (webui's merge, in linear time)."""
    merged: list[tuple[str, float]] = []
    run: list[str] = []
    run_weight = 0.0
    for text, weight in entries:
        if run and weight == run_weight:
            run.append(text)
            continue
        if run:
            merged.append(("".join(run), run_weight))
        run, run_weight = [text], weight
    if run:
        merged.append(("".join(run), run_weight))
    return merged


def parse_prompt_attention(text: str) -> list[tuple[str, float]]:
    """webui's attention parser: `(a)` ×1.1, `[a]` ÷1.1, `(a:1.3)` ×1.3, nesting
    multiplies, escapes, BREAK as its own `("BREAK", -1.0)` entry, neighbours of equal
    weight merged. Examples (webui's doctests):

    >>> parse_prompt_attention("an (important) word")
    [('an ', 1.0), ('important', 1.1), (' word', 1.0)]
    >>> parse_prompt_attention("(unnecessary)(parens)")
    [('unnecessaryparens', 1.1)]

    Weights are clamped to [-MAX_WEIGHT, MAX_WEIGHT]; see the module doc for odd input."""
    texts, bases, events = _attention_entries(text)
    work = sum(event.end - event.start for event in events)
    weights: list[float] | None = None
    if work <= _EXACT_WORK_LIMIT:
        weights = _exact_weights(bases, events)
        if not all(math.isfinite(w) for w in weights):
            weights = None  # overflowed (e.g. 1.1**8000): the log form stays finite
    if weights is None:
        weights = _log_weights(bases, events)
    entries = list(zip(texts, weights, strict=True)) or [("", 1.0)]
    merged = _merge_runs(entries)
    if all(-MAX_WEIGHT <= w <= MAX_WEIGHT for _, w in merged):
        return merged
    return _merge_runs([(t, _clamp(w)) for t, w in merged])


# ---------------------------------------------------------------------------------------
# AND: "a cat :1.2 AND a dog"
# ---------------------------------------------------------------------------------------

_AND = re.compile(r"\bAND\b")
_AND_WEIGHT = re.compile(r"[-+]?(?:\d+\.?|\d*\.\d+)")


def _split_weight(part: str) -> tuple[str, float]:
    """webui's re_weight `^((?:\\s|.)*?)(?:\\s*:\\s*(NUM))?\\s*$` without its quadratic
    backtracking: strip trailing space; a last `:NUM` is the weight."""
    stripped = part.rstrip()
    colon = stripped.rfind(":")
    if colon >= 0:
        number = stripped[colon + 1 :].lstrip()
        if _AND_WEIGHT.fullmatch(number):
            weight = float(number)  # 400 digits give inf, which _clamp bounds
            return stripped[:colon].rstrip(), _clamp(weight)
    return stripped, 1.0


def split_and(prompt: str) -> list[tuple[str, float]]:
    """Composable-diffusion parts of a positive prompt: `a :1.2 AND b` ->
    [("a", 1.2), (" b", 1.0)]. The default weight is 1.0."""
    return [_split_weight(part) for part in _AND.split(prompt)]


# ---------------------------------------------------------------------------------------
# Prompt editing and alternation: [from:to:when] [a|b]
# ---------------------------------------------------------------------------------------

# lark's common.SIGNED_NUMBER (ASCII digits), with WHITESPACE? on each side.
_SCHEDULE_NUMBER = re.compile(
    r"\s*([+-]?(?:[0-9]+[eE][+-]?[0-9]+|(?:[0-9]+\.[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?"
    r"|[0-9]+))\s*"
)


@dataclass(frozen=True)
class _Node:
    """A valid `[...]` that changes the text: scheduled (`number` set) or alternate."""

    start: int  # index of "["
    end: int  # index after "]"
    options: tuple[tuple[int, int], ...]
    """Spans of the texts: scheduled (before, after) with before (-1, -1) when absent;
    alternate: one per option."""
    number: str | None = None


@dataclass
class _Frame:
    bracket: str
    start: int
    colons: list[int] = field(default_factory=list)
    pipes: list[int] = field(default_factory=list)


class _Unschedulable(Exception):
    """webui's lark grammar rejects the prompt: it is used as written for every step."""


def _close_frame(frame: _Frame, text: str, end: int) -> _Node | bool:
    """The node for a bracket closed at `end` ("]" or ")"): a _Node, True (valid emphasis,
    text unchanged) or False (not valid: the brackets are literal text)."""
    if frame.bracket == "(":
        return len(frame.colons) <= 1
    inner = frame.start + 1
    if frame.pipes:
        if frame.colons:
            return False
        cuts = [inner - 1, *frame.pipes, end]
        return _Node(frame.start, end + 1, tuple((a + 1, b) for a, b in pairwise(cuts)))
    if not frame.colons:
        return True
    if len(frame.colons) > 2:
        return False
    last = frame.colons[-1]
    number = _SCHEDULE_NUMBER.fullmatch(text, last + 1, end)
    if number is None:
        return False
    if len(frame.colons) == 2:
        first = frame.colons[0]
        options = ((inner, first), (first + 1, last))
    else:
        options = ((-1, -1), (inner, last))
    return _Node(frame.start, end + 1, options, number.group(1))


def _schedule_nodes(text: str) -> list[_Node]:
    """Every valid scheduled/alternate bracket, by position. One pass with an explicit
    stack; raises _Unschedulable where webui's parser fails."""
    nodes: list[_Node] = []
    stack: list[_Frame] = []

    def drop_open_frames() -> None:
        # A stray bracket or colon inside open brackets makes every one of them literal.
        if any(frame.pipes for frame in stack):
            raise _Unschedulable
        stack.clear()

    closer_of = {")": "(", "]": "["}
    index, size = 0, len(text)
    while index < size:
        char = text[index]
        if char == "\\":
            if index + 1 >= size or text[index + 1] == "\n":
                raise _Unschedulable  # lark's plain is ([^...]|\\.)+ and "." is not "\n"
            index += 2
            continue
        if char in "([":
            stack.append(_Frame(char, index))
        elif char in ")]":
            if stack and stack[-1].bracket == closer_of[char]:
                frame = stack.pop()
                result = _close_frame(frame, text, index)
                if result is False:
                    stack.append(frame)
                    drop_open_frames()
                elif isinstance(result, _Node):
                    nodes.append(result)
            elif stack:
                drop_open_frames()
        elif char == ":":
            if stack:
                stack[-1].colons.append(index)
        elif char == "|":
            if not stack or stack[-1].bracket == "(":
                raise _Unschedulable
            stack[-1].pipes.append(index)
        index += 1
    drop_open_frames()
    nodes.sort(key=lambda node: node.start)
    return nodes


def _when(number: str, steps: int, base_steps: int, hires: bool, old: bool) -> int:
    """webui's step for a `when`: min(steps, int(v)), without int()'s overflow on 1e309."""
    value = float(number)
    if old:
        value = value * steps if value < 1 else value
    elif "." in number:
        value = (value - (1.0 if hires else 0.0)) * steps
    else:
        value = value - (base_steps if hires else 0)
    if math.isnan(value) or value <= -1e15:
        return -(10**15)
    if value >= steps:
        return steps
    return int(value)


def _render(text: str, nodes: list[_Node], choices: list[tuple[int, int] | None]) -> str:
    """The text with each node replaced by its chosen option (None: nothing)."""
    out: list[str] = []
    position = 0
    pending: list[tuple[int, int]] = []  # (end of kept option, end of its node)
    for node, choice in zip(nodes, choices, strict=True):
        while pending and node.start >= pending[-1][0]:
            kept_end, node_end = pending.pop()
            out.append(text[position:kept_end])
            position = node_end
        if node.start < position:
            continue  # inside text that an enclosing node dropped
        out.append(text[position : node.start])
        if choice is None:
            position = node.end
        else:
            position = choice[0]
            pending.append((choice[1], node.end))
    while pending:
        kept_end, node_end = pending.pop()
        out.append(text[position:kept_end])
        position = node_end
    out.append(text[position:])
    return "".join(out)


def _schedule(
    prompt: str, base_steps: int, hires_steps: int | None, old: bool
) -> list[tuple[int, str]]:
    hires = hires_steps is not None and not old
    steps = hires_steps if hires and hires_steps is not None else base_steps
    try:
        nodes = _schedule_nodes(prompt)
    except _Unschedulable:
        return [(steps, prompt)]
    whens = [
        _when(node.number, steps, base_steps, hires, old) if node.number is not None else 0
        for node in nodes
    ]
    boundaries = {steps}
    boundaries.update(w for node, w in zip(nodes, whens, strict=True) if node.number and w >= 1)
    if any(node.number is None for node in nodes):
        boundaries.update(range(1, steps + 1))
    result: list[tuple[int, str]] = []
    for step in sorted(boundaries):
        choices: list[tuple[int, int] | None] = []
        for node, when in zip(nodes, whens, strict=True):
            if node.number is None:
                choices.append(node.options[(step - 1) % len(node.options)])
            elif step <= when:
                before = node.options[0]
                choices.append(None if before[0] < 0 else before)
            else:
                choices.append(node.options[1])
        result.append((step, _render(prompt, nodes, choices)))
    return result


def get_learned_conditioning_prompt_schedules(
    prompts: list[str],
    base_steps: int,
    hires_steps: int | None = None,
    use_old_scheduling: bool = False,
) -> list[list[tuple[int, str]]]:
    """For each prompt, webui's schedule: a list of (last step, text), ascending, the last
    ending at the step count (`hires_steps` for the hires pass with the new timelines).

    >>> get_learned_conditioning_prompt_schedules(["a [b:c:0.5] d"], 10)
    [[(5, 'a b d'), (10, 'a c d')]]
    >>> get_learned_conditioning_prompt_schedules(["[fe|]male"], 3)
    [[(1, 'female'), (2, 'male'), (3, 'female')]]
    """
    cache: dict[str, list[tuple[int, str]]] = {}
    out: list[list[tuple[int, str]]] = []
    for prompt in prompts:
        if prompt not in cache:
            cache[prompt] = _schedule(prompt, base_steps, hires_steps, use_old_scheduling)
        out.append(list(cache[prompt]))
    return out


# ---------------------------------------------------------------------------------------
# Tokens: 75-token chunks with multipliers
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Chunk:
    """One 77-token window: BOS + 75 prompt/padding tokens + EOS, a multiplier per token."""

    tokens: list[int]
    multipliers: list[float]
    token_count: int
    """Prompt tokens in the chunk (not BOS, EOS or padding)."""
    embeddings: tuple[tuple[int, str], ...] = ()
    """(index in `tokens`, name) where an embedding's vectors start (webui's `fixes`)."""


@dataclass(frozen=True)
class EmbeddingMatch:
    """What an embedding finder reports at a token position."""

    name: str
    consumed: int
    """Prompt tokens the match covers (at least 1)."""
    token_ids: tuple[int, ...]
    """Ids placed in the chunk, one per vector (kept in one chunk, as webui does)."""


EmbeddingFinder = Callable[[Sequence[int], int], EmbeddingMatch | None]
"""(the fragment's token ids, position) -> a textual-inversion match starting there."""


def _comma_id(tokenizer: Any) -> int | None:
    token_id = tokenizer.convert_tokens_to_ids(",</w>")
    # CLIP's unk is EOS: an unknown token must not turn every EOS into a comma.
    if token_id is None or token_id == tokenizer.unk_token_id:
        return None
    return int(token_id)


class _ChunkBuilder:
    """webui's TextConditionalModel.tokenize_line state: the chunk being filled."""

    def __init__(self, bos: int, eos: int, pad: int | None) -> None:
        self.bos, self.eos, self.pad = bos, eos, pad
        self.chunks: list[Chunk] = []
        self.tokens: list[int] = []
        self.multipliers: list[float] = []
        self.embeddings: list[tuple[int, str]] = []
        self.last_comma = -1

    def finish(self) -> None:
        count = len(self.tokens)
        fill = CHUNK_LENGTH - count
        tokens = [self.bos, *self.tokens, *([self.eos] * fill), self.eos]
        multipliers = [1.0, *self.multipliers, *([1.0] * fill), 1.0]
        if self.pad is not None and self.pad != self.eos:
            # SD2 / SDXL's OpenCLIP-G: everything after the first EOS is the pad id
            # (webui's process_tokens, which uses the first EOS even inside the prompt).
            first = tokens.index(self.eos)
            tokens[first + 1 :] = [self.pad] * (len(tokens) - first - 1)
        embeddings = tuple((offset + 1, name) for offset, name in self.embeddings)
        self.chunks.append(Chunk(tokens, multipliers, count, embeddings))
        self.tokens, self.multipliers, self.embeddings = [], [], []
        self.last_comma = -1

    def back_off_to_comma(self) -> None:
        """Move the tokens after the last comma into a new chunk."""
        cut = self.last_comma + 1
        tokens, multipliers = self.tokens[cut:], self.multipliers[cut:]
        # webui leaves moved embeddings' fixes behind (a bug); we move them with the tokens.
        moved = [(offset - cut, name) for offset, name in self.embeddings if offset >= cut]
        self.embeddings = [(offset, name) for offset, name in self.embeddings if offset < cut]
        self.tokens, self.multipliers = self.tokens[:cut], self.multipliers[:cut]
        self.finish()
        self.tokens, self.multipliers, self.embeddings = tokens, multipliers, moved


def tokenize_chunks(
    tokenizer: Any,
    text: str,
    *,
    emphasis: str = "Original",
    comma_backtrack: int = 20,
    pad_token_id: int | None = None,
    find_embedding: EmbeddingFinder | None = None,
) -> list[Chunk]:
    """webui's tokenize_line: the prompt as 77-token chunks.

    - emphasis "Original"/"No norm": multipliers are the attention weights; "Ignore": parsed
      (BREAK works) but every multiplier is 1.0; "None": not parsed, brackets and BREAK are
      literal. Other values raise RequestError.
    - Each weighted fragment is tokenized alone, without special tokens or truncation.
    - 75 prompt tokens a chunk; BREAK ends the current chunk (padded).
    - Comma back-off: when a chunk is full and the last comma in it is within
      `comma_backtrack` tokens of its end (0 turns this off), the tokens after that comma
      move to the next chunk.
    - Padding: EOS. With `pad_token_id` (SD2, SDXL's second encoder: 0) every token after
      the first EOS becomes `pad_token_id`, as webui does before encoding; multipliers are
      1.0 there and at BOS/EOS.
    - `find_embedding` (optional) reports textual-inversion matches; a match's ids never
      straddle two chunks (webui starts a new chunk instead).
    - An empty prompt gives one chunk (BOS + 76 EOS/padding)."""
    if emphasis not in EMPHASIS_MODES:
        raise RequestError.single(
            "override_settings.emphasis", emphasis, f"allowed: {show_choices(EMPHASIS_MODES)}"
        )
    parsed = parse_prompt_attention(text) if emphasis != "None" else [(text, 1.0)]
    ignore = emphasis == "Ignore"
    # Each distinct fragment is tokenized once (hostile prompts repeat a few fragments).
    distinct = list(dict.fromkeys(fragment for fragment, _ in parsed))
    encoded = tokenizer(distinct, add_special_tokens=False, truncation=False, verbose=False)
    ids_of = dict(zip(distinct, encoded["input_ids"], strict=True))
    comma = _comma_id(tokenizer)
    build = _ChunkBuilder(int(tokenizer.bos_token_id), int(tokenizer.eos_token_id), pad_token_id)
    for fragment, weight in parsed:
        ids = ids_of[fragment]
        if (fragment, weight) == BREAK:
            build.finish()
            continue
        multiplier = 1.0 if ignore else weight
        position = 0
        while position < len(ids):
            token = ids[position]
            if token == comma:
                build.last_comma = len(build.tokens)
            elif (
                comma_backtrack != 0
                and len(build.tokens) == CHUNK_LENGTH
                and build.last_comma != -1
                and len(build.tokens) - build.last_comma <= comma_backtrack
            ):
                build.back_off_to_comma()
            if len(build.tokens) == CHUNK_LENGTH:
                build.finish()
            match = find_embedding(ids, position) if find_embedding is not None else None
            if match is None:
                build.tokens.append(token)
                build.multipliers.append(multiplier)
                position += 1
                continue
            vectors = list(match.token_ids)
            if not 1 <= len(vectors) <= CHUNK_LENGTH:
                raise RequestError.single(
                    "prompt",
                    match.name,
                    f"an embedding must have 1 to {CHUNK_LENGTH} vectors; it has {len(vectors)}",
                )
            if len(build.tokens) + len(vectors) > CHUNK_LENGTH:
                build.finish()
            build.embeddings.append((len(build.tokens), match.name))
            build.tokens += vectors
            build.multipliers += [multiplier] * len(vectors)
            position += max(1, match.consumed)
    if build.tokens or not build.chunks:
        build.finish()
    return build.chunks
