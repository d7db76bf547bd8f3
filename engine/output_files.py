"""A prediction's images as files, in a folder of its own; old folders are removed.

Cog uploads (or serves) the returned paths after `predict` returns, possibly while other
predictions run, so a folder is kept for `ttl_s` seconds and removed by a later write."""

from __future__ import annotations

import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from .images import EncodedImage

# Cog has delivered a folder's files long before this; one still being delivered is never
# this old.
OUTPUT_TTL_S = 600.0


class OutputFolders:
    def __init__(
        self, ttl_s: float = OUTPUT_TTL_S, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.ttl_s = ttl_s
        self.clock = clock
        self.folders: list[tuple[float, Path]] = []  # (created, folder), oldest first

    def write(self, images: Sequence[EncodedImage]) -> list[Path]:
        """`images` as 00000.<ext>, 00001.<ext>, ... in a new folder; expired folders go."""
        now = self.clock()
        while self.folders and now - self.folders[0][0] > self.ttl_s:
            shutil.rmtree(self.folders.pop(0)[1], ignore_errors=True)
        folder = Path(tempfile.mkdtemp(prefix="sd-out-"))
        self.folders.append((now, folder))
        files = []
        for index, image in enumerate(images):
            path = folder / f"{index:05d}.{image.extension}"
            path.write_bytes(image.data)
            files.append(path)
        return files
