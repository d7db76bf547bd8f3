"""Offline loading: family detection, config inference (full-size and tiny), folders, pickles."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from engine.api import Engine, EngineConfig
from engine.catalog import Catalog
from engine.errors import ModelLoadError
from engine.loading import (
    CONFIG_ROOT,
    Family,
    default_placement,
    detect_family,
    infer_configs,
    load_checkpoint,
    prediction_type_hint,
    read_shapes,
)
from engine.planning import Models
from scripts import make_tiny_models as tiny

from .helpers import SD1, payload, pixels

# The real reference architectures, built with the tiny maker's key generators: a full-size
# civitai file has exactly these keys and shapes, so inference must give the bundled configs.
TEXT_L = tiny.TextDims(hidden=768, intermediate=3072, layers=12)
REAL_VAE = tiny.VAEDims(ch=128, ch_mult=(1, 2, 4, 4))
REAL_SD15 = tiny.SD1Dims(
    unet=tiny.UNetDims(
        model_channels=320,
        channel_mult=(1, 2, 4, 4),
        num_res_blocks=2,
        transformer_depth=(1, 1, 1, 0),
        transformer_depth_middle=1,
        context_dim=768,
        use_linear_in_transformer=False,
        num_heads=8,
    ),
    vae=REAL_VAE,
    text=TEXT_L,
)
REAL_SD21 = tiny.SD2Dims(
    unet=tiny.UNetDims(
        model_channels=320,
        channel_mult=(1, 2, 4, 4),
        num_res_blocks=2,
        transformer_depth=(1, 1, 1, 0),
        transformer_depth_middle=1,
        context_dim=1024,
        use_linear_in_transformer=True,
        num_head_channels=64,
    ),
    vae=REAL_VAE,
    text=tiny.TextDims(hidden=1024, intermediate=4096, layers=24, projection_dim=1024),
)
REAL_SDXL = tiny.SDXLDims(
    unet=tiny.UNetDims(
        model_channels=320,
        channel_mult=(1, 2, 4),
        num_res_blocks=2,
        transformer_depth=(0, 2, 10),
        transformer_depth_middle=10,
        context_dim=2048,
        use_linear_in_transformer=True,
        num_head_channels=64,
        adm_in_channels=2816,
    ),
    vae=REAL_VAE,
    text_l=TEXT_L,
    text_g=tiny.TextDims(hidden=1280, intermediate=5120, layers=32, projection_dim=1280),
)
REAL_REFINER = tiny.SDXLRefinerDims(
    unet=tiny.UNetDims(
        model_channels=384,
        channel_mult=(1, 2, 4, 4),
        num_res_blocks=2,
        transformer_depth=(0, 4, 4, 0),
        transformer_depth_middle=4,
        context_dim=1280,
        use_linear_in_transformer=True,
        num_head_channels=64,
        adm_in_channels=2560,
    ),
    vae=REAL_VAE,
    text_g=tiny.TextDims(hidden=1280, intermediate=5120, layers=32, projection_dim=1280),
)
REAL = {
    Family.SDXL_REFINER: tiny.sdxl_refiner_checkpoint(REAL_REFINER),
    Family.SD1: tiny.sd1_checkpoint(REAL_SD15),
    Family.SD2: tiny.sd2_checkpoint(REAL_SD21),
    Family.SDXL: tiny.sdxl_checkpoint(REAL_SDXL),
}


def shapes_of(params: Any) -> dict[str, tuple[int, ...]]:
    return {p.key: tuple(p.shape) for p in params}


def bundled(family: Family, slot: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(
        (CONFIG_ROOT / family.value / slot / "config.json").read_text()
    )
    return data


@pytest.mark.parametrize("family", list(Family))
def test_full_size_files_infer_exactly_the_reference_configs(family: Family) -> None:
    shapes = shapes_of(REAL[family])
    spec = detect_family(shapes, "real.safetensors")
    assert spec.family is family
    configs = infer_configs(spec, shapes, "real.safetensors")
    for slot, config in configs.items():
        assert config == bundled(family, slot), slot


def test_tiny_files_infer_their_own_widths(tiny_models_dir: Path) -> None:
    shapes = read_shapes(tiny_models_dir / "checkpoints" / SD1)
    configs = infer_configs(detect_family(shapes, SD1), shapes, SD1)
    assert configs["unet"]["block_out_channels"] == list(tiny.SD1.unet.block_channels)
    assert configs["unet"]["cross_attention_dim"] == tiny.SD1.text.hidden
    assert configs["text_encoder"]["num_hidden_layers"] == tiny.SD1.text.layers
    assert configs["vae"]["block_out_channels"] == list(tiny.VAE.block_channels)


def test_unknown_architecture_is_a_clear_load_error(tmp_path: Path) -> None:
    path = tmp_path / "not-sd.safetensors"
    save_file({"encoder.weight": torch.zeros(2, 2)}, str(path))
    with pytest.raises(
        ModelLoadError, match=r"not-sd\.safetensors: not a Stable Diffusion checkpoint"
    ):
        detect_family(read_shapes(path), path.name)


def test_truncated_file_is_a_clear_load_error(tiny_models_dir: Path, tmp_path: Path) -> None:
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes((tiny_models_dir / "checkpoints" / SD1).read_bytes()[:5000])
    with pytest.raises(ModelLoadError, match=r"broken\.safetensors: cannot read the file"):
        read_shapes(broken)


def test_prediction_type_hints(tmp_path: Path) -> None:
    yaml = tmp_path / "m.yaml"
    assert prediction_type_hint({}, None) is None
    assert prediction_type_hint({"v_pred": ()}, None) == "v_prediction"
    yaml.write_text('model:\n  params:\n    parameterization: "v"\n')
    assert prediction_type_hint({}, yaml) == "v_prediction"
    yaml.write_text("model:\n  params:\n    parameterization: eps\n")
    assert prediction_type_hint({}, yaml) == "epsilon"


def test_loading_creates_no_randomly_initialised_weights(
    tiny_models_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Weights about to be overwritten are never initialised on real memory."""
    calls: list[str] = []
    for name in (
        "normal_",
        "uniform_",
        "kaiming_uniform_",
        "xavier_uniform_",
        "trunc_normal_",
        "zeros_",
        "ones_",
    ):
        original = getattr(torch.nn.init, name)

        def spy(
            tensor: torch.Tensor, *args: Any, _name: str = name, _orig: Any = original, **kw: Any
        ) -> Any:
            if tensor.device.type != "meta":
                calls.append(_name)
            return _orig(tensor, *args, **kw)

        monkeypatch.setattr(torch.nn.init, name, spy)
    catalog = Catalog.scan(tiny_models_dir)
    load_checkpoint(
        catalog.resolve_checkpoint(SD1), default_placement(), tiny_models_dir / ".cache"
    )
    assert calls == []


def small_engine(models: Path) -> Engine:
    return Engine.setup(EngineConfig(models_dir=models, cache_dir=models / ".cache"))


def test_diffusers_folder_and_ckpt_give_the_single_file_picture(
    engine: Engine, tmp_path: Path
) -> None:
    """The same weights as a diffusers folder and as a pickle .ckpt produce the same pixels."""
    expected = pixels(engine.handle("txt2img", payload()).images[0].data)
    shared = next(c for c in engine.models.cache.loaded.values() if c.info.name == SD1)
    # A fresh copy to save: the shared one may carry (inactive) LoRA layers from other tests.
    loaded = load_checkpoint(shared.info, default_placement(), tmp_path / "cache")
    for_folder = tmp_path / "folder"
    loaded.pipe.save_pretrained(for_folder / "checkpoints" / "tiny-sd15-diffusers")
    for_ckpt = tmp_path / "ckpt"
    (for_ckpt / "checkpoints").mkdir(parents=True)
    state = load_file(str(loaded.info.filename))
    torch.save({"state_dict": state}, for_ckpt / "checkpoints" / "tiny-sd15.ckpt")
    for models in (for_folder, for_ckpt):
        other = small_engine(models)
        (only,) = other.models.cache.loaded.values()
        assert only.family is Family.SD1
        got = pixels(other.handle("txt2img", payload()).images[0].data)
        assert got.tobytes() == expected.tobytes(), models.name


class _Trap:
    """Unpickling this would write the marker file (what a hostile .ckpt does)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (Path.write_text, (self.marker, "pwned"))


def test_booby_trapped_pickle_never_runs(tmp_path: Path) -> None:
    marker = tmp_path / "marker"
    models = tmp_path / "models"
    (models / "checkpoints").mkdir(parents=True)
    torch.save({"state_dict": {"x": _Trap(marker)}}, models / "checkpoints" / "evil.ckpt")
    with pytest.raises(ModelLoadError, match=r"evil\.ckpt"):
        small_engine(models)
    assert not marker.exists()


def test_setup_fails_clearly_on_a_corrupt_checkpoint(tiny_models_dir: Path, tmp_path: Path) -> None:
    models = tmp_path / "models"
    (models / "checkpoints").mkdir(parents=True)
    shutil.copy(tiny_models_dir / "checkpoints" / SD1, models / "checkpoints" / SD1)
    data = (models / "checkpoints" / SD1).read_bytes()
    (models / "checkpoints" / "zz-corrupt.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelLoadError, match=r"zz-corrupt\.safetensors"):
        small_engine(models)


def test_missing_tensor_is_a_clear_load_error(tiny_models_dir: Path, tmp_path: Path) -> None:
    state = load_file(str(tiny_models_dir / "checkpoints" / SD1))
    del state["model.diffusion_model.out.2.weight"]
    path = tmp_path / "incomplete.safetensors"
    save_file(state, str(path))
    shapes = read_shapes(path)
    with pytest.raises(ModelLoadError, match=r"incomplete\.safetensors: missing tensor"):
        infer_configs(detect_family(shapes, path.name), shapes, path.name)


def test_engine_config_from_env(tmp_path: Path) -> None:
    config = EngineConfig.from_env({"SD_MODELS_DIR": str(tmp_path), "SD_DEFAULT_CHECKPOINT": "x"})
    assert config.models_dir == tmp_path.resolve()
    assert config.cache_dir == tmp_path.resolve() / ".cache"
    assert config.default_checkpoint == "x"
    assert replace(config, default_checkpoint=None).default_checkpoint is None


def test_default_checkpoint_setting_is_honoured(engine: Engine) -> None:
    catalog = engine.models.catalog
    preferred = catalog.default_checkpoint("tiny-sdxl")
    other = Engine(Models(catalog, engine.models.cache, preferred), engine.limits)
    info = json.loads(other.handle("txt2img", payload()).info)
    assert info["sd_model_name"] == "tiny-sdxl"
