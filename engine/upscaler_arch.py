"""What the upscaler architecture modules share (engine/upscaler_models.py, upscaler_swinir.py,
upscaler_hat.py, upscaler_dat.py): the record of what a file's keys say, the reason a file is not
run, and the small helpers their key readers use."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any


def ceil_to(size: int, multiple: int) -> int:
    """`size` rounded up to a multiple of `multiple` (window padding)."""
    return -(-size // multiple) * multiple


def count_indexed(sd: Mapping[str, Any], pattern: str) -> int:
    """1 + the highest index N of keys matching `pattern` (with (\\d+) for N), or 0."""
    found = [int(m[1]) for k in sd if (m := re.match(pattern, k))]
    return 1 + max(found) if found else 0


class Unsupported(Exception):
    """A file this server does not run; the message is the reason shown in the log."""


@dataclass(frozen=True)
class Architecture:
    """What the keys say: the kind, the native scale and a short description for the log."""

    kind: str  # "ESRGAN", "SRVGGNetCompact" or "SwinIR"
    scale: int
    describe: str
