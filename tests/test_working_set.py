"""The device working set (engine/working_set.py): SD_DEVICE_MEMORY, which checkpoints sit on
the device, least-recently-used moves, shared modules counted and kept once, and a request whose
checkpoints cannot fit together refused naming them and the budget.

On this CPU machine host and device are one memory, so the unit tests watch the moves through
modules that record where they were sent; the engine tests check the accounting and that the
pictures are those of an engine without a budget."""

from __future__ import annotations

import io
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from engine.api import Engine, EngineConfig
from engine.errors import ModelLoadError
from engine.oom import OutOfMemory
from engine.working_set import BUDGET_ENV, WorkingSet, budget_from_env, parse_budget, weight_bytes

from .helpers import SD1, payload

GiB = 2**30


@pytest.mark.parametrize(
    ("text", "free", "expected"),
    [
        ("25769803776", None, 25769803776),
        ("24GiB", None, 24 * GiB),
        ("24 GB", None, 24 * 10**9),
        ("512MiB", None, 512 * 2**20),
        ("1.5GiB", None, int(1.5 * GiB)),
        ("0.8", 1000, 800),
        ("1.0", 1000, 1000),
    ],
)
def test_budget_forms(text: str, free: int | None, expected: int) -> None:
    assert parse_budget(text, free) == expected


@pytest.mark.parametrize(
    ("text", "free", "message"),
    [
        ("lots", None, "is not a memory budget"),
        ("24 parsecs", None, "is not a memory budget"),
        ("0", None, "must be positive"),
        ("1.5", 1000, "a fraction must be in"),
        ("0.5", None, "needs a device that reports its free memory"),
    ],
)
def test_bad_budgets_name_the_variable(text: str, free: int | None, message: str) -> None:
    with pytest.raises(ModelLoadError, match=BUDGET_ENV) as caught:
        parse_budget(text, free)
    assert message in str(caught.value)


def test_no_budget_on_the_cpu_unless_asked() -> None:
    assert budget_from_env("cpu", {}) is None
    assert budget_from_env("cpu", {BUDGET_ENV: "2GiB"}) == 2 * GiB


# ---- the working set on recording modules


class Recorder(torch.nn.Linear):
    """A module that records where it is sent instead of moving (the CPU has one memory)."""

    def __init__(self, size: int, log: list[tuple[str, str]], name: str) -> None:
        super().__init__(size, size, bias=False)
        self.log, self.name = log, name

    def to(self, *args: Any, **kwargs: Any) -> Recorder:
        self.log.append((self.name, str(args[0])))
        return self


class Pipe:
    def __init__(self, **components: torch.nn.Module) -> None:
        self.components = components


def pipes(log: list[tuple[str, str]]) -> dict[str, Pipe]:
    """Three 'checkpoints' of 400 bytes each (10x10 float32); b and c share their VAE."""
    vae = Recorder(10, log, "bc.vae")
    return {
        "a": Pipe(unet=Recorder(10, log, "a.unet")),
        "b": Pipe(unet=Recorder(10, log, "b.unet"), vae=vae),
        "c": Pipe(unet=Recorder(10, log, "c.unet"), vae=vae),
    }


def names(working: WorkingSet) -> list[str]:
    return [name for _, name in working.resident]


def test_everything_stays_when_there_is_no_budget() -> None:
    log: list[tuple[str, str]] = []
    working = WorkingSet("dev", None, host="host")
    for title, pipe in pipes(log).items():
        working.admit(title, pipe)
    working.acquire(["a"])
    assert log == [] and names(working) == ["a", "b", "c"]


def test_least_recently_used_moves_out_and_shared_modules_stay() -> None:
    log: list[tuple[str, str]] = []
    made = pipes(log)
    assert weight_bytes(made["b"], made["c"]) == 1200  # the shared VAE once
    working = WorkingSet("dev", 1200, host="host")
    for title, pipe in made.items():
        working.admit(title, pipe)
    # a (400) + b (800) fill the budget; c needs 400 more: it waits on the host, its VAE
    # (shared with resident b) stays on the device.
    assert names(working) == ["a", "b"]
    assert log == [("c.unet", "host")]
    log.clear()
    working.acquire(["c"])  # c: 400 more (its VAE is there): a, the least recently used, goes
    assert log == [("a.unet", "host"), ("c.unet", "dev"), ("bc.vae", "dev")]
    assert names(working) == ["b", "c"]
    assert working.resident_bytes() == 1200 <= 1200
    log.clear()
    working.acquire(["b"])  # resident: nothing moves, b becomes the most recently used
    assert log == [] and names(working) == ["c", "b"]
    working.acquire(["a"])  # now c is the least recently used
    assert log == [("c.unet", "host"), ("a.unet", "dev")]
    assert [(t, d) for t, d, _ in working.moves][-2:] == [("c", "to host"), ("a", "to device")]


def test_a_new_checkpoint_brings_a_module_it_shares_from_the_host() -> None:
    """A checkpoint admitted at setup (or a refresh) that shares a module with one waiting in
    host memory is resident: that module must come to the device with it."""
    log: list[tuple[str, str]] = []
    shared = Recorder(5, log, "s.te")  # 100 bytes
    working = WorkingSet("dev", 1200, host="host")
    working.admit("x", Pipe(unet=Recorder(10, log, "x.unet"), text_encoder=shared))
    working.admit("z", Pipe(unet=Recorder(10, log, "z.unet")))
    working.admit("w", Pipe(unet=Recorder(10, log, "w.unet")))  # 1300 > 1200: to the host
    working.acquire(["w"])  # x, the least recently used, leaves with the shared module
    assert ("s.te", "host") in log and names(working) == ["z", "w"]
    log.clear()
    working.admit("y", Pipe(unet=Recorder(5, log, "y.unet"), text_encoder=shared))
    assert names(working) == ["z", "w", "y"]
    assert log == [("s.te", "dev")]


def test_a_request_that_cannot_fit_is_refused_naming_its_checkpoints() -> None:
    log: list[tuple[str, str]] = []
    working = WorkingSet("dev", 1000, host="host")
    for title, pipe in pipes(log).items():
        working.admit(title, pipe)
    before = (names(working), list(log))
    with pytest.raises(OutOfMemory, match=BUDGET_ENV) as caught:
        working.acquire(["a", "b"])  # 1200 bytes at once > 1000
    assert "a, b" in str(caught.value)
    assert (names(working), log) == before  # refused before anything moved


# ---- the engine with a budget that holds one checkpoint


def pixels(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


@pytest.fixture(scope="module")
def budget_folder(tiny_models_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny SD1 checkpoint (a) and a fine-tune of it (b: its own UNet, the same VAE and
    text encoder, which the pipeline cache stores once)."""
    folder = tmp_path_factory.mktemp("budget-models")
    (folder / "checkpoints").mkdir()
    shutil.copy(tiny_models_dir / "checkpoints" / SD1, folder / "checkpoints" / "a.safetensors")
    state = load_file(str(tiny_models_dir / "checkpoints" / SD1))
    tuned = {
        k: v * -1.5 if k.startswith("model.diffusion_model.out.") else v for k, v in state.items()
    }
    save_file(tuned, str(folder / "checkpoints" / "b.safetensors"))
    return folder


@pytest.fixture(scope="module")
def unbudgeted(budget_folder: Path) -> Engine:
    return Engine.setup(EngineConfig(models_dir=budget_folder, cache_dir=budget_folder / ".c0"))


@pytest.fixture(scope="module")
def budget_engine(
    budget_folder: Path,
    unbudgeted: Engine,
    engine: Engine,
    monkeypatch_module: pytest.MonkeyPatch,
) -> Engine:
    """A budget for one of the two checkpoints (and its VAE and text encoder)."""
    one = weight_bytes(engine.models.cache.loaded[next(iter(engine.models.cache.loaded))].pipe)
    monkeypatch_module.setenv(BUDGET_ENV, str(one + one // 8))
    return Engine.setup(EngineConfig(models_dir=budget_folder, cache_dir=budget_folder / ".c1"))


@pytest.fixture(scope="module")
def monkeypatch_module() -> Any:
    patch = pytest.MonkeyPatch()
    yield patch
    patch.undo()


def titles(engine: Engine) -> list[str]:
    working = engine.models.cache.working
    assert working is not None
    return [name.split(" ")[0] for _, name in working.resident]


def test_one_checkpoint_on_the_device_and_the_same_pictures(
    budget_engine: Engine, unbudgeted: Engine
) -> None:
    working = budget_engine.models.cache.working
    assert working is not None and working.budget is not None
    assert len(working.resident) == 1 and working.resident_bytes() <= working.budget
    for name in ("a", "b", "a"):
        body = payload(override_settings={"sd_model_checkpoint": name})
        answer = budget_engine.handle("txt2img", body)
        reference = unbudgeted.handle("txt2img", body)
        assert titles(budget_engine) == [f"{name}.safetensors"]
        assert np.array_equal(pixels(answer.images[0].data), pixels(reference.images[0].data))
    moved = [(t.split(" ")[0], d) for t, d, _ in working.moves[-2:]]
    assert moved == [("b.safetensors", "to host"), ("a.safetensors", "to device")]


def test_a_hires_checkpoint_that_cannot_join_is_a_clear_error(budget_engine: Engine) -> None:
    body = payload(
        override_settings={"sd_model_checkpoint": "a"},
        enable_hr=True,
        hr_scale=1.5,
        hr_checkpoint_name="b",
        denoising_strength=0.5,
    )
    with pytest.raises(OutOfMemory) as caught:
        budget_engine.handle("txt2img", body)
    message = str(caught.value)
    assert "a.safetensors" in message and "b.safetensors" in message and BUDGET_ENV in message
    # Refused before any model work; the engine still serves.
    assert budget_engine.handle("txt2img", payload()).images
