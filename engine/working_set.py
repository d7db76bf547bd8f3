"""The device working set: every model on the device, within one byte budget.

One manager owns what sits on the device: the checkpoints, and the caches requests fill (VAE
files, ControlNets, upscaler models, LoRA adapters). Each is an *entry* (a kind and a name).

- Every checkpoint is loaded and verified at setup. When everything fits the budget, nothing
  ever moves (the fast path). Otherwise what does not fit waits in host memory, and a request
  first moves what it uses onto the device, moving the least recently used others off.
- Least recently used is one order across kinds: an idle ControlNet leaves before a checkpoint
  used since. Checkpoints, VAE files, ControlNets and upscalers leave to host memory (a later
  use copies them back, no file is read); a LoRA adapter is deleted (it lives inside its
  checkpoint's layers, so its bytes are part of the checkpoint's; its file is read again on
  its next use). Adapters move with their checkpoint.
- Every tensor is counted once, by its storage: a module several checkpoints share (an
  identical VAE) counts once and stays on the device while any resident entry uses it.
- A request holds a *lease* (`with working.lease():`) from its start to its end: whatever it
  uses is pinned and never evicted until the lease ends, so requests in flight at once never
  take each other's models away. A request whose entries cannot fit beside the pinned ones is
  refused with OutOfMemory naming them and the budget; nothing was moved.
- On CUDA, what leaves the device goes to pinned (page-locked) host memory while the pinned
  total stays under SD_PINNED_MEMORY: the copy back is then a direct DMA, about twice as fast
  as from pageable memory. Never on the CPU.

Not under the budget: activations (the budget's default leaves room for them).

`SD_DEVICE_MEMORY`: bytes (`25769803776`, `24GiB`, `24GB`, `512MiB`), or a fraction of the
device memory free at setup (`0.8`). Unset: on CUDA 75 % of the free memory, on the CPU no
budget (the host is the device; caches load on first use and stay, as without a manager).
`SD_PINNED_MEMORY`: the most host memory kept pinned (same forms; a fraction is of the host's
physical memory; `0` turns pinning off). Unset: half the host's physical memory.
"""

from __future__ import annotations

import contextvars
import logging
import os
import re
import threading
import time
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Any, Final

import torch

from .errors import ModelLoadError
from .oom import OutOfMemory, reported

log = logging.getLogger(__name__)

BUDGET_ENV = "SD_DEVICE_MEMORY"
PINNED_ENV = "SD_PINNED_MEMORY"
DEFAULT_CUDA_FRACTION = 0.75  # of free VRAM at setup: the rest for activations
DEFAULT_PINNED_FRACTION = 0.5  # of the host's physical memory: page-locked memory cannot swap
HOST = "cpu"

_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12}
_UNITS.update({"kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40})
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*$")


class DeviceBusy(OutOfMemory):
    """What a request needs does not fit beside what requests running now hold: it fits once
    they end (Engine.generate waits for that when other requests are in flight)."""


def parse_budget(
    text: str, free_bytes: int | None, *, name: str = BUDGET_ENV, allow_zero: bool = False
) -> int:
    """A memory size in bytes: a size with an optional unit, or a fraction (0 < f <= 1) of
    `free_bytes`. A bad value raises ModelLoadError naming the variable and the forms."""
    match = _SIZE.match(text)
    forms = "bytes (25769803776), a size (24GiB, 24GB, 512MiB) or a fraction of free memory (0.8)"
    if match is None or match.group(2).lower() not in _UNITS:
        raise ModelLoadError(f"{name}={text!r} is not a memory budget; use {forms}")
    number, unit = float(match.group(1)), match.group(2).lower()
    if "." in match.group(1) and not unit:
        if not 0 < number <= 1:
            raise ModelLoadError(f"{name}={text!r}: a fraction must be in (0, 1]")
        if free_bytes is None:
            raise ModelLoadError(
                f"{name}={text!r}: a fraction needs a device that reports its free memory "
                "(CUDA); give bytes instead"
            )
        return int(number * free_bytes)
    value = int(number * _UNITS[unit])
    if value < 0 or (value == 0 and not allow_zero):
        raise ModelLoadError(f"{name}={text!r}: the budget must be positive")
    return value


def budget_from_env(device: str, environ: Mapping[str, str] | None = None) -> int | None:
    """The device budget in bytes, or None for no budget (the CPU without SD_DEVICE_MEMORY)."""
    env = os.environ if environ is None else environ
    free = torch.cuda.mem_get_info()[0] if device == "cuda" else None
    text = (env.get(BUDGET_ENV) or "").strip()
    if text:
        return parse_budget(text, free)
    return None if free is None else int(DEFAULT_CUDA_FRACTION * free)


def host_memory_bytes() -> int | None:
    """The host's physical memory, None where the system does not say."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def pinned_limit_from_env(device: str, environ: Mapping[str, str] | None = None) -> int:
    """How much host memory may be pinned: 0 off CUDA (pinning is a CUDA copy optimisation)."""
    if device != "cuda":
        return 0
    env = os.environ if environ is None else environ
    physical = host_memory_bytes()
    text = (env.get(PINNED_ENV) or "").strip()
    if text:
        return parse_budget(text, physical, name=PINNED_ENV, allow_zero=True)
    return 0 if physical is None else int(DEFAULT_PINNED_FRACTION * physical)


def should_pin(device: str, host: str, nbytes: int, pinned: int, limit: int) -> bool:
    """Whether an entry of `nbytes` leaving `device` for `host` goes to pinned memory: only
    from CUDA to the CPU (a pinned source makes the copy back a direct DMA; on the CPU there is
    no copy to speed up), and only while the pinned total stays within `limit` (page-locked
    memory is taken from what the OS can swap or cache)."""
    return device == "cuda" and host == "cpu" and nbytes > 0 and pinned + nbytes <= limit


def storage_key(tensor: torch.Tensor) -> tuple[str, int]:
    storage = tensor.untyped_storage()
    return (str(tensor.device), storage.data_ptr())


def tensor_bytes(tensors: Iterable[torch.Tensor]) -> int:
    """Bytes of the storages behind `tensors`, each storage once (views share theirs)."""
    seen: set[tuple[str, int]] = set()
    total = 0
    for tensor in tensors:
        key = storage_key(tensor)
        if key not in seen:
            seen.add(key)
            total += tensor.untyped_storage().nbytes()
    return total


def module_tensors(modules: Iterable[torch.nn.Module]) -> Iterator[torch.Tensor]:
    for module in modules:
        yield from module.parameters()
        yield from module.buffers()


def weight_bytes(*pipes: Any) -> int:
    """Bytes of the parameters and buffers of pipelines' modules (shared storages once)."""
    return tensor_bytes(module_tensors(m for pipe in pipes for m in pipe_modules(pipe)))


def pipe_modules(pipe: Any) -> list[torch.nn.Module]:
    components = getattr(pipe, "components", {})
    return [c for c in components.values() if isinstance(c, torch.nn.Module)]


def gib(count: int) -> str:
    """A byte count for people: GiB, or MiB below one GiB (small budgets read 0.00 GiB)."""
    return f"{count / 2**30:.2f} GiB" if count >= 2**30 else f"{count / 2**20:.1f} MiB"


# ---- entries

Key = tuple[str, str]  # (kind, name)
CHECKPOINT: Final = "checkpoint"
TO_HOST: Final = "to host"
DROPPED: Final = "dropped"


@dataclass(frozen=True)
class Kind:
    label: str  # in messages and the log
    evicted: str  # TO_HOST: waits in host memory; DROPPED: deleted, its file read again


# What leaves the device how. LoRA adapters are the one kind that cannot move on its own: its
# tensors sit inside its checkpoint's layers (they move with the checkpoint).
KINDS: Final[Mapping[str, Kind]] = {
    CHECKPOINT: Kind("checkpoint", TO_HOST),
    "vae": Kind("VAE", TO_HOST),
    "controlnet": Kind("ControlNet", TO_HOST),
    "upscaler": Kind("upscaler", TO_HOST),
    "lora": Kind("LoRA", DROPPED),
}


@dataclass(eq=False)
class Entry:
    """One thing that takes device memory. `modules` move between the tiers; `tensors` (default:
    the modules' parameters and buffers) is what it holds. An entry with a `parent` (a LoRA
    adapter in its checkpoint) is on the device exactly when its parent is; `drop` deletes a
    DROPPED kind's entry and answers False when that cannot happen now (its owner is busy)."""

    kind: str
    name: str
    modules: tuple[torch.nn.Module, ...] = ()
    tensors: Callable[[], Iterable[torch.Tensor]] | None = None
    parent: Key | None = None
    drop: Callable[[], bool] | None = None

    @property
    def key(self) -> Key:
        return (self.kind, self.name)

    @property
    def label(self) -> str:
        return self.name if self.kind == CHECKPOINT else f"{KINDS[self.kind].label} {self.name}"

    def held(self) -> Iterable[torch.Tensor]:
        return self.tensors() if self.tensors is not None else module_tensors(self.modules)


class Lease:
    """What one request uses: pinned on the device until the request ends."""

    def __init__(self, owner: WorkingSet) -> None:
        self.owner = owner  # another engine's working set never pins on this lease
        self.keys: set[Key] = set()


_CURRENT: contextvars.ContextVar[Lease | None] = contextvars.ContextVar("lease", default=None)


@dataclass
class WorkingSet:
    """Which entries are on `device`, least recently used first, within `budget` bytes."""

    device: str
    budget: int | None  # None: everything stays where it loaded, nothing ever moves
    host: str = HOST  # where entries off the device wait
    pinned_limit: int = 0  # bytes of host memory that may be pinned (0 off CUDA)
    pipes: dict[str, Any] = field(default_factory=dict)  # title -> pipeline, every checkpoint
    entries: dict[Key, Entry] = field(default_factory=dict)  # every entry, either tier
    resident: OrderedDict[Key, None] = field(default_factory=OrderedDict)
    # (label, "to device" | "to host" | "dropped", seconds) of every move, for the log and
    # benchmarks.
    moves: list[tuple[str, str, float]] = field(default_factory=list)
    pinned_bytes: int = 0  # host memory pinned now
    # Pinned bytes per module (id) whose host copy is in pinned memory: counted per module, as
    # checkpoints share modules (engine/pipelines.py) and one may go back to the device with
    # another entry while the entry that pinned it stays on the host.
    _pinned_modules: dict[int, int] = field(default_factory=dict, repr=False)
    _pins: Counter[Key] = field(default_factory=Counter, repr=False)
    # Bytes of a set of entries, within one call (the eviction loop asks again for the same
    # sets; walking every tensor is milliseconds for real models). Cleared on every change.
    _sizes: dict[frozenset[Key], int] = field(default_factory=dict, repr=False)
    _lock: threading.RLock = field(default_factory=threading.RLock, repr=False)
    # The budget the resident set was last found to fit, None after any change since.
    _settled: int | None = field(default=None, repr=False)
    # key -> (its modules' LoRA adapter names, the entry, its tensors): see _held.
    _tensors: dict[Key, tuple[Any, Entry, list[torch.Tensor]]] = field(
        default_factory=dict, repr=False
    )

    # ---- leases

    @contextmanager
    def lease(self) -> Iterator[Lease]:
        """One request's lease: everything `use`d or `acquire`d in the body (in this thread or
        task) stays on the device until the body ends."""
        lease = Lease(self)
        token = _CURRENT.set(lease)
        try:
            yield lease
        finally:
            _CURRENT.reset(token)
            with self._lock:
                self._pins.subtract(lease.keys)
                self._pins = +self._pins  # drop the zeros

    def pinned(self, key: Key) -> bool:
        return self._pins[key] > 0

    def _pin(self, keys: Iterable[Key]) -> None:
        lease = _CURRENT.get()
        if lease is None or lease.owner is not self:
            return  # no request open here (setup, a script): nothing to protect
        for key in keys:
            if key not in lease.keys:
                lease.keys.add(key)
                self._pins[key] += 1

    # ---- setup

    def before_load(self, estimate: int, beside: Sequence[str] = ()) -> None:
        """Make room for something about to load onto the device (`estimate`: its bytes),
        keeping the checkpoints it will run `beside`."""
        if self.budget is None:
            return
        with self._lock:
            self._changed()
            self._evict_until(estimate, keep=[(CHECKPOINT, t) for t in beside])

    def admit(self, title: str, pipe: Any) -> None:
        """A checkpoint just loaded onto the device (setup): resident if it fits, else to the
        host."""
        self.pipes[title] = pipe
        entry = Entry(CHECKPOINT, title, tuple(pipe_modules(pipe)))
        with self._lock:
            # A module it shares with a checkpoint waiting in host memory (engine/pipelines.py
            # stores identical components once) is on the host: it comes to the device too.
            on_device = {id(m) for k in self.resident for m in self.entries[k].modules}
            away = {id(m) for e in self.entries.values() for m in e.modules} - on_device
            stray = tuple(m for m in entry.modules if id(m) in away)
            if stray and self.budget is not None:
                self._move(replace(entry, modules=stray), to_device=True)
            self.entries[entry.key] = entry
            self.resident[entry.key] = None
            self._changed()
            if self.budget is not None and self.resident_bytes() > self.budget:
                self._leave(entry.key)

    def forget(self, title: str) -> None:
        """A checkpoint no longer served (refresh): dropped from the accounting."""
        self.pipes.pop(title, None)
        self.forget_entry((CHECKPOINT, title))

    def forget_entry(self, key: Key) -> None:
        with self._lock:
            gone = self.entries.pop(key, None)
            if gone is not None:  # its host copies are freed with it, unless another holds them
                others = {id(m) for e in self.entries.values() for m in e.modules}
                for module in gone.modules:
                    if id(module) not in others:
                        self.pinned_bytes -= self._pinned_modules.pop(id(module), 0)
            self.resident.pop(key, None)
            self._tensors.pop(key, None)
            for child in [k for k, e in self.entries.items() if e.parent == key]:
                self.forget_entry(child)
            self._changed()  # a name may come back with other weights

    # ---- requests

    def acquire(self, titles: Sequence[str]) -> None:
        """Put every checkpoint in `titles` on the device (one request's models), pinned for the
        current lease. Raises OutOfMemory naming the checkpoints and the budget when they
        cannot all fit at once."""
        self.hold([(CHECKPOINT, t) for t in titles])

    def use(self, entry: Entry, beside: Sequence[str] = ()) -> None:
        """Hold a cache's entry for the current request (a VAE file, a ControlNet, an upscaler,
        a LoRA adapter inside its checkpoint) with the checkpoints it runs `beside` (so that
        making room for it never moves them out): on the device, pinned until the lease ends.
        An entry the manager does not know yet was just loaded onto the device; if it cannot
        fit it waits on the host for a later request and OutOfMemory is raised."""
        if self.budget is None:
            return
        with self._lock:
            known = self.entries.get(entry.key)
            fresh = known is None or known.modules != entry.modules
            if fresh:
                self.entries[entry.key] = entry
                if entry.parent is None or entry.parent in self.resident:
                    self.resident[entry.key] = None
                self._changed()
            try:
                self.hold([*((CHECKPOINT, t) for t in beside), entry.key])
            except OutOfMemory:
                if fresh and entry.key in self.resident:
                    self._leave(entry.key)
                raise

    def hold(self, keys: Sequence[Key]) -> None:
        """Put `keys` (and their parents) on the device and pin them for the current lease,
        evicting the least recently used unpinned others as needed."""
        if self.budget is None:
            return
        with self._lock:
            wanted = self._with_parents(keys)
            if self._settled == self.budget and all(k in self.resident for k in wanted):
                # Nothing to move and nothing changed since the last check (the usual request
                # on a warm worker): no tensor walk.
                for key in wanted:
                    self.resident.move_to_end(key)
                self._pin(wanted)
                return
            self._changed()
            need = self.resident_bytes(wanted)
            if need > self.budget:
                raise OutOfMemory(
                    f"Out of memory: {self._labels(wanted)} need {gib(need)} on the device at "
                    f"once; {BUDGET_ENV} allows {gib(self.budget)}. Raise {BUDGET_ENV}, use a "
                    "larger GPU, or use fewer models in one request (hires/refiner checkpoint, "
                    "ControlNet units, VAE file)"
                )
            held = [k for k in self.resident if self.pinned(k) and k not in wanted]
            if self.resident_bytes([*held, *wanted]) > self.budget:
                raise DeviceBusy(
                    f"Out of memory: {self._labels(wanted)} do not fit on the device beside "
                    f"{self._labels(held)}, which requests running now use ({BUDGET_ENV} "
                    f"allows {gib(self.budget)}); try again when they finish"
                )
            missing = [k for k in wanted if k not in self.resident]
            # Also when nothing is missing: the resident set may exceed a lowered budget.
            self._evict_until(0, keep=wanted, incoming=missing)
            if self.resident_bytes([*self.resident, *missing]) > self.budget:
                stuck = [k for k in self.resident if k not in wanted]
                raise DeviceBusy(
                    f"Out of memory: {self._labels(wanted)} do not fit on the device beside "
                    f"{self._labels(stuck)}, which cannot leave while requests running now use "
                    f"their models ({BUDGET_ENV} allows {gib(self.budget)}); try again when "
                    "they finish"
                )
            for key in missing:
                if key not in self.resident:  # a child arrives with its parent
                    self._arrive(key)
            if missing:  # the adapters that came back with a checkpoint may not all fit
                self._evict_until(0, keep=wanted)
            for key in wanted:
                self.resident.move_to_end(key)
            self._pin(wanted)
            if self.resident_bytes() <= self.budget:
                self._settled = self.budget

    def resident_bytes(self, keys: Iterable[Key] | None = None) -> int:
        """Bytes on the device of `keys` (default: every resident entry), each storage once. A
        checkpoint's LoRA adapters count only when their entries are among `keys` (they may be
        dropped to make room for it)."""
        wanted = frozenset(
            k for k in (self.resident if keys is None else keys) if k in self.entries
        )
        if wanted not in self._sizes:
            if len(self._sizes) > 256:
                self._sizes = {}
            left_out = {
                storage_key(t)
                for entry in self.entries.values()
                if entry.parent in wanted and entry.key not in wanted
                for t in self._held(entry)
            }
            held = (t for k in wanted for t in self._held(self.entries[k]))
            self._sizes[wanted] = tensor_bytes(t for t in held if storage_key(t) not in left_out)
        return self._sizes[wanted]

    def _held(self, entry: Entry) -> list[torch.Tensor]:
        """An entry's tensors, found once: walking a real UNet's module tree takes tens of
        milliseconds, and only LoRA loads and deletes (peft) change it, which the modules'
        peft_config shows."""
        owner = self.entries.get(entry.parent) if entry.parent is not None else entry
        stamp = tuple(
            tuple(getattr(m, "peft_config", None) or ()) for m in (owner or entry).modules
        )
        cached = self._tensors.get(entry.key)
        if cached is None or cached[0] != stamp or cached[1] is not entry:
            cached = (stamp, entry, list(entry.held()))
            self._tensors[entry.key] = cached
        return cached[2]

    # ---- moving

    def _changed(self) -> None:
        """Something came, left or grew: sizes are found again, and the next hold checks."""
        self._sizes.clear()
        self._settled = None

    def _with_parents(self, keys: Iterable[Key]) -> list[Key]:
        out: list[Key] = []
        for key in keys:
            parent = self.entries[key].parent if key in self.entries else None
            out += [parent, key] if parent is not None else [key]
        return [k for k in dict.fromkeys(out) if k in self.entries]

    def _labels(self, keys: Iterable[Key]) -> str:
        return ", ".join(self.entries[k].label for k in keys) or "nothing"

    def _evict_until(self, extra: int, keep: Sequence[Key], incoming: Sequence[Key] = ()) -> None:
        """Evict least recently used entries (not in `keep`, not pinned) until the `incoming`
        ones (storages already on the device counted once) and `extra` more bytes fit."""
        assert self.budget is not None
        for key in list(self.resident):  # least recently used first
            if self.resident_bytes([*self.resident, *incoming]) + extra <= self.budget:
                return
            if key in self.resident and key not in keep and not self.pinned(key):
                self._leave(key)

    def _leave(self, key: Key) -> None:
        """Take one entry off the device, as its kind says; its children go with it."""
        entry = self.entries[key]
        started = time.perf_counter()
        if KINDS[entry.kind].evicted == DROPPED:
            if entry.drop is not None and not entry.drop():
                return  # its owner is busy: it stays for now
            self.forget_entry(key)
            self._record(entry, DROPPED, started)
            return
        for child in [k for k in self.resident if self.entries[k].parent == key]:
            del self.resident[child]
        del self.resident[key]
        self._move(entry, to_device=False)
        self._changed()

    def _arrive(self, key: Key) -> None:
        entry = self.entries[key]
        if entry.parent is None:
            self._move(entry, to_device=True)
        self.resident[key] = None
        for child in [k for k, e in self.entries.items() if e.parent == key]:
            self.resident[child] = None
        self._changed()

    def _move(self, entry: Entry, to_device: bool) -> None:
        """Move one entry's modules; to the host, a module a resident entry shares stays."""
        started = time.perf_counter()
        target = self.device if to_device else self.host
        shared = {id(m) for k in self.resident for m in self.entries[k].modules}
        modules = [m for m in entry.modules if to_device or id(m) not in shared]
        with reported(
            f"moving {entry.label} to {target}", f"lower {BUDGET_ENV} or use a larger GPU"
        ):
            if to_device:
                for module in modules:
                    pinned = self._pinned_modules.pop(id(module), 0)
                    module.to(target, non_blocking=pinned > 0)
                    self.pinned_bytes -= pinned
            else:
                nbytes = pinned_size(module_tensors(modules))
                pin = should_pin(
                    self.device, self.host, nbytes, self.pinned_bytes, self.pinned_limit
                )
                for module in modules:
                    if pin:
                        to_pinned_host(module)
                        size = pinned_size(module_tensors([module]))
                        self._pinned_modules[id(module)] = size
                        self.pinned_bytes += size
                    else:
                        module.to(target)
            if self.device == "cuda":
                torch.cuda.synchronize()  # the copy is done: honest times, safe host reads
        self._record(entry, "to device" if to_device else TO_HOST, started)

    def _record(self, entry: Entry, direction: str, started: float) -> None:
        seconds = time.perf_counter() - started
        self.moves.append((entry.label, direction, seconds))
        log.info("working set: %s %s in %.2f s", entry.label, direction, seconds)


def pinned_size(tensors: Iterable[torch.Tensor]) -> int:
    """Pinned host memory for copies of `tensors`: torch's pinned allocator hands out blocks
    rounded up to a power of two."""
    return sum(1 << max(t.nbytes - 1, 0).bit_length() for t in tensors if t.nbytes)


def to_pinned_host(module: torch.nn.Module) -> None:
    """Move a module's tensors into page-locked host memory (CUDA only): each tensor is copied
    straight from the device into a pinned block (torch's pinned allocator; its freed blocks
    are reused for the next move)."""

    def pinned(tensor: torch.Tensor) -> torch.Tensor:
        if tensor.device.type != "cuda":
            return tensor
        host = torch.empty_like(tensor, device=HOST, pin_memory=True)
        host.copy_(tensor, non_blocking=True)
        return host

    module._apply(pinned)


def module_entry(kind: str, name: str, module: torch.nn.Module) -> Entry:
    """The entry of a cache's loaded module (a VAE file, a ControlNet, an upscaler)."""
    return Entry(kind, name, (module,))
