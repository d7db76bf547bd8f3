"""Several requests in one engine at once (engine/step_batcher.py): their UNet steps are batched
together, and each still gets the picture it gets alone.

Each concurrent result is compared, in decoded pixels, with the same request served alone;
the largest difference measured is printed (rows of a larger batch go through other matrix
kernel blockings, so exact equality is not promised: 1 level in 8 bits is)."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest
import torch

from engine.api import Engine, Response
from engine.errors import ModelLoadError
from engine.step_batcher import (
    CANCEL_POLL_S,
    StepBatcher,
    UNetCall,
    call_key,
    cancellable,
    chunks,
    run_batched,
    sessions_from_env,
)

from .helpers import CONTROLNET_UNIT, b64_png, card_image, payload, pixels, with_model

LORA = "<lora:tiny-lora-sd15:1>"
MAX_LEVELS = 1  # the most a concurrent picture may differ from the lone one, per channel


MIXED = {
    "euler": payload(seed=11),
    "dpmpp": payload(seed=12, sampler_name="DPM++ 2M", steps=6),
    "lora": payload(seed=13, prompt="a lighthouse " + LORA),
    "lora-half": payload(seed=13, prompt="a lighthouse <lora:tiny-lora-sd15:0.5>"),
    "wide": payload(seed=14, width=96),
    "batch2": payload(seed=15, batch_size=2),
    "img2img": payload(seed=16, init_images=[b64_png(card_image(64, 64))], denoising_strength=0.6),
    "sdxl": with_model("tiny-sdxl", seed=17),
    "ancestral": payload(seed=18, sampler_name="Euler a", steps=5),
    "controlnet": payload(seed=19, alwayson_scripts={"controlnet": {"args": [CONTROLNET_UNIT]}}),
}


def _arrays(response: Response) -> list[np.ndarray]:
    return [np.asarray(pixels(img.data), dtype=np.int16) for img in response.images]


def _endpoint(body: str) -> str:
    return "img2img" if "init_images" in body else "txt2img"


def _concurrently(
    engine: Engine, bodies: dict[str, str], progress: dict[str, Callable[[int, int], None]]
) -> dict[str, Any]:
    """Run every body in its own thread, all released at once; name -> Response or error."""
    results: dict[str, Any] = {}
    start = threading.Barrier(len(bodies))

    def work(name: str, body: str) -> None:
        start.wait()
        try:
            results[name] = engine.handle(
                _endpoint(body), body, progress.get(name, lambda s, t: None)
            )
        except BaseException as exc:  # noqa: BLE001 - the test inspects it
            results[name] = exc

    threads = [threading.Thread(target=work, args=item) for item in bodies.items()]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=600)
    assert not any(t.is_alive() for t in threads), "a concurrent request never finished"
    return results


@pytest.fixture(scope="module")
def alone(engine: Engine) -> dict[str, list[np.ndarray]]:
    return {name: _arrays(engine.handle(_endpoint(body), body)) for name, body in MIXED.items()}


@pytest.fixture()
def wide_door(engine: Engine) -> Iterator[StepBatcher]:
    batcher = engine.models.cache.batcher
    saved = batcher.max_sessions
    batcher.max_sessions = 16
    batcher.batch_rows.clear()
    yield batcher
    batcher.max_sessions = saved


def _largest_difference(a: list[np.ndarray], b: list[np.ndarray]) -> int:
    assert len(a) == len(b)
    return max(int(np.abs(x - y).max()) for x, y in zip(a, b, strict=True))


def test_concurrent_requests_batch_their_steps_and_keep_their_pictures(
    engine: Engine, alone: dict[str, list[np.ndarray]], wide_door: StepBatcher
) -> None:
    results = _concurrently(engine, MIXED, {})
    worst = 0
    for name, result in results.items():
        assert isinstance(result, Response), f"{name}: {result!r}"
        diff = _largest_difference(_arrays(result), alone[name])
        worst = max(worst, diff)
        assert diff <= MAX_LEVELS, f"{name} differs by {diff} levels from the request alone"
    print(f"largest difference from the lone pictures: {worst} level(s)")
    # Batching happened: some UNet call held rows of several requests (one request alone
    # gives at most 4 rows: batch 2 with its negative).
    assert max(wide_door.batch_rows) > 4, dict(wide_door.batch_rows)


def test_a_failing_or_cancelled_request_leaves_its_batch_mates_unchanged(
    engine: Engine, alone: dict[str, list[np.ndarray]], wide_door: StepBatcher
) -> None:
    class Cancelled(Exception):
        pass

    def cancel_at_two(step: int, total: int) -> None:
        if step >= 2:
            raise Cancelled

    bodies = {
        "euler": MIXED["euler"],
        "lora": MIXED["lora"],
        "cancelled": payload(seed=99, steps=8, prompt="doomed " + LORA),
        "refused": payload(width=123),  # not a multiple of 8: refused before any model work
    }
    results = _concurrently(engine, bodies, {"cancelled": cancel_at_two})
    assert isinstance(results["cancelled"], Cancelled)
    assert "width" in str(results["refused"])
    for name in ("euler", "lora"):
        assert isinstance(results[name], Response), results[name]
        assert _largest_difference(_arrays(results[name]), alone[name]) <= MAX_LEVELS
    # Nothing left behind: the next request alone gives the same picture as before.
    after = _arrays(engine.handle("txt2img", MIXED["lora"]))
    assert _largest_difference(after, alone["lora"]) == 0


def test_tiling_runs_alone_and_changes_no_other_request(
    engine: Engine, alone: dict[str, list[np.ndarray]], wide_door: StepBatcher
) -> None:
    tiled_body = payload(seed=21, tiling=True)
    tiled_alone = _arrays(engine.handle("txt2img", tiled_body))
    results = _concurrently(engine, {"tiled": tiled_body, "euler": MIXED["euler"]}, {})
    assert _largest_difference(_arrays(results["tiled"]), tiled_alone) <= MAX_LEVELS
    assert _largest_difference(_arrays(results["euler"]), alone["euler"]) <= MAX_LEVELS


def test_a_short_request_finishes_while_a_long_one_runs(
    engine: Engine, wide_door: StepBatcher
) -> None:
    long_steps = 150
    seen: list[int] = []
    started = threading.Event()

    def long_progress(step: int, total: int) -> None:
        seen.append(step)
        if step >= 2:
            started.set()

    holder: dict[str, Any] = {}
    long_thread = threading.Thread(
        target=lambda: holder.setdefault(
            "long", engine.handle("txt2img", payload(steps=long_steps), long_progress)
        )
    )
    long_thread.start()
    assert started.wait(timeout=300)
    short = engine.handle("txt2img", payload(steps=4, seed=5))
    steps_at_short_end = max(seen)
    long_thread.join(timeout=900)
    assert len(short.images) == 1
    assert steps_at_short_end < long_steps, "the short request waited for the long one"
    assert isinstance(holder.get("long"), Response)


def test_the_door_admits_at_most_max_sessions(engine: Engine) -> None:
    batcher = engine.models.cache.batcher
    saved = batcher.max_sessions
    batcher.max_sessions = 2
    most = 0
    lock = threading.Lock()

    def watch(step: int, total: int) -> None:
        nonlocal most
        with lock:
            most = max(most, batcher.active_sessions())

    try:
        bodies = {f"r{i}": payload(seed=30 + i) for i in range(4)}
        results = _concurrently(engine, bodies, {name: watch for name in bodies})
    finally:
        batcher.max_sessions = saved
    assert all(isinstance(r, Response) for r in results.values())
    assert most == 2


# ---- pure parts


def test_batched_unet_rows_equal_separate_calls(engine: Engine) -> None:
    unet = engine.models.cache.loaded[engine.models.default.title].pipe.unet
    gen = torch.Generator().manual_seed(0)

    def call(rows: int, t: float) -> UNetCall:
        sample = torch.randn(rows, 4, 8, 8, generator=gen)
        embeds = torch.randn(rows, 77, unet.config.cross_attention_dim, generator=gen)
        return UNetCall(unet, sample, torch.full((rows,), t), {"encoder_hidden_states": embeds})

    calls = [call(2, 999.0), call(4, 500.0), call(2, 1.0)]
    with torch.inference_mode():
        alone = [unet(c.sample, c.timestep, **c.kwargs).sample for c in calls]
        run_batched(calls)
    for single, call_ in zip(alone, calls, strict=True):
        assert call_.result is not None
        torch.testing.assert_close(call_.result, single, rtol=1e-4, atol=1e-5)


def test_keys_separate_what_cannot_share_a_call(engine: Engine) -> None:
    unet = engine.models.cache.loaded[engine.models.default.title].pipe.unet

    def call(h: int, seq: int = 77, dtype: torch.dtype = torch.float32) -> UNetCall:
        return UNetCall(
            unet,
            torch.zeros(2, 4, h, 8, dtype=dtype),
            torch.zeros(2),
            {"encoder_hidden_states": torch.zeros(2, seq, 32)},
        )

    assert call_key(call(8)) == call_key(call(8))
    assert call_key(call(8)) != call_key(call(16))  # latent size
    assert call_key(call(8)) != call_key(call(8, seq=154))  # prompt length
    assert call_key(call(8)) != call_key(call(8, dtype=torch.float16))
    other = call(8)
    other.unet = torch.nn.Identity()
    assert call_key(call(8)) != call_key(other)


def test_chunks_respect_the_row_limit() -> None:
    def rows(n: int) -> UNetCall:
        return UNetCall(None, torch.zeros(n, 1), torch.zeros(n), {})

    groups = chunks([rows(2), rows(2), rows(4), rows(6), rows(2)], max_rows=6)
    assert [[c.rows for c in g] for g in groups] == [[2, 2], [4], [6], [2]]


def test_concurrency_setting() -> None:
    assert sessions_from_env(None, {"SD_MAX_CONCURRENCY": "3"}) == 3
    assert sessions_from_env(None, {}) == 4
    assert sessions_from_env(40 * 2**30, {}) == 8
    assert sessions_from_env(3 * 2**30, {}) == 1
    with pytest.raises(ModelLoadError, match="SD_MAX_CONCURRENCY"):
        sessions_from_env(None, {"SD_MAX_CONCURRENCY": "0"})


class _PickyUNet(torch.nn.Module):
    """A stand-in UNet (not diffusers: only the batcher's splitting is under test) that runs
    out of memory above `limit` rows and fails on a NaN input, like a real one would."""

    def __init__(self, limit: int) -> None:
        super().__init__()
        self.limit = limit
        self.sizes: list[int] = []

    def forward(self, sample: torch.Tensor, t: torch.Tensor, **_: Any) -> Any:
        self.sizes.append(sample.shape[0])
        if sample.shape[0] > self.limit:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        if torch.isnan(sample).any():
            raise ValueError("NaN input")
        return type("Out", (), {"sample": sample * 2 + t.view(-1, 1)})()


def test_out_of_memory_splits_the_batch_and_every_member_succeeds() -> None:
    unet = _PickyUNet(limit=2)
    batcher = StepBatcher(max_rows=16)

    def calls() -> list[UNetCall]:
        return [UNetCall(unet, torch.full((1, 3), float(i)), torch.ones(1), {}) for i in range(4)]

    first = calls()
    batcher.run_round(first)
    assert unet.sizes == [4, 2, 2]  # tried together first, then halves
    for i, call in enumerate(first):
        assert call.error is None
        assert call.result is not None and torch.equal(call.result, torch.full((1, 3), 2.0 * i + 1))
    # The next round of the same shape stays below what failed: no second out of memory.
    unet.sizes.clear()
    batcher.run_round(calls())
    assert unet.sizes == [2, 2]


def test_a_call_that_fails_fails_alone() -> None:
    unet = _PickyUNet(limit=16)
    calls = [UNetCall(unet, torch.ones(1, 3), torch.ones(1), {}) for _ in range(3)]
    calls[1].sample = torch.full((1, 3), float("nan"))
    StepBatcher().run_round(calls)
    assert isinstance(calls[1].error, ValueError)
    assert calls[0].result is not None and calls[2].result is not None
    assert calls[0].error is None and calls[2].error is None


def test_text_encoding_runs_beside_other_requests_steps(
    engine: Engine, wide_door: StepBatcher, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A request's prompt encoding (made slow here) does not hold the others' steps."""
    import time

    import engine.conditioning as conditioning

    real = conditioning.run_encoder
    windows: list[tuple[float, float]] = []

    def slow(*args: Any, **kwargs: Any) -> Any:
        if threading.current_thread().name == "slow-encoder":
            started = time.perf_counter()
            time.sleep(0.4)
            windows.append((started, time.perf_counter()))
        return real(*args, **kwargs)

    monkeypatch.setattr(conditioning, "run_encoder", slow)
    steps_at: list[float] = []
    sampling = threading.Event()

    def long_progress(step: int, total: int) -> None:
        steps_at.append(time.perf_counter())
        if step >= 2:
            sampling.set()

    results: dict[str, Any] = {}
    long = threading.Thread(
        target=lambda: results.update(
            long=engine.handle("txt2img", payload(steps=80, seed=3), long_progress)
        )
    )
    long.start()
    assert sampling.wait(timeout=300)
    slow_one = threading.Thread(
        name="slow-encoder",
        target=lambda: results.update(
            slow=engine.handle("txt2img", payload(prompt="a slowly encoded prompt", seed=4))
        ),
    )
    slow_one.start()
    slow_one.join(timeout=300)
    long.join(timeout=300)
    assert isinstance(results.get("slow"), Response) and isinstance(results.get("long"), Response)
    assert windows, "the slow encoder never ran"
    during = [t for t in steps_at if any(a <= t <= b for a, b in windows)]
    assert len(during) >= 2, f"{len(during)} steps of the other request during the encoding"


class _Stop(BaseException):
    """A caller's own cancellation (predict.py raises its Cancelled)."""


def test_a_request_cancelled_while_it_waits_to_start_leaves_at_once() -> None:
    """At the door (SD_MAX_CONCURRENCY full) and while waiting for memory, a cancelled request
    leaves within a poll instead of at its first step, and the line moves on."""
    batcher = StepBatcher(max_sessions=1)
    inside, release, stop = threading.Event(), threading.Event(), threading.Event()
    outcome: dict[str, str] = {}

    def check() -> None:
        if stop.is_set():
            raise _Stop

    def holder() -> None:
        with batcher.session():
            inside.set()
            release.wait(30)

    def waiter(name: str, wait: Callable[[], Any]) -> None:
        try:
            with cancellable(check):
                wait()
            outcome[name] = "went on"
        except _Stop:
            outcome[name] = "cancelled"

    def at_door() -> None:
        with batcher.session():
            pass

    first = threading.Thread(target=holder, daemon=True)
    first.start()
    assert inside.wait(10)
    door = threading.Thread(target=waiter, args=("door", at_door), daemon=True)
    memory = threading.Thread(
        target=waiter,
        args=("memory", lambda: batcher.wait_for_an_end(timeout=60)),
        daemon=True,
    )
    door.start()
    memory.start()
    door.join(0.5)
    assert door.is_alive() and memory.is_alive() and outcome == {}  # both waiting
    stop.set()
    door.join(5 * CANCEL_POLL_S + 1)
    memory.join(5 * CANCEL_POLL_S + 1)
    assert outcome == {"door": "cancelled", "memory": "cancelled"}
    assert first.is_alive()  # the running request was not waited for
    stop.clear()
    nxt = threading.Thread(target=waiter, args=("next", at_door), daemon=True)
    nxt.start()
    release.set()
    for thread in (first, nxt):
        thread.join(10)
    assert outcome["next"] == "went on"  # the cancelled one left no ticket at the door
