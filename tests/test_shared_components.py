"""Identical components stored once (engine/pipelines.py): a fine-tune carrying its base's VAE
and text encoder, and a "baked VAE" variant carrying its base's UNet and text encoder, share
those modules; memory counts them once (tensor storage sizes), and no picture changes — with
LoRAs too: each checkpoint's LoRA result is exactly its result without sharing, whatever the
other checkpoints did with the shared layers before or at the same time."""

from __future__ import annotations

import shutil
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from safetensors.torch import load_file, save_file

from engine.api import Engine, EngineConfig
from engine.loading import LoadedCheckpoint
from engine.networks import LoraRequest
from engine.working_set import module_tensors, tensor_bytes, weight_bytes

from .helpers import payload, pixels

SD1 = "tiny-sd15.safetensors"
TUNE = "tiny-finetune"
BAKED = "tiny-baked-vae"
LORA_FILE = "tiny-lora-sd15.safetensors"
MAX_LEVELS = 1  # concurrent requests: the most a picture may differ from its lone one


def _variant(source: Path, target: Path, prefix: str) -> None:
    """`source` with every tensor under `prefix` changed (the rest byte for byte)."""
    state = load_file(str(source))
    for key in [k for k in state if k.startswith(prefix)]:
        state[key] = state[key] * -1.5
    save_file(state, str(target))


def _folder(tiny_models_dir: Path, folder: Path, checkpoints: dict[str, str | None]) -> Path:
    """A models folder with the tiny SD1 LoRA and `checkpoints`: name -> the key prefix
    changed from tiny-sd15 (None: tiny-sd15 itself)."""
    (folder / "checkpoints").mkdir(parents=True)
    (folder / "loras").mkdir()
    shutil.copy(tiny_models_dir / "loras" / LORA_FILE, folder / "loras" / LORA_FILE)
    source = tiny_models_dir / "checkpoints" / SD1
    for name, prefix in checkpoints.items():
        if prefix is None:
            shutil.copy(source, folder / "checkpoints" / f"{name}.safetensors")
        else:
            _variant(source, folder / "checkpoints" / f"{name}.safetensors", prefix)
    return folder


# A fine-tune: other UNet output weights, the same VAE and text encoder bytes.
TUNE_PREFIX = "model.diffusion_model.out."
# A "baked VAE" variant: another VAE decoder, the same UNet and text encoder bytes.
BAKED_PREFIX = "first_stage_model.decoder.conv_out."


def _engine(folder: Path) -> Engine:
    return Engine.setup(EngineConfig(models_dir=folder, cache_dir=folder / ".cache"))


@pytest.fixture(scope="module")
def trio(tiny_models_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Engine:
    checkpoints = {"tiny-sd15": None, TUNE: TUNE_PREFIX, BAKED: BAKED_PREFIX}
    return _engine(_folder(tiny_models_dir, tmp_path_factory.mktemp("trio"), checkpoints))


@pytest.fixture(scope="module")
def alone(tiny_models_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Engine]:
    """Each checkpoint of the trio in an engine of its own (nothing shared)."""
    out = {}
    for name, prefix in {"tiny-sd15": None, TUNE: TUNE_PREFIX, BAKED: BAKED_PREFIX}.items():
        folder = tmp_path_factory.mktemp(f"alone-{name}")
        out[name] = _engine(_folder(tiny_models_dir, folder, {name: prefix}))
    return out


def _loaded(engine: Engine, name: str) -> LoadedCheckpoint:
    return engine.models.cache.loaded[engine.models.catalog.resolve_checkpoint(name).title]


def _body(model: str, lora: float | None, seed: int = 21) -> str:
    prompt = "a lighthouse" + (f" <lora:tiny-lora-sd15:{lora}>" if lora is not None else "")
    return payload(seed=seed, prompt=prompt, override_settings={"sd_model_checkpoint": model})


def _picture(engine: Engine, body: str) -> np.ndarray:
    data = engine.handle("txt2img", body, lambda s, t: None).images[0].data
    return np.asarray(pixels(data), dtype=np.int16)


def _bytes(module: Any) -> int:
    return tensor_bytes(module_tensors([module]))


def test_identical_components_are_one_module_counted_once(trio: Engine) -> None:
    base, tune, baked = (_loaded(trio, n) for n in ("tiny-sd15", TUNE, BAKED))
    assert base.pipe.vae is tune.pipe.vae and baked.pipe.vae is not base.pipe.vae
    assert base.pipe.text_encoder is tune.pipe.text_encoder is baked.pipe.text_encoder
    assert base.pipe.unet is baked.pipe.unet and tune.pipe.unet is not base.pipe.unet
    separate = sum(weight_bytes(c.pipe) for c in (base, tune, baked))
    stored_once = (
        _bytes(base.pipe.vae) + 2 * _bytes(base.pipe.text_encoder) + _bytes(base.pipe.unet)
    )
    assert trio.models.cache.resident_bytes() == separate - stored_once
    # The first loaded keeps plain adapter names; each one sharing with it gets its own.
    scopes = [c.lora_scope for c in trio.models.cache.loaded.values()]
    assert scopes[0] == "" and len(set(scopes)) == 3


def test_sharing_changes_no_picture_with_or_without_loras(
    trio: Engine, alone: dict[str, Engine]
) -> None:
    # An order in which every checkpoint runs after another one changed the shared layers.
    sequence = [
        ("tiny-sd15", 1.0),
        (TUNE, None),
        (TUNE, 1.0),
        ("tiny-sd15", None),
        (BAKED, 1.0),
        (TUNE, 0.5),
        (BAKED, None),
        ("tiny-sd15", 0.5),
    ]
    models = {model for model, _ in sequence}
    for model, lora in sequence:
        body = _body(model, lora)
        shared, lone = _picture(trio, body), _picture(alone[model], body)
        assert np.array_equal(shared, lone), f"{model} with LoRA {lora}: differs from alone"
    # The LoRA changes pictures (else the above proves nothing), per checkpoint.
    for model in ("tiny-sd15", TUNE):
        assert (
            np.abs(_picture(trio, _body(model, 1.0)) - _picture(trio, _body(model, None))).max() > 8
        )
    # Each checkpoint's adapter under its own name, in the modules it uses.
    aid = trio.models.loras.resolve("tiny-lora-sd15").adapter_id
    name = {n: trio.models.lora_manager(_loaded(trio, n)).adapter_name(aid) for n in models}
    base, tune = _loaded(trio, "tiny-sd15"), _loaded(trio, TUNE)
    assert set(base.pipe.text_encoder.peft_config) == set(name.values()) and len(name) == 3
    assert set(base.pipe.unet.peft_config) == {name["tiny-sd15"], name[BAKED]}
    assert set(tune.pipe.unet.peft_config) == {name[TUNE]}


def test_concurrent_requests_on_shared_encoders_keep_their_pictures(
    trio: Engine, alone: dict[str, Engine]
) -> None:
    bodies = {
        "base-lora": _body("tiny-sd15", 1.0, seed=31),
        "tune": _body(TUNE, None, seed=32),
        "tune-lora": _body(TUNE, 0.5, seed=33),
        "baked": _body(BAKED, None, seed=34),
    }
    models = {"base-lora": "tiny-sd15", "tune": TUNE, "tune-lora": TUNE, "baked": BAKED}
    results: dict[str, Any] = {}
    start = threading.Barrier(len(bodies))

    def work(name: str) -> None:
        start.wait()
        try:
            results[name] = _picture(trio, bodies[name])
        except BaseException as exc:  # noqa: BLE001 - reported below
            results[name] = exc

    threads = [threading.Thread(target=work, args=(name,)) for name in bodies]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=600)
    assert not any(t.is_alive() for t in threads), "a concurrent request never finished"
    for name, body in bodies.items():
        lone = _picture(alone[models[name]], body)
        assert isinstance(results[name], np.ndarray), results[name]
        assert np.abs(results[name] - lone).max() <= MAX_LEVELS, name


def _active_in(module: Any) -> set[str]:
    from peft.tuners.tuners_utils import BaseTunerLayer

    layers = [m for m in module.modules() if isinstance(m, BaseTunerLayer)]
    return {name for layer in layers for name in layer.active_adapters}


def test_a_switch_sees_what_another_checkpoint_did_to_a_shared_encoder(trio: Engine) -> None:
    """The LoRA state of a shared module is the module's, not a checkpoint's: after another
    checkpoint loaded into the shared text encoder (which leaves every adapter there off),
    switching this checkpoint's LoRA on again really switches it on."""
    base, tune = (trio.models.lora_manager(_loaded(trio, n)) for n in ("tiny-sd15", TUNE))
    base.clear()
    encoder = tune.loaded.pipe.text_encoder
    request = [LoraRequest("tiny-lora-sd15", 1.0, 1.0)]
    with tune.prepared(request) as (_, uses):
        tune.activate(uses, ["te"])
        name = tune.adapter_name(uses[0].info.adapter_id)
        assert _active_in(encoder) == {name}
        with base.prepared(request):  # loads into the shared encoder: all off there
            assert _active_in(encoder) == set()
            tune.activate(uses, ["te"])
            assert _active_in(encoder) == {name}
        tune.deactivate()
    assert _active_in(encoder) == set()


def test_a_lora_load_waits_for_a_running_text_encoding(trio: Engine) -> None:
    """Loading a LoRA injects layers into the text encoder: never while another request's
    text encoding runs through it (the step batcher's text-encoder lock)."""
    tune = _loaded(trio, TUNE)
    manager = trio.models.lora_manager(tune)
    manager.clear()
    name = manager.adapter_name(trio.models.loras.resolve("tiny-lora-sd15").adapter_id)
    done = threading.Event()

    def load() -> None:
        with manager.prepared([LoraRequest("tiny-lora-sd15", 1.0, 1.0)]):
            done.set()

    lock = trio.models.cache.batcher.text_encoder_lock
    with lock:  # a text encoding in progress
        loader = threading.Thread(target=load)
        loader.start()
        assert not done.wait(0.5), "the LoRA loaded while a text encoding held the encoders"
        assert name not in (getattr(tune.pipe.text_encoder, "peft_config", None) or {})
    loader.join(timeout=60)
    assert done.is_set() and name in tune.pipe.text_encoder.peft_config


def test_different_vaes_are_not_shared(engine: Engine) -> None:
    for part in ("vae", "text_encoder", "unet"):
        modules = [getattr(c.pipe, part, None) for c in engine.models.cache.loaded.values()]
        present = [id(m) for m in modules if m is not None]
        assert len(set(present)) == len(present), f"{part}: the tiny models' weights all differ"


def test_a_checkpoint_added_by_a_refresh_shares_with_the_kept_ones(
    tiny_models_dir: Path, tmp_path: Path, alone: dict[str, Engine]
) -> None:
    folder = _folder(tiny_models_dir, tmp_path / "models", {"tiny-sd15": None})
    before = _engine(folder)
    _variant(
        tiny_models_dir / "checkpoints" / SD1,
        folder / "checkpoints" / f"{TUNE}.safetensors",
        TUNE_PREFIX,
    )
    after = before.rescanned()
    base, tune = _loaded(after, "tiny-sd15"), _loaded(after, TUNE)
    assert base is _loaded(before, "tiny-sd15")  # kept as loaded
    assert tune.pipe.text_encoder is base.pipe.text_encoder and tune.pipe.vae is base.pipe.vae
    assert tune.lora_scope != base.lora_scope
    body = _body(TUNE, 1.0)
    assert np.array_equal(_picture(after, body), _picture(alone[TUNE], body))


def _adapters(module: Any) -> set[str]:
    return set(getattr(module, "peft_config", None) or ())


def test_a_checkpoint_dropped_by_a_refresh_takes_its_adapters_out_of_shared_modules(
    tiny_models_dir: Path, tmp_path: Path, alone: dict[str, Engine]
) -> None:
    """The base leaves the folder while its fine-tune (sharing its text encoder) stays: the
    base's LoRA adapters leave the shared encoder (else they stay there, in device memory, for
    as long as the server runs); one a request in flight uses stays until that request ends;
    the fine-tune's own LoRA picture is unchanged."""
    folder = _folder(tiny_models_dir, tmp_path / "models", {"tiny-sd15": None, TUNE: TUNE_PREFIX})
    before = _engine(folder)
    body = _body(TUNE, 1.0)
    _picture(before, _body("tiny-sd15", 1.0))
    _picture(before, body)
    base, tune = _loaded(before, "tiny-sd15"), _loaded(before, TUNE)
    encoder = tune.pipe.text_encoder
    assert encoder is base.pipe.text_encoder
    base_manager, tune_manager = (before.models.lora_manager(c) for c in (base, tune))
    aid = before.models.loras.resolve("tiny-lora-sd15").adapter_id
    base_name, tune_name = base_manager.adapter_name(aid), tune_manager.adapter_name(aid)
    assert _adapters(encoder) == {base_name, tune_name}

    (folder / "checkpoints" / f"{SD1}").unlink()
    with base_manager.prepared([LoraRequest("tiny-lora-sd15", 1.0, 1.0)]):  # in flight
        after = before.rescanned()
        assert _adapters(encoder) == {base_name, tune_name}
    assert _adapters(encoder) == {tune_name}
    assert _loaded(after, TUNE) is tune
    assert np.array_equal(_picture(after, body), _picture(alone[TUNE], body))
    assert _adapters(encoder) == {tune_name}
