"""Out of memory at each place it can happen outside the batch loop (setup, first-use loads of
a LoRA, a VAE file, a ControlNet) and in the decode: a clear error naming what was being
loaded or run with the memory figures, nothing blamed on the user's file, and the next request
gives the same pixels as an engine that never failed. (Inside the UNet: tests/test_hostile.py.)"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch

from engine.api import Engine, EngineConfig
from engine.oom import OutOfMemory

from .helpers import b64_png, card_image, payload, pixels

CARD = b64_png(card_image(64, 64))
LORA = payload(prompt="a lighthouse <lora:tiny-lora-sd15:1>")
VAE = payload(override_settings={"sd_vae": "tiny-vae.safetensors"})
UNIT = {"module": "canny", "model": "tiny-controlnet-sd15", "image": CARD}
CONTROLNET = payload(alwayson_scripts={"controlnet": {"args": [UNIT]}})


@pytest.fixture(scope="module")
def fresh(tiny_models_dir: Path) -> Engine:
    """An engine whose LoRA, VAE and ControlNet caches start empty (first use loads)."""
    return Engine.setup(
        EngineConfig(models_dir=tiny_models_dir, cache_dir=tiny_models_dir / ".cache")
    )


def oom(*args: Any, **kwargs: Any) -> Any:
    raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")


def picture(engine: Engine, body: str) -> bytes:
    response = engine.handle("txt2img", body, lambda step, total: None)
    return pixels(response.images[0].data).tobytes()


def assert_reported(caught: pytest.ExceptionInfo[OutOfMemory], what: str) -> None:
    message = str(caught.value)
    assert message.startswith(f"Out of memory: {what}"), message
    assert "free" in message and "Tried to allocate" not in message


def test_lora_load(fresh: Engine, engine: Engine, monkeypatch: pytest.MonkeyPatch) -> None:
    pipe_type = type(next(iter(fresh.models.cache.loaded.values())).pipe)
    monkeypatch.setattr(pipe_type, "load_lora_weights", oom)
    with pytest.raises(OutOfMemory) as caught:
        picture(fresh, LORA)
    assert_reported(caught, "loading LoRA tiny-lora-sd15")
    monkeypatch.undo()
    assert picture(fresh, LORA) == picture(engine, LORA)


def test_vae_file_load(fresh: Engine, engine: Engine, monkeypatch: pytest.MonkeyPatch) -> None:
    from diffusers import AutoencoderKL

    monkeypatch.setattr(AutoencoderKL, "from_single_file", oom)
    with pytest.raises(OutOfMemory) as caught:
        picture(fresh, VAE)
    assert_reported(caught, "loading VAE tiny-vae.safetensors")
    monkeypatch.undo()
    assert picture(fresh, VAE) == picture(engine, VAE)


def test_controlnet_load(fresh: Engine, engine: Engine, monkeypatch: pytest.MonkeyPatch) -> None:
    from diffusers import ControlNetModel

    monkeypatch.setattr(ControlNetModel, "from_config", oom)
    with pytest.raises(OutOfMemory) as caught:
        picture(fresh, CONTROLNET)
    assert_reported(caught, "loading ControlNet tiny-controlnet-sd15")
    monkeypatch.undo()
    assert picture(fresh, CONTROLNET) == picture(engine, CONTROLNET)


def test_decode(fresh: Engine, engine: Engine, monkeypatch: pytest.MonkeyPatch) -> None:
    import engine.vae_precision as precision

    monkeypatch.setattr(precision, "decode_pixels", oom)
    with pytest.raises(OutOfMemory) as caught:
        picture(fresh, payload(batch_size=2))
    assert_reported(caught, "generating 2 image(s) of 64x64")
    assert "batch_size" in str(caught.value)
    monkeypatch.undo()
    assert picture(fresh, payload()) == picture(engine, payload())


def test_setup(tiny_models_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from diffusers import StableDiffusionPipeline

    (tmp_path / "checkpoints").mkdir()
    shutil.copy(tiny_models_dir / "checkpoints" / "tiny-sd15.safetensors", tmp_path / "checkpoints")
    monkeypatch.setattr(StableDiffusionPipeline, "from_single_file", oom)
    with pytest.raises(OutOfMemory) as caught:
        Engine.setup(EngineConfig(models_dir=tmp_path, cache_dir=tmp_path / ".cache"))
    assert_reported(caught, "loading checkpoint tiny-sd15.safetensors")
    monkeypatch.undo()
    engine = Engine.setup(EngineConfig(models_dir=tmp_path, cache_dir=tmp_path / ".cache"))
    info = json.loads(engine.handle("txt2img", payload(), lambda s, t: None).info)
    assert info["sd_model_name"] == "tiny-sd15"
