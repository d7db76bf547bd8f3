"""Hand memory that a finished request freed back to the operating system.

A request allocates and frees hundreds of MB of host tensors (latents, decoded images,
conditioning, PNG buffers). glibc's allocator keeps freed blocks in its arenas for reuse, and
with several threads (torch's intra-op pool, Cog's worker) those arenas fragment, so a worker's
resident size ratchets up request after request although nothing is alive any more
(`scripts/bench_soak.py` measures it: see the README's Limits section). `malloc_trim(0)`
returns the free parts of every arena; it costs well under a millisecond when little is free.

Trimming alone still let a worker behind Cog's server step up by 10-20 MiB now and then
(measured through the real server: 927 -> 965 MiB over 800 mixed requests, flat only after
~350). Two allocator settings, applied at setup, remove that: at most two arenas (each thread
pool no longer gets its own fragmenting arena) and a fixed 4 MiB mmap threshold (glibc
otherwise raises the threshold after each large free, so later large tensors land in the
heap and leave holes). Measured the same way: 817 -> 821 MiB over 500 requests, and 110 MiB
less after setup (tests/test_http_soak.py asserts the plateau). An operator's own
MALLOC_ARENA_MAX / MALLOC_MMAP_THRESHOLD_ environment variables win.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
from collections.abc import Mapping
from functools import cache

log = logging.getLogger(__name__)

ENABLED = True
"""Off only for the benchmark's comparison run."""


# glibc's mallopt parameters (malloc.h) and the values set at setup.
M_MMAP_THRESHOLD = -3
M_ARENA_MAX = -8
ALLOCATOR_SETTINGS: dict[str, tuple[int, int]] = {
    "MALLOC_ARENA_MAX": (M_ARENA_MAX, 2),
    "MALLOC_MMAP_THRESHOLD_": (M_MMAP_THRESHOLD, 4 * 2**20),
}


@cache
def _libc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        return ctypes.CDLL(name)
    except OSError:
        return None


def configure_allocator(environ: Mapping[str, str] | None = None) -> dict[str, int]:
    """Apply ALLOCATOR_SETTINGS through mallopt where glibc has it, except those the
    environment already sets. Returns what was applied (for the setup log)."""
    env = os.environ if environ is None else environ
    libc = _libc()
    mallopt = getattr(libc, "mallopt", None) if libc is not None and ENABLED else None
    if mallopt is None:
        return {}
    applied = {}
    for var, (param, value) in ALLOCATOR_SETTINGS.items():
        if var in env:
            continue
        if mallopt(ctypes.c_int(param), ctypes.c_int(value)) == 1:
            applied[var] = value
    return applied


@cache
def _malloc_trim() -> ctypes._CFuncPtr | None:  # type: ignore[name-defined]
    libc = _libc()
    trim = getattr(libc, "malloc_trim", None)  # not glibc (musl, macOS): nothing to trim
    if trim is None:
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
