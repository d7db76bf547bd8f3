"""Offline loading: family detection, config inference (released layouts and tiny), folders,
pickles."""

from __future__ import annotations

import gzip
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
    has_legacy_sd1_text_keys,
    infer_configs,
    load_checkpoint,
    prediction_type_hint,
    read_shapes,
    webui_key,
)
from engine.planning import Models
from scripts import make_tiny_models as tiny

from .helpers import SD1, SDXL, payload, pixels, with_model

# Key layouts of the real released files (keys and shapes only), written by
# scripts/make_layout_manifests.py from published listings (see its docstring for the sources and
# the independent cross-check); never from our own tiny-model maker.
LAYOUTS = Path(__file__).parent / "data" / "layouts"
MANIFESTS = {
    "sd15-pruned": Family.SD1,
    "sd15-emaonly": Family.SD1,
    "sd15-legacy-text-encoder": Family.SD1,
    "sd21": Family.SD2,
    "sdxl-base": Family.SDXL,
    "sdxl-refiner": Family.SDXL_REFINER,
}


def manifest(name: str) -> dict[str, tuple[int, ...]]:
    with gzip.open(LAYOUTS / f"{name}.json.gz", "rt", encoding="utf-8") as handle:
        data = json.load(handle)
    return {key: tuple(shape) for key, shape in data["tensors"].items()}


def bundled(family: Family, slot: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(
        (CONFIG_ROOT / family.value / slot / "config.json").read_text()
    )
    return data


@pytest.mark.parametrize("name", list(MANIFESTS))
def test_released_key_layouts_infer_exactly_the_reference_configs(name: str) -> None:
    """EMA copies, schedule buffers, position_ids and the old SD1 text keys change nothing."""
    shapes = manifest(name)
    if has_legacy_sd1_text_keys(shapes):
        shapes = {webui_key(k): v for k, v in shapes.items()}
    spec = detect_family(shapes, f"{name}.safetensors")
    assert spec.family is MANIFESTS[name]
    configs = infer_configs(spec, shapes, f"{name}.safetensors")
    assert set(configs) == {"unet", "vae", *(slot for slot, _, _ in spec.text_encoders)}
    for slot, config in configs.items():
        assert config == bundled(spec.family, slot), slot


def _converted(spec: Any, configs: dict[str, dict[str, Any]], shapes: Any) -> dict[str, Any]:
    """Each component's diffusers parameters, converted by diffusers' own single-file code
    from meta tensors of the layout's shapes, beside an empty model of the inferred config."""
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders import single_file_utils as sfu
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    ckpt = {k: torch.empty(v, device="meta") for k, v in shapes.items()}
    out: dict[str, Any] = {}
    with init_empty_weights():
        unet = UNet2DConditionModel.from_config(configs["unet"])
        vae = AutoencoderKL.from_config(configs["vae"])
    out["unet"] = (sfu.convert_ldm_unet_checkpoint(dict(ckpt), configs["unet"]), unet)
    out["vae"] = (sfu.convert_ldm_vae_checkpoint(dict(ckpt), configs["vae"]), vae)
    for slot, prefix, layout in spec.text_encoders:
        projected = "CLIPTextModelWithProjection" in configs[slot].get("architectures", [])
        cls = CLIPTextModelWithProjection if projected else CLIPTextModel
        with init_empty_weights():
            model = cls(CLIPTextConfig.from_dict(configs[slot]))
        if layout == "hf":
            got = sfu.convert_ldm_clip_checkpoint(ckpt)
        else:
            got = sfu.convert_open_clip_checkpoint(model, ckpt, prefix=prefix)
        if not hasattr(model, "text_model"):  # transformers >= 5.6 flattened CLIPTextModel
            got = {k.removeprefix("text_model."): v for k, v in got.items()}
        out[slot] = (got, model)
    return out


@pytest.mark.parametrize("name", list(MANIFESTS))
def test_released_layouts_convert_to_exactly_the_reference_models(name: str) -> None:
    """An independent check of the manifests and of our config inference together: diffusers'
    converter maps every tensor of the released layout onto a parameter of the reference model
    with its shape, and leaves none unfilled (only the non-persistent position_ids buffer of
    current transformers is extra; diffusers drops it on load)."""
    shapes = manifest(name)
    if has_legacy_sd1_text_keys(shapes):
        shapes = {webui_key(k): v for k, v in shapes.items()}
    spec = detect_family(shapes, name)
    configs = infer_configs(spec, shapes, name)
    for slot, (got, model) in _converted(spec, configs, shapes).items():
        want = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        have = {k: tuple(v.shape) for k, v in got.items()}
        buffers = {k for k, _ in model.named_buffers()}
        assert set(want) - set(have) == set(), slot
        assert set(have) - set(want) <= buffers, slot
        assert {k: have[k] for k in want} == want, slot


def test_the_manifests_carry_what_real_downloads_carry() -> None:
    """What makes them civitai-shaped: present where the released files have it."""
    pruned, emaonly, legacy = (
        manifest(n) for n in ("sd15-pruned", "sd15-emaonly", "sd15-legacy-text-encoder")
    )
    assert pruned["model_ema.diffusion_modelinput_blocks00weight"] == (320, 4, 3, 3)
    assert not any(k.startswith("model_ema.") for k in emaonly)
    assert emaonly["alphas_cumprod"] == (1000,) and manifest("sd21")["alphas_cumprod"] == (1000,)
    assert emaonly["cond_stage_model.transformer.text_model.embeddings.position_ids"] == (1, 77)
    assert legacy["cond_stage_model.transformer.encoder.layers.11.mlp.fc2.weight"] == (768, 3072)
    assert not any(".text_model." in k for k in legacy)
    assert "alphas_cumprod" not in manifest("sdxl-base")  # SGM registers no schedule buffers


def test_old_sd1_text_keys_are_renamed_as_webui_renames_them() -> None:
    """webui 1.10.1 modules/sd_models.py checkpoint_dict_replacements_sd1."""
    assert webui_key("cond_stage_model.transformer.embeddings.position_ids") == (
        "cond_stage_model.transformer.text_model.embeddings.position_ids"
    )
    assert webui_key("cond_stage_model.transformer.final_layer_norm.bias") == (
        "cond_stage_model.transformer.text_model.final_layer_norm.bias"
    )
    for unchanged in (
        "cond_stage_model.transformer.text_model.encoder.layers.0.mlp.fc1.bias",
        "conditioner.embedders.0.transformer.text_model.encoder.layers.0.mlp.fc1.bias",
        "model.diffusion_model.out.2.weight",
    ):
        assert webui_key(unchanged) == unchanged


def test_sd21_layout_is_v_prediction_only_by_its_yaml(tmp_path: Path) -> None:
    """512-base and 768-v share one layout: keys say nothing; the same-name yaml the catalog
    finds beside the file decides, as in webui (without one, webui's weight probe does, which
    a key manifest cannot run)."""
    shapes = manifest("sd21")
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    for stem in ("v2-1_512-ema-pruned", "v2-1_768-ema-pruned"):
        # Stand-ins for the files (the catalog only lists them here); the layout is the manifest.
        save_file({"x": torch.zeros(1)}, str(folder / f"{stem}.safetensors"))
    (folder / "v2-1_768-ema-pruned.yaml").write_text(
        'model:\n  params:\n    parameterization: "v"\n'  # v2-inference-v.yaml's key
    )
    catalog = Catalog.scan(tmp_path)
    base = catalog.resolve_checkpoint("v2-1_512-ema-pruned")
    v = catalog.resolve_checkpoint("v2-1_768-ema-pruned")
    assert base.config is None and prediction_type_hint(shapes, base.config) is None
    assert prediction_type_hint(shapes, v.config) == "v_prediction"


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


@pytest.mark.parametrize(
    ("channels", "kind"), [(8, "an instruct-pix2pix model"), (5, "a depth-to-image model")]
)
def test_an_edit_or_depth_checkpoint_is_refused_at_setup_by_name(
    tiny_models_dir: Path, tmp_path: Path, channels: int, kind: str
) -> None:
    """A UNet whose first convolution takes the latent plus extra conditioning channels
    (webui runs those with conditioning this server lacks): setup names the file, the
    channel count, what it is and what is allowed, instead of failing at a request's first
    step."""
    key = "model.diffusion_model.input_blocks.0.0.weight"
    state = load_file(str(tiny_models_dir / "checkpoints" / SD1))
    weight = state[key]
    extra = torch.zeros(weight.shape[0], channels - weight.shape[1], *weight.shape[2:])
    state[key] = torch.cat([weight, extra.to(weight.dtype)], dim=1)
    models = tmp_path / "models"
    (models / "checkpoints").mkdir(parents=True)
    save_file(state, str(models / "checkpoints" / "edit.safetensors"))
    message = (
        rf"edit\.safetensors: the UNet takes {channels} input channels: {kind} .*"
        r"must take 4 \(text-to-image\) or 9 \(inpainting\)"
    )
    with pytest.raises(ModelLoadError, match=message):
        small_engine(models)


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


@pytest.mark.parametrize("variant", list(tiny.DOWNLOADS))
def test_a_download_shaped_file_gives_the_plain_files_picture(
    engine: Engine, tmp_path: Path, variant: str
) -> None:
    """tiny-sd15's weights with what real downloads add (EMA copy, LDM buffers, position_ids,
    or the old text keys webui renames) load, and give the plain file's pixels exactly."""
    expected = pixels(engine.handle("txt2img", payload()).images[0].data)
    models = tmp_path / "models"
    path = models / "checkpoints" / f"{variant}.safetensors"
    tiny.write_download(path, tiny.DOWNLOADS[variant])
    extras = set(read_shapes(path)) - set(
        read_shapes(engine.models.catalog.resolve_checkpoint(SD1).filename)
    )
    assert extras, "the variant adds keys"
    other = small_engine(models)
    (only,) = other.models.cache.loaded.values()
    assert only.family is Family.SD1
    got = pixels(other.handle("txt2img", payload()).images[0].data)
    assert got.tobytes() == expected.tobytes()


def test_sd_cache_dir_holds_every_cache_file_and_the_models_folder_stays_untouched(
    tiny_models_dir: Path, tmp_path: Path
) -> None:
    """SD_CACHE_DIR (a read-only models volume is the use): hashes, the single-file config
    folders and the VAE cache are written there, nothing in the models folder."""
    models, cache = tmp_path / "models", tmp_path / "elsewhere" / "cache"
    for rel in (
        "checkpoints/" + SD1,
        "vae/tiny-vae.safetensors",
        "loras/tiny-lora-sd15.safetensors",
    ):
        (models / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(tiny_models_dir / rel, models / rel)
    before = sorted(p.relative_to(models) for p in models.rglob("*"))
    config = EngineConfig.from_env({"SD_MODELS_DIR": str(models), "SD_CACHE_DIR": str(cache)})
    assert config.cache_dir == cache.resolve()
    engine = Engine.setup(config)
    body = payload(
        prompt="a lighthouse <lora:tiny-lora-sd15:1>",
        override_settings={"sd_vae": "tiny-vae.safetensors"},
    )
    info = json.loads(engine.handle("txt2img", body).info)
    assert "VAE: tiny-vae" in info["infotexts"][0] and "Lora hashes" in info["infotexts"][0]
    assert sorted(p.relative_to(models) for p in models.rglob("*")) == before
    assert SD1 in (cache / "hashes.json").read_text()  # the checkpoint's hash, for restarts
    assert any((cache / "configs").iterdir())  # the SD1 config folder from_single_file read


def test_download_shaped_tiny_files_use_the_released_key_names(tmp_path: Path) -> None:
    """The tiny maker's extras are named as in the released files (the manifests): EMA copies
    by LitEma's dot-less rule, the same buffers, position_ids, the old text-encoder keys."""
    real = {name: set(manifest(name)) for name in ("sd15-pruned", "sd15-legacy-text-encoder")}
    weights = ("model.diffusion_model.", "first_stage_model.", "model_ema.diffusion_model")
    for variant, name in (
        ("tiny-sd15-pruned", "sd15-pruned"),
        ("tiny-sd15-legacy", "sd15-legacy-text-encoder"),
    ):
        path = tiny.write_download(tmp_path / f"{variant}.safetensors", tiny.DOWNLOADS[variant])
        keys = set(read_shapes(path))
        text = {k for k in keys if k.startswith("cond_stage_model.")}
        assert text <= real[name]  # fewer layers than CLIP-L, the same names
        extras = {k for k in keys - text if not k.startswith(weights)}
        assert extras == {
            k for k in real[name] if not k.startswith((*weights, "cond_stage_model."))
        }
    for keys in (real["sd15-pruned"], set(read_shapes(tmp_path / "tiny-sd15-pruned.safetensors"))):
        unet = {k.removeprefix("model.diffusion_model.") for k in keys if k.startswith("model.dif")}
        ema = {k for k in keys if k.startswith("model_ema.diffusion_model")}
        assert ema == {"model_ema.diffusion_model" + k.replace(".", "") for k in unet}


def test_old_text_keys_in_a_pickle_checkpoint_load_too(engine: Engine, tmp_path: Path) -> None:
    """The legacy-layout text encoder read from a .ckpt (weights-only unpickler) as well."""
    expected = pixels(engine.handle("txt2img", payload()).images[0].data)
    source = tiny.write_download(
        tmp_path / "legacy.safetensors", tiny.DOWNLOADS["tiny-sd15-legacy"]
    )
    models = tmp_path / "models"
    (models / "checkpoints").mkdir(parents=True)
    torch.save({"state_dict": load_file(str(source))}, models / "checkpoints" / "legacy.ckpt")
    got = pixels(small_engine(models).handle("txt2img", payload()).images[0].data)
    assert got.tobytes() == expected.tobytes()


def test_an_sdxl_file_with_its_released_buffers_gives_the_plain_files_picture(
    engine: Engine, tmp_path: Path
) -> None:
    """position_ids of the CLIP-L encoder, as sd_xl_base_1.0 carries it, change nothing."""
    expected = pixels(engine.handle("txt2img", with_model(SDXL)).images[0].data)
    models = tmp_path / "models"
    path = tiny.write_sdxl_download(models / "checkpoints" / SDXL)
    assert set(read_shapes(path)) <= set(manifest("sdxl-base"))  # every key named as released
    got = pixels(small_engine(models).handle("txt2img", with_model(SDXL)).images[0].data)
    assert got.tobytes() == expected.tobytes()
