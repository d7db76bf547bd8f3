"""The work queue: one worker thread runs every engine call (one GPU, one model set), taking
tasks round-robin across clients so that one client's long queue never starves another's.

Each task keeps its own progress, interrupt and skip flags; nothing one task does reaches
another. Clients are keyed by the HTTP basic-auth user, or by address without auth.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections import OrderedDict, deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import torch

from engine.sampling import StopSampling

log = logging.getLogger(__name__)

# How many finished task ids /internal/progress remembers as "completed" (webui keeps all).
FINISHED_MEMORY = 1024


@dataclass
class Task:
    """One queued request: what to run, who asked, and where it is."""

    client: str
    job: str  # webui's state.job: the endpoint, then "Batch k out of n"
    run: Callable[[Task], Any]
    id: str = field(default_factory=lambda: f"task({uuid.uuid4().hex[:15]})")
    n_iter: int = 1
    passes: int = 1  # sampler passes per batch (2 with hires fix, as webui counts jobs)
    future: Future[Any] = field(default_factory=Future)
    queued_at: float = field(default_factory=time.time)
    started_at: float | None = None
    # Progress, written by the worker thread, read by /progress (plain values; no lock needed).
    job_no: int = 0
    sampling_step: int = 0  # webui's state values: sampler steps, not model calls
    sampling_steps: int = 0
    call: int = 0  # the pass' model calls so far (a new pass starts again at 1)
    interrupted: bool = False
    skipped: bool = False
    latest: tuple[torch.Tensor, bool] | None = None  # first image's x0 prediction, sdxl
    preview_id: int = 0  # counts observed latents (webui's id_live_preview)

    # ---- the engine's progress callback (engine/sampling.py: Progress, LatentObserver)

    def __call__(self, call: int, calls: int) -> None:
        if call < self.call or call == self.call == 1:
            self.job_no += 1  # a new pass (hires, the next batch) restarts at call 1
        self.call = call
        if self.interrupted:
            raise StopSampling()
        if self.skipped:
            self.skipped = False  # webui: a skip ends the current batch only
            raise StopSampling(skip=True)

    def observe(self, denoised: torch.Tensor, sdxl: bool, step: int, steps: int) -> None:
        self.latest = (denoised[0].detach(), sdxl)
        self.preview_id += 1
        self.sampling_step, self.sampling_steps = step, steps

    # ---- state

    @property
    def job_count(self) -> int:
        return max(self.n_iter * self.passes, self.job_no + 1)

    def job_text(self) -> str:
        """webui's state.job while a batch runs."""
        if self.n_iter > 1 and self.running:
            return f"Batch {self.job_no // self.passes + 1} out of {self.n_iter}"
        return self.job

    @property
    def running(self) -> bool:
        return self.started_at is not None and not self.future.done()

    def progress(self) -> float:
        """webui's progress: 0.01 + finished passes plus the current pass' share."""
        if not self.running:
            return 1.0 if self.future.done() else 0.0
        count = self.job_count
        value = 0.01 + self.job_no / count
        if self.sampling_steps:
            value += self.sampling_step / self.sampling_steps / count
        return min(value, 1.0)

    def eta_relative(self) -> float:
        if self.started_at is None:
            return 0.0
        elapsed = time.time() - self.started_at
        return elapsed / max(self.progress(), 0.01) - elapsed


class FairQueue:
    """Tasks per client, served round-robin; one worker thread runs them in turn."""

    def __init__(self) -> None:
        self._lanes: OrderedDict[str, deque[Task]] = OrderedDict()
        self._cond = threading.Condition()
        self._closed = False
        self._served: dict[str, int] = {}  # client -> the turn it was last served
        self._turn = 0
        self.current: Task | None = None
        self.tasks: dict[str, Task] = {}  # queued and running, by id
        self.finished: OrderedDict[str, None] = OrderedDict()
        self._worker = threading.Thread(target=self._work, name="sdapi-worker", daemon=True)
        self._worker.start()

    def submit(self, task: Task) -> Task:
        with self._cond:
            if self._closed:
                raise RuntimeError("the server is shutting down")
            self._lanes.setdefault(task.client, deque()).append(task)
            self.tasks[task.id] = task
            self._cond.notify()
        return task

    def queued(self) -> list[Task]:
        """Waiting tasks in the order they will run (turns by client, as `_take` picks)."""
        with self._cond:
            served = dict(self._served)
            lanes = {client: list(lane) for client, lane in self._lanes.items()}
        order: list[Task] = []
        turn = self._turn
        while lanes:
            client = min(lanes, key=lambda c: served.get(c, -1))
            order.append(lanes[client].pop(0))
            if not lanes[client]:
                del lanes[client]
            turn += 1
            served[client] = turn
        return order

    def running_for(self, client: str) -> Task | None:
        task = self.current
        return task if task is not None and task.client == client else None

    def latest_for(self, client: str) -> Task | None:
        """The client's running task, else its next queued one."""
        running = self.running_for(client)
        if running is not None:
            return running
        with self._cond:
            lane = self._lanes.get(client)
            return lane[0] if lane else None

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._worker.join(timeout=5)

    def _take(self) -> Task | None:
        with self._cond:
            while not self._lanes and not self._closed:
                self._cond.wait()
            if self._closed:
                return None
            # Fair turns: the client served longest ago (a newcomer: never) goes next.
            client = min(self._lanes, key=lambda c: self._served.get(c, -1))
            lane = self._lanes[client]
            task = lane.popleft()
            if not lane:
                del self._lanes[client]
            self._turn += 1
            self._served[client] = self._turn
            self.current = task
            return task

    def _work(self) -> None:
        while (task := self._take()) is not None:
            task.started_at = time.time()
            error: Exception | None = None
            result: Any = None
            try:
                result = task.run(task)
            except Exception as exc:  # noqa: BLE001 (handed to the waiting HTTP handler)
                error = exc
            # Book-keeping first, so a client that has its answer finds the task completed.
            with self._cond:
                self.current = None
                self.tasks.pop(task.id, None)
                self.finished[task.id] = None
                while len(self.finished) > FINISHED_MEMORY:
                    self.finished.popitem(last=False)
            if error is not None:
                task.future.set_exception(error)
            else:
                task.future.set_result(result)
