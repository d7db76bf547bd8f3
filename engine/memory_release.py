"""Hand memory that a finished request freed back to the operating system.

A request allocates and frees hundreds of MB of host tensors (latents, decoded images,
conditioning, PNG buffers). glibc's allocator keeps freed blocks in its arenas for reuse, and
with several threads (torch's intra-op pool, Cog's worker) those arenas fragment, so a worker's
resident size ratchets up request after request although nothing is alive any more
(`scripts/bench_soak.py` measures it: see the README's Limits section). `malloc_trim(0)`
returns the free parts of every arena; it costs well under a millisecond when little is free.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
from functools import cache

log = logging.getLogger(__name__)

ENABLED = True
"""Off only for the benchmark's comparison run."""


@cache
def _malloc_trim() -> ctypes._CFuncPtr | None:  # type: ignore[name-defined]
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        trim = ctypes.CDLL(name).malloc_trim
    except (OSError, AttributeError):  # not glibc (musl, macOS): nothing to trim
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return trim


def release_host_memory() -> bool:
    """Return freed heap pages to the OS; True where the C library supports it."""
    trim = _malloc_trim() if ENABLED else None
    if trim is None:
        return False
    trim(0)
    return True
