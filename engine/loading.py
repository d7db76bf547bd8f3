"""Load checkpoints offline: single files in the original (LDM/SGM) layout, and diffusers folders.

Single files go through diffusers' own `from_single_file` with a local config folder, so the
real conversion code runs and nothing is fetched from a hub. The config folder is built from
the bundled configs of the family's reference model (engine/configs/) with only the values that
the tensor shapes decide (widths, layer counts, input channels) taken from the file: a full-size
civitai file therefore loads with exactly the reference configs, and the tiny test models load
through the same code with their own widths.

`.ckpt`/`.pt` files are read only through torch's weights-only unpickler.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import shutil
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from .catalog import CheckpointInfo
from .clip_vocab import EOS, write_tokenizer
from .errors import ModelLoadError
from .oom import is_out_of_memory

if TYPE_CHECKING:
    from .working_set import WorkingSet

log = logging.getLogger(__name__)

CONFIG_ROOT = Path(__file__).parent / "configs"
UNET = "model.diffusion_model."
VAE = "first_stage_model."

Shapes = Mapping[str, tuple[int, ...]]


class Family(StrEnum):
    SD1 = "sd1"
    SD2 = "sd2"
    SDXL = "sdxl"
    SDXL_REFINER = "sdxl_refiner"

    @property
    def latent_space(self) -> str:
        """Families whose latents can be handed from one model to another (refiner, hires)."""
        return "sdxl" if self in (Family.SDXL, Family.SDXL_REFINER) else "sd"


@dataclass(frozen=True)
class FamilySpec:
    """What tells a family apart in the original key layout and how its parts are named."""

    family: Family
    marker: str  # a key only this family's files have
    pipeline: str  # diffusers pipeline class for txt2img
    # text encoder slot -> (key prefix in the file, layout: "hf" for transformers CLIP, "openclip")
    text_encoders: tuple[tuple[str, str, str], ...]
    fixed_unet_heads: int | None  # SD1 has 8 heads everywhere; SD2/SDXL have 64-channel heads
    pad_tokens: tuple[tuple[str, str], ...]  # tokenizer folder -> pad token


FAMILIES: tuple[FamilySpec, ...] = (
    FamilySpec(
        Family.SDXL,
        marker="conditioner.embedders.1.model.token_embedding.weight",
        pipeline="StableDiffusionXLPipeline",
        text_encoders=(
            ("text_encoder", "conditioner.embedders.0.transformer.text_model.", "hf"),
            ("text_encoder_2", "conditioner.embedders.1.model.", "openclip"),
        ),
        fixed_unet_heads=None,
        pad_tokens=(("tokenizer", EOS), ("tokenizer_2", "!")),
    ),
    FamilySpec(
        Family.SDXL_REFINER,
        marker="conditioner.embedders.0.model.token_embedding.weight",
        pipeline="StableDiffusionXLImg2ImgPipeline",
        text_encoders=(("text_encoder_2", "conditioner.embedders.0.model.", "openclip"),),
        fixed_unet_heads=None,
        pad_tokens=(("tokenizer_2", "!"),),
    ),
    FamilySpec(
        Family.SD2,
        marker="cond_stage_model.model.token_embedding.weight",
        pipeline="StableDiffusionPipeline",
        text_encoders=(("text_encoder", "cond_stage_model.model.", "openclip"),),
        fixed_unet_heads=None,
        pad_tokens=(("tokenizer", "!"),),
    ),
    FamilySpec(
        Family.SD1,
        marker="cond_stage_model.transformer.text_model.embeddings.token_embedding.weight",
        pipeline="StableDiffusionPipeline",
        text_encoders=(("text_encoder", "cond_stage_model.transformer.text_model.", "hf"),),
        fixed_unet_heads=8,
        pad_tokens=(("tokenizer", EOS),),
    ),
)

# Old SD1 fine-tunes store the CLIP text model without transformers' `text_model.` level. webui
# 1.10.1 renames those keys on load (modules/sd_models.py, checkpoint_dict_replacements_sd1, applied
# to every key by transform_checkpoint_dict_key), so such files work there; we apply the same map.
LEGACY_SD1_TEXT_KEYS: tuple[tuple[str, str], ...] = (
    (
        "cond_stage_model.transformer.embeddings.",
        "cond_stage_model.transformer.text_model.embeddings.",
    ),
    ("cond_stage_model.transformer.encoder.", "cond_stage_model.transformer.text_model.encoder."),
    (
        "cond_stage_model.transformer.final_layer_norm.",
        "cond_stage_model.transformer.text_model.final_layer_norm.",
    ),
)
_SD1_TEXT_PREFIX = "cond_stage_model.transformer."

# SD2's diffusers text encoder stops one layer early: webui and diffusers both use OpenCLIP's
# penultimate layer as SD2's "last" layer, and diffusers' converter drops resblock 23.
_SD2_DROPPED_TEXT_LAYERS = 1
_HEAD_CHANNELS = 64  # CLIP-L, OpenCLIP ViT-H/bigG and SD2/SDXL UNet heads are all 64 wide


@dataclass
class LoadedCheckpoint:
    """A loaded pipeline and what the engine needs to know about it."""

    info: CheckpointInfo
    family: Family
    pipe: Any  # StableDiffusionPipeline | StableDiffusionXLPipeline
    scheduler_config: dict[str, Any]
    prediction_type: str
    is_inpainting: bool
    extra: dict[str, Any] = field(default_factory=dict)
    # Suffix of this checkpoint's LoRA adapter names ("" : plain ids); engine/pipelines.py
    # gives checkpoints that share some LoRA-bearing modules with another a scope of their own.
    lora_scope: str = ""


# --------------------------------------------------------------------------------------------
# Reading tensors and shapes


def _unwrap(state: Any) -> dict[str, Any]:
    # Some .ckpt files nest the weights under "state_dict" (once or more).
    while isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ModelLoadError("the file does not hold a state dict")
    return state


def read_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Tensor shapes by key, without reading tensor data for safetensors files."""
    try:
        if path.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as handle:
                return {k: tuple(handle.get_slice(k).get_shape()) for k in handle.keys()}  # noqa: SIM118
        state = _unwrap(torch.load(str(path), map_location="cpu", weights_only=True))
        return {k: tuple(v.shape) for k, v in state.items() if isinstance(v, torch.Tensor)}
    except ModelLoadError as exc:
        raise ModelLoadError(f"{path.name}: {exc}") from exc
    except Exception as exc:
        raise ModelLoadError(
            f"{path.name}: cannot read the file ({type(exc).__name__}: {exc})"
        ) from exc


def webui_key(key: str) -> str:
    """A key as webui sees it after its SD1 text-encoder rename (unchanged for every other key)."""
    for old, new in LEGACY_SD1_TEXT_KEYS:
        if key.startswith(old):
            return new + key[len(old) :]
    return key


def has_legacy_sd1_text_keys(shapes: Shapes) -> bool:
    return any(webui_key(k) != k for k in shapes)


def detect_family(shapes: Shapes, name: str) -> FamilySpec:
    """The family whose marker key the file has (SDXL refiners and others are refused)."""
    for spec in FAMILIES:
        if spec.marker in shapes:
            if not any(k.startswith(UNET) for k in shapes):
                break
            return spec
    raise ModelLoadError(
        f"{name}: not a Stable Diffusion checkpoint this server can load "
        "(supported: SD 1.x, SD 2.x, SDXL base and refiner, single file in the original layout, "
        "or a diffusers folder)"
    )


# --------------------------------------------------------------------------------------------
# Config inference: only what the shapes decide


def _indices(shapes: Shapes, pattern: str) -> set[int]:
    rx = re.compile(pattern)
    return {int(m.group(1)) for k in shapes if (m := rx.match(k))}


def _count(shapes: Shapes, pattern: str) -> int:
    found = _indices(shapes, pattern)
    return max(found) + 1 if found else 0


def _shape(shapes: Shapes, key: str, name: str) -> tuple[int, ...]:
    try:
        return shapes[key]
    except KeyError:
        raise ModelLoadError(f"{name}: missing tensor {key!r}; the file is incomplete") from None


def infer_unet(base: dict[str, Any], shapes: Shapes, spec: FamilySpec, name: str) -> dict[str, Any]:
    cfg = dict(base)
    levels = len(base["block_out_channels"])
    layers = base["layers_per_block"]
    blocks = _count(shapes, re.escape(UNET) + r"input_blocks\.(\d+)\.")
    if blocks != 1 + levels * layers + (levels - 1):
        raise ModelLoadError(
            f"{name}: UNet has {blocks} input blocks; a {spec.family} UNet has "
            f"{1 + levels * layers + levels - 1}"
        )
    widths, depths = [], []
    for level in range(levels):
        idx = 1 + level * (layers + 1)
        widths.append(_shape(shapes, f"{UNET}input_blocks.{idx}.0.out_layers.3.weight", name)[0])
        depths.append(
            _count(
                shapes, re.escape(f"{UNET}input_blocks.{idx}.1.transformer_blocks.") + r"(\d+)\."
            )
        )
    cfg["block_out_channels"] = widths
    cfg["in_channels"] = _shape(shapes, f"{UNET}input_blocks.0.0.weight", name)[1]
    cfg["out_channels"] = _shape(shapes, f"{UNET}out.2.weight", name)[0]
    cfg["down_block_types"] = ["CrossAttnDownBlock2D" if d else "DownBlock2D" for d in depths]
    cfg["up_block_types"] = ["CrossAttnUpBlock2D" if d else "UpBlock2D" for d in reversed(depths)]
    middle = _count(shapes, re.escape(f"{UNET}middle_block.1.transformer_blocks.") + r"(\d+)\.")
    attention = {d for d in depths if d} | {middle}
    reference = base.get("transformer_layers_per_block", 1)
    if not (isinstance(reference, int) and attention == {reference}):
        # diffusers reads the mid block's depth from the last entry; levels without attention
        # ignore theirs (SDXL's real config: [1, 2, 10], the refiner's: 4 everywhere).
        per_level = [max(d, 1) for d in depths]
        per_level[-1] = middle
        cfg["transformer_layers_per_block"] = per_level
    cross = next(
        (v for k, v in shapes.items() if k.startswith(UNET) and k.endswith("attn2.to_k.weight")),
        None,
    )
    if cross is None:
        raise ModelLoadError(f"{name}: UNet has no cross-attention layers")
    cfg["cross_attention_dim"] = cross[1]
    if spec.fixed_unet_heads is None:
        cfg["attention_head_dim"] = [max(1, w // _HEAD_CHANNELS) for w in widths]
    proj_in = next(
        v for k, v in shapes.items() if k.startswith(UNET) and k.endswith(".1.proj_in.weight")
    )
    linear = len(proj_in) == 2
    if linear != bool(base.get("use_linear_projection", False)):
        cfg["use_linear_projection"] = linear
    if "projection_class_embeddings_input_dim" in base:
        cfg["projection_class_embeddings_input_dim"] = _shape(
            shapes, f"{UNET}label_emb.0.0.weight", name
        )[1]
    return cfg


def infer_vae(base: dict[str, Any], shapes: Shapes, prefix: str, name: str) -> dict[str, Any]:
    cfg = dict(base)
    levels = _count(shapes, re.escape(f"{prefix}encoder.down.") + r"(\d+)\.")
    if levels == 0:
        raise ModelLoadError(f"{name}: no VAE encoder found")
    cfg["block_out_channels"] = [
        _shape(shapes, f"{prefix}encoder.down.{i}.block.0.conv2.weight", name)[0]
        for i in range(levels)
    ]
    cfg["down_block_types"] = ["DownEncoderBlock2D"] * levels
    cfg["up_block_types"] = ["UpDecoderBlock2D"] * levels
    cfg["layers_per_block"] = _count(
        shapes, re.escape(f"{prefix}encoder.down.0.block.") + r"(\d+)\."
    )
    cfg["latent_channels"] = _shape(shapes, f"{prefix}quant_conv.weight", name)[0] // 2
    return cfg


def infer_text_encoder(
    base: dict[str, Any], shapes: Shapes, prefix: str, layout: str, family: Family, name: str
) -> dict[str, Any]:
    cfg = dict(base)
    if layout == "hf":
        emb = _shape(shapes, f"{prefix}embeddings.token_embedding.weight", name)
        layers = _count(shapes, re.escape(f"{prefix}encoder.layers.") + r"(\d+)\.")
        cfg["intermediate_size"] = _shape(shapes, f"{prefix}encoder.layers.0.mlp.fc1.weight", name)[
            0
        ]
        cfg["max_position_embeddings"] = _shape(
            shapes, f"{prefix}embeddings.position_embedding.weight", name
        )[0]
    else:
        emb = _shape(shapes, f"{prefix}token_embedding.weight", name)
        layers = _count(shapes, re.escape(f"{prefix}transformer.resblocks.") + r"(\d+)\.")
        cfg["intermediate_size"] = _shape(
            shapes, f"{prefix}transformer.resblocks.0.mlp.c_fc.weight", name
        )[0]
        cfg["max_position_embeddings"] = _shape(shapes, f"{prefix}positional_embedding", name)[0]
        # Only CLIPTextModelWithProjection (SDXL's second encoder) has a projection layer; SD2's
        # CLIPTextModel ignores projection_dim, so its reference value stays.
        projected = "CLIPTextModelWithProjection" in base.get("architectures", [])
        if projected and f"{prefix}text_projection" in shapes:
            cfg["projection_dim"] = shapes[f"{prefix}text_projection"][1]
        if family is Family.SD2:
            layers -= _SD2_DROPPED_TEXT_LAYERS
    cfg["vocab_size"], cfg["hidden_size"] = emb[0], emb[1]
    cfg["num_hidden_layers"] = layers
    cfg["num_attention_heads"] = max(1, emb[1] // _HEAD_CHANNELS)
    return cfg


def _read_json(path: Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    return data


def infer_configs(spec: FamilySpec, shapes: Shapes, name: str) -> dict[str, dict[str, Any]]:
    """Component configs for this file: the family's reference configs plus its shapes."""
    base = CONFIG_ROOT / spec.family.value
    configs = {
        "unet": infer_unet(_read_json(base / "unet" / "config.json"), shapes, spec, name),
        "vae": infer_vae(_read_json(base / "vae" / "config.json"), shapes, VAE, name),
    }
    for slot, prefix, layout in spec.text_encoders:
        configs[slot] = infer_text_encoder(
            _read_json(base / slot / "config.json"), shapes, prefix, layout, spec.family, name
        )
    return configs


def write_config_dir(
    spec: FamilySpec, configs: Mapping[str, dict[str, Any]], cache_root: Path
) -> Path:
    """A diffusers-layout config folder for from_single_file, shared by identical configs."""
    blob = json.dumps({"family": spec.family.value, **configs}, sort_keys=True).encode()
    folder = cache_root / "configs" / f"{spec.family.value}-{hashlib.sha1(blob).hexdigest()[:16]}"
    if (folder / "model_index.json").is_file():
        return folder
    staging = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(staging, ignore_errors=True)
    shutil.copytree(CONFIG_ROOT / spec.family.value, staging)
    for slot, cfg in configs.items():
        name = "config.json"
        (staging / slot).mkdir(exist_ok=True)
        (staging / slot / name).write_text(
            json.dumps(cfg, indent=2, sort_keys=True), encoding="utf-8"
        )
    for slot, pad in spec.pad_tokens:
        write_tokenizer(staging / slot, pad_token=pad)
    shutil.rmtree(folder, ignore_errors=True)
    staging.rename(folder)
    return folder


# --------------------------------------------------------------------------------------------
# Prediction type (epsilon or v)


def prediction_type_hint(shapes: Shapes, yaml: Path | None) -> str | None:
    """v-prediction as the file or its webui-style same-name .yaml declares it, if it does.

    `yaml` is the catalog's `CheckpointInfo.config`: found at scan time and only when it lies
    inside the models folder (a symlink to anywhere else is never read)."""
    if "v_pred" in shapes:  # the marker key v-prediction SDXL fine-tunes carry
        return "v_prediction"
    if yaml is not None and yaml.is_file():
        match = re.search(
            r"parameterization:\s*[\"']?(\w+)", yaml.read_text(encoding="utf-8", errors="replace")
        )
        if match:
            return "v_prediction" if match.group(1) == "v" else "epsilon"
    return None


@torch.no_grad()
def probe_v_prediction(unet: Any) -> bool:
    """webui's test for SD2 files without a yaml: at t=999 an epsilon model returns about the
    input, a v model about its negative (sd_models_config.is_using_v_parameterization_for_sd2)."""
    param = next(unet.parameters())
    x = torch.full(
        (1, unet.config.in_channels, 8, 8), 0.5, device=param.device, dtype=torch.float32
    )
    cond = torch.full(
        (1, 2, unet.config.cross_attention_dim), 0.5, device=param.device, dtype=torch.float32
    )
    t = torch.tensor([999], device=param.device)
    dtype = param.dtype
    unet.to(torch.float32)
    try:
        out = unet(x, t, encoder_hidden_states=cond).sample
    finally:
        unet.to(dtype)
    return bool((out - x).mean().item() < -1)


# --------------------------------------------------------------------------------------------
# Loading


@dataclass(frozen=True)
class Placement:
    device: str
    dtype: torch.dtype
    # The device working set (engine/working_set.py) that every cache loading models here
    # reports to, so that one budget bounds them all; None: caches keep what they load.
    memory: WorkingSet | None = field(default=None, compare=False, repr=False)


@dataclass(frozen=True)
class UNetPlacement:
    """Where a checkpoint's UNet lives, read once per checkpoint: diffusers' `device` and
    `dtype` properties walk every parameter on each access."""

    device: torch.device
    dtype: torch.dtype


def placement(loaded: LoadedCheckpoint) -> UNetPlacement:
    cached = loaded.extra.get("placement")
    if not isinstance(cached, UNetPlacement):
        param = next(loaded.pipe.unet.parameters())
        cached = UNetPlacement(param.device, param.dtype)
        loaded.extra["placement"] = cached
    return cached


def default_placement() -> Placement:
    """fp16 on CUDA, fp32 on CPU (fp16 matmuls on CPU are slow and lossy)."""
    if torch.cuda.is_available():
        return Placement("cuda", torch.float16)
    return Placement("cpu", torch.float32)


def _pipeline_class(name: str) -> Any:
    import diffusers

    return getattr(diffusers, name)


def load_single_file(
    info: CheckpointInfo, placement: Placement, cache_root: Path
) -> LoadedCheckpoint:
    """Load one original-layout checkpoint file through diffusers' single-file loader."""
    path = info.filename
    file_shapes = read_shapes(path)
    legacy_text = has_legacy_sd1_text_keys(file_shapes)
    shapes = {webui_key(k): v for k, v in file_shapes.items()} if legacy_text else file_shapes
    spec = detect_family(shapes, info.name)
    configs = infer_configs(spec, shapes, info.name)
    config_dir = write_config_dir(spec, configs, cache_root)
    pipeline_cls = _pipeline_class(spec.pipeline)
    components: dict[str, Any] = {}
    try:
        if legacy_text and spec.family is Family.SD1:
            # diffusers' converter only knows the `text_model.` layout: build the text encoder
            # from the renamed keys with diffusers' own CLIP converter and hand it over.
            components["text_encoder"] = _legacy_text_encoder(path, config_dir, placement.dtype)
        pipe = pipeline_cls.from_single_file(
            str(path),
            config=str(config_dir),
            local_files_only=True,
            torch_dtype=placement.dtype,
            safety_checker=None,
            feature_extractor=None,
            **components,
        )
    except Exception as exc:
        if is_out_of_memory(exc):
            raise  # not the file's fault: the caller reports it (engine/oom.py)
        raise ModelLoadError(f"{info.name}: loading failed ({type(exc).__name__}: {exc})") from exc
    _check_loaded(pipe, info.name)
    scheduler_config = dict(pipe.scheduler.config)
    prediction = prediction_type_hint(shapes, info.config)
    if prediction is None:
        prediction = "epsilon"
        if spec.family is Family.SD2 and probe_v_prediction(pipe.unet):
            prediction = "v_prediction"
    scheduler_config["prediction_type"] = prediction
    return _finish(info, spec.family, pipe, scheduler_config, placement)


def _read_tensors(path: Path, prefix: str) -> dict[str, torch.Tensor]:
    """The tensors whose keys start with `prefix` (safetensors: only those are read)."""
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as handle:
            return {k: handle.get_tensor(k) for k in handle.keys() if k.startswith(prefix)}  # noqa: SIM118
    state = _unwrap(torch.load(str(path), map_location="cpu", weights_only=True))
    return {k: v for k, v in state.items() if k.startswith(prefix) and isinstance(v, torch.Tensor)}


def _legacy_text_encoder(path: Path, config_dir: Path, dtype: torch.dtype) -> Any:
    """SD1's CLIP text model from a file with the old keys, renamed as webui renames them."""
    from diffusers.loaders.single_file_utils import create_diffusers_clip_model_from_ldm
    from transformers import CLIPTextModel

    tensors = {webui_key(k): v for k, v in _read_tensors(path, _SD1_TEXT_PREFIX).items()}
    return create_diffusers_clip_model_from_ldm(
        CLIPTextModel,
        tensors,
        config=str(config_dir),
        subfolder="text_encoder",
        torch_dtype=dtype,
        local_files_only=True,
    )


def load_diffusers_folder(info: CheckpointInfo, placement: Placement) -> LoadedCheckpoint:
    """Load a diffusers-format folder (model_index.json + component folders), offline."""
    index = _read_json(info.filename / "model_index.json")
    class_name = str(index.get("_class_name", ""))
    family = Family.SDXL if "XL" in class_name else Family.SD1
    pipeline_cls = _pipeline_class(
        "StableDiffusionXLPipeline" if family is Family.SDXL else "StableDiffusionPipeline"
    )
    try:
        kwargs: dict[str, Any] = {"local_files_only": True, "torch_dtype": placement.dtype}
        if family is not Family.SDXL:
            kwargs.update(
                safety_checker=None, feature_extractor=None, requires_safety_checker=False
            )
        pipe = pipeline_cls.from_pretrained(str(info.filename), **kwargs)
    except Exception as exc:
        if is_out_of_memory(exc):
            raise  # not the file's fault: the caller reports it (engine/oom.py)
        raise ModelLoadError(f"{info.name}: loading failed ({type(exc).__name__}: {exc})") from exc
    if family is Family.SD1 and pipe.text_encoder.config.hidden_size == 1024:
        family = Family.SD2
    _check_loaded(pipe, info.name)
    return _finish(info, family, pipe, dict(pipe.scheduler.config), placement)


def _check_loaded(pipe: Any, name: str) -> None:
    # A key the converter did not fill leaves a parameter on the meta device: refuse the file
    # rather than generate from garbage.
    for slot in ("unet", "vae", "text_encoder", "text_encoder_2"):
        module = getattr(pipe, slot, None)
        if module is None:
            continue
        for pname, param in module.named_parameters():
            if param.device.type == "meta":
                raise ModelLoadError(f"{name}: {slot} weight {pname} is missing from the file")


def _finish(
    info: CheckpointInfo,
    family: Family,
    pipe: Any,
    scheduler_config: dict[str, Any],
    placement: Placement,
) -> LoadedCheckpoint:
    _check_inputs(pipe.unet.config.in_channels, info.name)
    pipe.to(placement.device)
    pipe.set_progress_bar_config(disable=True)
    # One precision policy for every VAE (engine/vae_precision.py): the engine's dtype, fp32
    # for an SDXL VAE that overflows in fp16. diffusers' own force_upcast flips a shared
    # module's dtype around each decode; never relied on.
    from .vae_precision import settle_precision

    settle_precision(pipe.vae, family, placement, info.name)
    if placement.device == "cuda":
        _enable_fast_attention(pipe)
    return LoadedCheckpoint(
        info=info,
        family=family,
        pipe=pipe,
        scheduler_config=scheduler_config,
        prediction_type=str(scheduler_config.get("prediction_type", "epsilon")),
        is_inpainting=pipe.unet.config.in_channels == 9,
    )


# UNet input channels: what each count means, and whether this server runs it. webui runs
# the unsupported two with their own conditioning (a MiDaS depth map; the init image's latent
# with a second CFG scale); without it they would load here and fail at the first step.
_UNSUPPORTED_INPUTS = {
    5: "a depth-to-image model (latent + depth map)",
    8: "an instruct-pix2pix model (latent + the init image's latent)",
}
_SUPPORTED_INPUTS = "4 (text-to-image) or 9 (inpainting)"


def _check_inputs(channels: int, name: str) -> None:
    if channels in (4, 9):
        return
    kind = _UNSUPPORTED_INPUTS.get(channels, "an unknown kind of model")
    raise ModelLoadError(
        f"{name}: the UNet takes {channels} input channels: {kind}, which this server does "
        f"not run; checkpoints here must take {_SUPPORTED_INPUTS}"
    )


def _enable_fast_attention(pipe: Any) -> None:
    """xformers when it imports (CUDA image), else PyTorch SDPA, diffusers' default."""
    try:
        import xformers  # noqa: F401
    except ImportError:
        return
    try:
        pipe.enable_xformers_memory_efficient_attention()
    except Exception as exc:  # noqa: BLE001 - a broken xformers build must not stop setup
        log.warning("xformers is installed but unusable (%s); using SDPA", exc)


def load_checkpoint(
    info: CheckpointInfo, placement: Placement, cache_root: Path
) -> LoadedCheckpoint:
    """Load a catalog entry: a diffusers folder or a single file."""
    log.info("loading checkpoint %s", info.title)
    if info.is_folder:
        return load_diffusers_folder(info, placement)
    return load_single_file(info, placement, cache_root)
