"""Identical VAEs stored once (engine/pipelines.py): a fine-tune carrying its base's VAE shares
the module, memory counts it once (tensor storage sizes), and no picture changes."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

from engine.api import Engine, EngineConfig
from engine.pipelines import weight_bytes

from .helpers import payload, pixels

SD1 = "tiny-sd15.safetensors"


def _finetune_folder(tiny_models_dir: Path, folder: Path) -> Path:
    """tiny-sd15 and a "fine-tune" of it: other UNet output weights, the same VAE bytes."""
    (folder / "checkpoints").mkdir(parents=True)
    source = tiny_models_dir / "checkpoints" / SD1
    shutil.copy(source, folder / "checkpoints" / SD1)
    state = load_file(str(source))
    for key in [k for k in state if k.startswith("model.diffusion_model.out.")]:
        state[key] = state[key] * -1.5
    save_file(state, str(folder / "checkpoints" / "tiny-finetune.safetensors"))
    return folder


def _engine(folder: Path) -> Engine:
    return Engine.setup(EngineConfig(models_dir=folder, cache_dir=folder / ".cache"))


@pytest.fixture(scope="module")
def pair(tiny_models_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Engine:
    return _engine(_finetune_folder(tiny_models_dir, tmp_path_factory.mktemp("pair")))


def _picture(engine: Engine, model: str) -> bytes:
    body = payload(override_settings={"sd_model_checkpoint": model})
    return pixels(engine.handle("txt2img", body, lambda s, t: None).images[0].data).tobytes()


def test_identical_vaes_are_one_module_counted_once(pair: Engine) -> None:
    base, tune = (pair.models.cache.loaded[t] for t in sorted(pair.models.cache.loaded))
    assert base.pipe.vae is tune.pipe.vae
    assert base.pipe.unet is not tune.pipe.unet
    vae_bytes = sum(t.numel() * t.element_size() for t in base.pipe.vae.state_dict().values())
    separate = weight_bytes(base.pipe) + weight_bytes(tune.pipe)
    assert pair.models.cache.resident_bytes() == separate - vae_bytes


def test_sharing_changes_no_picture(pair: Engine, tiny_models_dir: Path, tmp_path: Path) -> None:
    alone_folder = tmp_path / "alone"
    (alone_folder / "checkpoints").mkdir(parents=True)
    tune_file = next(Path(pair.models.catalog.models_dir).glob("checkpoints/tiny-finetune*"))
    shutil.copy(tune_file, alone_folder / "checkpoints")
    alone = _engine(alone_folder)
    assert _picture(pair, "tiny-finetune") == _picture(alone, "tiny-finetune")
    assert _picture(pair, "tiny-sd15") != _picture(pair, "tiny-finetune")


def test_different_vaes_are_not_shared(engine: Engine) -> None:
    vaes = {id(loaded.pipe.vae) for loaded in engine.models.cache.loaded.values()}
    assert len(vaes) == len(engine.models.cache.loaded)  # the tiny models' VAEs all differ
