"""One exception tree for the engine.

Every user-facing message names the field, the value that was sent and what is
allowed, so that a client can fix its payload without reading our code.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

_MAX_CHOICES_SHOWN = 40
_MAX_VALUE_CHARS = 120


def show_value(value: Any) -> str:
    """Short, safe repr of a user value for an error message."""
    text = repr(value)
    if len(text) > _MAX_VALUE_CHARS:
        text = text[: _MAX_VALUE_CHARS - 3] + "..."
    return text


def show_choices(choices: Iterable[Any]) -> str:
    """`'a', 'b', 'c'` (cut after a few dozen, with a count of the rest)."""
    items = [repr(c) for c in choices]
    if len(items) > _MAX_CHOICES_SHOWN:
        rest = len(items) - _MAX_CHOICES_SHOWN
        items = [*items[:_MAX_CHOICES_SHOWN], f"... ({rest} more)"]
    return ", ".join(items) if items else "(none available)"


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a request: where, what was sent, what is allowed."""

    field: str
    value: Any
    allowed: str

    def __str__(self) -> str:
        return f"{self.field}: got {show_value(self.value)}; {self.allowed}"


class EngineError(Exception):
    """Root of every error the engine raises on purpose."""


class RequestError(EngineError):
    """The request cannot be served as sent. Carries every problem found."""

    def __init__(self, problems: Sequence[Problem]):
        self.problems = list(problems)
        lines = [str(p) for p in self.problems]
        if len(lines) == 1:
            message = f"Invalid request: {lines[0]}"
        else:
            message = f"Invalid request ({len(lines)} problems): " + "; ".join(lines)
        super().__init__(message)

    @classmethod
    def single(cls, field: str, value: Any, allowed: str) -> RequestError:
        return cls([Problem(field, value, allowed)])


class UnknownName(RequestError):
    """A name (checkpoint, sampler, LoRA, ...) that is not in the catalog."""

    def __init__(self, field: str, value: Any, choices: Iterable[Any], kind: str = "name"):
        self.choices = list(choices)
        super().__init__(
            [Problem(field, value, f"unknown {kind}; available: {show_choices(self.choices)}")]
        )


class ModelLoadError(EngineError):
    """A model file on disk could not be loaded (setup fails with this)."""


class GenerationError(EngineError):
    """Generation ran but could not produce a valid result."""


# What a failed prediction's `error` starts with when the message has no "label: detail" shape.
_PUBLIC_LABELS: tuple[tuple[type[EngineError], str], ...] = (
    (RequestError, "Invalid request"),
    (ModelLoadError, "Model could not be loaded"),
    (GenerationError, "Generation failed"),
    (EngineError, "Failed"),
)


def public_error(exc: EngineError) -> Exception:
    """`exc` re-dressed for Cog, whose error text is `<class qualname>: <str>` (coglet formats
    the Python exception that way): the message's head becomes the class name, so the text
    reads as the one sentence we wrote, with no Python class name in it. For example
    "Invalid request: steps: got 0; ..." comes out as exactly that."""
    message = str(exc)
    head, sep, tail = message.partition(": ")
    if not sep or len(head) > 80:
        label = next(text for kind, text in _PUBLIC_LABELS if isinstance(exc, kind))
        head, tail = label, message
    # A class named by the sentence's head: only its name and message are ever shown.
    return type(head, (Exception,), {"__module__": "builtins"})(tail)
