"""An engine call from Cog's async `predict`: run in a worker thread, cancellable.

Once Cog cancels the prediction, `Cancelled` is raised in the engine's thread at its next
step, or while the request waits to start (engine/step_batcher.py `cancellable`), so the
prediction frees its slot."""

from __future__ import annotations

import asyncio
import contextvars
import threading
from collections.abc import Callable
from concurrent.futures import Executor
from typing import TypeVar

from .step_batcher import cancellable

T = TypeVar("T")
Progress = Callable[[int, int], None]


class Cancelled(BaseException):
    """Cog cancelled the prediction: raised in the engine's thread at its next step, or while
    it waits to start (a BaseException, like Cog's own, so no `except Exception` in the
    engine swallows it)."""


async def run_cancellable(
    workers: Executor, work: Callable[[Progress], T], progress: Progress
) -> T:
    """`work(report)` in a worker thread, where `report` calls `progress` once it has checked
    for cancellation (the engine reports progress at every step, and checks while a request
    waits to start). Cancelling the awaiting task stops the work at its next check and waits
    until it has stopped before the cancellation propagates."""
    stop = threading.Event()

    def check() -> None:
        if stop.is_set():
            raise Cancelled

    def report(step: int, total: int) -> None:
        check()
        progress(step, total)

    def run() -> T:
        with cancellable(check):
            return work(report)

    # The worker thread keeps this prediction's context (Cog routes its logs by it).
    future = workers.submit(contextvars.copy_context().run, run)
    try:
        return await asyncio.wrap_future(future)
    except asyncio.CancelledError:
        stop.set()
        await asyncio.wait([asyncio.wrap_future(future)])
        raise
