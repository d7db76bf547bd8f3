"""Out of memory anywhere (setup, first-use loads, LoRA load, sampling, decode) as one clear
error: what was being loaded or run, the memory figures, and what to try. The failed
allocation's traceback is dropped and the allocator's cache emptied before the error is
raised, and every caller leaves its cache as it was, so the next request runs.

Loaders that turn any exception into "this file is broken" re-raise out-of-memory untouched
(`is_out_of_memory`): running out of memory is not the file's fault.
"""

from __future__ import annotations

import gc
from collections.abc import Iterator
from contextlib import contextmanager

import torch

from .errors import GenerationError


class OutOfMemory(GenerationError):
    """The device or the host ran out of memory; what was allocated for the step is freed."""


def is_out_of_memory(exc: BaseException) -> bool:
    if isinstance(exc, torch.OutOfMemoryError | MemoryError):
        return True
    # Some kernels (and older torch builds) raise a plain RuntimeError with CUDA's message.
    return isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()


def memory_figures() -> str:
    """Free and total memory where the models live (the GPU when there is one)."""
    if torch.cuda.is_available():
        free, total = torch.cuda.mem_get_info()
        held = torch.cuda.memory_allocated()
        return (
            f"GPU {free / 2**30:.1f} GiB free of {total / 2**30:.1f} GiB, "
            f"{held / 2**30:.1f} GiB held by this process"
        )
    try:
        with open("/proc/meminfo") as handle:
            fields = dict(line.split(":", 1) for line in handle)
        available = int(fields["MemAvailable"].split()[0]) * 1024
        total = int(fields["MemTotal"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return "host memory figures unavailable"
    return f"host {available / 2**30:.1f} GiB available of {total / 2**30:.1f} GiB"


def release() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


@contextmanager
def reported(what: str, hint: str) -> Iterator[None]:
    """Run the body; out of memory becomes OutOfMemory("Out of memory: <what> needed ...")."""
    try:
        yield
    except BaseException as exc:
        if not is_out_of_memory(exc):
            raise
    else:
        return
    # Outside the except block: the traceback (holding the failed activations) is gone.
    release()
    raise OutOfMemory(
        f"Out of memory: {what} needed more memory than is free ({memory_figures()}); {hint}"
    )
