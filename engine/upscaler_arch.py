"""What the upscaler architecture modules share (engine/upscaler_models.py and
engine/upscaler_swinir.py): the record of what a file's keys say, and the reason a file is not
run."""

from __future__ import annotations

from dataclasses import dataclass


class Unsupported(Exception):
    """A file this server does not run; the message is the reason shown in the log."""


@dataclass(frozen=True)
class Architecture:
    """What the keys say: the kind, the native scale and a short description for the log."""

    kind: str  # "ESRGAN", "SRVGGNetCompact" or "SwinIR"
    scale: int
    describe: str
