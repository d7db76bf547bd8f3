"""predict.py's plumbing: image files with their lifetime, and cancellable worker calls."""

from __future__ import annotations

import asyncio
import contextvars
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from engine.images import EncodedImage
from engine.output_files import OutputFolders
from engine.worker_calls import Cancelled, Progress, run_cancellable

PNG = EncodedImage(b"png-bytes", "png", "image/png")
JPG = EncodedImage(b"jpg-bytes", "jpg", "image/jpeg")


def test_each_prediction_gets_its_own_folder_and_old_ones_go() -> None:
    now = [0.0]
    folders = OutputFolders(ttl_s=10.0, clock=lambda: now[0])
    first = folders.write([PNG, JPG])
    assert [p.name for p in first] == ["00000.png", "00001.jpg"]
    assert [p.read_bytes() for p in first] == [b"png-bytes", b"jpg-bytes"]
    now[0] = 5.0
    second = folders.write([PNG])
    assert second[0].parent != first[0].parent
    assert first[0].exists()  # 5 s old: may still be being delivered
    now[0] = 10.5
    third = folders.write([JPG])
    assert not first[0].parent.exists()  # older than the lifetime: removed
    assert second[0].exists() and third[0].exists()
    for path in (second[0], third[0]):
        path.unlink()
        Path(path.parent).rmdir()


def test_a_call_returns_its_value_reports_progress_and_keeps_the_callers_context() -> None:
    var: contextvars.ContextVar[str] = contextvars.ContextVar("var", default="unset")
    seen: list[tuple[int, int]] = []

    def work(progress: Progress) -> str:
        progress(1, 2)
        return var.get()

    async def main() -> str:
        var.set("prediction-7")
        with ThreadPoolExecutor(1) as workers:
            return await run_cancellable(workers, work, lambda s, t: seen.append((s, t)))

    assert asyncio.run(main()) == "prediction-7"
    assert seen == [(1, 2)]


def test_cancelling_stops_the_work_at_its_next_step_before_the_cancel_propagates() -> None:
    started, steps, stopped = threading.Event(), [0], threading.Event()

    def work(progress: Progress) -> None:
        started.set()
        try:
            for step in range(100_000):  # bounded: a step every millisecond
                progress(step, 100_000)
                steps[0] += 1
                threading.Event().wait(0.001)
        except Cancelled:
            stopped.set()
            raise

    async def main() -> None:
        with ThreadPoolExecutor(1) as workers:
            task = asyncio.ensure_future(run_cancellable(workers, work, lambda s, t: None))
            await asyncio.get_running_loop().run_in_executor(None, started.wait, 10)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            assert stopped.is_set()  # the work had stopped when the cancellation arrived
            done = steps[0]
            await asyncio.sleep(0.05)
            assert steps[0] == done < 100_000

    asyncio.run(main())
