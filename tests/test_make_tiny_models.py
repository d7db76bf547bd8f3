"""scripts/make_tiny_models.py writes files that diffusers' own single-file and LoRA loaders accept.

Every checkpoint part is converted with diffusers' converters and compared key by key and shape by
shape with the diffusers model built from the same dims; then loaded strictly and run, so the
tiny models give finite outputs that depend on the prompt and the noise.
"""

from __future__ import annotations

import hashlib
import logging
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from diffusers import (
    AutoencoderKL,
    ControlNetModel,
    EulerDiscreteScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from diffusers.loaders import single_file_utils as sfu
from peft.tuners.lora import LoraLayer
from safetensors import safe_open
from safetensors.torch import load_file
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))

import make_tiny_models as tiny  # noqa: E402

# The maker's run time is checked with a hang guard only (see its test).
HANG_GUARD_S = 300.0

# mypy does not see diffusers' ModelMixin as an nn.Module, so its models are typed Any here.
Model = Any

# ------------------------------------------------------------------------------------------------
# diffusers / transformers configs with the same dims as the tiny files
# ------------------------------------------------------------------------------------------------


def unet_config(d: tiny.UNetDims) -> dict:
    levels = range(len(d.block_channels))
    has_attn = [d.transformer_depth[lv] > 0 for lv in levels]
    config = {
        "sample_size": 8,
        "in_channels": d.in_channels,
        "out_channels": d.out_channels,
        "down_block_types": ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in has_attn],
        "up_block_types": ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(has_attn)],
        "block_out_channels": list(d.block_channels),
        "layers_per_block": d.num_res_blocks,
        "cross_attention_dim": d.context_dim,
        # diffusers' mid block takes the last entry; levels without attention ignore theirs.
        "transformer_layers_per_block": [
            d.transformer_depth[lv] or d.transformer_depth_middle for lv in levels
        ],
        "attention_head_dim": d.num_heads if d.num_heads else list(d.heads_per_level),
        "use_linear_projection": d.use_linear_in_transformer,
    }
    if d.adm_in_channels is not None:
        config.update(
            addition_embed_type="text_time",
            addition_time_embed_dim=256,
            projection_class_embeddings_input_dim=d.adm_in_channels,
        )
    return config


def vae_config(d: tiny.VAEDims) -> dict:
    levels = len(d.block_channels)
    return {
        "in_channels": d.in_channels,
        "out_channels": d.out_ch,
        "down_block_types": ["DownEncoderBlock2D"] * levels,
        "up_block_types": ["UpDecoderBlock2D"] * levels,
        "block_out_channels": list(d.block_channels),
        "layers_per_block": d.num_res_blocks,
        "latent_channels": d.z_channels,
        "sample_size": 64,
    }


def clip_config(d: tiny.TextDims, open_clip: bool) -> CLIPTextConfig:
    return CLIPTextConfig(
        vocab_size=d.vocab_size,
        hidden_size=d.hidden,
        intermediate_size=d.intermediate,
        num_hidden_layers=d.layers,
        num_attention_heads=d.heads,
        max_position_embeddings=d.max_positions,
        projection_dim=d.projection_dim or d.hidden,
        hidden_act="gelu" if open_clip else "quick_gelu",
    )


def controlnet_config(d: tiny.ControlNetDims) -> dict:
    u = unet_config(d.unet)
    keep = ("in_channels", "down_block_types", "block_out_channels", "layers_per_block")
    config = {k: u[k] for k in keep}
    config.update(
        cross_attention_dim=u["cross_attention_dim"],
        attention_head_dim=u["attention_head_dim"],
        use_linear_projection=u["use_linear_projection"],
        conditioning_channels=d.hint_channels,
        conditioning_embedding_out_channels=list(d.hint_block_channels),
    )
    return config


# ------------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return tiny.make_all(tmp_path_factory.mktemp("tiny"), seed=0)


def load(path: Path) -> dict[str, torch.Tensor]:
    return {k: v.float() for k, v in load_file(str(path)).items()}


def assert_matches_model(converted: dict[str, torch.Tensor], model: Model) -> None:
    """Exactly the model's keys and shapes, then a strict load (so the values are usable)."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in converted.items()}
    missing = sorted(set(expected) - set(got))
    unexpected = sorted(set(got) - set(expected))
    mismatched = sorted(k for k in set(got) & set(expected) if got[k] != expected[k])
    assert not missing, f"missing: {missing[:10]}"
    assert not unexpected, f"unexpected: {unexpected[:10]}"
    assert not mismatched, f"shape mismatch: {[(k, got[k], expected[k]) for k in mismatched[:10]]}"
    model.load_state_dict(converted, strict=True)


def clip_text_model(d: tiny.TextDims, converted: dict, projection: bool, open_clip: bool):
    config = clip_config(d, open_clip)
    model = CLIPTextModelWithProjection(config) if projection else CLIPTextModel(config)
    # transformers 5 flattened CLIPTextModel: strip text_model. as diffusers' own loader does.
    if not hasattr(model, "text_model"):
        converted = {k.removeprefix("text_model."): v for k, v in converted.items()}
    assert_matches_model(converted, model)
    return model.eval()


def tokens(*ids: int) -> torch.Tensor:
    """A padded 77-token prompt: BOS, ids, EOS (the pooled output is read at the EOS)."""
    row = [49406, *ids, 49407]
    return torch.tensor([row + [49407] * (77 - len(row))])


def assert_prompt_dependent(model: torch.nn.Module) -> None:
    with torch.no_grad():
        a = model(tokens(320, 1125, 539, 320, 2368)).last_hidden_state
        b = model(tokens(320, 1125, 539, 320, 1929)).last_hidden_state
    assert torch.isfinite(a).all()
    assert (a - b).abs().max() > 0.1, "text features do not depend on the prompt"
    assert 0.3 < a.std() < 3


def unet_inputs(d: tiny.UNetDims, context: torch.Tensor, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    inputs: dict = {
        "sample": torch.randn(1, d.in_channels, 8, 8, generator=g),
        "timestep": torch.tensor([500]),
        "encoder_hidden_states": context,
    }
    if d.adm_in_channels is not None:
        pooled = d.adm_in_channels - 6 * 256
        inputs["added_cond_kwargs"] = {
            "text_embeds": torch.randn(1, pooled, generator=g),
            "time_ids": torch.tensor([[64.0, 64.0, 0.0, 0.0, 64.0, 64.0]]),
        }
    return inputs


def run_unet(unet: Model, d: tiny.UNetDims, context: torch.Tensor, seed: int):
    with torch.no_grad():
        return unet(**unet_inputs(d, context, seed)).sample


def context_for(d: tiny.UNetDims, seed: int) -> torch.Tensor:
    return torch.randn(1, 77, d.context_dim, generator=torch.Generator().manual_seed(seed))


def assert_unet_works(unet: Model, d: tiny.UNetDims) -> None:
    out = run_unet(unet, d, context_for(d, 1), seed=0)
    assert torch.isfinite(out).all()
    assert 0.1 < out.std() < 10, f"UNet output std {out.std():.3g} is not O(1)"
    other_prompt = run_unet(unet, d, context_for(d, 2), seed=0)
    other_noise = run_unet(unet, d, context_for(d, 1), seed=1)
    assert (out - other_prompt).abs().max() > 1e-2, "UNet output does not depend on the prompt"
    assert (out - other_noise).abs().max() > 1e-2, "UNet output does not depend on the noise"


def assert_vae_works(vae: Model) -> None:
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        a = vae.decode(torch.randn(1, 4, 8, 8, generator=g)).sample
        b = vae.decode(torch.randn(1, 4, 8, 8, generator=g)).sample
        latent = vae.encode(a).latent_dist.mean
    assert a.shape == (1, 3, 64, 64) and latent.shape == (1, 4, 8, 8)
    assert torch.isfinite(a).all() and torch.isfinite(latent).all()
    assert (a - b).abs().max() > 1e-2 and 0.05 < a.std() < 10


def checkpoint_unet(ckpt: dict, d: tiny.UNetDims) -> Model:
    config = unet_config(d)
    unet: Model = UNet2DConditionModel(**config)
    assert_matches_model(sfu.convert_ldm_unet_checkpoint(ckpt, config), unet)
    return unet.eval()


def checkpoint_vae(ckpt: dict, d: tiny.VAEDims) -> Model:
    config = vae_config(d)
    vae: Model = AutoencoderKL(**config)
    assert_matches_model(sfu.convert_ldm_vae_checkpoint(ckpt, config), vae)
    return vae.eval()


# ------------------------------------------------------------------------------------------------
# the files
# ------------------------------------------------------------------------------------------------


def test_same_seed_gives_identical_bytes_and_another_seed_does_not(tmp_path, files):
    again = tiny.make_all(tmp_path / "again", seed=0)
    other = tiny.make_all(tmp_path / "other", seed=1)
    assert set(again) == set(files) == set(tiny.FILES)
    for name, path in files.items():
        assert path.read_bytes() == again[name].read_bytes(), f"{name} differs between runs"
    for name in ("sd15", "lora-sd15", "embedding", "vae"):
        assert files[name].read_bytes() != other[name].read_bytes(), f"{name} ignores the seed"


def test_cli_writes_the_layout_quickly_and_small(tmp_path):
    start = time.perf_counter()
    result = subprocess.run(
        [
            sys.executable,
            str(REPO / "scripts" / "make_tiny_models.py"),
            str(tmp_path),
            "--seed",
            "3",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    elapsed = time.perf_counter() - start
    total = sum(f.stat().st_size for f in tmp_path.rglob("*") if f.is_file())
    print(result.stdout)
    for rel in tiny.FILES.values():
        assert (tmp_path / rel).is_file(), rel
    assert "total" in result.stdout
    assert total < 175e6, f"{total / 1e6:.1f} MB"
    # A hang guard, not a speed claim: "seconds" is ~2 s on a quiet 2-core machine, and a busy
    # CI machine must not turn a slow run into a failure.
    assert elapsed < HANG_GUARD_S, f"{elapsed:.1f} s"


@pytest.mark.parametrize(
    ("name", "dtype"),
    [
        ("sd15", torch.float32),
        ("sd15-inpainting", torch.float16),
        ("sdxl", torch.float16),
        ("sd21-v", torch.float16),
        ("vae", torch.float32),
        ("lora-sd15", torch.float16),
        ("controlnet-sd15", torch.float16),
    ],
)
def test_tensors_are_finite_random_and_of_the_file_dtype(files, name, dtype):
    with safe_open(str(files[name]), "pt") as f:
        keys = list(f.keys())
        tensors = {k: f.get_tensor(k) for k in keys}
    assert keys == sorted(keys)
    assert {t.dtype for t in tensors.values()} == {dtype}
    assert all(torch.isfinite(t).all() for t in tensors.values())
    weights = [t for k, t in tensors.items() if k.endswith("weight") and t.ndim >= 2]
    assert all(t.float().std() > 0 for t in weights), "a weight matrix is constant"


# ---- SD1 ----


@pytest.mark.parametrize(
    ("name", "dims"), [("sd15", tiny.SD1), ("sd15-inpainting", tiny.SD1_INPAINTING)]
)
def test_sd1_checkpoint_converts_exactly_and_runs(files, name, dims):
    ckpt = load(files[name])
    prefixes = {k.split(".")[0] for k in ckpt}
    assert prefixes == {"model", "first_stage_model", "cond_stage_model"}
    assert "cond_stage_model.transformer.text_model.embeddings.position_ids" not in ckpt
    assert_unet_works(checkpoint_unet(ckpt, dims.unet), dims.unet)
    assert_vae_works(checkpoint_vae(ckpt, dims.vae))
    text = sfu.convert_ldm_clip_checkpoint(ckpt)
    assert all(k.startswith("text_model.") for k in text)
    assert_prompt_dependent(clip_text_model(dims.text, text, projection=False, open_clip=False))


def test_diffusers_recognises_sd1_and_its_inpainting_variant(files):
    assert sfu.infer_diffusers_model_type(load(files["sd15"])) == "v1"
    inpainting = load(files["sd15-inpainting"])
    assert inpainting["model.diffusion_model.input_blocks.0.0.weight"].shape[1] == 9
    assert sfu.infer_diffusers_model_type(inpainting) == "inpainting"


def test_standalone_vae_converts_exactly_and_differs_from_the_checkpoint_vae(files):
    vae_sd = load(files["vae"])
    assert all(
        k.split(".")[0] in {"encoder", "decoder", "quant_conv", "post_quant_conv"} for k in vae_sd
    )
    assert vae_sd["encoder.mid.attn_1.q.weight"].ndim == 4  # conv 1x1 layout, as real files
    assert_vae_works(checkpoint_vae(vae_sd, tiny.VAE))
    in_ckpt = load(files["sd15"])["first_stage_model.decoder.conv_out.weight"]
    assert not torch.equal(vae_sd["decoder.conv_out.weight"], in_ckpt)


# ---- SDXL ----


def test_sdxl_checkpoint_converts_exactly_and_runs(files):
    d = tiny.SDXL
    ckpt = load(files["sdxl"])
    unet = checkpoint_unet(ckpt, d.unet)
    assert "model.diffusion_model.label_emb.0.0.weight" in ckpt
    assert_unet_works(unet, d.unet)
    assert_vae_works(checkpoint_vae(ckpt, d.vae))

    text_l = sfu.convert_ldm_clip_checkpoint(ckpt)
    assert text_l and all(k.startswith("text_model.") for k in text_l)
    assert_prompt_dependent(clip_text_model(d.text_l, text_l, projection=False, open_clip=False))

    config_g = clip_config(d.text_g, open_clip=True)
    text_g_model = CLIPTextModelWithProjection(config_g)
    prefix = "conditioner.embedders.1.model."
    text_g = sfu.convert_open_clip_checkpoint(text_g_model, ckpt, prefix=prefix)
    assert_matches_model(text_g, text_g_model)
    assert_prompt_dependent(text_g_model.eval())
    with torch.no_grad():
        pooled = text_g_model(tokens(320, 2368)).text_embeds
    assert pooled.shape[-1] + 6 * d.addition_time_embed_dim == d.unet.adm_in_channels
    assert d.unet.context_dim == d.text_l.hidden + d.text_g.hidden


def test_sdxl_text_encoders_load_apart_through_diffusers_single_file_clip_loader(files, tmp_path):
    """diffusers picks the CLIP-L branch for any model whose width equals TE1's position embedding:
    with TE1 and TE2 of one width, text_encoder_2 would silently get TE1's weights."""
    d = tiny.SDXL
    ckpt = load(files["sdxl"])
    for sub, dims in (("text_encoder", d.text_l), ("text_encoder_2", d.text_g)):
        clip_config(dims, open_clip=sub == "text_encoder_2").save_pretrained(tmp_path / sub)
    te1 = sfu.create_diffusers_clip_model_from_ldm(
        CLIPTextModel, ckpt, subfolder="text_encoder", config=str(tmp_path), local_files_only=True
    )
    te2 = sfu.create_diffusers_clip_model_from_ldm(
        CLIPTextModelWithProjection,
        ckpt,
        subfolder="text_encoder_2",
        config=str(tmp_path),
        local_files_only=True,
    )
    assert not any(p.is_meta for p in [*te1.parameters(), *te2.parameters()])
    g = "conditioner.embedders.1.model."
    assert torch.equal(
        te2.text_model.embeddings.token_embedding.weight, ckpt[f"{g}token_embedding.weight"]
    )
    assert torch.equal(te2.text_projection.weight, ckpt[f"{g}text_projection"].T)
    l_key = "conditioner.embedders.0.transformer.text_model.embeddings.token_embedding.weight"
    assert torch.equal(te1.embeddings.token_embedding.weight, ckpt[l_key])


# ---- SD2 (v) ----


def test_sd2_checkpoint_converts_exactly_and_runs(files):
    d = tiny.SD2
    ckpt = load(files["sd21-v"])
    assert ckpt["model.diffusion_model.input_blocks.1.1.proj_in.weight"].ndim == 2  # Linear
    assert_unet_works(checkpoint_unet(ckpt, d.unet), d.unet)
    assert_vae_works(checkpoint_vae(ckpt, d.vae))
    assert_prompt_dependent(sd2_text_model(ckpt))


def sd2_text_model(ckpt: dict) -> CLIPTextModel:
    text_model = CLIPTextModel(clip_config(tiny.SD2.text, open_clip=True))
    converted = sfu.convert_open_clip_checkpoint(text_model, ckpt, prefix="cond_stage_model.model.")
    # SD2 uses OpenCLIP without its projection (diffusers ignores text_projection for SD2).
    converted = {k.removeprefix("text_model."): v for k, v in converted.items()}
    assert_matches_model(converted, text_model)
    return text_model.eval()


def test_sd2_yaml_says_v_prediction_with_the_tiny_dims(files):
    path = files["sd21-v-yaml"]
    assert path.name == files["sd21-v"].with_suffix(".yaml").name
    config = yaml.safe_load(path.read_text())
    params = config["model"]["params"]
    assert params["parameterization"] == "v"
    unet = params["unet_config"]["params"]
    d = tiny.SD2.unet
    assert unet["model_channels"] == d.model_channels
    assert unet["channel_mult"] == list(d.channel_mult)
    assert unet["context_dim"] == d.context_dim
    assert unet["num_head_channels"] == 64 and unet["use_linear_in_transformer"] is True
    assert params["cond_stage_config"]["params"]["layer"] == "penultimate"


# ---- ControlNet ----


def test_controlnet_converts_exactly_and_responds_to_the_hint(files):
    d = tiny.CONTROLNET_SD1
    ckpt = load(files["controlnet-sd15"])
    assert all(k.startswith("control_model.") for k in ckpt)
    config = controlnet_config(d)
    model: Model = ControlNetModel(**config)
    assert_matches_model(sfu.convert_controlnet_checkpoint(ckpt, config), model)
    model.eval()
    g = torch.Generator().manual_seed(0)
    sample = torch.randn(1, 4, 8, 8, generator=g)
    context = torch.randn(1, 77, d.unet.context_dim, generator=g)

    def residuals(hint: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            down, mid = model(sample, 500, context, controlnet_cond=hint, return_dict=False)
        return torch.cat([r.flatten() for r in (*down, mid)])

    a = residuals(torch.rand(1, 3, 64, 64, generator=g))
    b = residuals(torch.rand(1, 3, 64, 64, generator=g))
    assert torch.isfinite(a).all() and a.abs().max() > 0
    assert (a - b).abs().max() > 1e-3, "ControlNet output does not depend on the hint"


# ---- LoRA ----


class _Warnings(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@pytest.fixture
def diffusers_warnings() -> Iterator[list[str]]:
    handler = _Warnings()
    logger = logging.getLogger("diffusers")
    logger.addHandler(handler)
    try:
        yield handler.messages
    finally:
        logger.removeHandler(handler)


def sd1_pipeline(files, name: str = "sd15") -> Any:
    """SD1 (or SD2, same pipeline class) assembled from strictly loaded, converted parts."""
    ckpt = load(files[name])
    d = tiny.SD2 if name == "sd21-v" else tiny.SD1
    if name == "sd21-v":
        text_encoder = sd2_text_model(ckpt)
    else:
        text = sfu.convert_ldm_clip_checkpoint(ckpt)
        text_encoder = clip_text_model(d.text, text, projection=False, open_clip=False)
    return StableDiffusionPipeline(
        vae=checkpoint_vae(ckpt, d.vae),
        text_encoder=text_encoder,
        tokenizer=None,
        unet=checkpoint_unet(ckpt, d.unet),
        scheduler=EulerDiscreteScheduler(steps_offset=1),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def sdxl_pipeline(files) -> Any:
    ckpt = load(files["sdxl"])
    d = tiny.SDXL
    text_l = sfu.convert_ldm_clip_checkpoint(ckpt)
    text_g_model = CLIPTextModelWithProjection(clip_config(d.text_g, open_clip=True))
    prefix = "conditioner.embedders.1.model."
    text_g = sfu.convert_open_clip_checkpoint(text_g_model, ckpt, prefix=prefix)
    assert_matches_model(text_g, text_g_model)
    return StableDiffusionXLPipeline(
        vae=checkpoint_vae(ckpt, d.vae),
        text_encoder=clip_text_model(d.text_l, text_l, projection=False, open_clip=False),
        text_encoder_2=text_g_model.eval(),
        tokenizer=None,
        tokenizer_2=None,
        unet=checkpoint_unet(ckpt, d.unet),
        scheduler=EulerDiscreteScheduler(steps_offset=1),
    )


@pytest.mark.parametrize("name", ["sd15", "sd21-v", "sdxl"])
def test_from_single_file_with_a_local_config_loads_exactly_these_weights(files, tmp_path, name):
    """The loader the predictor uses: from_single_file(config=DIR), offline."""
    sdxl = name == "sdxl"
    pipe = sdxl_pipeline(files) if sdxl else sd1_pipeline(files, name)
    pipe.save_pretrained(tmp_path)  # model_index.json and every component's config
    cls = StableDiffusionXLPipeline if sdxl else StableDiffusionPipeline
    extra: dict = {"tokenizer_2": None} if sdxl else {"safety_checker": None}
    loaded = cls.from_single_file(
        str(files[name]), config=str(tmp_path), local_files_only=True, tokenizer=None, **extra
    )
    parts = ["unet", "vae", "text_encoder"] + (["text_encoder_2"] if sdxl else [])
    for part in parts:
        want = getattr(pipe, part).state_dict()
        got = getattr(loaded, part).state_dict()
        assert set(got) == set(want), part
        differ = [k for k in want if not torch.equal(want[k], got[k].float())]
        assert not differ, f"{part}: {differ[:5]}"


def _digest(t: torch.Tensor) -> str:
    return hashlib.sha256(t.detach().to(torch.float16).contiguous().numpy().tobytes()).hexdigest()


def assert_every_lora_module_loaded(path: Path, models: list[Model], warnings: list[str]):
    """Each lora_down in the file is the lora_A of exactly one wrapped module, scaled alpha/rank."""
    lora = load_file(str(path))
    downs = {_digest(v.flatten(1)) for k, v in lora.items() if k.endswith(".lora_down.weight")}
    ups = {_digest(v.flatten(1)) for k, v in lora.items() if k.endswith(".lora_up.weight")}
    layers: list[Any] = [m for model in models for m in model.modules() if isinstance(m, LoraLayer)]
    assert len(layers) == len(downs), f"{len(layers)} modules wrapped, {len(downs)} in the file"
    loaded_a = {_digest(m.lora_A["default_0"].weight.flatten(1)) for m in layers}
    loaded_b = {_digest(m.lora_B["default_0"].weight.flatten(1)) for m in layers}
    assert loaded_a == downs and loaded_b == ups, "some LoRA weights were not loaded"
    scales = {m.scaling["default_0"] for m in layers}
    assert scales == {tiny.LORA.alpha / tiny.LORA.rank}
    # What diffusers logs when LoRA keys are left over or a model got none.
    bad = [w for w in warnings if any(s in w for s in ("unexpected", "missing", "No LoRA keys"))]
    assert not bad, bad


def test_sd1_kohya_lora_loads_fully_and_changes_the_unet(files, diffusers_warnings):
    pipe = sd1_pipeline(files)
    d = tiny.SD1.unet
    context = context_for(d, 1)
    before = run_unet(pipe.unet, d, context, seed=0)
    with torch.no_grad():
        text_before = pipe.text_encoder(tokens(320, 2368)).last_hidden_state
    pipe.load_lora_weights(str(files["lora-sd15"]))
    assert_every_lora_module_loaded(
        files["lora-sd15"], [pipe.unet, pipe.text_encoder], diffusers_warnings
    )
    after = run_unet(pipe.unet, d, context, seed=0)
    assert (after - before).abs().max() > 1e-2, "the LoRA does not change the UNet output"
    with torch.no_grad():
        text_after = pipe.text_encoder(tokens(320, 2368)).last_hidden_state
    assert (text_after - text_before).abs().max() > 1e-2, "the LoRA leaves the text encoder alone"


def test_sd1_lora_keys_and_metadata_are_kohyas(files):
    with safe_open(str(files["lora-sd15"]), "pt") as f:
        keys = set(f.keys())
        meta = f.metadata()
    stem = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    assert {f"{stem}.lora_down.weight", f"{stem}.lora_up.weight", f"{stem}.alpha"} <= keys
    assert "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight" in keys
    assert load_file(str(files["lora-sd15"]))[f"{stem}.lora_up.weight"].abs().max() > 0
    assert meta["ss_network_module"] == "networks.lora"
    assert meta["ss_output_name"] == "tiny-lora-sd15"
    assert meta["ss_base_model_version"] == "sd_v1"
    assert meta["ss_network_dim"] == str(tiny.LORA.rank)
    assert float(meta["ss_network_alpha"]) == tiny.LORA.alpha


def test_sdxl_kohya_lora_loads_fully_and_changes_the_unet(files, diffusers_warnings):
    with safe_open(str(files["lora-sdxl"]), "pt") as f:
        keys = set(f.keys())
        assert f.metadata()["ss_base_model_version"] == "sdxl_base_v1-0"
    for stem in (
        "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q",
        "lora_unet_middle_block_1_transformer_blocks_1_attn2_to_k",
        "lora_unet_output_blocks_0_1_transformer_blocks_0_ff_net_2",
        "lora_te1_text_model_encoder_layers_0_self_attn_q_proj",
        "lora_te2_text_model_encoder_layers_2_mlp_fc2",
    ):
        assert f"{stem}.lora_down.weight" in keys, stem

    pipe = sdxl_pipeline(files)
    d = tiny.SDXL.unet
    context = context_for(d, 1)
    before = run_unet(pipe.unet, d, context, seed=0)
    pipe.load_lora_weights(str(files["lora-sdxl"]))
    models = [pipe.unet, pipe.text_encoder, pipe.text_encoder_2]
    assert_every_lora_module_loaded(files["lora-sdxl"], models, diffusers_warnings)
    after = run_unet(pipe.unet, d, context, seed=0)
    assert (after - before).abs().max() > 1e-2, "the LoRA does not change the UNet output"


# ---- embeddings ----


def test_embeddings_have_the_text_encoder_widths(files):
    sd1 = load_file(str(files["embedding"]))
    assert {k: tuple(v.shape) for k, v in sd1.items()} == {"emb_params": (2, tiny.SD1.text.hidden)}
    xl = load_file(str(files["embedding-sdxl"]))
    assert {k: tuple(v.shape) for k, v in xl.items()} == {
        "clip_l": (2, tiny.SDXL.text_l.hidden),
        "clip_g": (2, tiny.SDXL.text_g.hidden),
    }
    assert sd1["emb_params"].abs().max() > 0


def test_downloads_flag_adds_the_download_shaped_checkpoints(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert tiny.main([str(tmp_path), "--downloads"]) == 0
    names = {p.name for p in (tmp_path / "checkpoints").glob("*.safetensors")}
    extra = {"tiny-sd15-pruned", "tiny-sd15-legacy", "tiny-sdxl-released"}
    assert {f"{n}.safetensors" for n in extra} <= names
    printed = capsys.readouterr().out
    assert all(n in printed for n in extra)
