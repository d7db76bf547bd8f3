"""The webui prompt language, LoRA, embeddings and VAE end to end on the tiny models."""

from __future__ import annotations

import json
from typing import Any

import pytest
import torch

from engine.api import Engine
from engine.conditioning import TextConditioner, apply_emphasis, run_encoder
from engine.errors import RequestError, UnknownName

from .helpers import SD1, SDXL, assert_pixels_changed, payload, pixels, with_model


def run(engine: Engine, body: str) -> tuple[list[bytes], dict[str, Any]]:
    response = engine.handle("txt2img", body, lambda s, t: None)
    return [image.data for image in response.images], json.loads(response.info)


def image(engine: Engine, **changes: Any) -> bytes:
    return pixels(run(engine, payload(**changes))[0][0]).tobytes()


def loaded(engine: Engine, name: str) -> Any:
    return next(c for c in engine.models.cache.loaded.values() if c.info.name == name)


# -- the text encoder path -------------------------------------------------------------------


@pytest.mark.parametrize("name", [SD1, SDXL])
def test_layer_by_layer_encoder_matches_the_model_forward(engine: Engine, name: str) -> None:
    pipe = loaded(engine, name).pipe
    ids = pipe.tokenizer(
        ["a photo of a cat"], padding="max_length", max_length=77, return_tensors="pt"
    ).input_ids
    with torch.no_grad():
        reference = pipe.text_encoder(ids, output_hidden_states=True)
        model = getattr(pipe.text_encoder, "text_model", pipe.text_encoder)
        states, last = run_encoder(pipe.text_encoder, ids, model.embeddings.token_embedding(ids))
    assert torch.equal(last, reference.last_hidden_state)
    assert torch.equal(states[-2], reference.hidden_states[-2])


def test_plain_prompt_encoding_is_weight_neutral(engine: Engine) -> None:
    cond = TextConditioner(loaded(engine, SD1), clip_skip=1)
    plain = cond.encode("a red house")
    same = cond.encode("a (red:1.0) house")
    assert torch.equal(plain.embeds, same.embeds)


# -- the grammar changes the picture where it should -----------------------------------------


@pytest.mark.parametrize(
    "prompt",
    ["a (lighthouse:1.5) on a cliff", "a [lighthouse] on a cliff", "a ((lighthouse)) on a cliff"],
)
def test_emphasis_changes_the_image(engine: Engine, prompt: str) -> None:
    assert image(engine, prompt=prompt) != image(engine)


def test_emphasis_modes(engine: Engine) -> None:
    weighted = "a (lighthouse:1.5) on a cliff"
    plain = image(engine)
    assert image(engine, prompt=weighted, override_settings={"emphasis": "No norm"}) != plain
    ignore = image(engine, prompt=weighted, override_settings={"emphasis": "Ignore"})
    assert ignore == plain


def test_original_emphasis_restores_the_chunk_mean() -> None:
    z = torch.rand(1, 77, 8) + 0.5  # a real encoder's output has a mean far from 0
    weights = torch.ones(77)
    weights[3:6] = 1.5
    original = apply_emphasis(z, weights, "Original")
    no_norm = apply_emphasis(z, weights, "No norm")
    assert torch.allclose(original.mean(), z.mean())
    assert torch.allclose(no_norm[0, 3], z[0, 3] * 1.5)
    assert not torch.allclose(no_norm.mean(), z.mean())
    assert torch.equal(apply_emphasis(z, weights, "Ignore"), z)


def test_prompt_editing_switches_mid_way(engine: Engine) -> None:
    a = image(engine, prompt="a lighthouse", steps=6)
    b = image(engine, prompt="a castle", steps=6)
    edited = image(engine, prompt="a [lighthouse:castle:3]", steps=6)
    assert edited not in (a, b)
    assert image(engine, prompt="a [lighthouse:castle:100]", steps=6) == a


def test_alternation_and_composable_prompts(engine: Engine) -> None:
    a = image(engine, prompt="a lighthouse")
    assert image(engine, prompt="a [lighthouse|castle]") != a
    assert image(engine, prompt="a lighthouse AND a castle :0.5") != a
    # AND with one part at weight 1 is the plain prompt.
    assert image(engine, prompt="a lighthouse :1") == a


def test_long_prompts_and_break_use_more_chunks(engine: Engine) -> None:
    cond = TextConditioner(loaded(engine, SD1), clip_skip=1)
    long_prompt = ", ".join(f"word{i}" for i in range(60))
    tokens = len(
        loaded(engine, SD1).pipe.tokenizer(long_prompt, add_special_tokens=False).input_ids
    )
    assert tokens > 150
    assert cond.encode(long_prompt).embeds.shape[1] == 77 * (1 + (tokens - 1) // 75) or (
        cond.encode(long_prompt).embeds.shape[1] > 77 * 2  # comma back-off may add a chunk
    )
    assert cond.encode("a lighthouse BREAK a castle").embeds.shape[1] == 77 * 2
    images, info = run(engine, payload(prompt=long_prompt, negative_prompt="short"))
    assert len(images) == 1 and info["prompt"] == long_prompt


def test_hostile_prompts_stay_finite(engine: Engine) -> None:
    cond = TextConditioner(loaded(engine, SD1), clip_skip=1)
    for prompt in [
        "(" * 5000 + "x",
        "(x:1e309)",
        "(x:99999)",
        "[[[a:b:0.5]",
        "a ) ] ( [",
        "(x:nan)",
    ]:
        assert torch.isfinite(cond.encode(prompt).embeds).all(), prompt


def test_sdxl_prompt_language(engine: Engine) -> None:
    plain = pixels(run(engine, with_model(SDXL))[0][0]).tobytes()
    weighted = pixels(run(engine, with_model(SDXL, prompt="a (lighthouse:1.4)"))[0][0]).tobytes()
    assert plain != weighted


# -- LoRA ------------------------------------------------------------------------------------


def test_lora_changes_the_image_and_nothing_is_left_behind(engine: Engine) -> None:
    plain = image(engine)
    with_lora, info = run(engine, payload(prompt="a lighthouse on a cliff <lora:tiny-lora-sd15:1>"))
    assert pixels(with_lora[0]).tobytes() != plain
    text = info["infotexts"][0]
    assert "<lora:tiny-lora-sd15:1>" in text.split("\n")[0]  # webui keeps the tag in the infotext
    assert 'Lora hashes: "tiny-lora-sd15: ' in text
    assert image(engine) == plain  # the next plain request is byte-identical


def test_lora_weights_and_split_weights(engine: Engine) -> None:
    base = "a lighthouse on a cliff "
    full = image(engine, prompt=base + "<lora:tiny-lora-sd15:1>")
    half = image(engine, prompt=base + "<lora:tiny-lora-sd15:0.5>")
    te_only = image(engine, prompt=base + "<lora:tiny-lora-sd15:1:0>")
    unet_only = image(engine, prompt=base + "<lora:tiny-lora-sd15:0:1>")
    assert len({full, half, te_only, unet_only}) == 4
    assert image(engine, prompt=base + "<lora:tiny-lora-sd15:1>") == full  # weight change back


def test_lora_alias_and_sdxl_lora(engine: Engine) -> None:
    plain = pixels(run(engine, with_model(SDXL))[0][0]).tobytes()
    lora = run(engine, with_model(SDXL, prompt="a lighthouse on a cliff <lora:tiny-lora-sdxl:0.8>"))
    assert pixels(lora[0][0]).tobytes() != plain
    assert pixels(run(engine, with_model(SDXL))[0][0]).tobytes() == plain


def test_lora_errors_name_the_problem(engine: Engine) -> None:
    with pytest.raises(UnknownName) as err:
        run(engine, payload(prompt="x <lora:tiny-lora-sd1:1>"))
    assert "tiny-lora-sd15" in str(err.value)  # close matches listed
    with pytest.raises(RequestError, match="sdxl"):
        run(engine, payload(prompt="x <lora:tiny-lora-sdxl:1>"))
    for hostile in ("../loras/tiny-lora-sd15", "/etc/passwd", "tiny\x00lora"):
        with pytest.raises(UnknownName):
            run(engine, payload(prompt=f"x <lora:{hostile}:1>"))


def test_lora_tag_in_the_negative_prompt_is_literal_text(engine: Engine) -> None:
    images, _ = run(engine, payload(negative_prompt="<lora:tiny-lora-sd15:1>"))
    assert len(images) == 1


def test_disable_extra_networks(engine: Engine) -> None:
    plain = image(engine, prompt="a lighthouse on a cliff")
    disabled = image(
        engine,
        prompt="a lighthouse on a cliff <lora:tiny-lora-sd15:1>",
        disable_extra_networks=True,
    )
    assert disabled == plain


# -- LoRAs of the hires pass: webui parses hr_prompt's own tags (hr_extra_network_data) and
# activates them for the second pass; hr_prompt defaults to the prompt, tags included.

HIRES: dict[str, Any] = {"enable_hr": True, "hr_scale": 1.5, "denoising_strength": 0.6}
BASE = "a lighthouse on a cliff"
TAG = " <lora:tiny-lora-sd15:1>"


def test_hr_prompt_lora_changes_the_second_pass_only(engine: Engine) -> None:
    plain, _ = run(engine, payload(prompt=BASE, **HIRES))
    with_hr_lora, info = run(engine, payload(prompt=BASE, hr_prompt=BASE + TAG, **HIRES))
    assert_pixels_changed(plain, with_hr_lora)
    text = info["infotexts"][0]
    assert 'Lora hashes: "tiny-lora-sd15: ' in text
    assert f'Hires prompt: "{BASE}{TAG}"' in text
    # With denoising 0 the second pass does not run: the hires LoRA must change nothing, so
    # the first pass never saw it.
    still = {**HIRES, "denoising_strength": 0}
    unrun = run(engine, payload(prompt=BASE, hr_prompt=BASE + TAG, **still))[0]
    assert (
        pixels(unrun[0]).tobytes()
        == pixels(run(engine, payload(prompt=BASE, **still))[0][0]).tobytes()
    )
    assert run(engine, payload(prompt=BASE, **HIRES))[0] == plain  # nothing left behind


def test_hr_prompt_without_the_tag_runs_the_second_pass_without_the_lora(
    engine: Engine,
) -> None:
    both, _ = run(engine, payload(prompt=BASE + TAG, **HIRES))  # hr_prompt defaults: tag kept
    first_only, info = run(engine, payload(prompt=BASE + TAG, hr_prompt=BASE, **HIRES))
    plain, _ = run(engine, payload(prompt=BASE, **HIRES))
    assert_pixels_changed(both, first_only)
    assert_pixels_changed(plain, first_only)
    assert 'Lora hashes: "tiny-lora-sd15: ' in info["infotexts"][0]


def test_unknown_lora_in_hr_prompt_is_an_error_naming_the_field(engine: Engine) -> None:
    with pytest.raises(UnknownName, match="hr_prompt") as err:
        run(engine, payload(prompt=BASE, hr_prompt=BASE + " <lora:tiny-lora-sd1:1>", **HIRES))
    assert "tiny-lora-sd15" in str(err.value)
    with pytest.raises(RequestError, match="hr_prompt"):
        run(engine, payload(prompt=BASE, hr_prompt=BASE + " <lora:tiny-lora-sd15:nan>", **HIRES))


# -- embeddings ------------------------------------------------------------------------------


def test_embedding_changes_the_image_only_when_named(engine: Engine) -> None:
    plain = image(engine, prompt="a lighthouse")
    named, info = run(engine, payload(prompt="a lighthouse, tiny-embedding"))
    other = image(engine, prompt="a lighthouse, tiny-embedded")
    assert pixels(named[0]).tobytes() != plain
    assert (
        'TI hashes: "tiny-embedding: ' in info["infotexts"][0]
        or "TI hashes: tiny-embedding: " in info["infotexts"][0]
    )
    assert other != pixels(named[0]).tobytes()
    assert image(engine, prompt="a lighthouse") == plain


def test_sdxl_embedding_and_negative_embedding(engine: Engine) -> None:
    plain = pixels(run(engine, with_model(SDXL))[0][0]).tobytes()
    named = pixels(
        run(engine, with_model(SDXL, negative_prompt="tiny-embedding-sdxl"))[0][0]
    ).tobytes()
    assert named != plain


# -- VAE -------------------------------------------------------------------------------------


def test_vae_switch_and_back_restores_the_bytes(engine: Engine) -> None:
    plain, _ = run(engine, payload())
    other, other_info = run(engine, payload(override_settings={"sd_vae": "tiny-vae.safetensors"}))
    assert pixels(other[0]).tobytes() != pixels(plain[0]).tobytes()
    assert other_info["sd_vae_name"] == "tiny-vae" and len(other_info["sd_vae_hash"]) == 10
    assert (
        "VAE hash: " in other_info["infotexts"][0] and "VAE: tiny-vae" in other_info["infotexts"][0]
    )
    again, again_info = run(engine, payload())
    assert again == plain and again_info["sd_vae_name"] is None
    none, _ = run(engine, payload(override_settings={"sd_vae": "None"}))
    assert none == plain


def test_unknown_vae_lists_the_choices(engine: Engine) -> None:
    with pytest.raises(UnknownName) as err:
        run(engine, payload(override_settings={"sd_vae": "../vae/tiny-vae.safetensors"}))
    assert "override_settings.sd_vae" in str(err.value) and "tiny-vae.safetensors" in str(err.value)


@pytest.mark.parametrize(
    ("endpoint", "check"),
    [
        ("loras", lambda d: {e["name"] for e in d} == {"tiny-lora-sd15", "tiny-lora-sdxl"}),
        ("embeddings", lambda d: "tiny-embedding" in d["loaded"]),
        ("sd-vae", lambda d: d[0]["model_name"] == "tiny-vae.safetensors"),
    ],
)
def test_network_listings(engine: Engine, endpoint: str, check: Any) -> None:
    assert check(engine.handle(endpoint, "{}").listing)


def test_lycoris_loha_is_refused_clearly_and_the_pipeline_untouched(
    engine: Engine, tmp_path: Any
) -> None:
    from safetensors.torch import save_file

    from engine.networks import LoraCatalog, LoraManager, LoraRequest

    key = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    tensors = {f"{key}.hada_w{i}_{ab}": torch.randn(8, 8) for i in (1, 2) for ab in "ab"}
    tensors[f"{key}.alpha"] = torch.tensor(4.0)
    path = tmp_path / "my-loha.safetensors"
    save_file(tensors, str(path))
    manager = LoraManager(loaded(engine, SD1), LoraCatalog.scan([path]))
    before = image(engine)
    with (
        pytest.raises(RequestError, match="LyCORIS LOHA"),
        manager.applied([LoraRequest("my-loha", 1, 1)]),
    ):
        pass
    assert manager.cached() == []
    assert image(engine) == before


def test_diffusers_format_lora_matches_the_kohya_file(
    engine: Engine, tiny_models_dir: Any, tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same LoRA saved in diffusers/peft format gives the same pixels as the kohya file."""
    from diffusers import StableDiffusionPipeline
    from peft.utils import get_peft_model_state_dict

    from engine.catalog import Catalog
    from engine.loading import default_placement, load_checkpoint
    from engine.networks import LoraCatalog

    kohya = tiny_models_dir / "loras" / "tiny-lora-sd15.safetensors"
    scratch = load_checkpoint(
        Catalog.scan(tiny_models_dir).resolve_checkpoint(SD1),
        default_placement(),
        tmp_path / "cache",
    ).pipe
    scratch.load_lora_weights(str(kohya), adapter_name="x")
    StableDiffusionPipeline.save_lora_weights(
        str(tmp_path / "out"),
        unet_lora_layers=get_peft_model_state_dict(scratch.unet, adapter_name="x"),
        text_encoder_lora_layers=get_peft_model_state_dict(scratch.text_encoder, adapter_name="x"),
    )
    diffusers_file = tmp_path / "tiny-lora-diffusers.safetensors"
    (tmp_path / "out" / "pytorch_lora_weights.safetensors").rename(diffusers_file)
    # Both files served by the engine (its catalog and its managers' catalogs).
    catalog = LoraCatalog.scan([*(i.path for i in engine.models.loras.loras), diffusers_file])
    monkeypatch.setattr(engine.models, "loras", catalog)
    for manager in engine.models.lora_managers.values():
        monkeypatch.setattr(manager, "catalog", catalog)
    plain = image(engine)
    # The kohya file scales by alpha / rank = 0.5; the diffusers file was saved without that
    # metadata (scale 1), so weight 0.5 there is weight 1 here.
    converted = image(engine, prompt="a lighthouse on a cliff <lora:tiny-lora-diffusers:0.5>")
    kohya_image = image(engine, prompt="a lighthouse on a cliff <lora:tiny-lora-sd15:1>")
    changed = torch.tensor(list(converted), dtype=torch.int16) - torch.tensor(
        list(plain), dtype=torch.int16
    )
    assert changed.abs().max() > 8  # the LoRA was applied
    diff = torch.tensor(list(converted), dtype=torch.int16) - torch.tensor(
        list(kohya_image), dtype=torch.int16
    )
    assert diff.abs().max() <= 1  # same weights, another file format
    sd1 = engine.models.lora_manager(loaded(engine, SD1))
    assert sd1.drop(catalog.resolve("tiny-lora-diffusers").adapter_id)  # the engine as it was
    monkeypatch.undo()
    assert image(engine) == plain


def test_lora_manager_survives_other_code_removing_its_adapters(engine: Engine) -> None:
    """If something else clears the shared pipeline's adapters, the next LoRA request still
    applies its LoRA (the manager notices and reloads) and plain requests stay plain."""
    from engine.networks import LoraManager

    plain = image(engine)
    tagged = "a lighthouse on a cliff <lora:tiny-lora-sd15:1>"
    first = image(engine, prompt=tagged)
    LoraManager(loaded(engine, SD1), engine.models.loras).clear()  # another manager's clear()
    assert image(engine, prompt=tagged) == first
    assert image(engine) == plain


class _Trap:
    def __init__(self, marker: Any):
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        from pathlib import Path

        return (Path.write_text, (self.marker, "pwned"))


def test_pt_embeddings_load_weights_only_and_traps_never_run(tmp_path: Any) -> None:
    from engine.embeddings import EmbeddingCatalog

    good = tmp_path / "webui-style.pt"
    torch.save(
        {"string_to_param": {"*": torch.randn(3, 64)}, "name": "webui-style", "step": 10}, good
    )
    marker = tmp_path / "marker"
    evil = tmp_path / "evil.pt"
    torch.save({"string_to_param": {"*": _Trap(marker)}}, evil)
    catalog = EmbeddingCatalog.scan([good, evil])
    assert catalog.get("webui-style").vectors_for("clip_l", 64).shape == (3, 64)
    assert "evil" in catalog.skipped and not marker.exists()


def test_automatic_vae_is_the_same_name_file(engine: Engine, tmp_path: Any) -> None:
    import shutil

    from engine.vae import VaeCatalog

    vaes = engine.models.vaes
    assert vaes is not None
    source = next(iter(vaes.files.values())).path
    near = tmp_path / "tiny-sd15.vae.safetensors"
    shutil.copy(source, near)
    catalog = VaeCatalog.scan([near], vaes.placement, tmp_path)
    sd1 = loaded(engine, SD1)
    chosen = catalog.choose("Automatic", sd1)
    assert chosen.file is not None and chosen.file.name == "tiny-sd15.vae.safetensors"
    assert catalog.choose("Automatic", loaded(engine, SDXL)).file is None  # no file for it: own VAE
    assert catalog.choose("None", sd1).vae is sd1.pipe.vae


def test_prompt_comments_are_dropped_before_tags_are_read(engine: Engine) -> None:
    """webui's Comments script: `#` to the end of the line is not part of the prompt, so a LoRA
    tag there is not applied (an unknown one is no error) and the picture is the plain one."""
    plain, _ = run(engine, payload(prompt="a lighthouse", negative_prompt="blurry"))
    body = payload(
        prompt="a lighthouse # on a cliff <lora:no-such-lora:1>",
        negative_prompt="#all of this line\nblurry",
    )
    commented, info = run(engine, body)
    assert [pixels(i).tobytes() for i in commented] == [pixels(i).tobytes() for i in plain]
    assert info["prompt"] == "a lighthouse \n" and info["negative_prompt"] == "\nblurry"
    assert "Lora hashes" not in info["infotexts"][0]
    # Turned off (webui's enable_prompt_comments), `#` is ordinary text and the LoRA tag is read.
    with pytest.raises(UnknownName, match="no-such-lora"):
        run(engine, payload(
            prompt="a lighthouse # <lora:no-such-lora:1>",
            override_settings={"enable_prompt_comments": False},
        ))  # fmt: skip
