"""The device working set: which checkpoints' weights sit on the device, within a byte budget.

Every checkpoint is loaded and verified at setup. When all of them fit the budget they all stay
on the device and nothing ever moves (the fast path). Otherwise the ones that do not fit wait in
host memory, and a request first moves the checkpoints it uses (its model, hires checkpoint,
refiner) onto the device, moving the least recently used others back to the host. A module
shared by several checkpoints (an identical VAE) is counted once and stays on the device while
any resident checkpoint uses it. LoRA adapters live inside the modules and move with them.

Not (yet) under the budget: VAE files, ControlNets and upscaler models (each loads on first
use and stays), and activations (the budget's default leaves room for them).

`SD_DEVICE_MEMORY`: bytes (`25769803776`, `24GiB`, `24GB`, `512MiB`), or a fraction of the
device memory free at setup (`0.8`). Unset: on CUDA 75 % of the free memory, on the CPU no
budget (the host is the device).
"""

from __future__ import annotations

import logging
import os
import re
import time
from collections import OrderedDict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from .errors import ModelLoadError
from .oom import OutOfMemory, reported

log = logging.getLogger(__name__)

BUDGET_ENV = "SD_DEVICE_MEMORY"
DEFAULT_CUDA_FRACTION = 0.75  # of free VRAM at setup: the rest for activations and caches
HOST = "cpu"

_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12}
_UNITS.update({"kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40})
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*$")


def parse_budget(text: str, free_bytes: int | None) -> int:
    """`SD_DEVICE_MEMORY` in bytes: a size with an optional unit, or a fraction (0 < f <= 1)
    of `free_bytes`. A bad value raises ModelLoadError naming the variable and the forms."""
    match = _SIZE.match(text)
    forms = "bytes (25769803776), a size (24GiB, 24GB, 512MiB) or a fraction of free memory (0.8)"
    if match is None or match.group(2).lower() not in _UNITS:
        raise ModelLoadError(f"{BUDGET_ENV}={text!r} is not a memory budget; use {forms}")
    number, unit = float(match.group(1)), match.group(2).lower()
    if "." in match.group(1) and not unit:
        if not 0 < number <= 1:
            raise ModelLoadError(f"{BUDGET_ENV}={text!r}: a fraction must be in (0, 1]")
        if free_bytes is None:
            raise ModelLoadError(
                f"{BUDGET_ENV}={text!r}: a fraction needs a device that reports its free memory "
                "(CUDA); give bytes instead"
            )
        return int(number * free_bytes)
    value = int(number * _UNITS[unit])
    if value <= 0:
        raise ModelLoadError(f"{BUDGET_ENV}={text!r}: the budget must be positive")
    return value


def budget_from_env(device: str, environ: Mapping[str, str] | None = None) -> int | None:
    """The device budget in bytes, or None for no budget (the CPU without SD_DEVICE_MEMORY)."""
    env = os.environ if environ is None else environ
    free = torch.cuda.mem_get_info()[0] if device == "cuda" else None
    text = (env.get(BUDGET_ENV) or "").strip()
    if text:
        return parse_budget(text, free)
    return None if free is None else int(DEFAULT_CUDA_FRACTION * free)


def weight_bytes(*pipes: Any) -> int:
    """Bytes of the parameters and buffers of pipelines' modules (shared ones once)."""
    seen: set[int] = set()
    total = 0
    for pipe in pipes:
        for component in getattr(pipe, "components", {}).values():
            if not isinstance(component, torch.nn.Module):
                continue
            for tensor in [*component.parameters(), *component.buffers()]:
                if id(tensor) not in seen:
                    seen.add(id(tensor))
                    total += tensor.numel() * tensor.element_size()
    return total


def gib(count: int) -> str:
    return f"{count / 2**30:.2f} GiB"


@dataclass
class WorkingSet:
    """Which checkpoints (by title) are on `device`, least recently used first."""

    device: str
    budget: int | None  # None: everything stays where it loaded, nothing ever moves
    host: str = HOST  # where checkpoints off the device wait
    pipes: dict[str, Any] = field(default_factory=dict)  # title -> pipeline, every checkpoint
    resident: OrderedDict[str, None] = field(default_factory=OrderedDict)
    # (title, "to device" | "to host", seconds) of every move, for the log and benchmarks.
    moves: list[tuple[str, str, float]] = field(default_factory=list)
    # Bytes of a set of checkpoints, within one acquire (its eviction loop asks again for the
    # same sets; walking every tensor is milliseconds for real models). Cleared per request:
    # LoRA adapters loaded into a model since then add to its bytes.
    _sizes: dict[frozenset[str], int] = field(default_factory=dict, repr=False)

    # ---- setup

    def before_load(self, estimate: int) -> None:
        """Make room for a checkpoint about to load onto the device (`estimate`: its bytes)."""
        if self.budget is not None:
            self._evict_until(estimate, keep=())

    def admit(self, title: str, pipe: Any) -> None:
        """A checkpoint just loaded onto the device: resident if it fits, else to the host."""
        self.pipes[title] = pipe
        self.resident[title] = None
        if self.budget is None:
            return
        if self.resident_bytes() > self.budget:
            del self.resident[title]
            self._move(title, to_device=False)

    def forget(self, title: str) -> None:
        """A checkpoint no longer served (refresh): dropped from the accounting."""
        self.pipes.pop(title, None)
        self.resident.pop(title, None)
        self._sizes.clear()  # a title may come back with other weights

    # ---- requests

    def acquire(self, titles: Sequence[str]) -> None:
        """Put every checkpoint in `titles` on the device (one request's models), moving the
        least recently used others to the host as needed. Raises OutOfMemory naming the
        checkpoints and the budget when they cannot all fit at once."""
        wanted = list(dict.fromkeys(titles))
        if self.budget is None:
            return
        self._sizes.clear()
        need = self.resident_bytes(wanted)
        if need > self.budget:
            raise OutOfMemory(
                f"Out of memory: {', '.join(wanted)} need {gib(need)} of weights on the device "
                f"at once; {BUDGET_ENV} allows {gib(self.budget)}. Raise {BUDGET_ENV}, use a "
                "larger GPU, or drop the hires/refiner checkpoint from the request"
            )
        missing = [t for t in wanted if t not in self.resident]
        # Also when nothing is missing: the resident set may exceed a lowered budget.
        self._evict_until(0, keep=wanted, incoming=missing)
        if missing:
            for title in missing:
                self._move(title, to_device=True)
                self.resident[title] = None
        for title in wanted:
            self.resident.move_to_end(title)

    def resident_bytes(self, titles: Iterable[str] | None = None) -> int:
        """Bytes on the device of `titles` (default: every resident checkpoint), shared
        modules once."""
        key = frozenset(self.resident if titles is None else titles)
        if key not in self._sizes:
            if len(self._sizes) > 256:
                self._sizes.clear()
            self._sizes[key] = weight_bytes(*(self.pipes[t] for t in key))
        return self._sizes[key]

    # ---- moving

    def _evict_until(self, extra: int, keep: Sequence[str], incoming: Sequence[str] = ()) -> None:
        """Move least recently used checkpoints (not in `keep`) to the host until the
        `incoming` checkpoints (modules already on the device counted once) and `extra` more
        bytes fit the budget."""
        assert self.budget is not None
        for title in list(self.resident):  # least recently used first
            if self.resident_bytes([*self.resident, *incoming]) + extra <= self.budget:
                return
            if title not in keep:
                del self.resident[title]
                self._move(title, to_device=False)

    def _move(self, title: str, to_device: bool) -> None:
        """Move one checkpoint's modules; to the host, a module a resident checkpoint shares
        stays on the device."""
        started = time.perf_counter()
        target = self.device if to_device else self.host
        shared = {id(m) for other in self.resident for m in _modules(self.pipes[other])}
        with reported(f"moving {title} to {target}", f"lower {BUDGET_ENV} or use a larger GPU"):
            for module in _modules(self.pipes[title]):
                if not to_device and id(module) in shared:
                    continue
                module.to(target)
        seconds = time.perf_counter() - started
        direction = "to device" if to_device else "to host"
        self.moves.append((title, direction, seconds))
        log.info("working set: %s %s in %.2f s", title, direction, seconds)


def _modules(pipe: Any) -> list[torch.nn.Module]:
    components = getattr(pipe, "components", {})
    return [c for c in components.values() if isinstance(c, torch.nn.Module)]
