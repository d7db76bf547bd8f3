"""ControlNet's weight-free reference modules (reference_only, reference_adain,
reference_adain+attn): the write/read mechanics against independent formulations, then whole
requests through the engine on the tiny SD1 and SDXL checkpoints."""

from __future__ import annotations

import json
from dataclasses import replace
from typing import Any

import numpy as np
import pytest
import torch
from diffusers.models.attention_processor import AttnProcessor2_0
from PIL import Image

from engine.api import Engine
from engine.errors import RequestError
from engine.loading import LoadedCheckpoint
from engine.sampling import StepInfo
from extensions.controlnet.reference import (
    AdainLayer,
    AttentionLayer,
    Machine,
    ReferenceHook,
    ReferenceUnit,
    _State,
    adain_ranks,
    attention_ranks,
    style_fidelity,
)

from .helpers import (
    MIN_CHANGE_LEVELS,
    SD1,
    SDXL,
    b64_png,
    card_image,
    mean_pixel_change,
    payload,
    pixels,
    png_parameters,
)

MODES = ("reference_only", "reference_adain", "reference_adain+attn")
CARD = card_image(64, 64)
OTHER = Image.fromarray(
    np.random.default_rng(7).integers(0, 256, (64, 64, 3), dtype=np.uint8), "RGB"
)


def loaded(engine: Engine, name: str) -> LoadedCheckpoint:
    return next(v for k, v in engine.models.cache.loaded.items() if k.startswith(name))


# --------------------------------------------------------------------------------------------
# One layer against the formula


def _attention(q_in: torch.Tensor, kv_in: torch.Tensor, attn: Any) -> torch.Tensor:
    """Multi-head attention written out: softmax(q k^T * scale) v, then the output projection."""
    heads = attn.heads
    q, k, v = attn.to_q(q_in), attn.to_k(kv_in), attn.to_v(kv_in)

    def split(x: torch.Tensor) -> torch.Tensor:
        return x.reshape(x.shape[0], x.shape[1], heads, -1).transpose(1, 2)

    weights = torch.softmax(split(q) @ split(k).transpose(-1, -2) * attn.scale, dim=-1)
    out = (weights @ split(v)).transpose(1, 2).reshape(q.shape)
    return attn.to_out[1](attn.to_out[0](out))


@pytest.mark.parametrize("fidelity", [0.0, 0.3, 1.0])
def test_attention_read_is_self_attention_over_the_recorded_tokens(
    engine: Engine, fidelity: float
) -> None:
    unet = loaded(engine, SD1).pipe.unet
    block, _ = attention_ranks(unet)[0]
    attn = block.attn1
    gen = torch.Generator().manual_seed(0)
    width = attn.to_q.in_features
    x = torch.randn(4, 16, width, generator=gen)  # 2 negative rows, then 2 positive
    recorded = torch.randn(4, 16, width, generator=gen)
    state = _State(weight=1.0, fidelity=fidelity, negative_rows=2)
    layer = AttentionLayer(AttnProcessor2_0(), rank=0.0, state=state)
    with torch.no_grad():
        state.attention = Machine.WRITE
        written = layer(attn, recorded)
        state.attention = Machine.READ
        read = layer(attn, x)
        plain = _attention(x, x, attn)
        with_reference = _attention(x, torch.cat([x, recorded], dim=1), attn)
    assert torch.allclose(written, _attention(recorded, recorded, attn), atol=1e-5)
    # Positive rows: the reference always; negative rows: blended toward plain by fidelity.
    assert torch.allclose(read[2:], with_reference[2:], atol=1e-5)
    expected = fidelity * plain[:2] + (1 - fidelity) * with_reference[:2]
    assert torch.allclose(read[:2], expected, atol=1e-5)
    assert (plain - with_reference).abs().mean() > 1e-2  # the reference does change attention
    assert layer.bank == []  # read once, then forgotten (per step)


def test_adain_read_renormalises_to_the_recorded_statistics() -> None:
    rng = np.random.default_rng(1)
    first, second = (rng.normal(3.0, 2.0, (4, 5, 6, 6)) for _ in range(2))
    x = rng.normal(-1.0, 0.5, (4, 5, 6, 6))
    fidelity = 0.25
    state = _State(weight=1.0, fidelity=fidelity, negative_rows=2)
    layer = AdainLayer(rank=0.0, state=state)
    state.adain = Machine.WRITE
    for ref in (first, second):
        assert layer.apply(torch.from_numpy(ref).float()) is not None
    state.adain = Machine.READ
    out = layer.apply(torch.from_numpy(x).float()).numpy()

    def stats(a: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return a.mean(axis=(2, 3), keepdims=True), a.var(axis=(2, 3), keepdims=True)

    (m1, v1), (m2, v2), (m, v) = stats(first), stats(second), stats(x)
    # Two recordings: their means and variances averaged (hacked_group_norm_forward).
    renormalised = (x - m) / np.sqrt(v) * np.sqrt((v1 + v2) / 2) + (m1 + m2) / 2
    np.testing.assert_allclose(out[2:], renormalised[2:], atol=1e-4)
    blended = fidelity * x[:2] + (1 - fidelity) * renormalised[:2]
    np.testing.assert_allclose(out[:2], blended, atol=1e-4)
    assert layer.means == [] and layer.apply(torch.ones(1, 5, 2, 2)).eq(1).all()


def test_a_layer_records_only_when_the_weight_exceeds_its_rank() -> None:
    state = _State(attention=Machine.WRITE, adain=Machine.WRITE, weight=0.5)
    low, high = AdainLayer(rank=0.25, state=state), AdainLayer(rank=0.5, state=state)
    for layer in (low, high):
        layer.apply(torch.ones(1, 2, 2, 2))
    assert len(low.means) == 1 and high.means == []


@pytest.mark.parametrize(
    ("threshold", "mode", "sdxl", "hires", "expected"),
    [
        (0.5, 0, False, False, 0.5),  # Balanced: threshold_a
        (0.5, 0, True, False, 0.125),  # cubed on SDXL
        (0.5, 0, False, True, 0.0),  # the hires pass
        (0.5, 1, False, False, 0.0),  # My prompt is more important (soft injection)
        (0.5, 2, True, True, 1.0),  # ControlNet is more important (cfg injection) wins
        (0.0, 2, False, False, 1.0),
        (1.0, 0, True, False, 1.0),
    ],
)
def test_style_fidelity_as_the_extension_decides(
    threshold: float, mode: int, sdxl: bool, hires: bool, expected: float
) -> None:
    unit = ReferenceUnit(0, True, False, 1.0, 0.0, 1.0, threshold, mode, CARD)
    assert style_fidelity(unit, sdxl=sdxl, hires=hires) == expected


# --------------------------------------------------------------------------------------------
# Which layers: the extension's LDM blocks, found in diffusers' UNet


# (channels, latent size divisor) of the LDM blocks the extension renormalises, for the tiny
# UNets' widths: SD1 model_channels 32, channel_mult (1, 1, 2, 2); SDXL 32, (1, 2, 4). The
# output blocks that end a level include its upsampler (SD1 output 2 and 5, SDXL 2 and 5).
ADAIN_SHAPES = {
    SD1: [
        (64, 8),  # middle
        *[(32, 2), (32, 2), (64, 4), (64, 4), (64, 8), (64, 8)],  # input 4, 5, 7, 8, 10, 11
        *[(64, 8), (64, 8), (64, 4), (64, 4), (64, 4), (64, 2), (32, 2), (32, 2)],  # out 0-7
    ],
    SDXL: [
        (128, 4),
        *[(64, 2), (64, 2), (128, 4), (128, 4)],  # input 4, 5, 7, 8
        *[(128, 4), (128, 4), (128, 2), (64, 2), (64, 2), (64, 1)],  # output 0-5
    ],
}


@pytest.mark.parametrize("name", [SD1, SDXL])
def test_adain_blocks_are_the_extensions_ldm_blocks(engine: Engine, name: str) -> None:
    checkpoint = loaded(engine, name)
    ranks = adain_ranks(checkpoint.pipe.unet)
    size = 16
    shapes: dict[int, tuple[int, int]] = {}

    def recorder(index: int) -> Any:
        def record(module: Any, args: Any, output: Any) -> None:
            x = output[0] if isinstance(output, tuple) else output
            shapes[index] = (x.shape[1], size // x.shape[-1])

        return record

    handles = [m.register_forward_hook(recorder(i)) for i, (m, _) in enumerate(ranks)]
    try:
        with torch.no_grad():
            model_in, t, embeds, added = _unet_inputs(checkpoint, size)
            checkpoint.pipe.unet(model_in, t, embeds, added_cond_kwargs=added)
    finally:
        for handle in handles:
            handle.remove()
    assert [shapes[i] for i in range(len(ranks))] == ADAIN_SHAPES[name]
    # gn_weight, doubled: middle 0, input w of n at 2 (1 - w / n), output w of m at 2 w / m.
    n, m = (6, 8) if name == SD1 else (4, 6)
    expected = [0.0, *[2 * (1 - w / n) for w in range(n)], *[2 * w / m for w in range(m)]]
    assert [r for _, r in ranks] == expected


@pytest.mark.parametrize("name", [SD1, SDXL])
def test_attention_layers_rank_widest_first(engine: Engine, name: str) -> None:
    ranks = attention_ranks(loaded(engine, name).pipe.unet)
    widths = [block.norm1.normalized_shape[0] for block, _ in ranks]
    assert widths == sorted(widths, reverse=True) and len(set(widths)) > 1
    assert [r for _, r in ranks] == [i / len(ranks) for i in range(len(ranks))]


# --------------------------------------------------------------------------------------------
# The whole UNet: write pass, then read


def _unet_inputs(checkpoint: LoadedCheckpoint, size: int, rows: int = 4) -> tuple[Any, ...]:
    unet = checkpoint.pipe.unet
    gen = torch.Generator().manual_seed(5)
    model_in = torch.randn(rows, 4, size, size, generator=gen)
    t = torch.full((rows,), 500.0)
    embeds = torch.randn(rows, 4, unet.config.cross_attention_dim, generator=gen)
    return model_in, t, embeds, _added(checkpoint, rows, gen)


def _added(checkpoint: LoadedCheckpoint, rows: int, gen: torch.Generator) -> dict[str, Any] | None:
    unet = checkpoint.pipe.unet
    if unet.config.addition_embed_type != "text_time":
        return None
    pooled = unet.config.projection_class_embeddings_input_dim - 6 * 256
    return {
        "text_embeds": torch.randn(rows, pooled, generator=gen),
        "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]]).repeat(rows, 1),
    }


class SameInput(ReferenceHook):
    """The reference's noised latent replaced by the sample itself."""

    def _noised(self, unit: ReferenceUnit, model_in: torch.Tensor, info: StepInfo) -> torch.Tensor:
        return model_in


def _hook(
    checkpoint: LoadedCheckpoint,
    module: str,
    kind: type[ReferenceHook] = ReferenceHook,
    **changes: Any,
) -> ReferenceHook:
    attention, adain = {"reference_only": (1, 0), "reference_adain": (0, 1)}.get(module, (1, 1))
    values: dict[str, Any] = {
        "index": 0,
        "attention": bool(attention),
        "adain": bool(adain),
        "weight": 1.0,
        "guidance_start": 0.0,
        "guidance_end": 1.0,
        "style_fidelity": 0.5,
        "control_mode": 0,
        "image": CARD,
    }
    values.update(changes)
    pipe = checkpoint.pipe
    return kind((ReferenceUnit(**values),), pipe.vae, pipe.scheduler.alphas_cumprod)


def _step(checkpoint: LoadedCheckpoint, hook: ReferenceHook) -> tuple[torch.Tensor, torch.Tensor]:
    """(plain UNet output, output after the hook's write pass) for one step, 2 + 2 rows."""
    unet = checkpoint.pipe.unet
    model_in, t, embeds, added = _unet_inputs(checkpoint, 8)
    kwargs: dict[str, Any] = {"encoder_hidden_states": embeds}
    if added is not None:
        kwargs["added_cond_kwargs"] = added
    info = StepInfo(index=0, total=4, batch=2, copies=2, t=t[0], sample=model_in[:2])
    with torch.no_grad():
        plain = unet(model_in, t, **kwargs).sample
        with hook.attached(unet):
            hook(model_in, t, dict(kwargs), info)
            read = unet(model_in, t, **kwargs).sample
    return plain, read


@pytest.mark.parametrize("module", MODES)
def test_a_reference_equal_to_the_sample_changes_nothing(engine: Engine, module: str) -> None:
    # Attention over [x; x] is attention over x, and AdaIN to a tensor's own statistics is the
    # identity, layer by layer: so the read pass equals the plain UNet exactly when every
    # recording sits at its own layer and row. A misplaced record breaks this.
    checkpoint = loaded(engine, SD1)
    plain, same = _step(checkpoint, _hook(checkpoint, module, SameInput))
    assert torch.allclose(plain, same, atol=1e-4), (plain - same).abs().max()
    _, read = _step(checkpoint, _hook(checkpoint, module))
    assert (read - plain).abs().mean() > 1e-3  # a real reference does change the output


@pytest.mark.parametrize("name", [SD1, SDXL])
@pytest.mark.parametrize("module", ["reference_only", "reference_adain"])
def test_controlnet_is_more_important_leaves_the_negative_rows_alone(
    engine: Engine, name: str, module: str
) -> None:
    # Style fidelity 1 keeps the plain result on the negative rows at every layer; rows do not
    # mix in a UNet, so the negative rows of the output are the plain UNet's.
    checkpoint = loaded(engine, name)
    plain, read = _step(checkpoint, _hook(checkpoint, module, control_mode=2))
    assert torch.allclose(read[:2], plain[:2], atol=1e-5)
    assert (read[2:] - plain[2:]).abs().mean() > 1e-3
    # "My prompt is more important" (fidelity 0): the negative rows get the reference too.
    plain, read = _step(checkpoint, _hook(checkpoint, module, control_mode=1))
    assert (read[:2] - plain[:2]).abs().mean() > 1e-3


@pytest.mark.parametrize(
    ("modules", "attention_records", "adain_records"),
    [
        (("reference_only", "reference_only"), 2, 0),  # attention records accumulate
        (("reference_adain", "reference_adain"), 0, 2),  # so do statistics
        # The extension runs a write pass's other mechanism in read mode, so the second unit's
        # write pass consumes (and clears) what the first recorded.
        (("reference_only", "reference_adain"), 0, 1),
        (("reference_adain", "reference_only"), 1, 0),
    ],
)
def test_units_record_in_the_extensions_order(
    engine: Engine, modules: tuple[str, str], attention_records: int, adain_records: int
) -> None:
    checkpoint = loaded(engine, SD1)
    units = tuple(
        replace(_hook(checkpoint, module).units[0], index=i) for i, module in enumerate(modules)
    )
    pipe = checkpoint.pipe
    hook = ReferenceHook(units, pipe.vae, pipe.scheduler.alphas_cumprod)
    model_in, t, embeds, _ = _unet_inputs(checkpoint, 8)
    info = StepInfo(index=0, total=4, batch=2, copies=2, t=t[0], sample=model_in[:2])
    with torch.no_grad(), hook.attached(pipe.unet):
        hook(model_in, t, {"encoder_hidden_states": embeds}, info)
        assert hook._attached is not None
        layers = hook._attached.layers
        attention = [len(x.bank) for x in layers if isinstance(x, AttentionLayer)]
        adain = [len(x.means) for x in layers if isinstance(x, AdainLayer)]
    assert set(attention) == {attention_records}  # weight 1: every attention layer
    # weight 1 > rank: the middle block (0), input blocks 10 and 11 (2/3, 1/3), output blocks
    # 0 to 3 (0 to 3/4); not input blocks 4 to 8 (2 to 1) nor output blocks 4 to 7 (1 to 7/4).
    r = adain_records
    assert adain == [r, 0, 0, 0, 0, r, r, r, r, r, r, 0, 0, 0, 0]


def test_attached_undoes_everything_also_on_errors(engine: Engine) -> None:
    unet = loaded(engine, SD1).pipe.unet
    before = dict(unet.attn_processors)

    def forward_hooks() -> int:
        return sum(len(m._forward_hooks) for m in unet.modules())

    hooks_before = forward_hooks()
    hook = _hook(loaded(engine, SD1), "reference_adain+attn")
    with pytest.raises(KeyError), hook.attached(unet):
        assert any(isinstance(p, AttentionLayer) for p in unet.attn_processors.values())
        assert forward_hooks() > hooks_before
        raise KeyError("cancelled")
    assert unet.attn_processors == before and forward_hooks() == hooks_before
    with pytest.raises(AssertionError, match="attached"):
        _step_outside(hook)


def _step_outside(hook: ReferenceHook) -> None:
    hook(torch.zeros(2, 4, 8, 8), torch.zeros(2), {}, StepInfo(0, 4, 1, 2))


# --------------------------------------------------------------------------------------------
# Requests through the engine


def unit(**changes: Any) -> dict[str, Any]:
    base: dict[str, Any] = {"module": "reference_only", "model": "None", "image": b64_png(CARD)}
    base.update(changes)
    return {k: v for k, v in base.items() if v is not None}


def controlnet(*units: dict[str, Any], **changes: Any) -> str:
    return payload(alwayson_scripts={"controlnet": {"args": list(units)}}, **changes)


def same_pixels(a: list[bytes], b: list[bytes]) -> bool:
    return [pixels(x).tobytes() for x in a] == [pixels(y).tobytes() for y in b]


def run(engine: Engine, body: str) -> tuple[list[bytes], dict[str, Any]]:
    response = engine.handle("auto", body)
    return [i.data for i in response.images], json.loads(response.info)


@pytest.fixture(scope="module")
def plain(engine: Engine) -> list[bytes]:
    images, _ = run(engine, payload())
    return images


@pytest.fixture(scope="module")
def by_mode(engine: Engine) -> dict[str, tuple[list[bytes], dict[str, Any]]]:
    return {
        module: run(engine, controlnet(unit(module=module, save_detected_map=False)))
        for module in MODES
    }


def test_each_mode_changes_the_picture_and_they_differ(
    by_mode: dict[str, tuple[list[bytes], dict[str, Any]]], plain: list[bytes]
) -> None:
    changes = {m: mean_pixel_change(images, plain) for m, (images, _) in by_mode.items()}
    # Measured on the tiny SD1, 64x64, 4 Euler steps: about 20-30 levels each.
    assert all(change > 5.0 for change in changes.values()), changes
    for i, first in enumerate(MODES):
        for second in MODES[i + 1 :]:
            between = mean_pixel_change(by_mode[first][0], by_mode[second][0])
            assert between > MIN_CHANGE_LEVELS, (first, second, between)


def test_infotext_like_the_extension(
    by_mode: dict[str, tuple[list[bytes], dict[str, Any]]],
) -> None:
    images, info = by_mode["reference_adain+attn"]
    expected = (
        'ControlNet 0: "Module: reference_adain+attn, Model: None, Weight: 1.0, '
        "Resize Mode: Crop and Resize, Processor Res: 512, Threshold A: 0.5, "
        "Threshold B: 0.5, Guidance Start: 0.0, Guidance End: 1.0, Pixel Perfect: False, "
        'Control Mode: Balanced"'
    )
    assert expected in info["infotexts"][0]
    assert expected in (png_parameters(images[0]) or "")
    assert info.get("warnings", []) == []


@pytest.mark.parametrize(
    "changes",
    [
        {"weight": 0},
        {"guidance_start": 0.3, "guidance_end": 0.3},  # a window without a step (0, 0, .25, .5)
    ],
)
@pytest.mark.parametrize("module", MODES)
def test_no_weight_or_no_step_is_no_unit(
    engine: Engine, plain: list[bytes], module: str, changes: dict[str, Any]
) -> None:
    images, _ = run(engine, controlnet(unit(module=module, save_detected_map=False, **changes)))
    assert same_pixels(images, plain)


def test_the_weight_and_the_window_matter(
    engine: Engine, by_mode: dict[str, tuple[list[bytes], dict[str, Any]]]
) -> None:
    full = by_mode["reference_only"][0]
    for changes in ({"weight": 0.5}, {"guidance_start": 0.5}, {"threshold_a": 0.0}):
        images, _ = run(engine, controlnet(unit(save_detected_map=False, **changes)))
        assert mean_pixel_change(images, full) > MIN_CHANGE_LEVELS, changes


@pytest.mark.parametrize("module", MODES)
def test_another_reference_gives_another_picture(
    engine: Engine, by_mode: dict[str, tuple[list[bytes], dict[str, Any]]], module: str
) -> None:
    card = by_mode[module][0]
    other = unit(module=module, image=b64_png(OTHER), save_detected_map=False)
    images, _ = run(engine, controlnet(other))
    # Measured 0.4-0.6 levels (against about 25 for the unit itself): the tiny random VAE's
    # latents are small (std 0.1), so at 4 steps the noised reference is mostly noise.
    assert mean_pixel_change(images, card) > MIN_CHANGE_LEVELS


def test_the_next_request_is_untouched(engine: Engine, plain: list[bytes]) -> None:
    unet = loaded(engine, SD1).pipe.unet
    processors = dict(unet.attn_processors)
    run(engine, controlnet(unit(module="reference_adain+attn")))
    assert dict(unet.attn_processors) == processors
    assert not any(m._forward_hooks for m in unet.modules())
    images, _ = run(engine, payload())
    assert images == plain

    # A request stopped mid-sampling (Cog's cancel arrives as an exception in the progress
    # callback) leaves nothing attached either.
    def cancel(step: int, total: int) -> None:
        if step == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        engine.handle("auto", controlnet(unit(module="reference_adain+attn")), cancel)
    assert dict(unet.attn_processors) == processors
    images, _ = run(engine, payload())
    assert images == plain


def test_same_request_same_picture_and_the_detected_map(
    engine: Engine, by_mode: dict[str, tuple[list[bytes], dict[str, Any]]]
) -> None:
    images, _ = run(engine, controlnet(unit(module="reference_adain")))
    assert images[0] == by_mode["reference_adain"][0][0]
    assert len(images) == 2  # the reference as fitted, as the extension shows it
    assert np.asarray(pixels(images[1])).tolist() == np.asarray(CARD).tolist()


def test_model_forms(engine: Engine) -> None:
    reference, _ = run(engine, controlnet(unit(save_detected_map=False)))
    for model in (None, "", "none"):
        images, info = run(engine, controlnet(unit(model=model, save_detected_map=False)))
        assert same_pixels(images, reference) and "Model: None," in info["infotexts"][0]
    # A real model's name is ignored, as the extension does, and said so.
    images, info = run(
        engine, controlnet(unit(model="tiny-controlnet-sd15", save_detected_map=False))
    )
    assert same_pixels(images, reference)
    assert any("not used by the model-free module" in w for w in info["warnings"])


def test_two_units_and_a_controlnet_together(engine: Engine, plain: list[bytes]) -> None:
    one, _ = run(engine, controlnet(unit(save_detected_map=False)))
    two, info = run(
        engine,
        controlnet(
            unit(save_detected_map=False),
            unit(module="reference_adain", image=b64_png(OTHER), save_detected_map=False),
            {"module": "canny", "model": "tiny-controlnet-sd15", "image": b64_png(CARD)},
        ),
    )
    assert mean_pixel_change(two[:1], one) > MIN_CHANGE_LEVELS
    assert all(f"ControlNet {i}" in info["infotexts"][0] for i in range(3))


@pytest.mark.parametrize(
    "changes",
    [
        {"override_settings": {"sd_model_checkpoint": "tiny-sdxl"}},
        {"enable_hr": True, "hr_scale": 1.5, "denoising_strength": 0.5},
        {"init_images": [b64_png(CARD)], "denoising_strength": 0.6},
        {"sampler_name": "DDIM"},
        # 9-channel UNet: the write pass gets [x_t, zero mask, latent] as the extension's.
        {"override_settings": {"sd_model_checkpoint": "tiny-sd15_inpainting"}},
    ],
    ids=["sdxl", "hires", "img2img", "ddim", "inpainting-model"],
)
def test_reference_in_other_settings(
    engine: Engine, plain: list[bytes], changes: dict[str, Any]
) -> None:
    before, _ = run(engine, payload(**changes))
    sent = unit(save_detected_map=False)
    if "init_images" in changes:
        del sent["image"]  # img2img: the unit uses init_images[0]
    images, info = run(engine, controlnet(sent, **changes))
    assert mean_pixel_change(images, before) > MIN_CHANGE_LEVELS
    assert "Module: reference_only, Model: None" in info["infotexts"][0]
    if "override_settings" in changes:  # the SDXL UNet is left as it was, too
        after, _ = run(engine, payload(**changes))
        assert after == before


def test_hr_option_picks_the_passes(engine: Engine) -> None:
    hires = {"enable_hr": True, "hr_scale": 1.5, "denoising_strength": 0.5}
    both, _ = run(engine, controlnet(unit(save_detected_map=False), **hires))
    low, _ = run(
        engine, controlnet(unit(save_detected_map=False, hr_option="Low res only"), **hires)
    )
    assert mean_pixel_change(both, low) > MIN_CHANGE_LEVELS


def test_high_res_only_without_hires_runs_in_the_only_pass(
    engine: Engine, by_mode: dict[str, tuple[list[bytes], dict[str, Any]]]
) -> None:
    # The extension forces hr_option to Both when there is no hires pass.
    images, _ = run(engine, controlnet(unit(save_detected_map=False, hr_option="High res only")))
    assert same_pixels(images, by_mode["reference_only"][0])


def test_reference_needs_an_image_in_txt2img(engine: Engine) -> None:
    with pytest.raises(RequestError, match="no input image") as err:
        engine.handle("auto", controlnet(unit(image=None)))
    assert err.value.problems[0].field == "alwayson_scripts.controlnet.args[0].image"


def test_listing_has_the_reference_modules(engine: Engine) -> None:
    listing = engine.handle("controlnet/module_list", "{}").listing
    for module in MODES:
        assert module in listing["module_list"]
        assert listing["module_detail"][module]["model_free"] is True
