"""LoRA per request: webui names and hashes, exact weights, nothing left behind (bit for bit)."""

from __future__ import annotations

import hashlib
import json
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from engine import networks
from engine.api import Engine
from engine.errors import RequestError, UnknownName
from engine.loading import Family, LoadedCheckpoint
from engine.networks import (
    LoraCatalog,
    LoraInfo,
    LoraManager,
    LoraRequest,
    combine_requests,
    guess_family,
    lora_hashes,
)

from .helpers import SD1, SD2, SDXL

LORA_SD1 = "tiny-lora-sd15"
LORA_SDXL = "tiny-lora-sdxl"


# --------------------------------------------------------------------------- fixtures


def _loaded(engine: Engine, checkpoint: str) -> LoadedCheckpoint:
    info = engine.models.catalog.resolve_checkpoint(checkpoint)
    return engine.models.cache.loaded[info.title]


@pytest.fixture(scope="module")
def lora_files(engine: Engine) -> tuple[Path, ...]:
    return engine.models.catalog.files("loras")


@pytest.fixture(scope="module")
def catalog(lora_files: tuple[Path, ...]) -> LoraCatalog:
    return LoraCatalog.scan(lora_files)


@pytest.fixture(scope="module")
def extra_loras(tmp_path_factory: pytest.TempPathFactory, lora_files: tuple[Path, ...]) -> Path:
    """Variants of the tiny SD1 LoRA, outside the shared models folder."""
    folder = tmp_path_factory.mktemp("loras")
    sd1 = next(p for p in lora_files if p.stem == LORA_SD1)
    tensors = load_file(str(sd1))
    with open(sd1, "rb") as fh:  # the tiny maker's metadata, to keep ss_base_model_version
        size = int.from_bytes(fh.read(8), "little")
        metadata = json.loads(fh.read(size))["__metadata__"]
    # Another LoRA: every up matrix negated and doubled.
    other = {k: (-2 * v if "lora_up" in k else v) for k, v in tensors.items()}
    save_file(other, str(folder / "other.safetensors"), {**metadata, "ss_output_name": "pretty"})
    # Unet part loads, then a text-encoder tensor with the wrong width fails.
    broken = dict(other)
    key = next(k for k in broken if k.startswith("lora_te_") and k.endswith("lora_down.weight"))
    broken[key] = torch.zeros(broken[key].shape[0], broken[key].shape[1] + 3, dtype=torch.float16)
    save_file(broken, str(folder / "broken.safetensors"), metadata)
    # No family in its metadata and no key any model has.
    stray = {
        "lora_unet_nowhere.lora_down.weight": torch.ones(2, 4),
        "lora_unet_nowhere.alpha": torch.tensor(1.0),
    }
    stray["lora_unet_nowhere.lora_up.weight"] = torch.ones(4, 2)
    save_file(stray, str(folder / "stray.safetensors"))
    # The hash sd-scripts writes wins over the computed one (webui).
    save_file(other, str(folder / "hashed.safetensors"), {"sshs_model_hash": "ab" * 32})
    (folder / "pickled.pt").write_bytes(b"not loaded")
    (folder / "garbage.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{nope")
    return folder


@pytest.fixture(scope="module")
def full_catalog(lora_files: tuple[Path, ...], extra_loras: Path) -> LoraCatalog:
    return LoraCatalog.scan([*lora_files, *sorted(extra_loras.iterdir())])


@pytest.fixture
def manager(engine: Engine, full_catalog: LoraCatalog) -> Iterator[Callable[..., LoraManager]]:
    """Make managers on the shared pipelines; every one is cleared after the test."""
    made: list[LoraManager] = []

    def make(checkpoint: str = SD1, **kwargs: Any) -> LoraManager:
        mgr = LoraManager(_loaded(engine, checkpoint), full_catalog, **kwargs)
        made.append(mgr)
        return mgr

    yield make
    for mgr in made:
        mgr.clear()
        assert not _tuner_layers(mgr.loaded), "peft layers left on a shared pipeline"


# --------------------------------------------------------------------------- helpers


def _tuner_layers(loaded: LoadedCheckpoint) -> list[Any]:
    from peft.tuners.tuners_utils import BaseTunerLayer

    pipe = loaded.pipe
    parts = [getattr(pipe, n, None) for n in ("unet", "text_encoder", "text_encoder_2")]
    return [m for p in parts if p is not None for m in p.modules() if isinstance(m, BaseTunerLayer)]


def _active(loaded: LoadedCheckpoint) -> set[str]:
    return {name for layer in _tuner_layers(loaded) for name in layer.active_adapters}


def _adapters(loaded: LoadedCheckpoint) -> set[str]:
    return {a for names in loaded.pipe.get_list_adapters().values() for a in names}


@torch.no_grad()
def outputs(loaded: LoadedCheckpoint) -> dict[str, torch.Tensor]:
    """UNet and text-encoder outputs on fixed inputs."""
    pipe = loaded.pipe
    gen = torch.Generator().manual_seed(0)
    unet = pipe.unet
    cfg = unet.config
    out: dict[str, torch.Tensor] = {}
    for slot in ("text_encoder", "text_encoder_2"):
        encoder = getattr(pipe, slot, None)
        if encoder is not None:
            tokenizer = pipe.tokenizer if slot == "text_encoder" else pipe.tokenizer_2
            ids = tokenizer(
                ["a lighthouse on a cliff"],
                padding="max_length",
                max_length=77,
                return_tensors="pt",
            ).input_ids
            out[slot] = encoder(ids)[0]
    x = torch.randn(1, cfg.in_channels, 8, 8, generator=gen)
    context = torch.randn(1, 4, cfg.cross_attention_dim, generator=gen)
    kwargs: dict[str, Any] = {}
    if cfg.addition_embed_type == "text_time":
        pooled = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
        kwargs["added_cond_kwargs"] = {
            "text_embeds": torch.randn(1, pooled, generator=gen),
            "time_ids": torch.tensor([[64.0, 64.0, 0.0, 0.0, 64.0, 64.0]]),
        }
    out["unet"] = unet(x, torch.tensor([500]), encoder_hidden_states=context, **kwargs).sample
    return out


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> dict[str, bool]:
    return {k: torch.equal(a[k], b[k]) for k in a}


def req(name: str, te: float = 1.0, unet: float | None = None) -> LoraRequest:
    return LoraRequest(name, te, te if unet is None else unet)


def spy(calls: list[Any], real: Callable[..., Any]) -> Callable[..., Any]:
    """`real`, recording the first argument of every call in `calls`."""

    def call(first: Any, *args: Any, **kwargs: Any) -> Any:
        calls.append(first)
        return real(first, *args, **kwargs)

    return call


class FakeCancel(BaseException):
    """Like cog's CancelationException: a BaseException, not an Exception."""


# --------------------------------------------------------------------------- catalog


def addnet_hash(path: Path) -> str:
    data = path.read_bytes()
    size = int.from_bytes(data[:8], "little")
    return hashlib.sha256(data[8 + size :]).hexdigest()[:12]


def test_scan_names_hashes_and_families(catalog: LoraCatalog, lora_files: tuple[Path, ...]) -> None:
    by_name = {info.name: info for info in catalog.loras}
    assert set(by_name) == {LORA_SD1, LORA_SDXL}
    for path in lora_files:
        info = by_name[path.stem]
        assert info.addnet_hash == addnet_hash(path)
        assert info.path == path
        assert info.alias == path.stem  # the tiny maker writes ss_output_name = file stem
    assert by_name[LORA_SD1].family is Family.SD1
    assert by_name[LORA_SDXL].family is Family.SDXL
    assert by_name[LORA_SD1].adapter_id != by_name[LORA_SDXL].adapter_id
    assert by_name[LORA_SD1].adapter_id.isidentifier()


def test_scan_skips_pickles_and_broken_files(full_catalog: LoraCatalog, extra_loras: Path) -> None:
    names = {info.name for info in full_catalog.loras}
    assert "pickled" not in names and "garbage" not in names
    assert {"other", "broken", "stray", "hashed"} <= names
    hashed = full_catalog.resolve("hashed")
    assert hashed.addnet_hash == "ab" * 6
    assert full_catalog.resolve("other").addnet_hash == addnet_hash(
        extra_loras / "other.safetensors"
    )


def test_alias_resolves_and_listing_has_webui_shape(full_catalog: LoraCatalog) -> None:
    assert full_catalog.resolve("pretty").name == "other"
    entry = next(e for e in full_catalog.listing() if e["name"] == LORA_SD1)
    assert set(entry) == {"name", "alias", "path", "metadata"}
    assert entry["alias"] == LORA_SD1 and Path(entry["path"]).is_absolute()
    meta = entry["metadata"]
    # webui parses JSON-looking values and lists its tag keys first.
    assert meta["ss_tag_frequency"] == {"1_tiny": {"tiny": 4, "test": 2}}
    assert list(meta)[:3] == ["ss_sd_model_name", "ss_resolution", "ss_num_train_images"]


def test_shared_alias_names_nothing(tmp_path: Path, lora_files: tuple[Path, ...]) -> None:
    src = next(p for p in lora_files if p.stem == LORA_SD1)
    tensors = load_file(str(src))
    for stem in ("a", "b"):
        save_file(tensors, str(tmp_path / f"{stem}.safetensors"), {"ss_output_name": "same"})
    save_file(tensors, str(tmp_path / "c.safetensors"), {"ss_output_name": "a"})
    cat = LoraCatalog.scan(sorted(tmp_path.iterdir()))
    with pytest.raises(UnknownName):
        cat.resolve("same")  # webui's forbidden alias: two files claim it
    assert cat.resolve("a").name == "a"  # a file name beats another file's alias


def test_unknown_name_lists_close_matches_first(catalog: LoraCatalog) -> None:
    with pytest.raises(UnknownName) as caught:
        catalog.resolve("tiny-lora-sd1", field="prompt")
    assert caught.value.choices[0] == LORA_SD1
    assert set(caught.value.choices) == {LORA_SD1, LORA_SDXL}
    assert "prompt" in str(caught.value) and "tiny-lora-sd1" in str(caught.value)


_OPENED: list[str] = []
_RECORDING: list[bool] = []


def _audit(event: str, args: tuple[Any, ...]) -> None:
    if _RECORDING and event in {"open", "os.open"}:
        _OPENED.append(str(args[0]))


@pytest.mark.parametrize(
    "name",
    [
        "../x",
        "../loras/tiny-lora-sd15",
        "/etc/passwd",
        "a\x00b",
        "..\\tiny-lora-sd15",
        "loras/tiny-lora-sd15",
        "",
    ],
)
def test_path_like_names_match_nothing_and_open_nothing(catalog: LoraCatalog, name: str) -> None:
    if not getattr(sys.modules[__name__], "_HOOKED", False):
        sys.addaudithook(_audit)
        globals()["_HOOKED"] = True
    _OPENED.clear()
    _RECORDING.append(True)
    try:
        with pytest.raises(UnknownName):
            catalog.resolve(name)
    finally:
        _RECORDING.clear()
    assert _OPENED == []


_KOHYA_MID = "mid_block_attentions_0_transformer_blocks_0"
_PEFT_MID = "mid_block.attentions.0.transformer_blocks.0"


@pytest.mark.parametrize(
    ("metadata", "keys", "family"),
    [
        ({"ss_base_model_version": "sdxl_base_v1-0"}, {}, Family.SDXL),
        ({"ss_base_model_version": "sd_v2_768_v"}, {}, Family.SD2),
        ({"ss_base_model_version": "sd_v1"}, {}, Family.SD1),
        ({"ss_v2": "True"}, {}, Family.SD2),
        ({"modelspec.architecture": "stable-diffusion-xl-v1-base/lora"}, {}, Family.SDXL),
        (
            {},
            {"lora_te2_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": (4, 1280)},
            Family.SDXL,
        ),
        ({}, {f"lora_unet_{_KOHYA_MID}_attn2_to_k.lora_down.weight": (4, 768)}, Family.SD1),
        ({}, {f"unet.{_PEFT_MID}.attn2.to_k.lora_A.weight": (4, 1024)}, Family.SD2),
        ({}, {"lora_unet_x_attn2_to_k.lora_down.weight": (4, 64)}, None),
        ({"ss_base_model_version": "flux1"}, {}, None),
    ],
)
def test_guess_family(
    metadata: dict[str, str], keys: dict[str, tuple[int, ...]], family: Family | None
) -> None:
    assert guess_family(metadata, keys) == family


# --------------------------------------------------------------------------- weights


def _info(name: str, adapter: str) -> LoraInfo:
    return LoraInfo(name, name, Path(f"/m/{name}.safetensors"), {}, "0" * 12, None, adapter)


@pytest.mark.parametrize(
    ("mentions", "expected"),
    [
        # webui: one name twice is one Network object at its LAST weights, applied twice.
        ([("x", "A", 0.2, 0.3), ("x", "A", 0.6, 0.5)], [("A", 1.2, 1.0)]),
        # Name and alias of one file are two objects: their weights add up.
        ([("x", "A", 0.2, 0.3), ("alias", "A", 0.6, 0.5)], [("A", 0.8, 0.8)]),
        ([("x", "A", 1.0, 0.0), ("y", "B", -0.5, 2.0)], [("A", 1.0, 0.0), ("B", -0.5, 2.0)]),
    ],
)
def test_combine_requests(
    mentions: list[tuple[str, str, float, float]], expected: list[tuple[str, float, float]]
) -> None:
    pairs = [(_info(name, aid), LoraRequest(name, te, unet)) for name, aid, te, unet in mentions]
    got = [(u.info.adapter_id, u.te_weight, u.unet_weight) for u in combine_requests(pairs)]
    assert got == [pytest.approx(e) for e in expected]


def test_lora_hashes_infotext() -> None:
    a, b = _info("a", "A"), _info("b", "B")
    pairs = [(a, req("a:1,x")), (b, req("b")), (a, req("a:1,x"))]
    assert lora_hashes(pairs) == "a1x: 000000000000, b: 000000000000"
    assert lora_hashes([]) is None


# --------------------------------------------------------------------------- applying


def test_lora_changes_outputs_and_leaves_them_exact(
    engine: Engine, manager: Callable[..., LoraManager]
) -> None:
    loaded = _loaded(engine, SD1)
    base = outputs(loaded)
    mgr = manager()
    with mgr.applied([req(LORA_SD1, 1.0)]) as pairs:
        assert [(i.name, r.name) for i, r in pairs] == [(LORA_SD1, LORA_SD1)]
        assert _active(loaded) == {pairs[0][0].adapter_id}  # through peft's own property
        with_lora = outputs(loaded)
    assert same(base, with_lora) == {"text_encoder": False, "unet": False}
    assert _active(loaded) == set()
    assert same(base, outputs(loaded)) == {"text_encoder": True, "unet": True}
    assert mgr.cached() == [LORA_SD1]


@pytest.mark.parametrize(
    ("te", "unet", "changed"),
    [
        (0.0, 1.0, {"text_encoder": False, "unet": True}),
        (1.0, 0.0, {"text_encoder": True, "unet": False}),
    ],
)
def test_split_weights_touch_only_their_part(
    engine: Engine,
    manager: Callable[..., LoraManager],
    te: float,
    unet: float,
    changed: dict[str, bool],
) -> None:
    loaded = _loaded(engine, SD1)
    base = outputs(loaded)
    with manager().applied([req(LORA_SD1, te, unet)]):
        got = outputs(loaded)
    assert {k: not v for k, v in same(base, got).items()} == changed
    assert same(base, outputs(loaded)) == {"text_encoder": True, "unet": True}


def test_two_loras_and_weight_changes_load_no_file_again(
    engine: Engine, manager: Callable[..., LoraManager], monkeypatch: pytest.MonkeyPatch
) -> None:
    loaded = _loaded(engine, SD1)
    base = outputs(loaded)
    reads: list[Path] = []
    loads: list[Any] = []
    real_read, real_load = networks.read_lora_state_dict, loaded.pipe.load_lora_weights
    monkeypatch.setattr(networks, "read_lora_state_dict", spy(reads, real_read))
    monkeypatch.setattr(
        loaded.pipe,
        "load_lora_weights",
        spy(loads, real_load),
    )
    mgr = manager()
    results = {}
    for label, requests in {
        "a": [req(LORA_SD1, 0.5)],
        "b": [req("other", 0.5)],
        "ab": [req(LORA_SD1, 0.5), req("other", 0.5)],
        "a2": [req(LORA_SD1, 0.9)],
        "a-twice": [req(LORA_SD1, 0.45), req(LORA_SD1, 0.45)],  # webui: 2 x last = 0.9
    }.items():
        with mgr.applied(requests):
            results[label] = outputs(loaded)
        assert same(base, outputs(loaded)) == {"text_encoder": True, "unet": True}
    assert len(reads) == 2 and len(loads) == 2  # one per file, none for weight changes
    for one, other in [("ab", "a"), ("ab", "b"), ("a", "b"), ("a2", "a")]:
        assert not any(same(results[one], results[other]).values()), (one, other)
    # The same adapter at the same total weight: the very same numbers.
    assert all(same(results["a2"], results["a-twice"]).values())


def test_sdxl_lora_on_sdxl(engine: Engine, manager: Callable[..., LoraManager]) -> None:
    loaded = _loaded(engine, SDXL)
    base = outputs(loaded)
    with manager(SDXL).applied([req(LORA_SDXL, 0.8)]):
        got = outputs(loaded)
    assert same(base, got) == {"text_encoder": False, "text_encoder_2": False, "unet": False}
    assert all(same(base, outputs(loaded)).values())


@pytest.mark.parametrize(
    ("checkpoint", "lora"), [(SDXL, LORA_SD1), (SD1, LORA_SDXL), (SD2, LORA_SD1)]
)
def test_wrong_family_is_refused_before_touching_the_pipeline(
    engine: Engine, manager: Callable[..., LoraManager], checkpoint: str, lora: str
) -> None:
    loaded = _loaded(engine, checkpoint)
    base = outputs(loaded)
    mgr = manager(checkpoint)
    with pytest.raises(RequestError) as caught, mgr.applied([req(lora)]):
        pytest.fail("the body must not run")
    assert "prompt" in str(caught.value) and lora in str(caught.value)
    assert _tuner_layers(loaded) == [] and mgr.cached() == []
    assert all(same(base, outputs(loaded)).values())


def test_all_problems_reported_at_once(engine: Engine, manager: Callable[..., LoraManager]) -> None:
    mgr = manager(SDXL)
    bad = [req("nope"), req(LORA_SD1), LoraRequest(LORA_SDXL, float("nan"), 1.0), req("nada")]
    with pytest.raises(RequestError) as caught, mgr.applied(bad, field="prompt"):
        pytest.fail("the body must not run")
    assert len(caught.value.problems) == 4
    assert _tuner_layers(mgr.loaded) == []


def test_cache_bound_evicts_least_recently_used(
    engine: Engine, manager: Callable[..., LoraManager], monkeypatch: pytest.MonkeyPatch
) -> None:
    loaded = _loaded(engine, SD1)
    base = outputs(loaded)
    deleted: list[list[str]] = []
    real_delete = loaded.pipe.delete_adapters
    monkeypatch.setattr(
        loaded.pipe,
        "delete_adapters",
        spy(deleted, real_delete),
    )
    mgr = manager(max_cached=1)
    with mgr.applied([req(LORA_SD1)]) as pairs:
        a_id = pairs[0][0].adapter_id
        with_a = outputs(loaded)
    with mgr.applied([req("other")]) as pairs:
        b_id = pairs[0][0].adapter_id
        with_b = outputs(loaded)
    assert deleted == [[a_id]]
    assert mgr.cached() == ["other"] and _adapters(loaded) == {b_id}
    assert all(same(base, outputs(loaded)).values())
    with mgr.applied([req(LORA_SD1)]):  # reloaded: the same numbers as the first time
        assert all(same(with_a, outputs(loaded)).values())
    assert not any(same(with_a, with_b).values())
    # One request may need more than the bound; it is trimmed back afterwards.
    with mgr.applied([req(LORA_SD1), req("other")]):
        assert len(_adapters(loaded)) == 2
    assert len(mgr.cached()) == 1 and all(same(base, outputs(loaded)).values())


@pytest.mark.parametrize("error", [ValueError("boom"), FakeCancel()])
def test_exception_in_body_leaves_no_adapter_active(
    engine: Engine, manager: Callable[..., LoraManager], error: BaseException
) -> None:
    loaded = _loaded(engine, SD1)
    base = outputs(loaded)
    mgr = manager()
    with pytest.raises(type(error)), mgr.applied([req(LORA_SD1), req("other", 0.3, 0.7)]):
        assert len(_active(loaded)) == 2
        raise error
    assert _active(loaded) == set()
    assert all(same(base, outputs(loaded)).values())
    with mgr.applied([]):  # no LoRA: nothing to switch
        assert _active(loaded) == set()


@pytest.mark.parametrize(
    ("bad", "why"),
    [("broken", "tensor shapes do not fit"), ("stray", "not found in the base model")],
)
def test_failed_load_keeps_only_the_adapters_that_were_there(
    engine: Engine, manager: Callable[..., LoraManager], bad: str, why: str
) -> None:
    loaded = _loaded(engine, SD1)
    base = outputs(loaded)
    mgr = manager()
    with mgr.applied([req(LORA_SD1)]):
        with_a = outputs(loaded)
    before = _adapters(loaded)
    with pytest.raises(RequestError) as caught, mgr.applied([req(LORA_SD1), req(bad)]):
        pytest.fail("the body must not run")
    assert bad in str(caught.value) and why in str(caught.value)
    assert _adapters(loaded) == before and mgr.cached() == [LORA_SD1]
    assert _active(loaded) == set()
    assert all(same(base, outputs(loaded)).values())
    with mgr.applied([req(LORA_SD1)]):
        assert all(same(with_a, outputs(loaded)).values())


def test_failed_first_load_leaves_a_pristine_pipeline(
    engine: Engine, manager: Callable[..., LoraManager]
) -> None:
    loaded = _loaded(engine, SD1)
    base = outputs(loaded)
    with pytest.raises(RequestError), manager().applied([req("broken")]):
        pytest.fail("the body must not run")
    assert _tuner_layers(loaded) == []
    assert all(same(base, outputs(loaded)).values())


def test_a_generation_through_a_task_pipeline(
    engine: Engine, manager: Callable[..., LoraManager]
) -> None:
    from diffusers import StableDiffusionPipeline

    loaded = _loaded(engine, SD1)

    def image() -> torch.Tensor:
        # Like the engine's per-request pipelines: from_pipe shares the cached modules.
        scheduler = type(loaded.pipe.scheduler).from_config(loaded.pipe.scheduler.config)
        pipe = StableDiffusionPipeline.from_pipe(loaded.pipe, scheduler=scheduler)
        pipe.set_progress_bar_config(disable=True)
        latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(3))
        out = pipe(
            "a lighthouse",
            num_inference_steps=2,
            height=64,
            width=64,
            latents=latents,
            output_type="pt",
        )
        return out.images

    base = image()
    with manager().applied([req(LORA_SD1)]):
        assert not torch.equal(base, image())
    assert torch.equal(base, image())


def test_nested_use_is_refused(engine: Engine, manager: Callable[..., LoraManager]) -> None:
    mgr = manager()
    with mgr.applied([req(LORA_SD1)]), pytest.raises(RuntimeError), mgr.applied([req("other")]):
        pass
    assert _active(mgr.loaded) == set()


def test_switching_cached_loras_walks_no_modules(
    engine: Engine, manager: Callable[..., LoraManager], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A weight change on cached adapters touches only the LoRA layers: no module walk, no
    file, nothing that grows with the number of cached adapters (peft's set_adapter does)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    mgr = manager(SDXL)
    with mgr.applied([req(LORA_SDXL, 0.3)]):
        pass

    def forbidden(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("not on the switching path")

    for owner, name in [
        (torch.nn.Module, "modules"),
        (torch.nn.Module, "named_modules"),
        (BaseTunerLayer, "set_adapter"),
        (networks, "read_lora_state_dict"),
    ]:
        monkeypatch.setattr(owner, name, forbidden)
    with mgr.applied([req(LORA_SDXL, 0.9, -0.4)]):
        assert len(_active_fast(mgr)) == 1
    monkeypatch.undo()
    assert _active(mgr.loaded) == set()


def _active_fast(mgr: LoraManager) -> set[str]:
    # The manager's own index (modules() is forbidden in the test above).
    return {n for layers in mgr._layers.values() for layer in layers for n in layer.active_adapters}


def test_zero_weight_loads_nothing(engine: Engine, manager: Callable[..., LoraManager]) -> None:
    mgr = manager()
    with mgr.applied([req(LORA_SD1, 0.0)]) as pairs:
        assert [i.name for i, _ in pairs] == [LORA_SD1]  # still reported, like webui's infotext
        assert _tuner_layers(mgr.loaded) == []
    assert mgr.cached() == []


def test_lora_data_hashes_are_cached_across_restarts(
    lora_files: tuple[Path, ...], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A restart reads only headers of unchanged LoRA files; a changed file is hashed again."""
    from engine import networks
    from engine.catalog import HashCache

    cache_file = tmp_path / "hashes.json"
    first = LoraCatalog.scan(lora_files, HashCache(cache_file))
    calls: list[Path] = []
    real = networks.data_sha256

    def counting(path: Path) -> str:
        calls.append(path)
        return real(path)

    monkeypatch.setattr(networks, "data_sha256", counting)
    again = LoraCatalog.scan(lora_files, HashCache(cache_file))
    assert calls == []
    assert [i.addnet_hash for i in again.loras] == [i.addnet_hash for i in first.loras]
    assert [i.adapter_id for i in again.loras] == [i.adapter_id for i in first.loras]
    copy = tmp_path / "copy.safetensors"
    copy.write_bytes(lora_files[0].read_bytes())
    LoraCatalog.scan([copy], HashCache(cache_file))
    assert calls == [copy]


# --------------------------------------------------------------------------- LoCon


def test_locon_conv_layers_change_the_picture_and_are_listed(
    tiny_models_dir: Path, tmp_path: Path
) -> None:
    """A kohya LoCon holding only 3x3-conv pairs (lora_unet_down_blocks_0_resnets_0_conv1...):
    the picture changes, by the conv layers alone, and webui's "Lora hashes" names it."""
    from engine.api import EngineConfig
    from scripts import make_tiny_models as tiny

    from .helpers import assert_pixels_changed, payload

    models = tmp_path / "models"
    (models / "checkpoints").mkdir(parents=True)
    (models / "checkpoints" / SD1).write_bytes((tiny_models_dir / "checkpoints" / SD1).read_bytes())
    locon = tiny.write_safetensors(
        models / "loras" / "tiny-locon.safetensors",
        tiny.sd1_locon(tiny.SD1, tiny.LORA),
        seed=0,
        dtype=torch.float16,
        metadata=tiny.kohya_metadata("tiny-locon", "sd_v1", tiny.LORA, v2=False),
    )
    shapes = {k: tuple(v.shape) for k, v in load_file(str(locon)).items()}
    assert shapes["lora_unet_down_blocks_0_resnets_0_conv1.lora_down.weight"] == (4, 32, 3, 3)
    assert shapes["lora_unet_down_blocks_0_resnets_0_conv1.lora_up.weight"] == (32, 4, 1, 1)
    assert not any("attn" in k or "lora_te" in k for k in shapes)
    small = Engine.setup(EngineConfig(models_dir=models, cache_dir=models / ".cache"))

    def run(prompt: str) -> tuple[list[bytes], str]:
        response = small.handle("txt2img", payload(prompt=prompt))
        return [i.data for i in response.images], json.loads(response.info)["infotexts"][0]

    plain, _ = run("a lighthouse on a cliff")
    with_locon, infotext = run("a lighthouse on a cliff <lora:tiny-locon:1>")
    assert_pixels_changed(plain, with_locon)
    assert 'Lora hashes: "tiny-locon: ' in infotext
    again, _ = run("a lighthouse on a cliff")
    assert again == plain  # nothing left behind
