"""Several requests in one engine at once: turns on the shared models, and UNet calls batched
step by step across requests.

Turns. The models are shared, and some of their state belongs to one request at a time: which
LoRA adapters are active at which weights (inside the peft layers), the circular padding of a
`tiling` request, a ControlNet reference hook in the UNet's attention. So engine work runs in
turns: a request (a `Session`, one thread) holds the turn while it plans, runs extension hooks
and switches its LoRAs, exactly as a lone request does. Whenever it gets the turn back, its own
UNet LoRA state is applied again (a cached switch: milliseconds). Text encoding runs outside the
turn, beside other requests' UNet rounds, one request at a time under the text-encoder lock,
with that request's text-encoder LoRAs switched on there (UNet and text-encoder LoRA layers are
switched separately, each only under its own lock).

Batching. At each UNet call a session hands its inputs in (`Session.unet`) and gives the turn
up. When every session in flight waits on a UNet call, or is away doing work that touches no
shared module state (VAE decode, PNG encoding, text encoding: `Session.away`), the last one to
get there runs
every waiting call: calls with the same `call_key` (the same UNet, LoRA state, input shapes and
extension residual shapes) are concatenated along the batch and evaluated in one UNet call of
at most `max_rows` rows; each session gets its rows back and waits for its turn again. Sessions
join and leave between steps, so a 4-step request never waits for a 150-step one to finish
(continuous batching); calls that cannot share a batch run one after another in the same round.

Rows are independent in the UNet (per-row timesteps; normalisation and attention per sample),
so a request's picture is the one it gives alone, up to the float rounding a different batch
size causes in matrix kernels (tests/test_step_batcher.py measures it).

Failures stay with their owner: a batched call that runs out of memory is split in halves and
retried, and later calls of that key get at most half those rows; any other failure is retried
call by call, so only the call that fails gets the error.

Exclusive sessions (tiling, ControlNet reference) change shared modules for a whole pass: they
keep the turn and run their UNet calls directly, so no other request ever sees the change.

Without a session (scripts and tests calling the passes directly) every call runs inline.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import weakref
from collections import Counter, deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

import torch

from .errors import ModelLoadError
from .oom import is_out_of_memory

log = logging.getLogger(__name__)

MAX_ROWS_ENV = "SD_MAX_BATCH_ROWS"
CONCURRENCY_ENV = "SD_MAX_CONCURRENCY"
# Default requests in flight: on the CPU a few (per-step overhead is what batching saves);
# on CUDA one per REQUEST_BYTES of device memory free after setup, within 1..MAX_DEFAULT.
CPU_DEFAULT_SESSIONS = 4
REQUEST_BYTES = 2 * 2**30  # activations of an SD 1.5 512x512 request with hires, roughly
MAX_DEFAULT_SESSIONS = 8
# UNet rows per batched call (a request's CFG halves count: 1 image = 2 rows). Enough for
# several SD 1.5 requests at 512x512 on a 24 GB card; SDXL at 1024x1024 wants fewer.
DEFAULT_MAX_ROWS = 16

_current: ContextVar[Session | None] = ContextVar("engine_session", default=None)
# The request's cancellation check (it raises the caller's own exception), polled while the
# request waits before its first step: at the door and for memory. Its steps are checked by
# the progress callback.
_cancel_check: ContextVar[Callable[[], None] | None] = ContextVar("cancel_check", default=None)
CANCEL_POLL_S = 0.25


@contextmanager
def cancellable(check: Callable[[], None]) -> Iterator[None]:
    """Requests the body starts call `check` every CANCEL_POLL_S while they wait to start."""
    token = _cancel_check.set(check)
    try:
        yield
    finally:
        _cancel_check.reset(token)


def _wait(cv: threading.Condition, ready: Callable[[], bool], timeout: float | None = None) -> bool:
    """`cv.wait_for(ready, timeout)` (cv held), calling this request's cancellation check
    between short waits."""
    check = _cancel_check.get()
    if check is None:
        return cv.wait_for(ready, timeout)
    deadline = None if timeout is None else time.monotonic() + timeout
    while not ready():
        left = (
            CANCEL_POLL_S if deadline is None else min(CANCEL_POLL_S, deadline - time.monotonic())
        )
        if left <= 0:
            return False
        cv.wait(left)
        check()
    return True


def current_session() -> Session | None:
    """The session of the request running in this thread, if it runs under a batcher."""
    return _current.get()


def max_rows_from_env(environ: Mapping[str, str] | None = None) -> int:
    env = os.environ if environ is None else environ
    text = (env.get(MAX_ROWS_ENV) or "").strip()
    if not text:
        return DEFAULT_MAX_ROWS
    if not text.isdigit() or int(text) < 1:
        raise ModelLoadError(f"{MAX_ROWS_ENV}={text!r}: must be a whole number of rows, 1 or more")
    return int(text)


def sessions_from_env(free_bytes: int | None, environ: Mapping[str, str] | None = None) -> int:
    """Requests in flight at once: SD_MAX_CONCURRENCY, else sized from the device memory free
    after setup (`free_bytes`; None on the CPU)."""
    env = os.environ if environ is None else environ
    text = (env.get(CONCURRENCY_ENV) or "").strip()
    if text:
        if not text.isdigit() or int(text) < 1:
            raise ModelLoadError(
                f"{CONCURRENCY_ENV}={text!r}: must be a whole number of requests, 1 or more"
            )
        return int(text)
    if free_bytes is None:
        return CPU_DEFAULT_SESSIONS
    return max(1, min(MAX_DEFAULT_SESSIONS, free_bytes // REQUEST_BYTES))


# ---------------------------------------------------------------------------------------------
# UNet calls: keys, concatenation, splitting (pure helpers)


LoraState = tuple[Any, tuple[Any, ...]]  # (LoraManager or None, its active uses)
UNET = ("unet",)  # LoRA component kinds (engine/networks.py KINDS)
TEXT_ENCODERS = ("te",)
NO_LORAS: LoraState = (None, ())


@dataclass(eq=False)
class UNetCall:
    """One request's UNet evaluation: `unet(sample, timestep, **kwargs).sample`, run under
    `loras` (that request's LoRA state)."""

    unet: Any
    sample: torch.Tensor
    timestep: torch.Tensor
    kwargs: dict[str, Any]
    loras: LoraState = NO_LORAS
    result: torch.Tensor | None = None
    error: BaseException | None = None
    done: bool = False

    @property
    def rows(self) -> int:
        return int(self.sample.shape[0])


def _structure(value: Any) -> Any:
    """A hashable description of a kwargs tree: its keys and every tensor's per-row shape,
    dtype and device. Calls concatenate only when theirs are equal."""
    if isinstance(value, torch.Tensor):
        return ("T", tuple(value.shape[1:]), value.dtype, value.device)
    if isinstance(value, Mapping):
        return ("M", tuple((k, _structure(value[k])) for k in sorted(value)))
    if isinstance(value, list | tuple):
        return ("S", type(value).__name__, tuple(_structure(v) for v in value))
    return ("V", repr(value))


def lora_key(loras: LoraState) -> tuple[Any, ...]:
    manager, uses = loras
    if manager is None or not uses:
        return ()
    return (id(manager), tuple((u.info.adapter_id, u.te_weight, u.unet_weight) for u in uses))


def call_key(call: UNetCall) -> tuple[Any, ...]:
    """Calls with equal keys share one UNet call: the same module, the same LoRA state, and
    inputs whose per-row shapes, dtypes and kwargs agree."""
    return (
        id(call.unet),
        lora_key(call.loras),
        _structure(call.sample),
        _structure(call.timestep.reshape(-1)),
        _structure(call.kwargs),
    )


def _concat(values: Sequence[Any]) -> Any:
    first = values[0]
    if isinstance(first, torch.Tensor):
        return torch.cat(list(values))
    if isinstance(first, Mapping):
        return {k: _concat([v[k] for v in values]) for k in first}
    if isinstance(first, list | tuple):
        return type(first)(_concat([v[i] for v in values]) for i in range(len(first)))
    return first  # equal by key (a flag, None)


def run_batched(calls: Sequence[UNetCall]) -> None:
    """One UNet call over the rows of every call in `calls` (equal keys), results split back."""
    unet = calls[0].unet
    if len(calls) == 1:
        call = calls[0]
        call.result = unet(call.sample, call.timestep.reshape(-1), **call.kwargs).sample
        return
    sample = torch.cat([c.sample for c in calls])
    timestep = torch.cat([c.timestep.reshape(-1).expand(c.rows) for c in calls])
    kwargs = _concat([c.kwargs for c in calls])
    out = unet(sample, timestep, **kwargs).sample
    for call, part in zip(calls, out.split([c.rows for c in calls]), strict=True):
        call.result = part


def chunks(calls: Sequence[UNetCall], max_rows: int) -> list[list[UNetCall]]:
    """Consecutive groups of at most `max_rows` rows (a call larger than that alone)."""
    out: list[list[UNetCall]] = []
    rows = 0
    for call in calls:
        if out and rows + call.rows <= max_rows:
            out[-1].append(call)
            rows += call.rows
        else:
            out.append([call])
            rows = call.rows
    return out


# ---------------------------------------------------------------------------------------------
# Sessions and the batcher


@dataclass(eq=False)
class Session:
    """One request in flight. Its thread holds the turn except while it waits on a UNet call
    or is away."""

    batcher: StepBatcher
    loras: LoraState = NO_LORAS
    _exclusive: int = 0
    _away: bool = False

    def unet(self, call: UNetCall) -> torch.Tensor:
        """The UNet output for `call`, evaluated together with other sessions' calls."""
        if self._exclusive:
            self.batcher._apply_loras(call.loras)
            run_batched([call])
            assert call.result is not None
            return call.result
        return self.batcher._submit(self, call)

    def set_loras(self, loras: LoraState) -> None:
        """This session's LoRA state, applied now and whenever it gets the turn back."""
        self.loras = loras
        self.batcher._apply_loras(loras)

    @contextmanager
    def away(self) -> Iterator[None]:
        """Work that touches no shared module state (decode, encode, hashing): other sessions'
        steps go on meanwhile. An exclusive session keeps the turn."""
        if self._exclusive or self._away:
            yield
            return
        self.batcher._leave(self)
        self._away = True
        try:
            yield
        finally:
            self._away = False
            self.batcher._return(self)

    @contextmanager
    def exclusive(self) -> Iterator[None]:
        """The shared modules are changed for this request (tiling, ControlNet reference):
        keep the turn, run UNet calls directly."""
        self._exclusive += 1
        try:
            yield
        finally:
            self._exclusive -= 1


_LEADER = object()  # the turn's holder while a round of UNet calls runs


@dataclass(eq=False)
class StepBatcher:
    """Turns and batched UNet calls for every request of one engine (one per set of shared
    modules: engines made by a rescan share it)."""

    max_rows: int = DEFAULT_MAX_ROWS
    # Requests that may be in flight at once; others wait at the door (SD_MAX_CONCURRENCY).
    max_sessions: int = 1
    _cv: threading.Condition = field(default_factory=threading.Condition, repr=False)
    _holder: Any = None
    _queue: deque[Session] = field(default_factory=deque, repr=False)
    _active: set[Session] = field(default_factory=set, repr=False)
    _door: deque[object] = field(default_factory=deque, repr=False)
    _waiting: dict[Session, UNetCall] = field(default_factory=dict, repr=False)
    _away: set[Session] = field(default_factory=set, repr=False)
    # LoRA managers used so far; weak, so a checkpoint dropped by a refresh is not kept alive.
    _touched: weakref.WeakValueDictionary[int, Any] = field(
        default_factory=weakref.WeakValueDictionary, repr=False
    )
    # Text encoding runs outside the turn (beside UNet rounds), one request at a time; LoRA
    # loads and deletes hold it too (LoraManager.modules_lock). Reentrant: a load may evict.
    _encoder_lock: threading.RLock = field(default_factory=threading.RLock, repr=False)
    _ended: int = 0  # sessions ended so far (wait_for_an_end)
    # Per call key: fewer rows than a batched call that ran out of memory.
    _row_caps: dict[tuple[Any, ...], int] = field(default_factory=dict, repr=False)
    # Rows per UNet call run by rounds (for tests and benchmarks): rows -> count.
    batch_rows: Counter[int] = field(default_factory=Counter, repr=False)

    @property
    def text_encoder_lock(self) -> threading.RLock:
        """Held while a request's text encoding runs: whoever changes the text encoders'
        layers (LoRA loads and deletes) holds it too."""
        return self._encoder_lock

    @contextmanager
    def session(self) -> Iterator[Session]:
        """One request in flight: waits at the door while `max_sessions` are in, then holds
        the turn until its first UNet call."""
        session = Session(self)
        ticket = object()
        with self._cv:
            self._door.append(ticket)
            try:
                _wait(
                    self._cv,
                    lambda: self._door[0] is ticket and len(self._active) < self.max_sessions,
                )
            except BaseException:  # cancelled at the door: the next one in line may go
                self._door.remove(ticket)
                self._cv.notify_all()
                raise
            token = _current.set(session)
            self._door.popleft()
            self._active.add(session)
            self._cv.notify_all()
            self._take_turn(session)
        try:
            self._restore(session)  # no LoRA of a request that gave up the turn stays on
            yield session
        finally:
            with self._cv:
                if self._holder is session:
                    self._holder = None
                self._active.discard(session)
                self._away.discard(session)
                self._ended += 1
                self._cv.notify_all()
            self._lead_if_ready()
            _current.reset(token)

    def active_sessions(self) -> int:
        with self._cv:
            return len(self._active)

    def wait_for_an_end(self, timeout: float) -> bool:
        """Outside any session: wait until a request in flight ends. False at once when none
        is in flight (nothing would free anything), or after `timeout` seconds."""
        with self._cv:
            if not self._active:
                return False
            ended = self._ended
            return _wait(self._cv, lambda: self._ended != ended, timeout)

    # ---- turns

    def _take_turn(self, session: Session) -> None:
        """Wait (FIFO) for the turn; the condition is held by the caller."""
        self._queue.append(session)
        self._cv.wait_for(lambda: self._holder is None and self._queue[0] is session)
        self._queue.popleft()
        self._holder = session

    def _restore(self, session: Session) -> None:
        self._apply_loras(session.loras)

    def _submit(self, session: Session, call: UNetCall) -> torch.Tensor:
        with self._cv:
            assert self._holder is session, "a UNet call without the turn"
            self._waiting[session] = call
            self._holder = None
            self._cv.notify_all()
        self._lead_if_ready()
        with self._cv:
            self._cv.wait_for(lambda: call.done)
            self._take_turn(session)
        self._restore(session)
        if call.error is not None:
            raise call.error
        assert call.result is not None
        return call.result

    def _leave(self, session: Session) -> None:
        with self._cv:
            assert self._holder is session, "away without the turn"
            self._away.add(session)
            self._holder = None
            self._cv.notify_all()
        self._lead_if_ready()

    def _return(self, session: Session) -> None:
        with self._cv:
            self._away.discard(session)
            self._take_turn(session)
        self._restore(session)

    # ---- rounds

    def _lead_if_ready(self) -> None:
        """Run the waiting calls when nobody in flight could still add one."""
        with self._cv:
            ready = (
                self._waiting
                and self._holder is None
                and not self._queue
                and len(self._waiting) + len(self._away) == len(self._active)
            )
            if not ready:
                return
            calls = list(self._waiting.values())
            self._waiting.clear()
            self._holder = _LEADER
        try:
            self.run_round(calls)
        finally:
            with self._cv:
                for call in calls:
                    if call.result is None and call.error is None:
                        call.error = RuntimeError("the batched UNet call did not run")
                    call.done = True
                self._holder = None
                self._cv.notify_all()

    def run_round(self, calls: list[UNetCall]) -> None:
        """Every call, grouped by key, one UNet call per group (chunks of `max_rows`)."""
        groups: dict[tuple[Any, ...], list[UNetCall]] = {}
        for call in calls:
            groups.setdefault(call_key(call), []).append(call)
        with torch.inference_mode():
            for key, group in groups.items():
                self._apply_loras(group[0].loras)
                for part in chunks(group, self._row_caps.get(key, self.max_rows)):
                    self._run_guarded(part, key)

    def _run_guarded(self, calls: list[UNetCall], key: tuple[Any, ...]) -> None:
        """Run `calls` as one UNet call; on failure, halves (out of memory) or one by one
        (anything else), so an error reaches only the call that causes it. After an out of
        memory, calls of this key get at most half the rows that failed (the batch size adapts
        to the memory there is)."""
        rows = sum(c.rows for c in calls)
        try:
            run_batched(calls)
            self.batch_rows[rows] += 1
        except Exception as exc:  # noqa: BLE001 - handed to its owner below
            if len(calls) == 1:
                calls[0].error = exc
                return
            if is_out_of_memory(exc):
                cap = max(1, rows // 2)
                self._row_caps[key] = min(cap, self._row_caps.get(key, cap))
                log.warning("batched UNet call of %d rows ran out of memory; splitting it", rows)
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
                half = len(calls) // 2
                self._run_guarded(calls[:half], key)
                self._run_guarded(calls[half:], key)
                return
            for call in calls:
                self._run_guarded([call], key)

    # ---- LoRA state

    def _apply_loras(self, loras: LoraState, kinds: tuple[str, ...] = UNET) -> None:
        """Exactly `loras` active in the components of `kinds`: every other LoRA manager used
        so far switched off there (a no-op for those already off), then this one switched to
        its uses. UNet layers change only under the turn; text-encoder layers only under the
        text-encoder lock."""
        manager, uses = loras
        for other in list(self._touched.values()):
            if other is not manager:
                other.deactivate(kinds)
        if manager is not None:
            self._touched[id(manager)] = manager
            manager.activate(list(uses), kinds)

    def _off_in_text_encoders(self) -> None:
        with self._encoder_lock:
            self._apply_loras(NO_LORAS, TEXT_ENCODERS)

    @contextmanager
    def _text_encoding(self, session: Session) -> Iterator[None]:
        with session.away(), self._encoder_lock:
            self._apply_loras(session.loras, TEXT_ENCODERS)
            yield


# ---------------------------------------------------------------------------------------------
# What the passes call (inline when no session runs in this thread)


def run_unet(
    unet: Any, sample: torch.Tensor, timestep: torch.Tensor, kwargs: dict[str, Any]
) -> torch.Tensor:
    """`unet(sample, timestep, **kwargs).sample`, batched with other requests' calls when this
    thread runs a session."""
    session = current_session()
    if session is None:
        out: torch.Tensor = unet(sample, timestep, **kwargs).sample
        return out
    return session.unet(UNetCall(unet, sample, timestep, kwargs, session.loras))


@contextmanager
def lora_state(manager: Any, uses: Sequence[Any]) -> Iterator[None]:
    """`uses` active on `manager`'s checkpoint for the body (this request's turns only)."""
    session = current_session()
    if session is None:
        manager.activate(uses)
        try:
            yield
        finally:
            manager.deactivate()
        return
    session.set_loras((manager, tuple(uses)))
    try:
        yield
    finally:
        session.set_loras(NO_LORAS)
        session.batcher._off_in_text_encoders()  # nothing left active after the request


@contextmanager
def text_encoding() -> Iterator[None]:
    """The body runs the text encoders: outside the turn (other requests' steps go on), one
    request at a time, with this request's text-encoder LoRAs active."""
    session = current_session()
    if session is None:
        yield
        return
    with session.batcher._text_encoding(session):
        yield


@contextmanager
def exclusive(enabled: bool = True) -> Iterator[None]:
    """The body changes shared modules: no other request runs meanwhile."""
    session = current_session()
    if session is None or not enabled:
        yield
        return
    with session.exclusive():
        yield


@contextmanager
def away() -> Iterator[None]:
    """The body touches no shared module state: other requests' steps go on meanwhile."""
    session = current_session()
    if session is None:
        yield
        return
    with session.away():
        yield
