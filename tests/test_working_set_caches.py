"""The request-filled caches under the one device budget (engine/working_set.py): VAE files,
ControlNets, upscalers and LoRA adapters are entries beside the checkpoints, evicted least
recently used first across kinds; what a request holds (its lease) is never evicted; pinned
host memory is a CUDA-only decision.

The unit tests watch moves through modules that record where they are sent (this CPU has one
memory); the engine tests run the real caches with a budget that holds the checkpoint and one
VAE file, and check the memory from torch storage sizes and the pictures against an engine
without a budget, whatever tier an entry came from."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from engine.api import Engine, EngineConfig
from engine.oom import OutOfMemory
from engine.working_set import (
    BUDGET_ENV,
    DROPPED,
    PINNED_ENV,
    TO_HOST,
    Entry,
    WorkingSet,
    module_entry,
    module_tensors,
    pinned_limit_from_env,
    pinned_size,
    pipe_modules,
    should_pin,
    tensor_bytes,
    to_pinned_host,
)

from .helpers import SD1, b64_png, card_image, payload

MiB = 2**20


class Recorder(torch.nn.Linear):
    """A module that records where it is sent instead of moving (the CPU has one memory)."""

    def __init__(self, size: int, log: list[tuple[str, str]], name: str) -> None:
        super().__init__(size, size, bias=False)
        self.log, self.name = log, name

    def to(self, *args: Any, **kwargs: Any) -> Recorder:
        self.log.append((self.name, str(args[0])))
        return self


class Adapter(Recorder):
    """A LoRA adapter's weights inside a checkpoint; peft lists its adapters on the module."""

    peft_config: dict[str, Any]


class Pipe:
    def __init__(self, **components: torch.nn.Module) -> None:
        self.components = components


def storage_bytes(*modules: torch.nn.Module) -> int:
    """What the modules hold, from torch's storages (each storage once)."""
    seen: dict[int, int] = {}
    for module in modules:
        for tensor in [*module.parameters(), *module.buffers()]:
            storage = tensor.untyped_storage()
            seen[storage.data_ptr()] = storage.nbytes()
    return sum(seen.values())


def keys(working: WorkingSet) -> list[str]:
    return [f"{kind}:{name}" for kind, name in working.resident]


# ---- unit: LRU across kinds, leases, drops


def small_set(
    log: list[tuple[str, str]], budget: int | None
) -> tuple[WorkingSet, dict[str, Recorder]]:
    """A checkpoint of 400 bytes (10x10 float32) and three 400-byte cache modules."""
    working = WorkingSet("dev", budget, host="host")
    working.admit("ckpt", Pipe(unet=Recorder(10, log, "ckpt.unet")))
    made = {kind: Recorder(10, log, kind) for kind in ("vae", "controlnet", "upscaler")}
    return working, made


def test_least_recently_used_across_kinds_leaves_first() -> None:
    log: list[tuple[str, str]] = []
    working, made = small_set(log, 1200)  # the checkpoint and two caches
    for kind in ("vae", "controlnet"):
        with working.lease():
            working.use(module_entry(kind, "x", made[kind]))
    assert keys(working) == ["checkpoint:ckpt", "vae:x", "controlnet:x"] and log == []
    with working.lease():
        working.acquire(["ckpt"])  # the checkpoint is now the most recently used
    with working.lease():
        working.use(module_entry("upscaler", "x", made["upscaler"]))
    # The VAE was the least recently used of any kind: it waits on the host.
    assert log == [("vae", "host")]
    assert keys(working) == ["controlnet:x", "checkpoint:ckpt", "upscaler:x"]
    assert working.resident_bytes() == storage_bytes(made["controlnet"], made["upscaler"]) + 400
    log.clear()
    with working.lease():
        working.use(module_entry("vae", "x", made["vae"]))  # back from the host tier
    assert log == [("controlnet", "host"), ("vae", "dev")]
    assert [(label, d) for label, d, _ in working.moves[-2:]] == [
        ("ControlNet x", TO_HOST),
        ("VAE x", "to device"),
    ]


def test_what_a_running_request_holds_is_never_evicted() -> None:
    log: list[tuple[str, str]] = []
    working, made = small_set(log, 1200)
    with working.lease():  # request 1, still running below
        working.acquire(["ckpt"])
        working.use(module_entry("vae", "x", made["vae"]))
        with working.lease():  # request 2 starts meanwhile: room for one more 400 bytes
            working.use(module_entry("controlnet", "x", made["controlnet"]))
        with working.lease():  # request 3: the controlnet (free now) leaves, nothing pinned
            working.use(module_entry("upscaler", "x", made["upscaler"]))
        assert log == [("controlnet", "host")]
        with working.lease(), pytest.raises(OutOfMemory) as caught:
            working.use(module_entry("controlnet", "y", Recorder(20, log, "big")))  # 1600 bytes
        assert "ControlNet y" in str(caught.value) and BUDGET_ENV in str(caught.value)
        log.clear()
        with working.lease(), pytest.raises(OutOfMemory) as caught:
            # 800 bytes beside request 1's 800 pinned ones: nothing it holds may go.
            working.use(module_entry("controlnet", "z", Recorder(14, log, "mid")))
        message = str(caught.value)
        assert "VAE x" in message and "ckpt" in message and "running now" in message
        assert log == [("mid", "host")]  # the newcomer waits on the host; nothing else moved
        assert {"checkpoint:ckpt", "vae:x"} <= set(keys(working))
    # Request 1 ended: its models may go now.
    with working.lease():
        working.use(module_entry("controlnet", "z", made["controlnet"]))
    assert not working.pinned(("vae", "x")) and "controlnet:z" in keys(working)


def test_a_lora_adapter_is_dropped_and_moves_with_its_checkpoint() -> None:
    log: list[tuple[str, str]] = []
    working = WorkingSet("dev", 1200, host="host")
    # A checkpoint of 500 bytes, 100 of them a LoRA adapter's weights inside its modules.
    adapter = Adapter(5, log, "ckpt.lora")
    adapter.peft_config = {"l": None}  # as peft marks the modules it adds adapters to
    working.admit("ckpt", Pipe(unet=Recorder(10, log, "ckpt.unet"), lora=adapter))
    busy, dropped = [False], []

    def drop() -> bool:
        if busy[0]:
            return False  # its manager is applying LoRAs for a generation
        dropped.append("lora")
        adapter.weight = torch.nn.Parameter(torch.empty(0))  # as peft deletes its weights
        adapter.peft_config = {}
        return True

    lora = Entry(
        "lora", "l in ckpt", tensors=lambda: [adapter.weight], parent=("checkpoint", "ckpt")
    )
    lora.drop = drop
    with working.lease():
        working.use(lora)
    assert keys(working) == ["checkpoint:ckpt", "lora:l in ckpt"]
    assert working.resident_bytes() == 500  # its bytes are its checkpoint's: counted once
    assert working.resident_bytes([("checkpoint", "ckpt")]) == 400  # without it
    # Its checkpoint leaves to the host: the adapter goes with it, and comes back with it.
    working.admit("other", Pipe(unet=Recorder(17, log, "other.unet")))  # 1156: to the host
    with working.lease():
        working.acquire(["other"])
    assert keys(working) == ["checkpoint:other"] and ("ckpt.lora", "host") in log
    with working.lease():
        working.acquire(["ckpt"])
    # Back with it, as less recently used than the checkpoint (this request did not use it).
    assert keys(working) == ["lora:l in ckpt", "checkpoint:ckpt"]
    # Under pressure the adapter is deleted, unless its manager is busy: then nothing can go.
    made = {kind: Recorder(10, log, kind) for kind in ("vae", "controlnet")}
    busy[0] = True
    with working.lease():
        working.acquire(["ckpt"])
        working.use(module_entry("vae", "x", made["vae"]))
        with pytest.raises(OutOfMemory) as caught:
            working.use(module_entry("controlnet", "x", made["controlnet"]))
        assert "LoRA l in ckpt" in str(caught.value)
    assert dropped == [] and "lora:l in ckpt" in keys(working)
    busy[0] = False
    with working.lease():
        working.acquire(["ckpt"])
        working.use(module_entry("controlnet", "x", made["controlnet"]))
    assert dropped == ["lora"] and ("lora", "l in ckpt") not in working.entries
    assert ("LoRA l in ckpt", DROPPED) in [(label, d) for label, d, _ in working.moves]
    assert keys(working) == ["vae:x", "checkpoint:ckpt", "controlnet:x"]


def test_no_budget_registers_nothing_and_moves_nothing() -> None:
    log: list[tuple[str, str]] = []
    working, made = small_set(log, None)
    with working.lease():
        for kind, module in made.items():
            working.use(module_entry(kind, "x", module))
    assert keys(working) == ["checkpoint:ckpt"] and log == [] and working.moves == []


# ---- pinned host memory: the decision, and nothing pinned on the CPU


@pytest.mark.parametrize(
    ("device", "host", "nbytes", "pinned", "limit", "expected"),
    [
        ("cuda", "cpu", 100, 0, 1000, True),
        ("cuda", "cpu", 100, 900, 1000, True),  # exactly at the limit
        ("cuda", "cpu", 100, 901, 1000, False),  # over the limit: pageable memory
        ("cuda", "cpu", 100, 0, 0, False),  # SD_PINNED_MEMORY=0
        ("cuda", "cpu", 0, 0, 1000, False),  # nothing to copy
        ("cpu", "cpu", 100, 0, 1000, False),  # the CPU: no copy to speed up
        ("mps", "cpu", 100, 0, 1000, False),
    ],
)
def test_pin_decision(
    device: str, host: str, nbytes: int, pinned: int, limit: int, expected: bool
) -> None:
    assert should_pin(device, host, nbytes, pinned, limit) is expected


def test_pinned_limits_and_sizes() -> None:
    assert pinned_limit_from_env("cpu", {PINNED_ENV: "8GiB"}) == 0  # never off CUDA
    assert pinned_limit_from_env("cuda", {PINNED_ENV: "0"}) == 0
    assert pinned_limit_from_env("cuda", {PINNED_ENV: "2GiB"}) == 2 * 2**30
    assert pinned_limit_from_env("cuda", {}) > 0
    # torch's pinned allocator rounds each block up to a power of two.
    sizes = [torch.empty(n, dtype=torch.uint8) for n in (1, 3, 4, 1000, 0)]
    assert pinned_size(sizes) == 1 + 4 + 4 + 1024


def test_moving_to_the_host_on_the_cpu_pins_nothing() -> None:
    working = WorkingSet("cpu", 500, pinned_limit=2**40)
    modules = [torch.nn.Linear(10, 10, bias=False) for _ in range(2)]
    before = [m.weight.detach().clone() for m in modules]
    for index, module in enumerate(modules):
        with working.lease():
            working.use(module_entry("vae", str(index), module))
    assert [d for _, d, _ in working.moves] == [TO_HOST]
    assert working.pinned_bytes == 0
    assert not any(m.weight.is_pinned() for m in modules)
    assert all(torch.equal(m.weight, b) for m, b in zip(modules, before, strict=True))
    # The pinned copy itself only takes tensors that are on a CUDA device.
    storage = modules[0].weight.untyped_storage().data_ptr()
    to_pinned_host(modules[0])
    assert modules[0].weight.untyped_storage().data_ptr() == storage


def test_pinned_bytes_follow_modules_shared_between_entries(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Checkpoints share modules (a fine-tune's VAE and text encoder): a module pinned when
    one entry left goes back to the device with another entry, and its pinned bytes go with
    it, not when the entry that pinned it returns (which left the total counting memory no
    longer pinned, so later moves stopped pinning too early). CUDA pins; on this CPU the
    decision is forced and the copies are plain."""
    from engine import working_set

    monkeypatch.setattr(working_set, "should_pin", lambda device, host, nbytes, pinned, limit: True)
    shared, own_a, own_b = (torch.nn.Linear(16, 16, bias=False) for _ in range(3))
    size = pinned_size(module_tensors([shared]))  # each module's: 16 x 16 float32
    working = WorkingSet("cpu", 2 * size, pinned_limit=2**40)
    a = Entry("vae", "a", modules=(shared, own_a))
    b = Entry("vae", "b", modules=(shared, own_b))
    with working.lease():
        working.use(a)
    with working.lease():
        working.use(b)  # a leaves (both its modules pinned), then `shared` comes back with b
    assert working.pinned_bytes == size  # own_a only
    with working.lease():
        working.use(a)
    assert working.pinned_bytes == size  # own_b only
    working.forget_entry(b.key)
    assert working.pinned_bytes == 0  # own_b's copy freed; `shared` is on the device with a


# ---- the engine: real caches under a budget for the checkpoint and one VAE file


def pixels(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


@pytest.fixture(scope="module")
def sizes(engine: Engine) -> dict[str, int]:
    """Bytes of the tiny SD1 checkpoint and its caches' models (loaded by the budget-less
    engine), from storage sizes."""
    models = engine.models
    loaded = next(m for t, m in models.cache.loaded.items() if t.startswith(SD1))
    assert models.vaes is not None
    vae = models.vaes.choose("tiny-vae.safetensors", loaded).vae
    # The checkpoint as loaded: without the LoRA adapters earlier tests of the session may
    # have left cached in the shared engine (they would make room for the adapter here).
    base = [
        t
        for module in pipe_modules(loaded.pipe)
        for name, t in [*module.named_parameters(), *module.named_buffers()]
        if ".lora_" not in name
    ]
    return {"checkpoint": tensor_bytes(base), "vae": storage_bytes(vae)}


@pytest.fixture(scope="module")
def cache_engine(
    tiny_models_dir: Path, tmp_path_factory: pytest.TempPathFactory, sizes: dict[str, int]
) -> Any:
    """The SD1 checkpoint, a VAE file, a ControlNet, a LoRA and an upscaler; a budget for
    the checkpoint and the VAE file plus 100 kB (less than the LoRA's adapter)."""
    folder = tmp_path_factory.mktemp("cache-budget")
    for sub, name in [
        ("checkpoints", SD1),
        ("vae", "tiny-vae.safetensors"),
        ("controlnet", "tiny-controlnet-sd15.safetensors"),
        ("loras", "tiny-lora-sd15.safetensors"),
        ("upscalers", "realesr-general-x4v3.pth"),
    ]:
        (folder / sub).mkdir(exist_ok=True)
        shutil.copy(tiny_models_dir / sub / name, folder / sub / name)
    patch = pytest.MonkeyPatch()
    patch.setenv(BUDGET_ENV, str(sizes["checkpoint"] + sizes["vae"] + 100_000))
    try:
        yield Engine.setup(EngineConfig(models_dir=folder, cache_dir=folder / ".cache"))
    finally:
        patch.undo()


VAE = {"override_settings": {"sd_vae": "tiny-vae.safetensors"}}
LORA = {"prompt": "a lighthouse <lora:tiny-lora-sd15:1>"}
CONTROLNET = {
    "alwayson_scripts": {
        "controlnet": {
            "args": [
                {
                    "module": "canny",
                    "model": "tiny-controlnet-sd15",
                    "image": b64_png(card_image(64, 64)),
                    "save_detected_map": False,
                }
            ]
        }
    }
}


def resident_modules(engine: Engine) -> list[torch.nn.Module]:
    working = engine.models.cache.memory
    return [m for key in working.resident for m in working.entries[key].modules]


def check_memory(engine: Engine) -> None:
    """The manager's figure is the storages of what it says is resident, within budget."""
    working = engine.models.cache.memory
    assert working.budget is not None
    working._sizes.clear()
    assert working.resident_bytes() == storage_bytes(*resident_modules(engine))
    assert working.resident_bytes() <= working.budget


def test_caches_share_the_budget_and_give_the_same_pictures(
    cache_engine: Engine, engine: Engine
) -> None:
    working = cache_engine.models.cache.memory
    manager = lambda: next(iter(cache_engine.models.lora_managers.values()))  # noqa: E731

    def run(changes: dict[str, Any]) -> np.ndarray:
        body = payload(**changes)
        image = pixels(cache_engine.handle("txt2img", body).images[0].data)
        check_memory(cache_engine)
        assert not any(working.pinned(k) for k in working.entries)  # leases ended
        assert np.array_equal(image, pixels(engine.handle("txt2img", body).images[0].data))
        return image

    def kinds() -> set[str]:
        return {kind for kind, _ in working.resident}

    # 1. A VAE file loads beside the checkpoint.
    with_vae = run(VAE)
    assert kinds() == {"checkpoint", "vae"}
    # 2. A LoRA adapter does not fit beside both: the VAE file (least recently used) waits
    # on the host.
    with_lora = run(LORA)
    assert kinds() == {"lora", "checkpoint"}
    assert working.moves[-1][0].startswith("VAE tiny-vae") and working.moves[-1][1] == TO_HOST
    # 3. The VAE file again, from the host tier: the adapter is deleted to make room, and the
    # picture is the one the freshly loaded file gave.
    assert np.array_equal(run(VAE), with_vae)
    assert kinds() == {"checkpoint", "vae"} and manager().cached() == []
    assert [d for _, d, _ in working.moves[-2:]] == [DROPPED, "to device"]
    # 4. The LoRA again: read from its file once more, the same picture.
    assert np.array_equal(run(LORA), with_lora)
    assert manager().cached() == ["tiny-lora-sd15"]
    # 5. A ControlNet: the VAE file and the adapter make room as needed.
    run(CONTROLNET)
    assert "controlnet" in kinds() and "vae" not in kinds()
    # 6. An upscaler (extras): counted while it runs, and within the budget after.
    body = json.dumps({"image": b64_png(card_image(32, 32)), "upscaler_1": "R-ESRGAN General 4xV3"})
    cache_engine.handle("extra-single-image", body)
    assert "upscaler" in kinds()
    check_memory(cache_engine)


def test_a_request_cannot_take_what_a_running_request_holds(cache_engine: Engine) -> None:
    working = cache_engine.models.cache.memory
    models = cache_engine.models
    loaded = next(iter(models.cache.loaded.values()))
    assert models.vaes is not None
    with working.lease():  # a request that holds the checkpoint and the VAE file
        working.acquire([loaded.info.title])
        models.vaes.choose("tiny-vae.safetensors", loaded)
        with pytest.raises(OutOfMemory) as caught:  # another one, meanwhile
            cache_engine.handle("txt2img", payload(**CONTROLNET))
        assert "running now" in str(caught.value) and "tiny-controlnet-sd15" in str(caught.value)
        assert {"checkpoint", "vae"} <= {kind for kind, _ in working.resident}
    # Once the first request ended, the same request runs.
    assert cache_engine.handle("txt2img", payload(**CONTROLNET)).images
    check_memory(cache_engine)


def test_bench_memory_runs_and_prints_its_ratios(
    tiny_models_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from scripts import bench_memory

    argv = ["--checkpoints", "2", "--repeats", "1", "--steps", "1", "--tiny", str(tiny_models_dir)]
    assert bench_memory.main(argv) == 0
    printed = capsys.readouterr().out
    for line in ("each storage once", "same checkpoint", "resident", "host tier"):
        assert line in printed
    # Two fine-tunes of one base: their identical VAE and text encoder are stored once.
    shared = next(line for line in printed.splitlines() if "each storage once" in line)
    assert 0.5 < float(shared.split("(")[1].split("x")[0]) < 1


def test_requests_at_once_each_hold_their_models_and_release_them(
    cache_engine: Engine, engine: Engine
) -> None:
    """Two requests in flight together (the step batcher's threads), a budget for everything
    they use: each gets its lone picture, and nothing stays pinned after."""
    from concurrent.futures import ThreadPoolExecutor

    working = cache_engine.models.cache.memory
    assert working.budget is not None
    saved = working.budget
    working.budget = saved + 8 * MiB  # room for the ControlNet and the adapter too
    bodies = {"vae": payload(**VAE), "lora": payload(**LORA)}

    def run(body: str) -> np.ndarray:
        return pixels(cache_engine.handle("txt2img", body).images[0].data)

    try:
        with ThreadPoolExecutor(max_workers=2) as pool:
            futures = {name: pool.submit(run, body) for name, body in bodies.items()}
            got = {name: future.result() for name, future in futures.items()}
    finally:
        working.budget = saved
    for name, body in bodies.items():
        assert np.array_equal(got[name], pixels(engine.handle("txt2img", body).images[0].data))
    assert not any(working.pinned(k) for k in working.entries)


def test_a_request_that_does_not_fit_beside_a_running_one_waits_for_it(
    cache_engine: Engine, engine: Engine, caplog: pytest.LogCaptureFixture
) -> None:
    """Two requests in flight (the step batcher's threads): the second one's ControlNet does
    not fit beside the first one's VAE file, so it waits for the first to end, then runs; both
    get their lone pictures."""
    import threading

    caplog.set_level("INFO", logger="engine.api")
    first_running = threading.Event()
    results: dict[str, Any] = {}

    def first_progress(step: int, total: int) -> None:
        first_running.set()

    def run(name: str, body: str, progress: Any = None) -> None:
        try:
            answer = cache_engine.handle("txt2img", body, progress or (lambda s, t: None))
            results[name] = pixels(answer.images[0].data)
        except Exception as exc:  # noqa: BLE001 - the test inspects it
            results[name] = exc

    bodies = {"vae": payload(steps=12, **VAE), "controlnet": payload(**CONTROLNET)}
    first = threading.Thread(target=run, args=("vae", bodies["vae"], first_progress))
    first.start()
    assert first_running.wait(timeout=300)
    second = threading.Thread(target=run, args=("controlnet", bodies["controlnet"]))
    second.start()
    first.join(timeout=300)
    second.join(timeout=300)
    assert "waiting for a running request to end" in caplog.text  # it did meet the first
    for name, body in bodies.items():
        assert isinstance(results[name], np.ndarray), results[name]
        assert np.array_equal(results[name], pixels(engine.handle("txt2img", body).images[0].data))
    assert not any(
        cache_engine.models.cache.memory.pinned(k) for k in cache_engine.models.cache.memory.entries
    )
